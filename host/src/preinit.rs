//! Pre-initialisation: a bundle's imports and definitions run once, and every call starts from
//! the memory they leave.
//!
//! Why a memory image and not a Wizer snapshot module: a snapshot module is a new 100 MB
//! module that Cranelift must compile (about 45 s, and still 17 s with its incremental cache
//! warm), so a changed notebook would wait that long for its first result. The interpreter's
//! only mutable global is the stack pointer, which every turn restores, and its table never
//! changes, so its whole state after the bundle's load turn is its linear memory. host saves
//! that memory as an [`Image`] once per (bundle, runtime, host) and, for each call,
//! instantiates the already compiled interpreter with the image as its memory, mapped
//! copy-on-write: the call sees the loaded state at once, its writes stay its own, and no call
//! sees another's.

use std::path::Path;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::bundle::{Bundle, short};
use crate::door::{Door, GUEST_SOURCE, GuestMessage, Script};
use crate::engine::write_cache_file;
use crate::image::{Image, Record, evict, read_record, save};
use crate::policy::{Limits, Policy};
use crate::progress::Progress;
use crate::record::Mode;
use crate::sandbox::{Ended, Sandbox, Setup, Start};

/// How many images the cache keeps (each holds tens of MB of non-zero pages).
const KEEP_IMAGES: usize = 64;
/// Part of every image's cache key: changed whenever how an image is built changes (its
/// fixed world, the metadata it normalises), so no stale image outlives the change.
const RECIPE: &str = "fixed-clock, fixed-random, no dev/ino/nlink/times; 2";

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
    let door = bundle.load_answers(Door::default());
    let setup = Setup {
        start: Start::Fresh,
        mode: Mode::Freeze,
        capture: true,
    };
    let run = sandbox.execute(setup, &policy, door, Script::LoadAndFreeze)?;
    let memory = run.memory;
    if run.ended != Ended::Finished {
        return Ok(Record::Unavailable {
            reason: format!("loading the bundle did not finish: {:?}", run.ended),
        });
    }
    let raised = run.door.received.iter().find_map(|m| match m {
        GuestMessage::Error(e) => Some(e),
        _ => None,
    });
    if let Some(error) = raised {
        let what = match error.phase.as_str() {
            "warm-up" => "the warm-up call (run without grants or environment, on a fixed clock)",
            _ => "loading the bundle without the call's grants",
        };
        return Ok(Record::Unavailable {
            reason: format!("{what} raised {}: {}", error.kind, error.message),
        });
    }
    let memory = memory.context("the load turn left no memory to save")?;
    save(memory_path, &memory)
}
