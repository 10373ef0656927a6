//! Sans-IO SMTP command parsing: split command lines out of the input buffer and turn one line into a `Command`.

use crate::common::Secret;

/// The result of looking for one command line at the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Line<'a> {
    /// A whole line: its text without the line ending, and how many bytes it used (ending included).
    Complete(&'a [u8], usize),
    /// No line ending within the first `max` bytes: the line is too long.
    TooLong,
    /// Not enough bytes yet.
    Incomplete,
}

/// Find the first command line in `input`. A line ends in CRLF or a bare LF
/// (both are accepted for commands; only DATA is strict). `max` counts the
/// line ending too, so the search never looks past `max` bytes and a client
/// cannot make us keep more than `max` bytes of one line.
pub fn split_line(input: &[u8], max: usize) -> Line<'_> {
    let limit = input.len().min(max);
    match input[..limit].iter().position(|&b| b == b'\n') {
        Some(i) => {
            let text = &input[..i];
            let text = text.strip_suffix(b"\r").unwrap_or(text);
            Line::Complete(text, i + 1)
        }
        None if input.len() >= max => Line::TooLong,
        None => Line::Incomplete,
    }
}

/// The envelope sender and what `MAIL FROM` declared about the message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MailFrom {
    /// The sender address, `""` for the null sender `<>`.
    pub address: String,
    /// `SIZE=` (RFC 1870), when given.
    pub size: Option<u64>,
    /// `BODY=8BITMIME` (RFC 6152).
    pub eight_bit: bool,
    /// `SMTPUTF8` (RFC 6531).
    pub smtputf8: bool,
}

/// One parsed SMTP command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `EHLO name`.
    Ehlo(String),
    /// `HELO name`.
    Helo(String),
    /// `MAIL FROM:<address> [params]`.
    Mail(MailFrom),
    /// `RCPT TO:<address>` (no parameters are supported).
    Rcpt(String),
    /// `DATA`.
    Data,
    /// `RSET`.
    Rset,
    /// `NOOP [text]`.
    Noop,
    /// `QUIT`.
    Quit,
    /// `VRFY text`.
    Vrfy,
    /// `HELP [text]`.
    Help,
    /// `STARTTLS` (RFC 3207).
    StartTls,
    /// `AUTH mechanism [initial-response]` (RFC 4954). The initial response
    /// may hold credentials, so it is a [`Secret`] (never printed).
    Auth {
        /// The SASL mechanism name as sent.
        mechanism: String,
        /// The base64 initial response, if any (`=` means empty).
        initial: Option<Secret>,
    },
    /// A known SMTP command mailbridge does not implement (`EXPN`, `BDAT`, `TURN`, `ETRN`).
    NotImplemented,
    /// An HTTP request line: a browser or a cross-protocol attack, not a mail client.
    Http,
}

/// Which envelope address a `BadAddress` is about (the reply codes differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `MAIL FROM`.
    Sender,
    /// `RCPT TO`.
    Recipient,
}

/// Why a command line was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// The verb is not an SMTP command (`500 5.5.2`).
    Unknown,
    /// The arguments are malformed (`501 5.5.4`); holds the expected syntax.
    Syntax(&'static str),
    /// The path is well formed but holds no valid mailbox (`553`).
    BadAddress(Role),
    /// An ESMTP parameter mailbridge does not support (`555 5.5.4`).
    UnknownParameter,
}

const HTTP_VERBS: [&str; 9] = [
    "GET", "POST", "HEAD", "PUT", "CONNECT", "OPTIONS", "DELETE", "PATCH", "TRACE",
];

/// Parse one command line (without its line ending). Verbs and keywords are
/// case-insensitive; addresses keep their case.
pub fn parse(line: &[u8]) -> Result<Command, ParseError> {
    // Control characters (a bare CR, NUL, ...) never belong in a command line:
    // refusing them keeps them out of addresses, HELO names and Received: headers.
    let bad_char = line.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f);
    let (verb, rest) = match line.iter().position(|&b| b == b' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, &line[line.len()..]),
    };
    let verb = verb.to_ascii_uppercase();
    if HTTP_VERBS.iter().any(|v| v.as_bytes() == verb.as_slice()) {
        return Ok(Command::Http);
    }
    let syntax = |usage| Err(ParseError::Syntax(usage));
    let usage: &'static str = match verb.as_slice() {
        b"EHLO" => "EHLO hostname",
        b"HELO" => "HELO hostname",
        b"MAIL" => "MAIL FROM:<address>",
        b"RCPT" => "RCPT TO:<address>",
        b"DATA" => "DATA",
        b"RSET" => "RSET",
        b"QUIT" => "QUIT",
        b"STARTTLS" => "STARTTLS",
        b"VRFY" => "VRFY address",
        b"AUTH" => "AUTH mechanism [initial-response]",
        b"NOOP" | b"HELP" | b"EXPN" | b"BDAT" | b"TURN" | b"ETRN" => "",
        _ => return Err(ParseError::Unknown),
    };
    if bad_char {
        return syntax(usage);
    }
    let Ok(rest) = std::str::from_utf8(rest) else {
        return syntax(usage);
    };
    let rest = rest.trim_matches(' ');
    match verb.as_slice() {
        b"EHLO" | b"HELO" => {
            // Tabs separate words too: a tab must not end up in the name
            // (and so in a Received: header). Found by the parser fuzzer.
            let name = rest
                .split([' ', '\t'])
                .find(|w| !w.is_empty())
                .unwrap_or("");
            // A domain or address literal is at most 255 octets; the bound also
            // keeps our Received: header line short.
            if name.is_empty() || name.len() > 255 {
                return syntax(usage);
            }
            Ok(if verb == b"EHLO" {
                Command::Ehlo(name.to_string())
            } else {
                Command::Helo(name.to_string())
            })
        }
        b"MAIL" => parse_mail(rest).ok_or(ParseError::Syntax(usage))?,
        b"RCPT" => {
            let Some(arg) = strip_prefix_ci(rest, "TO:") else {
                return syntax(usage);
            };
            let Some((address, params)) = split_path(arg) else {
                return syntax(usage);
            };
            if !params.trim_matches(' ').is_empty() {
                return Err(ParseError::UnknownParameter);
            }
            if !valid_mailbox(&address) {
                return Err(ParseError::BadAddress(Role::Recipient));
            }
            Ok(Command::Rcpt(address))
        }
        b"DATA" | b"RSET" | b"QUIT" | b"STARTTLS" if !rest.is_empty() => syntax(usage),
        b"DATA" => Ok(Command::Data),
        b"RSET" => Ok(Command::Rset),
        b"QUIT" => Ok(Command::Quit),
        b"STARTTLS" => Ok(Command::StartTls),
        b"VRFY" if rest.is_empty() => syntax(usage),
        b"VRFY" => Ok(Command::Vrfy),
        b"NOOP" => Ok(Command::Noop),
        b"HELP" => Ok(Command::Help),
        b"AUTH" => {
            let mut words = rest.split(' ').filter(|w| !w.is_empty());
            let (Some(mechanism), initial, None) = (words.next(), words.next(), words.next())
            else {
                return syntax(usage);
            };
            Ok(Command::Auth {
                mechanism: mechanism.to_string(),
                initial: initial.map(Secret::new),
            })
        }
        _ => Ok(Command::NotImplemented),
    }
}

/// `FROM:<path> params`; `None` is a syntax error, `Some(Err)` a semantic one.
fn parse_mail(rest: &str) -> Option<Result<Command, ParseError>> {
    let arg = strip_prefix_ci(rest, "FROM:")?;
    let (address, params) = split_path(arg)?;
    let mut mail = MailFrom {
        address,
        ..MailFrom::default()
    };
    for param in params.split(' ').filter(|p| !p.is_empty()) {
        let (key, value) = match param.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (param, None),
        };
        match (key.to_ascii_uppercase().as_str(), value) {
            ("SIZE", Some(v)) => {
                if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                // Too many digits to fit is simply "too big".
                mail.size = Some(v.parse::<u64>().unwrap_or(u64::MAX));
            }
            ("BODY", Some(v)) if v.eq_ignore_ascii_case("7BIT") => mail.eight_bit = false,
            ("BODY", Some(v)) if v.eq_ignore_ascii_case("8BITMIME") => mail.eight_bit = true,
            ("BODY", _) | ("SIZE", None) => return None,
            ("SMTPUTF8", None) => mail.smtputf8 = true,
            _ => return Some(Err(ParseError::UnknownParameter)),
        }
    }
    if !mail.address.is_empty() && !valid_mailbox(&mail.address) {
        return Some(Err(ParseError::BadAddress(Role::Sender)));
    }
    Some(Ok(Command::Mail(mail)))
}

/// A valid mailbox without a tab: RFC 5321 allows no HT even in a quoted
/// local part, and `crate::address::is_valid_mailbox` lets one through
/// (found by the parser fuzzer).
fn valid_mailbox(address: &str) -> bool {
    !address.contains('\t') && crate::address::is_valid_mailbox(address)
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// Split `<path> params` (spaces before the path tolerated, as is a path
/// without angle brackets from old clients) into the address and the rest.
/// A source route (`<@a,@b:user@c>`) is dropped, as RFC 5321 §4.1.1.3 asks.
fn split_path(arg: &str) -> Option<(String, &str)> {
    let arg = arg.trim_start_matches(' ');
    let (path, rest) = if let Some(inner) = arg.strip_prefix('<') {
        let end = closing_bracket(inner)?;
        let rest = &inner[end + 1..];
        if !rest.is_empty() && !rest.starts_with(' ') {
            return None;
        }
        (&inner[..end], rest)
    } else {
        let end = arg.find(' ').unwrap_or(arg.len());
        if end == 0 || arg[..end].contains(['<', '>']) {
            return None;
        }
        (&arg[..end], &arg[end..])
    };
    let path = match path.strip_prefix('@') {
        Some(route) => &route[route.find(':')? + 1..],
        None => path,
    };
    Some((path.to_string(), rest))
}

/// Index of the `>` closing a path, skipping quoted local parts.
fn closing_bracket(s: &str) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '>' if !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mail(address: &str) -> Command {
        Command::Mail(MailFrom {
            address: address.into(),
            ..MailFrom::default()
        })
    }

    #[test]
    fn split_line_endings_and_limits() {
        assert_eq!(
            split_line(b"NOOP\r\nQUIT\r\n", 512),
            Line::Complete(b"NOOP", 6)
        );
        assert_eq!(
            split_line(b"NOOP\nQUIT\r\n", 512),
            Line::Complete(b"NOOP", 5)
        );
        assert_eq!(split_line(b"NOOP\r", 512), Line::Incomplete);
        assert_eq!(split_line(b"", 512), Line::Incomplete);
        // max counts the line ending: 6 bytes fit in 6, not in 5.
        assert_eq!(split_line(b"NOOP\r\n", 6), Line::Complete(b"NOOP", 6));
        assert_eq!(split_line(b"NOOP\r\n", 5), Line::TooLong);
        assert_eq!(split_line(b"NOOP\r", 5), Line::TooLong);
        assert_eq!(split_line(b"NOO", 5), Line::Incomplete);
    }

    #[test]
    fn verbs_are_case_insensitive() {
        assert_eq!(
            parse(b"ehlo client.example"),
            Ok(Command::Ehlo("client.example".into()))
        );
        assert_eq!(parse(b"HeLo client"), Ok(Command::Helo("client".into())));
        assert_eq!(parse(b"mail from:<a@b.example>"), Ok(mail("a@b.example")));
        assert_eq!(
            parse(b"rcpt To:<A@B.example>"),
            Ok(Command::Rcpt("A@B.example".into()))
        );
        assert_eq!(parse(b"data"), Ok(Command::Data));
        assert_eq!(parse(b"Rset"), Ok(Command::Rset));
        assert_eq!(parse(b"noop anything"), Ok(Command::Noop));
        assert_eq!(parse(b"quit"), Ok(Command::Quit));
        assert_eq!(parse(b"vrfy bob"), Ok(Command::Vrfy));
        assert_eq!(parse(b"help"), Ok(Command::Help));
        assert_eq!(parse(b"starttls"), Ok(Command::StartTls));
        assert_eq!(
            parse(b"auth plain AGEAYg=="),
            Ok(Command::Auth {
                mechanism: "plain".into(),
                initial: Some(Secret::new("AGEAYg=="))
            })
        );
        assert_eq!(
            parse(b"AUTH LOGIN"),
            Ok(Command::Auth {
                mechanism: "LOGIN".into(),
                initial: None
            })
        );
        let usage = Err(ParseError::Syntax("AUTH mechanism [initial-response]"));
        assert_eq!(parse(b"AUTH"), usage);
        assert_eq!(parse(b"AUTH PLAIN a b"), usage);
        // Credentials never show in Debug output.
        let cmd = parse(b"AUTH PLAIN AGFwcABzM2NyZXQ=").unwrap();
        assert!(!format!("{cmd:?}").contains("AGFwcABzM2NyZXQ"));
        assert_eq!(parse(b"EXPN list"), Ok(Command::NotImplemented));
    }

    #[test]
    fn mail_from_forms() {
        assert_eq!(parse(b"MAIL FROM:<>"), Ok(mail("")));
        assert_eq!(parse(b"MAIL FROM: <a@b.example>"), Ok(mail("a@b.example")));
        assert_eq!(parse(b"MAIL FROM:a@b.example"), Ok(mail("a@b.example")));
        assert_eq!(
            parse(b"MAIL FROM:<@relay.example:a@b.example>"),
            Ok(mail("a@b.example"))
        );
        assert_eq!(
            parse(b"MAIL FROM:<\"a>b\"@c.example>"),
            Ok(mail("\"a>b\"@c.example"))
        );
        assert_eq!(
            parse(b"MAIL FROM:<a@b.example> SIZE=1000 BODY=8bitmime smtputf8"),
            Ok(Command::Mail(MailFrom {
                address: "a@b.example".into(),
                size: Some(1000),
                eight_bit: true,
                smtputf8: true
            }))
        );
        assert_eq!(
            parse(b"MAIL FROM:<a@b.example> SIZE=99999999999999999999999"),
            Ok(Command::Mail(MailFrom {
                address: "a@b.example".into(),
                size: Some(u64::MAX),
                ..MailFrom::default()
            }))
        );
        assert_eq!(
            parse(b"MAIL FROM:<a@b.example>  BODY=7BIT "),
            Ok(mail("a@b.example"))
        );
    }

    #[test]
    fn mail_from_errors() {
        let syntax = Err(ParseError::Syntax("MAIL FROM:<address>"));
        for line in [
            &b"MAIL"[..],
            b"MAIL FROM",
            b"MAIL TO:<a@b>",
            b"MAIL FROM:",
            b"MAIL FROM:<a@b",
            b"MAIL FROM:<a@b>x",
            b"MAIL FROM:<a@b> SIZE=",
            b"MAIL FROM:<a@b> SIZE=12k",
            b"MAIL FROM:<a@b> SIZE",
            b"MAIL FROM:<a@b> BODY=BINARYMIME",
            b"MAIL FROM:<a@b>\r",
            b"MAIL FROM:<a\0@b>",
            b"MAIL FROM:<\xff@b>",
        ] {
            assert_eq!(parse(line), syntax, "{}", String::from_utf8_lossy(line));
        }
        assert_eq!(
            parse(b"MAIL FROM:<a@b> RET=HDRS"),
            Err(ParseError::UnknownParameter)
        );
        assert_eq!(
            parse(b"MAIL FROM:<a@b> SMTPUTF8=yes"),
            Err(ParseError::UnknownParameter)
        );
        assert_eq!(
            parse(b"MAIL FROM:<not-an-address>"),
            Err(ParseError::BadAddress(Role::Sender))
        );
    }

    #[test]
    fn rcpt_errors() {
        assert_eq!(
            parse(b"RCPT TO:<>"),
            Err(ParseError::BadAddress(Role::Recipient))
        );
        assert_eq!(
            parse(b"RCPT TO:<a@b..c>"),
            Err(ParseError::BadAddress(Role::Recipient))
        );
        assert_eq!(
            parse(b"RCPT TO:<a@b> NOTIFY=NEVER"),
            Err(ParseError::UnknownParameter)
        );
        assert_eq!(
            parse(b"RCPT <a@b>"),
            Err(ParseError::Syntax("RCPT TO:<address>"))
        );
        assert_eq!(parse(b"RCPT TO: <a@b> "), Ok(Command::Rcpt("a@b".into())));
        assert_eq!(
            parse(b"RCPT TO:<\"q\tx\"@c.example>"),
            Err(ParseError::BadAddress(Role::Recipient))
        );
        assert_eq!(
            parse(b"MAIL FROM:<\"q\tx\"@c.example>"),
            Err(ParseError::BadAddress(Role::Sender))
        );
    }

    #[test]
    fn other_syntax_errors_and_unknown() {
        assert_eq!(parse(b"EHLO"), Err(ParseError::Syntax("EHLO hostname")));
        assert_eq!(parse(b"EHLO \t\tT  x"), Ok(Command::Ehlo("T".into())));
        assert_eq!(parse(b"HELO a\tb"), Ok(Command::Helo("a".into())));
        assert_eq!(parse(b"EHLO \t"), Err(ParseError::Syntax("EHLO hostname")));
        assert_eq!(parse(b"EHLO "), Err(ParseError::Syntax("EHLO hostname")));
        assert_eq!(
            parse(&[b"EHLO ".as_slice(), &[b'a'; 256]].concat()),
            Err(ParseError::Syntax("EHLO hostname"))
        );
        assert_eq!(parse(b"DATA now"), Err(ParseError::Syntax("DATA")));
        assert_eq!(parse(b"QUIT now"), Err(ParseError::Syntax("QUIT")));
        assert_eq!(parse(b"VRFY"), Err(ParseError::Syntax("VRFY address")));
        assert_eq!(parse(b"FOO bar"), Err(ParseError::Unknown));
        assert_eq!(parse(b""), Err(ParseError::Unknown));
        assert_eq!(parse(b"MAILFROM:<a@b>"), Err(ParseError::Unknown));
    }

    #[test]
    fn http_request_lines() {
        for line in [
            &b"GET / HTTP/1.1"[..],
            b"POST /x HTTP/1.0",
            b"CONNECT a:25 HTTP/1.1",
            b"HEAD /",
            b"PUT /",
            b"get /",
        ] {
            assert_eq!(
                parse(line),
                Ok(Command::Http),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }
}
