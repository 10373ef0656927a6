//! The token managers of one upstream's OAuth settings with the browser sign-ins in progress ([`Registry`]), and the set of registries one process shares between routing, the admin endpoint and reloads ([`Registries`]).

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use super::flows::{self, LoginError, Pkce, Settings, TokenClient};
use super::manager::{APP_IDENTITY, Phase, TokenManager, TokenRequests};
use super::store::TokenStore;
use super::{IdentityTokens, TokenSource};
use crate::common::Secret;
use crate::config::{Config, Flow, Upstream};

/// How long a started browser sign-in may take.
const LOGIN_TTL: Duration = Duration::from_secs(600);
/// Sign-ins started and not finished, at most (older ones are dropped).
const MAX_PENDING_LOGINS: usize = 32;

/// A browser sign-in waiting for its callback.
struct PendingLogin {
    pkce: Pkce,
    identity: String,
    started: Instant,
}

/// The token managers of one upstream's OAuth settings, by identity, plus
/// the browser sign-ins in progress.
pub struct Registry {
    settings: Arc<Settings>,
    client: TokenClient,
    store: TokenStore,
    managers: Mutex<HashMap<String, Arc<TokenManager>>>,
    pending: Mutex<HashMap<String, PendingLogin>>,
}

impl Registry {
    /// A registry for `settings` (not shared; see [`Registries::shared`]).
    pub fn new(settings: Settings) -> Result<Arc<Registry>, String> {
        let http = settings.http_client()?;
        let settings = Arc::new(settings);
        Ok(Arc::new(Registry {
            client: TokenClient::new(settings.clone(), http),
            store: TokenStore::new(settings.store.clone()),
            settings,
            managers: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
        }))
    }

    /// The settings in use.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The token store.
    pub fn store(&self) -> &TokenStore {
        &self.store
    }

    /// The token endpoint client.
    pub fn client(&self) -> &TokenClient {
        &self.client
    }

    /// The identity used when none is named.
    pub fn default_identity(&self) -> &str {
        &self.settings.default_identity
    }

    fn key(&self, identity: &str) -> String {
        if self.settings.flow == Flow::ClientCredentials {
            APP_IDENTITY.to_string()
        } else if identity.is_empty() {
            self.settings.default_identity.to_ascii_lowercase()
        } else {
            identity.to_ascii_lowercase()
        }
    }

    /// The manager for `identity` (the default identity when empty). With
    /// client credentials every identity shares the one app-only token.
    pub fn manager(&self, identity: &str) -> Arc<TokenManager> {
        let key = self.key(identity);
        let mut m = self.managers.lock();
        m.entry(key.clone())
            .or_insert_with(|| {
                Arc::new(TokenManager::new(
                    key,
                    self.client.clone(),
                    self.store.clone(),
                ))
            })
            .clone()
    }

    /// Start a browser sign-in for `identity`: the provider URL to send the
    /// browser to (state single-use, valid 10 minutes, PKCE S256).
    pub fn start_login(&self, identity: Option<&str>) -> Result<String, String> {
        if self.settings.flow == Flow::ClientCredentials {
            return Err("flow = \"client_credentials\" needs no sign-in".into());
        }
        let identity = self.key(identity.unwrap_or(""));
        if identity.is_empty() {
            return Err(
                "no identity: set upstream.mailbox (or username) or pass ?identity=".into(),
            );
        }
        let pkce = Pkce::new();
        let state = flows::random_state();
        let url = flows::authorize_url(&self.settings, &state, &pkce.challenge, Some(&identity))?;
        let mut p = self.pending.lock();
        p.retain(|_, l| l.started.elapsed() < LOGIN_TTL);
        while p.len() >= MAX_PENDING_LOGINS {
            let Some(oldest) = p
                .iter()
                .min_by_key(|(_, l)| l.started)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            p.remove(&oldest);
        }
        p.insert(
            state,
            PendingLogin {
                pkce,
                identity,
                started: Instant::now(),
            },
        );
        Ok(url)
    }

    /// True when `state` belongs to a sign-in started here (and not expired).
    pub fn has_login(&self, state: &str) -> bool {
        let p = self.pending.lock();
        p.get(state)
            .is_some_and(|l| l.started.elapsed() < LOGIN_TTL)
    }

    /// Finish a browser sign-in: `state` must be one we issued (used once,
    /// within 10 minutes); the code is redeemed and the tokens stored.
    /// Returns the identity signed in.
    pub async fn finish_login(&self, state: &str, code: &Secret) -> Result<String, String> {
        let login = {
            let mut p = self.pending.lock();
            p.remove(state)
        };
        let Some(login) = login.filter(|l| l.started.elapsed() < LOGIN_TTL) else {
            return Err("unknown, expired or already used sign-in (state); start again".into());
        };
        let grant = self
            .client
            .exchange_code(code, &login.pkce.verifier)
            .await
            .map_err(|e| LoginError::from(e).to_string())?;
        self.manager(&login.identity).complete_login(grant).await;
        tracing::info!(identity = %login.identity, "OAuth sign-in completed");
        Ok(login.identity)
    }

    /// Forget a pending sign-in (the provider answered `error=`).
    pub fn cancel_login(&self, state: &str) -> bool {
        let mut p = self.pending.lock();
        p.remove(state).is_some()
    }

    /// Every identity's state: the default one, the configured users'
    /// mailboxes, those in the store and those asked for. Never a token.
    pub fn status(&self) -> serde_json::Value {
        let mut names: Vec<String> = Vec::new();
        if self.settings.flow == Flow::ClientCredentials {
            names.push(APP_IDENTITY.into());
        } else {
            if !self.settings.default_identity.is_empty() {
                names.push(self.key(""));
            }
            names.extend(self.settings.known_identities.iter().map(|i| self.key(i)));
            if let Ok(all) = self.store.all() {
                names.extend(all.into_keys());
            }
        }
        {
            let m = self.managers.lock();
            names.extend(m.keys().cloned());
        }
        names.sort();
        names.dedup();
        let stored = self.store.all().unwrap_or_default();
        let identities: Vec<serde_json::Value> = names
            .iter()
            .map(|n| {
                let existing = self
                    .managers
                    .lock()
                    .get(n)
                    .cloned();
                match existing {
                    Some(m) if m.phase() != Phase::Idle => m.status(),
                    _ => {
                        let (state, err) = match stored.get(n) {
                            _ if self.settings.flow == Flow::ClientCredentials => ("idle", None),
                            Some(g) if !g.refresh_token.is_empty() => ("ok", None),
                            Some(g) if g.reconsent.is_some() => {
                                ("reconsent_needed", g.reconsent.clone())
                            }
                            _ => ("needs_login", None),
                        };
                        json!({
                            "identity": n,
                            "state": state,
                            "access_token_expires_at": null,
                            "has_refresh_token": stored.get(n).is_some_and(|g| !g.refresh_token.is_empty()),
                            "last_error": err,
                            "retry_in_secs": null,
                            "token_requests": TokenRequests::default(),
                        })
                    }
                }
            })
            .collect();
        json!({
            "provider": format!("{:?}", self.settings.provider).to_lowercase(),
            "flow": match self.settings.flow {
                Flow::AuthorizationCode => "authorization_code",
                Flow::DeviceCode => "device_code",
                Flow::ClientCredentials => "client_credentials",
            },
            "token_endpoint": self.settings.endpoints.token,
            "identities": identities,
        })
    }
}

impl IdentityTokens for Registry {
    fn source(&self, identity: &str) -> Arc<dyn TokenSource> {
        self.manager(identity)
    }
}

/// The OAuth registries alive in one process, so routing, the admin
/// endpoint and a reload share one manager (and one refresh in flight) per
/// identity. `lib::run` creates it and hands it to each; a registry lives
/// as long as something that uses it does.
#[derive(Default)]
pub struct Registries {
    live: Mutex<Vec<Weak<Registry>>>,
}

impl Registries {
    /// No registry yet.
    pub fn new() -> Registries {
        Registries::default()
    }

    /// The registry for upstream table `u` of `cfg`: the live one with the
    /// same settings, else a new one.
    pub fn shared(&self, cfg: &Config, u: &Upstream) -> Result<Arc<Registry>, String> {
        let settings = Settings::from_upstream(cfg, u)?;
        let mut all = self.live.lock();
        all.retain(|w| w.strong_count() > 0);
        if let Some(r) = all
            .iter()
            .filter_map(Weak::upgrade)
            .find(|r| *r.settings() == settings)
        {
            return Ok(r);
        }
        let r = Registry::new(settings)?;
        all.push(Arc::downgrade(&r));
        Ok(r)
    }

    /// The registries a configuration needs, one per upstream table with
    /// `auth = "oauth"` (`upstream`, then `upstream.alternate`). Tables with
    /// identical OAuth settings share one registry. `Err` names the key.
    pub fn for_config(&self, cfg: &Config) -> Result<Vec<(&'static str, Arc<Registry>)>, String> {
        let mut out: Vec<(&'static str, Arc<Registry>)> = Vec::new();
        let tables = [
            ("upstream", Some(&cfg.upstream)),
            ("upstream.alternate", cfg.upstream.alternate.as_deref()),
        ];
        for (label, u) in tables {
            let Some(u) = u.filter(|u| u.uses_oauth()) else {
                continue;
            };
            let r = self.shared(cfg, u).map_err(|e| format!("{label}.{e}"))?;
            if !out.iter().any(|(_, o)| Arc::ptr_eq(o, &r)) {
                out.push((label, r));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &std::path::Path, client_id: &str, flow: &str) -> Config {
        let text = format!(
            "[spool]\npath = \"{}\"\n[upstream]\nprotocol = \"smtp\"\nserver = \"smtp.office365.com\"\nrequires_auth = true\nauth = \"oauth\"\nusername = \"A@contoso.com\"\n[upstream.oauth]\nclient_id = \"{client_id}\"\nclient_secret = \"s\"\nflow = \"{flow}\"\n",
            dir.display()
        );
        Config::from_toml(&text, "t.toml", dir).unwrap()
    }

    #[test]
    fn registries_share_equal_settings_and_let_unused_ones_go() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let all = Registries::new();
        let a = cfg(dir.path(), "cid", "authorization_code");
        let r1 = all.shared(&a, &a.upstream).unwrap();
        let r2 = all.shared(&a, &a.upstream).unwrap();
        assert!(Arc::ptr_eq(&r1, &r2));
        // Another set of registries (another process, a test) shares nothing.
        assert!(!Arc::ptr_eq(
            &r1,
            &Registries::new().shared(&a, &a.upstream).unwrap()
        ));
        let b = cfg(dir.path(), "other", "authorization_code");
        let r3 = all.shared(&b, &b.upstream).unwrap();
        assert!(!Arc::ptr_eq(&r1, &r3));
        let listed = all.for_config(&a).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].0, "upstream");
        assert!(Arc::ptr_eq(&listed[0].1, &r1));
        drop((r1, r2, r3, listed));
        // Nothing holds them any more: the next ask builds a new one.
        let r4 = all.shared(&a, &a.upstream).unwrap();
        assert_eq!(
            all.live
                .lock()
                .iter()
                .filter(|w| w.strong_count() > 0)
                .count(),
            1
        );
        drop(r4);
    }

    #[test]
    fn managers_by_identity_and_one_app_identity() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let all = Registries::new();
        let a = cfg(dir.path(), "cid", "authorization_code");
        let r = all.shared(&a, &a.upstream).unwrap();
        assert!(Arc::ptr_eq(&r.manager(""), &r.manager("a@CONTOSO.com")));
        assert!(!Arc::ptr_eq(&r.manager(""), &r.manager("b@contoso.com")));
        assert_eq!(r.manager("").identity(), "a@contoso.com");
        let app = cfg(dir.path(), "cid", "client_credentials");
        let r = all.shared(&app, &app.upstream).unwrap();
        assert!(Arc::ptr_eq(
            &r.manager("x@contoso.com"),
            &r.manager("y@contoso.com")
        ));
        assert_eq!(r.manager("").identity(), APP_IDENTITY);
        assert!(r.start_login(None).is_err());
    }
}
