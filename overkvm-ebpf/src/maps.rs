//! The maps, their bounds, and the counting primitives every hook shares.
//!
//! Requests: a key's first I/O takes a free slot of the per-CPU array `IO_STATS` and records it
//! in the shared hash `IO_KEYS`. Starts look the key up there (a read-only hash lookup) and count
//! into this CPU's copy of the slot; the slot travels with the request in its in-flight entry,
//! so a completion reaches the histogram by index, without a second hash lookup. A per-CPU
//! cache of the last key of each op spares the hash lookup too while a run of I/O comes from
//! one process (a VM's I/O thread on this CPU).

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::bpf_get_current_comm,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, Queue, RingBuf},
};
use overkvm_common::{
    BioInflight, FLUSH_INFLIGHT_SLOTS, FLUSH_OWNER_SLOTS, FlushInflight, FlushOwner, HEALTH_SLOTS,
    Health, INFLIGHT_SLOTS, Inflight, IoCounters, IoKey, IoStats, KeySlot, NOTICE_NEW_KEY,
    OP_COUNT, ProcessNotice, bio_slot, capacity, flush_inflight_slot, inflight_slot, lat_bucket,
};

#[map]
pub static IO_KEYS: HashMap<IoKey, KeySlot> = HashMap::with_max_entries(capacity::IO_STATS, 0);

/// One value per CPU per slot (userspace lowers the capacity on hosts with many CPUs).
#[map]
pub static IO_STATS: PerCpuArray<IoStats> = PerCpuArray::with_max_entries(capacity::IO_STATS, 0);

#[map]
pub static FREE_SLOTS: Queue<u32> = Queue::with_max_entries(capacity::IO_STATS, 0);

/// Shared: one generation per slot, written by userspace alone (see `IoStats`).
#[map]
pub static SLOT_GENERATIONS: Array<u32> = Array::with_max_entries(capacity::IO_STATS, 0);

/// The last key of one op on this CPU and its slot. Kernel-side only.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CachedKey {
    key: IoKey,
    slot: KeySlot,
}

/// Indexed by op: reads and writes of one process interleaved both hit.
#[map]
static KEY_CACHE: PerCpuArray<CachedKey> = PerCpuArray::with_max_entries(OP_COUNT as u32, 0);

#[map]
pub static BIO_STATS: PerCpuHashMap<IoKey, IoCounters> =
    PerCpuHashMap::with_max_entries(capacity::BIO_STATS, 0);

// Shared (not per-CPU): a request often completes on another CPU than the one that started it.
#[map]
pub static INFLIGHT: Array<Inflight> = Array::with_max_entries(INFLIGHT_SLOTS, 0);

#[map]
pub static BIO_INFLIGHT: Array<BioInflight> = Array::with_max_entries(INFLIGHT_SLOTS, 0);

#[map]
pub static HEALTH: PerCpuArray<u64> = PerCpuArray::with_max_entries(HEALTH_SLOTS, 0);

// Shared: the flush completes on any CPU.
#[map]
pub static FLUSH_OWNERS: Array<FlushOwner> = Array::with_max_entries(FLUSH_OWNER_SLOTS, 0);

// Shared: a flush is issued on one CPU and completes on any.
#[map]
pub static FLUSH_INFLIGHT: Array<FlushInflight> = Array::with_max_entries(FLUSH_INFLIGHT_SLOTS, 0);

/// Notices for userspace's naming thread (`ProcessNotice`): new keys (a process's first I/O on
/// a device, per op), written only on the slow path that creates a key, so a few per process,
/// and execs of processes that did I/O. 64 KiB hold 4K notices (16 bytes each with the ring's
/// header); a full buffer loses only the early naming (the process is still named at the next
/// interval if alive) and is counted.
#[map]
pub static NEW_TGIDS: RingBuf = RingBuf::with_byte_size(64 << 10, 0);

/// Processes that created a key (see `maps::IO_TGIDS` in overkvm-common). Slow path only.
#[map]
pub static IO_TGIDS: LruHashMap<u32, u32> = LruHashMap::with_max_entries(capacity::IO_TGIDS, 0);

/// Sends `notice` to userspace's naming thread, counting a full buffer.
#[inline(always)]
pub fn notify(tgid: u32, kind: u32) {
    if NEW_TGIDS
        .output::<ProcessNotice>(&ProcessNotice { tgid, kind }, 0)
        .is_err()
    {
        health(Health::NameNoticeLost);
    }
}

/// Counts one event in a health slot.
#[inline(always)]
pub fn health(slot: Health) {
    if let Some(p) = HEALTH.get_ptr_mut(slot as u32) {
        unsafe { *p += 1 };
    }
}

/// The `IO_STATS` slot of `key` and this CPU's copy of it: from the per-CPU cache when the key
/// is the last one of its op here and its slot was not recycled since (userspace bumps the
/// generation when it prunes a key), else from `IO_KEYS` (taking a free slot for a new key).
/// `None`, counted in `Health::StatsFull`, when no key or slot is left.
#[inline(always)]
pub fn key_slot(key: &IoKey) -> Option<(KeySlot, *mut IoStats)> {
    let cache = KEY_CACHE.get_ptr_mut(key.op as u32);
    if let Some(c) = cache
        && unsafe { (*c).key == *key }
        && let Some(v) = stats(unsafe { &(*c).slot })
    {
        return Some((unsafe { (*c).slot }, v));
    }
    let slot = lookup_or_add(key)?;
    let Some(v) = stats(&slot) else {
        // Pruned in between (its process is gone): nothing to count into.
        health(Health::StatsFull);
        return None;
    };
    if let Some(c) = cache {
        unsafe {
            (*c).key = *key;
            (*c).slot = slot;
        }
    }
    Some((slot, v))
}

#[inline(always)]
fn lookup_or_add(key: &IoKey) -> Option<KeySlot> {
    if let Some(s) = unsafe { IO_KEYS.get(key) } {
        return Some(*s);
    }
    let Ok(Some(index)) = FREE_SLOTS.pop() else {
        health(Health::StatsFull);
        return None;
    };
    let Some(generation) = SLOT_GENERATIONS.get(index) else {
        health(Health::StatsFull);
        return None;
    };
    let Some(v) = IO_STATS.get_ptr_mut(index) else {
        health(Health::StatsFull);
        return None;
    };
    let slot = KeySlot {
        index,
        generation: *generation,
    };
    if IO_KEYS.insert(key, slot, BPF_NOEXIST as u64).is_ok() {
        // The name of the process, for when it has exited before userspace reads it. Only this
        // CPU's copy has it; userspace takes the one that is set.
        unsafe { (*v).io.comm = bpf_get_current_comm().unwrap_or([0; 16]) };
        // Tell userspace now, so it can read the process's command line while it lives (a VM
        // that crashes while booting is gone before the next interval). Best effort: a full
        // buffer only delays naming to the next interval. Remember the process for its next
        // exec (an LRU: a full map evicts, never fails for want of room).
        notify(key.tgid, NOTICE_NEW_KEY);
        let _ = IO_TGIDS.insert(&key.tgid, &0, 0);
        return Some(slot);
    }
    // Another CPU added the key in between (or the hash is full): give the slot back.
    let _ = FREE_SLOTS.push(index, 0);
    match unsafe { IO_KEYS.get(key) } {
        Some(s) => Some(*s),
        None => {
            health(Health::StatsFull);
            None
        }
    }
}

/// This CPU's copy of `slot`, if the slot still belongs to the key that took it.
#[inline(always)]
fn stats(slot: &KeySlot) -> Option<*mut IoStats> {
    if *SLOT_GENERATIONS.get(slot.index)? != slot.generation {
        return None;
    }
    IO_STATS.get_ptr_mut(slot.index)
}

/// Counts one request of `bytes` for `key`; returns the key's slot for its in-flight entry.
#[inline(always)]
pub fn count_request(key: &IoKey, bytes: u64) -> Option<KeySlot> {
    let (slot, v) = key_slot(key)?;
    unsafe {
        (*v).io.ops += 1;
        (*v).io.bytes += bytes;
    }
    Some(slot)
}

/// Counts one device cache flush of `latency_ns` for the key owning `slot`. False when the
/// slot was recycled (its process was pruned): the caller counts the flush unattributed.
#[inline(always)]
pub fn count_flush(slot: &KeySlot, latency_ns: u64) -> bool {
    match stats(slot) {
        Some(v) => {
            unsafe {
                (*v).flushes += 1;
                (*v).flush_lat_sum_ns += latency_ns;
            }
            true
        }
        None => false,
    }
}

/// Remembers `slot` as the latest requester of a flush on request queue `queue`.
#[inline(always)]
pub fn flush_owner_put(queue: u32, slot: KeySlot) {
    if let Some(e) = FLUSH_OWNERS.get_ptr_mut(queue & (FLUSH_OWNER_SLOTS - 1)) {
        unsafe {
            (*e).slot = slot;
            (*e).queue = queue.wrapping_add(1);
        }
    }
}

/// The latest requester of a flush on request queue `queue`, if known.
#[inline(always)]
pub fn flush_owner(queue: u32) -> Option<KeySlot> {
    let e = FLUSH_OWNERS.get_ptr_mut(queue & (FLUSH_OWNER_SLOTS - 1))?;
    unsafe { ((*e).queue == queue.wrapping_add(1)).then(|| (*e).slot) }
}

/// The device flush request at `ptr` was issued, for `owner`. Returns the owner
/// of its previous issue when that one's completion was never seen (its entry is still held).
#[inline(always)]
pub fn flush_issued(ptr: u64, owner: Option<KeySlot>) -> Option<KeySlot> {
    let e = FLUSH_INFLIGHT.get_ptr_mut(flush_inflight_slot(ptr))?;
    unsafe {
        // Both read whatever the entry holds (volatile, so the compiler keeps them apart from
        // the test): a slot read only when the pointers match let the verifier walk a path on
        // which the compiler's copy of it was never loaded.
        let held = core::ptr::read_volatile(core::ptr::addr_of!((*e).ptr));
        let held_slot = core::ptr::read_volatile(core::ptr::addr_of!((*e).slot));
        let unseen = (held == ptr).then_some(held_slot);
        match owner {
            Some(slot) => {
                (*e).slot = slot;
                (*e).ptr = ptr;
            }
            None => (*e).ptr = 0,
        }
        unseen
    }
}

/// The device flush request at `ptr` completed; its entry is freed.
#[inline(always)]
pub fn flush_completed(ptr: u64) {
    if let Some(e) = FLUSH_INFLIGHT.get_ptr_mut(flush_inflight_slot(ptr))
        && unsafe { (*e).ptr } == ptr
    {
        unsafe { (*e).ptr = 0 };
    }
}

/// Adds `bytes` (no op) to `key`: a bio merged into a request already counted.
#[inline(always)]
pub fn add_key_bytes(key: &IoKey, bytes: u64) {
    if let Some((_, v)) = key_slot(key) {
        unsafe { (*v).io.bytes += bytes };
    }
}

/// Adds `bytes` (no op) to the key owning `slot` (fallback: bios merged before the issue).
#[inline(always)]
pub fn add_bytes(slot: &KeySlot, bytes: u64) {
    if let Some(v) = stats(slot) {
        unsafe { (*v).io.bytes += bytes };
    }
}

/// Adds one completion of `latency_ns` to the histogram of the key owning `slot`, or counts it
/// lost when the slot was recycled while the request was in flight.
#[inline(always)]
pub fn count_latency(slot: &KeySlot, latency_ns: u64) {
    match stats(slot) {
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

/// Adds one bio of `bytes` to `key` in `BIO_STATS`, creating the entry (with the submitter's
/// comm) on first use. A full map is counted, never silently dropped.
#[inline(always)]
pub fn count_bio(key: &IoKey, bytes: u64) {
    if let Some(c) = BIO_STATS.get_ptr_mut(key) {
        unsafe {
            (*c).ops += 1;
            (*c).bytes += bytes;
        }
        return;
    }
    let fresh = IoCounters {
        ops: 1,
        bytes,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    };
    if BIO_STATS.insert(key, fresh, BPF_NOEXIST as u64).is_ok() {
        return;
    }
    // Another CPU created the entry in between, or the map is full.
    match BIO_STATS.get_ptr_mut(key) {
        Some(c) => unsafe {
            (*c).ops += 1;
            (*c).bytes += bytes;
        },
        None => health(Health::BioStatsFull),
    }
}

/// Entries a request may take, from its hash on: the tags of one queue are dense, so some of
/// them share a hash; probing a few neighbours keeps them apart.
const PROBES: u32 = 4;

/// The entry among the `PROBES` of `map` from `h` that `owns` accepts (the caller's own), else
/// the first `free` one, else (all held by other live requests or bios) the first, counting a
/// collision: the overwritten one then counts a miss at its end.
#[inline(always)]
fn claim<T>(
    map: &Array<T>,
    h: u32,
    owns: impl Fn(&T) -> bool,
    free: impl Fn(&T) -> bool,
) -> Option<*mut T> {
    let mut target = None;
    for i in 0..PROBES {
        let e = map.get_ptr_mut((h + i) & (INFLIGHT_SLOTS - 1))?;
        let held = unsafe { &*e };
        if owns(held) {
            return Some(e);
        }
        if target.is_none() && free(held) {
            target = Some(e);
        }
    }
    if target.is_none() {
        health(Health::InflightCollision);
    }
    target.or_else(|| map.get_ptr_mut(h))
}

/// The entry among the `PROBES` of `map` from `h` that `owns` accepts.
#[inline(always)]
fn find<T>(map: &Array<T>, h: u32, owns: impl Fn(&T) -> bool) -> Option<*mut T> {
    for i in 0..PROBES {
        let e = map.get_ptr_mut((h + i) & (INFLIGHT_SLOTS - 1))?;
        if owns(unsafe { &*e }) {
            return Some(e);
        }
    }
    None
}

/// Claims an in-flight entry for request (`queue`, `tag`): its own stale one or a free one
/// among its probes (see `claim`).
#[inline(always)]
pub fn inflight_put(queue: u32, tag: u32, slot: KeySlot) {
    let h = inflight_slot(queue, tag);
    let owns = |e: &Inflight| e.tag == tag && e.queue == queue;
    if let Some(e) = claim(&INFLIGHT, h, owns, |e| e.tag == 0) {
        unsafe {
            (*e).queue = queue;
            (*e).slot = slot;
            (*e).tag = tag;
        }
    }
}

/// The in-flight entry of request (`queue`, `tag`), if it holds one.
#[inline(always)]
fn inflight_find(queue: u32, tag: u32) -> Option<*mut Inflight> {
    find(&INFLIGHT, inflight_slot(queue, tag), |e| {
        e.tag == tag && e.queue == queue
    })
}

/// The key slot of request (`queue`, `tag`) without taking it: a device flush borrows the tag
/// of the first request waiting for it, whose own completion comes later.
#[inline(always)]
pub fn inflight_peek(queue: u32, tag: u32) -> Option<KeySlot> {
    inflight_find(queue, tag).map(|e| unsafe { (*e).slot })
}

/// True when request (`queue`, `tag`) holds an in-flight entry.
#[inline(always)]
pub fn inflight_holds(queue: u32, tag: u32) -> bool {
    inflight_find(queue, tag).is_some()
}

/// Takes the key slot of request (`queue`, `tag`) out of its entry; the caller counts a miss.
#[inline(always)]
pub fn inflight_take(queue: u32, tag: u32) -> Option<KeySlot> {
    let e = inflight_find(queue, tag)?;
    unsafe {
        (*e).tag = 0;
        Some((*e).slot)
    }
}

/// Fallback mode: remembers the key slot of the bio at `ptr` until its request is issued, in
/// the first free entry among its probes (a plug holds dozens of bios at once: with one entry
/// per hash, some of them met every few thousand bios); see `claim`.
#[inline(always)]
pub fn bio_put(ptr: u64, slot: KeySlot) {
    if let Some(e) = claim(
        &BIO_INFLIGHT,
        bio_slot(ptr),
        |e| e.ptr == ptr,
        |e| e.ptr == 0,
    ) {
        unsafe {
            (*e).slot = slot;
            (*e).ptr = ptr;
        }
    }
}

/// Fallback mode: takes the key slot of the bio at `ptr`; the caller counts a miss.
#[inline(always)]
pub fn bio_take(ptr: u64) -> Option<KeySlot> {
    if ptr == 0 {
        return None;
    }
    let e = find(&BIO_INFLIGHT, bio_slot(ptr), |e| e.ptr == ptr)?;
    unsafe {
        (*e).ptr = 0;
        Some((*e).slot)
    }
}
