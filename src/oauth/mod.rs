//! OAuth2 access tokens for upstreams: the `TokenSource` interface transports ask through (so each stays ignorant of flows and refresh), and behind it the per-identity token managers and the registries that hold them, the flows, the providers' quirks and the token store.

pub mod assertion;
pub mod flows;
pub mod manager;
pub mod provider;
pub mod registry;
pub mod store;

use std::sync::Arc;

use crate::common::{BoxFuture, Secret};

pub use manager::TokenManager;
pub use registry::{Registries, Registry};

/// Why no token could be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    /// The token endpoint is unreachable or answered 5xx/429: mail waits and
    /// the refresh is retried with backoff.
    #[error("token endpoint unavailable: {0}")]
    Unavailable(String),
    /// The grant is expired or revoked (`invalid_grant`): an operator must
    /// consent again (`mailbridge auth login`); mail is held, not bounced.
    #[error("re-consent needed: {0}")]
    ReconsentNeeded(String),
    /// The identity is misconfigured (wrong client id/secret, scope, tenant).
    #[error("OAuth configuration problem: {0}")]
    Config(String),
}

/// A source of bearer tokens for one identity.
pub trait TokenSource: Send + Sync {
    /// A currently valid access token, refreshed first when it is about to expire.
    fn token(&self) -> BoxFuture<'_, Result<Secret, TokenError>>;
    /// The upstream rejected `rejected`: the next `token()` must fetch a new one.
    fn invalidate(&self, rejected: &Secret);
    /// The upstream rejected a token again right after a refresh: show
    /// `why` in the identity's state (re-consent for a signed-in identity,
    /// configuration for an app-only one) until a new token is obtained.
    fn rejected(&self, why: &str) {
        let _ = why;
    }
    /// The identity's name for logs and status (e.g. the mailbox), never a secret.
    fn identity(&self) -> String;
}

/// A fixed token (for tests and for tokens managed outside mailbridge).
#[derive(Debug, Clone)]
pub struct StaticToken {
    /// The token handed out.
    pub token: Secret,
    /// Name for logs.
    pub identity: String,
}

impl TokenSource for StaticToken {
    fn token(&self) -> BoxFuture<'_, Result<Secret, TokenError>> {
        let t = self.token.clone();
        Box::pin(async move { Ok(t) })
    }
    fn invalidate(&self, _: &Secret) {}
    fn identity(&self) -> String {
        self.identity.clone()
    }
}

/// Token sources by identity: the Basic-to-OAuth bridge sends a local
/// user's mail as that user's mailbox, with that mailbox's tokens.
pub trait IdentityTokens: Send + Sync {
    /// The token source for `identity` (a mailbox); empty = the default identity.
    fn source(&self, identity: &str) -> Arc<dyn TokenSource>;
}
