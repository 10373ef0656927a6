//! The metadata kept beside each spooled message: envelope, per-recipient status and retry state, as human-readable JSON.

use serde::{Deserialize, Serialize};

use crate::outcome::{Enhanced, FailureClass};

/// Where one recipient stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RcptStatus {
    /// Not delivered yet; will be tried again.
    Pending,
    /// Accepted by the upstream.
    Delivered,
    /// Permanently failed or given up; reported in the DSN.
    Failed,
}

/// One envelope recipient.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rcpt {
    /// The address from `RCPT TO`.
    pub addr: String,
    /// Where it stands.
    pub status: RcptStatus,
    /// The last upstream answer for this recipient, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// What kind of failure `last_error` was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<FailureClass>,
    /// The upstream's SMTP reply code with `last_error`, if it was a reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_code: Option<u16>,
    /// The enhanced status code with `last_error` (`5.1.1`), the upstream's
    /// or mapped by the transport; `4.4.7` when the queue lifetime ran out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enhanced: Option<Enhanced>,
}

impl Rcpt {
    /// A pending recipient with no history.
    pub fn pending(addr: String) -> Rcpt {
        Rcpt {
            addr,
            status: RcptStatus::Pending,
            last_error: None,
            class: None,
            reply_code: None,
            enhanced: None,
        }
    }
}

/// A spooled message's metadata (`queue/<id>.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    /// Queue id (also the file names).
    pub id: String,
    /// Envelope sender; empty for `<>`.
    pub from: String,
    /// Envelope recipients and their status.
    pub rcpts: Vec<Rcpt>,
    /// Size of the `.eml` in bytes (a shorter file is a torn write).
    pub size: u64,
    /// When the message was accepted (Unix seconds).
    pub received_at: u64,
    /// Delivery attempts so far.
    pub attempts: u32,
    /// Earliest next attempt (Unix seconds).
    pub next_attempt: u64,
    /// The last failure, for `queue show` and status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The `Message-ID` header, for logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// The client that sent it (`ip:port`), for logs.
    #[serde(default)]
    pub client: String,
    /// The envelope used non-ASCII addresses (SMTPUTF8).
    #[serde(default)]
    pub smtputf8: bool,
    /// This message is a delivery status notification we generated.
    #[serde(default)]
    pub is_dsn: bool,
    /// The local user the client authenticated as, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_user: Option<String>,
    /// This DSN could not be delivered either: it stays in the queue, not
    /// retried, until an operator retries or deletes it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bounce_undeliverable: bool,
    /// A sample mail from the admin endpoint ("Send a sample mail"): tried
    /// once, then removed whatever the outcome (never retried, no DSN).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sample: bool,
}

impl Meta {
    /// Metadata for a newly accepted message, all recipients pending, due now.
    pub fn new(id: String, from: String, rcpts: Vec<String>, size: u64, now: u64) -> Meta {
        Meta {
            id,
            from,
            rcpts: rcpts.into_iter().map(Rcpt::pending).collect(),
            size,
            received_at: now,
            attempts: 0,
            next_attempt: now,
            last_error: None,
            message_id: None,
            client: String::new(),
            smtputf8: false,
            is_dsn: false,
            auth_user: None,
            bounce_undeliverable: false,
            sample: false,
        }
    }

    /// Sanity checks beyond the JSON shape.
    pub fn check(&self) -> Result<(), String> {
        if self.rcpts.is_empty() {
            return Err("no recipients".into());
        }
        if self.rcpts.iter().any(|r| r.addr.is_empty()) {
            return Err("empty recipient".into());
        }
        Ok(())
    }

    /// Where the message stands, for the queue list: `queued`, `deferred`
    /// (an attempt failed, more will follow) or `bounce_undeliverable`.
    pub fn state(&self) -> &'static str {
        if self.bounce_undeliverable {
            "bounce_undeliverable"
        } else if self.attempts > 0 {
            "deferred"
        } else {
            "queued"
        }
    }

    /// Recipients still to be delivered.
    pub fn pending(&self) -> Vec<String> {
        self.rcpts
            .iter()
            .filter(|r| r.status == RcptStatus::Pending)
            .map(|r| r.addr.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip() {
        let mut m = Meta::new(
            "id1".into(),
            "".into(),
            vec!["a@b".into(), "c@d".into()],
            10,
            5,
        );
        m.rcpts[1].status = RcptStatus::Failed;
        m.rcpts[1].last_error = Some("550 5.1.1 no".into());
        m.rcpts[1].class = Some(FailureClass::Message);
        m.rcpts[1].reply_code = Some(550);
        m.rcpts[1].enhanced = Some(Enhanced::new(5, 1, 1));
        let json = String::from_utf8(serde_json::to_vec(&m).unwrap()).unwrap();
        assert!(
            json.contains(r#""class":"message","reply_code":550,"enhanced":"5.1.1""#),
            "{json}"
        );
        let back: Meta = serde_json::from_slice(&serde_json::to_vec(&m).unwrap()).unwrap();
        assert_eq!(back.pending(), vec!["a@b".to_string()]);
        assert_eq!(back.rcpts[1].status, RcptStatus::Failed);
        assert_eq!(back.rcpts[1].enhanced, Some(Enhanced::new(5, 1, 1)));
        assert_eq!(back.rcpts[1].class, Some(FailureClass::Message));
        assert!(back.check().is_ok());
    }

    #[test]
    fn entries_written_before_outcome_records_still_load() {
        let old = r#"{"id":"q","from":"a@b","rcpts":[{"addr":"c@d","status":"failed","last_error":"550 no"}],"size":1,"received_at":0,"attempts":1,"next_attempt":0}"#;
        let m: Meta = serde_json::from_str(old).unwrap();
        assert_eq!(m.rcpts[0].last_error.as_deref(), Some("550 no"));
        assert_eq!((m.rcpts[0].class, m.rcpts[0].enhanced), (None, None));
    }
}
