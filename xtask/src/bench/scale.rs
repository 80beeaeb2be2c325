//! The daemon at scale: 300 processes that look like VMs, each trickling direct I/O, plus 10
//! busy ones (CPU and RSS of `overkvm-io serve -i 1`); then 300 VMs whose disk is on network
//! storage, read over QMP, plus 10 whose monitor never answers (CPU, threads, ticks kept,
//! scrape time); then 1000 VMs on 2 devices that did a few I/Os and sit idle, while `/metrics`
//! is scraped sequentially (latency p50/p99); and the kernel memory of overkvm's maps.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::{
    BenchArgs, Ctx, Section, Target,
    stats::{self, MapInfo, median, percentile},
    sys::{self, Daemon, LoopDev, Procs, progress},
};

const QEMU: &str = "qemu-system-x86_64";
/// What Prometheus 2.42 sends with `--enable-feature=native-histograms`.
const ACCEPT_PROTOBUF: &str = "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited,application/openmetrics-text;version=1.0.0;q=0.8,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
/// Where the "before" figures of the series budget come from: the scale section of
/// BENCHMARKS.md generated at that commit (1000 VMs on 2 devices, every VM 5 op counters,
/// 3 byte counters, 2 histograms of 27 buckets + sum + count, vm_info).
const BEFORE_BUDGET: &str = "commit 7b0aa51, 2026-11-26";
const WARMUP: Duration = Duration::from_secs(10);

/// Copies iogen under the name qemu's processes have, so the identity layer takes it for a VM.
fn fake_qemu(ctx: &Ctx, dir: &Path) -> anyhow::Result<PathBuf> {
    let qemu = dir.join(QEMU);
    fs::copy(&ctx.iogen, &qemu)
        .with_context(|| format!("copying {} (built?)", ctx.iogen.display()))?;
    Ok(qemu)
}

/// One VM stand-in: `iogen DEV READS WRITES 4096 0 SIZE SEED [--rate R] [--hold] -name
/// guest=NAME -uuid U`.
fn vm_command(
    qemu: &Path,
    dev: &Path,
    size: u64,
    name: &str,
    index: usize,
    (reads, writes): (u64, u64),
    extra: &[String],
) -> Command {
    let mut c = Command::new(qemu);
    c.arg(dev)
        .args([
            reads.to_string(),
            writes.to_string(),
            "4096".into(),
            "0".into(),
            size.to_string(),
            (index + 1).to_string(),
        ])
        .args(extra)
        .args(["-name", &format!("guest={name},debug-threads=on"), "-uuid"])
        .arg(format!("00000000-0000-4000-8000-{index:012}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

/// A command as one would type it (for the report).
fn shell_line(c: &Command) -> String {
    std::iter::once(c.get_program())
        .chain(c.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn spawn_all(procs: &mut Procs, cmds: Vec<Command>) -> anyhow::Result<()> {
    for mut c in cmds {
        sys::check_interrupt()?;
        procs.0.push(c.spawn().context("starting a VM stand-in")?);
    }
    Ok(())
}

/// The daemon's maps (the ids it holds open) as bpftool lists them.
fn daemon_maps(pid: u32) -> anyhow::Result<Vec<MapInfo>> {
    let ids = sys::owned_bpf_ids(pid).1;
    Ok(sys::bpftool_maps()?
        .into_iter()
        .filter(|m| ids.contains(&m.id))
        .collect())
}

/// How many of `expected` `/metrics` shows now, and the exposition; None when it does not
/// answer 200.
fn exported(d: &Daemon, expected: &BTreeSet<String>) -> Option<(usize, String)> {
    match sys::http_get(
        d.addr,
        "/metrics",
        sys::ACCEPT_OPENMETRICS,
        Duration::from_secs(10),
    ) {
        Ok((200, body, _)) => {
            let text = String::from_utf8_lossy(&body).into_owned();
            let n = stats::exported_vms(&text).intersection(expected).count();
            Some((n, text))
        }
        _ => None,
    }
}

/// The daemon's own figures from its exposition (time per tick spent sampling and rendering).
const SELF_METRICS: [&str; 4] = [
    "overkvm_sample_duration",
    "overkvm_exporter_render_duration",
    "overkvm_ticks",
    "overkvm_bpf_map_entries",
];

struct DaemonUse {
    cpu_pct: Option<f64>,
    /// % of one core per thread name.
    threads: Vec<(String, f64)>,
    rss_max_kib: u64,
    rss_samples: Vec<u64>,
    hwm_kib: Option<u64>,
    wall_s: f64,
}

/// Samples the daemon's CPU (utime+stime) and RSS every second for `window`.
fn measure(d: &mut Daemon, window: Duration) -> anyhow::Result<DaemonUse> {
    let pid = d.pid();
    let t0 = Instant::now();
    let c0 = sys::cpu_ticks(pid).context("reading the daemon's /proc stat")?;
    let th0 = sys::thread_ticks(pid);
    let mut rss = Vec::new();
    while t0.elapsed() < window {
        sys::sleep(Duration::from_secs(1).min(window.saturating_sub(t0.elapsed())))?;
        if !d.alive() {
            anyhow::bail!("overkvm-io serve died:\n{}", d.log_tail());
        }
        rss.extend(sys::status_kib(pid, "VmRSS"));
    }
    let c1 = sys::cpu_ticks(pid).context("reading the daemon's /proc stat")?;
    let th1 = sys::thread_ticks(pid);
    let wall_s = t0.elapsed().as_secs_f64();
    let hz = sys::clock_ticks_per_second();
    let threads = th1
        .iter()
        .map(|(name, t)| {
            let d = t.saturating_sub(th0.get(name).copied().unwrap_or(0));
            (
                name.clone(),
                stats::cpu_percent(d, hz, wall_s).unwrap_or(0.0),
            )
        })
        .collect();
    Ok(DaemonUse {
        cpu_pct: stats::cpu_percent(c1 - c0, hz, wall_s),
        threads,
        rss_max_kib: rss.iter().copied().max().unwrap_or(0),
        rss_samples: rss,
        hwm_kib: sys::status_kib(pid, "VmHWM"),
        wall_s,
    })
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn maps_table(md: &mut String, maps: &[MapInfo]) {
    let mut maps = maps.to_vec();
    maps.sort_by(|a, b| a.name.cmp(&b.name));
    let _ = writeln!(
        md,
        "| map | type | max entries | kernel memory (bytes_memlock) |\n|---|---|---|---|"
    );
    for m in &maps {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.2} MiB |",
            m.name,
            m.kind,
            m.max_entries,
            m.bytes as f64 / (1 << 20) as f64
        );
    }
    let total: u64 = maps.iter().map(|m| m.bytes).sum();
    let _ = writeln!(
        md,
        "| **total** ({} maps) | | | **{:.2} MiB** |\n",
        maps.len(),
        total as f64 / (1 << 20) as f64
    );
}

pub fn run(ctx: &Ctx, args: &BenchArgs) -> anyhow::Result<Section> {
    sys::require_tools(&["bpftool", "losetup"])?;
    let load_start = sys::loadavg();
    let started = sys::utc_now();
    let tmp = sys::TempDir::new("scale")?;
    let qemu = fake_qemu(ctx, &tmp.0)?;
    let mut md = String::new();
    let mut targets = Vec::new();
    let _ = writeln!(md, "## 2. The daemon at scale\n");

    // Part 1: 300 trickling VMs + 10 busy ones, the daemon at -i 1.
    let size_mib = 256;
    let dev = LoopDev::new(size_mib, "scale")?;
    let size = size_mib << 20;
    let log = tmp.0.join("daemon-300.log");
    progress(format!(
        "scale: overkvm-io serve -i 1 with {} VMs at {} IOPS and {} at {} IOPS on {}",
        args.vms,
        args.trickle_iops,
        args.busy,
        args.busy_iops,
        dev.name()
    ));
    let mut daemon = Daemon::start(&ctx.overkvm, "1", &log)?;
    let metrics_up = daemon.wait_metrics(Duration::from_secs(10))?;
    let mut procs = Procs::default();
    let trickle_extra = vec!["--rate".to_string(), args.trickle_iops.to_string()];
    let busy_extra = vec!["--rate".to_string(), args.busy_iops.to_string()];
    let mut cmds: Vec<Command> = (0..args.vms)
        .map(|i| {
            vm_command(
                &qemu,
                &dev.path,
                size,
                &format!("vm{i:03}"),
                i,
                (1 << 40, 0),
                &trickle_extra,
            )
        })
        .collect();
    cmds.extend((0..args.busy).map(|i| {
        vm_command(
            &qemu,
            &dev.path,
            size,
            &format!("busy{i:02}"),
            5000 + i,
            (1 << 40, 0),
            &busy_extra,
        )
    }));
    let example = cmds.first().map(shell_line).unwrap_or_default();
    let expected: BTreeSet<String> = (0..args.vms)
        .map(|i| format!("vm{i:03}"))
        .chain((0..args.busy).map(|i| format!("busy{i:02}")))
        .collect();
    spawn_all(&mut procs, cmds)?;
    progress(format!(
        "scale: {} VM stand-ins running; {} s warm-up, then {} s of measurement",
        procs.0.len(),
        WARMUP.as_secs(),
        args.window
    ));
    sys::sleep(WARMUP)?;
    let disk0 = sys::diskstats();
    let use300 = measure(&mut daemon, Duration::from_secs(args.window))?;
    let disk1 = sys::diskstats();
    let dev_iops = stats::diskstats_delta(
        &disk0,
        &disk1,
        &std::collections::BTreeSet::from([dev.name()]),
    ) as f64
        / use300.wall_s;
    let (exited, bad) = procs.exited();
    let (seen300, self300) = match metrics_up.then(|| exported(&daemon, &expected)).flatten() {
        Some((n, text)) => (Some(n), stats::metric_lines(&text, &SELF_METRICS)),
        None => (None, Vec::new()),
    };
    let maps300 = daemon_maps(daemon.pid())?;
    let daemon_cmd = daemon.command.clone();
    daemon.stop();
    drop(procs);
    drop(dev);
    progress(format!(
        "scale: daemon {} of a core, RSS max {:.1} MiB (VmHWM {}), device {dev_iops:.0} IOPS, VMs exported {}",
        use300.cpu_pct.map_or("n/a".into(), |c| format!("{c:.2}%")),
        mib(use300.rss_max_kib),
        use300
            .hwm_kib
            .map_or("n/a".into(), |h| format!("{:.1} MiB", mib(h))),
        seen300.map_or("n/a".into(), |n| n.to_string())
    ));
    let _ = writeln!(
        md,
        "{}",
        ctx.run_facts(&started, &load_start, "(see below)")
    );
    let _ = writeln!(
        md,
        "### {} trickling VMs + {} busy ones, daemon at -i 1\n",
        args.vms, args.busy
    );
    let _ = writeln!(
        md,
        "- daemon: `{daemon_cmd}`\n\
         - VM stand-ins: copies of `iogen` named `{QEMU}`, one process each, O_DIRECT 4 KiB \
         reads on one loop device over /dev/shm ({size_mib} MiB): {} at {} IOPS, {} at {} IOPS. \
         First one: `{}`\n\
         - measured after a {} s warm-up over {:.1} s: CPU = Δ(utime+stime) of /proc/PID/stat, \
         RSS = VmRSS sampled every second (max), VmHWM at the end\n",
        args.vms,
        args.trickle_iops,
        args.busy,
        args.busy_iops,
        example,
        WARMUP.as_secs(),
        use300.wall_s
    );
    let _ = writeln!(
        md,
        "| daemon CPU (% of one core) | RSS max | RSS median | VmHWM | device IOPS | VM stand-ins exited early | of them on /metrics |\n|---|---|---|---|---|---|---|"
    );
    let _ = writeln!(
        md,
        "| {} | {:.1} MiB | {:.1} MiB | {} | {dev_iops:.0} | {exited}{} | {} |\n",
        use300.cpu_pct.map_or("n/a".into(), |c| format!("{c:.2}%")),
        mib(use300.rss_max_kib),
        mib(median(
            &use300
                .rss_samples
                .iter()
                .map(|v| *v as f64)
                .collect::<Vec<_>>()
        )
        .unwrap_or(0.0) as u64),
        use300
            .hwm_kib
            .map_or("n/a".into(), |h| format!("{:.1} MiB", mib(h))),
        bad.map_or(String::new(), |st| format!(" (first: {st})")),
        seen300.map_or("not available".into(), |n| n.to_string()),
    );
    let _ = writeln!(
        md,
        "Daemon CPU by thread: {}.\n",
        use300
            .threads
            .iter()
            .map(|(n, c)| format!("`{n}` {c:.2}%"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if !self300.is_empty() {
        let _ = writeln!(
            md,
            "Its own figures at the end of the window (from /metrics):\n\n```\n{}\n```\n",
            self300.join("\n")
        );
    }
    let _ = writeln!(md, "Kernel memory of overkvm's maps:\n");
    maps_table(&mut md, &maps300);
    targets.push(Target::new(
        "scale: daemon CPU with 300 VMs <= 2% of a core",
        "<= 2%",
        use300.cpu_pct.map_or("n/a".into(), |c| format!("{c:.2}%")),
        use300.cpu_pct.map(|c| c <= 2.0),
    ));
    targets.push(Target::new(
        "scale: daemon RSS with 300 VMs <= 64 MiB",
        "<= 64 MiB",
        format!("{:.1} MiB", mib(use300.rss_max_kib)),
        (use300.rss_max_kib > 0).then_some(use300.rss_max_kib <= 64 * 1024),
    ));

    // Part 2: VMs with network disks, counted from QEMU's counters over QMP.
    sys::check_interrupt()?;
    net_part(ctx, args, &tmp.0, &mut md, &mut targets)?;

    // Part 3: 1000 idle VMs on 2 devices; scrape latency.
    sys::check_interrupt()?;
    scrape_part(ctx, args, &qemu, &tmp.0, &mut md, &mut targets)?;
    let load_end = sys::loadavg();
    let _ = writeln!(md, "Load average at the end of the section: {load_end}\n");
    md.push_str(&Target::table(&targets));
    Ok(Section {
        name: "scale",
        markdown: md,
        targets,
    })
}

/// Sequential OpenMetrics scrapes: their latencies in ms, the last body, and the errors.
fn scrapes(d: &Daemon, n: u64) -> anyhow::Result<(Vec<f64>, String, u64)> {
    let mut lat_ms = Vec::new();
    let mut last = String::new();
    let mut errors = 0;
    for _ in 0..n {
        sys::check_interrupt()?;
        match sys::http_get(
            d.addr,
            "/metrics",
            sys::ACCEPT_OPENMETRICS,
            Duration::from_secs(10),
        ) {
            Ok((200, body, took)) => {
                lat_ms.push(took.as_secs_f64() * 1000.0);
                last = String::from_utf8_lossy(&body).into_owned();
            }
            _ => errors += 1,
        }
    }
    Ok((lat_ms, last, errors))
}

/// Threads of process `pid` whose name is `comm`.
fn threads_named(pid: u32, comm: &str) -> usize {
    fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == comm)
                })
                .count()
        })
        .unwrap_or(0)
}

/// `overkvm_ticks_total` of an exposition.
fn ticks_total(exposition: &str) -> Option<f64> {
    stats::metric_lines(exposition, &["overkvm_ticks_total "])
        .first()
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
}

/// VMs whose one disk is on network storage: `qmpvm` stand-ins (a QMP monitor each, named
/// `qemu-system-x86_64`, answering `query-blockstats` at once), plus some whose monitor never
/// answers, all named to the daemon with `--qmp`. What it costs to read QEMU's counters of
/// every VM each interval, and whether hung monitors cost ticks.
fn net_part(
    ctx: &Ctx,
    args: &BenchArgs,
    tmp: &Path,
    md: &mut String,
    targets: &mut Vec<Target>,
) -> anyhow::Result<()> {
    const OPS_PER_S: u64 = 20;
    let (n, hung) = (args.net_vms, args.hung_vms);
    let dir = tmp.join("net");
    fs::create_dir_all(&dir)?;
    let qemu = dir.join(QEMU);
    fs::copy(&ctx.qmpvm, &qemu)
        .with_context(|| format!("copying {} (built?)", ctx.qmpvm.display()))?;
    let socket = |i: usize| dir.join(format!("vm{i:03}.qmp"));
    let mut procs = Procs::default();
    let cmds: Vec<Command> = (0..n + hung)
        .map(|i| {
            let mut c = Command::new(&qemu);
            c.arg(socket(i)).arg(OPS_PER_S.to_string());
            if i >= n {
                c.arg("--hang");
            }
            c.args([
                "-name",
                &format!("guest=net{i:03},debug-threads=on"),
                "-uuid",
            ])
            .arg(format!("00000000-0000-4000-8001-{i:012}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
            c
        })
        .collect();
    let example = cmds.first().map(shell_line).unwrap_or_default();
    spawn_all(&mut procs, cmds)?;
    let t0 = Instant::now();
    while !(0..n + hung).all(|i| socket(i).exists()) {
        if t0.elapsed() > Duration::from_secs(30) {
            anyhow::bail!("the QMP stand-ins did not all bind their sockets within 30 s");
        }
        sys::sleep(Duration::from_millis(100))?;
    }
    let extra: Vec<String> = (0..n + hung)
        .flat_map(|i| {
            [
                "--qmp".to_string(),
                socket(i).to_string_lossy().into_owned(),
            ]
        })
        .collect();
    progress(format!(
        "scale: overkvm-io serve -i 1 --qmp x{} ({n} network-disk VMs, {hung} of them hung)",
        n + hung
    ));
    let mut daemon =
        Daemon::start_with(&ctx.overkvm, "1", &tmp.join("daemon-net.log"), &extra, None)?;
    let metrics_up = daemon.wait_metrics(Duration::from_secs(10))?;
    sys::sleep(WARMUP)?;
    // Ticks the daemon made over the window, from its own counter (one scrape at each end).
    let (ticks0, at0) = (scrapes(&daemon, 1)?.1, Instant::now());
    let used = measure(&mut daemon, Duration::from_secs(args.window))?;
    let (ticks1, at1) = (scrapes(&daemon, 1)?.1, Instant::now());
    let ticks = match (ticks_total(&ticks0), ticks_total(&ticks1)) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let ticks_span = (at1 - at0).as_secs_f64();
    let (lat_ms, body, errors) = if metrics_up {
        scrapes(&daemon, args.scrapes)?
    } else {
        (Vec::new(), String::new(), 0)
    };
    let pool = threads_named(daemon.pid(), "overkvm-qemu");
    let all_threads = fs::read_dir(format!("/proc/{}/task", daemon.pid()))
        .map(|d| d.count())
        .unwrap_or(0);
    let disk_info = body
        .lines()
        .filter(|l| l.starts_with("overkvm_vm_disk_info{") && l.contains("source=\"qemu\""))
        .count();
    let (exited, bad) = procs.exited();
    let self_lines = stats::metric_lines(&body, &SELF_METRICS);
    let daemon_cmd = daemon.command.clone();
    daemon.stop();
    drop(procs);

    let p = |q: f64| percentile(&lat_ms, q).map_or("n/a".into(), |v| format!("{v:.2} ms"));
    let cpu = used.cpu_pct.map_or("n/a".into(), |c| format!("{c:.2}%"));
    progress(format!(
        "scale: network disks: daemon {cpu} of a core, {pool} QMP threads, {disk_info} of {n} \
         disks on /metrics, scrape p50 {} p99 {}",
        p(50.0),
        p(99.0)
    ));
    let _ = writeln!(
        md,
        "### {n} VMs with network disks (+ {hung} whose QMP monitor never answers), daemon at -i 1\n\n\
         - daemon: `{daemon_cmd}`\n\
         - VM stand-ins: copies of `qmpvm` (tests/src/bin/qmpvm.rs) named `{QEMU}`, one process \
         and one QMP socket each; their one disk's file child is an NBD node, its counters grow \
         at {OPS_PER_S} reads and {OPS_PER_S} writes a second; no guest, no I/O (cost only: \
         the counts are checked against real QEMUs and libvirt in tests/tests/netdisk.rs and \
         libvirt.rs). {hung} more accept a connection and never answer. First one: `{example}`\n\
         - measured after a {} s warm-up over {:.1} s, as above; then {} sequential OpenMetrics \
         scrapes\n",
        WARMUP.as_secs(),
        used.wall_s,
        args.scrapes
    );
    let _ = writeln!(
        md,
        "| daemon CPU (% of one core) | RSS max | threads (QMP pool) | ticks in {ticks_span:.0} s | \
         network disks on /metrics | scrape p50 | scrape p99 | scrape errors | stand-ins exited early |\n\
         |---|---|---|---|---|---|---|---|---|"
    );
    let _ = writeln!(
        md,
        "| {cpu} | {:.1} MiB | {all_threads} ({pool}) | {} | {disk_info} of {n} | {} | {} | {errors} | {exited}{} |\n",
        mib(used.rss_max_kib),
        ticks.map_or("n/a".into(), |t| format!("{t:.0}")),
        p(50.0),
        p(99.0),
        bad.map_or(String::new(), |st| format!(" (first: {st})")),
    );
    let _ = writeln!(
        md,
        "Daemon CPU by thread: {}.\n",
        used.threads
            .iter()
            .map(|(n, c)| format!("`{n}` {c:.2}%"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if !self_lines.is_empty() {
        let _ = writeln!(
            md,
            "Its own figures at the end (from /metrics):\n\n```\n{}\n```\n",
            self_lines.join("\n")
        );
    }
    targets.push(Target::new(
        "scale: every network disk of 300 VMs counted on /metrics",
        &format!("{n} of {n}"),
        format!("{disk_info} of {n}"),
        Some(disk_info == n),
    ));
    targets.push(Target::new(
        "scale: QEMU counters of 300 VMs read by at most 4 threads",
        "<= 4",
        pool.to_string(),
        Some(pool <= 4),
    ));
    // One tick a second at -i 1: hung monitors must not cost any.
    let want_ticks = ticks_span.floor() - 1.0;
    targets.push(Target::new(
        "scale: no interval lost to hung QMP monitors",
        &format!(">= {want_ticks:.0} ticks in {ticks_span:.0} s"),
        ticks.map_or("n/a".into(), |t| format!("{t:.0}")),
        ticks.map(|t| t >= want_ticks),
    ));
    Ok(())
}

fn scrape_part(
    ctx: &Ctx,
    args: &BenchArgs,
    qemu: &Path,
    tmp: &Path,
    md: &mut String,
    targets: &mut Vec<Target>,
) -> anyhow::Result<()> {
    let n = args.scrape_vms;
    let size_mib = 128;
    let devs = [
        LoopDev::new(size_mib, "scrape0")?,
        LoopDev::new(size_mib, "scrape1")?,
    ];
    let daemon = Daemon::start(&ctx.overkvm, "1", &tmp.join("daemon-scrape.log"))?;
    let _ = writeln!(
        md,
        "### /metrics with {n} VMs on 2 devices\n\n\
         - daemon: `{}`\n\
         - {n} VM stand-ins (`{QEMU} DEV 4 4 4096 0 {} SEED --hold -name guest=vmNNNN,... -uuid ...`, \
         half on {}, half on {}): 4 O_DIRECT reads and 4 writes each, then idle (alive) during \
         the scrapes\n",
        daemon.command,
        size_mib << 20,
        devs[0].name(),
        devs[1].name()
    );
    progress(format!("scale: /metrics with {n} VMs on 2 devices"));
    if !daemon.wait_metrics(Duration::from_secs(10))? {
        progress("scale: /metrics does not answer: scrape latency not available");
        let _ = writeln!(
            md,
            "Scrape latency: **not available** (`/metrics` did not answer 200 within 10 s: \
             exporter not built).\n"
        );
        targets.push(Target::new(
            "scale: scrape p99 with 1000 VMs <= 50 ms",
            "<= 50 ms",
            "not available (exporter not built)".into(),
            None,
        ));
        daemon.stop();
        return Ok(());
    }
    let mut procs = Procs::default();
    let hold = vec!["--hold".to_string()];
    let cmds = (0..n)
        .map(|i| {
            vm_command(
                qemu,
                &devs[i % 2].path,
                size_mib << 20,
                &format!("vm{i:04}"),
                i,
                (4, 4),
                &hold,
            )
        })
        .collect();
    spawn_all(&mut procs, cmds)?;
    // Wait until the exporter shows them all (identities resolve over a few ticks).
    let expected: BTreeSet<String> = (0..n).map(|i| format!("vm{i:04}")).collect();
    let t0 = Instant::now();
    let mut seen = 0;
    while t0.elapsed() < Duration::from_secs(120) {
        sys::sleep(Duration::from_secs(2))?;
        seen = exported(&daemon, &expected).map_or(0, |(n, _)| n);
        if seen >= n {
            break;
        }
    }
    let visible_after = t0.elapsed().as_secs_f64();
    progress(format!(
        "scale: {seen} VMs on /metrics after {visible_after:.0} s; {} scrapes",
        args.scrapes
    ));
    let (exited, bad) = procs.exited();
    let cpu0 = sys::cpu_ticks(daemon.pid()).unwrap_or(0);
    let phase = Instant::now();
    let mut rows = Vec::new();
    for (format, accept) in [
        (
            "OpenMetrics (Prometheus's Accept header)",
            sys::ACCEPT_OPENMETRICS,
        ),
        ("classic text (Accept: text/plain)", sys::ACCEPT_TEXT),
        (
            "Prometheus protobuf (native histograms on)",
            ACCEPT_PROTOBUF,
        ),
    ] {
        // One scrape first, so a format rendered on first request is not all in the figures.
        let _ = sys::http_get(daemon.addr, "/metrics", accept, Duration::from_secs(10));
        let mut lat_ms = Vec::new();
        let mut bytes = 0;
        let mut errors = 0;
        for _ in 0..args.scrapes {
            sys::check_interrupt()?;
            match sys::http_get(daemon.addr, "/metrics", accept, Duration::from_secs(10)) {
                Ok((200, body, took)) => {
                    lat_ms.push(took.as_secs_f64() * 1000.0);
                    bytes = body.len();
                }
                _ => errors += 1,
            }
        }
        rows.push((format, lat_ms, bytes, errors));
    }
    // The render time, once per tick: each scrape after a tick renders it anew and shows the
    // time of the rendering before (a gauge), so one scrape a second gives one rendering each.
    // The same as CPU time of the thread that renders (and serves): wall time on a loaded
    // machine is mostly waiting for a core.
    let http_ticks = || sys::thread_ticks(daemon.pid()).get("overkvm-http").copied();
    let http0 = http_ticks();
    let mut renders_ms = Vec::new();
    for _ in 0..RENDER_SAMPLES {
        sys::check_interrupt()?;
        sys::sleep(Duration::from_millis(1000))?;
        if let Some((_, text)) = exported(&daemon, &expected)
            && let Some(v) = render_seconds(&text)
        {
            renders_ms.push(v * 1000.0);
        }
    }
    let render_cpu_ms = match (http0, http_ticks()) {
        (Some(a), Some(b)) if b >= a => Some(
            (b - a) as f64 * 1000.0 / sys::clock_ticks_per_second() as f64 / RENDER_SAMPLES as f64,
        ),
        _ => None,
    };
    let cpu1 = sys::cpu_ticks(daemon.pid()).unwrap_or(cpu0);
    let cpu_pct = stats::cpu_percent(
        cpu1 - cpu0,
        sys::clock_ticks_per_second(),
        phase.elapsed().as_secs_f64(),
    );
    let last_text = exported(&daemon, &expected).map(|(_, text)| text);
    let self_lines = last_text
        .as_deref()
        .map(|text| stats::metric_lines(text, &SELF_METRICS))
        .unwrap_or_default();
    let per_vm: Vec<usize> = last_text
        .as_deref()
        .map(|text| {
            series_per_vm(text)
                .into_iter()
                .filter(|(vm, _)| expected.contains(vm))
                .map(|(_, n)| n)
                .collect()
        })
        .unwrap_or_default();
    // The first sample may be of the rendering that ran while the format scrapes did.
    let renders_ms = renders_ms.get(1..).unwrap_or_default().to_vec();
    let render_ms = median(&renders_ms);
    let render_max = renders_ms.iter().copied().reduce(f64::max);
    let rss = sys::status_kib(daemon.pid(), "VmRSS").unwrap_or(0);
    let hwm = sys::status_kib(daemon.pid(), "VmHWM").unwrap_or(0);
    let maps = daemon_maps(daemon.pid())?;
    daemon.stop();
    drop(procs);
    drop(devs);

    let _ = writeln!(
        md,
        "{seen} of {n} VMs were on /metrics {visible_after:.0} s after they started; {exited} stand-ins \
         had exited{}. Each scrape: a new TCP connection, `GET /metrics`, read to the end; \
         {} sequential scrapes per format, after one unmeasured scrape.\n",
        bad.map_or(String::new(), |st| format!(" (first failure: {st})")),
        args.scrapes
    );
    let _ = writeln!(
        md,
        "| format | scrapes ok | errors | body | p50 | p99 | max |\n|---|---|---|---|---|---|---|"
    );
    let mut p99_om = None;
    for (format, lat, bytes, errors) in &rows {
        let p50 = percentile(lat, 50.0);
        let p99 = percentile(lat, 99.0);
        let max = percentile(lat, 100.0);
        if p99_om.is_none() {
            p99_om = Some(p99);
        }
        let f = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{v:.2} ms"));
        let _ = writeln!(
            md,
            "| {format} | {} | {errors} | {:.0} KiB | {} | {} | {} |",
            lat.len(),
            *bytes as f64 / 1024.0,
            f(p50),
            f(p99),
            f(max)
        );
        progress(format!(
            "scale: {format}: p50 {} p99 {} ({} KiB)",
            f(p50),
            f(p99),
            bytes / 1024
        ));
    }
    let _ = writeln!(
        md,
        "\nDaemon while scraped with {seen} VMs: {} of a core, VmRSS {:.1} MiB, VmHWM {:.1} MiB.\n",
        cpu_pct.map_or("n/a".into(), |c| format!("{c:.1}%")),
        mib(rss),
        mib(hwm)
    );
    if !self_lines.is_empty() {
        let _ = writeln!(
            md,
            "Its own figures after the scrapes:\n\n```\n{}\n```\n",
            self_lines.join("\n")
        );
    }
    let _ = writeln!(md, "Kernel memory of overkvm's maps with {seen} VMs:\n");
    maps_table(md, &maps);
    let om_bytes = rows.first().map_or(0, |r| r.2);
    let (series_median, series_max) = {
        let mut v: Vec<f64> = per_vm.iter().map(|&n| n as f64).collect();
        v.sort_by(f64::total_cmp);
        (median(&v), v.last().copied())
    };
    let _ = writeln!(
        md,
        "Series budget: what one VM costs ({} VMs counted, each with reads and writes on one \
         device, default `--latency-buckets compact`), against the exposition before the \
         budget ({BEFORE_BUDGET}):\n\n\
         | | series per VM | OpenMetrics bytes per scrape ({n} VMs) | render |\n|---|---|---|---|\n\
         | before the series budget | 67 | 5951 KiB | 19.5 ms |\n\
         | this run | {} (max {}) | {:.0} KiB | {} (median of {} renderings, one a second; max {}); \
         CPU of the serving thread per rendering and scrape: {} |\n",
        per_vm.len(),
        series_median.map_or("n/a".into(), |v| format!("{v:.0}")),
        series_max.map_or("n/a".into(), |v| format!("{v:.0}")),
        om_bytes as f64 / 1024.0,
        render_ms.map_or("n/a".into(), |v| format!("{v:.1} ms")),
        renders_ms.len(),
        render_max.map_or("n/a".into(), |v| format!("{v:.1} ms")),
        render_cpu_ms.map_or("n/a".into(), |v| format!("{v:.1} ms")),
    );
    targets.push(Target::new(
        "scale: series per VM doing reads and writes on one device <= 20",
        "<= 20",
        series_max.map_or("n/a".into(), |v| format!("{v:.0}")),
        series_max.map(|v| v <= 20.0 && !per_vm.is_empty()),
    ));
    targets.push(Target::new(
        "scale: /metrics render with 1000 VMs <= 10 ms of CPU",
        "<= 10 ms",
        match (render_cpu_ms, render_ms) {
            (Some(cpu), Some(wall)) => format!("{cpu:.1} ms of CPU ({wall:.1} ms wall, median)"),
            (Some(cpu), None) => format!("{cpu:.1} ms of CPU"),
            _ => "n/a".into(),
        },
        render_cpu_ms.map(|v| v <= 10.0),
    ));
    let p99 = p99_om.flatten();
    let complete = seen >= n;
    targets.push(Target::new(
        "scale: scrape p99 with 1000 VMs <= 50 ms",
        "<= 50 ms",
        match p99 {
            Some(v) if complete => format!("{v:.2} ms"),
            Some(v) => format!("{v:.2} ms (only {seen} of {n} VMs exported)"),
            None => "no successful scrape".into(),
        },
        p99.map(|v| v <= 50.0 && complete),
    ));
    Ok(())
}

/// Renderings of `/metrics` sampled for the render time.
const RENDER_SAMPLES: usize = 21;

/// `overkvm_exporter_render_duration_seconds` of an exposition.
fn render_seconds(exposition: &str) -> Option<f64> {
    stats::metric_lines(exposition, &["overkvm_exporter_render_duration_seconds "])
        .first()
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
}

/// Sample lines per value of the `vm` label in an exposition (comments left out).
fn series_per_vm(exposition: &str) -> std::collections::BTreeMap<String, usize> {
    let mut out = std::collections::BTreeMap::new();
    for line in exposition.lines().filter(|l| !l.starts_with('#')) {
        for vm in stats::exported_vms(line) {
            *out.entry(vm).or_insert(0) += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_counted_per_vm_label() {
        let text = "# HELP x y\n\
                    overkvm_vm_info{vm=\"a\",uuid=\"u\"} 1\n\
                    overkvm_vm_io_operations_total{vm=\"a\",device=\"d\",op=\"read\"} 4\n\
                    overkvm_vm_io_operations_total{vm=\"b\",device=\"d\",op=\"read\"} 4\n\
                    overkvm_throttle_limit_iops{xvm=\"a\"} 3\n\
                    overkvm_ticks_total 3\n";
        let n = series_per_vm(text);
        assert_eq!(n.get("a"), Some(&2));
        assert_eq!(n.get("b"), Some(&1));
        assert_eq!(n.len(), 2);
        assert_eq!(
            render_seconds("# x\noverkvm_exporter_render_duration_seconds 0.0042\n"),
            Some(0.0042)
        );
    }
}
