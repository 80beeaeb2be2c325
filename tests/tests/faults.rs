//! Faults under the throttling daemon: a state directory it cannot write (not a directory,
//! full, read-only), a throttled device detached mid-run, VMs killed while their limits change,
//! tracefs unmounted under it. Each is logged once, shown, and the daemon carries on.

use std::{
    fs,
    io::Read as _,
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use overkvm_tests::{
    serving::{self, Mount, Serve, TempDir},
    skip_unless_kernel,
    throttling::{
        Daemon, V1Scenario, any_limit, cgroup_tree, greedy_vm, remove_cgroup, serviced, v1_limits,
        wait_until, write_config,
    },
};

/// GET /metrics from the daemon's log-announced address; true on a 200 with a body.
fn metrics_answer(log: &std::path::Path) -> bool {
    let text = fs::read_to_string(log).unwrap_or_default();
    let Some(addr) = text
        .lines()
        .find_map(|l| l.split("metrics on http://").nth(1))
        .and_then(|r| r.strip_suffix("/metrics"))
    else {
        return false;
    };
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.starts_with("HTTP/1.1 200") && out.contains("overkvm_")
}

/// After a state-saving fault: the daemon still runs, no cgroup in `dirs` got a limit (none can
/// be recorded), and the failure was logged exactly once. Returns the log.
fn carries_on_unlimited_logged_once(
    daemon: &mut Daemon,
    dirs: &[PathBuf],
    (major, minor): (u32, u32),
    log: &Path,
) -> String {
    assert!(
        daemon.0.try_wait().unwrap().is_none(),
        "the daemon carries on"
    );
    assert!(
        !any_limit(dirs, major, minor),
        "a limit was written that is not on record"
    );
    let text = fs::read_to_string(log).unwrap();
    let n = text.matches("cannot save throttle state").count();
    assert_eq!(n, 1, "logged once:\n{text}");
    text
}

#[test]
fn unwritable_state_file_means_no_unrecorded_limit_and_one_log_line() {
    skip_unless_kernel!();
    let blkio = overkvm_tests::v1_blkio_or_skip!();
    let V1Scenario {
        lo,
        major,
        minor,
        mut cgs,
        dirs,
    } = V1Scenario::new(&blkio, 64, &["vmA"]);
    let tmp = TempDir::new("faults");
    let config = tmp.join("c.toml");
    // A path under a regular file can never be created (ENOTDIR), even by root.
    write_config(
        &config,
        std::path::Path::new("/proc/version/overkvm/throttle.json"),
        "engage_ticks = 1\n",
        &lo.name(),
        500,
        "",
    );
    let log = tmp.join("d.log");
    let mut daemon = Daemon::start(&config, &log);
    let child = greedy_vm(&tmp.0, &lo.path, "vmA", &dirs[0], 0);
    cgs.kids.push(child);
    std::thread::sleep(Duration::from_secs(4));
    carries_on_unlimited_logged_once(&mut daemon, &dirs, (major, minor), &log);
    eprintln!("state file unwritable: 1 log line, no limit written");
    assert!(metrics_answer(&log), "metrics still served");
    cgs.stop_all();
    assert!(daemon.terminate().success());
}

#[test]
fn throttled_device_detached_mid_run() {
    skip_unless_kernel!();
    let blkio = overkvm_tests::v1_blkio_or_skip!();
    let V1Scenario {
        lo,
        major,
        minor,
        mut cgs,
        dirs,
    } = V1Scenario::new(&blkio, 64, &["vmA", "vmB"]);
    let tmp = TempDir::new("detach");
    let config = tmp.join("c.toml");
    write_config(
        &config,
        &tmp.join("state/throttle.json"),
        "engage_ticks = 1\n",
        &lo.name(),
        800,
        "",
    );
    let log = tmp.join("d.log");
    let mut daemon = Daemon::start(&config, &log);
    for (i, n) in ["vmA", "vmB"].iter().enumerate() {
        let child = greedy_vm(&tmp.0, &lo.path, n, &dirs[i], i as u64);
        cgs.kids.push(child);
    }
    assert!(
        wait_until(Duration::from_secs(10), || any_limit(&dirs, major, minor)),
        "engaged"
    );
    // Detach the device under the running daemon (the guests die with their disk).
    cgs.stop_all();
    let st = Command::new("losetup")
        .arg("-d")
        .arg(&lo.path)
        .status()
        .unwrap();
    assert!(st.success());
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        daemon.0.try_wait().unwrap().is_none(),
        "the daemon carries on after the device went away"
    );
    assert!(metrics_answer(&log), "metrics still served");
    let st = daemon.terminate();
    assert!(
        st.success(),
        "clean exit: {st}\n{}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    eprintln!(
        "detached mid-run: daemon alive and serving; log tail:\n{}",
        fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .rev()
            .take(4)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The daemon's status file (its last tick's throttle view), if readable.
fn status(state_dir: &Path) -> Option<serde_json::Value> {
    serde_json::from_slice(&fs::read(state_dir.join("status.json")).ok()?).ok()
}

/// Path of a test cgroup as the daemon names it (relative to the blkio mount).
fn cg_name(blkio: &Path, dir: &Path) -> String {
    format!("/{}", dir.strip_prefix(blkio).unwrap().display())
}

/// Lines of a log that mention a cgroup path (followed by anything but more path).
fn lines_naming(log: &str, cgroup: &str) -> usize {
    log.lines()
        // Decision lines ("VM x on loop1: limited to ... in CGROUP", "...: limit removed")
        // name the cgroup while it lives; what is counted here is what is said of it after.
        .filter(|l| !l.contains(": limit"))
        .filter(|l| {
            l.match_indices(cgroup).any(|(i, _)| {
                !l[i + cgroup.len()..]
                    .starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_' || c == '/')
            })
        })
        .count()
}

fn warnings(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains(" WARN ") || l.contains("[WARN"))
        .count()
}

fn next_rand(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// Greedy VMs under an engaged throttle whose limits keep changing (VMs come and go, so every
/// share moves), one of them `kill -9`ed at random moments and its cgroup removed as libvirt
/// would, then restarted under a new cgroup. The daemon carries on, notes each vanished cgroup
/// at most once, the living VMs carry exactly the limits the daemon says, nothing stale stays
/// on record, and after the daemon stops no limit remains anywhere.
#[test]
fn vms_killed_while_their_limits_change() {
    skip_unless_kernel!();
    let blkio = overkvm_tests::v1_blkio_or_skip!();
    const BUDGET: f64 = 900.0;
    let V1Scenario {
        lo,
        major,
        minor,
        mut cgs,
        dirs,
    } = V1Scenario::new(&blkio, 128, &["vmA", "vmB_000", "vmC_000"]);
    let tmp = TempDir::new("vmkill");
    let state_dir = tmp.join("state");
    let config = tmp.join("c.toml");
    write_config(
        &config,
        &state_dir.join("throttle.json"),
        "engage_ticks = 1\ndeadband = 0.0\n",
        &lo.name(),
        BUDGET,
        "",
    );
    let log = tmp.join("d.log");
    let mut daemon = Daemon::start(&config, &log);
    let addr = serving::wait_serving(&log, 1.0, Duration::from_secs(10)).expect("metrics");
    // kids[i] runs in live[i]; index 0 is vmA, never killed.
    let names = ["vmA", "vmB", "vmC"];
    let mut live: Vec<PathBuf> = dirs.clone();
    for (i, n) in names.iter().enumerate() {
        let child = greedy_vm(&tmp.0, &lo.path, n, &live[i], i as u64);
        cgs.kids.push(child);
    }
    assert!(
        wait_until(Duration::from_secs(10), || any_limit(&live, major, minor)),
        "never engaged:\n{}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    let decisions = |addr| {
        serving::scrape(addr)
            .and_then(|b| serving::metric(&b, "overkvm_throttle_decisions_total"))
            .unwrap_or(0.0)
    };
    let decisions_before = decisions(addr);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(std::process::id());
    let (mut kills, mut kills_limited) = (0, 0);
    let mut dead: Vec<String> = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(24) {
        std::thread::sleep(Duration::from_millis(200 + next_rand(&mut seed) % 1300));
        let v = 1 + (next_rand(&mut seed) % 2) as usize;
        if v1_limits(&live[v], major, minor)
            .iter()
            .any(Option::is_some)
        {
            kills_limited += 1;
        }
        let _ = cgs.kids[v].kill();
        let _ = cgs.kids[v].wait();
        kills += 1;
        assert!(
            remove_cgroup(&live[v]),
            "cannot remove {}",
            live[v].display()
        );
        dead.push(cg_name(&blkio, &live[v]));
        live[v] = cgs.root.join(format!("{}_{kills:03}", names[v]));
        fs::create_dir(&live[v]).unwrap();
        cgs.kids[v] = greedy_vm(&tmp.0, &lo.path, names[v], &live[v], v as u64);
        assert!(
            daemon.0.try_wait().unwrap().is_none(),
            "daemon died after {kills} kills:\n{}",
            fs::read_to_string(&log).unwrap_or_default()
        );
    }
    let decisions_during = decisions(addr) - decisions_before;
    // Settle, then the log must be quiet: nothing is logged per tick.
    std::thread::sleep(Duration::from_secs(3));
    let text = fs::read_to_string(&log).unwrap();
    let warned = warnings(&text);
    std::thread::sleep(Duration::from_secs(3));
    let text = fs::read_to_string(&log).unwrap();
    assert_eq!(
        warnings(&text),
        warned,
        "warnings keep coming after the kills stopped:\n{text}"
    );
    for w in text
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains("[WARN"))
        .take(5)
    {
        eprintln!("  daemon warned: {w}");
    }
    let per_dead: Vec<usize> = dead.iter().map(|c| lines_naming(&text, c)).collect();
    let noted = per_dead.iter().filter(|n| **n > 0).count();
    assert!(
        noted >= kills_limited * 9 / 10,
        "only {noted} of {kills_limited} kills of a limited VM were logged:\n{text}"
    );
    assert!(
        per_dead.iter().all(|n| *n <= 1),
        "a vanished cgroup logged more than once ({per_dead:?}):\n{text}"
    );

    // The living VMs carry exactly the limits the daemon reports, and they hold the budget.
    let mut mismatch = String::new();
    let consistent = wait_until(Duration::from_secs(10), || {
        let Some(st) = status(&state_dir) else {
            return false;
        };
        let limits = st["limits"].as_array().cloned().unwrap_or_default();
        mismatch.clear();
        for d in &live {
            let name = cg_name(&blkio, d);
            let want = limits
                .iter()
                .find(|l| l["cgroup"] == name.as_str())
                .map(|l| {
                    ["riops", "wiops", "rbps", "wbps"].map(|k| l[k].as_u64().filter(|v| *v > 0))
                })
                .unwrap_or([None; 4]);
            let got = v1_limits(d, major, minor);
            if want != got {
                mismatch += &format!("{name}: daemon says {want:?}, kernel has {got:?}\n");
            }
        }
        mismatch.is_empty() && !limits.is_empty()
    });
    assert!(
        consistent,
        "limits of the living VMs differ from the daemon's view:\n{mismatch}\n{}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    let before: Vec<u64> = live.iter().map(|d| serviced(d, major, minor)).collect();
    std::thread::sleep(Duration::from_secs(3));
    let total: f64 = live
        .iter()
        .zip(&before)
        .map(|(d, b)| (serviced(d, major, minor) - b) as f64 / 3.0)
        .sum();
    let recorded: serde_json::Value =
        serde_json::from_slice(&fs::read(state_dir.join("throttle.json")).unwrap()).unwrap();
    let stale: Vec<String> = recorded["limits"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["cgroup"].as_str())
        .filter(|c| !blkio.join(c.trim_start_matches('/')).exists())
        .map(str::to_string)
        .collect();
    eprintln!(
        "{kills} kill -9 ({kills_limited} of a limited VM) in 24 s; {decisions_during} limit decisions meanwhile; \
         {noted} vanished cgroups logged (each at most once), {warned} warnings in all; \
         afterwards {total:.0} IOPS for a budget of {BUDGET}"
    );
    assert!(
        kills >= 10 && kills_limited >= 3,
        "too few kills to mean anything"
    );
    assert!(decisions_during >= 5.0, "limits were not being changed");
    assert!(
        stale.is_empty(),
        "limits of vanished cgroups still on record: {stale:?}\n{}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(
        total <= BUDGET * 1.10,
        "{total:.0} IOPS over the budget {BUDGET}; daemon view {}\n{}",
        status(&state_dir).unwrap_or_default(),
        fs::read_to_string(&log).unwrap_or_default()
    );

    let st = daemon.terminate();
    assert!(st.success(), "exit: {st}");
    let left: Vec<PathBuf> = cgroup_tree(&cgs.root)
        .into_iter()
        .filter(|d| v1_limits(d, major, minor).iter().any(Option::is_some))
        .collect();
    assert!(left.is_empty(), "limits left after stop: {left:?}");
    cgs.stop_all();
}

/// Fills `dir` with one file until its filesystem is full.
fn fill(dir: &Path) -> PathBuf {
    let p = dir.join("filler");
    let mut f = fs::File::create(&p).unwrap();
    let chunk = vec![0xa5u8; 4096];
    loop {
        match f.write_all(&chunk) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", dir.display()),
        }
    }
    let _ = f.sync_all();
    p
}

fn metric_of(addr: std::net::SocketAddr, series: &str) -> Option<f64> {
    serving::scrape(addr).and_then(|b| serving::metric(&b, series))
}

/// The state directory on a full filesystem (ENOSPC), then read-only (EROFS): a limit that
/// cannot be recorded is never written, each episode is logged once and counted in
/// `overkvm_throttle_problems`, no temporary file is left behind, and once the directory is
/// writable again recording and limiting resume without a restart.
#[test]
fn full_or_read_only_state_directory() {
    skip_unless_kernel!();
    let blkio = overkvm_tests::v1_blkio_or_skip!();
    let V1Scenario {
        lo,
        major,
        minor,
        mut cgs,
        dirs,
    } = V1Scenario::new(&blkio, 64, &["vmA", "vmB"]);
    let tmp = TempDir::new("statefull");
    let mnt = match Mount::new("tmpfs", "size=64k,mode=0700", &tmp.join("state")) {
        Ok(m) => m,
        Err(e) => {
            overkvm_tests::skipped(module_path!(), format!("cannot mount a tmpfs: {e:#}"));
            return;
        }
    };
    let config = tmp.join("c.toml");
    write_config(
        &config,
        &mnt.path.join("throttle.json"),
        "engage_ticks = 1\n",
        &lo.name(),
        500,
        "",
    );
    let filler = fill(&mnt.path);
    let log = tmp.join("d.log");
    let mut daemon = Daemon::start(&config, &log);
    let addr = serving::wait_serving(&log, 1.0, Duration::from_secs(10)).expect("metrics");
    let mut live = dirs.clone();
    for (i, n) in ["vmA", "vmB"].iter().enumerate() {
        let child = greedy_vm(&tmp.0, &lo.path, n, &live[i], i as u64);
        cgs.kids.push(child);
    }
    let engaged = format!("overkvm_throttle_engaged{{device=\"{}\"}}", lo.name());
    assert!(
        wait_until(Duration::from_secs(10), || metric_of(addr, &engaged)
            == Some(1.0)),
        "the throttle never wanted to limit:\n{}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    std::thread::sleep(Duration::from_secs(3));
    let text = carries_on_unlimited_logged_once(&mut daemon, &live, (major, minor), &log);
    let full_lines = 1;
    assert!(
        text.contains("No space left on device"),
        "the log says why:\n{text}"
    );
    let problems_full = metric_of(addr, "overkvm_throttle_problems").unwrap_or(0.0);
    assert!(
        problems_full >= 1.0,
        "not reflected in overkvm_throttle_problems"
    );
    let leftovers: Vec<String> = fs::read_dir(&mnt.path)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "filler")
        .collect();
    assert!(
        leftovers.is_empty(),
        "files left in the full state directory: {leftovers:?}"
    );

    // Space again: recording and limiting resume, the problem goes away.
    fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    assert!(
        wait_until(Duration::from_secs(10), || any_limit(&live, major, minor)),
        "no limit after space came back:\n{}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    let resumed_s = freed.elapsed().as_secs_f64();
    assert!(
        wait_until(Duration::from_secs(10), || metric_of(
            addr,
            "overkvm_throttle_problems"
        ) == Some(0.0)),
        "problem still shown after recovery"
    );
    let recorded = fs::read_to_string(mnt.path.join("throttle.json")).unwrap();
    for d in &live {
        if v1_limits(d, major, minor).iter().any(Option::is_some) {
            assert!(
                recorded.contains(&format!("\"{}\"", cg_name(&blkio, d))),
                "{} limited but not on record:\n{recorded}",
                d.display()
            );
        }
    }

    // Read-only: a VM restarted under a new cgroup cannot be recorded, so it is not limited.
    mnt.remount("ro").unwrap();
    let _ = cgs.kids[1].kill();
    let _ = cgs.kids[1].wait();
    assert!(remove_cgroup(&live[1]));
    live[1] = cgs.root.join("vmB_2");
    fs::create_dir(&live[1]).unwrap();
    cgs.kids[1] = greedy_vm(&tmp.0, &lo.path, "vmB", &live[1], 1);
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        daemon.0.try_wait().unwrap().is_none(),
        "the daemon carries on"
    );
    let unrecorded = v1_limits(&live[1], major, minor);
    let text = fs::read_to_string(&log).unwrap();
    let ro_lines = text.matches("cannot save throttle state").count() - full_lines;
    let problems_ro = metric_of(addr, "overkvm_throttle_problems").unwrap_or(0.0);
    mnt.remount("rw").unwrap();
    assert_eq!(
        unrecorded, [None; 4],
        "a limit was written that is not on record (state dir read-only)"
    );
    assert!(
        text.contains("Read-only file system"),
        "the log says why:\n{text}"
    );
    assert_eq!(ro_lines, 1, "read-only episode logged once:\n{text}");
    assert!(problems_ro >= 1.0, "read-only not reflected in metrics");
    let rw = Instant::now();
    assert!(
        wait_until(Duration::from_secs(10), || v1_limits(
            &live[1], major, minor
        )
        .iter()
        .any(Option::is_some)),
        "the new VM is not limited once the directory is writable:\n{}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    let resumed_rw_s = rw.elapsed().as_secs_f64();
    eprintln!(
        "state dir full: {full_lines} log line, problems={problems_full}, no limit written; limiting {resumed_s:.1}s after space came back; \
         read-only: {ro_lines} log line, problems={problems_ro}, new VM unlimited; limited {resumed_rw_s:.1}s after remount rw"
    );
    assert!(daemon.terminate().success());
    assert!(!any_limit(&live, major, minor), "limits left after stop");
    cgs.stop_all();
    drop(mnt);
}

/// tracefs unmounted while the daemon runs: it attaches through BTF and keeps nothing open
/// there, so it goes on counting a VM's I/O exactly and serving metrics.
#[test]
fn tracefs_unmounted_after_start() {
    skip_unless_kernel!();
    let tmp = TempDir::new("tracefs");
    let system = Path::new("/sys/kernel/tracing");
    let system_had_it = serving::mounted_at(system, "tracefs");
    // Only ever unmount what this test mounted.
    let where_ = if system_had_it {
        tmp.join("tracing")
    } else {
        system.to_path_buf()
    };
    let mut mnt = match Mount::new("tracefs", "", &where_) {
        Ok(m) => m,
        Err(e) => {
            overkvm_tests::skipped(module_path!(), format!("cannot mount tracefs: {e:#}"));
            return;
        }
    };
    let lo = overkvm_tests::devices::LoopDevice::new(64).unwrap();
    let mut daemon = Serve::start(&tmp.join("d.log"), &[]);
    let pid = daemon.child.id();
    let open_in_tracefs: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| fs::read_link(e.path()).ok())
        .filter(|t| t.starts_with(&mnt.path))
        .map(|t| t.display().to_string())
        .collect();
    mnt.unmount()
        .expect("unmounting our tracefs (is something holding it?)");
    assert!(
        open_in_tracefs.is_empty(),
        "the daemon holds tracefs files: {open_in_tracefs:?}"
    );
    let vm = format!("trace-{}", std::process::id());
    let (reads, writes) = (1500, 700);
    let mut guest = serving::counted_vm(&tmp.0, &lo.path, &vm, reads, writes, 0, 32 << 20);
    let dev = lo.name();
    let mut got = (None, None);
    let exact = wait_until(Duration::from_secs(15), || {
        let b = serving::scrape(daemon.addr).unwrap_or_default();
        got = (
            serving::vm_ops(&b, &vm, &dev, "read"),
            serving::vm_ops(&b, &vm, &dev, "write"),
        );
        got == (Some(reads as f64), Some(writes as f64))
    });
    let _ = guest.kill();
    let _ = guest.wait();
    assert!(daemon.alive(), "daemon died:\n{}", daemon.log_text());
    assert!(
        exact,
        "after tracefs went: VM counted {got:?}, issued ({reads}, {writes})"
    );
    eprintln!(
        "tracefs {} unmounted after start: daemon alive, held no tracefs file, counted {reads} reads and {writes} writes exactly",
        mnt.path.display()
    );
    if system_had_it {
        eprintln!(
            "note: the system's tracefs at {} stayed mounted (not ours to unmount); only a second \
             instance went away, so this run shows the daemon holds no tracefs file, not that it \
             runs with none mounted",
            system.display()
        );
    }
    assert!(daemon.terminate().is_some_and(|s| s.success()));
}
