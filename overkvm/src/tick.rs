//! What the daemon hands its consumers each tick: the interval's report plus the cumulative
//! counters only a long-running consumer needs. The exporter and the throttle both read ticks
//! and never each other.

use std::{sync::Arc, time::Instant};

use overkvm_common::HEALTH_SLOTS;
use serde::{Deserialize, Serialize};

use crate::{report::Report, sample::MapFill};

/// Kernel run statistics of one program (cumulative since load; zero unless stats are on).
#[derive(Clone, Debug, Default, Serialize)]
pub struct ProgramStat {
    pub name: String,
    pub run_count: u64,
    pub run_time_ns: u64,
}

/// A limit the throttle has in place on one VM and device.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ActiveLimit {
    pub vm: String,
    pub cgroup: String,
    pub device: String,
    pub riops: Option<u64>,
    pub wiops: Option<u64>,
    pub rbps: Option<u64>,
    pub wbps: Option<u64>,
    /// Seconds since this VM was first limited on this device (this engagement).
    pub since_s: f64,
}

/// A device budget and how much of it the last interval used.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BudgetUse {
    pub device: String,
    pub iops_budget: Option<u64>,
    pub iops_used: f64,
    /// The controller is holding guests to the budget.
    pub engaged: bool,
}

/// The throttle's state after a tick, for display and metrics.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ThrottleView {
    pub dry_run: bool,
    pub budgets: Vec<BudgetUse>,
    pub limits: Vec<ActiveLimit>,
    /// Limit writes (and removals) since start.
    pub decisions_total: u64,
    /// Seconds any VM spent limited, summed over VMs and devices, since start.
    pub throttled_seconds_total: f64,
    /// Problems that degrade throttling (a VM sharing a cgroup, a vanished device), latest first.
    pub problems: Vec<String>,
}

/// One tick of the daemon.
#[derive(Clone, Debug)]
pub struct Tick {
    pub at: Instant,
    pub report: Arc<Report>,
    /// Health counters, cumulative since load (indexed by `Health`).
    pub health_total: [u64; HEALTH_SLOTS as usize],
    pub maps: Vec<(&'static str, MapFill)>,
    pub programs: Vec<ProgramStat>,
    /// Time this tick took to sample and build, in seconds.
    pub sample_seconds: f64,
    pub throttle: Option<ThrottleView>,
}
