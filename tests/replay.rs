use std::os::unix::fs::PermissionsExt;

use host::trace::Trace;
use serde_json::{Value, json};

use crate::common::{Fixture, host, host_in};

const SOURCES: &str = r#"
import os, time, random, uuid, json
import numpy as np

def nondeterministic(path):
    with open(path) as f:
        content = f.read()
    time.sleep(0.01)
    return {
        "time": time.time(),
        "monotonic": time.monotonic(),
        "random": random.random(),
        "numpy": float(np.random.rand()),
        "uuid": str(uuid.uuid4()),
        "urandom": os.urandom(8).hex(),
        "hash": hash("a string"),
        "listing": sorted(os.listdir(os.path.dirname(path))),
        "content": content,
        "size": os.stat(path).st_size,
        "env": os.environ.get("MODE"),
    }

def read_twice(path):
    with open(path, "rb") as f:
        first = f.read()
    with open(path, "rb") as f:
        second = f.read()
    return len(first) + len(second)

def fails(x):
    print("about to fail")
    raise ValueError(f"bad input {x}")

def write(path):
    with open(path, "w") as f:
        f.write(str(random.random()))
    return "written"
"#;

struct Recorded {
    fx: Fixture,
    trace: std::path::PathBuf,
    value: Value,
}

fn record(function: &str, args: &str, extra: &[&str]) -> Recorded {
    let fx = Fixture::code(&[SOURCES]);
    std::fs::create_dir(fx.path("data")).unwrap();
    std::fs::write(fx.path("data/input.txt"), "recorded content\n").unwrap();
    std::fs::write(fx.path("data/other.csv"), "a,b\n1,2\n").unwrap();
    let trace = fx.path("call.trace");
    let grant = format!("{}:/data", fx.path("data").display());
    let mut all = vec![
        "--args",
        args,
        "--grant",
        &grant,
        "--env",
        "MODE=prod",
        "--record",
        trace.to_str().unwrap(),
    ];
    all.extend_from_slice(extra);
    let run = fx.run(function, &all);
    assert!(run.stderr.contains("recorded"), "{}", run.stderr);
    let value = if run.code == 0 {
        run.value()
    } else {
        Value::Null
    };
    Recorded { fx, trace, value }
}

#[test]
fn every_source_of_nondeterminism_replays_to_the_identical_result() {
    let r = record("nondeterministic", r#"["/data/input.txt"]"#, &[]);
    assert_eq!(r.value["content"], json!("recorded content\n"));
    assert_eq!(r.value["listing"], json!(["input.txt", "other.csv"]));
    assert_eq!(r.value["env"], json!("prod"));
    let replay = host(&["replay", r.trace.to_str().unwrap()]);
    assert_eq!(
        replay.value(),
        r.value,
        "the replay returns the recorded value bit for bit"
    );
    assert!(
        replay.stderr.contains("replay identical to the recording"),
        "{}",
        replay.stderr
    );
    // A live call does not: the inputs really were nondeterministic.
    let live = r.fx.run(
        "nondeterministic",
        &[
            "--args",
            r#"["/data/input.txt"]"#,
            "--grant",
            &format!("{}:/data", r.fx.path("data").display()),
        ],
    );
    assert_ne!(live.value()["uuid"], r.value["uuid"]);
}

#[test]
fn a_trace_replays_after_its_granted_files_are_gone() {
    let r = record("nondeterministic", r#"["/data/input.txt"]"#, &[]);
    std::fs::remove_dir_all(r.fx.path("data")).unwrap();
    std::fs::remove_file(&r.fx.notebook).unwrap();
    assert_eq!(
        host(&["replay", r.trace.to_str().unwrap()]).value(),
        r.value
    );
}

#[test]
fn writes_are_not_repeated_on_replay() {
    let fx = Fixture::code(&[SOURCES]);
    std::fs::create_dir(fx.path("out")).unwrap();
    let trace = fx.path("w.trace");
    let grant = format!("{}:/out:rw", fx.path("out").display());
    let run = fx.run(
        "write",
        &[
            "--args",
            r#"["/out/x.txt"]"#,
            "--grant",
            &grant,
            "--record",
            trace.to_str().unwrap(),
        ],
    );
    assert_eq!(run.value(), json!("written"));
    let written = std::fs::read_to_string(fx.path("out/x.txt")).unwrap();
    std::fs::remove_file(fx.path("out/x.txt")).unwrap();
    assert_eq!(
        host(&["replay", trace.to_str().unwrap()]).value(),
        json!("written")
    );
    assert!(
        !fx.path("out/x.txt").exists(),
        "a replay touches no host file"
    );
    assert!(!written.is_empty());
}

#[test]
fn exceptions_and_output_replay_too() {
    let r = record("fails", "[7]", &[]);
    let replay = host(&["replay", r.trace.to_str().unwrap()]);
    replay.fails(
        1,
        &[
            "about to fail",
            "ValueError: bad input 7",
            "nb.ipynb, cell 1",
        ],
    );
}

#[test]
fn the_trace_is_self_contained_private_and_small() {
    let r = record("nondeterministic", r#"["/data/input.txt"]"#, &[]);
    let mode = std::fs::metadata(&r.trace).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "traces carry production data");
    let trace = Trace::read(&r.trace, None).unwrap();
    let h = &trace.header;
    assert_eq!(h.format, "host-trace/1");
    assert_eq!(h.function, "nondeterministic");
    assert_eq!(h.arguments.args, vec![json!("/data/input.txt")]);
    assert_eq!(h.env, vec![("MODE".to_owned(), "prod".to_owned())]);
    assert_eq!(
        (h.grants[0].guest.as_str(), h.grants[0].writable),
        ("/data", false)
    );
    assert_eq!(h.bundle.manifest.functions, ["nondeterministic"]);
    assert_eq!(h.runtime_sha256.len(), 64);
    assert!(
        h.engine.nan_canonicalization && h.engine.relaxed_simd_deterministic && !h.engine.threads
    );
    assert!(h.image_sha256.is_some());
    let calls: Vec<&str> = trace.events.iter().map(|e| e.call.as_str()).collect();
    for kind in [
        "clock_time_get",
        "random_get",
        "fd_read",
        "fd_readdir",
        "path_filestat_get",
        "host::call",
        "poll_oneoff",
    ] {
        assert!(calls.contains(&kind), "no {kind} event in {calls:?}");
    }
    // The host path of the grant is not needed, and not kept.
    let text = serde_json::to_string(&trace).unwrap();
    assert!(!text.contains(r.fx.dir.path().to_str().unwrap()));
    // The standard library's reads are referenced, not copied.
    assert!(std::fs::metadata(&r.trace).unwrap().len() < 64 << 10);
}

#[test]
fn a_file_read_twice_is_stored_once() {
    let fx = Fixture::code(&[SOURCES]);
    std::fs::create_dir(fx.path("data")).unwrap();
    // Incompressible bytes, so the trace's size shows how often they are stored.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let noise: Vec<u8> = (0..200_000)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    std::fs::write(fx.path("data/blob.bin"), &noise).unwrap();
    let grant = format!("{}:/data", fx.path("data").display());
    let trace = fx.path("t.trace");
    fx.run(
        "read_twice",
        &[
            "--args",
            r#"["/data/blob.bin"]"#,
            "--grant",
            &grant,
            "--record",
            trace.to_str().unwrap(),
        ],
    )
    .value();
    let size = std::fs::metadata(&trace).unwrap().len();
    assert!(
        size > 200_000 && size < 300_000,
        "trace of {size} bytes for 2 reads of a 200 kB file"
    );
}

#[test]
fn changed_and_truncated_traces_are_refused() {
    let r = record("nondeterministic", r#"["/data/input.txt"]"#, &[]);
    let bytes = std::fs::read(&r.trace).unwrap();
    let mut flipped = bytes.clone();
    let at = flipped.len() - 10;
    flipped[at] ^= 1;
    std::fs::write(&r.trace, &flipped).unwrap();
    host(&["replay", r.trace.to_str().unwrap()]).fails(2, &["refused", "checksum"]);
    std::fs::write(&r.trace, &bytes[..bytes.len() / 2]).unwrap();
    host(&["replay", r.trace.to_str().unwrap()]).fails(2, &["refused"]);
    std::fs::write(&r.trace, b"{}").unwrap();
    host(&["replay", r.trace.to_str().unwrap()]).fails(2, &["not a trace"]);
}

#[test]
fn a_trace_whose_image_this_host_does_not_build_is_refused_as_such() {
    // What a trace recorded by another build of host looks like here: its guest code made
    // another image of the same bundle.
    let r = record("nondeterministic", r#"["/data/input.txt"]"#, &[]);
    let mut trace = Trace::read(&r.trace, None).unwrap();
    trace.header.image_sha256 = Some("0".repeat(64));
    trace.write(&r.trace, None).unwrap();
    let recorded_by = format!(
        "replay it with the build of host {}",
        env!("CARGO_PKG_VERSION")
    );
    host(&["replay", r.trace.to_str().unwrap()]).fails(
        2,
        &["differs from the recording's (000000000000)", &recorded_by],
    );
}

#[test]
fn the_first_differing_call_is_reported_as_a_divergence() {
    let r = record("nondeterministic", r#"["/data/input.txt"]"#, &[]);
    let mut trace = Trace::read(&r.trace, None).unwrap();
    // As if production's guest had asked for a different file: the replayed guest's call
    // no longer matches the recording.
    let index = trace
        .events
        .iter()
        .position(|e| e.call == "path_open" && e.path.as_deref() == Some("input.txt"))
        .unwrap();
    trace.events[index].path = Some("elsewhere.txt".into());
    trace.write(&r.trace, None).unwrap();
    host(&["replay", r.trace.to_str().unwrap()]).fails(
        5,
        &[
            &format!("diverged at event {index}"),
            "expected: path_open(",
            "\"elsewhere.txt\"",
            "actual:   path_open(",
            "\"input.txt\"",
        ],
    );
    // A recording with more calls than the replay makes diverges at its end.
    let mut trace = Trace::read(&r.trace, None).unwrap();
    trace.events[index].path = Some("input.txt".into());
    let extra = trace.events.last().unwrap().clone();
    trace.events.push(extra);
    trace.write(&r.trace, None).unwrap();
    host(&["replay", r.trace.to_str().unwrap()])
        .fails(5, &["diverged at event", "actual:   the call ended"]);
}

#[test]
fn what_if_runs_an_updated_notebook_on_the_recorded_inputs() {
    let r = record("nondeterministic", r#"["/data/input.txt"]"#, &[]);
    std::fs::remove_dir_all(r.fx.path("data")).unwrap();
    let updated =
        Fixture::code(
            &[&SOURCES.replace("\"content\": content,", "\"content\": content.upper(),")],
        );
    let run = host(&[
        "replay",
        r.trace.to_str().unwrap(),
        "--notebook",
        updated.notebook.to_str().unwrap(),
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout
            .contains("returned.content: \"recorded content\\n\" -> \"RECORDED CONTENT\\n\""),
        "{}",
        run.stdout
    );
    // Clocks, randomness and the listing come from the trace: nothing else differs.
    let differences: Vec<&str> = run.stdout.lines().filter(|l| l.starts_with("  ")).collect();
    assert_eq!(differences.len(), 1, "{}", run.stdout);

    let same = host(&[
        "replay",
        r.trace.to_str().unwrap(),
        "--notebook",
        r.fx.notebook.to_str().unwrap(),
    ]);
    assert!(same.stdout.contains("no difference"), "{}", same.stdout);
}

#[test]
fn a_trace_replays_where_the_runtime_and_caches_are_other_files() {
    // Another machine, as far as one machine can be: the runtime's files at another path (as
    // new links, so even their link counts differ) and an empty image cache, so the
    // pre-initialised memory is built again there.
    let r = record("nondeterministic", r#"["/data/input.txt"]"#, &[]);
    let elsewhere = tempfile::tempdir().unwrap();
    let runtime = host::Runtime::locate(None).unwrap();
    let copy = elsewhere.path().join("runtime");
    std::fs::create_dir_all(copy.join("lib")).unwrap();
    let source = runtime.interpreter().parent().unwrap().to_owned();
    for file in ["python-snapshot.wasm", ".verified", "lib/python315.zip"] {
        std::fs::hard_link(source.join(file), copy.join(file)).unwrap();
    }
    let cache = elsewhere.path().join("cache");
    std::fs::create_dir_all(cache.join("modules")).unwrap();
    let compiled = crate::common::suite_cache().join("modules");
    for entry in std::fs::read_dir(compiled).unwrap() {
        let entry = entry.unwrap();
        std::fs::hard_link(entry.path(), cache.join("modules").join(entry.file_name())).unwrap();
    }
    let run = host_in(
        &["replay", r.trace.to_str().unwrap()],
        None,
        &[
            ("HOST_RUNTIME", copy.as_path()),
            ("HOST_CACHE_DIR", cache.as_path()),
        ],
    );
    assert_eq!(run.value(), r.value);
}
