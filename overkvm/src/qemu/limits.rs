//! Limits QEMU itself enforces on a disk (`block_set_io_throttle`), as opposed to the cgroup
//! limits of the throttle daemon. OpenStack Nova (`quota:disk_*_sec`, written as libvirt
//! `<iotune>`) and Proxmox (`iops_rd`, `mbps_wr`...) limit disks this way, inside qemu.
//!
//! Read only, and only through their owner: overkvm's own VMs over their QMP socket
//! (`query-block`), libvirt's domains from the live definition libvirt keeps in its status XML
//! (`/run/libvirt/qemu/NAME.xml`, `<disk>` → `<iotune>`), Proxmox VMs from their config
//! (`/etc/pve/qemu-server/VMID.conf`, which `qm set` updates when it changes a running VM's
//! limits): libvirt and Proxmox own their VMs' monitors, so overkvm never talks to them. The
//! parsers are pure.

use std::{path::Path, time::Duration};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::identity::managers::{self, domstatus_pid};

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
    let Some(list) = reply.as_array() else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|b| {
            let ins = b.get("inserted")?;
            let n = |k: &str| nonzero(ins.get(k).and_then(Value::as_u64));
            let name = b
                .get("device")
                .and_then(Value::as_str)
                .filter(|d| !d.is_empty())
                .or_else(|| b.get("qdev").and_then(Value::as_str))?;
            let l = DiskLimits {
                disk: name.to_string(),
                iops: n("iops"),
                iops_rd: n("iops_rd"),
                iops_wr: n("iops_wr"),
                bps: n("bps"),
                bps_rd: n("bps_rd"),
                bps_wr: n("bps_wr"),
            };
            (!l.is_unlimited()).then_some(l)
        })
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
    libvirt_disks(xml)
        .into_iter()
        .filter_map(|(target, _, iotune)| {
            let n = |k: &str| {
                nonzero(managers::element_text(iotune, k).and_then(|t| t.trim().parse().ok()))
            };
            let l = DiskLimits {
                disk: target.to_string(),
                iops: n("total_iops_sec"),
                iops_rd: n("read_iops_sec"),
                iops_wr: n("write_iops_sec"),
                bps: n("total_bytes_sec"),
                bps_rd: n("read_bytes_sec"),
                bps_wr: n("write_bytes_sec"),
            };
            (!l.is_unlimited()).then_some(l)
        })
        .collect()
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
    if !managers::is_safe_file_stem(name) {
        return None;
    }
    let (raw, truncated) =
        crate::host::read_capped(&run_dir.join(format!("{name}.xml")), 1 << 20).ok()?;
    if truncated {
        return None;
    }
    let xml = String::from_utf8_lossy(&raw);
    if domstatus_pid(&xml).is_some_and(|p| p != pid) {
        return None;
    }
    Some(from_libvirt_xml(&xml))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

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
