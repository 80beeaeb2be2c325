//! Hand-built reports for unit tests, shared by every module that consumes reports.

use std::collections::BTreeMap;

use crate::{
    identity::{Manager, ProcessIdentity, VmIdentity},
    report::{CountSource, DeviceRow, HealthReport, OpCounts, ProcessRow, Report, VmRef},
};

/// A non-VM process doing `reads` reads and `writes` writes of 4 KiB on `device`.
pub fn process(comm: &str, pid: u32, device: &str, reads: u64, writes: u64) -> ProcessRow {
    ProcessRow {
        pid,
        start_time: None,
        comm: comm.into(),
        vm: None,
        cgroup: String::new(),
        io_cgroup: None,
        device: device.into(),
        major: 253,
        minor: minor_of(device),
        source: CountSource::Request,
        counts: OpCounts {
            read_ops: reads,
            write_ops: writes,
            read_bytes: reads * 4096,
            write_bytes: writes * 4096,
            ..OpCounts::default()
        },
        read_bios: reads,
        write_bios: writes,
        lat_avg_us: (reads + writes > 0).then_some(100.0 + f64::from(pid)),
        lat_p99_us: (reads + writes > 0).then_some(400.0 + f64::from(pid)),
        completions: reads + writes,
        exited: false,
        kernel_thread: false,
        kernel_submitted_ops: 0,
        latency: Box::default(),
        target: None,
    }
}

/// A libvirt VM's qemu process.
pub fn vm_process(name: &str, pid: u32, device: &str, reads: u64, writes: u64) -> ProcessRow {
    ProcessRow {
        comm: "qemu-system-x86".into(),
        vm: Some(VmRef {
            name: name.into(),
            uuid: None,
            manager: Manager::Libvirt,
            namespace: None,
        }),
        ..process("", pid, device, reads, writes)
    }
}

/// What the resolver knows of a plain QEMU process `pid`: named `vm` when given, in `cgroup`;
/// `complete` false for one read inside its exec.
pub fn qemu_identity(
    pid: u32,
    start_time: u64,
    cgroup: &str,
    vm: Option<&str>,
    complete: bool,
) -> ProcessIdentity {
    ProcessIdentity {
        pid,
        start_time,
        comm: "qemu-system-x86".into(),
        cgroup: cgroup.into(),
        vm: vm.map(|name| VmIdentity {
            name: name.into(),
            uuid: None,
            manager: Manager::Qemu,
            vmid: None,
            display_name: None,
            namespace: None,
        }),
        kernel_thread: false,
        complete,
    }
}

/// Distinct device names get distinct minors (the name's bytes, summed).
fn minor_of(device: &str) -> u32 {
    device.bytes().map(u32::from).sum()
}

/// A one-second report of `processes`, with device totals summed from them.
pub fn report_with(processes: Vec<ProcessRow>) -> Report {
    let mut devices: BTreeMap<String, DeviceRow> = BTreeMap::new();
    for p in &processes {
        devices
            .entry(p.device.clone())
            .or_insert_with(|| DeviceRow {
                device: p.device.clone(),
                major: p.major,
                minor: p.minor,
                disk: p.device.clone(),
                source: CountSource::Request,
                counts: OpCounts::default(),
            })
            .counts
            .merge(&p.counts);
    }
    Report {
        timestamp: "2026-11-26T19:02:11.512Z".into(),
        interval_s: 1.0,
        mode: "io-start-done".into(),
        devices: devices.into_values().collect(),
        processes,
        cgroups: Vec::new(),
        health: HealthReport::default(),
        parity: Vec::new(),
        storage: Vec::new(),
    }
}

/// Two VMs (one on two devices), two plain processes and a hostile name.
pub fn sample_report() -> Report {
    report_with(vec![
        vm_process("web01", 4242, "vda", 1200, 800),
        vm_process("web01", 4242, "vdb", 100, 0),
        vm_process("db02", 5151, "vda", 300, 2500),
        process("fio", 777, "vda", 50, 9000),
        process("ev\x1b[2J\nil", 666, "vdb", 5, 0),
    ])
}
