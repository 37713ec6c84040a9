//! `make bench`, part two: `host serve` under load on each store, side by side.
//!
//! One replica on SQLite, one on PostgreSQL, and two replicas on PostgreSQL (the bench's
//! own clients spread requests round-robin, as a load balancer would), each loaded by
//! keep-alive clients for a fixed time with the pandas and the trivial function of
//! notebooks/churn.ipynb: calls/s, p50 and p99, errors, and the ratios. PostgreSQL is
//! `BENCH_POSTGRES` or `HOST_TEST_POSTGRES` (a fresh database is made and dropped), else one
//! on 127.0.0.1:5432; without one this part says so and fails.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Clients sending at once: two per core, so the workers never wait for a request.
const CLIENTS: usize = 4;
const SECONDS: u64 = 10;

struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(host: &Path, data: &Path, config: &Path, store: &str, replica: &str) -> Result<Server> {
    let mut child = Command::new(host)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--store",
            store,
            "--replica",
            replica,
        ])
        .arg("--data")
        .arg(data)
        .arg("--config")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("failed to start host serve")?;
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("host: listening on ") {
                let _ = tx.send(addr.to_owned());
            }
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(120))
        .context("host serve did not listen")?;
    let server = Server { child, url };
    let started = Instant::now();
    while get(&server.url, "/readyz") != Some(200) {
        if started.elapsed() > Duration::from_secs(600) {
            bail!("host serve was not ready in 10 minutes");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(server)
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent()
}

fn get(url: &str, path: &str) -> Option<u16> {
    agent()
        .get(&format!("{url}{path}"))
        .call()
        .ok()
        .map(|r| r.status().as_u16())
}

fn post(agent: &ureq::Agent, url: &str, token: &str, body: &[u8]) -> Result<(u16, String)> {
    let mut response = agent
        .post(url)
        .header("Authorization", format!("Bearer {token}"))
        .send(body)?;
    let status = response.status().as_u16();
    Ok((status, response.body_mut().read_to_string()?))
}

/// Calls/s, p50 and p99 (ms), errors.
struct Load {
    calls_per_s: f64,
    p50: f64,
    p99: f64,
    errors: usize,
}

/// `CLIENTS` keep-alive clients for `SECONDS`, spread over `urls` round-robin.
fn load(urls: &[String], token: &str, function: &str, body: &[u8]) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (urls, token, body, stop) =
                (urls.to_vec(), token.to_owned(), body.to_vec(), stop.clone());
            let function = function.to_owned();
            std::thread::spawn(move || {
                let agents: Vec<_> = urls.iter().map(|_| agent()).collect();
                let (mut times, mut errors, mut i) = (Vec::new(), 0, c);
                while !stop.load(Ordering::Relaxed) {
                    let k = i % urls.len();
                    let url = format!("{}/v1/call/prod/{function}", urls[k]);
                    let t = Instant::now();
                    match post(&agents[k], &url, &token, &body) {
                        Ok((200, _)) => times.push(t.elapsed().as_secs_f64() * 1000.0),
                        Ok((status, text)) => {
                            if errors == 0 {
                                eprintln!("  error {status}: {text}");
                            }
                            errors += 1;
                        }
                        Err(e) => {
                            if errors == 0 {
                                eprintln!("  error: {e}");
                            }
                            errors += 1;
                        }
                    }
                    i += 1;
                }
                (times, errors)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(SECONDS));
    stop.store(true, Ordering::Relaxed);
    let (mut times, mut errors) = (Vec::new(), 0);
    for c in clients {
        let (t, e) = c.join().unwrap();
        times.extend(t);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    times.sort_by(f64::total_cmp);
    let at = |q: f64| {
        times
            .get(((times.len() as f64 * q) as usize).min(times.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    Load {
        calls_per_s: times.len() as f64 / elapsed,
        p50: at(0.5),
        p99: at(0.99),
        errors,
    }
}

fn postgres_url() -> Result<String> {
    for var in ["BENCH_POSTGRES", "HOST_TEST_POSTGRES"] {
        if let Ok(url) = std::env::var(var) {
            return Ok(url);
        }
    }
    let default = "postgres://postgres@127.0.0.1:5432/test";
    postgres::Client::connect(default, postgres::NoTls)
        .map(|_| default.to_owned())
        .with_context(|| {
            format!(
                "no PostgreSQL at {default}: set BENCH_POSTGRES to a server's URL, or run \
                 `make bench`, which finds or starts one"
            )
        })
}

/// A fresh database on the server at `admin`, dropped with the value.
struct Database {
    admin: String,
    name: String,
    url: String,
}

impl Database {
    fn create(admin: &str) -> Result<Database> {
        let name = format!("host_bench_{}", std::process::id());
        let mut client = postgres::Client::connect(admin, postgres::NoTls)?;
        client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))?;
        client.batch_execute(&format!("CREATE DATABASE {name}"))?;
        let base = admin.split('?').next().unwrap();
        let url = format!(
            "{}/{name}",
            &base[..base.rfind('/').context("a URL with a database")?]
        );
        Ok(Database {
            admin: admin.to_owned(),
            name,
            url,
        })
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        if let Ok(mut c) = postgres::Client::connect(&self.admin, postgres::NoTls) {
            let _ = c.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}

fn main() -> Result<()> {
    let repo: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned();
    let host = repo.join("target/release/host");
    let work = tempfile::tempdir()?;
    let token = "bench-token-0123456789abcdef0123456789abcdef";
    let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(token.as_bytes()));
    let config = work.path().join("host.toml");
    std::fs::write(
        &config,
        format!(
            "[[tenant]]\nname = \"bench\"\ntokens_sha256 = [\"{digest}\"]\nconcurrency = 8\nqueue = 64\n"
        ),
    )?;
    let notebook = std::fs::read(repo.join("notebooks/churn.ipynb"))?;
    let pandas_input = std::fs::read(repo.join("notebooks/churn-input.json"))?;
    let db = Database::create(&postgres_url()?)?;
    let setups: [(&str, &str, usize); 3] = [
        ("1 replica, SQLite", "sqlite", 1),
        ("1 replica, PostgreSQL", &db.url, 1),
        ("2 replicas, PostgreSQL", &db.url, 2),
    ];
    println!(
        "\nhost serve under load: {CLIENTS} keep-alive clients for {SECONDS} s each, on {} cores",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "{:<24} {:<10} {:>9} {:>9} {:>9} {:>7}",
        "setup", "function", "calls/s", "p50 ms", "p99 ms", "errors"
    );
    let mut figures = Vec::new();
    for (i, (name, store, replicas)) in setups.iter().enumerate() {
        let servers = (0..*replicas)
            .map(|r| {
                let data = work.path().join(format!("setup{i}-r{r}"));
                start(&host, &data, &config, store, &format!("bench{i}-{r}"))
            })
            .collect::<Result<Vec<_>>>()?;
        let urls: Vec<String> = servers.iter().map(|s| s.url.clone()).collect();
        let agent = agent();
        let deploy = format!(
            "{}/v1/bundles?name=churn.ipynb&function=process&function=to_units",
            urls[0]
        );
        let (status, body) = post(&agent, &deploy, token, &notebook)?;
        anyhow::ensure!(status == 201 || status == 200, "deploy: {status} {body}");
        let version: serde_json::Value = serde_json::from_str(&body)?;
        let version = version["version"].as_str().context("a version")?;
        let alias = format!("{}/v1/aliases/prod", urls[0]);
        let response = agent
            .put(&alias)
            .header("Authorization", format!("Bearer {token}"))
            .send(format!("{{\"version\": \"{version}\"}}"))?;
        anyhow::ensure!(response.status() == 200, "alias: {}", response.status());
        // Every replica has the bundle loaded before the clock starts.
        for url in &urls {
            let (s, b) = post(
                &agent,
                &format!("{url}/v1/call/prod/to_units"),
                token,
                b"{\"args\": [1]}",
            )?;
            anyhow::ensure!(s == 200, "warm-up: {s} {b}");
        }
        for (function, body) in [
            ("process", pandas_input.as_slice()),
            ("to_units", b"{\"args\": [12345]}".as_slice()),
        ] {
            let l = load(&urls, token, function, body);
            println!(
                "{:<24} {:<10} {:>9.1} {:>9.2} {:>9.2} {:>7}",
                name, function, l.calls_per_s, l.p50, l.p99, l.errors
            );
            figures.push(((i, function), l));
        }
    }
    let get = |i: usize, f: &str| {
        figures
            .iter()
            .find(|((j, g), _)| *j == i && *g == f)
            .map(|(_, l)| l)
            .unwrap()
    };
    println!();
    for f in ["process", "to_units"] {
        let (sqlite, pg, two) = (get(0, f), get(1, f), get(2, f));
        println!(
            "{f:<9} PostgreSQL / SQLite calls/s: {:.2}x{}; 2 replicas / 1 on PostgreSQL: {:.2}x",
            pg.calls_per_s / sqlite.calls_per_s,
            if f == "process" {
                " (target >= 0.85x)"
            } else {
                ""
            },
            two.calls_per_s / pg.calls_per_s
        );
    }
    let errors: usize = figures.iter().map(|(_, l)| l.errors).sum();
    println!("errors under load: {errors} (target 0)");
    Ok(())
}
