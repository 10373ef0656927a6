//! `mailbridge sendmail` (also the binary called as `sendmail`): the command PHP `mail()`, cron and scripts pipe a message into; it submits through the running daemon or, when none runs, leaves the message in the maildrop; exit codes from sysexits.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::config::Config;
use crate::maildrop::Envelope;

/// sysexits.h: the command was used incorrectly.
pub const EX_USAGE: u8 = 64;
/// sysexits.h: the input data was incorrect.
pub const EX_DATAERR: u8 = 65;
/// sysexits.h: a recipient was refused.
pub const EX_NOUSER: u8 = 67;
/// sysexits.h: a service is unavailable.
pub const EX_UNAVAILABLE: u8 = 69;
/// sysexits.h: an error from the operating system (I/O).
pub const EX_IOERR: u8 = 74;
/// sysexits.h: temporary failure; the caller may try again later.
pub const EX_TEMPFAIL: u8 = 75;
/// sysexits.h: the configuration is unusable.
pub const EX_CONFIG: u8 = 78;

/// The parsed command line.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// `-t`: recipients from `To:`, `Cc:` and `Bcc:` (added to the arguments').
    pub from_headers: bool,
    /// `-i` / `-oi`: a line with a single dot does not end the message.
    pub ignore_dots: bool,
    /// `-f` / `-r`: the envelope sender.
    pub sender: Option<String>,
    /// `-F`: the full name for a `From:` that is added.
    pub full_name: Option<String>,
    /// `-v`: show the SMTP conversation on stderr.
    pub verbose: bool,
    /// `-C`: the configuration file.
    pub config: Option<PathBuf>,
    /// Recipients given as arguments.
    pub rcpts: Vec<String>,
}

/// Parse sendmail-style arguments. Options callers commonly pass that do
/// not matter here are accepted and ignored.
pub fn parse_args(args: &[String]) -> Result<Options, String> {
    let mut o = Options::default();
    let mut i = 0;
    // The value of an option: attached (`-faddr`) or the next argument.
    let value = |i: &mut usize, attached: &str, opt: &str| -> Result<String, String> {
        if !attached.is_empty() {
            return Ok(attached.to_string());
        }
        *i += 1;
        args.get(*i)
            .cloned()
            .ok_or_else(|| format!("option -{opt} needs a value"))
    };
    while i < args.len() {
        let a = &args[i];
        if a == "--" {
            o.rcpts.extend(args[i + 1..].iter().cloned());
            break;
        }
        let Some(opt) = a.strip_prefix('-').filter(|s| !s.is_empty()) else {
            o.rcpts.push(a.clone());
            i += 1;
            continue;
        };
        let (c, rest) = opt.split_at(1);
        match c {
            "t" if rest.is_empty() => o.from_headers = true,
            "i" if rest.is_empty() => o.ignore_dots = true,
            "v" if rest.is_empty() => o.verbose = true,
            "f" | "r" => o.sender = Some(value(&mut i, rest, c)?),
            "F" => o.full_name = Some(value(&mut i, rest, c)?),
            "C" => o.config = Some(PathBuf::from(value(&mut i, rest, c)?)),
            // -oi is -i; every other -oX (-oem, -odi, -odb, -oQ…) is ignored.
            "o" if rest == "i" => o.ignore_dots = true,
            "o" => {}
            // Delivery mode and error mode: -bm is the only mode there is.
            "b" if rest == "m" || rest.is_empty() => {}
            "b" => {
                return Err(format!(
                    "-b{rest} is not supported (only -bm: read a message and send it)"
                ));
            }
            "e" => {}
            // Options with a value that does not matter here.
            "B" | "N" | "R" | "V" | "L" | "h" | "O" | "X" => {
                let _ = value(&mut i, rest, c)?;
            }
            "U" | "n" | "m" | "G" | "x" => {}
            "q" => return Err("-q (queue runs) is not supported; see `mailbridge queue`".into()),
            _ => return Err(format!("unknown option {a}")),
        }
        i += 1;
    }
    Ok(o)
}

/// The message as read: line endings made CRLF, reading stopped at a
/// lone `.` unless `ignore_dots`. `None` when it is over `limit` bytes.
pub fn read_message(
    input: impl Read,
    ignore_dots: bool,
    limit: usize,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut r = BufReader::new(input);
    let mut out = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = r.read_until(b'\n', &mut line)?;
        if n == 0 {
            break;
        }
        while line.last() == Some(&b'\n') || line.last() == Some(&b'\r') {
            line.pop();
        }
        if !ignore_dots && line == b"." {
            break;
        }
        out.extend_from_slice(&line);
        out.extend_from_slice(b"\r\n");
        if out.len() > limit {
            return Ok(None);
        }
    }
    Ok(Some(out))
}

/// Addresses in the header fields called `name` (all of them).
fn header_addresses(msg: &[u8], name: &str) -> Vec<String> {
    let (fields, _) = crate::message::fields(msg);
    let mut out = Vec::new();
    for f in fields.iter().filter(|f| f.name.eq_ignore_ascii_case(name)) {
        let mut raw = msg[f.start..f.end].to_vec();
        raw.extend_from_slice(b"\r\n");
        let Some(m) = mail_parser::MessageParser::new().parse_headers(&raw) else {
            continue;
        };
        let Some(h) = m.headers().first() else {
            continue;
        };
        let list: Vec<&mail_parser::Addr> = match h.value().as_address() {
            Some(mail_parser::Address::List(l)) => l.iter().collect(),
            Some(mail_parser::Address::Group(g)) => {
                g.iter().flat_map(|g| g.addresses.iter()).collect()
            }
            None => Vec::new(),
        };
        out.extend(
            list.into_iter()
                .filter_map(|a| a.address().map(|s| s.trim().to_string()))
                .filter(|s| !s.is_empty()),
        );
    }
    out
}

/// What [`prepare`] made of the input.
#[derive(Debug, PartialEq, Eq)]
pub struct Prepared {
    /// The envelope.
    pub envelope: Envelope,
    /// The message to send (CRLF, `Bcc:` removed, `From:`/`Date:`/`Message-ID:` present).
    pub message: Vec<u8>,
}

/// Build the envelope and the final message. `default_sender` is used
/// without `-f` and without a `From:` address; `hostname` for a new
/// `Message-ID:`.
pub fn prepare(
    o: &Options,
    msg: Vec<u8>,
    default_sender: &str,
    hostname: &str,
) -> Result<Prepared, (u8, String)> {
    let mut rcpts: Vec<String> = Vec::new();
    for r in &o.rcpts {
        // `mail a@x,b@y` style lists are common in scripts.
        rcpts.extend(
            r.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from),
        );
    }
    if o.from_headers {
        for h in ["To", "Cc", "Bcc"] {
            rcpts.extend(header_addresses(&msg, h));
        }
    }
    let mut seen = std::collections::HashSet::new();
    rcpts.retain(|r| seen.insert(r.to_ascii_lowercase()));
    if rcpts.is_empty() {
        return Err((
            EX_USAGE,
            if o.from_headers {
                "no recipients: the message has no To:, Cc: or Bcc: address".into()
            } else {
                "no recipients (give them as arguments, or use -t to take them from the header)"
                    .into()
            },
        ));
    }
    for r in &rcpts {
        if !crate::address::is_valid_mailbox(r) {
            return Err((EX_NOUSER, format!("`{r}` is not an email address")));
        }
    }
    let header_from = header_addresses(&msg, "From").into_iter().next();
    let sender = o
        .sender
        .clone()
        .or(header_from.clone())
        .unwrap_or_else(|| default_sender.to_string());
    if !sender.is_empty() && !crate::address::is_valid_mailbox(&sender) {
        return Err((
            EX_DATAERR,
            format!("sender `{sender}` is not an email address"),
        ));
    }
    // Bcc: never travels in the header (Postfix removes it too).
    let (fields, body_start) = crate::message::fields(&msg);
    let mut out = Vec::with_capacity(msg.len() + 256);
    let has = |n: &str| fields.iter().any(|f| f.name.eq_ignore_ascii_case(n));
    if !has("From") && !sender.is_empty() {
        let name = o.full_name.as_deref().unwrap_or("");
        out.extend_from_slice(
            format!(
                "From: {}\r\n",
                crate::message::format_mailbox(name, &sender)
            )
            .as_bytes(),
        );
    }
    if !has("Date") {
        out.extend_from_slice(
            format!("Date: {}\r\n", chrono::Local::now().to_rfc2822()).as_bytes(),
        );
    }
    if !has("Message-ID") {
        out.extend_from_slice(
            format!("Message-ID: <{}@{hostname}>\r\n", crate::spool::new_id()).as_bytes(),
        );
    }
    let mut pos = 0;
    for f in &fields {
        out.extend_from_slice(&msg[pos..f.start]);
        if !f.name.eq_ignore_ascii_case("Bcc") {
            out.extend_from_slice(&msg[f.start..f.end]);
        }
        pos = f.end;
    }
    if fields.is_empty() || body_start == pos {
        // No header at all, or it ended without an empty line.
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(&msg[pos..]);
    Ok(Prepared {
        envelope: Envelope {
            from: sender,
            rcpts,
        },
        message: out,
    })
}

/// How a submission through the daemon ended.
enum Submitted {
    /// `250` after the data.
    Queued(String),
    /// Nothing listens (or it wants AUTH): use the maildrop.
    NotThere(String),
    /// Refused: exit code and message.
    Failed(u8, String),
}

/// Where the CLI connects for `listen.address` (a wildcard means loopback).
fn connect_addr(listen: &str) -> Option<SocketAddr> {
    let mut a: SocketAddr = listen.parse().ok()?;
    if a.ip().is_unspecified() {
        a.set_ip(if a.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    Some(a)
}

fn smtp_submit(addr: SocketAddr, p: &Prepared, verbose: bool) -> Submitted {
    let timeout = Duration::from_secs(60);
    let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => return Submitted::NotThere(format!("nothing answers at {addr}: {e}")),
    };
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    let Ok(read_half) = s.try_clone() else {
        return Submitted::Failed(EX_IOERR, "cannot use the connection".into());
    };
    let mut r = BufReader::new(read_half);
    let mut reply = || -> Result<String, String> {
        loop {
            let mut line = String::new();
            match r.read_line(&mut line) {
                Ok(0) => return Err("the daemon closed the connection".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("reading the daemon's reply: {e}")),
            }
            let line = line.trim_end().to_string();
            if verbose {
                eprintln!("<<< {line}");
            }
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return Ok(line);
            }
        }
    };
    macro_rules! step {
        ($cmd:expr, $want:expr) => {{
            let cmd: String = $cmd;
            if !cmd.is_empty() {
                if verbose {
                    eprintln!(">>> {cmd}");
                }
                if let Err(e) = s.write_all(format!("{cmd}\r\n").as_bytes()) {
                    return Submitted::Failed(EX_TEMPFAIL, format!("writing to the daemon: {e}"));
                }
            }
            match reply() {
                Ok(line) if line.starts_with($want) => line,
                Ok(line) => return outcome_of(&cmd, line),
                Err(e) => return Submitted::Failed(EX_TEMPFAIL, e),
            }
        }};
    }
    step!(String::new(), "220");
    step!("EHLO localhost".into(), "250");
    let env = &p.envelope;
    let utf8 = !env.from.is_ascii() || env.rcpts.iter().any(|r| !r.is_ascii());
    let eight = !p.message.is_ascii();
    step!(
        format!(
            "MAIL FROM:<{}>{}{}",
            env.from,
            if utf8 { " SMTPUTF8" } else { "" },
            if eight { " BODY=8BITMIME" } else { "" }
        ),
        "250"
    );
    for rcpt in &env.rcpts {
        step!(format!("RCPT TO:<{rcpt}>"), "250");
    }
    step!("DATA".into(), "354");
    let data = crate::transport::smtp::data_form(&p.message);
    if let Err(e) = s.write_all(&data) {
        return Submitted::Failed(EX_TEMPFAIL, format!("writing to the daemon: {e}"));
    }
    let done = step!(String::new(), "250");
    let _ = s.write_all(b"QUIT\r\n");
    Submitted::Queued(done)
}

fn outcome_of(cmd: &str, line: String) -> Submitted {
    // The listener wants AUTH (listen.require_auth): the maildrop takes
    // local mail without it.
    if line.starts_with("530") {
        return Submitted::NotThere(format!("the listener requires AUTH ({line})"));
    }
    let what = if cmd.is_empty() {
        "the daemon".to_string()
    } else {
        format!("`{}`", cmd.split(':').next().unwrap_or(cmd))
    };
    let code = if line.starts_with('4') {
        EX_TEMPFAIL
    } else if cmd.starts_with("RCPT") {
        EX_NOUSER
    } else if line.starts_with('5') {
        EX_DATAERR
    } else {
        EX_UNAVAILABLE
    };
    Submitted::Failed(code, format!("{what} refused: {line}"))
}

/// The configuration sendmail reads: `-C`, else `MAILBRIDGE_CONFIG`, else
/// `/etc/mailbridge/config.toml`; parsed but not validated (secrets the
/// daemon reads need not be readable by the caller).
fn config(o: &Options, given: Option<PathBuf>) -> Result<Config, String> {
    let path = o
        .config
        .clone()
        .or(given)
        .or_else(|| std::env::var_os("MAILBRIDGE_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/etc/mailbridge/config.toml"));
    Config::load_unchecked(&path).map_err(|e| e.to_string())
}

fn login_name() -> String {
    std::env::var("LOGNAME")
        .or_else(|_| std::env::var("USER"))
        .ok()
        .filter(|u| !u.is_empty() && crate::address::is_valid_mailbox(&format!("{u}@x.example")))
        .unwrap_or_else(|| "nobody".into())
}

/// Run as sendmail with `args` (without the program name); `config` is
/// `mailbridge --config` when given.
pub fn main(args: &[String], config_path: Option<PathBuf>) -> ExitCode {
    let fail = |code: u8, msg: &str| {
        eprintln!("sendmail: {msg}");
        ExitCode::from(code)
    };
    let o = match parse_args(args) {
        Ok(o) => o,
        Err(e) => {
            return fail(
                EX_USAGE,
                &format!(
                    "{e}\nusage: sendmail [-t] [-i] [-f sender] [-F name] [-v] [recipient ...] < message"
                ),
            );
        }
    };
    let cfg = match config(&o, config_path) {
        Ok(c) => c,
        Err(e) => return fail(EX_CONFIG, &e),
    };
    let limit = cfg.listen.max_message_size;
    let msg = match read_message(std::io::stdin().lock(), o.ignore_dots, limit) {
        Ok(Some(m)) => m,
        Ok(None) => {
            return fail(
                EX_DATAERR,
                &format!("the message is larger than listen.max_message_size ({limit} bytes)"),
            );
        }
        Err(e) => return fail(EX_IOERR, &format!("reading the message: {e}")),
    };
    let hostname = cfg.effective_hostname();
    let default_sender = match cfg.upstream.effective_mailbox() {
        "" => format!("{}@{hostname}", login_name()),
        m => m.to_string(),
    };
    let p = match prepare(&o, msg, &default_sender, &hostname) {
        Ok(p) => p,
        Err((code, e)) => return fail(code, &e),
    };
    let why = match connect_addr(&cfg.listen.address) {
        Some(addr) => match smtp_submit(addr, &p, o.verbose) {
            Submitted::Queued(line) => {
                if o.verbose {
                    eprintln!("sendmail: queued by the daemon: {line}");
                }
                return ExitCode::SUCCESS;
            }
            Submitted::Failed(code, e) => return fail(code, &e),
            Submitted::NotThere(why) => why,
        },
        None => format!("listen.address `{}` is not an address", cfg.listen.address),
    };
    let dir = crate::maildrop::dir(&cfg);
    match crate::maildrop::write(&dir, &p.envelope, &p.message) {
        Ok(path) => {
            if o.verbose {
                eprintln!(
                    "sendmail: {why}; left in the maildrop as {} (sent when mailbridge runs)",
                    path.display()
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(
            EX_TEMPFAIL,
            &format!(
                "mailbridge is not accepting mail ({why}) and the maildrop {} is not writable: {e}",
                dir.display()
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn options_callers_pass() {
        let o = parse_args(&args(
            "-t -i -f app@example.com -FWeb -oem -odi -B 8BITMIME -N never -- x@example.com",
        ))
        .unwrap();
        assert!(o.from_headers && o.ignore_dots);
        assert_eq!(o.sender.as_deref(), Some("app@example.com"));
        assert_eq!(o.full_name.as_deref(), Some("Web"));
        assert_eq!(o.rcpts, vec!["x@example.com"]);
        let o = parse_args(&args("-oi -fa@b.example -bm -em r@x.example")).unwrap();
        assert!(o.ignore_dots && !o.from_headers);
        assert_eq!(o.sender.as_deref(), Some("a@b.example"));
        assert!(parse_args(&args("-bp")).is_err());
        assert!(parse_args(&args("-Z")).is_err());
        assert!(parse_args(&args("-f")).is_err());
    }

    #[test]
    fn lf_becomes_crlf_and_a_dot_ends_without_i() {
        let m = read_message(&b"Subject: x\n\nline\n.\nafter\n"[..], false, 1000)
            .unwrap()
            .unwrap();
        assert_eq!(m, b"Subject: x\r\n\r\nline\r\n");
        let m = read_message(&b"Subject: x\r\n\r\n.\nafter"[..], true, 1000)
            .unwrap()
            .unwrap();
        assert_eq!(m, b"Subject: x\r\n\r\n.\r\nafter\r\n");
        assert!(
            read_message(&[b'a'; 2000][..], true, 1000)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn t_takes_header_recipients_and_drops_bcc() {
        let o = parse_args(&args("-t")).unwrap();
        let msg = b"To: A <a@x.example>, b@x.example\r\nBcc: hidden@y.example,\r\n other@y.example\r\nSubject: s\r\n\r\nbody\r\n".to_vec();
        let p = prepare(&o, msg, "me@h.example", "h.example").unwrap();
        assert_eq!(
            p.envelope.rcpts,
            vec![
                "a@x.example",
                "b@x.example",
                "hidden@y.example",
                "other@y.example"
            ]
        );
        let text = String::from_utf8(p.message).unwrap();
        assert!(!text.contains("hidden") && !text.contains("Bcc"), "{text}");
        assert!(text.contains("\r\nSubject: s\r\n\r\nbody\r\n"), "{text}");
        assert!(text.starts_with("From: <me@h.example>\r\nDate: "), "{text}");
        assert!(
            text.contains("Message-ID: <") && text.contains("@h.example>\r\n"),
            "{text}"
        );
        assert_eq!(p.envelope.from, "me@h.example");
    }

    #[test]
    fn existing_headers_are_kept_and_errors_have_codes() {
        let o = parse_args(&args("-F Web r@x.example")).unwrap();
        let msg = b"From: site@s.example\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <k@s>\r\n\r\nb\r\n".to_vec();
        let p = prepare(&o, msg.clone(), "me@h.example", "h").unwrap();
        assert_eq!(p.message, msg);
        assert_eq!(p.envelope.from, "site@s.example");
        let none = parse_args(&[]).unwrap();
        assert_eq!(
            prepare(&none, msg.clone(), "", "h").unwrap_err().0,
            EX_USAGE
        );
        let bad = parse_args(&args("not-an-address")).unwrap();
        assert_eq!(prepare(&bad, msg, "", "h").unwrap_err().0, EX_NOUSER);
    }
}
