//! Test block devices that remove themselves: loop devices over /dev/shm files, zram devices,
//! and a mounted filesystem on a loop device.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A loop device over a sparse file in /dev/shm (so the backing I/O never reaches a disk).
pub struct LoopDevice {
    pub path: PathBuf,
    backing: PathBuf,
}

impl LoopDevice {
    pub fn new(size_mb: u64) -> anyhow::Result<LoopDevice> {
        let backing = PathBuf::from(format!(
            "/dev/shm/overkvm-test-{}-{}.img",
            std::process::id(),
            unique()
        ));
        let f = fs::File::create(&backing).context("creating loop backing file")?;
        f.set_len(size_mb << 20)?;
        drop(f);
        let path = match run(Command::new("losetup").args(["-f", "--show"]).arg(&backing)) {
            Ok(p) => PathBuf::from(p),
            Err(e) => {
                let _ = fs::remove_file(&backing);
                return Err(e);
            }
        };
        Ok(LoopDevice { path, backing })
    }

    /// "loopN"
    pub fn name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Kernel dev_t of the device.
    pub fn dev(&self) -> u32 {
        dev_of(&self.path)
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
        let _ = fs::remove_file(&self.backing);
    }
}

/// A zram device of our own (never zram0, which belongs to the machine).
pub struct Zram {
    pub index: u32,
    pub path: PathBuf,
}

impl Zram {
    pub fn new(size_mb: u64) -> anyhow::Result<Zram> {
        let idx = fs::read_to_string("/sys/class/zram-control/hot_add")
            .context("zram hot_add (no zram support?)")?;
        let index: u32 = idx.trim().parse().context("parsing zram index")?;
        let z = Zram {
            index,
            path: PathBuf::from(format!("/dev/zram{index}")),
        };
        fs::write(
            format!("/sys/block/zram{index}/disksize"),
            format!("{size_mb}M"),
        )
        .context("setting zram disksize")?;
        // udev may take a moment to create the node.
        for _ in 0..100 {
            if z.path.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Ok(z)
    }

    pub fn dev(&self) -> u32 {
        dev_of(&self.path)
    }
}

impl Drop for Zram {
    fn drop(&mut self) {
        let _ = fs::write(format!("/sys/block/zram{}/reset", self.index), "1");
        let _ = fs::write("/sys/class/zram-control/hot_remove", self.index.to_string());
    }
}

/// A filesystem made on a loop device and mounted on a temporary directory.
pub struct MountedFs {
    pub dir: PathBuf,
    pub dev: LoopDevice,
}

impl MountedFs {
    /// `mkfs_args` e.g. ["-t", "ext4", "-O", "^has_journal"].
    pub fn new(size_mb: u64, fs_type: &str, extra: &[&str]) -> anyhow::Result<MountedFs> {
        let dev = LoopDevice::new(size_mb)?;
        // Overwrite whatever a reused loop device held: -F for the ext family, -f for xfs.
        let force = if fs_type == "xfs" { "-f" } else { "-F" };
        run(Command::new(format!("mkfs.{fs_type}"))
            .args(["-q", force])
            .args(extra)
            .arg(&dev.path))?;
        let dir =
            std::env::temp_dir().join(format!("overkvm-mnt-{}-{}", std::process::id(), unique()));
        fs::create_dir_all(&dir)?;
        if let Err(e) = run(Command::new("mount").arg(&dev.path).arg(&dir)) {
            let _ = fs::remove_dir(&dir);
            return Err(e);
        }
        Ok(MountedFs { dir, dev })
    }
}

impl Drop for MountedFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
        let _ = fs::remove_dir(&self.dir);
    }
}

/// Kernel dev_t (major << 20 | minor) of a block device node.
pub fn dev_of(path: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    let rdev = fs::metadata(path).map(|m| m.rdev()).unwrap_or(0);
    overkvm_common::make_dev(libc::major(rdev), libc::minor(rdev))
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}
