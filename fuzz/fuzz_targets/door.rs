//! The host side of the door: the guest's messages (NUL-separated in the input) parsed and
//! handled by a door that has every answer, and an `output` message's analysis run through
//! extraction as `host run` would (a closure and the kept source for every function).
#![no_main]

use std::path::PathBuf;

use host::door::{
    AnalysisInput, BundleSource, CallInput, CellSource, Chunk, Door, GuestMessage, WarmUp,
};
use host::extract::Extraction;
use host::notebook::{Cell, CellKind, Notebook};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut door = door();
    for request in data.split(|&b| b == 0) {
        if let Ok(message) = GuestMessage::parse(request) {
            // What host keeps of a message reads back the same.
            let json = serde_json::to_vec(&message).unwrap();
            assert_eq!(GuestMessage::parse(&json).unwrap(), message);
        }
        let _ = door.handle(request);
    }
    let _ = door.check();
    for message in &door.received {
        match message {
            GuestMessage::Output(analysis) => extract(analysis.clone()),
            GuestMessage::Error(exception) => drop(exception.to_string()),
            _ => {}
        }
    }
});

/// A door with an answer to every question the guest may ask.
fn door() -> Door {
    let chunks = [Chunk {
        cell: 1,
        text: "def f(x):\n    return x\n".into(),
    }];
    let warm_up = [WarmUp {
        function: "f".into(),
        args: vec![serde_json::json!(1)],
        kwargs: Default::default(),
    }];
    Door::default()
        .input(&AnalysisInput {
            cells: vec![CellSource {
                index: 1,
                source: "def f(x):\n    return x\n",
                export: false,
            }],
        })
        .bundle(
            &BundleSource {
                notebook: "fuzz.ipynb",
                chunks: &chunks,
                modules: &[],
            },
            &warm_up,
        )
        .call(&CallInput {
            function: "f",
            env: Default::default(),
            args: &[],
            kwargs: &Default::default(),
        })
}

/// Extraction of every function of an analysis, on a notebook made of the analysis's cells.
fn extract(analysis: host::door::Analysis) {
    let notebook = Notebook {
        name: "fuzz.ipynb".into(),
        path: PathBuf::from("fuzz.ipynb"),
        sha256: String::new(),
        cells: analysis
            .cells
            .iter()
            .map(|c| Cell {
                number: c.index,
                kind: CellKind::Code,
                source: c.text.clone().unwrap_or_default(),
                tags: Vec::new(),
            })
            .collect(),
    };
    let extraction = Extraction::new(&notebook, analysis);
    let functions: Vec<String> = extraction
        .functions()
        .into_iter()
        .map(String::from)
        .collect();
    for function in functions.iter().map(String::as_str).chain(["not_defined"]) {
        if let Ok(closure) = extraction.closure(function) {
            let _ = extraction.source(&closure);
            let _ = extraction.summary(&closure);
        }
    }
}
