//! Parsers for the `/proc/PID` files the identity layer reads.
//!
//! They take bytes and never panic. A process can exit or be replaced while we read, and comm,
//! argv and cgroup names are chosen by whoever runs the process, so every input is untrusted.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

/// `PF_KTHREAD` in the stat `flags` field (include/linux/sched.h). Kernel threads such as
/// `kvm-pit/1234` must never be taken for a VM, whatever their name.
pub const PF_KTHREAD: u32 = 0x0020_0000;

/// Why a /proc file could not be parsed. Static text keeps the error path allocation-free.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParseError(pub &'static str);

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for ParseError {}

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
        .and_then(|s| super::decimal_u32(s.trim()))
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
        let hierarchy = super::decimal_u32(id).ok_or(ParseError("cgroup: bad hierarchy id"))?;
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
    entries
        .iter()
        .find(|e| e.has_controller("blkio"))
        .or_else(|| {
            entries
                .iter()
                .find(|e| e.hierarchy == 0 && e.controllers.is_empty())
        })
        .map_or("", |e| e.path.as_str())
}

/// The path that says who manages the process: the v2 line's or the v1 blkio line's, whichever
/// is in a manager's layout (on a hybrid host a manager may have placed the process in only
/// one of them: libvirt without systemd, a kubelet on the cgroupfs driver), else
/// [`io_cgroup_path`].
pub fn manager_cgroup_path(entries: &[CgroupEntry]) -> &str {
    let v2 = entries
        .iter()
        .find(|e| e.hierarchy == 0 && e.controllers.is_empty());
    let blkio = entries.iter().find(|e| e.has_controller("blkio"));
    [v2, blkio]
        .into_iter()
        .flatten()
        .map(|e| e.path.as_str())
        .find(|p| super::cgroup::is_manager_layout(p))
        .unwrap_or_else(|| io_cgroup_path(entries))
}

/// Reads at most `cap` bytes of a file; the flag says whether the file was longer.
///
/// /proc files are generated on read, so their size is unknown beforehand; the cap keeps a
/// hostile 100 MB argv (or a huge status XML) from costing more than `cap` bytes.
pub fn read_capped(path: &Path, cap: usize) -> io::Result<(Vec<u8>, bool)> {
    let mut buf = Vec::new();
    File::open(path)?
        .take(cap as u64 + 1)
        .read_to_end(&mut buf)?;
    let truncated = buf.len() > cap;
    buf.truncate(cap);
    Ok((buf, truncated))
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
    fn the_manager_is_read_from_whichever_line_holds_its_layout() {
        // Hybrid host, kubelet on the cgroupfs driver: the pod shows only in v1.
        let raw = b"12:blkio:/kubepods/burstable/pod1/c1\n1:name=systemd:/system.slice/containerd.service\n\
            0::/system.slice/containerd.service\n";
        let e = parse_cgroup(raw).unwrap();
        assert_eq!(manager_cgroup_path(&e), "/kubepods/burstable/pod1/c1");
        // blkio is on v1 here: the pod's blkio cgroup is also the one its I/O is charged to.
        assert_eq!(io_cgroup_path(&e), "/kubepods/burstable/pod1/c1");
        // libvirt without systemd on a hybrid host.
        let raw = b"12:blkio:/machine/qemu-3-vm3.libvirt-qemu\n0::/user.slice/s.scope\n";
        let e = parse_cgroup(raw).unwrap();
        assert_eq!(manager_cgroup_path(&e), "/machine/qemu-3-vm3.libvirt-qemu");
        // Both in a layout: the v2 line names the manager (I/O is still charged to blkio).
        let raw = b"12:blkio:/machine/qemu-3-vm3.libvirt-qemu\n0::/machine.slice/machine-qemu\\x2d3\\x2dvm3.scope\n";
        let e = parse_cgroup(raw).unwrap();
        assert_eq!(
            manager_cgroup_path(&e),
            "/machine.slice/machine-qemu\\x2d3\\x2dvm3.scope"
        );
        // Neither: the I/O cgroup (the block controller's, blkio here).
        let raw = b"12:blkio:/a\n0::/b\n";
        assert_eq!(manager_cgroup_path(&parse_cgroup(raw).unwrap()), "/a");
        assert_eq!(manager_cgroup_path(&[]), "");
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
    fn read_capped_reports_truncation() {
        let dir = std::env::temp_dir().join(format!("overkvm-procfs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("f");
        std::fs::write(&f, b"0123456789").unwrap();
        assert_eq!(read_capped(&f, 4).unwrap(), (b"0123".to_vec(), true));
        assert_eq!(
            read_capped(&f, 10).unwrap(),
            (b"0123456789".to_vec(), false)
        );
        assert!(read_capped(&dir.join("missing"), 4).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
