//! Replaying a recorded call: exactly (every import answered from the trace, every call and
//! output checked), or what-if (an updated notebook run on the recorded inputs).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::bundle::{Bundle, Select, short};
use crate::call::{self, CallResult, Outcome};
use crate::error::bad_input;
use crate::notebook::Notebook;
use crate::policy::{Grant, LimitExceeded, Limits, Policy, check_guest_paths};
use crate::preinit::Prepared;
use crate::record::{Blobs, Data, Divergence, Event, Live, Mode, Recording, Replaying, Served};
use crate::sandbox::Sandbox;
use crate::trace::{GrantRecord, Header, Trace};

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
    // A call that ended on its record limit replays to that limit: its trace holds every
    // event up to the one that did not fit.
    let ended_at = Outcome::Limit(LimitExceeded::Record(limits.record));
    let ended_at = (trace.outputs.outcome == ended_at.to_json()).then_some(limits.record);
    let mode = Mode::replay(trace.events.clone(), blobs, ended_at);
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

/// What a what-if run found: the recorded outcome and the candidate's.
pub struct WhatIf {
    pub recorded: Value,
    pub result: CallResult,
    /// The candidate bundle's version.
    pub version: String,
    /// Where the two outcomes differ, exactly (`returned[0].spend: 280.49 -> 290.49`).
    pub differences: Vec<Difference>,
    /// What the candidate read of its grants that the recording does not hold, one sentence
    /// each (`it opens `/data/new.csv`, which the recorded call never opened`): the files
    /// are rebuilt from the recording's reads, so the candidate saw a missing file, or zeros,
    /// where production would have given it content. Empty when every read was recorded.
    pub unrecorded: Vec<String>,
    /// The clock readings and random draws the candidate got live, the recording's used up.
    pub live: Live,
}

/// Runs `notebook`'s version of the recorded function on the recorded inputs (see
/// [`what_if_prepared`]).
pub fn what_if(sandbox: &Sandbox, trace: &Trace, notebook: &Notebook) -> Result<WhatIf> {
    let function = trace.header.function.as_str();
    let limits = trace.header.limits.limits()?;
    let bundle = Bundle::from_notebook(sandbox, notebook, Select::Only(&[function]), None)?;
    let candidate = Prepared::with_limits(sandbox, bundle, &limits)?;
    what_if_prepared(sandbox, trace, &candidate)
}

/// Runs `candidate`'s version of the recorded function on the recorded inputs: the same
/// arguments, environment and limits, the files the recording read (rebuilt in temporary
/// directories at the same guest paths), and its clock readings and random bytes as far as
/// they go. One prepared candidate serves any number of traces, from any threads.
pub fn what_if_prepared(sandbox: &Sandbox, trace: &Trace, candidate: &Prepared) -> Result<WhatIf> {
    let h = &trace.header;
    let function = h.function.as_str();
    let limits = h.limits.limits()?;
    let stdlib = sandbox.runtime().stdlib_dir();
    let blobs = trace.blobs(&stdlib);
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
    let mode = Mode::WhatIf(served(trace, &blobs, limits.record)?);
    let (result, mode) = call::execute(sandbox, &policy, candidate, function, &h.arguments, mode)?;
    drop(dirs);
    let Mode::WhatIf(Served {
        files: mut seen,
        live,
        ..
    }) = mode
    else {
        anyhow::bail!("the what-if run lost its tracer");
    };
    seen.blobs.runtime = Some(stdlib);
    let seen = RecordedFiles::from_events(&seen.events, &seen.blobs)
        .context("following the candidate's file reads")?;
    let mut differences = Vec::new();
    diff(
        &trace.outputs.outcome,
        &result.outcome.to_json(),
        "",
        Tolerance::EXACT,
        &mut differences,
    );
    Ok(WhatIf {
        recorded: trace.outputs.outcome.clone(),
        result,
        version: candidate.bundle.version.clone(),
        differences,
        unrecorded: files.unrecorded(&seen, &h.grants),
        live,
    })
}

/// The tracer of a what-if run: the recording's clock readings (per clock) and random bytes,
/// served in order to the guest's own `clock_time_get` and `random_get` calls, then live.
/// What it keeps of its own file system calls may grow to `budget` bytes, as a recording.
pub fn served(trace: &Trace, blobs: &Blobs, budget: u64) -> Result<Served> {
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
    Ok(Served {
        clocks,
        random,
        live: Live::default(),
        files: Recording::within(budget),
    })
}

/// WASI's file type of a regular file.
const REGULAR_FILE: u8 = 4;

/// How far into a file a rebuilt read may reach. The rebuilt files are sparse (only what was
/// read is written), so this bounds offsets, not memory: what a real file system allows.
const MAX_FILE_END: u64 = 1 << 40;

/// The files and directories a recorded call saw in its grants, rebuilt from its reads: each
/// file as the ranges that were read of it.
#[derive(Debug, Default)]
pub struct RecordedFiles {
    files: BTreeMap<String, Vec<(u64, Vec<u8>)>>,
    dirs: BTreeSet<String>,
    /// Every path the call opened or looked up, whatever the answer (a file it found missing
    /// is missing in the rebuilt folder too).
    touched: BTreeSet<String>,
    /// The directories whose listing the call read.
    listed: BTreeSet<String>,
    /// The paths the call created or truncated: what it reads of them is its own writing.
    created: BTreeSet<String>,
    /// The size of each regular file whose metadata the call read (Python's `open` does):
    /// a rebuilt file has it, so its end is where the recording found it.
    sizes: BTreeMap<String, u64>,
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
        Self::from_events(&trace.events, blobs)
    }

    /// [`RecordedFiles::from_trace`] on a run's events: a trace's, or those a what-if run kept.
    pub fn from_events(events: &[Event], blobs: &Blobs) -> Result<RecordedFiles> {
        let mut out = RecordedFiles::default();
        let mut open: HashMap<i64, OpenFd> = HashMap::new();
        let mut positions: HashMap<i64, u64> = HashMap::new();
        for (index, e) in events.iter().enumerate() {
            let fd = e.args.first().copied().unwrap_or(-1);
            if e.result != 0 {
                // A path the call looked for and did not find is part of what it saw.
                if let (Some(dir), Some(path)) = (open.get(&fd), &e.path)
                    && matches!(e.call.as_str(), "path_open" | "path_filestat_get")
                    && let Ok(full) = join(&dir.path, path)
                {
                    out.touched.insert(full);
                }
                continue;
            }
            let refuse = |why: String| {
                bad_input(format!(
                    "the trace's event {index} ({}) is refused: {why}",
                    e.call
                ))
            };
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
                    // WASI's oflags: CREAT 1, DIRECTORY 2, EXCL 4, TRUNC 8.
                    let oflags = e.args.get(4).copied().unwrap_or(0);
                    if oflags & 2 != 0 {
                        out.dirs.insert(full.clone());
                    }
                    if oflags & (1 | 8) != 0 {
                        out.created.insert(full.clone());
                    }
                    out.touched.insert(full.clone());
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
                "path_filestat_get" | "fd_filestat_get" => {
                    let path = match (open.get(&fd), &e.path) {
                        (Some(dir), Some(path)) => join(&dir.path, path).map_err(refuse)?,
                        (Some(file), None) => file.path.clone(),
                        (None, _) => continue,
                    };
                    if e.path.is_some() {
                        out.touched.insert(path.clone());
                    }
                    // filestat: dev u64, ino u64, filetype u8 (+7), nlink u64, size u64, ...
                    let stat = bytes(0)?;
                    let regular = stat.get(16) == Some(&REGULAR_FILE);
                    if let Some(size) = stat.get(32..40).filter(|_| regular) {
                        let size = u64::from_le_bytes(size.try_into().expect("8 bytes"));
                        if size > MAX_FILE_END {
                            return Err(refuse(format!(
                                "it gives `{path}` a size of {size} bytes, past any file's end"
                            )));
                        }
                        out.files.entry(path.clone()).or_default();
                        out.sizes.insert(path, size);
                    }
                }
                "fd_readdir" => {
                    let Some(dir) = open.get(&fd).cloned() else {
                        continue;
                    };
                    out.dirs.insert(dir.path.clone());
                    out.listed.insert(dir.path.clone());
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

    /// What `run` (the files of a what-if run on these) read under `grants` that this
    /// recording does not hold, one sentence each: a path it never opened, a range of a file
    /// it never read (the end of a file included), a folder it never listed. What `run`
    /// created itself is its own.
    pub fn unrecorded(&self, run: &RecordedFiles, grants: &[GrantRecord]) -> Vec<String> {
        let relevant = |path: &str| {
            grants
                .iter()
                .any(|g| under(path, g.guest.trim_end_matches('/')))
                && !run.created.iter().any(|c| under(path, c))
        };
        let known = |path: &str| {
            self.touched.contains(path) || self.files.contains_key(path) || self.dirs.contains(path)
        };
        let mut out = Vec::new();
        for path in run.touched.iter().filter(|p| relevant(p) && !known(p)) {
            out.push(format!(
                "it opens `{path}`, which the recorded call never opened"
            ));
        }
        for (path, reads) in run.files.iter().filter(|(p, _)| relevant(p) && known(p)) {
            let recorded = self.files.get(path).map(Vec::as_slice).unwrap_or_default();
            let spans = spans(recorded);
            let ends: BTreeSet<u64> = recorded
                .iter()
                .filter(|(_, data)| data.is_empty())
                .map(|(at, _)| *at)
                .collect();
            let missed = reads.iter().find_map(|(at, data)| {
                if data.is_empty() {
                    // The end of the file: where the recording found it, or nowhere.
                    (!ends.contains(at) && self.sizes.get(path) != Some(at)).then(|| {
                        format!(
                            "it reads `{path}` to its end at byte {at}, where the recorded call never found its end"
                        )
                    })
                } else {
                    gap(&spans, *at, at + data.len() as u64).map(|(from, to)| {
                        format!(
                            "it reads bytes {from}..{to} of `{path}`, which the recorded call never read"
                        )
                    })
                }
            });
            out.extend(missed);
        }
        for dir in run
            .listed
            .iter()
            .filter(|d| relevant(d) && !self.listed.contains(*d))
        {
            out.push(format!(
                "it lists the folder `{dir}`, which the recorded call never listed"
            ));
        }
        out
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
            let mut end = 0;
            for (at, data) in ranges {
                std::os::unix::fs::FileExt::write_all_at(&file, data, *at)
                    .map_err(|e| cannot(path, e))?;
                end = end.max(at + data.len() as u64);
            }
            if let Some(&size) = self.sizes.get(path).filter(|&&size| size > end) {
                file.set_len(size).map_err(|e| cannot(path, e))?;
            }
        }
        Ok(())
    }
}

/// The byte ranges `reads` cover, merged where they touch: (from, to), in order.
fn spans(reads: &[(u64, Vec<u8>)]) -> Vec<(u64, u64)> {
    let mut all: Vec<(u64, u64)> = reads
        .iter()
        .filter(|(_, data)| !data.is_empty())
        .map(|(at, data)| (*at, at + data.len() as u64))
        .collect();
    all.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (from, to) in all {
        match merged.last_mut() {
            Some(last) if from <= last.1 => last.1 = last.1.max(to),
            _ => merged.push((from, to)),
        }
    }
    merged
}

/// The first stretch of `from..to` that `spans` (merged, in order) leave out.
fn gap(spans: &[(u64, u64)], from: u64, to: u64) -> Option<(u64, u64)> {
    let mut at = from;
    for &(start, end) in spans.iter().filter(|&&(_, end)| end > from) {
        if start > at {
            return Some((at, start.min(to)));
        }
        at = at.max(end);
        if at >= to {
            return None;
        }
    }
    (at < to).then_some((at, to))
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

/// One place where a candidate's value differs from the recorded one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Difference {
    /// Where, as Python would index it from the root: `result[0].spend`; empty for the whole
    /// value.
    pub path: String,
    /// The recorded value there, absent when the recorded value has no such place.
    pub recorded: Option<Value>,
    /// The candidate's value there, absent when it has no such place.
    pub candidate: Option<Value>,
}

impl std::fmt::Display for Difference {
    /// `path: old -> new`, `(absent)` for a side that has no such place.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let side = |v: &Option<Value>| match v {
            Some(v) => v.to_string(),
            None => "(absent)".to_owned(),
        };
        let place = if self.path.is_empty() {
            "the whole outcome"
        } else {
            &self.path
        };
        write!(
            f,
            "{place}: {} -> {}",
            side(&self.recorded),
            side(&self.candidate)
        )
    }
}

/// How far apart two floats may be and still count as the same: relative to the larger
/// magnitude (`|a - b| <= tolerance * max(|a|, |b|)`). Zero, the default, is exact.
#[derive(Debug, Clone, Copy, Default, PartialEq, PartialOrd, Serialize, Deserialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct Tolerance(f64);

impl Tolerance {
    pub const EXACT: Tolerance = Tolerance(0.0);

    /// A relative tolerance, refused unless it is a finite number from 0 to 1.
    pub fn new(relative: f64) -> Result<Tolerance> {
        if !(0.0..=1.0).contains(&relative) {
            return Err(bad_input(format!(
                "a relative tolerance is a number from 0 to 1 (1e-9, 0.001), not {relative}"
            )));
        }
        Ok(Tolerance(relative))
    }

    pub fn relative(self) -> f64 {
        self.0
    }

    /// Whether two JSON values count as the same leaf: equal, or numbers one of which is a
    /// float, within the tolerance.
    fn same(self, a: &Value, b: &Value) -> bool {
        if a == b {
            return true;
        }
        match (a, b) {
            (Value::Number(x), Value::Number(y)) if self.0 > 0.0 && (x.is_f64() || y.is_f64()) => {
                let (Some(x), Some(y)) = (x.as_f64(), y.as_f64()) else {
                    return false;
                };
                (x - y).abs() <= self.0 * x.abs().max(y.abs())
            }
            _ => false,
        }
    }
}

impl TryFrom<f64> for Tolerance {
    type Error = anyhow::Error;

    fn try_from(relative: f64) -> Result<Tolerance> {
        Tolerance::new(relative)
    }
}

impl From<Tolerance> for f64 {
    fn from(t: Tolerance) -> f64 {
        t.0
    }
}

impl std::str::FromStr for Tolerance {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Tolerance> {
        let relative: f64 = s.trim().parse().map_err(|_| {
            bad_input(format!(
                "`{s}` is not a relative tolerance: write a number such as 1e-9 or 0.001"
            ))
        })?;
        Tolerance::new(relative)
    }
}

/// Every place where `candidate` differs from `recorded`, found from `path` (the root's
/// name, or empty) down, with floats compared within `tolerance`.
pub fn diff(
    recorded: &Value,
    candidate: &Value,
    path: &str,
    tolerance: Tolerance,
    out: &mut Vec<Difference>,
) {
    let key = |k: &str| {
        if path.is_empty() {
            k.to_owned()
        } else {
            format!("{path}.{k}")
        }
    };
    let one = |path: String, recorded: Option<&Value>, candidate: Option<&Value>| Difference {
        path,
        recorded: recorded.cloned(),
        candidate: candidate.cloned(),
    };
    match (recorded, candidate) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                match b.get(k) {
                    Some(w) => diff(v, w, &key(k), tolerance, out),
                    None => out.push(one(key(k), Some(v), None)),
                }
            }
            for (k, w) in b.iter().filter(|(k, _)| !a.contains_key(*k)) {
                out.push(one(key(k), None, Some(w)));
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for i in 0..a.len().max(b.len()) {
                let p = format!("{path}[{i}]");
                match (a.get(i), b.get(i)) {
                    (Some(v), Some(w)) => diff(v, w, &p, tolerance, out),
                    (v, w) => out.push(one(p, v, w)),
                }
            }
        }
        _ if !tolerance.same(recorded, candidate) => {
            out.push(one(path.to_owned(), Some(recorded), Some(candidate)));
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
            Tolerance::EXACT,
            &mut out,
        );
        let out: Vec<String> = out.iter().map(ToString::to_string).collect();
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
    fn floats_differ_past_the_tolerance_and_other_values_exactly() {
        let differences = |a: Value, b: Value, relative: f64| {
            let mut out = Vec::new();
            diff(
                &a,
                &b,
                "result",
                Tolerance::new(relative).unwrap(),
                &mut out,
            );
            out.len()
        };
        assert_eq!(
            differences(json!([1.0, 2.0]), json!([1.0, 2.0 + 1e-12]), 0.0),
            1
        );
        assert_eq!(
            differences(json!([1.0, 2.0]), json!([1.0, 2.0 + 1e-12]), 1e-9),
            0
        );
        assert_eq!(
            differences(json!({"x": 100.0}), json!({"x": 101.0}), 0.001),
            1
        );
        assert_eq!(
            differences(json!({"x": 100.0}), json!({"x": 101.0}), 0.01),
            0
        );
        // Integers are not floats: counts and ids stay exact whatever the tolerance.
        assert_eq!(differences(json!(100), json!(101), 0.5), 1);
        assert_eq!(differences(json!(1), json!(1.0), 0.0), 1);
        assert_eq!(differences(json!(1), json!(1.0), 1e-9), 0);
        assert_eq!(differences(json!("1.0"), json!("1.00"), 0.5), 1);
        for bad in ["-1", "2", "NaN", "inf", "x"] {
            let e = bad.parse::<Tolerance>().unwrap_err();
            assert!(format!("{e:#}").contains("tolerance"), "{bad}: {e:#}");
        }
        assert!(serde_json::from_value::<Tolerance>(json!(5.0)).is_err());
        assert_eq!("1e-9".parse::<Tolerance>().unwrap().relative(), 1e-9);
    }

    /// What a test says was read of one file: (offset, bytes) each time.
    type Reads<'a> = &'a [(u64, &'a [u8])];

    /// Files read as (path, reads), each path opened too.
    fn reading(reads: &[(&str, Reads<'_>)]) -> RecordedFiles {
        let mut out = RecordedFiles::default();
        for (path, ranges) in reads {
            out.touched.insert(path.to_string());
            let ranges = ranges.iter().map(|(at, d)| (*at, d.to_vec())).collect();
            out.files.insert(path.to_string(), ranges);
        }
        out
    }

    #[test]
    fn what_a_run_read_beyond_its_recording_is_named() {
        let mut recorded = reading(&[
            ("/data/a.csv", &[(0, b"0123"), (4, b"4567"), (8, b"")]),
            ("/data/big.csv", &[(0, b"head"), (100, b"tail")]),
            ("/data/sized.csv", &[(0, b"all")]),
        ]);
        recorded.touched.insert("/data/gone.csv".into());
        recorded.listed.insert("/data".into());
        recorded.sizes.insert("/data/sized.csv".into(), 3);
        let grants = [GrantRecord {
            guest: "/data".into(),
            writable: true,
        }];
        // Within what was read, its end where it was found (by a read, or by its size), a
        // path found missing, a file outside every grant, a listing read before: nothing.
        let mut within = reading(&[
            ("/data/a.csv", &[(2, b"2345"), (8, b"")]),
            ("/data/sized.csv", &[(0, b"all"), (3, b"")]),
            ("/usr/local/lib/x.py", &[(0, b"x")]),
        ]);
        within.touched.insert("/data/gone.csv".into());
        within.listed.insert("/data".into());
        assert_eq!(recorded.unrecorded(&within, &grants), Vec::<String>::new());
        // What the run wrote itself is its own to read back.
        let mut own = reading(&[("/data/out/x.csv", &[(0, b"mine"), (4, b"")])]);
        own.created.insert("/data/out".into());
        assert_eq!(recorded.unrecorded(&own, &grants), Vec::<String>::new());

        let mut lists = RecordedFiles::default();
        lists.listed.insert("/data/sub".into());
        for (run, expected) in [
            (
                reading(&[("/data/new.csv", &[])]),
                "it opens `/data/new.csv`, which the recorded call never opened",
            ),
            (
                reading(&[("/data/big.csv", &[(0, b"head-and-more")])]),
                "it reads bytes 4..13 of `/data/big.csv`, which the recorded call never read",
            ),
            (
                reading(&[("/data/big.csv", &[(4, b"")])]),
                "it reads `/data/big.csv` to its end at byte 4",
            ),
            (lists, "it lists the folder `/data/sub`"),
        ] {
            let said = recorded.unrecorded(&run, &grants);
            assert_eq!(said.len(), 1, "{said:?}");
            assert!(said[0].starts_with(expected), "{said:?}");
        }
        assert_eq!(gap(&[(0, 4), (100, 104)], 2, 200), Some((4, 100)));
        assert_eq!(gap(&[(0, 4), (4, 104)], 2, 104), None);
        assert_eq!(gap(&[(10, 20)], 0, 5), Some((0, 5)));
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
                ..RecordedFiles::default()
            };
            let e = files.write_under("/data", &inner).unwrap_err();
            assert!(
                format!("{e:#}").contains("cannot be rebuilt"),
                "{path}: {e:#}"
            );
            assert!(!world.path().join("escaped").exists(), "{path} escaped");
            let dirs = RecordedFiles {
                dirs: [path.to_owned()].into(),
                ..RecordedFiles::default()
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
            ..RecordedFiles::default()
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
        assert!(
            served(&t, &Blobs::default(), 1 << 20)
                .unwrap()
                .clocks
                .is_empty()
        );
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
