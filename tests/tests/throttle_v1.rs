//! The throttle on this host's cgroup v1 blkio: three greedy "VMs" (processes named like qemu,
//! with `-name guest=...`), each in its own blkio cgroup, on a loop device whose budget is far
//! below what they can do. The aggregate, as the kernel itself counts it
//! (`blkio.throttle.io_serviced`), must settle within the budget with weighted fair shares;
//! every limit must go when load stops, and a `kill -9` of the daemon must leave nothing stale
//! after a restart.

use std::{
    fs,
    time::{Duration, Instant},
};

use overkvm::throttle::budget::jain_index;
use overkvm_tests::{
    skip_unless_kernel,
    throttling::{
        Daemon, TestCgroups, V1Scenario, any_limit, greedy_vm, serviced, v1_limits, wait_until,
        write_config,
    },
};

const BUDGET: f64 = 3000.0;

#[test]
fn v1_budget_is_held_with_weighted_fair_shares_and_released() {
    skip_unless_kernel!();
    let blkio = overkvm_tests::v1_blkio_or_skip!();
    let names = ["vmA", "vmB", "vmC"];
    let V1Scenario {
        lo,
        major,
        minor,
        mut cgs,
        dirs,
    } = V1Scenario::new(&blkio, 256, &names);
    let tmp = std::env::temp_dir().join(format!("overkvm-throttle-{}", std::process::id()));
    fs::create_dir_all(&tmp).unwrap();
    let state = tmp.join("state/throttle.json");
    let config = tmp.join("overkvm.toml");
    write_config(
        &config,
        &state,
        "release_ticks = 6\n",
        &lo.name(),
        BUDGET,
        "\n[[vm]]\nname = \"vmA\"\nweight = 2\n",
    );
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
    // The README's claim: measured 96-103% of the budget and 1.96-2.00x (98.7-99.2% and 2.00
    // at a load average of 6-7 on 2 cores). The bounds leave room for a noisier machine, not
    // for a controller that over-throttles or ignores weights.
    assert!(
        total >= BUDGET * 0.9,
        "aggregate {total:.0} below 90% of budget {BUDGET}: over-throttled"
    );
    assert!(
        jain_equal >= 0.95,
        "equal-weight guests not fair: {rates:?}"
    );
    let ratio = rates[0] / rates[1].max(1.0);
    assert!(
        (1.8..=2.2).contains(&ratio),
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
    let blkio = overkvm_tests::v1_blkio_or_skip!();
    let names = ["vmA", "vmB"];
    let V1Scenario {
        lo,
        major,
        minor,
        mut cgs,
        dirs,
    } = V1Scenario::new(&blkio, 128, &names);
    let tmp = std::env::temp_dir().join(format!("overkvm-kill9-{}", std::process::id()));
    fs::create_dir_all(&tmp).unwrap();
    let state = tmp.join("state/throttle.json");
    let config = tmp.join("overkvm.toml");
    write_config(&config, &state, "engage_ticks = 1\n", &lo.name(), 1000, "");
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

/// A held VM restarted: its qemu killed and a new one with the same identity (name and uuid)
/// started in a new blkio cgroup (as libvirt does: `qemu-ID-NAME` with a new ID; the old
/// cgroup left behind here). The throttle takes it for the same VM: within a few ticks the new
/// cgroup has the limit and the old has none, as the kernel's own files say, and it stays so.
#[test]
fn v1_a_restarted_vms_limit_moves_to_its_new_cgroup() {
    skip_unless_kernel!();
    let blkio = overkvm_tests::v1_blkio_or_skip!();
    let V1Scenario {
        lo,
        major,
        minor,
        mut cgs,
        dirs,
    } = V1Scenario::new(&blkio, 128, &["vmA-1", "vmA-2", "vmB"]);
    let tmp = std::env::temp_dir().join(format!("overkvm-restart-{}", std::process::id()));
    fs::create_dir_all(&tmp).unwrap();
    let state = tmp.join("state/throttle.json");
    let config = tmp.join("overkvm.toml");
    write_config(&config, &state, "", &lo.name(), 1000, "");
    let log = tmp.join("daemon.log");
    let daemon = Daemon::start(&config, &log);
    let log_text = || fs::read_to_string(&log).unwrap_or_default();
    // vmA and vmB, greedy, over the budget; vmA's uuid is its region's (0) in both lives.
    cgs.kids.push(greedy_vm(&tmp, &lo.path, "vmA", &dirs[0], 0));
    cgs.kids.push(greedy_vm(&tmp, &lo.path, "vmB", &dirs[2], 1));
    let limited = |d: &std::path::Path| v1_limits(d, major, minor).iter().any(Option::is_some);
    assert!(
        wait_until(Duration::from_secs(10), || limited(&dirs[0])),
        "vmA not limited:\n{}",
        log_text()
    );
    std::thread::sleep(Duration::from_secs(2));
    let before = v1_limits(&dirs[0], major, minor);
    let mut old = cgs.kids.remove(0);
    let old_pid = old.id();
    let _ = old.kill();
    let _ = old.wait();
    let t0 = Instant::now();
    cgs.kids.push(greedy_vm(&tmp, &lo.path, "vmA", &dirs[1], 0));
    let moved = wait_until(Duration::from_secs(10), || {
        limited(&dirs[1]) && !limited(&dirs[0])
    });
    let moved_s = t0.elapsed().as_secs_f64();
    assert!(
        moved,
        "after the restart: old cgroup {:?}, new cgroup {:?}\n{}",
        v1_limits(&dirs[0], major, minor),
        v1_limits(&dirs[1], major, minor),
        log_text()
    );
    // It stays so: nothing writes the old cgroup again, the new one stays held.
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !limited(&dirs[0]) && limited(&dirs[1]),
            "old {:?}, new {:?}\n{}",
            v1_limits(&dirs[0], major, minor),
            v1_limits(&dirs[1], major, minor),
            log_text()
        );
    }
    let after = v1_limits(&dirs[1], major, minor);
    eprintln!(
        "vmA restarted (pid {old_pid} killed): limit moved from {} to {} in {moved_s:.1}s: \
         {before:?} then {after:?}",
        dirs[0].display(),
        dirs[1].display()
    );
    let text = log_text();
    assert!(
        text.contains(&format!("restarted (pid {old_pid}, now ")),
        "the restart is logged:\n{text}"
    );
    let st = daemon.terminate();
    assert!(st.success(), "daemon exit on SIGTERM: {st}");
    assert!(
        !any_limit(&dirs, major, minor),
        "SIGTERM removes every limit"
    );
    drop(cgs);
    let _ = fs::remove_dir_all(&tmp);
}
