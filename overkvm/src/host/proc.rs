//! The one reader of `/proc/PID`: stat, cmdline, comm, cgroup, status and the thread list.
//!
//! Every other module asks here, so each file is read with the same cap and parsed by the same
//! strict parser. Parsers take bytes and never panic: a process can exit or be replaced while
//! we read, and comm, argv and cgroup names are chosen by whoever runs the process, so every
//! input is untrusted. [`ProcessDir`] is the thin reading layer; the `parse_*` functions are
//! pure.

use std::{
    io,
    path::{Path, PathBuf},
};

use super::{decimal_u32, read_capped};
use crate::host::cgroup::IoController;

/// `PF_KTHREAD` in the stat `flags` field (include/linux/sched.h). Kernel threads such as
/// `kvm-pit/1234` must never be taken for a VM, whatever their name.
pub const PF_KTHREAD: u32 = 0x0020_0000;

// Caps on bytes read per file; each is well above what a genuine file holds.
const STAT_MAX: usize = 4 << 10;
/// qemu command lines with many `-blockdev` JSON arguments reach tens of KiB; anything past
/// 1 MiB is dropped (options qemu managers put first, like `-name` and `-id`, survive).
const CMDLINE_MAX: usize = 1 << 20;
const CGROUP_MAX: usize = 64 << 10;
/// A task's comm is at most 15 bytes, but kernel threads show longer names (a workqueue
/// worker's adds its workqueue, a kthread's full name is up to 64 bytes).
const COMM_MAX: usize = 256;
const STATUS_MAX: usize = 16 << 10;

/// Why a /proc file could not be parsed. Static text keeps the error path allocation-free.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub &'static str);

/// Why a process's file gave no answer. Callers branch on it: a file that cannot be read means
/// the process is gone (or was never there); one that reads but does not parse is hostile or
/// cut short, and the caller decides whether the rest of what it read still stands.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    // The I/O error is in the text, not a `source`, so that an error chain prints it once.
    #[error("reading {}: {error}", path.display())]
    Unreadable { path: PathBuf, error: io::Error },
    #[error("{}: {reason}", path.display())]
    Malformed { path: PathBuf, reason: ParseError },
}

/// One process's directory: `/proc/PID` on the host, or the same layout under a fake root.
#[derive(Clone, Debug)]
pub struct ProcessDir {
    pid: u32,
    dir: PathBuf,
}

impl ProcessDir {
    /// `/proc/PID` of the host.
    pub fn host(pid: u32) -> ProcessDir {
        ProcessDir::under(Path::new("/proc"), pid)
    }

    /// `proc_root/PID`, so tests can use a fake tree.
    pub fn under(proc_root: &Path, pid: u32) -> ProcessDir {
        ProcessDir {
            pid,
            dir: proc_root.join(pid.to_string()),
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The path of one of the process's files.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// True while the process exists (in this PID namespace).
    pub fn exists(&self) -> bool {
        self.dir.exists()
    }

    fn read(&self, name: &str, cap: usize) -> Result<(Vec<u8>, bool), ProcError> {
        let path = self.file(name);
        read_capped(&path, cap).map_err(|error| ProcError::Unreadable { path, error })
    }

    fn malformed(&self, name: &str, reason: ParseError) -> ProcError {
        ProcError::Malformed {
            path: self.file(name),
            reason,
        }
    }

    /// `stat`, checked to be this PID's: a file naming another PID is malformed.
    pub fn stat(&self) -> Result<Stat, ProcError> {
        let (raw, _) = self.read("stat", STAT_MAX)?;
        let stat = parse_stat(&raw).map_err(|e| self.malformed("stat", e))?;
        if stat.pid != self.pid {
            return Err(self.malformed("stat", ParseError("stat: another pid")));
        }
        Ok(stat)
    }

    /// `cmdline` as arguments. An argument cut short by the cap is dropped: a partial value is
    /// worse than none.
    pub fn cmdline(&self) -> Result<Vec<String>, ProcError> {
        let (raw, truncated) = self.read("cmdline", CMDLINE_MAX)?;
        let mut argv = parse_cmdline(&raw);
        if truncated {
            argv.pop();
        }
        Ok(argv)
    }

    /// `comm`, without the kernel's newline.
    pub fn comm(&self) -> Result<String, ProcError> {
        self.read("comm", COMM_MAX).map(|(raw, _)| parse_comm(&raw))
    }

    /// `cgroup`, every hierarchy's line (see [`parse_cgroup`] for what is rejected).
    pub fn cgroups(&self) -> Result<Vec<CgroupEntry>, ProcError> {
        let (raw, _) = self.read("cgroup", CGROUP_MAX)?;
        parse_cgroup(&raw).map_err(|e| self.malformed("cgroup", e))
    }

    /// The `exe` link's target; unreadable for zombies and, without privileges, for other
    /// users' processes.
    pub fn exe(&self) -> Option<PathBuf> {
        std::fs::read_link(self.file("exe")).ok()
    }

    /// A `kB` field of `status` (`VmRSS`, ...), in KiB.
    pub fn status_kib(&self, field: &str) -> Option<u64> {
        let (raw, _) = self.read("status", STATUS_MAX).ok()?;
        parse_status_kib(&raw, field)
    }

    /// The process's threads (`task/TID`), each readable like a process.
    pub fn threads(&self) -> Vec<ProcessDir> {
        let task = self.file("task");
        let Ok(entries) = std::fs::read_dir(&task) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str().and_then(decimal_u32))
            .map(|tid| ProcessDir::under(&task, tid))
            .collect()
    }
}

/// True while the host's /proc has the process (host PID namespace).
pub fn alive(pid: u32) -> bool {
    ProcessDir::host(pid).exists()
}

/// The start time of a live process (field 22 of stat, clock ticks since boot), which with the
/// PID identifies a process across PID reuse.
pub fn start_time(pid: u32) -> Option<u64> {
    ProcessDir::host(pid).stat().ok().map(|s| s.start_time)
}

/// The PIDs in the host's /proc, ascending.
pub fn pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str().and_then(decimal_u32))
        .collect();
    pids.sort_unstable();
    pids
}

/// A process's cgroup in the hierarchy of the given block controller interface: the `blkio`
/// line's path for v1, the `0::` line's for v2 (on a hybrid host the two differ). None when the
/// process is gone, the file is malformed, or it has no such line.
pub fn block_cgroup(pid: u32, api: IoController) -> Option<String> {
    let entries = ProcessDir::host(pid).cgroups().ok()?;
    block_cgroup_path(&entries, api).map(str::to_owned)
}

/// The fields of `/proc/PID/stat` the resolver needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stat {
    pub pid: u32,
    /// Task name, exactly as between the parentheses (lossy UTF-8).
    pub comm: String,
    pub state: char,
    pub ppid: u32,
    /// Field 9, `PF_*` bits.
    pub flags: u32,
    /// Field 22, clock ticks since boot.
    pub start_time: u64,
}

impl Stat {
    pub fn is_kernel_thread(&self) -> bool {
        self.flags & PF_KTHREAD != 0
    }

    /// Exited and not yet reaped (`Z`), or being torn down (`X`): its memory, hence its
    /// command line, is gone.
    pub fn is_zombie(&self) -> bool {
        matches!(self.state, 'Z' | 'X')
    }
}

/// Parses `/proc/PID/stat`.
///
/// comm may contain spaces, parentheses and newlines, so it runs from the first `(` to the
/// LAST `)`: nothing after comm can contain a `)`. A truncated file is an error; so is a file
/// that ends right after the start time, which could be a start time cut short.
pub fn parse_stat(buf: &[u8]) -> Result<Stat, ParseError> {
    let open = buf
        .iter()
        .position(|&b| b == b'(')
        .ok_or(ParseError("stat: no '('"))?;
    let close = buf
        .iter()
        .rposition(|&b| b == b')')
        .filter(|&c| c > open)
        .ok_or(ParseError("stat: no ')' after comm"))?;
    let pid = std::str::from_utf8(&buf[..open])
        .ok()
        .and_then(|s| decimal_u32(s.trim()))
        .ok_or(ParseError("stat: bad pid"))?;
    let comm = String::from_utf8_lossy(&buf[open + 1..close]).into_owned();
    let rest = std::str::from_utf8(&buf[close + 1..]).map_err(|_| ParseError("stat: not ASCII"))?;
    // rest[0] is field 3 (state); field N is at index N - 3.
    let mut fields = rest.split_ascii_whitespace();
    let mut next = |skip: usize| fields.nth(skip).ok_or(ParseError("stat: truncated"));
    let state_field = next(0)?;
    let ppid = next(0)?;
    let flags = next(4)?;
    let start_time = next(12)?;
    // Field 23 (vsize) must follow: without it the start time itself may be cut short.
    next(0)?;
    let mut state_chars = state_field.chars();
    let state = match (state_chars.next(), state_chars.next()) {
        (Some(c), None) => c,
        _ => return Err(ParseError("stat: bad state")),
    };
    Ok(Stat {
        pid,
        comm,
        state,
        ppid: ppid.parse().map_err(|_| ParseError("stat: bad ppid"))?,
        flags: flags.parse().map_err(|_| ParseError("stat: bad flags"))?,
        start_time: start_time
            .parse()
            .map_err(|_| ParseError("stat: bad start time"))?,
    })
}

/// Splits `/proc/PID/cmdline` into arguments.
///
/// The kernel NUL-terminates each argument, but a process that rewrote its argv may drop the
/// final NUL; zombies and kernel threads give an empty file (no arguments). Bytes are converted
/// lossily and otherwise kept as they are: quotes, newlines and escapes are data.
pub fn parse_cmdline(buf: &[u8]) -> Vec<String> {
    if buf.is_empty() {
        return Vec::new();
    }
    let buf = buf.strip_suffix(b"\0").unwrap_or(buf);
    buf.split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// Parses `/proc/PID/comm`: the name plus one newline added by the kernel.
pub fn parse_comm(buf: &[u8]) -> String {
    let buf = buf.strip_suffix(b"\n").unwrap_or(buf);
    String::from_utf8_lossy(buf).into_owned()
}

/// One line of `/proc/PID/cgroup`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupEntry {
    /// Hierarchy id; 0 is the unified (v2) hierarchy.
    pub hierarchy: u32,
    /// Comma-separated controllers (v1), `name=...` for named hierarchies, empty for v2.
    pub controllers: String,
    pub path: String,
}

impl CgroupEntry {
    pub fn has_controller(&self, name: &str) -> bool {
        self.controllers.split(',').any(|c| c == name)
    }
}

/// Parses `/proc/PID/cgroup` (`hierarchy-ID:controller-list:path` per line).
///
/// The path is everything after the second `:`, so it may itself contain `:`. The kernel
/// prints cgroup names unescaped, and on a host with delegated subtrees an unprivileged user
/// can name a cgroup `x\n0::/machine.slice/...` to forge a line. Every hierarchy appears once in
/// a genuine file, so a repeated hierarchy id or a line that is not `N:list:/path` rejects the
/// whole file rather than guess which line is real.
pub fn parse_cgroup(buf: &[u8]) -> Result<Vec<CgroupEntry>, ParseError> {
    let text = String::from_utf8_lossy(buf);
    let text = text.strip_suffix('\n').unwrap_or(&text);
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let mut entries: Vec<CgroupEntry> = Vec::new();
    for line in text.split('\n') {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(ParseError("cgroup: line without two ':'"));
        };
        let hierarchy = decimal_u32(id).ok_or(ParseError("cgroup: bad hierarchy id"))?;
        if !path.starts_with('/') {
            return Err(ParseError("cgroup: path not absolute"));
        }
        if entries.iter().any(|e| e.hierarchy == hierarchy) {
            return Err(ParseError("cgroup: hierarchy listed twice"));
        }
        entries.push(CgroupEntry {
            hierarchy,
            controllers: controllers.to_owned(),
            path: path.to_owned(),
        });
    }
    Ok(entries)
}

/// The path block I/O is charged to and limited in: the hierarchy of the block controller.
///
/// A `blkio` line exists only when the controller is bound to a v1 hierarchy (a controller
/// lives in one hierarchy at a time), and then the v2 hierarchy of a hybrid host has no `io`
/// controller: the blkio path is the one `blkio.throttle.*` and the charged bios use. Without
/// one, the v2 (`0::`) path; else "".
pub fn io_cgroup_path(entries: &[CgroupEntry]) -> &str {
    block_cgroup_path(entries, IoController::V1)
        .or_else(|| block_cgroup_path(entries, IoController::V2))
        .unwrap_or("")
}

/// The path of the line for one block controller interface: `blkio` for v1, `0::` for v2.
pub fn block_cgroup_path(entries: &[CgroupEntry], api: IoController) -> Option<&str> {
    entries
        .iter()
        .find(|e| match api {
            IoController::V1 => e.has_controller("blkio"),
            IoController::V2 => e.hierarchy == 0 && e.controllers.is_empty(),
        })
        .map(|e| e.path.as_str())
}

/// Parses one `Name:   N kB` field of `/proc/PID/status`.
pub fn parse_status_kib(buf: &[u8], field: &str) -> Option<u64> {
    let text = std::str::from_utf8(buf).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    const QEMU_STAT: &[u8] = b"8611 (qemu-system-x86) S 1 8610 8610 0 -1 1077936448 203040 0 12 0 \
        45713 12790 0 0 20 0 7 0 3412345 4321984512 290765 18446744073709551615 1 1 0 0 0 0 \
        268444224 4096 25155 0 0 0 17 2 0 0 0 0 0 0 0 0 0 0 0 0 0\n";

    #[test]
    fn stat_real_qemu_line() {
        let s = parse_stat(QEMU_STAT).unwrap();
        assert_eq!(s.pid, 8611);
        assert_eq!(s.comm, "qemu-system-x86");
        assert_eq!(s.state, 'S');
        assert_eq!(s.ppid, 1);
        assert_eq!(s.flags, 1077936448);
        assert_eq!(s.start_time, 3412345);
        assert!(!s.is_kernel_thread());
    }

    #[test]
    fn stat_kernel_thread() {
        let line = b"1234 (kvm-pit/1233) S 2 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0 987 0 0 \
            18446744073709551615 0 0 0 0 0 0 0 2147483647 0 0 0 0 17 3 0 0 0 0 0 0 0 0 0 0 0 0 0\n";
        let s = parse_stat(line).unwrap();
        assert_eq!(s.comm, "kvm-pit/1233");
        assert!(s.is_kernel_thread());
        assert_eq!(s.start_time, 987);
    }

    #[test]
    fn stat_hostile_comm_with_parens_spaces_newline() {
        let line = b"42 (a) b (c) R 7 42 42 0 -1 4194304 0 0 0 0 0 0 0 0 20 0 1 0 555 0 0\n";
        let s = parse_stat(line).unwrap();
        assert_eq!(s.comm, "a) b (c");
        assert_eq!(s.state, 'R');
        assert_eq!(s.ppid, 7);
        assert_eq!(s.start_time, 555);

        // comm forging a whole fake tail: the real fields still win.
        let line = b"42 (x) R 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 0 0 0 0 9) S 3 42 42 0 -1 64 0 0 0 0 \
            0 0 0 0 20 0 1 0 777 0 0\n";
        let s = parse_stat(line).unwrap();
        assert_eq!(s.start_time, 777);
        assert_eq!(s.ppid, 3);

        let line = b"43 (new\nline ) ) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 5 0\n";
        assert_eq!(parse_stat(line).unwrap().comm, "new\nline ) ");
    }

    #[test]
    fn stat_invalid_utf8_comm_is_lossy() {
        let line = b"9 (\xff\xfe\x1b[2J) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 5 0\n";
        let s = parse_stat(line).unwrap();
        assert_eq!(s.comm, "\u{fffd}\u{fffd}\x1b[2J");
    }

    #[test]
    fn stat_every_truncation_is_an_error_not_a_panic() {
        // The start time is trusted only once a digit of the next field is there.
        let end_of_start_time = QEMU_STAT.windows(8).position(|w| w == b"3412345 ").unwrap() + 9;
        for len in 0..QEMU_STAT.len() {
            let r = parse_stat(&QEMU_STAT[..len]);
            if len < end_of_start_time {
                assert!(r.is_err(), "prefix of {len} bytes parsed: {r:?}");
            } else {
                assert_eq!(r.unwrap().start_time, 3412345);
            }
        }
    }

    #[test]
    fn stat_garbage() {
        for bad in [
            &b""[..],
            b"\n",
            b"()",
            b"12 (x",
            b"x (y) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 5 0",
            b"-1 (y) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 5 0",
            b"1 (y) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 -5 0",
            b"1 (y) SS 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 5 0",
            b"1 (y) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 99999999999999999999999 0",
            b"1 )y( S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 5 0",
            b"1 (y) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 5 \xff",
        ] {
            assert!(
                parse_stat(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn cmdline_forms() {
        assert_eq!(
            parse_cmdline(b"/usr/bin/kvm\0-id\x00100\0"),
            ["/usr/bin/kvm", "-id", "100"]
        );
        // No trailing NUL (rewritten argv).
        assert_eq!(parse_cmdline(b"kvm\0-S"), ["kvm", "-S"]);
        // Zombie / kernel thread.
        assert!(parse_cmdline(b"").is_empty());
        // An empty argv element stays an element.
        assert_eq!(parse_cmdline(b"a\0\0b\0"), ["a", "", "b"]);
        assert_eq!(parse_cmdline(b"\0"), [""]);
    }

    #[test]
    fn cmdline_hostile_bytes_are_kept_as_data() {
        let raw = b"qemu\0-name\0guest=\"x\ny\",debug-threads=on\0\x1b[2J\\n\\0\0\xff\xc3(\0";
        let args = parse_cmdline(raw);
        assert_eq!(args.len(), 5);
        assert_eq!(args[2], "guest=\"x\ny\",debug-threads=on");
        assert_eq!(args[3], "\x1b[2J\\n\\0");
        assert_eq!(args[4], "\u{fffd}\u{fffd}(");
    }

    #[test]
    fn cmdline_huge_argument() {
        let mut raw = b"qemu-system-x86_64\0-append\0".to_vec();
        raw.extend(std::iter::repeat_n(b'A', 1 << 20));
        raw.extend(b"\0-name\0big\0");
        let args = parse_cmdline(&raw);
        assert_eq!(args.len(), 5);
        assert_eq!(args[2].len(), 1 << 20);
        assert_eq!(args[4], "big");
    }

    #[test]
    fn comm_strips_one_newline() {
        assert_eq!(parse_comm(b"qemu-system-x86\n"), "qemu-system-x86");
        assert_eq!(parse_comm(b"a\n\n"), "a\n");
        assert_eq!(parse_comm(b""), "");
        assert_eq!(parse_comm(b"\xff\n"), "\u{fffd}");
    }

    #[test]
    fn cgroup_v2_only() {
        let e =
            parse_cgroup(b"0::/machine.slice/machine-qemu\\x2d1\\x2dvm1.scope/libvirt/emulator\n")
                .unwrap();
        assert_eq!(e.len(), 1);
        assert_eq!(
            io_cgroup_path(&e),
            "/machine.slice/machine-qemu\\x2d1\\x2dvm1.scope/libvirt/emulator"
        );
    }

    #[test]
    fn cgroup_hybrid_uses_the_blkio_line() {
        let raw = b"12:blkio:/machine.slice/x.scope\n11:cpu,cpuacct:/machine.slice/x.scope\n\
            1:name=systemd:/machine.slice/x.scope\n0::/machine.slice/x.scope/v2\n";
        let e = parse_cgroup(raw).unwrap();
        assert_eq!(e.len(), 4);
        assert!(e[1].has_controller("cpuacct"));
        assert!(!e[1].has_controller("cpu,cpuacct"));
        // blkio is bound to v1 here, so the v2 hierarchy has no io controller.
        assert_eq!(io_cgroup_path(&e), "/machine.slice/x.scope");
    }

    #[test]
    fn cgroup_v1_uses_blkio_line() {
        let raw =
            b"3:cpu,cpuacct:/a\n2:blkio,io:/machine/qemu-1-vm1.libvirt-qemu\n1:name=systemd:/b";
        let e = parse_cgroup(raw).unwrap();
        assert_eq!(io_cgroup_path(&e), "/machine/qemu-1-vm1.libvirt-qemu");
        let e = parse_cgroup(b"3:cpu:/a\n1:name=systemd:/b\n").unwrap();
        assert_eq!(io_cgroup_path(&e), "");
    }

    #[test]
    fn cgroup_path_with_colons() {
        let e = parse_cgroup(b"0::/a:b:c/d\n").unwrap();
        assert_eq!(e[0].path, "/a:b:c/d");
        let e = parse_cgroup(b"4:blkio:/x:1:2\n").unwrap();
        assert_eq!(io_cgroup_path(&e), "/x:1:2");
    }

    #[test]
    fn cgroup_empty_and_hostile() {
        assert_eq!(parse_cgroup(b"").unwrap(), []);
        assert_eq!(io_cgroup_path(&[]), "");
        for bad in [
            // A cgroup name with a newline forging a second v2 line.
            &b"0::/user.slice/user-1000.slice/user@1000.service/x\n0::/machine.slice/machine-qemu\\x2d1\\x2dv.scope\n"[..],
            // Forged line on a hybrid host, before the real v2 line.
            b"1:name=systemd:/user.slice/evil\n0::/machine.slice/fake.scope\n0::/user.slice/evil\n",
            // Continuation text that is not a line of its own.
            b"0::/a\nb\n",
            b"0::/a\n\n",
            b"x::/a\n",
            b"0::relative\n",
            b"0:/only-one-colon\n",
        ] {
            assert!(parse_cgroup(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        // Invalid UTF-8 in a path is converted, not rejected.
        let e = parse_cgroup(b"0::/a\xffb\n").unwrap();
        assert_eq!(e[0].path, "/a\u{fffd}b");
    }

    #[test]
    fn block_cgroup_is_read_from_the_block_controllers_line() {
        use IoController::{V1, V2};
        let lines = |raw: &[u8]| parse_cgroup(raw).unwrap();
        let hybrid = lines(b"12:blkio:/machine/vm1\n3:cpu,cpuacct:/x\n0::/user.slice/s.scope\n");
        assert_eq!(block_cgroup_path(&hybrid, V1), Some("/machine/vm1"));
        assert_eq!(block_cgroup_path(&hybrid, V2), Some("/user.slice/s.scope"));
        assert_eq!(block_cgroup_path(&lines(b"0::/a\n"), V1), None);
        assert_eq!(
            block_cgroup_path(&lines(b"2:blkio,io:/b\n"), V1),
            Some("/b")
        );
        // A forged second line rejects the whole file, so no caller picks the first match.
        assert!(parse_cgroup(b"12:blkio:/user/x\n12:blkio:/machine/vm1\n").is_err());
    }

    #[test]
    fn status_kib_fields() {
        let raw = b"Name:\tqemu\nVmRSS:\t  524288 kB\nThreads:\t9\n";
        assert_eq!(parse_status_kib(raw, "VmRSS"), Some(524288));
        assert_eq!(parse_status_kib(raw, "VmSwap"), None);
        assert_eq!(parse_status_kib(raw, "Threads"), None, "not a kB field");
        assert_eq!(parse_status_kib(b"VmRSS:\tx kB\n", "VmRSS"), None);
        assert_eq!(parse_status_kib(b"\xff", "VmRSS"), None);
    }

    #[test]
    fn process_dir_reads_a_fake_tree() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("42");
        std::fs::create_dir_all(dir.join("task/43")).unwrap();
        std::fs::write(
            dir.join("stat"),
            b"42 (q) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 777 0 0\n",
        )
        .unwrap();
        std::fs::write(dir.join("cgroup"), b"0::/a\n0::/b\n").unwrap();
        std::fs::write(dir.join("task/43/comm"), b"CPU 0/KVM\n").unwrap();
        let p = ProcessDir::under(root.path(), 42);
        assert_eq!(p.stat().unwrap().start_time, 777);
        assert!(matches!(p.cgroups(), Err(ProcError::Malformed { .. })));
        assert!(matches!(p.cmdline(), Err(ProcError::Unreadable { .. })));
        let threads = p.threads();
        assert_eq!(threads.len(), 1);
        assert_eq!(threads[0].comm().unwrap(), "CPU 0/KVM");
        // A stat file that names another PID is not this process's.
        let other = ProcessDir::under(root.path(), 7);
        std::fs::create_dir_all(root.path().join("7")).unwrap();
        std::fs::copy(dir.join("stat"), root.path().join("7/stat")).unwrap();
        assert!(matches!(other.stat(), Err(ProcError::Malformed { .. })));
        assert!(!ProcessDir::under(root.path(), 8).exists());
    }

    #[test]
    fn this_process_is_readable() {
        let me = std::process::id();
        assert!(alive(me));
        assert!(start_time(me).is_some());
        assert!(pids().contains(&me));
        assert!(!ProcessDir::host(me).cmdline().unwrap().is_empty());
    }
}
