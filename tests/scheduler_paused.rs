//! The scheduler against a scripted transport, on paused time: retries follow the backoff, Retry-After is honoured, and a give-up sends exactly one DSN through the same route.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mailbridge::common::BoxFuture;
use mailbridge::routing::Router;
use mailbridge::scheduler::{Policy, Scheduler};
use mailbridge::spool::{Meta, Spool};
use mailbridge::transport::{Delivery, Envelope, Failure, Transport};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// One scripted answer.
type Answer = fn(&Envelope) -> Delivery;

/// Answers from a script (the last answer repeats) and records each call.
struct Scripted {
    answers: Mutex<Vec<Answer>>,
    calls: Mutex<Vec<(Instant, Envelope, Vec<u8>)>>,
}

impl Scripted {
    fn new(answers: Vec<Answer>) -> Arc<Self> {
        Arc::new(Scripted {
            answers: Mutex::new(answers),
            calls: Mutex::new(Vec::new()),
        })
    }
    fn calls(&self) -> Vec<(Instant, Envelope, Vec<u8>)> {
        self.calls.lock().unwrap().clone()
    }
}

impl Transport for Scripted {
    fn describe(&self) -> String {
        "scripted://".into()
    }
    fn deliver<'a>(
        &'a self,
        env: &'a Envelope,
        message: &'a mailbridge::transport::Body,
    ) -> BoxFuture<'a, Delivery> {
        let at = Instant::now();
        let mut a = self.answers.lock().unwrap();
        let f = if a.len() > 1 { a.remove(0) } else { a[0] };
        let r = f(env);
        Box::pin(async move {
            let m = message.to_vec().await.unwrap_or_default();
            self.calls.lock().unwrap().push((at, env.clone(), m));
            r
        })
    }
    fn probe(&self) -> BoxFuture<'_, Result<(), Failure>> {
        Box::pin(async { Ok(()) })
    }
}

fn policy(give_up: u64) -> Policy {
    Policy {
        retry_initial: Duration::from_secs(60),
        retry_max: Duration::from_secs(600),
        give_up_after: Duration::from_secs(give_up),
        concurrency: 2,
        hostname: "relay.test".into(),
        sender_name: String::new(),
        reply_to: String::new(),
        identities: Default::default(),
        dsn: mailbridge::scheduler::dsn_policy::DsnPolicy::any(),
        dsn_from: "desk@relay.test".into(),
        dsn_from_name: "Mail Delivery System".into(),
    }
}

fn all_ok(env: &Envelope) -> Delivery {
    Ok(env.rcpts.iter().map(|_| Ok(())).collect())
}

async fn start(
    t: Arc<Scripted>,
    p: Policy,
) -> (Scheduler, Arc<Spool>, tempfile::TempDir, CancellationToken) {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), 100).unwrap();
    let spool = Arc::new(spool);
    let stop = CancellationToken::new();
    let (s, _task) = Scheduler::start(
        spool.clone(),
        Arc::new(Router::new(t, None)),
        p,
        stop.clone(),
    );
    (s, spool, dir, stop)
}

fn enqueue(s: &Scheduler, spool: &Spool, id: &str, from: &str, rcpts: &[&str]) {
    let body = b"From: app@legacy.local\r\nSubject: paused\r\n\r\nhello\r\n";
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let meta = Meta::new(
        id.into(),
        from.into(),
        rcpts.iter().map(|r| r.to_string()).collect(),
        body.len() as u64,
        now,
    );
    spool.store(&meta, body).unwrap();
    s.enqueue(meta);
}

async fn until(mut f: impl FnMut() -> bool) {
    for _ in 0..100_000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    panic!("condition never became true");
}

#[tokio::test(start_paused = true)]
async fn transient_failures_are_retried_with_backoff_then_delivered() {
    let t = Scripted::new(vec![
        |_| Err(Failure::server("421 4.3.2 busy")),
        |_| Err(Failure::transient("451 4.3.0 later")),
        all_ok,
    ]);
    let (s, spool, _dir, stop) = start(t.clone(), policy(86400)).await;
    enqueue(&s, &spool, "m1", "app@legacy.local", &["a@x.test"]);
    until(|| t.calls().len() == 3 && spool.is_empty()).await;
    let c = t.calls();
    let gap1 = c[1].0 - c[0].0;
    let gap2 = c[2].0 - c[1].0;
    assert!(
        gap1 >= Duration::from_secs(45) && gap1 <= Duration::from_secs(76),
        "{gap1:?}"
    );
    assert!(
        gap2 >= Duration::from_secs(90) && gap2 <= Duration::from_secs(151),
        "{gap2:?}"
    );
    assert_eq!(c[2].1.rcpts, ["a@x.test"]);
    stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn retry_after_pushes_the_next_attempt_out() {
    let t = Scripted::new(vec![
        |_| Err(Failure::transient("429 throttled").with_not_before(Duration::from_secs(1800))),
        all_ok,
    ]);
    let (s, spool, _dir, stop) = start(t.clone(), policy(86400)).await;
    enqueue(&s, &spool, "m2", "app@legacy.local", &["a@x.test"]);
    until(|| t.calls().len() == 2).await;
    let c = t.calls();
    assert!(c[1].0 - c[0].0 >= Duration::from_secs(1800));
    stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn throttled_mail_is_retried_when_the_pause_ends_without_backoff() {
    let t = Scripted::new(vec![
        |_| {
            Err(Failure::throttled(
                "432 4.3.2 sender thread limit exceeded",
                Duration::from_secs(30),
            ))
        },
        |_| {
            Err(Failure::throttled(
                "432 4.3.2 sender thread limit exceeded",
                Duration::from_secs(30),
            ))
        },
        |_| {
            Err(Failure::throttled(
                "432 4.3.2 sender thread limit exceeded",
                Duration::from_secs(30),
            ))
        },
        all_ok,
    ]);
    let (s, spool, _dir, stop) = start(t.clone(), policy(86400)).await;
    enqueue(&s, &spool, "t1", "app@legacy.local", &["a@x.test"]);
    until(|| t.calls().len() == 4 && spool.is_empty()).await;
    let c = t.calls();
    // Exactly the pause each time: no backoff (60 s, 120 s, ...) and no jitter.
    for w in c.windows(2) {
        assert_eq!(w[1].0 - w[0].0, Duration::from_secs(30));
    }
    stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn give_up_sends_one_dsn_through_the_same_route() {
    // Everything to x.test fails transiently forever; the sender's domain works.
    let t = Scripted::new(vec![|env| {
        if env.rcpts.iter().any(|r| r.ends_with("@x.test")) {
            Err(Failure::server("connection refused"))
        } else {
            all_ok(env)
        }
    }]);
    let (s, spool, _dir, stop) = start(t.clone(), policy(3600)).await;
    enqueue(
        &s,
        &spool,
        "m3",
        "app@legacy.local",
        &["a@x.test", "b@x.test"],
    );
    until(|| t.calls().iter().any(|c| c.1.from.is_empty())).await;
    until(|| spool.is_empty()).await;
    let calls = t.calls();
    let dsns: Vec<_> = calls.iter().filter(|c| c.1.from.is_empty()).collect();
    assert_eq!(dsns.len(), 1, "exactly one DSN");
    assert_eq!(dsns[0].1.rcpts, ["app@legacy.local"]);
    let text = String::from_utf8_lossy(&dsns[0].2);
    assert!(
        text.contains("Final-Recipient: rfc822; a@x.test")
            && text.contains("Final-Recipient: rfc822; b@x.test"),
        "{text}"
    );
    assert!(
        text.contains("Status: 4.4.7") && text.contains("delivery time expired"),
        "{text}"
    );
    // Attempts stopped once the message was given up.
    let attempts = calls.iter().filter(|c| !c.1.from.is_empty()).count();
    tokio::time::sleep(Duration::from_secs(7200)).await;
    assert_eq!(
        t.calls().iter().filter(|c| !c.1.from.is_empty()).count(),
        attempts
    );
    stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_failing_dsn_is_never_bounced_again_and_never_dropped() {
    let t = Scripted::new(vec![|_| Err(Failure::permanent("550 5.1.1 no such user"))]);
    let (s, spool, dir, stop) = start(t.clone(), policy(3600)).await;
    enqueue(&s, &spool, "m4", "app@legacy.local", &["a@x.test"]);
    until(|| t.calls().len() == 2 && s.stats().bounce_undeliverable == 1).await;
    tokio::time::sleep(Duration::from_secs(7200)).await;
    let calls = t.calls();
    assert_eq!(calls.len(), 2, "the message, then its DSN, then nothing");
    assert!(
        calls[1].1.from.is_empty(),
        "the DSN's envelope sender is <>"
    );
    let dsn_text = String::from_utf8_lossy(&calls[1].2).into_owned();
    assert!(
        dsn_text.contains("From: \"Mail Delivery System\" <desk@relay.test>\r\n"),
        "{dsn_text}"
    );
    // Kept, visible, on disk: the original is gone, the DSN stays.
    let on_disk = Spool::list(dir.path()).unwrap();
    assert_eq!(on_disk.len(), 1);
    assert_eq!(on_disk[0].id, "m4-dsn");
    assert!(on_disk[0].bounce_undeliverable);
    assert_eq!(on_disk[0].state(), "bounce_undeliverable");
    let stats = s.stats();
    assert_eq!(
        (stats.depth, stats.deferred, stats.bounce_undeliverable),
        (1, 0, 1)
    );
    // The operator retries it: one more attempt, then held again.
    assert!(s.retry_now("m4-dsn").await);
    until(|| t.calls().len() == 3).await;
    until(|| s.stats().bounce_undeliverable == 1 && s.stats().in_flight == 0).await;
    // The operator deletes it.
    assert_eq!(s.delete("m4-dsn").await, Ok(true));
    until(|| spool.is_empty()).await;
    stop.cancel();
}

/// Panics on its first `panics` calls, then delivers.
struct Panicky {
    panics: std::sync::atomic::AtomicUsize,
    calls: Mutex<Vec<Instant>>,
}

impl Transport for Panicky {
    fn describe(&self) -> String {
        "panicky://".into()
    }
    fn deliver<'a>(
        &'a self,
        env: &'a Envelope,
        _: &'a mailbridge::transport::Body,
    ) -> BoxFuture<'a, Delivery> {
        self.calls.lock().unwrap().push(Instant::now());
        let left = self.panics.load(std::sync::atomic::Ordering::SeqCst);
        Box::pin(async move {
            if left > 0 {
                self.panics
                    .store(left - 1, std::sync::atomic::Ordering::SeqCst);
                panic!("transport bug");
            }
            all_ok(env)
        })
    }
    fn probe(&self) -> BoxFuture<'_, Result<(), Failure>> {
        Box::pin(async { Ok(()) })
    }
}

#[tokio::test(start_paused = true)]
async fn a_panicking_attempt_is_rescheduled_not_stuck_in_flight() {
    let t = Arc::new(Panicky {
        panics: 2.into(),
        calls: Mutex::new(Vec::new()),
    });
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), 100).unwrap();
    let spool = Arc::new(spool);
    let stop = CancellationToken::new();
    let (s, _task) = Scheduler::start(
        spool.clone(),
        Arc::new(Router::new(t.clone(), None)),
        policy(86400),
        stop.clone(),
    );
    enqueue(&s, &spool, "p1", "app@legacy.local", &["a@x.test"]);
    enqueue(&s, &spool, "p2", "app@legacy.local", &["b@x.test"]);
    until(|| t.calls.lock().unwrap().len() == 2).await;
    // Both attempts panicked; neither message is in flight any more.
    until(|| s.stats().in_flight == 0).await;
    assert_eq!(s.delete("p2").await, Ok(true), "not stuck in flight");
    // p1 is retried after the backoff and delivered.
    until(|| spool.is_empty()).await;
    let calls = t.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 3, "two panics, then one delivery");
    let gap = calls[2] - calls[0];
    assert!(
        gap >= Duration::from_secs(45) && gap <= Duration::from_secs(76),
        "{gap:?}"
    );
    stop.cancel();
}

/// With the default `delivery.dsn_to` ("allowed_domains", empty domain list),
/// a bounce for mail from a remote, unauthenticated client is not sent (no
/// backscatter), while mail from a loopback client still gets its DSN.
#[tokio::test(start_paused = true)]
async fn default_dsn_policy_sends_no_backscatter() {
    // Both messages fail for good; the one DSN sent is delivered.
    let t = Scripted::new(vec![
        |_| Err(Failure::permanent("550 5.1.1 no such user")),
        |_| Err(Failure::permanent("550 5.1.1 no such user")),
        all_ok,
    ]);
    let p = Policy {
        dsn: Default::default(),
        ..policy(3600)
    };
    let (s, spool, _dir, stop) = start(t.clone(), p).await;
    let body = b"From: victim@elsewhere.test\r\n\r\nhello\r\n";
    for (id, client) in [("m5", "198.51.100.7:4000"), ("m6", "127.0.0.1:4000")] {
        let mut meta = Meta::new(
            id.into(),
            "victim@elsewhere.test".into(),
            vec!["a@x.test".into()],
            body.len() as u64,
            0,
        );
        meta.client = client.into();
        spool.store(&meta, body).unwrap();
        s.enqueue(meta);
    }
    until(|| spool.is_empty() && t.calls().len() >= 3).await;
    tokio::time::sleep(Duration::from_secs(7200)).await;
    let calls = t.calls();
    let dsns: Vec<_> = calls.iter().filter(|c| c.1.from.is_empty()).collect();
    assert_eq!(calls.len(), 3, "two messages and one DSN");
    assert_eq!(dsns.len(), 1);
    assert_eq!(
        dsns[0].1.id, "m6-dsn",
        "only the loopback client's sender got one"
    );
    stop.cancel();
}

/// Entries as a previous run left them, with a tampered or clock-skewed
/// `next_attempt`: loaded at start, none may stop delivery or wait past
/// `retry_max` (600 s here).
#[tokio::test(start_paused = true)]
async fn stored_next_attempt_is_clamped_at_load() {
    let t = Scripted::new(vec![all_ok]);
    let dir = tempfile::tempdir().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    {
        let spool = Spool::open(dir.path(), 100).unwrap();
        let body = b"Subject: s\r\n\r\nx\r\n";
        for (id, next) in [
            ("hostile", u64::MAX),
            ("day-ahead", now + 86_400),
            ("due", now),
        ] {
            let mut meta = Meta::new(
                id.into(),
                "app@legacy.local".into(),
                vec!["a@x.test".into()],
                body.len() as u64,
                now,
            );
            meta.next_attempt = next;
            spool.store(&meta, body).unwrap();
        }
    }
    let spool = Spool::open(dir.path(), 100).unwrap();
    assert_eq!(spool.len(), 3, "counted before anything is read");
    let spool = Arc::new(spool);
    let stop = CancellationToken::new();
    let start = Instant::now();
    let (_s, _task) = Scheduler::start(
        spool.clone(),
        Arc::new(Router::new(t.clone(), None)),
        policy(86_400 * 5),
        stop.clone(),
    );
    until(|| spool.is_empty()).await;
    let calls = t.calls();
    assert_eq!(calls.len(), 3);
    for (at, env, _) in &calls {
        assert!(
            at.duration_since(start) <= Duration::from_secs(600),
            "{} at {:?}",
            env.id,
            at.duration_since(start)
        );
    }
    assert_eq!(calls[0].1.id, "due");
    stop.cancel();
}

/// A message throttled until its holds ran out goes back to the scheduler;
/// mail that arrived during the pause must not take its turn, even with
/// every delivery slot of the scheduler taken by that newer mail.
#[tokio::test(start_paused = true)]
async fn a_throttled_message_whose_holds_ran_out_is_not_overtaken() {
    use mailbridge::transport::governor::{Governed, Limits};
    let t = Scripted::new(vec![
        |_| {
            Err(Failure::throttled(
                "Graph 429 TooManyRequests",
                Duration::from_secs(30),
            ))
        },
        all_ok,
    ]);
    let limits = Limits {
        hold_retries: 0,
        ..Limits::graph(1, "desk@relay.test")
    };
    let governed: Arc<dyn Transport> = Arc::new(Governed::new(t.clone(), limits));
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), 100).unwrap();
    let spool = Arc::new(spool);
    let stop = CancellationToken::new();
    let p = Policy {
        concurrency: 1,
        ..policy(86400)
    };
    let (s, _task) = Scheduler::start(
        spool.clone(),
        Arc::new(Router::new(governed, None)),
        p,
        stop.clone(),
    );
    let t0 = Instant::now();
    enqueue(&s, &spool, "first", "app@legacy.local", &["a@x.test"]);
    until(|| !t.calls().is_empty()).await;
    // Newer mail arrives during the pause and takes the scheduler's slot.
    enqueue(&s, &spool, "second", "app@legacy.local", &["b@x.test"]);
    enqueue(&s, &spool, "third", "app@legacy.local", &["c@x.test"]);
    until(|| t.calls().len() == 4 && spool.is_empty()).await;
    let c = t.calls();
    let ids: Vec<&str> = c.iter().map(|c| c.1.id.as_str()).collect();
    assert_eq!(ids, ["first", "first", "second", "third"]);
    // Retried the moment the pause ended, without backoff.
    assert_eq!(c[1].0 - t0, Duration::from_secs(30));
    stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn an_attempt_event_is_published_after_its_outcome_is_applied() {
    // A refused sample mail (tried once, then removed): whoever sees its
    // event sees the queue without it, as the admin page shows it.
    let t = Scripted::new(vec![|_| {
        Err(Failure::permanent("550 5.1.1 unknown").with_reply(550, None))
    }]);
    let (s, spool, _dir, stop) = start(t, policy(86400)).await;
    let mut events = s.subscribe();
    let body = b"Subject: sample\r\n\r\nhi\r\n";
    let mut meta = Meta::new(
        "sample1".into(),
        "desk@relay.test".into(),
        vec!["nobody@example.com".into()],
        body.len() as u64,
        0,
    );
    meta.sample = true;
    spool.store(&meta, body).unwrap();
    s.enqueue(meta);
    let event = events.recv().await.unwrap();
    assert_eq!(event.id, "sample1");
    assert_eq!(
        s.stats().depth,
        0,
        "the event came before the queue changed"
    );
    assert!(spool.is_empty());
    stop.cancel();
}
