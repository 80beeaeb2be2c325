//! Faults under the throttling daemon: a state directory it cannot write, and a throttled device
//! detached mid-run. Each is logged once, shown, and the daemon carries on.

use std::{fs, io::Read as _, io::Write as _, process::Command, time::Duration};

use overkvm_tests::{
    skip_unless_kernel,
    throttling::{Daemon, V1Scenario, any_limit, greedy_vm, wait_until},
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
    let tmp = std::env::temp_dir().join(format!("overkvm-faults-{}", std::process::id()));
    fs::create_dir_all(&tmp).unwrap();
    let config = tmp.join("c.toml");
    // A path under a regular file can never be created (ENOTDIR), even by root.
    fs::write(
        &config,
        format!(
            "[policy]\nstate_file = \"/proc/version/overkvm/throttle.json\"\nengage_ticks = 1\n\n[[device]]\ndevice = \"{}\"\niops = 500\n",
            lo.name()
        ),
    )
    .unwrap();
    let log = tmp.join("d.log");
    let mut daemon = Daemon::start(&config, &log);
    let child = greedy_vm(&tmp, &lo.path, "vmA", &dirs[0], 0);
    cgs.kids.push(child);
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        daemon.0.try_wait().unwrap().is_none(),
        "the daemon carries on"
    );
    assert!(
        !any_limit(&dirs, major, minor),
        "no limit may be written that is not on record"
    );
    let text = fs::read_to_string(&log).unwrap();
    let n = text.matches("cannot save throttle state").count();
    eprintln!("state file unwritable: {n} log line(s), no limit written");
    assert_eq!(n, 1, "logged once:\n{text}");
    assert!(metrics_answer(&log), "metrics still served");
    cgs.stop_all();
    assert!(daemon.terminate().success());
    let _ = fs::remove_dir_all(&tmp);
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
    let tmp = std::env::temp_dir().join(format!("overkvm-detach-{}", std::process::id()));
    fs::create_dir_all(&tmp).unwrap();
    let config = tmp.join("c.toml");
    fs::write(
        &config,
        format!(
            "[policy]\nstate_file = \"{}\"\nengage_ticks = 1\n\n[[device]]\ndevice = \"{}\"\niops = 800\n",
            tmp.join("state/throttle.json").display(),
            lo.name()
        ),
    )
    .unwrap();
    let log = tmp.join("d.log");
    let mut daemon = Daemon::start(&config, &log);
    for (i, n) in ["vmA", "vmB"].iter().enumerate() {
        let child = greedy_vm(&tmp, &lo.path, n, &dirs[i], i as u64);
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
    let _ = fs::remove_dir_all(&tmp);
}
