//! What one call may see and use: the grants, the environment and the limits, as typed
//! values. Flags, config files and HTTP bodies all parse into these, so a bad value dies at
//! parse time with a message naming it, and everything below takes them as given.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Result;

use crate::error::bad_input;
use crate::runtime::STDLIB_GUEST_DIR;

/// A host directory made visible to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub host: PathBuf,
    /// An absolute guest path, e.g. `/data`.
    pub guest: String,
    pub writable: bool,
}

impl FromStr for Grant {
    type Err = anyhow::Error;

    /// `HOST_DIR:GUEST_DIR[:ro|rw]`, read-only unless `rw` is said.
    fn from_str(s: &str) -> Result<Grant> {
        let usage = || {
            bad_input(format!(
                "--grant `{s}`: expected HOST_DIR:GUEST_DIR[:ro|rw], e.g. ./models:/models:ro"
            ))
        };
        let mut parts: Vec<&str> = s.split(':').collect();
        let writable = match parts.last() {
            Some(&"rw") if parts.len() == 3 => true,
            Some(&"ro") if parts.len() == 3 => false,
            _ if parts.len() == 2 => false,
            _ => return Err(usage()),
        };
        parts.truncate(2);
        let (host, guest) = (parts[0], parts[1]);
        if host.is_empty() || guest.is_empty() {
            return Err(usage());
        }
        let guest = guest_dir(guest).map_err(|why| bad_input(format!("--grant `{s}`: {why}")))?;
        Ok(Grant {
            host: PathBuf::from(host),
            guest,
            writable,
        })
    }
}

/// A grant's guest path, normalised (`//data/` is `/data`), or why it cannot be one: it must
/// be absolute, without `.` or `..`, and not the standard library's, nor above it.
pub fn guest_dir(guest: &str) -> Result<String, String> {
    if !guest.starts_with('/')
        || guest.contains('\0')
        || guest.split('/').any(|c| c == ".." || c == ".")
    {
        return Err(format!(
            "the guest path `{guest}` must be absolute, without `.` or `..`"
        ));
    }
    // Repeated slashes name the same directory to the guest, so they must to this check too.
    let parts: Vec<&str> = guest.split('/').filter(|c| !c.is_empty()).collect();
    let normal = format!("/{}", parts.join("/"));
    if normal == "/"
        || normal == STDLIB_GUEST_DIR
        || normal.starts_with(&format!("{STDLIB_GUEST_DIR}/"))
    {
        return Err(format!(
            "`{guest}` is reserved (the standard library lives at {STDLIB_GUEST_DIR}); choose another guest path"
        ));
    }
    Ok(normal)
}

/// Refuses grants' guest paths that `--grant` would refuse (see [`guest_dir`]) or would spell
/// otherwise (`//data/`), and two grants at the same guest path: the sandbox would silently
/// keep one of them. Grants reach a call from flags, the library and traces alike.
pub fn check_guest_paths<'a>(guests: impl IntoIterator<Item = &'a str>) -> Result<()> {
    let mut seen = std::collections::BTreeSet::new();
    for guest in guests {
        match guest_dir(guest) {
            Ok(normal) if normal == guest => {}
            Ok(normal) => {
                return Err(bad_input(format!(
                    "the grant's guest path `{guest}` must be written `{normal}`"
                )));
            }
            Err(why) => return Err(bad_input(format!("a grant is refused: {why}"))),
        }
        if !seen.insert(guest) {
            return Err(bad_input(format!(
                "two grants name the guest path `{guest}`: give each directory its own guest path"
            )));
        }
    }
    Ok(())
}

/// An environment variable given to the guest: `KEY=VALUE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvVar {
    pub key: String,
    pub value: String,
}

impl FromStr for EnvVar {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<EnvVar> {
        match s.split_once('=') {
            Some((k, v)) if !k.is_empty() && !k.contains('\0') && !v.contains('\0') => Ok(EnvVar {
                key: k.to_owned(),
                value: v.to_owned(),
            }),
            _ => Err(bad_input(format!("--env `{s}`: expected KEY=VALUE"))),
        }
    }
}

/// Resource limits of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Linear memory, in bytes.
    pub memory: u64,
    /// Wall-clock time of the call, enforced by epoch interruption.
    pub timeout: Duration,
    /// Bytes the guest may write to stdout and stderr together, and bytes of its result.
    pub output: u64,
    /// Bytes a recorded call's trace may hold (its events and their data, as the trace's JSON
    /// spells them, before compression): what a replay will read back, and what bounds the
    /// recording host keeps in its own memory while the call runs.
    pub record: u64,
}

impl Default for Limits {
    /// Safe for many tenants on one machine, roomy enough for pandas on modest data.
    fn default() -> Limits {
        Limits {
            memory: 1 << 30,
            timeout: Duration::from_secs(30),
            output: 16 << 20,
            record: DEFAULT_RECORD,
        }
    }
}

/// A recorded call's trace holds at most this much by default: room for a call that reads a
/// hundred-odd megabytes of files, well inside what a replay accepts
/// (a trace that inflates past 1 GiB is refused).
pub const DEFAULT_RECORD: u64 = 256 << 20;

/// The largest `--max-record`: a trace of that much, with its outputs, still inflates to less
/// than a replay accepts.
pub const MAX_RECORD: u64 = 768 << 20;

/// A record limit (`--max-record`, a tenant's `max_record`), refused over [`MAX_RECORD`]: a
/// larger trace could not be replayed.
pub fn record_limit(text: &str) -> Result<Size> {
    let size: Size = text.parse()?;
    if size.0 > MAX_RECORD {
        return Err(bad_input(format!(
            "{size} is more than a trace may hold (at most {})",
            Size(MAX_RECORD)
        )));
    }
    Ok(size)
}

impl Limits {
    /// Each limit the larger of the two: room for a call under either.
    pub fn widest(self, other: Limits) -> Limits {
        Limits {
            memory: self.memory.max(other.memory),
            timeout: self.timeout.max(other.timeout),
            output: self.output.max(other.output),
            record: self.record.max(other.record),
        }
    }
}

/// What one call may see and use.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub grants: Vec<Grant>,
    pub env: Vec<(String, String)>,
    pub limits: Limits,
}

/// Which limit ended a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitExceeded {
    Memory(u64),
    Time(Duration),
    Output(u64),
    /// The trace of a recorded call grew past `--max-record`.
    Record(u64),
    Stack,
}

impl fmt::Display for LimitExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LimitExceeded::Memory(n) => write!(
                f,
                "memory limit hit: the call needed more than {} (raise it with --memory)",
                Size(*n)
            ),
            LimitExceeded::Time(d) => write!(
                f,
                "time limit hit: the call ran longer than {:.1}s (raise it with --timeout)",
                d.as_secs_f64()
            ),
            LimitExceeded::Output(n) => write!(
                f,
                "output limit hit: the call wrote more than {} (raise it with --max-output)",
                Size(*n)
            ),
            LimitExceeded::Record(n) => write!(
                f,
                "record limit hit: the call's trace would hold more than {} (it read, drew or polled too much to keep; raise it with --max-record)",
                Size(*n)
            ),
            LimitExceeded::Stack => write!(f, "stack limit hit: the call recursed too deeply"),
        }
    }
}

impl std::error::Error for LimitExceeded {}

/// A size in bytes, written `512M`, `2G`, `64KiB` or `1000`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

impl FromStr for Size {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Size> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, unit) = t.split_at(split);
        let n: u64 = digits
            .parse()
            .map_err(|_| bad_input(format!("`{s}` is not a size (e.g. 512M, 2G)")))?;
        let shift = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 0,
            "k" | "kb" | "kib" => 10,
            "m" | "mb" | "mib" => 20,
            "g" | "gb" | "gib" => 30,
            _ => {
                return Err(bad_input(format!(
                    "`{s}`: unknown size unit `{unit}` (use K, M or G)"
                )));
            }
        };
        n.checked_mul(1 << shift)
            .map(Size)
            .ok_or_else(|| bad_input(format!("`{s}` is too large")))
    }
}

impl fmt::Display for Size {
    /// The largest whole unit: `1 GiB`, `512 MiB`, `1000 bytes`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            n if n >= 1 << 30 && n % (1 << 30) == 0 => write!(f, "{} GiB", n >> 30),
            n if n >= 1 << 20 && n % (1 << 20) == 0 => write!(f, "{} MiB", n >> 20),
            n if n >= 1 << 10 && n % (1 << 10) == 0 => write!(f, "{} KiB", n >> 10),
            n => write!(f, "{n} bytes"),
        }
    }
}

/// A positive time limit, written `30s`, `500ms`, `2m` or `10` (seconds), at most a day:
/// a longer one is a typo, not a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timeout(pub Duration);

/// The longest time limit host accepts.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);

impl FromStr for Timeout {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Timeout> {
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (digits, unit) = t.split_at(split);
        let n: f64 = digits
            .parse()
            .map_err(|_| bad_input(format!("`{s}` is not a duration (e.g. 30s, 500ms)")))?;
        let seconds = match unit.trim() {
            "" | "s" => n,
            "ms" => n / 1000.0,
            "m" | "min" => n * 60.0,
            _ => {
                return Err(bad_input(format!(
                    "`{s}`: unknown time unit `{unit}` (use ms, s or m)"
                )));
            }
        };
        if !(seconds > 0.0 && seconds.is_finite()) {
            return Err(bad_input(format!("`{s}`: the time limit must be positive")));
        }
        if seconds > MAX_TIMEOUT.as_secs_f64() {
            return Err(bad_input(format!(
                "`{s}`: the time limit can be at most 24h ({}s)",
                MAX_TIMEOUT.as_secs()
            )));
        }
        Ok(Timeout(Duration::from_secs_f64(seconds)))
    }
}

/// Parses a size such as `512M`, `2G`, `64KiB` or `1000`, in bytes.
pub fn parse_size(s: &str) -> Result<u64> {
    Ok(s.parse::<Size>()?.0)
}

/// Parses a time limit such as `30s`, `500ms`, `2m` or `10` (seconds).
pub fn parse_duration(s: &str) -> Result<Duration> {
    Ok(s.parse::<Timeout>()?.0)
}

/// Parses a period such as `24h`, `7d`, or anything [`parse_duration`] reads (`30m`): how far
/// back to look, or how long to keep.
pub fn parse_period(text: &str) -> Result<Duration> {
    let t = text.trim();
    for (unit, seconds) in [("d", 86_400), ("h", 3_600)] {
        if let Some(n) = t.strip_suffix(unit) {
            return n
                .trim()
                .parse::<u64>()
                .ok()
                .and_then(|n| n.checked_mul(seconds))
                .map(Duration::from_secs)
                .ok_or_else(|| {
                    bad_input(format!("`{text}` is not a duration (e.g. 30d, 12h, 90m)"))
                });
        }
    }
    parse_duration(t)
}

/// The instant `text`, a period as [`parse_period`] reads it, before now.
pub fn period_back(text: &str) -> Result<std::time::SystemTime> {
    let period = parse_period(text)?;
    std::time::SystemTime::now()
        .checked_sub(period)
        .ok_or_else(|| bad_input(format!("`{text}` reaches back before any run")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_parse_with_modes_and_refuse_bad_guest_paths() {
        let g: Grant = "./models:/models".parse().unwrap();
        assert_eq!((g.guest.as_str(), g.writable), ("/models", false));
        let g: Grant = "/tmp/out:/out/:rw".parse().unwrap();
        assert_eq!((g.guest.as_str(), g.writable), ("/out", true));
        let g: Grant = "a://data//in/".parse().unwrap();
        assert_eq!(g.guest, "/data/in");
        assert!(check_guest_paths(["/a", "/b", "/a/b"]).is_ok());
        for (guests, needle) in [
            (
                &["/a", "/b", "/a"][..],
                "two grants name the guest path `/a`",
            ),
            (&["/a//b"], "must be written `/a/b`"),
            (&["//usr/local/lib"], "is reserved"),
            (&["a"], "must be absolute"),
        ] {
            let e = check_guest_paths(guests.iter().copied()).unwrap_err();
            assert!(format!("{e:#}").contains(needle), "{guests:?}: {e:#}");
        }
        for bad in [
            "nocolon",
            "a:relative",
            "a:/x:rx",
            "a:/../etc",
            "a:/",
            "a:/usr/local/lib",
            "a://usr/local/lib",
            "a:/usr//local/lib/",
            "a:/usr/local/lib/x",
            "a:/x\0y",
            ":/x",
            "a:/x:ro:rw",
        ] {
            assert!(bad.parse::<Grant>().is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert!(parse_size("12X").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("1h").is_err());
        // Once a panic in Duration::from_secs_f64.
        assert!(parse_duration("99999999999999999999").is_err());
        assert!(parse_duration("1e400").is_err());
        assert_eq!(Size(1 << 30).to_string(), "1 GiB");
        assert_eq!(Size(1000).to_string(), "1000 bytes");
    }

    #[test]
    fn env_vars_need_a_key() {
        let v: EnvVar = "A=b=c".parse().unwrap();
        assert_eq!((v.key.as_str(), v.value.as_str()), ("A", "b=c"));
        assert!("=x".parse::<EnvVar>().is_err());
        assert!("novalue".parse::<EnvVar>().is_err());
    }
}
