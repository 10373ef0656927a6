//! Tests of the governor on paused time: slots, pauses, budgets, pacing, arrival order, holds and limits that change while it runs.

use super::*;
use std::collections::VecDeque;
use std::sync::atomic::AtomicUsize;

/// A transport that takes `latency`, counts concurrency, and answers
/// from a script (default: delivered).
struct Slow {
    latency: Duration,
    now: AtomicUsize,
    peak: AtomicUsize,
    calls: Mutex<Vec<(Instant, Option<String>)>>,
    ids: Mutex<Vec<String>>,
    script: Mutex<VecDeque<Delivery>>,
}

impl Slow {
    fn new(latency_ms: u64) -> Arc<Slow> {
        Arc::new(Slow {
            latency: Duration::from_millis(latency_ms),
            now: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            calls: Mutex::new(Vec::new()),
            ids: Mutex::new(Vec::new()),
            script: Mutex::new(VecDeque::new()),
        })
    }
    fn starts(&self) -> Vec<Instant> {
        lock(&self.calls).iter().map(|c| c.0).collect()
    }
}

impl Transport for Slow {
    fn describe(&self) -> String {
        "slow".into()
    }
    fn deliver<'a>(
        &'a self,
        env: &'a Envelope,
        _: &'a crate::transport::Body,
    ) -> BoxFuture<'a, Delivery> {
        Box::pin(async move {
            lock(&self.calls).push((Instant::now(), env.identity.clone()));
            lock(&self.ids).push(env.id.clone());
            let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.peak.fetch_max(n, Ordering::SeqCst);
            tokio::time::sleep(self.latency).await;
            self.now.fetch_sub(1, Ordering::SeqCst);
            lock(&self.script)
                .pop_front()
                .unwrap_or_else(|| Ok(vec![Ok(()); env.rcpts.len()]))
        })
    }
    fn probe(&self) -> BoxFuture<'_, Result<(), Failure>> {
        Box::pin(async { Ok(()) })
    }
}

fn env(identity: Option<&str>) -> Envelope {
    Envelope {
        id: "x".into(),
        from: "a@b".into(),
        rcpts: vec!["c@d".into()],
        identity: identity.map(String::from),
    }
}

async fn send_all(g: &Arc<Governed>, n: usize, identity: Option<&'static str>) -> Vec<Delivery> {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let g = g.clone();
        set.spawn(async move {
            g.deliver(&env(identity), &crate::transport::Body::from(b"m"))
                .await
        });
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        out.push(r.unwrap_or_else(|e| Err(Failure::transient(e.to_string()))));
    }
    out
}

#[tokio::test(start_paused = true)]
async fn never_more_than_four_in_flight() {
    let inner = Slow::new(2500);
    let g = Arc::new(Governed::new(
        inner.clone(),
        Limits::graph(4, "desk@contoso.com"),
    ));
    let t0 = Instant::now();
    let results = send_all(&g, 40, None).await;
    assert!(results.iter().all(|r| r.is_ok()));
    assert_eq!(inner.peak.load(Ordering::SeqCst), 4);
    // 40 messages, 4 at a time, 2.5 s each: exactly the physical bound.
    assert_eq!(t0.elapsed(), Duration::from_millis(10 * 2500));
    assert_eq!(g.governor().stats().started, 40);
    assert_eq!(g.governor().stats().in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn keys_are_separate_unless_the_app_is_capped() {
    let inner = Slow::new(1000);
    let g = Arc::new(Governed::new(
        inner.clone(),
        Limits::graph(4, "desk@contoso.com"),
    ));
    let (a, b) = tokio::join!(send_all(&g, 4, Some("a@x")), send_all(&g, 4, Some("B@x")));
    assert!(a.iter().chain(&b).all(|r| r.is_ok()));
    assert_eq!(inner.peak.load(Ordering::SeqCst), 8);

    let inner = Slow::new(1000);
    let limits = Limits {
        app_in_flight: 4,
        ..Limits::graph(4, "desk@contoso.com")
    };
    let g = Arc::new(Governed::new(inner.clone(), limits));
    let _ = tokio::join!(send_all(&g, 4, Some("a@x")), send_all(&g, 4, Some("b@x")));
    assert_eq!(inner.peak.load(Ordering::SeqCst), 4);
}

#[tokio::test(start_paused = true)]
async fn a_429_pauses_every_request_of_the_mailbox() {
    let inner = Slow::new(100);
    lock(&inner.script)
        .push_back(Err(Failure::transient("Graph 429 TooManyRequests")
            .with_not_before(Duration::from_secs(10))));
    let g = Arc::new(Governed::new(
        inner.clone(),
        Limits::graph(1, "desk@contoso.com"),
    ));
    let t0 = Instant::now();
    let results = send_all(&g, 5, None).await;
    assert_eq!(results.iter().filter(|r| r.is_err()).count(), 1);
    let starts: Vec<Duration> = inner.starts().iter().map(|t| *t - t0).collect();
    // The first is throttled at 0.1 s; nobody starts before 10.1 s; then one at a time.
    assert_eq!(starts[0], Duration::ZERO);
    for (i, s) in starts[1..].iter().enumerate() {
        assert_eq!(
            *s,
            Duration::from_millis(10_100 + 100 * i as u64),
            "{starts:?}"
        );
    }
    assert_eq!(g.governor().stats().throttled, 1);
    // Another mailbox is not paused.
    lock(&inner.script).push_back(Err(
        Failure::transient("429").with_not_before(Duration::from_secs(30))
    ));
    let _ = g
        .deliver(&env(None), &crate::transport::Body::from(b"m"))
        .await;
    let t1 = Instant::now();
    assert!(
        g.deliver(&env(Some("other@x")), &crate::transport::Body::from(b"m"))
            .await
            .is_ok()
    );
    assert_eq!(t1.elapsed(), Duration::from_millis(100));
    assert!(g.governor().paused_for("desk@contoso.com").is_some());
    assert!(
        g.probe().await.is_err(),
        "a probe does not wait out a pause"
    );
}

#[tokio::test(start_paused = true)]
async fn no_retry_storm_after_a_pause() {
    // 4 in flight, 20 waiting; the upstream throttles once for 30 s.
    let inner = Slow::new(1000);
    lock(&inner.script).push_back(Err(
        Failure::transient("429").with_not_before(Duration::from_secs(30))
    ));
    let g = Arc::new(Governed::new(inner.clone(), Limits::graph(4, "k")));
    let t0 = Instant::now();
    let _ = send_all(&g, 24, None).await;
    let starts: Vec<Duration> = inner.starts().iter().map(|t| *t - t0).collect();
    // After the pause, starts come at most 4 per latency period.
    let after: Vec<&Duration> = starts
        .iter()
        .filter(|s| **s >= Duration::from_secs(31))
        .collect();
    for s in &after {
        let burst = after
            .iter()
            .filter(|o| ***o >= **s && ***o < **s + Duration::from_millis(1000))
            .count();
        assert!(burst <= 4, "{starts:?}");
    }
    // Nothing started during the pause.
    assert!(
        starts
            .iter()
            .all(|s| *s < Duration::from_secs(1) || *s >= Duration::from_secs(31)),
        "{starts:?}"
    );
    assert_eq!(inner.peak.load(Ordering::SeqCst), 4);
}

#[tokio::test(start_paused = true)]
async fn pacing_spreads_sixty_messages_over_two_minutes() {
    let inner = Slow::new(500);
    let g = Arc::new(Governed::new(
        inner.clone(),
        Limits::exchange_smtp(3, 30, "desk@contoso.com"),
    ));
    let t0 = Instant::now();
    let _ = send_all(&g, 60, None).await;
    let starts: Vec<Duration> = inner.starts().iter().map(|t| *t - t0).collect();
    assert_eq!(starts.len(), 60);
    // One start every 2 s: the last at 118 s, none closer than 2 s.
    assert_eq!(
        *starts.last().unwrap_or(&Duration::ZERO),
        Duration::from_secs(118)
    );
    for w in starts.windows(2) {
        assert_eq!(w[1] - w[0], Duration::from_secs(2));
    }
    // Never more than 30 starts in any minute.
    for s in &starts {
        let n = starts
            .iter()
            .filter(|o| **o >= *s && **o < *s + Duration::from_secs(60))
            .count();
        assert!(n <= 30);
    }
}

#[tokio::test(start_paused = true)]
async fn budget_holds_starts_to_n_per_window() {
    let inner = Slow::new(10);
    let limits = Limits {
        budget: Some((5, Duration::from_secs(60))),
        ..Limits::none()
    };
    let g = Arc::new(Governed::new(inner.clone(), limits));
    let t0 = Instant::now();
    let _ = send_all(&g, 12, None).await;
    let starts: Vec<Duration> = inner.starts().iter().map(|t| *t - t0).collect();
    let at = |secs: u64| starts.iter().filter(|s| s.as_secs() == secs).count();
    assert_eq!((at(0), at(60), at(120)), (5, 5, 2), "{starts:?}");
}

#[tokio::test(start_paused = true)]
async fn pauses_are_capped_and_never_shortened() {
    let g = Governor::new(Limits {
        max_pause: Duration::from_secs(60),
        ..Limits::none()
    });
    g.pause("k", Duration::from_secs(86_400));
    assert_eq!(g.paused_for("k"), Some(Duration::from_secs(60)));
    g.pause("k", Duration::from_secs(5));
    assert_eq!(g.paused_for("k"), Some(Duration::from_secs(60)));
    // Permanent failures and per-recipient results never pause.
    g.observe(
        "j",
        &Err(Failure::permanent("no").with_not_before(Duration::from_secs(9))),
    );
    g.observe(
        "j",
        &Ok(vec![Err(
            Failure::transient("x").with_not_before(Duration::from_secs(9))
        )]),
    );
    assert_eq!(g.paused_for("j"), None);
}

fn env_n(id: &str, rcpts: usize) -> Envelope {
    Envelope {
        id: id.into(),
        from: "a@b".into(),
        rcpts: (0..rcpts).map(|i| format!("r{i}@d")).collect(),
        identity: None,
    }
}

/// Start `n` deliveries of `size`-byte messages with `rcpts` recipients,
/// in order; the start times.
async fn sized(
    g: &Arc<Governed>,
    inner: &Slow,
    n: usize,
    size: usize,
    rcpts: usize,
) -> Vec<Duration> {
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let g = g.clone();
        set.spawn(async move {
            g.deliver(
                &env_n(&i.to_string(), rcpts),
                &crate::transport::Body::from(&vec![b'x'; size]),
            )
            .await
        });
        tokio::task::yield_now().await;
    }
    while set.join_next().await.is_some() {}
    inner.starts().iter().map(|t| *t - t0).collect()
}

/// The most spent in any window of `span` starting at a start.
fn peak(starts: &[Duration], each: u64, span: Duration) -> u64 {
    starts
        .iter()
        .map(|s| {
            starts
                .iter()
                .filter(|o| **o >= *s && **o < *s + span)
                .count() as u64
                * each
        })
        .max()
        .unwrap_or(0)
}

#[tokio::test(start_paused = true)]
async fn the_byte_budget_is_never_exceeded() {
    let inner = Slow::new(10);
    let span = Duration::from_secs(300);
    let limits = Limits {
        bytes_budget: Some((1000, span)),
        ..Limits::none()
    };
    let g = Arc::new(Governed::new(inner.clone(), limits));
    let starts = sized(&g, &inner, 7, 400, 1).await;
    // Two fit per window (800 bytes), the third waits for the first two to leave.
    let secs: Vec<u64> = starts.iter().map(|s| s.as_secs()).collect();
    assert_eq!(secs, [0, 0, 300, 300, 600, 600, 900], "{starts:?}");
    assert!(peak(&starts, 400, span) <= 1000);
}

#[tokio::test(start_paused = true)]
async fn graph_limits_count_request_bytes_and_hold_a_surge_to_150_mb() {
    // 100 messages of 2 MB (2.7 MB after base64): about 55 fit in 5 minutes.
    let inner = Slow::new(1000);
    let limits = Limits::graph(4, "desk@contoso.com");
    assert_eq!(
        limits.bytes_budget,
        Some((150_000_000, Duration::from_secs(300)))
    );
    let g = Arc::new(Governed::new(inner.clone(), limits));
    let starts = sized(&g, &inner, 100, 2_000_000, 1).await;
    // Slow counts the message size as request bytes (the default).
    assert!(peak(&starts, 2_000_000, Duration::from_secs(300)) <= 150_000_000);
    assert_eq!(
        starts
            .iter()
            .filter(|s| **s < Duration::from_secs(300))
            .count(),
        75
    );
}

#[tokio::test(start_paused = true)]
async fn the_recipient_budget_holds_a_day() {
    let inner = Slow::new(10);
    let g = Arc::new(Governed::new(
        inner.clone(),
        Limits::exchange_smtp(3, 6000, "desk@contoso.com"),
    ));
    // 21 messages of 500 recipients: 20 today, the 21st a day after the first.
    let starts = sized(&g, &inner, 21, 10, 500).await;
    assert_eq!(starts.len(), 21);
    assert!(starts[19] < Duration::from_secs(60), "{starts:?}");
    assert_eq!(starts[20], Duration::from_secs(86_400));
    assert!(peak(&starts, 500, Duration::from_secs(86_400)) <= 10_000);
}

#[tokio::test(start_paused = true)]
async fn a_throttled_message_is_held_and_goes_first_when_the_pause_ends() {
    let inner = Slow::new(100);
    lock(&inner.script).push_back(Err(Failure::throttled(
        "Graph 429 TooManyRequests",
        Duration::from_secs(10),
    )));
    let g = Arc::new(Governed::new(
        inner.clone(),
        Limits::graph(1, "desk@contoso.com"),
    ));
    let t0 = Instant::now();
    let first = {
        let g = g.clone();
        tokio::spawn(async move {
            g.deliver(&env_n("first", 1), &crate::transport::Body::from(b"m"))
                .await
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Newer mail arrives during the pause.
    let mut later = tokio::task::JoinSet::new();
    for i in 0..3 {
        let g = g.clone();
        later.spawn(async move {
            g.deliver(
                &env_n(&format!("later{i}"), 1),
                &crate::transport::Body::from(b"m"),
            )
            .await
        });
        tokio::task::yield_now().await;
    }
    assert!(first.await.unwrap().is_ok(), "held, then delivered");
    while later.join_next().await.is_some() {}
    let ids = lock(&inner.ids).clone();
    assert_eq!(ids, ["first", "first", "later0", "later1", "later2"]);
    let starts: Vec<Duration> = inner.starts().iter().map(|t| *t - t0).collect();
    // Retried the moment the pause ended (0.1 s + 10 s), the others after it.
    assert_eq!(starts[1], Duration::from_millis(10_100));
    assert_eq!(starts[2], Duration::from_millis(10_200));
}

#[tokio::test(start_paused = true)]
async fn holding_gives_up_after_the_configured_retries() {
    let inner = Slow::new(10);
    for _ in 0..10 {
        lock(&inner.script).push_back(Err(Failure::throttled("429", Duration::from_secs(5))));
    }
    let g = Arc::new(Governed::new(inner.clone(), Limits::graph(4, "k")));
    let r = g
        .deliver(&env_n("m", 1), &crate::transport::Body::from(b"m"))
        .await;
    assert!(matches!(&r, Err(f) if f.throttled), "{r:?}");
    assert_eq!(inner.starts().len(), 1 + HOLD_RETRIES as usize);
    // Not throttling (a plain transient failure with a wait): not held.
    let inner = Slow::new(10);
    lock(&inner.script).push_back(Err(
        Failure::transient("503").with_not_before(Duration::from_secs(5))
    ));
    let g = Arc::new(Governed::new(inner.clone(), Limits::graph(4, "k")));
    assert!(
        g.deliver(&env_n("m", 1), &crate::transport::Body::from(b"m"))
            .await
            .is_err()
    );
    assert_eq!(inner.starts().len(), 1);
}

/// Start `n` deliveries in order (ids `0`, `1`, …), one task each.
async fn in_order(g: &Arc<Governed>, n: usize) -> tokio::task::JoinSet<Delivery> {
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let g = g.clone();
        set.spawn(async move {
            g.deliver(
                &env_n(&i.to_string(), 1),
                &crate::transport::Body::from(b"m"),
            )
            .await
        });
        tokio::task::yield_now().await;
    }
    set
}

#[tokio::test(start_paused = true)]
async fn after_a_pause_held_mail_goes_first_then_the_rest_in_arrival_order() {
    // 4 slots, 12 messages; the first two are throttled (EWS: server busy,
    // BackOffMilliseconds 3000), the next two delivered.
    let inner = Slow::new(100);
    for _ in 0..2 {
        lock(&inner.script).push_back(Err(Failure::throttled(
            "ErrorServerBusy",
            Duration::from_secs(3),
        )));
    }
    let g = Arc::new(Governed::new(inner.clone(), Limits::ews(4, 0, false, "k")));
    let t0 = Instant::now();
    let mut set = in_order(&g, 12).await;
    while let Some(r) = set.join_next().await {
        assert!(matches!(r, Ok(Ok(_))), "{r:?}");
    }
    let calls = lock(&inner.calls).clone();
    let ids = lock(&inner.ids).clone();
    let after: Vec<(&str, Duration)> = ids
        .iter()
        .zip(&calls)
        .map(|(id, c)| (id.as_str(), c.0 - t0))
        .filter(|(_, t)| *t >= Duration::from_secs(3))
        .collect();
    // The pause ends at 3.1 s: the two held messages start that instant,
    // first, then the waiting ones in the order they arrived.
    let order: Vec<&str> = after.iter().map(|(id, _)| *id).collect();
    assert_eq!(
        order,
        ["0", "1", "4", "5", "6", "7", "8", "9", "10", "11"],
        "{after:?}"
    );
    assert_eq!(after[0].1, Duration::from_millis(3100));
    assert_eq!(after[1].1, Duration::from_millis(3100));
    // The rest follow once the held ones are answered (first on the wire
    // too, and proof the pause was enough).
    assert_eq!(after[2].1, Duration::from_millis(3200));
    // Nothing started during the pause.
    assert!(
        calls
            .iter()
            .all(|c| c.0 - t0 < Duration::from_millis(100)
                || c.0 - t0 >= Duration::from_millis(3100))
    );
    assert_eq!(inner.peak.load(Ordering::SeqCst), 4);
}

#[tokio::test(start_paused = true)]
async fn a_message_whose_holds_ran_out_keeps_its_place_for_its_return() {
    let inner = Slow::new(100);
    lock(&inner.script).push_back(Err(Failure::throttled("429", Duration::from_secs(5))));
    let limits = Limits {
        hold_retries: 0,
        ..Limits::graph(1, "k")
    };
    let g = Arc::new(Governed::new(inner.clone(), limits));
    // "0" is throttled and goes back (no holds); "1" arrives during the pause.
    let r = g
        .deliver(&env_n("0", 1), &crate::transport::Body::from(b"m"))
        .await;
    assert!(matches!(&r, Err(f) if f.throttled));
    let t0 = Instant::now();
    let mut newer = in_order(&g, 0).await;
    {
        let g = g.clone();
        newer.spawn(async move {
            g.deliver(&env_n("1", 1), &crate::transport::Body::from(b"m"))
                .await
        });
    }
    // The scheduler hands "0" back 0.4 s after the pause ended.
    tokio::time::sleep(Duration::from_millis(5300)).await;
    assert!(
        g.deliver(&env_n("0", 1), &crate::transport::Body::from(b"m"))
            .await
            .is_ok()
    );
    while newer.join_next().await.is_some() {}
    assert_eq!(lock(&inner.ids).clone(), ["0", "0", "1"]);
    let starts = inner.starts();
    assert_eq!(starts[1] - t0, Duration::from_millis(5300));
    // A message that never comes back holds the line only RETURN_GRACE
    // past the pause.
    lock(&inner.script).push_back(Err(Failure::throttled("429", Duration::from_secs(5))));
    let _ = g
        .deliver(&env_n("2", 1), &crate::transport::Body::from(b"m"))
        .await;
    let t1 = Instant::now();
    assert!(
        g.deliver(&env_n("3", 1), &crate::transport::Body::from(b"m"))
            .await
            .is_ok()
    );
    assert_eq!(
        t1.elapsed(),
        Duration::from_secs(5) + RETURN_GRACE + Duration::from_millis(100)
    );
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_waiter_does_not_block_the_line() {
    let inner = Slow::new(1000);
    let g = Arc::new(Governed::new(inner.clone(), Limits::graph(1, "k")));
    let busy = in_order(&g, 1).await;
    let waiter = {
        let g = g.clone();
        tokio::spawn(async move {
            g.deliver(&env_n("gone", 1), &crate::transport::Body::from(b"m"))
                .await
        })
    };
    tokio::task::yield_now().await;
    waiter.abort();
    let t0 = Instant::now();
    assert!(
        g.deliver(&env_n("next", 1), &crate::transport::Body::from(b"m"))
            .await
            .is_ok()
    );
    assert_eq!(t0.elapsed(), Duration::from_millis(2000));
    drop(busy);
}

#[tokio::test(start_paused = true)]
async fn the_registry_keeps_a_governor_and_its_state_across_rebuilds() {
    let reg = Governors::new();
    let inner = Slow::new(1000);
    let first = Arc::new(Governed::with_governor(
        inner.clone(),
        reg.governor("graph app", Limits::graph(1, "desk@x")),
    ));
    first.governor().pause("desk@x", Duration::from_secs(30));
    let running = in_order(&first, 1).await;
    tokio::time::sleep(Duration::from_secs(31)).await;
    assert_eq!(first.governor().stats().in_flight, 1);
    // A reload rebuilds the route with 2 in flight: same governor, its
    // attempt in flight counted, the new limit in force.
    let second = Arc::new(Governed::with_governor(
        inner.clone(),
        reg.governor("graph app", Limits::graph(2, "desk@x")),
    ));
    assert!(Arc::ptr_eq(first.governor(), second.governor()));
    assert_eq!(second.governor().limits().max_in_flight, 2);
    assert_eq!(second.governor().stats().in_flight, 1);
    drop(first);
    let t0 = Instant::now();
    let mut more = in_order(&second, 2).await;
    while more.join_next().await.is_some() {}
    // One slot was taken by the old route's attempt (ending at 32 s): the
    // two new ones ran one after the other, then side by side.
    assert_eq!(inner.peak.load(Ordering::SeqCst), 2);
    assert!(t0.elapsed() <= Duration::from_secs(2), "{:?}", t0.elapsed());
    drop(running);
    // A pause survives the rebuild too.
    second.governor().pause("desk@x", Duration::from_secs(60));
    let third = reg.governor("graph app", Limits::graph(4, "desk@x"));
    assert!(third.paused_for("desk@x").is_some());
    // Another application gets its own governor; one no route holds is gone.
    assert!(!Arc::ptr_eq(
        &third,
        &reg.governor("smtp other", Limits::none())
    ));
    assert_eq!(reg.stats().len(), 1, "{:?}", reg.stats());
}
