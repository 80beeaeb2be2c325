//! The maps, their bounds, and the counting primitives every hook shares.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::bpf_get_current_comm,
    macros::map,
    maps::{Array, PerCpuArray, PerCpuHashMap},
};
use overkvm_common::{
    BioInflight, HEALTH_SLOTS, Health, INFLIGHT_SLOTS, Inflight, IoCounters, IoKey, IoStats,
    bio_slot, capacity, inflight_slot, lat_bucket,
};

/// Requests with their latency histograms (userspace lowers the capacity on hosts with many
/// CPUs: each entry holds one value per CPU).
#[map]
pub static IO_STATS: PerCpuHashMap<IoKey, IoStats> =
    PerCpuHashMap::with_max_entries(capacity::IO_STATS, 0);

#[map]
pub static BIO_STATS: PerCpuHashMap<IoKey, IoCounters> =
    PerCpuHashMap::with_max_entries(capacity::BIO_STATS, 0);

// Shared (not per-CPU): a request often completes on another CPU than the one that started it.
// An array lookup costs a fraction of a hash update, which matters twice per I/O.
#[map]
pub static INFLIGHT: Array<Inflight> = Array::with_max_entries(INFLIGHT_SLOTS, 0);

#[map]
pub static BIO_INFLIGHT: Array<BioInflight> = Array::with_max_entries(INFLIGHT_SLOTS, 0);

#[map]
pub static HEALTH: PerCpuArray<u64> = PerCpuArray::with_max_entries(HEALTH_SLOTS, 0);

/// Counts one event in a health slot.
#[inline(always)]
pub fn health(slot: Health) {
    if let Some(p) = HEALTH.get_ptr_mut(slot as u32) {
        unsafe { *p += 1 };
    }
}

/// A map value that starts with the key's counters.
pub trait Counted: Copy {
    fn counters(&mut self) -> &mut IoCounters;
    fn fresh(io: IoCounters) -> Self;
}

impl Counted for IoCounters {
    #[inline(always)]
    fn counters(&mut self) -> &mut IoCounters {
        self
    }
    #[inline(always)]
    fn fresh(io: IoCounters) -> Self {
        io
    }
}

impl Counted for IoStats {
    #[inline(always)]
    fn counters(&mut self) -> &mut IoCounters {
        &mut self.io
    }
    #[inline(always)]
    fn fresh(io: IoCounters) -> Self {
        IoStats {
            io,
            ..IoStats::default()
        }
    }
}

/// Adds one op of `bytes` to `key` in `map`, creating the entry (with the submitter's comm) on
/// first use. A full map is counted in `full`, never silently dropped.
#[inline(always)]
pub fn count_io<V: Counted>(map: &PerCpuHashMap<IoKey, V>, key: &IoKey, bytes: u64, full: Health) {
    if let Some(v) = map.get_ptr_mut(key) {
        let c = unsafe { (*v).counters() };
        c.ops += 1;
        c.bytes += bytes;
        return;
    }
    let comm = bpf_get_current_comm().unwrap_or([0; 16]);
    let fresh = V::fresh(IoCounters {
        ops: 1,
        bytes,
        comm,
    });
    if map.insert(key, fresh, BPF_NOEXIST as u64).is_ok() {
        return;
    }
    // Another CPU created the entry in between, or the map is full.
    match map.get_ptr_mut(key) {
        Some(v) => {
            let c = unsafe { (*v).counters() };
            c.ops += 1;
            c.bytes += bytes;
        }
        None => health(full),
    }
}

/// Adds `bytes` (no op) to `key`'s request counters, on this CPU's slot of the entry its op
/// created. Nothing is added when the entry is gone (its process exited and was pruned).
#[inline(always)]
pub fn add_bytes(key: &IoKey, bytes: u64) {
    if let Some(v) = IO_STATS.get_ptr_mut(key) {
        unsafe { (*v).io.bytes += bytes };
    }
}

/// Adds one completion of `latency_ns` to the histogram of `key`, in the entry its start
/// created (a lookup, never an insert: completions run in interrupt context on any CPU).
#[inline(always)]
pub fn count_latency(key: &IoKey, latency_ns: u64) {
    match IO_STATS.get_ptr_mut(key) {
        Some(v) => unsafe {
            (*v).lat_sum_ns += latency_ns;
            let b = lat_bucket(latency_ns) as usize;
            if let Some(n) = (*v).lat.get_mut(b) {
                *n = n.wrapping_add(1);
            }
        },
        None => health(Health::LatencyLost),
    }
}

/// Claims the in-flight slot of request (`queue`, `tag`); counts a collision when another live
/// request's entry is overwritten. The same request again (a requeue, or a tag reused after a
/// completion this never saw) just takes its slot back.
#[inline(always)]
pub fn inflight_put(queue: u32, tag: u32, key: &IoKey) {
    let Some(slot) = INFLIGHT.get_ptr_mut(inflight_slot(queue, tag)) else {
        return;
    };
    unsafe {
        if (*slot).tag != 0 && ((*slot).tag != tag || (*slot).queue != queue) {
            health(Health::InflightCollision);
        }
        (*slot).queue = queue;
        (*slot).key = *key;
        (*slot).tag = tag;
    }
}

/// True when request (`queue`, `tag`) holds its in-flight slot.
#[inline(always)]
pub fn inflight_holds(queue: u32, tag: u32) -> bool {
    INFLIGHT
        .get(inflight_slot(queue, tag))
        .is_some_and(|s| s.tag == tag && s.queue == queue)
}

/// Takes the key of request (`queue`, `tag`) out of its slot, or counts a miss.
#[inline(always)]
pub fn inflight_take(queue: u32, tag: u32) -> Option<IoKey> {
    let slot = INFLIGHT.get_ptr_mut(inflight_slot(queue, tag))?;
    unsafe {
        if (*slot).tag != tag || (*slot).queue != queue {
            health(Health::InflightMiss);
            return None;
        }
        (*slot).tag = 0;
        Some((*slot).key)
    }
}

/// Fallback mode: remembers who submitted the bio at `ptr` until its request is issued.
#[inline(always)]
pub fn bio_put(ptr: u64, key: &IoKey) {
    let Some(slot) = BIO_INFLIGHT.get_ptr_mut(bio_slot(ptr)) else {
        return;
    };
    unsafe {
        if (*slot).ptr != 0 && (*slot).ptr != ptr {
            health(Health::InflightCollision);
        }
        (*slot).key = *key;
        (*slot).ptr = ptr;
    }
}

/// Fallback mode: takes the submitter of the bio at `ptr`, or counts a miss.
#[inline(always)]
pub fn bio_take(ptr: u64) -> Option<IoKey> {
    let slot = BIO_INFLIGHT.get_ptr_mut(bio_slot(ptr))?;
    unsafe {
        if (*slot).ptr != ptr {
            health(Health::InflightMiss);
            return None;
        }
        (*slot).ptr = 0;
        Some((*slot).key)
    }
}
