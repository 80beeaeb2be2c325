//! `overkvm-io check`: what this host supports, and what will not work and why.

use std::path::Path;

use serde::Serialize;

use crate::{
    bpf::{self, HookMode, LoadOptions, Programs, btf::Btf, layout, tracefs},
    host::cgroup,
};

#[derive(Debug, Default, Serialize)]
pub struct Tracepoints {
    pub block_io_start_done: bool,
    pub block_getrq_rq_issue_rq_complete: bool,
    pub block_bio_queue: bool,
}

#[derive(Debug, Serialize)]
pub struct CgroupSupport {
    /// "v2", "v1" or null when no block controller is mounted.
    pub io_controller: Option<cgroup::IoController>,
    pub io_mount: Option<String>,
    pub cgroup2_mount: Option<String>,
    /// cgroup2 is mounted but its io controller is bound to v1 (hybrid host).
    pub hybrid: bool,
}

/// What loading and attaching the programs did: `{"tried", "ok", "attached", "error"}`.
#[derive(Debug, Default, Serialize)]
pub struct LoadOutcome {
    /// Loading was attempted: only as root, and only when no earlier check ruled it out.
    pub tried: bool,
    pub ok: bool,
    /// Tracepoints attached, in order (empty unless `ok`).
    pub attached: Vec<&'static str>,
    /// Why loading failed, when it did.
    pub error: Option<String>,
}

/// Everything `check` found.
#[derive(Debug, Serialize)]
pub struct CheckReport {
    pub kernel: String,
    pub root: bool,
    pub btf: bool,
    pub tracefs: Option<String>,
    pub tracepoints: Tracepoints,
    pub hook_mode: Option<HookMode>,
    pub layout_notes: Vec<String>,
    pub cgroups: CgroupSupport,
    pub bpf_stats_enabled: bool,
    /// What loading and attaching the programs did (root only).
    pub load: LoadOutcome,
    /// The bio hook after loading: attached, on-demand (no bio-based device yet) or off.
    pub bio_hook: Option<&'static str>,
    /// Problems that stop overkvm from running.
    pub errors: Vec<String>,
    /// Things that work in a reduced way.
    pub warnings: Vec<String>,
}

impl CheckReport {
    pub fn ok(&self) -> bool {
        self.errors.is_empty()
    }
}

fn read_trim(p: &str) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
}

/// Runs every check. Loading the programs is attempted only as root.
pub fn run_checks() -> CheckReport {
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let kernel = read_trim("/proc/sys/kernel/osrelease").unwrap_or_else(|| "unknown".into());
    // SAFETY: no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        errors.push("not root: loading eBPF programs needs root (run with sudo)".into());
    }
    if bpf::object_is_stub() {
        errors.push(
            "built without the eBPF programs (AYA_BUILD_SKIP); rebuild with `cargo xtask run`"
                .into(),
        );
    }
    let btf_present = Path::new(Btf::SYSFS_PATH).exists();
    let mut tracepoints = Tracepoints::default();
    let mut hook_mode = None;
    let mut layout_notes = Vec::new();
    if !btf_present {
        errors.push(format!(
            "no kernel BTF at {} (CONFIG_DEBUG_INFO_BTF=y is needed for structure offsets and tp_btf hooks)",
            Btf::SYSFS_PATH
        ));
    } else {
        match Btf::from_sys_fs() {
            Ok(btf) => {
                let s = layout::hooks_available(&btf);
                tracepoints = Tracepoints {
                    block_io_start_done: s.io_start_done,
                    block_getrq_rq_issue_rq_complete: s.rq_fallback,
                    block_bio_queue: s.bio_queue,
                };
                hook_mode = HookMode::pick(&s);
                match hook_mode {
                    None => errors.push("no usable block tracepoints (need block_io_start/done, or block_getrq + block_rq_issue + block_rq_complete)".into()),
                    Some(HookMode::RequestFallback) => warnings.push("no block_io_start/block_io_done (Linux < 6.5): using the block_getrq/block_rq_issue/block_rq_complete fallback".into()),
                    Some(HookMode::IoStartDone) => {}
                }
                if !s.bio_queue {
                    warnings.push(
                        "no block_bio_queue: bio-based devices (zram, md, dm) cannot be measured"
                            .into(),
                    );
                }
                match layout::kernel_layout(&btf) {
                    Ok(r) => {
                        for n in &r.notes {
                            warnings.push(n.clone());
                        }
                        layout_notes = r.notes;
                    }
                    Err(e) => errors.push(format!("kernel structure offsets: {e:#}")),
                }
            }
            Err(e) => errors.push(format!("reading {}: {e}", Btf::SYSFS_PATH)),
        }
    }
    let tracefs_path = tracefs::find_tracefs();
    if tracefs_path.is_none() {
        warnings.push("tracefs is not mounted (not needed: overkvm attaches through BTF; `mount -t tracefs nodev /sys/kernel/tracing` to inspect events)".into());
    }

    let mounts = cgroup::host_mounts();
    let io = cgroup::find_io_hierarchy(&mounts);
    let cgroup2 = mounts.iter().find(|m| m.fs_type == "cgroup2");
    let cgroups = CgroupSupport {
        io_controller: io.as_ref().map(|h| h.controller),
        io_mount: io.as_ref().map(|h| h.mount_point.display().to_string()),
        cgroup2_mount: cgroup2.map(|m| m.mount_point.display().to_string()),
        hybrid: cgroup2.is_some()
            && io
                .as_ref()
                .is_some_and(|h| h.controller == cgroup::IoController::V1),
    };
    match cgroups.io_controller {
        None => warnings.push("no block cgroup controller mounted: throttling is not possible".into()),
        Some(cgroup::IoController::V1) => warnings.push(
            "block controller is cgroup v1 blkio: throttling uses blkio.throttle.* (effective on direct I/O only; buffered writeback is not limited by v1)".into(),
        ),
        Some(cgroup::IoController::V2) => {}
    }
    let bpf_stats_enabled = read_trim("/proc/sys/kernel/bpf_stats_enabled").as_deref() == Some("1");

    let mut bio_hook = None;
    let mut load = LoadOutcome::default();
    if root && errors.is_empty() {
        load.tried = true;
        match Programs::load(&LoadOptions::default()) {
            Ok(p) => {
                bio_hook = Some(p.bio_hook());
                load.ok = true;
                load.attached = p.attached.clone();
            }
            Err(e) => {
                errors.push(format!("loading the programs failed: {e:#}"));
                load.error = Some(format!("{e:#}"));
            }
        }
    }
    CheckReport {
        kernel,
        root,
        btf: btf_present,
        tracefs: tracefs_path.map(|p| p.display().to_string()),
        tracepoints,
        hook_mode,
        layout_notes,
        cgroups,
        bpf_stats_enabled,
        load,
        bio_hook,
        errors,
        warnings,
    }
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// Human-readable findings.
pub fn print_human(r: &CheckReport) {
    println!("kernel              {}", r.kernel);
    println!("running as root     {}", yes(r.root));
    println!("kernel BTF          {}", yes(r.btf));
    println!(
        "tracefs             {}",
        r.tracefs.as_deref().unwrap_or("not mounted")
    );
    println!(
        "block_io_start/done {}",
        yes(r.tracepoints.block_io_start_done)
    );
    println!(
        "block_getrq/rq_*    {}",
        yes(r.tracepoints.block_getrq_rq_issue_rq_complete)
    );
    println!("block_bio_queue     {}", yes(r.tracepoints.block_bio_queue));
    println!(
        "hook mode           {}",
        r.hook_mode.map(|m| m.name()).unwrap_or("none")
    );
    let ctl = match r.cgroups.io_controller {
        Some(cgroup::IoController::V2) => "cgroup v2 io (io.max)",
        Some(cgroup::IoController::V1) => "cgroup v1 blkio (blkio.throttle.*)",
        None => "none",
    };
    println!(
        "block cgroups       {ctl}{}",
        r.cgroups
            .io_mount
            .as_ref()
            .map(|m| format!(" at {m}"))
            .unwrap_or_default()
    );
    if r.cgroups.hybrid {
        println!(
            "                    hybrid host: cgroup2 at {} has no io controller",
            r.cgroups.cgroup2_mount.as_deref().unwrap_or("?")
        );
    }
    println!(
        "bpf run-time stats  {}",
        if r.bpf_stats_enabled {
            "on"
        } else {
            "off (serve --bpf-stats turns them on for its run-time metrics)"
        }
    );
    match &r.load {
        LoadOutcome {
            ok: true, attached, ..
        } => {
            println!("load and attach     ok ({})", attached.join(", "));
            if r.bio_hook == Some("on-demand") {
                println!(
                    "bio hook            verified; attached once a bio-based device (zram, md, dm) has a size"
                );
            }
        }
        LoadOutcome { tried: true, .. } => println!("load and attach     FAILED"),
        LoadOutcome { .. } => println!("load and attach     not tried"),
    }
    for w in &r.warnings {
        println!("warning: {w}");
    }
    for e in &r.errors {
        println!("error: {e}");
    }
    println!(
        "{}",
        if r.ok() {
            "overkvm can run on this host"
        } else {
            "overkvm cannot run on this host as it is"
        }
    );
}

/// `check --parity SECONDS`: runs the programs for that long and compares overkvm's device
/// totals with `/proc/diskstats`, per disk and op class. Returns true when every difference
/// is 0 at the end (a few more seconds are given for I/O in flight to complete).
pub fn run_parity(seconds: u64, json: bool) -> anyhow::Result<bool> {
    use std::io::IsTerminal as _;
    let mut pipeline = crate::pipeline::Pipeline::new(Programs::load(&LoadOptions::default())?)?;
    let mut parity = Vec::new();
    let extra = 3;
    let progress = !json && std::io::stderr().is_terminal();
    for i in 0..=seconds + extra {
        std::thread::sleep(std::time::Duration::from_secs(1));
        parity = pipeline.tick()?.report.parity.clone();
        if progress && i > 0 && i <= seconds {
            eprint!("\rcomparing with /proc/diskstats: {i}/{seconds} s");
        }
        if i >= seconds && parity.iter().all(|p| p.difference.is_zero()) {
            break;
        }
    }
    if progress {
        eprintln!();
    }
    let ok = parity.iter().all(|p| p.difference.is_zero());
    if json {
        println!(
            "{}",
            serde_json::json!({ "seconds": seconds, "ok": ok, "devices": parity })
        );
        return Ok(ok);
    }
    if parity.is_empty() {
        println!("no disk did I/O in {seconds} s: nothing to compare");
        return Ok(true);
    }
    println!(
        "{:<12} {:<8} {:>12} {:>12} {:>8}",
        "DEVICE", "OP", "OVERKVM", "DISKSTATS", "DIFF"
    );
    for p in &parity {
        let o = &p.overkvm;
        let d = &p.diskstats;
        let x = &p.difference;
        for (op, a, b, diff) in [
            ("read", o.reads, d.reads, x.reads),
            ("rsectors", o.read_sectors, d.read_sectors, x.read_sectors),
            ("write", o.writes, d.writes, x.writes),
            (
                "wsectors",
                o.write_sectors,
                d.write_sectors,
                x.write_sectors,
            ),
            ("discard", o.discards, d.discards, x.discards),
            (
                "dsectors",
                o.discard_sectors,
                d.discard_sectors,
                x.discard_sectors,
            ),
            ("flush", o.flushes, d.flushes, x.flushes),
        ] {
            println!(
                "{:<12} {:<8} {:>12} {:>12} {:>8}",
                crate::text::sanitize(&p.device),
                op,
                a,
                b,
                diff
            );
        }
        if p.overkvm.in_flight != 0 {
            println!("{:<12} (in flight now: {})", "", p.overkvm.in_flight);
        }
    }
    if ok {
        println!("parity: exact on every disk");
    } else {
        println!(
            "parity: DIFFERS (a positive difference while I/O is in flight is expected; one that \
             stays on an idle disk is a loss: see `health` in `top --json`)"
        );
    }
    Ok(ok)
}
