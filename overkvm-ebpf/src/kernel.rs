//! Reading kernel structures at offsets userspace resolved from BTF.

use aya_ebpf::helpers::bpf_probe_read_kernel;
use overkvm_common::{ABSENT, KernelLayout};

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

/// Reads a `T` at `base + offset` of kernel memory; `None` for a null base, an absent field or
/// a fault.
#[inline(always)]
pub fn read<T>(base: u64, offset: u32) -> Option<T> {
    if base == 0 || offset == ABSENT {
        return None;
    }
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T).ok() }
}

/// The block cgroup owning a bio: `bio->bi_blkg->blkcg->css.cgroup->kn->id`. This is the cgroup
/// `io.max` and `blkio.throttle.*` charge, and the one cgroup writeback assigns to a flusher's
/// bios; 0 when the kernel has no block cgroups or the bio has none.
#[inline(always)]
pub fn bio_cgroup(bio: u64) -> u64 {
    let blkg: u64 = match read(bio, off!(bio_blkg)) {
        Some(p) => p,
        None => return 0,
    };
    let blkcg: u64 = match read(blkg, off!(blkg_blkcg)) {
        Some(p) => p,
        None => return 0,
    };
    let cgroup: u64 = match read(blkcg, off!(blkcg_cgroup)) {
        Some(p) => p,
        None => return 0,
    };
    let kn: u64 = match read(cgroup, off!(cgroup_kn)) {
        Some(p) => p,
        None => return 0,
    };
    read(kn, off!(kn_id)).unwrap_or(0)
}

/// `dev_t` of a `struct block_device *`; 0 when unknown.
#[inline(always)]
pub fn bdev_dev(bdev: u64) -> u32 {
    read(bdev, off!(bdev_dev)).unwrap_or(0)
}
