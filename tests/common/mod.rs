//! Helpers shared by the integration tests: notebooks written to temporary directories, and
//! the `host` binary run on them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Once;

use serde_json::{Value, json};
use tempfile::TempDir;

/// A real `host serve` process and an HTTP client for it.
pub mod server;

/// The repository root (the workspace).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// A temporary directory holding one notebook, `nb.ipynb`.
pub struct Fixture {
    pub dir: TempDir,
    pub notebook: PathBuf,
}

impl Fixture {
    /// A notebook whose code cells are `cells`, in order.
    pub fn code(cells: &[&str]) -> Fixture {
        Fixture::cells(cells.iter().map(|c| code_cell(c)).collect())
    }

    /// A notebook with the given raw cell objects.
    pub fn cells(cells: Vec<Value>) -> Fixture {
        Fixture::raw(&json!({
            "nbformat": 4,
            "nbformat_minor": 5,
            "metadata": {"kernelspec": {"name": "python3", "language": "python", "display_name": "Python 3"}},
            "cells": cells,
        }).to_string())
    }

    /// A notebook file with exactly this text.
    pub fn raw(text: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let notebook = dir.path().join("nb.ipynb");
        std::fs::write(&notebook, text).unwrap();
        Fixture { dir, notebook }
    }

    /// A path inside the fixture's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `host run nb.ipynb FUNCTION ARGS...`.
    pub fn run(&self, function: &str, args: &[&str]) -> Run {
        let mut all = vec!["run", self.notebook.to_str().unwrap(), function];
        all.extend_from_slice(args);
        host(&all)
    }
}

pub fn code_cell(source: &str) -> Value {
    json!({"cell_type": "code", "metadata": {}, "source": source, "outputs": [], "execution_count": null})
}

/// What one `host` process did.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The JSON on stdout; fails the test (showing stderr) unless the call succeeded.
    pub fn value(&self) -> Value {
        assert_eq!(self.code, 0, "host failed:\n{}", self.stderr);
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.stdout))
    }

    /// Asserts the exit code and that stderr mentions every one of `needles`.
    pub fn fails(&self, code: i32, needles: &[&str]) -> &Run {
        assert_eq!(
            self.code, code,
            "exit code; stderr:\n{}\nstdout:\n{}",
            self.stderr, self.stdout
        );
        for needle in needles {
            assert!(
                self.stderr.contains(needle),
                "stderr lacks `{needle}`:\n{}",
                self.stderr
            );
        }
        assert!(
            !self.stderr.contains("panicked"),
            "host panicked:\n{}",
            self.stderr
        );
        self
    }
}

/// Runs `host` with `args`.
pub fn host(args: &[&str]) -> Run {
    host_with_stdin(args, None)
}

pub fn host_with_stdin(args: &[&str], stdin: Option<&str>) -> Run {
    host_in(args, stdin, &[])
}

/// Runs `host` with `args`, `stdin` and extra environment variables.
pub fn host_in(args: &[&str], stdin: Option<&str>, env: &[(&str, &Path)]) -> Run {
    prepare();
    let mut child = Command::new(env!("CARGO_BIN_EXE_host"))
        .args(args)
        .envs(env.iter().copied())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("failed to start host");
    if let Some(text) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let Output {
        status,
        stdout,
        stderr,
    } = child.wait_with_output().unwrap();
    Run {
        code: status.code().expect("host was killed by a signal"),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// Compiles the runtime once per test process, so parallel tests do not all compile it.
fn prepare() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let status = Command::new(env!("CARGO_BIN_EXE_host"))
            .arg("prepare")
            .status()
            .unwrap();
        assert!(
            status.success(),
            "`host prepare` failed: is the runtime installed (make runtime)?"
        );
    });
}
