//! Command-line interface: argument types (their doc comments are the `--help` text) and one
//! function per subcommand.

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::engine::Engine;
use crate::error::{Exit, UserError};
use crate::runtime::Runtime;
use crate::sandbox::LimitExceeded;
use crate::sandbox::Sandbox;

mod bundle;
mod inspect;
mod prepare;
mod replay;
mod run;
mod serve;

/// Run one function of a Jupyter notebook inside a WebAssembly sandbox.
#[derive(Debug, Parser)]
#[command(name = "host", version, about)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalOptions,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every subcommand takes.
#[derive(Debug, Args)]
pub struct GlobalOptions {
    /// The Python runtime folder `make runtime` made [default: $HOST_RUNTIME, else the repository's runtime/]
    #[arg(long, global = true, value_name = "DIR")]
    pub runtime: Option<PathBuf>,
    /// Where compiled modules and analyses are cached [default: $HOST_CACHE_DIR, else ~/.cache/host]
    #[arg(long, global = true, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
}

impl GlobalOptions {
    /// The engine and a sandbox on the located runtime (compiled once per machine).
    pub fn sandbox(&self) -> anyhow::Result<(Engine, Sandbox)> {
        let runtime = Runtime::locate(self.runtime.as_deref())?;
        let engine = Engine::new(self.cache_dir.clone())?;
        let sandbox = Sandbox::new(&engine, &runtime)?;
        Ok((engine, sandbox))
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Call one function of a notebook and print its return value as JSON.
    Run(Box<run::RunArgs>),
    /// Extract functions of a notebook into a bundle file: their source and a manifest.
    Bundle(bundle::BundleArgs),
    /// Show what extraction keeps and drops, cell by cell, and each function's dependencies.
    Inspect(inspect::InspectArgs),
    /// Re-execute a recorded call from its trace, exactly, or with an updated notebook.
    Replay(replay::ReplayArgs),
    /// Compile the Python runtime for this machine now, so the first call does not wait.
    Prepare,
    /// Serve deployed notebooks' functions over HTTP to several tenants, logging every call.
    Serve(serve::ServeArgs),
    /// Print a new random token for a tenant, and the config line with its digest.
    Token,
    /// A server's logged calls: list them, pull one's trace to replay it here.
    Runs(serve::RunsArgs),
}

/// Runs a parsed command line; returns the exit code after printing any error to stderr.
pub fn main(cli: Cli) -> Exit {
    let result = match &cli.command {
        Command::Run(args) => run::run(&cli.global, args),
        Command::Bundle(args) => bundle::bundle(&cli.global, args),
        Command::Inspect(args) => inspect::inspect(&cli.global, args),
        Command::Replay(args) => replay::replay(&cli.global, args),
        Command::Prepare => prepare::prepare(&cli.global),
        Command::Serve(args) => serve::serve(&cli.global, args),
        Command::Token => serve::token(),
        Command::Runs(args) => serve::runs(args),
    };
    match result {
        Ok(exit) => exit,
        Err(e) => {
            let exit = exit_code(&e);
            let mut stderr = std::io::stderr().lock();
            // A closed stderr is no reason to panic.
            let _ = if exit == Exit::Internal {
                writeln!(stderr, "host: internal error: {e:#}")
            } else {
                writeln!(stderr, "host: {e:#}")
            };
            exit
        }
    }
}

/// The exit code an error stands for.
pub fn exit_code(e: &anyhow::Error) -> Exit {
    for cause in e.chain() {
        if cause.is::<UserError>() {
            return Exit::Usage;
        }
        if cause.is::<LimitExceeded>() {
            return Exit::Limit;
        }
    }
    Exit::Internal
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
