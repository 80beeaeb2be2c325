//! `cargo xtask bench [io|scale|throttle|all]`: what overkvm costs per I/O and at scale, and how
//! the throttle holds a budget and a latency target. Prints progress and figures, checks the targets (PASS/MISS) and writes
//! BENCHMARKS.md: the machine, the load, the exact commands, every run's raw numbers, medians
//! and spread. Everything it sets up (loop devices, processes, the tracefs mount, the sysctl)
//! is undone on exit, on errors and on Ctrl-C.
//!
//! - `io`: cost per I/O and IOPS kept (fio; nothing / overkvm-io serve / bpftrace peer).
//! - `scale`: the daemon with 300 trickling VMs (CPU, RSS), `/metrics` with 1000 VMs.
//! - `throttle`: the cgroup v1 throttle test, repeated, against the targets of issue 5; then
//!   the latency target's scenario in the 6.1 guest (issue 17) against a fixed budget and no
//!   throttle.
//! - `http`: `/metrics` under 1000 scraping clients and slow or hostile ones (issue 9): tick
//!   lateness, scrapes/s and latency, daemon RSS.
//!
//! `stats` holds the pure parts (statistics, parsers, the report merge), unit-tested; `sys`
//! the guards and readers that touch the machine.

mod http;
mod io;
mod latency;
mod scale;
mod stats;
mod sys;
mod throttle;

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Which {
    Io,
    Scale,
    Throttle,
    Http,
    All,
}

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Which benchmark to run.
    #[arg(value_enum, default_value = "all")]
    pub which: Which,
    /// throttle, http and latency: runs of each.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    pub rounds: u64,
    /// io: interleaved, paired rounds (A, B, C, D, then B', C', D'); 9 or more give a 95%
    /// interval of the median paired ratio.
    #[arg(long, default_value_t = 9, value_parser = clap::value_parser!(u64).range(1..))]
    pub io_rounds: u64,
    /// io: seconds each fio run measures (after a 1 s ramp).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub seconds: u64,
    /// scale: VMs doing a trickle of I/O.
    #[arg(long, default_value_t = 300)]
    pub vms: usize,
    /// scale: I/Os per second of each trickling VM.
    #[arg(long, default_value_t = 2.0)]
    pub trickle_iops: f64,
    /// scale: busy VMs besides them.
    #[arg(long, default_value_t = 10)]
    pub busy: usize,
    /// scale: I/Os per second of each busy VM.
    #[arg(long, default_value_t = 200.0)]
    pub busy_iops: f64,
    /// scale: seconds over which the daemon's CPU and RSS are measured.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub window: u64,
    /// scale: VMs present for the scrape latency measurement.
    #[arg(long, default_value_t = 1000)]
    pub scrape_vms: usize,
    /// scale: sequential scrapes of /metrics.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..))]
    pub scrapes: u64,
    /// Where the report goes (relative to the workspace root).
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub out: PathBuf,
}

impl BenchArgs {
    fn runs(&self, w: Which) -> bool {
        self.which == Which::All || self.which == w
    }

    /// The command line that reproduces this run (with the options that matter to it).
    fn invocation(&self) -> String {
        let which = match self.which {
            Which::Io => "io",
            Which::Scale => "scale",
            Which::Throttle => "throttle",
            Which::Http => "http",
            Which::All => "all",
        };
        let mut s = format!("cargo xtask bench {which}");
        if self.runs(Which::Throttle) || self.runs(Which::Http) {
            let _ = write!(s, " --rounds {}", self.rounds);
        }
        if self.runs(Which::Io) {
            let _ = write!(
                s,
                " --io-rounds {} --seconds {}",
                self.io_rounds, self.seconds
            );
        }
        if self.runs(Which::Scale) {
            let _ = write!(
                s,
                " --vms {} --trickle-iops {} --busy {} --busy-iops {} --window {} --scrape-vms {} --scrapes {}",
                self.vms,
                self.trickle_iops,
                self.busy,
                self.busy_iops,
                self.window,
                self.scrape_vms,
                self.scrapes
            );
        }
        s
    }
}

/// What every benchmark shares: pinned copies of the binaries, the machine, the invocation.
pub struct Ctx {
    /// overkvm-io and iogen copied at the start, so a concurrent rebuild cannot swap them
    /// between runs.
    pub overkvm: PathBuf,
    pub iogen: PathBuf,
    pub machine: sys::Machine,
    pub invocation: String,
    _bins: sys::TempDir,
}

impl Ctx {
    /// The run's facts, as a Markdown list.
    fn run_facts(&self, started: &str, load_start: &str, load_end: &str) -> String {
        let m = &self.machine;
        format!(
            "- when: {started}; command: `{}` (commit {})\n\
             - machine: {}; CPU {} x {}; memory {}\n\
             - load average (1 5 15 min): {load_start} at start, {load_end} at end\n\
             - tools: {}; {}; {}\n",
            self.invocation,
            m.commit,
            m.kernel,
            m.cores,
            m.cpu,
            m.memory,
            sys::tool_version("fio", "--version"),
            sys::tool_version("bpftrace", "--version"),
            sys::tool_version("bpftool", "version"),
        )
    }
}

/// One benchmark's results: Markdown for BENCHMARKS.md and the targets it checked.
pub struct Section {
    pub name: &'static str,
    pub markdown: String,
    pub targets: Vec<Target>,
}

pub struct Target {
    pub what: String,
    pub want: String,
    pub got: String,
    /// None: not measured.
    pub pass: Option<bool>,
}

impl Target {
    pub fn new(what: &str, want: &str, got: String, pass: Option<bool>) -> Target {
        Target {
            what: what.into(),
            want: want.into(),
            got,
            pass,
        }
    }

    pub fn verdict(&self) -> &'static str {
        match self.pass {
            Some(true) => "PASS",
            Some(false) => "MISS",
            None => "n/a",
        }
    }

    pub fn table(targets: &[Target]) -> String {
        let mut s = String::from("| target | wanted | got | verdict |\n|---|---|---|---|\n");
        for t in targets {
            let _ = writeln!(
                s,
                "| {} | {} | {} | **{}** |",
                t.what,
                t.want,
                t.got,
                t.verdict()
            );
        }
        s
    }
}

const HEADER: &str = "# Benchmarks\n\n\
Generated by `cargo xtask bench` (xtask/src/bench.rs); never edit the figures by hand. Each \
section records the machine, the load average, the exact commands and every run's raw numbers; \
`cargo xtask bench io|scale|throttle` regenerates one section and keeps the others.\n\n\
Shared development VMs are noisy (other builds and tests run beside the bench; see each \
section's load average): compare the interleaved medians and the ratios within one run, not \
absolute figures across runs.";

type BenchFn = fn(&Ctx, &BenchArgs) -> anyhow::Result<Section>;

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    if !crate::is_root() {
        bail!(
            "the benchmarks load eBPF programs, create loop devices and set sysctls: run them as \
             root (sudo -E cargo xtask bench)"
        );
    }
    sys::install_signal_handlers();
    let root = crate::workspace_root();
    sys::progress(format!(
        "load average at start: {} ({} cores)",
        sys::loadavg(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    ));
    if args.runs(Which::Scale) || args.runs(Which::Http) {
        sys::progress("building iogen (waits while another cargo holds the build lock)");
        let mut c = crate::cargo();
        c.args([
            "build",
            "--release",
            "-p",
            "overkvm-tests",
            "--bin",
            "iogen",
        ]);
        crate::check(c, "cargo build iogen")?;
    }
    let bins = sys::TempDir::new("bin")?;
    let pin = |name: &str| -> anyhow::Result<PathBuf> {
        let from = root.join("target/release").join(name);
        let to = bins.0.join(name);
        if from.exists() {
            fs::copy(&from, &to).with_context(|| format!("copying {}", from.display()))?;
        }
        Ok(to)
    };
    let ctx = Ctx {
        overkvm: pin("overkvm-io")?,
        iogen: pin("iogen")?,
        machine: sys::Machine::probe(&root),
        invocation: args.invocation(),
        _bins: bins,
    };

    let mut sections = Vec::new();
    let mut failures = Vec::new();
    let benches: [(Which, BenchFn); 4] = [
        (Which::Io, io::run),
        (Which::Scale, scale::run),
        (Which::Throttle, throttle::run),
        (Which::Http, http::run),
    ];
    for (w, f) in benches {
        if !args.runs(w) {
            continue;
        }
        match f(&ctx, args) {
            Ok(s) => {
                print_targets(&s.targets);
                sections.push(s);
            }
            Err(e) => {
                if sys::check_interrupt().is_err() {
                    write_report(&root, &args.out, &sections)?;
                    return Err(e);
                }
                eprintln!("bench: {w:?} failed: {e:#}");
                failures.push(format!("{w:?}: {e:#}"));
            }
        }
    }
    write_report(&root, &args.out, &sections)?;
    let all: Vec<&Target> = sections.iter().flat_map(|s| &s.targets).collect();
    if !all.is_empty() {
        eprintln!("\nbench: summary");
        for t in &all {
            eprintln!(
                "  {:4}  {}: {} (wanted {})",
                t.verdict(),
                t.what,
                t.got,
                t.want
            );
        }
    }
    if !failures.is_empty() {
        bail!("benchmarks failed:\n{}", failures.join("\n"));
    }
    Ok(())
}

fn print_targets(targets: &[Target]) {
    for t in targets {
        sys::progress(format!(
            "{}  {}: {} (wanted {})",
            t.verdict(),
            t.what,
            t.got,
            t.want
        ));
    }
}

pub(crate) fn write_report(root: &Path, out: &Path, sections: &[Section]) -> anyhow::Result<()> {
    if sections.is_empty() {
        return Ok(());
    }
    let path = root.join(out);
    let existing = fs::read_to_string(&path).ok();
    let new: Vec<(&str, String)> = sections
        .iter()
        .map(|s| (s.name, s.markdown.clone()))
        .collect();
    let text = stats::merge_report(HEADER, existing.as_deref(), &new);
    fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    sys::progress(format!("wrote {}", path.display()));
    Ok(())
}

/// Runs a command, its output to `log`, polling for stop signals; true on success.
pub(crate) fn run_logged(
    mut cmd: Command,
    log: &Path,
    timeout: std::time::Duration,
    what: &str,
) -> anyhow::Result<bool> {
    let f = fs::File::create(log)?;
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f)
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    Ok(sys::wait_child(&mut child, timeout, what)?.success())
}
