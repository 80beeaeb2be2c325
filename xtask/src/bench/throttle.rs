//! The throttle's figures (issue 5): the cgroup v1 integration test `throttle_v1` run a few
//! times; each run writes its figures as JSON to $OVERKVM_BENCH_OUT. Then the latency target's
//! scenario in the 6.1 guest (issue 17, `super::latency`).

use std::{fmt::Write as _, fs, time::Duration};

use serde_json::Value;

use super::{
    BenchArgs, Ctx, Section, Target,
    stats::{median, spread},
    sys::{self, progress},
};

/// The test that writes the figures. Only it runs (`--exact`), one test at a time: the other
/// tests of the file start daemons and cgroups of their own, and tests of one binary share
/// the process id their scratch paths are named after.
const FIGURES_TEST: &str = "v1_budget_is_held_with_weighted_fair_shares_and_released";

const BUILD_ARGS: [&str; 6] = [
    "test",
    "--release",
    "-p",
    "overkvm-tests",
    "--test",
    "throttle_v1",
];

const RUN_ARGS: [&str; 4] = ["--nocapture", "--test-threads=1", "--exact", FIGURES_TEST];

/// The executable of test target `name` from `cargo test --no-run --message-format=json`.
pub fn test_executable(cargo_json: &str, name: &str) -> Option<String> {
    cargo_json.lines().rev().find_map(|l| {
        let v: Value = serde_json::from_str(l).ok()?;
        let is_test = v["reason"] == "compiler-artifact"
            && v["target"]["name"] == name
            && v["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "test"));
        if !is_test {
            return None;
        }
        v["executable"].as_str().map(str::to_string)
    })
}

/// One run's figures as the test writes them.
#[derive(Clone, Debug, PartialEq)]
pub struct Figures {
    pub budget_iops: f64,
    pub engage_s: f64,
    pub steady_total_iops: f64,
    pub steady_pct_of_budget: f64,
    pub jain_equal_weight: f64,
    pub weighted_ratio: f64,
    pub min_share_iops: f64,
    pub floor_iops: f64,
    pub release_s: f64,
    pub rates: Vec<f64>,
}

pub fn parse_figures(json: &str) -> Result<Figures, String> {
    let v: Value = serde_json::from_str(json).map_err(|e| format!("figures JSON: {e}"))?;
    let num = |k: &str| v[k].as_f64().ok_or_else(|| format!("figures without {k}"));
    Ok(Figures {
        budget_iops: num("budget_iops")?,
        engage_s: num("engage_s")?,
        steady_total_iops: num("steady_total_iops")?,
        steady_pct_of_budget: num("steady_pct_of_budget")?,
        jain_equal_weight: num("jain_equal_weight")?,
        weighted_ratio: num("weighted_ratio")?,
        min_share_iops: num("min_share_iops")?,
        floor_iops: num("floor_iops")?,
        release_s: num("release_s")?,
        rates: v["rates"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default(),
    })
}

/// Builds test target `name` once (`cargo <build_args> --no-run`) and copies its executable
/// into `dir`, so that every run measures that binary whatever is rebuilt meanwhile.
pub fn build_test(
    build_args: &[&str],
    name: &str,
    dir: &std::path::Path,
) -> anyhow::Result<std::path::PathBuf> {
    let mut build = crate::cargo();
    build
        .args(build_args)
        .args(["--no-run", "--message-format=json"]);
    let build_json = dir.join(format!("{name}-build.json"));
    let build_log = dir.join(format!("{name}-build.log"));
    let built = build
        .stdin(std::process::Stdio::null())
        .stdout(fs::File::create(&build_json)?)
        .stderr(fs::File::create(&build_log)?)
        .status()?;
    sys::check_interrupt()?;
    let exe = test_executable(&fs::read_to_string(&build_json).unwrap_or_default(), name);
    let Some(exe) = exe.filter(|_| built.success()) else {
        anyhow::bail!(
            "building {name} failed:\n{}",
            tail(&fs::read_to_string(&build_log).unwrap_or_default(), 30)
        );
    };
    let test_bin = dir.join(name);
    fs::copy(&exe, &test_bin)?;
    Ok(test_bin)
}

/// What one run of a figures-writing test gave.
pub enum Outcome<F> {
    /// The figures, and whether the test failed after writing them (a later assertion).
    Figures(F, bool),
    Skipped(String),
    Failed(String),
}

/// Runs a test that writes its figures to `out` (`OVERKVM_BENCH_OUT`), logging to `log`, and
/// reads what it gave; `describe` words the figures for the progress line (`area:   ...`).
pub fn figures_run<F>(
    c: std::process::Command,
    (out, log): (&std::path::Path, &std::path::Path),
    test: &str,
    parse: impl Fn(&str) -> Result<F, String>,
    describe: impl Fn(&F) -> String,
    area: &str,
) -> anyhow::Result<Outcome<F>> {
    let ok = super::run_logged(c, log, Duration::from_secs(600), test)?;
    let text = fs::read_to_string(log).unwrap_or_default();
    let outcome = match (ok, fs::read_to_string(out)) {
        (_, Ok(json)) => match parse(&json) {
            Ok(f) => Outcome::Figures(f, !ok),
            Err(e) => Outcome::Failed(e),
        },
        (true, Err(_)) if text.contains("SKIPPED") => Outcome::Skipped(
            text.lines()
                .find(|l| l.contains("SKIPPED"))
                .unwrap_or("")
                .trim()
                .to_string(),
        ),
        (true, Err(_)) => Outcome::Failed(format!(
            "the test wrote no figures (is it still named {test}?)"
        )),
        (false, _) => Outcome::Failed(tail(&text, 15)),
    };
    match &outcome {
        Outcome::Figures(f, failed_after) => progress(format!(
            "{area}:   {}{}",
            describe(f),
            if *failed_after {
                format!("; the test FAILED after writing them:\n{}", tail(&text, 15))
            } else {
                String::new()
            }
        )),
        Outcome::Skipped(why) => progress(format!("{area}:   {why}")),
        Outcome::Failed(why) => progress(format!("{area}:   FAILED:\n{why}")),
    }
    Ok(outcome)
}

pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub fn run(ctx: &Ctx, args: &BenchArgs) -> anyhow::Result<Section> {
    let load_start = sys::loadavg();
    let started = sys::utc_now();
    let tmp = sys::TempDir::new("throttle")?;
    let command = format!("cargo {} -- {}", BUILD_ARGS.join(" "), RUN_ARGS.join(" "));
    progress("throttle: building the test (waits while another cargo holds the build lock)");
    // Build once and run that binary every time, with the overkvm-io pinned at the start and
    // the iogen just built: a concurrent edit or rebuild cannot change what is measured.
    let test_bin = build_test(&BUILD_ARGS, "throttle_v1", &tmp.0)?;
    let pinned = tmp.0.join("target/release");
    fs::create_dir_all(&pinned)?;
    fs::copy(&ctx.overkvm, pinned.join("overkvm-io"))?;
    fs::copy(
        crate::workspace_root().join("target/release/iogen"),
        pinned.join("iogen"),
    )?;
    let mut outcomes = Vec::new();
    for round in 1..=args.rounds {
        sys::check_interrupt()?;
        let load1 = sys::load1();
        progress(format!(
            "throttle: run {round}/{} of `OVERKVM_BENCH_OUT=... {command}` (load {load1:.2})",
            args.rounds
        ));
        let out = tmp.0.join(format!("figures-{round}.json"));
        let log = tmp.0.join(format!("test-{round}.log"));
        let mut c = std::process::Command::new(&test_bin);
        c.args(RUN_ARGS)
            .current_dir(crate::workspace_root().join("tests"))
            .env("OVERKVM_BENCH_OUT", &out)
            .env("CARGO_TARGET_DIR", tmp.0.join("target"));
        let outcome = figures_run(
            c,
            (&out, &log),
            FIGURES_TEST,
            parse_figures,
            |f: &Figures| {
                format!(
                    "engaged {:.1} s, steady {:.1}% of budget, Jain {:.3}, min share {:.0} IOPS \
                     (floor {:.0}), released {:.1} s, weighted {:.2}x",
                    f.engage_s,
                    f.steady_pct_of_budget,
                    f.jain_equal_weight,
                    f.min_share_iops,
                    f.floor_iops,
                    f.release_s,
                    f.weighted_ratio
                )
            },
            "throttle",
        )?;
        outcomes.push((round, load1, outcome));
    }
    let load_end = sys::loadavg();

    let figs: Vec<&Figures> = outcomes
        .iter()
        .filter_map(|(_, _, o)| match o {
            Outcome::Figures(f, _) => Some(f),
            _ => None,
        })
        .collect();
    let col = |f: fn(&Figures) -> f64| figs.iter().map(|x| f(x)).collect::<Vec<f64>>();
    let engage = col(|f| f.engage_s);
    let steady = col(|f| f.steady_pct_of_budget);
    let jain = col(|f| f.jain_equal_weight);
    let min_share = col(|f| f.min_share_iops);
    let release = col(|f| f.release_s);
    let weighted = col(|f| f.weighted_ratio);
    let below_floor = figs
        .iter()
        .filter(|f| f.min_share_iops < f.floor_iops)
        .count();

    let mut md = String::new();
    let _ = writeln!(
        md,
        "## 3. Throttle (issue 5): scripted overload on cgroup v1\n"
    );
    let _ = writeln!(md, "{}", ctx.run_facts(&started, &load_start, &load_end));
    let _ = writeln!(
        md,
        "Each run: `OVERKVM_BENCH_OUT=<file> {command}`: the test binary is built once (`--no-run`) \
         and run {} times, with CARGO_TARGET_DIR pointing at the overkvm-io and iogen pinned at \
         the start. tests/tests/throttle_v1.rs: three greedy \
         qemu-like processes in their own blkio cgroups on a loop device, weights 2:1:1, budget \
         3000 IOPS, rates as the kernel counts them in `blkio.throttle.io_serviced`; engage and \
         release times are polled every 100 ms).\n",
        args.rounds
    );
    let _ = writeln!(
        md,
        "| run | load1 | engage | steady total | % of budget | rates (w2, w1, w1) | Jain (equal weights) | weight-2 ratio | min share (floor) | release |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    for (round, load1, o) in &outcomes {
        match o {
            Outcome::Figures(f, failed_after) => {
                let _ = writeln!(
                    md,
                    "| {round}{} | {load1:.2} | {:.1} s | {:.0} IOPS | {:.1}% | {} | {:.3} | {:.2}x | {:.0} ({:.0}) IOPS | {:.1} s |",
                    if *failed_after {
                        " (test failed after its figures)"
                    } else {
                        ""
                    },
                    f.engage_s,
                    f.steady_total_iops,
                    f.steady_pct_of_budget,
                    f.rates
                        .iter()
                        .map(|r| format!("{r:.0}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    f.jain_equal_weight,
                    f.weighted_ratio,
                    f.min_share_iops,
                    f.floor_iops,
                    f.release_s
                );
            }
            Outcome::Skipped(why) => {
                let _ = writeln!(md, "| {round} | {load1:.2} | skipped: {why} |||||||||");
            }
            Outcome::Failed(why) => {
                let first = why
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("");
                let _ = writeln!(
                    md,
                    "| {round} | {load1:.2} | FAILED: `{}` |||||||||",
                    first.replace('|', "/").replace('`', "'")
                );
            }
        }
    }
    let fmt = |v: &[f64], unit: &str, prec: usize| {
        let s = spread(v);
        match (median(v), s) {
            (Some(m), Some(s)) => format!(
                "{m:.prec$}{unit} (min {:.prec$}, max {:.prec$})",
                s.min, s.max
            ),
            _ => "n/a".into(),
        }
    };
    let _ = writeln!(
        md,
        "\nMedians over {} successful run(s) of {}: engage {}, steady {}, Jain {}, weight-2 ratio {}, \
         min share {}, release {}.\n",
        figs.len(),
        outcomes.len(),
        fmt(&engage, " s", 1),
        fmt(&steady, "%", 1),
        fmt(&jain, "", 3),
        fmt(&weighted, "x", 2),
        fmt(&min_share, " IOPS", 0),
        fmt(&release, " s", 1)
    );
    let failed = outcomes.len() - figs.len();
    if failed > 0 {
        let _ = writeln!(
            md,
            "{failed} run(s) produced no figures (failed or skipped; see the table).\n"
        );
    }
    let m = |v: &[f64]| median(v);
    let targets = vec![
        Target::new(
            "throttle: engage within 3 s (median)",
            "<= 3 s",
            m(&engage).map_or("n/a".into(), |v| format!("{v:.1} s")),
            m(&engage).map(|v| v <= 3.0),
        ),
        Target::new(
            "throttle: steady state within 5% of budget (median)",
            "95-105%",
            m(&steady).map_or("n/a".into(), |v| format!("{v:.1}%")),
            m(&steady).map(|v| (v - 100.0).abs() <= 5.0),
        ),
        Target::new(
            "throttle: Jain among equal weights >= 0.95 (median)",
            ">= 0.95",
            m(&jain).map_or("n/a".into(), |v| format!("{v:.3}")),
            m(&jain).map(|v| v >= 0.95),
        ),
        Target::new(
            "throttle: no guest below its floor (every run)",
            "min share >= floor",
            if figs.is_empty() {
                "n/a".into()
            } else {
                format!(
                    "lowest {:.0} IOPS, floor {:.0}; {below_floor} run(s) below",
                    min_share.iter().cloned().fold(f64::MAX, f64::min),
                    figs[0].floor_iops
                )
            },
            (!figs.is_empty()).then_some(below_floor == 0),
        ),
        Target::new(
            "throttle: release within 30 s (median)",
            "<= 30 s",
            m(&release).map_or("n/a".into(), |v| format!("{v:.1} s")),
            m(&release).map(|v| v <= 30.0),
        ),
    ];
    md.push_str(&Target::table(&targets));
    let mut targets = targets;
    let (latency_md, latency_targets) = super::latency::run(args, &tmp.0, &tmp.0.join("target"))?;
    md.push_str(&latency_md);
    md.push_str(&Target::table(&latency_targets));
    targets.extend(latency_targets);
    Ok(Section {
        name: "throttle",
        markdown: md,
        targets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_from_the_test_json() {
        let json = r#"{"budget_iops":3000.0,"engage_s":0.81,"steady_total_iops":2961.2,
            "steady_pct_of_budget":98.7,"rates":[1480.0,741.0,740.2],"weights":[2,1,1],
            "jain_equal_weight":0.9999,"weighted_ratio":1.997,"min_share_iops":740.2,
            "floor_iops":20,"release_s":0.9}"#;
        let f = parse_figures(json).unwrap();
        assert_eq!(f.floor_iops, 20.0);
        assert_eq!(f.rates.len(), 3);
        assert!((f.steady_pct_of_budget - 98.7).abs() < 1e-9);
        assert!(parse_figures(r#"{"engage_s":1}"#).is_err());
        assert!(parse_figures("nope").is_err());
    }

    #[test]
    fn test_executable_from_cargo_messages() {
        let json = r#"{"reason":"compiler-artifact","target":{"name":"iogen","kind":["bin"]},"executable":"/t/release/iogen"}
{"reason":"compiler-artifact","target":{"name":"throttle_v1","kind":["test"]},"executable":"/t/release/deps/throttle_v1-abc"}
not json
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            test_executable(json, "throttle_v1").as_deref(),
            Some("/t/release/deps/throttle_v1-abc")
        );
        assert_eq!(test_executable(json, "exporter"), None);
        assert_eq!(test_executable(json, "iogen"), None);
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }
}
