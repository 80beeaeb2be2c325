//! `/proc/PID/cgroup` and the cgroup paths in it: cgroup names are chosen by whoever may create
//! cgroups (delegated subtrees), and may hold `:`, newlines and escapes. The path then goes
//! through the manager matchers (libvirt, Proxmox), systemd unescaping and the throttle's path
//! check.
#![no_main]

use libfuzzer_sys::fuzz_target;
use overkvm::host::cgroup::limits::check_cgroup_path;
use overkvm::host::proc;
use overkvm::identity::cgroup;

fn paths(p: &str) {
    let _ = cgroup::unescape_systemd(p);
    if let Some(m) = cgroup::libvirt_machine(p) {
        assert!(
            !m.name.is_empty(),
            "libvirt machine without a name from {p:?}"
        );
    }
    let _ = cgroup::proxmox_vmid(p);
    if let Ok(rel) = check_cgroup_path(p) {
        // Accepted paths are relative, non-empty and never climb out of the hierarchy.
        assert!(!rel.is_empty() && !rel.starts_with('/'));
        assert!(rel.split('/').all(|c| c != ".."), "{p:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    paths(&text);
    let Ok(entries) = proc::parse_cgroup(data) else {
        return;
    };
    for (i, e) in entries.iter().enumerate() {
        assert!(e.path.starts_with('/'));
        assert!(!e.path.contains('\n') && !e.controllers.contains(['\n', ':']));
        assert!(entries[..i].iter().all(|o| o.hierarchy != e.hierarchy));
        paths(&e.path);
    }
    paths(proc::io_cgroup_path(&entries));
    // Rendered back as the kernel prints it, the entries parse the same.
    let rendered: String = entries
        .iter()
        .map(|e| format!("{}:{}:{}\n", e.hierarchy, e.controllers, e.path))
        .collect();
    assert_eq!(proc::parse_cgroup(rendered.as_bytes()), Ok(entries));
});
