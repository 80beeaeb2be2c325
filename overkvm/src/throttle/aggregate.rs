//! The throttle's first step: the interval's rows become each VM's use of one device, plus the
//! background (everything that is no VM) and the device's latency. The second step,
//! deciding limits, is `policy`; the third, writing them, is the service. This step is pure:
//! where the host must be asked (a process's cgroup), the caller passes the answer in.

use std::collections::BTreeMap;

use overkvm_common::Op;

use crate::{
    report::{ProcessRow, Report, VmRef},
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
    /// Its living process (0: none in the interval, only the last I/O of one that exited).
    pub pid: u32,
    pub uuid: Option<String>,
    /// The manager's name as config rules match it (`libvirt`, `nova`...).
    pub manager: String,
}

/// What one device carried in an interval.
#[derive(Debug, Default)]
pub struct DeviceUse {
    /// Per VM, by name (one VM is its name and uuid: see `same_vm`).
    pub vms: BTreeMap<String, VmUse>,
    /// Everything else (other processes, kernel threads, the last I/O of a gone VM whose name
    /// another VM has now), (read, write) per second.
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
    // Living processes first: they say where each VM is now (its pid, cgroup and uuid),
    // which an exited one's last I/O is then matched against.
    let (living, exited): (Vec<&ProcessRow>, Vec<&ProcessRow>) = report
        .processes
        .iter()
        .filter(|r| on_device(r))
        .partition(|r| !r.exited);
    for row in living.into_iter().chain(exited) {
        out.latency.merge(&row.latency[Op::Read as usize]);
        out.latency.merge(&row.latency[Op::Write as usize]);
        let c = &row.counts;
        let iops = (c.read_ops as f64 / secs, c.write_ops as f64 / secs);
        let bps = (c.read_bytes as f64 / secs, c.write_bytes as f64 / secs);
        match row
            .vm
            .as_ref()
            .filter(|v| !row.exited || same_vm(&out.vms, v))
        {
            Some(vm) => {
                let u = out.vms.entry(vm.name.clone()).or_default();
                add(&mut u.iops, iops);
                add(&mut u.bps, bps);
                if u.uuid.is_none() {
                    u.uuid = vm.uuid.clone();
                }
                if u.manager.is_empty() {
                    u.manager = vm.manager.name().to_string();
                }
                // A VM's process in the interval it exits (a restarted VM's former qemu) did
                // I/O of the VM, which counts towards its budget; but it is not where the VM
                // is: its pid and cgroup are the living process's, or unknown (pid 0).
                if !row.exited {
                    u.pid = row.pid;
                    if let Some(cg) = row.io_cgroup.clone().or_else(|| cgroup_of(row.pid)) {
                        u.cgroup = Some(cg);
                    }
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

/// Whether the exited process of `vm` ran the VM summed under its name (from its living
/// processes), or another: one VM is its name and uuid (a VM deleted and created again under
/// the same name has another uuid). An unknown uuid matches.
fn same_vm(vms: &BTreeMap<String, VmUse>, vm: &VmRef) -> bool {
    vms.get(&vm.name).is_none_or(|u| match (&u.uuid, &vm.uuid) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    })
}

fn add(sum: &mut (f64, f64), v: (f64, f64)) {
    sum.0 += v.0;
    sum.1 += v.1;
}

/// Living VM rows whose name another VM (another uuid) had before: (name, former uuid, new
/// uuid). `known` (name to uuid, as last seen) is brought up to date. A VM deleted and created
/// again under its name is a new VM: nothing the throttle held for the former one is its.
/// An unknown uuid changes nothing (it matches any).
pub fn replaced_vms(
    known: &mut BTreeMap<String, String>,
    report: &Report,
) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for r in report.processes.iter().filter(|r| !r.exited) {
        let Some((name, Some(uuid))) = r.vm.as_ref().map(|v| (&v.name, &v.uuid)) else {
            continue;
        };
        match known.insert(name.clone(), uuid.clone()) {
            Some(old) if old != *uuid => out.push((name.clone(), old, uuid.clone())),
            _ => {}
        }
    }
    out
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
        let r = report(vec![
            row(10, Some("a"), 0, 100, 20),
            row(11, Some("a"), 0, 100, 0),
            row(20, None, 0, 7, 3),
            row(40, Some("c"), 1, 999, 999),
        ]);
        let u = device_use(&r, 2.0, |r| r.minor == 0, |_| None);
        assert_eq!(u.vms.len(), 1, "c is on another device");
        let a = &u.vms["a"];
        assert_eq!(a.iops, (100.0, 10.0));
        assert_eq!(a.bps, (100.0 * 4096.0, 10.0 * 4096.0));
        assert_eq!(a.cgroup.as_deref(), Some("/machine/a"));
        assert_eq!(a.manager, "libvirt");
        assert_eq!(u.background_iops, (3.5, 1.5), "the process");
    }

    /// A restarted VM: its former qemu's last I/O (the row of a process that exited, listed
    /// first) counts towards the VM, which is where its new process is. A VM that stopped
    /// counts its last I/O too, with no process to hold (pid 0, no cgroup). A VM created
    /// again under the same name (another uuid) is another VM: the gone one's I/O is
    /// background.
    #[test]
    fn a_restarted_vms_last_io_counts_towards_it_and_it_is_where_its_new_process_is() {
        let mut old = row(10, Some("a"), 0, 50, 0);
        old.exited = true;
        old.io_cgroup = Some("/machine/a-1".into());
        let mut new = row(11, Some("a"), 0, 30, 0);
        new.io_cgroup = Some("/machine/a-2".into());
        let mut stopped = row(20, Some("b"), 0, 8, 0);
        stopped.exited = true;
        let mut other = row(30, Some("c"), 0, 4, 0);
        other.exited = true;
        other.vm.as_mut().unwrap().uuid = Some("uuid-of-a-former-c".into());
        let c = row(31, Some("c"), 0, 2, 0);
        let u = device_use(
            &report(vec![old, stopped, other, new, c]),
            1.0,
            |_| true,
            |_| None,
        );
        let a = &u.vms["a"];
        assert_eq!(a.iops.0, 80.0, "both processes' reads");
        assert_eq!((a.pid, a.cgroup.as_deref()), (11, Some("/machine/a-2")));
        let b = &u.vms["b"];
        assert_eq!((b.iops.0, b.pid, b.cgroup.as_deref()), (8.0, 0, None));
        assert_eq!(b.uuid.as_deref(), Some("uuid-b"));
        assert_eq!(u.vms["c"].iops.0, 2.0);
        assert_eq!(u.background_iops.0, 4.0, "the former c's");
    }

    #[test]
    fn a_vm_created_again_under_its_name_is_a_new_vm() {
        let mut known = BTreeMap::new();
        let with_uuid = |pid, name: &str, uuid: Option<&str>, exited| {
            let mut r = row(pid, Some(name), 0, 1, 0);
            r.vm.as_mut().unwrap().uuid = uuid.map(str::to_string);
            r.exited = exited;
            r
        };
        let first = report(vec![with_uuid(10, "a", Some("u1"), false)]);
        assert!(replaced_vms(&mut known, &first).is_empty());
        // Restarted (same uuid), a uuid not read, the former process's last row: the same VM.
        let same = report(vec![
            with_uuid(11, "a", Some("u1"), false),
            with_uuid(12, "a", None, false),
            with_uuid(10, "a", Some("u0"), true),
        ]);
        assert!(replaced_vms(&mut known, &same).is_empty());
        let again = report(vec![with_uuid(13, "a", Some("u2"), false)]);
        assert_eq!(
            replaced_vms(&mut known, &again),
            [("a".to_string(), "u1".to_string(), "u2".to_string())]
        );
        assert!(replaced_vms(&mut known, &again).is_empty(), "said once");
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
}
