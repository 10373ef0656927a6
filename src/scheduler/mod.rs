//! The one owner of "what is due when": it reads the queue found at start in the background, hands due messages to the router, applies each attempt's outcome to the spool, retries with backoff and jitter, and bounces what fails for good.

mod attempt;
pub mod dsn;
pub mod dsn_policy;
mod policy;
pub mod sink;
pub mod submit;

pub use policy::{Next, Policy, apply};

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use parking_lot::{Mutex, RwLock};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{Semaphore, broadcast, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::routing::Router;
use crate::spool::{Backlog, Meta, Spool};

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
    /// Messages in the queue (while loading: every committed entry, loaded or not).
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
    /// The entries found at start are still being read (mail is accepted
    /// and delivered meanwhile; the figures above cover what was read).
    pub loading: bool,
    /// Entries found at start not read yet.
    pub to_load: usize,
}

/// The scheduling facts of one message: what [`Scheduler::enqueue`] and the
/// start-up load hand to the scheduling loop (the rest stays on disk).
struct Entry {
    id: Id,
    received_at: u64,
    next_attempt: u64,
    attempts: u32,
    held: bool,
    /// Stored by this process just now: its metadata as stored, so the first
    /// attempt need not read it back.
    fresh: Option<Box<Meta>>,
}

impl Entry {
    fn of(meta: &Meta, fresh: Option<Box<Meta>>) -> Entry {
        Entry {
            id: meta.id.as_str().into(),
            received_at: meta.received_at,
            next_attempt: meta.next_attempt,
            attempts: meta.attempts,
            held: meta.bounce_undeliverable,
            fresh,
        }
    }
}

enum Cmd {
    Enqueue(Entry),
    /// A batch of the start-up load, and the last error among it (for `status`).
    Loaded(Vec<Entry>, Option<String>),
    /// The start-up load is over.
    LoadDone,
    RetryNow(String, oneshot::Sender<bool>),
    RetryAll(oneshot::Sender<usize>),
    Delete(String, oneshot::Sender<Result<bool, String>>),
}

struct Shared {
    spool: Arc<Spool>,
    router: RwLock<Arc<Router>>,
    policy: RwLock<Policy>,
    stats: Mutex<QueueStats>,
    /// The start-up load runs.
    loading: AtomicBool,
    /// Entries the start-up load has still to read.
    to_load: AtomicUsize,
    tx: mpsc::UnboundedSender<Cmd>,
    events: broadcast::Sender<AttemptEvent>,
}

/// A handle on the running scheduler.
#[derive(Clone)]
pub struct Scheduler {
    shared: Arc<Shared>,
}

/// A queue id, shared by the index and the timers.
type Id = Arc<str>;

/// What the scheduler keeps of one queued message between attempts (about
/// 200 bytes with its share of the index and timers; see bench/README.md):
/// the metadata stays on disk and is read when an attempt starts.
struct Item {
    due: Instant,
    born: Instant,
    received_at: u64,
    attempts: u32,
    in_flight: bool,
    /// An undeliverable DSN held for the operator (`bounce_undeliverable`).
    held: bool,
    /// The operator retried it while held: its failed recipients are
    /// pending again at the next attempt.
    revive: bool,
    /// Stored by this process and not attempted yet: its metadata as stored
    /// (held until the first attempt only; the rest stays on disk).
    fresh: Option<Box<Meta>>,
}

/// Entries read per batch of the start-up load.
const LOAD_BATCH: usize = 512;

/// Batches of the start-up load read at once (on blocking threads: a cold
/// disk answers several reads at a time faster than one after the other).
const LOAD_PARALLEL: usize = 4;

pub(crate) fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Scheduler {
    /// Start the scheduler on `spool`. The entries the spool found at open
    /// ([`Spool::take_backlog`]) are read in the background, in batches,
    /// while new mail is stored and delivered. It runs until `shutdown` is
    /// cancelled, then lets attempts in flight finish (up to 30 s) and the
    /// returned task ends.
    pub fn start(
        spool: Arc<Spool>,
        router: Arc<Router>,
        policy: Policy,
        shutdown: CancellationToken,
    ) -> (Scheduler, tokio::task::JoinHandle<()>) {
        Scheduler::start_gated(spool, router, policy, shutdown, None)
    }

    /// [`Scheduler::start`], with each batch of the start-up load waiting
    /// for a permit of `gate` first (tests hold the load with it).
    pub fn start_gated(
        spool: Arc<Spool>,
        router: Arc<Router>,
        policy: Policy,
        shutdown: CancellationToken,
        gate: Option<Arc<Semaphore>>,
    ) -> (Scheduler, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let backlog = spool.take_backlog();
        let shared = Arc::new(Shared {
            spool,
            router: RwLock::new(router),
            policy: RwLock::new(policy),
            stats: Mutex::new(QueueStats::default()),
            loading: AtomicBool::new(true),
            to_load: AtomicUsize::new(backlog.len()),
            tx,
            events: broadcast::channel(1024).0,
        });
        tokio::spawn(load(shared.clone(), backlog, gate, shutdown.clone()));
        let task = tokio::spawn(run_loop(shared.clone(), rx, shutdown));
        (Scheduler { shared }, task)
    }

    /// Hand a newly stored message to the scheduler.
    pub fn enqueue(&self, meta: Meta) {
        let entry = Entry::of(&meta, None);
        let _ = self.shared.tx.send(Cmd::Enqueue(Entry {
            fresh: Some(Box::new(meta)),
            ..entry
        }));
    }

    /// Make a queued message due now. False if there is no such message.
    /// While the start-up load runs, one not read yet is tried once read.
    pub async fn retry_now(&self, id: &str) -> bool {
        let (tx, rx) = oneshot::channel();
        let _ = self.shared.tx.send(Cmd::RetryNow(id.to_string(), tx));
        rx.await.unwrap_or(false)
    }

    /// Make every queued message due now (one being delivered is left to
    /// finish; while the start-up load runs, those not read yet too, once
    /// read). The number of messages in the queue.
    pub async fn retry_all(&self) -> usize {
        let (tx, rx) = oneshot::channel();
        let _ = self.shared.tx.send(Cmd::RetryAll(tx));
        rx.await.unwrap_or(0)
    }

    /// Remove a queued message without delivering it (also one the start-up
    /// load has not read yet). `Ok(false)` if there is no such message,
    /// `Err` if it is being delivered right now.
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
        s.loading = self.shared.loading.load(Ordering::SeqCst);
        if s.loading {
            s.to_load = self.shared.to_load.load(Ordering::SeqCst);
            s.depth = self.shared.spool.len();
        }
        if s.depth > 0 && s.oldest_received_at > 0 {
            s.oldest_age_secs = now_unix().saturating_sub(s.oldest_received_at);
        }
        s
    }

    /// True while the entries found at start are still being read.
    pub fn is_loading(&self) -> bool {
        self.shared.loading.load(Ordering::SeqCst)
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

/// The start-up load: read the spool's backlog in batches, oldest first,
/// [`LOAD_PARALLEL`] at a time (each waiting for a permit of `gate`, if
/// any), and hand each to the scheduling loop.
async fn load(
    shared: Arc<Shared>,
    mut backlog: Backlog,
    gate: Option<Arc<Semaphore>>,
    shutdown: CancellationToken,
) {
    use futures_util::StreamExt;
    let started = std::time::Instant::now();
    let (mut loaded, mut corrupt) = (0usize, 0usize);
    let mut left = backlog.len();
    let dir = shared.spool.root().join("corrupt");
    let mut reads = futures_util::stream::FuturesOrdered::new();
    loop {
        while reads.len() < LOAD_PARALLEL && !backlog.is_empty() {
            if let Some(gate) = &gate {
                tokio::select! {
                    permit = gate.acquire() => {
                        // A closed gate holds nothing back.
                        if let Ok(p) = permit {
                            p.forget();
                        }
                    }
                    _ = shutdown.cancelled() => return,
                }
            }
            let mut chunk = backlog.split_off(LOAD_BATCH);
            let (spool, n) = (shared.spool.clone(), chunk.len());
            reads.push_back(async move {
                let read =
                    tokio::task::spawn_blocking(move || spool.load_batch(&mut chunk, usize::MAX))
                        .await;
                (n, read)
            });
        }
        let read = tokio::select! {
            read = reads.next() => read,
            _ = shutdown.cancelled() => return,
        };
        let Some((n, read)) = read else { break };
        left = left.saturating_sub(n);
        shared.to_load.store(left, Ordering::SeqCst);
        let (metas, bad) = match read {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, entries = n, "reading spool entries failed; they are read at the next start");
                continue;
            }
        };
        for c in &bad {
            tracing::error!(file = %c.name, reason = %c.reason, dir = %dir.display(), "moved unreadable spool entry aside");
        }
        corrupt += bad.len();
        // A stored next_attempt beyond now + retry_max (the clock moved
        // back, or the file was edited) would hold the message that long.
        let latest = now_unix().saturating_add(retry_max_secs(&shared));
        let mut last_error: Option<(u32, &str)> = None;
        let batch: Vec<Entry> = metas
            .iter()
            .map(|m| {
                if let Some(e) = m.last_error.as_deref()
                    && last_error.is_none_or(|(n, _)| m.attempts > n)
                {
                    last_error = Some((m.attempts, e));
                }
                let mut e = Entry::of(m, None);
                if e.next_attempt > latest {
                    tracing::warn!(id = %m.id, stored = m.next_attempt, "stored next attempt lies beyond retry_max_secs; retrying sooner");
                    e.next_attempt = latest;
                }
                e
            })
            .collect();
        let last_error = last_error.map(|(_, e)| e.to_string());
        loaded += batch.len();
        if shared.tx.send(Cmd::Loaded(batch, last_error)).is_err() {
            return;
        }
    }
    let _ = shared.tx.send(Cmd::LoadDone);
    tracing::info!(
        messages = loaded,
        corrupt,
        secs = format!("{:.1}", started.elapsed().as_secs_f64()),
        spool = %shared.spool.root().display(),
        "spool loaded"
    );
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

/// The scheduling loop's state: the index of queued messages and their timers.
#[derive(Default)]
struct Queue {
    items: HashMap<Id, Item>,
    due: BTreeSet<(Instant, Id)>,
    /// Retries after throttling: dispatched when due, before `due`.
    urgent: BTreeSet<(Instant, Id)>,
    /// While the start-up load runs: what it must not undo.
    loading: Option<Loading>,
}

/// What happened to entries the start-up load has not handed over yet.
#[derive(Default)]
struct Loading {
    /// Enqueued by a new store, or deleted by the operator: never loaded again.
    seen: HashSet<Id>,
    /// Retried by the operator: due at once when loaded.
    retry: HashSet<Id>,
    /// Every message retried by the operator: those loaded later too.
    retry_all: bool,
}

impl Queue {
    /// Index `e`, due at its `next_attempt` (at most `retry_max` from now).
    fn insert(&mut self, e: Entry, retry_max: u64) {
        let wait = Duration::from_secs(e.next_attempt.saturating_sub(now_unix()).min(retry_max));
        let at = later(wait);
        let born = born_instant(e.received_at);
        let mut in_flight = false;
        if let Some(old) = self.items.get(&e.id) {
            self.due.remove(&(old.due, e.id.clone()));
            self.urgent.remove(&(old.due, e.id.clone()));
            // Its attempt applies its outcome when it ends.
            in_flight = old.in_flight;
        }
        if !e.held && !in_flight {
            self.due.insert((at, e.id.clone()));
        }
        self.items.insert(
            e.id,
            Item {
                due: at,
                born,
                received_at: e.received_at,
                attempts: e.attempts,
                in_flight,
                held: e.held,
                revive: false,
                fresh: e.fresh,
            },
        );
    }

    /// A batch of the start-up load: entries a new store or the operator
    /// dealt with already are left out.
    fn loaded(&mut self, batch: Vec<Entry>, retry_max: u64) {
        for e in batch {
            let Some(l) = &mut self.loading else {
                return;
            };
            if l.seen.contains(&e.id) || self.items.contains_key(&e.id) {
                continue;
            }
            let retry = l.retry_all | l.retry.remove(&e.id);
            let id = e.id.clone();
            self.insert(e, retry_max);
            if retry {
                self.retry(&id);
            }
        }
    }

    /// Make `id` due now (the operator asked); one in flight is left alone.
    /// False when there is no such message in the index.
    fn retry(&mut self, id: &str) -> bool {
        let Some(key) = self.items.get_key_value(id).map(|(k, _)| k.clone()) else {
            return false;
        };
        let Some(item) = self.items.get_mut(id) else {
            return false;
        };
        if item.in_flight {
            return true;
        }
        if item.held {
            // The operator asks for another go: its recipients are pending again.
            item.held = false;
            item.revive = true;
            tracing::info!(id = %id, "undeliverable DSN retried by operator");
        }
        self.due.remove(&(item.due, key.clone()));
        self.urgent.remove(&(item.due, key.clone()));
        item.due = Instant::now();
        self.due.insert((item.due, key.clone()));
        true
    }
}

async fn run_loop(
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<Cmd>,
    shutdown: CancellationToken,
) {
    let mut q = Queue {
        loading: Some(Loading::default()),
        ..Queue::default()
    };
    let mut running: JoinSet<(Id, attempt::Outcome)> = JoinSet::new();
    // Which message each attempt is for: a panicking attempt loses its
    // output, not its message.
    let mut tasks: HashMap<tokio::task::Id, Id> = HashMap::new();
    let sched = Scheduler {
        shared: shared.clone(),
    };
    // The figures need a walk of the queue (`publish_stats`).
    let mut dirty = true;
    let mut last_publish = Instant::now();
    loop {
        // Dispatch everything due, up to the concurrency limit; a message
        // held back only by throttling goes when due even past the limit,
        // so that mail which arrived after it cannot take its turn.
        let limit = sched.policy().concurrency.max(1);
        let now = Instant::now();
        let mut dispatched = false;
        loop {
            let (_, id) = match (q.urgent.first(), q.due.first()) {
                (Some(u), _) if u.0 <= now => {
                    let u = u.clone();
                    q.urgent.remove(&u);
                    u
                }
                (_, Some(d)) if d.0 <= now && running.len() < limit => {
                    let d = d.clone();
                    q.due.remove(&d);
                    d
                }
                _ => break,
            };
            let Some(item) = q.items.get_mut(&id) else {
                continue;
            };
            item.in_flight = true;
            let start = attempt::Start {
                id: id.clone(),
                born: item.born,
                revive: std::mem::take(&mut item.revive),
                fresh: std::mem::take(&mut item.fresh),
            };
            let s = sched.clone();
            let task_id = id.clone();
            let handle = running.spawn(async move {
                let outcome = attempt::attempt(&s, start).await;
                (task_id, outcome)
            });
            tasks.insert(handle.id(), id);
            dispatched = true;
        }
        if dispatched {
            // Only the attempts in flight changed: no walk for that.
            shared.stats.lock().in_flight = running.len();
        }
        // Publishing walks the whole queue: on a large queue do it at most
        // twice a second, so a backlog does not make every event O(n).
        if dirty && (q.items.len() <= 2000 || last_publish.elapsed() >= PUBLISH_EVERY) {
            publish_stats(&shared, &q.items, running.len());
            last_publish = Instant::now();
            dirty = false;
        }
        let next_due = if running.len() < limit {
            q.due.first().map(|(t, _)| *t)
        } else {
            None
        };
        let next = match (q.urgent.first().map(|(t, _)| *t), next_due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            cmd = rx.recv() => {
                let Some(cmd) = cmd else { break };
                command(&shared, &mut q, cmd).await;
                dirty = true;
            }
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
                        rescue(&shared, &mut q, id, e);
                    }
                }
                match done.map(|(_, out)| out) {
                    Ok((id, Some((meta, delay, throttled)))) => {
                        if let Some(item) = q.items.get_mut(&id) {
                            item.in_flight = false;
                            item.due = later(delay);
                            if let Some(meta) = meta {
                                item.attempts = meta.attempts;
                                item.held = meta.bounce_undeliverable;
                            }
                            // Held for the operator: not due again by itself.
                            if !item.held {
                                if throttled {
                                    q.urgent.insert((item.due, id));
                                } else {
                                    q.due.insert((item.due, id));
                                }
                            }
                        }
                    }
                    Ok((id, None)) => {
                        q.items.remove(&id);
                    }
                    Err(_) => {}
                }
                dirty = true;
                // The event goes out once the outcome is applied: whoever
                // watches it (a sample mail on the admin page) sees the
                // queue as the attempt left it.
                if let Some(event) = event {
                    if event.outcome != AttemptOutcome::Delivered && !event.detail.is_empty() {
                        shared.stats.lock().last_error = Some(event.detail.clone());
                    }
                    if q.items.len() <= 2000 {
                        publish_stats(&shared, &q.items, running.len());
                        last_publish = Instant::now();
                        dirty = false;
                    }
                    let _ = shared.events.send(event);
                }
            }
            _ = sleep_until_opt(next) => {}
            _ = tokio::time::sleep_until(last_publish + PUBLISH_EVERY), if dirty => {}
        }
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

/// Apply one command to the queue.
async fn command(shared: &Arc<Shared>, q: &mut Queue, cmd: Cmd) {
    let retry_max = retry_max_secs(shared);
    match cmd {
        Cmd::Enqueue(e) => {
            if let Some(l) = &mut q.loading {
                l.seen.insert(e.id.clone());
            }
            q.insert(e, retry_max);
        }
        Cmd::Loaded(batch, last_error) => {
            q.loaded(batch, retry_max);
            let mut s = shared.stats.lock();
            if s.last_error.is_none() {
                s.last_error = last_error;
            }
        }
        Cmd::LoadDone => {
            q.loading = None;
            shared.loading.store(false, Ordering::SeqCst);
        }
        Cmd::RetryNow(id, reply) => {
            let found = q.retry(&id) || (q.loading.is_some() && on_disk(shared, &id).await);
            if let Some(l) = &mut q.loading
                && found
                && !q.items.contains_key(id.as_str())
            {
                l.retry.insert(id.as_str().into());
            }
            let _ = reply.send(found);
        }
        Cmd::RetryAll(reply) => {
            let ids: Vec<Id> = q.items.keys().cloned().collect();
            for id in &ids {
                q.retry(id);
            }
            let n = match &mut q.loading {
                Some(l) => {
                    l.retry_all = true;
                    shared.spool.len()
                }
                None => q.items.len(),
            };
            tracing::info!(messages = n, "every queued message retried by operator");
            let _ = reply.send(n);
        }
        Cmd::Delete(id, reply) => {
            let answer = match q.items.get_key_value(id.as_str()) {
                None if q.loading.is_none() => Ok(false),
                Some((_, item)) if item.in_flight => {
                    Err("message is being delivered right now; try again".to_string())
                }
                // Not read by the start-up load yet: removed from the
                // spool now, and never loaded.
                None => match remove(shared, &id, true).await {
                    Ok(true) => {
                        if let Some(l) = &mut q.loading {
                            l.seen.insert(id.as_str().into());
                        }
                        tracing::info!(id = %id, "deleted by operator");
                        Ok(true)
                    }
                    other => other,
                },
                Some((key, item)) => {
                    let (key, due) = (key.clone(), item.due);
                    match remove(shared, &id, false).await {
                        Ok(_) => {
                            q.due.remove(&(due, key.clone()));
                            q.urgent.remove(&(due, key));
                            q.items.remove(id.as_str());
                            tracing::info!(id = %id, "deleted by operator");
                            Ok(true)
                        }
                        Err(e) => Err(e),
                    }
                }
            };
            let _ = reply.send(answer);
        }
    }
}

/// True if the spool holds an entry `id` (read on a blocking thread).
async fn on_disk(shared: &Shared, id: &str) -> bool {
    let (spool, id) = (shared.spool.clone(), id.to_string());
    tokio::task::spawn_blocking(move || spool.read_meta(&id).is_ok())
        .await
        .unwrap_or(false)
}

/// Remove `id` from the spool; with `if_there`, only if it is there
/// (`Ok(false)` if not).
async fn remove(shared: &Shared, id: &str, if_there: bool) -> Result<bool, String> {
    let (spool, id) = (shared.spool.clone(), id.to_string());
    let removed = tokio::task::spawn_blocking(move || {
        if if_there && spool.read_meta(&id).is_err() {
            return Ok(false);
        }
        spool.remove(&id).map(|()| true)
    })
    .await;
    match removed {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(format!("cannot remove: {e}")),
        Err(e) => Err(format!("cannot remove: {e}")),
    }
}

/// An attempt that panicked (or was cancelled): its message is no longer in
/// flight. It counts as a failed attempt and is retried after the backoff,
/// so a message that always panics is tried at the retry pace and bounced
/// when its lifetime runs out, never stuck.
fn rescue(shared: &Shared, q: &mut Queue, id: Option<Id>, e: &tokio::task::JoinError) {
    let Some(id) = id else {
        tracing::error!(error = %e, "delivery task failed");
        return;
    };
    let Some(item) = q.items.get_mut(&id) else {
        return;
    };
    let policy = shared.policy.read().clone();
    item.attempts += 1;
    let delay = policy.backoff(item.attempts);
    item.in_flight = false;
    item.due = Instant::now() + delay;
    q.due.insert((item.due, id.clone()));
    tracing::error!(id = %id, error = %e, retry_in_secs = delay.as_secs(), "delivery attempt panicked; rescheduled");
    let (spool, attempts) = (shared.spool.clone(), item.attempts);
    tokio::task::spawn_blocking(move || {
        let mut meta = match spool.read_meta(&id) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(id = %id, error = %e, "cannot read metadata");
                return;
            }
        };
        meta.attempts = attempts;
        meta.last_error = Some("the delivery attempt failed unexpectedly (internal error)".into());
        meta.next_attempt = now_unix() + delay.as_secs();
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

/// Walk the queue once for its figures.
fn publish_stats(shared: &Shared, items: &HashMap<Id, Item>, in_flight: usize) {
    let (mut deferred, mut held, mut oldest) = (0, 0, u64::MAX);
    for i in items.values() {
        if i.held {
            held += 1;
        } else if i.attempts > 0 {
            deferred += 1;
        }
        oldest = oldest.min(i.received_at);
    }
    let mut s = shared.stats.lock();
    s.depth = items.len();
    s.in_flight = in_flight;
    s.deferred = deferred;
    s.bounce_undeliverable = held;
    s.oldest_received_at = if items.is_empty() { 0 } else { oldest };
    s.oldest_age_secs = 0;
}
