//! `host serve`: deploy notebooks, call their functions over HTTP, log every call.
//!
//! One process serves many tenants: one engine and compiled interpreter, one pre-initialised
//! image per deployed bundle, shared by every request; a fresh instance per call, as
//! `host run` makes. Requests go through [`router`] to one file per resource
//! ([`bundles`], [`aliases`], [`calls`], [`runs`], [`health`]); calls run on the [`workers`]
//! pool through the [`runner`], the one file that calls the library; every call leaves a row
//! in the [`store`] and a trace on disk before it is answered.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post, put};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::error::Exit;
use crate::files::{create_private_dir, write_private};

mod aliases;
pub mod auth;
mod body;
mod bundles;
mod calls;
mod config;
mod error;
mod health;
mod runner;
mod runs;
mod storage;
mod store;
mod workers;

use auth::TenantState;
use config::Config;
use error::ApiError;
use runner::{Ready, Runner};
use store::Store;
use workers::Pool;

/// How `host serve` was started.
#[derive(Debug, Clone)]
pub struct Options {
    /// The TOML config; without one, the embedded default (one tenant, `default`).
    pub config: Option<PathBuf>,
    /// Overrides the config's `listen`.
    pub listen: Option<SocketAddr>,
    /// Overrides the config's `data`.
    pub data: Option<PathBuf>,
    /// How long calls in flight may take to finish after SIGTERM or SIGINT.
    pub grace: Duration,
    /// The Python runtime folder, as the global `--runtime`.
    pub runtime: Option<PathBuf>,
    /// The cache folder, as the global `--cache-dir`.
    pub cache_dir: Option<PathBuf>,
}

/// Everything a request handler can reach.
pub struct App {
    pub tenants: Vec<Arc<TenantState>>,
    pub store: Store,
    pub pool: Pool,
    /// Set once the interpreter is compiled: until then `/readyz` and calls answer 503.
    runner: OnceLock<Runner>,
    /// Deployed bundles by version, pre-initialised.
    ready: RwLock<HashMap<String, Arc<Ready>>>,
    data: PathBuf,
    body_timeout: Duration,
    metrics: PrometheusHandle,
    draining: AtomicBool,
}

impl App {
    /// The runner, or a 503 while the interpreter is still being compiled.
    fn runner(&self) -> Result<&Runner, ApiError> {
        self.runner.get().ok_or_else(|| {
            ApiError::unavailable("the server is starting: the runtime is being compiled")
        })
    }

    /// Refuses new work once a shutdown began.
    fn accepting(&self) -> Result<(), ApiError> {
        if self.draining.load(Ordering::Relaxed) {
            return Err(ApiError::unavailable(
                "the server is shutting down: retry on another instance or after its restart",
            ));
        }
        Ok(())
    }

    /// Where a version's bundle file is kept.
    fn bundle_path(&self, version: &str) -> PathBuf {
        self.data
            .join("bundles")
            .join(format!("{version}.bundle.json"))
    }

    /// Where a run's trace is kept.
    fn trace_path(&self, tenant: &str, run: &str) -> PathBuf {
        self.data
            .join("traces")
            .join(tenant)
            .join(format!("{run}.trace"))
    }

    /// A deployed version, ready to call: from memory, or loaded from its stored file (after
    /// a restart). Blocking: call it from a worker.
    fn ready(&self, version: &str) -> Result<Arc<Ready>> {
        if let Some(ready) = self
            .ready
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(version)
        {
            return Ok(ready.clone());
        }
        let runner = self
            .runner
            .get()
            .context("the runtime is not compiled yet")?;
        let ready = Arc::new(
            runner
                .load(&self.bundle_path(version))
                .with_context(|| format!("failed to load deployed bundle {version}"))?,
        );
        self.keep(ready.clone());
        Ok(ready)
    }

    fn keep(&self, ready: Arc<Ready>) {
        self.ready
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(ready.version().to_owned(), ready);
    }
}

/// The API: every route, in one place.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route("/v1/bundles", post(bundles::deploy).get(bundles::list))
        .route("/v1/bundles/{version}", get(bundles::show))
        .route("/v1/aliases", get(aliases::list))
        .route("/v1/aliases/{name}", put(aliases::move_alias))
        .route("/v1/aliases/{name}/history", get(aliases::history))
        .route("/v1/call/{target}/{function}", post(calls::call))
        .route("/v1/runs", get(runs::list))
        .route("/v1/runs/{id}", get(runs::show))
        .route("/v1/runs/{id}/trace", get(runs::trace))
        // Bodies are read by each handler, under its tenant's own `max_body`.
        .layer(DefaultBodyLimit::disable())
        .with_state(app)
}

/// Runs the server until SIGTERM or SIGINT, then drains it.
pub fn serve(options: &Options) -> Result<()> {
    let mut config = match &options.config {
        Some(path) => Config::read(path)?,
        None => Config::parse("")?,
    };
    if let Some(listen) = options.listen {
        config.listen = listen;
    }
    if let Some(data) = &options.data {
        config.data = data.clone();
    }
    Runner::check_runtime(options.runtime.as_deref())?;
    create_private_dir(&config.data)?;
    if config.tenants.is_empty() {
        if options.config.is_some() {
            return Err(crate::error::bad_input(
                "the config has no [[tenant]]: add one (`host token` prints its tokens_sha256 line)",
            ));
        }
        config
            .tenants
            .push(Config::default_tenant(default_token(&config.data)?)?);
    }
    let store = Store::open(&config.data.join("host.db"))?;
    let interrupted = store.mark_interrupted()?;
    if interrupted > 0 {
        eprintln!(
            "host: {interrupted} call(s) were cut short by the last stop: marked interrupted"
        );
    }
    let metrics = PrometheusBuilder::new()
        .set_buckets(&[
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ])
        .context("histogram buckets")?
        .install_recorder()
        .context("failed to install the metrics recorder")?;
    let places: Vec<(usize, usize)> = config
        .tenants
        .iter()
        .map(|t| (t.concurrency, t.queue))
        .collect();
    let app = Arc::new(App {
        pool: Pool::new(config.workers, &places),
        tenants: config
            .tenants
            .into_iter()
            .enumerate()
            .map(|(i, t)| Arc::new(TenantState::new(i, t)))
            .collect(),
        store,
        runner: OnceLock::new(),
        ready: RwLock::new(HashMap::new()),
        data: config.data.clone(),
        body_timeout: config.body_timeout,
        metrics,
        draining: AtomicBool::new(false),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    runtime.block_on(run(app, config.listen, options))
}

async fn run(app: Arc<App>, listen: SocketAddr, options: &Options) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("failed to listen on {listen}"))?;
    // Tests and scripts read the real address (for port 0) from this line.
    eprintln!("host: listening on http://{}", listener.local_addr()?);
    let warm = app.clone();
    let (runtime, cache_dir) = (options.runtime.clone(), options.cache_dir.clone());
    std::thread::spawn(move || {
        if let Err(e) = start_runner(&warm, runtime.as_deref(), cache_dir) {
            eprintln!("host: {e:#}");
            let exit = if runner::is_user_error(&e) {
                Exit::Usage
            } else {
                Exit::Internal
            };
            std::process::exit(exit as i32);
        }
    });
    let stop = Arc::new(tokio::sync::Notify::new());
    let signalled = stop.clone();
    let draining = app.clone();
    let server = axum::serve(listener, router(app.clone())).with_graceful_shutdown(async move {
        shutdown_signal().await;
        draining.draining.store(true, Ordering::Relaxed);
        let (running, queued) = draining.pool.load();
        eprintln!("host: shutting down: {running} call(s) running, {queued} queued");
        signalled.notify_one();
        // Still listening until the calls in flight are done: new requests get a 503 that
        // says why (and `/readyz` turns 503, so a load balancer moves on) rather than a
        // refused connection; the grace period below bounds the wait.
        while draining.pool.load() != (0, 0) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let grace = options.grace;
    let server = std::future::IntoFuture::into_future(server);
    tokio::select! {
        served = server => served.context("the server failed")?,
        () = async { stop.notified().await; tokio::time::sleep(grace).await } => {
            eprintln!("host: the grace period ({grace:?}) is over: stopping with calls unfinished");
        }
    }
    // Calls still running are cut short by this exit: their rows say so.
    let cut = app.store.mark_interrupted()?;
    if cut > 0 {
        eprintln!("host: {cut} call(s) marked interrupted");
    }
    app.store.checkpoint()?;
    eprintln!("host: stopped");
    Ok(())
}

/// Compiles the interpreter and loads every deployed bundle, then marks the server ready.
fn start_runner(app: &App, runtime: Option<&Path>, cache_dir: Option<PathBuf>) -> Result<()> {
    let runner = Runner::start(runtime, cache_dir, auth::widest_limits(&app.tenants))?;
    for version in app.store.versions()? {
        match runner.load(&app.bundle_path(&version)) {
            Ok(ready) => app.keep(Arc::new(ready)),
            // Left to the first call of that version, which reports what is wrong.
            Err(e) => eprintln!("host: warning: bundle {version} not loaded: {e:#}"),
        }
    }
    let _ = app.runner.set(runner);
    eprintln!("host: ready");
    Ok(())
}

/// The default tenant's token: made at the first start, written owner-only to
/// `DATA/default.token` and printed once; later starts read its digest from there.
fn default_token(data: &Path) -> Result<[u8; 32]> {
    let path = data.join("default.token");
    match std::fs::read_to_string(&path) {
        Ok(token) => Ok(auth::digest(token.trim())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token = auth::new_token()?;
            write_private(&path, format!("{token}\n").as_bytes())?;
            eprintln!(
                "host: the `default` tenant's token (also in {}, readable by you only):\n{token}",
                path.display()
            );
            Ok(auth::digest(&token))
        }
        Err(e) => Err(e).with_context(|| format!("failed to read `{}`", path.display())),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("failed to listen for SIGTERM");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
