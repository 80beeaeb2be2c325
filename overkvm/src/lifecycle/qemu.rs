//! The qemu command line of a VM, the choice between KVM and TCG, and reading `-smp` / `-m`
//! back from other qemu processes. Building is pure; only [`probe_kvm`] looks at the host.

use std::{ffi::OsString, fs, os::fd::AsRawFd as _, path::Path};

use serde::Serialize;

use super::definition::{VmDefinition, VmPaths};

/// The qemu binary `vm start` runs.
pub const QEMU_SYSTEM: &str = "qemu-system-x86_64";
/// `-drive id=` of the VM's disk (the `device` in QMP `query-blockstats`).
pub const DISK_ID: &str = "disk0";
/// `-device id=` of the VM's virtio-blk device (for `block_set_io_throttle`).
pub const DISK_DEVICE_ID: &str = "vd0";

/// How qemu runs guest code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Software emulation: works everywhere, 10-50x slower for guest code.
    Tcg,
    /// Hardware virtualization through /dev/kvm.
    Kvm,
}

impl crate::choice::Choice for Accel {
    const VALUES: &'static [Accel] = &[Accel::Tcg, Accel::Kvm];

    fn name(self) -> &'static str {
        Accel::name(self)
    }

    fn help(self) -> &'static str {
        match self {
            Accel::Tcg => "Software emulation: works everywhere, 10-50x slower for guest code",
            Accel::Kvm => "Hardware virtualization through /dev/kvm",
        }
    }
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        }
    }
}

/// What the host says about KVM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KvmProbe {
    /// `KVM_GET_API_VERSION` of /dev/kvm, if it could be opened read-write.
    pub api_version: Option<i32>,
    /// The CPU advertises VMX or SVM in /proc/cpuinfo.
    pub hw_virt: bool,
    /// The `kvm_pvm` module is loaded (`/sys/module/kvm_pvm`).
    pub pvm: bool,
}

/// Picks the accelerator: the operator's choice if given, else KVM only when the probe says it
/// really works, else TCG.
///
/// /dev/kvm alone proves nothing: on a PVM host (a KVM flavour that runs guests inside a VM
/// without hardware virtualization, `kvm_pvm`) /dev/kvm opens and answers the API version,
/// yet an ordinary guest kernel does not boot under it. KVM is only taken when the CPU itself
/// advertises VMX/SVM and PVM is not the provider; when unsure, TCG is slow but always boots.
pub fn choose_accel(forced: Option<Accel>, probe: &KvmProbe) -> (Accel, String) {
    if let Some(a) = forced {
        return (a, format!("{} (--accel)", a.name()));
    }
    match (probe.api_version, probe.hw_virt, probe.pvm) {
        (Some(12), true, false) => (Accel::Kvm, "kvm (/dev/kvm works, CPU has VMX/SVM)".into()),
        (None, _, _) => (Accel::Tcg, "tcg (/dev/kvm is missing or not usable)".into()),
        (Some(v), _, _) if v != 12 => (Accel::Tcg, format!("tcg (/dev/kvm API version {v})")),
        (_, _, true) => (
            Accel::Tcg,
            "tcg (/dev/kvm is PVM, which does not boot ordinary guests; --accel kvm forces it)"
                .into(),
        ),
        _ => (
            Accel::Tcg,
            "tcg (the CPU has no VMX/SVM flag; --accel kvm forces KVM)".into(),
        ),
    }
}

/// Looks at /dev/kvm, /proc/cpuinfo and /sys/module.
pub fn probe_kvm() -> KvmProbe {
    const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
    let api_version = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .ok()
        .map(|f| {
            // SAFETY: KVM_GET_API_VERSION takes no argument and only returns a number.
            unsafe { libc::ioctl(f.as_raw_fd(), KVM_GET_API_VERSION as _, 0) }
        })
        .filter(|v| *v >= 0);
    let hw_virt = fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| {
        c.lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
    });
    KvmProbe {
        api_version,
        hw_virt,
        pvm: Path::new("/sys/module/kvm_pvm").exists(),
    }
}

/// A value inside a qemu `key=value,...` option: commas are doubled (qemu's escape).
pub fn opt_value(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

/// The full argv (without the program) that starts a VM daemonized.
///
/// The disk is the overlay with `cache=none,aio=native`: O_DIRECT submissions from qemu's own
/// threads, so the host's block layer charges every guest I/O to this qemu and its cgroup
/// (with the page cache in between, writes would come from the flusher threads instead).
/// `-nodefaults` leaves out the default floppy, CD-ROM, NIC and VGA, so the disk is the
/// only block device and the guest has no network unless the image brings its own setup.
pub fn qemu_argv(def: &VmDefinition, paths: &VmPaths, accel: Accel) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |s: String| a.push(s.into());
    push("-name".into());
    push(format!("guest={},debug-threads=on", def.name));
    push("-uuid".into());
    push(def.uuid.clone());
    push("-nodefaults".into());
    push("-no-user-config".into());
    push("-accel".into());
    push(accel.name().into());
    if accel == Accel::Kvm {
        push("-cpu".into());
        push("host".into());
    }
    push("-m".into());
    push(def.memory_mib.to_string());
    push("-smp".into());
    push(def.vcpus.to_string());
    push("-drive".into());
    push(format!(
        "file={},if=none,id={DISK_ID},format=qcow2,{}",
        opt_value(&def.overlay),
        def.cache.drive_options()
    ));
    push("-device".into());
    push(format!(
        "virtio-blk-pci,drive={DISK_ID},id={DISK_DEVICE_ID}"
    ));
    push("-qmp".into());
    push(format!(
        "unix:{},server=on,wait=off",
        opt_value(&paths.qmp_socket())
    ));
    push("-chardev".into());
    push(format!(
        "file,id=serial0,path={}",
        opt_value(&paths.serial_log())
    ));
    push("-serial".into());
    push("chardev:serial0".into());
    push("-display".into());
    push("none".into());
    push("-daemonize".into());
    a.push("-pidfile".into());
    a.push(paths.pidfile().into_os_string());
    if let Some(k) = &def.kernel {
        a.push("-kernel".into());
        a.push(k.clone().into_os_string());
        if let Some(i) = &def.initrd {
            a.push("-initrd".into());
            a.push(i.clone().into_os_string());
        }
        if let Some(append) = &def.append {
            a.push("-append".into());
            a.push(append.into());
        }
    }
    a
}

/// vCPUs of a `-smp` value: `4`, `cpus=4,...`, or sockets × dies × clusters × cores × threads
/// when `cpus` is not given (qemu's rule). None if unreadable.
pub fn parse_smp(value: &str) -> Option<u32> {
    let mut cpus = None;
    let mut product: Option<u32> = None;
    for (i, part) in value.split(',').enumerate() {
        match part.split_once('=') {
            None if i == 0 => cpus = Some(part.trim().parse().ok()?),
            None => return None,
            Some(("cpus", v)) => cpus = Some(v.parse().ok()?),
            Some(("sockets" | "dies" | "clusters" | "cores" | "threads", v)) => {
                let n: u32 = v.parse().ok()?;
                product = Some(product.unwrap_or(1).checked_mul(n)?);
            }
            Some(_) => {}
        }
    }
    cpus.or(product).filter(|n| *n > 0)
}

/// Guest RAM in MiB of a `-m` value: `512` (MiB), `512M`, `2G`, `size=2G,maxmem=..`. None if
/// unreadable.
pub fn parse_mem_mib(value: &str) -> Option<u64> {
    let size = value
        .split(',')
        .enumerate()
        .find_map(|(i, p)| match p.split_once('=') {
            None if i == 0 => Some(p),
            Some(("size", v)) => Some(v),
            _ => None,
        })?
        .trim();
    let split = size
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(size.len());
    let (num, unit) = size.split_at(split);
    let n: u64 = num.parse().ok()?;
    let bytes = match unit.to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => n.checked_mul(1 << 20)?,
        "b" => n,
        "k" | "kb" | "kib" => n.checked_mul(1 << 10)?,
        "g" | "gb" | "gib" => n.checked_mul(1 << 30)?,
        "t" | "tb" | "tib" => n.checked_mul(1 << 40)?,
        _ => return None,
    };
    Some(bytes >> 20).filter(|m| *m > 0)
}

/// qemu's defaults when the command line does not say: 1 vCPU, 128 MiB.
pub const DEFAULT_SMP: u32 = 1;
pub const DEFAULT_MEM_MIB: u64 = 128;

/// `-smp` and `-m` of a qemu argv (argv[0] included); the last occurrence wins, as in qemu.
/// Unreadable values count as qemu's defaults.
pub fn smp_and_memory(argv: &[String]) -> (u32, u64) {
    let mut smp = DEFAULT_SMP;
    let mut mem = DEFAULT_MEM_MIB;
    let mut i = 1;
    while i + 1 < argv.len() {
        let opt = argv[i].trim_start_matches('-');
        if argv[i].starts_with('-') {
            match opt {
                "smp" => {
                    smp = parse_smp(&argv[i + 1]).unwrap_or(DEFAULT_SMP);
                    i += 2;
                    continue;
                }
                "m" => {
                    mem = parse_mem_mib(&argv[i + 1]).unwrap_or(DEFAULT_MEM_MIB);
                    i += 2;
                    continue;
                }
                _ => {}
            }
        }
        i += 1;
    }
    (smp, mem)
}

/// Whether a thread name is a vCPU thread (`CPU 0/KVM`, `CPU 3/TCG`: qemu names them so with
/// `debug-threads=on`).
pub fn is_vcpu_thread(comm: &str) -> bool {
    comm.strip_prefix("CPU ")
        .and_then(|r| r.split_once('/'))
        .is_some_and(|(n, accel)| {
            !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) && !accel.is_empty()
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn def() -> VmDefinition {
        VmDefinition {
            name: "web01".into(),
            uuid: "0fa82997-3c4d-4e5f-8a9b-0c1d2e3f4a5b".into(),
            base: "/srv/base.img".into(),
            base_format: "raw".into(),
            overlay: "/v,ms/web01/disk.qcow2".into(),
            memory_mib: 256,
            vcpus: 2,
            disk_size: None,
            kernel: Some("/k/vmlinuz".into()),
            initrd: Some("/k/initrd".into()),
            append: Some("console=ttyS0 quiet".into()),
            cache: crate::lifecycle::definition::DiskCache::None,
        }
    }

    fn argv(d: &VmDefinition, accel: Accel) -> Vec<String> {
        let paths = VmPaths {
            dir: PathBuf::from("/v,ms/web01"),
        };
        qemu_argv(d, &paths, accel)
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect()
    }

    fn after<'a>(a: &'a [String], opt: &str) -> &'a str {
        let i = a
            .iter()
            .position(|x| x == opt)
            .unwrap_or_else(|| panic!("{opt} in {a:?}"));
        &a[i + 1]
    }

    #[test]
    fn command_line() {
        let a = argv(&def(), Accel::Tcg);
        assert_eq!(after(&a, "-name"), "guest=web01,debug-threads=on");
        assert_eq!(after(&a, "-uuid"), "0fa82997-3c4d-4e5f-8a9b-0c1d2e3f4a5b");
        assert_eq!(after(&a, "-accel"), "tcg");
        assert!(!a.contains(&"-cpu".to_string()));
        assert_eq!(after(&a, "-m"), "256");
        assert_eq!(after(&a, "-smp"), "2");
        assert_eq!(
            after(&a, "-drive"),
            "file=/v,,ms/web01/disk.qcow2,if=none,id=disk0,format=qcow2,cache=none,aio=native"
        );
        assert_eq!(after(&a, "-device"), "virtio-blk-pci,drive=disk0,id=vd0");
        let wb = VmDefinition {
            cache: crate::lifecycle::definition::DiskCache::Writeback,
            ..def()
        };
        assert!(
            after(&argv(&wb, Accel::Tcg), "-drive").ends_with(",cache=writeback,aio=threads"),
            "aio=native needs O_DIRECT"
        );
        assert_eq!(
            after(&a, "-qmp"),
            "unix:/v,,ms/web01/qmp.sock,server=on,wait=off"
        );
        assert_eq!(
            after(&a, "-chardev"),
            "file,id=serial0,path=/v,,ms/web01/serial.log"
        );
        assert_eq!(after(&a, "-serial"), "chardev:serial0");
        // -pidfile takes a plain path: no comma escaping.
        assert_eq!(after(&a, "-pidfile"), "/v,ms/web01/qemu.pid");
        assert_eq!(after(&a, "-kernel"), "/k/vmlinuz");
        assert_eq!(after(&a, "-initrd"), "/k/initrd");
        assert_eq!(after(&a, "-append"), "console=ttyS0 quiet");
        for flag in ["-daemonize", "-nodefaults", "-no-user-config"] {
            assert!(a.iter().any(|x| x == flag), "{flag}");
        }
        assert_eq!(after(&a, "-display"), "none");

        let k = argv(&def(), Accel::Kvm);
        assert_eq!(after(&k, "-accel"), "kvm");
        assert_eq!(after(&k, "-cpu"), "host");

        let mut disk_boot = def();
        disk_boot.kernel = None;
        disk_boot.initrd = None;
        disk_boot.append = None;
        let d = argv(&disk_boot, Accel::Tcg);
        for opt in ["-kernel", "-initrd", "-append"] {
            assert!(!d.iter().any(|x| x == opt), "{opt}");
        }

        // What the identity layer reads back is what we wrote.
        let mut full = vec!["qemu-system-x86_64".to_string()];
        full.extend(a);
        let parsed = crate::identity::qemu::QemuArgs::parse(&full);
        assert_eq!(parsed.name.as_deref(), Some("web01"));
        assert_eq!(
            parsed.uuid.as_deref(),
            Some("0fa82997-3c4d-4e5f-8a9b-0c1d2e3f4a5b")
        );
        assert_eq!(parsed.qmp_sockets, vec!["/v,ms/web01/qmp.sock".to_string()]);
        assert_eq!(smp_and_memory(&full), (2, 256));
    }

    #[test]
    fn accel_choice() {
        let good = KvmProbe {
            api_version: Some(12),
            hw_virt: true,
            pvm: false,
        };
        assert_eq!(choose_accel(None, &good).0, Accel::Kvm);
        let pvm = KvmProbe {
            pvm: true,
            hw_virt: false,
            ..good.clone()
        };
        let (a, why) = choose_accel(None, &pvm);
        assert_eq!(a, Accel::Tcg);
        assert!(why.contains("PVM"), "{why}");
        assert_eq!(choose_accel(Some(Accel::Kvm), &pvm).0, Accel::Kvm);
        assert_eq!(choose_accel(Some(Accel::Tcg), &good).0, Accel::Tcg);
        assert_eq!(choose_accel(None, &KvmProbe::default()).0, Accel::Tcg);
        let no_flag = KvmProbe {
            hw_virt: false,
            ..good.clone()
        };
        assert!(choose_accel(None, &no_flag).1.contains("VMX/SVM"));
        let odd = KvmProbe {
            api_version: Some(11),
            ..good
        };
        assert_eq!(choose_accel(None, &odd).0, Accel::Tcg);
    }

    #[test]
    fn smp_values() {
        assert_eq!(parse_smp("4"), Some(4));
        assert_eq!(parse_smp("cpus=6,sockets=1"), Some(6));
        assert_eq!(parse_smp("4,maxcpus=8"), Some(4));
        assert_eq!(parse_smp("sockets=2,cores=4,threads=2"), Some(16));
        assert_eq!(parse_smp("maxcpus=8"), None);
        for bad in ["", "x", "0", "cpus=x", "4,8", "sockets=99999,cores=99999"] {
            assert_eq!(parse_smp(bad), None, "{bad}");
        }
    }

    #[test]
    fn memory_values() {
        assert_eq!(parse_mem_mib("512"), Some(512));
        assert_eq!(parse_mem_mib("512M"), Some(512));
        assert_eq!(parse_mem_mib("2G"), Some(2048));
        assert_eq!(parse_mem_mib("2g"), Some(2048));
        assert_eq!(parse_mem_mib("size=1G,slots=2,maxmem=4G"), Some(1024));
        assert_eq!(parse_mem_mib("1048576k"), Some(1024));
        for bad in ["", "x", "1X", "0", "slots=2", "-1"] {
            assert_eq!(parse_mem_mib(bad), None, "{bad}");
        }
        let argv = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(smp_and_memory(&argv(&["kvm"])), (1, 128));
        assert_eq!(
            smp_and_memory(&argv(&[
                "kvm", "-m", "1G", "--smp", "2", "-m", "2G", "-append", "-m 9"
            ])),
            (2, 2048)
        );
        assert_eq!(
            smp_and_memory(&argv(&["kvm", "-smp", "bogus", "-m"])),
            (1, 128)
        );
    }

    #[test]
    fn vcpu_threads() {
        for yes in ["CPU 0/KVM", "CPU 12/TCG"] {
            assert!(is_vcpu_thread(yes), "{yes}");
        }
        for no in [
            "CPU /KVM",
            "CPU 0/",
            "worker",
            "IO iothread1",
            "CPU x/KVM",
            "ALL CPUs/TCG",
        ] {
            assert!(!is_vcpu_thread(no), "{no}");
        }
    }
}
