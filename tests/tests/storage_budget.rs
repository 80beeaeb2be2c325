//! A budget on shared network storage: two real TCG guests whose `/dev/vda` are on the same
//! NBD server (`qemu-nbd` over TCP on loopback, one export shared by both), each reading its
//! own half of it as fast as it can. No host block device sees that I/O: only QEMU's
//! counters do, and only QEMU's throttling can hold it.
//!
//! 1. Unthrottled, the pair's reads are measured by QMP `query-blockstats` (the ground
//!    truth throughout), and the budget is set to a third of them: it binds.
//! 2. `serve --qmp A --qmp B` with `[[storage]] target = "nbd://127.0.0.1:PORT"` (the whole
//!    server) sets QEMU limits on both disks, and holds the pair's total reads per second at
//!    the budget, shared fairly (equal weights).
//! 3. SIGTERM: no QEMU limit is left on either disk, and the state file is gone.
//! 4. Started again with guest a at weight 2: the pair is held at the budget 2:1. Then
//!    killed with `kill -9` while engaged: `throttle reset` puts both disks back from the
//!    state file alone.

use std::{
    path::Path,
    process::Command,
    thread::sleep,
    time::{Duration, Instant},
};

use overkvm_tests::{
    guest::{self, Guest, GuestSpec, TempDir},
    netstore::NbdServer,
    skip_unless_kernel,
    throttling::{Daemon, wait_until},
};
use serde_json::Value;

/// The pair's reads per second may be this far from the budget: the controller adapts the
/// limits tick by tick around it, QEMU's leaky bucket holds each exactly.
const TOLERANCE: f64 = 0.2;
/// Each guest's share may differ from what its weight gives it by this factor at most.
const FAIRNESS: f64 = 1.35;
/// The window each rate is measured over.
const WINDOW: Duration = Duration::from_secs(10);
/// Blocks in each guest's half of the export (4 KiB each: 16 MiB).
const HALF_BLOCKS: u64 = 4096;

/// Reads completed on the guest's vda, by QEMU's own counters.
fn reads(vm: &Guest) -> u64 {
    let reply = vm.qmp("query-blockstats", None).expect("query-blockstats");
    reply
        .as_array()
        .and_then(|a| a.iter().find(|e| e["device"] == "nbd0"))
        .and_then(|e| e["stats"]["rd_operations"].as_u64())
        .unwrap_or_else(|| panic!("no nbd0 in {reply}"))
}

/// The throttle settings of the guest's vda (`query-block`'s `inserted`).
fn throttle(vm: &Guest) -> Value {
    let reply = vm.qmp("query-block", None).expect("query-block");
    reply
        .as_array()
        .and_then(|a| a.iter().find(|e| e["device"] == "nbd0"))
        .map(|e| e["inserted"].clone())
        .unwrap_or_else(|| panic!("no nbd0 in {reply}"))
}

/// Every rate setting QEMU has on a disk: all 0 when nothing limits it.
const SETTINGS: [&str; 6] = ["iops", "iops_rd", "iops_wr", "bps", "bps_rd", "bps_wr"];

fn limited(vm: &Guest) -> bool {
    let t = throttle(vm);
    SETTINGS.iter().any(|k| t[*k].as_u64().unwrap_or(0) > 0)
}

/// Reads per second of each guest over [`WINDOW`].
fn rates(vms: &[&Guest]) -> Vec<f64> {
    let before: Vec<u64> = vms.iter().map(|v| reads(v)).collect();
    let t0 = Instant::now();
    sleep(WINDOW);
    let after: Vec<u64> = vms.iter().map(|v| reads(v)).collect();
    let secs = t0.elapsed().as_secs_f64();
    before
        .iter()
        .zip(&after)
        .map(|(b, a)| (a - b) as f64 / secs)
        .collect()
}

fn boot(name: &str, url: &str, half: u64, dir: &Path) -> Guest {
    // Direct 4 KiB reads of its own half of the export, for ever.
    let script = format!(
        "echo READY\n\
         while true; do\n\
           dd if=/dev/vda of=/dev/null bs=4096 count={HALF_BLOCKS} skip={} iflag=direct 2>/dev/null || exit 3\n\
         done\n",
        half * HALF_BLOCKS
    );
    let spec = GuestSpec {
        name: name.into(),
        disk_drive: Some(format!(
            "file={url},format=raw,if=virtio,id=nbd0,cache=none"
        )),
        script,
        ..GuestSpec::default()
    };
    std::fs::create_dir_all(dir).unwrap();
    Guest::boot(&spec, dir).expect("booting a guest")
}

#[test]
fn a_shared_nbd_budget_holds_two_guests_fairly_and_leaves_nothing_behind() {
    skip_unless_kernel!();
    if Command::new("qemu-nbd").arg("--version").output().is_err() {
        overkvm_tests::skipped(
            module_path!(),
            "qemu-nbd missing (apt-get install qemu-utils)",
        );
        return;
    }
    if let Some(reason) = guest::missing_tools() {
        overkvm_tests::skipped(module_path!(), &reason);
        return;
    }
    let _kernel = guest::guest_kernel().expect("guest kernel");
    let work = TempDir::new("storebudget").unwrap();
    let image = work.path().join("export.img");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(&image)
        .arg(format!("{}K", 2 * HALF_BLOCKS * 4))
        .status()
        .expect("qemu-img");
    assert!(st.success());
    let server = NbdServer::start_shared(&image, 2);
    let (dir_a, dir_b) = (work.path().join("a"), work.path().join("b"));
    let mut a = boot("overkvm-sb-a", &server.url(), 0, &dir_a);
    let mut b = boot("overkvm-sb-b", &server.url(), 1, &dir_b);
    for vm in [&mut a, &mut b] {
        vm.wait_for_console("READY", Duration::from_secs(240))
            .expect("guest boot");
    }

    // 1. Unthrottled: what the pair does alone sets a budget that binds.
    let free = rates(&[&a, &b]);
    let free_total: f64 = free.iter().sum();
    let budget = (free_total / 3.0).round();
    eprintln!(
        "unthrottled: a {:.0}/s, b {:.0}/s; budget {budget} IOPS",
        free[0], free[1]
    );
    assert!(
        budget >= 100.0,
        "the guests read only {free_total:.0}/s together: too slow for a budget to mean anything"
    );

    // 2. The budget on the whole server.
    let state = work.path().join("throttle.json");
    let config = work.path().join("overkvm.toml");
    std::fs::write(
        &config,
        format!(
            "[policy]\nstate_file = \"{}\"\n\n[[storage]]\ntarget = \"nbd://127.0.0.1:{}\"\n\
             iops = {budget}\n",
            state.display(),
            server.port
        ),
    )
    .unwrap();
    let log = work.path().join("serve.log");
    let (qa, qb) = (
        dir_a.join("qmp.sock").to_string_lossy().into_owned(),
        dir_b.join("qmp.sock").to_string_lossy().into_owned(),
    );
    let daemon = Daemon::start_with(&config, &log, &["--qmp", &qa, "--qmp", &qb]);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(60), || limited(&a) && limited(&b)),
        "QEMU limits on both disks:\n{}",
        log_text()
    );
    // The controller's first limits overshoot or undershoot; it settles within seconds.
    sleep(Duration::from_secs(8));
    let held = rates(&[&a, &b]);
    let total: f64 = held.iter().sum();
    let (ta, tb) = (throttle(&a), throttle(&b));
    eprintln!(
        "held: a {:.0}/s (iops_rd {}), b {:.0}/s (iops_rd {}), total {total:.0}/s, budget {budget}",
        held[0], ta["iops_rd"], held[1], tb["iops_rd"]
    );
    assert!(
        (total - budget).abs() <= budget * TOLERANCE,
        "the pair read {total:.0}/s, budget {budget} (±{:.0}%):\n{}",
        TOLERANCE * 100.0,
        log_text()
    );
    let (lo, hi) = (held[0].min(held[1]), held[0].max(held[1]));
    assert!(
        hi <= lo * FAIRNESS,
        "unfair: a {:.0}/s, b {:.0}/s:\n{}",
        held[0],
        held[1],
        log_text()
    );
    let out = Command::new(overkvm_tests::workspace_bin("overkvm-io"))
        .args(["throttle", "status", "--config"])
        .arg(&config)
        .output()
        .expect("throttle status");
    let status = String::from_utf8_lossy(&out.stdout);
    let budget_name = format!("nbd://127.0.0.1:{}", server.port);
    for want in [
        format!("storage {budget_name}"),
        "ENGAGED".to_string(),
        "(in QEMU: nbd0)".to_string(),
        format!("(network, budget {budget_name})"),
    ] {
        assert!(
            status.contains(&want),
            "no {want:?} in throttle status:\n{status}"
        );
    }
    let recorded = std::fs::read_to_string(&state).expect("the state file while engaged");
    assert_eq!(
        recorded.matches("\"disk\"").count(),
        2,
        "both disks' originals on record: {recorded}"
    );

    // 3. Stopped: nothing left in QEMU, nothing on record.
    let st = daemon.terminate();
    assert!(st.success(), "daemon exit {st}:\n{}", log_text());
    for (name, vm) in [("a", &a), ("b", &b)] {
        let t = throttle(vm);
        for k in SETTINGS {
            assert_eq!(t[k].as_u64(), Some(0), "{name} {k} left behind: {t}");
        }
    }
    assert!(!state.exists(), "state file left: {}", log_text());
    let text = log_text();
    assert!(
        text.contains("nbd://127.0.0.1:") && text.contains("in QEMU through QMP"),
        "{text}"
    );

    // 4. Weights, then a crash while engaged: the record alone undoes it.
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("\n[[vm]]\nname = \"overkvm-sb-a\"\nweight = 2\n");
    std::fs::write(&config, text).unwrap();
    let daemon = Daemon::start_with(&config, &log, &["--qmp", &qa, "--qmp", &qb]);
    assert!(
        wait_until(Duration::from_secs(60), || limited(&a) && limited(&b)),
        "QEMU limits on both disks again:\n{}",
        log_text()
    );
    sleep(Duration::from_secs(8));
    let weighted = rates(&[&a, &b]);
    let total: f64 = weighted.iter().sum();
    let ratio = weighted[0] / weighted[1];
    eprintln!(
        "weighted 2:1: a {:.0}/s, b {:.0}/s ({ratio:.2}x), total {total:.0}/s, budget {budget}",
        weighted[0], weighted[1]
    );
    assert!(
        (total - budget).abs() <= budget * TOLERANCE,
        "weighted: the pair read {total:.0}/s, budget {budget}:\n{}",
        log_text()
    );
    assert!(
        (2.0 / FAIRNESS..=2.0 * FAIRNESS).contains(&ratio),
        "weight 2: a {:.0}/s, b {:.0}/s:\n{}",
        weighted[0],
        weighted[1],
        log_text()
    );
    daemon.kill9();
    assert!(
        limited(&a) && limited(&b),
        "kill -9 leaves the limits in QEMU"
    );
    let out = Command::new(overkvm_tests::workspace_bin("overkvm-io"))
        .args(["throttle", "reset", "--config"])
        .arg(&config)
        .output()
        .expect("throttle reset");
    assert!(
        out.status.success(),
        "throttle reset: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (name, vm) in [("a", &a), ("b", &b)] {
        let t = throttle(vm);
        for k in SETTINGS {
            assert_eq!(t[k].as_u64(), Some(0), "{name} {k} left after reset: {t}");
        }
    }
    assert!(!state.exists(), "state file left after reset");
    drop(a);
    drop(b);
    drop(server);
}
