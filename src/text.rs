//! Untrusted text made safe to print: control characters escaped and length bounded, so a client, a provider or a message cannot forge a log line or send escape sequences to a terminal.

use std::borrow::Cow;

/// Longest text [`for_log`] keeps, in bytes (before escaping); the rest becomes `…`.
pub const LOG_MAX: usize = 256;

/// `text` with every control character escaped (`\r`, `\n`, `\t`, `\\`,
/// others as `\xNN` or `\u{NNNN}`) and cut after [`LOG_MAX`] bytes. For user
/// names, provider error strings, header text: anything an outsider chose
/// that goes into a log line.
pub fn for_log(text: &str) -> Cow<'_, str> {
    escape(text, LOG_MAX)
}

/// `text` with every control character escaped, not shortened (for
/// `queue show`, which prints whole header blocks). Line breaks are kept when
/// they are CRLF pairs, so a header block stays readable; lone CR or LF and
/// every other control character (ESC included) are escaped.
pub fn for_terminal(text: &str) -> Cow<'_, str> {
    if !text
        .chars()
        .any(|c| (c.is_control() && c != '\t' && c != '\r' && c != '\n') || c == '\\')
        && !has_lone_cr_or_lf(text)
    {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    let mut rest = text;
    while let Some(i) = rest.find("\r\n") {
        push_escaped(&mut out, &rest[..i], usize::MAX, true);
        out.push_str("\r\n");
        rest = &rest[i + 2..];
    }
    push_escaped(&mut out, rest, usize::MAX, true);
    Cow::Owned(out)
}

fn has_lone_cr_or_lf(text: &str) -> bool {
    let b = text.as_bytes();
    b.iter().enumerate().any(|(i, &c)| {
        (c == b'\r' && b.get(i + 1) != Some(&b'\n'))
            || (c == b'\n' && (i == 0 || b[i - 1] != b'\r'))
    })
}

fn escape(text: &str, max: usize) -> Cow<'_, str> {
    let clean = text.len() <= max && !text.chars().any(|c| c.is_control() || c == '\\');
    if clean {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len().min(max) + 16);
    push_escaped(&mut out, text, max, false);
    Cow::Owned(out)
}

/// Append `text` escaped; stop after `max` input bytes (with `…`).
/// `keep_tab`: a horizontal tab stays as it is (folded headers).
fn push_escaped(out: &mut String, text: &str, max: usize, keep_tab: bool) {
    for (i, c) in text.char_indices() {
        if i >= max {
            out.push('…');
            return;
        }
        match c {
            '\\' => out.push_str("\\\\"),
            '\r' => out.push_str("\\r"),
            '\n' => out.push_str("\\n"),
            '\t' if keep_tab => out.push('\t'),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x100 && c.is_control() => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c if c.is_control() => out.push_str(&format!("\\u{{{:04x}}}", c as u32)),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_borrowed() {
        assert!(matches!(for_log("app@example.com"), Cow::Borrowed(_)));
        assert!(matches!(
            for_terminal("Subject: hi\r\n\tthere\r\n"),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn log_escapes_line_breaks_and_controls() {
        assert_eq!(
            for_log("app\r\n2026-12-01 INFO forged\x1b[31m\x00\u{85}\\"),
            "app\\r\\n2026-12-01 INFO forged\\x1b[31m\\x00\\x85\\\\"
        );
        assert_eq!(for_log("a\tb"), "a\\tb");
    }

    #[test]
    fn log_is_bounded() {
        let long = "é".repeat(1000);
        let out = for_log(&long);
        assert!(out.len() <= LOG_MAX + 8, "{}", out.len());
        assert!(out.ends_with('…'));
    }

    #[test]
    fn terminal_keeps_crlf_and_tabs_escapes_the_rest() {
        assert_eq!(
            for_terminal("Subject: \x1b]0;pwned\x07\r\nX: a\nb\rc\r\n\tfold\r\n"),
            "Subject: \\x1b]0;pwned\\x07\r\nX: a\\nb\\rc\r\n\tfold\r\n"
        );
    }
}
