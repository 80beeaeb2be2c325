//! Block devices by number: names, whole disks and request- vs bio-based, from sysfs.

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::{FileTypeExt, MetadataExt},
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context as _, bail};
use overkvm_common::{dev_major, dev_minor, make_dev};

/// One block device (or partition) as the kernel numbers it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DeviceInfo {
    /// Kernel `dev_t` (major << 20 | minor).
    #[serde(skip)]
    pub dev: u32,
    pub name: String,
    pub major: u32,
    pub minor: u32,
    /// The whole disk this is (itself, or a partition's parent): what `io.max` takes.
    pub disk: String,
    #[serde(skip)]
    pub disk_dev: u32,
    /// blk-mq devices have requests; bio-based ones (zram, md, dm) only have bios.
    pub request_based: bool,
    /// False when sysfs no longer knows the number (a detached loop device).
    pub present: bool,
}

impl DeviceInfo {
    /// A number sysfs does not know: named "MAJ:MIN", its own disk, counted by requests.
    pub fn unknown(dev: u32) -> DeviceInfo {
        let (major, minor) = (dev_major(dev), dev_minor(dev));
        DeviceInfo {
            dev,
            name: format!("{major}:{minor}"),
            major,
            minor,
            disk: format!("{major}:{minor}"),
            disk_dev: dev,
            request_based: true,
            present: false,
        }
    }
}

/// Parses "MAJ:MIN" into a kernel `dev_t`.
pub fn parse_maj_min(s: &str) -> Option<u32> {
    let (ma, mi) = s.trim().split_once(':')?;
    let ma: u32 = ma.parse().ok()?;
    let mi: u32 = mi.parse().ok()?;
    (ma < 4096 && mi < (1 << 20)).then(|| make_dev(ma, mi))
}

/// Cached lookups under a sysfs root.
pub struct DeviceTable {
    sys: PathBuf,
    cache: HashMap<u32, Arc<DeviceInfo>>,
}

impl Default for DeviceTable {
    fn default() -> Self {
        DeviceTable::new()
    }
}

impl DeviceTable {
    pub fn new() -> DeviceTable {
        DeviceTable::with_sysfs("/sys")
    }

    pub fn with_sysfs(sys: impl Into<PathBuf>) -> DeviceTable {
        DeviceTable {
            sys: sys.into(),
            cache: HashMap::new(),
        }
    }

    /// The device with this number; a number sysfs does not know gets "MAJ:MIN" as its name.
    pub fn get(&mut self, dev: u32) -> Arc<DeviceInfo> {
        if let Some(d) = self.cache.get(&dev) {
            return d.clone();
        }
        let info = Arc::new(self.read(dev));
        // Only cache what exists: a loop device number can come back as another device.
        if info.present {
            self.cache.insert(dev, info.clone());
        }
        info
    }

    fn read(&self, dev: u32) -> DeviceInfo {
        let (major, minor) = (dev_major(dev), dev_minor(dev));
        let link = self.sys.join(format!("dev/block/{major}:{minor}"));
        let Ok(path) = fs::canonicalize(&link) else {
            return DeviceInfo::unknown(dev);
        };
        let name = file_name(&path);
        let (disk_path, disk_dev) = if path.join("partition").exists() {
            let parent = path.parent().map(Path::to_path_buf).unwrap_or(path.clone());
            let dd = fs::read_to_string(parent.join("dev"))
                .ok()
                .and_then(|s| parse_maj_min(&s))
                .unwrap_or(dev);
            (parent, dd)
        } else {
            (path.clone(), dev)
        };
        DeviceInfo {
            dev,
            name,
            major,
            minor,
            disk: file_name(&disk_path),
            disk_dev,
            request_based: disk_path.join("mq").is_dir(),
            present: true,
        }
    }

    /// Resolves a whole disk (a budget's or admission control's device), refusing partitions
    /// with the disk to use instead: limits and budgets apply to whole disks.
    pub fn resolve_disk(&mut self, spec: &str) -> anyhow::Result<Arc<DeviceInfo>> {
        let info = self.resolve(spec)?;
        if info.dev != info.disk_dev {
            anyhow::bail!(
                "{spec} ({}) is a partition of {}: budgets and limits apply to whole disks (use \"{}\")",
                info.name,
                info.disk,
                info.disk
            );
        }
        Ok(info)
    }

    /// Resolves what an operator writes: a name ("loop0"), a path ("/dev/loop0") or "MAJ:MIN".
    pub fn resolve(&mut self, spec: &str) -> anyhow::Result<Arc<DeviceInfo>> {
        let spec = spec.trim();
        let dev = if let Some(dev) = parse_maj_min(spec) {
            dev
        } else if spec.starts_with('/') {
            let meta = fs::metadata(spec).with_context(|| format!("device {spec}"))?;
            if !meta.file_type().is_block_device() {
                bail!("{spec} is not a block device");
            }
            let rdev = meta.rdev();
            make_dev(libc::major(rdev), libc::minor(rdev))
        } else {
            if spec.is_empty() || spec.contains('/') || spec.starts_with('.') {
                bail!("invalid device name {spec:?}");
            }
            let text = fs::read_to_string(self.sys.join("class/block").join(spec).join("dev"))
                .with_context(|| format!("no block device named {spec:?}"))?;
            parse_maj_min(&text).with_context(|| format!("unreadable device number for {spec}"))?
        };
        let info = self.get(dev);
        if !info.present {
            bail!(
                "no block device {spec} ({}:{}) on this host",
                info.major,
                info.minor
            );
        }
        Ok(info)
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Whole disks under `sys`/class/block that are bio-based (no blk-mq `mq` directory: zram, md,
/// dm, brd) and have a size, i.e. can carry I/O now. Only their bios show I/O the request hooks
/// cannot see, so the bio hook is attached once one of them exists.
pub fn bio_based_disks(sys: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(sys.join("class/block")) else {
        return Vec::new();
    };
    let mut out: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            let dir = e.path();
            let whole_disk = !dir.join("partition").exists();
            let bio_based = !dir.join("mq").is_dir();
            let sectors: u64 = fs::read_to_string(dir.join("size"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0);
            (whole_disk && bio_based && sectors > 0)
                .then(|| e.file_name().to_string_lossy().into_owned())
        })
        .collect();
    out.sort();
    out
}

/// A sysfs tree for tests: virtio disk `vda` (254:0, blk-mq) with partition `vda1` (254:1), and
/// a bio-based `zram1` (251:1). Returns its root, a new directory under the temp dir; the
/// caller removes it.
#[cfg(test)]
pub(crate) fn fake_sysfs(tag: &str) -> PathBuf {
    let root = tempfile::Builder::new()
        .prefix(&format!("overkvm-{tag}-"))
        .tempdir()
        .expect("fake sysfs")
        .keep();
    let vda = root.join("devices/virtual/block/vda");
    let zram = root.join("devices/virtual/block/zram1");
    for d in [vda.join("mq"), vda.join("vda1"), zram.clone()] {
        fs::create_dir_all(d).expect("fake sysfs");
    }
    fs::create_dir_all(root.join("dev/block")).expect("fake sysfs");
    fs::create_dir_all(root.join("class/block")).expect("fake sysfs");
    fs::write(vda.join("dev"), "254:0\n").expect("fake sysfs");
    fs::write(vda.join("vda1/partition"), "1\n").expect("fake sysfs");
    fs::write(vda.join("vda1/dev"), "254:1\n").expect("fake sysfs");
    fs::write(vda.join("size"), "2097152\n").expect("fake sysfs");
    fs::write(zram.join("size"), "0\n").expect("fake sysfs");
    for (target, link) in [
        (vda.clone(), "dev/block/254:0"),
        (vda.join("vda1"), "dev/block/254:1"),
        (zram.clone(), "dev/block/251:1"),
        (vda.clone(), "class/block/vda"),
        (vda.join("vda1"), "class/block/vda1"),
        (zram.clone(), "class/block/zram1"),
    ] {
        std::os::unix::fs::symlink(target, root.join(link)).expect("fake sysfs");
    }
    root
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_and_unknown_devices_are_refused_with_a_reason() {
        let root = fake_sysfs("thr-sys");
        let mut t = DeviceTable::with_sysfs(&root);
        assert_eq!(t.resolve_disk("vda").unwrap().name, "vda");
        let e = format!("{:#}", t.resolve_disk("vda1").unwrap_err());
        assert!(
            e.contains("partition of vda") && e.contains("whole disks"),
            "{e}"
        );
        let e = format!("{:#}", t.resolve_disk("254:1").unwrap_err());
        assert!(e.contains("partition"), "{e}");
        let e = format!("{:#}", t.resolve_disk("nvme9n9").unwrap_err());
        assert!(e.contains("no block device named"), "{e}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn maj_min_parsing_rejects_garbage() {
        assert_eq!(parse_maj_min("7:0"), Some(7 << 20));
        assert_eq!(parse_maj_min(" 259:3\n"), Some(make_dev(259, 3)));
        for bad in [
            "",
            "7",
            "7:",
            ":1",
            "a:b",
            "7:0:1",
            "99999:0",
            "7:99999999",
            "-1:0",
        ] {
            assert_eq!(parse_maj_min(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn fake_sysfs_disk_partition_and_bio_device() {
        let root = fake_sysfs("devtest");
        let mut t = DeviceTable::with_sysfs(&root);
        let d = t.get(make_dev(254, 0));
        assert_eq!(
            (d.name.as_str(), d.disk.as_str(), d.request_based),
            ("vda", "vda", true)
        );
        let p = t.get(make_dev(254, 1));
        assert_eq!((p.name.as_str(), p.disk.as_str()), ("vda1", "vda"));
        assert_eq!(p.disk_dev, make_dev(254, 0));
        assert!(p.request_based);
        let z = t.get(make_dev(251, 1));
        assert!(!z.request_based);
        let gone = t.get(make_dev(7, 42));
        assert!(!gone.present);
        assert_eq!(gone.name, "7:42");
        assert_eq!(t.resolve("vda").unwrap().dev, make_dev(254, 0));
        assert_eq!(t.resolve("254:1").unwrap().name, "vda1");
        assert!(t.resolve("nosuch").is_err());
        assert!(t.resolve("../etc").is_err());
        assert!(t.resolve("7:42").is_err());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn bio_based_disks_are_the_sized_ones_without_mq() {
        let root = fake_sysfs("biodisks");
        assert!(bio_based_disks(&root).is_empty(), "zram1 has no size yet");
        let zram = root.join("devices/virtual/block/zram1");
        fs::write(zram.join("size"), "131072\n").unwrap();
        assert_eq!(bio_based_disks(&root), ["zram1"]);
        assert!(bio_based_disks(&root.join("nosuch")).is_empty());
        fs::remove_dir_all(&root).unwrap();
    }
}
