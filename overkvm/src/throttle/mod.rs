//! Automatic IOPS throttling: keep each budgeted device under its budget by limiting the VMs
//! responsible through cgroup `io.max` (v2) or `blkio.throttle.*` (v1), or QEMU's own disk
//! throttling where a cgroup cannot hold a VM, then let go.
//!
//! `aggregate` sums each VM's use (pure), `policy` decides (pure: `budget` divides a budget
//! among the guests, `latency` finds the budget that meets a latency target), `host::cgroup::limits`
//! writes cgroup files, `qemu_actuator` picks the actuator per VM (pure) and sets QEMU limits
//! through the monitor's owner, `state` records every change so a crash can be undone.
//! `ThrottleService` joins them to the daemon's ticks; it also still holds the cgroup and QEMU
//! bookkeeping that belongs behind one actuator seam (not yet split out).
//!
//! Every decision (engage, each limit set, tightened, relaxed or removed, release) and every
//! fault handled is logged at the default level (target `overkvm::throttle`), one line each,
//! rate-limited per VM and device by `ratelimit` so that a flapping device cannot flood the log.

pub mod aggregate;
pub mod budget;
pub mod command;
pub mod latency;
pub mod policy;
pub mod qemu_actuator;
mod qemu_hold;
pub mod ratelimit;
pub mod sharing;
pub mod state;
pub mod storage;

use std::{
    collections::{BTreeMap, HashSet, VecDeque},
    path::PathBuf,
    sync::Arc,
    time::Instant,
};

use anyhow::{Context as _, bail};
use overkvm_common::make_dev;

use self::{
    aggregate::{DeviceUse, VmUse},
    budget::{Budget, DeviceController, DirLimits, GuestUse, Knobs},
    latency::{LatencyController, LatencyKnobs, LatencySample},
    qemu_actuator::QemuSide,
    ratelimit::{LogLimiter, Verdict},
    sharing::SharingMemory,
    state::{MovedProcess, ThrottleState},
    storage::StorageBudget,
};
use crate::{
    config::{ActuatorMode, Config, DeviceBudgetSpec},
    devices::{DeviceInfo, DeviceTable},
    host::cgroup::limits::{self, Actuator, LimitError, LimitWriter, Limits},
    report::Report,
    status_file::{self, state_path, status_path},
    tick::{ActiveLimit, BudgetUse, ThrottleView},
};

/// Policy knobs from the config, defaults where unset.
pub fn knobs(config: &Config) -> Knobs {
    let p = &config.policy;
    let d = Knobs::default();
    Knobs {
        engage_ticks: p.engage_ticks.unwrap_or(d.engage_ticks),
        engage_above: p.engage_above.unwrap_or(d.engage_above),
        release_below: p.release_below.unwrap_or(d.release_below),
        release_ticks: p.release_ticks.unwrap_or(d.release_ticks),
        floor: p.floor_iops.map(|f| f as f64).unwrap_or(d.floor),
        deadband: p.deadband.unwrap_or(d.deadband),
        relax_step: p.relax_step.unwrap_or(d.relax_step),
        ..d
    }
}

/// The latency controller's knobs: `[latency]`'s, defaults for the rest (`LatencyKnobs` says
/// which are internal tuning, fixed).
pub fn latency_knobs(config: &Config) -> LatencyKnobs {
    let l = &config.latency;
    let d = LatencyKnobs::default();
    LatencyKnobs {
        engage_ticks: l.engage_ticks.unwrap_or(d.engage_ticks),
        release_ticks: l.release_ticks.unwrap_or(d.release_ticks),
        release_below: l.release_below.unwrap_or(d.release_below),
        min_completions: l.min_completions.unwrap_or(d.min_completions),
        setpoint: l.setpoint.unwrap_or(d.setpoint),
        floor: l.floor_iops.map(|f| f as f64).unwrap_or(d.floor),
        min_fraction: l.min_fraction.unwrap_or(d.min_fraction),
        drain_ticks: l.drain_ticks.unwrap_or(d.drain_ticks),
        ..d
    }
}

fn iops_budget(s: &DeviceBudgetSpec) -> Option<Budget> {
    match (s.iops, s.read_iops, s.write_iops) {
        (Some(t), _, _) => Some(Budget::Total(t as f64)),
        (None, None, None) => None,
        (None, r, w) => Some(Budget::PerDirection {
            read: r.map(|v| v as f64),
            write: w.map(|v| v as f64),
        }),
    }
}

fn bps_budget(s: &DeviceBudgetSpec) -> Option<Budget> {
    match (s.bps, s.read_bps, s.write_bps) {
        (Some(t), _, _) => Some(Budget::Total(t as f64)),
        (None, None, None) => None,
        (None, r, w) => Some(Budget::PerDirection {
            read: r.map(|v| v as f64),
            write: w.map(|v| v as f64),
        }),
    }
}

/// A device's budget as an operator wrote it, for log lines: `budget 3000 IOPS`,
/// `budget r 2000 IOPS w 500 IOPS, 100000000 B/s`.
fn describe_budget(iops: Option<Budget>, bps: Option<Budget>) -> String {
    let one = |b: Budget, unit: &str| match b {
        Budget::Total(t) => format!("{t:.0} {unit}"),
        Budget::PerDirection { read, write } => [("r", read), ("w", write)]
            .iter()
            .filter_map(|(d, v)| v.map(|v| format!("{d} {v:.0} {unit}")))
            .collect::<Vec<_>>()
            .join(" "),
    };
    let parts: Vec<String> = iops
        .map(|b| one(b, "IOPS"))
        .into_iter()
        .chain(bps.map(|b| one(b, "B/s")))
        .collect();
    format!("budget {}", parts.join(", "))
}

struct Managed {
    info: Arc<DeviceInfo>,
    iops: Option<Budget>,
    bps: Option<Budget>,
    ctl_iops: DeviceController,
    ctl_bps: DeviceController,
    used_iops: f64,
    /// Latency target (µs) and the quantile (0-1) it applies to.
    latency: Option<(f64, f64)>,
    ctl_latency: LatencyController,
    /// Set for a `[[storage]]` budget: `info` is then its key (`storage::budget_key`).
    storage: Option<StorageBudget>,
}

struct Applied {
    cgroup: String,
    /// The VM's process the limit was placed for (0: unknown). A VM restarted is the same VM
    /// (name and uuid) in another process: its limit moves there.
    pid: u32,
    limits: Limits,
    since: Instant,
    /// Set when QEMU holds this limit instead of the cgroup.
    qemu: Option<qemu_hold::AppliedQemu>,
}

/// The throttle inside `overkvm-io serve`.
pub struct ThrottleService {
    config: Config,
    knobs: Knobs,
    dry_run: bool,
    manage_cgroups: bool,
    act: Option<Arc<dyn LimitWriter>>,
    state_path: PathBuf,
    status_path: PathBuf,
    state: ThrottleState,
    devices: Vec<Managed>,
    table: DeviceTable,
    applied: BTreeMap<(String, u32), Applied>,
    decisions_total: u64,
    throttled_seconds: f64,
    /// (key, message), latest first.
    problems: VecDeque<(String, String)>,
    warned: HashSet<String>,
    /// Decision lines per subject (VM and device, or device) are rate-limited.
    log_limit: LogLimiter,
    /// `[policy] actuator`.
    mode: ActuatorMode,
    /// QEMU's side: VMs' disks (cached), QEMU limits set and restored.
    qemu: QemuSide,
    /// Which VM cgroups also serve other processes, remembered for `[policy] shared_hold`.
    sharing: SharingMemory,
    /// Each VM's uuid as last seen, by name: the throttle's state is a VM's (name and uuid),
    /// kept across restarts of its qemu, not inherited by a new VM under the same name.
    identities: BTreeMap<String, String>,
}

/// Where a limit is held: for the VM's process `pid` (0: unknown), which still runs or not,
/// by QEMU or the cgroup.
#[derive(Clone, Copy, Debug)]
struct Placed {
    pid: u32,
    running: bool,
    by_qemu: bool,
}

/// Whether a limit of the right value is in the wrong place: the process it was placed for is
/// gone and the VM does I/O from another (`pid`, 0 when none did I/O: a restart), or the
/// actuator chosen now (`by_qemu`) is not the one holding it. A VM with a second process
/// doing I/O (a helper under its name) while the first runs has not restarted.
fn misplaced(held: Placed, pid: u32, by_qemu: bool) -> bool {
    let restarted = pid != 0 && held.pid != 0 && pid != held.pid && !held.running;
    restarted || held.by_qemu != by_qemu
}

/// Limits as an operator reads them: `riops=990 wiops=20` (unset directions left out).
fn describe(l: &Limits) -> String {
    let parts: Vec<String> = [
        ("riops", l.riops),
        ("wiops", l.wiops),
        ("rbps", l.rbps),
        ("wbps", l.wbps),
    ]
    .iter()
    .filter_map(|(k, v)| v.map(|v| format!("{k}={v}")))
    .collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(" ")
    }
}

/// Whether a new limit is tighter, looser or mixed against the old one (None: unlimited).
fn change_word(old: &Limits, new: &Limits) -> &'static str {
    let (mut tighter, mut looser) = (false, false);
    for (o, n) in limits::fields(old).into_iter().zip(limits::fields(new)) {
        match (o, n) {
            (None, Some(_)) => tighter = true,
            (Some(_), None) => looser = true,
            (Some(o), Some(n)) if n < o => tighter = true,
            (Some(o), Some(n)) if n > o => looser = true,
            _ => {}
        }
    }
    match (tighter, looser) {
        (true, false) => "tightened",
        (false, true) => "relaxed",
        _ => "changed",
    }
}

fn limits_of(iops: Option<&DirLimits>, bps: Option<&DirLimits>) -> Limits {
    let dir = |v: u64| (v != u64::MAX).then_some(v);
    Limits {
        riops: iops.and_then(|l| dir(l.read)),
        wiops: iops.and_then(|l| dir(l.write)),
        rbps: bps.and_then(|l| dir(l.read)),
        wbps: bps.and_then(|l| dir(l.write)),
    }
}

impl ThrottleService {
    /// Validates devices, removes leftovers of a crashed run, and starts with no limits.
    pub fn start(config: &Config, dry_run: bool) -> anyhow::Result<ThrottleService> {
        let mut table = DeviceTable::new();
        let mut devices = Vec::new();
        for spec in &config.devices {
            let info = table
                .resolve_disk(&spec.device)
                .with_context(|| format!("budget for device {:?}", spec.device))?;
            devices.push(Managed {
                info,
                iops: iops_budget(spec),
                bps: bps_budget(spec),
                ctl_iops: DeviceController::default(),
                ctl_bps: DeviceController::default(),
                used_iops: 0.0,
                latency: spec
                    .latency_target
                    .map(|t| (t.as_secs_f64() * 1e6, spec.latency_quantile())),
                ctl_latency: LatencyController::default(),
                storage: None,
            });
        }
        for (n, spec) in config.storage.iter().enumerate() {
            let target = crate::storage_target::StorageTarget::parse(
                spec.target.as_deref().unwrap_or_default(),
            )
            .map_err(|e| anyhow::anyhow!("budget for storage: {e}"))?;
            devices.push(Managed {
                info: Arc::new(storage::budget_key(n, &target)),
                iops: iops_budget(spec),
                bps: bps_budget(spec),
                ctl_iops: DeviceController::default(),
                ctl_bps: DeviceController::default(),
                used_iops: 0.0,
                // QEMU's mean per operation stands for the latency (`check_storage`).
                latency: spec.latency_target.map(|t| (t.as_secs_f64() * 1e6, 0.5)),
                ctl_latency: LatencyController::default(),
                storage: Some(StorageBudget::new(target)),
            });
        }
        let act = match Actuator::for_host() {
            Ok(a) => Some(Arc::new(a) as Arc<dyn LimitWriter>),
            Err(e) if dry_run => {
                log::warn!("{e:#} (dry run: deciding only)");
                None
            }
            Err(e) => return Err(e),
        };
        let state_path = state_path(config);
        let status_path = status_path(config);
        let mut svc = ThrottleService {
            knobs: knobs(config),
            config: config.clone(),
            dry_run,
            manage_cgroups: config.policy.manage_cgroups.unwrap_or(false),
            act,
            state: ThrottleState::default(),
            state_path,
            status_path,
            devices,
            table,
            applied: BTreeMap::new(),
            decisions_total: 0,
            throttled_seconds: 0.0,
            problems: VecDeque::new(),
            warned: HashSet::new(),
            log_limit: LogLimiter::default(),
            mode: config.policy.actuator.unwrap_or_default(),
            qemu: QemuSide::default(),
            sharing: SharingMemory::new(config.policy.shared_hold.unwrap_or(sharing::DEFAULT_HOLD)),
            identities: BTreeMap::new(),
        };
        if !dry_run {
            svc.reconcile()?;
            if let Some(act) = &svc.act {
                svc.state.root = act.root().to_path_buf();
            }
        }
        log::info!(
            "throttling {} device(s){}",
            svc.devices.len(),
            if dry_run { " (dry run)" } else { "" }
        );
        Ok(svc)
    }

    /// QMP sockets the operator named (`serve --qmp`): VMs started with one are held through
    /// it like overkvm's own (their network disks' budgets need it: no cgroup holds them).
    pub fn use_qmp_sockets(&mut self, sockets: &[PathBuf]) {
        self.qemu.given_sockets = sockets.to_vec();
    }

    /// overkvm's own VMs (listed by the VM lifecycle): they are held through their QMP sockets.
    pub fn use_own_vms(&mut self, vms: Box<dyn crate::qemu::qmp::OwnVms>) {
        self.qemu.own_vms = Some(vms);
    }

    /// Removes what a previous run left (after a crash or kill -9).
    fn reconcile(&mut self) -> anyhow::Result<()> {
        let old = match ThrottleState::load(&self.state_path) {
            Ok(o) => o,
            Err(e) => {
                // Unreadable state: nothing to undo that we know of; no limit is written
                // until the state can be saved (see `enforce`).
                self.problem("state-load", format!("{e:#}"));
                return Ok(());
            }
        };
        if old.is_empty() {
            return Ok(());
        }
        let act = self
            .act
            .as_ref()
            .context("no cgroup controller to undo old limits")?;
        log::warn!(
            "removing {} limit(s) left by a previous run ({})",
            old.limits.len(),
            self.state_path.display()
        );
        for f in state::undo(&old, act.as_ref()) {
            log::warn!("could not undo: {f}");
        }
        ThrottleState::default().save(&self.state_path)
    }

    /// Records a problem; logged once per key until it is resolved.
    fn problem(&mut self, key: &str, msg: String) {
        if self.warned.insert(key.to_string()) {
            log::warn!("{msg}");
        }
        self.problems.retain(|(k, m)| k != key && m != &msg);
        self.problems.push_front((key.to_string(), msg));
        self.problems.truncate(20);
    }

    /// A condition recorded with `problem` is over: it leaves the problem list (and the
    /// metric counting it), and is logged again should it come back.
    fn resolved(&mut self, key: &str, msg: impl FnOnce() -> String) {
        let before = self.problems.len();
        self.problems.retain(|(k, _)| k != key);
        if self.warned.remove(key) || self.problems.len() != before {
            log::info!("{}", msg());
        }
    }

    /// A VM's cgroup vanished (the VM stopped and its manager removed the cgroup): logged once
    /// per cgroup, however many ticks still mention it. Not a problem: nothing is degraded.
    /// Removes the limit of VM `vm` on a device from `cgroup` and from the record (a cgroup
    /// gone took its limit with it; a failure is a problem, logged once). Nothing in a dry run.
    fn clear_cgroup_limit(&mut self, vm: &str, info: &DeviceInfo, cgroup: &str) {
        let Some(act) = self.act.clone().filter(|_| !self.dry_run) else {
            return;
        };
        match act.clear(cgroup, info.major, info.minor) {
            Err(LimitError::Gone { .. }) => self.vanished(vm, cgroup),
            Err(e) => self.problem(
                &format!("clear-{vm}"),
                format!(
                    "removing the limit of VM {vm} on {} ({cgroup}): {e:#}",
                    info.name
                ),
            ),
            Ok(()) => {}
        }
        self.state.forget_limit(cgroup, info.major, info.minor);
        self.save_state();
    }

    fn vanished(&mut self, vm: &str, cgroup: &str) {
        let key = format!("gone-{cgroup}");
        if self.warned.len() > 4096 {
            // Bounded over months of VM churn: old vanished cgroups are forgotten.
            self.warned.retain(|k| !k.starts_with("gone-"));
        }
        if self.warned.insert(key) {
            log::info!("VM {vm}: cgroup {cgroup} is gone (VM stopped?): its limit went with it");
        }
    }

    /// How a new limit on (VM, device) `key` differs from the one in place, and the VM's use,
    /// in an operator's words for the decision line: ("limit tightened to ... (was ...)",
    /// ", using 300r+20w IOPS").
    fn limit_change(
        &self,
        key: &(String, u32),
        want: &Limits,
        usage: Option<&VmUse>,
    ) -> (String, String) {
        let what = match self.applied.get(key) {
            Some(a) => format!(
                "limit {} to {} (was {})",
                change_word(&a.limits, want),
                describe(want),
                describe(&a.limits)
            ),
            None => format!("limited to {}", describe(want)),
        };
        let used = usage
            .map(|u| format!(", using {:.0}r+{:.0}w IOPS", u.iops.0, u.iops.1))
            .unwrap_or_default();
        (what, used)
    }

    /// Logs one throttle decision at the default level, rate-limited per `subject`.
    fn decided(&mut self, subject: &str, line: String) {
        let dry = if self.dry_run { " (dry run)" } else { "" };
        match self.log_limit.admit(subject, Instant::now()) {
            Verdict::Suppress => log::debug!("{line}{dry}"),
            v => log::info!("{line}{dry}{}", v.suffix()),
        }
    }

    /// Saves the record of changes; false (logged once, shown in status) when it cannot.
    fn save_state(&mut self) -> bool {
        if self.dry_run {
            return true;
        }
        match self.state.save(&self.state_path) {
            Ok(()) => {
                let path = self.state_path.display().to_string();
                self.resolved("state-save", || {
                    format!("throttle state saved to {path} again: limits are written again")
                });
                true
            }
            Err(e) => {
                self.problem(
                    "state-save",
                    format!(
                        "cannot save throttle state {}: {e:#}; no new limit is written until it can be",
                        self.state_path.display()
                    ),
                );
                false
            }
        }
    }

    /// One control step over the interval's report.
    pub fn on_tick(&mut self, report: &Report) -> ThrottleView {
        let secs = report.interval_s.max(1e-3);
        // What each living VM's disks are (cached, re-read every FACTS_REFRESH): the choice of
        // actuator, QEMU-side counts of host-cached disks and the QEMU limits shown.
        self.qemu.discover(&mut self.table);
        let mut seen = HashSet::new();
        for row in &report.processes {
            if let Some(vm) = row
                .vm
                .as_ref()
                .filter(|_| !row.exited && !row.kernel_thread)
                && seen.insert(row.pid)
            {
                self.qemu.facts(vm, row.pid, &mut self.table);
            }
        }
        for change in self.sharing.observe(report, Instant::now()) {
            let (cgroup, line) = match change {
                sharing::Change::Shared(cg, who) => {
                    let line = format!(
                        "cgroup {cg} is shared: I/O of {} was charged to it too; a limit there \
                         would hold them, so it counts as shared until {} after their last I/O",
                        who.join(", "),
                        humantime::format_duration(self.sharing.hold())
                    );
                    (cg, line)
                }
                sharing::Change::Alone(cg, hold) => {
                    let line = format!(
                        "cgroup {cg}: no I/O but its VM's for {}: it is not shared any more",
                        humantime::format_duration(hold)
                    );
                    (cg, line)
                }
            };
            self.decided(&format!("cgroup {cgroup}"), line);
        }
        if self.identities.len() > 4096 {
            // Bounded over months of VM churn: a name forgotten is matched again from scratch.
            self.identities.clear();
        }
        for (vm, old, new) in aggregate::replaced_vms(&mut self.identities, report) {
            self.new_vm_under_name(&vm, &old, &new);
        }
        for i in 0..self.devices.len() {
            self.step_device(i, report, secs);
        }
        self.throttled_seconds += secs * self.applied.len() as f64;
        let mut view = self.view();
        view.storage = crate::tick::StorageUse::of(report);
        if !self.dry_run
            && let Ok(json) = serde_json::to_vec(&view)
        {
            match status_file::write_atomic(&self.status_path, &json) {
                Ok(()) => {
                    let path = self.status_path.display().to_string();
                    self.resolved("status", || format!("{path} written again"));
                }
                Err(e) => self.problem(
                    "status",
                    format!("cannot write {}: {e:#}", self.status_path.display()),
                ),
            }
        }
        view
    }

    fn step_device(&mut self, i: usize, report: &Report, secs: f64) {
        let disk = self.devices[i].info.dev;
        let qemu_counted =
            |row: &crate::report::ProcessRow| row.source == crate::report::CountSource::Qemu;
        if let Some(s) = self.devices[i].storage.as_mut() {
            for row in report.processes.iter().filter(|r| qemu_counted(r)) {
                if s.covers(row.target.as_deref()) {
                    s.note(row.pid, &row.device);
                }
            }
            let qemu = &self.qemu;
            s.retain(|pid| qemu.cached(pid).is_some());
        }
        let storage = self.devices[i].storage.as_ref();
        let (table, api) = (&mut self.table, self.act.as_ref().map(|a| a.api()));
        let DeviceUse {
            mut vms,
            background_iops: mut bg_iops,
            background_bps: mut bg_bps,
            flusher,
            latency: device_latency,
        } = aggregate::device_use(
            report,
            secs,
            // A disk QEMU counts (network storage) is on no host device: only in a storage
            // budget that covers its target, never in a device's.
            |row| match storage {
                Some(s) => qemu_counted(row) && s.covers(row.target.as_deref()),
                None => {
                    !qemu_counted(row) && table.get(make_dev(row.major, row.minor)).disk_dev == disk
                }
            },
            |pid| crate::host::proc::block_cgroup(pid, api?),
        );
        let observed = match storage {
            Some(s) => {
                let rows: Vec<(Option<f64>, u64)> = report
                    .processes
                    .iter()
                    .filter(|r| qemu_counted(r) && s.covers(r.target.as_deref()))
                    .map(|r| (r.lat_avg_us, r.completions))
                    .collect();
                let completions = rows.iter().map(|r| r.1).sum();
                (storage::mean_latency_us(rows), completions)
            }
            None => {
                let q = self.devices[i].latency.map_or(0.5, |(_, q)| q);
                (
                    crate::stats::quantile_us(&device_latency, q),
                    device_latency.count(),
                )
            }
        };
        if self.devices[i].storage.is_none() {
            self.count_host_cached(disk, &mut vms, &mut bg_iops, &mut bg_bps, flusher);
        }
        let guests = |bytes: bool| -> BTreeMap<String, GuestUse> {
            vms.iter()
                .map(|(n, u)| (n.clone(), self.guest_use(u, n, bytes)))
                .collect()
        };
        let (iops_guests, bps_guests) = (guests(false), guests(true));
        let mut touched =
            self.control_step(i, (&iops_guests, bg_iops), (&bps_guests, bg_bps), observed);
        touched.extend(self.not_in_place(i, &vms));
        touched.sort();
        touched.dedup();
        for vm in touched {
            let m = &self.devices[i];
            let want = limits_of(m.ctl_iops.limits.get(&vm), m.ctl_bps.limits.get(&vm));
            let usage = vms.get(&vm);
            self.enforce(i, &vm, usage, want);
        }
    }

    /// What a VM's use on a device is to the budget controller (IOPS, or bytes when `bytes`),
    /// with its `[[vm]]` rule's weight, reservation and exemption.
    fn guest_use(&self, u: &VmUse, name: &str, bytes: bool) -> GuestUse {
        let rule = self.config.rule_for(name, u.uuid.as_deref(), &u.manager);
        let (r, w) = if bytes { u.bps } else { u.iops };
        GuestUse {
            read: r,
            write: w,
            weight: rule.and_then(|r| r.weight).unwrap_or(1.0),
            reservation: if bytes {
                0.0
            } else {
                rule.and_then(|r| r.reservation_iops).unwrap_or(0) as f64
            },
            exempt: rule.is_some_and(|r| r.exempt),
        }
    }

    /// One tick of device `i`'s controllers (IOPS with its latency target, bytes): returns
    /// the VMs whose limits they changed, and logs when throttling engages or lets go.
    /// `observed`: the latency (µs) the target applies to and the completions it is from.
    fn control_step(
        &mut self,
        i: usize,
        (iops_guests, bg_iops): (&BTreeMap<String, GuestUse>, (f64, f64)),
        (bps_guests, bg_bps): (&BTreeMap<String, GuestUse>, (f64, f64)),
        (latency_us, completions): (Option<f64>, u64),
    ) -> Vec<String> {
        let knobs = self.knobs.clone();
        let lat_knobs = latency_knobs(&self.config);
        let byte_knobs = Knobs {
            // The floor is in IOPS; for bandwidth keep guests above ~1 MB/s so they never
            // time out (QEMU's guidance is about 2 MB/s per disk).
            floor: 1_000_000.0,
            ..knobs.clone()
        };
        let m = &mut self.devices[i];
        let was_engaged = m.ctl_iops.engaged || m.ctl_bps.engaged;
        m.used_iops =
            iops_guests.values().map(|g| g.read + g.write).sum::<f64>() + bg_iops.0 + bg_iops.1;
        let mut touched: Vec<String> = Vec::new();
        if m.iops.is_some() || m.latency.is_some() {
            let sample = m.latency.map(|(target_us, _)| {
                (
                    target_us,
                    LatencySample {
                        latency_us,
                        completions,
                        iops: m.used_iops,
                    },
                )
            });
            let was_engaged = m.ctl_latency.engaged;
            let d = policy::step_iops(
                &mut m.ctl_iops,
                sample.as_ref().map(|(t, s)| (&mut m.ctl_latency, *t, s)),
                m.iops,
                iops_guests,
                bg_iops,
                &knobs,
                &lat_knobs,
            );
            if was_engaged != m.ctl_latency.engaged {
                log::info!(
                    "{}: latency {} target, {}",
                    m.info.name,
                    if m.ctl_latency.engaged {
                        "over"
                    } else {
                        "back under"
                    },
                    if m.ctl_latency.engaged {
                        "holding VMs to the rate that meets it"
                    } else {
                        "latency limits released"
                    }
                );
            }
            touched.extend(d.set.into_keys());
            touched.extend(d.clear);
        }
        if let Some(b) = m.bps {
            let d = m.ctl_bps.step(b, bps_guests, bg_bps, &byte_knobs);
            touched.extend(d.set.into_keys());
            touched.extend(d.clear);
        }
        let engaged = m.ctl_iops.engaged || m.ctl_bps.engaged;
        if engaged != was_engaged {
            let (name, used) = (m.info.name.clone(), m.used_iops);
            let budget = describe_budget(m.iops, m.bps);
            let line = if engaged {
                format!("{name}: over budget ({budget}, {used:.0} IOPS in use): throttling engaged")
            } else {
                format!(
                    "{name}: load under the release threshold ({budget}, {used:.0} IOPS in use): \
                     throttling released, every limit on it goes"
                )
            };
            self.decided(&name, line);
        }
        touched
    }

    /// The VMs on device `i` whose limit the controllers hold but that is not in place: its
    /// state could not be saved or its write failed (tried again every tick: the controllers
    /// only report changes), its VM is somewhere else now (restarted: another process, maybe
    /// another cgroup), or it now wants the other actuator (its cgroup became shared, or
    /// alone again).
    fn not_in_place(&mut self, i: usize, vms: &BTreeMap<String, VmUse>) -> Vec<String> {
        let m = &self.devices[i];
        let dev = m.info.dev;
        let held: Vec<(String, Limits)> = m
            .ctl_iops
            .limits
            .keys()
            .chain(m.ctl_bps.limits.keys())
            .filter(|vm| vms.contains_key(*vm))
            .map(|vm| {
                let want = limits_of(m.ctl_iops.limits.get(vm), m.ctl_bps.limits.get(vm));
                (vm.clone(), want)
            })
            .collect();
        let mut out = Vec::new();
        for (vm, want) in held {
            let usage = vms.get(&vm);
            let Some(a) = self.applied.get(&(vm.clone(), dev)) else {
                out.push(vm);
                continue;
            };
            let held = Placed {
                pid: a.pid,
                running: a.pid != 0 && qemu_actuator::running_start_time(a.pid).is_some(),
                by_qemu: a.qemu.is_some(),
            };
            if a.limits != want
                || misplaced(
                    held,
                    usage.map_or(0, |u| u.pid),
                    self.qemu_choice(i, &vm, usage).is_some(),
                )
            {
                out.push(vm);
            }
        }
        out
    }

    /// Another VM (uuid `new`) runs under the name `vm` of a former one (uuid `old`): what the
    /// throttle held for the former one goes, on every device, and the new VM starts afresh.
    fn new_vm_under_name(&mut self, vm: &str, old: &str, new: &str) {
        log::info!(
            "VM {vm}: a new VM under this name (uuid {new}, was {old}): the former one's limits \
             go, the new one starts afresh"
        );
        for i in 0..self.devices.len() {
            let m = &mut self.devices[i];
            m.ctl_iops.forget(vm);
            m.ctl_bps.forget(vm);
            self.enforce(i, vm, None, Limits::default());
        }
    }

    /// Makes the limits of `vm` on device `i` what the controllers want.
    fn enforce(&mut self, i: usize, vm: &str, usage: Option<&VmUse>, want: Limits) {
        let info = self.devices[i].info.clone();
        let key = (vm.to_string(), info.dev);
        if want.is_unlimited() {
            if let Some(a) = self.applied.remove(&key) {
                self.remove_limit(vm, &info, usage.is_none(), a);
            }
            return;
        }
        let pid = usage.map_or(0, |u| u.pid);
        if usage.is_some() && pid == 0 {
            // Only the last I/O of its process that exited: nothing to hold until its next
            // process shows (a restart), where the limit then moves.
            return;
        }
        self.note_restart(&key, &info, pid);
        if let Some(reason) = self.qemu_choice(i, vm, usage) {
            self.enforce_qemu(i, vm, usage, want, reason);
            return;
        }
        if self.devices[i].storage.is_some() {
            // No cgroup limit can hold I/O no host device sees: `qemu_choice` said why.
            return;
        }
        if let Some(q) = self.applied.get(&key).and_then(|a| a.qemu.clone()) {
            // The cgroup takes over (QEMU cannot be reached any more, or the reason for it
            // went): QEMU's settings go back first.
            let outcome = self.release_qemu(vm, &info, &q);
            // Its own subject (an actuator change is rare), as the change the other way.
            self.decided(
                &format!("actuator {vm}@{}", info.name),
                format!(
                    "VM {vm} on {}: QEMU lets go of it, the cgroup takes over ({outcome})",
                    info.name
                ),
            );
            self.applied.remove(&key);
        }
        let Some(cgroup) = self.cgroup_to_limit(&key, usage, pid) else {
            return;
        };
        if let Some(old) = self
            .applied
            .get(&key)
            .filter(|a| a.cgroup != cgroup)
            .map(|a| a.cgroup.clone())
        {
            // The VM runs in another cgroup now (restarted under a new scope, or moved): the
            // limit on its old cgroup is not its own any more.
            self.applied.remove(&key);
            self.clear_cgroup_limit(vm, &info, &old);
        }
        if let Some(a) = self
            .applied
            .get_mut(&key)
            .filter(|a| a.limits == want && a.cgroup == cgroup)
        {
            // Restarted in the same cgroup (overkvm's own VMs): the limit in place is its own.
            if pid != 0 {
                a.pid = pid;
            }
            return;
        }
        if !self.write_cgroup_limit(&key, &info, &cgroup, &want) {
            return;
        }
        // Counted once in place (or decided, in a dry run), not per attempt.
        self.decisions_total += 1;
        let (what, used) = self.limit_change(&key, &want, usage);
        self.decided(
            &format!("{vm}@{}", info.name),
            format!("VM {vm} on {}: {what} in {cgroup}{used}", info.name),
        );
        let since = self
            .applied
            .get(&key)
            .map(|a| a.since)
            .unwrap_or_else(Instant::now);
        let pid = if pid != 0 {
            pid
        } else {
            self.applied.get(&key).map_or(0, |a| a.pid)
        };
        self.applied.insert(
            key,
            Applied {
                cgroup,
                pid,
                limits: want,
                since,
                qemu: None,
            },
        );
    }

    /// Takes a VM's limit on a device away (`a`, no longer applied): from QEMU or its cgroup,
    /// and says so with why (`gone`: no I/O from it on the device any more).
    fn remove_limit(&mut self, vm: &str, info: &DeviceInfo, gone: bool, a: Applied) {
        self.decisions_total += 1;
        let where_ = match &a.qemu {
            Some(q) => {
                let outcome = self.release_qemu(vm, info, q);
                format!(
                    "in QEMU on disk(s) {}: {outcome}",
                    q.disks
                        .iter()
                        .map(|d| d.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
            None => {
                self.clear_cgroup_limit(vm, info, &a.cgroup);
                format!("cgroup {}", a.cgroup)
            }
        };
        let why = if gone {
            "no I/O from it on the device any more: VM stopped or gone"
        } else {
            "under its share"
        };
        self.decided(
            &format!("{vm}@{}", info.name),
            format!(
                "VM {vm} on {}: limit removed ({why}; was {}, {where_})",
                info.name,
                describe(&a.limits)
            ),
        );
    }

    /// Logs a restart of a limited VM (a new process while the old one is gone): the same VM,
    /// whose limit moves to its new process. Its own subject: a restart is rare and must not
    /// be held back behind the VM's limit changes.
    fn note_restart(&mut self, key: &(String, u32), info: &DeviceInfo, pid: u32) {
        let Some(old) = self.applied.get(key).map(|a| a.pid).filter(|old| {
            *old != 0
                && pid != 0
                && *old != pid
                && qemu_actuator::running_start_time(*old).is_none()
        }) else {
            return;
        };
        let vm = &key.0;
        self.decided(
            &format!("restart {vm}@{}", info.name),
            format!(
                "VM {vm} on {}: restarted (pid {old}, now {pid}): the same VM, its limit moves \
                 to its new process",
                info.name
            ),
        );
    }

    /// The cgroup to write a VM's limit in: the one the kernel charges its I/O to, or, when
    /// that one is shared (the root, other processes), the VM's own one overkvm moves it into
    /// (`manage_cgroups`). None (a problem, logged once) when it cannot be limited alone.
    fn cgroup_to_limit(
        &mut self,
        key: &(String, u32),
        usage: Option<&VmUse>,
        pid: u32,
    ) -> Option<String> {
        let vm = key.0.as_str();
        let cgroup = match (usage.and_then(|u| u.cgroup.clone()), self.applied.get(key)) {
            (Some(c), _) => c,
            (None, Some(a)) => a.cgroup.clone(),
            (None, None) => {
                self.problem(
                    &format!("nocg-{vm}"),
                    format!("VM {vm}: its I/O cgroup is unknown, cannot limit it"),
                );
                return None;
            }
        };
        let shared_with = self.sharing.shared_with(&cgroup, vm, pid);
        if cgroup != "/" && shared_with.is_empty() {
            return Some(cgroup);
        }
        let others = if cgroup == "/" {
            "the whole host (root cgroup)".to_string()
        } else {
            shared_with.join(", ")
        };
        if !self.manage_cgroups || pid == 0 || self.dry_run {
            self.problem(
                &format!("shared-{vm}"),
                format!(
                    "VM {vm} shares cgroup {cgroup} with {others}: it cannot be limited alone \
                     (set [policy] manage_cgroups = true to move it into a cgroup of its own)"
                ),
            );
            return None;
        }
        match self.adopt(vm, pid, &cgroup) {
            Ok(c) => Some(c),
            Err(e) => {
                self.problem(
                    &format!("adopt-{vm}"),
                    format!("moving VM {vm} into its own cgroup: {e:#}"),
                );
                None
            }
        }
    }

    /// Writes a limit into a cgroup, on record first: a crash must never leave a limit nobody
    /// knows to remove. False when it was not written (a cgroup gone, a problem); true in a
    /// dry run.
    fn write_cgroup_limit(
        &mut self,
        key: &(String, u32),
        info: &DeviceInfo,
        cgroup: &str,
        want: &Limits,
    ) -> bool {
        let Some(act) = self.act.clone().filter(|_| !self.dry_run) else {
            return true;
        };
        let vm = key.0.as_str();
        let (major, minor) = (info.major, info.minor);
        if self.state.note_limit(cgroup, major, minor) && !self.save_state() {
            self.state.forget_limit(cgroup, major, minor);
            return false;
        }
        let Err(e) = act.apply(cgroup, major, minor, want) else {
            return true;
        };
        if matches!(e, LimitError::Gone { .. }) {
            // The cgroup vanished under us (VM stopped): nothing to keep, nothing degraded.
            self.vanished(vm, cgroup);
            self.state.forget_limit(cgroup, major, minor);
            self.save_state();
            self.applied.remove(key);
        } else {
            self.problem(
                &format!("apply-{vm}-{cgroup}"),
                format!("limiting VM {vm} ({cgroup}) on {}: {e:#}", info.name),
            );
        }
        false
    }

    /// Moves a VM's qemu into `/overkvm/<name>`, recording how to undo it.
    fn adopt(&mut self, vm: &str, pid: u32, from: &str) -> anyhow::Result<String> {
        let act = self.act.clone().context("no cgroup controller")?;
        let start_time = crate::host::proc::start_time(pid).context("the VM's process is gone")?;
        let to = act.adopt(vm, pid)?;
        if !self.state.created.contains(&"/overkvm".to_string()) {
            self.state.created.push("/overkvm".into());
        }
        if !self.state.created.contains(&to) {
            self.state.created.push(to.clone());
        }
        self.state.moved.push(MovedProcess {
            pid,
            start_time,
            from: from.to_string(),
            to: to.clone(),
        });
        self.save_state();
        log::info!("moved VM {vm} (pid {pid}) from {from} into {to}");
        Ok(to)
    }

    fn view(&self) -> ThrottleView {
        ThrottleView {
            dry_run: self.dry_run,
            budgets: self
                .devices
                .iter()
                .map(|m| BudgetUse {
                    device: m.info.name.clone(),
                    storage: m.storage.is_some(),
                    iops_budget: match m.iops {
                        Some(Budget::Total(b)) => Some(b as u64),
                        Some(Budget::PerDirection { read, write }) => {
                            Some((read.unwrap_or(0.0) + write.unwrap_or(0.0)) as u64)
                        }
                        None => None,
                    },
                    iops_used: m.used_iops,
                    engaged: m.ctl_iops.engaged || m.ctl_bps.engaged,
                    latency_target_us: m.latency.map(|(t, _)| t),
                    // A storage budget's latency is a mean, at no percentile.
                    latency_percentile: m
                        .latency
                        .filter(|_| m.storage.is_none())
                        .map(|(_, q)| q * 100.0),
                    latency_us: m
                        .latency
                        .and(m.ctl_latency.latency_us)
                        .map(|l| (l * 10.0).round() / 10.0),
                    capacity_iops: m.ctl_latency.capacity.map(f64::round),
                    latency_window_iops: m.ctl_latency.window.map(f64::round),
                })
                .collect(),
            limits: self
                .applied
                .iter()
                .map(|((vm, dev), a)| ActiveLimit {
                    vm: vm.clone(),
                    cgroup: a.cgroup.clone(),
                    device: self
                        .devices
                        .iter()
                        .find(|m| m.info.dev == *dev)
                        .map(|m| m.info.name.clone())
                        .unwrap_or_default(),
                    riops: a.limits.riops,
                    wiops: a.limits.wiops,
                    rbps: a.limits.rbps,
                    wbps: a.limits.wbps,
                    since_s: a.since.elapsed().as_secs_f64(),
                    qemu_disks: a
                        .qemu
                        .as_ref()
                        .map(|q| q.disks.iter().map(|d| d.name().to_string()).collect()),
                })
                .collect(),
            decisions_total: self.decisions_total,
            throttled_seconds_total: self.throttled_seconds,
            problems: self.problems.iter().map(|(_, m)| m.clone()).collect(),
            qemu_limits: self
                .qemu
                .shown(&self.state.qemu)
                .into_iter()
                .map(|(vm, disks)| crate::tick::VmQemuLimits { vm, disks })
                .collect(),
            // Filled from the interval's report in `on_tick`.
            storage: Vec::new(),
        }
    }

    /// Removes every limit this service set, moves adopted VMs back, removes its cgroups.
    pub fn shutdown(&mut self) {
        if self.dry_run {
            return;
        }
        let Some(act) = self.act.clone() else {
            return;
        };
        let failed = state::undo(&self.state, act.as_ref());
        for f in &failed {
            log::error!("could not undo on exit: {f}");
        }
        if failed.is_empty() {
            self.state = ThrottleState {
                root: act.root().to_path_buf(),
                ..ThrottleState::default()
            };
            let _ = std::fs::remove_file(&self.state_path);
        } else {
            self.save_state();
        }
        let _ = std::fs::remove_file(&self.status_path);
        self.applied.clear();
        log::info!("throttle stopped: limits removed");
    }
}

/// `overkvm-io throttle reset`: undo what a (stopped or crashed) daemon left, without it.
pub fn reset(config: &Config) -> anyhow::Result<String> {
    let path = state_path(config);
    let old = ThrottleState::load(&path)?;
    if old.is_empty() {
        let _ = std::fs::remove_file(&path);
        return Ok(format!(
            "nothing to undo ({} is empty or absent)",
            path.display()
        ));
    }
    let act = Actuator::for_host()?;
    let failed = state::undo(&old, &act);
    if !failed.is_empty() {
        bail!("could not undo everything:\n  {}", failed.join("\n  "));
    }
    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    Ok(format!(
        "removed {} limit(s), moved back {} process(es), removed {} cgroup(s), put back the \
         QEMU settings of {} disk(s)",
        old.limits.len(),
        old.moved.len(),
        old.created.len(),
        old.qemu.len()
    ))
}

/// What `throttle status` shows.
#[derive(Debug, serde::Serialize)]
pub struct Status {
    pub budgets: Vec<DeviceBudgetSpec>,
    /// Last tick of a running daemon (None when no daemon has written one).
    pub daemon: Option<ThrottleView>,
    /// Limits recorded as written (what `reset` would remove).
    pub recorded: ThrottleState,
}

pub fn status(config: &Config) -> anyhow::Result<Status> {
    Ok(Status {
        budgets: config
            .devices
            .iter()
            .chain(&config.storage)
            .cloned()
            .collect(),
        daemon: status_file::read_status(config),
        recorded: ThrottleState::load(&state_path(config))?,
    })
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    /// Without `[latency]` the controller runs on exactly its built-in knobs; with it, the
    /// keys given replace theirs and nothing else moves.
    #[test]
    fn latency_knobs_are_the_defaults_unless_configured() {
        assert_eq!(latency_knobs(&Config::default()), LatencyKnobs::default());
        let c = Config::parse("[policy]\nengage_ticks = 5\n").unwrap();
        assert_eq!(latency_knobs(&c), LatencyKnobs::default());
        // The shipped example writes out every `[latency]` key at its default.
        let c = Config::parse(include_str!("../../../examples/overkvm.toml")).unwrap();
        assert!(c.latency.engage_ticks.is_some() && c.latency.drain_ticks.is_some());
        assert_eq!(latency_knobs(&c), LatencyKnobs::default());
        let c = Config::parse(
            "[latency]\nengage_ticks = 3\nrelease_ticks = 20\nrelease_below = 0.4\n\
             min_completions = 8\nsetpoint = 0.95\nfloor_iops = 50\nmin_fraction = 0.1\n\
             drain_ticks = 1\n",
        )
        .unwrap();
        assert_eq!(
            latency_knobs(&c),
            LatencyKnobs {
                engage_ticks: 3,
                release_ticks: 20,
                release_below: 0.4,
                min_completions: 8,
                setpoint: 0.95,
                floor: 50.0,
                min_fraction: 0.1,
                drain_ticks: 1,
                ..LatencyKnobs::default()
            }
        );
    }

    pub(super) fn bare_service(state_path: PathBuf) -> ThrottleService {
        ThrottleService {
            config: Config::default(),
            knobs: Knobs::default(),
            dry_run: false,
            manage_cgroups: false,
            act: None,
            status_path: state_path.with_file_name("status.json"),
            state_path,
            state: ThrottleState::default(),
            devices: Vec::new(),
            table: DeviceTable::new(),
            applied: BTreeMap::new(),
            decisions_total: 0,
            throttled_seconds: 0.0,
            problems: VecDeque::new(),
            warned: HashSet::new(),
            log_limit: LogLimiter::default(),
            mode: ActuatorMode::Auto,
            qemu: QemuSide::default(),
            sharing: SharingMemory::default(),
            identities: BTreeMap::new(),
        }
    }

    /// The block controller as the apply step sees it, in memory: limits by (cgroup, disk).
    #[derive(Default)]
    struct FakeWriter {
        limits: std::sync::Mutex<BTreeMap<(String, u32, u32), Limits>>,
    }

    impl LimitWriter for FakeWriter {
        fn api(&self) -> crate::host::cgroup::IoController {
            crate::host::cgroup::IoController::V2
        }
        fn root(&self) -> &std::path::Path {
            std::path::Path::new("/fake")
        }
        fn read(&self, cgroup: &str, major: u32, minor: u32) -> anyhow::Result<Limits> {
            let m = self.limits.lock().unwrap();
            Ok(m.get(&(cgroup.to_string(), major, minor))
                .copied()
                .unwrap_or_default())
        }
        fn apply(
            &self,
            cgroup: &str,
            major: u32,
            minor: u32,
            l: &Limits,
        ) -> Result<(), LimitError> {
            limits::check_cgroup_path(cgroup)?;
            let mut m = self.limits.lock().unwrap();
            let key = (cgroup.to_string(), major, minor);
            if l.is_unlimited() {
                m.remove(&key);
            } else {
                m.insert(key, *l);
            }
            Ok(())
        }
        fn adopt(&self, _: &str, _: u32) -> anyhow::Result<String> {
            bail!("not in this test")
        }
        fn move_process(&self, _: &str, _: u32) -> anyhow::Result<()> {
            bail!("not in this test")
        }
        fn remove_cgroup(&self, _: &str) -> anyhow::Result<()> {
            bail!("not in this test")
        }
    }

    /// Aggregate, decide and apply without root: two VMs over a device's budget get limits in
    /// their own cgroups (recorded in the state file first), within the budget and weighted
    /// 2:1, and lose them once the load stops.
    #[test]
    fn over_budget_vms_are_limited_in_their_cgroups_recorded_and_released() {
        let dir = tempfile::tempdir().unwrap();
        let sysfs = crate::devices::fake_sysfs("thr-apply");
        let mut svc = bare_service(dir.path().join("throttle.json"));
        let fake = Arc::new(FakeWriter::default());
        svc.act = Some(fake.clone());
        svc.table = DeviceTable::with_sysfs(&sysfs);
        svc.config.vms.push(crate::config::VmRule {
            name: Some("a".into()),
            uuid: None,
            manager: None,
            weight: Some(2.0),
            reservation_iops: None,
            exempt: false,
        });
        let info = svc.table.resolve_disk("vda").unwrap();
        svc.devices.push(Managed {
            info,
            iops: Some(Budget::Total(300.0)),
            bps: None,
            ctl_iops: DeviceController::default(),
            ctl_bps: DeviceController::default(),
            used_iops: 0.0,
            latency: None,
            ctl_latency: LatencyController::default(),
            storage: None,
        });
        let tick = |svc: &mut ThrottleService, ops: u64| {
            let rows = ["a", "b"]
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    let mut r = crate::testdata::vm_process(n, 100 + i as u32, "vda", 0, ops);
                    (r.major, r.minor) = (254, 0);
                    r.io_cgroup = Some(format!("/machine/{n}"));
                    r
                })
                .collect();
            svc.on_tick(&crate::testdata::report_with(rows))
        };
        for _ in 0..12 {
            tick(&mut svc, 1000);
        }
        let written = fake.limits.lock().unwrap().clone();
        let w = |n: &str| {
            written[&(format!("/machine/{n}"), 254, 0)]
                .wiops
                .unwrap_or(0)
        };
        assert_eq!(written.len(), 2, "{written:?}");
        let (a, b) = (w("a") as f64, w("b") as f64);
        assert!(a + b <= 300.0 * 1.02 && a + b >= 300.0 * 0.9, "a={a} b={b}");
        assert!((1.8..=2.2).contains(&(a / b)), "weight 2: a={a} b={b}");
        let recorded = ThrottleState::load(&svc.state_path).unwrap();
        assert_eq!(recorded.limits.len(), 2, "every limit is on record");
        assert_eq!(svc.view().limits.len(), 2);
        for _ in 0..40 {
            tick(&mut svc, 0);
        }
        assert!(fake.limits.lock().unwrap().is_empty(), "released");
        assert!(
            ThrottleState::load(&svc.state_path)
                .unwrap()
                .limits
                .is_empty()
        );
        std::fs::remove_dir_all(&sysfs).unwrap();
    }

    /// A storage budget sums the QEMU-counted disks its target covers (and no other I/O),
    /// engages over its budget, and never writes a cgroup limit: a VM whose QEMU overkvm
    /// cannot reach is reported as not limited.
    #[test]
    fn a_storage_budget_counts_its_targets_disks_and_never_limits_a_cgroup() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::parse(
            "[[storage]]\ntarget = \"nbd://127.0.0.1:10809\"\niops = 300\nbps = 3000000\n",
        )
        .unwrap();
        let mut svc = bare_service(dir.path().join("throttle.json"));
        let fake = Arc::new(FakeWriter::default());
        svc.act = Some(fake.clone());
        svc.config.vms.push(crate::config::VmRule {
            name: Some("a".into()),
            uuid: None,
            manager: None,
            weight: Some(2.0),
            reservation_iops: None,
            exempt: false,
        });
        let target = crate::storage_target::StorageTarget::parse("nbd://127.0.0.1:10809").unwrap();
        svc.devices.push(Managed {
            info: Arc::new(storage::budget_key(0, &target)),
            iops: iops_budget(&config.storage[0]),
            bps: bps_budget(&config.storage[0]),
            ctl_iops: DeviceController::default(),
            ctl_bps: DeviceController::default(),
            used_iops: 0.0,
            latency: None,
            ctl_latency: LatencyController::default(),
            storage: Some(StorageBudget::new(target)),
        });
        let row = |n: &str, pid: u32, target: &str, ops: u64| {
            let mut r = crate::testdata::vm_process(n, pid, "nbd0", 0, ops);
            (r.major, r.minor) = (0, 0);
            r.source = crate::report::CountSource::Qemu;
            r.target = Some(target.into());
            r
        };
        // Pids above pid_max: no qemu of theirs can be reached.
        for _ in 0..12 {
            let rows = vec![
                row("a", u32::MAX - 1, "nbd://127.0.0.1:10809/exp", 400),
                row("b", u32::MAX - 2, "nbd://127.0.0.1:10809/exp", 400),
                // Another server, and a local disk: not the budget's.
                row("c", u32::MAX - 3, "nbd://127.0.0.1:10810/exp", 5000),
                crate::testdata::vm_process("d", u32::MAX - 4, "vda", 0, 5000),
            ];
            svc.on_tick(&crate::testdata::report_with(rows));
        }
        let view = svc.view();
        assert_eq!(view.budgets[0].device, "nbd://127.0.0.1:10809");
        assert_eq!(view.budgets[0].iops_used, 800.0, "a and b only");
        assert!(view.budgets[0].engaged);
        // The controller's shares follow the weights as on a device (2:1 here).
        let held = |vm: &str| {
            let l = &svc.devices[0].ctl_iops.limits[vm];
            l.write as f64
        };
        let (a, b) = (held("a"), held("b"));
        assert!(a + b <= 300.0 * 1.02 && a + b >= 300.0 * 0.9, "a={a} b={b}");
        assert!((1.8..=2.2).contains(&(a / b)), "weight 2: a={a} b={b}");
        // Bytes too: a and b write 1.6 MB/s each, 3 MB/s between them; a's weighted share
        // (2 MB/s) covers its use, b is held to the rest.
        let m = &svc.devices[0];
        assert!(m.ctl_bps.engaged);
        assert!(
            !m.ctl_bps.limits.contains_key("a"),
            "{:?}",
            m.ctl_bps.limits
        );
        let b_bps = m.ctl_bps.limits["b"].write as f64;
        assert!(
            (1.6e6 + b_bps) <= 3.0e6 * 1.02 && b_bps >= 1.0e6,
            "b held to {b_bps} B/s"
        );
        assert!(fake.limits.lock().unwrap().is_empty(), "no cgroup limit");
        assert!(svc.applied.is_empty());
        assert!(
            view.problems
                .iter()
                .any(|p| p.contains("VM a on nbd://127.0.0.1:10809") && p.contains("not limited")),
            "{:?}",
            view.problems
        );
    }

    /// A held VM restarted (its qemu exits, a new one with the same name and uuid starts in a
    /// new cgroup) is the same VM: its limit moves to the new cgroup at once, even where its
    /// value stays within the deadband, and none is left on the old one or on record.
    #[test]
    fn a_restarted_vms_limit_moves_to_its_new_cgroup() {
        let dir = tempfile::tempdir().unwrap();
        let sysfs = crate::devices::fake_sysfs("thr-restart");
        let mut svc = bare_service(dir.path().join("throttle.json"));
        let fake = Arc::new(FakeWriter::default());
        svc.act = Some(fake.clone());
        svc.table = DeviceTable::with_sysfs(&sysfs);
        let info = svc.table.resolve_disk("vda").unwrap();
        svc.devices.push(Managed {
            info,
            iops: Some(Budget::Total(300.0)),
            bps: None,
            ctl_iops: DeviceController::default(),
            ctl_bps: DeviceController::default(),
            used_iops: 0.0,
            latency: None,
            ctl_latency: LatencyController::default(),
            storage: None,
        });
        // PIDs above pid_max: no process of this host is taken for these VMs.
        let vm = |n: &str, pid: u32, cg: &str, exited: bool| {
            let mut r = crate::testdata::vm_process(n, pid, "vda", 0, 1000);
            (r.major, r.minor) = (254, 0);
            r.vm.as_mut().unwrap().uuid = Some(format!("uuid-{n}"));
            r.io_cgroup = Some(cg.into());
            r.exited = exited;
            r
        };
        let (a1, a2, b) = (u32::MAX - 10, u32::MAX - 11, u32::MAX - 12);
        for _ in 0..12 {
            svc.on_tick(&crate::testdata::report_with(vec![
                vm("a", a1, "/machine/a-1", false),
                vm("b", b, "/machine/b", false),
            ]));
        }
        let limit = |cg: &str| {
            fake.limits
                .lock()
                .unwrap()
                .get(&(cg.into(), 254, 0))
                .copied()
        };
        let before = limit("/machine/a-1").expect("a is limited");
        // The interval a restarts in: its former qemu's last I/O and the new one's.
        svc.on_tick(&crate::testdata::report_with(vec![
            vm("a", a1, "/machine/a-1", true),
            vm("a", a2, "/machine/a-2", false),
            vm("b", b, "/machine/b", false),
        ]));
        assert_eq!(limit("/machine/a-1"), None, "none left on the old cgroup");
        let after = limit("/machine/a-2").expect("the limit moved to the new cgroup");
        let w = |l: Limits| l.wiops.unwrap_or(0) as f64;
        assert!(
            (w(after) - w(before)).abs() <= w(before) * 0.3,
            "the same VM keeps its share: {before:?} then {after:?}"
        );
        let recorded: Vec<String> = ThrottleState::load(&svc.state_path)
            .unwrap()
            .limits
            .into_iter()
            .map(|l| l.cgroup)
            .collect();
        assert!(
            recorded.contains(&"/machine/a-2".to_string()),
            "{recorded:?}"
        );
        assert!(
            !recorded.contains(&"/machine/a-1".to_string()),
            "{recorded:?}"
        );
        assert_eq!(
            svc.applied[&("a".to_string(), svc.devices[0].info.dev)].pid,
            a2
        );
        // Deleted and created again under its name (another uuid): a new VM. The former one's
        // limit goes from its cgroup; the new one starts afresh (limited again on its own
        // demand, in its own cgroup).
        let mut again = vm("a", a1 - 100, "/machine/a-3", false);
        again.vm.as_mut().unwrap().uuid = Some("uuid-another-a".into());
        svc.on_tick(&crate::testdata::report_with(vec![
            again,
            vm("b", b, "/machine/b", false),
        ]));
        assert_eq!(limit("/machine/a-2"), None, "the former VM's limit went");
        for _ in 0..4 {
            let mut again = vm("a", a1 - 100, "/machine/a-3", false);
            again.vm.as_mut().unwrap().uuid = Some("uuid-another-a".into());
            svc.on_tick(&crate::testdata::report_with(vec![
                again,
                vm("b", b, "/machine/b", false),
            ]));
        }
        assert!(
            limit("/machine/a-3").is_some(),
            "the new VM is held on its own"
        );
        std::fs::remove_dir_all(&sysfs).unwrap();
    }

    #[test]
    fn a_limit_is_misplaced_after_a_restart_or_an_actuator_change_only() {
        let held = |pid, running, by_qemu| Placed {
            pid,
            running,
            by_qemu,
        };
        assert!(!misplaced(held(10, true, false), 10, false));
        assert!(
            !misplaced(held(10, false, false), 0, false),
            "no living process: nowhere to move"
        );
        assert!(
            !misplaced(held(0, false, false), 10, false),
            "placed for an unknown process"
        );
        assert!(misplaced(held(10, false, false), 11, false), "restarted");
        assert!(
            !misplaced(held(10, true, false), 11, false),
            "a second process of the VM while the first runs"
        );
        assert!(
            misplaced(held(10, true, false), 10, true),
            "its cgroup became shared"
        );
        assert!(
            misplaced(held(10, true, true), 10, false),
            "its cgroup is alone again"
        );
    }

    #[test]
    fn a_state_save_failure_is_one_problem_until_saving_works_again() {
        // Under a regular file: ENOTDIR, even for root.
        let mut svc = bare_service(PathBuf::from("/proc/version/overkvm/throttle.json"));
        assert!(!svc.save_state());
        assert!(!svc.save_state());
        assert_eq!(svc.view().problems.len(), 1, "{:?}", svc.view().problems);
        assert!(svc.view().problems[0].contains("cannot save throttle state"));
        let dir = std::env::temp_dir().join(format!("overkvm-thr-save-{}", std::process::id()));
        svc.state_path = dir.join("throttle.json");
        assert!(svc.save_state());
        assert!(
            svc.view().problems.is_empty(),
            "resolved problems leave the list"
        );
        assert!(
            !svc.warned.contains("state-save"),
            "a new failure is logged again"
        );
        svc.state_path = PathBuf::from("/proc/version/x.json");
        assert!(!svc.save_state());
        assert_eq!(svc.view().problems.len(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_vanished_cgroup_is_noted_once_and_is_not_a_problem() {
        let mut svc = bare_service(PathBuf::from("/nonexistent/throttle.json"));
        for _ in 0..5 {
            svc.vanished("vmA", "/machine/vmA-1");
        }
        assert_eq!(svc.warned.len(), 1);
        assert!(svc.view().problems.is_empty());
        for i in 0..5000 {
            svc.vanished("vmB", &format!("/machine/vmB-{i}"));
        }
        assert!(svc.warned.len() <= 4097, "bounded: {}", svc.warned.len());
    }

    #[test]
    fn budgets_from_specs() {
        let spec = |iops, r, w| DeviceBudgetSpec {
            device: "x".into(),
            iops,
            read_iops: r,
            write_iops: w,
            ..DeviceBudgetSpec::default()
        };
        assert_eq!(
            iops_budget(&spec(Some(10), None, None)),
            Some(Budget::Total(10.0))
        );
        assert_eq!(
            iops_budget(&spec(None, Some(5), None)),
            Some(Budget::PerDirection {
                read: Some(5.0),
                write: None
            })
        );
        assert_eq!(iops_budget(&spec(None, None, None)), None);
    }

    #[test]
    fn decision_lines_say_what_changed_in_an_operators_words() {
        let l = |r: Option<u64>, w: Option<u64>| Limits {
            riops: r,
            wiops: w,
            rbps: None,
            wbps: None,
        };
        assert_eq!(describe(&l(Some(990), Some(20))), "riops=990 wiops=20");
        assert_eq!(describe(&l(None, Some(20))), "wiops=20");
        assert_eq!(describe(&Limits::default()), "none");
        let a = l(Some(500), Some(500));
        assert_eq!(change_word(&a, &l(Some(400), Some(500))), "tightened");
        assert_eq!(change_word(&a, &l(Some(400), None)), "changed");
        assert_eq!(change_word(&a, &l(Some(600), None)), "relaxed");
        assert_eq!(
            change_word(&l(None, Some(5)), &l(Some(5), Some(5))),
            "tightened"
        );
        assert_eq!(
            describe_budget(Some(Budget::Total(3000.0)), None),
            "budget 3000 IOPS"
        );
        assert_eq!(
            describe_budget(
                Some(Budget::PerDirection {
                    read: None,
                    write: Some(200.0)
                }),
                Some(Budget::Total(1e6))
            ),
            "budget w 200 IOPS, 1000000 B/s"
        );
    }

    #[test]
    fn limits_map_unlimited_directions_to_none() {
        let l = limits_of(
            Some(&DirLimits {
                read: 100,
                write: u64::MAX,
            }),
            None,
        );
        assert_eq!(
            l,
            Limits {
                riops: Some(100),
                wiops: None,
                rbps: None,
                wbps: None
            }
        );
        assert!(limits_of(None, None).is_unlimited());
    }
}
