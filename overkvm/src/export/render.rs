//! Encoding the totals as OpenMetrics text (prometheus-client), and the classic Prometheus
//! text format derived from it for clients that do not ask for OpenMetrics.

use std::{
    fmt::{self, Write as _},
    sync::{Arc, Mutex},
};

use overkvm_common::{Health, LAT_BUCKETS, Op, bucket_upper_ns};
use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, LabelValueEncoder, MetricEncoder,
        NoLabelSet,
    },
};

use super::{
    lock,
    names::{self, Metric},
    totals::{LatencyTotals, OpTotals, Totals},
};
use crate::identity::Manager;

/// Label values longer than this are cut (at a character boundary). Names come from command
/// lines and cgroup paths, which anyone starting a process chooses.
const MAX_LABEL_BYTES: usize = 256;

/// A label value, escaped for the text formats (prometheus-client writes values raw).
struct Lv<'a>(&'a str);

impl EncodeLabelValue for Lv<'_> {
    fn encode(&self, enc: &mut LabelValueEncoder) -> fmt::Result {
        let mut end = self.0.len().min(MAX_LABEL_BYTES);
        while !self.0.is_char_boundary(end) {
            end -= 1;
        }
        let v = &self.0[..end];
        let mut start = 0;
        for (i, c) in v.char_indices() {
            let esc = match c {
                '\\' => "\\\\",
                '"' => "\\\"",
                '\n' => "\\n",
                _ => continue,
            };
            enc.write_str(&v[start..i])?;
            enc.write_str(esc)?;
            start = i + c.len_utf8();
        }
        enc.write_str(&v[start..])
    }
}

fn manager_name(m: Manager) -> &'static str {
    match m {
        Manager::Qemu => "qemu",
        Manager::Libvirt => "libvirt",
        Manager::Nova => "nova",
        Manager::Proxmox => "proxmox",
    }
}

/// Renders the exporter's totals on every encode; registered once in the registry.
#[derive(Debug)]
pub(super) struct TotalsCollector(pub Arc<Mutex<Totals>>);

impl Collector for TotalsCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let t = lock(&self.0);
        encode_totals(&t, &mut enc)
    }
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

/// Histogram buckets in seconds: `(le, count in this bucket only)`, the last one `+Inf`.
fn latency_buckets(h: &LatencyTotals) -> Vec<(f64, u64)> {
    let first = names::LATENCY_FIRST_BUCKET as usize;
    let last = names::LATENCY_LAST_BUCKET as usize;
    let mut out = Vec::with_capacity(last - first + 2);
    let below: u64 = h.buckets[..=first].iter().sum();
    out.push((bucket_upper_ns(first as u32) as f64 / 1e9, below));
    for i in first + 1..=last {
        out.push((bucket_upper_ns(i as u32) as f64 / 1e9, h.buckets[i]));
    }
    let above: u64 = h.buckets[last + 1..LAT_BUCKETS as usize].iter().sum();
    out.push((f64::MAX, above));
    out
}

fn encode_totals(t: &Totals, enc: &mut DescriptorEncoder) -> fmt::Result {
    use names::label::*;
    let vms = t.vms();
    let has_vm_devices = vms.iter().any(|v| !v.devices.is_empty());

    if let Some(mut m) = family(enc, &names::VM_IO_OPERATIONS, has_vm_devices)? {
        for vm in &vms {
            for (dev, d) in &vm.devices {
                for op in Op::ALL {
                    let l = [(VM, Lv(&vm.label)), (DEVICE, Lv(dev)), (OP, Lv(op.name()))];
                    counter(&mut m, &l, d.io[op as usize].ops)?;
                }
            }
        }
    }
    if let Some(mut m) = family(enc, &names::VM_IO_BYTES, has_vm_devices)? {
        for vm in &vms {
            for (dev, d) in &vm.devices {
                for op in BYTE_OPS {
                    let l = [(VM, Lv(&vm.label)), (DEVICE, Lv(dev)), (OP, Lv(op.name()))];
                    counter(&mut m, &l, d.io[op as usize].bytes)?;
                }
            }
        }
    }
    if let Some(mut m) = family(enc, &names::VM_IO_LATENCY, has_vm_devices)? {
        for vm in &vms {
            for (dev, d) in &vm.devices {
                for op in Op::ALL {
                    let h = &d.latency[op as usize];
                    // Reads and writes always; rarer ops once they have completions.
                    if !matches!(op, Op::Read | Op::Write) && h.count() == 0 {
                        continue;
                    }
                    let l = [(VM, Lv(&vm.label)), (DEVICE, Lv(dev)), (OP, Lv(op.name()))];
                    m.encode_family(&l)?.encode_histogram::<NoLabelSet>(
                        h.sum_ns as f64 / 1e9,
                        h.count(),
                        &latency_buckets(h),
                        None,
                    )?;
                }
            }
        }
    }
    if let Some(mut m) = family(enc, &names::VM_INFO, !vms.is_empty())? {
        for vm in &vms {
            let pid = vm.pid.to_string();
            let l = [
                (VM, Lv(&vm.label)),
                (UUID, Lv(vm.uuid.as_deref().unwrap_or(""))),
                (MANAGER, Lv(manager_name(vm.manager))),
                (PID, Lv(&pid)),
                (CGROUP, Lv(&vm.cgroup)),
            ];
            gauge(&mut m, &l, 1i64)?;
        }
    }

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
    if let Some(mut m) = family(enc, &names::MAP_READ_ERRORS, true)? {
        m.encode_counter::<NoLabelSet, _, f64>(&s.read_errors, None)?;
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
    if let Some(mut m) = family(enc, &names::EXPORTER_INFO, true)? {
        let l = [
            (VERSION, Lv(env!("CARGO_PKG_VERSION"))),
            (HOOK_MODE, Lv(&s.mode)),
        ];
        gauge(&mut m, &l, 1i64)?;
    }

    let Some(th) = &s.throttle else {
        return Ok(());
    };
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

    fn render(t: Totals) -> String {
        let mut reg = Registry::with_prefix(names::PREFIX);
        reg.register_collector(Box::new(TotalsCollector(Arc::new(Mutex::new(t)))));
        let mut s = String::new();
        encode(&mut s, &reg).expect("encoding");
        s
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
            per_process_cap: 5,
            grace: Duration::from_secs(60),
        });
        let mut r = row(100, Some("web\"01\\\nx"), "vda", 10, 4);
        r.latency[Op::Read as usize].record(5, 1); // 5 ns: below the first bound
        r.latency[Op::Read as usize].record(600_000_000_000, 1); // ~10 min: the last bucket
        let mut tk = tick(Instant::now(), vec![r, row(7, None, "vda", 3, 0)]);
        tk.throttle = Some(ThrottleView {
            dry_run: true,
            budgets: vec![BudgetUse {
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
            }],
            decisions_total: 3,
            throttled_seconds_total: 40.25,
            problems: vec![],
        });
        t.apply(&tk, &procs);
        let text = render(t);
        let vm = r#"vm="web\"01\\\nx",device="vda""#;
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
        assert!(text.contains(r#"overkvm_vm_info{vm="web\"01\\\nx",uuid="uuid-web\"01\\\nx",manager="qemu",pid="100",cgroup="/machine/100"} 1"#), "{text}");
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
        let mut t = Totals::new(Retention {
            per_process: false,
            per_process_cap: 5,
            grace: Duration::from_secs(60),
        });
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
