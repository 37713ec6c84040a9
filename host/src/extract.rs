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

use crate::cache;
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
        .cache()
        .folder("analysis")?
        .join(format!("{}.json", hex::encode(h.finalize())));
    if let Some(file) = cache::open_file(&cached)?
        && let Ok(analysis) = serde_json::from_reader(std::io::BufReader::new(file))
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
    /// Refuses, naming every global needed that only dropped code binds, each with every
    /// statement that binds it and the fix.
    pub fn closure(&self, function: &str) -> anyhow::Result<Closure> {
        self.closure_from(vec![self.function_statement(function)?])
    }

    /// What a notebook imported as a module needs: the closure of every kept statement whose
    /// own closure can be extracted (the others are left out, with a warning), never its
    /// top-level code.
    pub fn closure_of_everything_kept(&self) -> Closure {
        let mut all = Closure {
            statements: BTreeSet::new(),
            warnings: Vec::new(),
        };
        for id in self.all_statements() {
            if !self.statement(id).kind.is_kept() || all.statements.contains(&id) {
                continue;
            }
            match self.closure_from(vec![id]) {
                Ok(closure) => {
                    all.statements.extend(closure.statements);
                    all.warnings.extend(closure.warnings);
                }
                Err(why) => all.warnings.push(format!(
                    "{} is left out of the module {}: {why:#}",
                    self.place(id),
                    self.notebook
                )),
            }
        }
        all
    }

    /// Every statement of every analysed cell.
    pub fn all_statements(&self) -> BTreeSet<StatementId> {
        self.analysis
            .cells
            .iter()
            .enumerate()
            .flat_map(|(c, cell)| (0..cell.statements.len()).map(move |s| (c, s)))
            .collect()
    }

    /// Where a statement is, as messages name it: `nb.ipynb, cell 3, line 1`.
    pub fn place(&self, id: StatementId) -> String {
        format!(
            "{}, cell {}, line {}",
            self.notebook,
            self.cell_number(id),
            self.statement(id).span[0]
        )
    }

    /// The closure of the statements `work`, see [`Extraction::closure`].
    fn closure_from(&self, mut work: Vec<StatementId>) -> anyhow::Result<Closure> {
        let mut selected = BTreeSet::new();
        let mut warnings = Vec::new();
        // Who pulled a statement in, to explain a refusal as a chain (process -> helper).
        let mut parent: HashMap<StatementId, StatementId> = HashMap::new();
        // Globals only dropped code binds, each with the first statement found using it.
        let mut dropped: BTreeMap<&str, StatementId> = BTreeMap::new();
        let builtins: HashSet<&str> = self.analysis.builtins.iter().map(String::as_str).collect();
        while let Some(id) = work.pop() {
            if !selected.insert(id) {
                continue;
            }
            let stmt = self.statement(id);
            if stmt.kind == Kind::Export {
                // A cell tagged `export` runs whole or not at all: every statement of it that
                // Python can run (not its magics, nor what IPython awaits at the top level).
                let cell = &self.analysis.cells[id.0];
                work.extend(
                    (0..cell.statements.len())
                        .map(|s| (id.0, s))
                        .filter(|&s| self.statement(s).kind.is_kept()),
                );
            }
            if !stmt.magic_lines.is_empty() {
                warnings.push(format!(
                    "{}, cell {}: magic or shell lines inside `{}` (lines {}) raise an error if reached: IPython is not in the sandbox",
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
                } else if self.dropped_binders.contains_key(name) {
                    // Every such global is collected, so one refusal names them all.
                    dropped.entry(name.as_str()).or_insert(id);
                } else if builtins.contains(name.as_str()) {
                } else if let Some(stars) = self.star_imports_binding(name) {
                    work.extend(stars);
                } else {
                    warnings.push(format!(
                        "{}, cell {}: `{name}` is not defined anywhere in the notebook; calling code that reads it raises NameError",
                        self.notebook,
                        self.cell_number(id),
                    ));
                }
            }
        }
        if !dropped.is_empty() {
            return Err(self.dropped_dependencies(&dropped, &parent));
        }
        Ok(Closure {
            statements: selected,
            warnings,
        })
    }

    /// The kept star imports that may bind `name` (their module's names list it, or they are
    /// not known), or `None` when no star import can.
    fn star_imports_binding(&self, name: &str) -> Option<Vec<StatementId>> {
        let stars: Vec<StatementId> = self
            .star_imports
            .iter()
            .copied()
            .filter(|&id| {
                self.statement(id)
                    .star_names
                    .as_ref()
                    .is_none_or(|names| names.iter().any(|n| n == name))
            })
            .collect();
        (!stars.is_empty()).then_some(stars)
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

    /// The refusal for globals only dropped code binds: each global, who uses it (as a chain
    /// from the function), every statement that binds it, and the fix.
    fn dropped_dependencies(
        &self,
        dropped: &BTreeMap<&str, StatementId>,
        parent: &HashMap<StatementId, StatementId>,
    ) -> anyhow::Error {
        let mut message = String::new();
        for (&name, &user) in dropped {
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
            if !message.is_empty() {
                message.push('\n');
            }
            let _ = writeln!(
                message,
                "{} uses the global `{name}`, which only dropped code binds:",
                names.join(" -> ")
            );
            let binders = &self.dropped_binders[name];
            let mut cells: Vec<usize> = Vec::new();
            for &binder in binders {
                let stmt = self.statement(binder);
                let cell = self.cell_number(binder);
                if !cells.contains(&cell) {
                    cells.push(cell);
                }
                let _ = writeln!(
                    message,
                    "  {}, cell {cell}, line {}: `{}` ({})",
                    self.notebook,
                    stmt.span[0],
                    self.first_line(binder),
                    stmt.kind.reason(),
                );
            }
            let cells = match cells.as_slice() {
                [one] => format!("cell {one}"),
                [init @ .., last] => format!("cells {} and {last}", join(init.iter())),
                [] => unreachable!("a dropped global has a binder"),
            };
            let constant = if is_all_caps(name) {
                String::new()
            } else {
                format!(" (or make `{name}` an ALL_CAPS constant if it is one)")
            };
            let _ = write!(
                message,
                "  Tag {cells} `export` to keep it, or move that code into a function{constant}."
            );
        }
        message.push_str(
            "\nhost never runs top-level code, IPython magics or shell lines; definitions, imports and ALL_CAPS constants are kept.",
        );
        bad_input(message)
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

/// Whether Python's `str.isupper()` holds: every cased character upper case, and at least
/// one, so `ÄNDERUNG` and `MAX_2` are constants.
fn is_all_caps(name: &str) -> bool {
    name.chars().any(char::is_uppercase) && !name.chars().any(char::is_lowercase)
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
    fn all_caps_is_pythons_isupper() {
        for name in ["LIMIT", "MAX_2", "_PRIVATE", "ÄNDERUNG", "ΣUM"] {
            assert!(is_all_caps(name), "{name}");
        }
        for name in ["Limit", "max", "_", "__2", "Änderung"] {
            assert!(!is_all_caps(name), "{name}");
        }
    }

    #[test]
    fn keep_spans_blanks_the_rest_and_keeps_line_numbers() {
        let text = "import os; df = load()\n\ndef f():\n    return os.sep\nprint(f())";
        let out = keep_spans(text, &[[1, 0, 1, 9], [3, 0, 4, 17]]);
        assert_eq!(out, "import os\n\ndef f():\n    return os.sep\n");
    }

    /// A statement as the guest would report it: `kind`, what it binds, the globals it reads
    /// when it runs and those it reads when a function it defines is called. A `def` binds
    /// its own name.
    fn stmt(kind: Kind, binds: &[&str], eager: &[&str], lazy: &[&str]) -> Statement {
        let strings = |names: &[&str]| names.iter().map(|n| n.to_string()).collect();
        let function = kind == Kind::Definition && binds.len() == 1;
        Statement {
            span: [1, 0, 1, 1],
            kind,
            name: function.then(|| binds[0].to_owned()),
            function,
            binds: strings(binds),
            star_import: false,
            eager: strings(eager),
            lazy: strings(lazy),
            magic_lines: Vec::new(),
            star_names: None,
            imports: Vec::new(),
            missing: Vec::new(),
        }
    }

    /// An extraction of hand-written cells (numbered from 1), each a list of statements.
    fn extraction(cells: Vec<Vec<Statement>>) -> Extraction {
        let notebook = Notebook {
            name: "nb.ipynb".into(),
            path: "nb.ipynb".into(),
            sha256: String::new(),
            cells: (1..=cells.len())
                .map(|number| crate::notebook::Cell {
                    number,
                    kind: crate::notebook::CellKind::Code,
                    source: format!("# cell {number}"),
                    tags: Vec::new(),
                })
                .collect(),
        };
        let analysis = Analysis {
            cells: cells
                .into_iter()
                .enumerate()
                .map(|(i, statements)| CellAnalysis {
                    index: i + 1,
                    text: Some(format!("# cell {}", i + 1)),
                    cell_magic: None,
                    syntax_error: None,
                    statements,
                })
                .collect(),
            builtins: vec!["len".into(), "print".into()],
        };
        Extraction::new(&notebook, analysis)
    }

    fn kept(extraction: &Extraction, function: &str) -> Vec<StatementId> {
        let closure = extraction.closure(function).unwrap();
        closure.statements.into_iter().collect()
    }

    use crate::door::{CellAnalysis, Statement};

    #[test]
    fn a_closure_takes_what_its_function_reads_transitively_and_nothing_else() {
        let x = extraction(vec![
            vec![
                stmt(Kind::Import, &["pd"], &[], &[]),
                stmt(Kind::Import, &["np"], &[], &[]),
            ],
            vec![stmt(Kind::Code, &["df"], &["pd"], &[])],
            vec![stmt(Kind::Definition, &["helper"], &[], &["np", "len"])],
            vec![stmt(
                Kind::Definition,
                &["process"],
                &[],
                &["helper", "RATE"],
            )],
            vec![stmt(Kind::Constant, &["RATE"], &[], &[])],
        ]);
        // `RATE` is bound after `process` is defined: a lazy read sees the whole module.
        assert_eq!(kept(&x, "process"), [(0, 1), (2, 0), (3, 0), (4, 0)]);
        assert!(x.closure("process").unwrap().warnings.is_empty());
        assert_eq!(kept(&x, "helper"), [(0, 1), (2, 0)]);
    }

    #[test]
    fn an_eager_read_resolves_to_the_binding_before_it() {
        let x = extraction(vec![
            vec![stmt(Kind::Constant, &["SCALE"], &[], &[])],
            vec![stmt(Kind::Definition, &["f"], &["SCALE"], &[])],
            vec![stmt(Kind::Constant, &["SCALE"], &[], &[])],
        ]);
        // A default argument (eager) reads the SCALE of cell 1; the later one is not needed.
        assert_eq!(kept(&x, "f"), [(0, 0), (1, 0)]);
    }

    #[test]
    fn a_global_only_dropped_code_binds_is_refused_with_the_chain_and_the_fix() {
        let x = extraction(vec![
            vec![stmt(Kind::Code, &["seen"], &[], &[])],
            vec![stmt(Kind::Definition, &["helper"], &[], &["seen"])],
            vec![stmt(Kind::Definition, &["process"], &[], &["helper"])],
        ]);
        let message = format!("{:#}", x.closure("process").unwrap_err());
        for needle in [
            "`process` -> `helper` uses the global `seen`",
            "top-level code",
            "nb.ipynb, cell 1, line 1",
            "Tag cell 1 `export`",
        ] {
            assert!(message.contains(needle), "{needle:?} not in {message}");
        }
    }

    #[test]
    fn an_unresolved_name_pulls_in_star_imports_or_is_a_warning() {
        let mut star = stmt(Kind::Import, &[], &[], &[]);
        star.star_import = true;
        let x = extraction(vec![
            vec![star],
            vec![stmt(Kind::Definition, &["f"], &[], &["mystery", "print"])],
        ]);
        assert_eq!(kept(&x, "f"), [(0, 0), (1, 0)]);

        let x = extraction(vec![vec![stmt(
            Kind::Definition,
            &["f"],
            &[],
            &["mystery", "print"],
        )]]);
        let closure = x.closure("f").unwrap();
        assert_eq!(closure.warnings.len(), 1, "{:?}", closure.warnings);
        assert!(closure.warnings[0].contains("`mystery` is not defined anywhere"));
    }

    #[test]
    fn an_exported_cell_is_kept_whole() {
        let x = extraction(vec![
            vec![
                stmt(Kind::Export, &["model"], &[], &[]),
                stmt(Kind::Export, &["unused"], &[], &[]),
            ],
            vec![stmt(Kind::Definition, &["predict"], &[], &["model"])],
        ]);
        assert_eq!(kept(&x, "predict"), [(0, 0), (0, 1), (1, 0)]);
    }

    #[test]
    fn only_defs_are_callable() {
        let x = extraction(vec![vec![
            stmt(Kind::Definition, &["f"], &[], &[]),
            stmt(Kind::Constant, &["LIMIT"], &[], &[]),
        ]]);
        assert_eq!(x.functions(), ["f"]);
        let message = format!("{:#}", x.closure("LIMIT").unwrap_err());
        assert!(message.contains("is not a function"), "{message}");
        let message = format!("{:#}", x.closure("g").unwrap_err());
        assert!(message.contains("defines no function `g`"), "{message}");
        assert!(message.contains("functions it defines: f"), "{message}");
    }
}
