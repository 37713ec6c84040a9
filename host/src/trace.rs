//! The trace file: one recorded call, self-contained, so it re-executes bit for bit on
//! another machine (`host replay`).
//!
//! A trace holds the header (the bundle, the arguments, the policy's environment and guest
//! paths, the limits, the engine's settings, the image the call started from), every import
//! event [`crate::record`] kept, the blobs those events refer to, and the outputs. It is
//! written as a format line, the sha256 of the body, and the body: JSON, deflated.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::bundle::{Bundle, now_rfc3339};
use crate::door::Arguments;
use crate::engine::EngineSettings;
use crate::error::bad_input;
use crate::files::{SigningKey, read_regular, sealed, unsealed};
use crate::policy::{DEFAULT_RECORD, Limits, MAX_RECORD, MAX_TIMEOUT, Policy, Size};
use crate::preinit::Prepared;
use crate::record::{Blobs, Data, Event, Recording};
use crate::sandbox::Sandbox;

/// The trace format: the first line of a trace file, and its header's `format`.
pub const FORMAT: &str = "host-trace/1";

/// A recorded call, self-contained: the bundle, the inputs and every value the guest received.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Trace {
    pub header: Header,
    pub events: Vec<Event>,
    /// Contents too large to inline in an event, by sha256: a file read twice is stored once.
    pub blobs: BTreeMap<String, String>,
    pub outputs: Outputs,
}

/// Everything needed to set the call up again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Header {
    /// The trace format, as on the file's first line.
    pub format: String,
    pub host_version: String,
    pub runtime_sha256: String,
    pub bundle: Bundle,
    pub function: String,
    pub arguments: Arguments,
    pub env: Vec<(String, String)>,
    /// Guest paths and modes only: the host directories are not needed to replay.
    pub grants: Vec<GrantRecord>,
    pub limits: LimitsRecord,
    pub engine: EngineSettings,
    /// sha256 of the pre-initialised memory the call started from; None when it loaded the
    /// bundle itself.
    pub image_sha256: Option<String>,
    pub recorded_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantRecord {
    pub guest: String,
    pub writable: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitsRecord {
    pub memory: u64,
    pub timeout_ms: u64,
    pub output: u64,
    /// The trace's own budget (`--max-record`); traces made before it existed had the default.
    #[serde(default = "default_record")]
    pub record: u64,
}

fn default_record() -> u64 {
    DEFAULT_RECORD
}

impl From<Limits> for LimitsRecord {
    fn from(l: Limits) -> Self {
        LimitsRecord {
            memory: l.memory,
            timeout_ms: l.timeout.as_millis() as u64,
            output: l.output,
            record: l.record,
        }
    }
}

impl LimitsRecord {
    /// The limits to replay under, refused when `--timeout` could not have given them: a
    /// trace's word is no reason to run longer than host ever would.
    pub fn limits(&self) -> Result<Limits> {
        let timeout = std::time::Duration::from_millis(self.timeout_ms);
        if timeout.is_zero() || timeout > MAX_TIMEOUT {
            return Err(bad_input(format!(
                "the trace's time limit of {} ms is not one host runs under (at most {} s)",
                self.timeout_ms,
                MAX_TIMEOUT.as_secs()
            )));
        }
        if self.record > MAX_RECORD {
            return Err(bad_input(format!(
                "the trace's record limit of {} bytes is not one host records under (at most {})",
                self.record,
                Size(MAX_RECORD)
            )));
        }
        Ok(Limits {
            memory: self.memory,
            timeout,
            output: self.output,
            record: self.record,
        })
    }
}

/// How the call ended, as recorded.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Outputs {
    pub stdout: Option<Data>,
    pub stderr: Option<Data>,
    /// The result value, exception, limit or exit, as `host run --envelope` would describe it.
    pub outcome: serde_json::Value,
}

impl Trace {
    /// The trace of a finished recording: the header from the sandbox, bundle and policy the
    /// call ran with (the engine's settings as it has them), the recorded events, and the
    /// outputs, `stdout`, `stderr` and `outcome` (as [`crate::call::Outcome::to_json`] gives it).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        sandbox: &Sandbox,
        prepared: &Prepared,
        policy: &Policy,
        function: &str,
        arguments: &Arguments,
        recording: Recording,
        (stdout, stderr, outcome): (&[u8], &[u8], serde_json::Value),
    ) -> Trace {
        let Recording {
            events, mut blobs, ..
        } = recording;
        let outputs = Outputs {
            stdout: Some(blobs.put(stdout)),
            stderr: Some(blobs.put(stderr)),
            outcome,
        };
        let header = Header {
            format: FORMAT.to_owned(),
            host_version: env!("CARGO_PKG_VERSION").to_owned(),
            runtime_sha256: sandbox.runtime().sha256().to_owned(),
            bundle: prepared.bundle.clone(),
            function: function.to_owned(),
            arguments: arguments.clone(),
            env: policy.env.clone(),
            grants: policy
                .grants
                .iter()
                .map(|g| GrantRecord {
                    guest: g.guest.clone(),
                    writable: g.writable,
                })
                .collect(),
            limits: policy.limits.into(),
            engine: sandbox.engine_settings().clone(),
            image_sha256: prepared.image.as_ref().map(|i| i.sha256.clone()),
            recorded_at: now_rfc3339(),
        };
        Trace {
            header,
            events,
            blobs: blobs.map,
            outputs,
        }
    }

    /// The trace's blobs, reading recorded ranges of the runtime's files from `runtime`.
    pub fn blobs(&self, runtime: &Path) -> Blobs {
        Blobs::with_runtime(self.blobs.clone(), runtime)
    }

    /// Refuses a trace whose events or outputs refer to bytes `blobs` cannot give (see
    /// [`Blobs::check`]), before a replay relies on any of them.
    pub fn check_data(&self, blobs: &Blobs) -> Result<()> {
        let events = self.events.iter().enumerate().flat_map(|(i, e)| {
            let sent = e.sent.iter().map(move |d| (i, d));
            e.writes.iter().map(move |(_, d)| (i, d)).chain(sent)
        });
        for (i, data) in events {
            blobs
                .check(data)
                .with_context(|| format!("the trace's event {i} ({})", self.events[i].call))?;
        }
        for data in [&self.outputs.stdout, &self.outputs.stderr]
            .into_iter()
            .flatten()
        {
            blobs.check(data).context("the trace's outputs")?;
        }
        for id in self.blobs.keys() {
            blobs.get(&Data::Blob(id.clone())).map(drop)?;
        }
        Ok(())
    }

    /// Writes the trace, readable by its owner only (traces hold production data), atomically,
    /// signed with `key` when given.
    pub fn write(&self, path: &Path, key: Option<&SigningKey>) -> Result<()> {
        crate::files::write_private(path, &sealed(key, self.encode()?))
            .with_context(|| format!("failed to write trace `{}`", path.display()))
    }

    /// The bytes of a trace file: the format line, the sha256 of the body, the deflated JSON.
    pub fn encode(&self) -> Result<Vec<u8>> {
        // Serialised straight into the compressor: the JSON text, about as large as the
        // recording, is never held whole; the body is compressed in place behind room for
        // the two header lines (the second, its sha256, written last), never copied.
        let header = FORMAT.len() + 1 + 64 + 1;
        let mut out = DEFLATE.with(|cell| -> Result<Vec<u8>> {
            let mut compress = cell.borrow_mut();
            compress.reset();
            let mut deflating = Deflating {
                compress: &mut compress,
                out: vec![0; header],
            };
            let mut json = std::io::BufWriter::with_capacity(1 << 16, &mut deflating);
            serde_json::to_writer(&mut json, self)?;
            json.into_inner().map_err(|e| e.into_error())?;
            deflating.finish()
        })?;
        let digest = hex::encode(Sha256::digest(&out[header..]));
        out[..header].copy_from_slice(format!("{FORMAT}\n{digest}\n").as_bytes());
        Ok(out)
    }

    /// Reads a trace file, refusing one that is not a regular file, larger than a trace can
    /// be, unsigned or wrongly signed when `key` is given, truncated or changed.
    pub fn read(path: &Path, key: Option<&SigningKey>) -> Result<Trace> {
        let bytes = read_regular(path, "trace", MAX_INFLATED)?;
        Self::from_file_bytes(&bytes, key, &format!("trace `{}`", path.display()))
    }

    /// A trace file's bytes from elsewhere (a server's `GET /v1/runs/ID/trace`), checked as
    /// [`Trace::read`] checks a file; `name` names it in messages.
    pub fn from_file_bytes(bytes: &[u8], key: Option<&SigningKey>, name: &str) -> Result<Trace> {
        let body = unsealed(key, bytes, name)?;
        decode(body, MAX_INFLATED).map_err(|why| bad_input(format!("{name} is refused: {why}")))
    }

    /// Decodes the bytes of a trace file (unsigned), refusing one that is truncated, changed,
    /// malformed, or inflates past [`MAX_INFLATED`].
    pub fn decode(bytes: &[u8]) -> Result<Trace> {
        Self::decode_within(bytes, MAX_INFLATED)
    }

    /// [`Trace::decode`] with another cap on the inflated content, in bytes.
    pub fn decode_within(bytes: &[u8], cap: u64) -> Result<Trace> {
        decode(bytes, cap).map_err(|why| bad_input(format!("the trace is refused: {why}")))
    }
}

/// The most a trace's JSON may inflate to: a recording holds what the call read, and a
/// trace claiming more is refused before host holds it all.
pub const MAX_INFLATED: u64 = 1 << 30;

thread_local! {
    /// Each thread's compressor, reset for every trace: a server writes a trace per call, and
    /// a new compressor's tables cost more to set up than a small trace costs to compress.
    static DEFLATE: std::cell::RefCell<flate2::Compress> =
        std::cell::RefCell::new(flate2::Compress::new(flate2::Compression::fast(), false));
}

/// Raw deflate into `out`, on a borrowed compressor.
struct Deflating<'a> {
    compress: &'a mut flate2::Compress,
    out: Vec<u8>,
}

impl Deflating<'_> {
    /// Ends the stream: the compressed bytes.
    fn finish(mut self) -> Result<Vec<u8>> {
        loop {
            self.out.reserve(4096);
            let status =
                self.compress
                    .compress_vec(&[], &mut self.out, flate2::FlushCompress::Finish)?;
            if status == flate2::Status::StreamEnd {
                return Ok(self.out);
            }
        }
    }
}

impl std::io::Write for Deflating<'_> {
    /// Compresses some of `buf` (with room made for its output, the compressor always takes
    /// some), and says how much.
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            self.out.reserve(buf.len() / 2 + 4096);
            let before = self.compress.total_in();
            self.compress
                .compress_vec(buf, &mut self.out, flate2::FlushCompress::None)
                .map_err(std::io::Error::other)?;
            let took = (self.compress.total_in() - before) as usize;
            if took > 0 {
                return Ok(took);
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Traces whose content inflates to at most this are parsed from memory (see [`decode`]).
const WHOLE: u64 = 16 << 20;

/// A trace from its bytes, its content inflated to at most `cap` bytes, or why it is refused.
fn decode(bytes: &[u8], cap: u64) -> std::result::Result<Trace, String> {
    let mut lines = bytes.splitn(3, |&b| b == b'\n');
    if lines.next() != Some(FORMAT.as_bytes()) {
        return Err(format!(
            "it does not start with `{FORMAT}` (not a trace, or another version)"
        ));
    }
    let (Some(sum), Some(body)) = (lines.next(), lines.next()) else {
        return Err("it is truncated".into());
    };
    if hex::encode(Sha256::digest(body)).as_bytes() != sum {
        return Err("its checksum does not match its content (truncated or corrupted)".into());
    }
    // A small trace (most are a few kilobytes) is inflated whole and parsed from memory,
    // several times faster; a larger one is parsed as it inflates, so its JSON text is never
    // held whole. The cap bounds the time spent and the size of anything the parser builds.
    let whole = WHOLE.min(cap);
    let mut text = Vec::new();
    let inflated = flate2::read::DeflateDecoder::new(body)
        .take(whole + 1)
        .read_to_end(&mut text);
    let parsed = if inflated.is_ok() && text.len() as u64 <= whole {
        serde_json::from_slice::<Trace>(&text)
    } else {
        drop(text);
        let mut inflated = flate2::read::DeflateDecoder::new(body).take(cap.saturating_add(1));
        let parsed = serde_json::from_reader::<_, Trace>(std::io::BufReader::new(&mut inflated));
        if inflated.limit() == 0 {
            return Err(format!(
                "its content inflates to more than {}, more than a trace host reads",
                Size(cap)
            ));
        }
        parsed
    };
    let trace = parsed.map_err(|e| format!("its content is malformed: {e}"))?;
    if trace.header.format != FORMAT {
        return Err(format!(
            "its header says format `{}`, not `{FORMAT}`",
            trace.header.format
        ));
    }
    Ok(trace)
}
