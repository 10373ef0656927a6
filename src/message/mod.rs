//! Header-level edits on canonical (CRLF) messages: finding header fields and applying the seed's "Sender Name" / "Reply to" rewrite.

pub mod recipients;

/// One header field: its name and the byte range of the whole field
/// (name, value and folded continuation lines, final CRLF included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    /// The field name as written.
    pub name: String,
    /// Start offset of the field in the message.
    pub start: usize,
    /// Offset just past the field's last CRLF.
    pub end: usize,
}

/// The header fields of `msg` and the offset where the body starts (after
/// the empty line; `msg.len()` when there is no body).
pub fn fields(msg: &[u8]) -> (Vec<Field>, usize) {
    let mut out: Vec<Field> = Vec::new();
    let mut pos = 0;
    while pos < msg.len() {
        let line_end = msg[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|i| pos + i + 1)
            .unwrap_or(msg.len());
        let line = &msg[pos..line_end];
        if line == b"\r\n" || line == b"\n" {
            return (out, line_end);
        }
        if (line[0] == b' ' || line[0] == b'\t') && !out.is_empty() {
            if let Some(last) = out.last_mut() {
                last.end = line_end;
            }
        } else if let Some(colon) = line.iter().position(|&b| b == b':') {
            let name = String::from_utf8_lossy(&line[..colon]).trim().to_string();
            out.push(Field {
                name,
                start: pos,
                end: line_end,
            });
        } else {
            // Not a header line: the header section ended without an empty line.
            return (out, pos);
        }
        pos = line_end;
    }
    (out, msg.len())
}

/// The unfolded value of the first field called `name` (case-insensitive).
pub fn header_value(msg: &[u8], name: &str) -> Option<String> {
    let (fs, _) = fields(msg);
    let f = fs.iter().find(|f| f.name.eq_ignore_ascii_case(name))?;
    let raw = &msg[f.start..f.end];
    let colon = raw.iter().position(|&b| b == b':')?;
    let v = String::from_utf8_lossy(&raw[colon + 1..])
        .replace("\r\n", "")
        .replace('\n', "");
    Some(v.trim().to_string())
}

/// `"Display Name" <addr>` with the name quoted, or RFC 2047-encoded when it
/// is not ASCII.
pub fn format_mailbox(name: &str, addr: &str) -> String {
    if name.is_empty() {
        return format!("<{addr}>");
    }
    if name.is_ascii() {
        let escaped = name.replace('\\', "\\\\").replace('"', "\\\"");
        format!("\"{escaped}\" <{addr}>")
    } else {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(name.as_bytes());
        format!("=?utf-8?B?{b64}?= <{addr}>")
    }
}

/// Apply the seed's Sender Name / Reply to settings: when `reply_to` is set,
/// the message is sent from that address (with `sender_name` as display
/// name), and the original `From` is kept as `Reply-To` unless the message
/// has one. When `reply_to` is empty the message is returned unchanged.
pub fn rewrite_from<'a>(
    msg: &'a [u8],
    sender_name: &str,
    reply_to: &str,
) -> std::borrow::Cow<'a, [u8]> {
    if reply_to.is_empty() {
        return std::borrow::Cow::Borrowed(msg);
    }
    let (fs, _) = fields(msg);
    let from = fs.iter().find(|f| f.name.eq_ignore_ascii_case("From"));
    let has_reply_to = fs.iter().any(|f| f.name.eq_ignore_ascii_case("Reply-To"));
    let mut out = Vec::with_capacity(msg.len() + 128);
    out.extend_from_slice(
        format!("From: {}\r\n", format_mailbox(sender_name, reply_to)).as_bytes(),
    );
    let mut pos = 0;
    if let Some(f) = from {
        out.extend_from_slice(&msg[..f.start]);
        if !has_reply_to {
            let raw = &msg[f.start..f.end];
            let colon = raw.iter().position(|&b| b == b':').unwrap_or(4);
            out.extend_from_slice(b"Reply-To:");
            out.extend_from_slice(&raw[colon + 1..]);
        }
        pos = f.end;
    }
    out.extend_from_slice(&msg[pos..]);
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSG: &[u8] =
        b"Subject: hi\r\nFrom: App <app@legacy.local>\r\nTo: a@b,\r\n c@d\r\n\r\nbody\r\n";

    #[test]
    fn finds_fields_and_body() {
        let (fs, body) = fields(MSG);
        assert_eq!(
            fs.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(),
            ["Subject", "From", "To"]
        );
        assert_eq!(&MSG[body..], b"body\r\n");
        assert_eq!(header_value(MSG, "to").as_deref(), Some("a@b, c@d"));
    }

    #[test]
    fn rewrite_keeps_original_as_reply_to() {
        let out = rewrite_from(MSG, "Help Desk", "desk@contoso.com");
        assert_eq!(
            String::from_utf8(out.into_owned()).unwrap(),
            "From: \"Help Desk\" <desk@contoso.com>\r\nSubject: hi\r\nReply-To: App <app@legacy.local>\r\nTo: a@b,\r\n c@d\r\n\r\nbody\r\n"
        );
    }

    #[test]
    fn rewrite_keeps_existing_reply_to_and_adds_missing_from() {
        let m = b"Reply-To: x@y\r\nFrom: a@b\r\n\r\n.";
        assert_eq!(
            &*rewrite_from(m, "", "s@t"),
            b"From: <s@t>\r\nReply-To: x@y\r\n\r\n."
        );
        assert_eq!(
            &*rewrite_from(b"Subject: s\r\n\r\nb", "", "s@t"),
            b"From: <s@t>\r\nSubject: s\r\n\r\nb"
        );
        assert_eq!(&*rewrite_from(MSG, "x", ""), MSG);
        assert!(
            matches!(rewrite_from(MSG, "x", ""), std::borrow::Cow::Borrowed(_)),
            "no copy when nothing changes"
        );
    }

    #[test]
    fn display_names_are_quoted_or_encoded() {
        assert_eq!(format_mailbox("A \"B\"", "a@b"), "\"A \\\"B\\\"\" <a@b>");
        assert_eq!(format_mailbox("Zoë", "a@b"), "=?utf-8?B?Wm/Dqw==?= <a@b>");
    }
}
