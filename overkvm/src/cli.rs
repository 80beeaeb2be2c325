//! Command-line interface: definitions only; `main.rs` dispatches.

use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::bpf::HookMode;

/// See which VM does the disk I/O on a KVM host, per process, device and operation, from the
/// kernel's block layer (eBPF). Needs root.
#[derive(Debug, Parser)]
#[command(name = "overkvm-io", version, propagate_version = true)]
pub struct Cli {
    /// More logging (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Live view of who does I/O: VMs first, then other processes.
    ///
    /// In batch mode (-b, or when output is not a terminal) it prints one table per interval,
    /// like `top -b`; with --json one JSON object per interval per line, with exact op and byte
    /// counts for the interval (not rates).
    Top(TopArgs),
    /// Report what this host supports (BTF, tracepoints, hook mode, cgroups, permissions) and
    /// what will not work, and why. Exits non-zero when overkvm cannot run here.
    Check(CheckArgs),
    /// Run the daemon: Prometheus metrics on /metrics, and automatic IOPS throttling when the
    /// config file sets device budgets. Stops on SIGTERM/SIGINT, removing every limit it set.
    Serve(ServeArgs),
    /// Inspect or undo the throttle's limits without the daemon.
    #[command(subcommand)]
    Throttle(ThrottleCommand),
}

#[derive(Debug, Subcommand)]
pub enum ThrottleCommand {
    /// Remove every limit, cgroup move and cgroup a (stopped or crashed) daemon left, as
    /// recorded in its state file. For ExecStopPost= of the systemd unit.
    Reset {
        /// The daemon's config (for a non-default state_file).
        #[arg(short, long)]
        config: Option<std::path::PathBuf>,
    },
    /// Show budgets, current use and every active limit (from the running daemon's status
    /// file and the state file).
    Status {
        #[arg(short, long)]
        config: Option<std::path::PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

/// Options of the kernel programs.
#[derive(Debug, Args, Clone)]
pub struct HookArgs {
    /// Force a hook family instead of the best the kernel has.
    #[arg(long, value_enum)]
    pub hooks: Option<HookMode>,
    /// Do not count bios (saves one program per bio; bio-based devices such as zram, md and
    /// dm are then not measured).
    #[arg(long)]
    pub no_bio: bool,
}

#[derive(Debug, Args)]
pub struct TopArgs {
    /// Batch mode: print tables (or JSON lines) instead of the interactive view.
    #[arg(short, long)]
    pub batch: bool,
    /// Seconds between updates.
    #[arg(short, long, default_value = "1", value_parser = parse_interval)]
    pub delay: Duration,
    /// Stop after this many updates (default: run until interrupted).
    #[arg(short = 'n', long)]
    pub iterations: Option<u64>,
    /// One JSON object per interval per line (batch mode).
    #[arg(long)]
    pub json: bool,
    /// Show only VMs (qemu processes).
    #[arg(long)]
    pub vms_only: bool,
    #[command(flatten)]
    pub hooks: HookArgs,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address of the metrics endpoint (loopback by default: put a proxy or firewall rule in
    /// front before exposing it).
    #[arg(long, default_value = crate::serve::DEFAULT_LISTEN)]
    pub listen: std::net::SocketAddr,
    /// TOML config: device budgets, VM rules, policy knobs (see README, "Throttling").
    #[arg(short, long)]
    pub config: Option<std::path::PathBuf>,
    /// Sampling and control interval in seconds (default 1, or [policy] interval).
    #[arg(short = 'i', long, value_parser = parse_interval)]
    pub interval: Option<Duration>,
    /// Decide and report limits, but write nothing to cgroups.
    #[arg(long)]
    pub dry_run: bool,
    /// Also export non-VM processes (by comm), at most --per-process-cap of them.
    #[arg(long)]
    pub per_process: bool,
    #[arg(long, default_value = "100")]
    pub per_process_cap: usize,
    /// How long the series of a VM that exited stay exported, in seconds.
    #[arg(long, default_value = "300", value_parser = parse_interval)]
    pub grace: Duration,
    #[command(flatten)]
    pub hooks: HookArgs,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Print the findings as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Parses an interval in seconds ("1", "0.5"): positive and at most a day.
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !v.is_finite() || !(0.05..=86_400.0).contains(&v) {
        return Err(format!("interval {s} s out of range (0.05 to 86400)"));
    }
    Ok(Duration::from_secs_f64(v))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("1").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_interval("0.5").unwrap(), Duration::from_millis(500));
        for bad in ["0", "-1", "nan", "inf", "x", "1e9", ""] {
            assert!(parse_interval(bad).is_err(), "{bad}");
        }
    }
}
