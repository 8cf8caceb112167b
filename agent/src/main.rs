//! `reinstall`: the operator's command on a host and (later) the agent daemon.
//! Today: checking and unpacking bundles. Planning, the phase engine, the stager client and
//! the operator commands arrive with issues 3 and 4.

mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    let r = match args.command {
        cli::Command::Bundle(cli::BundleCommand::Verify(o)) => cli::verify(o),
        cli::Command::Bundle(cli::BundleCommand::Unpack(o)) => cli::unpack(o),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the context chain, outermost first.
            eprintln!("reinstall: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
