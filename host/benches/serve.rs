//! `make bench`, serving: the pandas and the trivial function of notebooks/churn.ipynb
//! through a real `host serve` on loopback, at 1, 2 and 8 concurrent clients with keep-alive
//! (p50, p99, calls per second), next to
//!
//! (a) host's in-process call, from the same pre-initialised image, not recorded;
//! (b) a native Python HTTP server that imports the notebook's functions, with no isolation;
//! (c) the same server running each call in a fresh `python` process, the isolation users
//!     get today (`native_server.py` is both);
//!
//! then the ratios issue 12 sets targets for. Every call through `host serve` is recorded and
//! logged, as in production: its trace on disk and its row in SQLite before the answer.
//!
//! The machine this runs on may be shared: each measurement is cut into rounds, and the
//! rounds of all servers and client counts take turns, so a burst of someone else's work
//! falls on all of them alike rather than on one figure of a ratio. The `stolen` column is the
//! share of the machine's CPU time its hypervisor gave elsewhere while that row was measured
//! (`/proc/stat`'s steal): on a shared virtual machine it comes and goes, and two busy cores
//! lose more of it than one, so a high figure at 2 clients lowers the 2-client ratio.
//!
//! The native servers need `BENCH_PYTHON` (a Python with pandas; `make bench` makes one);
//! without it they are skipped.

// Shared with calls.rs, which uses what this program does not.
#[allow(dead_code)]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use common::{CpuTime, Stats, agent, cores, listening, ms, stats, verdict};
use host::bundle::Select;
use host::{
    Arguments, Bundle, Engine, Notebook, Outcome, Policy, Prepared, Request, Runtime, Sandbox,
};
use sha2::{Digest, Sha256};

/// Concurrent clients, each with its own keep-alive connection.
const CLIENTS: [usize; 3] = [1, 2, 8];
/// How long each client count is measured, per server, over all rounds; a fresh process per
/// call is slow enough to need longer for a few dozen calls.
const LENGTH: Duration = Duration::from_secs(6);
const FRESH_LENGTH: Duration = Duration::from_secs(12);
/// Into how many turns each measurement is cut: short ones, as this machine's speed can drift
/// by a third within seconds, and a ratio of two figures measured seconds apart would show
/// the drift. (c), whose calls take half a second, takes one turn in `FRESH_EVERY`.
const ROUNDS: u32 = 24;
const FRESH_EVERY: u32 = 4;
/// The bench tenant's token: the server only ever sees its digest.
const TOKEN: &str = "bench-token-0123456789abcdef0123456789abcdef";

fn main() -> Result<()> {
    let repo = common::repo();
    let notebook_path = repo.join("notebooks/churn.ipynb");
    let pandas_body = std::fs::read(repo.join("notebooks/churn-input.json"))?;
    let cases = [
        Case {
            name: "pandas  process(records)",
            function: "process",
            body: pandas_body,
        },
        Case {
            name: "trivial to_units(cents)",
            function: "to_units",
            body: br#"{"args": [12345]}"#.to_vec(),
        },
    ];
    println!(
        "host serve benchmark on {} cores: notebooks/churn.ipynb over HTTP on loopback, keep-alive, \
         {} s per client count ({} s for (c)) in {ROUNDS} rounds taking turns ({} for (c))\n",
        cores(),
        LENGTH.as_secs(),
        FRESH_LENGTH.as_secs(),
        ROUNDS / FRESH_EVERY
    );

    let work = tempfile::tempdir()?;
    let engine = Engine::new(None)?;
    let sandbox = Sandbox::new(&engine, &Runtime::locate(None)?)?;
    let notebook = Notebook::read(&notebook_path)?;
    let server = Served::host(&repo, work.path())?;
    let natives = match std::env::var_os("BENCH_PYTHON").map(PathBuf::from) {
        Some(python) => vec![
            Served::native(&python, &repo, &notebook_path, false)?,
            Served::native(&python, &repo, &notebook_path, true)?,
        ],
        None => Vec::new(),
    };
    let policy = Policy::default();
    for case in &cases {
        let version = server.deploy(&notebook_path, case.function)?;
        let served_path = format!("/v1/call/{version}/{}", case.function);
        let native_path = format!("/call/{}", case.function);
        // (a): the function called in this process from its bundle's image, as `host serve`
        // calls it, but without HTTP, recording or the run store.
        let bundle =
            Bundle::from_notebook(&sandbox, &notebook, Select::Only(&[case.function]), None)?;
        let prepared = Prepared::new(&sandbox, bundle)?;
        let arguments: Arguments = serde_json::from_slice(&case.body)?;
        let request = Request {
            function: case.function,
            arguments: &arguments,
            policy: &policy,
            record: false,
        };
        let in_process = |_: &mut ()| -> Result<()> {
            match host::call::call(&sandbox, &prepared, &request)?.outcome {
                Outcome::Returned(_) => Ok(()),
                other => bail!("the call did not return: {other:?}"),
            }
        };
        let mut contenders: Vec<Contender> = vec![
            Contender::new(LENGTH, 1, |clients, window| {
                server.level(&served_path, &case.body, clients, window)
            }),
            Contender::new(LENGTH, 1, |clients, window| {
                level(clients, window, || (), in_process)
            }),
        ];
        for (native, (length, every)) in natives
            .iter()
            .zip([(LENGTH, 1), (FRESH_LENGTH, FRESH_EVERY)])
        {
            let path = &native_path;
            contenders.push(Contender::new(length, every, move |clients, window| {
                native.level(path, &case.body, clients, window)
            }));
        }
        for round in 0..ROUNDS {
            for contender in &mut contenders {
                if round % contender.every == 0 {
                    contender.round()?;
                }
            }
        }
        let levels: Vec<Vec<Level>> = contenders.into_iter().map(|c| c.levels).collect();
        print(case, &levels);
    }
    Ok(())
}

struct Case {
    name: &'static str,
    function: &'static str,
    /// The request body: `{"args": [...]}`.
    body: Vec<u8>,
}

/// One way of calling, measured at every client count round after round.
struct Contender<'a> {
    length: Duration,
    /// It takes a turn in every `every` rounds.
    every: u32,
    measure: Box<dyn Fn(usize, Duration) -> Result<Level> + 'a>,
    /// One per client count, in `CLIENTS`' order, the rounds so far merged.
    levels: Vec<Level>,
}

impl<'a> Contender<'a> {
    fn new(
        length: Duration,
        every: u32,
        measure: impl Fn(usize, Duration) -> Result<Level> + 'a,
    ) -> Self {
        Contender {
            length,
            every,
            measure: Box::new(measure),
            levels: CLIENTS.iter().map(|&clients| Level::new(clients)).collect(),
        }
    }

    /// One round at every client count.
    fn round(&mut self) -> Result<()> {
        for level in &mut self.levels {
            let measured = (self.measure)(level.clients, self.length * self.every / ROUNDS)?;
            level.times.extend(measured.times);
            level.wall += measured.wall;
            level.cpu.add(measured.cpu);
        }
        Ok(())
    }
}

/// A server process on a loopback port, killed when dropped.
struct Served {
    child: Child,
    url: String,
    /// Sent with every request.
    authorization: Option<String>,
    /// What the server wrote to stderr, for errors.
    log: Arc<Mutex<String>>,
}

/// Calls at one client count: each call's time, and the wall-clock time they took together.
struct Level {
    clients: usize,
    times: Vec<Duration>,
    wall: Duration,
    /// The machine's CPU time while they ran, to show how much of it was stolen.
    cpu: CpuTime,
}

impl Level {
    fn new(clients: usize) -> Level {
        Level {
            clients,
            times: Vec::new(),
            wall: Duration::ZERO,
            cpu: CpuTime::default(),
        }
    }

    fn stats(&self) -> Stats {
        stats(self.times.clone())
    }

    fn per_second(&self) -> f64 {
        self.times.len() as f64 / self.wall.as_secs_f64()
    }
}

impl Served {
    /// `host serve` (target/release/host) on a new data folder, with one tenant allowed 8
    /// calls at once so the tenant's limit is not what is measured, on `workers` = cores.
    fn host(repo: &Path, work: &Path) -> Result<Served> {
        let config = work.join("host.toml");
        std::fs::write(
            &config,
            format!(
                "[[tenant]]\nname = \"bench\"\ntokens_sha256 = [\"{}\"]\nconcurrency = 8\nqueue = 16\n",
                hex::encode(Sha256::digest(TOKEN))
            ),
        )?;
        let (child, url, log) = common::host_serve(
            &repo.join("target/release/host"),
            &config,
            &work.join("serve-data"),
        )?;
        Ok(Served {
            child,
            url,
            authorization: Some(format!("Bearer {TOKEN}")),
            log,
        })
    }

    /// `native_server.py` under `python`: (b), or (c) with `fresh`.
    fn native(python: &Path, repo: &Path, notebook_path: &Path, fresh: bool) -> Result<Served> {
        let mut command = Command::new(python);
        command
            .arg(repo.join("host/benches/native_server.py"))
            .arg(notebook_path)
            .args(fresh.then_some("--fresh"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = command
            .spawn()
            .with_context(|| format!("failed to start {command:?}"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (url, log) = listening(stdout, "listening on ")?;
        Ok(Served {
            child,
            url,
            authorization: None,
            log,
        })
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// POSTs `body` to `path` on `agent`'s connection; the answer's body when it is a 200.
    fn post(&self, agent: &ureq::Agent, path: &str, body: &[u8]) -> Result<Vec<u8>> {
        let mut request = agent.post(format!("{}{path}", self.url));
        if let Some(authorization) = &self.authorization {
            request = request.header("Authorization", authorization);
        }
        let mut response = request.send(body)?;
        let status = response.status().as_u16();
        let answer = response.body_mut().read_to_vec()?;
        ensure!(
            status == 200 || status == 201,
            "POST {path}: {status} {}\n{}",
            String::from_utf8_lossy(&answer),
            self.log()
        );
        Ok(answer)
    }

    /// Deploys `function` of the notebook; its version.
    fn deploy(&self, notebook: &Path, function: &str) -> Result<String> {
        let answer = self.post(
            &agent(),
            &format!("/v1/bundles?function={function}&name=churn.ipynb"),
            &std::fs::read(notebook)?,
        )?;
        let answer: serde_json::Value = serde_json::from_slice(&answer)?;
        answer["version"]
            .as_str()
            .map(str::to_owned)
            .context("the deploy answered no version")
    }

    /// `body` POSTed to `path` by `clients` clients for `length`.
    fn level(&self, path: &str, body: &[u8], clients: usize, length: Duration) -> Result<Level> {
        level(clients, length, agent, |agent| {
            self.post(agent, path, body).map(drop)
        })
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Calls at `clients` concurrent clients: a thread each, which makes its client (its own
/// keep-alive connection) and calls with it in a loop for `length`, after one call that is
/// not measured (it opens the connection); all start measuring at once.
fn level<C>(
    clients: usize,
    length: Duration,
    client: impl Fn() -> C + Sync,
    call: impl Fn(&mut C) -> Result<()> + Sync,
) -> Result<Level> {
    let start = Barrier::new(clients);
    let started = Mutex::new(None);
    let cpu = CpuTime::now();
    let runs = std::thread::scope(|s| {
        let threads: Vec<_> = (0..clients)
            .map(|_| {
                // Stacks that run host's in-process calls in place, as `host serve`'s
                // workers do (an HTTP client does not mind).
                host::sandbox::call_thread("bench-client".into()).spawn_scoped(
                    s,
                    || -> Result<(Vec<Duration>, Instant)> {
                        let mut client = client();
                        call(&mut client)?;
                        if start.wait().is_leader() {
                            *started.lock().unwrap() = Some(Instant::now());
                        }
                        let until = Instant::now() + length;
                        let mut times = Vec::new();
                        while Instant::now() < until {
                            let t = Instant::now();
                            call(&mut client)?;
                            times.push(t.elapsed());
                        }
                        Ok((times, Instant::now()))
                    },
                )
            })
            .collect::<std::io::Result<_>>()
            .expect("failed to start a client thread");
        threads
            .into_iter()
            .map(|t| t.join().expect("a client thread panicked"))
            .collect::<Result<Vec<_>>>()
    })?;
    let started = started.into_inner().unwrap().context("no client started")?;
    let ended = runs.iter().map(|(_, end)| *end).max().unwrap_or(started);
    let times: Vec<Duration> = runs.into_iter().flat_map(|(times, _)| times).collect();
    ensure!(!times.is_empty(), "no call finished in {length:?}");
    Ok(Level {
        clients,
        times,
        wall: ended - started,
        cpu: CpuTime::since(cpu),
    })
}

/// One case's table and ratios; `levels` are host serve's, (a)'s, then (b)'s and (c)'s when
/// they were measured.
fn print(case: &Case, levels: &[Vec<Level>]) {
    const NAMES: [&str; 4] = [
        "host serve (each call recorded and logged)",
        "(a) in-process call, no HTTP, not recorded",
        "(b) native Python server, no isolation",
        "(c) native server, fresh python per call",
    ];
    println!("== {}", case.name);
    println!(
        "                                              clients       p50       p99   calls/s  (calls)  stolen"
    );
    for (name, levels) in NAMES.iter().zip(levels) {
        for (i, level) in levels.iter().enumerate() {
            let stats = level.stats();
            println!(
                "  {:<42} {:>3} {:>9} {:>9} {:>9.1}  {:<7}  {:>5.1}%",
                if i == 0 { name } else { "" },
                level.clients,
                ms(stats.p50),
                ms(stats.p99),
                level.per_second(),
                format!("({})", stats.n),
                level.cpu.stolen_percent()
            );
        }
    }
    if levels.len() < NAMES.len() {
        println!("  (b), (c) skipped: set BENCH_PYTHON to a Python with pandas (make bench does)");
    }
    fn at(levels: &[Level], clients: usize) -> &Level {
        levels
            .iter()
            .find(|l| l.clients == clients)
            .expect("every client count is measured")
    }
    let (served, in_process) = (&levels[0], &levels[1]);
    let added = (at(served, 1).stats().p50.as_secs_f64()
        - at(in_process, 1).stats().p50.as_secs_f64())
        * 1000.0;
    println!(
        "  HTTP and logging add {added:+.2} ms to the in-process p50 (1 client; target <= 1.5 ms: {})",
        verdict(added <= 1.5)
    );
    let scaling = |levels: &[Level]| at(levels, 2).per_second() / at(levels, 1).per_second();
    println!(
        "  2 clients give {:.2}x the calls/s of 1 client (target >= 1.7x: {}; in-process {:.2}x)",
        scaling(served),
        verdict(scaling(served) >= 1.7),
        scaling(in_process)
    );
    if let [_, _, plain, fresh] = levels {
        let ratios = |other: &[Level]| {
            CLIENTS
                .iter()
                .map(|&c| at(served, c).per_second() / at(other, c).per_second())
                .collect::<Vec<_>>()
        };
        let shown = |ratios: &[f64]| {
            ratios
                .iter()
                .map(|r| format!("{r:.1}x"))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        println!(
            "  host serve calls/s vs (b) at 1 / 2 / 8 clients: {}",
            shown(&ratios(plain))
        );
        let versus_fresh = ratios(fresh);
        let target = if case.function == "process" {
            let worst = versus_fresh.iter().copied().fold(f64::INFINITY, f64::min);
            format!(" (target >= 10x for pandas: {})", verdict(worst >= 10.0))
        } else {
            String::new()
        };
        println!(
            "  host serve calls/s vs (c) at 1 / 2 / 8 clients: {}{target}",
            shown(&versus_fresh)
        );
    }
    println!();
}
