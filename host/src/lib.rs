//! host: call one function of a Jupyter notebook inside a WebAssembly sandbox.
//!
//! A call goes through the modules in this order:
//! [`notebook`] (read the `.ipynb`) → [`extract`] (keep what the function needs) →
//! [`bundle`] (the kept source and its manifest) → [`snapshot`] (its imports and definitions
//! run once) → [`sandbox`] (a fresh Wasmtime instance per call, with grants and limits, on the
//! [`engine`] and the Python [`runtime`]) → [`call`] (arguments in, value out).
//!
//! ```no_run
//! use host::bundle::Select;
//! use host::{Arguments, Bundle, Engine, Notebook, Outcome, Policy, Prepared, Runtime, Sandbox};
//!
//! # fn main() -> anyhow::Result<()> {
//! // One engine and sandbox per process: the interpreter is compiled once per machine and
//! // loaded once per process; every call gets a fresh instance, whose memory the engine
//! // keeps for the next call of the same bundle once it is reset to the bundle's image.
//! let engine = Engine::new(None)?;
//! let sandbox = Sandbox::new(&engine, &Runtime::locate(None)?)?;
//! let notebook = Notebook::read("notebooks/churn.ipynb".as_ref())?;
//! let bundle = Bundle::from_notebook(&sandbox, &notebook, Select::Only(&["process"]), None)?;
//! // Runs the bundle's imports and definitions once, and keeps the memory they leave.
//! let prepared = Prepared::new(&sandbox, bundle)?;
//! let args = Arguments::from_flags(
//!     Some(r#"[[{"customer": "a", "ts": "2026-09-01", "amount_cents": 300}]]"#),
//!     None,
//! )?;
//! for _ in 0..3 {
//!     let result = host::call::call(&sandbox, &Policy::default(), &prepared, "process", &args)?;
//!     if let Outcome::Returned(value) = result.outcome {
//!         println!("{value}");
//!     }
//! }
//! # Ok(())
//! # }
//! ```

pub mod bundle;
pub mod call;
pub mod cli;
pub mod engine;
pub mod error;
pub mod extract;
pub(crate) mod memory;
pub mod notebook;
pub mod progress;
pub mod replay;
pub mod runtime;
pub mod sandbox;
pub mod serve;
pub mod snapshot;
pub mod trace;

pub use bundle::Bundle;
pub use call::{Arguments, CallResult, GuestException, Outcome};
pub use engine::Engine;
pub use error::{Exit, UserError};
pub use notebook::Notebook;
pub use runtime::Runtime;
pub use sandbox::{Grant, LimitExceeded, Limits, Policy, Sandbox};
pub use snapshot::Prepared;
