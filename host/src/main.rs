//! The `host` command: parse the arguments, run the subcommand, turn the outcome into an exit
//! code. Everything else lives in the library.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = host::cli::Cli::parse();
    ExitCode::from(host::cli::main(cli) as u8)
}
