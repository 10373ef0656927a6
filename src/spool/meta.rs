//! The metadata of each spooled message (envelope, per-recipient status and retry state) as human-readable JSON, and the sans-IO reader of the metadata line that opens a spool entry file.

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

/// A spooled message's metadata: the first line of `queue/<id>.msg`, or
/// `queue/<id>.json` beside it (which overrides that line).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    /// Queue id (also the file names).
    pub id: String,
    /// Envelope sender; empty for `<>`.
    pub from: String,
    /// Envelope recipients and their status.
    pub rcpts: Vec<Rcpt>,
    /// Size of the message in bytes, not counting the metadata line in
    /// front of it (a shorter file is a torn write).
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

/// The longest metadata line a spool entry may open with.
pub const MAX_HEAD_LINE: usize = 1024 * 1024;

/// The first line of a spool entry file for `meta`: its JSON on one line
/// (JSON escapes every control character inside strings, so the only
/// newline is the one that ends it).
pub fn head_line(meta: &Meta) -> Result<Vec<u8>, serde_json::Error> {
    let mut line = serde_json::to_vec(meta)?;
    line.push(b'\n');
    Ok(line)
}

/// The first line of a spool entry file that was started before its
/// metadata was known (a large message written as it arrived): an empty
/// line; the metadata is in the `.json` beside it.
pub const STUB_LINE: &[u8] = b"\n";

/// What the first bytes of a spool entry file say.
#[derive(Debug)]
pub enum Head {
    /// No newline yet: read more (up to [`MAX_HEAD_LINE`]).
    Incomplete,
    /// An empty first line: the metadata is in the `.json` beside it. The
    /// message starts at this offset.
    Stub(u64),
    /// The metadata line, and the offset where the message starts.
    Meta(Box<Meta>, u64),
}

/// Where the first line of `prefix` (the first bytes of a spool entry
/// file) ends: the offset just past its newline, `None` when there is no
/// newline yet (read more), an error past [`MAX_HEAD_LINE`].
pub fn line_end(prefix: &[u8]) -> Result<Option<u64>, String> {
    match prefix.iter().take(MAX_HEAD_LINE).position(|&b| b == b'\n') {
        Some(nl) => Ok(Some(nl as u64 + 1)),
        None if prefix.len() >= MAX_HEAD_LINE => Err(format!(
            "no metadata line in the first {MAX_HEAD_LINE} bytes"
        )),
        None => Ok(None),
    }
}

/// Read the metadata line at the start of `prefix` (the first bytes of a
/// spool entry file). Sans-IO: the caller reads, this decides.
pub fn parse_head(prefix: &[u8]) -> Result<Head, String> {
    let Some(start) = line_end(prefix)? else {
        return Ok(Head::Incomplete);
    };
    if start == 1 {
        return Ok(Head::Stub(start));
    }
    let line = &prefix[..start as usize - 1];
    let meta: Meta = serde_json::from_slice(line).map_err(|e| format!("bad metadata: {e}"))?;
    Ok(Head::Meta(Box::new(meta), start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_line_round_trip() {
        let mut m = Meta::new("id1".into(), "a@b".into(), vec!["c@d".into()], 3, 5);
        m.last_error = Some("451 line\r\nbreak".into());
        let mut file = head_line(&m).unwrap();
        let line_len = file.len() as u64;
        assert_eq!(file.iter().filter(|&&b| b == b'\n').count(), 1);
        file.extend_from_slice(b"x\r\n");
        match parse_head(&file).unwrap() {
            Head::Meta(back, start) => {
                assert_eq!(start, line_len);
                assert_eq!(back.last_error, m.last_error);
                assert_eq!(back.size, 3);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(parse_head(&file[..10]), Ok(Head::Incomplete)));
        assert!(matches!(parse_head(b"\nFrom: x\r\n"), Ok(Head::Stub(1))));
        assert!(parse_head(b"{\"id\":\n").is_err());
        assert!(
            parse_head(b"Received: from x\r\n").is_err(),
            "an old body is no entry"
        );
        assert!(parse_head(&vec![b' '; MAX_HEAD_LINE]).is_err());
    }

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
