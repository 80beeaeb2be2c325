//! `block_bio_queue`: bios entering the block layer. Bio-based and stacked devices (zram, md,
//! dm) have no requests, and cgroup `io.max` throttles bios, so a budget on a logical device is
//! enforced on these numbers. On blk-mq devices the request hooks already count the same I/O,
//! so there the hook returns early unless userspace asked for bios everywhere (`all_bios`).

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use overkvm_common::Health;

use crate::{
    kernel::{KPtr, off, read},
    maps::{count_bio, health},
    submit::bio_key,
};

/// True when the bio goes to a blk-mq (request-based) device: `bi_bdev->bd_disk->queue->mq_ops`.
#[inline(always)]
fn request_based(bio: KPtr) -> bool {
    let disk = read::<KPtr>(bio, off!(bio_bdev))
        .and_then(|bdev| read::<KPtr>(bdev, off!(bdev_disk)))
        .and_then(|disk| read::<KPtr>(disk, off!(disk_queue)))
        .and_then(|q| read::<KPtr>(q, off!(queue_mq_ops)));
    disk.is_some_and(|mq| !mq.is_null())
}

/// `block_bio_queue(struct bio *bio)`: fired once per bio (the kernel flags it as traced, so a
/// resubmitted remainder of a split is not counted twice).
#[btf_tracepoint(function = "block_bio_queue")]
pub fn bio_queue(ctx: BtfTracePointContext) -> i32 {
    let bio: KPtr = ctx.arg(0);
    if off!(all_bios) == 0 && request_based(bio) {
        // The request hooks count this I/O; a second count would only cost.
        return 0;
    }
    match bio_key(bio) {
        Some((key, bytes)) => count_bio(&key, bytes as u64),
        None => health(Health::ReadFault),
    }
    0
}

/// `block_split(struct bio *bio, unsigned int new_sector)`: a bio was split at a device limit;
/// `bio` is the front piece, and the remainder is submitted again. The kernel's per-cgroup
/// counters (v2 `io.stat`, v1 `blkio.throttle.io_serviced`) count that resubmission as one more
/// I/O, so the bio counts do too: one op, no bytes (they are in the original bio's count).
#[btf_tracepoint(function = "block_split")]
pub fn bio_split(ctx: BtfTracePointContext) -> i32 {
    let bio: KPtr = ctx.arg(0);
    if off!(all_bios) == 0 && request_based(bio) {
        return 0;
    }
    match bio_key(bio) {
        Some((key, _)) => count_bio(&key, 0),
        None => health(Health::ReadFault),
    }
    0
}
