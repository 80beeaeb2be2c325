//! Exact cumulative counters, folded from the per-interval counts of each tick.
//!
//! Pure: ticks (and a view of which processes are alive) in, totals out. VM counters are keyed
//! by VM identity (name and UUID), never by PID, so
//! - a VM that exits keeps its final I/O: the daemon harvests the last delta of an exited
//!   process before deleting its map entries, but by then /proc is gone and the report row has
//!   no VM (`exited: true`, `vm: None`). The PIDs seen as VMs are remembered and such rows are
//!   added to the VM the PID last belonged to;
//! - a VM's series stay for `grace` after the last tick it was seen alive, then disappear;
//! - a new VM reusing a PID starts from its own counts: the PID map follows the report, which
//!   re-validates identity by process start time, and a PID whose start time changed is
//!   dropped from the map.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::{Duration, Instant},
};

use overkvm_common::{HEALTH_SLOTS, LAT_BUCKETS, OP_COUNT, Op};

use crate::{
    host::proc,
    identity::Manager,
    report::{OpCounts, ProcessRow, VmRef},
    sample::{Counters, Histogram, MapFill},
    tick::{ProgramStat, ThrottleView, Tick},
};

/// Who a VM is to the exporter: its name and UUID.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VmKey {
    pub name: String,
    pub uuid: Option<String>,
}

impl VmKey {
    fn of(vm: &VmRef) -> VmKey {
        VmKey {
            name: vm.name.clone(),
            uuid: vm.uuid.clone(),
        }
    }
}

/// Cumulative operations and bytes by op (indexed by `Op as usize`), in the sampler's shape.
pub type OpTotals = [Counters; OP_COUNT];

fn add_counts(into: &mut OpTotals, c: &OpCounts) {
    for op in Op::ALL {
        let (ops, bytes) = match op {
            Op::Read => (c.read_ops, c.read_bytes),
            Op::Write => (c.write_ops, c.write_bytes),
            Op::Discard => (c.discard_ops, c.discard_bytes),
            Op::Flush => (c.flush_ops, 0),
            Op::Other => (c.other_ops, 0),
        };
        let t = &mut into[op as usize];
        t.ops += ops;
        t.bytes += bytes;
    }
}

/// A cumulative latency histogram in the kernel's log2 buckets, with the exact sum.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LatencyTotals {
    pub buckets: [u64; LAT_BUCKETS as usize],
    pub sum_ns: u128,
}

impl Default for LatencyTotals {
    fn default() -> Self {
        LatencyTotals {
            buckets: [0; LAT_BUCKETS as usize],
            sum_ns: 0,
        }
    }
}

impl LatencyTotals {
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    fn add(&mut self, h: &Histogram) {
        for (t, c) in self.buckets.iter_mut().zip(h.counts.iter()) {
            *t += c;
        }
        self.sum_ns += u128::from(h.sum_ns());
    }
}

/// The key of a VM's series on one device: the device's name and whether QEMU counted it.
/// A disk QEMU counts is named as the VM's configuration names it, and a libvirt target
/// (`vda`) can be spelt like a host device: with the source in the key their counts can never
/// be summed into one series, and their labels differ by `source="qemu"`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceKey {
    pub name: String,
    /// Counted from QEMU's own counters (`CountSource::Qemu`), not at the host's block layer.
    pub qemu: bool,
}

impl DeviceKey {
    /// The key of a report row's device.
    pub fn of(row: &ProcessRow) -> DeviceKey {
        DeviceKey {
            name: row.device.clone(),
            qemu: row.source == crate::report::CountSource::Qemu,
        }
    }

    /// A host block device counted by eBPF.
    pub fn host(name: &str) -> DeviceKey {
        DeviceKey {
            name: name.to_string(),
            qemu: false,
        }
    }
}

/// One VM's counters on one device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmDevice {
    pub io: OpTotals,
    pub latency: [LatencyTotals; OP_COUNT],
    /// Set for a disk QEMU counts (`source: "qemu"`): its storage target.
    pub qemu_target: Option<String>,
}

impl VmDevice {
    fn add(&mut self, row: &ProcessRow) {
        if row.source == crate::report::CountSource::Qemu {
            self.qemu_target = row.target.clone();
        }
        add_counts(&mut self.io, &row.counts);
        for (t, h) in self.latency.iter_mut().zip(row.latency.iter()) {
            t.add(h);
        }
    }
}

/// Everything exported about one VM.
#[derive(Clone, Debug)]
pub struct VmSeries {
    /// The `vm` label: the name, or `name/uuid` when another VM already had the name.
    pub label: String,
    pub uuid: Option<String>,
    pub manager: Manager,
    /// The qemu process last seen for the VM.
    pub pid: u32,
    pub cgroup: String,
    pub devices: BTreeMap<DeviceKey, VmDevice>,
    last_alive: Instant,
    /// Operations per tick, exponentially decayed (half-life `ACTIVITY_HALF_LIFE_TICKS`):
    /// what the cap on exported VMs ranks by.
    activity: f64,
    /// Among the VMs `/metrics` shows (see [`select_exported`]).
    exported: bool,
}

/// Ticks over which a VM's activity halves: a minute at the default 1 s interval, so a burst
/// counts for a while, and a VM that turns clearly busier than the quietest exported one
/// takes its slot within a few ticks.
const ACTIVITY_HALF_LIFE_TICKS: f64 = 60.0;

/// How much busier than an exported VM a left-out one must be to take its slot, so that VMs
/// of nearly equal activity at the edge do not swap in and out (each swap ends one VM's
/// series and starts another's).
const KEEP_EXPORTED_BONUS: f64 = 1.25;

/// Marks the VMs `/metrics` shows: all of them up to `cap`, else the `cap` busiest by decayed
/// activity (an exported VM's counted `KEEP_EXPORTED_BONUS` times), ties broken by label, so
/// that the same ticks always give the same choice. Returns how many are left out.
pub fn select_exported<'a>(vms: impl Iterator<Item = &'a mut VmSeries>, cap: usize) -> usize {
    let mut all: Vec<&mut VmSeries> = vms.collect();
    if all.len() > cap {
        let rank = |v: &VmSeries| v.activity * if v.exported { KEEP_EXPORTED_BONUS } else { 1.0 };
        all.sort_by(|a, b| {
            rank(b)
                .total_cmp(&rank(a))
                .then_with(|| a.label.cmp(&b.label))
        });
    }
    let dropped = all.len().saturating_sub(cap);
    for (i, vm) in all.into_iter().enumerate() {
        vm.exported = i < cap;
    }
    dropped
}

/// Non-VM processes of one name.
#[derive(Clone, Debug)]
pub struct ProcessSeries {
    pub devices: BTreeMap<String, OpTotals>,
    last_io: Instant,
}

/// A PID seen as a VM's qemu process.
#[derive(Clone, Debug)]
struct PidEntry {
    vm: VmKey,
    /// Start time when first seen (clock ticks since boot), to notice PID reuse.
    start_time: Option<u64>,
    /// The tick at which the process was first found gone. It is kept one more tick: a
    /// process that did I/O after the snapshot and then died has that I/O in the next delta.
    gone_at: Option<u64>,
}

/// Which processes exist, by PID and start time.
pub trait ProcessTable {
    /// The start time of the process with this PID, or None when there is none.
    fn start_time(&self, pid: u32) -> Option<u64>;
}

/// The host's /proc.
pub struct ProcFs;

impl ProcessTable for ProcFs {
    fn start_time(&self, pid: u32) -> Option<u64> {
        proc::start_time(pid)
    }
}

/// How much the exporter keeps.
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    pub per_process: bool,
    pub per_process_cap: usize,
    pub grace: Duration,
    /// Most VMs exported; the least busy beyond it are left out (and counted).
    pub max_vms: usize,
}

/// The latest values of the daemon's own gauges and cumulative counters.
#[derive(Clone, Debug, Default)]
pub struct SelfStats {
    pub ticks: u64,
    pub mode: String,
    pub programs: Vec<ProgramStat>,
    pub maps: Vec<(&'static str, MapFill)>,
    pub health_total: [u64; HEALTH_SLOTS as usize],
    pub read_errors: u64,
    /// Rows of a process inside exec released unnamed (`report::held`).
    pub exec_naming_expired: u64,
    pub counted_after_prune: u64,
    pub sample_seconds: f64,
    pub render_seconds: f64,
    pub throttle: Option<ThrottleView>,
    /// The last tick's self-check against /proc/diskstats.
    pub parity: Vec<crate::parity::DeviceParity>,
}

/// All exported state.
#[derive(Debug)]
pub struct Totals {
    retention: Retention,
    vms: HashMap<VmKey, VmSeries>,
    pids: HashMap<u32, PidEntry>,
    pub devices: BTreeMap<String, OpTotals>,
    pub processes: BTreeMap<String, ProcessSeries>,
    pub process_dropped_ops: u64,
    /// VMs known but left out of `/metrics` by the cap, as of the last tick.
    pub vms_dropped: usize,
    pub stats: SelfStats,
}

impl Totals {
    pub fn new(retention: Retention) -> Totals {
        Totals {
            retention,
            vms: HashMap::new(),
            pids: HashMap::new(),
            devices: BTreeMap::new(),
            processes: BTreeMap::new(),
            process_dropped_ops: 0,
            vms_dropped: 0,
            stats: SelfStats::default(),
        }
    }

    /// Whether non-VM processes are exported.
    pub fn per_process(&self) -> bool {
        self.retention.per_process
    }

    /// The exported VMs (at most the cap), ordered by label.
    pub fn vms(&self) -> Vec<&VmSeries> {
        let mut v: Vec<&VmSeries> = self.vms.values().filter(|s| s.exported).collect();
        v.sort_by(|a, b| a.label.cmp(&b.label));
        v
    }

    /// Folds one tick in. `procs` says which of the PIDs seen as VMs still run.
    pub fn apply(&mut self, tick: &Tick, procs: &impl ProcessTable) {
        let now = tick.at;
        let report = &tick.report;
        self.stats.ticks += 1;
        let tick_no = self.stats.ticks;
        // Before this tick's rows, so that names gone quiet free their slots under the cap.
        let grace = self.retention.grace;
        self.processes
            .retain(|_, p| now.saturating_duration_since(p.last_io) <= grace);
        let decay = 0.5f64.powf(1.0 / ACTIVITY_HALF_LIFE_TICKS);
        for vm in self.vms.values_mut() {
            vm.activity *= decay;
        }

        // VM rows sort first (report::row_order), so a PID resolved as a VM on one device is
        // mapped before a row of the same PID that exited while the report was being built.
        let mut alive_vm_pids: HashSet<u32> = HashSet::new();
        let mut harvested: HashSet<u32> = HashSet::new();
        for row in &report.processes {
            if let Some(vm) = &row.vm {
                let key = VmKey::of(vm);
                self.note_vm_pid(row.pid, &key, procs);
                let series = self.vm_series(key, vm, row, now);
                series
                    .devices
                    .entry(DeviceKey::of(row))
                    .or_default()
                    .add(row);
                series.activity += row.counts.total_ops() as f64;
                alive_vm_pids.insert(row.pid);
                continue;
            }
            if row.exited
                && let Some(entry) = self.pids.get(&row.pid)
            {
                if let Some(series) = self.vms.get_mut(&entry.vm) {
                    series
                        .devices
                        .entry(DeviceKey::of(row))
                        .or_default()
                        .add(row);
                    series.activity += row.counts.total_ops() as f64;
                }
                harvested.insert(row.pid);
                continue;
            }
            if !row.exited && row.pid != 0 {
                // A live process that is not a VM: whatever VM had this PID is gone.
                self.pids.remove(&row.pid);
            }
            self.add_process(row, now);
        }
        for pid in harvested {
            self.pids.remove(&pid);
        }
        self.sweep_pids(&alive_vm_pids, tick_no, now, procs);
        self.expire(now);
        self.apply_cap();

        for d in &report.devices {
            add_counts(self.devices.entry(d.device.clone()).or_default(), &d.counts);
        }
        self.stats.mode.clone_from(&report.mode);
        self.stats.read_errors += report.health.read_errors;
        self.stats.exec_naming_expired += report
            .health
            .events
            .get(crate::report::EXEC_NAMING_EXPIRED)
            .copied()
            .unwrap_or(0);
        self.stats.counted_after_prune += report
            .health
            .events
            .get(crate::report::COUNTED_AFTER_PRUNE)
            .copied()
            .unwrap_or(0);
        self.stats.programs.clone_from(&tick.programs);
        self.stats.maps.clone_from(&tick.maps);
        self.stats.health_total = tick.health_total;
        self.stats.sample_seconds = tick.sample_seconds;
        self.stats.throttle.clone_from(&tick.throttle);
        self.stats.parity.clone_from(&report.parity);
    }

    /// Chooses the exported VMs and says so in the log when the cap starts or stops leaving
    /// VMs out (not on every tick: the gauge has the current figure).
    fn apply_cap(&mut self) {
        let cap = self.retention.max_vms;
        let before = self.vms_dropped;
        self.vms_dropped = select_exported(self.vms.values_mut(), cap);
        match (before, self.vms_dropped) {
            (0, 0) => {}
            (0, n) => log::warn!(
                "{} VMs on this host, over the cap of {cap} exported VMs (--max-vms): the {n} \
                 least busy are left out of /metrics (overkvm_exporter_vms_dropped)",
                self.vms.len()
            ),
            (_, 0) => log::info!("every VM is exported again ({} VMs)", self.vms.len()),
            _ => {}
        }
    }

    fn note_vm_pid(&mut self, pid: u32, key: &VmKey, procs: &impl ProcessTable) {
        match self.pids.get_mut(&pid) {
            Some(e) if e.vm == *key => e.gone_at = None,
            _ => {
                self.pids.insert(
                    pid,
                    PidEntry {
                        vm: key.clone(),
                        start_time: procs.start_time(pid),
                        gone_at: None,
                    },
                );
            }
        }
    }

    fn vm_series(
        &mut self,
        key: VmKey,
        vm: &VmRef,
        row: &ProcessRow,
        now: Instant,
    ) -> &mut VmSeries {
        let label = (!self.vms.contains_key(&key)).then(|| self.unique_label(&key, row.pid));
        let s = self.vms.entry(key).or_insert_with_key(|key| VmSeries {
            label: label.unwrap_or_else(|| key.name.clone()),
            uuid: key.uuid.clone(),
            manager: vm.manager,
            pid: row.pid,
            cgroup: row.cgroup.clone(),
            devices: BTreeMap::new(),
            last_alive: now,
            activity: 0.0,
            exported: false,
        });
        s.manager = vm.manager;
        s.pid = row.pid;
        if s.cgroup != row.cgroup {
            s.cgroup.clone_from(&row.cgroup);
        }
        s.last_alive = now;
        s
    }

    /// The `vm` label of a new VM: its name (control characters shown escaped, as every label
    /// value is rendered) unless an exported VM already has that label. Made unique after the
    /// escaping, so a name with a literal `\x1b` and one with an ESC never share a series. The
    /// label never changes while the series exist, so a series never changes owner.
    fn unique_label(&self, key: &VmKey, pid: u32) -> String {
        let taken = |l: &str| self.vms.values().any(|s| s.label == l);
        let name = crate::text::escape_controls(&key.name);
        if !taken(&name) {
            return name;
        }
        let base = match &key.uuid {
            Some(u) => format!("{name}/{}", crate::text::escape_controls(u)),
            None => format!("{name}/pid{pid}"),
        };
        let mut label = base.clone();
        let mut n = 2;
        while taken(&label) {
            label = format!("{base}#{n}");
            n += 1;
        }
        label
    }

    /// Checks the PIDs seen as VMs that had no live row this tick: a VM that does no I/O is
    /// still alive, one whose process is gone stops being refreshed and later expires.
    fn sweep_pids(
        &mut self,
        alive_this_tick: &HashSet<u32>,
        tick_no: u64,
        now: Instant,
        procs: &impl ProcessTable,
    ) {
        let Totals { pids, vms, .. } = self;
        pids.retain(|pid, e| {
            if alive_this_tick.contains(pid) {
                return true;
            }
            match procs.start_time(*pid) {
                Some(st) if e.start_time == Some(st) => {
                    e.gone_at = None;
                    if let Some(vm) = vms.get_mut(&e.vm) {
                        vm.last_alive = now;
                    }
                    true
                }
                // Another process has the PID now: its I/O is not this VM's.
                Some(_) => false,
                None => match e.gone_at {
                    None => {
                        e.gone_at = Some(tick_no);
                        true
                    }
                    Some(t) => t >= tick_no,
                },
            }
        });
    }

    fn expire(&mut self, now: Instant) {
        let grace = self.retention.grace;
        let expired = |last: Instant| now.saturating_duration_since(last) > grace;
        self.vms.retain(|_, s| !expired(s.last_alive));
        let Totals { pids, vms, .. } = self;
        pids.retain(|_, e| vms.contains_key(&e.vm));
    }

    fn add_process(&mut self, row: &ProcessRow, now: Instant) {
        if !self.retention.per_process || row.counts.total_ops() == 0 {
            return;
        }
        if !self.processes.contains_key(&row.comm)
            && self.processes.len() >= self.retention.per_process_cap
        {
            self.process_dropped_ops += row.counts.total_ops();
            return;
        }
        let p = self
            .processes
            .entry(row.comm.clone())
            .or_insert_with(|| ProcessSeries {
                devices: BTreeMap::new(),
                last_io: now,
            });
        add_counts(
            p.devices.entry(row.device.clone()).or_default(),
            &row.counts,
        );
        p.last_io = now;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::{cell::RefCell, sync::Arc};

    use super::*;
    use crate::report::{CountSource, DeviceRow, HealthReport, Report};

    /// PIDs and start times of a fake host.
    #[derive(Default)]
    pub struct FakeProcs(pub RefCell<HashMap<u32, u64>>);

    impl FakeProcs {
        pub fn start(&self, pid: u32, start_time: u64) {
            self.0.borrow_mut().insert(pid, start_time);
        }
        pub fn stop(&self, pid: u32) {
            self.0.borrow_mut().remove(&pid);
        }
    }

    impl ProcessTable for FakeProcs {
        fn start_time(&self, pid: u32) -> Option<u64> {
            self.0.borrow().get(&pid).copied()
        }
    }

    /// A row of `reads` 4 KiB reads and `writes` writes, each read taking ~3 µs (bucket 11).
    pub fn row(pid: u32, vm: Option<&str>, device: &str, reads: u64, writes: u64) -> ProcessRow {
        let mut latency: Box<[Histogram; OP_COUNT]> = Box::default();
        latency[Op::Read as usize].record(3000, reads);
        latency[Op::Write as usize].record(1_500_000, writes);
        ProcessRow {
            pid,
            start_time: None,
            comm: if vm.is_some() {
                "qemu-system-x86".into()
            } else {
                format!("proc{pid}")
            },
            vm: vm.map(|name| VmRef {
                name: name.to_string(),
                uuid: Some(format!("uuid-{name}")),
                manager: Manager::Qemu,
                namespace: None,
            }),
            cgroup: format!("/machine/{pid}"),
            io_cgroup: None,
            device: device.to_string(),
            major: 7,
            minor: 0,
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
            lat_avg_us: None,
            lat_p99_us: None,
            completions: reads + writes,
            exited: false,
            kernel_thread: false,
            kernel_submitted_ops: 0,
            latency,
            target: None,
        }
    }

    /// The same row after the process exited: no VM, as the report builds it.
    pub fn exited(mut r: ProcessRow) -> ProcessRow {
        r.vm = None;
        r.exited = true;
        r.cgroup = String::new();
        r
    }

    pub fn tick(at: Instant, rows: Vec<ProcessRow>) -> Tick {
        let mut devices: BTreeMap<String, OpCounts> = BTreeMap::new();
        for r in &rows {
            devices
                .entry(r.device.clone())
                .or_default()
                .merge(&r.counts);
        }
        Tick {
            at,
            report: Arc::new(Report {
                timestamp: String::new(),
                interval_s: 1.0,
                mode: "io-start-done".into(),
                devices: devices
                    .into_iter()
                    .map(|(device, counts)| DeviceRow {
                        device: device.clone(),
                        major: 7,
                        minor: 0,
                        disk: device,
                        source: CountSource::Request,
                        counts,
                    })
                    .collect(),
                processes: rows,
                cgroups: Vec::new(),
                health: HealthReport::default(),
                parity: Vec::new(),
                storage: Vec::new(),
            }),
            health_total: [0; HEALTH_SLOTS as usize],
            maps: Vec::new(),
            programs: Vec::new(),
            sample_seconds: 0.001,
            throttle: None,
        }
    }

    fn totals(grace_s: u64) -> Totals {
        Totals::new(Retention {
            per_process: false,
            per_process_cap: 10,
            grace: Duration::from_secs(grace_s),
            max_vms: 2000,
        })
    }

    fn reads(t: &Totals, label: &str, device: &str) -> Option<u64> {
        let vm = t.vms().into_iter().find(|v| v.label == label)?;
        Some(vm.devices.get(&DeviceKey::host(device))?.io[Op::Read as usize].ops)
    }

    fn secs(t0: Instant, s: u64) -> Instant {
        t0 + Duration::from_secs(s)
    }

    #[test]
    fn counts_accumulate_exactly_per_vm_device_and_op() {
        let procs = FakeProcs::default();
        procs.start(100, 1);
        let mut t = totals(300);
        let t0 = Instant::now();
        t.apply(&tick(t0, vec![row(100, Some("web"), "vda", 10, 5)]), &procs);
        t.apply(
            &tick(
                secs(t0, 1),
                vec![
                    row(100, Some("web"), "vda", 7, 1),
                    row(100, Some("web"), "vdb", 2, 0),
                ],
            ),
            &procs,
        );
        let vm = t.vms()[0];
        let vda = &vm.devices[&DeviceKey::host("vda")];
        assert_eq!(
            vda.io[Op::Read as usize],
            Counters {
                ops: 17,
                bytes: 17 * 4096
            }
        );
        assert_eq!(
            vda.io[Op::Write as usize],
            Counters {
                ops: 6,
                bytes: 6 * 4096
            }
        );
        assert_eq!(vda.latency[Op::Read as usize].count(), 17);
        assert_eq!(vda.latency[Op::Read as usize].buckets[11], 17);
        assert_eq!(vda.latency[Op::Read as usize].sum_ns, 17 * 3000);
        assert_eq!(vda.latency[Op::Write as usize].count(), 6);
        assert_eq!(reads(&t, "web", "vdb"), Some(2));
        assert_eq!(t.devices["vda"][Op::Read as usize].ops, 17);
        assert_eq!(t.stats.ticks, 2);
        assert_eq!((vm.pid, vm.uuid.as_deref()), (100, Some("uuid-web")));
    }

    #[test]
    fn final_io_of_an_exited_vm_is_harvested_into_the_vm() {
        let procs = FakeProcs::default();
        procs.start(100, 1);
        let mut t = totals(300);
        let t0 = Instant::now();
        t.apply(&tick(t0, vec![row(100, Some("web"), "vda", 10, 0)]), &procs);
        procs.stop(100);
        // The last delta, read after the process died: no identity any more.
        t.apply(
            &tick(secs(t0, 1), vec![exited(row(100, None, "vda", 4, 3))]),
            &procs,
        );
        assert_eq!(reads(&t, "web", "vda"), Some(14));
        assert_eq!(
            t.vms()[0].devices[&DeviceKey::host("vda")].io[Op::Write as usize].ops,
            3
        );
        // Harvested once: the PID is forgotten, a later exited row is not the VM's.
        t.apply(
            &tick(secs(t0, 2), vec![exited(row(100, None, "vda", 50, 0))]),
            &procs,
        );
        assert_eq!(reads(&t, "web", "vda"), Some(14));
    }

    #[test]
    fn final_io_one_tick_after_the_process_was_found_gone_is_harvested() {
        let procs = FakeProcs::default();
        procs.start(100, 1);
        let mut t = totals(300);
        let t0 = Instant::now();
        t.apply(&tick(t0, vec![row(100, Some("web"), "vda", 10, 0)]), &procs);
        // Dies after the snapshot of tick 2 but before the sweep: nothing in tick 2.
        procs.stop(100);
        t.apply(&tick(secs(t0, 1), vec![]), &procs);
        t.apply(
            &tick(secs(t0, 2), vec![exited(row(100, None, "vda", 5, 0))]),
            &procs,
        );
        assert_eq!(reads(&t, "web", "vda"), Some(15));
        // One tick of slack only: two ticks after the process was found gone, a row of its
        // PID belongs to someone else.
        procs.start(101, 1);
        t.apply(
            &tick(secs(t0, 3), vec![row(101, Some("db"), "vda", 1, 0)]),
            &procs,
        );
        procs.stop(101);
        t.apply(&tick(secs(t0, 4), vec![]), &procs);
        t.apply(&tick(secs(t0, 5), vec![]), &procs);
        t.apply(
            &tick(secs(t0, 6), vec![exited(row(101, None, "vda", 5, 0))]),
            &procs,
        );
        assert_eq!(reads(&t, "db", "vda"), Some(1));
    }

    #[test]
    fn series_of_an_exited_vm_expire_after_grace() {
        let procs = FakeProcs::default();
        procs.start(100, 1);
        procs.start(200, 1);
        let mut t = totals(3);
        let t0 = Instant::now();
        t.apply(
            &tick(
                t0,
                vec![
                    row(100, Some("web"), "vda", 1, 0),
                    row(200, Some("db"), "vda", 1, 0),
                ],
            ),
            &procs,
        );
        procs.stop(100);
        // "db" does no I/O but its process runs: it stays.
        for s in 1..=3 {
            t.apply(&tick(secs(t0, s), vec![]), &procs);
            assert_eq!(reads(&t, "web", "vda"), Some(1), "within grace at {s}s");
        }
        t.apply(&tick(secs(t0, 4), vec![]), &procs);
        assert_eq!(reads(&t, "web", "vda"), None, "expired after grace");
        assert_eq!(reads(&t, "db", "vda"), Some(1));
        for s in 5..20 {
            t.apply(&tick(secs(t0, s), vec![]), &procs);
        }
        assert_eq!(
            reads(&t, "db", "vda"),
            Some(1),
            "an idle live VM never expires"
        );
        // Device totals stay.
        assert_eq!(t.devices["vda"][Op::Read as usize].ops, 2);
    }

    #[test]
    fn a_new_vm_on_a_reused_pid_starts_from_its_own_counts() {
        let procs = FakeProcs::default();
        procs.start(100, 1);
        let mut t = totals(300);
        let t0 = Instant::now();
        t.apply(&tick(t0, vec![row(100, Some("a"), "vda", 10, 0)]), &procs);
        procs.stop(100);
        t.apply(
            &tick(secs(t0, 1), vec![exited(row(100, None, "vda", 1, 0))]),
            &procs,
        );
        procs.start(100, 50);
        t.apply(
            &tick(secs(t0, 2), vec![row(100, Some("b"), "vda", 3, 0)]),
            &procs,
        );
        procs.stop(100);
        t.apply(
            &tick(secs(t0, 3), vec![exited(row(100, None, "vda", 2, 0))]),
            &procs,
        );
        assert_eq!(reads(&t, "a", "vda"), Some(11));
        assert_eq!(reads(&t, "b", "vda"), Some(5));
    }

    #[test]
    fn a_vm_pid_taken_over_while_the_map_still_holds_it_is_not_the_vms() {
        let procs = FakeProcs::default();
        procs.start(100, 1);
        let mut t = Totals::new(Retention {
            per_process: true,
            per_process_cap: 10,
            grace: Duration::from_secs(300),
            max_vms: 2000,
        });
        let t0 = Instant::now();
        t.apply(&tick(t0, vec![row(100, Some("a"), "vda", 10, 0)]), &procs);
        // The VM died without a final delta; a shell got the PID and does I/O.
        procs.start(100, 99);
        t.apply(
            &tick(secs(t0, 1), vec![row(100, None, "vda", 4, 0)]),
            &procs,
        );
        procs.stop(100);
        t.apply(
            &tick(secs(t0, 2), vec![exited(row(100, None, "vda", 6, 0))]),
            &procs,
        );
        assert_eq!(reads(&t, "a", "vda"), Some(10));
        assert_eq!(
            t.processes["proc100"].devices["vda"][Op::Read as usize].ops,
            10
        );

        // Reuse noticed by start time alone (the newcomer does no I/O): not kept alive.
        let mut t = totals(3);
        procs.start(300, 1);
        t.apply(&tick(t0, vec![row(300, Some("c"), "vda", 1, 0)]), &procs);
        procs.start(300, 2);
        for s in 1..=5 {
            t.apply(&tick(secs(t0, s), vec![]), &procs);
        }
        assert_eq!(reads(&t, "c", "vda"), None);
    }

    #[test]
    fn vms_sharing_a_name_get_distinct_stable_labels() {
        let procs = FakeProcs::default();
        procs.start(100, 1);
        procs.start(200, 1);
        let mut t = totals(300);
        let mut other = row(200, Some("web"), "vda", 2, 0);
        if let Some(vm) = other.vm.as_mut() {
            vm.uuid = Some("u2".into());
        }
        let t0 = Instant::now();
        t.apply(
            &tick(t0, vec![row(100, Some("web"), "vda", 1, 0), other.clone()]),
            &procs,
        );
        t.apply(&tick(secs(t0, 1), vec![other]), &procs);
        assert_eq!(reads(&t, "web", "vda"), Some(1));
        assert_eq!(reads(&t, "web/u2", "vda"), Some(4));
    }

    /// A tenant cannot take another VM's series by naming its VM the way the other's name is
    /// shown: labels are made unique after control characters are escaped.
    #[test]
    fn a_name_spelling_out_anothers_escape_gets_its_own_label() {
        let procs = FakeProcs::default();
        procs.start(100, 1);
        procs.start(200, 1);
        let mut t = totals(300);
        let mut mimic = row(200, Some(r"ev\x1bil"), "vda", 2, 0);
        if let Some(vm) = mimic.vm.as_mut() {
            vm.uuid = Some("u2".into());
        }
        t.apply(
            &tick(
                Instant::now(),
                vec![row(100, Some("ev\x1bil"), "vda", 1, 0), mimic],
            ),
            &procs,
        );
        assert_eq!(reads(&t, r"ev\x1bil", "vda"), Some(1));
        assert_eq!(reads(&t, r"ev\x1bil/u2", "vda"), Some(2));
    }

    #[test]
    fn per_process_series_are_capped_by_name_and_drops_counted() {
        let procs = FakeProcs::default();
        procs.start(100, 1);
        let mut t = Totals::new(Retention {
            per_process: true,
            per_process_cap: 2,
            grace: Duration::from_secs(3),
            max_vms: 2000,
        });
        let t0 = Instant::now();
        t.apply(
            &tick(
                t0,
                vec![
                    row(100, Some("web"), "vda", 9, 0),
                    row(1, None, "vda", 1, 0),
                    row(2, None, "vda", 2, 0),
                    row(3, None, "vda", 3, 1),
                    row(1, None, "vdb", 5, 0),
                ],
            ),
            &procs,
        );
        let names: Vec<&str> = t.processes.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            ["proc1", "proc2"],
            "VMs are never per-process series"
        );
        assert_eq!(
            t.processes["proc1"].devices["vdb"][Op::Read as usize].ops,
            5
        );
        assert_eq!(t.process_dropped_ops, 4);
        // Names that stop doing I/O expire and free their slot.
        t.apply(&tick(secs(t0, 2), vec![row(2, None, "vda", 1, 0)]), &procs);
        t.apply(&tick(secs(t0, 4), vec![row(3, None, "vda", 1, 0)]), &procs);
        let names: Vec<&str> = t.processes.keys().map(String::as_str).collect();
        assert_eq!(names, ["proc2", "proc3"]);

        let mut off = totals(3);
        off.apply(&tick(t0, vec![row(1, None, "vda", 1, 0)]), &procs);
        assert!(off.processes.is_empty());
        assert_eq!(off.process_dropped_ops, 0);
    }

    fn exported_labels(t: &Totals) -> Vec<&str> {
        t.vms().into_iter().map(|v| v.label.as_str()).collect()
    }

    #[test]
    fn the_cap_keeps_the_busiest_vms_and_counts_the_rest() {
        let procs = FakeProcs::default();
        for pid in 1..=5 {
            procs.start(pid, 1);
        }
        let mut t = Totals::new(Retention {
            per_process: false,
            per_process_cap: 10,
            grace: Duration::from_secs(300),
            max_vms: 3,
        });
        let t0 = Instant::now();
        let rows = |ops: [u64; 5]| -> Vec<ProcessRow> {
            ["a", "b", "c", "d", "e"]
                .iter()
                .zip(ops)
                .enumerate()
                .map(|(i, (name, n))| row(i as u32 + 1, Some(name), "vda", n, 0))
                .collect()
        };
        t.apply(&tick(t0, rows([1, 5, 3, 5, 0])), &procs);
        assert_eq!(exported_labels(&t), ["b", "c", "d"]);
        assert_eq!(t.vms_dropped, 2);
        // Equal activity: the label decides, the same way every time.
        let mut same = totals(300);
        same.retention.max_vms = 2;
        same.apply(&tick(t0, rows([2, 2, 2, 2, 2])), &procs);
        assert_eq!(exported_labels(&same), ["a", "b"]);

        // "a" turns busy: it takes the slot of the quietest, and its counts (kept while it
        // was left out) are whole.
        for s in 1..=3 {
            t.apply(&tick(secs(t0, s), rows([100, 5, 0, 5, 0])), &procs);
        }
        assert_eq!(exported_labels(&t), ["a", "b", "d"]);
        assert_eq!(reads(&t, "a", "vda"), Some(301));
        assert_eq!(reads(&t, "c", "vda"), None, "left out");
        assert_eq!(t.vms_dropped, 2);

        // Under the cap, every VM is exported and nothing is counted as dropped.
        t.retention.max_vms = 10;
        t.apply(&tick(secs(t0, 4), vec![]), &procs);
        assert_eq!(exported_labels(&t), ["a", "b", "c", "d", "e"]);
        assert_eq!(t.vms_dropped, 0);
        assert_eq!(reads(&t, "c", "vda"), Some(3));
    }

    #[test]
    fn a_vm_left_out_takes_a_slot_only_when_clearly_busier() {
        let procs = FakeProcs::default();
        procs.start(1, 1);
        procs.start(2, 1);
        let mut t = totals(300);
        t.retention.max_vms = 1;
        let t0 = Instant::now();
        let rows = |x: u64, y: u64| {
            vec![
                row(1, Some("x"), "vda", x, 0),
                row(2, Some("y"), "vda", y, 0),
            ]
        };
        t.apply(&tick(t0, rows(10, 0)), &procs);
        assert_eq!(exported_labels(&t), ["x"]);
        // A little busier is not enough: no swapping at the edge.
        for s in 1..=200 {
            t.apply(&tick(secs(t0, s), rows(10, 11)), &procs);
            assert_eq!(exported_labels(&t), ["x"], "tick {s}");
        }
        t.apply(&tick(secs(t0, 201), rows(10, 1000)), &procs);
        assert_eq!(exported_labels(&t), ["y"]);
        assert_eq!(t.vms_dropped, 1);
    }

    #[test]
    fn an_exited_process_never_seen_as_a_vm_is_no_vms() {
        let procs = FakeProcs::default();
        procs.start(100, 1);
        let mut t = totals(300);
        let t0 = Instant::now();
        t.apply(&tick(t0, vec![row(100, Some("web"), "vda", 1, 0)]), &procs);
        t.apply(
            &tick(secs(t0, 1), vec![exited(row(555, None, "vda", 8, 0))]),
            &procs,
        );
        assert_eq!(reads(&t, "web", "vda"), Some(1));
        assert_eq!(t.devices["vda"][Op::Read as usize].ops, 9);
    }
}
