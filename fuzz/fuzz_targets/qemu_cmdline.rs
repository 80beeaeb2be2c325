//! A qemu process's `/proc/PID/cmdline` (written by whoever started qemu) turned into a VM
//! identity, the way the resolver does it: parse_cmdline, is_qemu, QemuArgs::parse, then the
//! manager decision with the cgroup path and the manager files (libvirt pidfile and status XML,
//! Proxmox config) also taken from the input.
//!
//! Input: `cmdline \x1e\x1e cgroup-path \x1e\x1e pidfile \x1e\x1e status.xml \x1e\x1e pve.conf`;
//! missing parts are absent files.
#![no_main]

use libfuzzer_sys::fuzz_target;
use overkvm::host::proc::parse_cmdline;
use overkvm::identity::{
    Manager,
    managers::{HostFiles, identify},
    qemu::{QemuArgs, is_qemu, normalize_uuid},
};
use overkvm_fuzz::{assert_sanitized, parts, text};

struct Files {
    pidfile: Option<String>,
    status: Option<String>,
    pve: Option<String>,
}

impl HostFiles for Files {
    fn libvirt_pidfile(&self, _name: &str) -> Option<String> {
        self.pidfile.clone()
    }
    fn libvirt_status(&self, _name: &str) -> Option<String> {
        self.status.clone()
    }
    fn pve_config(&self, _vmid: u32) -> Option<String> {
        self.pve.clone()
    }
}

const PID: u32 = 4242;

fn is_normal_uuid(u: &str) -> bool {
    normalize_uuid(u).as_deref() == Some(u)
}

fuzz_target!(|data: &[u8]| {
    let p = parts(data);
    let argv = parse_cmdline(p[0]);

    // Arguments never hold the NUL that separates them, and re-joined they split the same.
    assert!(argv.iter().all(|a| !a.contains('\0')));
    if !argv.is_empty() {
        let mut joined = argv.join("\0").into_bytes();
        joined.push(0);
        assert_eq!(parse_cmdline(&joined), argv);
    }

    let argv0 = argv.first().map_or("", String::as_str);
    let _ = is_qemu(argv0, Some(argv0), argv0);

    let args = QemuArgs::parse(&argv);
    assert!(args.name.as_deref().is_none_or(|n| !n.is_empty()));
    assert!(args.process.as_deref().is_none_or(|n| !n.is_empty()));
    assert!(args.pidfile.as_deref().is_none_or(|n| !n.is_empty()));
    assert!(args.uuid.as_deref().is_none_or(is_normal_uuid));
    assert!(args.smbios_uuid.as_deref().is_none_or(is_normal_uuid));
    for (i, s) in args.qmp_sockets.iter().enumerate() {
        assert!(
            !args.qmp_sockets[..i].contains(s),
            "duplicate QMP socket {s:?}"
        );
    }

    let cgroup = p.get(1).map(|b| text(b)).unwrap_or_default();
    let files = Files {
        pidfile: p.get(2).map(|b| text(b)),
        status: p.get(3).map(|b| text(b)),
        pve: p.get(4).map(|b| text(b)),
    };
    let vm = identify(PID, &args, &cgroup, &files);
    assert!(!vm.name.is_empty(), "empty VM name");
    assert_sanitized(&vm.name);
    if let Some(d) = &vm.display_name {
        assert_sanitized(d);
    }
    assert!(vm.uuid.as_deref().is_none_or(is_normal_uuid));
    if vm.manager == Manager::Proxmox {
        assert!(vm.vmid.is_some());
    }
    // -name, when given, is the name (libvirt's cgroup name is a cleaned copy); KubeVirt's
    // `<namespace>_<vmi>` is named `<namespace>/<vmi>`, with the namespace apart.
    match (&args.name, vm.manager) {
        (Some(n), Manager::Kubevirt) => {
            assert_eq!(vm.name, n.replacen('_', "/", 1));
            assert!(vm.namespace.as_deref().is_some_and(|ns| n.starts_with(ns)));
        }
        (Some(n), m) if m != Manager::Proxmox => assert_eq!(&vm.name, n),
        _ => {}
    }
});
