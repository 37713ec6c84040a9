//! `Notebook::parse` on any bytes: an error or a notebook, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(notebook) = host::Notebook::parse(Path::new("fuzz.ipynb"), data) else {
        return;
    };
    for (i, cell) in notebook.cells.iter().enumerate() {
        assert_eq!(cell.number, i + 1, "cells are numbered from 1, all counted");
    }
    for cell in notebook.code_cells() {
        let _ = cell.is_exported();
    }
});
