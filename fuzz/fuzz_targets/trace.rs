//! `Trace::decode`, then what replay prepares from a trace without a sandbox: the bundle's
//! version check, the recorded files rebuilt in memory and the clock readings and random
//! bytes a what-if run is served.
//!
//! The first byte picks the input's shape. Even: the rest is the trace's JSON, which the
//! target deflates and checksums as `Trace::encode` does, so mutations reach the content
//! (a checksum the fuzzer cannot forge would stop them at the door). Odd: the rest is a
//! trace file as it is, for the format line, the checksum and the inflating.
#![no_main]

use std::io::Write;
use std::path::Path;

use host::record::Blobs;
use host::replay::{RecordedFiles, served};
use host::trace::{FORMAT, Trace};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

fuzz_target!(|data: &[u8]| {
    let Some((&shape, rest)) = data.split_first() else {
        return;
    };
    let file = if shape % 2 == 0 {
        wrap(rest)
    } else {
        rest.to_vec()
    };
    let Ok(trace) = Trace::decode(&file) else {
        return;
    };
    let _ = trace.header.bundle.check_version();
    // Runtime ranges are read from the runtime's files: here from a folder that does not
    // exist, so those reads fail, after whatever the range's numbers make host do first.
    let blobs = Blobs::with_runtime(trace.blobs.clone(), Path::new("/nonexistent/runtime"));
    let _ = RecordedFiles::from_trace(&trace, &blobs);
    let _ = served(&trace, &blobs, 1 << 20);
    // A decoded trace encodes to a file that decodes.
    let encoded = trace.encode().expect("a decoded trace encodes");
    Trace::decode(&encoded).expect("an encoded trace decodes");
});

/// A trace file around `json`, as `Trace::encode` lays it out.
fn wrap(json: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(json).unwrap();
    let body = encoder.finish().unwrap();
    let mut out = format!("{FORMAT}\n{}\n", hex::encode(Sha256::digest(&body))).into_bytes();
    out.extend_from_slice(&body);
    out
}
