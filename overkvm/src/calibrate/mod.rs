//! `overkvm-io calibrate DEVICE`: what a device really does. Random 4 KiB IOPS and latency at
//! increasing queue depths and sequential bandwidth, reads only unless the operator passes
//! `--write` for a scratch device; then a suggested `[[device]]` block.
//!
//! The I/O is synchronous `pread`/`pwrite` with O_DIRECT, one thread per I/O kept in flight:
//! the simplest way to hold an exact queue depth with no extra dependency, and at the depths
//! measured (up to 64) the cost of a thread switch is well under a device's latency. `model`
//! holds the maths; this file opens, reads /proc and sysfs, and runs threads.

pub mod model;

use std::{
    fs::{self, File, OpenOptions},
    io::{IsTerminal as _, Write as _},
    os::unix::fs::{FileExt as _, OpenOptionsExt as _},
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use self::model::{DiskCounters, OthersLoad, Pattern, Step, Suggestion};
use crate::{devices::DeviceTable, sample::Histogram, stats};

/// What `overkvm-io calibrate` measures (the command line fills it in).
#[derive(Clone, Debug)]
pub struct CalibrateOptions {
    /// The device: name, /dev path or MAJ:MIN.
    pub device: String,
    /// Measure writes too (destroys the data: scratch devices only).
    pub write: bool,
    /// Queue depths of the random-I/O steps.
    pub depths: Vec<u32>,
    /// Seconds per step.
    pub seconds: f64,
    /// JSON instead of the table.
    pub json: bool,
}

/// Everything a calibration found.
#[derive(Debug, serde::Serialize)]
pub struct Calibration {
    pub device: String,
    pub size_bytes: u64,
    pub steps: Vec<Step>,
    /// Why the run stopped before its last step, if it did.
    pub stopped_early: Option<String>,
    pub suggestion: Option<Suggestion>,
}

const RANDOM_BS: u64 = 4096;
const SEQ_BS: u64 = 1 << 20;
/// Depth of the sequential steps: enough to stream on most devices.
const SEQ_DEPTH: u32 = 4;

/// Runs `overkvm-io calibrate`.
pub fn run(args: &CalibrateOptions) -> anyhow::Result<()> {
    if !(args.seconds.is_finite() && (0.1..=600.0).contains(&args.seconds)) {
        bail!("--seconds must be between 0.1 and 600");
    }
    if args.depths.is_empty() || args.depths.iter().any(|d| !(1..=256).contains(d)) {
        bail!("--depths must be between 1 and 256");
    }
    let cal = calibrate(args)?;
    if args.json {
        println!("{}", serde_json::to_string(&cal)?);
    } else {
        print_table(&cal);
    }
    Ok(())
}

struct Target {
    name: String,
    major: u32,
    minor: u32,
    file: File,
    size: u64,
}

/// The whole disk and its partitions, by number, from sysfs.
fn device_and_partitions(name: &str) -> Vec<(u32, u32, String)> {
    let mut out = Vec::new();
    let base = PathBuf::from("/sys/class/block").join(name);
    let num = |p: PathBuf| -> Option<(u32, u32)> {
        let t = fs::read_to_string(p).ok()?;
        let (a, b) = t.trim().split_once(':')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    };
    if let Some((a, b)) = num(base.join("dev")) {
        out.push((a, b, name.to_string()));
    }
    if let Ok(rd) = fs::read_dir(&base) {
        for e in rd.flatten() {
            let p = e.path();
            if p.join("partition").exists()
                && let Some((a, b)) = num(p.join("dev"))
            {
                out.push((a, b, e.file_name().to_string_lossy().into_owned()));
            }
        }
    }
    out
}

/// Why writing to this device would destroy something in use, if it would.
fn in_use(name: &str) -> Option<String> {
    let parts = device_and_partitions(name);
    let nums: Vec<(u32, u32)> = parts.iter().map(|(a, b, _)| (*a, *b)).collect();
    let mounts = fs::read_to_string("/proc/self/mountinfo")
        .map(|t| model::mounts_of(&t, &nums))
        .unwrap_or_default();
    if !mounts.is_empty() {
        return Some(format!("it is mounted on {}", mounts.join(", ")));
    }
    for (_, _, p) in &parts {
        let holders = PathBuf::from("/sys/class/block").join(p).join("holders");
        if fs::read_dir(&holders).is_ok_and(|mut d| d.next().is_some()) {
            return Some(format!(
                "{p} is held by another driver (see {})",
                holders.display()
            ));
        }
    }
    let swaps = fs::read_to_string("/proc/swaps").unwrap_or_default();
    for (_, _, p) in &parts {
        if swaps
            .lines()
            .any(|l| l.split_whitespace().next() == Some(&format!("/dev/{p}")))
        {
            return Some(format!("/dev/{p} is used as swap"));
        }
    }
    None
}

fn open_target(args: &CalibrateOptions) -> anyhow::Result<Target> {
    let mut table = DeviceTable::new();
    let info = table.resolve(&args.device)?;
    let path = PathBuf::from("/dev").join(&info.name);
    if args.write {
        if info.dev != info.disk_dev {
            bail!(
                "{} is a partition of {}: --write takes a whole scratch disk",
                info.name,
                info.disk
            );
        }
        if let Some(why) = in_use(&info.name) {
            bail!(
                "refusing to write to {}: {why}. --write destroys the data on the device; \
                 use a scratch device nothing else uses",
                info.name
            );
        }
    }
    let mut opts = OpenOptions::new();
    opts.read(true).custom_flags(libc::O_DIRECT);
    if args.write {
        // O_EXCL on a block device: the kernel refuses it while the device is mounted or
        // claimed, closing the race with a mount after the checks above.
        opts.write(true).custom_flags(libc::O_DIRECT | libc::O_EXCL);
    }
    let file = opts
        .open(&path)
        .with_context(|| format!("opening {} for direct I/O", path.display()))?;
    let size = fs::read_to_string(format!("/sys/class/block/{}/size", info.name))
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
        .map(|sectors| sectors * 512)
        .with_context(|| format!("reading the size of {}", info.name))?;
    if size < SEQ_BS * 4 {
        bail!("{} is too small to calibrate ({size} bytes)", info.name);
    }
    Ok(Target {
        name: info.name.clone(),
        major: info.major,
        minor: info.minor,
        file,
        size,
    })
}

fn diskstats(t: &Target) -> anyhow::Result<DiskCounters> {
    let text = fs::read_to_string("/proc/diskstats").context("reading /proc/diskstats")?;
    model::parse_diskstats(&text, t.major, t.minor)
        .with_context(|| format!("{} is not in /proc/diskstats", t.name))
}

/// A page-aligned buffer for O_DIRECT.
struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> anyhow::Result<AlignedBuf> {
        let layout = std::alloc::Layout::from_size_align(len, 4096)?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            bail!("cannot allocate {len} bytes");
        }
        Ok(AlignedBuf { ptr, layout })
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is a live allocation of layout.size() bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in `new`.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// One worker's results.
#[derive(Default)]
struct Worker {
    hist: Histogram,
    ops: u64,
    latency_ns: u128,
}

/// Keeps `depth` I/Os of `pattern` in flight for `secs`.
fn run_step(t: &Target, pattern: Pattern, depth: u32, secs: f64) -> anyhow::Result<Worker> {
    let bs = if matches!(pattern, Pattern::SeqRead | Pattern::SeqWrite) {
        SEQ_BS
    } else {
        RANDOM_BS
    };
    let blocks = t.size / bs;
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let failed = AtomicBool::new(false);
    let results: Vec<anyhow::Result<Worker>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..depth)
            .map(|i| {
                let failed = &failed;
                s.spawn(move || -> anyhow::Result<Worker> {
                    let mut buf = AlignedBuf::new(bs as usize)?;
                    if pattern.is_write() {
                        // Not all zeroes: a device that compresses or dedups zeroes would
                        // look faster than it is for real data.
                        for (j, b) in buf.as_mut().iter_mut().enumerate() {
                            *b = (j as u8).wrapping_mul(31).wrapping_add(i as u8);
                        }
                    }
                    let mut w = Worker::default();
                    let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ ((i as u64 + 1) << 17);
                    // Sequential workers each stream through their own stretch of the device.
                    let stretch = (blocks / depth as u64).max(1);
                    let mut next = stretch * i as u64;
                    while Instant::now() < deadline && !failed.load(Ordering::Relaxed) {
                        let block = if matches!(pattern, Pattern::SeqRead | Pattern::SeqWrite) {
                            let b = next % blocks;
                            next += 1;
                            b
                        } else {
                            seed ^= seed << 13;
                            seed ^= seed >> 7;
                            seed ^= seed << 17;
                            seed % blocks
                        };
                        let off = block * bs;
                        let t0 = Instant::now();
                        let r = if pattern.is_write() {
                            t.file.write_at(buf.as_mut(), off)
                        } else {
                            t.file.read_at(buf.as_mut(), off)
                        };
                        let ns = t0.elapsed().as_nanos();
                        match r {
                            Ok(n) if n as u64 == bs => {}
                            Ok(n) => {
                                failed.store(true, Ordering::Relaxed);
                                bail!("short {} of {n} bytes at offset {off}", pattern.label());
                            }
                            Err(e) => {
                                failed.store(true, Ordering::Relaxed);
                                return Err(e).with_context(|| {
                                    format!("{} at offset {off} on {}", pattern.label(), t.name)
                                });
                            }
                        }
                        w.hist.record(ns.min(u64::MAX as u128) as u64, 1);
                        w.latency_ns += ns;
                        w.ops += 1;
                    }
                    Ok(w)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("an I/O thread panicked")))
            })
            .collect()
    });
    let mut total = Worker::default();
    for r in results {
        let w = r?;
        total.hist.merge(&w.hist);
        total.ops += w.ops;
        total.latency_ns += w.latency_ns;
    }
    Ok(total)
}

/// A one-line progress bar on stderr, only on a terminal.
struct Progress {
    on: bool,
    total: f64,
    done: f64,
}

impl Progress {
    fn show(&self, what: &str) {
        if !self.on {
            return;
        }
        let frac = (self.done / self.total).clamp(0.0, 1.0);
        let width = 30;
        let filled = (frac * width as f64).round() as usize;
        let mut err = std::io::stderr();
        let _ = write!(
            err,
            "\r[{}{}] {:>3.0}%  {what:<24}",
            "#".repeat(filled),
            "-".repeat(width - filled),
            frac * 100.0
        );
        let _ = err.flush();
    }

    fn finish(&self) {
        if self.on {
            let _ = write!(std::io::stderr(), "\r{:70}\r", "");
        }
    }
}

/// Measures the device (see the module doc).
pub fn calibrate(args: &CalibrateOptions) -> anyhow::Result<Calibration> {
    let t = open_target(args)?;
    let mut plan: Vec<(Pattern, u32)> = args
        .depths
        .iter()
        .map(|d| (Pattern::RandRead, *d))
        .collect();
    plan.push((Pattern::SeqRead, SEQ_DEPTH));
    if args.write {
        plan.extend(args.depths.iter().map(|d| (Pattern::RandWrite, *d)));
        plan.push((Pattern::SeqWrite, SEQ_DEPTH));
    }
    // Others' latency before we add any load: the reference for stopping early.
    let baseline_secs = args.seconds.min(1.0);
    let mut progress = Progress {
        on: std::io::stderr().is_terminal() && !args.json,
        total: baseline_secs + args.seconds * plan.len() as f64,
        done: 0.0,
    };
    progress.show("baseline (idle)");
    let before = diskstats(&t)?;
    std::thread::sleep(Duration::from_secs_f64(baseline_secs));
    let baseline = model::others_load(&diskstats(&t)?.delta(&before), 0, 0);
    progress.done += baseline_secs;

    let mut steps = Vec::new();
    let mut stopped_early = None;
    for (pattern, depth) in plan {
        progress.show(&format!("{} depth {depth}", pattern.label()));
        let before = diskstats(&t)?;
        let started = Instant::now();
        let w = run_step(&t, pattern, depth, args.seconds)?;
        let secs = started.elapsed().as_secs_f64();
        let delta = diskstats(&t)?.delta(&before);
        progress.done += args.seconds;
        let bs = if matches!(pattern, Pattern::SeqRead | Pattern::SeqWrite) {
            SEQ_BS
        } else {
            RANDOM_BS
        };
        // A 1 MiB read can reach diskstats as several requests (max_sectors_kb): our share of
        // the count is known only for the 4 KiB random steps, so only they judge others.
        let others = if bs == RANDOM_BS {
            model::others_load(&delta, w.ops, w.latency_ns)
        } else {
            OthersLoad::default()
        };
        steps.push(Step {
            pattern,
            block_size: bs,
            depth,
            seconds: secs,
            ops: w.ops,
            iops: w.ops as f64 / secs,
            mb_per_s: (w.ops * bs) as f64 / secs / 1e6,
            lat_avg_us: stats::mean_us(&w.hist),
            lat_p50_us: stats::quantile_us(&w.hist, 0.5),
            lat_p95_us: stats::quantile_us(&w.hist, 0.95),
            lat_p99_us: stats::quantile_us(&w.hist, 0.99),
            device_ops: if pattern.is_write() {
                delta.writes
            } else {
                delta.reads
            },
            others,
        });
        if let Some(why) = model::stop_reason(&baseline, &others) {
            stopped_early = Some(why);
            break;
        }
    }
    progress.finish();
    Ok(Calibration {
        suggestion: model::suggest(&t.name, &steps),
        device: t.name,
        size_bytes: t.size,
        steps,
        stopped_early,
    })
}

fn print_table(c: &Calibration) {
    let ms = |v: Option<f64>| {
        v.map(|v| format!("{:.3}", v / 1000.0))
            .unwrap_or_else(|| "-".into())
    };
    println!(
        "{} ({:.1} GiB)\n",
        c.device,
        c.size_bytes as f64 / (1u64 << 30) as f64
    );
    println!(
        "{:<10} {:>6} {:>5} {:>10} {:>9} {:>8} {:>8} {:>8} {:>10} {:>10}",
        "test", "bs", "depth", "IOPS", "MB/s", "p50 ms", "p95 ms", "p99 ms", "diskstats", "others"
    );
    for s in &c.steps {
        let bs = if s.block_size >= 1 << 20 {
            format!("{}M", s.block_size >> 20)
        } else {
            format!("{}k", s.block_size >> 10)
        };
        let others = match s.others {
            _ if s.block_size != RANDOM_BS => "-".to_string(),
            OthersLoad {
                avg_latency_us: Some(l),
                ..
            } => format!("{:.2}ms", l / 1000.0),
            OthersLoad { ops, .. } => format!("{ops} ops"),
        };
        println!(
            "{:<10} {:>6} {:>5} {:>10.0} {:>9.1} {:>8} {:>8} {:>8} {:>10} {:>10}",
            s.pattern.label(),
            bs,
            s.depth,
            s.iops,
            s.mb_per_s,
            ms(s.lat_p50_us),
            ms(s.lat_p95_us),
            ms(s.lat_p99_us),
            s.device_ops,
            others
        );
    }
    if let Some(why) = &c.stopped_early {
        println!("\n{why}");
    }
    match &c.suggestion {
        Some(s) => println!(
            "\nSuggested (IOPS budget at 90% of the peak; latency target at the p95 of the \
             shallowest depth reaching 90% of the peak, plus 20%):\n\n{}",
            s.toml
        ),
        None => println!("\nNo suggestion: no random-read step completed any I/O."),
    }
}
