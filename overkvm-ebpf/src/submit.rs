//! Submission hooks: count ops and bytes when an I/O enters the block layer, in the context of
//! the task that submitted it, and remember who started each request for its completion.
//! Bytes are taken here because a request's length is already zero when it completes.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::btf_tracepoint, programs::BtfTracePointContext,
};
use overkvm_common::{Health, IoKey, OpCodes, asks_for_flush, classify_op};

use crate::{
    kernel::{KPtr, LAYOUT, arg_addr, bdev_dev, bio_cgroup, bio_queue_id, off, read, rq_ident},
    maps::{add_key_bytes, bio_put, count_request, flush_owner_put, health, inflight_put},
};

#[inline(always)]
fn tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

#[inline(always)]
pub fn op_codes() -> OpCodes {
    unsafe { core::ptr::read_volatile(core::ptr::addr_of!(LAYOUT.ops)) }
}

/// The key of an I/O submitted by the current task: its op flags, the device it goes to, and
/// the bio whose block cgroup owns it.
#[inline(always)]
fn submit_key(opf: u32, bdev: KPtr, bio: KPtr) -> IoKey {
    IoKey {
        tgid: tgid(),
        dev: bdev_dev(bdev),
        cgroup_id: bio_cgroup(bio),
        op: classify_op(opf, &op_codes()) as u8,
        _pad: [0; 7],
    }
}

/// The key and byte count of a bio, as its submitter sees it.
#[inline(always)]
pub fn bio_key(bio: KPtr) -> Option<(IoKey, u32)> {
    let opf: u32 = read(bio, off!(bio_opf))?;
    let bytes: u32 = read(bio, off!(bio_size)).unwrap_or(0);
    let bdev: KPtr = read(bio, off!(bio_bdev)).unwrap_or(core::ptr::null());
    Some((submit_key(opf, bdev, bio), bytes))
}

/// `block_io_start(struct request *rq)`, Linux 6.5+: request accounting starts. Runs in the
/// submitter's context (blk_mq_submit_bio), once per request, merged bios excluded.
#[btf_tracepoint(function = "block_io_start")]
pub fn io_start(ctx: BtfTracePointContext) -> i32 {
    let rq: KPtr = ctx.arg(0);
    let Some(opf) = read::<u32>(rq, off!(rq_cmd_flags)) else {
        health(Health::ReadFault);
        return 0;
    };
    let bytes: u32 = read(rq, off!(rq_data_len)).unwrap_or(0);
    let bio: KPtr = read(rq, off!(rq_bio)).unwrap_or(core::ptr::null());
    // The kernel sets rq->part only after this tracepoint: take the device from the head bio,
    // and fall back to rq->part for the rare bio-less request (a cloned flush).
    let bdev: KPtr = match read(bio, off!(bio_bdev)) {
        Some(b) => b,
        None => read(rq, off!(rq_part)).unwrap_or(core::ptr::null()),
    };
    let key = submit_key(opf, bdev, bio);
    let Some(slot) = count_request(&key, bytes as u64) else {
        return 0;
    };
    // Only requests the kernel timestamps reach `io_done` with a start time (iostats on, or
    // a scheduler): the others would leave entries nobody takes.
    let timed = read::<u64>(rq, off!(rq_start_time_ns)).is_some_and(|t| t != 0);
    // A preflush or FUA write may make the device flush its cache; the flush is charged to
    // the request whose tag it borrows, or else to the latest such request of the queue.
    let asks = asks_for_flush(opf, &op_codes());
    if (timed || asks)
        && let Some((queue, tag)) = rq_ident(rq)
    {
        if timed && off!(latency) != 0 {
            inflight_put(queue, tag, slot);
        }
        if asks {
            flush_owner_put(queue, slot);
        }
    }
    0
}

/// `block_bio_backmerge(struct bio *bio)` / `block_bio_frontmerge`, Linux 6.5+: a bio joined a
/// request that `io_start` already counted (plug and scheduler merges: sequential I/O). Its
/// bytes go to its own submitter, in whose context this runs; it adds no request.
#[inline(always)]
fn bio_merged(bio: KPtr) -> i32 {
    if let Some((key, bytes)) = bio_key(bio) {
        add_key_bytes(&key, bytes as u64);
    }
    0
}

#[btf_tracepoint(function = "block_bio_backmerge")]
pub fn bio_backmerge(ctx: BtfTracePointContext) -> i32 {
    bio_merged(ctx.arg(0))
}

#[btf_tracepoint(function = "block_bio_frontmerge")]
pub fn bio_frontmerge(ctx: BtfTracePointContext) -> i32 {
    bio_merged(ctx.arg(0))
}

/// `block_getrq(struct bio *bio)`, fallback for kernels before 6.5: a bio allocated a new
/// request, in the submitter's context. The bio is remembered until `rq_issue` finds it as the
/// request's head.
#[btf_tracepoint(function = "block_getrq")]
pub fn rq_getrq(ctx: BtfTracePointContext) -> i32 {
    let bio: KPtr = ctx.arg(0);
    let Some((key, bytes)) = bio_key(bio) else {
        health(Health::ReadFault);
        return 0;
    };
    if let Some(slot) = count_request(&key, bytes as u64) {
        bio_put(arg_addr(&ctx, 0), slot);
        // The request is not issued before the preflush its bio asks for: a device flush is
        // charged to the latest requester of the queue.
        let opf: u32 = read(bio, off!(bio_opf)).unwrap_or(0);
        if asks_for_flush(opf, &op_codes())
            && let Some(queue) = bio_queue_id(bio)
        {
            flush_owner_put(queue, slot);
        }
    }
    0
}
