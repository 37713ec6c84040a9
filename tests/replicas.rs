//! Several `host serve` replicas on one real PostgreSQL, on loopback ports: one service,
//! under faults (a replica killed, the database stopped and started).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tempfile::TempDir;

use crate::common::Fixture;
use crate::common::pg::{TestDb, Throwaway, base_url};
use crate::common::server::{Answer, Server, send, token};

/// The schema version this host's migrations end at.
const MIGRATIONS: usize = 4;

const FUNCTIONS: &str = r#"
import time

def double(x):
    return x * 2

def spin(seconds, tag):
    start = time.time()
    while time.time() - start < seconds:
        pass
    return tag
"#;

/// A config shared by every replica: tenants `team` (no quota) and `metered` (5 a minute).
fn config(dir: &TempDir, team: &str, metered: &str) -> PathBuf {
    let path = dir.path().join("host.toml");
    std::fs::write(
        &path,
        format!(
            "[[tenant]]\nname = \"team\"\ntokens_sha256 = [\"{team}\"]\nconcurrency = 4\nqueue = 64\n\
             [[tenant]]\nname = \"metered\"\ntokens_sha256 = [\"{metered}\"]\ncalls_per_minute = 5\n"
        ),
    )
    .unwrap();
    path
}

/// `n` replicas on `url`, started at the same moment, each with its own data folder.
fn replicas(dir: &TempDir, config: &Path, url: &str, n: usize) -> Vec<Server> {
    let starts: Vec<_> = (0..n)
        .map(|i| {
            let data = dir.path().join(format!("r{i}"));
            let (config, url) = (config.to_owned(), url.to_owned());
            std::thread::spawn(move || {
                let extra = ["--store", &url, "--replica", &format!("r{i}")].map(String::from);
                Server::start_with(&data, Some(&config), &extra)
            })
        })
        .collect();
    starts.into_iter().map(|s| s.join().unwrap()).collect()
}

fn call_with_key(
    url: &str,
    tok: &str,
    target: &str,
    function: &str,
    args: Value,
    key: &str,
) -> Result<Answer, String> {
    send(
        url,
        "POST",
        &format!("/v1/call/{target}/{function}"),
        Some(tok),
        &[("Idempotency-Key", key)],
        Some(json!({ "args": args }).to_string().as_bytes()),
    )
}

#[test]
fn replicas_on_one_postgres_behave_as_one_service() {
    let db = TestDb::create(&base_url());
    let dir = tempfile::tempdir().unwrap();
    let (team, team_digest) = token("team");
    let (metered, metered_digest) = token("metered");
    let config = config(&dir, &team_digest, &metered_digest);
    // Three replicas at once on an empty database: one of them creates the schema.
    let r = replicas(&dir, &config, &db.url, 3);
    assert_eq!(
        db.query("SELECT version FROM schema_version"),
        vec![vec![Some(MIGRATIONS.to_string())]],
        "one schema, migrated once"
    );

    // Deployed through one, callable through all.
    let nb = Fixture::code(&[FUNCTIONS]);
    let v1 = r[0].deploy(&team, &nb.notebook, &["double", "spin"]);
    for s in &r {
        assert_eq!(
            s.call(&team, &v1, "double", json!([21])).expect(200)["result"],
            json!(42)
        );
    }
    // An alias moved through one is in effect on all, at once.
    r[1].put(
        "/v1/aliases/prod",
        Some(&team),
        json!({"version": v1}).to_string().as_bytes(),
    )
    .expect(200);
    let nb2 = Fixture::code(&[&FUNCTIONS.replace("x * 2", "x * 3")]);
    let v2 = r[2].deploy(&team, &nb2.notebook, &["double"]);
    let moved = r[0].put(
        "/v1/aliases/prod",
        Some(&team),
        json!({"version": v2}).to_string().as_bytes(),
    );
    assert_eq!(moved.expect(200)["previous"], json!(v1));
    let moved_at = Instant::now();
    for s in &r {
        let answer = s.call(&team, "prod", "double", json!([1])).expect(200);
        assert_eq!(
            (answer["bundle"].clone(), answer["result"].clone()),
            (json!(v2), json!(3))
        );
    }
    assert!(
        moved_at.elapsed() < Duration::from_secs(1) * 3,
        "each replica answered at once"
    );
    let history = r[2]
        .get("/v1/aliases/prod/history", Some(&team))
        .expect(200);
    assert_eq!(history["moves"].as_array().unwrap().len(), 2);

    // Runs of every replica are in one table, each naming its replica.
    let runs = r[1].get("/v1/runs?limit=1000", Some(&team)).expect(200);
    let served: BTreeSet<&str> = runs["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|run| run["replica"].as_str().unwrap())
        .collect();
    assert_eq!(served, BTreeSet::from(["r0", "r1", "r2"]));

    // A quota holds across replicas: 5 a minute, wherever they land.
    let vm = r[0].deploy(&metered, &nb.notebook, &["double"]);
    for i in 0..5 {
        r[i % 3]
            .call(&metered, &vm, "double", json!([i]))
            .expect(200);
    }
    for s in &r {
        let over = s.call(&metered, &vm, "double", json!([0]));
        assert_eq!(over.expect(429)["error"]["kind"], json!("quota"));
        let wait: u64 = over.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=60).contains(&wait), "Retry-After {wait}");
    }

    // A retried call gets the stored answer from any replica; another body under the key
    // is refused.
    let first = call_with_key(&r[0].url, &team, &v1, "double", json!([5]), "order-1").unwrap();
    let run = first.expect(200)["run"].clone();
    let again = call_with_key(&r[1].url, &team, &v1, "double", json!([5]), "order-1").unwrap();
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.expect(200)["run"], run);
    assert_eq!(again.json()["result"], json!(10));
    let other = call_with_key(&r[2].url, &team, &v1, "double", json!([6]), "order-1").unwrap();
    assert_eq!(other.expect(409)["error"]["kind"], json!("idempotency"));
    assert_eq!(
        db.query("SELECT count(*) FROM runs WHERE idempotency_key = 'order-1'"),
        vec![vec![Some("1".to_owned())]],
        "the retry ran nothing"
    );

    // A replica refuses a schema newer than it knows, and says so.
    db.query("UPDATE schema_version SET version = 99");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_host"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--store",
            &db.url,
            "--data",
        ])
        .arg(dir.path().join("newer"))
        .env("HOST_CACHE_DIR", crate::common::cache_dir())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!(
            "newer than this host's ({MIGRATIONS}): use a newer host"
        )),
        "{stderr}"
    );
    db.query(&format!("UPDATE schema_version SET version = {MIGRATIONS}"));
}

#[test]
fn kill_9_of_a_replica_under_load_loses_no_committed_run_and_retries_answer_once() {
    let db = TestDb::create(&base_url());
    let dir = tempfile::tempdir().unwrap();
    let (team, team_digest) = token("team");
    let (_, metered_digest) = token("metered");
    let config = config(&dir, &team_digest, &metered_digest);
    let mut r = replicas(&dir, &config, &db.url, 3);
    let nb = Fixture::code(&[FUNCTIONS]);
    let version = r[0].deploy(&team, &nb.notebook, &["spin"]);
    let urls: Vec<String> = r.iter().map(|s| s.url.clone()).collect();

    // Four clients, each call with its own key, sent round the replicas; a client that loses
    // its replica retries the same key on the next one.
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (urls, team, version) = (urls.clone(), team.clone(), version.clone());
            std::thread::spawn(move || {
                let mut answers = Vec::new();
                for i in 0..8 {
                    let key = format!("client{c}-call{i}");
                    let tag = key.clone();
                    let mut tries = Vec::new();
                    let answer = (0..6).find_map(|t| {
                        let url = &urls[(c + i + t) % urls.len()];
                        match call_with_key(url, &team, &version, "spin", json!([0.15, tag]), &key)
                        {
                            Ok(a) if a.status == 200 => Some(a),
                            Ok(a) => {
                                tries.push(format!("{url}: {} {}", a.status, a.text()));
                                None
                            }
                            Err(e) => {
                                tries.push(format!("{url}: {e}"));
                                None
                            }
                        }
                    });
                    let answer =
                        answer.unwrap_or_else(|| panic!("{key} never answered: {tries:?}"));
                    assert_eq!(answer.json()["result"], json!(key));
                    answers.push((key, answer.json()["run"].as_str().unwrap().to_owned()));
                }
                answers
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    r[0].kill();
    let answers: Vec<(String, String)> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    assert_eq!(answers.len(), 32);

    // Every answer is a committed `returned` run of its key, and no key returned twice.
    let rows: HashMap<String, (Option<String>, Option<String>)> = db
        .query("SELECT id, idempotency_key, outcome FROM runs")
        .into_iter()
        .map(|r| (r[0].clone().unwrap(), (r[1].clone(), r[2].clone())))
        .collect();
    for (key, run) in &answers {
        assert_eq!(
            rows.get(run),
            Some(&(Some(key.clone()), Some("returned".to_owned()))),
            "the answer of {key} is its committed run"
        );
    }
    assert!(
        db.query(
            "SELECT idempotency_key FROM runs WHERE outcome = 'returned'
             GROUP BY idempotency_key HAVING count(*) > 1"
        )
        .is_empty(),
        "a key with two returned rows"
    );
    let killed = db.query("SELECT count(*) FROM runs WHERE replica = 'r0'");
    eprintln!("runs on the killed replica: {killed:?}");

    // The killed replica's calls in flight are marked by the others once it is silent.
    let started = Instant::now();
    loop {
        let open = db.query("SELECT id, replica, received_at FROM runs WHERE outcome IS NULL");
        if open.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "runs left unfinished: {open:?}; beats: {:?}\nr1:\n{}\nr2:\n{}",
            db.query("SELECT name, seen_at_ms FROM replicas"),
            r[1].log(),
            r[2].log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let marked = db.query(
        "SELECT count(*) FROM runs WHERE outcome = 'interrupted' AND replica = 'r0'
         AND error LIKE 'its replica stopped%'",
    );
    eprintln!("interrupted runs of the killed replica: {marked:?}");
    // The survivors still answer.
    assert_eq!(
        call_with_key(
            &r[1].url,
            &team,
            &version,
            "spin",
            json!([0, "after"]),
            "after-1"
        )
        .unwrap()
        .expect(200)["result"],
        json!("after")
    );
}

#[test]
fn postgres_stopped_and_started_under_load_answers_503_then_recovers_with_nothing_half_written() {
    let pg = Throwaway::start();
    let dir = tempfile::tempdir().unwrap();
    let (team, team_digest) = token("team");
    let (_, metered_digest) = token("metered");
    let config = config(&dir, &team_digest, &metered_digest);
    let url = pg.url("postgres");
    let r = replicas(&dir, &config, &url, 2);
    let nb = Fixture::code(&[FUNCTIONS]);
    let version = r[0].deploy(&team, &nb.notebook, &["double", "spin"]);
    let urls: Vec<String> = r.iter().map(|s| s.url.clone()).collect();

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..2)
        .map(|c| {
            let (urls, team, version, stop) =
                (urls.clone(), team.clone(), version.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut statuses = Vec::new();
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let key = format!("load{c}-{i}");
                    // Classed by when it was sent: a call answered late by a loaded machine
                    // may have committed before the outage.
                    let sent = Instant::now();
                    let answer = call_with_key(
                        &urls[(c + i) % 2],
                        &team,
                        &version,
                        "spin",
                        json!([0.02, i]),
                        &key,
                    )
                    .expect("a replica stopped answering HTTP");
                    if answer.status != 200 {
                        assert_eq!(answer.status, 503, "{}", answer.text());
                        assert_eq!(answer.json()["error"]["kind"], json!("unavailable"));
                    }
                    statuses.push((sent, answer.status));
                    i += 1;
                }
                statuses
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    pg.down();
    let down_at = Instant::now();
    std::thread::sleep(Duration::from_secs(4));
    let ready = r[0].get("/readyz", None);
    assert_eq!(ready.status, 503, "not ready while the store is down");
    // Calls sent while it starts may already succeed: the outage is what was sent before.
    let starting_at = Instant::now();
    pg.up();
    let up_at = Instant::now();
    // After the database returns, calls succeed again on both replicas, without a restart.
    let started = Instant::now();
    for s in &r {
        loop {
            if s.call(&team, &version, "double", json!([2])).status == 200 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "no recovery:\n{}",
                s.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let statuses: Vec<(Instant, u16)> = load.into_iter().flat_map(|l| l.join().unwrap()).collect();
    let during = statuses
        .iter()
        .filter(|(t, _)| *t > down_at + Duration::from_millis(500) && *t < starting_at);
    assert!(
        during.clone().count() > 0 && during.clone().all(|(_, s)| *s == 503),
        "503 while down"
    );
    assert!(
        statuses.iter().any(|(t, s)| *t > up_at && *s == 200),
        "200 after"
    );
    eprintln!(
        "under load: {} calls, {} answered 503",
        statuses.len(),
        statuses.iter().filter(|(_, s)| *s == 503).count()
    );

    // Nothing half-written: once the replicas caught up, every row is complete, and every
    // row that names a trace has it.
    let db_url = url.clone();
    let query = |sql: &str| -> Vec<Vec<Option<String>>> {
        let mut client = postgres::Client::connect(&db_url, postgres::NoTls).unwrap();
        client
            .simple_query(sql)
            .unwrap()
            .into_iter()
            .filter_map(|m| match m {
                postgres::SimpleQueryMessage::Row(r) => {
                    Some((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect())
                }
                _ => None,
            })
            .collect()
    };
    let started = Instant::now();
    while !query("SELECT id FROM runs WHERE outcome IS NULL").is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "rows left unfinished"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        query(
            "SELECT id FROM runs r WHERE (trace_sha256 IS NOT NULL AND trace_pruned = 0)
             <> EXISTS (SELECT 1 FROM traces t WHERE t.run = r.id)"
        )
        .is_empty(),
        "a row and its trace disagree"
    );
    let returned: usize = statuses.iter().filter(|(_, s)| *s == 200).count();
    let rows = query("SELECT count(*) FROM runs WHERE outcome = 'returned' AND function = 'spin'");
    let rows: usize = rows[0][0].as_deref().unwrap().parse().unwrap();
    assert_eq!(rows, returned, "one returned row per 200 of the load");
}
