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
