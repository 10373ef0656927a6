//! One token manager per identity: refresh ahead of expiry, one refresh in flight, rotation persisted, backoff, the re-consent state.

use parking_lot::Mutex;
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use super::flows::{Grant, TokenClient};
use super::store::{StoredGrant, TokenStore};
use super::{TokenError, TokenSource};
use crate::common::BoxFuture;
use crate::common::Secret;
use crate::config::Flow;

/// Refresh when less than this remains (or a tenth of the lifetime, if shorter).
const REFRESH_MARGIN: Duration = Duration::from_secs(300);
/// First wait after the token endpoint failed; doubles per failure.
const BACKOFF_FIRST: Duration = Duration::from_secs(30);
/// Longest wait between calls to a failing token endpoint.
const BACKOFF_MAX: Duration = Duration::from_secs(15 * 60);
/// The identity name of an app-only (client credentials) token.
pub const APP_IDENTITY: &str = "app";

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Where an identity stands, for status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Nothing known yet (no token asked for).
    Idle,
    /// A valid token is held or was last obtained.
    Ok,
    /// No refresh token: someone must sign in (`mailbridge auth login`).
    NeedsLogin,
    /// The grant was refused (`invalid_grant`): sign in again.
    ReconsentNeeded,
    /// The token endpoint is unreachable or failing; retrying with backoff.
    Unavailable,
    /// The provider refused our configuration (client, secret, scope).
    Config,
}

impl Phase {
    fn name(&self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Ok => "ok",
            Phase::NeedsLogin => "needs_login",
            Phase::ReconsentNeeded => "reconsent_needed",
            Phase::Unavailable => "unavailable",
            Phase::Config => "config_error",
        }
    }
}

struct Access {
    token: Secret,
    expires: Instant,
    lifetime: Duration,
    expires_unix: u64,
}

struct State {
    access: Option<Access>,
    /// The refresh token in use (as last read from or written to the store).
    refresh: Option<Secret>,
    phase: Phase,
    last_error: Option<String>,
    /// No call to the token endpoint before this.
    quiet_until: Option<Instant>,
    /// The wait after the next failure.
    next_backoff: Duration,
    /// The refused refresh token, so only a new sign-in ends the re-consent state.
    refused: Option<Secret>,
    /// The error returned while quiet.
    quiet_error: Option<TokenError>,
    /// Answers of the token endpoint so far (refresh and client credentials).
    requests: TokenRequests,
}

/// How the token endpoint answered this identity's refresh (or
/// client-credentials) requests, counted since the process started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TokenRequests {
    /// A token was issued.
    pub ok: u64,
    /// The endpoint was unreachable or failing.
    pub unavailable: u64,
    /// The provider refused our configuration (client, secret, scope).
    pub config_error: u64,
    /// The grant was refused: someone must sign in again.
    pub reconsent_needed: u64,
}

/// Tokens for one identity (a mailbox, or [`APP_IDENTITY`]).
pub struct TokenManager {
    identity: String,
    client: TokenClient,
    store: TokenStore,
    state: Mutex<State>,
    /// Held while talking to the token endpoint: one refresh in flight.
    refreshing: tokio::sync::Mutex<()>,
}

impl TokenManager {
    /// A manager for `identity` using `client` and the token `store`.
    pub fn new(identity: String, client: TokenClient, store: TokenStore) -> Self {
        TokenManager {
            identity,
            client,
            store,
            state: Mutex::new(State {
                access: None,
                refresh: None,
                phase: Phase::Idle,
                last_error: None,
                quiet_until: None,
                next_backoff: BACKOFF_FIRST,
                refused: None,
                quiet_error: None,
                requests: TokenRequests::default(),
            }),
            refreshing: tokio::sync::Mutex::new(()),
        }
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, State> {
        self.state.lock()
    }

    fn app_only(&self) -> bool {
        self.client.settings().flow == Flow::ClientCredentials
    }

    /// The held token if it is not due for refresh yet.
    fn fresh(&self) -> Option<Secret> {
        let st = self.lock();
        let a = st.access.as_ref()?;
        let margin = REFRESH_MARGIN.min(a.lifetime / 10);
        (Instant::now() + margin < a.expires).then(|| a.token.clone())
    }

    /// The held token if it has not expired (used when a refresh fails).
    fn still_valid(&self) -> Option<Secret> {
        let st = self.lock();
        let a = st.access.as_ref()?;
        (Instant::now() < a.expires).then(|| a.token.clone())
    }

    async fn read_store(&self) -> Result<Option<StoredGrant>, TokenError> {
        let store = self.store.clone();
        let id = self.identity.clone();
        match tokio::task::spawn_blocking(move || store.get(&id)).await {
            Ok(Ok(g)) => Ok(g),
            Ok(Err(e)) => Err(TokenError::Config(format!("token store: {e}"))),
            Err(e) => Err(TokenError::Unavailable(format!("token store reader: {e}"))),
        }
    }

    async fn write_store(&self, grant: StoredGrant) {
        let store = self.store.clone();
        let id = self.identity.clone();
        let path = store.path().display().to_string();
        match tokio::task::spawn_blocking(move || store.put(&id, grant)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(identity = %self.identity, store = %path, error = %e, "cannot write the token store; the new refresh token is kept in memory only")
            }
            Err(e) => {
                tracing::error!(identity = %self.identity, error = %e, "token store writer failed")
            }
        }
    }

    /// Remember a failure: phase, backoff, and one log line per change of state.
    fn failed(&self, err: &TokenError, refused: Option<Secret>) {
        let mut st = self.lock();
        let (phase, wait) = match err {
            TokenError::Unavailable(_) => (Phase::Unavailable, st.next_backoff),
            TokenError::Config(_) => (Phase::Config, st.next_backoff),
            TokenError::ReconsentNeeded(_) => {
                let phase = if refused.is_some() || st.refused.is_some() {
                    Phase::ReconsentNeeded
                } else {
                    Phase::NeedsLogin
                };
                (phase, Duration::ZERO)
            }
        };
        let text = err.to_string();
        if st.phase != phase || st.last_error.as_deref() != Some(text.as_str()) {
            match phase {
                Phase::ReconsentNeeded => {
                    tracing::error!(identity = %self.identity, error = %text, "OAuth grant refused: re-consent needed (run `mailbridge auth login`); mail is held until then")
                }
                Phase::NeedsLogin => {
                    tracing::warn!(identity = %self.identity, "no OAuth sign-in yet (run `mailbridge auth login`); mail is held until then")
                }
                _ => {
                    tracing::warn!(identity = %self.identity, error = %text, retry_in_secs = wait.as_secs(), "cannot get an OAuth token")
                }
            }
        }
        st.phase = phase;
        st.last_error = Some(text);
        if refused.is_some() {
            st.refused = refused;
            st.refresh = None;
        }
        if wait > Duration::ZERO {
            st.quiet_until = Some(Instant::now() + wait);
            st.next_backoff = (wait * 2).min(BACKOFF_MAX);
            st.quiet_error = Some(err.clone());
        }
    }

    /// Take a new grant into use: memory first, then the store (rotation).
    async fn install(&self, grant: Grant, refresh_used: Option<Secret>) {
        let new_refresh = grant.refresh_token.clone().or(refresh_used);
        let lifetime = grant.expires_in.min(crate::oauth::flows::MAX_LIFETIME);
        {
            let mut st = self.lock();
            st.access = Some(Access {
                token: grant.access_token,
                // `Grant` is public: clamp here too, so no lifetime overflows.
                expires: {
                    let now = Instant::now();
                    now.checked_add(lifetime).unwrap_or(now)
                },
                lifetime,
                expires_unix: now_unix().saturating_add(lifetime.as_secs()),
            });
            if st.phase != Phase::Ok && st.phase != Phase::Idle {
                tracing::info!(identity = %self.identity, "OAuth token obtained; delivery resumes");
            }
            st.phase = Phase::Ok;
            st.last_error = None;
            st.quiet_until = None;
            st.quiet_error = None;
            st.next_backoff = BACKOFF_FIRST;
            st.refused = None;
            st.refresh = new_refresh.clone();
        }
        if self.app_only() || grant.refresh_token.is_none() {
            // Nothing new to persist (app-only, or a provider that does not rotate).
            return;
        }
        if let Some(rt) = new_refresh {
            let s = self.client.settings();
            self.write_store(StoredGrant {
                refresh_token: rt,
                client_id: s.client_id.clone(),
                scope: grant.scope.unwrap_or_else(|| s.scope.clone()),
                updated_at: now_unix(),
                reconsent: None,
            })
            .await;
        }
    }

    /// Store a grant obtained by a sign-in (browser callback or device code).
    pub async fn complete_login(&self, grant: Grant) {
        let had_refresh = grant.refresh_token.is_some();
        self.install(grant, None).await;
        if !had_refresh && !self.app_only() {
            tracing::warn!(identity = %self.identity, "the provider sent no refresh token (missing offline_access / access_type=offline?); a new sign-in will be needed when the access token expires");
        }
    }

    async fn obtain(&self) -> Result<Secret, TokenError> {
        if let Some(t) = self.fresh() {
            return Ok(t);
        }
        let _one = self.refreshing.lock().await;
        // Another task may have refreshed while we waited.
        if let Some(t) = self.fresh() {
            return Ok(t);
        }
        if self.app_only() {
            self.quiet_check().await?;
            return self.fetch_app().await;
        }
        // The store is the truth for sign-ins done elsewhere (CLI, callback,
        // logout); read it before deciding what to do.
        let stored = self.read_store().await?;
        let refresh = {
            let mut st = self.lock();
            match stored {
                Some(g) if !g.refresh_token.is_empty() => {
                    if st.refused.as_ref() == Some(&g.refresh_token) {
                        None
                    } else {
                        if st.refresh.as_ref() != Some(&g.refresh_token)
                            && st.phase != Phase::Idle
                            && st.phase != Phase::Ok
                        {
                            // A new sign-in happened: start over.
                            st.quiet_until = None;
                            st.next_backoff = BACKOFF_FIRST;
                        }
                        st.refresh = Some(g.refresh_token.clone());
                        Some(g.refresh_token)
                    }
                }
                Some(g) => {
                    if let Some(why) = g.reconsent {
                        st.last_error.get_or_insert(why);
                        st.phase = Phase::ReconsentNeeded;
                    }
                    st.refresh = None;
                    None
                }
                None => {
                    // Logged out (or never in): forget what memory held.
                    st.refresh = None;
                    st.access = None;
                    None
                }
            }
        };
        let Some(refresh) = refresh else {
            let phase = self.lock().phase.clone();
            let err = if phase == Phase::ReconsentNeeded {
                TokenError::ReconsentNeeded(format!(
                    "the sign-in of {} was refused ({}); run `mailbridge auth login`",
                    self.identity,
                    self.lock().last_error.clone().unwrap_or_default()
                ))
            } else {
                TokenError::ReconsentNeeded(format!(
                    "no OAuth sign-in for {} yet; run `mailbridge auth login`",
                    self.identity
                ))
            };
            if phase != Phase::ReconsentNeeded {
                self.failed(&err, None);
            }
            return Err(err);
        };
        self.quiet_check().await?;
        let answer = self.client.refresh(&refresh).await;
        self.count(&answer);
        match answer {
            Ok(grant) => {
                let t = grant.access_token.clone();
                self.install(grant, Some(refresh)).await;
                Ok(t)
            }
            Err(e @ TokenError::ReconsentNeeded(_)) => {
                self.failed(&e, Some(refresh));
                let s = self.client.settings();
                self.write_store(StoredGrant {
                    refresh_token: Secret::default(),
                    client_id: s.client_id.clone(),
                    scope: s.scope.clone(),
                    updated_at: now_unix(),
                    reconsent: Some(e.to_string()),
                })
                .await;
                Err(e)
            }
            Err(e) => {
                self.failed(&e, None);
                // A token that has not expired yet still works meanwhile.
                self.still_valid().ok_or(e)
            }
        }
    }

    /// Count one answer of the token endpoint (for metrics and status).
    fn count<T>(&self, answer: &Result<T, TokenError>) {
        let mut st = self.lock();
        let c = &mut st.requests;
        match answer {
            Ok(_) => c.ok += 1,
            Err(TokenError::Unavailable(_)) => c.unavailable += 1,
            Err(TokenError::Config(_)) => c.config_error += 1,
            Err(TokenError::ReconsentNeeded(_)) => c.reconsent_needed += 1,
        }
    }

    /// `Err` while backing off after a failure (no call to the endpoint).
    async fn quiet_check(&self) -> Result<(), TokenError> {
        let st = self.lock();
        match (st.quiet_until, &st.quiet_error) {
            (Some(until), Some(e)) if Instant::now() < until => {
                let wait = until - Instant::now();
                Err(match e {
                    TokenError::Unavailable(t) => {
                        TokenError::Unavailable(format!("{t} (next try in {}s)", wait.as_secs()))
                    }
                    other => other.clone(),
                })
            }
            _ => Ok(()),
        }
    }

    async fn fetch_app(&self) -> Result<Secret, TokenError> {
        let answer = self.client.client_credentials().await;
        self.count(&answer);
        match answer {
            Ok(grant) => {
                let t = grant.access_token.clone();
                self.install(grant, None).await;
                Ok(t)
            }
            Err(e) => {
                self.failed(&e, None);
                self.still_valid().ok_or(e)
            }
        }
    }

    /// Forget the in-memory tokens (after `auth logout`).
    pub fn forget(&self) {
        let mut st = self.lock();
        st.access = None;
        st.refresh = None;
        st.phase = Phase::NeedsLogin;
    }

    /// This identity's state for `GET /status`: never a token.
    pub fn status(&self) -> serde_json::Value {
        let st = self.lock();
        let expires = st.access.as_ref().map(|a| a.expires_unix);
        let retry_in = st
            .quiet_until
            .map(|u| u.saturating_duration_since(Instant::now()).as_secs())
            .filter(|s| *s > 0);
        json!({
            "identity": self.identity,
            "state": st.phase.name(),
            "access_token_expires_at": expires,
            "has_refresh_token": st.refresh.is_some(),
            "last_error": st.last_error,
            "retry_in_secs": retry_in,
            "token_requests": st.requests,
        })
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.lock().phase.clone()
    }
}

impl TokenSource for TokenManager {
    fn token(&self) -> BoxFuture<'_, Result<Secret, TokenError>> {
        Box::pin(self.obtain())
    }

    fn invalidate(&self, rejected: &Secret) {
        let mut st = self.lock();
        if st.access.as_ref().is_some_and(|a| &a.token == rejected) {
            st.access = None;
        }
    }

    fn rejected(&self, why: &str) {
        let mut st = self.lock();
        let phase = if self.app_only() {
            Phase::Config
        } else {
            Phase::ReconsentNeeded
        };
        if st.phase != phase || st.last_error.as_deref() != Some(why) {
            if phase == Phase::Config {
                tracing::error!(identity = %self.identity, error = %why, "the upstream rejects this app's OAuth tokens, also fresh ones: grant the app the send permission for the mailbox (and admin consent); mail stays queued");
            } else {
                tracing::error!(identity = %self.identity, error = %why, "the upstream rejects this identity's OAuth tokens, also fresh ones: sign in again (`mailbridge auth login`) with an account and permissions that may send; mail stays queued");
            }
        }
        st.phase = phase;
        st.last_error = Some(why.to_string());
    }

    fn identity(&self) -> String {
        self.identity.clone()
    }
}

#[cfg(test)]
#[path = "manager_tests.rs"]
mod tests;
