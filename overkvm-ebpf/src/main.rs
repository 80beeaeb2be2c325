//! overkvm's kernel programs.
//!
//! Every block I/O is attributed at submission to the submitting process (tgid), the cgroup
//! that owns it for the block controller, the device and the operation, and aggregated in
//! per-CPU maps; userspace reads the maps, nothing is streamed per event.
//!
//! Two hook families, picked by userspace from what the kernel has:
//! - `io_start` / `io_done` on `block_io_start` / `block_io_done` (Linux 6.5+);
//! - `rq_getrq` / `rq_issue` / `rq_complete` on older kernels.
//!
//! They are BTF tracepoints (`tp_btf`): the arguments are typed pointers, so fields at the
//! offsets userspace resolved from BTF are read with plain loads the verifier checks. The
//! verifier forbids arithmetic on typed pointers, so where a request's address is hashed (the
//! in-flight slots) it is copied out once as a number.
//!
//! `bio_queue` counts bios on every device, including bio-based and stacked ones (zram, md, dm),
//! the way the cgroup throttler sees them.
//!
//! `proc_exec` tells userspace when a process that did I/O execs, so its name is read again.
#![no_std]
#![no_main]

mod bio;
mod complete;
mod kernel;
mod maps;
mod process;
mod submit;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable path here; this is never executed.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
