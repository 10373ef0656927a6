//! The budget shared through Redis by every instance sending as the same mailboxes: in-flight slots as leases that expire, the budget windows and pacing checked and spent in one atomic script per start, and pauses every instance honours; when Redis cannot be reached the governors fall back to their local limits divided by the expected number of instances.
//!
//! Per application and mailbox the keys are `mailbridge:<app>:<mailbox>:…`:
//! `lease` (a sorted set: one member per request in flight, scored by its
//! expiry), `pause` (a key whose time to live is the pause), `pace` (the
//! earliest next start), and for each budget a list of `at:amount` entries
//! with its running sum (`req`, `bytes`, `rcpt`): the same sliding windows
//! the local governor keeps, so the shared budget is never exceeded in any
//! window (a token bucket would either allow twice the budget in one window
//! or halve the rate). All times come from the Redis server's clock, so the
//! instances' clocks do not matter. A lease given back is announced on the
//! `mailbridge:released` channel, so an instance waiting for a slot asks
//! again at once (and every 50 ms anyway, for the leases of a killed
//! instance, which expire unannounced; every 5 ms where pub/sub with RESP3
//! is unavailable, a Redis before 6).
//!
//! The switches between the two do not overspend either. At the loss of
//! Redis the other instances may still run requests started under their
//! leases, which this one cannot see: for one lease time after it noticed
//! the loss an instance starts requests for a mailbox only while it runs
//! fewer than the leases it held for it then (and never more than its
//! share), so the instances together stay within the slots they held in
//! Redis; after that every request started under a lease has ended (a
//! lease outlives the request timeout). When Redis answers again, for one
//! lease time (plus the interval at which the others ask again) an instance
//! keeps its fallback share of the slots as well as taking leases, since
//! requests the others started under the fallback have no lease in Redis.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::ConnectionManager;
use tokio::time::Instant;

use super::{Cost, Limits};

/// How the shared budget stands, for status and metrics.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SharedState {
    /// `redis` while the shared budget is in use, `fallback` while Redis
    /// cannot be reached (local limits divided by `expected_instances`).
    pub mode: &'static str,
    /// Instances the budget is divided by in fallback.
    pub expected_instances: u32,
    /// The last Redis error, while in fallback.
    pub last_error: Option<String>,
}

/// One connection to Redis for the whole process.
pub struct Shared {
    conn: ConnectionManager,
    /// Tells this process's leases apart from the other instances'.
    instance: String,
    lease: Duration,
    expected_instances: u32,
    up: AtomicBool,
    /// The last switch between Redis and the fallback.
    switch: parking_lot::Mutex<Switch>,
    last_error: parking_lot::Mutex<Option<String>>,
    leases: AtomicU64,
    /// Leases this instance holds now, by key prefix.
    held: parking_lot::Mutex<HashMap<String, usize>>,
    /// Woken when a lease is given back (by this instance, or by another
    /// one through Redis pub/sub), so an attempt waiting for a shared slot
    /// asks at once instead of at its next poll.
    released: Arc<tokio::sync::Notify>,
    /// The pub/sub connection (RESP3) that hears the others' releases.
    notices: ConnectionManager,
    /// When subscribing last failed (a Redis before 6 has no RESP3: then
    /// the waiters poll every [`POLL`]).
    subscribed: parking_lot::Mutex<Subscribed>,
}

/// Whether the releases of other instances are heard.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Subscribed {
    No,
    Yes,
    FailedAt(Instant),
}

/// When Redis was lost or came back, and what this instance held then.
struct Switch {
    /// `None` before the first switch.
    at: Option<Instant>,
    /// At the loss: the leases this instance held, by key prefix.
    held: HashMap<String, usize>,
}

/// The in-flight rule for one key after a switch: at most `.0` running
/// until `.1`, on top of the limits.
pub(super) type Cap = Option<(usize, Instant)>;

/// While every slot is busy and releases are not heard, look again this
/// often.
const POLL: Duration = Duration::from_millis(5);
/// While every slot is busy and releases are heard (`released`), look again
/// this often anyway: a killed instance's lease expires unannounced.
const POLL_HEARD: Duration = Duration::from_millis(50);
/// After a failed subscription, try again this much later.
const SUBSCRIBE_RETRY: Duration = Duration::from_secs(30);
/// The channel on which a release names its key prefix.
const RELEASED: &str = "mailbridge:released";

/// Give a lease back and tell the other instances.
const RELEASE: &str = r#"
if redis.call('ZREM', KEYS[1] .. 'lease', ARGV[1]) > 0 then
  redis.call('PUBLISH', ARGV[2], KEYS[1])
end
return 0
"#;
/// Every Redis call gives up after this long (then: fallback).
const TIMEOUT: Duration = Duration::from_millis(500);
/// While Redis is unreachable, the governors ask it again at most this often.
pub(super) const REDIS_RETRY: Duration = Duration::from_secs(1);

/// One start: `0` = granted (lease taken, budgets spent), else milliseconds
/// to wait before asking again.
const ACQUIRE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local p = KEYS[1]
local pttl = redis.call('PTTL', p .. 'pause')
if pttl > 0 then return pttl end
local max = tonumber(ARGV[3])
local poll = tonumber(ARGV[4])
if max > 0 then
  redis.call('ZREMRANGEBYSCORE', p .. 'lease', '-inf', now)
  if redis.call('ZCARD', p .. 'lease') >= max then
    local first = redis.call('ZRANGE', p .. 'lease', 0, 0, 'WITHSCORES')
    local left = tonumber(first[2]) - now
    if left < poll then return math.max(left, 1) end
    return poll
  end
end
local nxt = tonumber(redis.call('GET', p .. 'pace') or '0')
if nxt > now then return nxt - now end
local function full(name, max, span, need)
  if max <= 0 then return 0 end
  local list, sumk = p .. name, p .. name .. ':sum'
  local sum = tonumber(redis.call('GET', sumk) or '0')
  while true do
    local head = redis.call('LINDEX', list, 0)
    if not head then break end
    local sep = string.find(head, ':')
    local at = tonumber(string.sub(head, 1, sep - 1))
    if at + span > now then break end
    redis.call('LPOP', list)
    sum = sum - tonumber(string.sub(head, sep + 1))
  end
  if sum < 0 or redis.call('LLEN', list) == 0 then sum = 0 end
  redis.call('SET', sumk, sum, 'PX', span)
  if sum == 0 or sum + need <= max then return 0 end
  local left = sum
  for _, e in ipairs(redis.call('LRANGE', list, 0, -1)) do
    local sep = string.find(e, ':')
    left = left - tonumber(string.sub(e, sep + 1))
    if left + need <= max or left <= 0 then
      return math.max(tonumber(string.sub(e, 1, sep - 1)) + span - now, 1)
    end
  end
  return 1
end
local wait = 0
for i = 0, 2 do
  local name = ({'req', 'bytes', 'rcpt'})[i + 1]
  local w = full(name, tonumber(ARGV[6 + 3 * i]), tonumber(ARGV[7 + 3 * i]), tonumber(ARGV[8 + 3 * i]))
  if w > wait then wait = w end
end
if wait > 0 then return wait end
if max > 0 then
  redis.call('ZADD', p .. 'lease', now + tonumber(ARGV[2]), ARGV[1])
  redis.call('PEXPIRE', p .. 'lease', tonumber(ARGV[2]))
end
local interval = tonumber(ARGV[5])
if interval > 0 then redis.call('SET', p .. 'pace', now + interval, 'PX', interval) end
for i = 0, 2 do
  local name = ({'req', 'bytes', 'rcpt'})[i + 1]
  local mx, span, need = tonumber(ARGV[6 + 3 * i]), tonumber(ARGV[7 + 3 * i]), tonumber(ARGV[8 + 3 * i])
  if mx > 0 then
    redis.call('RPUSH', p .. name, now .. ':' .. need)
    redis.call('PEXPIRE', p .. name, span)
    redis.call('INCRBY', p .. name .. ':sum', need)
    redis.call('PEXPIRE', p .. name .. ':sum', span)
  end
end
return 0
"#;

/// Extend a lease (`XX`: only if it still exists).
const RENEW: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1] .. 'lease', 'XX', now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1] .. 'lease', tonumber(ARGV[2]))
return 0
"#;

/// Pause for `ARGV[1]` ms unless a longer pause is set.
const PAUSE: &str = r#"
local pttl = redis.call('PTTL', KEYS[1] .. 'pause')
if pttl < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1] .. 'pause', 1, 'PX', tonumber(ARGV[1]))
end
return 0
"#;

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Shared {
    /// Connect lazily to `url` (nothing is sent until the first start, so
    /// a Redis that is down never delays start-up). `lease` is the lifetime
    /// of an in-flight lease.
    pub fn new(
        url: &str,
        username: &str,
        password: &crate::common::Secret,
        expected_instances: u32,
        lease: Duration,
    ) -> Result<Arc<Shared>, String> {
        let mut info: redis::ConnectionInfo = url
            .parse()
            .map_err(|e: redis::RedisError| format!("throttle.redis_url: {e}"))?;
        let mut redis_settings = info.redis_settings().clone();
        if !password.is_empty() {
            redis_settings = redis_settings.set_password(password.expose());
        }
        if !username.is_empty() {
            redis_settings = redis_settings.set_username(username);
        }
        let resp3 = info.clone().set_redis_settings(
            redis_settings
                .clone()
                .set_protocol(redis::ProtocolVersion::RESP3),
        );
        info = info.set_redis_settings(redis_settings);
        let client = redis::Client::open(info).map_err(|e| format!("throttle.redis_url: {e}"))?;
        let config = || {
            redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(TIMEOUT))
                .set_response_timeout(Some(TIMEOUT))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_secs(1))
        };
        let conn = ConnectionManager::new_lazy_with_config(client, config())
            .map_err(|e| format!("throttle.redis_url: {e}"))?;
        let released = Arc::new(tokio::sync::Notify::new());
        let heard = released.clone();
        let notices = ConnectionManager::new_lazy_with_config(
            redis::Client::open(resp3).map_err(|e| format!("throttle.redis_url: {e}"))?,
            config()
                .set_push_sender(move |_: redis::PushInfo| {
                    heard.notify_waiters();
                    Ok::<(), std::convert::Infallible>(())
                })
                .set_automatic_resubscription(),
        )
        .map_err(|e| format!("throttle.redis_url: {e}"))?;
        Ok(Arc::new(Shared {
            conn,
            instance: format!("{:016x}", rand::random::<u64>()),
            lease,
            expected_instances: expected_instances.max(1),
            up: AtomicBool::new(true),
            switch: parking_lot::Mutex::new(Switch {
                at: None,
                held: HashMap::new(),
            }),
            last_error: parking_lot::Mutex::new(None),
            leases: AtomicU64::new(0),
            held: parking_lot::Mutex::new(HashMap::new()),
            released,
            notices,
            subscribed: parking_lot::Mutex::new(Subscribed::No),
        }))
    }

    /// Where the budget stands.
    pub fn state(&self) -> SharedState {
        let up = self.up.load(Ordering::Relaxed);
        SharedState {
            mode: if up { "redis" } else { "fallback" },
            expected_instances: self.expected_instances,
            last_error: if up {
                None
            } else {
                super::gate::lock(&self.last_error).clone()
            },
        }
    }

    /// True while Redis answers.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// The limits to keep locally: all of them while Redis answers (Redis
    /// keeps the shared ones), else this instance's share.
    pub fn local_limits(&self, limits: &Arc<Limits>) -> Arc<Limits> {
        if self.is_up() {
            return limits.clone();
        }
        Arc::new(limits.divided(self.expected_instances))
    }

    /// The limits and in-flight cap to keep locally for the key `prefix`
    /// (see the module notes on switching): all limits while Redis answers,
    /// this instance's share while it does not; for a while after a switch,
    /// fewer slots.
    pub(super) fn local_rules(&self, prefix: &str, limits: &Arc<Limits>) -> (Arc<Limits>, Cap) {
        let share = limits.divided(self.expected_instances).max_in_flight;
        let sw = super::gate::lock(&self.switch);
        let now = Instant::now();
        if self.is_up() {
            let settling = sw.at.is_some_and(|at| now < at + self.lease + REDIS_RETRY);
            if !settling || limits.max_in_flight == 0 {
                return (limits.clone(), None);
            }
            let l = Limits {
                max_in_flight: share,
                ..(**limits).clone()
            };
            return (Arc::new(l), None);
        }
        let l = Arc::new(limits.divided(self.expected_instances));
        let cap = match sw.at {
            Some(at) if limits.max_in_flight > 0 && now < at + self.lease => {
                let held = sw.held.get(prefix).copied().unwrap_or(0);
                Some((held.min(share), at + self.lease))
            }
            _ => None,
        };
        (l, cap)
    }

    fn result<T>(&self, r: redis::RedisResult<T>) -> Option<T> {
        match r {
            Ok(v) => {
                if !self.up.load(Ordering::Relaxed) {
                    let mut sw = super::gate::lock(&self.switch);
                    if !self.up.swap(true, Ordering::Relaxed) {
                        sw.at = Some(Instant::now());
                        sw.held.clear();
                        // A new server: listen again.
                        *super::gate::lock(&self.subscribed) = Subscribed::No;
                        tracing::info!("Redis answers again: the shared throttle budget is back");
                    }
                }
                Some(v)
            }
            Err(e) => {
                let text = e.to_string();
                let mut sw = super::gate::lock(&self.switch);
                if self.up.swap(false, Ordering::Relaxed) {
                    sw.at = Some(Instant::now());
                    sw.held = super::gate::lock(&self.held).clone();
                    tracing::warn!(error = %text, instances = self.expected_instances, "Redis unreachable: throttling with the local limits divided by throttle.expected_instances");
                }
                drop(sw);
                *super::gate::lock(&self.last_error) = Some(text);
                None
            }
        }
    }

    /// Wait for a shared start of `cost` for `prefix` (application and
    /// mailbox) under `limits`; the lease, if one was taken. `None` when
    /// Redis could not be asked (the attempt goes on under the fallback).
    pub(super) async fn acquire(
        self: &Arc<Self>,
        prefix: &str,
        limits: &Limits,
        cost: Cost,
    ) -> Option<Lease> {
        let member = format!(
            "{}:{}",
            self.instance,
            self.leases.fetch_add(1, Ordering::Relaxed)
        );
        let interval = if limits.messages_per_minute > 0 {
            ms(Duration::from_secs(60) / limits.messages_per_minute)
        } else {
            0
        };
        let (rq, rs) = limits.budget.map_or((0, 0), |(n, s)| (u64::from(n), ms(s)));
        let (bq, bs) = limits.bytes_budget.map_or((0, 0), |(n, s)| (n, ms(s)));
        let (cq, cs) = limits.recipients_budget.map_or((0, 0), |(n, s)| (n, ms(s)));
        let script = redis::Script::new(ACQUIRE);
        let poll = if self.subscribe().await {
            POLL_HEARD
        } else {
            POLL
        };
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            let mut conn = self.conn.clone();
            let r: redis::RedisResult<i64> = script
                .key(prefix)
                .arg(&member)
                .arg(ms(self.lease))
                .arg(limits.max_in_flight)
                .arg(ms(poll))
                .arg(interval)
                .arg(rq)
                .arg(rs)
                .arg(1)
                .arg(bq)
                .arg(bs)
                .arg(cost.bytes)
                .arg(cq)
                .arg(cs)
                .arg(cost.recipients)
                .invoke_async(&mut conn)
                .await;
            let wait = self.result(r)?;
            if wait <= 0 {
                return Some(Lease::start(self.clone(), prefix, member, limits));
            }
            let wait = Duration::from_millis(wait.unsigned_abs());
            if wait > poll {
                // A pause, the pacing or a budget: nothing to gain by asking sooner.
                tokio::time::sleep(wait).await;
            } else {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = &mut released => {}
                }
            }
        }
    }

    /// Pause `prefix` for every instance.
    pub(super) async fn pause(&self, prefix: &str, wait: Duration) {
        let mut conn = self.conn.clone();
        let r: redis::RedisResult<i64> = redis::Script::new(PAUSE)
            .key(prefix)
            .arg(ms(wait).max(1))
            .invoke_async(&mut conn)
            .await;
        self.result(r);
    }
}

/// A slot held in Redis while a request runs: renewed every third of its
/// lifetime, given back by [`Lease::release`] or when dropped (a killed
/// instance's lease expires).
pub(super) struct Lease {
    renew: Option<tokio::task::JoinHandle<()>>,
    release: Option<(Arc<Shared>, String, String)>,
}

impl Lease {
    fn start(shared: Arc<Shared>, prefix: &str, member: String, limits: &Limits) -> Lease {
        if limits.max_in_flight == 0 {
            return Lease {
                renew: None,
                release: None,
            };
        }
        *super::gate::lock(&shared.held)
            .entry(prefix.to_string())
            .or_default() += 1;
        let (s, p, m) = (shared.clone(), prefix.to_string(), member.clone());
        let renew = tokio::spawn(async move {
            let every = (s.lease / 3).max(Duration::from_millis(10));
            loop {
                tokio::time::sleep(every).await;
                let mut conn = s.conn.clone();
                let r: redis::RedisResult<i64> = redis::Script::new(RENEW)
                    .key(&p)
                    .arg(&m)
                    .arg(ms(s.lease))
                    .invoke_async(&mut conn)
                    .await;
                s.result(r);
            }
        });
        Lease {
            renew: Some(renew),
            release: Some((shared, prefix.to_string(), member)),
        }
    }

    /// Stop renewing and count the lease as no longer held here; what is
    /// left to remove in Redis.
    fn end(&mut self) -> Option<(Arc<Shared>, String, String)> {
        if let Some(r) = self.renew.take() {
            r.abort();
        }
        let (s, prefix, member) = self.release.take()?;
        {
            let mut held = super::gate::lock(&s.held);
            if let Some(n) = held.get_mut(&prefix) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    held.remove(&prefix);
                }
            }
        }
        Some((s, prefix, member))
    }

    /// Give the slot back in Redis and wait for the answer, so that the
    /// next start (often this instance's own next attempt) finds it free.
    pub(super) async fn release(mut self) {
        if let Some((s, prefix, member)) = self.end() {
            s.remove(&prefix, &member).await;
        }
    }
}

impl Shared {
    async fn remove(&self, prefix: &str, member: &str) {
        let mut conn = self.conn.clone();
        let r: redis::RedisResult<i64> = redis::Script::new(RELEASE)
            .key(prefix)
            .arg(member)
            .arg(RELEASED)
            .invoke_async(&mut conn)
            .await;
        self.result(r);
        self.released.notify_waiters();
    }

    /// Listen for the other instances' releases, once (the connection
    /// subscribes again by itself after a reconnect); whether they are heard.
    async fn subscribe(&self) -> bool {
        let now = Instant::now();
        match *super::gate::lock(&self.subscribed) {
            Subscribed::Yes => return true,
            Subscribed::FailedAt(at) if now < at + SUBSCRIBE_RETRY => return false,
            _ => {}
        }
        let mut conn = self.notices.clone();
        let r = tokio::time::timeout(TIMEOUT, conn.subscribe(RELEASED)).await;
        let ok = matches!(r, Ok(Ok(())));
        if let Ok(Err(e)) = &r {
            tracing::debug!(error = %e, "Redis pub/sub unavailable: waiting for shared slots by polling");
        }
        *super::gate::lock(&self.subscribed) = if ok {
            Subscribed::Yes
        } else {
            Subscribed::FailedAt(now)
        };
        ok
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some((s, prefix, member)) = self.end() else {
            return;
        };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { s.remove(&prefix, &member).await });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(lease: Duration) -> Arc<Shared> {
        // Lazy: nothing is sent to this address by these tests.
        Shared::new(
            "redis://127.0.0.1:1/0",
            "",
            &crate::common::Secret::new(""),
            3,
            lease,
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn down(s: &Shared) {
        let r: redis::RedisResult<()> = Err(std::io::Error::other("connection refused").into());
        assert!(s.result(r).is_none());
    }

    fn up(s: &Shared) {
        assert!(s.result(Ok(())).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn at_the_loss_only_the_slots_held_are_reused_for_one_lease_time() {
        let lease = Duration::from_secs(10);
        let s = shared(lease);
        let limits = Arc::new(Limits::graph(4, "desk@contoso.com"));
        *super::super::gate::lock(&s.held)
            .entry("m:a:".into())
            .or_default() = 3;
        *super::super::gate::lock(&s.held)
            .entry("m:b:".into())
            .or_default() = 1;
        // While Redis answers: all the limits, Redis keeps the shared ones.
        let (l, cap) = s.local_rules("m:a:", &limits);
        assert_eq!((l.max_in_flight, cap), (4, None));
        let t = Instant::now();
        down(&s);
        assert_eq!(s.state().mode, "fallback");
        // Mailbox a: 3 leases held, share 1: at most 1 (only once 2 of the
        // 3 requests started under leases have ended).
        let (l, cap) = s.local_rules("m:a:", &limits);
        assert_eq!((l.max_in_flight, cap), (1, Some((1, t + lease))));
        // Mailbox b: 1 held: 1. Mailbox c: none held: nothing new until
        // the others' leases are over.
        assert_eq!(s.local_rules("m:b:", &limits).1, Some((1, t + lease)));
        assert_eq!(s.local_rules("m:c:", &limits).1, Some((0, t + lease)));
        // Leases given back after the loss do not change the snapshot.
        super::super::gate::lock(&s.held).clear();
        assert_eq!(s.local_rules("m:a:", &limits).1, Some((1, t + lease)));
        // A second failure is not a new loss.
        tokio::time::advance(Duration::from_secs(5)).await;
        down(&s);
        assert_eq!(s.local_rules("m:c:", &limits).1, Some((0, t + lease)));
        // One lease time after the loss: the share alone.
        tokio::time::advance(Duration::from_secs(5)).await;
        let (l, cap) = s.local_rules("m:c:", &limits);
        assert_eq!((l.max_in_flight, cap), (1, None));
    }

    #[tokio::test(start_paused = true)]
    async fn when_redis_is_back_the_share_is_kept_for_a_lease_time_and_a_retry() {
        let lease = Duration::from_secs(10);
        let s = shared(lease);
        let limits = Arc::new(Limits::graph(4, "desk@contoso.com"));
        down(&s);
        tokio::time::advance(Duration::from_secs(30)).await;
        up(&s);
        assert_eq!(s.state().mode, "redis");
        let (l, cap) = s.local_rules("m:a:", &limits);
        assert_eq!((l.max_in_flight, cap), (1, None));
        // The budgets stay whole: Redis keeps them.
        assert_eq!(l.budget, limits.budget);
        tokio::time::advance(lease + REDIS_RETRY - Duration::from_millis(1)).await;
        assert_eq!(s.local_rules("m:a:", &limits).0.max_in_flight, 1);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(s.local_rules("m:a:", &limits).0.max_in_flight, 4);
        // No in-flight limit at all: nothing to keep.
        let open = Arc::new(Limits::none());
        down(&s);
        assert_eq!(s.local_rules("m:a:", &open).1, None);
    }
}
