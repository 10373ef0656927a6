//! Three `mailbridge run` processes sending as one mailbox through the fake Graph (4 requests in flight per mailbox, enforced across all clients) with `[throttle] backend = "redis"` and a real `redis-server`: no 429 on a surge split across them, and `kill -9` of one mid-surge loses nothing (its leases expire, the others go on, its spool is delivered when it starts again).

mod common;
mod daemon;

use std::collections::HashSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::fake_graph::{FakeGraph, GraphConfig};
use common::fake_oauth::{CLIENT_ID, CLIENT_SECRET, FakeOAuth, Shape, TENANT};
use common::real::{free_port, have, wait_listening};
use daemon::Daemon;
use tokio::time::Instant;

const PASSWORD: &str = "redis-pw-instances-3";

/// A private `redis-server` on a loopback port, killed on drop.
struct Redis {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Redis {
    fn start() -> Redis {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let log_path = dir.path().join("redis.log");
        let log = std::fs::File::create(&log_path).expect("log");
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--requirepass",
                PASSWORD,
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("redis-server");
        wait_listening(([127, 0, 0, 1], port).into(), "redis-server", &log_path);
        Redis {
            child,
            port,
            _dir: dir,
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `[upstream]` (Graph, client credentials at the fake Entra ID) and
/// `[throttle]` every instance shares.
fn config(oauth: &FakeOAuth, graph: &FakeGraph, redis: &Redis, dir: &Path) -> String {
    std::fs::write(dir.join("redis.pw"), format!("{PASSWORD}\n")).expect("password file");
    format!(
        "protocol = \"graph\"\ngraph_endpoint = \"{}\"\nmailbox = \"relay@contoso.com\"\nrequires_auth = true\nauth = \"oauth\"\ntimeout_secs = 5\n\
         [upstream.oauth]\nprovider = \"office365\"\nflow = \"client_credentials\"\ntenant = \"{TENANT}\"\nclient_id = \"{CLIENT_ID}\"\n\
         client_secret = \"{CLIENT_SECRET}\"\ntoken_url = \"{}\"\n\
         [throttle]\nbackend = \"redis\"\nredis_url = \"redis://127.0.0.1:{}/0\"\nredis_password_file = \"redis.pw\"\nexpected_instances = 3\nlease_secs = 1\n",
        graph.endpoint(),
        oauth.token_url(),
        redis.port
    )
}

async fn setup() -> (Arc<FakeOAuth>, FakeGraph) {
    let oauth = Arc::new(FakeOAuth::start(Shape::Entra).await);
    let graph = FakeGraph::start(GraphConfig {
        latency: (Duration::from_millis(100), Duration::from_millis(150)),
        ..GraphConfig::default()
    })
    .await;
    let o = oauth.clone();
    graph.set_token_check(move |t| o.valid_token("app", t));
    (oauth, graph)
}

async fn start(oauth: &FakeOAuth, graph: &FakeGraph, redis: &Redis) -> (tempfile::TempDir, Daemon) {
    let dir = tempfile::tempdir().expect("tempdir");
    daemon::write_config(dir.path(), &config(oauth, graph, redis, dir.path()));
    let path = dir.path().to_path_buf();
    let d = tokio::task::spawn_blocking(move || Daemon::start(&path))
        .await
        .expect("start task");
    (dir, d)
}

/// Hand messages `range` to the daemon at `addr`, one connection each, all
/// at once; the number accepted with `250`.
async fn surge(addr: std::net::SocketAddr, range: std::ops::Range<usize>) -> usize {
    let mut set = tokio::task::JoinSet::new();
    for seq in range {
        set.spawn_blocking(move || {
            let body = format!(
                "From: App <app@legacy.local>\r\nTo: u{seq}@contoso.com\r\nSubject: n{seq}\r\n\r\nhello {seq}\r\n"
            );
            let to = format!("u{seq}@contoso.com");
            daemon::smtp_send(addr, "app@legacy.local", &[to.as_str()], &body)
        });
    }
    let mut ok = 0;
    while let Some(r) = set.join_next().await {
        ok += usize::from(matches!(r, Ok(reply) if reply.starts_with("250")));
    }
    ok
}

/// The distinct messages Graph received.
fn delivered(graph: &FakeGraph) -> HashSet<String> {
    graph
        .sent()
        .iter()
        .filter_map(|s| {
            mailbridge::message::header_value(s.mime.as_deref()?, "Subject")
                .map(|v| v.trim().to_string())
        })
        .collect()
}

fn throttled(graph: &FakeGraph) -> usize {
    graph.requests().iter().filter(|r| r.status == 429).count()
}

async fn until(what: &str, d: &Daemon, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; log:\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_processes_share_one_mailbox_without_a_429() {
    if !have("redis-server", "--version") {
        return;
    }
    let redis = Redis::start();
    let (oauth, graph) = setup().await;
    let (_a, a) = start(&oauth, &graph, &redis).await;
    let (_b, b) = start(&oauth, &graph, &redis).await;
    let (_c, c) = start(&oauth, &graph, &redis).await;
    let t0 = Instant::now();
    let (x, y, z) = tokio::join!(
        surge(a.smtp, 0..12),
        surge(b.smtp, 12..24),
        surge(c.smtp, 24..36)
    );
    assert_eq!((x, y, z), (12, 12, 12));
    until("36 messages at Graph", &a, || delivered(&graph).len() == 36).await;
    let drain = t0.elapsed();
    assert_eq!(throttled(&graph), 0, "never more than 4 in flight");
    assert!(graph.peak() <= 4);
    let (_, status, _) = a.cli(&["status", "--json"]);
    assert!(status.contains("\"mode\": \"redis\""), "{status}");
    assert!(!status.contains(PASSWORD), "no secret in status");
    let sent = graph.sent();
    let mean = sent
        .iter()
        .map(|s| (s.done - s.arrived).as_secs_f64())
        .sum::<f64>()
        / sent.len() as f64;
    eprintln!(
        "3 processes: 36 messages drained in {:.2} s; N·L/4 = {:.2} s (L = {:.3} s measured)",
        drain.as_secs_f64(),
        36.0 * mean / 4.0,
        mean
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_one_process_mid_surge_loses_nothing() {
    if !have("redis-server", "--version") {
        return;
    }
    let redis = Redis::start();
    let (oauth, graph) = setup().await;
    let (_a, a) = start(&oauth, &graph, &redis).await;
    let (bdir, mut b) = start(&oauth, &graph, &redis).await;
    let (x, y) = tokio::join!(surge(a.smtp, 0..12), surge(b.smtp, 12..24));
    assert_eq!((x, y), (12, 12));
    // Kill b once a few messages are out: its leases are never given back.
    until("the first deliveries", &a, || graph.sent().len() >= 4).await;
    tokio::task::block_in_place(|| b.kill9());
    until("a's messages", &a, || {
        (0..12).all(|i| delivered(&graph).contains(&format!("n{i}")))
    })
    .await;
    // b starts again on its spool: what it had accepted goes out.
    let path = bdir.path().to_path_buf();
    let b2 = tokio::task::spawn_blocking(move || Daemon::start(&path))
        .await
        .expect("restart");
    until("every message", &b2, || delivered(&graph).len() == 24).await;
    assert_eq!(
        throttled(&graph),
        0,
        "the dead instance's slots expired, not overbooked"
    );
    drop(b);
}
