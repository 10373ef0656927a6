//! The throttle budget shared through a real Redis (Debian's `redis-server`, started and stopped here on a loopback port, with a password): three relay instances sending as one mailbox to the fake Graph, which enforces 4 requests in flight across all its clients; an instance killed with its leases held; Redis stopped mid-run (delivery goes on under the fallback limits) and started again.
//!
//! Here an "instance" is a governor registry with its own Redis connection and
//! its own Graph transport; the killed one runs on a runtime of its own that
//! is shut down mid-request, so its leases are never given back (as after
//! `kill -9`). `tests/throttle_instances.rs` runs the surge, a `kill -9` and
//! the loss of Redis with three `mailbridge run` processes.

mod common;
mod daemon;

use std::sync::Arc;
use std::time::Duration;

use common::fake_graph::{FakeGraph, GraphConfig};
use common::redis::{PASSWORD, Redis};
use mailbridge::common::Secret;
use mailbridge::oauth::StaticToken;
use mailbridge::transport::governor::{Governed, Governors, Limits, Shared};
use mailbridge::transport::graph::{GraphSettings, GraphTransport};
use mailbridge::transport::{Envelope, Transport};
use tokio::time::Instant;

const MAILBOX: &str = "desk@contoso.com";

/// One relay instance: its own Redis connection, governor and transport.
fn instance(fake: &FakeGraph, redis: &Redis, lease: Duration) -> (Arc<Governors>, Arc<Governed>) {
    instance_at(&fake.endpoint(), &redis.url(), lease)
}

fn instance_at(endpoint: &str, url: &str, lease: Duration) -> (Arc<Governors>, Arc<Governed>) {
    let shared =
        Shared::new(url, "", &Secret::new(PASSWORD), 3, lease).unwrap_or_else(|e| panic!("{e}"));
    let governors = Governors::with_shared(shared);
    let client = mailbridge::http::client(None, &Default::default(), Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    let tokens = Arc::new(StaticToken {
        token: Secret::new("token-1"),
        identity: MAILBOX.into(),
    });
    let graph: Arc<dyn Transport> = Arc::new(
        GraphTransport::new(GraphSettings::new(endpoint, MAILBOX, tokens, client))
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let g = governors.governor("graph test-app", Limits::graph(4, MAILBOX));
    (governors, Arc::new(Governed::with_governor(graph, g)))
}

fn message(seq: usize) -> Vec<u8> {
    format!(
        "From: Desk <{MAILBOX}>\r\nTo: u{seq}@example.com\r\nSubject: n{seq}\r\n\r\nhello {seq}\r\n"
    )
    .into_bytes()
}

fn env(seq: usize) -> Envelope {
    Envelope {
        id: format!("m{seq}"),
        from: MAILBOX.into(),
        rcpts: vec![format!("u{seq}@example.com")],
        identity: None,
    }
}

/// Deliver messages `range` through `t`, all at once; how many succeeded.
async fn surge(t: &Arc<Governed>, range: std::ops::Range<usize>) -> tokio::task::JoinSet<bool> {
    let mut set = tokio::task::JoinSet::new();
    for seq in range {
        let t = t.clone();
        set.spawn(async move {
            let r = t
                .deliver(&env(seq), &mailbridge::transport::Body::from(&message(seq)))
                .await;
            matches!(r, Ok(v) if v.iter().all(Result::is_ok))
        });
    }
    set
}

async fn all_ok(mut set: tokio::task::JoinSet<bool>) -> usize {
    let mut ok = 0;
    while let Some(r) = set.join_next().await {
        ok += usize::from(matches!(r, Ok(true)));
    }
    ok
}

fn throttled(fake: &FakeGraph) -> usize {
    fake.requests().iter().filter(|r| r.status == 429).count()
}

async fn graph(latency_ms: u64) -> FakeGraph {
    FakeGraph::start(GraphConfig {
        latency: (
            Duration::from_millis(latency_ms),
            Duration::from_millis(latency_ms * 3 / 2),
        ),
        ..GraphConfig::default()
    })
    .await
}

fn redis_available() -> bool {
    common::redis::available()
}

fn redis() -> Redis {
    Redis::start(daemon::reaper::spawn)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_share_four_slots_without_a_429() {
    if !redis_available() {
        return;
    }
    let redis = redis();
    let fake = graph(100).await;
    let lease = Duration::from_secs(2);
    let (_ga, a) = instance(&fake, &redis, lease);
    let (_gb, b) = instance(&fake, &redis, lease);
    let (_gc, c) = instance(&fake, &redis, lease);
    let t0 = Instant::now();
    let (x, y, z) = tokio::join!(
        all_ok(surge(&a, 0..12).await),
        all_ok(surge(&b, 12..24).await),
        all_ok(surge(&c, 24..36).await)
    );
    let drain = t0.elapsed();
    assert_eq!((x, y, z), (12, 12, 12));
    assert_eq!(fake.sent().len(), 36);
    assert_eq!(throttled(&fake), 0, "no request over the 4 in flight");
    assert!(fake.peak() <= 4, "{}", fake.peak());
    // Alone, each instance would have run 4 at once (12 in flight, 429s).
    assert_eq!(a.governor().stats().backend, "redis");
    let mean: f64 = {
        let s = fake.sent();
        s.iter()
            .map(|r| (r.done - r.arrived).as_secs_f64())
            .sum::<f64>()
            / s.len() as f64
    };
    eprintln!(
        "drain {:.2} s for 36 messages; N·L/4 = {:.2} s (L = {:.3} s measured)",
        drain.as_secs_f64(),
        36.0 * mean / 4.0,
        mean
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_instance_s_slots_come_back_when_its_leases_expire() {
    if !redis_available() {
        return;
    }
    let redis = redis();
    let fake = graph(200).await;
    let lease = Duration::from_millis(1500);
    // The instance to be killed runs on a runtime (and thread) of its own.
    let (endpoint, url) = (fake.endpoint(), redis.url());
    let (go, kill) = std::sync::mpsc::channel::<()>();
    let killed = std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let in_flight = rt.block_on(async {
            let (g, t) = instance_at(&endpoint, &url, lease);
            let set = surge(&t, 100..104).await;
            // Killed once all four requests are at Graph, so their leases
            // are in Redis (a permit counts in flight before its lease is
            // taken). Bounded wait.
            let deadline = Instant::now() + Duration::from_secs(10);
            while kill.try_recv().is_err() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let n = t.governor().stats().in_flight;
            std::mem::forget((set, t, g));
            n
        });
        // kill -9: nothing of it runs any more, nothing is given back.
        rt.shutdown_background();
        (in_flight, Instant::now())
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while fake.peak() < 4 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = go.send(());
    let (in_flight, killed_at) = killed.join().expect("killed instance");
    assert_eq!(in_flight, 4);
    let (_g, other) = instance(&fake, &redis, lease);
    let ok = all_ok(surge(&other, 0..8).await).await;
    assert_eq!(ok, 8, "the other instance goes on");
    // Its first request waited for the dead instance's leases to expire.
    let first = fake
        .sent()
        .iter()
        .filter(|s| {
            s.mime
                .as_deref()
                .and_then(|m| mailbridge::message::header_value(m, "Subject"))
                .and_then(|v| v.trim().trim_start_matches('n').parse::<usize>().ok())
                .is_some_and(|seq| seq < 100)
        })
        .map(|s| s.arrived)
        .min()
        .expect("a request of the other instance");
    assert!(
        first >= killed_at + lease - Duration::from_millis(400),
        "started {:?} after the kill, lease {lease:?}",
        first - killed_at
    );
    assert_eq!(throttled(&fake), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_redis_delivery_goes_on_under_the_fallback_limits_and_comes_back() {
    if !redis_available() {
        return;
    }
    let mut redis = redis();
    let fake = graph(50).await;
    let lease = Duration::from_secs(2);
    let (_ga, a) = instance(&fake, &redis, lease);
    let (_gb, b) = instance(&fake, &redis, lease);
    let (_gc, c) = instance(&fake, &redis, lease);
    let (p, q, r) = (
        surge(&a, 0..10).await,
        surge(&b, 10..20).await,
        surge(&c, 20..30).await,
    );
    // Redis goes away once a few messages are out.
    let deadline = Instant::now() + Duration::from_secs(20);
    while fake.sent().len() < 6 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    redis.stop();
    let (x, y, z) = tokio::join!(all_ok(p), all_ok(q), all_ok(r));
    assert_eq!((x, y, z), (10, 10, 10), "nothing waits for Redis");
    assert_eq!(fake.sent().len(), 30);
    let modes: Vec<&str> = [&a, &b, &c]
        .iter()
        .map(|t| t.governor().stats().backend)
        .collect();
    assert!(modes.contains(&"fallback"), "{modes:?}");
    // Fallback: 4 / 3 instances = 1 in flight each; at the switch, for one
    // lease time, each instance only reuses the slots it held in Redis
    // (the others' requests under their leases are still running): never
    // more than 4 in flight, so no 429.
    assert_eq!(throttled(&fake), 0, "no request over the 4 in flight");
    assert!(fake.peak() <= 4, "{}", fake.peak());
    let down = [&a, &b, &c]
        .into_iter()
        .find(|t| t.governor().stats().backend == "fallback")
        .expect("an instance in fallback");
    assert_eq!(down.governor().local_limits().max_in_flight, 1);
    let state = down.governor().shared_state().expect("shared");
    assert!(state.last_error.is_some(), "{state:?}");
    // Redis is back: within a bounded number of deliveries (Redis is asked
    // again about once a second) the shared budget is in use again.
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seq = 30;
    while down.governor().stats().backend != "redis" && Instant::now() < deadline {
        assert!(
            down.deliver(&env(seq), &mailbridge::transport::Body::from(&message(seq)))
                .await
                .is_ok()
        );
        seq += 1;
    }
    assert_eq!(down.governor().stats().backend, "redis");
    assert_eq!(throttled(&fake), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn at_the_loss_of_redis_slots_held_by_another_instance_are_not_overbooked() {
    if !redis_available() {
        return;
    }
    let mut redis = redis();
    // Long requests, so that a holds all four slots when Redis goes away.
    let fake = graph(600).await;
    let lease = Duration::from_secs(2);
    let (_ga, a) = instance(&fake, &redis, lease);
    let (_gb, b) = instance(&fake, &redis, lease);
    let (_gc, c) = instance(&fake, &redis, lease);
    let p = surge(&a, 0..6).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while fake.peak() < 4 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // b and c wait for a shared slot (a holds them all) ...
    let (q, r) = (surge(&b, 6..9).await, surge(&c, 9..12).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(fake.sent().is_empty(), "a's four requests still running");
    // ... when Redis goes away. Their fallback share is 1 each, but a's four
    // requests are still running: they must not start before those end.
    redis.stop();
    let (x, y, z) = tokio::join!(all_ok(p), all_ok(q), all_ok(r));
    assert_eq!((x, y, z), (6, 3, 3), "nothing waits for Redis");
    assert_eq!(throttled(&fake), 0, "no request over the 4 in flight");
    assert!(fake.peak() <= 4, "{}", fake.peak());
    assert_eq!(b.governor().stats().backend, "fallback");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_redis_is_back_requests_started_under_the_fallback_are_not_overbooked() {
    if !redis_available() {
        return;
    }
    let mut redis = redis();
    let fake = graph(600).await;
    let lease = Duration::from_secs(1);
    let (_ga, a) = instance(&fake, &redis, lease);
    let (_gb, b) = instance(&fake, &redis, lease);
    let (_gc, c) = instance(&fake, &redis, lease);
    // Redis is down from the start: all three run their share, 1 each.
    redis.stop();
    let (p, q, r) = (
        surge(&a, 0..3).await,
        surge(&b, 3..9).await,
        surge(&c, 9..15).await,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while fake.peak() < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(a.governor().stats().backend, "fallback");
    // Redis is back, empty: the requests running under the fallback hold no
    // lease there. Whoever notices first must not take all four slots.
    // (Whether the instances' timing overlaps enough to overbook without the
    // rule varies: this run also passed with it switched off; the rule
    // itself is tested in `governor::shared`.)
    redis.restart();
    let s = surge(&a, 15..21).await;
    let (w, x, y, z) = tokio::join!(all_ok(p), all_ok(q), all_ok(r), all_ok(s));
    assert_eq!((w, x, y, z), (3, 6, 6, 6));
    assert_eq!(throttled(&fake), 0, "no request over the 4 in flight");
    assert!(fake.peak() <= 4, "{}", fake.peak());
}
