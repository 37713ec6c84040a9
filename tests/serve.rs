//! `host serve`: a real server process on loopback, real HTTP, a real SQLite file.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::server::{Server, send_unread, token, workdir};
use crate::common::{Fixture, cache_dir, host};

/// One notebook, several behaviours: each test deploys what it needs.
const FUNCTIONS: &str = r#"
import time, random

def double(x):
    return x * 2

def boom(x):
    raise ValueError(f"bad value {x}")

def spin(seconds):
    # Busy, reading the clock now and then: a clock read in every turn of the loop would be
    # a million recorded readings a second, past a trace's default limit in about two.
    start = time.time()
    while time.time() - start < seconds:
        for _ in range(10000):
            pass
    return seconds

def secret():
    with open("/data/secret.txt") as f:
        return f.read()

def noisy():
    return {"random": random.random(), "time": time.time()}
"#;

fn notebook(source: &str) -> Fixture {
    Fixture::code(&[source])
}

/// A config of `tenants` (TOML tables without their `[[tenant]]` line) and server keys.
fn config(dir: &Path, server: &str, tenants: &[String]) -> std::path::PathBuf {
    let mut text = format!("{server}\n");
    for t in tenants {
        text.push_str(&format!("[[tenant]]\n{t}\n"));
    }
    let path = dir.join("host.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Every `runs` row's (function, outcome, http_status), oldest first.
fn rows(server: &Server) -> Vec<(String, Option<String>, Option<u16>)> {
    server
        .sql("SELECT function, outcome, http_status FROM runs ORDER BY id")
        .into_iter()
        .map(|r| {
            let status = r[2].as_ref().map(|s| s.parse().unwrap());
            (r[0].clone().unwrap(), r[1].clone(), status)
        })
        .collect()
}

/// A connection of its own to `server` that has sent `first` (part of a request, say); its
/// reads give up after `wait`.
fn raw(server: &Server, first: &str, wait: Duration) -> std::net::TcpStream {
    use std::io::Write;
    let mut c = std::net::TcpStream::connect(server.url.strip_prefix("http://").unwrap()).unwrap();
    c.write_all(first.as_bytes()).unwrap();
    c.set_read_timeout(Some(wait)).unwrap();
    c
}

/// Asserts that the server closed each of `connections` (`what`s) without writing to them:
/// a read ends with 0 bytes; one still open fails at its read timeout.
fn assert_closed(connections: &mut [std::net::TcpStream], what: &str, event: &str, at: Instant) {
    use std::io::Read;
    for (i, c) in connections.iter_mut().enumerate() {
        let mut rest = Vec::new();
        let read = c.read_to_end(&mut rest);
        assert!(
            read.is_ok() && rest.is_empty(),
            "{what} {i} not closed {:?} after {event}: {read:?} {rest:?}",
            at.elapsed()
        );
    }
}

/// A gauge's value in `/metrics`' text.
fn gauge(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no gauge {name} in:\n{metrics}"))
}

#[test]
fn deploy_alias_rollback_and_restart_serve_the_same_versions() {
    let dir = workdir();
    let v1_nb = notebook("def answer():\n    return 1\n");
    let v2_nb = notebook("def answer():\n    return 2\n");
    let server = Server::start(&dir.path().join("data"), None);
    let tok = server.default_token();
    let t = Some(tok.as_str());

    let first = server.post(
        "/v1/bundles?function=answer&label=one&name=nb.ipynb",
        t,
        &std::fs::read(&v1_nb.notebook).unwrap(),
    );
    let deployed = first.expect(201);
    assert_eq!(deployed["functions"], json!(["answer"]));
    assert_eq!(deployed["label"], json!("one"));
    let v1 = deployed["version"].as_str().unwrap().to_owned();
    let again = server.post(
        "/v1/bundles?function=answer&label=one&name=nb.ipynb",
        t,
        &std::fs::read(&v1_nb.notebook).unwrap(),
    );
    assert_eq!(
        again.expect(200)["version"],
        json!(v1),
        "same content, same version"
    );
    let v2 = server.deploy(&tok, &v2_nb.notebook, &["answer"]);
    assert_ne!(v1, v2);

    let moved = server
        .put(
            "/v1/aliases/prod",
            t,
            json!({"version": v1}).to_string().as_bytes(),
        )
        .expect(200);
    assert_eq!(
        moved,
        json!({"alias": "prod", "version": v1, "previous": null})
    );
    let call = server.call(&tok, "prod", "answer", json!([]));
    let body = call.expect(200);
    assert_eq!(body["result"], json!(1));
    assert_eq!(body["bundle"], json!(v1));
    assert_eq!(
        call.header("host-run"),
        body["run"].as_str(),
        "Host-Run header"
    );
    assert!(body["duration_ms"].as_f64().unwrap() > 0.0);

    let moved = server
        .put(
            "/v1/aliases/prod",
            t,
            json!({"version": v2}).to_string().as_bytes(),
        )
        .expect(200);
    assert_eq!(moved["previous"], json!(v1));
    assert_eq!(
        server.call(&tok, "prod", "answer", json!([])).expect(200)["result"],
        json!(2)
    );
    // Rollback is moving it back.
    server
        .put(
            "/v1/aliases/prod",
            t,
            json!({"version": v1}).to_string().as_bytes(),
        )
        .expect(200);
    assert_eq!(
        server.call(&tok, "prod", "answer", json!([])).expect(200)["result"],
        json!(1)
    );
    // A version is callable directly too.
    assert_eq!(
        server.call(&tok, &v2, "answer", json!([])).expect(200)["result"],
        json!(2)
    );

    let history = server.get("/v1/aliases/prod/history", t).expect(200);
    let moves: Vec<(Value, Value)> = history["moves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["from"].clone(), m["to"].clone()))
        .collect();
    assert_eq!(
        moves,
        vec![
            (json!(null), json!(v1)),
            (json!(v1), json!(v2)),
            (json!(v2), json!(v1))
        ]
    );
    let bundles = server.get("/v1/bundles", t).expect(200);
    assert_eq!(bundles["bundles"].as_array().unwrap().len(), 2);
    let inspect = server.get(&format!("/v1/bundles/{v2}"), t).expect(200);
    assert_eq!(inspect["manifest"]["functions"], json!(["answer"]));
    assert_eq!(inspect["manifest"]["notebook"], json!("nb.ipynb"));

    let server = server.restart();
    assert_eq!(
        server.call(&tok, "prod", "answer", json!([])).expect(200)["result"],
        json!(1)
    );
    assert_eq!(
        server.call(&tok, &v2, "answer", json!([])).expect(200)["result"],
        json!(2)
    );
    let aliases = server.get("/v1/aliases", t).expect(200);
    assert_eq!(aliases["aliases"][0]["version"], json!(v1));
    assert!(
        !server.log().contains("token"),
        "a restart does not print the token again:\n{}",
        server.log()
    );
}

#[test]
fn a_tenant_sees_nothing_of_another_and_not_its_grants() {
    let dir = workdir();
    let secrets = dir.path().join("a-secrets");
    std::fs::create_dir(&secrets).unwrap();
    std::fs::write(secrets.join("secret.txt"), "a's secret").unwrap();
    let (a, a_digest) = token("a");
    let (b, b_digest) = token("b");
    let cfg = config(
        dir.path(),
        "",
        &[
            format!(
                "name = \"a\"\ntokens_sha256 = [\"{a_digest}\"]\ngrants = [\"{}:/data:ro\"]",
                secrets.display()
            ),
            format!("name = \"b\"\ntokens_sha256 = [\"{b_digest}\"]"),
        ],
    );
    let server = Server::start(&dir.path().join("data"), Some(&cfg));
    let nb = notebook(FUNCTIONS);
    let version = server.deploy(&a, &nb.notebook, &["secret", "double"]);
    server
        .put(
            "/v1/aliases/prod",
            Some(&a),
            json!({"version": version}).to_string().as_bytes(),
        )
        .expect(200);
    let call = server.call(&a, "prod", "secret", json!([]));
    assert_eq!(call.expect(200)["result"], json!("a's secret"));
    let run = call.json()["run"].as_str().unwrap().to_owned();

    // B cannot call, list, inspect or pull anything of A's: 404, as if it did not exist.
    for path in [
        format!("/v1/bundles/{version}"),
        format!("/v1/runs/{run}"),
        format!("/v1/runs/{run}/trace"),
        "/v1/aliases/prod/history".to_owned(),
    ] {
        let answer = server.get(&path, Some(&b));
        assert_eq!(
            answer.status,
            404,
            "{path}: {}",
            String::from_utf8_lossy(&answer.body)
        );
    }
    assert_eq!(
        server.call(&b, "prod", "double", json!([1])).expect(404)["error"]["kind"],
        json!("not_found")
    );
    assert_eq!(server.call(&b, &version, "double", json!([1])).status, 404);
    assert_eq!(
        server.get("/v1/bundles", Some(&b)).expect(200)["bundles"],
        json!([])
    );
    let runs = server.get("/v1/runs", Some(&b)).expect(200);
    for r in runs["runs"].as_array().unwrap() {
        assert_eq!(r["tenant"], json!("b"), "B lists only its own runs: {r}");
    }
    assert_eq!(
        server.get("/v1/aliases", Some(&b)).expect(200)["aliases"],
        json!([])
    );
    let moved = server.put(
        "/v1/aliases/prod",
        Some(&b),
        json!({"version": version}).to_string().as_bytes(),
    );
    assert_eq!(moved.status, 404, "B cannot point an alias at A's version");

    // The same notebook deployed by B runs without A's grant.
    let own = server.deploy(&b, &nb.notebook, &["secret", "double"]);
    assert_eq!(own, version, "the same content is the same version");
    let denied = server.call(&b, &own, "secret", json!([]));
    let error = denied.expect(422);
    assert_eq!(
        error["error"]["type"],
        json!("FileNotFoundError"),
        "{error}"
    );
    let runs = server.get("/v1/runs?outcome=raised", Some(&b)).expect(200);
    assert_eq!(runs["runs"][0]["function"], json!("secret"));
    assert_eq!(runs["runs"][0]["tenant"], json!("b"));
    let of_a = server.get("/v1/runs", Some(&a)).expect(200);
    assert_eq!(
        of_a["runs"].as_array().unwrap().len(),
        1,
        "A sees only its own run: {of_a}"
    );

    // No token, a wrong token, a malformed header: 401.
    assert_eq!(server.get("/v1/bundles", None).status, 401);
    assert_eq!(server.get("/v1/bundles", Some("not-a-token")).status, 401);
    let malformed = server.request("GET", "/v1/bundles", None, &[("Authorization", &a)], None);
    assert_eq!(
        malformed.expect(401)["error"]["kind"],
        json!("unauthorized")
    );
}

#[test]
fn every_outcome_leaves_one_row_and_a_pulled_trace_replays_to_the_production_result() {
    let dir = workdir();
    let (t, digest) = token("outcomes");
    let cfg = config(
        dir.path(),
        "",
        &[format!(
            "name = \"ops\"\ntokens_sha256 = [\"{digest}\"]\ntimeout = \"1s\""
        )],
    );
    let server = Server::start(&dir.path().join("data"), Some(&cfg));
    let nb = notebook(FUNCTIONS);
    let version = server.deploy(&t, &nb.notebook, &[]);

    let returned = server.call(&t, &version, "noisy", json!([]));
    let production = returned.expect(200)["result"].clone();
    let raised = server.call(&t, &version, "boom", json!([7])).expect(422);
    assert_eq!(raised["error"]["kind"], json!("raised"));
    assert_eq!(raised["error"]["type"], json!("ValueError"));
    assert_eq!(raised["error"]["exception"], json!("bad value 7"));
    let traceback = raised["error"]["traceback"].as_str().unwrap();
    assert!(
        traceback.contains("nb.ipynb, cell 1, line 8, in boom"),
        "{traceback}"
    );
    let limit = server.call(&t, &version, "spin", json!([30])).expect(422);
    assert_eq!(limit["error"]["kind"], json!("limit"));
    assert_eq!(limit["error"]["limit"], json!("time"));
    assert_eq!(limit["bundle"], json!(version));
    let malformed = server.post(
        &format!("/v1/call/{version}/double"),
        Some(&t),
        b"{\"args\": [1,",
    );
    assert_eq!(malformed.expect(400)["error"]["kind"], json!("bad_input"));
    let wrong_type = server.post(
        &format!("/v1/call/{version}/double"),
        Some(&t),
        b"{\"args\": 5}",
    );
    assert!(
        wrong_type.expect(400)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("args")
    );
    let unknown_key = server.post(
        &format!("/v1/call/{version}/double"),
        Some(&t),
        b"{\"arg\": [1]}",
    );
    assert!(
        unknown_key.expect(400)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown key `arg`")
    );
    let unknown_function = server.call(&t, &version, "nope", json!([]));
    assert!(
        unknown_function.expect(404)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not `nope`")
    );
    assert_eq!(
        server
            .call(&t, "no-such-alias", "double", json!([1]))
            .status,
        404
    );
    let keyed = server.request(
        "POST",
        &format!("/v1/call/{version}/double"),
        Some(&t),
        &[("Idempotency-Key", "order-42")],
        Some(br#"{"args": [21]}"#),
    );
    assert_eq!(keyed.expect(200)["result"], json!(42));
    let every = rows(&server);
    let outcomes: Vec<(&str, &str, u16)> = every
        .iter()
        .map(|(f, o, s)| (f.as_str(), o.as_deref().unwrap(), s.unwrap()))
        .collect();
    assert_eq!(
        outcomes,
        vec![
            ("noisy", "returned", 200),
            ("boom", "raised", 422),
            ("spin", "limit", 422),
            ("double", "bad_input", 400),
            ("double", "bad_input", 400),
            ("double", "bad_input", 400),
            ("nope", "bad_input", 404),
            ("double", "bad_input", 404),
            ("double", "returned", 200),
        ],
        "one row per accepted call"
    );
    let row = server.sql(
        "SELECT idempotency_key, result, bundle_version, host_version FROM runs WHERE idempotency_key IS NOT NULL",
    );
    let row: Vec<&str> = row[0].iter().map(|v| v.as_deref().unwrap()).collect();
    assert_eq!(
        row,
        [
            "order-42",
            "42",
            version.as_str(),
            env!("CARGO_PKG_VERSION")
        ]
    );

    // Pull the production call's trace with the CLI and replay it here.
    let run = returned.json()["run"].as_str().unwrap().to_owned();
    let token_file = dir.path().join("ops.token");
    std::fs::write(&token_file, &t).unwrap();
    let trace = dir.path().join("call.trace");
    let client = [
        "--server",
        server.url.as_str(),
        "--token-file",
        token_file.to_str().unwrap(),
    ];
    let mut pull = vec!["runs", "pull", run.as_str(), "-o", trace.to_str().unwrap()];
    pull.extend(client);
    let pulled = host(&pull);
    assert_eq!(pulled.code, 0, "{}", pulled.stderr);
    let replayed = host(&["replay", trace.to_str().unwrap()]);
    assert_eq!(
        replayed.value(),
        production,
        "the replay reproduces the production result"
    );
    // And against a fixed notebook: the recorded inputs, the updated function.
    let fixed = notebook(&FUNCTIONS.replace(
        "return {\"random\": random.random(), \"time\": time.time()}",
        "return {\"random\": random.random(), \"time\": time.time(), \"fixed\": True}",
    ));
    let what_if = host(&[
        "replay",
        trace.to_str().unwrap(),
        "--notebook",
        fixed.notebook.to_str().unwrap(),
    ]);
    assert_eq!(what_if.code, 0, "{}", what_if.stderr);
    assert!(what_if.stdout.contains("fixed"), "{}", what_if.stdout);
    let mut list = vec!["runs", "list", "--outcome", "raised"];
    list.extend(client);
    let listed = host(&list);
    assert_eq!(listed.code, 0, "{}", listed.stderr);
    let lines: Vec<Value> = listed
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["function"], json!("boom"));
    // Paging: newest first, `next` leads to the older page.
    let page = server.get("/v1/runs?limit=2", Some(&t)).expect(200);
    assert_eq!(page["runs"][0]["function"], json!("double"));
    let next = page["next"].as_str().unwrap();
    let older = server
        .get(&format!("/v1/runs?limit=2&after={next}"), Some(&t))
        .expect(200);
    assert_eq!(older["runs"][0]["outcome"], json!("bad_input"));
    assert_eq!(older["runs"][0]["function"], json!("nope"));
    let metrics = server.get("/metrics", None).text();
    for line in [
        r#"host_limit_hits_total{tenant="ops",limit="time"} 1"#,
        r#"host_calls_total{tenant="ops",function="boom",outcome="raised"} 1"#,
        r#"host_calls_total{tenant="ops",function="double",outcome="bad_input"} 4"#,
    ] {
        assert!(metrics.contains(line), "{line}:\n{metrics}");
    }
    // A run that never reached the sandbox has no trace to pull.
    let failed_run = malformed.json()["run"].as_str().unwrap().to_owned();
    assert_eq!(
        server
            .get(&format!("/v1/runs/{failed_run}/trace"), Some(&t))
            .status,
        404
    );
}

#[test]
fn kill_9_during_calls_then_restart_marks_them_interrupted_and_loses_nothing_else() {
    let dir = workdir();
    let server = Server::start(&dir.path().join("data"), None);
    let tok = server.default_token();
    let nb = notebook(FUNCTIONS);
    let version = server.deploy(&tok, &nb.notebook, &["spin", "double"]);
    let done = server.call(&tok, &version, "double", json!([2]));
    let done_run = done.expect(200)["run"].as_str().unwrap().to_owned();
    let url = server.url.clone();
    let (tok2, version2) = (tok.clone(), version.clone());
    let caller = std::thread::spawn(move || {
        // The connection dies with the server: no answer is expected.
        let agent = ureq::Agent::new_with_defaults();
        let _ = agent
            .post(&format!("{url}/v1/call/{version2}/spin"))
            .header("Authorization", format!("Bearer {tok2}"))
            .send(r#"{"args": [20]}"#);
    });
    let started = Instant::now();
    while rows(&server).len() < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the slow call never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut server = server;
    server.kill();
    caller.join().unwrap();
    let server = server.restart();
    assert!(
        server.log().contains("1 call(s) were cut short"),
        "{}",
        server.log()
    );
    let every = rows(&server);
    assert_eq!(
        every,
        vec![
            ("double".to_owned(), Some("returned".to_owned()), Some(200)),
            ("spin".to_owned(), Some("interrupted".to_owned()), None),
        ]
    );
    let kept = server.get(&format!("/v1/runs/{done_run}/trace"), Some(&tok));
    assert_eq!(kept.status, 200, "the committed run's trace is kept");
    assert_eq!(
        server
            .call(&tok, &version, "double", json!([3]))
            .expect(200)["result"],
        json!(6)
    );
}

#[test]
fn sigterm_drains_calls_in_flight_and_exits_0() {
    let dir = workdir();
    let mut server = Server::start(&dir.path().join("data"), None);
    let tok = server.default_token();
    let nb = notebook(FUNCTIONS);
    let version = server.deploy(&tok, &nb.notebook, &["spin"]);
    let url = server.url.clone();
    let (tok2, version2) = (tok.clone(), version.clone());
    let caller = std::thread::spawn(move || {
        let agent = ureq::Agent::new_with_defaults();
        let mut response = agent
            .post(&format!("{url}/v1/call/{version2}/spin"))
            .header("Authorization", format!("Bearer {tok2}"))
            .send(r#"{"args": [2]}"#)
            .expect("the call in flight is answered");
        response.body_mut().read_to_string().unwrap()
    });
    let started = Instant::now();
    while rows(&server).is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the call never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let code = server.stop();
    let answer: Value = serde_json::from_str(&caller.join().unwrap()).unwrap();
    assert_eq!(answer["result"], json!(2));
    assert_eq!(code, 0, "{}", server.log());
    assert!(
        server.log().contains("1 call(s) running"),
        "{}",
        server.log()
    );
    assert_eq!(
        rows(&server),
        vec![("spin".to_owned(), Some("returned".to_owned()), Some(200))]
    );
}

/// At SIGTERM, connections that wait for their client (part way through a request's headers,
/// or sending nothing) are closed at once, not left to hold the stop for the grace period;
/// an answer the server is still writing to a client that reads slowly is written whole.
#[test]
fn sigterm_closes_connections_waiting_for_their_client_and_finishes_answers_being_written() {
    use std::io::Read;
    let dir = workdir();
    // Tests' servers have a grace period of 20 s.
    let mut server = Server::start(&dir.path().join("data"), None);
    let tok = server.default_token();
    let nb = notebook("def big(n):\n    return 'x' * n\n");
    let version = server.deploy(&tok, &nb.notebook, &["big"]);
    let open = |first: &str| raw(&server, first, Duration::from_secs(15));
    let mut waiting = [
        open(""),
        open("GET /healthz HTTP/1.1\r\nHost: x\r\n"),
        open(&format!("POST /v1/call/{version}/big HTTP/1.1\r\nAuthoriz")),
    ];
    // 15 MB: more than loopback's socket buffers hold, so the server is still writing it.
    let size = 15_000_000;
    let mut reader = send_unread(
        &server,
        &format!("/v1/call/{version}/big"),
        &tok,
        &format!(r#"{{"args": [{size}]}}"#),
    );
    reader
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let started = Instant::now();
    while rows(&server).first().is_none_or(|r| r.1.is_none()) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the call never ended"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let stopped = Instant::now();
    server.signal(libc::SIGTERM);
    assert_closed(&mut waiting, "waiting connection", "SIGTERM", stopped);
    let mut answer = Vec::new();
    reader
        .read_to_end(&mut answer)
        .expect("the answer being written is written whole");
    let text = String::from_utf8_lossy(&answer[..answer.len().min(200)]).into_owned();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let body = answer.len() - text.find("\r\n\r\n").unwrap() - 4;
    assert!(body > size, "{body} bytes of an answer of more than {size}");
    assert_eq!(server.exit_code(), 0, "{}", server.log());
    let took = stopped.elapsed();
    assert!(
        took < Duration::from_secs(10) && !server.log().contains("grace period"),
        "the stop took {took:?}, past half the grace period:\n{}",
        server.log()
    );
}

#[test]
fn one_tenants_flood_gets_429s_while_another_keeps_answering() {
    let dir = workdir();
    let (a, a_digest) = token("flood");
    let (b, b_digest) = token("quiet");
    let cfg = config(
        dir.path(),
        "workers = 2",
        &[
            format!("name = \"a\"\ntokens_sha256 = [\"{a_digest}\"]\nconcurrency = 1\nqueue = 3"),
            format!(
                "name = \"b\"\ntokens_sha256 = [\"{b_digest}\"]\nconcurrency = 1\ntimeout = \"5s\""
            ),
        ],
    );
    let server = std::sync::Arc::new(Server::start(&dir.path().join("data"), Some(&cfg)));
    let nb = notebook(FUNCTIONS);
    let va = server.deploy(&a, &nb.notebook, &["spin"]);
    let vb = server.deploy(&b, &nb.notebook, &["double"]);
    // A holds 4 times its concurrency in slow calls.
    let flood: Vec<_> = (0..4)
        .map(|_| {
            let (server, a, va) = (server.clone(), a.clone(), va.clone());
            std::thread::spawn(move || server.call(&a, &va, "spin", json!([2.5])).status)
        })
        .collect();
    // Each accepted call has its row: four rows, four places held (one running, three
    // queued) for the next 2.5 s at least.
    let started = Instant::now();
    while rows(&server).len() < 4 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the flood was not accepted: {:?}\n{}",
            rows(&server),
            server.get("/metrics", None).text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let metrics = server.get("/metrics", None).text();
    assert_eq!(gauge(&metrics, "host_calls_queued"), 3.0, "{metrics}");
    assert_eq!(gauge(&metrics, "host_calls_running"), 1.0, "{metrics}");
    let over = server.call(&a, &va, "spin", json!([0]));
    assert_eq!(over.expect(429)["error"]["kind"], json!("busy"));
    for i in 0..3 {
        let t = Instant::now();
        assert_eq!(
            server.call(&b, &vb, "double", json!([i])).expect(200)["result"],
            json!(i * 2)
        );
        // B's time limit plus one call's time.
        assert!(
            t.elapsed() < Duration::from_millis(7_500),
            "B's call {i} took {:?}",
            t.elapsed()
        );
    }
    let statuses: Vec<u16> = flood.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(statuses, vec![200; 4], "A's queued calls all ran");
    let metrics = server.get("/metrics", None).text();
    assert!(
        metrics.contains(r#"host_calls_total{tenant="b",function="double",outcome="returned"} 3"#),
        "{metrics}"
    );
    assert!(metrics.contains("host_call_seconds_bucket"), "{metrics}");
}

#[test]
fn over_its_quota_a_tenant_gets_429_with_retry_after() {
    let dir = workdir();
    let (t, digest) = token("quota");
    let cfg = config(
        dir.path(),
        "",
        &[format!(
            "name = \"q\"\ntokens_sha256 = [\"{digest}\"]\ncalls_per_minute = 2"
        )],
    );
    let server = Server::start(&dir.path().join("data"), Some(&cfg));
    let nb = notebook(FUNCTIONS);
    let version = server.deploy(&t, &nb.notebook, &["double"]);
    for i in 0..2 {
        server.call(&t, &version, "double", json!([i])).expect(200);
    }
    let refused = server.call(&t, &version, "double", json!([3]));
    assert_eq!(refused.expect(429)["error"]["kind"], json!("quota"));
    let retry: u64 = refused
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(rows(&server).len(), 2, "a refused call leaves no row");
}

#[test]
fn bad_deploys_bodies_and_configs_get_clear_errors() {
    let dir = workdir();
    let (t, digest) = token("bad");
    let cfg = config(
        dir.path(),
        "",
        &[format!(
            "name = \"t\"\ntokens_sha256 = [\"{digest}\"]\nmax_body = \"64K\""
        )],
    );
    let server = Server::start(&dir.path().join("data"), Some(&cfg));
    let tk = Some(t.as_str());

    // A notebook that does not parse, and one whose function needs a dropped global: the
    // message `host run` prints.
    let broken = server.post("/v1/bundles?name=nb.ipynb", tk, b"{\"cells\": [");
    assert!(
        broken.expect(400)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("nb.ipynb")
    );
    let fx = Fixture::code(&[
        "threshold = 0.5\nraise RuntimeError('no')",
        "def f(x):\n    return x > threshold",
    ]);
    let cli = fx.run("f", &["--args", "[1]"]);
    let cli_message = cli.stderr.trim().strip_prefix("host: ").unwrap().to_owned();
    let refused = server.post(
        "/v1/bundles?name=nb.ipynb&function=f",
        tk,
        &std::fs::read(&fx.notebook).unwrap(),
    );
    assert_eq!(refused.expect(400)["error"]["message"], json!(cli_message));
    let unknown = server.post("/v1/bundles?colour=red", tk, b"{}");
    assert!(
        unknown.expect(400)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`colour`")
    );

    // Over max_body: 413, nothing stored.
    let big = vec![b' '; 100 << 10];
    assert_eq!(
        server.post("/v1/bundles", tk, &big).expect(413)["error"]["kind"],
        json!("too_large")
    );

    // Alias moves: bad bodies, unknown versions, and two moves at once (both recorded).
    let nb = notebook(FUNCTIONS);
    let v = server.deploy(&t, &nb.notebook, &["double"]);
    assert_eq!(
        server
            .put("/v1/aliases/prod", tk, b"{\"versio\": 1}")
            .status,
        400
    );
    assert_eq!(
        server
            .put(
                "/v1/aliases/prod",
                tk,
                json!({"version": "f00"}).to_string().as_bytes()
            )
            .status,
        404
    );
    let server = std::sync::Arc::new(server);
    let movers: Vec<_> = (0..2)
        .map(|_| {
            let (server, t, v) = (server.clone(), t.clone(), v.clone());
            std::thread::spawn(move || {
                server
                    .put(
                        "/v1/aliases/prod",
                        Some(&t),
                        json!({"version": v}).to_string().as_bytes(),
                    )
                    .status
            })
        })
        .collect();
    for m in movers {
        assert_eq!(m.join().unwrap(), 200);
    }
    let history = server.get("/v1/aliases/prod/history", tk).expect(200);
    assert_eq!(history["moves"].as_array().unwrap().len(), 2, "{history}");
    assert_eq!(
        history["moves"][1]["from"],
        json!(v),
        "the second move saw the first"
    );

    // Unknown config keys and bad values stop the server at start, naming the key.
    let bad = dir.path().join("bad.toml");
    for (text, needle) in [
        ("lissten = \"127.0.0.1:1\"", "unknown field `lissten`"),
        (
            &*format!(
                "[[tenant]]\nname = \"x\"\ntokens_sha256 = [\"{digest}\"]\nmemory = \"lots\""
            ),
            "tenant `x`: memory:",
        ),
        (
            &*format!(
                "[[tenant]]\nname = \"x\"\ntokens_sha256 = [\"{digest}\"]\nmax_record = \"1G\""
            ),
            "tenant `x`: max_record: 1 GiB is more than a trace may hold (at most 768 MiB)",
        ),
    ] {
        std::fs::write(&bad, text).unwrap();
        let run = host(&[
            "serve",
            "--config",
            bad.to_str().unwrap(),
            "--data",
            dir.path().join("other").to_str().unwrap(),
        ]);
        run.fails(2, &[needle]);
    }
}

#[test]
fn health_readiness_and_token() {
    let dir = workdir();
    let server = Server::start(&dir.path().join("data"), None);
    assert_eq!(server.get("/healthz", None).status, 200);
    assert_eq!(server.get("/readyz", None).status, 200);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.path().join("data/default.token"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the token file is owner-only");
    assert!(
        server.log().contains(&server.default_token()),
        "printed once at first start"
    );
    let made = host(&["token"]);
    assert_eq!(made.code, 0);
    let token = made.stdout.trim();
    assert_eq!(token.len(), 64);
    let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(token.as_bytes()));
    assert!(
        made.stderr
            .contains(&format!("tokens_sha256 = [\"{digest}\"]")),
        "{}",
        made.stderr
    );
}

#[test]
fn a_client_sending_its_body_slowly_holds_no_worker_and_gets_408() {
    use std::io::{Read, Write};
    let dir = workdir();
    let (t, digest) = token("slow");
    let cfg = config(
        dir.path(),
        "workers = 1\nbody_timeout = \"5s\"",
        &[format!(
            "name = \"s\"\ntokens_sha256 = [\"{digest}\"]\nconcurrency = 1\nqueue = 0"
        )],
    );
    let server = Server::start(&dir.path().join("data"), Some(&cfg));
    let nb = notebook(FUNCTIONS);
    let version = server.deploy(&t, &nb.notebook, &["double"]);
    let addr = server.url.strip_prefix("http://").unwrap();
    let mut slow = std::net::TcpStream::connect(addr).unwrap();
    write!(
        slow,
        "POST /v1/call/{version}/double HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {t}\r\n\
         Content-Length: 40\r\n\r\n{{\"args\""
    )
    .unwrap();
    let sent = Instant::now();
    // The only worker, and the tenant's only place, are free while the slow body trickles
    // in: a place held by it would have made this a 429 (`queue = 0`), a worker a wait.
    assert_eq!(
        server.call(&t, &version, "double", json!([4])).expect(200)["result"],
        json!(8)
    );
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "answered only after the slow body timed out: {:?}",
        sent.elapsed()
    );
    let mut answer = String::new();
    slow.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");
    assert_eq!(
        rows(&server).len(),
        1,
        "a body that never arrived leaves no row"
    );
}

/// A slowloris: connections that never finish their headers, or sit idle after an answer,
/// are closed after `header_timeout`, and while they are open others are served.
#[test]
fn connections_that_stall_on_their_headers_or_sit_idle_are_closed_after_header_timeout() {
    use std::io::Read;
    let dir = workdir();
    let (t, digest) = token("patient");
    let cfg = config(
        dir.path(),
        "header_timeout = \"1s\"",
        &[format!("name = \"p\"\ntokens_sha256 = [\"{digest}\"]")],
    );
    let server = Server::start(&dir.path().join("data"), Some(&cfg));
    let open = |first: &str| raw(&server, first, Duration::from_secs(10));
    let opened = Instant::now();
    let mut stalled: Vec<_> = (0..50)
        .map(|i| match i % 3 {
            0 => open(""),
            1 => open("GET /healthz HTTP/1.1\r\nHost: x\r\n"),
            _ => open("POST /v1/call/v/f HTTP/1.1\r\nAuth"),
        })
        .collect();
    let mut idle = open("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    // Served meanwhile, on connections of their own.
    let nb = notebook(FUNCTIONS);
    let version = server.deploy(&t, &nb.notebook, &["double", "spin"]);
    assert_eq!(
        server.call(&t, &version, "double", json!([4])).expect(200)["result"],
        json!(8)
    );
    // The timeout is for headers only: a call longer than it is answered.
    assert_eq!(
        server.call(&t, &version, "spin", json!([2])).expect(200)["result"],
        json!(2)
    );
    assert_closed(&mut stalled, "stalled connection", "it opened", opened);
    let mut answer = Vec::new();
    let read = idle.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        read.is_ok() && answer.starts_with("HTTP/1.1 200"),
        "the idle connection was answered, then closed: {read:?} {answer}"
    );
    eprintln!("all closed {:?} after they opened", opened.elapsed());
    assert_eq!(server.get("/healthz", None).status, 200);
}

#[test]
fn traces_are_pruned_oldest_first_for_storage_and_retention_then_507() {
    let dir = workdir();
    let (full, full_digest) = token("full");
    let (old, old_digest) = token("old");
    let cfg = config(
        dir.path(),
        "",
        &[
            format!("name = \"full\"\ntokens_sha256 = [\"{full_digest}\"]\nstorage = \"8K\""),
            format!("name = \"old\"\ntokens_sha256 = [\"{old_digest}\"]\nretention = \"1s\""),
        ],
    );
    let server = Server::start(&dir.path().join("data"), Some(&cfg));
    let nb = notebook(FUNCTIONS);
    let version = server.deploy(&full, &nb.notebook, &["double"]);
    let mut runs = Vec::new();
    for i in 0..12 {
        let call = server.call(&full, &version, "double", json!([i]));
        runs.push(call.expect(200)["run"].as_str().unwrap().to_owned());
    }
    let pruned: Vec<bool> = runs
        .iter()
        .map(|id| {
            let row = server.sql(&format!("SELECT trace_pruned FROM runs WHERE id = '{id}'"));
            row[0][0].as_deref() == Some("1")
        })
        .collect();
    let row = server.sql(
        "SELECT (SELECT sum(size) FROM bundles WHERE tenant = 'full')
              + (SELECT coalesce(sum(trace_size), 0) FROM runs WHERE tenant = 'full' AND trace_pruned = 0),
                (SELECT max(trace_size) FROM runs)",
    );
    let number = |v: &Option<String>| v.as_deref().unwrap().parse::<u64>().unwrap();
    let (usage, traces) = (number(&row[0][0]), number(&row[0][1]));
    eprintln!("usage {usage} bytes, a trace {traces} bytes, pruned {pruned:?}");
    assert!(pruned[0], "the oldest trace goes first: {pruned:?}");
    assert!(!pruned[11], "the newest is kept: {pruned:?}");
    assert!(
        pruned.windows(2).all(|w| w[0] >= w[1]),
        "oldest first: {pruned:?}"
    );
    assert!(usage <= 8 << 10, "usage {usage}");
    let gone = server.get(&format!("/v1/runs/{}/trace", runs[0]), Some(&full));
    assert!(
        gone.expect(404)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("pruned")
    );
    assert_eq!(
        server
            .get(&format!("/v1/runs/{}", runs[0]), Some(&full))
            .expect(200)["trace_pruned"],
        json!(true)
    );
    assert_eq!(
        server
            .get(&format!("/v1/runs/{}/trace", runs[11]), Some(&full))
            .status,
        200
    );
    // A bundle bigger than what pruning can free is refused, not half-stored.
    let big = notebook(&format!(
        "def big():\n    '''{}'''\n    return 1\n",
        "x".repeat(60 << 10)
    ));
    let refused = server.post(
        "/v1/bundles?name=nb.ipynb",
        Some(&full),
        &std::fs::read(&big.notebook).unwrap(),
    );
    assert_eq!(refused.expect(507)["error"]["kind"], json!("storage"));
    assert_eq!(
        server
            .get(&format!("/v1/runs/{}/trace", runs[11]), Some(&full))
            .status,
        200,
        "a deploy that cannot fit even with every trace pruned prunes none"
    );

    // Retention: a trace older than it is pruned at the next call.
    let v = server.deploy(&old, &nb.notebook, &["double"]);
    let first = server.call(&old, &v, "double", json!([1])).expect(200)["run"]
        .as_str()
        .unwrap()
        .to_owned();
    std::thread::sleep(Duration::from_millis(1500));
    server.call(&old, &v, "double", json!([2])).expect(200);
    assert_eq!(
        server
            .get(&format!("/v1/runs/{first}"), Some(&old))
            .expect(200)["trace_pruned"],
        json!(true)
    );
    // What the checks read, the bytes counted as traces were stored and pruned, is what the
    // runs say is kept.
    assert_trace_bytes_counted(&server, &["full", "old"]);
}

/// Retention is a promise about how long production inputs are kept: a tenant that stops
/// calling has its expired traces pruned all the same, in the background, while another
/// tenant's traces (no retention) stay.
#[test]
fn a_tenant_that_stops_calling_still_has_its_traces_pruned_past_retention() {
    let dir = workdir();
    let (quiet, quiet_digest) = token("quiet");
    let (kept, kept_digest) = token("kept");
    let cfg = config(
        dir.path(),
        "",
        &[
            format!("name = \"quiet\"\ntokens_sha256 = [\"{quiet_digest}\"]\nretention = \"1s\""),
            format!("name = \"kept\"\ntokens_sha256 = [\"{kept_digest}\"]"),
        ],
    );
    let server = Server::start(&dir.path().join("data"), Some(&cfg));
    let nb = notebook(FUNCTIONS);
    let mut runs = Vec::new();
    for t in [&quiet, &kept] {
        let version = server.deploy(t, &nb.notebook, &["double"]);
        let call = server.call(t, &version, "double", json!([1]));
        runs.push(call.expect(200)["run"].as_str().unwrap().to_owned());
    }
    // No call, no deploy from now on: only the background can prune it.
    let started = std::time::Instant::now();
    let pruned = |id: &str| {
        server.sql(&format!("SELECT trace_pruned FROM runs WHERE id = '{id}'"))[0][0].as_deref()
            == Some("1")
    };
    while !pruned(&runs[0]) {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the quiet tenant's trace is still kept {:?} after its call, past a 1s retention",
            started.elapsed()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("pruned within {:?} of the call", started.elapsed());
    let gone = server.get(&format!("/v1/runs/{}/trace", runs[0]), Some(&quiet));
    assert!(
        gone.expect(404)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("pruned")
    );
    assert!(
        !pruned(&runs[1]),
        "a tenant without retention keeps its trace"
    );
    assert_eq!(
        server
            .get(&format!("/v1/runs/{}/trace", runs[1]), Some(&kept))
            .status,
        200
    );
    assert_trace_bytes_counted(&server, &["kept"]);
}

/// Each tenant's `trace_bytes` add up to the sizes of its traces not pruned, and those
/// traces are there.
fn assert_trace_bytes_counted(server: &Server, tenants: &[&str]) {
    for tenant in tenants {
        let row = server.sql(&format!(
            "SELECT (SELECT CAST(coalesce(sum(bytes), 0) AS BIGINT) FROM trace_bytes WHERE tenant = '{tenant}'),
                    (SELECT CAST(coalesce(sum(trace_size), 0) AS BIGINT) FROM runs
                     WHERE tenant = '{tenant}' AND trace_size IS NOT NULL AND trace_pruned = 0),
                    (SELECT CAST(coalesce(sum(length(t.data)), 0) AS BIGINT) FROM traces t
                     JOIN runs r ON r.id = t.run WHERE r.tenant = '{tenant}'),
                    (SELECT count(*) FROM runs WHERE tenant = '{tenant}' AND trace_pruned = 1)"
        ));
        let [counted, kept, stored, pruned] =
            [0, 1, 2, 3].map(|i| row[0][i].as_deref().unwrap().parse::<u64>().unwrap());
        assert!(
            kept > 0,
            "tenant {tenant} keeps no trace: the check checks nothing"
        );
        assert_eq!(
            counted, kept,
            "tenant {tenant}: counted vs the runs' trace sizes"
        );
        assert_eq!(
            stored, kept,
            "tenant {tenant}: the traces stored vs the runs' sizes"
        );
        eprintln!("tenant {tenant}: {counted} bytes counted, {pruned} traces pruned");
    }
}

#[test]
fn a_store_from_before_the_trace_counters_counts_its_traces_at_the_first_start() {
    let dir = workdir();
    let (t, digest) = token("counted");
    let cfg = config(
        dir.path(),
        "",
        &[format!(
            "name = \"ops\"\ntokens_sha256 = [\"{digest}\"]\nstorage = \"1G\""
        )],
    );
    let data = dir.path().join("data");
    let mut server = Server::start(&data, Some(&cfg));
    let nb = notebook(FUNCTIONS);
    let version = server.deploy(&t, &nb.notebook, &["double"]);
    for i in 0..5 {
        server.call(&t, &version, "double", json!([i])).expect(200);
    }
    assert_eq!(server.stop(), 0);
    // Back to version 3, as a host before the counters left it: the runs and traces as they
    // are, no counters.
    let downgrade = "DROP INDEX runs_live_traces; DROP TABLE trace_bytes;";
    match &server.db {
        Some(db) => {
            db.query(&format!(
                "{downgrade} UPDATE schema_version SET version = 3"
            ));
        }
        None => rusqlite::Connection::open(data.join("host.db"))
            .unwrap()
            .execute_batch(&format!("{downgrade} PRAGMA user_version = 3;"))
            .unwrap(),
    }
    let server = Server::start(&data, Some(&cfg));
    assert_trace_bytes_counted(&server, &["ops"]);
    server.call(&t, &version, "double", json!([9])).expect(200);
    assert_trace_bytes_counted(&server, &["ops"]);
    if server.db.is_some() {
        return; // PostgreSQL plans a table this small as a scan, index or not.
    }
    let plan = server.sql(
        "EXPLAIN QUERY PLAN SELECT id FROM runs
         WHERE tenant = 'ops' AND trace_size IS NOT NULL AND trace_pruned = 0
         AND finished_at < '2026' ORDER BY finished_at, id LIMIT 100",
    );
    assert!(
        plan.iter()
            .flatten()
            .flatten()
            .any(|d| d.contains("runs_live_traces")),
        "the retention check reads the index: {plan:?}"
    );
}

#[test]
fn a_store_that_cannot_write_answers_503_with_the_reason_and_recovers() {
    let dir = workdir();
    let server = Server::start(&dir.path().join("data"), None);
    let tok = server.default_token();
    let nb = notebook(FUNCTIONS);
    let version = server.deploy(&tok, &nb.notebook, &["double"]);
    // Another process holds the database's write lock longer than the server waits for it.
    let blocker = rusqlite::Connection::open(server.data.join("host.db")).unwrap();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let refused = server.call(&tok, &version, "double", json!([1]));
    let error = refused.expect(503);
    assert_eq!(error["error"]["kind"], json!("unavailable"));
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("locked"),
        "{error}"
    );
    assert_eq!(server.get("/readyz", None).status, 200, "reads still work");
    blocker.execute_batch("COMMIT").unwrap();
    assert_eq!(
        server
            .call(&tok, &version, "double", json!([2]))
            .expect(200)["result"],
        json!(4)
    );
    assert_eq!(
        rows(&server),
        vec![("double".to_owned(), Some("returned".to_owned()), Some(200))],
        "the refused call left no row and ran nothing"
    );
    let metrics = server.get("/metrics", None).text();
    assert!(metrics.contains("host_store_errors_total 1"), "{metrics}");
}

#[test]
fn a_client_that_hangs_up_mid_call_still_leaves_the_complete_row() {
    let dir = workdir();
    let server = Server::start(&dir.path().join("data"), None);
    let tok = server.default_token();
    let nb = notebook(FUNCTIONS);
    let version = server.deploy(&tok, &nb.notebook, &["spin"]);
    let path = format!("/v1/call/{version}/spin");
    let client = send_unread(&server, &path, &tok, r#"{"args": [1]}"#);
    let started = Instant::now();
    while rows(&server).is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the call never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(client);
    while rows(&server)[0].1.is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the row was never completed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        rows(&server),
        vec![("spin".to_owned(), Some("returned".to_owned()), Some(200))]
    );
}

/// PostgreSQL only (the `postgres` list below runs it): there the run row's insert is a real
/// wait, and a client that hangs up during it drops the request's handler. The insert is held
/// back by a lock this test takes on `runs`, the client hangs up while it waits, then the
/// lock is let go: the insert lands, and the call must still run and complete its row.
fn a_client_that_hangs_up_while_its_row_is_written_still_gets_the_row_completed() {
    let dir = workdir();
    let server = Server::start(&dir.path().join("data"), None);
    let db = server
        .db
        .clone()
        .expect("this test runs on PostgreSQL only");
    let tok = server.default_token();
    let nb = notebook(FUNCTIONS);
    let version = server.deploy(&tok, &nb.notebook, &["double"]);
    let mut lock = db.hold_writes("runs");
    let path = format!("/v1/call/{version}/double");
    let client = send_unread(&server, &path, &tok, r#"{"args": [21]}"#);
    db.wait_for_held_insert("runs");
    drop(client);
    // Time for the server to see the hang-up and drop the request's handler.
    std::thread::sleep(Duration::from_millis(500));
    lock.batch_execute("COMMIT").unwrap();
    let started = Instant::now();
    while rows(&server).first().is_none_or(|r| r.1.is_none()) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the row was never completed: {:?}\n{}",
            rows(&server),
            server.log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        rows(&server),
        vec![("double".to_owned(), Some("returned".to_owned()), Some(200))]
    );
}

#[test]
fn a_bundle_is_pre_initialised_under_its_tenants_limits_not_the_defaults() {
    let dir = workdir();
    let (t, digest) = token("roomy");
    let (tight, tight_digest) = token("tight");
    let cfg = config(
        dir.path(),
        "max_memory = \"2G\"",
        &[
            format!("name = \"roomy\"\ntokens_sha256 = [\"{digest}\"]\nmemory = \"1536M\""),
            format!("name = \"tight\"\ntokens_sha256 = [\"{tight_digest}\"]"),
        ],
    );
    let server = Server::start(&dir.path().join("data"), Some(&cfg));
    // The definitions need more than a call's default 1G, less than roomy's 1536M.
    let nb = notebook("BUFFER = bytearray(1100 << 20)\n\ndef size():\n    return len(BUFFER)\n");
    let body = std::fs::read(&nb.notebook).unwrap();
    let refused = server.post("/v1/bundles?name=nb.ipynb", Some(&tight), &body);
    let error = refused.expect(422);
    assert_eq!(error["error"]["kind"], json!("limit"), "{error}");
    assert_eq!(error["error"]["limit"], json!("memory"), "{error}");
    let version = server.deploy(&t, &nb.notebook, &["size"]);
    let shown = server.get(&format!("/v1/bundles/{version}"), Some(&t));
    assert!(shown.expect(200)["image"].is_string(), "{}", shown.text());
    assert_eq!(
        server.call(&t, &version, "size", json!([])).expect(200)["result"],
        json!(1100 << 20)
    );
    // Reloaded after a restart with its image gone from the cache, it is built again under
    // limits that fit the tenant's calls.
    std::fs::remove_dir_all(cache_dir().join("images")).unwrap();
    let server = server.restart();
    assert!(!server.log().contains("not loaded"), "{}", server.log());
    assert_eq!(
        server.call(&t, &version, "size", json!([])).expect(200)["result"],
        json!(1100 << 20)
    );
}

#[test]
fn storage_is_charged_the_stored_bundle_not_the_deploy_body() {
    let dir = workdir();
    let (t, digest) = token("lean");
    let cfg = config(
        dir.path(),
        "",
        &[format!(
            "name = \"lean\"\ntokens_sha256 = [\"{digest}\"]\nstorage = \"32K\""
        )],
    );
    let server = Server::start(&dir.path().join("data"), Some(&cfg));
    // 200 KiB of exploration that the bundle does not keep.
    let exploration = format!("preview = '{}'\n", "x".repeat(200 << 10));
    let nb = Fixture::code(&["def double(x):\n    return x * 2\n", &exploration]);
    assert!(std::fs::metadata(&nb.notebook).unwrap().len() > 32 << 10);
    let version = server.deploy(&t, &nb.notebook, &["double"]);
    let stored = std::fs::metadata(
        server
            .data
            .join("bundles")
            .join(format!("{version}.bundle.json")),
    )
    .unwrap()
    .len();
    let charged: u64 = server.sql(&format!(
        "SELECT size FROM bundles WHERE tenant = 'lean' AND version = '{version}'"
    ))[0][0]
        .as_deref()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(charged, stored, "the tenant is charged the stored file");
    assert_eq!(
        server.call(&t, &version, "double", json!([4])).expect(200)["result"],
        json!(8)
    );
}

#[test]
fn readyz_and_calls_answer_503_until_the_runtime_is_compiled() {
    let dir = workdir();
    // An empty cache: the server compiles the runtime before it is ready, which takes far
    // longer than the requests below.
    let server = Server::launch(
        &dir.path().join("data"),
        None,
        &dir.path().join("cache"),
        &[],
    );
    let tok = server.default_token();
    assert_eq!(server.get("/healthz", None).status, 200, "alive at once");
    let starting = server.get("/readyz", None).expect(503);
    assert_eq!(starting["error"]["kind"], json!("unavailable"));
    assert!(
        starting["error"]["message"]
            .as_str()
            .unwrap()
            .contains("compiled"),
        "{starting}"
    );
    let call = server.call(&tok, "prod", "f", json!([]));
    assert_eq!(call.expect(503)["error"]["kind"], json!("unavailable"));
    server.wait_ready();
    assert_eq!(server.get("/readyz", None).status, 200);
    assert!(rows(&server).is_empty(), "a refused call leaves no row");
}

#[test]
fn while_draining_new_calls_get_503_and_the_call_in_flight_finishes() {
    let dir = workdir();
    let gate = dir.path().join("gate");
    std::fs::create_dir(&gate).unwrap();
    let (t, digest) = token("drain");
    let cfg = config(
        dir.path(),
        "",
        &[format!(
            "name = \"d\"\ntokens_sha256 = [\"{digest}\"]\ngrants = [\"{}:/gate:ro\"]",
            gate.display()
        )],
    );
    let mut server = Server::start(&dir.path().join("data"), Some(&cfg));
    let nb = notebook(
        "import os, time\n\ndef hold():\n    while not os.path.exists('/gate/open'):\n        \
         time.sleep(0.02)\n    return 'released'\n\ndef double(x):\n    return x * 2\n",
    );
    let version = server.deploy(&t, &nb.notebook, &["hold", "double"]);
    let url = server.url.clone();
    let (t2, version2) = (t.clone(), version.clone());
    // Held in flight until the test opens the gate: no race with the shutdown.
    let held = std::thread::spawn(move || {
        let agent = ureq::Agent::new_with_defaults();
        let mut response = agent
            .post(&format!("{url}/v1/call/{version2}/hold"))
            .header("Authorization", format!("Bearer {t2}"))
            .send(r#"{"args": []}"#)
            .expect("the call in flight is answered");
        (
            response.status().as_u16(),
            response.body_mut().read_to_string().unwrap(),
        )
    });
    let started = Instant::now();
    while rows(&server).is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the call never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    server.signal(libc::SIGTERM);
    while !server.log().contains("shutting down") {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "SIGTERM was not seen:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let readyz = server.get("/readyz", None).expect(503);
    assert_eq!(readyz["error"]["kind"], json!("unavailable"));
    let refused = server.call(&t, &version, "double", json!([1]));
    let error = refused.expect(503);
    assert_eq!(error["error"]["kind"], json!("unavailable"));
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("shutting down"),
        "{error}"
    );
    std::fs::write(gate.join("open"), "").unwrap();
    let (status, body) = held.join().unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["result"],
        json!("released")
    );
    assert_eq!(server.exit_code(), 0, "{}", server.log());
    assert_eq!(
        rows(&server),
        vec![("hold".to_owned(), Some("returned".to_owned()), Some(200))],
        "the refused call left no row"
    );
}

/// `GET /v1/runs`' filters are checked as they are read: a misspelt outcome, a time that
/// is not one or a page marker that is not a run id is a 400 that says what is accepted, not
/// an empty page; `since` takes a time (RFC 3339, any offset) or a period back from now.
#[test]
fn run_filters_are_checked_and_since_takes_a_time_or_a_period() {
    let dir = workdir();
    let server = Server::start(&dir.path().join("data"), None);
    let t = server.default_token();
    let nb = notebook(FUNCTIONS);
    let version = server.deploy(&t, &nb.notebook, &["double", "boom"]);
    server.call(&t, &version, "double", json!([1])).expect(200);
    server.call(&t, &version, "boom", json!([1])).expect(422);
    let all = server.get("/v1/runs", Some(&t)).expect(200);
    let runs = all["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    let first = runs[1]["received_at"].as_str().unwrap().to_owned();
    let count = |query: &str| {
        server
            .get(&format!("/v1/runs?{query}"), Some(&t))
            .expect(200)["runs"]
            .as_array()
            .unwrap()
            .len()
    };
    // The first run's own second, as a client would write it, includes that run.
    let second = &first[..19];
    assert_eq!(count(&format!("since={second}Z")), 2, "since {second}Z");
    // The same instant at an offset (`+` escaped in a query string).
    let offset = {
        let (hour, rest) = (first[11..13].parse::<u32>().unwrap(), &first[13..19]);
        if hour < 22 {
            format!("{}T{:02}{rest}%2B02:00", &first[..10], hour + 2)
        } else {
            format!("{}T{:02}{rest}-02:00", &first[..10], hour - 2)
        }
    };
    assert_eq!(count(&format!("since={offset}")), 2, "since {offset}");
    // An unescaped `+` arrives as a space, and still means `+`.
    let unescaped = offset.replace("%2B", "+");
    assert_eq!(count(&format!("since={unescaped}")), 2, "since {unescaped}");
    assert_eq!(count("since=1h"), 2);
    assert_eq!(count("since=2999-01-01"), 0);
    assert_eq!(count("outcome=raised"), 1);
    assert_eq!(count("outcome=raised&since=30m"), 1);
    for (query, says) in [
        ("since=yesterday", "neither a time"),
        ("since=2026-02-30", "neither a time"),
        ("outcome=raise", "`raise` is not one of returned, raised"),
        ("side=left", "not one of primary, canary, shadow"),
        ("after=not-a-run", "not a run id"),
        ("limit=0", "not a number of runs"),
        ("limit=-3", "not a number of runs"),
        ("colour=red", "unknown field `colour`"),
    ] {
        let refused = server.get(&format!("/v1/runs?{query}"), Some(&t));
        let message = refused.expect(400)["error"]["message"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(message.contains(says), "{query}: {message}");
    }
}

/// An `Idempotency-Key` that could not be kept as given is refused before anything runs:
/// ignored, a retried call would run twice; kept, a megabyte of it would go into the row.
#[test]
fn an_idempotency_key_that_cannot_be_kept_is_refused_before_anything_runs() {
    let dir = workdir();
    let server = Server::start(&dir.path().join("data"), None);
    let t = server.default_token();
    let nb = notebook(FUNCTIONS);
    let version = server.deploy(&t, &nb.notebook, &["double"]);
    let path = format!("/v1/call/{version}/double");
    let long = "k".repeat(256);
    for key in [long.as_str(), "", "caf\u{e9}"] {
        let refused = server.request(
            "POST",
            &path,
            Some(&t),
            &[("Idempotency-Key", key)],
            Some(br#"{"args": [1]}"#),
        );
        let message = refused.expect(400)["error"]["message"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(message.contains("Idempotency-Key"), "{message}");
    }
    assert!(rows(&server).is_empty(), "no call ran: {:?}", rows(&server));
    let longest = "k".repeat(255);
    for _ in 0..2 {
        let kept = server.request(
            "POST",
            &path,
            Some(&t),
            &[("Idempotency-Key", &longest)],
            Some(br#"{"args": [21]}"#),
        );
        assert_eq!(kept.expect(200)["result"], json!(42));
    }
    assert_eq!(rows(&server).len(), 1, "the retry ran nothing");
}

/// The same tests on PostgreSQL: both backends behave alike wherever the store matters.
mod postgres {
    use crate::common::server::on_postgres;

    macro_rules! on_postgres {
        ($($name:ident),* $(,)?) => {
            $(
                #[test]
                fn $name() {
                    on_postgres(super::$name)
                }
            )*
        };
    }

    on_postgres!(
        a_client_that_hangs_up_while_its_row_is_written_still_gets_the_row_completed,
        deploy_alias_rollback_and_restart_serve_the_same_versions,
        a_tenant_sees_nothing_of_another_and_not_its_grants,
        every_outcome_leaves_one_row_and_a_pulled_trace_replays_to_the_production_result,
        kill_9_during_calls_then_restart_marks_them_interrupted_and_loses_nothing_else,
        sigterm_drains_calls_in_flight_and_exits_0,
        over_its_quota_a_tenant_gets_429_with_retry_after,
        traces_are_pruned_oldest_first_for_storage_and_retention_then_507,
        a_tenant_that_stops_calling_still_has_its_traces_pruned_past_retention,
        a_store_from_before_the_trace_counters_counts_its_traces_at_the_first_start,
        a_client_that_hangs_up_mid_call_still_leaves_the_complete_row,
        run_filters_are_checked_and_since_takes_a_time_or_a_period,
    );
}

#[test]
fn a_call_past_its_tenants_record_limit_is_a_limit_and_its_trace_replays_to_it() {
    let dir = workdir();
    let (t, digest) = token("record");
    let cfg = config(
        dir.path(),
        "",
        &[format!(
            "name = \"ops\"\ntokens_sha256 = [\"{digest}\"]\nmax_record = \"1M\""
        )],
    );
    let server = Server::start(&dir.path().join("data"), Some(&cfg));
    let nb = notebook(
        "import os\n\ndef noise(mb):\n    return sum(len(os.urandom(1 << 20)) for _ in range(mb))\n",
    );
    let version = server.deploy(&t, &nb.notebook, &[]);
    assert_eq!(
        server.call(&t, &version, "noise", json!([0])).expect(200)["result"],
        json!(0)
    );
    let limit = server.call(&t, &version, "noise", json!([4])).expect(422);
    assert_eq!(limit["error"]["kind"], json!("limit"), "{limit}");
    assert_eq!(limit["error"]["limit"], json!("record"), "{limit}");
    // Logged like any call, with its trace up to the limit: pulled, it replays to the limit.
    let run = limit["run"].as_str().unwrap();
    let trace = server.get(&format!("/v1/runs/{run}/trace"), Some(&t));
    assert_eq!(trace.status, 200);
    assert!(trace.body.len() < 2 << 20, "{} bytes", trace.body.len());
    let file = dir.path().join("limit.trace");
    std::fs::write(&file, &trace.body).unwrap();
    host(&["replay", file.to_str().unwrap()]).fails(3, &["record limit", "1 MiB"]);
}

#[test]
fn a_runaway_recursion_on_a_worker_is_a_stack_limit_and_the_worker_serves_on() {
    // The server's workers run calls on their own stacks, with no thread per call: the
    // deepest recursion the wasm stack allows still ends as a limit, not a crash, and the same
    // workers answer the next calls.
    let dir = workdir();
    let server = Server::start(&dir.path().join("data"), None);
    let t = server.default_token();
    let nb = notebook(
        "import sys\n\ndef recurse(limit):\n    sys.setrecursionlimit(limit)\n    def down(k):\n        return down(k + 1) + 1\n    return down(0)\n\ndef echo(x):\n    return x\n",
    );
    let version = server.deploy(&t, &nb.notebook, &[]);
    for _ in 0..3 {
        let limit = server
            .call(&t, &version, "recurse", json!([1_000_000]))
            .expect(422);
        assert_eq!(limit["error"]["limit"], json!("stack"), "{limit}");
        let raised = server
            .call(&t, &version, "recurse", json!([5000]))
            .expect(422);
        assert_eq!(raised["error"]["type"], json!("RecursionError"), "{raised}");
        assert_eq!(
            server.call(&t, &version, "echo", json!([7])).expect(200)["result"],
            json!(7)
        );
    }
}

#[test]
fn a_silent_replicas_running_evaluation_is_marked_failed_by_the_heartbeat() {
    // Another replica on this store started an evaluation, then went silent (killed, its
    // machine gone): the heartbeat of the one still running ends it, so it never reads as
    // running for good.
    let dir = workdir();
    let server = Server::start(&dir.path().join("data"), None);
    let tok = server.default_token();
    let db = rusqlite::Connection::open(dir.path().join("data/host.db")).unwrap();
    db.busy_timeout(Duration::from_secs(5)).unwrap();
    db.execute_batch(
        "INSERT INTO replicas (name, seen_at_ms) VALUES ('gone:1', 0);
         INSERT INTO evaluations (id, tenant, candidate, against, selection, status, total,
           created_at, replica)
         VALUES ('ev-gone', 'default', 'v1', 'prod', '{}', 'running', 10,
           '2026-01-01T00:00:00Z', 'gone:1');",
    )
    .unwrap();
    let started = Instant::now();
    let state = loop {
        let state = server
            .get("/v1/evaluations/ev-gone", Some(&tok))
            .expect(200);
        if state["status"] != "running" {
            break state;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "still running after 30 s: {state}\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(state["status"], json!("failed"), "{state}");
    assert!(
        state["error"]
            .as_str()
            .unwrap()
            .contains("the server stopped before the evaluation ended"),
        "{state}"
    );
}

#[test]
fn each_call_on_a_worker_starts_from_the_image_though_it_is_reset_after_the_answer() {
    // A worker answers first and resets the call's memory after: the next call, on the same
    // worker or the other, at once or later, still starts from exactly the image.
    let dir = workdir();
    let server = Server::start(&dir.path().join("data"), None);
    let t = server.default_token();
    let nb = notebook(
        "SEEN = []\n\ndef remember(x):\n    SEEN.append(x)\n    # Writes megabytes of the memory, grows it, and leaves it dirty.\n    kept = [bytearray(1 << 20) for _ in range(x)]\n    for b in kept:\n        b[::4096] = b'\\x01' * len(b[::4096])\n    SEEN.append(kept)\n    return len(SEEN)\n",
    );
    let version = server.deploy(&t, &nb.notebook, &[]);
    for x in [1, 40, 3, 40, 1] {
        assert_eq!(
            server
                .call(&t, &version, "remember", json!([x]))
                .expect(200)["result"],
            json!(2),
            "call with {x}"
        );
    }
    std::thread::scope(|scope| {
        let calls: Vec<_> = (0..4)
            .map(|i| {
                let (server, t, version) = (&server, &t, &version);
                scope.spawn(move || {
                    for _ in 0..3 {
                        let answer = server
                            .call(t, version, "remember", json!([10 * i + 1]))
                            .expect(200);
                        assert_eq!(answer["result"], json!(2), "{answer}");
                    }
                })
            })
            .collect();
        for call in calls {
            call.join().unwrap();
        }
    });
}
