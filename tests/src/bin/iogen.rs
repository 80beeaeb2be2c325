//! `iogen PATH READS WRITES BLOCK START LEN SEED [--buffered]`: issues exactly READS reads and
//! WRITES writes of BLOCK bytes with O_DIRECT (or buffered writes with --buffered, no fsync),
//! one at a time, at pseudo-random even-numbered blocks of [START, START+LEN), then exits 0.
//! Used by the integration tests as a process with a known I/O count.

use std::{
    alloc::{Layout, alloc_zeroed, dealloc},
    fs::OpenOptions,
    os::unix::fs::{FileExt, OpenOptionsExt},
    process::ExitCode,
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
    ExitCode::from(rc)
}
