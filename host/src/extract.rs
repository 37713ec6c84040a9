//! Extraction: which statements of a notebook a function needs, and nothing else.
//!
//! The guest parses each code cell with the interpreter's own `ast` and `symtable` and says,
//! for every top-level statement, what kind it is, which names it binds and which globals it
//! reads ([`Analysis`]). Everything after that is here: the kept/dropped rule, the dependency
//! closure of a function, the refusal when the closure needs something only dropped code
//! binds, and the kept source, with every line at its original number so tracebacks point
//! into the notebook.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::door::{
    Analysis, AnalysisInput, CellSource, Chunk, Door, GUEST_SOURCE, GuestMessage, Kind, Script,
    Statement,
};
use crate::engine::write_cache_file;
use crate::error::bad_input;
use crate::notebook::Notebook;
use crate::policy::{Limits, Policy};
use crate::sandbox::{Ended, Sandbox};

impl Kind {
    pub fn is_kept(self) -> bool {
        matches!(
            self,
            Kind::Import | Kind::Definition | Kind::Constant | Kind::Export
        )
    }

    /// The reason shown to a user, e.g. by `host inspect`.
    pub fn reason(self) -> &'static str {
        match self {
            Kind::Import => "import",
            Kind::Definition => "definition",
            Kind::Constant => "ALL_CAPS constant",
            Kind::Export => "cell tagged export",
            Kind::Code => "top-level code",
            Kind::Magic => "IPython magic",
            Kind::Shell => "shell command",
        }
    }
}

/// Analyses a notebook's code cells in the sandbox. The answer depends only on the cells, the
/// guest code and the runtime, so it is cached on disk under their hash: a notebook is parsed
/// once per content, not once per call.
pub fn analyse(sandbox: &Sandbox, notebook: &Notebook) -> Result<Analysis> {
    let request = AnalysisInput {
        cells: notebook
            .code_cells()
            .map(|c| CellSource {
                index: c.number,
                source: &c.source,
                export: c.is_exported(),
            })
            .collect(),
    };
    let request_json = serde_json::to_vec(&request)?;
    let mut h = Sha256::new();
    h.update(sandbox.runtime().sha256());
    h.update(GUEST_SOURCE);
    h.update(&request_json);
    let cached = sandbox
        .cache_dir()
        .join("analysis")
        .join(format!("{}.json", hex::encode(h.finalize())));
    if let Ok(bytes) = std::fs::read(&cached)
        && let Ok(analysis) = serde_json::from_slice(&bytes)
    {
        return Ok(analysis);
    }
    // host's own code runs here, not the user's: generous limits, and no grants.
    let policy = Policy {
        limits: Limits {
            output: 1 << 30,
            ..Limits::default()
        },
        ..Policy::default()
    };
    let door = Door::default().input(&request);
    let run = sandbox
        .run(&policy, door, Script::Analyse)
        .with_context(|| format!("failed to analyse notebook `{}`", notebook.name))?;
    if run.ended != Ended::Finished {
        bail!(
            "analysing notebook `{}` did not finish: {:?}",
            notebook.name,
            run.ended
        );
    }
    let Some(GuestMessage::Output(analysis)) = run.door.received.into_iter().next() else {
        bail!(
            "the guest analysed `{}` but handed back no analysis",
            notebook.name
        );
    };
    // A cache that cannot be written only costs the next call a re-analysis.
    let _ = write_cache_file(&cached, &serde_json::to_vec(&analysis)?);
    Ok(analysis)
}

/// A statement's place: (position of its cell among the analysed cells, index in the cell).
/// Ordered as the notebook is.
pub type StatementId = (usize, usize);

/// A statement as `host inspect` and a bundle's manifest show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatementSummary {
    pub cell: usize,
    /// First and last line in the cell.
    pub lines: [usize; 2],
    pub kind: Kind,
    pub kept: bool,
    pub reason: String,
    pub binds: Vec<String>,
    /// The statement's first line of source.
    pub text: String,
}

/// A function's dependency closure: the statements to run, in notebook order.
#[derive(Debug, Clone)]
pub struct Closure {
    pub statements: BTreeSet<StatementId>,
    /// Things a user should know that do not stop the call.
    pub warnings: Vec<String>,
}

/// A notebook with its analysis: the input of every extraction question.
#[derive(Debug, Clone)]
pub struct Extraction {
    pub notebook: String,
    pub analysis: Analysis,
    /// The code cells' original text, by cell number: what messages quote.
    sources: HashMap<usize, String>,
    kept_binders: HashMap<String, Vec<StatementId>>,
    dropped_binders: HashMap<String, Vec<StatementId>>,
    star_imports: Vec<StatementId>,
}

impl Extraction {
    pub fn new(notebook: &Notebook, analysis: Analysis) -> Extraction {
        let mut kept_binders: HashMap<String, Vec<StatementId>> = HashMap::new();
        let mut dropped_binders: HashMap<String, Vec<StatementId>> = HashMap::new();
        let mut star_imports = Vec::new();
        for (c, cell) in analysis.cells.iter().enumerate() {
            for (s, stmt) in cell.statements.iter().enumerate() {
                let table = if stmt.kind.is_kept() {
                    &mut kept_binders
                } else {
                    &mut dropped_binders
                };
                for name in &stmt.binds {
                    table.entry(name.clone()).or_default().push((c, s));
                }
                if stmt.star_import && stmt.kind.is_kept() {
                    star_imports.push((c, s));
                }
            }
        }
        let sources = notebook
            .code_cells()
            .map(|c| (c.number, c.source.clone()))
            .collect();
        Extraction {
            notebook: notebook.name.clone(),
            analysis,
            sources,
            kept_binders,
            dropped_binders,
            star_imports,
        }
    }

    pub fn statement(&self, id: StatementId) -> &Statement {
        &self.analysis.cells[id.0].statements[id.1]
    }

    /// How a statement is shown to a user.
    pub fn summarize(&self, id: StatementId) -> StatementSummary {
        let stmt = self.statement(id);
        let cell = &self.analysis.cells[id.0];
        StatementSummary {
            cell: cell.index,
            lines: [stmt.span[0], stmt.span[2]],
            kind: stmt.kind,
            kept: stmt.kind.is_kept(),
            reason: stmt.kind.reason().to_owned(),
            binds: stmt.binds.clone(),
            text: self.first_line(id).to_owned(),
        }
    }

    /// The statements of a closure, in notebook order.
    pub fn summary(&self, closure: &Closure) -> Vec<StatementSummary> {
        closure
            .statements
            .iter()
            .map(|&id| self.summarize(id))
            .collect()
    }

    fn first_line(&self, id: StatementId) -> &str {
        let cell = &self.analysis.cells[id.0];
        let line = self.statement(id).span[0];
        self.sources
            .get(&cell.index)
            .and_then(|t| t.lines().nth(line.checked_sub(1)?))
            .map(str::trim)
            .unwrap_or_default()
    }

    fn cell_number(&self, id: StatementId) -> usize {
        self.analysis.cells[id.0].index
    }

    /// The functions `host run` can call: kept `def`s, each name once, in notebook order.
    pub fn functions(&self) -> Vec<&str> {
        let mut seen = HashSet::new();
        let mut names = Vec::new();
        for cell in &self.analysis.cells {
            for stmt in &cell.statements {
                if stmt.function
                    && stmt.kind.is_kept()
                    && let Some(name) = stmt.name.as_deref()
                    && seen.insert(name)
                {
                    names.push(name);
                }
            }
        }
        names
    }

    /// The statement a name resolves to: the last kept binding before `before` (for names read
    /// when a statement runs), or the last one anywhere (for names read when a function is
    /// called, by which time the whole module has run).
    fn resolve(&self, name: &str, before: Option<StatementId>) -> Option<StatementId> {
        let binders = self.kept_binders.get(name)?;
        match before {
            Some(limit) => binders.iter().rev().find(|&&id| id < limit).copied(),
            None => binders.last().copied(),
        }
    }

    /// The statements `function` needs, transitively: the definitions it references (their
    /// decorators, defaults and base classes count), and the imports and constants those use.
    ///
    /// Refuses, naming the global, the cell that binds it and the fix, when something needed
    /// is bound only by dropped code.
    pub fn closure(&self, function: &str) -> anyhow::Result<Closure> {
        let mut selected = BTreeSet::new();
        let mut warnings = Vec::new();
        // Who pulled a statement in, to explain a refusal as a chain (process -> helper).
        let mut parent: HashMap<StatementId, StatementId> = HashMap::new();
        let mut work = vec![self.function_statement(function)?];
        let builtins: HashSet<&str> = self.analysis.builtins.iter().map(String::as_str).collect();
        while let Some(id) = work.pop() {
            if !selected.insert(id) {
                continue;
            }
            let stmt = self.statement(id);
            if stmt.kind == Kind::Export {
                // A cell tagged `export` runs whole or not at all.
                let cell = &self.analysis.cells[id.0];
                work.extend((0..cell.statements.len()).map(|s| (id.0, s)));
            }
            if !stmt.magic_lines.is_empty() {
                warnings.push(format!(
                    "{}, cell {}: magic or shell lines inside `{}` (lines {}) are not run: IPython is not in the sandbox",
                    self.notebook,
                    self.cell_number(id),
                    stmt.name.as_deref().unwrap_or("a statement"),
                    join(stmt.magic_lines.iter()),
                ));
            }
            let uses = stmt
                .eager
                .iter()
                .map(|n| (n, Some(id)))
                .chain(stmt.lazy.iter().map(|n| (n, None)));
            for (name, before) in uses {
                if name.starts_with("__") && name.ends_with("__") {
                    continue; // module dunders (__name__, __file__) are set by the loader
                }
                let found = self
                    .resolve(name, before)
                    .or_else(|| self.resolve(name, None));
                if let Some(binder) = found {
                    parent.entry(binder).or_insert(id);
                    work.push(binder);
                } else if let Some(dropped) = self.dropped_binders.get(name) {
                    return Err(self.dropped_dependency(
                        name,
                        id,
                        *dropped.last().unwrap(),
                        &parent,
                    ));
                } else if builtins.contains(name.as_str()) {
                } else if !self.star_imports.is_empty() {
                    work.extend(self.star_imports.iter().copied());
                } else {
                    warnings.push(format!(
                        "{}, cell {}: `{name}` is not defined anywhere in the notebook; calling code that reads it raises NameError",
                        self.notebook,
                        self.cell_number(id),
                    ));
                }
            }
        }
        Ok(Closure {
            statements: selected,
            warnings,
        })
    }

    fn function_statement(&self, function: &str) -> anyhow::Result<StatementId> {
        let binders = self
            .kept_binders
            .get(function)
            .map(Vec::as_slice)
            .unwrap_or_default();
        if let Some(&id) = binders
            .iter()
            .rev()
            .find(|&&id| self.statement(id).function)
        {
            return Ok(id);
        }
        if let Some(&id) = binders.last() {
            return Err(bad_input(format!(
                "`{function}` in {}, cell {} is not a function (`def`); host calls functions only",
                self.notebook,
                self.cell_number(id)
            )));
        }
        let mut message = format!("{} defines no function `{function}`", self.notebook);
        if let Some(&id) = self.dropped_binders.get(function).and_then(|d| d.last()) {
            let cell = &self.analysis.cells[id.0];
            let why = cell
                .cell_magic
                .as_deref()
                .map(|m| format!("its cell starts with the cell magic `{m}`"));
            let why = why.unwrap_or_else(|| "it is top-level code".into());
            let _ = write!(
                message,
                " that host keeps: it is bound in cell {}, but {why}",
                cell.index
            );
        }
        for cell in &self.analysis.cells {
            if let Some(problem) = &cell.syntax_error {
                let _ = write!(
                    message,
                    "\n  cell {} does not parse (line {}: {}), so nothing in it is kept",
                    cell.index, problem.line, problem.message
                );
            }
        }
        let functions = self.functions();
        if functions.is_empty() {
            message.push_str("\n  it defines no functions at all");
        } else {
            let _ = write!(
                message,
                "\n  functions it defines: {}",
                functions.join(", ")
            );
        }
        Err(bad_input(message))
    }

    fn dropped_dependency(
        &self,
        name: &str,
        user: StatementId,
        binder: StatementId,
        parent: &HashMap<StatementId, StatementId>,
    ) -> anyhow::Error {
        let mut chain = vec![user];
        while let Some(&p) = parent.get(chain.last().unwrap()) {
            if chain.contains(&p) {
                break;
            }
            chain.push(p);
        }
        let names: Vec<String> = chain
            .iter()
            .rev()
            .map(|&id| match &self.statement(id).name {
                Some(n) => format!("`{n}`"),
                None => format!("cell {}", self.cell_number(id)),
            })
            .collect();
        let stmt = self.statement(binder);
        let cell = &self.analysis.cells[binder.0];
        let line = stmt.span[0];
        let text = self.first_line(binder);
        bad_input(format!(
            "{} uses the global `{name}`, which only dropped {} binds: {}, cell {}, line {line}: `{text}`\n  \
             host never runs top-level code. Tag cell {} `export` to keep it, or move that code into a function \
             (or make `{name}` an ALL_CAPS constant if it is one).",
            names.join(" -> "),
            stmt.kind.reason(),
            self.notebook,
            cell.index,
            cell.index,
        ))
    }

    /// The kept source: for each cell with a selected statement, its text with everything
    /// else replaced by spaces, so line and column numbers stay the notebook's.
    pub fn source(&self, closure: &Closure) -> Vec<Chunk> {
        let mut by_cell: BTreeMap<usize, Vec<[usize; 4]>> = BTreeMap::new();
        for &id in &closure.statements {
            by_cell
                .entry(id.0)
                .or_default()
                .push(self.statement(id).span);
        }
        by_cell
            .into_iter()
            .map(|(c, spans)| {
                let cell = &self.analysis.cells[c];
                Chunk {
                    cell: cell.index,
                    text: keep_spans(cell.text.as_deref().unwrap_or_default(), &spans),
                }
            })
            .collect()
    }
}

/// `text` with every byte outside `spans` turned into a space (newlines stay), trailing
/// blanks trimmed from each line.
fn keep_spans(text: &str, spans: &[[usize; 4]]) -> String {
    let mut out = String::with_capacity(text.len());
    let lines: Vec<&str> = text.split('\n').collect();
    let last_kept = spans.iter().map(|s| s[2]).max().unwrap_or(0);
    for (i, line) in lines.iter().enumerate().take(last_kept) {
        let number = i + 1;
        let bytes = line.as_bytes();
        let mut kept = vec![false; bytes.len()];
        for &[first, col, last, end_col] in spans {
            if number < first || number > last {
                continue;
            }
            let from = if number == first { col } else { 0 };
            let to = if number == last {
                end_col.min(bytes.len())
            } else {
                bytes.len()
            };
            for k in kept.iter_mut().take(to).skip(from) {
                *k = true;
            }
        }
        // Whole bytes are blanked, and spans start and end on token boundaries, so what
        // remains is valid UTF-8.
        let blanked: Vec<u8> = bytes
            .iter()
            .zip(&kept)
            .map(|(&b, &k)| if k { b } else { b' ' })
            .collect();
        out.push_str(String::from_utf8_lossy(&blanked).trim_end());
        out.push('\n');
    }
    out
}

fn join<T: std::fmt::Display>(items: impl Iterator<Item = T>) -> String {
    items.map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_statement_on_line_zero_is_summarized_not_a_panic() {
        // Found by `make fuzz` (door): an analysis whose span starts on line 0 (the guest's
        // or a cached analysis's word) underflowed `line - 1`.
        let analysis: Analysis = serde_json::from_value(serde_json::json!({
            "cells": [{"index": 1, "text": "def f():\n    pass\n", "statements": [{
                "span": [0, 0, 2, 8], "kind": "definition", "name": "f", "function": true,
                "binds": ["f"], "eager": [], "lazy": []}]}],
            "builtins": [],
        }))
        .unwrap();
        let notebook = Notebook {
            name: "n.ipynb".into(),
            path: "n.ipynb".into(),
            sha256: String::new(),
            cells: vec![crate::notebook::Cell {
                number: 1,
                kind: crate::notebook::CellKind::Code,
                source: "def f():\n    pass\n".into(),
                tags: Vec::new(),
            }],
        };
        let extraction = Extraction::new(&notebook, analysis);
        assert_eq!(extraction.summarize((0, 0)).text, "");
    }

    #[test]
    fn keep_spans_blanks_the_rest_and_keeps_line_numbers() {
        let text = "import os; df = load()\n\ndef f():\n    return os.sep\nprint(f())";
        let out = keep_spans(text, &[[1, 0, 1, 9], [3, 0, 4, 17]]);
        assert_eq!(out, "import os\n\ndef f():\n    return os.sep\n");
    }
}
