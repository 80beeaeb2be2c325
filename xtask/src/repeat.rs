//! `cargo xtask test --repeat N [FILTER]`: runs the selected integration tests N times and
//! prints how often each passed. A test that fails once in twenty has found a race; this is
//! how one proves it is gone (the suite itself never retries).
//!
//! Each run's whole output is kept in `target/repeat/run-K.log`. A test passed in a run when
//! its binary finished (printed `test result:`) and did not list it under `failures:`; a test
//! whose binary died first (a crash, a hang killed by the operator) counts as not passed.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Command, Stdio},
};

use anyhow::Context as _;

/// What one test binary printed in one run.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BinaryRun {
    /// It printed its `test result:` line.
    pub finished: bool,
    /// Tests it listed under `failures:`.
    pub failed: BTreeSet<String>,
}

/// The binary a cargo `Running` line announces: `tests/identity.rs (target/…)` → `identity`.
fn running_binary(line: &str) -> Option<String> {
    let rest = line.trim_start().strip_prefix("Running ")?;
    // `Running unittests src/bin/execvm.rs (…)` for the package's own unit tests.
    let rest = rest.strip_prefix("unittests ").unwrap_or(rest);
    let src = rest.split_whitespace().next()?;
    let file = Path::new(src).file_stem()?.to_str()?;
    Some(file.to_string())
}

/// Reads cargo test's merged stdout and stderr: per binary, whether it finished and which of
/// its tests failed. Test names in `failures:` are indented by four spaces, one per line, and
/// the block ends with an empty line (libtest's format).
pub fn parse_run(output: &str) -> BTreeMap<String, BinaryRun> {
    let mut runs: BTreeMap<String, BinaryRun> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut in_failures = false;
    for line in output.lines() {
        if let Some(bin) = running_binary(line) {
            runs.entry(bin.clone()).or_default();
            current = Some(bin);
            in_failures = false;
            continue;
        }
        let Some(bin) = current.as_ref() else {
            continue;
        };
        let run = runs.entry(bin.clone()).or_default();
        if line.starts_with("test result:") {
            run.finished = true;
            in_failures = false;
        } else if line == "failures:" {
            // libtest prints two `failures:` headings: captured output, then the bare list.
            in_failures = true;
        } else if in_failures {
            if let Some(name) = line.strip_prefix("    ")
                && !name.contains(' ')
                && !name.is_empty()
            {
                run.failed.insert(name.to_string());
            } else if !line.is_empty() {
                in_failures = false;
            }
        }
    }
    runs
}

/// `cargo test -- --list` output → binary → its test names.
pub fn parse_list(output: &str) -> BTreeMap<String, Vec<String>> {
    let mut tests: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in output.lines() {
        if let Some(bin) = running_binary(line) {
            tests.entry(bin.clone()).or_default();
            current = Some(bin);
        } else if let (Some(bin), Some(name)) = (current.as_ref(), line.strip_suffix(": test")) {
            tests.entry(bin.clone()).or_default().push(name.to_string());
        }
    }
    tests.retain(|_, v| !v.is_empty());
    tests
}

/// Pass counts per `binary::test` over the runs so far.
#[derive(Debug, Default)]
pub struct Tally {
    pub runs: u32,
    /// `binary::test` → runs it passed.
    pub passed: BTreeMap<String, u32>,
    /// `binary::test` → runs it was skipped in (a skip passes in libtest's count).
    pub skipped: BTreeMap<String, u32>,
}

impl Tally {
    pub fn new(tests: &BTreeMap<String, Vec<String>>) -> Tally {
        let passed = tests
            .iter()
            .flat_map(|(bin, names)| names.iter().map(move |n| (format!("{bin}::{n}"), 0)))
            .collect();
        Tally {
            runs: 0,
            passed,
            skipped: BTreeMap::new(),
        }
    }

    /// Adds one run; returns the tests that did not pass in it.
    pub fn add(&mut self, run: &BTreeMap<String, BinaryRun>, skip_lines: &str) -> Vec<String> {
        self.runs += 1;
        let mut not_passed = Vec::new();
        for (test, count) in &mut self.passed {
            let (bin, name) = test.split_once("::").unwrap_or((test, ""));
            let ok = run
                .get(bin)
                .is_some_and(|r| r.finished && !r.failed.contains(name));
            if ok {
                *count += 1;
            } else {
                not_passed.push(test.clone());
            }
        }
        // `SKIPPED identity::some_test: reason` (tests/src/lib.rs `skipped`).
        for line in skip_lines.lines() {
            if let Some(test) = line
                .strip_prefix("SKIPPED ")
                .and_then(|l| l.split_once(": "))
                .map(|(t, _)| t.to_string())
            {
                *self.skipped.entry(test).or_default() += 1;
            }
        }
        not_passed
    }

    /// One line per test: `passed/runs  binary::test` (and skips), failures first.
    pub fn table(&self) -> String {
        let mut rows: Vec<(&String, &u32)> = self.passed.iter().collect();
        rows.sort_by_key(|(name, n)| (**n, (*name).clone()));
        let mut out = String::new();
        for (name, n) in rows {
            let skips = self
                .skipped
                .get(name)
                .map(|s| format!("  ({s} skipped)"))
                .unwrap_or_default();
            let mark = if *n == self.runs { " " } else { "!" };
            out.push_str(&format!("{mark} {n:>3}/{}  {name}{skips}\n", self.runs));
        }
        out
    }

    pub fn all_passed(&self) -> bool {
        self.passed.values().all(|&n| n == self.runs) && self.skipped.is_empty()
    }
}

/// Runs `cmd`, its stdout and stderr merged into one pipe (so that cargo's `Running` lines and
/// libtest's results keep their order), echoing nothing; returns the output and the exit
/// status.
fn run_merged(mut cmd: Command) -> anyhow::Result<(String, std::process::ExitStatus)> {
    let (reader, writer) = std::io::pipe().context("pipe")?;
    cmd.stdout(writer.try_clone().context("pipe")?)
        .stderr(writer)
        .stdin(Stdio::null());
    let mut child = cmd.spawn().context("starting cargo test")?;
    // The parent's copies of the write end are gone with `cmd`: EOF comes when the child ends.
    drop(cmd);
    let mut out = String::new();
    for line in BufReader::new(reader).lines() {
        let line = line.unwrap_or_else(|e| format!("<unreadable output: {e}>"));
        out.push_str(&line);
        out.push('\n');
    }
    let status = child.wait().context("waiting for cargo test")?;
    Ok((out, status))
}

/// Runs the integration tests `n` times. `command` makes a fresh `cargo test` command with
/// the test arguments (`--test-threads=1`, the filter) already given; `skip_log` is the file
/// the tests record skips in.
pub fn run(
    n: u32,
    command: impl Fn(&[&str]) -> Command,
    skip_log: &Path,
    log_dir: &Path,
) -> anyhow::Result<()> {
    let (listing, status) = run_merged(command(&["--list"]))?;
    if !status.success() {
        anyhow::bail!("listing the tests failed ({status}):\n{listing}");
    }
    let tests = parse_list(&listing);
    let count: usize = tests.values().map(Vec::len).sum();
    if count == 0 {
        anyhow::bail!("no integration test matches the filter");
    }
    std::fs::create_dir_all(log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    eprintln!(
        "==> {count} integration test(s) in {} binar{}, {n} run(s); each run's output in {}",
        tests.len(),
        if tests.len() == 1 { "y" } else { "ies" },
        log_dir.display()
    );
    let mut tally = Tally::new(&tests);
    for k in 1..=n {
        let _ = std::fs::remove_file(skip_log);
        let started = std::time::Instant::now();
        let (out, _) = run_merged(command(&[]))?;
        let log = log_dir.join(format!("run-{k}.log"));
        std::fs::write(&log, &out).with_context(|| format!("writing {}", log.display()))?;
        let skips = std::fs::read_to_string(skip_log).unwrap_or_default();
        let not_passed = tally.add(&parse_run(&out), &skips);
        eprint!(
            "run {k}/{n}: {}/{count} passed in {:.0} s",
            count - not_passed.len(),
            started.elapsed().as_secs_f64()
        );
        if not_passed.is_empty() {
            eprintln!();
        } else {
            eprintln!(
                "; not passed: {} (see {})",
                not_passed.join(", "),
                log.display()
            );
        }
        let _ = std::io::stderr().flush();
    }
    println!("{}", tally.table());
    if !tally.all_passed() {
        anyhow::bail!("not every test passed (or ran unskipped) in every run: see the table above");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUN: &str = "\
   Compiling overkvm-tests v0.1.0
     Running tests/identity.rs (target/release/deps/identity-1a2b)

running 3 tests
test a_first ... ok
test b_second ... SKIPPED identity::b_second: no kernel
ok
test c_third ... FAILED

failures:

---- c_third stdout ----
thread 'c_third' panicked at tests/tests/identity.rs:10:5:
named qemu-42

failures:
    c_third

test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out
     Running tests/parity.rs (target/release/deps/parity-3c4d)

running 2 tests
test p_one ... ok
";

    #[test]
    fn a_run_tells_per_binary_what_finished_and_what_failed() {
        let r = parse_run(RUN);
        assert_eq!(
            r["identity"],
            BinaryRun {
                finished: true,
                failed: ["c_third".to_string()].into()
            }
        );
        // The parity binary died before its summary: nothing of it passed.
        assert_eq!(r["parity"], BinaryRun::default());
    }

    #[test]
    fn the_tally_counts_passes_per_test_and_skips_apart() {
        let list = "\
     Running tests/identity.rs (target/release/deps/identity-1a2b)
a_first: test
b_second: test
c_third: test
     Running tests/parity.rs (target/release/deps/parity-3c4d)
p_one: test
p_two: test
     Running tests/empty.rs (target/release/deps/empty-5e6f)
";
        let tests = parse_list(list);
        assert_eq!(tests.len(), 2, "a binary with no selected test is left out");
        let mut t = Tally::new(&tests);
        let not = t.add(&parse_run(RUN), "SKIPPED identity::b_second: no kernel\n");
        assert_eq!(not, ["identity::c_third", "parity::p_one", "parity::p_two"]);
        assert_eq!(t.passed["identity::a_first"], 1);
        assert_eq!(t.skipped["identity::b_second"], 1);
        assert!(!t.all_passed());
        let table = t.table();
        assert!(table.starts_with("!   0/1  identity::c_third\n"), "{table}");
        assert!(
            table.contains("    1/1  identity::b_second  (1 skipped)"),
            "{table}"
        );
    }
}
