//! Evaluating a candidate bundle on recorded production calls before it takes traffic: each
//! trace's call re-executed on the candidate the way `host replay --notebook` does (recorded
//! arguments, files rebuilt from the trace, recorded clock readings and random values), all
//! cores at once, and every run classed by how its outcome compares with the recorded one.
//!
//! The [`Report`] is self-contained (each [`Entry`] names its run, function, class, both
//! outcomes, the differences, the traceback or the reason), so it can be stored, served and
//! shown as it is.

use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::call::Outcome;
use crate::preinit::Prepared;
use crate::replay::{Difference, Tolerance, WhatIf, diff, what_if_prepared};
use crate::sandbox::{Sandbox, call_thread};
use crate::trace::Trace;

/// One recorded call to evaluate the candidate on.
#[derive(Debug)]
pub struct Run {
    /// How the report names the run: its id on a server, or its trace file.
    pub id: String,
    /// The recorded call, or why there is none to replay (its trace was pruned, say): such a
    /// run is reported `not_replayable` with that reason.
    pub trace: Result<Box<Trace>, Unavailable>,
}

/// A run whose trace cannot be had.
#[derive(Debug, Clone)]
pub struct Unavailable {
    pub function: String,
    pub reason: String,
}

/// How to evaluate.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// How far apart floats in the results may be and still count as the same.
    pub tolerance: Tolerance,
    /// How many runs at once, each on its own thread: by default one per core.
    pub threads: NonZeroUsize,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            tolerance: Tolerance::EXACT,
            threads: std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN),
        }
    }
}

/// How a run's outcome on the candidate compares with the recorded one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// The same value (within the tolerance), or the same failure (type and message).
    Same,
    /// Another value (see the differences), or another failure.
    Changed,
    /// The recorded call returned; the candidate raised, hit a limit or ended the interpreter.
    NewlyFailing,
    /// The recorded call failed; the candidate returns.
    Fixed,
    /// The candidate's run cannot be compared with the recording: it read what the
    /// recording does not hold, the trace's function is not in the candidate, or there is no
    /// trace (see the reason).
    NotReplayable,
}

impl Class {
    pub const ALL: [Class; 5] = [
        Class::Same,
        Class::Changed,
        Class::NewlyFailing,
        Class::Fixed,
        Class::NotReplayable,
    ];

    /// The class as the report's JSON and the table write it: `newly_failing`.
    pub fn name(self) -> &'static str {
        match self {
            Class::Same => "same",
            Class::Changed => "changed",
            Class::NewlyFailing => "newly_failing",
            Class::Fixed => "fixed",
            Class::NotReplayable => "not_replayable",
        }
    }
}

/// One run's result, self-contained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// The run's id or trace file, as [`Run::id`] gave it.
    pub run: String,
    pub function: String,
    pub class: Class,
    /// The version of the bundle that answered the recorded call (None without a trace).
    pub recorded_version: Option<String>,
    /// When the call was recorded (RFC 3339).
    pub recorded_at: Option<String>,
    /// How the recorded call ended, as a trace records it: `{"returned": VALUE}`,
    /// `{"raised": EXCEPTION}`, `{"limit": TEXT}`, `{"exited": STATUS}`, `{"crashed": TEXT}`.
    pub recorded: Option<Value>,
    /// How the candidate's run ended, in the same form; None when it did not run.
    pub candidate: Option<Value>,
    /// Where the candidate's value (or failure's type and message) differs from the recorded
    /// one, paths rooted at `result` (or at the failure's kind, `raised.message`).
    pub differences: Vec<Difference>,
    /// `newly_failing`: the candidate's traceback, or the limit it hit, as text.
    pub failure: Option<String>,
    /// `not_replayable`: why.
    pub reason: Option<String>,
    /// What else the reader should know: inputs the candidate got live, past the recording's.
    pub notes: Vec<String>,
    /// How long the candidate's run took, rebuilding the recorded files included.
    pub duration_ms: f64,
}

/// How many runs fell in each class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub total: usize,
    pub same: usize,
    pub changed: usize,
    pub newly_failing: usize,
    pub fixed: usize,
    pub not_replayable: usize,
}

impl Summary {
    /// The count of one class.
    pub fn count(&self, class: Class) -> usize {
        match class {
            Class::Same => self.same,
            Class::Changed => self.changed,
            Class::NewlyFailing => self.newly_failing,
            Class::Fixed => self.fixed,
            Class::NotReplayable => self.not_replayable,
        }
    }

    fn add(&mut self, class: Class) {
        self.total += 1;
        *match class {
            Class::Same => &mut self.same,
            Class::Changed => &mut self.changed,
            Class::NewlyFailing => &mut self.newly_failing,
            Class::Fixed => &mut self.fixed,
            Class::NotReplayable => &mut self.not_replayable,
        } += 1;
    }
}

/// An evaluation: the candidate, the counts, and every run in the order it was given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The candidate bundle's version.
    pub candidate: String,
    /// The candidate's notebook (its file name).
    pub notebook: String,
    pub tolerance: Tolerance,
    pub summary: Summary,
    pub runs: Vec<Entry>,
}

/// Re-executes every run's recorded call on `candidate` and classes each; see
/// [`evaluate_each`].
pub fn evaluate(
    sandbox: &Sandbox,
    candidate: &Prepared,
    runs: &[Run],
    options: &Options,
) -> Report {
    evaluate_each(sandbox, candidate, runs, options, |_, _| {})
}

/// [`evaluate`], calling `each(index, entry)` as each run is classed (from the worker
/// threads, in the order they finish): for progress, or to store entries as they come.
///
/// `options.threads` threads pull runs from a shared queue; the sandbox and the prepared
/// candidate are shared by all, each run in its own instance. Nothing about one run stops
/// the others: a run that cannot be replayed (a trace refused, the function missing from the
/// candidate, a file the recording never read) is classed `not_replayable`, with the reason.
pub fn evaluate_each(
    sandbox: &Sandbox,
    candidate: &Prepared,
    runs: &[Run],
    options: &Options,
    each: impl Fn(usize, &Entry) + Sync,
) -> Report {
    let next = AtomicUsize::new(0);
    let entries: Mutex<Vec<Option<Entry>>> = Mutex::new(vec![None; runs.len()]);
    let threads = options.threads.get().min(runs.len());
    std::thread::scope(|scope| {
        for i in 0..threads {
            // Threads whose stacks run the calls in place.
            call_thread(format!("host-evaluate-{i}"))
                .spawn_scoped(scope, || {
                    loop {
                        let index = next.fetch_add(1, Ordering::Relaxed);
                        let Some(run) = runs.get(index) else { break };
                        let entry = evaluate_run(sandbox, candidate, run, options.tolerance);
                        each(index, &entry);
                        entries.lock().unwrap_or_else(|e| e.into_inner())[index] = Some(entry);
                    }
                })
                .expect("failed to start an evaluation thread");
        }
    });
    let runs: Vec<Entry> = entries
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .map(|e| e.expect("every run was evaluated"))
        .collect();
    let mut summary = Summary::default();
    for entry in &runs {
        summary.add(entry.class);
    }
    Report {
        candidate: candidate.bundle.version.clone(),
        notebook: candidate.bundle.manifest.notebook.clone(),
        tolerance: options.tolerance,
        summary,
        runs,
    }
}

/// One run on the candidate, classed, on the calling thread: for a caller that schedules
/// runs itself (`host serve` puts each on its worker pool, between calls).
pub fn evaluate_run(
    sandbox: &Sandbox,
    candidate: &Prepared,
    run: &Run,
    tolerance: Tolerance,
) -> Entry {
    let started = Instant::now();
    let mut entry = Entry {
        run: run.id.clone(),
        function: String::new(),
        class: Class::NotReplayable,
        recorded_version: None,
        recorded_at: None,
        recorded: None,
        candidate: None,
        differences: Vec::new(),
        failure: None,
        reason: None,
        notes: Vec::new(),
        duration_ms: 0.0,
    };
    match &run.trace {
        Err(unavailable) => {
            entry.function = unavailable.function.clone();
            entry.reason = Some(unavailable.reason.clone());
        }
        Ok(trace) => {
            let h = &trace.header;
            entry.function = h.function.clone();
            entry.recorded_version = Some(h.bundle.version.clone());
            entry.recorded_at = Some(h.recorded_at.clone());
            entry.recorded = Some(trace.outputs.outcome.clone());
            match what_if_prepared(sandbox, trace, candidate) {
                Ok(what_if) => classify(&mut entry, &what_if, tolerance),
                Err(e) => entry.reason = Some(format!("{e:#}")),
            }
        }
    }
    entry.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
    entry
}

/// Fills in the class, differences, failure and reason of a run that ran on the candidate.
fn classify(entry: &mut Entry, what_if: &WhatIf, tolerance: Tolerance) {
    let recorded = &what_if.recorded;
    let outcome = &what_if.result.outcome;
    entry.candidate = Some(outcome.to_json());
    let live = (!what_if.live.none()).then(|| what_if.live.to_string());
    let mut differences = Vec::new();
    let class = match (recorded.get("returned"), outcome) {
        (Some(before), Outcome::Returned(after)) => {
            diff(before, after, "result", tolerance, &mut differences);
            if differences.is_empty() {
                Class::Same
            } else {
                Class::Changed
            }
        }
        (Some(_), failed) => {
            entry.failure = Some(failure(failed));
            Class::NewlyFailing
        }
        (None, Outcome::Returned(_)) => Class::Fixed,
        (None, failed) => {
            diff(
                &failure_kind(recorded),
                &failure_kind(&failed.to_json()),
                "",
                Tolerance::EXACT,
                &mut differences,
            );
            if differences.is_empty() {
                Class::Same
            } else {
                Class::Changed
            }
        }
    };
    entry.differences = differences;
    entry.class = class;
    if !what_if.unrecorded.is_empty() {
        // The rebuilt files lack what the candidate read: whatever it returned, production
        // would have given it other input.
        entry.class = Class::NotReplayable;
        entry.reason = Some(format!(
            "the candidate read what the recording does not hold: {}",
            what_if.unrecorded.join("; ")
        ));
    } else if let Some(live) = live {
        if class == Class::Same {
            entry.notes.push(live);
        } else {
            // A different outcome may come from the live inputs, not from the candidate.
            entry.class = Class::NotReplayable;
            entry.reason = Some(format!(
                "{live}, so its different outcome may come from them rather than from the candidate"
            ));
        }
    }
}

/// A failure as a person reads it: the traceback, the limit, the interpreter's end.
fn failure(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Returned(_) => "it returned".to_owned(),
        Outcome::Raised(e) => e.to_string(),
        Outcome::Limit(l) => l.to_string(),
        Outcome::Exited(status) => {
            format!("the function ended the interpreter with exit status {status}")
        }
        Outcome::Crashed(why) => format!("the function ended the interpreter: {why}"),
        Outcome::Diverged(d) => d.to_string(),
    }
}

/// What two failures are compared on: an exception's phase, type and message (not its
/// frames, whose cells and lines move with any edit), or the whole of any other failure.
fn failure_kind(outcome: &Value) -> Value {
    match outcome.get("raised") {
        Some(e) => {
            json!({"raised": {"phase": e["phase"], "type": e["type"], "message": e["message"]}})
        }
        None => outcome.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_compare_on_type_and_message_not_on_where_they_were_raised() {
        let raised = |kind: &str, line: usize| {
            json!({"raised": {"phase": "call", "type": kind, "message": "bad",
                              "frames": [{"file": "nb.ipynb", "cell": 2, "line": line,
                                          "function": "f", "text": "raise"}]}})
        };
        assert_eq!(
            failure_kind(&raised("ValueError", 3)),
            failure_kind(&raised("ValueError", 9))
        );
        assert_ne!(
            failure_kind(&raised("ValueError", 3)),
            failure_kind(&raised("KeyError", 3))
        );
        assert_eq!(failure_kind(&json!({"limit": "x"})), json!({"limit": "x"}));
    }

    #[test]
    fn the_report_names_classes_as_its_json_does() {
        for class in Class::ALL {
            assert_eq!(serde_json::to_value(class).unwrap(), json!(class.name()));
        }
        let mut summary = Summary::default();
        for class in [Class::Same, Class::Same, Class::Fixed] {
            summary.add(class);
        }
        assert_eq!(
            (
                summary.total,
                summary.count(Class::Same),
                summary.count(Class::Fixed)
            ),
            (3, 2, 1)
        );
    }
}
