//! Rolling out a new version through aliases: canary splits, shadows, and moves gated on an
//! evaluation, through a real `host serve` (issue 14).

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::common::Fixture;
use crate::common::server::{Server, on_postgres, send, workdir};

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
