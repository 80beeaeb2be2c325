//! Limits QEMU itself enforces on a disk (`block_set_io_throttle`), as opposed to the cgroup
//! limits of the throttle daemon. OpenStack Nova (`quota:disk_*_sec`, written as libvirt
//! `<iotune>`) and Proxmox (`iops_rd`, `mbps_wr`...) limit disks this way, inside qemu.
//!
//! One model of a VM's disks and their settings ([`QemuDisk`], [`QemuThrottle`]) for everyone
//! who reads or writes them: the throttle's QEMU actuator, `vm list`, the status file, top and
//! the exporter (which show [`DiskLimits`], the six rates of a [`QemuThrottle`]). Read and
//! written only through their owner: overkvm's own VMs over their QMP socket (`query-block`,
//! `block_set_io_throttle`), libvirt's domains from the live definition libvirt keeps in its
//! status XML (`/run/libvirt/qemu/NAME.xml`, `<disk>` → `<iotune>`) and with `virsh
//! blkdeviotune`, Proxmox VMs (read only) from their config (`/etc/pve/qemu-server/VMID.conf`,
//! which `qm set` updates when it changes a running VM's limits): libvirt and Proxmox own their
//! VMs' monitors, so overkvm never talks to them. The parsers and the argument builders are
//! pure.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::identity::managers::{self, domstatus_pid};

/// QMP's name of each numeric throttle setting, and libvirt's (`<iotune>` element, and the
/// `virsh blkdeviotune` option with `-` for `_`).
pub const SETTINGS: [(&str, &str); 19] = [
    ("bps", "total_bytes_sec"),
    ("bps_rd", "read_bytes_sec"),
    ("bps_wr", "write_bytes_sec"),
    ("iops", "total_iops_sec"),
    ("iops_rd", "read_iops_sec"),
    ("iops_wr", "write_iops_sec"),
    ("bps_max", "total_bytes_sec_max"),
    ("bps_rd_max", "read_bytes_sec_max"),
    ("bps_wr_max", "write_bytes_sec_max"),
    ("iops_max", "total_iops_sec_max"),
    ("iops_rd_max", "read_iops_sec_max"),
    ("iops_wr_max", "write_iops_sec_max"),
    ("bps_max_length", "total_bytes_sec_max_length"),
    ("bps_rd_max_length", "read_bytes_sec_max_length"),
    ("bps_wr_max_length", "write_bytes_sec_max_length"),
    ("iops_max_length", "total_iops_sec_max_length"),
    ("iops_rd_max_length", "read_iops_sec_max_length"),
    ("iops_wr_max_length", "write_iops_sec_max_length"),
    ("iops_size", "size_iops_sec"),
];

/// Every throttle setting of one disk, by QMP name; absent is 0 (QEMU's "unlimited"). A burst
/// length of 1 is QEMU's default and is kept absent too.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuThrottle {
    #[serde(default)]
    pub values: BTreeMap<String, u64>,
    /// QEMU throttle group (disks of one VM sharing limits), libvirt's `group_name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

impl QemuThrottle {
    pub fn get(&self, k: &str) -> u64 {
        self.values.get(k).copied().unwrap_or(0)
    }

    pub fn set(&mut self, k: &str, v: u64) {
        if v == 0 || (k.ends_with("_length") && v <= 1) {
            self.values.remove(k);
        } else {
            self.values.insert(k.to_string(), v);
        }
    }

    /// From QMP-named numbers (a `query-block` entry's `inserted`).
    fn from_qmp(inserted: &Value) -> QemuThrottle {
        let mut t = QemuThrottle::default();
        for (k, _) in SETTINGS {
            t.set(k, inserted.get(k).and_then(Value::as_u64).unwrap_or(0));
        }
        t.group = inserted
            .get("group")
            .and_then(Value::as_str)
            .filter(|g| !g.is_empty())
            .map(str::to_string);
        t
    }

    /// From libvirt-named values (`<iotune>` children, or `virsh blkdeviotune` lines).
    fn from_libvirt(get: impl Fn(&str) -> Option<String>) -> QemuThrottle {
        let mut t = QemuThrottle::default();
        for (q, l) in SETTINGS {
            t.set(q, get(l).and_then(|v| v.trim().parse().ok()).unwrap_or(0));
        }
        t.group = get("group_name")
            .map(|g| g.trim().to_string())
            .filter(|g| !g.is_empty());
        t
    }

    /// What `vm list`, `throttle status`, top and the metrics show of it.
    pub fn shown(&self, disk: &str) -> DiskLimits {
        let n = |k: &str| Some(self.get(k)).filter(|&v| v > 0);
        DiskLimits {
            disk: disk.to_string(),
            iops: n("iops"),
            iops_rd: n("iops_rd"),
            iops_wr: n("iops_wr"),
            bps: n("bps"),
            bps_rd: n("bps_rd"),
            bps_wr: n("bps_wr"),
        }
    }

    /// Arguments of `block_set_io_throttle` for a disk: the six rates are mandatory, the rest
    /// is sent when set (QEMU's defaults otherwise: no burst, length 1).
    pub fn qmp_arguments(&self, disk: &DiskRef) -> Value {
        let mut a = match disk {
            DiskRef::Device(d) => json!({ "device": d }),
            DiskRef::Qdev(q) => json!({ "id": q }),
        };
        for (i, (k, _)) in SETTINGS.iter().enumerate() {
            let v = self.get(k);
            if i < 6 || v > 0 {
                a[*k] = json!(v);
            }
        }
        if let Some(g) = &self.group {
            a["group"] = json!(g);
        }
        a
    }

    /// The families (see [`family`]) whose values differ between `self` and `other`.
    pub fn families_differing(&self, other: &QemuThrottle) -> Vec<String> {
        let mut f: Vec<String> = SETTINGS
            .iter()
            .filter(|(k, _)| self.get(k) != other.get(k))
            .map(|(k, _)| family(k))
            .collect();
        f.dedup();
        f
    }

    /// `virsh blkdeviotune DOMAIN TARGET --live ...` taking the disk from `now` (its settings as
    /// just read) to `self`: every member of each family that changes, and the group when it
    /// changes. libvirt keeps each family it is not given as it is at that moment, so a family
    /// someone else sets meanwhile (an operator's bandwidth cap while overkvm limits IOPS) is
    /// not overwritten with the value overkvm read before. None when nothing changes.
    pub fn virsh_arguments(
        &self,
        now: &QemuThrottle,
        domain: &str,
        target: &str,
    ) -> Option<Vec<String>> {
        let families = self.families_differing(now);
        let group = self
            .group
            .as_ref()
            .filter(|g| now.group.as_ref() != Some(*g));
        if families.is_empty() && group.is_none() {
            return None;
        }
        let mut a: Vec<String> = vec![
            "blkdeviotune".into(),
            domain.into(),
            target.into(),
            "--live".into(),
        ];
        for (q, l) in SETTINGS {
            if families.contains(&family(q)) {
                a.push(format!("--{}", l.replace('_', "-")));
                a.push(self.get(q).to_string());
            }
        }
        if let Some(g) = group {
            a.push("--group-name".into());
            a.push(g.clone());
        }
        Some(a)
    }
}

/// The family of a setting: the settings libvirt sets together (`iops_rd_max` → `iops_max`).
/// Given one member of a family, `virsh blkdeviotune` sets the whole family (the members not
/// given to 0, as QEMU takes a total or per-direction rates, never both) and keeps every family
/// it is not given.
pub fn family(setting: &str) -> String {
    setting.replacen("_rd", "", 1).replacen("_wr", "", 1)
}

/// How QMP names a disk: by its `-drive` id (`device`) or by its guest device (`qdev`, for
/// `-blockdev` disks).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskRef {
    Device(String),
    Qdev(String),
}

impl DiskRef {
    pub fn name(&self) -> &str {
        match self {
            DiskRef::Device(s) | DiskRef::Qdev(s) => s,
        }
    }
}

/// One disk of a VM as QEMU (or libvirt) shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuDisk {
    /// QMP's name for it, or libvirt's target (`vda`).
    pub disk: DiskRef,
    /// The image file or block device on the host, when known.
    pub file: Option<String>,
    /// The host page cache is between the guest and the disk (`cache=writeback`,
    /// `writethrough`, `unsafe`): writes reach the disk from the kernel's flusher threads.
    pub host_cache: bool,
    pub throttle: QemuThrottle,
}

/// Disks of a `query-block` reply (entries without a medium are left out).
pub fn disks_from_query_block(reply: &Value) -> Vec<QemuDisk> {
    let Some(list) = reply.as_array() else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|b| {
            let ins = b.get("inserted")?;
            let disk = match b.get("device").and_then(Value::as_str) {
                Some(d) if !d.is_empty() => DiskRef::Device(d.to_string()),
                _ => DiskRef::Qdev(b.get("qdev").and_then(Value::as_str)?.to_string()),
            };
            Some(QemuDisk {
                disk,
                file: ins.get("file").and_then(Value::as_str).map(str::to_string),
                // `cache.direct` is O_DIRECT on the image: no host page cache.
                host_cache: !ins
                    .get("cache")
                    .and_then(|c| c.get("direct"))
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
                throttle: QemuThrottle::from_qmp(ins),
            })
        })
        .collect()
}

/// Disks of a libvirt domain XML (status XML: the live definition), named by their target.
/// A disk without `cache=` runs with QEMU's default, writeback.
pub fn disks_from_libvirt_xml(xml: &str) -> Vec<QemuDisk> {
    libvirt_disks(xml)
        .into_iter()
        .map(|(target, disk, iotune)| {
            let file = managers::find_start_tag(disk, "source").and_then(|(_, t, _)| {
                managers::attribute(t, "file")
                    .or_else(|| managers::attribute(t, "dev"))
                    .map(str::to_string)
            });
            let cache = managers::find_start_tag(disk, "driver")
                .and_then(|(_, t, _)| managers::attribute(t, "cache"))
                .unwrap_or("default");
            QemuDisk {
                disk: DiskRef::Device(target.to_string()),
                file,
                host_cache: !matches!(cache, "none" | "directsync"),
                throttle: QemuThrottle::from_libvirt(|k| managers::element_text(iotune, k)),
            }
        })
        .collect()
}

/// `virsh blkdeviotune DOMAIN TARGET` output (`total_iops_sec: 500` lines).
pub fn parse_virsh_blkdeviotune(text: &str) -> QemuThrottle {
    let map: HashMap<&str, &str> = text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect();
    QemuThrottle::from_libvirt(|k| map.get(k).map(|v| v.to_string()))
}

/// QEMU's limits on one disk; `None` where unlimited (QEMU and libvirt write 0 for that).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskLimits {
    /// The disk as its owner names it: libvirt's target (`vda`), QEMU's device or qdev id.
    pub disk: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iops: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iops_rd: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iops_wr: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bps: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bps_rd: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bps_wr: Option<u64>,
}

impl DiskLimits {
    fn fields(&self) -> [(&'static str, Option<u64>); 6] {
        [
            ("iops", self.iops),
            ("iops_rd", self.iops_rd),
            ("iops_wr", self.iops_wr),
            ("bps", self.bps),
            ("bps_rd", self.bps_rd),
            ("bps_wr", self.bps_wr),
        ]
    }

    pub fn is_unlimited(&self) -> bool {
        self.fields().iter().all(|(_, v)| v.is_none())
    }

    /// `vda iops=500 bps_wr=10000000`.
    pub fn text(&self) -> String {
        let mut s = self.disk.clone();
        for (k, v) in self.fields() {
            if let Some(v) = v {
                s.push_str(&format!(" {k}={v}"));
            }
        }
        s
    }
}

fn nonzero(v: Option<u64>) -> Option<u64> {
    v.filter(|&v| v > 0)
}

/// Limits from a `query-block` reply: one entry per disk with a medium, named by its device
/// (`-drive id`) or, for `-blockdev` disks, its qdev path. Disks without limits are left out.
pub fn from_query_block(reply: &Value) -> Vec<DiskLimits> {
    shown_limits(disks_from_query_block(reply))
}

/// The limits of `disks` as [`DiskLimits`] shows them, without the unlimited disks.
fn shown_limits(disks: Vec<QemuDisk>) -> Vec<DiskLimits> {
    disks
        .into_iter()
        .map(|d| d.throttle.shown(d.disk.name()))
        .filter(|l| !l.is_unlimited())
        .collect()
}

/// The `<disk>` elements of a libvirt domain XML that have a `<target dev=...>`: (target,
/// the disk element's body, the `<iotune>` body or "" when it has none).
pub fn libvirt_disks(xml: &str) -> Vec<(&str, &str, &str)> {
    super::libvirt::domain_disks(xml)
        .into_iter()
        .map(|d| {
            let iotune = match managers::find_start_tag(d.body, "iotune") {
                Some((_, t, body)) if !t.ends_with('/') => {
                    body.find("</iotune>").map_or(body, |e| &body[..e])
                }
                _ => "",
            };
            (d.target, d.body, iotune)
        })
        .collect()
}

/// Limits from a libvirt domain XML (a status XML holds the live definition): the `<iotune>`
/// of each `<disk>`, named by its `<target dev=...>`. Disks without limits are left out.
pub fn from_libvirt_xml(xml: &str) -> Vec<DiskLimits> {
    shown_limits(disks_from_libvirt_xml(xml))
}

/// Disk keys of a Proxmox VM config that can carry throttling (`scsi0`, `virtio3`...).
fn is_pve_disk_key(k: &str) -> bool {
    ["ide", "sata", "scsi", "virtio"].iter().any(|p| {
        k.strip_prefix(p)
            .is_some_and(|n| !n.is_empty() && n.len() <= 2 && n.bytes().all(|c| c.is_ascii_digit()))
    })
}

/// Proxmox's `mbps*` are MiB/s with a fraction; qemu-server hands QEMU `int(v * 1024 * 1024)`.
fn pve_mbps(v: &str) -> Option<u64> {
    let v: f64 = v.trim().parse().ok()?;
    // Below 1 byte/s (a tiny fraction) is 0 to QEMU: unlimited.
    nonzero((v.is_finite() && v > 0.0 && v < 1e12).then_some((v * 1024.0 * 1024.0) as u64))
}

/// Limits from a Proxmox VM config: the `iops*` and `mbps*` options of each disk line of the
/// main section (snapshot and pending sections, `[...]`, repeat keys with other values).
pub fn from_pve_config(conf: &str) -> Vec<DiskLimits> {
    conf.lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with('['))
        .filter_map(|l| {
            let (key, value) = l.split_once(':')?;
            let key = key.trim();
            if !is_pve_disk_key(key) {
                return None;
            }
            let mut d = DiskLimits {
                disk: key.to_string(),
                ..DiskLimits::default()
            };
            for opt in value.split(',') {
                let Some((k, v)) = opt.split_once('=') else {
                    continue;
                };
                let iops = || nonzero(v.trim().parse().ok());
                match k.trim() {
                    "iops" => d.iops = iops(),
                    "iops_rd" => d.iops_rd = iops(),
                    "iops_wr" => d.iops_wr = iops(),
                    "mbps" => d.bps = pve_mbps(v),
                    "mbps_rd" => d.bps_rd = pve_mbps(v),
                    "mbps_wr" => d.bps_wr = pve_mbps(v),
                    _ => {}
                }
            }
            (!d.is_unlimited()).then_some(d)
        })
        .collect()
}

/// QEMU limits of Proxmox VM `vmid` from its config (None when it cannot be read).
pub fn of_proxmox_vm(pve_dir: &Path, vmid: u32) -> Option<Vec<DiskLimits>> {
    let (raw, _) =
        crate::host::read_capped(&pve_dir.join(format!("{vmid}.conf")), 64 << 10).ok()?;
    Some(from_pve_config(&String::from_utf8_lossy(&raw)))
}

/// QEMU limits of overkvm's own running VM, over its QMP socket (None when it does not answer).
pub fn of_own_vm(qmp_socket: &Path) -> Option<Vec<DiskLimits>> {
    let mut q = super::qmp::Qmp::connect(qmp_socket, Duration::from_secs(1)).ok()?;
    let reply = q.execute("query-block", None).ok()?;
    Some(from_query_block(&reply))
}

/// QEMU limits of libvirt domain `name` run by qemu `pid`, from libvirt's status XML (None when
/// there is none, or it belongs to another process).
pub fn of_libvirt_domain(run_dir: &Path, name: &str, pid: u32) -> Option<Vec<DiskLimits>> {
    let xml = super::libvirt::status_xml(run_dir, name)?;
    if domstatus_pid(&xml).is_some_and(|p| p != pid) {
        return None;
    }
    Some(from_libvirt_xml(&xml))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    impl QemuThrottle {
        /// The settings `pairs`, by QMP name (for tests here and in the throttle's).
        pub(crate) fn of(pairs: &[(&str, u64)]) -> QemuThrottle {
            let mut t = QemuThrottle::default();
            for (k, v) in pairs {
                t.set(k, *v);
            }
            t
        }
    }

    fn t(pairs: &[(&str, u64)]) -> QemuThrottle {
        QemuThrottle::of(pairs)
    }

    #[test]
    fn disks_are_read_from_query_block() {
        let reply = json!([
            {"device": "disk0", "qdev": "vd0", "inserted": {"file": "/var/lib/overkvm/vms/a/disk.qcow2",
              "cache": {"writeback": true, "direct": false, "no-flush": false},
              "iops": 0, "iops_rd": 500, "iops_wr": 0, "bps": 0, "bps_rd": 0, "bps_wr": 0,
              "iops_rd_max": 0, "iops_rd_max_length": 1, "group": "disk0"}},
            {"device": "", "qdev": "/machine/peripheral/virtio-disk1/virtio-backend",
             "inserted": {"file": "/dev/sdb", "cache": {"direct": true}}},
            {"device": "ide1-cd0", "locked": false},
            "garbage"
        ]);
        let d = disks_from_query_block(&reply);
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].disk, DiskRef::Device("disk0".into()));
        assert!(d[0].host_cache);
        let mut want = t(&[("iops_rd", 500)]);
        want.group = Some("disk0".into());
        assert_eq!(d[0].throttle, want);
        assert_eq!(
            d[1].disk,
            DiskRef::Qdev("/machine/peripheral/virtio-disk1/virtio-backend".into())
        );
        assert!(!d[1].host_cache);
        assert!(disks_from_query_block(&json!({"x": 1})).is_empty());
        let a = d[0].throttle.qmp_arguments(&d[0].disk);
        assert_eq!(
            a,
            json!({"device": "disk0", "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0,
                   "iops_rd": 500, "iops_wr": 0, "group": "disk0"})
        );
        assert_eq!(
            d[1].throttle.qmp_arguments(&d[1].disk)["id"],
            "/machine/peripheral/virtio-disk1/virtio-backend"
        );
    }

    #[test]
    fn disks_are_read_from_libvirt_xml_and_virsh() {
        let xml = "<domstatus state='running' pid='42'><domain type='qemu' id='3'><devices>\n\
            <disk type='file' device='disk'><driver name='qemu' type='raw' cache='none' io='native'/>\n\
            <source file='/v/a.img'/><target dev='vda' bus='virtio'/>\n\
            <iotune><total_iops_sec>500</total_iops_sec><total_iops_sec_max>900</total_iops_sec_max>\n\
            <group_name>g1</group_name></iotune></disk>\n\
            <disk type='block' device='disk'><driver name='qemu' type='raw'/>\n\
            <source dev='/dev/sdb'/><target dev='vdb' bus='virtio'/></disk>\n\
            <disk type='file'><target dev=''/></disk>\n\
            </devices></domain></domstatus>";
        let d = disks_from_libvirt_xml(xml);
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].disk.name(), "vda");
        assert_eq!(d[0].file.as_deref(), Some("/v/a.img"));
        assert!(!d[0].host_cache);
        let mut want = t(&[("iops", 500), ("iops_max", 900)]);
        want.group = Some("g1".into());
        assert_eq!(d[0].throttle, want);
        assert_eq!(d[1].file.as_deref(), Some("/dev/sdb"));
        assert!(d[1].host_cache, "no cache= is QEMU's writeback");
        assert!(d[1].throttle.values.is_empty());
        for bad in ["", "<domain>", "<domain><disk><target dev='x'/>"] {
            assert!(disks_from_libvirt_xml(bad).is_empty(), "{bad}");
        }
        let virsh = "total_bytes_sec: 0\nread_bytes_sec : 0\ntotal_iops_sec : 500\n\
            total_iops_sec_max: 900\ntotal_iops_sec_max_length: 0\ngroup_name   : g1\nsize_iops_sec: x\n";
        assert_eq!(parse_virsh_blkdeviotune(virsh), want);
        let args = want
            .virsh_arguments(&QemuThrottle::default(), "web", "vda")
            .unwrap();
        assert_eq!(&args[..4], ["blkdeviotune", "web", "vda", "--live"]);
        let at = args.iter().position(|a| a == "--total-iops-sec").unwrap();
        assert_eq!(args[at + 1], "500");
        let at = args
            .iter()
            .position(|a| a == "--read-iops-sec-max")
            .unwrap();
        assert_eq!(
            args[at + 1],
            "0",
            "a family is given whole: libvirt sets its members not given to 0 anyway"
        );
        assert!(
            !args.iter().any(|a| a.contains("bytes")),
            "the byte families do not change: {args:?}"
        );
        assert_eq!(args[args.len() - 2..], ["--group-name", "g1"]);
        assert_eq!(want.virsh_arguments(&want, "web", "vda"), None);
    }

    #[test]
    fn query_block_limits_are_read_per_disk_and_zero_is_unlimited() {
        let reply = json!([
            {"device": "", "qdev": "/machine/peripheral/virtio-disk0/virtio-backend",
             "inserted": {"iops": 500, "iops_rd": 0, "iops_wr": 0, "bps": 0, "bps_rd": 0,
                          "bps_wr": 10_000_000, "node-name": "disk0"}},
            {"device": "drive1", "inserted": {"iops": 0, "iops_rd": 0, "iops_wr": 0, "bps": 0,
                                              "bps_rd": 0, "bps_wr": 0}},
            {"device": "ide1-cd0", "locked": false},
            {"inserted": {"iops": 5}},
        ]);
        let l = from_query_block(&reply);
        assert_eq!(
            l,
            [DiskLimits {
                disk: "/machine/peripheral/virtio-disk0/virtio-backend".into(),
                iops: Some(500),
                bps_wr: Some(10_000_000),
                ..DiskLimits::default()
            }]
        );
        assert_eq!(
            l[0].text(),
            "/machine/peripheral/virtio-disk0/virtio-backend iops=500 bps_wr=10000000"
        );
        assert!(from_query_block(&json!({"not": "a list"})).is_empty());
        assert!(from_query_block(&json!([{"device": "d", "inserted": {"iops": -1}}])).is_empty());
    }

    #[test]
    fn proxmox_disk_options_are_read_from_the_main_section() {
        let conf = "boot: order=scsi0\ncores: 2\nname: web01\n\
            scsi0: local-lvm:vm-100-disk-0,iops_rd=500,iops_wr=300,mbps_wr=10.5,size=32G\n\
            virtio1: local-lvm:vm-100-disk-1,iops=0,size=8G\n\
            ide2: none,media=cdrom\n\
            net0: virtio=BC:24:11:00:00:01,bridge=vmbr0,rate=10\n\
            scsihw: virtio-scsi-single\n\
            \n[snap1]\nscsi0: local-lvm:vm-100-disk-0,iops_rd=9,size=32G\n";
        assert_eq!(
            from_pve_config(conf),
            [DiskLimits {
                disk: "scsi0".into(),
                iops_rd: Some(500),
                iops_wr: Some(300),
                bps_wr: Some(11_010_048),
                ..DiskLimits::default()
            }]
        );
        for bad in [
            "",
            "scsi0",
            "scsi0: x,iops=-1,mbps=nan,mbps_rd=inf,mbps_wr=1e300",
            "virtio0: x,mbps=0.0000001",
            "scsi999: x,iops=5",
            "scsix: x,iops=5",
            "[s]\nscsi0: x,iops=5",
        ] {
            assert!(from_pve_config(bad).is_empty(), "{bad:?}");
        }
    }

    #[test]
    fn libvirt_iotune_is_read_per_target() {
        let xml = "<domstatus state='running' pid='42'>\n<qemuCaps><disk fake='1'/></qemuCaps>\n\
            <domain type='qemu' id='3'><name>web</name><devices>\n\
            <disk type='file' device='disk'>\n<driver name='qemu' type='raw'/>\n\
            <source file='/v/web.img'/>\n<target dev='vda' bus='virtio'/>\n\
            <iotune>\n<total_iops_sec>500</total_iops_sec>\n<read_bytes_sec>0</read_bytes_sec>\n\
            <write_bytes_sec>1048576</write_bytes_sec>\n<group_name>g</group_name>\n</iotune>\n</disk>\n\
            <disk type='file' device='disk'><target dev='vdb' bus='virtio'/></disk>\n\
            <disk type='file' device='cdrom'><target dev=\"hdc\"/><iotune><read_iops_sec>7</read_iops_sec></iotune></disk>\n\
            </devices></domain></domstatus>";
        let l = from_libvirt_xml(xml);
        assert_eq!(
            l,
            [
                DiskLimits {
                    disk: "vda".into(),
                    iops: Some(500),
                    bps_wr: Some(1_048_576),
                    ..DiskLimits::default()
                },
                DiskLimits {
                    disk: "hdc".into(),
                    iops_rd: Some(7),
                    ..DiskLimits::default()
                }
            ]
        );
        // Hostile or truncated XML: nothing, or what is complete; never a panic.
        for bad in [
            "",
            "<domain>",
            "<domain><disk><target dev='vda'/><iotune><total_iops_sec>x</total_iops_sec>",
            "<domain><disk/><disk><iotune/></disk></domain>",
            "<domain><disk><target dev=''/><iotune><total_iops_sec>5</total_iops_sec></iotune></disk>",
            "<domain><disk><target dev='vda'/><iotune><total_iops_sec>18446744073709551616</total_iops_sec></iotune></disk>",
        ] {
            assert!(from_libvirt_xml(bad).is_empty(), "{bad}");
        }
    }
}
