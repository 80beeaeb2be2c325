//! The interactive `overkvm-io top` in a real pseudo-terminal (a private tmux server): it
//! starts, shows a process doing direct I/O on a loop device, survives the keys, and quits
//! cleanly on `q` and on Ctrl-C, leaving the alternate screen. With many quiet VM stand-ins and
//! one busy plain process it opens with the busy one on the first row, and the footer counts
//! the rest. Without a terminal it prints batch tables, in the same order (and JSON too).

use std::{
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use overkvm_tests::{
    devices::LoopDevice,
    iogen::{self, IoPlan},
    serving::TempDir,
    skip_unless_kernel,
    standins::{Pace, StandIn},
    workspace_bin,
};
use serde_json::Value;

/// A tmux server of our own (its own socket, no user config) running `overkvm-io top` in a
/// detached session, killed on drop.
///
/// The pane runs a small shell wrapper that, once top has exited, records its exit status and
/// the terminal settings in files and stays alive: tmux 3.3a's own `remain-on-exit` and
/// `#{pane_dead_status}` proved unreliable here (the status sometimes never appears, and the
/// server sometimes exits), even for a plain `sleep`.
struct Tmux {
    socket: String,
    config: PathBuf,
    /// top's exit status, written by the wrapper.
    status: PathBuf,
    /// `stty -a` after top exited: raw mode must be off again.
    stty: PathBuf,
    /// Where the server put its socket (tmux leaves the file behind).
    socket_path: Option<PathBuf>,
}

/// How top ended, as seen from the terminal it ran in.
struct Exit {
    status: String,
    stty: String,
}

impl Tmux {
    /// Starts `overkvm-io top -d 0.5` in a window of `cols` x `rows` cells.
    fn start_top(cols: u16, rows: u16) -> Tmux {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let socket = format!("overkvm-test-{}-{n}", std::process::id());
        let file = |ext: &str| std::env::temp_dir().join(format!("{socket}.{ext}"));
        let mut tmux = Tmux {
            config: file("conf"),
            status: file("status"),
            stty: file("stty"),
            socket,
            socket_path: None,
        };
        // No status bar, so the pane is the whole window.
        std::fs::write(&tmux.config, "set -g status off\n").expect("writing the tmux config");
        let command = format!(
            "'{}' top -d 0.5; echo $? > '{}'; stty -a > '{}'; echo top-exited; exec sleep 600",
            workspace_bin("overkvm-io").display(),
            tmux.status.display(),
            tmux.stty.display(),
        );
        let out = tmux.run(&[
            "new-session",
            "-d",
            "-s",
            "top",
            "-x",
            &cols.to_string(),
            "-y",
            &rows.to_string(),
            &command,
        ]);
        assert!(
            out.status.success(),
            "tmux new-session failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let path = tmux.pane("#{socket_path}");
        tmux.socket_path = (!path.is_empty()).then(|| PathBuf::from(path));
        tmux
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .arg("-f")
            .arg(&self.config)
            .args(args)
            .output()
            .expect("running tmux")
    }

    /// The visible screen, as text (escape sequences are not included).
    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "top"]).stdout).into_owned()
    }

    /// A pane format variable, e.g. `#{pane_dead}`.
    fn pane(&self, format: &str) -> String {
        String::from_utf8_lossy(
            &self
                .run(&["display-message", "-p", "-t", "top", format])
                .stdout,
        )
        .trim()
        .to_string()
    }

    fn send(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "top"];
        args.extend_from_slice(keys);
        assert!(self.run(&args).status.success(), "send-keys {keys:?}");
    }

    /// Polls the screen until `done` holds; the last screen either way.
    fn wait_for(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&str) -> bool,
    ) -> Result<String, String> {
        let start = Instant::now();
        loop {
            let screen = self.screen();
            if done(&screen) {
                return Ok(screen);
            }
            if start.elapsed() > timeout {
                return Err(screen);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for top to exit (the wrapper has written both files); None on timeout.
    fn wait_exit(&self, timeout: Duration) -> Option<Exit> {
        let start = Instant::now();
        let read = |p: &PathBuf| std::fs::read_to_string(p).unwrap_or_default();
        while start.elapsed() < timeout {
            if self.screen().contains("top-exited") {
                return Some(Exit {
                    status: read(&self.status).trim().to_string(),
                    stty: read(&self.stty),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
        for file in [&self.config, &self.status, &self.stty] {
            let _ = std::fs::remove_file(file);
        }
        if let Some(path) = &self.socket_path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// What every overkvm-io thread is doing, for a test that waited in vain for one to exit.
fn threads_of_top() -> String {
    let out = Command::new("ps")
        .args(["-eLo", "pid,tid,stat,wchan:32,comm,args"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.lines()
        .filter(|l| l.contains("overkvm-io top"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A child process killed and reaped on drop.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Why the tmux tests cannot run here, besides the kernel.
fn tmux_missing() -> Option<String> {
    match Command::new("tmux").arg("-V").output() {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!("tmux -V failed: {}", out.status)),
        Err(e) => Some(format!("tmux is not installed ({e})")),
    }
}

/// A process reading its loop device with O_DIRECT until dropped.
fn busy_reader(lo: &LoopDevice) -> Reaped {
    let plan = IoPlan {
        reads: 1_000_000_000,
        writes: 0,
        block: 4096,
        start: 0,
        len: 32 << 20,
        seed: 3,
    };
    Reaped(iogen::spawn(&lo.path, &plan).expect("spawning iogen"))
}

/// Checks that top exited with status 0 and left the terminal as it found it: cooked mode
/// (icanon, echo) and the main screen, where the wrapper's message is and the table is not.
fn assert_clean_exit(tmux: &Tmux, how: &str) {
    let exit = tmux.wait_exit(Duration::from_secs(10));
    let screen = tmux.screen();
    let Some(exit) = exit else {
        panic!("top did not exit on {how}:\n{screen}\n{}", threads_of_top());
    };
    assert_eq!(exit.status, "0", "top's exit status on {how}:\n{screen}");
    let flags: Vec<&str> = exit.stty.split_whitespace().collect();
    assert!(
        flags.contains(&"icanon") && flags.contains(&"echo"),
        "raw mode left on after {how}:\n{}",
        exit.stty
    );
    assert!(
        !screen.contains("VM/COMM"),
        "the alternate screen was not left after {how}:\n{screen}"
    );
}

/// The table row of `pid`, once the view shows it.
fn row_of<'s>(screen: &'s str, comm: &str, pid: u32) -> Option<&'s str> {
    let pid = pid.to_string();
    screen
        .lines()
        .find(|l| l.starts_with(comm) && l.split_whitespace().any(|w| w == pid))
}

/// Filters the view on iogen (other tests' VMs may fill the screen) and waits for the row of
/// `pid` on `device`.
fn show_iogen(tmux: &Tmux, pid: u32, device: &str) -> String {
    // Keys typed before the view is up would meet a terminal not yet in raw mode.
    tmux.wait_for(Duration::from_secs(10), |s| s.contains("VM/COMM"))
        .unwrap_or_else(|s| panic!("the view never came up:\n{s}"));
    tmux.send(&["/", "iogen", "Enter"]);
    tmux.wait_for(Duration::from_secs(10), |s| {
        s.contains("filter \"iogen\"")
            && row_of(s, "iogen", pid).is_some_and(|r| r.contains(device))
    })
    .unwrap_or_else(|s| panic!("iogen (pid {pid}) on {device} never shown:\n{s}"))
}

#[test]
fn top_shows_a_process_doing_io_and_quits_on_q() {
    skip_unless_kernel!();
    if let Some(reason) = tmux_missing() {
        overkvm_tests::skipped(module_path!(), &reason);
        return;
    }
    let lo = LoopDevice::new(64).expect("loop device");
    let reader = busy_reader(&lo);
    let pid = reader.0.id();
    let tmux = Tmux::start_top(160, 40);

    let screen = show_iogen(&tmux, pid, &lo.name());
    eprintln!("--- 160x40 ---\n{screen}");
    assert!(screen.starts_with("overkvm-io top  "), "{screen}");
    assert!(
        screen.lines().nth(1).is_some_and(|l| l.contains("MB/s")),
        "the header shows devices:\n{screen}"
    );
    assert!(screen.contains("VM/COMM") && screen.contains("THROTTLE"));
    assert!(!screen.contains('\x1b'));

    tmux.send(&["q"]);
    assert_clean_exit(&tmux, "q");
}

#[test]
fn top_takes_keys_at_80x24_and_quits_on_ctrl_c() {
    skip_unless_kernel!();
    if let Some(reason) = tmux_missing() {
        overkvm_tests::skipped(module_path!(), &reason);
        return;
    }
    let lo = LoopDevice::new(64).expect("loop device");
    let reader = busy_reader(&lo);
    let pid = reader.0.id();
    let tmux = Tmux::start_top(80, 24);
    show_iogen(&tmux, pid, &lo.name());
    let wait = |what: &str, done: &dyn Fn(&str) -> bool| {
        tmux.wait_for(Duration::from_secs(3), done)
            .unwrap_or_else(|s| panic!("{what}:\n{s}"))
    };

    // Sort by R/s (the default IO/s -> R/s), reversed and back.
    tmux.send(&[">"]);
    let screen = wait("sort not shown", &|s| s.contains("sort R/s▼"));
    eprintln!("--- 80x24 ---\n{screen}");
    assert!(screen.lines().all(|l| l.chars().count() <= 80));
    tmux.send(&["r"]);
    wait("reverse not shown", &|s| s.contains("sort R/s▲"));
    tmux.send(&["r"]);
    // Esc clears the filter; VMs only hides iogen; v again brings it back.
    // (Esc and a key in one read would be Alt+key: wait in between.)
    tmux.send(&["Escape"]);
    wait("filter not cleared", &|s| !s.contains("filter"));
    tmux.send(&["v"]);
    wait("VMs only not applied", &|s| {
        s.contains("VMs only") && row_of(s, "iogen", pid).is_none()
    });
    tmux.send(&["v"]);
    // A filter that matches nothing.
    tmux.send(&["/", "none", "Enter"]);
    wait("filter not applied", &|s| {
        s.contains("no process matches \"none\"")
    });
    tmux.send(&["Escape"]);
    wait("filter not cleared", &|s| !s.contains("filter"));
    show_iogen(&tmux, pid, &lo.name());
    // Expand (a single device: nothing to split), help closed by any key, pause and resume,
    // a longer interval.
    tmux.send(&["e", "?"]);
    let help = wait("no help screen", &|s| s.contains("any key closes"));
    eprintln!("--- help at 80x24 ---\n{help}");
    tmux.send(&["x", "p"]);
    wait("not paused", &|s| s.contains("PAUSED"));
    tmux.send(&["p", "+"]);
    wait("interval not changed", &|s| {
        s.contains("every 1s") && !s.contains("PAUSED")
    });

    tmux.send(&["C-c"]);
    assert_clean_exit(&tmux, "Ctrl-C");
}

#[test]
fn top_without_a_terminal_prints_batch_tables() {
    skip_unless_kernel!();
    let out = Command::new(workspace_bin("overkvm-io"))
        .args(["top", "-d", "0.2", "-n", "1"])
        .stdout(Stdio::piped())
        .output()
        .expect("running overkvm-io");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.starts_with("overkvm-io top - "), "{text}");
    assert!(text.contains("VM/COMM") && !text.contains('\x1b'), "{text}");
}

/// Many quiet VMs and one busy plain process on a loop device of their own.
struct Crowd {
    quiet: Vec<StandIn>,
    busy: StandIn,
    lo: LoopDevice,
    _bin: TempDir,
}

/// Quiet VM stand-ins: more than a 30-line terminal shows.
const QUIET: usize = 40;

impl Crowd {
    fn start(tag: &str) -> Crowd {
        let lo = LoopDevice::new(64).expect("loop device");
        let bin = TempDir::new(tag);
        let region = |i: u64| Pace {
            rate: Some(5.0),
            start: (i % 8) * (4 << 20),
            len: 4 << 20,
            seed: i + 11,
        };
        let quiet = (0..QUIET as u64)
            .map(|i| {
                let name = format!("okvm-{tag}-{}-q{i:02}", std::process::id());
                StandIn::vm(&bin.0, &lo.path, &name, region(i))
            })
            .collect();
        let busy = StandIn::process(
            &lo.path,
            Pace {
                rate: None,
                start: 32 << 20,
                len: 32 << 20,
                seed: 5,
            },
        );
        Crowd {
            quiet,
            busy,
            lo,
            _bin: bin,
        }
    }

    fn assert_running(&mut self) {
        assert!(self.busy.running(), "the busy stand-in stopped");
        assert!(
            self.quiet.iter_mut().all(StandIn::running),
            "a quiet stand-in stopped"
        );
    }

    fn quiet_pids(&self) -> Vec<u32> {
        self.quiet.iter().map(StandIn::pid).collect()
    }
}

/// The table of a captured screen: the header line and the data lines (up to the footer).
fn table(screen: &str) -> Option<(&str, Vec<&str>, &str)> {
    let lines: Vec<&str> = screen.lines().collect();
    let head = lines.iter().position(|l| l.starts_with("VM/COMM"))?;
    let footer = lines.iter().rposition(|l| !l.trim().is_empty())?;
    (footer > head).then(|| {
        let rows = lines[head + 1..footer]
            .iter()
            .copied()
            .filter(|l| !l.trim().is_empty())
            .collect();
        (lines[head], rows, lines[footer])
    })
}

/// The value in a right-aligned column of `row`, found under its title in `header`.
fn cell<'a>(header: &str, row: &'a str, title: &str) -> Option<&'a str> {
    let head: Vec<char> = header.chars().collect();
    let want: Vec<char> = title.chars().collect();
    let start = head
        .windows(want.len())
        .position(|w| w == want.as_slice())?;
    // The title may carry the sort arrow; the value ends under the title's last character
    // or the arrow's.
    let mut end = start + want.len();
    if matches!(head.get(end), Some('▼' | '▲')) {
        end += 1;
    }
    let chars: Vec<(usize, char)> = row.char_indices().collect();
    let byte_end = chars.get(end).map_or(row.len(), |(b, _)| *b);
    let before = &row[..byte_end];
    before.split_whitespace().last()
}

/// A number as the view prints it: `1234`, `2.3M`.
fn rate(text: &str) -> Option<f64> {
    match text.strip_suffix('M') {
        Some(m) => m.parse::<f64>().ok().map(|v| v * 1e6),
        None => text.parse().ok(),
    }
}

/// Whether `row` is the table line of `pid` (PID is the second column, under its title).
fn row_pid(header: &str, row: &str) -> Option<u32> {
    cell(header, row, "PID")?.parse().ok()
}

/// `N` of "processes N" in the title line.
fn process_count(screen: &str) -> Option<usize> {
    let title = screen.lines().next()?;
    let mut words = title.split_whitespace();
    words.find(|w| *w == "processes")?;
    words.next()?.parse().ok()
}

/// `N` of "N more off screen" in the footer.
fn off_screen_count(footer: &str) -> Option<usize> {
    footer
        .split_once(" more off screen")
        .and_then(|(n, _)| n.split_whitespace().last()?.parse().ok())
}

#[test]
fn top_opens_with_the_busiest_process_first_and_counts_the_rest() {
    skip_unless_kernel!();
    if let Some(reason) = tmux_missing() {
        overkvm_tests::skipped(module_path!(), &reason);
        return;
    }
    let mut crowd = Crowd::start("topsort");
    let busy = crowd.busy.pid();
    let quiet = crowd.quiet_pids();
    let tmux = Tmux::start_top(120, 30);
    // No key at all: the first frame with every stand-in in it must rank the busy one first.
    // Other tests' processes may share the host; one busier than ours may rank above it, but
    // then every row above ours must be at least as busy and none of them ours.
    let mut why = String::new();
    let screen = tmux.wait_for(Duration::from_secs(20), |s| {
        let Some((header, rows, footer)) = table(s) else {
            why = "no table yet".into();
            return false;
        };
        let Some(at) = rows.iter().position(|r| row_pid(header, r) == Some(busy)) else {
            why = "the busy process is not on screen".into();
            return false;
        };
        let busy_iops = cell(header, rows[at], "IO/s").and_then(rate).unwrap_or(0.0);
        let above_ok = rows[..at].iter().all(|r| {
            let pid = row_pid(header, r);
            cell(header, r, "IO/s")
                .and_then(rate)
                .is_some_and(|v| v >= busy_iops)
                && pid.is_some_and(|p| !quiet.contains(&p))
        });
        if !above_ok {
            why = format!("rows above the busy one (row {at}) are not busier");
            return false;
        }
        // The footer counts the processes off screen: all in the title but those shown.
        let (Some(total), Some(hidden)) = (process_count(s), off_screen_count(footer)) else {
            why = format!("no off-screen count in the footer: {footer:?}");
            return false;
        };
        if total < QUIET + 1 || hidden != total - rows.len() {
            why = format!(
                "{hidden} off screen, but {total} processes and {} rows shown",
                rows.len()
            );
            return false;
        }
        true
    });
    let screen = screen.unwrap_or_else(|s| panic!("{why}:\n{s}"));
    eprintln!("--- 120x30, no key pressed ---\n{screen}");
    let (header, rows, footer) = table(&screen).expect("a table");
    assert!(header.contains("IO/s▼"), "{header}");
    assert!(footer.contains("sort IO/s▼"), "{footer}");
    let above = rows
        .iter()
        .position(|r| row_pid(header, r) == Some(busy))
        .unwrap_or(0);
    if above > 0 {
        eprintln!("NOTE: {above} busier process(es) of other tests ranked above ours");
    }
    // The footer's share of IOPS: quiet stand-ins off screen did ~5 IO/s each.
    assert!(
        footer.contains("% of IOPS"),
        "the footer gives the share: {footer}"
    );
    // `n` sorts by name: the busy one (comm iogen) leaves the first row to a name that sorts
    // first, and `i` brings it back.
    tmux.send(&["n"]);
    tmux.wait_for(Duration::from_secs(5), |s| s.contains("sort VM/COMM▲"))
        .unwrap_or_else(|s| panic!("n did not sort by name:\n{s}"));
    tmux.send(&["i"]);
    tmux.wait_for(Duration::from_secs(5), |s| {
        s.contains("sort IO/s▼")
            && table(s).is_some_and(|(h, rows, _)| rows.iter().any(|r| row_pid(h, r) == Some(busy)))
    })
    .unwrap_or_else(|s| panic!("i did not sort by IO/s again:\n{s}"));
    crowd.assert_running();
    tmux.send(&["q"]);
    assert_clean_exit(&tmux, "q");
    drop(crowd.lo);
}

/// Runs `overkvm-io top -b -d 0.5 -n 3` with `extra` arguments; its stdout.
fn batch(extra: &[&str]) -> String {
    let out = Command::new(workspace_bin("overkvm-io"))
        .args(["top", "-b", "-d", "0.5", "-n", "3"])
        .args(extra)
        .stdout(Stdio::piped())
        .output()
        .expect("running overkvm-io top -b");
    assert!(
        out.status.success(),
        "top -b {extra:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The process rows of the last full JSON report: (pid, vm name, total ops of the row).
fn json_rows(text: &str) -> Vec<(u32, Option<String>, u64)> {
    let last = text.lines().last().unwrap_or_default();
    let v: Value = serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {last}"));
    let total = |p: &Value| {
        [
            "read_ops",
            "write_ops",
            "discard_ops",
            "flush_ops",
            "other_ops",
        ]
        .iter()
        .map(|k| p[k].as_u64().unwrap_or(0))
        .sum::<u64>()
    };
    v["processes"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .map(|p| {
                    (
                        p["pid"].as_u64().unwrap_or(0) as u32,
                        p["vm"]["name"].as_str().map(str::to_string),
                        total(p),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Processes in the order of their first row, with their ops summed over their rows; panics
/// when a process's rows are not next to each other.
fn groups_in_order(rows: &[(u32, Option<String>, u64)]) -> Vec<(u32, u64)> {
    let mut order: Vec<(u32, u64)> = Vec::new();
    for (pid, _, ops) in rows {
        match order.last_mut() {
            Some((last, sum)) if last == pid => *sum += ops,
            _ => {
                assert!(
                    order.iter().all(|(p, _)| p != pid),
                    "the rows of pid {pid} are split: {rows:?}"
                );
                order.push((*pid, *ops));
            }
        }
    }
    order
}

#[test]
fn batch_and_json_list_the_busiest_first_and_follow_sort() {
    skip_unless_kernel!();
    let mut crowd = Crowd::start("batchsort");
    let busy = crowd.busy.pid();
    let quiet = crowd.quiet_pids();
    // Give every stand-in time to start its trickle (identities are cached at first sight).
    std::thread::sleep(Duration::from_millis(500));

    // JSON, default order: processes by total ops, highest first, the busy one above every
    // quiet one (and, like the view, not behind the VMs).
    let text = batch(&["--json"]);
    let rows = json_rows(&text);
    let groups = groups_in_order(&rows);
    assert!(
        groups.windows(2).all(|w| w[0].1 >= w[1].1),
        "JSON not sorted by total ops: {groups:?}"
    );
    let rank = |pid: u32| groups.iter().position(|(p, _)| *p == pid);
    let busy_rank = rank(busy).expect("the busy process in the JSON");
    let quiet_ranks: Vec<usize> = quiet.iter().filter_map(|p| rank(*p)).collect();
    assert!(
        quiet_ranks.len() >= QUIET / 2,
        "few quiet VMs reported: {quiet_ranks:?}"
    );
    assert!(
        quiet_ranks.iter().all(|r| *r > busy_rank),
        "a quiet VM above the busy process: busy {busy_rank}, quiet {quiet_ranks:?}"
    );
    eprintln!(
        "JSON: busy pid {busy} ranked {busy_rank} with {} ops; {} quiet VMs below it",
        groups[busy_rank].1,
        quiet_ranks.len()
    );

    // --sort name: our VMs by name; -r the other way round.
    let vm_order = |text: &str| -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for (pid, vm, _) in json_rows(text) {
            if let Some(vm) = vm
                && quiet.contains(&pid)
                && names.last() != Some(&vm)
            {
                names.push(vm);
            }
        }
        names
    };
    for (args, descending) in [
        (&["--json", "--sort", "name"][..], false),
        (&["--json", "--sort", "NAME", "-r"][..], true),
    ] {
        let names = vm_order(&batch(args));
        let mut sorted = names.clone();
        sorted.sort();
        if descending {
            sorted.reverse();
        }
        assert!(names.len() >= QUIET / 2, "{args:?}: {names:?}");
        assert_eq!(names, sorted, "{args:?}");
    }

    // Batch text: the IO/s column, the busy process's rows above every quiet VM's.
    let text = batch(&[]);
    let last = text
        .rsplit("overkvm-io top - ")
        .next()
        .unwrap_or_default()
        .to_string();
    let header = last
        .lines()
        .find(|l| l.starts_with("VM/COMM"))
        .unwrap_or_else(|| panic!("no process table:\n{text}"));
    assert!(header.contains("IO/s"), "{header}");
    let line_of = |pid: u32| {
        last.lines()
            .position(|l| l.split_whitespace().nth(1) == Some(&pid.to_string()))
    };
    let busy_line = line_of(busy).unwrap_or_else(|| panic!("busy pid {busy} missing:\n{last}"));
    for pid in &quiet {
        if let Some(l) = line_of(*pid) {
            assert!(l > busy_line, "quiet pid {pid} above the busy one:\n{last}");
        }
    }
    // A column name that does not exist is refused with the list.
    let out = Command::new(workspace_bin("overkvm-io"))
        .args(["top", "-b", "-n", "1", "--sort", "bogus"])
        .output()
        .expect("running overkvm-io");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "--sort bogus accepted");
    assert!(
        err.contains("possible values") && err.contains("total-iops"),
        "{err}"
    );
    crowd.assert_running();
}
