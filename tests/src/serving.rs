//! Helpers of the fault, flood and privilege tests around a running `overkvm-io serve`: its
//! metrics over plain HTTP, its memory, fake VMs with an exact I/O count, and temporary
//! directories and tmpfs mounts that remove themselves.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{throttling::wait_until, workspace_bin};

/// A new directory `overkvm-TAG-*` under the temp dir, removed with everything in it when
/// dropped (also when the test fails). The path is also kept as a plain `PathBuf` (`.0`).
pub struct TempDir(pub PathBuf, tempfile::TempDir);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let dir = tempfile::Builder::new()
            .prefix(&format!("overkvm-{tag}-"))
            .tempdir()
            .expect("creating a temp dir");
        TempDir(dir.path().to_path_buf(), dir)
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.1.path().join(p)
    }
}

/// A filesystem this test mounted on a directory it created: unmounted (and the directory
/// removed) when dropped, also when the test fails.
pub struct Mount {
    pub path: PathBuf,
    mounted: bool,
    remove_dir: bool,
}

impl Mount {
    /// `mount -t FSTYPE -o OPTIONS none PATH`; creates PATH when missing (and then removes it).
    pub fn new(fstype: &str, options: &str, path: &Path) -> anyhow::Result<Mount> {
        let remove_dir = !path.exists();
        fs::create_dir_all(path)?;
        let mut m = Mount {
            path: path.to_path_buf(),
            mounted: false,
            remove_dir,
        };
        let mut cmd = Command::new("mount");
        cmd.args(["-t", fstype]);
        if !options.is_empty() {
            cmd.args(["-o", options]);
        }
        let out = cmd.arg("none").arg(path).output()?;
        anyhow::ensure!(
            out.status.success(),
            "mount -t {fstype} {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        m.mounted = true;
        Ok(m)
    }

    pub fn remount(&self, options: &str) -> anyhow::Result<()> {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,{options}")])
            .arg(&self.path)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "remount {options}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    /// Unmounts now (retrying a few seconds while busy); the error says why it could not.
    pub fn unmount(&mut self) -> anyhow::Result<()> {
        if !self.mounted {
            return Ok(());
        }
        let mut last = String::new();
        for _ in 0..50 {
            let out = Command::new("umount").arg(&self.path).output()?;
            if out.status.success() {
                self.mounted = false;
                if self.remove_dir {
                    let _ = fs::remove_dir(&self.path);
                }
                return Ok(());
            }
            last = String::from_utf8_lossy(&out.stderr).trim().to_string();
            std::thread::sleep(Duration::from_millis(100));
        }
        anyhow::bail!("umount {}: {last}", self.path.display())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Err(e) = self.unmount() {
            eprintln!("cleanup: {e:#}");
        }
    }
}

/// True when a filesystem of type `fstype` is mounted exactly at `path`.
pub fn mounted_at(path: &Path, fstype: &str) -> bool {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-");
            f.get(4).is_some_and(|m| Path::new(m) == path)
                && sep.and_then(|s| f.get(s + 1)) == Some(&fstype)
        })
}

/// The metrics address the daemon announced in its log (http:// or, with TLS, https://).
pub fn metrics_addr(log: &Path) -> Option<SocketAddr> {
    fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.split("metrics on http").nth(1))
        .map(|r| r.trim_start_matches('s'))
        .and_then(|r| r.strip_prefix("://"))
        .and_then(|r| r.trim().strip_suffix("/metrics"))
        .and_then(|a| a.parse().ok())
}

/// Sends a raw request and returns (status, whole response). The server closes or times out.
pub fn http_raw(addr: SocketAddr, request: &[u8]) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(request)?;
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, raw))
}

/// The body of GET /metrics (classic text format), None unless 200.
pub fn scrape(addr: SocketAddr) -> Option<String> {
    let (status, raw) = http_raw(
        addr,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .ok()?;
    (status == 200).then(|| raw.split_once("\r\n\r\n").map(|(_, b)| b.to_string()))?
}

/// The value of one series (`name` or `name{labels}` exactly as rendered).
pub fn metric(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// `overkvm_vm_io_operations_total` of a VM, device and op.
pub fn vm_ops(body: &str, vm: &str, device: &str, op: &str) -> Option<f64> {
    metric(
        body,
        &format!("overkvm_vm_io_operations_total{{vm=\"{vm}\",device=\"{device}\",op=\"{op}\"}}"),
    )
}

/// Waits until the daemon serves metrics with at least `ticks` ticks; returns its address.
pub fn wait_serving(log: &Path, ticks: f64, timeout: Duration) -> Option<SocketAddr> {
    let mut addr = None;
    wait_until(timeout, || {
        addr = metrics_addr(log);
        addr.and_then(scrape)
            .and_then(|b| metric(&b, "overkvm_ticks_total"))
            .is_some_and(|t| t >= ticks)
    })
    .then_some(addr)
    .flatten()
}

/// VmRSS of a process in KiB (0 once it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A qemu-looking process (`iogen` copied as `qemu-system-x86_64` in `bin_dir`, with
/// `-name guest=NAME`) doing exactly `reads` and `writes` 4 KiB direct I/Os on
/// [start, start+len) of `dev`, then idling until killed (a VM is identified while it lives).
pub fn counted_vm(
    bin_dir: &Path,
    dev: &Path,
    name: &str,
    reads: u64,
    writes: u64,
    start: u64,
    len: u64,
) -> Child {
    let qemu = bin_dir.join("qemu-system-x86_64");
    if !qemu.exists() {
        fs::copy(workspace_bin("iogen"), &qemu).unwrap();
    }
    Command::new(&qemu)
        .arg(dev)
        .args([reads.to_string(), writes.to_string(), "4096".into()])
        .args([start.to_string(), len.to_string(), "7".into()])
        .arg("--hold")
        .args(["-name", &format!("guest={name},debug-threads=on")])
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

/// `overkvm-io serve` without a throttle config on a free loopback port, logging to `log`;
/// stopped with SIGTERM when dropped.
pub struct Serve {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
}

impl Serve {
    pub fn start(log: &Path, extra: &[&str]) -> Serve {
        let out = fs::File::create(log).unwrap();
        let child = Command::new(workspace_bin("overkvm-io"))
            .args(["serve", "--listen", "127.0.0.1:0", "-i", "0.5"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .unwrap();
        let mut s = Serve {
            child,
            addr: "127.0.0.1:1".parse().unwrap(),
            log: log.to_path_buf(),
        };
        // Two ticks: the first sample is in and what was in flight at attach has completed.
        match wait_serving(log, 2.0, Duration::from_secs(30)) {
            Some(a) => s.addr = a,
            None => panic!(
                "daemon not serving after 30 s:\n{}",
                fs::read_to_string(log).unwrap_or_default()
            ),
        }
        s
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        // SAFETY: plain syscall on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().ok()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if self.alive() {
            self.terminate();
        }
    }
}
