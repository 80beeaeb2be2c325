//! Support for the integration tests: root checks with stated skip reasons, loop and zram
//! devices that clean up after themselves, an exact I/O generator, and real guests (`guest`).

pub mod devices;
pub mod guest;
pub mod iogen;
pub mod prometheus;
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

/// Prints why a test is skipped and returns true when it must skip. CI runs as root, so a skip
/// there is visible in the log, never a silent pass.
#[macro_export]
macro_rules! skip_unless_kernel {
    () => {
        if let Some(reason) = $crate::skip_reason() {
            eprintln!("SKIPPED {}: {reason}", module_path!());
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
