//! What the bench programs measure with and print: latency statistics, child processes
//! (`host serve` among them), and the way figures and targets are shown.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
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

/// The machine's CPU time so far, all cores, in clock ticks, from `/proc/stat`: how much of
/// it the hypervisor gave to someone else (steal) and how much there was in all.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuTime {
    pub stolen: u64,
    pub total: u64,
}

impl CpuTime {
    /// Now; zero where `/proc/stat` is not there to read (then nothing is shown as stolen).
    pub fn now() -> CpuTime {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
            return CpuTime::default();
        };
        // user nice system idle iowait irq softirq steal (guest time is inside user).
        let fields: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .take(8)
            .filter_map(|f| f.parse().ok())
            .collect();
        CpuTime {
            stolen: fields.get(7).copied().unwrap_or(0),
            total: fields.iter().sum(),
        }
    }

    /// What passed between `earlier` and now.
    pub fn since(earlier: CpuTime) -> CpuTime {
        let now = CpuTime::now();
        CpuTime {
            stolen: now.stolen.saturating_sub(earlier.stolen),
            total: now.total.saturating_sub(earlier.total),
        }
    }

    pub fn add(&mut self, other: CpuTime) {
        self.stolen += other.stolen;
        self.total += other.total;
    }

    /// The share of the cores' time the hypervisor took, in percent: on a shared virtual
    /// machine the same code runs slower while it is high, and two busy cores lose more of
    /// it than one, which shows in any figure that compares 2 clients with 1.
    pub fn stolen_percent(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.stolen as f64 * 100.0 / self.total as f64
        }
    }
}

/// The repository's root: the notebooks, and the release build under `target/`.
pub fn repo() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ is inside the repository")
        .to_owned()
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

/// Starts `host serve` (the `host` binary) on a loopback port with `config` and `data`, and
/// waits until it is ready (the first start on a machine compiles the runtime): the process,
/// its URL, and what it writes to stderr, as it comes.
pub fn host_serve(
    host: &Path,
    config: &Path,
    data: &Path,
) -> Result<(Child, String, Arc<Mutex<String>>)> {
    let mut command = Command::new(host);
    command
        .arg("serve")
        .args(["--listen", "127.0.0.1:0", "--config"])
        .arg(config)
        .arg("--data")
        .arg(data)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = command.spawn().context("failed to start host serve")?;
    let stderr = child.stderr.take().context("no stderr")?;
    let ready = listening(stderr, "host: listening on ").and_then(|(url, log)| {
        let started = Instant::now();
        while agent().get(format!("{url}/readyz")).call()?.status() != 200 {
            if started.elapsed() > Duration::from_secs(600) {
                bail!(
                    "host serve was not ready in 10 minutes:\n{}",
                    log.lock().unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok((url, log))
    });
    match ready {
        Ok((url, log)) => Ok((child, url, log)),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e)
        }
    }
}

/// A client whose answers are never errors for their status: the caller looks at it.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent()
}

/// Reads a server's output until its `prefix` line gives its URL, then keeps reading it
/// into a log in the background, so the server never blocks on a full pipe.
pub fn listening(
    output: impl std::io::Read + Send + 'static,
    prefix: &'static str,
) -> Result<(String, Arc<Mutex<String>>)> {
    let mut lines = BufReader::new(output).lines();
    let log = Arc::new(Mutex::new(String::new()));
    let url = loop {
        let line = lines
            .next()
            .with_context(|| {
                format!(
                    "the server ended before listening:\n{}",
                    log.lock().unwrap()
                )
            })?
            .context("failed to read the server's output")?;
        log.lock().unwrap().push_str(&format!("{line}\n"));
        if let Some(url) = line.strip_prefix(prefix) {
            break url.trim().to_owned();
        }
    };
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            sink.lock().unwrap().push_str(&format!("{line}\n"));
        }
    });
    Ok((url, log))
}
