//! Calling one function of a prepared bundle: the arguments in; the value or the exception,
//! the bundle's version, the time it took and, when asked, the trace out.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::door::{Arguments, CallInput, Door, GuestException, GuestMessage, Script};
use crate::policy::{LimitExceeded, Policy, check_guest_paths};
use crate::preinit::Prepared;
use crate::record::{Divergence, Mode};
use crate::sandbox::{Ended, Sandbox, Setup, Start};
use crate::trace::Trace;

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
    /// The function, or a definition it needs, made the interpreter trap (`os.abort()`, a
    /// fatal signal): why, as Wasmtime says it.
    Crashed(String),
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
            Outcome::Crashed(why) => json!({"crashed": why}),
            Outcome::Diverged(d) => json!({"diverged": d.to_string()}),
        }
    }
}

/// A call that ran: how it ended and what the guest printed.
#[derive(Debug)]
pub struct CallResult {
    pub outcome: Outcome,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// One call to make.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub function: &'a str,
    pub arguments: &'a Arguments,
    /// What this caller's call may see and use.
    pub policy: &'a Policy,
    /// Record every nondeterministic input the call receives, and hand back the trace.
    pub record: bool,
}

/// A finished call.
#[derive(Debug)]
pub struct Finished {
    pub outcome: Outcome,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The version of the bundle that answered.
    pub bundle: String,
    pub timings: Timings,
    /// The trace file's bytes, when the call was recorded.
    pub trace: Option<Recorded>,
}

/// Where a call's time went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    /// The instance's run: instantiation, the guest's turns, and the output handed back.
    pub run: Duration,
    /// The whole call, encoding its trace included.
    pub total: Duration,
}

/// A recorded call's trace, encoded as a file (`host replay` reads it).
#[derive(Debug, Clone)]
pub struct Recorded {
    pub bytes: Vec<u8>,
    /// sha256 of `bytes`.
    pub sha256: String,
    /// How many import calls it holds.
    pub events: usize,
}

/// Calls a function of a prepared bundle in a fresh instance: from the bundle's
/// pre-initialised image when it has one, else loading the bundle's source first.
///
/// Many calls may run at once on one sandbox and one prepared bundle, from any threads:
/// each gets its own instance and memory, and sees nothing of the others.
pub fn call(sandbox: &Sandbox, prepared: &Prepared, request: &Request<'_>) -> Result<Finished> {
    let started = Instant::now();
    let mode = if request.record {
        Mode::record(request.policy.limits.record)
    } else {
        Mode::Plain
    };
    let (result, mode) = execute(
        sandbox,
        request.policy,
        prepared,
        request.function,
        request.arguments,
        mode,
    )?;
    let run = started.elapsed();
    let trace = match mode {
        Mode::Record(recording) => {
            let trace = Trace::new(
                sandbox,
                prepared,
                request.policy,
                request.function,
                request.arguments,
                recording,
                (&result.stdout, &result.stderr, result.outcome.to_json()),
            );
            let bytes = trace.encode()?;
            Some(Recorded {
                sha256: hex::encode(Sha256::digest(&bytes)),
                events: trace.events.len(),
                bytes,
            })
        }
        _ => None,
    };
    Ok(Finished {
        outcome: result.outcome,
        stdout: result.stdout,
        stderr: result.stderr,
        bundle: prepared.bundle.version.clone(),
        timings: Timings {
            run,
            total: started.elapsed(),
        },
        trace,
    })
}

/// One call in the given mode: the result, and the mode back with what it recorded or how far
/// it replayed.
pub(crate) fn execute(
    sandbox: &Sandbox,
    policy: &Policy,
    prepared: &Prepared,
    function: &str,
    arguments: &Arguments,
    mode: Mode,
) -> Result<(CallResult, Mode)> {
    let bundle = &prepared.bundle;
    bundle.check_function(function)?;
    check_guest_paths(policy.grants.iter().map(|g| g.guest.as_str()))?;
    let env: BTreeMap<&str, &str> = policy
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let door = Door::default().call(&CallInput {
        function,
        env,
        args: &arguments.args,
        kwargs: &arguments.kwargs,
    });
    let (start, door, script) = match &prepared.image {
        Some(image) => (Start::Image(image), door, Script::Call),
        // The bundle's warm-up calls run first here too, so a call gives the same result
        // with or without an image.
        None => (Start::Fresh, bundle.load_answers(door), Script::LoadAndCall),
    };
    let setup = Setup {
        start,
        mode,
        capture: false,
    };
    let run = sandbox.execute(setup, policy, door, script)?;
    let outcome = match run.ended {
        Ended::Finished => outcome(run.door.received)?,
        Ended::Limit(limit) => Outcome::Limit(limit),
        Ended::Exit(status) => Outcome::Exited(status),
        Ended::Crashed(why) => Outcome::Crashed(why),
        Ended::Diverged(divergence) => Outcome::Diverged(divergence),
    };
    Ok((
        CallResult {
            outcome,
            stdout: run.stdout,
            stderr: run.stderr,
        },
        run.mode,
    ))
}

/// The outcome the guest handed back: its last message, a `result` or an `error`.
fn outcome(mut received: Vec<GuestMessage>) -> Result<Outcome> {
    match received.pop() {
        Some(GuestMessage::Result { value }) => Ok(Outcome::Returned(value)),
        Some(GuestMessage::Error(e)) => Ok(Outcome::Raised(e)),
        Some(other) => bail!("the guest ended the call with an unexpected message: {other:?}"),
        None => bail!("the guest ended without a result or an error"),
    }
}
