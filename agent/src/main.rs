//! `reinstall`: the operator's command (jobs, status, rescue) and bundle tools. The agent
//! daemon, planning and the phase engine arrive with issue 4.

mod cli;
mod client;
mod operator;

use clap::{CommandFactory, Parser};
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    let json = args.global.json;
    let r = match args.command {
        Some(cli::Command::Bundle(cli::BundleCommand::Verify(o))) => {
            cli::verify(o, args.global.identity.as_deref(), json)
        }
        Some(cli::Command::Bundle(cli::BundleCommand::Unpack(o))) => {
            cli::unpack(o, args.global.identity.as_deref(), json)
        }
        Some(cli::Command::Status) => operator::status(&args.global),
        Some(cli::Command::Rescue(o)) => operator::rescue(&args.global, &o),
        None if args.job.target.is_some() => operator::create(&args.global, &args.job),
        None => {
            let _ = cli::Cli::command().print_help();
            return ExitCode::from(2);
        }
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            // One line: the context chain, outermost first.
            eprintln!("reinstall: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
