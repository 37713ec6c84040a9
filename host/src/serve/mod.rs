//! `host serve`: deploy notebooks, call their functions over HTTP, log every call.
//!
//! One process serves many tenants: one engine and compiled interpreter, one pre-initialised
//! image per deployed bundle, shared by every request; a fresh instance per call, as
//! `host run` makes. Requests go through [`router`] to one file per resource
//! ([`bundles`], [`aliases`], [`calls`], [`runs`], [`evaluations`], [`health`]; [`ui`] the
//! pages for people); calls (and evaluations' replays, between them) run on the [`workers`]
//! pool through the [`runner`], the one file that calls the library; every call leaves a row
//! and its trace in the [`store`] before it is answered.
//!
//! Several replicas may share one PostgreSQL store: each reads aliases and bundles from it
//! on every call (so a move or a deploy through one is in effect on all at once), loads
//! bundles deployed elsewhere in the background ([`App::follow`]), and beats in the
//! `replicas` table so the others can mark its unfinished runs when it dies.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post, put};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::engine::write_cache_file;
use crate::error::Exit;
use crate::files::{create_private_dir, write_private};

mod aliases;
pub mod auth;
mod body;
mod bundles;
mod calls;
mod config;
mod connections;
mod detached;
mod error;
mod evaluations;
mod health;
mod runner;
mod runs;
mod storage;
pub mod store;
mod ui;
mod workers;

use auth::TenantState;
use config::Config;
pub use config::check_replica;
use error::ApiError;
use runner::{Ready, Runner};
pub use store::Location;
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
    /// Overrides the config's `store`.
    pub store: Option<Location>,
    /// Overrides the config's `replica`.
    pub replica: Option<String>,
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
    /// This server's name in the runs it serves.
    pub replica: String,
    /// The async runtime, for the workers' (plain threads') store calls.
    rt: tokio::runtime::Handle,
    /// Runs whose rows could not be completed because the store failed: marked when it
    /// answers again, so no row stays unfinished while its replica lives on.
    unfinished: std::sync::Mutex<Vec<String>>,
    /// Set once the interpreter is compiled: until then `/readyz` and calls answer 503.
    runner: OnceLock<Runner>,
    /// Deployed bundles by version, pre-initialised.
    ready: RwLock<HashMap<String, Arc<Ready>>>,
    data: PathBuf,
    body_timeout: Duration,
    metrics: PrometheusHandle,
    draining: AtomicBool,
    /// Calls taken to a worker whose rows are not complete yet: a stop waits for them too,
    /// as a worker frees its place before the row is written (see `calls`).
    in_flight: AtomicUsize,
}

/// One call counted in [`App::in_flight`] while it lives.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
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

    /// Where this replica keeps its copy of a version's bundle file (the store holds the
    /// original).
    fn bundle_path(&self, version: &str) -> PathBuf {
        self.data
            .join("bundles")
            .join(format!("{version}.bundle.json"))
    }

    /// Whether a version is loaded here.
    fn is_ready(&self, version: &str) -> bool {
        self.ready
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(version)
    }

    /// Copies a version's bundle file from the store to this replica's folder, unless it is
    /// there: a version deployed through another replica.
    async fn fetch(&self, version: &str) -> Result<()> {
        let path = self.bundle_path(version);
        if self.is_ready(version) || path.exists() {
            return Ok(());
        }
        let file = self
            .store
            .bundle_file(version)
            .await?
            .with_context(|| format!("the store has no bundle file for version {version}"))?;
        write_cache_file(&path, &file)
    }

    /// Notes a run whose row the store failed to complete.
    fn unfinished(&self, id: &str) {
        self.unfinished
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(id.to_owned());
    }

    /// Counts a call in flight until the guard is dropped.
    fn in_flight(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(&self.in_flight)
    }

    /// Runs a store call from a worker thread (not an async one).
    fn block_on<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self.rt.block_on(f)
    }

    /// A deployed version, ready to call: from memory, or loaded from its file (after a
    /// restart, or when another replica deployed it; [`App::fetch`] brings the file).
    /// Blocking: call it from a worker.
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
        .route("/v1/aliases/{name}/compare", get(aliases::compare))
        .route("/v1/call/{target}/{function}", post(calls::call))
        .route("/v1/runs", get(runs::list))
        .route("/v1/runs/{id}", get(runs::show))
        .route("/v1/runs/{id}/trace", get(runs::trace))
        .route(
            "/v1/evaluations",
            post(evaluations::create).get(evaluations::list),
        )
        .route("/v1/evaluations/{id}", get(evaluations::show))
        // The web UI: pages for people, authenticated by a cookie holding the same tokens.
        .route("/ui", get(ui::home))
        .route("/ui/", get(ui::home))
        .route("/ui/login", get(ui::login_form).post(ui::login))
        .route("/ui/logout", post(ui::logout))
        .route("/ui/static/ui.css", get(ui::style))
        .route("/ui/static/ui.js", get(ui::script))
        .route("/ui/runs", get(ui::runs_page))
        .route("/ui/runs/{id}", get(ui::run_page))
        .route("/ui/runs/{id}/trace", get(ui::trace))
        .route("/ui/aliases", get(ui::aliases_page))
        .route("/ui/evaluations", get(ui::evaluations_page))
        .route("/ui/evaluations/{id}", get(ui::evaluation_page))
        .route(
            "/ui/evaluations/{id}/runs/{run}",
            get(ui::evaluation_run_page),
        )
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
    if let Some(store) = &options.store {
        config.store = store.clone();
    }
    if let Some(replica) = &options.replica {
        config.replica = Some(replica.clone());
    }
    let metrics = PrometheusBuilder::new()
        .set_buckets(&[
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ])
        .context("histogram buckets")?
        .install_recorder()
        .context("failed to install the metrics recorder")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    runtime.block_on(async {
        let store = Store::open(&config.store, &config.data).await?;
        connections::raise_open_files_limit();
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("failed to listen on {}", config.listen))?;
        let address = listener.local_addr()?;
        let replica = match config.replica.take() {
            Some(name) => name,
            // The configured port, not the bound one: a server restarted on port 0 is still
            // the same replica, and marks its own unfinished runs.
            None => format!("{}:{}", hostname(), config.listen.port()),
        };
        let interrupted = store.mark_interrupted(&replica).await?;
        // Beat once before taking any call: a replica that dies before its first periodic
        // beat still has a row, so the others can mark the calls it leaves unfinished.
        store.heartbeat(&replica, SILENT).await?;
        if interrupted > 0 {
            eprintln!(
                "host: {interrupted} call(s) were cut short by the last stop: marked interrupted"
            );
        }
        let failed = store.fail_evaluations(&replica).await?;
        if failed > 0 {
            eprintln!(
                "host: {failed} evaluation(s) were cut short by the last stop: marked failed"
            );
        }
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
            replica,
            rt: tokio::runtime::Handle::current(),
            unfinished: std::sync::Mutex::new(Vec::new()),
            runner: OnceLock::new(),
            ready: RwLock::new(HashMap::new()),
            data: config.data.clone(),
            body_timeout: config.body_timeout,
            metrics,
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
        });
        // Tests and scripts read the real address (for port 0) from this line.
        eprintln!(
            "host: replica {} on the {} store",
            app.replica,
            app.store.kind()
        );
        eprintln!("host: listening on http://{address}");
        run(app, listener, config.header_timeout, options).await
    })
}

/// How often a replica says it is alive, and how long the others wait after its last word
/// before they mark its unfinished runs interrupted.
const HEARTBEAT: Duration = Duration::from_secs(2);
const SILENT: Duration = Duration::from_secs(15);
/// The error of a run whose end the store could not record.
const STORE_FAILED: &str =
    "the run store failed as the call ended: the client was answered 503, and its trace is lost";

async fn run(
    app: Arc<App>,
    listener: tokio::net::TcpListener,
    header_timeout: Duration,
    options: &Options,
) -> Result<()> {
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
    tokio::spawn(app.clone().follow());
    let stop = Arc::new(tokio::sync::Notify::new());
    let signalled = stop.clone();
    let draining = app.clone();
    let stopping = async move {
        shutdown_signal().await;
        draining.draining.store(true, Ordering::Relaxed);
        let (running, queued) = draining.pool.load();
        eprintln!("host: shutting down: {running} call(s) running, {queued} queued");
        signalled.notify_one();
        // Still listening until the calls in flight are done: new requests get a 503 that
        // says why (and `/readyz` turns 503, so a load balancer moves on) rather than a
        // refused connection; the grace period below bounds the wait.
        while draining.pool.load() != (0, 0) || draining.in_flight.load(Ordering::Acquire) > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let server = connections::serve(listener, router(app.clone()), header_timeout, stopping);
    let grace = options.grace;
    tokio::select! {
        () = server => {}
        () = async { stop.notified().await; tokio::time::sleep(grace).await } => {
            eprintln!("host: the grace period ({grace:?}) is over: stopping with calls unfinished");
        }
    }
    // Calls still running are cut short by this exit: their rows say so.
    let cut = app.store.mark_interrupted(&app.replica).await?;
    if cut > 0 {
        eprintln!("host: {cut} call(s) marked interrupted");
    }
    let failed = app.store.fail_evaluations(&app.replica).await?;
    if failed > 0 {
        eprintln!("host: {failed} evaluation(s) cut short: marked failed");
    }
    app.store.close().await?;
    eprintln!("host: stopped");
    Ok(())
}

impl App {
    /// What a replica does in the background, every [`HEARTBEAT`]: says it is alive (and
    /// marks the unfinished runs of replicas that stopped saying so), prunes the traces past
    /// their tenant's retention (see `storage`), and loads the versions other replicas
    /// deployed, so their first call here finds them pre-initialised. A
    /// failing store is reported once per outage and tried again at the next beat.
    async fn follow(self: Arc<App>) {
        let mut failing = false;
        // Versions that would not load are left to their first call, which says why.
        let mut failed = std::collections::HashSet::new();
        loop {
            tokio::time::sleep(HEARTBEAT).await;
            let beat = async {
                let marked = self.store.heartbeat(&self.replica, SILENT).await?;
                if marked > 0 {
                    eprintln!(
                        "host: {marked} call(s) or evaluation(s) of a stopped replica marked ended"
                    );
                }
                let unfinished =
                    std::mem::take(&mut *self.unfinished.lock().unwrap_or_else(|e| e.into_inner()));
                for (i, id) in unfinished.iter().enumerate() {
                    if let Err(e) = self.store.interrupt(id, STORE_FAILED).await {
                        self.unfinished
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .extend(unfinished[i..].iter().cloned());
                        return Err(e);
                    }
                }
                self.apply_retention().await?;
                if self.runner.get().is_some() {
                    for version in self.store.versions().await? {
                        if !self.is_ready(&version) && !failed.contains(&version) {
                            self.fetch(&version).await?;
                            let (app, v) = (self.clone(), version.clone());
                            let loaded = tokio::task::spawn_blocking(move || app.ready(&v)).await;
                            if let Ok(Err(e)) = loaded {
                                eprintln!("host: warning: {e:#}");
                                failed.insert(version);
                            }
                        }
                    }
                }
                anyhow::Ok(())
            };
            match beat.await {
                Ok(()) if failing => {
                    eprintln!("host: the run store answers again");
                    failing = false;
                }
                Err(e) if !failing => {
                    eprintln!("host: the run store is failing: {e:#}");
                    failing = true;
                }
                _ => {}
            }
        }
    }
}

/// This machine's name, for the default replica name.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty() && check_replica(h).is_ok())
        .unwrap_or_else(|| "host".to_owned())
}

/// Compiles the interpreter and loads every deployed bundle, then marks the server ready.
fn start_runner(app: &App, runtime: Option<&Path>, cache_dir: Option<PathBuf>) -> Result<()> {
    let runner = Runner::start(runtime, cache_dir, auth::widest_limits(&app.tenants))?;
    for version in app.block_on(app.store.versions())? {
        let loaded = app
            .block_on(app.fetch(&version))
            .and_then(|()| runner.load(&app.bundle_path(&version)));
        match loaded {
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
