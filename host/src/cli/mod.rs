//! Command-line interface: argument types (their doc comments are the `--help` text) and one
//! function per subcommand.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::engine::Engine;
use crate::error::{Exit, UserError, bad_input};
use crate::policy::LimitExceeded;
use crate::runtime::Runtime;
use crate::sandbox::Sandbox;

mod bundle;
mod evaluate;
mod inspect;
mod prepare;
mod replay;
mod run;
mod serve;

pub use run::{DEFAULT_MAX_INPUT, read_arguments};

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
    /// Run a candidate notebook or bundle on recorded calls (trace files, or a server's logged
    /// runs) and class each run: same, changed, newly failing, fixed, not replayable.
    Evaluate(Box<evaluate::EvaluateArgs>),
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
    crate::progress::show_on_terminal();
    let result = match &cli.command {
        Command::Run(args) => run::run(&cli.global, args),
        Command::Bundle(args) => bundle::bundle(&cli.global, args),
        Command::Inspect(args) => inspect::inspect(&cli.global, args),
        Command::Replay(args) => replay::replay(&cli.global, args),
        Command::Evaluate(args) => evaluate::evaluate_command(&cli.global, args),
        Command::Prepare => prepare::prepare(&cli.global),
        Command::Serve(args) => serve::serve(&cli.global, args),
        Command::Token => serve::token(),
        Command::Runs(args) => serve::runs(args),
    };
    match result {
        Ok(exit) => exit,
        Err(e) => {
            let exit = exit_code(&e);
            if exit == Exit::Internal {
                say(format_args!("internal error: {e:#}"));
            } else {
                say(format_args!("{e:#}"));
            }
            exit
        }
    }
}

/// Refuses an output path `flag` names that cannot be written, before any work is done: its
/// folder must exist, and it must not be a folder itself.
pub fn check_output(path: &Path, flag: &str) -> anyhow::Result<()> {
    if path.is_dir() {
        return Err(bad_input(format!(
            "{flag} `{}` is a directory; name a file",
            path.display()
        )));
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return Err(bad_input(format!(
            "{flag} `{}`: the folder `{}` does not exist",
            path.display(),
            parent.display()
        )));
    }
    Ok(())
}

/// Writes what the guest printed to stderr: as it is when stderr is a file or a pipe, made
/// harmless when it is a terminal (see [`for_terminal`]), so that nothing the guest prints can
/// drive the user's terminal or pass for host's own `host:` lines.
pub fn print_guest(bytes: &[u8]) {
    use std::io::IsTerminal;
    let mut stderr = std::io::stderr().lock();
    // A closed stderr is no reason to fail the call.
    let _ = if stderr.is_terminal() {
        stderr.write_all(for_terminal(bytes).as_bytes())
    } else {
        stderr.write_all(bytes)
    };
    if bytes.last().is_some_and(|&b| b != b'\n') {
        let _ = stderr.write_all(b"\n");
    }
}

/// The guest's output as a terminal may show it: its control characters escaped (see
/// [`escape_controls`]), and a line that starts like host's own messages (`host:`) marked as
/// the guest's.
pub fn for_terminal(bytes: &[u8]) -> String {
    escape_controls(bytes)
        .split_inclusive('\n')
        .map(|line| {
            if line.starts_with("host:") {
                format!("(guest) {line}")
            } else {
                line.to_owned()
            }
        })
        .collect()
}

/// Text with its control characters (escape sequences, `\r`, backspace; C1 controls;
/// bidirectional overrides) and bytes that are not UTF-8 written as `\x1b`-style escapes,
/// newlines and tabs kept: what it says can be read, and cannot drive a terminal.
pub fn escape_controls(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\n' | '\t' => out.push(c),
                c if c.is_control()
                    || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') =>
                {
                    let n = c as u32;
                    if n < 0x100 {
                        out.push_str(&format!("\\x{n:02x}"));
                    } else {
                        out.push_str(&format!("\\u{{{n:04x}}}"));
                    }
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// Prints one of host's own lines on stderr, `host: ` then the message with its control
/// characters escaped: a message can quote what a notebook, a bundle, a trace or the guest
/// said, and none of that may drive the terminal or start a line of its own.
pub fn say(message: impl std::fmt::Display) {
    let text = escape_controls(message.to_string().as_bytes());
    // A closed stderr is no reason to fail.
    let _ = writeln!(std::io::stderr().lock(), "host: {text}");
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

    #[test]
    fn guest_output_cannot_drive_a_terminal_or_pose_as_host() {
        for (printed, shown) in [
            (&b"plain text\n\tindented"[..], "plain text\n\tindented"),
            (b"\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
            (b"\x1b]52;c;aGk=\x07", "\\x1b]52;c;aGk=\\x07"),
            (b"progress\rdone\x08", "progress\\x0ddone\\x08"),
            ("\u{9b}2J".as_bytes(), "\\x9b2J"),
            ("a\u{202e}b".as_bytes(), "a\\u{202e}b"),
            (b"bad \xff byte", "bad \\xff byte"),
            (
                b"host: internal error: fake",
                "(guest) host: internal error: fake",
            ),
            (b"ok\nhost: fake\n", "ok\n(guest) host: fake\n"),
            (b"a host: is fine mid-line", "a host: is fine mid-line"),
            ("émoji ✓".as_bytes(), "émoji ✓"),
        ] {
            assert_eq!(super::for_terminal(printed), shown, "{printed:?}");
        }
        // host's own lines quote names from files: escaped, never marked.
        assert_eq!(
            super::escape_controls("bundle of \x1b]0;title\x07nb.ipynb\nhost: x".as_bytes()),
            "bundle of \\x1b]0;title\\x07nb.ipynb\nhost: x"
        );
    }
}
