//! `cargo xtask package`: the Debian package and the RPM of overkvm, from the release binary
//! the normal build makes (eBPF programs embedded) and the metadata in overkvm/Cargo.toml.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// cargo-deb and cargo-generate-rpm releases the metadata in overkvm/Cargo.toml is written
/// for (both build with rustc 1.95).
const CARGO_DEB_VERSION: &str = "3.8.0";
const CARGO_GENERATE_RPM_VERSION: &str = "0.21.1";

#[derive(clap::Args)]
pub struct PackageArgs {
    /// The package's own revision: the Debian revision (0.1.0-N) and the RPM release. Raise
    /// it to rebuild the same version as an upgrade.
    #[arg(long, default_value = "1", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub revision: u32,
}

/// The packages built, for the caller to print.
pub struct Built {
    pub deb: PathBuf,
    pub rpm: PathBuf,
}

/// Installs a cargo subcommand at `version` with `cargo install --locked` unless
/// `cargo <sub> --version` already reports that version.
fn ensure_cargo_tool(crate_name: &str, sub: &str, version: &str, why: &str) -> anyhow::Result<()> {
    let have = Command::new("cargo")
        .args([sub, "--version"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if have.split_whitespace().any(|w| w == version) {
        return Ok(());
    }
    eprintln!("==> installing {crate_name} {version} ({why}; about two minutes)");
    let mut c = Command::new("cargo");
    c.args(["install", "--locked", crate_name, "--version", version]);
    crate::check(c, &format!("cargo install {crate_name}"))
}

/// Writes the man pages (gzipped, as both formats want them) and shell completions the
/// package ships into `dir`, from the binary's own clap definitions.
fn package_files(bin: &Path, dir: &Path) -> anyhow::Result<()> {
    eprintln!(
        "==> man pages and bash, zsh and fish completions from the command line's definition"
    );
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    let mut c = Command::new(bin);
    c.arg("package-files").arg(dir);
    crate::check(c, "overkvm-io package-files")?;
    let man = dir.join("man");
    let pages: Vec<PathBuf> = std::fs::read_dir(&man)
        .with_context(|| format!("reading {}", man.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "1"))
        .collect();
    if pages.is_empty() {
        bail!(
            "overkvm-io package-files wrote no man page into {}",
            man.display()
        );
    }
    // -n: no name or time stamp in the header, so the same page gives the same bytes.
    let mut c = Command::new("gzip");
    c.args(["-9", "-n", "-f"]).args(&pages);
    crate::check(c, "gzip of the man pages")
}

pub fn run(args: &PackageArgs) -> anyhow::Result<Built> {
    crate::setup::toolchain()?;
    ensure_cargo_tool("cargo-deb", "deb", CARGO_DEB_VERSION, "builds the .deb")?;
    ensure_cargo_tool(
        "cargo-generate-rpm",
        "generate-rpm",
        CARGO_GENERATE_RPM_VERSION,
        "builds the RPM",
    )?;
    // cargo-deb works out the package's Depends (libc6 ...) with dpkg-shlibdeps; without it
    // it only warns and ships a package that depends on nothing.
    crate::setup::debian_package(
        "dpkg-dev",
        "dpkg-shlibdeps: the .deb's library dependencies",
    )?;
    crate::build()?;
    let root = crate::workspace_root();
    let release = root.join("target/release");
    package_files(&release.join("overkvm-io"), &release.join("package-files"))?;

    let revision = args.revision.to_string();
    eprintln!("==> the Debian package (cargo deb)");
    let deb_dir = root.join("target/debian");
    let mut c = crate::cargo();
    // --no-build: the binary above is the one with the eBPF programs built by overkvm's
    // build.rs; cargo-deb strips it.
    c.args([
        "deb",
        "-p",
        "overkvm",
        "--no-build",
        "--deb-revision",
        &revision,
        "-o",
    ])
    .arg(&deb_dir);
    let out = c.output().context("starting cargo deb")?;
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("cargo deb failed ({})", out.status);
    }
    // cargo deb prints the path of the package it wrote as its last line.
    let deb = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .map(|l| PathBuf::from(l.trim()))
        .filter(|p| p.is_file())
        .context("cargo deb did not name the package it wrote")?;

    eprintln!("==> the RPM (cargo generate-rpm)");
    // `-o` names the file itself: given a directory that does not exist yet (a clean clone),
    // cargo generate-rpm writes the package under that directory's name.
    let rpm_dir = root.join("target/generate-rpm");
    if rpm_dir.is_file() {
        std::fs::remove_file(&rpm_dir)?;
    }
    std::fs::create_dir_all(&rpm_dir).with_context(|| format!("creating {}", rpm_dir.display()))?;
    let version = env!("CARGO_PKG_VERSION");
    let rpm = rpm_dir.join(format!(
        "overkvm-{version}-{revision}.{}.rpm",
        std::env::consts::ARCH
    ));
    let mut c = crate::cargo();
    c.args(["generate-rpm", "-p", "overkvm", "-s"])
        .arg(format!("release = \"{revision}\""))
        .arg("-o")
        .arg(&rpm);
    crate::check(c, "cargo generate-rpm")?;
    if !rpm.is_file() {
        bail!("cargo generate-rpm did not write {}", rpm.display());
    }
    Ok(Built { deb, rpm })
}
