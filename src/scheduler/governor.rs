//! The throttle governor: per app and mailbox, it keeps requests within what the upstream accepts (in-flight slots, a pause after a 429, a sliding request budget, message pacing), so surges queue here instead of provoking throttling upstream.
//!
//! It sits between the router and a transport as [`Governed`], itself a
//! [`Transport`]. One [`Governor`] belongs to one upstream application (one
//! OAuth client, one SMTP account); inside it every *key* (the mailbox sent
//! as: [`Envelope::identity`], else [`Limits::default_key`]) has its own
//! gate:
//!
//! 1. **Slots**: at most [`Limits::max_in_flight`] attempts at once (a fair,
//!    first-come semaphore: Graph allows 4 concurrent requests per app and
//!    mailbox, Exchange Online SMTP 3 connections per mailbox). An optional
//!    [`Limits::app_in_flight`] caps all keys together.
//! 2. **Pause**: an attempt that fails transiently with a `not_before` (a 429
//!    or 503 with `Retry-After`, EWS `BackOffMilliseconds`) pauses the whole
//!    key until then: every waiting attempt waits, not only the one that was
//!    throttled. This is what prevents retry storms: after the pause at most
//!    `max_in_flight` attempts start again, never the whole backlog.
//! 3. **Budget**: at most `n` attempts start within any window (Graph: 10,000
//!    requests per 10 minutes per app and mailbox).
//! 4. **Pacing**: an optional messages-per-minute rate, spread evenly (one
//!    start every `60 s / rate`; Exchange Online: 30 per minute), so a surge
//!    is smoothed instead of being carried over by Exchange.
//!
//! An attempt counts as one request. Graph's large-message path (draft,
//! attachment uploads, send) makes several requests in one attempt, one at a
//! time, so it never exceeds its slot; it does undercount the budget, which
//! matters only when many messages are over 4 MB.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::transport::{BoxFuture, Delivery, Envelope, Failure, Severity, Transport};

/// What one governor enforces per key. `0`/`None` switches a limit off.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Attempts in flight per key (Graph 4, Exchange Online SMTP 3); 0 = no limit.
    pub max_in_flight: usize,
    /// Attempts in flight across all keys of this governor; 0 = no limit. The
    /// Graph documentation is ambiguous between per app and per app+mailbox
    /// (UPSTREAMS §3.1): set this to 4 too for the strictest reading.
    pub app_in_flight: usize,
    /// At most `.0` attempts start in any window of `.1` (Graph: 10,000 per 10 minutes).
    pub budget: Option<(u32, Duration)>,
    /// Messages per minute per key, spread evenly; 0 = no pacing.
    pub messages_per_minute: u32,
    /// Longest pause a single `not_before` can impose (guards against absurd
    /// `Retry-After` values).
    pub max_pause: Duration,
    /// Key for envelopes without an identity (the configured mailbox).
    pub default_key: String,
}

impl Limits {
    /// No limits at all (a pass-through).
    pub fn none() -> Limits {
        Limits {
            max_in_flight: 0,
            app_in_flight: 0,
            budget: None,
            messages_per_minute: 0,
            max_pause: Duration::from_secs(3600),
            default_key: String::new(),
        }
    }

    /// Microsoft Graph: `max_in_flight` requests per app and mailbox (0 = 4)
    /// and 10,000 requests per 10 minutes (UPSTREAMS §3.1).
    pub fn graph(max_in_flight: usize, default_key: &str) -> Limits {
        Limits {
            max_in_flight: if max_in_flight == 0 { 4 } else { max_in_flight },
            budget: Some((10_000, Duration::from_secs(600))),
            default_key: default_key.to_string(),
            ..Limits::none()
        }
    }

    /// Exchange Online SMTP AUTH: `connections` per mailbox (0 = 3) and
    /// `per_minute` messages per minute (0 = 30) (UPSTREAMS §3.2).
    pub fn exchange_smtp(connections: usize, per_minute: u32, default_key: &str) -> Limits {
        Limits {
            max_in_flight: if connections == 0 { 3 } else { connections },
            messages_per_minute: if per_minute == 0 { 30 } else { per_minute },
            default_key: default_key.to_string(),
            ..Limits::none()
        }
    }
}

/// Figures for status and benchmarks.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct GovernorStats {
    /// Attempts running right now (all keys).
    pub in_flight: u64,
    /// Attempts started so far.
    pub started: u64,
    /// Attempts that came back with a throttling `not_before` (each paused its key).
    pub throttled: u64,
    /// Keys paused right now.
    pub paused_keys: u64,
}

/// The state of one key.
struct Gate {
    /// In-flight slots; `None` = unlimited.
    slots: Option<Arc<Semaphore>>,
    state: Mutex<GateState>,
}

#[derive(Default)]
struct GateState {
    /// No attempt starts before this.
    paused_until: Option<Instant>,
    /// Start times inside the budget window, oldest first.
    window: VecDeque<Instant>,
    /// The earliest start the pacing allows for the next attempt.
    next_start: Option<Instant>,
}

/// Held while an attempt runs; dropping it frees the slot.
pub struct Permit {
    _slot: Option<OwnedSemaphorePermit>,
    _app: Option<OwnedSemaphorePermit>,
    in_flight: Arc<AtomicU64>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The throttle state of one upstream application, shared by every
/// [`Governed`] transport built on it (keep one across configuration reloads
/// so a pause survives them).
pub struct Governor {
    limits: Limits,
    app: Option<Arc<Semaphore>>,
    gates: Mutex<HashMap<String, Arc<Gate>>>,
    in_flight: Arc<AtomicU64>,
    started: AtomicU64,
    throttled: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Governor {
    /// A governor enforcing `limits`.
    pub fn new(limits: Limits) -> Governor {
        Governor {
            app: (limits.app_in_flight > 0).then(|| Arc::new(Semaphore::new(limits.app_in_flight))),
            limits,
            gates: Mutex::new(HashMap::new()),
            in_flight: Arc::new(AtomicU64::new(0)),
            started: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The key an envelope is governed under: its identity, else the default,
    /// compared without case.
    pub fn key_for(&self, env: &Envelope) -> String {
        env.identity
            .as_deref()
            .filter(|s| !s.is_empty())
            .unwrap_or(&self.limits.default_key)
            .to_ascii_lowercase()
    }

    fn gate(&self, key: &str) -> Arc<Gate> {
        let mut gates = lock(&self.gates);
        gates
            .entry(key.to_string())
            .or_insert_with(|| {
                Arc::new(Gate {
                    slots: (self.limits.max_in_flight > 0)
                        .then(|| Arc::new(Semaphore::new(self.limits.max_in_flight))),
                    state: Mutex::new(GateState::default()),
                })
            })
            .clone()
    }

    /// Wait until an attempt for `key` may start: a free slot, no pause, room
    /// in the budget and the pacing interval passed. Waiters are served in
    /// arrival order.
    pub async fn acquire(&self, key: &str) -> Permit {
        let gate = self.gate(key);
        // Slot of the key first, then the app-wide one: a waiter for a busy
        // key must not sit on an app-wide slot another key could use.
        let slot = match &gate.slots {
            Some(s) => s.clone().acquire_owned().await.ok(),
            None => None,
        };
        let app = match &self.app {
            Some(s) => s.clone().acquire_owned().await.ok(),
            None => None,
        };
        let interval = (self.limits.messages_per_minute > 0)
            .then(|| Duration::from_secs(60) / self.limits.messages_per_minute);
        // Reserve a start time: after any pause, within the budget, on the pacing grid.
        let start = loop {
            let wait = {
                let mut st = lock(&gate.state);
                let now = Instant::now();
                if let Some(p) = st.paused_until.filter(|p| *p > now) {
                    p
                } else if let Some(free) = self.budget_full_until(&mut st, now) {
                    free
                } else {
                    let at = match (interval, st.next_start) {
                        (Some(_), Some(n)) if n > now => n,
                        _ => now,
                    };
                    if let Some(i) = interval {
                        st.next_start = Some(at + i);
                    }
                    if self.limits.budget.is_some() {
                        st.window.push_back(at);
                    }
                    break at;
                }
            };
            tokio::time::sleep_until(wait).await;
        };
        tokio::time::sleep_until(start).await;
        // A throttling answer may have paused the key while we waited.
        loop {
            let paused = lock(&gate.state).paused_until;
            match paused {
                Some(p) if p > Instant::now() => tokio::time::sleep_until(p).await,
                _ => break,
            }
        }
        self.started.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Permit {
            _slot: slot,
            _app: app,
            in_flight: self.in_flight.clone(),
        }
    }

    /// When the budget is used up: the instant its oldest start leaves the window.
    fn budget_full_until(&self, st: &mut GateState, now: Instant) -> Option<Instant> {
        let (max, window) = self.limits.budget?;
        while st.window.front().is_some_and(|t| *t + window <= now) {
            st.window.pop_front();
        }
        if st.window.len() < max as usize {
            return None;
        }
        st.window.front().map(|oldest| (*oldest + window).max(now))
    }

    /// Stop every attempt for `key` from starting for `wait` (capped by
    /// [`Limits::max_pause`]); an existing longer pause is kept.
    pub fn pause(&self, key: &str, wait: Duration) {
        let until = Instant::now() + wait.min(self.limits.max_pause);
        let gate = self.gate(key);
        let mut st = lock(&gate.state);
        if st.paused_until.is_none_or(|p| p < until) {
            st.paused_until = Some(until);
        }
    }

    /// How long `key` is still paused, if it is.
    pub fn paused_for(&self, key: &str) -> Option<Duration> {
        let gate = lock(&self.gates).get(key).cloned()?;
        let p = lock(&gate.state).paused_until?;
        let now = Instant::now();
        (p > now).then(|| p - now)
    }

    /// Record an attempt's outcome: a transient failure of the whole attempt
    /// that names a `not_before` is the upstream throttling: pause the key.
    pub fn observe(&self, key: &str, result: &Delivery) {
        if let Err(f) = result
            && f.severity == Severity::Transient
            && let Some(wait) = f.not_before
        {
            self.throttled.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(key, wait_secs = wait.as_secs_f64(), error = %f, "upstream throttling: pausing this mailbox");
            self.pause(key, wait);
        }
    }

    /// Current figures.
    pub fn stats(&self) -> GovernorStats {
        let now = Instant::now();
        let paused = lock(&self.gates)
            .values()
            .filter(|g| lock(&g.state).paused_until.is_some_and(|p| p > now))
            .count() as u64;
        GovernorStats {
            in_flight: self.in_flight.load(Ordering::Relaxed),
            started: self.started.load(Ordering::Relaxed),
            throttled: self.throttled.load(Ordering::Relaxed),
            paused_keys: paused,
        }
    }
}

/// A transport whose attempts pass through a [`Governor`] first.
pub struct Governed {
    inner: Arc<dyn Transport>,
    governor: Arc<Governor>,
}

impl Governed {
    /// Govern `inner` with its own governor enforcing `limits`.
    pub fn new(inner: Arc<dyn Transport>, limits: Limits) -> Governed {
        Governed::with_governor(inner, Arc::new(Governor::new(limits)))
    }

    /// Govern `inner` with a shared governor (the same app behind several
    /// routes, or a governor kept across reloads).
    pub fn with_governor(inner: Arc<dyn Transport>, governor: Arc<Governor>) -> Governed {
        Governed { inner, governor }
    }

    /// The governor, for status.
    pub fn governor(&self) -> &Arc<Governor> {
        &self.governor
    }
}

impl Transport for Governed {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn deliver<'a>(&'a self, env: &'a Envelope, message: &'a [u8]) -> BoxFuture<'a, Delivery> {
        Box::pin(async move {
            let key = self.governor.key_for(env);
            let permit = self.governor.acquire(&key).await;
            let result = self.inner.deliver(env, message).await;
            self.governor.observe(&key, &result);
            drop(permit);
            result
        })
    }

    fn probe(&self) -> BoxFuture<'_, Result<(), Failure>> {
        Box::pin(async move {
            let key = self.governor.limits.default_key.to_ascii_lowercase();
            // A probe never waits out a pause: the answer would be stale.
            if let Some(left) = self.governor.paused_for(&key) {
                return Err(Failure::transient(format!(
                    "paused by upstream throttling for {} more seconds",
                    left.as_secs()
                ))
                .with_not_before(left));
            }
            let _permit = self.governor.acquire(&key).await;
            self.inner.probe().await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A transport that takes `latency`, counts concurrency, and answers
    /// from a script (default: delivered).
    struct Slow {
        latency: Duration,
        now: AtomicUsize,
        peak: AtomicUsize,
        calls: Mutex<Vec<(Instant, Option<String>)>>,
        script: Mutex<VecDeque<Delivery>>,
    }

    impl Slow {
        fn new(latency_ms: u64) -> Arc<Slow> {
            Arc::new(Slow {
                latency: Duration::from_millis(latency_ms),
                now: AtomicUsize::new(0),
                peak: AtomicUsize::new(0),
                calls: Mutex::new(Vec::new()),
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
        fn deliver<'a>(&'a self, env: &'a Envelope, _: &'a [u8]) -> BoxFuture<'a, Delivery> {
            Box::pin(async move {
                lock(&self.calls).push((Instant::now(), env.identity.clone()));
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

    async fn send_all(
        g: &Arc<Governed>,
        n: usize,
        identity: Option<&'static str>,
    ) -> Vec<Delivery> {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..n {
            let g = g.clone();
            set.spawn(async move { g.deliver(&env(identity), b"m").await });
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
        lock(&inner.script).push_back(Err(Failure::transient("Graph 429 TooManyRequests")
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
        let _ = g.deliver(&env(None), b"m").await;
        let t1 = Instant::now();
        assert!(g.deliver(&env(Some("other@x")), b"m").await.is_ok());
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
}
