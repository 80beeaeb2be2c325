//! `overkvm-io calibrate` on a real loop device: the IOPS it reports are the I/Os the kernel
//! counted in /proc/diskstats meanwhile, and `--write` refuses a mounted device.

use std::process::Command;

use overkvm_tests::{
    devices::{LoopDevice, MountedFs},
    diskstats, workspace_bin,
};

fn skip() -> bool {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        overkvm_tests::skipped(module_path!(), "not root (making loop devices needs root)");
        return true;
    }
    false
}

fn calibrate(args: &[&str]) -> std::process::Output {
    Command::new(workspace_bin("overkvm-io"))
        .arg("calibrate")
        .args(args)
        .output()
        .expect("running overkvm-io calibrate")
}

#[test]
fn calibrate_counts_what_the_kernel_counted() {
    if skip() {
        return;
    }
    let dev = LoopDevice::new(128).expect("loop device");
    let path = dev.path.to_string_lossy().into_owned();
    let before = diskstats::ops(&dev.name());
    let out = calibrate(&[&path, "--json", "--seconds", "1", "--depths", "1,8,32"]);
    let after = diskstats::ops(&dev.name());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let steps = v["steps"].as_array().expect("steps");
    let random: Vec<&serde_json::Value> = steps
        .iter()
        .filter(|s| s["pattern"] == "rand_read")
        .collect();
    assert_eq!(random.len(), 3, "{v}");
    // Ground truth: the kernel's count of completed reads on our device during the run. The
    // random steps are 4 KiB direct reads (one request each); the sequential step's 1 MiB
    // reads may be split, so it is compared through the tool's own diskstats column.
    let ours: u64 = random.iter().map(|s| s["ops"].as_u64().unwrap()).sum();
    let seq_requests: u64 = steps
        .iter()
        .filter(|s| s["pattern"] == "seq_read")
        .map(|s| s["device_ops"].as_u64().unwrap())
        .sum();
    let kernel = after.0 - before.0;
    let expected = ours + seq_requests;
    eprintln!(
        "calibrate: {ours} random reads + {seq_requests} sequential requests; kernel counted {kernel} reads"
    );
    assert!(
        kernel >= expected && kernel - expected <= expected / 100 + 50,
        "kernel counted {kernel} reads, calibrate {expected}"
    );
    for s in &random {
        let iops = s["iops"].as_f64().unwrap();
        let by_kernel = s["device_ops"].as_f64().unwrap() / s["seconds"].as_f64().unwrap();
        eprintln!(
            "depth {}: {iops:.0} IOPS (diskstats {by_kernel:.0}), p95 {:.0} us",
            s["depth"], s["lat_p95_us"]
        );
        assert!(iops > 0.0);
        assert!((iops / by_kernel - 1.0).abs() < 0.02, "{s}");
    }
    assert_eq!(
        after.1, before.1,
        "read-only by default: no write reached the device"
    );
    let sug = &v["suggestion"];
    assert!(sug["iops"].as_u64().unwrap() > 0, "{sug}");
    assert!(
        sug["toml"]
            .as_str()
            .unwrap()
            .contains(&format!("device = \"{}\"", dev.name()))
    );
}

#[test]
fn calibrate_write_refuses_a_mounted_device_and_writes_a_scratch_one() {
    if skip() {
        return;
    }
    let fs = match MountedFs::new(64, "ext4", &[]) {
        Ok(f) => f,
        Err(e) => {
            overkvm_tests::skipped(module_path!(), format!("cannot make a mounted ext4: {e:#}"));
            return;
        }
    };
    std::fs::write(fs.dir.join("keep"), "data").unwrap();
    let path = fs.dev.path.to_string_lossy().into_owned();
    let before = diskstats::ops(&fs.dev.name());
    let out = calibrate(&[&path, "--write", "--seconds", "0.2", "--depths", "1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "writes to a mounted device must be refused"
    );
    assert!(
        err.contains("mounted on") && err.contains("refusing"),
        "{err}"
    );
    assert_eq!(
        diskstats::ops(&fs.dev.name()).1,
        before.1,
        "nothing written"
    );
    assert_eq!(
        std::fs::read_to_string(fs.dir.join("keep")).unwrap(),
        "data"
    );

    // A scratch device nothing uses: writes are measured and reach the device.
    let scratch = LoopDevice::new(64).expect("loop device");
    let sp = scratch.path.to_string_lossy().into_owned();
    let before = diskstats::ops(&scratch.name());
    let out = calibrate(&[
        &sp,
        "--write",
        "--json",
        "--seconds",
        "0.3",
        "--depths",
        "1,4",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let writes: u64 = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["pattern"] == "rand_write")
        .map(|s| s["ops"].as_u64().unwrap())
        .sum();
    let kernel = diskstats::ops(&scratch.name()).1 - before.1;
    assert!(
        writes > 0 && kernel >= writes,
        "{writes} vs kernel {kernel}"
    );
    assert!(v["suggestion"]["write_iops"].as_u64().unwrap() > 0);
}
