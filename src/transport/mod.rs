//! The one delivery interface every upstream (SMTP, file, Graph, EWS) implements, and the outcome types the scheduler and router branch on.

pub mod body;
pub mod ews;
pub mod file;
pub mod governor;
pub mod graph;
pub mod smtp;

use std::time::Duration;

use crate::common::BoxFuture;
pub use crate::outcome::{Enhanced, FailureClass};
pub use body::Body;

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
    /// This route cannot carry this message (e.g. too large for Graph): the
    /// router tries the next route for this message only and does not switch
    /// the active route. With no other route it counts as a message failure.
    Route,
    /// The whole message was sent (SMTP: the final dot) and no reply came:
    /// the server may have accepted it. Failing over would deliver it twice
    /// (through both servers), so the router does not; the scheduler retries
    /// later through the same server, and the router logs `possible_duplicate`.
    MaybeDelivered,
}

/// The enhanced status code for an Exchange error code, as Graph (`error.code`)
/// and EWS (`ResponseCode`) name them; `None` for codes without a good match
/// (the DSN then says `5.0.0` or `4.0.0`).
pub fn exchange_error_status(code: &str) -> Option<Enhanced> {
    Some(match code {
        "ErrorSendAsDenied"
        | "ErrorAccessDenied"
        | "ErrorSubmissionQuotaExceeded"
        | "Authorization_RequestDenied" => Enhanced::new(5, 7, 1),
        "ErrorInvalidUser"
        | "ErrorNonExistentMailbox"
        | "ErrorInvalidRecipients"
        | "ErrorRecipientNotFound"
        | "MailboxNotEnabledForRESTAPI"
        | "ResourceNotFound" => Enhanced::new(5, 1, 1),
        "ErrorInvalidSmtpAddress" | "ErrorInvalidEmailAddress" => Enhanced::new(5, 1, 3),
        "ErrorMessageSizeExceeded" | "RequestEntityTooLarge" => Enhanced::new(5, 3, 4),
        "ErrorQuotaExceeded" => Enhanced::new(5, 2, 2),
        "ErrorMimeContentInvalid"
        | "ErrorMimeContentInvalidBase64String"
        | "ErrorMimeContentConversionFailed" => Enhanced::new(5, 6, 0),
        "ErrorServerBusy"
        | "ErrorExceededConnectionCount"
        | "TooManyRequests"
        | "ApplicationThrottled"
        | "MailboxConcurrency" => Enhanced::new(4, 7, 0),
        "ErrorMailboxStoreUnavailable" | "ErrorMailboxMoveInProgress" => Enhanced::new(4, 2, 0),
        _ => return None,
    })
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
    /// The upstream's SMTP reply code, when the failure is an SMTP reply.
    pub reply_code: Option<u16>,
    /// The enhanced status code: the upstream's own (SMTP), or mapped from
    /// the protocol's error code (Graph, EWS) by the transport.
    pub enhanced: Option<Enhanced>,
    /// The upstream throttled the mailbox (its budget, not this message):
    /// the scheduler retries without counting an attempt towards backoff.
    pub throttled: bool,
}

impl Failure {
    /// A transient failure of the server (failover-able).
    pub fn server(text: impl Into<String>) -> Self {
        Failure {
            severity: Severity::Transient,
            scope: Scope::Server,
            text: text.into(),
            not_before: None,
            reply_code: None,
            enhanced: None,
            throttled: false,
        }
    }
    /// A transient failure of this message only.
    pub fn transient(text: impl Into<String>) -> Self {
        Failure {
            severity: Severity::Transient,
            scope: Scope::Message,
            text: text.into(),
            not_before: None,
            reply_code: None,
            enhanced: None,
            throttled: false,
        }
    }
    /// A permanent failure of this message or recipient.
    pub fn permanent(text: impl Into<String>) -> Self {
        Failure {
            severity: Severity::Permanent,
            scope: Scope::Message,
            text: text.into(),
            not_before: None,
            reply_code: None,
            enhanced: None,
            throttled: false,
        }
    }
    /// This route cannot carry this message (see [`Scope::Route`]); permanent
    /// when no other route takes it.
    pub fn route(text: impl Into<String>) -> Self {
        Failure {
            scope: Scope::Route,
            ..Failure::permanent(text)
        }
    }
    /// Throttling by the upstream: transient for this message, with the wait
    /// it asked for (the governor pauses the mailbox).
    pub fn throttled(text: impl Into<String>, wait: Duration) -> Self {
        Failure {
            throttled: true,
            ..Failure::transient(text).with_not_before(wait)
        }
    }
    /// The same failure, with the upstream's SMTP reply code and enhanced
    /// status code.
    pub fn with_reply(mut self, code: u16, enhanced: Option<Enhanced>) -> Self {
        self.reply_code = Some(code);
        if enhanced.is_some() {
            self.enhanced = enhanced;
        }
        self
    }
    /// The same failure, with an enhanced status code (mapped by the transport).
    pub fn with_enhanced(mut self, enhanced: Enhanced) -> Self {
        self.enhanced = Some(enhanced);
        self
    }
    /// The same failure, marked as throttling (see [`Failure::throttled`]).
    pub fn as_throttling(mut self) -> Self {
        self.throttled = true;
        self
    }
    /// The class kept in the spool.
    pub fn class(&self) -> FailureClass {
        if self.throttled {
            FailureClass::Throttled
        } else {
            match self.scope {
                Scope::Server | Scope::MaybeDelivered => FailureClass::Server,
                Scope::Message => FailureClass::Message,
                Scope::Route => FailureClass::Route,
            }
        }
    }
    /// A transient failure after the whole message was sent with no reply
    /// ([`Scope::MaybeDelivered`]): retried later, never failed over.
    pub fn maybe_delivered(text: impl Into<String>) -> Self {
        Failure {
            scope: Scope::MaybeDelivered,
            ..Failure::transient(text)
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
    /// Deliver `message` (canonical CRLF, not dot-stuffed) to `env.rcpts`,
    /// reading it in chunks (see [`Body`]): nothing here holds a whole
    /// message in memory.
    fn deliver<'a>(&'a self, env: &'a Envelope, message: &'a Body) -> BoxFuture<'a, Delivery>;
    /// The request bytes delivering `message` will upload, for a governor's
    /// byte budget (Graph: 150 MB per 5 minutes). An estimate that must not
    /// be low, from the message's size (nothing is read); the default is
    /// that size.
    fn request_bytes(&self, message: &Body) -> u64 {
        message.len()
    }
    /// Check that the server is reachable and usable, without sending mail
    /// (used by the automatic failback probe).
    fn probe(&self) -> BoxFuture<'_, Result<(), Failure>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        assert_eq!(Failure::server("x").class(), FailureClass::Server);
        assert_eq!(Failure::permanent("x").class(), FailureClass::Message);
        assert_eq!(Failure::route("x").class(), FailureClass::Route);
        let t = Failure::throttled("429", Duration::from_secs(3));
        assert_eq!(
            (t.class(), t.not_before, t.fails_over()),
            (FailureClass::Throttled, Some(Duration::from_secs(3)), false)
        );
        assert!(!Failure::route("x").fails_over());
    }
}
