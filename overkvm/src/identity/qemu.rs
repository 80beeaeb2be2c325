//! Recognising qemu processes and reading VM identity from their command line.
//!
//! The command line is data written by whoever started the process. Nothing here interprets
//! quotes or escapes; values are kept as they are, apart from the `,,` unescaping that qemu
//! itself applies to option values.

/// Whether a process is a qemu system emulator (a VM), judged by argv[0], `/proc/PID/exe`
/// and, as a fallback, comm.
///
/// Names: `qemu-system-*`, `qemu-kvm` (RHEL `/usr/libexec/qemu-kvm`), `kvm` (Debian/Proxmox
/// `/usr/bin/kvm`). `exe` may carry a ` (deleted)` suffix after a package upgrade. comm is
/// truncated to 15 bytes (`qemu-system-x86`) and must match exactly, so that kernel threads
/// such as `kvm-nx-lpage-re` or `kvm-pit/1234` never do. User-mode emulators (`qemu-x86_64`,
/// binfmt `qemu-aarch64-static`) are not VMs and don't match.
pub fn is_qemu(argv0: &str, exe: Option<&str>, comm: &str) -> bool {
    let exe = exe.map(|e| e.strip_suffix(" (deleted)").unwrap_or(e));
    is_qemu_name(basename(argv0))
        || exe.is_some_and(|e| is_qemu_name(basename(e)))
        || is_qemu_name(comm)
}

fn is_qemu_name(name: &str) -> bool {
    name == "kvm"
        || name == "qemu-kvm"
        || name
            .strip_prefix("qemu-system-")
            .is_some_and(|arch| !arch.is_empty())
}

fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// What a qemu command line says about the VM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QemuArgs {
    /// `-name guest=NAME` or `-name NAME`; never empty.
    pub name: Option<String>,
    /// `-name ...,process=COMM`: the comm qemu gives itself.
    pub process: Option<String>,
    /// `-uuid`, lower-cased; only well-formed UUIDs (qemu rejects others).
    pub uuid: Option<String>,
    /// `-id VMID` (a Proxmox patch to qemu).
    pub id: Option<u32>,
    /// `-smbios type=1,product=...` (Nova sets "OpenStack Nova").
    pub smbios_product: Option<String>,
    /// `-smbios type=1,uuid=...`, lower-cased.
    pub smbios_uuid: Option<String>,
    /// `-pidfile PATH` (Proxmox and plain qemu; libvirt writes its own).
    pub pidfile: Option<String>,
    /// Unix sockets on which this qemu listens for QMP: `-qmp unix:PATH,server...` and
    /// `-chardev socket,id=X,path=PATH,server...` referenced by `-mon chardev=X,mode=control`.
    /// Client-mode sockets (Proxmox's `qmeventd.sock`) are left out: they are not ours to open.
    pub qmp_sockets: Vec<String>,
}

/// qemu options that take an argument and whose argument is free text (or may start with
/// `-`). Their argument is skipped, so `-append "-name x"` style values are never read as
/// options. Any other unknown option is treated as a flag: taking its argument for an option
/// would only matter if the argument were exactly one of the options we read.
const SKIPPED_WITH_ARGUMENT: &[&str] = &[
    "M",
    "machine",
    "cpu",
    "accel",
    "smp",
    "m",
    "mem-path",
    "k",
    "audiodev",
    "audio",
    "device",
    "blockdev",
    "drive",
    "fsdev",
    "virtfs",
    "iscsi",
    "global",
    "boot",
    "object",
    "numa",
    "add-fd",
    "set",
    "netdev",
    "nic",
    "net",
    "append",
    "kernel",
    "initrd",
    "dtb",
    "bios",
    "L",
    "fw_cfg",
    "serial",
    "parallel",
    "monitor",
    "debugcon",
    "display",
    "vga",
    "vnc",
    "spice",
    "rtc",
    "icount",
    "watchdog-action",
    "echr",
    "incoming",
    "loadvm",
    "runas",
    "chroot",
    "run-with",
    "sandbox",
    "msg",
    "D",
    "d",
    "trace",
    "plugin",
    "overcommit",
    "action",
    "compat",
    "readconfig",
    "writeconfig",
    "tpmdev",
    "usbdevice",
    "hda",
    "hdb",
    "hdc",
    "hdd",
    "cdrom",
    "fda",
    "fdb",
    "mtdblock",
    "sd",
    "pflash",
    "option-rom",
    "acpitable",
    "seed",
    "semihosting-config",
    "gdb",
    "device-tree",
];

impl QemuArgs {
    /// Parses a qemu argv (argv[0] included). When an option is repeated the last one wins, as
    /// in qemu.
    pub fn parse(argv: &[String]) -> QemuArgs {
        let mut out = QemuArgs::default();
        // (chardev id, socket path) of listening sockets, and chardev ids used as QMP monitors.
        let mut server_chardevs: Vec<(String, String)> = Vec::new();
        let mut control_mons: Vec<String> = Vec::new();
        let mut qmp: Vec<String> = Vec::new();

        let mut i = 1;
        while i < argv.len() {
            let Some(opt) = option_name(&argv[i]) else {
                i += 1;
                continue;
            };
            let value = argv.get(i + 1);
            match (opt, value) {
                ("name", Some(v)) => {
                    for (k, v) in parse_opts(v, Some("guest")) {
                        match k.as_str() {
                            "guest" => out.name = Some(v).filter(|n| !n.is_empty()),
                            "process" => out.process = Some(v).filter(|n| !n.is_empty()),
                            _ => {}
                        }
                    }
                }
                ("uuid", Some(v)) => {
                    if let Some(u) = normalize_uuid(v) {
                        out.uuid = Some(u);
                    }
                }
                ("id", Some(v)) => {
                    if let Some(id) = super::decimal_u32(v) {
                        out.id = Some(id);
                    }
                }
                ("smbios", Some(v)) => {
                    let opts = parse_opts(v, None);
                    if opts.iter().any(|(k, v)| k == "type" && v == "1") {
                        for (k, v) in opts {
                            match k.as_str() {
                                "product" => out.smbios_product = Some(v),
                                "uuid" => {
                                    if let Some(u) = normalize_uuid(&v) {
                                        out.smbios_uuid = Some(u);
                                    }
                                }
                                _ => {}
                            }
                        }
                    }
                }
                ("pidfile", Some(v)) => out.pidfile = Some(v.clone()).filter(|p| !p.is_empty()),
                ("qmp", Some(v)) => {
                    if let Some(spec) = v.strip_prefix("unix:") {
                        let opts = parse_opts(spec, Some("path"));
                        if let (Some(path), true) = (lookup(&opts, "path"), is_server(&opts)) {
                            qmp.push(path.to_owned());
                        }
                    }
                }
                ("chardev", Some(v)) => {
                    let opts = parse_opts(v, Some("backend"));
                    if lookup(&opts, "backend") == Some("socket")
                        && is_server(&opts)
                        && let (Some(id), Some(path)) = (lookup(&opts, "id"), lookup(&opts, "path"))
                    {
                        server_chardevs.push((id.to_owned(), path.to_owned()));
                    }
                }
                ("mon", Some(v)) => {
                    let opts = parse_opts(v, Some("chardev"));
                    if lookup(&opts, "mode") == Some("control")
                        && let Some(chardev) = lookup(&opts, "chardev")
                    {
                        control_mons.push(chardev.to_owned());
                    }
                }
                _ => {
                    if !SKIPPED_WITH_ARGUMENT.contains(&opt) {
                        i += 1;
                        continue;
                    }
                }
            }
            i += 2;
        }

        // Chardevs may be defined before or after the -mon that uses them; a later
        // definition of the same id replaces an earlier one.
        for mon in &control_mons {
            if let Some((_, path)) = server_chardevs.iter().rev().find(|(id, _)| id == mon) {
                qmp.push(path.clone());
            }
        }
        for path in qmp {
            if !out.qmp_sockets.contains(&path) {
                out.qmp_sockets.push(path);
            }
        }
        out
    }
}

/// `-opt` or `--opt` → `opt` (qemu accepts both spellings).
fn option_name(arg: &str) -> Option<&str> {
    let opt = arg.strip_prefix('-')?;
    let opt = opt.strip_prefix('-').unwrap_or(opt);
    (!opt.is_empty()).then_some(opt)
}

/// Last value of `key`, as qemu lets later settings override earlier ones.
fn lookup<'a>(opts: &'a [(String, String)], key: &str) -> Option<&'a str> {
    opts.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn is_server(opts: &[(String, String)]) -> bool {
    matches!(lookup(opts, "server"), Some("on" | "yes" | "true" | "y"))
}

/// Splits a qemu option string (`a=b,c=d,flag`) into `(key, value)` pairs the way qemu's
/// option parser reads it: `,,` is a literal comma inside a value, a first element without `=`
/// is the value of `implied` (e.g. `guest` for `-name NAME`), and a bare flag reads as "on".
pub fn parse_opts(s: &str, implied: Option<&str>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s;
    let mut first = true;
    while !rest.is_empty() {
        let key_end = rest.find(['=', ',']).unwrap_or(rest.len());
        if rest[key_end..].starts_with('=') {
            let (value, next) = take_value(&rest[key_end + 1..]);
            out.push((rest[..key_end].to_owned(), value));
            rest = next;
        } else if let (true, Some(implied)) = (first, implied) {
            let (value, next) = take_value(rest);
            out.push((implied.to_owned(), value));
            rest = next;
        } else {
            if key_end > 0 {
                out.push((rest[..key_end].to_owned(), "on".to_owned()));
            }
            rest = rest.get(key_end + 1..).unwrap_or("");
        }
        first = false;
    }
    out
}

/// Reads one option value up to a single `,`; returns it and what follows the separator.
fn take_value(s: &str) -> (String, &str) {
    let mut value = String::new();
    let mut rest = s;
    while let Some(i) = rest.find(',') {
        value.push_str(&rest[..i]);
        if rest[i + 1..].starts_with(',') {
            value.push(',');
            rest = &rest[i + 2..];
        } else {
            return (value, &rest[i + 1..]);
        }
    }
    value.push_str(rest);
    (value, "")
}

/// A UUID in qemu's accepted form (`8-4-4-4-12` hex digits), lower-cased so that it compares
/// equal to libvirt's and Nova's spelling.
pub fn normalize_uuid(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let ok = b.len() == 36
        && b.iter().enumerate().all(|(i, &c)| match i {
            8 | 13 | 18 | 23 => c == b'-',
            _ => c.is_ascii_hexdigit(),
        });
    ok.then(|| s.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn recognises_qemu_binaries() {
        for (argv0, exe, comm) in [
            ("/usr/bin/kvm", None, "kvm"),
            ("kvm", None, "whatever"),
            ("/usr/libexec/qemu-kvm", None, "qemu-kvm"),
            ("/usr/bin/qemu-system-x86_64", None, "qemu-system-x86"),
            ("qemu-system-aarch64", None, "qemu-system-aar"),
            // argv[0] rewritten or odd, exe still tells.
            ("/proc/self/fd/3", Some("/usr/bin/qemu-system-x86_64"), "x"),
            ("", Some("/usr/bin/qemu-system-x86_64 (deleted)"), "x"),
            ("", Some("/usr/bin/kvm (deleted)"), ""),
            // Zombie: no argv, exe unreadable, comm remains.
            ("", None, "qemu-system-x86"),
            ("", None, "kvm"),
        ] {
            assert!(is_qemu(argv0, exe, comm), "{argv0:?} {exe:?} {comm:?}");
        }
    }

    #[test]
    fn rejects_non_qemu() {
        for (argv0, exe, comm) in [
            ("", None, "kvm-nx-lpage-re"),
            ("", None, "kvm-pit/1234"),
            ("", None, "kvm-irqfd-clean"),
            ("", None, "kvm "),
            ("", None, "qemu-system-"),
            ("/usr/bin/qemu-x86_64", None, "qemu-x86_64"),
            ("/usr/bin/qemu-aarch64-static", None, "qemu-aarch64-s"),
            ("/usr/bin/qemu-img", Some("/usr/bin/qemu-img"), "qemu-img"),
            ("/usr/sbin/libvirtd", None, "libvirtd"),
            ("/usr/bin/kvm-ok", None, "kvm-ok"),
            ("/usr/bin/kvm/", None, "bash"),
            ("/usr/bin/mykvm", Some("/usr/bin/mykvm"), "mykvm"),
            ("/usr/bin/python3", Some("/usr/bin/python3.12"), "python3"),
            ("", None, ""),
        ] {
            assert!(!is_qemu(argv0, exe, comm), "{argv0:?} {exe:?} {comm:?}");
        }
    }

    #[test]
    fn opts_splitting() {
        let p = |s, i| parse_opts(s, i);
        let kv = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        assert_eq!(
            p("guest=v1465,debug-threads=on", Some("guest")),
            kv(&[("guest", "v1465"), ("debug-threads", "on")])
        );
        assert_eq!(
            p("web01,process=kvm-web", Some("guest")),
            kv(&[("guest", "web01"), ("process", "kvm-web")])
        );
        assert_eq!(p("a,,b", Some("guest")), kv(&[("guest", "a,b")]));
        assert_eq!(p("a,,b=c", Some("guest")), kv(&[("guest", "a,b=c")]));
        assert_eq!(p("guest=x,,,,y,,", None), kv(&[("guest", "x,,y,")]));
        assert_eq!(p("guest=a=b", None), kv(&[("guest", "a=b")]));
        assert_eq!(
            p(
                "socket,id=m,path=/run/a.sock,server,nowait",
                Some("backend")
            ),
            kv(&[
                ("backend", "socket"),
                ("id", "m"),
                ("path", "/run/a.sock"),
                ("server", "on"),
                ("nowait", "on")
            ])
        );
        assert_eq!(p("", Some("guest")), kv(&[]));
        assert_eq!(p(",", Some("guest")), kv(&[("guest", "")]));
        assert_eq!(p(",,,", None), kv(&[]));
        assert_eq!(p("=x", None), kv(&[("", "x")]));
        assert_eq!(p("a=", None), kv(&[("a", "")]));
        assert_eq!(p("a=1,a=2", None), kv(&[("a", "1"), ("a", "2")]));
    }

    #[test]
    fn libvirt_debian_command_line() {
        let a = QemuArgs::parse(&argv(&[
            "/usr/bin/kvm",
            "-name",
            "guest=v1465,debug-threads=on",
            "-S",
            "-object",
            "secret,id=masterKey0,format=raw,file=/var/lib/libvirt/qemu/domain-39-v1465/master-key.aes",
            "-machine",
            "pc-i440fx-2.8,accel=kvm,usb=off,dump-guest-core=off",
            "-m",
            "4096",
            "-uuid",
            "0FA82997-3C4D-4E5F-8A9B-0C1D2E3F4A5B",
            "-no-user-config",
            "-nodefaults",
            "-chardev",
            "socket,id=charmonitor,path=/var/lib/libvirt/qemu/domain-39-v1465/monitor.sock,server,nowait",
            "-mon",
            "chardev=charmonitor,id=monitor,mode=control",
            "-drive",
            "file=/dev/vg2/v1465,format=raw,if=none,id=drive-virtio-disk0,cache=none",
        ]));
        assert_eq!(
            a,
            QemuArgs {
                name: Some("v1465".into()),
                uuid: Some("0fa82997-3c4d-4e5f-8a9b-0c1d2e3f4a5b".into()),
                qmp_sockets: vec!["/var/lib/libvirt/qemu/domain-39-v1465/monitor.sock".into()],
                ..Default::default()
            }
        );
    }

    #[test]
    fn nova_command_line() {
        let a = QemuArgs::parse(&argv(&[
            "/usr/bin/qemu-system-x86_64",
            "-name",
            "guest=instance-0000abcd,debug-threads=on",
            "-S",
            "-uuid",
            "6a2cfe1e-9d3b-4c4e-9a41-2b9a3f1b7c10",
            "-smbios",
            "type=1,manufacturer=OpenStack Foundation,product=OpenStack Nova,version=27.1.0,\
             serial=6a2cfe1e-9d3b-4c4e-9a41-2b9a3f1b7c10,uuid=6a2cfe1e-9d3b-4c4e-9a41-2b9a3f1b7c10,\
             family=Virtual Machine",
            "-drive",
            "file=/var/lib/nova/instances/6a2cfe1e-9d3b-4c4e-9a41-2b9a3f1b7c10/disk,format=qcow2,cache=none",
        ]));
        assert_eq!(a.name.as_deref(), Some("instance-0000abcd"));
        assert_eq!(a.smbios_product.as_deref(), Some("OpenStack Nova"));
        assert_eq!(a.smbios_uuid, a.uuid);
        assert!(a.uuid.is_some());
    }

    #[test]
    fn proxmox_command_line() {
        let a = QemuArgs::parse(&argv(&[
            "/usr/bin/kvm",
            "-id",
            "100",
            "-name",
            "web01,debug-threads=on",
            "-no-shutdown",
            "-chardev",
            "socket,id=qmp,path=/var/run/qemu-server/100.qmp,server=on,wait=off",
            "-mon",
            "chardev=qmp,mode=control",
            "-chardev",
            "socket,id=qmp-event,path=/var/run/qmeventd.sock,reconnect-ms=5000",
            "-mon",
            "chardev=qmp-event,mode=control",
            "-pidfile",
            "/var/run/qemu-server/100.pid",
            "-daemonize",
            "-smbios",
            "type=1,uuid=3b1f0c2a-5d6e-4f70-8a91-b2c3d4e5f607",
            "-smp",
            "4,sockets=1,cores=4,maxcpus=4",
            "-vnc",
            "unix:/var/run/qemu-server/100.vnc,password=on",
        ]));
        assert_eq!(
            a,
            QemuArgs {
                name: Some("web01".into()),
                id: Some(100),
                smbios_uuid: Some("3b1f0c2a-5d6e-4f70-8a91-b2c3d4e5f607".into()),
                pidfile: Some("/var/run/qemu-server/100.pid".into()),
                qmp_sockets: vec!["/var/run/qemu-server/100.qmp".into()],
                ..Default::default()
            }
        );
    }

    #[test]
    fn rhel_and_plain_command_lines() {
        let a = QemuArgs::parse(&argv(&[
            "/usr/libexec/qemu-kvm",
            "-name",
            "rhel8,process=qemu-rhel8",
            "-qmp",
            "unix:/tmp/qmp.sock,server=on,wait=off",
            "-qmp",
            "unix:/tmp/client.sock",
            "--uuid",
            "12345678-1234-1234-1234-1234567890ab",
        ]));
        assert_eq!(a.name.as_deref(), Some("rhel8"));
        assert_eq!(a.process.as_deref(), Some("qemu-rhel8"));
        assert_eq!(
            a.uuid.as_deref(),
            Some("12345678-1234-1234-1234-1234567890ab")
        );
        assert_eq!(a.qmp_sockets, ["/tmp/qmp.sock"]);

        let a = QemuArgs::parse(&argv(&[
            "qemu-system-x86_64",
            "--name",
            "a,,b",
            "-name",
            "c",
        ]));
        assert_eq!(a.name.as_deref(), Some("c"), "last -name wins");
        let a = QemuArgs::parse(&argv(&[
            "qemu-system-x86_64",
            "--name",
            "a,,b,debug-threads=on",
        ]));
        assert_eq!(a.name.as_deref(), Some("a,b"));
    }

    #[test]
    fn hostile_values_are_data() {
        for name in [
            "x\ny",
            "\"quoted\" 'name'",
            "\x1b[2J\x1b]0;pwned\x07",
            "back\\slash\\n",
            "../../etc/passwd",
            "\u{fffd}\u{fffd}",
        ] {
            let a = QemuArgs::parse(&argv(&["kvm", "-name", &format!("guest={name}")]));
            assert_eq!(a.name.as_deref(), Some(name));
        }
    }

    #[test]
    fn huge_arguments() {
        let big = "A".repeat(1 << 20);
        let a = QemuArgs::parse(&argv(&[
            "kvm", "-append", &big, "-name", &big, "-uuid", &big,
        ]));
        assert_eq!(a.name.as_deref(), Some(big.as_str()));
        assert_eq!(a.uuid, None);
        let commas = ",".repeat(1 << 20);
        let a = QemuArgs::parse(&argv(&["kvm", "-name", &commas]));
        assert_eq!(a.name.map(|n| n.len()), Some(1 << 19));
    }

    #[test]
    fn malformed_lines_do_not_confuse() {
        // Options whose argument is missing at the end.
        for tail in [
            "-name", "-uuid", "-id", "-smbios", "-chardev", "-mon", "-qmp", "-pidfile",
        ] {
            assert_eq!(QemuArgs::parse(&argv(&["kvm", tail])), QemuArgs::default());
        }
        assert_eq!(QemuArgs::parse(&[]), QemuArgs::default());
        assert_eq!(
            QemuArgs::parse(&argv(&["kvm", "-", "--", ""])),
            QemuArgs::default()
        );
        // The argument of a known option is skipped even if it looks like an option.
        let a = QemuArgs::parse(&argv(&["kvm", "-append", "-name", "-name", "real"]));
        assert_eq!(a.name.as_deref(), Some("real"));
        // argv[0] is not an option.
        let a = QemuArgs::parse(&argv(&["-name", "x"]));
        assert_eq!(a.name.as_deref(), None);
        // An unknown flag does not swallow the next option.
        let a = QemuArgs::parse(&argv(&["kvm", "-some-new-flag", "-name", "n"]));
        assert_eq!(a.name.as_deref(), Some("n"));
        // Empty or invalid values are ignored.
        let a = QemuArgs::parse(&argv(&[
            "kvm",
            "-name",
            "",
            "-uuid",
            "not-a-uuid",
            "-id",
            "+100",
            "-id",
            "-1",
            "-pidfile",
            "",
            "-smbios",
            "type=2,product=OpenStack Nova",
        ]));
        assert_eq!(a, QemuArgs::default());
        let a = QemuArgs::parse(&argv(&["kvm", "-id", "100", "-id", "x"]));
        assert_eq!(a.id, Some(100));
        // A -mon without a matching server chardev, and a HMP monitor, give no QMP socket.
        let a = QemuArgs::parse(&argv(&[
            "kvm",
            "-mon",
            "chardev=nope,mode=control",
            "-chardev",
            "socket,id=hmp,path=/tmp/hmp,server=on",
            "-mon",
            "chardev=hmp",
            "-qmp",
            "tcp:127.0.0.1:4444,server=on",
        ]));
        assert!(a.qmp_sockets.is_empty());
    }

    #[test]
    fn uuid_forms() {
        assert_eq!(
            normalize_uuid("0FA82997-3C4D-4E5F-8A9B-0C1D2E3F4A5B").as_deref(),
            Some("0fa82997-3c4d-4e5f-8a9b-0c1d2e3f4a5b")
        );
        for bad in [
            "",
            "0fa829973c4d4e5f8a9b0c1d2e3f4a5b",
            "0fa82997-3c4d-4e5f-8a9b-0c1d2e3f4a5",
            "0fa82997-3c4d-4e5f-8a9b-0c1d2e3f4a5bb",
            "0fa82997+3c4d-4e5f-8a9b-0c1d2e3f4a5b",
            "gfa82997-3c4d-4e5f-8a9b-0c1d2e3f4a5b",
            "0fa82997-3c4d-4e5f-8a9b-0c1d2e3f4aé",
        ] {
            assert_eq!(normalize_uuid(bad), None, "{bad}");
        }
    }
}
