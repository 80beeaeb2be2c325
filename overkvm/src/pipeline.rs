//! The sampling pipeline: the one place where each interval happens.
//!
//! Every consumer (`serve`, both `top` modes, `vm start --admit`, `check --parity`) holds one
//! `Pipeline` and calls `tick` once per interval. A tick reads the kernel maps once, turns the
//! difference with the previous read into a report (identities, devices, cgroups, the
//! self-check against `/proc/diskstats`), then does the interval's housekeeping: it deletes
//! the map entries of processes that exited (their final counts are in this report) and
//! attaches the bio hook once a bio-based device appears. Anything that must happen every
//! interval belongs here, so no consumer can skip it.

use std::{sync::Arc, time::Instant};

use crate::{
    bpf::Programs,
    report::{ReportBuilder, pid_alive},
    sample::{Sampler, Snapshot, delta},
    tick::{ProgramStat, Tick},
};

/// One sampler, the report builder and the previous snapshot.
pub struct Pipeline {
    sampler: Sampler,
    builder: ReportBuilder,
    prev: Snapshot,
    mode: String,
}

impl Pipeline {
    /// Starts counting from now with loaded programs.
    pub fn new(programs: Programs) -> anyhow::Result<Pipeline> {
        let mode = programs.mode.name().to_string();
        let sampler = Sampler::new(programs);
        let prev = sampler.snapshot()?;
        Ok(Pipeline {
            sampler,
            builder: ReportBuilder::new(),
            prev,
            mode,
        })
    }

    /// The loaded programs (hook mode, attached tracepoints, map capacities).
    pub fn programs(&self) -> &Programs {
        self.sampler.programs()
    }

    /// The hook mode's name, as reports carry it.
    pub fn mode(&self) -> &str {
        &self.mode
    }

    /// The interval since the previous tick (or since `new`): its report and the cumulative
    /// kernel-side figures a long-running consumer exports.
    pub fn tick(&mut self) -> anyhow::Result<Tick> {
        let started = Instant::now();
        let cur = self.sampler.snapshot()?;
        self.builder.note_comms(&cur.comms);
        let report = self
            .builder
            .build(&delta(&self.prev, &cur), &self.mode, &cur);
        let tick = Tick {
            at: started,
            report: Arc::new(report),
            health_total: cur.health,
            maps: cur.fill.clone(),
            programs: self
                .sampler
                .programs()
                .run_stats()
                .into_iter()
                .map(|(name, run_count, run_time_ns)| ProgramStat {
                    name,
                    run_count,
                    run_time_ns,
                })
                .collect(),
            sample_seconds: started.elapsed().as_secs_f64(),
            throttle: None,
        };
        self.sampler.prune(&cur, pid_alive);
        self.sampler.refresh_bio_hook();
        self.prev = cur;
        Ok(tick)
    }
}
