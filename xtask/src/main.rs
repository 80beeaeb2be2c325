//! Developer tasks. `cargo xtask run -- top` and `cargo xtask test` are the two commands of the
//! README: each installs what it needs first (and says so), then does its job.

mod bench;
mod fuzz;
mod package;
mod repeat;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "overkvm developer tasks")]
struct Xtask {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building needs (rust-src for nightly, bpf-linker), and with --test-deps the
    /// Debian packages the tests use. Idempotent: prints only what it changes.
    Setup {
        #[arg(long)]
        test_deps: bool,
    },
    /// Build `overkvm-io` (release) with its eBPF programs.
    Build,
    /// Build, then run `overkvm-io` as root (through sudo when not root) with these arguments.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run every test: unit tests, then the integration tests that load the real programs
    /// (as root, one at a time: they share the kernel).
    Test {
        /// Only tests whose name contains this; for the integration tests also a test file
        /// (`identity` runs tests/tests/identity.rs) or a file and a name (`parity::fallback`).
        filter: Option<String>,
        /// Run the selected integration tests (not the unit tests) this many times and print
        /// how often each passed; each run's output is kept in target/repeat/. Fails unless
        /// every test passed every time.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        repeat: Option<u32>,
    },
    /// Benchmarks: cost per I/O against a peer, IOPS kept under tracing, the daemon at scale.
    /// Prints figures and writes them into BENCHMARKS.md.
    Bench(bench::BenchArgs),
    /// Coverage-guided fuzzing of the parsers of untrusted input (cargo fuzz, nightly): each
    /// target for --seconds; prints executions and crashes and writes them into BENCHMARKS.md.
    /// Installs cargo-fuzz when missing.
    Fuzz(fuzz::FuzzArgs),
    /// Build the Debian package and the RPM of overkvm: the release binary with its eBPF
    /// programs in /usr/bin, the systemd unit (enabled and started by the .deb), the config
    /// /etc/overkvm/overkvm.toml (no budgets: metrics only until edited) and
    /// /etc/default/overkvm, the Prometheus rules, alerts and scrape example and the Grafana
    /// dashboard in /usr/share/overkvm, man pages and bash, zsh and fish completions.
    /// Installs cargo-deb and cargo-generate-rpm when missing. Prints the two packages' paths.
    Package(package::PackageArgs),
}

fn main() -> ExitCode {
    match run(Xtask::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(x: Xtask) -> anyhow::Result<()> {
    match x.task {
        Task::Setup { test_deps } => {
            setup::toolchain()?;
            if test_deps {
                setup::test_packages()?;
            }
            Ok(())
        }
        Task::Build => {
            setup::toolchain()?;
            build()
        }
        Task::Run { args } => {
            setup::toolchain()?;
            build()?;
            let bin = workspace_root().join("target/release/overkvm-io");
            let mut cmd = as_root(&bin);
            cmd.args(&args);
            let status = cmd
                .status()
                .with_context(|| format!("starting {}", bin.display()))?;
            if !status.success() {
                std::process::exit(status.code().unwrap_or(1));
            }
            Ok(())
        }
        Task::Bench(args) => {
            setup::toolchain()?;
            setup::test_packages()?;
            build()?;
            bench::run(&args)
        }
        Task::Fuzz(args) => fuzz::run(&args),
        Task::Package(args) => {
            let built = package::run(&args)?;
            eprintln!("==> built:");
            // stdout: only the paths, for scripts and the package test.
            println!("{}", built.deb.display());
            println!("{}", built.rpm.display());
            Ok(())
        }
        Task::Test { filter, repeat } => {
            setup::toolchain()?;
            setup::test_packages()?;
            match repeat {
                Some(n) => test_repeatedly(n, filter.as_deref()),
                None => test(filter.as_deref()),
            }
        }
    }
}

/// Builds what the integration tests run, as the invoking user (the tests then run as root).
fn build_integration_tests() -> anyhow::Result<()> {
    if !is_root() {
        eprintln!("==> they need root: running them through sudo");
    }
    let mut c = cargo();
    c.args(["build", "--release", "-p", "overkvm", "--bin", "overkvm-io"]);
    check(c, "cargo build")?;
    let mut c = cargo();
    c.args([
        "test",
        "--release",
        "-p",
        "overkvm-tests",
        "--tests",
        "--no-run",
    ]);
    check(c, "building the integration tests")
}

/// Where the tests record the tests that skipped and why (overkvm_tests::skipped).
fn skip_log() -> PathBuf {
    workspace_root().join("target/test-skips.log")
}

/// `cargo test` of the integration tests, as root, one test at a time (they share the
/// kernel), with `extra` libtest arguments. `--no-fail-fast`: a failing binary does not hide
/// the results of the binaries after it.
fn integration_tests(filter: Option<&str>, extra: &[&str]) -> Command {
    let mut c = if is_root() {
        cargo()
    } else {
        let mut s = Command::new("sudo");
        s.args(["-E", "env"])
            .arg(format!(
                "PATH={}",
                std::env::var("PATH").unwrap_or_default()
            ))
            .arg(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(workspace_root());
        s
    };
    c.args(["test", "--release", "-p", "overkvm-tests"]);
    // `identity` selects the binary tests/tests/identity.rs, `identity::exec` the tests of it
    // whose name contains `exec`; anything else filters test names in every binary.
    let (binary, name) = match filter.map(|f| f.split_once("::").unwrap_or((f, ""))) {
        Some((bin, name)) if is_test_binary(bin) => {
            (Some(bin), Some(name).filter(|n| !n.is_empty()))
        }
        _ => (None, filter),
    };
    match binary {
        Some(bin) => c.args(["--test", bin]),
        None => c.arg("--tests"),
    };
    c.args(["--no-fail-fast", "--", "--test-threads=1"]);
    c.args(extra);
    if let Some(f) = name {
        c.arg(f);
    }
    // A skip passes in libtest's count, so each is recorded here and reported on its own.
    c.env("OVERKVM_SKIP_LOG", skip_log());
    c
}

fn is_test_binary(name: &str) -> bool {
    !name.is_empty()
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && workspace_root()
            .join("tests/tests")
            .join(format!("{name}.rs"))
            .is_file()
}

/// `cargo xtask test --repeat N [FILTER]`.
fn test_repeatedly(n: u32, filter: Option<&str>) -> anyhow::Result<()> {
    eprintln!(
        "==> integration tests, {n} time{}",
        if n == 1 { "" } else { "s" }
    );
    build_integration_tests()?;
    repeat::run(
        n,
        |extra| integration_tests(filter, extra),
        &skip_log(),
        &workspace_root().join("target/repeat"),
    )
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

pub fn is_root() -> bool {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A command run as root: directly when we are root, else through `sudo -E`.
fn as_root(program: &Path) -> Command {
    if is_root() {
        Command::new(program)
    } else {
        eprintln!("==> overkvm needs root to load eBPF programs: running through sudo");
        let mut c = Command::new("sudo");
        c.arg("-E").arg(program);
        c
    }
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

fn check(mut cmd: Command, what: &str) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("starting {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn build() -> anyhow::Result<()> {
    eprintln!("==> building overkvm-io and its eBPF programs (release)");
    let mut c = cargo();
    c.args(["build", "--release", "-p", "overkvm", "--bin", "overkvm-io"]);
    check(c, "cargo build")
}

fn test(filter: Option<&str>) -> anyhow::Result<()> {
    eprintln!("==> unit tests");
    let mut c = cargo();
    c.args([
        "test",
        "--release",
        "-p",
        "overkvm-common",
        "-p",
        "overkvm",
        "-p",
        "overkvm-tests",
        // The bench and fuzz report parsers have unit tests too.
        "-p",
        "xtask",
        "--lib",
        "--bins",
    ]);
    if let Some(f) = filter {
        c.args(["--", f]);
    }
    check(c, "unit tests")?;

    eprintln!("==> integration tests (real kernel: programs, loop devices, zram, qemu guests)");
    build_integration_tests()?;
    let c = integration_tests(filter, &[]);
    // Each test that skips records why here (overkvm_tests::skipped): a skip passes in
    // libtest's count, so it is reported on its own, and fails the run in CI.
    let skip_log = skip_log();
    let _ = std::fs::remove_file(&skip_log);
    let ran = check(c, "integration tests");
    let skips: Vec<String> = std::fs::read_to_string(&skip_log)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect();
    if skips.is_empty() {
        eprintln!("==> integration tests: none skipped");
    } else {
        eprintln!(
            "==> integration tests: {} skipped (counted as passed above):",
            skips.len()
        );
        for s in &skips {
            eprintln!("    {s}");
        }
    }
    ran?;
    if !skips.is_empty() && std::env::var("CI").is_ok_and(|v| v == "true") {
        bail!(
            "{} integration test(s) skipped under CI=true: CI must run every test (install what \
             the reasons above name, e.g. `cargo xtask setup --test-deps`)",
            skips.len()
        );
    }
    Ok(())
}
