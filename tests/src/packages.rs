//! The packages `cargo xtask package` builds, for the tests that inspect or install them
//! (`tests/tests/package.rs`, `tests/tests/systemd_unit.rs`).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

/// The packages of one `cargo xtask package` run.
pub struct Packages {
    pub deb: PathBuf,
    pub rpm: PathBuf,
}

/// Runs `cargo xtask package --revision N` (the normal build: binary, eBPF programs, man pages,
/// completions, both packages) and takes the two paths it prints. They are copied into
/// `target/package-tests/<tag>-rev-N`: cargo-deb removes the .deb of another revision from its
/// output directory, and test files running side by side must not share a copy.
pub fn build_packages(tag: &str, revision: u32) -> Packages {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(workspace)
        .args(["xtask", "package", "--revision", &revision.to_string()])
        .stderr(Stdio::inherit())
        .output()
        .expect("starting cargo xtask package");
    assert!(out.status.success(), "cargo xtask package failed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let paths: Vec<PathBuf> = stdout.lines().map(PathBuf::from).collect();
    let [deb, rpm] = paths.as_slice() else {
        panic!("cargo xtask package printed {stdout:?}, not two paths");
    };
    assert!(deb.extension().is_some_and(|x| x == "deb"), "{deb:?}");
    assert!(rpm.extension().is_some_and(|x| x == "rpm"), "{rpm:?}");
    let dir = crate::target_dir().join(format!("package-tests/{tag}-rev-{revision}"));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let aside = |p: &Path| {
        let to = dir.join(p.file_name().expect("a package file name"));
        fs::copy(p, &to).unwrap_or_else(|e| panic!("copying {}: {e}", p.display()));
        to
    };
    Packages {
        deb: aside(deb),
        rpm: aside(rpm),
    }
}
