//! Budgets of a storage target (`[[storage]]`): the throttle's view of a Ceph pool, an NFS
//! export, an iSCSI target or an NBD server, shared by VMs whose disks no host block device
//! sees. They run through the same controllers, fairness, weights, state file and operator
//! rules as device budgets; what differs is gathered here, pure:
//!
//! - which rows are on the budget: QEMU-counted ones whose target the budget covers
//!   (`storage_target`);
//! - which of a VM's disks its limit goes to: the ones those rows name, remembered per qemu
//!   process so that a disk idle for an interval keeps its limit;
//! - QEMU is the only actuator: no host device, so no cgroup limit can hold this I/O;
//! - the latency the latency controller holds is QEMU's mean time per operation (QEMU keeps
//!   totals, not a distribution).
//!
//! A storage budget is keyed like a device in the service's records (the applied limits, the
//! QEMU records of the state file): by a number no host device has, major 0 (see
//! [`budget_key`]).

use std::collections::{BTreeMap, BTreeSet};

use overkvm_common::make_dev;

use super::qemu_actuator::VmFacts;
use crate::{
    devices::DeviceInfo,
    qemu::limits::{DiskRef, QemuDisk},
    storage_target::StorageTarget,
};

/// Why QEMU holds a VM on a storage budget, for the decision lines.
pub const WHY_QEMU: &str = "network storage: only QEMU sees its I/O";

/// One storage budget's subject: its target, and the disks seen on it per qemu process.
#[derive(Clone, Debug)]
pub struct StorageBudget {
    pub target: StorageTarget,
    /// qemu pid → its disks (as QEMU's counters name them) seen doing I/O on the target.
    disks: BTreeMap<u32, BTreeSet<String>>,
}

impl StorageBudget {
    pub fn new(target: StorageTarget) -> StorageBudget {
        StorageBudget {
            target,
            disks: BTreeMap::new(),
        }
    }

    /// Whether a row's disk (`target` as `qemu::backing` named it) is on this budget.
    pub fn covers(&self, target: Option<&str>) -> bool {
        target.is_some_and(|t| self.target.covers(t))
    }

    /// Disk `disk` of qemu `pid` did I/O on the target.
    pub fn note(&mut self, pid: u32, disk: &str) {
        self.disks.entry(pid).or_default().insert(disk.to_string());
    }

    /// Forgets the qemu processes `alive` says are gone (a restarted VM's new qemu is
    /// noted afresh from its own I/O).
    pub fn retain(&mut self, alive: impl Fn(u32) -> bool) {
        self.disks.retain(|pid, _| alive(*pid));
    }

    /// The disks of the VM run by `pid` (its `facts`) that are on the target.
    pub fn disks_of<'a>(&self, pid: u32, facts: &'a VmFacts) -> Vec<&'a QemuDisk> {
        let Some(seen) = self.disks.get(&pid) else {
            return Vec::new();
        };
        facts
            .disks
            .iter()
            .map(|(d, _)| d)
            .filter(|d| seen.iter().any(|s| same_disk(s, &d.disk)))
            .collect()
    }
}

/// Whether the disk QEMU's counters name `counted` (a `-drive` id, or the id inside a qdev
/// path, see `qemu::backing::parse_blockstats`) is `disk` as `query-block` names it (the
/// `-drive` id, or the qdev: an id, or a path when the device has none).
pub fn same_disk(counted: &str, disk: &DiskRef) -> bool {
    match disk {
        DiskRef::Device(d) => d == counted,
        DiskRef::Qdev(q) => q == counted || qdev_id(q) == counted,
    }
}

/// `/machine/peripheral/ID/virtio-backend` → `ID`; anything else as it is.
fn qdev_id(qdev: &str) -> &str {
    qdev.strip_prefix("/machine/peripheral/")
        .and_then(|r| r.split('/').next())
        .unwrap_or(qdev)
}

/// The key of storage budget number `index` in the service's records where a device has its
/// number: major 0 (no host block device is numbered so), minor `index + 1`. Named by the
/// target, present on no host.
pub fn budget_key(index: usize, target: &StorageTarget) -> DeviceInfo {
    let minor = u32::try_from(index + 1).unwrap_or(u32::MAX) & 0xfffff;
    let dev = make_dev(0, minor);
    DeviceInfo {
        dev,
        name: target.as_str().to_string(),
        major: 0,
        minor,
        disk: target.as_str().to_string(),
        disk_dev: dev,
        request_based: false,
        present: false,
    }
}

/// The mean latency of QEMU-counted I/O (µs) over rows with their completions: each row's
/// mean weighted by its completions. None without any.
pub fn mean_latency_us(rows: impl IntoIterator<Item = (Option<f64>, u64)>) -> Option<f64> {
    let (mut sum, mut n) = (0.0, 0u64);
    for (avg, completions) in rows {
        if let Some(a) = avg.filter(|a| a.is_finite() && *a >= 0.0) {
            sum += a * completions as f64;
            n += completions;
        }
    }
    (n > 0).then(|| sum / n as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{identity::Manager, qemu::limits::QemuThrottle};

    fn disk(d: DiskRef) -> (QemuDisk, Option<u32>) {
        (
            QemuDisk {
                disk: d,
                file: None,
                host_cache: false,
                throttle: QemuThrottle::default(),
            },
            None,
        )
    }

    fn facts(disks: Vec<(QemuDisk, Option<u32>)>) -> VmFacts {
        VmFacts {
            vm: "v".into(),
            uuid: None,
            manager: Manager::Qemu,
            start_time: 1,
            control: None,
            disks,
            shown_only: Vec::new(),
        }
    }

    #[test]
    fn a_vms_disks_on_the_target_are_the_ones_seen_there_and_stay() {
        let mut b = StorageBudget::new(StorageTarget::parse("rbd:volumes").unwrap());
        assert!(b.covers(Some("rbd:volumes/img")));
        assert!(!b.covers(Some("rbd:images/img")) && !b.covers(None));
        let f = facts(vec![
            disk(DiskRef::Device("nbd0".into())),
            disk(DiskRef::Qdev(
                "/machine/peripheral/virtio-disk1/virtio-backend".into(),
            )),
            disk(DiskRef::Device("local0".into())),
        ]);
        assert!(b.disks_of(7, &f).is_empty(), "nothing seen yet");
        b.note(7, "nbd0");
        b.note(7, "virtio-disk1");
        b.note(8, "local0");
        let names: Vec<&str> = b.disks_of(7, &f).iter().map(|d| d.disk.name()).collect();
        assert_eq!(
            names,
            ["nbd0", "/machine/peripheral/virtio-disk1/virtio-backend"]
        );
        b.retain(|pid| pid != 7);
        assert!(
            b.disks_of(7, &f).is_empty(),
            "a gone qemu's disks are forgotten"
        );
        assert_eq!(b.disks_of(8, &f).len(), 1);
    }

    #[test]
    fn disks_are_the_same_by_drive_id_or_qdev() {
        assert!(same_disk("nbd0", &DiskRef::Device("nbd0".into())));
        assert!(!same_disk("nbd0", &DiskRef::Device("nbd1".into())));
        assert!(same_disk("d1", &DiskRef::Qdev("d1".into())));
        assert!(same_disk(
            "d1",
            &DiskRef::Qdev("/machine/peripheral/d1/virtio-backend".into())
        ));
        assert!(!same_disk(
            "d2",
            &DiskRef::Qdev("/machine/peripheral/d1/virtio-backend".into())
        ));
    }

    #[test]
    fn storage_keys_are_numbers_no_host_device_has() {
        let t = StorageTarget::parse("nbd://h:1").unwrap();
        let (a, b) = (budget_key(0, &t), budget_key(1, &t));
        assert_eq!((a.major, a.minor, b.minor), (0, 1, 2));
        assert_ne!(a.dev, b.dev);
        assert_eq!(a.name, "nbd://h:1");
        assert!(!a.present);
    }

    #[test]
    fn the_mean_latency_weighs_each_disk_by_its_operations() {
        assert_eq!(mean_latency_us([]), None);
        assert_eq!(mean_latency_us([(None, 10)]), None);
        assert_eq!(
            mean_latency_us([(Some(100.0), 30), (Some(500.0), 10), (None, 5)]),
            Some(200.0)
        );
    }
}
