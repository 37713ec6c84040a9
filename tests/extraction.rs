use serde_json::json;

use crate::common::{Fixture, code_cell};

#[test]
fn top_level_code_magics_and_shell_lines_never_run() {
    let fx = Fixture::code(&[
        "%matplotlib inline\n!pip install nothing\nimport json",
        "raise RuntimeError('top-level code ran')",
        "import pandas as pd\ndf = pd.read_csv('/no/such/file.csv')",
        "%%bash\necho a cell magic drops its cell",
        "def process(x):\n    return json.dumps({'x': x})",
    ]);
    assert_eq!(
        fx.run("process", &["--args", "[1]"]).value(),
        json!("{\"x\": 1}")
    );
}

#[test]
fn only_the_closure_runs_not_every_kept_statement() {
    // `other` needs a module that does not exist; `process` does not need `other`.
    let fx = Fixture::code(&[
        "import no_such_module_anywhere\nimport math",
        "def other():\n    return no_such_module_anywhere.x",
        "def process(x):\n    return math.sqrt(x)",
    ]);
    assert_eq!(fx.run("process", &["--args", "[16]"]).value(), json!(4.0));
    // A module the runtime lacks and nothing next to the notebook provides is refused
    // before running, naming where host looked.
    fx.run("other", &[]).fails(
        2,
        &[
            "nb.ipynb, cell 1, line 1 imports `no_such_module_anywhere`",
            "no_such_module_anywhere.py",
            "--wheel",
        ],
    );
}

#[test]
fn decorators_defaults_base_classes_and_constants_are_followed() {
    let fx = Fixture::code(&[
        "import functools",
        "SCALE = 10\nOFFSET = SCALE + 1",
        "def twice(f):\n    @functools.wraps(f)\n    def g(*a):\n        return {k: 2 * v for k, v in f(*a).items()}\n    return g",
        "class Base:\n    unit = 'kg'",
        "def default_unit():\n    return 'g'",
        "class Weight(Base):\n    def __init__(self, v, unit=default_unit()):\n        self.v, self.unit2 = v, unit",
        "@twice\ndef process(v):\n    w = Weight(v)\n    return {'n': w.v * SCALE + OFFSET, 'unit': w.unit, 'default': w.unit2}",
    ]);
    assert_eq!(
        fx.run("process", &["--args", "[1]"]).value(),
        json!({"n": 42, "unit": "kgkg", "default": "gg"})
    );
}

#[test]
fn later_definitions_win_as_in_notebook_order() {
    let fx = Fixture::code(&[
        "RATE = 1\ndef rate():\n    return 'first'",
        "def process():\n    return [rate(), RATE]",
        "RATE = 2\ndef rate():\n    return 'second'",
    ]);
    assert_eq!(fx.run("process", &[]).value(), json!(["second", 2]));
}

#[test]
fn constants_built_from_earlier_constants_keep_their_order() {
    let fx = Fixture::code(&[
        "LIMIT = 1",
        "LIMIT = LIMIT + 1\ndef process():\n    return LIMIT",
        "LIMIT = LIMIT * 10",
    ]);
    assert_eq!(fx.run("process", &[]).value(), json!(20));
}

#[test]
fn a_global_bound_only_by_dropped_code_is_refused_before_running() {
    let fx = Fixture::code(&[
        "import pandas as pd",
        "threshold = 0.5\nraise RuntimeError('must not run')",
        "def helper(x):\n    return x > threshold",
        "def process(x):\n    return helper(x)",
    ]);
    fx.run("process", &["--args", "[1]"]).fails(
        2,
        &[
            "`process` -> `helper`",
            "global `threshold`",
            "nb.ipynb, cell 2, line 1",
            "threshold = 0.5",
            "Tag cell 2 `export`",
            "move that code into a function",
        ],
    );
}

#[test]
fn cells_tagged_export_are_kept_whole() {
    let fx = Fixture::cells(vec![
        json!({"cell_type": "code", "metadata": {"tags": ["export"]}, "outputs": [], "execution_count": null,
               "source": "lookup = {'a': 1}\nlookup['b'] = 2"}),
        code_cell("def process(k):\n    return lookup[k]"),
    ]);
    assert_eq!(fx.run("process", &["--args", "[\"b\"]"]).value(), json!(2));
}

#[test]
fn magic_assignments_bind_nothing_that_runs() {
    let fx = Fixture::code(&[
        "FILES = !ls\nlisting = %sx ls",
        "def process():\n    return FILES",
    ]);
    fx.run("process", &[])
        .fails(2, &["global `FILES`", "shell command"]);
}

#[test]
fn names_not_defined_anywhere_warn_and_raise_name_error_when_reached() {
    let fx = Fixture::code(&[
        "def process(flag):\n    if flag:\n        return display(1)\n    return 'fine'",
    ]);
    let run = fx.run("process", &["--args", "[false]"]);
    assert_eq!(run.value(), json!("fine"));
    assert!(
        run.stderr.contains("`display` is not defined anywhere"),
        "{}",
        run.stderr
    );
    fx.run("process", &["--args", "[true]"])
        .fails(1, &["NameError", "display"]);
}

#[test]
fn a_name_that_is_not_a_function_is_refused() {
    let fx = Fixture::code(&["class Model:\n    pass", "LIMIT = 3"]);
    fx.run("Model", &[])
        .fails(2, &["`Model`", "not a function"]);
    fx.run("LIMIT", &[]).fails(2, &["not a function"]);
}
