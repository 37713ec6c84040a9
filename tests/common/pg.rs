//! PostgreSQL for the tests: a fresh database per test on the server `HOST_TEST_POSTGRES`
//! names (`make test` sets it through tests/with-postgres), and throwaway servers of our own
//! for the tests that stop and start one.
//!
//! Nothing here skips: a test that needs PostgreSQL and cannot have one fails, saying how
//! to get one.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use tempfile::TempDir;

const HOW: &str = "run the tests through `make test` (tests/with-postgres finds or starts a \
    PostgreSQL), or set HOST_TEST_POSTGRES to a server's URL \
    (e.g. postgres://postgres@127.0.0.1:5432/test)";

/// The URL tests make their databases through.
pub fn base_url() -> String {
    if let Ok(url) = std::env::var("HOST_TEST_POSTGRES") {
        return url;
    }
    let default = "postgres://postgres@127.0.0.1:5432/test";
    match postgres::Client::connect(default, postgres::NoTls) {
        Ok(_) => default.to_owned(),
        Err(e) => panic!("this test needs PostgreSQL, and none answers at {default} ({e}): {HOW}"),
    }
}

/// `url` with its database name replaced by `name`.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    format!("{}/{name}{query}", &base[..host_end])
}

/// A database made for one test, dropped (with its connections) at the end.
pub struct TestDb {
    admin: String,
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub fn create(admin: &str) -> TestDb {
        let name = format!("host_test_{}", uuid::Uuid::new_v4().simple());
        let mut client = postgres::Client::connect(admin, postgres::NoTls)
            .unwrap_or_else(|e| panic!("cannot reach PostgreSQL at {admin}: {e}: {HOW}"));
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("cannot create a test database at {admin}: {e}"));
        TestDb {
            admin: admin.to_owned(),
            url: with_database(admin, &name),
            name,
        }
    }

    /// The rows of `sql`, every value as text (NULL as None).
    pub fn query(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        let mut client = postgres::Client::connect(&self.url, postgres::NoTls).unwrap();
        let mut rows = Vec::new();
        for message in client.simple_query(sql).unwrap() {
            if let postgres::SimpleQueryMessage::Row(row) = message {
                rows.push(
                    (0..row.len())
                        .map(|i| row.get(i).map(str::to_owned))
                        .collect(),
                );
            }
        }
        rows
    }

    /// A connection that holds `table` locked against writes (reads still go on) until it
    /// runs `COMMIT`: the server's next insert into it waits, a real wait on its side.
    pub fn hold_writes(&self, table: &str) -> postgres::Client {
        let mut client = postgres::Client::connect(&self.url, postgres::NoTls).unwrap();
        client
            .batch_execute(&format!(
                "BEGIN; LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE"
            ))
            .unwrap();
        client
    }

    /// Waits (up to 30 s) until another session's insert into `table` waits on a lock.
    pub fn wait_for_held_insert(&self, table: &str) {
        let mut client = postgres::Client::connect(&self.url, postgres::NoTls).unwrap();
        let started = Instant::now();
        while client
            .query(
                "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                 AND pid <> pg_backend_pid() AND query LIKE $1",
                &[&format!("%INSERT INTO {table} %")],
            )
            .unwrap()
            .is_empty()
        {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "no insert into {table} waited on its lock"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Ok(mut client) = postgres::Client::connect(&self.admin, postgres::NoTls) {
            let _ = client.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}

/// A PostgreSQL server of the test's own, in a temporary folder, that the test may stop and
/// start: from `HOST_TEST_PG_BIN` (tests/with-postgres sets it).
pub struct Throwaway {
    bin: PathBuf,
    dir: TempDir,
    pub port: u16,
    /// As root, the user the server runs as (PostgreSQL refuses root).
    user: Option<String>,
}

impl Throwaway {
    pub fn start() -> Throwaway {
        let bin = PathBuf::from(std::env::var("HOST_TEST_PG_BIN").unwrap_or_else(|_| {
            panic!(
                "this test starts and stops a PostgreSQL of its own and needs its binaries in \
                 HOST_TEST_PG_BIN: {HOW}"
            )
        }));
        let dir = tempfile::Builder::new()
            .prefix("host-test-pg.")
            .tempdir_in("/tmp")
            .unwrap();
        // SAFETY: geteuid has no preconditions.
        let user = (unsafe { libc::geteuid() } == 0).then(|| {
            let user = if Command::new("id")
                .arg("postgres")
                .output()
                .unwrap()
                .status
                .success()
            {
                "postgres"
            } else {
                "nobody"
            };
            let ok = Command::new("chown")
                .args([user, dir.path().to_str().unwrap()])
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown of the throwaway PostgreSQL's folder failed");
            user.to_owned()
        });
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let server = Throwaway {
            bin,
            dir,
            port,
            user,
        };
        let data = server.data();
        server.run("initdb", &["-D", &data, "-U", "postgres", "--auth=trust"]);
        server.up();
        server
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn run(&self, program: &str, args: &[&str]) {
        let exe = self.bin.join(program);
        let mut command = match &self.user {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let out = command.args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts the server (again), and waits until it takes connections.
    pub fn up(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log").display().to_string();
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-l",
                &log,
                "-w",
                "-o",
                &options,
                "start",
            ],
        );
        let started = Instant::now();
        while postgres::Client::connect(&self.url("postgres"), postgres::NoTls).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the throwaway PostgreSQL did not take connections"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server (fast: open connections are cut, as in an outage).
    pub fn down(&self) {
        self.run("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"]);
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }
}

impl Drop for Throwaway {
    fn drop(&mut self) {
        let data = self.data();
        let exe = self.bin.join("pg_ctl");
        let mut command = match &self.user {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let _ = command
            .args(["-D", &data, "-m", "immediate", "-w", "stop"])
            .output();
    }
}

#[test]
fn database_names_replace_the_urls_path() {
    assert_eq!(
        with_database("postgres://postgres@127.0.0.1:5432/test", "x"),
        "postgres://postgres@127.0.0.1:5432/x"
    );
    assert_eq!(
        with_database("postgres://u:p@h/db?sslmode=disable", "x"),
        "postgres://u:p@h/x?sslmode=disable"
    );
    assert_eq!(with_database("postgres://h", "x"), "postgres://h/x");
}
