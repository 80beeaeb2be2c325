//! Automatic IOPS throttling: device budgets enforced through cgroup io.max / blkio.throttle.

pub mod policy;

use crate::{config::Config, report::Report, tick::ThrottleView};

pub struct ThrottleService {
    dry_run: bool,
}

impl ThrottleService {
    pub fn start(_config: &Config, dry_run: bool) -> anyhow::Result<ThrottleService> {
        Ok(ThrottleService { dry_run })
    }

    pub fn on_tick(&mut self, _report: &Report) -> ThrottleView {
        ThrottleView {
            dry_run: self.dry_run,
            ..ThrottleView::default()
        }
    }

    pub fn shutdown(&mut self) {}
}
