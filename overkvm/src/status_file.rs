//! The files the throttle daemon leaves for its readers: the state file (what it changed on
//! the host, for `throttle reset` and the next start) and the status file (its last tick, for
//! `top`, `throttle status`, `vm list` and `overcommit`). Both the daemon and its readers
//! import this module, so where the files are and how they are read is said once.

use std::{
    fs::{self, OpenOptions},
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;

use crate::{config::Config, tick::ThrottleView};

/// Default directory of the state and status files.
pub const STATE_DIR: &str = "/run/overkvm";

/// Path of the state file for a config.
pub fn state_path(config: &Config) -> PathBuf {
    config
        .policy
        .state_file
        .as_ref()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(STATE_DIR).join("throttle.json"))
}

/// Path of the status file the daemon rewrites each tick.
pub fn status_path(config: &Config) -> PathBuf {
    state_path(config).with_file_name("status.json")
}

/// The daemon's last tick from its status file, however old (None when there is no readable
/// one).
pub fn read_status(config: &Config) -> Option<ThrottleView> {
    serde_json::from_slice(&fs::read(status_path(config)).ok()?).ok()
}

/// The running daemon's last tick, if its status file was written within `max_age`: a stale
/// file from a stopped daemon is ignored.
pub fn read_live(config: &Config, max_age: Duration) -> Option<ThrottleView> {
    let age = fs::metadata(status_path(config))
        .ok()?
        .modified()
        .ok()?
        .elapsed()
        .ok()?;
    if age > max_age {
        return None;
    }
    read_status(config)
}

/// Writes a file in its directory atomically; creates the directory (0700) if needed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    if !dir.exists() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let _ = fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700));
    }
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    let written = f
        .write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))
        .and_then(|_| {
            // rename() replaces a symlink at `path` itself: its target is never written.
            fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
        });
    if written.is_err() {
        // A full filesystem must not also keep a half-written temporary file.
        let _ = fs::remove_file(&tmp);
    }
    written
}
