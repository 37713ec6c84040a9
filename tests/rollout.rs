//! Rolling out a new version through aliases: canary splits, shadows, and moves gated on an
//! evaluation, through a real `host serve` (issue 14).

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::common::Fixture;
use crate::common::server::{Server, on_postgres, send, send_unread, two_tenants, workdir};

const V1: &str = r#"
def score(x):
    return x * 2
"#;

/// The candidate: the same for small inputs, different from 10 on, raising at 99.
const V2: &str = r#"
def score(x):
    if x == 99:
        raise ValueError("99 is not a score")
    return x * 2 if x < 10 else x * 2 + 1
"#;

fn put(server: &Server, token: &str, alias: &str, body: Value) -> crate::common::server::Answer {
    server.put(
        &format!("/v1/aliases/{alias}"),
        Some(token),
        body.to_string().as_bytes(),
    )
}

fn call_keyed(server: &Server, token: &str, x: i64, key: Option<&str>) -> Value {
    let mut headers = Vec::new();
    if let Some(k) = key {
        headers.push(("Idempotency-Key", k));
    }
    let answer = send(
        &server.url,
        "POST",
        "/v1/call/prod/score",
        Some(token),
        &headers,
        Some(json!({ "args": [x] }).to_string().as_bytes()),
    )
    .unwrap();
    answer.expect(200)
}

#[test]
fn a_canary_takes_near_its_percentage_sticky_per_key_and_per_input() {
    let dir = workdir();
    let server = Server::start(&dir.path().join("data"), None);
    let t = server.default_token();
    let (n1, n2) = (Fixture::code(&[V1]), Fixture::code(&[V2]));
    let v1 = server.deploy(&t, &n1.notebook, &["score"]);
    let v2 = server.deploy(&t, &n2.notebook, &["score"]);
    let moved = put(
        &server,
        &t,
        "prod",
        json!({"version": v1, "canary": {"version": v2, "percent": 10}}),
    );
    assert_eq!(moved.expect(200)["canary"]["percent"], json!(10.0));

    // 1,000 calls with their own keys, from 4 clients: about 10% on the canary.
    let url = server.url.clone();
    let workers: Vec<_> = (0..4)
        .map(|c| {
            let (url, t) = (url.clone(), t.clone());
            std::thread::spawn(move || {
                let mut bundles = Vec::new();
                for i in 0..250 {
                    let key = format!("k{c}-{i}");
                    let answer = send(
                        &url,
                        "POST",
                        "/v1/call/prod/score",
                        Some(&t),
                        &[("Idempotency-Key", key.as_str())],
                        Some(b"{\"args\": [1]}"),
                    )
                    .unwrap();
                    bundles.push(answer.expect(200)["bundle"].as_str().unwrap().to_owned());
                }
                bundles
            })
        })
        .collect();
    let bundles: Vec<String> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    let on_canary = bundles.iter().filter(|b| **b == v2).count();
    eprintln!("canary share over 1,000 calls: {on_canary}");
    // Binomial(1000, 0.1): sd 9.5; 60..140 is more than 4 sd either way.
    assert!(
        (60..=140).contains(&on_canary),
        "{on_canary} of 1,000 on a 10% canary"
    );
    // Each row says its side, and the sides agree with the versions.
    let sides = server
        .sql("SELECT side, bundle_version, count(*) FROM runs WHERE alias = 'prod' GROUP BY 1, 2");
    let sides: BTreeMap<String, (String, String)> = sides
        .into_iter()
        .map(|r| {
            (
                r[0].clone().unwrap(),
                (r[1].clone().unwrap(), r[2].clone().unwrap()),
            )
        })
        .collect();
    assert_eq!(sides["canary"], (v2.clone(), on_canary.to_string()));
    assert_eq!(
        sides["primary"],
        (v1.clone(), (1000 - on_canary).to_string())
    );

    // Sticky per input: calls without a key and the same input always land on one side.
    put(
        &server,
        &t,
        "prod",
        json!({"version": v1, "canary": {"version": v2, "percent": 50, "sticky": "input"}}),
    )
    .expect(200);
    for x in [3, 4, 5, 6] {
        let seen: Vec<Value> = (0..8)
            .map(|_| call_keyed(&server, &t, x, None)["bundle"].clone())
            .collect();
        assert!(
            seen.iter().all(|b| *b == seen[0]),
            "input {x} moved sides: {seen:?}"
        );
    }
    // A bad split is refused, naming the field.
    let bad = put(
        &server,
        &t,
        "prod",
        json!({"version": v1, "canary": {"version": v2, "percent": 150}}),
    );
    assert!(
        bad.expect(400)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("percent")
    );
}

fn shadow_results_are_logged_and_never_returned() {
    let dir = workdir();
    let server = Server::start(&dir.path().join("data"), None);
    let t = server.default_token();
    let (n1, n2) = (Fixture::code(&[V1]), Fixture::code(&[V2]));
    let v1 = server.deploy(&t, &n1.notebook, &["score"]);
    let v2 = server.deploy(&t, &n2.notebook, &["score"]);
    put(
        &server,
        &t,
        "prod",
        json!({"version": v1, "shadow": {"version": v2}}),
    )
    .expect(200);
    let inputs = [1, 2, 11, 12, 99];
    for x in inputs {
        let answer = call_keyed(&server, &t, x, None);
        assert_eq!(
            answer["result"],
            json!(x * 2),
            "the primary's result, always"
        );
        assert_eq!(answer["bundle"], json!(v1));
    }
    // The shadows run after the answers: wait for their rows.
    let started = std::time::Instant::now();
    loop {
        let done =
            server.sql("SELECT count(*) FROM runs WHERE side = 'shadow' AND outcome IS NOT NULL");
        if done[0][0].as_deref() == Some("5") {
            break;
        }
        assert!(started.elapsed().as_secs() < 60, "shadow runs: {done:?}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let unlinked = server.sql(
        "SELECT count(*) FROM runs s WHERE s.side = 'shadow' AND NOT EXISTS
         (SELECT 1 FROM runs p WHERE p.id = s.shadow_of AND p.side = 'primary')",
    );
    assert_eq!(
        unlinked[0][0].as_deref(),
        Some("0"),
        "each shadow names its primary"
    );
    let compare = server.get("/v1/aliases/prod/compare", Some(&t)).expect(200);
    assert_eq!(
        compare["shadow"]["summary"],
        json!({"same": 2, "changed": 2, "newly_failing": 1, "fixed": 0}),
        "{compare:#}"
    );
    let changed: Vec<&Value> = compare["shadow"]["runs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["class"] == "changed")
        .collect();
    let diffs: Vec<&str> = changed
        .iter()
        .flat_map(|r| r["differences"].as_array().unwrap())
        .map(|d| d.as_str().unwrap())
        .collect();
    assert!(diffs.contains(&"the whole outcome: 22 -> 23"), "{diffs:?}");
    assert!(diffs.contains(&"the whole outcome: 24 -> 25"), "{diffs:?}");
}

#[test]
fn shadow_results_are_logged_and_never_returned_on_sqlite() {
    shadow_results_are_logged_and_never_returned();
}

#[test]
fn shadow_results_are_logged_and_never_returned_on_postgres() {
    on_postgres(shadow_results_are_logged_and_never_returned);
}

#[test]
fn a_gated_move_is_refused_without_a_passing_evaluation_then_accepted() {
    let dir = workdir();
    let server = Server::start(&dir.path().join("data"), None);
    let t = server.default_token();
    let (n1, n2) = (Fixture::code(&[V1]), Fixture::code(&[V2]));
    let v1 = server.deploy(&t, &n1.notebook, &["score"]);
    let v2 = server.deploy(&t, &n2.notebook, &["score"]);
    put(&server, &t, "prod", json!({"version": v1})).expect(200);
    let gate = json!({"version": v2, "require_evaluation": {"max_changed": 0, "max_failing": 0}});
    let refused = put(&server, &t, "prod", gate.clone()).expect(409);
    assert_eq!(refused["error"]["kind"], json!("evaluation_required"));
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no evaluation of"),
        "{refused}"
    );
    // An evaluation that found changes does not pass a gate of 0 changed; its summary is
    // in the refusal.
    let db = rusqlite::Connection::open(server.data.join("host.db")).unwrap();
    let insert = |id: &str, changed: i64| {
        db.execute(
            "INSERT INTO evaluations (id, tenant, candidate, against, baseline, selection,
             status, total, done, same, changed, created_at, finished_at)
             VALUES (?1, 'default', ?2, 'prod', ?3, '{}', 'done', 10, 10, ?4, ?5,
             '2026-01-01T00:00:00.000Z', '2026-01-01T00:00:01.000Z')",
            rusqlite::params![id, v2, v1, 10 - changed, changed],
        )
        .unwrap();
    };
    insert("0190a000-0000-7000-8000-000000000001", 3);
    let refused = put(&server, &t, "prod", gate.clone()).expect(409);
    assert_eq!(
        refused["error"]["evaluation"]["changed"],
        json!(3),
        "{refused}"
    );
    assert_eq!(
        server.get("/v1/aliases", Some(&t)).expect(200)["aliases"][0]["version"],
        json!(v1)
    );
    // A passing one lets the move through, and the move records it.
    insert("0190a000-0000-7000-8000-000000000002", 0);
    let moved = put(&server, &t, "prod", gate).expect(200);
    assert_eq!(
        moved["evaluation"],
        json!("0190a000-0000-7000-8000-000000000002")
    );
    let history = server.get("/v1/aliases/prod/history", Some(&t)).expect(200);
    assert_eq!(
        history["moves"][1]["evaluation"],
        json!("0190a000-0000-7000-8000-000000000002")
    );
    assert_eq!(call_keyed(&server, &t, 11, None)["result"], json!(23));
}

/// A refactor of [`V1`]: the same results for every input.
const V1_REFACTORED: &str = r#"
def double(x):
    return x + x

def score(x):
    return double(x)
"#;

/// `POST /v1/evaluations` with `body`, answered 202 with its `Location`; then the evaluation
/// once it is no longer running, with its runs.
fn evaluate_on(server: &Server, token: &str, body: Value) -> Value {
    let created = server.post("/v1/evaluations", Some(token), body.to_string().as_bytes());
    let location = created.header("location").map(str::to_owned);
    let created = created.expect(202);
    let id = created["id"].as_str().unwrap();
    assert_eq!(location.as_deref(), Some(&*format!("/v1/evaluations/{id}")));
    assert_eq!(created["status"], json!("running"), "{created}");
    let started = std::time::Instant::now();
    loop {
        let state = server
            .get(&format!("/v1/evaluations/{id}?runs=false"), Some(token))
            .expect(200);
        assert!(state.get("runs").is_none(), "{state}");
        if state["status"] != "running" {
            break;
        }
        assert!(
            started.elapsed().as_secs() < 120,
            "still running: {state}\n{}",
            server.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    server
        .get(&format!("/v1/evaluations/{id}"), Some(token))
        .expect(200)
}

/// Each entry's run and class.
fn classes(evaluation: &Value) -> BTreeMap<String, String> {
    evaluation["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["run"].as_str().unwrap().to_owned(),
                e["class"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn server_side_evaluations_class_the_baseline_runs_and_gate_the_move() {
    let dir = workdir();
    let server = Server::start(&dir.path().join("data"), None);
    let t = server.default_token();
    let notebooks = [V1, V2, V1_REFACTORED].map(|v| Fixture::code(&[v]));
    let [v1, v2, v3] = [0, 1, 2].map(|i| server.deploy(&t, &notebooks[i].notebook, &["score"]));
    put(&server, &t, "prod", json!({"version": v1})).expect(200);
    let mut runs = BTreeMap::new();
    for x in [1, 2, 11, 12, 99, 5] {
        runs.insert(x, call_keyed(&server, &t, x, None)["run"].clone());
    }
    // Not calls of `prod`'s version through `prod`: one by version, and a shadow's repeat
    // (its primary run is one).
    server.call(&t, &v1, "score", json!([13])).expect(200);
    put(
        &server,
        &t,
        "prod",
        json!({"version": v1, "shadow": {"version": v2}}),
    )
    .expect(200);
    runs.insert(3, call_keyed(&server, &t, 3, None)["run"].clone());
    let started = std::time::Instant::now();
    while server
        .sql("SELECT id FROM runs WHERE side = 'shadow' AND outcome IS NOT NULL")
        .is_empty()
    {
        assert!(started.elapsed().as_secs() < 60, "no shadow run");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // A run whose trace is gone is not replayable.
    let pruned = runs[&5].as_str().unwrap();
    server.execute(&format!(
        "DELETE FROM traces WHERE run = '{pruned}';
         UPDATE runs SET trace_pruned = 1 WHERE id = '{pruned}'"
    ));

    let gate =
        |v: &str| json!({"version": v, "require_evaluation": {"max_changed": 0, "max_failing": 0}});
    let refused = put(&server, &t, "prod", gate(&v2)).expect(409);
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no evaluation of"),
        "{refused}"
    );

    let evaluation = evaluate_on(&server, &t, json!({"candidate": v2, "against": "prod"}));
    assert_eq!(evaluation["status"], json!("done"), "{evaluation:#}");
    assert_eq!(evaluation["baseline"], json!(v1));
    assert_eq!(evaluation["notebook"], json!("nb.ipynb"));
    let counts: Vec<&Value> = [
        "total",
        "done",
        "same",
        "changed",
        "newly_failing",
        "fixed",
        "not_replayable",
    ]
    .iter()
    .map(|k| &evaluation[k])
    .collect();
    assert_eq!(counts, [7, 7, 3, 2, 1, 0, 1], "{evaluation:#}");
    let class = |x: i64| runs[&x].as_str().unwrap().to_owned();
    let expected: BTreeMap<String, String> = [
        (1, "same"),
        (2, "same"),
        (3, "same"),
        (11, "changed"),
        (12, "changed"),
        (99, "newly_failing"),
        (5, "not_replayable"),
    ]
    .into_iter()
    .map(|(x, c)| (class(x), c.to_owned()))
    .collect();
    assert_eq!(classes(&evaluation), expected, "exactly the alias's runs");
    let entry = |x: i64| -> Value {
        evaluation["runs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["run"] == runs[&x])
            .unwrap()
            .clone()
    };
    assert_eq!(
        entry(11)["differences"],
        json!([{"path": "result", "recorded": 22, "candidate": 23}])
    );
    assert!(
        entry(99)["failure"]
            .as_str()
            .unwrap()
            .contains("ValueError: 99 is not a score"),
        "{}",
        entry(99)
    );
    assert!(
        entry(5)["reason"].as_str().unwrap().contains("pruned"),
        "{}",
        entry(5)
    );
    let id = evaluation["id"].as_str().unwrap();
    let changed = server
        .get(&format!("/v1/evaluations/{id}?class=changed"), Some(&t))
        .expect(200);
    let changed: Vec<String> = classes(&changed).into_keys().collect();
    assert_eq!(changed, [class(11), class(12)]);
    let stored = server.sql(&format!(
        "SELECT count(*) FROM evaluation_runs WHERE evaluation = '{id}'"
    ));
    assert_eq!(stored[0][0].as_deref(), Some("7"));

    // The gate shows the failing evaluation, and lets through a refactor's, which changes
    // nothing (the pruned run is not counted against it).
    let refused = put(&server, &t, "prod", gate(&v2)).expect(409);
    assert_eq!(refused["error"]["evaluation"]["id"], json!(id));
    assert_eq!(refused["error"]["evaluation"]["changed"], json!(2));
    let refactor = evaluate_on(
        &server,
        &t,
        json!({"candidate": v3, "against": "prod", "function": "score"}),
    );
    let counts: Vec<&Value> = ["same", "changed", "newly_failing", "not_replayable"]
        .iter()
        .map(|k| &refactor[k])
        .collect();
    assert_eq!(counts, [6, 0, 0, 1], "{refactor:#}");
    let moved = put(&server, &t, "prod", gate(&v3)).expect(200);
    assert_eq!(moved["evaluation"], refactor["id"]);
    assert_eq!(call_keyed(&server, &t, 11, None)["bundle"], json!(v3));
    // Newest first.
    let list = server.get("/v1/evaluations", Some(&t)).expect(200);
    let ids: Vec<&Value> = list["evaluations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["id"])
        .collect();
    assert_eq!(ids, [&refactor["id"], &evaluation["id"]]);
}

#[test]
fn server_side_evaluations_class_the_baseline_runs_and_gate_the_move_on_sqlite() {
    server_side_evaluations_class_the_baseline_runs_and_gate_the_move();
}

#[test]
fn server_side_evaluations_class_the_baseline_runs_and_gate_the_move_on_postgres() {
    on_postgres(server_side_evaluations_class_the_baseline_runs_and_gate_the_move);
}

/// PostgreSQL only, where writing an evaluation's row is a real wait: a client that hangs up
/// during it (held back by a lock this test takes) drops the request's handler; the
/// evaluation must still run to its end rather than stay `running` with nothing queued.
#[test]
fn an_evaluation_whose_client_hangs_up_while_its_row_is_written_still_runs_on_postgres() {
    on_postgres(|| {
        let dir = workdir();
        let server = Server::start(&dir.path().join("data"), None);
        let db = server.db.clone().expect("on PostgreSQL");
        let t = server.default_token();
        let n1 = Fixture::code(&[V1]);
        let v1 = server.deploy(&t, &n1.notebook, &["score"]);
        put(&server, &t, "prod", json!({"version": v1})).expect(200);
        for x in 0..3 {
            call_keyed(&server, &t, x, None);
        }
        let mut lock = db.hold_writes("evaluations");
        let body = json!({"candidate": v1, "against": "prod", "last": 3}).to_string();
        let client = send_unread(&server, "/v1/evaluations", &t, &body);
        db.wait_for_held_insert("evaluations");
        drop(client);
        // Time for the server to see the hang-up and drop the request's handler.
        std::thread::sleep(std::time::Duration::from_millis(500));
        lock.batch_execute("COMMIT").unwrap();
        let started = std::time::Instant::now();
        let state = loop {
            let rows = server.sql("SELECT status, done, same FROM evaluations");
            if rows
                .first()
                .is_some_and(|r| r[0].as_deref() != Some("running"))
            {
                break rows;
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(30),
                "the evaluation never finished: {rows:?}\n{}",
                server.log.lock().unwrap()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let done = |v: &str| Some(v.to_owned());
        assert_eq!(state, vec![vec![done("done"), done("3"), done("3")]]);
    });
}

#[test]
fn evaluations_are_the_tenants_own_and_bad_requests_say_why() {
    let dir = workdir();
    let (a, a_digest) = crate::common::server::token("eval-a");
    let (b, b_digest) = crate::common::server::token("eval-b");
    let config = two_tenants(dir.path(), &a_digest, &b_digest);
    let server = Server::start(&dir.path().join("data"), Some(&config));
    let (n1, n2) = (Fixture::code(&[V1]), Fixture::code(&[V2]));
    let v1 = server.deploy(&a, &n1.notebook, &["score"]);
    let v2 = server.deploy(&a, &n2.notebook, &["score"]);
    put(&server, &a, "prod", json!({"version": v1})).expect(200);
    let run = call_keyed(&server, &a, 11, None)["run"].clone();
    let by_version = server.call(&a, &v1, "score", json!([12])).expect(200)["run"].clone();
    let evaluation = evaluate_on(&server, &a, json!({"candidate": v2, "against": "prod"}));
    assert_eq!(evaluation["changed"], json!(1), "{evaluation:#}");
    let id = evaluation["id"].as_str().unwrap();

    // Tenant b sees none of it, even with the same versions deployed.
    server.deploy(&b, &n1.notebook, &["score"]);
    server.deploy(&b, &n2.notebook, &["score"]);
    let missing = server
        .get(&format!("/v1/evaluations/{id}"), Some(&b))
        .expect(404);
    assert_eq!(missing["error"]["kind"], json!("not_found"));
    let list = server.get("/v1/evaluations", Some(&b)).expect(200);
    assert_eq!(list["evaluations"], json!([]));
    let none = server
        .post(
            "/v1/evaluations",
            Some(&b),
            json!({"candidate": v2, "against": v1})
                .to_string()
                .as_bytes(),
        )
        .expect(404);
    assert!(
        none["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no run of version"),
        "{none}"
    );
    let theirs = server
        .post(
            "/v1/evaluations",
            Some(&b),
            json!({"candidate": v2, "against": v1, "runs": [run]})
                .to_string()
                .as_bytes(),
        )
        .expect(404);
    assert!(
        theirs["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no run")
    );

    // Requests that cannot be evaluated, each with its reason.
    let cases = [
        (
            json!({"candidate": v2, "against": "prod", "colour": 1}),
            400,
            "unknown field `colour`",
        ),
        (json!({"candidate": v2}), 400, "missing field `against`"),
        (
            json!({"candidate": v2, "against": "prod", "last": 5, "since": "1h"}),
            400,
            "at most one of",
        ),
        (
            json!({"candidate": v2, "against": "prod", "since": "yesterday"}),
            400,
            "since:",
        ),
        (
            json!({"candidate": v2, "against": "prod", "tolerance": 2}),
            400,
            "a relative tolerance",
        ),
        (
            json!({"candidate": v2, "against": "prod", "last": 0}),
            400,
            "last: must be at least 1",
        ),
        (
            json!({"candidate": "0".repeat(64), "against": "prod"}),
            404,
            "no bundle",
        ),
        (
            json!({"candidate": v2, "against": "staging"}),
            404,
            "no alias or version `staging`",
        ),
        (
            json!({"candidate": v2, "against": "prod", "function": "rank"}),
            404,
            "not `rank`",
        ),
        (
            json!({"candidate": v2, "against": "prod", "runs": [by_version]}),
            400,
            "is not a call of `prod`",
        ),
    ];
    for (body, status, needle) in cases {
        let answer = server.post("/v1/evaluations", Some(&a), body.to_string().as_bytes());
        let error = answer.expect(status);
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{body}: {message}");
    }
    let bad = server
        .get(&format!("/v1/evaluations/{id}?class=odd"), Some(&a))
        .expect(400);
    assert!(bad["error"]["message"].as_str().unwrap().contains("`odd`"));
}

/// A candidate whose every run takes seconds.
const SLOW: &str = r#"
def score(x):
    total = 0
    for i in range(20_000_000):
        total += i
    return x * 2
"#;

#[test]
fn an_evaluation_cut_short_by_a_kill_is_marked_failed_at_the_next_start() {
    let dir = workdir();
    let server = Server::start(&dir.path().join("data"), None);
    let t = server.default_token();
    let (n1, slow) = (Fixture::code(&[V1]), Fixture::code(&[SLOW]));
    let v1 = server.deploy(&t, &n1.notebook, &["score"]);
    let candidate = server.deploy(&t, &slow.notebook, &["score"]);
    put(&server, &t, "prod", json!({"version": v1})).expect(200);
    for x in 1..=4 {
        call_keyed(&server, &t, x, None);
    }
    let created = server
        .post(
            "/v1/evaluations",
            Some(&t),
            json!({"candidate": candidate, "against": "prod"})
                .to_string()
                .as_bytes(),
        )
        .expect(202);
    let id = created["id"].as_str().unwrap().to_owned();
    let mut server = server;
    server.kill();
    let server = server.restart();
    assert!(
        server
            .log()
            .contains("1 evaluation(s) were cut short by the last stop: marked failed"),
        "{}",
        server.log()
    );
    let failed = server
        .get(&format!("/v1/evaluations/{id}"), Some(&t))
        .expect(200);
    assert_eq!(failed["status"], json!("failed"), "{failed:#}");
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("the server stopped before the evaluation ended"),
        "{failed:#}"
    );
    assert!(failed["done"].as_u64().unwrap() < 4, "{failed:#}");
}
