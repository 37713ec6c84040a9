//! Replaying a recorded call: exactly (every import answered from the trace, every call and
//! output checked), or what-if (an updated notebook run on the recorded inputs).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::bundle::{Bundle, Select, short};
use crate::call::{self, CallResult, Outcome};
use crate::error::bad_input;
use crate::notebook::Notebook;
use crate::policy::{Grant, Limits, Policy, check_guest_paths};
use crate::preinit::Prepared;
use crate::record::{Blobs, Data, Divergence, Mode, Replaying, Served};
use crate::sandbox::Sandbox;
use crate::trace::{Header, Trace};

/// What an exact replay found.
pub struct Replayed {
    /// The replayed call, with what the guest printed.
    pub result: CallResult,
    /// Where the replay first went another way, if it did.
    pub divergence: Option<Divergence>,
}

/// Re-executes a recorded call with nothing from the host: no grants, no clocks, no random
/// source. Every import the guest makes is checked against the trace and answered from it; so
/// are the outputs at the end.
pub fn replay(sandbox: &Sandbox, trace: &Trace) -> Result<Replayed> {
    let h = &trace.header;
    check_setup(sandbox, trace)?;
    let limits = h.limits.limits()?;
    let blobs = trace.blobs(&sandbox.runtime().stdlib_dir());
    trace.check_data(&blobs)?;
    let prepared = prepare(sandbox, h, &limits)?;
    let policy = Policy {
        grants: Vec::new(),
        env: h.env.clone(),
        limits,
    };
    let mode = Mode::replay(trace.events.clone(), blobs);
    let (result, mode) =
        call::execute(sandbox, &policy, &prepared, &h.function, &h.arguments, mode)?;
    if let Outcome::Diverged(d) = &result.outcome {
        return Ok(Replayed {
            divergence: Some(d.clone()),
            result,
        });
    }
    let Mode::Replay(Replaying {
        events,
        blobs,
        next,
        ..
    }) = mode
    else {
        anyhow::bail!("the replay lost its tracer");
    };
    let mut divergence = None;
    if next < events.len() {
        let e = &events[next];
        divergence = Some(Divergence {
            index: next,
            expected: Some(format!(
                "{}({:?}), and {} more recorded events",
                e.call,
                e.args,
                events.len() - next - 1
            )),
            actual: "the call ended".into(),
        });
    } else if let Some(what) = output_mismatch(trace, &blobs, &result)? {
        divergence = Some(Divergence {
            index: events.len(),
            expected: Some(what.0),
            actual: what.1,
        });
    }
    Ok(Replayed { result, divergence })
}

/// The recorded and replayed outputs, when they differ: (expected, actual).
fn output_mismatch(
    trace: &Trace,
    blobs: &Blobs,
    result: &CallResult,
) -> Result<Option<(String, String)>> {
    let recorded = |d: &Option<Data>| {
        d.as_ref()
            .map(|d| blobs.get(d))
            .transpose()
            .map(Option::unwrap_or_default)
    };
    for (name, want, got) in [
        ("stdout", recorded(&trace.outputs.stdout)?, &result.stdout),
        ("stderr", recorded(&trace.outputs.stderr)?, &result.stderr),
    ] {
        if &want != got {
            return Ok(Some((
                format!("{name} of {} bytes", want.len()),
                format!(
                    "{name} of {} bytes: {:?}",
                    got.len(),
                    String::from_utf8_lossy(&got[..got.len().min(200)])
                ),
            )));
        }
    }
    let outcome = result.outcome.to_json();
    if outcome != trace.outputs.outcome {
        return Ok(Some((
            format!("outcome {}", trace.outputs.outcome),
            format!("outcome {outcome}"),
        )));
    }
    Ok(None)
}

/// Refuses a trace this host cannot replay exactly, saying why.
fn check_setup(sandbox: &Sandbox, trace: &Trace) -> Result<()> {
    let h = &trace.header;
    if h.runtime_sha256 != sandbox.runtime().sha256() {
        return Err(bad_input(format!(
            "the trace was recorded with runtime {}, and this host runs {}: replay it with the same runtime",
            short(&h.runtime_sha256),
            short(sandbox.runtime().sha256())
        )));
    }
    if &h.engine != sandbox.engine_settings() {
        return Err(bad_input(format!(
            "the trace was recorded with engine settings {:?}",
            h.engine
        )));
    }
    h.bundle.check_version().context("the trace's bundle")?;
    Ok(())
}

/// The trace's bundle ready to call, from the same pre-initialised memory as the recording.
fn prepare(sandbox: &Sandbox, h: &Header, limits: &Limits) -> Result<Prepared> {
    let Some(want) = h.image_sha256.as_deref() else {
        return Ok(Prepared::without_image(h.bundle.clone()));
    };
    let prepared = Prepared::with_limits(sandbox, h.bundle.clone(), limits)?;
    match &prepared.image {
        Some(image) if image.sha256 == want => Ok(prepared),
        // Not a bug here: a trace from another build of host, whose guest code makes another
        // image of the same bundle. The user can act on it by replaying with that build.
        Some(image) => Err(bad_input(format!(
            "the pre-initialised memory built here ({}) differs from the recording's ({}), so the call cannot be replayed exactly: replay it with the build of host {} that recorded it",
            short(&image.sha256),
            short(want),
            h.host_version
        ))),
        None => Err(bad_input(format!(
            "the recording started from a pre-initialised image, and none can be built here: {}",
            prepared.unavailable.as_deref().unwrap_or("unknown reason")
        ))),
    }
}

/// What a what-if run found: the recorded outcome and the updated notebook's.
pub struct WhatIf {
    pub recorded: Value,
    pub result: CallResult,
    /// The new bundle's version.
    pub version: String,
    /// Where the two outcomes differ, one line each (`result[0].spend: 280.49 -> 290.49`).
    pub differences: Vec<String>,
}

/// Runs `notebook`'s version of the recorded function on the recorded inputs: the same
/// arguments and environment, the files the recording read (rebuilt in temporary directories
/// at the same guest paths), and its clock readings and random bytes as far as they go.
pub fn what_if(sandbox: &Sandbox, trace: &Trace, notebook: &Notebook) -> Result<WhatIf> {
    let h = &trace.header;
    let function = h.function.as_str();
    let limits = h.limits.limits()?;
    let bundle = Bundle::from_notebook(sandbox, notebook, Select::Only(&[function]), None)?;
    let version = bundle.version.clone();
    let prepared = Prepared::with_limits(sandbox, bundle, &limits)?;
    let blobs = trace.blobs(&sandbox.runtime().stdlib_dir());
    trace.check_data(&blobs)?;
    // The grants come from the trace: held to what `--grant` accepts before a folder is made.
    check_guest_paths(h.grants.iter().map(|g| g.guest.as_str())).context("the trace's grants")?;
    let files = RecordedFiles::from_trace(trace, &blobs)?;
    let mut dirs = Vec::new();
    let mut grants = Vec::new();
    for g in &h.grants {
        let dir =
            tempfile::tempdir().context("failed to make a directory for the recorded files")?;
        files.write_under(&g.guest, dir.path())?;
        grants.push(Grant {
            host: dir.path().to_owned(),
            guest: g.guest.clone(),
            writable: g.writable,
        });
        dirs.push(dir);
    }
    let policy = Policy {
        grants,
        env: h.env.clone(),
        limits,
    };
    let mode = Mode::WhatIf(served(trace, &blobs)?);
    let (result, _) = call::execute(sandbox, &policy, &prepared, function, &h.arguments, mode)?;
    let mut differences = Vec::new();
    diff(
        &trace.outputs.outcome,
        &result.outcome.to_json(),
        "",
        &mut differences,
    );
    drop(dirs);
    Ok(WhatIf {
        recorded: trace.outputs.outcome.clone(),
        result,
        version,
        differences,
    })
}

/// The tracer of a what-if run: the recording's clock readings (per clock) and random bytes,
/// served in order to the guest's own `clock_time_get` and `random_get` calls, then live.
pub fn served(trace: &Trace, blobs: &Blobs) -> Result<Served> {
    let mut clocks: HashMap<i64, VecDeque<Vec<u8>>> = HashMap::new();
    let mut random = VecDeque::new();
    for e in trace.events.iter().filter(|e| e.result == 0) {
        let (Some((_, data)), Some(&clock)) = (e.writes.first(), e.args.first()) else {
            continue;
        };
        match e.call.as_str() {
            "clock_time_get" => clocks.entry(clock).or_default().push_back(blobs.get(data)?),
            "random_get" => random.extend(blobs.get(data)?),
            _ => {}
        }
    }
    Ok(Served { clocks, random })
}

/// How far into a file a rebuilt read may reach. The rebuilt files are sparse (only what was
/// read is written), so this bounds offsets, not memory: what a real file system allows.
const MAX_FILE_END: u64 = 1 << 40;

/// The files and directories a recorded call saw in its grants, rebuilt from its reads: each
/// file as the ranges that were read of it.
#[derive(Debug, Default)]
pub struct RecordedFiles {
    files: BTreeMap<String, Vec<(u64, Vec<u8>)>>,
    dirs: BTreeSet<String>,
}

/// A descriptor the recording opened: the guest path it names, and the preopened directory
/// (grant) it lies in, which no path opened from it may leave.
#[derive(Debug, Clone)]
struct OpenFd {
    root: String,
    path: String,
}

impl RecordedFiles {
    /// Every path, offset and length is the trace's word: each is checked, and a trace that
    /// names a path out of its grant, or a read far past any file's end, is refused naming the
    /// event.
    pub fn from_trace(trace: &Trace, blobs: &Blobs) -> Result<RecordedFiles> {
        let mut out = RecordedFiles::default();
        let mut open: HashMap<i64, OpenFd> = HashMap::new();
        let mut positions: HashMap<i64, u64> = HashMap::new();
        for (index, e) in trace
            .events
            .iter()
            .enumerate()
            .filter(|(_, e)| e.result == 0)
        {
            let refuse = |why: String| {
                bad_input(format!(
                    "the trace's event {index} ({}) is refused: {why}",
                    e.call
                ))
            };
            let fd = e.args.first().copied().unwrap_or(-1);
            let bytes = |i: usize| -> Result<Vec<u8>> {
                e.writes
                    .get(i)
                    .map(|(_, d)| blobs.get(d))
                    .transpose()
                    .map(Option::unwrap_or_default)
            };
            match e.call.as_str() {
                "fd_prestat_dir_name" => {
                    let name = String::from_utf8(bytes(0)?)
                        .map_err(|_| refuse("the directory's name is not UTF-8".into()))?;
                    let root = join("/", &name).map_err(refuse)?;
                    open.insert(
                        fd,
                        OpenFd {
                            path: root.clone(),
                            root,
                        },
                    );
                }
                "path_open" => {
                    let (Some(dir), Some(path)) = (open.get(&fd).cloned(), &e.path) else {
                        continue;
                    };
                    if path.starts_with('/') {
                        return Err(refuse(format!("it opens the absolute path `{path}`")));
                    }
                    let full = join(&dir.path, path).map_err(refuse)?;
                    if !under(&full, &dir.root) {
                        return Err(refuse(format!(
                            "the path `{path}` leads out of `{}`",
                            dir.root
                        )));
                    }
                    let new_fd = bytes(0)?
                        .get(..4)
                        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                    if e.args.get(4).is_some_and(|flags| flags & 2 != 0) {
                        out.dirs.insert(full.clone());
                    }
                    if let Some(new_fd) = new_fd {
                        let opened = OpenFd {
                            root: dir.root,
                            path: full,
                        };
                        open.insert(i64::from(new_fd), opened);
                        positions.insert(i64::from(new_fd), 0);
                    }
                }
                "fd_read" | "fd_pread" => {
                    let Some(file) = open.get(&fd) else { continue };
                    let data: Vec<u8> = (0..e.writes.len().saturating_sub(1))
                        .map(bytes)
                        .collect::<Result<Vec<_>>>()?
                        .concat();
                    let at = if e.call == "fd_pread" {
                        let at = e
                            .args
                            .get(3)
                            .copied()
                            .ok_or_else(|| refuse("it has no offset".into()))?;
                        u64::try_from(at)
                            .map_err(|_| refuse(format!("the offset {at} is negative")))?
                    } else {
                        positions.get(&fd).copied().unwrap_or(0)
                    };
                    let end = at
                        .checked_add(data.len() as u64)
                        .filter(|&end| end <= MAX_FILE_END)
                        .ok_or_else(|| {
                            refuse(format!(
                                "it reads {} bytes at offset {at}, past any file's end",
                                data.len()
                            ))
                        })?;
                    out.files
                        .entry(file.path.clone())
                        .or_default()
                        .push((at, data));
                    if e.call == "fd_read" {
                        positions.insert(fd, end);
                    }
                }
                "fd_seek" => {
                    if let Some(b) = bytes(0)?.get(..8) {
                        let mut position = [0; 8];
                        position.copy_from_slice(b);
                        positions.insert(fd, u64::from_le_bytes(position));
                    }
                }
                "fd_readdir" => {
                    let Some(dir) = open.get(&fd).cloned() else {
                        continue;
                    };
                    out.dirs.insert(dir.path.clone());
                    for (name, kind) in dirents(&bytes(0)?) {
                        if name == "." || name == ".." {
                            continue;
                        }
                        if name.contains(['/', '\0']) {
                            return Err(refuse(format!(
                                "it lists the name {name:?}, which is not a file name"
                            )));
                        }
                        let child = join(&dir.path, &name).map_err(refuse)?;
                        if kind == 3 {
                            out.dirs.insert(child);
                        } else {
                            out.files.entry(child).or_default();
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// Writes what lies under the guest path `guest` into `dir`, through a capability on it:
    /// whatever the trace says, nothing is created outside `dir` (no `..`, absolute path or
    /// symbolic link leads out of a `cap_std` directory).
    fn write_under(&self, guest: &str, dir: &std::path::Path) -> Result<()> {
        let root = cap_std::fs::Dir::open_ambient_dir(dir, cap_std::ambient_authority())
            .with_context(|| format!("failed to open `{}`", dir.display()))?;
        let prefix = format!("{}/", guest.trim_end_matches('/'));
        let inside = |p: &String| p.strip_prefix(&prefix).map(str::to_owned);
        let cannot = |path: &str, e: std::io::Error| {
            bad_input(format!(
                "the trace's recorded file `{path}` cannot be rebuilt: {e}"
            ))
        };
        for d in &self.dirs {
            if let Some(rel) = inside(d) {
                root.create_dir_all(&rel).map_err(|e| cannot(d, e))?;
            }
        }
        for (path, ranges) in &self.files {
            let Some(rel) = inside(path) else { continue };
            if let Some(parent) = std::path::Path::new(&rel).parent()
                && !parent.as_os_str().is_empty()
            {
                root.create_dir_all(parent).map_err(|e| cannot(path, e))?;
            }
            let file = root.create(&rel).map_err(|e| cannot(path, e))?.into_std();
            for (at, data) in ranges {
                std::os::unix::fs::FileExt::write_all_at(&file, data, *at)
                    .map_err(|e| cannot(path, e))?;
            }
        }
        Ok(())
    }
}

/// The entries of a WASI `fd_readdir` buffer: (name, file type), as far as they are whole.
fn dirents(listing: &[u8]) -> Vec<(String, u8)> {
    let mut out = Vec::new();
    let mut rest = listing;
    // Each entry: d_next (8), d_ino (8), d_namlen (4), d_type (1), padding (3), then the name.
    while let Some((head, tail)) = rest.split_at_checked(24) {
        let len = u32::from_le_bytes([head[16], head[17], head[18], head[19]]) as usize;
        let Some((name, tail)) = tail.split_at_checked(len) else {
            break;
        };
        out.push((String::from_utf8_lossy(name).into_owned(), head[20]));
        rest = tail;
    }
    out
}

/// A guest path joined with a relative one, `.` components dropped and `..` taking one back;
/// refused when it would climb above `/`.
fn join(dir: &str, path: &str) -> std::result::Result<String, String> {
    if path.contains('\0') {
        return Err(format!("the path {path:?} holds a NUL byte"));
    }
    let mut parts: Vec<&str> = dir.split('/').filter(|p| !p.is_empty()).collect();
    for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
        if part == ".." {
            if parts.pop().is_none() {
                return Err(format!("the path `{path}` climbs above `/`"));
            }
        } else {
            parts.push(part);
        }
    }
    Ok(format!("/{}", parts.join("/")))
}

/// Whether the guest path `path` is `root` or lies beneath it.
fn under(path: &str, root: &str) -> bool {
    root == "/"
        || path == root
        || path
            .strip_prefix(root)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// One line per difference between two JSON values: `path: old -> new`.
pub fn diff(old: &Value, new: &Value, path: &str, out: &mut Vec<String>) {
    let key = |k: &str| {
        if path.is_empty() {
            k.to_owned()
        } else {
            format!("{path}.{k}")
        }
    };
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                match b.get(k) {
                    Some(w) => diff(v, w, &key(k), out),
                    None => out.push(format!("{}: {v} -> (absent)", key(k))),
                }
            }
            for (k, w) in b.iter().filter(|(k, _)| !a.contains_key(*k)) {
                out.push(format!("{}: (absent) -> {w}", key(k)));
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for i in 0..a.len().max(b.len()) {
                let p = format!("{path}[{i}]");
                match (a.get(i), b.get(i)) {
                    (Some(v), Some(w)) => diff(v, w, &p, out),
                    (Some(v), None) => out.push(format!("{p}: {v} -> (absent)")),
                    (None, Some(w)) => out.push(format!("{p}: (absent) -> {w}")),
                    (None, None) => {}
                }
            }
        }
        _ if old != new => {
            let place = if path.is_empty() {
                "the whole outcome"
            } else {
                path
            };
            out.push(format!("{place}: {old} -> {new}"));
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn diffs_name_the_paths_that_changed() {
        let mut out = Vec::new();
        diff(
            &json!({"returned": [{"a": 1, "b": 2}], "x": 1}),
            &json!({"returned": [{"a": 1, "b": 3}, {"a": 0}], "y": 2}),
            "",
            &mut out,
        );
        assert_eq!(
            out,
            [
                "returned[0].b: 2 -> 3",
                "returned[1]: (absent) -> {\"a\":0}",
                "x: 1 -> (absent)",
                "y: (absent) -> 2",
            ]
        );
    }

    #[test]
    fn guest_paths_join_without_dots_and_never_above_the_root() {
        assert_eq!(join("/data", "./sub//a.txt").unwrap(), "/data/sub/a.txt");
        assert_eq!(join("/data/", "a").unwrap(), "/data/a");
        assert_eq!(join("/data", "sub/../a").unwrap(), "/data/a");
        assert_eq!(join("/data", "../etc/passwd").unwrap(), "/etc/passwd");
        assert!(!under("/etc/passwd", "/data"));
        assert!(!under("/database", "/data"));
        assert!(under("/data/a", "/data") && under("/data", "/data"));
        for bad in ["../../x", "a/../../../x", "a\0b"] {
            assert!(join("/data", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rebuilt_files_cannot_leave_their_folder_whatever_the_paths_say() {
        let world = tempfile::tempdir().unwrap();
        let inner = world.path().join("inner");
        std::fs::create_dir(&inner).unwrap();
        std::os::unix::fs::symlink(world.path(), inner.join("link")).unwrap();
        // Paths as a trace could name them, past the checks `from_trace` makes: the
        // capability on the folder is what holds.
        for path in [
            "/data/../escaped",
            "/data/sub/../../escaped",
            "/data/link/escaped",
            "/data//escaped/../../escaped",
        ] {
            let files = RecordedFiles {
                files: [(path.to_owned(), vec![(0, b"x".to_vec())])].into(),
                dirs: BTreeSet::new(),
            };
            let e = files.write_under("/data", &inner).unwrap_err();
            assert!(
                format!("{e:#}").contains("cannot be rebuilt"),
                "{path}: {e:#}"
            );
            assert!(!world.path().join("escaped").exists(), "{path} escaped");
            let dirs = RecordedFiles {
                files: BTreeMap::new(),
                dirs: [path.to_owned()].into(),
            };
            assert!(dirs.write_under("/data", &inner).is_err(), "{path}");
            assert!(!world.path().join("escaped").exists(), "{path} escaped");
        }
        let sparse = RecordedFiles {
            files: [(
                "/data/a/b.txt".to_owned(),
                vec![(4, b"tail".to_vec()), (0, b"he".to_vec())],
            )]
            .into(),
            dirs: BTreeSet::new(),
        };
        sparse.write_under("/data", &inner).unwrap();
        assert_eq!(std::fs::read(inner.join("a/b.txt")).unwrap(), b"he\0\0tail");
    }

    /// `/data` preopened as fd 4, `a.csv` in it opened as fd 5, then `last` (JSON events, as
    /// a trace file holds them), in a trace with an empty bundle.
    fn trace_reading(last: Value) -> Trace {
        serde_json::from_value(json!({
            "header": {
                "format": "host-trace/1", "host_version": "0", "runtime_sha256": "",
                "bundle": {"format": "host-bundle/1", "version": "", "chunks": [], "manifest": {
                    "notebook": "n.ipynb", "notebook_sha256": "", "functions": [],
                    "runtime_sha256": "", "host_version": "0", "created": "", "label": null,
                    "closures": [], "warnings": []}},
                "function": "f", "arguments": {}, "env": [],
                "grants": [{"guest": "/data", "writable": false}],
                "limits": {"memory": 1, "timeout_ms": 1, "output": 1},
                "engine": {"nan_canonicalization": true, "relaxed_simd_deterministic": true,
                           "threads": false},
                "image_sha256": null, "recorded_at": ""},
            "events": [
                {"call": "fd_prestat_dir_name", "args": [4, 0, 5], "result": 0,
                 "writes": [[0, {"inline": "L2RhdGE="}]]},
                {"call": "path_open", "args": [4, 1, 0, 5, 0, 0, 0, 0, 0], "result": 0,
                 "path": "a.csv", "writes": [[0, {"inline": "BQAAAA=="}]]},
                last,
            ],
            "blobs": {},
            "outputs": {"outcome": null},
        }))
        .unwrap()
    }

    #[test]
    fn recorded_reads_the_trace_fuzz_target_crashed_on_are_refused() {
        // Each crashed the trace fuzz target before main's checks: a pread without its offset
        // (args[3] indexed), offsets of -1 (`at + len` overflowed) and 1 TiB (allocated).
        let pread = |args: Value| {
            json!({"call": "fd_pread", "args": args, "result": 0,
                   "writes": [[0, {"inline": "eA=="}], [0, {"inline": "AQAAAA=="}]]})
        };
        for (args, why) in [
            (json!([5, 0, 1]), "it has no offset"),
            (json!([5, 0, 1, -1, 0]), "the offset -1 is negative"),
            (json!([5, 0, 1, 1u64 << 40, 0]), "past any file's end"),
        ] {
            let t = trace_reading(pread(args));
            let e = RecordedFiles::from_trace(&t, &Blobs::default()).unwrap_err();
            assert!(format!("{e:#}").contains(why), "{e:#}");
        }
        // A clock reading without its clock (args[0] indexed) is not served.
        let t = trace_reading(json!({"call": "clock_time_get", "args": [], "result": 0,
                                     "writes": [[0, {"inline": "AQAAAAAAAAA="}]]}));
        assert!(served(&t, &Blobs::default()).unwrap().clocks.is_empty());
    }

    #[test]
    fn directory_listings_parse_as_far_as_they_are_whole() {
        let mut listing = vec![0u8; 24];
        listing[16] = 3;
        listing[20] = 4;
        listing.extend_from_slice(b"abc");
        let mut torn = vec![0u8; 24];
        torn[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        listing.extend_from_slice(&torn);
        listing.extend_from_slice(&[1, 2, 3]);
        assert_eq!(dirents(&listing), [("abc".to_owned(), 4)]);
        assert!(dirents(&[0; 23]).is_empty());
    }
}
