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
use sha2::Digest;
use wasmtime::{Config, Module};

use crate::cache::{self, CacheDir, Seal, Verified};
use crate::memory::Pool;
use crate::progress::Progress;
use crate::runtime::Runtime;

/// How often the epoch advances: the granularity of `--timeout`.
pub const TICK: Duration = Duration::from_millis(10);
/// CPython's deepest recursion needs more than Wasmtime's default 512 KiB of wasm stack.
const MAX_WASM_STACK: usize = 8 << 20;
/// Host frames below the wasm stack (WASI calls, the door) need room of their own.
const NATIVE_STACK: usize = MAX_WASM_STACK + (8 << 20);
/// The native stack a thread running a call needs: Wasmtime's, and the caller's frames above.
pub const CALL_STACK: usize = NATIVE_STACK + (4 << 20);

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
    cache: CacheDir,
    modules: Mutex<HashMap<PathBuf, Module>>,
    ticking: Arc<AtomicBool>,
}

impl Engine {
    /// An engine with host's settings, caching compiled modules under `cache_dir` (default:
    /// [`cache::default_cache_dir`]), which must be this user's alone.
    pub fn new(cache_dir: Option<PathBuf>) -> Result<Engine> {
        let cache = CacheDir::open(&cache_dir.unwrap_or_else(cache::default_cache_dir))?;
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
            cache,
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

    /// The folder for compiled modules and other per-machine caches, checked.
    pub fn cache(&self) -> &CacheDir {
        &self.cache
    }

    /// The runtime's interpreter, compiled: from this process, else from the disk cache (when
    /// it is still the file host sealed), else compiled now (about a minute) and cached. While
    /// one process compiles it, others that need it wait for it rather than compile it too.
    pub fn interpreter(&self, runtime: &Runtime) -> Result<Module> {
        let wasm = runtime.interpreter();
        if let Some(m) = self.modules.lock().unwrap().get(&wasm) {
            return Ok(m.clone());
        }
        let dir = self.cache.folder("modules")?;
        let cached = dir.join(format!(
            "{}-{}-host2-{:016x}.cwasm",
            &runtime.sha256()[..16],
            wasm.file_stem().unwrap_or_default().to_string_lossy(),
            self.compatibility()
        ));
        let module = match self.load_cached(&cached)? {
            Some(m) => m,
            None => {
                let _lock = lock(&dir.join(".compile.lock"))?;
                match self.load_cached(&cached)? {
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
                }
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

    /// The compiled module at `path`, if it is there and is the file host sealed.
    fn load_cached(&self, path: &Path) -> Result<Option<Module>> {
        let seal_path = seal_path(path);
        let (Some(file), Some(seal_file)) =
            (cache::open_file(path)?, cache::open_file(&seal_path)?)
        else {
            return Ok(None);
        };
        let Ok(seal) = serde_json::from_reader::<_, Seal>(seal_file) else {
            return Ok(None);
        };
        match Seal::verify(&file, Some(&seal), &seal.sha256)? {
            Verified::Same => {}
            Verified::Resealed(seal) => write_cache_file(&seal_path, &serde_json::to_vec(&seal)?)?,
            Verified::Changed => return Ok(None),
        }
        // SAFETY: the file is native code Wasmtime runs as found. It is the file host wrote
        // and sealed in its owner-only cache folder (checked just now on this open file),
        // named by the engine's compatibility hash; Wasmtime checks the header's version and
        // settings again and refuses a mismatch.
        Ok(unsafe { Module::deserialize_open_file(&self.engine, file) }.ok())
    }

    /// Writes and seals a compiled module, and removes what this one replaces: the same
    /// runtime compiled for other engine settings or host versions (300 MB each).
    fn store_cached(&self, path: &Path, module: &Module) -> Result<()> {
        let bytes = module.serialize()?;
        write_cache_file(path, &bytes)?;
        let seal = Seal::of(
            &std::fs::File::open(path)?,
            hex::encode(sha2::Sha256::digest(&bytes)),
        )?;
        write_cache_file(&seal_path(path), &serde_json::to_vec(&seal)?)?;
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let runtime = name.split('-').next().unwrap_or_default();
        for entry in std::fs::read_dir(path.parent().unwrap())?.flatten() {
            let other = entry.file_name().to_string_lossy().into_owned();
            let replaced = other.ends_with(".cwasm") || other.ends_with(".cwasm.seal");
            if !other.starts_with(&*name) && other.starts_with(runtime) && replaced {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(())
    }
}

/// Where the seal of a cache file is kept: beside it.
fn seal_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".seal");
    PathBuf::from(name)
}

/// An exclusive lock on `path` (created owner-only), held until the file is dropped.
fn lock(path: &Path) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("failed to open the lock `{}`", path.display()))?;
    // SAFETY: flock on a valid descriptor; the lock goes with the descriptor.
    let busy = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0;
    if busy {
        let progress =
            Progress::start("waiting for another host process that is compiling the runtime");
        // SAFETY: as above.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("failed to lock `{}`", path.display()));
        }
        progress.finish();
    }
    Ok(file)
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.ticking.store(false, Ordering::Relaxed);
    }
}

/// Writes a cache file readable by its owner only, in a private folder, atomically (see
/// [`crate::files::write_private`]): a concurrent process never reads half a file.
pub fn write_cache_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().context("a cache file needs a folder")?;
    cache::create_private_dir(dir)?;
    crate::files::write_private(path, bytes)
}
