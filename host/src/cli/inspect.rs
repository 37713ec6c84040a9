//! `host inspect NOTEBOOK|BUNDLE`: what is kept and dropped, and why.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use serde_json::{Value, json};

use super::GlobalOptions;
use crate::bundle::{Bundle, Opened, short};
use crate::door::Module;
use crate::error::Exit;
use crate::extract::{self, Extraction, StatementSummary};
use crate::files::SigningKey;
use crate::neighbours;
use crate::notebook::{CellKind, Notebook};
use crate::sandbox::Sandbox;

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A notebook (.ipynb) or a bundle made by `host bundle`.
    pub path: PathBuf,
    /// Print JSON for machines instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn inspect(global: &GlobalOptions, args: &InspectArgs) -> Result<Exit> {
    let report = match Bundle::read(&args.path, SigningKey::from_env()?.as_ref())? {
        Opened::Bundle(bundle) => bundle_report(&bundle),
        Opened::Notebook(notebook) => {
            let (_engine, sandbox) = global.sandbox()?;
            notebook_report(
                &sandbox,
                &notebook,
                &Extraction::new(&notebook, extract::analyse(&sandbox, &notebook)?),
            )
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(Exit::Success)
}

/// The machine form of a notebook's inspection; `render` makes the text from it, so both
/// say the same.
fn notebook_report(sandbox: &Sandbox, notebook: &Notebook, extraction: &Extraction) -> Value {
    let mut analysed = extraction.analysis.cells.iter().enumerate().peekable();
    let mut cells = Vec::new();
    for cell in &notebook.cells {
        let kind = match cell.kind {
            CellKind::Code => "code",
            CellKind::Markdown => "markdown",
            CellKind::Raw => "raw",
        };
        let mut entry = json!({"cell": cell.number, "type": kind});
        if let Some((c, a)) = analysed.next_if(|(_, a)| a.index == cell.number) {
            let statements: Vec<StatementSummary> = (0..a.statements.len())
                .map(|s| extraction.summarize((c, s)))
                .collect();
            entry["statements"] = json!(statements);
            if let Some(magic) = &a.cell_magic {
                entry["dropped"] = json!(format!("starts with the cell magic {magic}"));
            }
            if let Some(problem) = &a.syntax_error {
                entry["dropped"] = json!(format!(
                    "does not parse: line {}: {}",
                    problem.line, problem.message
                ));
            }
        }
        cells.push(entry);
    }
    let functions: Vec<Value> = extraction
        .functions()
        .into_iter()
        .map(|f| {
            // The modules next to the notebook that the closure imports, as a bundle carries them.
            let closure = extraction.closure(f).and_then(|closure| {
                let modules = neighbours::gather(
                    sandbox,
                    notebook.folder(),
                    extraction,
                    &closure.statements,
                    &[],
                )?;
                Ok((closure, modules))
            });
            match closure {
                Ok((closure, modules)) => {
                    let modules: Vec<Value> = modules.iter().map(module_report).collect();
                    json!({"function": f, "closure": extraction.summary(&closure), "warnings": closure.warnings, "modules": modules})
                }
                Err(e) => json!({"function": f, "error": format!("{e:#}")}),
            }
        })
        .collect();
    json!({"notebook": notebook.name, "sha256": notebook.sha256, "cells": cells, "functions": functions})
}

fn bundle_report(bundle: &Bundle) -> Value {
    let m = &bundle.manifest;
    let functions: Vec<Value> = m
        .closures
        .iter()
        .map(|c| json!({"function": c.function, "closure": c.statements}))
        .collect();
    let kept: Vec<Value> = bundle
        .chunks
        .iter()
        .map(|c| {
            let lines: Vec<usize> = c
                .text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
                .map(|(i, _)| i + 1)
                .collect();
            json!({"cell": c.cell, "lines": lines})
        })
        .collect();
    let modules: Vec<Value> = bundle.modules.iter().map(module_report).collect();
    json!({"bundle": bundle.version, "manifest": m, "source_map": kept, "functions": functions, "modules": modules})
}

fn module_report(module: &Module) -> Value {
    json!({"module": module.name, "file": module.file, "sha256": module.sha256})
}

fn render(report: &Value) -> String {
    let mut out = String::new();
    let statement = |out: &mut String, s: &Value, with_cell: bool| {
        let lines = &s["lines"];
        let place = if lines[0] == lines[1] {
            format!("line {}", lines[0])
        } else {
            format!("lines {}-{}", lines[0], lines[1])
        };
        let place = if with_cell {
            format!("cell {}, {place}", s["cell"])
        } else {
            place
        };
        let verdict = if s["kept"] == json!(true) {
            "kept"
        } else {
            "dropped"
        };
        let _ = writeln!(
            out,
            "  {place:<22} {:<44} {verdict}: {}",
            clip(s["text"].as_str().unwrap_or("")),
            s["reason"].as_str().unwrap_or("")
        );
    };
    if let Some(version) = report["bundle"].as_str() {
        let m = &report["manifest"];
        let _ = writeln!(
            out,
            "bundle {} of {} (notebook sha256 {})",
            short(version),
            m["notebook"].as_str().unwrap_or(""),
            short(m["notebook_sha256"].as_str().unwrap_or(""))
        );
        let _ = writeln!(out, "  version  {version}");
        let _ = writeln!(
            out,
            "  runtime  {}",
            m["runtime_sha256"].as_str().unwrap_or("")
        );
        let _ = writeln!(
            out,
            "  created  {} by host {}",
            m["created"].as_str().unwrap_or(""),
            m["host_version"].as_str().unwrap_or("")
        );
        if let Some(label) = m["label"].as_str() {
            let _ = writeln!(out, "  label    {label}");
        }
        for module in report["modules"].as_array().into_iter().flatten() {
            module_line(&mut out, module);
        }
        for call in m["warm_up"].as_array().into_iter().flatten() {
            let _ = writeln!(
                out,
                "  warm-up  {}(*{}, **{}) before the image is saved",
                call["function"].as_str().unwrap_or(""),
                call["args"],
                call["kwargs"]
            );
        }
    } else {
        let cells = report["cells"].as_array().map(Vec::len).unwrap_or(0);
        let _ = writeln!(
            out,
            "{} (sha256 {}), {cells} cells",
            report["notebook"].as_str().unwrap_or(""),
            short(report["sha256"].as_str().unwrap_or(""))
        );
        for cell in report["cells"].as_array().into_iter().flatten() {
            let _ = write!(
                out,
                "cell {} {}",
                cell["cell"],
                cell["type"].as_str().unwrap_or("")
            );
            match cell["dropped"].as_str() {
                Some(why) => {
                    let _ = writeln!(out, ": dropped whole, {why}");
                }
                None => out.push('\n'),
            }
            for s in cell["statements"].as_array().into_iter().flatten() {
                statement(&mut out, s, false);
            }
        }
    }
    for f in report["functions"].as_array().into_iter().flatten() {
        let name = f["function"].as_str().unwrap_or("");
        match f["error"].as_str() {
            Some(error) => {
                let _ = writeln!(
                    out,
                    "\n{name}: cannot be called\n  {}",
                    error.replace('\n', "\n  ")
                );
            }
            None => {
                let closure = f["closure"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                let _ = writeln!(
                    out,
                    "\n{name} needs {} statement{}:",
                    closure.len(),
                    if closure.len() == 1 { "" } else { "s" }
                );
                for s in closure {
                    statement(&mut out, s, true);
                }
                for module in f["modules"].as_array().into_iter().flatten() {
                    module_line(&mut out, module);
                }
            }
        }
    }
    out
}

/// A module a bundle carries (or would carry), as `host inspect` lists it.
fn module_line(out: &mut String, module: &Value) {
    let _ = writeln!(
        out,
        "  module   {} from {} (sha256 {})",
        module["module"].as_str().unwrap_or(""),
        module["file"].as_str().unwrap_or(""),
        short(module["sha256"].as_str().unwrap_or(""))
    );
}

fn clip(text: &str) -> String {
    if text.chars().count() <= 44 {
        text.to_owned()
    } else {
        format!("{}…", text.chars().take(43).collect::<String>())
    }
}
