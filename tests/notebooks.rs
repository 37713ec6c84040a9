use serde_json::json;

use crate::common::{Fixture, code_cell, host, host_in};

#[test]
fn source_as_string_or_list_and_other_cells_ignored() {
    let fx = Fixture::cells(vec![
        json!({"cell_type": "markdown", "metadata": {}, "source": ["# Title\n", "def not_code(): pass"]}),
        json!({"cell_type": "raw", "metadata": {}, "source": "def raw_cell(): pass"}),
        json!({"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": 1,
               "source": ["def double(x):\n", "    return 2 * x\n"]}),
        code_cell("def triple(x):\n    return 3 * x"),
    ]);
    assert_eq!(fx.run("double", &["--args", "[21]"]).value(), json!(42));
    assert_eq!(fx.run("triple", &["--args", "[2]"]).value(), json!(6));
    fx.run("not_code", &[])
        .fails(2, &["defines no function `not_code`", "double, triple"]);
    fx.run("raw_cell", &[])
        .fails(2, &["defines no function `raw_cell`"]);
}

#[test]
fn non_python_kernel_is_refused() {
    let fx = Fixture::raw(
        &json!({"nbformat": 4, "nbformat_minor": 5, "cells": [code_cell("f <- function() 1")],
                "metadata": {"kernelspec": {"name": "ir", "language": "R", "display_name": "R"}}})
        .to_string(),
    );
    fx.run("f", &[])
        .fails(2, &["nb.ipynb", "R kernel", "Python notebooks only"]);
}

#[test]
fn missing_file_invalid_json_and_wrong_schema_are_usage_errors() {
    let fx = Fixture::raw("{\"nbformat\": 4, \"cells\": [");
    fx.run("f", &[]).fails(2, &["nb.ipynb", "not valid JSON"]);

    let fx = Fixture::raw(
        r#"{"nbformat": 4, "metadata": {}, "cells": [{"cell_type": "code", "source": 7}]}"#,
    );
    fx.run("f", &[])
        .fails(2, &["nb.ipynb", "not an nbformat 4 notebook"]);

    let fx = Fixture::raw(r#"{"nbformat": 2, "metadata": {}, "worksheets": []}"#);
    fx.run("f", &[]).fails(
        2,
        &[
            "nb.ipynb",
            "is nbformat 2",
            "jupyter nbconvert --to notebook --nbformat 4",
        ],
    );

    host(&["run", "/nonexistent/churn.ipynb", "process"])
        .fails(2, &["/nonexistent/churn.ipynb", "No such file"]);
}

#[test]
fn a_cell_that_does_not_parse_is_dropped_and_named() {
    let fx = Fixture::code(&["def ok():\n    return 1", "def broken(:\n    pass"]);
    assert_eq!(fx.run("ok", &[]).value(), json!(1));
    fx.run("broken", &[])
        .fails(2, &["cell 2 does not parse", "functions it defines: ok"]);
}

#[test]
fn a_missing_runtime_names_the_make_target() {
    let fx = Fixture::code(&["def f():\n    return 1"]);
    let empty = tempfile::tempdir().unwrap();
    let run = host_in(
        &["run", fx.notebook.to_str().unwrap(), "f"],
        None,
        &[("HOST_RUNTIME", empty.path())],
    );
    run.fails(2, &["is not installed", "make runtime"]);
}
