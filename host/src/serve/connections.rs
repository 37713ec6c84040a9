//! Accepting connections and serving HTTP/1.1 on them, until the server stops.
//!
//! Why not `axum::serve`: it sets no timer on its connections, so a client that opens one
//! and never finishes a request's headers (or leaves a keep-alive connection idle) holds it,
//! and its file descriptor, for ever: a few thousand such connections (a slowloris) and the
//! server can accept no one else. Here every connection has `header_timeout` to send each
//! request's headers, counted from when it opened or was last answered; past it, hyper closes
//! it. Bodies have their own limit (`body_timeout`, see `body`).
//!
//! When the server stops, a connection that is answering a request finishes it; one that is
//! waiting for its client (idle, or part way through a request's headers) is closed at once.
//! hyper closes idle ones itself, but waits for headers begun until `header_timeout`: a
//! single client that had sent half a request line held the stop for the whole grace period
//! (30 s), then the server said calls were left unfinished when none were.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::response::Response;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tower::Service;

/// How long a connection has, once the server stops, to finish writing an answer it has
/// begun before it counts as waiting for its client: writes that are not blocked finish in
/// microseconds.
const LAST_WRITES: Duration = Duration::from_millis(200);

/// Serves `router` on `listener` until `stop` completes; then stops accepting, lets each
/// connection finish the request it is answering, closes the others, and returns when all
/// have closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    header_timeout: Duration,
    stop: impl Future<Output = ()>,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let connections = GracefulShutdown::new();
    let (closing, closed) = watch::channel(false);
    let mut stop = std::pin::pin!(stop);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // A connection that failed as it was accepted is its client's business;
                // anything else (out of file descriptors) is waited out, not spun on.
                Err(e) if is_connection_error(&e) => continue,
                Err(_) => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        // Each answer is written whole: nothing is gained by holding its last segment back
        // until the client acknowledges the one before (Nagle's algorithm).
        let _ = stream.set_nodelay(true);
        let state = Arc::new(State::default());
        let service = TowerToHyperService::new(Answering {
            router: router.clone(),
            state: state.clone(),
        });
        let stream = Watched {
            stream,
            state: state.clone(),
        };
        let connection = connections.watch(http.serve_connection(TokioIo::new(stream), service));
        let mut closed = closed.clone();
        tokio::spawn(async move {
            tokio::select! {
                // A client that hangs up or stalls past the timeout ends only its connection.
                _ = connection => {}
                // Dropping the connection closes it.
                () = waiting_for_client_at_close(&mut closed, &state) => {}
            }
        });
    }
    drop(listener);
    let _ = closing.send(true);
    connections.shutdown().await;
}

/// What a connection is doing, as far as stopping is concerned.
#[derive(Default)]
struct State {
    /// Requests whose answer is being made or sent: from the handler's start until hyper
    /// drops the answer's body.
    answering: AtomicUsize,
    /// Whether the last write found the client's receive window full: the answer's last
    /// bytes may still be in hyper's buffer, waiting for the client to read.
    blocked: AtomicBool,
}

/// Completes once the server stops if, after [`LAST_WRITES`], the connection answers no
/// request and has nothing left to write: then it only waits for its client.
async fn waiting_for_client_at_close(closed: &mut watch::Receiver<bool>, state: &State) {
    // The sender lives until `serve` returns, by when every connection has ended.
    if closed.wait_for(|&closed| closed).await.is_err() {
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(LAST_WRITES).await;
    if state.answering.load(Ordering::Acquire) > 0 || state.blocked.load(Ordering::Acquire) {
        // hyper closes it once the answer is written (keep-alive ends with the stop).
        std::future::pending::<()>().await;
    }
}

/// The router, counting in [`State::answering`] the requests it answers.
#[derive(Clone)]
struct Answering {
    router: Router,
    state: Arc<State>,
}

impl Service<hyper::Request<hyper::body::Incoming>> for Answering {
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: hyper::Request<hyper::body::Incoming>) -> Self::Future {
        let answering = Answer::new(self.state.clone());
        let answer = self.router.call(request);
        Box::pin(async move {
            let response = answer.await?;
            Ok(response.map(|body| {
                Body::new(Counted {
                    body,
                    _answering: answering,
                })
            }))
        })
    }
}

/// One request counted in [`State::answering`] while it lives.
struct Answer(Arc<State>);

impl Answer {
    fn new(state: Arc<State>) -> Answer {
        state.answering.fetch_add(1, Ordering::AcqRel);
        Answer(state)
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        self.0.answering.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An answer's body, counted until hyper has taken all of it (or given up on it).
struct Counted {
    body: Body,
    _answering: Answer,
}

impl hyper::body::Body for Counted {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// A connection's stream, noting in [`State::blocked`] whether its last write had to wait
/// for the client.
struct Watched {
    stream: TcpStream,
    state: Arc<State>,
}

impl Watched {
    fn note<T>(&self, written: Poll<T>) -> Poll<T> {
        self.state
            .blocked
            .store(written.is_pending(), Ordering::Release);
        written
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.note(written)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.note(written)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = Pin::new(&mut self.stream).poll_flush(cx);
        self.note(flushed)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Raises this process's limit of open files to the most it may have: each connection is
/// one, and the usual default (1,024) is a few hundred slow clients from refusing everyone.
/// Left as it is where the system refuses.
pub fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: both calls read or write only the struct they are given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}
