//! A real `host serve` process on a free loopback port, with its own data folder, and a
//! small HTTP client to talk to it.
//!
//! A test runs its servers on SQLite unless it runs inside [`on_postgres`]: then each data
//! folder gets a fresh PostgreSQL database (kept across restarts of that folder's server,
//! dropped when the test ends), so one test body pins both backends' behaviour.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};
use tempfile::TempDir;

use super::pg::{TestDb, base_url};

thread_local! {
    /// Inside [`on_postgres`]: each data folder's database.
    static POSTGRES: RefCell<Option<HashMap<PathBuf, Arc<TestDb>>>> = const { RefCell::new(None) };
}

/// Runs `test` with every server it starts on PostgreSQL; the databases are dropped after.
pub fn on_postgres(test: impl FnOnce()) {
    POSTGRES.with(|p| *p.borrow_mut() = Some(HashMap::new()));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(test));
    POSTGRES.with(|p| p.borrow_mut().take());
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// The database of the server on `data`, inside [`on_postgres`].
fn database_for(data: &Path) -> Option<Arc<TestDb>> {
    POSTGRES.with(|p| {
        p.borrow_mut().as_mut().map(|dbs| {
            dbs.entry(data.to_owned())
                .or_insert_with(|| Arc::new(TestDb::create(&base_url())))
                .clone()
        })
    })
}

/// How long a server may take to be ready: the first start on a machine compiles the
/// interpreter (about a minute on 2 cores); later starts load it from the cache.
const READY_WITHIN: Duration = Duration::from_secs(600);

/// A running server; killed when dropped.
pub struct Server {
    pub child: Child,
    pub url: String,
    /// The data folder, kept across restarts of the same test.
    pub data: PathBuf,
    config: Option<PathBuf>,
    /// The PostgreSQL database it runs on, when not SQLite.
    pub db: Option<Arc<TestDb>>,
    /// More arguments it was started with (kept for restarts).
    extra: Vec<String>,
    /// Everything the server wrote to stderr, for failure messages.
    pub log: Arc<Mutex<String>>,
    /// Reads stderr into `log` until the server exits.
    reader: Option<std::thread::JoinHandle<()>>,
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "the answer ({}) is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Asserts the status, showing the body when it differs; returns the JSON body.
    pub fn expect(&self, status: u16) -> Value {
        assert_eq!(
            self.status,
            status,
            "status; body: {}",
            String::from_utf8_lossy(&self.body)
        );
        self.json()
    }
}

impl Server {
    /// `host serve` on `data` (made if missing), with `config` when given, once ready.
    pub fn start(data: &Path, config: Option<&Path>) -> Server {
        Server::start_with(data, config, &[])
    }

    /// A server started with more arguments (`--store URL`, `--replica NAME`, ...), once
    /// ready.
    pub fn start_with(data: &Path, config: Option<&Path>, extra: &[String]) -> Server {
        let server = Server::launch(data, config, &super::cache_dir(), extra);
        server.wait_ready();
        server
    }

    /// `host serve` on `data` with `cache` as its cache folder, as soon as it listens (it
    /// may not be ready yet: with an empty cache it compiles the runtime first).
    pub fn launch(data: &Path, config: Option<&Path>, cache: &Path, extra: &[String]) -> Server {
        let mut args = vec![
            "serve".to_owned(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--data".into(),
            data.display().to_string(),
            "--grace".into(),
            "20s".into(),
        ];
        if let Some(c) = config {
            args.extend(["--config".into(), c.display().to_string()]);
        }
        let db = if extra.iter().any(|a| a == "--store") {
            None
        } else {
            database_for(data)
        };
        if let Some(db) = &db {
            args.extend(["--store".into(), db.url.clone()]);
        }
        args.extend(extra.iter().cloned());
        let mut child = Command::new(env!("CARGO_BIN_EXE_host"))
            .args(&args)
            .env("HOST_CACHE_DIR", cache)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("failed to start host serve");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("host: listening on ") {
                    let _ = tx.send(addr.to_owned());
                }
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let url = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                panic!("host serve did not listen:\n{}", log.lock().unwrap());
            }
        };
        Server {
            child,
            url,
            data: data.to_owned(),
            config: config.map(Path::to_owned),
            db,
            extra: extra.to_vec(),
            log,
            reader: Some(reader),
        }
    }

    /// Polls `/readyz` until it answers 200.
    pub fn wait_ready(&self) {
        let started = Instant::now();
        loop {
            if self.get("/readyz", None).status == 200 {
                return;
            }
            assert!(
                started.elapsed() < READY_WITHIN,
                "host serve not ready within {READY_WITHIN:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The same server again, on the same data and config (a new port), after stopping this
    /// one with SIGTERM unless it already exited.
    pub fn restart(mut self) -> Server {
        if self.child.try_wait().unwrap().is_none() {
            self.stop();
        }
        Server::start_with(
            &self.data.clone(),
            self.config.clone().as_deref(),
            &self.extra,
        )
    }

    /// SIGTERM, and the exit code once it exited.
    pub fn stop(&mut self) -> i32 {
        self.signal(libc::SIGTERM);
        self.exit_code()
    }

    /// The exit code, once the process exited (after a signal sent with [`Server::signal`]).
    pub fn exit_code(&mut self) -> i32 {
        let status = self.wait();
        status
            .code()
            .unwrap_or_else(|| panic!("host serve died of a signal: {status:?}\n{}", self.log()))
    }

    /// `kill -9`, waited for.
    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        self.wait();
    }

    /// Waits for the process to exit and for its stderr to be read to the end.
    fn wait(&mut self) -> std::process::ExitStatus {
        let status = self.child.wait().unwrap();
        if let Some(reader) = self.reader.take() {
            reader.join().unwrap();
        }
        status
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(rc, 0, "kill failed");
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The default tenant's token, as the first start wrote it.
    pub fn default_token(&self) -> String {
        std::fs::read_to_string(self.data.join("default.token"))
            .expect("the default token file")
            .trim()
            .to_owned()
    }

    pub fn get(&self, path: &str, token: Option<&str>) -> Answer {
        self.request("GET", path, token, &[], None)
    }

    pub fn post(&self, path: &str, token: Option<&str>, body: &[u8]) -> Answer {
        self.request("POST", path, token, &[], Some(body))
    }

    pub fn put(&self, path: &str, token: Option<&str>, body: &[u8]) -> Answer {
        self.request("PUT", path, token, &[], Some(body))
    }

    /// Deploys a notebook file; returns the version.
    pub fn deploy(&self, token: &str, notebook: &Path, functions: &[&str]) -> String {
        let mut path = "/v1/bundles?name=nb.ipynb".to_owned();
        for f in functions {
            path.push_str(&format!("&function={f}"));
        }
        let answer = self.post(&path, Some(token), &std::fs::read(notebook).unwrap());
        assert!(
            answer.status == 201 || answer.status == 200,
            "deploy: {answer:?}\n{}",
            String::from_utf8_lossy(&answer.body)
        );
        answer.json()["version"].as_str().unwrap().to_owned()
    }

    /// `POST /v1/call/TARGET/FUNCTION` with `{"args": args}`.
    pub fn call(&self, token: &str, target: &str, function: &str, args: Value) -> Answer {
        let body = serde_json::json!({ "args": args }).to_string();
        self.post(
            &format!("/v1/call/{target}/{function}"),
            Some(token),
            body.as_bytes(),
        )
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Answer {
        send(&self.url, method, path, token, headers, body)
            .unwrap_or_else(|e| panic!("{method} {}{path}: {e}\n{}", self.url, self.log()))
    }

    /// The rows of `sql` in the server's run store, whichever it is, every value as text
    /// (NULL as None): tests write SQL both backends read alike.
    pub fn sql(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        if let Some(db) = &self.db {
            return db.query(sql);
        }
        let conn = rusqlite::Connection::open_with_flags(
            self.data.join("host.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        let mut s = conn.prepare(sql).unwrap();
        let n = s.column_count();
        s.query_map([], |r| {
            (0..n)
                .map(|i| {
                    Ok(match r.get_ref(i)? {
                        rusqlite::types::ValueRef::Null => None,
                        rusqlite::types::ValueRef::Integer(v) => Some(v.to_string()),
                        rusqlite::types::ValueRef::Real(v) => Some(v.to_string()),
                        rusqlite::types::ValueRef::Text(t) | rusqlite::types::ValueRef::Blob(t) => {
                            Some(String::from_utf8_lossy(t).into_owned())
                        }
                    })
                })
                .collect()
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
    }

    /// Runs statements that change rows on the server's run store, whichever it is: for a
    /// test to make a state the API cannot (a trace pruned just so).
    pub fn execute(&self, sql: &str) {
        match &self.db {
            Some(db) => drop(db.query(sql)),
            None => rusqlite::Connection::open(self.data.join("host.db"))
                .unwrap()
                .execute_batch(sql)
                .unwrap(),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A new tenant token and the digest a config lists for it.
pub fn token(seed: &str) -> (String, String) {
    let token = format!("test-token-{seed}-0123456789abcdef");
    let digest = hex::encode(Sha256::digest(token.as_bytes()));
    (token, digest)
}

/// A config in `dir` with two tenants, `a` and `b`, whose tokens have these digests.
pub fn two_tenants(dir: &Path, a_digest: &str, b_digest: &str) -> PathBuf {
    let path = dir.join("host.toml");
    std::fs::write(
        &path,
        format!(
            "[[tenant]]\nname = \"a\"\ntokens_sha256 = [\"{a_digest}\"]\n\
             [[tenant]]\nname = \"b\"\ntokens_sha256 = [\"{b_digest}\"]\n"
        ),
    )
    .unwrap();
    path
}

/// A temporary folder for a server's data and config.
pub fn workdir() -> TempDir {
    tempfile::tempdir().unwrap()
}

/// `body` POSTed to `path` on a connection of its own, the answer not read: the caller hangs
/// up by dropping the connection.
pub fn send_unread(server: &Server, path: &str, token: &str, body: &str) -> std::net::TcpStream {
    use std::io::Write;
    let addr = server.url.strip_prefix("http://").unwrap();
    let mut client = std::net::TcpStream::connect(addr).unwrap();
    write!(
        client,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    client
}

/// One HTTP request to the server at `url`; an error when none could be made (a server that
/// is gone), for clients that retry elsewhere.
pub fn send(
    url: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Result<Answer, String> {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent();
    let url = format!("{url}{path}");
    let mut builder = ureq::http::Request::builder().method(method).uri(&url);
    if let Some(t) = token {
        builder = builder.header("Authorization", format!("Bearer {t}"));
    }
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let request = builder.body(body.unwrap_or_default().to_vec()).unwrap();
    let mut response = agent.run(request).map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let body = response
        .body_mut()
        .with_config()
        .limit(1 << 30)
        .read_to_vec()
        .map_err(|e| e.to_string())?;
    Ok(Answer {
        status,
        headers,
        body,
    })
}
