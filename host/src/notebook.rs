//! Reading `.ipynb` files.
//!
//! The on-disk schema ([`RawNotebook`]) is plain serde types kept apart from the model the rest
//! of host uses ([`Notebook`]), so a schema quirk (a `source` that is a string or a list of
//! strings) is settled here once and never seen again.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::UserError;
use crate::files::{MAX_NOTEBOOK, read_regular};

/// A notebook as host uses it: its name, and its cells in order.
#[derive(Debug, Clone)]
pub struct Notebook {
    /// The file name (`churn.ipynb`): what tracebacks and messages call the notebook.
    pub name: String,
    /// Where it was read from.
    pub path: PathBuf,
    /// sha256 of the file's bytes.
    pub sha256: String,
    /// Every cell, markdown and raw included, so cell numbers match what a user counts.
    pub cells: Vec<Cell>,
}

/// One cell. `number` counts from 1 over all cells of the notebook, the way a reader counts
/// them top to bottom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cell {
    pub number: usize,
    pub kind: CellKind,
    pub source: String,
    pub tags: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CellKind {
    Code,
    Markdown,
    Raw,
}

impl Cell {
    /// A cell tagged `export` is kept whole, whatever its statements are.
    pub fn is_exported(&self) -> bool {
        self.tags.iter().any(|t| t == "export")
    }
}

impl Notebook {
    /// Reads and checks a notebook file.
    ///
    /// Every failure is a [`UserError::BadInput`] naming the file and what is wrong with it;
    /// anything but a regular file of at most [`MAX_NOTEBOOK`] bytes is refused unread.
    pub fn read(path: &Path) -> Result<Notebook> {
        let bytes = read_regular(path, "notebook", MAX_NOTEBOOK)?;
        Self::parse(path, &bytes)
    }

    /// Parses notebook bytes; `path` is only used to name the notebook in messages.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Notebook> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        let raw: RawNotebook = serde_json::from_slice(bytes).map_err(|e| {
            let what = if e.is_data() {
                "is not an nbformat 4 notebook"
            } else {
                "is not valid JSON"
            };
            UserError::BadInput(format!("notebook `{}` {what}: {e}", path.display()))
        })?;
        let sha256 = hex::encode(Sha256::digest(bytes));
        Self::from_raw(path, name, sha256, raw)
            .map_err(|e| UserError::BadInput(format!("notebook `{}` {e:#}", path.display())).into())
    }

    fn from_raw(path: &Path, name: String, sha256: String, raw: RawNotebook) -> Result<Notebook> {
        if raw.nbformat != 4 {
            bail!(
                "is nbformat {}; host reads nbformat 4 (re-save it with a current Jupyter)",
                raw.nbformat
            );
        }
        if let Some(language) = raw.metadata.language()
            && !language.eq_ignore_ascii_case("python")
        {
            bail!("has a {language} kernel; host runs Python notebooks only");
        }
        let cells = raw
            .cells
            .into_iter()
            .enumerate()
            .map(|(i, cell)| {
                let (kind, source, metadata) = match cell {
                    RawCell::Code { source, metadata } => (CellKind::Code, source, metadata),
                    RawCell::Markdown { source, metadata } => {
                        (CellKind::Markdown, source, metadata)
                    }
                    RawCell::Raw { source, metadata } => (CellKind::Raw, source, metadata),
                };
                Cell {
                    number: i + 1,
                    kind,
                    source: source.joined(),
                    tags: metadata.tags,
                }
            })
            .collect();
        Ok(Notebook {
            name,
            path: path.to_owned(),
            sha256,
            cells,
        })
    }

    /// The code cells, in order.
    pub fn code_cells(&self) -> impl Iterator<Item = &Cell> {
        self.cells.iter().filter(|c| c.kind == CellKind::Code)
    }
}

/// nbformat 4, as far as host reads it. Unknown fields are ignored, as Jupyter does.
#[derive(Debug, Deserialize)]
pub struct RawNotebook {
    pub nbformat: u32,
    #[serde(default)]
    pub metadata: RawMetadata,
    pub cells: Vec<RawCell>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawMetadata {
    #[serde(default)]
    pub kernelspec: Option<RawKernelspec>,
    #[serde(default)]
    pub language_info: Option<RawLanguageInfo>,
}

impl RawMetadata {
    /// The kernel's language: `kernelspec.language`, else `language_info.name`.
    fn language(&self) -> Option<&str> {
        self.kernelspec
            .as_ref()
            .and_then(|k| k.language.as_deref())
            .or_else(|| self.language_info.as_ref().and_then(|l| l.name.as_deref()))
    }
}

#[derive(Debug, Deserialize)]
pub struct RawKernelspec {
    #[serde(default)]
    pub language: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RawLanguageInfo {
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "cell_type", rename_all = "lowercase")]
pub enum RawCell {
    Code {
        source: SourceValue,
        #[serde(default)]
        metadata: RawCellMetadata,
    },
    Markdown {
        source: SourceValue,
        #[serde(default)]
        metadata: RawCellMetadata,
    },
    Raw {
        source: SourceValue,
        #[serde(default)]
        metadata: RawCellMetadata,
    },
}

#[derive(Debug, Default, Deserialize)]
pub struct RawCellMetadata {
    #[serde(default)]
    pub tags: Vec<String>,
}

/// nbformat allows a cell's source as one string or as a list of lines (each keeping its
/// newline).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum SourceValue {
    String(String),
    Lines(Vec<String>),
}

impl SourceValue {
    fn joined(self) -> String {
        match self {
            SourceValue::String(s) => s,
            SourceValue::Lines(lines) => lines.concat(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Notebook> {
        Notebook::parse(Path::new("t.ipynb"), json.as_bytes())
    }

    #[test]
    fn source_as_string_or_lines() {
        let nb = parse(
            r##"{"nbformat":4,"nbformat_minor":5,"metadata":{},"cells":[
              {"cell_type":"markdown","source":"# title","metadata":{}},
              {"cell_type":"code","source":["a = 1\n","b = 2"],"metadata":{"tags":["export"]},"outputs":[],"execution_count":null},
              {"cell_type":"code","source":"c = 3","metadata":{},"outputs":[],"execution_count":1}]}"##,
        )
        .unwrap();
        assert_eq!(nb.cells.len(), 3);
        assert_eq!(nb.cells[1].source, "a = 1\nb = 2");
        assert!(nb.cells[1].is_exported());
        assert_eq!(nb.cells[2].number, 3);
        assert_eq!(nb.code_cells().count(), 2);
    }

    #[test]
    fn refuses_other_kernels_and_formats() {
        let r = parse(r#"{"nbformat":4,"metadata":{"kernelspec":{"language":"R"}},"cells":[]}"#);
        assert!(format!("{:#}", r.unwrap_err()).contains("R kernel"));
        let r = parse(r#"{"nbformat":3,"metadata":{},"cells":[]}"#);
        assert!(format!("{:#}", r.unwrap_err()).contains("nbformat 3"));
        let r = parse(r#"{"nbformat":4,"metadata":{},"cells":[{"cell_type":"code"}]}"#);
        assert!(format!("{:#}", r.unwrap_err()).contains("not an nbformat 4 notebook"));
        let r = parse("{not json");
        assert!(format!("{:#}", r.unwrap_err()).contains("not valid JSON"));
    }
}
