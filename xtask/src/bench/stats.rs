//! Pure functions of the benchmarks: statistics, and parsers for what the tools and the kernel
//! print. No I/O here, so all of it is unit-tested.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

/// Median of the values (mean of the two middle ones for an even count); None when empty or
/// when a value is not a number.
pub fn median(values: &[f64]) -> Option<f64> {
    let v = sorted(values)?;
    let n = v.len();
    if n == 0 {
        return None;
    }
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// A distribution-free confidence interval of the median: the order statistics x(k) and
/// x(n+1-k) with the largest k whose two-sided coverage, from the binomial(n, 1/2) law of how
/// many values fall below the median, is at least `level` (0.95: for 9 values x(2)..x(8),
/// 96.1%). None when no pair of order statistics reaches the level (fewer than 6 values at
/// 95%) or a value is not a number.
pub fn median_ci(values: &[f64], level: f64) -> Option<MedianCi> {
    let v = sorted(values)?;
    let n = v.len();
    // P(B <= j) for B ~ binomial(n, 1/2), accumulated.
    let mut below = Vec::with_capacity(n + 1);
    let (mut c, mut acc) = (1.0f64, 0.0f64);
    for j in 0..=n {
        if j > 0 {
            c = c * (n + 1 - j) as f64 / j as f64;
        }
        acc += c / 2f64.powi(n as i32);
        below.push(acc);
    }
    // Coverage of [x(k), x(n+1-k)] is 1 - 2 P(B <= k-1).
    (1..=n / 2)
        .rev()
        .map(|k| (k, 1.0 - 2.0 * below[k - 1]))
        .find(|&(_, cov)| cov >= level)
        .map(|(k, coverage)| MedianCi {
            low: v[k - 1],
            high: v[n - k],
            coverage,
        })
}

/// See `median_ci`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MedianCi {
    pub low: f64,
    pub high: f64,
    /// The interval's exact coverage (at least the level asked for).
    pub coverage: f64,
}

impl MedianCi {
    pub fn width(&self) -> f64 {
        self.high - self.low
    }
}

fn sorted(values: &[f64]) -> Option<Vec<f64>> {
    if values.iter().any(|v| v.is_nan()) {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    Some(v)
}

/// How far apart runs of one configuration are.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    pub min: f64,
    pub max: f64,
    /// (max - min) as a percentage of the median.
    pub range_pct: f64,
}

pub fn spread(values: &[f64]) -> Option<Spread> {
    let v = sorted(values)?;
    let (min, max) = (*v.first()?, *v.last()?);
    let m = median(values)?;
    Some(Spread {
        min,
        max,
        range_pct: percent(max - min, m).unwrap_or(0.0),
    })
}

/// Nearest-rank percentile (p in 0..=100) of the values: the smallest value with at least p%
/// of the values at or below it.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    let v = sorted(values)?;
    if v.is_empty() || !(0.0..=100.0).contains(&p) {
        return None;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

/// 100 * part / whole; None when whole is zero.
pub fn percent(part: f64, whole: f64) -> Option<f64> {
    (whole != 0.0).then(|| 100.0 * part / whole)
}

/// Nanoseconds of BPF run time per I/O (or per event); None when nothing happened.
pub fn ns_per(run_time_ns: u64, count: u64) -> Option<f64> {
    (count > 0).then(|| run_time_ns as f64 / count as f64)
}

/// CPU use in percent of one core from a tick count over a wall-clock interval.
pub fn cpu_percent(ticks: u64, ticks_per_second: u64, wall_seconds: f64) -> Option<f64> {
    (ticks_per_second > 0 && wall_seconds > 0.0)
        .then(|| 100.0 * ticks as f64 / ticks_per_second as f64 / wall_seconds)
}

/// One BPF program as `bpftool prog show -j` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgInfo {
    pub id: u32,
    pub kind: String,
    pub name: String,
    /// Zero when run-time statistics were never on for it.
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

/// Parses `bpftool prog show -j`.
pub fn parse_bpftool_progs(json: &str) -> Result<Vec<ProgInfo>, String> {
    let v: Value = serde_json::from_str(json).map_err(|e| format!("bpftool JSON: {e}"))?;
    let arr = v.as_array().ok_or("bpftool prog show: not a JSON array")?;
    arr.iter()
        .map(|p| {
            Ok(ProgInfo {
                id: p["id"].as_u64().ok_or("program without id")? as u32,
                kind: p["type"].as_str().unwrap_or("").to_string(),
                name: p["name"].as_str().unwrap_or("").to_string(),
                run_time_ns: p["run_time_ns"].as_u64().unwrap_or(0),
                run_cnt: p["run_cnt"].as_u64().unwrap_or(0),
            })
        })
        .collect()
}

/// One BPF map as `bpftool map show -j` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapInfo {
    pub id: u32,
    pub kind: String,
    pub name: String,
    pub max_entries: u64,
    /// The kernel's figure for the map's memory (`bytes_memlock`, or `memlock`).
    pub bytes: u64,
}

/// Parses `bpftool map show -j`.
pub fn parse_bpftool_maps(json: &str) -> Result<Vec<MapInfo>, String> {
    let v: Value = serde_json::from_str(json).map_err(|e| format!("bpftool JSON: {e}"))?;
    let arr = v.as_array().ok_or("bpftool map show: not a JSON array")?;
    arr.iter()
        .map(|m| {
            let bytes = m["bytes_memlock"]
                .as_u64()
                .or_else(|| m["memlock"].as_u64())
                .unwrap_or(0);
            Ok(MapInfo {
                id: m["id"].as_u64().ok_or("map without id")? as u32,
                kind: m["type"].as_str().unwrap_or("").to_string(),
                name: m["name"].as_str().unwrap_or("").to_string(),
                max_entries: m["max_entries"].as_u64().unwrap_or(0),
                bytes,
            })
        })
        .collect()
}

/// What one program did between two listings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgDelta {
    pub id: u32,
    pub name: String,
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

/// Per-program differences for the given ids (present in both listings; a counter that went
/// backwards counts as zero).
pub fn prog_deltas(before: &[ProgInfo], after: &[ProgInfo], ids: &[u32]) -> Vec<ProgDelta> {
    ids.iter()
        .filter_map(|id| {
            let b = before.iter().find(|p| p.id == *id)?;
            let a = after.iter().find(|p| p.id == *id)?;
            Some(ProgDelta {
                id: *id,
                name: a.name.clone(),
                run_time_ns: a.run_time_ns.saturating_sub(b.run_time_ns),
                run_cnt: a.run_cnt.saturating_sub(b.run_cnt),
            })
        })
        .collect()
}

/// What fio reported for a run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FioResult {
    pub iops: f64,
    /// I/Os in the measured window (after the ramp).
    pub ios: u64,
    pub runtime_ms: u64,
}

/// Parses fio's `--output-format=json` (text before the first `{`, such as notes fio prints,
/// is skipped). Reads and writes of all jobs are summed.
pub fn parse_fio(out: &str) -> Result<FioResult, String> {
    let start = out.find('{').ok_or("no JSON in fio's output")?;
    let v: Value = serde_json::from_str(&out[start..]).map_err(|e| format!("fio JSON: {e}"))?;
    let jobs = v["jobs"].as_array().ok_or("fio JSON without jobs")?;
    if jobs.is_empty() {
        return Err("fio JSON with no job".into());
    }
    let mut r = FioResult {
        iops: 0.0,
        ios: 0,
        runtime_ms: 0,
    };
    for j in jobs {
        if j["error"].as_i64().unwrap_or(0) != 0 {
            return Err(format!("fio job error {}", j["error"]));
        }
        for dir in ["read", "write"] {
            r.iops += j[dir]["iops"].as_f64().unwrap_or(0.0);
            r.ios += j[dir]["total_ios"].as_u64().unwrap_or(0);
            r.runtime_ms = r.runtime_ms.max(j[dir]["runtime"].as_u64().unwrap_or(0));
        }
    }
    Ok(r)
}

/// The `prog_id` and `map_id` of one `/proc/PID/fdinfo/N` file.
pub fn parse_fdinfo_ids(text: &str) -> (Option<u32>, Option<u32>) {
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
    };
    (field("prog_id:"), field("map_id:"))
}

/// Completed I/Os (reads + writes + discards + flushes) per device from `/proc/diskstats`.
pub fn parse_diskstats(text: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 14 {
            continue;
        }
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        // 3 reads completed, 7 writes completed, 14 discards completed, 18 flushes completed.
        let ios = num(3) + num(7) + num(14) + num(18);
        out.insert(f[2].to_string(), ios);
    }
    out
}

/// I/Os completed between two diskstats readings, summed over `devices`.
pub fn diskstats_delta(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
    devices: &BTreeSet<String>,
) -> u64 {
    devices
        .iter()
        .map(|d| {
            let a = after.get(d).copied().unwrap_or(0);
            a.saturating_sub(before.get(d).copied().unwrap_or(a))
        })
        .sum()
}

/// utime + stime (clock ticks) from `/proc/PID/stat` (the comm may hold spaces and parens).
pub fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the comm: state is field 3 of the file, utime 14 and stime 15 → indices 11, 12.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The comm of `/proc/PID/stat` (between the first `(` and the last `)`).
pub fn parse_stat_comm(stat: &str) -> Option<&str> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    (open < close).then(|| &stat[open + 1..close])
}

/// Ticks per thread name, summed over the threads that share it.
pub fn ticks_by_comm<'a>(stats: impl IntoIterator<Item = &'a str>) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for s in stats {
        if let (Some(comm), Some(t)) = (parse_stat_comm(s), parse_stat_cpu_ticks(s)) {
            *out.entry(comm.to_string()).or_insert(0) += t;
        }
    }
    out
}

/// Sample lines (not comments) of an exposition whose metric name starts with one of
/// `prefixes`.
pub fn metric_lines(exposition: &str, prefixes: &[&str]) -> Vec<String> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && prefixes.iter().any(|p| l.starts_with(p)))
        .map(str::to_string)
        .collect()
}

/// A `kB` field (`VmRSS:`, `VmHWM:`) of `/proc/PID/status`, in KiB.
pub fn parse_status_kib(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Distinct values of the `vm` label in a Prometheus/OpenMetrics exposition.
pub fn exported_vms(exposition: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in exposition.lines().filter(|l| !l.starts_with('#')) {
        let Some(open) = line.find('{') else { continue };
        let mut rest = &line[open + 1..];
        while let Some(pos) = rest.find("vm=\"") {
            // Only a label named exactly `vm` (not `xvm=`).
            let boundary = pos == 0 || matches!(rest.as_bytes()[pos - 1], b',' | b'{' | b' ');
            let value = &rest[pos + 4..];
            let end = value.find('"').unwrap_or(value.len());
            if boundary {
                out.insert(value[..end].to_string());
            }
            rest = &value[end..];
        }
    }
    out
}

/// An HTTP/1.1 response split into status code and body (a chunked body is decoded).
pub fn parse_http_response(raw: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of HTTP headers")?;
    let head = String::from_utf8_lossy(&raw[..head_end]);
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or("bad HTTP status line")?;
    let body = &raw[head_end + 4..];
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if !chunked {
        return Ok((status, body.to_vec()));
    }
    let mut out = Vec::new();
    let mut rest = body;
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunk size")?;
        let size_text = String::from_utf8_lossy(&rest[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok((status, out));
        }
        if rest.len() < size {
            return Err("truncated chunk".into());
        }
        out.extend_from_slice(&rest[..size]);
        rest = rest.get(size + 2..).unwrap_or(&[]);
    }
}

/// `BENCHMARKS.md` is one header plus one section per benchmark between markers, so that
/// `cargo xtask bench io` replaces the I/O section and keeps the others from earlier runs.
/// `fuzz` is written by `cargo xtask fuzz` through the same writer.
pub const SECTION_ORDER: [&str; 5] = ["io", "scale", "throttle", "http", "fuzz"];

fn begin_marker(name: &str) -> String {
    format!("<!-- bench:{name} begin -->")
}

fn end_marker(name: &str) -> String {
    format!("<!-- bench:{name} end -->")
}

/// The body of a section of an earlier report, markers excluded.
pub fn extract_section<'a>(report: &'a str, name: &str) -> Option<&'a str> {
    let b = begin_marker(name);
    let start = report.find(&b)? + b.len();
    let len = report[start..].find(&end_marker(name))?;
    Some(report[start..start + len].trim_matches('\n'))
}

/// The new report: `header`, then for each section in `SECTION_ORDER` the new body if there is
/// one, else the body from `existing`, else nothing.
pub fn merge_report(header: &str, existing: Option<&str>, new: &[(&str, String)]) -> String {
    let mut out = header.trim_end().to_string();
    out.push_str("\n\n");
    for name in SECTION_ORDER {
        let body = new
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, b)| b.as_str())
            .or_else(|| existing.and_then(|e| extract_section(e, name)));
        if let Some(body) = body {
            out.push_str(&begin_marker(name));
            out.push('\n');
            out.push_str(body.trim_matches('\n'));
            out.push('\n');
            out.push_str(&end_marker(name));
            out.push_str("\n\n");
        }
    }
    out.truncate(out.trim_end().len());
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_ci_takes_the_order_statistics_the_binomial_law_allows() {
        // 9 values: P(B <= 1) = 10/512, so x(2)..x(8) covers 1 - 20/512 = 96.09%; x(3)..x(7)
        // would cover only 1 - 92/512 = 82%.
        let v = [9.0, 1.0, 8.0, 2.0, 7.0, 3.0, 6.0, 4.0, 5.0];
        let ci = median_ci(&v, 0.95).unwrap();
        assert_eq!((ci.low, ci.high), (2.0, 8.0));
        assert!((ci.coverage - (1.0 - 20.0 / 512.0)).abs() < 1e-12);
        assert_eq!(ci.width(), 6.0);
        // 6 values: x(1)..x(6) covers 1 - 2/64 = 96.9%; 5 values reach only 93.75%.
        let six = median_ci(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 0.95).unwrap();
        assert_eq!((six.low, six.high), (1.0, 6.0));
        assert_eq!(median_ci(&[1.0, 2.0, 3.0, 4.0, 5.0], 0.95), None);
        assert_eq!(median_ci(&[1.0, f64::NAN, 3.0, 4.0, 5.0, 6.0], 0.95), None);
        // 20 values: x(6)..x(15) (P(B <= 5) = 0.0207).
        let twenty: Vec<f64> = (1..=20).map(f64::from).collect();
        let ci = median_ci(&twenty, 0.95).unwrap();
        assert_eq!((ci.low, ci.high), (6.0, 15.0));
    }

    #[test]
    fn bench_and_fuzz_keep_each_others_sections() {
        let old = "# B\n\n<!-- bench:io begin -->\nold\n<!-- bench:io end -->\n\n\
                   <!-- bench:fuzz begin -->\nfuzzed\n<!-- bench:fuzz end -->\n";
        let out = merge_report("# B", Some(old), &[("io", "new".to_string())]);
        assert!(out.contains("\nnew\n") && !out.contains("old"), "{out}");
        assert!(
            out.ends_with("<!-- bench:fuzz begin -->\nfuzzed\n<!-- bench:fuzz end -->\n"),
            "{out}"
        );
        let out = merge_report("# B", Some(&out), &[("fuzz", "again".to_string())]);
        assert!(
            out.contains("\nnew\n") && out.contains("\nagain\n"),
            "{out}"
        );
    }

    #[test]
    fn median_of_odd_even_empty_and_nan() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[7.0]), Some(7.0));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[1.0, f64::NAN]), None);
    }

    #[test]
    fn spread_is_range_over_median() {
        let s = spread(&[90.0, 100.0, 110.0]).unwrap();
        assert_eq!((s.min, s.max), (90.0, 110.0));
        assert!((s.range_pct - 20.0).abs() < 1e-9);
        assert_eq!(spread(&[5.0]).unwrap().range_pct, 0.0);
        assert_eq!(spread(&[]), None);
    }

    #[test]
    fn percentiles_nearest_rank() {
        let v: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(100.0));
        assert_eq!(percentile(&v, 99.0), Some(198.0));
        assert_eq!(percentile(&v, 100.0), Some(200.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&[3.0], 99.0), Some(3.0));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&v, 101.0), None);
    }

    #[test]
    fn percent_and_ns_per_and_cpu() {
        assert_eq!(percent(95.0, 100.0), Some(95.0));
        assert_eq!(percent(1.0, 0.0), None);
        assert_eq!(ns_per(1_000_000, 10_000), Some(100.0));
        assert_eq!(ns_per(5, 0), None);
        assert_eq!(cpu_percent(30, 100, 30.0), Some(1.0));
        assert_eq!(cpu_percent(30, 100, 0.0), None);
    }

    #[test]
    fn bpftool_progs_and_deltas() {
        let before = parse_bpftool_progs(
            r#"[{"id":270,"type":"tracing","name":"io_start","run_time_ns":1000,"run_cnt":10},
                {"id":271,"type":"tracing","name":"io_done"},
                {"id":9,"type":"cgroup_skb","name":"x","run_time_ns":5,"run_cnt":1}]"#,
        )
        .unwrap();
        assert_eq!(before[1].run_cnt, 0);
        let after = parse_bpftool_progs(
            r#"[{"id":270,"type":"tracing","name":"io_start","run_time_ns":3000,"run_cnt":30},
                {"id":271,"type":"tracing","name":"io_done","run_time_ns":500,"run_cnt":5}]"#,
        )
        .unwrap();
        let d = prog_deltas(&before, &after, &[270, 271, 9, 42]);
        assert_eq!(d.len(), 2);
        assert_eq!((d[0].run_time_ns, d[0].run_cnt), (2000, 20));
        assert_eq!((d[1].run_time_ns, d[1].run_cnt), (500, 5));
        assert!(parse_bpftool_progs("{}").is_err());
        assert!(parse_bpftool_progs("not json").is_err());
    }

    #[test]
    fn bpftool_maps_memlock() {
        let m = parse_bpftool_maps(
            r#"[{"id":1,"type":"percpu_hash","name":"IO_STATS","max_entries":16384,"bytes_memlock":4194304},
                {"id":2,"type":"array","name":".rodata","max_entries":1,"memlock":4096}]"#,
        )
        .unwrap();
        assert_eq!(m[0].bytes, 4194304);
        assert_eq!(m[1].bytes, 4096);
        assert_eq!(m[0].max_entries, 16384);
    }

    #[test]
    fn fio_json_with_leading_notes() {
        let out = r#"note: both iodepth >= 1 and synchronous I/O engine are selected
{"fio version":"fio-3.33","jobs":[{"jobname":"b","error":0,
 "read":{"iops":401234.5,"total_ios":4012345,"runtime":10000},
 "write":{"iops":0.0,"total_ios":0,"runtime":0}}]}"#;
        let r = parse_fio(out).unwrap();
        assert_eq!(r.ios, 4012345);
        assert!((r.iops - 401234.5).abs() < 1e-6);
        assert_eq!(r.runtime_ms, 10000);
        assert!(parse_fio("fio: error").is_err());
        assert!(
            parse_fio(r#"{"jobs":[{"error":5,"read":{},"write":{}}]}"#)
                .unwrap_err()
                .contains("error")
        );
    }

    #[test]
    fn fdinfo_ids() {
        let prog = "pos:\t0\nflags:\t02000002\nmnt_id:\t16\nino:\t1\nprog_type:\t26\nprog_jited:\t1\nprog_tag:\tab\nmemlock:\t8192\nprog_id:\t270\nrun_time_ns:\t1\nrun_cnt:\t2\n";
        assert_eq!(parse_fdinfo_ids(prog), (Some(270), None));
        let map = "pos:\t0\nmap_type:\t5\nkey_size:\t4\nmap_id:\t301\n";
        assert_eq!(parse_fdinfo_ids(map), (None, Some(301)));
        assert_eq!(parse_fdinfo_ids("pos:\t0\n"), (None, None));
    }

    #[test]
    fn diskstats_sums_ops_and_deltas() {
        let before = parse_diskstats(
            "   7       0 loop0 100 0 800 5 20 0 160 1 0 10 6 3 0 24 0 2 1\n\
             254       0 vda 10 0 80 1 1 0 8 1 0 1 2\n\
             bad line\n",
        );
        assert_eq!(before["loop0"], 100 + 20 + 3 + 2);
        // Old kernels without discard/flush fields.
        assert_eq!(before["vda"], 11);
        let after = parse_diskstats(
            "   7       0 loop0 1100 0 800 5 20 0 160 1 0 10 6 3 0 24 0 2 1\n\
             254       0 vda 15 0 80 1 1 0 8 1 0 1 2\n\
             7 1 loop1 9 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n",
        );
        let devs: BTreeSet<String> = ["loop0", "vda", "loop1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        // A device that appeared in between counts from zero of its own first reading.
        assert_eq!(diskstats_delta(&before, &after, &devs), 1000 + 5);
    }

    #[test]
    fn stat_ticks_with_odd_comm() {
        let stat = "4242 (qemu (x) 1) S 1 4242 4242 0 -1 4194560 500 0 0 0 123 45 0 0 20 0 3 0 100 1000 200";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(168));
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn thread_ticks_by_name() {
        let a = "10 (tokio-runtime-w) S 1 1 1 0 -1 0 0 0 0 0 5 1 0 0";
        let b = "11 (tokio-runtime-w) S 1 1 1 0 -1 0 0 0 0 0 2 2 0 0";
        let c = "9 (overkvm-io) S 1 1 1 0 -1 0 0 0 0 0 30 3 0 0";
        let t = ticks_by_comm([a, b, c, "junk"]);
        assert_eq!(t["tokio-runtime-w"], 10);
        assert_eq!(t["overkvm-io"], 33);
        assert_eq!(parse_stat_comm("1 (a (b)) S"), Some("a (b)"));
    }

    #[test]
    fn self_metric_lines() {
        let text = "# TYPE overkvm_sample_duration_seconds gauge\n\
            overkvm_sample_duration_seconds 0.012\n\
            overkvm_ticks_total 40\n\
            overkvm_vm_info{vm=\"a\"} 1\n";
        assert_eq!(
            metric_lines(text, &["overkvm_sample_duration", "overkvm_ticks"]),
            vec![
                "overkvm_sample_duration_seconds 0.012".to_string(),
                "overkvm_ticks_total 40".to_string()
            ]
        );
    }

    #[test]
    fn status_kib_fields() {
        let s = "Name:\toverkvm-io\nVmHWM:\t   20480 kB\nVmRSS:\t   12132 kB\n";
        assert_eq!(parse_status_kib(s, "VmRSS"), Some(12132));
        assert_eq!(parse_status_kib(s, "VmHWM"), Some(20480));
        assert_eq!(parse_status_kib(s, "VmSwap"), None);
    }

    #[test]
    fn vm_labels_counted_once() {
        let text = "# HELP overkvm_vm_info x\n\
            overkvm_vm_info{vm=\"vm001\",uuid=\"u\",pid=\"1\"} 1\n\
            overkvm_vm_io_operations_total{vm=\"vm001\",device=\"loop3\",op=\"read\"} 4\n\
            overkvm_vm_io_operations_total{device=\"loop3\",vm=\"vm002\",op=\"read\"} 4\n\
            overkvm_x{xvm=\"nope\"} 1\n\
            overkvm_device_io_operations_total{device=\"loop3\"} 8\n";
        let vms = exported_vms(text);
        assert_eq!(vms.len(), 2);
        assert!(vms.contains("vm002"));
    }

    #[test]
    fn http_plain_and_chunked() {
        let raw = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
        assert_eq!(parse_http_response(raw).unwrap(), (200, b"hello".to_vec()));
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
        assert_eq!(
            parse_http_response(raw).unwrap(),
            (200, b"hello world".to_vec())
        );
        let raw = b"HTTP/1.1 404 Not Found\r\n\r\n";
        assert_eq!(parse_http_response(raw).unwrap().0, 404);
        assert!(parse_http_response(b"HTTP/1.1 200 OK\r\n").is_err());
    }

    #[test]
    fn report_sections_are_replaced_or_kept() {
        let first = merge_report(
            "# Benchmarks",
            None,
            &[
                ("io", "## io\nold io".into()),
                ("throttle", "## t\nold t".into()),
            ],
        );
        assert!(first.starts_with("# Benchmarks\n\n<!-- bench:io begin -->\n## io\nold io\n"));
        assert_eq!(extract_section(&first, "throttle"), Some("## t\nold t"));
        assert_eq!(extract_section(&first, "scale"), None);
        let second = merge_report(
            "# Benchmarks v2",
            Some(&first),
            &[
                ("scale", "## s\nnew s".into()),
                ("io", "## io\nnew io".into()),
            ],
        );
        assert!(second.starts_with("# Benchmarks v2\n"));
        assert_eq!(extract_section(&second, "io"), Some("## io\nnew io"));
        assert_eq!(extract_section(&second, "throttle"), Some("## t\nold t"));
        let io = second.find("bench:io begin").unwrap();
        let scale = second.find("bench:scale begin").unwrap();
        let throttle = second.find("bench:throttle begin").unwrap();
        assert!(io < scale && scale < throttle);
        assert!(second.ends_with("<!-- bench:throttle end -->\n"));
    }
}
