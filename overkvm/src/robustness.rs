//! Property tests: every parser of input overkvm does not control (/proc files, qemu command
//! lines, cgroup paths and mount tables, BTF blobs, the config file, cgroup
//! limit files) is fed arbitrary and mutated input and must return a value or an error, never
//! panic, and terminal output must never carry a control character.
//!
//! `PROPTEST_CASES` sets the executions per property (256 by default). `cargo xtask fuzz` fuzzes
//! the same parsers with coverage guidance (libFuzzer, targets in `fuzz/`).

use proptest::prelude::*;

use crate::{
    bpf::btf::Btf,
    config::Config,
    devices,
    host::{cgroup::limits, proc},
    identity::{cgroup, kubevirt, qemu::QemuArgs},
    qemu::limits as qemu_limits,
    text::sanitize,
};

/// Bytes biased towards what these parsers look for.
fn hostile_bytes() -> impl Strategy<Value = Vec<u8>> {
    let alphabet = prop_oneof![
        any::<u8>(),
        Just(b'('),
        Just(b')'),
        Just(b' '),
        Just(b'\n'),
        Just(0u8),
        Just(b':'),
        Just(b'='),
        Just(b','),
        Just(b'/'),
        Just(0x1b),
        Just(b'\\'),
        Just(b'"'),
        Just(0xff),
        (b'0'..=b'9'),
    ];
    prop::collection::vec(alphabet, 0..512)
}

fn hostile_text() -> impl Strategy<Value = String> {
    hostile_bytes().prop_map(|b| String::from_utf8_lossy(&b).into_owned())
}

const STAT: &str = "4242 (qemu-system-x86) S 1 4242 4242 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 9 0 123456 1000000 2000 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n";
const CMDLINE: &[u8] = b"/usr/bin/qemu-system-x86_64\0-name\0guest=vm1,debug-threads=on\0-uuid\x005b1f9c3e-7d0a-4c2e-9f4b-1a2b3c4d5e6f\0-id\x00100\0-smbios\0type=1,product=OpenStack Nova,uuid=5b1f9c3e-7d0a-4c2e-9f4b-1a2b3c4d5e6f\0";

const DOMAIN_XML: &str = "<domstatus state='running' pid='42'><domain type='qemu' id='3'><devices>\
<disk type='file' device='disk'><target dev='vda' bus='virtio'/><iotune><total_iops_sec>500</total_iops_sec>\
<write_bytes_sec>1048576</write_bytes_sec></iotune></disk><disk device='cdrom'><target dev=\"hdc\"/></disk>\
</devices></domain></domstatus>";

/// `base` with a few bytes overwritten, inserted or cut at random places.
fn mutated(base: &'static [u8]) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec((any::<usize>(), any::<u8>(), 0u8..3), 0..16).prop_map(move |edits| {
        let mut v = base.to_vec();
        for (pos, byte, kind) in edits {
            if v.is_empty() {
                v.push(byte);
                continue;
            }
            let p = pos % v.len();
            match kind {
                0 => v[p] = byte,
                1 => v.insert(p, byte),
                _ => v.truncate(p),
            }
        }
        v
    })
}

proptest! {
    #[test]
    fn libvirt_iotune_never_panics(b in prop_oneof![hostile_bytes(), mutated(DOMAIN_XML.as_bytes())]) {
        let xml = String::from_utf8_lossy(&b);
        for l in qemu_limits::from_libvirt_xml(&xml) {
            prop_assert!(!l.is_unlimited());
        }
        for l in qemu_limits::from_pve_config(&xml) {
            prop_assert!(!l.is_unlimited());
        }
        // The throttle's reading of the same XML (every disk, with its cache mode and every
        // iotune setting), and of `virsh blkdeviotune` output.
        for d in crate::qemu::limits::disks_from_libvirt_xml(&xml) {
            prop_assert!(!d.disk.name().is_empty());
            let t = crate::throttle::qemu_actuator::engage(&d.throttle, &Default::default());
            prop_assert_eq!(t, d.throttle);
        }
        let _ = crate::qemu::limits::parse_virsh_blkdeviotune(&xml);
    }

    #[test]
    fn proc_stat_never_panics(b in prop_oneof![hostile_bytes(), mutated(STAT.as_bytes())]) {
        let _ = proc::parse_stat(&b);
    }

    #[test]
    fn cmdline_and_qemu_args_never_panic(b in prop_oneof![hostile_bytes(), mutated(CMDLINE)]) {
        let argv = proc::parse_cmdline(&b);
        let _ = QemuArgs::parse(&argv);
        let _ = proc::parse_comm(&b);
    }

    #[test]
    fn proc_cgroup_and_cgroup_paths_never_panic(t in hostile_text()) {
        let _ = proc::parse_cgroup(t.as_bytes());
        let _ = cgroup::libvirt_machine(&t);
        let _ = cgroup::proxmox_vmid(&t);
        let _ = kubevirt::in_kubepods(&t);
        let _ = kubevirt::split_domain_name(&t);
        let _ = proc::parse_cgroup(t.as_bytes()).map(|e| cgroup::manager_cgroup_path(&e).len());
        let _ = cgroup::unescape_systemd(&t);
        let _ = crate::host::cgroup::parse_mountinfo(&t);
        let _ = limits::check_cgroup_path(&t);
    }

    #[test]
    fn btf_blobs_never_panic(b in prop::collection::vec(any::<u8>(), 0..256)) {
        // A valid header followed by garbage, and pure garbage.
        let mut blob = vec![0x9f, 0xeb, 1, 0, 24, 0, 0, 0, 0, 0, 0, 0];
        let n = b.len() as u32;
        blob.extend_from_slice(&n.to_le_bytes());
        blob.extend_from_slice(&0u32.to_le_bytes());
        blob.extend_from_slice(&n.to_le_bytes());
        blob.extend_from_slice(&b);
        if let Ok(btf) = Btf::parse(&blob) {
            let _ = btf.field_offset("request", "cmd_flags");
            let _ = btf.enum_value("REQ_OP_WRITE");
        }
        let _ = Btf::parse(&b);
    }

    #[test]
    fn config_never_panics(t in hostile_text()) {
        let _ = Config::parse(&t);
        let _ = Config::parse(&format!("[[device]]\ndevice = \"{t}\"\niops = 1\n"));
    }

    #[test]
    fn limit_files_and_device_numbers_never_panic(t in hostile_text()) {
        let _ = limits::parse_io_max(&t, 7, 0);
        let _ = limits::parse_v1(&t, 7, 0);
        let _ = devices::parse_maj_min(&t);
    }

    #[test]
    fn sanitized_text_has_no_control_characters(t in hostile_text()) {
        let s = sanitize(&t);
        prop_assert!(!s.chars().any(|c| c.is_control()), "{s:?}");
    }
}
