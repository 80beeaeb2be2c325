//! cgroup files the throttle and lifecycle code read back: v2 `io.max` and `io.stat`, v1
//! `blkio.throttle.*_device` and `io_serviced`, and the "MAJ:MIN" device numbers in them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use overkvm::devices::parse_maj_min;
use overkvm::host::cgroup::counters::{parse_v1_serviced, parse_v2_stat};
use overkvm::host::cgroup::limits::{Limits, io_max_line, parse_io_max, parse_v1};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // The disk: the first word when it is a device number, else 7:0 (loop0).
    let first = text.split_whitespace().next().unwrap_or("");
    let (major, minor) = match parse_maj_min(first) {
        Some(dev) => (dev >> 20, dev & 0xfffff),
        None => (7, 0),
    };

    // "MAJ:MIN" -> dev_t (major << 20 | minor), majors below 4096 and minors below 2^20.
    let expect = first.trim().split_once(':').and_then(|(a, b)| {
        let (a, b) = (a.parse::<u32>().ok()?, b.parse::<u32>().ok()?);
        (a < 4096 && b < 1 << 20).then_some(a << 20 | b)
    });
    assert_eq!(parse_maj_min(first), expect);

    let limits = parse_io_max(&text, major, minor);
    // The line written for a disk reads back as the same limits (0 is written as 1: the
    // kernel refuses 0).
    let line = io_max_line(major, minor, &limits);
    let one = |v: Option<u64>| v.map(|v| v.max(1));
    let want = Limits {
        riops: one(limits.riops),
        wiops: one(limits.wiops),
        rbps: one(limits.rbps),
        wbps: one(limits.wbps),
    };
    assert_eq!(parse_io_max(&line, major, minor), want, "{line}");

    let _ = parse_v1(&text, major, minor);
    let _ = parse_v1_serviced(&text);
    let _ = parse_v2_stat(&text);
});
