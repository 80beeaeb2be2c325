//! The maths of a calibration, as pure functions: per-step figures, what other processes saw
//! meanwhile (from /proc/diskstats minus our own I/O), when to stop, and the suggested
//! `[[device]]` block. No files, no I/O.

use serde::Serialize;

/// What a step measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Pattern {
    RandRead,
    RandWrite,
    SeqRead,
    SeqWrite,
}

impl Pattern {
    pub fn is_write(self) -> bool {
        matches!(self, Pattern::RandWrite | Pattern::SeqWrite)
    }

    pub fn label(self) -> &'static str {
        match self {
            Pattern::RandRead => "randread",
            Pattern::RandWrite => "randwrite",
            Pattern::SeqRead => "seqread",
            Pattern::SeqWrite => "seqwrite",
        }
    }
}

/// One device's line of /proc/diskstats: the counters a calibration needs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskCounters {
    pub reads: u64,
    pub read_ms: u64,
    pub writes: u64,
    pub write_ms: u64,
}

impl DiskCounters {
    /// Counter deltas (counters only grow; a wrap or reset gives 0, not a huge number).
    pub fn delta(&self, before: &DiskCounters) -> DiskCounters {
        DiskCounters {
            reads: self.reads.saturating_sub(before.reads),
            read_ms: self.read_ms.saturating_sub(before.read_ms),
            writes: self.writes.saturating_sub(before.writes),
            write_ms: self.write_ms.saturating_sub(before.write_ms),
        }
    }
}

/// The counters of device `major:minor` in /proc/diskstats text (fields 4, 7, 8, 11 of its
/// line: reads completed, ms reading, writes completed, ms writing).
pub fn parse_diskstats(text: &str, major: u32, minor: u32) -> Option<DiskCounters> {
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 11 || f[0].parse::<u32>().ok()? != major || f[1].parse::<u32>().ok()? != minor
        {
            return None;
        }
        let n = |i: usize| f[i].parse::<u64>().ok();
        Some(DiskCounters {
            reads: n(3)?,
            read_ms: n(6)?,
            writes: n(7)?,
            write_ms: n(10)?,
        })
    })
}

/// I/O on the device during a step that was not ours.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct OthersLoad {
    pub ops: u64,
    /// Their mean latency, µs (None when they did too little I/O to say).
    pub avg_latency_us: Option<f64>,
}

/// Fewer foreign completions than this say nothing about their latency.
const MIN_OTHER_OPS: u64 = 20;

/// What others did during a step: the device's completions and busy time from diskstats,
/// minus our own completions and the sum of our latencies.
pub fn others_load(delta: &DiskCounters, our_ops: u64, our_latency_ns: u128) -> OthersLoad {
    let ops = (delta.reads + delta.writes).saturating_sub(our_ops);
    let ms = (delta.read_ms + delta.write_ms) as f64 - our_latency_ns as f64 / 1e6;
    OthersLoad {
        ops,
        avg_latency_us: (ops >= MIN_OTHER_OPS).then(|| (ms.max(0.0) * 1000.0) / ops as f64),
    }
}

/// Why to stop before the next (heavier) step, if others' latency rose: to more than twice
/// what it was before we started and by at least 1 ms, or above 5 ms when they were idle then.
pub fn stop_reason(baseline: &OthersLoad, step: &OthersLoad) -> Option<String> {
    let now = step.avg_latency_us?;
    let limit = match baseline.avg_latency_us {
        Some(b) => (2.0 * b).max(b + 1000.0),
        None => 5000.0,
    };
    (now > limit).then(|| {
        format!(
            "other processes' I/O on the device slowed to {:.2} ms on average ({} ops; {} before the calibration): stopped early",
            now / 1000.0,
            step.ops,
            baseline
                .avg_latency_us
                .map(|b| format!("{:.2} ms", b / 1000.0))
                .unwrap_or_else(|| "idle".into())
        )
    })
}

/// One measured step.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Step {
    pub pattern: Pattern,
    pub block_size: u64,
    /// I/Os kept in flight.
    pub depth: u32,
    pub seconds: f64,
    /// Our completed I/Os.
    pub ops: u64,
    pub iops: f64,
    pub mb_per_s: f64,
    pub lat_avg_us: Option<f64>,
    pub lat_p50_us: Option<f64>,
    pub lat_p95_us: Option<f64>,
    pub lat_p99_us: Option<f64>,
    /// Completions /proc/diskstats counted on the device in our direction meanwhile.
    pub device_ops: u64,
    pub others: OthersLoad,
}

/// The suggested `[[device]]` block.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Suggestion {
    /// Total IOPS budget (reads only measured), or per direction (with writes).
    pub iops: Option<u64>,
    pub read_iops: Option<u64>,
    pub write_iops: Option<u64>,
    pub latency_target_us: u64,
    /// The block, ready to paste.
    pub toml: String,
}

/// Share of the peak at which the knee is taken (as VMware SIOC's automatic threshold).
const KNEE: f64 = 0.9;

/// The knee of a random-I/O curve: the shallowest step that reaches `KNEE` of the peak IOPS.
fn knee(steps: &[&Step]) -> Option<(f64, f64)> {
    let peak = steps.iter().map(|s| s.iops).fold(0.0, f64::max);
    if peak <= 0.0 {
        return None;
    }
    steps
        .iter()
        .filter(|s| s.iops >= KNEE * peak)
        .min_by_key(|s| s.depth)
        .and_then(|s| Some((peak, s.lat_p95_us?)))
}

/// Rounds a latency up to two significant digits (in µs), at least 100 µs.
fn round_up_latency(us: f64) -> u64 {
    let us = us.max(100.0);
    let mag = 10f64.powi(us.log10().floor() as i32 - 1);
    ((us / mag).ceil() * mag) as u64
}

fn latency_text(us: u64) -> String {
    if us.is_multiple_of(1000) {
        format!("{}ms", us / 1000)
    } else {
        format!("{us}us")
    }
}

/// The suggestion from random-I/O steps: an IOPS budget at 90% of the peak (per direction
/// when writes were measured) and a latency target at the p95 the device showed at its knee,
/// with 20% headroom (a target it meets at full speed would never engage).
pub fn suggest(device: &str, steps: &[Step]) -> Option<Suggestion> {
    let of = |p: Pattern| -> Vec<&Step> { steps.iter().filter(|s| s.pattern == p).collect() };
    let (r_peak, r_lat) = knee(&of(Pattern::RandRead))?;
    let w = knee(&of(Pattern::RandWrite));
    let target = round_up_latency(1.2 * w.map_or(r_lat, |(_, l)| l.max(r_lat)));
    let budget = |peak: f64| (KNEE * peak).floor().max(1.0) as u64;
    let (iops, read_iops, write_iops) = match w {
        None => (Some(budget(r_peak)), None, None),
        Some((w_peak, _)) => (None, Some(budget(r_peak)), Some(budget(w_peak))),
    };
    let mut toml = format!("[[device]]\ndevice = \"{device}\"\n");
    for (k, v) in [
        ("iops", iops),
        ("read_iops", read_iops),
        ("write_iops", write_iops),
    ] {
        if let Some(v) = v {
            toml.push_str(&format!("{k} = {v}\n"));
        }
    }
    toml.push_str(&format!(
        "latency_target = \"{}\"\nlatency_percentile = 95\n",
        latency_text(target)
    ));
    Some(Suggestion {
        iops,
        read_iops,
        write_iops,
        latency_target_us: target,
        toml,
    })
}

/// Mount points of any of `devs` (MAJ, MIN) in /proc/self/mountinfo text.
pub fn mounts_of(mountinfo: &str, devs: &[(u32, u32)]) -> Vec<String> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let (_, _, majmin, _, point) = (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
            let (a, b) = majmin.split_once(':')?;
            let dev = (a.parse().ok()?, b.parse().ok()?);
            devs.contains(&dev).then(|| point.to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(pattern: Pattern, depth: u32, iops: f64, p95_us: f64) -> Step {
        Step {
            pattern,
            block_size: 4096,
            depth,
            seconds: 2.0,
            ops: (iops * 2.0) as u64,
            iops,
            mb_per_s: iops * 4096.0 / 1e6,
            lat_avg_us: Some(p95_us / 2.0),
            lat_p50_us: Some(p95_us / 2.0),
            lat_p95_us: Some(p95_us),
            lat_p99_us: Some(p95_us * 1.5),
            device_ops: (iops * 2.0) as u64,
            others: OthersLoad::default(),
        }
    }

    #[test]
    fn diskstats_line_is_found_by_number() {
        let text = "   7       0 loop0 10 0 80 5 0 0 0 0 0 4 5 0 0 0 0 0 0\n \
                    7       1 loop1 123 4 990 56 78 9 624 31 0 60 87 0 0 0 0 0 0\n";
        assert_eq!(
            parse_diskstats(text, 7, 1),
            Some(DiskCounters {
                reads: 123,
                read_ms: 56,
                writes: 78,
                write_ms: 31
            })
        );
        assert_eq!(parse_diskstats(text, 7, 2), None);
        assert_eq!(parse_diskstats("7 1 loop1 x y\n", 7, 1), None);
        let a = DiskCounters {
            reads: 5,
            ..Default::default()
        };
        assert_eq!(a.delta(&DiskCounters::default()).reads, 5);
        assert_eq!(
            DiskCounters::default().delta(&a).reads,
            0,
            "a reset is not a wrap"
        );
    }

    #[test]
    fn others_are_the_device_minus_us() {
        let d = DiskCounters {
            reads: 1100,
            read_ms: 300,
            writes: 0,
            write_ms: 0,
        };
        // We did 1000 reads totalling 100 ms: the other 100 took 200 ms, 2 ms each.
        let o = others_load(&d, 1000, 100_000_000);
        assert_eq!(o.ops, 100);
        assert!((o.avg_latency_us.unwrap() - 2000.0).abs() < 1e-6);
        // Too few to judge; more of ours than the device counted is not negative.
        assert_eq!(others_load(&d, 1090, 0).avg_latency_us, None);
        assert_eq!(others_load(&d, 5000, 0).ops, 0);
    }

    #[test]
    fn stops_when_others_slow_down() {
        let idle = OthersLoad::default();
        let busy = |us| OthersLoad {
            ops: 500,
            avg_latency_us: Some(us),
        };
        assert!(stop_reason(&idle, &busy(3000.0)).is_none());
        assert!(
            stop_reason(&idle, &busy(6000.0))
                .unwrap()
                .contains("6.00 ms")
        );
        // Baseline 200 µs: 1 ms more is the bar (1.2 ms), not twice (400 µs).
        assert!(stop_reason(&busy(200.0), &busy(1100.0)).is_none());
        assert!(stop_reason(&busy(200.0), &busy(1300.0)).is_some());
        // Baseline 4 ms: twice is the bar.
        assert!(stop_reason(&busy(4000.0), &busy(7000.0)).is_none());
        assert!(stop_reason(&busy(4000.0), &busy(9000.0)).is_some());
        assert!(stop_reason(&busy(4000.0), &idle).is_none());
    }

    #[test]
    fn suggestion_takes_the_knee_and_its_latency() {
        let steps = vec![
            step(Pattern::RandRead, 1, 1000.0, 1100.0),
            step(Pattern::RandRead, 4, 3500.0, 1500.0),
            step(Pattern::RandRead, 16, 9300.0, 2300.0),
            step(Pattern::RandRead, 32, 10000.0, 4100.0),
            step(Pattern::RandRead, 64, 9900.0, 8000.0),
            step(Pattern::SeqRead, 1, 400.0, 3000.0),
        ];
        let s = suggest("nvme0n1", &steps).unwrap();
        // Peak 10000; the knee is depth 16 (9300 >= 9000), p95 2.3 ms, +20% = 2.76 -> 2.8 ms.
        assert_eq!(s.iops, Some(9000));
        assert_eq!(s.latency_target_us, 2800);
        assert!(s.toml.contains("iops = 9000") && s.toml.contains("latency_target = \"2800us\""));
        let parsed = crate::config::Config::parse(&s.toml).unwrap();
        assert_eq!(parsed.devices[0].iops, Some(9000));

        let mut with_writes = steps.clone();
        with_writes.push(step(Pattern::RandWrite, 1, 500.0, 2000.0));
        with_writes.push(step(Pattern::RandWrite, 4, 2000.0, 8400.0));
        let s = suggest("sdb", &with_writes).unwrap();
        assert_eq!(
            (s.iops, s.read_iops, s.write_iops),
            (None, Some(9000), Some(1800))
        );
        assert_eq!(s.latency_target_us, 11000);
        assert!(s.toml.contains("latency_target = \"11ms\""), "{}", s.toml);
        assert!(crate::config::Config::parse(&s.toml).is_ok());

        assert!(suggest("x", &[]).is_none());
        assert!(suggest("x", &[step(Pattern::RandRead, 1, 0.0, 10.0)]).is_none());
    }

    #[test]
    fn latency_rounds_up_to_two_digits() {
        assert_eq!(round_up_latency(2760.0), 2800);
        assert_eq!(round_up_latency(12.0), 100);
        assert_eq!(round_up_latency(10_001.0), 11_000);
        assert_eq!(round_up_latency(10_000.0), 10_000);
    }

    #[test]
    fn mounts_of_a_device_and_its_partitions() {
        let mi = "22 1 7:3 / /mnt/a rw,relatime shared:1 - ext4 /dev/loop3 rw\n\
                  23 1 8:1 / /boot rw - ext4 /dev/sda1 rw\n\
                  bad line\n";
        assert_eq!(mounts_of(mi, &[(7, 3)]), vec!["/mnt/a"]);
        assert_eq!(mounts_of(mi, &[(8, 0), (8, 1)]), vec!["/boot"]);
        assert!(mounts_of(mi, &[(7, 4)]).is_empty());
    }
}
