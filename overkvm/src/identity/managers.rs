//! Which manager runs a qemu process (Proxmox, KubeVirt, Nova, libvirt, or none) and what it calls the VM.
//!
//! Evidence differs in strength. cgroup paths under `/machine.slice` or `/qemu.slice`, and
//! files under `/run/libvirt` or `/etc/pve`, are written by root. The command line is written
//! by whoever started qemu, so a local user running their own qemu with `-id 100` or
//! `product=OpenStack Nova` is believed. That is acceptable for naming, and the kernel-side
//! accounting keys on cgroups anyway. Where both kinds exist, the cgroup wins.

use super::cgroup;
use super::kubevirt;
use super::qemu::{QemuArgs, normalize_uuid};
use super::{Manager, VmIdentity};

/// The smbios type 1 product Nova's libvirt driver sets.
pub const NOVA_PRODUCT: &str = "OpenStack Nova";

/// Files written by managers, read only when a process looks like theirs. A trait so the
/// decision logic can be tested without a filesystem.
pub trait HostFiles {
    /// `/run/libvirt/qemu/NAME.pid` (libvirt writes it for every running domain).
    fn libvirt_pidfile(&self, name: &str) -> Option<String>;
    /// `/run/libvirt/qemu/NAME.xml`, the status XML holding the full domain definition.
    fn libvirt_status(&self, name: &str) -> Option<String>;
    /// `/etc/pve/qemu-server/VMID.conf`.
    fn pve_config(&self, vmid: u32) -> Option<String>;
}

/// Identifies the VM of a qemu process. First match wins: Proxmox, KubeVirt, Nova, libvirt,
/// plain qemu.
pub fn identify(pid: u32, args: &QemuArgs, cgroup: &str, host: &dyn HostFiles) -> VmIdentity {
    let uuid = args.uuid.clone().or_else(|| args.smbios_uuid.clone());

    if let Some(vmid) = cgroup::proxmox_vmid(cgroup).or(args.id) {
        let name = args
            .name
            .clone()
            .or_else(|| host.pve_config(vmid).and_then(|c| pve_config_name(&c)))
            .unwrap_or_else(|| format!("vm{vmid}"));
        return VmIdentity {
            name,
            uuid,
            manager: Manager::Proxmox,
            vmid: Some(vmid),
            display_name: None,
            namespace: None,
        };
    }

    // KubeVirt's libvirt lives in the pod: nothing of it shows on the host but the pod's
    // cgroup and the domain name qemu was given.
    if kubevirt::in_kubepods(cgroup)
        && let Some((ns, vmi)) = args.name.as_deref().and_then(kubevirt::split_domain_name)
    {
        return VmIdentity {
            name: kubevirt::host_name(ns, vmi),
            uuid,
            manager: Manager::Kubevirt,
            vmid: None,
            display_name: Some(vmi.to_owned()),
            namespace: Some(ns.to_owned()),
        };
    }

    // libvirt cleans and shortens the name in the scope, so -name is the better name.
    let machine = cgroup::libvirt_machine(cgroup);
    let name = args
        .name
        .clone()
        .or_else(|| machine.as_ref().map(|m| m.name.clone()));
    let by_smbios = args.smbios_product.as_deref().map(str::trim) == Some(NOVA_PRODUCT);
    let libvirt = machine.is_some()
        || name
            .as_deref()
            .is_some_and(|n| libvirt_pid_matches(host, n, pid));
    let by_name = libvirt && name.as_deref().is_some_and(is_nova_instance_name);

    if by_smbios || by_name || libvirt {
        let manager = if by_smbios || by_name {
            Manager::Nova
        } else {
            Manager::Libvirt
        };
        let domain_id = machine.as_ref().and_then(|m| m.id);
        // The status XML is the only source of Nova's display name; for plain libvirt it
        // is worth reading only to fill a gap.
        let status = match (&name, manager, domain_id, &uuid) {
            (Some(n), Manager::Nova, _, _) | (Some(n), _, None, _) | (Some(n), _, _, None) => {
                libvirt_status_for(host, n, pid)
            }
            _ => None,
        };
        let status = status.as_deref();
        return VmIdentity {
            name: name.unwrap_or_else(|| fallback_name(pid, uuid.as_deref())),
            uuid: uuid.or_else(|| status.and_then(domain_uuid)),
            manager,
            vmid: domain_id.or_else(|| status.and_then(domain_id_attr)),
            display_name: status
                .and_then(|x| element_text(x, "nova:name"))
                .filter(|n| !n.is_empty()),
            namespace: None,
        };
    }

    VmIdentity {
        name: args
            .name
            .clone()
            .unwrap_or_else(|| fallback_name(pid, uuid.as_deref())),
        uuid,
        manager: Manager::Qemu,
        vmid: None,
        display_name: None,
        namespace: None,
    }
}

fn fallback_name(pid: u32, uuid: Option<&str>) -> String {
    uuid.map_or_else(|| format!("qemu-{pid}"), str::to_owned)
}

/// Nova's default `instance_name_template` is `instance-%08x`: at least 8 lower-case hex digits.
pub fn is_nova_instance_name(name: &str) -> bool {
    name.strip_prefix("instance-").is_some_and(|hex| {
        hex.len() >= 8 && hex.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// Whether `name` can be used as a file name under a manager's directory. The name comes from
/// the command line, so `../x` or `a/b` must not turn into a path.
pub fn is_safe_file_stem(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name != "."
        && name != ".."
        && !name.contains(['/', '\0'])
}

fn libvirt_pid_matches(host: &dyn HostFiles, name: &str, pid: u32) -> bool {
    is_safe_file_stem(name)
        && host.libvirt_pidfile(name).and_then(|t| parse_pidfile(&t)) == Some(pid)
}

/// The status XML of domain `name`, unless it names a different qemu pid (a stale file, or a
/// user's qemu that borrowed a domain's name).
fn libvirt_status_for(host: &dyn HostFiles, name: &str, pid: u32) -> Option<String> {
    if !is_safe_file_stem(name) {
        return None;
    }
    let xml = host.libvirt_status(name)?;
    match domstatus_pid(&xml) {
        Some(p) if p != pid => None,
        _ => Some(xml),
    }
}

/// A pidfile holds a decimal pid, usually newline-terminated.
pub fn parse_pidfile(text: &str) -> Option<u32> {
    super::decimal_u32(text.trim())
}

/// The `name:` of a Proxmox VM config. Snapshot and pending sections (`[name]`) repeat keys
/// with old values, so only the lines before the first section count.
pub fn pve_config_name(conf: &str) -> Option<String> {
    conf.lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with('['))
        .find_map(|l| l.strip_prefix("name:"))
        .map(|n| n.trim().to_owned())
        .filter(|n| !n.is_empty())
}

// A tiny, tolerant reader for libvirt's status XML: a few values (the pid, uuid and id of a
// domain, its disks' sources and <iotune>) from a file whose size and formatting we do not
// control, so string search beats a full parser here.

/// Text of the first `<tag>` element (entities decoded, trimmed); `None` if absent or unclosed.
pub fn element_text(xml: &str, tag: &str) -> Option<String> {
    let (_, start_tag, rest) = find_start_tag(xml, tag)?;
    if start_tag.ends_with('/') {
        return Some(String::new());
    }
    let end = rest.find("</")?;
    Some(decode_entities(rest[..end].trim()))
}

/// Finds `<tag` followed by whitespace, `>` or `/`. Returns the offset, the inside of the start
/// tag (after the name) and the text after it.
pub(crate) fn find_start_tag<'a>(xml: &'a str, tag: &str) -> Option<(usize, &'a str, &'a str)> {
    let open = format!("<{tag}");
    let mut from = 0;
    while let Some(i) = xml[from..].find(&open) {
        let at = from + i;
        let after = &xml[at + open.len()..];
        if after.starts_with(|c: char| c == '>' || c == '/' || c.is_ascii_whitespace()) {
            let close = after.find('>')?;
            return Some((at, &after[..close], &after[close + 1..]));
        }
        from = at + open.len();
    }
    None
}

/// Value of attribute `name` inside a start tag's text.
pub(crate) fn attribute<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let mut from = 0;
    while let Some(i) = tag[from..].find(name) {
        let at = from + i;
        from = at + name.len();
        let preceded = tag[..at].ends_with(|c: char| c.is_ascii_whitespace());
        let rest = tag[from..].trim_start();
        if let (true, Some(rest)) = (preceded, rest.strip_prefix('=')) {
            let rest = rest.trim_start();
            let quote = rest.chars().next().filter(|&q| q == '\'' || q == '"')?;
            let rest = &rest[1..];
            return rest.find(quote).map(|end| &rest[..end]);
        }
    }
    None
}

/// `<domstatus ... pid='N'>`: the qemu pid libvirt recorded.
pub fn domstatus_pid(xml: &str) -> Option<u32> {
    let (_, tag, _) = find_start_tag(xml, "domstatus")?;
    super::decimal_u32(attribute(tag, "pid")?)
}

/// The `<uuid>` of the `<domain>` (looked up after `<domain`, so nothing in the status
/// preamble can shadow it).
pub fn domain_uuid(xml: &str) -> Option<String> {
    let (at, _, _) = find_start_tag(xml, "domain")?;
    normalize_uuid(&element_text(&xml[at..], "uuid")?)
}

/// `<domain type='kvm' id='N'>`: libvirt's domain id while it runs.
pub fn domain_id_attr(xml: &str) -> Option<u32> {
    let (_, tag, _) = find_start_tag(xml, "domain")?;
    super::decimal_u32(attribute(tag, "id")?)
}

/// Decodes XML's predefined and numeric character references; anything else is left as is.
fn decode_entities(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let decoded = rest.find(';').filter(|&end| end <= 10).and_then(|end| {
            let c = match &rest[1..end] {
                "amp" => '&',
                "lt" => '<',
                "gt" => '>',
                "quot" => '"',
                "apos" => '\'',
                e => {
                    let n = e.strip_prefix("#x").or_else(|| e.strip_prefix("#X"));
                    let n = match n {
                        Some(hex) => u32::from_str_radix(hex, 16).ok(),
                        None => e.strip_prefix('#').and_then(|d| d.parse().ok()),
                    };
                    char::from_u32(n?)?
                }
            };
            Some((c, end))
        });
        match decoded {
            Some((c, end)) => {
                out.push(c);
                rest = &rest[end + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::HashMap;

    /// In-memory manager files; records which names were asked for.
    #[derive(Default)]
    struct Files {
        pidfiles: HashMap<String, String>,
        status: HashMap<String, String>,
        pve: HashMap<u32, String>,
        asked: RefCell<Vec<String>>,
    }

    impl HostFiles for Files {
        fn libvirt_pidfile(&self, name: &str) -> Option<String> {
            self.asked.borrow_mut().push(format!("pid:{name}"));
            self.pidfiles.get(name).cloned()
        }
        fn libvirt_status(&self, name: &str) -> Option<String> {
            self.asked.borrow_mut().push(format!("xml:{name}"));
            self.status.get(name).cloned()
        }
        fn pve_config(&self, vmid: u32) -> Option<String> {
            self.asked.borrow_mut().push(format!("pve:{vmid}"));
            self.pve.get(&vmid).cloned()
        }
    }

    fn args(a: &[&str]) -> QemuArgs {
        let mut v = vec!["/usr/bin/kvm".to_string()];
        v.extend(a.iter().map(|s| s.to_string()));
        QemuArgs::parse(&v)
    }

    const UUID: &str = "6a2cfe1e-9d3b-4c4e-9a41-2b9a3f1b7c10";

    /// A virt-launcher's qemu as KubeVirt's libvirt starts it (abridged).
    const KUBEVIRT_ARGV: &[&str] = &[
        "-name",
        "guest=prod-eu1_web-01,debug-threads=on",
        "-S",
        "-machine",
        "pc-q35-rhel9.2.0,usb=off,dump-guest-core=off",
        "-uuid",
        UUID,
        "-smbios",
        "type=1,manufacturer=KubeVirt,product=None,uuid=6a2cfe1e-9d3b-4c4e-9a41-2b9a3f1b7c10,family=KubeVirt",
        "-no-user-config",
    ];

    #[test]
    fn kubevirt_needs_a_pod_cgroup_and_a_namespaced_domain_name() {
        let f = Files::default();
        let pod = "/kubepods.slice/kubepods-burstable.slice/\
                   kubepods-burstable-pod0f6c2d7e_1b2a.slice/cri-containerd-3c1e9a.scope";
        let v = identify(4242, &args(KUBEVIRT_ARGV), pod, &f);
        assert_eq!(
            v,
            VmIdentity {
                name: "prod-eu1/web-01".into(),
                uuid: Some(UUID.into()),
                manager: Manager::Kubevirt,
                vmid: None,
                display_name: Some("web-01".into()),
                namespace: Some("prod-eu1".into()),
            }
        );
        assert!(
            f.asked.borrow().is_empty(),
            "the pod's libvirt files are not the host's: none is read"
        );
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["manager"], "kubevirt");
        assert_eq!(json["namespace"], "prod-eu1");
        let cgroupfs = "/kubepods/burstable/pod0f6c2d7e-1b2a/3c1e9a";
        assert_eq!(
            identify(1, &args(KUBEVIRT_ARGV), cgroupfs, &f).manager,
            Manager::Kubevirt
        );
        // A user's qemu named like a KubeVirt domain, outside the pods: plain qemu.
        let v = identify(1, &args(KUBEVIRT_ARGV), "/user.slice/u.scope", &f);
        assert_eq!(
            (v.manager, v.name.as_str()),
            (Manager::Qemu, "prod-eu1_web-01")
        );
        assert_eq!(v.namespace, None);
        // Some other qemu in a pod (no namespaced name): plain qemu too.
        let v = identify(1, &args(&["-name", "sandbox"]), cgroupfs, &f);
        assert_eq!((v.manager, v.name.as_str()), (Manager::Qemu, "sandbox"));
        let v = identify(1, &args(&["-name", "Bad_Name"]), cgroupfs, &f);
        assert_eq!(v.manager, Manager::Qemu);
    }

    fn status_xml(pid: u32, display: &str) -> String {
        format!(
            "<domstatus state='running' reason='booted' pid='{pid}'>\n  <taint flag='high-privileges'/>\n\
             <monitor path='/var/lib/libvirt/qemu/domain-5-instance-0000abcd/monitor.sock' type='unix'/>\n\
             <qemuCaps>\n<flag name='kvm'/>\n</qemuCaps>\n\
             <domain type='kvm' id='5'>\n  <name>instance-0000abcd</name>\n  <uuid>{}</uuid>\n\
             <metadata>\n    <nova:instance xmlns:nova=\"http://openstack.org/xmlns/libvirt/nova/1.1\">\n\
             <nova:package version=\"27.1.0\"/>\n      <nova:name>{display}</nova:name>\n\
             <nova:owner><nova:user uuid=\"aaaa\">admin</nova:user></nova:owner>\n\
             </nova:instance>\n  </metadata>\n</domain>\n</domstatus>\n",
            UUID.to_uppercase()
        )
    }

    #[test]
    fn proxmox_from_id_and_name() {
        let f = Files::default();
        let a = args(&["-id", "100", "-name", "web01,debug-threads=on"]);
        let v = identify(4242, &a, "/qemu.slice/100.scope", &f);
        assert_eq!(
            v,
            VmIdentity {
                name: "web01".into(),
                uuid: None,
                manager: Manager::Proxmox,
                vmid: Some(100),
                display_name: None,
                namespace: None,
            }
        );
        assert!(f.asked.borrow().is_empty(), "-name present: no config read");
    }

    #[test]
    fn proxmox_from_cgroup_and_config() {
        let mut f = Files::default();
        f.pve.insert(
            101,
            "boot: order=scsi0\n# name: in a comment\nname:  db-main \nmemory: 4096\n\
             [snap1]\nname: db-old\n"
                .into(),
        );
        let v = identify(1, &args(&[]), "/qemu.slice/101.scope", &f);
        assert_eq!(
            (v.manager, v.name.as_str(), v.vmid),
            (Manager::Proxmox, "db-main", Some(101))
        );

        // Name only in a snapshot section, or no config at all: the Proxmox default.
        f.pve.insert(102, "memory: 1\n[snap]\nname: old\n".into());
        assert_eq!(
            identify(1, &args(&[]), "/qemu.slice/102.scope", &f).name,
            "vm102"
        );
        assert_eq!(identify(1, &args(&["-id", "103"]), "/", &f).name, "vm103");
    }

    #[test]
    fn proxmox_cgroup_beats_command_line() {
        let f = Files::default();
        let v = identify(1, &args(&["-id", "100"]), "/qemu.slice/200.scope", &f);
        assert_eq!(v.vmid, Some(200));
        // Proxmox wins over libvirt-looking evidence.
        let v = identify(
            1,
            &args(&["-id", "7", "-name", "instance-0000abcd"]),
            "/",
            &f,
        );
        assert_eq!(v.manager, Manager::Proxmox);
    }

    #[test]
    fn nova_by_smbios_with_status_xml() {
        let mut f = Files::default();
        f.status.insert(
            "instance-0000abcd".into(),
            status_xml(777, "web &amp; api &#x263A;"),
        );
        let a = args(&[
            "-name",
            "guest=instance-0000abcd,debug-threads=on",
            "-smbios",
            &format!("type=1,manufacturer=OpenStack Foundation,product=OpenStack Nova,uuid={UUID}"),
        ]);
        let v = identify(777, &a, "/", &f);
        assert_eq!(
            v,
            VmIdentity {
                name: "instance-0000abcd".into(),
                uuid: Some(UUID.into()),
                manager: Manager::Nova,
                vmid: Some(5),
                display_name: Some("web & api \u{263a}".into()),
                namespace: None,
            }
        );
    }

    #[test]
    fn nova_by_instance_name_and_scope() {
        let mut f = Files::default();
        f.status
            .insert("instance-0000abcd".into(), status_xml(777, "db"));
        let a = args(&["-name", "guest=instance-0000abcd"]);
        let cg = r"/machine.slice/machine-qemu\x2d9\x2dinstance\x2d0000abcd.scope/libvirt/emulator";
        let v = identify(777, &a, cg, &f);
        assert_eq!(v.manager, Manager::Nova);
        assert_eq!(v.vmid, Some(9), "scope's domain id beats the XML's");
        assert_eq!(
            v.uuid.as_deref(),
            Some(UUID),
            "uuid from the XML, normalised"
        );
        assert_eq!(v.display_name.as_deref(), Some("db"));

        // The status XML of another process (same name) is not used.
        let v = identify(778, &a, cg, &f);
        assert_eq!(
            (v.manager, v.uuid, v.display_name),
            (Manager::Nova, None, None)
        );
    }

    #[test]
    fn nova_name_without_libvirt_evidence_is_plain_qemu() {
        let mut f = Files::default();
        f.pidfiles.insert("instance-0000abcd".into(), "1\n".into());
        let v = identify(
            2,
            &args(&["-name", "instance-0000abcd"]),
            "/user.slice/x",
            &f,
        );
        assert_eq!(
            (v.manager, v.name.as_str()),
            (Manager::Qemu, "instance-0000abcd")
        );
    }

    #[test]
    fn libvirt_by_scope_prefers_command_line_name() {
        let f = Files::default();
        let a = args(&["-name", "guest=my_vm.test,debug-threads=on", "-uuid", UUID]);
        let v = identify(
            5,
            &a,
            r"/machine.slice/machine-qemu\x2d3\x2dmyvm.test.scope/libvirt",
            &f,
        );
        assert_eq!(
            v,
            VmIdentity {
                name: "my_vm.test".into(),
                uuid: Some(UUID.into()),
                manager: Manager::Libvirt,
                vmid: Some(3),
                display_name: None,
                namespace: None,
            }
        );
        // Without -name, the scope's (cleaned) name.
        let v = identify(
            5,
            &args(&[]),
            "/machine/qemu-4-vm4.libvirt-qemu/emulator",
            &f,
        );
        assert_eq!(
            (v.manager, v.name.as_str(), v.vmid),
            (Manager::Libvirt, "vm4", Some(4))
        );
    }

    #[test]
    fn libvirt_by_pidfile() {
        let mut f = Files::default();
        f.pidfiles.insert("v1".into(), "321\n".into());
        f.status.insert(
            "v1".into(),
            format!("<domstatus pid='321'><domain type='kvm' id='12'><uuid>{UUID}</uuid></domain></domstatus>"),
        );
        let v = identify(321, &args(&["-name", "guest=v1"]), "/", &f);
        assert_eq!(
            (v.manager, v.vmid, v.uuid.as_deref()),
            (Manager::Libvirt, Some(12), Some(UUID))
        );
        // Someone else's pid in the pidfile: not libvirt.
        let v = identify(322, &args(&["-name", "guest=v1"]), "/", &f);
        assert_eq!(v.manager, Manager::Qemu);
    }

    #[test]
    fn plain_qemu_names() {
        let f = Files::default();
        let v = identify(9, &args(&["-name", "x"]), "/", &f);
        assert_eq!((v.manager, v.name.as_str()), (Manager::Qemu, "x"));
        let v = identify(9, &args(&["-uuid", UUID]), "/", &f);
        assert_eq!(v.name, UUID);
        let v = identify(9, &args(&[]), "", &f);
        assert_eq!(v.name, "qemu-9");
        let v = identify(
            9,
            &args(&["-smbios", "type=1,product=OpenStack Novax"]),
            "",
            &f,
        );
        assert_eq!(v.manager, Manager::Qemu);
    }

    #[test]
    fn unsafe_names_never_reach_the_filesystem() {
        let f = Files::default();
        for name in ["../../etc/shadow", "a/b", ".", "..", &"x".repeat(300)] {
            let a = args(&[
                "-name",
                &format!("guest={name}"),
                "-smbios",
                "type=1,product=OpenStack Nova",
            ]);
            let v = identify(9, &a, "/", &f);
            assert_eq!(v.name, name);
        }
        assert!(f.asked.borrow().is_empty(), "{:?}", f.asked.borrow());
    }

    #[test]
    fn instance_names() {
        assert!(is_nova_instance_name("instance-0000abcd"));
        assert!(is_nova_instance_name("instance-100000000"));
        for n in [
            "instance-0000abc",
            "instance-0000ABCD",
            "instance-0000abcg",
            "instance-",
            "x-0000abcd",
        ] {
            assert!(!is_nova_instance_name(n), "{n}");
        }
    }

    #[test]
    fn pidfiles() {
        assert_eq!(parse_pidfile("8611\n"), Some(8611));
        assert_eq!(parse_pidfile(" 8611"), Some(8611));
        for bad in ["", "\n", "-1", "+1", "86 11", "0x10", "99999999999"] {
            assert_eq!(parse_pidfile(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn xml_helpers() {
        let x = status_xml(1, "a");
        assert_eq!(domstatus_pid(&x), Some(1));
        assert_eq!(domain_id_attr(&x), Some(5));
        assert_eq!(domain_uuid(&x).as_deref(), Some(UUID));
        // Prefix matches are not elements; self-closing and unclosed ones are handled.
        assert_eq!(
            element_text(
                "<nova:namespace>x</nova:namespace><nova:name>y</nova:name>",
                "nova:name"
            )
            .as_deref(),
            Some("y")
        );
        assert_eq!(
            element_text("<nova:name/>", "nova:name").as_deref(),
            Some("")
        );
        assert_eq!(element_text("<nova:name>never closed", "nova:name"), None);
        assert_eq!(element_text("<nova:name", "nova:name"), None);
        assert_eq!(element_text("", "nova:name"), None);
        // Attributes: double quotes, spaces around '=', no match inside other names.
        assert_eq!(
            domain_id_attr("<domain xid='1' type=\"kvm\" id = \"42\">"),
            Some(42)
        );
        assert_eq!(domain_id_attr("<domain type='kvm'>"), None);
        assert_eq!(domain_id_attr("<domain id=42>"), None);
        assert_eq!(domstatus_pid("<domstatus pid='12"), None);
        // A uuid before <domain> (e.g. in the status preamble) is not the domain's.
        assert_eq!(
            domain_uuid(&format!(
                "<uuid>{UUID}</uuid><domain><name>x</name></domain>"
            )),
            None
        );
        // Entities.
        assert_eq!(
            decode_entities("a&amp;b&lt;&gt;&quot;&apos;&#65;&#x42;"),
            "a&b<>\"'AB"
        );
        assert_eq!(
            decode_entities("&bogus; & &#xD800; &#99999999999; &"),
            "&bogus; & &#xD800; &#99999999999; &"
        );
        assert_eq!(decode_entities("\x1b[2J&#27;"), "\x1b[2J\x1b");
    }
}
