//! Accepting connections and serving HTTP/1.1 on them, until the server stops.
//!
//! Why not `axum::serve`: it sets no timer on its connections, so a client that opens one
//! and never finishes a request's headers (or leaves a keep-alive connection idle) holds it,
//! and its file descriptor, for ever: a few thousand such connections (a slowloris) and the
//! server can accept no one else. Here every connection has `header_timeout` to send each
//! request's headers, counted from when it opened or was last answered; past it, hyper closes
//! it. Bodies have their own limit (`body_timeout`, see `body`).

use std::future::Future;
use std::io;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

/// Serves `router` on `listener` until `stop` completes; then stops accepting, lets each
/// connection finish the request it is answering (idle ones close at once), and returns
/// when all have closed.
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
        let service = TowerToHyperService::new(router.clone());
        let connection = connections.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            // A client that hangs up or stalls past the timeout ends only its connection.
            let _ = connection.await;
        });
    }
    drop(listener);
    connections.shutdown().await;
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
