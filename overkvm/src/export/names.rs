//! Every metric the exporter exposes, in one place: name, type, unit, labels and help.
//!
//! Names follow the Prometheus conventions: one `overkvm_` prefix, base units (seconds, bytes)
//! as a suffix, `_total` on counters. The OpenMetrics encoder appends the unit and `_total`
//! itself, so `name` here carries neither; [`Metric::exposed`] gives the name Prometheus stores.
//! Label sets are bounded: VM names, devices, ops, program and map names, and (only with
//! `--per-process`, capped) process names. A PID appears in one label only, on `vm_info`.

use prometheus_client::{metrics::MetricType, registry::Unit};

/// Prefix of every metric name.
pub const PREFIX: &str = "overkvm";

/// How Prometheus treats a metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// The base unit a metric name ends with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BaseUnit {
    Seconds,
    Bytes,
}

/// One metric family.
#[derive(Clone, Copy, Debug)]
pub struct Metric {
    /// Without prefix, unit and `_total`.
    pub name: &'static str,
    pub kind: Kind,
    pub unit: Option<BaseUnit>,
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

static SECONDS: Unit = Unit::Seconds;
static BYTES: Unit = Unit::Bytes;

impl Metric {
    /// The family name as Prometheus stores it: `overkvm_vm_io_bytes_total`,
    /// `overkvm_vm_io_latency_seconds` (whose series add `_bucket`, `_sum` and `_count`).
    pub fn exposed(&self) -> String {
        let mut s = format!("{PREFIX}_{}", self.name);
        match self.unit {
            Some(BaseUnit::Seconds) => s.push_str("_seconds"),
            Some(BaseUnit::Bytes) => s.push_str("_bytes"),
            None => {}
        }
        if self.kind == Kind::Counter {
            s.push_str("_total");
        }
        s
    }

    pub(crate) fn metric_type(&self) -> MetricType {
        match self.kind {
            Kind::Counter => MetricType::Counter,
            Kind::Gauge => MetricType::Gauge,
            Kind::Histogram => MetricType::Histogram,
        }
    }

    pub(crate) fn unit(&self) -> Option<&'static Unit> {
        match self.unit {
            Some(BaseUnit::Seconds) => Some(&SECONDS),
            Some(BaseUnit::Bytes) => Some(&BYTES),
            None => None,
        }
    }
}

/// Label names.
pub mod label {
    /// The VM's name (qemu `-name`), made unique when two VMs share one (see README).
    pub const VM: &str = "vm";
    pub const UUID: &str = "uuid";
    pub const MANAGER: &str = "manager";
    pub const PID: &str = "pid";
    pub const CGROUP: &str = "cgroup";
    /// KubeVirt VMs only: the VMI's Kubernetes namespace.
    pub const NAMESPACE: &str = "namespace";
    /// Kernel block device name (`nvme0n1`, `loop3`).
    pub const DEVICE: &str = "device";
    /// read, write, discard, flush, other (`overkvm_common::Op::name`).
    pub const OP: &str = "op";
    pub const COMM: &str = "comm";
    pub const PROGRAM: &str = "program";
    pub const MAP: &str = "map";
    /// `overkvm_common::Health::name`.
    pub const EVENT: &str = "event";
    /// read or write (and total, for QEMU's own limits).
    pub const DIRECTION: &str = "direction";
    /// A VM's disk as QEMU or libvirt names it (`-drive` id, qdev, libvirt target `vda`).
    pub const DISK: &str = "disk";
    pub const VERSION: &str = "version";
    pub const HOOK_MODE: &str = "hook_mode";
    /// Why the exporter closed a connection (`timeout`, `oversized`) or refused a client
    /// (`no_credentials`, `bad_credentials`, `tls_handshake`, `rate_limited`).
    pub const REASON: &str = "reason";
    /// How an attempt ended: `success` or `failure`.
    pub const RESULT: &str = "result";
    /// `qemu` on the series of a VM disk that overkvm counts from QEMU's own counters
    /// (network storage no host block device sees); absent on eBPF-counted devices, whose
    /// series keep the labels they always had.
    pub const SOURCE: &str = "source";
    /// Where a network disk's data lives, credentials stripped (`rbd:pool/image`).
    pub const TARGET: &str = "target";
}

use label::*;

const VM_DEV_OP: &[&str] = &[VM, DEVICE, OP, SOURCE];

pub const VM_IO_OPERATIONS: Metric = Metric {
    name: "vm_io_operations",
    kind: Kind::Counter,
    unit: None,
    labels: VM_DEV_OP,
    help: "Block I/O operations submitted by a VM's qemu process (requests on blk-mq devices, bios on bio-based ones).",
};

pub const VM_IO_BYTES: Metric = Metric {
    name: "vm_io",
    kind: Kind::Counter,
    unit: Some(BaseUnit::Bytes),
    labels: VM_DEV_OP,
    help: "Bytes of block I/O submitted by a VM's qemu process (read, write and discard).",
};

pub const VM_IO_LATENCY: Metric = Metric {
    name: "vm_io_latency",
    kind: Kind::Histogram,
    unit: Some(BaseUnit::Seconds),
    labels: VM_DEV_OP,
    help: "Block I/O latency of a VM's requests from submission to completion (buckets: see --latency-buckets).",
};

pub const VM_INFO: Metric = Metric {
    name: "vm_info",
    kind: Kind::Gauge,
    unit: None,
    labels: &[VM, UUID, MANAGER, PID, CGROUP, NAMESPACE],
    help: "A VM known to the exporter (1), with its UUID, manager, qemu PID and cgroup (and namespace on KubeVirt).",
};

pub const VM_DISK_INFO: Metric = Metric {
    name: "vm_disk_info",
    kind: Kind::Gauge,
    unit: None,
    labels: &[VM, DEVICE, SOURCE, TARGET],
    help: "A VM disk counted from QEMU's own counters because no host block device sees its I/O (1), with its storage target.",
};

pub const DEVICE_IO_OPERATIONS: Metric = Metric {
    name: "device_io_operations",
    kind: Kind::Counter,
    unit: None,
    labels: &[DEVICE, OP],
    help: "Block I/O operations on a device, every process included.",
};

pub const DEVICE_IO_BYTES: Metric = Metric {
    name: "device_io",
    kind: Kind::Counter,
    unit: Some(BaseUnit::Bytes),
    labels: &[DEVICE, OP],
    help: "Bytes of block I/O on a device, every process included.",
};

pub const DEVICE_PARITY_DIFFERENCE: Metric = Metric {
    name: "device_parity_difference",
    kind: Kind::Gauge,
    unit: None,
    labels: &[DEVICE, OP],
    help: "The live self-check: overkvm's operations on a disk since it started watching it minus /proc/diskstats' (requests in flight while the disk is busy; 0 when it is idle).",
};

pub const DEVICE_PARITY_SETTLED: Metric = Metric {
    name: "device_parity_settled",
    kind: Kind::Gauge,
    unit: None,
    labels: &[DEVICE],
    help: "1 when overkvm and /proc/diskstats have disagreed on a disk for three idle reads in a row (a real loss, not the in-flight skew), else 0.",
};

pub const PROCESS_IO_OPERATIONS: Metric = Metric {
    name: "process_io_operations",
    kind: Kind::Counter,
    unit: None,
    labels: &[COMM, DEVICE, OP],
    help: "Block I/O operations of non-VM processes by name (with --per-process).",
};

pub const PROCESS_IO_BYTES: Metric = Metric {
    name: "process_io",
    kind: Kind::Counter,
    unit: Some(BaseUnit::Bytes),
    labels: &[COMM, DEVICE, OP],
    help: "Bytes of block I/O of non-VM processes by name (with --per-process).",
};

pub const PROCESS_IO_DROPPED: Metric = Metric {
    name: "process_io_dropped_operations",
    kind: Kind::Counter,
    unit: None,
    labels: &[],
    help: "Block I/O operations of non-VM processes left out because --per-process-cap names were already exported.",
};

pub const BPF_PROGRAM_RUNS: Metric = Metric {
    name: "bpf_program_runs",
    kind: Kind::Counter,
    unit: None,
    labels: &[PROGRAM],
    help: "Times the kernel ran an overkvm eBPF program since it was loaded.",
};

pub const BPF_PROGRAM_RUN_TIME: Metric = Metric {
    name: "bpf_program_run",
    kind: Kind::Counter,
    unit: Some(BaseUnit::Seconds),
    labels: &[PROGRAM],
    help: "CPU time the kernel spent in an overkvm eBPF program since it was loaded.",
};

pub const BPF_PROGRAM_RECURSION_MISSES: Metric = Metric {
    name: "bpf_program_recursion_misses",
    kind: Kind::Counter,
    unit: None,
    labels: &[PROGRAM],
    help: "Runs of an overkvm eBPF program the kernel skipped because it was already running on that CPU: block events never counted.",
};

pub const BPF_MAP_ENTRIES: Metric = Metric {
    name: "bpf_map_entries",
    kind: Kind::Gauge,
    unit: None,
    labels: &[MAP],
    help: "Entries in a kernel map at the last sample.",
};

pub const BPF_MAP_CAPACITY: Metric = Metric {
    name: "bpf_map_capacity",
    kind: Kind::Gauge,
    unit: None,
    labels: &[MAP],
    help: "Maximum entries of a kernel map; a full map drops what it cannot hold and counts it in overkvm_kernel_events_total.",
};

pub const KERNEL_EVENTS: Metric = Metric {
    name: "kernel_events",
    kind: Kind::Counter,
    unit: None,
    labels: &[EVENT],
    help: "Events the kernel side counted instead of recording: full maps, in-flight slot collisions and misses, read faults (losses), partial completions (not a loss).",
};

pub const MAP_READ_ERRORS: Metric = Metric {
    name: "map_read_errors",
    kind: Kind::Counter,
    unit: None,
    labels: &[],
    help: "Map entries that vanished while being read.",
};

pub const EXEC_NAMING_EXPIRED: Metric = Metric {
    name: "exec_naming_expired",
    kind: Kind::Counter,
    unit: None,
    labels: &[],
    help: "Rows of a process caught inside exec (empty command line) held for their name and released unnamed after 4 intervals.",
};

pub const COUNTED_AFTER_PRUNE: Metric = Metric {
    name: "counted_after_prune",
    kind: Kind::Counter,
    unit: None,
    labels: &[],
    help: "Completions and flushes of exited processes counted in the instant their keys were pruned, after their final values were read: in no row.",
};

pub const SAMPLE_DURATION: Metric = Metric {
    name: "sample_duration",
    kind: Kind::Gauge,
    unit: Some(BaseUnit::Seconds),
    labels: &[],
    help: "Time the last tick took to read the kernel maps and build its report.",
};

pub const RENDER_DURATION: Metric = Metric {
    name: "exporter_render_duration",
    kind: Kind::Gauge,
    unit: Some(BaseUnit::Seconds),
    labels: &[],
    help: "Time the previous rendering of /metrics took (rendered once per tick; scrapes send the cached text).",
};

pub const TICKS: Metric = Metric {
    name: "ticks",
    kind: Kind::Counter,
    unit: None,
    labels: &[],
    help: "Sampling intervals folded into these metrics.",
};

pub const TICK_LATENESS: Metric = Metric {
    name: "tick_lateness",
    kind: Kind::Gauge,
    unit: Some(BaseUnit::Seconds),
    labels: &[],
    help: "How late the last tick started after its scheduled time.",
};

pub const TICK_LATENESS_MAX: Metric = Metric {
    name: "tick_lateness_max",
    kind: Kind::Gauge,
    unit: Some(BaseUnit::Seconds),
    labels: &[],
    help: "The latest any tick started after its scheduled time since the daemon started.",
};

pub const TICK_DURATION: Metric = Metric {
    name: "tick_duration",
    kind: Kind::Gauge,
    unit: Some(BaseUnit::Seconds),
    labels: &[],
    help: "Time the previous tick took from its start to the end of its work (sample, throttle, export).",
};

pub const TICK_DURATION_MAX: Metric = Metric {
    name: "tick_duration_max",
    kind: Kind::Gauge,
    unit: Some(BaseUnit::Seconds),
    labels: &[],
    help: "The longest tick since the daemon started, from its start to the end of its work.",
};

pub const EXPORTER_CONNECTIONS: Metric = Metric {
    name: "exporter_connections",
    kind: Kind::Gauge,
    unit: None,
    labels: &[],
    help: "Connections to /metrics open now (at most the connection cap).",
};

pub const EXPORTER_CONNECTIONS_REFUSED: Metric = Metric {
    name: "exporter_connections_refused",
    kind: Kind::Counter,
    unit: None,
    labels: &[],
    help: "Connections to /metrics answered 503 and closed at once because the connection cap was reached.",
};

pub const EXPORTER_CONNECTIONS_DROPPED: Metric = Metric {
    name: "exporter_connections_dropped",
    kind: Kind::Counter,
    unit: None,
    labels: &[REASON],
    help: "Connections to /metrics the exporter closed: too slow to send a request or read a response (timeout), or a request over the size limit (oversized).",
};

pub const EXPORTER_AUTH_FAILURES: Metric = Metric {
    name: "exporter_auth_failures",
    kind: Kind::Counter,
    unit: None,
    labels: &[REASON],
    help: "Clients of /metrics refused under --web.config.file: no credentials (no_credentials), a wrong user or password (bad_credentials), a failed TLS handshake such as an unknown client certificate (tls_handshake), or too many failures from the same address (rate_limited).",
};

pub const EXPORTER_WEB_CONFIG_RELOADS: Metric = Metric {
    name: "exporter_web_config_reloads",
    kind: Kind::Counter,
    unit: None,
    labels: &[RESULT],
    help: "Times the --web.config.file (or a certificate, key or CA file it names) changed and was read again; on failure the previous configuration stays in force.",
};

pub const EXPORTER_VMS_DROPPED: Metric = Metric {
    name: "exporter_vms_dropped",
    kind: Kind::Gauge,
    unit: None,
    labels: &[],
    help: "VMs left out of /metrics at the last tick because more than --max-vms are known (the least busy are left out).",
};

pub const EXPORTER_INFO: Metric = Metric {
    name: "exporter_info",
    kind: Kind::Gauge,
    unit: None,
    labels: &[VERSION, HOOK_MODE],
    help: "overkvm version and the block-layer hooks in use (1).",
};

pub const THROTTLE_LIMIT_IOPS: Metric = Metric {
    name: "throttle_limit_iops",
    kind: Kind::Gauge,
    unit: None,
    labels: &[VM, DEVICE, DIRECTION],
    help: "IOPS limit the throttle has in place on a VM and device (cgroup v2 io.max riops/wiops, or v1 blkio.throttle.read_iops_device/write_iops_device).",
};

pub const THROTTLE_LIMIT_BPS: Metric = Metric {
    name: "throttle_limit_bytes_per_second",
    kind: Kind::Gauge,
    unit: None,
    labels: &[VM, DEVICE, DIRECTION],
    help: "Bandwidth limit the throttle has in place on a VM and device (cgroup v2 io.max rbps/wbps, or v1 blkio.throttle.read_bps_device/write_bps_device).",
};

pub const THROTTLE_LIMIT_AGE: Metric = Metric {
    name: "throttle_limit_age",
    kind: Kind::Gauge,
    unit: Some(BaseUnit::Seconds),
    labels: &[VM, DEVICE],
    help: "Time since the throttle first limited a VM on a device (this engagement).",
};

pub const VM_QEMU_LIMIT_IOPS: Metric = Metric {
    name: "vm_qemu_limit_iops",
    kind: Kind::Gauge,
    unit: None,
    labels: &[VM, DISK, DIRECTION],
    help: "IOPS limit QEMU itself enforces on a VM's disk as its owner set it (an operator, Nova quota:disk_*, libvirt iotune, Proxmox iops_*; direction total, read or write), re-read every 30 s; only limits that are set.",
};

pub const VM_QEMU_LIMIT_BPS: Metric = Metric {
    name: "vm_qemu_limit_bytes_per_second",
    kind: Kind::Gauge,
    unit: None,
    labels: &[VM, DISK, DIRECTION],
    help: "Bandwidth limit QEMU itself enforces on a VM's disk as its owner set it (direction total, read or write), re-read every 30 s; only limits that are set.",
};

pub const THROTTLE_BUDGET_IOPS: Metric = Metric {
    name: "throttle_budget_iops",
    kind: Kind::Gauge,
    unit: None,
    labels: &[DEVICE],
    help: "IOPS budget configured for a device.",
};

pub const THROTTLE_USED_IOPS: Metric = Metric {
    name: "throttle_used_iops",
    kind: Kind::Gauge,
    unit: None,
    labels: &[DEVICE],
    help: "IOPS the VMs used on a device in the last interval, as the throttle counts them.",
};

pub const THROTTLE_ENGAGED: Metric = Metric {
    name: "throttle_engaged",
    kind: Kind::Gauge,
    unit: None,
    labels: &[DEVICE],
    help: "1 while the throttle holds the VMs on a device to its budget.",
};

pub const DEVICE_CAPACITY_IOPS: Metric = Metric {
    name: "device_capacity_iops",
    kind: Kind::Gauge,
    unit: None,
    labels: &[DEVICE],
    help: "IOPS a device delivers at its latency target, as the throttle learned while holding it there.",
};

pub const THROTTLE_DECISIONS: Metric = Metric {
    name: "throttle_decisions",
    kind: Kind::Counter,
    unit: None,
    labels: &[],
    help: "Limits the throttle wrote or removed.",
};

pub const THROTTLE_THROTTLED: Metric = Metric {
    name: "throttle_throttled",
    kind: Kind::Counter,
    unit: Some(BaseUnit::Seconds),
    labels: &[],
    help: "Time VMs spent limited, summed over VMs and devices.",
};

pub const THROTTLE_DRY_RUN: Metric = Metric {
    name: "throttle_dry_run",
    kind: Kind::Gauge,
    unit: None,
    labels: &[],
    help: "1 when the throttle only decides and reports (--dry-run) and writes no limits.",
};

pub const THROTTLE_PROBLEMS: Metric = Metric {
    name: "throttle_problems",
    kind: Kind::Gauge,
    unit: None,
    labels: &[],
    help: "Problems that degrade throttling right now (a VM sharing a cgroup, a vanished device).",
};

/// Every family, in the order they are rendered.
pub const ALL: &[Metric] = &[
    VM_IO_OPERATIONS,
    VM_IO_BYTES,
    VM_IO_LATENCY,
    VM_INFO,
    VM_DISK_INFO,
    DEVICE_IO_OPERATIONS,
    DEVICE_IO_BYTES,
    DEVICE_PARITY_DIFFERENCE,
    DEVICE_PARITY_SETTLED,
    PROCESS_IO_OPERATIONS,
    PROCESS_IO_BYTES,
    PROCESS_IO_DROPPED,
    BPF_PROGRAM_RUNS,
    BPF_PROGRAM_RUN_TIME,
    BPF_PROGRAM_RECURSION_MISSES,
    BPF_MAP_ENTRIES,
    BPF_MAP_CAPACITY,
    KERNEL_EVENTS,
    MAP_READ_ERRORS,
    EXEC_NAMING_EXPIRED,
    COUNTED_AFTER_PRUNE,
    SAMPLE_DURATION,
    RENDER_DURATION,
    TICKS,
    TICK_LATENESS,
    TICK_LATENESS_MAX,
    TICK_DURATION,
    TICK_DURATION_MAX,
    EXPORTER_CONNECTIONS,
    EXPORTER_CONNECTIONS_REFUSED,
    EXPORTER_CONNECTIONS_DROPPED,
    EXPORTER_AUTH_FAILURES,
    EXPORTER_WEB_CONFIG_RELOADS,
    EXPORTER_VMS_DROPPED,
    EXPORTER_INFO,
    THROTTLE_LIMIT_IOPS,
    THROTTLE_LIMIT_BPS,
    THROTTLE_LIMIT_AGE,
    VM_QEMU_LIMIT_IOPS,
    VM_QEMU_LIMIT_BPS,
    THROTTLE_BUDGET_IOPS,
    THROTTLE_USED_IOPS,
    THROTTLE_ENGAGED,
    DEVICE_CAPACITY_IOPS,
    THROTTLE_DECISIONS,
    THROTTLE_THROTTLED,
    THROTTLE_DRY_RUN,
    THROTTLE_PROBLEMS,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_conventions() {
        let mut seen = std::collections::HashSet::new();
        for m in ALL {
            let exposed = m.exposed();
            assert!(seen.insert(exposed.clone()), "{exposed} twice");
            assert!(
                m.name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_' || b.is_ascii_digit()),
                "{exposed}"
            );
            assert!(
                !m.name.ends_with("_total"),
                "{exposed}: the encoder adds _total"
            );
            assert_eq!(
                m.kind == Kind::Counter,
                exposed.ends_with("_total"),
                "{exposed}"
            );
            assert!(
                !m.labels.contains(&label::PID) || m.name == "vm_info",
                "{exposed}"
            );
            assert!(
                !m.help.contains(['\n', '\\']),
                "{exposed}: help is written raw"
            );
        }
        assert_eq!(VM_IO_BYTES.exposed(), "overkvm_vm_io_bytes_total");
        assert_eq!(VM_IO_LATENCY.exposed(), "overkvm_vm_io_latency_seconds");
        assert_eq!(
            BPF_PROGRAM_RUN_TIME.exposed(),
            "overkvm_bpf_program_run_seconds_total"
        );
    }

    /// The alert rules and the dashboard name only metrics that exist.
    #[test]
    fn packaging_uses_only_exported_names() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging");
        let mut known: Vec<String> = Vec::new();
        for m in ALL {
            let e = m.exposed();
            if m.kind == Kind::Histogram {
                for s in ["_bucket", "_sum", "_count"] {
                    known.push(format!("{e}{s}"));
                }
            }
            known.push(e);
        }
        for file in [
            "prometheus/overkvm-alerts.yml",
            "prometheus/overkvm-alerts.test.yml",
            "prometheus/overkvm-rules.yml",
            "prometheus/overkvm-rules.test.yml",
            "grafana/overkvm.json",
        ] {
            let path = root.join(file);
            let Ok(text) = std::fs::read_to_string(&path) else {
                panic!("{} is missing", path.display());
            };
            let mut rest = text.as_str();
            while let Some(at) = rest.find("overkvm_") {
                let tail = &rest[at..];
                let end = tail
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(tail.len());
                let name = &tail[..end];
                // `level:overkvm_…:operation` is a recorded series (overkvm-rules.yml), not
                // one the exporter serves.
                let recorded = rest[..at].ends_with(':');
                assert!(
                    recorded || known.iter().any(|k| k == name),
                    "{file} uses {name}, which the exporter does not expose"
                );
                rest = &tail[end..];
            }
        }
    }
}
