//! Memory images: an interpreter's linear memory saved to a file, from which instances
//! start (mapped copy-on-write, see [`crate::memory`]) instead of running what made it.
//!
//! Two kinds: the interpreter's initial memory (its data segments, written once per runtime
//! beside the compiled module), and a bundle's pre-initialised memory ([`crate::preinit`]
//! builds those). Each image file has a JSON record beside it: its size and sha256, or why a
//! bundle has no image, so a failed attempt is not repeated on every call.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use wasmtime::{AsContextMut, Memory};

use crate::cache::{self, CacheDir, Seal, Verified};
use crate::engine::write_cache_file;
use crate::memory::Source;
use crate::runtime::Runtime;

const WASM_PAGE: u64 = 64 << 10;

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
pub(crate) enum Record {
    Image {
        pages: u64,
        sha256: String,
        /// Absent in records of older hosts: the image is then hashed once and sealed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seal: Option<Seal>,
    },
    Unavailable {
        reason: String,
    },
}

/// One image of the cache: its memory file and the record beside it.
pub(crate) struct Entry {
    memory: PathBuf,
    record: PathBuf,
}

impl Entry {
    /// The entry named `key` in the cache folder `dir`.
    pub(crate) fn new(dir: &Path, key: &str) -> Entry {
        Entry {
            memory: dir.join(format!("{key}.mem")),
            record: dir.join(format!("{key}.json")),
        }
    }

    /// What the record says; None when there is none (or one host cannot read).
    pub(crate) fn record(&self) -> Result<Option<Record>> {
        let Some(file) = cache::open_file(&self.record)? else {
            return Ok(None);
        };
        Ok(serde_json::from_reader(file).ok())
    }

    /// The image a record describes, if its file is still the one host wrote (sealed again
    /// when only its metadata moved); None when it must be built again.
    pub(crate) fn open(
        &self,
        pages: u64,
        sha256: String,
        seal: Option<Seal>,
    ) -> Result<Option<Image>> {
        let Some(file) = cache::open_file(&self.memory)? else {
            return Ok(None);
        };
        if file.metadata()?.len() != pages * WASM_PAGE {
            return Ok(None);
        }
        match Seal::verify(&file, seal.as_ref(), &sha256)? {
            Verified::Same => {}
            Verified::Resealed(seal) => self.write_record(&Record::Image {
                pages,
                sha256: sha256.clone(),
                seal: Some(seal),
            })?,
            Verified::Changed => return Ok(None),
        }
        Ok(Some(Image {
            source: Arc::new(Source::new(
                file,
                (pages * WASM_PAGE) as usize,
                sha256.clone(),
            )),
            pages,
            sha256,
        }))
    }

    /// Saves `memory` as this entry's image, sealed, with its record.
    pub(crate) fn save(&self, memory: &[u8]) -> Result<Image> {
        write_sparse(&self.memory, memory)?;
        let pages = memory.len() as u64 / WASM_PAGE;
        let sha256 = hex::encode(Sha256::digest(memory));
        let file = File::open(&self.memory)
            .with_context(|| format!("failed to open `{}`", self.memory.display()))?;
        let seal = Seal::of(&file, sha256.clone())?;
        self.write_record(&Record::Image {
            pages,
            sha256: sha256.clone(),
            seal: Some(seal),
        })?;
        Ok(Image {
            source: Arc::new(Source::new(file, memory.len(), sha256.clone())),
            pages,
            sha256,
        })
    }

    /// Records why there is no image, so the next call does not try again.
    pub(crate) fn save_unavailable(&self, reason: String) -> Result<()> {
        self.write_record(&Record::Unavailable { reason })
    }

    fn write_record(&self, record: &Record) -> Result<()> {
        write_cache_file(&self.record, &serde_json::to_vec(record)?)
    }
}

/// Removes all but the `keep` most recently built images. A process that still maps a removed
/// image keeps its pages; the next one to need it builds it again.
pub(crate) fn evict(dir: &Path, keep: usize) {
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

/// Writes `bytes` leaving all-zero pages as holes: most of a fresh interpreter's memory is
/// zero, and a hole costs neither disk nor page cache.
fn write_sparse(path: &Path, bytes: &[u8]) -> Result<()> {
    // Unique to this thread: threads of one process may write the same image at once.
    let tmp: PathBuf = path.with_extension(format!(
        "{}.{:?}.tmp",
        std::process::id(),
        std::thread::current().id()
    ));
    let dir = path.parent().context("an image needs a folder")?;
    cache::create_private_dir(dir)?;
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
    pub(crate) fn source(&self) -> &Arc<Source> {
        &self.source
    }

    /// Grows an instance's memory, which starts as this image's (see [`crate::memory`]), to
    /// the image's size: the memory limit applies as to any growth.
    pub(crate) fn grow_into(
        &self,
        mut store: impl AsContextMut,
        memory: Memory,
    ) -> wasmtime::Result<()> {
        let have = memory.size(&store);
        if self.pages < have {
            return Err(wasmtime::format_err!(
                "the image is smaller than the interpreter's initial memory"
            ));
        }
        memory.grow(&mut store, self.pages - have)?;
        Ok(())
    }
}

/// The interpreter's initial memory as an image, which instances that load a bundle
/// themselves start from: written once per runtime next to the compiled module.
pub(crate) fn initial_image(cache: &CacheDir, runtime: &Runtime) -> Result<Image> {
    // Beside the compiled module it belongs with, out of reach of the bundle images' eviction.
    let entry = Entry::new(
        &cache.folder("modules")?,
        &format!("{}-initial", &runtime.sha256()[..16]),
    );
    if let Some(Record::Image {
        pages,
        sha256,
        seal,
    }) = entry.record()?
        && let Some(image) = entry.open(pages, sha256, seal)?
    {
        return Ok(image);
    }
    entry.save(&runtime.initial_memory()?)
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
