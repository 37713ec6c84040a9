//! host: call one function of a Jupyter notebook inside a WebAssembly sandbox.
//!
//! A call goes through the modules in this order:
//! [`notebook`] (read the `.ipynb`) → [`extract`] (keep what the function needs) →
//! [`bundle`] (the kept source) → [`sandbox`] (a fresh Wasmtime instance with grants and
//! limits, on the [`engine`] and the Python [`runtime`]) → [`call`] (arguments in, value out).
//!
//! ```no_run
//! use host::{Arguments, Bundle, Engine, Notebook, Outcome, Policy, Runtime, Sandbox};
//!
//! # fn main() -> anyhow::Result<()> {
//! let engine = Engine::new(None)?;
//! let sandbox = Sandbox::new(&engine, &Runtime::locate(None)?)?;
//! let notebook = Notebook::read("notebooks/churn.ipynb".as_ref())?;
//! let bundle = Bundle::from_notebook(&sandbox, &notebook, &["process"])?;
//! let args = Arguments::from_flags(Some(r#"[[{"customer": "a", "amount": 3}]]"#), None)?;
//! let result = host::call::call(&sandbox, &Policy::default(), &bundle, "process", &args)?;
//! if let Outcome::Returned(value) = result.outcome {
//!     println!("{value}");
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
pub mod notebook;
pub mod progress;
pub mod runtime;
pub mod sandbox;

pub use bundle::Bundle;
pub use call::{Arguments, CallResult, GuestException, Outcome};
pub use engine::Engine;
pub use error::{Exit, UserError};
pub use notebook::Notebook;
pub use runtime::Runtime;
pub use sandbox::{Grant, LimitExceeded, Limits, Policy, Sandbox};
