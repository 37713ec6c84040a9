use std::os::unix::fs::symlink;

use serde_json::{Value, json};

use crate::common::Fixture;

const FILES: &str = r#"
import os

def read(path):
    try:
        with open(path) as f:
            return "read:" + f.read()
    except OSError as e:
        return type(e).__name__

def write(path, text):
    try:
        with open(path, "w") as f:
            f.write(text)
        return "wrote"
    except OSError as e:
        return type(e).__name__

def listing(path):
    try:
        return sorted(os.listdir(path))
    except OSError as e:
        return type(e).__name__

def environment():
    return dict(os.environ)

def connect():
    import socket
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).connect(("127.0.0.1", 22))
        return "connected"
    except OSError as e:
        return type(e).__name__
"#;

/// A fixture with `data/` (granted) holding a file and planted links, and `secret/` beside it.
fn planted() -> Fixture {
    let fx = Fixture::code(&[FILES]);
    let (data, secret) = (fx.path("data"), fx.path("secret"));
    std::fs::create_dir_all(data.join("sub")).unwrap();
    std::fs::create_dir_all(&secret).unwrap();
    std::fs::write(data.join("a.txt"), "granted").unwrap();
    std::fs::write(secret.join("s.txt"), "SECRET").unwrap();
    symlink(secret.join("s.txt"), data.join("absolute-link")).unwrap();
    symlink("../secret/s.txt", data.join("relative-link")).unwrap();
    symlink(&secret, data.join("dir-link")).unwrap();
    symlink("../a.txt", data.join("sub/inside-link")).unwrap();
    fx
}

fn grant(fx: &Fixture, dir: &str, guest: &str, mode: &str) -> String {
    format!("{}:{guest}{mode}", fx.path(dir).display())
}

#[test]
fn reads_inside_a_grant_and_nothing_outside_it() {
    let fx = planted();
    let g = grant(&fx, "data", "/data", "");
    let host_secret = fx.path("secret/s.txt");
    let cases: &[(&str, &str)] = &[
        ("/data/a.txt", "read:granted"),
        ("data/a.txt", "read:granted"),
        ("/data/sub/inside-link", "read:granted"),
        ("/data/../secret/s.txt", "PermissionError"),
        ("/data/sub/../../secret/s.txt", "PermissionError"),
        ("/data/absolute-link", "PermissionError"),
        ("/data/relative-link", "PermissionError"),
        ("/data/dir-link/s.txt", "PermissionError"),
        ("/etc/passwd", "FileNotFoundError"),
        (host_secret.to_str().unwrap(), "FileNotFoundError"),
    ];
    for (path, expected) in cases {
        let got = fx
            .run(
                "read",
                &["--grant", &g, "--args", &json!([path]).to_string()],
            )
            .value();
        assert_eq!(got, json!(expected), "reading {path}");
    }
}

#[test]
fn grants_are_read_only_unless_rw() {
    let fx = planted();
    let ro = grant(&fx, "data", "/data", "");
    let got = fx
        .run(
            "write",
            &["--grant", &ro, "--args", r#"["/data/new.txt", "x"]"#],
        )
        .value();
    assert_eq!(got, json!("PermissionError"));
    assert!(!fx.path("data/new.txt").exists());

    let got = fx
        .run(
            "write",
            &[
                "--grant",
                &grant(&fx, "data", "/data", ":ro"),
                "--args",
                r#"["/data/a.txt", "x"]"#,
            ],
        )
        .value();
    assert_eq!(got, json!("PermissionError"));
    assert_eq!(
        std::fs::read_to_string(fx.path("data/a.txt")).unwrap(),
        "granted"
    );

    let rw = grant(&fx, "data", "/out", ":rw");
    let got = fx
        .run(
            "write",
            &["--grant", &rw, "--args", r#"["/out/new.txt", "written"]"#],
        )
        .value();
    assert_eq!(got, json!("wrote"));
    assert_eq!(
        std::fs::read_to_string(fx.path("data/new.txt")).unwrap(),
        "written"
    );

    // A read-write grant does not make writing outside it possible.
    for path in [
        "/out/../secret/s.txt",
        "/out/absolute-link",
        "/tmp/x.txt",
        "/new.txt",
    ] {
        let got = fx
            .run(
                "write",
                &["--grant", &rw, "--args", &json!([path, "x"]).to_string()],
            )
            .value();
        assert_ne!(got, json!("wrote"), "writing {path}");
    }
    assert_eq!(
        std::fs::read_to_string(fx.path("secret/s.txt")).unwrap(),
        "SECRET"
    );
}

#[test]
fn without_grants_no_host_file_is_visible() {
    let fx = planted();
    assert_eq!(
        fx.run("listing", &["--args", r#"["/"]"#]).value(),
        json!("FileNotFoundError")
    );
    assert_eq!(
        fx.run("listing", &["--args", r#"["/data"]"#]).value(),
        json!("FileNotFoundError")
    );
    let got = fx
        .run(
            "listing",
            &[
                "--grant",
                &grant(&fx, "data", "/data", ""),
                "--args",
                r#"["/data"]"#,
            ],
        )
        .value();
    assert_eq!(
        got,
        json!(["a.txt", "absolute-link", "dir-link", "relative-link", "sub"])
    );
}

#[test]
fn the_environment_is_empty_unless_given() {
    let fx = Fixture::code(&[FILES]);
    // SAFETY of the assertion: the test process's own environment is not empty.
    assert!(std::env::vars().count() > 0);
    assert_eq!(fx.run("environment", &[]).value(), json!({}));
    let got = fx
        .run("environment", &["--env", "MODE=prod", "--env", "EMPTY="])
        .value();
    assert_eq!(got, json!({"MODE": "prod", "EMPTY": ""}));
    fx.run("environment", &["--env", "NOEQUALS"])
        .fails(2, &["--env `NOEQUALS`"]);
}

#[test]
fn there_is_no_network() {
    let got: Value = Fixture::code(&[FILES]).run("connect", &[]).value();
    assert!(got.as_str().is_some_and(|s| s.ends_with("Error")), "{got}");
}

#[test]
fn bad_grants_are_usage_errors() {
    let fx = Fixture::code(&[FILES]);
    fx.run(
        "listing",
        &["--grant", "/no/such/dir:/data", "--args", "[\"/\"]"],
    )
    .fails(2, &["/no/such/dir"]);
    fx.run(
        "listing",
        &["--grant", "relative-guest", "--args", "[\"/\"]"],
    )
    .fails(2, &["HOST_DIR:GUEST_DIR"]);
    let file = fx.notebook.to_str().unwrap().to_owned();
    fx.run(
        "listing",
        &["--grant", &format!("{file}:/nb"), "--args", "[\"/\"]"],
    )
    .fails(2, &["not a directory"]);
    fx.run(
        "listing",
        &[
            "--grant",
            &format!("{}:/usr/local/lib", fx.dir.path().display()),
        ],
    )
    .fails(2, &["reserved"]);
}
