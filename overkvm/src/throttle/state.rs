//! The record of everything the throttle changed on the host: limits written, processes moved,
//! cgroups created. It is saved before each change is made, so that after a crash (`kill -9`)
//! the next start, or `overkvm-io throttle reset`, can undo exactly that and nothing else.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use super::qemu_actuator::QemuLimitRecord;
use crate::host::{
    cgroup::limits::{LimitError, LimitWriter},
    proc,
};

/// A limit this service wrote.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrittenLimit {
    pub cgroup: String,
    pub major: u32,
    pub minor: u32,
}

/// A process this service moved into a cgroup of its own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MovedProcess {
    pub pid: u32,
    /// Start time (clock ticks) of the process, so a reused PID is never moved back.
    pub start_time: u64,
    pub from: String,
    pub to: String,
}

/// Everything to undo.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThrottleState {
    /// Hierarchy these paths belong to (v1 blkio or v2 mount point).
    pub root: PathBuf,
    pub limits: Vec<WrittenLimit>,
    pub moved: Vec<MovedProcess>,
    pub created: Vec<String>,
    /// QEMU limits written on VMs' disks, with the settings to put back (absent in files of
    /// versions without QEMU throttling).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub qemu: Vec<QemuLimitRecord>,
}

impl ThrottleState {
    pub fn is_empty(&self) -> bool {
        self.limits.is_empty()
            && self.moved.is_empty()
            && self.created.is_empty()
            && self.qemu.is_empty()
    }

    /// Records a QEMU limit on a disk unless one is on record for it (its original must stay
    /// the one read before overkvm first touched the disk).
    pub fn note_qemu(&mut self, r: QemuLimitRecord) -> bool {
        if self
            .qemu
            .iter()
            .any(|q| q.pid == r.pid && q.start_time == r.start_time && q.disk == r.disk)
        {
            return false;
        }
        self.qemu.push(r);
        true
    }

    /// Loads a state file; a missing file is an empty state.
    pub fn load(path: &Path) -> anyhow::Result<ThrottleState> {
        match fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text)
                .with_context(|| format!("{} is not a valid throttle state file", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ThrottleState::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Saves atomically (write a new file, then rename over), never through a symlink.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        crate::status_file::write_atomic(path, &serde_json::to_vec_pretty(self)?)
    }

    pub fn note_limit(&mut self, cgroup: &str, major: u32, minor: u32) -> bool {
        let w = WrittenLimit {
            cgroup: cgroup.to_string(),
            major,
            minor,
        };
        if self.limits.contains(&w) {
            return false;
        }
        self.limits.push(w);
        true
    }

    pub fn forget_limit(&mut self, cgroup: &str, major: u32, minor: u32) {
        self.limits
            .retain(|w| !(w.cgroup == cgroup && w.major == major && w.minor == minor));
    }
}

/// Undoes everything in `state`: removes limits, moves processes back, removes created
/// cgroups. Goes on past failures (a cgroup already gone is fine) and returns what it could not
/// undo, one line each.
pub fn undo(state: &ThrottleState, act: &dyn LimitWriter) -> Vec<String> {
    let mut failed = super::qemu_actuator::restore(&state.qemu);
    for w in &state.limits {
        match act.clear(&w.cgroup, w.major, w.minor) {
            Ok(()) | Err(LimitError::Gone { .. }) => {}
            Err(e) => failed.push(format!(
                "limit of {} on {}:{}: {:#}",
                w.cgroup,
                w.major,
                w.minor,
                anyhow::Error::from(e)
            )),
        }
    }
    for m in &state.moved {
        if proc::start_time(m.pid) == Some(m.start_time)
            && let Err(e) = act.move_process(&m.from, m.pid)
        {
            failed.push(format!("moving pid {} back to {}: {e:#}", m.pid, m.from));
        }
    }
    for c in state.created.iter().rev() {
        if let Err(e) = act.remove_cgroup(c) {
            let gone = e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
            });
            if !gone {
                failed.push(format!("removing cgroup {c}: {e:#}"));
            }
        }
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_dedups() {
        let root = tempfile::tempdir().unwrap();
        // Not there yet: saving creates it.
        let dir = root.path().join("state");
        let path = dir.join("throttle.json");
        let mut s = ThrottleState::default();
        assert!(s.note_limit("/a", 7, 0));
        assert!(!s.note_limit("/a", 7, 0));
        s.moved.push(MovedProcess {
            pid: 1,
            start_time: 2,
            from: "/".into(),
            to: "/overkvm/x".into(),
        });
        s.save(&path).unwrap();
        assert_eq!(ThrottleState::load(&path).unwrap(), s);
        s.forget_limit("/a", 7, 0);
        assert!(s.limits.is_empty());
        assert!(
            ThrottleState::load(&dir.join("missing.json"))
                .unwrap()
                .is_empty()
        );
        fs::write(&path, "{not json").unwrap();
        assert!(ThrottleState::load(&path).is_err());
    }

    #[test]
    fn save_replaces_a_planted_symlink_and_never_writes_its_target() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path();
        let outside = dir.join("outside.txt");
        fs::write(&outside, "precious").unwrap();
        let path = dir.join("throttle.json");
        std::os::unix::fs::symlink(&outside, &path).unwrap();
        // A symlink planted at the temporary file's name is not followed either.
        let tmp = dir.join(format!(".throttle.json.{}.tmp", std::process::id()));
        std::os::unix::fs::symlink(&outside, &tmp).unwrap();
        let mut s = ThrottleState::default();
        s.note_limit("/a", 7, 0);
        s.save(&path).unwrap();
        assert_eq!(fs::read_to_string(&outside).unwrap(), "precious");
        assert!(
            !fs::symlink_metadata(&path)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(ThrottleState::load(&path).unwrap(), s);
        assert!(!tmp.exists());
    }
}
