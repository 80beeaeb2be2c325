//! Completion hooks: latency from the kernel's own start timestamp of the request
//! (`rq->start_time_ns`, taken at allocation, the one iostat's await uses) to completion, into
//! the histogram of the key recorded at start. The completing context (often an interrupt) is
//! never used for attribution.

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::btf_tracepoint, programs::BtfTracePointContext};
use overkvm_common::{Health, KeySlot, flush_charge};

use crate::{
    kernel::{KPtr, arg_addr, in_flush_sequence, off, read, read_addr, rq_ident, rq_queue_id},
    maps::{
        add_bytes, bio_take, count_flush, count_latency, flush_completed, flush_issued,
        flush_owner, health, inflight_holds, inflight_peek, inflight_put, inflight_take,
    },
    submit::op_codes,
};

#[inline(always)]
fn finish(rq: KPtr, fallback: bool) {
    let start: u64 = read(rq, off!(rq_start_time_ns)).unwrap_or(0);
    if start == 0 {
        // Not timestamped at allocation (iostats off, no scheduler): never given an entry.
        health(Health::NoStartTime);
        return;
    }
    let Some((queue, tag)) = rq_ident(rq) else {
        return;
    };
    let slot = match inflight_take(queue, tag) {
        Some(slot) => slot,
        // Fallback: a sync's empty preflush request is never issued to the driver (the flush
        // machinery ends it once the device flushed), so its submitter is still with its bio,
        // which the request holds again when it ends.
        None if fallback => match bio_take(read_addr(rq, off!(rq_bio))) {
            Some(slot) => slot,
            None => {
                health(Health::InflightMiss);
                return;
            }
        },
        None => {
            health(Health::InflightMiss);
            return;
        }
    };
    let now = unsafe { bpf_ktime_get_ns() };
    count_latency(&slot, now.saturating_sub(start));
}

/// A device cache flush completed: the flush machinery's own `REQ_OP_FLUSH` request, which
/// `/proc/diskstats` counts as a flush and which never passes `block_io_start`. Charged by
/// `flush_charge`: to the request whose tag it borrows, or to the queue's latest requester.
#[inline(always)]
fn device_flush(rq: KPtr, fallback: bool) {
    let owner = flush_charge(
        fallback,
        || rq_ident(rq).and_then(|(queue, tag)| inflight_peek(queue, tag)),
        || rq_queue_id(rq).and_then(flush_owner),
    );
    let Some(slot) = owner else {
        health(Health::FlushUnattributed);
        return;
    };
    let start: u64 = read(rq, off!(rq_start_time_ns)).unwrap_or(0);
    let latency = if start == 0 {
        0
    } else {
        unsafe { bpf_ktime_get_ns() }.saturating_sub(start)
    };
    if !count_flush(&slot, latency) {
        health(Health::FlushUnattributed);
    }
}

/// True when `rq` is the flush machinery's own `REQ_OP_FLUSH` request.
#[inline(always)]
fn is_device_flush(rq: KPtr) -> bool {
    let codes = op_codes();
    read::<u32>(rq, off!(rq_cmd_flags)).is_some_and(|opf| opf & codes.op_mask == codes.flush)
}

/// Sorts a completion: a device flush, a step of a flush sequence (ignored, as the kernel's
/// own statistics ignore it), or the end of a request started at submission. True for a
/// device flush.
#[inline(always)]
fn completed(rq: KPtr, fallback: bool) -> bool {
    if is_device_flush(rq) {
        device_flush(rq, fallback);
        return true;
    }
    // Without latency (6.5+ hooks only: `io_start` then keeps no entry) a request's end has
    // nothing to take.
    if (fallback || off!(latency) != 0) && !in_flush_sequence(rq) {
        finish(rq, fallback);
    }
    false
}

/// `block_io_done(struct request *rq)`, Linux 6.5+: called once per request when its
/// accounting ends, after all of its parts completed; also for the steps of a flush sequence
/// and for the flush machinery's own flush requests (see `completed`).
#[btf_tracepoint(function = "block_io_done")]
pub fn io_done(ctx: BtfTracePointContext) -> i32 {
    if completed(ctx.arg(0), false) {
        flush_completed(arg_addr(&ctx, 0));
    }
    0
}

/// `block_rq_issue(struct request *rq)`, Linux 6.5+ mode: only the flush machinery's own
/// flush request (no bio) matters here; every other request leaves after one read. Its issue
/// is remembered so that a completion `block_io_done` never reports is still counted, as in
/// the fallback mode (see `flush_issue`): this mode lost such a flush too, silently, about
/// once in 20,000 on Linux 6.18.
#[btf_tracepoint(function = "block_rq_issue")]
pub fn flush_issue_hook(ctx: BtfTracePointContext) -> i32 {
    let rq: KPtr = ctx.arg(0);
    if is_device_flush(rq) && read_addr(rq, off!(rq_bio)) == 0 {
        flush_issue(arg_addr(&ctx, 0), rq, false);
    }
    0
}

/// Bios a request is searched for the one that allocated it (`rq_getrq`).
const FRONT_MERGES: usize = 4;

/// Fallback: takes the submitter of a request about to be issued, from the bio that allocated
/// it, with that bio's size. It is the head bio unless bios were front-merged in front of it
/// (plug and scheduler merges), then one of the first few.
#[inline(always)]
fn take_allocating_bio(rq: KPtr, head: u64) -> Option<(KeySlot, u32)> {
    // The typed pointer reads the bio's fields; its numeric value `head` (read apart: the
    // verifier forbids arithmetic on typed pointers) names the bio's entry.
    let (mut bio, mut addr): (KPtr, u64) = (read(rq, off!(rq_bio))?, head);
    for _ in 0..FRONT_MERGES {
        if addr == 0 {
            return None;
        }
        if let Some(slot) = bio_take(addr) {
            return Some((slot, read(bio, off!(bio_size)).unwrap_or(0)));
        }
        addr = read_addr(bio, off!(bio_next));
        bio = read(bio, off!(bio_next))?;
    }
    None
}

/// `block_rq_issue(struct request *rq)`, fallback: the request goes to the driver. Moves the
/// submitter of the bio that allocated it (from `rq_getrq`) to the request's slot, so the
/// completion finds it. A requeued request is issued again: its bio was taken at its first
/// issue, and it keeps its slot.
///
/// The bio is looked up before the tag: an entry at the tag is a requeue only when no bio of
/// the request has one. An entry left at the tag by an earlier request whose end was missed
/// used to pass for a requeue: the new request then lost the bytes merged into it, left its
/// bio's entry behind, and its completion took the stale key.
#[btf_tracepoint(function = "block_rq_issue")]
pub fn rq_issue(ctx: BtfTracePointContext) -> i32 {
    let rq: KPtr = ctx.arg(0);
    let head = read_addr(rq, off!(rq_bio));
    if head == 0 {
        // Flush and passthrough requests carry no bio and were never counted at getrq.
        if is_device_flush(rq) {
            flush_issue(arg_addr(&ctx, 0), rq, true);
        }
        return 0;
    }
    let Some((queue, tag)) = rq_ident(rq) else {
        return 0;
    };
    match take_allocating_bio(rq, head) {
        Some((slot, counted)) => {
            // `rq_getrq` counted the allocating bio's bytes; bios merged into the request
            // since then (plug and elevator merges, e.g. writeback) are in its length now, and
            // the request only reaches here once.
            let len: u32 = read(rq, off!(rq_data_len)).unwrap_or(0);
            if len > counted {
                add_bytes(&slot, (len - counted) as u64);
            }
            if inflight_holds(queue, tag) {
                health(Health::InflightStale);
            }
            // Replaces an entry of the same request queue and tag, stale or not.
            inflight_put(queue, tag, slot);
        }
        None if inflight_holds(queue, tag) => {}
        None => health(Health::InflightMiss),
    }
    0
}

/// `block_rq_complete(struct request *rq, blk_status_t error, unsigned int nr_bytes)`,
/// fallback: fires for every part of a request. Only the part that completes what remains
/// (`nr_bytes >= __data_len`, read before the kernel subtracts it) ends the request.
#[btf_tracepoint(function = "block_rq_complete")]
pub fn rq_complete(ctx: BtfTracePointContext) -> i32 {
    let rq: KPtr = ctx.arg(0);
    let nr_bytes = ctx.arg::<u32>(2);
    let remaining: u32 = read(rq, off!(rq_data_len)).unwrap_or(0);
    if nr_bytes < remaining {
        health(Health::PartialCompletion);
        return 0;
    }
    if completed(rq, true) {
        flush_completed(arg_addr(&ctx, 0));
    }
    0
}

/// `block_rq_requeue(struct request *rq)`, both modes: a driver gave an issued request back
/// (its queue was full) to be issued again. A device flush then leaves its in-flight entry, or its
/// second issue would take the first for a completion never seen. Rare: only on requeues.
#[btf_tracepoint(function = "block_rq_requeue")]
pub fn rq_requeue(ctx: BtfTracePointContext) -> i32 {
    let rq: KPtr = ctx.arg(0);
    if read_addr(rq, off!(rq_bio)) == 0 && is_device_flush(rq) {
        flush_completed(arg_addr(&ctx, 0));
    }
    0
}

/// The flush machinery issued its flush request to the driver. It is remembered in flight with
/// the owner its completion would charge (`flush_charge`), and a previous issue of the same
/// request whose completion the hook never saw is charged now (see
/// `Health::FlushCompletionUnseen`): the kernel counted that flush in `/proc/diskstats`.
#[inline(always)]
fn flush_issue(addr: u64, rq: KPtr, fallback: bool) {
    let owner = flush_charge(
        fallback,
        || rq_ident(rq).and_then(|(queue, tag)| inflight_peek(queue, tag)),
        || rq_queue_id(rq).and_then(flush_owner),
    );
    if let Some(slot) = flush_issued(addr, owner) {
        health(Health::FlushCompletionUnseen);
        if !count_flush(&slot, 0) {
            health(Health::FlushUnattributed);
        }
    }
}
