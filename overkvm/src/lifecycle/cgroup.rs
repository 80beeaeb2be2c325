//! Each VM's own block cgroup, `/overkvm/vm-NAME`, in the hierarchy that has the block
//! controller (v2 `io`, else v1 `blkio`).
//!
//! qemu enters its cgroup between fork and exec (see [`join_before_exec`]), so even its first
//! I/O (opening and probing the overlay) is charged there and a limit on the cgroup holds the
//! whole VM, which is what lets the throttle act on one guest alone.

use std::{
    ffi::CString,
    fs,
    os::unix::{ffi::OsStrExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::Command,
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::host::cgroup::{
    IoController,
    counters::{DeviceOps, parse_v1_serviced, parse_v2_stat},
    limits::Actuator,
};

/// Parent of every VM cgroup (shared with the throttle's `manage_cgroups`, which also creates
/// its groups under it; so it is never removed here).
pub const PARENT: &str = "overkvm";

/// The cgroup path of a VM, relative to the hierarchy's root.
pub fn path_of(name: &str) -> String {
    format!("/{PARENT}/vm-{name}")
}

/// A VM's cgroup in the block controller's hierarchy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmCgroup {
    pub api: IoController,
    /// Mount point of the hierarchy.
    pub root: PathBuf,
    /// `/overkvm/vm-NAME`.
    pub path: String,
}

impl VmCgroup {
    /// The cgroup VM `name` gets on this host; an error says why there is none.
    pub fn for_vm(name: &str) -> anyhow::Result<VmCgroup> {
        let act = Actuator::for_host()?;
        Ok(VmCgroup {
            api: act.api,
            root: act.root,
            path: path_of(name),
        })
    }

    /// The cgroup's directory.
    pub fn dir(&self) -> PathBuf {
        self.root.join(self.path.trim_start_matches('/'))
    }

    pub fn exists(&self) -> bool {
        self.dir().is_dir()
    }

    /// Creates the cgroup (and `/overkvm`). On v2, `io` must be enabled in `/overkvm`'s
    /// `cgroup.subtree_control` for the VM cgroup to have `io.max`; the root's own
    /// subtree_control is the host's business and is never changed here.
    pub fn create(&self) -> anyhow::Result<()> {
        let parent = self.root.join(PARENT);
        match fs::create_dir(&parent) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "creating cgroup {} (creating cgroups needs root; `vm start --no-cgroup` \
                         runs the VM without one)",
                        parent.display()
                    )
                });
            }
        }
        if self.api == IoController::V2
            && let Err(e) = fs::write(parent.join("cgroup.subtree_control"), "+io")
        {
            log::warn!(
                "cannot enable io in {}/cgroup.subtree_control ({e}): VM cgroups there get no \
                 io.max (is io enabled in the root's cgroup.subtree_control?)",
                parent.display()
            );
        }
        let dir = self.dir();
        match fs::create_dir(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let pids = self.pids();
                if pids.is_empty() {
                    Ok(())
                } else {
                    bail!(
                        "cgroup {} already holds processes {pids:?}: is the VM running under \
                         another state directory?",
                        dir.display()
                    )
                }
            }
            Err(e) => Err(e).with_context(|| format!("creating cgroup {}", dir.display())),
        }
    }

    /// Processes in the cgroup.
    pub fn pids(&self) -> Vec<u32> {
        fs::read_to_string(self.dir().join("cgroup.procs"))
            .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Removes the cgroup, waiting up to `wait` for the kernel to let go of exiting
    /// processes (rmdir fails with EBUSY until the last one is gone). Ok(false) if it was not
    /// there.
    pub fn remove(&self, wait: Duration) -> anyhow::Result<bool> {
        let dir = self.dir();
        let deadline = Instant::now() + wait;
        loop {
            match fs::remove_dir(&dir) {
                Ok(()) => return Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
                Err(e) if Instant::now() < deadline => {
                    log::debug!("rmdir {}: {e}; retrying", dir.display());
                    sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!(
                            "removing cgroup {} (processes still in it: {:?})",
                            dir.display(),
                            self.pids()
                        )
                    });
                }
            }
        }
    }

    /// Cumulative I/O operations per disk the kernel charged to this cgroup (bios: v1
    /// `blkio.throttle.io_serviced`, v2 `io.stat` `rios`/`wios`). Readable without root.
    pub fn io_ops(&self) -> anyhow::Result<DeviceOps> {
        let (file, parse): (&str, fn(&str) -> DeviceOps) = match self.api {
            IoController::V1 => ("blkio.throttle.io_serviced", parse_v1_serviced),
            IoController::V2 => ("io.stat", parse_v2_stat),
        };
        let path = self.dir().join(file);
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(parse(&text))
    }
}

/// Makes the child of `cmd` move itself into the cgroup whose `cgroup.procs` is `procs`
/// after fork and before exec, so the program's very first I/O is charged to it. If the move
/// fails, spawning fails with that error and nothing runs.
pub fn join_before_exec(cmd: &mut Command, procs: &Path) -> anyhow::Result<()> {
    let path = CString::new(procs.as_os_str().as_bytes())
        .with_context(|| format!("{} contains a NUL byte", procs.display()))?;
    // SAFETY: between fork and exec only async-signal-safe calls are allowed: open, write and
    // close are, and the closure allocates nothing (the path was built before the fork).
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // "0" moves the writing process itself.
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if n != 1 {
                return Err(err);
            }
            Ok(())
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(path_of("web01"), "/overkvm/vm-web01");
        let cg = VmCgroup {
            api: IoController::V1,
            root: "/sys/fs/cgroup/blkio".into(),
            path: path_of("a"),
        };
        assert_eq!(cg.dir(), Path::new("/sys/fs/cgroup/blkio/overkvm/vm-a"));
        // Our path is one the throttle's actuator accepts.
        crate::host::cgroup::limits::check_cgroup_path(&cg.path).unwrap();
    }
}
