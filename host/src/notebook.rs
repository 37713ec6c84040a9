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
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
            UserError::BadInput(format!(
                "notebook `{}` is not valid JSON: {e}",
                path.display()
            ))
        })?;
        let value = match value.get("nbformat").and_then(serde_json::Value::as_u64) {
            Some(3) => upgrade_v3(value),
            Some(4) | None => value,
            Some(other) => {
                return Err(UserError::BadInput(format!(
                    "notebook `{}` is nbformat {other}; host reads nbformat 3 and 4: convert it \
                     with `jupyter nbconvert --to notebook --nbformat 4 {}`",
                    path.display(),
                    path.display()
                ))
                .into());
            }
        };
        let raw: RawNotebook = serde_json::from_value(value).map_err(|e| {
            UserError::BadInput(format!(
                "notebook `{}` is not an nbformat 4 notebook: {e}",
                path.display()
            ))
        })?;
        let sha256 = hex::encode(Sha256::digest(bytes));
        Self::from_raw(path, name, sha256, raw)
            .map_err(|e| UserError::BadInput(format!("notebook `{}` {e:#}", path.display())).into())
    }

    fn from_raw(path: &Path, name: String, sha256: String, raw: RawNotebook) -> Result<Notebook> {
        // `python`, and the `python3` or `Python 3` some front ends write.
        if let Some(language) = raw.metadata.language()
            && !language
                .get(..6)
                .is_some_and(|p| p.eq_ignore_ascii_case("python"))
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
                    // A cell type Jupyter would show but not run: it still counts.
                    RawCell::Other => (
                        CellKind::Raw,
                        SourceValue::String(String::new()),
                        RawCellMetadata::default(),
                    ),
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

    /// The folder it sits in, where its neighbours are looked for (`.` for a bare file name).
    pub fn folder(&self) -> &Path {
        match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        }
    }

    /// The code cells, in order.
    pub fn code_cells(&self) -> impl Iterator<Item = &Cell> {
        self.cells.iter().filter(|c| c.kind == CellKind::Code)
    }
}

/// An nbformat 3 notebook as nbformat 4, the way nbformat's own `upgrade` does it: the cells
/// of every worksheet in order, a code cell's `input` as its source, a heading cell as a
/// markdown cell `#`-prefixed by its level (the cell still counts, so numbers stay a reader's).
fn upgrade_v3(mut notebook: serde_json::Value) -> serde_json::Value {
    use serde_json::{Value, json};
    let worksheets = notebook
        .get_mut("worksheets")
        .map(Value::take)
        .unwrap_or_default();
    let mut cells = Vec::new();
    for mut worksheet in worksheets.as_array().cloned().unwrap_or_default() {
        let Some(Value::Array(sheet)) = worksheet.get_mut("cells").map(Value::take) else {
            continue;
        };
        for mut cell in sheet {
            let Some(fields) = cell.as_object_mut() else {
                continue;
            };
            match fields.get("cell_type").and_then(Value::as_str) {
                Some("code") => {
                    let input = fields.remove("input").unwrap_or(json!(""));
                    fields.insert("source".into(), input);
                }
                Some("heading") => {
                    let level = fields.get("level").and_then(Value::as_u64).unwrap_or(1);
                    let text = match fields.remove("source") {
                        Some(Value::String(s)) => s,
                        Some(Value::Array(lines)) => {
                            lines.iter().filter_map(Value::as_str).collect::<String>()
                        }
                        _ => String::new(),
                    };
                    let heading = format!(
                        "{} {}",
                        "#".repeat(level.clamp(1, 6) as usize),
                        text.replace('\n', " ")
                    );
                    fields.insert("cell_type".into(), json!("markdown"));
                    fields.insert("source".into(), json!(heading));
                }
                _ => {}
            }
            cells.push(cell);
        }
    }
    notebook["nbformat"] = json!(4);
    notebook["cells"] = Value::Array(cells);
    notebook
}

/// nbformat 4, as far as host reads it. Unknown fields are ignored, as Jupyter does.
#[derive(Debug, Deserialize)]
pub struct RawNotebook {
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
    #[serde(other)]
    Other,
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
    fn nbformat_3_is_read_as_its_upgrade_to_4() {
        let nb = parse(
            r##"{"nbformat":3,"nbformat_minor":0,"metadata":{"name":"old"},"worksheets":[
              {"cells":[{"cell_type":"heading","level":2,"source":["Data\n","prep"],"metadata":{}},
                        {"cell_type":"code","language":"python","input":["def f():\n","    return 1"],"outputs":[],"prompt_number":1,"metadata":{}}]},
              {"cells":[{"cell_type":"markdown","source":"text","metadata":{}},
                        {"cell_type":"code","language":"python","input":"g = 2","outputs":[],"metadata":{}}]}]}"##,
        )
        .unwrap();
        let cells: Vec<_> = nb
            .cells
            .iter()
            .map(|c| (c.number, c.kind, c.source.as_str()))
            .collect();
        assert_eq!(
            cells,
            [
                (1, CellKind::Markdown, "## Data prep"),
                (2, CellKind::Code, "def f():\n    return 1"),
                (3, CellKind::Markdown, "text"),
                (4, CellKind::Code, "g = 2"),
            ]
        );
    }

    #[test]
    fn unknown_cell_types_count_but_do_not_run() {
        let nb = parse(
            r#"{"nbformat":4,"metadata":{},"cells":[{"cell_type":"heading","source":"x"},{"cell_type":"code","source":"a = 1"}]}"#,
        )
        .unwrap();
        assert_eq!(nb.cells[0].kind, CellKind::Raw);
        assert_eq!(nb.cells[1].number, 2);
    }

    #[test]
    fn refuses_other_kernels_and_formats() {
        let r = parse(r#"{"nbformat":4,"metadata":{"kernelspec":{"language":"R"}},"cells":[]}"#);
        assert!(format!("{:#}", r.unwrap_err()).contains("R kernel"));
        let r =
            parse(r#"{"nbformat":4,"metadata":{"kernelspec":{"language":"python3"}},"cells":[]}"#);
        assert!(r.is_ok());
        let r = parse(r#"{"nbformat":5,"metadata":{},"cells":[]}"#);
        let message = format!("{:#}", r.unwrap_err());
        assert!(message.contains("is nbformat 5"), "{message}");
        assert!(message.contains("jupyter nbconvert --to notebook --nbformat 4"));
        let r = parse(r#"{"nbformat":4,"metadata":{},"cells":[{"cell_type":"code"}]}"#);
        assert!(format!("{:#}", r.unwrap_err()).contains("not an nbformat 4 notebook"));
        let r = parse("{not json");
        assert!(format!("{:#}", r.unwrap_err()).contains("not valid JSON"));
    }
}
