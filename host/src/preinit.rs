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

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::bundle::{Bundle, short};
use crate::door::{Door, GUEST_SOURCE, GuestMessage, Script};
use crate::image::{Entry, Image, Record, evict};
use crate::policy::{Limits, Policy};
use crate::progress::Progress;
use crate::record::Mode;
use crate::sandbox::{Ended, Sandbox, Setup, Start};

/// How many images the cache keeps (each holds tens of MB of non-zero pages).
const KEEP_IMAGES: usize = 64;
/// Part of every image's cache key: changed whenever how an image is built changes (its
/// fixed world, the metadata it normalises), so no stale image outlives the change.
const RECIPE: &str =
    "fixed-clock, fixed-random, no dev/ino/nlink/times, no directory sizes, listings by name; 3";

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
    /// The bundle with its image, from the cache or built now (a second or two for pandas)
    /// under the default limits of a call.
    pub fn new(sandbox: &Sandbox, bundle: Bundle) -> Result<Prepared> {
        Self::with_limits(sandbox, bundle, &Limits::default())
    }

    /// The bundle with its image, from the cache or built now under `limits`, as a call would
    /// run: the bundle's imports and definitions are the notebook's code, and may loop or
    /// allocate as any call may. A limit hit is an error
    /// ([`crate::policy::LimitExceeded`] in its chain).
    pub fn with_limits(sandbox: &Sandbox, bundle: Bundle, limits: &Limits) -> Result<Prepared> {
        bundle.check_runtime(sandbox)?;
        let dir = sandbox.cache().folder("images")?;
        let entry = Entry::new(&dir, &image_key(sandbox, &bundle));
        let cached = match entry.record()? {
            Some(Record::Image {
                pages,
                sha256,
                seal,
            }) => entry.open(pages, sha256, seal)?.map(Ok),
            Some(Record::Unavailable { reason }) => Some(Err(reason)),
            None => None,
        };
        let image = match cached {
            Some(image) => image,
            None => {
                let progress = Progress::start(&format!(
                    "pre-initialising bundle {}",
                    short(&bundle.version)
                ));
                let built = build(sandbox, &bundle, limits).with_context(|| {
                    format!("pre-initialising bundle {}", short(&bundle.version))
                })?;
                progress.finish();
                let image = match built {
                    Ok(memory) => Ok(entry.save(&memory)?),
                    Err(reason) => {
                        entry.save_unavailable(reason.clone())?;
                        Err(reason)
                    }
                };
                evict(&dir, KEEP_IMAGES);
                image
            }
        };
        Ok(match image {
            Ok(image) => Prepared {
                bundle,
                image: Some(image),
                unavailable: None,
            },
            Err(reason) => Prepared {
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

/// Loads the bundle in a fresh instance with no grants and no environment, under `limits`,
/// and gives back the memory it leaves; or why the bundle cannot have an image, when its load
/// fails there (it reads a granted file, say), which makes it a bundle that loads per call.
///
/// The instance sees a fixed clock, a fixed random sequence and file metadata without
/// device, inode or times, so the image is the same on every machine: a trace records its
/// hash, and a replay elsewhere starts from the same bytes.
fn build(sandbox: &Sandbox, bundle: &Bundle, limits: &Limits) -> Result<Result<Vec<u8>, String>> {
    let policy = Policy {
        limits: *limits,
        ..Policy::default()
    };
    let door = bundle.load_answers(Door::default());
    let setup = Setup {
        start: Start::Fresh,
        mode: Mode::Freeze,
        capture: true,
    };
    let run = sandbox.execute(setup, &policy, door, Script::LoadAndFreeze)?;
    match run.ended {
        Ended::Finished => {}
        Ended::Limit(limit) => return Err(limit.into()),
        Ended::Exit(status) => {
            return Ok(Err(format!(
                "loading the bundle ended the interpreter with exit status {status}"
            )));
        }
        Ended::Crashed(why) => {
            return Ok(Err(format!(
                "loading the bundle ended the interpreter: {why}"
            )));
        }
        Ended::Diverged(_) => bail!("a divergence in a run that does not replay"),
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
        return Ok(Err(format!(
            "{what} raised {}: {}",
            error.kind, error.message
        )));
    }
    Ok(Ok(run
        .memory
        .context("the load turn left no memory to save")?))
}
