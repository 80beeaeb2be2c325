//! A VM disk on network storage: a real TCG guest whose /dev/vda is an NBD export that
//! `qemu-nbd` serves over TCP on loopback, or an iSCSI LUN of Debian's userspace target `tgtd`
//! reached by QEMU's libiscsi driver. No host block device sees that I/O, so overkvm must
//! count it from QEMU's own counters: `overkvm-io top -b --json --qmp SOCKET` reports the disk
//! in the VM's rows with `source: "qemu"`, the disk's `-drive` id and the NBD target, and its
//! sums over the intervals equal QMP `query-blockstats` and the guest's own /proc/diskstats
//! for reads, writes and flushes. A second, host-local disk of the same VM stays eBPF's: no
//! `qemu` row for it (never counted twice).

use std::{
    io::{BufRead, BufReader},
    net::{TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use overkvm_tests::{
    guest::{self, Guest, GuestSpec, TempDir},
    netstore::NbdServer,
    serving::{Serve, metric, scrape},
    skip_unless_kernel, workspace_bin,
};
use serde_json::{Value, json};

const WRITES: u64 = 300;
const READS: u64 = 200;
/// Writes each followed by fsync on the device: one flush each (the disk has a write cache).
const FLUSHED_WRITES: u64 = 5;
const INTERVAL_S: f64 = 0.5;

const IQN: &str = "iqn.2026-12.org.overkvm:netdisk";

/// tgtd serving one raw image as LUN 1 of [`IQN`] on a loopback port, with its own control
/// socket (`-C`); the target, the LUN and the daemon are removed on drop.
struct IscsiTarget {
    child: Child,
    port: u16,
    control: String,
}

impl IscsiTarget {
    fn tgtadm(control: &str, args: &[&str]) -> bool {
        Command::new("tgtadm")
            .args(["-C", control, "--lld", "iscsi"])
            .args(args)
            .status()
            .is_ok_and(|s| s.success())
    }

    fn start(image: &std::path::Path) -> IscsiTarget {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        // Its control socket is /var/run/tgtd/socket.N: one per test run, by the port.
        let control = (100 + u32::from(port) % 800).to_string();
        std::fs::create_dir_all("/var/run/tgtd").expect("/var/run/tgtd");
        let child = Command::new("tgtd")
            .args(["-f", "-C", &control, "--iscsi"])
            .arg(format!("portal=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting tgtd");
        let mut t = IscsiTarget {
            child,
            port,
            control,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(st)) = t.child.try_wait() {
                panic!("tgtd exited at start: {st}");
            }
            assert!(Instant::now() < deadline, "tgtd did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        let image = image.to_string_lossy();
        for args in [
            &["--op", "new", "--mode", "target", "--tid", "1", "-T", IQN][..],
            &[
                "--op",
                "new",
                "--mode",
                "logicalunit",
                "--tid",
                "1",
                "--lun",
                "1",
                "-b",
                &image,
            ],
            &[
                "--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL",
            ],
        ] {
            assert!(Self::tgtadm(&t.control, args), "tgtadm {args:?}");
        }
        t
    }
}

impl Drop for IscsiTarget {
    fn drop(&mut self) {
        // tgtd ignores SIGTERM while it has targets: remove them, then the daemon.
        let c = self.control.clone();
        Self::tgtadm(
            &c,
            &[
                "--op",
                "delete",
                "--mode",
                "logicalunit",
                "--tid",
                "1",
                "--lun",
                "1",
            ],
        );
        Self::tgtadm(&c, &["--op", "delete", "--mode", "target", "--tid", "1"]);
        Self::tgtadm(&c, &["--op", "delete", "--mode", "system"]);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !matches!(self.child.try_wait(), Ok(Some(_))) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Which server holds the guest's vda.
enum Backend {
    Nbd,
    Iscsi,
}

/// The `stats` of device `device` in a query-blockstats reply.
fn stats_of(reply: &Value, device: &str) -> Value {
    reply
        .as_array()
        .and_then(|a| a.iter().find(|e| e["device"] == device))
        .map(|e| e["stats"].clone())
        .unwrap_or_else(|| panic!("no {device} in {reply}"))
}

fn n(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("no {k} in {v}"))
}

/// The guest's /proc/diskstats line for vda printed as `TAG <line>`: (reads, sectors read,
/// writes, sectors written, flushes).
fn guest_diskstats(console: &str, tag: &str) -> [u64; 5] {
    let line = console
        .lines()
        .find_map(|l| l.trim().strip_prefix(tag))
        .unwrap_or_else(|| panic!("no {tag} line on the console:\n{console}"));
    let f: Vec<u64> = line
        .split_whitespace()
        .filter_map(|t| t.parse().ok())
        .collect();
    // major minor [name dropped by the parse] then fields 1.. of diskstats.
    let field = |i: usize| f[2 + i - 1];
    [field(1), field(3), field(5), field(7), field(16)]
}

#[test]
fn an_nbd_disk_is_counted_from_qemus_counters() {
    skip_unless_kernel!();
    if Command::new("qemu-nbd").arg("--version").output().is_err() {
        overkvm_tests::skipped(
            module_path!(),
            "qemu-nbd missing (apt-get install qemu-utils)",
        );
        return;
    }
    network_disk_is_counted(Backend::Nbd);
}

#[test]
fn an_iscsi_disk_is_counted_from_qemus_counters() {
    skip_unless_kernel!();
    if Command::new("tgtadm").arg("--help").output().is_err() {
        overkvm_tests::skipped(module_path!(), "tgtd missing (apt-get install tgt)");
        return;
    }
    network_disk_is_counted(Backend::Iscsi);
}

fn network_disk_is_counted(backend: Backend) {
    if let Some(reason) = guest::missing_tools() {
        overkvm_tests::skipped(module_path!(), &reason);
        return;
    }
    let _kernel = guest::guest_kernel().expect("guest kernel");
    let work = TempDir::new("netdisk").unwrap();
    let image = work.path().join("export.img");
    let local = work.path().join("local.img");
    for f in [&image, &local] {
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", "raw"])
            .arg(f)
            .arg("32M")
            .status()
            .expect("qemu-img");
        assert!(st.success());
    }
    // The server lives until the end of the test (dropped after the guest).
    let (server, target): (Box<dyn std::any::Any>, String) = match backend {
        Backend::Nbd => {
            let s = NbdServer::start(&image);
            let url = s.url();
            (Box::new(s), url)
        }
        Backend::Iscsi => {
            let s = IscsiTarget::start(&image);
            let url = format!("iscsi://127.0.0.1:{}/{IQN}/1", s.port);
            (Box::new(s), url)
        }
    };

    // The guest waits, idle, until the host writes `G` into the first byte of its local disk
    // (vdb): both sides then start from counters of an idle disk.
    let script = format!(
        "echo DS0 $(grep ' vda ' /proc/diskstats)\n\
         echo READY\n\
         until [ \"$(dd if=/dev/vdb bs=512 count=1 iflag=direct 2>/dev/null | head -c1)\" = G ]; do sleep 0.1; done\n\
         dd if=/dev/urandom of=/dev/vda bs=4096 count={WRITES} oflag=direct 2>/dev/null || exit 3\n\
         dd if=/dev/vda of=/dev/null bs=4096 count={READS} iflag=direct 2>/dev/null || exit 4\n\
         for i in $(seq {FLUSHED_WRITES}); do\n\
           dd if=/dev/zero of=/dev/vda bs=4096 count=1 seek=$i oflag=direct conv=fsync 2>/dev/null || exit 5\n\
         done\n\
         dd if=/dev/zero of=/dev/vdb bs=4096 count=50 oflag=direct 2>/dev/null || exit 6\n\
         echo DS1 $(grep ' vda ' /proc/diskstats)\n\
         echo IO-DONE\n\
         sleep 600\n"
    );
    let spec = GuestSpec {
        name: "overkvm-netdisk".into(),
        disk_drive: Some(format!(
            "file={target},format=raw,if=virtio,id=nbd0,cache=writeback"
        )),
        extra_drives: vec![format!(
            "file={},format=raw,if=virtio,id=local0,cache=writeback",
            local.display()
        )],
        script,
        ..GuestSpec::default()
    };
    let mut vm = Guest::boot(&spec, work.path()).expect("booting the guest");
    let socket = work.path().join("qmp.sock");

    let mut top = Command::new(workspace_bin("overkvm-io"))
        .args([
            "top",
            "-b",
            "--json",
            "-d",
            &INTERVAL_S.to_string(),
            "--qmp",
        ])
        .arg(&socket)
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
    vm.wait_for_console("READY", Duration::from_secs(240))
        .expect("guest boot");
    // The daemon too, started with the guest idle: its counters start from the idle disk.
    let socket_arg = socket.to_string_lossy().into_owned();
    let mut serve = Serve::start(&work.path().join("serve.log"), &["--qmp", &socket_arg]);
    // Four intervals with the guest idle: a tick reports the reading its predecessor asked
    // for, so from here on every row counts from a reading of the idle disk, which is also
    // what the test reads now (one line may have been on its way when the queue was drained,
    // and a poll may take longer than an interval: four leave room for both). The rows
    // before (boot-time I/O) are left out of the sums.
    // Lines printed during the boot wait in the channel: they are older than READY.
    lines.extend(rx.try_iter());
    for _ in 0..4 {
        lines.push(
            rx.recv_timeout(Duration::from_secs(30))
                .expect("JSON lines from overkvm-io"),
        );
    }
    let before = vm.qmp("query-blockstats", None).expect("query-blockstats");
    let idle_lines = lines.len();
    {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&local)
            .unwrap();
        f.write_all(b"G").unwrap();
        f.sync_all().unwrap();
    }
    vm.wait_for_console("IO-DONE", Duration::from_secs(240))
        .expect("guest I/O");
    // Two intervals for the last I/O to be polled and reported.
    let deadline = Instant::now() + Duration::from_secs_f64(INTERVAL_S * 5.0);
    while Instant::now() < deadline {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
            lines.push(l);
        }
    }
    let after = vm.qmp("query-blockstats", None).expect("query-blockstats");
    let body = scrape(serve.addr).expect("GET /metrics");
    serve.terminate();
    let console = vm.console();
    let _ = vm.qmp("quit", None);
    let _ = top.kill();
    let _ = top.wait();
    while let Ok(l) = rx.try_recv() {
        lines.push(l);
    }

    let mut sums = json!({});
    let mut targets = Vec::new();
    let mut storage_ops = 0;
    for (i, line) in lines.iter().enumerate() {
        let v: Value = serde_json::from_str(line).expect("one JSON object per line");
        if i >= idle_lines
            && let Some(st) = v["storage"].as_array()
        {
            for d in st {
                assert_eq!(d["device"], target.as_str(), "{d}");
                assert_eq!(d["source"], "qemu", "{d}");
                storage_ops += d["read_ops"].as_u64().unwrap() + d["write_ops"].as_u64().unwrap();
            }
        }
        for p in v["processes"].as_array().unwrap() {
            if p["source"] != "qemu" {
                continue;
            }
            if i < idle_lines {
                // Boot-time I/O, before the test's baseline: only shape checked.
                assert_eq!(p["device"], "nbd0", "{p}");
                continue;
            }
            assert_eq!(p["pid"], vm.pid(), "{p}");
            assert_eq!(p["vm"]["name"], "overkvm-netdisk", "{p}");
            assert_eq!(p["major"], 0, "{p}");
            let dev = p["device"].as_str().unwrap().to_string();
            assert_ne!(dev, "local0", "a host-local disk is eBPF's only: {p}");
            targets.push(p["target"].clone());
            for k in [
                "read_ops",
                "write_ops",
                "flush_ops",
                "read_bytes",
                "write_bytes",
            ] {
                let cur = sums[&dev][k].as_u64().unwrap_or(0);
                sums[&dev][k] = json!(cur + p[k].as_u64().unwrap());
            }
        }
    }
    assert!(
        targets.iter().all(|t| t == &json!(target)),
        "targets {targets:?}, want {target}"
    );
    let got = &sums["nbd0"];
    assert!(
        !got.is_null(),
        "no qemu rows for nbd0 in {} lines",
        lines.len()
    );
    let (b, a) = (stats_of(&before, "nbd0"), stats_of(&after, "nbd0"));
    let q = |k: &str| n(&a, k) - n(&b, k);
    let [g_rd, g_rd_sect, g_wr, g_wr_sect, g_fl] = {
        let (d0, d1) = (
            guest_diskstats(&console, "DS0 "),
            guest_diskstats(&console, "DS1 "),
        );
        std::array::from_fn(|i| d1[i] - d0[i])
    };
    eprintln!(
        "overkvm {got}; query-blockstats r={} w={} f={} rB={} wB={}; guest diskstats r={g_rd} \
         w={g_wr} f={g_fl} rB={} wB={}",
        q("rd_operations"),
        q("wr_operations"),
        q("flush_operations"),
        q("rd_bytes"),
        q("wr_bytes"),
        g_rd_sect * 512,
        g_wr_sect * 512,
    );
    for (ours, theirs) in [
        ("read_ops", "rd_operations"),
        ("write_ops", "wr_operations"),
        ("flush_ops", "flush_operations"),
        ("read_bytes", "rd_bytes"),
        ("write_bytes", "wr_bytes"),
    ] {
        assert_eq!(n(got, ours), q(theirs), "{ours} against query-blockstats");
    }
    assert_eq!(
        [
            n(got, "read_ops"),
            n(got, "write_ops"),
            n(got, "flush_ops"),
            n(got, "read_bytes"),
            n(got, "write_bytes")
        ],
        // The guest's fsync is an empty write with REQ_PREFLUSH (blkdev_issue_flush): its
        // diskstats count it as a write and its flush as a flush, virtio-blk sends QEMU only
        // the flush. So the guest's writes are QEMU's plus its flushes.
        [g_rd, g_wr - g_fl, g_fl, g_rd_sect * 512, g_wr_sect * 512],
        "overkvm against the guest's /proc/diskstats"
    );
    // /metrics: the same families, with source="qemu", and the disk's target on its info.
    let vm_series = |family: &str, op: &str| {
        metric(
            &body,
            &format!(
                "{family}{{vm=\"overkvm-netdisk\",device=\"nbd0\",op=\"{op}\",source=\"qemu\"}}"
            ),
        )
        .unwrap_or_else(|| panic!("no {family} {op} for nbd0 in /metrics:\n{body}")) as u64
    };
    assert_eq!(
        [
            vm_series("overkvm_vm_io_operations_total", "read"),
            vm_series("overkvm_vm_io_operations_total", "write"),
            vm_series("overkvm_vm_io_operations_total", "flush"),
            vm_series("overkvm_vm_io_bytes_total", "read"),
            vm_series("overkvm_vm_io_bytes_total", "write"),
        ],
        [
            q("rd_operations"),
            q("wr_operations"),
            q("flush_operations"),
            q("rd_bytes"),
            q("wr_bytes")
        ],
        "/metrics against query-blockstats"
    );
    assert_eq!(
        metric(
            &body,
            &format!(
                "overkvm_vm_disk_info{{vm=\"overkvm-netdisk\",device=\"nbd0\",source=\"qemu\",target=\"{target}\"}}"
            )
        ),
        Some(1.0),
        "{body}"
    );
    assert!(
        !body.contains("device=\"local0\""),
        "the local disk is not QEMU-counted: {body}"
    );
    assert_eq!(
        storage_ops,
        n(got, "read_ops") + n(got, "write_ops"),
        "the storage target's rows sum its disks"
    );
    assert!(n(got, "write_ops") >= WRITES + FLUSHED_WRITES);
    assert!(n(got, "read_ops") >= READS);
    assert!(n(got, "flush_ops") >= FLUSHED_WRITES);
    drop(vm);
    drop(server);
}
