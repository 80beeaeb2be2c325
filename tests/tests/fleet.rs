//! The fleet view end to end: three `overkvm-io serve` instances on loopback ports are three
//! "hosts" (told apart by Prometheus's `instance` label), a real Prometheus scrapes them every
//! second, and qemu stand-ins read a loop device at paced rates. `overkvm-io top --prometheus`
//! must rank the VMs of every host busiest first and show, per host, VM and device, the rates
//! and mean latency that host exported.
//!
//! All three daemons run on this one kernel and so see every VM; Prometheus's metric
//! relabelling keeps each host's own VMs only (as if each ran on a machine of its own).

use std::{
    net::SocketAddr,
    process::Command,
    time::{Duration, Instant},
};

use overkvm_tests::{
    devices::LoopDevice,
    prometheus::{self, Prometheus},
    serving::{Serve, TempDir, scrape, wait_serving},
    skip_unless_kernel,
    standins::{Pace, StandIn},
    throttling::{Daemon, V1Scenario, greedy_vm, write_config},
    workspace_bin,
};
use serde_json::Value;

/// Paced reads per second of each host's stand-in VMs: host 2 has the busiest.
const RATES: [&[f64]; 3] = [&[40.0, 8.0], &[120.0, 4.0], &[70.0, 15.0]];

/// The window the fleet view computes rates over.
const WINDOW_S: u64 = 10;

/// The sum of every series of `name` whose labels include all of `want` (any label order).
fn exported(body: &str, name: &str, want: &[(&str, &str)]) -> f64 {
    body.lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix('{'))
        .filter_map(|rest| {
            let (labels, value) = rest.rsplit_once("} ")?;
            let all = want
                .iter()
                .all(|(k, v)| labels.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
            all.then(|| value.trim().parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// What one host exported for one VM on one device: ops, bytes, latency sum and count.
#[derive(Clone, Copy, Debug, Default)]
struct Exported {
    ops: f64,
    read_bytes: f64,
    lat_sum: f64,
    lat_count: f64,
}

fn exported_vm(body: &str, vm: &str, device: &str) -> Exported {
    let l = [("vm", vm), ("device", device)];
    Exported {
        ops: exported(body, "overkvm_vm_io_operations_total", &l),
        read_bytes: exported(
            body,
            "overkvm_vm_io_bytes_total",
            &[("vm", vm), ("device", device), ("op", "read")],
        ),
        lat_sum: exported(body, "overkvm_vm_io_latency_seconds_sum", &l),
        lat_count: exported(body, "overkvm_vm_io_latency_seconds_count", &l),
    }
}

/// `overkvm-io top --prometheus URL -b -n 1 --window 10s` with `extra`; (success, stdout,
/// stderr).
fn fleet_top(url: &str, extra: &[&str]) -> (bool, String, String) {
    let out = Command::new(workspace_bin("overkvm-io"))
        .args(["top", "--prometheus", url, "-b", "-n", "1"])
        .args(["--window", &format!("{WINDOW_S}s")])
        .args(extra)
        .output()
        .expect("running overkvm-io top --prometheus");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs the fleet view in a detached tmux pane of 120x30 until `row` is on screen; the screen,
/// or None (with the reason printed) when tmux is not installed.
fn fleet_on_a_terminal(url: &str, row: &str) -> Option<String> {
    if Command::new("tmux").arg("-V").output().is_err() {
        eprintln!("NOTE: tmux is not installed; the fleet view on a terminal is not checked");
        return None;
    }
    let socket = format!("overkvm-fleet-{}", std::process::id());
    let tmux = |args: &[&str]| {
        Command::new("tmux")
            .args(["-L", &socket, "-f", "/dev/null"])
            .args(args)
            .output()
            .expect("running tmux")
    };
    let command = format!(
        "'{}' top --prometheus {url} --window {WINDOW_S}s -d 1; sleep 600",
        workspace_bin("overkvm-io").display()
    );
    let started = tmux(&[
        "new-session",
        "-d",
        "-s",
        "fleet",
        "-x",
        "120",
        "-y",
        "30",
        &command,
    ]);
    assert!(started.status.success(), "tmux: {started:?}");
    let _ = tmux(&["set", "-g", "status", "off"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let screen = loop {
        let out = tmux(&["capture-pane", "-p", "-t", "fleet"]);
        let screen = String::from_utf8_lossy(&out.stdout).into_owned();
        if screen.lines().any(|l| l.starts_with(row)) || Instant::now() > deadline {
            break screen;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = tmux(&["send-keys", "-t", "fleet", "q"]);
    std::thread::sleep(Duration::from_millis(300));
    let _ = tmux(&["kill-server"]);
    assert!(
        screen.lines().any(|l| l.starts_with(row)),
        "{row} never shown:\n{screen}"
    );
    Some(screen)
}

#[test]
fn the_fleet_view_ranks_every_hosts_vms_with_the_rates_each_host_exported() {
    skip_unless_kernel!();
    if let Some(reason) = prometheus::missing("prometheus") {
        overkvm_tests::skipped(module_path!(), &reason);
        return;
    }
    let dir = TempDir::new("fleet");
    let lo = LoopDevice::new(64).expect("loop device");
    let dev = lo.name();
    let hosts: Vec<Serve> = (0..3)
        .map(|i| Serve::start(&dir.join(format!("serve{i}.log")), &[]))
        .collect();
    let addrs: Vec<SocketAddr> = hosts.iter().map(|h| h.addr).collect();
    let tag = format!("okvm-fleet-{}", std::process::id());
    let mut vms: Vec<(usize, String, StandIn)> = Vec::new();
    for (h, rates) in RATES.iter().enumerate() {
        for (j, rate) in rates.iter().enumerate() {
            let name = format!("{tag}-h{h}-v{j}");
            let n = vms.len() as u64;
            let pace = Pace {
                rate: Some(*rate),
                start: n * (8 << 20),
                len: 8 << 20,
                seed: n + 3,
            };
            let vm = StandIn::vm(&dir.0, &lo.path, &name, pace);
            vms.push((h, name, vm));
        }
    }

    // One job, three targets; each target keeps its own stand-ins only.
    let drop_others: Vec<String> = addrs
        .iter()
        .enumerate()
        .map(|(h, a)| {
            let others: String = (0..3).filter(|o| *o != h).map(|o| o.to_string()).collect();
            format!("{};{tag}-h[{others}]-.*", a.to_string().replace('.', "\\."))
        })
        .collect();
    let targets: Vec<String> = addrs.iter().map(|a| format!("'{a}'")).collect();
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging/prometheus/overkvm-rules.yml");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - {}\n\
         scrape_configs:\n  - job_name: overkvm\n    scrape_interval: 1s\n    scrape_timeout: 1s\n\
         \x20   static_configs:\n      - targets: [{}]\n\
         \x20   metric_relabel_configs:\n      - source_labels: [instance, vm]\n\
         \x20       regex: '{}'\n        action: drop\n",
        rules.display(),
        targets.join(", "),
        drop_others.join("|"),
    );
    let prom = Prometheus::start(&dir.0, &config);

    // A window of scrapes first, then the hosts' own counters over one window, then the view.
    let deadline = Instant::now() + Duration::from_secs(30);
    while prom
        .query("count_over_time(overkvm_ticks_total[1m])")
        .iter()
        .filter(|(_, n)| *n >= (WINDOW_S + 2) as f64)
        .count()
        < 3
    {
        assert!(
            Instant::now() < deadline,
            "Prometheus keeps no samples of the three hosts:\n{}",
            prom.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let snapshot = || -> Vec<String> {
        addrs
            .iter()
            .map(|a| scrape(*a).expect("scraping a host"))
            .collect()
    };
    // The host's counters over one window, then the view over the same window. On a loaded
    // machine a stand-in or a scrape can stall for a second inside one window and not the
    // other (they are a scrape apart): a mismatch is measured again, up to three times.
    let mut mismatches = Vec::new();
    let mut report = Value::Null;
    for attempt in 1..=3 {
        let (before, t0) = (snapshot(), Instant::now());
        std::thread::sleep(Duration::from_secs(WINDOW_S));
        let (after, t1) = (snapshot(), Instant::now());
        let (ok, json, err) = fleet_top(&prom.url(), &["--json"]);
        assert!(ok, "top --prometheus --json failed: {err}");
        let secs = (t1 - t0).as_secs_f64();
        for (_, _, vm) in &mut vms {
            assert!(vm.running(), "a stand-in VM stopped");
        }
        report = serde_json::from_str(json.trim()).unwrap_or_else(|e| panic!("{e}: {json}"));
        mismatches.clear();
        for (h, name, _) in &vms {
            let Some(row) = report["vms"]
                .as_array()
                .and_then(|rows| rows.iter().find(|r| r["vm"] == name.as_str()))
            else {
                mismatches.push(format!("{name} missing from the fleet view"));
                continue;
            };
            let (a, b) = (
                exported_vm(&after[*h], name, &dev),
                exported_vm(&before[*h], name, &dev),
            );
            let host_iops = (a.ops - b.ops) / secs;
            let host_mbs = (a.read_bytes - b.read_bytes) / secs / 1e6;
            let host_lat_us = (a.lat_count > b.lat_count)
                .then(|| (a.lat_sum - b.lat_sum) / (a.lat_count - b.lat_count) * 1e6);
            let got = |k: &str| row[k].as_f64().unwrap_or(f64::NAN);
            eprintln!(
                "{name} on host {h}: exported {host_iops:.1} IOPS {host_mbs:.3} MB/s \
                 {host_lat_us:.1?} µs; fleet view {:.1} IOPS {:.3} MB/s {:.1} µs",
                got("iops"),
                got("read_mbs"),
                got("lat_avg_us")
            );
            let near =
                |fleet: f64, host: f64, slack: f64| (fleet - host).abs() <= 0.15 * host + slack;
            // Latency: the same I/Os give the same mean, but a few slow reads move the mean
            // of a slow trickle: a factor 2 (4 below 20 IOPS).
            let factor = if host_iops >= 20.0 { 2.0 } else { 4.0 };
            let lat = got("lat_avg_us");
            let lat_ok =
                host_lat_us.is_some_and(|h| lat > 0.0 && lat <= h * factor && lat >= h / factor);
            if !(near(got("iops"), host_iops, 2.0)
                && near(got("read_iops"), host_iops, 2.0)
                && near(got("read_mbs"), host_mbs, 0.01)
                && lat_ok)
            {
                mismatches.push(format!(
                    "{name}: fleet {row} vs exported {host_iops} IOPS {host_mbs} MB/s \
                     {host_lat_us:?} µs"
                ));
            }
        }
        if mismatches.is_empty() {
            break;
        }
        eprintln!("attempt {attempt}: {mismatches:#?}");
    }
    assert!(
        mismatches.is_empty(),
        "the fleet view's numbers differ from what the hosts exported: {mismatches:#?}"
    );

    let rows = report["vms"].as_array().expect("vms array");
    eprintln!(
        "fleet view: {} rows over {} hosts (window {} s)",
        rows.len(),
        report["hosts"].as_array().map_or(0, Vec::len),
        report["window_s"]
    );
    // Busiest first over the whole fleet, whoever's rows they are.
    let iops: Vec<f64> = rows
        .iter()
        .map(|r| r["iops"].as_f64().unwrap_or(-1.0))
        .collect();
    assert!(
        iops.windows(2).all(|w| w[0] >= w[1]),
        "not sorted by IOPS: {iops:?}"
    );
    let ours: Vec<&Value> = rows
        .iter()
        .filter(|r| r["vm"].as_str().is_some_and(|v| v.starts_with(&tag)))
        .collect();
    let names: Vec<&str> = ours.iter().filter_map(|r| r["vm"].as_str()).collect();
    assert_eq!(
        names.first().copied(),
        Some(format!("{tag}-h1-v0").as_str()),
        "host 1's 120 IOPS VM is not the busiest of ours: {names:?}"
    );
    assert_eq!(ours.len(), vms.len(), "one row per stand-in VM: {names:?}");
    for (h, name, _) in &vms {
        let row = ours
            .iter()
            .find(|r| r["vm"] == name.as_str())
            .unwrap_or_else(|| panic!("{name} missing from the fleet view"));
        // The row is the host's that exported it, not another's.
        assert_eq!(row["instance"], addrs[*h].to_string(), "{name}: {row}");
        assert_eq!(row["device"], dev.as_str(), "{name}: {row}");
        assert_eq!(row["throttle"], "", "{name}: no throttle runs");
    }

    // Every host is there, with at least its own VMs' I/O.
    let host_rows = report["hosts"].as_array().expect("hosts array");
    for (h, addr) in addrs.iter().enumerate() {
        let host = host_rows
            .iter()
            .find(|r| r["instance"] == addr.to_string())
            .unwrap_or_else(|| panic!("host {addr} missing: {host_rows:?}"));
        let own: f64 = ours
            .iter()
            .filter(|r| r["instance"] == addr.to_string())
            .filter_map(|r| r["iops"].as_f64())
            .sum();
        assert!(
            host["iops"].as_f64().is_some_and(|v| v >= own - 1e-6),
            "host {h}: {host} below its VMs' {own}"
        );
        assert!(
            host["vms"]
                .as_u64()
                .is_some_and(|n| n >= RATES[h].len() as u64)
        );
    }

    // The same order in batch text, and --sort / -r follow.
    let (ok, text, err) = fleet_top(&prom.url(), &[]);
    assert!(ok, "{err}");
    let line_of = |text: &str, vm: &str| {
        text.lines()
            .position(|l| l.split_whitespace().nth(1) == Some(vm))
            .unwrap_or_else(|| panic!("{vm} missing:\n{text}"))
    };
    let order = |text: &str| -> Vec<String> {
        let mut ours: Vec<(usize, String)> = vms
            .iter()
            .map(|(_, n, _)| (line_of(text, n), n.clone()))
            .collect();
        ours.sort();
        ours.into_iter().map(|(_, n)| n).collect()
    };
    eprintln!("--- fleet view, batch text ---\n{text}");
    assert_eq!(order(&text)[0], format!("{tag}-h1-v0"), "{text}");
    let (ok, text, err) = fleet_top(&prom.url(), &["--sort", "name"]);
    assert!(ok, "{err}");
    let mut sorted: Vec<String> = vms.iter().map(|(_, n, _)| n.clone()).collect();
    sorted.sort();
    assert_eq!(order(&text), sorted, "--sort name:\n{text}");
    let (ok, text, err) = fleet_top(&prom.url(), &["--sort", "host", "-r"]);
    assert!(ok, "{err}");
    let hosts_order: Vec<String> = order(&text)
        .iter()
        .map(|n| n[tag.len() + 1..tag.len() + 3].to_string())
        .collect();
    let mut want = hosts_order.clone();
    want.sort_by(|a, b| {
        let addr = |h: &str| addrs[usize::from(h.as_bytes()[1] - b'0')].to_string();
        addr(b).cmp(&addr(a))
    });
    assert_eq!(hosts_order, want, "--sort host -r:\n{text}");

    // On a terminal: the local view's look, the busiest VM on the first row without a key.
    if let Some(screen) = fleet_on_a_terminal(&prom.url(), &format!("vm:{tag}-h1-v0")) {
        eprintln!("--- fleet view in tmux, 120x30 ---\n{screen}");
        let lines: Vec<&str> = screen.lines().collect();
        let head = lines
            .iter()
            .position(|l| l.starts_with("VM/COMM"))
            .expect("the table header");
        assert!(lines[head].contains("HOST") && lines[head].contains("IO/s▼"));
        let ours_first = lines[head + 1..]
            .iter()
            .find(|l| l.contains(&tag))
            .copied()
            .unwrap_or_default();
        assert!(
            ours_first.starts_with(&format!("vm:{tag}-h1-v0")),
            "the busiest of ours is not first:\n{screen}"
        );
        assert!(lines[0].contains("hosts") && lines[0].contains("fleet http://"));
    }

    // The recording rules load next to the raw series (their values are unit-tested by
    // promtool).
    let loaded = prom.api("/api/v1/rules");
    let groups = loaded["data"]["groups"].as_array().map_or(0, Vec::len);
    assert_eq!(groups, 3, "rule groups loaded: {loaded}");

    // A Prometheus that is not there, and a URL the view cannot use: clear errors.
    let closed = format!("http://127.0.0.1:{}", prometheus::free_port());
    let (ok, _, err) = fleet_top(&closed, &[]);
    assert!(!ok && err.contains("connecting to"), "{err}");
    let (ok, _, err) = fleet_top("ftp://127.0.0.1:9090", &[]);
    assert!(!ok && err.contains("only http:// and https://"), "{err}");
    // Credentials never on the command line (`ps` shows it): in an --http.config.file.
    let (ok, _, err) = fleet_top("https://user:pw@127.0.0.1:9090", &[]);
    assert!(!ok && err.contains("--http.config.file"), "{err}");
    drop(prom);
    drop(hosts);
}

/// The recording rules load and compute what their unit tests say, and every recorded series
/// the dashboard's fleet row reads is one the rules record (no kernel needed).
#[test]
fn packaged_recording_rules_pass_promtool_and_feed_the_dashboard() {
    if let Some(reason) = prometheus::missing("promtool") {
        overkvm_tests::skipped(module_path!(), &reason);
        return;
    }
    let packaging = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging");
    for args in [
        ["check", "rules", "overkvm-rules.yml"],
        ["test", "rules", "overkvm-rules.test.yml"],
        ["check", "config", "overkvm.yml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(packaging.join("prometheus"))
            .output()
            .expect("running promtool");
        assert!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let rules = std::fs::read_to_string(packaging.join("prometheus/overkvm-rules.yml"))
        .expect("reading the rules");
    let recorded: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- record: "))
        .collect();
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(packaging.join("grafana/overkvm.json")).expect("dashboard"),
    )
    .expect("dashboard JSON");
    let mut used = 0;
    for panel in dash["panels"].as_array().into_iter().flatten() {
        for t in panel["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or_default();
            // Recorded series are the only metric names with colons.
            for word in expr.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':')) {
                if word.contains(':') && word.starts_with(char::is_alphabetic) {
                    assert!(recorded.contains(&word), "{word} is not recorded: {expr}");
                    used += 1;
                }
            }
        }
    }
    assert!(used >= 8, "the dashboard reads {used} recorded series");
}

/// A host whose throttle limits two greedy VMs (cgroup v1 blkio, a budget far below what they
/// do): the fleet view's limits are the ones that host exported.
#[test]
fn the_fleet_view_shows_the_limits_each_host_set() {
    skip_unless_kernel!();
    let blkio = overkvm_tests::v1_blkio_or_skip!();
    if let Some(reason) = prometheus::missing("prometheus") {
        overkvm_tests::skipped(module_path!(), &reason);
        return;
    }
    let tag = format!("okvm-flim-{}", std::process::id());
    let names = [format!("{tag}-a"), format!("{tag}-b")];
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let V1Scenario {
        lo, mut cgs, dirs, ..
    } = V1Scenario::new(&blkio, 128, &name_refs);
    let dir = TempDir::new("fleet-limits");
    let config = dir.join("overkvm.toml");
    write_config(
        &config,
        &dir.join("state/throttle.json"),
        "",
        &lo.name(),
        400,
        "",
    );
    let log = dir.join("daemon.log");
    let daemon = Daemon::start(&config, &log);
    let addr = wait_serving(&log, 2.0, Duration::from_secs(30)).unwrap_or_else(|| {
        panic!(
            "the daemon does not serve:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    for (i, name) in names.iter().enumerate() {
        cgs.kids
            .push(greedy_vm(&dir.0, &lo.path, name, &dirs[i], i as u64));
    }
    let prom = Prometheus::start(
        &dir.0,
        &format!(
            "global:\n  scrape_interval: 1s\n\
             scrape_configs:\n  - job_name: overkvm\n    scrape_interval: 1s\n    scrape_timeout: 1s\n\
             \x20   static_configs:\n      - targets: ['{addr}']\n"
        ),
    );
    let limits_of = |body: &str, vm: &str| -> (f64, f64) {
        let l = |d: &str| {
            exported(
                body,
                "overkvm_throttle_limit_iops",
                &[("vm", vm), ("device", &lo.name()), ("direction", d)],
            )
        };
        (l("read"), l("write"))
    };
    // Limits engaged and in Prometheus for both VMs.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let in_prom = prom.query(&format!("overkvm_throttle_limit_iops{{vm=~\"{tag}-.*\"}}"));
        if in_prom.len() >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no limits in Prometheus after 40 s; daemon log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // The limits move while the controller settles: a fleet view between two scrapes of the
    // host must show one of the two values, per VM.
    let mut matched = false;
    for _ in 0..10 {
        let before = scrape(addr).expect("scraping the host");
        let (ok, json, err) = fleet_top(&prom.url(), &["--json"]);
        assert!(ok, "{err}");
        let after = scrape(addr).expect("scraping the host");
        let report: Value = serde_json::from_str(json.trim()).expect("JSON");
        let mut all = true;
        for name in &names {
            let row = report["vms"]
                .as_array()
                .and_then(|rows| rows.iter().find(|r| r["vm"] == name.as_str()))
                .unwrap_or_else(|| panic!("{name} missing: {report}"));
            let got = (
                row["limits"]["riops"].as_f64().unwrap_or(0.0),
                row["limits"]["wiops"].as_f64().unwrap_or(0.0),
            );
            let (b, a) = (limits_of(&before, name), limits_of(&after, name));
            eprintln!(
                "{name}: fleet view limits {got:?} ({}), host exported {b:?} then {a:?}",
                row["throttle"]
            );
            assert!(
                got.0 > 0.0,
                "{name}: no read limit in the fleet view: {row}"
            );
            assert!(
                row["throttle"].as_str().is_some_and(|t| t.starts_with('r')),
                "{row}"
            );
            all &= got == b || got == a;
        }
        if all {
            matched = true;
            break;
        }
        // Prometheus scraped a value the host has already replaced: try again.
        std::thread::sleep(Duration::from_millis(700));
    }
    assert!(matched, "the fleet view's limits never matched the host's");
    cgs.stop_all();
    drop(prom);
    drop(daemon);
}
