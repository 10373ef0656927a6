//! Delivery status notifications (RFC 3464 `multipart/report`) for recipients that failed for good.

use crate::message;
use crate::outcome::{Enhanced, FailureClass};
use crate::spool::{Meta, Rcpt, RcptStatus};

/// The RFC 3464 `Status:` for a failed recipient: the enhanced code the
/// upstream gave (or the transport mapped), `4.4.7` when the queue lifetime
/// ran out, else `5.0.0`.
fn status_code(r: &Rcpt) -> Enhanced {
    match (r.class, r.enhanced) {
        (Some(FailureClass::Expired), _) => Enhanced::new(4, 4, 7),
        (_, Some(e)) if e.class == 5 => e,
        // A temporary code on a final failure (should not happen): the
        // detail is kept, the class says it is final.
        (_, Some(e)) if e.class == 4 => Enhanced::new(5, e.subject, e.detail),
        _ => Enhanced::new(5, 0, 0),
    }
}

/// Build the DSN for the failed recipients of `meta`, whose message is
/// `original`. `from` is the `From:` value (the sending mailbox, so that
/// the upstream lets it out), `now` the RFC 5322 date to stamp.
pub fn build(
    meta: &Meta,
    original: &[u8],
    hostname: &str,
    from: &str,
    now: &str,
    dsn_id: &str,
) -> Vec<u8> {
    let boundary = format!("{dsn_id}/{hostname}");
    let failed: Vec<_> = meta
        .rcpts
        .iter()
        .filter(|r| r.status == RcptStatus::Failed)
        .collect();
    let mut human = String::new();
    human.push_str("This is the mail system at host ");
    human.push_str(hostname);
    human.push_str(".\r\n\r\nYour message could not be delivered to one or more recipients.\r\n");
    human
        .push_str("It has been removed from the queue; nothing further will be attempted.\r\n\r\n");
    for r in &failed {
        let text = one_line(r.last_error.as_deref().unwrap_or("failed"));
        if r.class == Some(FailureClass::Expired) {
            human.push_str(&format!(
                "<{}>: delivery time expired after {} attempts; last answer: {text}\r\n",
                r.addr, meta.attempts
            ));
        } else {
            human.push_str(&format!("<{}>: {text}\r\n", r.addr));
        }
    }
    let mut status = String::new();
    status.push_str(&format!(
        "Reporting-MTA: dns; {hostname}\r\nX-Mailbridge-Queue-ID: {}\r\n",
        meta.id
    ));
    status.push_str(&format!("Arrival-Date: {}\r\n", rfc5322(meta.received_at)));
    for r in &failed {
        status.push_str(&format!(
            "\r\nFinal-Recipient: rfc822; {}\r\nAction: failed\r\nStatus: {}\r\n",
            r.addr,
            status_code(r)
        ));
        if let Some(text) = r.last_error.as_deref() {
            // `smtp` only for an SMTP server's own reply (RFC 3464 §2.3.6);
            // Graph and EWS answers are named as what they are.
            let kind = if r.reply_code.is_some() {
                "smtp"
            } else {
                "X-mailbridge"
            };
            status.push_str(&format!("Diagnostic-Code: {kind}; {}\r\n", one_line(text)));
        }
    }
    let (_, body_start) = message::fields(original);
    let headers = &original[..body_start.min(original.len())];
    let mut out = Vec::with_capacity(human.len() + status.len() + headers.len() + 1024);
    out.extend_from_slice(
        format!(
            "From: {from}\r\n\
             To: <{to}>\r\n\
             Subject: Undelivered Mail Returned to Sender\r\n\
             Date: {now}\r\n\
             Message-ID: <{dsn_id}@{hostname}>\r\n\
             Auto-Submitted: auto-replied\r\n\
             MIME-Version: 1.0\r\n\
             Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n\
             \r\n\
             This is a MIME-encapsulated message.\r\n\
             \r\n--{boundary}\r\n\
             Content-Type: text/plain; charset=utf-8\r\n\
             Content-Description: Notification\r\n\r\n",
            to = meta.from
        )
        .as_bytes(),
    );
    out.extend_from_slice(human.as_bytes());
    out.extend_from_slice(
        format!("\r\n--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n").as_bytes(),
    );
    out.extend_from_slice(status.as_bytes());
    out.extend_from_slice(
        format!("\r\n--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n").as_bytes(),
    );
    out.extend_from_slice(headers);
    if !headers.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// RFC 5322 date for Unix seconds.
pub fn rfc5322(unix: u64) -> String {
    chrono::DateTime::from_timestamp(unix as i64, 0)
        .map(|d| d.to_rfc2822())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_lists_failed_recipients_only() {
        let mut m = Meta::new(
            "q1".into(),
            "app@legacy.local".into(),
            vec!["ok@x".into(), "bad@x".into()],
            0,
            0,
        );
        m.rcpts[0].status = RcptStatus::Delivered;
        m.rcpts[1].status = RcptStatus::Failed;
        m.rcpts[1].last_error = Some("550 5.1.1 <bad@x>: user unknown".into());
        m.rcpts[1].reply_code = Some(550);
        m.rcpts[1].enhanced = Some(Enhanced::new(5, 1, 1));
        let d = build(
            &m,
            b"Subject: hello\r\nFrom: a@b\r\n\r\nsecret body\r\n",
            "relay.local",
            "\"Mail Delivery System\" <desk@contoso.com>",
            "Thu, 1 Jan 1970 00:00:00 +0000",
            "q1b",
        );
        let s = String::from_utf8(d).unwrap();
        assert!(s.contains("To: <app@legacy.local>\r\n"));
        assert!(s.contains("From: \"Mail Delivery System\" <desk@contoso.com>\r\n"));
        assert!(s.contains("Content-Type: multipart/report; report-type=delivery-status;"));
        assert!(s.contains("Final-Recipient: rfc822; bad@x\r\nAction: failed\r\nStatus: 5.1.1\r\nDiagnostic-Code: smtp; 550 5.1.1 <bad@x>: user unknown\r\n"));
        assert!(!s.contains("rfc822; ok@x"));
        assert!(s.contains("Subject: hello\r\n"));
        assert!(!s.contains("secret body"), "only headers are returned");
        assert!(s.ends_with("--q1b/relay.local--\r\n"));
        assert!(!s.replace("\r\n", "").contains('\n'), "CRLF only");
    }

    fn one_failed(f: impl FnOnce(&mut Rcpt)) -> String {
        let mut m = Meta::new("q2".into(), "app@x".into(), vec!["r@y".into()], 0, 0);
        m.rcpts[0].status = RcptStatus::Failed;
        f(&mut m.rcpts[0]);
        String::from_utf8(build(&m, b"Subject: s\r\n\r\n", "h", "<d@h>", "d", "q2b")).unwrap()
    }

    #[test]
    fn status_comes_from_the_outcome_record() {
        // Expiry: 4.4.7, with the last SMTP reply as the diagnostic.
        let s = one_failed(|r| {
            r.last_error = Some("451 4.3.0 try later".into());
            r.reply_code = Some(451);
            r.enhanced = Some(Enhanced::new(4, 4, 7));
            r.class = Some(FailureClass::Expired);
        });
        assert!(
            s.contains("Status: 4.4.7\r\nDiagnostic-Code: smtp; 451 4.3.0 try later\r\n"),
            "{s}"
        );
        assert!(s.contains("delivery time expired"), "{s}");
        // Graph permission error mapped to 5.7.1, not an SMTP reply.
        let s = one_failed(|r| {
            r.last_error = Some("Graph sendMail: 403 ErrorSendAsDenied: no".into());
            r.enhanced = Some(Enhanced::new(5, 7, 1));
            r.class = Some(FailureClass::Message);
        });
        assert!(s.contains("Status: 5.7.1\r\nDiagnostic-Code: X-mailbridge; Graph sendMail: 403 ErrorSendAsDenied: no\r\n"), "{s}");
        // Nothing better known: 5.0.0.
        let s = one_failed(|r| r.last_error = Some("gave up after 3 attempts".into()));
        assert!(s.contains("Status: 5.0.0\r\n"), "{s}");
    }
}
