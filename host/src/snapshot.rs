//! Pre-initialisation: a bundle's imports and definitions run once, and every call starts from
//! the memory they leave.
//!
//! Why a memory image and not a Wizer snapshot module: a snapshot module is a new 100 MB
//! module that Cranelift must compile (about 45 s, and still 17 s with its incremental cache
//! warm), so a changed notebook would wait that long for its first result. The interpreter's
//! only mutable global is the stack pointer, which every turn restores, and its table never
//! changes, so its whole state after the bundle's load turn is its linear memory. host saves
//! that memory to a sparse file once per (bundle, runtime, host) and, for each call,
//! instantiates the already compiled interpreter with the file as its memory, mapped
//! copy-on-write (`MAP_PRIVATE`; [`crate::memory`] keeps such memories between calls): the call
//! sees the loaded state at once, its writes stay its own, and no call sees another's.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use wasmtime::{Memory, Store};

use crate::bundle::{Bundle, short};
use crate::call::GUEST_SOURCE;
use crate::engine::write_cache_file;
use crate::memory::Source;
use crate::progress::Progress;
use crate::runtime::Runtime;
use crate::sandbox::{Door, Ended, Limits, Policy, Sandbox, Setup, Start, State, World};
use crate::trace::Tracer;

const WASM_PAGE: u64 = 64 << 10;
/// How many images the cache keeps (each holds tens of MB of non-zero pages).
const KEEP_IMAGES: usize = 64;
/// Part of every image's cache key: changed whenever how an image is built changes (its
/// fixed world, the metadata it normalises), so no stale image outlives the change.
const RECIPE: &str = "fixed-clock, fixed-random, no dev/ino/nlink/times; 2";

/// A bundle's loaded interpreter memory (or the interpreter's initial one), ready to start
/// fresh instances from.
#[derive(Debug)]
pub struct Image {
    source: Arc<Source>,
    pages: u64,
    /// sha256 of the memory: a trace records it, and a replay checks it.
    pub sha256: String,
}

/// The record kept next to an image, or in place of one when a bundle cannot be
/// pre-initialised (so the attempt is not repeated on every call).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Record {
    Image { pages: u64, sha256: String },
    Unavailable { reason: String },
}

/// A bundle ready to call: its pre-initialised image when it has one.
#[derive(Debug)]
pub struct Prepared {
    pub bundle: Bundle,
    pub image: Option<Image>,
    /// Why there is no image: the bundle's load needs something only a call has (a granted
    /// file, an environment variable), or failed. Calls then load the bundle themselves.
    pub unavailable: Option<String>,
}

impl Prepared {
    /// The bundle with its image, from the cache or built now (a second or two for pandas).
    pub fn new(sandbox: &Sandbox, bundle: Bundle) -> Result<Prepared> {
        bundle.check_runtime(sandbox)?;
        let key = image_key(sandbox, &bundle);
        let dir = sandbox.cache_dir().join("images");
        let record_path = dir.join(format!("{key}.json"));
        let memory_path = dir.join(format!("{key}.mem"));
        let record = match read_record(&record_path) {
            Some(record) => record,
            None => {
                let progress = Progress::start(&format!(
                    "pre-initialising bundle {}",
                    short(&bundle.version)
                ));
                let record = build(sandbox, &bundle, &memory_path)?;
                progress.finish();
                write_cache_file(&record_path, &serde_json::to_vec(&record)?)?;
                evict(&dir, KEEP_IMAGES);
                record
            }
        };
        Ok(match record {
            Record::Image { pages, sha256 } => match Image::open(&memory_path, pages, sha256) {
                Ok(image) => Prepared {
                    bundle,
                    image: Some(image),
                    unavailable: None,
                },
                // A cache entry that went missing is rebuilt by the next process.
                Err(e) => {
                    let _ = std::fs::remove_file(&record_path);
                    Prepared {
                        bundle,
                        image: None,
                        unavailable: Some(format!("{e:#}")),
                    }
                }
            },
            Record::Unavailable { reason } => Prepared {
                bundle,
                image: None,
                unavailable: Some(reason),
            },
        })
    }

    /// A bundle that loads its source in every call: no image is built or used.
    pub fn without_image(bundle: Bundle) -> Prepared {
        Prepared {
            bundle,
            image: None,
            unavailable: Some("pre-initialisation was not asked for".into()),
        }
    }
}

/// Removes all but the `keep` most recently built images. A process that still maps a removed
/// image keeps its pages; the next one to need it builds it again.
fn evict(dir: &Path, keep: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut images: Vec<(std::time::SystemTime, PathBuf)> = entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "mem"))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    if images.len() <= keep {
        return;
    }
    images.sort();
    for (_, path) in &images[..images.len() - keep] {
        let _ = std::fs::remove_file(path.with_extension("json"));
        let _ = std::fs::remove_file(path);
    }
}

/// The cache key of an image: what the memory after loading depends on.
fn image_key(sandbox: &Sandbox, bundle: &Bundle) -> String {
    let mut h = Sha256::new();
    h.update(&bundle.version);
    h.update(sandbox.runtime().sha256());
    h.update(env!("CARGO_PKG_VERSION"));
    h.update(GUEST_SOURCE);
    h.update(RECIPE);
    hex::encode(h.finalize())
}

fn read_record(path: &Path) -> Option<Record> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Loads the bundle in a fresh instance with no grants and no environment, and saves the
/// memory it leaves. A load that fails there (it reads a granted file, say) makes the bundle
/// one that loads per call.
///
/// The instance sees a fixed clock, a fixed random sequence and file metadata without
/// device, inode or times, so the image is the same on every machine: a trace records its
/// hash, and a replay elsewhere starts from the same bytes.
fn build(sandbox: &Sandbox, bundle: &Bundle, memory_path: &Path) -> Result<Record> {
    let policy = Policy {
        limits: Limits {
            memory: 4 << 30,
            ..Limits::default()
        },
        ..Policy::default()
    };
    let door = bundle.load_answers(Door::default())?;
    let setup = Setup {
        start: Start::Fresh,
        world: World::Fixed,
        tracer: Some(Tracer::Normalize),
        capture: true,
    };
    let run = sandbox.execute(
        setup,
        &policy,
        door,
        &[GUEST_SOURCE, "if load() and warm_up():\n    freeze()\n"],
    )?;
    let memory = run.memory;
    if run.ended != Ended::Finished {
        return Ok(Record::Unavailable {
            reason: format!("loading the bundle did not finish: {:?}", run.ended),
        });
    }
    if let Some(error) = run.door.received.iter().find(|r| r["op"] == "error") {
        let what = match error["phase"].as_str() {
            Some("warm-up") => {
                "the warm-up call (run without grants or environment, on a fixed clock)"
            }
            _ => "loading the bundle without the call's grants",
        };
        return Ok(Record::Unavailable {
            reason: format!(
                "{what} raised {}: {}",
                error["type"].as_str().unwrap_or("an exception"),
                error["message"].as_str().unwrap_or("")
            ),
        });
    }
    let memory = memory.context("the load turn left no memory to save")?;
    save(memory_path, &memory)
}

/// Saves a memory as an image file, and says what the record of it holds.
fn save(memory_path: &Path, memory: &[u8]) -> Result<Record> {
    write_sparse(memory_path, memory)?;
    Ok(Record::Image {
        pages: memory.len() as u64 / WASM_PAGE,
        sha256: hex::encode(Sha256::digest(memory)),
    })
}

/// Writes `bytes` leaving all-zero pages as holes: most of a fresh interpreter's memory is
/// zero, and a hole costs neither disk nor page cache.
fn write_sparse(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp: PathBuf = path.with_extension(format!("{}.tmp", std::process::id()));
    let dir = path.parent().context("an image needs a folder")?;
    crate::engine::create_private_dir(dir)?;
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
    }
    .with_context(|| format!("failed to create `{}`", tmp.display()))?;
    for (i, page) in bytes.chunks(WASM_PAGE as usize).enumerate() {
        if page.iter().any(|&b| b != 0) {
            file.write_all_at(page, i as u64 * WASM_PAGE)?;
        }
    }
    file.set_len(bytes.len() as u64)?;
    (&file).flush()?;
    std::fs::rename(&tmp, path).with_context(|| format!("failed to write `{}`", path.display()))
}

impl Image {
    fn open(path: &Path, pages: u64, sha256: String) -> Result<Image> {
        let file = File::open(path)
            .with_context(|| format!("the image `{}` is missing", path.display()))?;
        let len = file.metadata()?.len();
        anyhow::ensure!(
            len == pages * WASM_PAGE,
            "the image `{}` has {len} bytes, not {} pages",
            path.display(),
            pages
        );
        Ok(Image {
            source: Arc::new(Source::new(
                file,
                (pages * WASM_PAGE) as usize,
                sha256.clone(),
            )),
            pages,
            sha256,
        })
    }

    pub(crate) fn source(&self) -> &Arc<Source> {
        &self.source
    }

    /// The image's size in bytes.
    pub fn len(&self) -> u64 {
        self.pages * WASM_PAGE
    }

    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// Grows an instance's memory, which starts as this image's (see [`crate::memory`]), to
    /// the image's size: the memory limit applies as to any growth.
    pub(crate) fn grow_into(
        &self,
        store: &mut Store<State>,
        memory: Memory,
    ) -> wasmtime::Result<()> {
        let have = memory.size(&*store);
        if self.pages < have {
            return Err(wasmtime::format_err!(
                "the image is smaller than the interpreter's initial memory"
            ));
        }
        memory.grow(&mut *store, self.pages - have)?;
        Ok(())
    }
}

/// The interpreter's initial memory as an image, which instances that load a bundle
/// themselves start from: written once per runtime next to the compiled module.
pub(crate) fn initial_image(cache_dir: &Path, runtime: &Runtime) -> Result<Image> {
    // Beside the compiled module it belongs with, out of reach of the bundle images' eviction.
    let dir = cache_dir.join("modules");
    let key = format!("{}-initial", &runtime.sha256()[..16]);
    let record_path = dir.join(format!("{key}.json"));
    let memory_path = dir.join(format!("{key}.mem"));
    if let Some(Record::Image { pages, sha256 }) = read_record(&record_path)
        && let Ok(image) = Image::open(&memory_path, pages, sha256)
    {
        return Ok(image);
    }
    let record = save(&memory_path, &runtime.initial_memory()?)?;
    write_cache_file(&record_path, &serde_json::to_vec(&record)?)?;
    let Record::Image { pages, sha256 } = record else {
        unreachable!("`save` makes an image record")
    };
    Image::open(&memory_path, pages, sha256)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eviction_keeps_the_newest_images() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..5 {
            std::fs::write(dir.path().join(format!("{i}.mem")), b"m").unwrap();
            std::fs::write(dir.path().join(format!("{i}.json")), b"{}").unwrap();
            let t = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000 + i);
            std::fs::File::options()
                .write(true)
                .open(dir.path().join(format!("{i}.mem")))
                .unwrap()
                .set_modified(t)
                .unwrap();
        }
        evict(dir.path(), 2);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["3.json", "3.mem", "4.json", "4.mem"]);
    }
}
