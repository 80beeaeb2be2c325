//! `fakevm -name guest=NAME -uuid UUID -drive file=PATH[,...] --reads R --writes W
//!  [--final-reads R2] [--final-writes W2] [--block B] [--start S] [--len L] [--seed X]`
//!
//! A stand-in for a qemu process: the exporter tests copy it as `qemu-system-x86_64`, so argv[0],
//! `/proc/PID/exe` and comm say qemu, and the identity layer reads `-name` and `-uuid` as for
//! a real VM. It issues exactly W writes then R reads of B bytes with O_DIRECT on PATH, one at
//! a time, at pseudo-random even-numbered blocks of [S, S+L) (never adjacent, so never merged),
//! prints `ready`, waits for a line (or EOF) on stdin, issues the final W2 writes and R2 reads
//! the same way and exits 0 at once: its last I/O lands between two samples of a daemon.

use std::{
    alloc::{Layout, alloc_zeroed, dealloc},
    fs::{File, OpenOptions},
    io::{BufRead, Write},
    os::unix::fs::{FileExt, OpenOptionsExt},
    process::ExitCode,
};

struct Plan {
    drive: String,
    reads: u64,
    writes: u64,
    final_reads: u64,
    final_writes: u64,
    block: u64,
    start: u64,
    len: u64,
    seed: u64,
}

fn parse(args: &[String]) -> Result<Plan, String> {
    let mut p = Plan {
        drive: String::new(),
        reads: 0,
        writes: 0,
        final_reads: 0,
        final_writes: 0,
        block: 4096,
        start: 0,
        len: 16 << 20,
        seed: 0x2545_f491,
    };
    let mut i = 1;
    while i < args.len() {
        let value = args
            .get(i + 1)
            .ok_or_else(|| format!("{} needs a value", args[i]))?;
        let num = || {
            value
                .parse::<u64>()
                .map_err(|_| format!("{} {value}: not a number", args[i]))
        };
        match args[i].as_str() {
            // Read by the identity layer, not here.
            "-name" | "-uuid" | "-machine" | "-m" => {}
            "-drive" => {
                let file = value
                    .split(',')
                    .find_map(|kv| kv.strip_prefix("file="))
                    .ok_or("-drive without file=")?;
                p.drive = file.to_string();
            }
            "--reads" => p.reads = num()?,
            "--writes" => p.writes = num()?,
            "--final-reads" => p.final_reads = num()?,
            "--final-writes" => p.final_writes = num()?,
            "--block" => p.block = num()?,
            "--start" => p.start = num()?,
            "--len" => p.len = num()?,
            "--seed" => p.seed = num()?.max(1),
            other => return Err(format!("unknown argument {other}")),
        }
        i += 2;
    }
    if p.drive.is_empty() {
        return Err("no -drive file=PATH".into());
    }
    if p.block == 0 || !p.block.is_multiple_of(4096) {
        return Err("--block must be a multiple of 4096".into());
    }
    Ok(p)
}

/// Direct I/O on one file, at even-numbered blocks of a region.
struct Disk {
    file: File,
    buf: *mut u8,
    layout: Layout,
    start: u64,
    block: u64,
    slots: u64,
    seed: u64,
}

impl Disk {
    fn open(p: &Plan) -> Result<Disk, String> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&p.drive)
            .map_err(|e| format!("open {}: {e}", p.drive))?;
        let layout =
            Layout::from_size_align(p.block as usize, 4096).map_err(|e| format!("layout: {e}"))?;
        // SAFETY: the layout has a non-zero size; freed in Drop.
        let buf = unsafe { alloc_zeroed(layout) };
        if buf.is_null() {
            return Err("out of memory".into());
        }
        Ok(Disk {
            file,
            buf,
            layout,
            start: p.start,
            block: p.block,
            slots: (p.len / p.block / 2).max(1),
            seed: p.seed,
        })
    }

    fn next_offset(&mut self) -> u64 {
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        self.start + (self.seed % self.slots) * 2 * self.block
    }

    fn run(&mut self, writes: u64, reads: u64) -> Result<(), String> {
        // SAFETY: buf is valid for block bytes while self lives.
        let buf = unsafe { std::slice::from_raw_parts_mut(self.buf, self.block as usize) };
        for i in 0..writes + reads {
            let off = self.next_offset();
            let r = if i < writes {
                self.file.write_all_at(buf, off)
            } else {
                self.file.read_exact_at(buf, off)
            };
            r.map_err(|e| format!("I/O at {off}: {e}"))?;
        }
        Ok(())
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        // SAFETY: allocated in open with this layout.
        unsafe { dealloc(self.buf, self.layout) };
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let plan = match parse(&args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("fakevm: {e}");
            return ExitCode::from(2);
        }
    };
    let result = Disk::open(&plan).and_then(|mut disk| {
        disk.run(plan.writes, plan.reads)?;
        let mut out = std::io::stdout();
        writeln!(out, "ready")
            .and_then(|()| out.flush())
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        let _ = std::io::stdin().lock().read_line(&mut line);
        disk.run(plan.final_writes, plan.final_reads)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fakevm: {e}");
            ExitCode::from(1)
        }
    }
}
