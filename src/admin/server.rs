//! The admin endpoint's HTTP/1 server: a connection cap, a header-read (and keep-alive idle) timeout, a lifetime cap per connection, and the `Host` check against DNS rebinding.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Connections served at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 32;
/// Time a client has to send a request's headers, and the longest a
/// kept-alive connection may sit idle between requests.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serve `app` on `listener` until `shutdown`; each connection lives at most
/// `lifetime` (long enough for the slowest handler, `POST /send-test`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    lifetime: Duration,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let tracker = TaskTracker::new();
    loop {
        let Some((stream, peer)) = crate::listener::accept(&listener, &shutdown, "admin").await
        else {
            break;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(client = %peer, "admin: too many connections; closing this one");
            drop(stream);
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let stop = shutdown.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                r = tokio::time::timeout(lifetime, conn.as_mut()) => {
                    if r.is_err() {
                        tracing::debug!(client = %peer, "admin: connection lifetime reached");
                    }
                }
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(5), conn.as_mut()).await;
                }
            }
        });
    }
    drop(listener);
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(10), tracker.wait()).await;
}

/// The host part of a `Host` header value (`name`, `name:port`, `[v6]:port`).
fn host_of(value: &str) -> &str {
    let v = value.trim();
    if let Some(rest) = v.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("");
    }
    match v.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => v,
    }
}

/// Whether a request's `Host` header names this endpoint: a loopback name or
/// address, or one of `allowed` (ASCII case-insensitive). A missing header fails.
pub fn host_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
    let Some(value) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let host = host_of(value).trim_end_matches('.');
    crate::config::checks::is_loopback_host(host)
        || allowed
            .iter()
            .any(|a| a.trim_end_matches('.').eq_ignore_ascii_case(host))
}

/// Middleware: `421 Misdirected Request` for a `Host` this endpoint does not
/// answer to (a DNS-rebinding page in a browser sends the attacker's name).
/// `/healthz` and `/readyz` answer any host (they reveal nothing).
pub async fn check_host(
    axum::extract::State(allowed): axum::extract::State<Arc<Vec<String>>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = req.uri().path();
    if path == "/healthz" || path == "/readyz" || host_allowed(req.headers(), &allowed) {
        return next.run(req).await;
    }
    let shown = req
        .headers()
        .get(header::HOST)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    tracing::warn!(host = %crate::text::for_log(&shown), path = %crate::text::for_log(path), "admin: request for another host name refused (add it to admin.hostnames if it is this endpoint)");
    (
        StatusCode::MISDIRECTED_REQUEST,
        axum::Json(serde_json::json!({
            "error": "this endpoint does not answer to that Host name (admin.hostnames)"
        })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_host(h: &str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert(header::HOST, h.parse().unwrap());
        m
    }

    #[test]
    fn hosts() {
        let allowed = vec!["relay.corp.test".to_string()];
        for ok in [
            "127.0.0.1:8025",
            "localhost",
            "LOCALHOST:8025",
            "[::1]:8025",
            "relay.corp.test:8025",
            "Relay.Corp.Test.",
        ] {
            assert!(host_allowed(&with_host(ok), &allowed), "{ok}");
        }
        for bad in [
            "evil.example:8025",
            "localhost.evil.example",
            "127.0.0.1.evil.example",
            "10.0.0.1:8025",
            "",
        ] {
            assert!(!host_allowed(&with_host(bad), &allowed), "{bad}");
        }
        assert!(!host_allowed(&HeaderMap::new(), &allowed));
    }
}
