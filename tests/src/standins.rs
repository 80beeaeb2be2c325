//! Stand-ins for busy and quiet workloads: `iogen` copies that look like qemu VMs (argv[0],
//! `/proc/PID/exe` and comm say qemu, `-name guest=NAME` names them) or plain processes,
//! doing direct reads on a device at a paced or unpaced rate until they are dropped.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use crate::workspace_bin;

/// A running stand-in, killed and reaped when dropped.
pub struct StandIn {
    pub child: Child,
    /// The VM name, or None for a plain process.
    pub vm: Option<String>,
}

/// How a stand-in reads: at most `rate` reads per second (None: as fast as the device
/// answers), at even-numbered 4 KiB blocks of [start, start + len) of the device.
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    pub rate: Option<f64>,
    pub start: u64,
    pub len: u64,
    pub seed: u64,
}

/// `iogen` copied as `qemu-system-x86_64` in `bin_dir` (once), so its processes are VMs.
pub fn qemu_binary(bin_dir: &Path) -> PathBuf {
    let qemu = bin_dir.join("qemu-system-x86_64");
    if !qemu.exists() {
        fs::copy(workspace_bin("iogen"), &qemu).expect("copying iogen as qemu-system-x86_64");
    }
    qemu
}

impl StandIn {
    /// A VM named `name` reading `dev` at `pace`; `bin_dir` holds its qemu-named binary.
    pub fn vm(bin_dir: &Path, dev: &Path, name: &str, pace: Pace) -> StandIn {
        let mut cmd = Command::new(qemu_binary(bin_dir));
        args(&mut cmd, dev, pace);
        // iogen ignores these; overkvm's identity code reads them as qemu's.
        cmd.args(["-name", &format!("guest={name},debug-threads=on")]);
        StandIn {
            child: cmd.spawn().expect("starting a VM stand-in"),
            vm: Some(name.to_string()),
        }
    }

    /// A plain process (comm `iogen`) reading `dev` at `pace`.
    pub fn process(dev: &Path, pace: Pace) -> StandIn {
        let mut cmd = Command::new(workspace_bin("iogen"));
        args(&mut cmd, dev, pace);
        StandIn {
            child: cmd.spawn().expect("starting a process stand-in"),
            vm: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// False once it exited (an I/O error, or killed).
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

fn args(cmd: &mut Command, dev: &Path, pace: Pace) {
    // Reads that outlast any test: the stand-in runs until dropped.
    cmd.arg(dev)
        .args(["1000000000", "0", "4096"])
        .args([pace.start.to_string(), pace.len.to_string()])
        .arg(pace.seed.max(1).to_string())
        .stdout(Stdio::null());
    if let Some(rate) = pace.rate {
        cmd.args(["--rate", &rate.to_string()]);
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
