//! Work a request starts that must end even when its client does not wait for it.
//!
//! A client that hangs up makes the HTTP server drop the request's handler at its next await.
//! Once a call's (or an evaluation's) row is being written, that would leave a row written
//! and never completed, or a call accepted and never run. [`finish_even_if_dropped`] runs such
//! work in place while the client waits, as plain awaiting would (a task spawned per call
//! would add a hand-off, often a wake-up of another thread, to every call); only when it is
//! dropped unfinished is the rest handed to the runtime to finish.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::runtime::Handle;

/// `work`, awaited in place, and finished on the runtime if dropped first.
pub fn finish_even_if_dropped<F>(work: F) -> Detached<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    Detached {
        work: Some(Box::pin(work)),
        runtime: Handle::current(),
    }
}

/// See [`finish_even_if_dropped`].
pub struct Detached<F: Future + Send + 'static>
where
    F::Output: Send + 'static,
{
    /// None once it has finished.
    work: Option<Pin<Box<F>>>,
    runtime: Handle,
}

impl<F: Future + Send + 'static> Future for Detached<F>
where
    F::Output: Send + 'static,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let work = self
            .work
            .as_mut()
            .expect("a finished Detached is not polled again");
        let polled = work.as_mut().poll(cx);
        if polled.is_ready() {
            self.work = None;
        }
        polled
    }
}

impl<F: Future + Send + 'static> Drop for Detached<F>
where
    F::Output: Send + 'static,
{
    fn drop(&mut self) {
        if let Some(work) = self.work.take() {
            // On a runtime that is shutting down the task is dropped unrun: the rows it left
            // are the next start's to mark, as after a crash.
            drop(self.runtime.spawn(work));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[test]
    fn dropped_unfinished_it_still_finishes_and_awaited_it_runs_in_place() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let finished = Arc::new(AtomicBool::new(false));
            let work = {
                let finished = finished.clone();
                finish_even_if_dropped(async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    finished.store(true, Ordering::SeqCst);
                })
            };
            // Polled once (so it started and is waiting), then dropped, as a handler is.
            let _ = tokio::time::timeout(Duration::from_millis(5), work).await;
            assert!(!finished.load(Ordering::SeqCst));
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert!(
                finished.load(Ordering::SeqCst),
                "the dropped work never finished"
            );

            let here = std::thread::current().id();
            let ran_on = finish_even_if_dropped(async { std::thread::current().id() }).await;
            assert_eq!(ran_on, here, "awaited, it runs on the awaiting thread");
        });
    }
}
