//! `overkvm-io top`: the sampling loop and its front-ends: the interactive view on a terminal,
//! batch text or JSON lines otherwise.
//!
//! The interactive view runs the sampler on its own thread, which sends each interval's
//! `Report` by value over a channel; a second thread reads the terminal and sends keys over
//! the same channel. The view thread only handles what arrives and draws, and sends pause and
//! interval changes back to the sampler over another channel. Nothing is shared behind a lock.

pub mod app;
pub mod batch;
pub mod columns;
pub mod fleet;
pub mod http_config;
pub mod prometheus;
pub mod rows;
pub mod sort;
#[cfg(test)]
mod testdata;
pub mod ui;

use std::{
    io::{IsTerminal as _, Stdout, Write as _},
    sync::{
        Once,
        atomic::{AtomicBool, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError, Sender},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use crossterm::{
    cursor::{Hide, Show},
    event::{self, Event, KeyEvent, KeyEventKind},
    execute,
    terminal::{EnterAlternateScreen, LeaveAlternateScreen, disable_raw_mode, enable_raw_mode},
};
use ratatui::{Terminal, backend::CrosstermBackend, widgets::TableState};

use crate::{
    bpf::{LoadOptions, Programs},
    pipeline::Pipeline,
    report::Report,
};

use self::app::{App, Effect};

/// What `overkvm-io top` shows, and how (the command line fills it in).
#[derive(Clone, Debug)]
pub struct TopOptions {
    /// Tables (or JSON lines) on stdout instead of the interactive view.
    pub batch: bool,
    /// Time between updates.
    pub delay: std::time::Duration,
    /// Stop after this many updates.
    pub iterations: Option<u64>,
    /// One JSON object per interval per line.
    pub json: bool,
    /// Only VMs.
    pub vms_only: bool,
    /// The order rows start in.
    pub sort: sort::SortOrder,
    /// Fleet view: the Prometheus to ask instead of loading the programs.
    pub prometheus: Option<String>,
    /// Fleet view: the window rates are taken over.
    pub window: std::time::Duration,
    /// Fleet view: credentials and TLS settings for Prometheus (promtool's format).
    pub http_config: Option<std::path::PathBuf>,
    /// The kernel programs (local view).
    pub load: LoadOptions,
    /// Where QEMU's counters of network disks are read (local view).
    pub qemu: crate::qemu::counters::QemuSources,
}

/// Runs `top`: the interactive view when stdout is a terminal, else (or with -b or --json)
/// batch output.
pub fn run(args: &TopOptions) -> anyhow::Result<()> {
    let tui = !args.batch && !args.json && std::io::stdout().is_terminal();
    if let Some(url) = &args.prometheus {
        if tui {
            return run_fleet_interactive(args, url);
        }
        return fleet::run_batch(args, url);
    }
    let opts = args.load.clone();
    if tui {
        return run_interactive(args, opts);
    }
    run_batch(args, &opts)
}

/// One table (or JSON line) per interval on stdout.
fn run_batch(args: &TopOptions, opts: &LoadOptions) -> anyhow::Result<()> {
    let programs = Programs::load(opts)?;
    for note in &programs.notes {
        log::warn!("{note}");
    }
    let mut pipeline = Pipeline::new(programs)?;
    pipeline.count_qemu_disks(crate::lifecycle::list::qemu_sources(&args.qemu));
    let mut done = 0u64;
    let stdout = std::io::stdout();
    loop {
        if args.iterations.is_some_and(|n| done >= n) {
            return Ok(());
        }
        std::thread::sleep(args.delay);
        let mut report = owned(pipeline.tick()?.report);
        if args.vms_only {
            report.processes.retain(|p| p.vm.is_some());
        }
        sort::order_processes(&mut report, args.sort);
        let mut out = stdout.lock();
        let written = if args.json {
            serde_json::to_writer(&mut out, &report)
                .context("encoding JSON")
                .and_then(|_| writeln!(out).context("writing"))
        } else {
            batch::write_table(&mut out, &report).context("writing")
        };
        if let Err(e) = written.and_then(|_| out.flush().context("flushing")) {
            // A closed pipe (`| head`) ends the run quietly.
            if is_broken_pipe(&e) {
                return Ok(());
            }
            return Err(e);
        }
        done += 1;
    }
}

/// The report of a tick, without a copy when nothing else holds it.
fn owned(report: std::sync::Arc<Report>) -> Report {
    std::sync::Arc::try_unwrap(report).unwrap_or_else(|shared| (*shared).clone())
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Everything the view thread waits for: reports from the sampler thread, keys from the
/// terminal-input thread.
enum ViewEvent {
    /// The programs are loaded and attached; the loader's warnings.
    Ready(Vec<String>),
    Report(Report),
    /// A fleet refresh from Prometheus, or why it failed.
    Fleet(Result<fleet::FleetReport, String>),
    /// The throttle daemon's latest state (None when no daemon runs).
    Throttle(Option<crate::tick::ThrottleView>),
    /// The sampler stopped on this error (or panicked).
    SamplerFailed(anyhow::Error),
    Key(KeyEvent),
    Resize,
    TerminalFailed(std::io::Error),
}

/// What the view asks of the sampler thread.
enum SamplerControl {
    Interval(Duration),
    /// Stop (true) or resume building reports; snapshots and pruning go on, so the maps stay
    /// small and the first report after a pause covers one interval, not the pause.
    Pause(bool),
}

fn run_interactive(args: &TopOptions, opts: LoadOptions) -> anyhow::Result<()> {
    let (events_tx, events) = mpsc::channel();
    let (control, control_rx) = mpsc::channel();
    let delay = args.delay;
    let qemu = args.qemu.clone();
    let sampler_events = events_tx.clone();
    // Dropped when the sampler thread ends, whichever way.
    let (sampler_alive, sampler_ended) = mpsc::channel::<()>();
    let sampler = thread::Builder::new()
        .name("overkvm-sampler".into())
        .spawn(move || {
            let _alive = sampler_alive;
            // The panic hook has restored the terminal and printed the message; the view
            // still has to learn that no more reports will come.
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                sample_loop(&opts, &qemu, delay, &sampler_events, &control_rx)
            }));
            let failed = match ran {
                Ok(Ok(())) => return,
                Ok(Err(e)) => e,
                Err(_) => anyhow::anyhow!("the sampler thread panicked"),
            };
            let _ = sampler_events.send(ViewEvent::SamplerFailed(failed));
        })
        .context("starting the sampler thread")?;
    // Loading fails for plain reasons (not root, no BTF): say so before taking the terminal.
    match events.recv() {
        Ok(ViewEvent::Ready(notes)) => notes.iter().for_each(|n| log::warn!("{n}")),
        Ok(ViewEvent::SamplerFailed(e)) => {
            let _ = sampler.join();
            return Err(e);
        }
        _ => {
            let _ = sampler.join();
            bail!("the sampler thread stopped before loading the programs");
        }
    }
    let mut app = App::new(args.delay, args.vms_only, args.sort);
    let shown = TerminalSession::enter().and_then(|mut session| {
        spawn_terminal_reader(events_tx)?;
        view_loop(
            &mut session.terminal,
            &mut app,
            &events,
            &control,
            args.iterations,
        )
    });
    // The sampler ends at its next wait once the control channel is gone. It may be in the
    // middle of an interval (reading /proc of a process stuck in throttled I/O can take
    // seconds): the terminal is already back, and past a short wait the process exits
    // without it; closing its descriptors detaches the programs all the same.
    drop(control);
    if let Err(RecvTimeoutError::Disconnected) = sampler_ended.recv_timeout(SAMPLER_GRACE) {
        let _ = sampler.join();
    }
    shown
}

/// The fleet view on a terminal: a refresher thread queries Prometheus every `-d` and sends
/// each refresh by value; the view, keys and terminal handling are the local view's.
fn run_fleet_interactive(args: &TopOptions, url: &str) -> anyhow::Result<()> {
    let client = prometheus::Client::with_config(url, args.http_config.as_deref())?;
    let queries = fleet::Queries::new(args.window);
    // A wrong URL or a Prometheus that is down fails plainly, before taking the terminal.
    let first = fleet::fetch_report(&client, &queries, args.window, args.sort)?;
    let (events_tx, events) = mpsc::channel();
    let (control, control_rx) = mpsc::channel();
    let refresher_events = events_tx.clone();
    let (window, sort, delay) = (args.window, args.sort, args.delay);
    let _ = events_tx.send(ViewEvent::Fleet(Ok(first)));
    thread::Builder::new()
        .name("overkvm-fleet".into())
        .spawn(move || {
            fleet::refresh_loop(
                &client,
                &queries,
                window,
                sort,
                delay,
                &|r| refresher_events.send(ViewEvent::Fleet(r)).is_ok(),
                &control_rx,
            );
        })
        .context("starting the refresher thread")?;
    let mut app = App::new_fleet(args.delay, args.sort);
    TerminalSession::enter().and_then(|mut session| {
        spawn_terminal_reader(events_tx)?;
        view_loop(
            &mut session.terminal,
            &mut app,
            &events,
            &control,
            args.iterations,
        )
    })
    // The refresher ends at its next wait once the control channel is gone; a query in
    // flight ends with the process.
}

/// How long quitting waits for the sampler thread to finish an interval.
const SAMPLER_GRACE: Duration = Duration::from_secs(1);

/// Samples every `delay` until the view goes away, sending a report per interval.
fn sample_loop(
    opts: &LoadOptions,
    qemu: &crate::qemu::counters::QemuSources,
    mut delay: Duration,
    events: &Sender<ViewEvent>,
    control: &Receiver<SamplerControl>,
) -> anyhow::Result<()> {
    let programs = Programs::load(opts)?;
    if events
        .send(ViewEvent::Ready(programs.notes.clone()))
        .is_err()
    {
        return Ok(());
    }
    let mut pipeline = Pipeline::new(programs)?;
    pipeline.count_qemu_disks(crate::lifecycle::list::qemu_sources(qemu));
    let mut taken = Instant::now();
    let mut paused = false;
    loop {
        // A new interval counts from the last sample, so `-` takes effect at once.
        loop {
            let wait = (taken + delay).saturating_duration_since(Instant::now());
            if wait.is_zero() {
                break;
            }
            match control.recv_timeout(wait) {
                Ok(SamplerControl::Interval(d)) => delay = d,
                Ok(SamplerControl::Pause(p)) => paused = p,
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
        }
        // Every interval goes through the pipeline, paused or not: the self-check and the
        // housekeeping must see each one. A paused view just does not get it.
        let report = owned(pipeline.tick()?.report);
        taken = Instant::now();
        if !paused {
            if events.send(ViewEvent::Report(report)).is_err() {
                return Ok(());
            }
            // The daemon (`overkvm-io serve`) publishes its throttle state each tick.
            let throttle = crate::status_file::read_live(
                &crate::config::Config::default(),
                Duration::from_secs(5),
            );
            if events.send(ViewEvent::Throttle(throttle)).is_err() {
                return Ok(());
            }
        }
    }
}

/// Reads keys and resizes on a thread of its own, so the view never blocks in the terminal.
/// It is not joined: crossterm's read blocks until the next key, and on a hung-up terminal
/// it never returns (it retries the end of file). It ends at the first event after the view
/// has gone, or with the process.
fn spawn_terminal_reader(events: Sender<ViewEvent>) -> anyhow::Result<()> {
    thread::Builder::new()
        .name("overkvm-input".into())
        .spawn(move || {
            loop {
                let ev = match event::read() {
                    Ok(Event::Key(k)) if k.kind != KeyEventKind::Release => ViewEvent::Key(k),
                    Ok(Event::Resize(..)) => ViewEvent::Resize,
                    Ok(_) => continue,
                    Err(e) => ViewEvent::TerminalFailed(e),
                };
                let failed = matches!(ev, ViewEvent::TerminalFailed(_));
                if events.send(ev).is_err() || failed {
                    return;
                }
            }
        })
        .context("starting the terminal input thread")?;
    Ok(())
}

/// Handles keys and reports until the user quits (or `iterations` reports were shown).
fn view_loop(
    terminal: &mut Terminal<CrosstermBackend<Stdout>>,
    app: &mut App,
    events: &Receiver<ViewEvent>,
    control: &Sender<SamplerControl>,
    iterations: Option<u64>,
) -> anyhow::Result<()> {
    let mut table = TableState::default();
    let mut shown = 0u64;
    let mut dirty = true;
    loop {
        if STOP_REQUESTED.load(Ordering::SeqCst) {
            return Ok(());
        }
        if dirty {
            let mut page = 0;
            terminal
                .draw(|frame| page = ui::draw(frame, app, &mut table))
                .context("drawing")?;
            app.set_page(page);
            dirty = false;
        }
        if iterations.is_some_and(|n| shown >= n) {
            return Ok(());
        }
        // The timeout only bounds how late a stop signal is noticed.
        let ev = match events.recv_timeout(Duration::from_millis(200)) {
            Ok(ev) => ev,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => bail!("the sampler and input threads stopped"),
        };
        match ev {
            ViewEvent::Throttle(t) => {
                if app.throttle() != t.as_ref() {
                    app.set_throttle(t);
                    dirty = true;
                }
            }
            ViewEvent::Report(r) => {
                if app.set_report(r) {
                    shown += 1;
                    dirty = true;
                }
            }
            ViewEvent::Fleet(r) => {
                if app.set_fleet(r) {
                    shown += 1;
                    dirty = true;
                }
            }
            ViewEvent::Key(key) => {
                dirty = true;
                // A send fails only when the sampler has stopped; its error follows.
                match app.handle_key(key) {
                    Effect::Quit => return Ok(()),
                    Effect::Pause(p) => {
                        let _ = control.send(SamplerControl::Pause(p));
                    }
                    Effect::Interval(d) => {
                        let _ = control.send(SamplerControl::Interval(d));
                    }
                    Effect::None => {}
                }
            }
            ViewEvent::Resize => dirty = true,
            ViewEvent::Ready(_) => {}
            ViewEvent::SamplerFailed(e) => return Err(e),
            ViewEvent::TerminalFailed(e) => return Err(e).context("reading the terminal"),
        }
    }
}

/// The terminal is in raw mode on the alternate screen (so the panic hook must restore it).
static TERMINAL_TAKEN: AtomicBool = AtomicBool::new(false);
/// SIGTERM, SIGHUP or SIGINT arrived while the view ran.
static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);
const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGHUP, libc::SIGINT];

/// Raw mode, the alternate screen and a hidden cursor for as long as it lives; dropping it
/// (on quit or error) or a panic on any thread puts the terminal back. Logging is off
/// meanwhile, as a log line would scribble over the screen.
struct TerminalSession {
    terminal: Terminal<CrosstermBackend<Stdout>>,
    log_level: log::LevelFilter,
}

impl TerminalSession {
    fn enter() -> anyhow::Result<TerminalSession> {
        install_panic_hook();
        catch_stop_signals();
        let log_level = log::max_level();
        log::set_max_level(log::LevelFilter::Off);
        TERMINAL_TAKEN.store(true, Ordering::SeqCst);
        let taken = enable_raw_mode()
            .and_then(|()| execute!(std::io::stdout(), EnterAlternateScreen, Hide))
            .and_then(|()| Terminal::new(CrosstermBackend::new(std::io::stdout())));
        match taken {
            Ok(terminal) => Ok(TerminalSession {
                terminal,
                log_level,
            }),
            Err(e) => {
                restore_terminal();
                log::set_max_level(log_level);
                Err(e).context("setting up the terminal (raw mode, alternate screen)")
            }
        }
    }
}

impl Drop for TerminalSession {
    fn drop(&mut self) {
        restore_terminal();
        log::set_max_level(self.log_level);
        for sig in STOP_SIGNALS {
            // SAFETY: restores the default disposition; no handler runs.
            unsafe { libc::signal(sig, libc::SIG_DFL) };
        }
    }
}

/// Leaves the alternate screen and raw mode, once, whoever calls first.
fn restore_terminal() {
    if TERMINAL_TAKEN.swap(false, Ordering::SeqCst) {
        let _ = disable_raw_mode();
        let _ = execute!(std::io::stdout(), LeaveAlternateScreen, Show);
    }
}

/// Restores the terminal before the panic message is printed, so it is readable and the
/// shell is usable. Chains to the previous hook; installed once.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_terminal();
            previous(info);
        }));
    });
}

extern "C" fn request_stop(_signal: libc::c_int) {
    STOP_REQUESTED.store(true, Ordering::SeqCst);
}

/// In raw mode Ctrl-C is a key, but `kill`, a closed terminal or a supervisor still send
/// signals: turn them into a normal quit so the terminal is restored.
fn catch_stop_signals() {
    let handler: extern "C" fn(libc::c_int) = request_stop;
    for sig in STOP_SIGNALS {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, handler as libc::sighandler_t) };
    }
}
