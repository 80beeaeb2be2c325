//! Exact per-process accounting on real devices: the programs are loaded into the running
//! kernel, real processes issue a known number of direct I/Os, and the counts must match.

use std::{collections::HashMap, process::Command, time::Duration};

use overkvm::{
    bpf::{HookMode, LoadOptions, Programs},
    sample::{Delta, Sampler, Snapshot, delta},
};
use overkvm_common::{Health, Op};
use overkvm_tests::{
    devices::{LoopDevice, MountedFs, Zram},
    diskstats,
    iogen::{self, IoPlan},
    skip_unless_kernel,
};

/// Per-op counts of one tgid on one device, from requests or bios, plus completions timed.
#[derive(Debug, Default, PartialEq, Eq)]
struct Seen {
    reads: u64,
    writes: u64,
    read_bytes: u64,
    write_bytes: u64,
    other: u64,
    completions: u64,
}

fn seen(d: &Delta, tgid: u32, dev: u32, bios: bool) -> Seen {
    let mut s = Seen::default();
    let table = if bios { &d.bios } else { &d.requests };
    for (k, c) in table {
        if k.tgid != tgid || k.dev != dev {
            continue;
        }
        match k.op() {
            Op::Read => {
                s.reads += c.ops;
                s.read_bytes += c.bytes;
            }
            Op::Write => {
                s.writes += c.ops;
                s.write_bytes += c.bytes;
            }
            _ => s.other += c.ops,
        }
    }
    s.completions = d
        .latency
        .iter()
        .filter(|(k, _)| k.tgid == tgid && k.dev == dev)
        .map(|(_, h)| h.count())
        .sum();
    s
}

fn losses(d: &Delta) -> Vec<(&'static str, u64)> {
    Health::ALL
        .iter()
        .filter(|h| h.is_loss() && d.health[**h as usize] > 0)
        .map(|h| (h.name(), d.health[*h as usize]))
        .collect()
}

/// Runs `plans` concurrently against `target`, between two snapshots; the second is taken
/// once the kernel has accounted every request of them (see `wait_for_completions`).
fn run_plans(
    sampler: &Sampler,
    target: &std::path::Path,
    plans: &[IoPlan],
) -> (Delta, Vec<u32>, Snapshot) {
    let disk = target
        .file_name()
        .and_then(|n| n.to_str())
        .expect("a device path");
    let ops0 = diskstats::ops(disk);
    let before = sampler.snapshot().expect("snapshot");
    let children: Vec<_> = plans
        .iter()
        .map(|p| iogen::spawn(target, p).expect("spawning iogen"))
        .collect();
    let mut pids = Vec::new();
    for mut c in children {
        pids.push(c.id());
        let st = c.wait().expect("waiting for iogen");
        assert!(st.success(), "iogen failed: {st}");
    }
    let planned: u64 = plans.iter().map(|p| p.reads + p.writes).sum();
    diskstats::wait_for_completions(disk, ops0, planned);
    let after = sampler.snapshot().expect("snapshot");
    (delta(&before, &after), pids, after)
}

fn plans(n: u64, region: u64) -> Vec<IoPlan> {
    (0..n)
        .map(|i| IoPlan {
            reads: 300 + 37 * i,
            writes: 200 + 11 * i,
            block: 4096,
            start: i * region,
            len: region,
            seed: 0x9e37_79b9 + i,
        })
        .collect()
}

fn exact_on_loop(mode: HookMode) {
    let lo = LoopDevice::new(64).expect("loop device");
    // Bios counted on this blk-mq device too, to check them against the requests.
    let programs = match Programs::load(&LoadOptions {
        mode: Some(mode),
        bio: true,
        all_bios: true,
        ..LoadOptions::default()
    }) {
        Ok(p) => p,
        Err(e) => panic!("loading programs in mode {mode}: {e:#}"),
    };
    assert_eq!(programs.mode, mode);
    let sampler = Sampler::new(programs);
    let plans = plans(4, 16 << 20);
    let (d, pids, after) = run_plans(&sampler, &lo.path, &plans);
    eprintln!(
        "mode {mode}: kernel health counters over the run {:?}",
        d.health
    );
    for (pid, plan) in pids.iter().zip(&plans) {
        let req = seen(&d, *pid, lo.dev(), false);
        eprintln!(
            "mode {mode} pid {pid}: planned r={} w={}, requests {req:?}",
            plan.reads, plan.writes
        );
        assert_eq!(
            (req.reads, req.writes),
            (plan.reads, plan.writes),
            "request ops of pid {pid}"
        );
        assert_eq!(req.read_bytes, plan.reads * plan.block);
        assert_eq!(req.write_bytes, plan.writes * plan.block);
        assert_eq!(req.other, 0, "nothing else counted for pid {pid}");
        assert_eq!(
            req.completions,
            plan.reads + plan.writes,
            "latency samples of pid {pid}"
        );
        let bio = seen(&d, *pid, lo.dev(), true);
        assert_eq!(
            (bio.reads, bio.writes),
            (plan.reads, plan.writes),
            "bios of pid {pid}"
        );
    }
    assert!(
        losses(&d).is_empty(),
        "kernel-side losses: {:?}",
        losses(&d)
    );

    // The generators have exited: their entries are harvested, then deleted from the maps.
    let mut sampler = sampler;
    let deleted = sampler.prune(&after, overkvm::report::pid_alive);
    assert!(deleted >= pids.len() * 2, "deleted only {deleted} entries");
    let later = sampler.snapshot().unwrap();
    for pid in &pids {
        assert!(
            !later.requests.keys().any(|k| k.tgid == *pid),
            "entries of {pid} left"
        );
        assert!(!later.latency.keys().any(|k| k.tgid == *pid));
    }
    // Nothing is counted twice or lost across the deletion.
    let d2 = delta(&after, &later);
    assert!(!d2.requests.keys().any(|k| pids.contains(&k.tgid)));
}

#[test]
fn concurrent_direct_io_is_exact_per_process_io_start_done() {
    overkvm_tests::skip_unless_io_start_done!();
    exact_on_loop(HookMode::IoStartDone);
}

#[test]
fn concurrent_direct_io_is_exact_per_process_request_fallback() {
    skip_unless_kernel!();
    exact_on_loop(HookMode::RequestFallback);
}

#[test]
fn bio_based_zram_counts_match() {
    skip_unless_kernel!();
    // Loaded before the device exists: the bio hook is attached when a bio-based device with a
    // size appears (here through the refresh every consumer runs each interval).
    let mut sampler = Sampler::new(Programs::load(&LoadOptions::default()).expect("load"));
    let at_load = sampler.programs().attached.contains(&"block_bio_queue");
    let z = match Zram::new(64) {
        Ok(z) => z,
        Err(e) => {
            overkvm_tests::skipped(
                module_path!(),
                format!("cannot create a zram device here: {e:#}"),
            );
            return;
        }
    };
    sampler.refresh_bio_hook();
    eprintln!(
        "bio hook: {} at load, attached after the refresh: {}",
        if at_load { "attached" } else { "not attached" },
        sampler.programs().attached.contains(&"block_bio_queue")
    );
    assert!(sampler.programs().attached.contains(&"block_bio_queue"));
    let plans = plans(3, 16 << 20);
    let (d, pids, after) = run_plans(&sampler, &z.path, &plans);
    for (pid, plan) in pids.iter().zip(&plans) {
        let bio = seen(&d, *pid, z.dev(), true);
        eprintln!(
            "zram pid {pid}: planned r={} w={}, bios {bio:?}",
            plan.reads, plan.writes
        );
        assert_eq!(
            (bio.reads, bio.writes),
            (plan.reads, plan.writes),
            "bios of pid {pid}"
        );
        assert_eq!(bio.read_bytes, plan.reads * plan.block);
        // zram has no requests: nothing may show up there.
        let req = seen(&d, *pid, z.dev(), false);
        assert_eq!((req.reads, req.writes), (0, 0));
    }
    // And the report picks bios as the source for this device.
    let mut builder = overkvm::report::ReportBuilder::new();
    let report = builder.build(&d, "test", &after);
    let dev = report
        .devices
        .iter()
        .find(|r| r.device == format!("zram{}", z.index))
        .expect("zram device row");
    assert_eq!(dev.source, overkvm::report::CountSource::Bio);
    let total_reads: u64 = plans.iter().map(|p| p.reads).sum();
    assert_eq!(dev.counts.read_ops, total_reads);
}

/// Buffered writes reach the disk from the kernel's flusher, not from the writer: pin down
/// where they land today (on this kernel and cgroup setup) so a change is noticed.
#[test]
fn buffered_writes_are_attributed_to_the_flusher() {
    skip_unless_kernel!();
    let fs = MountedFs::new(128, "ext4", &["-O", "^has_journal"]).expect("ext4 on loop");
    let sampler = Sampler::new(Programs::load(&LoadOptions::default()).expect("load"));
    let before = sampler.snapshot().unwrap();
    let file = fs.dir.join("buffered.dat");
    let blocks = 2048u64; // 8 MiB
    let st = Command::new(overkvm_tests::workspace_bin("iogen"))
        .arg(&file)
        .args([
            "0",
            &blocks.to_string(),
            "4096",
            "0",
            &(blocks * 4096).to_string(),
            "1",
            "--buffered",
        ])
        .status()
        .unwrap();
    assert!(st.success());
    // Let the writer's tgid be gone before anything is written back, then flush.
    std::thread::sleep(Duration::from_millis(100));
    unsafe { libc::sync() };
    std::thread::sleep(Duration::from_millis(200));
    let after = sampler.snapshot().unwrap();
    let d = delta(&before, &after);
    let dev = fs.dev.dev();
    let mut by_comm: HashMap<String, u64> = HashMap::new();
    let mut total = 0;
    for (k, c) in &d.requests {
        if k.dev == dev && k.op() == Op::Write {
            total += c.bytes;
            let comm = after
                .comms
                .get(&k.tgid)
                .cloned()
                .unwrap_or_else(|| format!("tgid {}", k.tgid));
            *by_comm.entry(comm).or_default() += c.bytes;
        }
    }
    eprintln!(
        "buffered write bytes by submitter: {by_comm:?} (total {total}, written {})",
        blocks * 4096
    );
    assert!(
        total >= blocks * 4096,
        "all written data reached the device"
    );
    let iogen_bytes = by_comm.get("iogen").copied().unwrap_or(0);
    let flusher: u64 = by_comm
        .iter()
        .filter(|(c, _)| c.starts_with("kworker"))
        .map(|(_, b)| *b)
        .sum();
    // Today: none of it is the writer's; the flusher kworker submits it.
    assert_eq!(
        iogen_bytes, 0,
        "the writer itself submitted no buffered writeback"
    );
    assert!(
        flusher * 10 >= blocks * 4096 * 9,
        "at least 90% from the flusher kworker"
    );
}

/// By default bios are counted only where they are the only count (bio-based devices): on a
/// blk-mq loop device the requests are counted and the bio hook does no map work.
#[test]
fn bios_on_blk_mq_devices_are_left_to_the_request_hooks_by_default() {
    skip_unless_kernel!();
    let lo = LoopDevice::new(64).expect("loop device");
    let sampler = Sampler::new(Programs::load(&LoadOptions::default()).expect("load"));
    let plans = plans(2, 16 << 20);
    let (d, pids, _) = run_plans(&sampler, &lo.path, &plans);
    for (pid, plan) in pids.iter().zip(&plans) {
        let req = seen(&d, *pid, lo.dev(), false);
        assert_eq!((req.reads, req.writes), (plan.reads, plan.writes));
        let bio = seen(&d, *pid, lo.dev(), true);
        assert_eq!(
            (bio.reads, bio.writes),
            (0, 0),
            "no bio map entries on a blk-mq device"
        );
    }
}

/// Sequential direct writes submitted in batches merge in the submitter's plug: the kernel
/// counts one request for several bios. The request count drops, and every byte must still be
/// on the writer: the bytes of bios merged into a counted request are added by the merge hooks.
#[test]
fn merged_bios_keep_their_bytes_on_the_writer() {
    skip_unless_kernel!();
    if Command::new("fio").arg("--version").output().is_err() {
        overkvm_tests::skipped(
            module_path!(),
            "fio is not installed (cargo xtask setup --test-deps installs it)",
        );
        return;
    }
    let lo = LoopDevice::new(64).expect("loop device");
    let sampler = Sampler::new(Programs::load(&LoadOptions::default()).expect("load"));
    let size: u64 = 16 << 20;
    let before = sampler.snapshot().expect("snapshot");
    let mut fio = Command::new("fio")
        .args([
            "--name=seqwrite",
            &format!("--filename={}", lo.path.display()),
            "--rw=write",
            "--bs=4k",
            "--direct=1",
            "--ioengine=io_uring",
            "--iodepth=64",
            "--iodepth_batch_submit=64",
            "--iodepth_batch_complete_min=64",
            &format!("--size={size}"),
            // A thread of fio's own process, so the tgid is the one spawned here.
            "--thread",
            "--output=/dev/null",
        ])
        .spawn()
        .expect("starting fio");
    let pid = fio.id();
    assert!(fio.wait().expect("fio").success(), "fio failed");
    let after = sampler.snapshot().expect("snapshot");
    let d = delta(&before, &after);
    let s = seen(&d, pid, lo.dev(), false);
    let blocks = size / 4096;
    eprintln!(
        "fio pid {pid}: {blocks} sequential 4 KiB writes -> {} requests, {} bytes (want {size}); \
         merged {:.1} bios per request; losses {:?}",
        s.writes,
        s.write_bytes,
        blocks as f64 / s.writes.max(1) as f64,
        losses(&d)
    );
    assert!(
        s.writes < blocks,
        "no merges happened ({} requests for {blocks} writes): this test proves nothing here",
        s.writes
    );
    assert_eq!(
        s.write_bytes, size,
        "bytes of merged bios belong to the writer"
    );
    assert_eq!(s.completions, s.writes, "one latency sample per request");
}
