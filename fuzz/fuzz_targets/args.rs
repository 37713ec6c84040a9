//! The command line and every value parsed from it: `Cli::try_parse_from` (as it does it) on
//! an argv made of the input's NUL-separated parts, each part as a grant, a size, a time limit
//! and an environment variable, and the whole input as an `--input` file's JSON.
#![no_main]

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

use std::sync::LazyLock;

use clap::{CommandFactory, FromArgMatches};
use host::cli::{Cli, Command};
use host::policy::{EnvVar, Grant, MAX_TIMEOUT, Size, Timeout};
use libfuzzer_sys::fuzz_target;

/// The command, built (and checked, under debug assertions) once: `Cli::try_parse_from` does
/// both on every call, which would be most of each run.
static COMMAND: LazyLock<clap::Command> = LazyLock::new(|| {
    let mut command = Cli::command();
    command.build();
    command
});

fuzz_target!(|data: &[u8]| {
    let _ = host::Arguments::from_json("fuzz", data);
    let parts: Vec<&[u8]> = data.split(|&b| b == 0).collect();
    for part in parts.iter().filter_map(|p| std::str::from_utf8(p).ok()) {
        if let Ok(g) = part.parse::<Grant>() {
            assert!(g.guest.starts_with('/') && g.guest != "/", "{g:?}");
        }
        let _ = part.parse::<Size>();
        if let Ok(Timeout(t)) = part.parse::<Timeout>() {
            assert!(t <= MAX_TIMEOUT, "{t:?}");
        }
        let _ = part.parse::<EnvVar>();
    }
    let argv = std::iter::once(OsString::from("host"))
        .chain(parts.iter().map(|p| OsString::from_vec(p.to_vec())));
    // `Cli::try_parse_from`, on the command built once.
    let parsed = COMMAND
        .clone()
        .try_get_matches_from(argv)
        .and_then(|mut matches| Cli::from_arg_matches_mut(&mut matches));
    match parsed {
        // What a user would see: the usage, the help or the version.
        Err(e) => drop(e.render().to_string()),
        Ok(cli) => {
            if let Command::Run(run) = &cli.command {
                let _ = run.sandbox.policy();
                if run.input.input.is_none() {
                    let _ = run.input.arguments();
                }
            }
        }
    }
});
