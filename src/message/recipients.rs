//! Graph and EWS take recipients from the MIME headers, not from an envelope: this rewrites To/Cc/Bcc so exactly the envelope recipients receive the message, and defuses `From:` display names Graph rejects.
//!
//! The envelope is authoritative: only envelope recipients may receive the
//! message, each exactly once, and Bcc recipients must stay hidden.
//!
//! - A `To:`/`Cc:` field whose addresses are all envelope recipients (the
//!   usual case) is kept byte for byte.
//! - A `To:`/`Cc:` field naming someone who is *not* an envelope recipient
//!   is rewritten to list only the addresses that are (display names kept);
//!   when none is left the field is dropped. Such addresses occur when an
//!   application sends one transaction per recipient with the full list in
//!   `To:`, or when an earlier attempt over another route already delivered
//!   to some recipients: Graph would mail them (again). What the others see
//!   changes; who receives the message does not.
//! - Every `Bcc:` field is removed and one new `Bcc:` lists exactly the
//!   envelope recipients not shown in `To:`/`Cc:` (as SMTP2Graph does;
//!   Exchange removes `Bcc:` before delivery, so they stay hidden).
//! - A `From:` display name containing `@` makes Graph answer
//!   `ErrorSendAsDenied` (SMTP2Graph #28): a name equal to the address is
//!   dropped, any other has its `@` written as ` at `.

use std::collections::HashSet;

use mail_parser::{Address, MessageParser};

use crate::message::{clean_display_name, fields_separated, format_mailbox};

/// One address with its optional display name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mailbox {
    /// Display name, decoded.
    pub name: Option<String>,
    /// The address.
    pub address: String,
}

/// The message as Graph should see it, and who it goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// The message with the rewritten header.
    pub message: Vec<u8>,
    /// `To:` recipients after the rewrite.
    pub to: Vec<Mailbox>,
    /// `Cc:` recipients after the rewrite.
    pub cc: Vec<Mailbox>,
    /// Envelope recipients in neither `To:` nor `Cc:` (the new `Bcc:`).
    pub bcc: Vec<Mailbox>,
    /// The (sanitized) `From:`, if the message has one.
    pub from: Option<Mailbox>,
}

/// The addresses of one raw header field (`Name: value CRLF`), display
/// names decoded and cleaned ([`clean_display_name`]: no control character
/// survives, so a name can be written back into a header or JSON safely).
pub(crate) fn parse_addresses(raw_field: &[u8]) -> Vec<Mailbox> {
    let mut raw = raw_field.to_vec();
    if !raw.ends_with(b"\n") {
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"\r\n");
    let Some(m) = MessageParser::new().parse_headers(&raw) else {
        return Vec::new();
    };
    let Some(h) = m.headers().first() else {
        return Vec::new();
    };
    let list: Vec<&mail_parser::Addr> = match h.value().as_address() {
        Some(Address::List(l)) => l.iter().collect(),
        Some(Address::Group(g)) => g.iter().flat_map(|g| g.addresses.iter()).collect(),
        None => Vec::new(),
    };
    list.into_iter()
        .filter_map(|a| {
            let address = a.address()?.trim().to_string();
            (!address.is_empty()).then(|| Mailbox {
                name: a.name().map(clean_display_name).filter(|n| !n.is_empty()),
                address,
            })
        })
        .collect()
}

fn render(name: &str, list: &[Mailbox]) -> Vec<u8> {
    let mut out = format!("{name}:");
    let mut line = out.len();
    for (i, m) in list.iter().enumerate() {
        let item = format_mailbox(m.name.as_deref().unwrap_or(""), &m.address);
        let item = if m.name.is_none() {
            m.address.clone()
        } else {
            item
        };
        let sep = if i + 1 < list.len() { "," } else { "" };
        if line + item.len() + 2 > 78 && i > 0 {
            out.push_str("\r\n");
            line = 0;
        }
        out.push(' ');
        out.push_str(&item);
        out.push_str(sep);
        // A long encoded name is folded inside the item: count from its last line.
        line = match item.rfind("\r\n") {
            Some(p) => item.len() - p - 2 + sep.len(),
            None => line + item.len() + 2,
        };
    }
    out.push_str("\r\n");
    out.into_bytes()
}

fn sanitize_from(m: &Mailbox) -> Option<Mailbox> {
    let name = m.name.as_deref()?;
    if !name.contains('@') {
        return None;
    }
    let name = if name
        .trim_matches(['"', '\'', ' '])
        .eq_ignore_ascii_case(&m.address)
    {
        None
    } else {
        Some(name.replace('@', " at "))
    };
    Some(Mailbox {
        name,
        address: m.address.clone(),
    })
}

/// Rewrite `message` (canonical CRLF) for delivery to exactly `rcpts`.
pub fn prepare(message: &[u8], rcpts: &[String]) -> Prepared {
    let (fs, _, separated) = fields_separated(message);
    let envelope: HashSet<String> = rcpts.iter().map(|r| r.to_ascii_lowercase()).collect();
    let mut out = Vec::with_capacity(message.len() + 256);
    let mut shown: HashSet<String> = HashSet::new();
    let (mut to, mut cc) = (Vec::new(), Vec::new());
    let mut from = None;
    let mut pos = 0;
    for f in &fs {
        out.extend_from_slice(&message[pos..f.start]);
        pos = f.end;
        let raw = &message[f.start..f.end];
        let name = f.name.to_ascii_lowercase();
        match name.as_str() {
            "to" | "cc" => {
                let addrs = parse_addresses(raw);
                let keep: Vec<Mailbox> = addrs
                    .iter()
                    .filter(|a| envelope.contains(&a.address.to_ascii_lowercase()))
                    .cloned()
                    .collect();
                if keep.len() == addrs.len() {
                    out.extend_from_slice(raw);
                } else if !keep.is_empty() {
                    out.extend_from_slice(&render(&f.name, &keep));
                }
                for a in &keep {
                    shown.insert(a.address.to_ascii_lowercase());
                }
                if name == "to" { &mut to } else { &mut cc }.extend(keep);
            }
            "bcc" => {}
            "from" if from.is_none() => {
                let parsed = parse_addresses(raw).into_iter().next();
                match parsed.as_ref().and_then(sanitize_from) {
                    Some(clean) => {
                        out.extend_from_slice(
                            format!(
                                "{}: {}\r\n",
                                f.name,
                                format_mailbox(clean.name.as_deref().unwrap_or(""), &clean.address)
                            )
                            .as_bytes(),
                        );
                        from = Some(clean);
                    }
                    None => {
                        out.extend_from_slice(raw);
                        from = parsed;
                    }
                }
            }
            _ => out.extend_from_slice(raw),
        }
    }
    let mut seen = HashSet::new();
    let bcc: Vec<Mailbox> = rcpts
        .iter()
        .filter(|r| {
            let l = r.to_ascii_lowercase();
            !shown.contains(&l) && seen.insert(l)
        })
        .map(|r| Mailbox {
            name: None,
            address: r.clone(),
        })
        .collect();
    if !bcc.is_empty() {
        if !out.is_empty() && !out.ends_with(b"\n") {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(&render("Bcc", &bcc));
    }
    // A header that ended at a line that is not a field gets its empty line:
    // Graph's lenient parser would otherwise read a `To:` further down as a
    // field, past the envelope.
    if !separated {
        if !out.is_empty() && !out.ends_with(b"\n") {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }
    // The empty line and the body, untouched (the new Bcc ends the header).
    out.extend_from_slice(&message[pos..]);
    Prepared {
        message: out,
        to,
        cc,
        bcc,
        from,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rc(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn text(p: &Prepared) -> String {
        String::from_utf8_lossy(&p.message).into_owned()
    }

    #[test]
    fn to_and_cc_in_the_envelope_are_kept_byte_for_byte() {
        let m = b"From: App <app@x.test>\r\nTo: Boss <Boss@Example.com>,\r\n b@example.com\r\nCc: c@example.com\r\nSubject: s\r\n\r\nbody\r\n";
        let p = prepare(
            m,
            &rc(&["boss@example.com", "b@example.com", "c@example.com"]),
        );
        assert_eq!(p.message, m.to_vec());
        assert!(p.bcc.is_empty());
        assert_eq!(p.to.len(), 2);
        assert_eq!(p.to[0].name.as_deref(), Some("Boss"));
    }

    #[test]
    fn envelope_only_recipients_become_one_bcc_and_old_bcc_goes() {
        let m = b"To: a@example.com\r\nBcc: old@example.com\r\nSubject: s\r\n\r\nbody\r\n";
        let p = prepare(
            m,
            &rc(&[
                "a@example.com",
                "hidden@example.com",
                "Hidden@example.com",
                "old@example.com",
            ]),
        );
        assert_eq!(
            text(&p),
            "To: a@example.com\r\nSubject: s\r\nBcc: hidden@example.com, old@example.com\r\n\r\nbody\r\n"
        );
        assert_eq!(p.bcc.len(), 2);
    }

    #[test]
    fn header_recipients_outside_the_envelope_are_not_mailed() {
        let m = b"To: \"A\" <a@example.com>, b@example.com\r\nCc: c@example.com\r\n\r\nx";
        let p = prepare(m, &rc(&["b@example.com"]));
        assert_eq!(text(&p), "To: b@example.com\r\n\r\nx");
        assert!(p.cc.is_empty() && p.bcc.is_empty());
        let p = prepare(m, &rc(&["a@example.com", "z@example.com"]));
        assert_eq!(
            text(&p),
            "To: \"A\" <a@example.com>\r\nBcc: z@example.com\r\n\r\nx"
        );
    }

    #[test]
    fn long_bcc_lists_are_folded() {
        let rcpts: Vec<String> = (0..10).map(|i| format!("person{i}@example.com")).collect();
        let p = prepare(b"Subject: s\r\n\r\nx", &rcpts);
        let t = text(&p);
        assert!(t.lines().all(|l| l.len() <= 78), "{t}");
        let bcc = crate::message::header_value(&p.message, "bcc").unwrap_or_default();
        assert_eq!(bcc.split(", ").count(), 10, "{bcc}");
    }

    #[test]
    fn from_display_names_with_at_are_sanitized() {
        let p = prepare(
            b"From: printer@contoso.com <printer@contoso.com>\r\nTo: a@b.test\r\n\r\nx",
            &rc(&["a@b.test"]),
        );
        assert_eq!(
            text(&p),
            "From: <printer@contoso.com>\r\nTo: a@b.test\r\n\r\nx"
        );
        let p = prepare(
            b"From: \"scan@floor2\" <printer@contoso.com>\r\n\r\nx",
            &rc(&["a@b.test"]),
        );
        assert!(
            text(&p).starts_with("From: \"scan at floor2\" <printer@contoso.com>\r\n"),
            "{}",
            text(&p)
        );
        let m = b"From: Printer <printer@contoso.com>\r\nTo: a@b.test\r\n\r\nx";
        assert_eq!(prepare(m, &rc(&["a@b.test"])).message, m.to_vec());
    }

    #[test]
    fn header_without_body_and_groups() {
        let p = prepare(b"To: undisclosed-recipients:;\r\n", &rc(&["a@b.test"]));
        assert_eq!(
            text(&p),
            "To: undisclosed-recipients:;\r\nBcc: a@b.test\r\n"
        );
        let p = prepare(b"Subject: no newline", &rc(&["a@b.test"]));
        assert_eq!(text(&p), "Subject: no newline\r\nBcc: a@b.test\r\n");
    }

    #[test]
    fn a_header_without_its_empty_line_gets_one() {
        // Found by the header_rewrite fuzz target: the first line is not a
        // field, so the header is empty; a lenient parser would still read
        // the `To:` below it.
        let m = b"garbage line\r\nTo: ok@example.com, other@outside.test\r\n\r\nx";
        let p = prepare(m, &rc(&["ok@example.com"]));
        assert_eq!(
            text(&p),
            "Bcc: ok@example.com\r\n\r\ngarbage line\r\nTo: ok@example.com, other@outside.test\r\n\r\nx"
        );
        let m = b"Subject: s\r\nnot a field\r\nTo: other@outside.test\r\n";
        assert_eq!(
            text(&prepare(m, &rc(&["a@b.test"]))),
            "Subject: s\r\nBcc: a@b.test\r\n\r\nnot a field\r\nTo: other@outside.test\r\n"
        );
    }

    proptest::proptest! {
        #[test]
        fn never_panics_and_keeps_the_body(msg in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let p = prepare(&msg, &["a@b".to_string()]);
            let (_, body) = crate::message::fields(&msg);
            proptest::prop_assert!(p.message.ends_with(&msg[body..]));
        }
    }
}
