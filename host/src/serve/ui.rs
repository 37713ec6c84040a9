//! `/ui/`: a small web UI over what the API serves, for a person rather than a script: the
//! runs (filtered, paged, each with its input, result or traceback, and its trace), the
//! aliases with every move, and the evaluations with the runs a candidate changes.
//!
//! Plain server-rendered HTML ([`html`]), a stylesheet and a few lines of script (both
//! served from here, so the Content-Security-Policy allows no inline code and no other
//! origin). A tenant logs in with its API token: it is kept in a cookie (HttpOnly, so no
//! script reads it; SameSite=Strict, so no other site's page makes the browser send it;
//! Path=/ui, so the API never takes it), and every page checks it with [`auth::find`], the
//! API's own comparison. Tokens never go in a URL, where logs would keep them. The pages only
//! read, so the cookie cannot be used to change anything.
//!
//! A tenant sees only its own data: every read is by tenant, and another tenant's run or
//! evaluation is a 404, as in the API. Everything that comes from users or guests (results,
//! tracebacks, notebook names, labels, function names, alias names) is written through
//! [`html::Esc`].

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::Value;

use super::auth::{self, TenantState};
use super::error::ApiError;
use super::runner::{Recorded, recorded_call, traceback};
use super::store::{
    BundleRow, EvaluationRow, EvaluationRunRow, OUTCOMES, RunFilter, RunRow, parse_outcome,
    parse_run_id,
};
use super::{App, body, runs};

mod html;

use html::{Esc, encode, page, query};

/// The cookie that holds the token.
const COOKIE: &str = "host_token";
/// Runs on a page of the runs list.
const PAGE_SIZE: u32 = 50;
/// The largest login form read: a token and its field name.
const MAX_LOGIN_BODY: u64 = 4096;
/// Traces larger than this are not decoded to show a run's arguments: a page view should not
/// inflate a gigabyte. The page offers the trace's download instead.
const DECODE_CAP: u64 = 64 << 20;
/// How much of a value's JSON a page shows; the trace has the whole of it.
const SHOWN: usize = 64 << 10;
/// The evaluation classes shown run by run, in the order the page shows them (`same` runs
/// are only counted and listed).
const CLASSES: [(&str, &str); 4] = [
    ("changed", "Changed"),
    ("newly_failing", "Newly failing"),
    ("fixed", "Fixed"),
    ("not_replayable", "Not replayable"),
];

const STYLE: &str = include_str!("ui/ui.css");
const SCRIPT: &str = include_str!("ui/ui.js");

/// No script but ours, no style but ours, no frame, no form posting elsewhere.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The tenant whose token the request's cookie holds.
pub struct Viewer(Arc<TenantState>);

impl FromRequestParts<Arc<App>> for Viewer {
    type Rejection = UiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Viewer, UiError> {
        let token = cookie(&parts.headers, COOKIE).ok_or(UiError::Login)?;
        auth::find(&app.tenants, token.trim())
            .map(Viewer)
            .ok_or(UiError::Login)
    }
}

/// A cookie's value, decoded, from every `Cookie` header.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .and_then(|(_, value)| html::decode(value))
}

/// A failed page: the API's failure (its status and message), shown as HTML; or no valid
/// cookie, which sends the browser to the login page.
pub enum UiError {
    Login,
    Api(ApiError),
}

impl From<ApiError> for UiError {
    fn from(e: ApiError) -> UiError {
        UiError::Api(e)
    }
}

impl From<anyhow::Error> for UiError {
    fn from(e: anyhow::Error) -> UiError {
        UiError::Api(e.into())
    }
}

impl IntoResponse for UiError {
    fn into_response(self) -> Response {
        match self {
            UiError::Login => redirect("/ui/login", None),
            UiError::Api(e) => {
                let title = e.status.canonical_reason().unwrap_or("Error");
                let body = format!(
                    r#"<h1>{}</h1><p class="error">{}</p><p><a href="/ui/runs">Back to the runs</a></p>"#,
                    Esc(title),
                    Esc(e.message())
                );
                respond(e.status, page(title, None, None, &body))
            }
        }
    }
}

type Page = Result<Response, UiError>;

/// An HTML answer, with the headers every page has: the policy above, no caching (pages
/// show a tenant's data), no sniffing, no referrer (run ids stay on this site).
fn respond(status: StatusCode, html: String) -> Response {
    let mut response = (status, html).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// A 303 to `to` (a path of ours), setting a cookie when given.
fn redirect(to: &'static str, set_cookie: Option<String>) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    let headers = response.headers_mut();
    headers.insert(header::LOCATION, HeaderValue::from_static(to));
    if let Some(value) = set_cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        headers.insert(header::SET_COOKIE, value);
    }
    response
}

/// `GET /ui/static/ui.css`.
pub async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

/// `GET /ui/static/ui.js`.
pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

fn asset(kind: &'static str, text: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        text,
    )
        .into_response()
}

/// `GET /ui/`: the runs.
pub async fn home() -> Response {
    redirect("/ui/runs", None)
}

/// `GET /ui/login`: the form.
pub async fn login_form() -> Response {
    respond(StatusCode::OK, login_page(None))
}

fn login_page(error: Option<&str>) -> String {
    let error = error
        .map(|e| format!(r#"<p class="error">{}</p>"#, Esc(e)))
        .unwrap_or_default();
    let body = format!(
        r#"<h1>Log in</h1>{error}
<form class="login" method="post" action="/ui/login">
<label>Tenant token <input type="password" name="token" autocomplete="off" required autofocus></label>
<button type="submit">Log in</button>
</form>
<p class="hint">The token you give the API as <code>Authorization: Bearer</code> (the <code>default</code> tenant's is in <code>DATA/default.token</code>). It is kept in a cookie for this site only.</p>"#
    );
    page("Log in", None, None, &body)
}

/// `POST /ui/login`, a form with `token`: a token some tenant has sets the cookie and goes
/// to the runs; another shows the form again, 401.
pub async fn login(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    request: Body,
) -> Result<Response, UiError> {
    same_origin(&headers)?;
    let form = body::read(request, MAX_LOGIN_BODY, app.body_timeout).await?;
    let token = std::str::from_utf8(&form)
        .ok()
        .and_then(|form| {
            form.split('&')
                .filter_map(|pair| pair.split_once('='))
                .find(|(key, _)| *key == "token")
        })
        .and_then(|(_, value)| html::decode(value))
        .map(|t| t.trim().to_owned())
        .unwrap_or_default();
    if auth::find(&app.tenants, &token).is_none() {
        return Ok(respond(
            StatusCode::UNAUTHORIZED,
            login_page(Some("No tenant has this token.")),
        ));
    }
    // Secure when a TLS proxy in front says the browser came over HTTPS; on plain HTTP
    // (loopback, a test) a Secure cookie would never come back.
    let secure = headers
        .get("x-forwarded-proto")
        .is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"https"));
    let cookie = format!(
        "{COOKIE}={}; Path=/ui; HttpOnly; SameSite=Strict{}",
        encode(&token),
        if secure { "; Secure" } else { "" }
    );
    Ok(redirect("/ui/runs", Some(cookie)))
}

/// `POST /ui/logout`: forgets the cookie.
pub async fn logout(headers: HeaderMap) -> Result<Response, UiError> {
    same_origin(&headers)?;
    let cookie = format!("{COOKIE}=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0");
    Ok(redirect("/ui/login", Some(cookie)))
}

/// Refuses a form posted from another site's page (which SameSite cannot stop for the
/// login itself: it needs no cookie), when the browser says where it came from.
fn same_origin(headers: &HeaderMap) -> Result<(), UiError> {
    match headers.get("sec-fetch-site").map(HeaderValue::as_bytes) {
        None | Some(b"same-origin" | b"none") => Ok(()),
        Some(_) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this form is posted from the UI's own pages only",
        )
        .into()),
    }
}

/// The runs page's filters: a GET form, so a filtered page has a URL to share. An empty
/// field means no filter.
#[derive(Debug, Default, Deserialize)]
pub struct RunsQuery {
    function: Option<String>,
    version: Option<String>,
    outcome: Option<String>,
    alias: Option<String>,
    after: Option<String>,
}

impl RunsQuery {
    /// The filter, its outcome and page marker checked as the API checks them.
    fn filter(self) -> Result<RunFilter, ApiError> {
        let given = |v: Option<String>| v.filter(|v| !v.trim().is_empty());
        let checked = |v: Option<String>, check: fn(String) -> Result<String, String>| {
            given(v).map(check).transpose().map_err(ApiError::bad_input)
        };
        Ok(RunFilter {
            function: given(self.function),
            alias: given(self.alias),
            version: given(self.version),
            outcome: checked(self.outcome, parse_outcome)?,
            side: None,
            since: None,
            limit: Some(PAGE_SIZE),
            after: checked(self.after, parse_run_id)?,
        })
    }
}

/// `GET /ui/runs?function=&version=&outcome=&alias=&after=`: newest first, a page at a time.
pub async fn runs_page(
    State(app): State<Arc<App>>,
    Viewer(tenant): Viewer,
    filter: Result<Query<RunsQuery>, axum::extract::rejection::QueryRejection>,
) -> Page {
    let Query(filter) = filter.map_err(|e| ApiError::bad_input(e.body_text()))?;
    let filter = filter.filter()?;
    let runs = app.store.runs(tenant.name(), &filter).await?;
    let bundles = app.store.bundles(tenant.name()).await?;
    let labels = labels(&bundles);

    let mut functions: Vec<&str> = bundles
        .iter()
        .flat_map(|b| b.functions.iter().map(String::as_str))
        .collect();
    functions.sort_unstable();
    functions.dedup();
    let function_options = options(
        functions.iter().map(|f| (f.to_string(), f.to_string())),
        filter.function.as_deref(),
    );
    let version_options = options(
        bundles
            .iter()
            .map(|b| (b.version.clone(), version_text(&b.version, &labels))),
        filter.version.as_deref(),
    );
    let outcome_options = options(
        OUTCOMES.iter().map(|o| (o.to_string(), o.to_string())),
        filter.outcome.as_deref(),
    );
    let alias_field = filter
        .alias
        .as_deref()
        .map(|a| format!(r#"<input type="hidden" name="alias" value="{}">"#, Esc(a)))
        .unwrap_or_default();
    let mut body = format!(
        r#"<h1>Runs</h1>
<form class="filters" method="get" action="/ui/runs">{alias_field}
<label>Function <select name="function" data-autosubmit><option value="">any</option>{function_options}</select></label>
<label>Version <select name="version" data-autosubmit><option value="">any</option>{version_options}</select></label>
<label>Outcome <select name="outcome" data-autosubmit><option value="">any</option>{outcome_options}</select></label>
<button type="submit">Filter</button> <a href="/ui/runs">Clear</a>
</form>"#
    );
    if let Some(alias) = &filter.alias {
        let _ = write!(
            body,
            r#"<p>Called through alias <b>{}</b>.</p>"#,
            Esc(alias)
        );
    }
    if runs.is_empty() {
        body.push_str(r#"<p class="empty">No runs.</p>"#);
    } else {
        body.push_str(
            r#"<table id="runs"><thead><tr><th>Run</th><th>Received</th><th>Function</th><th>Version</th><th>Alias</th><th>Side</th><th>Outcome</th><th class="num">Duration</th><th>Replica</th></tr></thead><tbody>"#,
        );
        for run in &runs {
            let _ = write!(
                body,
                r#"<tr><td><a class="run" href="/ui/runs/{id}"><code>{short}</code></a></td><td>{received}</td><td>{function}</td><td>{version}</td><td>{alias}</td><td>{side}</td><td>{outcome}</td><td class="num">{duration}</td><td>{replica}</td></tr>"#,
                id = Esc(encode(&run.id)),
                short = Esc(&run.id),
                received = Esc(&run.received_at),
                function = Esc(&run.function),
                version = version_cell(run.bundle_version.as_deref(), &labels),
                alias = Esc(run.alias.as_deref().unwrap_or("")),
                side = Esc(run.side.as_deref().unwrap_or("")),
                outcome = outcome_badge(run.outcome.as_deref()),
                duration = Esc(duration(run.duration_ms)),
                replica = Esc(run.replica.as_deref().unwrap_or("")),
            );
        }
        body.push_str("</tbody></table>");
    }
    let mut paging = String::new();
    if filter.after.is_some() {
        let newest = query(&[
            ("function", filter.function.as_deref()),
            ("version", filter.version.as_deref()),
            ("outcome", filter.outcome.as_deref()),
            ("alias", filter.alias.as_deref()),
        ]);
        let _ = write!(paging, r#"<a href="/ui/runs{}">Newest</a>"#, Esc(newest));
    }
    if runs.len() == PAGE_SIZE as usize
        && let Some(last) = runs.last()
    {
        let older = query(&[
            ("function", filter.function.as_deref()),
            ("version", filter.version.as_deref()),
            ("outcome", filter.outcome.as_deref()),
            ("alias", filter.alias.as_deref()),
            ("after", Some(&last.id)),
        ]);
        let _ = write!(
            paging,
            r#"<a class="older" href="/ui/runs{}">Older</a>"#,
            Esc(older)
        );
    }
    if !paging.is_empty() {
        let _ = write!(body, r#"<p class="paging">{paging}</p>"#);
    }
    Ok(respond(
        StatusCode::OK,
        page("Runs", Some(tenant.name()), None, &body),
    ))
}

/// `GET /ui/runs/ID`: one run, with what its trace says of its input and outcome.
pub async fn run_page(
    State(app): State<Arc<App>>,
    Viewer(tenant): Viewer,
    Path(id): Path<String>,
) -> Page {
    let run = find_run(&app, tenant.name(), &id).await?;
    let labels = labels(&app.store.bundles(tenant.name()).await?);
    let recorded = recorded(&app, tenant.name(), &run).await;

    let trace = if run.trace_pruned {
        "pruned (retention or the storage quota)".to_owned()
    } else if let Some(sha) = &run.trace_sha256 {
        format!(
            r#"<a id="trace" href="/ui/runs/{}/trace" download>download</a> ({}, sha256 <code>{}</code>): <code>host replay</code> runs it again"#,
            Esc(encode(&run.id)),
            Esc(size(run.trace_size.unwrap_or(0))),
            Esc(sha)
        )
    } else {
        "none: the call ended before its function ran".to_owned()
    };
    let rows: [(&str, String); 16] = [
        ("Function", Esc(&run.function).to_string()),
        ("Outcome", outcome_badge(run.outcome.as_deref())),
        (
            "HTTP status",
            Esc(run.http_status.map(|s| s.to_string()).unwrap_or_default()).to_string(),
        ),
        (
            "Version",
            version_cell(run.bundle_version.as_deref(), &labels),
        ),
        (
            "Alias",
            Esc(run.alias.as_deref().unwrap_or("(called by version)")).to_string(),
        ),
        (
            "Side",
            match (&run.side, &run.shadow_of) {
                (Some(side), Some(primary)) => format!(
                    r#"{} of <a href="/ui/runs/{}"><code>{}</code></a>"#,
                    Esc(side),
                    Esc(encode(primary)),
                    Esc(primary)
                ),
                (Some(side), None) => Esc(side).to_string(),
                _ => String::new(),
            },
        ),
        (
            "Replica",
            Esc(run.replica.as_deref().unwrap_or("")).to_string(),
        ),
        ("Received", Esc(&run.received_at).to_string()),
        (
            "Started",
            Esc(run.started_at.as_deref().unwrap_or("")).to_string(),
        ),
        (
            "Finished",
            Esc(run.finished_at.as_deref().unwrap_or("")).to_string(),
        ),
        ("Duration", Esc(duration(run.duration_ms)).to_string()),
        (
            "Idempotency-Key",
            Esc(run.idempotency_key.as_deref().unwrap_or("")).to_string(),
        ),
        (
            "Input sha256",
            format!("<code>{}</code>", Esc(&run.input_sha256)),
        ),
        ("Trace", trace),
        ("host", Esc(&run.host_version).to_string()),
        (
            "Runtime sha256",
            format!("<code>{}</code>", Esc(&run.runtime_sha256)),
        ),
    ];
    let mut body = format!(
        r#"<h1>Run <code>{}</code></h1><table class="facts">"#,
        Esc(&run.id)
    );
    for (name, value) in rows {
        let _ = write!(body, "<tr><th>{name}</th><td>{value}</td></tr>");
    }
    body.push_str("</table>");

    body.push_str(r#"<h2>Input</h2>"#);
    match &recorded {
        Ok(Some(call)) => body.push_str(&json_block("input", &call.arguments)),
        Ok(None) => {
            body.push_str(r#"<p class="note">Only the input's sha256 is kept with the row, and this run's trace (which holds the arguments) is not here.</p>"#)
        }
        Err(why) => {
            let _ = write!(body, r#"<p class="note">{}</p>"#, Esc(why));
        }
    }

    match run.outcome.as_deref() {
        Some("returned" | "duplicate") => {
            body.push_str("<h2>Result</h2>");
            let from_trace = recorded
                .as_ref()
                .ok()
                .and_then(Option::as_ref)
                .and_then(|c| c.outcome.get("returned"));
            match run.result.as_ref().or(from_trace) {
                Some(result) => body.push_str(&json_block("result", result)),
                None => body.push_str(
                    r#"<p class="note">Over 64 KiB, so kept only in the trace: download it to see the whole value.</p>"#,
                ),
            }
        }
        _ => {
            body.push_str("<h2>Error</h2>");
            if let Some(error) = &run.error {
                let _ = write!(body, r#"<p class="error">{}</p>"#, Esc(error));
            }
            let tb = recorded
                .as_ref()
                .ok()
                .and_then(Option::as_ref)
                .and_then(|c| traceback(&c.outcome));
            if let Some(tb) = tb {
                let _ = write!(body, r#"<pre id="traceback">{}</pre>"#, Esc(tb));
            }
        }
    }
    Ok(respond(
        StatusCode::OK,
        page(&format!("Run {}", run.id), Some(tenant.name()), None, &body),
    ))
}

/// What a run's trace says, when it can be had: `Ok(None)` without a trace, `Err(why)` for a
/// trace too large to decode here or that does not decode.
async fn recorded(app: &App, tenant: &str, run: &RunRow) -> Result<Option<Recorded>, String> {
    if run.trace_pruned || run.trace_sha256.is_none() {
        return Ok(None);
    }
    let size = run.trace_size.unwrap_or(0);
    if size > DECODE_CAP {
        return Err(format!(
            "The trace is {}, too large to read for a page: download it (`host replay` runs the call again from it).",
            self::size(size)
        ));
    }
    let Some(bytes) = app
        .store
        .trace(tenant, &run.id)
        .await
        .map_err(|e| format!("{e:#}"))?
    else {
        return Ok(None);
    };
    tokio::task::spawn_blocking(move || recorded_call(&bytes))
        .await
        .map_err(|e| format!("reading the trace failed: {e}"))?
        .map(Some)
        .map_err(|e| format!("{e:#}"))
}

/// `GET /ui/runs/ID/trace`: the trace file, as the API's `GET /v1/runs/ID/trace` gives it,
/// named for saving.
pub async fn trace(
    State(app): State<Arc<App>>,
    Viewer(tenant): Viewer,
    Path(id): Path<String>,
) -> Page {
    let bytes = runs::trace_file(&app, tenant.name(), &id).await?;
    let disposition = format!("attachment; filename=\"{}.trace\"", encode(&id));
    let mut response =
        ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response();
    if let Ok(value) = HeaderValue::from_str(&disposition) {
        response
            .headers_mut()
            .insert(header::CONTENT_DISPOSITION, value);
    }
    Ok(response)
}

async fn find_run(app: &App, tenant: &str, id: &str) -> Result<RunRow, UiError> {
    app.store
        .run(tenant, id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("No run `{id}`.")).into())
}

/// `GET /ui/aliases`: each alias, where it points, and every move, newest first.
pub async fn aliases_page(State(app): State<Arc<App>>, Viewer(tenant): Viewer) -> Page {
    let aliases = app.store.aliases(tenant.name()).await?;
    let labels = labels(&app.store.bundles(tenant.name()).await?);
    let mut body = String::from("<h1>Aliases</h1>");
    if aliases.is_empty() {
        body.push_str(
            r#"<p class="empty">No aliases: <code>PUT /v1/aliases/NAME</code> makes one.</p>"#,
        );
    }
    for alias in &aliases {
        let moves = app.store.alias_history(tenant.name(), &alias.alias).await?;
        let _ = write!(
            body,
            r#"<section class="alias"><h2>{name}</h2><p>Points at {version} since {moved}.{split} <a href="/ui/runs{runs}">Its runs</a></p>
<table class="history"><thead><tr><th>#</th><th>Moved</th><th>From</th><th>To</th></tr></thead><tbody>"#,
            name = Esc(&alias.alias),
            version = version_cell(Some(&alias.target.version), &labels),
            moved = Esc(&alias.moved_at),
            split = {
                let mut split = String::new();
                if let Some(c) = &alias.target.canary {
                    let _ = write!(
                        split,
                        " Canary: {} of its calls to {} (sticky per {}).",
                        Esc(format!("{}%", c.percent)),
                        version_cell(Some(&c.version), &labels),
                        Esc(c.sticky.as_str())
                    );
                }
                if let Some(shadow) = &alias.target.shadow {
                    let _ = write!(
                        split,
                        " Shadow: every call again on {}.",
                        version_cell(Some(shadow), &labels)
                    );
                }
                split
            },
            runs = Esc(query(&[("alias", Some(&alias.alias))])),
        );
        for (i, m) in moves.iter().enumerate().rev() {
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                i + 1,
                Esc(&m.moved_at),
                m.from
                    .as_deref()
                    .map_or_else(|| "(new)".to_owned(), |v| version_cell(Some(v), &labels)),
                version_cell(Some(&m.to), &labels),
            );
        }
        body.push_str("</tbody></table></section>");
    }
    Ok(respond(
        StatusCode::OK,
        page("Aliases", Some(tenant.name()), None, &body),
    ))
}

/// `GET /ui/evaluations`: newest first, with their counts.
pub async fn evaluations_page(State(app): State<Arc<App>>, Viewer(tenant): Viewer) -> Page {
    let evaluations = app.store.evaluations(tenant.name()).await?;
    let labels = labels(&app.store.bundles(tenant.name()).await?);
    let mut body = String::from("<h1>Evaluations</h1>");
    if evaluations.is_empty() {
        body.push_str(
            r#"<p class="empty">No evaluations: <code>host evaluate</code> makes one.</p>"#,
        );
    } else {
        body.push_str(
            r#"<table id="evaluations"><thead><tr><th>Evaluation</th><th>Created</th><th>Candidate</th><th>Against</th><th>Function</th><th>Status</th><th class="num">Runs</th><th class="num">Same</th><th class="num">Changed</th><th class="num">Newly failing</th><th class="num">Fixed</th><th class="num">Not replayable</th></tr></thead><tbody>"#,
        );
        for e in &evaluations {
            let _ = write!(
                body,
                r#"<tr><td><a class="evaluation" href="/ui/evaluations/{id}"><code>{short}</code></a></td><td>{created}</td><td>{candidate}</td><td>{against}</td><td>{function}</td><td>{status}</td><td class="num">{done}/{total}</td><td class="num">{same}</td><td class="num">{changed}</td><td class="num">{failing}</td><td class="num">{fixed}</td><td class="num">{not}</td></tr>"#,
                id = Esc(encode(&e.id)),
                short = Esc(&e.id),
                created = Esc(&e.created_at),
                candidate = version_cell(Some(&e.candidate), &labels),
                against = against(e, &labels),
                function = Esc(e.function.as_deref().unwrap_or("all")),
                status = status_badge(&e.status),
                done = e.done,
                total = e.total,
                same = e.same,
                changed = e.changed,
                failing = e.newly_failing,
                fixed = e.fixed,
                not = e.not_replayable,
            );
        }
        body.push_str("</tbody></table>");
    }
    Ok(respond(
        StatusCode::OK,
        page("Evaluations", Some(tenant.name()), None, &body),
    ))
}

/// One run's entry in an evaluation's report, as `host evaluate` writes it (its `Entry`):
/// read leniently, so a field added later does not make a stored report unreadable.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Entry {
    function: String,
    recorded_version: Option<String>,
    /// How the recorded call ended: `{"returned": VALUE}`, `{"raised": ...}`, ...
    recorded: Option<Value>,
    /// How the candidate's run ended, in the same form.
    candidate: Option<Value>,
    differences: Vec<Difference>,
    /// `newly_failing`: the candidate's traceback, or the limit it hit.
    failure: Option<String>,
    /// `not_replayable`: why.
    reason: Option<String>,
    notes: Vec<String>,
}

/// Where the candidate's value differs from the recorded one.
#[derive(Debug, Deserialize)]
struct Difference {
    #[serde(default)]
    path: String,
    /// Absent when the recorded value has no such place (a `null` there is a value).
    #[serde(default, deserialize_with = "present")]
    recorded: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    candidate: Option<Value>,
}

/// A field that is there, `null` included; `#[serde(default)]` makes a missing one None.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

impl Entry {
    fn read(row: &EvaluationRunRow) -> Entry {
        serde_json::from_value(row.detail.clone()).unwrap_or_else(|e| Entry {
            notes: vec![format!("its report entry does not read: {e}")],
            ..Entry::default()
        })
    }
}

/// `GET /ui/evaluations/ID`: the summary, then the runs of each class but `same`: changed
/// ones with their differences side by side, newly failing ones with their tracebacks.
pub async fn evaluation_page(
    State(app): State<Arc<App>>,
    Viewer(tenant): Viewer,
    Path(id): Path<String>,
) -> Page {
    let evaluation = find_evaluation(&app, tenant.name(), &id).await?;
    let runs = app.store.evaluation_runs(&evaluation.id).await?;
    let labels = labels(&app.store.bundles(tenant.name()).await?);
    let e = &evaluation;
    let mut body = format!(
        r#"<h1>Evaluation <code>{id}</code></h1>
<table class="facts">
<tr><th>Candidate</th><td>{candidate}</td></tr>
<tr><th>Against</th><td>{against}</td></tr>
<tr><th>Function</th><td>{function}</td></tr>
<tr><th>Selection</th><td><code>{selection}</code></td></tr>
<tr><th>Tolerance</th><td>{tolerance}</td></tr>
<tr><th>Status</th><td>{status} {done} of {total} runs</td></tr>
<tr><th>Created</th><td>{created}</td></tr>
<tr><th>Finished</th><td>{finished}</td></tr>
</table>"#,
        id = Esc(&e.id),
        candidate = version_cell(Some(&e.candidate), &labels),
        against = against(e, &labels),
        function = Esc(e.function.as_deref().unwrap_or("all")),
        selection = Esc(&e.selection),
        tolerance = Esc(e
            .tolerance
            .map_or_else(|| "exact".to_owned(), |t| format!("relative {t}"))),
        status = status_badge(&e.status),
        done = e.done,
        total = e.total,
        created = Esc(&e.created_at),
        finished = Esc(e.finished_at.as_deref().unwrap_or("")),
    );
    if let Some(error) = &e.error {
        let _ = write!(body, r#"<p class="error">{}</p>"#, Esc(error));
    }
    let _ = write!(
        body,
        r#"<ul class="summary"><li class="same"><b>{}</b> same</li><li class="changed"><b>{}</b> changed</li><li class="newly_failing"><b>{}</b> newly failing</li><li class="fixed"><b>{}</b> fixed</li><li class="not_replayable"><b>{}</b> not replayable</li></ul>"#,
        e.same, e.changed, e.newly_failing, e.fixed, e.not_replayable
    );

    let link = |run: &str| {
        format!(
            r#"<a class="run" href="/ui/evaluations/{}/runs/{}"><code>{}</code></a>"#,
            Esc(encode(&e.id)),
            Esc(encode(run)),
            Esc(run)
        )
    };
    for (class, title) in CLASSES {
        let of_class: Vec<&EvaluationRunRow> = runs.iter().filter(|r| r.class == class).collect();
        if of_class.is_empty() {
            continue;
        }
        let _ = write!(
            body,
            r#"<section id="{class}"><h2>{title} ({})</h2>"#,
            of_class.len()
        );
        for row in of_class {
            let entry = Entry::read(row);
            let _ = write!(
                body,
                r#"<div class="entry"><h3>{} <span class="function">{}</span></h3>"#,
                link(&row.run),
                Esc(&entry.function)
            );
            body.push_str(&entry_detail(class, &entry, false));
            body.push_str("</div>");
        }
        body.push_str("</section>");
    }
    let same: Vec<&EvaluationRunRow> = runs.iter().filter(|r| r.class == "same").collect();
    if !same.is_empty() {
        let _ = write!(
            body,
            r#"<details id="same"><summary>Same ({})</summary><p class="runs">"#,
            same.len()
        );
        for row in same {
            body.push_str(&link(&row.run));
            body.push(' ');
        }
        body.push_str("</p></details>");
    }
    // A running evaluation's page follows its progress.
    let refresh = (e.status == "running").then_some(3);
    Ok(respond(
        StatusCode::OK,
        page(
            &format!("Evaluation {}", e.id),
            Some(tenant.name()),
            refresh,
            &body,
        ),
    ))
}

/// `GET /ui/evaluations/ID/runs/RUN`: one run of an evaluation, the recorded outcome and the
/// candidate's side by side, with the differences.
pub async fn evaluation_run_page(
    State(app): State<Arc<App>>,
    Viewer(tenant): Viewer,
    Path((id, run)): Path<(String, String)>,
) -> Page {
    let evaluation = find_evaluation(&app, tenant.name(), &id).await?;
    let row = app
        .store
        .evaluation_runs(&evaluation.id)
        .await?
        .into_iter()
        .find(|r| r.run == run)
        .ok_or_else(|| ApiError::not_found(format!("Evaluation `{id}` has no run `{run}`.")))?;
    let labels = labels(&app.store.bundles(tenant.name()).await?);
    let entry = Entry::read(&row);
    let class = CLASSES
        .iter()
        .find(|(c, _)| *c == row.class)
        .map_or("Same", |(_, title)| title);
    let recorded_version = entry
        .recorded_version
        .as_deref()
        .or(evaluation.baseline.as_deref());
    let mut body = format!(
        r#"<h1>{class}: run <code>{run}</code></h1>
<p><a href="/ui/evaluations/{eid}">Evaluation {eid_text}</a> · <a href="/ui/runs/{rid}">the production run</a> · function <b>{function}</b></p>
<div class="sides"><div class="side recorded"><h2>Recorded ({recorded_version})</h2>{recorded}</div><div class="side candidate"><h2>Candidate ({candidate})</h2>{candidate_outcome}</div></div>"#,
        run = Esc(&row.run),
        eid = Esc(encode(&evaluation.id)),
        eid_text = Esc(&evaluation.id),
        rid = Esc(encode(&row.run)),
        function = Esc(&entry.function),
        recorded_version = version_cell(recorded_version, &labels),
        recorded = outcome_block("recorded-outcome", entry.recorded.as_ref()),
        candidate = version_cell(Some(&evaluation.candidate), &labels),
        candidate_outcome = outcome_block("candidate-outcome", entry.candidate.as_ref()),
    );
    body.push_str(&entry_detail(&row.class, &entry, true));
    Ok(respond(
        StatusCode::OK,
        page(
            &format!("Run {} in evaluation {}", row.run, evaluation.id),
            Some(tenant.name()),
            None,
            &body,
        ),
    ))
}

/// What an entry shows under its run: the differences (changed), the failure (newly
/// failing), the recorded failure (fixed), the reason (not replayable), and notes. `whole`
/// when the outcomes are already shown beside it.
fn entry_detail(class: &str, entry: &Entry, whole: bool) -> String {
    let mut out = String::new();
    if !entry.differences.is_empty() {
        out.push_str(r#"<table class="diff"><thead><tr><th>Where</th><th>Recorded</th><th>Candidate</th></tr></thead><tbody>"#);
        for d in &entry.differences {
            let side = |v: &Option<Value>| match v {
                Some(v) => format!("<pre>{}</pre>", Esc(shown(&pretty(v)))),
                None => r#"<span class="absent">(absent)</span>"#.to_owned(),
            };
            let _ = write!(
                out,
                r#"<tr><td class="path"><code>{}</code></td><td class="recorded">{}</td><td class="candidate">{}</td></tr>"#,
                Esc(if d.path.is_empty() {
                    "the whole outcome"
                } else {
                    &d.path
                }),
                side(&d.recorded),
                side(&d.candidate),
            );
        }
        out.push_str("</tbody></table>");
    }
    if let Some(failure) = &entry.failure {
        let _ = write!(out, r#"<pre class="traceback">{}</pre>"#, Esc(failure));
    }
    if class == "fixed" && !whole {
        let recorded = entry.recorded.as_ref();
        let _ = write!(
            out,
            r#"<div class="sides"><div class="side recorded"><h4>Recorded</h4>{}</div><div class="side candidate"><h4>Candidate</h4>{}</div></div>"#,
            outcome_block("", recorded),
            outcome_block("", entry.candidate.as_ref())
        );
    }
    if let Some(reason) = &entry.reason {
        let _ = write!(out, r#"<p class="reason">{}</p>"#, Esc(reason));
    }
    for note in &entry.notes {
        let _ = write!(out, r#"<p class="note">{}</p>"#, Esc(note));
    }
    out
}

/// An outcome as recorded in a trace or a report: the value it returned, the traceback it
/// raised, or the failure's JSON.
fn outcome_block(id: &str, outcome: Option<&Value>) -> String {
    let id = if id.is_empty() {
        String::new()
    } else {
        format!(r#" id="{id}""#)
    };
    let Some(outcome) = outcome else {
        return format!(r#"<p class="absent"{id}>did not run</p>"#);
    };
    if let Some(value) = outcome.get("returned") {
        return format!(
            r#"<p class="label">returned</p><pre{id}>{}</pre>"#,
            Esc(shown(&pretty(value)))
        );
    }
    match traceback(outcome) {
        Some(tb) => format!(
            r#"<p class="label">raised</p><pre class="traceback"{id}>{}</pre>"#,
            Esc(tb)
        ),
        None => format!(r#"<pre{id}>{}</pre>"#, Esc(shown(&pretty(outcome)))),
    }
}

async fn find_evaluation(app: &App, tenant: &str, id: &str) -> Result<EvaluationRow, UiError> {
    app.store
        .evaluation(tenant, id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("No evaluation `{id}`.")).into())
}

/// `against` as asked, and the version it resolved to when that is another name.
fn against(e: &EvaluationRow, labels: &HashMap<String, String>) -> String {
    match &e.baseline {
        Some(baseline) if *baseline != e.against => format!(
            "{} ({})",
            Esc(&e.against),
            version_cell(Some(baseline), labels)
        ),
        _ => version_cell(Some(&e.against), labels),
    }
}

/// Each version's label, where its deploy gave one.
fn labels(bundles: &[BundleRow]) -> HashMap<String, String> {
    bundles
        .iter()
        .filter_map(|b| Some((b.version.clone(), b.label.clone()?)))
        .collect()
}

/// A version as a person tells them apart: its first 12 digits, and its label.
fn version_text(version: &str, labels: &HashMap<String, String>) -> String {
    match labels.get(version) {
        Some(label) => format!("{} {label}", short_version(version)),
        None => short_version(version).to_owned(),
    }
}

/// A version linked to its runs, the whole of it in the tooltip.
fn version_cell(version: Option<&str>, labels: &HashMap<String, String>) -> String {
    let Some(version) = version else {
        return String::new();
    };
    format!(
        r#"<a class="version" href="/ui/runs{}" title="{}">{}</a>"#,
        Esc(query(&[("version", Some(version))])),
        Esc(version),
        Esc(version_text(version, labels))
    )
}

/// `<option>`s of (value, text) pairs, `selected` the chosen one.
fn options(choices: impl Iterator<Item = (String, String)>, selected: Option<&str>) -> String {
    let mut out = String::new();
    for (value, text) in choices {
        let chosen = if Some(value.as_str()) == selected {
            " selected"
        } else {
            ""
        };
        let _ = write!(
            out,
            r#"<option value="{}"{chosen}>{}</option>"#,
            Esc(&value),
            Esc(&text)
        );
    }
    out
}

/// An outcome, coloured by kind; the class names only the outcomes there are.
fn outcome_badge(outcome: Option<&str>) -> String {
    let outcome = outcome.unwrap_or("running");
    let kind = match outcome {
        "returned" => "ok",
        "running" => "running",
        "duplicate" => "other",
        _ => "failed",
    };
    format!(r#"<span class="badge {kind}">{}</span>"#, Esc(outcome))
}

fn status_badge(status: &str) -> String {
    let kind = match status {
        "done" => "ok",
        "running" => "running",
        _ => "failed",
    };
    format!(r#"<span class="badge {kind}">{}</span>"#, Esc(status))
}

/// Versions are 64 hex digits: the first 12 tell them apart on a page. (Run ids are not
/// cut: UUIDv7s of one moment share their first digits.)
fn short_version(version: &str) -> &str {
    version.get(..12).unwrap_or(version)
}

fn duration(ms: Option<f64>) -> String {
    ms.map(|ms| format!("{ms:.1} ms")).unwrap_or_default()
}

fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / f64::from(1 << 20)),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / f64::from(1 << 10)),
        b => format!("{b} bytes"),
    }
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

/// At most [`SHOWN`] bytes of a text, cut at a character, saying so.
fn shown(text: &str) -> String {
    if text.len() <= SHOWN {
        return text.to_owned();
    }
    let mut end = SHOWN;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}\n… ({} more bytes: the trace has the whole value)",
        &text[..end],
        text.len() - end
    )
}

/// A JSON value in a `<pre>` with this id.
fn json_block(id: &str, value: &Value) -> String {
    format!(r#"<pre id="{id}">{}</pre>"#, Esc(shown(&pretty(value))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_entry_reads_with_absent_and_null_told_apart() {
        let row = EvaluationRunRow {
            run: "r".into(),
            class: "changed".into(),
            detail: serde_json::json!({
                "function": "f", "class": "changed", "a_later_field": 1,
                "differences": [
                    {"path": "result.a", "recorded": null, "candidate": 2},
                    {"path": "result.b", "candidate": 3},
                ],
            }),
        };
        let entry = Entry::read(&row);
        assert_eq!(entry.function, "f");
        assert_eq!(entry.differences[0].recorded, Some(Value::Null));
        assert_eq!(entry.differences[1].recorded, None);
        let html = entry_detail("changed", &entry, false);
        assert!(
            html.contains(r#"<td class="recorded"><pre>null</pre>"#),
            "{html}"
        );
        assert!(html.contains("(absent)"), "{html}");
    }

    #[test]
    fn an_unreadable_entry_says_so_instead_of_failing_the_page() {
        let row = EvaluationRunRow {
            run: "r".into(),
            class: "changed".into(),
            detail: serde_json::json!("not an entry"),
        };
        assert!(Entry::read(&row).notes[0].contains("does not read"));
    }

    #[test]
    fn long_values_are_cut_at_a_character_and_say_so() {
        // "a" then two-byte characters: byte SHOWN falls inside one.
        let text = format!("a{}", "é".repeat(SHOWN / 2));
        let cut = shown(&text);
        assert!(cut.starts_with(&text[..SHOWN - 1]));
        assert!(
            cut[SHOWN - 1..].starts_with("\n… (2 more bytes: the trace has the whole value)"),
            "{}",
            &cut[SHOWN - 1..]
        );
        assert_eq!(shown("short"), "short");
    }

    #[test]
    fn cookies_are_found_among_others_and_decoded() {
        let mut headers = HeaderMap::new();
        headers.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; host_token=x%20y"),
        );
        headers.append(header::COOKIE, HeaderValue::from_static("b=2"));
        assert_eq!(cookie(&headers, COOKIE).as_deref(), Some("x y"));
        assert_eq!(cookie(&headers, "c"), None);
    }
}
