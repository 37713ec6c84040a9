//! host's per-machine cache folder (compiled modules, memory images, analyses), and the
//! checks that make what is read from it trusted.
//!
//! Why it is guarded: host runs the compiled modules it finds there as native code and maps
//! its images as the starting memory of calls, so a file planted or changed there would run
//! as host. The folder is created owner-only and refused (a usage error) when it, or a file in
//! it, belongs to another user or is writable by anyone but its owner. Each file host runs or
//! maps is sealed when written: its sha256 with the metadata that any change to it moves
//! (owner, mode, size, inode and change time: an in-place edit always moves ctime, which no
//! user can set). Opening it again costs one `fstat` compared with the seal; only a difference
//! costs a re-hash, and a file whose content no longer hashes to its digest is rebuilt, never
//! used.

use std::fs::{File, Metadata};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::bad_input;

/// The cache folder, checked: it exists, is a folder, is this user's, and no one else can
/// write to it.
#[derive(Debug, Clone)]
pub struct CacheDir {
    root: PathBuf,
}

impl CacheDir {
    /// Opens the cache folder at `root`, creating it (and its parents) owner-only.
    pub fn open(root: &Path) -> Result<CacheDir> {
        create_private_dir(root)?;
        check_private(root)?;
        Ok(CacheDir {
            root: root.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The subfolder `name`, created owner-only and checked like the root.
    pub fn folder(&self, name: &str) -> Result<PathBuf> {
        let dir = self.root.join(name);
        create_private_dir(&dir)?;
        check_private(&dir)?;
        Ok(dir)
    }
}

/// `$HOST_CACHE_DIR`, else `$XDG_CACHE_HOME/host`, else `~/.cache/host`, else a folder of this
/// user's own in the temporary folder (never one shared by all users).
pub fn default_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("HOST_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("host");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".cache").join("host"),
        None => std::env::temp_dir().join(format!("host-cache-{}", euid())),
    }
}

/// Creates `dir` (and its parents) readable by its owner only.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| {
            bad_input(format!(
                "cannot use `{}` as host's cache folder: {e} (set HOST_CACHE_DIR or --cache-dir to a folder of yours)",
                dir.display()
            ))
        })
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Refuses a cache folder or file another user owns or can write to.
fn check_owner(path: &Path, meta: &Metadata) -> Result<()> {
    let what = if meta.is_dir() { "folder" } else { "file" };
    if meta.uid() != euid() {
        return Err(bad_input(format!(
            "the cache {what} `{}` belongs to another user (uid {}): host runs what its cache holds, \
             so it only uses its own; set HOST_CACHE_DIR to a folder of yours",
            path.display(),
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(bad_input(format!(
            "the cache {what} `{}` can be written by other users (mode {:o}): host runs what its \
             cache holds; run `chmod go-w` on it or set HOST_CACHE_DIR to a private folder",
            path.display(),
            meta.mode() & 0o7777
        )));
    }
    Ok(())
}

fn check_private(dir: &Path) -> Result<()> {
    let meta = std::fs::metadata(dir).map_err(|e| {
        bad_input(format!(
            "cannot use `{}` as host's cache folder: {e}",
            dir.display()
        ))
    })?;
    if !meta.is_dir() {
        return Err(bad_input(format!(
            "host's cache folder `{}` is not a folder (set HOST_CACHE_DIR or --cache-dir to one)",
            dir.display()
        )));
    }
    check_owner(dir, &meta)
}

/// Opens a file of the cache for reading: None when it does not exist; refused when another
/// user owns it or can write to it.
pub fn open_file(path: &Path) -> Result<Option<File>> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("failed to open `{}`", path.display())),
    };
    check_owner(path, &file.metadata()?)?;
    Ok(Some(file))
}

/// What host knows of a cache file it wrote: its content's sha256, and the metadata that moves
/// whenever the file is changed or replaced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seal {
    pub sha256: String,
    uid: u32,
    mode: u32,
    size: u64,
    ino: u64,
    ctime: i64,
    ctime_nsec: i64,
}

/// How an opened file compares with its seal.
#[derive(Debug, PartialEq, Eq)]
pub enum Verified {
    /// Exactly the sealed file: nothing was hashed.
    Same,
    /// Its metadata moved (it was copied or linked, say) but its content still hashes to the
    /// sealed digest: this seal describes it now.
    Resealed(Seal),
    /// Not what host wrote: rebuild it.
    Changed,
}

impl Seal {
    /// The seal of a file whose content hashes to `sha256` (host just wrote it).
    pub fn of(file: &File, sha256: String) -> Result<Seal> {
        let meta = file.metadata()?;
        Ok(Seal {
            sha256,
            uid: meta.uid(),
            mode: meta.mode(),
            size: meta.size(),
            ino: meta.ino(),
            ctime: meta.ctime(),
            ctime_nsec: meta.ctime_nsec(),
        })
    }

    /// Compares an opened file with the seal `expected` (None: a file sealed by an older host,
    /// known by `sha256` only): one `fstat`, and a re-hash only when its metadata moved.
    pub fn verify(file: &File, expected: Option<&Seal>, sha256: &str) -> Result<Verified> {
        let now = Seal::of(file, sha256.to_owned())?;
        if expected == Some(&now) {
            return Ok(Verified::Same);
        }
        if hash_file(file, now.size)? == sha256 {
            Ok(Verified::Resealed(now))
        } else {
            Ok(Verified::Changed)
        }
    }
}

/// The sha256 of a file's first `len` bytes (holes read as zeros).
fn hash_file(file: &File, len: u64) -> Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < len {
        let n = file.read_at(&mut buf, at)?;
        if n == 0 {
            break;
        }
        let n = n.min((len - at) as usize);
        h.update(&buf[..n]);
        at += n as u64;
    }
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_sealed_file_is_trusted_until_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.bin");
        let bytes = b"compiled code".repeat(1000);
        std::fs::write(&path, &bytes).unwrap();
        let sha = hex::encode(Sha256::digest(&bytes));
        let seal = Seal::of(&File::open(&path).unwrap(), sha.clone()).unwrap();
        let verify =
            |seal: Option<&Seal>| Seal::verify(&File::open(&path).unwrap(), seal, &sha).unwrap();
        assert_eq!(verify(Some(&seal)), Verified::Same);
        // A file known by digest only is hashed once, then sealed.
        assert_eq!(verify(None), Verified::Resealed(seal.clone()));
        // A hard link moves the change time, not the content.
        std::fs::hard_link(&path, dir.path().join("link")).unwrap();
        assert!(matches!(verify(Some(&seal)), Verified::Resealed(_)));
        // An edit in place, even one that keeps the size and the modification time.
        let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
        let mut file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(b"C", 0).unwrap();
        file.set_modified(modified).unwrap();
        file.flush().unwrap();
        assert_eq!(verify(Some(&seal)), Verified::Changed);
    }

    #[test]
    fn a_cache_folder_others_can_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("cache");
        let cache = CacheDir::open(&root).unwrap();
        let mode = std::fs::metadata(&root).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        cache.folder("images").unwrap();

        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = format!("{:#}", CacheDir::open(&root).unwrap_err());
        assert!(e.contains("can be written by other users"), "{e}");
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700)).unwrap();

        let planted = root.join("planted");
        std::fs::write(&planted, b"x").unwrap();
        std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = format!("{:#}", open_file(&planted).unwrap_err());
        assert!(e.contains("can be written by other users"), "{e}");
        assert!(open_file(&root.join("absent")).unwrap().is_none());

        let file = root.join("a-file");
        std::fs::write(&file, b"").unwrap();
        let e = format!("{:#}", CacheDir::open(&file).unwrap_err());
        assert!(e.contains("cannot use"), "{e}");
        let dangling = root.join("dangling");
        std::os::unix::fs::symlink(root.join("nowhere/deeper"), &dangling).unwrap();
        assert!(CacheDir::open(&dangling).is_err());
    }
}
