//! KubeVirt: qemu runs inside the `compute` container of a `virt-launcher` pod, started by a
//! libvirt that lives in the pod too (its files under `/run/libvirt` are in the pod's mount
//! namespace, not the host's). What the host sees:
//!
//! - the libvirt domain name, and so qemu's `-name guest=`, is `<namespace>_<vmi>`; Kubernetes
//!   names never contain `_`, so the first `_` separates them;
//! - the pod's libvirt runs with `cgroup_controllers = [ ]`, so qemu stays in the container's
//!   cgroup, under the kubelet's root: `/kubepods/...` (cgroupfs driver) or `/kubepods.slice/...`
//!   (systemd driver).
//!
//! Both are required: the cgroup (root-written) says it is a pod, the name says which VMI. A
//! VM is named `<namespace>/<vmi>` on the host (unique where the VMI name alone is not), with
//! the namespace and the VMI name also kept apart.

/// Whether a cgroup path lies under the kubelet's pod hierarchy (anchored at the root, like the
/// other managers' matchers: only root can create cgroups there).
pub fn in_kubepods(path: &str) -> bool {
    let first = path.split('/').find(|c| !c.is_empty());
    matches!(first, Some("kubepods" | "kubepods.slice"))
}

/// A Kubernetes namespace: an RFC 1123 label (lower-case alphanumerics and `-`, at most 63,
/// alphanumeric at both ends).
pub fn is_namespace(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A VMI name: an RFC 1123 subdomain (lower-case alphanumerics, `-` and `.`, at most 253,
/// alphanumeric at both ends).
pub fn is_vmi_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// Splits a KubeVirt domain name `<namespace>_<vmi>`; `None` unless both parts are valid
/// Kubernetes names.
pub fn split_domain_name(name: &str) -> Option<(&str, &str)> {
    let (ns, vmi) = name.split_once('_')?;
    (is_namespace(ns) && is_vmi_name(vmi)).then_some((ns, vmi))
}

/// The name a KubeVirt VM has on the host: `<namespace>/<vmi>`.
pub fn host_name(namespace: &str, vmi: &str) -> String {
    format!("{namespace}/{vmi}")
}

/// The namespace part of a KubeVirt VM's host name (or of a label derived from it, such as
/// `ns/vmi/uuid`).
pub fn namespace_of(host_name: &str) -> Option<&str> {
    host_name.split_once('/').map(|(ns, _)| ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_are_recognised_under_either_kubelet_driver_and_only_at_the_root() {
        for p in [
            "/kubepods/burstable/pod0f6c2d7e-1b2a-4c3d-9e8f-0a1b2c3d4e5f/3c1e9a",
            "/kubepods/pod0f6c2d7e/abc",
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f6c2d7e_1b2a.slice/\
             cri-containerd-3c1e9a.scope",
        ] {
            assert!(in_kubepods(p), "{p}");
        }
        for p in [
            "/",
            "",
            "/user.slice/user-1000.slice/kubepods/x",
            "/kubepodsX/y",
            "/machine.slice/machine-qemu\\x2d1\\x2dvm.scope",
        ] {
            assert!(!in_kubepods(p), "{p}");
        }
    }

    #[test]
    fn domain_names_split_at_the_first_underscore_into_valid_kubernetes_names() {
        assert_eq!(
            split_domain_name("default_testvmi"),
            Some(("default", "testvmi"))
        );
        assert_eq!(
            split_domain_name("prod-eu1_web-01.example"),
            Some(("prod-eu1", "web-01.example"))
        );
        for bad in [
            "testvmi", "_vmi", "ns_", "Ns_vmi", "ns_Vmi", "ns_a_b", "-ns_vmi", "ns_-vmi",
            "ns_vmi.", "n s_vmi", "ns_vm/i",
        ] {
            assert_eq!(split_domain_name(bad), None, "{bad}");
        }
        let long_ns = "a".repeat(64);
        assert_eq!(split_domain_name(&format!("{long_ns}_vmi")), None);
        let long_vmi = "v".repeat(254);
        assert_eq!(split_domain_name(&format!("ns_{long_vmi}")), None);
        assert!(split_domain_name(&format!("ns_{}", "v".repeat(253))).is_some());
    }

    #[test]
    fn host_names_round_trip_to_the_namespace() {
        let n = host_name("prod", "web01");
        assert_eq!(n, "prod/web01");
        assert_eq!(namespace_of(&n), Some("prod"));
        assert_eq!(namespace_of("prod/web01/6a2c"), Some("prod"));
        assert_eq!(namespace_of("web01"), None);
    }
}
