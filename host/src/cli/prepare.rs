//! `host prepare`: compile the runtime, and write its initial memory image, ahead of the
//! first call.

use anyhow::Result;

use super::{GlobalOptions, say};
use crate::engine::Engine;
use crate::error::Exit;
use crate::runtime::Runtime;
use crate::sandbox::Sandbox;

pub fn prepare(global: &GlobalOptions) -> Result<Exit> {
    let runtime = Runtime::locate(global.runtime.as_deref())?;
    let engine = Engine::new(global.cache_dir.clone())?;
    Sandbox::new(&engine, &runtime)?;
    say(format_args!(
        "runtime compiled and cached in {}",
        engine.cache().path().display()
    ));
    Ok(Exit::Success)
}
