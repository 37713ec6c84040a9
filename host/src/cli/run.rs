//! `host run NOTEBOOK FUNCTION`: call one function and print its value as JSON.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::{Map, Value};

use super::{GlobalOptions, check_output, print_guest, say};
use crate::bundle::{Bundle, Select};
use crate::call::{self, Outcome, Request};
use crate::door::Arguments;
use crate::error::{Exit, bad_input};
use crate::files::{SigningKey, read_capped, read_regular, write_private};
use crate::neighbours::Wheel;
use crate::policy::{
    EnvVar, Grant, Limits, Policy, Size, Timeout, check_guest_paths, record_limit,
};
use crate::preinit::Prepared;

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
    pub args: Option<JsonArray>,
    /// Keyword arguments, as a JSON object.
    #[arg(long, value_name = "JSON_OBJECT", conflicts_with = "input")]
    pub kwargs: Option<JsonObject>,
    /// A JSON file holding {"args": [...], "kwargs": {...}}; `-` reads stdin.
    #[arg(long, value_name = "FILE")]
    pub input: Option<PathBuf>,
    /// The largest input host reads (--input, stdin, --args and --kwargs), e.g. 64M.
    #[arg(long, value_name = "SIZE", default_value_t = DEFAULT_MAX_INPUT)]
    pub max_input: Size,
}

/// How much input a call reads unless `--max-input` says otherwise: far more than arguments
/// in JSON usually take, and a bound on what host holds before the call starts.
pub const DEFAULT_MAX_INPUT: Size = Size(64 << 20);

/// `--args`: a JSON array, and the length of its text.
#[derive(Debug, Clone)]
pub struct JsonArray(pub Vec<Value>, pub usize);

impl FromStr for JsonArray {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<JsonArray> {
        match serde_json::from_str(s) {
            Ok(Value::Array(items)) => Ok(JsonArray(items, s.len())),
            Ok(_) => Err(bad_input(
                "--args must be a JSON array, e.g. --args '[1, \"a\"]'",
            )),
            Err(e) => Err(bad_input(format!("--args is not valid JSON: {e}"))),
        }
    }
}

/// `--kwargs`: a JSON object, and the length of its text.
#[derive(Debug, Clone)]
pub struct JsonObject(pub Map<String, Value>, pub usize);

impl FromStr for JsonObject {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<JsonObject> {
        match serde_json::from_str(s) {
            Ok(Value::Object(map)) => Ok(JsonObject(map, s.len())),
            Ok(_) => Err(bad_input(
                "--kwargs must be a JSON object, e.g. --kwargs '{\"n\": 3}'",
            )),
            Err(e) => Err(bad_input(format!("--kwargs is not valid JSON: {e}"))),
        }
    }
}

impl InputArgs {
    pub fn arguments(&self) -> Result<Arguments> {
        let max = self.max_input;
        match &self.input {
            Some(path) => read_arguments(path, max),
            None => {
                let given = [
                    self.args.as_ref().map_or(0, |a| a.1),
                    self.kwargs.as_ref().map_or(0, |k| k.1),
                ];
                if given.iter().sum::<usize>() as u64 > max.0 {
                    return Err(bad_input(format!(
                        "--args and --kwargs are larger than {max} (--max-input)"
                    )));
                }
                Ok(Arguments {
                    args: self.args.clone().map(|a| a.0).unwrap_or_default(),
                    kwargs: self.kwargs.clone().map(|k| k.0).unwrap_or_default(),
                })
            }
        }
    }
}

/// Arguments from an input file (`-` for stdin) holding `{"args": [...], "kwargs": {...}}`,
/// refused once it is larger than `max`.
pub fn read_arguments(path: &Path, max: Size) -> Result<Arguments> {
    if path == Path::new("-") {
        let text = read_capped(std::io::stdin().lock(), "stdin", max.0)
            .context("--input - (raise the cap with --max-input)")?;
        return Arguments::from_json("stdin", &text);
    }
    let text = read_regular(path, "input file", max.0)
        .context("--input (raise the cap with --max-input)")?;
    Arguments::from_json(&format!("`{}`", path.display()), &text)
}

/// What the sandbox may see, and its limits.
#[derive(Debug, Args)]
pub struct SandboxArgs {
    /// Make a host directory visible to the function, read-only unless `:rw` (repeatable).
    #[arg(long, value_name = "HOST_DIR:GUEST_DIR[:ro|rw]")]
    pub grant: Vec<Grant>,
    /// Set an environment variable inside the sandbox (repeatable); the environment is
    /// otherwise empty.
    #[arg(long, value_name = "KEY=VALUE")]
    pub env: Vec<EnvVar>,
    /// Memory limit of the call (e.g. 512M, 2G).
    #[arg(long, value_name = "SIZE", default_value = "1G")]
    pub memory: Size,
    /// Wall-clock time limit of the call (e.g. 30s, 500ms, 2m; at most 24h).
    #[arg(long, value_name = "DURATION", default_value = "30s")]
    pub timeout: Timeout,
    /// Limit on what the call may print plus the size of its result (e.g. 16M).
    #[arg(long, value_name = "SIZE", default_value = "16M")]
    pub max_output: Size,
    /// Limit on the trace of a recorded call (`--record`, and every call `host serve` logs):
    /// what host holds in its own memory while recording, past the guest's (at most 768M).
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = record_limit)]
    pub max_record: Size,
}

impl SandboxArgs {
    /// The policy the flags describe, refusing two grants at one guest path.
    pub fn policy(&self) -> Result<Policy> {
        check_guest_paths(self.grant.iter().map(|g| g.guest.as_str()))?;
        Ok(Policy {
            grants: self.grant.clone(),
            env: self
                .env
                .iter()
                .map(|v| (v.key.clone(), v.value.clone()))
                .collect(),
            limits: Limits {
                memory: self.memory.0,
                timeout: self.timeout.0,
                output: self.max_output.0,
                record: self.max_record.0,
            },
        })
    }
}

pub fn run(global: &GlobalOptions, args: &RunArgs) -> Result<Exit> {
    if let Some(path) = &args.record {
        check_output(path, "--record")?;
    }
    let arguments = args.input.arguments()?;
    let policy = args.sandbox.policy()?;
    let key = SigningKey::from_env()?;
    // Leaked: the process ends after this one call, and its exit unmaps the compiled
    // interpreter for free, where dropping it would first deregister its unwind tables and
    // unmap it piece by piece (a millisecond or so).
    let (engine, sandbox) = global.sandbox()?;
    let sandbox = &Box::leak(Box::new((engine, sandbox))).1;
    let select = Select::Only(&[&args.function]);
    let wheels = args
        .wheels
        .iter()
        .map(|w| Wheel::read(w))
        .collect::<Result<Vec<_>>>()?;
    let bundle = Bundle::open(sandbox, &args.notebook, select, key.as_ref(), &wheels)?;
    for warning in &bundle.manifest.warnings {
        say(format_args!("warning: {warning}"));
    }
    let prepared = if args.no_image {
        Prepared::without_image(bundle)
    } else {
        Prepared::with_limits(sandbox, bundle, &policy.limits)?
    };
    let request = Request {
        function: &args.function,
        arguments: &arguments,
        policy: &policy,
        record: args.record.is_some(),
    };
    let finished = call::call(sandbox, &prepared, &request)?;
    if let (Some(path), Some(trace)) = (&args.record, &finished.trace) {
        // Signed, the bytes with a signature line before them; unsigned, as they are.
        let signed = key.as_ref().map(|k| k.sign(&trace.bytes));
        write_private(path, signed.as_deref().unwrap_or(&trace.bytes))
            .with_context(|| format!("failed to write trace `{}`", path.display()))?;
        say(format_args!(
            "recorded {} events to {}",
            trace.events,
            path.display()
        ));
    }
    let envelope = args
        .envelope
        .then_some((finished.bundle.as_str(), args.function.as_str()));
    report(
        finished.outcome,
        [&finished.stdout, &finished.stderr],
        envelope,
    )
}

/// Prints what the guest printed (on stderr, so stdout stays the result alone), then the
/// value or the exception.
pub fn report(
    outcome: Outcome,
    printed: [&[u8]; 2],
    envelope: Option<(&str, &str)>,
) -> Result<Exit> {
    for stream in printed {
        print_guest(stream);
    }
    match outcome {
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
            // The traceback quotes the guest's own messages.
            print_guest(format!("{exception}\n").as_bytes());
            Ok(Exit::FunctionRaised)
        }
        Outcome::Limit(limit) => {
            say(limit);
            Ok(Exit::Limit)
        }
        Outcome::Exited(status) => {
            say(format_args!(
                "the function ended the interpreter with exit status {status}"
            ));
            Ok(Exit::FunctionRaised)
        }
        Outcome::Crashed(why) => {
            say(format_args!("the function ended the interpreter: {why}"));
            Ok(Exit::FunctionRaised)
        }
        Outcome::Diverged(divergence) => {
            say(divergence);
            Ok(Exit::Diverged)
        }
    }
}
