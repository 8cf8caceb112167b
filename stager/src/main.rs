//! `stager`: the staging server's command. Today: the release key and the bundle store.
//! The mutual-TLS API server (`stager serve`), PKI and jobs arrive with issue 3.

mod cli;
mod store;

use anyhow::Result;
use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stager: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: cli::Cli) -> Result<()> {
    match args.command {
        cli::Command::Init(o) => cli::init(o),
        cli::Command::Bundle(cli::BundleCommand::Build(o)) => cli::build(o),
        cli::Command::Bundle(cli::BundleCommand::List(o)) => cli::list(o),
        cli::Command::Bundle(cli::BundleCommand::Export(o)) => cli::export(o),
    }
}
