//! Whether a VM runs: its pidfile, what `vm start` recorded, and /proc, classified by one pure
//! function.

use std::{fs, path::Path};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use super::definition::{VmDefinition, VmPaths};
use crate::host::{proc::ProcessDir, read_capped};

/// What `vm start` writes next to the definition once qemu runs (`run.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    pub pid: u32,
    /// Field 22 of /proc/PID/stat (clock ticks since boot): with the pid it names one process,
    /// so a reused pid is never taken for the VM.
    pub start_time: u64,
    /// Wall clock at start, RFC 3339.
    pub started_at: String,
    /// `tcg` or `kvm`.
    pub accel: String,
    /// The VM's cgroup, relative to `cgroup_root` (None with `--no-cgroup`).
    pub cgroup: Option<String>,
    pub cgroup_root: Option<std::path::PathBuf>,
}

/// A VM's run state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    Running,
    /// Not running, and it ended normally (qemu removed its pidfile) or never ran.
    Stopped,
    /// qemu's pidfile is there but that process is gone, or is another process: qemu was
    /// killed or crashed.
    Crashed,
}

impl VmState {
    pub fn name(self) -> &'static str {
        match self {
            VmState::Running => "running",
            VmState::Stopped => "stopped",
            VmState::Crashed => "crashed",
        }
    }
}

/// What /proc says about a pid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcView {
    pub start_time: u64,
    /// Exited but not reaped yet: gone for our purposes.
    pub zombie: bool,
    /// Its command line carries this VM's `-uuid`.
    pub is_this_vm: bool,
}

/// Classifies a VM. `pidfile` is the pid in qemu's pidfile, `record` what `vm start` wrote,
/// `proc_of` looks a pid up in /proc. Returns the state and the live pid.
///
/// qemu deletes its pidfile when it exits normally (guest power-off, `quit`), and cannot when
/// it is killed; so a pidfile whose process is gone means a crash. A pid is only the VM's when
/// its start time is the recorded one (or, without a record, its argv has the VM's UUID).
pub fn classify(
    pidfile: Option<u32>,
    record: Option<&RunRecord>,
    proc_of: impl Fn(u32) -> Option<ProcView>,
) -> (VmState, Option<u32>) {
    let is_ours = |pid: u32| -> bool {
        let Some(p) = proc_of(pid) else {
            return false;
        };
        if p.zombie {
            return false;
        }
        match record {
            Some(r) if r.pid == pid => r.start_time == p.start_time,
            _ => p.is_this_vm,
        }
    };
    match (pidfile, record) {
        (Some(pid), _) if is_ours(pid) => (VmState::Running, Some(pid)),
        (Some(_), _) => (VmState::Crashed, None),
        (None, Some(r)) if is_ours(r.pid) => (VmState::Running, Some(r.pid)),
        (None, _) => (VmState::Stopped, None),
    }
}

/// Reads a pidfile: a decimal pid and a newline; None if absent or malformed.
pub fn read_pidfile(path: &Path) -> Option<u32> {
    let (raw, _) = read_capped(path, 64).ok()?;
    let text = std::str::from_utf8(&raw).ok()?.trim();
    text.parse().ok().filter(|p| *p > 0)
}

pub fn read_record(path: &Path) -> Option<RunRecord> {
    let (raw, _) = read_capped(path, 64 << 10).ok()?;
    serde_json::from_slice(&raw).ok()
}

pub fn write_record(path: &Path, r: &RunRecord) -> anyhow::Result<()> {
    let json = serde_json::to_vec_pretty(r).context("encoding the run record")?;
    crate::status_file::write_atomic(path, &json)
}

/// /proc's view of a pid, for [`classify`].
pub fn proc_view(pid: u32, uuid: &str) -> Option<ProcView> {
    let dir = ProcessDir::host(pid);
    let stat = dir.stat().ok()?;
    let argv = dir.cmdline().unwrap_or_default();
    let args = crate::identity::qemu::QemuArgs::parse(&argv);
    Some(ProcView {
        start_time: stat.start_time,
        zombie: stat.state == 'Z' || stat.state == 'X',
        is_this_vm: args.uuid.as_deref() == Some(uuid),
    })
}

/// A VM as found on disk and in /proc.
#[derive(Clone, Debug)]
pub struct Inspection {
    pub state: VmState,
    pub pid: Option<u32>,
    pub record: Option<RunRecord>,
    pub pidfile_present: bool,
}

/// Looks a VM up.
pub fn inspect(def: &VmDefinition, paths: &VmPaths) -> Inspection {
    let pidfile = read_pidfile(&paths.pidfile());
    let record = read_record(&paths.run_record());
    let (state, pid) = classify(pidfile, record.as_ref(), |p| proc_view(p, &def.uuid));
    Inspection {
        state,
        pid,
        record,
        pidfile_present: paths.pidfile().exists(),
    }
}

/// Seconds a process has run, from its start time in clock ticks since boot.
pub fn uptime_s(start_time: u64) -> Option<f64> {
    let up: f64 = fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| (up - start_time as f64 / hz as f64).max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(pid: u32, start: u64) -> RunRecord {
        RunRecord {
            pid,
            start_time: start,
            started_at: "2026-01-01T00:00:00Z".into(),
            accel: "tcg".into(),
            cgroup: Some("/overkvm/vm-a".into()),
            cgroup_root: Some("/sys/fs/cgroup/blkio".into()),
        }
    }

    fn live(start: u64, is_this_vm: bool) -> Option<ProcView> {
        Some(ProcView {
            start_time: start,
            zombie: false,
            is_this_vm,
        })
    }

    #[test]
    fn states() {
        use VmState::*;
        let r = rec(100, 5000);
        // Running: pidfile and record agree with /proc.
        assert_eq!(
            classify(Some(100), Some(&r), |_| live(5000, true)),
            (Running, Some(100))
        );
        // Killed: pidfile left behind, process gone.
        assert_eq!(classify(Some(100), Some(&r), |_| None), (Crashed, None));
        // Killed and the pid reused by another process (different start time).
        assert_eq!(
            classify(Some(100), Some(&r), |_| live(9999, false)),
            (Crashed, None)
        );
        // ... even one that looks like the VM: the start time decides.
        assert_eq!(
            classify(Some(100), Some(&r), |_| live(9999, true)),
            (Crashed, None)
        );
        // Exited but not yet reaped.
        let zombie = |_| {
            Some(ProcView {
                start_time: 5000,
                zombie: true,
                is_this_vm: true,
            })
        };
        assert_eq!(classify(Some(100), Some(&r), zombie), (Crashed, None));
        // Ended normally: qemu removed its pidfile.
        assert_eq!(classify(None, Some(&r), |_| None), (Stopped, None));
        assert_eq!(
            classify(None, Some(&r), |_| live(1, false)),
            (Stopped, None)
        );
        // Someone removed the pidfile of a live VM: the record still finds it.
        assert_eq!(
            classify(None, Some(&r), |_| live(5000, true)),
            (Running, Some(100))
        );
        // Never started.
        assert_eq!(classify(None, None, |_| live(1, true)), (Stopped, None));
        // No record (started by hand with our pidfile): the UUID decides.
        assert_eq!(
            classify(Some(7), None, |_| live(1, true)),
            (Running, Some(7))
        );
        assert_eq!(classify(Some(7), None, |_| live(1, false)), (Crashed, None));
        // A record of an older run, pidfile of a newer one.
        assert_eq!(
            classify(Some(7), Some(&r), |_| live(1, true)),
            (Running, Some(7))
        );
    }

    #[test]
    fn pidfiles_and_records() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let p = dir.join("qemu.pid");
        for (text, want) in [
            ("1234\n", Some(1234)),
            ("1234", Some(1234)),
            ("0\n", None),
            ("-1\n", None),
            ("x\n", None),
            ("", None),
        ] {
            fs::write(&p, text).unwrap();
            assert_eq!(read_pidfile(&p), want, "{text:?}");
        }
        assert_eq!(read_pidfile(&dir.join("absent")), None);
        let r = rec(42, 7);
        write_record(&dir.join("run.json"), &r).unwrap();
        assert_eq!(read_record(&dir.join("run.json")), Some(r));
        fs::write(dir.join("bad.json"), "{").unwrap();
        assert_eq!(read_record(&dir.join("bad.json")), None);
    }

    #[test]
    fn own_process_view() {
        let me = std::process::id();
        let v = proc_view(me, "0fa82997-3c4d-4e5f-8a9b-0c1d2e3f4a5b").unwrap();
        assert!(!v.zombie && !v.is_this_vm);
        assert!(uptime_s(v.start_time).is_some_and(|u| u >= 0.0));
    }
}
