//! Recording and replaying a run's imports: every nondeterministic value a call receives, so
//! it re-executes bit for bit on another machine.
//!
//! The boundary is the guest's imports: every WASI preview 1 function and `host::call`. When
//! recording, each import runs as usual and host keeps, in order, its name, its arguments, its
//! return value and the bytes it wrote into guest memory (clock readings, random bytes, file
//! contents, directory listings, metadata, the door's answers). When replaying, no import runs:
//! each is checked against the next recorded event (same function, same arguments, same bytes
//! written out) and answered by writing the recorded bytes back. Since the engine is
//! deterministic (NaN canonicalisation, deterministic relaxed SIMD, no threads) and the
//! instance starts from the same memory, the guest makes the same calls and reaches the same
//! result; the first call that differs is a divergence, reported with its index.
//!
//! This module knows nothing of the sandbox that runs it: the store data only has to give it
//! its [`Tracing`] ([`Traced`]). The trace *file* that carries events to another machine is
//! [`crate::trace`]'s.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use anyhow::{Context, Result};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use wasmtime::{Caller, Func, Instance, Linker, Memory, Module, Val};

use crate::error::bad_input;
use crate::policy::LimitExceeded;
use crate::runtime::STDLIB_GUEST_DIR;

/// Writes up to this size are stored in the event itself; larger ones once, by content.
const INLINE: usize = 64;

/// How a run's imports are answered, and what is kept of them: the one switch between a
/// plain call, a recorded one, a replay, a what-if run and the making of an image. Each mode
/// implies its world (which clocks, random source and files the guest gets), so no run can
/// mix, say, a replay with live files.
pub enum Mode {
    /// Imports run for real; nothing is kept.
    Plain,
    /// Imports run for real, on a fixed clock and random sequence, with host-specific file
    /// metadata (device, inode, times) made constant: a pre-initialised image is then the same
    /// on every machine.
    Freeze,
    /// Imports run for real; each is kept.
    Record(Recording),
    /// No import runs: each is checked against a trace and answered from it.
    Replay(Replaying),
    /// Imports run for real (an updated notebook, on the recorded files), except clock readings
    /// and random bytes, served from a recording while they last; the file system calls are
    /// kept, to tell what the run read that the recording does not hold.
    WhatIf(Served),
}

impl Mode {
    /// A mode that records, from nothing, a trace of at most `budget` bytes.
    pub fn record(budget: u64) -> Mode {
        Mode::Record(Recording::within(budget))
    }

    /// A mode that replays `events`, whose bytes are in `blobs`. `ended_at` is the record
    /// limit the recording ended on, if it did: its last event is the last that fitted, so
    /// the guest's next call is where the recorded call stopped, not a divergence.
    pub fn replay(events: Vec<Event>, blobs: Blobs, ended_at: Option<u64>) -> Mode {
        Mode::Replay(Replaying {
            events,
            blobs,
            next: 0,
            divergence: None,
            ended_at,
        })
    }

    /// Whether the run's imports go through the tracer at all.
    pub fn is_traced(&self) -> bool {
        !matches!(self, Mode::Plain)
    }
}

/// What a recording run kept, and how much more it may keep.
pub struct Recording {
    pub events: Vec<Event>,
    pub blobs: Blobs,
    files: RuntimeFiles,
    /// The bytes the trace may hold, and the bytes it holds ([`charge`]): host keeps a
    /// recording in its own memory, so a guest that reads a large file in a loop must end on
    /// a limit, not grow host without bound.
    budget: u64,
    used: u64,
}

impl Recording {
    /// An empty recording that may grow to `budget` bytes.
    pub fn within(budget: u64) -> Recording {
        Recording {
            events: Vec::new(),
            blobs: Blobs::default(),
            files: RuntimeFiles::default(),
            budget,
            used: 0,
        }
    }
}

/// Bytes an event adds to the trace's JSON, about (a little over, never much under): the
/// call, arguments and result, its path, each piece of data (inline text, a blob's id, a
/// runtime range), and `new_blobs`, what its blobs added to the blob map ([`Blobs::put`]). Host
/// holds the recording in a form that takes up to about three times as much (a clock reading
/// is about 100 bytes of JSON and 310 of memory; see the README for the bound).
fn charge(event: &Event, new_blobs: u64) -> u64 {
    let data = |d: &Data| match d {
        Data::Inline(text) => text.len() as u64 + 14,
        Data::Blob(_) => 76,
        Data::Runtime { file, .. } => file.len() as u64 + 56,
    };
    48 + event.call.len() as u64
        + event.args.len() as u64 * 12
        + event.path.as_ref().map_or(0, |p| p.len() as u64 + 10)
        + event.writes.iter().map(|(_, d)| data(d) + 16).sum::<u64>()
        + event.sent.as_ref().map_or(0, |d| data(d) + 10)
        + new_blobs
}

/// How far a replay got.
pub struct Replaying {
    pub events: Vec<Event>,
    pub blobs: Blobs,
    /// The next event to answer: all were used when it equals `events.len()`.
    pub next: usize,
    pub divergence: Option<Divergence>,
    /// The record limit the recording ended on, if it did (see [`Mode::replay`]).
    pub ended_at: Option<u64>,
}

/// The clock readings (per clock) and random bytes a what-if run is served, and what the run
/// got that the recording did not hold.
pub struct Served {
    pub clocks: HashMap<i64, VecDeque<Vec<u8>>>,
    pub random: VecDeque<u8>,
    /// How many clock readings and random draws were answered live, the recording's used up:
    /// the run's result may then depend on the moment it ran.
    pub live: Live,
    /// The run's file system calls ([`FILE_CALLS`]), kept as a recording keeps them.
    pub files: Recording,
}

/// Clock readings and random draws a what-if run got live, past the recording's.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Live {
    pub clock: usize,
    pub random: usize,
}

impl std::fmt::Display for Live {
    /// `2 clock readings and 1 random draw were live, past the recording's`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let count = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
        let parts: Vec<String> = [(self.clock, "clock reading"), (self.random, "random draw")]
            .into_iter()
            .filter(|(n, _)| *n > 0)
            .map(|(n, what)| count(n, what))
            .collect();
        write!(
            f,
            "{} {} live, past the recording's",
            parts.join(" and "),
            if self.clock + self.random == 1 {
                "was"
            } else {
                "were"
            }
        )
    }
}

impl Live {
    /// Whether every clock reading and random draw came from the recording.
    pub fn none(&self) -> bool {
        self.clock == 0 && self.random == 0
    }
}

/// The calls that say which files a run read, and where: what a what-if run keeps.
pub const FILE_CALLS: &[&str] = &[
    "fd_prestat_dir_name",
    "path_open",
    "path_filestat_get",
    "fd_read",
    "fd_pread",
    "fd_seek",
    "fd_readdir",
];

/// A run's tracing state: its mode, and the real WASI functions behind the traced ones (the
/// exports of a shim instance, found once per run).
pub struct Tracing {
    pub mode: Mode,
    originals: HashMap<&'static str, Func>,
    shim: Option<Instance>,
}

impl Tracing {
    pub fn new(mode: Mode) -> Tracing {
        Tracing {
            mode,
            originals: HashMap::new(),
            shim: None,
        }
    }
}

/// Store data a traced run can work on.
pub trait Traced: 'static {
    fn tracing(&mut self) -> &mut Tracing;
    /// Writes what a replayed guest wrote to stdout (1) or stderr (2) into the run's streams,
    /// so a replay shows it.
    fn echo(&mut self, fd: i64, bytes: &[u8]) -> wasmtime::Result<()>;
}

/// One import call of the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// `clock_time_get`, `fd_read`, ..., or `host::call`.
    pub call: String,
    /// The arguments, as integers (pointers included: a deterministic guest passes the same).
    pub args: Vec<i64>,
    /// The return value (WASI's errno, or the door's status).
    pub result: i32,
    /// A path argument, for messages and for what-if replays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Bytes the call wrote into guest memory: (address, data).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub writes: Vec<(u32, Data)>,
    /// Bytes the guest handed out (written to a file or stream, or sent through the door).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent: Option<Data>,
    /// The exit status, for `proc_exit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<i32>,
}

/// Bytes in a trace: inline (base64), a reference to a blob by sha256, or a range of a file
/// of the runtime (whose content the runtime's hash in the header pins, so it is not copied).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Data {
    Inline(String),
    Blob(String),
    Runtime { file: String, offset: u64, len: u32 },
}

/// Bytes kept by content, and where the runtime's files are (to read [`Data::Runtime`]).
#[derive(Debug, Default, Clone)]
pub struct Blobs {
    pub map: BTreeMap<String, String>,
    pub runtime: Option<std::path::PathBuf>,
    /// The bytes the blobs [`Blobs::put`] has kept add to the trace's JSON (each one's id
    /// and base64 text), what a recording is charged for them.
    kept: u64,
}

impl Blobs {
    /// A trace's blobs, reading runtime ranges from the runtime's standard library folder.
    pub fn with_runtime(map: BTreeMap<String, String>, runtime: &std::path::Path) -> Blobs {
        Blobs {
            map,
            runtime: Some(runtime.to_owned()),
            kept: 0,
        }
    }

    pub fn put(&mut self, bytes: &[u8]) -> Data {
        if bytes.len() <= INLINE {
            return Data::Inline(B64.encode(bytes));
        }
        let id = hex::encode(Sha256::digest(bytes));
        if let std::collections::btree_map::Entry::Vacant(slot) = self.map.entry(id.clone()) {
            let text = slot.insert(B64.encode(bytes));
            self.kept += text.len() as u64 + 70;
        }
        Data::Blob(id)
    }

    pub fn get(&self, data: &Data) -> Result<Vec<u8>> {
        let text = match data {
            Data::Inline(text) => text,
            Data::Blob(id) => self.blob(id)?,
            Data::Runtime { file, offset, len } => {
                use std::os::unix::fs::FileExt;
                let handle = self.runtime_range(file, *offset, *len)?;
                let mut bytes = vec![0; *len as usize];
                handle.read_exact_at(&mut bytes, *offset).with_context(|| {
                    format!("failed to read {len} bytes of the runtime's {file} at {offset}")
                })?;
                return Ok(bytes);
            }
        };
        decode(text)
    }

    /// Refuses data that [`Blobs::get`] could not give, without reading it: a blob that is
    /// missing, inline bytes that are not base64, a runtime range out of the runtime's files.
    /// A trace's references are its author's word, checked before a replay relies on them.
    pub fn check(&self, data: &Data) -> Result<()> {
        match data {
            Data::Inline(text) => decode(text).map(drop),
            Data::Blob(id) => self.blob(id).map(drop),
            Data::Runtime { file, offset, len } => {
                self.runtime_range(file, *offset, *len).map(drop)
            }
        }
    }

    fn blob(&self, id: &str) -> Result<&String> {
        self.map
            .get(id)
            .ok_or_else(|| bad_input(format!("the trace has no blob {id}")))
    }

    /// The runtime's `file`, opened beneath the runtime's folder only (the name comes from
    /// the trace), once the range is known to lie inside it.
    fn runtime_range(&self, file: &str, offset: u64, len: u32) -> Result<std::fs::File> {
        let dir = self
            .runtime
            .as_ref()
            .context("no runtime to read recorded runtime files from")?;
        let outside = || {
            bad_input(format!(
                "the trace names a runtime file outside the runtime: {file:?}"
            ))
        };
        if file.split('/').any(|c| c == ".." || c.is_empty()) {
            return Err(outside());
        }
        let runtime = cap_std::fs::Dir::open_ambient_dir(dir, cap_std::ambient_authority())
            .with_context(|| format!("failed to open the runtime's `{}`", dir.display()))?;
        let handle = runtime.open(file).map_err(|_| outside())?.into_std();
        let size = handle.metadata()?.len();
        if offset
            .checked_add(u64::from(len))
            .is_none_or(|end| end > size)
        {
            return Err(bad_input(format!(
                "the trace reads {len} bytes of the runtime's {file} at {offset}, past its end ({size} bytes)"
            )));
        }
        Ok(handle)
    }
}

fn decode(text: &str) -> Result<Vec<u8>> {
    B64.decode(text)
        .map_err(|e| bad_input(format!("the trace holds malformed base64: {e}")))
}

/// Which open files are the runtime's own (opened under its standard library folder), and
/// where each one is read.
#[derive(Debug, Default)]
pub struct RuntimeFiles {
    stdlib_fd: Option<i64>,
    open: HashMap<i64, (String, u64)>,
}

impl RuntimeFiles {
    /// Follows one recorded call; for a read of a runtime file, that file and the offset the
    /// read started at.
    fn observe(
        &mut self,
        call: &str,
        args: &[i64],
        result: i32,
        path: Option<&str>,
        writes: &[(u32, &[u8])],
    ) -> Option<(String, u64)> {
        if result != 0 {
            return None;
        }
        let fd = *args.first()?;
        let u64_at = |i: usize| {
            writes
                .get(i)
                .and_then(|(_, b)| Some(u64::from_le_bytes(b.get(..8)?.try_into().ok()?)))
        };
        let u32_at = |i: usize| {
            writes
                .get(i)
                .and_then(|(_, b)| Some(u32::from_le_bytes(b.get(..4)?.try_into().ok()?)))
        };
        match call {
            "fd_prestat_dir_name" => {
                if writes
                    .first()
                    .is_some_and(|(_, name)| *name == STDLIB_GUEST_DIR.as_bytes())
                {
                    self.stdlib_fd = Some(fd);
                }
                None
            }
            "path_open" if Some(fd) == self.stdlib_fd => {
                self.open
                    .insert(i64::from(u32_at(0)?), (path?.to_owned(), 0));
                None
            }
            "fd_seek" => {
                let position = u64_at(0)?;
                if let Some(open) = self.open.get_mut(&fd) {
                    open.1 = position;
                }
                None
            }
            "fd_read" => {
                let nread = u64::from(u32_at(writes.len().checked_sub(1)?)?);
                let open = self.open.get_mut(&fd)?;
                let start = open.1;
                open.1 += nread;
                Some((open.0.clone(), start))
            }
            "fd_pread" => self
                .open
                .get(&fd)
                .and_then(|(file, _)| Some((file.clone(), *args.get(3)? as u64))),
            "fd_close" => {
                self.open.remove(&fd);
                None
            }
            _ => None,
        }
    }
}

/// The first call where a replay went another way than the recording.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Divergence {
    pub index: usize,
    pub expected: Option<String>,
    pub actual: String,
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the replay diverged at event {}:\n  expected: ",
            self.index
        )?;
        match &self.expected {
            Some(e) => write!(f, "{e}")?,
            None => write!(f, "the end of the trace")?,
        }
        write!(f, "\n  actual:   {}", self.actual)
    }
}

impl std::error::Error for Divergence {}

/// Describes a call for a divergence message: `fd_read(5, 1024, 1, 2000)` and its path.
fn describe(call: &str, args: &[i64], path: Option<&str>, sent: Option<&[u8]>) -> String {
    let args: Vec<String> = args.iter().map(i64::to_string).collect();
    let mut s = format!("{call}({})", args.join(", "));
    if let Some(p) = path {
        s.push_str(&format!(" on {p:?}"));
    }
    if let Some(bytes) = sent {
        let preview = String::from_utf8_lossy(&bytes[..bytes.len().min(60)]).into_owned();
        s.push_str(&format!(" sending {} bytes {preview:?}", bytes.len()));
    }
    s
}

/// What a WASI function writes to guest memory, and what it sends out, by argument position.
enum Out {
    /// `len` bytes at the pointer in argument `ptr`.
    Fixed { ptr: usize, len: u32 },
    /// As many bytes as argument `len` says, at the pointer in argument `ptr`.
    Sized { ptr: usize, len: usize },
    /// As many bytes as the u32 at the pointer in argument `used` says (after the call).
    Used { ptr: usize, used: usize, scale: u32 },
    /// Into the iovec array at arguments `iovs`/`count`, as many bytes in all as the u32 at
    /// the pointer in argument `used` says.
    Iovecs {
        iovs: usize,
        count: usize,
        used: usize,
    },
}

struct Spec {
    writes: &'static [Out],
    /// The iovecs whose bytes the guest sends out: (iovs, count, used).
    sends: Option<(usize, usize, usize)>,
    /// The path argument: (pointer, length).
    path: Option<(usize, usize)>,
}

const NONE: Spec = Spec {
    writes: &[],
    sends: None,
    path: None,
};

/// The functions whose answers depend only on the call's configuration (its arguments and
/// environment), which a replay sets up the same: they run for real in both modes.
const CONFIGURATION: &[&str] = &[
    "args_get",
    "args_sizes_get",
    "environ_get",
    "environ_sizes_get",
];

#[rustfmt::skip]
fn spec(name: &str) -> Spec {
    use Out::*;
    match name {
        "clock_res_get" => Spec { writes: &[Fixed { ptr: 1, len: 8 }], ..NONE },
        "clock_time_get" => Spec { writes: &[Fixed { ptr: 2, len: 8 }], ..NONE },
        "fd_fdstat_get" => Spec { writes: &[Fixed { ptr: 1, len: 24 }], ..NONE },
        "fd_filestat_get" => Spec { writes: &[Fixed { ptr: 1, len: 64 }], ..NONE },
        "fd_prestat_get" => Spec { writes: &[Fixed { ptr: 1, len: 8 }], ..NONE },
        "fd_prestat_dir_name" => Spec { writes: &[Sized { ptr: 1, len: 2 }], ..NONE },
        "fd_read" => Spec { writes: &[Iovecs { iovs: 1, count: 2, used: 3 }, Fixed { ptr: 3, len: 4 }], ..NONE },
        "fd_pread" => Spec { writes: &[Iovecs { iovs: 1, count: 2, used: 4 }, Fixed { ptr: 4, len: 4 }], ..NONE },
        "fd_write" => Spec { writes: &[Fixed { ptr: 3, len: 4 }], sends: Some((1, 2, 3)), path: None },
        "fd_pwrite" => Spec { writes: &[Fixed { ptr: 4, len: 4 }], sends: Some((1, 2, 4)), path: None },
        "fd_readdir" => Spec { writes: &[Used { ptr: 1, used: 4, scale: 1 }, Fixed { ptr: 4, len: 4 }], ..NONE },
        "fd_seek" => Spec { writes: &[Fixed { ptr: 3, len: 8 }], ..NONE },
        "fd_tell" => Spec { writes: &[Fixed { ptr: 1, len: 8 }], ..NONE },
        "path_filestat_get" => Spec { writes: &[Fixed { ptr: 4, len: 64 }], path: Some((2, 3)), ..NONE },
        "path_open" => Spec { writes: &[Fixed { ptr: 8, len: 4 }], path: Some((2, 3)), ..NONE },
        "path_readlink" => Spec { writes: &[Used { ptr: 3, used: 5, scale: 1 }, Fixed { ptr: 5, len: 4 }], path: Some((1, 2)), ..NONE },
        "poll_oneoff" => Spec { writes: &[Used { ptr: 1, used: 3, scale: 32 }, Fixed { ptr: 3, len: 4 }], ..NONE },
        "random_get" => Spec { writes: &[Sized { ptr: 0, len: 1 }], ..NONE },
        "sock_accept" => Spec { writes: &[Fixed { ptr: 2, len: 4 }], ..NONE },
        "sock_recv" => Spec { writes: &[Iovecs { iovs: 1, count: 2, used: 4 }, Fixed { ptr: 4, len: 4 }, Fixed { ptr: 5, len: 2 }], ..NONE },
        "sock_send" => Spec { writes: &[Fixed { ptr: 4, len: 4 }], sends: Some((1, 2, 4)), path: None },
        "path_create_directory" | "path_remove_directory" | "path_unlink_file" => Spec { path: Some((1, 2)), ..NONE },
        "path_filestat_set_times" | "path_link" => Spec { path: Some((2, 3)), ..NONE },
        "path_rename" => Spec { path: Some((1, 2)), ..NONE },
        "path_symlink" => Spec { path: Some((0, 1)), ..NONE },
        _ => NONE,
    }
}

fn arg(args: &[Val], i: usize) -> i64 {
    match args.get(i) {
        Some(Val::I32(v)) => i64::from(*v),
        Some(Val::I64(v)) => *v,
        _ => 0,
    }
}

fn read_u32(memory: &[u8], at: i64) -> Option<u32> {
    let at = at as u32 as usize;
    Some(u32::from_le_bytes(memory.get(at..at + 4)?.try_into().ok()?))
}

/// The (address, length) regions of guest memory described by an iovec array, up to `total`
/// bytes.
fn iovec_regions(memory: &[u8], iovs: i64, count: i64, mut total: u32) -> Vec<(u32, u32)> {
    let mut regions = Vec::new();
    for i in 0..count.max(0) as u32 {
        if total == 0 {
            break;
        }
        let at = iovs as u32 as i64 + i64::from(i) * 8;
        let (Some(buf), Some(len)) = (read_u32(memory, at), read_u32(memory, at + 4)) else {
            break;
        };
        let take = len.min(total);
        regions.push((buf, take));
        total -= take;
    }
    regions
}

/// The memory regions a finished call wrote.
fn written_regions(spec: &Spec, args: &[Val], memory: &[u8]) -> Vec<(u32, u32)> {
    let mut regions = Vec::new();
    for out in spec.writes {
        match *out {
            Out::Fixed { ptr, len } => regions.push((arg(args, ptr) as u32, len)),
            Out::Sized { ptr, len } => regions.push((arg(args, ptr) as u32, arg(args, len) as u32)),
            Out::Used { ptr, used, scale } => {
                if let Some(n) = read_u32(memory, arg(args, used)) {
                    regions.push((arg(args, ptr) as u32, n.saturating_mul(scale)));
                }
            }
            Out::Iovecs { iovs, count, used } => {
                if let Some(n) = read_u32(memory, arg(args, used)) {
                    regions.extend(iovec_regions(memory, arg(args, iovs), arg(args, count), n));
                }
            }
        }
    }
    regions
}

fn slice(memory: &[u8], (at, len): (u32, u32)) -> Option<&[u8]> {
    memory.get(at as usize..at as usize + len as usize)
}

fn path_of(spec: &Spec, args: &[Val], memory: &[u8]) -> Option<String> {
    let (p, l) = spec.path?;
    slice(memory, (arg(args, p) as u32, arg(args, l) as u32))
        .map(|b| String::from_utf8_lossy(b).into_owned())
}

/// The bytes the guest sends out with this call, known before it runs (for `fd_write`, the
/// iovecs up to their total length).
fn sent_bytes(spec: &Spec, args: &[Val], memory: &[u8]) -> Option<Vec<u8>> {
    let (iovs, count, _) = spec.sends?;
    let regions = iovec_regions(memory, arg(args, iovs), arg(args, count), u32::MAX);
    Some(
        regions
            .into_iter()
            .filter_map(|r| slice(memory, r))
            .flatten()
            .copied()
            .collect(),
    )
}

fn memory_of<T: Traced>(caller: &mut Caller<'_, T>) -> wasmtime::Result<Memory> {
    caller
        .get_export("memory")
        .and_then(|e| e.into_memory())
        .ok_or_else(|| wasmtime::format_err!("the guest exports no memory"))
}

/// Runs (or answers) one traced WASI import. `original` is the real implementation.
fn wasi_call<T: Traced>(
    name: &'static str,
    original: &Func,
    caller: &mut Caller<'_, T>,
    args: &[Val],
    results: &mut [Val],
) -> wasmtime::Result<()> {
    if CONFIGURATION.contains(&name) {
        return original.call(&mut *caller, args, results);
    }
    let memory = memory_of(caller)?;
    let spec = spec(name);
    let replaying = matches!(caller.data_mut().tracing().mode, Mode::Replay(_));
    if replaying {
        let (path, sent) = {
            let data = memory.data(&*caller);
            (path_of(&spec, args, data), sent_bytes(&spec, args, data))
        };
        let actual: Vec<i64> = (0..args.len()).map(|i| arg(args, i)).collect();
        let answer = replay_next(
            caller.data_mut().tracing(),
            name,
            &actual,
            path.as_deref(),
            sent.as_deref(),
        )?;
        let Some(answer) = answer else { return Ok(()) };
        // The guest's own output still reaches the call's streams, so a replay shows it.
        if let (Some(bytes), Some(fd @ (1 | 2))) = (&sent, actual.first()) {
            caller.data_mut().echo(*fd, bytes)?;
        }
        for (at, bytes) in &answer.writes {
            if memory.write(&mut *caller, *at as usize, bytes).is_err() {
                // The guest handed the same pointers as the recording, so only a trace made
                // by hand writes outside its memory: that trace is not this call's.
                let size = memory.data_size(&*caller);
                let what = format!("{name} writing {} bytes at {at}", bytes.len());
                let actual = format!("a guest memory of {size} bytes");
                return Err(caller.data_mut().tracing().diverged_here(what, actual));
            }
        }
        if let Some(code) = answer.exit {
            return Err(wasmtime::Error::new(wasmtime_wasi::I32Exit(code)));
        }
        if let Some(r) = results.first_mut() {
            *r = Val::I32(answer.result);
        }
        return Ok(());
    }

    if let Some(served) = serve(caller, name, args) {
        let (at, bytes) = served;
        memory.write(&mut *caller, at as usize, &bytes)?;
        if let Some(r) = results.first_mut() {
            *r = Val::I32(0);
        }
        return Ok(());
    }
    let before = {
        let data = memory.data(&*caller);
        (path_of(&spec, args, data), sent_bytes(&spec, args, data))
    };
    let outcome = original.call(&mut *caller, args, results);
    let exit = match &outcome {
        Err(e) => match e.downcast_ref::<wasmtime_wasi::I32Exit>() {
            Some(exit) => Some(exit.0),
            None => return outcome,
        },
        Ok(()) => None,
    };
    let result = match results.first() {
        Some(Val::I32(r)) => *r,
        _ => 0,
    };
    let normalize = matches!(caller.data_mut().tracing().mode, Mode::Freeze);
    if normalize && result == 0 {
        normalize_metadata(name, args, memory.data_mut(&mut *caller));
    }
    let keep = match caller.data_mut().tracing().mode {
        Mode::Record(_) => true,
        Mode::WhatIf(_) => FILE_CALLS.contains(&name),
        _ => false,
    };
    if keep {
        // The memory and the store's data at once: what the call wrote is recorded straight
        // from guest memory, not copied first.
        let (data, state) = memory.data_and_store_mut(&mut *caller);
        let data: &[u8] = data;
        let writes: Vec<(u32, &[u8])> = if result == 0 && exit.is_none() {
            written_regions(&spec, args, data)
                .into_iter()
                .filter_map(|r| slice(data, r).map(|b| (r.0, b)))
                .collect()
        } else {
            Vec::new()
        };
        let args: Vec<i64> = (0..args.len()).map(|i| arg(args, i)).collect();
        state
            .tracing()
            .record(Observed {
                call: name,
                args,
                result,
                path: before.0,
                writes,
                sent: before.1.as_deref(),
                exit,
            })
            .map_err(wasmtime::Error::new)?;
    }
    outcome
}

/// Zeroes what differs between two copies of the same files: device, inode, link count and
/// times in a filestat, a directory's size, and inodes in a directory listing, which is put in
/// name order.
fn normalize_metadata(name: &str, args: &[Val], data: &mut [u8]) {
    fn zero(data: &mut [u8], at: usize, len: usize) {
        if let Some(field) = data.get_mut(at..at + len) {
            field.fill(0);
        }
    }
    match name {
        "fd_filestat_get" | "path_filestat_get" => {
            // dev u64, ino u64, filetype u8 (+7), nlink u64, size u64, atim, mtim, ctim.
            let at = arg(args, if name == "fd_filestat_get" { 1 } else { 4 }) as u32 as usize;
            // A directory's size is the file system's bookkeeping (4096 on ext4, a count of
            // entries on tmpfs), not its content.
            let directory = data.get(at + 16) == Some(&3);
            for (offset, len) in [
                (0, 16),
                (24, 8),
                (40, 24),
                (32, if directory { 8 } else { 0 }),
            ] {
                zero(data, at + offset, len);
            }
        }
        "fd_readdir" => {
            // Entries of d_next u64, d_ino u64, d_namlen u32, d_type u8 (+3), then the name.
            let Some(used) = read_u32(data, arg(args, 4)) else {
                return;
            };
            let start = arg(args, 1) as u32 as usize;
            let mut at = 0usize;
            while at + 24 <= used as usize {
                let Some(len) = read_u32(data, (start + at + 16) as i64) else {
                    return;
                };
                if let Some(ino) = data.get_mut(start + at + 8..start + at + 16) {
                    ino.fill(0);
                }
                at += 24 + len as usize;
            }
            // A whole listing in one answer (it did not fill the buffer) is put in name order:
            // the host's file system orders entries its own way (ext4 by hash, tmpfs by
            // creation), and code that lists a folder while the image is made (matplotlib's
            // font scan) would otherwise leave a different heap on each machine.
            let (buf_len, cookie) = (arg(args, 2) as u32 as usize, arg(args, 3) as u64);
            if (used as usize) < buf_len
                && at == used as usize
                && let Some(listing) = data.get_mut(start..start + at)
            {
                sort_dirents(listing, cookie);
            }
        }
        _ => {}
    }
}

/// Sorts complete `fd_readdir` entries by name, each entry's `d_next` renumbered by its new
/// place (Wasmtime's cookies count entries from the listing's start), so the guest reads on
/// exactly as it would have.
fn sort_dirents(listing: &mut [u8], cookie: u64) {
    let mut entries: Vec<Vec<u8>> = Vec::new();
    let mut at = 0;
    while at + 24 <= listing.len() {
        let len = u32::from_le_bytes(listing[at + 16..at + 20].try_into().unwrap()) as usize;
        let Some(entry) = listing.get(at..at + 24 + len) else {
            return;
        };
        entries.push(entry.to_vec());
        at += 24 + len;
    }
    entries.sort_by(|a, b| a[24..].cmp(&b[24..]));
    let mut at = 0;
    for (i, entry) in entries.iter_mut().enumerate() {
        entry[..8].copy_from_slice(&(cookie + i as u64 + 1).to_le_bytes());
        listing[at..at + entry.len()].copy_from_slice(entry);
        at += entry.len();
    }
}

/// For a what-if run: the recorded answer to a clock reading or a random draw, while there
/// is one, as (address, bytes).
fn serve<T: Traced>(
    caller: &mut Caller<'_, T>,
    name: &str,
    args: &[Val],
) -> Option<(u32, Vec<u8>)> {
    let Mode::WhatIf(Served {
        clocks,
        random,
        live,
        ..
    }) = &mut caller.data_mut().tracing().mode
    else {
        return None;
    };
    let served = match name {
        "clock_time_get" => clocks
            .get_mut(&arg(args, 0))
            .and_then(VecDeque::pop_front)
            .map(|reading| (arg(args, 2) as u32, reading)),
        "random_get" => {
            let len = arg(args, 1) as usize;
            (random.len() >= len).then(|| (arg(args, 0) as u32, random.drain(..len).collect()))
        }
        _ => return None,
    };
    if served.is_none() {
        match name {
            "clock_time_get" => live.clock += 1,
            _ => live.random += 1,
        }
    }
    served
}

/// One import call as it ran, before it is kept as an [`Event`].
struct Observed<'a> {
    call: &'a str,
    args: Vec<i64>,
    result: i32,
    path: Option<String>,
    writes: Vec<(u32, &'a [u8])>,
    sent: Option<&'a [u8]>,
    exit: Option<i32>,
}

/// The traced form of the door: the request is checked (replay) or kept (record) as sent
/// bytes; the answer is kept or written back.
pub(crate) enum DoorStep {
    /// Run the door for real.
    Live,
    /// Replaying: answer with these bytes (and this status).
    Answer(i32, Option<Vec<u8>>),
}

impl Tracing {
    /// Keeps one import call, when the mode keeps it; a limit when the trace would grow past
    /// its budget (the event is not kept: the call ends there).
    fn record(&mut self, observed: Observed<'_>) -> Result<(), LimitExceeded> {
        let Observed {
            call,
            args,
            result,
            path,
            writes,
            sent,
            exit,
        } = observed;
        let recording = match &mut self.mode {
            Mode::Record(recording) => recording,
            Mode::WhatIf(Served { files, .. }) if FILE_CALLS.contains(&call) => files,
            _ => return Ok(()),
        };
        let Recording {
            events,
            blobs,
            files,
            budget,
            used,
        } = recording;
        let kept_before = blobs.kept;
        let writes = match files.observe(call, &args, result, path.as_deref(), &writes) {
            // Reads of the runtime's own files: where they came from, not their bytes.
            Some((file, mut offset)) => {
                let last = writes.len().saturating_sub(1);
                let mut out = Vec::with_capacity(writes.len());
                for (i, (at, bytes)) in writes.into_iter().enumerate() {
                    if i == last {
                        out.push((at, blobs.put(bytes)));
                    } else {
                        out.push((
                            at,
                            Data::Runtime {
                                file: file.clone(),
                                offset,
                                len: bytes.len() as u32,
                            },
                        ));
                        offset += bytes.len() as u64;
                    }
                }
                out
            }
            None => writes
                .into_iter()
                .map(|(at, bytes)| (at, blobs.put(bytes)))
                .collect(),
        };
        let sent = sent.map(|b| blobs.put(b));
        let event = Event {
            call: call.to_owned(),
            args,
            result,
            path,
            writes,
            sent,
            exit,
        };
        *used += charge(&event, blobs.kept - kept_before);
        if *used > *budget {
            return Err(LimitExceeded::Record(*budget));
        }
        events.push(event);
        Ok(())
    }

    /// A divergence at the event just replayed, whose answer does not fit the guest.
    fn diverged_here(&mut self, expected: String, actual: String) -> wasmtime::Error {
        match &mut self.mode {
            Mode::Replay(Replaying {
                next, divergence, ..
            }) => diverge(divergence, next.saturating_sub(1), Some(expected), actual),
            _ => wasmtime::format_err!("{expected}, in {actual}"),
        }
    }

    /// Before the door runs: in a replay, the recorded answer after checking the request.
    pub(crate) fn door_before(
        &mut self,
        args: &[i64],
        request: &[u8],
    ) -> wasmtime::Result<DoorStep> {
        Ok(
            match replay_next(self, "host::call", args, None, Some(request))? {
                Some(answer) => DoorStep::Answer(
                    answer.result,
                    answer.writes.into_iter().next().map(|(_, b)| b),
                ),
                None => DoorStep::Live,
            },
        )
    }

    /// After the door ran for real: kept, when recording.
    pub(crate) fn door_after(
        &mut self,
        args: Vec<i64>,
        request: &[u8],
        status: i32,
        answer: Option<&[u8]>,
    ) -> Result<(), LimitExceeded> {
        let writes = answer.map(|a| vec![(0, a)]).unwrap_or_default();
        self.record(Observed {
            call: "host::call",
            args,
            result: status,
            path: None,
            writes,
            sent: Some(request),
            exit: None,
        })
    }
}

fn diverge(
    slot: &mut Option<Divergence>,
    index: usize,
    expected: Option<String>,
    actual: String,
) -> wasmtime::Error {
    let d = Divergence {
        index,
        expected,
        actual,
    };
    *slot = Some(d.clone());
    wasmtime::Error::new(d)
}

/// A replayed import's answer, decoded from the trace.
struct Answer {
    result: i32,
    writes: Vec<(u32, Vec<u8>)>,
    exit: Option<i32>,
}

/// Checks an import call (WASI's or the door's) against the next recorded event; its answer,
/// or None when the tracer does not replay. Descriptions are only built for a divergence.
fn replay_next(
    tracing: &mut Tracing,
    name: &str,
    args: &[i64],
    path: Option<&str>,
    sent: Option<&[u8]>,
) -> wasmtime::Result<Option<Answer>> {
    let Mode::Replay(Replaying {
        events,
        blobs,
        next,
        divergence,
        ended_at,
    }) = &mut tracing.mode
    else {
        return Ok(None);
    };
    let index = *next;
    let Some(event) = events.get(index) else {
        if let Some(budget) = ended_at {
            return Err(wasmtime::Error::new(LimitExceeded::Record(*budget)));
        }
        return Err(diverge(
            divergence,
            index,
            None,
            describe(name, args, path, sent),
        ));
    };
    let expected_sent = event.sent.as_ref().and_then(|d| blobs.get(d).ok());
    if event.call != name
        || event.args != args
        || event.path.as_deref() != path
        || expected_sent.as_deref() != sent
    {
        let expected = describe(
            &event.call,
            &event.args,
            event.path.as_deref(),
            expected_sent.as_deref(),
        );
        return Err(diverge(
            divergence,
            index,
            Some(expected),
            describe(name, args, path, sent),
        ));
    }
    *next += 1;
    let writes = event
        .writes
        .iter()
        .map(|(at, data)| Ok((*at, blobs.get(data)?)))
        .collect::<Result<Vec<_>>>()
        .map_err(|e| wasmtime::format_err!("{e:#}"))?;
    Ok(Some(Answer {
        result: event.result,
        writes,
        exit: event.exit,
    }))
}

/// The shim module: it imports the guest's memory and every real WASI function, and exports
/// the memory and one function per import that just calls it.
fn shim_wat(imports: &[(&'static str, wasmtime::FuncType)]) -> String {
    let types = |ty: &wasmtime::FuncType| {
        let params: Vec<String> = ty.params().map(|p| p.to_string()).collect();
        let results: Vec<String> = ty.results().map(|r| r.to_string()).collect();
        let mut s = String::new();
        if !params.is_empty() {
            s.push_str(&format!(" (param {})", params.join(" ")));
        }
        if !results.is_empty() {
            s.push_str(&format!(" (result {})", results.join(" ")));
        }
        s
    };
    let mut wat = String::from("(module\n  (import \"env\" \"memory\" (memory 0))\n");
    for (i, (name, ty)) in imports.iter().enumerate() {
        wat.push_str(&format!(
            "  (import \"wasi_snapshot_preview1\" \"{name}\" (func $f{i}{}))\n",
            types(ty)
        ));
    }
    wat.push_str("  (export \"memory\" (memory 0))\n");
    for (i, (name, ty)) in imports.iter().enumerate() {
        let gets: String = (0..ty.params().len())
            .map(|p| format!(" local.get {p}"))
            .collect();
        wat.push_str(&format!(
            "  (func (export \"{name}\"){}{gets} call $f{i})\n",
            types(ty)
        ));
    }
    wat.push(')');
    wat
}

/// The real WASI function `name`, callable from the host: the export of this run's shim
/// instance (made on first use, around the guest's memory).
fn original<T: Traced>(
    caller: &mut Caller<'_, T>,
    shim: &Module,
    wasi: &Linker<T>,
    name: &'static str,
) -> wasmtime::Result<Func> {
    if let Some(f) = caller.data_mut().tracing().originals.get(name) {
        return Ok(*f);
    }
    let instance = match caller.data_mut().tracing().shim {
        Some(instance) => instance,
        None => {
            let memory = memory_of(caller)?;
            let mut imports = vec![wasmtime::Extern::Memory(memory)];
            for import in shim.imports().skip(1) {
                imports.push(wasi.get(&mut *caller, import.module(), import.name())?);
            }
            let instance = Instance::new(&mut *caller, shim, &imports)?;
            caller.data_mut().tracing().shim = Some(instance);
            instance
        }
    };
    let f = instance
        .get_func(&mut *caller, name)
        .ok_or_else(|| wasmtime::format_err!("the shim has no `{name}`"))?;
    caller.data_mut().tracing().originals.insert(name, f);
    Ok(f)
}

/// A linker that defines each of `module`'s WASI imports as a wrapper that records or
/// replays around the real function in `wasi` (the door, which is no WASI function, is the
/// caller's to add).
///
/// The real function must be called from wasm, not from the host (it finds the guest's
/// memory through its caller's exports), so each traced run gets a shim instance: a few bytes
/// of wasm that export the guest's memory and one forwarding function per WASI import.
pub fn traced_linker<T: Traced>(module: &Module, wasi: Arc<Linker<T>>) -> Result<Linker<T>> {
    let engine = module.engine();
    let imports = wasi_imports(module);
    let shim = Arc::new(Module::new(engine, shim_wat(&imports))?);
    let mut traced: Linker<T> = Linker::new(engine);
    for (name, ty) in imports {
        let (shim, wasi) = (shim.clone(), wasi.clone());
        traced.func_new(
            "wasi_snapshot_preview1",
            name,
            ty,
            move |mut caller, args, results| {
                let original = original(&mut caller, &shim, &wasi, name)?;
                wasi_call(name, &original, &mut caller, args, results)
            },
        )?;
    }
    Ok(traced)
}

/// The names of the WASI functions a module imports.
fn wasi_imports(module: &wasmtime::Module) -> Vec<(&'static str, wasmtime::FuncType)> {
    module
        .imports()
        .filter(|i| i.module() == "wasi_snapshot_preview1")
        .filter_map(|i| {
            let ty = i.ty().func()?.clone();
            // Leaked once per process per name: the linker's closures need 'static names.
            Some((&*Box::leak(i.name().to_owned().into_boxed_str()), ty))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_listing_is_put_in_name_order_with_cookies_by_place() {
        let entry = |next: u64, name: &str| {
            let mut e = next.to_le_bytes().to_vec();
            e.extend_from_slice(&[0; 8]);
            e.extend_from_slice(&(name.len() as u32).to_le_bytes());
            e.extend_from_slice(&[4, 0, 0, 0]);
            e.extend_from_slice(name.as_bytes());
            e
        };
        let mut listing = [entry(3, "b.ttf"), entry(4, "a.ttf"), entry(5, "c")].concat();
        sort_dirents(&mut listing, 2);
        assert_eq!(
            listing,
            [entry(3, "a.ttf"), entry(4, "b.ttf"), entry(5, "c")].concat()
        );
    }

    #[test]
    fn blobs_store_large_contents_once() {
        let mut blobs = Blobs::default();
        let small = blobs.put(b"tiny");
        assert!(matches!(small, Data::Inline(_)));
        let big = vec![7u8; 1000];
        let (a, b) = (blobs.put(&big), blobs.put(&big));
        assert_eq!(a, b);
        assert_eq!(blobs.map.len(), 1);
        assert_eq!(blobs.get(&a).unwrap(), big);
        assert_eq!(blobs.get(&small).unwrap(), b"tiny");
    }

    #[test]
    fn iovecs_are_followed_up_to_the_total() {
        let mut memory = vec![0u8; 64];
        // Two iovecs at 0: (32, 4) and (40, 8).
        memory[0..4].copy_from_slice(&32u32.to_le_bytes());
        memory[4..8].copy_from_slice(&4u32.to_le_bytes());
        memory[8..12].copy_from_slice(&40u32.to_le_bytes());
        memory[12..16].copy_from_slice(&8u32.to_le_bytes());
        assert_eq!(iovec_regions(&memory, 0, 2, 6), vec![(32, 4), (40, 2)]);
        assert_eq!(iovec_regions(&memory, 0, 2, 100), vec![(32, 4), (40, 8)]);
    }
}
