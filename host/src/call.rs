//! Calling one function of a bundle: the arguments in, the value or the exception out.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::error::bad_input;
use crate::sandbox::{Door, Ended, LimitExceeded, Policy, Sandbox, Setup, Start, World};
use crate::snapshot::Prepared;
use crate::trace::{
    Blobs, Divergence, EngineSettings, GrantRecord, Header, Outputs, RuntimeFiles, Trace, Tracer,
};

/// The guest's half of host, run as the first turn of every instance.
pub const GUEST_SOURCE: &str = include_str!("../../guest-python/guest.py");

/// A function's arguments: positional and keyword, as JSON values.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Arguments {
    #[serde(default)]
    pub args: Vec<Value>,
    #[serde(default)]
    pub kwargs: Map<String, Value>,
}

impl Arguments {
    /// From `--args` (a JSON array) and `--kwargs` (a JSON object).
    pub fn from_flags(args: Option<&str>, kwargs: Option<&str>) -> Result<Arguments> {
        Ok(Arguments {
            args: flag(args, "--args", "array, e.g. --args '[1, \"a\"]'", |v| {
                v.as_array().cloned()
            })?,
            kwargs: flag(
                kwargs,
                "--kwargs",
                "object, e.g. --kwargs '{\"n\": 3}'",
                |v| v.as_object().cloned(),
            )?,
        })
    }

    /// From an input file (`-` for stdin) holding `{"args": [...], "kwargs": {...}}`.
    pub fn from_input(path: &Path) -> Result<Arguments> {
        let (name, text) = if path == Path::new("-") {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                .context("failed to read stdin")?;
            ("stdin".to_owned(), text)
        } else {
            let text = std::fs::read_to_string(path).map_err(|e| {
                bad_input(format!("cannot read input file `{}`: {e}", path.display()))
            })?;
            (format!("`{}`", path.display()), text)
        };
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| bad_input(format!("input {name} is not valid JSON: {e}")))?;
        if let Value::Object(o) = &value
            && let Some(k) = o.keys().find(|k| *k != "args" && *k != "kwargs")
        {
            return Err(bad_input(format!(
                "input {name} has an unknown key `{k}`: expected {{\"args\": [...], \"kwargs\": {{...}}}}"
            )));
        }
        serde_json::from_value(value).map_err(|e| {
            bad_input(format!(
                "input {name} must be {{\"args\": [...], \"kwargs\": {{...}}}}: {e}"
            ))
        })
    }
}

/// A JSON flag's value: absent is empty; `kind` says what it must be, for the error.
fn flag<T: Default>(
    text: Option<&str>,
    name: &str,
    kind: &str,
    take: impl Fn(&Value) -> Option<T>,
) -> Result<T> {
    let Some(text) = text else {
        return Ok(T::default());
    };
    let value: Value = serde_json::from_str(text)
        .map_err(|e| bad_input(format!("{name} is not valid JSON: {e}")))?;
    take(&value).ok_or_else(|| bad_input(format!("{name} must be a JSON {kind}")))
}

/// How a call ended, when it ran to its end.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The function returned this value, converted to JSON.
    Returned(Value),
    /// The function, or the code it needs, raised; or its value has no JSON form.
    Raised(GuestException),
    /// A limit stopped the call.
    Limit(LimitExceeded),
    /// The function ended the interpreter (`os._exit(status)`).
    Exited(i32),
    /// A replay went another way than its recording (never the outcome of a live call).
    Diverged(Divergence),
}

impl Outcome {
    /// The outcome as a trace records it and a replay compares it.
    pub fn to_json(&self) -> Value {
        match self {
            Outcome::Returned(v) => json!({"returned": v}),
            Outcome::Raised(e) => json!({"raised": e}),
            Outcome::Limit(l) => json!({"limit": l.to_string()}),
            Outcome::Exited(code) => json!({"exited": code}),
            Outcome::Diverged(d) => json!({"diverged": d.to_string()}),
        }
    }
}

/// An exception raised in the guest, with the frames that lead to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestException {
    /// `load` (running the kept definitions), `warm-up` (the bundle's warm-up calls, in a call
    /// that loads the bundle itself), `call`, or `result` (converting the value).
    pub phase: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
    pub frames: Vec<Frame>,
}

/// One traceback frame: in the notebook (`cell` set) or in a library file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Frame {
    pub file: String,
    pub cell: Option<usize>,
    pub line: usize,
    pub function: String,
    pub text: String,
}

impl fmt::Display for GuestException {
    /// Python's traceback, with notebook frames written `churn.ipynb, cell 7, line 3`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.frames.is_empty() {
            writeln!(f, "Traceback (most recent call last):")?;
        }
        for frame in &self.frames {
            let place = match frame.cell {
                Some(cell) => format!("{}, cell {cell}, line {}", frame.file, frame.line),
                None => format!("{}, line {}", frame.file, frame.line),
            };
            let function = if frame.function == "<module>" {
                String::new()
            } else {
                format!(", in {}", frame.function)
            };
            writeln!(f, "  {place}{function}")?;
            if !frame.text.is_empty() {
                writeln!(f, "    {}", frame.text)?;
            }
        }
        if self.message.is_empty() {
            write!(f, "{}", self.kind)
        } else {
            write!(f, "{}: {}", self.kind, self.message)
        }
    }
}

/// A finished call: how it ended and what the guest printed.
#[derive(Debug)]
pub struct CallResult {
    pub outcome: Outcome,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// The door's request for one call.
#[derive(Serialize)]
struct CallRequest<'a> {
    function: &'a str,
    env: BTreeMap<&'a str, &'a str>,
    args: &'a [Value],
    kwargs: &'a Map<String, Value>,
}

/// Calls `function` of a prepared bundle in a fresh instance: from the bundle's
/// pre-initialised image when it has one, else loading the bundle's source first.
pub fn call(
    sandbox: &Sandbox,
    policy: &Policy,
    prepared: &Prepared,
    function: &str,
    arguments: &Arguments,
) -> Result<CallResult> {
    Ok(execute(
        sandbox,
        policy,
        prepared,
        function,
        arguments,
        World::Live,
        None,
    )?
    .0)
}

/// Like [`call`], recording every value the guest receives: the result and its trace.
pub fn call_recorded(
    sandbox: &Sandbox,
    policy: &Policy,
    prepared: &Prepared,
    function: &str,
    arguments: &Arguments,
) -> Result<(CallResult, Trace)> {
    let tracer = Tracer::Record {
        events: Vec::new(),
        blobs: Blobs::default(),
        files: RuntimeFiles::default(),
    };
    let (result, tracer) = execute(
        sandbox,
        policy,
        prepared,
        function,
        arguments,
        World::Live,
        Some(tracer),
    )?;
    let Some(Tracer::Record {
        events, mut blobs, ..
    }) = tracer
    else {
        anyhow::bail!("the recording was lost");
    };
    let outputs = Outputs {
        stdout: Some(blobs.put(&result.stdout)),
        stderr: Some(blobs.put(&result.stderr)),
        outcome: result.outcome.to_json(),
    };
    let header = Header {
        format: crate::trace::FORMAT.to_owned(),
        host_version: env!("CARGO_PKG_VERSION").to_owned(),
        runtime_sha256: sandbox.runtime().sha256().to_owned(),
        bundle: prepared.bundle.clone(),
        function: function.to_owned(),
        arguments: arguments.clone(),
        env: policy.env.clone(),
        grants: policy
            .grants
            .iter()
            .map(|g| GrantRecord {
                guest: g.guest.clone(),
                writable: g.writable,
            })
            .collect(),
        limits: policy.limits.into(),
        engine: EngineSettings::current(),
        image_sha256: prepared.image.as_ref().map(|i| i.sha256.clone()),
        recorded_at: crate::bundle::now_rfc3339(),
    };
    Ok((
        result,
        Trace {
            header,
            events,
            blobs: blobs.map,
            outputs,
        },
    ))
}

/// One call, in the given world, with an optional tracer: the result, the tracer back, and
/// the divergence a replay met.
pub(crate) fn execute(
    sandbox: &Sandbox,
    policy: &Policy,
    prepared: &Prepared,
    function: &str,
    arguments: &Arguments,
    world: World,
    tracer: Option<Tracer>,
) -> Result<(CallResult, Option<Tracer>)> {
    let bundle = &prepared.bundle;
    bundle.check_function(function)?;
    let request = CallRequest {
        function,
        env: policy
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect(),
        args: &arguments.args,
        kwargs: &arguments.kwargs,
    };
    let door = Door::default().answer("call", &request)?;
    let (setup, door, turns): (_, _, &[&str]) = match &prepared.image {
        Some(image) => (
            Setup {
                start: Start::Image(image),
                world,
                tracer,
                capture: false,
            },
            door,
            &["invoke()\n"],
        ),
        None => (
            Setup {
                start: Start::Fresh,
                world,
                tracer,
                capture: false,
            },
            // The bundle's warm-up calls run first here too, so a call gives the same result
            // with or without an image.
            bundle.load_answers(door)?,
            &[GUEST_SOURCE, "if load() and warm_up():\n    invoke()\n"],
        ),
    };
    let run = sandbox.execute(setup, policy, door, turns)?;
    let outcome = match run.ended {
        Ended::Finished => outcome(&run.door.received)?,
        Ended::Limit(limit) => Outcome::Limit(limit),
        Ended::Exit(status) => Outcome::Exited(status),
        Ended::Diverged(divergence) => Outcome::Diverged(divergence),
    };
    Ok((
        CallResult {
            outcome,
            stdout: run.stdout,
            stderr: run.stderr,
        },
        run.tracer,
    ))
}

/// The outcome the guest handed back: exactly one `result` or `error`.
fn outcome(received: &[Value]) -> Result<Outcome> {
    let Some(last) = received.last() else {
        anyhow::bail!("the guest ended without a result or an error");
    };
    match last.get("op").and_then(Value::as_str) {
        Some("result") => Ok(Outcome::Returned(
            last.get("value").cloned().unwrap_or(Value::Null),
        )),
        Some("error") => Ok(Outcome::Raised(
            serde_json::from_value(last.clone()).context("malformed error from the guest")?,
        )),
        other => anyhow::bail!("unexpected answer from the guest: {other:?}"),
    }
}
