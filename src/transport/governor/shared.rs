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
//! instances' clocks do not matter.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::ConnectionManager;

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
    last_error: parking_lot::Mutex<Option<String>>,
    leases: AtomicU64,
}

/// While a slot is busy elsewhere, look again this often (the other
/// instances' ends are not announced).
const POLL: Duration = Duration::from_millis(5);
/// Every Redis call gives up after this long (then: fallback).
const TIMEOUT: Duration = Duration::from_millis(500);

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
        info = info.set_redis_settings(redis_settings);
        let client = redis::Client::open(info).map_err(|e| format!("throttle.redis_url: {e}"))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| format!("throttle.redis_url: {e}"))?;
        Ok(Arc::new(Shared {
            conn,
            instance: format!("{:016x}", rand::random::<u64>()),
            lease,
            expected_instances: expected_instances.max(1),
            up: AtomicBool::new(true),
            last_error: parking_lot::Mutex::new(None),
            leases: AtomicU64::new(0),
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

    fn result<T>(&self, r: redis::RedisResult<T>) -> Option<T> {
        match r {
            Ok(v) => {
                if !self.up.swap(true, Ordering::Relaxed) {
                    tracing::info!("Redis answers again: the shared throttle budget is back");
                }
                Some(v)
            }
            Err(e) => {
                let text = e.to_string();
                if self.up.swap(false, Ordering::Relaxed) {
                    tracing::warn!(error = %text, instances = self.expected_instances, "Redis unreachable: throttling with the local limits divided by throttle.expected_instances");
                }
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
        loop {
            let mut conn = self.conn.clone();
            let r: redis::RedisResult<i64> = script
                .key(prefix)
                .arg(&member)
                .arg(ms(self.lease))
                .arg(limits.max_in_flight)
                .arg(ms(POLL))
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
            tokio::time::sleep(Duration::from_millis(wait.unsigned_abs())).await;
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
/// lifetime, given back when dropped (a killed instance's lease expires).
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
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(r) = self.renew.take() {
            r.abort();
        }
        let Some((s, prefix, member)) = self.release.take() else {
            return;
        };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let mut conn = s.conn.clone();
                let r: redis::RedisResult<i64> = redis::cmd("ZREM")
                    .arg(format!("{prefix}lease"))
                    .arg(&member)
                    .query_async(&mut conn)
                    .await;
                s.result(r);
            });
        }
    }
}
