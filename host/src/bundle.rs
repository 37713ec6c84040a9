//! A bundle: the source a set of functions needs, extracted from a notebook, with a manifest.
//!
//! A bundle is small (kilobytes: source and metadata, never the interpreter), self-contained
//! (calling it needs no notebook) and content-addressed: its [`Bundle::version`] is a hash of
//! the extracted source, the functions, the runtime's hash and any warm-up calls, so the same
//! notebook content always makes the same version, and anything that changes what runs
//! changes it.

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::door::{Arguments, BundleSource, Chunk, Door, Module, WarmUp};
use crate::error::bad_input;
use crate::extract::{self, Closure, Extraction, StatementSummary};
use crate::files::{
    MAX_NOTEBOOK, SigningKey, is_signed, read_regular, sealed, unsealed, write_private,
};
use crate::neighbours::{self, Wheel};
use crate::notebook::Notebook;
use crate::sandbox::Sandbox;

/// The `format` field of a bundle file.
pub const FORMAT: &str = "host-bundle/1";

/// Extracted source and what it offers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bundle {
    pub format: String,
    /// sha256 of the notebook name, the kept source, the functions, the runtime's hash and the
    /// warm-up calls.
    pub version: String,
    pub manifest: Manifest,
    /// The kept source, cell by cell, each line at its notebook line number.
    pub chunks: Vec<Chunk>,
    /// Modules the source imports that the runtime does not have: the notebook's neighbours
    /// (a `.py` file, a package folder, a sibling notebook's kept cells) and the modules of
    /// the wheels given with `--wheel`. Part of the version.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub modules: Vec<Module>,
    /// sha256 of everything above (the bundle as compact JSON with this field empty): the
    /// version covers what runs, so a label or a date can differ between bundles of one
    /// version, and this covers the rest, so no field of a bundle can be edited unnoticed.
    #[serde(default)]
    pub sha256: String,
}

/// What a bundle records about where it came from and what it holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The notebook's file name, which tracebacks show.
    pub notebook: String,
    /// sha256 of the notebook file's bytes.
    pub notebook_sha256: String,
    /// The functions this bundle can call.
    pub functions: Vec<String>,
    /// sha256 of the runtime wheel the bundle was made for.
    pub runtime_sha256: String,
    /// The version of host that made it.
    pub host_version: String,
    /// When it was made (UTC, RFC 3339). Not part of the version.
    pub created: String,
    /// A free-form label (`--label`), e.g. a release name. Not part of the version.
    pub label: Option<String>,
    /// For each function, the statements it needs: the source map from the bundle back to
    /// the notebook's cells and lines.
    pub closures: Vec<FunctionClosure>,
    /// What extraction noticed that does not stop a call.
    pub warnings: Vec<String>,
    /// Samples called while the image is built (`host bundle --warm-up`), in turn, three
    /// rounds. Part of the version: what they leave in module state is where every call
    /// starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warm_up: Vec<WarmUp>,
}

/// One function's dependency closure, as the manifest records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionClosure {
    pub function: String,
    pub statements: Vec<StatementSummary>,
}

/// What a path given as a notebook or a bundle holds.
pub enum Opened {
    Bundle(Box<Bundle>),
    Notebook(Notebook),
}

/// How to pick the functions of a new bundle.
#[derive(Debug, Clone, Copy)]
pub enum Select<'a> {
    /// These functions; any that cannot be extracted is an error.
    Only(&'a [&'a str]),
    /// Every function the notebook defines whose dependencies can be extracted; the others
    /// are left out with a warning.
    All,
}

impl Bundle {
    /// Extracts functions (and what they need) from `notebook`, with the modules next to it
    /// that they import.
    pub fn from_notebook(
        sandbox: &Sandbox,
        notebook: &Notebook,
        select: Select<'_>,
        label: Option<&str>,
    ) -> Result<Bundle> {
        Self::from_notebook_with(sandbox, notebook, select, label, &[])
    }

    /// [`Bundle::from_notebook`], with the modules of pure-Python `wheels` carried too.
    pub fn from_notebook_with(
        sandbox: &Sandbox,
        notebook: &Notebook,
        select: Select<'_>,
        label: Option<&str>,
        wheels: &[Wheel],
    ) -> Result<Bundle> {
        let analysis = extract::analyse(sandbox, notebook)?;
        let extraction = Extraction::new(notebook, analysis);
        // Each function's closure, computed once: the manifest lists them, and their union
        // is the bundle's source.
        let mut warnings = Vec::new();
        let mut per_function: Vec<(&str, Closure)> = Vec::new();
        match select {
            Select::Only(functions) => {
                for &f in functions {
                    per_function.push((f, extraction.closure(f)?));
                }
            }
            Select::All => {
                for f in extraction.functions() {
                    // A function whose imports cannot be found is left out like one whose
                    // globals cannot be.
                    let closure = extraction.closure(f).and_then(|closure| {
                        let folder = notebook.folder();
                        neighbours::gather(
                            sandbox,
                            folder,
                            &extraction,
                            &closure.statements,
                            wheels,
                        )?;
                        Ok(closure)
                    });
                    match closure {
                        Ok(closure) => per_function.push((f, closure)),
                        Err(why) => {
                            warnings.push(format!("`{f}` is left out of the bundle: {why:#}"))
                        }
                    }
                }
                if per_function.is_empty() {
                    let reasons: String = warnings.iter().map(|w| format!("\n  {w}")).collect();
                    return Err(bad_input(format!(
                        "{} has no function host can extract{reasons}",
                        notebook.name
                    )));
                }
            }
        }
        let mut closure = Closure {
            statements: Default::default(),
            warnings: Vec::new(),
        };
        for (_, c) in &per_function {
            closure.statements.extend(c.statements.iter().copied());
            for w in &c.warnings {
                if !warnings.contains(w) {
                    warnings.push(w.clone());
                }
            }
        }
        let closures = per_function
            .iter()
            .map(|(f, c)| FunctionClosure {
                function: f.to_string(),
                statements: extraction.summary(c),
            })
            .collect();
        let functions: Vec<String> = per_function.iter().map(|(f, _)| f.to_string()).collect();
        let chunks = extraction.source(&closure);
        let modules = neighbours::gather(
            sandbox,
            notebook.folder(),
            &extraction,
            &closure.statements,
            wheels,
        )?;
        let runtime_sha256 = sandbox.runtime().sha256().to_owned();
        let mut bundle = Bundle {
            format: FORMAT.to_owned(),
            version: String::new(),
            manifest: Manifest {
                notebook: notebook.name.clone(),
                notebook_sha256: notebook.sha256.clone(),
                functions,
                runtime_sha256,
                host_version: env!("CARGO_PKG_VERSION").to_owned(),
                created: now_rfc3339(),
                label: label.map(str::to_owned),
                closures,
                warnings,
                warm_up: Vec::new(),
            },
            chunks,
            modules,
            sha256: String::new(),
        };
        bundle.seal();
        Ok(bundle)
    }

    /// The bundle with one more warm-up sample for `function` (one it offers), and the
    /// version that makes. The guest calls the samples in turn, three rounds, before the
    /// image is saved.
    pub fn warm_up(mut self, function: &str, arguments: &Arguments) -> Result<Bundle> {
        self.check_function(function)?;
        self.manifest.warm_up.push(WarmUp {
            function: function.to_owned(),
            args: arguments.args.clone(),
            kwargs: arguments.kwargs.clone(),
        });
        self.seal();
        Ok(self)
    }

    /// A bundle from a path that holds either a bundle or a notebook (which is extracted now,
    /// its analysis cached by content). With `key`, a bundle must be signed with it.
    pub fn open(
        sandbox: &Sandbox,
        path: &Path,
        select: Select<'_>,
        key: Option<&SigningKey>,
        wheels: &[Wheel],
    ) -> Result<Bundle> {
        match Self::read(path, key)? {
            Opened::Bundle(_) if !wheels.is_empty() => Err(bad_input(format!(
                "--wheel: `{}` is a bundle, which carries the wheels it was made with; \
                 --wheel goes with a notebook",
                path.display()
            ))),
            Opened::Bundle(bundle) => {
                if let Select::Only(functions) = select {
                    for f in functions {
                        bundle.check_function(f)?;
                    }
                }
                Ok(*bundle)
            }
            Opened::Notebook(notebook) => {
                Self::from_notebook_with(sandbox, &notebook, select, None, wheels)
            }
        }
    }

    /// Reads a path that holds a bundle (checked, and with `key` its signature too) or a
    /// notebook.
    pub fn read(path: &Path, key: Option<&SigningKey>) -> Result<Opened> {
        let bytes = read_regular(path, "notebook or bundle", MAX_NOTEBOOK)?;
        if is_signed(&bytes) || Self::sniff(&bytes) {
            let body = unsealed(key, &bytes, &format!("bundle `{}`", path.display()))?;
            return Ok(Opened::Bundle(Box::new(Self::parse(path, body)?)));
        }
        Ok(Opened::Notebook(Notebook::parse(path, &bytes)?))
    }

    /// Parses bundle bytes; `path` names the bundle in messages.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Bundle> {
        let bundle: Bundle = serde_json::from_slice(bytes)
            .map_err(|e| bad_input(format!("`{}` is not a host bundle: {e}", path.display())))?;
        if bundle.format != FORMAT {
            return Err(bad_input(format!(
                "`{}` is a bundle of format `{}`; this host reads `{FORMAT}`",
                path.display(),
                bundle.format
            )));
        }
        bundle
            .check_version()
            .with_context(|| format!("bundle `{}`", path.display()))?;
        Ok(bundle)
    }

    /// What the bundle's content hashes to: its version, unless it was changed.
    fn content_version(&self) -> String {
        let m = &self.manifest;
        version(
            &m.notebook,
            &self.chunks,
            &m.functions,
            &m.runtime_sha256,
            &m.warm_up,
            &self.modules,
        )
    }

    /// sha256 of the whole bundle but this field: [`Bundle::sha256`].
    fn content_sha256(&self) -> String {
        let unsealed = Bundle {
            sha256: String::new(),
            ..self.clone()
        };
        hex::encode(Sha256::digest(
            serde_json::to_vec(&unsealed).expect("a bundle is JSON"),
        ))
    }

    /// Sets the version and the sha256 from the content, after it was made or changed.
    fn seal(&mut self) {
        self.version = self.content_version();
        self.sha256 = self.content_sha256();
    }

    /// Refuses a bundle whose content does not hash to its version and its sha256: it was
    /// changed after it was made, in what runs or in its manifest.
    pub fn check_version(&self) -> Result<()> {
        let expected = self.content_version();
        if expected != self.version {
            return Err(bad_input(format!(
                "was changed after it was made: its content hashes to {expected}, not to its version {}",
                self.version
            )));
        }
        if self.sha256.is_empty() {
            return Err(bad_input(
                "has no sha256 of its content (it was made by an older host): make it again with `host bundle`",
            ));
        }
        let sha256 = self.content_sha256();
        if sha256 != self.sha256 {
            return Err(bad_input(format!(
                "was changed after it was made: its manifest and source hash to {}, not to its sha256 {}",
                short(&sha256),
                short(&self.sha256)
            )));
        }
        Ok(())
    }

    /// Writes the bundle as JSON, owner-only and atomically, signed with `key` when given.
    pub fn write(&self, path: &Path, key: Option<&SigningKey>) -> Result<()> {
        let mut text = serde_json::to_string_pretty(self)?;
        text.push('\n');
        write_private(path, &sealed(key, text.into_bytes()))
            .with_context(|| format!("failed to write bundle `{}`", path.display()))
    }

    /// Refuses a bundle made for another runtime: its source was analysed, and will be
    /// snapshotted, by that runtime's interpreter.
    pub fn check_runtime(&self, sandbox: &Sandbox) -> Result<()> {
        if self.manifest.runtime_sha256 == sandbox.runtime().sha256() {
            return Ok(());
        }
        Err(bad_input(format!(
            "this bundle of {} was made for runtime {}, and this host runs {}: make it again with `host bundle`",
            self.manifest.notebook,
            short(&self.manifest.runtime_sha256),
            short(sandbox.runtime().sha256())
        )))
    }

    /// `door` with the answers to the guest's `load()` (the source) and `warm_up()` (the
    /// warm-up calls).
    pub(crate) fn load_answers(&self, door: Door) -> Door {
        let source = BundleSource {
            notebook: &self.manifest.notebook,
            chunks: &self.chunks,
            modules: &self.modules,
        };
        door.bundle(&source, &self.manifest.warm_up)
    }

    /// Refuses a function the bundle was not made for.
    pub fn check_function(&self, function: &str) -> Result<()> {
        if self.manifest.functions.iter().any(|f| f == function) {
            return Ok(());
        }
        Err(bad_input(format!(
            "this bundle of {} offers {}, not `{function}`",
            self.manifest.notebook,
            self.manifest.functions.join(", ")
        )))
    }

    /// Whether these bytes look like a bundle rather than a notebook.
    pub fn sniff(bytes: &[u8]) -> bool {
        #[derive(Deserialize)]
        struct Probe {
            format: Option<String>,
        }
        serde_json::from_slice::<Probe>(bytes)
            .is_ok_and(|p| p.format.is_some_and(|f| f.starts_with("host-bundle/")))
    }
}

/// The content hash that names a bundle.
fn version(
    notebook: &str,
    chunks: &[Chunk],
    functions: &[String],
    runtime_sha256: &str,
    warm_up: &[WarmUp],
    modules: &[Module],
) -> String {
    #[derive(Serialize)]
    struct Versioned<'a> {
        notebook: &'a str,
        chunks: &'a [Chunk],
        functions: &'a [String],
        runtime_sha256: &'a str,
        // Absent when empty, so bundles without warm-up keep the versions they had.
        #[serde(skip_serializing_if = "<[WarmUp]>::is_empty")]
        warm_up: &'a [WarmUp],
        // Absent when empty too, for the same reason.
        #[serde(skip_serializing_if = "<[Module]>::is_empty")]
        modules: &'a [Module],
    }
    let canonical = serde_json::to_vec(&Versioned {
        notebook,
        chunks,
        functions,
        runtime_sha256,
        warm_up,
        modules,
    })
    .unwrap();
    hex::encode(Sha256::digest(canonical))
}

/// The first 12 hex digits: enough to tell versions apart in messages and file names.
pub fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

/// The current UTC time as RFC 3339, to the second.
pub(crate) fn now_rfc3339() -> String {
    rfc3339(std::time::SystemTime::now())
}

/// A time as UTC RFC 3339 to the second: `2026-09-01T12:00:00Z`.
pub fn rfc3339(at: std::time::SystemTime) -> String {
    let c = Civil::of(at);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        c.year, c.month, c.day, c.hour, c.minute, c.second
    )
}

/// A time as the run store writes it: UTC RFC 3339 to the millisecond,
/// `2026-09-01T12:00:00.250Z`. Times of this one shape compare as text in time order.
pub fn rfc3339_ms(at: std::time::SystemTime) -> String {
    let c = Civil::of(at);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        c.year, c.month, c.day, c.hour, c.minute, c.second, c.millis
    )
}

/// A time's UTC calendar date and time of day.
struct Civil {
    year: i64,
    month: i64,
    day: i64,
    hour: u64,
    minute: u64,
    second: u64,
    millis: u32,
}

impl Civil {
    /// Times before 1970 count as 1970's first instant.
    fn of(at: std::time::SystemTime) -> Civil {
        let since = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let secs = since.as_secs();
        let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
        // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        Civil {
            year: yoe + era * 400 + i64::from(month <= 2),
            month,
            day,
            hour: rem / 3600,
            minute: rem % 3600 / 60,
            second: rem % 60,
            millis: since.subsec_millis(),
        }
    }
}

/// Reads an RFC 3339 time: `2026-09-01T12:00:00Z`, with a fraction of a second
/// (`12:00:00.25Z`), an offset (`14:00:00+02:00`), `t` or a space for `T`, or a date alone
/// (`2026-09-01`: its first instant, UTC); a space for the `+` of an offset, as a query
/// string's unescaped `+` arrives. None for anything else, or a time before 1970.
pub fn parse_rfc3339(text: &str) -> Option<std::time::SystemTime> {
    fn number(s: &str) -> Option<i64> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    }
    let t = text.trim();
    let (date, time) = match t.find(['T', 't', ' ']) {
        Some(i) => (&t[..i], Some(&t[i + 1..])),
        None => (t, None),
    };
    let mut parts = date.split('-');
    let (year, month, day) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || year.len() != 4 || month.len() != 2 || day.len() != 2 {
        return None;
    }
    let (year, month, day) = (number(year)?, number(month)?, number(day)?);
    // Days since 1970-01-01 from a civil date (Howard Hinnant's algorithm, the inverse of
    // `Civil::of`'s).
    let y = year - i64::from(month <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    // A date that does not exist (`02-30`, month 13) comes back as another one.
    let midnight = std::time::UNIX_EPOCH
        + std::time::Duration::from_secs(u64::try_from(days).ok()?.checked_mul(86_400)?);
    let back = Civil::of(midnight);
    if (back.year, back.month, back.day) != (year, month, day) {
        return None;
    }
    let mut ms = days * 86_400_000;
    if let Some(time) = time {
        let (clock, offset_ms) = if let Some(clock) = time.strip_suffix(['Z', 'z']) {
            (clock, 0)
        } else {
            // A space for `+`: what an unescaped `+` in a query string decodes to.
            let i = time.rfind(['+', '-', ' '])?;
            let (clock, offset) = (&time[..i], &time[i + 1..]);
            let (h, m) = offset.split_once(':')?;
            if h.len() != 2 || m.len() != 2 {
                return None;
            }
            let (h, m) = (number(h)?, number(m)?);
            if h > 23 || m > 59 {
                return None;
            }
            let sign = if time.as_bytes()[i] == b'-' { -1 } else { 1 };
            (clock, sign * (h * 60 + m) * 60_000)
        };
        let (clock, fraction) = match clock.split_once('.') {
            Some((clock, fraction)) => (clock, Some(fraction)),
            None => (clock, None),
        };
        let mut hms = clock.split(':');
        let (h, m, sec) = (hms.next()?, hms.next()?, hms.next()?);
        if hms.next().is_some() || [h, m, sec].iter().any(|p| p.len() != 2) {
            return None;
        }
        let (h, m, sec) = (number(h)?, number(m)?, number(sec)?);
        // 60: a leap second, read as the next instant.
        if h > 23 || m > 59 || sec > 60 {
            return None;
        }
        let fraction_ms = match fraction {
            None => 0,
            Some(f) => {
                number(f)?;
                format!("{f:0<3}")[..3].parse::<i64>().ok()?
            }
        };
        ms += ((h * 60 + m) * 60 + sec) * 1000 + fraction_ms - offset_ms;
    }
    let ms = u64::try_from(ms).ok()?;
    Some(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_change_with_what_runs_only() {
        let chunks = vec![Chunk {
            cell: 2,
            text: "def f():\n    return 1\n".into(),
        }];
        let v = version("nb.ipynb", &chunks, &["f".into()], "abc", &[], &[]);
        assert_eq!(
            v,
            version("nb.ipynb", &chunks, &["f".into()], "abc", &[], &[])
        );
        assert_ne!(
            v,
            version("nb.ipynb", &chunks, &["f".into()], "abd", &[], &[])
        );
        assert_ne!(
            v,
            version(
                "nb.ipynb",
                &chunks,
                &["f".into(), "g".into()],
                "abc",
                &[],
                &[]
            )
        );
        let changed = vec![Chunk {
            cell: 2,
            text: "def f():\n    return 2\n".into(),
        }];
        assert_ne!(
            v,
            version("nb.ipynb", &changed, &["f".into()], "abc", &[], &[])
        );
        let warm = [WarmUp {
            function: "f".into(),
            args: vec![serde_json::json!(1)],
            kwargs: Default::default(),
        }];
        assert_ne!(
            v,
            version("nb.ipynb", &chunks, &["f".into()], "abc", &warm, &[])
        );
        let module = crate::door::Module {
            name: "helpers".into(),
            file: "helpers.py".into(),
            package: false,
            chunks: Vec::new(),
            sha256: "00".into(),
        };
        let with = version(
            "nb.ipynb",
            &chunks,
            &["f".into()],
            "abc",
            &[],
            std::slice::from_ref(&module),
        );
        assert_ne!(v, with);
        let changed = crate::door::Module {
            sha256: "01".into(),
            ..module
        };
        assert_ne!(
            with,
            version("nb.ipynb", &chunks, &["f".into()], "abc", &[], &[changed])
        );
    }

    #[test]
    fn rfc3339_has_the_right_shape() {
        let now = now_rfc3339();
        assert_eq!(now.len(), 20, "{now}");
        assert!(now.starts_with("20") && now.ends_with('Z'));
    }

    #[test]
    fn rfc3339_times_read_back_to_the_instant_they_name() {
        let at = |text: &str| parse_rfc3339(text).map(rfc3339_ms);
        let noon = Some("2024-02-29T12:00:00.000Z".to_owned());
        for same in [
            "2024-02-29T12:00:00Z",
            "2024-02-29t12:00:00z",
            "2024-02-29 12:00:00Z",
            "2024-02-29T14:00:00+02:00",
            "2024-02-29T14:00:00 02:00",
            "2024-02-29 14:00:00 02:00",
            "2024-02-29T07:30:00-04:30",
            "2024-02-29T12:00:00.0004Z",
            " 2024-02-29T12:00:00Z ",
        ] {
            assert_eq!(at(same), noon, "{same}");
        }
        assert_eq!(
            at("2024-02-29T12:00:00.25Z").unwrap(),
            "2024-02-29T12:00:00.250Z"
        );
        assert_eq!(at("2024-03-01").unwrap(), "2024-03-01T00:00:00.000Z");
        assert_eq!(
            at("1970-01-01T00:00:00Z").unwrap(),
            "1970-01-01T00:00:00.000Z"
        );
        assert_eq!(
            at("2000-12-31T23:59:59.999Z").unwrap(),
            "2000-12-31T23:59:59.999Z"
        );
        // Every day of four years (a leap year among them) goes there and back.
        let start = parse_rfc3339("2023-01-01").unwrap();
        for day in 0..4 * 366 {
            let t = start + std::time::Duration::from_secs(day * 86_400 + 3_723);
            assert_eq!(parse_rfc3339(&rfc3339_ms(t)), Some(t));
            assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t));
        }
        for bad in [
            "",
            "yesterday",
            "24h",
            "2023-02-29",
            "2024-13-01",
            "2024-00-10",
            "2024-1-01",
            "2024-01-01T12:00Z",
            "2024-01-01T12:00:00",
            "2024-01-01T24:00:00Z",
            "2024-01-01T12:00:00.Z",
            "2024-01-01T12:00:00.x1Z",
            "2024-01-01T12:00:00+2:00",
            "2024-01-01T12:00:00+25:00",
            "2024-01-01T12:00:00  02:00",
            "2024-01-01T12:00:00 Z",
            "1969-12-31T23:59:59Z",
            "+2024-01-01",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }
}
