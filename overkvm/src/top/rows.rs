//! The interactive view's model: one table row per process (a VM is its qemu process), merged
//! over its devices or split per device, with the derived figures (rates, shares, latency) as
//! methods and pure functions. Every string here has been through [`sanitize`] already.

use std::collections::{BTreeMap, HashMap};

use crate::{
    host::cgroup::limits::Limits,
    report::{OpCounts, ProcessRow, Report},
    sample::Histogram,
    stats,
    tick::{ActiveLimit, ThrottleView},
};

use crate::text::sanitize;

/// Events per second of `count` over an interval of `interval_s` seconds (0 for an empty one).
pub fn per_second(count: u64, interval_s: f64) -> f64 {
    stats::rate(
        count,
        std::time::Duration::try_from_secs_f64(interval_s).unwrap_or_default(),
    )
}

/// Decimal megabytes per second, as iostat's `-m` shows them.
pub fn mb_per_second(bytes: u64, interval_s: f64) -> f64 {
    per_second(bytes, interval_s) / 1e6
}

/// Share of `part` in `whole` in percent; None when `whole` is zero (nothing to share).
pub fn percent(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part as f64 * 100.0 / whole as f64)
}

/// What a process is called in the table; stable across intervals while the process lives.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RowKey {
    /// The fleet view's host ("" in the local view).
    pub host: String,
    pub pid: u32,
    pub label: String,
}

/// Whether a row stands for a whole process or one of its devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowKind {
    /// All devices of the process in one row.
    Merged { expanded: bool },
    /// One device of an expanded process; `last` is the last device of its process.
    Device { last: bool },
}

/// One line of the table.
#[derive(Clone, Debug, PartialEq)]
pub struct TopRow {
    pub key: RowKey,
    /// The fleet view's host (Prometheus instance), sanitized; "" in the local view.
    pub host: String,
    pub vm: bool,
    /// The process had exited when the interval was read.
    pub exited: bool,
    /// What the VM/COMM column shows: `vm:NAME`, the comm, or `(comm)` once exited. Sanitized.
    pub label: String,
    /// The process's comm (for a VM, its qemu binary), sanitized.
    pub comm: String,
    pub pid: u32,
    /// Device names (sanitized, sorted by name); one for a device row.
    pub devices: Vec<String>,
    pub counts: OpCounts,
    /// All ops of every process on the devices of this row, for the share.
    pub device_ops: u64,
    pub interval_s: f64,
    pub lat_avg_us: Option<f64>,
    pub lat_p99_us: Option<f64>,
    /// The throttle's limits on this row, empty when none (sanitized).
    pub throttle: String,
    pub kind: RowKind,
    /// Indices of the report's process rows this row sums (for batch output in this order).
    pub sources: Vec<usize>,
}

impl TopRow {
    pub fn read_iops(&self) -> f64 {
        per_second(self.counts.read_ops, self.interval_s)
    }

    pub fn write_iops(&self) -> f64 {
        per_second(self.counts.write_ops, self.interval_s)
    }

    /// All operations per second: reads, writes, discards, flushes and other ops.
    pub fn total_iops(&self) -> f64 {
        per_second(self.counts.total_ops(), self.interval_s)
    }

    pub fn read_mbs(&self) -> f64 {
        mb_per_second(self.counts.read_bytes, self.interval_s)
    }

    pub fn write_mbs(&self) -> f64 {
        mb_per_second(self.counts.write_bytes, self.interval_s)
    }

    /// This row's ops (all kinds) as a percentage of all ops on its devices.
    pub fn iops_share(&self) -> Option<f64> {
        percent(self.counts.total_ops(), self.device_ops)
    }

    /// Case-insensitive substring match on the label and the comm; `needle` is lower case.
    pub fn matches(&self, needle: &str) -> bool {
        needle.is_empty()
            || self.label.to_lowercase().contains(needle)
            || self.comm.to_lowercase().contains(needle)
    }
}

/// One process: its merged row and its rows per device (sorted by device name).
#[derive(Clone, Debug)]
pub struct RowGroup {
    pub merged: TopRow,
    pub per_device: Vec<TopRow>,
}

/// Groups the report's rows by process, in the report's order (see `sort` for the view's).
pub fn groups(report: &Report, throttle: Option<&ThrottleView>) -> Vec<RowGroup> {
    let device_ops: HashMap<(u32, u32), u64> = report
        .devices
        .iter()
        .map(|d| ((d.major, d.minor), d.counts.total_ops()))
        .collect();
    let mut order: Vec<u32> = Vec::new();
    let mut by_pid: HashMap<u32, Vec<(usize, &ProcessRow)>> = HashMap::new();
    for (i, p) in report.processes.iter().enumerate() {
        by_pid
            .entry(p.pid)
            .or_insert_with(|| {
                order.push(p.pid);
                Vec::new()
            })
            .push((i, p));
    }
    order
        .into_iter()
        .filter_map(|pid| by_pid.remove(&pid))
        .filter_map(|mut parts| {
            parts.sort_by(|a, b| a.1.device.cmp(&b.1.device));
            group(&parts, &device_ops, report.interval_s, throttle)
        })
        .collect()
}

fn group(
    indexed: &[(usize, &ProcessRow)],
    device_ops: &HashMap<(u32, u32), u64>,
    interval_s: f64,
    throttle: Option<&ThrottleView>,
) -> Option<RowGroup> {
    let parts: Vec<&ProcessRow> = indexed.iter().map(|(_, p)| *p).collect();
    let first = *parts.first()?;
    let label = match (&first.vm, first.exited) {
        (Some(vm), _) => format!("vm:{}", sanitize(&vm.name)),
        (None, true) => format!("({})", sanitize(&first.comm)),
        (None, false) => sanitize(&first.comm),
    };
    let vm_name = first.vm.as_ref().map(|v| v.name.as_str());
    let key = RowKey {
        host: String::new(),
        pid: first.pid,
        label: label.clone(),
    };
    let row = |parts: &[&ProcessRow], sources: Vec<usize>, kind: RowKind| {
        let mut counts = OpCounts::default();
        // Keyed by name too: every disk QEMU counts (`source: "qemu"`) has no device number.
        let mut devs = BTreeMap::new();
        for p in parts {
            counts.merge(&p.counts);
            // A network disk's storage is shared with other hosts this view cannot see: its
            // share is of what this host does on it, the disk's own ops.
            let ops_on_it = match p.source {
                crate::report::CountSource::Qemu => p.counts.total_ops(),
                _ => device_ops.get(&(p.major, p.minor)).copied().unwrap_or(0),
            };
            devs.insert(
                (p.major, p.minor, p.device.as_str()),
                (p.device.as_str(), ops_on_it),
            );
        }
        let (lat_avg_us, lat_p99_us) = merged_latency(parts);
        let mut raw_devices: Vec<&str> = devs.values().map(|(name, _)| *name).collect();
        raw_devices.sort_unstable();
        TopRow {
            key: key.clone(),
            host: String::new(),
            vm: vm_name.is_some(),
            exited: first.exited,
            label: label.clone(),
            comm: sanitize(&first.comm),
            pid: first.pid,
            devices: raw_devices.iter().map(|d| sanitize(d)).collect(),
            counts,
            device_ops: devs.values().map(|(_, ops)| ops).sum(),
            interval_s,
            lat_avg_us,
            lat_p99_us,
            throttle: throttle_text(throttle, vm_name, &raw_devices),
            kind,
            sources,
        }
    };
    let merged = row(
        &parts,
        indexed.iter().map(|(i, _)| *i).collect(),
        RowKind::Merged { expanded: false },
    );
    let per_device = indexed
        .iter()
        .enumerate()
        .map(|(n, (i, p))| {
            row(
                std::slice::from_ref(p),
                vec![*i],
                RowKind::Device {
                    last: n + 1 == parts.len(),
                },
            )
        })
        .collect();
    Some(RowGroup { merged, per_device })
}

/// Mean and p99 latency (µs) of a process over several devices. The mean is exact (weighted
/// by completions). The p99 comes from the merged histograms when they hold every completion;
/// otherwise the largest per-device p99 stands in, an upper bound of the true one.
pub fn merged_latency(parts: &[&ProcessRow]) -> (Option<f64>, Option<f64>) {
    if let [only] = parts {
        return (only.lat_avg_us, only.lat_p99_us);
    }
    let timed = || {
        parts
            .iter()
            .filter(|p| p.completions > 0 && p.lat_avg_us.is_some())
    };
    let completions: u64 = timed().map(|p| p.completions).sum();
    if completions == 0 {
        return (None, None);
    }
    let avg = timed()
        .map(|p| p.lat_avg_us.unwrap_or(0.0) * p.completions as f64)
        .sum::<f64>()
        / completions as f64;
    let mut hist = Histogram::default();
    for p in parts {
        for h in p.latency.iter() {
            hist.merge(h);
        }
    }
    let p99 = if hist.count() == completions {
        stats::quantile_us(&hist, 0.99)
    } else {
        parts.iter().filter_map(|p| p.lat_p99_us).reduce(f64::max)
    };
    (Some(avg), p99)
}

/// What the THROTTLE column says for a VM on some devices: one limit in full (`@q` when QEMU
/// holds it), several counted; then the limits QEMU itself has on the VM's disks as their owner
/// set them (`q:500` total IOPS, `q:r500/w300`, `q:wb10M`; `q:2 disks`).
pub fn throttle_text(view: Option<&ThrottleView>, vm: Option<&str>, devices: &[&str]) -> String {
    let (Some(view), Some(vm)) = (view, vm) else {
        return String::new();
    };
    let limits: Vec<&ActiveLimit> = view
        .limits
        .iter()
        .filter(|l| l.vm == vm && devices.contains(&l.device.as_str()))
        .collect();
    let mut text = match limits.as_slice() {
        [] => String::new(),
        [one] if one.qemu_disks.is_some() => format!("{}@q", limit_text(&one.rates())),
        [one] => limit_text(&one.rates()),
        many => format!("{} limits", many.len()),
    };
    let qemu: Vec<_> = view
        .qemu_limits
        .iter()
        .filter(|q| q.vm == vm)
        .flat_map(|q| q.disks.iter())
        .collect();
    let own = qemu_part(&qemu);
    if !own.is_empty() {
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str(&own);
    }
    if text.is_empty() {
        return text;
    }
    if view.dry_run && !limits.is_empty() {
        sanitize(&format!("dry {text}"))
    } else {
        sanitize(&text)
    }
}

/// A disk's QEMU limits compactly: `500` (total IOPS), `r500/w300`, `b10M`, `rb10M/wb5M`.
/// The THROTTLE column's part for the limits QEMU has on a VM's disks: `q:500` for one disk,
/// `q:2 disks` for several, "" for none (the local and the fleet view).
pub fn qemu_part(disks: &[&crate::qemu::limits::DiskLimits]) -> String {
    match disks {
        [] => String::new(),
        [one] => format!("q:{}", qemu_limit_text(one)),
        many => format!("q:{} disks", many.len()),
    }
}

pub fn qemu_limit_text(d: &crate::qemu::limits::DiskLimits) -> String {
    let iops = |p: &str, v: Option<u64>| v.map(|v| format!("{p}{v}"));
    let mb = |p: &str, v: Option<u64>| v.map(|v| format!("{p}b{}M", v / 1_000_000));
    [
        iops("", d.iops),
        iops("r", d.iops_rd),
        iops("w", d.iops_wr),
        mb("", d.bps),
        mb("r", d.bps_rd),
        mb("w", d.bps_wr),
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>()
    .join("/")
}

/// `r500 w300` for IOPS limits, `rb10M wb5M` for byte limits (decimal MB/s).
pub fn limit_text(l: &Limits) -> String {
    let mut parts = Vec::new();
    if let Some(v) = l.riops {
        parts.push(format!("r{v}"));
    }
    if let Some(v) = l.wiops {
        parts.push(format!("w{v}"));
    }
    if let Some(v) = l.rbps {
        parts.push(format!("rb{}M", v / 1_000_000));
    }
    if let Some(v) = l.wbps {
        parts.push(format!("wb{}M", v / 1_000_000));
    }
    parts.join(" ")
}

/// The header's budget note for a device: its IOPS budget and the share the interval used.
pub fn budget_text(device: &str, view: Option<&ThrottleView>) -> String {
    let budget = view.and_then(|v| {
        v.budgets
            .iter()
            .find(|b| b.device == device)
            .and_then(|b| b.iops_budget.map(|limit| (limit, b)))
    });
    match budget {
        None => view
            .and_then(|v| v.budgets.iter().find(|b| b.device == device))
            .filter(|b| b.latency_target_us.is_some())
            .map(|b| {
                let engaged = if b.engaged { " (engaged)" } else { "" };
                format!("{}{engaged}", capacity_text(b).trim_start())
            })
            .unwrap_or_else(|| "no budget".into()),
        Some((limit, b)) => {
            let used = if limit == 0 {
                String::new()
            } else {
                format!(" {:.0}% used", b.iops_used * 100.0 / limit as f64)
            };
            let engaged = if b.engaged { " (engaged)" } else { "" };
            format!("budget {limit} IOPS{used}{engaged}{}", capacity_text(b))
        }
    }
}

/// A latency-targeted device's learned capacity, for the header (empty without a target).
fn capacity_text(b: &crate::tick::BudgetUse) -> String {
    match (b.latency_target_us, b.capacity_iops) {
        (Some(t), Some(c)) => format!(" capacity {c:.0} IOPS at {:.1}ms", t / 1000.0),
        (Some(t), None) => format!(" latency target {:.1}ms", t / 1000.0),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        tick::BudgetUse,
        top::testdata::{process, report_with, vm_process},
    };

    /// Disks QEMU counts have no device number: two of them stay two devices, and their
    /// share is of their own ops (their storage's other users are on other hosts).
    #[test]
    fn network_disks_of_a_vm_stay_apart() {
        let mut r = crate::testdata::report_with(vec![]);
        for (disk, reads) in [("nbd0", 30), ("rbd1", 10)] {
            let mut p = crate::testdata::vm_process("web01", 4242, disk, reads, 0);
            p.source = crate::report::CountSource::Qemu;
            p.major = 0;
            p.minor = 0;
            p.target = Some(format!("nbd://h/{disk}"));
            r.processes.push(p);
        }
        let g = groups(&r, None);
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].merged.devices, ["nbd0", "rbd1"]);
        assert_eq!(g[0].merged.iops_share(), Some(100.0));
        assert_eq!(g[0].per_device.len(), 2);
    }

    #[test]
    fn rates_and_shares() {
        assert_eq!(per_second(500, 0.5), 1000.0);
        assert_eq!(per_second(5, 0.0), 0.0);
        assert_eq!(mb_per_second(4_000_000, 2.0), 2.0);
        assert_eq!(percent(1, 4), Some(25.0));
        assert_eq!(percent(0, 0), None);
    }

    #[test]
    fn a_process_on_two_devices_is_one_group_with_two_device_rows() {
        let r = report_with(vec![
            vm_process("web01", 10, "vdb", 300, 100),
            vm_process("web01", 10, "vda", 100, 0),
            process("dd", 20, "vda", 0, 100),
        ]);
        let g = groups(&r, None);
        assert_eq!(g.len(), 2);
        let web = &g[0];
        assert_eq!(web.merged.label, "vm:web01");
        assert_eq!(web.merged.devices, ["vda", "vdb"]);
        assert_eq!(web.merged.counts.read_ops, 400);
        // vda has 200 ops, vdb 400: web01 did 500 of the 600.
        assert_eq!(web.merged.device_ops, 600);
        assert!((web.merged.iops_share().unwrap() - 500.0 / 6.0).abs() < 1e-9);
        let devs: Vec<_> = web
            .per_device
            .iter()
            .map(|r| r.devices[0].as_str())
            .collect();
        assert_eq!(devs, ["vda", "vdb"]);
        assert_eq!(web.per_device[0].iops_share(), Some(50.0));
        assert_eq!(web.per_device[1].kind, RowKind::Device { last: true });
        assert_eq!(g[1].merged.write_iops(), 100.0);
    }

    #[test]
    fn merged_latency_weighs_by_completions() {
        let mut a = vm_process("a", 1, "vda", 10, 0);
        a.completions = 10;
        a.lat_avg_us = Some(100.0);
        a.lat_p99_us = Some(200.0);
        let mut b = vm_process("a", 1, "vdb", 30, 0);
        b.completions = 30;
        b.lat_avg_us = Some(300.0);
        b.lat_p99_us = Some(900.0);
        let (avg, p99) = merged_latency(&[&a, &b]);
        assert_eq!(avg, Some(250.0));
        // No histograms in these rows: the larger p99 bounds the merged one.
        assert_eq!(p99, Some(900.0));
        assert_eq!(merged_latency(&[&a]), (Some(100.0), Some(200.0)));
        let idle = vm_process("a", 1, "vdc", 0, 0);
        assert_eq!(merged_latency(&[&idle, &idle]), (None, None));
    }

    #[test]
    fn merged_p99_uses_histograms_when_complete() {
        let mut a = vm_process("a", 1, "vda", 100, 0);
        let mut b = vm_process("a", 1, "vdb", 100, 0);
        for (row, ns) in [(&mut a, 1_000u64), (&mut b, 1_000_000)] {
            row.latency[0].record(ns, 100);
            row.completions = 100;
            row.lat_avg_us = Some(ns as f64 / 1000.0);
        }
        let (avg, p99) = merged_latency(&[&a, &b]);
        assert_eq!(avg, Some(500.5));
        // Half the completions are slow, so the p99 is in the slow bucket.
        assert!(p99.is_some_and(|v| v >= 500.0), "{p99:?}");
    }

    #[test]
    fn hostile_names_are_sanitized_in_rows() {
        let r = report_with(vec![process("ev\x1b[2J\nil", 7, "sd\x07a", 1, 0)]);
        let row = &groups(&r, None)[0].merged;
        assert_eq!(row.label, "ev\\x1b[2J\\x0ail");
        assert_eq!(row.devices, ["sd\\x07a"]);
    }

    #[test]
    fn throttle_and_budget_texts() {
        let view = ThrottleView {
            budgets: vec![BudgetUse {
                storage: false,
                device: "vda".into(),
                iops_budget: Some(1000),
                iops_used: 620.0,
                engaged: true,
                ..BudgetUse::default()
            }],
            limits: vec![ActiveLimit {
                vm: "web01".into(),
                cgroup: "/machine.slice/x".into(),
                device: "vda".into(),
                riops: Some(500),
                wiops: Some(300),
                rbps: None,
                wbps: Some(5_000_000),
                since_s: 3.0,
                qemu_disks: None,
            }],
            ..ThrottleView::default()
        };
        assert_eq!(
            budget_text("vda", Some(&view)),
            "budget 1000 IOPS 62% used (engaged)"
        );
        assert_eq!(budget_text("vdb", Some(&view)), "no budget");
        assert_eq!(budget_text("vda", None), "no budget");
        let latency = ThrottleView {
            budgets: vec![BudgetUse {
                storage: false,
                device: "vdb".into(),
                engaged: true,
                latency_target_us: Some(10_000.0),
                capacity_iops: Some(1840.0),
                ..BudgetUse::default()
            }],
            ..ThrottleView::default()
        };
        assert_eq!(
            budget_text("vdb", Some(&latency)),
            "capacity 1840 IOPS at 10.0ms (engaged)"
        );
        assert_eq!(
            throttle_text(Some(&view), Some("web01"), &["vda", "vdb"]),
            "r500 w300 wb5M"
        );
        assert_eq!(throttle_text(Some(&view), Some("web01"), &["vdb"]), "");
        assert_eq!(throttle_text(Some(&view), Some("db"), &["vda"]), "");
        assert_eq!(throttle_text(None, Some("web01"), &["vda"]), "");
        let r = report_with(vec![vm_process("web01", 10, "vda", 1, 0)]);
        assert_eq!(groups(&r, Some(&view))[0].merged.throttle, "r500 w300 wb5M");
        // Held by QEMU, next to a QEMU limit of the operator's.
        let mut q = view.clone();
        q.limits[0].qemu_disks = Some(vec!["vda".into()]);
        let disk = |iops, bps_wr| crate::qemu::limits::DiskLimits {
            disk: "vda".into(),
            iops,
            bps_wr,
            ..Default::default()
        };
        q.qemu_limits = vec![crate::tick::VmQemuLimits {
            vm: "web01".into(),
            disks: vec![disk(Some(800), Some(10_000_000))],
        }];
        assert_eq!(
            throttle_text(Some(&q), Some("web01"), &["vda"]),
            "r500 w300 wb5M@q q:800/wb10M"
        );
        assert_eq!(
            throttle_text(Some(&q), Some("web01"), &["vdb"]),
            "q:800/wb10M"
        );
        q.qemu_limits[0].disks.push(disk(Some(5), None));
        assert_eq!(
            throttle_text(Some(&q), Some("web01"), &["vdb"]),
            "q:2 disks"
        );
    }
}
