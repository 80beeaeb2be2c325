//! What the daemon may touch. Traced with strace while it throttles test VMs (moving two that
//! share a cgroup into cgroups of its own): every path it opens for writing, creates, removes,
//! renames or chmods must be a limit file (or `cgroup.procs`) of a test VM cgroup, a cgroup it
//! created, or its own state directory, opened without following symlinks. Symlinks planted at
//! its state and status files are replaced, never written through. Its metrics endpoint serves
//! /metrics and nothing else. As non-root it refuses to start and writes nothing.

use std::{
    collections::BTreeSet,
    fs,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use overkvm_tests::{
    serving::{self, Serve, TempDir},
    skip_unless_kernel,
    throttling::{
        V1Scenario, any_limit, cgroup_tree, greedy_vm, v1_limits, wait_until, write_config,
    },
    workspace_bin,
};

/// Syscalls that create, remove, rename or change files (and the opens, filtered by flags).
const TRACED: &str = "trace=open,openat,openat2,creat,mkdir,mkdirat,unlink,unlinkat,rmdir,\
rename,renameat,renameat2,symlink,symlinkat,link,linkat,chmod,fchmod,fchmodat,truncate,ftruncate";

/// `overkvm-io serve` under `strace -ff`; the daemon gets SIGTERM (and strace then ends) when
/// dropped.
struct Traced {
    strace: Child,
    daemon_pid: Option<i32>,
}

impl Traced {
    fn start(out_prefix: &Path, cwd: &Path, config: &Path, log: &Path) -> Traced {
        let err = fs::File::create(log).unwrap();
        let strace = Command::new("strace")
            .args(["-ff", "-qq", "-y", "-s", "4096", "-e", TRACED, "-o"])
            .arg(out_prefix)
            .arg(workspace_bin("overkvm-io"))
            .args(["serve", "--listen", "127.0.0.1:0", "-i", "0.5", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap();
        let mut t = Traced {
            daemon_pid: None,
            strace,
        };
        let sp = t.strace.id();
        // strace forks short-lived children of its own at start (to probe ptrace features):
        // the daemon is the child running overkvm-io.
        wait_until(Duration::from_secs(10), || {
            t.daemon_pid = fs::read_to_string(format!("/proc/{sp}/task/{sp}/children"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
                .find(|p| {
                    // argv[0] only: before its exec the child is a copy of strace, whose
                    // arguments name overkvm-io too.
                    fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| {
                        c.split(|&b| b == 0)
                            .next()
                            .is_some_and(|a0| a0.ends_with(b"overkvm-io"))
                    })
                });
            t.daemon_pid.is_some()
        });
        t
    }

    /// SIGTERM to the daemon; waits for it (and strace) to end. True on a clean exit of both.
    fn stop(&mut self) -> bool {
        let daemon = self.daemon_pid.take();
        if let Some(pid) = daemon {
            // SAFETY: plain syscall on the daemon strace started for us.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let end = Instant::now() + Duration::from_secs(20);
        while Instant::now() < end {
            if let Ok(Some(st)) = self.strace.try_wait() {
                return st.success();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.strace.kill();
        let _ = self.strace.wait();
        if let Some(pid) = daemon {
            // Do not leave it running (and throttling) behind a failed test.
            // SAFETY: plain syscall.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        false
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        if matches!(self.strace.try_wait(), Ok(None)) {
            self.stop();
        }
    }
}

/// One file-changing call of a trace: the syscall, the (absolute) paths it changes, and for
/// opens the flags.
#[derive(Debug)]
struct Change {
    call: String,
    paths: Vec<PathBuf>,
    flags: String,
    line: String,
}

/// Splits a strace argument list at top-level commas (quotes and brackets respected).
fn args_of(s: &str) -> Vec<String> {
    let (mut out, mut cur, mut depth, mut quoted, mut esc) =
        (Vec::new(), String::new(), 0i32, false, false);
    for c in s.chars() {
        if quoted {
            cur.push(c);
            if esc {
                esc = false;
            } else if c == '\\' {
                esc = true;
            } else if c == '"' {
                quoted = false;
            }
            continue;
        }
        match c {
            '"' => {
                quoted = true;
                cur.push(c);
            }
            '(' | '[' | '{' | '<' => {
                depth += 1;
                cur.push(c);
            }
            ')' | ']' | '}' | '>' => {
                depth -= 1;
                cur.push(c);
            }
            ',' if depth == 0 => out.push(std::mem::take(&mut cur).trim().to_string()),
            _ => cur.push(c),
        }
    }
    if !cur.trim().is_empty() {
        out.push(cur.trim().to_string());
    }
    out
}

fn unquote(a: &str) -> Option<String> {
    let s = a.strip_prefix('"')?;
    let s = s.strip_suffix('"').or_else(|| s.strip_suffix("\"..."))?;
    Some(s.replace("\\\"", "\"").replace("\\\\", "\\"))
}

/// `3</some/dir>` -> /some/dir
fn fd_path(a: &str) -> Option<PathBuf> {
    let (_, rest) = a.split_once('<')?;
    Some(PathBuf::from(rest.strip_suffix('>')?))
}

fn resolve(dirfd: Option<&str>, path: &str, cwd: &Path) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match dirfd.and_then(fd_path) {
        Some(d) => d.join(p),
        None => cwd.join(p),
    }
}

/// The file-changing calls in one strace output file.
fn changes(trace: &str, cwd: &Path) -> Vec<Change> {
    let mut out = Vec::new();
    for line in trace.lines() {
        let Some((call, rest)) = line.split_once('(') else {
            continue;
        };
        let call = call.trim().to_string();
        let Some(close) = rest.rfind(") = ").or_else(|| rest.rfind(')')) else {
            continue;
        };
        let a = args_of(&rest[..close]);
        let q = |i: usize| a.get(i).and_then(|s| unquote(s));
        let at = |fd: usize, p: usize| {
            q(p).map(|path| resolve(a.get(fd).map(String::as_str), &path, cwd))
        };
        let (paths, flags): (Vec<Option<PathBuf>>, String) = match call.as_str() {
            "open" => (
                vec![q(0).map(|p| resolve(None, &p, cwd))],
                a.get(1).cloned().unwrap_or_default(),
            ),
            "openat" | "openat2" => (vec![at(0, 1)], a.get(2).cloned().unwrap_or_default()),
            "creat" => (
                vec![q(0).map(|p| resolve(None, &p, cwd))],
                "O_CREAT|O_WRONLY|O_TRUNC".into(),
            ),
            "mkdir" | "unlink" | "rmdir" | "chmod" | "truncate" => {
                (vec![q(0).map(|p| resolve(None, &p, cwd))], String::new())
            }
            "mkdirat" | "unlinkat" | "fchmodat" => (vec![at(0, 1)], String::new()),
            "rename" => (
                vec![
                    q(0).map(|p| resolve(None, &p, cwd)),
                    q(1).map(|p| resolve(None, &p, cwd)),
                ],
                String::new(),
            ),
            "renameat" | "renameat2" => (vec![at(0, 1), at(2, 3)], String::new()),
            "symlink" | "link" => (vec![q(1).map(|p| resolve(None, &p, cwd))], String::new()),
            "symlinkat" => (vec![at(1, 2)], String::new()),
            "linkat" => (vec![at(2, 3)], String::new()),
            "fchmod" | "ftruncate" => (vec![a.first().and_then(|s| fd_path(s))], String::new()),
            _ => continue,
        };
        let opening = matches!(call.as_str(), "open" | "openat" | "openat2" | "creat");
        if opening
            && !["O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC"]
                .iter()
                .any(|f| flags.contains(f))
        {
            continue;
        }
        out.push(Change {
            call,
            paths: paths.into_iter().flatten().collect(),
            flags,
            line: line.to_string(),
        });
    }
    out
}

const LIMIT_FILES: [&str; 5] = [
    "blkio.throttle.read_iops_device",
    "blkio.throttle.write_iops_device",
    "blkio.throttle.read_bps_device",
    "blkio.throttle.write_bps_device",
    "cgroup.procs",
];

#[test]
fn the_daemon_writes_only_limits_its_cgroups_and_its_state() {
    skip_unless_kernel!();
    let blkio = overkvm_tests::v1_blkio_or_skip!();
    if Command::new("strace").arg("-V").output().is_err() {
        overkvm_tests::skipped(
            module_path!(),
            "strace is not installed (Debian package strace)",
        );
        return;
    }
    let tag = std::process::id();
    let shared_a = format!("prv{tag}c");
    let shared_b = format!("prv{tag}d");
    let V1Scenario {
        lo,
        major,
        minor,
        mut cgs,
        dirs,
    } = V1Scenario::new(&blkio, 128, &["vmA", "vmB", "shared"]);
    let managed = blkio.join("overkvm");
    let managed_existed = managed.exists();
    let _managed_cleanup = ManagedCleanup {
        dirs: vec![managed.join(&shared_a), managed.join(&shared_b)],
        parent: (!managed_existed).then(|| managed.clone()),
    };
    let tmp = TempDir::new("privilege");
    let state_dir = tmp.join("state");
    fs::create_dir_all(&state_dir).unwrap();
    // Symlinks planted where the state and status files go, pointing at files outside.
    let outside = tmp.join("outside");
    fs::create_dir_all(&outside).unwrap();
    for f in ["throttle.json", "status.json"] {
        fs::write(outside.join(f), "precious\n").unwrap();
        std::os::unix::fs::symlink(outside.join(f), state_dir.join(f)).unwrap();
    }
    let config = tmp.join("c.toml");
    write_config(
        &config,
        &state_dir.join("throttle.json"),
        "engage_ticks = 1\nmanage_cgroups = true\n",
        &lo.name(),
        600,
        "",
    );
    let traces = tmp.join("traces");
    fs::create_dir_all(&traces).unwrap();
    let cwd = tmp.join("cwd");
    fs::create_dir_all(&cwd).unwrap();
    let log = tmp.join("d.log");
    let mut traced = Traced::start(&traces.join("t"), &cwd, &config, &log);
    let up = wait_until(Duration::from_secs(60), || {
        fs::read_to_string(&log).is_ok_and(|l| l.contains("throttling "))
    });
    assert!(
        up,
        "traced daemon not up:\n{}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    for (i, n) in ["vmA", "vmB"].iter().enumerate() {
        let child = greedy_vm(&tmp.0, &lo.path, n, &dirs[i], i as u64);
        cgs.kids.push(child);
    }
    for (i, n) in [&shared_a, &shared_b].iter().enumerate() {
        let child = greedy_vm(&tmp.0, &lo.path, n, &dirs[2], 2 + i as u64);
        cgs.kids.push(child);
    }
    let adopted = wait_until(Duration::from_secs(20), || {
        managed.join(&shared_a).exists()
            && managed.join(&shared_b).exists()
            && any_limit(&dirs, major, minor)
    });
    let created_limits = [&shared_a, &shared_b]
        .iter()
        .filter(|n| {
            v1_limits(&managed.join(n), major, minor)
                .iter()
                .any(Option::is_some)
        })
        .count();
    // Metrics while at it (the traced daemon is slow, not different).
    std::thread::sleep(Duration::from_secs(2));
    let clean_exit = traced.stop();
    let text = fs::read_to_string(&log).unwrap_or_default();
    assert!(
        adopted,
        "shared VMs never moved into cgroups of their own / no limit:\n{text}"
    );
    assert!(
        clean_exit,
        "daemon did not exit cleanly on SIGTERM:\n{text}"
    );
    cgs.stop_all();

    // Everything it changed, by path.
    let mut all = Vec::new();
    let mut files = 0;
    for e in fs::read_dir(&traces).unwrap().flatten() {
        files += 1;
        all.extend(changes(&fs::read_to_string(e.path()).unwrap(), &cwd));
    }
    let in_test_cgroups = |p: &Path| {
        p.parent() == Some(dirs[0].as_path())
            || p.parent() == Some(dirs[1].as_path())
            || p.parent() == Some(dirs[2].as_path())
    };
    let mut violations = Vec::new();
    let mut audited = BTreeSet::new();
    for c in &all {
        for p in &c.paths {
            audited.insert(p.clone());
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let ok = p.starts_with(&state_dir)
                || p == Path::new("/dev/null")
                || (in_test_cgroups(p) && LIMIT_FILES.contains(&name.as_str()))
                || (p.starts_with(&managed)
                    && (LIMIT_FILES.contains(&name.as_str())
                        || matches!(c.call.as_str(), "mkdir" | "mkdirat" | "rmdir")));
            if !ok {
                violations.push(format!("outside what it may write: {}", c.line));
            }
        }
        let opening = matches!(c.call.as_str(), "open" | "openat" | "openat2");
        // O_CREAT|O_EXCL fails on an existing symlink, as O_NOFOLLOW does.
        let exclusive = c.flags.contains("O_CREAT") && c.flags.contains("O_EXCL");
        let follows = !c.flags.contains("O_NOFOLLOW") && !exclusive;
        if opening && follows && !c.paths.iter().all(|p| p == Path::new("/dev/null")) {
            violations.push(format!("opened for writing without O_NOFOLLOW: {}", c.line));
        }
    }
    for f in ["throttle.json", "status.json"] {
        let now = fs::read_to_string(outside.join(f)).unwrap_or_default();
        if now != "precious\n" {
            violations.push(format!(
                "{f}: the planted symlink's target was written: {now:?}"
            ));
        }
    }
    let left: Vec<PathBuf> = cgroup_tree(&cgs.root)
        .into_iter()
        .chain([managed.join(&shared_a), managed.join(&shared_b)])
        .filter(|d| d.exists() && v1_limits(d, major, minor).iter().any(Option::is_some))
        .collect();
    let managed_left = managed.join(&shared_a).exists() || managed.join(&shared_b).exists();
    let audited_list: Vec<String> = audited.iter().map(|p| p.display().to_string()).collect();
    eprintln!(
        "audited {} file-changing calls over {} distinct paths ({files} traced tasks; {created_limits} limits on cgroups it created):\n  {}",
        all.len(),
        audited.len(),
        audited_list.join("\n  ")
    );
    assert!(
        all.iter()
            .any(|c| c.paths.iter().any(|p| p.starts_with(&managed))),
        "the trace shows no write to the cgroups it created: the audit saw nothing"
    );
    assert!(violations.is_empty(), "{}", violations.join("\n"));
    assert!(left.is_empty(), "limits left after stop: {left:?}");
    assert!(
        !managed_left,
        "the daemon's own cgroups were left after stop"
    );
}

/// Removes the managed cgroups a failed run may leave (the VMs are killed first by
/// `TestCgroups`, which is dropped before this).
struct ManagedCleanup {
    dirs: Vec<PathBuf>,
    parent: Option<PathBuf>,
}

impl Drop for ManagedCleanup {
    fn drop(&mut self) {
        for d in &self.dirs {
            let _ = fs::remove_dir(d);
        }
        if let Some(p) = &self.parent {
            let _ = fs::remove_dir(p);
        }
    }
}

#[test]
fn the_metrics_endpoint_serves_nothing_but_metrics() {
    skip_unless_kernel!();
    let tmp = TempDir::new("endpoint");
    let daemon = Serve::start(&tmp.join("d.log"), &[]);
    let ok = serving::scrape(daemon.addr).expect("/metrics answers");
    assert!(ok.contains("overkvm_ticks_total"));
    let requests: Vec<(&str, String)> = [
        "GET / HTTP/1.1",
        "GET /debug HTTP/1.1",
        "GET /debug/pprof HTTP/1.1",
        "GET /../etc/passwd HTTP/1.1",
        "GET /metrics/../../../etc/passwd HTTP/1.1",
        "GET /metrics/../x HTTP/1.1",
        "GET /metrics/x HTTP/1.1",
        "GET /etc/passwd HTTP/1.1",
        "GET //etc/passwd HTTP/1.1",
        "GET /%2e%2e/%2e%2e/etc/passwd HTTP/1.1",
        "GET /metrics%2f..%2f..%2fetc%2fpasswd HTTP/1.1",
        "GET /proc/self/environ HTTP/1.1",
        "GET http://127.0.0.1/etc/passwd HTTP/1.1",
        "GET http://127.0.0.1/../../etc/passwd HTTP/1.1",
        "GET file:///etc/passwd HTTP/1.1",
        "GET * HTTP/1.1",
        "OPTIONS * HTTP/1.1",
        "CONNECT 127.0.0.1:22 HTTP/1.1",
        "PUT /metrics HTTP/1.1",
        "DELETE /metrics HTTP/1.1",
        "GET ../../etc/passwd HTTP/1.1",
        "GET /metrics\0/etc/passwd HTTP/1.1",
    ]
    .iter()
    .map(|r| (*r, format!("{r}\r\nHost: x\r\nConnection: close\r\n\r\n")))
    .collect();
    let mut table = Vec::new();
    let mut bad = Vec::new();
    for (r, raw) in &requests {
        let (status, resp) =
            serving::http_raw(daemon.addr, raw.as_bytes()).unwrap_or((0, String::new()));
        let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        table.push(format!("{status:3} {} bytes  {r:?}", body.len()));
        // Refused with a client error (or the connection closed: 0), never content.
        let refused = status == 0 || (400..500).contains(&status);
        if !refused
            || body.contains("root:")
            || body.contains("overkvm_")
            || body.contains("PATH=")
            || body.len() > 512
        {
            bad.push(format!(
                "{r:?} -> {status}: {}",
                body.chars().take(200).collect::<String>()
            ));
        }
    }
    // The absolute form of /metrics is /metrics: metrics and only metrics.
    let (status, resp) = serving::http_raw(
        daemon.addr,
        b"GET http://127.0.0.1/metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    table.push(format!(
        "{status:3} {} bytes  \"GET http://127.0.0.1/metrics\"",
        resp.len()
    ));
    if status == 200 {
        let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        let foreign: Vec<&str> = body
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with("overkvm_"))
            .filter(|l| !l.chars().all(|c| c.is_ascii_hexdigit()))
            .take(5)
            .collect();
        if !foreign.is_empty() {
            bad.push(format!(
                "absolute-form /metrics serves non-metric lines: {foreign:?}"
            ));
        }
    }
    eprintln!("requests beyond /metrics:\n  {}", table.join("\n  "));
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn as_non_root_serve_refuses_with_a_clear_message_and_writes_nothing() {
    skip_unless_kernel!();
    let tmp = TempDir::new("nonroot");
    let lo = overkvm_tests::devices::LoopDevice::new(16).unwrap();
    let state_dir = tmp.join("state");
    let config = tmp.join("c.toml");
    write_config(
        &config,
        &state_dir.join("throttle.json"),
        "",
        &lo.name(),
        100,
        "",
    );
    // nobody must be able to read the config and reach the binary.
    let _ = fs::set_permissions(&tmp.0, std::os::unix::fs::PermissionsExt::from_mode(0o755));
    let _ = fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o644));
    let out = Command::new(workspace_bin("overkvm-io"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .uid(65534)
        .gid(65534)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("serve as uid 65534: {} / {}", out.status, err.trim());
    assert!(!out.status.success(), "serve started as non-root");
    assert!(err.contains("root"), "no clear message: {err}");
    assert!(
        !state_dir.exists(),
        "a refused start created {}",
        state_dir.display()
    );
}
