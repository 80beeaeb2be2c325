//! `overkvm-io top`: the sampling loop and its front-ends (batch text and JSON lines for now).

pub mod batch;

use std::io::{IsTerminal as _, Write as _};

use anyhow::Context as _;

use crate::{
    bpf::{LoadOptions, Programs},
    cli::TopArgs,
    report::ReportBuilder,
    sample::{Sampler, delta},
};

/// Runs `top`. Without a terminal (or with -b) it prints batch output.
pub fn run(args: &TopArgs) -> anyhow::Result<()> {
    let opts = LoadOptions {
        mode: args.hooks.hooks,
        bio: !args.hooks.no_bio,
    };
    if !args.batch && std::io::stdout().is_terminal() && !args.json {
        log::info!("the interactive view is not built yet; printing batch output");
    }
    let programs = Programs::load(&opts)?;
    for note in &programs.notes {
        log::warn!("{note}");
    }
    let mode = programs.mode.name().to_string();
    let mut sampler = Sampler::new(programs);
    let mut builder = ReportBuilder::new();
    let mut prev = sampler.snapshot()?;
    let mut done = 0u64;
    let stdout = std::io::stdout();
    loop {
        if args.iterations.is_some_and(|n| done >= n) {
            return Ok(());
        }
        std::thread::sleep(args.delay);
        let cur = sampler.snapshot()?;
        builder.note_comms(&cur.comms);
        let d = delta(&prev, &cur);
        let mut report = builder.build(&d, &mode, &cur);
        if args.vms_only {
            report.processes.retain(|p| p.vm.is_some());
        }
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
        sampler.prune(&cur, crate::report::pid_alive);
        prev = cur;
        done += 1;
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
