//! `qemu-img`: overlay creation and image facts (format, virtual and allocated size).

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

/// The `qemu-img` binary.
pub const QEMU_IMG: &str = "qemu-img";

/// What `qemu-img info --output=json` says about one image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    pub filename: String,
    pub format: String,
    /// Size the guest sees, in bytes.
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    /// Bytes allocated on the host filesystem (absent for some protocols).
    #[serde(rename = "actual-size", default)]
    pub actual_size: Option<u64>,
    #[serde(rename = "backing-filename", default)]
    pub backing_filename: Option<String>,
}

/// Parses the output of `qemu-img info --output=json` (one image).
pub fn parse_info(json: &str) -> anyhow::Result<ImageInfo> {
    serde_json::from_str(json).context("reading qemu-img info JSON")
}

/// Parses the output of `qemu-img info --output=json --backing-chain` (top image first).
pub fn parse_chain(json: &str) -> anyhow::Result<Vec<ImageInfo>> {
    let chain: Vec<ImageInfo> =
        serde_json::from_str(json).context("reading qemu-img info --backing-chain JSON")?;
    if chain.is_empty() {
        bail!("qemu-img info returned an empty backing chain");
    }
    Ok(chain)
}

/// Finds a program in `$PATH`, or says which package brings it.
pub fn find_tool(name: &str, package: &str) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .with_context(|| {
            format!("{name} is not installed (not found in $PATH): install {package}, e.g. `apt-get install {package}`")
        })
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            cmd.get_program().to_string_lossy(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).context("qemu-img printed invalid UTF-8")
}

/// Facts about an image. `-U` (force-share) lets it read images a running qemu holds locked.
pub fn info(image: &Path) -> anyhow::Result<ImageInfo> {
    let tool = find_tool(QEMU_IMG, "qemu-utils")?;
    let json = run(Command::new(tool)
        .args(["info", "-U", "--output=json"])
        .arg(image))
    .with_context(|| format!("inspecting {}", image.display()))?;
    parse_info(&json).with_context(|| format!("inspecting {}", image.display()))
}

/// Facts about an image and every image below it.
pub fn info_chain(image: &Path) -> anyhow::Result<Vec<ImageInfo>> {
    let tool = find_tool(QEMU_IMG, "qemu-utils")?;
    let json = run(Command::new(tool)
        .args(["info", "-U", "--output=json", "--backing-chain"])
        .arg(image))
    .with_context(|| format!("inspecting {}", image.display()))?;
    parse_chain(&json).with_context(|| format!("inspecting {}", image.display()))
}

/// `qemu-img create -f qcow2 -b BASE -F FMT OVERLAY [SIZE]`. The backing format is given
/// explicitly: qemu 6.1+ refuses to guess it, and guessing would let a raw image whose guest
/// wrote a qcow2 header be opened as qcow2.
pub fn create_overlay(
    base: &Path,
    base_format: &str,
    overlay: &Path,
    size: Option<u64>,
) -> anyhow::Result<()> {
    let tool = find_tool(QEMU_IMG, "qemu-utils")?;
    let mut cmd = Command::new(tool);
    cmd.args(["create", "-q", "-f", "qcow2", "-b"])
        .arg(base)
        .args(["-F", base_format])
        .arg(overlay);
    if let Some(size) = size {
        cmd.arg(size.to_string());
    }
    run(&mut cmd).with_context(|| format!("creating the overlay {}", overlay.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // As qemu-img 7.2 prints it.
    const OVERLAY: &str = r#"[
    {
        "virtual-size": 67108864,
        "filename": "/vms/a/disk.qcow2",
        "cluster-size": 65536,
        "format": "qcow2",
        "actual-size": 200704,
        "format-specific": {"type": "qcow2", "data": {"compat": "1.1", "lazy-refcounts": false}},
        "full-backing-filename": "/srv/base.img",
        "backing-filename": "/srv/base.img",
        "backing-filename-format": "raw",
        "dirty-flag": false
    },
    {
        "virtual-size": 67108864,
        "filename": "/srv/base.img",
        "format": "raw",
        "actual-size": 67112960,
        "dirty-flag": false
    }
]"#;

    #[test]
    fn chain() {
        let c = parse_chain(OVERLAY).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].format, "qcow2");
        assert_eq!(c[0].actual_size, Some(200704));
        assert_eq!(c[0].backing_filename.as_deref(), Some("/srv/base.img"));
        assert_eq!(c[1].virtual_size, 67108864);
        assert_eq!(c[1].backing_filename, None);
        assert!(parse_chain("[]").is_err());
        assert!(parse_chain("{").is_err());
    }

    #[test]
    fn single() {
        let one = r#"{"virtual-size": 1024, "filename": "x", "format": "raw"}"#;
        let i = parse_info(one).unwrap();
        assert_eq!(
            (i.format.as_str(), i.virtual_size, i.actual_size),
            ("raw", 1024, None)
        );
        assert!(parse_info(r#"{"filename": "x"}"#).is_err());
        assert!(parse_info("not json").is_err());
    }

    #[test]
    fn missing_tool_says_what_to_install() {
        let e = find_tool("overkvm-no-such-tool", "some-package")
            .unwrap_err()
            .to_string();
        assert!(e.contains("apt-get install some-package"), "{e}");
    }
}
