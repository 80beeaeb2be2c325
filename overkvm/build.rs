//! Builds the kernel programs (`overkvm-ebpf`) for bpfel-unknown-none with the nightly
//! toolchain and bpf-linker, and drops the object in OUT_DIR for `include_bytes_aligned!`.
//!
//! `cargo xtask setup` installs what this needs. With `AYA_BUILD_SKIP=1` the eBPF build is
//! skipped and an empty object is written, so `cargo check`/`clippy` work without nightly;
//! the binary then refuses to load and says why.

use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let object = out_dir.join("overkvm");
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        if !object.exists() {
            fs::write(&object, [])?;
        }
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        return Ok(());
    }
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == "overkvm-ebpf")
        .ok_or_else(|| anyhow!("overkvm-ebpf package not found in the workspace"))?;
    let root = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("overkvm-ebpf manifest has no parent directory"))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context("building the eBPF programs (run `cargo xtask setup` to install nightly rust-src and bpf-linker)")
}
