//! Where a VM disk's I/O goes, as QEMU reports it, and QEMU's own counters of that disk.
//!
//! overkvm counts I/O at the host's block layer. A disk whose I/O never reaches a host block
//! device (Ceph through librbd, iSCSI through libiscsi, NBD, GlusterFS, libnfs, curl, ssh, or a
//! file on an NFS mount of the host) is invisible there: for those disks QEMU's own counters
//! (`query-blockstats`) are the only account, and overkvm reports them instead.
//!
//! The decision is taken from the disk's backing as QEMU shows it, not from the disk's name:
//! `query-blockstats` gives each guest disk's node and, through `parent`, the chain of file
//! children down to the protocol node (the one that does the I/O); `query-named-block-nodes`
//! gives that node's driver and file name. Only QEMU's host-file drivers (`file`,
//! `host_device`, `host_cdrom`) reach the host's block layer, and then only when the file is on
//! a file system with a block device under it. Everything here is pure: the caller reads the
//! replies and the mount table.

use std::collections::HashMap;

use serde_json::Value;

use super::limits::DiskRef;

/// QEMU protocol drivers that do their I/O through the host kernel's files: their I/O reaches
/// a host block device unless the file lives on a network file system. Every other protocol
/// driver (nbd, rbd, iscsi, gluster, nfs, ssh, http(s), nvme over vfio, ...) talks to its
/// storage without the host's block layer.
const HOST_FILE_DRIVERS: &[&str] = &["file", "host_device", "host_cdrom"];

/// File system types (from /proc/self/mountinfo) whose files are stored over the network:
/// no host block device sees their I/O. Clustered file systems on a shared block device
/// (ocfs2, gfs2) are not here: their I/O does reach a host block device.
const NETWORK_FS_TYPES: &[&str] = &[
    "nfs",
    "nfs4",
    "ceph",
    "cifs",
    "smb3",
    "9p",
    "glusterfs",
    "fuse.glusterfs",
    "fuse.sshfs",
    "fuse.s3fs",
    "lustre",
    "afs",
];

/// Longest storage target reported: a label, not a document.
const MAX_TARGET_CHARS: usize = 200;

/// QEMU's cumulative counters of one guest disk (its device's view: what the guest asked for).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskCounters {
    pub rd_operations: u64,
    pub wr_operations: u64,
    pub flush_operations: u64,
    pub unmap_operations: u64,
    pub rd_bytes: u64,
    pub wr_bytes: u64,
    pub unmap_bytes: u64,
    pub rd_total_time_ns: u64,
    pub wr_total_time_ns: u64,
    pub flush_total_time_ns: u64,
    pub unmap_total_time_ns: u64,
}

impl DiskCounters {
    fn from_stats(s: &Value) -> DiskCounters {
        let n = |k: &str| s.get(k).and_then(Value::as_u64).unwrap_or(0);
        DiskCounters {
            rd_operations: n("rd_operations"),
            wr_operations: n("wr_operations"),
            flush_operations: n("flush_operations"),
            unmap_operations: n("unmap_operations"),
            rd_bytes: n("rd_bytes"),
            wr_bytes: n("wr_bytes"),
            unmap_bytes: n("unmap_bytes"),
            rd_total_time_ns: n("rd_total_time_ns"),
            wr_total_time_ns: n("wr_total_time_ns"),
            flush_total_time_ns: n("flush_total_time_ns"),
            unmap_total_time_ns: n("unmap_total_time_ns"),
        }
    }

    /// What happened since `older`. A counter that went down (the drive was replaced, its
    /// counters restarted at 0) counts from 0: its new value.
    pub fn since(&self, older: &DiskCounters) -> DiskCounters {
        let d = |new: u64, old: u64| if new >= old { new - old } else { new };
        DiskCounters {
            rd_operations: d(self.rd_operations, older.rd_operations),
            wr_operations: d(self.wr_operations, older.wr_operations),
            flush_operations: d(self.flush_operations, older.flush_operations),
            unmap_operations: d(self.unmap_operations, older.unmap_operations),
            rd_bytes: d(self.rd_bytes, older.rd_bytes),
            wr_bytes: d(self.wr_bytes, older.wr_bytes),
            unmap_bytes: d(self.unmap_bytes, older.unmap_bytes),
            rd_total_time_ns: d(self.rd_total_time_ns, older.rd_total_time_ns),
            wr_total_time_ns: d(self.wr_total_time_ns, older.wr_total_time_ns),
            flush_total_time_ns: d(self.flush_total_time_ns, older.flush_total_time_ns),
            unmap_total_time_ns: d(self.unmap_total_time_ns, older.unmap_total_time_ns),
        }
    }

    pub fn ops(&self) -> u64 {
        self.rd_operations
            .saturating_add(self.wr_operations)
            .saturating_add(self.flush_operations)
            .saturating_add(self.unmap_operations)
    }

    /// Mean time per operation in µs (QEMU times each request from submission to completion
    /// inside QEMU, so this includes the network round trip); None without operations.
    pub fn lat_avg_us(&self) -> Option<f64> {
        let ops = self.ops();
        (ops > 0).then(|| {
            let ns = self
                .rd_total_time_ns
                .saturating_add(self.wr_total_time_ns)
                .saturating_add(self.flush_total_time_ns)
                .saturating_add(self.unmap_total_time_ns);
            ns as f64 / ops as f64 / 1000.0
        })
    }
}

/// One guest disk in a `query-blockstats` reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockstatsEntry {
    /// The disk as the guest's configuration names it: the `-drive` id (libvirt's
    /// `drive-virtio-disk0`), else the qdev id (`virtio-disk0` from
    /// `/machine/peripheral/virtio-disk0/virtio-backend`).
    pub disk: String,
    /// The disk as `query-block` names it (its device, else its whole qdev path): how the
    /// throttle finds the disk it limits.
    pub named: DiskRef,
    /// The node at the bottom of the `parent` (file child) chain: the protocol node that does
    /// the I/O. The device's own node when it has no file child.
    pub protocol_node: Option<String>,
    pub counters: DiskCounters,
}

/// The counters of one guest disk in a `query-blockstats` reply, the disk named as
/// `query-block` names it.
pub fn counters_of(reply: &Value, disk: &DiskRef) -> Option<DiskCounters> {
    parse_blockstats(reply)
        .into_iter()
        .find(|e| e.named == *disk)
        .map(|e| e.counters)
}

/// The qdev id inside a qdev path (`/machine/peripheral/ID/virtio-backend` → `ID`), or the
/// path itself when it has another shape.
fn qdev_id(qdev: &str) -> &str {
    qdev.strip_prefix("/machine/peripheral/")
        .and_then(|rest| rest.split('/').next())
        .filter(|id| !id.is_empty())
        .unwrap_or(qdev)
}

/// The guest disks of a `query-blockstats` reply (entries without a name, such as nodes
/// without a device, are left out).
pub fn parse_blockstats(reply: &Value) -> Vec<BlockstatsEntry> {
    let Some(list) = reply.as_array() else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|e| {
            let named = match e.get("device").and_then(Value::as_str) {
                Some(d) if !d.is_empty() => DiskRef::Device(d.to_string()),
                _ => DiskRef::Qdev(e.get("qdev").and_then(Value::as_str)?.to_string()),
            };
            let disk = match &named {
                DiskRef::Device(d) => d.clone(),
                DiskRef::Qdev(q) => qdev_id(q).to_string(),
            };
            let mut node = e;
            // A chain deeper than this is not a real configuration: stop rather than loop.
            for _ in 0..16 {
                match node.get("parent") {
                    Some(p) if p.is_object() => node = p,
                    _ => break,
                }
            }
            Some(BlockstatsEntry {
                disk,
                named,
                protocol_node: node
                    .get("node-name")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                counters: DiskCounters::from_stats(e.get("stats")?),
            })
        })
        .collect()
}

/// A node of `query-named-block-nodes`: its driver and file name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockNode {
    pub drv: String,
    pub file: String,
}

/// `query-named-block-nodes` as node name → driver and file name.
pub fn parse_named_nodes(reply: &Value) -> HashMap<String, BlockNode> {
    let Some(list) = reply.as_array() else {
        return HashMap::new();
    };
    list.iter()
        .filter_map(|n| {
            let s = |k: &str| n.get(k).and_then(Value::as_str).map(str::to_string);
            Some((
                s("node-name")?,
                BlockNode {
                    drv: s("drv")?,
                    file: s("file").unwrap_or_default(),
                },
            ))
        })
        .collect()
}

/// A mount of the host: where, what type, from where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub mount_point: String,
    pub fs_type: String,
    pub source: String,
}

/// `/proc/self/mountinfo`: `ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - TYPE
/// SOURCE SUPER_OPTIONS`. Octal escapes (`\040` for a space) in paths are decoded.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mount_point = unescape_octal(left.split(' ').nth(4)?);
            let mut r = right.split(' ');
            Some(Mount {
                mount_point,
                fs_type: r.next()?.to_string(),
                source: unescape_octal(r.next().unwrap_or("")),
            })
        })
        .collect()
}

fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount that holds absolute path `path`: the longest mount point that is a path prefix
/// of it (later mounts over the same point win, as in the kernel).
pub fn mount_of<'a>(mounts: &'a [Mount], path: &str) -> Option<&'a Mount> {
    let under = |mp: &str| {
        mp == "/"
            || path == mp
            || path
                .strip_prefix(mp)
                .is_some_and(|rest| rest.starts_with('/'))
    };
    mounts
        .iter()
        .enumerate()
        .filter(|(_, m)| under(&m.mount_point))
        .max_by_key(|(i, m)| (m.mount_point.len(), *i))
        .map(|(_, m)| m)
}

/// How one guest disk is counted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backing {
    /// Its I/O reaches a host block device: eBPF counts it (QEMU's counters are not used, so
    /// it is never counted twice).
    HostBlock,
    /// Its I/O never reaches a host block device: QEMU's counters are the account. The storage
    /// target, credentials stripped (`nbd://host:port/export`, `rbd:pool/image`).
    Network { target: String },
}

/// Decides a disk's backing from its protocol node. `mount_of_file` answers for an absolute
/// host path (the file of a host-file driver; the caller resolves a relative one against
/// qemu's working directory) with the mount that holds it. A node QEMU does not name (the
/// reply changed under us) is taken as host-local: better uncounted for a moment than counted
/// twice.
pub fn classify(
    node: Option<&BlockNode>,
    mount_of_file: impl Fn(&str) -> Option<Mount>,
) -> Backing {
    let Some(node) = node else {
        return Backing::HostBlock;
    };
    if HOST_FILE_DRIVERS.contains(&node.drv.as_str()) {
        return match mount_of_file(&node.file) {
            Some(m) if NETWORK_FS_TYPES.contains(&m.fs_type.as_str()) => Backing::Network {
                target: network_file_target(&m, &node.file),
            },
            _ => Backing::HostBlock,
        };
    }
    Backing::Network {
        target: storage_target(&node.drv, &node.file),
    }
}

/// The target of a file on a network mount: `nfs://server/export/path/in/it` for NFS
/// (`server:/export` mounted), else `TYPE:SOURCE/path`.
fn network_file_target(m: &Mount, file: &str) -> String {
    let rel = file
        .strip_prefix(m.mount_point.as_str())
        .unwrap_or(file)
        .trim_start_matches('/');
    let t = match (m.fs_type.as_str(), m.source.split_once(':')) {
        ("nfs" | "nfs4", Some((server, export))) => {
            let export = export.trim_end_matches('/');
            format!("nfs://{server}{export}/{rel}")
        }
        _ => format!("{}:{}/{rel}", m.fs_type, m.source.trim_end_matches('/')),
    };
    clean_label(&strip_userinfo(&t))
}

/// A storage target for protocol driver `drv` with file name `file` as QEMU reports it, with
/// every credential left out: userinfo of URLs (`iscsi://user%pass@host`), query strings
/// (tokens, `password-secret`), rbd's `:key=`/`:keyring=`/`:id=`/`:conf=` options, and from a
/// `json:{...}` file name only the fields that say where the data is.
pub fn storage_target(drv: &str, file: &str) -> String {
    let t = if let Some(json) = file.strip_prefix("json:") {
        json_target(drv, json)
    } else if drv == "rbd" || file.starts_with("rbd:") {
        rbd_target(file)
    } else if file.contains("://") {
        strip_url(file)
    } else if file.is_empty() {
        drv.to_string()
    } else {
        // A driver-specific string we do not know: only its first `:`-separated part (rbd's
        // options and similar follow the first colon).
        let head = file.split(':').next().unwrap_or("");
        format!("{drv}:{head}")
    };
    clean_label(&t)
}

/// `rbd:pool[/namespace]/image[@snap][:opt=value...]` → `rbd:pool/image` (options may hold
/// the key; `\:` escapes a colon inside a value, so the cut is at the first unescaped colon).
fn rbd_target(file: &str) -> String {
    let body = file.strip_prefix("rbd:").unwrap_or(file);
    let mut name = String::new();
    let mut chars = body.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    name.push(n);
                }
            }
            ':' => break,
            c => name.push(c),
        }
    }
    format!("rbd:{name}")
}

/// A URL without userinfo, query and fragment: `scheme://host[:port]/path`.
fn strip_url(url: &str) -> String {
    let cut = url.find(['?', '#']).map_or(url, |i| &url[..i]);
    strip_userinfo(cut)
}

/// Drops `user:password@` from the authority of a URL (the part between `://` and the next
/// `/`); the last `@` ends the userinfo (a password may contain `@` unescaped).
fn strip_userinfo(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    format!("{scheme}://{host}{path}")
}

/// From a `json:{...}` file name, only the fields that locate the data, never a secret.
fn json_target(drv: &str, json: &str) -> String {
    let Ok(v) = serde_json::from_str::<Value>(json) else {
        return drv.to_string();
    };
    // `-blockdev` options may nest the protocol node under `file`.
    let mut node = &v;
    for _ in 0..8 {
        match node.get("file") {
            Some(f) if f.is_object() => node = f,
            _ => break,
        }
    }
    let s = |k: &str| node.get(k).and_then(Value::as_str).unwrap_or("");
    let driver = match s("driver") {
        "" => drv,
        d => d,
    };
    let server = |v: Option<&Value>| -> String {
        let Some(v) = v else { return String::new() };
        let g = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        match g("type").as_str() {
            "unix" => format!("unix:{}", g("path")),
            _ => match g("port").as_str() {
                "" => g("host"),
                p => format!("{}:{p}", g("host")),
            },
        }
    };
    match driver {
        "rbd" => {
            let ns = match s("namespace") {
                "" => String::new(),
                n => format!("{n}/"),
            };
            format!("rbd:{}/{ns}{}", s("pool"), s("image"))
        }
        "nbd" => format!("nbd://{}/{}", server(node.get("server")), s("export")),
        "iscsi" => {
            // QEMU 7.2 writes the LUN as a string in file names, as a number in options.
            let lun = match node.get("lun") {
                Some(Value::String(l)) => l.clone(),
                Some(Value::Number(l)) => l.to_string(),
                _ => String::new(),
            };
            format!("iscsi://{}/{}/{lun}", s("portal"), s("target"))
        }
        "nfs" => format!("nfs://{}{}", server(node.get("server")), s("path")),
        "gluster" => {
            let first = node
                .get("server")
                .and_then(Value::as_array)
                .and_then(|a| a.first());
            format!(
                "gluster://{}/{}/{}",
                server(first),
                s("volume"),
                s("path").trim_start_matches('/')
            )
        }
        "ssh" => format!("ssh://{}{}", server(node.get("server")), s("path")),
        "http" | "https" | "ftp" | "ftps" => strip_url(s("url")),
        d => d.to_string(),
    }
}

/// A label: printable, bounded. Control characters become `?` (a target ends up in JSON,
/// Prometheus labels and a terminal).
fn clean_label(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(MAX_TARGET_CHARS)
        .collect()
}

/// The guest disks of one VM that QEMU counts for overkvm, with their target.
pub fn network_disks(
    stats: &[BlockstatsEntry],
    nodes: &HashMap<String, BlockNode>,
    mount_of_file: impl Fn(&str) -> Option<Mount>,
) -> HashMap<String, String> {
    stats
        .iter()
        .filter_map(|e| {
            let node = e.protocol_node.as_ref().and_then(|n| nodes.get(n));
            match classify(node, &mount_of_file) {
                Backing::Network { target } => Some((e.disk.clone(), target)),
                Backing::HostBlock => None,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn no_mount(_: &str) -> Option<Mount> {
        None
    }

    /// Shapes from QEMU 7.2: an NBD disk by `-drive` and a local qcow2.
    #[test]
    fn the_protocol_node_decides() {
        let stats = json!([
            {"device": "drive-virtio-disk0", "node-name": "#block150",
             "qdev": "/machine/peripheral/virtio-disk0/virtio-backend",
             "stats": {"rd_operations": 5, "wr_operations": 3, "flush_operations": 1, "rd_bytes": 20480,
                       "wr_bytes": 12288, "rd_total_time_ns": 5000, "wr_total_time_ns": 3000, "flush_total_time_ns": 1000},
             "parent": {"node-name": "#block013", "stats": {}}},
            {"device": "loc", "node-name": "#block399", "stats": {"rd_operations": 9},
             "parent": {"node-name": "#block208", "stats": {}, "driver-specific": {"driver": "file"}}},
            {"device": "", "qdev": "/machine/peripheral/disk2/virtio-backend", "node-name": "n2", "stats": {}},
        ]);
        let nodes = json!([
            {"node-name": "#block399", "drv": "qcow2", "file": "/var/lib/l.qcow2"},
            {"node-name": "#block208", "drv": "file", "file": "/var/lib/l.qcow2"},
            {"node-name": "#block150", "drv": "raw", "file": "nbd://127.0.0.1:10899/exp"},
            {"node-name": "#block013", "drv": "nbd", "file": "nbd://127.0.0.1:10899/exp"},
            {"node-name": "n2", "drv": "rbd", "file": "rbd:pool/img:id=admin:key=AQBsecret=="},
        ]);
        let e = parse_blockstats(&stats);
        assert_eq!(e[0].disk, "drive-virtio-disk0");
        assert_eq!(e[0].protocol_node.as_deref(), Some("#block013"));
        assert_eq!(e[2].disk, "disk2", "qdev id when there is no drive id");
        assert_eq!(
            e[2].protocol_node.as_deref(),
            Some("n2"),
            "no file child: its own node"
        );
        let c = e[0].counters;
        assert_eq!(
            (
                c.rd_operations,
                c.wr_operations,
                c.flush_operations,
                c.ops()
            ),
            (5, 3, 1, 9)
        );
        assert_eq!(c.lat_avg_us(), Some(1.0));
        let net = network_disks(&e, &parse_named_nodes(&nodes), no_mount);
        assert_eq!(net.len(), 2, "{net:?}");
        assert_eq!(net["drive-virtio-disk0"], "nbd://127.0.0.1:10899/exp");
        assert_eq!(net["disk2"], "rbd:pool/img");
        assert!(!net.contains_key("loc"), "a local file is eBPF's");
    }

    #[test]
    fn a_file_on_a_network_mount_is_qemus_and_elsewhere_ebpfs() {
        let mounts = parse_mountinfo(
            "22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n\
             40 22 0:50 / /mnt/nfs\\040share rw,relatime shared:30 - nfs4 srv.example:/export/vms rw,vers=4.2\n\
             41 22 0:51 / /var/lib/ceph rw - ceph 10.0.0.1:6789:/ rw,name=admin,secret=AQB==\n\
             42 22 0:52 / /dev/shm rw - tmpfs tmpfs rw\n",
        );
        assert_eq!(mounts[1].mount_point, "/mnt/nfs share");
        let m = |p: &str| mount_of(&mounts, p).cloned();
        let node = |f: &str| BlockNode {
            drv: "file".into(),
            file: f.into(),
        };
        assert_eq!(
            classify(Some(&node("/mnt/nfs share/a/vm1.qcow2")), m),
            Backing::Network {
                target: "nfs://srv.example/export/vms/a/vm1.qcow2".into()
            }
        );
        assert_eq!(
            classify(Some(&node("/mnt/nfs shareX/vm1.qcow2")), m),
            Backing::HostBlock
        );
        assert_eq!(
            classify(Some(&node("/var/lib/vm.img")), m),
            Backing::HostBlock
        );
        let Backing::Network { target } = classify(Some(&node("/var/lib/ceph/x.img")), m) else {
            panic!("ceph is networked");
        };
        assert!(!target.contains("secret"), "{target}");
        assert_eq!(
            classify(None, m),
            Backing::HostBlock,
            "unknown node: never counted twice"
        );
        // Any driver other than a host file's goes past the block layer, named or not.
        let odd = BlockNode {
            drv: "vendor-thing".into(),
            file: "vendor-thing:vol7:token=abc".into(),
        };
        assert_eq!(
            classify(Some(&odd), m),
            Backing::Network {
                target: "vendor-thing:vendor-thing".into()
            }
        );
    }

    /// Credentials never survive into a target, whatever the input looks like.
    #[test]
    fn targets_never_carry_secrets() {
        let cases = [
            (
                "rbd",
                "rbd:pool/img:id=admin:key=AQBsecret==:conf=/etc/ceph.conf",
                "rbd:pool/img",
            ),
            (
                "rbd",
                "rbd:pool/ns/img@snap:keyring=/etc/ceph/secret.keyring",
                "rbd:pool/ns/img@snap",
            ),
            ("rbd", "rbd:po\\:ol/img:key=secret", "rbd:po:ol/img"),
            (
                "iscsi",
                "iscsi://user%secret@10.0.0.1:3260/iqn.2003-01.org:t1/0",
                "iscsi://10.0.0.1:3260/iqn.2003-01.org:t1/0",
            ),
            (
                "iscsi",
                "iscsi://u:p@ss@10.0.0.1/iqn/1",
                "iscsi://10.0.0.1/iqn/1",
            ),
            (
                "https",
                "https://u:secret@h.example/img.raw?token=secret#secret",
                "https://h.example/img.raw",
            ),
            (
                "nfs",
                "nfs://srv/export/disk.img?uid=0&secret=1",
                "nfs://srv/export/disk.img",
            ),
            (
                "nbd",
                "nbd://127.0.0.1:10809/exp",
                "nbd://127.0.0.1:10809/exp",
            ),
            (
                "nbd",
                "nbd+unix:///exp?socket=/run/secret.sock",
                "nbd+unix:///exp",
            ),
            (
                "gluster",
                "gluster+tcp://user:secret@srv:24007/vol/img",
                "gluster+tcp://srv:24007/vol/img",
            ),
            (
                "ssh",
                "ssh://root:secret@host/img?host_key_check=no",
                "ssh://host/img",
            ),
            (
                "rbd",
                r#"json:{"driver":"rbd","pool":"p","image":"i","user":"admin","key-secret":"secret","server":[{"host":"m","port":"6789"}]}"#,
                "rbd:p/i",
            ),
            (
                "iscsi",
                r#"json:{"file":{"driver":"iscsi","portal":"10.0.0.1:3260","target":"iqn.x:t","lun":2,"user":"u","password-secret":"secret"}}"#,
                "iscsi://10.0.0.1:3260/iqn.x:t/2",
            ),
            (
                "iscsi",
                // QEMU 7.2's own file name of a `-drive file=iscsi://…` protocol node.
                r#"json:{"lun": "1", "portal": "127.0.0.1:13260", "driver": "iscsi", "transport": "tcp", "target": "iqn.2026-12.org.overkvm:disk"}"#,
                "iscsi://127.0.0.1:13260/iqn.2026-12.org.overkvm:disk/1",
            ),
            (
                "nbd",
                r#"json:{"driver":"nbd","server":{"type":"inet","host":"h","port":"10809"},"export":"e","tls-creds":"secret"}"#,
                "nbd://h:10809/e",
            ),
            (
                "curl",
                r#"json:{"driver":"https","url":"https://u:secret@h/x?sig=secret"}"#,
                "https://h/x",
            ),
            ("rbd", "json:{not json secret", "rbd"),
            ("weird", "weird:secret", "weird:weird"),
            ("weird", "", "weird"),
        ];
        for (drv, file, want) in cases {
            let got = storage_target(drv, file);
            assert_eq!(got, want, "{drv} {file}");
            assert!(!got.contains("secret"), "{got}");
        }
        let long = format!("nbd://h/{}", "x".repeat(10_000));
        assert_eq!(
            storage_target("nbd", &long).chars().count(),
            MAX_TARGET_CHARS
        );
        let ctl = storage_target("nbd", "nbd://h/\u{1b}[2Jexp\n");
        assert!(!ctl.chars().any(char::is_control), "{ctl:?}");
    }

    #[test]
    fn counters_since_an_older_reading() {
        let a = DiskCounters {
            rd_operations: 10,
            wr_bytes: 4096,
            ..Default::default()
        };
        let b = DiskCounters {
            rd_operations: 15,
            wr_bytes: 8192,
            ..Default::default()
        };
        let d = b.since(&a);
        assert_eq!((d.rd_operations, d.wr_bytes), (5, 4096));
        // A replaced drive starts again at 0: its new value is what happened.
        assert_eq!(a.since(&b).rd_operations, 10);
        assert_eq!(DiskCounters::default().lat_avg_us(), None);
    }

    #[test]
    fn hostile_replies_give_nothing_rather_than_panics() {
        for v in [
            json!(null),
            json!({}),
            json!([1, "x", {"device": 3}]),
            json!([{"device": "d"}]),
        ] {
            assert!(parse_blockstats(&v).is_empty(), "{v}");
            assert!(parse_named_nodes(&v).is_empty(), "{v}");
        }
        // A parent chain that never ends is cut.
        let mut deep = json!({"node-name": "leaf", "stats": {}});
        for i in 0..100 {
            deep = json!({"node-name": format!("n{i}"), "stats": {}, "parent": deep});
        }
        let mut top = deep.clone();
        top["device"] = json!("d");
        assert_eq!(parse_blockstats(&json!([top])).len(), 1);
        assert!(parse_mountinfo("garbage\n1 2 3\n").is_empty());
        assert_eq!(unescape_octal("a\\04"), "a\\04");
    }

    #[test]
    fn guest_counters_are_found_by_device_or_qdev() {
        let v = json!([
            {"device": "disk0", "qdev": "vd0", "stats": {"rd_operations": 3, "wr_operations": 4, "rd_bytes": 5, "wr_bytes": 6}},
            {"device": "", "qdev": "q1", "stats": {"wr_operations": 9}}
        ]);
        assert_eq!(
            counters_of(&v, &DiskRef::Device("disk0".into())).map(|c| [
                c.rd_operations,
                c.wr_operations,
                c.rd_bytes,
                c.wr_bytes
            ]),
            Some([3, 4, 5, 6])
        );
        assert_eq!(
            counters_of(&v, &DiskRef::Qdev("q1".into())).map(|c| c.wr_operations),
            Some(9)
        );
        assert_eq!(counters_of(&v, &DiskRef::Device("q1".into())), None);
    }

    #[test]
    fn blockstats_of_a_device() {
        let v = json!([
            {"device": "disk0", "stats": {"rd_operations": 300, "wr_operations": 301, "flush_operations": 2}},
            {"device": "", "stats": {"rd_operations": 1}}
        ]);
        let disk0 = DiskRef::Device("disk0".into());
        let d = counters_of(&v, &disk0).unwrap();
        assert_eq!((d.rd_operations, d.wr_operations, d.ops()), (300, 301, 603));
        assert_eq!(counters_of(&v, &DiskRef::Device("nope".into())), None);
        assert_eq!(counters_of(&json!({}), &disk0), None);
    }

    /// A reply with counters near u64::MAX made the total overflow (a panic in debug builds).
    #[test]
    fn blockstats_total_saturates() {
        let v =
            json!([{"device": "disk0", "stats": {"rd_operations": u64::MAX, "wr_operations": 1}}]);
        let d = counters_of(&v, &DiskRef::Device("disk0".into())).unwrap();
        assert_eq!(d.ops(), u64::MAX);
    }
}
