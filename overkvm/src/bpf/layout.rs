//! Resolving, from the running kernel's BTF, the structure offsets and operation codes the
//! kernel programs need (`KernelLayout`), and which block tracepoints exist.
//!
//! The programs have no CO-RE relocations, so a field that moved between kernel versions would
//! be read at the wrong place; resolving every offset here, at load time, is what keeps the
//! counters right on any kernel. Fields the accounting cannot work without are errors; the
//! cgroup chain is optional (kernels without CONFIG_BLK_CGROUP) and degrades with a note.

use anyhow::anyhow;
use overkvm_common::{ABSENT, KernelLayout, OpCodes};

use super::btf::Btf;

/// The resolved layout and what had to be worked around to get it.
#[derive(Clone, Debug)]
pub struct LayoutReport {
    pub layout: KernelLayout,
    /// One line per degraded feature or defaulted value, for the user to see.
    pub notes: Vec<String>,
}

/// Which block tracepoint families the kernel has (its BTF has a `btf_trace_<name>` typedef for
/// every raw tracepoint, which is what `tp_btf` programs attach to).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HookSupport {
    /// `block_io_start` and `block_io_done` (Linux 6.5+), with `block_rq_issue` and
    /// `block_rq_requeue` for the flush machinery's own requests.
    pub io_start_done: bool,
    /// `block_getrq`, `block_rq_issue` and `block_rq_complete`.
    pub rq_fallback: bool,
    /// `block_bio_queue`.
    pub bio_queue: bool,
    /// `block_split`.
    pub block_split: bool,
}

/// Which block tracepoints the kernel offers.
pub fn hooks_available(btf: &Btf) -> HookSupport {
    let has = |tp: &str| btf.has_type(&format!("btf_trace_{tp}"));
    HookSupport {
        io_start_done: has("block_io_start")
            && has("block_io_done")
            && has("block_rq_issue")
            && has("block_rq_requeue"),
        rq_fallback: has("block_getrq")
            && has("block_rq_issue")
            && has("block_rq_complete")
            && has("block_rq_requeue"),
        bio_queue: has("block_bio_queue"),
        block_split: has("block_split"),
    }
}

/// Resolves one field offset; the error names the struct, the field and the BTF source.
fn offset(btf: &Btf, ty: &str, path: &str) -> anyhow::Result<u32> {
    match btf.field_offset(ty, path) {
        // ABSENT is the "not there" marker for the programs; a real offset cannot be it.
        Ok(ABSENT) => Err(anyhow!(
            "struct {ty} field {path} has an impossible offset in {}",
            btf.source()
        )),
        Ok(off) => Ok(off),
        Err(e) => Err(anyhow!("{e} in {}", btf.source())),
    }
}

/// Resolves the kernel layout the programs need.
///
/// Fails if a request, bio or block_device field is missing: the programs cannot count I/O
/// without them. A missing link of the bio -> blkcg_gq -> blkcg -> cgroup -> kernfs_node chain
/// sets the whole chain to `ABSENT` (so the programs skip it as one) and adds a note. Operation
/// codes missing from BTF keep the values of `OpCodes::LINUX_DEFAULT`, with a note.
pub fn kernel_layout(btf: &Btf) -> anyhow::Result<LayoutReport> {
    let mut notes = Vec::new();
    let mut layout = KernelLayout::PLACEHOLDER;
    layout.rq_cmd_flags = offset(btf, "request", "cmd_flags")?;
    layout.rq_data_len = offset(btf, "request", "__data_len")?;
    layout.rq_part = offset(btf, "request", "part")?;
    layout.rq_bio = offset(btf, "request", "bio")?;
    layout.bio_opf = offset(btf, "bio", "bi_opf")?;
    layout.bio_bdev = offset(btf, "bio", "bi_bdev")?;
    layout.bio_size = offset(btf, "bio", "bi_iter.bi_size")?;
    layout.bio_next = offset(btf, "bio", "bi_next")?;
    layout.bdev_dev = offset(btf, "block_device", "bd_dev")?;
    // Optional: without them bios are counted on every device.
    match (
        btf.field_offset("block_device", "bd_disk"),
        btf.field_offset("gendisk", "queue"),
        btf.field_offset("request_queue", "mq_ops"),
    ) {
        (Ok(d), Ok(q), Ok(m)) => {
            layout.bdev_disk = d;
            layout.disk_queue = q;
            layout.queue_mq_ops = m;
        }
        _ => notes.push(
            "cannot tell blk-mq from bio-based devices from BTF: bios are counted on every device"
                .to_string(),
        ),
    }

    // Optional as a group: what names a request in flight and when it started. Without them
    // ops and bytes are still counted, latency is not.
    let ident = [
        ("request", "q"),
        ("request_queue", "id"),
        ("request", "mq_hctx"),
        ("blk_mq_hw_ctx", "queue_num"),
        ("request", "tag"),
        ("request", "internal_tag"),
        ("request", "start_time_ns"),
    ];
    let found: Vec<u32> = ident
        .iter()
        .filter_map(|(ty, path)| btf.field_offset(ty, path).ok().filter(|&o| o != ABSENT))
        .collect();
    if let [q, id, hctx, qnum, tag, itag, start] = found[..] {
        layout.rq_q = q;
        layout.queue_id = id;
        layout.rq_mq_hctx = hctx;
        layout.hctx_queue_num = qnum;
        layout.rq_tag = tag;
        layout.rq_internal_tag = itag;
        layout.rq_start_time_ns = start;
    } else {
        let missing: Vec<String> = ident
            .iter()
            .filter(|(ty, path)| btf.field_offset(ty, path).is_err())
            .map(|(ty, path)| format!("{ty}.{path}"))
            .collect();
        notes.push(format!(
            "no request latency on this kernel ({} missing from BTF): ops and bytes are counted",
            missing.join(", ")
        ));
    }

    // Optional: without it a flush sequence's intermediate completions are not told apart
    // (they would end their request's latency early and miss at the real end).
    match btf.field_offset("request", "rq_flags") {
        Ok(off) if off != ABSENT => layout.rq_flags = off,
        _ => notes.push(
            "request.rq_flags missing from BTF: writes with preflush/FUA may lose latency samples"
                .to_string(),
        ),
    }

    let chain = [
        ("bio", "bi_blkg"),
        ("blkcg_gq", "blkcg"),
        ("blkcg", "css.cgroup"),
        ("cgroup", "kn"),
        ("kernfs_node", "id"),
    ];
    let mut resolved = [ABSENT; 5];
    let mut missing = None;
    for (slot, (ty, path)) in resolved.iter_mut().zip(chain) {
        match btf.field_offset(ty, path) {
            Ok(off) if off != ABSENT => *slot = off,
            Ok(_) => {
                missing = Some(format!("{ty}.{path} has an impossible offset"));
                break;
            }
            Err(e) if e.is_not_found() => {
                missing = Some(format!("{ty}.{path} missing"));
                break;
            }
            Err(e) => {
                missing = Some(format!("{ty}.{path}: {e}"));
                break;
            }
        }
    }
    match missing {
        None => {
            [
                layout.bio_blkg,
                layout.blkg_blkcg,
                layout.blkcg_cgroup,
                layout.cgroup_kn,
                layout.kn_id,
            ] = resolved;
        }
        Some(why) => notes.push(format!(
            "no block cgroups in this kernel ({why}): I/O will not carry a cgroup"
        )),
    }

    layout.ops = op_codes(btf, &mut notes);
    Ok(LayoutReport { layout, notes })
}

/// Reads the `REQ_OP_*` values and `__REQ_PREFLUSH` bit from BTF, defaulting what is missing.
fn op_codes(btf: &Btf, notes: &mut Vec<String>) -> OpCodes {
    let mut ops = OpCodes::LINUX_DEFAULT;
    let op_mask = ops.op_mask as i64;
    let mut defaulted = Vec::new();
    for (name, slot) in [
        ("REQ_OP_READ", &mut ops.read),
        ("REQ_OP_WRITE", &mut ops.write),
        ("REQ_OP_FLUSH", &mut ops.flush),
        ("REQ_OP_DISCARD", &mut ops.discard),
        ("REQ_OP_SECURE_ERASE", &mut ops.secure_erase),
        ("REQ_OP_WRITE_ZEROES", &mut ops.write_zeroes),
    ] {
        match btf.enum_value(name) {
            // An op code outside the mask could never match: keep the default instead.
            Some(v) if (0..=op_mask).contains(&v) => *slot = v as u32,
            Some(v) => defaulted.push(format!("{name} (value {v} outside the op mask)")),
            None => defaulted.push(name.to_string()),
        }
    }
    for (name, slot) in [
        ("__REQ_PREFLUSH", &mut ops.preflush),
        ("__REQ_FUA", &mut ops.fua),
    ] {
        match btf.enum_value(name) {
            Some(bit @ 0..32) => *slot = 1 << bit,
            Some(bit) => defaulted.push(format!("{name} (bit {bit} beyond 32 bits)")),
            None => defaulted.push(name.to_string()),
        }
    }
    // `enum rqf_flags` exists from Linux 6.8; before it RQF_FLUSH_SEQ is a macro with the
    // default's value (bit 4 since 4.x), so its absence is not worth a note.
    if let Some(bit @ 0..32) = btf.enum_value("__RQF_FLUSH_SEQ") {
        ops.flush_seq = 1 << bit;
    }
    if !defaulted.is_empty() {
        notes.push(format!(
            "operation codes not found in the kernel's BTF, using the values of Linux \
             4.10-6.18 for them: {}",
            defaulted.join(", ")
        ));
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::super::btf::test_builder::{Builder, kernel_like};
    use super::*;

    #[test]
    fn kernel_like_layout() {
        let btf = Btf::parse(&kernel_like(true, true)).unwrap();
        let report = kernel_layout(&btf).unwrap();
        let l = report.layout;
        assert_eq!(
            (l.rq_cmd_flags, l.rq_data_len, l.rq_bio, l.rq_part),
            (24, 44, 56, 88)
        );
        assert_eq!((l.bio_opf, l.bio_bdev, l.bio_size), (16, 8, 40));
        assert_eq!(l.bdev_dev, 20);
        assert_eq!(
            (
                l.bio_blkg,
                l.blkg_blkcg,
                l.blkcg_cgroup,
                l.cgroup_kn,
                l.kn_id
            ),
            (64, 40, 0, 288, 56)
        );
        assert_eq!(l.ops, OpCodes::LINUX_DEFAULT);
        // The synthetic BTF has no gendisk/request_queue: bios are then counted everywhere.
        assert_eq!(l.bdev_disk, ABSENT);
        // Nor request tags or queue ids: latency is then off as a whole, with a note naming them.
        assert_eq!(l.rq_tag, ABSENT);
        assert_eq!(l.rq_start_time_ns, ABSENT);
        assert!(
            report.notes.iter().any(|n| n.contains("no request latency")
                && n.contains("request.tag")
                && n.contains("request_queue.id")),
            "{:?}",
            report.notes
        );
        assert!(
            report.notes.iter().all(|n| n.contains("blk-mq")
                || n.contains("no request latency")
                || n.contains("rq_flags")),
            "{:?}",
            report.notes
        );
        let hooks = hooks_available(&btf);
        assert_eq!(
            hooks,
            HookSupport {
                io_start_done: true,
                rq_fallback: false,
                bio_queue: true,
                block_split: false,
            }
        );
    }

    #[test]
    fn missing_cgroup_chain_is_absent_as_a_whole() {
        let btf = Btf::parse(&kernel_like(false, true)).unwrap();
        let report = kernel_layout(&btf).unwrap();
        let l = report.layout;
        for v in [
            l.bio_blkg,
            l.blkg_blkcg,
            l.blkcg_cgroup,
            l.cgroup_kn,
            l.kn_id,
        ] {
            assert_eq!(v, ABSENT);
        }
        assert_eq!(l.bio_size, 40, "required fields are still resolved");
        let notes: Vec<&String> = report
            .notes
            .iter()
            .filter(|n| {
                !n.contains("blk-mq")
                    && !n.contains("no request latency")
                    && !n.contains("rq_flags")
            })
            .collect();
        assert_eq!(
            notes,
            [
                "no block cgroups in this kernel (bio.bi_blkg missing): I/O will not carry a \
              cgroup"
            ]
        );
    }

    #[test]
    fn missing_required_field_is_an_error_naming_it() {
        let btf = Btf::parse(&kernel_like(true, false)).unwrap();
        let e = kernel_layout(&btf).unwrap_err();
        assert_eq!(
            e.to_string(),
            "struct request has no field cmd_flags in <memory>"
        );
        let empty = Btf::parse(&Builder::new().build()).unwrap();
        let e = kernel_layout(&empty).unwrap_err();
        assert_eq!(e.to_string(), "no struct request in <memory>");
        assert_eq!(hooks_available(&empty), HookSupport::default());
    }

    #[test]
    fn op_codes_follow_btf_and_default_with_a_note() {
        let mut b = Builder::new();
        b.enum32(
            "req_op",
            false,
            &[
                ("REQ_OP_READ", 4),
                ("REQ_OP_WRITE", 6),
                ("REQ_OP_FLUSH", 300),
            ],
        );
        b.enum32(
            "req_flag_bits",
            false,
            &[("__REQ_PREFLUSH", 20), ("__REQ_FUA", 19)],
        );
        b.enum32("rqf_flags", false, &[("__RQF_FLUSH_SEQ", 2)]);
        let btf = Btf::parse(&b.build()).unwrap();
        let mut notes = Vec::new();
        let ops = op_codes(&btf, &mut notes);
        let d = OpCodes::LINUX_DEFAULT;
        assert_eq!(
            ops,
            OpCodes {
                read: 4,
                write: 6,
                preflush: 1 << 20,
                fua: 1 << 19,
                flush_seq: 1 << 2,
                ..d
            }
        );
        assert_eq!(notes.len(), 1);
        for name in [
            "REQ_OP_FLUSH (value 300",
            "REQ_OP_DISCARD",
            "REQ_OP_SECURE_ERASE",
            "REQ_OP_WRITE_ZEROES",
        ] {
            assert!(notes[0].contains(name), "{name}: {}", notes[0]);
        }
        assert!(!notes[0].contains("REQ_OP_READ"));

        let mut b = Builder::new();
        b.enum32(
            "req_flag_bits",
            false,
            &[("__REQ_PREFLUSH", 40), ("__REQ_FUA", 17)],
        );
        let mut notes = Vec::new();
        let ops = op_codes(&Btf::parse(&b.build()).unwrap(), &mut notes);
        assert_eq!(ops, d);
        assert!(notes[0].contains("__REQ_PREFLUSH (bit 40"), "{}", notes[0]);
    }

    #[test]
    fn real_kernel_layout() {
        if !std::path::Path::new(Btf::SYSFS_PATH).exists() {
            eprintln!("no {}; skipped", Btf::SYSFS_PATH);
            return;
        }
        let btf = Btf::from_sys_fs().unwrap();
        let report = kernel_layout(&btf).unwrap();
        let l = report.layout;
        eprintln!("{l:#?}");
        eprintln!("notes: {:?}", report.notes);
        eprintln!("hooks: {:?}", hooks_available(&btf));
        // Orders that have held since these fields exist; exact values differ per kernel.
        assert!(l.rq_cmd_flags < l.rq_data_len, "{l:?}");
        assert!(l.rq_data_len < l.rq_bio, "{l:?}");
        assert!(l.rq_bio < l.rq_part, "{l:?}");
        assert!(l.bio_bdev < l.bio_opf && l.bio_opf < l.bio_size, "{l:?}");
        for v in [
            l.rq_cmd_flags,
            l.rq_data_len,
            l.rq_part,
            l.rq_bio,
            l.bio_opf,
            l.bio_bdev,
            l.bio_size,
            l.bio_next,
            l.bdev_dev,
            l.rq_q,
            l.rq_mq_hctx,
            l.rq_tag,
            l.rq_internal_tag,
            l.rq_start_time_ns,
            l.queue_id,
            l.hctx_queue_num,
        ] {
            assert!(v < 4096, "{l:?}");
        }
        // request: q, mq_ctx, mq_hctx, cmd_flags, rq_flags, tag, internal_tag, ... start_time_ns.
        assert!(l.rq_q < l.rq_mq_hctx && l.rq_mq_hctx < l.rq_tag, "{l:?}");
        assert!(l.rq_tag < l.rq_internal_tag, "{l:?}");
        assert!(l.rq_part < l.rq_start_time_ns, "{l:?}");
        assert_eq!(l.ops.read, 0);
        assert_eq!(l.ops.write, 1);
    }
}
