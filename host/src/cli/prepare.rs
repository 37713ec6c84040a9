//! `host prepare`: compile the runtime ahead of the first call.

use anyhow::Result;

use super::GlobalOptions;
use crate::engine::Engine;
use crate::error::Exit;
use crate::runtime::Runtime;

pub fn prepare(global: &GlobalOptions) -> Result<Exit> {
    let runtime = Runtime::locate(global.runtime.as_deref())?;
    let engine = Engine::new(global.cache_dir.clone())?;
    engine.interpreter(&runtime)?;
    eprintln!(
        "host: runtime compiled and cached in {}",
        engine.cache().path().display()
    );
    Ok(Exit::Success)
}
