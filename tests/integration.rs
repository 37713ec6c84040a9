//! Integration tests: the real `host` binary, the real Python runtime, real Wasmtime.
//!
//! Each test makes its own temporary directory and notebook. The runtime is compiled once
//! (and cached on disk) before the first test that needs it.

mod common;

/// Hostile input of every kind, one line per case: refused or contained, nothing outside changed.
mod attacks;
/// `host bundle`, `host inspect`, versions and pre-initialised images.
mod bundles;
/// Arguments in, JSON out, exceptions and exit codes.
mod calling;
/// `host evaluate`: a candidate run on recorded calls, each classed against its recording.
mod evaluate;
/// `host run` on the example notebooks in `notebooks/`, as `make demo` runs them.
mod examples;
/// Which statements are kept, the dependency closure, and the refusals.
mod extraction;
/// Notebooks written the ways real ones are behave as in Jupyter (issue 11).
mod fidelity;
/// The library without the CLI: one engine, many concurrent calls.
mod library;
/// Memory, time and output limits.
mod limits;
/// Reading `.ipynb` files, good and broken.
mod notebooks;
/// `host run --record` and `host replay`: round trips, tampering, divergence, what-if.
mod replay;
/// Several `host serve` replicas on one PostgreSQL, under faults (issue 13).
mod replicas;
/// Rolling out through aliases: canary, shadow, moves gated on an evaluation (issue 14).
mod rollout;
/// What the sandbox lets the function see: grants, escapes, environment, network.
mod sandbox;
/// `host serve`: deploys, calls, tenants, the run store, lifecycle, over real HTTP.
mod serve;
/// `host serve`'s web UI in a real headless Chromium: runs, aliases, an evaluation's diff.
mod ui;
