//! `host replay TRACE [--notebook UPDATED]`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::run::report;
use super::{GlobalOptions, escape_controls, print_guest, say};
use crate::bundle::short;
use crate::error::Exit;
use crate::files::SigningKey;
use crate::notebook::Notebook;
use crate::replay;
use crate::trace::Trace;

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// A trace written by `host run --record`.
    pub trace: PathBuf,
    /// Run this notebook's version of the function on the recorded inputs instead, and show
    /// how its result differs from the recorded one.
    #[arg(long, value_name = "UPDATED.ipynb")]
    pub notebook: Option<PathBuf>,
}

pub fn replay(global: &GlobalOptions, args: &ReplayArgs) -> Result<Exit> {
    let trace = Trace::read(&args.trace, SigningKey::from_env()?.as_ref())?;
    let notebook = args.notebook.as_deref().map(Notebook::read).transpose()?;
    let (_engine, sandbox) = global.sandbox()?;
    let h = &trace.header;
    match notebook {
        None => {
            let replayed = replay::replay(&sandbox, &trace)?;
            if let Some(divergence) = &replayed.divergence {
                say(divergence);
                return Ok(Exit::Diverged);
            }
            say(format_args!(
                "replay identical to the recording: {} events, bundle {}, {}() recorded {}",
                trace.events.len(),
                short(&h.bundle.version),
                h.function,
                h.recorded_at
            ));
            let result = replayed.result;
            report(result.outcome, [&result.stdout, &result.stderr], None)
        }
        Some(notebook) => {
            let what_if = replay::what_if(&sandbox, &trace, &notebook)?;
            let result = &what_if.result;
            print_guest(&result.stdout);
            print_guest(&result.stderr);
            let mut text = format!(
                "recorded ({} of bundle {}): {}\nupdated  ({} of bundle {}): {}\n",
                h.function,
                short(&h.bundle.version),
                what_if.recorded,
                h.function,
                short(&what_if.version),
                result.outcome.to_json()
            );
            for why in &what_if.unrecorded {
                text.push_str(&format!(
                    "note: the recording does not hold all the updated function read: {why}\n"
                ));
            }
            if !what_if.live.none() {
                text.push_str(&format!(
                    "note: {} (the updated function asked for more than the recorded call)\n",
                    what_if.live
                ));
            }
            if what_if.differences.is_empty() {
                text.push_str("no difference\n");
            } else {
                text.push_str("differences:\n");
                for d in &what_if.differences {
                    text.push_str(&format!("  {d}\n"));
                }
            }
            // The function's name comes from the trace, the differences' paths from the
            // guest's result: neither may drive the terminal.
            print!("{}", escape_controls(text.as_bytes()));
            Ok(Exit::Success)
        }
    }
}
