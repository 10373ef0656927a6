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
//! 3. **Budgets**: sliding windows, each checked before an attempt starts so
//!    that it is never exceeded (the attempt waits until the window has
//!    room, it does not provoke a 429 first): requests (Graph: 10,000 per 10
//!    minutes per app and mailbox), request bytes (Graph: 150 MB uploaded
//!    per 5 minutes; the transport says what an attempt will upload,
//!    [`Transport::request_bytes`], upload-session chunks included) and
//!    recipients (Exchange Online: 10,000 per day, rolling).
//! 4. **Pacing**: an optional messages-per-minute rate, spread evenly (one
//!    start every `60 s / rate`; Exchange Online: 30 per minute), so a surge
//!    is smoothed instead of being carried over by Exchange.
//! 5. **Held, not requeued**: an attempt the upstream throttles
//!    ([`Failure::throttled`]: 429, `432 4.3.2`, EWS server busy) keeps its
//!    slot and is tried again as soon as the pause ends, up to
//!    [`Limits::hold_retries`] times, so the mail that was first stays first
//!    and newer mail waits behind it.
//!
//! An attempt counts as one request. Graph's large-message path (draft,
//! attachment uploads, send) makes several requests in one attempt, one at a
//! time, so it never exceeds its slot; its bytes are counted in full, its
//! request count undercounted by a few per message over 4 MB.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use std::time::Duration;

use crate::common::BoxFuture;
use crate::transport::{Delivery, Envelope, Failure, Severity, Transport};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

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
    /// At most `.0` request bytes are sent in any window of `.1` (Graph:
    /// 150 MB per 5 minutes), as [`Transport::request_bytes`] reckons them.
    pub bytes_budget: Option<(u64, Duration)>,
    /// At most `.0` recipients in any window of `.1` (Exchange Online:
    /// 10,000 per day, rolling).
    pub recipients_budget: Option<(u64, Duration)>,
    /// How often an attempt throttled by the upstream is retried in place
    /// (holding its slot) once the pause ends, before the failure goes back
    /// to the scheduler.
    pub hold_retries: u32,
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
            bytes_budget: None,
            recipients_budget: None,
            hold_retries: 0,
            messages_per_minute: 0,
            max_pause: Duration::from_secs(3600),
            default_key: String::new(),
        }
    }

    /// Microsoft Graph: `max_in_flight` requests per app and mailbox (0 = 4),
    /// 10,000 requests per 10 minutes and 150 MB of request bodies per 5
    /// minutes (UPSTREAMS §3.1), and Exchange Online's 10,000 recipients per
    /// day, which still apply after Graph's 202 (§3.2).
    pub fn graph(max_in_flight: usize, default_key: &str) -> Limits {
        Limits {
            max_in_flight: if max_in_flight == 0 { 4 } else { max_in_flight },
            budget: Some((10_000, Duration::from_secs(600))),
            bytes_budget: Some((GRAPH_UPLOAD_BYTES, Duration::from_secs(300))),
            recipients_budget: Some(EXCHANGE_RECIPIENTS_PER_DAY),
            hold_retries: HOLD_RETRIES,
            default_key: default_key.to_string(),
            ..Limits::none()
        }
    }

    /// Exchange Online SMTP AUTH: `connections` per mailbox (0 = 3),
    /// `per_minute` messages per minute (0 = 30) and 10,000 recipients per
    /// day (UPSTREAMS §3.2).
    pub fn exchange_smtp(connections: usize, per_minute: u32, default_key: &str) -> Limits {
        Limits {
            max_in_flight: if connections == 0 { 3 } else { connections },
            messages_per_minute: if per_minute == 0 { 30 } else { per_minute },
            recipients_budget: Some(EXCHANGE_RECIPIENTS_PER_DAY),
            hold_retries: HOLD_RETRIES,
            default_key: default_key.to_string(),
            ..Limits::none()
        }
    }

    /// EWS: `max_in_flight` requests per mailbox (EWSMaxConcurrency, 27) and
    /// `per_minute` messages; Exchange Online adds 30 messages per minute
    /// (when `per_minute` is 0) and 10,000 recipients per day (UPSTREAMS
    /// §3.2, §4.3).
    pub fn ews(
        max_in_flight: usize,
        per_minute: u32,
        exchange_online: bool,
        default_key: &str,
    ) -> Limits {
        Limits {
            max_in_flight,
            messages_per_minute: if per_minute == 0 && exchange_online {
                30
            } else {
                per_minute
            },
            recipients_budget: exchange_online.then_some(EXCHANGE_RECIPIENTS_PER_DAY),
            hold_retries: HOLD_RETRIES,
            default_key: default_key.to_string(),
            ..Limits::none()
        }
    }
}

/// Graph's upload budget per app and mailbox: "150 MB" per 5 minutes, read
/// as decimal megabytes (the smaller reading).
pub const GRAPH_UPLOAD_BYTES: u64 = 150_000_000;
/// Exchange Online's recipient rate limit: 10,000 per rolling 24 hours.
pub const EXCHANGE_RECIPIENTS_PER_DAY: (u64, Duration) = (10_000, Duration::from_secs(86_400));
/// Default for [`Limits::hold_retries`] on Microsoft upstreams.
pub const HOLD_RETRIES: u32 = 3;

/// What one attempt takes from the budgets.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cost {
    /// Request bytes ([`Transport::request_bytes`]).
    pub bytes: u64,
    /// Recipients.
    pub recipients: u64,
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
    /// Starts inside the request budget's window.
    requests: Window,
    /// Request bytes inside the byte budget's window.
    bytes: Window,
    /// Recipients inside the recipient budget's window.
    recipients: Window,
    /// The earliest start the pacing allows for the next attempt.
    next_start: Option<Instant>,
}

/// A sliding window of amounts spent, oldest first.
#[derive(Default)]
struct Window {
    spent: VecDeque<(Instant, u64)>,
    sum: u64,
}

impl Window {
    /// When `need` more fits under `max` per `span`: `None` if it fits now,
    /// else the instant enough of the oldest spending leaves the window. An
    /// amount larger than `max` on its own waits for an empty window.
    fn full_until(&mut self, max: u64, span: Duration, need: u64, now: Instant) -> Option<Instant> {
        while let Some(&(t, n)) = self.spent.front() {
            if t + span > now {
                break;
            }
            self.spent.pop_front();
            self.sum -= n;
        }
        if self.spent.is_empty() || self.sum.saturating_add(need) <= max {
            return None;
        }
        let mut left = self.sum;
        for &(t, n) in &self.spent {
            left -= n;
            if left.saturating_add(need) <= max || left == 0 {
                return Some((t + span).max(now));
            }
        }
        None
    }

    fn spend(&mut self, at: Instant, n: u64) {
        self.spent.push_back((at, n));
        self.sum += n;
    }
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
        let mut gates = self.gates.lock();
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
    /// in every budget and the pacing interval passed. Waiters are served in
    /// arrival order. An attempt that costs nothing but a request.
    pub async fn acquire(&self, key: &str) -> Permit {
        self.acquire_for(key, Cost::default()).await
    }

    /// [`Governor::acquire`] for an attempt of `cost`.
    pub async fn acquire_for(&self, key: &str, cost: Cost) -> Permit {
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
        self.start(&gate, cost).await;
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Permit {
            _slot: slot,
            _app: app,
            in_flight: self.in_flight.clone(),
        }
    }

    /// With a slot held: wait for the pause to end, reserve a start time
    /// within every budget and on the pacing grid, and wait for it.
    async fn start(&self, gate: &Gate, cost: Cost) {
        let interval = (self.limits.messages_per_minute > 0)
            .then(|| Duration::from_secs(60) / self.limits.messages_per_minute);
        let start = loop {
            let wait = {
                let mut st = gate.state.lock();
                let now = Instant::now();
                if let Some(p) = st.paused_until.filter(|p| *p > now) {
                    p
                } else if let Some(free) = self.budgets_full_until(&mut st, cost, now) {
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
                        st.requests.spend(at, 1);
                    }
                    if self.limits.bytes_budget.is_some() {
                        st.bytes.spend(at, cost.bytes);
                    }
                    if self.limits.recipients_budget.is_some() {
                        st.recipients.spend(at, cost.recipients);
                    }
                    break at;
                }
            };
            tokio::time::sleep_until(wait).await;
        };
        tokio::time::sleep_until(start).await;
        // A throttling answer may have paused the key while we waited.
        loop {
            let paused = gate.state.lock().paused_until;
            match paused {
                Some(p) if p > Instant::now() => tokio::time::sleep_until(p).await,
                _ => break,
            }
        }
        self.started.fetch_add(1, Ordering::Relaxed);
    }

    /// When some budget has no room for `cost`: the latest instant any of
    /// them has room again (checked again then).
    fn budgets_full_until(&self, st: &mut GateState, cost: Cost, now: Instant) -> Option<Instant> {
        let mut until: Option<Instant> = None;
        let mut wait = |t: Option<Instant>| {
            if let Some(t) = t {
                until = Some(until.map_or(t, |u| u.max(t)));
            }
        };
        if let Some((max, span)) = self.limits.budget {
            wait(st.requests.full_until(u64::from(max), span, 1, now));
        }
        if let Some((max, span)) = self.limits.bytes_budget {
            wait(st.bytes.full_until(max, span, cost.bytes, now));
        }
        if let Some((max, span)) = self.limits.recipients_budget {
            wait(st.recipients.full_until(max, span, cost.recipients, now));
        }
        until
    }

    /// Stop every attempt for `key` from starting for `wait` (capped by
    /// [`Limits::max_pause`]); an existing longer pause is kept.
    pub fn pause(&self, key: &str, wait: Duration) {
        let until = Instant::now() + wait.min(self.limits.max_pause);
        let gate = self.gate(key);
        let mut st = gate.state.lock();
        if st.paused_until.is_none_or(|p| p < until) {
            st.paused_until = Some(until);
        }
    }

    /// How long `key` is still paused, if it is.
    pub fn paused_for(&self, key: &str) -> Option<Duration> {
        let gate = self.gates.lock().get(key).cloned()?;
        let p = gate.state.lock().paused_until?;
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
        let paused = self
            .gates
            .lock()
            .values()
            .filter(|g| g.state.lock().paused_until.is_some_and(|p| p > now))
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

    fn deliver<'a>(
        &'a self,
        env: &'a Envelope,
        message: &'a crate::transport::Body,
    ) -> BoxFuture<'a, Delivery> {
        Box::pin(async move {
            let g = &self.governor;
            let key = g.key_for(env);
            let cost = Cost {
                bytes: self.inner.request_bytes(message),
                recipients: env.rcpts.len() as u64,
            };
            let permit = g.acquire_for(&key, cost).await;
            let mut result = self.inner.deliver(env, message).await;
            g.observe(&key, &result);
            // Throttled: keep the slot and go again when the pause ends, so
            // this message is not overtaken by mail that arrived later.
            let mut held = 0;
            while held < g.limits.hold_retries && matches!(&result, Err(f) if f.throttled) {
                held += 1;
                tracing::info!(id = %env.id, key = %key, retry = held, "throttled: holding the message until the pause ends");
                g.start(&g.gate(&key), cost).await;
                result = self.inner.deliver(env, message).await;
                g.observe(&key, &result);
            }
            drop(permit);
            result
        })
    }

    fn request_bytes(&self, message: &crate::transport::Body) -> u64 {
        self.inner.request_bytes(message)
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
            self.calls.lock().iter().map(|c| c.0).collect()
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
                self.calls
                    .lock()
                    .push((Instant::now(), env.identity.clone()));
                self.ids.lock().push(env.id.clone());
                let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
                self.peak.fetch_max(n, Ordering::SeqCst);
                tokio::time::sleep(self.latency).await;
                self.now.fetch_sub(1, Ordering::SeqCst);
                self.script
                    .lock()
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
        inner
            .script
            .lock()
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
        inner.script.lock().push_back(Err(
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
        inner.script.lock().push_back(Err(
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
        inner.script.lock().push_back(Err(Failure::throttled(
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
        let ids = inner.ids.lock().clone();
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
            inner
                .script
                .lock()
                .push_back(Err(Failure::throttled("429", Duration::from_secs(5))));
        }
        let g = Arc::new(Governed::new(inner.clone(), Limits::graph(4, "k")));
        let r = g
            .deliver(&env_n("m", 1), &crate::transport::Body::from(b"m"))
            .await;
        assert!(matches!(&r, Err(f) if f.throttled), "{r:?}");
        assert_eq!(inner.starts().len(), 1 + HOLD_RETRIES as usize);
        // Not throttling (a plain transient failure with a wait): not held.
        let inner = Slow::new(10);
        inner.script.lock().push_back(Err(
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
}
