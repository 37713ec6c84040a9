//! Replaying a recorded call: exactly (every import answered from the trace, every call and
//! output checked), or what-if (an updated notebook run on the recorded inputs).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::bundle::{Bundle, Select, short};
use crate::call::{self, CallResult, Outcome};
use crate::error::bad_input;
use crate::notebook::Notebook;
use crate::policy::{Grant, Policy, Size};
use crate::preinit::Prepared;
use crate::record::{Blobs, Data, Divergence, Event, Mode, Replaying, Served};
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
    let prepared = prepare(sandbox, h)?;
    let policy = Policy {
        grants: Vec::new(),
        env: h.env.clone(),
        limits: h.limits.into(),
    };
    let mode = Mode::replay(
        trace.events.clone(),
        trace.blobs(&sandbox.runtime().stdlib_dir()),
    );
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
fn prepare(sandbox: &Sandbox, h: &Header) -> Result<Prepared> {
    let Some(want) = h.image_sha256.as_deref() else {
        return Ok(Prepared::without_image(h.bundle.clone()));
    };
    let prepared = Prepared::new(sandbox, h.bundle.clone())?;
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
    let bundle = Bundle::from_notebook(sandbox, notebook, Select::Only(&[function]), None)?;
    let version = bundle.version.clone();
    let prepared = Prepared::new(sandbox, bundle)?;
    let blobs = trace.blobs(&sandbox.runtime().stdlib_dir());
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
        limits: h.limits.into(),
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
    for (i, e) in trace
        .events
        .iter()
        .enumerate()
        .filter(|(_, e)| e.result == 0)
    {
        let Some((_, data)) = e.writes.first() else {
            continue;
        };
        match e.call.as_str() {
            "clock_time_get" => clocks
                .entry(argument(i, e, 0)?)
                .or_default()
                .push_back(blobs.get(data)?),
            "random_get" => random.extend(blobs.get(data)?),
            _ => {}
        }
    }
    Ok(Served { clocks, random })
}

/// An integer argument of a recorded event, refusing a trace whose event has too few.
fn argument(i: usize, e: &Event, index: usize) -> Result<i64> {
    e.args.get(index).copied().ok_or_else(|| {
        bad_input(format!(
            "the trace's event {i} ({}) has {} arguments, and that call takes more",
            e.call,
            e.args.len()
        ))
    })
}

/// How many bytes of recorded files a what-if run rebuilds at most, all files together: a
/// read at a far offset would otherwise make host allocate up to it.
pub const MAX_RECORDED_FILES: u64 = 1 << 30;

/// The files and directories a recorded call saw in its grants, rebuilt from its reads.
#[derive(Debug, Default)]
pub struct RecordedFiles {
    files: BTreeMap<String, Vec<u8>>,
    dirs: BTreeSet<String>,
}

impl RecordedFiles {
    /// Rebuilds them from the trace's events, in memory: nothing is written.
    pub fn from_trace(trace: &Trace, blobs: &Blobs) -> Result<RecordedFiles> {
        let mut out = RecordedFiles::default();
        let mut paths: HashMap<i64, String> = HashMap::new();
        let mut positions: HashMap<i64, u64> = HashMap::new();
        let mut total = 0;
        for (i, e) in trace
            .events
            .iter()
            .enumerate()
            .filter(|(_, e)| e.result == 0)
        {
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
                    // Only the grants' files are rebuilt: the runtime's own standard library,
                    // preopened too, is tens of megabytes read at far offsets.
                    let dir = String::from_utf8_lossy(&bytes(0)?).into_owned();
                    if trace.header.grants.iter().any(|g| g.guest == dir) {
                        paths.insert(fd, dir);
                    }
                }
                "path_open" => {
                    let (Some(dir), Some(path)) = (paths.get(&fd), &e.path) else {
                        continue;
                    };
                    let full = join(dir, path);
                    let new_fd = bytes(0)?
                        .get(..4)
                        .map(|b| u32::from_le_bytes(b.try_into().unwrap()));
                    if e.args.get(4).is_some_and(|flags| flags & 2 != 0) {
                        out.dirs.insert(full.clone());
                    }
                    if let Some(new_fd) = new_fd {
                        paths.insert(i64::from(new_fd), full);
                        positions.insert(i64::from(new_fd), 0);
                    }
                }
                "fd_read" | "fd_pread" => {
                    let Some(path) = paths.get(&fd) else { continue };
                    let data: Vec<u8> = (0..e.writes.len().saturating_sub(1))
                        .map(bytes)
                        .collect::<Result<Vec<_>>>()?
                        .concat();
                    let at = if e.call == "fd_pread" {
                        argument(i, e, 3)? as u64
                    } else {
                        positions.get(&fd).copied().unwrap_or(0)
                    };
                    let file = out.files.entry(path.clone()).or_default();
                    let end = at.saturating_add(data.len() as u64);
                    let grown = end.saturating_sub(file.len() as u64);
                    if total + grown > MAX_RECORDED_FILES {
                        return Err(bad_input(format!(
                            "the trace's event {i} ({}) reads `{path}` up to byte {end}: more than the {} of recorded files host rebuilds",
                            e.call,
                            Size(MAX_RECORDED_FILES)
                        )));
                    }
                    total += grown;
                    let (at, end) = (at as usize, end as usize);
                    if file.len() < end {
                        file.resize(end, 0);
                    }
                    file[at..end].copy_from_slice(&data);
                    if e.call == "fd_read" {
                        positions.insert(fd, end as u64);
                    }
                }
                "fd_seek" => {
                    if let Some(b) = bytes(0)?.get(..8) {
                        positions.insert(fd, u64::from_le_bytes(b.try_into().unwrap()));
                    }
                }
                "fd_readdir" => {
                    let Some(path) = paths.get(&fd).cloned() else {
                        continue;
                    };
                    out.dirs.insert(path.clone());
                    let listing = bytes(0)?;
                    let mut at = 0;
                    while at + 24 <= listing.len() {
                        let len = u32::from_le_bytes(listing[at + 16..at + 20].try_into().unwrap())
                            as usize;
                        let kind = listing[at + 20];
                        let Some(name) = listing.get(at + 24..at + 24 + len) else {
                            break;
                        };
                        let name = String::from_utf8_lossy(name);
                        if name != "." && name != ".." {
                            let child = join(&path, &name);
                            if kind == 3 {
                                out.dirs.insert(child);
                            } else {
                                out.files.entry(child).or_default();
                            }
                        }
                        at += 24 + len;
                    }
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// Writes what lies under the guest path `guest` into `dir`.
    fn write_under(&self, guest: &str, dir: &std::path::Path) -> Result<()> {
        let prefix = format!("{}/", guest.trim_end_matches('/'));
        let inside = |p: &String| p.strip_prefix(&prefix).map(str::to_owned);
        for d in self.dirs.iter().filter_map(inside) {
            std::fs::create_dir_all(dir.join(d))?;
        }
        for (path, content) in &self.files {
            if let Some(rel) = inside(path) {
                let target = dir.join(rel);
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                std::fs::write(target, content)?;
            }
        }
        Ok(())
    }
}

/// A guest path joined with a relative one, `.` components dropped.
fn join(dir: &str, path: &str) -> String {
    let mut out = dir.trim_end_matches('/').to_owned();
    for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
        out.push('/');
        out.push_str(part);
    }
    out
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

    /// A trace with `grants` and `events` (JSON, as a trace file holds them), and an empty
    /// bundle: all that rebuilding recorded files and served values reads.
    fn trace(grants: &[&str], events: Value) -> Trace {
        let grants: Vec<Value> = grants
            .iter()
            .map(|g| json!({"guest": g, "writable": false}))
            .collect();
        serde_json::from_value(json!({
            "header": {
                "format": "host-trace/1", "host_version": "0", "runtime_sha256": "",
                "bundle": {"format": "host-bundle/1", "version": "", "chunks": [], "manifest": {
                    "notebook": "n.ipynb", "notebook_sha256": "", "functions": [],
                    "runtime_sha256": "", "host_version": "0", "created": "", "label": null,
                    "closures": [], "warnings": []}},
                "function": "f", "arguments": {}, "env": [], "grants": grants,
                "limits": {"memory": 1, "timeout_ms": 1, "output": 1},
                "engine": {"nan_canonicalization": true, "relaxed_simd_deterministic": true,
                           "threads": false},
                "image_sha256": null, "recorded_at": ""},
            "events": events,
            "blobs": {},
            "outputs": {"outcome": null},
        }))
        .unwrap()
    }

    /// `/data` preopened as fd 4, `a.csv` in it opened as fd 5, then `read`.
    fn reads(read: Value) -> Trace {
        trace(
            &["/data"],
            json!([
                {"call": "fd_prestat_dir_name", "args": [4, 0, 5], "result": 0,
                 "writes": [[0, {"inline": "L2RhdGE="}]]},
                {"call": "path_open", "args": [4, 1, 0, 5, 0, 0, 0, 0, 0], "result": 0,
                 "path": "a.csv", "writes": [[0, {"inline": "BQAAAA=="}]]},
                read,
            ]),
        )
    }

    fn message(result: Result<impl std::fmt::Debug>) -> String {
        format!("{:#}", result.unwrap_err())
    }

    #[test]
    fn recorded_files_are_rebuilt_from_reads_at_their_offsets() {
        let t = reads(
            json!({"call": "fd_pread", "args": [5, 0, 1, 2, 0], "result": 0,
                             "writes": [[0, {"inline": "eHk="}], [0, {"inline": "AgAAAA=="}]]}),
        );
        let files = RecordedFiles::from_trace(&t, &Blobs::default()).unwrap();
        assert_eq!(files.files["/data/a.csv"], b"\0\0xy");
    }

    #[test]
    fn recorded_pread_without_its_offset_is_refused_not_a_panic() {
        // Crashed the trace fuzz target (a seed with the offset cut): args[3] was indexed
        // unchecked.
        let t = reads(json!({"call": "fd_pread", "args": [5, 0, 1], "result": 0,
                             "writes": [[0, {"inline": "eA=="}], [0, {"inline": "AQAAAA=="}]]}));
        let why = message(RecordedFiles::from_trace(&t, &Blobs::default()));
        assert!(why.contains("event 2 (fd_pread) has 3 arguments"), "{why}");
    }

    #[test]
    fn recorded_reads_at_far_offsets_are_refused_before_allocating() {
        // Crashed the trace fuzz target (a seed's offset changed): -1 overflowed `at + len`,
        // 1 TiB made host allocate 1 TiB.
        for offset in [-1, 1 << 40, MAX_RECORDED_FILES as i64] {
            let t = reads(
                json!({"call": "fd_pread", "args": [5, 0, 1, offset, 0], "result": 0,
                                 "writes": [[0, {"inline": "eA=="}], [0, {"inline": "AQAAAA=="}]]}),
            );
            let why = message(RecordedFiles::from_trace(&t, &Blobs::default()));
            assert!(
                why.contains("more than the 1 GiB of recorded files"),
                "{why}"
            );
        }
        // A seek far out, then a read there.
        let t = trace(
            &["/data"],
            json!([
                {"call": "fd_prestat_dir_name", "args": [4, 0, 5], "result": 0,
                 "writes": [[0, {"inline": "L2RhdGE="}]]},
                {"call": "path_open", "args": [4, 1, 0, 5, 0, 0, 0, 0, 0], "result": 0,
                 "path": "a.csv", "writes": [[0, {"inline": "BQAAAA=="}]]},
                {"call": "fd_seek", "args": [5, 0, 0, 0], "result": 0,
                 "writes": [[0, {"inline": "/////////38="}]]},
                {"call": "fd_read", "args": [5, 0, 1, 0], "result": 0,
                 "writes": [[0, {"inline": "eA=="}], [0, {"inline": "AQAAAA=="}]]},
            ]),
        );
        let why = message(RecordedFiles::from_trace(&t, &Blobs::default()));
        assert!(why.contains("event 3 (fd_read)"), "{why}");
    }

    #[test]
    fn recorded_files_outside_the_grants_are_not_rebuilt() {
        // The runtime's standard library is preopened too, and read at offsets of tens of MB.
        let t = trace(
            &["/data"],
            json!([
                {"call": "fd_prestat_dir_name", "args": [3, 0, 14], "result": 0,
                 "writes": [[0, {"inline": "L3Vzci9sb2NhbC9saWI="}]]},
                {"call": "path_open", "args": [3, 1, 0, 13, 0, 0, 0, 0, 0], "result": 0,
                 "path": "python315.zip", "writes": [[0, {"inline": "BQAAAA=="}]]},
                {"call": "fd_pread", "args": [5, 0, 1, 50000000, 0], "result": 0,
                 "writes": [[0, {"inline": "eA=="}], [0, {"inline": "AQAAAA=="}]]},
            ]),
        );
        let files = RecordedFiles::from_trace(&t, &Blobs::default()).unwrap();
        assert!(files.files.is_empty(), "{:?}", files.files.keys());
    }

    #[test]
    fn served_clock_reading_without_its_clock_is_refused_not_a_panic() {
        // Crashed the trace fuzz target (a seed's clock id cut): args[0] was indexed unchecked.
        let t = trace(
            &[],
            json!([{"call": "clock_time_get", "args": [], "result": 0,
                    "writes": [[0, {"inline": "AQAAAAAAAAA="}]]}]),
        );
        let why = message(served(&t, &Blobs::default()).map(|_| ()));
        assert!(
            why.contains("event 0 (clock_time_get) has 0 arguments"),
            "{why}"
        );
    }

    #[test]
    fn guest_paths_join_without_dots() {
        assert_eq!(join("/data", "./sub//a.txt"), "/data/sub/a.txt");
        assert_eq!(join("/data/", "a"), "/data/a");
    }
}
