//! Support for the integration tests: root checks with stated skip reasons, loop and zram
//! devices that clean up after themselves, an exact I/O generator, and real guests (`guest`).

pub mod devices;
pub mod diskstats;
pub mod guest;
pub mod iogen;
pub mod netstore;
pub mod packages;
pub mod prometheus;
pub mod rootfs;
pub mod serving;
pub mod standins;
pub mod throttling;

use std::path::PathBuf;

/// Why a test that needs the real kernel cannot run here, or None when it can.
pub fn skip_reason() -> Option<String> {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root: loading eBPF programs and making loop devices needs root".into());
    }
    if overkvm::bpf::object_is_stub() {
        return Some("built with AYA_BUILD_SKIP: no eBPF programs to load".into());
    }
    if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Some("kernel has no BTF at /sys/kernel/btf/vmlinux".into());
    }
    None
}

/// Environment variable naming the file skips are recorded in; `cargo xtask test` sets it,
/// prints the skips after the run and fails on any under `CI=true`.
pub const SKIP_LOG_ENV: &str = "OVERKVM_SKIP_LOG";

/// Records that the running test skips and why: printed with the test's output and appended
/// to the file named by `OVERKVM_SKIP_LOG`, so a skipped test never passes unnoticed. `module`
/// is the test file's module path; the test's own name is its thread's (libtest names it).
pub fn skipped(module: &str, reason: impl std::fmt::Display) {
    let test = std::thread::current()
        .name()
        .filter(|n| *n != "main")
        .map_or_else(|| module.to_string(), |n| format!("{module}::{n}"));
    let line = format!("SKIPPED {test}: {reason}");
    eprintln!("{line}");
    if let Some(path) = std::env::var_os(SKIP_LOG_ENV) {
        use std::io::Write as _;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{}", line.replace('\n', " "));
        }
    }
}

/// Skips (with the reason recorded, see `skipped`) when the kernel has no
/// `block_io_start`/`block_io_done` (before 6.5): for tests of that hook mode.
#[macro_export]
macro_rules! skip_unless_io_start_done {
    () => {
        $crate::skip_unless_kernel!();
        let support = overkvm::bpf::layout::hooks_available(
            &overkvm::bpf::btf::Btf::from_sys_fs().expect("reading the kernel's BTF"),
        );
        if !support.io_start_done {
            $crate::skipped(
                module_path!(),
                "kernel has no block_io_start/block_io_done (< 6.5)",
            );
            return;
        }
    };
}

/// Skips (with the reason recorded, see `skipped`) when the test cannot run on this kernel.
#[macro_export]
macro_rules! skip_unless_kernel {
    () => {
        if let Some(reason) = $crate::skip_reason() {
            $crate::skipped(module_path!(), reason);
            return;
        }
    };
}

/// The workspace's target directory.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .map(|p| p.join("target"))
                .unwrap_or_else(|| PathBuf::from("target"))
        })
}

/// Path of a binary built by the workspace (`cargo xtask test` builds them first, release).
pub fn workspace_bin(name: &str) -> PathBuf {
    let target = target_dir();
    for profile in ["release", "debug"] {
        let p = target.join(profile).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!(
        "{name} is not built under {}: run the tests with `cargo xtask test`",
        target.display()
    );
}
