//! A real qemu guest under TCG does known direct I/O on a qcow2 overlay: `overkvm-io top -b
//! --json` must name it from its `-name`, and count at least the guest's operations on the host
//! device its image lives on.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use overkvm_tests::{
    devices::MountedFs,
    guest::{self, Guest, GuestSpec, TempDir},
    skip_unless_kernel, workspace_bin,
};
use serde_json::Value;

const GUEST_WRITES: u64 = 300;
const GUEST_READS: u64 = 300;

#[test]
fn qemu_guest_is_named_and_its_io_counted() {
    skip_unless_kernel!();
    if let Some(reason) = guest::missing_tools() {
        overkvm_tests::skipped(module_path!(), &reason);
        return;
    }
    let fs = MountedFs::new(256, "ext4", &[]).expect("ext4 on a loop device");
    let disk = fs.dir.join("vm1.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("64M")
        .status()
        .expect("qemu-img");
    assert!(st.success(), "qemu-img create failed");
    let _kernel = guest::guest_kernel().expect("guest kernel");

    // The real binary, as an operator runs it.
    let mut top = Command::new(workspace_bin("overkvm-io"))
        .args(["top", "-b", "--json", "-d", "0.5"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting overkvm-io");
    let stdout = top.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    // The first line proves the programs are attached.
    lines.push(
        rx.recv_timeout(Duration::from_secs(30))
            .expect("first JSON line from overkvm-io"),
    );

    let name = "overkvm-test-vm1";
    let uuid = "5b1f9c3e-7d0a-4c2e-9f4b-1a2b3c4d5e6f";
    let script = format!(
        "dd if=/dev/urandom of=/dev/vda bs=4096 count={GUEST_WRITES} oflag=direct 2>/dev/null || exit 3\n\
         dd if=/dev/vda of=/dev/null bs=4096 count={GUEST_READS} iflag=direct 2>/dev/null || exit 4\n\
         echo IO-DONE\n\
         sleep 2\n"
    );
    let work = TempDir::new("vm-named").unwrap();
    let spec = GuestSpec {
        name: name.into(),
        uuid: uuid.into(),
        disk: Some(disk.clone()),
        script,
        ..GuestSpec::default()
    };
    let started = Instant::now();
    let mut vm = Guest::boot(&spec, work.path()).expect("booting the guest");
    let qemu_pid = vm.pid();
    vm.wait_for_console("IO-DONE", Duration::from_secs(240))
        .expect("guest I/O");
    let stats = vm.qmp("query-blockstats", None).expect("query-blockstats");
    let outcome = vm.wait(Duration::from_secs(60)).expect("guest exit");
    assert_eq!(
        outcome.status, 0,
        "guest script failed:\n{}",
        outcome.console
    );
    eprintln!("guest ran {:.1}s", started.elapsed().as_secs_f64());

    // Two more intervals so the last I/O and the exit are reported.
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
            lines.push(l);
        }
    }
    let _ = top.kill();
    let _ = top.wait();
    while let Ok(l) = rx.try_recv() {
        lines.push(l);
    }

    let loop_name = fs.dev.name();
    let mut named = None;
    let (mut host_reads, mut host_writes) = (0u64, 0u64);
    for line in &lines {
        let v: Value = serde_json::from_str(line).expect("each line is one JSON object");
        for key in ["timestamp", "interval_s", "devices", "processes"] {
            assert!(v.get(key).is_some(), "missing {key} in {line}");
        }
        for p in v["processes"].as_array().unwrap() {
            if p["pid"].as_u64() != Some(qemu_pid as u64) || p["device"] != loop_name.as_str() {
                continue;
            }
            if !p["vm"].is_null() {
                named = Some(p["vm"].clone());
            }
            host_reads += p["read_ops"].as_u64().unwrap();
            host_writes += p["write_ops"].as_u64().unwrap();
        }
    }
    let vm_json = named.expect("the qemu process was reported as a VM");
    assert_eq!(vm_json["name"], name);
    assert_eq!(vm_json["uuid"], uuid);
    assert_eq!(vm_json["manager"], "qemu");

    let s = &stats[0]["stats"];
    let (rd, wr) = (
        s["rd_operations"].as_u64().unwrap_or(0),
        s["wr_operations"].as_u64().unwrap_or(0),
    );
    eprintln!(
        "guest issued r={GUEST_READS} w={GUEST_WRITES}; qemu blockstats r={rd} w={wr}; \
         host saw r={host_reads} w={host_writes} (ratio host/qemu {:.3})",
        (host_reads + host_writes) as f64 / (rd + wr).max(1) as f64
    );
    assert!(
        host_writes >= GUEST_WRITES,
        "host writes {host_writes} < guest writes {GUEST_WRITES}"
    );
    assert!(
        host_reads >= GUEST_READS,
        "host reads {host_reads} < guest reads {GUEST_READS}"
    );
}
