//! The admin endpoint's protections, over real loopback sockets: the token on `/status`, `421` for a foreign `Host` (DNS rebinding), the header-read timeout and the connection cap.

use mailbridge::common::Secret;
use mailbridge::config::Config;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "admin-test-token";

/// The admin endpoint for the default configuration on a port-0 listener.
async fn start() -> (
    std::net::SocketAddr,
    CancellationToken,
    tokio::task::JoinHandle<()>,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config::from_toml(
        "[admin]\nhostnames = [\"relay.corp.test\"]\n",
        "t.toml",
        dir.path(),
    )
    .unwrap();
    let shutdown = CancellationToken::new();
    let spool = mailbridge::spool::Spool::open(&cfg.path(&cfg.spool.path), 100).unwrap();
    // Routing and the admin endpoint share the OAuth identities, as in `run`.
    let oauth = mailbridge::oauth::Registries::new();
    let router = Arc::new(mailbridge::routing::from_config(&cfg, &oauth).unwrap());
    let (sched, _task) = mailbridge::scheduler::Scheduler::start(
        Arc::new(spool),
        router,
        mailbridge::scheduler::Policy::from_config(&cfg),
        shutdown.clone(),
    );
    let state = Arc::new(mailbridge::admin::AdminState {
        scheduler: sched,
        token: Secret::new(TOKEN),
        started: std::time::SystemTime::now(),
        reloader: None,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let extras = mailbridge::admin::Extras::from_config(&cfg, &oauth).unwrap();
    let task = tokio::spawn(mailbridge::admin::serve_with(
        listener,
        state,
        extras,
        shutdown.clone(),
    ));
    (addr, shutdown, task, dir)
}

/// One raw HTTP/1.1 request; the status line of the answer.
async fn raw(addr: std::net::SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out)
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

#[tokio::test]
async fn status_needs_the_token_and_foreign_hosts_get_421() {
    let (addr, shutdown, task, _dir) = start().await;
    let auth = format!("Authorization: Bearer {TOKEN}\r\n");
    let get = |path: &str, host: &str, auth: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n")
    };
    let here = addr.to_string();
    for (req, want) in [
        (get("/status", &here, ""), "HTTP/1.1 401"),
        (get("/status", &here, &auth), "HTTP/1.1 200"),
        (get("/status", &format!("localhost:{}", addr.port()), &auth), "HTTP/1.1 200"),
        (get("/status", "relay.corp.test:8025", &auth), "HTTP/1.1 200"),
        // DNS rebinding: the browser sends the attacker's name.
        (get("/status", "rebind.evil.test:8025", &auth), "HTTP/1.1 421"),
        (get("/oauth/callback?state=x&error=access_denied", "rebind.evil.test", ""), "HTTP/1.1 421"),
        ("POST /failback HTTP/1.1\r\nHost: rebind.evil.test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string(), "HTTP/1.1 421"),
        ("GET /status HTTP/1.0\r\n\r\n".to_string(), "HTTP/1.0 421"),
        // Health reveals nothing and answers any name (probes use pod addresses).
        (get("/healthz", "rebind.evil.test", ""), "HTTP/1.1 200"),
    ] {
        let line = raw(addr, &req).await;
        assert!(line.starts_with(want), "{req:?} → {line}");
    }
    shutdown.cancel();
    let _ = task.await;
}

/// A client that sends half a request header is cut off after the header
/// timeout (10 s, on paused time), not held open forever.
#[tokio::test(start_paused = true)]
async fn half_a_header_is_cut_off() {
    let (addr, shutdown, task, _dir) = start().await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: loc")
        .await
        .unwrap();
    let t0 = tokio::time::Instant::now();
    let mut buf = [0u8; 256];
    let r = tokio::time::timeout(Duration::from_secs(60), s.read(&mut buf)).await;
    let waited = t0.elapsed();
    assert!(r.is_ok(), "still open after 60 s");
    assert!(
        waited >= Duration::from_secs(9) && waited < Duration::from_secs(30),
        "{waited:?}"
    );
    // An idle kept-alive connection is closed the same way.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let t0 = tokio::time::Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(60), async {
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await
    })
    .await;
    assert!(r.is_ok() && t0.elapsed() < Duration::from_secs(30));
    shutdown.cancel();
    let _ = task.await;
}

/// Past the connection cap, a new connection is closed at once.
#[tokio::test]
async fn connections_are_capped() {
    let (addr, shutdown, task, _dir) = start().await;
    let mut held = Vec::new();
    for _ in 0..mailbridge::admin::server::MAX_CONNECTIONS {
        let mut s = TcpStream::connect(addr).await.unwrap();
        // One complete request each, so every connection is surely accepted.
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(s);
    }
    let mut extra = TcpStream::connect(addr).await.unwrap();
    let _ = extra
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf)).await;
    match r {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        other => panic!("the connection over the cap was served: {other:?}"),
    }
    drop(held);
    shutdown.cancel();
    let _ = task.await;
}
