//! `host serve`, `host token`, and the client side: `host runs list|pull`.

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::GlobalOptions;
use crate::error::{Exit, bad_input};
use crate::files::write_private;
use crate::policy::parse_duration;
use crate::serve;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// A TOML config (see README, "Serving") [default: one tenant, `default`, on 127.0.0.1:8080].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The address to listen on, overriding the config's `listen`.
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<SocketAddr>,
    /// The data folder (run store, bundles, traces), overriding the config's `data`.
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Where runs, bundles and traces are kept, overriding the config's `store`: `sqlite`
    /// (host.db in the data folder) or a `postgres://` URL shared by several replicas.
    #[arg(long, value_name = "sqlite|URL", value_parser = |s: &str| serve::Location::parse(s))]
    pub store: Option<serve::Location>,
    /// This replica's name in the runs it serves, overriding the config's `replica`
    /// [default: HOSTNAME:PORT].
    #[arg(long, value_name = "NAME", value_parser = |s: &str| serve::check_replica(s).map(|()| s.to_owned()))]
    pub replica: Option<String>,
    /// On SIGTERM or SIGINT, how long calls in flight may take to finish.
    #[arg(long, value_name = "DURATION", default_value = "30s")]
    pub grace: String,
}

#[derive(Debug, Args)]
pub struct RunsArgs {
    #[command(subcommand)]
    pub command: RunsCommand,
}

#[derive(Debug, Subcommand)]
pub enum RunsCommand {
    /// List a server's runs, newest first, one JSON object a line.
    List(ListArgs),
    /// Download a run's trace, checked against its row's trace_sha256, for `host replay`.
    Pull(PullArgs),
}

/// Which server, and the token to use there.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The server's URL.
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// A file holding the token (`host serve` writes the default tenant's to
    /// host-data/default.token).
    #[arg(long, value_name = "FILE", default_value = "host-data/default.token")]
    pub token_file: PathBuf,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Only runs of this function.
    #[arg(long)]
    pub function: Option<String>,
    /// Only runs called through this alias.
    #[arg(long)]
    pub alias: Option<String>,
    /// Only runs of this bundle version.
    #[arg(long)]
    pub version: Option<String>,
    /// Only runs with this outcome (returned, raised, limit, bad_input, internal, interrupted,
    /// duplicate).
    #[arg(long)]
    pub outcome: Option<String>,
    /// Only runs received at or after this time (RFC 3339: 2026-12-07T09:30:00Z, with an
    /// offset, or a date) or in this period back from now (24h, 30m, 7d).
    #[arg(long)]
    pub since: Option<String>,
    /// At most this many runs.
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// The run's id (its `Host-Run` header).
    pub run: String,
    #[command(flatten)]
    pub client: ClientArgs,
    /// Where to write the trace.
    #[arg(long, short = 'o', value_name = "FILE", default_value = "call.trace")]
    pub output: PathBuf,
}

pub fn serve(global: &GlobalOptions, args: &ServeArgs) -> Result<Exit> {
    let options = serve::Options {
        config: args.config.clone(),
        listen: args.listen,
        data: args.data.clone(),
        store: args.store.clone(),
        replica: args.replica.clone(),
        grace: parse_duration(&args.grace).context("--grace")?,
        runtime: global.runtime.clone(),
        cache_dir: global.cache_dir.clone(),
    };
    serve::serve(&options)?;
    Ok(Exit::Success)
}

/// Prints a new token and the config line that lets it in.
pub fn token() -> Result<Exit> {
    let token = serve::auth::new_token()?;
    println!("{token}");
    eprintln!(
        "host: give the token to the client; put its digest in the tenant's table:\n\
         tokens_sha256 = [\"{}\"]",
        hex::encode(serve::auth::digest(&token))
    );
    Ok(Exit::Success)
}

pub fn runs(args: &RunsArgs) -> Result<Exit> {
    match &args.command {
        RunsCommand::List(list) => {
            let mut query = vec![("limit", list.limit.to_string())];
            for (key, value) in [
                ("function", &list.function),
                ("alias", &list.alias),
                ("version", &list.version),
                ("outcome", &list.outcome),
                ("since", &list.since),
            ] {
                if let Some(v) = value {
                    query.push((key, v.clone()));
                }
            }
            let page = Client::new(&list.client)?.get_json("/v1/runs", &query)?;
            for run in page["runs"].as_array().into_iter().flatten() {
                println!("{run}");
            }
        }
        RunsCommand::Pull(pull) => {
            let client = Client::new(&pull.client)?;
            let run = client.get_json(&format!("/v1/runs/{}", pull.run), &[])?;
            let trace = client.trace(&run)?;
            write_private(&pull.output, &trace)?;
            eprintln!(
                "host: run {} ({} of bundle {}, {}) written to {}: `host replay {}` re-runs it",
                pull.run,
                run["function"].as_str().unwrap_or(""),
                run["bundle_version"].as_str().unwrap_or(""),
                run["outcome"].as_str().unwrap_or(""),
                pull.output.display(),
                pull.output.display()
            );
        }
    }
    Ok(Exit::Success)
}

/// A server and the token to use there, read once; its connections are kept for the next
/// request (`host evaluate` pulls hundreds of traces).
pub(super) struct Client {
    agent: ureq::Agent,
    server: String,
    token: String,
}

impl Client {
    pub(super) fn new(args: &ClientArgs) -> Result<Client> {
        let token = std::fs::read_to_string(&args.token_file).map_err(|e| {
            bad_input(format!(
                "cannot read token file `{}`: {e}",
                args.token_file.display()
            ))
        })?;
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .new_agent();
        Ok(Client {
            agent,
            server: args.server.trim_end_matches('/').to_owned(),
            token: token.trim().to_owned(),
        })
    }

    /// A GET with the token; the body of a 2xx answer, else the server's error message.
    pub(super) fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Vec<u8>> {
        let url = format!("{}{path}", self.server);
        let mut request = self
            .agent
            .get(&url)
            .header("Authorization", format!("Bearer {}", self.token));
        for (key, value) in query {
            request = request.query(*key, value);
        }
        read_answer(&url, request.call())
    }

    /// A POST of `body` with the token, the answer parsed as JSON; the server's error
    /// message unless it is 2xx.
    pub(super) fn post_json(
        &self,
        path: &str,
        query: &[(&str, String)],
        body: &[u8],
    ) -> Result<Value> {
        let url = format!("{}{path}", self.server);
        let mut request = self
            .agent
            .post(&url)
            .header("Authorization", format!("Bearer {}", self.token));
        for (key, value) in query {
            request = request.query(*key, value);
        }
        let answer = read_answer(&url, request.send(body))?;
        serde_json::from_slice(&answer)
            .with_context(|| format!("the server's answer to {path} is not JSON"))
    }

    /// [`Client::get`], the answer parsed as JSON.
    pub(super) fn get_json(&self, path: &str, query: &[(&str, String)]) -> Result<Value> {
        serde_json::from_slice(&self.get(path, query)?)
            .with_context(|| format!("the server's answer to {path} is not JSON"))
    }

    /// The trace file of `run` (a row as `GET /v1/runs` shows it), checked against the row's
    /// `trace_sha256`.
    pub(super) fn trace(&self, run: &Value) -> Result<Vec<u8>> {
        let id = run["id"].as_str().unwrap_or_default();
        let expected = run["trace_sha256"]
            .as_str()
            .ok_or_else(|| bad_input(format!("run {id} has no trace")))?;
        let trace = self.get(&format!("/v1/runs/{id}/trace"), &[])?;
        let actual = hex::encode(Sha256::digest(&trace));
        if actual != expected {
            anyhow::bail!(
                "the trace of run {id} does not match its row: sha256 {actual}, the row says {expected}"
            );
        }
        Ok(trace)
    }
}

/// The body of a 2xx answer to a request to `url`, else the server's error message.
fn read_answer(
    url: &str,
    response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
) -> Result<Vec<u8>> {
    let mut response =
        response.map_err(|e| bad_input(format!("cannot reach the server at {url}: {e}")))?;
    let status = response.status();
    let mut body = Vec::new();
    response
        .body_mut()
        .as_reader()
        .read_to_end(&mut body)
        .with_context(|| format!("failed to read the answer of {url}"))?;
    if !status.is_success() {
        let message = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        return Err(bad_input(format!("{url}: {status}: {message}")));
    }
    Ok(body)
}
