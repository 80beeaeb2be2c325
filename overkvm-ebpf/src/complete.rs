//! Completion hooks: latency from the start hook's timestamp to completion, into the log2
//! histogram of the key recorded at start. The completing context (often an interrupt) is never
//! used for attribution.

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::btf_tracepoint, programs::BtfTracePointContext};
use overkvm_common::{Health, inflight_slot};

use crate::{
    kernel::{KPtr, arg_addr, off, read, read_addr},
    maps::{
        BIO_INFLIGHT, INFLIGHT, IO_STATS, add_bytes, count_latency, health, inflight_put,
        inflight_take,
    },
};

#[inline(always)]
fn finish(rq: u64) {
    if let Some(entry) = inflight_take(&INFLIGHT, rq) {
        let now = unsafe { bpf_ktime_get_ns() };
        count_latency(&entry.key, now.saturating_sub(entry.start_ns));
    }
}

/// `block_io_done(struct request *rq)`, Linux 6.5+: called once per request when its
/// accounting ends, after all of its parts completed.
#[btf_tracepoint(function = "block_io_done")]
pub fn io_done(ctx: BtfTracePointContext) -> i32 {
    finish(arg_addr(&ctx, 0));
    0
}

/// `block_rq_issue(struct request *rq)`, fallback: the request goes to the driver. Moves the
/// start record of its head bio (from `rq_getrq`) to the request, so the completion can find it
/// by request pointer. A requeued request is issued again and keeps its first record.
#[btf_tracepoint(function = "block_rq_issue")]
pub fn rq_issue(ctx: BtfTracePointContext) -> i32 {
    let rq_ptr: KPtr = ctx.arg(0);
    let rq = arg_addr(&ctx, 0);
    if let Some(slot) = INFLIGHT.get(inflight_slot(rq))
        && slot.ptr == rq
    {
        return 0;
    }
    let head = read_addr(rq_ptr, off!(rq_bio));
    if head == 0 {
        // Flush and passthrough requests carry no bio and were never counted at getrq.
        return 0;
    }
    if let Some(entry) = inflight_take(&BIO_INFLIGHT, head) {
        // `rq_getrq` counted the head bio's bytes; bios merged into the request since then
        // (plug and elevator back merges, e.g. writeback) are in its length now, and the
        // request only reaches here once.
        let len: u32 = read(rq_ptr, off!(rq_data_len)).unwrap_or(0);
        let head_ptr: KPtr = read(rq_ptr, off!(rq_bio)).unwrap_or(core::ptr::null());
        let head_len: u32 = read(head_ptr, off!(bio_size)).unwrap_or(0);
        if len > head_len {
            add_bytes(&IO_STATS, &entry.key, (len - head_len) as u64);
        }
        inflight_put(&INFLIGHT, rq, entry.start_ns, &entry.key);
    }
    0
}

/// `block_rq_complete(struct request *rq, blk_status_t error, unsigned int nr_bytes)`,
/// fallback: fires for every part of a request. Only the part that completes what remains
/// (`nr_bytes >= __data_len`, read before the kernel subtracts it) ends the request.
#[btf_tracepoint(function = "block_rq_complete")]
pub fn rq_complete(ctx: BtfTracePointContext) -> i32 {
    let rq_ptr: KPtr = ctx.arg(0);
    let nr_bytes = ctx.arg::<u32>(2);
    let remaining: u32 = read(rq_ptr, off!(rq_data_len)).unwrap_or(0);
    if nr_bytes < remaining {
        health(Health::PartialCompletion);
        return 0;
    }
    finish(arg_addr(&ctx, 0));
    0
}
