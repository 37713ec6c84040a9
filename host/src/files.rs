//! The files host reads and writes for the user: notebooks, bundles, traces and inputs in,
//! bundles, traces and cache files out.
//!
//! Every one of them may come from someone else, so reads take regular files only (a FIFO or
//! `/dev/zero` would never end) and stop at a cap before the bytes are in memory; writes go to
//! a temporary file in the same folder, owner-only, renamed into place, so a reader sees a
//! whole file or none and a file that existed with wider permissions does not keep them. When
//! `HOST_SIGNING_KEY` names a key file, bundles and traces carry an HMAC-SHA256 of their bytes
//! on a first line of their own, and reading refuses one that lacks it or does not match.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::bad_input;

/// How much of a notebook or a bundle host reads: notebooks keep their outputs (plots
/// included), so real ones reach tens of megabytes; past this it is not a notebook.
pub const MAX_NOTEBOOK: u64 = 256 << 20;

/// Reads the regular file at `path` (`what` names it in messages: "notebook", "trace"),
/// refusing anything else and anything longer than `cap` bytes, before reading it.
pub fn read_regular(path: &Path, what: &str, cap: u64) -> Result<Vec<u8>> {
    let cannot =
        |e: std::io::Error| bad_input(format!("cannot read {what} `{}`: {e}", path.display()));
    // Non-blocking, so that opening a FIFO returns at once and is refused below, instead of
    // waiting for a writer; it changes nothing for a regular file.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(cannot)?;
    let meta = file.metadata().map_err(cannot)?;
    if !meta.is_file() {
        let kind = if meta.is_dir() {
            "a directory"
        } else {
            "not a regular file (a device, a FIFO or a socket)"
        };
        return Err(bad_input(format!(
            "cannot read {what} `{}`: it is {kind}",
            path.display()
        )));
    }
    if meta.len() > cap {
        return Err(too_large(&format!("{what} `{}`", path.display()), cap));
    }
    read_capped(file, &format!("{what} `{}`", path.display()), cap)
}

/// Reads `reader` to its end, refusing it once it has given more than `cap` bytes: the cap
/// holds while reading, whatever the source claims its size is.
pub fn read_capped(reader: impl Read, what: &str, cap: u64) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    reader
        .take(cap.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| bad_input(format!("cannot read {what}: {e}")))?;
    if bytes.len() as u64 > cap {
        return Err(too_large(what, cap));
    }
    Ok(bytes)
}

fn too_large(what: &str, cap: u64) -> anyhow::Error {
    bad_input(format!(
        "{what} is larger than {}, more than host reads",
        crate::policy::Size(cap)
    ))
}

/// Writes `bytes` to `path` readable by its owner only, atomically: into a temporary file in
/// the same folder, renamed over `path`, so a concurrent reader never sees half a file and a
/// file that was there (with whatever permissions) is replaced, not reused.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    // tempfile creates the file 0600 with a name no other process picks.
    let mut tmp = tempfile::Builder::new()
        .prefix(".host-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .with_context(|| format!("failed to create a file in `{}`", dir.display()))?;
    tmp.write_all(bytes)
        .with_context(|| format!("failed to write `{}`", path.display()))?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("failed to write `{}`", path.display()))?;
    Ok(())
}

/// The environment variable naming the signing key file.
pub const SIGNING_KEY_VAR: &str = "HOST_SIGNING_KEY";

/// The first line of a signed file starts with this, then the HMAC's hex digits.
const SIGNATURE: &[u8] = b"host-signature hmac-sha256 ";

/// A key that signs the bundles and traces host writes, and that those it reads must carry.
#[derive(Clone)]
pub struct SigningKey(Vec<u8>);

impl SigningKey {
    /// The key `HOST_SIGNING_KEY` names, if it is set.
    pub fn from_env() -> Result<Option<SigningKey>> {
        let Some(path) = std::env::var_os(SIGNING_KEY_VAR) else {
            return Ok(None);
        };
        let path = PathBuf::from(path);
        let key = read_regular(&path, &format!("signing key ({SIGNING_KEY_VAR})"), 1 << 20)?;
        if key.len() < 16 {
            return Err(bad_input(format!(
                "the signing key `{}` ({SIGNING_KEY_VAR}) has {} bytes; use at least 16 random bytes",
                path.display(),
                key.len()
            )));
        }
        Ok(Some(SigningKey(key)))
    }

    fn mac(&self, bytes: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes keys of any size");
        mac.update(bytes);
        mac
    }

    /// `bytes` with a first line carrying their HMAC.
    pub fn sign(&self, bytes: &[u8]) -> Vec<u8> {
        let tag = hex::encode(self.mac(bytes).finalize().into_bytes());
        let mut out = SIGNATURE.to_vec();
        out.extend_from_slice(tag.as_bytes());
        out.push(b'\n');
        out.extend_from_slice(bytes);
        out
    }
}

/// Whether these bytes start with a signature line.
pub fn is_signed(bytes: &[u8]) -> bool {
    bytes.starts_with(SIGNATURE)
}

/// Bytes as written: signed when a key is given.
pub fn sealed(key: Option<&SigningKey>, bytes: Vec<u8>) -> Vec<u8> {
    match key {
        Some(key) => key.sign(&bytes),
        None => bytes,
    }
}

/// The content of a file host wrote, its signature line checked and removed: with a key, a
/// file without a signature or with a wrong one is refused; without, a signature is ignored.
/// `what` names the file in messages.
pub fn unsealed<'a>(key: Option<&SigningKey>, bytes: &'a [u8], what: &str) -> Result<&'a [u8]> {
    let (tag, body) = match bytes.strip_prefix(SIGNATURE) {
        Some(rest) => match rest.iter().position(|&b| b == b'\n') {
            Some(end) => (Some(&rest[..end]), &rest[end + 1..]),
            None => {
                return Err(bad_input(format!(
                    "{what} is refused: its signature line is truncated"
                )));
            }
        },
        None => (None, bytes),
    };
    let Some(key) = key else {
        return Ok(body);
    };
    let Some(tag) = tag else {
        return Err(bad_input(format!(
            "{what} is refused: it is not signed, and {SIGNING_KEY_VAR} asks for signed files"
        )));
    };
    let tag = hex::decode(tag)
        .map_err(|_| bad_input(format!("{what} is refused: its signature is malformed")))?;
    key.mac(body).verify_slice(&tag).map_err(|_| {
        bad_input(format!(
            "{what} is refused: its signature does not match ({SIGNING_KEY_VAR})"
        ))
    })?;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_refuse_what_is_not_a_regular_file_or_too_large() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"12345").unwrap();
        assert_eq!(read_regular(&file, "input", 5).unwrap(), b"12345");
        let fifo = dir.path().join("fifo");
        let name = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
        for (path, cap, needle) in [
            (file.as_path(), 4, "larger than 4 bytes"),
            (Path::new("/dev/zero"), 1 << 20, "not a regular file"),
            (fifo.as_path(), 1 << 20, "not a regular file"),
            (dir.path(), 1 << 20, "a directory"),
            (Path::new("/nonexistent/x"), 1, "No such file"),
        ] {
            let e = format!("{:#}", read_regular(path, "input", cap).unwrap_err());
            assert!(e.contains(needle), "{path:?}: {e}");
        }
        let e = read_capped(std::io::repeat(0), "stdin", 10).unwrap_err();
        assert!(format!("{e:#}").contains("stdin is larger than 10 bytes"));
    }

    #[test]
    fn writes_replace_a_wider_file_with_an_owner_only_one() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        std::fs::write(&path, b"old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary left"
        );
    }

    #[test]
    fn signatures_are_checked_only_with_a_key() {
        let key = SigningKey(b"0123456789abcdef".to_vec());
        let other = SigningKey(b"fedcba9876543210".to_vec());
        let signed = key.sign(b"body");
        assert_eq!(unsealed(Some(&key), &signed, "t").unwrap(), b"body");
        assert_eq!(unsealed(None, &signed, "t").unwrap(), b"body");
        assert_eq!(unsealed(None, b"body", "t").unwrap(), b"body");
        let mut forged = signed.clone();
        *forged.last_mut().unwrap() = b'B';
        for (bytes, needle) in [
            (&b"body"[..], "not signed"),
            (&other.sign(b"body")[..], "does not match"),
            (&forged[..], "does not match"),
            (&b"host-signature hmac-sha256 zz\nbody"[..], "malformed"),
            (&b"host-signature hmac-sha256 00"[..], "truncated"),
        ] {
            let e = format!("{:#}", unsealed(Some(&key), bytes, "t").unwrap_err());
            assert!(e.contains(needle), "{e}");
        }
    }
}
