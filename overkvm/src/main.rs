//! `overkvm-io`: argument parsing and dispatch only.

mod cli;

use clap::Parser as _;
use overkvm::{calibrate, check, lifecycle, serve, throttle, top};

use crate::cli::{Cli, Command, ThrottleCommand, VmCommand};

fn main() {
    let cli = Cli::parse();
    let level = match cli.verbose {
        // The throttle changes other processes' limits: its decisions are logged by default.
        0 => "warn,overkvm::throttle=info",
        1 => "info",
        _ => "debug",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_timestamp(None)
        .init();
    let result = match &cli.command {
        Command::Top(args) => top::run(&args.options()),
        Command::Serve(args) => serve::run(&args.options()),
        Command::Throttle(ThrottleCommand::Reset { config }) => {
            throttle::command::reset(config.as_deref())
        }
        Command::Throttle(ThrottleCommand::Status { config, json }) => {
            throttle::command::status(config.as_deref(), *json)
        }
        Command::Vm(VmCommand::Create(a)) => lifecycle::ops::create(&a.options()),
        Command::Vm(VmCommand::Start(a)) => lifecycle::ops::start(&a.options()),
        Command::Vm(VmCommand::Stop(a)) => lifecycle::ops::stop(&a.options()),
        Command::Vm(VmCommand::List(a)) => lifecycle::list::run(&a.options()),
        Command::Vm(VmCommand::Destroy(a)) => lifecycle::ops::destroy(&a.options()),
        Command::Overcommit(args) => lifecycle::overcommit::run(&args.options()),
        Command::Calibrate(args) => calibrate::run(&args.options()),
        Command::PackageFiles { out_dir } => cli::write_package_files(out_dir),
        Command::Check(args) if let Some(seconds) = args.parity => {
            match check::run_parity(seconds, args.json) {
                Ok(true) => Ok(()),
                Ok(false) => std::process::exit(1),
                Err(e) => Err(e),
            }
        }
        Command::Check(args) => {
            let report = check::run_checks();
            if args.json {
                match serde_json::to_string(&report) {
                    Ok(s) => println!("{s}"),
                    Err(e) => eprintln!("overkvm-io: encoding JSON: {e}"),
                }
            } else {
                check::print_human(&report);
            }
            if report.ok() {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
    };
    if let Err(e) = result {
        eprintln!("overkvm-io: {e:#}");
        std::process::exit(1);
    }
}
