//! `make bench`, a long history: the trivial function of notebooks/churn.ipynb through a real
//! `host serve`, one client with keep-alive, for a tenant with a `storage` quota and a
//! `retention`, as production configures one: first on an empty run store, then with
//! `HISTORY` runs logged. Every call checks the tenant's storage as it starts and as it ends;
//! those checks read counters and an index (schema version 4), so the two figures should
//! match. For scale, the statements the checks ran before version 4 (a sum over all of the
//! tenant's runs, and a scan of its traces) are timed on the same store.

// Shared with the other bench programs, which use what this one does not.
#[allow(dead_code)]
mod common;

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use common::{Stats, agent, host_serve, ms, stats};
use rusqlite::params;
use sha2::{Digest, Sha256};

/// Runs already logged in the second measurement.
const HISTORY: usize = 400_000;
/// How long each measurement calls.
const LENGTH: Duration = Duration::from_secs(5);
const TOKEN: &str = "bench-token-0123456789abcdef0123456789abcdef";
/// A logged trace's size, about the trivial function's.
const TRACE_SIZE: i64 = 1300;

fn main() -> Result<()> {
    let repo = common::repo();
    let host_bin = repo.join("target/release/host");
    let work = tempfile::tempdir()?;
    let config = work.path().join("host.toml");
    std::fs::write(
        &config,
        format!(
            "[[tenant]]\nname = \"bench\"\ntokens_sha256 = [\"{}\"]\n\
             storage = \"100G\"\nretention = \"30d\"\n",
            hex::encode(Sha256::digest(TOKEN))
        ),
    )?;
    let data = work.path().join("data");
    println!(
        "history benchmark: notebooks/churn.ipynb to_units(cents) through host serve, 1 client, \
         {} s each, for a tenant with storage = \"100G\" and retention = \"30d\"\n",
        LENGTH.as_secs()
    );

    let (server, url, _log) = host_serve(&host_bin, &config, &data)?;
    let deployed: serde_json::Value = serde_json::from_slice(
        &agent()
            .post(format!(
                "{url}/v1/bundles?function=to_units&name=churn.ipynb"
            ))
            .header("Authorization", format!("Bearer {TOKEN}"))
            .send(std::fs::read(repo.join("notebooks/churn.ipynb"))?)?
            .body_mut()
            .read_to_vec()?,
    )?;
    let version = deployed["version"]
        .as_str()
        .context("the deploy answered no version")?
        .to_owned();
    let path = format!("{url}/v1/call/{version}/to_units");
    let empty = calls(&path)?;
    stop(server)?;

    let logged = Instant::now();
    log_history(&data.join("host.db"), &version)?;
    let logged = logged.elapsed();

    let (server, url, _log) = host_serve(&host_bin, &config, &data)?;
    let path = format!("{url}/v1/call/{version}/to_units");
    let long = calls(&path)?;
    stop(server)?;
    let before = checks_before_version_4(&data.join("host.db"))?;

    let per_second = |s: &Stats| s.n as f64 / LENGTH.as_secs_f64();
    println!("  runs logged before        p50       p99   calls/s");
    for (runs, s) in [(0, &empty), (HISTORY, &long)] {
        println!(
            "  {runs:>18} {:>9} {:>9} {:>9.1}",
            ms(s.p50),
            ms(s.p99),
            per_second(s)
        );
    }
    println!(
        "\n  with {HISTORY} runs logged (written in {:.1} s), calls/s are {:.2}x those on an empty store",
        logged.as_secs_f64(),
        per_second(&long) / per_second(&empty)
    );
    println!(
        "  for scale: before schema version 4 each call's two checks also read the whole history, \
         {} per check here ({} a call)",
        ms(before),
        ms(before * 2)
    );
    Ok(())
}

/// One client calling `path` for `LENGTH`, on one keep-alive connection.
fn calls(path: &str) -> Result<Stats> {
    let agent = agent();
    let mut times = Vec::new();
    let started = Instant::now();
    while started.elapsed() < LENGTH {
        let t = Instant::now();
        let mut response = agent
            .post(path)
            .header("Authorization", format!("Bearer {TOKEN}"))
            .send(br#"{"args": [12345]}"#)?;
        let status = response.status().as_u16();
        let body = response.body_mut().read_to_vec()?;
        ensure!(
            status == 200,
            "{status}: {}",
            String::from_utf8_lossy(&body)
        );
        times.push(t.elapsed());
    }
    Ok(stats(times))
}

/// SIGTERM, and the server's exit: it drains and flushes its store.
fn stop(mut server: Child) -> Result<()> {
    // SAFETY: signalling a child process this program started and has not yet waited for.
    unsafe { libc::kill(server.id() as libc::pid_t, libc::SIGTERM) };
    let status = server.wait()?;
    ensure!(status.success(), "host serve exited with {status}");
    Ok(())
}

/// `HISTORY` finished runs of the tenant, each with a trace as the server would have logged
/// it (its size counted, as the server counts it; the trace bytes themselves are not what
/// the checks read, and are left out).
fn log_history(db: &Path, version: &str) -> Result<()> {
    let mut conn = rusqlite::Connection::open(db)?;
    let tx = conn.transaction()?;
    {
        let mut insert = tx.prepare(
            "INSERT INTO runs (id, tenant, bundle_version, function, received_at, started_at,
             finished_at, duration_ms, outcome, http_status, input_sha256, result,
             result_sha256, trace_sha256, trace_size, host_version, runtime_sha256, replica)
             SELECT ?1, 'bench', ?2, 'to_units', at, at, at, 0.2, 'returned', 200, ?4,
             '123.45', ?4, ?4, ?5, 'bench', ?4, 'bench'
             FROM (SELECT strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?3) AS at)",
        )?;
        let digest = "0".repeat(64);
        for i in 0..HISTORY {
            // UUIDv7-shaped, ordered before the ids of the calls measured after.
            let id = format!("00000000-0000-7000-8000-{i:012x}");
            // Spread over the last week: within retention, so none is pruned meanwhile.
            let at = format!("-{} minutes", 10_000 - i % 10_000);
            insert.execute(params![id, version, at, digest, TRACE_SIZE])?;
        }
    }
    tx.execute(
        "UPDATE trace_bytes SET bytes = bytes + ?1 WHERE tenant = 'bench' AND slot = 0",
        [HISTORY as i64 * TRACE_SIZE],
    )?;
    tx.commit()?;
    Ok(())
}

/// The time of one storage check as it was before schema version 4: the tenant's usage as
/// a sum over its runs, and its traces past retention found by reading them all.
fn checks_before_version_4(db: &Path) -> Result<Duration> {
    let conn = rusqlite::Connection::open(db)?;
    let started = Instant::now();
    let usage: i64 = conn.query_row(
        "SELECT (SELECT coalesce(sum(size), 0) FROM bundles WHERE tenant = ?1)
              + (SELECT coalesce(sum(trace_size), 0) FROM runs
                 WHERE tenant = ?1 AND trace_pruned = 0)",
        ["bench"],
        |r| r.get(0),
    )?;
    let past: Vec<String> = conn
        .prepare(
            "SELECT id FROM runs INDEXED BY runs_by_tenant
             WHERE tenant = ?1 AND trace_size IS NOT NULL AND trace_pruned = 0
             AND (?2 IS NULL OR finished_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?2))
             ORDER BY id",
        )?
        .query_map(params!["bench", "-2592000 seconds"], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let took = started.elapsed();
    ensure!(usage > 0, "the history counted no bytes");
    ensure!(past.is_empty(), "the history is within retention");
    Ok(took)
}
