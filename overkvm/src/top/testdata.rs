//! Hand-built fleet reports for the view's unit tests (and the shared report builders).

pub use crate::testdata::*;
use crate::top::fleet::{self, FleetReport, FleetRow, Limits};

/// A fleet row of `reads` and `writes` per second of 4 KiB.
pub fn fleet_row(instance: &str, vm: &str, device: &str, reads: f64, writes: f64) -> FleetRow {
    FleetRow {
        instance: instance.into(),
        vm: vm.into(),
        device: device.into(),
        source: None,
        iops: reads + writes,
        read_iops: reads,
        write_iops: writes,
        read_mbs: reads * 4096.0 / 1e6,
        write_mbs: writes * 4096.0 / 1e6,
        lat_avg_us: (reads + writes > 0.0).then_some(120.0),
        iops_share: None,
        device_iops: Some(2000.0),
        limits: Limits::default(),
        qemu_limits: Vec::new(),
        throttle: String::new(),
    }
}

/// Three hosts: h2's hog is the busiest VM; web01 on h1 runs on two devices.
pub fn fleet_report() -> FleetReport {
    let vms = vec![
        fleet_row("h1:9746", "web01", "vda", 300.0, 100.0),
        fleet_row("h1:9746", "web01", "vdb", 50.0, 0.0),
        fleet_row("h1:9746", "db01", "vda", 5.0, 0.0),
        fleet_row("h2:9746", "hog", "sda", 1500.0, 0.0),
        fleet_row("h3:9746", "quiet", "nvme0n1", 1.0, 1.0),
    ];
    let device_ops: Vec<crate::top::prometheus::Sample> = [
        ("h1:9746", 2000.0),
        ("h2:9746", 2000.0),
        ("h3:9746", 2000.0),
    ]
    .iter()
    .map(|(i, v)| crate::top::prometheus::Sample {
        labels: [("instance".to_string(), i.to_string())]
            .into_iter()
            .collect(),
        value: *v,
    })
    .collect();
    FleetReport {
        timestamp: "2026-12-04T13:00:00.000Z".into(),
        prometheus: "http://prom:9090".into(),
        window_s: 60.0,
        hosts: fleet::hosts(&vms, &device_ops),
        vms,
    }
}
