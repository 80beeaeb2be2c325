//! Helpers of the throttling tests: test cgroups, greedy qemu-like processes, the daemon.

use std::{
    fs,
    os::unix::{ffi::OsStrExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::workspace_bin;

/// Test cgroups under the v1 blkio root, removed (with their processes killed) on drop.
pub struct TestCgroups {
    pub root: PathBuf,
    pub kids: Vec<Child>,
}

impl TestCgroups {
    pub fn new(blkio: &Path, names: &[&str]) -> TestCgroups {
        let root = blkio.join(format!("overkvm-test-{}", std::process::id()));
        for n in names {
            fs::create_dir_all(root.join(n)).unwrap();
        }
        TestCgroups {
            root,
            kids: Vec::new(),
        }
    }

    pub fn stop_all(&mut self) {
        for k in &mut self.kids {
            let _ = k.kill();
            let _ = k.wait();
        }
        self.kids.clear();
    }
}

impl Drop for TestCgroups {
    fn drop(&mut self) {
        self.stop_all();
        if let Ok(entries) = fs::read_dir(&self.root) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = fs::remove_dir(e.path());
                }
            }
        }
        let _ = fs::remove_dir(&self.root);
    }
}

/// Starts a greedy direct-read generator that looks like a qemu VM named `name`, in `cgroup`.
pub fn greedy_vm(bin_dir: &Path, dev: &Path, name: &str, cgroup_dir: &Path, region: u64) -> Child {
    let qemu = bin_dir.join("qemu-system-x86_64");
    if !qemu.exists() {
        fs::copy(workspace_bin("iogen"), &qemu).unwrap();
    }
    // Joins its cgroup before exec, as libvirt does: not one I/O is charged elsewhere.
    let procs = std::ffi::CString::new(cgroup_dir.join("cgroup.procs").as_os_str().as_bytes())
        .expect("cgroup path without NUL");
    let mut cmd = Command::new(&qemu);
    // SAFETY: the closure only makes async-signal-safe calls (open, write, close).
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if ok { Ok(()) } else { Err(err) }
        });
    }
    // iogen reads its first 7 arguments and ignores the rest: the qemu-style ones are for
    // overkvm's identity code.
    cmd.arg(dev)
        .args(["100000000", "0", "4096"])
        .arg((region * (16 << 20)).to_string())
        .arg((16u64 << 20).to_string())
        .arg((region + 1).to_string())
        .args(["-name", &format!("guest={name},debug-threads=on"), "-uuid"])
        .arg(format!("00000000-0000-4000-8000-00000000000{region}"))
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

/// Read ops of a v1 cgroup on a device, as blkio counts them.
pub fn serviced(cgroup_dir: &Path, major: u32, minor: u32) -> u64 {
    let text =
        fs::read_to_string(cgroup_dir.join("blkio.throttle.io_serviced")).unwrap_or_default();
    let want = format!("{major}:{minor} Total ");
    text.lines()
        .find_map(|l| l.strip_prefix(&want).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

/// True when any of the cgroups has a limit line for the device.
pub fn any_limit(dirs: &[PathBuf], major: u32, minor: u32) -> bool {
    let want = format!("{major}:{minor} ");
    dirs.iter().any(|d| {
        ["read_iops", "write_iops", "read_bps", "write_bps"]
            .iter()
            .any(|f| {
                fs::read_to_string(d.join(format!("blkio.throttle.{f}_device")))
                    .unwrap_or_default()
                    .lines()
                    .any(|l| l.starts_with(&want))
            })
    })
}

pub struct Daemon(pub Child);

impl Daemon {
    /// Starts the daemon and waits until its throttle is up (leftovers reconciled).
    pub fn start(config: &Path, log_path: &Path) -> Daemon {
        Daemon::start_with(config, log_path, &[])
    }

    pub fn spawn(config: &Path, log: &Path) -> Daemon {
        Daemon::spawn_with(config, log, &[])
    }

    /// As [`Daemon::start`], with more `serve` arguments (`--qmp SOCKET`).
    pub fn start_with(config: &Path, log_path: &Path, args: &[&str]) -> Daemon {
        let d = Daemon::spawn_with(config, log_path, args);
        let ready = wait_until(Duration::from_secs(20), || {
            fs::read_to_string(log_path).is_ok_and(|l| l.contains("throttling "))
        });
        assert!(
            ready,
            "daemon not ready:\n{}",
            fs::read_to_string(log_path).unwrap_or_default()
        );
        d
    }

    pub fn spawn_with(config: &Path, log: &Path, args: &[&str]) -> Daemon {
        let log = fs::File::create(log).unwrap();
        Daemon(
            Command::new(workspace_bin("overkvm-io"))
                .args(["serve", "--listen", "127.0.0.1:0", "-i", "0.5"])
                .args(args)
                .arg("--config")
                .arg(config)
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    }

    pub fn kill9(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        std::mem::forget(self);
    }

    pub fn terminate(mut self) -> std::process::ExitStatus {
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let st = self.0.wait().unwrap();
        std::mem::forget(self);
        st
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// Writes a daemon config with one device budget: `[policy]` with `state_file` and the `policy`
/// lines (each ending in a newline), then the `[[device]]`, then `extra` (e.g. `[[vm]]` tables).
pub fn write_config(
    path: &Path,
    state_file: &Path,
    policy: &str,
    device: &str,
    iops: impl std::fmt::Display,
    extra: &str,
) {
    let text = format!(
        "[policy]\nstate_file = \"{}\"\n{policy}\n[[device]]\ndevice = \"{device}\"\niops = {iops}\n{extra}",
        state_file.display()
    );
    fs::write(path, text).expect("writing the daemon config");
}

pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    f()
}

/// The host's cgroup v1 blkio mount, or why a v1 throttling test cannot run here.
pub fn v1_blkio() -> Result<PathBuf, &'static str> {
    use overkvm::host::cgroup;
    match cgroup::find_io_hierarchy(&cgroup::host_mounts()) {
        None => Err("no block cgroup controller mounted"),
        Some(h) if h.controller != cgroup::IoController::V1 => {
            Err("this host's block controller is cgroup v2 (io.max is tested in the guest tests)")
        }
        Some(h) => Ok(h.mount_point),
    }
}

/// What a v1 throttling scenario runs on: a loop device and one test cgroup per VM name.
pub struct V1Scenario {
    pub lo: crate::devices::LoopDevice,
    pub major: u32,
    pub minor: u32,
    pub cgs: TestCgroups,
    pub dirs: Vec<PathBuf>,
}

impl V1Scenario {
    pub fn new(blkio: &Path, size_mb: u64, names: &[&str]) -> V1Scenario {
        let lo = crate::devices::LoopDevice::new(size_mb).expect("loop device");
        let (major, minor) = (lo.dev() >> 20, lo.dev() & 0xfffff);
        let cgs = TestCgroups::new(blkio, names);
        let dirs = names.iter().map(|n| cgs.root.join(n)).collect();
        V1Scenario {
            lo,
            major,
            minor,
            cgs,
            dirs,
        }
    }
}

/// Returns the v1 blkio mount, or prints why the test is skipped and returns from it.
#[macro_export]
macro_rules! v1_blkio_or_skip {
    () => {
        match $crate::throttling::v1_blkio() {
            Ok(p) => p,
            Err(reason) => {
                overkvm_tests::skipped(module_path!(), &reason);
                return;
            }
        }
    };
}

/// The v1 limits of a cgroup on a device as the kernel reports them: read_iops, write_iops,
/// read_bps, write_bps (None where unlimited or unreadable).
pub fn v1_limits(cgroup_dir: &Path, major: u32, minor: u32) -> [Option<u64>; 4] {
    let mut out = [None; 4];
    for (i, f) in ["read_iops", "write_iops", "read_bps", "write_bps"]
        .iter()
        .enumerate()
    {
        let text = fs::read_to_string(cgroup_dir.join(format!("blkio.throttle.{f}_device")))
            .unwrap_or_default();
        out[i] = overkvm::host::cgroup::limits::parse_v1(&text, major, minor);
    }
    out
}

/// Every cgroup directory under (and including) `root`.
pub fn cgroup_tree(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![root.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        if let Ok(rd) = fs::read_dir(&out[i]) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    out.push(e.path());
                }
            }
        }
        i += 1;
    }
    out
}

/// Removes an empty cgroup, retrying while its last task is still exiting.
pub fn remove_cgroup(dir: &Path) -> bool {
    wait_until(Duration::from_secs(5), || {
        fs::remove_dir(dir).is_ok() || !dir.exists()
    })
}
