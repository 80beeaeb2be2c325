//! Writing limits into cgroups: v2 `io.max` or v1 `blkio.throttle.*`. The only code that
//! writes limit files. It writes whole-disk numbers only, never 0 on v2 (ERANGE; `max` removes
//! a limit), reads back what it wrote, never follows a symlink, and refuses the root cgroup
//! (a limit there would hold back the whole host, or is not allowed at all on v2).

use std::{
    fs::{self, OpenOptions},
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Component, Path, PathBuf},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use super::{IoController, find_io_hierarchy, host_mounts};

/// Why a limit could not be written or removed: the one distinction callers act on.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    /// The cgroup or the disk is gone (a VM that stopped took its cgroup, a detached device):
    /// the limit went with it, nothing is degraded.
    #[error("{what} is gone: {source}")]
    Gone {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// Anything else: a problem to report.
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

impl LimitError {
    /// Sorts an error of a cgroup write: a missing file or directory (ENOENT) or a device the
    /// kernel no longer has (ENODEV) is `Gone`.
    fn sort(e: anyhow::Error, what: &str) -> LimitError {
        let gone = e.chain().find_map(|c| {
            c.downcast_ref::<std::io::Error>()
                .filter(|io| matches!(io.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENODEV)))
                .map(|io| std::io::Error::from_raw_os_error(io.raw_os_error().unwrap_or(0)))
        });
        match gone {
            Some(source) => LimitError::Gone {
                what: what.to_string(),
                source,
            },
            None => LimitError::Failed(e),
        }
    }
}

/// Limits of one cgroup on one disk; `None` is unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub riops: Option<u64>,
    pub wiops: Option<u64>,
    pub rbps: Option<u64>,
    pub wbps: Option<u64>,
}

impl Limits {
    pub fn is_unlimited(&self) -> bool {
        *self == Limits::default()
    }
}

/// Which interface, where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Actuator {
    pub api: IoController,
    /// Mount point of the block controller's hierarchy.
    pub root: PathBuf,
}

/// v1 file of each key, in `Limits` order.
const V1_FILES: [&str; 4] = [
    "blkio.throttle.read_iops_device",
    "blkio.throttle.write_iops_device",
    "blkio.throttle.read_bps_device",
    "blkio.throttle.write_bps_device",
];
const V2_KEYS: [&str; 4] = ["riops", "wiops", "rbps", "wbps"];

/// The four limits in the order of the v1 files and v2 keys.
pub fn fields(l: &Limits) -> [Option<u64>; 4] {
    [l.riops, l.wiops, l.rbps, l.wbps]
}

fn from_fields(f: [Option<u64>; 4]) -> Limits {
    Limits {
        riops: f[0],
        wiops: f[1],
        rbps: f[2],
        wbps: f[3],
    }
}

/// The v2 `io.max` line for a disk.
pub fn io_max_line(major: u32, minor: u32, l: &Limits) -> String {
    let mut s = format!("{major}:{minor}");
    for (k, v) in V2_KEYS.iter().zip(fields(l)) {
        match v {
            // The kernel refuses 0 (ERANGE); the policy never asks for it, but be certain.
            Some(v) => s.push_str(&format!(" {k}={}", v.max(1))),
            None => s.push_str(&format!(" {k}=max")),
        }
    }
    s
}

/// Parses the `io.max` entry of one disk; no line means unlimited.
pub fn parse_io_max(text: &str, major: u32, minor: u32) -> Limits {
    let want = format!("{major}:{minor}");
    let mut f = [None; 4];
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        if parts.next() != Some(want.as_str()) {
            continue;
        }
        for kv in parts {
            let Some((k, v)) = kv.split_once('=') else {
                continue;
            };
            if let Some(i) = V2_KEYS.iter().position(|x| *x == k) {
                f[i] = v.parse().ok();
            }
        }
    }
    from_fields(f)
}

/// Parses a v1 `blkio.throttle.*_device` file's value for one disk.
pub fn parse_v1(text: &str, major: u32, minor: u32) -> Option<u64> {
    let want = format!("{major}:{minor}");
    text.lines().find_map(|l| {
        let (dev, v) = l.trim().split_once(char::is_whitespace)?;
        (dev == want).then(|| v.trim().parse().ok()).flatten()
    })
}

/// Checks a cgroup path relative to the hierarchy: absolute, no `..`, not the root.
pub fn check_cgroup_path(cgroup: &str) -> anyhow::Result<&str> {
    let rel = cgroup.trim_start_matches('/');
    if rel.is_empty() {
        bail!("refusing to limit the root cgroup (it holds the whole host)");
    }
    if !cgroup.starts_with('/')
        || Path::new(rel)
            .components()
            .any(|c| !matches!(c, Component::Normal(_)))
    {
        bail!("invalid cgroup path {cgroup:?}");
    }
    Ok(rel)
}

/// Writes a whole small file without following symlinks and without creating it.
fn write_file(path: &Path, text: &str) -> std::io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    f.write_all(text.as_bytes())
}

/// What the throttle needs of the block controller: limits written (and read back), read and
/// cleared, a process moved into a cgroup of its own and back, that cgroup removed. The host's
/// is [`Actuator`]; unit tests drive the throttle's apply step with a fake.
pub trait LimitWriter: Send + Sync {
    /// v1 `blkio` or v2 `io`.
    fn api(&self) -> IoController;
    /// Mount point of the block controller's hierarchy.
    fn root(&self) -> &Path;
    fn read(&self, cgroup: &str, major: u32, minor: u32) -> anyhow::Result<Limits>;
    fn apply(&self, cgroup: &str, major: u32, minor: u32, l: &Limits) -> Result<(), LimitError>;
    fn clear(&self, cgroup: &str, major: u32, minor: u32) -> Result<(), LimitError> {
        self.apply(cgroup, major, minor, &Limits::default())
    }
    fn adopt(&self, name: &str, pid: u32) -> anyhow::Result<String>;
    fn move_process(&self, cgroup: &str, pid: u32) -> anyhow::Result<()>;
    fn remove_cgroup(&self, cgroup: &str) -> anyhow::Result<()>;
}

impl LimitWriter for Actuator {
    fn api(&self) -> IoController {
        self.api
    }

    fn root(&self) -> &Path {
        &self.root
    }

    fn read(&self, cgroup: &str, major: u32, minor: u32) -> anyhow::Result<Limits> {
        Actuator::read(self, cgroup, major, minor)
    }

    fn apply(&self, cgroup: &str, major: u32, minor: u32, l: &Limits) -> Result<(), LimitError> {
        Actuator::apply(self, cgroup, major, minor, l)
    }

    fn adopt(&self, name: &str, pid: u32) -> anyhow::Result<String> {
        Actuator::adopt(self, name, pid)
    }

    fn move_process(&self, cgroup: &str, pid: u32) -> anyhow::Result<()> {
        Actuator::move_process(self, cgroup, pid)
    }

    fn remove_cgroup(&self, cgroup: &str) -> anyhow::Result<()> {
        Actuator::remove_cgroup(self, cgroup)
    }
}

impl Actuator {
    /// The host's block controller, or an error saying why throttling cannot work here.
    pub fn for_host() -> anyhow::Result<Actuator> {
        let h = find_io_hierarchy(&host_mounts()).context(
            "no block cgroup controller (cgroup v2 `io` or v1 `blkio`) is mounted: throttling \
             cannot work on this host",
        )?;
        Ok(Actuator {
            api: h.controller,
            root: h.mount_point,
        })
    }

    fn dir(&self, cgroup: &str) -> anyhow::Result<PathBuf> {
        let rel = check_cgroup_path(cgroup)?;
        let dir = self.root.join(rel);
        let meta = fs::symlink_metadata(&dir)
            .with_context(|| format!("cgroup {cgroup} ({})", dir.display()))?;
        if !meta.is_dir() {
            bail!("cgroup {cgroup} is not a directory");
        }
        Ok(dir)
    }

    /// Current limits of a cgroup on a disk.
    pub fn read(&self, cgroup: &str, major: u32, minor: u32) -> anyhow::Result<Limits> {
        let dir = self.dir(cgroup)?;
        match self.api {
            IoController::V2 => {
                let text = fs::read_to_string(dir.join("io.max"))
                    .with_context(|| format!("reading {}/io.max", dir.display()))?;
                Ok(parse_io_max(&text, major, minor))
            }
            IoController::V1 => {
                let mut f = [None; 4];
                for (i, name) in V1_FILES.iter().enumerate() {
                    let text = fs::read_to_string(dir.join(name))
                        .with_context(|| format!("reading {}/{name}", dir.display()))?;
                    f[i] = parse_v1(&text, major, minor);
                }
                Ok(from_fields(f))
            }
        }
    }

    /// Sets the limits of a cgroup on a disk (whole disk numbers only), then reads them back.
    pub fn apply(
        &self,
        cgroup: &str,
        major: u32,
        minor: u32,
        l: &Limits,
    ) -> Result<(), LimitError> {
        self.write_limits(cgroup, major, minor, l)
            .map_err(|e| LimitError::sort(e, &format!("cgroup {cgroup} or disk {major}:{minor}")))
    }

    fn write_limits(&self, cgroup: &str, major: u32, minor: u32, l: &Limits) -> anyhow::Result<()> {
        let dir = self.dir(cgroup)?;
        match self.api {
            IoController::V2 => {
                let line = io_max_line(major, minor, l);
                write_file(&dir.join("io.max"), &line)
                    .with_context(|| format!("writing {line:?} to {}/io.max", dir.display()))?;
            }
            IoController::V1 => {
                for (name, v) in V1_FILES.iter().zip(fields(l)) {
                    // v1: 0 removes a limit.
                    let line = format!("{major}:{minor} {}", v.map_or(0, |v| v.max(1)));
                    write_file(&dir.join(name), &line)
                        .with_context(|| format!("writing {line:?} to {}/{name}", dir.display()))?;
                }
            }
        }
        let back = self.read(cgroup, major, minor)?;
        let want = Limits {
            riops: l.riops.map(|v| v.max(1)),
            wiops: l.wiops.map(|v| v.max(1)),
            rbps: l.rbps.map(|v| v.max(1)),
            wbps: l.wbps.map(|v| v.max(1)),
        };
        if back != want {
            bail!("{cgroup} on {major}:{minor}: wrote {want:?} but the kernel reports {back:?}");
        }
        Ok(())
    }

    /// Removes every limit of a cgroup on a disk.
    pub fn clear(&self, cgroup: &str, major: u32, minor: u32) -> Result<(), LimitError> {
        self.apply(cgroup, major, minor, &Limits::default())
    }

    /// Creates `/overkvm/<name>` (if missing) and moves a whole process (all threads) into it.
    /// Returns the new cgroup path.
    pub fn adopt(&self, name: &str, pid: u32) -> anyhow::Result<String> {
        let safe: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .take(64)
            .collect();
        if safe.is_empty() {
            bail!("VM name {name:?} gives an empty cgroup name");
        }
        let parent = self.root.join("overkvm");
        if !parent.exists() {
            fs::create_dir(&parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        if self.api == IoController::V2 {
            // Children of overkvm/ need io in its subtree_control to get io.max.
            let _ = write_file(&parent.join("cgroup.subtree_control"), "+io");
        }
        let dir = parent.join(&safe);
        if !dir.exists() {
            fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let cgroup = format!("/overkvm/{safe}");
        self.move_process(&cgroup, pid)?;
        Ok(cgroup)
    }

    /// Moves a whole process (every thread) into a cgroup of this hierarchy.
    pub fn move_process(&self, cgroup: &str, pid: u32) -> anyhow::Result<()> {
        let dir = if cgroup == "/" {
            self.root.clone()
        } else {
            self.dir(cgroup)?
        };
        write_file(&dir.join("cgroup.procs"), &pid.to_string())
            .with_context(|| format!("moving pid {pid} into {cgroup}"))
    }

    /// Removes a cgroup this service created (only if empty; the kernel refuses otherwise).
    pub fn remove_cgroup(&self, cgroup: &str) -> anyhow::Result<()> {
        let dir = self.dir(cgroup)?;
        fs::remove_dir(&dir).with_context(|| format!("removing {}", dir.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_max_lines() {
        let l = Limits {
            riops: Some(200),
            wiops: None,
            rbps: None,
            wbps: Some(0),
        };
        assert_eq!(
            io_max_line(7, 0, &l),
            "7:0 riops=200 wiops=max rbps=max wbps=1"
        );
        let text = "8:0 rbps=max wbps=max riops=100 wiops=max\n7:0 rbps=1000 wbps=max riops=max wiops=50\n";
        assert_eq!(
            parse_io_max(text, 7, 0),
            Limits {
                riops: None,
                wiops: Some(50),
                rbps: Some(1000),
                wbps: None
            }
        );
        assert!(parse_io_max(text, 9, 9).is_unlimited());
        assert!(parse_io_max("garbage\n7:0 riops\n7:0 x=1", 7, 0).is_unlimited());
    }

    #[test]
    fn v1_values() {
        assert_eq!(parse_v1("7:0 300\n8:0 5\n", 8, 0), Some(5));
        assert_eq!(parse_v1("7:0 300\n", 8, 0), None);
        assert_eq!(parse_v1("7:0 x\n", 7, 0), None);
    }

    #[test]
    fn symlinks_at_limit_files_or_cgroups_are_never_followed() {
        let root = std::env::temp_dir().join(format!("overkvm-act-link-{}", std::process::id()));
        let vm = root.join("vm");
        fs::create_dir_all(&vm).unwrap();
        let outside = root.join("outside.txt");
        fs::write(&outside, "precious").unwrap();
        for f in &V1_FILES[1..] {
            fs::write(vm.join(f), "").unwrap();
        }
        std::os::unix::fs::symlink(&outside, vm.join(V1_FILES[0])).unwrap();
        std::os::unix::fs::symlink(&vm, root.join("link")).unwrap();
        let act = Actuator {
            api: IoController::V1,
            root: root.clone(),
        };
        let l = Limits {
            riops: Some(100),
            ..Limits::default()
        };
        let e = anyhow::Error::from(act.apply("/vm", 7, 0, &l).unwrap_err());
        assert!(
            e.chain().any(|c| c
                .downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.raw_os_error() == Some(libc::ELOOP))),
            "{e:#}"
        );
        let e = act.apply("/link", 7, 0, &l).unwrap_err();
        assert!(format!("{e:#}").contains("not a directory"), "{e:#}");
        assert!(act.move_process("/link", 1).is_err());
        assert_eq!(fs::read_to_string(&outside).unwrap(), "precious");
        fs::remove_dir_all(&root).unwrap();
    }

    /// What callers act on: a cgroup that is gone (a stopped VM's) is `Gone`, anything else
    /// (here a refused path) `Failed`.
    #[test]
    fn a_missing_cgroup_is_gone_and_other_errors_are_failures() {
        let root = tempfile::tempdir().unwrap();
        let act = Actuator {
            api: IoController::V2,
            root: root.path().to_path_buf(),
        };
        let l = Limits {
            riops: Some(10),
            ..Limits::default()
        };
        match act.apply("/stopped-vm", 7, 0, &l) {
            Err(LimitError::Gone { source, .. }) => {
                assert_eq!(source.raw_os_error(), Some(libc::ENOENT))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            act.clear("/stopped-vm", 7, 0),
            Err(LimitError::Gone { .. })
        ));
        assert!(matches!(
            act.apply("/../etc", 7, 0, &l),
            Err(LimitError::Failed(_))
        ));
    }

    #[test]
    fn cgroup_paths_are_checked() {
        assert_eq!(check_cgroup_path("/a/b").unwrap(), "a/b");
        for bad in ["/", "", "a/b", "/a/../b", "/./a", "//"] {
            assert!(check_cgroup_path(bad).is_err(), "{bad:?}");
        }
    }
}
