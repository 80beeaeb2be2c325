//! libvirt's domains as overkvm reads them without touching their monitors: the disks of a
//! domain from libvirt's status XML (`/run/libvirt/qemu/NAME.xml`, root's, written by
//! libvirtd for every running domain) and QEMU's counters of them through libvirt's public
//! API (`virsh domstats --block`). libvirt owns a domain's QMP monitor; a second client on it
//! would be refused, or worse, confuse libvirt's view of the domain.
//!
//! Which disks QEMU counts for overkvm is decided as for every VM (`backing::classify`): the
//! disk's `<source>` becomes the protocol node QEMU would report (a network disk's protocol
//! and URL, a file, a block device), so the rule and the credential stripping exist once.
//! Parsing is pure; [`poll`] is the thin layer that reads files and runs virsh.
//!
//! [`virsh`] is overkvm's one way to run libvirt's client, with a timeout on every call: the
//! counters' polls here and the throttle's reads and writes of a domain's limits
//! ([`blkdeviotune`], [`domstats`]).

use std::{
    collections::HashMap,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail};

use super::{
    backing::{self, Backing, BlockNode, DiskCounters, Mount},
    counters::{NetDiskReading, QemuReading},
    limits::{QemuThrottle, parse_virsh_blkdeviotune},
};
use crate::identity::managers;

/// Where libvirt keeps its running domains' status XML and pidfiles.
pub const RUN_DIR: &str = "/run/libvirt/qemu";
/// Longest status XML read (a domain with hundreds of disks stays far below).
const MAX_STATUS_XML: usize = 1 << 20;
/// One `virsh domstats` run of the counters: a hung libvirtd costs a pool worker this long,
/// never the interval.
const VIRSH_TIMEOUT: Duration = Duration::from_secs(3);

/// One `<disk>` of a domain XML that has a `<target dev=...>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainDisk<'a> {
    /// `<target dev=...>`: the disk as libvirt and `virsh domstats` name it (`vda`).
    pub target: &'a str,
    /// `<disk type=...>`: `file`, `block`, `network`, `volume`, `nvme`, ...
    pub kind: &'a str,
    /// The element's body (between `<disk ...>` and `</disk>`).
    pub body: &'a str,
}

/// The `<disk>` elements of the `<domain>` in a libvirt XML (a status XML's preamble, which
/// may hold `<disk>`-looking capability data, is skipped).
pub fn domain_disks(xml: &str) -> Vec<DomainDisk<'_>> {
    let Some(at) = managers::find_start_tag(xml, "domain").map(|(at, _, _)| at) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut rest = &xml[at..];
    while let Some((_, tag, after)) = managers::find_start_tag(rest, "disk") {
        if tag.ends_with('/') {
            rest = after;
            continue;
        }
        let Some(end) = after.find("</disk>") else {
            break;
        };
        let body = &after[..end];
        rest = &after[end..];
        let Some(target) = managers::find_start_tag(body, "target")
            .and_then(|(_, t, _)| managers::attribute(t, "dev"))
            .filter(|d| !d.is_empty())
        else {
            continue;
        };
        out.push(DomainDisk {
            target,
            kind: managers::attribute(tag, "type").unwrap_or("file"),
            body,
        });
    }
    out
}

/// The protocol node QEMU gets for a libvirt disk: its driver and file name as
/// `query-named-block-nodes` would show them. None for disks whose I/O QEMU does not do
/// itself or whose storage libvirt resolves elsewhere (`volume` of a pool, `vhostuser`):
/// not counted from QEMU, so never counted twice.
fn protocol_node(disk: &DomainDisk) -> Option<BlockNode> {
    let (_, source, _) = managers::find_start_tag(disk.body, "source")?;
    let attr = |k: &str| managers::attribute(source, k).unwrap_or("");
    match disk.kind {
        "file" => Some(BlockNode {
            drv: "file".into(),
            file: attr("file").to_string(),
        }),
        "block" => Some(BlockNode {
            drv: "host_device".into(),
            file: attr("dev").to_string(),
        }),
        "network" => {
            let protocol = attr("protocol");
            let name = attr("name");
            // The first `<host>` (Ceph monitors and Gluster servers list several).
            let host = managers::find_start_tag(disk.body, "host").map(|(_, t, _)| t);
            let h = |k: &str| host.and_then(|t| managers::attribute(t, k)).unwrap_or("");
            let authority = match h("port") {
                "" => h("name").to_string(),
                p => format!("{}:{p}", h("name")),
            };
            let file = match protocol {
                "" => return None,
                // rbd's name is `pool[/namespace]/image`: QEMU's own `rbd:` spelling.
                "rbd" => format!("rbd:{name}"),
                _ => format!("{protocol}://{authority}/{}", name.trim_start_matches('/')),
            };
            Some(BlockNode {
                drv: protocol.to_string(),
                file,
            })
        }
        // A PCI NVMe controller handed to QEMU through vfio: no host block device.
        "nvme" => Some(BlockNode {
            drv: "nvme".into(),
            file: String::new(),
        }),
        _ => None,
    }
}

/// The disks of a domain that QEMU counts for overkvm, with their storage target
/// (credentials stripped). `mount_of_file` answers for a host file's path with its mount.
pub fn network_disks(
    xml: &str,
    mount_of_file: impl Fn(&str) -> Option<Mount>,
) -> Vec<(String, String)> {
    domain_disks(xml)
        .iter()
        .filter_map(|d| {
            let node = protocol_node(d)?;
            match backing::classify(Some(&node), &mount_of_file) {
                Backing::Network { target } => Some((d.target.to_string(), target)),
                Backing::HostBlock => None,
            }
        })
        .collect()
}

/// QEMU's counters of libvirt domains' disks: domain → (disk as libvirt names it, counters).
pub type DomainStats = HashMap<String, Vec<(String, DiskCounters)>>;

/// `virsh domstats --block` output: per domain, per disk (`block.N.name`), QEMU's counters as
/// libvirt passes them on (`rd.reqs`, `rd.bytes`, `rd.times` in ns, `wr.*`, `fl.reqs`,
/// `fl.times`). libvirt does not pass on discard counters: they stay 0.
pub fn parse_domstats(text: &str) -> DomainStats {
    let mut out = DomainStats::new();
    let mut domain: Option<String> = None;
    let mut blocks: std::collections::BTreeMap<u32, (Option<String>, DiskCounters)> =
        Default::default();
    let mut flush = |domain: &Option<String>, blocks: &mut std::collections::BTreeMap<_, _>| {
        if let Some(d) = domain {
            let disks = out.entry(d.clone()).or_default();
            for (_, (name, c)) in std::mem::take(blocks) {
                if let Some(n) = name {
                    disks.push((n, c));
                }
            }
        }
        blocks.clear();
    };
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("Domain:") {
            flush(&domain, &mut blocks);
            let name = rest.trim();
            let name = name
                .strip_prefix('\'')
                .and_then(|n| n.strip_suffix('\''))
                .unwrap_or(name);
            domain = Some(name.to_string());
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let Some((idx, field)) = key
            .strip_prefix("block.")
            .and_then(|rest| rest.split_once('.'))
        else {
            continue;
        };
        let Ok(idx) = idx.parse::<u32>() else {
            continue;
        };
        // A domain has at most a few hundred disks; more is not libvirt talking.
        if blocks.len() >= 4096 && !blocks.contains_key(&idx) {
            continue;
        }
        let b = blocks.entry(idx).or_default();
        let n = value.trim().parse().unwrap_or(0);
        let c = &mut b.1;
        match field {
            "name" => b.0 = Some(value.trim().to_string()),
            "rd.reqs" => c.rd_operations = n,
            "rd.bytes" => c.rd_bytes = n,
            "rd.times" => c.rd_total_time_ns = n,
            "wr.reqs" => c.wr_operations = n,
            "wr.bytes" => c.wr_bytes = n,
            "wr.times" => c.wr_total_time_ns = n,
            "fl.reqs" => c.flush_operations = n,
            "fl.times" => c.flush_total_time_ns = n,
            _ => {}
        }
    }
    flush(&domain, &mut blocks);
    out
}

/// What is known of one running domain between polls: re-read only when its status XML
/// changes (libvirt rewrites it on hotplug, block jobs and restarts).
#[derive(Clone, Debug)]
struct DomainFacts {
    stamp: (SystemTime, u64),
    pid: u32,
    /// Network disk (`vda`) → target.
    network: Vec<(String, String)>,
}

/// What a libvirt poll keeps between intervals.
#[derive(Debug, Default)]
pub struct Known {
    domains: HashMap<String, DomainFacts>,
}

/// Domain `name`'s status XML in `run_dir`; None for a name that is not a plain file name, no
/// file, or one over `MAX_STATUS_XML` (1 MiB).
pub fn status_xml(run_dir: &Path, name: &str) -> Option<String> {
    if !managers::is_safe_file_stem(name) {
        return None;
    }
    match crate::host::read_capped(&run_dir.join(format!("{name}.xml")), MAX_STATUS_XML) {
        Ok((raw, false)) => Some(String::from_utf8_lossy(&raw).into_owned()),
        _ => None,
    }
}

/// Brings `known` up to date with the status XMLs in `run_dir`: one `stat` per domain, a
/// read and parse only of those that changed.
fn refresh(run_dir: &Path, known: &mut Known) {
    let mut seen = Vec::new();
    for e in std::fs::read_dir(run_dir).into_iter().flatten().flatten() {
        let path = e.path();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".xml"))
            .filter(|n| managers::is_safe_file_stem(n))
        else {
            continue;
        };
        let Ok(meta) = e.metadata() else { continue };
        let stamp = (
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            meta.len(),
        );
        seen.push(name.to_string());
        if known.domains.get(name).is_some_and(|f| f.stamp == stamp) {
            continue;
        }
        let Some(xml) = status_xml(run_dir, name) else {
            continue;
        };
        let Some(pid) = managers::domstatus_pid(&xml) else {
            continue;
        };
        let mountinfo =
            std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default();
        let mounts = backing::parse_mountinfo(&mountinfo);
        let network = network_disks(&xml, |f| super::counters::mount_in(pid, &mounts, f));
        known.domains.insert(
            name.to_string(),
            DomainFacts {
                stamp,
                pid,
                network,
            },
        );
    }
    known.domains.retain(|n, _| seen.contains(n));
}

/// Runs `virsh ARGS` against the system daemon, killed after `timeout`; its stdout. Every call
/// has a timeout: libvirtd runs one job per domain at a time and may hang, and whoever waits on
/// it (a counter pool worker, the throttle's control tick) must lose that long, never forever.
pub fn virsh(timeout: Duration, args: &[impl AsRef<str>]) -> anyhow::Result<String> {
    // The daemon whose status XML under /run/libvirt/qemu named the domains, unless the
    // operator's environment names another.
    let uri = std::env::var("LIBVIRT_DEFAULT_URI").unwrap_or_else(|_| "qemu:///system".into());
    virsh_at(&uri, timeout, args)
}

/// Runs `virsh -c URI ARGS`, killed after `timeout`; its stdout, or an error with its stderr.
fn virsh_at(uri: &str, timeout: Duration, args: &[impl AsRef<str>]) -> anyhow::Result<String> {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let mut cmd = Command::new("timeout");
    cmd.arg(format!("{}", timeout.as_secs_f64()))
        .args(["virsh", "-c", uri]);
    let out = cmd
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .context("running virsh (libvirt's client, to read libvirt domains' disks and change their QEMU limits)")?;
    if !out.status.success() {
        bail!(
            "virsh {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A domain's disk's QEMU limits as libvirt reports them now (`virsh blkdeviotune DOMAIN
/// TARGET --live`).
pub fn blkdeviotune(timeout: Duration, domain: &str, target: &str) -> anyhow::Result<QemuThrottle> {
    Ok(parse_virsh_blkdeviotune(&virsh(
        timeout,
        &["blkdeviotune", domain, target, "--live"],
    )?))
}

/// QEMU's counters of the disks of `domains` (by name), all in one `virsh domstats --block`
/// run however many domains there are: domain → disk → counters.
pub fn domstats(timeout: Duration, domains: &[String]) -> anyhow::Result<DomainStats> {
    let mut args: Vec<&str> = vec!["domstats", "--block"];
    args.extend(domains.iter().map(String::as_str));
    Ok(parse_domstats(&virsh(timeout, &args)?))
}

/// One poll of every libvirt domain with a disk QEMU counts: the status XMLs that changed,
/// then, only when some domain has such a disk, one `virsh domstats --block` for all of them
/// (`--nowait`: a domain whose monitor is busy is left out rather than waited for).
pub fn poll(run_dir: &Path, known: &mut Known) -> anyhow::Result<Vec<QemuReading>> {
    refresh(run_dir, known);
    if known.domains.values().all(|d| d.network.is_empty()) {
        return Ok(Vec::new());
    }
    let stats = parse_domstats(&virsh(
        VIRSH_TIMEOUT,
        &["domstats", "--block", "--list-active", "--nowait"],
    )?);
    Ok(readings(&known.domains, &stats))
}

/// One reading of every libvirt domain's network disks, now (for `vm list`).
pub fn read_once(run_dir: &Path) -> anyhow::Result<Vec<QemuReading>> {
    poll(run_dir, &mut Known::default())
}

/// Joins the domains' network disks with their counters.
fn readings(domains: &HashMap<String, DomainFacts>, stats: &DomainStats) -> Vec<QemuReading> {
    domains
        .iter()
        .filter(|(_, f)| !f.network.is_empty())
        .filter_map(|(name, f)| {
            let disks = stats.get(name)?;
            let disks: Vec<NetDiskReading> = f
                .network
                .iter()
                .filter_map(|(dev, target)| {
                    let c = disks.iter().find(|(n, _)| n == dev)?.1;
                    Some(NetDiskReading {
                        disk: dev.clone(),
                        target: target.clone(),
                        counters: c,
                    })
                })
                .collect();
            Some(QemuReading { pid: f.pid, disks })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A status XML as libvirt 9.0 writes it (abridged): an NBD disk, an rbd disk with its
    /// secret, a local file, a block device and a pool volume.
    const STATUS: &str = "<domstatus state='running' reason='booted' pid='4242'>\n\
        <qemuCaps><disk type='network'><target dev='fake'/></disk></qemuCaps>\n\
        <domain type='qemu' id='7'>\n<name>web</name>\n<devices>\n\
        <disk type='network' device='disk'>\n<driver name='qemu' type='raw'/>\n\
          <source protocol='nbd' name='exp' tls='no' index='3'>\n<host name='127.0.0.1' port='10809'/>\n</source>\n\
          <target dev='vda' bus='virtio'/>\n</disk>\n\
        <disk type='network' device='disk'>\n<auth username='admin'><secret type='ceph' uuid='0c2b'/></auth>\n\
          <source protocol='rbd' name='pool/img'>\n<host name='mon1' port='6789'/><host name='mon2' port='6789'/>\n</source>\n\
          <target dev='vdb' bus='virtio'/>\n</disk>\n\
        <disk type='network' device='disk'>\n\
          <source protocol='iscsi' name='iqn.2013-07.com.example:t/2'>\n<host name='10.0.0.5' port='3260'/>\n</source>\n\
          <target dev='vdc' bus='virtio'/>\n</disk>\n\
        <disk type='file' device='disk'>\n<source file='/var/lib/libvirt/images/l.qcow2'/>\n\
          <target dev='vdd' bus='virtio'/>\n</disk>\n\
        <disk type='file' device='disk'>\n<source file='/mnt/nfs/vm.img'/>\n\
          <target dev='vde' bus='virtio'/>\n</disk>\n\
        <disk type='block' device='disk'>\n<source dev='/dev/sdb'/>\n<target dev='sda' bus='scsi'/>\n</disk>\n\
        <disk type='volume' device='disk'>\n<source pool='p' volume='v'/>\n<target dev='sdb' bus='scsi'/>\n</disk>\n\
        </devices>\n</domain>\n</domstatus>\n";

    fn mounts(path: &str) -> Option<Mount> {
        let m = backing::parse_mountinfo(
            "22 1 254:1 / / rw - ext4 /dev/vda1 rw\n40 22 0:50 / /mnt/nfs rw - nfs4 srv:/export rw\n",
        );
        backing::mount_of(&m, path).cloned()
    }

    #[test]
    fn network_disks_and_targets_come_from_the_status_xml() {
        let net = network_disks(STATUS, mounts);
        assert_eq!(
            net,
            [
                ("vda".to_string(), "nbd://127.0.0.1:10809/exp".to_string()),
                ("vdb".to_string(), "rbd:pool/img".to_string()),
                (
                    "vdc".to_string(),
                    "iscsi://10.0.0.5:3260/iqn.2013-07.com.example:t/2".to_string()
                ),
                ("vde".to_string(), "nfs://srv/export/vm.img".to_string()),
            ],
            "local files, block devices and pool volumes stay eBPF's"
        );
        assert!(net.iter().all(|(_, t)| !t.contains("admin")));
        assert_eq!(
            domain_disks(STATUS).len(),
            7,
            "the preamble's disk is not the domain's"
        );
        for bad in [
            "",
            "<domain>",
            "<domain><disk type='network'><target dev='x'/>",
            "<domain><disk type='network'><source/><target dev='x'/></disk></domain>",
        ] {
            assert!(network_disks(bad, mounts).is_empty(), "{bad}");
        }
    }

    /// A libvirtd that accepts and never answers: virsh is killed at its timeout, an error.
    #[test]
    fn a_hung_libvirtd_costs_one_timeout() {
        let has_virsh = Command::new("virsh")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !has_virsh {
            eprintln!("skipped: no virsh here (libvirt-clients)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("libvirt-sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let h = std::sync::Arc::clone(&held);
        std::thread::spawn(move || {
            for s in listener.incoming().flatten() {
                h.lock().unwrap().push(s);
            }
        });
        let uri = format!("qemu+unix:///system?socket={}", sock.display());
        let t = std::time::Instant::now();
        let r = virsh_at(&uri, Duration::from_millis(800), &["domstats", "--block"]);
        let took = t.elapsed();
        assert!(r.is_err(), "{r:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
        assert_eq!(
            held.lock().unwrap().len(),
            1,
            "virsh did reach the hung daemon"
        );
    }

    /// `virsh domstats --block` of libvirt 9.0: two domains, one with a network disk.
    #[test]
    fn domstats_counters_per_domain_and_disk() {
        let text = "Domain: 'web'\n  block.count=2\n  block.0.name=vda\n  block.0.rd.reqs=120\n\
            block.0.rd.bytes=491520\n  block.0.rd.times=1200000\n  block.0.wr.reqs=30\n\
            block.0.wr.bytes=122880\n  block.0.wr.times=600000\n  block.0.fl.reqs=4\n\
            block.0.fl.times=80000\n  block.0.allocation=0\n  block.1.name=vdd\n\
            block.1.path=/var/lib/l.qcow2\n  block.1.rd.reqs=9\n\n\
            Domain: 'db'\n  block.count=0\n\nDomain: 'odd'\n  block.x.name=vda\n  block.0.rd.reqs=zz\n";
        let s = parse_domstats(text);
        let web = &s["web"];
        assert_eq!(web.len(), 2);
        let (name, c) = &web[0];
        assert_eq!(name, "vda");
        assert_eq!(
            (
                c.rd_operations,
                c.rd_bytes,
                c.wr_operations,
                c.wr_bytes,
                c.flush_operations
            ),
            (120, 491_520, 30, 122_880, 4)
        );
        assert_eq!(c.lat_avg_us(), Some(1_880_000.0 / 154.0 / 1000.0));
        assert!(s["db"].is_empty());
        assert!(s["odd"].is_empty(), "a block without a name is not a disk");

        let mut domains = HashMap::new();
        domains.insert(
            "web".to_string(),
            DomainFacts {
                stamp: (SystemTime::UNIX_EPOCH, 0),
                pid: 4242,
                network: vec![("vda".into(), "nbd://h:1/e".into())],
            },
        );
        let r = readings(&domains, &s);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].pid, 4242);
        assert_eq!(r[0].disks.len(), 1, "only the network disk: {r:?}");
        assert_eq!(r[0].disks[0].disk, "vda");
        assert_eq!(r[0].disks[0].counters.rd_operations, 120);
    }

    #[test]
    fn domstats_are_read_per_domain_and_disk() {
        let text = "Domain: 'web'\n  block.count=2\n  block.0.name=vda\n  block.0.path=/v/a.img\n\
            block.0.rd.reqs=10\n  block.0.rd.bytes=40960\n  block.0.wr.reqs=5\n  block.0.wr.bytes=20480\n\
            block.1.name=vdb\n  block.1.wr.reqs=x\n\nDomain: 'db'\n  block.count=0\n\
            block.7.rd.reqs=3\n";
        let s = parse_domstats(text);
        let c = |disk: &str| {
            let c = s["web"].iter().find(|(n, _)| n == disk).unwrap().1;
            [c.rd_operations, c.wr_operations, c.rd_bytes, c.wr_bytes]
        };
        assert_eq!(c("vda"), [10, 5, 40960, 20480]);
        assert_eq!(c("vdb"), [0, 0, 0, 0]);
        assert!(s["db"].is_empty(), "a block without a name is left out");
        assert!(parse_domstats("garbage\nblock.x.name=1\n").is_empty());
    }
}
