//! The throttle on this host's cgroup v1 blkio: three greedy "VMs" (processes named like qemu,
//! with `-name guest=...`), each in its own blkio cgroup, on a loop device whose budget is far
//! below what they can do. The aggregate, as the kernel itself counts it
//! (`blkio.throttle.io_serviced`), must settle within the budget with weighted fair shares;
//! every limit must go when load stops, and a `kill -9` of the daemon must leave nothing stale
//! after a restart.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use overkvm::{cgroupfs, throttle::policy::jain_index};
use overkvm_tests::{devices::LoopDevice, skip_unless_kernel, workspace_bin};

const BUDGET: f64 = 3000.0;

/// Test cgroups under the v1 blkio root, removed (with their processes killed) on drop.
struct TestCgroups {
    root: PathBuf,
    kids: Vec<Child>,
}

impl TestCgroups {
    fn new(blkio: &Path, names: &[&str]) -> TestCgroups {
        let root = blkio.join(format!("overkvm-test-{}", std::process::id()));
        for n in names {
            fs::create_dir_all(root.join(n)).unwrap();
        }
        TestCgroups {
            root,
            kids: Vec::new(),
        }
    }

    fn stop_all(&mut self) {
        for k in &mut self.kids {
            let _ = k.kill();
            let _ = k.wait();
        }
        self.kids.clear();
    }
}

impl Drop for TestCgroups {
    fn drop(&mut self) {
        self.stop_all();
        if let Ok(entries) = fs::read_dir(&self.root) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = fs::remove_dir(e.path());
                }
            }
        }
        let _ = fs::remove_dir(&self.root);
    }
}

/// Starts a greedy direct-read generator that looks like a qemu VM named `name`, in `cgroup`.
fn greedy_vm(bin_dir: &Path, dev: &Path, name: &str, cgroup_dir: &Path, region: u64) -> Child {
    let qemu = bin_dir.join("qemu-system-x86_64");
    if !qemu.exists() {
        fs::copy(workspace_bin("iogen"), &qemu).unwrap();
    }
    // iogen reads its first 7 arguments and ignores the rest: the qemu-style ones are for
    // overkvm's identity code.
    let child = Command::new(&qemu)
        .arg(dev)
        .args(["100000000", "0", "4096"])
        .arg((region * (16 << 20)).to_string())
        .arg((16u64 << 20).to_string())
        .arg((region + 1).to_string())
        .args(["-name", &format!("guest={name},debug-threads=on"), "-uuid"])
        .arg(format!("00000000-0000-4000-8000-00000000000{region}"))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    fs::write(cgroup_dir.join("cgroup.procs"), child.id().to_string()).unwrap();
    child
}

/// Read ops of a v1 cgroup on a device, as blkio counts them.
fn serviced(cgroup_dir: &Path, major: u32, minor: u32) -> u64 {
    let text =
        fs::read_to_string(cgroup_dir.join("blkio.throttle.io_serviced")).unwrap_or_default();
    let want = format!("{major}:{minor} Total ");
    text.lines()
        .find_map(|l| l.strip_prefix(&want).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

/// True when any of the cgroups has a limit line for the device.
fn any_limit(dirs: &[PathBuf], major: u32, minor: u32) -> bool {
    let want = format!("{major}:{minor} ");
    dirs.iter().any(|d| {
        ["read_iops", "write_iops", "read_bps", "write_bps"]
            .iter()
            .any(|f| {
                fs::read_to_string(d.join(format!("blkio.throttle.{f}_device")))
                    .unwrap_or_default()
                    .lines()
                    .any(|l| l.starts_with(&want))
            })
    })
}

struct Daemon(Child);

impl Daemon {
    /// Starts the daemon and waits until its throttle is up (leftovers reconciled).
    fn start(config: &Path, log_path: &Path) -> Daemon {
        let d = Daemon::spawn(config, log_path);
        let ready = wait_until(Duration::from_secs(20), || {
            fs::read_to_string(log_path).is_ok_and(|l| l.contains("throttling 1 device"))
        });
        assert!(
            ready,
            "daemon not ready:\n{}",
            fs::read_to_string(log_path).unwrap_or_default()
        );
        d
    }

    fn spawn(config: &Path, log: &Path) -> Daemon {
        let log = fs::File::create(log).unwrap();
        Daemon(
            Command::new(workspace_bin("overkvm-io"))
                .args(["serve", "--listen", "127.0.0.1:0", "-i", "0.5", "--config"])
                .arg(config)
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    }

    fn kill9(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        std::mem::forget(self);
    }

    fn terminate(mut self) -> std::process::ExitStatus {
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let st = self.0.wait().unwrap();
        std::mem::forget(self);
        st
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    f()
}

#[test]
fn v1_budget_is_held_with_weighted_fair_shares_and_released() {
    skip_unless_kernel!();
    let Some(h) = cgroupfs::find_io_hierarchy(&cgroupfs::host_mounts()) else {
        eprintln!("SKIPPED: no block cgroup controller mounted");
        return;
    };
    if h.controller != cgroupfs::IoController::V1 {
        eprintln!(
            "SKIPPED: this host's block controller is cgroup v2 (io.max is tested in the guest test)"
        );
        return;
    }
    let lo = LoopDevice::new(256).unwrap();
    let (major, minor) = (lo.dev() >> 20, lo.dev() & 0xfffff);
    let names = ["vmA", "vmB", "vmC"];
    let mut cgs = TestCgroups::new(&h.mount_point, &names);
    let dirs: Vec<PathBuf> = names.iter().map(|n| cgs.root.join(n)).collect();
    let tmp = std::env::temp_dir().join(format!("overkvm-throttle-{}", std::process::id()));
    fs::create_dir_all(&tmp).unwrap();
    let state = tmp.join("state/throttle.json");
    let config = tmp.join("overkvm.toml");
    fs::write(
        &config,
        format!(
            "[policy]\nstate_file = \"{}\"\nrelease_ticks = 6\n\n[[device]]\ndevice = \"{}\"\niops = {BUDGET}\n\n[[vm]]\nname = \"vmA\"\nweight = 2\n",
            state.display(),
            lo.name()
        ),
    )
    .unwrap();
    let log = tmp.join("daemon.log");
    let daemon = Daemon::start(&config, &log);
    std::thread::sleep(Duration::from_millis(800));

    let start_vms = |cgs: &mut TestCgroups| {
        for (i, n) in names.iter().enumerate() {
            let child = greedy_vm(&tmp, &lo.path, n, &dirs[i], i as u64);
            cgs.kids.push(child);
        }
    };
    start_vms(&mut cgs);
    let engaged_at = Instant::now();
    let engaged = wait_until(Duration::from_secs(10), || any_limit(&dirs, major, minor));
    let engage_s = engaged_at.elapsed().as_secs_f64();
    assert!(
        engaged,
        "no limit written within 10 s; daemon log:\n{}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    // Let the controller settle, then measure over a window as the kernel counts.
    std::thread::sleep(Duration::from_secs(6));
    let before: Vec<u64> = dirs.iter().map(|d| serviced(d, major, minor)).collect();
    let window = Duration::from_secs(5);
    std::thread::sleep(window);
    let after: Vec<u64> = dirs.iter().map(|d| serviced(d, major, minor)).collect();
    let rates: Vec<f64> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| (a - b) as f64 / window.as_secs_f64())
        .collect();
    let total: f64 = rates.iter().sum();
    let jain_equal = jain_index(&rates[1..]);
    eprintln!(
        "engaged after {engage_s:.1}s; steady rates A={:.0} B={:.0} C={:.0} total={total:.0} ({:.1}% of budget {BUDGET}); \
         A/B={:.2} (weight 2); Jain(B,C)={jain_equal:.3}",
        rates[0],
        rates[1],
        rates[2],
        100.0 * total / BUDGET,
        rates[0] / rates[1].max(1.0)
    );
    assert!(
        total <= BUDGET * 1.05,
        "aggregate {total:.0} over budget {BUDGET}"
    );
    assert!(
        total >= BUDGET * 0.6,
        "aggregate {total:.0} far below budget: over-throttled"
    );
    assert!(
        jain_equal >= 0.95,
        "equal-weight guests not fair: {rates:?}"
    );
    let ratio = rates[0] / rates[1].max(1.0);
    assert!(
        (1.5..=2.6).contains(&ratio),
        "weight-2 guest got {ratio:.2}x, not ~2x: {rates:?}"
    );

    // A VM vanishes and its cgroup is removed under the service: it carries on.
    let mut victim = cgs.kids.pop().unwrap();
    let _ = victim.kill();
    let _ = victim.wait();
    let _ = fs::remove_dir(&dirs[2]);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        any_limit(&dirs[..2], major, minor),
        "the remaining VMs stay limited after one vanished"
    );

    // Load stops: every limit goes.
    cgs.stop_all();
    let stopped = Instant::now();
    let released = wait_until(Duration::from_secs(30), || !any_limit(&dirs, major, minor));
    let release_s = stopped.elapsed().as_secs_f64();
    assert!(
        released,
        "limits still set 30 s after load stopped:\n{}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    eprintln!("released {release_s:.1}s after the load stopped");
    // `cargo xtask bench throttle` runs this test and reports these figures.
    if let Some(out) = std::env::var_os("OVERKVM_BENCH_OUT") {
        let min_share = rates.iter().cloned().fold(f64::MAX, f64::min);
        let figures = serde_json::json!({
            "budget_iops": BUDGET,
            "engage_s": engage_s,
            "steady_total_iops": total,
            "steady_pct_of_budget": 100.0 * total / BUDGET,
            "rates": rates,
            "weights": [2, 1, 1],
            "jain_equal_weight": jain_equal,
            "weighted_ratio": ratio,
            "min_share_iops": min_share,
            "floor_iops": 20,
            "release_s": release_s,
        });
        fs::write(out, figures.to_string()).unwrap();
    }

    // Engage again, kill -9 the daemon, stop the load, restart: nothing stale may remain.
    fs::create_dir_all(&dirs[2]).unwrap();
    start_vms(&mut cgs);
    assert!(wait_until(Duration::from_secs(10), || any_limit(
        &dirs, major, minor
    )));
    daemon.kill9();
    cgs.stop_all();
    assert!(
        any_limit(&dirs, major, minor),
        "a killed daemon leaves its limits (until restart)"
    );
    let daemon = Daemon::start(&config, &tmp.join("daemon2.log"));
    let clean = wait_until(Duration::from_secs(5), || !any_limit(&dirs, major, minor));
    assert!(
        clean,
        "stale limits after restart:\n{}",
        fs::read_to_string(tmp.join("daemon2.log")).unwrap_or_default()
    );
    let st = daemon.terminate();
    assert!(st.success(), "daemon exit on SIGTERM: {st}");
    assert!(
        !state.exists()
            || fs::read_to_string(&state)
                .unwrap()
                .contains("\"limits\": []")
    );
    drop(cgs);
    let _ = fs::remove_dir_all(&tmp);
}

/// `kill -9` of the daemon at random moments while it throttles, 20 times: after each restart no
/// stale limit remains.
#[test]
fn v1_kill9_at_random_moments_leaves_nothing_stale() {
    skip_unless_kernel!();
    let Some(h) = cgroupfs::find_io_hierarchy(&cgroupfs::host_mounts()) else {
        eprintln!("SKIPPED: no block cgroup controller mounted");
        return;
    };
    if h.controller != cgroupfs::IoController::V1 {
        eprintln!(
            "SKIPPED: this host's block controller is cgroup v2 (io.max is tested in the guest test)"
        );
        return;
    }
    let lo = LoopDevice::new(128).unwrap();
    let (major, minor) = (lo.dev() >> 20, lo.dev() & 0xfffff);
    let names = ["vmA", "vmB"];
    let mut cgs = TestCgroups::new(&h.mount_point, &names);
    let dirs: Vec<PathBuf> = names.iter().map(|n| cgs.root.join(n)).collect();
    let tmp = std::env::temp_dir().join(format!("overkvm-kill9-{}", std::process::id()));
    fs::create_dir_all(&tmp).unwrap();
    let state = tmp.join("state/throttle.json");
    let config = tmp.join("overkvm.toml");
    fs::write(
        &config,
        format!(
            "[policy]\nstate_file = \"{}\"\nengage_ticks = 1\n\n[[device]]\ndevice = \"{}\"\niops = 1000\n",
            state.display(),
            lo.name()
        ),
    )
    .unwrap();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut engaged_kills = 0;
    for round in 0..20 {
        for (i, n) in names.iter().enumerate() {
            let child = greedy_vm(&tmp, &lo.path, n, &dirs[i], i as u64);
            cgs.kids.push(child);
        }
        let daemon = Daemon::start(&config, &tmp.join("daemon.log"));
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        // Somewhere between start-up and well into throttling.
        std::thread::sleep(Duration::from_millis(300 + seed % 2500));
        if any_limit(&dirs, major, minor) {
            engaged_kills += 1;
        }
        daemon.kill9();
        cgs.stop_all();
        let restarted = Daemon::start(&config, &tmp.join("daemon-restart.log"));
        let clean = wait_until(Duration::from_secs(5), || !any_limit(&dirs, major, minor));
        assert!(
            clean,
            "round {round}: stale limits after restart:\n{}",
            fs::read_to_string(tmp.join("daemon-restart.log")).unwrap_or_default()
        );
        assert!(restarted.terminate().success());
    }
    eprintln!(
        "20 kill -9 rounds, {engaged_kills} while limits were in place: no stale limit after any restart"
    );
    assert!(
        engaged_kills >= 5,
        "too few kills hit an engaged throttle to mean anything"
    );
    drop(cgs);
    let _ = fs::remove_dir_all(&tmp);
}
