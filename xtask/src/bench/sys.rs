//! The thin layer that touches the machine: signals, child processes, loop devices, the
//! sysctl and the tracefs mount, each behind a guard that undoes it on drop (so on errors,
//! on Ctrl-C and on panics alike), plus readers for /proc and bpftool.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::stats::{self, MapInfo, ProgInfo};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT, SIGTERM and SIGHUP set a flag instead of killing us, so the guards can clean up.
/// (On Ctrl-C the terminal signals our children too; they stop on their own.)
pub fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}

/// An error once a stop signal came.
pub fn check_interrupt() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted: cleaning up");
    }
    Ok(())
}

/// Sleeps, waking early with an error on a stop signal.
pub fn sleep(d: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + d;
    loop {
        check_interrupt()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep((end - now).min(Duration::from_millis(100)));
    }
}

/// Prints a progress line.
pub fn progress(msg: impl AsRef<str>) {
    eprintln!("bench: {}", msg.as_ref());
}

/// Runs a command to completion and returns its stdout; an error with its stderr on failure.
pub fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// First line of a tool's version output, or "not found".
pub fn tool_version(program: &str, arg: &str) -> String {
    Command::new(program)
        .arg(arg)
        .output()
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_else(|| "not found".into())
}

fn in_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()))
}

/// Tools only the bench uses, with their Debian package (`cargo xtask setup --test-deps`
/// installs the others).
const BENCH_PACKAGES: [(&str, &str); 1] = [("bpftool", "bpftool")];

/// Installs the bench's own tools when missing (saying so), then checks every tool is there.
pub fn require_tools(tools: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = BENCH_PACKAGES
        .iter()
        .filter(|(tool, _)| tools.contains(tool) && !in_path(tool))
        .map(|(_, pkg)| *pkg)
        .collect();
    if !missing.is_empty() && in_path("apt-get") {
        progress(format!(
            "installing Debian packages for the bench: {}",
            missing.join(" ")
        ));
        let apt = |args: &[&str]| {
            let mut c = Command::new("apt-get");
            c.env("DEBIAN_FRONTEND", "noninteractive").args(args);
            c
        };
        output(&mut apt(&["update", "-qq"]))?;
        output(apt(&["install", "-y", "-qq"]).args(&missing))?;
    }
    for t in tools {
        if !in_path(t) {
            bail!("{t} not found in PATH (cargo xtask setup --test-deps installs the test tools)");
        }
    }
    Ok(())
}

/// Waits for a child, polling so that a stop signal ends it (SIGTERM, then SIGKILL) instead of
/// waiting for it; `timeout` kills it too.
pub fn wait_child(child: &mut Child, timeout: Duration, what: &str) -> anyhow::Result<ExitStatus> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st);
        }
        let interrupted = check_interrupt().is_err();
        if interrupted || Instant::now() >= end {
            stop_child(child, libc::SIGTERM, Duration::from_secs(5));
            if interrupted {
                check_interrupt()?;
            }
            bail!("{what} did not finish within {timeout:?}: killed");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends `sig`, waits up to `grace`, then SIGKILL; always reaps.
pub fn stop_child(child: &mut Child, sig: libc::c_int, grace: Duration) -> Option<ExitStatus> {
    if let Ok(Some(st)) = child.try_wait() {
        return Some(st);
    }
    // SAFETY: plain syscall on our own child's pid (not yet reaped, so not reused).
    unsafe { libc::kill(child.id() as libc::pid_t, sig) };
    let end = Instant::now() + grace;
    while Instant::now() < end {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait().ok()
}

/// Children killed (SIGKILL) and reaped on drop: VM stand-ins.
#[derive(Default)]
pub struct Procs(pub Vec<Child>);

impl Procs {
    /// How many have exited, and the first non-zero status among them.
    pub fn exited(&mut self) -> (usize, Option<ExitStatus>) {
        let mut n = 0;
        let mut bad = None;
        for c in &mut self.0 {
            if let Ok(Some(st)) = c.try_wait() {
                n += 1;
                if !st.success() && bad.is_none() {
                    bad = Some(st);
                }
            }
        }
        (n, bad)
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> anyhow::Result<TempDir> {
        let p = std::env::temp_dir().join(format!("overkvm-bench-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A loop device over a file in /dev/shm, filled with data (so reads hit real page-cache
/// pages, not holes), detached and deleted on drop.
pub struct LoopDev {
    pub path: PathBuf,
    backing: PathBuf,
}

impl LoopDev {
    pub fn new(size_mib: u64, tag: &str) -> anyhow::Result<LoopDev> {
        let backing = PathBuf::from(format!(
            "/dev/shm/overkvm-bench-{}-{tag}.img",
            std::process::id()
        ));
        let fill = || -> anyhow::Result<()> {
            let mut f = fs::File::create(&backing)?;
            let chunk: Vec<u8> = (0..1usize << 20).map(|i| (i % 251) as u8 | 1).collect();
            for _ in 0..size_mib {
                f.write_all(&chunk)?;
            }
            Ok(())
        };
        if let Err(e) = fill() {
            let _ = fs::remove_file(&backing);
            return Err(e.context(format!("writing {}", backing.display())));
        }
        // `losetup -f` races with others creating loop devices: retry a few times.
        let mut last = None;
        for _ in 0..5 {
            match output(Command::new("losetup").args(["-f", "--show"]).arg(&backing)) {
                Ok(p) => {
                    return Ok(LoopDev {
                        path: PathBuf::from(p.trim()),
                        backing,
                    });
                }
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = fs::remove_file(&backing);
        Err(last.unwrap_or_else(|| anyhow::anyhow!("losetup failed")))
    }

    /// "loopN"
    pub fn name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup")
            .arg("-d")
            .arg(&self.path)
            .stderr(Stdio::null())
            .status();
        let _ = fs::remove_file(&self.backing);
    }
}

/// A sysctl set for the bench and restored to its old value on drop.
pub struct Sysctl {
    path: PathBuf,
    old: String,
}

impl Sysctl {
    pub fn set(name: &str, value: &str) -> anyhow::Result<Sysctl> {
        let path = PathBuf::from("/proc/sys").join(name.replace('.', "/"));
        let old = fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .trim()
            .to_string();
        fs::write(&path, value).with_context(|| format!("setting {name}={value}"))?;
        Ok(Sysctl { path, old })
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        if let Err(e) = fs::write(&self.path, &self.old) {
            eprintln!(
                "bench: could not restore {} to {}: {e}",
                self.path.display(),
                self.old
            );
        }
    }
}

/// tracefs at /sys/kernel/tracing, mounted for the bench only when it was not (and then
/// unmounted on drop).
pub struct Tracefs {
    mounted_by_us: bool,
}

const TRACEFS: &str = "/sys/kernel/tracing";

impl Tracefs {
    pub fn ensure() -> anyhow::Result<Tracefs> {
        let present = |p: &str| Path::new(p).join("events").is_dir();
        if present(TRACEFS) || present("/sys/kernel/debug/tracing") {
            return Ok(Tracefs {
                mounted_by_us: false,
            });
        }
        output(Command::new("mount").args(["-t", "tracefs", "nodev", TRACEFS]))
            .context("mounting tracefs (bpftrace needs it)")?;
        progress(format!(
            "mounted tracefs on {TRACEFS} (unmounted at the end)"
        ));
        Ok(Tracefs {
            mounted_by_us: true,
        })
    }
}

impl Drop for Tracefs {
    fn drop(&mut self) {
        if self.mounted_by_us
            && let Err(e) = output(Command::new("umount").arg(TRACEFS))
        {
            eprintln!("bench: could not unmount {TRACEFS}: {e:#}");
        }
    }
}

/// BPF program and map ids a process holds open (from /proc/PID/fdinfo).
pub fn owned_bpf_ids(pid: u32) -> (Vec<u32>, Vec<u32>) {
    let mut progs = BTreeSet::new();
    let mut maps = BTreeSet::new();
    if let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fdinfo")) {
        for e in dir.flatten() {
            if let Ok(text) = fs::read_to_string(e.path()) {
                let (p, m) = stats::parse_fdinfo_ids(&text);
                progs.extend(p);
                maps.extend(m);
            }
        }
    }
    (progs.into_iter().collect(), maps.into_iter().collect())
}

pub fn bpftool_progs() -> anyhow::Result<Vec<ProgInfo>> {
    let out = output(Command::new("bpftool").args(["prog", "show", "-j"]))?;
    stats::parse_bpftool_progs(&out).map_err(anyhow::Error::msg)
}

pub fn bpftool_maps() -> anyhow::Result<Vec<MapInfo>> {
    let out = output(Command::new("bpftool").args(["map", "show", "-j"]))?;
    stats::parse_bpftool_maps(&out).map_err(anyhow::Error::msg)
}

/// Completed I/Os per device, now.
pub fn diskstats() -> BTreeMap<String, u64> {
    stats::parse_diskstats(&fs::read_to_string("/proc/diskstats").unwrap_or_default())
}

/// Whole disks (what /sys/block lists; partitions would count twice).
pub fn whole_disks() -> BTreeSet<String> {
    fs::read_dir("/sys/block")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

pub fn cpu_ticks(pid: u32) -> Option<u64> {
    stats::parse_stat_cpu_ticks(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// CPU ticks of a process's threads, by thread name.
pub fn thread_ticks(pid: u32) -> BTreeMap<String, u64> {
    let texts: Vec<String> = fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| fs::read_to_string(e.path().join("stat")).ok())
                .collect()
        })
        .unwrap_or_default();
    stats::ticks_by_comm(texts.iter().map(String::as_str))
}

pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    stats::parse_status_kib(
        &fs::read_to_string(format!("/proc/{pid}/status")).ok()?,
        field,
    )
}

pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: plain libc call.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// The 1, 5 and 15 minute load averages as `/proc/loadavg` prints them.
pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

pub fn load1() -> f64 {
    loadavg()
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// What Prometheus sends.
pub const ACCEPT_OPENMETRICS: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
pub const ACCEPT_TEXT: &str = "text/plain";

/// One GET on a fresh connection: status, body, and the time from connect to the last byte.
pub fn http_get(
    addr: SocketAddr,
    path: &str,
    accept: &str,
    timeout: Duration,
) -> anyhow::Result<(u16, Vec<u8>, Duration)> {
    let started = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: {accept}\r\nUser-Agent: overkvm-bench\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let took = started.elapsed();
    let (status, body) = stats::parse_http_response(&raw).map_err(anyhow::Error::msg)?;
    Ok((status, body, took))
}

/// `overkvm-io serve` as production runs it, stopped with SIGTERM on drop.
pub struct Daemon {
    child: Child,
    pub addr: SocketAddr,
    log: PathBuf,
    pub command: String,
}

impl Daemon {
    /// Starts it and waits until its programs are attached ("metrics on" printed and program
    /// fds open).
    pub fn start(bin: &Path, interval: &str, log: &Path) -> anyhow::Result<Daemon> {
        Daemon::start_on(bin, interval, log, None)
    }

    /// `start`, with the daemon's threads kept on `cpu` when given.
    pub fn start_on(
        bin: &Path,
        interval: &str,
        log: &Path,
        cpu: Option<usize>,
    ) -> anyhow::Result<Daemon> {
        let port = free_port()?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let args = [
            "serve".to_string(),
            "--listen".into(),
            addr.to_string(),
            "-i".into(),
            interval.into(),
        ];
        let command = format!("{} {}", bin.display(), args.join(" "));
        let mut cmd = Command::new(bin);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(log)?);
        if let Some(cpu) = cpu {
            pin_to_cpu(&mut cmd, cpu);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut d = Daemon {
            child,
            addr,
            log: log.to_path_buf(),
            command,
        };
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            check_interrupt()?;
            if let Some(st) = d.child.try_wait()? {
                bail!("overkvm-io serve exited ({st}):\n{}", d.log_tail());
            }
            let said = fs::read_to_string(&d.log)
                .unwrap_or_default()
                .contains("metrics on");
            if said && !owned_bpf_ids(d.pid()).0.is_empty() {
                return Ok(d);
            }
            if Instant::now() >= end {
                bail!(
                    "overkvm-io serve did not attach within 60 s:\n{}",
                    d.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Waits until `/metrics` answers 200; false after `timeout`.
    pub fn wait_metrics(&self, timeout: Duration) -> anyhow::Result<bool> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            check_interrupt()?;
            if let Ok((200, _, _)) =
                http_get(self.addr, "/metrics", ACCEPT_TEXT, Duration::from_secs(2))
            {
                return Ok(true);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(false)
    }

    /// SIGTERM (it removes anything it set), SIGKILL after 15 s.
    pub fn stop(mut self) -> Option<ExitStatus> {
        let st = stop_child(&mut self.child, libc::SIGTERM, Duration::from_secs(15));
        std::mem::forget(self);
        st
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        stop_child(&mut self.child, libc::SIGTERM, Duration::from_secs(15));
    }
}

/// The peer: bpftrace counting per PID, stopped with SIGINT on drop.
pub struct Bpftrace {
    child: Child,
    out: PathBuf,
}

/// The one-program peer: a count per PID, the least a per-process tool can do.
pub const PEER_PROGRAM: &str = "tracepoint:block:block_io_start { @[pid] = count(); }";

/// The "same work" peer, as biotop does it: a count per PID at the start, and a latency
/// histogram from the start to the end of each request (named by device and sector, which a
/// request that completes whole keeps).
pub const SAME_WORK_PROGRAM: &str = "tracepoint:block:block_io_start { @ios[pid] = count(); \
     @start[args->dev, args->sector] = nsecs; } \
     tracepoint:block:block_io_done /@start[args->dev, args->sector]/ { \
     @lat = hist(nsecs - @start[args->dev, args->sector]); \
     delete(@start[args->dev, args->sector]); }";

/// Keeps the child's threads on `cpu` (set between fork and exec).
pub fn pin_to_cpu(cmd: &mut Command, cpu: usize) {
    // SAFETY: only async-signal-safe libc calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

impl Bpftrace {
    /// Runs `program`, on `cpu` when given, until dropped.
    pub fn start(program: &str, out: &Path, cpu: Option<usize>) -> anyhow::Result<Bpftrace> {
        let mut cmd = Command::new("bpftrace");
        cmd.args(["-e", program])
            .stdin(Stdio::null())
            .stdout(fs::File::create(out)?)
            .stderr(Stdio::from(fs::File::options().append(true).open(out)?));
        if let Some(cpu) = cpu {
            pin_to_cpu(&mut cmd, cpu);
        }
        // bpftrace raises RLIMIT_MEMLOCK itself and complains when it cannot; give the child an
        // unlimited one when we may, else the hard limit (kernels since 5.11 charge BPF memory
        // to the memory cgroup, not to this limit).
        // SAFETY: only async-signal-safe libc calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                let inf = libc::rlimit {
                    rlim_cur: libc::RLIM_INFINITY,
                    rlim_max: libc::RLIM_INFINITY,
                };
                if libc::setrlimit(libc::RLIMIT_MEMLOCK, &inf) != 0 {
                    let mut cur = libc::rlimit {
                        rlim_cur: 0,
                        rlim_max: 0,
                    };
                    if libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut cur) == 0 {
                        cur.rlim_cur = cur.rlim_max;
                        libc::setrlimit(libc::RLIMIT_MEMLOCK, &cur);
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().context("starting bpftrace")?;
        let mut b = Bpftrace {
            child,
            out: out.to_path_buf(),
        };
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            check_interrupt()?;
            if let Some(st) = b.child.try_wait()? {
                bail!(
                    "bpftrace exited ({st}):\n{}",
                    fs::read_to_string(&b.out).unwrap_or_default()
                );
            }
            if !owned_bpf_ids(b.pid()).0.is_empty() {
                return Ok(b);
            }
            if Instant::now() >= end {
                bail!("bpftrace did not attach within 60 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Bpftrace {
    fn drop(&mut self) {
        stop_child(&mut self.child, libc::SIGINT, Duration::from_secs(10));
    }
}

/// Facts about the machine for the report.
pub struct Machine {
    pub kernel: String,
    pub cpu: String,
    pub cores: usize,
    pub memory: String,
    pub commit: String,
}

impl Machine {
    pub fn probe(root: &Path) -> Machine {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|v| v.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "?".into());
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0);
        let mem_kib = stats::parse_status_kib(
            &fs::read_to_string("/proc/meminfo").unwrap_or_default(),
            "MemTotal",
        )
        .unwrap_or(0);
        let kernel = output(Command::new("uname").arg("-srvm"))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "?".into());
        let commit = output(
            Command::new("git")
                .arg("-C")
                .arg(root)
                .args(["describe", "--always", "--dirty"]),
        )
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
        Machine {
            kernel,
            cpu,
            cores,
            memory: format!("{:.1} GiB", mem_kib as f64 / (1024.0 * 1024.0)),
            commit,
        }
    }
}

/// The current UTC time as `YYYY-MM-DD HH:MM:SSZ`.
pub fn utc_now() -> String {
    output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M:%SZ"]))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}
