//! `host run NOTEBOOK FUNCTION`: call one function and print its value as JSON.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::GlobalOptions;
use crate::bundle::{Bundle, Select};
use crate::call::{self, Arguments, Outcome};
use crate::error::{Exit, bad_input};
use crate::neighbours::Wheel;
use crate::notebook::Notebook;
use crate::sandbox::{Grant, Limits, Policy, parse_duration, parse_size};
use crate::snapshot::Prepared;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The notebook (.ipynb) that defines the function, or a bundle made by `host bundle`.
    pub notebook: PathBuf,
    /// The function to call.
    pub function: String,
    /// Print {"bundle": VERSION, "function": NAME, "result": VALUE} instead of the bare value.
    #[arg(long)]
    pub envelope: bool,
    /// Load the bundle's source in the call instead of starting from its pre-initialised image.
    #[arg(long)]
    pub no_image: bool,
    /// Record every nondeterministic input of the call to this trace file (for `host replay`).
    #[arg(long, value_name = "FILE")]
    pub record: Option<PathBuf>,
    /// A pure-Python wheel whose modules the notebook may import, as `host bundle --wheel`
    /// adds them (repeatable; a bundle already carries its wheels).
    #[arg(long = "wheel", value_name = "FILE.whl")]
    pub wheels: Vec<PathBuf>,
    #[command(flatten)]
    pub input: InputArgs,
    #[command(flatten)]
    pub sandbox: SandboxArgs,
}

/// Where the function's arguments come from.
#[derive(Debug, Args)]
pub struct InputArgs {
    /// Positional arguments, as a JSON array.
    #[arg(long, value_name = "JSON_ARRAY", conflicts_with = "input")]
    pub args: Option<String>,
    /// Keyword arguments, as a JSON object.
    #[arg(long, value_name = "JSON_OBJECT", conflicts_with = "input")]
    pub kwargs: Option<String>,
    /// A JSON file holding {"args": [...], "kwargs": {...}}; `-` reads stdin.
    #[arg(long, value_name = "FILE")]
    pub input: Option<PathBuf>,
}

impl InputArgs {
    pub fn arguments(&self) -> Result<Arguments> {
        match &self.input {
            Some(path) => Arguments::from_input(path),
            None => Arguments::from_flags(self.args.as_deref(), self.kwargs.as_deref()),
        }
    }
}

/// What the sandbox may see, and its limits.
#[derive(Debug, Args)]
pub struct SandboxArgs {
    /// Make a host directory visible to the function, read-only unless `:rw` (repeatable).
    #[arg(long, value_name = "HOST_DIR:GUEST_DIR[:ro|rw]")]
    pub grant: Vec<String>,
    /// Set an environment variable inside the sandbox (repeatable); the environment is
    /// otherwise empty.
    #[arg(long, value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Memory limit of the call (e.g. 512M, 2G).
    #[arg(long, value_name = "SIZE", default_value = "1G")]
    pub memory: String,
    /// Wall-clock time limit of the call (e.g. 30s, 500ms, 2m).
    #[arg(long, value_name = "DURATION", default_value = "30s")]
    pub timeout: String,
    /// Limit on what the call may print plus the size of its result (e.g. 16M).
    #[arg(long, value_name = "SIZE", default_value = "16M")]
    pub max_output: String,
}

impl SandboxArgs {
    /// The validated policy, before any work starts.
    pub fn policy(&self) -> Result<Policy> {
        let grants = self
            .grant
            .iter()
            .map(|g| g.parse::<Grant>())
            .collect::<Result<Vec<_>>>()?;
        let env = self
            .env
            .iter()
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
                _ => Err(bad_input(format!("--env `{kv}`: expected KEY=VALUE"))),
            })
            .collect::<Result<Vec<_>>>()?;
        let limits = Limits {
            memory: parse_size(&self.memory)?,
            timeout: parse_duration(&self.timeout)?,
            output: parse_size(&self.max_output)?,
        };
        Ok(Policy {
            grants,
            env,
            limits,
        })
    }
}

pub fn run(global: &GlobalOptions, args: &RunArgs) -> Result<Exit> {
    let arguments = args.input.arguments()?;
    let policy = args.sandbox.policy()?;
    // Leaked: the process ends after this one call, and its exit unmaps the compiled
    // interpreter for free, where dropping it would first deregister its unwind tables and
    // unmap it piece by piece (a millisecond or so).
    let (engine, sandbox) = global.sandbox()?;
    let sandbox = &Box::leak(Box::new((engine, sandbox))).1;
    let select = Select::Only(&[&args.function]);
    let bundle = if args.wheels.is_empty() {
        Bundle::open(sandbox, &args.notebook, select)?
    } else {
        let wheels = args
            .wheels
            .iter()
            .map(|w| Wheel::read(w))
            .collect::<Result<Vec<_>>>()?;
        if std::fs::read(&args.notebook).is_ok_and(|b| Bundle::sniff(&b)) {
            return Err(bad_input(format!(
                "--wheel: `{}` is a bundle, which carries the wheels it was made with; \
                 --wheel goes with a notebook",
                args.notebook.display()
            )));
        }
        let notebook = Notebook::read(&args.notebook)?;
        Bundle::from_notebook_with(sandbox, &notebook, select, None, &wheels)?
    };
    for warning in &bundle.manifest.warnings {
        eprintln!("host: warning: {warning}");
    }
    let prepared = if args.no_image {
        Prepared::without_image(bundle)
    } else {
        Prepared::new(sandbox, bundle)?
    };
    let result = match &args.record {
        None => call::call(sandbox, &policy, &prepared, &args.function, &arguments)?,
        Some(path) => {
            let (result, trace) =
                call::call_recorded(sandbox, &policy, &prepared, &args.function, &arguments)?;
            trace.write(path)?;
            eprintln!(
                "host: recorded {} events to {}",
                trace.events.len(),
                path.display()
            );
            result
        }
    };
    let envelope = args
        .envelope
        .then_some((prepared.bundle.version.as_str(), args.function.as_str()));
    report(result, envelope)
}

/// Prints what the guest printed (on stderr, so stdout stays the result alone), then the
/// value or the exception.
pub fn report(result: call::CallResult, envelope: Option<(&str, &str)>) -> Result<Exit> {
    {
        let mut stderr = std::io::stderr().lock();
        for stream in [&result.stdout, &result.stderr] {
            let _ = stderr.write_all(stream);
            if stream.last().is_some_and(|&b| b != b'\n') {
                let _ = stderr.write_all(b"\n");
            }
        }
    }
    match result.outcome {
        Outcome::Returned(value) => {
            let value = match envelope {
                Some((version, function)) => {
                    serde_json::json!({"bundle": version, "function": function, "result": value})
                }
                None => value,
            };
            let mut stdout = std::io::stdout().lock();
            match writeln!(stdout, "{value}").and_then(|()| stdout.flush()) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(e.into()),
                _ => {}
            }
            Ok(Exit::Success)
        }
        Outcome::Raised(exception) => {
            eprintln!("{exception}");
            Ok(Exit::FunctionRaised)
        }
        Outcome::Limit(limit) => {
            eprintln!("host: {limit}");
            Ok(Exit::Limit)
        }
        Outcome::Exited(status) => {
            eprintln!("host: the function ended the interpreter with exit status {status}");
            Ok(Exit::FunctionRaised)
        }
        Outcome::Diverged(divergence) => {
            eprintln!("host: {divergence}");
            Ok(Exit::Diverged)
        }
    }
}
