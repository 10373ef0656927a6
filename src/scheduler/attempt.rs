//! One delivery attempt: load the message, rewrite and map its identity, hand it to the router, record the outcome, and queue the DSN when recipients failed for good.

use std::time::Duration;

use tokio::time::Instant;

use super::submit::Submission;
use super::{
    AttemptEvent, AttemptOutcome, INLINE_IO_BYTES, Id, Next, Policy, Scheduler, apply, dsn,
    dsn_policy, now_unix,
};
use crate::spool::{Meta, RcptStatus};
use crate::transport::{Body, Envelope};

/// What is left of a message after an attempt: its updated metadata
/// (`None` when it could not be read), the retry delay, and whether only
/// throttling held it back (it then goes before newer mail).
pub(super) type Again = (Option<Meta>, Duration, bool);

/// What an attempt hands back to the scheduler: what to retry, and its event.
pub(super) type Outcome = (Option<Again>, Option<AttemptEvent>);

/// What the scheduler hands an attempt: the message (its metadata is read
/// from the spool now) and what it knows of it.
pub(super) struct Start {
    /// Queue id.
    pub id: Id,
    /// When it was queued.
    pub born: Instant,
    /// The operator retried an undeliverable DSN: its failed recipients are
    /// pending again.
    pub revive: bool,
    /// Stored moments ago: its metadata as stored (not read back from disk).
    pub fresh: Option<Box<Meta>>,
}

/// One delivery attempt. Returns what to retry (`None` when the message
/// left the queue) and the attempt's event, which the scheduler publishes
/// once it has applied the outcome (so an observer that sees the event sees
/// the queue as it is after the attempt).
pub(super) async fn attempt(s: &Scheduler, mut start: Start) -> Outcome {
    let mut event = None;
    let again = match read_meta(s, &mut start).await {
        Ok(meta) => run(s, meta, start.born, &mut event).await,
        Err(again) => again,
    };
    (again, event)
}

/// The message's metadata as it is on disk (as stored, for a message not
/// attempted yet), or what to tell the scheduler when it cannot be read.
async fn read_meta(s: &Scheduler, start: &mut Start) -> Result<Meta, Option<Again>> {
    let spool = s.shared.spool.clone();
    let id = start.id.to_string();
    let read = if let Some(meta) = start.fresh.take() {
        Ok(*meta)
    } else {
        let (spool, id) = (spool.clone(), id.clone());
        match tokio::task::spawn_blocking(move || spool.read_meta(&id)).await {
            Ok(r) => r,
            Err(e) => Err(std::io::Error::other(e.to_string())),
        }
    };
    match read {
        Ok(mut meta) => {
            if meta.bounce_undeliverable && !start.revive {
                // Held for the operator (as on disk): nothing to try.
                return Err(Some((Some(meta), Duration::ZERO, false)));
            }
            if meta.bounce_undeliverable {
                meta.bounce_undeliverable = false;
                for r in &mut meta.rcpts {
                    if r.status == RcptStatus::Failed {
                        r.status = RcptStatus::Pending;
                    }
                }
            }
            Ok(meta)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::error!(id = %id, "queued message has no metadata any more; dropped from the queue");
            let _ = spool.remove(&id);
            Err(None)
        }
        Err(e) => {
            tracing::error!(id = %id, error = %e, "cannot read message metadata; will retry");
            Err(Some((None, s.policy().retry_max, false)))
        }
    }
}

async fn run(
    s: &Scheduler,
    mut meta: Meta,
    born: Instant,
    event: &mut Option<AttemptEvent>,
) -> Option<Again> {
    let spool = s.shared.spool.clone();
    let policy = s.policy();
    let id = meta.id.clone();
    // A small body was just written and sits in the page cache: reading it
    // in place costs microseconds, less than handing it to a blocking
    // thread. A large one is opened there and only its header block read:
    // the transports read the rest in chunks.
    let body = if meta.size <= INLINE_IO_BYTES {
        spool
            .open_body(&id)
            .and_then(|(file, start)| Body::open_from(file, start))
            .map_err(|e| e.to_string())
    } else {
        let spool = spool.clone();
        let id = id.clone();
        match tokio::task::spawn_blocking(move || {
            spool
                .open_body(&id)
                .and_then(|(file, start)| Body::open_from(file, start))
        })
        .await
        {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    };
    let body = match body {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(id = %id, error = %e, "cannot read message body; will retry");
            return Some((Some(meta), policy.retry_max, false));
        }
    };
    // The Sender Name / Reply-to rewrite touches the header block only.
    let outgoing =
        match crate::message::rewrite_from(body.head(), &policy.sender_name, &policy.reply_to) {
            std::borrow::Cow::Borrowed(_) => body.clone(),
            std::borrow::Cow::Owned(head) => body.with_head(head),
        };
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
    let failure = match &result {
        Err(f) => Some(f.clone()),
        Ok(each) => each.iter().find_map(|r| r.as_ref().err().cloned()),
    };
    *event = Some(AttemptEvent {
        id: id.clone(),
        outcome,
        detail,
        route,
        age: born.elapsed(),
        failure,
    });
    if meta.sample {
        // The sender saw the answer on screen: a sample mail is tried once,
        // never retried and never bounced, so a failed one leaves nothing queued.
        if outcome != AttemptOutcome::Delivered {
            tracing::info!(id = %id, error = meta.last_error.as_deref().unwrap_or(""), "sample mail not delivered; removed from the queue");
        }
        if let Err(e) = spool.remove(&id) {
            tracing::error!(id = %id, error = %e, "cannot remove the sample mail");
        }
        return None;
    }
    match next {
        Next::Retry(delay) | Next::Throttled(delay) => {
            let throttled = matches!(next, Next::Throttled(_));
            meta.next_attempt = now_unix() + delay.as_secs();
            tracing::info!(id = %id, message_id = %message_id, retry_in_secs = delay.as_secs(), error = meta.last_error.as_deref().unwrap_or(""), "deferred");
            let m = meta.clone();
            let sp = spool.clone();
            match tokio::task::spawn_blocking(move || sp.update(&m)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(id = %id, error = %e, "cannot update metadata"),
                Err(e) => tracing::error!(id = %id, error = %e, "metadata writer failed"),
            }
            Some((Some(meta), delay, throttled))
        }
        Next::Done => {
            match dsn_decision(&meta) {
                Dsn::Send => {
                    if let Err(why) = dsn_policy::dsn_allowed(&policy.dsn, &meta) {
                        tracing::info!(id = %id, to = %crate::text::for_log(&meta.from), reason = why, "no DSN");
                    } else if let Err(e) = queue_dsn(s, &meta, body.head(), &policy).await {
                        // Keep the message (all final) so the DSN is retried after a restart.
                        tracing::error!(id = %id, error = %e, "cannot queue DSN; keeping message");
                        return Some((Some(meta), policy.retry_max, false));
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
                    return Some((Some(meta), Duration::ZERO, false));
                }
                Dsn::NoSender => {
                    tracing::warn!(id = %id, "no DSN: the envelope sender is <>");
                }
                Dsn::NotNeeded => {}
            }
            // A rename or two unlinks, no fsync: quick enough to do in
            // place. A message read whole into memory leaves its file to
            // be written over by a new one: nothing reads it any more.
            let removed = if body.in_memory() {
                drop((outgoing, body));
                spool.recycle(&id)
            } else {
                spool.remove(&id)
            };
            if let Err(e) = removed {
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

/// Store and schedule the DSN for `meta` (`headers`: the header block of
/// the original, which the DSN quotes). Its id is derived from the
/// original's, so a crash between storing it and removing the original
/// rewrites the same DSN instead of sending two.
async fn queue_dsn(
    s: &Scheduler,
    meta: &Meta,
    headers: &[u8],
    policy: &Policy,
) -> Result<(), String> {
    let dsn_id = format!("{}-dsn", meta.id);
    let date = chrono::Utc::now().to_rfc2822();
    let from = policy.dsn_from_header(meta);
    let text = dsn::build(meta, headers, &policy.hostname, &from, &date, &dsn_id);
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
    let mut sub = Submission::in_memory(s, m, text);
    sub.replace = true;
    match s.submit(sub).await {
        Ok(_) => {
            tracing::info!(id = %dsn_id, original = %meta.id, to = %meta.from, "queued DSN");
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    }
}
