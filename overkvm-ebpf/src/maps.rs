//! The maps, their bounds, and the counting primitives every hook shares.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::bpf_get_current_comm,
    macros::map,
    maps::{Array, PerCpuArray, PerCpuHashMap},
};
use overkvm_common::{
    HEALTH_SLOTS, Health, INFLIGHT_SLOTS, Inflight, IoCounters, IoKey, LatKey, LatValue, capacity,
    lat_bucket,
};

#[map]
pub static IO_STATS: PerCpuHashMap<IoKey, IoCounters> =
    PerCpuHashMap::with_max_entries(capacity::IO_STATS, 0);

#[map]
pub static BIO_STATS: PerCpuHashMap<IoKey, IoCounters> =
    PerCpuHashMap::with_max_entries(capacity::BIO_STATS, 0);

#[map]
pub static LATENCY: PerCpuHashMap<LatKey, LatValue> =
    PerCpuHashMap::with_max_entries(capacity::LATENCY, 0);

// Shared (not per-CPU): a request often completes on another CPU than the one that started it.
// An array lookup costs a fraction of a hash update, which matters twice per I/O.
#[map]
pub static INFLIGHT: Array<Inflight> = Array::with_max_entries(INFLIGHT_SLOTS, 0);

#[map]
pub static BIO_INFLIGHT: Array<Inflight> = Array::with_max_entries(INFLIGHT_SLOTS, 0);

#[map]
pub static HEALTH: PerCpuArray<u64> = PerCpuArray::with_max_entries(HEALTH_SLOTS, 0);

/// Counts one event in a health slot.
#[inline(always)]
pub fn health(slot: Health) {
    if let Some(p) = HEALTH.get_ptr_mut(slot as u32) {
        unsafe { *p += 1 };
    }
}

/// Adds one op of `bytes` to `key` in `map`, creating the entry (with the submitter's comm) on
/// first use. A full map is counted in `full`, never silently dropped.
#[inline(always)]
pub fn count_io(map: &PerCpuHashMap<IoKey, IoCounters>, key: &IoKey, bytes: u64, full: Health) {
    if let Some(c) = map.get_ptr_mut(key) {
        unsafe {
            (*c).ops += 1;
            (*c).bytes += bytes;
        }
        return;
    }
    let comm = bpf_get_current_comm().unwrap_or([0; 16]);
    let fresh = IoCounters {
        ops: 1,
        bytes,
        comm,
    };
    if map.insert(key, fresh, BPF_NOEXIST as u64).is_ok() {
        return;
    }
    // Another CPU created the entry in between, or the map is full.
    match map.get_ptr_mut(key) {
        Some(c) => unsafe {
            (*c).ops += 1;
            (*c).bytes += bytes;
        },
        None => health(full),
    }
}

/// Adds `bytes` (no op) to `key` in `map`, on this CPU's slot of the entry its op created.
/// Nothing is added when the entry is gone (its process exited and was pruned in between).
#[inline(always)]
pub fn add_bytes(map: &PerCpuHashMap<IoKey, IoCounters>, key: &IoKey, bytes: u64) {
    if let Some(c) = map.get_ptr_mut(key) {
        unsafe { (*c).bytes += bytes };
    }
}

/// Adds one completion of `latency_ns` to the histogram of `key`.
#[inline(always)]
pub fn count_latency(key: &IoKey, latency_ns: u64) {
    let lk = LatKey {
        io: *key,
        bucket: lat_bucket(latency_ns),
        _pad: 0,
    };
    if let Some(v) = LATENCY.get_ptr_mut(lk) {
        unsafe {
            (*v).count += 1;
            (*v).sum_ns += latency_ns;
        }
        return;
    }
    let fresh = LatValue {
        count: 1,
        sum_ns: latency_ns,
    };
    if LATENCY.insert(lk, fresh, BPF_NOEXIST as u64).is_ok() {
        return;
    }
    match LATENCY.get_ptr_mut(lk) {
        Some(v) => unsafe {
            (*v).count += 1;
            (*v).sum_ns += latency_ns;
        },
        None => health(Health::LatencyFull),
    }
}

/// Claims the in-flight slot of `ptr` in `table`; counts a collision when a different live
/// entry is overwritten.
#[inline(always)]
pub fn inflight_put(table: &Array<Inflight>, ptr: u64, start_ns: u64, key: &IoKey) {
    let Some(slot) = table.get_ptr_mut(overkvm_common::inflight_slot(ptr)) else {
        return;
    };
    unsafe {
        if (*slot).ptr != 0 && (*slot).ptr != ptr {
            health(Health::InflightCollision);
        }
        (*slot).start_ns = start_ns;
        (*slot).key = *key;
        (*slot).ptr = ptr;
    }
}

/// Takes the in-flight entry of `ptr` out of `table`, or counts a miss.
#[inline(always)]
pub fn inflight_take(table: &Array<Inflight>, ptr: u64) -> Option<Inflight> {
    let slot = table.get_ptr_mut(overkvm_common::inflight_slot(ptr))?;
    unsafe {
        if (*slot).ptr != ptr {
            health(Health::InflightMiss);
            return None;
        }
        let entry = *slot;
        (*slot).ptr = 0;
        Some(entry)
    }
}
