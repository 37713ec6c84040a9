//! A bundle: the source a set of functions needs, extracted from a notebook, ready to load
//! into the interpreter.

use anyhow::Result;
use serde::Serialize;

use crate::error::bad_input;
use crate::extract::{self, Chunk, Extraction};
use crate::notebook::Notebook;
use crate::sandbox::Sandbox;

/// Extracted source and what it offers.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// The notebook's file name, which tracebacks show.
    pub notebook: String,
    /// The functions this bundle can call.
    pub functions: Vec<String>,
    /// The kept source, cell by cell.
    pub chunks: Vec<Chunk>,
    /// What extraction noticed that does not stop a call.
    pub warnings: Vec<String>,
}

/// What the guest's `load()` asks for.
#[derive(Serialize)]
pub struct LoadRequest<'a> {
    notebook: &'a str,
    chunks: &'a [Chunk],
}

impl Bundle {
    /// Extracts `functions` (and what they need) from `notebook`.
    pub fn from_notebook(
        sandbox: &Sandbox,
        notebook: &Notebook,
        functions: &[&str],
    ) -> Result<Bundle> {
        let analysis = extract::analyse(sandbox, notebook)?;
        let extraction = Extraction::new(notebook, analysis);
        Self::from_extraction(&extraction, functions)
    }

    /// The bundle of `functions` from an analysed notebook.
    pub fn from_extraction(extraction: &Extraction, functions: &[&str]) -> Result<Bundle> {
        let closure = extraction.closure_of(functions)?;
        Ok(Bundle {
            notebook: extraction.notebook.clone(),
            functions: functions.iter().map(|f| f.to_string()).collect(),
            chunks: extraction.source(&closure),
            warnings: closure.warnings,
        })
    }

    pub fn load_request(&self) -> LoadRequest<'_> {
        LoadRequest {
            notebook: &self.notebook,
            chunks: &self.chunks,
        }
    }

    /// Refuses a function the bundle was not made for.
    pub fn check_function(&self, function: &str) -> Result<()> {
        if self.functions.iter().any(|f| f == function) {
            return Ok(());
        }
        Err(bad_input(format!(
            "this bundle of {} offers {}, not `{function}`",
            self.notebook,
            self.functions.join(", ")
        )))
    }
}
