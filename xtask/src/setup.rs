//! Installs what the build and the tests need, saying what it does; does nothing when all is
//! already there.

use std::process::Command;

use anyhow::{Context as _, bail};

/// bpf-linker release that links with the LLVM inside the Rust toolchain (LLVM 22 here).
/// 0.11+ wants a system LLVM 23.
const BPF_LINKER_VERSION: &str = "0.10.1";
/// The LLVM major bpf-linker 0.10.1 is built against (its `rust-llvm-22` feature).
const BPF_LINKER_LLVM_MAJOR: u32 = 22;

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run(mut cmd: Command, what: &str) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("starting {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// Parses the LLVM major from `rustc -vV` output.
fn llvm_major(rustc_vv: &str) -> Option<u32> {
    rustc_vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.trim().parse().ok())
}

/// The nightly toolchain with rust-src, and bpf-linker matching its LLVM.
pub fn toolchain() -> anyhow::Result<()> {
    let vv = output(Command::new("rustup").args(["run", "nightly", "rustc", "-vV"])).context(
        "no nightly Rust toolchain: the eBPF programs are built with nightly \
         (`rustup toolchain install nightly --component rust-src`)",
    )?;
    let major = llvm_major(&vv).context("cannot read the LLVM version of nightly rustc")?;
    if major != BPF_LINKER_LLVM_MAJOR {
        bail!(
            "nightly rustc uses LLVM {major}, but bpf-linker {BPF_LINKER_VERSION} links with LLVM \
             {BPF_LINKER_LLVM_MAJOR}: the two must match. Pin a nightly with LLVM \
             {BPF_LINKER_LLVM_MAJOR} (e.g. nightly-2026-05-19) or move to a bpf-linker built for \
             LLVM {major}"
        );
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))
    .unwrap_or_default();
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("==> installing rust-src for the nightly toolchain (to build core for BPF)");
        let mut c = Command::new("rustup");
        c.args(["component", "add", "rust-src", "--toolchain", "nightly"]);
        run(c, "rustup component add rust-src")?;
    }
    let have = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if !have.contains(BPF_LINKER_VERSION) {
        eprintln!(
            "==> installing bpf-linker {BPF_LINKER_VERSION} (links the eBPF object; about a minute)"
        );
        let mut c = Command::new("cargo");
        c.args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
        ]);
        run(c, "cargo install bpf-linker")?;
    }
    Ok(())
}

/// Debian packages the integration tests use, with the command each provides.
const TEST_PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "qemu-system-x86_64"),
    ("qemu-utils", "qemu-img"),
    ("busybox-static", "busybox"),
    ("cpio", "cpio"),
    ("e2fsprogs", "mkfs.ext4"),
    ("xfsprogs", "mkfs.xfs"),
    ("fio", "fio"),
    ("tmux", "tmux"),
    ("prometheus", "prometheus"),
    ("bpftrace", "bpftrace"),
    ("bpftool", "bpftool"),
    ("strace", "strace"),
    // tests/tests/package.rs: the RPM's contents and an install into an empty root, the
    // packaged unit checked by systemd-analyze (systemd need not run), the man pages rendered.
    ("rpm", "rpm"),
    ("systemd", "systemd-analyze"),
    ("man-db", "man"),
    // tests/tests/systemd_unit.rs: the Debian root (with systemd) its guest boots.
    ("mmdebstrap", "mmdebstrap"),
    // tests/tests/netdisk.rs: an iSCSI target (userspace tgtd) for QEMU's libiscsi driver.
    ("tgt", "tgtd"),
    // libvirt for tests/tests/libvirt.rs: the daemon with its qemu driver and virsh, nothing
    // they merely recommend (dnsmasq, firewall, storage backends...).
    ("libvirt-daemon", "libvirtd"),
    ("libvirt-daemon-driver-qemu", "libvirtd"),
    ("libvirt-clients", "virsh"),
];

/// Installed with `--no-install-recommends`.
const WITHOUT_RECOMMENDS: &[&str] = &[
    "libvirt-daemon",
    "libvirt-daemon-driver-qemu",
    "libvirt-clients",
];

/// The account libvirt's qemu driver resolves at start-up even when qemu.conf says
/// `user = "root"` (it refuses to start without it). Debian's libvirt-daemon-system creates
/// it; the tests install only the daemon, so setup creates the system user and group.
const LIBVIRT_QEMU_ACCOUNT: &str = "libvirt-qemu";

fn installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_some_and(|s| s.contains("install ok installed"))
}

fn codename() -> Option<String> {
    let text = std::fs::read_to_string("/etc/os-release").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_string())
}

/// Installs one Debian package with apt-get (as root) unless it is installed, saying why.
pub fn debian_package(pkg: &str, why: &str) -> anyhow::Result<()> {
    if installed(pkg) {
        return Ok(());
    }
    if Command::new("apt-get").arg("--version").output().is_err() {
        bail!("{pkg} is missing ({why}) and there is no apt-get to install it");
    }
    eprintln!("==> installing the Debian package {pkg} ({why})");
    let sudo = !crate::is_root();
    let apt = |args: &[&str]| {
        let mut c = Command::new(if sudo { "sudo" } else { "apt-get" });
        if sudo {
            c.arg("apt-get");
        }
        c.env("DEBIAN_FRONTEND", "noninteractive").args(args);
        c
    };
    run(apt(&["update", "-qq"]), "apt-get update")?;
    run(
        apt(&["install", "-y", "-qq", "--no-install-recommends", pkg]),
        "apt-get install",
    )
}

/// Installs the missing test packages with apt-get (as root).
pub fn test_packages() -> anyhow::Result<()> {
    install_test_packages()?;
    libvirt_qemu_account()
}

fn account_exists(db: &str, name: &str) -> bool {
    Command::new("getent")
        .args([db, name])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Creates the `libvirt-qemu` system group and user when missing (as root; prints only
/// what it changes).
fn libvirt_qemu_account() -> anyhow::Result<()> {
    let name = LIBVIRT_QEMU_ACCOUNT;
    let sudo = !crate::is_root();
    let cmd = |prog: &str| {
        let mut c = Command::new(if sudo { "sudo" } else { prog });
        if sudo {
            c.arg(prog);
        }
        c
    };
    if !account_exists("group", name) {
        eprintln!("==> creating the system group {name} (libvirt's qemu driver needs it)");
        let mut c = cmd("groupadd");
        c.args(["--system", name]);
        run(c, "groupadd")?;
    }
    if !account_exists("passwd", name) {
        eprintln!("==> creating the system user {name} (libvirt's qemu driver needs it)");
        let mut c = cmd("useradd");
        c.args([
            "--system",
            "--gid",
            name,
            "--no-create-home",
            "--home-dir",
            "/var/lib/libvirt",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ]);
        run(c, "useradd")?;
    }
    Ok(())
}

fn install_test_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = TEST_PACKAGES
        .iter()
        .filter(|(pkg, _)| !installed(pkg))
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if Command::new("apt-get").arg("--version").output().is_err() {
        bail!("missing packages {missing:?} and no apt-get to install them");
    }
    eprintln!(
        "==> installing Debian packages for the tests: {}",
        missing.join(" ")
    );
    let sudo = !crate::is_root();
    let apt = |args: &[&str]| {
        let mut c = if sudo {
            Command::new("sudo")
        } else {
            Command::new("apt-get")
        };
        if sudo {
            c.arg("apt-get");
        }
        c.env("DEBIAN_FRONTEND", "noninteractive").args(args);
        c
    };
    run(apt(&["update", "-qq"]), "apt-get update")?;
    let (lean, missing): (Vec<&str>, Vec<&str>) = missing
        .into_iter()
        .partition(|p| WITHOUT_RECOMMENDS.contains(p));
    if !lean.is_empty() {
        let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
        args.extend(&lean);
        run(apt(&args), "apt-get install")?;
    }
    if missing.is_empty() {
        return Ok(());
    }
    let mut args: Vec<String> = vec![
        "install".into(),
        "-y".into(),
        "-qq".into(),
        "--allow-downgrades".into(),
    ];
    let pinned_utils = missing.contains(&"qemu-system-x86");
    for pkg in &missing {
        if *pkg == "qemu-utils" && pinned_utils {
            continue;
        }
        // qemu-system-x86 must come with a qemu-utils of its own release: a newer
        // qemu-utils (from backports, preinstalled on some images) breaks it.
        if *pkg == "qemu-system-x86"
            && let Some(c) = codename()
        {
            args.push(format!("qemu-utils/{c}"));
        }
        args.push((*pkg).to_string());
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run(apt(&refs), "apt-get install")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_llvm_major() {
        let vv =
            "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nbinary: rustc\nLLVM version: 22.1.4\n";
        assert_eq!(llvm_major(vv), Some(22));
        assert_eq!(llvm_major("nothing"), None);
    }
}
