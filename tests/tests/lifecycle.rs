//! `overkvm-io vm ...` with real guests under TCG: three VMs on overlays of one base image on
//! ext4 on a loop device, started staggered, each running (QMP), named in `top -b --json` with
//! its I/O attributed to its own cgroup, host op counts against QMP `query-blockstats`, a
//! `kill -9` shown as crashed, and stop + destroy leaving nothing behind. Plus bad input, a
//! qemu that dies at start, and boot-storm admission under a device budget.
//!
//! Guests are Debian's 6.1 cloud kernel with the harness's busybox initramfs (`guest.rs`):
//! under TCG on this 2-core VM one boots to its script in about 3 s; three booting together
//! take longer, hence the generous timeouts.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::mpsc,
    thread::sleep,
    time::{Duration, Instant},
};

use overkvm::qemu::{backing::counters_of, limits::DiskRef, qmp::Qmp};
use overkvm_tests::{
    devices::{LoopDevice, MountedFs},
    guest::{self, GuestSpec, TempDir},
    skip_unless_kernel, workspace_bin,
};
use serde_json::Value;

const GUEST_WRITES: u64 = 300;
const GUEST_READS: u64 = 300;

/// `overkvm-io` with arguments, its state directory in `$OVERKVM_STATE_DIR`.
fn ovk(state: &Path, args: &[&str]) -> Output {
    ovk_env(state, args, &[])
}

fn ovk_env(state: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(workspace_bin("overkvm-io"));
    cmd.args(args)
        .env("OVERKVM_STATE_DIR", state)
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("running overkvm-io")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[track_caller]
fn ok(o: Output) -> String {
    let t = text(&o);
    assert!(o.status.success(), "overkvm-io failed ({}):\n{t}", o.status);
    t
}

#[track_caller]
fn fails(o: Output, want: &str) -> String {
    let t = text(&o);
    assert!(!o.status.success(), "overkvm-io should have failed:\n{t}");
    assert!(t.contains(want), "want {want:?} in:\n{t}");
    t
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The block controller's hierarchy (v1 blkio here, v2 io elsewhere).
fn io_root() -> Option<PathBuf> {
    overkvm::host::cgroup::find_io_hierarchy(&overkvm::host::cgroup::host_mounts())
        .map(|h| h.mount_point)
}

fn vm_cgroup_dir(name: &str) -> Option<PathBuf> {
    io_root().map(|r| r.join(format!("overkvm/vm-{name}")))
}

/// Pids of processes whose command line carries `needle` (a VM's UUID).
fn processes_with(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        {
            continue;
        }
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(needle) {
            out.push(pid);
        }
    }
    out
}

fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        sleep(Duration::from_millis(50));
    }
    f()
}

/// Kills whatever the VMs of a state directory left running and removes their cgroups, in
/// every case (a failed assertion included), before the filesystem under them goes.
struct VmCleanup {
    state: PathBuf,
    names: Vec<String>,
}

impl Drop for VmCleanup {
    fn drop(&mut self) {
        for n in &self.names {
            let dir = self.state.join(n);
            let uuid = fs::read_to_string(dir.join("vm.toml")).ok().and_then(|t| {
                t.lines().find_map(|l| {
                    l.strip_prefix("uuid = \"")?
                        .strip_suffix('"')
                        .map(str::to_string)
                })
            });
            if let Some(uuid) = uuid {
                for pid in processes_with(&uuid) {
                    // SAFETY: kill(2) of a qemu this test started (found by its VM's UUID).
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
                wait_until(Duration::from_secs(5), || processes_with(&uuid).is_empty());
            }
            if let Some(cg) = vm_cgroup_dir(n) {
                wait_until(Duration::from_secs(5), || {
                    fs::remove_dir(&cg).is_ok() || !cg.exists()
                });
                // The `overkvm` parent `vm start` made: removed when nothing else uses it, so
                // the host's hierarchy is left as the test found it.
                if let Some(parent) = cg.parent() {
                    let _ = fs::remove_dir(parent);
                }
            }
        }
    }
}

/// `top -b --json` in the background, its lines on a channel.
struct Top {
    child: Child,
    rx: mpsc::Receiver<String>,
    lines: Vec<String>,
}

impl Top {
    fn start() -> Top {
        let mut child = Command::new(workspace_bin("overkvm-io"))
            .args(["top", "-b", "--json", "-d", "1"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting overkvm-io top");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let first = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("first JSON line from top");
        Top {
            child,
            rx,
            lines: vec![first],
        }
    }

    /// Keeps reading for `d`, then stops top and returns every line.
    fn finish(mut self, d: Duration) -> Vec<String> {
        let deadline = Instant::now() + d;
        while Instant::now() < deadline {
            if let Ok(l) = self.rx.recv_timeout(Duration::from_millis(200)) {
                self.lines.push(l);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        while let Ok(l) = self.rx.try_recv() {
            self.lines.push(l);
        }
        std::mem::take(&mut self.lines)
    }
}

impl Drop for Top {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A raw base image full of data (a sparse one would read holes, which never reach the disk).
fn make_base(path: &Path, mib: usize) {
    let mut f = fs::File::create(path).expect("creating the base image");
    let mut block = vec![0u8; 1 << 20];
    for i in 0..mib {
        for (j, b) in block.iter_mut().enumerate() {
            *b = (i * 31 + j * 7) as u8;
        }
        f.write_all(&block).unwrap();
    }
    f.sync_all().unwrap();
}

/// An initramfs whose script does known direct I/O on /dev/vda, says so, and idles (the VM
/// must not power off by itself).
fn io_then_idle_initramfs(work: &Path) -> (PathBuf, PathBuf) {
    let script = format!(
        "dd if=/dev/urandom of=/dev/vda bs=4096 count={GUEST_WRITES} oflag=direct 2>/dev/null || echo IO-FAILED\n\
         dd if=/dev/vda of=/dev/null bs=4096 count={GUEST_READS} iflag=direct 2>/dev/null || echo IO-FAILED\n\
         echo IO-DONE\n\
         while :; do sleep 3600; done\n"
    );
    let spec = GuestSpec {
        disk: Some(PathBuf::from("/dev/vda")),
        script,
        ..GuestSpec::default()
    };
    let initrd = work.join("initrd.cpio");
    let kernel = guest::write_initramfs(&spec, &initrd).expect("building the initramfs");
    (kernel.vmlinuz, initrd)
}

fn create_vm(state: &Path, name: &str, base: &Path, kernel: &Path, initrd: &Path) {
    let out = ok(ovk(
        state,
        &[
            "vm",
            "create",
            name,
            "--base",
            base.to_str().unwrap(),
            "--memory",
            "256",
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--append",
            guest::kernel_args(),
            "--state-dir",
            state.to_str().unwrap(),
        ],
    ));
    assert!(out.contains(&format!("created VM {name}")), "{out}");
}

fn list(state: &Path) -> BTreeMap<String, Value> {
    let out = ovk(state, &["vm", "list", "--json"]);
    let t = ok(out);
    let v: Value = serde_json::from_str(t.lines().next().unwrap_or("")).unwrap_or_else(|e| {
        panic!("vm list --json is not JSON ({e}):\n{t}");
    });
    v.as_array()
        .expect("an array")
        .iter()
        .map(|r| (r["name"].as_str().unwrap().to_string(), r.clone()))
        .collect()
}

fn serial(state: &Path, name: &str) -> String {
    fs::read(state.join(name).join("serial.log"))
        .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
        .unwrap_or_default()
}

fn tools_or_skip(test: &str) -> bool {
    if let Some(reason) = guest::missing_tools() {
        overkvm_tests::skipped(test, &reason);
        return false;
    }
    if Command::new("qemu-img").arg("--version").output().is_err() {
        overkvm_tests::skipped(test, "no qemu-img (apt-get install qemu-utils)");
        return false;
    }
    true
}

#[test]
fn three_guests_staggered_named_counted_and_cleaned_up() {
    skip_unless_kernel!();
    if !tools_or_skip("three_guests_staggered_named_counted_and_cleaned_up") {
        return;
    }
    let fs_ = MountedFs::new(512, "ext4", &[]).expect("ext4 on a loop device");
    let loop_name = fs_.dev.name();
    let work = TempDir::new("lifecycle").unwrap();
    let state = fs_.dir.join("vms");
    let tag = std::process::id();
    let names: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|x| format!("okl{tag}-{x}"))
        .collect();
    let _cleanup = VmCleanup {
        state: state.clone(),
        names: names.clone(),
    };
    let base = fs_.dir.join("base.raw");
    make_base(&base, 64);
    let (kernel, initrd) = io_then_idle_initramfs(work.path());
    for n in &names {
        create_vm(&state, n, &base, &kernel, &initrd);
    }
    assert_eq!(entries(&state), names);

    let top = Top::start();
    let t_start = Instant::now();
    let mut args = vec!["vm", "start"];
    args.extend(names.iter().map(String::as_str));
    args.extend(["--stagger", "1s"]);
    let started = ok(ovk(&state, &args));
    let start_took = t_start.elapsed();
    eprintln!(
        "--- vm start ({:.1}s) ---\n{started}",
        start_took.as_secs_f64()
    );
    assert!(start_took >= Duration::from_secs(2), "stagger 1s for 3 VMs");
    assert!(started.contains("accelerator: tcg"), "{started}");

    // Each is running and QMP answers.
    for n in &names {
        let mut q = Qmp::connect(&state.join(n).join("qmp.sock"), Duration::from_secs(5))
            .expect("QMP connects");
        assert_eq!(q.status().expect("query-status"), "running", "{n}");
    }

    // Boot to the script and through the known I/O.
    let mut booted = BTreeMap::new();
    for n in &names {
        let ok = wait_until(Duration::from_secs(300), || {
            serial(&state, n).contains("IO-DONE")
        });
        let console = serial(&state, n);
        assert!(ok, "{n} did not finish its I/O; console:\n{console}");
        assert!(!console.contains("IO-FAILED"), "{n}:\n{console}");
        booted.insert(n.clone(), t_start.elapsed());
    }
    eprintln!(
        "boot + I/O done after (from vm start): {}",
        booted
            .iter()
            .map(|(n, t)| format!("{n} {:.1}s", t.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut guest_ops = BTreeMap::new();
    for n in &names {
        let mut q = Qmp::connect(&state.join(n).join("qmp.sock"), Duration::from_secs(5)).unwrap();
        let stats = q
            .execute("query-blockstats", None)
            .expect("query-blockstats");
        guest_ops.insert(
            n.clone(),
            counters_of(&stats, &DiskRef::Device("disk0".into())).expect("disk0 in blockstats"),
        );
    }
    let lines = top.finish(Duration::from_secs(3));

    // Every guest is named in top's output, with its I/O charged to its own cgroup.
    let mut host: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
    let mut io_cgroups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in &lines {
        let v: Value = serde_json::from_str(line).expect("one JSON object per line");
        for p in v["processes"].as_array().unwrap() {
            let Some(name) = p["vm"]["name"].as_str() else {
                continue;
            };
            if !names.iter().any(|n| n == name) || p["device"] != loop_name.as_str() {
                continue;
            }
            let e = host.entry(name.to_string()).or_default();
            e.0 += p["read_ops"].as_u64().unwrap();
            e.1 += p["write_ops"].as_u64().unwrap();
            e.2 += p["flush_ops"].as_u64().unwrap() + p["discard_ops"].as_u64().unwrap();
            if let Some(cg) = p["io_cgroup"].as_str() {
                io_cgroups
                    .entry(name.to_string())
                    .or_default()
                    .push(cg.to_string());
            }
        }
    }
    for n in &names {
        let (r, w, other) = host.get(n).copied().unwrap_or_else(|| {
            panic!(
                "{n} is not named in top's output on {loop_name} ({} lines)",
                lines.len()
            )
        });
        let g = guest_ops[n];
        let ratio = (r + w + other) as f64 / g.ops().max(1) as f64;
        eprintln!(
            "{n}: guest issued r={GUEST_READS} w={GUEST_WRITES}; QMP blockstats r={} w={} flush={} \
             (total {}); host {loop_name} r={r} w={w} flush+discard={other}; host/guest ops ratio {ratio:.2}",
            g.rd_operations,
            g.wr_operations,
            g.flush_operations,
            g.ops()
        );
        assert!(
            g.rd_operations >= GUEST_READS && g.wr_operations >= GUEST_WRITES,
            "{n}: {g:?}"
        );
        assert!(w >= GUEST_WRITES, "{n}: host writes {w} < {GUEST_WRITES}");
        assert!(r + w >= GUEST_READS + GUEST_WRITES, "{n}: host ops {r}+{w}");
        let want = format!("/overkvm/vm-{n}");
        let cgs = io_cgroups.get(n).cloned().unwrap_or_default();
        // qemu joined its cgroup before exec: none of its I/O is charged anywhere else.
        assert!(
            !cgs.is_empty() && cgs.iter().all(|c| c == &want),
            "{n}: I/O charged to {cgs:?}, want only {want}"
        );
    }

    // list: all running, with pids and uptimes.
    let l = list(&state);
    for n in &names {
        assert_eq!(l[n]["state"], "running", "{}", l[n]);
        assert!(l[n]["pid"].as_u64().is_some_and(|p| p > 0));
        assert!(l[n]["uptime_s"].as_f64().is_some_and(|u| u > 0.0));
        assert_eq!(l[n]["cgroup"], format!("/overkvm/vm-{n}"));
        assert!(
            l[n]["iops"].is_object(),
            "IOPS measured from the cgroup: {}",
            l[n]
        );
    }

    // overcommit sees the three guests (vCPUs from their "CPU 0/TCG" threads) and the shared base.
    let oc: Value = serde_json::from_str(&ok(ovk(&state, &["overcommit", "--json"]))).unwrap();
    let ours: Vec<&Value> = oc["guests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["overkvm"] == true && names.iter().any(|n| g["name"] == n.as_str()))
        .collect();
    assert_eq!(ours.len(), 3, "{oc}");
    for g in &ours {
        assert_eq!(
            (g["vcpus"].as_u64(), g["vcpu_source"].as_str()),
            (Some(1), Some("threads")),
            "{g}"
        );
        assert_eq!(g["memory_mib"], 256);
    }
    assert_eq!(
        (
            oc["disk"]["overlays"].as_u64(),
            oc["disk"]["bases"].as_u64()
        ),
        (Some(3), Some(1)),
        "{oc}"
    );
    assert_eq!(oc["disk"]["virtual_bytes"], 3 * (64u64 << 20));
    eprintln!("--- overcommit ---\n{}", ok(ovk(&state, &["overcommit"])));

    // kill -9 of one qemu shows as crashed.
    let victim = &names[2];
    let pid = l[victim]["pid"].as_u64().unwrap() as i32;
    // SAFETY: kill(2) of the qemu of VM c, started above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    assert!(wait_until(Duration::from_secs(10), || {
        list(&state)[victim]["state"] == "crashed"
    }));
    let l = list(&state);
    assert_eq!(l[&names[0]]["state"], "running");
    assert_eq!(l[victim]["state"], "crashed");
    assert!(l[victim]["pid"].is_null());
    let table = ok(ovk(&state, &["vm", "list", "--no-iops"]));
    eprintln!("--- vm list ---\n{table}");
    assert!(table.contains("crashed"));

    // destroy refuses a running VM.
    fails(ovk(&state, &["vm", "destroy", &names[0]]), "is running");

    // stop: busybox ignores the ACPI button, so qemu is told to quit after the timeout.
    let t = Instant::now();
    let stopped = ok(ovk(
        &state,
        &["vm", "stop", &names[0], &names[1], "--timeout", "2s"],
    ));
    eprintln!(
        "--- vm stop ({:.1}s) ---\n{stopped}",
        t.elapsed().as_secs_f64()
    );
    assert!(stopped.contains("quit over QMP"), "{stopped}");
    let l = list(&state);
    assert_eq!(l[&names[0]]["state"], "stopped");
    assert_eq!(l[&names[1]]["state"], "stopped");

    let mut args = vec!["vm", "destroy"];
    args.extend(names.iter().map(String::as_str));
    let destroyed = ok(ovk(&state, &args));
    eprintln!("--- vm destroy ---\n{destroyed}");

    // Nothing left: no files, no processes, no cgroups.
    assert_eq!(entries(&state), Vec::<String>::new());
    assert!(base.exists(), "the base image stays");
    for n in &names {
        if let Some(cg) = vm_cgroup_dir(n) {
            assert!(!cg.exists(), "{} left behind", cg.display());
        }
        assert!(
            processes_with(&format!("guest={n},")).is_empty(),
            "a qemu of {n} still runs"
        );
    }
}

#[test]
fn bad_input_is_refused_and_leaves_nothing() {
    if Command::new("qemu-img").arg("--version").output().is_err() {
        overkvm_tests::skipped("bad_input_is_refused_and_leaves_nothing", "no qemu-img");
        return;
    }
    let work = TempDir::new("lifecycle-bad").unwrap();
    let state = work.path().join("vms");
    let base = work.path().join("base.raw");
    fs::write(&base, vec![7u8; 1 << 20]).unwrap();
    let b = base.to_str().unwrap();
    let create = |name: &str, extra: &[&str]| {
        let mut a = vec!["vm", "create", name, "--base", b];
        a.extend(extra);
        ovk(&state, &a)
    };

    fails(create("", &[]), "empty");
    fails(create("a.b", &[]), "'.'");
    fails(create("a/b", &[]), "'/'");
    fails(create("..", &[]), "'.'");
    fails(create(&"x".repeat(65), &[]), "at most 64");
    fails(
        ovk(
            &state,
            &["vm", "create", "nobase", "--base", "/nonexistent.img"],
        ),
        "does not exist",
    );
    fails(
        create("small", &["--disk-size", "512K"]),
        "smaller than the base",
    );
    fails(create("bad", &["--vcpus", "0"]), "0 vCPUs");
    fails(create("bad", &["--disk-size", "12X"]), "not a size");
    fails(
        create("bad", &["--kernel", "/nonexistent/vmlinuz"]),
        "kernel /nonexistent/vmlinuz does not exist",
    );
    let empty_path = work.path().join("empty-path");
    fs::create_dir_all(&empty_path).unwrap();
    fails(
        ovk_env(
            &state,
            &["vm", "create", "noimg", "--base", b],
            &[("PATH", empty_path.to_str().unwrap())],
        ),
        "qemu-img is not installed",
    );
    assert_eq!(
        entries(&state),
        Vec::<String>::new(),
        "nothing half-created"
    );

    // --state-dir beats $OVERKVM_STATE_DIR.
    let other = work.path().join("other");
    let out = ok(create("good", &["--state-dir", other.to_str().unwrap()]));
    assert!(out.contains("created VM good"), "{out}");
    assert_eq!(entries(&other), ["good"]);
    let def = fs::read_to_string(other.join("good/vm.toml")).unwrap();
    assert!(def.contains("base_format = \"raw\""), "{def}");
    fs::remove_dir_all(&other).unwrap();

    ok(create("good", &[]));
    fails(create("good", &[]), "already exists");
    assert_eq!(entries(&state), ["good"]);
    let info = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(state.join("good/disk.qcow2"))
        .output()
        .unwrap();
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["backing-filename-format"], "raw", "{info}");
    assert_eq!(info["virtual-size"], 1 << 20);

    fails(
        ovk(&state, &["vm", "start", "nosuch"]),
        "no VM named \"nosuch\"",
    );
    fails(ovk(&state, &["vm", "start", "good", "good"]), "named twice");
    fails(ovk(&state, &["vm", "stop", "nosuch"]), "no VM named");
    fails(ovk(&state, &["vm", "destroy", "../x"]), "'.'");
    fails(
        ovk_env(
            &state,
            &["vm", "start", "good"],
            &[("PATH", empty_path.to_str().unwrap())],
        ),
        "qemu-system-x86_64 is not installed",
    );
    fails(
        ovk(&state, &["vm", "start", "good", "--stagger", "0"]),
        "out of range",
    );
    fails(ovk(&state, &["vm", "start", "good", "--admit"]), "--device");
    assert_eq!(
        entries(&state.join("good")),
        ["disk.qcow2", "vm.toml"],
        "a refused start leaves nothing"
    );

    let l = list(&state);
    assert_eq!(l["good"]["state"], "stopped");
    assert!(l["good"]["iops"].is_null());
    ok(ovk(&state, &["vm", "stop", "good"]));
    ok(ovk(&state, &["vm", "destroy", "good"]));
    assert_eq!(entries(&state), Vec::<String>::new());
    assert!(base.exists());

    for sub in [
        &["vm", "--help"][..],
        &["vm", "create", "--help"],
        &["vm", "start", "--help"],
        &["vm", "stop", "--help"],
        &["vm", "list", "--help"],
        &["vm", "destroy", "--help"],
        &["overcommit", "--help"],
    ] {
        let t = ok(ovk(&state, sub));
        assert!(t.contains("Usage:") && t.len() > 200, "{sub:?}:\n{t}");
    }
}

#[test]
fn qemu_that_dies_at_start_leaves_nothing() {
    skip_unless_kernel!();
    if !tools_or_skip("qemu_that_dies_at_start_leaves_nothing") {
        return;
    }
    let work = TempDir::new("lifecycle-die").unwrap();
    let state = work.path().join("vms");
    let name = format!("okd{}", std::process::id());
    let _cleanup = VmCleanup {
        state: state.clone(),
        names: vec![name.clone()],
    };
    let base = work.path().join("base.raw");
    fs::write(&base, vec![0u8; 1 << 20]).unwrap();
    ok(ovk(
        &state,
        &["vm", "create", &name, "--base", base.to_str().unwrap()],
    ));
    // A broken overlay: qemu refuses it while it starts.
    fs::write(state.join(&name).join("disk.qcow2"), b"not a qcow2 image").unwrap();
    let out = fails(
        ovk(&state, &["vm", "start", &name]),
        "qemu could not start the VM",
    );
    eprintln!("{out}");
    assert!(out.contains("qcow2"), "qemu's own message is shown:\n{out}");
    let left = entries(&state.join(&name));
    for f in ["qemu.pid", "qmp.sock", "run.json"] {
        assert!(!left.iter().any(|e| e == f), "{f} left behind: {left:?}");
    }
    if let Some(cg) = vm_cgroup_dir(&name) {
        assert!(!cg.exists(), "{} left behind", cg.display());
    }
    assert_eq!(list(&state)[&name]["state"], "stopped");
    ok(ovk(&state, &["vm", "destroy", &name]));
}

#[test]
fn admission_waits_for_room_under_the_budget() {
    skip_unless_kernel!();
    if !tools_or_skip("admission_waits_for_room_under_the_budget") {
        return;
    }
    let busy = LoopDevice::new(64).expect("loop device");
    let busy_name = busy.name();
    let work = TempDir::new("lifecycle-admit").unwrap();
    let state = work.path().join("vms");
    let name = format!("oka{}", std::process::id());
    let _cleanup = VmCleanup {
        state: state.clone(),
        names: vec![name.clone()],
    };
    let base = work.path().join("base.raw");
    make_base(&base, 16);
    let (kernel, initrd) = io_then_idle_initramfs(work.path());
    create_vm(&state, &name, &base, &kernel, &initrd);

    // Direct reads on the device for about 10 s: far above a budget of 500 IOPS.
    let mut load = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "end=$(($(date +%s) + 10)); while [ $(date +%s) -lt $end ]; do \
             dd if={} of=/dev/null bs=4096 count=4000 iflag=direct 2>/dev/null; done",
            busy.path.display()
        ))
        .spawn()
        .expect("load generator");
    sleep(Duration::from_millis(500));
    let t = Instant::now();
    let out = ovk(
        &state,
        &[
            "vm",
            "start",
            &name,
            "--admit",
            "--device",
            &busy_name,
            "--budget",
            "500",
            "--boot-iops",
            "50",
        ],
    );
    let took = t.elapsed();
    let _ = load.wait();
    let out = ok(out);
    eprintln!(
        "--- vm start --admit ({:.1}s) ---\n{out}",
        took.as_secs_f64()
    );
    assert!(
        out.contains(&format!("waiting: {busy_name} at ")),
        "no waiting line while the device is busy:\n{out}"
    );
    let admitted = out.find("admitted: ").expect("admitted line");
    assert!(out.find("waiting: ").unwrap() < admitted);
    assert!(out.contains(&format!("started {name}")));
    assert!(
        took >= Duration::from_secs(3),
        "started only after the load ended"
    );
    assert_eq!(list(&state)[&name]["state"], "running");
    ok(ovk(&state, &["vm", "stop", &name, "--timeout", "1s"]));
    ok(ovk(&state, &["vm", "destroy", &name]));
    assert_eq!(entries(&state), Vec::<String>::new());
}
