//! A Debian bookworm root file system with systemd, for guests that boot a real system
//! ([`crate::guest::GuestSpec::switch_root`]).
//!
//! Built once with `mmdebstrap` from Debian's registry (the only network the tests reach) into
//! an ext4 image (`mke2fs -d`), cached next to the guest kernel under a name that hashes the
//! recipe below: change the recipe and the next run builds a new image. Each boot gets its own
//! qcow2 overlay ([`overlay`]), so the cached image is never written.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, anyhow, bail};

use crate::guest::{FileLock, Fnv, RemoveOnDrop, cache_dir, find_in_path, run, unique};

/// Bump when the way the image is made changes in a way the recipe below does not show.
const FORMAT: &str = "overkvm-debian-root-v1";
const SUITE: &str = "bookworm";
/// The same archive the host's apt uses (see NOTES.md: only the package registries are
/// reachable), with updates and security so the image's libc is the one packages built here
/// link against.
const SOURCES: &[&str] = &[
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
];
/// On top of `--variant=apt` (Essential: yes, and apt): systemd as init, udev for /dev/vd*
/// device units, curl to read /metrics.
const PACKAGES: &[&str] = &["systemd-sysv", "udev", "curl"];
/// mmdebstrap's `--customize-hook` (the root is `$1`): a host name, and no unit that would
/// write on the serial console or wake up during a test (a login prompt on ttyS0, apt's
/// daily timers).
const CUSTOMIZE: &str = r#"echo overkvm-guest > "$1/etc/hostname"
for u in serial-getty@ttyS0.service getty@tty1.service apt-daily.timer apt-daily-upgrade.timer; do
    ln -sf /dev/null "$1/etc/systemd/system/$u"
done"#;
/// Size of the (sparse) image; the system takes ~300 MB, the rest is room for a test.
const IMAGE_MIB: u64 = 2048;

/// mmdebstrap could not reach Debian's registry: a test skips (printing this) rather than fails.
#[derive(Debug)]
pub struct RegistryUnreachable(pub String);

impl fmt::Display for RegistryUnreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "mmdebstrap cannot reach Debian's registry: {}", self.0)
    }
}

impl std::error::Error for RegistryUnreachable {}

/// Why a Debian root cannot be built here (a test should skip with this reason), or None.
pub fn missing_tools() -> Option<String> {
    let mut missing = Vec::new();
    if find_in_path("mmdebstrap").is_none() {
        missing.push("mmdebstrap (apt-get install mmdebstrap)");
    }
    if find_in_path("mke2fs").is_none() {
        missing.push("mke2fs (apt-get install e2fsprogs)");
    }
    if find_in_path("qemu-img").is_none() {
        missing.push("qemu-img (apt-get install qemu-utils)");
    }
    (!missing.is_empty()).then(|| format!("missing {}", missing.join(", ")))
}

/// The cached ext4 image of a Debian bookworm system with systemd, built first if missing
/// (about two minutes; one line on stderr says so). Fails with [`RegistryUnreachable`] when
/// mmdebstrap cannot download.
pub fn debian_root() -> Result<PathBuf> {
    let mut hash = Fnv::new();
    for part in [
        FORMAT,
        SUITE,
        &SOURCES.join("\n"),
        &PACKAGES.join(","),
        CUSTOMIZE,
    ] {
        hash.write(part.as_bytes());
    }
    hash.write(&IMAGE_MIB.to_le_bytes());
    let dir = cache_dir().join("rootfs");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let image = dir.join(format!("debian-{SUITE}-systemd-{:016x}.img", hash.finish()));
    if image.is_file() {
        return Ok(image);
    }
    let _lock = FileLock::exclusive(&dir.join(".lock"))?;
    if image.is_file() {
        return Ok(image);
    }
    let tmp = dir.join(format!(".tmp-{}-{}", std::process::id(), unique()));
    let _cleanup = RemoveOnDrop(tmp.clone());
    let tree = tmp.join("root");
    fs::create_dir_all(&tmp)?;
    eprintln!(
        "guest: building a Debian {SUITE} root with systemd (mmdebstrap, one time) into {}",
        image.display()
    );
    let out = Command::new("mmdebstrap")
        .args(["--variant=apt", "--quiet"])
        .arg(format!("--include={}", PACKAGES.join(",")))
        .arg(format!("--customize-hook={CUSTOMIZE}"))
        .arg(SUITE)
        .arg(&tree)
        .args(SOURCES)
        .stdin(Stdio::null())
        .output()
        .context("running mmdebstrap")?;
    if !out.status.success() {
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        let tail = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
        if unreachable(&text) {
            return Err(RegistryUnreachable(tail).into());
        }
        bail!("mmdebstrap failed ({}):\n{tail}", out.status);
    }
    let partial = tmp.join("root.img");
    run(Command::new("mke2fs")
        .args(["-q", "-t", "ext4", "-L", "overkvm-root", "-d"])
        .arg(&tree)
        .arg(&partial)
        .arg(format!("{IMAGE_MIB}M")))
    .context("making the root's ext4 image")?;
    fs::rename(&partial, &image).with_context(|| format!("renaming to {}", image.display()))?;
    Ok(image)
}

/// Words apt and mmdebstrap use when the network, not the recipe, failed.
fn unreachable(text: &str) -> bool {
    [
        "Temporary failure resolving",
        "Could not resolve",
        "Could not connect",
        "Failed to fetch",
        "Connection failed",
        "Connection timed out",
        "Network is unreachable",
        "No route to host",
    ]
    .iter()
    .any(|w| text.contains(w))
}

/// A qcow2 file at `path` whose reads come from `base` (raw) and whose writes stay in it.
pub fn overlay(base: &Path, path: &Path) -> Result<()> {
    let base = fs::canonicalize(base).with_context(|| format!("{}", base.display()))?;
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&base)
        .arg(path))
    .map(drop)
    .map_err(|e| anyhow!("qemu-img create an overlay of {}: {e:#}", base.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_failures_are_told_from_recipe_failures() {
        assert!(unreachable(
            "E: Failed to fetch http://deb.debian.org/debian/dists/bookworm/InRelease  \
             Temporary failure resolving 'deb.debian.org'"
        ));
        assert!(!unreachable("E: Unable to locate package systemd-sysvv"));
    }
}
