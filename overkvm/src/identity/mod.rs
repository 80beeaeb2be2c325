//! Which VM, if any, a process belongs to.
//!
//! The kernel side reports PIDs; operators want VM names. This layer maps one to the other
//! from `/proc/PID/{stat,cmdline,cgroup,exe}` and the files libvirt and Proxmox keep. It
//! caches the answer per process and never lets a reused PID inherit a dead process's identity.
//!
//! Names and other strings come from command lines and are untrusted data. They may hold
//! newlines or terminal escape sequences, so front-ends must escape them when printing.

pub mod cgroup;
pub mod early;
pub mod kubevirt;
pub mod managers;
pub mod qemu;

pub use qemu::is_qemu;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

// `decimal_u32` is imported here for the child modules too (`super::decimal_u32`).
use crate::host::{
    decimal_u32,
    proc::{self, ProcError, ProcessDir},
    read_capped,
};

/// Who runs a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Manager {
    /// Plain qemu: no manager found.
    Qemu,
    Libvirt,
    /// OpenStack Nova (through libvirt).
    Nova,
    Proxmox,
    /// KubeVirt (a libvirt inside a `virt-launcher` pod).
    Kubevirt,
}

impl Manager {
    /// How every output names it (JSON, labels, tables, logs): the one spelling, which the
    /// serde names above must match.
    pub fn name(self) -> &'static str {
        match self {
            Manager::Qemu => "qemu",
            Manager::Libvirt => "libvirt",
            Manager::Nova => "nova",
            Manager::Proxmox => "proxmox",
            Manager::Kubevirt => "kubevirt",
        }
    }
}

/// What a VM is called and by whom.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VmIdentity {
    /// qemu's `-name` (libvirt domain name, Nova `instance-XXXXXXXX`, Proxmox VM name);
    /// failing that the UUID or `qemu-<pid>` (`vm<VMID>` for Proxmox).
    pub name: String,
    /// Lower-case UUID from `-uuid`, `-smbios type=1,uuid=` or the libvirt status XML.
    pub uuid: Option<String>,
    pub manager: Manager,
    /// Proxmox VMID, libvirt domain id when known
    pub vmid: Option<u32>,
    /// The name the manager's users know the VM by, when it differs from `name`: Nova's
    /// display name (from libvirt XML nova:name), KubeVirt's VMI name.
    pub display_name: Option<String>,
    /// KubeVirt: the VMI's Kubernetes namespace (`name` is `<namespace>/<vmi>`).
    pub namespace: Option<String>,
}

/// A live process as seen at first resolution.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProcessIdentity {
    pub pid: u32,
    /// field 22 of /proc/PID/stat, clock ticks since boot: with pid it identifies a process
    /// across PID reuse
    pub start_time: u64,
    pub comm: String,
    /// The process's cgroup for the block controller: the v1 blkio line's path where blkio is
    /// bound to v1 (hybrid and v1 hosts), else the v2 `0::` path, else "" (also when the file
    /// is malformed, see [`proc::parse_cgroup`]).
    pub cgroup: String,
    pub vm: Option<VmIdentity>,
    /// A kernel thread (PF_KTHREAD): it submits I/O on behalf of others (writeback,
    /// blk-throttle dispatch, loop workers), never a VM.
    pub kernel_thread: bool,
    /// False when /proc gave only half a process: a live user process with an empty command
    /// line, which is what a process inside an exec shows (its comm and exe are already the
    /// new program's, its argv not yet in place) and can do I/O in (page faults on the new
    /// binary on a cold cache). Such an identity names no VM, since a qemu's `-name` is not
    /// readable yet, and is never cached: the next lookup reads the process again.
    #[serde(skip)]
    pub complete: bool,
}

/// Default bound on cached processes. PIDs go up to 4M, so the cache needs a bound of its own
/// in case `retain` is not called.
pub const MAX_CACHED: usize = 65536;

// Caps on bytes read per manager file (the /proc files' caps live in `host::proc`); each is
// well above what a genuine file holds.
const PIDFILE_MAX: usize = 64;
/// libvirt status XML puts a preamble (capabilities, per-device state) before `<domain>`;
/// together they stay far below 1 MiB, and the fields we want open `<domain>`.
const STATUS_XML_MAX: usize = 1 << 20;
/// `name:` sits in the main section at the top; snapshot sections after it can be long.
const PVE_CONFIG_MAX: usize = 64 << 10;

/// Maps PIDs to process and VM identities, with a cache re-validated on every lookup.
///
/// Each `resolve` reads `/proc/PID/stat` (one small read) to check the cached entry. A miss
/// also reads `cgroup`, `cmdline` and the `exe` link, plus manager files for qemu processes.
/// A TID works too: it resolves to the thread's own stat and comm with the process's cmdline.
pub struct Resolver {
    proc_dir: PathBuf,
    host: HostDirs,
    cache: HashMap<u32, Arc<ProcessIdentity>>,
    capacity: usize,
    /// Test hook run before every read after the first, to simulate processes that exit or
    /// are replaced mid-resolution.
    #[cfg(test)]
    before_read: Option<ReadHook>,
}

#[cfg(test)]
type ReadHook = Box<dyn FnMut(&Path) + Send>;

impl Default for Resolver {
    fn default() -> Self {
        Resolver::new()
    }
}

impl Resolver {
    /// Reads the host's `/proc`, `/run/libvirt/qemu` and `/etc/pve`.
    pub fn new() -> Resolver {
        Resolver::with_root("/")
    }

    /// Reads `root/proc/...`, `root/run/libvirt/qemu/...` and `root/etc/pve/...`, so tests can
    /// use a fake tree.
    pub fn with_root(root: impl Into<PathBuf>) -> Resolver {
        let root = root.into();
        Resolver {
            proc_dir: root.join("proc"),
            host: HostDirs {
                libvirt_run: root.join("run/libvirt/qemu"),
                pve_qemu: root.join("etc/pve/qemu-server"),
            },
            cache: HashMap::new(),
            capacity: MAX_CACHED,
            #[cfg(test)]
            before_read: None,
        }
    }

    /// Sets the bound on cached processes (at least 1); when full, an arbitrary entry is
    /// evicted, which costs only a re-read if that process shows up again.
    pub fn with_cache_capacity(mut self, capacity: usize) -> Resolver {
        self.capacity = capacity.max(1);
        self
    }

    /// Number of processes currently cached.
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// Identity of a live process; None if it does not exist (or vanished mid-read: any read
    /// error after the first counts as vanished, never an error or panic).
    /// Cached by pid and re-validated by start_time, so a reused PID is never given the old
    /// process's identity.
    ///
    /// comm is checked too: a process resolved between fork and exec (libvirtd's child before
    /// it becomes qemu) keeps its start time across exec, but not its comm.
    pub fn resolve(&mut self, pid: u32) -> Option<Arc<ProcessIdentity>> {
        let dir = ProcessDir::under(&self.proc_dir, pid);
        let Ok(stat) = dir.stat() else {
            self.cache.remove(&pid);
            return None;
        };
        if let Some(hit) = self.cache.get(&pid)
            && hit.start_time == stat.start_time
            && hit.comm == stat.comm
        {
            return Some(Arc::clone(hit));
        }
        match self.build(&dir, stat) {
            Some(ident) => {
                let ident = Arc::new(ident);
                if ident.complete {
                    self.insert(pid, Arc::clone(&ident));
                } else {
                    self.cache.remove(&pid);
                }
                Some(ident)
            }
            None => {
                self.cache.remove(&pid);
                None
            }
        }
    }

    /// Forgets what is cached about `pid`, so the next lookup reads it again: the process
    /// exec'd (its start time and often its comm survive an exec, its command line does not).
    pub fn forget(&mut self, pid: u32) {
        self.cache.remove(&pid);
    }

    /// Drop cache entries for pids not in `alive` (called once per sampling tick).
    pub fn retain(&mut self, alive: impl Fn(u32) -> bool) {
        self.cache.retain(|&pid, _| alive(pid));
    }

    fn insert(&mut self, pid: u32, ident: Arc<ProcessIdentity>) {
        if self.cache.len() >= self.capacity
            && !self.cache.contains_key(&pid)
            && let Some(&victim) = self.cache.keys().next()
        {
            self.cache.remove(&victim);
        }
        self.cache.insert(pid, ident);
    }

    /// Everything after the first stat read. Any failed read means the process is gone.
    fn build(&mut self, dir: &ProcessDir, stat: proc::Stat) -> Option<ProcessIdentity> {
        let pid = dir.pid();
        self.checkpoint(&dir.file("cgroup"));
        let (cgroup, manager_cgroup) = match dir.cgroups() {
            Ok(entries) => (
                proc::io_cgroup_path(&entries).to_owned(),
                cgroup::manager_cgroup_path(&entries).to_owned(),
            ),
            Err(ProcError::Unreadable { .. }) => return None,
            Err(e) => {
                log::debug!("pid {pid}: ignoring its cgroup file: {e}");
                (String::new(), String::new())
            }
        };

        let mut complete = true;
        let vm = if stat.is_kernel_thread() {
            None
        } else {
            self.checkpoint(&dir.file("cmdline"));
            let argv = dir.cmdline().ok()?;
            // Optional: unreadable for zombies and other users' processes.
            let exe = dir.exe();
            let exe = exe.as_deref().map(Path::to_string_lossy);
            let argv0 = argv.first().map_or("", String::as_str);
            // A zombie's command line is empty for good (its memory is gone): comm is all
            // that is left. Anyone else's is empty only for a moment (inside an exec, where
            // comm and exe are already the new program's). That moment matters only for a
            // qemu, whose name is in its arguments; any other process is named by comm, final
            // already, and is not held back.
            complete =
                !argv.is_empty() || stat.is_zombie() || !is_qemu("", exe.as_deref(), &stat.comm);
            if complete && is_qemu(argv0, exe.as_deref(), &stat.comm) {
                let args = qemu::QemuArgs::parse(&argv);
                Some(managers::identify(pid, &args, &manager_cgroup, &self.host))
            } else {
                None
            }
        };

        // The PID may have been reused while we read; then the files above can mix two
        // processes, so discard them.
        self.checkpoint(&dir.file("stat"));
        let again = dir.stat().ok()?;
        if again.start_time != stat.start_time {
            return None;
        }
        Some(ProcessIdentity {
            pid,
            start_time: stat.start_time,
            kernel_thread: stat.is_kernel_thread(),
            comm: stat.comm,
            cgroup,
            vm,
            complete,
        })
    }

    #[cfg_attr(not(test), allow(unused_variables))]
    fn checkpoint(&mut self, path: &Path) {
        #[cfg(test)]
        if let Some(hook) = self.before_read.as_mut() {
            hook(path);
        }
    }
}

/// Manager state directories under the resolver's root.
struct HostDirs {
    libvirt_run: PathBuf,
    pve_qemu: PathBuf,
}

impl managers::HostFiles for HostDirs {
    fn libvirt_pidfile(&self, name: &str) -> Option<String> {
        read_text(&self.libvirt_run.join(format!("{name}.pid")), PIDFILE_MAX)
    }

    fn libvirt_status(&self, name: &str) -> Option<String> {
        read_text(
            &self.libvirt_run.join(format!("{name}.xml")),
            STATUS_XML_MAX,
        )
    }

    fn pve_config(&self, vmid: u32) -> Option<String> {
        read_text(&self.pve_qemu.join(format!("{vmid}.conf")), PVE_CONFIG_MAX)
    }
}

fn read_text(path: &Path, cap: usize) -> Option<String> {
    let (raw, _) = read_capped(path, cap).ok()?;
    Some(String::from_utf8_lossy(&raw).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn a_managers_name_is_the_one_its_json_has() {
        for m in [
            Manager::Qemu,
            Manager::Libvirt,
            Manager::Nova,
            Manager::Proxmox,
            Manager::Kubevirt,
        ] {
            assert_eq!(serde_json::to_value(m).unwrap(), m.name());
        }
    }

    /// A throw-away directory tree standing in for `/`.
    struct FakeRoot {
        dir: tempfile::TempDir,
    }

    impl FakeRoot {
        fn new() -> FakeRoot {
            FakeRoot {
                dir: tempfile::tempdir().unwrap(),
            }
        }

        fn resolver(&self) -> Resolver {
            Resolver::with_root(self.dir.path())
        }

        fn write(&self, rel: &str, data: impl AsRef<[u8]>) {
            let path = self.dir.path().join(rel);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, data).unwrap();
        }

        fn stat(&self, pid: u32, comm: &str, start: u64, flags: u32) {
            self.stat_in(pid, comm, start, flags, 'S');
        }

        fn stat_in(&self, pid: u32, comm: &str, start: u64, flags: u32, state: char) {
            self.write(
                &format!("proc/{pid}/stat"),
                format!(
                    "{pid} ({comm}) {state} 1 {pid} {pid} 0 -1 {flags} 0 0 0 0 0 0 0 0 20 0 1 0 \
                     {start} 123456 789 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 \
                     0 0\n"
                ),
            );
        }

        /// The process exited and was not reaped: state `Z`, its command line gone.
        fn zombie(&self, pid: u32, comm: &str, start: u64) {
            self.stat_in(pid, comm, start, 0x0040_0040, 'Z');
            self.write(&format!("proc/{pid}/cmdline"), "");
        }

        /// A whole process: stat, cmdline (args joined with NULs), cgroup and an exe link.
        fn process(
            &self,
            pid: u32,
            comm: &str,
            start: u64,
            argv: &[&str],
            cgroup: &str,
            exe: Option<&str>,
        ) {
            self.stat(pid, comm, start, 0x0040_0040);
            let mut cmdline = argv.join("\0");
            if !argv.is_empty() {
                cmdline.push('\0');
            }
            self.write(&format!("proc/{pid}/cmdline"), cmdline);
            self.write(&format!("proc/{pid}/cgroup"), cgroup);
            self.write(&format!("proc/{pid}/comm"), format!("{comm}\n"));
            let link = self.dir.path().join(format!("proc/{pid}/exe"));
            let _ = fs::remove_file(&link);
            if let Some(exe) = exe {
                std::os::unix::fs::symlink(exe, link).unwrap();
            }
        }

        fn remove(&self, rel: &str) {
            let path = self.dir.path().join(rel);
            let _ = fs::remove_dir_all(&path);
            let _ = fs::remove_file(&path);
        }
    }

    const LIBVIRT_CG: &str =
        "0::/machine.slice/machine-qemu\\x2d39\\x2dv1465.scope/libvirt/emulator\n";
    const LIBVIRT_ARGV: &[&str] = &[
        "/usr/bin/kvm",
        "-name",
        "guest=v1465,debug-threads=on",
        "-S",
        "-uuid",
        "0fa82997-3c4d-4e5f-8a9b-0c1d2e3f4a5b",
        "-chardev",
        "socket,id=charmonitor,path=/var/lib/libvirt/qemu/domain-39-v1465/monitor.sock,server=on,wait=off",
        "-mon",
        "chardev=charmonitor,id=monitor,mode=control",
    ];

    #[test]
    fn libvirt_vm_is_resolved_and_cached() {
        let root = FakeRoot::new();
        root.process(
            8611,
            "qemu-system-x86",
            1000,
            LIBVIRT_ARGV,
            LIBVIRT_CG,
            Some("/usr/bin/qemu-system-x86_64"),
        );
        let mut r = root.resolver();
        let p = r.resolve(8611).unwrap();
        assert_eq!(p.pid, 8611);
        assert_eq!(p.start_time, 1000);
        assert_eq!(p.comm, "qemu-system-x86");
        assert_eq!(p.cgroup, LIBVIRT_CG[3..].trim_end());
        assert_eq!(
            p.vm,
            Some(VmIdentity {
                name: "v1465".into(),
                uuid: Some("0fa82997-3c4d-4e5f-8a9b-0c1d2e3f4a5b".into()),
                manager: Manager::Libvirt,
                vmid: Some(39),
                display_name: None,
                namespace: None,
            })
        );
        let json = serde_json::to_value(&*p).unwrap();
        assert_eq!(json["vm"]["manager"], "libvirt");
        assert_eq!(json["start_time"], 1000);

        // Same process: served from the cache even though its files changed.
        root.write("proc/8611/cmdline", "/usr/bin/kvm\0-name\0other\0");
        let again = r.resolve(8611).unwrap();
        assert!(Arc::ptr_eq(&p, &again));
        assert_eq!(r.cached(), 1);
    }

    #[test]
    fn reused_pid_gets_the_new_identity() {
        let root = FakeRoot::new();
        let mut r = root.resolver();
        root.process(500, "qemu-system-x86", 1000, LIBVIRT_ARGV, LIBVIRT_CG, None);
        assert!(r.resolve(500).unwrap().vm.is_some());

        // The VM exits and a shell gets the same PID.
        root.process(
            500,
            "bash",
            2000,
            &["/bin/bash"],
            "0::/user.slice/x\n",
            Some("/usr/bin/bash"),
        );
        let p = r.resolve(500).unwrap();
        assert_eq!(
            (p.start_time, p.comm.as_str(), &p.vm),
            (2000, "bash", &None)
        );

        // Same comm as the old process, different start time: still re-read.
        root.process(
            500,
            "qemu-system-x86",
            3000,
            &["/usr/bin/qemu-system-x86_64", "-name", "new"],
            "0::/\n",
            None,
        );
        let p = r.resolve(500).unwrap();
        assert_eq!(p.start_time, 3000);
        assert_eq!(
            p.vm.as_ref().map(|v| (v.name.as_str(), v.manager)),
            Some(("new", Manager::Qemu))
        );
    }

    #[test]
    fn exec_after_fork_is_noticed_by_comm() {
        let root = FakeRoot::new();
        let mut r = root.resolver();
        // libvirtd's child between fork and exec: same start time before and after exec.
        root.process(
            600,
            "rpc-libvirtd",
            1000,
            &["/usr/sbin/libvirtd", "--timeout", "120"],
            LIBVIRT_CG,
            None,
        );
        assert_eq!(r.resolve(600).unwrap().vm, None);
        root.process(600, "qemu-system-x86", 1000, LIBVIRT_ARGV, LIBVIRT_CG, None);
        assert_eq!(r.resolve(600).unwrap().vm.as_ref().unwrap().name, "v1465");
    }

    /// What /proc shows of a qemu inside its exec on a cold page cache, where it does I/O
    /// (page faults on its binary): comm and exe already qemu's, the command line still empty.
    #[test]
    fn inside_exec_a_process_is_half_read_and_read_again() {
        let root = FakeRoot::new();
        let mut r = root.resolver();
        let qemu = Some("/usr/bin/qemu-system-x86_64");
        root.process(800, "qemu-system-x86", 50, &[], "0::/vms\n", qemu);
        let half = r.resolve(800).unwrap();
        assert!(!half.complete);
        assert_eq!(half.vm, None, "no VM named from an empty command line");
        assert_eq!(r.cached(), 0, "half a process is never cached");

        // The exec completes: same PID, start time and comm, the argv in place.
        root.process(
            800,
            "qemu-system-x86",
            50,
            &["/usr/bin/qemu-system-x86_64", "-name", "guest=web01"],
            "0::/vms\n",
            qemu,
        );
        let whole = r.resolve(800).unwrap();
        assert!(whole.complete);
        assert_eq!(whole.vm.as_ref().unwrap().name, "web01");
        assert!(Arc::ptr_eq(&whole, &r.resolve(800).unwrap()), "now cached");

        // Not a qemu (by comm or exe): its name is its comm, final already, so an empty
        // command line holds nothing back.
        root.process(
            801,
            "postgres",
            51,
            &[],
            "0::/db\n",
            Some("/usr/bin/postgres"),
        );
        let other = r.resolve(801).unwrap();
        assert!(other.complete);
        assert_eq!((other.comm.as_str(), other.vm.as_ref()), ("postgres", None));
    }

    /// A qemu-named process without `-name` that execs itself with one keeps its PID, start
    /// time and comm: only the exec notice (`forget`) makes the resolver read it again.
    #[test]
    fn an_exec_with_the_same_comm_is_read_again_once_forgotten() {
        let root = FakeRoot::new();
        let mut r = root.resolver();
        let argv0 = "/usr/bin/qemu-system-x86_64";
        root.process(810, "qemu-system-x86", 60, &[argv0], "0::/\n", None);
        assert_eq!(
            r.resolve(810).unwrap().vm.as_ref().unwrap().name,
            "qemu-810"
        );
        root.process(
            810,
            "qemu-system-x86",
            60,
            &[argv0, "-name", "guest=later"],
            "0::/\n",
            None,
        );
        assert_eq!(
            r.resolve(810).unwrap().vm.as_ref().unwrap().name,
            "qemu-810",
            "nothing /proc/PID/stat shows changed: the cache holds"
        );
        r.forget(810);
        assert_eq!(r.resolve(810).unwrap().vm.as_ref().unwrap().name, "later");
    }

    #[test]
    fn missing_and_vanishing_processes() {
        let root = FakeRoot::new();
        let mut r = root.resolver();
        assert!(r.resolve(1).is_none());
        assert!(r.resolve(0).is_none());
        assert!(r.resolve(u32::MAX).is_none());

        // A cached process whose directory is gone is dropped.
        root.process(
            7,
            "kvm",
            10,
            &["/usr/bin/kvm", "-id", "100"],
            "0::/qemu.slice/100.scope\n",
            None,
        );
        assert!(r.resolve(7).is_some());
        root.remove("proc/7");
        assert!(r.resolve(7).is_none());
        assert_eq!(r.cached(), 0);

        // Exited after stat was read: cgroup and cmdline are missing.
        root.stat(8, "kvm", 10, 0);
        assert!(r.resolve(8).is_none());
        root.write("proc/8/cgroup", "0::/\n");
        assert!(r.resolve(8).is_none(), "cmdline missing");

        // Stat present but garbage, or for another pid.
        root.write("proc/9/stat", "9 (trunc");
        assert!(r.resolve(9).is_none());
        root.stat(10, "x", 1, 0);
        fs::rename(
            root.dir.path().join("proc/10"),
            root.dir.path().join("proc/11"),
        )
        .unwrap();
        assert!(r.resolve(11).is_none());
    }

    #[test]
    fn files_vanishing_between_reads() {
        let root = FakeRoot::new();
        let argv = &["/usr/bin/kvm", "-name", "guest=v"];
        // The whole process directory disappears at each read after the first.
        for victim in ["cgroup", "cmdline", "stat"] {
            root.process(20, "kvm", 5, argv, "0::/\n", None);
            let mut r = root.resolver();
            let dir = root.dir.path().join("proc/20");
            r.before_read = Some(Box::new(move |path: &Path| {
                if path.ends_with(victim) {
                    let _ = fs::remove_dir_all(&dir);
                }
            }));
            assert!(r.resolve(20).is_none(), "{victim}");
            assert_eq!(r.cached(), 0);
        }

        // PID reused while we read: the final stat shows another start time.
        root.process(21, "kvm", 5, argv, "0::/\n", None);
        let mut r = root.resolver();
        let stat = root.dir.path().join("proc/21/stat");
        r.before_read = Some(Box::new(move |path: &Path| {
            if path.ends_with("cmdline") {
                let line = "21 (bash) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 6 0 0\n";
                fs::write(&stat, line).unwrap();
            }
        }));
        assert!(r.resolve(21).is_none());
        // Next time round everything is consistent again.
        r.before_read = None;
        assert_eq!(r.resolve(21).unwrap().comm, "bash");
    }

    #[test]
    fn kernel_threads_are_never_vms() {
        let root = FakeRoot::new();
        let mut r = root.resolver();
        for (pid, comm) in [
            (30, "kvm"),
            (31, "kvm-pit/1234"),
            (32, "kvm-nx-lpage-re"),
            (33, "qemu-system-x86"),
        ] {
            root.stat(pid, comm, 1, proc::PF_KTHREAD | 0x40);
            root.write(&format!("proc/{pid}/cgroup"), "0::/\n");
            let p = r.resolve(pid).unwrap();
            assert_eq!((p.comm.as_str(), &p.vm), (comm, &None));
        }
        // No PF_KTHREAD but still a kernel-thread-like name and no argv (not qemu).
        root.process(34, "kvm-pit/1234", 1, &[], "0::/\n", None);
        assert_eq!(r.resolve(34).unwrap().vm, None);
        // A zombie qemu: empty cmdline, no exe, comm is the only hint.
        root.process(35, "kvm", 1, &[], "0::/qemu.slice/135.scope\n", None);
        root.zombie(35, "kvm", 1);
        let vm = r.resolve(35).unwrap().vm.clone().unwrap();
        assert_eq!((vm.manager, vm.vmid), (Manager::Proxmox, Some(135)));
    }

    #[test]
    fn proxmox_vms() {
        let root = FakeRoot::new();
        let mut r = root.resolver();
        root.process(
            4100,
            "kvm",
            77,
            &[
                "/usr/bin/kvm",
                "-id",
                "100",
                "-name",
                "web01,debug-threads=on",
                "-no-shutdown",
                "-chardev",
                "socket,id=qmp,path=/var/run/qemu-server/100.qmp,server=on,wait=off",
                "-mon",
                "chardev=qmp,mode=control",
                "-pidfile",
                "/var/run/qemu-server/100.pid",
                "-daemonize",
            ],
            "0::/qemu.slice/100.scope\n",
            Some("/usr/bin/qemu-system-x86_64"),
        );
        let vm = r.resolve(4100).unwrap().vm.clone().unwrap();
        assert_eq!(
            (vm.name.as_str(), vm.manager, vm.vmid),
            ("web01", Manager::Proxmox, Some(100))
        );

        root.write(
            "etc/pve/qemu-server/101.conf",
            "cores: 2\nname: db01\n[snap]\nname: olddb\n",
        );
        root.process(
            4101,
            "kvm",
            78,
            &["/usr/bin/kvm"],
            "0::/qemu.slice/101.scope\n",
            None,
        );
        let vm = r.resolve(4101).unwrap().vm.clone().unwrap();
        assert_eq!((vm.name.as_str(), vm.vmid), ("db01", Some(101)));
    }

    #[test]
    fn nova_vm_with_status_xml() {
        let root = FakeRoot::new();
        let mut r = root.resolver();
        let uuid = "6a2cfe1e-9d3b-4c4e-9a41-2b9a3f1b7c10";
        root.process(
            9000,
            "qemu-kvm",
            5,
            &["/usr/libexec/qemu-kvm", "-name", "guest=instance-0000abcd,debug-threads=on"],
            "0::/machine.slice/machine-qemu\\x2d2\\x2dinstance\\x2d0000abcd.scope/libvirt/emulator\n",
            Some("/usr/libexec/qemu-kvm"),
        );
        // Padding stands for the capabilities list libvirt writes before <domain>.
        let padding = "<flag name='x'/>\n".repeat(20_000);
        root.write(
            "run/libvirt/qemu/instance-0000abcd.xml",
            format!(
                "<domstatus state='running' pid='9000'>\n<qemuCaps>{padding}</qemuCaps>\n\
                 <domain type='kvm' id='2'>\n<name>instance-0000abcd</name>\n<uuid>{uuid}</uuid>\n\
                 <metadata><nova:instance xmlns:nova='http://openstack.org/xmlns/libvirt/nova/1.1'>\
                 <nova:name>web \"prod\"\n&lt;1&gt;</nova:name></nova:instance></metadata></domain></domstatus>"
            ),
        );
        let vm = r.resolve(9000).unwrap().vm.clone().unwrap();
        assert_eq!(
            vm,
            VmIdentity {
                name: "instance-0000abcd".into(),
                uuid: Some(uuid.into()),
                manager: Manager::Nova,
                vmid: Some(2),
                display_name: Some("web \"prod\"\n<1>".into()),
                namespace: None,
            }
        );
    }

    #[test]
    fn libvirt_by_pidfile_and_deleted_exe() {
        let root = FakeRoot::new();
        let mut r = root.resolver();
        root.write("run/libvirt/qemu/v2.pid", "700\n");
        // argv[0] is not a qemu name, but the (upgraded, hence deleted) binary is.
        root.process(
            700,
            "qemu-v2",
            5,
            &["/proc/self/fd/3", "-name", "guest=v2,process=qemu-v2"],
            "0::/system.slice/libvirtd.service\n",
            Some("/usr/bin/qemu-system-x86_64 (deleted)"),
        );
        let vm = r.resolve(700).unwrap().vm.clone().unwrap();
        assert_eq!(
            (vm.name.as_str(), vm.manager, vm.vmid),
            ("v2", Manager::Libvirt, None)
        );
    }

    #[test]
    fn hostile_files() {
        let root = FakeRoot::new();
        let mut r = root.resolver();
        // comm with parentheses; cmdline with newlines, escapes and invalid UTF-8; a cgroup file
        // with a forged line.
        root.process(40, "a) b (c", 9, &[], "", None);
        root.write(
            "proc/40/cmdline",
            b"/usr/bin/qemu-system-x86_64\0-name\0guest=\x1b[2J\"evil\"\nname\xff\0-uuid\0\xff\xfe"
                .as_slice(),
        );
        root.write(
            "proc/40/cgroup",
            "0::/user.slice/user-1000.slice/user@1000.service/x\n0::/machine.slice/machine-qemu\\x2d1\\x2dv.scope\n",
        );
        let p = r.resolve(40).unwrap();
        assert_eq!(p.comm, "a) b (c");
        assert_eq!(p.cgroup, "", "ambiguous cgroup file is not trusted");
        let vm = p.vm.clone().unwrap();
        assert_eq!(
            (vm.name.as_str(), vm.manager, &vm.uuid),
            ("\x1b[2J\"evil\"\nname\u{fffd}", Manager::Qemu, &None)
        );

        // An oversized cmdline: read up to the cap, the cut argument dropped, no panic.
        let mut big = b"/usr/bin/kvm\0-name\0guest=first\0-append\0".to_vec();
        big.extend(std::iter::repeat_n(b'x', 3 << 20));
        big.extend(b"\0-name\0guest=late\0");
        root.process(41, "kvm", 9, &[], "0::/\n", None);
        root.write("proc/41/cmdline", &big);
        assert_eq!(r.resolve(41).unwrap().vm.as_ref().unwrap().name, "first");

        // Empty and truncated cgroup and cmdline files (of a zombie: a live process with an
        // empty command line is only half read, see `inside_exec_*`).
        root.process(42, "kvm", 9, &[], "", None);
        root.zombie(42, "kvm", 9);
        root.write("proc/42/cgroup", "0:");
        let p = r.resolve(42).unwrap();
        assert_eq!(
            (p.cgroup.as_str(), p.vm.as_ref().unwrap().name.as_str()),
            ("", "qemu-42")
        );
    }

    #[test]
    fn cache_is_bounded_and_retained() {
        let root = FakeRoot::new();
        let mut r = root.resolver().with_cache_capacity(3);
        for pid in 100..110 {
            root.process(
                pid,
                "sleep",
                u64::from(pid),
                &["sleep", "1"],
                "0::/\n",
                None,
            );
            assert_eq!(r.resolve(pid).unwrap().start_time, u64::from(pid));
            assert!(r.cached() <= 3);
        }
        // Evicted entries are simply re-read.
        for pid in 100..110 {
            assert_eq!(r.resolve(pid).unwrap().pid, pid);
        }
        r.retain(|pid| pid == 109);
        assert_eq!(r.cached(), 1);
        r.retain(|_| false);
        assert_eq!(r.cached(), 0);
    }

    #[test]
    fn resolves_this_test_process_from_real_proc() {
        let mut r = Resolver::new();
        let me = std::process::id();
        let p = r.resolve(me).expect("own process is alive");
        assert_eq!(p.pid, me);
        assert!(p.start_time > 0);
        assert!(!p.comm.is_empty());
        assert_eq!(p.vm, None);
        assert!(Arc::ptr_eq(&p, &r.resolve(me).unwrap()));
    }
}
