//! The live self-check: overkvm's device totals against the kernel's own `/proc/diskstats`.
//!
//! overkvm counts a request when it starts (`block_io_start`, the point where the kernel marks
//! it in flight) and a device flush when it completes; diskstats counts both at completion.
//! So, per whole disk and op class, `overkvm since start - diskstats since start` is the number
//! of requests started and not yet completed, minus those already in flight when overkvm
//! started: bounded by the device's queue depth, and exactly 0 whenever the device is idle.
//! A difference that persists while the device is idle is a real loss, and `top` and the
//! metrics show it.

use std::collections::BTreeMap;

use serde::Serialize;

/// The `/proc/diskstats` counters parity covers, for one disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DiskCounters {
    pub reads: u64,
    pub read_sectors: u64,
    pub writes: u64,
    pub write_sectors: u64,
    pub discards: u64,
    pub discard_sectors: u64,
    pub flushes: u64,
    /// I/Os in flight now (field 9): not a counter.
    pub in_flight: u64,
}

impl DiskCounters {
    /// Adds another interval's counts (`in_flight` is a level, not summed).
    fn add(&mut self, o: &DiskCounters) {
        self.reads += o.reads;
        self.read_sectors += o.read_sectors;
        self.writes += o.writes;
        self.write_sectors += o.write_sectors;
        self.discards += o.discards;
        self.discard_sectors += o.discard_sectors;
        self.flushes += o.flushes;
    }

    fn since(&self, base: &DiskCounters) -> DiskCounters {
        DiskCounters {
            reads: self.reads.wrapping_sub(base.reads),
            read_sectors: self.read_sectors.wrapping_sub(base.read_sectors),
            writes: self.writes.wrapping_sub(base.writes),
            write_sectors: self.write_sectors.wrapping_sub(base.write_sectors),
            discards: self.discards.wrapping_sub(base.discards),
            discard_sectors: self.discard_sectors.wrapping_sub(base.discard_sectors),
            flushes: self.flushes.wrapping_sub(base.flushes),
            in_flight: self.in_flight,
        }
    }
}

/// Parses `/proc/diskstats`: disk name -> counters. Lines with fewer than the 20 fields of
/// Linux 5.5+ (flush counters) are skipped; so are malformed ones.
pub fn parse_diskstats(text: &str) -> BTreeMap<String, DiskCounters> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 20 {
            continue;
        }
        let n = |i: usize| f[i].parse::<u64>().ok();
        let (
            Some(reads),
            Some(read_sectors),
            Some(writes),
            Some(write_sectors),
            Some(in_flight),
            Some(discards),
            Some(discard_sectors),
            Some(flushes),
        ) = (n(3), n(5), n(7), n(9), n(11), n(14), n(16), n(18))
        else {
            continue;
        };
        out.insert(
            f[2].to_string(),
            DiskCounters {
                reads,
                read_sectors,
                writes,
                write_sectors,
                discards,
                discard_sectors,
                flushes,
                in_flight,
            },
        );
    }
    out
}

/// Reads `/proc/diskstats`; empty (and the check idle) when it cannot be read.
pub fn read_diskstats() -> BTreeMap<String, DiskCounters> {
    std::fs::read_to_string("/proc/diskstats")
        .map(|t| parse_diskstats(&t))
        .unwrap_or_default()
}

/// One disk's comparison since overkvm started watching it: overkvm's totals, diskstats'
/// totals, and overkvm minus diskstats per op class.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DeviceParity {
    pub device: String,
    pub overkvm: DiskCounters,
    pub diskstats: DiskCounters,
    pub difference: ParityDifference,
    /// The difference has stayed non-zero while nothing was in flight for
    /// `SETTLED_READS` reads in a row: not the in-flight skew, a real disagreement.
    pub settled: bool,
}

/// Reads in a row with nothing in flight and a non-zero difference before it counts as real.
pub const SETTLED_READS: u32 = 3;

/// overkvm minus diskstats, per op class and in sectors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ParityDifference {
    pub reads: i64,
    pub read_sectors: i64,
    pub writes: i64,
    pub write_sectors: i64,
    pub discards: i64,
    pub discard_sectors: i64,
    pub flushes: i64,
}

impl ParityDifference {
    pub fn is_zero(&self) -> bool {
        *self == ParityDifference::default()
    }

    /// (op class, ops difference): what metrics and top show.
    pub fn by_op(&self) -> [(&'static str, i64); 4] {
        [
            ("read", self.reads),
            ("write", self.writes),
            ("discard", self.discards),
            ("flush", self.flushes),
        ]
    }
}

fn diff(a: u64, b: u64) -> i64 {
    a as i64 - b as i64
}

/// overkvm's totals against diskstats' for one disk (pure).
pub fn compare(device: &str, ours: &DiskCounters, theirs: &DiskCounters) -> DeviceParity {
    DeviceParity {
        device: device.to_string(),
        overkvm: *ours,
        diskstats: *theirs,
        difference: ParityDifference {
            reads: diff(ours.reads, theirs.reads),
            read_sectors: diff(ours.read_sectors, theirs.read_sectors),
            writes: diff(ours.writes, theirs.writes),
            write_sectors: diff(ours.write_sectors, theirs.write_sectors),
            discards: diff(ours.discards, theirs.discards),
            discard_sectors: diff(ours.discard_sectors, theirs.discard_sectors),
            flushes: diff(ours.flushes, theirs.flushes),
        },
        settled: false,
    }
}

/// Cumulative totals of both sides since each disk was first seen.
#[derive(Debug, Default)]
pub struct ParityCheck {
    /// diskstats at first sight of each disk.
    base: BTreeMap<String, DiskCounters>,
    /// overkvm's totals per disk since then.
    ours: BTreeMap<String, DiskCounters>,
    /// Consecutive idle reads with a non-zero difference, per disk.
    idle_differing: BTreeMap<String, u32>,
}

impl ParityCheck {
    pub fn new() -> ParityCheck {
        ParityCheck::default()
    }

    /// Adds one interval's device rows and compares with `now` (diskstats read at the end of
    /// the interval). A disk's base is the first read that finds nothing in flight on it (so
    /// no request that started before overkvm counted completes after it), and its rows count
    /// from the interval after. Only disks where either side counted anything are returned.
    ///
    /// `rows` are the interval's (disk, counts) pairs: a disk's partitions come as rows of
    /// their disk and add up, as diskstats' disk line does.
    pub fn update<'a>(
        &mut self,
        rows: impl IntoIterator<Item = (&'a str, DiskCounters)>,
        now: &BTreeMap<String, DiskCounters>,
    ) -> Vec<DeviceParity> {
        let mut not_counted = Vec::new();
        for (disk, c) in now {
            if !self.base.contains_key(disk) {
                if c.in_flight == 0 {
                    self.base.insert(disk.clone(), *c);
                }
                not_counted.push(disk.as_str());
            }
        }
        for (disk, c) in rows.into_iter().filter(|(d, _)| !not_counted.contains(d)) {
            self.ours.entry(disk.to_string()).or_default().add(&c);
        }
        // Disks gone from diskstats (a detached loop device's line stays; a removed zram's
        // goes) are forgotten on both sides.
        self.base.retain(|d, _| now.contains_key(d));
        self.ours.retain(|d, _| now.contains_key(d));
        self.idle_differing.retain(|d, _| now.contains_key(d));
        let mut out = Vec::new();
        for (disk, c) in now {
            let Some(base) = self.base.get(disk) else {
                continue;
            };
            let theirs = c.since(base);
            let ours = self.ours.get(disk).copied().unwrap_or_default();
            let idle_since_start = DiskCounters {
                in_flight: 0,
                ..theirs
            } == DiskCounters::default();
            if ours == DiskCounters::default() && idle_since_start {
                continue;
            }
            let mut p = compare(disk, &ours, &theirs);
            p.overkvm.in_flight = c.in_flight;
            let n = self.idle_differing.entry(disk.clone()).or_default();
            *n = if c.in_flight == 0 && !p.difference.is_zero() {
                n.saturating_add(1)
            } else {
                0
            };
            p.settled = *n >= SETTLED_READS;
            out.push(p);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATS: &str = "   7       0 loop0 62 1 2226 15 6082 4146 130776 131 3 84 177 2 0 1048584 0 4011 30\n\
         7       1 loop0p1 1 0 8 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n\
       253       0 vda 10 0 80 1 5 0 40 1 0 2 2\n\
         1       0 ram0 x 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n";

    #[test]
    fn parses_diskstats_with_flush_fields_and_skips_the_rest() {
        let m = parse_diskstats(STATS);
        assert_eq!(m.len(), 2, "{m:?}");
        let l = m["loop0"];
        assert_eq!(
            (l.reads, l.read_sectors, l.writes, l.write_sectors),
            (62, 2226, 6082, 130776)
        );
        assert_eq!(
            (l.in_flight, l.discards, l.discard_sectors, l.flushes),
            (3, 2, 1048584, 4011)
        );
        assert!(!m.contains_key("vda"), "pre-5.5 lines without flush fields");
        assert!(!m.contains_key("ram0"), "malformed numbers");
        assert!(parse_diskstats("").is_empty());
        assert!(parse_diskstats("\n \n garbage\n").is_empty());
    }

    /// One interval's counts of a disk, as the report hands them in.
    fn row(disk: &str, reads: u64, writes: u64, flushes: u64) -> (&str, DiskCounters) {
        (
            disk,
            DiskCounters {
                reads,
                read_sectors: reads * 8,
                writes,
                write_sectors: writes * 8,
                flushes,
                ..DiskCounters::default()
            },
        )
    }

    fn stats(reads: u64, writes: u64, flushes: u64, in_flight: u64) -> DiskCounters {
        DiskCounters {
            reads,
            read_sectors: reads * 8,
            writes,
            write_sectors: writes * 8,
            flushes,
            in_flight,
            ..DiskCounters::default()
        }
    }

    #[test]
    fn counts_since_first_sight_and_reads_zero_when_idle() {
        let mut c = ParityCheck::new();
        let mut now = BTreeMap::new();
        now.insert("loop0".to_string(), stats(100, 50, 7, 0));
        // First sight: the base; what overkvm counted before it is not compared.
        let early = (4, 0, 0);
        assert!(
            c.update([row("loop0", early.0, early.1, early.2)], &now)
                .is_empty()
        );
        // 10 reads started, 8 completed: 2 in flight.
        let ops = (10, 0, 0);
        now.insert("loop0".to_string(), stats(108, 50, 7, 2));
        let p = c.update([row("loop0", ops.0, ops.1, ops.2)], &now);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].difference.reads, 2, "the in-flight skew");
        assert_eq!(p[0].overkvm.in_flight, 2);
        // They complete, with 3 writes and a flush: exactly 0.
        let ops = (0, 3, 1);
        now.insert("loop0".to_string(), stats(110, 53, 8, 0));
        let p = c.update([row("loop0", ops.0, ops.1, ops.2)], &now);
        assert!(p[0].difference.is_zero(), "{:?}", p[0]);
        assert_eq!(p[0].diskstats.flushes, 1);
    }

    #[test]
    fn a_lost_flush_shows_and_stays() {
        let mut c = ParityCheck::new();
        let mut now = BTreeMap::new();
        now.insert("loop0".to_string(), stats(0, 0, 0, 0));
        c.update([], &now);
        now.insert("loop0".to_string(), stats(0, 1, 2, 0));
        let ops = (0, 1, 1);
        let p = c.update([row("loop0", ops.0, ops.1, ops.2)], &now);
        assert_eq!(p[0].difference.flushes, -1);
        let p = c.update([], &now);
        assert_eq!(p[0].difference.flushes, -1, "cumulative: it does not heal");
        assert!(!p[0].settled, "two idle reads");
        let p = c.update([], &now);
        assert!(
            p[0].settled,
            "three idle reads with a difference: a real one"
        );
        assert_eq!(
            p[0].difference.by_op()[3],
            ("flush", -1),
            "named by op class for metrics"
        );
    }

    #[test]
    fn the_base_waits_for_an_idle_disk_and_busy_reads_never_settle() {
        let mut c = ParityCheck::new();
        let mut now = BTreeMap::new();
        // In flight at first sight: those complete later and overkvm never saw them start.
        now.insert("loop0".to_string(), stats(10, 0, 0, 4));
        assert!(c.update([], &now).is_empty());
        let ops = (6, 0, 0);
        now.insert("loop0".to_string(), stats(20, 0, 0, 0));
        assert!(
            c.update([row("loop0", ops.0, ops.1, ops.2)], &now)
                .is_empty(),
            "the base"
        );
        // Busy from then on: the skew is never called settled.
        for i in 1..=5 {
            now.insert("loop0".to_string(), stats(20 + 10 * i - 3, 0, 0, 3));
            let p = c.update([row("loop0", 10, 0, 0)], &now);
            assert_eq!(p[0].difference.reads, 3);
            assert!(!p[0].settled);
        }
    }

    #[test]
    fn io_before_first_sight_and_vanished_disks_are_not_differences() {
        let mut c = ParityCheck::new();
        let mut now = BTreeMap::new();
        now.insert("loop1".to_string(), stats(500, 500, 9, 0));
        c.update([], &now);
        now.clear();
        let p = c.update([], &now);
        assert!(p.is_empty());
        // Back (a loop device re-attached keeps its counters): a new base.
        now.insert("loop1".to_string(), stats(900, 900, 9, 0));
        assert!(c.update([], &now).is_empty());
    }
}
