//! `host bundle NOTEBOOK`: extract functions into a bundle file, and pre-initialise it.

use std::path::PathBuf;
use std::str::FromStr;

use anyhow::{Context, Result};
use clap::Args;

use super::run::{DEFAULT_MAX_INPUT, read_arguments};
use super::{GlobalOptions, check_output};
use crate::bundle::{Bundle, Select, short};
use crate::error::{Exit, bad_input};
use crate::files::SigningKey;
use crate::neighbours::Wheel;
use crate::notebook::Notebook;
use crate::preinit::Prepared;

#[derive(Debug, Args)]
pub struct BundleArgs {
    /// The notebook (.ipynb).
    pub notebook: PathBuf,
    /// A function to export (repeatable) [default: every function that can be extracted].
    #[arg(long = "function", short = 'f', value_name = "NAME")]
    pub functions: Vec<String>,
    /// Where to write the bundle [default: NOTEBOOK-VERSION.bundle.json beside the notebook].
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// A label recorded in the manifest, e.g. a release name.
    #[arg(long, value_name = "TEXT")]
    pub label: Option<String>,
    /// Do not build the pre-initialised image now (the first call builds it).
    #[arg(long)]
    pub no_image: bool,
    /// Call FUNCTION on this input file (as `host run --input` reads) before the image is
    /// saved (three times, samples in turn), so calls start with its one-time work done; what
    /// it leaves in module state is where every call starts (repeatable).
    #[arg(
        long = "warm-up",
        value_name = "FUNCTION=INPUT",
        conflicts_with = "no_image"
    )]
    pub warm_up: Vec<WarmUpSpec>,
    /// A pure-Python wheel whose modules the bundle carries, for a library the runtime does
    /// not have (repeatable).
    #[arg(long = "wheel", value_name = "FILE.whl")]
    pub wheels: Vec<PathBuf>,
}

/// `--warm-up FUNCTION=INPUT`.
#[derive(Debug, Clone)]
pub struct WarmUpSpec {
    pub function: String,
    pub input: PathBuf,
}

impl FromStr for WarmUpSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<WarmUpSpec> {
        s.split_once('=')
            .filter(|(f, i)| !f.is_empty() && !i.is_empty())
            .map(|(function, input)| WarmUpSpec {
                function: function.to_owned(),
                input: PathBuf::from(input),
            })
            .ok_or_else(|| bad_input(format!("--warm-up `{s}`: expected FUNCTION=INPUT")))
    }
}

pub fn bundle(global: &GlobalOptions, args: &BundleArgs) -> Result<Exit> {
    if let Some(path) = &args.output {
        check_output(path, "-o")?;
    }
    let notebook = Notebook::read(&args.notebook)?;
    let (_engine, sandbox) = global.sandbox()?;
    let functions: Vec<&str> = args.functions.iter().map(String::as_str).collect();
    let select = if functions.is_empty() {
        Select::All
    } else {
        Select::Only(&functions)
    };
    let wheels = args
        .wheels
        .iter()
        .map(|w| Wheel::read(w))
        .collect::<Result<Vec<_>>>()?;
    let mut bundle =
        Bundle::from_notebook_with(&sandbox, &notebook, select, args.label.as_deref(), &wheels)?;
    for spec in &args.warm_up {
        let arguments = read_arguments(&spec.input, DEFAULT_MAX_INPUT)
            .with_context(|| format!("--warm-up `{}={}`", spec.function, spec.input.display()))?;
        bundle = bundle.warm_up(&spec.function, &arguments)?;
    }
    for warning in &bundle.manifest.warnings {
        eprintln!("host: warning: {warning}");
    }
    let output = args.output.clone().unwrap_or_else(|| {
        let stem = args
            .notebook
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy();
        args.notebook
            .with_file_name(format!("{stem}-{}.bundle.json", short(&bundle.version)))
    });
    let bundle = if args.no_image {
        bundle
    } else {
        let prepared = Prepared::new(&sandbox, bundle)?;
        if let Some(reason) = &prepared.unavailable {
            // A warm-up that was asked for and cannot run is the user's to fix first.
            if !prepared.bundle.manifest.warm_up.is_empty() {
                return Err(bad_input(format!(
                    "--warm-up: no bundle written, as there is no pre-initialised image: {reason}"
                )));
            }
            eprintln!(
                "host: note: no pre-initialised image; each call loads the source itself ({reason})"
            );
        }
        prepared.bundle
    };
    bundle.write(&output, SigningKey::from_env()?.as_ref())?;
    let version = &bundle.version;
    let functions = bundle.manifest.functions.join(", ");
    eprintln!(
        "host: bundle {} ({functions}) written to {}",
        short(version),
        output.display()
    );
    println!("{}", output.display());
    Ok(Exit::Success)
}
