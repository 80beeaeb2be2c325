//! `execvm PATH MODE NAME [-name guest=NAME]`: a qemu stand-in (copied as `qemu-system-x86_64`)
//! whose command line changes while its PID, start time and comm stay the same, as /proc shows
//! a process around an exec. Each phase issues 20 direct 4 KiB reads of PATH, then prints the
//! phase's name on stdout and waits for a line (or EOF) on stdin.
//!
//! - `exec`: phase `before` with no `-name` (a qemu called `qemu-PID`), then it execs itself as
//!   `qemu-system-x86_64 PATH after NAME -name guest=NAME`, which runs phase `after` and exits.
//! - `blank` (started with `-name guest=NAME`): phase `blank` with its command line emptied
//!   (its `arg_end` set to its `arg_start` with `PR_SET_MM_MAP`: what /proc shows of a process inside its
//!   exec, between the new image and its argv), then it puts it back and runs phase `after`.

use std::{
    alloc::{Layout, alloc_zeroed, dealloc},
    fs::OpenOptions,
    io::{BufRead as _, Write as _},
    os::unix::{
        fs::{FileExt as _, OpenOptionsExt as _},
        process::CommandExt as _,
    },
    process::{Command, ExitCode},
};

const READS: u64 = 20;
const BLOCK: usize = 4096;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(path), Some(mode), Some(name)) = (args.get(1), args.get(2), args.get(3)) else {
        eprintln!("usage: execvm PATH exec|blank|after NAME [-name guest=NAME]");
        return ExitCode::from(2);
    };
    let result = match mode.as_str() {
        "exec" => phase(path, "before", 0).map(|()| {
            let err = Command::new(std::env::current_exe().expect("own executable"))
                .args([path, "after", name, "-name", &format!("guest={name}")])
                .exec();
            format!("exec: {err}")
        }),
        "blank" => {
            blank_phase(path).and_then(|()| phase(path, "after", 64).map(|()| String::new()))
        }
        "after" => phase(path, "after", 64).map(|()| String::new()),
        other => Err(format!("unknown mode {other}")),
    };
    match result {
        Ok(e) if e.is_empty() => ExitCode::SUCCESS,
        Ok(e) | Err(e) => {
            eprintln!("execvm: {e}");
            ExitCode::from(1)
        }
    }
}

/// 20 reads at even-numbered blocks from `first_block` (never adjacent: never merged), then
/// the phase's name on stdout and a line from stdin.
fn phase(path: &str, name: &str, first_block: u64) -> Result<(), String> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|e| format!("open {path}: {e}"))?;
    let layout = Layout::from_size_align(BLOCK, 4096).map_err(|e| e.to_string())?;
    // SAFETY: non-zero size; freed below with the same layout.
    let ptr = unsafe { alloc_zeroed(layout) };
    // SAFETY: ptr is valid for BLOCK bytes.
    let buf = unsafe { std::slice::from_raw_parts_mut(ptr, BLOCK) };
    let mut result = Ok(());
    for i in 0..READS {
        let off = (first_block + 2 * i) * BLOCK as u64;
        if let Err(e) = file.read_exact_at(buf, off) {
            result = Err(format!("read at {off}: {e}"));
            break;
        }
    }
    // SAFETY: allocated above with this layout.
    unsafe { dealloc(ptr, layout) };
    result?;
    println!("{name}");
    let _ = std::io::stdout().flush();
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    Ok(())
}

/// Phase `blank`: the command line reads empty while it runs.
fn blank_phase(path: &str) -> Result<(), String> {
    let mut map = mm_map()?;
    let end = map.arg_end;
    map.arg_end = map.arg_start;
    set_mm_map(&map)?;
    let ran = phase(path, "blank", 0);
    map.arg_end = end;
    set_mm_map(&map)?;
    ran
}

/// The kernel's `struct prctl_mm_map` (include/uapi/linux/prctl.h).
#[repr(C)]
#[derive(Default)]
struct PrctlMmMap {
    start_code: u64,
    end_code: u64,
    start_data: u64,
    end_data: u64,
    start_brk: u64,
    brk: u64,
    start_stack: u64,
    arg_start: u64,
    arg_end: u64,
    env_start: u64,
    env_end: u64,
    auxv: u64,
    auxv_size: u32,
    exe_fd: u32,
}

/// This process's memory layout as `PR_SET_MM_MAP` takes it: /proc/self/stat's fields
/// (startcode 26, endcode 27, startstack 28, start_data 45 ... env_end 51) and the current
/// break; the auxiliary vector and the exe link are left alone.
fn mm_map() -> Result<PrctlMmMap, String> {
    let stat = std::fs::read_to_string("/proc/self/stat").map_err(|e| e.to_string())?;
    let rest = &stat[stat.rfind(')').ok_or("stat: no ')'")? + 1..];
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    let field = |n: usize| -> Result<u64, String> {
        fields
            .get(n - 3)
            .and_then(|v| v.parse().ok())
            .ok_or(format!("stat: no field {n}"))
    };
    // SAFETY: sbrk(0) only reads the current break.
    let brk = unsafe { libc::sbrk(0) } as u64;
    Ok(PrctlMmMap {
        start_code: field(26)?,
        end_code: field(27)?,
        start_stack: field(28)?,
        start_data: field(45)?,
        end_data: field(46)?,
        start_brk: field(47)?,
        brk,
        arg_start: field(48)?,
        arg_end: field(49)?,
        env_start: field(50)?,
        env_end: field(51)?,
        auxv: 0,
        auxv_size: 0,
        exe_fd: u32::MAX,
    })
}

/// `prctl(PR_SET_MM, PR_SET_MM_MAP)`: the checkpoint/restore interface, which (unlike the
/// single-field `PR_SET_MM_ARG_END`) needs no CAP_SYS_RESOURCE.
fn set_mm_map(map: &PrctlMmMap) -> Result<(), String> {
    // SAFETY: the kernel reads size_of::<PrctlMmMap>() bytes from a valid struct.
    let rc = unsafe {
        libc::prctl(
            libc::PR_SET_MM,
            libc::PR_SET_MM_MAP as libc::c_ulong,
            map as *const PrctlMmMap as libc::c_ulong,
            size_of::<PrctlMmMap>() as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if rc != 0 {
        return Err(format!(
            "prctl(PR_SET_MM_MAP): {} (needs CONFIG_CHECKPOINT_RESTORE)",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}
