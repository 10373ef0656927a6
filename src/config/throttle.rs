//! `[throttle]`: where the per-mailbox throttle budget lives: in this process (`local`), or shared in Redis by every instance sending as the same mailboxes (`redis`).

use serde::{Deserialize, Serialize};

use super::secret;
use crate::common::Secret;

/// Where the governors keep their budgets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// In this process only: right for one instance per mailbox.
    #[default]
    Local,
    /// In Redis, shared by every instance (leases for the in-flight limit,
    /// shared budget windows, pacing and pauses).
    Redis,
}

/// `[throttle]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Throttle {
    /// `local` or `redis`.
    pub backend: Backend,
    /// `redis://host:port/db` or `rediss://…` (TLS); no password in it.
    pub redis_url: String,
    /// Redis password (prefer `redis_password_env` / `redis_password_file`).
    pub redis_password: Secret,
    /// Environment variable holding the Redis password.
    pub redis_password_env: String,
    /// File holding the Redis password.
    pub redis_password_file: String,
    /// Redis user (ACL); empty = the default user.
    pub redis_username: String,
    /// How many instances share the mailboxes: while Redis is unreachable
    /// each keeps the limits divided by this.
    pub expected_instances: u32,
    /// Lifetime of an in-flight lease in Redis, renewed while its request
    /// runs; a killed instance's slots come back after at most this long.
    /// 0 = twice `upstream.timeout_secs`.
    pub lease_secs: u64,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle {
            backend: Backend::Local,
            redis_url: String::new(),
            redis_password: Secret::default(),
            redis_password_env: String::new(),
            redis_password_file: String::new(),
            redis_username: String::new(),
            expected_instances: 1,
            lease_secs: 0,
        }
    }
}

/// Check `[throttle]` and resolve its password; errors name the key.
pub fn validate(t: &mut Throttle, base: &std::path::Path) -> Result<(), (String, String)> {
    let bad = |k: &str, m: String| (format!("throttle.{k}"), m);
    if t.expected_instances == 0 {
        return Err(bad("expected_instances", "must be at least 1".into()));
    }
    t.redis_password = secret::resolve(
        "throttle.redis_password",
        t.redis_password.expose(),
        &t.redis_password_env,
        &t.redis_password_file,
        base,
    )
    .map_err(|m| ("throttle.redis_password".to_string(), m))?;
    if t.backend == Backend::Local {
        return Ok(());
    }
    if t.redis_url.is_empty() {
        return Err(bad(
            "redis_url",
            "is required when backend = \"redis\"".into(),
        ));
    }
    let url =
        url::Url::parse(&t.redis_url).map_err(|e| bad("redis_url", format!("not a URL: {e}")))?;
    if !matches!(url.scheme(), "redis" | "rediss") {
        return Err(bad(
            "redis_url",
            format!("scheme `{}`: use redis:// or rediss:// (TLS)", url.scheme()),
        ));
    }
    if url.password().is_some() {
        return Err(bad(
            "redis_url",
            "holds a password: put it in redis_password_env or redis_password_file".into(),
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("redis_url", "names no host".into()));
    }
    // What `run` will parse (e.g. the database number in the path).
    t.redis_url
        .parse::<redis::ConnectionInfo>()
        .map_err(|e| bad("redis_url", e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use std::path::Path;

    fn parse(t: &str) -> Result<Config, String> {
        Config::from_toml(t, "t.toml", Path::new(".")).map_err(|e| e.to_string())
    }

    #[test]
    fn local_by_default_and_redis_needs_a_clean_url() {
        let c = parse("").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.throttle.backend, super::Backend::Local);
        assert_eq!(c.throttle.expected_instances, 1);
        for (text, key) in [
            ("[throttle]\nbackend = \"redis\"\n", "throttle.redis_url"),
            (
                "[throttle]\nbackend = \"redis\"\nredis_url = \"redis://:secret@127.0.0.1:6379\"\n",
                "throttle.redis_url",
            ),
            (
                "[throttle]\nbackend = \"redis\"\nredis_url = \"http://127.0.0.1\"\n",
                "throttle.redis_url",
            ),
            (
                "[throttle]\nbackend = \"redis\"\nredis_url = \"redis://127.0.0.1/db-one\"\n",
                "throttle.redis_url",
            ),
            (
                "[throttle]\nexpected_instances = 0\n",
                "throttle.expected_instances",
            ),
            ("[throttle]\nbackend = \"memcached\"\n", "backend"),
            ("[throttle]\nredis = \"x\"\n", "redis"),
            (
                "[throttle]\nredis_password = \"a\"\nredis_password_env = \"B\"\n",
                "throttle.redis_password",
            ),
        ] {
            let e = parse(text).expect_err(text);
            assert!(e.contains(key), "{text}: {e}");
            assert!(!e.contains("secret"), "{e}");
        }
        let c = parse(
            "[throttle]\nbackend = \"redis\"\nredis_url = \"rediss://redis.internal:6380/2\"\nexpected_instances = 3\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.throttle.expected_instances, 3);
    }
}
