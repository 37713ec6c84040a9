//! `host evaluate CANDIDATE`: a candidate notebook or bundle run on recorded calls, local
//! trace files or a server's logged runs, and each run classed against its recording; or a
//! version deployed on a server (`--on-server`), evaluated there (`POST /v1/evaluations`)
//! and reported the same way.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{ArgGroup, Args};
use serde_json::{Value, json};

use super::serve::{Client, ClientArgs};
use super::{GlobalOptions, escape_controls, say};
use crate::bundle::{Bundle, Select, rfc3339, short};
use crate::error::{Exit, bad_input};
use crate::evaluate::{Class, Entry, Options, Report, Run, Unavailable, evaluate};
use crate::files::SigningKey;
use crate::policy::period_back;
use crate::preinit::Prepared;
use crate::progress::Progress;
use crate::replay::Tolerance;
use crate::trace::Trace;

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("source").required(true).args(["traces", "against"])))]
pub struct EvaluateArgs {
    /// The candidate: a notebook (.ipynb) or a bundle file; or, with --against, a version
    /// deployed on the server (64 hex digits), evaluated there.
    pub candidate: PathBuf,
    /// Evaluate on these trace files (`host run --record`, `host runs pull`), or on the
    /// `*.trace` files in these folders.
    #[arg(long, num_args = 1.., value_name = "FILE_OR_DIR", conflicts_with = "against")]
    pub traces: Vec<PathBuf>,
    /// Evaluate on a server's logged runs of this alias, or of this version (64 hex digits).
    #[arg(long, value_name = "ALIAS_OR_VERSION")]
    pub against: Option<String>,
    /// Evaluate on the server, which keeps the evaluation (a gated alias move can require
    /// it): a notebook or bundle candidate is deployed there first (no alias moves). A
    /// deployed version (64 hex digits) is always evaluated there.
    #[arg(long, requires = "against")]
    pub on_server: bool,
    #[command(flatten)]
    pub client: ClientArgs,
    /// Only runs of this function; a candidate notebook is bundled with it alone, as
    /// `host bundle -f NAME` does [default: every function the notebook offers].
    #[arg(long, value_name = "NAME")]
    pub function: Option<String>,
    /// The newest N runs that have a trace [default: 100].
    #[arg(long, value_name = "N", requires = "against", conflicts_with_all = ["since", "runs"])]
    pub last: Option<usize>,
    /// The runs received within this period, up to now (`24h`, `7d`, `30m`).
    #[arg(
        long,
        value_name = "PERIOD",
        requires = "against",
        conflicts_with = "runs"
    )]
    pub since: Option<String>,
    /// The runs whose ids this file lists, one a line (`#` starts a comment).
    #[arg(long, value_name = "FILE", requires = "against")]
    pub runs: Option<PathBuf>,
    /// Floats whose relative difference is at most this count as the same (`1e-9`)
    /// [default: 0, exact].
    #[arg(long, value_name = "REL")]
    pub tolerance: Option<Tolerance>,
    /// Print the report as JSON (summary and every run) instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Exit with status 6 when more than N runs changed.
    #[arg(long, value_name = "N")]
    pub max_changed: Option<usize>,
    /// Exit with status 6 when more than N runs newly fail.
    #[arg(long, value_name = "N")]
    pub max_failing: Option<usize>,
}

pub fn evaluate_command(global: &GlobalOptions, args: &EvaluateArgs) -> Result<Exit> {
    let version = args
        .candidate
        .to_str()
        .filter(|c| is_version(c) && !args.candidate.exists());
    if let (Some(against), true) = (&args.against, args.on_server || version.is_some()) {
        let report = on_server(args, against, version)?;
        return conclude(args, &report);
    }
    let key = SigningKey::from_env()?;
    let runs = match &args.against {
        Some(against) => server_runs(args, against, key.as_ref())?,
        None => local_runs(&args.traces, args.function.as_deref(), key.as_ref())?,
    };
    let (_engine, sandbox) = global.sandbox()?;
    let only: Vec<&str> = args.function.iter().map(String::as_str).collect();
    let select = match args.function {
        Some(_) => Select::Only(&only),
        None => Select::All,
    };
    let bundle = Bundle::open(&sandbox, &args.candidate, select, key.as_ref(), &[])?;
    for warning in &bundle.manifest.warnings {
        say(format_args!("warning: {warning}"));
    }
    let candidate = Prepared::new(&sandbox, bundle)?;
    let options = Options {
        tolerance: args.tolerance.unwrap_or_default(),
        ..Options::default()
    };
    let started = Instant::now();
    let progress = Progress::start(&format!(
        "evaluating {} runs on bundle {}",
        runs.len(),
        short(&candidate.bundle.version)
    ));
    let report = evaluate(&sandbox, &candidate, &runs, &options);
    progress.finish();
    say(format_args!(
        "evaluated {} runs in {:.1}s on {} threads",
        runs.len(),
        started.elapsed().as_secs_f64(),
        options.threads.get().min(runs.len())
    ));
    conclude(args, &report)
}

/// Prints the report (a table, or `--json`), and says whether it passes `--max-changed` and
/// `--max-failing`.
fn conclude(args: &EvaluateArgs, report: &Report) -> Result<Exit> {
    if args.json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        // Results, paths and tracebacks are the guest's data: none may drive the terminal.
        print!("{}", escape_controls(render(report).as_bytes()));
    }
    let s = &report.summary;
    let mut exit = Exit::Success;
    for (count, limit, what, flag) in [
        (s.changed, args.max_changed, "changed", "--max-changed"),
        (
            s.newly_failing,
            args.max_failing,
            "newly fail",
            "--max-failing",
        ),
    ] {
        if let Some(limit) = limit.filter(|&limit| count > limit) {
            say(format_args!(
                "{count} runs {what}, more than {flag} {limit} allows"
            ));
            exit = Exit::Regressed;
        }
    }
    Ok(exit)
}

/// Whether a candidate names a deployed version rather than a file.
fn is_version(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// How often the server's evaluation is looked at while it runs.
const POLL: Duration = Duration::from_millis(500);

/// Evaluates on the server: deploys a file candidate first, asks for the evaluation, follows
/// its progress until it is done, and reads its report.
fn on_server(args: &EvaluateArgs, against: &str, version: Option<&str>) -> Result<Report> {
    let client = Client::new(&args.client)?;
    let candidate = match version {
        Some(version) => version.to_owned(),
        None => deploy(&client, args)?,
    };
    let mut request = json!({"candidate": candidate, "against": against});
    if let Some(function) = &args.function {
        request["function"] = json!(function);
    }
    if let Some(last) = args.last {
        request["last"] = json!(last);
    }
    if let Some(since) = &args.since {
        request["since"] = json!(since);
    }
    if let Some(file) = &args.runs {
        request["runs"] = json!(read_ids(file)?);
    }
    if let Some(tolerance) = args.tolerance {
        request["tolerance"] = json!(tolerance.relative());
    }
    let created = client.post_json("/v1/evaluations", &[], request.to_string().as_bytes())?;
    let id = created["id"].as_str().unwrap_or_default().to_owned();
    let path = format!("/v1/evaluations/{id}");
    say(format_args!(
        "evaluation {id}: bundle {} on {} runs of {against} (version {}), on the server",
        short(&candidate),
        created["total"],
        created["baseline"].as_str().map(short).unwrap_or_default()
    ));
    let started = Instant::now();
    let mut seen = 0;
    loop {
        let state = client.get_json(&path, &[("runs", "false".to_owned())])?;
        let done = state["done"].as_u64().unwrap_or_default();
        match state["status"].as_str() {
            Some("done") => break,
            Some("running") => {}
            _ => {
                return Err(bad_input(format!(
                    "evaluation {id} failed on the server: {}",
                    state["error"].as_str().unwrap_or("(no reason given)")
                )));
            }
        }
        if done != seen {
            say(format_args!(
                "evaluation {id}: {done} of {} runs",
                state["total"]
            ));
            seen = done;
        }
        std::thread::sleep(POLL);
    }
    let report = client.get_json(&path, &[])?;
    say(format_args!(
        "evaluated {} runs in {:.1}s on the server",
        report["total"],
        started.elapsed().as_secs_f64()
    ));
    let tolerance = report["tolerance"].as_f64().unwrap_or_default();
    Ok(Report {
        candidate,
        notebook: report["notebook"].as_str().unwrap_or_default().to_owned(),
        tolerance: Tolerance::new(tolerance)?,
        summary: serde_json::from_value(report.clone())
            .context("the server's evaluation has no summary")?,
        runs: serde_json::from_value(report["runs"].clone())
            .context("the server's evaluation entries do not read as a report's")?,
    })
}

/// Deploys the candidate file on the server (as `POST /v1/bundles` with `--function`'s
/// function alone, when it is given); returns its version.
fn deploy(client: &Client, args: &EvaluateArgs) -> Result<String> {
    let path = &args.candidate;
    let bytes = std::fs::read(path)
        .map_err(|e| bad_input(format!("cannot read `{}`: {e}", path.display())))?;
    let mut query = Vec::new();
    if let Some(name) = path.file_name() {
        query.push(("name", name.to_string_lossy().into_owned()));
    }
    if let Some(function) = &args.function {
        query.push(("function", function.clone()));
    }
    let deployed = client.post_json("/v1/bundles", &query, &bytes)?;
    let version = deployed["version"]
        .as_str()
        .context("the server's deploy answer has no version")?;
    say(format_args!(
        "deployed {} as bundle {}",
        path.display(),
        short(version)
    ));
    Ok(version.to_owned())
}

/// The run ids a `--runs` file lists, one a line (`#` starts a comment).
fn read_ids(file: &Path) -> Result<Vec<String>> {
    let ids = std::fs::read_to_string(file)
        .map_err(|e| bad_input(format!("cannot read --runs `{}`: {e}", file.display())))?;
    Ok(ids
        .lines()
        .map(|l| l.split('#').next().unwrap_or_default().trim())
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

/// The trace files named, folders read for their `*.trace` files (in name order); with
/// `function`, only its calls.
fn local_runs(
    paths: &[PathBuf],
    function: Option<&str>,
    key: Option<&SigningKey>,
) -> Result<Vec<Run>> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("cannot list the folder `{}`", path.display()))?
                .map(|e| e.map(|e| e.path()))
                .collect::<std::io::Result<_>>()
                .with_context(|| format!("cannot list the folder `{}`", path.display()))?;
            found.retain(|p| p.extension().is_some_and(|e| e == "trace"));
            found.sort();
            if found.is_empty() {
                return Err(bad_input(format!(
                    "--traces: the folder `{}` holds no `.trace` file",
                    path.display()
                )));
            }
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    let mut runs = Vec::new();
    for file in files {
        let trace = Trace::read(&file, key)?;
        if function.is_none_or(|f| f == trace.header.function) {
            runs.push(Run {
                id: file.display().to_string(),
                trace: Ok(Box::new(trace)),
            });
        }
    }
    if runs.is_empty() {
        return Err(bad_input(format!(
            "--traces: no trace of `{}`",
            function.unwrap_or_default()
        )));
    }
    Ok(runs)
}

/// The server's runs `args` select, with their traces.
fn server_runs(args: &EvaluateArgs, against: &str, key: Option<&SigningKey>) -> Result<Vec<Run>> {
    let client = Client::new(&args.client)?;
    let calls = Calls::of(&client, against)?;
    let rows = match &args.runs {
        Some(file) => {
            let mut rows = Vec::new();
            for id in read_ids(file)? {
                let row = client.get_json(&format!("/v1/runs/{id}"), &[])?;
                if !calls.has(&row) {
                    return Err(bad_input(format!(
                        "--runs: run {id} (version {}{}) is not a call of {}",
                        row["bundle_version"].as_str().unwrap_or("(none)"),
                        row["side"]
                            .as_str()
                            .map(|s| format!(", {s} side"))
                            .unwrap_or_default(),
                        calls.describe()
                    )));
                }
                rows.push(row);
            }
            rows
        }
        None => {
            let since = args
                .since
                .as_deref()
                .map(|period| -> Result<String> {
                    Ok(rfc3339(period_back(period).context("--since")?))
                })
                .transpose()?;
            let last = match since {
                Some(_) => args.last,
                None => Some(args.last.unwrap_or(100)),
            };
            list(&client, &calls, args.function.as_deref(), since, last)?
        }
    };
    let mut runs = Vec::new();
    for row in rows {
        let id = row["id"].as_str().unwrap_or_default().to_owned();
        let function = row["function"].as_str().unwrap_or_default().to_owned();
        let unavailable = |reason: String| Unavailable {
            function: function.clone(),
            reason,
        };
        let trace = if row["trace_pruned"].as_bool() == Some(true) {
            Err(unavailable(
                "its trace was pruned (retention or storage quota)".into(),
            ))
        } else if row["trace_sha256"].is_null() {
            Err(unavailable(format!(
                "it has no trace: it ended before its function ran ({})",
                row["outcome"].as_str().unwrap_or("still running")
            )))
        } else {
            let bytes = client.trace(&row)?;
            let name = format!("the trace of run {id}");
            Ok(Box::new(Trace::from_file_bytes(&bytes, key, &name)?))
        };
        runs.push(Run { id, trace });
    }
    if runs.is_empty() {
        return Err(bad_input(format!(
            "the server has no run of {} to evaluate on{}",
            calls.describe(),
            args.function
                .as_deref()
                .map(|f| format!(" for function `{f}`"))
                .unwrap_or_default()
        )));
    }
    Ok(runs)
}

/// The calls of `against` on a server, as `POST /v1/evaluations` takes them too: an alias's
/// calls answered by the version it points at now (not its canary's, nor a shadow's repeats
/// of them), or a version's calls (not a shadow's repeats).
struct Calls {
    alias: Option<String>,
    version: String,
}

impl Calls {
    fn of(client: &Client, against: &str) -> Result<Calls> {
        // Alias names are never 64 hex digits (the server refuses them), so this is a version.
        if is_version(against) {
            return Ok(Calls {
                alias: None,
                version: against.to_owned(),
            });
        }
        let aliases = client.get_json("/v1/aliases", &[])?;
        let version = aliases["aliases"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["alias"] == against)
            .and_then(|a| a["version"].as_str())
            .ok_or_else(|| bad_input(format!("the server has no alias `{against}`")))?;
        Ok(Calls {
            alias: Some(against.to_owned()),
            version: version.to_owned(),
        })
    }

    /// Whether a run (a row as `GET /v1/runs` shows it) is one of them.
    fn has(&self, row: &Value) -> bool {
        let side = row["side"].as_str();
        row["bundle_version"] == self.version.as_str()
            && side != Some("shadow")
            && match &self.alias {
                Some(alias) => row["alias"] == alias.as_str() && side != Some("canary"),
                None => true,
            }
    }

    /// `prod (version V)` or `version V`, for messages.
    fn describe(&self) -> String {
        match &self.alias {
            Some(alias) => format!("`{alias}` (version {})", self.version),
            None => format!("version {}", self.version),
        }
    }
}

/// Pages `GET /v1/runs` (newest first) for the finished calls with a trace to replay (or a
/// pruned one, reported as such), at most `last` of them.
fn list(
    client: &Client,
    calls: &Calls,
    function: Option<&str>,
    since: Option<String>,
    last: Option<usize>,
) -> Result<Vec<Value>> {
    let mut rows = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let wanted = last.map_or(1000, |n| n.saturating_sub(rows.len()));
        let mut query = vec![
            ("version", calls.version.clone()),
            ("limit", wanted.clamp(1, 1000).to_string()),
        ];
        for (key, value) in [
            ("alias", calls.alias.clone()),
            ("function", function.map(str::to_owned)),
            ("since", since.clone()),
            ("after", after.take()),
        ] {
            if let Some(v) = value {
                query.push((key, v));
            }
        }
        let page = client.get_json("/v1/runs", &query)?;
        for row in page["runs"].as_array().into_iter().flatten() {
            let replayable = !row["trace_sha256"].is_null() || row["trace_pruned"] == true;
            if replayable && calls.has(row) && last.is_none_or(|n| rows.len() < n) {
                rows.push(row.clone());
            }
        }
        match page["next"].as_str() {
            Some(next) if last.is_none_or(|n| rows.len() < n) => after = Some(next.to_owned()),
            _ => return Ok(rows),
        }
    }
}

/// The report as a person reads it: the counts, a table of the runs that are not the same,
/// and the details of each.
fn render(report: &Report) -> String {
    let s = &report.summary;
    let mut out = String::new();
    let tolerance = match report.tolerance.relative() {
        0.0 => "exact".to_owned(),
        t => format!("relative tolerance {t}"),
    };
    let _ = writeln!(
        out,
        "candidate: bundle {} of {}\nruns: {} ({tolerance}): {}",
        short(&report.candidate),
        report.notebook,
        s.total,
        Class::ALL
            .iter()
            .map(|&c| format!("{} {}", s.count(c), c.name().replace('_', " ")))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let listed: Vec<&Entry> = report
        .runs
        .iter()
        .filter(|e| e.class != Class::Same)
        .collect();
    if !listed.is_empty() {
        let width = |f: fn(&Entry) -> &str, title: &str| {
            listed
                .iter()
                .map(|e| f(e).chars().count())
                .chain([title.len()])
                .max()
                .unwrap_or(0)
        };
        let run_w = width(|e| &e.run, "run");
        let function_w = width(|e| &e.function, "function");
        let _ = writeln!(
            out,
            "\n{:run_w$}  {:function_w$}  {:14}  difference",
            "run", "function", "class"
        );
        for e in &listed {
            let _ = writeln!(
                out,
                "{:run_w$}  {:function_w$}  {:14}  {}",
                e.run,
                e.function,
                e.class.name(),
                shorten(&headline(e), 100)
            );
        }
    }
    if s.same > 0 {
        let _ = writeln!(
            out,
            "({} same runs not listed; --json lists every run)",
            s.same
        );
    }
    for e in &listed {
        match e.class {
            Class::Changed => {
                let _ = writeln!(out, "\nchanged: {} ({})", e.run, e.function);
                for d in e.differences.iter().take(20) {
                    let _ = writeln!(out, "  {}", shorten(&d.to_string(), 300));
                }
                if e.differences.len() > 20 {
                    let _ = writeln!(out, "  ... and {} more", e.differences.len() - 20);
                }
            }
            Class::NewlyFailing => {
                let _ = writeln!(out, "\nnewly failing: {} ({})", e.run, e.function);
                for line in e.failure.as_deref().unwrap_or_default().lines() {
                    let _ = writeln!(out, "  {line}");
                }
            }
            Class::NotReplayable => {
                let _ = writeln!(out, "\nnot replayable: {} ({})", e.run, e.function);
                let _ = writeln!(out, "  {}", e.reason.as_deref().unwrap_or_default());
            }
            Class::Same | Class::Fixed => {}
        }
        for note in &e.notes {
            let _ = writeln!(out, "  note: {note}");
        }
    }
    out
}

/// One line on what happened to a run: its first difference, its error, or why it was not
/// replayed.
fn headline(e: &Entry) -> String {
    match e.class {
        Class::Same => String::new(),
        Class::Changed => {
            let first = e.differences.first().map(ToString::to_string);
            match e.differences.len() {
                0 | 1 => first.unwrap_or_default(),
                n => format!("{} (and {} more)", first.unwrap_or_default(), n - 1),
            }
        }
        Class::NewlyFailing => e
            .failure
            .as_deref()
            .and_then(|f| f.lines().last())
            .unwrap_or_default()
            .to_owned(),
        Class::Fixed => format!(
            "returns now; recorded {}",
            e.recorded.as_ref().map(failure_line).unwrap_or_default()
        ),
        Class::NotReplayable => e.reason.clone().unwrap_or_default(),
    }
}

/// A recorded failure in one line: `ValueError: bad input`, or the limit.
fn failure_line(outcome: &Value) -> String {
    match outcome.get("raised") {
        Some(e) => format!(
            "{}: {}",
            e["type"].as_str().unwrap_or_default(),
            e["message"].as_str().unwrap_or_default()
        ),
        None => outcome.to_string(),
    }
}

/// `text` cut to `max` characters, `...` marking the cut.
fn shorten(text: &str, max: usize) -> String {
    let text = text.lines().next().unwrap_or_default();
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let cut: String = text.chars().take(max.saturating_sub(3)).collect();
    format!("{cut}...")
}
