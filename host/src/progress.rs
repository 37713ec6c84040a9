//! Progress for slow one-time work (compiling the runtime, pre-initialising a bundle).
//!
//! Shown only when the program embedding the library asks for it ([`show_on_terminal`]: the
//! `host` command does), and then on a terminal only: a pipe or a log file gets nothing, so
//! scripted output stays clean, and a library user's process never gets lines it did not ask
//! for.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether progress lines may be shown at all.
static SHOWN: AtomicBool = AtomicBool::new(false);

/// Lets progress lines be shown on stderr when it is a terminal, from now on.
pub fn show_on_terminal() {
    SHOWN.store(true, Ordering::Relaxed);
}
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A line on stderr with the elapsed seconds, redrawn each second until [`Progress::finish`].
pub struct Progress {
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Progress {
    pub fn start(what: &str) -> Progress {
        let done = Arc::new(AtomicBool::new(false));
        if !SHOWN.load(Ordering::Relaxed) || !std::io::stderr().is_terminal() {
            return Progress { done, thread: None };
        }
        let what = what.to_owned();
        let flag = done.clone();
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            let mut stderr = std::io::stderr();
            while !flag.load(Ordering::Relaxed) {
                let _ = write!(stderr, "\rhost: {what}: {}s", start.elapsed().as_secs());
                let _ = stderr.flush();
                for _ in 0..10 {
                    if flag.load(Ordering::Relaxed) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            let _ = writeln!(
                stderr,
                "\rhost: {what}: done in {:.1}s",
                start.elapsed().as_secs_f64()
            );
        });
        Progress {
            done,
            thread: Some(thread),
        }
    }

    pub fn finish(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop();
    }
}
