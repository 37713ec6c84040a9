//! host: call one function of a Jupyter notebook inside a WebAssembly sandbox.
//!
//! # Layers
//!
//! Each module imports only modules listed above it, so the code reads top to bottom. A call
//! flows down the last group: a notebook is read, the function's code extracted into a
//! bundle, the bundle pre-initialised into an image, and the call run from that image in a
//! fresh sandboxed instance, recorded when asked; a trace replays it.
//!
//! - Foundations: [`error`] (exit codes, user errors), [`progress`] (what a terminal sees of
//!   slow one-time work), [`runtime`] (the Python runtime on disk), [`policy`] (grants,
//!   environment and limits, as typed values), [`files`] (bounded reads, atomic owner-only
//!   writes, signatures), [`cache`] (the owner-only cache folder, and the seals that make what
//!   host reads back from it trusted).
//! - The machine: [`memory`] (linear memories mapped from images and pooled), [`engine`]
//!   (Wasmtime and the compiled-module cache), [`image`] (memory images on disk).
//! - The guest boundary: [`door`] (the guest's source and the protocol, every message typed),
//!   [`record`] (recording and replaying the guest's imports), [`sandbox`] (one fresh
//!   instance per run, with grants, limits and the door).
//! - The pipeline: [`notebook`] (`.ipynb` files) → [`extract`] (what a function needs) →
//!   [`neighbours`] (the modules beside the notebook, and wheels, that it imports) →
//!   [`bundle`] (the kept source and its manifest) → [`preinit`] (imports and definitions run
//!   once, their memory kept as an image) → [`trace`] (the file a recorded call is kept in) →
//!   [`call`] (arguments in, value out) → [`replay`] (a trace run again, exactly or against
//!   an updated notebook) → [`evaluate`] (a candidate bundle run on many traces at once, each
//!   run classed against its recording).
//! - [`serve`]: `host serve`, the multi-tenant HTTP service on the library: deploys, aliases,
//!   calls logged with their traces in a run store.
//! - [`cli`]: the `host` command, a thin user of all the above. Nothing below it prints to
//!   stdout or exits the process.
//!
//! # Embedding
//!
//! A long-running process (a server) holds one [`Engine`] and one [`Sandbox`], any number of
//! [`Prepared`] bundles (each behind an `Arc`, added and dropped while calls run), and makes
//! calls from many threads, each with its caller's own [`Policy`], recorded when asked:
//!
//! ```no_run
//! use std::collections::HashMap;
//! use std::sync::{Arc, RwLock};
//!
//! use host::bundle::Select;
//! use host::call::{Outcome, Request};
//! use host::{Arguments, Bundle, Engine, Notebook, Policy, Prepared, Runtime, Sandbox};
//!
//! # fn main() -> anyhow::Result<()> {
//! // The interpreter is compiled once per machine and loaded once per process; every call
//! // gets a fresh instance, whose memory the engine keeps for the next call of the same
//! // bundle once it is reset to the bundle's image.
//! let engine = Engine::new(None)?;
//! let sandbox = Arc::new(Sandbox::new(&engine, &Runtime::locate(None)?)?);
//! let deployed: RwLock<HashMap<String, Arc<Prepared>>> = RwLock::default();
//!
//! // Deploy: extract `process` and run the bundle's imports and definitions once.
//! let notebook = Notebook::read("notebooks/churn.ipynb".as_ref())?;
//! let bundle = Bundle::from_notebook(&sandbox, &notebook, Select::Only(&["process"]), None)?;
//! let version = bundle.version.clone();
//! let prepared = Arc::new(Prepared::new(&sandbox, bundle)?);
//! deployed.write().unwrap().insert(version.clone(), prepared);
//!
//! // Calls, from any thread, each with its caller's policy.
//! let prepared = deployed.read().unwrap()[&version].clone();
//! let arguments: Arguments = serde_json::from_str(
//!     r#"{"args": [[{"customer": "a", "ts": "2026-09-01", "amount_cents": 300}]]}"#,
//! )?;
//! let policy = Policy::default();
//! let worker = {
//!     let sandbox = sandbox.clone();
//!     std::thread::spawn(move || {
//!         let request = Request {
//!             function: "process",
//!             arguments: &arguments,
//!             policy: &policy,
//!             record: true,
//!         };
//!         host::call::call(&sandbox, &prepared, &request)
//!     })
//! };
//! let finished = worker.join().unwrap()?;
//! if let Outcome::Returned(value) = &finished.outcome {
//!     println!("{value} from bundle {} in {:?}", finished.bundle, finished.timings.total);
//! }
//! let trace = finished.trace.expect("recorded");
//! std::fs::write("process.trace", &trace.bytes)?; // `host replay process.trace`
//!
//! // Undeploy: calls still running keep their `Arc`.
//! deployed.write().unwrap().remove(&version);
//! # Ok(())
//! # }
//! ```

pub mod cache;
pub mod error;
pub mod files;
pub mod policy;
pub mod progress;
pub mod runtime;

pub mod engine;
pub mod image;
pub(crate) mod memory;

pub mod door;
pub mod record;
pub mod sandbox;

pub mod bundle;
pub mod call;
pub mod extract;
pub mod neighbours;
pub mod notebook;
pub mod preinit;
pub mod replay;
pub mod trace;

pub mod evaluate;

pub mod serve;

pub mod cli;

pub use bundle::Bundle;
pub use call::{CallResult, Finished, Outcome, Request};
pub use door::{Arguments, GuestException};
pub use engine::Engine;
pub use error::{Exit, UserError};
pub use notebook::Notebook;
pub use policy::{Grant, LimitExceeded, Limits, Policy};
pub use preinit::Prepared;
pub use runtime::Runtime;
pub use sandbox::Sandbox;
