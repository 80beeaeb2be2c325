//! `block_bio_queue`: every bio entering the block layer, on every device. Bio-based and stacked
//! devices (zram, md, dm) have no requests, and cgroup `io.max` throttles bios, so a budget on
//! a logical device is enforced on these numbers.

use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};
use overkvm_common::Health;

use crate::{
    maps::{BIO_STATS, count_io, health},
    submit::bio_key,
};

/// `block_bio_queue(struct bio *bio)`: fired once per bio (the kernel flags it as traced, so a
/// resubmitted remainder of a split is not counted twice).
#[raw_tracepoint(tracepoint = "block_bio_queue")]
pub fn bio_queue(ctx: RawTracePointContext) -> i32 {
    let bio = ctx.arg::<u64>(0);
    match bio_key(bio) {
        Some((key, bytes)) => count_io(&BIO_STATS, &key, bytes as u64, Health::BioStatsFull),
        None => health(Health::ReadFault),
    }
    0
}
