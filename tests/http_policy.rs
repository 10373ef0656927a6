//! The upstream HTTP client's policy against a loopback server: redirects are never followed (a 307/308 would re-send a token form elsewhere), and response bodies are capped (with and without Content-Length).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use mailbridge::config::Proxy;
use mailbridge::http::{BodyError, client, read_capped};

async fn server(hits: Arc<AtomicUsize>) -> std::net::SocketAddr {
    let h = hits.clone();
    let app = Router::new()
        .route(
            "/redirect",
            post(|| async {
                (
                    StatusCode::TEMPORARY_REDIRECT,
                    [(header::LOCATION, "/target")],
                )
            }),
        )
        .route(
            "/redirect-get",
            get(|| async {
                (
                    StatusCode::PERMANENT_REDIRECT,
                    [(header::LOCATION, "/target")],
                )
            }),
        )
        .route(
            "/target",
            post(move || {
                h.fetch_add(1, Ordering::SeqCst);
                async { "{}" }
            }),
        )
        .route(
            "/big",
            get(|| async { "x".repeat(3 << 20).into_response() }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

/// A raw HTTP/1.1 server answering every request with `n` chunks of 64 KiB
/// (chunked transfer encoding: no Content-Length to refuse up front).
async fn chunked_server(n: usize) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
                    .await;
                let chunk = vec![b'y'; 64 * 1024];
                for _ in 0..n {
                    let _ = s
                        .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                        .await;
                    if s.write_all(&chunk).await.is_err() || s.write_all(b"\r\n").await.is_err() {
                        return;
                    }
                }
                let _ = s.write_all(b"0\r\n\r\n").await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn redirects_are_not_followed_and_bodies_are_capped() {
    let hits = Arc::new(AtomicUsize::new(0));
    let addr = server(hits.clone()).await;
    let c = client(None, &Proxy::default(), Duration::from_secs(5)).unwrap();
    let resp = c
        .post(format!("http://{addr}/redirect"))
        .form(&[("client_secret", "s3cret"), ("refresh_token", "rt")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 307);
    let resp = c
        .get(format!("http://{addr}/redirect-get"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 308);
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "the form never reached the redirect target"
    );

    let resp = c.get(format!("http://{addr}/big")).send().await.unwrap();
    assert!(matches!(
        read_capped(resp, 1 << 20).await,
        Err(BodyError::TooLarge(_))
    ));
    // Without a Content-Length: refused once the chunks pass the cap.
    let chunked = chunked_server(40).await;
    let resp = c.get(format!("http://{chunked}/")).send().await.unwrap();
    assert!(resp.content_length().is_none());
    assert!(matches!(
        read_capped(resp, 1 << 20).await,
        Err(BodyError::TooLarge(_))
    ));
    let resp = c.get(format!("http://{chunked}/")).send().await.unwrap();
    assert_eq!(
        read_capped(resp, 4 << 20).await.unwrap().len(),
        40 * 64 * 1024
    );
}
