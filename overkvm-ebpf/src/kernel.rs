//! Reading kernel structures at offsets userspace resolved from BTF.

use aya_ebpf::{EbpfContext as _, helpers::bpf_probe_read_kernel, programs::BtfTracePointContext};
use overkvm_common::{ABSENT, KernelLayout, hw_tag};

/// Field offsets of the running kernel, written by userspace at load time. It lives in
/// .rodata, so the verifier sees the values as constants and drops paths for absent fields.
#[unsafe(no_mangle)]
pub static LAYOUT: KernelLayout = KernelLayout::PLACEHOLDER;

/// Reads one `u32` of `LAYOUT`. Volatile, or the compiler would fold the placeholder in.
macro_rules! off {
    ($($field:ident).+) => {
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!($crate::kernel::LAYOUT.$($field).+)) }
    };
}
pub(crate) use off;

/// A typed kernel pointer: a `tp_btf` argument or a pointer field read through one. Fields are
/// read with plain loads (the verifier checks each against BTF and the JIT makes a faulting
/// load safe), which costs a fraction of a `bpf_probe_read_kernel` call.
pub type KPtr = *const u8;

/// Reads a `T` at `base + offset`; `None` for a null base or an absent field.
#[inline(always)]
pub fn read<T: Copy>(base: KPtr, offset: u32) -> Option<T> {
    if base.is_null() || offset == ABSENT {
        return None;
    }
    Some(unsafe { core::ptr::read_volatile(base.add(offset as usize) as *const T) })
}

/// The numeric value of tracepoint argument `n`. The verifier forbids arithmetic on typed
/// pointers, and the fallback mode's bio slots hash a bio's address, so the address is copied
/// out as a plain number (a helper call: requests are named by their tags instead).
#[inline(always)]
pub fn arg_addr(ctx: &BtfTracePointContext, n: usize) -> u64 {
    unsafe { bpf_probe_read_kernel((ctx.as_ptr() as *const u64).add(n)) }.unwrap_or(0)
}

/// The numeric value of a pointer field (see `arg_addr`).
#[inline(always)]
pub fn read_addr(base: KPtr, offset: u32) -> u64 {
    if base.is_null() || offset == ABSENT {
        return 0;
    }
    unsafe { bpf_probe_read_kernel(base.add(offset as usize) as *const u64) }.unwrap_or(0)
}

/// The block cgroup owning a bio: `bio->bi_blkg->blkcg->css.cgroup->kn->id`. This is the cgroup
/// `io.max` and `blkio.throttle.*` charge, and the one cgroup writeback assigns to a flusher's
/// bios; 0 when the kernel has no block cgroups or the bio has none.
#[inline(always)]
pub fn bio_cgroup(bio: KPtr) -> u64 {
    let Some(blkg) = read::<KPtr>(bio, off!(bio_blkg)) else {
        return 0;
    };
    let Some(blkcg) = read::<KPtr>(blkg, off!(blkg_blkcg)) else {
        return 0;
    };
    let Some(cgroup) = read::<KPtr>(blkcg, off!(blkcg_cgroup)) else {
        return 0;
    };
    let Some(kn) = read::<KPtr>(cgroup, off!(cgroup_kn)) else {
        return 0;
    };
    read(kn, off!(kn_id)).unwrap_or(0)
}

/// `dev_t` of a `struct block_device *`; 0 when unknown.
#[inline(always)]
pub fn bdev_dev(bdev: KPtr) -> u32 {
    read(bdev, off!(bdev_dev)).unwrap_or(0)
}

/// What names request `rq` while it is in flight: its request queue's id and `hw_tag`, from
/// plain loads. `None` when the kernel lacks a field (then no latency is recorded) or the
/// request has no tag.
#[inline(always)]
pub fn rq_ident(rq: KPtr) -> Option<(u32, u32)> {
    let q: KPtr = read(rq, off!(rq_q))?;
    let queue: u32 = read(q, off!(queue_id))?;
    let hctx: KPtr = read(rq, off!(rq_mq_hctx))?;
    let hw_queue: u32 = read(hctx, off!(hctx_queue_num))?;
    let tag: i32 = read(rq, off!(rq_tag))?;
    let internal_tag: i32 = read(rq, off!(rq_internal_tag))?;
    Some((queue, hw_tag(hw_queue, tag, internal_tag)?))
}

/// `rq->q->id`: the request queue a request belongs to.
#[inline(always)]
pub fn rq_queue_id(rq: KPtr) -> Option<u32> {
    let q: KPtr = read(rq, off!(rq_q))?;
    read(q, off!(queue_id))
}

/// `bio->bi_bdev->bd_disk->queue->id`: the request queue a bio goes to.
#[inline(always)]
pub fn bio_queue_id(bio: KPtr) -> Option<u32> {
    let bdev: KPtr = read(bio, off!(bio_bdev))?;
    let disk: KPtr = read(bdev, off!(bdev_disk))?;
    let q: KPtr = read(disk, off!(disk_queue))?;
    read(q, off!(queue_id))
}

/// True when a completion of `rq` is a step of the flush machinery (the data part of a
/// preflush or FUA write), not its end: the kernel ends and counts it later.
#[inline(always)]
pub fn in_flush_sequence(rq: KPtr) -> bool {
    let mask = off!(ops.flush_seq);
    read::<u32>(rq, off!(rq_flags)).is_some_and(|f| f & mask != 0)
}
