//! Boot-storm admission: start the next guest only when the device has room under its IOPS
//! budget. The decision is pure; the measurement uses the real kernel programs and sampler.

use std::{sync::Arc, thread::sleep, time::Duration};

use anyhow::Context as _;

use crate::{
    bpf::{LoadOptions, Programs},
    devices::{DeviceInfo, DeviceTable},
    sample::{self, Sampler, Snapshot},
};

/// Share of the budget a booting guest is assumed to need when `--boot-iops` is not given.
pub const DEFAULT_BOOT_SHARE: f64 = 0.1;

/// What a booting guest may add and what the device may carry.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdmitPolicy {
    pub budget_iops: f64,
    /// Room a guest's boot needs: the next guest starts when `measured + boot_iops <= budget`.
    pub boot_iops: f64,
}

impl AdmitPolicy {
    pub fn new(budget_iops: u64, boot_iops: Option<u64>) -> AdmitPolicy {
        let budget = budget_iops as f64;
        AdmitPolicy {
            budget_iops: budget,
            boot_iops: boot_iops.map_or(budget * DEFAULT_BOOT_SHARE, |b| b as f64),
        }
    }

    /// True when a guest may start now, given the device's IOPS over the last window.
    pub fn admits(&self, measured_iops: f64) -> bool {
        measured_iops + self.boot_iops <= self.budget_iops
    }
}

/// Progress line while waiting, e.g. `waiting: loop0 at 2800/3000 IOPS`.
pub fn waiting_line(device: &str, measured: f64, policy: &AdmitPolicy) -> String {
    format!(
        "waiting: {device} at {:.0}/{:.0} IOPS (a boot needs {:.0} free)",
        measured, policy.budget_iops, policy.boot_iops
    )
}

/// Sums the operations on `disk` (a whole disk's dev_t) in a delta: requests on blk-mq
/// devices, bios on bio-based ones, partitions folded into their disk.
pub fn disk_ops(delta: &sample::Delta, disk: &DeviceInfo, table: &mut DeviceTable) -> u64 {
    let map = if disk.request_based {
        &delta.requests
    } else {
        &delta.bios
    };
    map.iter()
        .filter(|(k, _)| table.get(k.dev).disk_dev == disk.disk_dev)
        .map(|(_, c)| c.ops)
        .sum()
}

/// Measures one device's IOPS with the kernel programs (needs root).
pub struct DeviceMeter {
    sampler: Sampler,
    table: DeviceTable,
    pub disk: Arc<DeviceInfo>,
    prev: Snapshot,
}

impl DeviceMeter {
    /// Loads the programs and resolves the device (a whole disk: name, /dev path or MAJ:MIN).
    pub fn new(device: &str) -> anyhow::Result<DeviceMeter> {
        let mut table = DeviceTable::new();
        let disk = crate::throttle::resolve_device(&mut table, device)
            .with_context(|| format!("--device {device:?}"))?;
        let programs = Programs::load(&LoadOptions::default())
            .context("--admit measures the device with overkvm's kernel programs")?;
        let sampler = Sampler::new(programs);
        let prev = sampler.snapshot()?;
        Ok(DeviceMeter {
            sampler,
            table,
            disk,
            prev,
        })
    }

    /// Waits `window` and returns the device's IOPS over it.
    pub fn measure(&mut self, window: Duration) -> anyhow::Result<f64> {
        // Start the window now: I/O from before (e.g. while qemu started) is not this window's.
        self.prev = self.sampler.snapshot()?;
        sleep(window);
        let cur = self.sampler.snapshot()?;
        let delta = sample::delta(&self.prev, &cur);
        let secs = delta.interval.as_secs_f64().max(1e-3);
        let ops = disk_ops(&delta, &self.disk, &mut self.table);
        self.prev = cur;
        Ok(ops as f64 / secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::Counters;
    use overkvm_common::{IoKey, make_dev};

    #[test]
    fn policy() {
        let p = AdmitPolicy::new(3000, None);
        assert_eq!(p.boot_iops, 300.0);
        assert!(p.admits(0.0));
        assert!(p.admits(2700.0));
        assert!(!p.admits(2700.5));
        assert!(!p.admits(2800.0));
        let q = AdmitPolicy::new(3000, Some(0));
        assert!(q.admits(3000.0) && !q.admits(3001.0));
        let big = AdmitPolicy::new(100, Some(500));
        assert!(!big.admits(0.0), "a boot bigger than the budget never fits");
        assert_eq!(
            waiting_line("loop0", 2800.4, &p),
            "waiting: loop0 at 2800/3000 IOPS (a boot needs 300 free)"
        );
    }

    #[test]
    fn ops_of_a_disk() {
        // A fake sysfs with loop0 (blk-mq) and nothing else.
        let root = std::env::temp_dir().join(format!("overkvm-admit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dev_dir = root.join("devices/virtual/block/loop0");
        std::fs::create_dir_all(dev_dir.join("mq")).unwrap();
        std::fs::create_dir_all(root.join("dev/block")).unwrap();
        std::os::unix::fs::symlink(&dev_dir, root.join("dev/block/7:0")).unwrap();
        let mut table = DeviceTable::with_sysfs(&root);
        let disk = table.get(make_dev(7, 0));
        assert!(disk.present && disk.request_based, "{disk:?}");

        let key = |tgid, dev, op| IoKey {
            tgid,
            dev,
            cgroup_id: 1,
            op,
            ..Default::default()
        };
        let mut delta = sample::Delta::default();
        let c = |ops| Counters {
            ops,
            bytes: ops * 4096,
        };
        delta.requests.insert(key(1, make_dev(7, 0), 0), c(100));
        delta.requests.insert(key(2, make_dev(7, 0), 1), c(50));
        delta.requests.insert(key(2, make_dev(8, 0), 1), c(999));
        delta.bios.insert(key(2, make_dev(7, 0), 1), c(70));
        assert_eq!(disk_ops(&delta, &disk, &mut table), 150);
        let _ = std::fs::remove_dir_all(&root);
    }
}
