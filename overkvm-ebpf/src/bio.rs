//! `block_bio_queue`: every bio entering the block layer, on every device. Bio-based and stacked
//! devices (zram, md, dm) have no requests, and cgroup `io.max` throttles bios, so a budget on
//! a logical device is enforced on these numbers.

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use overkvm_common::Health;

use crate::{
    maps::{BIO_STATS, count_io, health},
    submit::bio_key,
};

/// `block_bio_queue(struct bio *bio)`: fired once per bio (the kernel flags it as traced, so a
/// resubmitted remainder of a split is not counted twice).
#[btf_tracepoint(function = "block_bio_queue")]
pub fn bio_queue(ctx: BtfTracePointContext) -> i32 {
    let bio: crate::kernel::KPtr = ctx.arg(0);
    match bio_key(bio) {
        Some((key, bytes)) => count_io(&BIO_STATS, &key, bytes as u64, Health::BioStatsFull),
        None => health(Health::ReadFault),
    }
    0
}
