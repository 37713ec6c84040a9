use std::path::{Path, PathBuf};

use host::bundle::Select;
use host::evaluate::{Class, Entry, Report};
use host::{
    Arguments, Bundle, Engine, Grant, Notebook, Policy, Prepared, Request, Runtime, Sandbox,
};
use serde_json::{Value, json};

use crate::common::server::{Server, workdir};
use crate::common::{Fixture, Run, cache_dir, host};

/// Records `function(*args)` on `fx`'s notebook for each of `calls`, with `fx`'s folder
/// `data/` granted read-only at `/data` when it exists; the traces go to `fx`'s folder
/// `traces/`, named by call (`0.trace`, `1.trace`, ...), as `host run --record` writes them.
fn record(fx: &Fixture, function: &str, calls: &[Value]) -> PathBuf {
    let engine = Engine::new(Some(cache_dir())).unwrap();
    let sandbox = Sandbox::new(&engine, &Runtime::locate(None).unwrap()).unwrap();
    let notebook = Notebook::read(&fx.notebook).unwrap();
    let bundle = Bundle::from_notebook(&sandbox, &notebook, Select::All, None).unwrap();
    let prepared = Prepared::new(&sandbox, bundle).unwrap();
    let mut policy = Policy::default();
    if fx.path("data").is_dir() {
        policy.grants.push(Grant {
            host: fx.path("data"),
            guest: "/data".into(),
            writable: false,
        });
    }
    let dir = fx.path("traces");
    std::fs::create_dir(&dir).unwrap();
    for (i, args) in calls.iter().enumerate() {
        let arguments = Arguments {
            args: serde_json::from_value(args.clone()).unwrap(),
            ..Default::default()
        };
        let request = Request {
            function,
            arguments: &arguments,
            policy: &policy,
            record: true,
        };
        let finished = host::call::call(&sandbox, &prepared, &request).unwrap();
        std::fs::write(
            dir.join(format!("{i}.trace")),
            finished.trace.unwrap().bytes,
        )
        .unwrap();
    }
    dir
}

/// `host evaluate CANDIDATE --traces TRACES --json EXTRA...`: the process, and the report.
fn evaluate(candidate: &Fixture, traces: &Path, extra: &[&str]) -> (Run, Report) {
    let mut args = vec![
        "evaluate",
        candidate.notebook.to_str().unwrap(),
        "--traces",
        traces.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(extra);
    let run = host(&args);
    let report = serde_json::from_str(run.stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "no report ({e}), exit {}:\n{}\n{}",
            run.code, run.stderr, run.stdout
        )
    });
    (run, report)
}

/// The report's entry for the call numbered `i` (its trace `i.trace`).
fn entry(report: &Report, i: usize) -> &Entry {
    let name = format!("/{i}.trace");
    report
        .runs
        .iter()
        .find(|e| e.run.ends_with(&name))
        .unwrap_or_else(|| panic!("no run {name} in {report:#?}"))
}

/// The calls numbered by class, in order.
fn classes(report: &Report) -> Vec<Class> {
    (0..report.runs.len())
        .map(|i| entry(report, i).class)
        .collect()
}

const PRICE: &str = "def price(quantity, unit):\n    return {\"total\": quantity * unit, \"items\": [quantity] * 2}";

fn price_calls() -> Vec<Value> {
    (1..=6).map(|q| json!([q, 10])).collect()
}

#[test]
fn a_candidate_that_changes_some_results_is_caught_with_exactly_those_runs() {
    let fx = Fixture::code(&[PRICE]);
    let traces = record(&fx, "price", &price_calls());
    // A bulk discount from 5 items: calls 4 and 5 (quantities 5 and 6) change.
    let candidate = Fixture::code(&[&PRICE.replace(
        "quantity * unit,",
        "quantity * unit * (0.9 if quantity >= 5 else 1),",
    )]);
    let (run, report) = evaluate(&candidate, &traces, &["--max-changed", "0"]);
    assert_eq!(run.code, 6, "past --max-changed: {}", run.stderr);
    assert!(
        run.stderr
            .contains("2 runs changed, more than --max-changed 0 allows"),
        "{}",
        run.stderr
    );
    use Class::*;
    assert_eq!(classes(&report), [Same, Same, Same, Same, Changed, Changed]);
    assert_eq!(
        (
            report.summary.total,
            report.summary.same,
            report.summary.changed
        ),
        (6, 4, 2)
    );
    let changed = entry(&report, 4);
    assert_eq!(changed.function, "price");
    assert_eq!(changed.differences.len(), 1, "{changed:#?}");
    let d = &changed.differences[0];
    assert_eq!(
        (d.path.as_str(), &d.recorded, &d.candidate),
        ("result.total", &Some(json!(50)), &Some(json!(45.0)))
    );
    assert_eq!(
        changed.recorded,
        Some(json!({"returned": {"total": 50, "items": [5, 5]}}))
    );

    // The table names the same runs, and the CI gate passes when it allows them.
    let table = host(&[
        "evaluate",
        candidate.notebook.to_str().unwrap(),
        "--traces",
        traces.to_str().unwrap(),
        "--max-changed",
        "2",
    ]);
    assert_eq!(table.code, 0, "{}", table.stderr);
    for needle in [
        "runs: 6 (exact): 4 same, 2 changed, 0 newly failing, 0 fixed, 0 not replayable",
        "4.trace  price     changed         result.total: 50 -> 45.0",
        "changed: ",
        "(4 same runs not listed",
    ] {
        assert!(
            table.stdout.contains(needle),
            "no `{needle}` in:\n{}",
            table.stdout
        );
    }
    assert!(!table.stdout.contains("0.trace"), "{}", table.stdout);
}

#[test]
fn a_refactor_that_changes_nothing_reports_nothing_changed() {
    let fx = Fixture::code(&[PRICE]);
    let traces = record(&fx, "price", &price_calls());
    let refactored = Fixture::code(&[
        "def total(quantity, unit):\n    return sum(unit for _ in range(quantity))",
        "def price(quantity, unit):\n    items = [quantity for _ in range(2)]\n    return {\"items\": items, \"total\": total(quantity, unit)}",
    ]);
    let (run, report) = evaluate(
        &refactored,
        &traces,
        &["--max-changed", "0", "--max-failing", "0"],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(report.summary.same, 6, "{report:#?}");
    assert_eq!(report.summary.total, 6);
    assert!(
        report
            .runs
            .iter()
            .all(|e| e.differences.is_empty() && e.notes.is_empty())
    );
}

const STAMP: &str = r#"
import os, random, time, uuid
import numpy as np

def stamp(name):
    with open(f"/data/{name}") as f:
        content = f.read()
    return {
        "content": content,
        "listing": sorted(os.listdir("/data")),
        "time": time.time(),
        "random": random.random(),
        "numpy": float(np.random.rand()),
        "uuid": uuid.uuid4().hex,
    }
"#;

/// A fixture whose `data/` holds `a.txt`, `b.txt` and a `big.txt` of 200 lines of 100
/// bytes, more than Python reads at once (8 KiB).
fn with_data(cells: &[&str]) -> Fixture {
    let fx = Fixture::code(cells);
    std::fs::create_dir(fx.path("data")).unwrap();
    std::fs::write(fx.path("data/a.txt"), "alpha\n").unwrap();
    std::fs::write(fx.path("data/b.txt"), "beta\n").unwrap();
    std::fs::write(
        fx.path("data/big.txt"),
        format!("{}\n", "x".repeat(99)).repeat(200),
    )
    .unwrap();
    fx
}

#[test]
fn runs_that_read_files_the_clock_and_random_values_are_the_same_on_an_unchanged_notebook() {
    let fx = with_data(&[STAMP]);
    let traces = record(&fx, "stamp", &[json!(["a.txt"]), json!(["b.txt"])]);
    // The granted files are gone: the evaluation rebuilds them from the traces.
    std::fs::remove_dir_all(fx.path("data")).unwrap();
    let (run, report) = evaluate(&fx, &traces, &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(classes(&report), [Class::Same, Class::Same], "{report:#?}");
    let recorded = entry(&report, 1).recorded.as_ref().unwrap();
    assert_eq!(recorded["returned"]["content"], json!("beta\n"));
    assert!(entry(&report, 1).notes.is_empty());

    // The same calls on a notebook that changes one field: only that field differs.
    let shouting =
        Fixture::code(&[&STAMP.replace("\"content\": content,", "\"content\": content.upper(),")]);
    let (_, report) = evaluate(&shouting, &traces, &[]);
    let paths: Vec<&str> = entry(&report, 0)
        .differences
        .iter()
        .map(|d| d.path.as_str())
        .collect();
    assert_eq!(paths, ["result.content"]);
}

#[test]
fn newly_failing_and_fixed_runs_are_classed_with_the_traceback() {
    let fx = Fixture::code(&["def inverse(x):\n    return 1 / x"]);
    let traces = record(
        &fx,
        "inverse",
        &[json!([2]), json!([0]), json!([-4]), json!(["a"])],
    );
    let candidate = Fixture::code(&[
        "def inverse(x):\n    if x == 0:\n        return None\n    if isinstance(x, int) and x < 0:\n        raise ValueError(f'negative: {x}')\n    return 1 / x",
    ]);
    let (run, report) = evaluate(&candidate, &traces, &["--max-failing", "0"]);
    assert_eq!(run.code, 6, "{}", run.stderr);
    use Class::*;
    // 2 returns as before; 0 raised and returns now; -4 returned and raises now; "a" raised
    // TypeError before and raises it still (at another line).
    assert_eq!(
        classes(&report),
        [Same, Fixed, NewlyFailing, Same],
        "{report:#?}"
    );
    let failing = entry(&report, 2);
    let traceback = failing.failure.as_deref().unwrap();
    assert!(
        traceback.contains("nb.ipynb, cell 1, line 5, in inverse")
            && traceback.contains("ValueError: negative: -4"),
        "{traceback}"
    );
    assert_eq!(failing.recorded, Some(json!({"returned": -0.25})));
    assert_eq!(entry(&report, 1).candidate, Some(json!({"returned": null})));
    assert_eq!(
        entry(&report, 1).recorded.as_ref().unwrap()["raised"]["type"],
        json!("ZeroDivisionError")
    );

    // Another failure than the recorded one is a change, named by type and message.
    let stricter = Fixture::code(&[
        "def inverse(x):\n    if not isinstance(x, int):\n        raise ValueError('not a number')\n    return 1 / x",
    ]);
    let (_, report) = evaluate(&stricter, &traces, &[]);
    let changed = entry(&report, 3);
    assert_eq!(changed.class, Changed);
    let mut paths: Vec<&str> = changed
        .differences
        .iter()
        .map(|d| d.path.as_str())
        .collect();
    paths.sort_unstable();
    assert_eq!(paths, ["raised.message", "raised.type"], "{changed:#?}");
}

#[test]
fn floats_within_the_tolerance_are_the_same_and_integers_stay_exact() {
    let fx =
        Fixture::code(&["def stats(xs):\n    return {'mean': sum(xs) / len(xs), 'n': len(xs)}"]);
    let traces = record(
        &fx,
        "stats",
        &[json!([[1.5, 2.25, 3.0]]), json!([[10, 20]])],
    );
    let noisy = Fixture::code(&[
        "def stats(xs):\n    return {'mean': sum(xs) / len(xs) * (1 + 1e-12), 'n': len(xs)}",
    ]);
    let (_, exact) = evaluate(&noisy, &traces, &[]);
    assert_eq!(exact.summary.changed, 2, "{exact:#?}");
    let (_, tolerant) = evaluate(&noisy, &traces, &["--tolerance", "1e-9"]);
    assert_eq!(tolerant.summary.same, 2, "{tolerant:#?}");
    assert_eq!(tolerant.tolerance.relative(), 1e-9);
    let (_, too_tight) = evaluate(&noisy, &traces, &["--tolerance", "1e-15"]);
    assert_eq!(too_tight.summary.changed, 2);

    let counting = Fixture::code(&[
        "def stats(xs):\n    return {'mean': sum(xs) / len(xs), 'n': len(xs) + 1}",
    ]);
    let (_, report) = evaluate(&counting, &traces, &["--tolerance", "0.5"]);
    assert_eq!(
        report.summary.changed, 2,
        "an integer is not a float: {report:#?}"
    );
    host(&[
        "evaluate",
        counting.notebook.to_str().unwrap(),
        "--traces",
        traces.to_str().unwrap(),
        "--tolerance",
        "2",
    ])
    .fails(2, &["a relative tolerance is a number from 0 to 1"]);
}

#[test]
fn a_candidate_reading_what_the_recording_never_read_is_not_replayable() {
    let reads =
        "def read(name):\n    with open(f'/data/{name}') as f:\n        return f.readline()";
    let fx = with_data(&[reads]);
    let traces = record(&fx, "read", &[json!(["a.txt"]), json!(["big.txt"])]);
    let cases = [
        (
            "def read(name):\n    with open(f'/data/{name}') as f:\n        first = f.readline()\n    with open('/data/b.txt') as f:\n        return first + f.read()",
            ["it opens `/data/b.txt`, which the recorded call never opened"; 2],
        ),
        (
            "def read(name):\n    with open(f'/data/{name}') as f:\n        return f.read()",
            [
                // a.txt was read to its end, so reading all of it is recorded.
                "",
                "it reads bytes 8192..",
            ],
        ),
        (
            "import os\ndef read(name):\n    os.listdir('/data')\n    with open(f'/data/{name}') as f:\n        return f.readline()",
            ["it lists the folder `/data`, which the recorded call never listed"; 2],
        ),
    ];
    for (source, reasons) in cases {
        let candidate = with_data(&[source]);
        let (run, report) = evaluate(&candidate, &traces, &[]);
        assert_eq!(run.code, 0, "{}", run.stderr);
        for (i, reason) in reasons.iter().enumerate() {
            let e = entry(&report, i);
            if reason.is_empty() {
                assert_eq!(e.class, Class::Same, "{source}: {e:#?}");
                continue;
            }
            assert_eq!(e.class, Class::NotReplayable, "{source}: {e:#?}");
            let why = e.reason.as_deref().unwrap();
            assert!(why.contains(reason), "{source}: {why}");
        }
    }

    // A trace's function the candidate does not have.
    let other = Fixture::code(&["def write(name):\n    return name"]);
    let (_, report) = evaluate(&other, &traces, &[]);
    let e = entry(&report, 0);
    assert_eq!(e.class, Class::NotReplayable);
    assert!(
        e.reason
            .as_deref()
            .unwrap()
            .contains("offers write, not `read`"),
        "{e:#?}"
    );
}

#[test]
fn runs_are_pulled_from_a_real_server_by_alias() {
    let dir = workdir();
    let server = Server::start(&dir.path().join("data"), None);
    let token = server.default_token();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, &token).unwrap();
    let fx = Fixture::code(&[PRICE]);
    let version = server.deploy(&token, &fx.notebook, &["price"]);
    server
        .put(
            "/v1/aliases/prod",
            Some(&token),
            json!({"version": version}).to_string().as_bytes(),
        )
        .expect(200);
    for q in 1..=5 {
        server
            .call(&token, "prod", "price", json!([q, 10]))
            .expect(200);
    }
    // A call by version is not one of the alias's runs.
    server
        .call(&token, &version, "price", json!([7, 10]))
        .expect(200);
    let candidate = Fixture::code(&[&PRICE.replace(
        "quantity * unit,",
        "quantity * unit * (0.9 if quantity >= 5 else 1),",
    )]);
    // `host evaluate CANDIDATE --server URL --token-file FILE --function price EXTRA...`.
    let on = |candidate: &str, extra: &[&str]| -> Run {
        let mut args = vec![
            "evaluate",
            candidate,
            "--server",
            &server.url,
            "--token-file",
            token_file.to_str().unwrap(),
            "--function",
            "price",
        ];
        args.extend_from_slice(extra);
        host(&args)
    };
    let pull = |extra: &[&str]| -> Report {
        let run = on(
            candidate.notebook.to_str().unwrap(),
            &[extra, &["--json"]].concat(),
        );
        assert_eq!(run.code, 0, "{}\n{}", run.stderr, server.log());
        serde_json::from_str(run.stdout.trim()).unwrap()
    };
    let report = pull(&["--against", "prod"]);
    assert_eq!(report.summary.total, 5, "{report:#?}");
    assert_eq!(report.summary.changed, 1, "quantity 5 only: {report:#?}");
    let changed: Vec<&Entry> = report
        .runs
        .iter()
        .filter(|e| e.class == Class::Changed)
        .collect();
    assert_eq!(
        changed[0].recorded,
        Some(json!({"returned": {"total": 50, "items": [5, 5]}}))
    );
    assert_eq!(
        changed[0].recorded_version.as_deref(),
        Some(version.as_str())
    );
    // Run ids are the server's: the newest first, the last two asked for.
    let last = pull(&["--against", "prod", "--last", "2"]);
    let ids: Vec<&str> = last.runs.iter().map(|e| e.run.as_str()).collect();
    assert_eq!(
        ids,
        [report.runs[0].run.as_str(), report.runs[1].run.as_str()]
    );
    // By version: the six calls; by a file of ids: those.
    assert_eq!(pull(&["--against", &version]).summary.total, 6);
    let ids_file = dir.path().join("ids");
    std::fs::write(&ids_file, format!("{}\n# a comment\n", report.runs[4].run)).unwrap();
    let chosen = pull(&["--against", "prod", "--runs", ids_file.to_str().unwrap()]);
    assert_eq!(chosen.runs.len(), 1);
    assert_eq!(chosen.runs[0].run, report.runs[4].run);

    // Evaluated on the server instead, the notebook deployed there first: the same runs,
    // classed the same, in the same report.
    let classed = |r: &Report| -> Vec<(String, Class, Vec<String>)> {
        r.runs
            .iter()
            .map(|e| {
                let differences = e.differences.iter().map(ToString::to_string).collect();
                (e.run.clone(), e.class, differences)
            })
            .collect()
    };
    let remote = pull(&["--against", "prod", "--on-server"]);
    assert_eq!(remote.summary, report.summary);
    assert_eq!(classed(&remote), classed(&report));
    assert_eq!(remote.notebook, "nb.ipynb");
    // A version deployed already is evaluated there; the table and the CI gate are the same.
    let deployed = server.deploy(&token, &candidate.notebook, &["price"]);
    let table = on(&deployed, &["--against", "prod", "--max-changed", "0"]);
    assert_eq!(table.code, 6, "{}\n{}", table.stderr, server.log());
    for needle in [
        "runs: 5 (exact): 4 same, 1 changed, 0 newly failing, 0 fixed, 0 not replayable",
        "result.total: 50 -> 45.0",
    ] {
        assert!(
            table.stdout.contains(needle),
            "no `{needle}` in:\n{}",
            table.stdout
        );
    }
    assert!(
        table.stderr.contains("on the server") && table.stderr.contains("1 runs changed"),
        "{}",
        table.stderr
    );
    let evaluations = server.get("/v1/evaluations", Some(&token)).expect(200);
    assert_eq!(evaluations["evaluations"].as_array().unwrap().len(), 2);

    // A shadow's repeat of a call is not a call of `prod`, here or on the server.
    server
        .put(
            "/v1/aliases/prod",
            Some(&token),
            json!({"version": version, "shadow": {"version": deployed}})
                .to_string()
                .as_bytes(),
        )
        .expect(200);
    server
        .call(&token, "prod", "price", json!([2, 10]))
        .expect(200);
    let started = std::time::Instant::now();
    while server
        .sql("SELECT id FROM runs WHERE side = 'shadow' AND outcome IS NOT NULL")
        .is_empty()
    {
        assert!(started.elapsed().as_secs() < 60, "no shadow run");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(pull(&["--against", "prod"]).summary.total, 6);
    assert_eq!(pull(&["--against", "prod", "--on-server"]).summary.total, 6);
}
