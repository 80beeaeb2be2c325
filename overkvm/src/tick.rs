//! What the daemon hands its consumers each tick: the interval's report plus the cumulative
//! counters only a long-running consumer needs. The exporter and the throttle both read ticks
//! and never each other.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use overkvm_common::HEALTH_SLOTS;
use serde::{Deserialize, Serialize};

use crate::{report::Report, sample::MapFill};

/// Kernel run statistics of one program (cumulative since load; zero unless stats are on).
#[derive(Clone, Debug, Default, Serialize)]
pub struct ProgramStat {
    pub name: String,
    pub run_count: u64,
    pub run_time_ns: u64,
    /// Runs the kernel skipped (the program already running on that CPU): events not counted.
    pub recursion_misses: u64,
}

/// A limit the throttle has in place on one VM and device.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ActiveLimit {
    pub vm: String,
    pub cgroup: String,
    pub device: String,
    pub riops: Option<u64>,
    pub wiops: Option<u64>,
    pub rbps: Option<u64>,
    pub wbps: Option<u64>,
    /// Seconds since this VM was first limited on this device (this engagement).
    pub since_s: f64,
    /// Set when QEMU holds the limit (`block_set_io_throttle`, directly or through libvirt)
    /// instead of the cgroup: the VM's disks on the device that carry it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_disks: Option<Vec<String>>,
}

impl ActiveLimit {
    /// The rates it holds the VM to.
    pub fn rates(&self) -> crate::host::cgroup::limits::Limits {
        crate::host::cgroup::limits::Limits {
            riops: self.riops,
            wiops: self.wiops,
            rbps: self.rbps,
            wbps: self.wbps,
        }
    }
}

/// Limits QEMU itself enforces on a VM's disks as their owner set them (an operator, Nova's
/// flavor, Proxmox), next to the throttle's own.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VmQemuLimits {
    pub vm: String,
    pub disks: Vec<crate::qemu::limits::DiskLimits>,
}

/// A device budget and how much of it the last interval used.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct BudgetUse {
    /// The device, or for a storage budget its target.
    pub device: String,
    /// A `[[storage]]` budget: `device` is a storage target, its latency QEMU's mean.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub storage: bool,
    pub iops_budget: Option<u64>,
    pub iops_used: f64,
    /// The controller is holding guests to the budget.
    pub engaged: bool,
    /// The device's latency target (µs) and the percentile (0-100) it applies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_target_us: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_percentile: Option<f64>,
    /// The device's latency at that percentile in the last interval (all I/O on it), µs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<f64>,
    /// IOPS the device delivers at its latency target, as learned while holding it there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_iops: Option<f64>,
    /// Total IOPS the latency controller holds the VMs to while engaged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_window_iops: Option<f64>,
}

/// The throttle's state after a tick, for display and metrics.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ThrottleView {
    pub dry_run: bool,
    pub budgets: Vec<BudgetUse>,
    pub limits: Vec<ActiveLimit>,
    /// Limit writes (and removals) since start.
    pub decisions_total: u64,
    /// Seconds any VM spent limited, summed over VMs and devices, since start.
    pub throttled_seconds_total: f64,
    /// Problems that degrade throttling (a VM sharing a cgroup, a vanished device), latest first.
    pub problems: Vec<String>,
    /// QEMU's own limits on the VMs' disks (only VMs that have some), re-read every 30 s.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub qemu_limits: Vec<VmQemuLimits>,
    /// Network storage this host's VMs used in the last interval, by QEMU's counters. No
    /// budget covers it (budgets name host block devices).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub storage: Vec<StorageUse>,
}

/// What this host's VMs did on one network storage target in an interval.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct StorageUse {
    /// `nbd://host:port/export`, `rbd:pool/image`, credentials stripped.
    pub target: String,
    pub read_iops: f64,
    pub write_iops: f64,
    /// The VMs whose disks are on it.
    pub vms: Vec<String>,
}

impl StorageUse {
    /// Per target of the report's QEMU-counted rows: rates over the interval and the VMs.
    pub fn of(report: &Report) -> Vec<StorageUse> {
        let secs = report.interval_s.max(1e-3);
        report
            .storage
            .iter()
            .map(|d| {
                let mut vms: Vec<String> = report
                    .processes
                    .iter()
                    .filter(|p| p.target.as_deref() == Some(d.device.as_str()))
                    .filter_map(|p| p.vm.as_ref().map(|v| v.name.clone()))
                    .collect();
                vms.sort();
                vms.dedup();
                StorageUse {
                    target: d.device.clone(),
                    read_iops: d.counts.read_ops as f64 / secs,
                    write_iops: d.counts.write_ops as f64 / secs,
                    vms,
                }
            })
            .collect()
    }
}

/// One tick of the daemon.
#[derive(Clone, Debug)]
pub struct Tick {
    pub at: Instant,
    pub report: Arc<Report>,
    /// Health counters, cumulative since load (indexed by `Health`).
    pub health_total: [u64; HEALTH_SLOTS as usize],
    pub maps: Vec<(&'static str, MapFill)>,
    pub programs: Vec<ProgramStat>,
    /// Time this tick took to sample and build, in seconds.
    pub sample_seconds: f64,
    pub throttle: Option<ThrottleView>,
}

/// When the control ticks ran against their schedule: how late the last one started, how long
/// the last complete one worked, and the worst of each since start. Pure: the daemon passes in
/// the times.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TickTiming {
    /// Ticks started.
    pub ticks: u64,
    /// How late the last tick started after its scheduled instant, in seconds.
    pub lateness_seconds: f64,
    /// The worst lateness since start, in seconds.
    pub lateness_max_seconds: f64,
    /// How long the last complete tick's work took (sample, throttle, export), in seconds.
    pub duration_seconds: f64,
    /// The longest tick since start, in seconds.
    pub duration_max_seconds: f64,
}

impl TickTiming {
    /// A tick scheduled for `scheduled` starts at `now` (never counted early).
    pub fn started(&mut self, scheduled: Instant, now: Instant) {
        let late = now.saturating_duration_since(scheduled).as_secs_f64();
        self.ticks += 1;
        self.lateness_seconds = late;
        self.lateness_max_seconds = self.lateness_max_seconds.max(late);
    }

    /// The tick's work is done; it took `work`.
    pub fn finished(&mut self, work: Duration) {
        let s = work.as_secs_f64();
        self.duration_seconds = s;
        self.duration_max_seconds = self.duration_max_seconds.max(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lateness_is_kept_last_and_worst() {
        let t0 = Instant::now();
        let mut t = TickTiming::default();
        t.started(t0, t0 + Duration::from_millis(3));
        t.finished(Duration::from_millis(20));
        assert_eq!(t.ticks, 1);
        assert!((t.lateness_seconds - 0.003).abs() < 1e-9);
        t.started(
            t0 + Duration::from_secs(1),
            t0 + Duration::from_millis(1250),
        );
        t.finished(Duration::from_millis(5));
        t.started(
            t0 + Duration::from_secs(2),
            t0 + Duration::from_millis(2001),
        );
        assert_eq!(t.ticks, 3);
        assert!((t.lateness_seconds - 0.001).abs() < 1e-9);
        assert!((t.lateness_max_seconds - 0.25).abs() < 1e-9);
        assert!((t.duration_seconds - 0.005).abs() < 1e-9);
        assert!((t.duration_max_seconds - 0.020).abs() < 1e-9);
    }

    #[test]
    fn storage_use_is_per_target_with_its_vms() {
        let mut r = crate::testdata::report_with(vec![]);
        r.interval_s = 2.0;
        for (vm, disk, reads) in [("web01", "d0", 40), ("db02", "d1", 20)] {
            let mut p = crate::testdata::vm_process(vm, 1, disk, reads, 10);
            p.source = crate::report::CountSource::Qemu;
            p.target = Some("rbd:pool/img".into());
            r.processes.push(p);
        }
        r.storage = crate::report::QemuBaselines::storage_of(&r.processes);
        let s = StorageUse::of(&r);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].target, "rbd:pool/img");
        assert_eq!((s[0].read_iops, s[0].write_iops), (30.0, 10.0));
        assert_eq!(s[0].vms, ["db02", "web01"]);
    }

    #[test]
    fn a_tick_that_fires_early_is_not_late() {
        let t0 = Instant::now() + Duration::from_secs(5);
        let mut t = TickTiming::default();
        t.started(t0, t0 - Duration::from_millis(2));
        assert_eq!(t.lateness_seconds, 0.0);
        assert_eq!(t.lateness_max_seconds, 0.0);
    }
}
