use serde_json::{Value, json};

use crate::common::{Fixture, host};

const NOTEBOOK: &[&str] = &[
    "import random\nimport numpy as np",
    "SCALE = 3\nseen = []",
    "def scale(x):\n    return x * SCALE",
    "def remember(x):\n    HISTORY.append(x)\n    return list(HISTORY)",
    "HISTORY = []",
    "def noise():\n    return [random.random(), float(np.random.rand())]",
    "def needs_dropped():\n    return seen",
    "print('exploring')",
];

fn bundle(fx: &Fixture, extra: &[&str]) -> (std::path::PathBuf, Value) {
    let out = fx.path("out.bundle.json");
    let mut args = vec![
        "bundle",
        fx.notebook.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let run = host(&args);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.stdout.trim(), out.to_str().unwrap());
    let value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    (out, value)
}

#[test]
fn a_bundle_holds_the_source_and_a_manifest_and_runs_without_the_notebook() {
    let fx = Fixture::code(NOTEBOOK);
    let (path, b) = bundle(&fx, &["-f", "scale", "--label", "release-7"]);
    assert_eq!(b["format"], json!("host-bundle/1"));
    let m = &b["manifest"];
    assert_eq!(m["notebook"], json!("nb.ipynb"));
    assert_eq!(m["functions"], json!(["scale"]));
    assert_eq!(m["label"], json!("release-7"));
    assert_eq!(m["notebook_sha256"].as_str().unwrap().len(), 64);
    assert_eq!(m["runtime_sha256"].as_str().unwrap().len(), 64);
    assert!(m["created"].as_str().unwrap().ends_with('Z'));
    let lines: Vec<Value> = m["closures"][0]["statements"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["text"].clone())
        .collect();
    assert_eq!(lines, [json!("SCALE = 3"), json!("def scale(x):")]);
    // Small: the extracted source, not the interpreter.
    assert!(std::fs::metadata(&path).unwrap().len() < 8 << 10);
    std::fs::remove_file(&fx.notebook).unwrap();
    let run = host(&[
        "run",
        path.to_str().unwrap(),
        "scale",
        "--args",
        "[2]",
        "--envelope",
    ]);
    assert_eq!(
        run.value(),
        json!({"bundle": b["version"], "function": "scale", "result": 6})
    );
    host(&["run", path.to_str().unwrap(), "noise"]).fails(2, &["offers scale, not `noise`"]);
}

#[test]
fn versions_follow_what_runs() {
    let fx = Fixture::code(NOTEBOOK);
    let (_, first) = bundle(&fx, &["-f", "scale"]);
    let (_, again) = bundle(&fx, &["-f", "scale", "--label", "other"]);
    assert_eq!(
        first["version"], again["version"],
        "label and time are not part of the version"
    );

    let mut cells = NOTEBOOK.to_vec();
    cells[7] = "print('exploring something else')";
    let dropped_changed = Fixture::code(&cells);
    let (_, b) = bundle(&dropped_changed, &["-f", "scale"]);
    assert_eq!(
        first["version"], b["version"],
        "a change to dropped code is not a new version"
    );
    assert_ne!(
        first["manifest"]["notebook_sha256"],
        b["manifest"]["notebook_sha256"]
    );

    cells[1] = "SCALE = 4\nseen = []";
    let kept_changed = Fixture::code(&cells);
    let (path, b) = bundle(&kept_changed, &["-f", "scale"]);
    assert_ne!(first["version"], b["version"]);
    assert_eq!(
        host(&["run", path.to_str().unwrap(), "scale", "--args", "[2]"]).value(),
        json!(8)
    );
}

#[test]
fn without_functions_a_bundle_takes_every_function_it_can() {
    let fx = Fixture::code(NOTEBOOK);
    let out = fx.path("all.bundle.json");
    let run = host(&[
        "bundle",
        fx.notebook.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("`needs_dropped` is left out of the bundle"),
        "{}",
        run.stderr
    );
    let b: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(
        b["manifest"]["functions"],
        json!(["scale", "remember", "noise"])
    );
    // Progress lines are for terminals only.
    assert!(!run.stderr.contains('\r'));
    // Asked for by name, the same function is an error.
    host(&[
        "bundle",
        fx.notebook.to_str().unwrap(),
        "-f",
        "needs_dropped",
    ])
    .fails(2, &["global `seen`"]);
}

#[test]
fn a_changed_bundle_is_refused() {
    let fx = Fixture::code(NOTEBOOK);
    let (path, _) = bundle(&fx, &["-f", "scale"]);
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("SCALE = 3", "SCALE = 9");
    std::fs::write(&path, text).unwrap();
    host(&["run", path.to_str().unwrap(), "scale", "--args", "[1]"])
        .fails(2, &["was changed after it was made"]);
    std::fs::write(&path, r#"{"format": "host-bundle/99"}"#).unwrap();
    host(&["run", path.to_str().unwrap(), "scale"]).fails(2, &["not a host bundle"]);
}

#[test]
fn calls_from_the_image_share_no_state() {
    let fx = Fixture::code(NOTEBOOK);
    let (path, _) = bundle(&fx, &[]);
    let path = path.to_str().unwrap();
    for _ in 0..2 {
        assert_eq!(
            host(&["run", path, "remember", "--args", "[1]"]).value(),
            json!([1])
        );
    }
    let a = host(&["run", path, "noise"]).value();
    let b = host(&["run", path, "noise"]).value();
    assert_ne!(a[0], b[0], "each call gets fresh randomness");
    assert_ne!(a[1], b[1], "numpy's global generator too");
    // The same, loading the source in the call.
    assert_eq!(
        host(&["run", path, "remember", "--args", "[2]", "--no-image"]).value(),
        json!([2])
    );
}

#[test]
fn a_bundle_whose_load_needs_a_grant_loads_per_call() {
    let fx = Fixture::code(&[
        "import json\nCONFIG = json.load(open('/config/settings.json'))",
        "def setting(k):\n    return CONFIG[k]",
    ]);
    std::fs::create_dir(fx.path("config")).unwrap();
    std::fs::write(fx.path("config/settings.json"), r#"{"mode": "strict"}"#).unwrap();
    let out = fx.path("b.json");
    let run = host(&[
        "bundle",
        fx.notebook.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(
        run.stderr.contains("no pre-initialised image"),
        "{}",
        run.stderr
    );
    let grant = format!("{}:/config", fx.path("config").display());
    let v = host(&[
        "run",
        out.to_str().unwrap(),
        "setting",
        "--args",
        r#"["mode"]"#,
        "--grant",
        &grant,
    ])
    .value();
    assert_eq!(v, json!("strict"));
}

#[test]
fn inspect_shows_each_cell_and_each_closure() {
    let fx = Fixture::code(&[
        "%matplotlib inline\nimport math",
        "x = 1",
        "RATE = 2\ndef f():\n    return math.pi * RATE",
        "def g():\n    return x",
    ]);
    let run = host(&["inspect", fx.notebook.to_str().unwrap()]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    for needle in [
        "%matplotlib inline",
        "dropped: IPython magic",
        "import math",
        "kept: import",
        "x = 1",
        "dropped: top-level code",
        "kept: ALL_CAPS constant",
        "f needs 3 statements:",
        "g: cannot be called",
        "global `x`",
    ] {
        assert!(
            run.stdout.contains(needle),
            "inspect lacks `{needle}`:\n{}",
            run.stdout
        );
    }
    let json: Value =
        serde_json::from_str(&host(&["inspect", "--json", fx.notebook.to_str().unwrap()]).stdout)
            .unwrap();
    assert_eq!(json["cells"][0]["statements"][0]["kind"], json!("magic"));
    assert_eq!(json["cells"][1]["statements"][0]["kept"], json!(false));
    assert_eq!(json["functions"][0]["function"], json!("f"));
    assert_eq!(json["functions"][0]["closure"].as_array().unwrap().len(), 3);
    assert!(
        json["functions"][1]["error"]
            .as_str()
            .unwrap()
            .contains("`x`")
    );

    let (path, b) = bundle(&fx, &["-f", "f"]);
    let json: Value =
        serde_json::from_str(&host(&["inspect", "--json", path.to_str().unwrap()]).stdout).unwrap();
    assert_eq!(json["bundle"], b["version"]);
    assert_eq!(json["functions"][0]["closure"].as_array().unwrap().len(), 3);
    let text = host(&["inspect", path.to_str().unwrap()]).stdout;
    assert!(
        text.contains("f needs 3 statements") && text.contains(b["version"].as_str().unwrap()),
        "{text}"
    );
}

#[test]
fn warm_up_calls_run_before_the_image_and_every_call_starts_after_them() {
    let fx = Fixture::code(NOTEBOOK);
    let (_, plain) = bundle(&fx, &["-f", "remember"]);
    std::fs::write(fx.path("sample.json"), r#"{"args": ["warm"]}"#).unwrap();
    std::fs::write(fx.path("other.json"), r#"{"args": ["up"]}"#).unwrap();
    let warm_up = format!("remember={}", fx.path("sample.json").display());
    let other = format!("remember={}", fx.path("other.json").display());
    let (path, warmed) = bundle(
        &fx,
        &["-f", "remember", "--warm-up", &warm_up, "--warm-up", &other],
    );
    assert_ne!(
        plain["version"], warmed["version"],
        "the warm-up is part of the version"
    );
    assert_eq!(
        warmed["manifest"]["warm_up"],
        json!([{"function": "remember", "args": ["warm"], "kwargs": {}},
               {"function": "remember", "args": ["up"], "kwargs": {}}])
    );
    // The samples in turn, three rounds.
    let warmed_up = ["warm", "up", "warm", "up", "warm", "up"];
    let bundle = path.to_str().unwrap();
    for x in ["a", "b"] {
        let args = format!("[\"{x}\"]");
        let mut expected = warmed_up.to_vec();
        expected.push(x);
        assert_eq!(
            host(&["run", bundle, "remember", "--args", &args]).value(),
            json!(expected),
            "each call starts where the warm-up left the module, not where the last call did"
        );
    }
    // A call that loads the bundle itself runs the warm-up first: the same result.
    let mut expected = warmed_up.to_vec();
    expected.push("a");
    assert_eq!(
        host(&["run", bundle, "remember", "--args", "[\"a\"]", "--no-image"]).value(),
        json!(expected)
    );
    let inspected = host(&["inspect", bundle]);
    assert!(
        inspected
            .stdout
            .contains(r#"warm-up  remember(*["warm"], **{})"#),
        "{}",
        inspected.stdout
    );
}

#[test]
fn a_warm_up_that_cannot_run_writes_no_bundle() {
    let fx = Fixture::code(&[
        "def check(x):\n    if x < 0:\n        raise ValueError('negative')\n    return x",
    ]);
    std::fs::write(fx.path("bad.json"), r#"{"args": [-1]}"#).unwrap();
    let out = fx.path("out.bundle.json");
    let nb = fx.notebook.to_str().unwrap();
    let o = out.to_str().unwrap();
    let bad = format!("check={}", fx.path("bad.json").display());
    host(&["bundle", nb, "-o", o, "--warm-up", &bad]).fails(
        2,
        &["--warm-up", "no bundle written", "ValueError: negative"],
    );
    assert!(!out.exists());
    host(&["bundle", nb, "-o", o, "--warm-up", "check"]).fails(2, &["expected FUNCTION=INPUT"]);
    let missing = format!("other={}", fx.path("bad.json").display());
    host(&["bundle", nb, "-o", o, "--warm-up", &missing]).fails(2, &["offers check, not `other`"]);
    host(&["bundle", nb, "-o", o, "--warm-up", "check=nope.json"])
        .fails(2, &["--warm-up `check=nope.json`", "nope.json"]);
    host(&["bundle", nb, "-o", o, "--warm-up", &bad, "--no-image"]).fails(2, &["--no-image"]);
    assert!(!out.exists());
}

#[test]
fn an_image_changed_in_the_cache_is_rebuilt_not_run() {
    let fx = Fixture::code(&["SECRET = 41\ndef answer():\n    return SECRET + 1"]);
    assert_eq!(fx.run("answer", &[]).value(), 42);
    let images = crate::common::cache_dir().join("images");
    let image = std::fs::read_dir(&images)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "mem"))
        .expect("the first run left an image");
    // Change it in place as an attacker would, keeping its size and modification time:
    // every byte of one page in the middle flipped.
    let meta = std::fs::metadata(&image).unwrap();
    let (modified, at) = (meta.modified().unwrap(), (meta.len() / 2) & !0xffff);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&image)
        .unwrap();
    use std::os::unix::fs::FileExt;
    let mut page = vec![0u8; 64 << 10];
    file.read_exact_at(&mut page, at).unwrap();
    for b in &mut page {
        *b = !*b;
    }
    file.write_all_at(&page, at).unwrap();
    file.set_modified(modified).unwrap();
    drop(file);
    // The seal no longer matches: the image is built again, and the call is right.
    assert_eq!(fx.run("answer", &[]).value(), 42);
    let mut rebuilt = vec![0u8; 64 << 10];
    std::fs::File::open(&image)
        .unwrap()
        .read_exact_at(&mut rebuilt, at)
        .unwrap();
    assert_ne!(rebuilt, page, "the forged page is gone");
}

#[test]
fn a_cache_folder_others_can_write_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let fx = Fixture::code(&["def f():\n    return 1"]);
    let shared = fx.path("shared-cache");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let nb = fx.notebook.to_str().unwrap();
    crate::common::host_in(&["run", nb, "f"], None, &[("HOST_CACHE_DIR", &shared)])
        .fails(2, &["can be written by other users", "HOST_CACHE_DIR"]);
    let file = fx.path("a-file");
    std::fs::write(&file, "").unwrap();
    crate::common::host_in(&["run", nb, "f"], None, &[("HOST_CACHE_DIR", &file)])
        .fails(2, &["cannot use", "as host's cache folder"]);
}
