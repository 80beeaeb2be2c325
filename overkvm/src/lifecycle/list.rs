//! `vm list`: every VM on the host, whoever manages it: overkvm's own (from its state
//! directory, running or not) and every other qemu process (libvirt, Nova, Proxmox, KubeVirt,
//! plain qemu, as the identity layer names them), with state, pid, uptime, current IOPS and
//! active limits.
//!
//! IOPS come from the counters the kernel keeps per cgroup (v1 `blkio.throttle.io_serviced`,
//! v2 `io.stat`): the files are world-readable, and two reads a second apart cost nothing, so
//! no root and no eBPF are needed. They count bios, as the cgroup limits do. overkvm's VMs have
//! a cgroup of their own; another manager's VM is measured only when its cgroup is in that
//! manager's layout (a libvirt machine, a Proxmox scope, a pod's container), never when it sits
//! in a cgroup that would count other processes' I/O too (the root, a user session).

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    thread::sleep,
    time::Duration,
};

use serde::Serialize;

use super::{
    cgroup::VmCgroup,
    definition::{VmDefinition, VmPaths},
    overcommit::GuestProc,
    state::{self, VmState},
};
use crate::{config::Config, host::cgroup::counters::IoOps, text::sanitize, tick::ActiveLimit};
use crate::{
    host::cgroup::limits::Actuator,
    identity::Manager,
    qemu::{
        counters::QemuReading,
        limits::{self as qemu_limits, DiskLimits},
    },
};

/// `vm list` (the command line fills it in).
#[derive(Clone, Debug, Default)]
pub struct ListOptions {
    /// One JSON array.
    pub json: bool,
    /// Skip the one-second IOPS measurement.
    pub no_iops: bool,
    /// The throttle daemon's config, to find its status file.
    pub config: Option<std::path::PathBuf>,
    pub state_dir: Option<std::path::PathBuf>,
}

/// Where libvirt keeps its running domains' pidfiles and status XML.
const LIBVIRT_RUN: &str = crate::qemu::libvirt::RUN_DIR;
/// Where Proxmox keeps its VM configs.
const PVE_QEMU: &str = "/etc/pve/qemu-server";

/// Window over which `vm list` measures IOPS.
const IOPS_WINDOW: Duration = Duration::from_secs(1);

/// Read and write IOPS over the window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Iops {
    pub read: f64,
    pub write: f64,
    pub total: f64,
}

/// Who runs a VM, for `vm list`: overkvm itself or the manager the identity layer found.
pub const OVERKVM: &str = "overkvm";

/// One row of `vm list`.
#[derive(Clone, Debug, Serialize)]
pub struct VmRow {
    pub name: String,
    /// `overkvm` for the VMs of the state directory, else `qemu`, `libvirt`, `nova`,
    /// `proxmox` or `kubevirt`.
    pub manager: String,
    /// KubeVirt: the VMI's namespace (`name` is `<namespace>/<vmi>`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub state: VmState,
    pub pid: Option<u32>,
    pub uuid: Option<String>,
    pub uptime_s: Option<f64>,
    pub accel: Option<String>,
    pub cgroup: Option<String>,
    pub memory_mib: u64,
    pub vcpus: u32,
    /// overkvm's VMs: the qcow2 overlay.
    pub overlay: Option<String>,
    /// None when not running, not measured (`--no-iops`) or the VM has no cgroup.
    pub iops: Option<Iops>,
    /// Limits the throttle daemon has on this VM (from its status file).
    pub limits: Vec<ActiveLimit>,
    /// Limits QEMU itself enforces on the VM's disks (`block_set_io_throttle`: Nova's
    /// `quota:disk_*`, libvirt `<iotune>`), read over QMP for overkvm's VMs and from libvirt's
    /// status XML for its domains; None where they cannot be read without going behind a
    /// manager's back.
    pub qemu_limits: Option<Vec<DiskLimits>>,
    /// Disks no host block device sees (network storage), whose I/O QEMU counts: the disk
    /// and its storage target (overkvm's own VMs read over their QMP socket, libvirt's
    /// domains through libvirt).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub network_disks: Vec<NetworkDisk>,
}

/// A VM disk on network storage.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct NetworkDisk {
    pub disk: String,
    pub target: String,
}

/// Read and write operations QEMU counted on a VM's network disks, summed.
fn network_ops(r: &QemuReading) -> (u64, u64) {
    r.disks.iter().fold((0, 0), |(rd, wr), d| {
        (rd + d.counters.rd_operations, wr + d.counters.wr_operations)
    })
}

/// IOPS between two readings of a cgroup's counters, summed over devices.
pub fn iops_between(
    before: &BTreeMap<(u32, u32), IoOps>,
    after: &BTreeMap<(u32, u32), IoOps>,
    secs: f64,
) -> Iops {
    let secs = secs.max(1e-3);
    let (mut r, mut w) = (0u64, 0u64);
    for (dev, a) in after {
        let b = before.get(dev).copied().unwrap_or_default();
        r += a.read.saturating_sub(b.read);
        w += a.write.saturating_sub(b.write);
    }
    Iops {
        read: r as f64 / secs,
        write: w as f64 / secs,
        total: (r + w) as f64 / secs,
    }
}

/// Formats seconds as `3d4h`, `2h05m`, `4m07s` or `12s`.
pub fn human_duration(s: f64) -> String {
    let s = s.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

/// `loop0 r=200 w=max iops`, with `via qemu vda` when QEMU holds the limit on those disks
/// (the throttle's QEMU actuator) rather than the cgroup.
fn limit_text(l: &ActiveLimit) -> String {
    let v = |x: Option<u64>| x.map_or("max".to_string(), |n| n.to_string());
    let mut t = format!("{} r={} w={} iops", l.device, v(l.riops), v(l.wiops));
    if let Some(disks) = &l.qemu_disks {
        t.push_str(&format!(" via qemu {}", disks.join(" ")));
    }
    t
}

/// Rows for the VMs of other managers (`guests` minus overkvm's own), with the cgroup to
/// measure each by, when it has one of its own.
fn foreign_rows(
    guests: &[GuestProc],
    limits: &[ActiveLimit],
    block_cgroup: impl Fn(u32) -> Option<String>,
) -> Vec<(VmRow, Option<String>)> {
    guests
        .iter()
        .filter(|g| !g.overkvm)
        .map(|g| {
            let cgroup = block_cgroup(g.pid);
            let own = cgroup
                .as_deref()
                .filter(|c| crate::identity::cgroup::is_manager_layout(c))
                .map(str::to_owned);
            let row = VmRow {
                name: g.name.clone(),
                manager: g.manager.name().to_string(),
                namespace: g.namespace.clone(),
                state: VmState::Running,
                pid: Some(g.pid),
                uuid: g.uuid.clone(),
                uptime_s: state::uptime_s(g.start_time),
                accel: None,
                cgroup,
                memory_mib: g.memory_mib,
                vcpus: g.vcpus,
                overlay: None,
                iops: None,
                limits: limits.iter().filter(|l| l.vm == g.name).cloned().collect(),
                qemu_limits: match (g.manager, g.vmid) {
                    (Manager::Libvirt | Manager::Nova, _) => {
                        qemu_limits::of_libvirt_domain(Path::new(LIBVIRT_RUN), &g.name, g.pid)
                    }
                    (Manager::Proxmox, Some(vmid)) => {
                        qemu_limits::of_proxmox_vm(Path::new(PVE_QEMU), vmid)
                    }
                    _ => None,
                },
                network_disks: Vec::new(),
            };
            (row, own)
        })
        .collect()
}

/// A row of one of overkvm's VMs, with the cgroup to measure it by and the QMP socket to read
/// its network disks from (both only while it runs).
fn own_row(
    (def, paths): &(VmDefinition, VmPaths),
    limits: &[ActiveLimit],
    api: Option<&Actuator>,
) -> (VmRow, Option<VmCgroup>, Option<PathBuf>) {
    let found = state::inspect(def, paths);
    let record = found
        .record
        .as_ref()
        .filter(|_| found.state == VmState::Running);
    let cgroup = record.and_then(|r| {
        Some(VmCgroup {
            api: api?.api,
            root: r.cgroup_root.clone()?,
            path: r.cgroup.clone()?,
        })
    });
    let row = VmRow {
        name: def.name.clone(),
        manager: OVERKVM.into(),
        namespace: None,
        state: found.state,
        pid: found.pid,
        uuid: Some(def.uuid.clone()),
        uptime_s: record.and_then(|r| state::uptime_s(r.start_time)),
        accel: record.map(|r| r.accel.clone()),
        cgroup: record.and_then(|r| r.cgroup.clone()),
        memory_mib: def.memory_mib,
        vcpus: def.vcpus,
        overlay: Some(def.overlay.display().to_string()),
        iops: None,
        limits: limits
            .iter()
            .filter(|l| l.vm == def.name)
            .cloned()
            .collect(),
        qemu_limits: record.and_then(|_| qemu_limits::of_own_vm(&paths.qmp_socket())),
        network_disks: Vec::new(),
    };
    (row, cgroup, record.map(|_| paths.qmp_socket()))
}

/// Every VM's row, with the cgroup to measure each by and, for overkvm's running VMs, the QMP
/// socket their network disks are read over (index for index).
struct Listing {
    rows: Vec<VmRow>,
    cgroups: Vec<Option<VmCgroup>>,
    sockets: Vec<Option<PathBuf>>,
}

impl Listing {
    /// overkvm's VMs first, then every other VM on the host.
    fn gather(vms: &[(VmDefinition, VmPaths)], limits: &[ActiveLimit]) -> Listing {
        let api = Actuator::for_host().ok();
        let mut l = Listing {
            rows: Vec::new(),
            cgroups: Vec::new(),
            sockets: Vec::new(),
        };
        for vm in vms {
            let (row, cgroup, socket) = own_row(vm, limits, api.as_ref());
            l.rows.push(row);
            l.cgroups.push(cgroup);
            l.sockets.push(socket);
        }
        let guests = super::overcommit::guests(vms);
        let block_cgroup = |pid| {
            api.as_ref()
                .and_then(|a| crate::host::proc::block_cgroup(pid, a.api))
        };
        for (row, own) in foreign_rows(&guests, limits, block_cgroup) {
            l.cgroups.push(own.and_then(|path| {
                let a = api.as_ref()?;
                Some(VmCgroup {
                    api: a.api,
                    root: a.root.clone(),
                    path,
                })
            }));
            l.rows.push(row);
        }
        l
    }

    /// QEMU's counters of each row's network disks (None for a VM without any): overkvm's
    /// VMs over their QMP socket; libvirt's domains through libvirt, all at once.
    fn read_network(&self) -> Vec<Option<QemuReading>> {
        let libvirt_rows = self
            .rows
            .iter()
            .any(|r| r.manager == Manager::Libvirt.name() || r.manager == Manager::Nova.name());
        let mut libvirt: HashMap<u32, QemuReading> = if libvirt_rows {
            crate::qemu::libvirt::read_once(Path::new(LIBVIRT_RUN))
                .unwrap_or_default()
                .into_iter()
                .map(|r| (r.pid, r))
                .collect()
        } else {
            Default::default()
        };
        (0..self.rows.len())
            .map(|i| {
                self.sockets
                    .get(i)
                    .cloned()
                    .flatten()
                    .and_then(|s| crate::qemu::counters::read_once(&s).ok())
                    .or_else(|| self.rows[i].pid.and_then(|p| libvirt.remove(&p)))
                    .filter(|r| !r.disks.is_empty())
            })
            .collect()
    }

    /// Measures IOPS over `IOPS_WINDOW`: each row's cgroup counters, plus QEMU's counts of
    /// its network disks (`net_before`: read just before).
    fn measure(&mut self, net_before: &[Option<QemuReading>]) {
        let before: Vec<_> = self
            .cgroups
            .iter()
            .map(|c| c.as_ref().and_then(|c| c.io_ops().ok()))
            .collect();
        let t = std::time::Instant::now();
        sleep(IOPS_WINDOW);
        let secs = t.elapsed().as_secs_f64();
        for (i, cg) in self.cgroups.iter().enumerate() {
            if let (Some(cg), Some(b)) = (cg, &before[i])
                && let Ok(a) = cg.io_ops()
            {
                self.rows[i].iops = Some(iops_between(b, &a, secs));
            }
        }
        // Network disks' I/O passes no cgroup's block counters: QEMU's counts are added.
        let net_after = self.read_network();
        for (i, (b, a)) in net_before.iter().zip(net_after).enumerate() {
            if let (Some(b), Some(a)) = (b, a) {
                add_network_iops(&mut self.rows[i], b, &a, secs);
            }
        }
    }
}

/// A VM's network disks, as QEMU reports them.
fn network_disks(r: &QemuReading) -> Vec<NetworkDisk> {
    r.disks
        .iter()
        .map(|d| NetworkDisk {
            disk: d.disk.clone(),
            target: d.target.clone(),
        })
        .collect()
}

/// Adds the operations QEMU counted on a row's network disks between two readings `secs`
/// apart to its IOPS.
fn add_network_iops(row: &mut VmRow, before: &QemuReading, after: &QemuReading, secs: f64) {
    let ((rb, wb), (ra, wa)) = (network_ops(before), network_ops(after));
    let (r, w) = (
        ra.saturating_sub(rb) as f64 / secs,
        wa.saturating_sub(wb) as f64 / secs,
    );
    let iops = row.iops.get_or_insert_with(Iops::default);
    iops.read += r;
    iops.write += w;
    iops.total += r + w;
}

/// Builds the rows (measuring IOPS over one second unless `measure` is false): overkvm's VMs
/// first, then every other VM on the host.
pub fn rows(vms: &[(VmDefinition, VmPaths)], limits: &[ActiveLimit], measure: bool) -> Vec<VmRow> {
    let mut listing = Listing::gather(vms, limits);
    let net_before = listing.read_network();
    for (row, r) in listing.rows.iter_mut().zip(&net_before) {
        if let Some(r) = r {
            row.network_disks = network_disks(r);
        }
    }
    let measure_net = net_before.iter().any(Option::is_some);
    if measure && (listing.cgroups.iter().any(Option::is_some) || measure_net) {
        listing.measure(&net_before);
    }
    listing.rows
}

/// Writes the text table.
pub fn write_table(rows: &[VmRow], out: &mut impl std::io::Write) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<20} {:<8} {:<8} {:>8} {:>8} {:>5} {:>7} {:>7} {:<36} LIMITS",
        "NAME", "MANAGER", "STATE", "PID", "UPTIME", "VCPUS", "MEM", "IOPS", "UUID"
    )?;
    for r in rows {
        let mut limits: Vec<String> = r.limits.iter().map(limit_text).collect();
        limits.extend(
            r.qemu_limits
                .iter()
                .flatten()
                .map(|l| format!("qemu {}", l.text())),
        );
        writeln!(
            out,
            "{:<20} {:<8} {:<8} {:>8} {:>8} {:>5} {:>7} {:>7} {:<36} {}",
            // Names of other managers' VMs come from command lines: never printed raw.
            sanitize(&r.name),
            r.manager,
            r.state.name(),
            r.pid.map_or("-".into(), |p| p.to_string()),
            r.uptime_s.map_or("-".into(), human_duration),
            r.vcpus,
            format!("{}M", r.memory_mib),
            r.iops.map_or("-".into(), |i| format!("{:.0}", i.total)),
            r.uuid.as_deref().unwrap_or("-"),
            if limits.is_empty() {
                "-".to_string()
            } else {
                sanitize(&limits.join(", "))
            }
        )?;
        // Network disks under their VM: IOPS above include them (QEMU's counts).
        for d in &r.network_disks {
            writeln!(
                out,
                "  └ {} on {} (network storage, counted by QEMU)",
                sanitize(&d.disk),
                sanitize(&d.target)
            )?;
        }
    }
    Ok(())
}

/// `vm list`.
pub fn run(args: &ListOptions) -> anyhow::Result<()> {
    let state_dir = super::state_dir(args.state_dir.as_deref())?;
    let (vms, problems) = super::load_all(&state_dir)?;
    let config = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let limits = crate::status_file::read_status(&config)
        .map(|d| d.limits)
        .unwrap_or_default();
    let rows = rows(&vms, &limits, !args.no_iops);
    if args.json {
        println!("{}", serde_json::to_string(&rows)?);
    } else {
        if rows.is_empty() {
            println!(
                "no VMs on this host (none running, none defined in {})",
                state_dir.display()
            );
        } else {
            write_table(&rows, &mut std::io::stdout().lock())?;
        }
        if rows.iter().any(|r| r.state == VmState::Running) && args.no_iops {
            println!("(IOPS not measured: --no-iops)");
        }
    }
    for p in problems {
        eprintln!("overkvm-io: skipped {}", sanitize(&p));
    }
    Ok(())
}

/// Names of running VMs in a state directory (for `overcommit`).
pub fn running(vms: &[(VmDefinition, VmPaths)]) -> Vec<(String, u32)> {
    vms.iter()
        .filter_map(|(d, p)| {
            let f = state::inspect(d, p);
            (f.state == VmState::Running).then(|| (d.name.clone(), f.pid.unwrap_or(0)))
        })
        .collect()
}

/// overkvm's own VMs in a state directory, for the throttle (which holds them through their
/// QMP sockets and does not import the lifecycle).
pub struct StateDirVms {
    pub dir: PathBuf,
}

impl StateDirVms {
    /// The state directory `OVERKVM_STATE_DIR` names, or the default.
    pub fn from_env() -> StateDirVms {
        StateDirVms {
            dir: super::state_dir(None)
                .unwrap_or_else(|_| PathBuf::from(super::definition::DEFAULT_STATE_DIR)),
        }
    }
}

impl crate::qemu::qmp::OwnVms for StateDirVms {
    fn running(&self) -> Vec<crate::qemu::qmp::OwnVm> {
        let Ok((vms, _)) = super::load_all(&self.dir) else {
            return Vec::new();
        };
        running(&vms)
            .into_iter()
            .map(|(name, pid)| crate::qemu::qmp::OwnVm {
                uuid: vms
                    .iter()
                    .find(|(d, _)| d.name == name)
                    .map(|(d, _)| d.uuid.clone()),
                name,
                pid,
            })
            .collect()
    }

    fn qmp_socket(&self, name: &str) -> Option<PathBuf> {
        super::definition::validate_name(name).ok()?;
        Some(VmPaths::new(&self.dir, name).qmp_socket())
    }
}

/// Where overkvm reads QEMU's counters of VMs' network disks: the operator's explicit QMP
/// sockets and, unless turned off, those of overkvm's own running VMs (re-listed on each call,
/// so a VM started later is found) and libvirt's domains (through libvirt, once its run
/// directory exists).
pub fn qemu_sources(
    sources: &crate::qemu::counters::QemuSources,
) -> crate::qemu::counters::SourceList {
    use crate::qemu::counters::CounterSource;
    let explicit = sources.explicit.clone();
    let libvirt = sources.libvirt;
    let state_dir = sources
        .own_vms
        .then(|| super::state_dir(None).ok())
        .flatten();
    Box::new(move || {
        let mut out: Vec<CounterSource> =
            explicit.iter().cloned().map(CounterSource::Qmp).collect();
        if let Some(dir) = &state_dir
            && let Ok((vms, _)) = super::load_all(dir)
        {
            let running: std::collections::HashSet<String> =
                running(&vms).into_iter().map(|(name, _)| name).collect();
            out.extend(
                vms.iter()
                    .filter(|(d, _)| running.contains(&d.name))
                    .map(|(_, p)| CounterSource::Qmp(p.qmp_socket())),
            );
        }
        let libvirt_run = Path::new(crate::qemu::libvirt::RUN_DIR);
        if libvirt && libvirt_run.is_dir() {
            out.push(CounterSource::Libvirt(libvirt_run.to_path_buf()));
        }
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iops_maths() {
        let mut a = BTreeMap::new();
        let mut b = BTreeMap::new();
        a.insert(
            (7, 0),
            IoOps {
                read: 100,
                write: 50,
            },
        );
        b.insert(
            (7, 0),
            IoOps {
                read: 300,
                write: 150,
            },
        );
        b.insert((8, 0), IoOps { read: 10, write: 0 });
        let i = iops_between(&a, &b, 2.0);
        assert_eq!(
            i,
            Iops {
                read: 105.0,
                write: 50.0,
                total: 155.0
            }
        );
        // A counter that went backwards (cgroup re-created) counts nothing.
        let i = iops_between(&b, &a, 1.0);
        assert_eq!(i.total, 0.0);
    }

    /// A network disk's operations, as QEMU counted them over the window, add to whatever
    /// the VM's cgroup counted (or stand alone without one).
    #[test]
    fn network_disks_and_their_iops() {
        use crate::qemu::{backing::DiskCounters, counters::NetDiskReading};
        let reading = |rd: u64, wr: u64| QemuReading {
            pid: 42,
            disks: ["vdb", "vdc"]
                .iter()
                .map(|d| NetDiskReading {
                    disk: d.to_string(),
                    target: format!("nbd://10.0.0.5:10809/{d}"),
                    counters: DiskCounters {
                        rd_operations: rd,
                        wr_operations: wr,
                        ..DiskCounters::default()
                    },
                })
                .collect(),
        };
        let (before, after) = (reading(100, 10), reading(300, 60));
        assert_eq!(
            network_disks(&before),
            ["vdb", "vdc"]
                .map(|d| NetworkDisk {
                    disk: d.into(),
                    target: format!("nbd://10.0.0.5:10809/{d}"),
                })
                .to_vec()
        );
        let (mut row, ..) = foreign_rows(&[guest(42, "a", Manager::Qemu, false)], &[], |_| None)
            .pop()
            .unwrap();
        add_network_iops(&mut row, &before, &after, 2.0);
        let want = Iops {
            read: 200.0,
            write: 50.0,
            total: 250.0,
        };
        assert_eq!(row.iops, Some(want));
        row.iops = Some(Iops {
            read: 1.0,
            write: 2.0,
            total: 3.0,
        });
        add_network_iops(&mut row, &before, &after, 2.0);
        assert_eq!(
            row.iops,
            Some(Iops {
                read: 201.0,
                write: 52.0,
                total: 253.0
            })
        );
    }

    #[test]
    fn durations() {
        assert_eq!(human_duration(0.4), "0s");
        assert_eq!(human_duration(59.9), "59s");
        assert_eq!(human_duration(61.0), "1m01s");
        assert_eq!(human_duration(7500.0), "2h05m");
        assert_eq!(human_duration(3.0 * 86400.0 + 4.0 * 3600.0), "3d4h");
        assert_eq!(human_duration(-5.0), "0s");
    }

    #[test]
    fn table() {
        let row = VmRow {
            name: "web01".into(),
            manager: OVERKVM.into(),
            namespace: None,
            state: VmState::Crashed,
            pid: None,
            uuid: Some("0fa82997-3c4d-4e5f-8a9b-0c1d2e3f4a5b".into()),
            uptime_s: None,
            accel: None,
            cgroup: None,
            memory_mib: 512,
            vcpus: 2,
            overlay: Some("/v/web01/disk.qcow2".into()),
            iops: Some(Iops {
                read: 1.0,
                write: 2.0,
                total: 3.0,
            }),
            limits: vec![ActiveLimit {
                vm: "web01".into(),
                cgroup: "/overkvm/vm-web01".into(),
                device: "loop0".into(),
                riops: Some(200),
                wiops: None,
                rbps: None,
                wbps: None,
                since_s: 3.0,
                qemu_disks: None,
            }],
            qemu_limits: Some(vec![DiskLimits {
                disk: "vda".into(),
                iops: Some(500),
                ..DiskLimits::default()
            }]),
            network_disks: vec![NetworkDisk {
                disk: "drive-virtio-disk1".into(),
                target: "rbd:pool/img\u{1b}[2J".into(),
            }],
        };
        let mut out = Vec::new();
        write_table(std::slice::from_ref(&row), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("crashed"), "{text}");
        assert!(text.contains("loop0 r=200 w=max iops"), "{text}");
        assert!(text.contains("qemu vda iops=500"), "{text}");
        assert!(
            text.contains("└ drive-virtio-disk1 on rbd:pool/img\\x1b[2J (network storage"),
            "{text}"
        );
        // The same limit held by QEMU says so (and on which disks).
        let mut held = row.clone();
        held.limits[0].qemu_disks = Some(vec!["vda".into(), "vdb".into()]);
        let mut out = Vec::new();
        write_table(std::slice::from_ref(&held), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("loop0 r=200 w=max iops via qemu vda vdb"),
            "{text}"
        );
        let json = serde_json::to_value(&row).unwrap();
        assert_eq!(json["state"], "crashed");
        assert_eq!(json["iops"]["total"], 3.0);
        assert!(json["pid"].is_null());
        assert_eq!(json["manager"], "overkvm");
        assert!(json.get("namespace").is_none());
    }

    fn guest(pid: u32, name: &str, manager: Manager, overkvm: bool) -> GuestProc {
        GuestProc {
            pid,
            name: name.into(),
            uuid: None,
            overkvm,
            manager,
            namespace: (manager == Manager::Kubevirt).then(|| "prod".into()),
            start_time: 0,
            vmid: None,
            vcpus: 1,
            vcpu_source: "smp",
            memory_mib: 512,
            resident_mib: 100,
        }
    }

    #[test]
    fn other_managers_vms_are_listed_and_measured_only_in_a_cgroup_of_their_own() {
        let guests = [
            guest(10, "mine", Manager::Qemu, true),
            guest(11, "web01", Manager::Libvirt, false),
            guest(12, "prod/db", Manager::Kubevirt, false),
            guest(13, "scratch\x1b[2J", Manager::Qemu, false),
        ];
        let limits = [ActiveLimit {
            vm: "web01".into(),
            cgroup: "/machine/qemu-1-web01.libvirt-qemu".into(),
            device: "loop0".into(),
            riops: Some(300),
            wiops: None,
            rbps: None,
            wbps: None,
            since_s: 1.0,
            qemu_disks: None,
        }];
        let cg = |pid| match pid {
            11 => Some("/machine/qemu-1-web01.libvirt-qemu".to_string()),
            12 => Some("/kubepods/burstable/pod1/c1".to_string()),
            13 => Some("/".to_string()),
            _ => None,
        };
        let rows = foreign_rows(&guests, &limits, cg);
        let names: Vec<_> = rows.iter().map(|(r, _)| r.name.as_str()).collect();
        assert_eq!(
            names,
            ["web01", "prod/db", "scratch\x1b[2J"],
            "overkvm's own VM is not repeated"
        );
        let (web, own) = &rows[0];
        assert_eq!(web.manager, "libvirt");
        assert_eq!(own.as_deref(), Some("/machine/qemu-1-web01.libvirt-qemu"));
        assert_eq!(web.limits.len(), 1);
        assert_eq!(web.state, VmState::Running);
        let (db, own) = &rows[1];
        assert_eq!(
            (db.manager.as_str(), db.namespace.as_deref()),
            ("kubevirt", Some("prod"))
        );
        assert!(own.is_some());
        let (scratch, own) = &rows[2];
        assert_eq!(scratch.cgroup.as_deref(), Some("/"));
        assert_eq!(
            own, &None,
            "the root cgroup counts the whole host: not measured"
        );
        let mut out = Vec::new();
        let only: Vec<VmRow> = rows.into_iter().map(|(r, _)| r).collect();
        write_table(&only, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("kubevirt"), "{text}");
        assert!(!text.contains('\x1b'), "escaped: {text}");
    }
}
