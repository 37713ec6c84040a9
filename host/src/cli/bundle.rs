//! `host bundle NOTEBOOK`: extract functions into a bundle file, and pre-initialise it.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::GlobalOptions;
use crate::bundle::{Bundle, Select, short};
use crate::error::Exit;
use crate::notebook::Notebook;
use crate::snapshot::Prepared;

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
}

pub fn bundle(global: &GlobalOptions, args: &BundleArgs) -> Result<Exit> {
    let notebook = Notebook::read(&args.notebook)?;
    let (_engine, sandbox) = global.sandbox()?;
    let functions: Vec<&str> = args.functions.iter().map(String::as_str).collect();
    let select = if functions.is_empty() {
        Select::All
    } else {
        Select::Only(&functions)
    };
    let bundle = Bundle::from_notebook(&sandbox, &notebook, select, args.label.as_deref())?;
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
    bundle.write(&output)?;
    let version = bundle.version.clone();
    let functions = bundle.manifest.functions.join(", ");
    if !args.no_image {
        let prepared = Prepared::new(&sandbox, bundle)?;
        if let Some(reason) = &prepared.unavailable {
            eprintln!(
                "host: note: no pre-initialised image; each call loads the source itself ({reason})"
            );
        }
    }
    eprintln!(
        "host: bundle {} ({functions}) written to {}",
        short(&version),
        output.display()
    );
    println!("{}", output.display());
    Ok(Exit::Success)
}
