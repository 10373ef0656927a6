//! Sans-IO SMTP session state machine: bytes in, replies and steps out; `serve` does the I/O.
//!
//! (Over 800 lines: the whole SMTP state machine stays in one file so every
//! transition can be read in one place; its tests are in `session_tests.rs`.)
//!
//! The driver owns the input buffer and the socket. It calls [`Session::feed`]
//! with everything received so far; the session consumes every complete
//! command in order (pipelining, RFC 2920), queues the replies in
//! [`Session::take_output`] and returns a [`Step`]: read more, hand a message
//! to the sink (then report the result with [`Session::sink_result`]), or
//! close. The driver writes the queued replies before it blocks on a read, so
//! a pipelined group is answered in one write, in order.
//!
//! STARTTLS: the `220` reply is queued, everything the client pipelined
//! behind the command is dropped from the input buffer (CVE-2011-0411) and
//! [`Step::StartTls`] asks the driver for the handshake; the driver then calls
//! [`Session::tls_established`], which forgets everything learnt in cleartext
//! (HELO, transaction, authentication) as RFC 3207 §4.2 asks.
//!
//! AUTH (PLAIN, LOGIN): continuation lines are read in `Phase::Auth`; the
//! decoded user name and password go out as [`Step::Authenticate`] and the
//! driver answers with [`Session::auth_result`] (the argon2 check is slow and
//! runs off the session). AUTH is offered and accepted only when users exist
//! and the connection is TLS, or the client is loopback and
//! `auth_cleartext_loopback` is set; otherwise `538 5.7.11`.
//!
//! Access: a client outside `allow_clients` gets `554 5.7.1` instead of the
//! greeting and nothing else; sender and recipient domain lists give
//! `550 5.7.1`.

use std::net::SocketAddr;
use std::sync::Arc;

use super::access;
use super::auth::{self, Mechanism};
use super::data::{DataOutcome, DataReader};
use super::parser::{self, Command, Line, ParseError, Role};
use super::receiving::Receiving;
use super::{Incoming, Settings, SinkError};
use crate::common::Secret;
use crate::text::for_log;

/// What the driver must do next.
#[derive(Debug)]
pub enum Step {
    /// All complete input is consumed: write the queued replies, then read more.
    NeedInput,
    /// Bytes of the message in DATA are ready (the session's buffer is
    /// full): write the queued replies, append [`Session::take_body`] to the
    /// message's file for [`Session::data_id`] (or report
    /// [`Session::write_failed`]), then feed again.
    Write,
    /// A message is complete: write the queued replies, give it to the sink
    /// and report the result with [`Session::sink_result`] before feeding again.
    Message(Incoming),
    /// Write the queued replies (ending with `220 2.0.0 Ready to start TLS`),
    /// do the TLS handshake on the socket, then call
    /// [`Session::tls_established`] (or close if it failed). Input received
    /// before the handshake has been discarded and must stay discarded.
    StartTls,
    /// Write the queued replies, check `password` for `user` (argon2, on a
    /// blocking thread) and report with [`Session::auth_result`] before
    /// feeding again.
    Authenticate {
        /// The user name the client gave.
        user: String,
        /// The password (never printed).
        password: Secret,
    },
    /// Write the queued replies and close the connection.
    Close,
}

/// Where the session is.
#[derive(Debug)]
enum Phase {
    /// Reading command lines.
    Command,
    /// Reading the message after `354`.
    Data(Box<Receiving>),
    /// A message was handed to the driver; waiting for the sink's answer.
    Sink { id: String },
    /// Reading an AUTH continuation line after a `334`.
    Auth(AuthWait),
    /// Credentials were handed to the driver; waiting for its verdict.
    Verifying { user: String },
    /// Done; nothing more is read.
    Closed,
}

/// Which AUTH continuation line the session waits for.
#[derive(Debug)]
enum AuthWait {
    /// The PLAIN response (after `AUTH PLAIN` without an initial response).
    Plain,
    /// The LOGIN user name.
    LoginUser,
    /// The LOGIN password for `user`.
    LoginPassword { user: String },
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
    /// TLS is active (after STARTTLS, or on the implicit-TLS listener).
    tls: bool,
    /// The client counts as loopback (cleartext AUTH may be allowed).
    loopback: bool,
    /// The user the client authenticated as.
    auth_user: Option<String>,
    /// Failed AUTH attempts in this session.
    auth_failures: u32,
    /// Why mail was refused since the driver last looked (for metrics).
    refusals: Vec<&'static str>,
    /// Skipping the rest of an over-long command line, up to its LF.
    discarding: bool,
    out: Vec<u8>,
    new_id: IdSource,
    now: Clock,
    /// The most message bytes this session ever held at once.
    body_high_water: usize,
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
/// A NUL byte in DATA with `listen.nul_bytes = "reject"` (RFC 5322 §2.3 forbids NUL).
const REPLY_NUL: &str = "550 5.6.0 NUL characters are not allowed in message data";

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
            tls: false,
            loopback: false,
            auth_user: None,
            auth_failures: 0,
            refusals: Vec::new(),
            discarding: false,
            out: Vec::new(),
            new_id,
            now,
            body_high_water: 0,
        };
        s.loopback = (s.settings.loopback)(client.ip());
        if !access::client_allowed(&s.settings.listen.allow_clients, client.ip()) {
            tracing::warn!(client = %client, "inbound: client not in listen.allow_clients");
            s.refusals.push("client_not_allowed");
            s.close_with("554 5.7.1 Access denied");
            return s;
        }
        let greeting = format!("220 {} ESMTP mailbridge", s.settings.hostname);
        s.reply(&greeting);
        s
    }

    /// TLS is now active (the STARTTLS handshake succeeded, or this is the
    /// implicit-TLS listener before any input): start over with no HELO, no
    /// transaction and no authentication, as RFC 3207 §4.2 asks.
    pub fn tls_established(&mut self) {
        self.tls = true;
        if self.is_closed() {
            return;
        }
        self.phase = Phase::Command;
        self.helo = None;
        self.tx = None;
        self.auth_user = None;
        self.discarding = false;
    }

    /// Whether TLS is active.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The user the client authenticated as, if any.
    pub fn auth_user(&self) -> Option<&str> {
        self.auth_user.as_deref()
    }

    /// The driver's verdict on the credentials of the last [`Step::Authenticate`].
    pub fn auth_result(&mut self, ok: bool) {
        let Phase::Verifying { user } = std::mem::replace(&mut self.phase, Phase::Command) else {
            return;
        };
        if ok {
            tracing::info!(client = %self.client, user = %for_log(&user), "inbound: authenticated");
            self.auth_user = Some(user);
            self.reply("235 2.7.0 Authentication successful");
            return;
        }
        self.auth_failures += 1;
        self.refusals.push("auth_failed");
        tracing::warn!(client = %self.client, user = %for_log(&user), failures = self.auth_failures, "inbound: authentication failed");
        self.reply("535 5.7.8 Authentication credentials invalid");
        if self.auth_failures >= self.settings.listen.max_auth_failures.max(1) {
            self.close_with("421 4.7.0 Too many authentication failures");
        }
    }

    /// AUTH may be offered and used now: there are users, and the
    /// connection is TLS or a loopback client allowed to use cleartext.
    fn auth_allowed(&self) -> bool {
        !self.settings.users.is_empty()
            && (self.tls || (self.loopback && self.settings.listen.auth_cleartext_loopback))
    }

    /// The address the authenticated user is bound to (`listen.bind_sender`),
    /// if any: unauthenticated sessions and configurations without
    /// `bind_sender` have none.
    fn bound_address(&self) -> Option<&str> {
        let user = self.auth_user.as_deref()?;
        self.settings.senders.get(user).map(String::as_str)
    }

    /// Whether `MAIL FROM:<address>` is allowed: always without a binding,
    /// else only the bound address (ASCII case-insensitive; `<>` is not it).
    fn may_send_as(&self, address: &str) -> bool {
        match self.bound_address() {
            None => true,
            Some(own) => own.eq_ignore_ascii_case(address),
        }
    }

    /// With a binding, every address in the message's `From:` must be the
    /// bound one, and there may be at most one `From:` field. A message
    /// without `From:` passes (the upstream sends it as the mailbox).
    fn check_from_header(&self, info: &super::data::HeaderInfo) -> Result<(), &'static str> {
        let Some(own) = self.bound_address() else {
            return Ok(());
        };
        match info.froms {
            0 => return Ok(()),
            1 => {}
            _ => return Err("more than one From: field"),
        }
        if info.from_too_long {
            return Err("From: field too long");
        }
        let field = [&info.from[..], b"\r\n"].concat();
        let Some(parsed) = mail_parser::MessageParser::default().parse_headers(&field) else {
            return Err("unreadable header");
        };
        let Some(from) = parsed.from() else {
            return Err("From: has no address");
        };
        let mut any = false;
        for a in from.iter() {
            match a.address() {
                Some(addr) if addr.eq_ignore_ascii_case(own) => any = true,
                _ => return Err("From: names another address"),
            }
        }
        if any {
            Ok(())
        } else {
            Err("From: has no address")
        }
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

    /// The queue id of the message in DATA, if one is.
    pub fn data_id(&self) -> Option<&str> {
        match &self.phase {
            Phase::Data(rx) => Some(&rx.id),
            _ => None,
        }
    }

    /// After [`Step::Write`]: the message bytes to append now, in exchange
    /// for `spare` (the buffer the last call returned, once written and
    /// emptied; `Vec::new()` the first time).
    pub fn take_body(&mut self, spare: Vec<u8>) -> Vec<u8> {
        match &mut self.phase {
            Phase::Data(rx) => rx.take(spare),
            _ => Vec::new(),
        }
    }

    /// The message's bytes could not be written: the rest of the data is
    /// read and discarded, then the message is refused with `why`'s reply.
    pub fn write_failed(&mut self, why: SinkError) {
        if let Phase::Data(rx) = &mut self.phase {
            rx.failed = Some(why);
        }
    }

    /// The most bytes of a message this session held at once (at most
    /// [`super::receiving::BODY_BUFFER`] and a few, whatever the size).
    pub fn body_high_water(&self) -> usize {
        self.body_high_water
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
                // Likewise for credentials: no verdict is a failure.
                Phase::Verifying { .. } => self.auth_result(false),
                Phase::Auth(_) => {
                    match parser::split_line(&input[pos..], self.settings.listen.max_command_length)
                    {
                        Line::Incomplete => break Step::NeedInput,
                        Line::TooLong => {
                            self.phase = Phase::Command;
                            self.discarding = true;
                            self.error(REPLY_TOO_LONG);
                        }
                        Line::Complete(line, n) => {
                            let start = pos;
                            pos += n;
                            if let Some(step) = self.auth_line(&input[start..start + line.len()]) {
                                break step;
                            }
                        }
                    }
                }
                Phase::Data(rx) => {
                    let (n, outcome) = rx.feed(&input[pos..]);
                    pos += n;
                    self.body_high_water = self.body_high_water.max(rx.high_water);
                    match outcome {
                        None if rx.full() => break Step::Write,
                        None if pos < input.len() => {}
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
                            match self.command(&input[start..start + line.len()]) {
                                None => {}
                                Some(Step::StartTls) => {
                                    // CVE-2011-0411: nothing sent before the
                                    // handshake may count as sent inside it.
                                    if pos < input.len() {
                                        tracing::info!(client = %self.client, bytes = input.len() - pos, "inbound: discarded input pipelined after STARTTLS");
                                    }
                                    pos = input.len();
                                    break Step::StartTls;
                                }
                                Some(step) => break step,
                            }
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

    /// Why mail was refused since the last call (`relay_denied`,
    /// `too_big`, …), for metrics.
    pub fn take_refusals(&mut self) -> Vec<&'static str> {
        std::mem::take(&mut self.refusals)
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

    /// One AUTH continuation line.
    fn auth_line(&mut self, line: &[u8]) -> Option<Step> {
        let Phase::Auth(wait) = std::mem::replace(&mut self.phase, Phase::Command) else {
            return None;
        };
        if line == b"*" {
            self.error("501 5.7.0 Authentication aborted");
            return None;
        }
        let Some(decoded) = auth::decode_response(line) else {
            self.error("501 5.5.2 Cannot decode response");
            return None;
        };
        match wait {
            AuthWait::Plain => self.plain(&decoded),
            AuthWait::LoginUser => {
                self.login_user(decoded);
                None
            }
            AuthWait::LoginPassword { user } => match String::from_utf8(decoded) {
                Ok(password) => {
                    self.phase = Phase::Verifying { user: user.clone() };
                    Some(Step::Authenticate {
                        user,
                        password: Secret::new(password),
                    })
                }
                Err(_) => {
                    self.error("501 5.5.2 Cannot decode response");
                    None
                }
            },
        }
    }

    /// A decoded PLAIN response: credentials for the driver, or an error.
    fn plain(&mut self, decoded: &[u8]) -> Option<Step> {
        match auth::split_plain(decoded) {
            Some((user, password)) => {
                self.phase = Phase::Verifying { user: user.clone() };
                Some(Step::Authenticate { user, password })
            }
            None => {
                self.error("501 5.5.2 Cannot decode response");
                None
            }
        }
    }

    /// A decoded LOGIN user name: ask for the password.
    fn login_user(&mut self, decoded: Vec<u8>) {
        match String::from_utf8(decoded) {
            Ok(user) if !user.is_empty() => {
                self.phase = Phase::Auth(AuthWait::LoginPassword { user });
                // "Password:"
                self.reply("334 UGFzc3dvcmQ6");
            }
            _ => self.error("501 5.5.2 Cannot decode response"),
        }
    }

    /// `AUTH mechanism [initial-response]`.
    fn auth_command(&mut self, mechanism: &str, initial: Option<Secret>) -> Option<Step> {
        if self.settings.users.is_empty() {
            self.error(REPLY_NOT_IMPLEMENTED);
        } else if !self.helo.as_ref().is_some_and(|(_, esmtp)| *esmtp) {
            self.error("503 5.5.1 Error: send EHLO first");
        } else if self.auth_user.is_some() {
            self.error("503 5.5.1 Error: already authenticated");
        } else if self.tx.is_some() {
            self.error("503 5.5.1 Error: MAIL transaction in progress");
        } else if !self.auth_allowed() {
            self.error("538 5.7.11 Encryption required for requested authentication mechanism");
        } else {
            let initial = initial.map(|i| auth::decode_response(i.expose().as_bytes()));
            match (Mechanism::from_name(mechanism), initial) {
                (None, _) => self.error("504 5.5.4 Unrecognized authentication type"),
                (Some(_), Some(None)) => self.error("501 5.5.2 Cannot decode response"),
                (Some(Mechanism::Plain), Some(Some(decoded))) => return self.plain(&decoded),
                (Some(Mechanism::Plain), None) => {
                    self.phase = Phase::Auth(AuthWait::Plain);
                    self.reply("334 ");
                }
                (Some(Mechanism::Login), Some(Some(decoded))) => self.login_user(decoded),
                (Some(Mechanism::Login), None) => {
                    self.phase = Phase::Auth(AuthWait::LoginUser);
                    // "Username:"
                    self.reply("334 VXNlcm5hbWU6");
                }
            }
        }
        None
    }

    /// `STARTTLS`: the `220`, then [`Step::StartTls`].
    fn starttls(&mut self) -> Option<Step> {
        if self.settings.tls.is_none() {
            self.error(REPLY_NOT_IMPLEMENTED);
        } else if self.tls {
            self.error("503 5.5.1 Error: TLS already active");
        } else if self.helo.is_none() {
            self.error("503 5.5.1 Error: send HELO/EHLO first");
        } else if self.tx.is_some() {
            self.error("503 5.5.1 Error: MAIL transaction in progress");
        } else {
            self.reply("220 2.0.0 Ready to start TLS");
            return Some(Step::StartTls);
        }
        None
    }

    /// One command line; a step when the driver must act before the next one.
    fn command(&mut self, line: &[u8]) -> Option<Step> {
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
                self.error(&line);
                return None;
            }
        };
        let limits = &self.settings.listen;
        match cmd {
            Command::Ehlo(name) => {
                self.helo = Some((name, true));
                self.tx = None;
                let mut lines = vec![
                    self.settings.hostname.clone(),
                    format!("SIZE {}", limits.max_message_size),
                    "8BITMIME".into(),
                    "SMTPUTF8".into(),
                    "ENHANCEDSTATUSCODES".into(),
                ];
                if self.settings.tls.is_some() && !self.tls {
                    lines.push("STARTTLS".into());
                }
                if self.auth_allowed() {
                    lines.push("AUTH PLAIN LOGIN".into());
                }
                lines.push("PIPELINING".into());
                let last = lines.len() - 1;
                let text: Vec<String> = lines
                    .iter()
                    .enumerate()
                    .map(|(i, l)| format!("250{}{l}", if i == last { ' ' } else { '-' }))
                    .collect();
                self.reply(&text.join("\r\n"));
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
            Command::Mail(_) if limits.require_auth && self.auth_user.is_none() => {
                self.refusals.push("auth_required");
                self.error("530 5.7.0 Authentication required")
            }
            Command::Mail(_) if self.tx.is_some() => {
                self.error("503 5.5.1 Error: nested MAIL command")
            }
            Command::Mail(m) if !self.may_send_as(&m.address) => {
                tracing::warn!(client = %self.client, user = %for_log(self.auth_user.as_deref().unwrap_or("")), from = %for_log(&m.address), "inbound: sender not owned by the authenticated user");
                self.refusals.push("sender_not_owned");
                self.error("553 5.7.1 Sender address rejected: not owned by the authenticated user")
            }
            Command::Mail(m) => {
                if m.size.is_some_and(|s| s > limits.max_message_size as u64) {
                    self.refusals.push("too_big");
                    self.reply(REPLY_TOO_BIG);
                } else if !m.address.is_ascii() && !m.smtputf8 {
                    self.error("553 5.6.7 Non-ASCII sender address needs SMTPUTF8");
                } else if !access::domain_allowed(&limits.allowed_sender_domains, &m.address) {
                    tracing::info!(client = %self.client, from = %for_log(&m.address), "inbound: sender domain not allowed");
                    self.refusals.push("sender_domain");
                    self.error("550 5.7.1 Sender address rejected: domain not allowed");
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
                    Some(_)
                        if !access::domain_allowed(&limits.allowed_recipient_domains, &addr) =>
                    {
                        tracing::info!(client = %self.client, rcpt = %for_log(&addr), "inbound: recipient domain not allowed");
                        self.refusals.push("relay_denied");
                        self.error("550 5.7.1 Relay access denied")
                    }
                    Some(tx) if tx.rcpts.contains(&addr) => self.reply("250 2.1.5 Ok"),
                    Some(tx) if tx.rcpts.len() >= max => {
                        self.refusals.push("too_many_recipients");
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
                    self.error("503 5.5.1 Error: need RCPT command");
                    return None;
                }
                let reader = DataReader::new(limits.max_message_size, limits.bare_line_endings)
                    .with_nul_bytes(limits.nul_bytes);
                let id = (self.new_id)();
                let date = (self.now)().to_rfc2822();
                let received = self.received_field(&id, &date);
                let message_id = format!("<{id}@{}>", self.settings.hostname);
                self.phase = Phase::Data(Box::new(Receiving::new(
                    id,
                    reader,
                    received.as_bytes(),
                    message_id,
                    date,
                )));
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
            Command::StartTls => return self.starttls(),
            Command::Auth { mechanism, initial } => return self.auth_command(&mechanism, initial),
            Command::NotImplemented => self.error(REPLY_NOT_IMPLEMENTED),
            Command::Http => self.close_with("554 5.7.0 Error: this is an SMTP server, not HTTP"),
        }
        None
    }

    /// The `Received:` field (CRLF included) for message `id` at `date`.
    fn received_field(&self, id: &str, date: &str) -> String {
        let host = &self.settings.hostname;
        let (helo, esmtp) = self.helo.clone().unwrap_or_default();
        let ip = match self.client.ip().to_canonical() {
            std::net::IpAddr::V4(v4) => v4.to_string(),
            std::net::IpAddr::V6(v6) => format!("IPv6:{v6}"),
        };
        // RFC 3848: S for TLS, A for authenticated.
        let with = match (esmtp, self.tls, self.auth_user.is_some()) {
            (false, _, _) => "SMTP",
            (true, false, false) => "ESMTP",
            (true, true, false) => "ESMTPS",
            (true, false, true) => "ESMTPA",
            (true, true, true) => "ESMTPSA",
        };
        // Folded like Postfix's, so the line stays short whatever the names.
        let mut received = format!(
            "Received: from {helo} ([{ip}])\r\n\tby {host} (mailbridge) with {with} id {id}"
        );
        if let Some([rcpt]) = self.tx.as_ref().map(|tx| tx.rcpts.as_slice()) {
            received.push_str(&format!("\r\n\tfor <{rcpt}>"));
        }
        received.push_str(&format!("; {date}\r\n"));
        received
    }

    /// The DATA transfer ended: a message for the sink, or an error reply.
    fn data_done(&mut self, outcome: DataOutcome) -> Option<Incoming> {
        let Phase::Data(rx) = std::mem::replace(&mut self.phase, Phase::Command) else {
            return None;
        };
        // Whatever happens, the transaction is over (RFC 5321 §4.1.1.4).
        let Some(tx) = self.tx.take() else {
            // Unreachable: DATA needs a transaction. Answer rather than hang.
            self.reply("451 4.3.0 Error: no transaction");
            return None;
        };
        match outcome {
            DataOutcome::Complete => {}
            DataOutcome::TooBig => {
                self.refusals.push("too_big");
                self.reply(REPLY_TOO_BIG);
                return None;
            }
            DataOutcome::BareLineEnding => {
                self.refusals.push("bare_line_ending");
                self.reply("550 5.6.11 Bare CR or LF not allowed; use CRLF line endings");
                return None;
            }
            DataOutcome::NulByte => {
                self.refusals.push("nul_byte");
                self.reply(REPLY_NUL);
                return None;
            }
        }
        if let Some(why) = rx.failed {
            self.phase = Phase::Sink { id: rx.id.clone() };
            self.sink_result(Err(why));
            return None;
        }
        let info = rx.info();
        if info.received > self.settings.listen.max_received_headers {
            self.refusals.push("mail_loop");
            self.reply("554 5.4.6 Too many hops (mail loop)");
            return None;
        }
        if let Err(why) = self.check_from_header(info) {
            tracing::warn!(client = %self.client, user = %for_log(self.auth_user.as_deref().unwrap_or("")), reason = why, "inbound: From: not owned by the authenticated user");
            self.refusals.push("from_not_owned");
            self.reply("550 5.7.1 From: header not owned by the authenticated user");
            return None;
        }
        let message_id = rx.final_message_id.clone().unwrap_or_default();
        let id = rx.id.clone();
        let (helo, _) = self.helo.clone().unwrap_or_default();
        self.phase = Phase::Sink { id: id.clone() };
        Some(Incoming {
            id,
            from: tx.from,
            rcpts: tx.rcpts,
            tail: rx.into_tail(),
            client: self.client,
            helo,
            message_id: Some(for_log(&message_id).into_owned()),
            smtputf8: tx.smtputf8,
            eight_bit: tx.eight_bit,
            auth_user: self.auth_user.clone(),
        })
    }
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
