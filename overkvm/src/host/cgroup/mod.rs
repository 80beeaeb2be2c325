//! cgroups as overkvm uses them, v1 `blkio` and v2 `io` alike: where the block controller
//! lives and cgroup ids to paths (here), the limit files (`limits`), the I/O counters
//! (`counters`).
//!
//! The kernel programs record the kernfs id of the cgroup that owns each I/O; in cgroupfs that
//! id is the directory's inode number, so a walk of the hierarchy maps ids back to paths.

pub mod counters;
pub mod limits;

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// Which cgroup interface controls block I/O on this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IoController {
    /// cgroup v2 with the `io` controller available (`io.max`).
    V2,
    /// cgroup v1 `blkio` (`blkio.throttle.*`).
    V1,
}

/// One cgroup mount from mountinfo.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CgroupMount {
    pub mount_point: PathBuf,
    /// "cgroup2" or "cgroup".
    pub fs_type: String,
    /// Controllers named in the super options (v1), e.g. ["blkio"].
    pub controllers: Vec<String>,
}

/// Parses /proc/self/mountinfo for cgroup mounts. Malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    let mut out = Vec::new();
    for line in text.lines() {
        // "36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices"
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = left.split(' ').collect();
        let rfields: Vec<&str> = right.split(' ').collect();
        if fields.len() < 5 || rfields.len() < 3 {
            continue;
        }
        let fs_type = rfields[0];
        if fs_type != "cgroup" && fs_type != "cgroup2" {
            continue;
        }
        let controllers = if fs_type == "cgroup" {
            rfields[2]
                .split(',')
                .filter(|o| !matches!(*o, "rw" | "ro") && !o.contains('='))
                .map(str::to_string)
                .collect()
        } else {
            Vec::new()
        };
        out.push(CgroupMount {
            mount_point: PathBuf::from(unescape_mount(fields[4])),
            fs_type: fs_type.to_string(),
            controllers,
        });
    }
    out
}

/// mountinfo escapes space, tab, newline and backslash as octal (\040 ...).
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = oct.iter().fold(0u32, |a, c| a * 8 + u32::from(c - b'0'));
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The block controller's hierarchy on this host.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct IoHierarchy {
    pub controller: IoController,
    pub mount_point: PathBuf,
}

/// Finds the hierarchy the block controller is bound to: a v1 `blkio` mount wins (the
/// controller can only be in one place), else a cgroup2 mount whose root lists `io` in
/// cgroup.controllers.
pub fn find_io_hierarchy(mounts: &[CgroupMount]) -> Option<IoHierarchy> {
    if let Some(m) = mounts
        .iter()
        .find(|m| m.fs_type == "cgroup" && m.controllers.iter().any(|c| c == "blkio"))
    {
        return Some(IoHierarchy {
            controller: IoController::V1,
            mount_point: m.mount_point.clone(),
        });
    }
    mounts
        .iter()
        .filter(|m| m.fs_type == "cgroup2")
        .find(|m| {
            fs::read_to_string(m.mount_point.join("cgroup.controllers"))
                .map(|c| c.split_whitespace().any(|w| w == "io"))
                .unwrap_or(false)
        })
        .map(|m| IoHierarchy {
            controller: IoController::V2,
            mount_point: m.mount_point.clone(),
        })
}

/// The host's cgroup mounts, read from /proc/self/mountinfo.
pub fn host_mounts() -> Vec<CgroupMount> {
    fs::read_to_string("/proc/self/mountinfo")
        .map(|t| parse_mountinfo(&t))
        .unwrap_or_default()
}

/// Maps cgroup ids to paths relative to the hierarchy root ("/" for the root).
pub struct CgroupNames {
    root: Option<PathBuf>,
    by_id: HashMap<u64, String>,
    last_scan: Option<Instant>,
}

/// Bound on directories walked per scan, so a pathological hierarchy cannot stall a tick.
const MAX_SCAN_DIRS: usize = 100_000;

impl CgroupNames {
    pub fn new(root: Option<PathBuf>) -> CgroupNames {
        CgroupNames {
            root,
            by_id: HashMap::new(),
            last_scan: None,
        }
    }

    /// For the host's block controller hierarchy.
    pub fn for_host() -> CgroupNames {
        CgroupNames::new(find_io_hierarchy(&host_mounts()).map(|h| h.mount_point))
    }

    /// Path of a cgroup id; rescans (at most once a second) when the id is unknown.
    pub fn path(&mut self, id: u64) -> Option<String> {
        if id == 0 {
            return None;
        }
        if let Some(p) = self.by_id.get(&id) {
            return Some(p.clone());
        }
        let stale = self
            .last_scan
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
        if stale {
            self.scan();
        }
        self.by_id.get(&id).cloned()
    }

    fn scan(&mut self) {
        self.last_scan = Some(Instant::now());
        let Some(root) = self.root.clone() else {
            return;
        };
        self.by_id.clear();
        let mut stack = vec![root.clone()];
        let mut seen = 0;
        while let Some(dir) = stack.pop() {
            seen += 1;
            if seen > MAX_SCAN_DIRS {
                log::warn!(
                    "cgroup hierarchy {} has more than {MAX_SCAN_DIRS} directories; stopped scanning",
                    root.display()
                );
                break;
            }
            let Ok(meta) = fs::symlink_metadata(&dir) else {
                continue;
            };
            let rel = relative(&root, &dir);
            self.by_id.insert(meta.ino(), rel);
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
    }
}

fn relative(root: &Path, dir: &Path) -> String {
    match dir.strip_prefix(root) {
        Ok(r) if r.as_os_str().is_empty() => "/".to_string(),
        Ok(r) => format!("/{}", r.to_string_lossy()),
        Err(_) => dir.to_string_lossy().into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
garbage line without separator
1 2 3 - cgroup
";

    #[test]
    fn hybrid_host_binds_blkio_to_v1() {
        let mounts = parse_mountinfo(HYBRID);
        assert_eq!(mounts.len(), 4);
        assert_eq!(mounts[1].controllers, vec!["blkio".to_string()]);
        assert_eq!(mounts[2].controllers, vec!["xattr".to_string()]);
        let h = find_io_hierarchy(&mounts).unwrap();
        assert_eq!(h.controller, IoController::V1);
        assert_eq!(h.mount_point, PathBuf::from("/sys/fs/cgroup/blkio"));
    }

    #[test]
    fn mount_points_are_unescaped() {
        let m = parse_mountinfo("1 2 0:1 / /mnt/a\\040b rw - cgroup2 cgroup2 rw\n");
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/a b"));
        assert_eq!(unescape_mount("x\\"), "x\\");
        assert_eq!(unescape_mount("\\12"), "\\12");
        assert_eq!(unescape_mount("\\999"), "\\999");
    }

    #[test]
    fn ids_map_to_relative_paths() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        fs::create_dir_all(root.join("machine.slice/vm1")).unwrap();
        let ino = fs::metadata(root.join("machine.slice/vm1")).unwrap().ino();
        let root_ino = fs::metadata(&root).unwrap().ino();
        let mut names = CgroupNames::new(Some(root.clone()));
        assert_eq!(names.path(ino).as_deref(), Some("/machine.slice/vm1"));
        assert_eq!(names.path(root_ino).as_deref(), Some("/"));
        assert_eq!(names.path(0), None);
    }
}
