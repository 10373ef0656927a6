//! The one owner of "what is due when": it hands due messages to the router, applies each attempt's outcome to the spool, retries with backoff and jitter, and bounces what fails for good.

mod attempt;
pub mod dsn;
pub mod dsn_policy;
mod policy;
pub mod sink;
pub mod submit;

pub use policy::{Next, Policy, apply};

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

/// What one delivery attempt did to a message (observed by `POST /send-test`).
#[derive(Debug, Clone)]
pub struct AttemptEvent {
    /// Queue id.
    pub id: String,
    /// Where the message stands after the attempt.
    pub outcome: AttemptOutcome,
    /// The upstream's answer: the last error text, or `delivered via <server>`.
    pub detail: String,
    /// The route that carried the attempt (or that it started on): `primary`
    /// or `alternate`.
    pub route: &'static str,
    /// How long the message had been queued when the attempt ended.
    pub age: Duration,
    /// What the upstream answered: `None` when it accepted every recipient
    /// tried, else the first failure (of the attempt, or of a recipient).
    pub failure: Option<crate::transport::Failure>,
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
    RetryAll(oneshot::Sender<usize>),
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
            events: broadcast::channel(1024).0,
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

    /// Make every queued message due now (one being delivered is left to
    /// finish). The number of messages in the queue.
    pub async fn retry_all(&self) -> usize {
        let (tx, rx) = oneshot::channel();
        let _ = self.shared.tx.send(Cmd::RetryAll(tx));
        rx.await.unwrap_or(0)
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
    // Retries after throttling: dispatched when due, before `due`.
    let mut urgent: BTreeSet<(Instant, String)> = BTreeSet::new();
    let mut running: JoinSet<(String, attempt::Outcome)> = JoinSet::new();
    // Which message each attempt is for: a panicking attempt loses its
    // output, not its message.
    let mut tasks: HashMap<tokio::task::Id, String> = HashMap::new();
    let sched = Scheduler {
        shared: shared.clone(),
    };
    let mut dirty = true;
    let mut last_publish = Instant::now();
    loop {
        // Dispatch everything due, up to the concurrency limit; a message
        // held back only by throttling goes when due even past the limit,
        // so that mail which arrived after it cannot take its turn.
        let limit = sched.policy().concurrency.max(1);
        let now = Instant::now();
        loop {
            let (_, id) = match (urgent.first(), due.first()) {
                (Some(u), _) if u.0 <= now => {
                    let u = u.clone();
                    urgent.remove(&u);
                    u
                }
                (_, Some(d)) if d.0 <= now && running.len() < limit => {
                    let d = d.clone();
                    due.remove(&d);
                    d
                }
                _ => break,
            };
            let Some(item) = items.get_mut(&id) else {
                continue;
            };
            item.in_flight = true;
            let (meta, born, s) = (item.meta.clone(), item.born, sched.clone());
            let task_id = id.clone();
            let handle = running.spawn(async move {
                let outcome = attempt::attempt(&s, meta, born).await;
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
        let next_due = if running.len() < limit {
            due.first().map(|(t, _)| *t)
        } else {
            None
        };
        let next = match (urgent.first().map(|(t, _)| *t), next_due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
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
                        urgent.remove(&(old.due, meta.id.clone()));
                    }
                    if !meta.bounce_undeliverable {
                        due.insert((at, meta.id.clone()));
                    }
                    items.insert(meta.id.clone(), Item { meta, due: at, born, in_flight: false });
                }
                Some(Cmd::RetryNow(id, reply)) => {
                    let found = match items.get_mut(&id) {
                        Some(item) => {
                            retry_item(&id, item, &mut due, &mut urgent);
                            true
                        }
                        None => false,
                    };
                    let _ = reply.send(found);
                }
                Some(Cmd::RetryAll(reply)) => {
                    for (id, item) in items.iter_mut() {
                        retry_item(id, item, &mut due, &mut urgent);
                    }
                    tracing::info!(messages = items.len(), "every queued message retried by operator");
                    let _ = reply.send(items.len());
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
                                    urgent.remove(&key);
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
                let (event, done) = match done {
                    Ok((task, (id, (again, event)))) => (event, Ok((task, (id, again)))),
                    Err(e) => (None, Err(e)),
                };
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
                    Ok((id, Some((meta, delay, throttled)))) => {
                        if let Some(item) = items.get_mut(&id) {
                            item.in_flight = false;
                            item.due = later(delay);
                            // Held for the operator: not due again by itself.
                            if !meta.bounce_undeliverable {
                                if throttled {
                                    urgent.insert((item.due, id));
                                } else {
                                    due.insert((item.due, id));
                                }
                            }
                            item.meta = meta;
                        }
                    }
                    Ok((id, None)) => {
                        items.remove(&id);
                    }
                    Err(_) => {}
                }
                // The event goes out once the outcome is applied: whoever
                // watches it (a sample mail on the admin page) sees the
                // queue as the attempt left it.
                if let Some(event) = event {
                    if items.len() <= 2000 {
                        publish_stats(&shared, &items, running.len());
                        last_publish = Instant::now();
                    }
                    let _ = shared.events.send(event);
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

/// Make `item` due now (the operator asked); one in flight is left alone.
fn retry_item(
    id: &str,
    item: &mut Item,
    due: &mut BTreeSet<(Instant, String)>,
    urgent: &mut BTreeSet<(Instant, String)>,
) {
    if item.in_flight {
        return;
    }
    if item.meta.bounce_undeliverable {
        // The operator asks for another go: its recipients are pending again.
        item.meta.bounce_undeliverable = false;
        for r in &mut item.meta.rcpts {
            if r.status == RcptStatus::Failed {
                r.status = RcptStatus::Pending;
            }
        }
        tracing::info!(id = %id, "undeliverable DSN retried by operator");
    }
    due.remove(&(item.due, id.to_string()));
    urgent.remove(&(item.due, id.to_string()));
    item.due = Instant::now();
    due.insert((item.due, id.to_string()));
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
