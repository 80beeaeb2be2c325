//! Encoding the totals as OpenMetrics text (prometheus-client), and the classic Prometheus
//! text format derived from it for clients that do not ask for OpenMetrics.

use std::{
    fmt::{self, Write as _},
    sync::{Arc, Mutex},
};

use overkvm_common::{Health, Op};
use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, LabelValueEncoder, MetricEncoder,
        NativeHistogram, NativeHistogramBuckets, NoLabelSet,
    },
};

use super::{
    latency::{self, LatencyBuckets},
    lock,
    names::{self, Metric},
    totals::{LatencyTotals, OpTotals, Totals},
};
use crate::{identity::Manager, tick::ThrottleView};

/// Label values longer than this are cut (at a character boundary). Names come from command
/// lines and cgroup paths, which anyone starting a process chooses.
const MAX_LABEL_BYTES: usize = 256;

/// A label value: control characters shown as `top` shows them (`\x1b`, see
/// [`crate::text::escape_controls`]), then cut to `MAX_LABEL_BYTES`. Escaping here, before any
/// encoder, gives a series one identity in OpenMetrics, classic text and protobuf alike: the
/// text encoders would escape only `"`, `\\` and newline, and protobuf nothing, so a raw ESC in
/// a tenant's VM name would reach whatever terminal or alert shows the label. Backslashes stay:
/// a label reads as its owner wrote it.
struct Lv<'a>(&'a str);

impl EncodeLabelValue for Lv<'_> {
    fn encode(&self, enc: &mut LabelValueEncoder) -> fmt::Result {
        // Most values need no escaping (a tick renders thousands of them): no copy for those.
        let escaped;
        let s = if self.0.chars().any(char::is_control) || !self.0.is_ascii() {
            escaped = crate::text::escape_controls(self.0);
            &escaped
        } else {
            self.0
        };
        let mut end = s.len().min(MAX_LABEL_BYTES);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        enc.write_str(&s[..end])
    }
}

/// Renders the exporter's totals on every encode; registered once in the registry.
#[derive(Debug)]
pub(super) struct TotalsCollector {
    pub totals: Arc<Mutex<Totals>>,
    pub latency: LatencyBuckets,
    /// Add native buckets to histograms (only the protobuf format carries them).
    pub native: bool,
}

impl Collector for TotalsCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let t = lock(&self.totals);
        let shape = Shape {
            latency: self.latency,
            native: self.native,
        };
        encode_totals(&t, shape, &mut enc)
    }
}

/// How histograms are rendered.
#[derive(Clone, Copy, Debug)]
struct Shape {
    latency: LatencyBuckets,
    native: bool,
}

/// The daemon's own timing and its endpoint's connections, kept outside the totals so that
/// neither the tick nor the HTTP side waits on the other; rendered after the totals.
#[derive(Debug)]
pub(super) struct SelfCollector {
    pub timing: Arc<Mutex<crate::tick::TickTiming>>,
    pub http: Arc<super::http::HttpStats>,
}

impl Collector for SelfCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let timing = *lock(&self.timing);
        encode_self(&timing, &self.http.counts(), &mut enc)
    }
}

fn encode_self(
    t: &crate::tick::TickTiming,
    http: &super::http::HttpCounts,
    enc: &mut DescriptorEncoder,
) -> fmt::Result {
    for (metric, v) in [
        (&names::TICK_LATENESS, t.lateness_seconds),
        (&names::TICK_LATENESS_MAX, t.lateness_max_seconds),
        (&names::TICK_DURATION, t.duration_seconds),
        (&names::TICK_DURATION_MAX, t.duration_max_seconds),
    ] {
        if let Some(mut m) = family(enc, metric, t.ticks > 0)? {
            m.encode_gauge(&v)?;
        }
    }
    if let Some(mut m) = family(enc, &names::EXPORTER_CONNECTIONS, true)? {
        m.encode_gauge(&(http.open as i64))?;
    }
    if let Some(mut m) = family(enc, &names::EXPORTER_CONNECTIONS_REFUSED, true)? {
        m.encode_counter::<NoLabelSet, _, f64>(&http.refused, None)?;
    }
    if let Some(mut m) = family(enc, &names::EXPORTER_CONNECTIONS_DROPPED, true)? {
        let reason = names::label::REASON;
        counter(&mut m, &[(reason, Lv("timeout"))], http.timed_out)?;
        counter(&mut m, &[(reason, Lv("oversized"))], http.oversized)?;
    }
    // Only when a web config is in force: without one nobody is ever refused.
    if let Some(mut m) = family(enc, &names::EXPORTER_AUTH_FAILURES, http.secured)? {
        let reason = names::label::REASON;
        counter(
            &mut m,
            &[(reason, Lv("no_credentials"))],
            http.no_credentials,
        )?;
        counter(
            &mut m,
            &[(reason, Lv("bad_credentials"))],
            http.bad_credentials,
        )?;
        counter(&mut m, &[(reason, Lv("tls_handshake"))], http.tls_handshake)?;
        counter(&mut m, &[(reason, Lv("rate_limited"))], http.rate_limited)?;
    }
    if let Some(mut m) = family(enc, &names::EXPORTER_WEB_CONFIG_RELOADS, http.secured)? {
        let result = names::label::RESULT;
        counter(&mut m, &[(result, Lv("success"))], http.reloads_ok)?;
        counter(&mut m, &[(result, Lv("failure"))], http.reloads_failed)?;
    }
    Ok(())
}

/// Starts a family only when it has series: an empty family says nothing.
fn family<'s>(
    enc: &'s mut DescriptorEncoder,
    m: &'s Metric,
    has_series: bool,
) -> Result<Option<MetricEncoder<'s>>, fmt::Error> {
    if !has_series {
        return Ok(None);
    }
    enc.encode_descriptor(m.name, m.help, m.unit(), m.metric_type())
        .map(Some)
}

fn counter(m: &mut MetricEncoder, labels: &impl EncodeLabelSet, v: u64) -> fmt::Result {
    m.encode_family(labels)?
        .encode_counter::<NoLabelSet, _, f64>(&v, None)
}

fn counter_f64(m: &mut MetricEncoder, labels: &impl EncodeLabelSet, v: f64) -> fmt::Result {
    m.encode_family(labels)?
        .encode_counter::<NoLabelSet, _, f64>(&v, None)
}

fn gauge<V: prometheus_client::encoding::EncodeGaugeValue>(
    m: &mut MetricEncoder,
    labels: &impl EncodeLabelSet,
    v: V,
) -> fmt::Result {
    m.encode_family(labels)?.encode_gauge(&v)
}

/// Ops whose bytes mean something.
const BYTE_OPS: [Op; 3] = [Op::Read, Op::Write, Op::Discard];

/// One latency histogram: classic buckets as `shape` says (what the text formats carry) and,
/// for the protobuf format, the kernel's log2 buckets as a native histogram (Prometheus with
/// native histograms on keeps one series for it).
fn histogram(
    m: &mut MetricEncoder,
    labels: &impl EncodeLabelSet,
    h: &LatencyTotals,
    shape: Shape,
) -> fmt::Result {
    let sum = h.sum_ns as f64 / 1e9;
    let classic = latency::classic(h, shape.latency.edges());
    let mut m = m.encode_family(labels)?;
    if !shape.native {
        return m.encode_histogram::<NoLabelSet>(sum, h.count(), &classic, None);
    }
    let native = latency::native(h);
    m.encode_histogram_with_native::<NoLabelSet>(
        sum,
        h.count(),
        &classic,
        None,
        NativeHistogram {
            schema: latency::NATIVE_SCHEMA,
            zero_threshold: native.zero_threshold,
            zero_count: native.zero_count,
            negative: NativeHistogramBuckets {
                spans: &[],
                deltas: &[],
            },
            positive: NativeHistogramBuckets {
                spans: &native.spans,
                deltas: &native.deltas,
            },
            created: None,
        },
    )
}

fn encode_totals(t: &Totals, shape: Shape, enc: &mut DescriptorEncoder) -> fmt::Result {
    encode_vm_families(t, shape, enc)?;
    encode_device_and_process_families(t, enc)?;
    encode_self_families(t, enc)?;
    let Some(th) = &t.stats.throttle else {
        return Ok(());
    };
    encode_throttle_limits(th, enc)?;
    encode_throttle_budgets(th, enc)
}

/// Per VM: ops, bytes and latency per device and op, and one info series each.
fn encode_vm_families(t: &Totals, shape: Shape, enc: &mut DescriptorEncoder) -> fmt::Result {
    use names::label::*;
    let vms = t.vms();
    let any_vm_device = |f: &dyn Fn(&super::totals::VmDevice) -> bool| {
        vms.iter().any(|v| v.devices.values().any(f))
    };
    let has_vm_ops = any_vm_device(&|d| d.io.iter().any(|c| c.ops > 0));
    let has_vm_bytes = any_vm_device(&|d| {
        BYTE_OPS
            .iter()
            .any(|op| d.io[*op as usize].ops > 0 || d.io[*op as usize].bytes > 0)
    });
    let has_vm_latency = any_vm_device(&|d| d.latency.iter().any(|h| h.count() > 0));

    // Per VM, only the ops the VM used: a series that is zero forever costs the same as one
    // that counts. An op's series appear with its first operation (histograms: completion).
    if let Some(mut m) = family(enc, &names::VM_IO_OPERATIONS, has_vm_ops)? {
        for vm in &vms {
            for (key, d) in &vm.devices {
                for op in Op::ALL {
                    let c = d.io[op as usize];
                    if c.ops == 0 {
                        continue;
                    }
                    let l = vm_dev_op(&vm.label, key, op);
                    counter(&mut m, &l, c.ops)?;
                }
            }
        }
    }
    if let Some(mut m) = family(enc, &names::VM_IO_BYTES, has_vm_bytes)? {
        for vm in &vms {
            for (key, d) in &vm.devices {
                for op in BYTE_OPS {
                    let c = d.io[op as usize];
                    if c.ops == 0 && c.bytes == 0 {
                        continue;
                    }
                    let l = vm_dev_op(&vm.label, key, op);
                    counter(&mut m, &l, c.bytes)?;
                }
            }
        }
    }
    if let Some(mut m) = family(enc, &names::VM_IO_LATENCY, has_vm_latency)? {
        for vm in &vms {
            for (key, d) in &vm.devices {
                for op in Op::ALL {
                    let h = &d.latency[op as usize];
                    if h.count() == 0 {
                        continue;
                    }
                    let l = vm_dev_op(&vm.label, key, op);
                    histogram(&mut m, &l, h, shape)?;
                }
            }
        }
    }
    if let Some(mut m) = family(enc, &names::VM_INFO, !vms.is_empty())? {
        for vm in &vms {
            let pid = vm.pid.to_string();
            let mut l = vec![
                (VM, Lv(&vm.label)),
                (UUID, Lv(vm.uuid.as_deref().unwrap_or(""))),
                (MANAGER, Lv(vm.manager.name())),
                (PID, Lv(&pid)),
                (CGROUP, Lv(&vm.cgroup)),
            ];
            // Only KubeVirt VMs have a namespace (their `vm` is `<namespace>/<vmi>`).
            if let Some(ns) = (vm.manager == Manager::Kubevirt)
                .then(|| crate::identity::kubevirt::namespace_of(&vm.label))
                .flatten()
            {
                l.push((NAMESPACE, Lv(ns)));
            }
            gauge(&mut m, &l, 1i64)?;
        }
    }
    let has_disk_info = any_vm_device(&|d| d.qemu_target.is_some());
    if let Some(mut m) = family(enc, &names::VM_DISK_INFO, has_disk_info)? {
        for vm in &vms {
            for (key, d) in &vm.devices {
                if let Some(target) = &d.qemu_target {
                    let l = [
                        (VM, Lv(&vm.label)),
                        (DEVICE, Lv(&key.name)),
                        (SOURCE, Lv("qemu")),
                        (TARGET, Lv(target)),
                    ];
                    gauge(&mut m, &l, 1i64)?;
                }
            }
        }
    }
    Ok(())
}

/// The labels of a VM's series on one device and op: `source="qemu"` only where QEMU's
/// counters are the account, so the series of eBPF-counted devices keep their labels.
fn vm_dev_op<'a>(
    vm: &'a str,
    dev: &'a super::totals::DeviceKey,
    op: Op,
) -> Vec<(&'static str, Lv<'a>)> {
    use names::label::*;
    let mut l = vec![(VM, Lv(vm)), (DEVICE, Lv(&dev.name)), (OP, Lv(op.name()))];
    if dev.qemu {
        l.push((SOURCE, Lv("qemu")));
    }
    l
}

/// Per device, and per process name when per-process series are on.
fn encode_device_and_process_families(t: &Totals, enc: &mut DescriptorEncoder) -> fmt::Result {
    use names::label::*;
    let encode_ops = |m: &mut MetricEncoder,
                      name_label: Option<(&str, &str)>,
                      dev: &str,
                      io: &OpTotals,
                      bytes: bool|
     -> fmt::Result {
        let ops: &[Op] = if bytes { &BYTE_OPS } else { &Op::ALL };
        for op in ops {
            let c = io[*op as usize];
            let v = if bytes { c.bytes } else { c.ops };
            match name_label {
                Some((k, name)) => {
                    let l = [(k, Lv(name)), (DEVICE, Lv(dev)), (OP, Lv(op.name()))];
                    counter(m, &l, v)?;
                }
                None => {
                    let l = [(DEVICE, Lv(dev)), (OP, Lv(op.name()))];
                    counter(m, &l, v)?;
                }
            }
        }
        Ok(())
    };
    for (metric, bytes) in [
        (&names::DEVICE_IO_OPERATIONS, false),
        (&names::DEVICE_IO_BYTES, true),
    ] {
        if let Some(mut m) = family(enc, metric, !t.devices.is_empty())? {
            for (dev, io) in &t.devices {
                encode_ops(&mut m, None, dev, io, bytes)?;
            }
        }
    }
    for (metric, bytes) in [
        (&names::PROCESS_IO_OPERATIONS, false),
        (&names::PROCESS_IO_BYTES, true),
    ] {
        if let Some(mut m) = family(enc, metric, !t.processes.is_empty())? {
            for (comm, p) in &t.processes {
                for (dev, io) in &p.devices {
                    encode_ops(&mut m, Some((COMM, comm)), dev, io, bytes)?;
                }
            }
        }
    }
    if let Some(mut m) = family(enc, &names::PROCESS_IO_DROPPED, t.per_process())? {
        m.encode_counter::<NoLabelSet, _, f64>(&t.process_dropped_ops, None)?;
    }
    Ok(())
}

/// overkvm's own health: its programs and maps, kernel-side events, the diskstats parity,
/// errors, timings and version.
fn encode_self_families(t: &Totals, enc: &mut DescriptorEncoder) -> fmt::Result {
    use names::label::*;
    let s = &t.stats;
    if let Some(mut m) = family(enc, &names::BPF_PROGRAM_RUNS, !s.programs.is_empty())? {
        for p in &s.programs {
            counter(&mut m, &[(PROGRAM, Lv(&p.name))], p.run_count)?;
        }
    }
    if let Some(mut m) = family(enc, &names::BPF_PROGRAM_RUN_TIME, !s.programs.is_empty())? {
        for p in &s.programs {
            let secs = p.run_time_ns as f64 / 1e9;
            counter_f64(&mut m, &[(PROGRAM, Lv(&p.name))], secs)?;
        }
    }
    let misses = &names::BPF_PROGRAM_RECURSION_MISSES;
    if let Some(mut m) = family(enc, misses, !s.programs.is_empty())? {
        for p in &s.programs {
            counter(&mut m, &[(PROGRAM, Lv(&p.name))], p.recursion_misses)?;
        }
    }
    if let Some(mut m) = family(enc, &names::BPF_MAP_ENTRIES, !s.maps.is_empty())? {
        for (name, fill) in &s.maps {
            gauge(&mut m, &[(MAP, Lv(name))], fill.entries)?;
        }
    }
    if let Some(mut m) = family(enc, &names::BPF_MAP_CAPACITY, !s.maps.is_empty())? {
        for (name, fill) in &s.maps {
            gauge(&mut m, &[(MAP, Lv(name))], fill.capacity)?;
        }
    }
    if let Some(mut m) = family(enc, &names::KERNEL_EVENTS, true)? {
        for h in Health::ALL {
            counter(&mut m, &[(EVENT, Lv(h.name()))], s.health_total[h as usize])?;
        }
    }
    if let Some(mut m) = family(enc, &names::DEVICE_PARITY_DIFFERENCE, !s.parity.is_empty())? {
        for p in &s.parity {
            for (op, d) in p.difference.by_op() {
                gauge(&mut m, &[(DEVICE, Lv(&p.device)), (OP, Lv(op))], d)?;
            }
        }
    }
    if let Some(mut m) = family(enc, &names::DEVICE_PARITY_SETTLED, !s.parity.is_empty())? {
        for p in &s.parity {
            gauge(&mut m, &[(DEVICE, Lv(&p.device))], u64::from(p.settled))?;
        }
    }
    if let Some(mut m) = family(enc, &names::MAP_READ_ERRORS, true)? {
        m.encode_counter::<NoLabelSet, _, f64>(&s.read_errors, None)?;
    }
    if let Some(mut m) = family(enc, &names::EXEC_NAMING_EXPIRED, true)? {
        m.encode_counter::<NoLabelSet, _, f64>(&s.exec_naming_expired, None)?;
    }
    if let Some(mut m) = family(enc, &names::COUNTED_AFTER_PRUNE, true)? {
        m.encode_counter::<NoLabelSet, _, f64>(&s.counted_after_prune, None)?;
    }
    if let Some(mut m) = family(enc, &names::SAMPLE_DURATION, s.ticks > 0)? {
        m.encode_gauge(&s.sample_seconds)?;
    }
    if let Some(mut m) = family(enc, &names::RENDER_DURATION, true)? {
        m.encode_gauge(&s.render_seconds)?;
    }
    if let Some(mut m) = family(enc, &names::TICKS, true)? {
        m.encode_counter::<NoLabelSet, _, f64>(&s.ticks, None)?;
    }
    if let Some(mut m) = family(enc, &names::EXPORTER_VMS_DROPPED, true)? {
        m.encode_gauge(&(t.vms_dropped as i64))?;
    }
    if let Some(mut m) = family(enc, &names::EXPORTER_INFO, true)? {
        let l = [
            (VERSION, Lv(env!("CARGO_PKG_VERSION"))),
            (HOOK_MODE, Lv(&s.mode)),
        ];
        gauge(&mut m, &l, 1i64)?;
    }
    Ok(())
}

/// The limits the throttle holds: in cgroups (per VM and device) and in QEMU (per disk).
fn encode_throttle_limits(th: &ThrottleView, enc: &mut DescriptorEncoder) -> fmt::Result {
    use names::label::*;
    let has_limits = th
        .limits
        .iter()
        .any(|l| l.riops.is_some() || l.wiops.is_some());
    if let Some(mut m) = family(enc, &names::THROTTLE_LIMIT_IOPS, has_limits)? {
        for l in &th.limits {
            for (dir, v) in [("read", l.riops), ("write", l.wiops)] {
                if let Some(v) = v {
                    let ls = [
                        (VM, Lv(&l.vm)),
                        (DEVICE, Lv(&l.device)),
                        (DIRECTION, Lv(dir)),
                    ];
                    gauge(&mut m, &ls, v)?;
                }
            }
        }
    }
    let has_bps = th
        .limits
        .iter()
        .any(|l| l.rbps.is_some() || l.wbps.is_some());
    if let Some(mut m) = family(enc, &names::THROTTLE_LIMIT_BPS, has_bps)? {
        for l in &th.limits {
            for (dir, v) in [("read", l.rbps), ("write", l.wbps)] {
                if let Some(v) = v {
                    let ls = [
                        (VM, Lv(&l.vm)),
                        (DEVICE, Lv(&l.device)),
                        (DIRECTION, Lv(dir)),
                    ];
                    gauge(&mut m, &ls, v)?;
                }
            }
        }
    }
    if let Some(mut m) = family(enc, &names::THROTTLE_LIMIT_AGE, !th.limits.is_empty())? {
        for l in &th.limits {
            gauge(
                &mut m,
                &[(VM, Lv(&l.vm)), (DEVICE, Lv(&l.device))],
                l.since_s,
            )?;
        }
    }
    // QEMU's own limits: series only for the limits that are set, so a VM without any costs
    // nothing.
    for (metric, bytes) in [
        (&names::VM_QEMU_LIMIT_IOPS, false),
        (&names::VM_QEMU_LIMIT_BPS, true),
    ] {
        let values = |d: &crate::qemu::limits::DiskLimits| {
            if bytes {
                [("total", d.bps), ("read", d.bps_rd), ("write", d.bps_wr)]
            } else {
                [("total", d.iops), ("read", d.iops_rd), ("write", d.iops_wr)]
            }
        };
        let any = th
            .qemu_limits
            .iter()
            .flat_map(|q| q.disks.iter())
            .any(|d| values(d).iter().any(|(_, v)| v.is_some()));
        if let Some(mut m) = family(enc, metric, any)? {
            for q in &th.qemu_limits {
                for d in &q.disks {
                    for (dir, v) in values(d) {
                        if let Some(v) = v {
                            let ls = [(VM, Lv(&q.vm)), (DISK, Lv(&d.disk)), (DIRECTION, Lv(dir))];
                            gauge(&mut m, &ls, v)?;
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// The throttle's budgets, use and state per device, and its counters.
fn encode_throttle_budgets(th: &ThrottleView, enc: &mut DescriptorEncoder) -> fmt::Result {
    use names::label::*;
    let has_budget = th.budgets.iter().any(|b| b.iops_budget.is_some());
    if let Some(mut m) = family(enc, &names::THROTTLE_BUDGET_IOPS, has_budget)? {
        for b in &th.budgets {
            if let Some(v) = b.iops_budget {
                gauge(&mut m, &[(DEVICE, Lv(&b.device))], v)?;
            }
        }
    }
    if let Some(mut m) = family(enc, &names::THROTTLE_USED_IOPS, !th.budgets.is_empty())? {
        for b in &th.budgets {
            gauge(&mut m, &[(DEVICE, Lv(&b.device))], b.iops_used)?;
        }
    }
    if let Some(mut m) = family(enc, &names::THROTTLE_ENGAGED, !th.budgets.is_empty())? {
        for b in &th.budgets {
            gauge(&mut m, &[(DEVICE, Lv(&b.device))], i64::from(b.engaged))?;
        }
    }
    let has_capacity = th.budgets.iter().any(|b| b.capacity_iops.is_some());
    if let Some(mut m) = family(enc, &names::DEVICE_CAPACITY_IOPS, has_capacity)? {
        for b in th.budgets.iter().filter(|b| b.capacity_iops.is_some()) {
            gauge(
                &mut m,
                &[(DEVICE, Lv(&b.device))],
                b.capacity_iops.unwrap_or(0.0),
            )?;
        }
    }
    if let Some(mut m) = family(enc, &names::THROTTLE_DECISIONS, true)? {
        m.encode_counter::<NoLabelSet, _, f64>(&th.decisions_total, None)?;
    }
    if let Some(mut m) = family(enc, &names::THROTTLE_THROTTLED, true)? {
        m.encode_counter::<NoLabelSet, _, f64>(&th.throttled_seconds_total, None)?;
    }
    if let Some(mut m) = family(enc, &names::THROTTLE_DRY_RUN, true)? {
        m.encode_gauge(&i64::from(th.dry_run))?;
    }
    if let Some(mut m) = family(enc, &names::THROTTLE_PROBLEMS, true)? {
        m.encode_gauge(&(th.problems.len() as i64))?;
    }
    Ok(())
}

/// The Prometheus text format (0.0.4) of an OpenMetrics exposition rendered here: counters
/// are named with `_total` in HELP and TYPE, `# UNIT` and `# EOF` go. Samples, label escaping
/// and numbers are the same in both formats for the types this exporter uses (no info,
/// stateset or exemplars), which is what makes a line-by-line translation exact.
pub(super) fn openmetrics_to_text(om: &str) -> String {
    let mut out = String::with_capacity(om.len());
    let mut help: Option<&str> = None;
    for line in om.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest.split_once(' ').map_or("", |(_, h)| h));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let suffix = if kind == "counter" { "_total" } else { "" };
            if let Some(h) = help.take() {
                let _ = writeln!(out, "# HELP {name}{suffix} {h}");
            }
            let _ = writeln!(out, "# TYPE {name}{suffix} {kind}");
            continue;
        }
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use prometheus_client::{encoding::text::encode, registry::Registry};

    use super::*;
    use crate::{
        export::totals::{
            Retention,
            tests::{FakeProcs, row, tick},
        },
        tick::{ActiveLimit, BudgetUse, ThrottleView},
    };

    fn registry(t: Totals, latency: LatencyBuckets, native: bool) -> Registry {
        let mut reg = Registry::with_prefix(names::PREFIX);
        reg.register_collector(Box::new(TotalsCollector {
            totals: Arc::new(Mutex::new(t)),
            latency,
            native,
        }));
        reg
    }

    fn render_with(t: Totals, latency: LatencyBuckets) -> String {
        let mut s = String::new();
        encode(&mut s, &registry(t, latency, false)).expect("encoding");
        s
    }

    fn render(t: Totals) -> String {
        render_with(t, LatencyBuckets::Full)
    }

    fn retention() -> Retention {
        Retention {
            per_process: false,
            per_process_cap: 5,
            grace: Duration::from_secs(60),
            max_vms: 2000,
        }
    }

    /// Series of a VM: every sample line that names it.
    fn vm_series<'a>(text: &'a str, vm: &str) -> Vec<&'a str> {
        let label = format!("vm=\"{vm}\"");
        text.lines()
            .filter(|l| !l.starts_with('#') && l.contains(&label))
            .collect()
    }

    #[test]
    fn a_vm_doing_reads_and_writes_exports_at_most_20_series() {
        let procs = FakeProcs::default();
        procs.start(100, 1);
        let mut t = Totals::new(retention());
        t.apply(
            &tick(Instant::now(), vec![row(100, Some("web"), "vda", 10, 4)]),
            &procs,
        );
        let text = render_with(t, LatencyBuckets::Compact);
        let series = vm_series(&text, "web");
        assert!(
            series.len() <= 20,
            "{} series:\n{}",
            series.len(),
            series.join("\n")
        );
        // vm_info, ops and bytes of reads and writes, two histograms of 4 bounds + +Inf + sum
        // + count; nothing for the ops the VM never used.
        assert_eq!(series.len(), 1 + 2 + 2 + 2 * 7, "{}", series.join("\n"));
        for op in ["discard", "flush", "other"] {
            assert!(
                !series.iter().any(|l| l.contains(&format!("op=\"{op}\""))),
                "{op}: {}",
                series.join("\n")
            );
        }
        let vm = r#"vm="web",device="vda""#;
        let bucket = |op: &str, le: &str| {
            sample(
                &text,
                &format!(r#"overkvm_vm_io_latency_seconds_bucket{{le="{le}",{vm},op="{op}"}}"#),
            )
        };
        // Reads took 3 µs, writes 1.5 ms (the rows' histograms).
        assert_eq!(bucket("read", "0.000065536"), Some("10".into()), "{text}");
        assert_eq!(bucket("write", "0.001048576"), Some("0".into()));
        assert_eq!(bucket("write", "0.016777216"), Some("4".into()));
        assert_eq!(bucket("write", "+Inf"), Some("4".into()));
        assert_eq!(
            sample(
                &text,
                &format!(r#"overkvm_vm_io_latency_seconds_sum{{{vm},op="write"}}"#)
            ),
            Some("0.006".into())
        );
        assert_eq!(
            sample(&text, "overkvm_exporter_vms_dropped"),
            Some("0".into())
        );
    }

    /// A disk QEMU counts keeps the VM families and gets `source="qemu"` and one info series
    /// with its target; an eBPF-counted device of the same VM keeps its labels.
    #[test]
    fn a_qemu_counted_disk_is_labelled_with_its_source_and_target() {
        let procs = FakeProcs::default();
        let mut t = Totals::new(retention());
        let mut net = row(100, Some("web"), "drive-virtio-disk0", 7, 3);
        net.source = crate::report::CountSource::Qemu;
        net.major = 0;
        net.target = Some("rbd:pool/image".into());
        t.apply(
            &tick(
                Instant::now(),
                vec![row(100, Some("web"), "vda", 10, 4), net],
            ),
            &procs,
        );
        let text = render_with(t, LatencyBuckets::Compact);
        assert_eq!(
            sample(
                &text,
                r#"overkvm_vm_io_operations_total{vm="web",device="drive-virtio-disk0",op="read",source="qemu"}"#
            ),
            Some("7".into()),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                r#"overkvm_vm_io_operations_total{vm="web",device="vda",op="read"}"#
            ),
            Some("10".into()),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                r#"overkvm_vm_disk_info{vm="web",device="drive-virtio-disk0",source="qemu",target="rbd:pool/image"}"#
            ),
            Some("1".into()),
            "{text}"
        );
        assert_eq!(text.matches("overkvm_vm_disk_info{").count(), 1);
    }

    /// A libvirt domain's network disk is named by its target (`vda`), which can be a host
    /// device's name too: the two keep apart series, each with its own counts, and only the
    /// QEMU-counted one has `source="qemu"` and an info series.
    #[test]
    fn a_qemu_disk_named_like_a_host_device_keeps_its_own_series() {
        let procs = FakeProcs::default();
        let mut t = Totals::new(retention());
        let mut net = row(100, Some("web"), "vda", 7, 3);
        net.source = crate::report::CountSource::Qemu;
        net.major = 0;
        net.target = Some("nbd://127.0.0.1:10809/exp".into());
        for at in [Instant::now(), Instant::now() + Duration::from_secs(1)] {
            t.apply(
                &tick(at, vec![row(100, Some("web"), "vda", 10, 4), net.clone()]),
                &procs,
            );
        }
        let text = render_with(t, LatencyBuckets::Compact);
        let ops = |labels: &str| {
            sample(
                &text,
                &format!("overkvm_vm_io_operations_total{{{labels}}}"),
            )
        };
        assert_eq!(
            ops(r#"vm="web",device="vda",op="read""#),
            Some("20".into()),
            "{text}"
        );
        assert_eq!(
            ops(r#"vm="web",device="vda",op="write""#),
            Some("8".into()),
            "{text}"
        );
        assert_eq!(
            ops(r#"vm="web",device="vda",op="read",source="qemu""#),
            Some("14".into()),
            "{text}"
        );
        assert_eq!(
            ops(r#"vm="web",device="vda",op="write",source="qemu""#),
            Some("6".into()),
            "{text}"
        );
        assert_eq!(text.matches("overkvm_vm_disk_info{").count(), 1, "{text}");
    }

    #[test]
    fn full_buckets_keep_every_log2_bucket() {
        let procs = FakeProcs::default();
        procs.start(100, 1);
        let mut t = Totals::new(retention());
        t.apply(
            &tick(Instant::now(), vec![row(100, Some("web"), "vda", 10, 4)]),
            &procs,
        );
        let text = render_with(t, LatencyBuckets::Full);
        // 26 bounds + +Inf + sum + count per op.
        assert_eq!(vm_series(&text, "web").len(), 1 + 2 + 2 + 2 * 29);
    }

    #[test]
    fn protobuf_carries_one_native_histogram_per_op_with_exact_sum_and_count() {
        use prometheus_client::encoding::prometheus_protobuf;
        let procs = FakeProcs::default();
        procs.start(100, 1);
        let mut t = Totals::new(retention());
        let mut r = row(100, Some("web"), "vda", 10, 4);
        r.latency[Op::Read as usize].record(100_000_000, 2); // 100 ms, kernel bucket 26
        t.apply(&tick(Instant::now(), vec![r]), &procs);
        let families = prometheus_protobuf::encode(&registry(t, LatencyBuckets::Compact, true))
            .expect("encoding");
        let lat = families
            .iter()
            .find(|f| f.name == "overkvm_vm_io_latency_seconds")
            .expect("latency family");
        assert_eq!(lat.metric.len(), 2, "read and write only");
        let read = lat
            .metric
            .iter()
            .find(|m| m.label.iter().any(|l| l.name == "op" && l.value == "read"))
            .and_then(|m| m.histogram.as_ref())
            .expect("read histogram");
        assert_eq!(read.sample_count, 12);
        assert!((read.sample_sum - (10.0 * 3e-6 + 2.0 * 0.1)).abs() < 1e-12);
        assert_eq!(read.schema, 0);
        assert!(read.zero_threshold > 0.0);
        // 3 µs is kernel bucket 11 (native -18), 100 ms bucket 26 (native -3).
        let spans: Vec<(i32, u32)> = read
            .positive_span
            .iter()
            .map(|s| (s.offset, s.length))
            .collect();
        assert_eq!(spans, [(-18, 1), (14, 1)]);
        assert_eq!(read.positive_delta, [10, -8]);
        // The classic buckets ride along (Prometheus keeps them only when asked to).
        assert_eq!(read.bucket.len(), 5);
        assert_eq!(read.bucket[4].cumulative_count, 12);
        // Names as in the text formats, counters with _total.
        assert!(
            families
                .iter()
                .any(|f| f.name == "overkvm_vm_io_operations_total")
        );
        let ops = families
            .iter()
            .find(|f| f.name == "overkvm_vm_io_operations_total")
            .expect("ops");
        assert_eq!(ops.metric.len(), 2, "read and write only");
    }

    /// A tenant chooses its VM's name: a control character in it reaches no scraper raw, and
    /// the series has the same `vm` label whichever format Prometheus negotiates.
    #[test]
    fn a_hostile_vm_name_is_one_escaped_label_in_every_format() {
        use prometheus_client::encoding::prometheus_protobuf;
        let hostile = "ev\"il\x1b[31m\nvm";
        let shown = crate::text::escape_controls(hostile);
        assert_eq!(shown, r#"ev"il\x1b[31m\x0avm"#);
        let totals = || {
            let procs = FakeProcs::default();
            procs.start(100, 1);
            let mut t = Totals::new(retention());
            let mut r = row(100, Some(hostile), "vda", 10, 4);
            r.cgroup = "/machine.slice/machine-qemu\\x2d1\\x2dev\x1bil.scope".into();
            t.apply(&tick(Instant::now(), vec![r]), &procs);
            t
        };
        let om = render(totals());
        let classic = openmetrics_to_text(&om);
        // The text formats escape `"` and `\` of the shown name once more.
        let label = r#"vm="ev\"il\\x1b[31m\\x0avm""#;
        for (format, text) in [("OpenMetrics", &om), ("classic text", &classic)] {
            assert!(!text.contains('\x1b'), "raw ESC in {format}:\n{text}");
            assert_eq!(
                vm_series(text, r#"ev\"il\\x1b[31m\\x0avm"#).len(),
                vm_series(&om, r#"ev\"il\\x1b[31m\\x0avm"#).len(),
                "{format}:\n{text}"
            );
            assert!(text.contains(label), "{format}:\n{text}");
            // The cgroup keeps systemd's escapes; its ESC is shown, not sent.
            assert!(
                text.contains(r#"cgroup="/machine.slice/machine-qemu\\x2d1\\x2dev\\x1bil.scope""#),
                "{format}:\n{text}"
            );
        }
        let families =
            prometheus_protobuf::encode(&registry(totals(), LatencyBuckets::Compact, true))
                .expect("encoding");
        let vm_labels: std::collections::BTreeSet<&str> = families
            .iter()
            .flat_map(|f| &f.metric)
            .flat_map(|m| &m.label)
            .filter(|l| l.name == "vm")
            .map(|l| l.value.as_str())
            .collect();
        assert_eq!(vm_labels.into_iter().collect::<Vec<_>>(), [shown.as_str()]);
    }

    fn sample(text: &str, series: &str) -> Option<String> {
        text.lines().find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')
                .map(str::to_string)
        })
    }

    #[test]
    fn exposition_has_exact_counters_and_cumulative_histograms() {
        let procs = FakeProcs::default();
        procs.start(100, 1);
        let mut t = Totals::new(Retention {
            per_process: true,
            ..retention()
        });
        let mut r = row(100, Some("web\"01\\\nx"), "vda", 10, 4);
        r.latency[Op::Read as usize].record(5, 1); // 5 ns: below the first bound
        r.latency[Op::Read as usize].record(600_000_000_000, 1); // ~10 min: the last bucket
        let mut tk = tick(Instant::now(), vec![r, row(7, None, "vda", 3, 0)]);
        tk.throttle = Some(ThrottleView {
            dry_run: true,
            budgets: vec![BudgetUse {
                storage: false,
                device: "vda".into(),
                iops_budget: Some(1000),
                iops_used: 1200.5,
                engaged: true,
                capacity_iops: Some(950.0),
                ..BudgetUse::default()
            }],
            limits: vec![ActiveLimit {
                vm: "web".into(),
                cgroup: "/m".into(),
                device: "vda".into(),
                riops: Some(300),
                wiops: None,
                rbps: None,
                wbps: Some(1 << 20),
                since_s: 12.5,
                qemu_disks: None,
            }],
            decisions_total: 3,
            throttled_seconds_total: 40.25,
            problems: vec![],
            qemu_limits: vec![crate::tick::VmQemuLimits {
                vm: "web".into(),
                disks: vec![crate::qemu::limits::DiskLimits {
                    disk: "vda".into(),
                    iops: Some(500),
                    bps_wr: Some(1 << 20),
                    ..Default::default()
                }],
            }],
            storage: vec![],
        });
        t.apply(&tk, &procs);
        let text = render(t);
        // The name's newline shown as `\x0a` (as `top` shows it), its backslash kept, then the
        // text format's own escaping of `"` and `\`.
        let vm = r#"vm="web\"01\\\\x0ax",device="vda""#;
        assert_eq!(
            sample(
                &text,
                &format!(r#"overkvm_vm_io_operations_total{{{vm},op="read"}}"#)
            ),
            Some("10".into()),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                &format!(r#"overkvm_vm_io_bytes_total{{{vm},op="write"}}"#)
            ),
            Some("16384".into())
        );
        let lat = |le: &str| {
            sample(
                &text,
                &format!(r#"overkvm_vm_io_latency_seconds_bucket{{le="{le}",{vm},op="read"}}"#),
            )
        };
        assert_eq!(lat("0.000001024"), Some("1".into()), "{text}");
        assert_eq!(lat("0.000004096"), Some("11".into()));
        assert_eq!(lat("34.359738368"), Some("11".into()));
        assert_eq!(lat("+Inf"), Some("12".into()));
        assert_eq!(
            sample(
                &text,
                &format!(r#"overkvm_vm_io_latency_seconds_count{{{vm},op="read"}}"#)
            ),
            Some("12".into())
        );
        assert!(text.contains("# UNIT overkvm_vm_io_latency_seconds seconds"));
        assert!(text.contains(r#"overkvm_vm_info{vm="web\"01\\\\x0ax",uuid="uuid-web\"01\\\\x0ax",manager="qemu",pid="100",cgroup="/machine/100"} 1"#), "{text}");
        assert_eq!(
            sample(
                &text,
                r#"overkvm_process_io_operations_total{comm="proc7",device="vda",op="read"}"#
            ),
            Some("3".into())
        );
        assert_eq!(
            sample(
                &text,
                r#"overkvm_device_io_operations_total{device="vda",op="read"}"#
            ),
            Some("13".into())
        );
        assert_eq!(
            sample(
                &text,
                r#"overkvm_throttle_limit_iops{vm="web",device="vda",direction="read"}"#
            ),
            Some("300".into())
        );
        assert!(!text.contains(r#"direction="write"} 300"#));
        assert_eq!(
            sample(
                &text,
                r#"overkvm_vm_qemu_limit_iops{vm="web",disk="vda",direction="total"}"#
            ),
            Some("500".into())
        );
        assert_eq!(
            sample(
                &text,
                r#"overkvm_vm_qemu_limit_bytes_per_second{vm="web",disk="vda",direction="write"}"#
            ),
            Some("1048576".into())
        );
        assert!(
            !text.contains(r#"overkvm_vm_qemu_limit_iops{vm="web",disk="vda",direction="read"}"#),
            "only limits that are set"
        );
        assert_eq!(
            sample(&text, r#"overkvm_device_capacity_iops{device="vda"}"#),
            Some("950.0".into())
        );
        assert_eq!(
            sample(&text, "overkvm_throttle_throttled_seconds_total"),
            Some("40.25".into())
        );
        assert_eq!(
            sample(
                &text,
                r#"overkvm_kernel_events_total{event="stats_map_full"}"#
            ),
            Some("0".into())
        );
        assert!(text.ends_with("# EOF\n"));
        // No PID anywhere but vm_info.
        for l in text.lines().filter(|l| l.contains("pid=")) {
            assert!(l.starts_with("overkvm_vm_info{"), "{l}");
        }
    }

    #[test]
    fn long_label_values_are_cut_at_a_character_boundary() {
        let procs = FakeProcs::default();
        procs.start(100, 1);
        let mut t = Totals::new(retention());
        let name = "é".repeat(300);
        t.apply(
            &tick(Instant::now(), vec![row(100, Some(&name), "vda", 1, 0)]),
            &procs,
        );
        let text = render(t);
        let cut = "é".repeat(MAX_LABEL_BYTES / 2);
        assert!(text.contains(&format!("vm=\"{cut}\"")));
    }

    #[test]
    fn classic_text_names_counters_with_total() {
        let om = "# HELP overkvm_ticks Sampling intervals.\n# TYPE overkvm_ticks counter\n\
                  overkvm_ticks_total 3\n# HELP overkvm_x_seconds X.\n# TYPE overkvm_x_seconds gauge\n\
                  # UNIT overkvm_x_seconds seconds\noverkvm_x_seconds 0.5\n# EOF\n";
        assert_eq!(
            openmetrics_to_text(om),
            "# HELP overkvm_ticks_total Sampling intervals.\n# TYPE overkvm_ticks_total counter\n\
             overkvm_ticks_total 3\n# HELP overkvm_x_seconds X.\n# TYPE overkvm_x_seconds gauge\n\
             overkvm_x_seconds 0.5\n"
        );
    }
}
