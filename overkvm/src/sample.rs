//! Snapshots of the kernel maps and the deltas between two of them.
//!
//! The maps are cumulative and per CPU; a `Snapshot` sums the CPUs, and `Delta` subtracts two
//! snapshots. Every consumer (top, exporter, throttle) works from deltas of one sampler, never
//! from the maps directly.

use std::{
    collections::HashMap,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use aya::maps::{MapData, PerCpuArray, PerCpuHashMap};
use overkvm_common::{
    HEALTH_SLOTS, IoCounters, IoKey, LAT_BUCKETS, LatKey, LatValue, capacity, maps,
};

use crate::bpf::Programs;

/// Ops and bytes of one key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    pub ops: u64,
    pub bytes: u64,
}

impl Counters {
    fn saturating_sub(self, older: Counters) -> Counters {
        Counters {
            ops: self.ops.saturating_sub(older.ops),
            bytes: self.bytes.saturating_sub(older.bytes),
        }
    }

    pub fn add(&mut self, other: Counters) {
        self.ops += other.ops;
        self.bytes += other.bytes;
    }
}

/// A latency histogram: per log2 bucket, count and sum of ns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Histogram {
    pub buckets: [LatValue; LAT_BUCKETS as usize],
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: [LatValue::default(); LAT_BUCKETS as usize],
        }
    }
}

impl Histogram {
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.count).sum()
    }

    pub fn sum_ns(&self) -> u64 {
        self.buckets.iter().map(|b| b.sum_ns).sum()
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            a.count += b.count;
            a.sum_ns += b.sum_ns;
        }
    }

    fn saturating_sub(&self, older: &Histogram) -> Histogram {
        let mut out = Histogram::default();
        for (i, b) in out.buckets.iter_mut().enumerate() {
            b.count = self.buckets[i].count.saturating_sub(older.buckets[i].count);
            b.sum_ns = self.buckets[i]
                .sum_ns
                .saturating_sub(older.buckets[i].sum_ns);
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.iter().all(|b| b.count == 0)
    }
}

/// Entries and capacity of one map, to show how close it is to dropping.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct MapFill {
    pub entries: u64,
    pub capacity: u64,
}

/// All cumulative kernel counters at one instant.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub at: Instant,
    pub wall: SystemTime,
    /// Requests at submission (request-based devices).
    pub requests: HashMap<IoKey, Counters>,
    /// Bios at submission (every device).
    pub bios: HashMap<IoKey, Counters>,
    pub latency: HashMap<IoKey, Histogram>,
    /// `comm` the kernel recorded for each tgid, for processes gone before we read /proc.
    pub comms: HashMap<u32, String>,
    pub health: [u64; HEALTH_SLOTS as usize],
    /// Entries and capacity of each counting map, by the name metrics and JSON show.
    pub fill: Vec<(&'static str, MapFill)>,
    /// Map entries that could not be read (deleted while iterating); counted, not fatal.
    pub read_errors: u64,
}

impl Snapshot {
    /// Fill of the map shown as `name` (zero when there is no such map).
    pub fn map_fill(&self, name: &str) -> MapFill {
        self.fill
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, f)| *f)
            .unwrap_or_default()
    }

    pub fn empty() -> Snapshot {
        Snapshot {
            at: Instant::now(),
            wall: SystemTime::now(),
            requests: HashMap::new(),
            bios: HashMap::new(),
            latency: HashMap::new(),
            comms: HashMap::new(),
            health: [0; HEALTH_SLOTS as usize],
            fill: Vec::new(),
            read_errors: 0,
        }
    }
}

/// What happened between two snapshots.
#[derive(Clone, Debug, Default)]
pub struct Delta {
    pub interval: Duration,
    pub wall: Option<SystemTime>,
    pub requests: HashMap<IoKey, Counters>,
    pub bios: HashMap<IoKey, Counters>,
    pub latency: HashMap<IoKey, Histogram>,
    pub health: [u64; HEALTH_SLOTS as usize],
}

/// `cur - prev`, key by key. A key missing from `prev` counts whole (it appeared in between);
/// a key missing from `cur` contributes nothing; counters never go negative.
pub fn delta(prev: &Snapshot, cur: &Snapshot) -> Delta {
    fn diff(
        prev: &HashMap<IoKey, Counters>,
        cur: &HashMap<IoKey, Counters>,
    ) -> HashMap<IoKey, Counters> {
        cur.iter()
            .filter_map(|(k, v)| {
                let d = match prev.get(k) {
                    Some(p) => v.saturating_sub(*p),
                    None => *v,
                };
                (d.ops != 0 || d.bytes != 0).then_some((*k, d))
            })
            .collect()
    }
    let latency = cur
        .latency
        .iter()
        .filter_map(|(k, h)| {
            let d = match prev.latency.get(k) {
                Some(p) => h.saturating_sub(p),
                None => h.clone(),
            };
            (!d.is_empty()).then_some((*k, d))
        })
        .collect();
    let mut health = [0; HEALTH_SLOTS as usize];
    for (i, h) in health.iter_mut().enumerate() {
        *h = cur.health[i].saturating_sub(prev.health[i]);
    }
    Delta {
        interval: cur.at.saturating_duration_since(prev.at),
        wall: Some(cur.wall),
        requests: diff(&prev.requests, &cur.requests),
        bios: diff(&prev.bios, &cur.bios),
        latency,
        health,
    }
}

/// Reads snapshots from the loaded programs.
pub struct Sampler {
    programs: Programs,
}

fn comm_string(raw: &[u8; 16]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

impl Sampler {
    pub fn new(programs: Programs) -> Sampler {
        Sampler { programs }
    }

    pub fn programs(&self) -> &Programs {
        &self.programs
    }

    /// Deletes the map entries of processes that have exited, once a snapshot holding their
    /// final values has been taken (`snap`), so the maps do not fill up with the dead on a
    /// host that starts many short-lived processes. Deltas stay right: a key missing from the
    /// next snapshot contributes nothing. Returns how many entries were deleted.
    ///
    /// An entry whose value changed since `snap` is kept (a new process reusing the PID).
    pub fn prune(&mut self, snap: &Snapshot, alive: impl Fn(u32) -> bool) -> usize {
        let dead = |k: &IoKey| k.tgid != 0 && !alive(k.tgid);
        let mut deleted = 0;
        let ebpf = self.programs.ebpf_mut();
        for (name, values) in [
            (maps::IO_STATS, &snap.requests),
            (maps::BIO_STATS, &snap.bios),
        ] {
            let Some(map) = ebpf.map_mut(name) else {
                continue;
            };
            let Ok(mut table) = PerCpuHashMap::<&mut MapData, IoKey, IoCounters>::try_from(map)
            else {
                continue;
            };
            for (key, seen) in values.iter().filter(|(k, _)| dead(k)) {
                let unchanged = table.get(key, 0).is_ok_and(|per_cpu| {
                    let ops: u64 = per_cpu.iter().map(|v| v.ops).sum();
                    ops == seen.ops
                });
                if unchanged && table.remove(key).is_ok() {
                    deleted += 1;
                }
            }
        }
        if let Some(map) = ebpf.map_mut(maps::LATENCY)
            && let Ok(mut table) = PerCpuHashMap::<&mut MapData, LatKey, LatValue>::try_from(map)
        {
            for (io, hist) in snap.latency.iter().filter(|(k, _)| dead(k)) {
                for (bucket, seen) in hist.buckets.iter().enumerate() {
                    if seen.count == 0 {
                        continue;
                    }
                    let lk = LatKey {
                        io: *io,
                        bucket: bucket as u32,
                        _pad: 0,
                    };
                    let unchanged = table.get(&lk, 0).is_ok_and(|per_cpu| {
                        per_cpu.iter().map(|v| v.count).sum::<u64>() == seen.count
                    });
                    if unchanged && table.remove(&lk).is_ok() {
                        deleted += 1;
                    }
                }
            }
        }
        deleted
    }

    /// Reads every map once.
    pub fn snapshot(&self) -> anyhow::Result<Snapshot> {
        let ebpf = self.programs.ebpf();
        let mut snap = Snapshot::empty();
        let mut read_errors = 0u64;

        let mut read_counters = |name: &str,
                                 capacity: u64,
                                 out: &mut HashMap<IoKey, Counters>,
                                 comms: &mut HashMap<u32, String>|
         -> anyhow::Result<MapFill> {
            let map = ebpf
                .map(name)
                .with_context(|| format!("map {name} missing"))?;
            let table: PerCpuHashMap<&MapData, IoKey, IoCounters> =
                PerCpuHashMap::try_from(map).with_context(|| format!("opening map {name}"))?;
            for item in table.iter() {
                let Ok((key, per_cpu)) = item else {
                    read_errors += 1;
                    continue;
                };
                let mut c = Counters::default();
                for v in per_cpu.iter() {
                    c.ops += v.ops;
                    c.bytes += v.bytes;
                    if v.comm[0] != 0 {
                        comms
                            .entry(key.tgid)
                            .or_insert_with(|| comm_string(&v.comm));
                    }
                }
                out.insert(key, c);
            }
            Ok(MapFill {
                entries: out.len() as u64,
                capacity,
            })
        };
        let io_fill = read_counters(
            maps::IO_STATS,
            capacity::IO_STATS as u64,
            &mut snap.requests,
            &mut snap.comms,
        )?;
        let bio_fill = read_counters(
            maps::BIO_STATS,
            capacity::BIO_STATS as u64,
            &mut snap.bios,
            &mut snap.comms,
        )?;

        let map = ebpf.map(maps::LATENCY).context("map LATENCY missing")?;
        let capacity = capacity::LATENCY as u64;
        let table: PerCpuHashMap<&MapData, LatKey, LatValue> =
            PerCpuHashMap::try_from(map).context("opening map LATENCY")?;
        let mut entries = 0;
        for item in table.iter() {
            let Ok((key, per_cpu)) = item else {
                read_errors += 1;
                continue;
            };
            entries += 1;
            let bucket = (key.bucket as usize).min(LAT_BUCKETS as usize - 1);
            let h = snap.latency.entry(key.io).or_default();
            for v in per_cpu.iter() {
                h.buckets[bucket].count += v.count;
                h.buckets[bucket].sum_ns += v.sum_ns;
            }
        }
        snap.fill = vec![
            ("io_stats", io_fill),
            ("bio_stats", bio_fill),
            ("latency", MapFill { entries, capacity }),
        ];

        let map = ebpf.map(maps::HEALTH).context("map HEALTH missing")?;
        let health: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).context("opening map HEALTH")?;
        for slot in 0..HEALTH_SLOTS {
            if let Ok(values) = health.get(&slot, 0) {
                snap.health[slot as usize] = values.iter().sum();
            }
        }
        snap.read_errors = read_errors;
        snap.at = Instant::now();
        snap.wall = SystemTime::now();
        Ok(snap)
    }
}

#[cfg(test)]
mod tests {
    use overkvm_common::Op;

    use super::*;

    fn key(tgid: u32, op: Op) -> IoKey {
        IoKey {
            tgid,
            dev: 7 << 20,
            cgroup_id: 1,
            op: op as u8,
            _pad: [0; 7],
        }
    }

    #[test]
    fn delta_counts_new_keys_whole_and_ignores_vanished_ones() {
        let mut a = Snapshot::empty();
        let mut b = Snapshot::empty();
        a.requests.insert(
            key(1, Op::Read),
            Counters {
                ops: 10,
                bytes: 40960,
            },
        );
        a.requests
            .insert(key(2, Op::Read), Counters { ops: 5, bytes: 5 });
        b.requests.insert(
            key(1, Op::Read),
            Counters {
                ops: 15,
                bytes: 61440,
            },
        );
        b.requests.insert(
            key(3, Op::Write),
            Counters {
                ops: 2,
                bytes: 8192,
            },
        );
        let d = delta(&a, &b);
        assert_eq!(
            d.requests[&key(1, Op::Read)],
            Counters {
                ops: 5,
                bytes: 20480
            }
        );
        assert_eq!(
            d.requests[&key(3, Op::Write)],
            Counters {
                ops: 2,
                bytes: 8192
            }
        );
        assert!(!d.requests.contains_key(&key(2, Op::Read)));
    }

    #[test]
    fn delta_never_goes_negative_and_drops_idle_keys() {
        let mut a = Snapshot::empty();
        let mut b = Snapshot::empty();
        a.requests
            .insert(key(1, Op::Read), Counters { ops: 10, bytes: 10 });
        b.requests
            .insert(key(1, Op::Read), Counters { ops: 3, bytes: 3 });
        a.bios
            .insert(key(4, Op::Write), Counters { ops: 1, bytes: 1 });
        b.bios
            .insert(key(4, Op::Write), Counters { ops: 1, bytes: 1 });
        let d = delta(&a, &b);
        assert!(d.requests.is_empty());
        assert!(d.bios.is_empty());
    }

    #[test]
    fn histogram_delta_is_per_bucket() {
        let mut a = Snapshot::empty();
        let mut b = Snapshot::empty();
        let mut h1 = Histogram::default();
        h1.buckets[10] = LatValue {
            count: 2,
            sum_ns: 2500,
        };
        let mut h2 = h1.clone();
        h2.buckets[10].count += 3;
        h2.buckets[10].sum_ns += 3000;
        h2.buckets[12].count = 1;
        h2.buckets[12].sum_ns = 5000;
        a.latency.insert(key(1, Op::Read), h1);
        b.latency.insert(key(1, Op::Read), h2);
        a.health[4] = 7;
        b.health[4] = 9;
        let d = delta(&a, &b);
        let h = &d.latency[&key(1, Op::Read)];
        assert_eq!(h.count(), 4);
        assert_eq!(h.sum_ns(), 8000);
        assert_eq!(d.health[4], 2);
    }
}
