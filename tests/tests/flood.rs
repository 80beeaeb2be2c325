//! Floods: 20,000 short-lived processes each doing one direct I/O while a long-lived "VM" does
//! a known amount. The kernel maps stay within their bounds, whatever does not fit is counted
//! (never lost silently), the long-lived process is still counted exactly, and the sampler's
//! memory stays flat.

use std::{
    alloc::{Layout, alloc_zeroed},
    fs::OpenOptions,
    os::unix::{fs::OpenOptionsExt as _, io::AsRawFd as _},
    time::{Duration, Instant},
};

use overkvm::{
    bpf::{LoadOptions, Programs},
    report::pid_alive,
    sample::{Sampler, delta},
};
use overkvm_common::{Health, Op};
use overkvm_tests::{
    devices::LoopDevice,
    iogen::{self, IoPlan},
    skip_unless_kernel,
};

const STORM: usize = 20_000;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Forks `n` children (at most `width` at a time); each does one 4 KiB direct read and exits.
/// Reaps only its own children (by pid), never the test's other child processes.
fn fork_storm(fd: i32, buf: *mut u8, n: usize, width: usize) -> usize {
    let mut live = std::collections::VecDeque::new();
    let mut done = 0;
    let mut failed = 0;
    let reap = |pid: i32, done: &mut usize, failed: &mut usize| {
        let mut st = 0;
        // SAFETY: waiting for a child we forked.
        if unsafe { libc::waitpid(pid, &mut st, 0) } == pid {
            *done += 1;
            if !(libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0) {
                *failed += 1;
            }
        }
    };
    for i in 0..n {
        if live.len() >= width {
            let pid = live.pop_front().expect("non-empty");
            reap(pid, &mut done, &mut failed);
        }
        // SAFETY: the child only calls async-signal-safe functions (pread, _exit).
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let off = ((i % 4096) * 2 * 4096) as i64;
            let r = unsafe { libc::pread(fd, buf.cast(), 4096, off) };
            unsafe { libc::_exit(if r == 4096 { 0 } else { 1 }) };
        }
        assert!(pid > 0, "fork failed: {}", std::io::Error::last_os_error());
        live.push_back(pid);
    }
    while let Some(pid) = live.pop_front() {
        reap(pid, &mut done, &mut failed);
    }
    assert_eq!(failed, 0, "some storm children failed their read");
    done
}

#[test]
fn fork_storm_is_bounded_counted_and_spares_long_lived_vms() {
    skip_unless_kernel!();
    let lo = LoopDevice::new(128).unwrap();
    let dev = lo.dev();
    let mut sampler = Sampler::new(Programs::load(&LoadOptions::default()).expect("load"));
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&lo.path)
        .unwrap();
    let layout = Layout::from_size_align(4096, 4096).unwrap();
    // SAFETY: non-zero size; leaked on purpose (children share it until they exit).
    let buf = unsafe { alloc_zeroed(layout) };

    let mut prev = sampler.snapshot().unwrap();
    let rss_before = rss_kib();
    let plan = IoPlan {
        reads: 20_000,
        writes: 0,
        block: 4096,
        start: 64 << 20,
        len: 32 << 20,
        seed: 3,
    };
    let mut vm = iogen::spawn(&lo.path, &plan).unwrap();
    let vm_pid = vm.id();

    // The storm runs on its own thread; this one samples and prunes like the daemon does.
    let fd = file.as_raw_fd();
    let buf_addr = buf as usize;
    let started = Instant::now();
    let storm = std::thread::spawn(move || fork_storm(fd, buf_addr as *mut u8, STORM, 64));
    let (mut storm_reads, mut vm_reads, mut dropped, mut peak_entries) = (0u64, 0u64, 0u64, 0u64);
    let mut capacity;
    let mut ticks = 0;
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let finished = storm.is_finished() && vm.try_wait().unwrap().is_some();
        let cur = sampler.snapshot().unwrap();
        let d = delta(&prev, &cur);
        for (k, c) in &d.requests {
            if k.dev != dev || k.op() != Op::Read {
                continue;
            }
            if k.tgid == vm_pid {
                vm_reads += c.ops;
            } else {
                storm_reads += c.ops;
            }
        }
        dropped += d.health[Health::StatsFull as usize];
        peak_entries = peak_entries.max(cur.map_fill("io_stats").entries);
        capacity = cur.map_fill("io_stats").capacity;
        sampler.prune(&cur, pid_alive);
        prev = cur;
        ticks += 1;
        if finished {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "storm did not finish"
        );
    }
    let forked = storm.join().unwrap();
    assert!(vm.wait().unwrap().success());
    // One more interval for the last completions.
    std::thread::sleep(Duration::from_millis(200));
    let cur = sampler.snapshot().unwrap();
    let d = delta(&prev, &cur);
    for (k, c) in &d.requests {
        if k.dev == dev && k.op() == Op::Read {
            if k.tgid == vm_pid {
                vm_reads += c.ops;
            } else {
                storm_reads += c.ops;
            }
        }
    }
    dropped += d.health[Health::StatsFull as usize];
    sampler.prune(&cur, pid_alive);
    let rss_after = rss_kib();
    eprintln!(
        "storm: {forked} processes in {:.1}s ({ticks} ticks); counted {storm_reads}, dropped (map full) {dropped}; \
         IO_STATS peak {peak_entries}/{capacity} entries; long-lived VM {vm_reads}/{} reads; sampler RSS {rss_before} -> {rss_after} KiB",
        started.elapsed().as_secs_f64(),
        plan.reads
    );
    assert_eq!(forked, STORM);
    assert_eq!(
        vm_reads, plan.reads,
        "the long-lived process is counted exactly"
    );
    assert_eq!(
        storm_reads + dropped,
        STORM as u64,
        "every storm I/O is counted or counted as dropped"
    );
    assert!(peak_entries <= capacity, "map within its bound");
    assert!(
        rss_after < rss_before + 32 * 1024,
        "sampler memory grew {rss_before} -> {rss_after} KiB"
    );
}
