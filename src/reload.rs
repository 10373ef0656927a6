//! Live reload: re-read the configuration file, apply what can change without a restart, and name what cannot.
//!
//! SIGHUP and the admin page both go through one [`Reloader`]:
//! [`Reloader::reload`] reads the file, validates it as `run` does (nothing
//! changes when it fails) and applies it: the router and its transports
//! (servers, credentials, OAuth settings, throttle limits, with the active
//! route, its `since` and its reason kept), the delivery policy (retry
//! timing, concurrency, sender name, reply-to, user identities), the
//! inbound settings for new connections (users, `allow_clients`, domain
//! lists, TLS certificate, size and time limits) and `failback_probe_secs`.
//! Settings read once at start (listen addresses and connection limits,
//! spool path and size, admin address, token and host names, `[throttle]`,
//! logging) are
//! listed in [`ReloadReport::needs_restart`] and logged as warnings.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::inbound::{LiveSettings, Settings};
use crate::oauth::{Registries, Registry};
use crate::transport::governor::Governors;
use crate::{routing, scheduler};

/// What a reload did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReloadReport {
    /// Settings that changed in the file but take effect only after a
    /// restart (e.g. `listen.address`), by key.
    pub needs_restart: Vec<String>,
}

/// Re-reads one configuration file and applies it to the running relay.
#[derive(Clone)]
pub struct Reloader {
    inner: Arc<Inner>,
}

struct Inner {
    path: Option<PathBuf>,
    sched: scheduler::Scheduler,
    /// The configuration in force (the last one applied).
    current: Mutex<Arc<Config>>,
    /// The process's OAuth registries (one token manager per identity,
    /// kept across reloads).
    registries: Arc<Registries>,
    /// The process's governors (pauses, budgets and slots kept across
    /// reloads for an unchanged upstream application).
    governors: Arc<Governors>,
    /// The OAuth registries of the configuration in force, by upstream table.
    oauth: Mutex<Vec<(&'static str, Arc<Registry>)>>,
    probe_secs: watch::Sender<u64>,
    inbound: watch::Sender<Arc<Settings>>,
    /// The bound SMTP listeners: a new `allow_clients` or user list must
    /// still pass the open-relay check for them.
    listening: Vec<SocketAddr>,
    /// One reload at a time.
    busy: Mutex<()>,
}

impl Reloader {
    /// A reloader for the file at `path` (`None`: the relay runs without a
    /// file and [`Reloader::reload`] refuses), applying to `sched`, starting
    /// from the configuration `cfg` and inbound `settings` in force, for SMTP
    /// listeners bound to `listening`; routes are built with the OAuth
    /// identities of `registries` and keep their governors from `governors`.
    pub fn new(
        path: Option<PathBuf>,
        sched: scheduler::Scheduler,
        cfg: Config,
        settings: Arc<Settings>,
        listening: Vec<SocketAddr>,
        registries: Arc<Registries>,
        governors: Arc<Governors>,
    ) -> Result<Reloader, String> {
        let oauth = registries.for_config(&cfg)?;
        Ok(Reloader {
            inner: Arc::new(Inner {
                path,
                sched,
                probe_secs: watch::channel(cfg.upstream.failback_probe_secs).0,
                current: Mutex::new(Arc::new(cfg)),
                oauth: Mutex::new(oauth),
                registries,
                governors,
                inbound: watch::channel(settings).0,
                listening,
                busy: Mutex::new(()),
            }),
        })
    }

    /// The configuration file this reloader reads (empty without one).
    pub fn path(&self) -> &Path {
        self.inner.path.as_deref().unwrap_or(Path::new(""))
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        self.inner.current.lock().clone()
    }

    /// The OAuth registries of the configuration in force (the ones routing
    /// uses), by upstream table.
    pub fn oauth(&self) -> Vec<(&'static str, Arc<Registry>)> {
        self.inner.oauth.lock().clone()
    }

    /// The inbound settings for listeners: each new connection gets the
    /// ones in force.
    pub fn inbound_settings(&self) -> LiveSettings {
        LiveSettings::new(self.inner.inbound.subscribe())
    }

    /// `upstream.failback_probe_secs` as it changes.
    pub fn probe_secs(&self) -> watch::Receiver<u64> {
        self.inner.probe_secs.subscribe()
    }

    /// Read the file and apply it. On error nothing changes and the error
    /// names the key at fault. The report names the changed settings that
    /// need a restart (also logged as warnings).
    pub fn reload(&self) -> Result<ReloadReport, String> {
        let path = self
            .inner
            .path
            .as_deref()
            .ok_or("the relay runs without a configuration file; nothing to reload")?;
        let cfg = Config::load(path).map_err(|e| e.to_string())?;
        self.apply(cfg)
    }

    /// Apply `cfg` (already loaded and validated by [`Config::load`]).
    pub fn apply(&self, cfg: Config) -> Result<ReloadReport, String> {
        let _one = self.inner.busy.lock();
        // Everything is built before anything is replaced.
        let settings = Settings::from_config(&cfg)?;
        for a in &self.inner.listening {
            settings.check_exposure(*a)?;
        }
        let router =
            routing::from_config_with(&cfg, &self.inner.registries, &self.inner.governors)?;
        let oauth = self.inner.registries.for_config(&cfg)?;
        let policy = scheduler::Policy::from_config(&cfg);

        let old = self.config();
        router.resume(&self.inner.sched.router().state());
        self.inner.sched.reconfigure(Arc::new(router), policy);
        self.inner.inbound.send_replace(Arc::new(settings));
        self.inner
            .probe_secs
            .send_if_modified(|s| std::mem::replace(s, cfg.upstream.failback_probe_secs) != *s);
        *self.inner.oauth.lock() = oauth;
        let report = ReloadReport {
            needs_restart: needs_restart(&old, &cfg),
        };
        *self.inner.current.lock() = Arc::new(cfg);
        for key in &report.needs_restart {
            tracing::warn!(key = %key, "changed setting needs a restart; the running value stays");
        }
        Ok(report)
    }
}

/// The keys read only at start whose value differs between `old` and `new`.
pub fn needs_restart(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let mut check = |key: &str, changed: bool| {
        if changed {
            out.push(key.to_string());
        }
    };
    check("listen.address", old.listen.address != new.listen.address);
    check(
        "listen.implicit_tls_address",
        old.listen.implicit_tls_address != new.listen.implicit_tls_address,
    );
    check(
        "listen.max_connections",
        old.listen.max_connections != new.listen.max_connections,
    );
    check(
        "listen.max_connections_per_ip",
        old.listen.max_connections_per_ip != new.listen.max_connections_per_ip,
    );
    check(
        "spool.path",
        old.path(&old.spool.path) != new.path(&new.spool.path),
    );
    check(
        "spool.max_messages",
        old.spool.max_messages != new.spool.max_messages,
    );
    check("admin.address", old.admin.address != new.admin.address);
    check(
        "admin.token",
        old.admin.token.expose() != new.admin.token.expose()
            || old.admin.token_env != new.admin.token_env
            || old.admin.token_file != new.admin.token_file,
    );
    check(
        "admin.hostnames",
        old.admin.hostnames != new.admin.hostnames,
    );
    check(
        "admin.allow_remote",
        old.admin.allow_remote != new.admin.allow_remote,
    );
    let (a, b) = (&old.throttle, &new.throttle);
    check(
        "throttle",
        a.backend != b.backend
            || a.redis_url != b.redis_url
            || a.redis_username != b.redis_username
            || a.redis_password.expose() != b.redis_password.expose()
            || a.expected_instances != b.expected_instances
            || a.lease_secs != b.lease_secs,
    );
    check("log_level", old.log_level != new.log_level);
    check("log_format", old.log_format != new.log_format);
    out
}

/// Reload on every SIGHUP until `shutdown`.
pub async fn on_sighup(reloader: Reloader, shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; reload disabled");
        return;
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = hup.recv() => if r.is_none() { return },
        }
        match reloader.reload() {
            Ok(report) => {
                tracing::info!(config = %reloader.path().display(), needs_restart = ?report.needs_restart, "configuration reloaded")
            }
            Err(e) => {
                tracing::error!(error = %e, "reload failed; keeping the running configuration")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> Config {
        Config::from_toml(text, "config.toml", &std::env::temp_dir())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn restart_only_keys_are_named_and_others_are_not() {
        let old = cfg("[listen]\naddress = \"127.0.0.1:2525\"\n");
        let new = cfg(
            "[listen]\naddress = \"127.0.0.1:2526\"\nallowed_sender_domains = [\"a.test\"]\n[spool]\npath = \"elsewhere\"\n[delivery]\nretry_initial_secs = 7\n[upstream]\nfailback_probe_secs = 9\nsender_name = \"Office\"\n",
        );
        assert_eq!(needs_restart(&old, &new), ["listen.address", "spool.path"]);
        assert!(needs_restart(&new, &new).is_empty());
    }
}
