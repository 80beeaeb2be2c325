//! One interval's view of who did I/O: rows per process and device, per device, per cgroup.
//!
//! `Report` is what `top -b --json` prints, what the interactive view renders, and what later
//! consumers read. Building it is the only place deltas meet identities: [`ReportBuilder`]
//! looks up, through small traits ([`Processes`], [`Devices`], [`CgroupPaths`], [`DiskStats`]),
//! what the host says about the processes, devices and cgroups an interval names, and
//! [`join`] (pure) turns counts and those answers into rows.

use std::{
    collections::{BTreeMap, HashMap, HashSet, hash_map::Entry},
    sync::Arc,
    time::SystemTime,
};

use overkvm_common::{Health, OP_COUNT, Op};
use serde::Serialize;

mod held;
mod qemu_rows;

pub use qemu_rows::QemuBaselines;

/// Health event: rows of a process inside exec released unnamed (see `held`).
pub use held::EXPIRED_EVENT as EXEC_NAMING_EXPIRED;

/// Health event: counts that reached a dead process's slot while its key was pruned (see
/// `Sampler::prune`).
pub const COUNTED_AFTER_PRUNE: &str = "counted_after_prune";

use crate::{
    devices::{DeviceInfo, DeviceTable},
    host::cgroup::CgroupNames,
    host::proc,
    identity::{Manager, ProcessIdentity, Resolver, VmIdentity},
    parity::{DeviceParity, DiskCounters, ParityCheck},
    sample::{Counters, Delta, Histogram, MapFill, Snapshot},
    stats,
};

/// Ops and bytes split by operation, exact counts within the interval.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct OpCounts {
    pub read_ops: u64,
    pub write_ops: u64,
    pub discard_ops: u64,
    pub flush_ops: u64,
    pub other_ops: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub discard_bytes: u64,
}

impl OpCounts {
    pub fn add(&mut self, op: Op, c: Counters) {
        match op {
            Op::Read => {
                self.read_ops += c.ops;
                self.read_bytes += c.bytes;
            }
            Op::Write => {
                self.write_ops += c.ops;
                self.write_bytes += c.bytes;
            }
            Op::Discard => {
                self.discard_ops += c.ops;
                self.discard_bytes += c.bytes;
            }
            Op::Flush => self.flush_ops += c.ops,
            Op::Other => self.other_ops += c.ops,
        }
    }

    pub fn merge(&mut self, o: &OpCounts) {
        self.read_ops += o.read_ops;
        self.write_ops += o.write_ops;
        self.discard_ops += o.discard_ops;
        self.flush_ops += o.flush_ops;
        self.other_ops += o.other_ops;
        self.read_bytes += o.read_bytes;
        self.write_bytes += o.write_bytes;
        self.discard_bytes += o.discard_bytes;
    }

    pub fn total_ops(&self) -> u64 {
        self.read_ops + self.write_ops + self.discard_ops + self.flush_ops + self.other_ops
    }
}

/// Where a row's op counts come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CountSource {
    /// Requests (blk-mq devices), as iostat counts them.
    Request,
    /// Bios (bio-based devices such as zram, md, dm), as io.max counts them.
    Bio,
    /// QEMU's own counters of a VM disk that no host block device sees (network storage):
    /// the guest's requests (`query-blockstats`, `virsh domstats --block`).
    Qemu,
}

impl CountSource {
    /// The name JSON and metrics use.
    pub fn name(self) -> &'static str {
        match self {
            CountSource::Request => "request",
            CountSource::Bio => "bio",
            CountSource::Qemu => "qemu",
        }
    }
}

/// The VM a row belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VmRef {
    pub name: String,
    pub uuid: Option<String>,
    pub manager: Manager,
    /// The Kubernetes namespace of a KubeVirt VM (its name is `<namespace>/<vmi>`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

impl From<&VmIdentity> for VmRef {
    fn from(v: &VmIdentity) -> VmRef {
        VmRef {
            name: v.name.clone(),
            uuid: v.uuid.clone(),
            manager: v.manager,
            namespace: v.namespace.clone(),
        }
    }
}

/// Per device totals (the numbers iostat would give, for the traced interval).
#[derive(Clone, Debug, Serialize)]
pub struct DeviceRow {
    pub device: String,
    pub major: u32,
    pub minor: u32,
    pub disk: String,
    pub source: CountSource,
    #[serde(flatten)]
    pub counts: OpCounts,
}

/// One process on one device.
#[derive(Clone, Debug, Serialize)]
pub struct ProcessRow {
    pub pid: u32,
    /// When the process started (clock ticks after boot), if known: with the PID, it names
    /// one process across intervals.
    #[serde(skip)]
    pub start_time: Option<u64>,
    pub comm: String,
    pub vm: Option<VmRef>,
    /// The process's own cgroup (v2 path, or the v1 blkio path on v1 hosts); "" if unknown.
    pub cgroup: String,
    /// The cgroup the kernel charged this I/O to (the bios' blkcg, relative to the block
    /// controller's hierarchy): the one io.max / blkio.throttle limits act on.
    pub io_cgroup: Option<String>,
    pub device: String,
    pub major: u32,
    pub minor: u32,
    pub source: CountSource,
    #[serde(flatten)]
    pub counts: OpCounts,
    /// Bios submitted: on bio-based devices always, on blk-mq devices with `--all-bios` (one
    /// request can carry several).
    pub read_bios: u64,
    pub write_bios: u64,
    pub lat_avg_us: Option<f64>,
    pub lat_p99_us: Option<f64>,
    /// Completions measured in the interval.
    pub completions: u64,
    /// The process had exited when the interval was read.
    pub exited: bool,
    /// A kernel thread submitted this I/O (writeback, throttle dispatch, loop worker).
    pub kernel_thread: bool,
    /// Of this VM row's ops, how many kernel threads submitted on its behalf (charged to the
    /// VM's cgroup: cgroup writeback, or bios the throttle queued and dispatched later).
    pub kernel_submitted_ops: u64,
    /// Latency histograms of the interval by `Op` (for the exporter; not in JSON).
    #[serde(skip)]
    pub latency: Box<[Histogram; OP_COUNT]>,
    /// For `source: "qemu"` rows, the storage the disk lands on, credentials stripped
    /// (`nbd://host:port/export`, `rbd:pool/image`); `device` is then the guest's disk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// The cgroup that owns I/O on one device (the block controller's view: what io.max limits,
/// and where cgroup writeback puts a flusher's writes).
#[derive(Clone, Debug, Serialize)]
pub struct CgroupRow {
    pub cgroup: String,
    pub cgroup_id: u64,
    pub device: String,
    pub source: CountSource,
    #[serde(flatten)]
    pub counts: OpCounts,
    /// Bios the cgroup submitted, split remainders included: what the kernel's per-cgroup
    /// counters count (v2 `io.stat` rios/wios/dios, v1 `blkio.throttle.io_serviced`). On
    /// bio-based devices always, on blk-mq devices with `--all-bios`; 0 otherwise.
    pub read_bios: u64,
    pub write_bios: u64,
    pub discard_bios: u64,
}

/// Kernel-side losses and map use during the interval.
#[derive(Clone, Debug, Default, Serialize)]
pub struct HealthReport {
    /// Health counter deltas by name (only non-zero ones).
    pub events: BTreeMap<&'static str, u64>,
    /// Map entries that vanished while being read.
    pub read_errors: u64,
    /// Entries and capacity of each kernel map at the end of the interval.
    pub maps: BTreeMap<&'static str, MapFill>,
}

/// Everything one interval says.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub timestamp: String,
    pub interval_s: f64,
    pub mode: String,
    pub devices: Vec<DeviceRow>,
    pub processes: Vec<ProcessRow>,
    pub cgroups: Vec<CgroupRow>,
    pub health: HealthReport,
    /// The live self-check against `/proc/diskstats`, per disk with I/O since overkvm
    /// started (see `parity`): overkvm minus diskstats is 0 whenever the disk is idle.
    pub parity: Vec<DeviceParity>,
    /// Per storage target (`nbd://host:port/export`, `rbd:pool/image`), what this host's
    /// VMs did on it by QEMU's counters: the network disks' `devices` (busiest first).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub storage: Vec<DeviceRow>,
}

impl Report {
    pub fn vm_count(&self) -> usize {
        let mut names: Vec<&str> = self
            .processes
            .iter()
            .filter_map(|p| p.vm.as_ref().map(|v| v.name.as_str()))
            .collect();
        names.sort_unstable();
        names.dedup();
        names.len()
    }

    pub fn process_count(&self) -> usize {
        let mut pids: Vec<u32> = self.processes.iter().map(|p| p.pid).collect();
        pids.sort_unstable();
        pids.dedup();
        pids.len()
    }
}

/// True while /proc has the process (host PID namespace).
pub fn pid_alive(pid: u32) -> bool {
    proc::alive(pid)
}

/// Formats a wall-clock time as RFC 3339 UTC with milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Who the processes are.
pub trait Processes {
    /// The identity of a live process; None when it is gone (or never was).
    fn identity(&mut self, pid: u32) -> Option<Arc<ProcessIdentity>>;
    /// True while the process exists.
    fn alive(&self, pid: u32) -> bool;
    /// When the process now at this PID started (clock ticks after boot); None when there
    /// is none. With the PID it names one process: a reused PID has another start time.
    fn start_time(&self, pid: u32) -> Option<u64>;
    /// Forgets what is cached about processes that are gone.
    fn forget_exited(&mut self);
    /// Forgets what is cached about one process: it exec'd.
    fn forget(&mut self, pid: u32);
}

/// What block devices are called.
pub trait Devices {
    /// The device with this number; one the host does not know is [`DeviceInfo::unknown`].
    fn device(&mut self, dev: u32) -> Arc<DeviceInfo>;
}

/// Where cgroups are in the block controller's hierarchy.
pub trait CgroupPaths {
    /// The path of a cgroup id relative to the hierarchy's root, while it exists.
    fn cgroup_path(&mut self, id: u64) -> Option<String>;
}

/// The kernel's own per-disk counters, for the self-check (see `parity`).
pub trait DiskStats {
    fn diskstats(&self) -> BTreeMap<String, DiskCounters>;
}

/// The host's processes: the identity resolver's cache over /proc.
impl Processes for Resolver {
    fn identity(&mut self, pid: u32) -> Option<Arc<ProcessIdentity>> {
        self.resolve(pid)
    }

    fn alive(&self, pid: u32) -> bool {
        proc::alive(pid)
    }

    fn start_time(&self, pid: u32) -> Option<u64> {
        proc::start_time(pid)
    }

    fn forget_exited(&mut self) {
        self.retain(proc::alive);
    }

    fn forget(&mut self, pid: u32) {
        Resolver::forget(self, pid);
    }
}

/// The host's devices, from sysfs.
impl Devices for DeviceTable {
    fn device(&mut self, dev: u32) -> Arc<DeviceInfo> {
        self.get(dev)
    }
}

/// The host's cgroups, from cgroupfs.
impl CgroupPaths for CgroupNames {
    fn cgroup_path(&mut self, id: u64) -> Option<String> {
        self.path(id)
    }
}

/// The host's `/proc/diskstats`.
pub struct ProcDiskStats;

impl DiskStats for ProcDiskStats {
    fn diskstats(&self) -> BTreeMap<String, DiskCounters> {
        crate::parity::read_diskstats()
    }
}

/// Everything a report looks up on the host.
pub struct HostLookups {
    pub processes: Box<dyn Processes + Send>,
    pub devices: Box<dyn Devices + Send>,
    pub cgroups: Box<dyn CgroupPaths + Send>,
    pub diskstats: Box<dyn DiskStats + Send>,
}

impl HostLookups {
    /// The real /proc, sysfs and cgroupfs of this host (all cached).
    pub fn host() -> HostLookups {
        HostLookups {
            processes: Box::new(Resolver::new()),
            devices: Box::new(DeviceTable::new()),
            cgroups: Box::new(CgroupNames::for_host()),
            diskstats: Box::new(ProcDiskStats),
        }
    }
}

/// Turns deltas into reports: looks up the processes, devices and cgroups an interval names
/// on the host, [`join`]s them with the counts, and keeps what must outlive one interval.
pub struct ReportBuilder {
    host: HostLookups,
    /// Names the kernel recorded, for processes gone before /proc could be read.
    kernel_comms: HashMap<u32, String>,
    /// Which VM owns which cgroup, learned across intervals.
    cgroup_owners: HashMap<String, Option<CgroupOwner>>,
    /// The last identity of each process that did I/O, kept a few intervals past its exit, so
    /// the interval in which a VM exits still carries its name (and a process named at its
    /// first I/O keeps it after a quick exit).
    recent: HashMap<u32, Recent>,
    /// Device totals since start against `/proc/diskstats`.
    parity: ParityCheck,
    /// Rows of processes caught inside their exec, waiting to be named.
    held: held::HeldRows,
    /// QEMU's counters of network disks at their last reading (see `qemu_rows`).
    qemu: QemuBaselines,
}

/// A process's identity as last resolved, and for how many intervals it has been gone.
struct Recent {
    ident: Arc<ProcessIdentity>,
    gone_for: u8,
}

/// Intervals a departed process's identity is kept: its last I/O may be read one interval
/// after its exit (the snapshot of the interval it exits in, then the harvest of its maps).
const RECENT_GRACE: u8 = 2;

impl Default for ReportBuilder {
    fn default() -> Self {
        ReportBuilder::new()
    }
}

impl ReportBuilder {
    /// Looks things up on this host.
    pub fn new() -> ReportBuilder {
        ReportBuilder::with_host(HostLookups::host())
    }

    /// Looks things up through `host` (tests give fixed answers).
    pub fn with_host(host: HostLookups) -> ReportBuilder {
        ReportBuilder {
            host,
            kernel_comms: HashMap::new(),
            cgroup_owners: HashMap::new(),
            recent: HashMap::new(),
            parity: ParityCheck::new(),
            held: held::HeldRows::default(),
            qemu: QemuBaselines::default(),
        }
    }

    /// Remembers the kernel's comms from the latest snapshot.
    pub fn note_comms(&mut self, comms: &HashMap<u32, String>) {
        for (k, v) in comms {
            self.kernel_comms.entry(*k).or_insert_with(|| v.clone());
        }
    }

    /// Builds the report of `delta`, whose end is `snap`.
    pub fn build(&mut self, delta: &Delta, mode: &str, snap: &Snapshot) -> Report {
        // What was read of a process before its exec names the old program.
        for pid in &snap.execed {
            self.host.processes.forget(*pid);
        }
        // Processes named at their first I/O since the last snapshot (some gone already).
        for (pid, ident) in &snap.early_names {
            self.recent.insert(
                *pid,
                Recent {
                    ident: Arc::clone(ident),
                    gone_for: 0,
                },
            );
        }
        let names = self.look_up(delta);
        let rows = join(delta, &names, &self.kernel_comms);
        let host_processes = &self.host.processes;
        learn_cgroup_owners(&mut self.cgroup_owners, &rows.processes, |pid| {
            host_processes.start_time(pid)
        });
        let mut processes = fold_kernel_rows_into_vms(rows.processes, &self.cgroup_owners);
        // Rows of processes caught inside their exec wait to be named (see `held`).
        let mut held = std::mem::take(&mut self.held);
        let expired = held.release(&mut processes, |pid| match names.processes.get(&pid) {
            Some(s) => s.clone(),
            None => self.seen(pid),
        });
        held.hold(&mut processes, |pid| {
            names
                .processes
                .get(&pid)
                .is_some_and(|s| s.alive && s.ident.as_ref().is_some_and(|p| !p.complete))
        });
        self.held = held;
        processes.sort_by(row_order);
        // Read right after the maps, so both sides end at (nearly) the same instant.
        let parity = self.parity.update(
            rows.devices
                .iter()
                .map(|d| (d.disk.as_str(), disk_counters(&d.counts))),
            &self.host.diskstats.diskstats(),
        );
        self.forget_exited();
        Report {
            timestamp: rfc3339(delta.wall.unwrap_or_else(SystemTime::now)),
            interval_s: delta.interval.as_secs_f64(),
            mode: mode.to_string(),
            devices: rows.devices,
            processes,
            cgroups: rows.cgroups,
            health: {
                let mut h = health_report(delta, snap);
                if expired != 0 {
                    h.events.insert(held::EXPIRED_EVENT, expired);
                }
                h
            },
            parity,
            storage: Vec::new(),
        }
    }

    /// Adds the rows of VM disks QEMU counts (network storage, see `qemu::backing`) from
    /// the readings that arrived in this interval, named like the kernel's rows.
    pub fn add_qemu_rows(
        &mut self,
        report: &mut Report,
        readings: &[crate::qemu::counters::QemuReading],
    ) {
        if readings.is_empty() && self.qemu.is_empty() {
            return;
        }
        let mut qemu = std::mem::take(&mut self.qemu);
        let rows = qemu.rows(readings, |pid| self.seen(pid), proc::alive);
        self.qemu = qemu;
        if !rows.is_empty() {
            report.storage = qemu_rows::storage_rows(&rows);
            report.processes.extend(rows);
            report.processes.sort_by(row_order);
        }
    }

    /// Looks up every process, device and cgroup the interval names, each once.
    fn look_up(&mut self, delta: &Delta) -> Names {
        let mut names = Names::default();
        let keys = delta
            .requests
            .keys()
            .chain(delta.bios.keys())
            .chain(delta.latency.keys());
        for k in keys {
            if let Entry::Vacant(e) = names.processes.entry(k.tgid) {
                e.insert(self.seen(k.tgid));
            }
            if let Entry::Vacant(e) = names.devices.entry(k.dev) {
                e.insert(self.host.devices.device(k.dev));
            }
        }
        // Only counted I/O names a cgroup; id 0 is "no cgroup".
        let mut asked = HashSet::from([0]);
        for k in delta.requests.keys().chain(delta.bios.keys()) {
            if asked.insert(k.cgroup_id)
                && let Some(path) = self.host.cgroups.cgroup_path(k.cgroup_id)
            {
                names.cgroups.insert(k.cgroup_id, path);
            }
        }
        names
    }

    /// A process as this interval sees it: its live identity (remembered), else the last
    /// one it had (it exited in this interval).
    fn seen(&mut self, tgid: u32) -> Seen {
        if tgid == 0 {
            return Seen {
                ident: None,
                alive: true,
            };
        }
        match self.host.processes.identity(tgid) {
            Some(p) => {
                self.recent.insert(
                    tgid,
                    Recent {
                        ident: Arc::clone(&p),
                        gone_for: 0,
                    },
                );
                Seen {
                    ident: Some(p),
                    alive: true,
                }
            }
            None => Seen {
                ident: self.recent.get(&tgid).map(|r| Arc::clone(&r.ident)),
                alive: false,
            },
        }
    }

    /// Drops what is kept about processes gone for longer than the grace.
    fn forget_exited(&mut self) {
        self.host.processes.forget_exited();
        let host = &self.host.processes;
        self.kernel_comms.retain(|pid, _| host.alive(*pid));
        self.recent.retain(|pid, r| {
            if host.alive(*pid) {
                r.gone_for = 0;
            } else {
                r.gone_for += 1;
            }
            r.gone_for <= RECENT_GRACE
        });
    }
}

/// What the host said about the processes, devices and cgroups of one interval: with the
/// counts, the input of [`join`].
#[derive(Clone, Debug, Default)]
pub struct Names {
    /// By tgid.
    pub processes: HashMap<u32, Seen>,
    /// By `dev_t`; a device missing here is [`DeviceInfo::unknown`].
    pub devices: HashMap<u32, Arc<DeviceInfo>>,
    /// Paths by cgroup id; an id missing here no longer exists (or is 0, no cgroup).
    pub cgroups: HashMap<u64, String>,
}

/// One process as an interval sees it.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    /// Its identity: the live one, else the last one it had; None when never known.
    pub ident: Option<Arc<ProcessIdentity>>,
    /// It existed when the interval was read (tgid 0, the kernel, always does).
    pub alive: bool,
}

/// The rows of one interval, before kernel threads' I/O is folded into the VMs it was for.
#[derive(Clone, Debug)]
pub struct Rows {
    /// By device number.
    pub devices: Vec<DeviceRow>,
    /// A kernel thread that charged several cgroups has one row per cgroup.
    pub processes: Vec<ProcessRow>,
    /// Busiest first.
    pub cgroups: Vec<CgroupRow>,
}

/// One process's counts on one device (one cgroup part of a kernel thread's), as `join`
/// accumulates them.
#[derive(Default)]
struct ProcAcc {
    /// Ops per owning cgroup id, to name the main one.
    owners: BTreeMap<u64, u64>,
    counts: OpCounts,
    bio_counts: OpCounts,
    hist: Histogram,
    by_op: Box<[Histogram; OP_COUNT]>,
}

/// (tgid, dev, cgroup part) -> its counts; the request/bio choice is made later, per device.
type PerProcess = BTreeMap<(u32, u32, Option<u64>), ProcAcc>;
/// (cgroup id, dev) -> (request counts, bio counts).
type PerCgroup = BTreeMap<(u64, u32), (OpCounts, OpCounts)>;

/// Joins an interval's counts with what the host said about them (pure).
///
/// Request counts are used on blk-mq devices, bio counts on bio-based ones. A process's
/// `io_cgroup` is the cgroup charged for most of its ops; its name is its identity's comm,
/// else the one the kernel recorded (`kernel_comms`), else "?".
pub fn join(delta: &Delta, names: &Names, kernel_comms: &HashMap<u32, String>) -> Rows {
    let (per_proc, per_cgroup) = accumulate(delta, names);
    let device = |dev: u32| {
        names
            .devices
            .get(&dev)
            .cloned()
            .unwrap_or_else(|| Arc::new(DeviceInfo::unknown(dev)))
    };
    let (processes, devices) = process_rows(per_proc, names, kernel_comms, &device);
    Rows {
        devices,
        processes,
        cgroups: cgroup_rows(per_cgroup, names, &device),
    }
}

/// Sums the interval's requests, bios and latencies per process and device, and per cgroup and
/// device.
fn accumulate(delta: &Delta, names: &Names) -> (PerProcess, PerCgroup) {
    // A kernel thread's I/O is kept apart per owning cgroup (the part), so that each part can
    // go to the VM owning that cgroup; user processes have one part.
    let part = |tgid: u32, cgroup_id: u64| {
        names
            .processes
            .get(&tgid)
            .and_then(|s| s.ident.as_ref())
            .is_some_and(|p| p.kernel_thread)
            .then_some(cgroup_id)
    };
    let mut per_proc = PerProcess::new();
    let mut per_cgroup = PerCgroup::new();
    for (k, c) in &delta.requests {
        let acc = per_proc
            .entry((k.tgid, k.dev, part(k.tgid, k.cgroup_id)))
            .or_default();
        acc.counts.add(k.op(), *c);
        *acc.owners.entry(k.cgroup_id).or_default() += c.ops;
        let cg = per_cgroup.entry((k.cgroup_id, k.dev)).or_default();
        cg.0.add(k.op(), *c);
    }
    for (k, c) in &delta.bios {
        let acc = per_proc
            .entry((k.tgid, k.dev, part(k.tgid, k.cgroup_id)))
            .or_default();
        acc.bio_counts.add(k.op(), *c);
        *acc.owners.entry(k.cgroup_id).or_default() += c.ops;
        let cg = per_cgroup.entry((k.cgroup_id, k.dev)).or_default();
        cg.1.add(k.op(), *c);
    }
    for (k, h) in &delta.latency {
        let acc = per_proc
            .entry((k.tgid, k.dev, part(k.tgid, k.cgroup_id)))
            .or_default();
        acc.hist.merge(h);
        acc.by_op[k.op() as usize].merge(h);
    }
    (per_proc, per_cgroup)
}

/// A row per process and device, and the devices' totals (the sum of their processes' rows).
fn process_rows(
    per_proc: PerProcess,
    names: &Names,
    kernel_comms: &HashMap<u32, String>,
    device: &dyn Fn(u32) -> Arc<DeviceInfo>,
) -> (Vec<ProcessRow>, Vec<DeviceRow>) {
    let seen = |tgid: u32| names.processes.get(&tgid).cloned().unwrap_or_default();
    let mut devices: BTreeMap<u32, (Arc<DeviceInfo>, OpCounts)> = BTreeMap::new();
    let mut processes = Vec::with_capacity(per_proc.len());
    for ((tgid, dev, _), acc) in per_proc {
        let info = device(dev);
        let (source, counts) = pick(&info, &acc.counts, &acc.bio_counts);
        devices
            .entry(dev)
            .or_insert_with(|| (info.clone(), OpCounts::default()))
            .1
            .merge(&counts);
        let mut row = process_row(
            tgid,
            &info,
            seen(tgid),
            kernel_comms,
            source,
            counts,
            &acc.bio_counts,
            &acc.hist,
        );
        row.latency = acc.by_op;
        row.io_cgroup = acc
            .owners
            .iter()
            .max_by_key(|(_, ops)| **ops)
            .and_then(|(id, _)| names.cgroups.get(id).cloned());
        processes.push(row);
    }
    let devices = devices
        .into_values()
        .map(|(info, counts)| DeviceRow {
            device: info.name.clone(),
            major: info.major,
            minor: info.minor,
            disk: info.disk.clone(),
            source: if info.request_based {
                CountSource::Request
            } else {
                CountSource::Bio
            },
            counts,
        })
        .collect();
    (processes, devices)
}

/// A row per cgroup and device with I/O, busiest first.
fn cgroup_rows(
    per_cgroup: PerCgroup,
    names: &Names,
    device: &dyn Fn(u32) -> Arc<DeviceInfo>,
) -> Vec<CgroupRow> {
    let mut cgroups = Vec::with_capacity(per_cgroup.len());
    for ((id, dev), (req, bio)) in per_cgroup {
        let info = device(dev);
        let (source, counts) = pick(&info, &req, &bio);
        if counts.total_ops() == 0 {
            continue;
        }
        cgroups.push(CgroupRow {
            cgroup: names.cgroups.get(&id).cloned().unwrap_or_else(|| {
                if id == 0 {
                    "(none)".into()
                } else {
                    format!("(id {id})")
                }
            }),
            cgroup_id: id,
            device: info.name.clone(),
            source,
            counts,
            read_bios: bio.read_ops,
            write_bios: bio.write_ops,
            discard_bios: bio.discard_ops,
        });
    }
    cgroups.sort_by_key(|c| std::cmp::Reverse(c.counts.total_ops()));
    cgroups
}

/// Kernel-side losses and map use of the interval (pure).
pub fn health_report(delta: &Delta, snap: &Snapshot) -> HealthReport {
    let mut health = HealthReport {
        events: BTreeMap::new(),
        read_errors: snap.read_errors,
        maps: snap.fill.iter().copied().collect(),
    };
    for h in Health::ALL {
        let v = delta.health[h as usize];
        if v != 0 {
            health.events.insert(h.name(), v);
        }
    }
    if snap.counted_after_prune != 0 {
        health
            .events
            .insert(COUNTED_AFTER_PRUNE, snap.counted_after_prune);
    }
    if snap.early_names_dropped != 0 {
        health
            .events
            .insert("early_names_dropped", snap.early_names_dropped);
    }
    health
}

#[allow(clippy::too_many_arguments)]
fn process_row(
    tgid: u32,
    info: &DeviceInfo,
    seen: Seen,
    kernel_comms: &HashMap<u32, String>,
    source: CountSource,
    counts: OpCounts,
    bios: &OpCounts,
    hist: &Histogram,
) -> ProcessRow {
    let Seen { ident, alive } = seen;
    let comm = match (&ident, tgid) {
        (_, 0) => "[kernel]".to_string(),
        (Some(p), _) => p.comm.clone(),
        (None, _) => kernel_comms
            .get(&tgid)
            .cloned()
            .unwrap_or_else(|| "?".into()),
    };
    ProcessRow {
        pid: tgid,
        start_time: ident.as_ref().map(|p| p.start_time),
        comm,
        vm: ident.as_ref().and_then(|p| p.vm.as_ref().map(VmRef::from)),
        cgroup: ident.as_ref().map(|p| p.cgroup.clone()).unwrap_or_default(),
        io_cgroup: None,
        device: info.name.clone(),
        major: info.major,
        minor: info.minor,
        source,
        counts,
        read_bios: bios.read_ops,
        write_bios: bios.write_ops,
        lat_avg_us: stats::mean_us(hist).map(round2),
        lat_p99_us: stats::quantile_us(hist, 0.99).map(round2),
        completions: hist.count(),
        exited: tgid != 0 && !alive,
        kernel_thread: tgid == 0 || ident.as_ref().is_some_and(|p| p.kernel_thread),
        kernel_submitted_ops: 0,
        latency: Box::default(),
        target: None,
    }
}

/// A device row's counts as the diskstats self-check compares them (ops and 512-byte sectors).
fn disk_counters(c: &OpCounts) -> DiskCounters {
    DiskCounters {
        reads: c.read_ops,
        read_sectors: c.read_bytes / 512,
        writes: c.write_ops,
        write_sectors: c.write_bytes / 512,
        discards: c.discard_ops,
        discard_sectors: c.discard_bytes / 512,
        flushes: c.flush_ops,
        in_flight: 0,
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// The VM whose process was last seen charging I/O to a cgroup.
#[derive(Clone, Debug)]
pub struct CgroupOwner {
    pub pid: u32,
    /// The owner's start time when it was learned: after the VM exits its PID may be reused,
    /// and the new process owns nothing of the old one's.
    pub start_time: Option<u64>,
    pub comm: String,
    pub vm: VmRef,
    pub cgroup: String,
}

/// Learns which VM owns which cgroup from this interval's VM rows (a cgroup holding two VMs
/// owns nobody), keeping earlier owners whose process is still alive. `started` gives the
/// start time of the process now at a PID (None: no process there): an owner is the same
/// process only with the same start time, so a reused PID inherits nothing.
pub fn learn_cgroup_owners(
    owners: &mut HashMap<String, Option<CgroupOwner>>,
    rows: &[ProcessRow],
    started: impl Fn(u32) -> Option<u64>,
) {
    let alive = |o: &CgroupOwner| {
        started(o.pid).is_some_and(|now| o.start_time.is_none_or(|then| then == now))
    };
    owners.retain(|_, o| o.as_ref().is_some_and(alive));
    for r in rows {
        // A process that exited owns nothing any more (its VM may be starting again in a new
        // cgroup); its last I/O still carries its name.
        if r.exited {
            continue;
        }
        let (Some(vm), Some(cg)) = (&r.vm, &r.io_cgroup) else {
            continue;
        };
        if cg == "/" {
            continue;
        }
        let new = CgroupOwner {
            pid: r.pid,
            start_time: r.start_time,
            comm: r.comm.clone(),
            vm: vm.clone(),
            cgroup: cg.clone(),
        };
        match owners.get(cg) {
            Some(Some(o)) if o.vm.name != vm.name && alive(o) => {
                owners.insert(cg.clone(), None);
            }
            Some(None) => {}
            _ => {
                owners.insert(cg.clone(), Some(new));
            }
        }
    }
}

/// Moves I/O that kernel threads submitted on behalf of a VM's cgroup into that VM's row.
///
/// The block layer charges such I/O to the VM's cgroup (cgroup writeback; bios that
/// blk-throttle queued and a kthrotld worker dispatched later), but the submitting context is
/// the kernel thread. Without this a throttled VM's I/O would show up under `kworker`. Only a
/// cgroup that holds exactly one VM is attributed this way.
pub fn fold_kernel_rows_into_vms(
    rows: Vec<ProcessRow>,
    owners: &HashMap<String, Option<CgroupOwner>>,
) -> Vec<ProcessRow> {
    let mut rows: Vec<Option<ProcessRow>> = rows.into_iter().map(Some).collect();
    for i in 0..rows.len() {
        let Some(r) = rows[i].as_ref() else {
            continue;
        };
        if !r.kernel_thread {
            continue;
        }
        let Some(Some(owner)) = r.io_cgroup.as_ref().and_then(|cg| owners.get(cg)) else {
            continue;
        };
        let (major, minor) = (r.major, r.minor);
        let target = rows.iter().position(|x| {
            x.as_ref().is_some_and(|x| {
                x.pid == owner.pid && x.major == major && x.minor == minor && x.vm.is_some()
            })
        });
        let k = rows[i].take().expect("present");
        let Some(j) = target else {
            // The VM submitted nothing itself on this device this interval: the row becomes
            // the VM's.
            rows[i] = Some(ProcessRow {
                pid: owner.pid,
                comm: owner.comm.clone(),
                vm: Some(owner.vm.clone()),
                kernel_thread: false,
                kernel_submitted_ops: k.counts.total_ops(),
                exited: false,
                ..k
            });
            continue;
        };
        let vm = rows[j].as_mut().expect("VM rows are never folded");
        vm.kernel_submitted_ops += k.counts.total_ops();
        absorb(vm, &k);
    }
    // A kernel thread's parts that no VM owns are one row again per device, charged to the
    // cgroup that owns most of it.
    let mut out: Vec<ProcessRow> = Vec::with_capacity(rows.len());
    for r in rows.into_iter().flatten() {
        let same = out.iter_mut().find(|x| {
            r.kernel_thread
                && x.kernel_thread
                && x.pid == r.pid
                && (x.major, x.minor) == (r.major, r.minor)
        });
        match same {
            Some(x) => {
                if r.counts.total_ops() > x.counts.total_ops() {
                    x.io_cgroup = r.io_cgroup.clone();
                }
                absorb(x, &r);
            }
            None => out.push(r),
        }
    }
    out
}

/// Adds `k`'s I/O (same device) to `into`.
fn absorb(into: &mut ProcessRow, k: &ProcessRow) {
    into.counts.merge(&k.counts);
    into.read_bios += k.read_bios;
    into.write_bios += k.write_bios;
    into.completions += k.completions;
    for (a, b) in into.latency.iter_mut().zip(k.latency.iter()) {
        a.merge(b);
    }
    let mut all = Histogram::default();
    for h in into.latency.iter() {
        all.merge(h);
    }
    into.lat_avg_us = stats::mean_us(&all).map(round2);
    into.lat_p99_us = stats::quantile_us(&all, 0.99).map(round2);
}

/// Request counts on blk-mq devices, bio counts on bio-based ones.
fn pick(info: &DeviceInfo, req: &OpCounts, bio: &OpCounts) -> (CountSource, OpCounts) {
    if info.request_based {
        (CountSource::Request, *req)
    } else {
        (CountSource::Bio, *bio)
    }
}

/// VMs first (by name), then other processes by total ops, busiest first.
fn row_order(a: &ProcessRow, b: &ProcessRow) -> std::cmp::Ordering {
    match (&a.vm, &b.vm) {
        (Some(x), Some(y)) => x.name.cmp(&y.name).then(a.device.cmp(&b.device)),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => b
            .counts
            .total_ops()
            .cmp(&a.counts.total_ops())
            .then(a.pid.cmp(&b.pid)),
    }
}

#[cfg(test)]
mod tests {
    use overkvm_common::IoKey;

    use super::*;

    fn key(tgid: u32, dev: u32, cgroup_id: u64, op: Op) -> IoKey {
        IoKey {
            tgid,
            dev,
            cgroup_id,
            op: op as u8,
            _pad: [0; 7],
        }
    }

    #[test]
    fn op_counts_keep_flush_and_discard_apart_from_reads() {
        let mut c = OpCounts::default();
        c.add(
            Op::Read,
            Counters {
                ops: 3,
                bytes: 12288,
            },
        );
        c.add(Op::Flush, Counters { ops: 2, bytes: 0 });
        c.add(
            Op::Discard,
            Counters {
                ops: 1,
                bytes: 1 << 20,
            },
        );
        c.add(
            Op::Write,
            Counters {
                ops: 4,
                bytes: 16384,
            },
        );
        assert_eq!(
            (c.read_ops, c.write_ops, c.flush_ops, c.discard_ops),
            (3, 4, 2, 1)
        );
        assert_eq!(c.read_bytes, 12288);
        assert_eq!(c.total_ops(), 10);
    }

    fn row(
        pid: u32,
        comm: &str,
        vm: Option<&str>,
        cg: &str,
        reads: u64,
        kernel: bool,
    ) -> ProcessRow {
        ProcessRow {
            pid,
            start_time: Some(1),
            comm: comm.into(),
            vm: vm.map(|n| VmRef {
                name: n.into(),
                uuid: None,
                manager: Manager::Qemu,
                namespace: None,
            }),
            cgroup: String::new(),
            io_cgroup: Some(cg.into()),
            device: "loop0".into(),
            major: 7,
            minor: 0,
            source: CountSource::Request,
            counts: OpCounts {
                read_ops: reads,
                read_bytes: reads * 4096,
                ..OpCounts::default()
            },
            read_bios: reads,
            write_bios: 0,
            lat_avg_us: None,
            lat_p99_us: None,
            completions: 0,
            exited: false,
            kernel_thread: kernel,
            kernel_submitted_ops: 0,
            latency: Box::default(),
            target: None,
        }
    }

    #[test]
    fn throttled_and_written_back_io_is_folded_into_the_owning_vm() {
        let rows = vec![
            row(100, "qemu", Some("a"), "/vm/a", 500, false),
            row(11, "kworker/0:1-kthrotld", None, "/vm/a", 300, true),
            row(12, "kworker/u8:2", None, "/", 50, true),
            row(200, "bash", None, "/vm/a2", 5, false),
        ];
        let mut owners = HashMap::new();
        learn_cgroup_owners(&mut owners, &rows, |_| Some(1));
        let out = fold_kernel_rows_into_vms(rows, &owners);
        assert_eq!(out.len(), 3);
        let a = out.iter().find(|r| r.pid == 100).unwrap();
        assert_eq!(a.counts.read_ops, 800);
        assert_eq!(a.kernel_submitted_ops, 300);
        assert!(
            out.iter().any(|r| r.pid == 12),
            "root-cgroup kernel I/O stays with the kernel"
        );

        // Next interval the VM itself did nothing: the kernel row becomes the VM's.
        let rows = vec![row(11, "kworker/0:1-kthrotld", None, "/vm/a", 70, true)];
        learn_cgroup_owners(&mut owners, &rows, |_| Some(1));
        let out = fold_kernel_rows_into_vms(rows, &owners);
        assert_eq!(out[0].vm.as_ref().unwrap().name, "a");
        assert_eq!((out[0].pid, out[0].kernel_submitted_ops), (100, 70));

        // Once the VM's process is gone, nothing is attributed to it any more.
        learn_cgroup_owners(&mut owners, &[], |_| None);
        let rows = vec![row(11, "kworker/0:1-kthrotld", None, "/vm/a", 7, true)];
        let out = fold_kernel_rows_into_vms(rows, &owners);
        assert!(out[0].vm.is_none());
    }

    #[test]
    fn a_flushers_parts_go_to_their_owners_and_the_rest_stays_one_row() {
        // One flusher wrote for VM a's cgroup, for the root (metadata) and for a cgroup no VM
        // owns, in one interval: only a's part joins a.
        let rows = vec![
            row(100, "qemu", Some("a"), "/vm/a", 10, false),
            row(12, "kworker/u8:2", None, "/vm/a", 200, true),
            row(12, "kworker/u8:2", None, "/", 9, true),
            row(12, "kworker/u8:2", None, "/other", 30, true),
        ];
        let mut owners = HashMap::new();
        learn_cgroup_owners(&mut owners, &rows, |_| Some(1));
        let out = fold_kernel_rows_into_vms(rows, &owners);
        assert_eq!(out.len(), 2, "{out:#?}");
        let a = out.iter().find(|r| r.pid == 100).unwrap();
        assert_eq!((a.counts.read_ops, a.kernel_submitted_ops), (210, 200));
        let k = out.iter().find(|r| r.pid == 12).unwrap();
        assert_eq!(
            k.counts.read_ops, 39,
            "root and unowned parts, merged again"
        );
        assert_eq!(
            k.io_cgroup.as_deref(),
            Some("/other"),
            "the larger part names it"
        );
    }

    #[test]
    fn a_reused_pid_inherits_no_cgroup() {
        // VM a (pid 100, started at tick 1) owned /vm/a; it exited and pid 100 now belongs to
        // a process started at tick 9: kernel I/O still charged to /vm/a is nobody's.
        let mut owners = HashMap::new();
        learn_cgroup_owners(
            &mut owners,
            &[row(100, "qemu", Some("a"), "/vm/a", 5, false)],
            |_| Some(1),
        );
        learn_cgroup_owners(&mut owners, &[], |_| Some(9));
        let rows = vec![row(11, "kworker/0:1-kthrotld", None, "/vm/a", 7, true)];
        let out = fold_kernel_rows_into_vms(rows, &owners);
        assert!(out[0].vm.is_none(), "{out:#?}");
    }

    #[test]
    fn a_cgroup_shared_by_two_vms_owns_nobody() {
        let rows = vec![
            row(1, "qemu", Some("a"), "/shared", 5, false),
            row(2, "qemu", Some("b"), "/shared", 5, false),
            row(11, "kworker", None, "/shared", 9, true),
        ];
        let mut owners = HashMap::new();
        learn_cgroup_owners(&mut owners, &rows, |_| Some(1));
        let out = fold_kernel_rows_into_vms(rows, &owners);
        assert_eq!(out.len(), 3);
    }

    #[test]
    fn rfc3339_format() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20.123Z");
    }

    // ---- The pure join and the builder over a fake host: no root, no kernel. ----

    use crate::identity::VmIdentity;
    use overkvm_common::make_dev;
    use std::sync::Mutex;

    const LOOP0: u32 = make_dev(7, 0);
    const LOOP0P1: u32 = make_dev(7, 1);
    const ZRAM: u32 = make_dev(252, 3);

    fn ident(pid: u32, start_time: u64, comm: &str, vm: Option<&str>) -> Arc<ProcessIdentity> {
        Arc::new(ProcessIdentity {
            pid,
            start_time,
            comm: comm.into(),
            cgroup: format!("/c/{comm}"),
            vm: vm.map(|n| VmIdentity {
                name: n.into(),
                uuid: Some(format!("uuid-{n}")),
                manager: Manager::Libvirt,
                vmid: None,
                display_name: None,
                namespace: None,
            }),
            kernel_thread: comm.starts_with("kworker"),
            complete: true,
        })
    }

    fn device(dev: u32, name: &str, disk: &str, request_based: bool) -> Arc<DeviceInfo> {
        Arc::new(DeviceInfo {
            dev,
            name: name.into(),
            major: overkvm_common::dev_major(dev),
            minor: overkvm_common::dev_minor(dev),
            disk: disk.into(),
            disk_dev: dev,
            request_based,
            present: true,
        })
    }

    /// What a test host knows; the test changes it between intervals.
    #[derive(Default)]
    struct World {
        live: HashMap<u32, Arc<ProcessIdentity>>,
        devices: HashMap<u32, Arc<DeviceInfo>>,
        cgroups: HashMap<u64, String>,
        diskstats: BTreeMap<String, DiskCounters>,
        /// Processes asked for, in order.
        asked: Vec<u32>,
        /// Processes whose cached identity was dropped, in order.
        forgotten: Vec<u32>,
    }

    #[derive(Clone, Default)]
    struct FakeHost(Arc<Mutex<World>>);

    impl FakeHost {
        fn world(&self) -> std::sync::MutexGuard<'_, World> {
            self.0.lock().unwrap()
        }

        fn builder(&self) -> ReportBuilder {
            ReportBuilder::with_host(HostLookups {
                processes: Box::new(self.clone()),
                devices: Box::new(self.clone()),
                cgroups: Box::new(self.clone()),
                diskstats: Box::new(self.clone()),
            })
        }
    }

    impl Processes for FakeHost {
        fn identity(&mut self, pid: u32) -> Option<Arc<ProcessIdentity>> {
            let mut w = self.world();
            w.asked.push(pid);
            w.live.get(&pid).cloned()
        }
        fn alive(&self, pid: u32) -> bool {
            self.world().live.contains_key(&pid)
        }
        fn start_time(&self, pid: u32) -> Option<u64> {
            self.world().live.get(&pid).map(|p| p.start_time)
        }
        fn forget_exited(&mut self) {}
        fn forget(&mut self, pid: u32) {
            self.world().forgotten.push(pid);
        }
    }

    impl Devices for FakeHost {
        fn device(&mut self, dev: u32) -> Arc<DeviceInfo> {
            let known = self.world().devices.get(&dev).cloned();
            known.unwrap_or_else(|| Arc::new(DeviceInfo::unknown(dev)))
        }
    }

    impl CgroupPaths for FakeHost {
        fn cgroup_path(&mut self, id: u64) -> Option<String> {
            self.world().cgroups.get(&id).cloned()
        }
    }

    impl DiskStats for FakeHost {
        fn diskstats(&self) -> BTreeMap<String, DiskCounters> {
            self.world().diskstats.clone()
        }
    }

    /// An interval's counts: (tgid, dev, cgroup id, op, ops) of requests and of bios.
    fn interval(requests: &[(u32, u32, u64, Op, u64)], bios: &[(u32, u32, u64, Op, u64)]) -> Delta {
        let counts = |rows: &[(u32, u32, u64, Op, u64)]| {
            let mut m: HashMap<IoKey, Counters> = HashMap::new();
            for &(tgid, dev, cg, op, ops) in rows {
                let c = m.entry(key(tgid, dev, cg, op)).or_default();
                c.ops += ops;
                c.bytes += ops * 4096;
            }
            m
        };
        Delta {
            interval: std::time::Duration::from_secs(1),
            wall: Some(SystemTime::UNIX_EPOCH),
            requests: counts(requests),
            bios: counts(bios),
            latency: HashMap::new(),
            health: [0; overkvm_common::HEALTH_SLOTS as usize],
        }
    }

    fn alive(ident: &Arc<ProcessIdentity>) -> Seen {
        Seen {
            ident: Some(Arc::clone(ident)),
            alive: true,
        }
    }

    #[test]
    fn join_picks_requests_on_blk_mq_and_bios_on_bio_based_devices() {
        let qemu = ident(100, 1, "qemu-system-x86", Some("a"));
        let names = Names {
            processes: HashMap::from([(100, alive(&qemu))]),
            devices: HashMap::from([
                (LOOP0, device(LOOP0, "loop0", "loop0", true)),
                (ZRAM, device(ZRAM, "zram3", "zram3", false)),
            ]),
            cgroups: HashMap::from([(9, "/machine/a".to_string())]),
        };
        let d = interval(
            &[(100, LOOP0, 9, Op::Read, 10)],
            &[(100, LOOP0, 9, Op::Read, 12), (100, ZRAM, 9, Op::Write, 7)],
        );
        let rows = join(&d, &names, &HashMap::new());
        assert_eq!(rows.processes.len(), 2);
        let on = |dev: &str| rows.processes.iter().find(|r| r.device == dev).unwrap();
        let l = on("loop0");
        assert_eq!(
            (l.source, l.counts.read_ops, l.read_bios),
            (CountSource::Request, 10, 12)
        );
        let z = on("zram3");
        assert_eq!(
            (z.source, z.counts.write_ops, z.write_bios),
            (CountSource::Bio, 7, 7)
        );
        assert_eq!(l.vm.as_ref().unwrap().name, "a");
        assert_eq!(l.cgroup, "/c/qemu-system-x86");
        assert_eq!(l.io_cgroup.as_deref(), Some("/machine/a"));
        assert!(!l.exited && !l.kernel_thread);
        let devs: Vec<_> = rows
            .devices
            .iter()
            .map(|d| (d.device.as_str(), d.source))
            .collect();
        assert_eq!(
            devs,
            [("loop0", CountSource::Request), ("zram3", CountSource::Bio)]
        );
        assert_eq!(rows.cgroups.len(), 2);
        assert!(rows.cgroups.iter().all(|c| c.cgroup == "/machine/a"));
    }

    #[test]
    fn join_names_unknown_devices_and_cgroups_without_guessing() {
        let gone_dev = make_dev(7, 99);
        let names = Names::default();
        let d = interval(
            &[
                (0, gone_dev, 0, Op::Write, 3),
                (0, gone_dev, 77, Op::Write, 5),
            ],
            &[],
        );
        let rows = join(&d, &names, &HashMap::new());
        assert_eq!(rows.devices.len(), 1);
        assert_eq!(rows.devices[0].device, "7:99");
        assert_eq!((rows.devices[0].major, rows.devices[0].minor), (7, 99));
        assert_eq!(rows.devices[0].counts.write_ops, 8);
        let cgs: Vec<_> = rows.cgroups.iter().map(|c| c.cgroup.as_str()).collect();
        assert_eq!(cgs, ["(id 77)", "(none)"], "busiest first");
        // tgid 0 is the kernel itself: never exited, always a kernel row.
        let k = &rows.processes[0];
        assert_eq!(
            (k.comm.as_str(), k.exited, k.kernel_thread),
            ("[kernel]", false, true)
        );
        assert_eq!(k.io_cgroup, None, "an unknown cgroup id has no path");
    }

    #[test]
    fn join_reports_exited_processes_with_their_last_identity_or_the_kernels_comm() {
        let last = ident(100, 1, "qemu-system-x86", Some("a"));
        let names = Names {
            processes: HashMap::from([
                (
                    100,
                    Seen {
                        ident: Some(last),
                        alive: false,
                    },
                ),
                (200, Seen::default()),
                (300, Seen::default()),
            ]),
            ..Names::default()
        };
        let d = interval(
            &[
                (100, LOOP0, 0, Op::Read, 1),
                (200, LOOP0, 0, Op::Read, 1),
                (300, LOOP0, 0, Op::Read, 1),
            ],
            &[],
        );
        let comms = HashMap::from([(200, "fio".to_string())]);
        let rows = join(&d, &names, &comms);
        let by = |pid| rows.processes.iter().find(|r| r.pid == pid).unwrap();
        assert!(by(100).exited);
        assert_eq!(
            by(100).vm.as_ref().unwrap().name,
            "a",
            "its exit interval keeps its name"
        );
        assert_eq!((by(200).comm.as_str(), by(200).exited), ("fio", true));
        assert_eq!(by(200).vm, None);
        assert_eq!(by(300).comm, "?");
    }

    #[test]
    fn join_keeps_a_hostile_comm_as_data() {
        let comm = "x\n\"},{\"pid\":1\u{1b}[2J\\";
        let p = ident(42, 1, comm, None);
        let names = Names {
            processes: HashMap::from([(42, alive(&p))]),
            ..Names::default()
        };
        let rows = join(
            &interval(&[(42, LOOP0, 0, Op::Read, 1)], &[]),
            &names,
            &HashMap::new(),
        );
        assert_eq!(rows.processes[0].comm, comm);
        // JSON escapes it: one row, the comm intact.
        let json = serde_json::to_string(&rows.processes).unwrap();
        let back: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(back.as_array().unwrap().len(), 1);
        assert_eq!(back[0]["comm"], comm);
        assert!(!json.contains('\n') && !json.contains('\u{1b}'));
    }

    #[test]
    fn join_splits_a_kernel_threads_io_by_cgroup() {
        let kw = ident(11, 1, "kworker/u8:2", None);
        let names = Names {
            processes: HashMap::from([(11, alive(&kw))]),
            cgroups: HashMap::from([(5, "/vm/a".to_string()), (6, "/".to_string())]),
            ..Names::default()
        };
        let d = interval(
            &[(11, LOOP0, 5, Op::Write, 4), (11, LOOP0, 6, Op::Write, 1)],
            &[],
        );
        let rows = join(&d, &names, &HashMap::new());
        let mut parts: Vec<_> = rows
            .processes
            .iter()
            .map(|r| (r.io_cgroup.clone().unwrap(), r.counts.write_ops))
            .collect();
        parts.sort();
        assert_eq!(parts, [("/".to_string(), 1), ("/vm/a".to_string(), 4)]);
        assert_eq!(
            rows.devices[0].counts.write_ops, 5,
            "the device counts both"
        );
    }

    #[test]
    fn builder_names_a_vm_in_the_interval_it_exits_then_forgets_it() {
        let host = FakeHost::default();
        let qemu = ident(100, 1, "qemu-system-x86", Some("a"));
        host.world().live.insert(100, Arc::clone(&qemu));
        let mut b = host.builder();
        let snap = Snapshot::empty();
        let d = interval(&[(100, LOOP0, 0, Op::Read, 3)], &[]);
        let r = b.build(&d, "test", &snap);
        assert!(!r.processes[0].exited);
        assert_eq!(r.vm_count(), 1);

        // Gone: its final I/O (harvested after the exit) still carries its name ...
        host.world().live.clear();
        let r = b.build(&d, "test", &snap);
        assert!(r.processes[0].exited);
        assert_eq!(r.processes[0].vm.as_ref().unwrap().name, "a");
        // ... for the grace intervals, and no longer after.
        for _ in 0..RECENT_GRACE {
            b.build(&d, "test", &snap);
        }
        let r = b.build(&d, "test", &snap);
        assert_eq!(
            (r.processes[0].vm.as_ref(), r.processes[0].comm.as_str()),
            (None, "?")
        );
    }

    #[test]
    fn builder_gives_a_reused_pid_the_new_process_identity() {
        let host = FakeHost::default();
        host.world()
            .live
            .insert(100, ident(100, 1, "qemu-system-x86", Some("a")));
        let mut b = host.builder();
        let snap = Snapshot::empty();
        let d = interval(&[(100, LOOP0, 0, Op::Read, 3)], &[]);
        b.build(&d, "test", &snap);
        // Same PID, another process (the resolver re-validates by start time).
        host.world().live.insert(100, ident(100, 2, "bash", None));
        let r = b.build(&d, "test", &snap);
        let row = &r.processes[0];
        assert_eq!(
            (row.comm.as_str(), row.vm.as_ref(), row.exited),
            ("bash", None, false)
        );
    }

    #[test]
    fn builder_asks_the_host_about_each_process_once_per_interval() {
        let host = FakeHost::default();
        host.world().live.insert(7, ident(7, 1, "fio", None));
        let mut b = host.builder();
        let d = interval(
            &[
                (7, LOOP0, 0, Op::Read, 1),
                (7, LOOP0P1, 0, Op::Write, 1),
                (0, LOOP0, 0, Op::Flush, 1),
            ],
            &[(7, LOOP0, 0, Op::Read, 1)],
        );
        b.build(&d, "test", &Snapshot::empty());
        assert_eq!(host.world().asked, [7], "tgid 0 is never looked up");
    }

    #[test]
    fn an_exec_drops_the_cached_identity_before_the_interval_is_named() {
        let host = FakeHost::default();
        host.world()
            .live
            .insert(7, ident(7, 1, "qemu-system-x86", Some("vm7")));
        let mut b = host.builder();
        let d = interval(&[(7, LOOP0, 0, Op::Read, 1)], &[]);
        let mut snap = Snapshot::empty();
        snap.execed.insert(7);
        b.build(&d, "test", &snap);
        let w = host.world();
        assert_eq!(
            (w.forgotten.as_slice(), w.asked.as_slice()),
            (&[7][..], &[7][..])
        );
    }

    #[test]
    fn builder_feeds_the_self_check_with_whole_disks() {
        let host = FakeHost::default();
        {
            let mut w = host.world();
            w.devices
                .insert(LOOP0, device(LOOP0, "loop0", "loop0", true));
            w.devices
                .insert(LOOP0P1, device(LOOP0P1, "loop0p1", "loop0", true));
            w.diskstats.insert(
                "loop0".into(),
                DiskCounters {
                    reads: 100,
                    read_sectors: 800,
                    ..DiskCounters::default()
                },
            );
        }
        let mut b = host.builder();
        let snap = Snapshot::empty();
        // The first read only takes diskstats' base.
        let r = b.build(&interval(&[], &[]), "test", &snap);
        assert!(r.parity.is_empty());
        host.world().diskstats.insert(
            "loop0".into(),
            DiskCounters {
                reads: 105,
                read_sectors: 840,
                ..DiskCounters::default()
            },
        );
        let d = interval(
            &[(0, LOOP0, 0, Op::Read, 2), (0, LOOP0P1, 0, Op::Read, 3)],
            &[],
        );
        let r = b.build(&d, "test", &snap);
        assert_eq!(r.parity.len(), 1);
        let p = &r.parity[0];
        assert_eq!(p.device, "loop0");
        assert_eq!(
            (p.overkvm.reads, p.overkvm.read_sectors),
            (5, 40),
            "a partition counts for its disk"
        );
        assert_eq!((p.diskstats.reads, p.diskstats.read_sectors), (5, 40));
        assert!(p.difference.is_zero() && !p.settled);
    }

    #[test]
    fn report_json_has_the_documented_fields() {
        let host = FakeHost::default();
        host.world()
            .live
            .insert(100, ident(100, 1, "qemu-system-x86", Some("a")));
        let mut b = host.builder();
        let r = b.build(
            &interval(&[(100, LOOP0, 0, Op::Read, 1)], &[]),
            "test",
            &Snapshot::empty(),
        );
        let v = serde_json::to_value(&r).unwrap();
        let keys = |v: &serde_json::Value| -> Vec<String> {
            let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        assert_eq!(
            keys(&v),
            [
                "cgroups",
                "devices",
                "health",
                "interval_s",
                "mode",
                "parity",
                "processes",
                "timestamp"
            ]
        );
        assert_eq!(
            keys(&v["processes"][0]),
            [
                "cgroup",
                "comm",
                "completions",
                "device",
                "discard_bytes",
                "discard_ops",
                "exited",
                "flush_ops",
                "io_cgroup",
                "kernel_submitted_ops",
                "kernel_thread",
                "lat_avg_us",
                "lat_p99_us",
                "major",
                "minor",
                "other_ops",
                "pid",
                "read_bios",
                "read_bytes",
                "read_ops",
                "source",
                "vm",
                "write_bios",
                "write_bytes",
                "write_ops",
            ]
        );
        assert_eq!(v["timestamp"], "1970-01-01T00:00:00.000Z");
    }
}
