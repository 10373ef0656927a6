//! Header-level edits on canonical (CRLF) messages: finding header fields and applying the seed's "Sender Name" / "Reply to" rewrite.

pub mod headers;
pub mod recipients;
pub mod split;

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
    let (fs, body, _) = fields_separated(msg);
    (fs, body)
}

/// Like [`fields`], and whether the header section ended properly (at an
/// empty line or the end of the message). `false` when a line that is
/// neither a field nor a continuation ended it: a lenient MIME parser (Graph,
/// Exchange) may still read fields after that line, so whoever rewrites the
/// header must add the empty line.
pub fn fields_separated(msg: &[u8]) -> (Vec<Field>, usize, bool) {
    use headers::LineKind;
    let mut out: Vec<Field> = Vec::new();
    for line in headers::lines(msg) {
        match line.kind {
            LineKind::Empty => return (out, line.end, true),
            // Not a field name (`T o:`, controls, 8-bit), a continuation
            // before any field, or no colon: the header ends here. Kept as a
            // field it would be copied as is, and a lenient parser could
            // still read it as `To:` (found by the header_rewrite fuzz target).
            LineKind::NotHeader => return (out, line.start, false),
            LineKind::Continuation => {
                if let Some(last) = out.last_mut() {
                    last.end = line.end;
                }
            }
            LineKind::Field => {
                let colon = line.colon.unwrap_or(line.start);
                let raw_name = &msg[line.start..colon];
                let n = raw_name
                    .iter()
                    .rposition(|&b| b != b' ' && b != b'\t')
                    .map_or(0, |i| i + 1);
                out.push(Field {
                    name: String::from_utf8_lossy(&raw_name[..n]).into_owned(),
                    start: line.start,
                    end: line.end,
                });
            }
        }
    }
    (out, msg.len(), true)
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

/// A display name made safe for a header field: every control character
/// (CR, LF, TAB, NUL, DEL, C1) and every run of white space becomes one
/// space, ends trimmed. Decoded RFC 2047 names can carry CR LF; written back
/// as is they would start a new header field (issue 14: a `Bcc:` injected
/// past the envelope).
pub fn clean_display_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut gap = false;
    for c in name.chars() {
        if c.is_control() || c.is_whitespace() {
            gap = true;
        } else {
            if gap && !out.is_empty() {
                out.push(' ');
            }
            gap = false;
            out.push(c);
        }
    }
    out
}

/// An address made safe between `<` and `>`: control characters, white
/// space and angle brackets removed.
fn clean_address(addr: &str) -> String {
    addr.chars()
        .filter(|c| !c.is_control() && !c.is_whitespace() && *c != '<' && *c != '>')
        .collect()
}

/// Longest RFC 2047 encoded word (RFC 2047 §2).
const MAX_ENCODED_WORD: usize = 75;
/// Longest line holding an encoded word (RFC 2047 §2).
const MAX_ENCODED_LINE: usize = 76;
/// Longest field name (with `: `) a mailbox is written after (`Reply-To: `).
const FIELD_NAME_ROOM: usize = 10;
/// Text bytes in one encoded word: whole base64 groups, so that the word
/// also fits on a line after the longest field name (64 characters).
const WORD_TEXT_BYTES: usize = (MAX_ENCODED_LINE - FIELD_NAME_ROOM - ENCODED_WORD_FRAME) / 4 * 3;
/// `=?utf-8?B?` and `?=`.
const ENCODED_WORD_FRAME: usize = 12;
const _: () = assert!(WORD_TEXT_BYTES / 3 * 4 + ENCODED_WORD_FRAME <= MAX_ENCODED_WORD);

/// `name` as RFC 2047 `B` encoded words, each at most [`MAX_ENCODED_WORD`]
/// characters, split on character boundaries (every word decodes to whole
/// UTF-8 characters) and joined by folding white space.
fn encode_words(name: &str) -> String {
    use base64::Engine;
    let mut words = Vec::new();
    let mut start = 0;
    while start < name.len() {
        let mut end = (start + WORD_TEXT_BYTES).min(name.len());
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        let b64 = base64::engine::general_purpose::STANDARD.encode(&name.as_bytes()[start..end]);
        words.push(format!("=?utf-8?B?{b64}?="));
        start = end;
    }
    words.join("\r\n ")
}

/// `"Display Name" <addr>` with the name quoted, or RFC 2047-encoded when it
/// is not ASCII. Never contains a control character other than the CR LF
/// of folding white space between encoded words: the name goes through
/// [`clean_display_name`] and the address loses controls, spaces and `<>`.
/// A line with an encoded word stays within 76 characters after a field
/// name up to `Reply-To: `: the address goes on a line of its own when it
/// would not fit after the last word.
pub fn format_mailbox(name: &str, addr: &str) -> String {
    let name = clean_display_name(name);
    let addr = clean_address(addr);
    if name.is_empty() {
        return format!("<{addr}>");
    }
    if name.is_ascii() {
        let escaped = name.replace('\\', "\\\\").replace('"', "\\\"");
        return format!("\"{escaped}\" <{addr}>");
    }
    let words = encode_words(&name);
    let last = words.rsplit("\r\n").next().unwrap_or("");
    let room = if words.len() == last.len() {
        MAX_ENCODED_LINE - FIELD_NAME_ROOM
    } else {
        MAX_ENCODED_LINE
    };
    let sep = if last.len() + addr.len() + 3 > room {
        "\r\n "
    } else {
        " "
    };
    format!("{words}{sep}<{addr}>")
}

/// Apply the seed's Sender Name / Reply to settings: when `reply_to` is set,
/// the message is sent from that address (with `sender_name` as display
/// name), and the original `From` is kept as `Reply-To` unless the message
/// has one. When `reply_to` is empty the message is returned unchanged.
///
/// Deliveries pass only the header block ([`crate::transport::Body::head`]):
/// everything after the header is copied as it is, so the body read from
/// the spool file never needs to be in memory for this.
pub fn rewrite_from<'a>(
    msg: &'a [u8],
    sender_name: &str,
    reply_to: &str,
) -> std::borrow::Cow<'a, [u8]> {
    if reply_to.is_empty() {
        return std::borrow::Cow::Borrowed(msg);
    }
    let (fs, body, separated) = fields_separated(msg);
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
    out.extend_from_slice(&msg[pos..body]);
    if !separated {
        // The header ended at a line that is not a field: end ours properly,
        // so that line stays in the body.
        if !out.ends_with(b"\n") {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(&msg[body..]);
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
    fn names_and_addresses_never_carry_control_characters() {
        assert_eq!(
            format_mailbox("Ops\r\nBcc: evil@x\t\0\u{7f}\u{85}end ", "a@b\r\n>x"),
            "\"Ops Bcc: evil@x end\" <a@bx>"
        );
        assert_eq!(format_mailbox("\r\n", "a@b"), "<a@b>");
        // Non-ASCII: encoded words of at most 75 characters, folded.
        let long = "Zoë ".repeat(40) + "\r\nBcc: x@y";
        let out = format_mailbox(&long, "a@b");
        for (i, line) in out.split("\r\n").enumerate() {
            let word = if i == 0 {
                line
            } else {
                line.strip_prefix(' ').unwrap()
            };
            let word = word.strip_suffix(" <a@b>").unwrap_or(word);
            assert!(
                word.len() <= 75 && word.starts_with("=?utf-8?B?") && word.ends_with("?="),
                "{word}"
            );
            assert!(!line.chars().any(|c| c.is_control()), "{line:?}");
        }
        let m = format!("To: {out}\r\n\r\n");
        let decoded = crate::message::recipients::parse_addresses(m.as_bytes());
        assert_eq!(
            decoded[0].name.as_deref(),
            Some(clean_display_name(&long).as_str())
        );
        assert_eq!(decoded.len(), 1);
    }

    #[test]
    fn rewrite_from_keeps_a_non_header_first_line_in_the_body() {
        // Found by the header_rewrite fuzz target: a leading continuation
        // line became part of the new From, and the lines after it fields.
        let m = b" <printer@contoso.com>\r\nTo: other@outside.test\r\n\r\nx";
        assert_eq!(
            &*rewrite_from(m, "", "desk@contoso.com"),
            b"From: <desk@contoso.com>\r\n\r\n <printer@contoso.com>\r\nTo: other@outside.test\r\n\r\nx"
        );
        let m = b"Subject: s\r\nnot a field\r\n";
        assert_eq!(
            &*rewrite_from(m, "", "d@c"),
            b"From: <d@c>\r\nSubject: s\r\n\r\nnot a field\r\n"
        );
    }

    #[test]
    fn a_line_without_a_valid_field_name_ends_the_header() {
        let m = b"Subject: s\r\nT o: other@outside.test\r\n\r\nx";
        let (fs, body, separated) = fields_separated(m);
        assert_eq!((fs.len(), body, separated), (1, 12, false));
        let p = crate::message::recipients::prepare(m, &["a@b.test".into()]);
        assert_eq!(
            String::from_utf8_lossy(&p.message),
            "Subject: s\r\nBcc: a@b.test\r\n\r\nT o: other@outside.test\r\n\r\nx"
        );
    }

    #[test]
    fn rewrite_from_cleans_the_configured_name() {
        let out = rewrite_from(MSG, "Help\r\nBcc: x@y", "desk@contoso.com\r\n");
        assert!(out.starts_with(b"From: \"Help Bcc: x@y\" <desk@contoso.com>\r\nSubject: hi\r\n"));
    }

    #[test]
    fn display_names_are_quoted_or_encoded() {
        assert_eq!(format_mailbox("A \"B\"", "a@b"), "\"A \\\"B\\\"\" <a@b>");
        assert_eq!(format_mailbox("Zoë", "a@b"), "=?utf-8?B?Wm/Dqw==?= <a@b>");
    }

    /// The encoded words of a formatted mailbox, with the RFC 2047 §2
    /// limits checked: words of at most 75 characters, each decoding to
    /// whole UTF-8 characters, lines with a word (after `Reply-To: `) of at
    /// most 76.
    fn checked_words(formatted: &str) -> Vec<String> {
        use base64::Engine;
        let mut words = Vec::new();
        for (i, line) in format!("Reply-To: {formatted}").split("\r\n").enumerate() {
            assert!(i == 0 || line.starts_with(' '), "{line:?}");
            assert!(!line.chars().any(char::is_control), "{line:?}");
            for word in line.split(' ').filter(|w| w.starts_with("=?")) {
                assert!(line.len() <= MAX_ENCODED_LINE, "{line:?}");
                assert!(word.len() <= MAX_ENCODED_WORD, "{word}");
                let b64 = word
                    .strip_prefix("=?utf-8?B?")
                    .and_then(|w| w.strip_suffix("?="))
                    .unwrap_or_else(|| panic!("not a B word: {word}"));
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .unwrap();
                words.push(String::from_utf8(bytes).expect("a word split a character"));
            }
        }
        words
    }

    #[test]
    fn encoded_words_fit_their_lines() {
        // 39 bytes a word: 19 × "ë" (2 bytes) leave one byte, so the 20th
        // moves to the next word whole, as a "😀" (4 bytes) does.
        for name in [
            "ë".repeat(40),
            "€".repeat(30),
            "a😀".repeat(20),
            "Zoë".into(),
        ] {
            let out = format_mailbox(&name, "a@b");
            assert_eq!(checked_words(&out).concat(), name);
        }
        // 13 × "€" (3 bytes) is one full word; a 14th starts the next.
        assert_eq!(
            checked_words(&format_mailbox(&"€".repeat(13), "a@b")).len(),
            1
        );
        let words = checked_words(&format_mailbox(&"€".repeat(14), "a@b"));
        assert_eq!(words, ["€".repeat(13), "€".into()]);
        // A long address goes on a line of its own, off the word's line.
        let addr = format!("{}@example.com", "x".repeat(60));
        let out = format_mailbox("Zoë", &addr);
        assert_eq!(out, format!("=?utf-8?B?Wm/Dqw==?=\r\n <{addr}>"));
        checked_words(&out);
    }

    proptest::proptest! {
        #[test]
        fn encoded_names_decode_back(
            name in "(\\PC|[ \t\r\n\u{0}\u{7f}\u{85}]){0,120}",
            local in "[a-z0-9.]{1,70}",
        ) {
            let addr = format!("{local}@example.com");
            let out = format_mailbox(&name, &addr);
            checked_words(&out);
            let msg = format!("Reply-To: {out}\r\n\r\n");
            let parsed = mail_parser::MessageParser::default().parse(msg.as_bytes()).unwrap();
            let got = parsed.reply_to().and_then(|a| a.first()).unwrap();
            let want = clean_display_name(&name);
            proptest::prop_assert_eq!(got.name(), (!want.is_empty()).then_some(want.as_str()));
            proptest::prop_assert_eq!(got.address(), Some(addr.as_str()));
        }
    }
}
