//! A notebook's neighbours: the modules it imports that the runtime does not have but that
//! sit next to it (a `helpers.py`, a package folder `utils/`, a sibling notebook
//! `other.ipynb`), and the modules of pure-Python wheels given with `--wheel`. They are
//! carried in the bundle, so a bundle still needs nothing else to run.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::door::Kind;
use crate::door::{Module, ModuleChunk};
use crate::error::bad_input;
use crate::extract::{self, Extraction, StatementId};
use crate::notebook::{Cell, CellKind, Notebook};
use crate::sandbox::Sandbox;

impl Module {
    fn new(name: String, file: String, package: bool, chunks: Vec<ModuleChunk>) -> Module {
        let mut h = Sha256::new();
        for chunk in &chunks {
            h.update(chunk.cell.unwrap_or(0).to_le_bytes());
            h.update(chunk.text.as_bytes());
        }
        Module {
            name,
            file,
            package,
            chunks,
            sha256: hex::encode(h.finalize()),
        }
    }
}

/// A pure-Python wheel, read and checked: its modules.
#[derive(Debug, Clone)]
pub struct Wheel {
    pub modules: Vec<Module>,
}

impl Wheel {
    /// Reads a wheel; refuses one that holds compiled code, which the sandbox cannot load.
    pub fn read(path: &Path) -> Result<Wheel> {
        let bytes = std::fs::read(path)
            .map_err(|e| bad_input(format!("cannot read wheel `{}`: {e}", path.display())))?;
        let label = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let files = unzip(&bytes).map_err(|e| {
            bad_input(format!(
                "wheel `{}` is not a zip file: {e:#}",
                path.display()
            ))
        })?;
        let compiled: Vec<&str> = files
            .keys()
            .map(String::as_str)
            .filter(|n| {
                [".so", ".pyd", ".dylib", ".dll"]
                    .iter()
                    .any(|e| n.ends_with(e))
                    || n.contains(".so.")
            })
            .collect();
        let wheel_meta = files
            .iter()
            .find(|(n, _)| n.ends_with(".dist-info/WHEEL") && n.matches('/').count() == 1)
            .map(|(_, b)| String::from_utf8_lossy(b).into_owned());
        let Some(wheel_meta) = wheel_meta else {
            return Err(bad_input(format!(
                "`{}` is not a wheel: it has no `*.dist-info/WHEEL`",
                path.display()
            )));
        };
        let purelib = wheel_meta.lines().any(|l| {
            l.replace(' ', "")
                .eq_ignore_ascii_case("Root-Is-Purelib:true")
        });
        if !compiled.is_empty() || !purelib {
            let why = match compiled.first() {
                Some(file) => format!("it holds compiled code (`{file}`)"),
                None => "its WHEEL file does not say `Root-Is-Purelib: true`".to_owned(),
            };
            return Err(bad_input(format!(
                "wheel `{}` cannot be bundled: {why}. The sandbox runs CPython compiled to WebAssembly, \
                 which cannot load native extensions built for another machine; only pure-Python wheels \
                 (`py3-none-any`) can be bundled",
                path.display()
            )));
        }
        let mut sources = BTreeMap::new();
        for (name, content) in &files {
            // `NAME-VERSION.data/purelib/...` installs at the root, like the rest.
            let installed = match name.split_once(".data/purelib/") {
                Some((_, rest)) => rest,
                None if name.split('/').next().is_some_and(|t| t.ends_with(".data")) => continue,
                None => name.as_str(),
            };
            if installed.ends_with(".py") && !installed.starts_with('.') {
                let text = String::from_utf8(content.clone()).map_err(|_| {
                    bad_input(format!("wheel `{}`: `{name}` is not UTF-8", path.display()))
                })?;
                sources.insert(installed.to_owned(), text);
            }
        }
        Ok(Wheel {
            modules: modules_of_files(&sources, &format!("{label}:")),
        })
    }

    /// The top-level names its modules are imported by.
    fn provides(&self, top: &str) -> bool {
        self.modules
            .iter()
            .any(|m| m.name.split('.').next() == Some(top))
    }
}

/// The modules of a set of `.py` files (paths relative to a root, `/`-separated): each file is
/// a module, `__init__.py` makes its folder a package, and a folder without one is a
/// namespace package, so its submodules import as they would from a real folder.
fn modules_of_files(sources: &BTreeMap<String, String>, prefix: &str) -> Vec<Module> {
    let mut modules = Vec::new();
    let mut packages = BTreeSet::new();
    for (path, text) in sources {
        let stem = path.trim_end_matches(".py");
        let parts: Vec<&str> = stem.split('/').collect();
        for i in 1..parts.len() {
            packages.insert(parts[..i].join("."));
        }
        let (name, package) = match parts.split_last() {
            Some((&"__init__", init)) => (init.join("."), true),
            _ => (parts.join("."), false),
        };
        if name.is_empty() {
            continue;
        }
        modules.push(Module::new(
            name,
            format!("{prefix}{path}"),
            package,
            vec![ModuleChunk {
                cell: None,
                text: text.clone(),
            }],
        ));
    }
    for package in packages {
        if !modules.iter().any(|m| m.name == package) {
            let folder = format!("{prefix}{}/", package.replace('.', "/"));
            modules.push(Module::new(package, folder, true, Vec::new()));
        }
    }
    modules.sort_by(|a, b| a.name.cmp(&b.name));
    modules
}

/// One import of a top-level module, and where it was written, for messages.
struct Importer {
    place: String,
    /// Whether the runtime lacks the module.
    missing: bool,
    /// A top-level `import` statement runs when the bundle loads, so a missing module must be
    /// found; an import inside a function or a `try` only when reached.
    required: bool,
}

/// The modules the statements `selected` of `extraction` import from next to the notebook (in
/// `folder`) or from `wheels`, with what those import in turn. As in Jupyter, where the
/// notebook's folder comes first on `sys.path`, a `.py` file or a package (a folder with an
/// `__init__.py`) there is imported even when the runtime has a module of that name; a
/// namespace folder or a sibling notebook only when it has not. A required import of a missing
/// module found nowhere is an error naming the module and where host looked.
pub fn gather(
    sandbox: &Sandbox,
    folder: &Path,
    extraction: &Extraction,
    selected: &BTreeSet<StatementId>,
    wheels: &[Wheel],
) -> Result<Vec<Module>> {
    let mut found: Vec<Module> = wheels.iter().flat_map(|w| w.modules.clone()).collect();
    let mut done: BTreeSet<String> = BTreeSet::new();
    let mut work = imports(extraction, selected, |id| extraction.place(id));
    while let Some((top, importer)) = work.pop() {
        if done.contains(&top) || wheels.iter().any(|w| w.provides(&top)) {
            continue;
        }
        let py = folder.join(format!("{top}.py"));
        let package = folder.join(&top);
        let notebook = folder.join(format!("{top}.ipynb"));
        let (modules, more) = if py.is_file() {
            let sources = BTreeMap::from([(format!("{top}.py"), read_source(&py)?)]);
            python_files(sandbox, &sources)?
        } else if package.join("__init__.py").is_file() || (importer.missing && package.is_dir()) {
            let (mut modules, more) = python_files(sandbox, &package_sources(folder, &package)?)?;
            if !modules.iter().any(|m| m.name == top) {
                // A folder with no module at its top still imports, as a namespace package.
                modules.push(Module::new(
                    top.clone(),
                    format!("{top}/"),
                    true,
                    Vec::new(),
                ));
            }
            (modules, more)
        } else if !importer.missing {
            continue;
        } else if notebook.is_file() {
            sibling_notebook(sandbox, &top, &notebook)?
        } else if importer.required {
            return Err(bad_input(format!(
                "{} imports `{top}`, which the runtime does not have, and host found no `{top}.py`, \
                 `{top}/` or `{top}.ipynb` in `{}`, nor a wheel given with --wheel that has it: put \
                 the module next to the notebook, or bundle its pure-Python wheel with \
                 `host bundle --wheel FILE.whl`",
                importer.place,
                folder.display()
            )));
        } else {
            continue;
        };
        done.insert(top);
        work.extend(more);
        found.extend(modules);
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    found.dedup_by(|a, b| a.name == b.name);
    Ok(found)
}

/// The top-level modules that the statements import, with where; the first statements last,
/// so they are looked at first.
fn imports(
    extraction: &Extraction,
    selected: &BTreeSet<StatementId>,
    place: impl Fn(StatementId) -> String,
) -> Vec<(String, Importer)> {
    let mut out = Vec::new();
    for &id in selected.iter().rev() {
        let stmt = extraction.statement(id);
        for top in &stmt.imports {
            out.push((
                top.clone(),
                Importer {
                    place: place(id),
                    missing: stmt.missing.contains(top),
                    required: stmt.kind == Kind::Import,
                },
            ));
        }
    }
    out
}

fn read_source(path: &Path) -> Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| bad_input(format!("cannot read module `{}`: {e}", path.display())))
}

/// The `.py` files of a package folder, relative to `folder`; caches and hidden folders left out.
fn package_sources(folder: &Path, package: &Path) -> Result<BTreeMap<String, String>> {
    let mut sources = BTreeMap::new();
    let mut dirs = vec![package.to_owned()];
    while let Some(dir) = dirs.pop() {
        // What cannot be listed is the user's to fix, like a module that cannot be read.
        let unlistable =
            |e: std::io::Error| bad_input(format!("cannot list package `{}`: {e}", dir.display()));
        for entry in std::fs::read_dir(&dir).map_err(unlistable)? {
            let entry = entry.map_err(unlistable)?;
            let path: PathBuf = entry.path();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if name.starts_with('.') || name == "__pycache__" {
                continue;
            }
            // A linked folder is not followed: it could lead back up, round and round.
            if entry.file_type().map_err(unlistable)?.is_dir() {
                dirs.push(path);
            } else if name.ends_with(".py") {
                let relative = path.strip_prefix(folder).unwrap_or(&path);
                let key = relative
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join("/");
                sources.insert(key, read_source(&path)?);
            }
        }
    }
    Ok(sources)
}

/// What a neighbour brings: its modules, and what they import in turn.
type Found = (Vec<Module>, Vec<(String, Importer)>);

/// Modules of `.py` files, and what they import (found by analysing each file as a cell).
fn python_files(sandbox: &Sandbox, sources: &BTreeMap<String, String>) -> Result<Found> {
    let as_notebook = Notebook {
        name: sources.keys().next().cloned().unwrap_or_default(),
        path: PathBuf::new(),
        sha256: String::new(),
        cells: sources
            .values()
            .enumerate()
            .map(|(i, text)| Cell {
                number: i + 1,
                kind: CellKind::Code,
                source: text.clone(),
                tags: Vec::new(),
            })
            .collect(),
    };
    let extraction = Extraction::new(&as_notebook, extract::analyse(sandbox, &as_notebook)?);
    // A module runs whole: every statement's imports count.
    let files: Vec<&String> = sources.keys().collect();
    let more = imports(&extraction, &extraction.all_statements(), |id| {
        let line = extraction.statement(id).span[0];
        format!("{}, line {line}", files[id.0])
    });
    Ok((modules_of_files(sources, ""), more))
}

/// A sibling notebook as a module: what its definitions, imports and constants need, never
/// its top-level code.
fn sibling_notebook(sandbox: &Sandbox, name: &str, path: &Path) -> Result<Found> {
    let notebook = Notebook::read(path)?;
    let extraction = Extraction::new(&notebook, extract::analyse(sandbox, &notebook)?);
    let closure = extraction.closure_of_everything_kept();
    let chunks = extraction
        .source(&closure)
        .into_iter()
        .map(|c| ModuleChunk {
            cell: Some(c.cell),
            text: c.text,
        })
        .collect();
    let module = Module::new(name.to_owned(), notebook.name.clone(), false, chunks);
    let more = imports(&extraction, &closure.statements, |id| extraction.place(id));
    Ok((vec![module], more))
}

/// The files of a zip archive, by name. Wheels are small: the central directory is read, each
/// entry stored or deflated; ZIP64 is not needed.
fn unzip(bytes: &[u8]) -> Result<BTreeMap<String, Vec<u8>>> {
    let u16_at = |at: usize| -> Result<usize> {
        let b = bytes.get(at..at + 2).context("truncated")?;
        Ok(u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u32_at = |at: usize| -> Result<usize> {
        let b = bytes.get(at..at + 4).context("truncated")?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let end = (0..bytes.len().saturating_sub(21))
        .rev()
        .find(|&i| bytes[i..].starts_with(b"PK\x05\x06"))
        .context("no end of central directory")?;
    let count = u16_at(end + 10)?;
    let mut at = u32_at(end + 16)?;
    let mut files = BTreeMap::new();
    for _ in 0..count {
        anyhow::ensure!(
            bytes.get(at..at + 4) == Some(b"PK\x01\x02"),
            "bad central directory entry"
        );
        let method = u16_at(at + 10)?;
        let (compressed_size, size) = (u32_at(at + 20)?, u32_at(at + 24)?);
        let (name_len, extra_len, comment_len) =
            (u16_at(at + 28)?, u16_at(at + 30)?, u16_at(at + 32)?);
        let local = u32_at(at + 42)?;
        let name = String::from_utf8_lossy(
            bytes
                .get(at + 46..at + 46 + name_len)
                .context("truncated")?,
        )
        .into_owned();
        at += 46 + name_len + extra_len + comment_len;
        if name.ends_with('/') {
            continue;
        }
        anyhow::ensure!(
            bytes.get(local..local + 4) == Some(b"PK\x03\x04"),
            "bad local header for `{name}`"
        );
        let data = local + 30 + u16_at(local + 26)? + u16_at(local + 28)?;
        let raw = bytes
            .get(data..data + compressed_size)
            .with_context(|| format!("`{name}` is truncated"))?;
        let content = match method {
            0 => raw.to_vec(),
            8 => {
                let mut out = Vec::with_capacity(size);
                flate2::read::DeflateDecoder::new(raw)
                    .read_to_end(&mut out)
                    .with_context(|| format!("`{name}` does not inflate"))?;
                out
            }
            other => anyhow::bail!("`{name}` uses compression method {other}"),
        };
        files.insert(name, content);
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_become_modules_packages_and_namespace_packages() {
        let sources = BTreeMap::from([
            ("lib/__init__.py".to_owned(), "A = 1".to_owned()),
            ("lib/ns/deep.py".to_owned(), "B = 2".to_owned()),
            ("top.py".to_owned(), "C = 3".to_owned()),
        ]);
        let modules = modules_of_files(&sources, "w.whl:");
        let shape: Vec<(&str, &str, bool, usize)> = modules
            .iter()
            .map(|m| (m.name.as_str(), m.file.as_str(), m.package, m.chunks.len()))
            .collect();
        assert_eq!(
            shape,
            [
                ("lib", "w.whl:lib/__init__.py", true, 1),
                ("lib.ns", "w.whl:lib/ns/", true, 0),
                ("lib.ns.deep", "w.whl:lib/ns/deep.py", false, 1),
                ("top", "w.whl:top.py", false, 1),
            ]
        );
        assert_ne!(modules[0].sha256, modules[3].sha256);
    }

    #[test]
    fn a_stored_zip_is_read_and_garbage_refused() {
        // One stored entry, as `zip -0` writes it (the CRC is not checked).
        let name = b"a.py";
        let data = b"x = 1\n";
        let mut zip = Vec::new();
        zip.extend_from_slice(b"PK\x03\x04");
        zip.extend_from_slice(&[20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        zip.extend_from_slice(&(data.len() as u32).to_le_bytes());
        zip.extend_from_slice(&(data.len() as u32).to_le_bytes());
        zip.extend_from_slice(&(name.len() as u16).to_le_bytes());
        zip.extend_from_slice(&0u16.to_le_bytes());
        zip.extend_from_slice(name);
        zip.extend_from_slice(data);
        let central = zip.len();
        zip.extend_from_slice(b"PK\x01\x02");
        zip.extend_from_slice(&[20, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        zip.extend_from_slice(&(data.len() as u32).to_le_bytes());
        zip.extend_from_slice(&(data.len() as u32).to_le_bytes());
        zip.extend_from_slice(&(name.len() as u16).to_le_bytes());
        zip.extend_from_slice(&[0; 12]);
        zip.extend_from_slice(&0u32.to_le_bytes());
        zip.extend_from_slice(name);
        let size = zip.len() - central;
        zip.extend_from_slice(b"PK\x05\x06");
        zip.extend_from_slice(&[0, 0, 0, 0, 1, 0, 1, 0]);
        zip.extend_from_slice(&(size as u32).to_le_bytes());
        zip.extend_from_slice(&(central as u32).to_le_bytes());
        zip.extend_from_slice(&[0, 0]);
        let files = unzip(&zip).unwrap();
        assert_eq!(files["a.py"], data);
        assert!(unzip(b"not a zip at all, just some bytes").is_err());
    }
}
