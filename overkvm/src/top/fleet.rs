//! The fleet view, `overkvm-io top --prometheus URL`: the busiest VMs across every host a
//! Prometheus scrapes (a host is an `instance`), from the metrics each host's `overkvm-io
//! serve` exports. Rates come from PromQL over the `--window`; the same columns, sort and
//! defaults as the local view (busiest first), in batch text, JSON lines or the interactive
//! view.
//!
//! Only stable series are read: the operation and byte counters, the latency histogram's
//! exact `_sum` and `_count` (never its buckets, whose layout may change), the throttle's
//! limit gauges, QEMU's own limit gauges and the device counters. Joining the answers into
//! rows is pure.

use std::{
    collections::{BTreeMap, HashMap},
    io::Write as _,
    time::Duration,
};

use anyhow::Context as _;
use serde::Serialize;

use super::TopOptions;
use super::{
    batch::fit,
    columns::{Column, SortKey, compare_keys},
    prometheus::{Client, Sample},
    rows::{RowGroup, RowKey, RowKind, TopRow, limit_text, qemu_part},
    sort::SortOrder,
};
use crate::{
    export::names,
    host::cgroup::limits::Limits as Rates,
    qemu::limits::DiskLimits,
    report::OpCounts,
    text::{escape_controls, sanitize},
};

/// The throttle's limits on one VM and device (absent where none).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Limits {
    pub riops: Option<f64>,
    pub wiops: Option<f64>,
    pub rbps: Option<f64>,
    pub wbps: Option<f64>,
}

impl Limits {
    fn is_empty(&self) -> bool {
        *self == Limits::default()
    }

    /// `r990 w20` as the local view's THROTTLE column writes it.
    pub fn text(&self) -> String {
        let whole = |v: Option<f64>| v.map(|v| v.max(0.0).round() as u64);
        limit_text(&Rates {
            riops: whole(self.riops),
            wiops: whole(self.wiops),
            rbps: whole(self.rbps),
            wbps: whole(self.wbps),
        })
    }
}

/// One VM on one device of one host, over the window.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FleetRow {
    /// The host: Prometheus's `instance` label.
    pub instance: String,
    pub vm: String,
    pub device: String,
    /// `qemu` for a disk QEMU counts (network storage, named as the VM's configuration names
    /// it), None for a host block device.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// All operations per second (reads, writes, discards, flushes, other).
    pub iops: f64,
    pub read_iops: f64,
    pub write_iops: f64,
    pub read_mbs: f64,
    pub write_mbs: f64,
    /// Mean latency from the histogram's exact sum and count, in µs (None without I/O).
    pub lat_avg_us: Option<f64>,
    /// The row's operations as a share of its host device's, in percent.
    pub iops_share: Option<f64>,
    /// All operations per second on the row's device of its host (VMs or not).
    pub device_iops: Option<f64>,
    pub limits: Limits,
    /// Limits QEMU itself enforces on the VM's disks as their owner set them (the host's
    /// `overkvm_vm_qemu_limit_*` gauges; per disk, not per host device).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub qemu_limits: Vec<DiskLimits>,
    /// The limits as text (`r990 w20`, then `q:500` for QEMU's own), "" when none.
    pub throttle: String,
}

/// One host's VMs together.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HostRow {
    pub instance: String,
    /// VMs with a row (I/O in the window, or a limit).
    pub vms: usize,
    pub iops: f64,
    pub read_iops: f64,
    pub write_iops: f64,
    pub read_mbs: f64,
    pub write_mbs: f64,
    /// All operations on the host's devices, VMs or not.
    pub device_iops: f64,
}

/// One refresh of the fleet view: what `--json` prints per line.
#[derive(Clone, Debug, Serialize)]
pub struct FleetReport {
    pub timestamp: String,
    pub prometheus: String,
    pub window_s: f64,
    pub hosts: Vec<HostRow>,
    pub vms: Vec<FleetRow>,
}

/// The PromQL range of a window: whole milliseconds, as Prometheus accepts them.
pub fn range(window: Duration) -> String {
    format!("{}ms", window.as_millis().max(1))
}

/// The queries one refresh runs, by what they give.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Queries {
    /// Operations per second by instance, vm, device and op.
    pub ops: String,
    /// Bytes per second by instance, vm, device and op.
    pub bytes: String,
    /// Latency-seconds per second and completions per second by instance, vm, device (their
    /// ratio is the mean latency; kept apart so that an idle row is not a NaN).
    pub lat_sum: String,
    pub lat_count: String,
    /// Limits by instance, vm, device and direction.
    pub limit_iops: String,
    pub limit_bps: String,
    /// QEMU's own limits by instance, vm, disk and direction.
    pub qemu_iops: String,
    pub qemu_bps: String,
    /// All operations per second by instance and device.
    pub device_ops: String,
}

/// QEMU's own limits are per disk of a VM, not per host device.
const QEMU_BY: &str = "instance, vm, disk, direction";

/// A gauge's value by these labels (one series each: `max`, as a limit is one figure).
fn gauge(by: &str, m: &names::Metric) -> String {
    format!("max by ({by}) ({})", m.exposed())
}

impl Queries {
    pub fn new(window: Duration) -> Queries {
        let w = range(window);
        // With `source`: a disk QEMU counts may be named like a host device (a libvirt `vda`)
        // and must not be summed with it.
        let by = "instance, vm, device, source";
        let lat = names::VM_IO_LATENCY.exposed();
        Queries {
            ops: format!(
                "sum by ({by}, op) (rate({}[{w}]))",
                names::VM_IO_OPERATIONS.exposed()
            ),
            bytes: format!(
                "sum by ({by}, op) (rate({}[{w}]))",
                names::VM_IO_BYTES.exposed()
            ),
            lat_sum: format!("sum by ({by}) (rate({lat}_sum[{w}]))"),
            lat_count: format!("sum by ({by}) (rate({lat}_count[{w}]))"),
            limit_iops: gauge(&format!("{by}, direction"), &names::THROTTLE_LIMIT_IOPS),
            limit_bps: gauge(&format!("{by}, direction"), &names::THROTTLE_LIMIT_BPS),
            qemu_iops: gauge(QEMU_BY, &names::VM_QEMU_LIMIT_IOPS),
            qemu_bps: gauge(QEMU_BY, &names::VM_QEMU_LIMIT_BPS),
            device_ops: format!(
                "sum by (instance, device) (rate({}[{w}]))",
                names::DEVICE_IO_OPERATIONS.exposed()
            ),
        }
    }
}

/// The answers to [`Queries`].
#[derive(Clone, Debug, Default)]
pub struct Answers {
    pub ops: Vec<Sample>,
    pub bytes: Vec<Sample>,
    pub lat_sum: Vec<Sample>,
    pub lat_count: Vec<Sample>,
    pub limit_iops: Vec<Sample>,
    pub limit_bps: Vec<Sample>,
    pub qemu_iops: Vec<Sample>,
    pub qemu_bps: Vec<Sample>,
    pub device_ops: Vec<Sample>,
}

impl Answers {
    pub fn fetch(client: &Client, q: &Queries) -> anyhow::Result<Answers> {
        Ok(Answers {
            ops: client.query(&q.ops)?,
            bytes: client.query(&q.bytes)?,
            lat_sum: client.query(&q.lat_sum)?,
            lat_count: client.query(&q.lat_count)?,
            limit_iops: client.query(&q.limit_iops)?,
            limit_bps: client.query(&q.limit_bps)?,
            qemu_iops: client.query(&q.qemu_iops)?,
            qemu_bps: client.query(&q.qemu_bps)?,
            device_ops: client.query(&q.device_ops)?,
        })
    }
}

/// Host, VM, device and source (`""` for a host block device, `qemu` for a QEMU-counted disk).
type RowId = (String, String, String, String);

fn row_id(s: &Sample) -> RowId {
    (
        s.label("instance").to_string(),
        s.label("vm").to_string(),
        s.label("device").to_string(),
        s.label("source").to_string(),
    )
}

#[derive(Default)]
struct Acc {
    ops: f64,
    read_ops: f64,
    write_ops: f64,
    read_bytes: f64,
    write_bytes: f64,
    lat_sum: f64,
    lat_count: f64,
    limits: Limits,
}

/// Joins the answers into one row per host, VM and device; rows without I/O in the window
/// and without a limit are left out. Unsorted.
pub fn join(a: &Answers) -> Vec<FleetRow> {
    let mut acc: BTreeMap<RowId, Acc> = BTreeMap::new();
    for s in &a.ops {
        let e = acc.entry(row_id(s)).or_default();
        e.ops += s.value;
        match s.label("op") {
            "read" => e.read_ops += s.value,
            "write" => e.write_ops += s.value,
            _ => {}
        }
    }
    for s in &a.bytes {
        let e = acc.entry(row_id(s)).or_default();
        match s.label("op") {
            "read" => e.read_bytes += s.value,
            "write" => e.write_bytes += s.value,
            _ => {}
        }
    }
    for s in &a.lat_sum {
        acc.entry(row_id(s)).or_default().lat_sum += s.value;
    }
    for s in &a.lat_count {
        acc.entry(row_id(s)).or_default().lat_count += s.value;
    }
    for (samples, iops) in [(&a.limit_iops, true), (&a.limit_bps, false)] {
        for s in samples {
            let l = &mut acc.entry(row_id(s)).or_default().limits;
            let slot = match (iops, s.label("direction")) {
                (true, "read") => &mut l.riops,
                (true, "write") => &mut l.wiops,
                (false, "read") => &mut l.rbps,
                (false, "write") => &mut l.wbps,
                _ => continue,
            };
            *slot = Some(s.value);
        }
    }
    // QEMU's own limits, by host and VM, then disk.
    let mut qemu: BTreeMap<(&str, &str), BTreeMap<&str, DiskLimits>> = BTreeMap::new();
    for (samples, iops) in [(&a.qemu_iops, true), (&a.qemu_bps, false)] {
        for s in samples {
            let disk = s.label("disk");
            let d = qemu
                .entry((s.label("instance"), s.label("vm")))
                .or_default()
                .entry(disk)
                .or_insert_with(|| DiskLimits {
                    disk: disk.to_string(),
                    ..DiskLimits::default()
                });
            let slot = match (iops, s.label("direction")) {
                (true, "total") => &mut d.iops,
                (true, "read") => &mut d.iops_rd,
                (true, "write") => &mut d.iops_wr,
                (false, "total") => &mut d.bps,
                (false, "read") => &mut d.bps_rd,
                (false, "write") => &mut d.bps_wr,
                _ => continue,
            };
            *slot = (s.value.is_finite() && s.value >= 0.0).then(|| s.value.round() as u64);
        }
    }
    let device_ops: HashMap<(&str, &str), f64> = a
        .device_ops
        .iter()
        .map(|s| ((s.label("instance"), s.label("device")), s.value))
        .collect();
    acc.into_iter()
        .filter(|(_, e)| e.ops > 0.0 || e.read_bytes + e.write_bytes > 0.0 || !e.limits.is_empty())
        .map(|((instance, vm, device, source), e)| {
            // A QEMU-counted disk has no host device: its share is of its own ops (its
            // storage's other users are elsewhere), as in the local view.
            let dev_total = if source.is_empty() {
                device_ops
                    .get(&(instance.as_str(), device.as_str()))
                    .copied()
                    .unwrap_or(0.0)
            } else {
                e.ops
            };
            let qemu_limits: Vec<DiskLimits> = qemu
                .get(&(instance.as_str(), vm.as_str()))
                .map(|d| d.values().cloned().collect())
                .unwrap_or_default();
            let own = qemu_part(&qemu_limits.iter().collect::<Vec<_>>());
            let throttle = [e.limits.text(), own]
                .into_iter()
                .filter(|t| !t.is_empty())
                .collect::<Vec<_>>()
                .join(" ");
            FleetRow {
                throttle,
                qemu_limits,
                iops_share: (dev_total > 0.0).then(|| e.ops * 100.0 / dev_total),
                device_iops: (dev_total > 0.0).then_some(dev_total),
                lat_avg_us: (e.lat_count > 0.0).then(|| e.lat_sum / e.lat_count * 1e6),
                instance,
                vm,
                device,
                source: (!source.is_empty()).then_some(source),
                iops: e.ops,
                read_iops: e.read_ops,
                write_iops: e.write_ops,
                read_mbs: e.read_bytes / 1e6,
                write_mbs: e.write_bytes / 1e6,
                limits: e.limits,
            }
        })
        .collect()
}

/// The hosts' totals over their rows, with their devices' totals (busiest first).
pub fn hosts(rows: &[FleetRow], device_ops: &[Sample]) -> Vec<HostRow> {
    let mut by: BTreeMap<&str, HostRow> = BTreeMap::new();
    for r in rows {
        let h = by
            .entry(r.instance.as_str())
            .or_insert_with(|| HostRow::new(&r.instance));
        h.iops += r.iops;
        h.read_iops += r.read_iops;
        h.write_iops += r.write_iops;
        h.read_mbs += r.read_mbs;
        h.write_mbs += r.write_mbs;
    }
    for s in device_ops {
        by.entry(s.label("instance"))
            .or_insert_with(|| HostRow::new(s.label("instance")))
            .device_iops += s.value;
    }
    let mut out: Vec<HostRow> = by.into_values().collect();
    // A VM on two devices is one VM.
    for h in &mut out {
        let mut vms: Vec<&str> = rows
            .iter()
            .filter(|r| r.instance == h.instance)
            .map(|r| r.vm.as_str())
            .collect();
        vms.sort_unstable();
        vms.dedup();
        h.vms = vms.len();
    }
    out.sort_by(|a, b| {
        b.iops
            .total_cmp(&a.iops)
            .then_with(|| a.instance.cmp(&b.instance))
    });
    out
}

impl HostRow {
    fn new(instance: &str) -> HostRow {
        HostRow {
            instance: instance.to_string(),
            vms: 0,
            iops: 0.0,
            read_iops: 0.0,
            write_iops: 0.0,
            read_mbs: 0.0,
            write_mbs: 0.0,
            device_iops: 0.0,
        }
    }
}

/// What a column sorts a fleet row by: the local view's columns, with HOST for the host and
/// no PID or p99 (Prometheus has neither per row).
pub fn sort_key(column: Column, r: &FleetRow) -> SortKey<'_> {
    let num = |v: Option<f64>| v.map_or(SortKey::Missing, SortKey::Number);
    match column {
        Column::Name => SortKey::Text(&r.vm),
        Column::Host => SortKey::Text(&r.instance),
        Column::Pid | Column::LatP99 => SortKey::Missing,
        Column::Device => SortKey::Text(&r.device),
        Column::TotalIops => SortKey::Number(r.iops),
        Column::ReadIops => SortKey::Number(r.read_iops),
        Column::WriteIops => SortKey::Number(r.write_iops),
        Column::ReadMbs => SortKey::Number(r.read_mbs),
        Column::WriteMbs => SortKey::Number(r.write_mbs),
        Column::LatAvg => num(r.lat_avg_us),
        Column::IopsShare => num(r.iops_share),
        Column::Throttle if r.throttle.is_empty() => SortKey::Missing,
        Column::Throttle => SortKey::Text(&r.throttle),
    }
}

/// Sorts fleet rows like the local view: the column, then host, VM and device.
pub fn sort_rows(rows: &mut [FleetRow], sort: SortOrder) {
    rows.sort_by(|a, b| {
        compare_keys(
            &sort_key(sort.column, a),
            &sort_key(sort.column, b),
            sort.descending(),
        )
        .then_with(|| a.instance.cmp(&b.instance))
        .then_with(|| a.vm.cmp(&b.vm))
        .then_with(|| a.device.cmp(&b.device))
    });
}

/// One refresh: queries, joins and sorts.
pub fn fetch_report(
    client: &Client,
    queries: &Queries,
    window: Duration,
    sort: SortOrder,
) -> anyhow::Result<FleetReport> {
    let answers = Answers::fetch(client, queries)?;
    let mut vms = join(&answers);
    sort_rows(&mut vms, sort);
    Ok(FleetReport {
        timestamp: crate::report::rfc3339(std::time::SystemTime::now()),
        prometheus: client.url.to_string(),
        window_s: window.as_secs_f64(),
        hosts: hosts(&vms, &answers.device_ops),
        vms,
    })
}

/// The interactive view's rows: one group per host and VM, merged over its devices, each
/// device a row of its own when expanded. Rates become operations over the window (the view's
/// interval), so every column, sort and share of the local view applies unchanged.
pub fn groups(report: &FleetReport) -> Vec<RowGroup> {
    let window = report.window_s.max(1e-3);
    let ops = |per_s: f64| (per_s.max(0.0) * window).round() as u64;
    let bytes = |mb_s: f64| (mb_s.max(0.0) * 1e6 * window).round() as u64;
    let mut by: BTreeMap<(&str, &str), Vec<(usize, &FleetRow)>> = BTreeMap::new();
    for (i, r) in report.vms.iter().enumerate() {
        by.entry((r.instance.as_str(), r.vm.as_str()))
            .or_default()
            .push((i, r));
    }
    let row = |key: &RowKey, parts: &[(usize, &FleetRow)], kind: RowKind| {
        let mut counts = OpCounts::default();
        let (mut timed, mut lat_weighted) = (0.0, 0.0);
        let mut devices: Vec<String> = Vec::new();
        let mut device_ops = 0;
        let mut limits: Vec<&str> = Vec::new();
        for (_, r) in parts {
            counts.read_ops += ops(r.read_iops);
            counts.write_ops += ops(r.write_iops);
            counts.other_ops += ops(r.iops - r.read_iops - r.write_iops);
            counts.read_bytes += bytes(r.read_mbs);
            counts.write_bytes += bytes(r.write_mbs);
            if let Some(lat) = r.lat_avg_us {
                timed += r.iops;
                lat_weighted += lat * r.iops;
            }
            devices.push(sanitize(&r.device));
            device_ops += r.device_iops.map_or(0, ops);
            if !r.throttle.is_empty() {
                limits.push(&r.throttle);
            }
        }
        devices.sort();
        TopRow {
            key: key.clone(),
            host: key.host.clone(),
            vm: true,
            exited: false,
            label: key.label.clone(),
            comm: key.host.clone(),
            pid: 0,
            devices,
            counts,
            device_ops,
            interval_s: window,
            lat_avg_us: (timed > 0.0).then(|| lat_weighted / timed),
            lat_p99_us: None,
            throttle: match limits.as_slice() {
                [] => String::new(),
                [one] => sanitize(one),
                many => format!("{} limits", many.len()),
            },
            kind,
            sources: parts.iter().map(|(i, _)| *i).collect(),
        }
    };
    by.into_iter()
        .map(|((instance, vm), parts)| {
            let key = RowKey {
                host: sanitize(instance),
                pid: 0,
                // Our exporter has escaped the name already (`\x1b`): show the label as
                // Prometheus holds it, and still never a raw control from another exporter.
                label: format!("vm:{}", escape_controls(vm)),
            };
            let merged = row(&key, &parts, RowKind::Merged { expanded: false });
            let per_device = parts
                .iter()
                .enumerate()
                .map(|(n, part)| {
                    row(
                        &key,
                        std::slice::from_ref(part),
                        RowKind::Device {
                            last: n + 1 == parts.len(),
                        },
                    )
                })
                .collect();
            RowGroup { merged, per_device }
        })
        .collect()
}

/// The interactive fleet view's refresher: a report (or the refresh's error) per `-d`, the
/// first one interval from now (the caller has just made one), handed to `send` by value
/// until it returns false; pause and interval changes arrive over `control`.
pub(super) fn refresh_loop(
    client: &Client,
    queries: &Queries,
    window: Duration,
    sort: SortOrder,
    mut delay: Duration,
    send: &dyn Fn(Result<FleetReport, String>) -> bool,
    control: &std::sync::mpsc::Receiver<super::SamplerControl>,
) {
    use std::{sync::mpsc::RecvTimeoutError, time::Instant};
    let mut paused = false;
    let mut taken = Instant::now();
    loop {
        // A new interval counts from the last refresh, so `-` takes effect at once.
        loop {
            let wait = (taken + delay).saturating_duration_since(Instant::now());
            if wait.is_zero() {
                break;
            }
            match control.recv_timeout(wait) {
                Ok(super::SamplerControl::Interval(d)) => delay = d,
                Ok(super::SamplerControl::Pause(p)) => paused = p,
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        taken = Instant::now();
        if paused {
            continue;
        }
        let report = fetch_report(client, queries, window, sort).map_err(|e| format!("{e:#}"));
        if !send(report) {
            return;
        }
    }
}

fn opt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.0}"))
}

/// Writes one refresh as text.
pub fn write_table(out: &mut impl std::io::Write, r: &FleetReport) -> std::io::Result<()> {
    writeln!(
        out,
        "overkvm-io top - {}  prometheus {}  window {}s  hosts {}  VMs {}",
        r.timestamp,
        sanitize(&r.prometheus),
        r.window_s,
        r.hosts.len(),
        r.hosts.iter().map(|h| h.vms).sum::<usize>(),
    )?;
    writeln!(
        out,
        "{:<24} {:>5} {:>9} {:>9} {:>9} {:>8} {:>8} {:>10}",
        "HOST", "VMS", "IO/s", "R/s", "W/s", "RMB/s", "WMB/s", "DEV IO/s"
    )?;
    for h in &r.hosts {
        writeln!(
            out,
            "{:<24} {:>5} {:>9.0} {:>9.0} {:>9.0} {:>8.1} {:>8.1} {:>10.0}",
            fit(&sanitize(&h.instance), 24),
            h.vms,
            h.iops,
            h.read_iops,
            h.write_iops,
            h.read_mbs,
            h.write_mbs,
            h.device_iops
        )?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "{:<24} {:<24} {:<10} {:>8} {:>8} {:>8} {:>7} {:>7} {:>8} {:>6}  THROTTLE",
        "HOST", "VM", "DEVICE", "IO/s", "R/s", "W/s", "RMB/s", "WMB/s", "AVG(us)", "%IOPS"
    )?;
    for v in &r.vms {
        writeln!(
            out,
            "{:<24} {:<24} {:<10} {:>8.0} {:>8.0} {:>8.0} {:>7.1} {:>7.1} {:>8} {:>6}  {}",
            fit(&sanitize(&v.instance), 24),
            fit(&escape_controls(&v.vm), 24),
            fit(&sanitize(&v.device), 10),
            v.iops,
            v.read_iops,
            v.write_iops,
            v.read_mbs,
            v.write_mbs,
            opt(v.lat_avg_us),
            v.iops_share
                .map_or_else(|| "-".into(), |p| format!("{p:.1}")),
            sanitize(&v.throttle),
        )?;
    }
    writeln!(out)
}

/// Runs the fleet view in batch mode: one table (or JSON line) per `-d`, the first at once.
pub fn run_batch(args: &TopOptions, url: &str) -> anyhow::Result<()> {
    let client = Client::with_config(url, args.http_config.as_deref())?;
    let queries = Queries::new(args.window);
    let stdout = std::io::stdout();
    let mut done = 0u64;
    loop {
        if args.iterations.is_some_and(|n| done >= n) {
            return Ok(());
        }
        if done > 0 {
            std::thread::sleep(args.delay);
        }
        let report = match fetch_report(&client, &queries, args.window, args.sort) {
            Ok(r) => r,
            // Later refreshes ride out a Prometheus restart; the first one says what is wrong.
            Err(e) if done > 0 => {
                log::warn!("{e:#}");
                done += 1;
                continue;
            }
            Err(e) => return Err(e),
        };
        let mut out = stdout.lock();
        let written = if args.json {
            serde_json::to_writer(&mut out, &report)
                .context("encoding JSON")
                .and_then(|_| writeln!(out).context("writing"))
        } else {
            write_table(&mut out, &report).context("writing")
        };
        if let Err(e) = written.and_then(|_| out.flush().context("flushing")) {
            if super::is_broken_pipe(&e) {
                return Ok(());
            }
            return Err(e);
        }
        done += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(labels: &[(&str, &str)], value: f64) -> Sample {
        Sample {
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            value,
        }
    }

    fn vm(instance: &str, vm: &str, device: &str) -> Vec<(&'static str, String)> {
        vec![
            ("instance", instance.to_string()),
            ("vm", vm.to_string()),
            ("device", device.to_string()),
        ]
    }

    fn with(base: &[(&'static str, String)], extra: &[(&'static str, &str)]) -> Sample {
        let mut l: Vec<(&str, &str)> = base.iter().map(|(k, v)| (*k, v.as_str())).collect();
        l.extend_from_slice(extra);
        sample(&l, 0.0)
    }

    fn at(mut s: Sample, v: f64) -> Sample {
        s.value = v;
        s
    }

    /// Host h1: web01 reads 300/s and writes 100/s with a limit, db01 flushes only;
    /// host h2: hog reads 1000/s; an idle VM with no limit is left out.
    fn answers() -> Answers {
        let web = vm("h1:9746", "web01", "nvme0n1");
        let db = vm("h1:9746", "db01", "nvme0n1");
        let hog = vm("h2:9746", "hog", "sda");
        let idle = vm("h2:9746", "idle", "sda");
        Answers {
            ops: vec![
                at(with(&web, &[("op", "read")]), 300.0),
                at(with(&web, &[("op", "write")]), 100.0),
                at(with(&db, &[("op", "flush")]), 5.0),
                at(with(&hog, &[("op", "read")]), 1000.0),
                at(with(&idle, &[("op", "read")]), 0.0),
            ],
            bytes: vec![
                at(with(&web, &[("op", "read")]), 1_228_800.0),
                at(with(&web, &[("op", "write")]), 409_600.0),
                at(with(&hog, &[("op", "read")]), 4_096_000.0),
            ],
            lat_sum: vec![
                at(with(&web, &[]), 400.0 * 250e-6),
                at(with(&hog, &[]), 1000.0 * 80e-6),
                at(with(&idle, &[]), 0.0),
            ],
            lat_count: vec![
                at(with(&web, &[]), 400.0),
                at(with(&hog, &[]), 1000.0),
                at(with(&idle, &[]), 0.0),
            ],
            limit_iops: vec![
                at(with(&web, &[("direction", "read")]), 990.0),
                at(with(&web, &[("direction", "write")]), 20.0),
                at(with(&web, &[("direction", "sideways")]), 1.0),
            ],
            limit_bps: vec![at(with(&web, &[("direction", "write")]), 5_000_000.0)],
            qemu_iops: vec![
                sample(
                    &[
                        ("instance", "h2:9746"),
                        ("vm", "hog"),
                        ("disk", "vda"),
                        ("direction", "total"),
                    ],
                    500.0,
                ),
                sample(
                    &[
                        ("instance", "h1:9746"),
                        ("vm", "hog"),
                        ("disk", "vda"),
                        ("direction", "total"),
                    ],
                    7.0,
                ),
            ],
            qemu_bps: vec![sample(
                &[
                    ("instance", "h2:9746"),
                    ("vm", "hog"),
                    ("disk", "vda"),
                    ("direction", "write"),
                ],
                10_000_000.0,
            )],
            device_ops: vec![
                sample(&[("instance", "h1:9746"), ("device", "nvme0n1")], 500.0),
                sample(&[("instance", "h2:9746"), ("device", "sda")], 1000.0),
            ],
        }
    }

    #[test]
    fn rows_join_every_answer() {
        let mut rows = join(&answers());
        sort_rows(&mut rows, SortOrder::DEFAULT);
        let who: Vec<&str> = rows.iter().map(|r| r.vm.as_str()).collect();
        assert_eq!(who, ["hog", "web01", "db01"]);
        let web = &rows[1];
        assert_eq!(
            (web.iops, web.read_iops, web.write_iops),
            (400.0, 300.0, 100.0)
        );
        assert_eq!(web.read_mbs, 1.2288);
        assert!((web.lat_avg_us.unwrap() - 250.0).abs() < 1e-9);
        assert_eq!(web.iops_share, Some(80.0));
        assert_eq!(web.limits.riops, Some(990.0));
        assert_eq!(web.limits.wbps, Some(5e6));
        assert_eq!(web.throttle, "r990 w20 wb5M");
        let db = &rows[2];
        assert_eq!((db.iops, db.read_iops, db.lat_avg_us), (5.0, 0.0, None));
        assert_eq!(db.throttle, "");
        assert_eq!(rows[0].iops_share, Some(100.0));
        // QEMU's own limits join by host and VM (another host's VM of the same name has
        // its own).
        assert_eq!(rows[0].throttle, "q:500/wb10M");
        assert_eq!(rows[0].qemu_limits[0].iops, Some(500));
        assert!(web.qemu_limits.is_empty());
    }

    /// A libvirt domain's network disk `vda` (source="qemu") and the host's own `vda` stay
    /// two rows; the network disk's share is of its own ops, not the host device's.
    #[test]
    fn a_qemu_disk_named_like_a_host_device_is_its_own_row() {
        let host = vm("h1:9746", "web01", "vda");
        let mut net = host.clone();
        net.push(("source", "qemu".into()));
        let a = Answers {
            ops: vec![
                at(with(&host, &[("op", "read")]), 100.0),
                at(with(&net, &[("op", "read")]), 40.0),
            ],
            device_ops: vec![sample(&[("instance", "h1:9746"), ("device", "vda")], 400.0)],
            ..Answers::default()
        };
        let mut rows = join(&a);
        sort_rows(&mut rows, SortOrder::DEFAULT);
        assert_eq!(rows.len(), 2, "{rows:?}");
        let (h, q) = (&rows[0], &rows[1]);
        assert_eq!(
            (h.iops, h.source.as_deref(), h.iops_share),
            (100.0, None, Some(25.0))
        );
        assert_eq!(
            (q.iops, q.source.as_deref(), q.iops_share),
            (40.0, Some("qemu"), Some(100.0))
        );
        assert!(
            Queries::new(Duration::from_secs(60))
                .ops
                .contains("device, source")
        );
    }

    #[test]
    fn hosts_sum_their_vms() {
        let a = answers();
        let rows = join(&a);
        let h = hosts(&rows, &a.device_ops);
        assert_eq!(h.len(), 2);
        assert_eq!(
            (h[0].instance.as_str(), h[0].iops, h[0].vms),
            ("h2:9746", 1000.0, 1)
        );
        assert_eq!(
            (h[1].instance.as_str(), h[1].iops, h[1].vms),
            ("h1:9746", 405.0, 2)
        );
        assert_eq!(h[1].device_iops, 500.0);
    }

    #[test]
    fn sorting_follows_the_local_columns() {
        let mut rows = join(&answers());
        let order = |rows: &[FleetRow]| rows.iter().map(|r| r.vm.clone()).collect::<Vec<_>>();
        for (column, reversed, want) in [
            (Column::Name, false, ["db01", "hog", "web01"]),
            (Column::Name, true, ["web01", "hog", "db01"]),
            (Column::Host, false, ["db01", "web01", "hog"]),
            (Column::WriteIops, false, ["web01", "db01", "hog"]),
            (Column::TotalIops, true, ["db01", "web01", "hog"]),
            // Without a latency (db01) or a limit, a row sorts last either way.
            (Column::LatAvg, false, ["web01", "hog", "db01"]),
            // By the column's text: hog's `q:500/wb10M` (QEMU's own) before web01's `r990...`.
            (Column::Throttle, false, ["hog", "web01", "db01"]),
            // No PID in the fleet view: host, VM and device decide.
            (Column::Pid, false, ["db01", "web01", "hog"]),
        ] {
            sort_rows(&mut rows, SortOrder { column, reversed });
            assert_eq!(order(&rows), want, "{column:?} reversed={reversed}");
        }
    }

    #[test]
    fn queries_use_only_stable_series() {
        let q = Queries::new(Duration::from_secs(60));
        assert_eq!(
            q.ops,
            "sum by (instance, vm, device, source, op) (rate(overkvm_vm_io_operations_total[60000ms]))"
        );
        assert!(q.bytes.contains("rate(overkvm_vm_io_bytes_total[60000ms])"));
        assert!(
            q.lat_sum
                .contains("overkvm_vm_io_latency_seconds_sum[60000ms]")
        );
        assert!(
            q.lat_count
                .contains("overkvm_vm_io_latency_seconds_count[60000ms]")
        );
        assert!(q.limit_iops.contains("overkvm_throttle_limit_iops"));
        assert!(
            q.limit_bps
                .contains("overkvm_throttle_limit_bytes_per_second")
        );
        for text in [&q.ops, &q.bytes, &q.lat_sum, &q.lat_count, &q.device_ops] {
            assert!(!text.contains("_bucket"), "{text}");
        }
        assert_eq!(range(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn view_rows_group_a_vm_over_its_devices() {
        let mut a = answers();
        // web01 also on a second device of h1, quieter and unlimited.
        let web_b = vm("h1:9746", "web01", "sdb");
        a.ops.push(at(with(&web_b, &[("op", "read")]), 100.0));
        a.lat_sum.push(at(with(&web_b, &[]), 100.0 * 50e-6));
        a.lat_count.push(at(with(&web_b, &[]), 100.0));
        let vms = join(&a);
        let report = FleetReport {
            timestamp: String::new(),
            prometheus: String::new(),
            window_s: 10.0,
            hosts: hosts(&vms, &a.device_ops),
            vms,
        };
        let g = groups(&report);
        let web = g
            .iter()
            .find(|g| g.merged.label == "vm:web01")
            .expect("web01");
        assert_eq!(web.merged.host, "h1:9746");
        assert_eq!(web.merged.devices, ["nvme0n1", "sdb"]);
        assert_eq!(web.merged.total_iops(), 500.0);
        assert_eq!(web.merged.read_iops(), 400.0);
        // (400 x 250 + 100 x 50) / 500
        assert!((web.merged.lat_avg_us.unwrap() - 210.0).abs() < 1e-9);
        assert_eq!(web.merged.throttle, "r990 w20 wb5M");
        assert_eq!(web.per_device.len(), 2);
        assert_eq!(web.per_device[0].iops_share(), Some(80.0));
        assert_eq!(Column::Host.sort_key(&web.merged), SortKey::Text("h1:9746"));
        let db = g
            .iter()
            .find(|g| g.merged.label == "vm:db01")
            .expect("db01");
        assert_eq!(
            (db.merged.total_iops(), db.merged.counts.other_ops),
            (5.0, 50)
        );
    }

    #[test]
    fn table_and_json() {
        let a = answers();
        let mut vms = join(&a);
        sort_rows(&mut vms, SortOrder::DEFAULT);
        let r = FleetReport {
            timestamp: "2026-12-04T12:00:00.000Z".into(),
            prometheus: "http://127.0.0.1:9090".into(),
            window_s: 60.0,
            hosts: hosts(&vms, &a.device_ops),
            vms,
        };
        let mut out = Vec::new();
        write_table(&mut out, &r).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains("hosts 2  VMs 3"), "{text}");
        let head = lines
            .iter()
            .position(|l| l.starts_with("HOST") && l.contains(" VM "))
            .unwrap();
        assert!(
            lines[head + 1].contains("hog") && lines[head + 1].contains("1000"),
            "{text}"
        );
        assert!(lines[head + 2].contains("r990 w20 wb5M"), "{text}");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["vms"][0]["vm"], "hog");
        assert_eq!(json["vms"][1]["limits"]["riops"], 990.0);
        assert_eq!(json["hosts"][1]["vms"], 2);
    }
}
