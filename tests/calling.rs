use serde_json::json;

use crate::common::{Fixture, host_with_stdin};

fn conversions() -> Fixture {
    Fixture::code(&[
        "import datetime, decimal\nimport numpy as np\nimport pandas as pd",
        r#"
def echo(*args, **kwargs):
    return {"args": args, "kwargs": kwargs}

def numpy_values():
    return {"int": np.int64(7), "float": np.float32(0.5), "bool": np.bool_(True),
            "array": np.arange(6).reshape(2, 3), "nan": np.array([1.0, np.nan, np.inf])}

def pandas_values():
    frame = pd.DataFrame({"a": [1, 2], "b": ["x", None]})
    indexed = pd.DataFrame({"v": [1.5]}, index=pd.Index(["k"], name="key"))
    return {"frame": frame, "indexed": indexed, "series": pd.Series([1, 2]),
            "labelled": pd.Series({"p": 1, "q": 2}), "ts": pd.Timestamp("2026-01-02 03:04:05"),
            "nat": pd.NaT}

def wide_frame():
    return pd.DataFrame({
        "int": [1, 2, 3], "float": [0.5, float("nan"), float("inf")], "bool": [True, False, True],
        "when": pd.to_datetime(["2026-01-02 00:00:00", None, "2026-03-04 05:06:07"]),
        "gap": pd.to_timedelta([1.5, None, 3], unit="s"), "text": ["a", None, "c"],
        "cat": pd.Categorical(["x", "y", "x"]), "nullable": pd.array([1, None, 3], dtype="Int64"),
        7: [np.int32(7), 8, 9]})

def wide_frame_by_pandas():
    return wide_frame().to_dict("records")

def odd_frames():
    return {"repeated": pd.DataFrame([[1, 2]], columns=["a", "a"]),
            "no_columns": pd.DataFrame(index=range(2))}

def python_values():
    return {"tuple": (1, 2), "set": {3, 1, 2}, "decimal": decimal.Decimal("1.10"),
            "date": datetime.date(2026, 11, 25), "datetime": datetime.datetime(2026, 11, 25, 8, 30),
            "delta": datetime.timedelta(minutes=1, seconds=30), "keys": {1: "one", None: "none"}}

class Opaque:
    pass

def unconvertible():
    return {"fine": [1, 2], "bad": [Opaque()]}

def talk():
    print("to stdout")
    import sys
    print("to stderr", file=sys.stderr)
    return "result"
"#,
    ])
}

#[test]
fn positional_and_keyword_arguments() {
    let fx = conversions();
    let v = fx
        .run(
            "echo",
            &[
                "--args",
                r#"[1, "two", [3], {"four": 4}, null]"#,
                "--kwargs",
                r#"{"k": true}"#,
            ],
        )
        .value();
    assert_eq!(
        v,
        json!({"args": [1, "two", [3], {"four": 4}, null], "kwargs": {"k": true}})
    );
}

#[test]
fn arguments_from_a_file_or_stdin() {
    let fx = conversions();
    let input = fx.path("input.json");
    std::fs::write(&input, r#"{"args": [1], "kwargs": {"x": "y"}}"#).unwrap();
    let v = fx
        .run("echo", &["--input", input.to_str().unwrap()])
        .value();
    assert_eq!(v, json!({"args": [1], "kwargs": {"x": "y"}}));

    let nb = fx.notebook.to_str().unwrap();
    let run = host_with_stdin(
        &["run", nb, "echo", "--input", "-"],
        Some(r#"{"args": [2.5]}"#),
    );
    assert_eq!(run.value(), json!({"args": [2.5], "kwargs": {}}));
}

#[test]
fn malformed_arguments_are_usage_errors() {
    let fx = conversions();
    fx.run("echo", &["--args", "{\"a\": 1}"])
        .fails(2, &["--args must be a JSON array"]);
    fx.run("echo", &["--kwargs", "[1]"])
        .fails(2, &["--kwargs must be a JSON object"]);
    fx.run("echo", &["--args", "[1,"])
        .fails(2, &["--args is not valid JSON"]);
    let input = fx.path("bad.json");
    std::fs::write(&input, r#"{"arguments": [1]}"#).unwrap();
    fx.run("echo", &["--input", input.to_str().unwrap()])
        .fails(2, &["unknown key `arguments`"]);
    fx.run("echo", &["--input", "/no/such/input.json"])
        .fails(2, &["cannot read input file"]);
    fx.run("echo", &["--args", "[1]", "--input", "x.json"])
        .fails(2, &["cannot be used with"]);
}

#[test]
fn numpy_values_convert() {
    let v = conversions().in_process().value("numpy_values", json!([]));
    assert_eq!(
        v,
        json!({"int": 7, "float": 0.5, "bool": true, "array": [[0, 1, 2], [3, 4, 5]], "nan": [1.0, null, null]})
    );
}

#[test]
fn pandas_values_convert() {
    let v = conversions().in_process().value("pandas_values", json!([]));
    assert_eq!(
        v,
        json!({
            "frame": [{"a": 1, "b": "x"}, {"a": 2, "b": null}],
            "indexed": [{"key": "k", "v": 1.5}],
            "series": [1, 2],
            "labelled": {"p": 1, "q": 2},
            "ts": "2026-01-02T03:04:05",
            "nat": null,
        })
    );
}

#[test]
fn a_frame_converts_as_pandas_makes_its_records() {
    let fx = conversions().in_process();
    let v = fx.value("wide_frame", json!([]));
    assert_eq!(
        v,
        json!([
            {"int": 1, "float": 0.5, "bool": true, "when": "2026-01-02T00:00:00", "gap": 1.5,
             "text": "a", "cat": "x", "nullable": 1, "7": 7},
            {"int": 2, "float": null, "bool": false, "when": null, "gap": null,
             "text": null, "cat": "y", "nullable": null, "7": 8},
            {"int": 3, "float": null, "bool": true, "when": "2026-03-04T05:06:07", "gap": 3.0,
             "text": "c", "cat": "x", "nullable": 3, "7": 9},
        ])
    );
    assert_eq!(v, fx.value("wide_frame_by_pandas", json!([])));
    assert_eq!(
        fx.value("odd_frames", json!([])),
        json!({"repeated": [{"a": 2}], "no_columns": [{}, {}]})
    );
}

#[test]
fn python_values_convert() {
    let v = conversions().in_process().value("python_values", json!([]));
    assert_eq!(
        v,
        json!({"tuple": [1, 2], "set": [1, 2, 3], "decimal": "1.10", "date": "2026-11-25",
               "datetime": "2026-11-25T08:30:00", "delta": 90.0, "keys": {"1": "one", "null": "none"}})
    );
}

#[test]
fn an_unconvertible_value_names_its_type_and_place() {
    conversions()
        .run("unconvertible", &[])
        .fails(1, &["Opaque", "result['bad'][0]", "no JSON form"]);
}

#[test]
fn what_the_function_prints_goes_to_stderr() {
    let run = conversions().run("talk", &[]);
    assert_eq!(run.value(), json!("result"));
    assert_eq!(run.stdout, "\"result\"\n");
    assert!(
        run.stderr.contains("to stdout") && run.stderr.contains("to stderr"),
        "{}",
        run.stderr
    );
}

#[test]
fn exceptions_show_notebook_cells_and_lines() {
    let fx = Fixture::code(&[
        "import json",
        "def parse(text):\n    data = json.loads(text)\n    return data['key']",
        "\n\ndef process(text):\n    return parse(text)",
    ]);
    let run = fx.run("process", &["--args", r#"["{}"]"#]);
    run.fails(
        1,
        &[
            "Traceback (most recent call last):",
            "nb.ipynb, cell 3, line 4, in process",
            "    return parse(text)",
            "nb.ipynb, cell 2, line 3, in parse",
            "KeyError: 'key'",
        ],
    );
    assert!(!run.stderr.contains("<string>"), "{}", run.stderr);
    assert!(run.stdout.is_empty());
    // A library's frames are shown by file name.
    fx.run("process", &["--args", r#"["{"]"#])
        .fails(1, &["json/decoder.py", "JSONDecodeError"]);
}

#[test]
fn unknown_functions_list_what_the_notebook_defines() {
    let fx = Fixture::code(&[
        "def alpha():\n    pass\nasync def beta():\n    pass\nclass Gamma:\n    pass",
    ]);
    fx.run("delta", &[]).fails(
        2,
        &[
            "defines no function `delta`",
            "functions it defines: alpha, beta",
        ],
    );
}

#[test]
fn async_functions_are_awaited_and_system_exit_is_an_exception() {
    let fx = Fixture::code(&[
        "import asyncio\nasync def one():\n    await asyncio.sleep(0)\n    return 1\nasync def fetch(x):\n    return x + await one()",
        "import sys\ndef leave():\n    sys.exit(3)",
        "async def wait():\n    await asyncio.sleep(1)",
    ]);
    assert_eq!(fx.run("fetch", &["--args", "[1]"]).value(), json!(2));
    fx.run("wait", &[]).fails(1, &["RuntimeError"]);
    fx.run("leave", &[]).fails(1, &["SystemExit: 3"]);
}
