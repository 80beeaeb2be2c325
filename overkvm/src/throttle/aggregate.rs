//! The throttle's first step: the interval's rows become each VM's use of one device, plus the
//! background (everything that is not a living VM) and the device's latency. The second step,
//! deciding limits, is `policy`; the third, writing them, is the service. This step is pure:
//! where the host must be asked (a process's cgroup), the caller passes the answer in.

use std::collections::BTreeMap;

use overkvm_common::Op;

use crate::{
    report::{ProcessRow, Report},
    sample::Histogram,
};

/// One VM's use of a device in an interval.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VmUse {
    /// Operations per second, (read, write).
    pub iops: (f64, f64),
    /// Bytes per second, (read, write).
    pub bps: (f64, f64),
    /// The cgroup the kernel charges its I/O to, where limits act.
    pub cgroup: Option<String>,
    pub pid: u32,
    pub uuid: Option<String>,
    /// The manager's name as config rules match it (`libvirt`, `nova`...).
    pub manager: String,
}

/// What one device carried in an interval.
#[derive(Debug, Default)]
pub struct DeviceUse {
    /// Per VM, by name.
    pub vms: BTreeMap<String, VmUse>,
    /// Everything else (other processes, kernel threads, exited VM processes), (read, write)
    /// per second.
    pub background_iops: (f64, f64),
    pub background_bps: (f64, f64),
    /// Writes kernel threads did on the device, (IOPS, B/s): the flusher's writeback, which
    /// cgroup v1 charges to no VM (part of the background).
    pub flusher: (f64, f64),
    /// Every process's read and write latencies on the device, merged.
    pub latency: Histogram,
}

/// Sums the rows `on_device` accepts over `secs` seconds. `cgroup_of(pid)` answers for a
/// VM row whose I/O cgroup the report could not name yet (a new cgroup's id not resolved).
pub fn device_use(
    report: &Report,
    secs: f64,
    mut on_device: impl FnMut(&ProcessRow) -> bool,
    cgroup_of: impl Fn(u32) -> Option<String>,
) -> DeviceUse {
    let mut out = DeviceUse::default();
    for row in report.processes.iter().filter(|r| on_device(r)) {
        out.latency.merge(&row.latency[Op::Read as usize]);
        out.latency.merge(&row.latency[Op::Write as usize]);
        let c = &row.counts;
        let iops = (c.read_ops as f64 / secs, c.write_ops as f64 / secs);
        let bps = (c.read_bytes as f64 / secs, c.write_bytes as f64 / secs);
        // Reports name a VM's process in the interval it exits too (its last I/O). For the
        // throttle only living processes are a VM: a VM whose process is gone is gone (its
        // cgroup with it), and a restarted VM is where its new process is.
        match row.vm.as_ref().filter(|_| !row.exited) {
            Some(vm) => {
                let u = out.vms.entry(vm.name.clone()).or_default();
                add(&mut u.iops, iops);
                add(&mut u.bps, bps);
                u.pid = row.pid;
                u.uuid = vm.uuid.clone();
                u.manager = serde_json::to_value(vm.manager)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                if let Some(cg) = row.io_cgroup.clone().or_else(|| cgroup_of(row.pid)) {
                    u.cgroup = Some(cg);
                }
            }
            None => {
                add(&mut out.background_iops, iops);
                add(&mut out.background_bps, bps);
                if row.kernel_thread {
                    add(&mut out.flusher, (iops.1, bps.1));
                }
            }
        }
    }
    out
}

fn add(sum: &mut (f64, f64), v: (f64, f64)) {
    sum.0 += v.0;
    sum.1 += v.1;
}

/// Who else (living, not kernel threads, not `vm` itself) did I/O charged to `cgroup` in the
/// interval: a limit written there would hold them too.
pub fn sharing(report: &Report, vm: &str, pid: u32, cgroup: &str) -> Vec<String> {
    report
        .processes
        .iter()
        .filter(|r| {
            // An exited process (a restarted VM's old one) shares nothing any more.
            r.pid != pid
                && !r.kernel_thread
                && !r.exited
                && r.vm.as_ref().is_none_or(|v| v.name != vm)
                && r.io_cgroup.as_deref() == Some(cgroup)
        })
        .map(|r| match &r.vm {
            Some(v) => format!("VM {}", v.name),
            None => format!("{} ({})", r.comm, r.pid),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata;

    /// A libvirt VM (or, without a name, a plain process) on minor `minor`; a VM's I/O is
    /// charged to `/machine/NAME`.
    fn row(pid: u32, vm: Option<&str>, minor: u32, reads: u64, writes: u64) -> ProcessRow {
        let device = format!("vd{minor}");
        let mut r = match vm {
            Some(n) => testdata::vm_process(n, pid, &device, reads, writes),
            None => testdata::process("fio", pid, &device, reads, writes),
        };
        r.minor = minor;
        if let Some(vm) = &mut r.vm {
            vm.uuid = Some(format!("uuid-{}", vm.name));
            r.io_cgroup = Some(format!("/machine/{}", vm.name));
        }
        r
    }

    fn report(rows: Vec<ProcessRow>) -> Report {
        testdata::report_with(rows)
    }

    #[test]
    fn vms_sum_their_processes_and_the_rest_is_background() {
        let mut exited = row(30, Some("b"), 0, 50, 0);
        exited.exited = true;
        let r = report(vec![
            row(10, Some("a"), 0, 100, 20),
            row(11, Some("a"), 0, 100, 0),
            row(20, None, 0, 7, 3),
            exited,
            row(40, Some("c"), 1, 999, 999),
        ]);
        let u = device_use(&r, 2.0, |r| r.minor == 0, |_| None);
        assert_eq!(u.vms.len(), 1, "c is on another device, b's process exited");
        let a = &u.vms["a"];
        assert_eq!(a.iops, (100.0, 10.0));
        assert_eq!(a.bps, (100.0 * 4096.0, 10.0 * 4096.0));
        assert_eq!(a.cgroup.as_deref(), Some("/machine/a"));
        assert_eq!(a.manager, "libvirt");
        assert_eq!(
            u.background_iops,
            (28.5, 1.5),
            "the process and b's last I/O"
        );
    }

    #[test]
    fn an_unresolved_io_cgroup_is_asked_of_the_host() {
        let mut r = row(10, Some("a"), 0, 1, 0);
        r.io_cgroup = None;
        let u = device_use(
            &report(vec![r]),
            1.0,
            |_| true,
            |pid| Some(format!("/proc-says/{pid}")),
        );
        assert_eq!(u.vms["a"].cgroup.as_deref(), Some("/proc-says/10"));
        let mut r = row(10, Some("a"), 0, 1, 0);
        r.io_cgroup = None;
        let u = device_use(&report(vec![r]), 1.0, |_| true, |_| None);
        assert_eq!(u.vms["a"].cgroup, None, "unknown stays unknown");
    }

    #[test]
    fn sharing_names_living_neighbours_only() {
        let mut other = row(20, None, 0, 1, 0);
        other.comm = "fio".into();
        other.io_cgroup = Some("/machine/a".into());
        let mut kthread = other.clone();
        kthread.pid = 21;
        kthread.kernel_thread = true;
        let mut gone = other.clone();
        gone.pid = 22;
        gone.exited = true;
        let mut second = row(30, Some("b"), 0, 1, 0);
        second.io_cgroup = Some("/machine/a".into());
        let r = report(vec![
            row(10, Some("a"), 0, 1, 0),
            row(11, Some("a"), 0, 1, 0),
            other,
            kthread,
            gone,
            second,
        ]);
        assert_eq!(
            sharing(&r, "a", 10, "/machine/a"),
            ["fio (20)".to_string(), "VM b".to_string()]
        );
        assert!(sharing(&r, "a", 10, "/machine/none").is_empty());
    }
}
