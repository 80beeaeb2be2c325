//! Cost per I/O and IOPS kept: fio on a loop device over /dev/shm with nothing attached (A),
//! with `overkvm-io serve` (B) and with the peer, bpftrace counting per PID (C), interleaved.
//!
//! The kernel's BPF run-time statistics cost every program run two clock reads, more for a tool
//! with several programs than for one with one: IOPS are measured with them off (as production
//! runs), and the cost per I/O in separate runs of B and C with them on (B', C').

use std::{collections::BTreeMap, fmt::Write as _, fs, process::Command, time::Duration};

use anyhow::Context as _;

use super::{
    BenchArgs, Ctx, Section, Target,
    stats::{self, FioResult, ProgDelta, ProgInfo, median, ns_per, percent, spread},
    sys::{self, Bpftrace, Daemon, LoopDev, Sysctl, Tracefs, progress},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cfg {
    A,
    B,
    C,
    /// B with BPF run-time statistics on, for the cost per I/O.
    BCost,
    /// C with BPF run-time statistics on.
    CCost,
}

impl Cfg {
    fn label(self) -> &'static str {
        match self {
            Cfg::A => "A: nothing attached",
            Cfg::B => "B: overkvm-io serve",
            Cfg::C => "C: peer (bpftrace)",
            Cfg::BCost => "B': overkvm-io serve, BPF stats on",
            Cfg::CCost => "C': peer, BPF stats on",
        }
    }

    /// Runs measuring BPF cost (statistics on); the others measure IOPS.
    fn cost(self) -> bool {
        matches!(self, Cfg::BCost | Cfg::CCost)
    }
}

const CONFIGS: [Cfg; 5] = [Cfg::A, Cfg::B, Cfg::C, Cfg::BCost, Cfg::CCost];
const RAMP_S: u64 = 1;
const SIZE_MIB: u64 = 512;
/// Program types that run on kernel events (other people's tracers slow every config alike).
const TRACING_KINDS: [&str; 6] = [
    "tracing",
    "raw_tracepoint",
    "raw_tracepoint_writable",
    "tracepoint",
    "kprobe",
    "perf_event",
];

struct Run {
    round: u64,
    cfg: Cfg,
    load1: f64,
    fio: FioResult,
    /// Block I/Os the kernel completed on the bench device, over the window the BPF
    /// statistics cover (fio's I/Os including its ramp).
    dev_ios: u64,
    /// Block I/Os on every whole disk over that window: every I/O the hooks saw.
    all_ios: u64,
    progs: Vec<ProgDelta>,
    /// Other people's tracing programs that ran during this run.
    foreign: Vec<String>,
}

impl Run {
    fn bpf_ns(&self) -> u64 {
        self.progs.iter().map(|p| p.run_time_ns).sum()
    }

    /// BPF nanoseconds per block I/O (all our programs, or the peer's).
    fn ns_per_io(&self) -> Option<f64> {
        ns_per(self.bpf_ns(), self.all_ios)
    }

    /// The same divided by fio's own count (post-ramp; an upper bound).
    fn ns_per_fio_io(&self) -> Option<f64> {
        ns_per(self.bpf_ns(), self.fio.ios)
    }
}

fn fio_args(dev: &str, seconds: u64) -> Vec<String> {
    [
        "--name=randread",
        &format!("--filename={dev}"),
        "--rw=randread",
        "--bs=4k",
        "--direct=1",
        "--ioengine=io_uring",
        "--iodepth=32",
        "--numjobs=1",
        "--time_based",
        &format!("--runtime={seconds}"),
        &format!("--ramp_time={RAMP_S}"),
        "--norandommap",
        "--randrepeat=0",
        "--output-format=json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

pub fn run(ctx: &Ctx, args: &BenchArgs) -> anyhow::Result<Section> {
    sys::require_tools(&["fio", "bpftool", "bpftrace", "losetup"])?;
    let load_start = sys::loadavg();
    let started = sys::utc_now();
    let tmp = sys::TempDir::new("io")?;
    // Guards, dropped in reverse: device, then the tracefs mount. Statistics are switched on
    // per cost run (and restored after it).
    let _tracefs = Tracefs::ensure()?;
    let _stats_off = Sysctl::set("kernel.bpf_stats_enabled", "0")?;
    progress(format!(
        "io: loop device over a {SIZE_MIB} MiB file in /dev/shm"
    ));
    let dev = LoopDev::new(SIZE_MIB, "io")?;
    let dev_name = dev.name();
    let disks = sys::whole_disks();
    let fio = fio_args(&dev.path.to_string_lossy(), args.seconds);
    let mut daemon_cmd = String::new();
    let mut runs = Vec::new();
    for round in 1..=args.rounds {
        for cfg in CONFIGS {
            sys::check_interrupt()?;
            let load1 = sys::load1();
            progress(format!(
                "io: round {round}/{}, {} (load {load1:.2})",
                args.rounds,
                cfg.label()
            ));
            let r = one_run(ctx, &tmp.0, &fio, &dev_name, &disks, cfg, &mut daemon_cmd)
                .with_context(|| format!("round {round}, {}", cfg.label()))?;
            let run = Run { round, load1, ..r };
            progress(format!(
                "io:   {:.0} IOPS{}{}",
                run.fio.iops,
                if !cfg.cost() {
                    String::new()
                } else {
                    format!(
                        "; BPF {} per I/O ({})",
                        fmt_ns(run.ns_per_io()),
                        run.progs
                            .iter()
                            .map(|p| format!(
                                "{} {}/event",
                                p.name,
                                fmt_ns(ns_per(p.run_time_ns, p.run_cnt))
                            ))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                },
                if run.foreign.is_empty() {
                    String::new()
                } else {
                    format!("; others' tracing programs ran: {}", run.foreign.join(", "))
                }
            ));
            runs.push(run);
            sys::sleep(Duration::from_secs(1))?;
        }
    }
    drop(dev);
    let load_end = sys::loadavg();
    Ok(report(
        ctx,
        args,
        &runs,
        &fio,
        &daemon_cmd,
        &started,
        &load_start,
        &load_end,
    ))
}

fn one_run(
    ctx: &Ctx,
    tmp: &std::path::Path,
    fio: &[String],
    dev_name: &str,
    disks: &std::collections::BTreeSet<String>,
    cfg: Cfg,
    daemon_cmd: &mut String,
) -> anyhow::Result<Run> {
    // Attach, and know which programs are the attached tool's.
    let mut daemon = None;
    let mut peer = None;
    let owner = match cfg {
        Cfg::A => None,
        Cfg::B | Cfg::BCost => {
            let d = Daemon::start(&ctx.overkvm, "1", &tmp.join("daemon.log"))?;
            if !d.wait_metrics(Duration::from_secs(5))? {
                progress("io:   (/metrics does not answer; measuring the programs anyway)");
            }
            *daemon_cmd = d.command.clone();
            let pid = d.pid();
            daemon = Some(d);
            Some(pid)
        }
        Cfg::C | Cfg::CCost => {
            let b = Bpftrace::start(&tmp.join("bpftrace.out"))?;
            let pid = b.pid();
            peer = Some(b);
            Some(pid)
        }
    };
    sys::sleep(Duration::from_secs(1))?;
    let ids = owner.map(|p| sys::owned_bpf_ids(p).0).unwrap_or_default();

    let stats = if cfg.cost() {
        Some(Sysctl::set("kernel.bpf_stats_enabled", "1")?)
    } else {
        None
    };
    let progs_before = sys::bpftool_progs()?;
    let disk_before = sys::diskstats();
    let out_path = tmp.join("fio.json");
    let err_path = tmp.join("fio.err");
    let mut child = Command::new("fio")
        .args(fio)
        .stdin(std::process::Stdio::null())
        .stdout(fs::File::create(&out_path)?)
        .stderr(fs::File::create(&err_path)?)
        .spawn()
        .context("starting fio")?;
    let limit = Duration::from_secs(fio_seconds(fio) + RAMP_S + 60);
    let st = sys::wait_child(&mut child, limit, "fio")?;
    let disk_after = sys::diskstats();
    let progs_after = sys::bpftool_progs()?;
    drop(stats);
    if let Some(mut d) = daemon.take() {
        if !d.alive() {
            anyhow::bail!("overkvm-io serve died during the run:\n{}", d.log_tail());
        }
        d.stop();
    }
    drop(peer);

    let out = fs::read_to_string(&out_path).unwrap_or_default();
    if !st.success() {
        anyhow::bail!(
            "fio failed ({st}): {}",
            fs::read_to_string(&err_path).unwrap_or_default().trim()
        );
    }
    let fio = stats::parse_fio(&out).map_err(anyhow::Error::msg)?;
    let one = |d: &str| std::collections::BTreeSet::from([d.to_string()]);
    Ok(Run {
        round: 0,
        cfg,
        load1: 0.0,
        fio,
        dev_ios: stats::diskstats_delta(&disk_before, &disk_after, &one(dev_name)),
        all_ios: stats::diskstats_delta(&disk_before, &disk_after, disks),
        progs: stats::prog_deltas(&progs_before, &progs_after, &ids),
        foreign: foreign_active(&progs_before, &progs_after, &ids),
    })
}

fn fio_seconds(fio: &[String]) -> u64 {
    fio.iter()
        .find_map(|a| a.strip_prefix("--runtime="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
}

/// Tracing programs not ours that ran between the two listings, as "name(id)".
fn foreign_active(before: &[ProgInfo], after: &[ProgInfo], ours: &[u32]) -> Vec<String> {
    let others: Vec<u32> = after
        .iter()
        .filter(|p| TRACING_KINDS.contains(&p.kind.as_str()) && !ours.contains(&p.id))
        .map(|p| p.id)
        .collect();
    stats::prog_deltas(before, after, &others)
        .into_iter()
        .filter(|d| d.run_cnt > 0)
        .map(|d| format!("{}({})", d.name, d.id))
        .collect()
}

fn fmt_ns(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.0} ns"))
        .unwrap_or_else(|| "n/a".into())
}

fn fmt_pct(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.1}%"))
        .unwrap_or_else(|| "n/a".into())
}

/// Per-program medians over the runs of one config: (name, ns/event, events per I/O, ns/I/O).
fn per_program(runs: &[&Run]) -> Vec<(String, f64, f64, f64)> {
    let mut by_name: BTreeMap<String, Vec<(f64, f64, f64)>> = BTreeMap::new();
    for r in runs {
        // Programs loaded but not attached (the bio hook on a host without bio-based devices,
        // the merge hooks when nothing merges) never ran: nothing to show.
        for p in r.progs.iter().filter(|p| p.run_cnt > 0) {
            let per_event = ns_per(p.run_time_ns, p.run_cnt).unwrap_or(f64::NAN);
            let events_per_io = if r.all_ios > 0 {
                p.run_cnt as f64 / r.all_ios as f64
            } else {
                f64::NAN
            };
            let per_io = ns_per(p.run_time_ns, r.all_ios).unwrap_or(f64::NAN);
            by_name
                .entry(p.name.clone())
                .or_default()
                .push((per_event, events_per_io, per_io));
        }
    }
    by_name
        .into_iter()
        .map(|(name, v)| {
            let col = |f: fn(&(f64, f64, f64)) -> f64| {
                median(&v.iter().map(f).collect::<Vec<_>>()).unwrap_or(f64::NAN)
            };
            (name, col(|t| t.0), col(|t| t.1), col(|t| t.2))
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn report(
    ctx: &Ctx,
    args: &BenchArgs,
    runs: &[Run],
    fio: &[String],
    daemon_cmd: &str,
    started: &str,
    load_start: &str,
    load_end: &str,
) -> Section {
    let of = |c: Cfg| runs.iter().filter(|r| r.cfg == c).collect::<Vec<_>>();
    let iops = |c: Cfg| of(c).iter().map(|r| r.fio.iops).collect::<Vec<_>>();
    let (a, b, c) = (iops(Cfg::A), iops(Cfg::B), iops(Cfg::C));
    let (ma, mb, mc) = (median(&a), median(&b), median(&c));
    let kept_b = ma.and_then(|ma| mb.and_then(|mb| percent(mb, ma)));
    let kept_c = ma.and_then(|ma| mc.and_then(|mc| percent(mc, ma)));
    let ns_list = |c: Cfg| {
        of(c)
            .iter()
            .filter_map(|r| r.ns_per_io())
            .collect::<Vec<_>>()
    };
    let ours = median(&ns_list(Cfg::BCost));
    let peer = median(&ns_list(Cfg::CCost));
    // Paired ratios: each round's B and C against the same round's A.
    let paired = |c: Cfg| {
        (1..=args.rounds)
            .filter_map(|round| {
                let get = |cfg: Cfg| {
                    runs.iter()
                        .find(|r| r.round == round && r.cfg == cfg)
                        .map(|r| r.fio.iops)
                };
                percent(get(c)?, get(Cfg::A)?)
            })
            .collect::<Vec<_>>()
    };
    let (paired_b, paired_c) = (paired(Cfg::B), paired(Cfg::C));

    let targets = vec![
        Target::new(
            "io: ns per I/O, all overkvm programs <= the peer's",
            "<= peer",
            format!("{} vs {}", fmt_ns(ours), fmt_ns(peer)),
            ours.zip(peer).map(|(o, p)| o <= p),
        ),
        Target::new(
            "io: IOPS kept with overkvm-io serve >= 95%",
            ">= 95%",
            fmt_pct(kept_b),
            kept_b.map(|k| k >= 95.0),
        ),
        Target::new(
            "io: IOPS kept with overkvm >= with the peer",
            ">= peer",
            format!("{} vs {}", fmt_pct(kept_b), fmt_pct(kept_c)),
            kept_b.zip(kept_c).map(|(b, c)| b >= c),
        ),
    ];
    let noisy = runs.iter().any(|r| !r.foreign.is_empty());

    let mut md = String::new();
    let _ = writeln!(
        md,
        "## 1. Cost per I/O and IOPS kept (fio on a loop device)\n"
    );
    let _ = writeln!(md, "{}", ctx.run_facts(started, load_start, load_end));
    let _ = writeln!(
        md,
        "Setup: a loop device over a {SIZE_MIB} MiB file in /dev/shm (filled with data), \
         {} interleaved rounds of A B C B' C', each run {} s after a {RAMP_S} s ramp. A, B and C \
         run with `kernel.bpf_stats_enabled=0`, as production does (`serve` leaves the \
         statistics off unless given `--bpf-stats`: they cost every BPF program two clock reads \
         per run, which would tax a tool with several programs more than the one-program peer): \
         their IOPS give \"IOPS kept\". B' and C' repeat B and C with the statistics on, for \
         the nanoseconds per I/O. The sysctl is restored after the section.\n",
        args.rounds, args.seconds
    );
    let _ = writeln!(md, "- fio: `fio {}`", fio.join(" "));
    let _ = writeln!(
        md,
        "- B: `{}` (as production runs it; started before and stopped after each run)",
        if daemon_cmd.is_empty() {
            "overkvm-io serve --listen 127.0.0.1:PORT -i 1"
        } else {
            daemon_cmd
        }
    );
    let _ = writeln!(md, "- C: `bpftrace -e '{}'`", sys::PEER_PROGRAM);
    let _ = writeln!(
        md,
        "- BPF cost: `bpftool prog show -j` before and after each fio run; Σ Δrun_time_ns of the \
         programs the attached process holds open (from /proc/PID/fdinfo), divided by the block \
         I/Os the kernel completed on every whole disk over the same window (/proc/diskstats: \
         the I/Os the hooks saw; on a quiet machine that is fio's own count plus its ramp). \
         \"per fio I/O\" divides by fio's post-ramp count instead (an upper bound).\n"
    );
    let _ = writeln!(
        md,
        "| round | config | load1 | IOPS | fio I/Os | I/Os on the loop device | I/Os all disks | BPF ns per I/O | per fio I/O |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|");
    for r in runs {
        let _ = writeln!(
            md,
            "| {} | {} | {:.2} | {:.0} | {} | {} | {} | {} | {} |",
            r.round,
            r.cfg.label(),
            r.load1,
            r.fio.iops,
            r.fio.ios,
            r.dev_ios,
            r.all_ios,
            if r.cfg.cost() {
                fmt_ns(r.ns_per_io())
            } else {
                "-".into()
            },
            if r.cfg.cost() {
                fmt_ns(r.ns_per_fio_io())
            } else {
                "-".into()
            },
        );
    }
    let _ = writeln!(md);
    let _ = writeln!(
        md,
        "| config | median IOPS | min | max | spread (max-min)/median | IOPS kept (median/median A) | paired per round | BPF ns per I/O (median of B', C') |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
    for (cfg, v, kept, paired, ns) in [
        (Cfg::A, &a, Some(100.0), Vec::new(), None),
        (Cfg::B, &b, kept_b, paired_b.clone(), ours),
        (Cfg::C, &c, kept_c, paired_c.clone(), peer),
    ] {
        let s = spread(v);
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {} |",
            cfg.label(),
            median(v).unwrap_or(f64::NAN),
            s.map(|s| s.min).unwrap_or(f64::NAN),
            s.map(|s| s.max).unwrap_or(f64::NAN),
            fmt_pct(s.map(|s| s.range_pct)),
            fmt_pct(kept),
            if paired.is_empty() {
                "-".into()
            } else {
                paired
                    .iter()
                    .map(|p| format!("{p:.1}%"))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
            if cfg == Cfg::A {
                "-".into()
            } else {
                fmt_ns(ns)
            },
        );
    }
    let _ = writeln!(md);
    let _ = writeln!(
        md,
        "Per program (medians over the runs; events per I/O = Δrun_cnt / block I/Os):\n"
    );
    let _ = writeln!(
        md,
        "| who | program | ns per event | events per I/O | ns per I/O |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|");
    let mut costliest: Option<(String, f64)> = None;
    for (who, cfg) in [("overkvm", Cfg::BCost), ("peer", Cfg::CCost)] {
        for (name, per_event, per_io_events, per_io) in per_program(&of(cfg)) {
            let _ = writeln!(
                md,
                "| {who} | {name} | {per_event:.0} | {per_io_events:.2} | {per_io:.0} |"
            );
            if cfg == Cfg::BCost && costliest.as_ref().is_none_or(|(_, c)| per_io > *c) {
                costliest = Some((name.clone(), per_io));
            }
        }
    }
    let _ = writeln!(md);
    if let Some((name, ns)) = &costliest {
        let _ = writeln!(
            md,
            "Costliest overkvm program per I/O: `{name}` ({ns:.0} ns per I/O).\n"
        );
    }
    if noisy {
        let _ = writeln!(
            md,
            "Note: other people's tracing programs ran during some runs (listed below); they \
             slow A, B and C alike but add noise.\n"
        );
        for r in runs.iter().filter(|r| !r.foreign.is_empty()) {
            let _ = writeln!(
                md,
                "- round {} {}: {}",
                r.round,
                r.cfg.label(),
                r.foreign.join(", ")
            );
        }
        let _ = writeln!(md);
    }
    md.push_str(&Target::table(&targets));
    Section {
        name: "io",
        markdown: md,
        targets,
    }
}
