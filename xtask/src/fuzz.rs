//! `cargo xtask fuzz [--seconds N] [TARGET]`: coverage-guided fuzzing (cargo fuzz, libFuzzer)
//! of every parser of input overkvm does not control. The targets live in `fuzz/` (its own
//! workspace, built with nightly); each runs for N seconds, then the executions, corpus,
//! coverage and crashes are printed and written into BENCHMARKS.md (the `fuzz` section).
//!
//! Seeds are committed under `fuzz/corpus/TARGET`; what the fuzzer finds goes to
//! `fuzz/target/corpus/TARGET` (git-ignored, kept between runs), crashes to
//! `fuzz/artifacts/TARGET`.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};

#[derive(clap::Args, Debug)]
pub struct FuzzArgs {
    /// Seconds each target runs (libFuzzer's -max_total_time).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub seconds: u64,
    /// Run only this target (default: all of them, one after the other).
    pub target: Option<String>,
    /// Where the report goes (relative to the workspace root).
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub out: PathBuf,
}

const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// A target that takes longer than this on one input is reported as a hang.
const TIMEOUT_S: u64 = 10;

/// One target's run, from libFuzzer's output.
#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    pub runs: Option<u64>,
    pub seconds: Option<u64>,
    pub exec_per_s: Option<u64>,
    /// Corpus entries (and their total bytes) at the end.
    pub corpus: Option<(u64, String)>,
    /// Coverage counters hit ("cov:").
    pub cov: Option<u64>,
    /// The input that made it fail (crash, timeout, out-of-memory).
    pub artifact: Option<String>,
    /// What went wrong: libFuzzer's error line and the panic message, if any.
    pub failure: Option<String>,
}

/// Reads libFuzzer's output: the `Done N runs in S second(s)` line, the final stats
/// (`-print_final_stats=1`), the last status line and, on failure, the artifact.
pub fn parse_log(log: &str) -> Outcome {
    let mut o = Outcome::default();
    let mut panic = None;
    let mut error = None;
    let mut lines = log.lines().peekable();
    while let Some(line) = lines.next() {
        let l = line.trim();
        if let Some(rest) = l.strip_prefix("Done ") {
            let mut w = rest.split_whitespace();
            o.runs = w.next().and_then(|n| n.parse().ok());
            o.seconds = w.nth(2).and_then(|n| n.parse().ok());
        } else if let Some(v) = l.strip_prefix("stat::number_of_executed_units:") {
            o.runs = o.runs.or_else(|| v.trim().parse().ok());
        } else if let Some(v) = l.strip_prefix("stat::average_exec_per_sec:") {
            o.exec_per_s = v.trim().parse().ok();
        } else if l.starts_with('#') {
            if let Some(c) = field(l, "corp:") {
                o.corpus = c
                    .split_once('/')
                    .and_then(|(n, b)| Some((n.parse().ok()?, b.to_string())));
            }
            if let Some(c) = field(l, "cov:") {
                o.cov = c.parse().ok();
            }
        } else if let Some(i) = l.find("Test unit written to ") {
            o.artifact = Some(l[i + "Test unit written to ".len()..].trim().to_string());
        } else if let Some(i) = l.find("ERROR: libFuzzer: ") {
            error.get_or_insert_with(|| l[i + "ERROR: libFuzzer: ".len()..].to_string());
        } else if l.starts_with("ERROR: AddressSanitizer") || l.contains("==ERROR: ") {
            error.get_or_insert_with(|| l.to_string());
        } else if l.starts_with("thread '") && l.contains("panicked at") {
            // The message is on the next line (Rust >= 1.73).
            let msg = lines.peek().map(|m| m.trim()).unwrap_or("");
            panic.get_or_insert_with(|| format!("{l} {msg}"));
        }
    }
    o.failure = match (error, panic) {
        (Some(e), Some(p)) => Some(format!("{e}: {p}")),
        (e, p) => e.or(p),
    };
    o
}

/// The value after `key` in a libFuzzer status line (`cov: 155 ft: 349 corp: 136/1688b`).
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let mut w = line.split_whitespace();
    w.find(|t| *t == key)?;
    w.next()
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stdin(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `cargo +nightly ...` in the workspace root, without the variables the outer `cargo xtask`
/// set (they would pin the stable toolchain), and without building the eBPF object.
fn cargo_nightly(root: &Path) -> Command {
    let mut c = Command::new("cargo");
    c.arg("+nightly")
        .current_dir(root)
        .env_remove("CARGO")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTFLAGS")
        .env("AYA_BUILD_SKIP", "1");
    c
}

/// cargo-fuzz and the nightly toolchain, installed when missing (saying so).
fn tools(root: &Path) -> anyhow::Result<()> {
    if output(Command::new("rustup").args(["run", "nightly", "rustc", "-V"])).is_none() {
        eprintln!("==> installing the nightly Rust toolchain (cargo fuzz needs it)");
        crate::check(
            {
                let mut c = Command::new("rustup");
                c.args(["toolchain", "install", "nightly", "--profile", "minimal"]);
                c
            },
            "rustup toolchain install nightly",
        )?;
    }
    if output(cargo_nightly(root).args(["fuzz", "--version"])).is_none() {
        eprintln!(
            "==> installing cargo-fuzz {CARGO_FUZZ_VERSION} \
             (cargo install cargo-fuzz --version {CARGO_FUZZ_VERSION} --locked; about 30 s)"
        );
        let mut c = Command::new("cargo");
        c.env_remove("RUSTUP_TOOLCHAIN").args([
            "install",
            "cargo-fuzz",
            "--version",
            CARGO_FUZZ_VERSION,
            "--locked",
        ]);
        crate::check(c, "cargo install cargo-fuzz")?;
    }
    Ok(())
}

/// The machine and toolchain, as a Markdown list (like the bench sections).
fn facts(root: &Path, invocation: &str, started: &str, load_start: &str) -> String {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|v| v.split_once(':'))
        .map_or("?", |(_, v)| v.trim());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kib: u64 = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let q = |c: &mut Command| output(c).unwrap_or_else(|| "?".into());
    format!(
        "- when: {started}; command: `{invocation}` (commit {})\n\
         - machine: {}; CPU {cores} x {cpu}; memory {:.1} GiB\n\
         - load average (1 5 15 min): {load_start} at start, {} at end\n\
         - tools: {}; {}\n",
        q(Command::new("git")
            .arg("-C")
            .arg(root)
            .args(["describe", "--always", "--dirty"])),
        q(Command::new("uname").arg("-srvm")),
        mem_kib as f64 / (1024.0 * 1024.0),
        loadavg(),
        q(cargo_nightly(root).args(["fuzz", "--version"])),
        q(Command::new("rustup").args(["run", "nightly", "rustc", "-V"])),
    )
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

pub fn run(args: &FuzzArgs) -> anyhow::Result<()> {
    let root = crate::workspace_root();
    let fuzz_dir = root.join("fuzz");
    let started = output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M:%SZ"]))
        .unwrap_or_else(|| "?".into());
    let load_start = loadavg();
    tools(&root)?;

    let listed = output(cargo_nightly(&root).args(["fuzz", "list"]))
        .context("cargo fuzz list failed (is fuzz/Cargo.toml there?)")?;
    let all: Vec<String> = listed.lines().map(|l| l.trim().to_string()).collect();
    let targets: Vec<String> = match &args.target {
        Some(t) if all.contains(t) => vec![t.clone()],
        Some(t) => bail!("no fuzz target {t:?}; there are: {}", all.join(", ")),
        None => all,
    };

    eprintln!("==> building the fuzz targets (nightly, AYA_BUILD_SKIP=1, fuzz/target)");
    let t0 = Instant::now();
    let mut c = cargo_nightly(&root);
    c.args(["fuzz", "build"]);
    if let Some(t) = &args.target {
        c.arg(t);
    }
    crate::check(c, "cargo fuzz build")?;
    eprintln!("==> built in {:.0} s", t0.elapsed().as_secs_f64());

    let logs = fuzz_dir.join("target/logs");
    fs::create_dir_all(&logs)?;
    let mut results = Vec::new();
    for t in &targets {
        let work = fuzz_dir.join("target/corpus").join(t);
        let seeds = fuzz_dir.join("corpus").join(t);
        fs::create_dir_all(&work)?;
        fs::create_dir_all(&seeds)?;
        let log = logs.join(format!("{t}.log"));
        eprintln!(
            "==> fuzzing {t} for {} s (log: {})",
            args.seconds,
            log.display()
        );
        let f = fs::File::create(&log)?;
        let mut c = cargo_nightly(&root);
        c.args(["fuzz", "run", t])
            .arg(&work)
            .arg(&seeds)
            .args([
                "--".to_string(),
                format!("-max_total_time={}", args.seconds),
                format!("-timeout={TIMEOUT_S}"),
                "-print_final_stats=1".to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f);
        let status = c.status().context("starting cargo fuzz run")?;
        let text = fs::read_to_string(&log).unwrap_or_default();
        let mut o = parse_log(&text);
        if !status.success() && o.artifact.is_none() && o.failure.is_none() {
            o.failure = Some(format!(
                "cargo fuzz run failed ({status}); see {}",
                log.display()
            ));
        }
        let crashed = o.artifact.is_some() || o.failure.is_some();
        eprintln!(
            "    {} runs in {} s, corpus {}, {}",
            o.runs.map_or("?".into(), |r| r.to_string()),
            o.seconds.map_or("?".into(), |s| s.to_string()),
            o.corpus.as_ref().map_or("?".into(), |(n, _)| n.to_string()),
            if crashed { "FAILED" } else { "no crash" }
        );
        results.push((t.clone(), o));
    }

    let table = table(&results, args.seconds);
    eprintln!("\n{table}");
    let invocation = match &args.target {
        Some(t) => format!("cargo xtask fuzz --seconds {} {t}", args.seconds),
        None => format!("cargo xtask fuzz --seconds {}", args.seconds),
    };
    let total: u64 = results.iter().filter_map(|(_, o)| o.runs).sum();
    let failed: Vec<&(String, Outcome)> = results
        .iter()
        .filter(|(_, o)| o.artifact.is_some() || o.failure.is_some())
        .collect();
    let mut body = String::from("## Fuzzing (cargo fuzz, libFuzzer)\n\n");
    body.push_str(&facts(&root, &invocation, &started, &load_start));
    let _ = write!(
        body,
        "\nEach target in `fuzz/fuzz_targets/` feeds one family of untrusted input to the real \
         parsers and checks what they promise (no panic, round trips, bounds); targets run one \
         after the other, each for {} s (`-max_total_time`, `-timeout={TIMEOUT_S}`), starting \
         from the seeds in `fuzz/corpus/TARGET` and the corpus of earlier runs on this machine. \
         Reproduce a crash with `cargo +nightly fuzz run TARGET ARTIFACT`.\n\n{table}\n\
         {total} executions in all, {} target(s) failed.\n",
        args.seconds,
        failed.len()
    );
    for (t, o) in &failed {
        let _ = writeln!(
            body,
            "\n- **{t}**: {} (artifact `{}`)",
            o.failure.as_deref().unwrap_or("crash"),
            o.artifact.as_deref().unwrap_or("?")
        );
    }
    // One section of BENCHMARKS.md among the benchmarks' (the same writer keeps the others).
    crate::bench::write_report(
        &root,
        &args.out,
        &[crate::bench::Section {
            name: "fuzz",
            markdown: body,
            targets: Vec::new(),
        }],
    )?;

    if !failed.is_empty() {
        let mut msg = String::from("fuzzing found failures:");
        for (t, o) in &failed {
            let _ = write!(msg, "\n  {t}: {}", o.failure.as_deref().unwrap_or("crash"));
            match &o.artifact {
                Some(a) => {
                    let _ = write!(
                        msg,
                        "\n    input: {a}\n    reproduce: AYA_BUILD_SKIP=1 cargo +nightly fuzz run {t} {a}"
                    );
                }
                None => {
                    let _ = write!(
                        msg,
                        "\n    log: {}",
                        logs.join(format!("{t}.log")).display()
                    );
                }
            }
        }
        bail!(msg);
    }
    Ok(())
}

fn table(results: &[(String, Outcome)], seconds: u64) -> String {
    let mut s = String::from(
        "| target | seconds | executions | exec/s | corpus | coverage | crashes |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for (t, o) in results {
        let n = |v: Option<u64>| v.map_or("?".to_string(), |v| v.to_string());
        let rate = o.exec_per_s.or_else(|| Some(o.runs? / o.seconds?.max(1)));
        let _ = writeln!(
            s,
            "| {t} | {} | {} | {} | {} | {} | {} |",
            o.seconds.unwrap_or(seconds),
            n(o.runs),
            n(rate),
            o.corpus
                .as_ref()
                .map_or("?".into(), |(c, b)| format!("{c} ({b})")),
            n(o.cov),
            if o.artifact.is_some() || o.failure.is_some() {
                "**1**"
            } else {
                "0"
            }
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const DONE: &str = "INFO: Seed: 3712446805\n\
#2\tINITED cov: 150 ft: 300 corp: 136/1688b exec/s: 0 rss: 61Mb\n\
#1200000\tREDUCE cov: 155 ft: 358 corp: 142/1828b lim: 33 exec/s: 109000 rss: 61Mb L: 7/33\n\
stat::number_of_executed_units: 1200362\n\
stat::average_exec_per_sec:     109123\n\
stat::new_units_added:          16\n\
Done 1200362 runs in 11 second(s)\n";

    #[test]
    fn clean_run() {
        let o = parse_log(DONE);
        assert_eq!(o.runs, Some(1200362));
        assert_eq!(o.seconds, Some(11));
        assert_eq!(o.exec_per_s, Some(109123));
        assert_eq!(o.corpus, Some((142, "1828b".into())));
        assert_eq!(o.cov, Some(155));
        assert_eq!((o.artifact, o.failure), (None, None));
    }

    #[test]
    fn crash_run() {
        let log = "#1000\tNEW cov: 10 ft: 20 corp: 5/50b\n\
thread '<unnamed>' panicked at fuzz_targets/qmp.rs:25:17:\n\
400 chars\n\
==123== ERROR: libFuzzer: deadly signal\n\
stat::number_of_executed_units: 1234\n\
artifact_prefix='/w/fuzz/artifacts/qmp/'; Test unit written to /w/fuzz/artifacts/qmp/crash-abc\n\
Base64: e30=\n";
        let o = parse_log(log);
        assert_eq!(o.runs, Some(1234));
        assert_eq!(
            o.artifact.as_deref(),
            Some("/w/fuzz/artifacts/qmp/crash-abc")
        );
        let f = o.failure.unwrap();
        assert!(
            f.starts_with(
                "deadly signal: thread '<unnamed>' panicked at fuzz_targets/qmp.rs:25:17: 400 chars"
            ),
            "{f}"
        );
        let t = table(&[("qmp".into(), parse_log(log))], 60);
        assert!(
            t.contains("| qmp | 60 | 1234 | ? | 5 (50b) | 10 | **1** |"),
            "{t}"
        );
    }
}
