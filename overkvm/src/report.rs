//! One interval's view of who did I/O: rows per process and device, per device, per cgroup.
//!
//! `Report` is what `top -b --json` prints, what the interactive view renders, and what later
//! consumers read. Building it is the only place deltas meet identities.

use std::{collections::BTreeMap, collections::HashMap, sync::Arc, time::SystemTime};

use overkvm_common::{Health, IoKey, OP_COUNT, Op};
use serde::Serialize;

use crate::{
    cgroupfs::CgroupNames,
    devices::{DeviceInfo, DeviceTable},
    identity::{Manager, ProcessIdentity, Resolver},
    parity::{DeviceParity, ParityCheck},
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
}

impl ProcessRow {
    pub fn is_vm(&self) -> bool {
        self.vm.is_some()
    }
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
    crate::host::proc::alive(pid)
}

/// Formats a wall-clock time as RFC 3339 UTC with milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Turns deltas into reports, resolving processes, devices and cgroups (all cached).
pub struct ReportBuilder {
    pub resolver: Resolver,
    pub devices: DeviceTable,
    pub cgroups: CgroupNames,
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
    pub fn new() -> ReportBuilder {
        ReportBuilder {
            resolver: Resolver::new(),
            devices: DeviceTable::new(),
            cgroups: CgroupNames::for_host(),
            kernel_comms: HashMap::new(),
            cgroup_owners: HashMap::new(),
            recent: HashMap::new(),
            parity: ParityCheck::new(),
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
        struct Acc {
            /// Ops per owning cgroup id, to name the main one.
            owners: BTreeMap<u64, u64>,
            counts: OpCounts,
            bio_counts: OpCounts,
            hist: Histogram,
            by_op: Box<[Histogram; OP_COUNT]>,
        }
        // (tgid, dev, cgroup part) -> accumulators; the request/bio choice is made per device
        // below. A kernel thread's I/O is kept apart per owning cgroup (the part), so that
        // each part can go to the VM owning that cgroup; user processes have one part.
        let mut per_proc: BTreeMap<(u32, u32, Option<u64>), Acc> = BTreeMap::new();
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
        // Each tgid resolved once per interval (a resolve re-reads /proc/PID/stat): the live
        // process's identity, else the last one it had (it exited in this interval).
        let mut idents: HashMap<u32, (Option<Arc<ProcessIdentity>>, bool)> = HashMap::new();
        let resolver = &mut self.resolver;
        let recent = &mut self.recent;
        let mut part = |tgid: u32, cgroup_id: u64| {
            let (ident, _) = idents.entry(tgid).or_insert_with(|| {
                if tgid == 0 {
                    return (None, true);
                }
                match resolver.resolve(tgid) {
                    Some(p) => {
                        recent.insert(
                            tgid,
                            Recent {
                                ident: Arc::clone(&p),
                                gone_for: 0,
                            },
                        );
                        (Some(p), true)
                    }
                    None => (recent.get(&tgid).map(|r| Arc::clone(&r.ident)), false),
                }
            });
            ident
                .as_ref()
                .is_some_and(|p| p.kernel_thread)
                .then_some(cgroup_id)
        };
        let mut per_cgroup: BTreeMap<(u64, u32), (OpCounts, OpCounts)> = BTreeMap::new();
        let new_acc = || Acc {
            owners: BTreeMap::new(),
            counts: OpCounts::default(),
            bio_counts: OpCounts::default(),
            hist: Histogram::default(),
            by_op: Box::default(),
        };
        for (k, c) in &delta.requests {
            let key = (k.tgid, k.dev, part(k.tgid, k.cgroup_id));
            let acc = per_proc.entry(key).or_insert_with(new_acc);
            acc.counts.add(k.op(), *c);
            *acc.owners.entry(k.cgroup_id).or_default() += c.ops;
            per_cgroup
                .entry((k.cgroup_id, k.dev))
                .or_default()
                .0
                .add(k.op(), *c);
        }
        for (k, c) in &delta.bios {
            let key = (k.tgid, k.dev, part(k.tgid, k.cgroup_id));
            let acc = per_proc.entry(key).or_insert_with(new_acc);
            acc.bio_counts.add(k.op(), *c);
            *acc.owners.entry(k.cgroup_id).or_default() += c.ops;
            per_cgroup
                .entry((k.cgroup_id, k.dev))
                .or_default()
                .1
                .add(k.op(), *c);
        }
        for (k, h) in &delta.latency {
            let key = (k.tgid, k.dev, part(k.tgid, k.cgroup_id));
            let acc = per_proc.entry(key).or_insert_with(new_acc);
            acc.hist.merge(h);
            acc.by_op[k.op() as usize].merge(h);
        }

        let mut devices: BTreeMap<u32, (Arc<DeviceInfo>, OpCounts)> = BTreeMap::new();
        let mut processes = Vec::with_capacity(per_proc.len());
        for ((tgid, dev, _), acc) in per_proc {
            let info = self.devices.get(dev);
            let (source, counts) = pick(&info, &acc.counts, &acc.bio_counts);
            devices
                .entry(dev)
                .or_insert_with(|| (info.clone(), OpCounts::default()))
                .1
                .merge(&counts);
            let (ident, alive) = idents.get(&tgid).cloned().unwrap_or((None, false));
            let mut row = self.process_row(
                tgid,
                &info,
                ident,
                alive,
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
                .and_then(|(id, _)| self.cgroups.path(*id));
            processes.push(row);
        }
        learn_cgroup_owners(&mut self.cgroup_owners, &processes, pid_alive);
        let mut processes = fold_kernel_rows_into_vms(processes, &self.cgroup_owners);
        processes.sort_by(row_order);

        let mut cgroups = Vec::with_capacity(per_cgroup.len());
        for ((id, dev), (req, bio)) in per_cgroup {
            let info = self.devices.get(dev);
            let (source, counts) = pick(&info, &req, &bio);
            if counts.total_ops() == 0 {
                continue;
            }
            cgroups.push(CgroupRow {
                cgroup: self.cgroups.path(id).unwrap_or_else(|| {
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

        let devices: Vec<DeviceRow> = devices
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

        // Read right after the maps, so both sides end at (nearly) the same instant.
        let parity = self.parity.update(
            devices
                .iter()
                .map(|d| (d.disk.as_str(), disk_counters(&d.counts))),
            &crate::parity::read_diskstats(),
        );
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
        if snap.early_names_dropped != 0 {
            health
                .events
                .insert("early_names_dropped", snap.early_names_dropped);
        }
        self.resolver.retain(pid_alive);
        self.kernel_comms.retain(|pid, _| pid_alive(*pid));
        self.recent.retain(|pid, r| {
            if pid_alive(*pid) {
                r.gone_for = 0;
            } else {
                r.gone_for += 1;
            }
            r.gone_for <= RECENT_GRACE
        });
        Report {
            timestamp: rfc3339(delta.wall.unwrap_or_else(SystemTime::now)),
            interval_s: delta.interval.as_secs_f64(),
            mode: mode.to_string(),
            devices,
            processes,
            cgroups,
            health,
            parity,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn process_row(
        &self,
        tgid: u32,
        info: &DeviceInfo,
        ident: Option<Arc<ProcessIdentity>>,
        alive: bool,
        source: CountSource,
        counts: OpCounts,
        bios: &OpCounts,
        hist: &Histogram,
    ) -> ProcessRow {
        let comm = match (&ident, tgid) {
            (_, 0) => "[kernel]".to_string(),
            (Some(p), _) => p.comm.clone(),
            (None, _) => self
                .kernel_comms
                .get(&tgid)
                .cloned()
                .unwrap_or_else(|| "?".into()),
        };
        ProcessRow {
            pid: tgid,
            comm,
            vm: ident.as_ref().and_then(|p| {
                p.vm.as_ref().map(|v| VmRef {
                    name: v.name.clone(),
                    uuid: v.uuid.clone(),
                    manager: v.manager,
                    namespace: v.namespace.clone(),
                })
            }),
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
        }
    }
}

/// A device row's counts as the diskstats self-check compares them (ops and 512-byte sectors).
fn disk_counters(c: &OpCounts) -> crate::parity::DiskCounters {
    crate::parity::DiskCounters {
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
    pub comm: String,
    pub vm: VmRef,
    pub cgroup: String,
}

/// Learns which VM owns which cgroup from this interval's VM rows (a cgroup holding two VMs
/// owns nobody), keeping earlier owners whose process is still alive.
pub fn learn_cgroup_owners(
    owners: &mut HashMap<String, Option<CgroupOwner>>,
    rows: &[ProcessRow],
    alive: impl Fn(u32) -> bool,
) {
    owners.retain(|_, o| o.as_ref().is_some_and(|o| alive(o.pid)));
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
            comm: r.comm.clone(),
            vm: vm.clone(),
            cgroup: cg.clone(),
        };
        match owners.get(cg) {
            Some(Some(o)) if o.vm.name != vm.name && alive(o.pid) => {
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

/// Key helper for tests and consumers.
pub fn key(tgid: u32, dev: u32, cgroup_id: u64, op: Op) -> IoKey {
    IoKey {
        tgid,
        dev,
        cgroup_id,
        op: op as u8,
        _pad: [0; 7],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        learn_cgroup_owners(&mut owners, &rows, |_| true);
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
        learn_cgroup_owners(&mut owners, &rows, |_| true);
        let out = fold_kernel_rows_into_vms(rows, &owners);
        assert_eq!(out[0].vm.as_ref().unwrap().name, "a");
        assert_eq!((out[0].pid, out[0].kernel_submitted_ops), (100, 70));

        // Once the VM's process is gone, nothing is attributed to it any more.
        learn_cgroup_owners(&mut owners, &[], |_| false);
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
        learn_cgroup_owners(&mut owners, &rows, |_| true);
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
    fn a_cgroup_shared_by_two_vms_owns_nobody() {
        let rows = vec![
            row(1, "qemu", Some("a"), "/shared", 5, false),
            row(2, "qemu", Some("b"), "/shared", 5, false),
            row(11, "kworker", None, "/shared", 9, true),
        ];
        let mut owners = HashMap::new();
        learn_cgroup_owners(&mut owners, &rows, |_| true);
        let out = fold_kernel_rows_into_vms(rows, &owners);
        assert_eq!(out.len(), 3);
    }

    #[test]
    fn rfc3339_format() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20.123Z");
    }
}
