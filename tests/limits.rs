use crate::common::Fixture;

const HOGS: &str = r#"
def spin():
    while True:
        pass

def hoard():
    chunks = []
    while True:
        chunks.append(bytearray(16 << 20))

def swallow_and_hoard():
    chunks = []
    try:
        while True:
            chunks.append(bytearray(16 << 20))
    except MemoryError:
        return "caught"

def flood():
    while True:
        print("spam " * 100)

def big_result(n):
    return "x" * n

def recurse(n):
    return recurse(n + 1) + 1
"#;

#[test]
fn an_infinite_loop_hits_the_time_limit() {
    Fixture::code(&[HOGS])
        .run("spin", &["--timeout", "500ms"])
        .fails(3, &["time limit", "0.5s", "--timeout"]);
}

#[test]
fn a_memory_bomb_hits_the_memory_limit() {
    let fx = Fixture::code(&[HOGS]);
    fx.run("hoard", &["--memory", "256M"])
        .fails(3, &["memory limit", "256 MiB", "--memory"]);
    // Python never gets a MemoryError to swallow: the call ends at the limit.
    fx.run("swallow_and_hoard", &["--memory", "256M"])
        .fails(3, &["memory limit"]);
}

#[test]
fn an_output_flood_hits_the_output_limit_and_keeps_its_start() {
    let run = Fixture::code(&[HOGS]).run("flood", &["--max-output", "64K"]);
    run.fails(3, &["output limit", "64 KiB", "--max-output"]);
    assert!(
        run.stderr.starts_with("spam spam"),
        "the start of the output is kept"
    );
    assert!(run.stderr.len() < 80 << 10);
}

#[test]
fn a_result_larger_than_the_output_limit_is_refused() {
    let fx = Fixture::code(&[HOGS]);
    fx.run("big_result", &["--max-output", "1K", "--args", "[5000]"])
        .fails(3, &["output limit"]);
    assert_eq!(
        fx.run("big_result", &["--max-output", "1K", "--args", "[10]"])
            .value(),
        "xxxxxxxxxx"
    );
}

#[test]
fn deep_recursion_is_an_exception_not_a_crash() {
    Fixture::code(&[HOGS])
        .run("recurse", &["--args", "[0]"])
        .fails(1, &["RecursionError"]);
}

#[test]
fn limit_flags_are_validated() {
    let fx = Fixture::code(&[HOGS]);
    fx.run("spin", &["--timeout", "soon"])
        .fails(2, &["not a duration"]);
    fx.run("spin", &["--memory", "lots"])
        .fails(2, &["not a size"]);
    fx.run("spin", &["--max-output", "1T"])
        .fails(2, &["unknown size unit"]);
}

const SLEEPERS: &str = r#"
import select, sys, time

def nap(seconds):
    time.sleep(seconds)
    return "woke"

def wait_on_nothing(seconds):
    select.select([], [], [], seconds)
    return "waited"

def recurse_deeper(limit):
    sys.setrecursionlimit(limit)
    def down(k):
        return down(k + 1) + 1
    return down(0)
"#;

#[test]
fn a_sleep_or_a_poll_ends_at_the_time_limit() {
    let fx = Fixture::code(&[SLEEPERS]);
    for function in ["nap", "wait_on_nothing"] {
        let started = std::time::Instant::now();
        fx.run(function, &["--timeout", "1s", "--args", "[1000000]"])
            .fails(3, &["time limit", "1.0s"]);
        // Not a timing assertion on host's speed: without the limit this call sleeps for
        // eleven days.
        assert!(started.elapsed() < std::time::Duration::from_secs(60));
    }
    // A sleep within the limit still sleeps, and returns.
    assert_eq!(fx.run("nap", &["--args", "[0.1]"]).value(), "woke");
}

#[test]
fn a_runaway_recursion_is_a_stack_limit_and_its_report_stays_small() {
    let fx = Fixture::code(&[SLEEPERS]);
    fx.run("recurse_deeper", &["--args", "[1000000]"])
        .fails(3, &["stack limit"]);
    // Under the interpreter's own recursion limit: an exception, its repeats collapsed.
    let run = fx.run("recurse_deeper", &["--args", "[5000]"]);
    run.fails(1, &["RecursionError", "[Previous line repeated"]);
    assert!(run.stderr.len() < 16 << 10, "{}", run.stderr.len());
}

#[test]
fn pre_initialisation_runs_under_the_calls_limits() {
    // What a bundle's definitions run when it loads is the notebook's code too.
    let fx = Fixture::code(&[
        "def spin_at_definition(x=[i for i in iter(int, 1)]):\n    return 1",
        "def hoard(size):\n    def wrap(f):\n        return f\n    _ = [bytearray(256 << 20) for _ in range(size >> 28)]\n    return wrap",
        "@hoard(10 << 30)\ndef allocating_decorator():\n    return 1",
    ]);
    let started = std::time::Instant::now();
    fx.run("spin_at_definition", &["--timeout", "1s"])
        .fails(3, &["time limit", "1.0s"]);
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    fx.run("allocating_decorator", &["--memory", "256M"])
        .fails(3, &["memory limit", "256 MiB"]);
    // Nothing was left in the cache for either: a second run is refused the same way.
    fx.run("allocating_decorator", &["--memory", "256M"])
        .fails(3, &["memory limit"]);
}

const NOISE: &str = r#"
import os

def noise(mb):
    """Reads `mb` fresh random megabytes: nothing a recording can share between two reads."""
    return sum(len(os.urandom(1 << 20)) for _ in range(mb))
"#;

/// Runs `host ARGS`, its output into files, and reports its exit code, stderr and peak
/// resident memory (from `wait4`: this child's alone, whatever else the suite runs).
#[allow(clippy::zombie_processes)] // reaped by `wait4`, which `Child::wait` cannot replace
fn host_measured(args: &[&str], dir: &std::path::Path) -> (i32, String, u64) {
    let err = dir.join("stderr");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_host"))
        .args(args)
        .env("HOST_CACHE_DIR", crate::common::cache_dir())
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(dir.join("stdout")).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32, "wait4 failed");
    assert!(libc::WIFEXITED(status), "host was killed: {status}");
    let stderr = std::fs::read_to_string(err).unwrap();
    (
        libc::WEXITSTATUS(status),
        stderr,
        usage.ru_maxrss as u64 * 1024,
    )
}

#[test]
fn a_recording_ends_at_its_limit_and_replays_to_it() {
    let fx = Fixture::code(&[NOISE]);
    let trace = fx.path("noise.trace");
    let trace = trace.to_str().unwrap();
    fx.run(
        "noise",
        &["--args", "[16]", "--record", trace, "--max-record", "4M"],
    )
    .fails(3, &["record limit", "4 MiB", "--max-record"]);
    // The trace holds the call up to its limit, and replays to the same end.
    let size = std::fs::metadata(trace).unwrap().len();
    assert!(
        size < 5 << 20,
        "a trace of {size} bytes under a 4 MiB limit"
    );
    crate::common::host(&["replay", trace]).fails(3, &["record limit", "4 MiB"]);
    // Under the limit, the same call records and returns (a megabyte of random bytes is
    // 4,096 draws of 256 bytes: about 2.2 MB of trace).
    assert_eq!(
        fx.run(
            "noise",
            &["--args", "[1]", "--record", trace, "--max-record", "4M"]
        )
        .value(),
        1 << 20
    );
    fx.run("noise", &["--max-record", "2G"])
        .fails(2, &["more than a trace may hold", "768 MiB"]);
}

#[test]
fn a_recorded_call_reading_without_end_keeps_host_within_its_bound() {
    // A gigabyte of fresh random bytes, recorded under the default limit: host's own memory
    // is the guest's, plus 250 MB, plus three times the record limit at most (README).
    // Without the limit, host held over four bytes per byte drawn: over 4 GB.
    let fx = Fixture::code(&[NOISE]);
    let trace = fx.path("noise.trace");
    let (code, stderr, peak) = host_measured(
        &[
            "run",
            fx.notebook.to_str().unwrap(),
            "noise",
            "--args",
            "[1024]",
            "--memory",
            "256M",
            "--record",
            trace.to_str().unwrap(),
        ],
        &fx.path(""),
    );
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("record limit hit"), "{stderr}");
    assert!(stderr.contains("256 MiB"), "{stderr}");
    let bound = (256u64 << 20) + 3 * (256 << 20) + (250 << 20);
    assert!(
        peak < bound,
        "host's peak memory was {} MiB, over the documented bound of {} MiB",
        peak >> 20,
        bound >> 20
    );
    eprintln!("peak memory recording 1 GiB of reads: {} MiB", peak >> 20);
}
