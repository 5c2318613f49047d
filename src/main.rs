use clap::Parser;
use stash::cli::{Cli, Command};
use std::io::Write;
use std::process::ExitCode;

#[derive(Debug, thiserror::Error)]
enum MainError {
    #[error("`stash {0}` is not implemented yet")]
    NotImplemented(&'static str),
    #[error("rendering the CRDs: {0}")]
    Crds(#[from] serde_yaml::Error),
    #[error("writing to stdout: {0}")]
    Stdout(#[from] std::io::Error),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("stash: {err}");
            ExitCode::from(2)
        }
    }
}

fn run(command: Command) -> Result<(), MainError> {
    match command {
        Command::Crds => {
            std::io::stdout().write_all(stash::api::crds_yaml()?.as_bytes())?;
            Ok(())
        }
        other => Err(MainError::NotImplemented(other.name())),
    }
}
