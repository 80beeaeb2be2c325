//! Boot-storm admission: start the next guest only when the device has room under its IOPS
//! budget. The decision is pure; the measurement uses the real kernel programs and sampler.

use std::{sync::Arc, thread::sleep, time::Duration};

use anyhow::Context as _;

use crate::{
    bpf::{LoadOptions, Programs},
    devices::{DeviceInfo, DeviceTable},
    pipeline::Pipeline,
    report::DeviceRow,
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

/// Sums the operations on `disk` in an interval's device rows (requests on blk-mq devices,
/// bios on bio-based ones, as the report picked them), partitions folded into their disk.
pub fn disk_ops(rows: &[DeviceRow], disk: &DeviceInfo) -> u64 {
    rows.iter()
        .filter(|r| r.disk == disk.disk)
        .map(|r| r.counts.total_ops())
        .sum()
}

/// Measures one device's IOPS with the kernel programs (needs root).
pub struct DeviceMeter {
    pipeline: Pipeline,
    pub disk: Arc<DeviceInfo>,
}

impl DeviceMeter {
    /// Loads the programs and resolves the device (a whole disk: name, /dev path or MAJ:MIN).
    pub fn new(device: &str) -> anyhow::Result<DeviceMeter> {
        let mut table = DeviceTable::new();
        let disk = table
            .resolve_disk(device)
            .with_context(|| format!("--device {device:?}"))?;
        let programs = Programs::load(&LoadOptions::default())
            .context("--admit measures the device with overkvm's kernel programs")?;
        Ok(DeviceMeter {
            pipeline: Pipeline::new(programs)?,
            disk,
        })
    }

    /// Waits `window` and returns the device's IOPS over it.
    pub fn measure(&mut self, window: Duration) -> anyhow::Result<f64> {
        // Start the window now: I/O from before (e.g. while qemu started) is not this window's.
        self.pipeline.tick()?;
        sleep(window);
        let tick = self.pipeline.tick()?;
        let secs = tick.report.interval_s.max(1e-3);
        Ok(disk_ops(&tick.report.devices, &self.disk) as f64 / secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{CountSource, OpCounts};
    use overkvm_common::make_dev;

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
        let disk = DeviceInfo {
            dev: make_dev(7, 0),
            name: "loop0".into(),
            major: 7,
            minor: 0,
            disk: "loop0".into(),
            disk_dev: make_dev(7, 0),
            request_based: true,
            present: true,
        };
        let row = |device: &str, disk: &str, reads, flushes| DeviceRow {
            device: device.into(),
            major: 7,
            minor: 0,
            disk: disk.into(),
            source: CountSource::Request,
            counts: OpCounts {
                read_ops: reads,
                flush_ops: flushes,
                ..OpCounts::default()
            },
        };
        let rows = [
            row("loop0", "loop0", 100, 2),
            row("loop0p1", "loop0", 50, 0),
            row("loop1", "loop1", 999, 0),
        ];
        assert_eq!(
            disk_ops(&rows, &disk),
            152,
            "partitions folded, other disks not"
        );
        assert_eq!(disk_ops(&[], &disk), 0);
    }
}
