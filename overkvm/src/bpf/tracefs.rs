//! Where tracefs is mounted, for `check` to report.
//!
//! overkvm attaches through BTF and does not need tracefs; `check` says whether it is mounted
//! because other tools (bpftrace's `tracepoint:` probes, `perf`) need it. Nothing here mounts
//! anything or writes to tracefs.

use std::path::{Path, PathBuf};

/// Where tracefs is usually mounted, in order of preference.
const CANDIDATES: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// The tracefs mount point in use: /sys/kernel/tracing if it has an `events` dir, else
/// /sys/kernel/debug/tracing if it has one, else None. Never mounts anything.
pub fn find_tracefs() -> Option<PathBuf> {
    find_tracefs_in(CANDIDATES.iter().map(Path::new))
}

/// The first candidate with an `events` directory (an unmounted mount point is an empty dir).
fn find_tracefs_in<'a>(candidates: impl IntoIterator<Item = &'a Path>) -> Option<PathBuf> {
    candidates
        .into_iter()
        .find(|c| c.join("events").is_dir())
        .map(Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_first_mounted_candidate() {
        let tmp = tempfile::tempdir().unwrap();
        let unmounted = tmp.path().join("tracing");
        let debug = tmp.path().join("debug_tracing");
        std::fs::create_dir_all(&unmounted).unwrap();
        std::fs::create_dir_all(debug.join("events/block")).unwrap();
        assert_eq!(find_tracefs_in([unmounted.as_path()]), None);
        assert_eq!(
            find_tracefs_in([unmounted.as_path(), debug.as_path()]),
            Some(debug.clone())
        );
    }
}
