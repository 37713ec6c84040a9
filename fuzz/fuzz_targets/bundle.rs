//! `Bundle::sniff` and `Bundle::parse` on any bytes: a bundle that parses was not changed
//! after it was made, and is recognised as one.
#![no_main]

use std::path::Path;

use host::Bundle;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let sniffed = Bundle::sniff(data);
    let Ok(bundle) = Bundle::parse(Path::new("fuzz.bundle"), data) else {
        return;
    };
    assert!(sniffed, "a bundle that parses is sniffed as one");
    bundle
        .check_version()
        .expect("a parsed bundle's version matches its content");
    for function in &bundle.manifest.functions {
        bundle.check_function(function).unwrap();
    }
    // What `host bundle` writes reads back as the same bundle.
    let written = serde_json::to_vec(&bundle).unwrap();
    let again = Bundle::parse(Path::new("fuzz.bundle"), &written).unwrap();
    assert_eq!(again.version, bundle.version);
});
