//! Reading VM managers' cgroup layouts.
//!
//! A cgroup path is strong evidence because only root (or the manager) can create cgroups at
//! the top of the tree. The matchers therefore anchor at the root (`/machine.slice`,
//! `/machine`, `/qemu.slice`): a user with a delegated subtree can create a cgroup *named*
//! `machine-qemu\x2d1\x2dvictim.scope`, but only below `/user.slice`.

use crate::{
    host::cgroup::IoController,
    host::proc::{CgroupEntry, block_cgroup_path, io_cgroup_path},
};

/// Decodes systemd unit-name escaping (`\xNN` for every byte outside `[A-Za-z0-9:_.]`).
///
/// Malformed escapes are kept as they are; decoded bytes that are not UTF-8 are replaced.
pub fn unescape_systemd(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && b.get(i + 1) == Some(&b'x') {
            let hex = (
                b.get(i + 2).copied().and_then(hex_digit),
                b.get(i + 3).copied().and_then(hex_digit),
            );
            if let (Some(hi), Some(lo)) = hex {
                out.push(hi << 4 | lo);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_digit(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// A libvirt machine as named in its cgroup: `qemu-<domain id>-<name>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LibvirtMachine {
    /// Domain id; absent in layouts from before libvirt put it in the machine name.
    pub id: Option<u32>,
    /// libvirt's cleaned name: only `[A-Za-z0-9-]` survive, at most ~64 bytes. Prefer `-name`.
    pub name: String,
}

/// Finds the libvirt machine a cgroup path belongs to.
///
/// systemd: `/machine.slice[/machine-PART.slice...]/machine-qemu\x2d<ID>\x2d<NAME>.scope[/...]`
/// (below the scope: `libvirt/emulator`, `vcpuN`... depending on the libvirt version).
/// Without systemd: `/machine[/PARTITION...]/qemu-<ID>-<NAME>.libvirt-qemu[/emulator...]`.
pub fn libvirt_machine(path: &str) -> Option<LibvirtMachine> {
    let mut comps = path.split('/').filter(|c| !c.is_empty());
    match comps.next()? {
        "machine.slice" => {
            // Slices may nest (custom partitions); the first non-slice must be the machine scope,
            // so a scope of another kind (a container) can't host a forged one below it.
            let scope = comps.find(|c| !c.ends_with(".slice"))?;
            let unit = scope.strip_suffix(".scope")?.strip_prefix("machine-")?;
            parse_machine_name(&unescape_systemd(unit))
        }
        "machine" => {
            let group = comps.find_map(|c| c.strip_suffix(".libvirt-qemu"))?;
            // libvirt prefixes names that clash with cgroup files with '_'.
            let group = group.strip_prefix('_').unwrap_or(group);
            parse_machine_name(group).or_else(|| {
                // Oldest layout: the bare domain name.
                (!group.is_empty()).then(|| LibvirtMachine {
                    id: None,
                    name: group.to_owned(),
                })
            })
        }
        _ => None,
    }
}

/// Parses `qemu-<id>-<name>` (or the older `qemu-<name>`).
fn parse_machine_name(machine: &str) -> Option<LibvirtMachine> {
    let rest = machine.strip_prefix("qemu-")?;
    if let Some((id, name)) = rest.split_once('-')
        && let Some(id) = super::decimal_u32(id)
        && !name.is_empty()
    {
        return Some(LibvirtMachine {
            id: Some(id),
            name: name.to_owned(),
        });
    }
    (!rest.is_empty()).then(|| LibvirtMachine {
        id: None,
        name: rest.to_owned(),
    })
}

/// Whether a path is in the layout of a VM manager overkvm knows (libvirt, Proxmox, KubeVirt's
/// kubelet).
pub fn is_manager_layout(path: &str) -> bool {
    libvirt_machine(path).is_some()
        || proxmox_vmid(path).is_some()
        || super::kubevirt::in_kubepods(path)
}

/// The Proxmox VMID of a path under `/qemu.slice/<VMID>.scope`.
pub fn proxmox_vmid(path: &str) -> Option<u32> {
    let mut comps = path.split('/').filter(|c| !c.is_empty());
    if comps.next()? != "qemu.slice" {
        return None;
    }
    super::decimal_u32(comps.next()?.strip_suffix(".scope")?)
}

/// The path that says who manages the process: the v2 line's or the v1 blkio line's, whichever
/// is in a manager's layout (on a hybrid host a manager may have placed the process in only
/// one of them: libvirt without systemd, a kubelet on the cgroupfs driver), else
/// [`io_cgroup_path`].
pub fn manager_cgroup_path(entries: &[CgroupEntry]) -> &str {
    [IoController::V2, IoController::V1]
        .into_iter()
        .filter_map(|api| block_cgroup_path(entries, api))
        .find(|p| is_manager_layout(p))
        .unwrap_or_else(|| io_cgroup_path(entries))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::proc::parse_cgroup;

    #[test]
    fn the_manager_is_read_from_whichever_line_holds_its_layout() {
        // Hybrid host, kubelet on the cgroupfs driver: the pod shows only in v1.
        let raw = b"12:blkio:/kubepods/burstable/pod1/c1\n1:name=systemd:/system.slice/containerd.service\n\
            0::/system.slice/containerd.service\n";
        let e = parse_cgroup(raw).unwrap();
        assert_eq!(manager_cgroup_path(&e), "/kubepods/burstable/pod1/c1");
        // blkio is on v1 here: the pod's blkio cgroup is also the one its I/O is charged to.
        assert_eq!(io_cgroup_path(&e), "/kubepods/burstable/pod1/c1");
        // libvirt without systemd on a hybrid host.
        let raw = b"12:blkio:/machine/qemu-3-vm3.libvirt-qemu\n0::/user.slice/s.scope\n";
        let e = parse_cgroup(raw).unwrap();
        assert_eq!(manager_cgroup_path(&e), "/machine/qemu-3-vm3.libvirt-qemu");
        // Both in a layout: the v2 line names the manager (I/O is still charged to blkio).
        let raw = b"12:blkio:/machine/qemu-3-vm3.libvirt-qemu\n0::/machine.slice/machine-qemu\\x2d3\\x2dvm3.scope\n";
        let e = parse_cgroup(raw).unwrap();
        assert_eq!(
            manager_cgroup_path(&e),
            "/machine.slice/machine-qemu\\x2d3\\x2dvm3.scope"
        );
        // Neither: the I/O cgroup (the block controller's, blkio here).
        let raw = b"12:blkio:/a\n0::/b\n";
        assert_eq!(manager_cgroup_path(&parse_cgroup(raw).unwrap()), "/a");
        assert_eq!(manager_cgroup_path(&[]), "");
    }

    fn m(id: Option<u32>, name: &str) -> Option<LibvirtMachine> {
        Some(LibvirtMachine {
            id,
            name: name.to_owned(),
        })
    }

    #[test]
    fn unescape() {
        assert_eq!(unescape_systemd(r"qemu\x2d1\x2dvm1"), "qemu-1-vm1");
        assert_eq!(unescape_systemd(r"a\x2Db"), "a-b");
        assert_eq!(unescape_systemd(r"plain"), "plain");
        // Malformed escapes stay literal.
        assert_eq!(unescape_systemd(r"\x2"), r"\x2");
        assert_eq!(unescape_systemd(r"\xzz\x"), r"\xzz\x");
        assert_eq!(unescape_systemd(r"\\x41"), r"\A");
        // Escaped control and non-UTF-8 bytes are data.
        assert_eq!(unescape_systemd(r"\x1b[2J"), "\x1b[2J");
        assert_eq!(unescape_systemd(r"\xff"), "\u{fffd}");
        assert_eq!(unescape_systemd(r"\xc3\xa9"), "é");
    }

    #[test]
    fn libvirt_systemd_layouts() {
        // libvirt >= 7.1 (extra libvirt/ level), main process in emulator.
        assert_eq!(
            libvirt_machine(r"/machine.slice/machine-qemu\x2d39\x2dv1465.scope/libvirt/emulator"),
            m(Some(39), "v1465")
        );
        // Older layout, and the scope itself.
        assert_eq!(
            libvirt_machine(r"/machine.slice/machine-qemu\x2d2\x2dinstance\x2d00000001.scope"),
            m(Some(2), "instance-00000001")
        );
        // Custom partition slice.
        assert_eq!(
            libvirt_machine(
                r"/machine.slice/machine-production.slice/machine-qemu\x2d7\x2dweb.scope/emulator"
            ),
            m(Some(7), "web")
        );
        // Pre-id machine names.
        assert_eq!(
            libvirt_machine(r"/machine.slice/machine-qemu\x2dold\x2dvm.scope"),
            m(None, "old-vm")
        );
    }

    #[test]
    fn libvirt_non_systemd_layouts() {
        assert_eq!(
            libvirt_machine("/machine/qemu-1-vm1.libvirt-qemu/emulator"),
            m(Some(1), "vm1")
        );
        assert_eq!(
            libvirt_machine("/machine/production/qemu-3-db.libvirt-qemu"),
            m(Some(3), "db")
        );
        assert_eq!(
            libvirt_machine("/machine/_cpu.libvirt-qemu"),
            m(None, "cpu")
        );
        assert_eq!(libvirt_machine("/machine/vm1.libvirt-qemu"), m(None, "vm1"));
    }

    #[test]
    fn libvirt_negatives() {
        for p in [
            "",
            "/",
            "/machine.slice",
            "/system.slice/libvirtd.service",
            // Forged inside a user's delegated subtree.
            r"/user.slice/user-1000.slice/user@1000.service/machine.slice/machine-qemu\x2d1\x2dv.scope",
            // Forged below another machine's scope.
            r"/machine.slice/machine-lxc\x2d5\x2dct.scope/machine-qemu\x2d1\x2dv.scope",
            r"/machine.slice/docker-0123abcd.scope",
            r"/machine.slice/machine-qemu.scope",
            r"/machine.slice/machine-qemu\x2d.scope",
            "/machine/lxc-1-ct.libvirt-lxc",
            "/machine/.libvirt-qemu",
        ] {
            assert_eq!(libvirt_machine(p), None, "{p}");
        }
    }

    #[test]
    fn proxmox() {
        assert_eq!(proxmox_vmid("/qemu.slice/100.scope"), Some(100));
        assert_eq!(
            proxmox_vmid("/qemu.slice/999999999.scope/sub"),
            Some(999999999)
        );
        for p in [
            "/qemu.slice",
            "/qemu.slice/abc.scope",
            "/qemu.slice/+100.scope",
            "/qemu.slice/-1.scope",
            "/qemu.slice/100.service",
            "/qemu.slice/99999999999.scope",
            "/user.slice/qemu.slice/100.scope",
            "/system.slice/qemu.slice/100.scope",
            "",
        ] {
            assert_eq!(proxmox_vmid(p), None, "{p}");
        }
    }
}
