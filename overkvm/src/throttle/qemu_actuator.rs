//! QEMU's own disk throttling (`block_set_io_throttle`) as the throttle's second actuator.
//!
//! A cgroup cannot hold every VM: on cgroup v1 `blkio` a disk with the host page cache in
//! between (`cache=writeback`, libvirt's and QEMU's default) is written back by the kernel's
//! flusher threads, charged to the root cgroup, so a limit on the VM's cgroup never sees those
//! writes; and VMs that share a cgroup cannot be limited one by one. QEMU throttles inside the
//! VM's own block layer, before the page cache, whoever writes back later.
//!
//! Only through the owner of the monitor: overkvm's own VMs over their QMP socket (overkvm
//! started them and owns it), libvirt's domains through `virsh blkdeviotune --live` (libvirt
//! owns their monitor; talking to it behind libvirt's back would be undone by libvirt and
//! confuse it). Other VMs (plain qemu, Proxmox, KubeVirt) keep the cgroup actuator.
//!
//! An operator's (or Nova's, or Proxmox's) limits on a disk are read before overkvm first
//! touches it and recorded in the state file with overkvm's own; overkvm then writes the
//! tighter of the two per field ([`engage`]) and puts the operator's settings back when it lets
//! go, on SIGTERM, at the next start after a crash and with `throttle reset`, with what someone
//! else changed while overkvm held the disk kept as theirs ([`adopt`]).
//!
//! The choice of actuator ([`choose`]), the combination of limits ([`engage`]) and the split
//! over several disks ([`split`]) are pure; `QemuSide` is the thin layer that talks to QMP and
//! virsh, with a cache of what each VM's disks are (re-read every [`FACTS_REFRESH`], never on
//! every tick). What QEMU and libvirt answer is parsed in `qemu` (`limits`, `backing`,
//! `libvirt`), once for every user.

use std::{
    collections::HashMap,
    os::unix::fs::{FileTypeExt as _, MetadataExt as _},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use overkvm_common::make_dev;
use serde::{Deserialize, Serialize};

use crate::host::cgroup::limits::Limits;
use crate::{
    config::ActuatorMode,
    identity::{Manager, managers},
    qemu::{
        backing::{DiskCounters, counters_of},
        libvirt::{self, DomainStats},
        limits::{
            DiskLimits, DiskRef, QemuDisk, QemuThrottle, SETTINGS, disks_from_libvirt_xml,
            disks_from_query_block, family,
        },
        qmp::{OwnVms, Qmp},
    },
    report::VmRef,
};

/// How often a VM's disks (names, files, cache mode, QEMU limits) are re-read. Reading them
/// costs a QMP round trip (overkvm's VMs) or a status XML read (libvirt), so not every tick.
pub const FACTS_REFRESH: Duration = Duration::from_secs(30);

/// How long after a held VM's qemu exited its restart is looked for, and how often: a VM's
/// manager restarts it within seconds; reading every VM's facts each tick for that long
/// would cost a libvirt host thousands of status files a second.
pub const RESTART_WATCH: Duration = Duration::from_secs(60);
pub const RESTART_REFRESH: Duration = Duration::from_secs(2);

/// Timeout of one QMP exchange.
const QMP_TIMEOUT: Duration = Duration::from_secs(2);
/// Timeout of one virsh run of the throttle (reading or writing a domain's limits, its
/// counters): these run on the control tick, which a hung libvirtd must delay by this long at
/// most, never stop. Longer than the counters' own: libvirt takes a domain's job lock for a
/// `blkdeviotune --live`, which may wait for another job on that domain to end.
const VIRSH_TIMEOUT: Duration = Duration::from_secs(5);
/// After a failed write through a monitor's owner, writes through it wait this long: a hung
/// libvirtd must not stall every control tick by a virsh timeout.
const WRITE_BACKOFF: Duration = Duration::from_secs(10);

/// Who can change a VM's QEMU limits for overkvm.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Control {
    /// overkvm's own VM: its QMP socket.
    Qmp { socket: PathBuf },
    /// A libvirt domain: `virsh blkdeviotune` on it.
    Libvirt { domain: String },
}

impl Control {
    pub fn describe(&self) -> String {
        match self {
            Control::Qmp { socket } => format!("QMP {}", socket.display()),
            Control::Libvirt { domain } => format!("libvirt domain {domain}"),
        }
    }
}

/// The counters the throttle's guest rates are made of: (read ops, write ops, read bytes,
/// write bytes).
fn ops_and_bytes(c: &DiskCounters) -> [u64; 4] {
    [c.rd_operations, c.wr_operations, c.rd_bytes, c.wr_bytes]
}

/// What decides the actuator of one VM on one device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActuatorFacts {
    pub mode: ActuatorMode,
    /// The host's block controller is cgroup v1 `blkio`.
    pub cgroup_v1: bool,
    /// A disk of the VM on this device goes through the host page cache.
    pub host_cache: bool,
    /// The VM's cgroup is the root or holds other processes.
    pub shared_cgroup: bool,
    /// `[policy] manage_cgroups`: a shared cgroup is solved by moving the VM instead.
    pub manage_cgroups: bool,
    /// overkvm can set QEMU limits on the VM's disks on this device (its own VM over QMP, a
    /// libvirt domain through virsh, with at least one disk on the device).
    pub qemu_reachable: bool,
}

/// Which actuator holds a VM, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    Cgroup,
    Qemu(&'static str),
}

/// The actuator for one VM on one device. `auto` takes QEMU only where the cgroup cannot act:
/// host-cached writes on a v1 host (blkio never sees them), or a shared cgroup that overkvm
/// is not allowed to split (`manage_cgroups` off). QEMU is never chosen when overkvm cannot
/// reach the VM's monitor through its owner.
pub fn choose(f: &ActuatorFacts) -> Choice {
    if f.mode == ActuatorMode::Cgroup || !f.qemu_reachable {
        return Choice::Cgroup;
    }
    if f.mode == ActuatorMode::Qemu {
        return Choice::Qemu("actuator = \"qemu\"");
    }
    if f.cgroup_v1 && f.host_cache {
        return Choice::Qemu("its disk uses the host page cache, which v1 blkio cannot limit");
    }
    if f.shared_cgroup && !f.manage_cgroups {
        return Choice::Qemu("it shares its cgroup");
    }
    Choice::Cgroup
}

/// overkvm's per-VM limit on a device divided over the VM's `n` disks on it (rounded up,
/// never 0), so that together they do not exceed it.
pub fn split(l: &Limits, n: usize) -> Limits {
    let n = n.max(1) as u64;
    let d = |v: Option<u64>| v.map(|v| v.div_ceil(n).max(1));
    Limits {
        riops: d(l.riops),
        wiops: d(l.wiops),
        rbps: d(l.rbps),
        wbps: d(l.wbps),
    }
}

/// Clears the burst of a rate (`iops_rd` → `iops_rd_max`, `iops_rd_max_length`).
fn clear_burst(t: &mut QemuThrottle, rate: &str) {
    t.set(&format!("{rate}_max"), 0);
    t.set(&format!("{rate}_max_length"), 0);
}

/// One family (IOPS or bytes) of [`engage`].
fn engage_family(t: &mut QemuThrottle, prefix: &str, ours: (Option<u64>, Option<u64>)) {
    if ours == (None, None) {
        return;
    }
    let (total, rd, wr) = (
        prefix.to_string(),
        format!("{prefix}_rd"),
        format!("{prefix}_wr"),
    );
    let cap = |v: u64| (v > 0).then_some(v);
    let op_total = cap(t.get(&total));
    // The operator's per-direction caps; a total caps each direction too.
    let op_r = cap(t.get(&rd)).or(op_total);
    let op_w = cap(t.get(&wr)).or(op_total);
    let min = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let mut r = min(op_r, ours.0.map(|v| v.max(1)));
    let mut w = min(op_w, ours.1.map(|v| v.max(1)));
    if let Some(tot) = op_total {
        // QEMU takes a total or per-direction rates on a disk, never both: the directions
        // are scaled down together until they fit inside the operator's total.
        let (rv, wv) = (r.unwrap_or(tot), w.unwrap_or(tot));
        let sum = rv.saturating_add(wv);
        if sum > tot {
            let scale = |v: u64| ((v as u128 * tot as u128 / sum as u128) as u64).max(1);
            r = Some(scale(rv));
            w = Some(scale(wv));
        }
        t.set(&total, 0);
        clear_burst(t, &total);
    }
    for (k, v) in [(&rd, r), (&wr, w)] {
        let v = v.unwrap_or(0);
        if v != t.get(k) {
            t.set(k, v);
            // A burst above a rate overkvm lowered would let the guest past it.
            clear_burst(t, k);
        }
    }
}

/// The settings overkvm writes on a disk: per field the tighter of the operator's `original`
/// and overkvm's `ours`, the operator's bursts, size and group kept where overkvm did not
/// lower the rate. Never looser than `original` in any direction.
pub fn engage(original: &QemuThrottle, ours: &Limits) -> QemuThrottle {
    let mut t = original.clone();
    engage_family(&mut t, "iops", (ours.riops, ours.wiops));
    engage_family(&mut t, "bps", (ours.rbps, ours.wbps));
    t
}

/// A QEMU limit overkvm holds on one disk: what to put back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuLimitRecord {
    pub vm: String,
    pub pid: u32,
    /// Start time of the qemu process, so a reused PID is never touched.
    pub start_time: u64,
    pub control: Control,
    pub disk: DiskRef,
    /// The host disk (MAJ:MIN) the limit is for.
    pub major: u32,
    pub minor: u32,
    /// The disk's settings before overkvm touched it (the operator's): what goes back, but
    /// for what someone else changed while overkvm held the disk (see [`adopt`]).
    pub original: QemuThrottle,
    /// What overkvm last wrote on the disk: a setting that no longer reads so was changed by
    /// someone else (absent in state files of earlier versions: the original goes back
    /// verbatim).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub written: Option<QemuThrottle>,
}

/// The disk's own settings as its owner wants them now: the recorded original, except the
/// settings that no longer read what overkvm last wrote, which someone else (an operator,
/// `virsh blkdeviotune`, Nova) changed while overkvm held the disk: those are theirs now,
/// kept as they read. Returns them and the names of the settings taken over.
pub fn adopt(
    original: &QemuThrottle,
    written: Option<&QemuThrottle>,
    current: &QemuThrottle,
) -> (QemuThrottle, Vec<String>) {
    let Some(written) = written else {
        return (original.clone(), Vec::new());
    };
    let mut own = original.clone();
    let mut changed = Vec::new();
    for (k, _) in SETTINGS {
        if current.get(k) != written.get(k) {
            own.set(k, current.get(k));
            changed.push(k.to_string());
        }
    }
    if current.group != written.group {
        own.group = current.group.clone();
        changed.push("group".into());
    }
    (own, changed)
}

/// What overkvm takes to be on a disk after writing `wrote` and reading `read` back: its own
/// values for every setting, and the group as the disk reports it (QEMU names one when none is
/// given). Not the read values: a setting someone else changes between the write and the read
/// would then look like overkvm's, and be undone at release. None (unread): the original goes
/// back verbatim.
pub fn written_as(wrote: &QemuThrottle, read: Option<QemuThrottle>) -> Option<QemuThrottle> {
    read.map(|mut w| {
        for (k, _) in SETTINGS {
            w.set(k, wrote.get(k));
        }
        w
    })
}

/// The settings [`adopt`] took over, with the values they read now (`iops_wr=300`).
pub fn adopted_text(t: &QemuThrottle, changed: &[String]) -> String {
    changed
        .iter()
        .map(|k| match k.as_str() {
            "group" => format!("group={}", t.group.as_deref().unwrap_or("none")),
            k => format!("{k}={}", t.get(k)),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// What overkvm knows of one VM's disks (cached for [`FACTS_REFRESH`]).
#[derive(Clone, Debug)]
pub struct VmFacts {
    pub vm: String,
    pub uuid: Option<String>,
    pub manager: Manager,
    pub start_time: u64,
    pub control: Option<Control>,
    /// Each disk and the whole host disk (kernel dev_t) its image is on, when known.
    pub disks: Vec<(QemuDisk, Option<u32>)>,
    /// QEMU limits read from a manager's config where overkvm cannot act (Proxmox).
    pub shown_only: Vec<DiskLimits>,
}

impl VmFacts {
    /// The disks on host disk `dev`.
    pub fn disks_on(&self, dev: u32) -> Vec<&QemuDisk> {
        self.disks
            .iter()
            .filter(|(_, d)| *d == Some(dev))
            .map(|(q, _)| q)
            .collect()
    }
}

struct Cached {
    at: Instant,
    facts: VmFacts,
}

/// The impure side: reads VMs' disks, sets and restores QEMU limits, reads guest counters.
pub struct QemuSide {
    /// overkvm's own VMs (their QMP sockets are overkvm's), when the daemon gave them.
    pub own_vms: Option<Box<dyn OwnVms>>,
    /// QMP sockets the operator gave overkvm (`serve --qmp`): a qemu started with one of
    /// them is reached through it, for limits as for counters.
    pub given_sockets: Vec<PathBuf>,
    pub libvirt_run: PathBuf,
    pub pve_dir: PathBuf,
    cache: HashMap<u32, Cached>,
    /// Last guest counters per (pid, disk) for rates.
    counters: HashMap<(u32, String), (Instant, [u64; 4])>,
    last_discovery: Option<Instant>,
    /// Until when discovery runs every [`RESTART_REFRESH`] (a held VM's qemu exited: its
    /// restart is looked for).
    restarts_until: Option<Instant>,
    /// Until when writes through a monitor's owner (by [`Control::describe`]) wait.
    backoff: HashMap<String, Instant>,
}

impl Default for QemuSide {
    fn default() -> Self {
        QemuSide {
            own_vms: None,
            given_sockets: Vec::new(),
            libvirt_run: PathBuf::from(libvirt::RUN_DIR),
            pve_dir: PathBuf::from("/etc/pve/qemu-server"),
            cache: HashMap::new(),
            counters: HashMap::new(),
            last_discovery: None,
            restarts_until: None,
            backoff: HashMap::new(),
        }
    }
}

/// The whole disk (kernel dev_t, major << 20 | minor) an image file or block device is on.
fn host_disk_of(file: &str, table: &mut crate::devices::DeviceTable) -> Option<u32> {
    let meta = std::fs::metadata(file).ok()?;
    let raw = if meta.file_type().is_block_device() {
        meta.rdev()
    } else {
        meta.dev()
    };
    let info = table.get(make_dev(libc::major(raw), libc::minor(raw)));
    info.present.then_some(info.disk_dev)
}

/// The start time of a process that runs (a zombie does not: a daemonized qemu killed in a
/// container whose init does not reap stays one, its monitor closed).
pub fn running_start_time(pid: u32) -> Option<u64> {
    let stat = crate::host::proc::ProcessDir::host(pid).stat().ok()?;
    (!matches!(stat.state, 'Z' | 'X' | 'x')).then_some(stat.start_time)
}

/// Whether the process `pid` started at `start_time` still runs.
pub fn is_running(pid: u32, start_time: u64) -> bool {
    running_start_time(pid) == Some(start_time)
}

/// qemu's arguments from /proc/PID/cmdline.
fn read_args(pid: u32) -> Option<crate::identity::qemu::QemuArgs> {
    let argv = crate::host::proc::ProcessDir::host(pid).cmdline().ok()?;
    Some(crate::identity::qemu::QemuArgs::parse(&argv))
}

fn qmp(socket: &Path) -> anyhow::Result<Qmp> {
    Qmp::connect(socket, QMP_TIMEOUT).with_context(|| format!("QMP {}", socket.display()))
}

impl QemuSide {
    /// What overkvm knows of VM `vm` run by `pid` (cached; re-read after [`FACTS_REFRESH`]
    /// or when the PID belongs to another process now).
    pub fn facts(
        &mut self,
        vm: &VmRef,
        pid: u32,
        table: &mut crate::devices::DeviceTable,
    ) -> Option<&VmFacts> {
        let start_time = running_start_time(pid)?;
        let fresh = self.cache.get(&pid).is_some_and(|c| {
            c.facts.start_time == start_time
                && c.facts.vm == vm.name
                && c.at.elapsed() < FACTS_REFRESH
        });
        if !fresh {
            let mut facts = self.read_facts(&vm.name, pid, start_time, vm.manager, table);
            facts.uuid = vm.uuid.clone();
            facts.manager = vm.manager;
            self.cache.insert(
                pid,
                Cached {
                    at: Instant::now(),
                    facts,
                },
            );
        }
        self.cache.get(&pid).map(|c| &c.facts)
    }

    /// What is cached of the VM run by `pid`, however old.
    pub fn cached(&self, pid: u32) -> Option<&VmFacts> {
        self.cache.get(&pid).map(|c| &c.facts)
    }

    /// A VM's qemu exited while QEMU held it: for [`RESTART_WATCH`] discovery runs every
    /// [`RESTART_REFRESH`], so that its next qemu (a restart) is held as soon as it runs,
    /// even if it does no block I/O of its own (a host-cached VM's qemu may do none for
    /// minutes, and would be found only at the next regular discovery).
    pub fn look_for_restarts(&mut self) {
        self.restarts_until = Some(Instant::now() + RESTART_WATCH);
    }

    /// Finds the VMs overkvm can reach whether or not they did I/O (a host-cached VM's qemu
    /// may do none of its own for minutes): overkvm's running VMs and libvirt's domains, every
    /// [`FACTS_REFRESH`] (every [`RESTART_REFRESH`] while looking for restarts).
    pub fn discover(&mut self, table: &mut crate::devices::DeviceTable) {
        let watching = self.restarts_until.is_some_and(|t| Instant::now() < t);
        let every = if watching {
            RESTART_REFRESH
        } else {
            FACTS_REFRESH
        };
        if self.last_discovery.is_some_and(|t| t.elapsed() < every) {
            return;
        }
        self.last_discovery = Some(Instant::now());
        self.prune();
        let mut found: Vec<(VmRef, u32)> = Vec::new();
        for own in self.own_vms.iter().flat_map(|o| o.running()) {
            found.push((
                VmRef {
                    name: own.name,
                    uuid: own.uuid,
                    manager: Manager::Qemu,
                    namespace: None,
                },
                own.pid,
            ));
        }
        if let Ok(dir) = std::fs::read_dir(&self.libvirt_run) {
            for e in dir.flatten().take(4096) {
                let file = e.file_name().to_string_lossy().into_owned();
                let Some(domain) = file.strip_suffix(".xml") else {
                    continue;
                };
                let Some(xml) = self.libvirt_xml(domain) else {
                    continue;
                };
                if let Some(pid) = managers::domstatus_pid(&xml) {
                    found.push((
                        VmRef {
                            name: domain.to_string(),
                            uuid: managers::domain_uuid(&xml),
                            manager: Manager::Libvirt,
                            namespace: None,
                        },
                        pid,
                    ));
                }
            }
        }
        for (vm, pid) in found {
            // A qemu read while it was starting (its monitor not answering yet) has no disks:
            // while restarts are looked for it is read again.
            let unread = self
                .cache
                .get(&pid)
                .is_some_and(|c| c.facts.control.is_some() && c.facts.disks.is_empty());
            if watching && unread {
                self.cache.remove(&pid);
            }
            if pid != 0 && !self.cache.contains_key(&pid) {
                self.facts(&vm, pid, table);
            }
        }
    }

    /// Forgets VMs whose process is gone.
    fn prune(&mut self) {
        self.cache
            .retain(|pid, c| is_running(*pid, c.facts.start_time));
        let live: std::collections::HashSet<u32> = self.cache.keys().copied().collect();
        self.counters.retain(|(pid, _), _| live.contains(pid));
    }

    /// Known VMs (name, pid) with a host-cached disk on `dev`: their writes are invisible
    /// per VM at the device (the flusher does them), so they are looked at even when the
    /// interval has no I/O of theirs.
    pub fn host_cached_on(&self, dev: u32) -> Vec<(String, u32)> {
        self.cache
            .iter()
            .filter(|(_, c)| c.facts.disks_on(dev).iter().any(|d| d.host_cache))
            .map(|(pid, c)| (c.facts.vm.clone(), *pid))
            .collect()
    }

    /// Every cached VM's QEMU limits as the operator set them: for disks overkvm holds, the
    /// recorded originals, else what QEMU (or the manager's config) shows.
    pub fn shown(&self, held: &[QemuLimitRecord]) -> Vec<(String, Vec<DiskLimits>)> {
        let mut out: Vec<(String, Vec<DiskLimits>)> = self
            .cache
            .iter()
            .map(|(pid, c)| {
                let mut disks: Vec<DiskLimits> = c
                    .facts
                    .disks
                    .iter()
                    .map(|(d, _)| {
                        let orig = held
                            .iter()
                            .find(|r| r.pid == *pid && r.disk == d.disk)
                            .map_or(&d.throttle, |r| &r.original);
                        orig.shown(d.disk.name())
                    })
                    .chain(c.facts.shown_only.iter().cloned())
                    .filter(|l| !l.is_unlimited())
                    .collect();
                disks.sort_by(|a, b| a.disk.cmp(&b.disk));
                (c.facts.vm.clone(), disks)
            })
            .filter(|(_, d)| !d.is_empty())
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn read_facts(
        &self,
        vm: &str,
        pid: u32,
        start_time: u64,
        manager: Manager,
        table: &mut crate::devices::DeviceTable,
    ) -> VmFacts {
        let mut facts = VmFacts {
            vm: vm.to_string(),
            uuid: None,
            manager,
            start_time,
            control: None,
            disks: Vec::new(),
            shown_only: Vec::new(),
        };
        match manager {
            Manager::Libvirt | Manager::Nova => {
                facts.control = self
                    .libvirt_domain(vm, pid)
                    .map(|d| Control::Libvirt { domain: d });
            }
            Manager::Proxmox => {
                if let Some(id) = read_args(pid).and_then(|a| a.id) {
                    facts.shown_only =
                        crate::qemu::limits::of_proxmox_vm(&self.pve_dir, id).unwrap_or_default();
                }
                return facts;
            }
            Manager::Qemu => {
                facts.control = self
                    .own_qmp_socket(vm, pid)
                    .or_else(|| self.given_qmp_socket(pid))
                    .map(|socket| Control::Qmp { socket });
            }
            Manager::Kubevirt => return facts,
        }
        if let Some(c) = &facts.control {
            match self.read_disks(c) {
                Ok(disks) => {
                    facts.disks = disks
                        .into_iter()
                        .map(|d| {
                            let dev = d.file.as_deref().and_then(|f| host_disk_of(f, table));
                            (d, dev)
                        })
                        .collect();
                }
                Err(e) => log::debug!("VM {vm}: reading its disks: {e:#}"),
            }
        }
        facts
    }

    /// The QMP socket of overkvm's own VM `vm`, when qemu `pid` was started with it.
    fn own_qmp_socket(&self, vm: &str, pid: u32) -> Option<PathBuf> {
        let socket = self.own_vms.as_ref()?.qmp_socket(vm)?;
        read_args(pid)?
            .qmp_sockets
            .iter()
            .any(|s| Path::new(s) == socket)
            .then_some(socket)
    }

    /// A socket of `serve --qmp` that qemu `pid` was started with (its command line names
    /// it: the socket is this qemu's monitor, not another's at the same path later).
    fn given_qmp_socket(&self, pid: u32) -> Option<PathBuf> {
        if self.given_sockets.is_empty() {
            return None;
        }
        let args = read_args(pid)?;
        self.given_sockets
            .iter()
            .find(|g| args.qmp_sockets.iter().any(|s| Path::new(s) == g.as_path()))
            .cloned()
    }

    /// The libvirt domain `vm` when libvirt's status XML says qemu `pid` runs it.
    fn libvirt_domain(&self, vm: &str, pid: u32) -> Option<String> {
        let xml = self.libvirt_xml(vm)?;
        (managers::domstatus_pid(&xml) == Some(pid)).then(|| vm.to_string())
    }

    fn libvirt_xml(&self, domain: &str) -> Option<String> {
        libvirt::status_xml(&self.libvirt_run, domain)
    }

    /// The VM's disks as they are now (no cache).
    pub fn read_disks(&self, control: &Control) -> anyhow::Result<Vec<QemuDisk>> {
        match control {
            Control::Qmp { socket } => {
                let reply = qmp(socket)?.execute("query-block", None)?;
                Ok(disks_from_query_block(&reply))
            }
            Control::Libvirt { domain } => {
                let xml = self
                    .libvirt_xml(domain)
                    .with_context(|| format!("libvirt's status XML of domain {domain}"))?;
                Ok(disks_from_libvirt_xml(&xml))
            }
        }
    }

    /// What to put back on a recorded disk: its original settings with what someone else
    /// changed while overkvm held it kept ([`adopt`]; logged). When the disk cannot be read,
    /// the original.
    pub fn own_settings(&self, r: &QemuLimitRecord) -> QemuThrottle {
        let Some(written) = &r.written else {
            return r.original.clone();
        };
        let Some(now) = self.disk_now(&r.control, &r.disk) else {
            return r.original.clone();
        };
        let (own, changed) = adopt(&r.original, Some(written), &now);
        if !changed.is_empty() {
            log::info!(
                "VM {} disk {}: {} set by someone else while overkvm held it: kept",
                r.vm,
                r.disk.name(),
                adopted_text(&own, &changed)
            );
        }
        own
    }

    /// One disk's settings as its owner reports them now (the reader [`adopt`]'s two sides
    /// both come from); None when they cannot be read.
    pub fn disk_now(&self, control: &Control, disk: &DiskRef) -> Option<QemuThrottle> {
        self.read_disks(control)
            .ok()?
            .into_iter()
            .find(|d| d.disk == *disk)
            .map(|d| d.throttle)
    }

    /// Writes a disk's settings through its owner and reads them back; after a failure,
    /// writes through the same owner wait [`WRITE_BACKOFF`], so a failing monitor is not
    /// hammered every tick.
    pub fn write(
        &mut self,
        control: &Control,
        disk: &DiskRef,
        t: &QemuThrottle,
    ) -> anyhow::Result<()> {
        let key = control.describe();
        if let Some(until) = self.backoff.get(&key)
            && Instant::now() < *until
        {
            bail!(
                "{key}: not tried again until {:.0} s after its last failure",
                WRITE_BACKOFF.as_secs_f64()
            );
        }
        self.put_back(control, disk, t)
    }

    /// [`Self::write`] without waiting out the backoff: for putting a disk's own settings back,
    /// which happens once per hold (a release, the shutdown, `throttle reset`) and must not be
    /// skipped because a limit write failed a moment before.
    pub fn put_back(
        &mut self,
        control: &Control,
        disk: &DiskRef,
        t: &QemuThrottle,
    ) -> anyhow::Result<()> {
        let key = control.describe();
        let r = Self::write_now(control, disk, t);
        if r.is_err() {
            if self.backoff.len() > 4096 {
                self.backoff.clear();
            }
            self.backoff.insert(key, Instant::now() + WRITE_BACKOFF);
        } else {
            self.backoff.remove(&key);
        }
        r
    }

    fn write_now(control: &Control, disk: &DiskRef, t: &QemuThrottle) -> anyhow::Result<()> {
        let (back, checked) = match control {
            Control::Qmp { socket } => {
                // QMP takes every rate at once, and overkvm is the socket's one client.
                let mut q = qmp(socket)?;
                q.execute("block_set_io_throttle", Some(t.qmp_arguments(disk)))?;
                let reply = q.execute("query-block", None)?;
                let back = disks_from_query_block(&reply)
                    .into_iter()
                    .find(|d| d.disk == *disk)
                    .map(|d| d.throttle)
                    .with_context(|| format!("disk {} is gone", disk.name()))?;
                (back, SETTINGS[..6].iter().map(|(k, _)| family(k)).collect())
            }
            Control::Libvirt { domain } => {
                let read = || libvirt::blkdeviotune(VIRSH_TIMEOUT, domain, disk.name());
                let now = read()?;
                let Some(args) = t.virsh_arguments(&now, domain, disk.name()) else {
                    return Ok(());
                };
                libvirt::virsh(VIRSH_TIMEOUT, &args)?;
                (read()?, t.families_differing(&now))
            }
        };
        // Only what was written is checked: a family someone else set in between is theirs.
        let wrong: Vec<&str> = SETTINGS[..6]
            .iter()
            .map(|(k, _)| *k)
            .filter(|k| checked.contains(&family(k)) && back.get(k) != t.get(k))
            .collect();
        if !wrong.is_empty() {
            bail!(
                "{} disk {}: wrote {:?} but it reports {:?} ({} differ)",
                control.describe(),
                disk.name(),
                t.values,
                back.values,
                wrong.join(", ")
            );
        }
        Ok(())
    }

    /// Guest counters of libvirt domains' disks, all in one `virsh domstats --block` run (one
    /// per tick, however many domains): domain → disk → counters.
    pub fn libvirt_stats(domains: &[String]) -> DomainStats {
        if domains.is_empty() {
            return DomainStats::new();
        }
        match libvirt::domstats(VIRSH_TIMEOUT, domains) {
            Ok(stats) => stats,
            Err(e) => {
                log::debug!("{e:#}");
                DomainStats::new()
            }
        }
    }

    /// Guest-side rates of the VM's `disks` over the time since the last call: (read ops/s,
    /// write ops/s, read B/s, write B/s); None on the first call or when QEMU cannot be asked.
    /// overkvm's own VMs: one QMP round trip; libvirt's: from `libvirt` ([`Self::libvirt_stats`]).
    pub fn guest_rates(
        &mut self,
        pid: u32,
        control: &Control,
        disks: &[DiskRef],
        libvirt: &DomainStats,
    ) -> Option<[f64; 4]> {
        let counters: Vec<[u64; 4]> = match control {
            Control::Qmp { socket } => {
                let reply = qmp(socket).ok()?.execute("query-blockstats", None).ok()?;
                disks
                    .iter()
                    .map(|d| counters_of(&reply, d).map(|c| ops_and_bytes(&c)))
                    .collect::<Option<_>>()?
            }
            Control::Libvirt { domain } => {
                let of = libvirt.get(domain)?;
                disks
                    .iter()
                    .map(|d| {
                        of.iter()
                            .find(|(name, _)| name == d.name())
                            .map(|(_, c)| ops_and_bytes(c))
                    })
                    .collect::<Option<_>>()?
            }
        };
        let now = Instant::now();
        let mut sum = [0.0; 4];
        let mut complete = true;
        for (d, c) in disks.iter().zip(counters) {
            match self.counters.insert((pid, d.name().to_string()), (now, c)) {
                Some((t0, c0)) => {
                    let dt = now.duration_since(t0).as_secs_f64().max(1e-3);
                    for i in 0..4 {
                        sum[i] += c[i].saturating_sub(c0[i]) as f64 / dt;
                    }
                }
                None => complete = false,
            }
        }
        complete.then_some(sum)
    }
}

/// Puts back the original settings of every recorded disk whose qemu still runs (keeping what
/// someone else changed while overkvm held it, see [`adopt`]); returns what it could not, one
/// line each. A VM that is gone took its limits with it.
pub fn restore(records: &[QemuLimitRecord]) -> Vec<String> {
    let mut side = QemuSide::default();
    let mut failed = Vec::new();
    for r in records {
        if !is_running(r.pid, r.start_time) {
            continue;
        }
        let back = side.own_settings(r);
        if let Err(e) = side.put_back(&r.control, &r.disk, &back) {
            // It may have exited meanwhile.
            if is_running(r.pid, r.start_time) {
                failed.push(format!(
                    "QEMU limits of VM {} disk {} ({}): {e:#}",
                    r.vm,
                    r.disk.name(),
                    r.control.describe()
                ));
            }
        }
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(pairs: &[(&str, u64)]) -> QemuThrottle {
        QemuThrottle::of(pairs)
    }

    fn iops(r: Option<u64>, w: Option<u64>) -> Limits {
        Limits {
            riops: r,
            wiops: w,
            ..Limits::default()
        }
    }

    #[test]
    fn the_actuator_is_qemu_only_where_the_cgroup_cannot_act_and_qemu_is_reachable() {
        let base = ActuatorFacts {
            mode: ActuatorMode::Auto,
            cgroup_v1: true,
            host_cache: false,
            shared_cgroup: false,
            manage_cgroups: false,
            qemu_reachable: true,
        };
        assert_eq!(choose(&base), Choice::Cgroup);
        let wb = ActuatorFacts {
            host_cache: true,
            ..base
        };
        assert!(matches!(choose(&wb), Choice::Qemu(r) if r.contains("page cache")));
        // cgroup v2 with io and memory limits writeback itself.
        assert_eq!(
            choose(&ActuatorFacts {
                cgroup_v1: false,
                ..wb
            }),
            Choice::Cgroup
        );
        let shared = ActuatorFacts {
            shared_cgroup: true,
            ..base
        };
        assert!(matches!(choose(&shared), Choice::Qemu(r) if r.contains("shares")));
        assert_eq!(
            choose(&ActuatorFacts {
                manage_cgroups: true,
                ..shared
            }),
            Choice::Cgroup
        );
        for unreachable in [wb, shared] {
            assert_eq!(
                choose(&ActuatorFacts {
                    qemu_reachable: false,
                    ..unreachable
                }),
                Choice::Cgroup
            );
        }
        assert_eq!(
            choose(&ActuatorFacts {
                mode: ActuatorMode::Cgroup,
                ..wb
            }),
            Choice::Cgroup
        );
        assert!(matches!(
            choose(&ActuatorFacts {
                mode: ActuatorMode::Qemu,
                ..base
            }),
            Choice::Qemu(_)
        ));
        assert_eq!(
            choose(&ActuatorFacts {
                mode: ActuatorMode::Qemu,
                qemu_reachable: false,
                ..base
            }),
            Choice::Cgroup
        );
    }

    #[test]
    fn engaging_takes_the_tighter_value_and_keeps_what_overkvm_does_not_lower() {
        // Nothing set by the operator: ours, as per-direction rates.
        assert_eq!(
            engage(&QemuThrottle::default(), &iops(Some(300), Some(200))),
            t(&[("iops_rd", 300), ("iops_wr", 200)])
        );
        // The operator's tighter read rate and its burst stay; our write rate goes in.
        let op = t(&[
            ("iops_rd", 100),
            ("iops_rd_max", 400),
            ("iops_rd_max_length", 5),
            ("bps_wr", 10_000_000),
            ("iops_size", 4096),
        ]);
        let mut op_g = op.clone();
        op_g.group = Some("g".into());
        let e = engage(&op_g, &iops(Some(300), Some(200)));
        let mut want = t(&[
            ("iops_rd", 100),
            ("iops_rd_max", 400),
            ("iops_rd_max_length", 5),
            ("iops_wr", 200),
            ("bps_wr", 10_000_000),
            ("iops_size", 4096),
        ]);
        want.group = Some("g".into());
        assert_eq!(e, want);
        // Where ours is lower, the operator's burst above it goes with it.
        assert_eq!(
            engage(&op, &iops(Some(50), None)),
            t(&[("iops_rd", 50), ("bps_wr", 10_000_000), ("iops_size", 4096)])
        );
        // A bandwidth limit of ours under the operator's.
        assert_eq!(
            engage(
                &op,
                &Limits {
                    wbps: Some(1_000_000),
                    ..Limits::default()
                }
            ),
            t(&[
                ("iops_rd", 100),
                ("iops_rd_max", 400),
                ("iops_rd_max_length", 5),
                ("bps_wr", 1_000_000),
                ("iops_size", 4096)
            ])
        );
        // Nothing of ours: the operator's settings unchanged.
        assert_eq!(engage(&op, &Limits::default()), op);
    }

    #[test]
    fn what_someone_else_changed_while_held_is_kept_on_release() {
        // The operator had total 5000; overkvm wrote its read/write limits on top; meanwhile
        // the operator set iops_wr=300 (and nothing else).
        let original = t(&[("iops", 5000)]);
        let written = t(&[("iops", 5000), ("iops_rd", 990), ("iops_wr", 20)]);
        let current = t(&[("iops", 5000), ("iops_rd", 990), ("iops_wr", 300)]);
        let (own, changed) = adopt(&original, Some(&written), &current);
        assert_eq!(own, t(&[("iops", 5000), ("iops_wr", 300)]));
        assert_eq!(changed, ["iops_wr"]);
        assert_eq!(adopted_text(&own, &changed), "iops_wr=300");
        // Nothing changed: the original, verbatim.
        let (own, changed) = adopt(&original, Some(&written), &written);
        assert_eq!((own, changed.len()), (original.clone(), 0));
        // The operator removed the total: gone on release too.
        let current = t(&[("iops_rd", 990), ("iops_wr", 20)]);
        assert_eq!(adopt(&original, Some(&written), &current).0, t(&[]));
        // A record of an earlier version (nothing on record as written): verbatim.
        assert_eq!(adopt(&original, None, &current).0, original);
        // A throttle group set meanwhile is kept too.
        let mut grouped = written.clone();
        grouped.group = Some("g1".into());
        let (own, changed) = adopt(&original, Some(&written), &grouped);
        assert_eq!(
            (own.group.as_deref(), changed),
            (Some("g1"), vec!["group".to_string()])
        );
    }

    #[test]
    fn an_operators_total_is_never_exceeded_by_the_two_directions() {
        let op = t(&[("iops", 500), ("iops_max", 1000)]);
        // Ours fit inside: per direction, the total (and its burst) replaced.
        assert_eq!(
            engage(&op, &iops(Some(300), Some(100))),
            t(&[("iops_rd", 300), ("iops_wr", 100)])
        );
        // Ours add up to more than the total: scaled down together to fit.
        let e = engage(&op, &iops(Some(400), Some(400)));
        assert_eq!(e, t(&[("iops_rd", 250), ("iops_wr", 250)]));
        // Only writes limited by us: reads keep what the total leaves them.
        let e = engage(&op, &iops(None, Some(100)));
        assert!(e.get("iops_rd") + e.get("iops_wr") <= 500, "{e:?}");
        assert!(e.get("iops_wr") <= 100 && e.get("iops") == 0, "{e:?}");
        // Property: never looser than either side, in any direction.
        for (tot, r, w) in [(500, 1, 1), (10, 100, 3), (1, 1, 1), (7, 5, u64::MAX / 2)] {
            let e = engage(&t(&[("iops", tot)]), &iops(Some(r), Some(w)));
            assert!(e.get("iops_rd") + e.get("iops_wr") <= tot.max(2), "{e:?}");
            assert!(e.get("iops_rd") <= r && e.get("iops_wr") <= w, "{e:?}");
            assert!(e.get("iops_rd") >= 1 && e.get("iops_wr") >= 1, "{e:?}");
        }
    }

    #[test]
    fn a_vms_limit_is_split_over_its_disks_on_the_device() {
        let l = Limits {
            riops: Some(301),
            wiops: Some(1),
            rbps: None,
            wbps: Some(10),
        };
        assert_eq!(
            split(&l, 2),
            Limits {
                riops: Some(151),
                wiops: Some(1),
                rbps: None,
                wbps: Some(5)
            }
        );
        assert_eq!(split(&l, 0), l);
    }

    /// The race a libvirt test run found: overkvm limits IOPS inside a domain's own total while
    /// the operator adds a bandwidth cap with `virsh blkdeviotune` at the same moment. The cap
    /// is theirs, whichever side of overkvm's write and read back it lands on.
    #[test]
    fn an_operators_change_during_a_limit_write_stays_theirs() {
        let own = t(&[("iops", 5000)]);
        let limit = engage(
            &own,
            &Limits {
                riops: Some(283),
                wiops: Some(20),
                ..Limits::default()
            },
        );
        assert_eq!(limit, t(&[("iops_rd", 283), ("iops_wr", 20)]));
        // Written: the IOPS family only, so a cap set just before the write (after overkvm
        // read the disk) is not overwritten with the value read before it.
        let args = limit.virsh_arguments(&own, "web", "vda").unwrap();
        assert_eq!(
            args[4..],
            [
                "--total-iops-sec",
                "0",
                "--read-iops-sec",
                "283",
                "--write-iops-sec",
                "20"
            ]
        );
        // The cap lands between the write and the read back: overkvm's record of the disk is
        // what it wrote, so at release the cap reads as someone else's and stays.
        let with_cap = t(&[("iops_rd", 283), ("iops_wr", 20), ("bps_wr", 50_000_000)]);
        let written = written_as(&limit, Some(with_cap.clone()));
        assert_eq!(written.as_ref(), Some(&limit));
        let (back, changed) = adopt(&own, written.as_ref(), &with_cap);
        assert_eq!(back, t(&[("iops", 5000), ("bps_wr", 50_000_000)]));
        assert_eq!(changed, ["bps_wr"]);
        // And putting it back writes the IOPS family only: the cap is not touched.
        let args = back.virsh_arguments(&with_cap, "web", "vda").unwrap();
        assert!(!args.iter().any(|a| a.contains("bytes")), "{args:?}");
        // QEMU names a group when none is given: that name is what overkvm takes to be there.
        let mut named = limit.clone();
        named.group = Some("/machine/peripheral/virtio-disk0/virtio-backend".into());
        assert_eq!(written_as(&limit, Some(named.clone())), Some(named));
        assert_eq!(written_as(&limit, None), None, "unread: original goes back");
    }

    #[test]
    fn own_process_runs_and_a_missing_one_does_not() {
        let me = std::process::id();
        let st = running_start_time(me).unwrap();
        assert_eq!(Some(st), crate::host::proc::start_time(me));
        assert!(is_running(me, st));
        assert!(!is_running(me, st + 1));
        assert!(!is_running(u32::MAX - 1, st));
    }

    #[test]
    fn records_round_trip() {
        let r = QemuLimitRecord {
            vm: "a".into(),
            pid: 1,
            start_time: 2,
            control: Control::Libvirt { domain: "a".into() },
            disk: DiskRef::Device("vda".into()),
            major: 7,
            minor: 0,
            original: t(&[("iops", 5)]),
            written: Some(t(&[("iops", 5), ("iops_wr", 3)])),
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<QemuLimitRecord>(&s).unwrap(), r);
    }
}
