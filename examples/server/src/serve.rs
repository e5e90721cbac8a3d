//! The accept loop: what `axum::serve` does, with hyper's HTTP/1 settings in
//! reach so each connection's read buffer stays at one 8 KiB allocation.
//!
//! Measured (issue 10): with hyper's defaults a keep-alive connection's read
//! buffer grew from 8 to 16 KiB at its second request (a `reserve` while a few
//! unparsed bytes were left), 156 MB of the peak at 10,000 clients.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

/// Largest request head (and read buffer) of a connection; like nginx's
/// default `large_client_header_buffers` of 8k. Bodies stream through it.
const READ_BUFFER_BYTES: usize = 8 * 1024;

/// Serves `app` on `listener` until `signal` completes, then lets open
/// connections finish their requests (running streams end with their turn).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    signal: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut http = http1::Builder::new();
    http.max_buf_size(READ_BUFFER_BYTES);
    let graceful = GracefulShutdown::new();
    let mut signal = std::pin::pin!(signal);
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _peer)) => tcp,
                Err(e) => {
                    // Out of descriptors or a connection reset before accept:
                    // keep serving the others (as axum::serve does).
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut signal => break,
        };
        // Each SSE frame is small: without NODELAY it waits on Nagle + delayed ACK.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "could not set TCP_NODELAY");
        }
        let conn = http.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(app.clone()));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}
