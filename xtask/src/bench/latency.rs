//! The latency target's figures (issue 17), part of `cargo xtask bench throttle`: the guest
//! scenario of tests/tests/guest_kernel.rs (a Debian 6.1 guest under TCG whose vda QEMU limits
//! to 600 IOPS, three greedy QD1 readers with weights 2:1:1) run with a latency target, with
//! a fixed IOPS budget and with no throttle, interleaved; each run writes its figures as JSON
//! to $OVERKVM_BENCH_OUT.
//!
//! It needs the guest: this host has no device whose latency rises at a known capacity (no
//! null_blk, no device-mapper `delay`, and blk-throttle on a loop device delays bios before
//! they become requests, so the device's latency does not show it).

use std::{fmt::Write as _, path::Path};

use serde_json::Value;

use super::{
    BenchArgs, Target,
    stats::{median, spread},
    sys::{self, progress},
};

const BUILD_ARGS: [&str; 6] = [
    "test",
    "--release",
    "-p",
    "overkvm-tests",
    "--test",
    "guest_kernel",
];

/// (label, test) of each mode, in the order each round runs them.
const MODES: [(&str, &str); 3] = [
    (
        "latency target (p95 3 ms)",
        "guest61_latency_target_finds_the_capacity_holds_the_target_and_releases",
    ),
    (
        "IOPS budget (540)",
        "guest61_bench_latency_scenario_with_an_iops_budget",
    ),
    ("no throttle", "guest61_bench_latency_scenario_unthrottled"),
];

/// One run's figures as the test writes them.
#[derive(Clone, Debug, PartialEq)]
pub struct LatencyFigures {
    pub capacity_iops: f64,
    pub target_ms: f64,
    pub engage_s: Option<f64>,
    pub settle_s: Option<f64>,
    pub median_p95_ms: f64,
    pub over_target_pct: f64,
    pub total_iops: f64,
    pub pct_of_capacity: f64,
    pub rates: Vec<f64>,
    pub weighted_ratio: f64,
    pub jain_equal_weight: f64,
    pub learned_capacity_iops: Option<f64>,
    pub calibrate_iops: Option<f64>,
    pub release_s: f64,
}

pub fn parse_latency_figures(json: &str) -> Result<LatencyFigures, String> {
    let v: Value = serde_json::from_str(json).map_err(|e| format!("figures JSON: {e}"))?;
    let num = |k: &str| v[k].as_f64().ok_or_else(|| format!("figures without {k}"));
    Ok(LatencyFigures {
        capacity_iops: num("capacity_iops")?,
        target_ms: num("target_ms")?,
        engage_s: v["engage_s"].as_f64(),
        settle_s: v["settle_s"].as_f64(),
        median_p95_ms: num("median_p95_ms")?,
        over_target_pct: num("over_target_pct")?,
        total_iops: num("total_iops")?,
        pct_of_capacity: num("pct_of_capacity")?,
        rates: v["rates"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default(),
        weighted_ratio: num("weighted_ratio")?,
        jain_equal_weight: num("jain_equal_weight")?,
        learned_capacity_iops: v["learned_capacity_iops"].as_f64(),
        calibrate_iops: v["calibrate_iops"].as_f64(),
        release_s: num("release_s")?,
    })
}

type Outcome = super::throttle::Outcome<LatencyFigures>;

fn opt(v: Option<f64>, unit: &str, prec: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.prec$}{unit}"))
}

/// Runs the three modes `args.rounds` times, interleaved; `pinned` holds the overkvm-io to
/// test (as `target/release/overkvm-io`). Returns the Markdown subsection and its targets.
pub fn run(
    args: &BenchArgs,
    tmp: &Path,
    pinned_target: &Path,
) -> anyhow::Result<(String, Vec<Target>)> {
    let load_start = sys::loadavg();
    let started = sys::utc_now();
    progress(
        "throttle: latency scenario: building the guest test (it needs the 6.1 guest: qemu \
         under TCG, about a minute per run)",
    );
    let test_bin = super::throttle::build_test(&BUILD_ARGS, "guest_kernel", tmp)?;

    let mut outcomes: Vec<(u64, usize, f64, Outcome)> = Vec::new();
    for round in 1..=args.rounds {
        for (m, (label, test)) in MODES.iter().enumerate() {
            sys::check_interrupt()?;
            let load1 = sys::load1();
            progress(format!(
                "throttle: latency scenario run {round}/{}, {label}: `{test}` in the 6.1 guest \
                 (load {load1:.2})",
                args.rounds
            ));
            let out = tmp.join(format!("latency-{round}-{m}.json"));
            let log = tmp.join(format!("latency-{round}-{m}.log"));
            let mut c = std::process::Command::new(&test_bin);
            c.args([
                "--exact",
                test,
                "--include-ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .current_dir(crate::workspace_root().join("tests"))
            .env("OVERKVM_BENCH_OUT", &out)
            .env("CARGO_TARGET_DIR", pinned_target);
            let outcome = super::throttle::figures_run(
                c,
                (&out, &log),
                test,
                parse_latency_figures,
                |f: &LatencyFigures| {
                    format!(
                        "settled {}, median p95 {:.2} ms, {:.0}% of ticks over, {:.0} IOPS \
                         ({:.1}% of {:.0}), weight-2 {:.2}x, Jain {:.3}, released {:.1} s",
                        opt(f.settle_s, " s", 1),
                        f.median_p95_ms,
                        f.over_target_pct,
                        f.total_iops,
                        f.pct_of_capacity,
                        f.capacity_iops,
                        f.weighted_ratio,
                        f.jain_equal_weight,
                        f.release_s
                    )
                },
                "throttle",
            )?;
            outcomes.push((round, m, load1, outcome));
        }
    }
    let load_end = sys::loadavg();

    let mut md = String::new();
    let _ = writeln!(
        md,
        "\n### Latency target (issue 17): a device of known capacity, in the 6.1 guest\n"
    );
    let _ = writeln!(
        md,
        "- when: {started}; load average (1 5 15 min): {load_start} at start, {load_end} at end\n\
         - each run: `OVERKVM_BENCH_OUT=<file> cargo {} -- --exact <test> --include-ignored \
         --nocapture --test-threads=1` (built once with `--no-run`, the overkvm-io pinned at the \
         start), the three modes interleaved, {} round(s)\n\
         - the scenario (tests/tests/guest_kernel.rs): a Debian 6.1 guest under qemu/TCG whose \
         vda QEMU limits to 600 IOPS (`block_set_io_throttle`, as `iops-total=600`); three \
         greedy QD1 4 KiB random readers in their own cgroups, weights 2:1:1; `serve -i 0.5`; \
         30 s of load. Rates from the guest's io.stat from 10 s after the load started to its \
         end; p95 is the daemon's per-tick (0.5 s) p95 of the device; *settle* is the first tick \
         at or under the target after engaging from which every 10 s had a median per-tick p95 at or under it; *release* is the time \
         from the load stopping to no io.max line left.\n\
         - it needs the guest: this host has no device whose latency rises at a known capacity \
         (no null_blk or device-mapper; blk-throttle on a loop device delays bios before they \
         are requests, so the device's latency does not show it). TCG makes the guest's \
         latency rise with the host's load: read the load column.\n",
        BUILD_ARGS.join(" "),
        args.rounds
    );
    let _ = writeln!(
        md,
        "| run | mode | load1 | engage | settle | median p95 | ticks over the target | total IOPS (% of 600) | rates (w2, w1, w1) | weight-2 ratio | Jain (equal weights) | learned capacity | calibrate | release |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for (round, m, load1, o) in &outcomes {
        let label = MODES[*m].0;
        match o {
            Outcome::Figures(f, failed_after) => {
                let _ = writeln!(
                    md,
                    "| {round}{} | {label} | {load1:.2} | {} | {} | {:.2} ms | {:.0}% | {:.0} ({:.1}%) | {} | {:.2}x | {:.3} | {} | {} | {:.1} s |",
                    if *failed_after {
                        " (test failed after its figures)"
                    } else {
                        ""
                    },
                    opt(f.engage_s, " s", 1),
                    opt(f.settle_s, " s", 1),
                    f.median_p95_ms,
                    f.over_target_pct,
                    f.total_iops,
                    f.pct_of_capacity,
                    f.rates
                        .iter()
                        .map(|r| format!("{r:.0}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    f.weighted_ratio,
                    f.jain_equal_weight,
                    opt(f.learned_capacity_iops, " IOPS", 0),
                    opt(f.calibrate_iops, " IOPS", 0),
                    f.release_s
                );
            }
            Outcome::Skipped(why) => {
                let _ = writeln!(
                    md,
                    "| {round} | {label} | {load1:.2} | skipped: {why} |||||||||||"
                );
            }
            Outcome::Failed(why) => {
                let first = why
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("");
                let _ = writeln!(
                    md,
                    "| {round} | {label} | {load1:.2} | FAILED: `{}` |||||||||||",
                    first.replace('|', "/").replace('`', "'")
                );
            }
        }
    }
    let figs = |m: usize| -> Vec<&LatencyFigures> {
        outcomes
            .iter()
            .filter(|(_, mm, _, _)| *mm == m)
            .filter_map(|(_, _, _, o)| match o {
                Outcome::Figures(f, _) => Some(f),
                _ => None,
            })
            .collect()
    };
    let fmt = |v: &[f64], unit: &str, prec: usize| match (median(v), spread(v)) {
        (Some(m), Some(s)) => format!(
            "{m:.prec$}{unit} (min {:.prec$}, max {:.prec$})",
            s.min, s.max
        ),
        _ => "n/a".into(),
    };
    let _ = writeln!(md, "\nMedians per mode over its successful runs:\n");
    for (m, (label, _)) in MODES.iter().enumerate() {
        let f = figs(m);
        let col = |g: fn(&LatencyFigures) -> f64| f.iter().map(|x| g(x)).collect::<Vec<f64>>();
        let settle: Vec<f64> = f.iter().filter_map(|x| x.settle_s).collect();
        let _ = writeln!(
            md,
            "- {label} ({} run(s)): settle {} ({} of {} settled), median p95 {}, ticks over \
             the target {}, throughput {} of the capacity, weight-2 ratio {}, Jain {}, release {}",
            f.len(),
            fmt(&settle, " s", 1),
            settle.len(),
            f.len(),
            fmt(&col(|x| x.median_p95_ms), " ms", 2),
            fmt(&col(|x| x.over_target_pct), "%", 0),
            fmt(&col(|x| x.pct_of_capacity), "%", 1),
            fmt(&col(|x| x.weighted_ratio), "x", 2),
            fmt(&col(|x| x.jain_equal_weight), "", 3),
            fmt(&col(|x| x.release_s), " s", 1),
        );
    }
    let _ = writeln!(md);

    let t = figs(0);
    let col = |g: fn(&LatencyFigures) -> f64| t.iter().map(|x| g(x)).collect::<Vec<f64>>();
    let m = |v: &[f64]| median(v);
    let settle: Vec<f64> = t
        .iter()
        .map(|x| x.settle_s.unwrap_or(f64::INFINITY))
        .collect();
    let p95 = col(|x| x.median_p95_ms);
    let target_ms = t.first().map_or(f64::NAN, |x| x.target_ms);
    let kept = col(|x| x.pct_of_capacity);
    let jain = col(|x| x.jain_equal_weight);
    let release = col(|x| x.release_s);
    let cal: Vec<f64> = t
        .iter()
        .filter_map(|x| {
            x.calibrate_iops
                .map(|c| 100.0 * (c / x.capacity_iops - 1.0))
        })
        .collect();
    let targets = vec![
        Target::new(
            "latency: p95 settled at the target within 10 s (median)",
            "<= 10 s",
            m(&settle).map_or("n/a".into(), |v| format!("{v:.1} s")),
            m(&settle).map(|v| v <= 10.0),
        ),
        Target::new(
            "latency: median per-tick p95 after 10 s at or under the target (median)",
            &format!("<= {target_ms} ms"),
            m(&p95).map_or("n/a".into(), |v| format!("{v:.2} ms")),
            m(&p95).map(|v| v <= target_ms),
        ),
        Target::new(
            "latency: throughput kept >= 90% of the capacity (median)",
            ">= 90%",
            m(&kept).map_or("n/a".into(), |v| format!("{v:.1}%")),
            m(&kept).map(|v| v >= 90.0),
        ),
        Target::new(
            "latency: Jain among equal weights >= 0.95 (median)",
            ">= 0.95",
            m(&jain).map_or("n/a".into(), |v| format!("{v:.3}")),
            m(&jain).map(|v| v >= 0.95),
        ),
        Target::new(
            "latency: release within 30 s (median)",
            "<= 30 s",
            m(&release).map_or("n/a".into(), |v| format!("{v:.1} s")),
            m(&release).map(|v| v <= 30.0),
        ),
        Target::new(
            "latency: calibrate within 10% of the capacity (median)",
            "within ±10%",
            m(&cal).map_or("n/a".into(), |v| format!("{v:+.1}%")),
            m(&cal).map(|v| v.abs() <= 10.0),
        ),
    ];
    Ok((md, targets))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_figures_from_the_test_json() {
        let json = r#"{"mode":"latency_target","capacity_iops":600.0,"target_ms":2.0,
            "budget_iops":null,"calibrate_iops":623.0,"engage_s":1.2,"settle_s":3.4,
            "median_p95_ms":0.61,"over_target_pct":12.5,"steady_ticks":40,"total_iops":585.0,
            "pct_of_capacity":97.5,"rates":[292.0,146.0,147.0],"weighted_ratio":1.99,
            "jain_equal_weight":0.9999,"learned_capacity_iops":598.0,"release_s":5.0}"#;
        let f = parse_latency_figures(json).unwrap();
        assert_eq!(f.settle_s, Some(3.4));
        assert_eq!(f.rates.len(), 3);
        assert_eq!(f.calibrate_iops, Some(623.0));
        // The unthrottled run never engages nor settles, and learns nothing.
        let none = json
            .replace(r#""engage_s":1.2"#, r#""engage_s":null"#)
            .replace(r#""settle_s":3.4"#, r#""settle_s":null"#)
            .replace(
                r#""learned_capacity_iops":598.0"#,
                r#""learned_capacity_iops":null"#,
            );
        let f = parse_latency_figures(&none).unwrap();
        assert_eq!(
            (f.engage_s, f.settle_s, f.learned_capacity_iops),
            (None, None, None)
        );
        assert!(parse_latency_figures(r#"{"capacity_iops":600}"#).is_err());
        assert!(parse_latency_figures("nope").is_err());
    }
}
