//! `/proc/self/mountinfo` (cgroup mounts): mount points are octal-escaped and may be named by
//! anyone who can mount (user namespaces).
#![no_main]

use libfuzzer_sys::fuzz_target;
use overkvm::host::cgroup::parse_mountinfo;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for m in parse_mountinfo(&text) {
        assert!(m.fs_type == "cgroup" || m.fs_type == "cgroup2");
        if m.fs_type == "cgroup2" {
            assert!(m.controllers.is_empty());
        }
        for c in &m.controllers {
            assert!(!c.contains([',', '=']) && c != "rw" && c != "ro", "{c:?}");
        }
    }
});
