//! The pool of idle, authenticated SMTP connections, and the task that closes expired ones.

use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use super::conn::Conn;

/// At most this many idle connections are kept per transport, unless the
/// transport says otherwise ([`Pool::new`]).
pub(super) const POOL_MAX_IDLE: usize = 4;
/// An idle connection older than this is closed rather than reused.
const POOL_IDLE_TIME: Duration = Duration::from_secs(60);

/// Idle connections, newest last.
pub(super) struct Pool {
    state: Mutex<PoolState>,
    /// Idle connections kept at most; more are closed.
    max_idle: usize,
}

#[derive(Default)]
struct PoolState {
    /// Each with the moment it became idle.
    idle: Vec<(Conn, Instant)>,
    /// A task closing expired connections is running.
    reaper: bool,
}

impl Pool {
    /// An empty pool keeping at most `max_idle` idle connections.
    pub(super) fn new(max_idle: usize) -> Self {
        Pool {
            state: Mutex::default(),
            max_idle,
        }
    }

    /// The most recently used live connection authenticated as `user`
    /// (`None`: not authenticated with XOAUTH2), if any.
    pub(super) fn take(&self, user: Option<&str>) -> Option<Conn> {
        let mut state = self.state.lock();
        state
            .idle
            .retain(|(_, since)| since.elapsed() < POOL_IDLE_TIME);
        let i = state
            .idle
            .iter()
            .rposition(|(conn, _)| conn.user.as_deref() == user)?;
        Some(state.idle.remove(i).0)
    }

    /// Keep `conn` for reuse if there is room; start the reaper if needed.
    pub(super) fn put(pool: &Arc<Pool>, conn: Conn) {
        let mut state = pool.state.lock();
        state
            .idle
            .retain(|(_, since)| since.elapsed() < POOL_IDLE_TIME);
        if state.idle.len() >= pool.max_idle {
            return;
        }
        state.idle.push((conn, Instant::now()));
        if !state.reaper
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            state.reaper = true;
            runtime.spawn(reap(Arc::downgrade(pool)));
        }
    }
}

/// Close expired idle connections until the pool is empty or gone, so a
/// quiet transport does not hold sockets open forever.
async fn reap(pool: Weak<Pool>) {
    loop {
        tokio::time::sleep(POOL_IDLE_TIME / 4).await;
        let Some(pool) = pool.upgrade() else { return };
        let mut state = pool.state.lock();
        state
            .idle
            .retain(|(_, since)| since.elapsed() < POOL_IDLE_TIME);
        if state.idle.is_empty() {
            state.reaper = false;
            return;
        }
    }
}
