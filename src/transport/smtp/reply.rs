//! Sans-IO SMTP reply parsing: reply lines into complete replies, and an EHLO reply into the extensions the server offers.

use super::printable;
use crate::transport::Enhanced;

/// Most lines in one multi-line reply.
const MAX_REPLY_LINES: usize = 256;
/// Longest upstream reply text kept in a failure.
const MAX_REPLY_TEXT: usize = 1000;

/// A complete SMTP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Reply {
    /// Three-digit code, 200..=599.
    pub(super) code: u16,
    /// The RFC 2034 enhanced status code, parsed once here: the first that
    /// opens a line's text with a class agreeing with the code (`550 5.1.1 …`).
    pub(super) enhanced: Option<Enhanced>,
    /// Text of each line, without code and separator, control characters replaced.
    pub(super) lines: Vec<String>,
}

impl Reply {
    /// True for Exchange Online's "too many connections for this mailbox"
    /// (`432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded`)
    /// and other `4.3.2`-with-`4xx` replies that the mailbox's budget, not
    /// the message, caused.
    pub(super) fn is_throttling(&self) -> bool {
        self.code / 100 == 4 && self.enhanced == Some(Enhanced::new(4, 3, 2))
    }

    /// `550 5.7.60 text ...`: the code and all lines, on one line.
    pub(super) fn text(&self) -> String {
        let mut text = self.code.to_string();
        for line in self.lines.iter().filter(|l| !l.is_empty()) {
            text.push(' ');
            text.push_str(line);
        }
        if text.len() > MAX_REPLY_TEXT {
            let mut end = MAX_REPLY_TEXT;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
            text.push_str(" ...");
        }
        text
    }
}

/// Sans-IO parser of reply lines (`250-...` continues, `250 ...` ends).
#[derive(Debug, Default)]
pub(super) struct ReplyParser {
    code: Option<u16>,
    enhanced: Option<Enhanced>,
    lines: Vec<String>,
}

impl ReplyParser {
    /// Feed one line (with or without its line ending); `Some` when the reply is complete.
    pub(super) fn line(&mut self, raw: &[u8]) -> Result<Option<Reply>, String> {
        let raw = raw.strip_suffix(b"\n").unwrap_or(raw);
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let shown = || printable(&String::from_utf8_lossy(&raw[..raw.len().min(80)]));
        let code = match raw.get(..3) {
            Some(d) if d.iter().all(u8::is_ascii_digit) => {
                d.iter().fold(0u16, |n, b| n * 10 + u16::from(b - b'0'))
            }
            _ => return Err(format!("`{}`", shown())),
        };
        if !(200..=599).contains(&code) {
            return Err(format!("`{}`", shown()));
        }
        if self.code.is_some_and(|c| c != code) {
            return Err(format!(
                "code changed within a multi-line reply: `{}`",
                shown()
            ));
        }
        let more = match raw.get(3) {
            None | Some(b' ') => false,
            Some(b'-') => true,
            Some(_) => return Err(format!("`{}`", shown())),
        };
        if self.lines.len() >= MAX_REPLY_LINES {
            return Err(format!("more than {MAX_REPLY_LINES} reply lines"));
        }
        let text = printable(String::from_utf8_lossy(raw.get(4..).unwrap_or_default()).trim());
        self.code = Some(code);
        if self.enhanced.is_none() {
            self.enhanced = text
                .split(' ')
                .next()
                .and_then(Enhanced::parse)
                .filter(|e| u16::from(e.class) == code / 100);
        }
        self.lines.push(text);
        if more {
            return Ok(None);
        }
        Ok(Some(Reply {
            code,
            enhanced: self.enhanced.take(),
            lines: std::mem::take(&mut self.lines),
        }))
    }
}

/// What the server advertised in its EHLO reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Extensions {
    pub(super) starttls: bool,
    /// `SIZE` advertised, with its limit (0 = no limit given).
    pub(super) size: Option<u64>,
    pub(super) eightbitmime: bool,
    pub(super) smtputf8: bool,
    /// `PIPELINING` (RFC 2920): MAIL, RCPT and DATA go out in one write.
    pub(super) pipelining: bool,
    pub(super) auth_plain: bool,
    pub(super) auth_login: bool,
    pub(super) auth_xoauth2: bool,
    pub(super) auth_oauthbearer: bool,
}

impl Extensions {
    pub(super) fn parse(reply: &Reply) -> Self {
        let mut ext = Extensions::default();
        // The first line is the server's name and greeting, not an extension.
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split([' ', '=']).filter(|w| !w.is_empty());
            let Some(keyword) = words.next() else {
                continue;
            };
            match keyword.to_ascii_uppercase().as_str() {
                "STARTTLS" => ext.starttls = true,
                "SIZE" => ext.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
                "8BITMIME" => ext.eightbitmime = true,
                "SMTPUTF8" => ext.smtputf8 = true,
                "PIPELINING" => ext.pipelining = true,
                "AUTH" => {
                    for mech in words {
                        match mech.to_ascii_uppercase().as_str() {
                            "PLAIN" => ext.auth_plain = true,
                            "LOGIN" => ext.auth_login = true,
                            "XOAUTH2" => ext.auth_xoauth2 = true,
                            "OAUTHBEARER" => ext.auth_oauthbearer = true,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        ext
    }
}

/// Feed `lines` to a fresh parser; the last result (or the first error).
#[cfg(test)]
pub(super) fn parse_lines(lines: &[&str]) -> Result<Option<Reply>, String> {
    let mut p = ReplyParser::default();
    let mut last = Ok(None);
    for l in lines {
        last = p.line(l.as_bytes());
        if last.is_err() {
            break;
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use super::parse_lines as parse;
    use super::*;

    #[test]
    fn replies() {
        let r = parse(&[
            "250-mx.example Hello\r\n",
            "250-SIZE 1000\r\n",
            "250-pipelining\r\n",
            "250 AUTH=LOGIN PLAIN\n",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(r.code, 250);
        assert_eq!(
            r.lines,
            [
                "mx.example Hello",
                "SIZE 1000",
                "pipelining",
                "AUTH=LOGIN PLAIN"
            ]
        );
        let ext = Extensions::parse(&r);
        assert_eq!(ext.size, Some(1000));
        assert!(ext.auth_login && ext.auth_plain && !ext.starttls && ext.pipelining);
        assert_eq!(parse(&["354\r\n"]).unwrap().unwrap().text(), "354");
        assert_eq!(parse(&["250-a\r\n"]).unwrap(), None);
        assert!(parse(&["250-a\r\n", "251 b\r\n"]).is_err());
        assert!(parse(&["hello\r\n"]).is_err());
        assert!(parse(&["099 x\r\n"]).is_err());
        assert!(parse(&["250x\r\n"]).is_err());
        let r = parse(&[
            "535-5.7.8 Username and Password not accepted.\r\n",
            "535 5.7.8 https://x\x01\r\n",
        ])
        .unwrap();
        assert_eq!(
            r.unwrap().text(),
            "535 5.7.8 Username and Password not accepted. 5.7.8 https://x?"
        );
    }

    #[test]
    fn enhanced_status_codes() {
        let one = |l: &str| parse(&[l]).unwrap().unwrap();
        assert_eq!(
            one("550 5.1.1 <bad@x>: user unknown").enhanced,
            Some(Enhanced::new(5, 1, 1))
        );
        assert_eq!(
            one("554 5.2.0 STOREDRV.Submission.Exception:SendAsDeniedException").enhanced,
            Some(Enhanced::new(5, 2, 0))
        );
        // Class must agree with the reply code; no code at all is fine.
        assert_eq!(one("550 4.1.1 odd").enhanced, None);
        assert_eq!(one("550 user unknown").enhanced, None);
        assert_eq!(one("550").enhanced, None);
        assert_eq!(one("550 5.1.1.1 x").enhanced, None);
        // Only where a code belongs: at the start of a line's text.
        assert_eq!(one("535 see 5.7.139 for help").enhanced, None);
        let r = parse(&["550-mx.example says:\r\n", "550 5.7.1 relay denied\r\n"]);
        assert_eq!(r.unwrap().unwrap().enhanced, Some(Enhanced::new(5, 7, 1)));
        let r = parse(&["550-5.1.1 first\r\n", "550 5.7.1 second\r\n"]);
        assert_eq!(r.unwrap().unwrap().enhanced, Some(Enhanced::new(5, 1, 1)));
        assert!(
            one("432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded").is_throttling()
        );
        assert!(!one("451 4.3.0 later").is_throttling());
        assert!(!one("554 5.3.2 x").is_throttling());
    }
}
