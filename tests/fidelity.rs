//! Notebooks written the ways real ones are (nbformat 3, IPython's syntax, autoawait,
//! annotations, star imports, neighbours, wheels, plots) give what they give in Jupyter: the
//! value native CPython gives for the same function where the function is plain Python, else
//! a fixed value.

use std::path::Path;
use std::process::Command;

use base64::Engine as _;
use serde_json::{Value, json};

use crate::common::{Fixture, code_cell, host};

/// What native CPython prints as JSON for `expr` after running `source`, in `dir` (so the
/// modules next to a notebook import as they would in Jupyter).
fn native_in(dir: &Path, source: &str, expr: &str) -> Value {
    let script = format!("{source}\nimport json\nprint(json.dumps({expr}))\n");
    let out = Command::new("python3")
        .arg("-c")
        .arg(&script)
        .current_dir(dir)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "native python3 failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn native(source: &str, expr: &str) -> Value {
    native_in(Path::new("."), source, expr)
}

#[test]
fn nbformat_3_notebooks_are_read_as_jupyter_upgrades_them() {
    let constants = "SCALE = 3";
    let function = "def scaled(xs):\n    return [SCALE * x for x in xs]";
    let fx = Fixture::raw(
        &json!({
            "nbformat": 3, "nbformat_minor": 0, "metadata": {"name": "old"},
            "worksheets": [
                {"cells": [
                    {"cell_type": "heading", "level": 1, "metadata": {}, "source": ["Old\n", "notebook"]},
                    {"cell_type": "code", "language": "python", "collapsed": false, "metadata": {},
                     "input": [constants], "outputs": [], "prompt_number": 1}]},
                {"cells": [
                    {"cell_type": "markdown", "metadata": {}, "source": "prose"},
                    {"cell_type": "code", "language": "python", "collapsed": false, "metadata": {},
                     "input": function, "outputs": []},
                    {"cell_type": "code", "language": "python", "collapsed": false, "metadata": {},
                     "input": "def fails():\n    raise ValueError('in cell 5')", "outputs": []}]}
            ]
        })
        .to_string(),
    );
    assert_eq!(
        fx.run("scaled", &["--args", "[[1, 2]]"]).value(),
        native(&format!("{constants}\n{function}"), "scaled([1, 2])")
    );
    // Cells are counted over all worksheets, the heading included.
    fx.run("fails", &[])
        .fails(1, &["nb.ipynb, cell 5, line 2", "ValueError: in cell 5"]);
    let inspect = host(&["inspect", fx.notebook.to_str().unwrap()]);
    assert!(
        inspect.stdout.contains("cell 1 markdown"),
        "{}",
        inspect.stdout
    );
}

#[test]
fn uniformly_indented_cells_are_dedented_as_ipython_does() {
    // importnb's own notebooks are written this way.
    let cell = "    import math\n    def area(r):\n        return round(math.pi * r * r, 6)\n";
    let fx = Fixture::code(&[cell]);
    assert_eq!(
        fx.run("area", &["--args", "[2]"]).value(),
        native(
            &format!("import textwrap\nexec(textwrap.dedent({cell:?}))"),
            "area(2)"
        )
    );
}

#[test]
fn magics_shell_and_help_lines_in_every_position() {
    let fx = Fixture::code(&[
        "%%time\nraise RuntimeError('a cell magic cell must not run')",
        // A line magic continued with a backslash, then the cell's own imports.
        "%matplotlib \\\n    --inline\nimport json\nfiles, more = !ls\n!pip install nothing\nlen?\n??json.dumps\njson.dumps?\nTEXT = '100% sure?'  # why?",
        "def dumps(x):\n    return json.dumps(x)\ndef text():\n    return TEXT",
        "def measured(x, timed):\n    if timed:\n        %time y = x * 2\n        total = !echo\n    return x + 1\n\nmeasured?",
        "    %load_ext autoreload\n    def indented_after_magic():\n        return 'ok'",
    ]);
    assert_eq!(
        fx.run("dumps", &["--args", "[[1, \"a\"]]"]).value(),
        native("import json", "json.dumps([1, 'a'])")
    );
    // A `%` or `?` inside a string or a comment is Python's, not IPython's.
    assert_eq!(fx.run("text", &[]).value(), json!("100% sure?"));
    let run = fx.run("measured", &["--args", "[1, false]"]);
    assert_eq!(run.value(), json!(2));
    assert!(
        run.stderr.contains("raise an error if reached"),
        "{}",
        run.stderr
    );
    // Reached, the magic says what it is and why it cannot run.
    fx.run("measured", &["--args", "[1, true]"]).fails(
        1,
        &[
            "nb.ipynb, cell 4, line 3, in measured",
            "`%time y = x * 2` is an IPython magic",
        ],
    );
    assert_eq!(fx.run("indented_after_magic", &[]).value(), json!("ok"));
}

#[test]
fn top_level_await_is_dropped_and_the_cell_keeps_its_definitions() {
    let fx = Fixture::code(&[
        "import asyncio",
        "async def fetch(n):\n    return n * 10\n\nresult = await fetch(1)\nasync for x in stream():\n    pass\nLIMIT = await fetch(2)\n\ndef plain(n):\n    return n + 1",
        "def uses_result():\n    return result",
    ]);
    assert_eq!(fx.run("plain", &["--args", "[1]"]).value(), json!(2));
    // In a cell tagged `export`, the awaiting statement still cannot run as Python: dropped.
    let exported = Fixture::cells(vec![json!({
        "cell_type": "code", "metadata": {"tags": ["export"]}, "outputs": [], "execution_count": null,
        "source": "async def fetch():\n    return 1\nVALUE = await fetch()\nlookup = {'a': 1}\ndef get(k):\n    return lookup[k]"
    })]);
    assert_eq!(
        exported.run("get", &["--args", "[\"a\"]"]).value(),
        json!(1)
    );
    assert_eq!(fx.run("fetch", &["--args", "[4]"]).value(), json!(40));
    // `result` is bound only by a statement IPython awaits at the top level: not run.
    fx.run("uses_result", &[])
        .fails(2, &["global `result`", "result = await fetch(1)"]);
    let inspect = host(&["inspect", fx.notebook.to_str().unwrap()]);
    assert_eq!(inspect.code, 0, "{}", inspect.stderr);
    assert!(
        inspect.stdout.contains("LIMIT = await fetch(2)")
            && inspect.stdout.contains("dropped: top-level code"),
        "{}",
        inspect.stdout
    );
}

#[test]
fn annotations_and_type_checking_imports_are_not_dependencies() {
    let source = "from __future__ import annotations\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from no_such_typing_only_module import Parser";
    let function = "def describe(p: Parser, n: Count = 2) -> Parser:\n    total: Count = n * 2\n    return {'n': total}";
    let fx = Fixture::code(&[
        source,
        // Bound only by dropped code, used only in annotations.
        "Count = int\nprint('exploring')",
        function,
    ]);
    assert_eq!(
        fx.run("describe", &["--args", "[null]"]).value(),
        native(&format!("{source}\n{function}"), "describe(None)")
    );
}

#[test]
fn a_star_import_is_a_dependency_only_of_functions_using_a_name_it_may_bind() {
    let fx = Fixture::code(&[
        "from math import *\nfrom no_such_star_module import *",
        "def own(x):\n    return [x, len(str(x))]",
        "def root(x):\n    return sqrt(x)",
    ]);
    assert_eq!(
        fx.run("own", &["--args", "[123]"]).value(),
        native("def own(x):\n    return [x, len(str(x))]", "own(123)")
    );
    // `sqrt` could come from either star import, so both are needed, and one is missing.
    fx.run("root", &["--args", "[16]"])
        .fails(2, &["imports `no_such_star_module`"]);
}

#[test]
fn a_star_import_whose_module_lists_its_names_is_needed_only_for_those() {
    let imports = "from json import *\nfrom os.path import *";
    let function = "def encode(x):\n    return dumps(x)";
    let fx = Fixture::code(&[
        imports,
        function,
        "def unknown():\n    return undefined_name",
    ]);
    assert_eq!(
        fx.run("encode", &["--args", "[[1]]"]).value(),
        native(&format!("{imports}\n{function}"), "encode([1])")
    );
    let inspect = host(&["inspect", fx.notebook.to_str().unwrap(), "--json"]);
    let report: Value = serde_json::from_str(&inspect.stdout).unwrap();
    let needs = |f: &str| -> Vec<String> {
        let entry = report["functions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["function"] == f)
            .unwrap();
        entry["closure"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["text"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(needs("encode"), ["from json import *", "def encode(x):"]);
    assert_eq!(needs("unknown"), ["def unknown():"]);
}

#[test]
fn the_refusal_names_every_dropped_global_with_every_statement_binding_it() {
    let fx = Fixture::code(&[
        "rewards = [0, 1]\ntransition_probabilities = {}",
        "def value(s):\n    return rewards[s] + len(transition_probabilities)",
        "for episode in range(3):\n    rewards = []",
    ]);
    fx.run("value", &["--args", "[0]"]).fails(
        2,
        &[
            "global `rewards`",
            "nb.ipynb, cell 1, line 1: `rewards = [0, 1]`",
            "nb.ipynb, cell 3, line 1: `for episode in range(3):`",
            "Tag cells 1 and 3 `export`",
            "global `transition_probabilities`",
            "nb.ipynb, cell 1, line 2: `transition_probabilities = {}`",
            "Tag cell 1 `export`",
        ],
    );
}

#[test]
fn non_ascii_upper_case_names_are_all_caps_constants() {
    let source = "ÄNDERUNG = 3\nΣ_MAX = ÄNDERUNG * 2";
    let function = "def change(x):\n    return x + ÄNDERUNG + Σ_MAX";
    let fx = Fixture::code(&[source, function]);
    assert_eq!(
        fx.run("change", &["--args", "[1]"]).value(),
        native(&format!("{source}\n{function}"), "change(1)")
    );
}

/// A notebook next to a module, a package and another notebook, all imported.
fn neighbours() -> Fixture {
    let fx = Fixture::code(&[
        "from helpers import clean\nimport textkit\nfrom other import shout",
        "def tidy(s):\n    return [clean(s), textkit.words(s), shout(s)]",
        "def only_helpers(s):\n    return clean(s)",
    ]);
    std::fs::write(
        fx.path("helpers.py"),
        "import textkit.core\n\ndef clean(s):\n    return textkit.core.squash(s).lower()\n",
    )
    .unwrap();
    std::fs::create_dir_all(fx.path("textkit")).unwrap();
    std::fs::write(fx.path("textkit/__init__.py"), "from .core import words\n").unwrap();
    std::fs::write(
        fx.path("textkit/core.py"),
        "def squash(s):\n    return ' '.join(s.split())\n\ndef words(s):\n    return len(s.split())\n",
    )
    .unwrap();
    let other = json!({"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [
        code_cell("SUFFIX = '!'\ndef shout(s):\n    return s.strip().upper() + SUFFIX"),
        code_cell("raise RuntimeError('top-level code of other.ipynb must not run')"),
    ]});
    std::fs::write(fx.path("other.ipynb"), other.to_string()).unwrap();
    fx
}

#[test]
fn a_sibling_module_package_and_notebook_are_bundled() {
    let fx = neighbours();
    let value = fx
        .run("tidy", &["--args", "[\"  Hello   World \"]"])
        .value();
    let natively = native_in(
        fx.dir.path(),
        "from helpers import clean\nimport textkit",
        "[clean('  Hello   World '), textkit.words('  Hello   World ')]",
    );
    assert_eq!(
        value.as_array().unwrap()[..2],
        natively.as_array().unwrap()[..]
    );
    assert_eq!(value[2], json!("HELLO   WORLD!"));

    let out = fx.path("tidy.bundle.json");
    let made = host(&[
        "bundle",
        fx.notebook.to_str().unwrap(),
        "-f",
        "tidy",
        "-o",
        out.to_str().unwrap(),
        "--no-image",
    ]);
    assert_eq!(made.code, 0, "{}", made.stderr);
    let inspect = host(&["inspect", out.to_str().unwrap()]);
    for listed in [
        "module   helpers from helpers.py",
        "module   other from other.ipynb",
        "module   textkit from textkit/__init__.py",
        "module   textkit.core from textkit/core.py",
    ] {
        assert!(
            inspect.stdout.contains(listed),
            "{listed}:\n{}",
            inspect.stdout
        );
    }
    let inspect = host(&["inspect", fx.notebook.to_str().unwrap()]);
    assert!(
        inspect
            .stdout
            .contains("module   textkit.core from textkit/core.py"),
        "{}",
        inspect.stdout
    );
    // The bundle alone runs: the neighbours travel in it.
    let elsewhere = tempfile::tempdir().unwrap();
    let moved = elsewhere.path().join("tidy.bundle.json");
    std::fs::copy(&out, &moved).unwrap();
    let run = host(&[
        "run",
        moved.to_str().unwrap(),
        "tidy",
        "--args",
        "[\"a b\"]",
    ]);
    assert_eq!(run.value(), json!(["a b", 2, "A B!"]));

    // The neighbours' source is part of the version.
    let version = |fx: &Fixture| {
        let run = host(&[
            "run",
            fx.notebook.to_str().unwrap(),
            "only_helpers",
            "--envelope",
            "--args",
            "[\"x\"]",
        ]);
        run.value()["bundle"].clone()
    };
    let before = version(&fx);
    std::fs::write(
        fx.path("helpers.py"),
        "import textkit.core\n\ndef clean(s):\n    return textkit.core.squash(s).lower() + '.'\n",
    )
    .unwrap();
    assert_ne!(before, version(&fx));
}

#[test]
fn a_module_a_neighbour_needs_and_nothing_has_is_named_with_where_it_is_imported() {
    let fx = Fixture::code(&["import textkit\ndef f():\n    return textkit.X"]);
    std::fs::create_dir_all(fx.path("textkit")).unwrap();
    std::fs::write(fx.path("textkit/__init__.py"), "X = 1\n").unwrap();
    std::fs::write(fx.path("textkit/extra.py"), "\nimport no_such_dependency\n").unwrap();
    fx.run("f", &[]).fails(
        2,
        &["textkit/extra.py, line 2 imports `no_such_dependency`"],
    );
}

#[test]
fn notebooks_imported_with_importnb_are_bundled() {
    let fx = Fixture::code(&[
        "from importnb import Notebook\nwith Notebook():\n    import other",
        "def twice(x):\n    return other.double(x) * 2",
    ]);
    let other = json!({"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [
        code_cell("def double(x):\n    return 2 * x"),
    ]});
    std::fs::write(fx.path("other.ipynb"), other.to_string()).unwrap();
    assert_eq!(fx.run("twice", &["--args", "[3]"]).value(), json!(12));
}

#[test]
fn a_folder_next_to_the_notebook_imports_as_a_namespace_package() {
    let fx = Fixture::code(&["import settings\ndef name():\n    return settings.__name__"]);
    std::fs::create_dir_all(fx.path("settings")).unwrap();
    std::fs::write(fx.path("settings/values.yaml"), "a: 1\n").unwrap();
    assert_eq!(
        fx.run("name", &[]).value(),
        native_in(fx.dir.path(), "import settings", "settings.__name__")
    );
}

#[test]
fn an_error_in_a_neighbour_points_into_it() {
    let fx = Fixture::code(&["from helpers import boom\ndef f():\n    return boom()"]);
    std::fs::write(fx.path("helpers.py"), "def boom():\n    return 1 / 0\n").unwrap();
    fx.run("f", &[])
        .fails(1, &["helpers.py, line 2, in boom", "ZeroDivisionError"]);
}

/// Writes a wheel (a zip) with these files, using native Python's `zipfile`.
fn write_wheel(path: &Path, files: &[(&str, &str)]) {
    let files = serde_json::to_string(&files).unwrap();
    let script = "import json, sys, zipfile\nwith zipfile.ZipFile(sys.argv[1], 'w', zipfile.ZIP_DEFLATED) as z:\n    for name, text in json.loads(sys.argv[2]):\n        z.writestr(name, text)\n";
    let status = Command::new("python3")
        .args(["-c", script, path.to_str().unwrap(), &files])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn pure_python_wheels_are_bundled_and_compiled_ones_refused() {
    let fx = Fixture::code(&[
        "from tinylib import double\nimport tinylib.sub.deep as deep",
        "def f(x):\n    return [double(x), deep.name()]",
    ]);
    let meta = "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n";
    let wheel = fx.path("tinylib-1.0-py3-none-any.whl");
    write_wheel(
        &wheel,
        &[
            ("tinylib/__init__.py", "from ._impl import double\n"),
            ("tinylib/_impl.py", "def double(x):\n    return 2 * x\n"),
            // A namespace package inside: no __init__.py.
            ("tinylib/sub/deep.py", "def name():\n    return __name__\n"),
            ("tinylib-1.0.dist-info/WHEEL", meta),
            (
                "tinylib-1.0.dist-info/METADATA",
                "Name: tinylib\nVersion: 1.0\n",
            ),
        ],
    );
    // Without the wheel, the import is refused naming the module; a bundle of every
    // function leaves that one out.
    let all = host(&["bundle", fx.notebook.to_str().unwrap(), "--no-image"]);
    assert_eq!(all.code, 2, "{}", all.stderr);
    assert!(
        all.stderr.contains("`f` is left out of the bundle"),
        "{}",
        all.stderr
    );
    fx.run("f", &["--args", "[2]"])
        .fails(2, &["imports `tinylib`", "--wheel"]);
    let out = fx.path("f.bundle.json");
    let made = host(&[
        "bundle",
        fx.notebook.to_str().unwrap(),
        "--wheel",
        wheel.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--no-image",
    ]);
    assert_eq!(made.code, 0, "{}", made.stderr);
    let run = host(&["run", out.to_str().unwrap(), "f", "--args", "[21]"]);
    assert_eq!(run.value(), json!([42, "tinylib.sub.deep"]));
    // `host run` takes the wheel as well.
    let wheel_flag = ["--wheel", wheel.to_str().unwrap(), "--args", "[1]"];
    assert_eq!(
        fx.run("f", &wheel_flag).value(),
        json!([2, "tinylib.sub.deep"])
    );

    let compiled = fx.path("fastthing-1.0-cp315-cp315-linux_x86_64.whl");
    write_wheel(
        &compiled,
        &[
            ("fastthing/__init__.py", ""),
            (
                "fastthing/_speed.cpython-315-x86_64-linux-gnu.so",
                "\u{7f}ELF",
            ),
            (
                "fastthing-1.0.dist-info/WHEEL",
                "Wheel-Version: 1.0\nRoot-Is-Purelib: false\n",
            ),
        ],
    );
    host(&[
        "bundle",
        fx.notebook.to_str().unwrap(),
        "--wheel",
        compiled.to_str().unwrap(),
    ])
    .fails(
        2,
        &[
            "cannot be bundled",
            "compiled code",
            "_speed.cpython-315-x86_64-linux-gnu.so",
            "pure-Python",
        ],
    );
}

/// Width and height of a PNG, from its header.
fn png_size(png: &[u8]) -> (u32, u32) {
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    let at = |i: usize| u32::from_be_bytes(png[i..i + 4].try_into().unwrap());
    (at(16), at(20))
}

#[test]
fn matplotlib_plots_with_agg_and_figures_come_back_as_png() {
    let fx = Fixture::code(&[
        "%matplotlib inline\nimport matplotlib\nimport matplotlib.pyplot as plt",
        "def figure(xs):\n    fig, ax = plt.subplots(figsize=(3, 2), dpi=50)\n    ax.plot(xs)\n    ax.set_title('títle')\n    plt.show()\n    return fig",
        "def axes():\n    fig, ax = plt.subplots(figsize=(2, 2), dpi=40)\n    return ax",
        "def backend():\n    return matplotlib.get_backend()",
    ]);
    assert_eq!(fx.run("backend", &[]).value(), json!("agg"));
    let run = fx.run("figure", &["--args", "[[1, 3, 2]]"]);
    let png = base64::engine::general_purpose::STANDARD
        .decode(run.value()["image/png"].as_str().unwrap())
        .unwrap();
    assert_eq!(png_size(&png), (150, 100));
    // `plt.show()` does nothing, not even warn.
    assert!(!run.stderr.contains("Warning"), "{}", run.stderr);
    let png = base64::engine::general_purpose::STANDARD
        .decode(fx.run("axes", &[]).value()["image/png"].as_str().unwrap())
        .unwrap();
    assert_eq!(png_size(&png), (80, 80));
}

#[test]
fn errors_at_the_sandbox_edge_say_so_and_name_the_flag() {
    let fx = Fixture::code(&[
        "import os, subprocess",
        "def read(path):\n    return open(path).read()",
        "def listing():\n    return os.listdir()",
        "def shell():\n    return subprocess.run(['ls']).returncode",
    ]);
    fx.run("read", &["--args", "[\"/data/x.csv\"]"]).fails(
        1,
        &[
            "FileNotFoundError",
            "`/data/x.csv` is outside every folder granted",
            "--grant",
        ],
    );
    fx.run("listing", &[])
        .fails(1, &["`/` is outside every folder granted", "--grant"]);
    fx.run("shell", &[])
        .fails(1, &["OSError", "no processes, sockets or threads"]);
    // Inside a grant, a missing file is only that.
    let data = tempfile::tempdir().unwrap();
    let grant = format!("{}:/data", data.path().display());
    let run = fx.run("read", &["--args", "[\"/data/x.csv\"]", "--grant", &grant]);
    run.fails(1, &["FileNotFoundError"]);
    assert!(
        !run.stderr.contains("outside every folder"),
        "{}",
        run.stderr
    );
}

#[test]
fn ipython_display_behaves_as_it_does_outside_a_notebook() {
    let fx = Fixture::code(&[
        "from IPython.display import display, HTML, clear_output\nfrom IPython import get_ipython",
        "def show(x):\n    display(x, HTML('<b>'))\n    clear_output(wait=True)\n    return [x, get_ipython()]",
    ]);
    let run = fx.run("show", &["--args", "[5]"]);
    assert_eq!(run.value(), json!([5, null]));
    assert!(
        run.stderr.contains("5 <IPython.core.display.HTML object>"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_cell_too_deep_to_analyse_is_dropped_and_named_never_an_internal_error() {
    let deep = format!("X = 1{}", "+1".repeat(20_000));
    let fx = Fixture::code(&[&deep, "def f():\r\n    return 2\r\n"]);
    assert_eq!(fx.run("f", &[]).value(), json!(2));
    fx.run("X", &[])
        .fails(2, &["cell 1 does not parse", "host cannot analyse it"]);
}

#[test]
fn a_module_next_to_the_notebook_comes_before_the_runtimes_as_in_jupyter() {
    // The runtime has `tabulate`; Jupyter puts the notebook's folder first on `sys.path`.
    let fx = Fixture::code(&["import tabulate\ndef which():\n    return tabulate.WHO"]);
    std::fs::write(
        fx.path("tabulate.py"),
        "WHO = 'the one next to the notebook'\n",
    )
    .unwrap();
    assert_eq!(
        fx.run("which", &[]).value(),
        native_in(fx.dir.path(), "import tabulate", "tabulate.WHO")
    );
}
