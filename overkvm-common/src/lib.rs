//! The contract between overkvm's kernel programs (`overkvm-ebpf`) and its userspace (`overkvm`).
//!
//! Everything both sides must agree on lives here and nowhere else: map names and their key and
//! value layouts, the operation classes, the latency histogram's bucket layout, the health counter
//! slots, and the kernel structure offsets userspace resolves from BTF and hands to the programs.
//! The few pure functions here (op classification, log2 bucketing, in-flight slot naming) run in
//! the kernel and are unit-tested in userspace, so both sides compute them the same way.
#![no_std]

/// Names of the maps in the eBPF object, as userspace looks them up.
pub mod maps {
    /// Keys of request counting: `IoKey -> KeySlot`, a shared hash. Each key owns a slot of
    /// `IO_STATS`; the hot path reads this map and never writes it after the key's first I/O.
    pub const IO_KEYS: &str = "IO_KEYS";
    /// Requests (or, in the fallback mode, new requests from `block_getrq`) counted at submission,
    /// with the latency histogram of their completions: `KeySlot.index -> IoStats`, a per-CPU
    /// array. A completion finds its key's slot by index (no hash lookup on the completion path).
    pub const IO_STATS: &str = "IO_STATS";
    /// Indexes of `IO_STATS` free for new keys: a queue of `u32` that userspace fills at load
    /// and refills with the slots of pruned keys.
    pub const FREE_SLOTS: &str = "FREE_SLOTS";
    /// The generation of each `IO_STATS` slot (`KeySlot.index -> u32`, a shared array): moved
    /// on by userspace when it prunes the slot's key, after which nothing counts into the slot.
    pub const SLOT_GENERATIONS: &str = "SLOT_GENERATIONS";
    /// Who asked last for a flush on each request queue: `queue id -> FlushOwner`.
    pub const FLUSH_OWNERS: &str = "FLUSH_OWNERS";
    /// Fallback mode: `flush_rq address -> FlushInflight`, a shared array: the device flushes
    /// issued whose completion was not seen yet.
    pub const FLUSH_INFLIGHT: &str = "FLUSH_INFLIGHT";
    /// Notices to userspace's naming thread, as `ProcessNotice` records: a process's first I/O
    /// (so it is named while it lives) and the exec of a process that did I/O (so a name read
    /// before or during the exec is read again). A ring buffer.
    pub const NEW_TGIDS: &str = "NEW_TGIDS";
    /// Processes that have created an I/O key: `tgid -> 0`, an LRU hash written on the slow
    /// path of a new key, looked up at exec, so only the execs of processes userspace may have
    /// named reach it.
    pub const IO_TGIDS: &str = "IO_TGIDS";
    /// Bios counted at `block_bio_queue`, on every device including bio-based and stacked ones:
    /// `IoKey -> IoCounters`, per-CPU hash.
    pub const BIO_STATS: &str = "BIO_STATS";
    /// Requests in flight, indexed by `inflight_slot(queue id, hw_tag)`: `u32 -> Inflight`.
    pub const INFLIGHT: &str = "INFLIGHT";
    /// Fallback mode: bios that allocated a request, by `bio_slot(bio pointer)`: `u32 -> BioInflight`.
    pub const BIO_INFLIGHT: &str = "BIO_INFLIGHT";
    /// Health counters, per-CPU array indexed by `Health`.
    pub const HEALTH: &str = "HEALTH";
}

/// Names of the programs in the eBPF object and the tracepoint each one attaches to.
pub mod programs {
    /// `block:block_io_start` (Linux 6.5+): request accounting starts, in the submitter's context.
    pub const IO_START: &str = "io_start";
    /// `block:block_io_done` (Linux 6.5+): request accounting ends, once per request.
    pub const IO_DONE: &str = "io_done";
    /// `block:block_bio_backmerge` / `block_bio_frontmerge` (Linux 6.5+ mode): a bio joined a
    /// counted request; its bytes are added.
    pub const BIO_BACKMERGE: &str = "bio_backmerge";
    pub const BIO_FRONTMERGE: &str = "bio_frontmerge";
    /// `block:block_bio_queue`: every bio entering the block layer, once per bio.
    pub const BIO_QUEUE: &str = "bio_queue";
    /// `block:block_split`: a bio split at a device limit; its remainder counts as one more bio,
    /// as the kernel's per-cgroup counters count it. Attached with `BIO_QUEUE`.
    pub const BIO_SPLIT: &str = "bio_split";
    /// Fallback: `block:block_getrq`, a bio allocated a new request (submitter's context).
    pub const RQ_GETRQ: &str = "rq_getrq";
    /// Fallback: `block:block_rq_issue`, a request goes to the driver.
    pub const RQ_ISSUE: &str = "rq_issue";
    /// Fallback: `block:block_rq_complete`, (part of) a request completed.
    pub const RQ_COMPLETE: &str = "rq_complete";
    /// `block:block_rq_requeue` (both modes), an issued request goes back to be issued again:
    /// a requeued device flush leaves `FLUSH_INFLIGHT`.
    pub const RQ_REQUEUE: &str = "rq_requeue";
    /// Linux 6.5+ mode: `block:block_rq_issue`, for the flush machinery's own flush requests
    /// only (`FLUSH_INFLIGHT`); every other request returns after one read.
    pub const FLUSH_ISSUE: &str = "flush_issue_hook";
    /// `sched:sched_process_exec`: a process finished an exec (its new command line is in
    /// place); a process that did I/O is re-named.
    pub const PROC_EXEC: &str = "proc_exec";
    /// Name of the global holding `KernelLayout`.
    pub const LAYOUT_GLOBAL: &str = "LAYOUT";
}

/// The operation class of a block I/O. Flush and discard are never folded into read.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Op {
    Read = 0,
    Write = 1,
    Discard = 2,
    Flush = 3,
    /// Zone management, driver-private and anything newer than this code.
    Other = 4,
}

/// Number of `Op` values.
pub const OP_COUNT: usize = 5;

impl Op {
    pub const ALL: [Op; OP_COUNT] = [Op::Read, Op::Write, Op::Discard, Op::Flush, Op::Other];

    /// The op for a raw key byte; unknown values map to `Other` rather than failing.
    pub const fn from_u8(v: u8) -> Op {
        match v {
            0 => Op::Read,
            1 => Op::Write,
            2 => Op::Discard,
            3 => Op::Flush,
            _ => Op::Other,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Discard => "discard",
            Op::Flush => "flush",
            Op::Other => "other",
        }
    }
}

/// The kernel's `REQ_OP_*` values and the `REQ_PREFLUSH` flag, read from BTF (`enum req_op`,
/// `enum req_flag_bits`) so that a kernel renumbering them is followed, not mis-counted.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpCodes {
    pub op_mask: u32,
    pub read: u32,
    pub write: u32,
    pub flush: u32,
    pub discard: u32,
    pub secure_erase: u32,
    pub write_zeroes: u32,
    /// `REQ_PREFLUSH` as a mask (1 << __REQ_PREFLUSH).
    pub preflush: u32,
    /// `REQ_FUA` as a mask (1 << __REQ_FUA): on a device without FUA the flush machinery
    /// follows such a write with a cache flush.
    pub fua: u32,
    /// `RQF_FLUSH_SEQ` as a mask of `request.rq_flags`: the request is inside the flush
    /// machinery, and a completion seen then is one of its steps, not its end.
    pub flush_seq: u32,
}

impl OpCodes {
    /// Values of Linux 4.10 to 6.18; used when BTF does not say otherwise.
    pub const LINUX_DEFAULT: OpCodes = OpCodes {
        op_mask: 0xff,
        read: 0,
        write: 1,
        flush: 2,
        discard: 3,
        secure_erase: 5,
        write_zeroes: 9,
        preflush: 1 << 18,
        fua: 1 << 17,
        // `enum rqf_flags` exists from Linux 6.8; before it `#define RQF_FLUSH_SEQ (1 << 4)`.
        flush_seq: 1 << 4,
    };
}

/// Classifies a request or bio from its `cmd_flags` / `bi_opf`, as `/proc/diskstats` groups
/// them (`op_stat_group`).
///
/// A sync's empty `REQ_PREFLUSH` write is a write here, as the kernel's disk statistics count
/// it (0 sectors); the cache flush it makes the device do is the flush machinery's own
/// `REQ_OP_FLUSH` request, counted as `Flush` where it completes. `WRITE_ZEROES` is a write;
/// secure erase is a discard.
#[inline(always)]
pub fn classify_op(opf: u32, codes: &OpCodes) -> Op {
    let op = opf & codes.op_mask;
    if op == codes.read {
        Op::Read
    } else if op == codes.write || op == codes.write_zeroes {
        Op::Write
    } else if op == codes.flush {
        Op::Flush
    } else if op == codes.discard || op == codes.secure_erase {
        Op::Discard
    } else {
        Op::Other
    }
}

/// True when a request or bio may make the device flush its cache (a `REQ_PREFLUSH` or a
/// `REQ_FUA` write): its submitter is who a following device flush is charged to.
#[inline(always)]
pub fn asks_for_flush(opf: u32, codes: &OpCodes) -> bool {
    opf & (codes.preflush | codes.fua) != 0
}

/// Who a device cache flush (the flush machinery's own `REQ_OP_FLUSH` request) is charged to.
///
/// The flush borrows the tag of the first request waiting for it. With `block_io_start` that
/// request took its in-flight entry at submission and keeps it until it ends, after the flush:
/// the entry at the borrowed tag (`borrowed`) is its submitter. In the fallback mode entries are
/// taken at `block_rq_issue`, and a request waiting for a preflush has not been issued yet (an
/// empty preflush, as fsync sends, never is): whatever sits at that tag is stale, left by an
/// earlier request whose completion did not take it, and may name a key since pruned: charged
/// there, the flush is lost to the device (`flush_unattributed`; parity.rs plants such entries
/// to prove it never happens). There only the latest
/// requester of a flush on the queue (`requester`) is right. Lazy, so the kernel side does not
/// look the borrowed entry up when it would not use it.
#[inline(always)]
pub fn flush_charge<T>(
    fallback: bool,
    borrowed: impl FnOnce() -> Option<T>,
    requester: impl FnOnce() -> Option<T>,
) -> Option<T> {
    let borrowed = if fallback { None } else { borrowed() };
    match borrowed {
        Some(owner) => Some(owner),
        None => requester(),
    }
}

/// Who did which I/O where: the aggregation key of `IO_STATS` and `BIO_STATS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IoKey {
    /// Process (thread group) id of the submitter.
    pub tgid: u32,
    /// Kernel `dev_t` (major << 20 | minor) of the device the I/O was submitted to; a partition
    /// keeps its own number, userspace folds it into its disk.
    pub dev: u32,
    /// Kernfs id of the cgroup that owns the I/O for the block controller (the bio's blkcg):
    /// the cgroup `io.max` / `blkio.throttle.*` act on. 0 when unknown.
    pub cgroup_id: u64,
    /// `Op` as u8.
    pub op: u8,
    pub _pad: [u8; 7],
}

impl IoKey {
    pub fn op(&self) -> Op {
        Op::from_u8(self.op)
    }
}

/// Per-CPU counters for one `IoKey` of `BIO_STATS` (bios have no latency).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoCounters {
    pub ops: u64,
    pub bytes: u64,
    /// `comm` of the submitting thread when the entry was created, so that a process that has
    /// already exited when userspace reads still has a name. Only the CPU that created the
    /// entry has it; the others read zeroes.
    pub comm: [u8; 16],
}

/// One record of the `NEW_TGIDS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessNotice {
    pub tgid: u32,
    /// `NOTICE_NEW_KEY` or `NOTICE_EXEC`; anything else is ignored by userspace.
    pub kind: u32,
}

/// `ProcessNotice::kind`: the process created a new I/O key (its first I/O on a device, per op).
pub const NOTICE_NEW_KEY: u32 = 0;
/// `ProcessNotice::kind`: the process, which has done I/O before, completed an exec. What was
/// read of it before (a command line, an empty one mid-exec) no longer holds.
pub const NOTICE_EXEC: u32 = 1;

/// Which `IO_STATS` slot a key owns, and the slot's generation when the key took it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct KeySlot {
    /// Index into `IO_STATS`; never 0 (slot 0 is not handed out).
    pub index: u32,
    pub generation: u32,
}

/// Per-CPU value of `IO_STATS`: the key's counters and the latency histogram of its completed
/// requests, in one slot, which a completion reaches by index.
///
/// The slot's generation is kept apart, in `SLOT_GENERATIONS`, written by userspace alone
/// when it prunes the slot's key. A completion or flush counts into the slot only if the
/// generation it carried since the start still matches, so an I/O that outlives its key's
/// pruning is counted as lost (`Health::LatencyLost`) rather than charged to the slot's next
/// owner. Apart, because userspace must stop the counting before it reads the slot a last time:
/// a generation inside these per-CPU values could only be changed by overwriting the counters,
/// and an increment landing between that read and that write would vanish.
///
/// Bucket counts are `u32` to keep the per-CPU value small (the map holds one copy per CPU):
/// they wrap after 2^32 completions of one key in one bucket on one CPU, and userspace takes
/// their differences modulo 2^32, which is exact as long as it reads them more often than that
/// (hours at the highest rates).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoStats {
    pub io: IoCounters,
    /// Sum of the latencies in `lat`, in ns: averages are exact.
    pub lat_sum_ns: u64,
    /// Device cache flushes charged to this key's submitter (see `FlushOwner`), and the sum
    /// of their latencies in ns. Counted in the slot of the request that asked for them, so
    /// the start path pays nothing for them.
    pub flushes: u64,
    pub flush_lat_sum_ns: u64,
    /// Completions per log2 bucket (see `lat_bucket`).
    pub lat: [u32; LAT_BUCKETS as usize],
}

impl Default for IoStats {
    fn default() -> Self {
        IoStats {
            io: IoCounters::default(),
            lat_sum_ns: 0,
            flushes: 0,
            flush_lat_sum_ns: 0,
            lat: [0; LAT_BUCKETS as usize],
        }
    }
}

/// Number of latency buckets. Bucket `i` holds latencies in `[2^i, 2^(i+1))` ns (bucket 0 also
/// holds 0); the last bucket holds everything from 2^39 ns (~9 minutes) up.
pub const LAT_BUCKETS: u32 = 40;

/// Log2 bucket of a latency in ns, without a count-leading-zeros instruction (BPF has none).
#[inline(always)]
pub fn lat_bucket(ns: u64) -> u32 {
    let mut v = ns;
    let mut r: u32 = 0;
    if v >= 1 << 32 {
        v >>= 32;
        r += 32;
    }
    if v >= 1 << 16 {
        v >>= 16;
        r += 16;
    }
    if v >= 1 << 8 {
        v >>= 8;
        r += 8;
    }
    if v >= 1 << 4 {
        v >>= 4;
        r += 4;
    }
    if v >= 1 << 2 {
        v >>= 2;
        r += 2;
    }
    if v >= 1 << 1 {
        r += 1;
    }
    if r >= LAT_BUCKETS { LAT_BUCKETS - 1 } else { r }
}

/// Lower bound in ns of a latency bucket.
pub const fn bucket_lower_ns(bucket: u32) -> u64 {
    if bucket == 0 { 0 } else { 1u64 << bucket }
}

/// Upper bound (exclusive) in ns of a latency bucket; `u64::MAX` for the last one.
pub const fn bucket_upper_ns(bucket: u32) -> u64 {
    if bucket + 1 >= LAT_BUCKETS {
        u64::MAX
    } else {
        1u64 << (bucket + 1)
    }
}

/// Slots of `INFLIGHT` and `BIO_INFLIGHT`: a power of two.
pub const INFLIGHT_SLOTS: u32 = 1 << 14;

/// Which request of a queue a hardware tag names: `1 + (hctx << 20 | tag)`, never 0.
///
/// A request in flight holds a tag that no other request of its hardware queue holds until it
/// completes: the scheduler tag when the queue has an I/O scheduler (`internal_tag`, assigned at
/// allocation), else the driver tag (`tag`, assigned at allocation too). With the request
/// queue's id (`request_queue.id`, unique per device) and the hardware queue number that names
/// the request exactly from its allocation to its completion, read with plain loads (no copy of
/// the request's address, which the verifier would demand for hashing a pointer). `None` for a
/// request without a tag.
#[inline(always)]
pub fn hw_tag(hctx: u32, tag: i32, internal_tag: i32) -> Option<u32> {
    let t = if internal_tag >= 0 { internal_tag } else { tag };
    if t < 0 {
        return None;
    }
    Some(1 + ((hctx & 0x7ff) << 20 | (t as u32 & 0xf_ffff)))
}

/// The slot of a request, named by its request queue's id and `hw_tag`, in `INFLIGHT`.
///
/// Queue ids and tags are small dense numbers; a full 64-bit mix of the pair spreads the requests
/// of many devices. Two live requests can still share a slot: the later one wins, the earlier
/// one's completion then finds another request there and is counted in `Health::InflightMiss`,
/// never mis-attributed.
#[inline(always)]
pub fn inflight_slot(queue: u32, hw_tag: u32) -> u32 {
    // splitmix64's finaliser: the pair is structured (small numbers in two halves), which a
    // single multiply spreads poorly; a few more ALU operations cost nothing next to a load.
    let mut x = ((queue as u64) << 32) | hw_tag as u64;
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    x as u32 & (INFLIGHT_SLOTS - 1)
}

/// The slot of a bio pointer in `BIO_INFLIGHT` (fallback mode).
#[inline(always)]
pub fn bio_slot(ptr: u64) -> u32 {
    let h = (ptr >> 6).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (h >> 50) as u32 & (INFLIGHT_SLOTS - 1)
}

/// A request in flight: which one (queue id and `hw_tag`) and the `IO_STATS` slot of the key
/// that started it. The start time is the kernel's own `rq->start_time_ns`, read at completion.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Inflight {
    pub queue: u32,
    /// `hw_tag` of the request owning this slot; 0 when free.
    pub tag: u32,
    pub slot: KeySlot,
}

/// Fallback mode: a bio that allocated a request, until the request is issued.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BioInflight {
    /// The bio's address; 0 when free.
    pub ptr: u64,
    pub slot: KeySlot,
}

/// Slots of `FLUSH_OWNERS`: a power of two. Indexed by request queue id, which the kernel
/// hands out densely from 0.
pub const FLUSH_OWNER_SLOTS: u32 = 1 << 12;

/// Slots of `FLUSH_INFLIGHT`: a power of two, at most `INFLIGHT_SLOTS`. One flush at a time is
/// in flight per flush queue (one per hardware queue), so a host needs one entry per hardware
/// queue that flushes; two flush queues sharing an entry only lose the check, never a count.
pub const FLUSH_INFLIGHT_SLOTS: u32 = 1 << 10;
const _: () =
    assert!(FLUSH_INFLIGHT_SLOTS.is_power_of_two() && FLUSH_INFLIGHT_SLOTS <= INFLIGHT_SLOTS);

/// The entry of `FLUSH_INFLIGHT` for the flush request at `ptr`.
#[inline(always)]
pub fn flush_inflight_slot(ptr: u64) -> u32 {
    bio_slot(ptr) & (FLUSH_INFLIGHT_SLOTS - 1)
}

/// A device flush issued to the driver and its owner at that moment, until its completion is
/// seen (both modes). The kernel's flush machinery issues one flush at a time per flush queue,
/// always with the same `flush_rq`, so an entry still held when that request is issued again
/// is a completion the hook never saw (see `Health::FlushCompletionUnseen`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlushInflight {
    /// The flush request's address; 0 when free.
    pub ptr: u64,
    pub slot: KeySlot,
}

/// The latest request on a queue that asked for a flush (`asks_for_flush`): who a device flush
/// is charged to when the request whose tag the flush borrows is not known.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlushOwner {
    /// `request_queue.id` + 1; 0 when free.
    pub queue: u32,
    pub _pad: u32,
    pub slot: KeySlot,
}

/// Slots of the `HEALTH` per-CPU array: what the kernel side could not do, counted, never silent.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// `IO_KEYS` was full or `FREE_SLOTS` empty: a request of a new key was not counted.
    StatsFull = 0,
    /// `BIO_STATS` was full: a bio was not counted.
    BioStatsFull = 1,
    /// A completion's latency was not recorded: its key's `IO_STATS` slot was recycled while
    /// it was in flight (its process exited and was pruned).
    LatencyLost = 2,
    /// A start found its in-flight slot taken by another live request and overwrote it.
    InflightCollision = 3,
    /// A completion found no matching start (started before attach, or overwritten).
    InflightMiss = 4,
    /// A kernel memory read failed; the event was skipped.
    ReadFault = 5,
    /// Partial completions seen by the fallback completion hook (informational).
    PartialCompletion = 6,
    /// A request completed without the kernel's start timestamp (`start_time_ns` is only taken
    /// when the queue keeps I/O statistics or has a scheduler): its latency is unknown
    /// (informational: `echo 1 > /sys/block/DEV/queue/iostats` brings it back).
    NoStartTime = 7,
    /// A device cache flush completed whose requester was not seen (its requests started
    /// before the programs were attached, or its key was pruned): not counted.
    FlushUnattributed = 8,
    /// The notification of a new process to userspace (`NEW_TGIDS`) found the ring buffer
    /// full (informational: the process is still named at the next interval if it lives).
    NameNoticeLost = 9,
    /// Fallback mode: a request was issued at a tag whose in-flight entry an earlier request
    /// left behind (its end was not seen); the new request's entry replaced it.
    InflightStale = 10,
    /// A device flush was issued and counted by `/proc/diskstats`, but its completion
    /// (`block_rq_complete`, or `block_io_done` in the 6.5+ mode) never reached the hook (seen on
    /// Linux 6.18 in the fallback mode 20 times in 324,938 loop-device flushes under concurrent
    /// syncs while `block_rq_issue` saw every one, and in the 6.5+ mode about once in 20,000).
    /// Found when the same flush request is issued again, and charged then to its owner at
    /// issue, with no latency. A flush lost this way as a device's last one stays uncounted.
    FlushCompletionUnseen = 11,
}

pub const HEALTH_SLOTS: u32 = 12;

impl Health {
    pub const ALL: [Health; 12] = [
        Health::StatsFull,
        Health::BioStatsFull,
        Health::LatencyLost,
        Health::InflightCollision,
        Health::InflightMiss,
        Health::ReadFault,
        Health::PartialCompletion,
        Health::NoStartTime,
        Health::FlushUnattributed,
        Health::NameNoticeLost,
        Health::InflightStale,
        Health::FlushCompletionUnseen,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Health::StatsFull => "stats_map_full",
            Health::BioStatsFull => "bio_stats_map_full",
            Health::LatencyLost => "latency_lost",
            Health::InflightCollision => "inflight_collision",
            Health::InflightMiss => "inflight_miss",
            Health::ReadFault => "read_fault",
            Health::PartialCompletion => "partial_completion",
            Health::NoStartTime => "no_start_time",
            Health::FlushUnattributed => "flush_unattributed",
            Health::NameNoticeLost => "name_notice_lost",
            Health::InflightStale => "inflight_stale",
            Health::FlushCompletionUnseen => "flush_completion_unseen",
        }
    }

    /// True when the slot counts lost data (as opposed to information: a device whose
    /// statistics the operator turned off has no latency to lose).
    pub const fn is_loss(self) -> bool {
        !matches!(
            self,
            Health::PartialCompletion
                | Health::NoStartTime
                | Health::NameNoticeLost
                | Health::FlushCompletionUnseen
        )
    }
}

/// Marks an offset the running kernel does not have (for example no `bi_blkg` without
/// CONFIG_BLK_CGROUP); the programs skip what depends on it.
pub const ABSENT: u32 = u32::MAX;

/// Byte offsets of the kernel structure fields the programs read, resolved by userspace from
/// the running kernel's BTF (Rust eBPF has no CO-RE relocations) and passed as a global.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelLayout {
    /// `struct request`
    pub rq_cmd_flags: u32,
    pub rq_data_len: u32,
    pub rq_part: u32,
    pub rq_bio: u32,
    /// `struct bio`
    pub bio_opf: u32,
    pub bio_bdev: u32,
    /// `bio.bi_iter.bi_size`, both offsets added.
    pub bio_size: u32,
    pub bio_blkg: u32,
    /// `bio.bi_next`: the next bio of a request (fallback mode walks a front-merged request to
    /// the bio that allocated it).
    pub bio_next: u32,
    /// `struct block_device.bd_dev`
    pub bdev_dev: u32,
    /// `struct blkcg_gq.blkcg`
    pub blkg_blkcg: u32,
    /// `struct blkcg.css.cgroup`, both offsets added.
    pub blkcg_cgroup: u32,
    /// `struct cgroup.kn`
    pub cgroup_kn: u32,
    /// `struct kernfs_node.id`
    pub kn_id: u32,
    /// `struct block_device.bd_disk`, `struct gendisk.queue`, `struct request_queue.mq_ops`:
    /// a device whose queue has `mq_ops` is request-based (blk-mq).
    pub bdev_disk: u32,
    pub disk_queue: u32,
    pub queue_mq_ops: u32,
    /// What names a request in flight and when it started (see `hw_tag`): `request.q`,
    /// `request_queue.id`, `request.mq_hctx`, `blk_mq_hw_ctx.queue_num`, `request.tag`,
    /// `request.internal_tag` and `request.start_time_ns`. `ABSENT` together: then no latency
    /// is recorded.
    pub rq_q: u32,
    pub queue_id: u32,
    pub rq_mq_hctx: u32,
    pub hctx_queue_num: u32,
    pub rq_tag: u32,
    pub rq_internal_tag: u32,
    pub rq_start_time_ns: u32,
    /// `request.rq_flags` (`RQF_*`); `ABSENT` when unknown, then steps of a flush sequence are
    /// not told apart from completions.
    pub rq_flags: u32,
    /// 1: count bios on every device; 0: only on bio-based devices (zram, md, dm), where
    /// they are the only count. On blk-mq devices the request hooks already count the same I/O.
    pub all_bios: u32,
    /// 1: record each request's latency (the default); 0: counts only. Latency is what needs
    /// an in-flight entry handed from the submitting CPU to the completing one, the larger
    /// share of the cost per I/O (see BENCHMARKS.md); without it the completion hook only
    /// charges device flushes.
    pub latency: u32,
    pub ops: OpCodes,
}

impl KernelLayout {
    /// Offsets of Linux 6.18 x86_64 as seen on the development machine. Only a placeholder so the
    /// global has a value at compile time: userspace always overrides it from BTF.
    pub const PLACEHOLDER: KernelLayout = KernelLayout {
        rq_cmd_flags: ABSENT,
        rq_data_len: ABSENT,
        rq_part: ABSENT,
        rq_bio: ABSENT,
        bio_opf: ABSENT,
        bio_bdev: ABSENT,
        bio_size: ABSENT,
        bio_blkg: ABSENT,
        bio_next: ABSENT,
        bdev_dev: ABSENT,
        blkg_blkcg: ABSENT,
        blkcg_cgroup: ABSENT,
        cgroup_kn: ABSENT,
        kn_id: ABSENT,
        bdev_disk: ABSENT,
        disk_queue: ABSENT,
        queue_mq_ops: ABSENT,
        rq_q: ABSENT,
        queue_id: ABSENT,
        rq_mq_hctx: ABSENT,
        hctx_queue_num: ABSENT,
        rq_tag: ABSENT,
        rq_internal_tag: ABSENT,
        rq_start_time_ns: ABSENT,
        rq_flags: ABSENT,
        all_bios: 1,
        latency: 1,
        ops: OpCodes::LINUX_DEFAULT,
    };
}

/// Largest capacities; userspace lowers them at load time on hosts with many CPUs (per-CPU
/// maps hold one value per CPU) and reads the real ones back from the maps.
pub mod capacity {
    /// Distinct (process, device, cgroup, op) keys with request counters and latency (`IO_KEYS`
    /// entries, `IO_STATS` slots and `FREE_SLOTS` capacity).
    pub const IO_STATS: u32 = 16384;
    /// Distinct keys with bio counters.
    pub const BIO_STATS: u32 = 16384;
    /// Processes remembered as having done I/O, for the exec notice (`IO_TGIDS`, an LRU: the
    /// least recently keyed fall out first).
    pub const IO_TGIDS: u32 = 16384;
}

/// Major number of a kernel `dev_t` (MINORBITS = 20; not glibc's encoding).
pub const fn dev_major(dev: u32) -> u32 {
    dev >> 20
}

/// Minor number of a kernel `dev_t`.
pub const fn dev_minor(dev: u32) -> u32 {
    dev & 0xfffff
}

/// Kernel `dev_t` from major and minor.
pub const fn make_dev(major: u32, minor: u32) -> u32 {
    (major << 20) | (minor & 0xfffff)
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, with explicit padding and no pointers.
    unsafe impl aya::Pod for IoKey {}
    unsafe impl aya::Pod for IoCounters {}
    unsafe impl aya::Pod for IoStats {}
    unsafe impl aya::Pod for KeySlot {}
    unsafe impl aya::Pod for ProcessNotice {}
    unsafe impl aya::Pod for Inflight {}
    unsafe impl aya::Pod for BioInflight {}
    unsafe impl aya::Pod for FlushOwner {}
    unsafe impl aya::Pod for KernelLayout {}
    unsafe impl aya::Pod for OpCodes {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fallback_flush_never_takes_the_entry_at_its_borrowed_tag() {
        // A stale entry sits at the borrowed tag (a request of a pruned key, say 7): the
        // fallback mode charges the queue's requester (3), and does not even look it up.
        let mut looked = false;
        let charged = flush_charge(
            true,
            || {
                looked = true;
                Some(7)
            },
            || Some(3),
        );
        assert_eq!(charged, Some(3));
        assert!(!looked);
        assert_eq!(flush_charge(true, || Some(7), || None::<u32>), None);
    }

    #[test]
    fn an_io_start_flush_is_charged_to_the_request_waiting_for_it() {
        assert_eq!(flush_charge(false, || Some(7), || Some(3)), Some(7));
        // Its waiter unseen (started before attach, displaced by a collision): the requester.
        assert_eq!(flush_charge(false, || None, || Some(3)), Some(3));
        assert_eq!(flush_charge(false, || None, || None::<u32>), None);
    }

    #[test]
    fn classify_never_counts_flush_or_discard_as_read() {
        let c = OpCodes::LINUX_DEFAULT;
        assert_eq!(classify_op(0, &c), Op::Read);
        assert_eq!(classify_op(1, &c), Op::Write);
        assert_eq!(classify_op(2, &c), Op::Flush);
        assert_eq!(classify_op(3, &c), Op::Discard);
        assert_eq!(classify_op(5, &c), Op::Discard);
        assert_eq!(classify_op(9, &c), Op::Write);
        // A sync's empty preflush write is a write, as /proc/diskstats counts it; the device
        // flush it causes is a REQ_OP_FLUSH request of its own.
        assert_eq!(classify_op(1 | c.preflush, &c), Op::Write);
        assert!(asks_for_flush(1 | c.preflush, &c));
        assert!(asks_for_flush(1 | c.fua, &c));
        assert!(!asks_for_flush(1, &c));
        // Flags above the op bits do not change the op.
        assert_eq!(classify_op(1 << 11, &c), Op::Read);
        assert_eq!(classify_op(34, &c), Op::Other);
    }

    #[test]
    fn classify_follows_renumbered_codes() {
        let c = OpCodes {
            read: 7,
            write: 8,
            ..OpCodes::LINUX_DEFAULT
        };
        assert_eq!(classify_op(7, &c), Op::Read);
        assert_eq!(classify_op(8, &c), Op::Write);
        assert_eq!(classify_op(0, &c), Op::Other);
    }

    #[test]
    fn lat_bucket_is_floor_log2() {
        assert_eq!(lat_bucket(0), 0);
        assert_eq!(lat_bucket(1), 0);
        assert_eq!(lat_bucket(2), 1);
        assert_eq!(lat_bucket(3), 1);
        assert_eq!(lat_bucket(1023), 9);
        assert_eq!(lat_bucket(1024), 10);
        for shift in 0..LAT_BUCKETS {
            let v = 1u64 << shift;
            assert_eq!(lat_bucket(v), shift, "2^{shift}");
            assert!(bucket_lower_ns(shift) <= v && v < bucket_upper_ns(shift));
        }
        assert_eq!(lat_bucket(u64::MAX), LAT_BUCKETS - 1);
    }

    #[test]
    fn hw_tag_prefers_the_scheduler_tag_and_is_never_zero() {
        assert_eq!(hw_tag(0, 5, -1), Some(6));
        assert_eq!(
            hw_tag(0, -1, 7),
            Some(8),
            "scheduler tag before a driver tag exists"
        );
        assert_eq!(
            hw_tag(0, 3, 7),
            Some(8),
            "the same request once it has a driver tag"
        );
        assert_eq!(hw_tag(2, 0, -1), Some(1 + (2 << 20)));
        assert_eq!(hw_tag(0, -1, -1), None);
        assert_ne!(
            hw_tag(1, 0, -1),
            hw_tag(0, 0, -1),
            "queues keep their tags apart"
        );
    }

    #[test]
    fn inflight_slot_spreads_the_tags_of_many_devices() {
        // 16 devices with 2 hardware queues of 128 tags each: 4096 live requests.
        let mut seen = [false; INFLIGHT_SLOTS as usize];
        let mut distinct = 0;
        for queue in 0..16 {
            for q in 0..2 {
                for t in 0..128 {
                    let s = inflight_slot(queue, hw_tag(q, t, -1).unwrap());
                    assert!(s < INFLIGHT_SLOTS);
                    if !seen[s as usize] {
                        seen[s as usize] = true;
                        distinct += 1;
                    }
                }
            }
        }
        // A uniform hash of 4096 keys into 16384 slots leaves about 3600 distinct.
        assert!(
            distinct > 3400,
            "only {distinct} distinct slots for 4096 requests"
        );
    }

    #[test]
    fn bio_slot_is_in_range_and_spreads_bio_addresses() {
        let base = 0xffff_8880_1234_0000u64;
        let mut seen = [false; INFLIGHT_SLOTS as usize];
        let mut distinct = 0;
        for i in 0..1024u64 {
            let s = bio_slot(base + i * 192);
            assert!(s < INFLIGHT_SLOTS);
            if !seen[s as usize] {
                seen[s as usize] = true;
                distinct += 1;
            }
        }
        assert!(
            distinct > 950,
            "only {distinct} distinct slots for 1024 bios"
        );
    }

    #[test]
    fn dev_t_round_trip() {
        let d = make_dev(259, 3);
        assert_eq!((dev_major(d), dev_minor(d)), (259, 3));
        assert_eq!(make_dev(7, 0), 7 << 20);
    }

    #[test]
    fn struct_sizes_are_stable() {
        assert_eq!(core::mem::size_of::<IoKey>(), 24);
        assert_eq!(core::mem::size_of::<IoCounters>(), 32);
        assert_eq!(core::mem::size_of::<IoStats>(), 216);
        assert_eq!(core::mem::size_of::<FlushOwner>(), 16);
        assert_eq!(core::mem::size_of::<KeySlot>(), 8);
        assert_eq!(core::mem::size_of::<Inflight>(), 16);
        assert_eq!(core::mem::size_of::<BioInflight>(), 16);
    }
}
