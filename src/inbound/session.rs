//! Sans-IO SMTP session state machine: bytes in, replies and steps out; `serve` does the I/O.
//!
//! The driver owns the input buffer and the socket. It calls [`Session::feed`]
//! with everything received so far; the session consumes every complete
//! command in order (pipelining, RFC 2920), queues the replies in
//! [`Session::take_output`] and returns a [`Step`]: read more, hand a message
//! to the sink (then report the result with [`Session::sink_result`]), or
//! close. The driver writes the queued replies before it blocks on a read, so
//! a pipelined group is answered in one write, in order.
//!
//! Room for STARTTLS and AUTH: both are recognised by the parser and answered
//! `502 5.5.1` for now. STARTTLS will become a `Step::StartTls` returned after
//! the `220` reply with the input buffer cleared (anything pipelined behind
//! STARTTLS is discarded, CVE-2011-0411), and a `tls_established` call that
//! resets the session to "no HELO yet". AUTH will become a `Phase` that reads
//! continuation lines the same way `Phase::Data` reads the message.

use std::net::SocketAddr;
use std::sync::Arc;

use super::data::{self, DataOutcome, DataReader};
use super::parser::{self, Command, Line, ParseError, Role};
use super::{Incoming, Settings, SinkError};

/// What the driver must do next.
#[derive(Debug)]
pub enum Step {
    /// All complete input is consumed: write the queued replies, then read more.
    NeedInput,
    /// A message is complete: write the queued replies, give it to the sink
    /// and report the result with [`Session::sink_result`] before feeding again.
    Message(Incoming),
    /// Write the queued replies and close the connection.
    Close,
}

/// Where the session is.
#[derive(Debug)]
enum Phase {
    /// Reading command lines.
    Command,
    /// Reading the message after `354`.
    Data(DataReader),
    /// A message was handed to the driver; waiting for the sink's answer.
    Sink { id: String },
    /// Done; nothing more is read.
    Closed,
}

/// The open mail transaction (after `MAIL FROM`).
#[derive(Debug)]
struct Transaction {
    from: String,
    rcpts: Vec<String>,
    smtputf8: bool,
    eight_bit: bool,
}

/// Generates queue ids (replaceable so tests get fixed ids).
pub type IdSource = Box<dyn FnMut() -> String + Send>;
/// Gives the current time (replaceable so tests get a fixed date).
pub type Clock = Box<dyn FnMut() -> chrono::DateTime<chrono::FixedOffset> + Send>;

/// One SMTP session with one client.
pub struct Session {
    settings: Arc<Settings>,
    client: SocketAddr,
    phase: Phase,
    /// The HELO/EHLO name, and whether it was EHLO.
    helo: Option<(String, bool)>,
    tx: Option<Transaction>,
    errors: u32,
    /// Skipping the rest of an over-long command line, up to its LF.
    discarding: bool,
    out: Vec<u8>,
    new_id: IdSource,
    now: Clock,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("client", &self.client)
            .field("phase", &self.phase)
            .finish_non_exhaustive()
    }
}

const REPLY_TOO_LONG: &str = "500 5.5.2 Line too long";
const REPLY_UNKNOWN: &str = "500 5.5.2 Error: command not recognized";
const REPLY_NOT_IMPLEMENTED: &str = "502 5.5.1 Error: command not implemented";
const REPLY_TOO_BIG: &str = "552 5.3.4 Message size exceeds fixed maximum message size";

impl Session {
    /// A new session; the `220` greeting is already queued.
    pub fn new(settings: Arc<Settings>, client: SocketAddr) -> Self {
        let now: Clock = Box::new(|| chrono::Local::now().fixed_offset());
        Session::with_sources(settings, client, Box::new(crate::spool::new_id), now)
    }

    /// A new session with its own queue ids and clock (for tests).
    pub fn with_sources(
        settings: Arc<Settings>,
        client: SocketAddr,
        new_id: IdSource,
        now: Clock,
    ) -> Self {
        let mut s = Session {
            settings,
            client,
            phase: Phase::Command,
            helo: None,
            tx: None,
            errors: 0,
            discarding: false,
            out: Vec::new(),
            new_id,
            now,
        };
        let greeting = format!("220 {} ESMTP mailbridge", s.settings.hostname);
        s.reply(&greeting);
        s
    }

    /// Replies queued since the last call, in order.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// Whether the session is reading a message (the DATA timeout applies, and
    /// a shutdown lets it finish).
    pub fn in_data(&self) -> bool {
        matches!(self.phase, Phase::Data(_))
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    /// The client was silent too long: queue `421 4.4.2` and close.
    pub fn timeout(&mut self) {
        let line = format!(
            "421 4.4.2 {} Error: timeout exceeded",
            self.settings.hostname
        );
        self.close_with(&line);
    }

    /// The server is shutting down: queue `421 4.3.2` and close.
    pub fn shutdown(&mut self) {
        let line = format!("421 4.3.2 {} Service shutting down", self.settings.hostname);
        self.close_with(&line);
    }

    /// Consume as much of `input` as possible (consumed bytes are removed from
    /// it; what remains is an incomplete line or follows a complete message).
    pub fn feed(&mut self, input: &mut Vec<u8>) -> Step {
        let mut pos = 0;
        let step = loop {
            match &mut self.phase {
                Phase::Closed => {
                    pos = input.len();
                    break Step::Close;
                }
                // The driver must report the sink result first; treat a missing
                // one as a failure rather than acknowledging anything.
                Phase::Sink { .. } => self.sink_result(Err(SinkError::Io)),
                Phase::Data(reader) => {
                    let (n, outcome) = reader.feed(&input[pos..]);
                    pos += n;
                    match outcome {
                        None => break Step::NeedInput,
                        Some(outcome) => {
                            if let Some(msg) = self.data_done(outcome) {
                                break Step::Message(msg);
                            }
                        }
                    }
                }
                Phase::Command if self.discarding => {
                    match input[pos..].iter().position(|&b| b == b'\n') {
                        Some(i) => {
                            pos += i + 1;
                            self.discarding = false;
                        }
                        None => {
                            pos = input.len();
                            break Step::NeedInput;
                        }
                    }
                }
                Phase::Command => {
                    match parser::split_line(&input[pos..], self.settings.listen.max_command_length)
                    {
                        Line::Incomplete => break Step::NeedInput,
                        Line::TooLong => {
                            self.discarding = true;
                            self.error(REPLY_TOO_LONG);
                        }
                        Line::Complete(line, n) => {
                            let start = pos;
                            pos += n;
                            self.command(&input[start..start + line.len()]);
                        }
                    }
                }
            }
        };
        input.drain(..pos);
        step
    }

    /// The sink's answer for the message of the last [`Step::Message`].
    pub fn sink_result(&mut self, result: Result<(), SinkError>) {
        let Phase::Sink { id } = &self.phase else {
            return;
        };
        let line = match result {
            Ok(()) => format!("250 2.0.0 Ok: queued as {id}"),
            Err(SinkError::Full) => "452 4.3.1 Insufficient system storage".to_string(),
            Err(SinkError::Io) => "451 4.3.0 Error: queue file write error".to_string(),
        };
        self.phase = Phase::Command;
        self.reply(&line);
    }

    fn reply(&mut self, line: &str) {
        self.out.extend_from_slice(line.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    fn close_with(&mut self, line: &str) {
        if !self.is_closed() {
            self.reply(line);
            self.phase = Phase::Closed;
        }
    }

    /// An error reply; too many of them end the session (after the reply, as Postfix does).
    fn error(&mut self, line: &str) {
        self.reply(line);
        self.errors += 1;
        if self.errors > self.settings.listen.max_errors {
            self.close_with("421 4.7.0 Too many errors");
        }
    }

    fn command(&mut self, line: &[u8]) {
        let cmd = match parser::parse(line) {
            Ok(cmd) => cmd,
            Err(e) => {
                let line = match e {
                    ParseError::Unknown => REPLY_UNKNOWN.to_string(),
                    ParseError::Syntax(usage) => format!("501 5.5.4 Syntax: {usage}"),
                    ParseError::BadAddress(Role::Sender) => {
                        "553 5.1.7 Bad sender address syntax".to_string()
                    }
                    ParseError::BadAddress(Role::Recipient) => {
                        "553 5.1.3 Bad recipient address syntax".to_string()
                    }
                    ParseError::UnknownParameter => "555 5.5.4 Unsupported parameter".to_string(),
                };
                return self.error(&line);
            }
        };
        let limits = &self.settings.listen;
        match cmd {
            Command::Ehlo(name) => {
                self.helo = Some((name, true));
                self.tx = None;
                let host = &self.settings.hostname;
                let size = limits.max_message_size;
                let lines = format!(
                    "250-{host}\r\n250-SIZE {size}\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n250 PIPELINING"
                );
                self.reply(&lines);
            }
            Command::Helo(name) => {
                self.helo = Some((name, false));
                self.tx = None;
                let line = format!("250 {}", self.settings.hostname);
                self.reply(&line);
            }
            Command::Mail(_) if self.helo.is_none() => {
                self.error("503 5.5.1 Error: send HELO/EHLO first")
            }
            Command::Mail(_) if self.tx.is_some() => {
                self.error("503 5.5.1 Error: nested MAIL command")
            }
            Command::Mail(m) => {
                if m.size.is_some_and(|s| s > limits.max_message_size as u64) {
                    self.reply(REPLY_TOO_BIG);
                } else if !m.address.is_ascii() && !m.smtputf8 {
                    self.error("553 5.6.7 Non-ASCII sender address needs SMTPUTF8");
                } else {
                    self.tx = Some(Transaction {
                        from: m.address,
                        rcpts: Vec::new(),
                        smtputf8: m.smtputf8,
                        eight_bit: m.eight_bit,
                    });
                    self.reply("250 2.1.0 Ok");
                }
            }
            Command::Rcpt(addr) => {
                let max = limits.max_recipients;
                match self.tx.as_mut() {
                    None => self.error("503 5.5.1 Error: need MAIL command"),
                    Some(tx) if !addr.is_ascii() && !tx.smtputf8 => {
                        self.error("553 5.6.7 Non-ASCII recipient address needs SMTPUTF8")
                    }
                    Some(tx) if tx.rcpts.contains(&addr) => self.reply("250 2.1.5 Ok"),
                    Some(tx) if tx.rcpts.len() >= max => {
                        self.reply("452 4.5.3 Too many recipients")
                    }
                    Some(tx) => {
                        tx.rcpts.push(addr);
                        self.reply("250 2.1.5 Ok");
                    }
                }
            }
            Command::Data => {
                if self.tx.as_ref().is_none_or(|tx| tx.rcpts.is_empty()) {
                    return self.error("503 5.5.1 Error: need RCPT command");
                }
                self.phase = Phase::Data(DataReader::new(
                    limits.max_message_size,
                    limits.bare_line_endings,
                ));
                self.reply("354 End data with <CR><LF>.<CR><LF>");
            }
            Command::Rset => {
                self.tx = None;
                self.reply("250 2.0.0 Ok");
            }
            Command::Noop => self.reply("250 2.0.0 Ok"),
            Command::Quit => self.close_with("221 2.0.0 Bye"),
            Command::Vrfy => self
                .reply("252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery"),
            Command::Help => {
                self.reply("214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP")
            }
            Command::StartTls | Command::Auth | Command::NotImplemented => {
                self.error(REPLY_NOT_IMPLEMENTED)
            }
            Command::Http => self.close_with("554 5.7.0 Error: this is an SMTP server, not HTTP"),
        }
    }

    /// The DATA transfer ended: a message for the sink, or an error reply.
    fn data_done(&mut self, outcome: DataOutcome) -> Option<Incoming> {
        self.phase = Phase::Command;
        // Whatever happens, the transaction is over (RFC 5321 §4.1.1.4).
        let Some(tx) = self.tx.take() else {
            // Unreachable: DATA needs a transaction. Answer rather than hang.
            self.reply("451 4.3.0 Error: no transaction");
            return None;
        };
        let body = match outcome {
            DataOutcome::Complete(body) => body,
            DataOutcome::TooBig => {
                self.reply(REPLY_TOO_BIG);
                return None;
            }
            DataOutcome::BareLineEnding => {
                self.reply("550 5.6.11 Bare CR or LF not allowed; use CRLF line endings");
                return None;
            }
        };
        let info = data::scan_headers(&body);
        if info.received > self.settings.listen.max_received_headers {
            self.reply("554 5.4.6 Too many hops (mail loop)");
            return None;
        }
        let id = (self.new_id)();
        let date = (self.now)().to_rfc2822();
        let host = &self.settings.hostname;
        let (helo, esmtp) = self.helo.clone().unwrap_or_default();
        let mut added = String::new();
        let message_id = match info.message_id.clone() {
            Some(existing) => existing,
            None => {
                let value = format!("<{id}@{host}>");
                added.push_str(&format!("Message-ID: {value}\r\n"));
                value
            }
        };
        if !info.has_date {
            added.push_str(&format!("Date: {date}\r\n"));
        }
        let ip = match self.client.ip().to_canonical() {
            std::net::IpAddr::V4(v4) => v4.to_string(),
            std::net::IpAddr::V6(v6) => format!("IPv6:{v6}"),
        };
        let with = if esmtp { "ESMTP" } else { "SMTP" };
        // Folded like Postfix's, so the line stays short whatever the names.
        let mut received = format!(
            "Received: from {helo} ([{ip}])\r\n\tby {host} (mailbridge) with {with} id {id}"
        );
        if let [rcpt] = tx.rcpts.as_slice() {
            received.push_str(&format!("\r\n\tfor <{rcpt}>"));
        }
        received.push_str(&format!("; {date}\r\n"));
        let body = data::assemble(&body, &info, received.as_bytes(), added.as_bytes());
        self.phase = Phase::Sink { id: id.clone() };
        Some(Incoming {
            id,
            from: tx.from,
            rcpts: tx.rcpts,
            body,
            client: self.client,
            helo,
            message_id: Some(message_id),
            smtputf8: tx.smtputf8,
            eight_bit: tx.eight_bit,
            auth_user: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BareLineEndings, Listen};

    const DATE: &str = "Tue, 2 Jan 2024 03:04:05 +0000";
    const EHLO_REPLY: &str = "250-mx.test\r\n250-SIZE 10000\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n250 PIPELINING\r\n";

    fn listen() -> Listen {
        Listen {
            max_message_size: 10_000,
            max_command_length: 512,
            ..Listen::default()
        }
    }

    fn session_with(listen: Listen) -> Session {
        let settings = Arc::new(Settings {
            hostname: "mx.test".into(),
            listen,
        });
        let mut n = 0;
        let ids: IdSource = Box::new(move || {
            n += 1;
            format!("ID{n}")
        });
        let clock: Clock = Box::new(|| {
            chrono::DateTime::parse_from_rfc3339("2024-01-02T03:04:05+00:00").unwrap_or_default()
        });
        let client = SocketAddr::from(([192, 0, 2, 7], 40000));
        Session::with_sources(settings, client, ids, clock)
    }

    /// What a driver would see: all output, the messages, and whether it closed.
    struct Run {
        out: String,
        msgs: Vec<Incoming>,
        closed: bool,
    }

    /// Drive `s` with `input` cut into `chunk`-byte pieces, answering the sink with `results` in turn (then Ok).
    fn drive(
        s: &mut Session,
        input: &[u8],
        chunk: usize,
        results: &[Result<(), SinkError>],
    ) -> Run {
        let mut run = Run {
            out: String::new(),
            msgs: vec![],
            closed: false,
        };
        let mut buf = Vec::new();
        let mut results = results.iter().copied();
        let mut chunks = input.chunks(chunk.max(1));
        loop {
            let step = s.feed(&mut buf);
            run.out.push_str(&String::from_utf8_lossy(&s.take_output()));
            match step {
                Step::Close => {
                    run.closed = true;
                    return run;
                }
                Step::Message(m) => {
                    run.msgs.push(m);
                    s.sink_result(results.next().unwrap_or(Ok(())));
                }
                Step::NeedInput => match chunks.next() {
                    Some(c) => buf.extend_from_slice(c),
                    None => return run,
                },
            }
        }
    }

    fn run(input: &str) -> Run {
        drive(
            &mut session_with(listen()),
            input.as_bytes(),
            usize::MAX,
            &[],
        )
    }

    const TRANSACTION: &str = "EHLO client.example\r\nMAIL FROM:<a@example.com> BODY=8BITMIME\r\nRCPT TO:<b@example.org>\r\nDATA\r\nSubject: hi\r\n\r\nHello\r\n..dot\r\n.\r\nQUIT\r\n";

    #[test]
    fn pipelined_transaction_exact_bytes() {
        let r = run(TRANSACTION);
        let expected = format!(
            "220 mx.test ESMTP mailbridge\r\n{EHLO_REPLY}250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Ok: queued as ID1\r\n221 2.0.0 Bye\r\n"
        );
        assert_eq!(r.out, expected);
        assert!(r.closed);
        assert_eq!(r.msgs.len(), 1);
        let m = &r.msgs[0];
        let body = format!(
            "Received: from client.example ([192.0.2.7])\r\n\tby mx.test (mailbridge) with ESMTP id ID1\r\n\tfor <b@example.org>; {DATE}\r\nSubject: hi\r\nMessage-ID: <ID1@mx.test>\r\nDate: {DATE}\r\n\r\nHello\r\n.dot\r\n"
        );
        assert_eq!(String::from_utf8_lossy(&m.body), body);
        assert_eq!(
            (
                m.id.as_str(),
                m.from.as_str(),
                m.rcpts.as_slice(),
                m.helo.as_str()
            ),
            (
                "ID1",
                "a@example.com",
                &["b@example.org".to_string()][..],
                "client.example"
            )
        );
        assert_eq!(m.message_id.as_deref(), Some("<ID1@mx.test>"));
        assert!(m.eight_bit && !m.smtputf8);
    }

    #[test]
    fn any_chunking_gives_the_same_bytes() {
        let whole = run(TRANSACTION);
        for chunk in [1, 2, 3, 5, 7, 64] {
            let r = drive(
                &mut session_with(listen()),
                TRANSACTION.as_bytes(),
                chunk,
                &[],
            );
            assert_eq!(r.out, whole.out, "chunk {chunk}");
            assert_eq!(r.msgs, whole.msgs, "chunk {chunk}");
        }
    }

    #[test]
    fn commands_may_end_in_bare_lf() {
        let r = run("helo c\nnoop\nquit\n");
        assert_eq!(
            r.out,
            "220 mx.test ESMTP mailbridge\r\n250 mx.test\r\n250 2.0.0 Ok\r\n221 2.0.0 Bye\r\n"
        );
    }

    #[test]
    fn existing_headers_kept_helo_is_smtp_several_rcpts() {
        let r = run(
            "HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<x@y.z>\r\nRCPT TO:<w@y.z>\r\nRCPT TO:<x@y.z>\r\nDATA\r\nMessage-Id: <m@c>\r\nDate: then\r\n\r\nb\r\n.\r\n",
        );
        assert_eq!(r.msgs.len(), 1, "{}", r.out);
        let m = &r.msgs[0];
        assert_eq!(m.from, "");
        assert_eq!(m.rcpts, ["x@y.z", "w@y.z"]);
        assert_eq!(m.message_id.as_deref(), Some("<m@c>"));
        let body = format!(
            "Received: from c ([192.0.2.7])\r\n\tby mx.test (mailbridge) with SMTP id ID1; {DATE}\r\nMessage-Id: <m@c>\r\nDate: then\r\n\r\nb\r\n"
        );
        assert_eq!(String::from_utf8_lossy(&m.body), body);
    }

    #[test]
    fn recipient_limit_keeps_earlier_ones() {
        let mut input = String::from("EHLO c\r\nMAIL FROM:<a@b.c>\r\n");
        for i in 0..101 {
            input.push_str(&format!("RCPT TO:<r{i}@b.c>\r\n"));
        }
        input.push_str("DATA\r\nx\r\n.\r\n");
        let r = run(&input);
        let expected = format!(
            "220 mx.test ESMTP mailbridge\r\n{EHLO_REPLY}250 2.1.0 Ok\r\n{}452 4.5.3 Too many recipients\r\n354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Ok: queued as ID1\r\n",
            "250 2.1.5 Ok\r\n".repeat(100)
        );
        assert_eq!(r.out, expected);
        assert_eq!(r.msgs[0].rcpts.len(), 100);
        assert_eq!(r.msgs[0].rcpts[99], "r99@b.c");
    }

    #[test]
    fn rset_and_sequence_errors() {
        let r = run(
            "MAIL FROM:<a@b.c>\r\nEHLO c\r\nRCPT TO:<a@b.c>\r\nDATA\r\nMAIL FROM:<a@b.c>\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nRSET\r\nDATA\r\nRCPT TO:<d@e.f>\r\n",
        );
        let expected = format!(
            "220 mx.test ESMTP mailbridge\r\n503 5.5.1 Error: send HELO/EHLO first\r\n{EHLO_REPLY}503 5.5.1 Error: need MAIL command\r\n503 5.5.1 Error: need RCPT command\r\n250 2.1.0 Ok\r\n503 5.5.1 Error: nested MAIL command\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok\r\n503 5.5.1 Error: need RCPT command\r\n503 5.5.1 Error: need MAIL command\r\n"
        );
        assert_eq!(r.out, expected);
        assert!(!r.closed);
    }

    #[test]
    fn syntax_and_parameter_errors() {
        let r = run(
            "EHLO c\r\nFOO\r\nMAIL FROM:<a@b.c> RET=FULL\r\nMAIL FROM:<bad>\r\nMAIL FROM:<a@b.c\r\nMAIL FROM:<ü@b.c>\r\nMAIL FROM:<ü@b.c> SMTPUTF8\r\nRCPT TO:<nope>\r\nRCPT TO:<ö@b.c>\r\nVRFY x\r\nHELP\r\nNOOP\r\nAUTH PLAIN\r\nSTARTTLS\r\n",
        );
        let expected = format!(
            "220 mx.test ESMTP mailbridge\r\n{EHLO_REPLY}500 5.5.2 Error: command not recognized\r\n555 5.5.4 Unsupported parameter\r\n553 5.1.7 Bad sender address syntax\r\n501 5.5.4 Syntax: MAIL FROM:<address>\r\n553 5.6.7 Non-ASCII sender address needs SMTPUTF8\r\n250 2.1.0 Ok\r\n553 5.1.3 Bad recipient address syntax\r\n250 2.1.5 Ok\r\n252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery\r\n214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP\r\n250 2.0.0 Ok\r\n502 5.5.1 Error: command not implemented\r\n502 5.5.1 Error: command not implemented\r\n"
        );
        assert_eq!(r.out, expected);
        assert!(!r.closed);
    }

    #[test]
    fn too_many_errors_closes() {
        let r = drive(
            &mut session_with(Listen {
                max_errors: 2,
                ..listen()
            }),
            b"X\r\nY\r\nNOOP\r\nZ\r\nNOOP\r\n",
            usize::MAX,
            &[],
        );
        let e = "500 5.5.2 Error: command not recognized\r\n";
        assert_eq!(
            r.out,
            format!(
                "220 mx.test ESMTP mailbridge\r\n{e}{e}250 2.0.0 Ok\r\n{e}421 4.7.0 Too many errors\r\n"
            )
        );
        assert!(r.closed);
    }

    #[test]
    fn http_is_closed_at_once() {
        let r = run("GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(
            r.out,
            "220 mx.test ESMTP mailbridge\r\n554 5.7.0 Error: this is an SMTP server, not HTTP\r\n"
        );
        assert!(r.closed);
    }

    #[test]
    fn long_command_line_is_refused_with_bounded_memory() {
        let mut s = session_with(listen());
        let mut buf = Vec::new();
        let mut out = String::new();
        let chunk = vec![b'A'; 8192];
        for _ in 0..(10 << 20) / 8192 {
            buf.extend_from_slice(&chunk);
            assert!(matches!(s.feed(&mut buf), Step::NeedInput));
            assert!(buf.len() < 512, "{}", buf.len());
            out.push_str(&String::from_utf8_lossy(&s.take_output()));
        }
        buf.extend_from_slice(b"AAAA\r\nNOOP\r\n");
        assert!(matches!(s.feed(&mut buf), Step::NeedInput));
        out.push_str(&String::from_utf8_lossy(&s.take_output()));
        assert_eq!(
            out,
            "220 mx.test ESMTP mailbridge\r\n500 5.5.2 Line too long\r\n250 2.0.0 Ok\r\n"
        );
        // Exactly the limit (CRLF included) is still a command.
        let line = format!("NOOP {}\r\n", "x".repeat(512 - 7));
        let r = drive(
            &mut session_with(listen()),
            line.as_bytes(),
            usize::MAX,
            &[],
        );
        assert_eq!(r.out, "220 mx.test ESMTP mailbridge\r\n250 2.0.0 Ok\r\n");
        let line = format!("NOOP {}\r\n", "x".repeat(512 - 6));
        let r = drive(
            &mut session_with(listen()),
            line.as_bytes(),
            usize::MAX,
            &[],
        );
        assert_eq!(
            r.out,
            "220 mx.test ESMTP mailbridge\r\n500 5.5.2 Line too long\r\n"
        );
    }

    const START: &str = "EHLO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n";
    const HEAD: &str = "220 mx.test ESMTP mailbridge\r\n";
    const OK_TO_DATA: &str =
        "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n";

    #[test]
    fn size_limits() {
        let r = run("EHLO c\r\nMAIL FROM:<a@b.c> SIZE=10001\r\nMAIL FROM:<a@b.c> SIZE=10000\r\n");
        assert_eq!(
            r.out,
            format!(
                "{HEAD}{EHLO_REPLY}552 5.3.4 Message size exceeds fixed maximum message size\r\n250 2.1.0 Ok\r\n"
            )
        );
        let big = "x".repeat(10_001);
        let r = run(&format!("{START}{big}\r\n.\r\nNOOP\r\n"));
        assert_eq!(
            r.out,
            format!(
                "{HEAD}{EHLO_REPLY}{OK_TO_DATA}552 5.3.4 Message size exceeds fixed maximum message size\r\n250 2.0.0 Ok\r\n"
            )
        );
        assert!(r.msgs.is_empty());
    }

    #[test]
    fn sink_failures_and_loops() {
        let input =
            format!("{START}x\r\n.\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\ny\r\n.\r\n");
        let r = drive(
            &mut session_with(listen()),
            input.as_bytes(),
            usize::MAX,
            &[Err(SinkError::Io), Err(SinkError::Full)],
        );
        assert_eq!(
            r.out,
            format!(
                "{HEAD}{EHLO_REPLY}{OK_TO_DATA}451 4.3.0 Error: queue file write error\r\n{OK_TO_DATA}452 4.3.1 Insufficient system storage\r\n"
            )
        );
        let hops = "Received: x\r\n".repeat(31);
        let r = run(&format!("{START}{hops}\r\nb\r\n.\r\n"));
        assert_eq!(
            r.out,
            format!("{HEAD}{EHLO_REPLY}{OK_TO_DATA}554 5.4.6 Too many hops (mail loop)\r\n")
        );
        assert!(r.msgs.is_empty());
        let hops = "Received: x\r\n".repeat(30);
        assert_eq!(run(&format!("{START}{hops}\r\nb\r\n.\r\n")).msgs.len(), 1);
    }

    #[test]
    fn bare_line_endings_policies() {
        let input = format!("{START}a\nb\r\n.\r\n");
        let r = run(&input);
        assert!(String::from_utf8_lossy(&r.msgs[0].body).ends_with("\r\n\r\na\r\nb\r\n"));
        let r = drive(
            &mut session_with(Listen {
                bare_line_endings: BareLineEndings::Reject,
                ..listen()
            }),
            input.as_bytes(),
            usize::MAX,
            &[],
        );
        assert_eq!(
            r.out,
            format!(
                "{HEAD}{EHLO_REPLY}{OK_TO_DATA}550 5.6.11 Bare CR or LF not allowed; use CRLF line endings\r\n"
            )
        );
        assert!(r.msgs.is_empty());
    }

    #[test]
    fn smuggled_transaction_stays_inside_the_message() {
        let r = run(&format!(
            "{START}hello\n.\nMAIL FROM:<evil@x.y>\r\nRCPT TO:<victim@x.y>\r\nDATA\r\nevil\r\n.\r\nQUIT\r\n"
        ));
        assert_eq!(r.msgs.len(), 1);
        assert_eq!(
            r.out,
            format!(
                "{HEAD}{EHLO_REPLY}{OK_TO_DATA}250 2.0.0 Ok: queued as ID1\r\n221 2.0.0 Bye\r\n"
            )
        );
        assert!(String::from_utf8_lossy(&r.msgs[0].body).ends_with(
            "hello\r\n.\r\nMAIL FROM:<evil@x.y>\r\nRCPT TO:<victim@x.y>\r\nDATA\r\nevil\r\n"
        ));
    }

    #[test]
    fn timeout_and_shutdown_replies() {
        let mut s = session_with(listen());
        s.timeout();
        assert_eq!(
            s.take_output(),
            b"220 mx.test ESMTP mailbridge\r\n421 4.4.2 mx.test Error: timeout exceeded\r\n"
        );
        assert!(matches!(s.feed(&mut b"NOOP\r\n".to_vec()), Step::Close));
        let mut s = session_with(listen());
        s.shutdown();
        s.shutdown();
        assert_eq!(
            s.take_output(),
            b"220 mx.test ESMTP mailbridge\r\n421 4.3.2 mx.test Service shutting down\r\n"
        );
    }
}
