//! Prometheus exporter (being written).

use std::{sync::Arc, time::Duration};

use crate::tick::Tick;

/// What the exporter exposes beyond per-VM series.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    /// Also export non-VM processes (capped).
    pub per_process: bool,
    pub per_process_cap: usize,
    /// How long the series of a VM that exited stay exported.
    pub grace: Duration,
}

pub struct Exporter {
    _opts: ExportOptions,
}

impl Exporter {
    pub fn new(opts: ExportOptions) -> Exporter {
        Exporter { _opts: opts }
    }

    /// Folds one tick into the exported counters. Never blocks on scrapes.
    pub fn update(&self, _tick: &Tick) {}

    /// Serves `/metrics` on the listener until the task is aborted.
    pub async fn serve(self: Arc<Self>, _listener: tokio::net::TcpListener) -> anyhow::Result<()> {
        std::future::pending().await
    }
}
