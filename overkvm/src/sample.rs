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
use aya::maps::{
    Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues, Queue,
};
use overkvm_common::{HEALTH_SLOTS, IoCounters, IoKey, IoStats, KeySlot, LAT_BUCKETS, Op, maps};

use crate::{
    bpf::Programs,
    identity::{ProcessIdentity, early::EarlyNames},
};

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

/// A latency histogram of one interval: completions per log2 bucket (`lat_bucket`) and the
/// exact sum of their latencies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Histogram {
    pub counts: [u64; LAT_BUCKETS as usize],
    pub total_ns: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: [0; LAT_BUCKETS as usize],
            total_ns: 0,
        }
    }
}

impl Histogram {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    pub fn sum_ns(&self) -> u64 {
        self.total_ns
    }

    /// Adds `n` completions of `ns` each (tests and synthetic data).
    pub fn record(&mut self, ns: u64, n: u64) {
        self.counts[overkvm_common::lat_bucket(ns) as usize] += n;
        self.total_ns += ns * n;
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.total_ns += other.total_ns;
    }

    pub fn is_empty(&self) -> bool {
        self.counts.iter().all(|&c| c == 0)
    }
}

/// Cumulative latency of one key as the kernel keeps it: bucket counts summed over the CPUs
/// modulo 2^32 (the kernel's per-CPU counters are `u32` and wrap), and the sum of ns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawLatency {
    pub counts: [u32; LAT_BUCKETS as usize],
    pub sum_ns: u64,
}

impl Default for RawLatency {
    fn default() -> Self {
        RawLatency {
            counts: [0; LAT_BUCKETS as usize],
            sum_ns: 0,
        }
    }
}

impl RawLatency {
    fn add_cpu(&mut self, v: &IoStats) {
        for (a, b) in self.counts.iter_mut().zip(v.lat.iter()) {
            *a = a.wrapping_add(*b);
        }
        self.sum_ns = self.sum_ns.wrapping_add(v.lat_sum_ns);
    }

    fn total(&self) -> u64 {
        self.counts.iter().map(|&c| u64::from(c)).sum()
    }

    /// What happened since `older`: counts modulo 2^32, exact while fewer than 2^32 completions
    /// fall into one bucket of one key between two reads.
    pub fn since(&self, older: &RawLatency) -> Histogram {
        let mut out = Histogram::default();
        for (i, c) in out.counts.iter_mut().enumerate() {
            *c = u64::from(self.counts[i].wrapping_sub(older.counts[i]));
        }
        out.total_ns = self.sum_ns.wrapping_sub(older.sum_ns);
        out
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
    pub latency: HashMap<IoKey, RawLatency>,
    /// The `IO_STATS` slot of each request key (for pruning).
    pub slots: HashMap<IoKey, KeySlot>,
    /// Device flushes charged to each request key's slot; they are also in `requests` under
    /// the key's `flush_key`.
    pub flushes: HashMap<IoKey, u64>,
    /// `comm` the kernel recorded for each tgid, for processes gone before we read /proc.
    pub comms: HashMap<u32, String>,
    /// Processes named at their first I/O since the previous snapshot (see
    /// `identity::early`): they may be gone by now.
    pub early_names: HashMap<u32, std::sync::Arc<ProcessIdentity>>,
    /// Processes that exec'd since the previous snapshot, after doing I/O: what is cached
    /// about them describes the program before the exec.
    pub execed: std::collections::HashSet<u32>,
    /// New processes that could not be kept for naming since the previous snapshot (counted,
    /// not silent: such a process is named only if it lives until the next interval).
    pub early_names_dropped: u64,
    /// Completions and flushes counted for exited processes in the instant their keys were
    /// pruned, after their final values were read (see `Sampler::prune`): in no row, counted.
    pub counted_after_prune: u64,
    pub health: [u64; HEALTH_SLOTS as usize],
    /// Entries and capacity of each counting map, by the name metrics and JSON show.
    pub fill: Vec<(&'static str, MapFill)>,
    /// Map entries that could not be read (deleted while iterating), and map writes of pruning
    /// that failed; counted, not fatal.
    pub read_errors: u64,
}

impl Snapshot {
    pub fn empty() -> Snapshot {
        Snapshot {
            at: Instant::now(),
            wall: SystemTime::now(),
            requests: HashMap::new(),
            bios: HashMap::new(),
            latency: HashMap::new(),
            slots: HashMap::new(),
            flushes: HashMap::new(),
            comms: HashMap::new(),
            early_names: HashMap::new(),
            execed: Default::default(),
            early_names_dropped: 0,
            counted_after_prune: 0,
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
            let d = h.since(prev.latency.get(k).unwrap_or(&RawLatency::default()));
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

/// One slot's per-CPU copies summed: the key's requests, their latency, and the device
/// flushes charged to the key's submitter.
struct SlotTotals {
    requests: Counters,
    latency: RawLatency,
    flushes: u64,
}

fn fold_stats<'a>(per_cpu: impl Iterator<Item = &'a IoStats>) -> SlotTotals {
    let mut t = SlotTotals {
        requests: Counters::default(),
        latency: RawLatency::default(),
        flushes: 0,
    };
    for v in per_cpu {
        t.requests.ops += v.io.ops;
        t.requests.bytes += v.io.bytes;
        t.flushes += v.flushes;
        t.latency.add_cpu(v);
    }
    t
}

/// The key under which the device flushes charged to `key`'s slot are reported: the same
/// process, device and cgroup, op `Flush`.
pub fn flush_key(key: &IoKey) -> IoKey {
    IoKey {
        op: Op::Flush as u8,
        ..*key
    }
}

/// What a snapshot saw of a slot: the counts that can still grow after its process exited
/// (completions and flushes of requests it left in flight) and its requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Seen {
    ops: u64,
    completions: u64,
    flushes: u64,
}

impl Seen {
    fn of(t: &SlotTotals) -> Seen {
        Seen {
            ops: t.requests.ops,
            completions: t.latency.total(),
            flushes: t.flushes,
        }
    }

    /// Counts in `self` that `earlier` had not seen.
    fn beyond(&self, earlier: &Seen) -> u64 {
        self.ops.saturating_sub(earlier.ops)
            + self.completions.saturating_sub(earlier.completions)
            + self.flushes.saturating_sub(earlier.flushes)
    }
}

/// A slot pruned last round, and what its key's final snapshot saw of it.
struct Retiring {
    index: u32,
    seen: Seen,
}

/// Reads snapshots from the loaded programs.
pub struct Sampler {
    programs: Programs,
    /// Slots of keys pruned last round: out of `IO_KEYS`, their generation moved on, so the
    /// programs count nothing more into them. Read a last time, reset and handed back to the
    /// kernel next round (a program that checked the old generation just before has long
    /// finished by then).
    retiring: Vec<Retiring>,
    /// Counts that reached a slot between its final read and its new generation (see
    /// `retire`), reported with the next snapshot.
    counted_after_prune: std::cell::Cell<u64>,
    /// Map writes of pruning that failed since the last snapshot (a slot then stays out of
    /// circulation); the next snapshot reports them with its read errors.
    recycle_errors: std::cell::Cell<u64>,
    /// Names processes at their first I/O; None when the ring buffer could not be opened
    /// (then processes are named at the next tick, as long as they live).
    early: Option<EarlyNames>,
}

fn comm_string(raw: &[u8; 16]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

impl Sampler {
    pub fn new(mut programs: Programs) -> Sampler {
        let early = match programs
            .ebpf_mut()
            .take_map(maps::NEW_TGIDS)
            .ok_or_else(|| anyhow::anyhow!("map NEW_TGIDS missing"))
            .and_then(|m| Ok(aya::maps::RingBuf::try_from(m)?))
            .and_then(|ring| Ok(EarlyNames::start(ring)?))
        {
            Ok(e) => Some(e),
            Err(e) => {
                log::warn!(
                    "cannot name processes at their first I/O ({e:#}): short-lived processes \
                     are named only if they live until the next interval"
                );
                None
            }
        };
        Sampler {
            programs,
            retiring: Vec::new(),
            counted_after_prune: std::cell::Cell::new(0),
            recycle_errors: std::cell::Cell::new(0),
            early,
        }
    }

    pub fn programs(&self) -> &Programs {
        &self.programs
    }

    /// The programs, to attach or detach one (`parity.rs` hides completions from a hook).
    pub fn programs_mut(&mut self) -> &mut Programs {
        &mut self.programs
    }

    /// Attaches the bio hook once a bio-based device exists (see `Programs::refresh_bio_hook`),
    /// logging which devices made it so; call once per interval. A failure is logged, not fatal:
    /// requests are still counted.
    pub fn refresh_bio_hook(&mut self) {
        match self.programs.refresh_bio_hook() {
            Ok(Some(disks)) => log::info!(
                "bio-based device(s) {} present: counting bios on block_bio_queue",
                disks.join(", ")
            ),
            Ok(None) => {}
            Err(e) => log::warn!("cannot attach the bio hook: {e:#}"),
        }
    }

    /// Deletes the map entries of processes that have exited, once a snapshot holding their
    /// final values has been taken (`snap`), so the maps do not fill up with the dead on a
    /// host that starts many short-lived processes. Deltas stay right: a key missing from the
    /// next snapshot contributes nothing. Returns how many entries were deleted.
    ///
    /// An entry whose value changed since `snap` is kept (a new process reusing the PID, or a
    /// completion or flush of the dead one: the next snapshot reports it).
    ///
    /// A request key leaves in two steps. Now: out of `IO_KEYS`, and its slot's generation
    /// moves on, so that nothing counts into the slot any more (completions still in flight
    /// are counted lost by generation). Next round (`retire`): the slot is read a last time,
    /// reset and handed back. What landed between the check against `snap` and the new
    /// generation is counted (`counted_after_prune`), never silently dropped.
    pub fn prune(&mut self, snap: &Snapshot, alive: impl Fn(u32) -> bool) -> usize {
        let dead = |k: &IoKey| k.tgid != 0 && !alive(k.tgid);
        let mut deleted = 0;
        self.retire();
        let ebpf = self.programs.ebpf_mut();
        let mut freed = Vec::new();
        if let Some(stats) = ebpf.map(maps::IO_STATS)
            && let Ok(stats) = PerCpuArray::<&MapData, IoStats>::try_from(stats)
        {
            for (key, seen) in snap.requests.iter().filter(|(k, _)| dead(k)) {
                let Some(slot) = snap.slots.get(key) else {
                    continue;
                };
                let seen = Seen {
                    ops: seen.ops,
                    completions: snap.latency.get(key).map_or(0, RawLatency::total),
                    flushes: snap.flushes.get(key).copied().unwrap_or(0),
                };
                let unchanged = stats
                    .get(&slot.index, 0)
                    .is_ok_and(|per_cpu| Seen::of(&fold_stats(per_cpu.iter())) == seen);
                if unchanged {
                    freed.push((*key, *slot, seen));
                }
            }
        }
        let mut removed = Vec::new();
        if let Some(keys) = ebpf.map_mut(maps::IO_KEYS)
            && let Ok(mut keys) = BpfHashMap::<&mut MapData, IoKey, KeySlot>::try_from(keys)
        {
            for (key, slot, seen) in freed {
                if keys.remove(&key).is_ok() {
                    deleted += 1;
                    removed.push((slot, seen));
                }
            }
        }
        // A new generation at once: the kernel's per-CPU key caches, in-flight entries and
        // flush owners may still name the slot, and must stop counting into it now.
        if let Some(generations) = ebpf.map_mut(maps::SLOT_GENERATIONS)
            && let Ok(mut generations) = Array::<&mut MapData, u32>::try_from(generations)
        {
            for (slot, seen) in removed {
                match generations.set(slot.index, slot.generation.wrapping_add(1), 0) {
                    Ok(()) => self.retiring.push(Retiring {
                        index: slot.index,
                        seen,
                    }),
                    // Left out of circulation rather than handed out while still counted into.
                    Err(_) => self.recycle_errors.set(self.recycle_errors.get() + 1),
                }
            }
        }
        if let Some(map) = ebpf.map_mut(maps::BIO_STATS)
            && let Ok(mut table) = PerCpuHashMap::<&mut MapData, IoKey, IoCounters>::try_from(map)
        {
            // Bios are counted only in their submitter's context: a dead process adds none.
            for (key, seen) in snap.bios.iter().filter(|(k, _)| dead(k)) {
                let unchanged = table
                    .get(key, 0)
                    .is_ok_and(|per_cpu| per_cpu.iter().map(|v| v.ops).sum::<u64>() == seen.ops);
                if unchanged && table.remove(key).is_ok() {
                    deleted += 1;
                }
            }
        }
        deleted
    }

    /// Second step of pruning: the slots pruned last round are read a last time (what landed
    /// after their final snapshot is counted), reset, and handed back to the kernel's free
    /// queue.
    fn retire(&mut self) {
        if self.retiring.is_empty() {
            return;
        }
        let cpus = self.programs.cpus;
        let ebpf = self.programs.ebpf_mut();
        let mut reset = Vec::new();
        if let Some(stats) = ebpf.map_mut(maps::IO_STATS)
            && let Ok(mut stats) = PerCpuArray::<&mut MapData, IoStats>::try_from(stats)
        {
            for r in self.retiring.drain(..) {
                if let Ok(per_cpu) = stats.get(&r.index, 0) {
                    let late = Seen::of(&fold_stats(per_cpu.iter())).beyond(&r.seen);
                    self.counted_after_prune
                        .set(self.counted_after_prune.get() + late);
                }
                let values = PerCpuValues::try_from(vec![IoStats::default(); cpus]);
                match values.map(|v| stats.set(r.index, v, 0)) {
                    Ok(Ok(())) => reset.push(r.index),
                    // Left out of circulation rather than handed out with stale counts.
                    _ => self.recycle_errors.set(self.recycle_errors.get() + 1),
                }
            }
        }
        if let Some(free) = ebpf.map_mut(maps::FREE_SLOTS)
            && let Ok(mut free) = Queue::<&mut MapData, u32>::try_from(free)
        {
            for index in reset {
                if free.push(index, 0).is_err() {
                    self.recycle_errors.set(self.recycle_errors.get() + 1);
                }
            }
        }
    }

    /// Reads every map once.
    pub fn snapshot(&self) -> anyhow::Result<Snapshot> {
        let ebpf = self.programs.ebpf();
        let mut snap = Snapshot::empty();
        let mut read_errors = 0u64;

        /// Sums one key's per-CPU counters and keeps the comm its first CPU recorded.
        fn fold<'a>(
            key: &IoKey,
            per_cpu: impl Iterator<Item = &'a IoCounters>,
            comms: &mut HashMap<u32, String>,
        ) -> Counters {
            let mut c = Counters::default();
            for v in per_cpu {
                c.ops += v.ops;
                c.bytes += v.bytes;
                if v.comm[0] != 0 {
                    comms
                        .entry(key.tgid)
                        .or_insert_with(|| comm_string(&v.comm));
                }
            }
            c
        }

        let keys = ebpf.map(maps::IO_KEYS).context("map IO_KEYS missing")?;
        let keys: BpfHashMap<&MapData, IoKey, KeySlot> =
            BpfHashMap::try_from(keys).context("opening map IO_KEYS")?;
        let stats = ebpf.map(maps::IO_STATS).context("map IO_STATS missing")?;
        let stats: PerCpuArray<&MapData, IoStats> =
            PerCpuArray::try_from(stats).context("opening map IO_STATS")?;
        for item in keys.iter() {
            let Ok((key, slot)) = item else {
                read_errors += 1;
                continue;
            };
            let Ok(per_cpu) = stats.get(&slot.index, 0) else {
                read_errors += 1;
                continue;
            };
            let t = fold_stats(per_cpu.iter());
            if let Some(comm) = per_cpu.iter().find(|v| v.io.comm[0] != 0) {
                snap.comms
                    .entry(key.tgid)
                    .or_insert_with(|| comm_string(&comm.io.comm));
            }
            snap.requests.entry(key).or_default().add(t.requests);
            snap.slots.insert(key, slot);
            if t.latency.total() != 0 || t.latency.sum_ns != 0 {
                snap.latency.insert(key, t.latency);
            }
            if t.flushes != 0 {
                snap.flushes.insert(key, t.flushes);
                snap.requests
                    .entry(flush_key(&key))
                    .or_default()
                    .add(Counters {
                        ops: t.flushes,
                        bytes: 0,
                    });
            }
        }
        let map = ebpf.map(maps::BIO_STATS).context("map BIO_STATS missing")?;
        let table: PerCpuHashMap<&MapData, IoKey, IoCounters> =
            PerCpuHashMap::try_from(map).context("opening map BIO_STATS")?;
        for item in table.iter() {
            let Ok((key, per_cpu)) = item else {
                read_errors += 1;
                continue;
            };
            let c = fold(&key, per_cpu.iter(), &mut snap.comms);
            snap.bios.insert(key, c);
        }
        let programs = &self.programs;
        snap.fill = vec![
            (
                "io_stats",
                MapFill {
                    entries: snap.requests.len() as u64,
                    capacity: programs.io_stats_capacity.into(),
                },
            ),
            (
                "bio_stats",
                MapFill {
                    entries: snap.bios.len() as u64,
                    capacity: programs.bio_stats_capacity.into(),
                },
            ),
        ];

        let map = ebpf.map(maps::HEALTH).context("map HEALTH missing")?;
        let health: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).context("opening map HEALTH")?;
        for slot in 0..HEALTH_SLOTS {
            if let Ok(values) = health.get(&slot, 0) {
                snap.health[slot as usize] = values.iter().sum();
            }
        }
        snap.read_errors = read_errors + self.recycle_errors.take();
        snap.counted_after_prune = self.counted_after_prune.take();
        if let Some(early) = &self.early {
            let named = early.take();
            snap.early_names = named.idents;
            snap.execed = named.execed;
            snap.early_names_dropped = early.take_dropped();
        }
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
        let mut h1 = RawLatency::default();
        h1.counts[10] = 2;
        h1.sum_ns = 2500;
        let mut h2 = h1.clone();
        h2.counts[10] += 3;
        h2.counts[12] = 1;
        h2.sum_ns += 3000 + 5000;
        a.latency.insert(key(1, Op::Read), h1);
        b.latency.insert(key(1, Op::Read), h2);
        a.health[4] = 7;
        b.health[4] = 9;
        let d = delta(&a, &b);
        let h = &d.latency[&key(1, Op::Read)];
        assert_eq!(h.count(), 4);
        assert_eq!((h.counts[10], h.counts[12]), (3, 1));
        assert_eq!(h.sum_ns(), 8000);
        assert_eq!(d.health[4], 2);
    }

    #[test]
    fn histogram_delta_survives_wrapping_kernel_counters() {
        // The kernel's per-CPU bucket counts are u32: across a wrap the difference is still
        // the number of completions in between.
        let mut a = Snapshot::empty();
        let mut b = Snapshot::empty();
        let mut h1 = RawLatency::default();
        h1.counts[20] = u32::MAX - 1;
        let mut h2 = RawLatency::default();
        h2.counts[20] = 3;
        a.latency.insert(key(1, Op::Write), h1);
        b.latency.insert(key(1, Op::Write), h2);
        let d = delta(&a, &b);
        assert_eq!(d.latency[&key(1, Op::Write)].counts[20], 5);
    }
}
