//! Helpers shared by the integration tests: notebooks written to temporary directories, and
//! the `host` binary run on them.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Once;

use serde_json::{Value, json};
use tempfile::TempDir;

/// A real `host serve` process and an HTTP client for it.
pub mod server;

/// PostgreSQL databases and servers for the tests.
pub mod pg;

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

/// A fixture's notebook called in this process through the library: where a test is about
/// what a call returns, a `host` process adds nothing but its start-up.
pub struct InProcess {
    sandbox: host::Sandbox,
    prepared: host::Prepared,
    _engine: host::Engine,
}

impl Fixture {
    /// Every function of the notebook, bundled and pre-initialised on the test's cache.
    pub fn in_process(&self) -> InProcess {
        let engine = host::Engine::new(Some(cache_dir())).unwrap();
        let sandbox = host::Sandbox::new(&engine, &host::Runtime::locate(None).unwrap()).unwrap();
        let notebook = host::Notebook::read(&self.notebook).unwrap();
        let bundle =
            host::Bundle::from_notebook(&sandbox, &notebook, host::bundle::Select::All, None)
                .unwrap();
        let prepared = host::Prepared::new(&sandbox, bundle).unwrap();
        InProcess {
            sandbox,
            prepared,
            _engine: engine,
        }
    }
}

impl InProcess {
    /// How `function(*args)` ends under the default policy.
    pub fn call(&self, function: &str, args: Value) -> host::Outcome {
        let arguments = host::Arguments {
            args: serde_json::from_value(args).unwrap(),
            ..Default::default()
        };
        let policy = host::Policy::default();
        let request = host::Request {
            function,
            arguments: &arguments,
            policy: &policy,
            record: false,
        };
        host::call::call(&self.sandbox, &self.prepared, &request)
            .unwrap()
            .outcome
    }

    /// What `function(*args)` returns; fails the test unless it returns.
    pub fn value(&self, function: &str, args: Value) -> Value {
        match self.call(function, args) {
            host::Outcome::Returned(value) => value,
            other => panic!("{function} did not return: {other:?}"),
        }
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

/// Runs `host` with `args`, `stdin` and extra environment variables, on the test's own cache
/// folder unless `env` names another.
pub fn host_in(args: &[&str], stdin: Option<&str>, env: &[(&str, &Path)]) -> Run {
    let cache = cache_dir();
    let mut child = Command::new(env!("CARGO_BIN_EXE_host"))
        .args(args)
        .env("HOST_CACHE_DIR", &cache)
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

/// The suite's cache folder, where the runtime is compiled once (before the first test that
/// needs it) for every test of every run in this target folder.
pub fn suite_cache() -> PathBuf {
    static ONCE: Once = Once::new();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("suite-cache");
    ONCE.call_once(|| {
        let status = Command::new(env!("CARGO_BIN_EXE_host"))
            .arg("prepare")
            .env("HOST_CACHE_DIR", &dir)
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(
            status.success(),
            "`host prepare` failed: is the runtime installed (make runtime)?"
        );
    });
    dir
}

thread_local! {
    /// The running test's cache folder: each test runs on its own thread, and the folder goes
    /// when the thread does.
    static CACHE: RefCell<Option<tempfile::TempDir>> = const { RefCell::new(None) };
}

/// The running test's own cache folder (no test touches `~/.cache/host`, and none sees
/// another's images or analyses), whose `modules` folder is the suite's, where the runtime is
/// compiled and sealed once.
pub fn cache_dir() -> PathBuf {
    CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        if let Some(dir) = cache.as_ref() {
            return dir.path().to_owned();
        }
        let suite = suite_cache().join("modules");
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("caches");
        std::fs::create_dir_all(&root).unwrap();
        let name = std::thread::current()
            .name()
            .unwrap_or("test")
            .replace("::", "-");
        let dir = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir_in(root)
            .unwrap();
        // A link to the folder, not links to its files: a hard link would move the change time
        // the seal of each file records, and every test would hash 300 MB to trust it again.
        std::os::unix::fs::symlink(&suite, dir.path().join("modules")).unwrap();
        let path = dir.path().to_owned();
        *cache = Some(dir);
        path
    })
}
