//! Cost per I/O and IOPS kept: fio on a loop device over /dev/shm with nothing attached (A),
//! with `overkvm-io serve` (B), with the one-program peer, bpftrace counting per PID (C), and
//! with the "same work" peer, bpftrace counting per PID with a latency histogram (D), in
//! interleaved rounds whose order rotates, so each round's B, C and D pair with its own A.
//!
//! The kernel's BPF run-time statistics cost every program run two clock reads, more for a tool
//! with several programs than for one with one: IOPS are measured with them off (as production
//! runs), and the cost per I/O in separate runs with them on (B', C', D').
//!
//! The attached tool runs on CPU 0 and fio on CPU 1 (when there are two): the programs run in
//! fio's context on submission and wherever the device completes, the daemon's own work never
//! shares fio's CPU, and every run places them alike.

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
    D,
    /// B with BPF run-time statistics on, for the cost per I/O.
    BCost,
    /// C with BPF run-time statistics on.
    CCost,
    /// D with BPF run-time statistics on.
    DCost,
}

impl Cfg {
    fn label(self) -> &'static str {
        match self {
            Cfg::A => "A: nothing attached",
            Cfg::B => "B: overkvm-io serve",
            Cfg::C => "C: one-program peer (bpftrace)",
            Cfg::D => "D: same-work peer (bpftrace)",
            Cfg::BCost => "B': overkvm-io serve, BPF stats on",
            Cfg::CCost => "C': one-program peer, BPF stats on",
            Cfg::DCost => "D': same-work peer, BPF stats on",
        }
    }

    /// Runs measuring BPF cost (statistics on); the others measure IOPS.
    fn cost(self) -> bool {
        matches!(self, Cfg::BCost | Cfg::CCost | Cfg::DCost)
    }
}

/// The IOPS configurations of one round, rotated by round so no config always runs first or
/// last (a drift within the round then spreads over all of them), then the cost runs.
fn round_order(round: u64) -> Vec<Cfg> {
    let mut iops = [Cfg::A, Cfg::B, Cfg::C, Cfg::D];
    iops.rotate_left(((round.saturating_sub(1)) % 4) as usize);
    let mut order = iops.to_vec();
    order.extend([Cfg::BCost, Cfg::CCost, Cfg::DCost]);
    order
}

/// CPUs of the attached tool and of fio, when the machine has two or more.
fn cpu_plan() -> Option<(usize, usize)> {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    (n >= 2).then_some((0, 1))
}
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

fn fio_args(dev: &str, seconds: u64, cpu: Option<usize>) -> Vec<String> {
    let mut args: Vec<String> = [
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
    .collect();
    if let Some(cpu) = cpu {
        args.push(format!("--cpus_allowed={cpu}"));
    }
    args
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
    let cpus = cpu_plan();
    let fio = fio_args(&dev.path.to_string_lossy(), args.seconds, cpus.map(|c| c.1));
    let mut daemon_cmd = String::new();
    let mut runs = Vec::new();
    for round in 1..=args.io_rounds {
        for cfg in round_order(round) {
            sys::check_interrupt()?;
            let load1 = sys::load1();
            progress(format!(
                "io: round {round}/{}, {} (load {load1:.2})",
                args.io_rounds,
                cfg.label()
            ));
            let place = RunPlace {
                tmp: &tmp.0,
                fio: &fio,
                dev_name: &dev_name,
                disks: &disks,
                tool_cpu: cpus.map(|c| c.0),
            };
            let r = one_run(ctx, &place, cfg, &mut daemon_cmd)
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
        cpus,
        &started,
        &load_start,
        &load_end,
    ))
}

/// Where every run happens: the same for all of them.
struct RunPlace<'a> {
    tmp: &'a std::path::Path,
    fio: &'a [String],
    dev_name: &'a str,
    disks: &'a std::collections::BTreeSet<String>,
    tool_cpu: Option<usize>,
}

fn one_run(ctx: &Ctx, place: &RunPlace, cfg: Cfg, daemon_cmd: &mut String) -> anyhow::Result<Run> {
    let RunPlace {
        tmp,
        fio,
        dev_name,
        disks,
        tool_cpu,
    } = *place;
    // Attach, and know which programs are the attached tool's.
    let mut daemon = None;
    let mut peer = None;
    let owner = match cfg {
        Cfg::A => None,
        Cfg::B | Cfg::BCost => {
            let d = Daemon::start_on(&ctx.overkvm, "1", &tmp.join("daemon.log"), tool_cpu)?;
            if !d.wait_metrics(Duration::from_secs(5))? {
                progress("io:   (/metrics does not answer; measuring the programs anyway)");
            }
            *daemon_cmd = d.command.clone();
            let pid = d.pid();
            daemon = Some(d);
            Some(pid)
        }
        Cfg::C | Cfg::CCost | Cfg::D | Cfg::DCost => {
            let program = if matches!(cfg, Cfg::C | Cfg::CCost) {
                sys::PEER_PROGRAM
            } else {
                sys::SAME_WORK_PROGRAM
            };
            let b = Bpftrace::start(program, &tmp.join("bpftrace.out"), tool_cpu)?;
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

/// A median paired ratio (a config's IOPS over the same round's A, in percent) with its 95%
/// interval.
struct Kept {
    ratios: Vec<f64>,
    median: Option<f64>,
    ci: Option<stats::MedianCi>,
}

impl Kept {
    fn of(runs: &[Run], cfg: Cfg) -> Kept {
        let rounds: std::collections::BTreeSet<u64> = runs.iter().map(|r| r.round).collect();
        let ratios: Vec<f64> = rounds
            .into_iter()
            .filter_map(|round| {
                let get = |c: Cfg| {
                    runs.iter()
                        .find(|r| r.round == round && r.cfg == c)
                        .map(|r| r.fio.iops)
                };
                percent(get(cfg)?, get(Cfg::A)?)
            })
            .collect();
        Kept {
            median: median(&ratios),
            ci: stats::median_ci(&ratios, 0.95),
            ratios,
        }
    }

    fn text(&self) -> String {
        match (self.median, self.ci) {
            (Some(m), Some(ci)) => format!(
                "{m:.1}% ({:.1}-{:.1}, width {:.1} points, {:.1}% interval)",
                ci.low,
                ci.high,
                ci.width(),
                100.0 * ci.coverage
            ),
            (Some(m), None) => format!("{m:.1}% (too few rounds for a 95% interval)"),
            _ => "n/a".into(),
        }
    }
}

fn targets(
    ours: Option<f64>,
    one: Option<f64>,
    same: Option<f64>,
    kept: &[Kept; 3],
) -> Vec<Target> {
    let [kb, kc, _] = kept;
    vec![
        Target::new(
            "io: ns per I/O, all overkvm programs <= half the one-program peer's",
            "<= peer / 2",
            format!("{} vs {} / 2", fmt_ns(ours), fmt_ns(one)),
            ours.zip(one).map(|(o, p)| o <= p / 2.0),
        ),
        Target::new(
            "io: ns per I/O, all overkvm programs <= the same-work peer's",
            "<= same-work peer",
            format!("{} vs {}", fmt_ns(ours), fmt_ns(same)),
            ours.zip(same).map(|(o, p)| o <= p),
        ),
        Target::new(
            "io: IOPS kept with overkvm-io serve >= 97% (median paired ratio)",
            ">= 97%",
            kb.text(),
            kb.median.map(|k| k >= 97.0),
        ),
        Target::new(
            "io: 95% interval of IOPS kept narrower than 5 points",
            "< 5 points",
            kb.ci
                .map(|ci| format!("{:.1} points", ci.width()))
                .unwrap_or_else(|| "no interval".into()),
            kb.ci.map(|ci| ci.width() < 5.0),
        ),
        Target::new(
            "io: IOPS kept with overkvm >= with the one-program peer",
            ">= peer",
            format!("{} vs {}", fmt_pct(kb.median), fmt_pct(kc.median)),
            kb.median.zip(kc.median).map(|(b, c)| b >= c),
        ),
    ]
}

#[allow(clippy::too_many_arguments)]
fn report(
    ctx: &Ctx,
    args: &BenchArgs,
    runs: &[Run],
    fio: &[String],
    daemon_cmd: &str,
    cpus: Option<(usize, usize)>,
    started: &str,
    load_start: &str,
    load_end: &str,
) -> Section {
    let of = |c: Cfg| runs.iter().filter(|r| r.cfg == c).collect::<Vec<_>>();
    let iops = |c: Cfg| of(c).iter().map(|r| r.fio.iops).collect::<Vec<_>>();
    let ns = |c: Cfg| {
        median(
            &of(c)
                .iter()
                .filter_map(|r| r.ns_per_io())
                .collect::<Vec<_>>(),
        )
    };
    let (ours, one, same) = (ns(Cfg::BCost), ns(Cfg::CCost), ns(Cfg::DCost));
    let kept = [
        Kept::of(runs, Cfg::B),
        Kept::of(runs, Cfg::C),
        Kept::of(runs, Cfg::D),
    ];
    let targets = targets(ours, one, same, &kept);
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
         {} rounds; each round runs A, B, C and D (in an order rotated by round, so each of \
         them pairs with its own round's A) and then B', C' and D', each run {} s after a \
         {RAMP_S} s ramp. A to D run with `kernel.bpf_stats_enabled=0`, as production does \
         (`serve` leaves the statistics off unless given `--bpf-stats`: they cost every BPF \
         program two clock reads per run, which would tax a tool with several programs more \
         than a one-program peer): their IOPS give \"IOPS kept\", the median over rounds of \
         each round's ratio to A, with a distribution-free 95% interval from the order \
         statistics. B', C' and D' repeat B, C and D with the statistics on, for the \
         nanoseconds per I/O. The sysctl is restored after the section.\n",
        args.io_rounds, args.seconds
    );
    let _ = writeln!(
        md,
        "- CPUs: {}",
        match cpus {
            Some((tool, fio_cpu)) => format!(
                "the attached tool (daemon or bpftrace) is pinned to CPU {tool} and fio to CPU \
                 {fio_cpu} (`--cpus_allowed`); the programs run in fio's context at submission \
                 and wherever the loop device's worker completes"
            ),
            None => "one CPU: nothing pinned".into(),
        }
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
    let _ = writeln!(md, "- D: `bpftrace -e '{}'`", sys::SAME_WORK_PROGRAM);
    let _ = writeln!(
        md,
        "- BPF cost: `bpftool prog show -j` before and after each fio run; Σ Δrun_time_ns of the \
         programs the attached process holds open (from /proc/PID/fdinfo), divided by the block \
         I/Os the kernel completed on every whole disk over the same window (/proc/diskstats: \
         the I/Os the hooks saw; on a quiet machine that is fio's own count plus its ramp). \
         \"per fio I/O\" divides by fio's post-ramp count instead (an upper bound).\n"
    );
    runs_table(&mut md, runs);
    let _ = writeln!(
        md,
        "| config | median IOPS | min | max | spread (max-min)/median | IOPS kept: median paired ratio (95% interval) | paired per round | BPF ns per I/O (median of the cost runs) |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
    for (cfg, k, ns) in [
        (Cfg::A, None, None),
        (Cfg::B, Some(&kept[0]), ours),
        (Cfg::C, Some(&kept[1]), one),
        (Cfg::D, Some(&kept[2]), same),
    ] {
        let v = iops(cfg);
        let s = spread(&v);
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {} |",
            cfg.label(),
            median(&v).unwrap_or(f64::NAN),
            s.map(|s| s.min).unwrap_or(f64::NAN),
            s.map(|s| s.max).unwrap_or(f64::NAN),
            fmt_pct(s.map(|s| s.range_pct)),
            k.map_or("-".into(), Kept::text),
            k.map_or("-".into(), |k| k
                .ratios
                .iter()
                .map(|p| format!("{p:.1}%"))
                .collect::<Vec<_>>()
                .join(", ")),
            if cfg == Cfg::A {
                "-".into()
            } else {
                fmt_ns(ns)
            },
        );
    }
    let _ = writeln!(md);
    programs_table(&mut md, runs);
    if noisy {
        let _ = writeln!(
            md,
            "Note: other people's tracing programs ran during some runs (listed below); they \
             slow every config alike but add noise.\n"
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

/// Every run, in the order they ran.
fn runs_table(md: &mut String, runs: &[Run]) {
    let _ = writeln!(
        md,
        "| round | config | load1 | IOPS | fio I/Os | I/Os on the loop device | I/Os all disks | BPF ns per I/O | per fio I/O |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|");
    for r in runs {
        let cost = |v: Option<f64>| if r.cfg.cost() { fmt_ns(v) } else { "-".into() };
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
            cost(r.ns_per_io()),
            cost(r.ns_per_fio_io()),
        );
    }
    let _ = writeln!(md);
}

/// Each program's cost, and overkvm's costliest.
fn programs_table(md: &mut String, runs: &[Run]) {
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
    for (who, cfg) in [
        ("overkvm", Cfg::BCost),
        ("one-program peer", Cfg::CCost),
        ("same-work peer", Cfg::DCost),
    ] {
        let of: Vec<&Run> = runs.iter().filter(|r| r.cfg == cfg).collect();
        for (name, per_event, per_io_events, per_io) in per_program(&of) {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_round_runs_each_config_once_and_rotates_who_goes_first() {
        let firsts: Vec<Cfg> = (1..=4).map(|r| round_order(r)[0]).collect();
        assert_eq!(firsts, [Cfg::A, Cfg::B, Cfg::C, Cfg::D]);
        for round in 1..=9 {
            let order = round_order(round);
            assert_eq!(order.len(), 7);
            for cfg in [
                Cfg::A,
                Cfg::B,
                Cfg::C,
                Cfg::D,
                Cfg::BCost,
                Cfg::CCost,
                Cfg::DCost,
            ] {
                assert_eq!(order.iter().filter(|c| **c == cfg).count(), 1, "{cfg:?}");
            }
        }
    }
}
