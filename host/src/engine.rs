//! The Wasmtime engine host runs every call on, and the on-disk cache of compiled modules.
//!
//! One [`Engine`] serves every call of a process: compiling the 100 MB interpreter takes
//! about a minute of Cranelift, so it happens once per machine (the `.cwasm` cache) and is
//! loaded once per process. Engine settings that every call depends on live here and nowhere
//! else.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use wasmtime::{Config, Module};

use crate::memory::Pool;
use crate::progress::Progress;
use crate::runtime::Runtime;

/// How often the epoch advances: the granularity of `--timeout`.
pub const TICK: Duration = Duration::from_millis(10);
/// CPython's deepest recursion needs more than Wasmtime's default 512 KiB of wasm stack.
const MAX_WASM_STACK: usize = 8 << 20;
/// Host frames below the wasm stack (WASI calls, the door) need room of their own.
const NATIVE_STACK: usize = MAX_WASM_STACK + (8 << 20);

/// The engine settings execution depends on bit for bit: a trace records them, and a replay
/// refuses an engine that differs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineSettings {
    pub nan_canonicalization: bool,
    pub relaxed_simd_deterministic: bool,
    pub threads: bool,
}

/// What every engine of host is configured with: deterministic execution, so a recorded call
/// replays to the same bits elsewhere.
const SETTINGS: EngineSettings = EngineSettings {
    nan_canonicalization: true,
    relaxed_simd_deterministic: true,
    threads: false,
};

/// A configured Wasmtime engine, its epoch ticker, and the compiled-module cache.
pub struct Engine {
    engine: wasmtime::Engine,
    settings: EngineSettings,
    cache_dir: PathBuf,
    modules: Mutex<HashMap<PathBuf, Module>>,
    ticking: Arc<AtomicBool>,
}

impl Engine {
    /// An engine with host's settings, caching compiled modules under `cache_dir` (default:
    /// [`default_cache_dir`]).
    pub fn new(cache_dir: Option<PathBuf>) -> Result<Engine> {
        let cache_dir = cache_dir.unwrap_or_else(default_cache_dir);
        // A cache folder that cannot be one (a file, a dangling link) is the user's to fix,
        // said now rather than after compiling the runtime for a minute.
        create_private_dir(&cache_dir).map_err(|e| {
            crate::error::bad_input(format!(
                "the cache folder (--cache-dir or $HOST_CACHE_DIR) cannot be used: {e:#}"
            ))
        })?;
        let mut config = Config::new();
        config
            .wasm_exceptions(true)
            .max_wasm_stack(MAX_WASM_STACK)
            .async_stack_size(NATIVE_STACK)
            .epoch_interruption(true)
            .wasm_threads(SETTINGS.threads)
            .cranelift_nan_canonicalization(SETTINGS.nan_canonicalization)
            .relaxed_simd_deterministic(SETTINGS.relaxed_simd_deterministic)
            // Every instance's memory is an image's, kept warm between calls: see `memory`.
            .with_host_memory(Pool::new().creator());
        let engine = wasmtime::Engine::new(&config)
            .map_err(anyhow::Error::from)
            .context("failed to configure Wasmtime")?;
        let ticking = Arc::new(AtomicBool::new(true));
        let ticker = engine.weak();
        let running = ticking.clone();
        std::thread::Builder::new()
            .name("host-epoch".into())
            .spawn(move || {
                while running.load(Ordering::Relaxed) {
                    std::thread::sleep(TICK);
                    match ticker.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => break,
                    }
                }
            })
            .context("failed to start the epoch thread")?;
        Ok(Engine {
            engine,
            settings: SETTINGS,
            cache_dir,
            modules: Mutex::new(HashMap::new()),
            ticking,
        })
    }

    pub fn wasmtime(&self) -> &wasmtime::Engine {
        &self.engine
    }

    /// The settings this engine was configured with.
    pub fn settings(&self) -> &EngineSettings {
        &self.settings
    }

    /// The folder for compiled modules and other per-machine caches.
    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    /// The size of native stack a thread running a call needs.
    pub fn native_stack(&self) -> usize {
        NATIVE_STACK + (4 << 20)
    }

    /// The runtime's interpreter, compiled: from this process, else from the disk cache, else
    /// compiled now (about a minute) and cached.
    pub fn interpreter(&self, runtime: &Runtime) -> Result<Module> {
        let wasm = runtime.interpreter();
        if let Some(m) = self.modules.lock().unwrap().get(&wasm) {
            return Ok(m.clone());
        }
        let cached = self.cache_dir.join("modules").join(format!(
            "{}-{}-host2-{:016x}.cwasm",
            &runtime.sha256()[..16],
            wasm.file_stem().unwrap_or_default().to_string_lossy(),
            self.compatibility()
        ));
        let module = match self.load_cached(&cached) {
            Some(m) => m,
            None => {
                let progress = Progress::start(
                    "compiling the Python runtime (once per machine, about a minute)",
                );
                let bytes = runtime.interpreter_module()?;
                let module = Module::new(&self.engine, &bytes)
                    .map_err(anyhow::Error::from)
                    .with_context(|| format!("failed to compile `{}`", wasm.display()))?;
                progress.finish();
                self.store_cached(&cached, &module)?;
                module
            }
        };
        self.modules.lock().unwrap().insert(wasm, module.clone());
        Ok(module)
    }

    fn compatibility(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut h);
        h.finish()
    }

    fn load_cached(&self, path: &Path) -> Option<Module> {
        if !path.exists() {
            return None;
        }
        // SAFETY: the file is native code Wasmtime runs as found. host only loads files it
        // wrote itself into its owner-only cache folder, named by the engine's compatibility
        // hash; Wasmtime checks the header's version and settings again and refuses a mismatch.
        unsafe { Module::deserialize_file(&self.engine, path) }.ok()
    }

    /// Writes a compiled module, and removes what this one replaces: the same runtime compiled
    /// for other engine settings or host versions (300 MB each).
    fn store_cached(&self, path: &Path, module: &Module) -> Result<()> {
        write_cache_file(path, &module.serialize()?)?;
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let runtime = name.split('-').next().unwrap_or_default();
        for entry in std::fs::read_dir(path.parent().unwrap())?.flatten() {
            let other = entry.file_name().to_string_lossy().into_owned();
            if other != name && other.starts_with(runtime) && other.ends_with(".cwasm") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(())
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.ticking.store(false, Ordering::Relaxed);
    }
}

/// `$HOST_CACHE_DIR`, else `$XDG_CACHE_HOME/host`, else `~/.cache/host`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("HOST_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("host");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".cache").join("host"),
        None => std::env::temp_dir().join("host-cache"),
    }
}

/// Writes a cache file readable by its owner only, in a private folder, atomically (see
/// [`crate::files::write_private`]): a concurrent process never reads half a file.
pub fn write_cache_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().context("a cache file needs a folder")?;
    create_private_dir(dir)?;
    crate::files::write_private(path, bytes)
}

/// Creates `dir` (and its parents) readable by its owner only: it holds native code and,
/// later, traces of production data.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("failed to create `{}`", dir.display()))
}
