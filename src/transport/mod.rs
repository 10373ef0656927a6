//! The one delivery interface every upstream (SMTP, file, Graph, EWS) implements, and the outcome types the scheduler and router branch on.

pub mod ews;
pub mod file;
pub mod graph;
pub mod smtp;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// A boxed future, so transports can sit behind `dyn Transport`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a transport is asked to deliver: one spooled message to some of its recipients.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// Queue id, for logs and for transports that name files after it.
    pub id: String,
    /// Envelope sender (`MAIL FROM`); empty for the null sender `<>`.
    pub from: String,
    /// Recipients still pending for this attempt, in envelope order.
    pub rcpts: Vec<String>,
    /// The upstream identity (mailbox) to send as, when a local user maps to
    /// one; `None` = the configured default identity.
    pub identity: Option<String>,
}

/// Whether retrying later can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Try again later (4xx, network trouble, throttling).
    Transient,
    /// Retrying will not help (5xx, permission denied); the sender gets a DSN.
    Permanent,
}

/// How far a failure reaches: this decides failover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The server itself is unusable (refused, timeout, TLS failure, 421,
    /// authentication rejected): the router may fail over to the alternate.
    Server,
    /// The server answered about this message or recipient: another server
    /// would not answer differently, so no failover.
    Message,
    /// The whole message was sent (SMTP: the final dot) and no reply came:
    /// the server may have accepted it. Failing over would deliver it twice
    /// (through both servers), so the router does not; the scheduler retries
    /// later through the same server, and the router logs `possible_duplicate`.
    MaybeDelivered,
}

/// A classified delivery failure. Transports build these from their own
/// protocol knowledge; nothing above a transport parses `text`.
#[derive(Debug, Clone)]
pub struct Failure {
    /// Retry later, or give up.
    pub severity: Severity,
    /// Whether the server or only this message is at fault.
    pub scope: Scope,
    /// Human-readable reason (the upstream's reply where there is one). Never
    /// contains credentials or tokens.
    pub text: String,
    /// The upstream asked us to wait at least this long (Retry-After,
    /// BackOffMilliseconds).
    pub not_before: Option<Duration>,
}

impl Failure {
    /// A transient failure of the server (failover-able).
    pub fn server(text: impl Into<String>) -> Self {
        Failure {
            severity: Severity::Transient,
            scope: Scope::Server,
            text: text.into(),
            not_before: None,
        }
    }
    /// A transient failure of this message only.
    pub fn transient(text: impl Into<String>) -> Self {
        Failure {
            severity: Severity::Transient,
            scope: Scope::Message,
            text: text.into(),
            not_before: None,
        }
    }
    /// A permanent failure of this message or recipient.
    pub fn permanent(text: impl Into<String>) -> Self {
        Failure {
            severity: Severity::Permanent,
            scope: Scope::Message,
            text: text.into(),
            not_before: None,
        }
    }
    /// A transient failure after the whole message was sent with no reply
    /// ([`Scope::MaybeDelivered`]): retried later, never failed over.
    pub fn maybe_delivered(text: impl Into<String>) -> Self {
        Failure {
            severity: Severity::Transient,
            scope: Scope::MaybeDelivered,
            text: text.into(),
            not_before: None,
        }
    }
    /// The same failure, with a minimum wait before the next attempt.
    pub fn with_not_before(mut self, wait: Duration) -> Self {
        self.not_before = Some(wait);
        self
    }
    /// True when the router should try the other server.
    pub fn fails_over(&self) -> bool {
        self.severity == Severity::Transient && self.scope == Scope::Server
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// Result of one attempt: `Err` when the whole attempt failed (nothing was
/// delivered), else one entry per recipient of the envelope, in order.
pub type Delivery = Result<Vec<Result<(), Failure>>, Failure>;

/// An upstream that can take a message. One implementation per protocol.
pub trait Transport: Send + Sync {
    /// Short description for status and logs, e.g. `smtp://smtp.office365.com:587`. No secrets.
    fn describe(&self) -> String;
    /// Deliver `message` (canonical CRLF, not dot-stuffed) to `env.rcpts`.
    fn deliver<'a>(&'a self, env: &'a Envelope, message: &'a [u8]) -> BoxFuture<'a, Delivery>;
    /// Check that the server is reachable and usable, without sending mail
    /// (used by the automatic failback probe).
    fn probe(&self) -> BoxFuture<'_, Result<(), Failure>>;
}
