//! QEMU's own throttling as the throttle's actuator, with a real guest on the v1 blkio host.
//!
//! One of overkvm's own VMs (`vm create --cache writeback`, Debian's 6.1 kernel under TCG)
//! writes 4 KiB blocks to its disk with O_DIRECT in a loop. On the host qemu writes them into
//! the page cache of its overlay (on ext4 on a loop device); the kernel's flusher writes them
//! back later, charged to the root blkio cgroup. So:
//!
//! 1. with `actuator = "cgroup"` the daemon limits the VM's own blkio cgroup, and the guest
//!    goes on far above the budget (the figure is printed);
//! 2. with `actuator = "auto"` the daemon picks QEMU (v1 + a host-cached disk), sets
//!    `iops_wr` on the disk over the VM's QMP socket, and the guest is held to the budget as
//!    QEMU's `query-blockstats` counts it and as the daemon counts it (`throttle status`);
//!    a limit an operator had set on the disk (`bps_rd`) is shown next to overkvm's, kept
//!    while overkvm holds the disk, and is what SIGTERM puts back;
//! 3. after a `kill -9` of the daemon while engaged, `throttle reset` puts it back too.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use overkvm::qemu::{limits::DiskRef, qmp::Qmp};
use overkvm_tests::{
    devices::MountedFs,
    guest::{self, GuestSpec, TempDir},
    serving::{metric, metrics_addr, scrape},
    skip_unless_kernel,
    throttling::{v1_blkio, wait_until},
    workspace_bin,
};
use serde_json::{Value, json};

/// The guest's writes per second may be held within this of the budget (QEMU's leaky bucket
/// is exact; the controller adapts the limit around the budget tick by tick).
const TOLERANCE: f64 = 0.25;

fn ovk(state: &Path, args: &[&str]) -> Output {
    Command::new(workspace_bin("overkvm-io"))
        .args(args)
        .env("OVERKVM_STATE_DIR", state)
        .stdin(Stdio::null())
        .output()
        .expect("running overkvm-io")
}

#[track_caller]
fn ok(o: Output) -> String {
    let t = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "overkvm-io failed ({}):\n{t}", o.status);
    t
}

/// Kills the VM's qemu (found by its UUID) and removes its cgroup in every case.
struct VmCleanup {
    state: PathBuf,
    name: String,
}

impl Drop for VmCleanup {
    fn drop(&mut self) {
        let st = self.state.to_string_lossy().into_owned();
        let _ = ovk(
            &self.state,
            &[
                "vm",
                "stop",
                &self.name,
                "--timeout",
                "1s",
                "--state-dir",
                &st,
            ],
        );
        let uuid = fs::read_to_string(self.state.join(&self.name).join("vm.toml"))
            .ok()
            .and_then(|t| {
                t.lines().find_map(|l| {
                    l.strip_prefix("uuid = \"")?
                        .strip_suffix('"')
                        .map(str::to_string)
                })
            });
        if let Some(uuid) = uuid {
            for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                    continue;
                };
                let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmdline).contains(&uuid) {
                    // SAFETY: kill(2) of the qemu this test started (found by its UUID).
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        if let Ok(root) = v1_blkio() {
            let cg = root.join(format!("overkvm/vm-{}", self.name));
            wait_until(Duration::from_secs(5), || {
                fs::remove_dir(&cg).is_ok() || !cg.exists()
            });
            let _ = fs::remove_dir(root.join("overkvm"));
        }
    }
}

/// The daemon, with the VM state directory in its environment (how it finds its own VMs).
struct Serve {
    child: Option<Child>,
    log: PathBuf,
}

impl Serve {
    fn start(config: &Path, log: &Path, state: &Path) -> Serve {
        let child = Command::new(workspace_bin("overkvm-io"))
            .args(["serve", "--listen", "127.0.0.1:0", "-i", "0.5", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .env("OVERKVM_STATE_DIR", state)
            .stdout(Stdio::null())
            .stderr(fs::File::create(log).unwrap())
            .spawn()
            .expect("starting overkvm-io serve");
        let s = Serve {
            child: Some(child),
            log: log.to_path_buf(),
        };
        assert!(
            wait_until(Duration::from_secs(30), || s.log().contains("throttling ")),
            "daemon not ready:\n{}",
            s.log()
        );
        s
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) of the daemon this test started.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// One QMP command on the VM's socket (a short connection: the daemon uses the monitor too).
fn qmp(socket: &Path, cmd: &str, args: Option<Value>) -> Value {
    let mut last = None;
    for _ in 0..20 {
        match Qmp::connect(socket, Duration::from_secs(5))
            .and_then(|mut q| q.execute(cmd, args.clone()))
        {
            Ok(v) => return v,
            Err(e) => last = Some(e),
        }
        sleep(Duration::from_millis(100));
    }
    panic!("QMP {cmd} on {}: {last:?}", socket.display());
}

/// Guest write operations on the VM's disk so far (QEMU's count).
fn guest_writes(socket: &Path) -> u64 {
    let v = qmp(socket, "query-blockstats", None);
    overkvm::qemu::backing::counters_of(&v, &DiskRef::Device("disk0".into()))
        .expect("disk0 in query-blockstats")
        .wr_operations
}

/// The guest's write rate over `d`, by QEMU's count.
fn guest_write_rate(socket: &Path, d: Duration) -> f64 {
    let (a, t0) = (guest_writes(socket), Instant::now());
    sleep(d);
    let b = guest_writes(socket);
    (b - a) as f64 / t0.elapsed().as_secs_f64()
}

/// The throttle settings of disk0 from `query-block`.
fn disk_throttle(socket: &Path) -> Value {
    let v = qmp(socket, "query-block", None);
    let d = v
        .as_array()
        .and_then(|a| a.iter().find(|d| d["device"] == "disk0"))
        .expect("disk0 in query-block")
        .clone();
    d["inserted"].clone()
}

fn status(config: &Path, state: &Path) -> Value {
    let t = ok(ovk(
        state,
        &[
            "throttle",
            "status",
            "--json",
            "--config",
            config.to_str().unwrap(),
        ],
    ));
    serde_json::from_str(t.trim()).unwrap_or_else(|e| panic!("status is not JSON ({e}): {t}"))
}

/// A raw base image full of data.
fn make_base(path: &Path, mib: usize) {
    let mut f = fs::File::create(path).expect("creating the base image");
    let block = vec![0x5au8; 1 << 20];
    for _ in 0..mib {
        f.write_all(&block).unwrap();
    }
    f.sync_all().unwrap();
}

/// Creates and starts one of overkvm's VMs (`--cache` as given, TCG) whose guest writes 4 KiB
/// O_DIRECT blocks over its disk in a loop; returns its QMP socket once it writes.
fn boot_writer(fs_dir: &Path, work: &Path, state: &Path, name: &str, cache: &str) -> PathBuf {
    let base = fs_dir.join("base.raw");
    make_base(&base, 64);
    // 4 KiB O_DIRECT writes over the disk, round and round: every one a guest request.
    let spec = GuestSpec {
        disk: Some(PathBuf::from("/dev/vda")),
        script: "echo WRITING\n\
                 while :; do dd if=/dev/zero of=/dev/vda bs=4096 count=16000 oflag=direct 2>/dev/null; done\n"
            .into(),
        ..GuestSpec::default()
    };
    let initrd = work.join("initrd.cpio");
    let kernel = guest::write_initramfs(&spec, &initrd).expect("building the initramfs");
    let st = state.to_str().unwrap();
    ok(ovk(
        state,
        &[
            "vm",
            "create",
            name,
            "--base",
            base.to_str().unwrap(),
            "--memory",
            "256",
            "--cache",
            cache,
            "--kernel",
            kernel.vmlinuz.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--append",
            guest::kernel_args(),
            "--state-dir",
            st,
        ],
    ));
    ok(ovk(
        state,
        &["vm", "start", name, "--accel", "tcg", "--state-dir", st],
    ));
    let socket = state.join(name).join("qmp.sock");
    let serial = state.join(name).join("serial.log");
    assert!(
        wait_until(Duration::from_secs(90), || fs::read_to_string(&serial)
            .is_ok_and(|s| s.contains("WRITING"))),
        "the guest did not start writing:\n{}",
        fs::read_to_string(&serial).unwrap_or_default()
    );
    socket
}

#[test]
fn qemu_holds_a_host_cached_guest_to_its_budget_where_blkio_cannot() {
    skip_unless_kernel!();
    let test = "qemu_holds_a_host_cached_guest_to_its_budget_where_blkio_cannot";
    if let Some(reason) = guest::missing_tools() {
        overkvm_tests::skipped(test, reason);
        return;
    }
    if let Err(reason) = v1_blkio() {
        overkvm_tests::skipped(test, format!("needs cgroup v1 blkio: {reason}"));
        return;
    }
    let fs_ = MountedFs::new(512, "ext4", &[]).expect("ext4 on a loop device");
    let dev = fs_.dev.name();
    let work = TempDir::new("qemu-throttle").unwrap();
    let state = fs_.dir.join("vms");
    let name = format!("okq{}", std::process::id());
    let _cleanup = VmCleanup {
        state: state.clone(),
        name: name.clone(),
    };
    let socket = boot_writer(&fs_.dir, work.path(), &state, &name, "writeback");
    sleep(Duration::from_secs(2));
    let free = guest_write_rate(&socket, Duration::from_secs(5));
    // A budget well under what the guest does alone, so that holding it is visible.
    let budget = ((free / 4.0).min(300.0)).round();
    eprintln!("guest alone: {free:.0} writes/s (QMP); budget {budget:.0} IOPS on {dev}");
    if budget < 40.0 {
        overkvm_tests::skipped(
            test,
            format!("the guest writes only {free:.0}/s under TCG here: too slow to show a budget"),
        );
        return;
    }
    // An operator's own QEMU limit on the disk, which overkvm must keep and put back.
    qmp(
        &socket,
        "block_set_io_throttle",
        Some(
            json!({"device": "disk0", "iops": 0, "iops_rd": 0, "iops_wr": 0,
                    "bps": 0, "bps_rd": 50_000_000, "bps_wr": 0}),
        ),
    );
    let config = work.path().join("overkvm.toml");
    let state_file = work.path().join("run/throttle.json");
    let write_config = |actuator: &str| {
        fs::write(
            &config,
            format!(
                "[policy]\nstate_file = \"{}\"\nactuator = \"{actuator}\"\n\n\
                 [[device]]\ndevice = \"{dev}\"\niops = {budget}\n",
                state_file.display()
            ),
        )
        .unwrap();
    };

    // 1. The cgroup actuator: a limit lands in the VM's blkio cgroup and holds nothing.
    write_config("cgroup");
    let mut d = Serve::start(&config, &work.path().join("serve-cgroup.log"), &state);
    let cg_dir = v1_blkio().unwrap().join(format!("overkvm/vm-{name}"));
    let (major, minor) = (fs_.dev.dev() >> 20, fs_.dev.dev() & 0xfffff);
    let limited = wait_until(Duration::from_secs(30), || {
        fs::read_to_string(cg_dir.join("blkio.throttle.write_iops_device"))
            .is_ok_and(|t| t.contains(&format!("{major}:{minor} ")))
    });
    assert!(
        limited,
        "no cgroup limit on {}:\n{}",
        cg_dir.display(),
        d.log()
    );
    sleep(Duration::from_secs(3));
    let cgroup_rate = guest_write_rate(&socket, Duration::from_secs(8));
    eprintln!(
        "actuator cgroup: blkio limit {} in {}; the guest wrote {cgroup_rate:.0}/s (QMP): {:.1}x the budget",
        fs::read_to_string(cg_dir.join("blkio.throttle.write_iops_device"))
            .unwrap_or_default()
            .trim(),
        cg_dir.display(),
        cgroup_rate / budget
    );
    assert!(
        cgroup_rate > budget * (1.0 + TOLERANCE),
        "blkio held the host-cached guest ({cgroup_rate:.0}/s, budget {budget}): the premise of \
         this test does not hold here"
    );
    d.terminate();
    assert!(
        fs::read_to_string(cg_dir.join("blkio.throttle.write_iops_device"))
            .is_ok_and(|t| !t.contains(&format!("{major}:{minor} "))),
        "SIGTERM left the cgroup limit"
    );

    // 2. auto: QEMU holds it.
    write_config("auto");
    let mut d = Serve::start(&config, &work.path().join("serve-auto.log"), &state);
    let engaged = wait_until(Duration::from_secs(30), || {
        disk_throttle(&socket)["iops_wr"].as_u64().unwrap_or(0) > 0
    });
    assert!(engaged, "no QEMU limit on disk0:\n{}", d.log());
    let log = d.log();
    assert!(
        log.contains("in QEMU through QMP") && log.contains("v1 blkio cannot limit"),
        "{log}"
    );
    sleep(Duration::from_secs(4));
    let t0_status = status(&config, &state);
    let qemu_rate = guest_write_rate(&socket, Duration::from_secs(10));
    let stj = status(&config, &state);
    let used = stj["daemon"]["budgets"][0]["iops_used"]
        .as_f64()
        .unwrap_or(-1.0);
    let inserted = disk_throttle(&socket);
    eprintln!(
        "actuator qemu: iops_wr={} on disk0; the guest wrote {qemu_rate:.0}/s (QMP), the daemon \
         counted {used:.0} IOPS on {dev}: {:.2}x / {:.2}x the budget of {budget}",
        inserted["iops_wr"],
        qemu_rate / budget,
        used / budget
    );
    for (what, v) in [("QMP", qemu_rate), ("the daemon", used)] {
        assert!(
            (v - budget).abs() <= budget * TOLERANCE,
            "{what}: {v:.0} IOPS, budget {budget} ± {:.0}%\n{}",
            TOLERANCE * 100.0,
            d.log()
        );
    }
    assert_eq!(
        inserted["bps_rd"], 50_000_000,
        "the operator's limit is kept while overkvm holds the disk"
    );
    // Shown next to overkvm's own: the active limit says QEMU holds it, the operator's is listed.
    let limits = &stj["daemon"]["limits"];
    assert_eq!(limits[0]["qemu_disks"], json!(["disk0"]), "{stj}");
    let ql = &stj["daemon"]["qemu_limits"];
    assert_eq!(ql[0]["vm"], name.as_str(), "{stj}");
    assert_eq!(ql[0]["disks"][0]["bps_rd"], 50_000_000, "{stj}");
    assert!(
        stj["recorded"]["qemu"][0]["original"]["values"]["bps_rd"] == 50_000_000,
        "{t0_status}"
    );
    let body = metrics_addr(&d.log).and_then(scrape).unwrap_or_default();
    let series = format!(
        r#"overkvm_vm_qemu_limit_bytes_per_second{{vm="{name}",disk="disk0",direction="read"}}"#
    );
    assert_eq!(
        metric(&body, &series),
        Some(50_000_000.0),
        "{series} in:\n{body}"
    );
    d.terminate();
    let back = disk_throttle(&socket);
    assert_eq!(
        (back["iops_wr"].as_u64(), back["bps_rd"].as_u64()),
        (Some(0), Some(50_000_000)),
        "SIGTERM puts the operator's settings back: {back}"
    );

    // 3. kill -9 while engaged, then `throttle reset`.
    let mut d = Serve::start(&config, &work.path().join("serve-kill.log"), &state);
    assert!(
        wait_until(Duration::from_secs(30), || {
            disk_throttle(&socket)["iops_wr"].as_u64().unwrap_or(0) > 0
        }),
        "no QEMU limit:\n{}",
        d.log()
    );
    d.kill9();
    let out = ok(ovk(
        &state,
        &["throttle", "reset", "--config", config.to_str().unwrap()],
    ));
    assert!(out.contains("QEMU settings of 1 disk"), "{out}");
    let back = disk_throttle(&socket);
    assert_eq!(
        (back["iops_wr"].as_u64(), back["bps_rd"].as_u64()),
        (Some(0), Some(50_000_000)),
        "reset puts the operator's settings back: {back}"
    );

    // 4. The VM's qemu killed while QEMU holds it: logged, the daemon carries on, nothing left
    //    on record.
    let mut d = Serve::start(&config, &work.path().join("serve-vanish.log"), &state);
    assert!(
        wait_until(Duration::from_secs(30), || {
            disk_throttle(&socket)["iops_wr"].as_u64().unwrap_or(0) > 0
        }),
        "no QEMU limit:\n{}",
        d.log()
    );
    let pid: i32 = fs::read_to_string(state.join(&name).join("qemu.pid"))
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .expect("the VM's pidfile");
    // SAFETY: kill(2) of the qemu this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(
        wait_until(Duration::from_secs(20), || d.log().contains("is gone")),
        "the vanished VM is not logged:\n{}",
        d.log()
    );
    let alive = d
        .child
        .as_mut()
        .is_some_and(|c| c.try_wait().ok().flatten().is_none());
    assert!(alive, "the daemon carries on:\n{}", d.log());
    d.terminate();
    let left = fs::read_to_string(&state_file).unwrap_or_default();
    assert!(!left.contains("\"qemu\""), "a record left: {left}");
    eprintln!(
        "vanished VM: {}",
        d.log()
            .lines()
            .filter(|l| l.contains("gone"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
}

/// Another process whose I/O is charged to a VM's cgroup (`iogen` reading the device at a
/// trickle), killed on drop.
struct Neighbour(Child);

impl Drop for Neighbour {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A VM whose cgroup also holds another process doing I/O on the device (VMs of one service
/// in one cgroup, a helper started beside qemu), with `manage_cgroups = false`: a limit in that
/// cgroup would hold the other process too, so `auto` holds the VM with QEMU's own throttling
/// (its disk uses no host cache: only the shared cgroup decides), and the cgroup stays free.
#[test]
fn qemu_holds_a_vm_that_shares_its_cgroup() {
    // (The neighbour's reads count in the device's use: they are left out of what the VM
    // may have, as any process the throttle cannot limit.)
    skip_unless_kernel!();
    let test = "qemu_holds_a_vm_that_shares_its_cgroup";
    if let Some(reason) = guest::missing_tools() {
        overkvm_tests::skipped(test, reason);
        return;
    }
    if let Err(reason) = v1_blkio() {
        overkvm_tests::skipped(test, format!("needs cgroup v1 blkio: {reason}"));
        return;
    }
    let fs_ = MountedFs::new(512, "ext4", &[]).expect("ext4 on a loop device");
    let dev = fs_.dev.name();
    let work = TempDir::new("qemu-shared").unwrap();
    let state = fs_.dir.join("vms");
    let name = format!("oks{}", std::process::id());
    let _cleanup = VmCleanup {
        state: state.clone(),
        name: name.clone(),
    };
    let socket = boot_writer(&fs_.dir, work.path(), &state, &name, "none");
    sleep(Duration::from_secs(2));
    let free = guest_write_rate(&socket, Duration::from_secs(5));
    let budget = ((free / 4.0).min(300.0)).round();
    eprintln!("guest alone: {free:.0} writes/s (QMP); budget {budget:.0} IOPS on {dev}");
    if budget < 40.0 {
        overkvm_tests::skipped(
            test,
            format!("the guest writes only {free:.0}/s under TCG here: too slow to show a budget"),
        );
        return;
    }
    // The neighbour: one long-lived process reading the device directly at 20 IOPS, moved
    // into the VM's cgroup before it starts (dropped before the VM's cleanup, which removes
    // the cgroup). Long-lived: a process that has exited by the time an interval is read
    // shares nothing (a loop of short `dd`s is seen only by chance).
    let cg_dir = v1_blkio().unwrap().join(format!("overkvm/vm-{name}"));
    let child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs || exit 1; exec {} /dev/{dev} 100000000 0 4096 0 {} 7 \
             --rate 20",
            cg_dir.display(),
            workspace_bin("iogen").display(),
            256u64 << 20
        ))
        .stdin(Stdio::null())
        .spawn()
        .expect("starting the neighbour");
    let _neighbour = Neighbour(child);
    let config = work.path().join("overkvm.toml");
    fs::write(
        &config,
        format!(
            "[policy]\nstate_file = \"{}\"\nactuator = \"auto\"\nmanage_cgroups = false\n\n\
             [[device]]\ndevice = \"{dev}\"\niops = {budget}\n",
            work.path().join("run/throttle.json").display()
        ),
    )
    .unwrap();
    let mut d = Serve::start(&config, &work.path().join("serve-shared.log"), &state);
    let engaged = wait_until(Duration::from_secs(30), || {
        disk_throttle(&socket)["iops_wr"].as_u64().unwrap_or(0) > 0
    });
    assert!(engaged, "no QEMU limit on disk0:\n{}", d.log());
    let log = d.log();
    assert!(
        log.contains("in QEMU through QMP") && log.contains("it shares its cgroup"),
        "{log}"
    );
    sleep(Duration::from_secs(4));
    let rate = guest_write_rate(&socket, Duration::from_secs(10));
    let stj = status(&config, &state);
    let used = stj["daemon"]["budgets"][0]["iops_used"]
        .as_f64()
        .unwrap_or(-1.0);
    let (major, minor) = (fs_.dev.dev() >> 20, fs_.dev.dev() & 0xfffff);
    let cgroup_limits = ["read", "write"].map(|dir| {
        fs::read_to_string(cg_dir.join(format!("blkio.throttle.{dir}_iops_device")))
            .unwrap_or_default()
    });
    eprintln!(
        "shared cgroup: iops_wr={} on disk0; the guest wrote {rate:.0}/s (QMP), the daemon \
         counted {used:.0} IOPS on {dev} (budget {budget}); blkio limits in {}: {:?}",
        disk_throttle(&socket)["iops_wr"],
        cg_dir.display(),
        cgroup_limits
    );
    assert!(
        (used - budget).abs() <= budget * TOLERANCE,
        "the daemon counted {used:.0} IOPS, budget {budget} ± {:.0}%\n{}",
        TOLERANCE * 100.0,
        d.log()
    );
    assert!(
        rate <= budget * (1.0 + TOLERANCE),
        "the guest wrote {rate:.0}/s, over the budget {budget}"
    );
    assert!(
        cgroup_limits
            .iter()
            .all(|t| !t.contains(&format!("{major}:{minor} "))),
        "a limit in the shared cgroup would hold the neighbour too: {cgroup_limits:?}"
    );
    d.terminate();
    let back = disk_throttle(&socket);
    assert_eq!(
        back["iops_wr"].as_u64(),
        Some(0),
        "SIGTERM puts the disk's settings back: {back}"
    );
}

/// Reads of `major:minor` charged to a v1 blkio cgroup so far, as the kernel counts them.
fn cgroup_reads(
    cg_dir: &Path,
    major: impl std::fmt::Display,
    minor: impl std::fmt::Display,
) -> u64 {
    let text = fs::read_to_string(cg_dir.join("blkio.throttle.io_serviced")).unwrap_or_default();
    let want = format!("{major}:{minor} Read ");
    text.lines()
        .find_map(|l| l.strip_prefix(&want).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

/// The cgroup's neighbour is a cron-like job: a loop of short `dd` bursts (40 direct reads
/// each, then 1.5 s asleep), each `dd` a new process that has exited by the time the
/// interval it read in is read. Judged per interval the cgroup would be shared in one tick of
/// four or five; remembered for `shared_hold` (here 6 s), it stays shared: QEMU holds the VM
/// the whole time and nothing is written in the cgroup. Once the job stops, the cgroup is
/// alone again after the hold: that is logged once, and the cgroup takes over, once.
#[test]
fn qemu_keeps_holding_a_vm_whose_cgroup_neighbour_runs_in_short_bursts() {
    skip_unless_kernel!();
    let test = "qemu_keeps_holding_a_vm_whose_cgroup_neighbour_runs_in_short_bursts";
    if let Some(reason) = guest::missing_tools() {
        overkvm_tests::skipped(test, reason);
        return;
    }
    if let Err(reason) = v1_blkio() {
        overkvm_tests::skipped(test, format!("needs cgroup v1 blkio: {reason}"));
        return;
    }
    let fs_ = MountedFs::new(512, "ext4", &[]).expect("ext4 on a loop device");
    let dev = fs_.dev.name();
    let work = TempDir::new("qemu-bursts").unwrap();
    let state = fs_.dir.join("vms");
    let name = format!("okb{}", std::process::id());
    let _cleanup = VmCleanup {
        state: state.clone(),
        name: name.clone(),
    };
    let socket = boot_writer(&fs_.dir, work.path(), &state, &name, "none");
    sleep(Duration::from_secs(2));
    let free = guest_write_rate(&socket, Duration::from_secs(5));
    let budget = ((free / 4.0).min(300.0)).round();
    eprintln!("guest alone: {free:.0} writes/s (QMP); budget {budget:.0} IOPS on {dev}");
    if budget < 40.0 {
        overkvm_tests::skipped(
            test,
            format!("the guest writes only {free:.0}/s under TCG here: too slow to show a budget"),
        );
        return;
    }
    let cg_dir = v1_blkio().unwrap().join(format!("overkvm/vm-{name}"));
    let (major, minor) = (fs_.dev.dev() >> 20, fs_.dev.dev() & 0xfffff);
    // The job: a shell in the VM's cgroup (it does no I/O itself) starting short `dd`s,
    // each reading a different 160 KiB of the device directly.
    let child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs || exit 1; i=0; while :; do \
             dd if=/dev/{dev} of=/dev/null bs=4096 count=40 skip=$((i * 40 % 60000)) \
             iflag=direct 2>/dev/null; i=$((i + 1)); sleep 1.5; done",
            cg_dir.display()
        ))
        .stdin(Stdio::null())
        .spawn()
        .expect("starting the neighbour");
    let neighbour = Neighbour(child);
    let config = work.path().join("overkvm.toml");
    fs::write(
        &config,
        format!(
            "[policy]\nstate_file = \"{}\"\nactuator = \"auto\"\nmanage_cgroups = false\n\
             shared_hold = \"6s\"\n\n[[device]]\ndevice = \"{dev}\"\niops = {budget}\n",
            work.path().join("run/throttle.json").display()
        ),
    )
    .unwrap();
    let mut d = Serve::start(&config, &work.path().join("serve-bursts.log"), &state);
    let engaged = wait_until(Duration::from_secs(30), || {
        disk_throttle(&socket)["iops_wr"].as_u64().unwrap_or(0) > 0
    });
    assert!(engaged, "no QEMU limit on disk0:\n{}", d.log());
    // For 15 s (30 ticks, 10 bursts): QEMU holds the VM at every look, the cgroup never.
    let reads0 = cgroup_reads(&cg_dir, major, minor);
    let limit_line = format!("{major}:{minor} ");
    let cgroup_limited = || {
        ["read", "write"].iter().any(|dir| {
            fs::read_to_string(cg_dir.join(format!("blkio.throttle.{dir}_iops_device")))
                .is_ok_and(|t| t.contains(&limit_line))
        })
    };
    let t0 = Instant::now();
    let mut looks = 0;
    while t0.elapsed() < Duration::from_secs(15) {
        assert!(
            disk_throttle(&socket)["iops_wr"].as_u64().unwrap_or(0) > 0,
            "QEMU let go after {:.1}s:\n{}",
            t0.elapsed().as_secs_f64(),
            d.log()
        );
        assert!(
            !cgroup_limited(),
            "a limit in the shared cgroup after {:.1}s:\n{}",
            t0.elapsed().as_secs_f64(),
            d.log()
        );
        looks += 1;
        sleep(Duration::from_millis(250));
    }
    let burst_reads = cgroup_reads(&cg_dir, major, minor) - reads0;
    let log = d.log();
    eprintln!(
        "short-lived neighbour: {burst_reads} reads charged to {} in 15 s (blkio), QEMU held \
         the VM at all {looks} looks",
        cg_dir.display()
    );
    assert!(
        burst_reads >= 5 * 40,
        "the neighbour's bursts did not reach the cgroup ({burst_reads} reads): the premise \
         does not hold"
    );
    assert!(log.contains("it shares its cgroup"), "{log}");
    assert!(log.contains("is shared: I/O of dd ("), "{log}");
    assert!(!log.contains("QEMU lets go of it"), "{log}");

    // The job stops: after the hold the cgroup is alone, and takes over, each said once.
    drop(neighbour);
    let alone = wait_until(Duration::from_secs(20), cgroup_limited);
    let log = d.log();
    assert!(alone, "the cgroup did not take over:\n{log}");
    sleep(Duration::from_secs(3));
    let log = d.log();
    let count = |s: &str| log.lines().filter(|l| l.contains(s)).count();
    assert_eq!(count("it is not shared any more"), 1, "{log}");
    assert_eq!(
        count("QEMU lets go of it, the cgroup takes over"),
        1,
        "{log}"
    );
    assert_eq!(
        disk_throttle(&socket)["iops_wr"].as_u64(),
        Some(0),
        "QEMU's settings are back"
    );
    d.terminate();
    assert!(!cgroup_limited(), "SIGTERM removes the cgroup limit");
}

/// The qemu of one of overkvm's VMs, from its pidfile.
fn vm_pid(state: &Path, name: &str) -> i32 {
    fs::read_to_string(state.join(name).join("qemu.pid"))
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .expect("the VM's pidfile")
}

/// A VM QEMU holds (host-cached on the v1 host) restarted with `vm stop` and `vm start`: a new
/// qemu, the same name and uuid, the same QMP socket path. The throttle takes it for the same
/// VM: the new qemu's disk is held as soon as its guest writes again (the device stays
/// engaged: `release_ticks` outlasts the restart), the guest is held to the budget by QEMU's
/// count, and nothing of the former qemu stays on record.
#[test]
fn qemu_holds_a_restarted_vm_again() {
    skip_unless_kernel!();
    let test = "qemu_holds_a_restarted_vm_again";
    if let Some(reason) = guest::missing_tools() {
        overkvm_tests::skipped(test, reason);
        return;
    }
    if let Err(reason) = v1_blkio() {
        overkvm_tests::skipped(test, format!("needs cgroup v1 blkio: {reason}"));
        return;
    }
    let fs_ = MountedFs::new(512, "ext4", &[]).expect("ext4 on a loop device");
    let dev = fs_.dev.name();
    let work = TempDir::new("qemu-restart").unwrap();
    let state = fs_.dir.join("vms");
    let name = format!("okr{}", std::process::id());
    let _cleanup = VmCleanup {
        state: state.clone(),
        name: name.clone(),
    };
    let socket = boot_writer(&fs_.dir, work.path(), &state, &name, "writeback");
    sleep(Duration::from_secs(2));
    let free = guest_write_rate(&socket, Duration::from_secs(5));
    let budget = ((free / 4.0).min(300.0)).round();
    eprintln!("guest alone: {free:.0} writes/s (QMP); budget {budget:.0} IOPS on {dev}");
    if budget < 40.0 {
        overkvm_tests::skipped(
            test,
            format!("the guest writes only {free:.0}/s under TCG here: too slow to show a budget"),
        );
        return;
    }
    let config = work.path().join("overkvm.toml");
    let state_file = work.path().join("run/throttle.json");
    fs::write(
        &config,
        format!(
            "[policy]\nstate_file = \"{}\"\nactuator = \"auto\"\nrelease_ticks = 240\n\n\
             [[device]]\ndevice = \"{dev}\"\niops = {budget}\n",
            state_file.display()
        ),
    )
    .unwrap();
    let mut d = Serve::start(&config, &work.path().join("serve-restart.log"), &state);
    assert!(
        wait_until(Duration::from_secs(30), || {
            disk_throttle(&socket)["iops_wr"].as_u64().unwrap_or(0) > 0
        }),
        "no QEMU limit on disk0:\n{}",
        d.log()
    );
    let old_pid = vm_pid(&state, &name);
    let st = state.to_str().unwrap();
    ok(ovk(
        &state,
        &["vm", "stop", &name, "--timeout", "1s", "--state-dir", st],
    ));
    let serial = state.join(&name).join("serial.log");
    let _ = fs::remove_file(&serial);
    ok(ovk(
        &state,
        &["vm", "start", &name, "--accel", "tcg", "--state-dir", st],
    ));
    let new_pid = vm_pid(&state, &name);
    assert_ne!(old_pid, new_pid, "a new qemu");
    assert!(
        wait_until(Duration::from_secs(90), || fs::read_to_string(&serial)
            .is_ok_and(|s| s.contains("WRITING"))),
        "the restarted guest did not write:\n{}",
        fs::read_to_string(&serial).unwrap_or_default()
    );
    let writing = Instant::now();
    let held = wait_until(Duration::from_secs(20), || {
        disk_throttle(&socket)["iops_wr"].as_u64().unwrap_or(0) > 0
    });
    let held_s = writing.elapsed().as_secs_f64();
    assert!(held, "the restarted VM is not held:\n{}", d.log());
    sleep(Duration::from_secs(3));
    let rate = guest_write_rate(&socket, Duration::from_secs(8));
    let stj = status(&config, &state);
    let recorded: Vec<i64> = stj["recorded"]["qemu"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["pid"].as_i64())
        .collect();
    eprintln!(
        "restarted VM (pid {old_pid}, now {new_pid}): held by QEMU {held_s:.1}s after its guest \
         wrote again, iops_wr={}; it wrote {rate:.0}/s (QMP), budget {budget}; on record: pids \
         {recorded:?}",
        disk_throttle(&socket)["iops_wr"]
    );
    assert!(
        rate <= budget * (1.0 + TOLERANCE),
        "the restarted guest wrote {rate:.0}/s, over the budget {budget}:\n{}",
        d.log()
    );
    assert_eq!(recorded, [i64::from(new_pid)], "{stj}");
    d.terminate();
    assert_eq!(
        disk_throttle(&socket)["iops_wr"].as_u64(),
        Some(0),
        "SIGTERM puts the new qemu's disk back"
    );
    let left = fs::read_to_string(&state_file).unwrap_or_default();
    assert!(!left.contains("\"qemu\""), "a record left: {left}");
}
