//! Prometheus exporter: folds each tick into exact cumulative counters and serves them on
//! `/metrics`.
//!
//! - `names`: every metric name, type, unit and label (the one place they are spelled).
//! - `totals`: the pure accumulation (ticks in, totals out), keyed by VM identity, and the
//!   cap on exported VMs.
//! - `latency`: the kernel's log2 latency buckets as exported buckets (compact or full, and
//!   native histograms).
//! - `render`: OpenMetrics text via prometheus-client, and the classic text format.
//! - `http`: axum on a listener with connection limits and deadlines.
//! - `webconfig`: `--web.config.file` (exporter-toolkit's format): TLS, basic auth, headers.
//! - `auth`: basic authentication and the per-client limit on failed attempts.
//!
//! Each format is rendered at most once per tick, on the first scrape in that format after it
//! (a host scraped in one format pays for that one only), into a page shared as an `Arc`; a
//! scrape clones that `Arc` under a lock held for the clone only and writes it with no lock
//! held. The tick waits at most for one rendering in progress (the totals' lock), never
//! for a client, so neither a slow client nor many concurrent scrapes can hold up the sampler.
//! The tick's own timing and the endpoint's connection counts are kept beside the totals and
//! rendered with them.

pub mod auth;
pub mod http;
pub mod latency;
pub mod names;
pub mod render;
pub mod totals;
pub mod webconfig;

use std::{
    sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError},
    time::{Duration, Instant},
};

use axum::body::Bytes;
use prometheus_client::{
    encoding::{prometheus_protobuf, text::encode},
    registry::Registry,
};

use crate::tick::{Tick, TickTiming};
use render::{SelfCollector, TotalsCollector};
use totals::{ProcFs, ProcessTable, Retention, Totals};

/// What the exporter exposes beyond per-VM series.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    /// Also export non-VM processes (capped).
    pub per_process: bool,
    pub per_process_cap: usize,
    /// How long the series of a VM that exited stay exported.
    pub grace: Duration,
    /// Buckets of the classic latency histograms.
    pub latency_buckets: latency::LatencyBuckets,
    /// Most VMs exported; the least busy beyond it are left out and counted.
    pub max_vms: usize,
}

/// Default of `--max-vms`: above the VMs a host runs (hundreds), below what makes one scrape
/// a problem (at 20 series a VM, 2000 VMs are 40 000 series, about 4 MB of text).
pub const DEFAULT_MAX_VMS: usize = 2000;

/// The metrics as of one tick, in each format rendered on its first request: a host
/// scraped in one format pays for that one only.
pub struct Exposition {
    openmetrics: OnceLock<Bytes>,
    text: OnceLock<Bytes>,
    /// Prometheus protobuf (None: it failed).
    protobuf: OnceLock<Option<Bytes>>,
}

impl Exposition {
    fn new() -> Exposition {
        Exposition {
            openmetrics: OnceLock::new(),
            text: OnceLock::new(),
            protobuf: OnceLock::new(),
        }
    }
}

pub struct Exporter {
    totals: Arc<Mutex<Totals>>,
    /// What the text formats render.
    registry: Registry,
    /// The same with native histograms, for the protobuf format.
    protobuf_registry: Registry,
    published: Mutex<Arc<Exposition>>,
    /// Bytes of the last OpenMetrics rendering, to size the next one.
    last_size: std::sync::atomic::AtomicUsize,
    /// A tick arrived since the last rendering.
    stale: std::sync::atomic::AtomicBool,
    /// When the daemon's ticks ran, as of the last tick.
    timing: Arc<Mutex<TickTiming>>,
    /// What the endpoint counts about its connections.
    pub(crate) http: Arc<http::HttpStats>,
}

/// Locks a mutex whose data stays consistent even if a holder panicked (every update is
/// applied whole before anything reads it).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Exporter {
    pub fn new(opts: ExportOptions) -> Exporter {
        let totals = Arc::new(Mutex::new(Totals::new(Retention {
            per_process: opts.per_process,
            per_process_cap: opts.per_process_cap,
            grace: opts.grace,
            max_vms: opts.max_vms,
        })));
        let timing = Arc::new(Mutex::new(TickTiming::default()));
        let http = Arc::new(http::HttpStats::default());
        // Two registries over the same state: the text formats have no use for native
        // buckets, so only the protobuf one computes them.
        let registry_with = |native: bool| {
            let mut r = Registry::with_prefix(names::PREFIX);
            r.register_collector(Box::new(TotalsCollector {
                totals: totals.clone(),
                latency: opts.latency_buckets,
                native,
            }));
            r.register_collector(Box::new(SelfCollector {
                timing: timing.clone(),
                http: http.clone(),
            }));
            r
        };
        let registry = registry_with(false);
        let protobuf_registry = registry_with(true);
        Exporter {
            totals,
            registry,
            protobuf_registry,
            published: Mutex::new(Arc::new(Exposition::new())),
            last_size: std::sync::atomic::AtomicUsize::new(0),
            stale: std::sync::atomic::AtomicBool::new(true),
            timing,
            http,
        }
    }

    /// Folds one tick into the exported counters, with the daemon's tick timing as of its
    /// start. Never blocks on scrapes.
    pub fn update(&self, tick: &Tick, timing: TickTiming) {
        *lock(&self.timing) = timing;
        self.update_with(tick, &ProcFs);
    }

    fn update_with(&self, tick: &Tick, procs: &impl ProcessTable) {
        lock(&self.totals).apply(tick, procs);
        // Rendered on the first scrape after this tick, not here: an unscraped daemon (or one
        // scraped every 15 s) does not pay for a rendering each second.
        self.stale.store(true, std::sync::atomic::Ordering::Release);
    }

    /// The page of the latest tick: a new (not yet rendered) one on the first request after
    /// a tick.
    pub fn published(&self) -> Arc<Exposition> {
        let mut published = lock(&self.published);
        if self.stale.swap(false, std::sync::atomic::Ordering::AcqRel) {
            *published = Arc::new(Exposition::new());
        }
        published.clone()
    }

    /// OpenMetrics text of `page`, rendered on its first request.
    pub fn openmetrics(&self, page: &Exposition) -> Bytes {
        page.openmetrics
            .get_or_init(|| {
                let started = Instant::now();
                let mut text = String::with_capacity(
                    self.last_size.load(std::sync::atomic::Ordering::Relaxed) + 4096,
                );
                if let Err(e) = encode(&mut text, &self.registry) {
                    // Collectors do not fail; an empty page (Prometheus marks the scrape
                    // failed) is the honest answer if one ever does.
                    log::error!("rendering metrics: {e}");
                    text.clear();
                }
                self.last_size
                    .store(text.len(), std::sync::atomic::Ordering::Relaxed);
                lock(&self.totals).stats.render_seconds = started.elapsed().as_secs_f64();
                Bytes::from(text)
            })
            .clone()
    }

    /// The classic text format of `page`, derived from its OpenMetrics text.
    pub fn text(&self, page: &Exposition) -> Bytes {
        page.text
            .get_or_init(|| {
                let om = self.openmetrics(page);
                let om = std::str::from_utf8(&om).unwrap_or_default();
                Bytes::from(render::openmetrics_to_text(om))
            })
            .clone()
    }

    /// The page in Prometheus's protobuf format (what Prometheus asks for with native
    /// histograms on). None when it cannot be rendered (logged; the caller sends text
    /// instead).
    pub fn protobuf(&self, page: &Exposition) -> Option<Bytes> {
        page.protobuf
            .get_or_init(
                || match prometheus_protobuf::encode_to_vec(&self.protobuf_registry) {
                    Ok(v) => Some(Bytes::from(v)),
                    Err(e) => {
                        log::error!("rendering metrics as protobuf: {e:?}; sending text");
                        None
                    }
                },
            )
            .clone()
    }

    /// Serves `/metrics` on the listener until the task is aborted; with a web config, over
    /// TLS and/or behind basic authentication as it says.
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        web: Option<Arc<webconfig::WebConfigWatcher>>,
    ) -> anyhow::Result<()> {
        http::serve(self, listener, http::Limits::default(), web).await
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::export::totals::tests::{FakeProcs, row, tick};

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn tick_timing_and_connections_are_exported() {
        let e = Exporter::new(ExportOptions {
            per_process: false,
            per_process_cap: 10,
            grace: Duration::from_secs(60),
            latency_buckets: latency::LatencyBuckets::Compact,
            max_vms: DEFAULT_MAX_VMS,
        });
        let page = e.openmetrics(&e.published());
        let text = std::str::from_utf8(&page).unwrap();
        // No tick yet: no timing, but the connection counters are there from the start.
        assert!(!text.contains("overkvm_tick_lateness"), "{text}");
        assert_eq!(
            value(text, "overkvm_exporter_connections_refused_total"),
            Some(0.0)
        );
        let t0 = Instant::now();
        let mut timing = TickTiming::default();
        timing.started(t0, t0 + Duration::from_millis(250));
        timing.finished(Duration::from_millis(40));
        timing.started(
            t0 + Duration::from_secs(1),
            t0 + Duration::from_millis(1002),
        );
        e.update(&tick(t0, Vec::new()), timing);
        let page = e.published();
        let om = e.openmetrics(&page);
        let om = std::str::from_utf8(&om).unwrap();
        assert_eq!(value(om, "overkvm_tick_lateness_seconds"), Some(0.002));
        assert_eq!(value(om, "overkvm_tick_lateness_max_seconds"), Some(0.25));
        assert_eq!(value(om, "overkvm_tick_duration_seconds"), Some(0.04));
        assert_eq!(value(om, "overkvm_tick_duration_max_seconds"), Some(0.04));
        assert!(
            om.contains("# TYPE overkvm_tick_lateness_max_seconds gauge"),
            "{om}"
        );
        assert!(
            om.contains("# UNIT overkvm_tick_lateness_max_seconds seconds"),
            "{om}"
        );
        assert_eq!(
            value(
                om,
                r#"overkvm_exporter_connections_dropped_total{reason="timeout"}"#
            ),
            Some(0.0)
        );
        let text = e.text(&page);
        let text = std::str::from_utf8(&text).unwrap();
        assert!(text.contains("# TYPE overkvm_exporter_connections_refused_total counter"));
        assert!(text.ends_with("\n") && !text.contains("# EOF"));
    }

    /// Render time and size for a large host; run with --ignored --nocapture to see them.
    #[test]
    #[ignore = "measurement"]
    fn render_cost_for_many_vms() {
        for mode in [
            latency::LatencyBuckets::Compact,
            latency::LatencyBuckets::Full,
        ] {
            for vms in [100u32, 1000] {
                let e = Exporter::new(ExportOptions {
                    per_process: true,
                    per_process_cap: 100,
                    grace: Duration::from_secs(300),
                    latency_buckets: mode,
                    max_vms: DEFAULT_MAX_VMS,
                });
                let procs = FakeProcs::default();
                let mut rows = Vec::new();
                for i in 0..vms {
                    procs.start(1000 + i, 1);
                    for dev in ["nvme0n1", "nvme1n1"] {
                        rows.push(row(
                            1000 + i,
                            Some(&format!("instance-{i:08x}")),
                            dev,
                            10,
                            5,
                        ));
                    }
                }
                let t = tick(Instant::now(), rows);
                e.update_with(&t, &procs);
                let started = Instant::now();
                let n = 5;
                for _ in 0..n {
                    e.update_with(&t, &procs);
                    e.openmetrics(&e.published());
                }
                let per_tick = started.elapsed() / n;
                let render = lock(&e.totals).stats.render_seconds;
                let page = e.published();
                let om = e.openmetrics(&page);
                let started = Instant::now();
                let text = e.text(&page);
                let to_text = started.elapsed();
                let started = Instant::now();
                let proto = e.protobuf(&page).unwrap_or_default();
                let to_proto = started.elapsed();
                eprintln!(
                    "{mode:?}: {vms} VMs x 2 devices: update + render {per_tick:?} (render {:.2} ms), \
                     OpenMetrics {} KiB, {} lines; classic text {to_text:?}; protobuf {} KiB \
                     in {to_proto:?}",
                    render * 1e3,
                    om.len() >> 10,
                    om.iter().filter(|b| **b == b'\n').count(),
                    proto.len() >> 10,
                );
                assert!(!text.is_empty());
            }
        }
    }
}
