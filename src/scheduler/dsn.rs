//! Delivery status notifications (RFC 3464 `multipart/report`) for recipients that failed for good.

use crate::message;
use crate::spool::{Meta, RcptStatus};

/// Build the DSN for the failed recipients of `meta`, whose message is
/// `original`. `now` is the RFC 5322 date to stamp.
pub fn build(meta: &Meta, original: &[u8], hostname: &str, now: &str, dsn_id: &str) -> Vec<u8> {
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
        human.push_str(&format!(
            "<{}>: {}\r\n",
            r.addr,
            one_line(r.last_error.as_deref().unwrap_or("failed"))
        ));
    }
    let mut status = String::new();
    status.push_str(&format!(
        "Reporting-MTA: dns; {hostname}\r\nX-Mailbridge-Queue-ID: {}\r\n",
        meta.id
    ));
    status.push_str(&format!("Arrival-Date: {}\r\n", rfc5322(meta.received_at)));
    for r in &failed {
        let text = one_line(r.last_error.as_deref().unwrap_or("failed"));
        // A give-up is reported as 4.4.7 (delivery time expired); everything else as a permanent 5.0.0.
        let code = if text.starts_with("gave up") {
            "4.4.7"
        } else {
            "5.0.0"
        };
        status.push_str(&format!(
            "\r\nFinal-Recipient: rfc822; {}\r\nAction: failed\r\nStatus: {code}\r\nDiagnostic-Code: smtp; {text}\r\n",
            r.addr
        ));
    }
    let (_, body_start) = message::fields(original);
    let headers = &original[..body_start.min(original.len())];
    let mut out = Vec::with_capacity(human.len() + status.len() + headers.len() + 1024);
    out.extend_from_slice(
        format!(
            "From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n\
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
        let d = build(
            &m,
            b"Subject: hello\r\nFrom: a@b\r\n\r\nsecret body\r\n",
            "relay.local",
            "Thu, 1 Jan 1970 00:00:00 +0000",
            "q1b",
        );
        let s = String::from_utf8(d).unwrap();
        assert!(s.contains("To: <app@legacy.local>\r\n"));
        assert!(s.contains("Content-Type: multipart/report; report-type=delivery-status;"));
        assert!(s.contains("Final-Recipient: rfc822; bad@x\r\nAction: failed\r\nStatus: 5.0.0\r\nDiagnostic-Code: smtp; 550 5.1.1 <bad@x>: user unknown\r\n"));
        assert!(!s.contains("rfc822; ok@x"));
        assert!(s.contains("Subject: hello\r\n"));
        assert!(!s.contains("secret body"), "only headers are returned");
        assert!(s.ends_with("--q1b/relay.local--\r\n"));
        assert!(!s.replace("\r\n", "").contains('\n'), "CRLF only");
    }
}
