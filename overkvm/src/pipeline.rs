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
    qemu::counters::{QemuCounters, SourceList},
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
    /// Recursion misses of all programs at the last tick.
    recursion_misses: u64,
    /// QEMU's counters of VM disks no host block device sees, when enabled.
    qemu: Option<QemuCounters>,
}

/// Health event: tracepoint runs the kernel skipped (see `bpf::RunStats::recursion_misses`).
pub const RECURSION_MISSES: &str = "recursion_misses";

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
            recursion_misses: 0,
            qemu: None,
        })
    }

    /// Also counts, from QEMU's own counters, the VM disks whose I/O no host block device
    /// sees (network storage), from the sources `sources` lists
    /// (`lifecycle::list::qemu_sources`). Their rows carry `source: "qemu"`.
    pub fn count_qemu_disks(&mut self, sources: SourceList) {
        self.qemu = Some(QemuCounters::new(sources));
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
        let mut report = self
            .builder
            .build(&delta(&self.prev, &cur), &self.mode, &cur);
        if let Some(q) = &mut self.qemu {
            // Never waits: what QEMU answered since the last tick (see `qemu::counters`).
            let readings = q.tick();
            self.builder.add_qemu_rows(&mut report, &readings);
        }
        let programs: Vec<ProgramStat> = self
            .sampler
            .programs()
            .run_stats()
            .into_iter()
            .map(|r| ProgramStat {
                name: r.name,
                run_count: r.run_count,
                run_time_ns: r.run_time_ns,
                recursion_misses: r.recursion_misses.unwrap_or(0),
            })
            .collect();
        // Runs the kernel skipped are I/O events no map saw: a health event like a full map,
        // so `top` and the report show the loss in the interval it happened.
        let misses: u64 = programs.iter().map(|p| p.recursion_misses).sum();
        let new_misses = misses.saturating_sub(self.recursion_misses);
        self.recursion_misses = misses;
        if new_misses > 0 {
            *report.health.events.entry(RECURSION_MISSES).or_default() += new_misses;
        }
        let tick = Tick {
            at: started,
            report: Arc::new(report),
            health_total: cur.health,
            maps: cur.fill.clone(),
            programs,
            sample_seconds: started.elapsed().as_secs_f64(),
            throttle: None,
        };
        self.sampler.prune(&cur, pid_alive);
        self.sampler.refresh_bio_hook();
        self.prev = cur;
        Ok(tick)
    }
}
