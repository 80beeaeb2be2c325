//! `overkvm-io overcommit`: how far the host is over-committed, in one view.
//!
//! - CPU: vCPUs of every qemu on the host (counted from its `CPU n/KVM|TCG` threads, else its
//!   `-smp`) against the host's online CPUs.
//! - Memory: guest RAM (`-m`) against physical RAM, what qemu really holds (RSS) and what KSM
//!   saves (`pages_sharing` × page size).
//! - Disk: virtual size of the overkvm overlays against what overlays and their (shared) bases
//!   really allocate, and whether the filesystem could hold every overlay grown to full size.
//! - IOPS: each budgeted device's budget against what guests use, from the throttle daemon's
//!   status file when a daemon runs ("unknown" otherwise).
//!
//! The maths are pure functions over plain facts; gathering the facts is the thin part.

use std::{collections::BTreeMap, fs, path::Path, time::Duration};

use serde::Serialize;

use super::{
    definition::{VmDefinition, VmPaths},
    human_bytes,
    qemu::{is_vcpu_thread, smp_and_memory},
    qemu_img::{self, ImageInfo},
};
use crate::{
    config::Config,
    devices::DeviceTable,
    host::proc::{self, ProcessDir},
    identity::{Manager, Resolver},
    text::sanitize,
    tick::ThrottleView,
};

/// `overcommit` (the command line fills it in).
#[derive(Clone, Debug, Default)]
pub struct OvercommitOptions {
    pub json: bool,
    /// Config with the device budgets (and the daemon's status file location).
    pub config: Option<std::path::PathBuf>,
    pub state_dir: Option<std::path::PathBuf>,
}

/// A status file older than this means no daemon is running.
const STATUS_FRESH: Duration = Duration::from_secs(10);

/// One qemu process on the host.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GuestProc {
    pub pid: u32,
    pub name: String,
    pub uuid: Option<String>,
    /// Started by overkvm (its name and UUID match a VM in the state directory).
    pub overkvm: bool,
    /// Who manages it, as the identity layer found (`qemu` when nobody does).
    pub manager: Manager,
    /// KubeVirt: the VMI's namespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Start time of the process (clock ticks after boot), for its uptime.
    #[serde(skip)]
    pub start_time: u64,
    /// Proxmox VMID, libvirt domain id, when known.
    #[serde(skip)]
    pub vmid: Option<u32>,
    pub vcpus: u32,
    /// `threads` (counted `CPU n/...` threads) or `smp` (read from `-smp`).
    pub vcpu_source: &'static str,
    pub memory_mib: u64,
    pub resident_mib: u64,
}

/// The host's size.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct HostFacts {
    pub cpus: u32,
    pub memory_mib: u64,
    pub page_size: u64,
    pub ksm_running: bool,
    pub ksm_pages_sharing: u64,
}

/// One overlay and the images below it, from `qemu-img info --backing-chain`.
#[derive(Clone, Debug, PartialEq)]
pub struct DiskChain {
    pub vm: String,
    pub chain: Vec<ImageInfo>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CpuView {
    pub host_cpus: u32,
    pub vcpus: u32,
    pub vcpus_overkvm: u32,
    pub ratio: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MemoryView {
    pub host_mib: u64,
    pub guest_mib: u64,
    pub guest_mib_overkvm: u64,
    pub ratio: Option<f64>,
    /// What the qemu processes hold (RSS).
    pub resident_mib: u64,
    pub ksm_running: bool,
    /// Memory KSM saves: pages_sharing × page size.
    pub ksm_saved_mib: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DiskView {
    pub overlays: usize,
    /// Sum of the overlays' virtual sizes: what the guests were promised.
    pub virtual_bytes: u64,
    /// Overlays' allocation plus each distinct base counted once.
    pub allocated_bytes: u64,
    pub overlay_allocated_bytes: u64,
    pub base_allocated_bytes: u64,
    pub bases: usize,
    pub ratio: Option<f64>,
    /// Space the overlays would take on top of today if every guest filled its disk.
    pub growth_to_full_bytes: u64,
    /// Free space on the state directory's filesystem.
    pub free_bytes: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct IopsView {
    pub device: String,
    pub budget_iops: Option<u64>,
    /// IOPS on the device in the daemon's last tick; None when no daemon runs.
    pub used_iops: Option<f64>,
    pub ratio: Option<f64>,
    /// Limits the daemon has in place on this device.
    pub limits: usize,
}

/// Everything `overcommit` shows.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Overcommit {
    pub cpu: CpuView,
    pub memory: MemoryView,
    pub disk: DiskView,
    pub iops: Vec<IopsView>,
    pub guests: Vec<GuestProc>,
    pub notes: Vec<String>,
}

/// `a / b`, None when b is 0.
pub fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}

pub fn cpu_view(host: &HostFacts, guests: &[GuestProc]) -> CpuView {
    let vcpus: u32 = guests.iter().map(|g| g.vcpus).sum();
    CpuView {
        host_cpus: host.cpus,
        vcpus,
        vcpus_overkvm: guests.iter().filter(|g| g.overkvm).map(|g| g.vcpus).sum(),
        ratio: ratio(vcpus as f64, host.cpus as f64),
    }
}

pub fn memory_view(host: &HostFacts, guests: &[GuestProc]) -> MemoryView {
    let guest: u64 = guests.iter().map(|g| g.memory_mib).sum();
    MemoryView {
        host_mib: host.memory_mib,
        guest_mib: guest,
        guest_mib_overkvm: guests
            .iter()
            .filter(|g| g.overkvm)
            .map(|g| g.memory_mib)
            .sum(),
        ratio: ratio(guest as f64, host.memory_mib as f64),
        resident_mib: guests.iter().map(|g| g.resident_mib).sum(),
        ksm_running: host.ksm_running,
        ksm_saved_mib: host.ksm_pages_sharing.saturating_mul(host.page_size) >> 20,
    }
}

/// Disk maths. Bases are shared: each distinct image below an overlay counts once.
pub fn disk_view(chains: &[DiskChain], free_bytes: Option<u64>) -> DiskView {
    let mut bases: BTreeMap<&str, u64> = BTreeMap::new();
    let (mut virt, mut overlay_alloc, mut growth) = (0u64, 0u64, 0u64);
    for c in chains {
        let Some(top) = c.chain.first() else {
            continue;
        };
        let actual = top.actual_size.unwrap_or(0);
        virt += top.virtual_size;
        overlay_alloc += actual;
        // A full qcow2 is its virtual size plus metadata; the metadata is left out.
        growth += top.virtual_size.saturating_sub(actual);
        for b in &c.chain[1..] {
            bases.insert(&b.filename, b.actual_size.unwrap_or(0));
        }
    }
    let base_alloc: u64 = bases.values().sum();
    let allocated = overlay_alloc + base_alloc;
    DiskView {
        overlays: chains.len(),
        virtual_bytes: virt,
        allocated_bytes: allocated,
        overlay_allocated_bytes: overlay_alloc,
        base_allocated_bytes: base_alloc,
        bases: bases.len(),
        ratio: ratio(virt as f64, allocated as f64),
        growth_to_full_bytes: growth,
        free_bytes,
    }
}

/// Budgets from the config (device names resolved) joined with the daemon's last tick.
pub fn iops_view(
    budgets: &[(String, Option<u64>)],
    daemon: Option<&ThrottleView>,
) -> Vec<IopsView> {
    let mut rows: BTreeMap<String, IopsView> = BTreeMap::new();
    for (device, budget) in budgets {
        rows.insert(
            device.clone(),
            IopsView {
                device: device.clone(),
                budget_iops: *budget,
                used_iops: None,
                ratio: None,
                limits: 0,
            },
        );
    }
    if let Some(d) = daemon {
        for b in &d.budgets {
            let row = rows.entry(b.device.clone()).or_insert(IopsView {
                device: b.device.clone(),
                budget_iops: b.iops_budget,
                used_iops: None,
                ratio: None,
                limits: 0,
            });
            row.budget_iops = row.budget_iops.or(b.iops_budget);
            row.used_iops = Some(b.iops_used);
            row.limits = d.limits.iter().filter(|l| l.device == b.device).count();
        }
    }
    for r in rows.values_mut() {
        r.ratio = match (r.used_iops, r.budget_iops) {
            (Some(u), Some(b)) => ratio(u, b as f64),
            _ => None,
        };
    }
    rows.into_values().collect()
}

// ---------------------------------------------------------------------------------------------
// Gathering

fn host_facts() -> HostFacts {
    // SAFETY: sysconf has no preconditions.
    let (cpus, page) = unsafe {
        (
            libc::sysconf(libc::_SC_NPROCESSORS_ONLN),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kb: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let ksm = |f: &str| -> u64 {
        fs::read_to_string(format!("/sys/kernel/mm/ksm/{f}"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    HostFacts {
        cpus: cpus.max(0) as u32,
        memory_mib: mem_kb >> 10,
        page_size: page.max(0) as u64,
        ksm_running: ksm("run") == 1,
        ksm_pages_sharing: ksm("pages_sharing"),
    }
}

/// vCPU threads of a process.
fn vcpu_threads(pid: u32) -> u32 {
    ProcessDir::host(pid)
        .threads()
        .iter()
        .filter(|t| t.comm().is_ok_and(|c| is_vcpu_thread(&c)))
        .count() as u32
}

fn resident_mib(pid: u32) -> u64 {
    ProcessDir::host(pid)
        .status_kib("VmRSS")
        .map_or(0, |kb| kb >> 10)
}

/// Every qemu process on the host, with its identity.
pub fn guests(defined: &[(VmDefinition, VmPaths)]) -> Vec<GuestProc> {
    let mut resolver = Resolver::new();
    let mut out = Vec::new();
    for pid in proc::pids() {
        let Some(p) = resolver.resolve(pid) else {
            continue;
        };
        let Some(vm) = &p.vm else {
            continue;
        };
        let argv = ProcessDir::host(pid).cmdline().unwrap_or_default();
        let (smp, mem) = smp_and_memory(&argv);
        let threads = vcpu_threads(pid);
        out.push(GuestProc {
            pid,
            name: vm.name.clone(),
            uuid: vm.uuid.clone(),
            overkvm: defined
                .iter()
                .any(|(d, _)| d.name == vm.name && Some(&d.uuid) == vm.uuid.as_ref()),
            manager: vm.manager,
            namespace: vm.namespace.clone(),
            start_time: p.start_time,
            vmid: vm.vmid,
            vcpus: if threads > 0 { threads } else { smp },
            vcpu_source: if threads > 0 { "threads" } else { "smp" },
            memory_mib: mem,
            resident_mib: resident_mib(pid),
        });
    }
    out
}

fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out-pointer.
    (unsafe { libc::statvfs(c.as_ptr(), &mut s) } == 0)
        .then(|| s.f_bavail as u64 * s.f_frsize as u64)
}

/// Gathers the facts and computes the view.
pub fn gather(state_dir: &Path, config: &Config) -> anyhow::Result<Overcommit> {
    let (defined, problems) = super::load_all(state_dir)?;
    let mut notes: Vec<String> = problems.iter().map(|p| format!("skipped VM {p}")).collect();
    let host = host_facts();
    let guests = guests(&defined);
    let mut chains = Vec::new();
    for (def, _) in &defined {
        match qemu_img::info_chain(&def.overlay) {
            Ok(chain) => chains.push(DiskChain {
                vm: def.name.clone(),
                chain,
            }),
            Err(e) => notes.push(format!("{}: {e:#}", def.name)),
        }
    }
    let free = if state_dir.is_dir() {
        free_bytes(state_dir)
    } else {
        None
    };
    let mut table = DeviceTable::new();
    let budgets: Vec<(String, Option<u64>)> = config
        .devices
        .iter()
        .map(|d| {
            let name = table
                .resolve(&d.device)
                .map(|i| i.name.clone())
                .unwrap_or_else(|_| d.device.clone());
            let budget = d.iops.or(match (d.read_iops, d.write_iops) {
                (None, None) => None,
                (r, w) => Some(r.unwrap_or(0) + w.unwrap_or(0)),
            });
            (name, budget)
        })
        .collect();
    let status_path = crate::status_file::status_path(config);
    let daemon = crate::status_file::read_live(config, STATUS_FRESH);
    if daemon.is_none() {
        notes.push(format!(
            "guest IOPS unknown: no throttle daemon status at {} (or older than {}s)",
            status_path.display(),
            STATUS_FRESH.as_secs()
        ));
    }
    if guests.iter().any(|g| g.vcpu_source == "smp") {
        notes.push("vCPUs of qemus without debug-threads=on are read from -smp".to_string());
    }
    Ok(Overcommit {
        cpu: cpu_view(&host, &guests),
        memory: memory_view(&host, &guests),
        disk: disk_view(&chains, free),
        iops: iops_view(&budgets, daemon.as_ref()),
        guests,
        notes,
    })
}

fn x(r: Option<f64>) -> String {
    r.map_or("-".into(), |r| format!("{r:.2}x"))
}

/// Writes the text view.
pub fn write_text(o: &Overcommit, out: &mut impl std::io::Write) -> std::io::Result<()> {
    let c = &o.cpu;
    writeln!(
        out,
        "CPU     {} vCPUs on {} host CPUs ({}); overkvm VMs {} vCPUs",
        c.vcpus,
        c.host_cpus,
        x(c.ratio),
        c.vcpus_overkvm
    )?;
    let m = &o.memory;
    writeln!(
        out,
        "memory  {} guest RAM on {} ({}); qemu resident {}; KSM {} saves {}",
        human_bytes(m.guest_mib << 20),
        human_bytes(m.host_mib << 20),
        x(m.ratio),
        human_bytes(m.resident_mib << 20),
        if m.ksm_running { "on," } else { "off," },
        human_bytes(m.ksm_saved_mib << 20)
    )?;
    let d = &o.disk;
    writeln!(
        out,
        "disk    {} virtual in {} overlays on {} allocated ({}): overlays {}, {} base(s) {}",
        human_bytes(d.virtual_bytes),
        d.overlays,
        human_bytes(d.allocated_bytes),
        x(d.ratio),
        human_bytes(d.overlay_allocated_bytes),
        d.bases,
        human_bytes(d.base_allocated_bytes)
    )?;
    writeln!(
        out,
        "        every overlay full would need {} more; {} free",
        human_bytes(d.growth_to_full_bytes),
        d.free_bytes.map_or("unknown".into(), human_bytes)
    )?;
    if o.iops.is_empty() {
        writeln!(
            out,
            "IOPS    no device budgets (--config with [[device]] budgets)"
        )?;
    }
    for i in &o.iops {
        writeln!(
            out,
            "IOPS    {}: budget {}, guests use {} ({}), {} limit(s)",
            sanitize(&i.device),
            i.budget_iops.map_or("-".into(), |b| b.to_string()),
            i.used_iops
                .map_or("unknown".into(), |u| format!("{u:.0} (last daemon tick)")),
            x(i.ratio),
            i.limits
        )?;
    }
    if !o.guests.is_empty() {
        writeln!(
            out,
            "\n{:<8} {:<24} {:>5} {:<7} {:>8} {:>8} {:<7}",
            "PID", "VM", "VCPUS", "FROM", "MEM", "RSS", "OVERKVM"
        )?;
        for g in &o.guests {
            writeln!(
                out,
                "{:<8} {:<24} {:>5} {:<7} {:>7}M {:>7}M {:<7}",
                g.pid,
                sanitize(&g.name),
                g.vcpus,
                g.vcpu_source,
                g.memory_mib,
                g.resident_mib,
                if g.overkvm { "yes" } else { "no" }
            )?;
        }
    }
    for n in &o.notes {
        writeln!(out, "note: {}", sanitize(n))?;
    }
    Ok(())
}

/// `overkvm-io overcommit`.
pub fn run(args: &OvercommitOptions) -> anyhow::Result<()> {
    let state_dir = super::state_dir(args.state_dir.as_deref())?;
    let config = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let o = gather(&state_dir, &config)?;
    if args.json {
        println!("{}", serde_json::to_string(&o)?);
    } else {
        write_text(&o, &mut std::io::stdout().lock())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tick::{ActiveLimit, BudgetUse};

    fn guest(vcpus: u32, mem: u64, overkvm: bool) -> GuestProc {
        GuestProc {
            pid: 1,
            name: "g".into(),
            uuid: None,
            overkvm,
            manager: Manager::Qemu,
            namespace: None,
            start_time: 0,
            vmid: None,
            vcpus,
            vcpu_source: "threads",
            memory_mib: mem,
            resident_mib: mem / 2,
        }
    }

    fn host() -> HostFacts {
        HostFacts {
            cpus: 2,
            memory_mib: 24 << 10,
            page_size: 4096,
            ksm_running: true,
            ksm_pages_sharing: 2560,
        }
    }

    #[test]
    fn cpu_and_memory() {
        let g = [
            guest(2, 512, true),
            guest(4, 8192, false),
            guest(1, 256, true),
        ];
        let c = cpu_view(&host(), &g);
        assert_eq!((c.vcpus, c.vcpus_overkvm, c.ratio), (7, 3, Some(3.5)));
        let m = memory_view(&host(), &g);
        assert_eq!(
            (m.guest_mib, m.guest_mib_overkvm, m.resident_mib),
            (8960, 768, 4480)
        );
        assert_eq!(m.ksm_saved_mib, 10);
        assert!((m.ratio.unwrap() - 8960.0 / 24576.0).abs() < 1e-9);
        let none = cpu_view(&HostFacts::default(), &[]);
        assert_eq!((none.vcpus, none.ratio), (0, None));
    }

    fn img(name: &str, virt: u64, actual: u64) -> ImageInfo {
        ImageInfo {
            filename: name.into(),
            format: "qcow2".into(),
            virtual_size: virt,
            actual_size: Some(actual),
            backing_filename: None,
        }
    }

    #[test]
    fn disk_counts_shared_bases_once() {
        let base = img("/srv/base.img", 64 << 20, 64 << 20);
        let chains: Vec<DiskChain> = ["a", "b", "c"]
            .iter()
            .map(|n| DiskChain {
                vm: n.to_string(),
                chain: vec![
                    img(&format!("/v/{n}/disk.qcow2"), 64 << 20, 1 << 20),
                    base.clone(),
                ],
            })
            .collect();
        let d = disk_view(&chains, Some(100 << 20));
        assert_eq!(d.overlays, 3);
        assert_eq!(d.bases, 1);
        assert_eq!(d.virtual_bytes, 192 << 20);
        assert_eq!(d.overlay_allocated_bytes, 3 << 20);
        assert_eq!(d.base_allocated_bytes, 64 << 20);
        assert_eq!(d.allocated_bytes, 67 << 20);
        assert_eq!(d.growth_to_full_bytes, 189 << 20);
        assert!((d.ratio.unwrap() - 192.0 / 67.0).abs() < 1e-9);
        let empty = disk_view(&[], None);
        assert_eq!((empty.virtual_bytes, empty.ratio), (0, None));
        // An overlay bigger than its base, and a chain of two bases.
        let deep = DiskChain {
            vm: "d".into(),
            chain: vec![
                img("/v/d", 128 << 20, 0),
                img("/mid", 64 << 20, 1 << 20),
                base,
            ],
        };
        let d = disk_view(&[chains[0].clone(), deep], None);
        assert_eq!((d.bases, d.base_allocated_bytes), (2, 65 << 20));
        assert_eq!(d.growth_to_full_bytes, (63 << 20) + (128 << 20));
    }

    #[test]
    fn iops_budget_against_daemon() {
        let budgets = vec![
            ("loop0".to_string(), Some(3000)),
            ("vdb".to_string(), Some(500)),
        ];
        let rows = iops_view(&budgets, None);
        assert_eq!(rows.len(), 2);
        assert!(
            rows.iter()
                .all(|r| r.used_iops.is_none() && r.ratio.is_none())
        );
        let view = ThrottleView {
            budgets: vec![
                BudgetUse {
                    storage: false,
                    device: "loop0".into(),
                    iops_budget: Some(3000),
                    iops_used: 2700.0,
                    engaged: false,
                    ..BudgetUse::default()
                },
                BudgetUse {
                    storage: false,
                    device: "sdz".into(),
                    iops_budget: Some(100),
                    iops_used: 150.0,
                    engaged: true,
                    ..BudgetUse::default()
                },
            ],
            limits: vec![ActiveLimit {
                vm: "a".into(),
                cgroup: "/overkvm/vm-a".into(),
                device: "sdz".into(),
                riops: Some(50),
                wiops: None,
                rbps: None,
                wbps: None,
                since_s: 1.0,
                qemu_disks: None,
            }],
            ..ThrottleView::default()
        };
        let rows = iops_view(&budgets, Some(&view));
        let by: BTreeMap<&str, &IopsView> = rows.iter().map(|r| (r.device.as_str(), r)).collect();
        assert_eq!(by["loop0"].ratio, Some(0.9));
        assert_eq!(by["vdb"].used_iops, None);
        assert_eq!((by["sdz"].ratio, by["sdz"].limits), (Some(1.5), 1));
    }

    #[test]
    fn text_view() {
        let o = Overcommit {
            cpu: cpu_view(&host(), &[guest(3, 512, true)]),
            memory: memory_view(&host(), &[guest(3, 512, true)]),
            disk: disk_view(&[], Some(1 << 30)),
            iops: vec![],
            guests: vec![guest(3, 512, true)],
            notes: vec!["x\x1b[2J".into()],
        };
        let mut out = Vec::new();
        write_text(&o, &mut out).unwrap();
        let t = String::from_utf8(out).unwrap();
        assert!(t.contains("3 vCPUs on 2 host CPUs (1.50x)"), "{t}");
        assert!(t.contains("KSM on, saves 10.0 MiB"), "{t}");
        assert!(t.contains("note: x\\x1b[2J"), "{t}");
        assert!(!t.contains('\x1b'));
    }
}
