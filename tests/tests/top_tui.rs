//! The interactive `overkvm-io top` in a real pseudo-terminal (a private tmux server): it
//! starts, shows a process doing direct I/O on a loop device, survives the keys, and quits
//! cleanly on `q` and on Ctrl-C, leaving the alternate screen. Without a terminal it prints
//! batch tables.

use std::{
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use overkvm_tests::{
    devices::LoopDevice,
    iogen::{self, IoPlan},
    skip_unless_kernel, workspace_bin,
};

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
    fn wait_for(&self, timeout: Duration, done: impl Fn(&str) -> bool) -> Result<String, String> {
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

    // Sort by R/s (VM/COMM -> PID -> DEVICE -> R/s), reversed and back.
    tmux.send(&[">", ">", ">"]);
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
