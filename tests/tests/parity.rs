//! Device parity with the kernel's own accounting: for every op class and submission path,
//! overkvm's device totals (the `devices` rows of a report) equal the `/proc/diskstats` deltas
//! of the same window, in reads, writes, discards, flushes and their sectors, in both hook
//! modes. Workloads are real fio runs on loop devices, on ext4 and xfs on loop devices, and on
//! a zram device (bio-based).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use overkvm::{
    bpf::{HookMode, LoadOptions, Programs},
    report::{OpCounts, ReportBuilder},
    sample::{Sampler, Snapshot, delta},
};
use overkvm_tests::{
    devices::{LoopDevice, MountedFs, Zram},
    skip_unless_kernel,
};

/// One `/proc/diskstats` line's counters that parity covers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct DiskCounts {
    reads: u64,
    read_sectors: u64,
    writes: u64,
    write_sectors: u64,
    discards: u64,
    discard_sectors: u64,
    flushes: u64,
}

impl DiskCounts {
    fn since(self, o: DiskCounts) -> DiskCounts {
        DiskCounts {
            reads: self.reads - o.reads,
            read_sectors: self.read_sectors - o.read_sectors,
            writes: self.writes - o.writes,
            write_sectors: self.write_sectors - o.write_sectors,
            discards: self.discards - o.discards,
            discard_sectors: self.discard_sectors - o.discard_sectors,
            flushes: self.flushes - o.flushes,
        }
    }

    fn of_report(c: &OpCounts) -> DiskCounts {
        DiskCounts {
            reads: c.read_ops,
            read_sectors: c.read_bytes / 512,
            writes: c.write_ops,
            write_sectors: c.write_bytes / 512,
            discards: c.discard_ops,
            discard_sectors: c.discard_bytes / 512,
            flushes: c.flush_ops,
        }
    }
}

/// The diskstats counters of `disk` and its in-flight requests (field 9).
fn diskstats(disk: &str) -> (DiskCounts, u64) {
    let text = fs::read_to_string("/proc/diskstats").expect("reading /proc/diskstats");
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 20 || f[2] != disk {
            continue;
        }
        let n = |i: usize| f[i].parse::<u64>().expect("diskstats field");
        return (
            DiskCounts {
                reads: n(3),
                read_sectors: n(5),
                writes: n(7),
                write_sectors: n(9),
                discards: n(14),
                discard_sectors: n(16),
                flushes: n(18),
            },
            n(11),
        );
    }
    panic!("{disk} is not in /proc/diskstats");
}

/// Waits until `disk` has nothing in flight and its counters stand still for 300 ms, so that
/// a snapshot and a diskstats read taken next see the same completed I/O.
fn settle(disk: &str) -> DiskCounts {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = diskstats(disk);
    let mut still_since = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let now = diskstats(disk);
        if now != last || now.1 != 0 {
            last = now;
            still_since = Instant::now();
        } else if still_since.elapsed() >= Duration::from_millis(300) {
            return now.0;
        }
        assert!(
            Instant::now() < deadline,
            "{disk} did not settle: {now:?} in flight"
        );
    }
}

/// The device's counts and a snapshot that saw exactly the same I/O: the device settles, the
/// snapshot is read, and both are taken again when the device did I/O meanwhile or has some in
/// flight (a journal commit of a fresh ext4, say). overkvm counts a request when the kernel
/// ends it and diskstats a moment later, so a flush ending between the settled read and the
/// snapshot is in diskstats' difference and in neither side of overkvm's: a lost flush that
/// was never lost. Noise outside the measured work, not a retry of what is measured.
fn quiet_snapshot(sampler: &Sampler, disk: &str) -> (DiskCounts, Snapshot) {
    for _ in 0..20 {
        let d = settle(disk);
        let s = sampler.snapshot().expect("snapshot");
        let after = diskstats(disk);
        if after == (d, 0) {
            return (d, s);
        }
        eprintln!("  {disk} did I/O while the snapshot was read ({after:?}): settling again");
    }
    panic!("{disk} never stayed idle across a snapshot");
}

enum Target {
    Raw(LoopDevice),
    Fs(MountedFs),
    Zram(Zram),
}

impl Target {
    fn disk(&self) -> String {
        match self {
            Target::Raw(l) => l.name(),
            Target::Fs(f) => f.dev.name(),
            Target::Zram(z) => format!("zram{}", z.index),
        }
    }

    /// What fio reads and writes: the device, or a file on the filesystem.
    fn file(&self) -> PathBuf {
        match self {
            Target::Raw(l) => l.path.clone(),
            Target::Fs(f) => f.dir.join("fio.dat"),
            Target::Zram(z) => z.path.clone(),
        }
    }
}

#[derive(Clone, Copy)]
enum On {
    Raw,
    Ext4,
    Xfs,
    Zram,
}

struct Workload {
    name: &'static str,
    on: On,
    fio: &'static [&'static str],
}

/// Every op class and submission path of issue-level interest: sync and async engines,
/// direct and buffered, O_SYNC / O_DSYNC (FUA), fsync and fdatasync on two filesystems,
/// discards, I/O split into several requests, merged sequential I/O, a bio-based device.
const WORKLOADS: &[Workload] = &[
    Workload {
        name: "psync 4k random direct reads",
        on: On::Raw,
        fio: &[
            "--rw=randread",
            "--bs=4k",
            "--direct=1",
            "--ioengine=psync",
            "--number_ios=1500",
        ],
    },
    Workload {
        name: "libaio 4k-256k random direct read/write, iodepth 16",
        on: On::Raw,
        fio: &[
            "--rw=randrw",
            "--bsrange=4k-256k",
            "--direct=1",
            "--ioengine=libaio",
            "--iodepth=16",
            "--number_ios=1200",
        ],
    },
    Workload {
        name: "io_uring 4k random direct reads, iodepth 32",
        on: On::Raw,
        fio: &[
            "--rw=randread",
            "--bs=4k",
            "--direct=1",
            "--ioengine=io_uring",
            "--iodepth=32",
            "--number_ios=3000",
        ],
    },
    Workload {
        name: "io_uring sequential 4k direct writes in batches (plug merges)",
        on: On::Raw,
        fio: &[
            "--rw=write",
            "--bs=4k",
            "--direct=1",
            "--ioengine=io_uring",
            "--iodepth=64",
            "--iodepth_batch_submit=64",
            "--iodepth_batch_complete_min=64",
            "--size=8M",
        ],
    },
    Workload {
        name: "4 MiB direct writes split into several requests",
        on: On::Raw,
        fio: &[
            "--rw=write",
            "--bs=4M",
            "--direct=1",
            "--ioengine=libaio",
            "--iodepth=4",
            "--size=32M",
        ],
    },
    Workload {
        name: "buffered sequential writes to the raw device, then fsync",
        on: On::Raw,
        fio: &["--rw=write", "--bs=64k", "--size=16M", "--end_fsync=1"],
    },
    Workload {
        name: "buffered sequential reads (readahead)",
        on: On::Raw,
        fio: &["--rw=read", "--bs=4k", "--size=16M", "--invalidate=1"],
    },
    Workload {
        name: "O_SYNC buffered random writes",
        on: On::Raw,
        fio: &[
            "--rw=randwrite",
            "--bs=4k",
            "--sync=sync",
            "--number_ios=400",
        ],
    },
    Workload {
        name: "O_DSYNC direct random writes (FUA)",
        on: On::Raw,
        fio: &[
            "--rw=randwrite",
            "--bs=4k",
            "--direct=1",
            "--sync=dsync",
            "--number_ios=400",
        ],
    },
    Workload {
        name: "random discards",
        on: On::Raw,
        fio: &["--rw=randtrim", "--bs=64k", "--number_ios=300"],
    },
    Workload {
        name: "ext4: 4k random writes, fsync after each",
        on: On::Ext4,
        fio: &[
            "--rw=randwrite",
            "--bs=4k",
            "--size=16M",
            "--fsync=1",
            "--number_ios=600",
        ],
    },
    Workload {
        name: "ext4: 4k random writes, fdatasync after each",
        on: On::Ext4,
        fio: &[
            "--rw=randwrite",
            "--bs=4k",
            "--size=16M",
            "--fdatasync=1",
            "--number_ios=600",
        ],
    },
    Workload {
        name: "xfs: 4k random writes, fsync after each",
        on: On::Xfs,
        fio: &[
            "--rw=randwrite",
            "--bs=4k",
            "--size=16M",
            "--fsync=1",
            "--number_ios=600",
        ],
    },
    Workload {
        name: "xfs: 4k random direct writes, fdatasync after each",
        on: On::Xfs,
        fio: &[
            "--rw=randwrite",
            "--bs=4k",
            "--size=16M",
            "--direct=1",
            "--fdatasync=1",
            "--number_ios=600",
        ],
    },
    Workload {
        name: "zram (bio-based): 4k random direct read/write",
        on: On::Zram,
        fio: &[
            "--rw=randrw",
            "--bs=4k",
            "--direct=1",
            "--ioengine=psync",
            "--number_ios=2000",
        ],
    },
];

fn make_target(on: On) -> anyhow::Result<Target> {
    // Filesystems initialise their inode tables and journal at mkfs time, so no background
    // writer of theirs runs into the measured window.
    Ok(match on {
        On::Raw => Target::Raw(LoopDevice::new(96)?),
        On::Ext4 => Target::Fs(MountedFs::new(
            128,
            "ext4",
            &["-E", "lazy_itable_init=0,lazy_journal_init=0"],
        )?),
        On::Xfs => Target::Fs(MountedFs::new(320, "xfs", &[])?),
        On::Zram => Target::Zram(Zram::new(96)?),
    })
}

fn fio(file: &Path, args: &[&str]) {
    let out = Command::new("fio")
        .arg("--name=parity")
        .arg(format!("--filename={}", file.display()))
        .arg("--size=48M")
        .args(args)
        .args(["--randrepeat=0", "--output=/dev/null"])
        .output()
        .expect("starting fio");
    assert!(
        out.status.success(),
        "fio {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn has_tool(name: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Every workload's device totals against `/proc/diskstats`, with the programs in `mode`,
/// recording latency or (`latency` false, `--no-latency`) counts only.
/// A sampler over freshly loaded programs in hook mode `mode`, everything else by default.
fn sampler_in(mode: HookMode) -> Sampler {
    Sampler::new(
        Programs::load(&LoadOptions {
            mode: Some(mode),
            ..LoadOptions::default()
        })
        .expect("loading the programs"),
    )
}

fn parity(mode: HookMode, latency: bool) {
    skip_unless_kernel!();
    for tool in ["fio", "mkfs.xfs", "mkfs.ext4"] {
        assert!(
            has_tool(tool),
            "{tool} is missing: `cargo xtask setup --test-deps` installs it"
        );
    }
    let mut sampler = Sampler::new(
        Programs::load(&LoadOptions {
            mode: Some(mode),
            latency,
            ..LoadOptions::default()
        })
        .expect("loading the programs"),
    );
    let mut builder = ReportBuilder::new();
    let mut failures = Vec::new();
    eprintln!(
        "mode {mode}{}: overkvm device totals vs /proc/diskstats (ops, sectors)",
        if latency { "" } else { ", no latency" }
    );
    for w in WORKLOADS {
        let target = match make_target(w.on) {
            Ok(t) => t,
            Err(e) => panic!("{}: cannot make the device: {e:#}", w.name),
        };
        let disk = target.disk();
        // A zram device makes the bio hook attach (each consumer does this every interval).
        sampler.refresh_bio_hook();
        let file = target.file();
        if matches!(w.on, On::Ext4 | On::Xfs) {
            // Lay the file out first, so the measured run's writes are overwrites and
            // allocations alike on both filesystems, and nothing of the layout is pending.
            fio(
                &file,
                &["--rw=write", "--bs=1M", "--size=16M", "--end_fsync=1"],
            );
        }
        let m0 = recursion_misses(&sampler);
        let (d0, s0) = quiet_snapshot(&sampler, &disk);
        fio(&file, w.fio);
        unsafe { libc::sync() };
        let (d1, s1) = quiet_snapshot(&sampler, &disk);
        let want = d1.since(d0);
        let report = builder.build(&delta(&s0, &s1), mode.name(), &s1);
        let got = report
            .devices
            .iter()
            .find(|r| r.device == disk)
            .map(|r| DiskCounts::of_report(&r.counts))
            .unwrap_or_default();
        let status = if got == want { "exact" } else { "DIFFERS" };
        eprintln!(
            "  {status:7} {:60} diskstats r={} rs={} w={} ws={} d={} ds={} f={}",
            w.name,
            want.reads,
            want.read_sectors,
            want.writes,
            want.write_sectors,
            want.discards,
            want.discard_sectors,
            want.flushes
        );
        if got != want {
            eprintln!(
                "  {:68} overkvm   r={} rs={} w={} ws={} d={} ds={} f={}",
                "",
                got.reads,
                got.read_sectors,
                got.writes,
                got.write_sectors,
                got.discards,
                got.discard_sectors,
                got.flushes
            );
            failures.push(w.name);
        }
        let losses: Vec<_> = report.health.events.iter().collect();
        let missed = recursion_misses(&sampler) - m0;
        if !losses.is_empty() || missed > 0 {
            eprintln!("  kernel health events: {losses:?}, program runs skipped: {missed}");
        }
        if !latency {
            // Counts only: no request kept an entry, so none could be missed, and no row
            // has a latency.
            let timed: Vec<_> = report
                .processes
                .iter()
                .filter(|p| p.device == disk && p.lat_avg_us.is_some())
                .map(|p| p.comm.clone())
                .collect();
            assert!(
                timed.is_empty(),
                "{}: latency recorded for {timed:?}",
                w.name
            );
            assert!(
                !report.health.events.contains_key("inflight_miss"),
                "{}: {losses:?}",
                w.name
            );
        }
        // A workload that did nothing of its kind would prove nothing.
        assert!(
            want.reads + want.writes + want.discards > 0,
            "{}: no I/O reached {disk}",
            w.name
        );
        sampler.prune(&s1, overkvm::report::pid_alive);
        drop(target);
    }
    assert!(
        failures.is_empty(),
        "mode {mode}: device totals differ from /proc/diskstats for {failures:?}"
    );
}

#[test]
fn device_totals_equal_diskstats_io_start_done() {
    overkvm_tests::skip_unless_io_start_done!();
    parity(HookMode::IoStartDone, true);
}

#[test]
fn device_totals_equal_diskstats_request_fallback() {
    skip_unless_kernel!();
    parity(HookMode::RequestFallback, true);
}

/// `--no-latency` needs the 6.5+ hooks: the fallback ones hand every request over anyway.
#[test]
fn no_latency_is_refused_on_the_fallback_hooks() {
    skip_unless_kernel!();
    let loaded = Programs::load(&LoadOptions {
        mode: Some(HookMode::RequestFallback),
        latency: false,
        ..LoadOptions::default()
    });
    let Err(e) = loaded else {
        panic!("the fallback hooks loaded without latency");
    };
    assert!(format!("{e:#}").contains("--no-latency"), "{e:#}");
}

/// `--no-latency`: the cheaper counts-only programs count exactly the same.
#[test]
fn device_totals_equal_diskstats_without_latency() {
    overkvm_tests::skip_unless_io_start_done!();
    parity(HookMode::IoStartDone, false);
}

/// Many flushes in flight at once on one device, from many submitters: 8 fio jobs on a raw loop
/// device (4 buffered writers with an fsync after each write, so each fsync is an empty preflush
/// of its own, and 4 O_DSYNC direct writers, whose writes are preflush/FUA sequences) and 4 more
/// with fdatasync on ext4. The flush machinery then merges waiting flushes into one device flush,
/// lends it the tag of the first waiter and keeps a second batch pending while one runs: every
/// device flush `/proc/diskstats` counts (fields 19-20) must be counted once, with nothing lost.
fn concurrent_flushes(mode: HookMode) {
    for tool in ["fio", "mkfs.ext4"] {
        assert!(
            has_tool(tool),
            "{tool} is missing: `cargo xtask setup --test-deps` installs it"
        );
    }
    let mut sampler = sampler_in(mode);
    let mut builder = ReportBuilder::new();
    let jobs: &[(On, &[&str])] = &[
        (
            On::Raw,
            &[
                "--name=fsync",
                "--rw=randwrite",
                "--bs=4k",
                "--fsync=1",
                "--number_ios=250",
                "--numjobs=4",
                "--name=dsync",
                "--rw=randwrite",
                "--bs=4k",
                "--direct=1",
                "--sync=dsync",
                "--number_ios=250",
                "--numjobs=4",
            ],
        ),
        (
            On::Ext4,
            &[
                "--name=fdatasync",
                "--rw=randwrite",
                "--bs=4k",
                "--size=4M",
                "--fdatasync=1",
                "--number_ios=250",
                "--numjobs=4",
            ],
        ),
    ];
    let mut failures = Vec::new();
    eprintln!("mode {mode}: device flushes under concurrent syncs vs /proc/diskstats");
    for (on, args) in jobs {
        let target = make_target(*on).expect("making the device");
        let disk = target.disk();
        let m0 = recursion_misses(&sampler);
        let (d0, s0) = quiet_snapshot(&sampler, &disk);
        // Each job writes its own file (on ext4) or its own 8 MiB region of the raw device.
        let place = match &target {
            Target::Fs(f) => format!("--directory={}", f.dir.display()),
            _ => format!("--filename={}", target.file().display()),
        };
        let out = Command::new("fio")
            .args([place.as_str(), "--size=8M", "--offset_increment=8M"])
            .args(*args)
            .args(["--randrepeat=0", "--output=/dev/null"])
            .output()
            .expect("starting fio");
        assert!(
            out.status.success(),
            "fio {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        unsafe { libc::sync() };
        let (d1, s1) = quiet_snapshot(&sampler, &disk);
        let want = d1.since(d0);
        let report = builder.build(&delta(&s0, &s1), mode.name(), &s1);
        let got = report
            .devices
            .iter()
            .find(|r| r.device == disk)
            .map(|r| DiskCounts::of_report(&r.counts))
            .unwrap_or_default();
        let events: Vec<_> = report.health.events.iter().collect();
        eprintln!(
            "  {:7} {disk}: diskstats w={} f={}, overkvm w={} f={}, health {events:?}, \
             program runs skipped {}",
            if got == want { "exact" } else { "DIFFERS" },
            want.writes,
            want.flushes,
            got.writes,
            got.flushes,
            recursion_misses(&sampler) - m0,
        );
        let (inflight, bios) = entries_left(&sampler);
        eprintln!("    entries left with the device quiet: in flight {inflight:?}, bios {bios:?}");
        // Without many flushes there was no contention to prove anything with.
        assert!(
            want.flushes >= 500,
            "only {} flushes reached {disk}",
            want.flushes
        );
        if got != want {
            // Where the device's flushes went, for whoever reads the failure.
            for p in report.processes.iter().filter(|p| p.device == disk) {
                eprintln!(
                    "    pid {} {:16} writes {:5} flushes {:5}",
                    p.pid, p.comm, p.counts.write_ops, p.counts.flush_ops
                );
            }
            failures.push(format!("{disk}: diskstats {want:?}, overkvm {got:?}"));
        }
        sampler.prune(&s1, overkvm::report::pid_alive);
        drop(target);
    }
    assert!(failures.is_empty(), "mode {mode}: {failures:#?}");
}

#[test]
fn concurrent_flushes_counted_once_io_start_done() {
    overkvm_tests::skip_unless_io_start_done!();
    concurrent_flushes(HookMode::IoStartDone);
}

#[test]
fn concurrent_flushes_counted_once_request_fallback() {
    skip_unless_kernel!();
    concurrent_flushes(HookMode::RequestFallback);
}

/// The recovery of a device flush whose completion the hook never sees, made certain: the kernel
/// on this machine now and then ends one of the flush machinery's flushes without
/// `block_io_done` (or `block_rq_complete`) reaching the hook, while `/proc/diskstats` counts it.
/// Here the completion program is detached for a stretch of O_DSYNC writes, so that every
/// flush of that stretch completes unseen. Each is charged when the same flush request is
/// issued again (the last one at the first flush after the program is back), so the device's
/// flushes still equal `/proc/diskstats`, and `flush_completion_unseen` counts at least the
/// stretch's flushes, as `/proc/diskstats` counted them.
#[test]
fn unseen_flush_completions_are_recovered_io_start_done() {
    use aya::programs::BtfTracePoint;
    use overkvm_common::programs;
    overkvm_tests::skip_unless_io_start_done!();
    assert!(
        has_tool("fio"),
        "fio is missing: `cargo xtask setup --test-deps` installs it"
    );
    let mut sampler = sampler_in(HookMode::IoStartDone);
    let mut builder = ReportBuilder::new();
    let lo = LoopDevice::new(64).expect("loop device");
    let disk = lo.name();
    let dsync = |ios: &str| {
        fio(
            &lo.path,
            &[
                "--rw=randwrite",
                "--bs=4k",
                "--direct=1",
                "--sync=dsync",
                "--size=32M",
                ios,
            ],
        )
    };
    let (d0, s0) = quiet_snapshot(&sampler, &disk);
    dsync("--number_ios=100");
    let hidden_from = settle(&disk);
    fn done(s: &mut Sampler) -> &mut BtfTracePoint {
        s.programs_mut()
            .ebpf_mut()
            .program_mut(programs::IO_DONE)
            .expect("the completion program")
            .try_into()
            .expect("a tp_btf program")
    }
    done(&mut sampler)
        .unload()
        .expect("detaching block_io_done");
    dsync("--number_ios=100");
    let hidden = settle(&disk).since(hidden_from);
    let btf = aya::Btf::from_sys_fs().expect("the kernel's BTF");
    let prog = done(&mut sampler);
    prog.load("block_io_done", &btf)
        .expect("loading block_io_done again");
    prog.attach().expect("attaching block_io_done again");
    dsync("--number_ios=100");
    let (d1, s1) = quiet_snapshot(&sampler, &disk);
    let want = d1.since(d0);
    let report = builder.build(&delta(&s0, &s1), HookMode::IoStartDone.name(), &s1);
    let got = report
        .devices
        .iter()
        .find(|r| r.device == disk)
        .map(|r| DiskCounts::of_report(&r.counts))
        .unwrap_or_default();
    let unseen = report
        .health
        .events
        .get("flush_completion_unseen")
        .copied()
        .unwrap_or(0);
    eprintln!(
        "{disk}: diskstats f={} (hidden stretch {}), overkvm f={}, flush_completion_unseen \
         {unseen}, health {:?}",
        want.flushes, hidden.flushes, got.flushes, report.health.events
    );
    assert!(
        hidden.flushes >= 100,
        "the hidden stretch flushed only {hidden:?}"
    );
    assert_eq!(got, want, "device totals vs /proc/diskstats");
    // Health events are the host's: another device may add one of its own now and then.
    assert!(
        unseen >= hidden.flushes,
        "{unseen} flushes recovered, {} hidden",
        hidden.flushes
    );
}

/// Where the fallback mode used to lose a flush, made certain: a device flush borrows the tag of
/// the first request waiting for it, and in the fallback mode that request (a sync's empty
/// preflush, never issued) holds no in-flight entry, so whatever sits at the tag is stale. Such
/// an entry is left when a completion's hook does not take its entry (a collision displaced it,
/// a request never ends), and now and then it named a key pruned since: charged there, the
/// flush vanished from the device (`flush_unattributed`, about 1 parity run in 8). Here every
/// tag of the device starts with such an entry, as `block_rq_issue` would have left it for a
/// request of a key since pruned (its slot's generation moved on); then an fsync workload runs
/// and the device's flushes and writes must still equal `/proc/diskstats`.
#[test]
fn device_flushes_ignore_stale_entries_at_borrowed_tags_request_fallback() {
    use aya::maps::{Array, HashMap, Map, MapData};
    use overkvm_common::{
        FlushOwner, INFLIGHT_SLOTS, Inflight, IoKey, KeySlot, hw_tag, inflight_slot, maps,
    };
    skip_unless_kernel!();
    let sampler = sampler_in(HookMode::RequestFallback);
    let mut builder = ReportBuilder::new();
    let lo = LoopDevice::new(96).expect("loop device");
    let disk = lo.name();
    // One empty preflush from this process names the device's request queue in FLUSH_OWNERS
    // (the kernel shows a queue's id nowhere else) and gives a key to age.
    fs::OpenOptions::new()
        .write(true)
        .open(&lo.path)
        .and_then(|f| f.sync_all())
        .expect("fsync of the loop device");
    let ebpf = sampler.programs().ebpf();
    let map = |name: &str| ebpf.map(name).unwrap_or_else(|| panic!("no map {name}"));
    let keys: HashMap<_, IoKey, KeySlot> = HashMap::try_from(map(maps::IO_KEYS)).unwrap();
    let ours: Vec<KeySlot> = keys
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, _)| k.dev == lo.dev() && k.tgid == std::process::id())
        .map(|(_, s)| s)
        .collect();
    let owners: Array<_, FlushOwner> = Array::try_from(map(maps::FLUSH_OWNERS)).unwrap();
    let (queue, owner) = owners
        .iter()
        .filter_map(Result::ok)
        .find(|o| o.queue != 0 && ours.contains(&o.slot))
        .map(|o| (o.queue - 1, o.slot))
        .expect("the fsync named the device's queue in FLUSH_OWNERS");
    let pruned = KeySlot {
        index: owner.index,
        generation: owner.generation.wrapping_add(1),
    };
    // The programs' map through a second descriptor: the sampler keeps the first.
    let id = match map(maps::INFLIGHT) {
        Map::Array(m) => m.info().expect("INFLIGHT info").id(),
        _ => panic!("INFLIGHT is not an array"),
    };
    let mut inflight: Array<MapData, Inflight> =
        Array::try_from(Map::Array(MapData::from_id(id).expect("INFLIGHT by id"))).unwrap();
    let depth: i32 = fs::read_to_string(format!("/sys/block/{disk}/queue/nr_requests"))
        .expect("nr_requests")
        .trim()
        .parse()
        .expect("nr_requests");
    let mut planted = 0;
    for tag in 0..depth {
        // A loop device has one hardware queue and no scheduler: the driver tag names it.
        let t = hw_tag(0, tag, -1).unwrap();
        let home = inflight_slot(queue, t);
        // Where `inflight_put` would have put it: the first free entry among its probes.
        let free = (0..4)
            .map(|i| (home + i) & (INFLIGHT_SLOTS - 1))
            .find(|&i| inflight.get(&i, 0).is_ok_and(|e| e.tag == 0));
        if let Some(i) = free {
            let stale = Inflight {
                queue,
                tag: t,
                slot: pruned,
            };
            inflight.set(i, stale, 0).expect("planting a stale entry");
            planted += 1;
        }
    }
    assert_eq!(planted, depth, "every tag of {disk} holds a stale entry");

    let m0 = recursion_misses(&sampler);
    let (d0, s0) = quiet_snapshot(&sampler, &disk);
    fio(
        &lo.path,
        &["--rw=randwrite", "--bs=4k", "--fsync=1", "--number_ios=400"],
    );
    let (d1, s1) = quiet_snapshot(&sampler, &disk);
    let want = d1.since(d0);
    let report = builder.build(&delta(&s0, &s1), "request-fallback", &s1);
    let got = report
        .devices
        .iter()
        .find(|r| r.device == disk)
        .map(|r| DiskCounts::of_report(&r.counts))
        .unwrap_or_default();
    let events = &report.health.events;
    eprintln!("program runs skipped: {}", recursion_misses(&sampler) - m0);
    eprintln!(
        "{disk}: diskstats {want:?}\n{:7} overkvm {got:?}\nhealth {events:?}",
        ""
    );
    assert!(want.flushes >= 300, "only {} flushes", want.flushes);
    // The stale entries were met: writes that drew those tags replaced them when issued
    // (`inflight_stale`), empty preflushes (never issued) took them at their ends and found
    // their key pruned (`latency_lost`).
    let met = |name: &str| events.get(name).copied().unwrap_or(0);
    assert!(
        met("inflight_stale") + met("latency_lost") > 0,
        "no request met a planted entry: the test proved nothing"
    );
    assert_eq!(got, want, "device totals differ from /proc/diskstats");
}

/// The kernel's own per-cgroup counters: a v1 blkio cgroup's `blkio.throttle.io_serviced`
/// (kept once a throttle rule exists on the device) against overkvm's bio counts of that
/// cgroup (`cgroups[].read_bios` / `write_bios` / `discard_bios`, every bio counted with
/// `--all-bios`), on workloads with splits, merges, discards and syncs.
#[test]
fn cgroup_bios_equal_blkio_io_serviced() {
    skip_unless_kernel!();
    let blkio = Path::new("/sys/fs/cgroup/blkio");
    if !blkio.join("blkio.throttle.io_serviced").exists() {
        overkvm_tests::skipped(
            module_path!(),
            "no cgroup v1 blkio hierarchy here (the 6.1 guest test checks v2 io.stat)",
        );
        return;
    }
    let mut sampler = Sampler::new(
        Programs::load(&LoadOptions {
            all_bios: true,
            ..LoadOptions::default()
        })
        .expect("loading the programs"),
    );
    let mut builder = ReportBuilder::new();
    let lo = LoopDevice::new(96).expect("loop device");
    let cg = blkio.join(format!("overkvm-parity-{}", std::process::id()));
    fs::create_dir_all(&cg).expect("creating a blkio cgroup");
    struct Cleanup<'a>(&'a Path, String);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            let _ = fs::write(
                self.0.join("blkio.throttle.read_iops_device"),
                format!("{} 0", self.1),
            );
            let _ = fs::remove_dir(self.0);
        }
    }
    let maj_min = format!(
        "{}:{}",
        overkvm_common::dev_major(lo.dev()),
        overkvm_common::dev_minor(lo.dev())
    );
    let _cleanup = Cleanup(&cg, maj_min.clone());
    // A rule the workloads never reach: it makes the throttler keep io_serviced for the device.
    fs::write(
        cg.join("blkio.throttle.read_iops_device"),
        format!("{maj_min} 100000000"),
    )
    .expect("setting a blkio rule");
    use std::os::unix::fs::MetadataExt as _;
    let cgroup_id = fs::metadata(&cg).unwrap().ino();
    let serviced = || -> [u64; 3] {
        let text = fs::read_to_string(cg.join("blkio.throttle.io_serviced")).unwrap();
        let get = |what: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{maj_min} {what} ")))
                .map_or(0, |v| v.trim().parse().unwrap())
        };
        [get("Read"), get("Write"), get("Discard")]
    };
    let workloads: &[(&str, &[&str])] = &[
        (
            "4k random direct read/write",
            &["--rw=randrw", "--bs=4k", "--direct=1", "--number_ios=1500"],
        ),
        (
            "4 MiB direct writes, split",
            &[
                "--rw=write",
                "--bs=4M",
                "--direct=1",
                "--ioengine=libaio",
                "--iodepth=4",
                "--size=32M",
            ],
        ),
        (
            "sequential direct writes in batches, merged",
            &[
                "--rw=write",
                "--bs=4k",
                "--direct=1",
                "--ioengine=io_uring",
                "--iodepth=64",
                "--iodepth_batch_submit=64",
                "--size=8M",
            ],
        ),
        (
            "O_DSYNC direct writes (each with an empty preflush bio)",
            &[
                "--rw=randwrite",
                "--bs=4k",
                "--direct=1",
                "--sync=dsync",
                "--number_ios=300",
            ],
        ),
        (
            "random discards",
            &["--rw=randtrim", "--bs=64k", "--number_ios=200"],
        ),
    ];
    let mut failures = Vec::new();
    eprintln!("blkio cgroup {}: overkvm bios vs io_serviced", cg.display());
    for (name, args) in workloads {
        let k0 = serviced();
        let s0 = sampler.snapshot().unwrap();
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec fio --name=cg --filename={} --size=48M \
             --randrepeat=0 --output=/dev/null {}",
            cg.display(),
            lo.path.display(),
            args.join(" ")
        );
        let st = Command::new("sh").args(["-c", &script]).status().unwrap();
        assert!(st.success(), "{name}: fio failed");
        let s1 = sampler.snapshot().unwrap();
        let k1 = serviced();
        let want = [k1[0] - k0[0], k1[1] - k0[1], k1[2] - k0[2]];
        let report = builder.build(&delta(&s0, &s1), "test", &s1);
        let mut got = [0u64; 3];
        for r in report
            .cgroups
            .iter()
            .filter(|r| r.cgroup_id == cgroup_id && r.device == lo.name())
        {
            got[0] += r.read_bios;
            got[1] += r.write_bios;
            got[2] += r.discard_bios;
        }
        let status = if got == want { "exact" } else { "DIFFERS" };
        eprintln!("  {status:7} {name:58} io_serviced r/w/d {want:?} overkvm {got:?}");
        if got != want {
            failures.push(*name);
        }
        assert!(want.iter().sum::<u64>() > 0, "{name}: nothing counted");
        sampler.prune(&s1, overkvm::report::pid_alive);
    }
    assert!(
        failures.is_empty(),
        "per-cgroup bios differ from io_serviced for {failures:?}"
    );
}

/// Runs of the programs the kernel skipped so far (a tracepoint fired again on a CPU where the
/// program was running): events no map saw. Printed with every comparison, so a difference can
/// be told from a skipped run.
fn recursion_misses(sampler: &Sampler) -> u64 {
    sampler
        .programs()
        .run_stats()
        .iter()
        .map(|r| {
            r.recursion_misses.unwrap_or_else(|| {
                panic!("{}: the kernel did not say its recursion misses", r.name)
            })
        })
        .sum()
}

/// Entries of `INFLIGHT` and `BIO_INFLIGHT` still held: with every device quiet, each one is a
/// request or bio whose end the programs missed.
fn entries_left(sampler: &Sampler) -> (Vec<(u32, u32, u32)>, Vec<u32>) {
    use aya::maps::Array;
    use overkvm_common::{BioInflight, Inflight, maps};
    let ebpf = sampler.programs().ebpf();
    let inflight: Array<_, Inflight> =
        Array::try_from(ebpf.map(maps::INFLIGHT).expect("INFLIGHT")).unwrap();
    let bios: Array<_, BioInflight> =
        Array::try_from(ebpf.map(maps::BIO_INFLIGHT).expect("BIO_INFLIGHT")).unwrap();
    (
        inflight
            .iter()
            .filter_map(Result::ok)
            .filter(|e| e.tag != 0)
            .map(|e| (e.queue, e.tag, e.slot.index))
            .collect(),
        bios.iter()
            .filter_map(Result::ok)
            .filter(|e| e.ptr != 0)
            .map(|e| e.slot.index)
            .collect(),
    )
}
