//! A real libvirt (the distribution's `libvirtd` with its qemu driver, `virtlogd`, `virsh`)
//! runs two TCG domains with raw disks (`cache='none' io='native'`) on ext4 on a loop device.
//! overkvm must name them as libvirt does (name, UUID, `manager="libvirt"`), count their
//! writes exactly as `virsh domblkstat` and their blkio cgroups do, hold them to a budget
//! with limits in each domain's own cgroup (`/machine/qemu-N-NAME.libvirt-qemu` without
//! systemd), survive a domain destroyed while limited, remove every limit on SIGTERM, and list
//! them in `vm list`.
//!
//! When no service manager runs libvirt, the test starts `libvirtd` and `virtlogd` itself in a
//! private mount namespace where `/etc/libvirt`, `/var/lib/libvirt`, `/var/cache/libvirt` and
//! `/var/log/libvirt` are directories of the test's own: its `qemu.conf` (qemu as root, no
//! security driver) and the domain definitions never touch the host's configuration. Sockets
//! and pidfiles stay in the host's `/run/libvirt`, where `virsh` and overkvm find them. Both
//! daemons are stopped by PID at the end, and the directories the test had to create on the
//! host (empty mount points, `/run/libvirt`) are removed.

use std::{
    fs,
    os::unix::fs::FileExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use overkvm_tests::{
    devices::MountedFs,
    guest::{self, GuestSpec},
    netstore::NbdServer,
    serving::{TempDir, metric, metrics_addr, scrape, vm_ops},
    skip_unless_kernel,
    throttling::{v1_limits, wait_until, write_config},
    workspace_bin,
};
use serde_json::Value;

const URI: &str = "qemu:///system";
/// Direct 4 KiB writes each guest makes first (counted exactly).
const GUEST_WRITES: u64 = 3000;
/// Size of each raw disk, in 4 KiB blocks.
const DISK_BLOCKS: u64 = 8192;
/// Block of the disk the guest polls for the host's go-ahead to start reading.
const FLAG_BLOCK: u64 = 8000;
const GO: &[u8] = b"OVERKVM-GO";
const BUDGET: f64 = 300.0;

fn virsh(args: &[&str]) -> Output {
    Command::new("virsh")
        .args(["-c", URI, "-q"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running virsh")
}

fn virsh_ok(args: &[&str]) -> String {
    let out = virsh(args);
    assert!(
        out.status.success(),
        "virsh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn libvirt_answers() -> bool {
    virsh(&["version"]).status.success()
}

/// The libvirt daemons: started here (and stopped on drop) unless a service manager already
/// runs them.
struct Libvirt {
    libvirtd: Option<Child>,
    virtlogd_pid_file: PathBuf,
    /// Host directories that did not exist before (mount points, /run/libvirt): removed last.
    created: Vec<PathBuf>,
    /// libvirt's `/machine` partition in each cgroup hierarchy that had none: removed (when
    /// empty) after libvirtd stops, which leaves it behind.
    partitions: Vec<PathBuf>,
    dir: TempDir,
}

impl Libvirt {
    fn start() -> Libvirt {
        let dir = TempDir::new("libvirt");
        let virtlogd_pid_file = dir.join("virtlogd.pid");
        if libvirt_answers() {
            eprintln!("libvirt already runs here (a service manager's): using it as it is");
            return Libvirt {
                libvirtd: None,
                virtlogd_pid_file,
                created: Vec::new(),
                partitions: Vec::new(),
                dir,
            };
        }
        let partitions: Vec<PathBuf> = fs::read_dir("/sys/fs/cgroup")
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.path().join("machine"))
                    .filter(|m| m.parent().is_some_and(|p| p.join("cgroup.procs").exists()))
                    .filter(|m| !m.exists())
                    .collect()
            })
            .unwrap_or_default();
        let mut created = Vec::new();
        for d in [
            "/var/lib/libvirt",
            "/var/cache/libvirt",
            "/var/log/libvirt",
            "/run/libvirt",
        ] {
            if !Path::new(d).exists() {
                fs::create_dir_all(d).expect("creating a libvirt directory");
                created.push(PathBuf::from(d));
            }
        }
        let mut binds = String::new();
        for (own, host) in [
            ("etc", "/etc/libvirt"),
            ("lib", "/var/lib/libvirt"),
            ("cache", "/var/cache/libvirt"),
            ("log", "/var/log/libvirt"),
        ] {
            fs::create_dir_all(dir.join(own)).unwrap();
            binds.push_str(&format!(
                "mount --bind {} {host} || exit 1\n",
                dir.join(own).display()
            ));
        }
        // qemu as root: the disks live in the test's directories; no AppArmor/SELinux labels.
        fs::write(
            dir.join("etc/qemu.conf"),
            "user = \"root\"\ngroup = \"root\"\nsecurity_driver = \"none\"\n",
        )
        .unwrap();
        let script = format!(
            "{binds}virtlogd &\necho $! > {}\nexec libvirtd\n",
            virtlogd_pid_file.display()
        );
        let log = fs::File::create(dir.join("libvirtd.log")).unwrap();
        // unshare execs sh, which execs libvirtd: the child's PID is libvirtd's.
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting libvirtd");
        let mut me = Libvirt {
            libvirtd: Some(child),
            virtlogd_pid_file,
            created,
            partitions,
            dir,
        };
        let up = wait_until(Duration::from_secs(30), libvirt_answers);
        assert!(
            up,
            "libvirtd did not answer within 30 s:\n{}",
            fs::read_to_string(me.dir.join("libvirtd.log")).unwrap_or_default()
        );
        if let Some(c) = me.libvirtd.as_mut() {
            eprintln!("started libvirtd (pid {}) and virtlogd", c.id());
        }
        me
    }
}

fn wait_pid_gone(pid: i32, timeout: Duration) {
    wait_until(timeout, || {
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(true)
    });
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        let Some(mut d) = self.libvirtd.take() else {
            return;
        };
        // SAFETY: signals to the daemons this test started, by their PIDs.
        unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(15);
        while d.try_wait().ok().flatten().is_none() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(100));
        }
        if d.try_wait().ok().flatten().is_none() {
            let _ = d.kill();
            let _ = d.wait();
        }
        if let Some(pid) = fs::read_to_string(&self.virtlogd_pid_file)
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok())
        {
            unsafe { libc::kill(pid, libc::SIGTERM) };
            wait_pid_gone(pid, Duration::from_secs(10));
        }
        for d in self.created.iter().rev() {
            let _ = fs::remove_dir_all(d);
        }
        for p in &self.partitions {
            // rmdir of a cgroup: refused unless it is empty.
            let _ = fs::remove_dir(p);
        }
    }
}

/// A raw disk of [`DISK_BLOCKS`] written in full first, so no guest I/O lands on unallocated
/// extents.
fn zeroed_raw_disk(disk: &Path) {
    let st = Command::new("dd")
        .args(["if=/dev/zero", "bs=4096", "conv=fsync", "status=none"])
        .arg(format!("of={}", disk.display()))
        .arg(format!("count={DISK_BLOCKS}"))
        .status()
        .unwrap();
    assert!(st.success(), "writing {}", disk.display());
}

/// A defined and started domain: destroyed and undefined on drop.
struct Domain {
    name: String,
    uuid: String,
    disk: PathBuf,
    console: PathBuf,
}

impl Domain {
    fn start(name: &str, fs_dir: &Path, work: &Path) -> Domain {
        Self::start_with(name, fs_dir, work, "none", None)
    }

    /// A domain whose disk has libvirt's `cache` mode, running `script` (default: writes, waits
    /// for the go-ahead, then reads).
    fn start_with(
        name: &str,
        fs_dir: &Path,
        work: &Path,
        cache: &str,
        script: Option<String>,
    ) -> Domain {
        let disk = fs_dir.join(format!("{name}.img"));
        zeroed_raw_disk(&disk);
        let script = script.unwrap_or_else(|| format!(
            "dd if=/dev/urandom of=/dev/vda bs=4096 count={GUEST_WRITES} oflag=direct 2>/dev/null || echo IO-FAILED\n\
             echo WRITES-DONE\n\
             while ! dd if=/dev/vda bs=4096 skip={FLAG_BLOCK} count=1 iflag=direct 2>/dev/null | grep -q {go}; do usleep 300000; done\n\
             echo READING\n\
             while true; do dd if=/dev/vda of=/dev/null bs=4096 count=2000 iflag=direct 2>/dev/null; done\n",
            go = String::from_utf8_lossy(GO)
        ));
        let disks = format!(
            "<disk type='file' device='disk'>\n\
               <driver name='qemu' type='raw' cache='{cache}' io='{io}'/>\n\
               <source file='{disk}'/>\n\
               <target dev='vda' bus='virtio'/>\n\
             </disk>\n",
            disk = disk.display(),
            io = if cache == "none" { "native" } else { "threads" },
        );
        Self::launch(name, work, disk, &disks, script)
    }

    /// Defines and starts domain `name` with the `<disk>` elements `disks`, running `script`;
    /// `flag_disk` is the host file of the disk the guest polls for the go-ahead ([`Self::go`]).
    fn launch(name: &str, work: &Path, flag_disk: PathBuf, disks: &str, script: String) -> Domain {
        let uuid = format!(
            "{:08x}-7e57-4b1d-8a1e-{:012x}",
            std::process::id(),
            name.len() as u64 * 7919 + name.bytes().map(u64::from).sum::<u64>()
        );
        let spec = GuestSpec {
            name: name.into(),
            uuid: uuid.clone(),
            script,
            memory_mb: 160,
            ..GuestSpec::default()
        };
        let initrd = work.join(format!("{name}.initrd"));
        let kernel = guest::write_initramfs(&spec, &initrd).expect("guest initramfs");
        let console = work.join(format!("{name}.console"));
        let xml = format!(
            "<domain type='qemu'>\n\
               <name>{name}</name>\n\
               <uuid>{uuid}</uuid>\n\
               <memory unit='MiB'>160</memory>\n\
               <vcpu>1</vcpu>\n\
               <os>\n\
                 <type arch='x86_64' machine='pc'>hvm</type>\n\
                 <kernel>{kernel}</kernel>\n\
                 <initrd>{initrd}</initrd>\n\
                 <cmdline>{args}</cmdline>\n\
               </os>\n\
               <on_poweroff>destroy</on_poweroff>\n\
               <on_crash>destroy</on_crash>\n\
               <devices>\n\
                 <emulator>/usr/bin/qemu-system-x86_64</emulator>\n\
                 {disks}\
                 <serial type='file'><source path='{console}'/><target port='0'/></serial>\n\
                 <memballoon model='none'/>\n\
               </devices>\n\
             </domain>\n",
            kernel = kernel.vmlinuz.display(),
            initrd = initrd.display(),
            args = guest::kernel_args(),
            console = console.display(),
        );
        let xml_path = work.join(format!("{name}.xml"));
        fs::write(&xml_path, xml).unwrap();
        virsh_ok(&["define", &xml_path.to_string_lossy()]);
        let d = Domain {
            name: name.into(),
            uuid,
            disk: flag_disk,
            console,
        };
        virsh_ok(&["start", name]);
        d
    }

    fn console_text(&self) -> String {
        fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// qemu's PID, from the pidfile libvirt keeps.
    fn pid(&self) -> u32 {
        fs::read_to_string(format!("/run/libvirt/qemu/{}.pid", self.name))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or_else(|| panic!("no pidfile for domain {}", self.name))
    }

    /// The domain's blkio cgroup directory (from its qemu's /proc/PID/cgroup).
    fn blkio_dir(&self, blkio: &Path) -> PathBuf {
        let text = fs::read_to_string(format!("/proc/{}/cgroup", self.pid())).unwrap();
        let path = text
            .lines()
            .find_map(|l| {
                let mut f = l.splitn(3, ':');
                let (_, c, p) = (f.next()?, f.next()?, f.next()?);
                c.split(',').any(|c| c == "blkio").then(|| p.to_string())
            })
            .expect("a blkio line");
        blkio.join(path.trim_start_matches('/'))
    }

    /// `virsh domblkstat NAME vda` field.
    fn blkstat(&self, field: &str) -> u64 {
        virsh_ok(&["domblkstat", &self.name, "vda"])
            .lines()
            .find_map(|l| {
                let mut f = l.split_whitespace();
                (f.next()? == "vda" && f.next()? == field).then(|| f.next()?.parse().ok())?
            })
            .unwrap_or_else(|| panic!("no {field} in domblkstat of {}", self.name))
    }

    fn go(&self) {
        let f = fs::OpenOptions::new().write(true).open(&self.disk).unwrap();
        f.write_all_at(GO, FLAG_BLOCK * 4096).unwrap();
        f.sync_all().unwrap();
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.name]);
        let _ = virsh(&["undefine", &self.name]);
    }
}

/// `blkio.throttle.io_serviced` of a cgroup for a device and an operation (`Write`, `Total`).
fn serviced(dir: &Path, major: u32, minor: u32, op: &str) -> u64 {
    let want = format!("{major}:{minor} {op} ");
    fs::read_to_string(dir.join("blkio.throttle.io_serviced"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(&want).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

/// `overkvm-io serve` at its default log level (what an operator sees without -v).
struct Daemon(Option<Child>, PathBuf);

impl Daemon {
    fn start(log: PathBuf, config: Option<&Path>) -> Daemon {
        let mut c = Command::new(workspace_bin("overkvm-io"));
        c.args(["serve", "--listen", "127.0.0.1:0", "-i", "0.5"]);
        if let Some(cfg) = config {
            c.arg("--config").arg(cfg);
        }
        let child = c
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let d = Daemon(Some(child), log);
        assert!(
            wait_until(Duration::from_secs(30), || metrics_addr(&d.1).is_some()),
            "daemon not serving:\n{}",
            d.log()
        );
        d
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.1).unwrap_or_default()
    }

    fn body(&self) -> String {
        metrics_addr(&self.1).and_then(scrape).unwrap_or_default()
    }

    fn alive(&mut self) -> bool {
        self.0
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.0.take()?;
        // SAFETY: our own child, not yet reaped.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c.wait().ok()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

fn tools_missing() -> Option<String> {
    let missing: Vec<&str> = ["virsh", "libvirtd", "virtlogd", "unshare"]
        .into_iter()
        .filter(|t| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    if !missing.is_empty() {
        return Some(format!(
            "missing {} (cargo xtask test installs libvirt-daemon, libvirt-daemon-driver-qemu \
             and libvirt-clients)",
            missing.join(", ")
        ));
    }
    // Only needed when the test starts libvirtd itself; a running libvirt has its own.
    let account = |db: &str| {
        Command::new("getent")
            .args([db, "libvirt-qemu"])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let has_account = account("passwd") && account("group");
    if !has_account && !libvirt_answers() {
        return Some(
            "no libvirt-qemu user and group, which libvirt's qemu driver needs (cargo xtask \
             test creates them)"
                .into(),
        );
    }
    guest::missing_tools()
}

#[test]
fn libvirt_domains_are_named_counted_exactly_and_throttled_in_their_own_cgroups() {
    skip_unless_kernel!();
    let blkio = overkvm_tests::v1_blkio_or_skip!();
    if let Some(reason) = tools_missing() {
        overkvm_tests::skipped(module_path!(), &reason);
        return;
    }
    // Created before libvirtd so its mount namespace has the filesystem (and dropped after it).
    let fs = MountedFs::new(192, "ext4", &[]).expect("ext4 on a loop device");
    let dev = fs.dev.name();
    let (major, minor) = (fs.dev.dev() >> 20, fs.dev.dev() & 0xfffff);
    let work = TempDir::new("libvirt-work");
    let _kernel = guest::guest_kernel().expect("guest kernel");
    let libvirt = Libvirt::start();

    // Counting: the daemon runs before the domains start, so it sees all their I/O.
    let mut daemon = Daemon::start(work.join("serve-count.log"), None);
    let tag = std::process::id();
    let domains: Vec<Domain> = ["a", "b"]
        .iter()
        .map(|s| Domain::start(&format!("ovk-lv{tag}-{s}"), &fs.dir, &work.0))
        .collect();
    for d in &domains {
        let done = wait_until(Duration::from_secs(120), || {
            d.console_text().contains("WRITES-DONE")
        });
        assert!(
            done,
            "domain {} did not finish its writes:\n{}",
            d.name,
            d.console_text()
        );
        assert!(
            !d.console_text().contains("IO-FAILED"),
            "{}",
            d.console_text()
        );
    }
    // Two ticks after the last write.
    std::thread::sleep(Duration::from_millis(1500));
    let body = daemon.body();
    for d in &domains {
        let info = body
            .lines()
            .find(|l| {
                l.starts_with("overkvm_vm_info{") && l.contains(&format!("vm=\"{}\"", d.name))
            })
            .unwrap_or_else(|| panic!("no vm_info for {}:\n{body}", d.name));
        eprintln!("{info}");
        assert!(info.contains(&format!("uuid=\"{}\"", d.uuid)), "{info}");
        assert!(info.contains("manager=\"libvirt\""), "{info}");
        assert!(info.contains(&format!("pid=\"{}\"", d.pid())), "{info}");
        let ours = vm_ops(&body, &d.name, &dev, "write").unwrap_or(0.0) as u64;
        let libvirt_says = d.blkstat("wr_req");
        let cgroup_says = serviced(&d.blkio_dir(&blkio), major, minor, "Write");
        eprintln!(
            "{}: writes overkvm {ours}, virsh domblkstat {libvirt_says}, blkio cgroup {cgroup_says} \
             (guest issued {GUEST_WRITES})",
            d.name
        );
        assert!(
            libvirt_says >= GUEST_WRITES,
            "the guest's writes reached qemu"
        );
        assert_eq!(ours, libvirt_says, "overkvm against virsh domblkstat");
        assert_eq!(
            ours, cgroup_says,
            "overkvm against the domain's blkio cgroup"
        );
    }
    let st = daemon.stop();
    assert!(st.is_some_and(|s| s.success()), "{}", daemon.log());

    // Throttling: a budget far below what the guests can read.
    let config = work.join("overkvm.toml");
    write_config(
        &config,
        &work.join("state/throttle.json"),
        "release_ticks = 6\n",
        &dev,
        BUDGET,
        "",
    );
    let mut daemon = Daemon::start(work.join("serve-throttle.log"), Some(&config));
    for d in &domains {
        d.go();
    }
    let dirs: Vec<PathBuf> = domains.iter().map(|d| d.blkio_dir(&blkio)).collect();
    let limited = wait_until(Duration::from_secs(60), || {
        dirs.iter()
            .all(|d| v1_limits(d, major, minor).iter().any(Option::is_some))
    });
    assert!(
        limited,
        "not every domain got a limit in its own cgroup {dirs:?}:\n{}\nconsoles:\n{}",
        daemon.log(),
        domains
            .iter()
            .map(|d| d.console_text())
            .collect::<Vec<_>>()
            .join("\n")
    );
    for (d, dir) in domains.iter().zip(&dirs) {
        let rel = dir.strip_prefix(&blkio).unwrap().display().to_string();
        eprintln!(
            "{}: limits {:?} in /{rel}",
            d.name,
            v1_limits(dir, major, minor)
        );
        assert!(
            rel.contains(&d.name) || rel.contains("machine"),
            "the limit is in the domain's own cgroup: /{rel}"
        );
    }
    std::thread::sleep(Duration::from_secs(4));
    let window = Duration::from_secs(4);
    let before: Vec<u64> = dirs
        .iter()
        .map(|d| serviced(d, major, minor, "Total"))
        .collect();
    std::thread::sleep(window);
    let after: Vec<u64> = dirs
        .iter()
        .map(|d| serviced(d, major, minor, "Total"))
        .collect();
    let rates: Vec<f64> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| a.saturating_sub(*b) as f64 / window.as_secs_f64())
        .collect();
    let total: f64 = rates.iter().sum();
    eprintln!(
        "held: {} = {total:.0} IOPS together (budget {BUDGET}), as the blkio cgroups count",
        rates
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(" + ")
    );
    assert!(total <= BUDGET * 1.1, "over budget: {rates:?}");
    assert!(
        total >= BUDGET * 0.5,
        "far below budget (over-throttled?): {rates:?}"
    );

    // QEMU's own throttling, set through libvirt as Nova does (far above the cgroup limit,
    // so it changes nothing here): `vm list` reads it from libvirt's record, never the monitor.
    virsh_ok(&[
        "blkdeviotune",
        &domains[0].name,
        "vda",
        "--total-iops-sec",
        "5000",
        "--live",
    ]);
    // `vm list` shows the domains, with their manager, the daemon's limits and QEMU's.
    let out = Command::new(workspace_bin("overkvm-io"))
        .args(["vm", "list", "--json", "--config"])
        .arg(&config)
        .arg("--state-dir")
        .arg(work.join("vms"))
        .output()
        .unwrap();
    assert!(out.status.success(), "vm list: {out:?}");
    let rows: Value = serde_json::from_slice(&out.stdout).expect("vm list --json");
    for d in &domains {
        let row = rows
            .as_array()
            .and_then(|r| r.iter().find(|r| r["name"] == d.name.as_str()))
            .unwrap_or_else(|| panic!("{} not in vm list: {rows}", d.name));
        eprintln!("vm list: {row}");
        assert_eq!(row["manager"], "libvirt");
        assert_eq!(row["uuid"], d.uuid.as_str());
        assert_eq!(row["pid"], d.pid());
        assert_eq!(row["state"], "running");
        assert!(row["iops"]["total"].as_f64().is_some(), "{row}");
        assert!(!row["limits"].as_array().is_none_or(Vec::is_empty), "{row}");
    }
    let qemu_limits = |name: &str| {
        rows.as_array()
            .and_then(|r| r.iter().find(|r| r["name"] == name))
            .map(|r| r["qemu_limits"].clone())
    };
    assert_eq!(
        qemu_limits(&domains[0].name),
        Some(serde_json::json!([{"disk": "vda", "iops": 5000}])),
        "QEMU's limit from virsh blkdeviotune"
    );
    assert_eq!(qemu_limits(&domains[1].name), Some(serde_json::json!([])));
    let table = Command::new(workspace_bin("overkvm-io"))
        .args(["vm", "list", "--no-iops", "--state-dir"])
        .arg(work.join("vms"))
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    eprintln!("{table}");
    assert!(
        table.contains("MANAGER") && table.contains("libvirt"),
        "{table}"
    );
    assert!(table.contains("qemu vda iops=5000"), "{table}");

    // A domain destroyed while limited: libvirt removes its cgroup under the daemon.
    let gone = &domains[1];
    virsh_ok(&["destroy", &gone.name]);
    std::thread::sleep(Duration::from_secs(3));
    assert!(daemon.alive(), "the daemon carries on:\n{}", daemon.log());
    assert!(
        metric(&daemon.body(), "overkvm_ticks_total").is_some(),
        "still serving"
    );
    let log = daemon.log();
    assert!(
        log.lines().any(|l| l.contains(&format!("VM {}", gone.name))
            && (l.contains("gone") || l.contains("removed"))),
        "the destroyed domain is logged at the default level:\n{log}"
    );
    assert!(
        v1_limits(&dirs[0], major, minor)
            .iter()
            .any(Option::is_some),
        "the other domain stays limited"
    );

    // SIGTERM: every limit goes.
    let st = daemon.stop();
    assert!(st.is_some_and(|s| s.success()), "{}", daemon.log());
    assert_eq!(
        v1_limits(&dirs[0], major, minor),
        [None; 4],
        "a limit left after SIGTERM"
    );
    let log = daemon.log();
    eprintln!("daemon log (default level):\n{log}");
    for want in [
        "throttling engaged",
        "limited to",
        "throttle stopped: limits removed",
    ] {
        assert!(log.contains(want), "{want:?} not logged:\n{log}");
    }

    // QEMU as the actuator, through libvirt (`actuator = "qemu"`): the limit goes into the
    // domain's live <iotune> with `virsh blkdeviotune`, within the total of 5000 set above (as
    // Nova sets a flavor's quota), nothing into its cgroup; SIGTERM puts the 5000 back.
    let kept = &domains[0];
    let iotune = || {
        overkvm::qemu::limits::parse_virsh_blkdeviotune(&virsh_ok(&[
            "blkdeviotune",
            &kept.name,
            "vda",
            "--live",
        ]))
    };
    write_config(
        &config,
        &work.join("state/throttle.json"),
        "release_ticks = 6\nactuator = \"qemu\"\n",
        &dev,
        BUDGET,
        "",
    );
    let mut daemon = Daemon::start(work.join("serve-qemu.log"), Some(&config));
    let engaged = wait_until(Duration::from_secs(60), || iotune().get("iops_rd") > 0);
    assert!(
        engaged,
        "no limit in the domain's iotune:\n{}",
        daemon.log()
    );
    std::thread::sleep(Duration::from_secs(4));
    let before = serviced(&dirs[0], major, minor, "Total");
    std::thread::sleep(window);
    let held = serviced(&dirs[0], major, minor, "Total").saturating_sub(before) as f64
        / window.as_secs_f64();
    let during = iotune();
    eprintln!(
        "actuator qemu through libvirt: virsh blkdeviotune shows {:?}; the domain did {held:.0} \
         IOPS (blkio io_serviced), budget {BUDGET}",
        during.values
    );
    assert_eq!(during.get("iops"), 0, "per direction inside the total");
    assert!(
        during.get("iops_rd") + during.get("iops_wr") <= 5000,
        "never looser than the domain's own total: {during:?}"
    );
    assert_eq!(
        v1_limits(&dirs[0], major, minor),
        [None; 4],
        "nothing in the cgroup"
    );
    assert!(
        (BUDGET * 0.5..=BUDGET * 1.1).contains(&held),
        "{held:.0} IOPS, budget {BUDGET}:\n{}",
        daemon.log()
    );
    assert!(
        daemon.log().contains("in QEMU through libvirt domain"),
        "{}",
        daemon.log()
    );
    // The operator adds a bandwidth cap while overkvm holds the disk (`virsh blkdeviotune`
    // with one field keeps the other family's values): it is theirs, and stays after release.
    virsh_ok(&[
        "blkdeviotune",
        &kept.name,
        "vda",
        "--write-bytes-sec",
        "50000000",
        "--live",
    ]);
    let st = daemon.stop();
    assert!(st.is_some_and(|s| s.success()), "{}", daemon.log());
    let after = iotune();
    assert_eq!(
        (
            after.get("iops"),
            after.get("iops_rd"),
            after.get("iops_wr"),
            after.get("bps_wr")
        ),
        (5000, 0, 0, 50_000_000),
        "SIGTERM puts the domain's own iotune back, with the cap the operator added while \
         overkvm held it: {after:?}\n{}",
        daemon.log()
    );
    assert!(
        daemon
            .log()
            .contains("bps_wr=50000000 set by someone else while overkvm held it"),
        "the operator's change is logged:\n{}",
        daemon.log()
    );
    drop(domains);
    drop(libvirt);
}

/// Guest write requests of a domain's vda so far (`virsh domstats --block`).
fn domain_writes(name: &str) -> u64 {
    let stats = overkvm::qemu::libvirt::parse_domstats(&virsh_ok(&["domstats", "--block", name]));
    stats
        .get(name)
        .and_then(|d| d.iter().find(|(disk, _)| disk == "vda"))
        .map(|(_, c)| c.wr_operations)
        .unwrap_or_else(|| panic!("no vda in domstats of {name}: {stats:?}"))
}

/// A `cache='writeback'` domain on the v1 host: its writes reach the disk from the flusher,
/// which the domain's blkio cgroup never limits. `actuator = "auto"` holds it through libvirt
/// (`virsh blkdeviotune`), measured by libvirt's own counters (`virsh domstats --block`), and
/// SIGTERM puts its iotune back.
#[test]
fn libvirt_writeback_domain_is_held_through_qemu_on_v1() {
    skip_unless_kernel!();
    let _blkio = overkvm_tests::v1_blkio_or_skip!();
    if let Some(reason) = tools_missing() {
        overkvm_tests::skipped(module_path!(), &reason);
        return;
    }
    let fs = MountedFs::new(192, "ext4", &[]).expect("ext4 on a loop device");
    let dev = fs.dev.name();
    let work = TempDir::new("libvirt-wb");
    let _kernel = guest::guest_kernel().expect("guest kernel");
    let libvirt = Libvirt::start();
    let name = format!("ovk-lvwb{}", std::process::id());
    let script = format!(
        "echo WRITING\n\
         while :; do dd if=/dev/zero of=/dev/vda bs=4096 count={DISK_BLOCKS} oflag=direct 2>/dev/null; done\n"
    );
    let dom = Domain::start_with(&name, &fs.dir, &work.0, "writeback", Some(script));
    assert!(
        wait_until(Duration::from_secs(90), || dom
            .console_text()
            .contains("WRITING")),
        "the guest did not start writing:\n{}",
        dom.console_text()
    );
    std::thread::sleep(Duration::from_secs(2));
    let rate = |d: Duration| {
        let (a, t0) = (domain_writes(&name), std::time::Instant::now());
        std::thread::sleep(d);
        (domain_writes(&name) - a) as f64 / t0.elapsed().as_secs_f64()
    };
    let free = rate(Duration::from_secs(4));
    let budget = (free / 4.0).min(300.0).round();
    eprintln!("domain alone: {free:.0} writes/s (virsh domstats); budget {budget} IOPS on {dev}");
    if budget < 40.0 {
        overkvm_tests::skipped(
            module_path!(),
            format!("the guest writes only {free:.0}/s under TCG here: too slow to show a budget"),
        );
        return;
    }
    let config = work.join("overkvm.toml");
    write_config(
        &config,
        &work.join("state/throttle.json"),
        "",
        &dev,
        budget,
        "",
    );
    let mut daemon = Daemon::start(work.join("serve.log"), Some(&config));
    let iotune = || {
        overkvm::qemu::limits::parse_virsh_blkdeviotune(&virsh_ok(&[
            "blkdeviotune",
            &name,
            "vda",
            "--live",
        ]))
    };
    let engaged = wait_until(Duration::from_secs(60), || iotune().get("iops_wr") > 0);
    assert!(
        engaged,
        "no limit in the domain's iotune:\n{}",
        daemon.log()
    );
    std::thread::sleep(Duration::from_secs(4));
    let held = rate(Duration::from_secs(8));
    eprintln!(
        "held through libvirt: virsh blkdeviotune {:?}; {held:.0} writes/s (virsh domstats), \
         {:.2}x the budget of {budget}",
        iotune().values,
        held / budget
    );
    assert!(
        (held - budget).abs() <= budget * 0.25,
        "{held:.0} writes/s, budget {budget}:\n{}",
        daemon.log()
    );
    let log = daemon.log();
    assert!(
        log.contains("in QEMU through libvirt domain") && log.contains("v1 blkio cannot limit"),
        "{log}"
    );
    let st = daemon.stop();
    assert!(st.is_some_and(|s| s.success()), "{}", daemon.log());
    let after = iotune();
    assert!(
        after.values.is_empty(),
        "SIGTERM puts the iotune back: {after:?}"
    );
    drop(dom);
    drop(libvirt);
}

/// `virsh domstats --block NAME` for disk `dev`, read here, apart from overkvm's parser: each
/// `block.N.FIELD=VALUE` of the block whose `block.N.name` is `dev`.
fn domstats_of(name: &str, dev: &str) -> std::collections::HashMap<String, u64> {
    let text = virsh_ok(&["domstats", "--block", name]);
    let fields: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("block.")?.split_once('='))
        .collect();
    let idx = fields
        .iter()
        .find_map(|(k, v)| (*v == dev).then(|| k.strip_suffix(".name")).flatten())
        .unwrap_or_else(|| panic!("no {dev} in domstats of {name}:\n{text}"));
    fields
        .iter()
        .filter_map(|(k, v)| {
            let field = k.strip_prefix(idx)?.strip_prefix('.')?;
            Some((field.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// A libvirt domain whose vda is an NBD export (`qemu-nbd` over TCP on loopback; QEMU's own
/// NBD client, no host block device) is counted through libvirt: `/metrics` carries the disk
/// as libvirt names it (`vda`) with `source="qemu"` and its target, and its counts over the
/// guest's known I/O equal `virsh domstats --block` (reads, writes, flushes, bytes). The
/// domain's second disk is a local file on the host's root disk, itself named `vda` on this
/// machine: both `vda` series exist for the VM, apart.
#[test]
fn libvirt_domain_with_an_nbd_disk_is_counted_through_libvirt() {
    skip_unless_kernel!();
    if let Some(reason) = tools_missing() {
        overkvm_tests::skipped(module_path!(), &reason);
        return;
    }
    if Command::new("qemu-nbd").arg("--version").output().is_err() {
        overkvm_tests::skipped(
            module_path!(),
            "qemu-nbd missing (apt-get install qemu-utils)",
        );
        return;
    }
    const WRITES: u64 = 300;
    const READS: u64 = 200;
    const FLUSHED_WRITES: u64 = 5;
    let work = TempDir::new("libvirt-nbd");
    let _kernel = guest::guest_kernel().expect("guest kernel");
    let image = work.join("export.img");
    zeroed_raw_disk(&image);
    let nbd = NbdServer::start(&image);
    let target = format!("nbd://127.0.0.1:{}/exp", nbd.port);
    let local = work.join("local.img");
    zeroed_raw_disk(&local);
    let libvirt = Libvirt::start();
    let daemon = Daemon::start(work.join("serve.log"), None);

    let name = format!("ovk-lvnbd{}", std::process::id());
    let script = format!(
        "echo READY\n\
         while ! dd if=/dev/vdb bs=4096 skip={FLAG_BLOCK} count=1 iflag=direct 2>/dev/null | grep -q {go}; do usleep 100000; done\n\
         dd if=/dev/urandom of=/dev/vda bs=4096 count={WRITES} oflag=direct 2>/dev/null || echo IO-FAILED\n\
         dd if=/dev/vda of=/dev/null bs=4096 count={READS} iflag=direct 2>/dev/null || echo IO-FAILED\n\
         for i in $(seq {FLUSHED_WRITES}); do\n\
           dd if=/dev/zero of=/dev/vda bs=4096 count=1 seek=$i oflag=direct conv=fsync 2>/dev/null || echo IO-FAILED\n\
         done\n\
         echo IO-DONE\n\
         sleep 600\n",
        go = String::from_utf8_lossy(GO)
    );
    // cache='writeback': the guest sees a write cache, so its fsyncs reach QEMU as flushes.
    let disks = format!(
        "<disk type='network' device='disk'>\n\
           <driver name='qemu' type='raw' cache='writeback'/>\n\
           <source protocol='nbd' name='exp'><host name='127.0.0.1' port='{port}'/></source>\n\
           <target dev='vda' bus='virtio'/>\n\
         </disk>\n\
         <disk type='file' device='disk'>\n\
           <driver name='qemu' type='raw' cache='none' io='native'/>\n\
           <source file='{local}'/>\n\
           <target dev='vdb' bus='virtio'/>\n\
         </disk>\n",
        port = nbd.port,
        local = local.display(),
    );
    let dom = Domain::launch(&name, &work.0, local.clone(), &disks, script);
    assert!(
        wait_until(Duration::from_secs(120), || dom
            .console_text()
            .contains("READY")),
        "the guest did not boot:\n{}",
        dom.console_text()
    );
    let series = |body: &str, family: &str, op: &str| {
        metric(
            body,
            &format!("{family}{{vm=\"{name}\",device=\"vda\",op=\"{op}\",source=\"qemu\"}}"),
        )
        .unwrap_or(0.0) as u64
    };
    let counted = |body: &str| {
        [
            series(body, "overkvm_vm_io_operations_total", "read"),
            series(body, "overkvm_vm_io_operations_total", "write"),
            series(body, "overkvm_vm_io_operations_total", "flush"),
            series(body, "overkvm_vm_io_bytes_total", "read"),
            series(body, "overkvm_vm_io_bytes_total", "write"),
        ]
    };
    let libvirt_says = || {
        let s = domstats_of(&name, "vda");
        let f = |k: &str| s.get(k).copied().unwrap_or(0);
        [
            f("rd.reqs"),
            f("wr.reqs"),
            f("fl.reqs"),
            f("rd.bytes"),
            f("wr.bytes"),
        ]
    };
    // The guest is idle now. Four intervals: a reading of the idle disk has reached the
    // report (a tick reports what its predecessor asked for), so both sides stand still.
    std::thread::sleep(Duration::from_secs(2));
    let (ours0, theirs0) = (counted(&daemon.body()), libvirt_says());
    dom.go();
    assert!(
        wait_until(Duration::from_secs(180), || dom
            .console_text()
            .contains("IO-DONE")),
        "the guest's I/O did not finish:\n{}",
        dom.console_text()
    );
    assert!(
        !dom.console_text().contains("IO-FAILED"),
        "{}",
        dom.console_text()
    );
    std::thread::sleep(Duration::from_secs(2));
    let body = daemon.body();
    let (ours1, theirs1) = (counted(&body), libvirt_says());
    let ours: Vec<u64> = ours1.iter().zip(&ours0).map(|(a, b)| a - b).collect();
    let theirs: Vec<u64> = theirs1.iter().zip(&theirs0).map(|(a, b)| a - b).collect();
    eprintln!(
        "{name} vda on {target}: overkvm [reads, writes, flushes, read bytes, write bytes] \
         {ours:?}, virsh domstats --block {theirs:?}"
    );
    assert_eq!(ours, theirs, "overkvm against virsh domstats --block");
    assert!(
        theirs[0] >= READS && theirs[1] >= WRITES + FLUSHED_WRITES,
        "{theirs:?}"
    );
    assert!(theirs[2] >= FLUSHED_WRITES, "{theirs:?}");
    assert_eq!(
        dom.blkstat("flush_operations"),
        theirs1[2],
        "domblkstat agrees"
    );
    assert_eq!(
        metric(
            &body,
            &format!(
                "overkvm_vm_disk_info{{vm=\"{name}\",device=\"vda\",source=\"qemu\",target=\"{target}\"}}"
            )
        ),
        Some(1.0),
        "{body}"
    );
    assert!(
        !body.contains("device=\"vdb\""),
        "the local disk is eBPF's, counted on the host device: {body}"
    );
    let info = body
        .lines()
        .find(|l| l.starts_with("overkvm_vm_info{") && l.contains(&format!("vm=\"{name}\"")))
        .unwrap_or_else(|| panic!("no vm_info for {name}:\n{body}"));
    assert!(info.contains("manager=\"libvirt\""), "{info}");
    assert!(info.contains(&format!("pid=\"{}\"", dom.pid())), "{info}");
    // `vm list` names the network disk and its target under the domain, through libvirt too.
    let out = Command::new(workspace_bin("overkvm-io"))
        .args(["vm", "list", "--json", "--no-iops", "--state-dir"])
        .arg(work.join("vms"))
        .output()
        .unwrap();
    assert!(out.status.success(), "vm list: {out:?}");
    let rows: Value = serde_json::from_slice(&out.stdout).expect("vm list --json");
    let row = rows
        .as_array()
        .and_then(|r| r.iter().find(|r| r["name"] == name.as_str()))
        .unwrap_or_else(|| panic!("{name} not in vm list: {rows}"));
    assert_eq!(
        row["network_disks"],
        serde_json::json!([{"disk": "vda", "target": target}]),
        "{row}"
    );
    drop(daemon);
    drop(dom);
    drop(libvirt);
    drop(nbd);
}
