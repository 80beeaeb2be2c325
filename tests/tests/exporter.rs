//! The exporter end to end: `overkvm-io serve` loads the real programs, fake VMs (qemu-named
//! processes with qemu arguments) and plain processes do a known number of direct I/Os on a
//! loop device, a real Prometheus scrapes the daemon every second, and the values read back
//! through Prometheus's HTTP API must equal the issued counts exactly.

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    time::{Duration, Instant},
};

use overkvm_tests::{
    devices::LoopDevice,
    iogen::{self, IoPlan},
    serving::TempDir,
    skip_unless_kernel, workspace_bin,
};
use serde_json::Value;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// What Prometheus asks for first with native histograms on, and what it gets.
const PROTOBUF: &str =
    "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited";

/// Tools a test needs besides root and BTF; prints why and returns false when one is missing.
fn have_tools(tools: &[&str]) -> bool {
    for t in tools {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(t).is_file()));
        if !found {
            overkvm_tests::skipped(
                module_path!(),
                format!("{t} is not installed (Debian package prometheus)"),
            );
            return false;
        }
    }
    true
}

fn packaging() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on loopback")
}

/// A child process stopped with SIGTERM (then SIGKILL) when dropped.
struct Daemon {
    child: Child,
    name: &'static str,
    log: PathBuf,
}

impl Daemon {
    fn spawn(name: &'static str, cmd: &mut Command, log: PathBuf) -> Daemon {
        let out = fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Daemon { child, name, log }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn assert_running(&mut self) {
        if let Ok(Some(st)) = self.child.try_wait() {
            panic!("{} exited ({st}):\n{}", self.name, self.log());
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: plain syscall on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP/1.0 GET (no chunking, the server closes): status, headers (lower-case) and body.
fn http_get(
    addr: SocketAddr,
    target: &str,
    accept: Option<&str>,
) -> std::io::Result<(u16, String, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    write!(s, "GET {target} HTTP/1.0\r\nHost: {addr}\r\n{accept}\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, head.to_ascii_lowercase(), body.to_string()))
}

/// The value of one series in a text exposition (`name` or `name{labels}` exactly).
fn metric_value(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `overkvm-io serve` on a free loopback port.
struct Exporter {
    addr: SocketAddr,
    daemon: Daemon,
}

impl Exporter {
    fn start(dir: &Path, extra: &[&str]) -> Exporter {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let mut cmd = Command::new(workspace_bin("overkvm-io"));
        cmd.args(["serve", "--listen", &addr.to_string(), "-i", "0.5"])
            .args(extra);
        let mut e = Exporter {
            addr,
            daemon: Daemon::spawn("overkvm-io serve", &mut cmd, dir.join("serve.log")),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            e.daemon.assert_running();
            // Up once two ticks are in: the first sample is taken, and the requests that were
            // in flight when the programs were attached have completed.
            if let Ok((200, _, body)) = http_get(addr, "/metrics", None)
                && metric_value(&body, "overkvm_ticks_total").is_some_and(|t| t >= 2.0)
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no ticks after 30 s:\n{}",
                e.daemon.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        e
    }

    /// Kernel-side events counted so far, by name. Only full maps lose the I/O of the test's
    /// processes; in-flight misses and collisions come from whatever else the host does
    /// (other tests run concurrently) and are printed, not asserted.
    fn kernel_events(&self) -> Vec<(String, u64)> {
        let (_, body) = self.metrics(None);
        body.lines()
            .filter_map(|l| {
                let rest = l.strip_prefix("overkvm_kernel_events_total{event=\"")?;
                let (event, value) = rest.split_once("\"} ")?;
                Some((event.to_string(), value.parse().ok()?))
            })
            .collect()
    }

    fn metrics(&self, accept: Option<&str>) -> (String, String) {
        let (status, head, body) = http_get(self.addr, "/metrics", accept).expect("scraping");
        assert_eq!(status, 200, "{head}");
        (head, body)
    }
}

/// A Prometheus server scraping the exporter every second, with the packaged alert rules.
struct Prometheus {
    addr: SocketAddr,
    daemon: Daemon,
}

impl Prometheus {
    fn start(dir: &Path, target: SocketAddr) -> Prometheus {
        Self::start_with(dir, target, &[])
    }

    /// With extra command-line flags (feature flags).
    fn start_with(dir: &Path, target: SocketAddr, flags: &[&str]) -> Prometheus {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let rules = packaging().join("prometheus/overkvm-alerts.yml");
        let config = dir.join("p.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: overkvm\n    scrape_interval: 1s\n    scrape_timeout: 1s\n\
                 \x20   static_configs:\n      - targets: ['{target}']\n",
                rules.display()
            ),
        )
        .expect("writing p.yml");
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .args(flags);
        let mut p = Prometheus {
            addr,
            daemon: Daemon::spawn("prometheus", &mut cmd, dir.join("prometheus.log")),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            p.daemon.assert_running();
            if let Ok((200, _, _)) = http_get(addr, "/-/ready", None) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "Prometheus not ready:\n{}",
                p.daemon.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        p
    }

    fn api(&self, path: &str) -> Value {
        let (status, _, body) = http_get(self.addr, path, None).expect("querying Prometheus");
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        assert_eq!(status, 200, "{path}: {body}");
        v
    }

    /// An instant query: (labels, value) per series.
    fn query(&self, promql: &str) -> Vec<(Value, f64)> {
        let v = self.api(&format!("/api/v1/query?query={}", urlencode(promql)));
        v["data"]["result"]
            .as_array()
            .map(|r| {
                r.iter()
                    .filter_map(|s| {
                        let val = s["value"][1].as_str()?.parse().ok()?;
                        Some((s["metric"].clone(), val))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The single value of a query, or None while it has no series.
    fn value(&self, promql: &str) -> Option<f64> {
        let r = self.query(promql);
        assert!(r.len() <= 1, "{promql}: several series {r:?}");
        r.first().map(|(_, v)| *v)
    }

    /// Waits until every query equals its expected value; on timeout, fails showing them all.
    fn wait_for(&self, expected: &[(String, f64)], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let got: Vec<Option<f64>> = expected.iter().map(|(q, _)| self.value(q)).collect();
            if got
                .iter()
                .zip(expected)
                .all(|(g, (_, want))| *g == Some(*want))
            {
                return;
            }
            if Instant::now() > deadline {
                let table: Vec<String> = expected
                    .iter()
                    .zip(&got)
                    .map(|((q, want), g)| format!("  {q}: want {want}, got {g:?}"))
                    .collect();
                panic!("Prometheus values after {timeout:?}:\n{}", table.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// A qemu stand-in: `fakevm` copied as `qemu-system-x86_64`, killed when dropped.
struct FakeVm {
    name: String,
    uuid: String,
    child: Child,
    stdin: Option<ChildStdin>,
}

struct VmPlan {
    reads: u64,
    writes: u64,
    final_reads: u64,
    final_writes: u64,
    /// Region of the device, in MiB: [start, start + len).
    start_mb: u64,
    len_mb: u64,
}

impl FakeVm {
    fn qemu_binary(dir: &Path) -> PathBuf {
        let bin = dir.join("qemu-system-x86_64");
        if !bin.exists() {
            fs::copy(workspace_bin("fakevm"), &bin).expect("copying fakevm");
        }
        bin
    }

    /// Starts the VM and waits until its first I/Os are done.
    fn start(dir: &Path, name: &str, drive: &Path, plan: &VmPlan) -> FakeVm {
        let uuid = format!(
            "{:08x}-0000-4000-8000-{:012x}",
            std::process::id(),
            name.bytes().map(u64::from).sum::<u64>()
        );
        let mut child = Command::new(Self::qemu_binary(dir))
            .args(["-name", &format!("guest={name},debug-threads=on")])
            .args(["-uuid", &uuid, "-machine", "q35", "-m", "512"])
            .arg("-drive")
            .arg(format!(
                "file={},format=raw,if=virtio,cache=none",
                drive.display()
            ))
            .args(["--reads", &plan.reads.to_string()])
            .args(["--writes", &plan.writes.to_string()])
            .args(["--final-reads", &plan.final_reads.to_string()])
            .args(["--final-writes", &plan.final_writes.to_string()])
            .args(["--start", &(plan.start_mb << 20).to_string()])
            .args(["--len", &(plan.len_mb << 20).to_string()])
            .args(["--seed", &(0x9e37_79b9 + plan.start_mb).to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting the fake VM");
        let stdin = child.stdin.take();
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            let _ = BufReader::new(out).read_line(&mut line);
        }
        assert_eq!(
            line.trim(),
            "ready",
            "fake VM {name} failed: {:?}",
            child.try_wait()
        );
        FakeVm {
            name: name.to_string(),
            uuid,
            child,
            stdin,
        }
    }

    /// Lets it do its final I/O and exit; returns when it has.
    fn finish(&mut self) {
        if let Some(mut s) = self.stdin.take() {
            let _ = s.write_all(b"go\n");
        }
        let st = self.child.wait().expect("waiting for the fake VM");
        assert!(st.success(), "fake VM {} failed: {st}", self.name);
    }
}

impl Drop for FakeVm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn series(metric: &str, labels: &[(&str, &str)]) -> String {
    let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{metric}{{{}}}", l.join(","))
}

#[test]
fn vm_and_process_counts_read_back_through_prometheus_are_exact() {
    skip_unless_kernel!();
    if !have_tools(&["prometheus"]) {
        return;
    }
    let dir = TempDir::new("exporter");
    let lo = LoopDevice::new(128).expect("loop device");
    let dev = lo.name();
    let exporter = Exporter::start(&dir.0, &["--per-process", "--grace", "30"]);
    let prom = Prometheus::start(&dir.0, exporter.addr);
    let events_before = exporter.kernel_events();

    let tag = std::process::id();
    let plans = [
        VmPlan {
            reads: 700,
            writes: 300,
            final_reads: 0,
            final_writes: 0,
            start_mb: 0,
            len_mb: 32,
        },
        VmPlan {
            reads: 250,
            writes: 450,
            final_reads: 0,
            final_writes: 0,
            start_mb: 32,
            len_mb: 32,
        },
    ];
    let vms: Vec<FakeVm> = plans
        .iter()
        .enumerate()
        .map(|(i, p)| FakeVm::start(&dir.0, &format!("okvm-{tag}-vm{i}"), &lo.path, p))
        .collect();
    // Plain processes, exported by name with --per-process.
    let procs: Vec<IoPlan> = (0..3)
        .map(|i| IoPlan {
            reads: 100 + 10 * i,
            writes: 50 + 7 * i,
            block: 4096,
            start: (64 + 16 * i) << 20,
            len: 16 << 20,
            seed: 0x51ed + i,
        })
        .collect();
    for p in &procs {
        let st = iogen::spawn(&lo.path, p)
            .and_then(|mut c| c.wait())
            .expect("running iogen");
        assert!(st.success(), "iogen failed: {st}");
    }

    let mut want: Vec<(String, f64)> = Vec::new();
    for (vm, p) in vms.iter().zip(&plans) {
        for (op, n) in [("read", p.reads), ("write", p.writes)] {
            let l = [("vm", vm.name.as_str()), ("device", &dev), ("op", op)];
            want.push((series("overkvm_vm_io_operations_total", &l), n as f64));
            want.push((series("overkvm_vm_io_bytes_total", &l), (n * 4096) as f64));
        }
    }
    let (r, w) = procs
        .iter()
        .fold((0, 0), |(r, w), p| (r + p.reads, w + p.writes));
    for (op, n) in [("read", r), ("write", w)] {
        let l = [("comm", "iogen"), ("device", dev.as_str()), ("op", op)];
        want.push((series("overkvm_process_io_operations_total", &l), n as f64));
    }
    prom.wait_for(&want, Duration::from_secs(30));
    for (q, v) in &want {
        eprintln!("{q} = {v}");
    }

    // The series budget: no series for ops a VM never used, and at most 20 series for a VM
    // doing reads and writes on one device (flush aside: the budget counts reads and writes).
    for vm in &vms {
        let unused = prom.query(&format!("{{vm=\"{}\",op=~\"discard|other\"}}", vm.name));
        assert!(unused.is_empty(), "series of unused ops: {unused:?}");
        let all = prom.value(&format!("count({{vm=\"{}\"}})", vm.name));
        let budget = prom.value(&format!("count({{vm=\"{}\",op!=\"flush\"}})", vm.name));
        eprintln!(
            "{}: {all:?} series, {budget:?} without flush (reads and writes on {dev})",
            vm.name
        );
        assert!(budget.is_some_and(|n| n <= 20.0), "{budget:?} series");
    }

    // Identity rides on the info metric, with the PID; the I/O series carry no PID.
    for vm in &vms {
        let info = prom.query(&format!("overkvm_vm_info{{vm=\"{}\"}}", vm.name));
        assert_eq!(info.len(), 1, "{info:?}");
        let labels = &info[0].0;
        assert_eq!(labels["uuid"], vm.uuid.as_str());
        assert_eq!(labels["manager"], "qemu");
        assert_eq!(labels["pid"], vm.child.id().to_string().as_str());
    }
    let pids = prom.query("count({__name__=~\"overkvm_vm_io_.*\", pid!=\"\"})");
    assert!(pids.is_empty(), "I/O series with a pid label: {pids:?}");

    // Device totals hold every process (and whatever else touched the device).
    let vm_sum: u64 = plans.iter().map(|p| p.reads).sum::<u64>() + r;
    let dev_reads = prom
        .value(&series(
            "overkvm_device_io_operations_total",
            &[("device", &dev), ("op", "read")],
        ))
        .unwrap_or(0.0);
    assert!(
        dev_reads >= vm_sum as f64,
        "device reads {dev_reads} < {vm_sum}"
    );

    // The daemon's own health is there, and nothing was lost in the kernel.
    let runs = prom.query("overkvm_bpf_program_runs_total");
    assert!(!runs.is_empty(), "no BPF program run counts");
    for ((event, after), (_, before)) in exporter.kernel_events().iter().zip(&events_before) {
        eprintln!("kernel event {event}: +{} during the test", after - before);
        if event.ends_with("map_full") {
            assert_eq!(after, before, "{event} during the test");
        }
    }
    assert!(
        prom.value("overkvm_exporter_render_duration_seconds")
            .is_some()
    );

    // Every completion is in the latency histogram, exactly once.
    let mut lat = Vec::new();
    for (vm, p) in vms.iter().zip(&plans) {
        for (op, n) in [("read", p.reads), ("write", p.writes)] {
            let l = [("vm", vm.name.as_str()), ("device", &dev), ("op", op)];
            lat.push((series("overkvm_vm_io_latency_seconds_count", &l), n as f64));
            let mut b = l.to_vec();
            b.push(("le", "+Inf"));
            lat.push((series("overkvm_vm_io_latency_seconds_bucket", &b), n as f64));
        }
    }
    let counted: f64 = lat.iter().filter_map(|(q, _)| prom.value(q)).sum();
    assert!(
        counted > 0.0,
        "every latency histogram is empty while the ops are counted: the report's rows carry \
         no per-op histograms (ProcessRow.latency, filled in ReportBuilder::build)"
    );
    prom.wait_for(&lat, Duration::from_secs(5));
    let p99 = prom.value(&format!(
        "histogram_quantile(0.99, sum by (le) (overkvm_vm_io_latency_seconds_bucket{{vm=\"{}\",op=\"read\"}}))",
        vms[0].name
    ));
    assert!(
        p99.is_some_and(|v| v > 0.0 && v < 1.0),
        "p99 read latency {p99:?}"
    );

    // Every dashboard query is valid PromQL against this server, and most show data (rates
    // need a few scrapes first).
    let deadline = Instant::now() + Duration::from_secs(15);
    while prom
        .value("count_over_time(overkvm_ticks_total[1m])")
        .is_none_or(|n| n < 4.0)
    {
        assert!(Instant::now() < deadline, "Prometheus keeps no samples");
        std::thread::sleep(Duration::from_millis(250));
    }
    let dash = fs::read_to_string(packaging().join("grafana/overkvm.json")).expect("dashboard");
    let dash: Value = serde_json::from_str(&dash).expect("dashboard JSON");
    let mut with_data = 0;
    for panel in dash["panels"].as_array().into_iter().flatten() {
        for t in panel["targets"].as_array().into_iter().flatten() {
            let Some(expr) = t["expr"].as_str() else {
                continue;
            };
            let q = expr
                .replace("$__rate_interval", "1m")
                .replace("$instance", ".*")
                .replace("$vm", ".*")
                .replace("$device", ".*");
            if !prom.query(&q).is_empty() {
                with_data += 1;
            }
        }
    }
    eprintln!("{with_data} dashboard queries returned data");
    assert!(
        with_data >= 8,
        "only {with_data} dashboard queries returned data"
    );
}

#[test]
fn an_exited_vm_keeps_its_final_io_then_expires_after_grace() {
    skip_unless_kernel!();
    if !have_tools(&["prometheus"]) {
        return;
    }
    const GRACE: Duration = Duration::from_secs(3);
    let dir = TempDir::new("exporter");
    let lo = LoopDevice::new(64).expect("loop device");
    let dev = lo.name();
    let exporter = Exporter::start(&dir.0, &["--grace", "3"]);
    let prom = Prometheus::start(&dir.0, exporter.addr);

    let plan = VmPlan {
        reads: 400,
        writes: 100,
        final_reads: 123,
        final_writes: 45,
        start_mb: 0,
        len_mb: 32,
    };
    let name = format!("okvm-{}-exiting", std::process::id());
    let mut vm = FakeVm::start(&dir.0, &name, &lo.path, &plan);
    let q = |op: &str| {
        series(
            "overkvm_vm_io_operations_total",
            &[("vm", &name), ("device", &dev), ("op", op)],
        )
    };
    // Seen alive, with its first I/O.
    prom.wait_for(
        &[
            (q("read"), plan.reads as f64),
            (q("write"), plan.writes as f64),
        ],
        Duration::from_secs(20),
    );
    // Last I/O and exit within one sampling interval: the daemon reads that delta after the
    // process is gone and must still give it to the VM.
    vm.finish();
    let exited_at = Instant::now();
    let total_r = (plan.reads + plan.final_reads) as f64;
    let total_w = (plan.writes + plan.final_writes) as f64;
    let last = |op: &str| format!("last_over_time({}[5m])", q(op));
    prom.wait_for(
        &[(last("read"), total_r), (last("write"), total_w)],
        Duration::from_secs(15),
    );
    let resets = prom.value(&format!("resets({}[5m])", q("read")));
    assert_eq!(resets, Some(0.0), "the counter went backwards");

    // Gone from /metrics once the grace period has passed, and not before.
    let needle = format!("vm=\"{name}\"");
    let gone_after = loop {
        let (_, body) = exporter.metrics(None);
        if !body.contains(&needle) {
            break exited_at.elapsed();
        }
        assert!(
            exited_at.elapsed() < GRACE + Duration::from_secs(5),
            "series of {name} still exported after {:?}",
            exited_at.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("series of {name} gone {gone_after:?} after exit (grace {GRACE:?})");
    assert!(
        // The last tick that saw it alive may be up to one interval (0.5 s) before the exit.
        gone_after + Duration::from_millis(700) >= GRACE,
        "series gone {gone_after:?} after exit, before the {GRACE:?} grace"
    );
    drop(lo);
}

/// Prometheus 2.42 with native histograms on asks for protobuf and keeps one series per
/// latency histogram, whose count is every completion and whose sum is the kernel's.
#[test]
fn native_histograms_reach_prometheus_as_one_series_each() {
    skip_unless_kernel!();
    if !have_tools(&["prometheus"]) {
        return;
    }
    let dir = TempDir::new("exporter-native");
    let lo = LoopDevice::new(64).expect("loop device");
    let dev = lo.name();
    let exporter = Exporter::start(&dir.0, &["--grace", "60"]);
    let prom = Prometheus::start_with(
        &dir.0,
        exporter.addr,
        &["--enable-feature=native-histograms"],
    );
    let plan = VmPlan {
        reads: 300,
        writes: 200,
        final_reads: 0,
        final_writes: 0,
        start_mb: 0,
        len_mb: 32,
    };
    let name = format!("okvm-{}-native", std::process::id());
    let mut vm = FakeVm::start(&dir.0, &name, &lo.path, &plan);
    let sel = |op: &str| format!("{{vm=\"{name}\",device=\"{dev}\",op=\"{op}\"}}");
    let want = [
        (
            format!(
                "histogram_count(overkvm_vm_io_latency_seconds{})",
                sel("read")
            ),
            plan.reads as f64,
        ),
        (
            format!(
                "histogram_count(overkvm_vm_io_latency_seconds{})",
                sel("write")
            ),
            plan.writes as f64,
        ),
        (
            format!("overkvm_vm_io_operations_total{}", sel("read")),
            plan.reads as f64,
        ),
    ];
    prom.wait_for(&want, Duration::from_secs(30));
    // No classic series: one native series per histogram.
    let classic = prom.query(&format!(
        "{{__name__=~\"overkvm_vm_io_latency_seconds_(bucket|sum|count)\",vm=\"{name}\"}}"
    ));
    assert!(classic.is_empty(), "classic histogram series: {classic:?}");
    let sum = prom.value(&format!(
        "histogram_sum(overkvm_vm_io_latency_seconds{})",
        sel("read")
    ));
    let p50 = prom.value(&format!(
        "histogram_quantile(0.5, overkvm_vm_io_latency_seconds{})",
        sel("read")
    ));
    let all = prom.value(&format!("count({{vm=\"{name}\"}})"));
    eprintln!("native: read sum {sum:?} s, p50 {p50:?} s, {all:?} series for {name}");
    assert!(
        sum.is_some_and(|s| s > 0.0 && s < plan.reads as f64),
        "{sum:?}"
    );
    assert!(p50.is_some_and(|v| v > 0.0 && v < 1.0), "{p50:?}");
    assert!(all.is_some_and(|n| n <= 10.0), "{all:?} series");
    let (head, _) = exporter.metrics(Some(
        "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited",
    ));
    assert!(
        head.contains(&format!("content-type: {}", PROTOBUF.to_ascii_lowercase())),
        "{head}"
    );
    vm.finish();
    drop(lo);
}

/// A tenant names its VM `ev"il<ESC>[31m<newline>vm`: two real Prometheus servers, one scraping
/// text (OpenMetrics) and one protobuf (native histograms on), store the same `vm` label, with
/// the ESC and the newline shown as `top` shows them, and the VM's reads counted exactly.
#[test]
fn a_hostile_vm_name_is_one_escaped_label_in_prometheus_whatever_the_format() {
    skip_unless_kernel!();
    if !have_tools(&["prometheus"]) {
        return;
    }
    let dir = TempDir::new("exporter-hostile");
    let lo = LoopDevice::new(64).expect("loop device");
    let dev = lo.name();
    let exporter = Exporter::start(&dir.0, &["--grace", "60"]);
    let text_dir = dir.join("text");
    let proto_dir = dir.join("protobuf");
    fs::create_dir_all(&text_dir).unwrap();
    fs::create_dir_all(&proto_dir).unwrap();
    let text = Prometheus::start(&text_dir, exporter.addr);
    let proto = Prometheus::start_with(
        &proto_dir,
        exporter.addr,
        &["--enable-feature=native-histograms"],
    );
    let name = format!("ev\"il\x1b[31m\nvm-{}", std::process::id());
    let shown = format!("ev\"il\\x1b[31m\\x0avm-{}", std::process::id());
    let plan = VmPlan {
        reads: 120,
        writes: 0,
        final_reads: 0,
        final_writes: 0,
        start_mb: 0,
        len_mb: 16,
    };
    let mut vm = FakeVm::start(&dir.0, &name, &lo.path, &plan);
    let reads = format!("overkvm_vm_io_operations_total{{device=\"{dev}\",op=\"read\"}}");
    for (format, prom) in [("text", &text), ("protobuf", &proto)] {
        let deadline = Instant::now() + Duration::from_secs(30);
        let series = loop {
            let got = prom.query(&reads);
            if got.iter().any(|(_, v)| *v >= plan.reads as f64) {
                break got;
            }
            assert!(Instant::now() < deadline, "{format}: {got:?}");
            std::thread::sleep(Duration::from_millis(250));
        };
        let labels: Vec<(&str, f64)> = series
            .iter()
            .filter_map(|(m, v)| Some((m["vm"].as_str()?, *v)))
            .collect();
        assert_eq!(labels, [(shown.as_str(), plan.reads as f64)], "{format}");
        let values = prom.api("/api/v1/label/vm/values");
        let values: Vec<&str> = values["data"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        assert!(
            values.iter().all(|v| !v.chars().any(char::is_control)),
            "{format}: a control character in a vm label: {values:?}"
        );
    }
    vm.finish();
    drop(lo);
}

/// Over `--max-vms`, VMs are left out of `/metrics`, counted and logged, never all exported.
#[test]
fn vms_over_the_cap_are_left_out_and_counted() {
    skip_unless_kernel!();
    let dir = TempDir::new("exporter-cap");
    let lo = LoopDevice::new(64).expect("loop device");
    let exporter = Exporter::start(&dir.0, &["--max-vms", "1"]);
    let plan = |start_mb| VmPlan {
        reads: 100,
        writes: 20,
        final_reads: 0,
        final_writes: 0,
        start_mb,
        len_mb: 16,
    };
    let tag = std::process::id();
    let mut vms: Vec<FakeVm> = (0..2)
        .map(|i| {
            FakeVm::start(
                &dir.0,
                &format!("okvm-{tag}-cap{i}"),
                &lo.path,
                &plan(16 * i),
            )
        })
        .collect();
    // Other VMs on the host (concurrent tests) count too: at least our two are known.
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        let (_, body) = exporter.metrics(None);
        if metric_value(&body, "overkvm_exporter_vms_dropped").is_some_and(|n| n >= 1.0) {
            break body;
        }
        assert!(Instant::now() < deadline, "nothing dropped:\n{body}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let infos = body
        .lines()
        .filter(|l| l.starts_with("overkvm_vm_info{"))
        .count();
    assert_eq!(infos, 1, "exported VMs with --max-vms 1:\n{body}");
    let log = exporter.daemon.log();
    assert!(log.contains("over the cap"), "no log line:\n{log}");
    for vm in &mut vms {
        vm.finish();
    }
    drop(lo);
}

#[test]
fn exposition_passes_promtool_and_negotiates_openmetrics() {
    skip_unless_kernel!();
    if !have_tools(&["promtool"]) {
        return;
    }
    let dir = TempDir::new("exporter");
    let lo = LoopDevice::new(64).expect("loop device");
    let exporter = Exporter::start(&dir.0, &["--per-process"]);
    let mut vm = FakeVm::start(
        &dir.0,
        &format!("okvm-{}-lint \"quoted\\name\"", std::process::id()),
        &lo.path,
        &VmPlan {
            reads: 50,
            writes: 50,
            final_reads: 0,
            final_writes: 0,
            start_mb: 0,
            len_mb: 16,
        },
    );
    // Wait for the VM's series (other VMs on the host may show up too), with the name
    // escaped as the text format wants.
    let escaped = format!(r#"vm="okvm-{}-lint \"quoted\\name\"""#, std::process::id());
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        let (_, body) = exporter.metrics(None);
        if body.contains(&escaped) {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "no series with {escaped}:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };

    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting promtool");
    if let Some(mut s) = lint.stdin.take() {
        s.write_all(body.as_bytes()).expect("feeding promtool");
    }
    let out = lint.wait_with_output().expect("promtool");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {}\n{said}",
        out.status
    );

    let (head, om) = exporter.metrics(Some("application/openmetrics-text;version=1.0.0"));
    assert!(
        head.contains(&format!("content-type: {OPENMETRICS}")),
        "{head}"
    );
    assert!(om.ends_with("# EOF\n"));
    assert!(om.contains("# TYPE overkvm_vm_io_operations counter"));
    let (status, _, _) = http_get(exporter.addr, "/", None).expect("GET /");
    assert_eq!(status, 404);
    vm.finish();
}

/// The packaged alert rules load and do what their unit tests say (no kernel needed).
#[test]
fn packaged_alert_rules_pass_promtool() {
    if !have_tools(&["promtool"]) {
        return;
    }
    let dir = packaging().join("prometheus");
    for args in [
        vec!["check", "rules", "overkvm-alerts.yml"],
        vec!["test", "rules", "overkvm-alerts.test.yml"],
        vec!["check", "config", "overkvm.yml"],
    ] {
        let out = Command::new("promtool")
            .args(&args)
            .current_dir(&dir)
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
    let dash = fs::read_to_string(packaging().join("grafana/overkvm.json")).expect("dashboard");
    let v: Value = serde_json::from_str(&dash).expect("the dashboard is JSON");
    assert!(v["panels"].as_array().is_some_and(|p| !p.is_empty()));
}

/// A real qemu guest under TCG does known direct I/O on a qcow2 overlay: its counts, read back
/// through Prometheus by VM name, are at least what the guest issued.
#[test]
fn a_real_guest_is_exported_by_name_through_prometheus() {
    skip_unless_kernel!();
    if !have_tools(&["prometheus"]) {
        return;
    }
    if let Some(reason) = overkvm_tests::guest::missing_tools() {
        overkvm_tests::skipped(module_path!(), &reason);
        return;
    }
    let dir = TempDir::new("exporter-guest");
    let fs_ = overkvm_tests::devices::MountedFs::new(256, "ext4", &[]).expect("ext4 on loop");
    let disk = fs_.dir.join("g.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("64M")
        .status()
        .expect("qemu-img");
    assert!(st.success());
    let exporter = Exporter::start(&dir.0, &["--grace", "60"]);
    let prom = Prometheus::start(&dir.0, exporter.addr);
    let name = format!("okvm-guest-{}", std::process::id());
    let (writes, reads) = (200u64, 200u64);
    let spec = overkvm_tests::guest::GuestSpec {
        name: name.clone(),
        disk: Some(disk.clone()),
        script: format!(
            "dd if=/dev/urandom of=/dev/vda bs=4096 count={writes} oflag=direct 2>/dev/null || exit 3\n\
             dd if=/dev/vda of=/dev/null bs=4096 count={reads} iflag=direct 2>/dev/null || exit 4\n"
        ),
        ..overkvm_tests::guest::GuestSpec::default()
    };
    let work = overkvm_tests::guest::TempDir::new("exporter-guest-vm").unwrap();
    let mut vm = overkvm_tests::guest::Guest::boot(&spec, work.path()).expect("boot");
    let out = vm.wait(Duration::from_secs(240)).expect("guest run");
    assert_eq!(out.status, 0, "guest script failed:\n{}", out.console);
    let dev = fs_.dev.name();
    let q = |op: &str| {
        format!("overkvm_vm_io_operations_total{{vm=\"{name}\",device=\"{dev}\",op=\"{op}\"}}")
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut w, mut r) = (None, None);
    while Instant::now() < deadline {
        w = prom.value(&q("write"));
        r = prom.value(&q("read"));
        if w.is_some_and(|v| v >= writes as f64) && r.is_some_and(|v| v >= reads as f64) {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "guest issued r={reads} w={writes}; Prometheus has r={r:?} w={w:?} for vm {name} on {dev}"
    );
    assert!(
        w.is_some_and(|v| v >= writes as f64),
        "writes via Prometheus: {w:?}"
    );
    assert!(
        r.is_some_and(|v| v >= reads as f64),
        "reads via Prometheus: {r:?}"
    );
    drop(exporter);
}
