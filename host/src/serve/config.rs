//! `host serve`'s configuration: the TOML file's schema (plain serde types, unknown keys
//! refused) and the validated settings the server runs on, resolved once at start.
//!
//! Every value is checked before the server binds its port, and every error names the key
//! (`tenant "a": memory: ...`), so a bad config never half-starts a server.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Deserialize;

use super::store::Location;
use crate::error::bad_input;
use crate::policy::{
    DEFAULT_RECORD, Grant, Limits, parse_duration, parse_period, parse_size, record_limit,
};

/// The config file, as written. Sizes and durations are strings (`"1G"`, `"30s"`), as the
/// command line's flags take them.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    listen: Option<String>,
    data: Option<PathBuf>,
    store: Option<String>,
    replica: Option<String>,
    workers: Option<usize>,
    max_memory: Option<String>,
    max_timeout: Option<String>,
    max_output: Option<String>,
    max_body: Option<String>,
    body_timeout: Option<String>,
    header_timeout: Option<String>,
    #[serde(default)]
    tenant: Vec<TenantFile>,
}

/// One `[[tenant]]` table, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantFile {
    name: String,
    tokens_sha256: Vec<String>,
    memory: Option<String>,
    timeout: Option<String>,
    max_output: Option<String>,
    max_record: Option<String>,
    concurrency: Option<usize>,
    queue: Option<usize>,
    calls_per_minute: Option<u32>,
    max_body: Option<String>,
    storage: Option<String>,
    retention: Option<String>,
    #[serde(default)]
    grants: Vec<String>,
}

/// What the server runs on.
#[derive(Debug)]
pub struct Config {
    pub listen: SocketAddr,
    /// Holds `host.db` (with the SQLite store) and the default tenant's token.
    pub data: PathBuf,
    /// Where runs, bundles and traces are kept.
    pub store: Location,
    /// This server's name in `runs.replica`; by default `HOSTNAME:PORT`.
    pub replica: Option<String>,
    /// Calls running at once, over all tenants.
    pub workers: usize,
    /// How long a client may take to send a request's body.
    pub body_timeout: Duration,
    /// How long a connection may take to send a request's headers, counted from when it
    /// opened or was last answered: a connection that stalls (or sits idle) longer is closed.
    pub header_timeout: Duration,
    pub tenants: Vec<Tenant>,
}

/// A tenant: who it is and what its calls may use.
#[derive(Debug)]
pub struct Tenant {
    pub name: String,
    /// SHA-256 digests of the tokens that act for this tenant (the server never keeps a token).
    pub tokens_sha256: Vec<[u8; 32]>,
    /// Each call's limits.
    pub limits: Limits,
    /// Calls running at once.
    pub concurrency: usize,
    /// Calls waiting for a worker, beyond those running; more are refused with 429.
    pub queue: usize,
    /// Calls accepted per minute; more are refused with 429 and `Retry-After`.
    pub calls_per_minute: Option<u32>,
    /// The largest request body (a notebook, a bundle, a call's arguments).
    pub max_body: u64,
    /// Bundles plus traces kept; when over, the oldest traces are pruned, then calls and
    /// deploys are refused with 507.
    pub storage: Option<u64>,
    /// Traces older than this are pruned.
    pub retention: Option<Duration>,
    /// Host folders this tenant's calls see.
    pub grants: Vec<Grant>,
}

/// Server-wide maxima: no tenant's setting may go over them.
struct Maxima {
    memory: u64,
    timeout: Duration,
    output: u64,
    body: u64,
}

/// The address `host serve` listens on by default: loopback only, so a fresh server is never
/// reachable from another machine until its config says so.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// The data folder by default, relative to where the server starts.
pub const DEFAULT_DATA: &str = "host-data";
const DEFAULT_MAX_BODY: &str = "16M";
const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Longer than a load balancer keeps an idle connection to a backend (60 s for most), so a
/// balancer never sends a request on a connection the server is closing (a 502 for its
/// client), as nginx's 75 s default; short enough that stalled connections do not pile up.
const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(75);
const DEFAULT_CONCURRENCY: usize = 2;
const DEFAULT_QUEUE: usize = 16;

/// A replica's name: it goes into every run row and into log lines, so it is short and plain.
pub fn check_replica(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 100
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
    {
        anyhow::bail!(
            "`{name}` is not a replica name: 1 to 100 of letters, digits, `-`, `_`, `.` and `:`"
        );
    }
    Ok(())
}

impl Config {
    /// The config file at `path`.
    pub fn read(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| bad_input(format!("cannot read config `{}`: {e}", path.display())))?;
        Self::parse(&text).with_context(|| format!("config `{}`", path.display()))
    }

    /// The config in `text`; with no `[[tenant]]`, none is made here (see [`Config::default_tenant`]).
    pub fn parse(text: &str) -> Result<Config> {
        let file: File = toml::from_str(text).map_err(|e| bad_input(e.to_string()))?;
        let key = |name: &'static str| move |e: anyhow::Error| bad_input(format!("{name}: {e:#}"));
        let listen = file.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen: SocketAddr = listen.parse().map_err(|e| {
            bad_input(format!(
                "listen: `{listen}` is not an address and port (e.g. 127.0.0.1:8080): {e}"
            ))
        })?;
        let store = match file.store.as_deref() {
            None => Location::Sqlite,
            Some(text) => Location::parse(text).map_err(key("store"))?,
        };
        if let Some(replica) = &file.replica {
            check_replica(replica).map_err(key("replica"))?;
        }
        let workers = match file.workers {
            Some(0) => return Err(bad_input("workers: must be at least 1")),
            Some(n) => n,
            None => default_workers(),
        };
        let defaults = Limits::default();
        let maxima = Maxima {
            memory: size_or(file.max_memory.as_deref(), defaults.memory)
                .map_err(key("max_memory"))?,
            timeout: duration_or(file.max_timeout.as_deref(), defaults.timeout)
                .map_err(key("max_timeout"))?,
            output: size_or(file.max_output.as_deref(), defaults.output)
                .map_err(key("max_output"))?,
            body: size_or(file.max_body.as_deref(), parse_size(DEFAULT_MAX_BODY)?)
                .map_err(key("max_body"))?,
        };
        let body_timeout = duration_or(file.body_timeout.as_deref(), DEFAULT_BODY_TIMEOUT)
            .map_err(key("body_timeout"))?;
        let header_timeout = duration_or(file.header_timeout.as_deref(), DEFAULT_HEADER_TIMEOUT)
            .map_err(key("header_timeout"))?;
        let mut tenants = Vec::new();
        for t in file.tenant {
            let tenant = Tenant::resolve(t, &maxima)?;
            if tenants.iter().any(|o: &Tenant| o.name == tenant.name) {
                return Err(bad_input(format!(
                    "tenant `{}`: a second [[tenant]] has this name",
                    tenant.name
                )));
            }
            tenants.push(tenant);
        }
        Ok(Config {
            listen,
            data: file.data.unwrap_or_else(|| PathBuf::from(DEFAULT_DATA)),
            store,
            replica: file.replica,
            workers,
            body_timeout,
            header_timeout,
            tenants,
        })
    }

    /// The embedded default: one tenant, `default`, acting with the token digested in
    /// `token_sha256`, with host run's limits.
    pub fn default_tenant(token_sha256: [u8; 32]) -> Result<Tenant> {
        let t = TenantFile {
            name: "default".into(),
            tokens_sha256: vec![hex::encode(token_sha256)],
            memory: None,
            timeout: None,
            max_output: None,
            max_record: None,
            concurrency: None,
            queue: None,
            calls_per_minute: None,
            max_body: None,
            storage: None,
            retention: None,
            grants: Vec::new(),
        };
        let defaults = Limits::default();
        let maxima = Maxima {
            memory: defaults.memory,
            timeout: defaults.timeout,
            output: defaults.output,
            body: parse_size(DEFAULT_MAX_BODY)?,
        };
        Tenant::resolve(t, &maxima)
    }
}

impl Tenant {
    fn resolve(t: TenantFile, max: &Maxima) -> Result<Tenant> {
        let name = t.name;
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(bad_input(format!(
                "tenant `{name}`: name: use letters, digits, `-` and `_` only"
            )));
        }
        let key = |k: &'static str| {
            let name = name.clone();
            move |e: anyhow::Error| bad_input(format!("tenant `{name}`: {k}: {e:#}"))
        };
        let capped = |k: &'static str, value: u64, max: u64, max_key: &str| {
            if value > max {
                Err(bad_input(format!(
                    "tenant `{name}`: {k}: {value} bytes is over the server's {max_key} ({max} bytes)"
                )))
            } else {
                Ok(value)
            }
        };
        let mut tokens_sha256 = Vec::new();
        for digest in &t.tokens_sha256 {
            let bytes = hex::decode(digest)
                .ok()
                .filter(|b| b.len() == 32 && digest.chars().all(|c| !c.is_ascii_uppercase()))
                .ok_or_else(|| {
                    bad_input(format!(
                        "tenant `{name}`: tokens_sha256: `{digest}` is not a lowercase hex SHA-256 digest (64 characters; `host token` prints one)"
                    ))
                })?;
            tokens_sha256.push(bytes.try_into().expect("32 bytes"));
        }
        if tokens_sha256.is_empty() {
            return Err(bad_input(format!(
                "tenant `{name}`: tokens_sha256: give at least one digest (`host token` prints one)"
            )));
        }
        let defaults = Limits::default();
        let memory =
            size_or(t.memory.as_deref(), defaults.memory.min(max.memory)).map_err(key("memory"))?;
        let output = size_or(t.max_output.as_deref(), defaults.output.min(max.output))
            .map_err(key("max_output"))?;
        let timeout = duration_or(t.timeout.as_deref(), defaults.timeout.min(max.timeout))
            .map_err(key("timeout"))?;
        if timeout > max.timeout {
            return Err(bad_input(format!(
                "tenant `{name}`: timeout: {timeout:?} is over the server's max_timeout ({:?})",
                max.timeout
            )));
        }
        let max_body = size_or(t.max_body.as_deref(), max.body).map_err(key("max_body"))?;
        let record = match t.max_record.as_deref() {
            Some(text) => record_limit(text).map_err(key("max_record"))?.0,
            None => DEFAULT_RECORD,
        };
        let limits = Limits {
            memory: capped("memory", memory, max.memory, "max_memory")?,
            timeout,
            output: capped("max_output", output, max.output, "max_output")?,
            record,
        };
        let max_body = capped("max_body", max_body, max.body, "max_body")?;
        let concurrency = t.concurrency.unwrap_or(DEFAULT_CONCURRENCY);
        if concurrency == 0 {
            return Err(bad_input(format!(
                "tenant `{name}`: concurrency: must be at least 1"
            )));
        }
        if t.calls_per_minute == Some(0) {
            return Err(bad_input(format!(
                "tenant `{name}`: calls_per_minute: must be at least 1 (leave it out for no quota)"
            )));
        }
        let storage = t
            .storage
            .as_deref()
            .map(parse_size)
            .transpose()
            .map_err(key("storage"))?;
        let retention = t
            .retention
            .as_deref()
            .map(parse_period)
            .transpose()
            .map_err(key("retention"))?;
        let grants = t
            .grants
            .iter()
            .map(|g| g.parse::<Grant>())
            .collect::<Result<Vec<_>>>()
            .map_err(key("grants"))?;
        Ok(Tenant {
            name,
            tokens_sha256,
            limits,
            concurrency,
            queue: t.queue.unwrap_or(DEFAULT_QUEUE),
            calls_per_minute: t.calls_per_minute,
            max_body,
            storage,
            retention,
            grants,
        })
    }
}

/// One worker per core: calls are CPU-bound.
fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn size_or(text: Option<&str>, default: u64) -> Result<u64> {
    text.map_or(Ok(default), parse_size)
}

fn duration_or(text: Option<&str>, default: Duration) -> Result<Duration> {
    text.map_or(Ok(default), parse_duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";

    fn error(text: &str) -> String {
        format!("{:#}", Config::parse(text).unwrap_err())
    }

    #[test]
    fn errors_name_the_key() {
        let table = [
            ("listn = \"x\"", "unknown field `listn`"),
            ("listen = \"nowhere\"", "listen:"),
            ("store = \"mysql\"", "store:"),
            ("max_memory = \"lots\"", "max_memory:"),
            ("workers = 0", "workers:"),
            ("header_timeout = \"0s\"", "header_timeout:"),
            (
                "[[tenant]]\nname = \"a\"\ntokens_sha256 = [\"abc\"]",
                "tenant `a`: tokens_sha256:",
            ),
            (
                &format!(
                    "[[tenant]]\nname = \"a\"\ntokens_sha256 = [\"{DIGEST}\"]\nmemory = \"9G\""
                ),
                "tenant `a`: memory: 9663676416 bytes is over the server's max_memory",
            ),
            (
                &format!(
                    "[[tenant]]\nname = \"a\"\ntokens_sha256 = [\"{DIGEST}\"]\ntimeout = \"2s\"\ncolour = 1"
                ),
                "unknown field `colour`",
            ),
            (
                &format!(
                    "[[tenant]]\nname = \"a\"\ntokens_sha256 = [\"{DIGEST}\"]\ngrants = [\"/x\"]"
                ),
                "tenant `a`: grants:",
            ),
            (
                &format!(
                    "[[tenant]]\nname = \"a\"\ntokens_sha256 = [\"{DIGEST}\"]\nretention = \"3w\""
                ),
                "tenant `a`: retention:",
            ),
        ];
        for (text, needle) in table {
            let e = error(text);
            assert!(e.contains(needle), "{text:?}: {e}");
        }
    }

    #[test]
    fn a_full_config_resolves() {
        let config = Config::parse(&format!(
            "listen = \"127.0.0.1:9000\"\ndata = \"/srv/host\"\nworkers = 3\nmax_memory = \"2G\"\n\
             header_timeout = \"5s\"\n\
             [[tenant]]\nname = \"a\"\ntokens_sha256 = [\"{DIGEST}\"]\nconcurrency = 1\nqueue = 2\n\
             calls_per_minute = 60\nstorage = \"1G\"\nretention = \"30d\"\ntimeout = \"5s\"\n"
        ))
        .unwrap();
        assert_eq!(config.listen.port(), 9000);
        assert_eq!(config.workers, 3);
        assert_eq!(config.header_timeout, Duration::from_secs(5));
        let a = &config.tenants[0];
        assert_eq!(a.limits.memory, 1 << 30);
        assert_eq!(a.limits.timeout, Duration::from_secs(5));
        assert_eq!(a.retention, Some(Duration::from_secs(30 * 86_400)));
        assert_eq!((a.concurrency, a.queue), (1, 2));
    }
}
