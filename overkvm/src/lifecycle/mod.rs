//! VM lifecycle: one base image per host, a thin qcow2 overlay per guest, many guests, each
//! measurable and controllable from its first I/O.
//!
//! `vm create` makes the overlay and a definition file in the VM's state directory; `vm start`
//! runs qemu with the VM's `-name`/`-uuid` (how [`crate::identity`] names it), direct I/O
//! (`cache=none,aio=native`, so the host attributes every guest I/O to its qemu) and its own
//! block cgroup (so a limit acts on it alone), staggered or admitted under a device's IOPS
//! budget to avoid boot storms; `vm stop` powers it off, quits or kills it and cleans up;
//! `vm list` and `overcommit` show what runs and how far the host is over-committed.
//!
//! Pure parts (`definition`, `qemu` command lines, `state::classify`, `admit::AdmitPolicy`,
//! `overcommit` maths, parsers) are tested without a host; `ops`, `cgroup`, `qmp` and
//! `qemu_img` are the thin layer that touches processes, sockets, cgroups and images.

pub mod admit;
pub mod cgroup;
pub mod definition;
pub mod list;
pub mod ops;
pub mod overcommit;
pub mod qemu;
pub mod qemu_img;
pub mod state;

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

use self::definition::{VmDefinition, VmPaths};

/// The state directory from the flag, `$OVERKVM_STATE_DIR` or the default, made absolute
/// (qemu and the definition file get absolute paths).
pub fn state_dir(flag: Option<&Path>) -> anyhow::Result<PathBuf> {
    let dir = definition::state_dir(flag, std::env::var_os(definition::STATE_DIR_ENV));
    std::path::absolute(&dir).with_context(|| format!("state directory {}", dir.display()))
}

/// Loads VM `name` from the state directory.
pub fn load(state_dir: &Path, name: &str) -> anyhow::Result<(VmDefinition, VmPaths)> {
    definition::validate_name(name)?;
    let paths = VmPaths::new(state_dir, name);
    let file = paths.definition();
    let text = match fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "there is no VM named {name:?} in {} (`overkvm-io vm list` shows the VMs there; \
             --state-dir or ${} pick another directory)",
            state_dir.display(),
            definition::STATE_DIR_ENV
        ),
        Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
    };
    let def = VmDefinition::parse(&text).with_context(|| format!("in {}", file.display()))?;
    if def.name != name {
        bail!(
            "{} defines VM {:?}, not {name:?}: the directory was renamed by hand",
            file.display(),
            def.name
        );
    }
    Ok((def, paths))
}

/// A VM's definition and where its files are.
pub type LoadedVm = (VmDefinition, VmPaths);

/// Every VM in the state directory, sorted by name, plus the entries that could not be read
/// (as "NAME: reason"). A missing state directory holds no VMs.
pub fn load_all(state_dir: &Path) -> anyhow::Result<(Vec<LoadedVm>, Vec<String>)> {
    let entries = match fs::read_dir(state_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), Vec::new())),
        Err(e) => {
            return Err(e)
                .with_context(|| format!("reading state directory {}", state_dir.display()));
        }
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        // `.NAME.creating-PID` are half-made VMs of a `vm create` in progress.
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    let mut vms = Vec::new();
    let mut problems = Vec::new();
    for n in names {
        match load(state_dir, &n) {
            Ok(vm) => vms.push(vm),
            Err(e) => problems.push(format!("{n}: {e:#}")),
        }
    }
    Ok((vms, problems))
}

/// Formats bytes with a binary unit (`1.5 GiB`).
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(64 << 20), "64.0 MiB");
        assert_eq!(human_bytes(u64::MAX), "16384.0 PiB");
    }

    #[test]
    fn load_reports_clearly() {
        let tmp = tempfile::tempdir().unwrap();
        // Not created yet: an absent state directory holds no VMs.
        let dir = tmp.path().join("vms");
        let (vms, problems) = load_all(&dir).unwrap();
        assert!(vms.is_empty() && problems.is_empty());
        fs::create_dir_all(dir.join("a")).unwrap();
        fs::create_dir_all(dir.join(".b.creating-1")).unwrap();
        let e = format!("{:#}", load(&dir, "zz").unwrap_err());
        assert!(e.contains("no VM named \"zz\""), "{e}");
        assert!(load(&dir, "../etc").is_err());
        let (vms, problems) = load_all(&dir).unwrap();
        assert!(vms.is_empty());
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].starts_with("a: "), "{problems:?}");
    }
}
