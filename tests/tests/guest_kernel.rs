//! The accounting and the throttle on a second, older kernel: Debian's 6.1 cloud kernel in a
//! qemu/TCG guest (see `overkvm_tests::guest`). It has no `block_io_start`/`block_io_done`, so
//! overkvm runs on its fallback hooks (`block_getrq` / `block_rq_issue` / `block_rq_complete`),
//! and its init mounts cgroup v2 with `+io +memory`, so `io.max` and cgroup writeback are real.
//!
//! Each test boots its own guest holding the host-built `overkvm-io`, the `iogen` helper (also as
//! `qemu-system-x86_64`, so that with `-name guest=X -uuid U` appended it looks like a VM) and
//! their shared libraries. The guest script does the work and prints raw results (JSON lines of
//! `top`, io.stat counters, uptimes) between `OKVM-BEGIN tag` / `OKVM-END tag` markers or on
//! `OKVM-*` lines; the host parses and judges them. Anything that goes wrong inside prints
//! `OKVM-FAIL reason` and exits non-zero, which fails the test with the guest's console shown.
//!
//! Every test name starts with `guest61_`: `cargo xtask test guest61` runs only these.

use std::{
    collections::BTreeMap,
    fs::File,
    path::PathBuf,
    time::{Duration, Instant},
};

use overkvm::throttle::budget::jain_index;
use overkvm_common::Health;
use overkvm_tests::{
    guest::{self, Guest, GuestSpec, START_MARKER, TempDir},
    skip_unless_kernel, workspace_bin,
};
use serde_json::Value;

/// Where the test binaries live in the guest.
const BIN: &str = "/overkvm/bin";
/// `iogen` under a qemu name: a "VM" doing exact, greedy or buffered I/O.
const VM_IOGEN: &str = "/overkvm/vm/qemu-system-x86_64";
const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Harness

/// Skips (with the reason on stderr) when guests cannot run here.
macro_rules! skip_unless_guest {
    () => {
        skip_unless_kernel!();
        if let Some(why) = guest::missing_tools() {
            overkvm_tests::skipped(module_path!(), &why);
            return;
        }
    };
}

/// The files every guest gets: the binaries, a qemu-named copy of iogen and their libraries.
fn guest_files() -> Vec<(PathBuf, String)> {
    let iogen = PathBuf::from(env!("CARGO_BIN_EXE_iogen"));
    let bins = [
        (workspace_bin("overkvm-io"), format!("{BIN}/overkvm-io")),
        (iogen.clone(), format!("{BIN}/iogen")),
        (iogen, VM_IOGEN.to_string()),
    ];
    let mut files: Vec<(PathBuf, String)> = Vec::new();
    for (host, at) in bins {
        let with_libs = guest::binary_with_libs(&host, &at)
            .unwrap_or_else(|e| panic!("libraries of {}: {e:#}", host.display()));
        for f in with_libs {
            if !files.iter().any(|(_, g)| *g == f.1) {
                files.push(f);
            }
        }
    }
    files
}

/// Shell functions every script starts with.
const PRELUDE: &str = r#"set -u
export PATH=/overkvm/bin:$PATH
# Only emergencies on the console: kernel messages must not cut the lines the host parses.
dmesg -n 1 2>/dev/null
okvm_fail() { echo "OKVM-FAIL $*"; exit 1; }
okvm_section() { echo "OKVM-BEGIN $1"; cat "$2"; echo; echo "OKVM-END $1"; }
okvm_now() { read -r up _ < /proc/uptime; echo "$up"; }
# okvm_wait_output FILE PID: 0 once FILE is non-empty; 1 if PID died or 120 s passed first.
okvm_wait_output() {
    n=0
    while [ ! -s "$1" ]; do
        kill -0 "$2" 2>/dev/null || return 1
        [ "$n" -ge 1200 ] && return 1
        usleep 100000
        n=$((n + 1))
    done
}
# okvm_wait_idle PID: 0 once PID sleeps in (clock_)nanosleep (iogen --hold after its I/O);
# 1 if PID is gone or 120 s passed first.
okvm_wait_idle() {
    n=0
    while :; do
        read -r nr _ < "/proc/$1/syscall" || return 1
        { [ "$nr" = 230 ] || [ "$nr" = 35 ]; } && return 0
        [ "$n" -ge 1200 ] && return 1
        usleep 50000
        n=$((n + 1))
    done
}
# Starts `overkvm-io top -b --json -d $1` writing /tmp/top.json; returns once it reported.
okvm_start_top() {
    overkvm-io top -b --json --all-bios -d "$1" > /tmp/top.json 2> /tmp/top.err &
    TOP=$!
    okvm_wait_output /tmp/top.json "$TOP" || {
        okvm_section top-stderr /tmp/top.err
        okvm_fail "overkvm-io top printed no report"
    }
}
# SIGTERM: a non-interactive shell starts background jobs with SIGINT ignored.
okvm_stop_top() {
    kill -TERM "$TOP"
    wait "$TOP"
    echo "OKVM-TOP-RC $?"
    okvm_section top /tmp/top.json
    okvm_section top-stderr /tmp/top.err
}
"#;

/// What a finished guest left.
struct Ran {
    console: String,
}

impl Ran {
    /// Lines between `OKVM-BEGIN tag` and `OKVM-END tag` (the last such section), empty lines
    /// dropped.
    fn section(&self, tag: &str) -> Vec<&str> {
        let (begin, end) = (format!("OKVM-BEGIN {tag}"), format!("OKVM-END {tag}"));
        let mut out = Vec::new();
        let mut inside = false;
        for line in self.console.lines() {
            if line == begin {
                inside = true;
                out.clear();
            } else if line == end {
                inside = false;
            } else if inside && !line.trim().is_empty() {
                out.push(line);
            }
        }
        out
    }

    /// The words after `OKVM-<key> ` on every line that has it.
    fn values(&self, key: &str) -> Vec<Vec<&str>> {
        let prefix = format!("OKVM-{key} ");
        self.console
            .lines()
            .filter_map(|l| l.strip_prefix(prefix.as_str()))
            .map(|rest| rest.split_whitespace().collect())
            .collect()
    }

    /// The single `OKVM-<key>` line's words; panics with the console when absent.
    fn value(&self, key: &str) -> Vec<&str> {
        self.values(key)
            .pop()
            .unwrap_or_else(|| panic!("no OKVM-{key} line in the guest's output"))
    }

    /// The JSON lines of a section, each parsed.
    fn json_lines(&self, tag: &str) -> Vec<Value> {
        self.section(tag)
            .into_iter()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("section {tag}: a line is not JSON ({e}): {l:?}"))
            })
            .collect()
    }
}

/// Boots a 6.1 guest with `disk_mb` of raw disk as /dev/vda, cgroup2 with `+io +memory`, the
/// test binaries and `script` (after the prelude); waits for it to power off. A non-zero exit
/// fails the test with the whole console. Prints the timings.
fn run_guest(test: &str, disk_mb: u64, script: &str, timeout: Duration) -> Ran {
    run_guest_with(test, disk_mb, script, timeout, |_| {})
}

/// [`run_guest`], calling `started` (e.g. to send QMP commands) once the script has started.
fn run_guest_with(
    test: &str,
    disk_mb: u64,
    script: &str,
    timeout: Duration,
    started: impl FnOnce(&Guest),
) -> Ran {
    let t0 = Instant::now();
    let kernel = guest::guest_kernel().expect("Debian 6.1 guest kernel");
    let work = TempDir::new("g61").expect("work dir");
    let disk = work.path().join("disk.img");
    File::create(&disk)
        .and_then(|f| f.set_len(disk_mb * MIB))
        .expect("creating the guest disk");
    let spec = GuestSpec {
        name: test.replace('_', "-"),
        disk: Some(disk),
        script: format!("{PRELUDE}\n{script}"),
        memory_mb: 384,
        files: guest_files(),
        cgroup2: true,
        ..GuestSpec::default()
    };
    let t_boot = Instant::now();
    let mut g = Guest::boot(&spec, work.path()).expect("starting qemu");
    if let Err(e) = g.wait_for_console(START_MARKER, Duration::from_secs(120)) {
        panic!("guest {test} did not start its script: {e:#}");
    }
    let booted = t_boot.elapsed();
    started(&g);
    let outcome = match g.wait(timeout) {
        Ok(o) => o,
        Err(e) => panic!("guest {test}: {e:#}\n--- console ---\n{}", g.console()),
    };
    let total = t_boot.elapsed();
    eprintln!(
        "guest61 timing {test}: kernel {} ready in {:.1}s; boot to script {:.1}s, script {:.1}s, \
         qemu total {:.1}s",
        kernel.version,
        (t_boot - t0).as_secs_f64(),
        booted.as_secs_f64(),
        (total - booted).as_secs_f64(),
        total.as_secs_f64()
    );
    if outcome.status != 0 {
        let why = outcome
            .console
            .lines()
            .filter_map(|l| l.strip_prefix("OKVM-FAIL "))
            .next_back()
            .unwrap_or("(no OKVM-FAIL line)")
            .to_string();
        panic!(
            "guest {test} script failed (exit {}): {why}\n--- guest console ---\n{}\n--- end ---",
            outcome.status, outcome.console
        );
    }
    // Shown by the harness when a later assertion fails (and with --nocapture).
    eprintln!(
        "--- guest console ({test}) ---\n{}\n--- end ---",
        outcome.console
    );
    Ran {
        console: outcome.console,
    }
}

/// Kernel-side losses over all reports (health events that mean something was not counted).
fn losses(reports: &[Value]) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for r in reports {
        let Some(events) = r["health"]["events"].as_object() else {
            continue;
        };
        for h in Health::ALL.iter().filter(|h| h.is_loss()) {
            if let Some(n) = events.get(h.name()).and_then(Value::as_u64) {
                *out.entry(h.name().to_string()).or_default() += n;
            }
        }
    }
    out
}

fn num(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is not a number in {v}"))
}

fn parse_f64(s: &str) -> f64 {
    s.parse()
        .unwrap_or_else(|_| panic!("guest printed {s:?} where a number was expected"))
}

// ---------------------------------------------------------------------------------------------
// Direct I/O plans

/// One exact direct-I/O process in the guest.
struct Plan {
    reads: u64,
    writes: u64,
    block: u64,
    /// Region of /dev/vda, in MiB.
    start_mib: u64,
    len_mib: u64,
    /// Run as a qemu-named VM with this name.
    vm: Option<&'static str>,
}

/// Shell that starts every plan at once on /dev/vda (pids in P0, P1...), prints
/// `OKVM-PID <index> <pid>` and waits until all have done their I/O. VM plans run with `--hold`
/// (alive and idle after their I/O, as a VM is, so they are still there to be named when `top`
/// reports); [`stop_plans`] ends them.
fn start_plans(plans: &[Plan]) -> String {
    let mut s = String::new();
    for (i, p) in plans.iter().enumerate() {
        let args = format!(
            "/dev/vda {} {} {} {} {} {}",
            p.reads,
            p.writes,
            p.block,
            p.start_mib * MIB,
            p.len_mib * MIB,
            1000 + i
        );
        match p.vm {
            Some(name) => s.push_str(&format!(
                "{VM_IOGEN} {args} --hold -name guest={name},debug-threads=on -uuid {} &\n",
                vm_uuid(i)
            )),
            None => s.push_str(&format!("iogen {args} &\n")),
        }
        s.push_str(&format!("P{i}=$!\necho \"OKVM-PID {i} $P{i}\"\n"));
    }
    for (i, p) in plans.iter().enumerate() {
        s.push_str(&match p.vm {
            Some(_) => format!("okvm_wait_idle \"$P{i}\" || okvm_fail \"VM {i} (pid $P{i}) did not finish its I/O\"\n"),
            None => format!("wait \"$P{i}\" || okvm_fail \"I/O generator {i} (pid $P{i}) failed\"\n"),
        });
    }
    s.push_str("echo \"OKVM-STEP io done at $(okvm_now)\"\n");
    s
}

/// Shell that ends the VM plans [`start_plans`] left running.
fn stop_plans(plans: &[Plan]) -> String {
    let mut s = String::new();
    for (i, p) in plans.iter().enumerate() {
        if p.vm.is_some() {
            s.push_str(&format!("kill \"$P{i}\"; wait \"$P{i}\" || true\n"));
        }
    }
    s
}

fn vm_uuid(i: usize) -> String {
    format!("6a1e0000-0000-4000-8000-{:012x}", 0x61_0000 + i)
}

/// Guest pid of each plan, from the `OKVM-PID` lines.
fn plan_pids(ran: &Ran, n: usize) -> Vec<u64> {
    let mut pids = vec![0u64; n];
    for v in ran.values("PID") {
        let (i, pid): (usize, u64) = (v[0].parse().unwrap(), v[1].parse().unwrap());
        pids[i] = pid;
    }
    assert!(pids.iter().all(|p| *p != 0), "missing OKVM-PID lines");
    pids
}

/// Sums of one pid's rows on a device over all reports.
#[derive(Debug, Default, PartialEq)]
struct Sum {
    read_ops: u64,
    write_ops: u64,
    read_bytes: u64,
    write_bytes: u64,
    other_ops: u64,
    read_bios: u64,
    write_bios: u64,
    completions: u64,
    /// Rows with completions but no latency figures.
    rows_without_latency: usize,
    rows: usize,
    lat_avg_us: Vec<f64>,
    lat_p99_us: Vec<f64>,
    vm: Option<Value>,
}

fn sum_pid(reports: &[Value], pid: u64, device: &str) -> Sum {
    let mut s = Sum::default();
    for r in reports {
        for p in r["processes"].as_array().expect("processes array") {
            if p["pid"].as_u64() != Some(pid) || p["device"] != device {
                continue;
            }
            s.rows += 1;
            s.read_ops += num(p, "read_ops");
            s.write_ops += num(p, "write_ops");
            s.read_bytes += num(p, "read_bytes");
            s.write_bytes += num(p, "write_bytes");
            s.other_ops += num(p, "discard_ops") + num(p, "flush_ops") + num(p, "other_ops");
            s.read_bios += num(p, "read_bios");
            s.write_bios += num(p, "write_bios");
            let c = num(p, "completions");
            s.completions += c;
            match (p["lat_avg_us"].as_f64(), p["lat_p99_us"].as_f64()) {
                (Some(avg), Some(p99)) => {
                    s.lat_avg_us.push(avg);
                    s.lat_p99_us.push(p99);
                }
                _ if c > 0 => s.rows_without_latency += 1,
                _ => {}
            }
            if !p["vm"].is_null() {
                s.vm = Some(p["vm"].clone());
            }
        }
    }
    s
}

// ---------------------------------------------------------------------------------------------
// 1. check

#[test]
fn guest61_check_reports_fallback_hooks_and_cgroup_v2_io() {
    skip_unless_guest!();
    let ran = run_guest(
        "guest61_check",
        16,
        r#"
overkvm-io check --json > /tmp/check.json 2> /tmp/check.err
echo "OKVM-CHECK-RC $?"
okvm_section check /tmp/check.json
okvm_section check-stderr /tmp/check.err
uname -r > /tmp/uname
okvm_section uname /tmp/uname
"#,
        Duration::from_secs(180),
    );
    let check: Value = serde_json::from_str(&ran.section("check").join("\n")).expect("check JSON");
    eprintln!("check --json in the guest: {check:#}");
    let kernel = check["kernel"].as_str().unwrap_or("");
    assert!(kernel.starts_with("6.1."), "guest kernel {kernel}");
    assert_eq!(ran.value("CHECK-RC"), ["0"], "check exits 0: {check}");
    assert_eq!(check["errors"], serde_json::json!([]), "no errors: {check}");
    assert_eq!(check["btf"], true);
    assert_eq!(check["hook_mode"], "request-fallback", "{check}");
    assert_eq!(check["tracepoints"]["block_io_start_done"], false);
    assert_eq!(
        check["tracepoints"]["block_getrq_rq_issue_rq_complete"],
        true
    );
    assert_eq!(check["tracepoints"]["block_bio_queue"], true);
    assert_eq!(check["cgroups"]["io_controller"], "v2", "{check}");
    assert_eq!(check["cgroups"]["io_mount"], "/sys/fs/cgroup");
    assert_eq!(check["cgroups"]["hybrid"], false);
    let attached: Vec<&str> = check["load"]["attached"]
        .as_array()
        .unwrap_or_else(|| panic!("programs did not load and attach: {}", check["load"]))
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        attached,
        [
            "block_getrq",
            "block_rq_issue",
            "block_rq_complete",
            "block_rq_requeue",
            "sched_process_exec"
        ]
    );
    // The guest has no bio-based device: the bio hook was verified and waits for one.
    assert_eq!(check["bio_hook"], "on-demand", "{check}");
}

// ---------------------------------------------------------------------------------------------
// 2. exact per-process attribution

#[test]
fn guest61_direct_io_is_exact_per_process_on_fallback_hooks() {
    skip_unless_guest!();
    let plans = [
        Plan {
            reads: 300,
            writes: 200,
            block: 4096,
            start_mib: 0,
            len_mib: 16,
            vm: None,
        },
        Plan {
            reads: 137,
            writes: 251,
            block: 8192,
            start_mib: 16,
            len_mib: 16,
            vm: None,
        },
        Plan {
            reads: 211,
            writes: 173,
            block: 16384,
            start_mib: 32,
            len_mib: 16,
            vm: Some("vm61-exact"),
        },
    ];
    let script = format!(
        "okvm_start_top 1\n{}sleep 2.5\nokvm_stop_top\n{}",
        start_plans(&plans),
        stop_plans(&plans)
    );
    let ran = run_guest("guest61_exact", 64, &script, Duration::from_secs(300));
    let reports = ran.json_lines("top");
    assert!(reports.len() >= 2, "too few reports: {}", reports.len());
    for r in &reports {
        assert_eq!(r["mode"], "request-fallback", "hook mode of {r}");
    }
    let pids = plan_pids(&ran, plans.len());
    for (i, (plan, pid)) in plans.iter().zip(&pids).enumerate() {
        let s = sum_pid(&reports, *pid, "vda");
        eprintln!(
            "plan {i} pid {pid}: planned r={} w={} x {} B; top saw r={} w={} rB={} wB={} \
             bios r={} w={} other={} in {} rows",
            plan.reads,
            plan.writes,
            plan.block,
            s.read_ops,
            s.write_ops,
            s.read_bytes,
            s.write_bytes,
            s.read_bios,
            s.write_bios,
            s.other_ops,
            s.rows
        );
        assert_eq!(
            (s.read_ops, s.write_ops),
            (plan.reads, plan.writes),
            "request ops of pid {pid}"
        );
        assert_eq!(
            (s.read_bytes, s.write_bytes),
            (plan.reads * plan.block, plan.writes * plan.block),
            "bytes of pid {pid}"
        );
        assert_eq!(
            (s.read_bios, s.write_bios),
            (plan.reads, plan.writes),
            "bios of pid {pid}"
        );
        assert_eq!(s.other_ops, 0, "nothing else counted for pid {pid}");
        match plan.vm {
            Some(name) => {
                let vm = s.vm.expect("the qemu-named process is reported as a VM");
                assert_eq!(vm["name"], name);
                assert_eq!(vm["uuid"], vm_uuid(i));
                assert_eq!(vm["manager"], "qemu");
            }
            None => assert!(s.vm.is_none(), "pid {pid} is no VM"),
        }
    }
    let lost = losses(&reports);
    assert!(lost.is_empty(), "kernel-side losses: {lost:?}");
}

// ---------------------------------------------------------------------------------------------
// 3. latency histograms

#[test]
fn guest61_latency_histograms_are_filled_on_fallback_hooks() {
    skip_unless_guest!();
    let plans = [
        Plan {
            reads: 400,
            writes: 0,
            block: 4096,
            start_mib: 0,
            len_mib: 16,
            vm: None,
        },
        Plan {
            reads: 0,
            writes: 300,
            block: 4096,
            start_mib: 16,
            len_mib: 16,
            vm: None,
        },
        Plan {
            reads: 150,
            writes: 150,
            block: 65536,
            start_mib: 32,
            len_mib: 32,
            vm: Some("vm61-latency"),
        },
    ];
    // Short intervals: requests that start in one and complete in the next are common.
    let script = format!(
        "okvm_start_top 0.5\n{}sleep 1.5\nokvm_stop_top\n{}",
        start_plans(&plans),
        stop_plans(&plans)
    );
    let ran = run_guest("guest61_latency", 64, &script, Duration::from_secs(300));
    let reports = ran.json_lines("top");
    let pids = plan_pids(&ran, plans.len());
    for (plan, pid) in plans.iter().zip(&pids) {
        let s = sum_pid(&reports, *pid, "vda");
        let max = |v: &[f64]| v.iter().cloned().fold(0.0f64, f64::max);
        let min = |v: &[f64]| v.iter().cloned().fold(f64::MAX, f64::min);
        eprintln!(
            "pid {pid}: ops {} completions {} in {} rows; lat_avg_us {:.0}..{:.0}, \
             lat_p99_us {:.0}..{:.0}",
            s.read_ops + s.write_ops,
            s.completions,
            s.rows,
            min(&s.lat_avg_us),
            max(&s.lat_avg_us),
            min(&s.lat_p99_us),
            max(&s.lat_p99_us)
        );
        assert_eq!(
            (s.read_ops, s.write_ops),
            (plan.reads, plan.writes),
            "ops of pid {pid}"
        );
        assert_eq!(
            s.completions,
            plan.reads + plan.writes,
            "completions of pid {pid} (every request timed once)"
        );
        assert_eq!(
            s.rows_without_latency, 0,
            "rows of pid {pid} with completions but null lat_avg_us/lat_p99_us"
        );
        assert!(!s.lat_avg_us.is_empty(), "no latency figures for pid {pid}");
        for (avg, p99) in s.lat_avg_us.iter().zip(&s.lat_p99_us) {
            // A TCG guest's virtio request takes from tens of microseconds to tens of ms.
            assert!(
                *avg > 0.0 && *avg < 10e6,
                "implausible lat_avg_us {avg} of pid {pid}"
            );
            assert!(
                *p99 > 0.0 && *p99 < 10e6,
                "implausible lat_p99_us {p99} of pid {pid}"
            );
        }
    }
    let lost = losses(&reports);
    assert!(lost.is_empty(), "kernel-side losses: {lost:?}");
}

// ---------------------------------------------------------------------------------------------
// 4. throttling through cgroup v2 io.max

/// IOPS budget on the guest's vda: far below what three greedy readers do under TCG (one alone
/// does ~8,000-10,000 4 KiB direct reads per second on the sparse raw disk), and high enough
/// that the 0.5 s ticks see ~150 I/Os per VM: at 300 the controller's limits settle 4-15% above
/// the fair share (per-tick measurement noise feeds its efficiency estimate and relax probes)
/// and the aggregate lands at 110-115% of the budget.
const BUDGET: f64 = 900.0;
const SETTLE_S: u64 = 5;
/// One `OKVM-S` line: guest uptime, and per VM its read ops so far and its `riops` limit.
type Sample = (f64, Vec<(f64, Option<f64>)>);
const WINDOW_S: u64 = 8;

#[test]
fn guest61_io_max_throttle_engages_holds_budget_and_releases() {
    skip_unless_guest!();
    let names = ["vmA", "vmB", "vmC"];
    let mut vms = String::new();
    for (i, n) in names.iter().enumerate() {
        vms.push_str(&format!(
            "sh -c 'echo $$ > /sys/fs/cgroup/{n}/cgroup.procs && exec {VM_IOGEN} /dev/vda \
             100000000 0 4096 {} {} {} -name guest={n},debug-threads=on -uuid {}' &\n\
             P{i}=$!\n",
            i as u64 * 16 * MIB,
            16 * MIB,
            i + 1,
            vm_uuid(i)
        ));
    }
    let script = format!(
        r#"
ifconfig lo 127.0.0.1 up || ip link set lo up || okvm_fail "cannot bring up lo"
MM=$(cat /sys/block/vda/dev)
echo "OKVM-DEV $MM"
for v in {names}; do mkdir /sys/fs/cgroup/$v || okvm_fail "mkdir cgroup $v"; done
okvm_limits() {{ for v in {names}; do grep "^$MM " /sys/fs/cgroup/$v/io.max | sed "s/^/$v /"; done; }}
# One line per call: uptime, then per VM its rios (io.stat) and riops (io.max, "-" if none).
# (One awk reads the clock and every file, so the counters and the time agree.)
okvm_sample() {{
    files=""
    for v in {names}; do files="$files /sys/fs/cgroup/$v/io.stat /sys/fs/cgroup/$v/io.max"; done
    awk -v mm="$MM" -v names="{names}" '
        FILENAME == "/proc/uptime" {{ t = $1; next }}
        $1 == mm {{
            split(FILENAME, p, "/")
            for (i = 2; i <= NF; i++) {{
                split($i, kv, "=")
                if (FILENAME ~ /io[.]stat$/ && kv[1] == "rios") r[p[5]] = kv[2]
                if (FILENAME ~ /io[.]max$/ && kv[1] == "riops") m[p[5]] = kv[2]
            }}
        }}
        END {{
            line = "OKVM-S " t
            n = split(names, vs, " ")
            for (j = 1; j <= n; j++) {{
                v = vs[j]
                line = line " " v "=" ((v in r) ? r[v] : 0) ":" ((v in m) ? m[v] : "-")
            }}
            print line
        }}' /proc/uptime $files
}}
mkdir -p /tmp/okvm-state
cat > /tmp/cfg.toml <<EOF
[policy]
state_file = "/tmp/okvm-state/throttle.json"
release_ticks = 6

[[device]]
device = "vda"
iops = {budget}
EOF
RUST_LOG=info overkvm-io serve --config /tmp/cfg.toml --listen 127.0.0.1:0 -i 0.5 \
    > /tmp/serve.out 2> /tmp/serve.log &
D=$!
n=0
until grep -q "throttling 1 device" /tmp/serve.log; do
    kill -0 $D 2>/dev/null || {{ okvm_section serve-log /tmp/serve.log; okvm_fail "serve exited at start"; }}
    [ $n -ge 600 ] && {{ okvm_section serve-log /tmp/serve.log; okvm_fail "serve did not start in 60 s"; }}
    usleep 100000; n=$((n + 1))
done
# Let the daemon take a first sample before the load starts.
sleep 1
echo "OKVM-T start $(okvm_now)"
{vms}
n=0
until [ -n "$(okvm_limits)" ]; do
    [ $n -ge 300 ] && {{ okvm_section serve-log /tmp/serve.log; okvm_fail "no io.max limit within 30 s"; }}
    usleep 100000; n=$((n + 1))
done
echo "OKVM-T engaged $(okvm_now)"
# Samples every ~0.5 s while the controller settles and then holds the budget.
end=$(( $(cut -d. -f1 /proc/uptime) + {settle} + {window} ))
while [ "$(cut -d. -f1 /proc/uptime)" -lt "$end" ]; do
    okvm_sample
    usleep 500000
done
okvm_sample
okvm_limits > /tmp/limits
okvm_section limits-engaged /tmp/limits
# The load stops; the VMs stay (stopped, as idle VMs): every limit must go.
kill -STOP $P0 $P1 $P2
echo "OKVM-T stopped $(okvm_now)"
n=0
while [ -n "$(okvm_limits)" ]; do
    [ $n -ge 600 ] && {{ okvm_limits > /tmp/limits; okvm_section limits-left /tmp/limits; okvm_section serve-log /tmp/serve.log; okvm_fail "limits still set 60 s after the load stopped"; }}
    usleep 100000; n=$((n + 1))
done
echo "OKVM-T released $(okvm_now)"
kill -KILL $P0 $P1 $P2
wait $P0; wait $P1; wait $P2
kill -TERM $D
wait $D
echo "OKVM-DAEMON-RC $?"
okvm_limits > /tmp/limits
okvm_section limits-after-exit /tmp/limits
[ -e /tmp/okvm-state/throttle.json ] && echo "OKVM-STATE-LEFT" && okvm_section state /tmp/okvm-state/throttle.json
okvm_section serve-log /tmp/serve.log
"#,
        names = names.join(" "),
        budget = BUDGET as u64,
        settle = SETTLE_S,
        window = WINDOW_S,
    );
    let ran = run_guest("guest61_throttle", 64, &script, Duration::from_secs(300));
    let t = |what: &str| -> f64 {
        let v = ran
            .values("T")
            .into_iter()
            .find(|v| v[0] == what)
            .unwrap_or_else(|| panic!("no OKVM-T {what} line"));
        parse_f64(v[1])
    };
    let engage_s = t("engaged") - t("start");
    let release_s = t("released") - t("stopped");
    // (uptime, per VM (rios, riops)) samples; the steady window starts SETTLE_S after engaging.
    let samples: Vec<Sample> = ran
        .values("S")
        .iter()
        .map(|v| {
            let per_vm = names
                .iter()
                .map(|n| {
                    let word = v
                        .iter()
                        .find_map(|w| w.strip_prefix(&format!("{n}=")))
                        .unwrap_or_else(|| panic!("no sample of {n} in {v:?}"));
                    let (rios, riops) = word.split_once(':').expect("rios:riops");
                    (parse_f64(rios), riops.parse().ok())
                })
                .collect();
            (parse_f64(v[0]), per_vm)
        })
        .collect();
    let series: Vec<String> = samples
        .windows(2)
        .map(|w| {
            let dt = w[1].0 - w[0].0;
            let rates: Vec<String> = (0..names.len())
                .map(|i| {
                    let limit = w[1].1[i].1.map_or("-".to_string(), |l| format!("{l}"));
                    format!("{:.0}/{limit}", (w[1].1[i].0 - w[0].1[i].0) / dt)
                })
                .collect();
            format!("{:.1}s {}", w[1].0 - t("start"), rates.join(" "))
        })
        .collect();
    eprintln!(
        "guest61 throttle samples (s after load start: rate/riops of A B C):\n  {}",
        series.join("\n  ")
    );
    let steady_from = t("engaged") + SETTLE_S as f64;
    let first = samples
        .iter()
        .position(|s| s.0 >= steady_from)
        .expect("samples after settling");
    let (t1, before) = (&samples[first].0, &samples[first].1);
    let (t2, after) = samples.last().map(|s| (&s.0, &s.1)).unwrap();
    let window = t2 - t1;
    assert!(
        window >= WINDOW_S as f64 * 0.7,
        "steady window only {window:.1}s"
    );
    let rates: Vec<f64> = before
        .iter()
        .zip(after)
        .map(|(b, a)| (a.0 - b.0) / window)
        .collect();
    let total: f64 = rates.iter().sum();
    let jain = jain_index(&rates);
    let limits = ran.section("limits-engaged");
    eprintln!(
        "guest61 throttle (cgroup v2 io.max, budget {BUDGET} IOPS on vda): engaged after \
         {engage_s:.1}s; steady over {window:.1}s: A={:.0} B={:.0} C={:.0} total={total:.0} \
         ({:.1}% of budget); Jain={jain:.3}; released {release_s:.1}s after the load stopped; \
         io.max while engaged: {limits:?}",
        rates[0],
        rates[1],
        rates[2],
        100.0 * total / BUDGET
    );
    assert!(engage_s <= 5.0, "engaged only after {engage_s:.1}s");
    assert_eq!(limits.len(), 3, "each VM has an io.max line: {limits:?}");
    for l in &limits {
        assert!(l.contains(" riops="), "read IOPS limit: {l}");
        assert!(!l.contains(" riops=max"), "read IOPS limited: {l}");
    }
    // Issue 5's target: steady state within 5% of the budget (the kernel holds each VM at its
    // io.max exactly on 6.1; the controller learns the delivered/limit ratio without bias and
    // does not relax a cap on one quiet tick).
    assert!(
        total <= BUDGET * 1.05,
        "aggregate {total:.0} over budget {BUDGET}"
    );
    assert!(
        total >= BUDGET * 0.8,
        "aggregate {total:.0} far below budget {BUDGET}: over-throttled"
    );
    assert!(jain >= 0.95, "equal weights not fair: {rates:?}");
    assert!(release_s <= 30.0, "released only after {release_s:.1}s");
    assert_eq!(
        ran.value("DAEMON-RC"),
        ["0"],
        "daemon exit status on SIGTERM"
    );
    assert!(
        ran.section("limits-after-exit").is_empty(),
        "io.max lines left for vda"
    );
    assert!(
        ran.values("STATE-LEFT").is_empty(),
        "state file left after a clean exit: {:?}",
        ran.section("state")
    );
}

// ---------------------------------------------------------------------------------------------
// 5. buffered writes through cgroup v2 writeback

const WRITER_VM: &str = "vm61-writer";
const WRITER_BLOCKS: u64 = 2048;
const METRICS_ADDR: &str = "127.0.0.1:9746";

#[test]
fn guest61_buffered_writes_are_charged_to_the_writers_cgroup_and_vm() {
    skip_unless_guest!();
    let bytes = WRITER_BLOCKS * 4096;
    let script = format!(
        r#"
ifconfig lo 127.0.0.1 up || ip link set lo up || okvm_fail "cannot bring up lo"
mke2fs -F -b 4096 /dev/vda > /tmp/mkfs.out 2>&1 || {{ okvm_section mkfs /tmp/mkfs.out; okvm_fail "mke2fs"; }}
mkdir -p /mnt/vm
mount -t ext2 /dev/vda /mnt/vm 2> /tmp/mount.err || mount -t ext4 /dev/vda /mnt/vm 2>> /tmp/mount.err || {{
    okvm_section mount /tmp/mount.err; okvm_fail "mounting the ext2 filesystem"; }}
grep " /mnt/vm " /proc/mounts > /tmp/mounts
okvm_section mount /tmp/mounts
sync
# Dirty pages older than 1 s are written back every 0.5 s.
echo 100 > /proc/sys/vm/dirty_expire_centisecs
echo 50 > /proc/sys/vm/dirty_writeback_centisecs
CG=/sys/fs/cgroup/{vm}
mkdir $CG || okvm_fail "mkdir $CG"
MM=$(cat /sys/block/vda/dev)
# The metrics endpoint (no config: no throttling).
overkvm-io serve --listen {metrics} -i 0.5 > /tmp/serve.out 2> /tmp/serve.log &
S=$!
n=0
until wget -q -O /dev/null http://{metrics}/metrics; do
    kill -0 $S 2>/dev/null || {{ okvm_section serve-log /tmp/serve.log; okvm_fail "serve exited at start"; }}
    [ $n -ge 600 ] && {{ okvm_section serve-log /tmp/serve.log; okvm_fail "no metrics within 60 s"; }}
    usleep 100000; n=$((n + 1))
done
okvm_start_top 1
# A VM with a host-cached disk: buffered writes (no fsync), then it idles (--hold).
sh -c 'echo $$ > /sys/fs/cgroup/{vm}/cgroup.procs && exec {vm_bin} /mnt/vm/disk.raw 0 {blocks} 4096 0 {bytes} 1 --buffered --hold -name guest={vm},debug-threads=on -uuid {uuid}' > /tmp/w.out 2>&1 &
W=$!
echo "OKVM-PID 0 $W"
okvm_wait_idle $W || {{ okvm_section writer /tmp/w.out; okvm_fail "the writer did not finish"; }}
[ "$(stat -c %s /mnt/vm/disk.raw)" = {bytes} ] || okvm_fail "the writer wrote $(stat -c %s /mnt/vm/disk.raw) bytes"
echo "OKVM-T written $(okvm_now)"
# The flushers write the pages back on their own (no sync).
n=0
while :; do
    d=$(sed -n 's/^file_dirty //p' $CG/memory.stat)
    w=$(sed -n 's/^file_writeback //p' $CG/memory.stat)
    [ "$d" = 0 ] && [ "$w" = 0 ] && break
    [ $n -ge 600 ] && okvm_fail "dirty pages of {vm} not written back in 60 s (dirty $d, writeback $w)"
    usleep 100000; n=$((n + 1))
done
echo "OKVM-T clean $(okvm_now)"
grep "^$MM " $CG/io.stat > /tmp/iostat
okvm_section io-stat /tmp/iostat
sleep 2.5
okvm_stop_top
wget -q -O /tmp/metrics http://{metrics}/metrics || okvm_fail "reading the metrics"
grep "^overkvm_vm_io" /tmp/metrics > /tmp/vm-metrics
okvm_section vm-metrics /tmp/vm-metrics
kill -TERM $S
wait $S
echo "OKVM-SERVE-RC $?"
kill $W
"#,
        vm = WRITER_VM,
        vm_bin = VM_IOGEN,
        blocks = WRITER_BLOCKS,
        metrics = METRICS_ADDR,
        uuid = vm_uuid(5),
    );
    let ran = run_guest("guest61_writeback", 128, &script, Duration::from_secs(300));
    let reports = ran.json_lines("top");
    let writer_pid = plan_pids(&ran, 1)[0];
    let cgroup = format!("/{WRITER_VM}");

    // The block controller's view: who owns the bytes written to vda.
    let mut by_cgroup: BTreeMap<String, u64> = BTreeMap::new();
    for r in &reports {
        for c in r["cgroups"].as_array().expect("cgroups array") {
            if c["device"] == "vda" {
                let name = c["cgroup"].as_str().unwrap_or("?").to_string();
                *by_cgroup.entry(name).or_default() += num(c, "write_bytes");
            }
        }
    }
    let all: u64 = by_cgroup.values().sum();
    let mine = by_cgroup.get(&cgroup).copied().unwrap_or(0);

    // The processes' view: the VM's rows, and what is left on other rows.
    let (mut vm_bytes, mut vm_writes, mut vm_kernel_ops) = (0u64, 0u64, 0u64);
    let mut others: BTreeMap<String, (u64, String)> = BTreeMap::new();
    for r in &reports {
        for p in r["processes"].as_array().expect("processes array") {
            if p["device"] != "vda" {
                continue;
            }
            if p["vm"]["name"] == WRITER_VM {
                assert_eq!(p["pid"].as_u64(), Some(writer_pid), "the VM's pid: {p}");
                vm_bytes += num(p, "write_bytes");
                vm_writes += num(p, "write_ops");
                vm_kernel_ops += num(p, "kernel_submitted_ops");
            } else if num(p, "write_bytes") > 0 {
                let e = others
                    .entry(format!(
                        "{} ({})",
                        p["comm"].as_str().unwrap_or("?"),
                        p["pid"]
                    ))
                    .or_default();
                e.0 += num(p, "write_bytes");
                e.1 = p["io_cgroup"].as_str().unwrap_or("-").to_string();
            }
        }
    }
    let kernel_wbytes: Option<u64> = ran.section("io-stat").first().and_then(|l| {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix("wbytes="))
            .and_then(|v| v.parse().ok())
    });
    // overkvm_vm_io_bytes_total{vm="...",device="vda",op="write"} N
    let metric_bytes: Option<f64> = ran.section("vm-metrics").iter().find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        (series.starts_with("overkvm_vm_io_bytes_total{")
            && series.contains(&format!("vm=\"{WRITER_VM}\""))
            && series.contains("device=\"vda\"")
            && series.contains("op=\"write\""))
        .then(|| value.parse().ok())?
    });
    eprintln!(
        "guest61 writeback: VM {WRITER_VM} (pid {writer_pid}) wrote {bytes} B buffered; \
         top's cgroups on vda: {by_cgroup:?} ({:.1}% of vda's written bytes to {cgroup}, {:.1}% \
         of the VM's bytes); kernel io.stat wbytes of {cgroup}: {kernel_wbytes:?}; top's VM \
         row: {vm_bytes} B in {vm_writes} writes, {vm_kernel_ops} ops submitted by kernel \
         threads; other rows (bytes, io_cgroup): {others:?}; metrics write bytes of the VM: \
         {metric_bytes:?}",
        100.0 * mine as f64 / all.max(1) as f64,
        100.0 * mine as f64 / bytes as f64,
    );
    assert!(
        mine as f64 >= 0.9 * bytes as f64,
        "only {mine} of the {bytes} written bytes charged to {cgroup}: {by_cgroup:?}"
    );
    assert!(
        mine as f64 >= 0.9 * all as f64,
        "{cgroup} owns only {mine} of the {all} bytes written to vda: {by_cgroup:?}"
    );
    // Shown as the VM's I/O in top: the flushers' rows folded into the VM's row.
    assert!(
        vm_bytes as f64 >= 0.9 * bytes as f64,
        "top shows only {vm_bytes} of the {bytes} bytes as VM {WRITER_VM}'s (others: {others:?})"
    );
    assert!(
        vm_writes > 0 && vm_kernel_ops >= vm_writes,
        "the VM's writes were submitted by the flushers ({vm_kernel_ops} kernel-submitted ops \
         for {vm_writes} writes)"
    );
    // And in the metrics.
    let metric_bytes = metric_bytes.unwrap_or_else(|| {
        panic!(
            "no overkvm_vm_io_bytes_total series for VM {WRITER_VM} on vda: {:?}",
            ran.section("vm-metrics")
        )
    });
    assert!(
        metric_bytes >= 0.9 * bytes as f64,
        "metrics show only {metric_bytes} of the {bytes} bytes as VM {WRITER_VM}'s"
    );
    assert_eq!(ran.value("SERVE-RC"), ["0"], "serve exit status on SIGTERM");
}

// ---------------------------------------------------------------------------------------------
// 6. parity with the kernel's own counters on the 6.1 kernel (fallback hooks, cgroup v2)

/// Device totals equal the guest kernel's `/proc/diskstats` and a cgroup's bios equal its v2
/// `io.stat` (rios, wios, dios), on direct, split, buffered, fsync'd and filesystem I/O, and
/// the live self-check in every report reads 0 once the disk is idle.
#[test]
fn guest61_device_and_cgroup_totals_equal_the_kernels_counters() {
    skip_unless_guest!();
    let work = r#"
iogen /dev/vda 400 300 4096 0 16777216 3 > /dev/null || exit 1
dd if=/dev/zero of=/dev/vda bs=4M count=4 seek=8 oflag=direct 2>/dev/null || exit 2
dd if=/dev/zero of=/dev/vda bs=64k count=128 seek=1000 conv=fsync 2>/dev/null || exit 3
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda of=/dev/null bs=4k count=2048 skip=20000 2>/dev/null || exit 4
i=0
while [ $i -lt 40 ]; do
    dd if=/dev/zero of=/dev/vda bs=4k count=1 seek=$((30000 + i)) oflag=direct conv=fsync 2>/dev/null || exit 5
    i=$((i + 1))
done
blkdiscard -o 67108864 -l 8388608 /dev/vda 2>/dev/null
echo "OKVM-DISCARD-RC $?"
mke2fs -F -q -b 4096 /dev/vda > /dev/null 2>&1 || exit 6
mkdir -p /mnt/p && mount -t ext4 /dev/vda /mnt/p || exit 7
i=0
while [ $i -lt 40 ]; do
    dd if=/dev/zero of=/mnt/p/f bs=4k count=1 seek=$i conv=notrunc,fsync 2>/dev/null || exit 8
    i=$((i + 1))
done
umount /mnt/p || exit 9
"#;
    let script = format!(
        r#"
CG=/sys/fs/cgroup/par
mkdir $CG || okvm_fail "mkdir $CG"
MM=$(cat /sys/block/vda/dev)
cat > /tmp/work.sh <<'WORK'
{work}
WORK
okvm_start_top 1
sleep 1.5
echo "OKVM-REPORTS-BEFORE $(wc -l < /tmp/top.json)"
grep " vda " /proc/diskstats > /tmp/ds0
{{ grep "^$MM " $CG/io.stat || echo "$MM"; }} > /tmp/io0
sh -c "echo \$\$ > $CG/cgroup.procs && exec sh /tmp/work.sh"
echo "OKVM-WORK-RC $?"
sync
sleep 2
grep " vda " /proc/diskstats > /tmp/ds1
{{ grep "^$MM " $CG/io.stat || echo "$MM"; }} > /tmp/io1
sleep 2.5
okvm_stop_top
for f in ds0 ds1 io0 io1; do okvm_section $f /tmp/$f; done
"#
    );
    let ran = run_guest("guest61_parity", 128, &script, Duration::from_secs(400));
    assert_eq!(ran.value("WORK-RC"), ["0"], "the workload ran");
    let before: usize = ran.value("REPORTS-BEFORE")[0].parse().unwrap();
    let reports = ran.json_lines("top");
    let diskstats = |tag: &str| -> Vec<u64> {
        let line = ran.section(tag).join(" ");
        let f: Vec<&str> = line.split_whitespace().collect();
        // reads, sectors read, writes, sectors written, discards, sectors discarded, flushes
        [3, 5, 7, 9, 14, 16, 18]
            .iter()
            .map(|&i| f.get(i).map_or(0, |v| v.parse().unwrap_or(0)))
            .collect()
    };
    let (d0, d1) = (diskstats("ds0"), diskstats("ds1"));
    let want: Vec<u64> = d0.iter().zip(&d1).map(|(a, b)| b - a).collect();
    let mut got = vec![0u64; 7];
    let mut cg_got = [0u64; 3];
    for r in &reports[before.min(reports.len())..] {
        for d in r["devices"].as_array().unwrap() {
            if d["device"] == "vda" {
                for (i, k) in [
                    "read_ops",
                    "read_bytes",
                    "write_ops",
                    "write_bytes",
                    "discard_ops",
                    "discard_bytes",
                    "flush_ops",
                ]
                .iter()
                .enumerate()
                {
                    let v = num(d, k);
                    got[i] += if k.ends_with("bytes") { v / 512 } else { v };
                }
            }
        }
        for c in r["cgroups"].as_array().unwrap() {
            if c["device"] == "vda" && c["cgroup"] == "/par" {
                cg_got[0] += num(c, "read_bios");
                cg_got[1] += num(c, "write_bios");
                cg_got[2] += num(c, "discard_bios");
            }
        }
    }
    let iostat = |tag: &str| -> [u64; 3] {
        let line = ran.section(tag).join(" ");
        let get = |k: &str| {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
                .map_or(0, |v| v.parse().unwrap_or(0))
        };
        [get("rios"), get("wios"), get("dios")]
    };
    let (i0, i1) = (iostat("io0"), iostat("io1"));
    let cg_want = [i1[0] - i0[0], i1[1] - i0[1], i1[2] - i0[2]];
    eprintln!(
        "6.1 guest, vda: diskstats r/rs/w/ws/d/ds/f {want:?}\n                 overkvm   {got:?}\n\
         cgroup /par: io.stat rios/wios/dios {cg_want:?}, overkvm bios {cg_got:?}; discard rc {:?}",
        ran.value("DISCARD-RC")
    );
    assert!(want[6] > 0, "the workload made the device flush");
    assert_eq!(got, want, "device totals equal /proc/diskstats");
    assert_eq!(cg_got, cg_want, "the cgroup's bios equal its io.stat");
    let last = reports.last().expect("reports");
    let vda = last["parity"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["device"] == "vda")
        .expect("the self-check covers vda");
    for (k, v) in vda["difference"].as_object().unwrap() {
        assert_eq!(v, 0, "self-check difference {k} on an idle disk: {vda}");
    }
}

// ---------------------------------------------------------------------------------------------
// 7. a latency target on a device of known capacity

/// QEMU holds the guest's vda to this many IOPS (`block_set_io_throttle`, as `iops-total=`):
/// a device that saturates at a known rate, its latency jumping to depth/capacity past it.
const CAPACITY: f64 = 600.0;
/// Three QD1 readers on a saturated vda see a p95 of ~8 ms; unthrottled under TCG a read's
/// p95 is ~0.3-0.5 ms on a quiet host, but on a host loaded by other builds (load 5 on 2
/// cores) a quarter of the half-second ticks reach 2-3.5 ms at any rate. The target sits
/// between, above that noise: a target inside it tests the host, not the controller.
const LATENCY_TARGET_MS: f64 = 3.0;
/// The fixed budget the latency target is compared with: 90% of the capacity, what
/// `calibrate` suggests and an operator who knows the device would write.
const BUDGET_IOPS: f64 = 540.0;
/// Seconds of load; the steady window is from `SETTLED_S` after the load started to its end.
const LOAD_S: u64 = 30;
const SETTLED_S: f64 = 10.0;
/// Settled: from then on every span of this many ticks (10 s) has a median per-tick p95 at or
/// under the target. Shorter spans catch a few seconds of host noise (TCG on a loaded host).
const SPAN_TICKS: usize = 20;

/// How the daemon runs in the latency scenario (the test, and `cargo xtask bench throttle`).
#[derive(Clone, Copy, Debug, PartialEq)]
enum LatencyMode {
    /// `latency_target = "3ms"`: the controller under test.
    Target,
    /// `iops = 540`, and a 10 s latency target that never engages: only so the daemon reports
    /// the device's p95 each tick, as in the other modes.
    Budget,
    /// Only the 10 s target: nothing is ever limited.
    Unthrottled,
}

impl LatencyMode {
    fn name(self) -> &'static str {
        match self {
            LatencyMode::Target => "latency_target",
            LatencyMode::Budget => "iops_budget",
            LatencyMode::Unthrottled => "none",
        }
    }

    /// The `[[device]]` lines after `device = "vda"`.
    fn device_lines(self) -> String {
        match self {
            LatencyMode::Target => format!("latency_target = \"{LATENCY_TARGET_MS}ms\""),
            LatencyMode::Budget => format!("iops = {BUDGET_IOPS}\nlatency_target = \"10s\""),
            LatencyMode::Unthrottled => "latency_target = \"10s\"".into(),
        }
    }
}

/// One daemon tick as the guest sampled its status: seconds after the load started, the
/// device's p95 (µs), the latency window, the learned capacity, engaged.
struct LatencyTick {
    at: f64,
    p95_us: Option<f64>,
    window: Option<f64>,
    capacity: Option<f64>,
    engaged: bool,
}

/// A figure that may be absent, for the printed summary.
fn shown(v: Option<f64>, prec: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.prec$}"))
}

/// What one run of the scenario measured.
struct LatencyScenario {
    mode: LatencyMode,
    ran: Ran,
    calibrate_iops: Option<f64>,
    ticks: Vec<LatencyTick>,
    /// First engaged tick, seconds after the load started.
    engaged_at: Option<f64>,
    /// Earliest tick, at or under the target after the throttle engaged, from which every
    /// 10 s (`SPAN_TICKS`) until the load stopped had a median per-tick p95 at or under it.
    settled_at: Option<f64>,
    /// Per VM (A weight 2, B, C) IOPS from `SETTLED_S` to the end of the load (io.stat).
    rates: Vec<f64>,
    total: f64,
    /// Per-tick p95 over the same window, sorted.
    steady_p95_us: Vec<f64>,
    release_s: f64,
    /// The host's 1-minute load average when the guest started and when it ended.
    host_load: (f64, f64),
}

/// The host's 1-minute load average (NaN if unreadable): TCG makes the guest's latency depend
/// on it, so every run prints it.
fn host_load() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

impl LatencyScenario {
    fn median_p95_us(&self) -> f64 {
        let v = &self.steady_p95_us;
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    }

    fn over_target(&self) -> f64 {
        let over = self
            .steady_p95_us
            .iter()
            .filter(|l| **l > LATENCY_TARGET_MS * 1000.0)
            .count();
        over as f64 / self.steady_p95_us.len().max(1) as f64
    }

    fn capacity(&self) -> Option<f64> {
        self.ticks.iter().rev().find_map(|t| t.capacity)
    }

    fn print(&self) {
        eprintln!(
            "guest61 latency scenario {} ticks (s after start: p95 ms / window IOPS / capacity \
             IOPS):\n  {}",
            self.mode.name(),
            self.ticks
                .iter()
                .map(|t| format!(
                    "{:.1}s {} / {} / {}",
                    t.at,
                    t.p95_us
                        .map_or("-".into(), |l| format!("{:.2}", l / 1000.0)),
                    t.window.map_or("-".into(), |w| format!("{w:.0}")),
                    t.capacity.map_or("-".into(), |c| format!("{c:.0}"))
                ))
                .collect::<Vec<_>>()
                .join("\n  ")
        );
        let r = &self.rates;
        eprintln!(
            "guest61 latency scenario {}: vda limited by QEMU to {CAPACITY} IOPS, target p95 \
             {LATENCY_TARGET_MS} ms: calibrate {} IOPS; engaged {} s, settled {} s after load \
             start; from {SETTLED_S} s on: A={:.0} B={:.0} C={:.0} total={:.0} ({:.1}% of \
             capacity), per-tick p95 median {:.2} ms, {:.0}% of {} ticks over the target; \
             learned capacity {} IOPS; released {:.1} s after the load stopped; host load \
             {:.2} at start, {:.2} at end",
            self.mode.name(),
            shown(self.calibrate_iops, 0),
            shown(self.engaged_at, 1),
            shown(self.settled_at, 1),
            r[0],
            r[1],
            r[2],
            self.total,
            100.0 * self.total / CAPACITY,
            self.median_p95_us() / 1000.0,
            100.0 * self.over_target(),
            self.steady_p95_us.len(),
            shown(self.capacity(), 0),
            self.release_s,
            self.host_load.0,
            self.host_load.1
        );
    }

    /// `cargo xtask bench throttle` runs the scenario's tests and reports these figures.
    fn write_figures(&self) {
        let Some(out) = std::env::var_os("OVERKVM_BENCH_OUT") else {
            return;
        };
        let r = &self.rates;
        let figures = serde_json::json!({
            "mode": self.mode.name(),
            "capacity_iops": CAPACITY,
            "target_ms": LATENCY_TARGET_MS,
            "budget_iops": (self.mode == LatencyMode::Budget).then_some(BUDGET_IOPS),
            "calibrate_iops": self.calibrate_iops,
            "engage_s": self.engaged_at,
            "settle_s": self.settled_at,
            "median_p95_ms": self.median_p95_us() / 1000.0,
            "over_target_pct": 100.0 * self.over_target(),
            "steady_ticks": self.steady_p95_us.len(),
            "total_iops": self.total,
            "pct_of_capacity": 100.0 * self.total / CAPACITY,
            "rates": r,
            "weighted_ratio": r[0] / (0.5 * (r[1] + r[2])),
            "jain_equal_weight": jain_index(&r[1..]),
            "learned_capacity_iops": self.capacity(),
            "release_s": self.release_s,
            "host_load": [self.host_load.0, self.host_load.1],
        });
        std::fs::write(out, figures.to_string()).expect("writing the bench figures");
    }
}

/// The scenario: a 6.1 guest whose vda QEMU limits to `CAPACITY` IOPS; in Target mode
/// `calibrate` measures it first; `serve` with the mode's `[[device]]` and 0.5 s ticks; three
/// greedy QD1 random readers (`vmA` weight 2, `vmB`, `vmC`) in their own cgroups for
/// `LOAD_S`; then they stop (SIGSTOP) and the limits must go.
fn run_latency_scenario(mode: LatencyMode) -> LatencyScenario {
    let load_at_start = host_load();
    let names = ["vmA", "vmB", "vmC"];
    let mut vms = String::new();
    for (i, n) in names.iter().enumerate() {
        vms.push_str(&format!(
            "sh -c 'echo $$ > /sys/fs/cgroup/{n}/cgroup.procs && exec {VM_IOGEN} /dev/vda \
             100000000 0 4096 {} {} {} -name guest={n},debug-threads=on -uuid {}' &\n\
             P{i}=$!\n",
            i as u64 * 16 * MIB,
            16 * MIB,
            i + 1,
            vm_uuid(i)
        ));
    }
    let calibrate = if mode == LatencyMode::Target {
        r#"overkvm-io calibrate vda --json --seconds 2 --depths 1,4,8 > /tmp/cal.json 2> /tmp/cal.err \
    || { okvm_section calibrate-stderr /tmp/cal.err; okvm_fail "calibrate failed"; }
okvm_section calibrate /tmp/cal.json"#
    } else {
        ""
    };
    let script = format!(
        r#"
ifconfig lo 127.0.0.1 up || ip link set lo up || okvm_fail "cannot bring up lo"
MM=$(cat /sys/block/vda/dev)
for v in {names}; do mkdir /sys/fs/cgroup/$v || okvm_fail "mkdir cgroup $v"; done
okvm_limits() {{ for v in {names}; do grep "^$MM " /sys/fs/cgroup/$v/io.max | sed "s/^/$v /"; done; }}
# One line per call: uptime, then per VM its rios (io.stat); then the daemon's status.
okvm_sample() {{
    files=""
    for v in {names}; do files="$files /sys/fs/cgroup/$v/io.stat"; done
    awk -v mm="$MM" '
        FILENAME == "/proc/uptime" {{ t = $1; next }}
        $1 == mm {{
            split(FILENAME, p, "/")
            for (i = 2; i <= NF; i++) {{ split($i, kv, "="); if (kv[1] == "rios") r[p[5]] = kv[2] }}
        }}
        END {{ line = "OKVM-S " t; for (v in r) line = line " " v "=" r[v]; print line }}' /proc/uptime $files
    [ -s /tmp/okvm-state/status.json ] && echo "OKVM-L $(okvm_now) $(cat /tmp/okvm-state/status.json)"
}}
# The host sets QEMU's limit on vda right after this script starts.
sleep 3
{calibrate}
mkdir -p /tmp/okvm-state
cat > /tmp/cfg.toml <<'CFG'
[policy]
state_file = "/tmp/okvm-state/throttle.json"

[[device]]
device = "vda"
{device}

[[vm]]
name = "vmA"
weight = 2
CFG
RUST_LOG=info overkvm-io serve --config /tmp/cfg.toml --listen 127.0.0.1:0 -i 0.5 \
    > /tmp/serve.out 2> /tmp/serve.log &
D=$!
n=0
until grep -q "throttling 1 device" /tmp/serve.log; do
    kill -0 $D 2>/dev/null || {{ okvm_section serve-log /tmp/serve.log; okvm_fail "serve exited at start"; }}
    [ $n -ge 600 ] && {{ okvm_section serve-log /tmp/serve.log; okvm_fail "serve did not start in 60 s"; }}
    usleep 100000; n=$((n + 1))
done
sleep 1
echo "OKVM-T start $(okvm_now)"
{vms}
end=$(( $(cut -d. -f1 /proc/uptime) + {run} ))
while [ "$(cut -d. -f1 /proc/uptime)" -lt "$end" ]; do
    okvm_sample
    usleep 500000
done
okvm_sample
okvm_limits > /tmp/limits
okvm_section limits-engaged /tmp/limits
kill -STOP $P0 $P1 $P2
echo "OKVM-T stopped $(okvm_now)"
n=0
while [ -n "$(okvm_limits)" ]; do
    [ $n -ge 600 ] && {{ okvm_limits > /tmp/limits; okvm_section limits-left /tmp/limits; okvm_section serve-log /tmp/serve.log; okvm_fail "limits still set 60 s after the load stopped"; }}
    usleep 100000; n=$((n + 1))
done
echo "OKVM-T released $(okvm_now)"
kill -KILL $P0 $P1 $P2
wait $P0; wait $P1; wait $P2
kill -TERM $D
wait $D
echo "OKVM-DAEMON-RC $?"
okvm_limits > /tmp/limits
okvm_section limits-after-exit /tmp/limits
okvm_section serve-log /tmp/serve.log
"#,
        names = names.join(" "),
        device = mode.device_lines(),
        run = LOAD_S,
    );
    let ran = run_guest_with(
        &format!("guest61_latency_{}", mode.name()),
        64,
        &script,
        Duration::from_secs(400),
        |g| {
            // `iops-total=` on the running drive.
            let r = g.qmp(
                "block_set_io_throttle",
                Some(serde_json::json!({
                    "device": "virtio0", "bps": 0, "bps_rd": 0, "bps_wr": 0,
                    "iops": CAPACITY as u64, "iops_rd": 0, "iops_wr": 0
                })),
            );
            if let Err(e) = r {
                panic!("setting QEMU's iops limit on vda: {e:#}");
            }
        },
    );
    let t = |what: &str| -> f64 {
        let v = ran
            .values("T")
            .into_iter()
            .find(|v| v[0] == what)
            .unwrap_or_else(|| panic!("no OKVM-T {what} line"));
        parse_f64(v[1])
    };
    let (start, stopped) = (t("start"), t("stopped"));
    let release_s = t("released") - stopped;

    let calibrate_iops = (mode == LatencyMode::Target).then(|| {
        let cal = ran.json_lines("calibrate");
        cal[0]["steps"]
            .as_array()
            .expect("steps")
            .iter()
            .filter(|s| s["pattern"] == "rand_read")
            .filter_map(|s| s["iops"].as_f64())
            .fold(0.0, f64::max)
    });

    // The guest samples the status file every 0.5 s, the daemon rewrites it every 0.5 s: a
    // tick read twice is counted once (same figures back to back are dropped).
    let mut ticks: Vec<LatencyTick> = Vec::new();
    let mut last_json = String::new();
    for rest in ran
        .console
        .lines()
        .filter_map(|l| l.strip_prefix("OKVM-L "))
    {
        let Some((up, json)) = rest.split_once(' ') else {
            continue;
        };
        if json == last_json {
            continue;
        }
        last_json = json.to_string();
        let Ok(v) = serde_json::from_str::<Value>(json) else {
            continue;
        };
        let b = &v["budgets"][0];
        ticks.push(LatencyTick {
            at: parse_f64(up) - start,
            p95_us: b["latency_us"].as_f64(),
            window: b["latency_window_iops"].as_f64(),
            capacity: b["capacity_iops"].as_f64(),
            engaged: b["engaged"].as_bool().unwrap_or(false),
        });
    }
    let engaged_at = ticks.iter().find(|t| t.engaged).map(|t| t.at);
    let target_us = LATENCY_TARGET_MS * 1000.0;
    let loaded: Vec<&LatencyTick> = ticks
        .iter()
        .filter(|t| t.at >= 0.0 && t.at <= stopped - start && t.p95_us.is_some())
        .collect();
    let span_ok = |from: usize| {
        let mut l: Vec<f64> = loaded[from..from + SPAN_TICKS]
            .iter()
            .filter_map(|t| t.p95_us)
            .collect();
        l.sort_by(f64::total_cmp);
        l[l.len() / 2] <= target_us
    };
    let spans = loaded.len().saturating_sub(SPAN_TICKS);
    // It starts at a tick at or under the target once the throttle engaged (not inside the
    // saturated ticks before it, which a 10 s median would hide).
    let settled_at = (0..spans)
        .filter(|i| {
            let t = loaded[*i];
            t.at >= engaged_at.unwrap_or(0.0) && t.p95_us.is_some_and(|l| l <= target_us)
        })
        .find(|from| (*from..spans).all(span_ok))
        .map(|i| loaded[i].at);

    // Steady window: from SETTLED_S after the load started to its end.
    let samples: Vec<(f64, BTreeMap<String, f64>)> = ran
        .values("S")
        .iter()
        .map(|v| {
            let per: BTreeMap<String, f64> = v[1..]
                .iter()
                .filter_map(|w| w.split_once('='))
                .map(|(k, x)| (k.to_string(), parse_f64(x)))
                .collect();
            (parse_f64(v[0]), per)
        })
        .collect();
    let first = samples
        .iter()
        .position(|s| s.0 >= start + SETTLED_S)
        .expect("samples after settling");
    let (t1, a) = (&samples[first].0, &samples[first].1);
    let (t2, b) = samples
        .iter()
        .rfind(|s| s.0 <= stopped)
        .map(|s| (&s.0, &s.1))
        .expect("samples before the load stopped");
    let window = t2 - t1;
    let rates: Vec<f64> = names
        .iter()
        .map(|n| (b.get(*n).copied().unwrap_or(0.0) - a.get(*n).copied().unwrap_or(0.0)) / window)
        .collect();
    let total: f64 = rates.iter().sum();
    let mut steady_p95_us: Vec<f64> = ticks
        .iter()
        .filter(|t| t.at >= SETTLED_S && t.at <= stopped - start)
        .filter_map(|t| t.p95_us)
        .collect();
    steady_p95_us.sort_by(f64::total_cmp);
    let s = LatencyScenario {
        mode,
        ran,
        calibrate_iops,
        ticks,
        engaged_at,
        settled_at,
        rates,
        total,
        steady_p95_us,
        release_s,
        host_load: (load_at_start, host_load()),
    };
    s.print();
    s.write_figures();
    s
}

/// What the latency target guarantees on a device QEMU limits to 600 IOPS, under TCG on a
/// shared 2-core host, and what it does not:
/// - `calibrate` finds the capacity within 10%;
/// - the controller engages and the latency settles within 10 s of the load starting:
///   from then on, in every 10 s (20 ticks of 0.5 s), the median of the per-tick p95 is at or
///   under the target;
/// - from 10 s on: the median per-tick p95 at or under the target; throughput at least 90%
///   of the capacity; shares 2:1:1 (±0.4) with Jain ≥ 0.95 between the equal weights; a
///   learned capacity within 85-105% of the real one;
/// - the limits go within 30 s of the load stopping, and none is left after SIGTERM.
///
/// Not every tick: the controller finds a faster device only by probing above the knee, and
/// QEMU's bucket (a tenth of a second of I/O) lets a small overshoot through for seconds
/// before its backlog shows, so some ticks end over the target (printed: the share of ticks
/// over). The p95 over the whole window is therefore not the target either: it is the
/// per-tick median that is held. A loaded host raises the guest's latency at any rate
/// (TCG): the controller then holds rather than starve the guests, and the p95 figures
/// degrade with the load (printed with each run).
// Host load: TCG makes the guest's own latency rise with the host's load at any rate. With
// this controller the test passed 10 runs of 10 on a quiet 2-core host (load 0.3-1.7; one
// more failed with a compile running beside it) and 3 of 3 with one more core kept busy;
// with both cores kept busy (2 spinning processes besides qemu) the guest's p95 was 2-5 ms at
// any rate and it failed 2 of 2 (throughput 67-82%, never settled). `cargo xtask bench throttle` runs it with the load recorded
// (BENCHMARKS.md, section 3). The printed summary names the host's load at start and end.
#[test]
fn guest61_latency_target_finds_the_capacity_holds_the_target_and_releases() {
    skip_unless_guest!();
    let s = run_latency_scenario(LatencyMode::Target);
    let target_us = LATENCY_TARGET_MS * 1000.0;
    let peak = s.calibrate_iops.unwrap_or(0.0);
    assert!(
        (peak / CAPACITY - 1.0).abs() <= 0.1,
        "calibrate found {peak:.0} IOPS on a device limited to {CAPACITY}"
    );
    let engaged = s.engaged_at.expect("the latency controller never engaged");
    assert!(
        engaged <= SETTLED_S,
        "engaged only {engaged:.1}s after load start"
    );
    let settled = s.settled_at.unwrap_or(f64::INFINITY);
    assert!(
        settled <= SETTLED_S,
        "p95 not settled at the target within {SETTLED_S} s (from {settled:.1} s on)"
    );
    let median = s.median_p95_us();
    assert!(
        median <= target_us,
        "median per-tick p95 {median:.0} us over the target from {SETTLED_S} s on: {:?}",
        s.steady_p95_us
    );
    let (rates, total) = (&s.rates, s.total);
    assert!(
        total >= 0.9 * CAPACITY,
        "throughput {total:.0} below 90% of the capacity {CAPACITY}"
    );
    assert!(
        (rates[0] / rates[1] - 2.0).abs() <= 0.4 && (rates[0] / rates[2] - 2.0).abs() <= 0.4,
        "weights 2:1:1 not held: {rates:?}"
    );
    assert!(
        jain_index(&rates[1..]) >= 0.95,
        "equal weights not fair: {rates:?}"
    );
    let capacity = s.capacity().expect("no capacity learned");
    assert!(
        (CAPACITY * 0.85..=CAPACITY * 1.05).contains(&capacity),
        "learned capacity {capacity:.0} vs {CAPACITY}"
    );
    assert!(
        s.release_s <= 30.0,
        "released only after {:.1}s",
        s.release_s
    );
    assert_eq!(
        s.ran.value("DAEMON-RC"),
        ["0"],
        "daemon exit status on SIGTERM"
    );
    assert!(
        s.ran.section("limits-after-exit").is_empty(),
        "io.max lines left for vda"
    );
}

/// The same scenario under a fixed budget of 540 IOPS (no latency target): what
/// `cargo xtask bench throttle` compares the latency target with.
#[test]
#[ignore = "benchmark scenario, run by `cargo xtask bench throttle` (a 50 s guest)"]
fn guest61_bench_latency_scenario_with_an_iops_budget() {
    skip_unless_guest!();
    let s = run_latency_scenario(LatencyMode::Budget);
    assert_eq!(s.ran.value("DAEMON-RC"), ["0"]);
    assert!(s.ran.section("limits-after-exit").is_empty());
}

/// The same scenario with nothing limited: the device saturated, for the bench.
#[test]
#[ignore = "benchmark scenario, run by `cargo xtask bench throttle` (a 50 s guest)"]
fn guest61_bench_latency_scenario_unthrottled() {
    skip_unless_guest!();
    let s = run_latency_scenario(LatencyMode::Unthrottled);
    assert_eq!(s.ran.value("DAEMON-RC"), ["0"]);
}
