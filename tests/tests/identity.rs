//! VM names that never drop: a qemu process that does I/O for about 50 ms and exits between
//! two ticks is named, and one killed while doing I/O keeps its name in the interval in which
//! it exits. Checked on what `overkvm-io top -b --json` prints, with qemu-looking stand-ins
//! (`iogen` copied as `qemu-system-x86_64` with `-name guest=NAME`).

use std::{
    fs,
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use overkvm_tests::{devices::LoopDevice, serving::TempDir, skip_unless_kernel, workspace_bin};

#[test]
fn short_lived_and_exiting_qemus_keep_their_vm_names() {
    skip_unless_kernel!();
    let lo = LoopDevice::new(64).expect("loop device");
    let dir = TempDir::new("identity");
    let qemu = dir.join("qemu-system-x86_64");
    fs::copy(workspace_bin("iogen"), &qemu).unwrap();

    let mut top = Command::new(workspace_bin("overkvm-io"))
        .args(["top", "-b", "--json", "-d", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting overkvm-io top");
    let (tx, rx) = mpsc::channel::<String>();
    let out = top.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("top printed its first interval");

    // 50 reads paced at 1000/s: about 50 ms of I/O, then exit, well inside one interval.
    let started = Instant::now();
    let flash = Command::new(&qemu)
        .arg(&lo.path)
        .args(["50", "0", "4096", "0", "16777216", "3", "--rate", "1000"])
        .args(["-name", "guest=flash-crash,debug-threads=on"])
        .status()
        .expect("running the short-lived stand-in");
    let lived = started.elapsed();
    assert!(flash.success());

    // A VM doing I/O until it is killed: its last interval must still carry its name. On a
    // hybrid host it runs in a blkio (v1) cgroup of its own, whose path must be the one shown:
    // the v2 hierarchy there has no io controller.
    let blkio = std::path::Path::new("/sys/fs/cgroup/blkio");
    let hybrid = blkio.join("blkio.throttle.io_serviced").exists()
        && std::path::Path::new("/sys/fs/cgroup/unified/cgroup.procs").exists();
    let cg_name = format!("overkvm-identity-{}", std::process::id());
    let cg = blkio.join(&cg_name);
    let join = if hybrid {
        fs::create_dir_all(&cg).expect("creating a blkio cgroup");
        format!("echo $$ > {}/cgroup.procs && ", cg.display())
    } else {
        String::new()
    };
    let mut busy = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{join}exec {} {} 1000000 0 4096 16777216 16777216 5 --rate 300 \
             -name guest=killed-mid-io,debug-threads=on",
            qemu.display(),
            lo.path.display()
        ))
        .spawn()
        .expect("starting the busy stand-in");
    let busy_pid = busy.id();
    std::thread::sleep(Duration::from_millis(2500));
    busy.kill().unwrap();
    busy.wait().unwrap();

    // Two more intervals: the exit interval and the harvest after it.
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(4);
    while Instant::now() < deadline {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
            lines.push(l);
        }
    }
    let _ = Command::new("kill")
        .args(["-TERM", &top.id().to_string()])
        .status();
    let _ = top.wait();
    if hybrid {
        let _ = fs::remove_dir(&cg);
    }

    let disk = lo.name();
    // (pid, vm name or null, exited, reads) of every row on our device.
    let mut rows = Vec::new();
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
        for p in v["processes"].as_array().unwrap() {
            if p["device"] != disk.as_str() {
                continue;
            }
            rows.push((
                p["pid"].as_u64().unwrap() as u32,
                p["comm"].as_str().unwrap_or("").to_string(),
                p["vm"]["name"].as_str().map(str::to_string),
                p["exited"].as_bool().unwrap_or(false),
                p["read_ops"].as_u64().unwrap_or(0),
                p["cgroup"].as_str().unwrap_or("").to_string(),
            ));
        }
    }
    eprintln!("short-lived stand-in lived {lived:?}; rows on {disk}:");
    for r in &rows {
        eprintln!("  {r:?}");
    }
    let flash_rows: Vec<_> = rows
        .iter()
        .filter(|r| r.1.starts_with("qemu") && r.0 != busy_pid)
        .collect();
    assert!(
        !flash_rows.is_empty(),
        "the short-lived stand-in's I/O is in the report"
    );
    assert_eq!(
        flash_rows.iter().map(|r| r.4).sum::<u64>(),
        50,
        "all its reads counted"
    );
    for r in &flash_rows {
        assert_eq!(
            r.2.as_deref(),
            Some("flash-crash"),
            "a qemu that lived {lived:?} is named: {r:?}"
        );
    }
    let busy_rows: Vec<_> = rows.iter().filter(|r| r.0 == busy_pid).collect();
    assert!(
        busy_rows.iter().any(|r| r.3),
        "the killed stand-in has a row in the interval it exited: {busy_rows:?}"
    );
    for r in &busy_rows {
        assert_eq!(
            r.2.as_deref(),
            Some("killed-mid-io"),
            "named in every interval, its exit interval too: {r:?}"
        );
        if hybrid {
            assert_eq!(
                r.5,
                format!("/{cg_name}"),
                "the cgroup shown is the block controller's (v1 blkio): {r:?}"
            );
        }
    }
    if !hybrid {
        eprintln!("not a hybrid host: the blkio cgroup shown was not checked");
    }
}
