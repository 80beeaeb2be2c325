//! Files VM managers keep, read when a qemu process looks like theirs: libvirt's pidfile and
//! status XML (`/run/libvirt/qemu/NAME.{pid,xml}`), a Proxmox VM config, and the QEMU disk
//! limits `vm list` reads from the last two.
#![no_main]

use libfuzzer_sys::fuzz_target;
use overkvm::identity::managers::{
    domain_id_attr, domain_uuid, domstatus_pid, element_text, parse_pidfile, pve_config_name,
};
use overkvm::identity::qemu::normalize_uuid;
use overkvm::qemu::limits::{
    disks_from_libvirt_xml, from_libvirt_xml, from_pve_config, parse_virsh_blkdeviotune,
};
use overkvm::host::cgroup::limits::Limits;
use overkvm::throttle::qemu_actuator::engage;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Some(pid) = parse_pidfile(&text) {
        let t = text.trim();
        assert!(t.bytes().all(|b| b.is_ascii_digit()), "{t:?}");
        assert_eq!(t.parse::<u32>(), Ok(pid));
    }
    if let Some(name) = pve_config_name(&text) {
        assert!(!name.is_empty() && name == name.trim());
    }
    for tag in ["nova:name", "uuid", "name", "domain"] {
        let _ = element_text(&text, tag);
    }
    let _ = domstatus_pid(&text);
    if let Some(u) = domain_uuid(&text) {
        assert_eq!(normalize_uuid(&u).as_deref(), Some(u.as_str()));
    }
    let _ = domain_id_attr(&text);
    for l in from_libvirt_xml(&text).into_iter().chain(from_pve_config(&text)) {
        assert!(!l.is_unlimited(), "a disk without limits is left out: {l:?}");
        assert!(!l.disk.is_empty());
    }
    // The throttle's reading of the same files: engaging nothing changes nothing, and
    // engaging a limit is never looser than the disk's own settings.
    let ours = Limits {
        riops: Some(100),
        wiops: Some(50),
        ..Limits::default()
    };
    for d in disks_from_libvirt_xml(&text) {
        assert!(!d.disk.name().is_empty());
        assert_eq!(engage(&d.throttle, &Limits::default()), d.throttle);
        let e = engage(&d.throttle, &ours);
        assert!(e.get("iops_rd") >= 1 && e.get("iops_rd") <= 100, "{e:?}");
        let total = d.throttle.get("iops");
        assert!(total == 0 || e.get("iops_rd") + e.get("iops_wr") <= total.max(2), "{e:?}");
    }
    let _ = parse_virsh_blkdeviotune(&text);
});
