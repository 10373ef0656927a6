//! One key's gate: the line of attempts waiting to start, in arrival order, and the rule that decides when the first of them may (no pause, a free slot, room in every budget, the pacing interval passed).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::{Cost, Limits};

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock()
}

/// The state of one key (one mailbox of one upstream application).
#[derive(Default)]
pub(super) struct Gate {
    pub(super) state: Mutex<GateState>,
    /// Woken whenever the line moves: an attempt started or ended, a
    /// waiter left, a pause was set.
    pub(super) wake: Notify,
}

#[derive(Default)]
pub(super) struct GateState {
    /// No attempt starts before this.
    pub(super) paused_until: Option<Instant>,
    /// Starts inside the request budget's window.
    requests: Window,
    /// Request bytes inside the byte budget's window.
    bytes: Window,
    /// Recipients inside the recipient budget's window.
    recipients: Window,
    /// The earliest start the pacing allows for the next attempt.
    next_start: Option<Instant>,
    /// Tickets of the attempts waiting to start; only the lowest may.
    waiting: BTreeSet<u64>,
    /// Attempts running (holding a slot).
    pub(super) running: usize,
    /// Of those, attempts held through a pause (retried in place, or back
    /// from the scheduler): until they are answered nothing else starts,
    /// so the held mail is first on the wire too, and one answer shows
    /// whether the pause was enough before the rest follow.
    held_running: usize,
    /// Messages whose holds ran out and that went back to the scheduler:
    /// queue id → (their ticket, until when their place is kept). Newer
    /// mail waits behind them until they are back or the time is up.
    returned: HashMap<String, (u64, Instant)>,
}

/// Why the first attempt in line cannot start yet.
enum Blocked {
    /// Not before this instant (a pause, a budget window, the pacing).
    Until(Instant),
    /// Until the line moves (another attempt is first, or every slot is taken).
    Turn,
}

impl GateState {
    /// Whether attempt `ticket` may start now; if so, its start is recorded.
    fn try_start(
        &mut self,
        ticket: u64,
        held: bool,
        limits: &Limits,
        cap: super::shared::Cap,
        cost: Cost,
    ) -> Result<(), Blocked> {
        let now = Instant::now();
        self.returned.retain(|_, (_, until)| *until > now);
        if let Some(p) = self.paused_until.filter(|p| *p > now) {
            return Err(Blocked::Until(p));
        }
        if self.waiting.first() != Some(&ticket) {
            return Err(Blocked::Turn);
        }
        if let Some(until) = self
            .returned
            .values()
            .filter(|(t, _)| *t < ticket)
            .map(|(_, u)| *u)
            .min()
        {
            return Err(Blocked::Until(until));
        }
        if limits.max_in_flight > 0 && self.running >= limits.max_in_flight {
            return Err(Blocked::Turn);
        }
        // Just after a switch to or from Redis: fewer slots for a while.
        if let Some((cap, until)) = cap
            && until > now
            && self.running >= cap
        {
            return Err(Blocked::Until(until));
        }
        if !held && self.held_running > 0 {
            return Err(Blocked::Turn);
        }
        if let Some(free) = self.budgets_full_until(limits, cost, now) {
            return Err(Blocked::Until(free));
        }
        if let Some(n) = self.next_start.filter(|n| *n > now) {
            return Err(Blocked::Until(n));
        }
        if limits.messages_per_minute > 0 {
            self.next_start = Some(now + Duration::from_secs(60) / limits.messages_per_minute);
        }
        if limits.budget.is_some() {
            self.requests.spend(now, 1);
        }
        if limits.bytes_budget.is_some() {
            self.bytes.spend(now, cost.bytes);
        }
        if limits.recipients_budget.is_some() {
            self.recipients.spend(now, cost.recipients);
        }
        self.waiting.remove(&ticket);
        self.running += 1;
        if held {
            self.held_running += 1;
        }
        Ok(())
    }

    /// When some budget has no room for `cost`: the latest instant any of
    /// them has room again (checked again then).
    fn budgets_full_until(&mut self, limits: &Limits, cost: Cost, now: Instant) -> Option<Instant> {
        let mut until: Option<Instant> = None;
        let mut wait = |t: Option<Instant>| {
            if let Some(t) = t {
                until = Some(until.map_or(t, |u| u.max(t)));
            }
        };
        if let Some((max, span)) = limits.budget {
            wait(self.requests.full_until(u64::from(max), span, 1, now));
        }
        if let Some((max, span)) = limits.bytes_budget {
            wait(self.bytes.full_until(max, span, cost.bytes, now));
        }
        if let Some((max, span)) = limits.recipients_budget {
            wait(self.recipients.full_until(max, span, cost.recipients, now));
        }
        until
    }

    /// The ticket kept for a message that went back to the scheduler, if any.
    pub(super) fn take_returned(&mut self, id: &str) -> Option<u64> {
        self.returned.remove(id).map(|(t, _)| t)
    }

    /// Keep `ticket`'s place for message `id` until `until`.
    pub(super) fn keep_place(&mut self, id: &str, ticket: u64, until: Instant) {
        // Bounded: a message that never comes back is forgotten at `until`.
        if self.returned.len() < MAX_RETURNED {
            self.returned.insert(id.to_string(), (ticket, until));
        }
    }
}

/// At most this many places are kept for messages gone back to the scheduler.
const MAX_RETURNED: usize = 10_000;

impl Gate {
    /// Join the line with `ticket`; the guard leaves it if dropped before
    /// the start (a cancelled attempt never blocks the line).
    pub(super) fn queue(self: &Arc<Self>, ticket: u64, held: bool) -> Queued {
        lock(&self.state).waiting.insert(ticket);
        Queued {
            gate: self.clone(),
            ticket,
            held,
        }
    }

    /// An attempt ended (`held`: one held through a pause): its slot is free.
    pub(super) fn finish(&self, held: bool) {
        {
            let mut st = lock(&self.state);
            st.running = st.running.saturating_sub(1);
            if held {
                st.held_running = st.held_running.saturating_sub(1);
            }
        }
        self.wake.notify_waiters();
    }
}

/// A place in a gate's line.
pub(super) struct Queued {
    gate: Arc<Gate>,
    ticket: u64,
    held: bool,
}

impl Queued {
    /// Its place in line.
    pub(super) fn ticket(&self) -> u64 {
        self.ticket
    }

    /// Whether it is held through a pause.
    pub(super) fn held(&self) -> bool {
        self.held
    }

    /// Wait until this attempt is first in line and may start under
    /// `rules()`, the limits and an in-flight cap (read again at every
    /// step, so a reload or a switch to or from Redis applies to waiters),
    /// then record the start.
    pub(super) async fn start(
        self,
        rules: impl Fn() -> (Arc<Limits>, super::shared::Cap),
        cost: Cost,
    ) {
        loop {
            let notified = self.gate.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (limits, cap) = rules();
            let blocked =
                lock(&self.gate.state).try_start(self.ticket, self.held, &limits, cap, cost);
            match blocked {
                Ok(()) => break,
                Err(Blocked::Until(t)) => tokio::select! {
                    _ = tokio::time::sleep_until(t) => {}
                    _ = &mut notified => {}
                },
                Err(Blocked::Turn) => notified.await,
            }
        }
        // Started (the ticket left the line in `try_start`): the next one may look.
        self.gate.wake.notify_waiters();
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        let removed = lock(&self.gate.state).waiting.remove(&self.ticket);
        if removed {
            self.gate.wake.notify_waiters();
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_cap_after_a_switch_holds_starts_until_it_ends() {
        let limits = Limits::graph(4, "k");
        let mut st = GateState::default();
        let until = Instant::now() + Duration::from_secs(2);
        st.waiting.insert(1);
        // Cap 0: nothing starts until `until`, although 4 slots are free.
        assert!(matches!(
            st.try_start(1, false, &limits, Some((0, until)), Cost::default()),
            Err(Blocked::Until(t)) if t == until
        ));
        // Cap 1: one starts, the next waits for it or for `until`.
        assert!(
            st.try_start(1, false, &limits, Some((1, until)), Cost::default())
                .is_ok()
        );
        st.waiting.insert(2);
        assert!(
            st.try_start(2, false, &limits, Some((1, until)), Cost::default())
                .is_err()
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(
            st.try_start(2, false, &limits, Some((1, until)), Cost::default())
                .is_ok()
        );
        assert_eq!(st.running, 2);
    }
}
