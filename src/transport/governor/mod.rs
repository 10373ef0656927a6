//! The throttle governor: per app and mailbox, it keeps requests within what the upstream accepts (in-flight slots, a pause after a 429, a sliding request budget, message pacing), so surges queue here instead of provoking throttling upstream.
//!
//! It sits between the router and a transport as [`Governed`], itself a
//! [`Transport`]. One [`Governor`] belongs to one upstream application (one
//! OAuth client, one SMTP account); inside it every *key* (the mailbox sent
//! as: [`Envelope::identity`], else [`Limits::default_key`]) has its own
//! gate:
//!
//! 1. **Slots**: at most [`Limits::max_in_flight`] attempts at once (Graph
//!    allows 4 concurrent requests per app and mailbox, Exchange Online SMTP
//!    3 connections per mailbox). An optional [`Limits::app_in_flight`] caps
//!    all keys together.
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
//! 5. **Arrival order**: attempts start in the order they reached the key
//!    (a ticket each); only the first in line may start, and it takes the
//!    slot only when it starts, so when a pause ends the oldest waiting mail
//!    goes first, not whichever waiter wakes first.
//! 6. **Held, not requeued**: an attempt the upstream throttles
//!    ([`Failure::throttled`]: 429, `432 4.3.2`, EWS server busy) keeps its
//!    place (its ticket) and is tried again as soon as the pause ends, up to
//!    [`Limits::hold_retries`] times, so the mail that was first stays first
//!    and newer mail waits behind it: nothing else starts until the held
//!    attempts are answered (they are first on the wire too, and their
//!    answer shows whether the pause was enough). When its holds run out it goes back to
//!    the scheduler, and the key keeps its place until the pause has ended
//!    and [`RETURN_GRACE`] more has passed: newer mail waits that long for it
//!    to come back.
//!
//! With `[throttle] backend = "redis"` ([`shared`]) the slots, budgets,
//! pacing and pauses are also kept in Redis, shared by every instance
//! sending as the same mailboxes; the local line still orders this
//! instance's mail.
//!
//! Limits can change while the governor runs ([`Governor::set_limits`], a
//! configuration reload): pauses, budget windows and attempts in flight are
//! kept; see [`Governors`] for how routes find the governor of their
//! upstream application again.
//!
//! An attempt counts as one request. Graph's large-message path (draft,
//! attachment uploads, send) makes several requests in one attempt, one at a
//! time, so it never exceeds its slot; its bytes are counted in full, its
//! request count undercounted by a few per message over 4 MB.

mod gate;
mod registry;
pub mod shared;
#[cfg(test)]
mod tests;

pub use registry::Governors;
pub use shared::{Shared, SharedState};

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::{Body, Delivery, Envelope, Failure, Severity, Transport};
use crate::common::BoxFuture;
use gate::{Gate, lock};
use shared::REDIS_RETRY;

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

impl Limits {
    /// This instance's share when `n` instances send as the same mailboxes
    /// and cannot coordinate: every limit divided by `n`, each limit that
    /// is on kept at 1 or more.
    pub fn divided(&self, n: u32) -> Limits {
        let n = n.max(1);
        let share = |v: u64| if v == 0 { 0 } else { (v / u64::from(n)).max(1) };
        let count = |v: usize| share(v as u64) as usize;
        Limits {
            max_in_flight: count(self.max_in_flight),
            app_in_flight: count(self.app_in_flight),
            budget: self.budget.map(|(m, s)| (share(u64::from(m)) as u32, s)),
            bytes_budget: self.bytes_budget.map(|(m, s)| (share(m), s)),
            recipients_budget: self.recipients_budget.map(|(m, s)| (share(m), s)),
            messages_per_minute: share(u64::from(self.messages_per_minute)) as u32,
            ..self.clone()
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
    /// Where the budget is kept: `local`, `redis`, or `fallback` (Redis
    /// unreachable: the local limits divided by `expected_instances`).
    pub backend: &'static str,
}

/// How long after a pause ends a key keeps the place of a message whose
/// holds ran out (it went back to the scheduler, which hands it over again
/// when the pause ends).
pub const RETURN_GRACE: Duration = Duration::from_secs(1);

/// Held while an attempt runs; dropping it frees the slot (and its lease
/// in Redis).
pub struct Permit {
    gate: Arc<Gate>,
    held: bool,
    _app: Option<OwnedSemaphorePermit>,
    _lease: Option<shared::Lease>,
    in_flight: Arc<AtomicU64>,
}

impl Permit {
    /// Give a shared slot back in Redis before the local one, so the next
    /// attempt in line finds it free there too.
    async fn release(&mut self) {
        if let Some(lease) = self._lease.take() {
            lease.release().await;
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.gate.finish(self.held);
    }
}

/// The throttle state of one upstream application, shared by every
/// [`Governed`] transport built on it (kept across configuration reloads by
/// [`Governors`], so a pause survives them).
pub struct Governor {
    limits: Mutex<Arc<Limits>>,
    app: Mutex<Option<Arc<Semaphore>>>,
    gates: Mutex<HashMap<String, Arc<Gate>>>,
    tickets: AtomicU64,
    in_flight: Arc<AtomicU64>,
    started: AtomicU64,
    throttled: AtomicU64,
    /// The budget shared with other instances, and this application's
    /// prefix for its keys.
    shared: Option<(Arc<Shared>, String)>,
    /// When Redis was last asked while unreachable (milliseconds since
    /// `created`), so a dead Redis is tried about once a second.
    last_try: AtomicU64,
    created: Instant,
}

impl Governor {
    /// A governor enforcing `limits` in this process.
    pub fn new(limits: Limits) -> Governor {
        Governor::with_shared(limits, None)
    }

    /// A governor enforcing `limits` together with the other instances
    /// sharing `shared` under application name `app`.
    pub fn shared(limits: Limits, shared: Arc<Shared>, app: &str) -> Governor {
        Governor::with_shared(limits, Some((shared, format!("mailbridge:{app}:"))))
    }

    fn with_shared(limits: Limits, shared: Option<(Arc<Shared>, String)>) -> Governor {
        Governor {
            shared,
            last_try: AtomicU64::new(0),
            created: Instant::now(),
            app: Mutex::new(app_semaphore(&limits)),
            limits: Mutex::new(Arc::new(limits)),
            gates: Mutex::new(HashMap::new()),
            tickets: AtomicU64::new(0),
            in_flight: Arc::new(AtomicU64::new(0)),
            started: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> Arc<Limits> {
        lock(&self.limits).clone()
    }

    /// The limits this process keeps itself: all of them, or its share
    /// while the shared budget is unreachable.
    pub fn local_limits(&self) -> Arc<Limits> {
        let l = self.limits();
        match &self.shared {
            Some((s, _)) => s.local_limits(&l),
            None => l,
        }
    }

    /// The limits and in-flight cap this process keeps itself for `key`.
    fn local_rules(&self, key: &str) -> (Arc<Limits>, shared::Cap) {
        let l = self.limits();
        match &self.shared {
            Some((s, app)) => s.local_rules(&format!("{app}{key}:"), &l),
            None => (l, None),
        }
    }

    /// Where the budget stands, when it is shared.
    pub fn shared_state(&self) -> Option<SharedState> {
        self.shared.as_ref().map(|(s, _)| s.state())
    }

    /// Whether to ask Redis for this start: while it answers, always; while
    /// it does not, about once a second (to notice it is back).
    fn ask_redis(&self, s: &Shared) -> bool {
        if s.is_up() {
            return true;
        }
        let now = u64::try_from(self.created.elapsed().as_millis()).unwrap_or(u64::MAX);
        let last = self.last_try.load(Ordering::Relaxed);
        now.saturating_sub(last) >= REDIS_RETRY.as_millis() as u64
            && self
                .last_try
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Apply new limits (a reload): pauses, budget windows and attempts in
    /// flight are kept; waiting attempts are judged by the new limits from
    /// now on. A changed `app_in_flight` starts a new app-wide count
    /// (attempts in flight under the old one finish under it).
    pub fn set_limits(&self, limits: Limits) {
        let app_changed = self.limits().app_in_flight != limits.app_in_flight;
        if app_changed {
            *lock(&self.app) = app_semaphore(&limits);
        }
        *lock(&self.limits) = Arc::new(limits);
        for g in lock(&self.gates).values() {
            g.wake.notify_waiters();
        }
    }

    /// The key an envelope is governed under: its identity, else the default,
    /// compared without case.
    pub fn key_for(&self, env: &Envelope) -> String {
        let limits = self.limits();
        env.identity
            .as_deref()
            .filter(|s| !s.is_empty())
            .unwrap_or(&limits.default_key)
            .to_ascii_lowercase()
    }

    fn gate(&self, key: &str) -> Arc<Gate> {
        lock(&self.gates)
            .entry(key.to_string())
            .or_default()
            .clone()
    }

    /// Wait until an attempt for `key` may start: first in line, no pause,
    /// a free slot, room in every budget and the pacing interval passed.
    /// Waiters start in arrival order. An attempt that costs nothing but a
    /// request.
    pub async fn acquire(&self, key: &str) -> Permit {
        self.acquire_for(key, Cost::default()).await
    }

    /// [`Governor::acquire`] for an attempt of `cost`.
    pub async fn acquire_for(&self, key: &str, cost: Cost) -> Permit {
        let gate = self.gate(key);
        let ticket = self.tickets.fetch_add(1, Ordering::Relaxed);
        self.enter(key, &gate, ticket, false, cost).await
    }

    /// Wait in line with `ticket` and start.
    async fn enter(
        &self,
        key: &str,
        gate: &Arc<Gate>,
        ticket: u64,
        held: bool,
        cost: Cost,
    ) -> Permit {
        let queued = gate.queue(ticket, held);
        self.start(key, gate, queued, cost).await
    }

    async fn start(
        &self,
        key: &str,
        gate: &Arc<Gate>,
        mut queued: gate::Queued,
        cost: Cost,
    ) -> Permit {
        let mut permit = loop {
            let (ticket, held) = (queued.ticket(), queued.held());
            queued.start(|| self.local_rules(key), cost).await;
            // From here the key's slot is taken: the permit gives it back.
            let mut permit = Permit {
                gate: gate.clone(),
                held,
                _app: None,
                _lease: None,
                in_flight: self.in_flight.clone(),
            };
            self.in_flight.fetch_add(1, Ordering::Relaxed);
            // First in line here: now the budget shared with the other instances.
            if let Some((s, app)) = &self.shared
                && self.ask_redis(s)
            {
                let limits = self.limits();
                permit._lease = s.acquire(&format!("{app}{key}:"), &limits, cost).await;
                if permit._lease.is_none() && !s.is_up() {
                    // Redis went away while we waited for it: in line again,
                    // under this instance's share of the limits.
                    queued = gate.queue(ticket, held);
                    drop(permit);
                    continue;
                }
            }
            break permit;
        };
        // Then the app-wide slot, if the app is capped across its mailboxes.
        let app = lock(&self.app).clone();
        if let Some(s) = app {
            permit._app = s.acquire_owned().await.ok();
        }
        self.started.fetch_add(1, Ordering::Relaxed);
        permit
    }

    /// Stop every attempt for `key` from starting for `wait` (capped by
    /// [`Limits::max_pause`]); an existing longer pause is kept.
    pub fn pause(&self, key: &str, wait: Duration) {
        let until = Instant::now() + wait.min(self.limits().max_pause);
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

    /// [`Governor::observe`], and a pause passed on to the other instances.
    async fn observe_shared(&self, key: &str, result: &Delivery) {
        self.observe(key, result);
        if let (Some((s, app)), Err(f)) = (&self.shared, result)
            && f.severity == Severity::Transient
            && let Some(wait) = f.not_before
            && s.is_up()
        {
            let max = self.limits().max_pause;
            s.pause(&format!("{app}{key}:"), wait.min(max)).await;
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
            backend: match &self.shared {
                None => "local",
                Some((s, _)) => s.state().mode,
            },
        }
    }

    /// Deliver `env` through `inner` under this governor: wait for the
    /// start, hold the attempt in place while the upstream throttles it.
    async fn deliver(&self, inner: &dyn Transport, env: &Envelope, message: &Body) -> Delivery {
        let key = self.key_for(env);
        let gate = self.gate(&key);
        let cost = Cost {
            bytes: inner.request_bytes(message),
            recipients: env.rcpts.len() as u64,
        };
        // A message whose holds ran out comes back with its old place.
        let returned = lock(&gate.state).take_returned(&env.id);
        let ticket = returned.unwrap_or_else(|| self.tickets.fetch_add(1, Ordering::Relaxed));
        let mut permit = self
            .enter(&key, &gate, ticket, returned.is_some(), cost)
            .await;
        let mut result = inner.deliver(env, message).await;
        self.observe_shared(&key, &result).await;
        // Throttled: stay first in line and go again when the pause ends, so
        // this message is not overtaken by mail that arrived later.
        let mut held = 0;
        while matches!(&result, Err(f) if f.throttled) {
            if held >= self.limits().hold_retries {
                // Back to the scheduler; newer mail waits for it a moment
                // after the pause (the scheduler retries it when it ends).
                let until = self.paused_for(&key).unwrap_or_default() + RETURN_GRACE;
                lock(&gate.state).keep_place(&env.id, ticket, Instant::now() + until);
                break;
            }
            held += 1;
            tracing::info!(id = %env.id, key = %key, retry = held, "throttled: holding the message until the pause ends");
            // In line again before the slot is given back: nobody slips in.
            let queued = gate.queue(ticket, true);
            permit.release().await;
            drop(permit);
            permit = self.start(&key, &gate, queued, cost).await;
            result = inner.deliver(env, message).await;
            self.observe_shared(&key, &result).await;
        }
        permit.release().await;
        drop(permit);
        result
    }
}

fn app_semaphore(limits: &Limits) -> Option<Arc<Semaphore>> {
    (limits.app_in_flight > 0).then(|| Arc::new(Semaphore::new(limits.app_in_flight)))
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

    fn deliver<'a>(&'a self, env: &'a Envelope, message: &'a Body) -> BoxFuture<'a, Delivery> {
        Box::pin(self.governor.deliver(self.inner.as_ref(), env, message))
    }

    fn request_bytes(&self, message: &Body) -> u64 {
        self.inner.request_bytes(message)
    }

    fn probe(&self) -> BoxFuture<'_, Result<(), Failure>> {
        Box::pin(async move {
            let key = self.governor.limits().default_key.to_ascii_lowercase();
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
