//! The one owner of "what is due when": it hands due messages to the router, applies each attempt's outcome to the spool, retries with backoff and jitter, and bounces what fails for good.

pub mod dsn;
pub mod dsn_policy;
pub mod governor;
pub mod sink;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::routing::Router;
use crate::spool::{Meta, RcptStatus, Spool};
use crate::transport::{Delivery, Enhanced, Envelope, Failure, FailureClass, Severity};

/// Retry and rewrite policy (from `[delivery]` and `[upstream]`).
#[derive(Debug, Clone)]
pub struct Policy {
    /// First retry delay.
    pub retry_initial: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// Bounce what is still undelivered after this long.
    pub give_up_after: Duration,
    /// Attempts in flight at once.
    pub concurrency: usize,
    /// Our host name, for DSNs.
    pub hostname: String,
    /// Display name for the rewritten `From` (seed: Sender Name).
    pub sender_name: String,
    /// Address outgoing mail is sent from (seed: Reply to); empty = unchanged.
    pub reply_to: String,
    /// Local user name → upstream mailbox (the Basic-to-OAuth bridge).
    pub identities: std::collections::HashMap<String, String>,
    /// Which senders get a DSN (`delivery.dsn_to`).
    pub dsn: dsn_policy::DsnPolicy,
    /// The mailbox the upstream sends as: the address on a DSN's `From:`,
    /// so that Exchange's send-as rule lets it out. Empty =
    /// `MAILER-DAEMON@<hostname>`.
    pub dsn_from: String,
    /// Display name on a DSN's `From:` (`delivery.dsn_from_name`).
    pub dsn_from_name: String,
}

impl Policy {
    /// The policy a configuration asks for.
    pub fn from_config(c: &crate::config::Config) -> Policy {
        Policy {
            retry_initial: Duration::from_secs(c.delivery.retry_initial_secs),
            retry_max: Duration::from_secs(c.delivery.retry_max_secs),
            give_up_after: Duration::from_secs(c.delivery.give_up_after_secs),
            concurrency: c.delivery.concurrency,
            hostname: c.effective_hostname(),
            sender_name: c.upstream.sender_name.clone(),
            reply_to: c.upstream.reply_to.clone(),
            identities: c
                .users
                .iter()
                .map(|u| (u.name.clone(), u.mailbox.clone()))
                .collect(),
            dsn: dsn_policy::DsnPolicy::from_config(c),
            dsn_from: Some(c.upstream.effective_mailbox())
                .filter(|m| m.contains('@'))
                .unwrap_or_default()
                .to_string(),
            dsn_from_name: c.delivery.dsn_from_name.clone(),
        }
    }

    /// The upstream mailbox a message goes out as: the mapped identity of
    /// its local user, else `None` (the configured default).
    pub fn identity_for(&self, meta: &Meta) -> Option<String> {
        meta.auth_user
            .as_ref()
            .and_then(|u| self.identities.get(u))
            .filter(|m| !m.is_empty())
            .cloned()
    }

    /// The `From:` of a DSN for `meta`: the mailbox its original went out
    /// as, with the configured display name.
    pub fn dsn_from_header(&self, meta: &Meta) -> String {
        let addr = self
            .identity_for(meta)
            .or_else(|| (!self.dsn_from.is_empty()).then(|| self.dsn_from.clone()))
            .unwrap_or_else(|| format!("MAILER-DAEMON@{}", self.hostname));
        let name: String = self
            .dsn_from_name
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        crate::message::format_mailbox(name.trim(), &addr)
    }

    /// The delay before attempt `attempts + 1`: doubling from `retry_initial`,
    /// capped at `retry_max`, then spread by ±25% so retries do not march in step.
    pub fn backoff(&self, attempts: u32) -> Duration {
        let exp = attempts.saturating_sub(1).min(30);
        let base = self
            .retry_initial
            .saturating_mul(1u32 << exp)
            .min(self.retry_max);
        base.mul_f64(rand::random_range(0.75..1.25))
    }
}

/// What happens to a message after an attempt.
#[derive(Debug, PartialEq)]
pub enum Next {
    /// Some recipients are still pending: try again after this long.
    Retry(Duration),
    /// No recipient is pending any more.
    Done,
}

/// Record the outcome of delivering to `tried` in `meta` and decide what
/// comes next. `age` is how long the message has been queued.
///
/// Each recipient keeps the failure's class, reply code and enhanced status
/// code for the DSN. An attempt whose only failures were throttling (the
/// mailbox's budget upstream, not this message) is not counted towards the
/// backoff: it is retried as soon as the upstream's pause ends.
pub fn apply(
    meta: &mut Meta,
    tried: &[String],
    result: &Delivery,
    age: Duration,
    policy: &Policy,
) -> Next {
    let mut wait: Option<Duration> = None;
    let mut last: Option<String> = None;
    let mut failures = 0usize;
    let mut throttled = 0usize;
    let mut record = |meta: &mut Meta, addr: &str, outcome: Result<(), &Failure>| {
        let Some(r) = meta
            .rcpts
            .iter_mut()
            .find(|r| r.addr == addr && r.status == RcptStatus::Pending)
        else {
            return;
        };
        match outcome {
            Ok(()) => {
                r.status = RcptStatus::Delivered;
                r.last_error = None;
                r.class = None;
                r.reply_code = None;
                r.enhanced = None;
            }
            Err(f) => {
                failures += 1;
                r.last_error = Some(f.text.clone());
                r.class = Some(f.class());
                r.reply_code = f.reply_code;
                r.enhanced = f.enhanced;
                last = Some(f.text.clone());
                if f.severity == Severity::Permanent {
                    r.status = RcptStatus::Failed;
                } else {
                    if f.throttled {
                        throttled += 1;
                    }
                    if let Some(nb) = f.not_before {
                        wait = Some(wait.map_or(nb, |w| w.max(nb)));
                    }
                }
            }
        }
    };
    match result {
        Ok(per) => {
            let missing = Failure::transient("upstream gave no answer for this recipient");
            for (i, addr) in tried.iter().enumerate() {
                record(
                    meta,
                    addr,
                    per.get(i).map_or(Err(&missing), |r| r.as_ref().map(|_| ())),
                );
            }
        }
        Err(f) => {
            for addr in tried {
                record(meta, addr, Err(f));
            }
        }
    }
    let only_throttled = failures > 0 && throttled == failures;
    if !only_throttled {
        meta.attempts += 1;
    }
    if last.is_some() {
        meta.last_error = last;
    }
    if meta.pending().is_empty() {
        return Next::Done;
    }
    if age >= policy.give_up_after {
        meta.last_error = Some(format!(
            "gave up after {} attempts over {}h: {}",
            meta.attempts,
            age.as_secs() / 3600,
            meta.last_error.as_deref().unwrap_or("no answer")
        ));
        // Each recipient keeps its last upstream answer (the DSN's
        // Diagnostic-Code) and is reported as 4.4.7, delivery time expired.
        for r in meta
            .rcpts
            .iter_mut()
            .filter(|r| r.status == RcptStatus::Pending)
        {
            r.status = RcptStatus::Failed;
            r.class = Some(FailureClass::Expired);
            r.enhanced = Some(Enhanced::new(4, 4, 7));
            if r.last_error.is_none() {
                r.last_error = Some("no answer from the upstream".into());
            }
        }
        return Next::Done;
    }
    if only_throttled {
        // First in line again as soon as the pause ends; no backoff.
        return Next::Retry(wait.unwrap_or(THROTTLED_RETRY));
    }
    let backoff = policy.backoff(meta.attempts);
    Next::Retry(wait.map_or(backoff, |w| w.max(backoff)))
}

/// Retry delay after throttling that named no wait.
const THROTTLED_RETRY: Duration = Duration::from_secs(10);

/// What one delivery attempt did to a message (observed by `POST /send-test`).
#[derive(Debug, Clone)]
pub struct AttemptEvent {
    /// Queue id.
    pub id: String,
    /// Where the message stands after the attempt.
    pub outcome: AttemptOutcome,
    /// The upstream's answer: the last error text, or `delivered via <server>`.
    pub detail: String,
}

/// Where a message stands after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttemptOutcome {
    /// No recipient pending, none failed.
    Delivered,
    /// Some recipients are still pending (transient failure).
    Deferred,
    /// Some recipients failed for good (or were given up).
    Bounced,
}

/// Queue figures for `status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QueueStats {
    /// Messages in the queue.
    pub depth: usize,
    /// Attempts in flight.
    pub in_flight: usize,
    /// Messages that failed at least one attempt and wait for a retry.
    pub deferred: usize,
    /// DSNs that could not be delivered, kept until an operator retries or
    /// deletes them (state `bounce_undeliverable` in the queue list).
    pub bounce_undeliverable: usize,
    /// Age of the oldest message, in seconds.
    pub oldest_age_secs: u64,
    /// When the oldest message arrived (Unix seconds).
    #[serde(skip)]
    pub oldest_received_at: u64,
    /// The most recent delivery failure.
    pub last_error: Option<String>,
}

enum Cmd {
    Enqueue(Meta),
    RetryNow(String, oneshot::Sender<bool>),
    Delete(String, oneshot::Sender<Result<bool, String>>),
}

struct Shared {
    spool: Arc<Spool>,
    router: RwLock<Arc<Router>>,
    policy: RwLock<Policy>,
    stats: Mutex<QueueStats>,
    tx: mpsc::UnboundedSender<Cmd>,
    events: broadcast::Sender<AttemptEvent>,
}

/// A handle on the running scheduler.
#[derive(Clone)]
pub struct Scheduler {
    shared: Arc<Shared>,
}

struct Item {
    meta: Meta,
    due: Instant,
    born: Instant,
    in_flight: bool,
}

pub(crate) fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Scheduler {
    /// Start the scheduler with the messages loaded from the spool. It runs
    /// until `shutdown` is cancelled, then lets attempts in flight finish
    /// (up to 30 s) and the returned task ends.
    pub fn start(
        spool: Arc<Spool>,
        router: Arc<Router>,
        policy: Policy,
        loaded: Vec<Meta>,
        shutdown: CancellationToken,
    ) -> (Scheduler, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            spool,
            router: RwLock::new(router),
            policy: RwLock::new(policy),
            stats: Mutex::new(QueueStats::default()),
            tx,
            events: broadcast::channel(64).0,
        });
        // A stored next_attempt beyond now + retry_max (the clock moved back,
        // or the file was edited) would hold the message that long: clamp it.
        let latest = now_unix().saturating_add(retry_max_secs(&shared));
        for mut m in loaded {
            if m.next_attempt > latest {
                tracing::warn!(id = %m.id, stored = m.next_attempt, "stored next attempt lies beyond retry_max_secs; retrying sooner");
                m.next_attempt = latest;
            }
            let _ = shared.tx.send(Cmd::Enqueue(m));
        }
        let task = tokio::spawn(run_loop(shared.clone(), rx, shutdown));
        (Scheduler { shared }, task)
    }

    /// Hand a newly stored message to the scheduler.
    pub fn enqueue(&self, meta: Meta) {
        let _ = self.shared.tx.send(Cmd::Enqueue(meta));
    }

    /// Make a queued message due now. False if there is no such message.
    pub async fn retry_now(&self, id: &str) -> bool {
        let (tx, rx) = oneshot::channel();
        let _ = self.shared.tx.send(Cmd::RetryNow(id.to_string(), tx));
        rx.await.unwrap_or(false)
    }

    /// Remove a queued message without delivering it. `Ok(false)` if there is
    /// no such message, `Err` if it is being delivered right now.
    pub async fn delete(&self, id: &str) -> Result<bool, String> {
        let (tx, rx) = oneshot::channel();
        let _ = self.shared.tx.send(Cmd::Delete(id.to_string(), tx));
        rx.await.unwrap_or(Err("scheduler stopped".into()))
    }

    /// The router in use.
    pub fn router(&self) -> Arc<Router> {
        self.shared.router.read().clone()
    }

    /// Replace the router and policy (configuration reload).
    pub fn reconfigure(&self, router: Arc<Router>, policy: Policy) {
        *self.shared.router.write() = router;
        *self.shared.policy.write() = policy;
    }

    /// Queue figures (counts may lag by up to half a second on a large queue).
    pub fn stats(&self) -> QueueStats {
        let mut s = self.shared.stats.lock().clone();
        if s.depth > 0 {
            s.oldest_age_secs = now_unix().saturating_sub(s.oldest_received_at);
        }
        s
    }

    /// Every attempt's outcome from now on (lagging receivers lose the oldest).
    pub fn subscribe(&self) -> broadcast::Receiver<AttemptEvent> {
        self.shared.events.subscribe()
    }

    /// True while the scheduling loop runs (it stops only at shutdown or if it failed).
    pub fn is_running(&self) -> bool {
        !self.shared.tx.is_closed()
    }

    /// The spool this scheduler drains.
    pub fn spool(&self) -> &Arc<Spool> {
        &self.shared.spool
    }

    fn policy(&self) -> Policy {
        self.shared.policy.read().clone()
    }
}

/// `retry_max` in seconds, from the current policy.
fn retry_max_secs(shared: &Shared) -> u64 {
    shared.policy.read().retry_max.as_secs()
}

/// Now plus `wait`, without overflowing (a far-off wait saturates at a year).
fn later(wait: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(wait.min(Duration::from_secs(365 * 86_400)))
        .unwrap_or(now)
}

fn born_instant(received_at: u64) -> Instant {
    let age = Duration::from_secs(now_unix().saturating_sub(received_at));
    Instant::now().checked_sub(age).unwrap_or_else(Instant::now)
}

async fn run_loop(
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<Cmd>,
    shutdown: CancellationToken,
) {
    let mut items: HashMap<String, Item> = HashMap::new();
    let mut due: BTreeSet<(Instant, String)> = BTreeSet::new();
    let mut running: JoinSet<(String, Option<(Meta, Duration)>)> = JoinSet::new();
    // Which message each attempt is for: a panicking attempt loses its
    // output, not its message.
    let mut tasks: HashMap<tokio::task::Id, String> = HashMap::new();
    let sched = Scheduler {
        shared: shared.clone(),
    };
    let mut dirty = true;
    let mut last_publish = Instant::now();
    loop {
        // Dispatch everything due, up to the concurrency limit.
        let limit = sched.policy().concurrency.max(1);
        let now = Instant::now();
        while running.len() < limit {
            let Some((t, id)) = due.first().cloned() else {
                break;
            };
            if t > now {
                break;
            }
            due.remove(&(t, id.clone()));
            let Some(item) = items.get_mut(&id) else {
                continue;
            };
            item.in_flight = true;
            let (meta, born, s) = (item.meta.clone(), item.born, sched.clone());
            let task_id = id.clone();
            let handle = running.spawn(async move {
                let outcome = attempt(&s, meta, born).await;
                (task_id, outcome)
            });
            tasks.insert(handle.id(), id);
        }
        // Publishing walks the whole queue: on a large queue do it at most
        // twice a second, so a backlog does not make every event O(n).
        if dirty && (items.len() <= 2000 || last_publish.elapsed() >= PUBLISH_EVERY) {
            publish_stats(&shared, &items, running.len());
            last_publish = Instant::now();
            dirty = false;
        }
        let next = if running.len() < limit {
            due.first().map(|(t, _)| *t)
        } else {
            None
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            cmd = rx.recv() => match cmd {
                None => break,
                Some(Cmd::Enqueue(meta)) => {
                    // Clamped again: an enqueued meta is never trusted to be sane.
                    let wait = Duration::from_secs(
                        meta.next_attempt
                            .saturating_sub(now_unix())
                            .min(retry_max_secs(&shared)),
                    );
                    let at = later(wait);
                    let born = born_instant(meta.received_at);
                    if let Some(old) = items.get(&meta.id) {
                        due.remove(&(old.due, meta.id.clone()));
                    }
                    if !meta.bounce_undeliverable {
                        due.insert((at, meta.id.clone()));
                    }
                    items.insert(meta.id.clone(), Item { meta, due: at, born, in_flight: false });
                }
                Some(Cmd::RetryNow(id, reply)) => {
                    let found = match items.get_mut(&id) {
                        Some(item) if !item.in_flight => {
                            if item.meta.bounce_undeliverable {
                                // The operator asks for another go: its
                                // recipients are pending again.
                                item.meta.bounce_undeliverable = false;
                                for r in &mut item.meta.rcpts {
                                    if r.status == RcptStatus::Failed {
                                        r.status = RcptStatus::Pending;
                                    }
                                }
                                tracing::info!(id = %id, "undeliverable DSN retried by operator");
                            }
                            due.remove(&(item.due, id.clone()));
                            item.due = Instant::now();
                            due.insert((item.due, id.clone()));
                            true
                        }
                        Some(_) => true,
                        None => false,
                    };
                    let _ = reply.send(found);
                }
                Some(Cmd::Delete(id, reply)) => {
                    let answer = match items.get(&id) {
                        None => Ok(false),
                        Some(item) if item.in_flight => Err("message is being delivered right now; try again".to_string()),
                        Some(item) => {
                            let key = (item.due, id.clone());
                            let spool = shared.spool.clone();
                            let id2 = id.clone();
                            match tokio::task::spawn_blocking(move || spool.remove(&id2)).await {
                                Ok(Ok(())) => {
                                    due.remove(&key);
                                    items.remove(&id);
                                    tracing::info!(id = %id, "deleted by operator");
                                    Ok(true)
                                }
                                Ok(Err(e)) => Err(format!("cannot remove: {e}")),
                                Err(e) => Err(format!("cannot remove: {e}")),
                            }
                        }
                    };
                    let _ = reply.send(answer);
                }
            },
            Some(done) = running.join_next_with_id(), if !running.is_empty() => {
                match done {
                    Ok((task, _)) => {
                        tasks.remove(&task);
                    }
                    Err(ref e) => {
                        let id = tasks.remove(&e.id());
                        rescue(&shared, &mut items, &mut due, id, e);
                    }
                }
                match done.map(|(_, out)| out) {
                    Ok((id, Some((meta, delay)))) => {
                        if let Some(item) = items.get_mut(&id) {
                            item.in_flight = false;
                            item.due = later(delay);
                            // Held for the operator: not due again by itself.
                            if !meta.bounce_undeliverable {
                                due.insert((item.due, id));
                            }
                            item.meta = meta;
                        }
                    }
                    Ok((id, None)) => {
                        items.remove(&id);
                    }
                    Err(_) => {}
                }
            }
            _ = sleep_until_opt(next) => {}
            _ = tokio::time::sleep_until(last_publish + PUBLISH_EVERY), if dirty => {}
        }
        dirty = true;
    }
    // Shutdown: let attempts in flight finish so their outcome is recorded.
    let grace = tokio::time::sleep(Duration::from_secs(30));
    tokio::pin!(grace);
    while !running.is_empty() {
        tokio::select! {
            _ = running.join_next() => {}
            _ = &mut grace => {
                tracing::warn!(in_flight = running.len(), "stopping with deliveries in flight; they stay queued");
                running.abort_all();
                break;
            }
        }
    }
}

/// An attempt that panicked (or was cancelled): its message is no longer in
/// flight. It counts as a failed attempt and is retried after the backoff,
/// so a message that always panics is tried at the retry pace and bounced
/// when its lifetime runs out, never stuck.
fn rescue(
    shared: &Shared,
    items: &mut HashMap<String, Item>,
    due: &mut BTreeSet<(Instant, String)>,
    id: Option<String>,
    e: &tokio::task::JoinError,
) {
    let Some(id) = id else {
        tracing::error!(error = %e, "delivery task failed");
        return;
    };
    let Some(item) = items.get_mut(&id) else {
        return;
    };
    let policy = shared.policy.read().clone();
    item.meta.attempts += 1;
    item.meta.last_error = Some("the delivery attempt failed unexpectedly (internal error)".into());
    let delay = policy.backoff(item.meta.attempts);
    item.meta.next_attempt = now_unix() + delay.as_secs();
    item.in_flight = false;
    item.due = Instant::now() + delay;
    due.insert((item.due, id.clone()));
    tracing::error!(id = %id, error = %e, retry_in_secs = delay.as_secs(), "delivery attempt panicked; rescheduled");
    let (spool, meta) = (shared.spool.clone(), item.meta.clone());
    tokio::task::spawn_blocking(move || {
        if let Err(e) = spool.update(&meta) {
            tracing::error!(id = %meta.id, error = %e, "cannot update metadata");
        }
    });
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Bodies up to this size are read on the runtime thread (page cache).
const INLINE_IO_BYTES: u64 = 256 * 1024;

/// How often queue figures are refreshed at most, on a large queue.
const PUBLISH_EVERY: Duration = Duration::from_millis(500);

fn publish_stats(shared: &Shared, items: &HashMap<String, Item>, in_flight: usize) {
    let mut s = shared.stats.lock();
    s.depth = items.len();
    s.in_flight = in_flight;
    s.deferred = items
        .values()
        .filter(|i| i.meta.attempts > 0 && !i.meta.bounce_undeliverable)
        .count();
    s.bounce_undeliverable = items
        .values()
        .filter(|i| i.meta.bounce_undeliverable)
        .count();
    s.oldest_received_at = items
        .values()
        .map(|i| i.meta.received_at)
        .min()
        .unwrap_or(0);
    s.oldest_age_secs = 0;
    if let Some(e) = items
        .values()
        .filter(|i| i.meta.attempts > 0)
        .max_by_key(|i| i.meta.attempts)
        .and_then(|i| i.meta.last_error.clone())
    {
        s.last_error = Some(e);
    }
}

/// One delivery attempt. Returns the updated metadata and the retry delay,
/// or `None` when the message left the queue.
async fn attempt(s: &Scheduler, mut meta: Meta, born: Instant) -> Option<(Meta, Duration)> {
    let spool = s.shared.spool.clone();
    let policy = s.policy();
    let id = meta.id.clone();
    // A small body was just written and sits in the page cache: reading it
    // in place costs microseconds, less than handing it to a blocking thread.
    let body = if meta.size <= INLINE_IO_BYTES {
        spool.read_body(&id).map_err(|e| e.to_string())
    } else {
        let spool = spool.clone();
        let id = id.clone();
        match tokio::task::spawn_blocking(move || spool.read_body(&id)).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    };
    let body = match body {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(id = %id, error = %e, "cannot read message body; will retry");
            return Some((meta, policy.retry_max));
        }
    };
    let outgoing = crate::message::rewrite_from(&body, &policy.sender_name, &policy.reply_to);
    let from = if policy.reply_to.is_empty() {
        meta.from.clone()
    } else {
        policy.reply_to.clone()
    };
    let identity = policy.identity_for(&meta);
    let env = Envelope {
        id: id.clone(),
        from,
        rcpts: meta.pending(),
        identity,
    };
    let router = s.router();
    let message_id = meta.message_id.clone().unwrap_or_default();
    tracing::info!(id = %id, message_id = %message_id, attempt = meta.attempts + 1, rcpts = env.rcpts.len(), "attempt");
    let routed = router.deliver(&env, &outgoing).await;
    let (result, route, server) = (routed.result, routed.route, routed.server);
    let before: Vec<RcptStatus> = meta.rcpts.iter().map(|r| r.status).collect();
    let next = apply(&mut meta, &env.rcpts, &result, born.elapsed(), &policy);
    for (r, was) in meta.rcpts.iter().zip(before) {
        if was != RcptStatus::Pending {
            continue;
        }
        match r.status {
            RcptStatus::Delivered => {
                tracing::info!(id = %id, message_id = %message_id, to = %r.addr, route, via = %server, "delivered")
            }
            RcptStatus::Failed => {
                tracing::warn!(id = %id, message_id = %message_id, to = %r.addr, error = r.last_error.as_deref().unwrap_or(""), "bounced")
            }
            RcptStatus::Pending => {}
        }
    }
    let outcome = if meta.rcpts.iter().any(|r| r.status == RcptStatus::Failed) {
        AttemptOutcome::Bounced
    } else if meta.pending().is_empty() {
        AttemptOutcome::Delivered
    } else {
        AttemptOutcome::Deferred
    };
    let detail = match outcome {
        AttemptOutcome::Delivered => format!("delivered via {server} ({route} route)"),
        _ => meta.last_error.clone().unwrap_or_default(),
    };
    let _ = s.shared.events.send(AttemptEvent {
        id: id.clone(),
        outcome,
        detail,
    });
    match next {
        Next::Retry(delay) => {
            meta.next_attempt = now_unix() + delay.as_secs();
            tracing::info!(id = %id, message_id = %message_id, retry_in_secs = delay.as_secs(), error = meta.last_error.as_deref().unwrap_or(""), "deferred");
            let m = meta.clone();
            let sp = spool.clone();
            match tokio::task::spawn_blocking(move || sp.update(&m)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(id = %id, error = %e, "cannot update metadata"),
                Err(e) => tracing::error!(id = %id, error = %e, "metadata writer failed"),
            }
            Some((meta, delay))
        }
        Next::Done => {
            match dsn_decision(&meta) {
                Dsn::Send => {
                    if let Err(why) = dsn_policy::dsn_allowed(&policy.dsn, &meta) {
                        tracing::info!(id = %id, to = %crate::text::for_log(&meta.from), reason = why, "no DSN");
                    } else if let Err(e) = queue_dsn(s, &meta, &body, &policy).await {
                        // Keep the message (all final) so the DSN is retried after a restart.
                        tracing::error!(id = %id, error = %e, "cannot queue DSN; keeping message");
                        return Some((meta, policy.retry_max));
                    }
                }
                Dsn::Undeliverable => {
                    // Never bounce a bounce, never drop it either: it stays
                    // queued, visible, until an operator retries or deletes it.
                    meta.bounce_undeliverable = true;
                    tracing::warn!(id = %id, to = %meta.rcpts.first().map(|r| r.addr.as_str()).unwrap_or(""), error = meta.last_error.as_deref().unwrap_or(""), "DSN could not be delivered; kept in the queue as bounce_undeliverable until an operator retries or deletes it");
                    let m = meta.clone();
                    let sp = spool.clone();
                    match tokio::task::spawn_blocking(move || sp.update(&m)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            tracing::error!(id = %id, error = %e, "cannot update metadata")
                        }
                        Err(e) => tracing::error!(id = %id, error = %e, "metadata writer failed"),
                    }
                    return Some((meta, Duration::ZERO));
                }
                Dsn::NoSender => {
                    tracing::warn!(id = %id, "no DSN: the envelope sender is <>");
                }
                Dsn::NotNeeded => {}
            }
            // Two unlinks, no fsync: quick enough to do in place.
            if let Err(e) = spool.remove(&id) {
                tracing::error!(id = %id, error = %e, "cannot remove delivered message");
            }
            None
        }
    }
}

/// What becomes of a message whose recipients are all final.
#[derive(Debug, PartialEq, Eq)]
enum Dsn {
    /// Every recipient was delivered.
    NotNeeded,
    /// Some failed: tell the sender.
    Send,
    /// Some failed, but the sender is `<>`: nobody to tell.
    NoSender,
    /// This is a DSN that failed itself: keep it as `bounce_undeliverable`.
    Undeliverable,
}

/// The one place that decides whether a DSN is created (add sending
/// policies here).
fn dsn_decision(meta: &Meta) -> Dsn {
    if !meta.rcpts.iter().any(|r| r.status == RcptStatus::Failed) {
        Dsn::NotNeeded
    } else if meta.is_dsn {
        Dsn::Undeliverable
    } else if meta.from.is_empty() {
        Dsn::NoSender
    } else {
        Dsn::Send
    }
}

/// Store and schedule the DSN for `meta`. Its id is derived from the
/// original's, so a crash between storing it and removing the original
/// rewrites the same DSN instead of sending two.
async fn queue_dsn(s: &Scheduler, meta: &Meta, body: &[u8], policy: &Policy) -> Result<(), String> {
    let dsn_id = format!("{}-dsn", meta.id);
    let date = chrono::Utc::now().to_rfc2822();
    let from = policy.dsn_from_header(meta);
    let text = dsn::build(meta, body, &policy.hostname, &from, &date, &dsn_id);
    let mut m = Meta::new(
        dsn_id.clone(),
        String::new(),
        vec![meta.from.clone()],
        text.len() as u64,
        now_unix(),
    );
    m.is_dsn = true;
    // Out as the same mailbox as the original (its identity, if mapped).
    m.auth_user = meta.auth_user.clone();
    m.message_id = Some(format!("<{dsn_id}@{}>", policy.hostname));
    let spool = s.shared.spool.clone();
    let m2 = m.clone();
    let stored = tokio::task::spawn_blocking(move || {
        let _ = spool.remove(&m2.id);
        spool.store(&m2, &text)
    })
    .await;
    match stored {
        Ok(Ok(())) => {
            tracing::info!(id = %dsn_id, original = %meta.id, to = %meta.from, "queued DSN");
            s.enqueue(m);
            Ok(())
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            retry_initial: Duration::from_secs(60),
            retry_max: Duration::from_secs(3600),
            give_up_after: Duration::from_secs(5 * 86400),
            concurrency: 2,
            hostname: "relay.test".into(),
            sender_name: String::new(),
            reply_to: String::new(),
            identities: Default::default(),
            dsn: super::dsn_policy::DsnPolicy::any(),
            dsn_from: "desk@relay.test".into(),
            dsn_from_name: "Mail Delivery System".into(),
        }
    }

    fn meta() -> Meta {
        Meta::new(
            "m1".into(),
            "s@x".into(),
            vec!["a@x".into(), "b@x".into()],
            1,
            0,
        )
    }

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let p = policy();
        for (attempts, base) in [(1u32, 60u64), (2, 120), (3, 240), (10, 3600), (40, 3600)] {
            let d = p.backoff(attempts).as_secs_f64();
            assert!(
                d >= base as f64 * 0.75 && d <= base as f64 * 1.25,
                "{attempts}: {d}"
            );
        }
    }

    #[test]
    fn per_recipient_outcomes() {
        let mut m = meta();
        let tried = m.pending();
        let r: Delivery = Ok(vec![Ok(()), Err(Failure::transient("452 4.2.2 full"))]);
        assert!(matches!(
            apply(&mut m, &tried, &r, Duration::ZERO, &policy()),
            Next::Retry(_)
        ));
        assert_eq!(m.pending(), ["b@x"]);
        let r: Delivery = Ok(vec![Err(Failure::permanent("550 5.1.1 unknown"))]);
        assert_eq!(
            apply(&mut m, &["b@x".into()], &r, Duration::ZERO, &policy()),
            Next::Done
        );
        assert_eq!(m.rcpts[1].status, RcptStatus::Failed);
        assert_eq!(m.attempts, 2);
    }

    #[test]
    fn retry_after_is_honoured() {
        let mut m = meta();
        let tried = m.pending();
        let r: Delivery = Err(Failure::server("429").with_not_before(Duration::from_secs(7200)));
        assert_eq!(
            apply(&mut m, &tried, &r, Duration::ZERO, &policy()),
            Next::Retry(Duration::from_secs(7200))
        );
    }

    #[test]
    fn failures_keep_their_class_and_status_codes() {
        let mut m = meta();
        let tried = m.pending();
        let r: Delivery = Ok(vec![
            Err(Failure::permanent("550 5.1.1 unknown")
                .with_reply(550, Some(Enhanced::new(5, 1, 1)))),
            Err(Failure::transient("451 4.3.0 later").with_reply(451, None)),
        ]);
        assert!(matches!(
            apply(&mut m, &tried, &r, Duration::ZERO, &policy()),
            Next::Retry(_)
        ));
        let (a, b) = (&m.rcpts[0], &m.rcpts[1]);
        assert_eq!(
            (a.status, a.class, a.reply_code, a.enhanced),
            (
                RcptStatus::Failed,
                Some(FailureClass::Message),
                Some(550),
                Some(Enhanced::new(5, 1, 1))
            )
        );
        assert_eq!(
            (b.status, b.class, b.reply_code, b.enhanced),
            (
                RcptStatus::Pending,
                Some(FailureClass::Message),
                Some(451),
                None
            )
        );
        // Delivered later: the record is cleared.
        apply(
            &mut m,
            &["b@x".into()],
            &Ok(vec![Ok(())]),
            Duration::ZERO,
            &policy(),
        );
        assert_eq!(
            (m.rcpts[1].status, m.rcpts[1].class, m.rcpts[1].reply_code),
            (RcptStatus::Delivered, None, None)
        );
    }

    #[test]
    fn throttling_does_not_burn_the_backoff() {
        let mut m = meta();
        let tried = m.pending();
        let r: Delivery = Err(Failure::throttled("429", Duration::from_secs(3)));
        for _ in 0..5 {
            assert_eq!(
                apply(&mut m, &tried, &r, Duration::ZERO, &policy()),
                Next::Retry(Duration::from_secs(3)),
                "exactly the pause, no backoff"
            );
        }
        assert_eq!(m.attempts, 0);
        assert_eq!(m.rcpts[0].class, Some(FailureClass::Throttled));
        // A failure of the message itself counts.
        let r: Delivery = Err(Failure::transient("451 4.3.0 later"));
        assert!(
            matches!(apply(&mut m, &tried, &r, Duration::ZERO, &policy()), Next::Retry(d) if d >= Duration::from_secs(45))
        );
        assert_eq!(m.attempts, 1);
    }

    #[test]
    fn gives_up_after_the_configured_age() {
        let mut m = meta();
        let tried = m.pending();
        let r: Delivery = Err(Failure::server("451 4.3.0 connection refused")
            .with_reply(451, Some(Enhanced::new(4, 3, 0))));
        assert_eq!(
            apply(
                &mut m,
                &tried,
                &r,
                Duration::from_secs(5 * 86400),
                &policy()
            ),
            Next::Done
        );
        assert!(m.rcpts.iter().all(|r| r.status == RcptStatus::Failed));
        assert!(
            m.last_error
                .as_deref()
                .unwrap()
                .starts_with("gave up after 1 attempts")
        );
        let r = &m.rcpts[0];
        assert_eq!(
            (r.class, r.enhanced, r.reply_code),
            (
                Some(FailureClass::Expired),
                Some(Enhanced::new(4, 4, 7)),
                Some(451)
            )
        );
        assert_eq!(
            r.last_error.as_deref(),
            Some("451 4.3.0 connection refused"),
            "the last upstream answer is kept"
        );
    }

    #[test]
    fn whole_message_permanent_failure() {
        let mut m = meta();
        let tried = m.pending();
        assert_eq!(
            apply(
                &mut m,
                &tried,
                &Err(Failure::permanent("554 5.2.0 SendAsDenied")),
                Duration::ZERO,
                &policy()
            ),
            Next::Done
        );
        assert!(m.pending().is_empty());
    }
}
