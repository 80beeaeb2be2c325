//! `overkvm-io serve`: the daemon. One sampler ticks; each tick's report goes to the throttle
//! (when budgets are configured) and then to the exporter, which serves `/metrics`. Signals
//! stop it cleanly: the throttle removes every limit it set before the process exits.
//!
//! The control loop (sampler, throttle, signals) runs on the main thread with a runtime and a
//! timer of its own; `/metrics` is served by one thread of a second runtime, at a lower
//! priority. However hard the endpoint is scraped, serving takes at most one core, yields it
//! to the tick when the CPU is short, and never has to drive the tick's timer.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    bpf::{self, LoadOptions, Programs},
    config::Config,
    export::{ExportOptions, Exporter, latency::LatencyBuckets, webconfig::WebConfigWatcher},
    pipeline::Pipeline,
    throttle::ThrottleService,
    tick::TickTiming,
};

/// How `overkvm-io serve` runs (the command line fills it in; `None` defers to the config
/// file, then to the default).
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Address of `/metrics`.
    pub listen: SocketAddr,
    /// The TOML config (budgets, VM rules, policy, export).
    pub config: Option<std::path::PathBuf>,
    /// exporter-toolkit web configuration: TLS, basic auth, response headers.
    pub web_config: Option<std::path::PathBuf>,
    /// Sampling and control interval.
    pub interval: Option<Duration>,
    /// Decide and report limits, write none.
    pub dry_run: bool,
    /// Export non-VM processes too, at most `per_process_cap` of them.
    pub per_process: bool,
    pub per_process_cap: usize,
    /// How long an exited VM's series stay.
    pub grace: Duration,
    pub latency_buckets: Option<LatencyBuckets>,
    pub max_vms: Option<u64>,
    /// Turn on the kernel's BPF run-time statistics while serving.
    pub bpf_stats: bool,
    /// The kernel programs.
    pub load: LoadOptions,
    /// Where QEMU's counters of network disks are read.
    pub qemu: crate::qemu::counters::QemuSources,
}

/// Default address of `/metrics`: loopback only, port 9746.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9746";

/// How much nicer than the daemon the thread serving `/metrics` runs.
const HTTP_NICENESS: i32 = 5;

/// Lowers the calling thread's priority by `HTTP_NICENESS` (best effort: a failure leaves it).
fn lower_thread_priority() {
    // SAFETY: plain syscalls about the calling thread; on Linux PRIO_PROCESS with a thread id
    // is that thread's niceness.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        *libc::__errno_location() = 0;
        let nice = libc::getpriority(libc::PRIO_PROCESS, tid);
        if *libc::__errno_location() == 0 {
            libc::setpriority(libc::PRIO_PROCESS, tid, (nice + HTTP_NICENESS).min(19));
        }
    }
}

pub fn run(args: &ServeOptions) -> anyhow::Result<()> {
    // Validate everything the operator wrote before touching the kernel.
    let config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if !args.load.latency
        && let Some(d) = config.devices.iter().find(|d| d.latency_target.is_some())
    {
        anyhow::bail!(
            "the budget of {} has a latency_target, which needs latency: drop --no-latency",
            d.device
        );
    }
    let web = args
        .web_config
        .as_deref()
        .map(WebConfigWatcher::new)
        .transpose()?
        .map(Arc::new);
    bpf::preflight()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let http = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("overkvm-http")
        .on_thread_start(lower_thread_priority)
        .enable_all()
        .build()
        .context("starting the metrics runtime")?;
    // Bound in the metrics runtime, so that its connections are driven there.
    let listen: SocketAddr = args.listen;
    let listener = http
        .block_on(tokio::net::TcpListener::bind(listen))
        .with_context(|| format!("listening on {listen}"))?;
    let result = runtime.block_on(serve(args, config, http.handle(), listener, web));
    http.shutdown_timeout(Duration::from_secs(1));
    result
}

async fn serve(
    args: &ServeOptions,
    config: Config,
    http: &tokio::runtime::Handle,
    listener: tokio::net::TcpListener,
    web: Option<Arc<WebConfigWatcher>>,
) -> anyhow::Result<()> {
    // Handlers first: a SIGTERM during start-up must still end in a clean exit.
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let interval = args
        .interval
        .or(config.policy.interval)
        .unwrap_or(Duration::from_secs(1));
    let programs = Programs::load(&args.load)?;
    for note in &programs.notes {
        log::warn!("{note}");
    }
    // The kernel's per-program run time, for the exporter's self-metrics, only when asked: it
    // costs every BPF program on the host. Off again on exit.
    let _stats = args
        .bpf_stats
        .then(|| {
            bpf::enable_run_stats()
                .inspect_err(|e| log::warn!("no BPF run-time statistics: {e:#}"))
                .ok()
        })
        .flatten();
    let mode = programs.mode.name().to_string();
    log::info!("attached {:?} ({mode})", programs.attached);

    let exporter = Arc::new(Exporter::new(ExportOptions {
        per_process: args.per_process,
        per_process_cap: args.per_process_cap,
        grace: args.grace,
        latency_buckets: args
            .latency_buckets
            .or(config.export.latency_buckets)
            .unwrap_or_default(),
        max_vms: args
            .max_vms
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
            .or(config.export.max_vms)
            .unwrap_or(crate::export::DEFAULT_MAX_VMS),
    }));
    let bound = listener.local_addr().unwrap_or(args.listen);
    let scheme = if web.as_ref().is_some_and(|w| w.tls()) {
        "https"
    } else {
        "http"
    };
    eprintln!("overkvm-io serve: metrics on {scheme}://{bound}/metrics");
    let server = http.spawn(exporter.clone().serve(listener, web));

    let mut throttle = if !config.has_budgets() {
        None
    } else {
        let mut t = ThrottleService::start(&config, args.dry_run)?;
        t.use_qmp_sockets(&args.qemu.explicit);
        t.use_own_vms(Box::new(crate::lifecycle::list::StateDirVms::from_env()));
        Some(t)
    };

    let mut pipeline = Pipeline::new(programs)?;
    pipeline.count_qemu_disks(crate::lifecycle::list::qemu_sources(&args.qemu));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    let mut timing = TickTiming::default();
    let result = loop {
        // The instant the tick was due: how late it starts is the daemon's own health figure
        // (a loaded runtime or a slow previous tick shows here first).
        let scheduled = tokio::select! {
            at = ticker.tick() => at.into_std(),
            _ = term.recv() => break Ok(()),
            _ = int.recv() => break Ok(()),
        };
        let started = Instant::now();
        timing.started(scheduled, started);
        let mut tick = match pipeline.tick() {
            Ok(t) => t,
            Err(e) => break Err(e),
        };
        if let Some(t) = throttle.as_mut() {
            tick.throttle = Some(t.on_tick(&tick.report));
        }
        tick.sample_seconds = started.elapsed().as_secs_f64();
        exporter.update(&tick, timing);
        timing.finished(started.elapsed());
        if server.is_finished() {
            break Err(anyhow::anyhow!("the metrics server stopped"));
        }
    };
    if let Some(mut t) = throttle {
        t.shutdown();
    }
    server.abort();
    result
}
