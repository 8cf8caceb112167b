//! `stager`: the staging server's command: home, PKI, bundles, and the API server.

mod cli;

use anyhow::Result;
use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, whatever the libraries underneath put in their messages.
            eprintln!("stager: error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

fn run(args: cli::Cli) -> Result<()> {
    match args.command {
        cli::Command::Init(o) => cli::init(o),
        cli::Command::Enroll(o) => cli::enroll(o),
        cli::Command::Operator(o) => cli::operator(o),
        cli::Command::Revoke(o) => cli::revoke(o),
        cli::Command::Certs(o) => cli::certs(o),
        cli::Command::ServerCert(o) => cli::server_cert(o),
        cli::Command::Serve(o) => cli::serve(o),
        cli::Command::Backup(o) => cli::backup(o),
        cli::Command::Ca(c) => cli::ca(c),
        cli::Command::Restore(o) => cli::restore(o),
        cli::Command::Bundle(cli::BundleCommand::Build(o)) => cli::build(o),
        cli::Command::Bundle(cli::BundleCommand::List(o)) => cli::list(o),
        cli::Command::Bundle(cli::BundleCommand::Export(o)) => cli::export(o),
        cli::Command::Relay(cli::RelayCommand::Init(o)) => cli::relay_init(o),
        cli::Command::Relay(cli::RelayCommand::Serve(o)) => cli::relay_serve(o),
    }
}
