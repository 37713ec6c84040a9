//! The one place the server calls the host library: making, loading and calling bundles.
//!
//! Everything else in `serve` speaks in this file's types ([`Runner`], [`Ready`], [`Done`]),
//! so a change in the library's API is a change here only.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::bundle::{Bundle, Opened, Select};
use crate::call::{self, Outcome, Request};
use crate::door::Arguments;
use crate::engine::Engine;
use crate::error::{UserError, bad_input};
use crate::evaluate::{Class, Run, Unavailable, evaluate_run};
use crate::notebook::Notebook;
use crate::policy::{Grant, LimitExceeded, Limits, Policy};
use crate::preinit::Prepared;
use crate::runtime::Runtime;
use crate::sandbox::Sandbox;
use crate::trace::Trace;

/// How far apart floats in an evaluation's results may be and still count as the same.
pub use crate::replay::Tolerance;

/// The engine and the compiled interpreter, shared by every request.
pub struct Runner {
    // Kept alive for the sandbox's sake: the sandbox's module lives in its engine.
    _engine: Engine,
    sandbox: Sandbox,
    /// What a stored bundle is pre-initialised under when the server loads it again (after a
    /// restart, or when its image left the cache): the widest of the tenants' limits, as the
    /// server cannot tell which tenants will call it, and an image built under less would
    /// refuse a bundle whose load some tenant's calls have room for.
    reload: Limits,
}

/// A deployed bundle, pre-initialised: what calls run.
pub struct Ready {
    prepared: Prepared,
}

/// How a call ended, in the server's terms.
pub struct Done {
    /// `returned`, `raised` or `limit` (the `runs.outcome` column).
    pub outcome: &'static str,
    /// The value when it returned.
    pub result: Option<Value>,
    /// What went wrong otherwise: `kind`, `message` and the details of the kind.
    pub error: Option<Value>,
    /// Which limit it hit (`memory`, `time`, `output`, `record`, `stack`), for the metrics.
    pub limit: Option<&'static str>,
    /// The trace file's bytes, as `host replay` reads them, and their sha256.
    pub trace: Vec<u8>,
    pub trace_sha256: String,
}

/// The limit a deploy's pre-initialisation hit, as the error a call hitting it answers
/// (`kind: "limit"`): the notebook's imports or definitions need more than the tenant's
/// limits, which is the tenant's to fix, not a bug.
pub fn deploy_limit(e: &anyhow::Error) -> Option<Value> {
    let limit = e.chain().find_map(|c| c.downcast_ref::<LimitExceeded>())?;
    Some(limit_error(
        limit,
        format!("the bundle's imports and definitions, run under the tenant's limits: {e:#}"),
    ))
}

fn limit_error(limit: &LimitExceeded, message: String) -> Value {
    json!({"kind": "limit", "limit": limit_name(limit), "message": message})
}

/// The limit's name in `runs`, errors and metrics.
fn limit_name(limit: &LimitExceeded) -> &'static str {
    match limit {
        LimitExceeded::Memory(_) => "memory",
        LimitExceeded::Time(_) => "time",
        LimitExceeded::Output(_) => "output",
        LimitExceeded::Record(_) => "record",
        LimitExceeded::Stack => "stack",
    }
}

/// One logged call evaluated on a candidate, in the server's terms.
pub struct Evaluated {
    /// `same`, `changed`, `newly_failing`, `fixed` or `not_replayable` (the
    /// `evaluation_runs.class` column).
    pub class: &'static str,
    /// Its report entry, as `host evaluate --json` writes each run.
    pub entry: Value,
}

/// Whether `name` is one of [`Evaluated::class`]'s values.
pub fn is_class(name: &str) -> bool {
    Class::ALL.iter().any(|c| c.name() == name)
}

/// Whether an error is the user's to fix (what `host run` exits 2 for) rather than a bug.
/// The test is on the library's error type, not the CLI's exit codes, so the server does
/// not depend on the CLI.
pub fn is_user_error(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<UserError>())
}

/// A worker thread: its stack is large enough to run calls in place, with no thread of
/// their own each.
pub fn worker_thread(name: String) -> std::thread::Builder {
    crate::sandbox::call_thread(name)
}

/// A worker resets a call's memory after handing over its answer (see `workers`).
pub use crate::sandbox::{defer_resets, settle};

impl Runner {
    /// Checks that the runtime is there: quick, so a server without one refuses to start at
    /// once rather than after binding its port.
    pub fn check_runtime(runtime: Option<&Path>) -> Result<()> {
        Runtime::locate(runtime).map(drop)
    }

    /// Loads (compiling once per machine) the interpreter: seconds to a minute. `reload` is
    /// what stored bundles are pre-initialised under again (see [`Runner::load`]).
    pub fn start(
        runtime: Option<&Path>,
        cache_dir: Option<PathBuf>,
        reload: Limits,
    ) -> Result<Runner> {
        let runtime = Runtime::locate(runtime)?;
        let engine = Engine::new(cache_dir)?;
        let sandbox = Sandbox::new(&engine, &runtime)?;
        Ok(Runner {
            _engine: engine,
            sandbox,
            reload,
        })
    }

    /// The sha256 of the runtime every call runs on (recorded on each run).
    pub fn runtime_sha256(&self) -> &str {
        self.sandbox.runtime().sha256()
    }

    /// Makes a bundle from a notebook's or a bundle file's bytes, as `host bundle` would, and
    /// pre-initialises it under `limits`, the deploying tenant's: its imports and definitions
    /// are the notebook's code, run as the tenant's calls will run them (a load that needs
    /// more than the default 1G is fine for a tenant allowed 2G, and one allowed 256M cannot
    /// make the server spend more at deploy). `name` names the notebook in tracebacks;
    /// `functions` empty means every function that can be extracted. Returns it with the
    /// bundle file's bytes.
    pub fn deploy(
        &self,
        name: &str,
        bytes: &[u8],
        functions: &[String],
        label: Option<&str>,
        limits: &Limits,
    ) -> Result<(Ready, Vec<u8>)> {
        let path = Path::new(name);
        let only: Vec<&str> = functions.iter().map(String::as_str).collect();
        let bundle = if Bundle::sniff(bytes) {
            let bundle = Bundle::parse(path, bytes)?;
            for f in &only {
                bundle.check_function(f)?;
            }
            bundle
        } else {
            let notebook = Notebook::parse(path, bytes)?;
            let select = if only.is_empty() {
                Select::All
            } else {
                Select::Only(&only)
            };
            Bundle::from_notebook(&self.sandbox, &notebook, select, label)?
        };
        let file = serde_json::to_vec_pretty(&bundle)?;
        Ok((self.prepare(bundle, limits)?, file))
    }

    /// A bundle the server stored at deploy, ready again (after a restart, or on another
    /// replica): its image from the cache, or built again under the widest tenant limits the
    /// server started with.
    pub fn load(&self, path: &Path) -> Result<Ready> {
        match Bundle::read(path, None)? {
            Opened::Bundle(bundle) => self.prepare(*bundle, &self.reload),
            Opened::Notebook(_) => Err(bad_input(format!("`{}` is not a bundle", path.display()))),
        }
    }

    fn prepare(&self, bundle: Bundle, limits: &Limits) -> Result<Ready> {
        Ok(Ready {
            prepared: Prepared::with_limits(&self.sandbox, bundle, limits)?,
        })
    }

    /// Calls `function` with the tenant's grants and limits, recording the call.
    pub fn call(
        &self,
        ready: &Ready,
        grants: &[Grant],
        limits: Limits,
        function: &str,
        arguments: &Arguments,
    ) -> Result<Done> {
        let policy = Policy {
            grants: grants.to_vec(),
            env: Vec::new(),
            limits,
        };
        let request = Request {
            function,
            arguments,
            policy: &policy,
            record: true,
        };
        let result = call::call(&self.sandbox, &ready.prepared, &request)?;
        let trace = result.trace.context("the recorded call left no trace")?;
        let stderr = String::from_utf8_lossy(&result.stderr);
        let mut done = Done {
            outcome: "returned",
            result: None,
            error: None,
            limit: None,
            trace: trace.bytes,
            trace_sha256: trace.sha256,
        };
        match result.outcome {
            Outcome::Returned(value) => done.result = Some(value),
            Outcome::Raised(e) => {
                done.outcome = "raised";
                done.error = Some(json!({
                    "kind": "raised",
                    "message": format!("{}: {}", e.kind, e.message),
                    "type": e.kind,
                    "exception": e.message,
                    "phase": e.phase,
                    "traceback": e.to_string(),
                    "stderr": stderr,
                }));
            }
            Outcome::Exited(status) => {
                done.outcome = "raised";
                done.error = Some(json!({
                    "kind": "exited",
                    "message": format!("the function ended the interpreter with exit status {status}"),
                    "status": status,
                    "stderr": stderr,
                }));
            }
            Outcome::Limit(limit) => {
                done.outcome = "limit";
                done.limit = Some(limit_name(&limit));
                done.error = Some(limit_error(&limit, limit.to_string()));
            }
            Outcome::Crashed(why) => {
                done.outcome = "raised";
                done.error = Some(json!({
                    "kind": "crashed",
                    "message": format!("the function ended the interpreter: {why}"),
                    "stderr": stderr,
                }));
            }
            Outcome::Diverged(d) => anyhow::bail!("a live call reported a divergence: {d}"),
        }
        Ok(done)
    }

    /// Re-executes a logged call, from its trace file's bytes, on `candidate` as
    /// `host replay --notebook` would, on this thread, and classes it. A run without its
    /// trace (`Err(why)`), or whose trace does not decode, is `not_replayable` with the reason.
    pub fn evaluate(
        &self,
        candidate: &Ready,
        run: &str,
        function: &str,
        trace: Result<&[u8], String>,
        tolerance: Tolerance,
    ) -> Result<Evaluated> {
        let trace = trace.and_then(|bytes| {
            Trace::decode(bytes)
                .map(Box::new)
                .map_err(|e| format!("{e:#}"))
        });
        let run = Run {
            id: run.to_owned(),
            trace: trace.map_err(|reason| Unavailable {
                function: function.to_owned(),
                reason,
            }),
        };
        let entry = evaluate_run(&self.sandbox, &candidate.prepared, &run, tolerance);
        Ok(Evaluated {
            class: entry.class.name(),
            entry: serde_json::to_value(&entry)?,
        })
    }
}

impl Ready {
    pub fn version(&self) -> &str {
        &self.prepared.bundle.version
    }

    pub fn functions(&self) -> &[String] {
        &self.prepared.bundle.manifest.functions
    }

    pub fn notebook(&self) -> &str {
        &self.prepared.bundle.manifest.notebook
    }

    pub fn label(&self) -> Option<&str> {
        self.prepared.bundle.manifest.label.as_deref()
    }

    /// What `GET /v1/bundles/VERSION` shows: the bundle's manifest, as `host inspect --json`
    /// shows a bundle's, and whether calls start from a pre-initialised image.
    pub fn inspect(&self) -> Value {
        json!({
            "bundle": self.version(),
            "manifest": self.prepared.bundle.manifest,
            "image": self.prepared.image.as_ref().map(|i| &i.sha256),
            "no_image_because": self.prepared.unavailable,
        })
    }
}

/// The value a recorded call returned, from its trace: for a result too large for its row.
pub fn recorded_result(trace: &[u8]) -> Result<Value> {
    let trace = Trace::decode(trace).context("a stored trace does not decode")?;
    trace
        .outputs
        .outcome
        .get("returned")
        .cloned()
        .context("the stored trace's call did not return")
}

/// Where two results differ, one line each (`[0].spend: 280.49 -> 290.49`), as
/// `host replay --notebook` shows them.
pub fn differences(old: &Value, new: &Value) -> Vec<String> {
    let mut out = Vec::new();
    crate::replay::diff(old, new, "", crate::replay::Tolerance::EXACT, &mut out);
    out.iter().map(ToString::to_string).collect()
}

/// What a run's trace says about its call, for the UI's run page: the row keeps only the
/// input's sha256, the trace the arguments themselves.
pub struct Recorded {
    /// `{"args": [...], "kwargs": {...}}`, as the call received them.
    pub arguments: Value,
    /// How the call ended, as the trace records it (`{"returned": VALUE}`, `{"raised": ...}`).
    pub outcome: Value,
}

/// The arguments and outcome of a stored trace's call.
pub fn recorded_call(trace: &[u8]) -> Result<Recorded> {
    let trace = Trace::decode(trace).context("a stored trace does not decode")?;
    Ok(Recorded {
        arguments: serde_json::to_value(&trace.header.arguments)?,
        outcome: trace.outputs.outcome,
    })
}

/// The Python traceback of an outcome that is a raised exception (`{"raised": ...}`, as
/// traces and evaluation reports record it), written as `host run` prints it, with notebook
/// frames as `nb.ipynb, cell 2, line 3`; None for any other outcome.
pub fn traceback(outcome: &Value) -> Option<String> {
    let raised = outcome.get("raised")?;
    let exception: crate::door::GuestException = serde_json::from_value(raised.clone()).ok()?;
    Some(exception.to_string())
}
