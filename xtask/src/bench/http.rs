//! `/metrics` under abuse (issue 9): `overkvm-io serve -i 1` sampling real I/O of VM
//! stand-ins while 1000 clients scrape it in a closed loop, then while 50 clients read their
//! answers one byte a second, one sends its request one byte a second and others send 1 MiB
//! headers and malformed requests. A monitor holding one keep-alive connection reads the
//! daemon's own tick figures every 100 ms (the lateness of every tick, from the
//! `overkvm_tick_lateness_seconds` gauge) and its VmRSS; the targets are the worst tick lateness
//! in each phase and the RSS bound.
//!
//! The clients stand in for remote scrapers but run on the daemon's 2 cores: the storm's
//! threads run at nice 10, so that they take the CPU the daemon's own serving needs as little
//! as remote clients would, and a probe thread at nice 0 that wakes every second records how
//! late the machine itself wakes a thread (the floor any tick lateness here stands on).

use std::{
    fmt::Write as _,
    fs,
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::{Command, Stdio},
    sync::{
        Arc, Barrier,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::{
    BenchArgs, Ctx, Section, Target,
    stats::{median, percentile},
    sys::{self, Daemon, LoopDev, Procs, progress},
};

const QEMU: &str = "qemu-system-x86_64";
const VMS: usize = 20;
const VM_IOPS: f64 = 100.0;
const WARMUP: Duration = Duration::from_secs(5);
const STORM_CLIENTS: usize = 1000;
const STORM_FOR: Duration = Duration::from_secs(10);
/// A refused storm client waits this long before its next try.
const STORM_BACKOFF: Duration = Duration::from_millis(100);
/// Niceness of the storm's client threads.
const STORM_NICE: i32 = 10;
const SLOW_CLIENTS: usize = 50;
const SLOW_FOR: Duration = Duration::from_secs(10);
const MONITOR_EVERY: Duration = Duration::from_millis(100);
/// Target: the tick stays on time. A tick is 1 s; 100 ms late is a tenth of it, far above
/// what scheduling noise on a loaded 2-core machine adds, far below a skipped tick.
const LATENESS_TARGET_MS: f64 = 100.0;
/// Target: RSS peak below 2x the RSS before the abuse + 64 MiB.
const RSS_SLACK_KIB: u64 = 64 * 1024;

const REQUEST: &str = "GET /metrics HTTP/1.1\r\nHost: bench\r\nAccept: text/plain\r\n";

/// The value of a series (`name` or `name{labels}` exactly) in a text exposition.
pub fn value(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Status, Content-Length and the offset of the body once a response head is complete.
pub fn parse_head(raw: &[u8]) -> Option<(u16, Option<usize>, usize)> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok());
    Some((status, len, end + 4))
}

/// How one scrape ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// 200 with all of its Content-Length.
    Complete,
    /// 503 (the connection cap), or closed or reset before any answer.
    Refused,
    /// Anything else: truncated, another status, a timeout.
    Broken,
}

/// Classifies what a `Connection: close` scrape read (`reset`: the read ended in a reset).
pub fn classify(raw: &[u8], reset: bool) -> Outcome {
    match parse_head(raw) {
        Some((200, Some(len), at)) if raw.len() - at == len => Outcome::Complete,
        Some((503, _, _)) => Outcome::Refused,
        None if raw.is_empty() => Outcome::Refused,
        _ if reset && raw.is_empty() => Outcome::Refused,
        _ => Outcome::Broken,
    }
}

fn is_reset(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
    )
}

/// One scrape on a fresh connection, read to the end.
fn scrape(addr: SocketAddr, timeout: Duration) -> Outcome {
    let mut s = match TcpStream::connect_timeout(&addr, timeout) {
        Ok(s) => s,
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => return Outcome::Refused,
        Err(_) => return Outcome::Broken,
    };
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    let wrote = s.write_all(format!("{REQUEST}Connection: close\r\n\r\n").as_bytes());
    let mut raw = Vec::new();
    let read = s.read_to_end(&mut raw);
    let reset = wrote.as_ref().is_err_and(is_reset) || read.as_ref().is_err_and(is_reset);
    if read.is_err() && !reset {
        return Outcome::Broken;
    }
    classify(&raw, reset)
}

/// One scrape on a kept-alive connection: the body.
fn scrape_keepalive(s: &mut TcpStream) -> anyhow::Result<String> {
    s.write_all(format!("{REQUEST}\r\n").as_bytes())?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 64 << 10];
    loop {
        if let Some((status, len, at)) = parse_head(&raw) {
            let len = len.context("no content-length")?;
            if raw.len() - at >= len {
                anyhow::ensure!(status == 200, "status {status}");
                return Ok(String::from_utf8_lossy(&raw[at..at + len]).into_owned());
            }
        }
        let n = s.read(&mut buf)?;
        anyhow::ensure!(n > 0, "closed");
        raw.extend_from_slice(&buf[..n]);
    }
}

/// What the monitor saw at one instant.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub at: Instant,
    pub rss_kib: Option<u64>,
    /// From the exposition, when the scrape worked: ticks, last lateness, worst lateness since
    /// start, last tick's duration (seconds), and how long the scrape took.
    pub tick: Option<TickSample>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TickSample {
    pub ticks: f64,
    pub lateness_s: f64,
    pub lateness_max_s: f64,
    pub duration_s: f64,
    pub scrape_ms: f64,
}

fn tick_sample(body: &str, scrape_ms: f64) -> Option<TickSample> {
    Some(TickSample {
        ticks: value(body, "overkvm_ticks_total")?,
        lateness_s: value(body, "overkvm_tick_lateness_seconds")?,
        lateness_max_s: value(body, "overkvm_tick_lateness_max_seconds")?,
        duration_s: value(body, "overkvm_tick_duration_seconds").unwrap_or(0.0),
        scrape_ms,
    })
}

/// Reads the daemon's figures every 100 ms over one kept-alive connection (reconnecting when
/// it is closed) until stopped.
struct Monitor {
    stop: Arc<AtomicBool>,
    handle: thread::JoinHandle<Vec<Sample>>,
}

impl Monitor {
    fn start(addr: SocketAddr, pid: u32) -> Monitor {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = thread::spawn(move || {
            let mut samples = Vec::new();
            let mut conn: Option<TcpStream> = None;
            while !flag.load(Ordering::Relaxed) {
                let at = Instant::now();
                if conn.is_none() {
                    conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                        .ok()
                        .inspect(|s| {
                            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                            let _ = s.set_nodelay(true);
                        });
                }
                let tick = conn.as_mut().and_then(|s| match scrape_keepalive(s) {
                    Ok(body) => tick_sample(&body, at.elapsed().as_secs_f64() * 1e3),
                    Err(_) => None,
                });
                if tick.is_none() {
                    conn = None;
                }
                samples.push(Sample {
                    at,
                    rss_kib: sys::status_kib(pid, "VmRSS"),
                    tick,
                });
                thread::sleep(MONITOR_EVERY.saturating_sub(at.elapsed()));
            }
            samples
        });
        Monitor { stop, handle }
    }

    fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

/// A thread that sleeps until every whole second after its start and records how late it
/// woke: what the machine's run queue alone does to a thread like the daemon's tick.
struct Probe {
    stop: Arc<AtomicBool>,
    handle: thread::JoinHandle<Vec<(Instant, f64)>>,
}

impl Probe {
    fn start() -> Probe {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = thread::spawn(move || {
            let start = Instant::now();
            let mut out = Vec::new();
            let mut k = 1u32;
            while !flag.load(Ordering::Relaxed) {
                let due = start + Duration::from_secs(1) * k;
                thread::sleep(due.saturating_duration_since(Instant::now()));
                let now = Instant::now();
                out.push((due, now.saturating_duration_since(due).as_secs_f64()));
                k += 1;
            }
            out
        });
        Probe { stop, handle }
    }

    fn finish(self) -> Vec<(Instant, f64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

/// The worst probe lateness of wake-ups due in [from, to], seconds.
pub fn probe_worst(probe: &[(Instant, f64)], from: Instant, to: Instant) -> Option<f64> {
    probe
        .iter()
        .filter(|(at, _)| *at >= from && *at <= to)
        .map(|(_, late)| *late)
        .reduce(f64::max)
}

/// The ticks of a window as the monitor saw them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Window {
    /// The worst lateness of a tick in the window, seconds.
    pub worst_lateness_s: Option<f64>,
    /// Ticks the daemon made in the window, and of them how many the monitor saw.
    pub ticks: f64,
    pub seen: usize,
    pub longest_tick_s: Option<f64>,
    pub rss_peak_kib: Option<u64>,
    /// The monitor's own keep-alive scrapes in the window: median and max, ms.
    pub monitor_p50_ms: Option<f64>,
    pub monitor_max_ms: Option<f64>,
}

/// Figures of the window [from, to] from the monitor's samples. Every tick's lateness is the
/// "last" gauge while that tick is the latest; a tick the monitor missed still shows in the
/// worst-since-start gauge, which only grows: when it grew within the window, that is the
/// window's worst.
pub fn window(samples: &[Sample], from: Instant, to: Instant) -> Window {
    let before = samples
        .iter()
        .filter(|s| s.at < from)
        .filter_map(|s| s.tick)
        .next_back();
    let inside: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at >= from && s.at <= to)
        .collect();
    let ticks_in: Vec<TickSample> = inside.iter().filter_map(|s| s.tick).collect();
    // Distinct ticks seen, each with its lateness and duration.
    let mut per_tick: Vec<TickSample> = Vec::new();
    for t in &ticks_in {
        if before.is_some_and(|b| b.ticks == t.ticks) {
            continue;
        }
        if per_tick.last().is_none_or(|l| l.ticks != t.ticks) {
            per_tick.push(*t);
        }
    }
    let observed = per_tick.iter().map(|t| t.lateness_s).reduce(f64::max);
    let max_before = before.map_or(0.0, |b| b.lateness_max_s);
    let max_after = ticks_in.last().map(|t| t.lateness_max_s);
    let worst = match (observed, max_after) {
        (_, Some(after)) if after > max_before => Some(after),
        (o, _) => o,
    };
    let scrape_ms: Vec<f64> = ticks_in.iter().map(|t| t.scrape_ms).collect();
    Window {
        worst_lateness_s: worst,
        ticks: match (before, ticks_in.last()) {
            (Some(b), Some(l)) => l.ticks - b.ticks,
            _ => f64::NAN,
        },
        seen: per_tick.len(),
        longest_tick_s: per_tick.iter().map(|t| t.duration_s).reduce(f64::max),
        rss_peak_kib: inside.iter().filter_map(|s| s.rss_kib).max(),
        monitor_p50_ms: median(&scrape_ms),
        monitor_max_ms: percentile(&scrape_ms, 100.0),
    }
}

/// One round of the storm.
struct Storm {
    complete: usize,
    refused: usize,
    broken: usize,
    wall_s: f64,
    latencies_ms: Vec<f64>,
}

fn storm(addr: SocketAddr) -> Storm {
    let barrier = Arc::new(Barrier::new(STORM_CLIENTS + 1));
    let clients: Vec<_> = (0..STORM_CLIENTS)
        .filter_map(|_| {
            let barrier = barrier.clone();
            thread::Builder::new()
                .stack_size(256 << 10)
                .spawn(move || {
                    // SAFETY: plain syscalls; on Linux the niceness of PRIO_PROCESS with a
                    // thread id is that thread's.
                    unsafe {
                        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
                        libc::setpriority(libc::PRIO_PROCESS, tid, STORM_NICE);
                    }
                    barrier.wait();
                    let end = Instant::now() + STORM_FOR;
                    let mut out = Vec::new();
                    while Instant::now() < end {
                        let t = Instant::now();
                        let o = scrape(addr, Duration::from_secs(30));
                        out.push((o, t.elapsed().as_secs_f64() * 1e3));
                        if o != Outcome::Complete {
                            thread::sleep(STORM_BACKOFF);
                        }
                    }
                    out
                })
                .ok()
        })
        .collect();
    let spawned = clients.len();
    if spawned < STORM_CLIENTS {
        // Let the barrier go with the clients that exist.
        for _ in spawned..STORM_CLIENTS {
            let b = barrier.clone();
            thread::spawn(move || b.wait());
        }
    }
    barrier.wait();
    let started = Instant::now();
    let mut s = Storm {
        complete: 0,
        refused: 0,
        broken: 0,
        wall_s: 0.0,
        latencies_ms: Vec::new(),
    };
    for c in clients {
        for (o, ms) in c.join().unwrap_or_default() {
            match o {
                Outcome::Complete => {
                    s.complete += 1;
                    s.latencies_ms.push(ms);
                }
                Outcome::Refused => s.refused += 1,
                Outcome::Broken => s.broken += 1,
            }
        }
    }
    s.wall_s = started.elapsed().as_secs_f64();
    s
}

/// One round of slow and hostile clients, with a legitimate scrape every second.
struct Slow {
    slow_started_200: usize,
    dribbler_hung_up_s: Option<f64>,
    oversized_sent: usize,
    oversized_served: usize,
    malformed_sent: usize,
    legit_ok: usize,
    legit_total: usize,
    legit_ms: Vec<f64>,
}

fn slow_round(addr: SocketAddr) -> Slow {
    let end = Instant::now() + SLOW_FOR;
    let readers: Vec<_> = (0..SLOW_CLIENTS)
        .map(|_| {
            thread::spawn(move || {
                let Ok(mut s) = TcpStream::connect(addr) else {
                    return false;
                };
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = s.write_all(format!("{REQUEST}\r\n").as_bytes());
                let mut got = Vec::new();
                let mut byte = [0u8; 1];
                while Instant::now() < end {
                    match s.read(&mut byte) {
                        Ok(1) => got.push(byte[0]),
                        _ => break,
                    }
                    thread::sleep(Duration::from_secs(1));
                }
                got.starts_with(b"HTTP/1.1 2")
            })
        })
        .collect();
    let dribbler = thread::spawn(move || {
        let started = Instant::now();
        let mut s = TcpStream::connect(addr).ok()?;
        let _ = s.set_read_timeout(Some(Duration::from_millis(900)));
        let req = format!("{REQUEST}User-Agent: one-byte-a-second\r\n\r\n");
        for b in req.bytes().cycle().take(40) {
            if s.write_all(&[b]).is_err() {
                return Some(started.elapsed().as_secs_f64());
            }
            let mut buf = [0u8; 256];
            match s.read(&mut buf) {
                Ok(_) => return Some(started.elapsed().as_secs_f64()),
                Err(e) if is_reset(&e) => return Some(started.elapsed().as_secs_f64()),
                Err(_) => {}
            }
            thread::sleep(Duration::from_millis(100));
        }
        None
    });
    let hostile = thread::spawn(move || {
        let big = format!("{REQUEST}X-Big: {}\r\n\r\n", "a".repeat(1 << 20)).into_bytes();
        let malformed: [&[u8]; 4] = [
            b"\x00\x01\x02\xff garbage\r\n\r\n",
            b"GET\r\n\r\n",
            b"GET /metrics HTTP/7.3\r\nHost: x\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nHost x\r\n\r\n",
        ];
        let (mut sent, mut served, mut bad) = (0, 0, 0);
        let mut i = 0;
        while Instant::now() < end {
            for req in [&big[..], malformed[i % malformed.len()]] {
                let Ok(mut s) = TcpStream::connect(addr) else {
                    continue;
                };
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = s.write_all(req);
                let mut raw = Vec::new();
                let _ = s.read_to_end(&mut raw);
                if req.len() > 1000 {
                    sent += 1;
                    served += usize::from(raw.starts_with(b"HTTP/1.1 200"));
                } else {
                    bad += 1;
                }
            }
            i += 1;
            thread::sleep(Duration::from_millis(200));
        }
        (sent, served, bad)
    });
    let mut legit_ms = Vec::new();
    let mut legit_total = 0;
    while Instant::now() < end {
        let t = Instant::now();
        legit_total += 1;
        if scrape(addr, Duration::from_secs(10)) == Outcome::Complete {
            legit_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        thread::sleep(Duration::from_secs(1).saturating_sub(t.elapsed()));
    }
    let slow_started_200 = readers
        .into_iter()
        .map(|h| h.join().unwrap_or(false))
        .filter(|ok| *ok)
        .count();
    let (oversized_sent, oversized_served, malformed_sent) = hostile.join().unwrap_or((0, 0, 0));
    Slow {
        slow_started_200,
        dribbler_hung_up_s: dribbler.join().ok().flatten(),
        oversized_sent,
        oversized_served,
        malformed_sent,
        legit_ok: legit_ms.len(),
        legit_total,
        legit_ms,
    }
}

fn raise_open_files() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn ms(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |v| format!("{v:.1} ms"))
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or("n/a".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
}

/// The VM stand-ins: copies of iogen named like qemu, trickling direct reads.
fn vms(ctx: &Ctx, dir: &Path, dev: &LoopDev, size: u64) -> anyhow::Result<(Procs, String)> {
    let qemu = dir.join(QEMU);
    fs::copy(&ctx.iogen, &qemu)
        .with_context(|| format!("copying {} (built?)", ctx.iogen.display()))?;
    let mut procs = Procs::default();
    let mut first = String::new();
    for i in 0..VMS {
        let mut c = Command::new(&qemu);
        c.arg(&dev.path)
            .args(["1099511627776", "0", "4096", "0", &size.to_string()])
            .arg((i + 1).to_string())
            .args(["--rate", &VM_IOPS.to_string()])
            .args([
                "-name",
                &format!("guest=vm{i:02},debug-threads=on"),
                "-uuid",
            ])
            .arg(format!("00000000-0000-4000-8000-{i:012}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if i == 0 {
            first = std::iter::once(c.get_program())
                .chain(c.get_args())
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ");
        }
        procs.0.push(c.spawn().context("starting a VM stand-in")?);
    }
    Ok((procs, first))
}

struct StormRow {
    storm: Storm,
    w: Window,
    probe_s: Option<f64>,
}

struct SlowRow {
    slow: Slow,
    w: Window,
    probe_s: Option<f64>,
}

pub fn run(ctx: &Ctx, args: &BenchArgs) -> anyhow::Result<Section> {
    sys::require_tools(&["losetup"])?;
    raise_open_files();
    let load_start = sys::loadavg();
    let started = sys::utc_now();
    let tmp = sys::TempDir::new("http")?;
    let size_mib = 64;
    let dev = LoopDev::new(size_mib, "http")?;
    let daemon = Daemon::start(&ctx.overkvm, "1", &tmp.0.join("daemon.log"))?;
    if !daemon.wait_metrics(Duration::from_secs(10))? {
        anyhow::bail!("/metrics does not answer:\n{}", daemon.log_tail());
    }
    let (procs, vm_example) = vms(ctx, &tmp.0, &dev, size_mib << 20)?;
    progress(format!(
        "http: overkvm-io serve -i 1, {VMS} VM stand-ins at {VM_IOPS} IOPS on {}; {} s warm-up",
        dev.name(),
        WARMUP.as_secs()
    ));
    let pid = daemon.pid();
    let monitor = Monitor::start(daemon.addr, pid);
    let probe = Probe::start();
    sys::sleep(WARMUP)?;
    let rss_before = sys::status_kib(pid, "VmRSS");
    let t_start = Instant::now();
    let mut storms = Vec::new();
    let mut slows = Vec::new();
    for round in 1..=args.rounds {
        sys::check_interrupt()?;
        progress(format!(
            "http: round {round}: {STORM_CLIENTS} clients scraping for {} s",
            STORM_FOR.as_secs()
        ));
        let from = Instant::now();
        let s = storm(daemon.addr);
        storms.push((from, Instant::now(), s));
        sys::sleep(Duration::from_secs(3))?;
        progress(format!(
            "http: round {round}: {SLOW_CLIENTS} slow readers, a header dribbler, 1 MiB headers \
             and malformed requests for {} s",
            SLOW_FOR.as_secs()
        ));
        let from = Instant::now();
        let s = slow_round(daemon.addr);
        slows.push((from, Instant::now(), s));
        sys::sleep(Duration::from_secs(2))?;
    }
    let t_end = Instant::now();
    sys::sleep(Duration::from_secs(5))?;
    let rss_after = sys::status_kib(pid, "VmRSS");
    let hwm = sys::status_kib(pid, "VmHWM");
    let final_text = sys::http_get(
        daemon.addr,
        "/metrics",
        sys::ACCEPT_TEXT,
        Duration::from_secs(10),
    )
    .ok()
    .filter(|r| r.0 == 200)
    .map(|r| String::from_utf8_lossy(&r.1).into_owned())
    .unwrap_or_default();
    let samples = monitor.finish();
    let probe = probe.finish();
    let alive = {
        let mut d = daemon;
        let alive = d.alive();
        let command = d.command.clone();
        d.stop();
        (alive, command)
    };
    let (daemon_alive, daemon_cmd) = alive;
    let (exited, _) = {
        let mut p = procs;
        p.exited()
    };
    drop(dev);
    let load_end = sys::loadavg();

    let storms: Vec<StormRow> = storms
        .into_iter()
        .map(|(from, to, storm)| StormRow {
            w: window(&samples, from, to),
            probe_s: probe_worst(&probe, from, to),
            storm,
        })
        .collect();
    let slows: Vec<SlowRow> = slows
        .into_iter()
        .map(|(from, to, slow)| SlowRow {
            w: window(&samples, from, to),
            probe_s: probe_worst(&probe, from, to),
            slow,
        })
        .collect();
    let whole = window(&samples, t_start, t_end);
    let rss_peak = whole.rss_peak_kib;

    let mut md = String::new();
    let mut targets = Vec::new();
    let _ = writeln!(md, "## 4. /metrics under abuse\n");
    let _ = writeln!(md, "{}", ctx.run_facts(&started, &load_start, &load_end));
    let _ = writeln!(
        md,
        "- daemon: `{daemon_cmd}`; {VMS} VM stand-ins (copies of `iogen` named `{QEMU}`) doing \
         {VM_IOPS} O_DIRECT 4 KiB reads per second each on a loop device over /dev/shm; first \
         one: `{vm_example}`\n\
         - storm: {STORM_CLIENTS} client threads at nice {STORM_NICE} released together, each \
         scraping in a closed loop for {} s: new connection, `GET /metrics` with `Connection: close`, read to the end \
         (a refused client waits {} ms before its next try). Complete = 200 with its whole \
         Content-Length; refused = 503 from the connection cap, or closed/reset before any \
         answer; broken = anything else\n\
         - slow clients: {SLOW_CLIENTS} clients send a scrape and read the answer one byte a \
         second for {} s; one sends `GET /metrics ...` one byte a second; one thread sends a \
         1 MiB header then a malformed request (garbage, no target, HTTP/7.3, a header without \
         colon) every 200 ms; a legitimate scrape every second\n\
         - monitor: one kept-alive connection opened before the abuse reads \
         `overkvm_ticks_total`, `overkvm_tick_lateness_seconds` (the last tick), \
         `overkvm_tick_lateness_max_seconds` (worst since start) and \
         `overkvm_tick_duration_seconds` every {} ms, plus the daemon's VmRSS. A window's worst \
         lateness is the worst tick the monitor saw in it, or the worst-since-start gauge when \
         that grew within the window (so a tick the monitor missed still counts)\n\
         - probe: a thread of the bench at nice 0 sleeping until each whole second; its worst \
         wake-up lateness in a window is what the machine's run queue alone does to a thread \
         like the daemon's tick\n\
         - {} rounds of storm then slow clients, 3 s and 2 s apart, after a {} s warm-up\n",
        STORM_FOR.as_secs(),
        STORM_BACKOFF.as_millis(),
        SLOW_FOR.as_secs(),
        MONITOR_EVERY.as_millis(),
        args.rounds,
        WARMUP.as_secs()
    );

    let _ = writeln!(md, "### {STORM_CLIENTS} concurrent clients\n");
    let _ = writeln!(
        md,
        "| round | complete | refused | broken | scrapes/s | p50 | p99 | max | worst tick lateness | probe's worst | longest tick | ticks (seen) | monitor scrape p50 / max | RSS peak |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for (i, r) in storms.iter().enumerate() {
        let s = &r.storm;
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {:.0} ({}) | {} / {} | {} |",
            i + 1,
            s.complete,
            s.refused,
            s.broken,
            s.complete as f64 / s.wall_s,
            ms(percentile(&s.latencies_ms, 50.0)),
            ms(percentile(&s.latencies_ms, 99.0)),
            ms(percentile(&s.latencies_ms, 100.0)),
            ms(r.w.worst_lateness_s.map(|v| v * 1e3)),
            ms(r.probe_s.map(|v| v * 1e3)),
            ms(r.w.longest_tick_s.map(|v| v * 1e3)),
            r.w.ticks,
            r.w.seen,
            ms(r.w.monitor_p50_ms),
            ms(r.w.monitor_max_ms),
            mib(r.w.rss_peak_kib),
        );
    }
    let med = |f: &dyn Fn(&StormRow) -> Option<f64>| {
        let v: Vec<f64> = storms.iter().filter_map(f).collect();
        median(&v)
    };
    let storm_rate = med(&|r| Some(r.storm.complete as f64 / r.storm.wall_s));
    let storm_p50 = med(&|r| percentile(&r.storm.latencies_ms, 50.0));
    let storm_p99 = med(&|r| percentile(&r.storm.latencies_ms, 99.0));
    let storm_refused = med(&|r| Some(r.storm.refused as f64));
    let storm_broken: usize = storms.iter().map(|r| r.storm.broken).sum();
    let storm_worst = storms
        .iter()
        .filter_map(|r| r.w.worst_lateness_s)
        .reduce(f64::max);
    let storm_probe = storms.iter().filter_map(|r| r.probe_s).reduce(f64::max);
    let _ = writeln!(
        md,
        "\nMedians over the rounds: {} complete scrapes/s, p50 {}, p99 {}, {} refused per round; \
         worst tick lateness over all storm rounds {} (the probe thread's worst: {}).\n",
        storm_rate.map_or("n/a".into(), |v| format!("{v:.0}")),
        ms(storm_p50),
        ms(storm_p99),
        storm_refused.map_or("n/a".into(), |v| format!("{v:.0}")),
        ms(storm_worst.map(|v| v * 1e3)),
        ms(storm_probe.map(|v| v * 1e3)),
    );

    let _ = writeln!(md, "### Slow and hostile clients\n");
    let _ = writeln!(
        md,
        "| round | slow readers that got a 200 head | dribbler hung up on after | 1 MiB headers sent / served | malformed sent | legitimate scrapes ok | their p50 / max | worst tick lateness | probe's worst | longest tick | ticks (seen) | RSS peak |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for (i, r) in slows.iter().enumerate() {
        let s = &r.slow;
        let _ = writeln!(
            md,
            "| {} | {} of {SLOW_CLIENTS} | {} | {} / {} | {} | {} of {} | {} / {} | {} | {} | {} | {:.0} ({}) | {} |",
            i + 1,
            s.slow_started_200,
            s.dribbler_hung_up_s
                .map_or("never".into(), |v| format!("{v:.1} s")),
            s.oversized_sent,
            s.oversized_served,
            s.malformed_sent,
            s.legit_ok,
            s.legit_total,
            ms(percentile(&s.legit_ms, 50.0)),
            ms(percentile(&s.legit_ms, 100.0)),
            ms(r.w.worst_lateness_s.map(|v| v * 1e3)),
            ms(r.probe_s.map(|v| v * 1e3)),
            ms(r.w.longest_tick_s.map(|v| v * 1e3)),
            r.w.ticks,
            r.w.seen,
            mib(r.w.rss_peak_kib),
        );
    }
    let slow_worst = slows
        .iter()
        .filter_map(|r| r.w.worst_lateness_s)
        .reduce(f64::max);
    let legit_failed: usize = slows
        .iter()
        .map(|r| r.slow.legit_total - r.slow.legit_ok)
        .sum();

    let counter = |s: &str| value(&final_text, s).map_or("n/a".into(), |v| format!("{v:.0}"));
    let _ = writeln!(
        md,
        "\nDaemon after all rounds: {} (alive at the end: {daemon_alive}); counted {} refused \
         connections, {} dropped as too slow, {} as oversized; worst tick lateness since start \
         {}, longest tick {}. VmRSS {} before the abuse, {} peak during it, {} 5 s after \
         (VmHWM {}). VM stand-ins exited early: {exited}.\n",
        if final_text.is_empty() {
            "/metrics did not answer"
        } else {
            "/metrics answered"
        },
        counter("overkvm_exporter_connections_refused_total"),
        counter(r#"overkvm_exporter_connections_dropped_total{reason="timeout"}"#),
        counter(r#"overkvm_exporter_connections_dropped_total{reason="oversized"}"#),
        ms(value(&final_text, "overkvm_tick_lateness_max_seconds").map(|v| v * 1e3)),
        ms(value(&final_text, "overkvm_tick_duration_max_seconds").map(|v| v * 1e3)),
        mib(rss_before),
        mib(rss_peak),
        mib(rss_after),
        mib(hwm),
    );
    let _ = writeln!(md, "Load average at the end of the section: {load_end}\n");

    targets.push(Target::new(
        "http: worst tick lateness, 1000 clients scraping",
        &format!("<= {LATENESS_TARGET_MS:.0} ms"),
        ms(storm_worst.map(|v| v * 1e3)),
        storm_worst.map(|v| v * 1e3 <= LATENESS_TARGET_MS),
    ));
    targets.push(Target::new(
        "http: worst tick lateness, slow and hostile clients",
        &format!("<= {LATENESS_TARGET_MS:.0} ms"),
        ms(slow_worst.map(|v| v * 1e3)),
        slow_worst.map(|v| v * 1e3 <= LATENESS_TARGET_MS),
    ));
    targets.push(Target::new(
        "http: every storm scrape complete or cleanly refused",
        "0 broken",
        format!("{storm_broken} broken"),
        Some(storm_broken == 0),
    ));
    targets.push(Target::new(
        "http: legitimate scrapes during slow clients",
        "all complete",
        format!("{legit_failed} failed"),
        Some(legit_failed == 0),
    ));
    let bound = rss_before.map(|b| 2 * b + RSS_SLACK_KIB);
    targets.push(Target::new(
        "http: daemon RSS peak bounded",
        "<= 2 x before + 64 MiB",
        format!("{} (bound {})", mib(rss_peak), mib(bound)),
        match (rss_peak, bound) {
            (Some(p), Some(b)) => Some(p <= b),
            _ => None,
        },
    ));
    md.push_str(&Target::table(&targets));
    Ok(Section {
        name: "http",
        markdown: md,
        targets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_are_classified() {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc";
        assert_eq!(classify(ok, false), Outcome::Complete);
        let short = b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nabc";
        assert_eq!(classify(short, true), Outcome::Broken);
        let refused = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(classify(refused, true), Outcome::Refused);
        assert_eq!(classify(b"", true), Outcome::Refused);
        assert_eq!(classify(b"", false), Outcome::Refused);
        assert_eq!(classify(b"HTTP/1.1 4", false), Outcome::Broken);
        assert_eq!(
            classify(b"HTTP/1.1 400 Bad\r\n\r\n", false),
            Outcome::Broken
        );
    }

    #[test]
    fn the_probe_window_takes_wake_ups_due_in_it() {
        let t = Instant::now();
        let s = |ms: u64| t + Duration::from_millis(ms);
        let probe = [(s(1000), 0.001), (s(2000), 0.2), (s(3000), 0.004)];
        assert_eq!(probe_worst(&probe, s(1500), s(3500)), Some(0.2));
        assert_eq!(probe_worst(&probe, s(2500), s(3500)), Some(0.004));
        assert_eq!(probe_worst(&probe, s(3500), s(4000)), None);
    }

    #[test]
    fn series_values_are_read_exactly() {
        let body = "overkvm_ticks_total 12\noverkvm_tick_lateness_seconds 0.003\n\
                    overkvm_tick_lateness_max_seconds 0.25\n";
        assert_eq!(value(body, "overkvm_ticks_total"), Some(12.0));
        assert_eq!(value(body, "overkvm_tick_lateness_seconds"), Some(0.003));
        assert_eq!(value(body, "overkvm_tick_lateness"), None);
    }

    fn sample(at: Instant, ticks: f64, late: f64, max: f64, rss: u64) -> Sample {
        Sample {
            at,
            rss_kib: Some(rss),
            tick: Some(TickSample {
                ticks,
                lateness_s: late,
                lateness_max_s: max,
                duration_s: 0.001,
                scrape_ms: 1.0,
            }),
        }
    }

    #[test]
    fn a_window_takes_its_own_ticks_and_ticks_the_monitor_missed() {
        let t = Instant::now();
        let s = |ms: u64| t + Duration::from_millis(ms);
        let samples = vec![
            // Before the window: tick 5 was 300 ms late (start-up).
            sample(s(0), 5.0, 0.3, 0.3, 100),
            sample(s(100), 5.0, 0.3, 0.3, 100),
            // In the window: ticks 6 and 7, 2 ms and 4 ms late.
            sample(s(200), 6.0, 0.002, 0.3, 120),
            sample(s(300), 6.0, 0.002, 0.3, 150),
            sample(s(1200), 7.0, 0.004, 0.3, 130),
            // After it.
            sample(s(2500), 8.0, 0.9, 0.9, 500),
        ];
        let w = window(&samples, s(150), s(1300));
        assert_eq!(w.worst_lateness_s, Some(0.004));
        assert_eq!(w.ticks, 2.0);
        assert_eq!(w.seen, 2);
        assert_eq!(w.rss_peak_kib, Some(150));
        // A tick the monitor missed shows in the worst-since-start gauge.
        let mut missed = samples.clone();
        missed[4] = sample(s(1200), 8.0, 0.004, 0.45, 130);
        let w = window(&missed, s(150), s(1300));
        assert_eq!(w.worst_lateness_s, Some(0.45));
        assert_eq!((w.ticks, w.seen), (3.0, 2));
        // A window with no sample says so.
        let w = window(&samples, s(1300), s(1400));
        assert_eq!(w.worst_lateness_s, None);
        assert!(w.ticks.is_nan());
    }
}
