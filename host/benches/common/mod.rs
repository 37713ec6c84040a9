//! What both bench programs measure with and print: latency statistics, child processes,
//! and the way figures and targets are shown.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A latency distribution.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    pub n: usize,
    pub p50: Duration,
    pub p99: Duration,
}

/// Runs `f` `n` times, one after another, and times each run.
pub fn sample(n: usize, mut f: impl FnMut() -> Result<()>) -> Result<Stats> {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed());
    }
    Ok(stats(times))
}

/// The distribution of `times` (at least one).
pub fn stats(mut times: Vec<Duration>) -> Stats {
    times.sort();
    let at = |q: f64| times[((times.len() as f64 * q).ceil() as usize).clamp(1, times.len()) - 1];
    Stats {
        n: times.len(),
        p50: at(0.50),
        p99: at(0.99),
    }
}

/// Runs a command to its end; its stderr is the error when it fails.
pub fn run(command: &mut Command) -> Result<()> {
    let out = command
        .output()
        .with_context(|| format!("failed to start {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

pub fn ratio(slow: Duration, fast: Duration) -> f64 {
    slow.as_secs_f64() / fast.as_secs_f64()
}

pub fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}
