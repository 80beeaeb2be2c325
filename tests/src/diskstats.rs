//! The kernel's own per-device counts (`/proc/diskstats`), the ground truth the tests check
//! overkvm against, and the barrier that makes a snapshot comparable with them.

use std::time::{Duration, Instant};

/// (reads, writes) completed on a device.
pub fn ops(disk: &str) -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/diskstats").expect("/proc/diskstats");
    text.lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&disk))
                .then(|| (f[3].parse().expect("reads"), f[7].parse().expect("writes")))
        })
        .unwrap_or_else(|| panic!("{disk} is not in /proc/diskstats"))
}

/// Waits until the kernel has ended at least `more` requests on `disk` since `since` (its
/// `ops` then), and then until its counts stay still for a moment.
///
/// A process's I/O is done for it before the block layer has accounted the request: the bio
/// ends (waking the submitter, which may return and even exit) and only then is the request
/// ended, its completion tracepoint fired and diskstats counted, in that order. So a snapshot
/// taken when the submitters have exited can miss the completions of their last requests (seen
/// on a loaded host: 6 of a process's 644); one taken once diskstats counted them cannot.
pub fn wait_for_completions(disk: &str, since: (u64, u64), more: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let done = |now: (u64, u64)| (now.0 + now.1).saturating_sub(since.0 + since.1);
    let mut last = ops(disk);
    let mut still_since = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let now = ops(disk);
        if now != last {
            last = now;
            still_since = Instant::now();
        } else if done(now) >= more && still_since.elapsed() >= Duration::from_millis(100) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{disk}: the kernel ended {} of the {more} requests expected within 30 s",
            done(now)
        );
    }
}
