//! `iogen PATH READS WRITES BLOCK START LEN SEED [--buffered] [--rate IOPS] [--hold]`: issues
//! exactly READS reads and WRITES writes of BLOCK bytes with O_DIRECT (or buffered writes with
//! --buffered, no fsync), one at a time, at pseudo-random even-numbered blocks of
//! [START, START+LEN), then exits 0. Used by the integration tests as a process with a known I/O
//! count.
//!
//! `--rate IOPS` paces the I/Os at that many per second (a trickle; a start phase derived from
//! SEED spreads many such processes over the second, and a process that falls behind does not
//! burst to catch up). `--hold` keeps the process alive after its last I/O until it is killed
//! (a VM that did some I/O and now sits idle). Any other argument after the first seven is
//! ignored, so a copy named `qemu-system-x86_64` can carry `-name guest=X -uuid U`.

use std::{
    alloc::{Layout, alloc_zeroed, dealloc},
    fs::OpenOptions,
    os::unix::fs::{FileExt, OpenOptionsExt},
    process::ExitCode,
    time::{Duration, Instant},
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 8 {
        eprintln!("usage: iogen PATH READS WRITES BLOCK START LEN SEED [--buffered]");
        return ExitCode::from(2);
    }
    let num = |i: usize| -> u64 {
        args[i]
            .parse()
            .unwrap_or_else(|_| panic!("bad number {}", args[i]))
    };
    let (reads, writes, block, start, len, mut seed) =
        (num(2), num(3), num(4), num(5), num(6), num(7));
    let buffered = args.iter().any(|a| a == "--buffered");
    let hold = args[8..].iter().any(|a| a == "--hold");
    let rate = match option_value(&args[8..], "--rate").map(str::parse::<f64>) {
        None => None,
        Some(Ok(r)) if r > 0.0 && r.is_finite() => Some(r),
        Some(_) => {
            eprintln!("iogen: --rate needs a positive number of I/Os per second");
            return ExitCode::from(2);
        }
    };
    let mut opts = OpenOptions::new();
    opts.read(true).write(true);
    if buffered {
        opts.create(true);
    } else {
        opts.custom_flags(libc::O_DIRECT);
    }
    let file = match opts.open(&args[1]) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("iogen: open {}: {e}", args[1]);
            return ExitCode::from(1);
        }
    };
    let layout = Layout::from_size_align(block as usize, 4096).expect("layout");
    // SAFETY: layout has non-zero size; freed below.
    let ptr = unsafe { alloc_zeroed(layout) };
    // SAFETY: ptr is valid for block bytes.
    let buf = unsafe { std::slice::from_raw_parts_mut(ptr, block as usize) };
    buf.iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = (i % 251) as u8);
    let mut pace = rate.map(|r| Pacer::new(r, seed));
    // Even-numbered blocks only: never adjacent to another I/O, so never merged.
    let slots = (len / block / 2).max(1);
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        start + (seed % slots) * 2 * block
    };
    let mut rc = 0u8;
    for i in 0..(reads + writes) {
        if let Some(p) = pace.as_mut() {
            p.wait();
        }
        let off = if buffered { start + i * block } else { next() };
        let r = if i < writes {
            file.write_all_at(buf, off)
        } else {
            file.read_exact_at(buf, off)
        };
        if let Err(e) = r {
            eprintln!("iogen: I/O at {off}: {e}");
            rc = 1;
            break;
        }
    }
    // SAFETY: allocated above with the same layout.
    unsafe { dealloc(ptr, layout) };
    if hold && rc == 0 {
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    ExitCode::from(rc)
}

/// The value following `name` among `args`, if any.
fn option_value<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

/// Spaces I/Os `1/rate` seconds apart from a per-process phase, without catch-up bursts.
struct Pacer {
    period: Duration,
    next: Instant,
}

impl Pacer {
    fn new(rate: f64, seed: u64) -> Pacer {
        let period = Duration::from_secs_f64(1.0 / rate);
        // A phase in [0, period) from the seed, so many trickles do not fire together.
        let phase = period.mul_f64((seed % 1000) as f64 / 1000.0);
        Pacer {
            period,
            next: Instant::now() + phase,
        }
    }

    fn wait(&mut self) {
        let now = Instant::now();
        if self.next > now {
            std::thread::sleep(self.next - now);
        } else if now - self.next > self.period {
            // Fell behind by more than one period: start again from now instead of bursting.
            self.next = now;
        }
        self.next += self.period;
    }
}
