//! A fake upstream SMTP server for integration tests, written from RFC 5321 and the Exchange Online reply texts in UPSTREAMS.md §3.3.
//!
//! # API
//!
//! ```ignore
//! mod common;
//! use common::fake_smtp::{FakeConfig, FakeSmtp, Security, Stage, Fault};
//!
//! let fake = FakeSmtp::start(
//!     FakeConfig::default()                       // plain SMTP, no AUTH, SIZE + 8BITMIME
//!         .security(Security::StartTls)           // or Plain / ImplicitTls
//!         .auth("user", "pass")                   // require AUTH (PLAIN and LOGIN offered)
//!         .fault(Stage::Rcpt("b@x".into()), Fault::reply("550 5.1.1 User unknown")),
//! ).await;
//! // Also: FakeConfig { smtputf8: true, size: None, eightbitmime: false, .. }
//! // and `.mechanisms(&["LOGIN"])` to advertise only some AUTH mechanisms.
//! // XOAUTH2 (UPSTREAMS.md §5.1), answering failures like Microsoft or Gmail:
//! //   .xoauth2(XOAuth2Style::Gmail, Arc::new(|user, token| token == "good"))
//! // `535 5.7.139` (SMTP AUTH disabled for the tenant) is a Stage::Auth fault.
//! // With `.mechanisms(&["OAUTHBEARER"])` after `.xoauth2(..)`: RFC 7628 OAUTHBEARER
//! // (error challenge `334 <base64 JSON>`, answered by the client with `AQ==`).
//! // `.max_command_line(512)`: longer command lines get `500 5.5.2 Line too long`
//! // (Dovecot's answer); lines sent after a `334` are not limited.
//! fake.addr();          // SocketAddr on 127.0.0.1, port chosen by the OS
//! fake.ca_pem();        // PEM of the CA that signed the server certificate (TLS modes)
//! fake.messages();      // accepted transactions (Received: envelope, wire bytes, un-stuffed data)
//! fake.transactions();  // every transaction whose data was completely received, accepted or not
//! fake.commands();      // every command line received, in order (AUTH payloads included)
//! fake.connections();   // TCP connections accepted so far
//! fake.set_fault(..); fake.clear_faults();   // change behaviour between deliveries
//! fake.drop_connections().await;              // close every open session, keep listening
//! fake.shutdown().await;                      // stop listening: the port refuses afterwards
//! ```
//!
//! Dropping a `FakeSmtp` aborts its tasks too.
//!
//! Faults: at every [`Stage`] a [`Fault`] can answer a given reply instead of
//! the normal one (the command then has no effect; a `421` reply also closes
//! the connection, as RFC 5321 §3.8 requires), close the connection without a
//! reply, or hang (read nothing, answer nothing) until the fake is dropped.
//! `Stage::Body` acts as soon as the first bytes of the message arrive after
//! `354` (a `Reply` there is sent, then the connection is closed).
//!
//! The certificate is made by rcgen at start: a throwaway CA, and a server
//! certificate for `localhost` and `127.0.0.1` signed by it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Name the fake gives itself in replies.
pub const HOSTNAME: &str = "fake.test";

/// How the fake speaks TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// Cleartext only; STARTTLS is not offered.
    Plain,
    /// Cleartext, STARTTLS offered; AUTH is offered only after STARTTLS.
    StartTls,
    /// TLS from the first byte (SMTPS).
    ImplicitTls,
}

/// Where a fault strikes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stage {
    /// Instead of the `220` greeting (a `Fault::Reply` is sent, then the connection is closed).
    Greeting,
    /// On `EHLO` (not `HELO`, so a `502` here tests the HELO fallback).
    Ehlo,
    /// On `STARTTLS`.
    StartTls,
    /// On `AUTH` (before any challenge).
    Auth,
    /// On `MAIL FROM`.
    Mail,
    /// On `RCPT TO` for this address (compared without case).
    Rcpt(String),
    /// On the `DATA` command (instead of `354`).
    Data,
    /// While the message is being received (after the first bytes).
    Body,
    /// Instead of the reply after the final `.`.
    EndOfData,
}

/// What happens at a faulty stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer this reply (one or more lines, without the final CRLF).
    Reply(String),
    /// Close the connection without answering.
    Close,
    /// Never answer, never close.
    Hang,
}

impl Fault {
    /// Shorthand for `Fault::Reply(text.into())`.
    pub fn reply(text: impl Into<String>) -> Self {
        Fault::Reply(text.into())
    }
}

/// How the fake rejects a bad XOAUTH2 token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XOAuth2Style {
    /// Exchange Online: `535 5.7.3 Authentication unsuccessful [host]`.
    Microsoft,
    /// Gmail: `334 <base64 JSON {"status":"400","schemes":"Bearer","scope":…}>`,
    /// then after the client's empty line `535-5.7.8 Username and Password not accepted…`.
    Gmail,
}

/// Decides whether `(user, token)` may log in.
pub type TokenCheck = Arc<dyn Fn(&str, &str) -> bool + Send + Sync>;

/// XOAUTH2 support: the failure style and the token check.
#[derive(Clone)]
pub struct XOAuth2 {
    /// How failures look.
    pub style: XOAuth2Style,
    /// Which `(user, token)` pairs are accepted.
    pub check: TokenCheck,
}

impl std::fmt::Debug for XOAuth2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "XOAuth2({:?})", self.style)
    }
}

/// What the fake offers and how it misbehaves.
#[derive(Debug, Clone)]
pub struct FakeConfig {
    /// Cleartext, STARTTLS or implicit TLS.
    pub security: Security,
    /// When set, AUTH is offered and required before MAIL: `(username, password)`.
    pub credentials: Option<(String, String)>,
    /// Mechanisms advertised in `AUTH` (PLAIN and LOGIN are implemented).
    pub auth_mechanisms: Vec<String>,
    /// `SIZE` advertised with this limit (`Some(0)`: no limit given); `None`: not advertised.
    pub size: Option<u64>,
    /// Advertise `8BITMIME`.
    pub eightbitmime: bool,
    /// Advertise `SMTPUTF8`.
    pub smtputf8: bool,
    /// Advertise `PIPELINING` (RFC 2920).
    pub pipelining: bool,
    /// Faults, first match wins.
    pub faults: Vec<(Stage, Fault)>,
    /// When set, AUTH XOAUTH2 is offered and required before MAIL.
    pub xoauth2: Option<XOAuth2>,
    /// Exchange Online's send-as rule: a message whose `From:` is not the
    /// authenticated user gets `554 5.2.0 …SendAsDeniedException…` after
    /// the data.
    pub strict_send_as: bool,
    /// Command lines longer than this (CRLF included) get `500 5.5.2 Line too long`.
    pub max_command_line: Option<usize>,
}

impl Default for FakeConfig {
    fn default() -> Self {
        FakeConfig {
            security: Security::Plain,
            credentials: None,
            auth_mechanisms: vec!["PLAIN".into(), "LOGIN".into()],
            size: Some(157_286_400),
            eightbitmime: true,
            smtputf8: false,
            pipelining: true,
            faults: Vec::new(),
            xoauth2: None,
            strict_send_as: false,
            max_command_line: None,
        }
    }
}

impl FakeConfig {
    /// Set the TLS mode.
    pub fn security(mut self, security: Security) -> Self {
        self.security = security;
        self
    }
    /// Require AUTH with these credentials.
    pub fn auth(mut self, username: &str, password: &str) -> Self {
        self.credentials = Some((username.into(), password.into()));
        self
    }
    /// Advertise only these AUTH mechanisms.
    pub fn mechanisms(mut self, mechanisms: &[&str]) -> Self {
        self.auth_mechanisms = mechanisms.iter().map(|m| m.to_string()).collect();
        self
    }
    /// Offer (only) XOAUTH2 and require it: `check(user, token)` decides.
    pub fn xoauth2(mut self, style: XOAuth2Style, check: TokenCheck) -> Self {
        self.xoauth2 = Some(XOAuth2 { style, check });
        self.auth_mechanisms = vec!["LOGIN".into(), "XOAUTH2".into()];
        self
    }
    /// Refuse command lines longer than `octets` (CRLF included).
    pub fn max_command_line(mut self, octets: usize) -> Self {
        self.max_command_line = Some(octets);
        self
    }
    /// Do not advertise `PIPELINING`: a client must wait for each reply.
    pub fn no_pipelining(mut self) -> Self {
        self.pipelining = false;
        self
    }
    /// Add a fault.
    pub fn fault(mut self, stage: Stage, fault: Fault) -> Self {
        self.faults.push((stage, fault));
        self
    }
}

/// One transaction whose data the fake received completely.
#[derive(Debug, Clone)]
pub struct Received {
    /// Which connection (1-based, in accept order) carried it.
    pub connection: usize,
    /// The session was under TLS.
    pub tls: bool,
    /// Who authenticated, and how (`PLAIN`/`LOGIN`/`XOAUTH2`).
    pub auth: Option<(String, String)>,
    /// `MAIL FROM` address (without `<>`).
    pub from: String,
    /// `MAIL FROM` parameters, e.g. `SIZE=123`, `BODY=8BITMIME`.
    pub mail_params: Vec<String>,
    /// Accepted `RCPT TO` addresses.
    pub rcpts: Vec<String>,
    /// The exact bytes after `354`, up to and including the terminating `.CRLF`.
    pub wire: Vec<u8>,
    /// The message after removing the terminator and un-stuffing dots.
    pub data: Vec<u8>,
    /// The fake answered 250 (false when an `EndOfData` fault answered instead).
    pub accepted: bool,
}

/// A running fake server; see the module documentation.
pub struct FakeSmtp {
    addr: SocketAddr,
    ca_pem: Option<String>,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

struct Shared {
    config: Mutex<FakeConfig>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    transactions: Mutex<Vec<Received>>,
    commands: Mutex<Vec<String>>,
    /// Commands that were already waiting, whole, when the fake had answered
    /// the one before (sent without waiting for its reply).
    pipelined: Mutex<Vec<String>>,
    connections: AtomicUsize,
    sessions: Mutex<Vec<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FakeSmtp {
    /// Bind 127.0.0.1 on a free port and start serving.
    pub async fn start(config: FakeConfig) -> FakeSmtp {
        let (tls, ca_pem) = match config.security {
            Security::Plain => (None, None),
            _ => {
                let (acceptor, pem) = tls_acceptor();
                (Some(acceptor), Some(pem))
            }
        };
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let shared = Arc::new(Shared {
            config: Mutex::new(config),
            tls,
            transactions: Mutex::new(Vec::new()),
            commands: Mutex::new(Vec::new()),
            pipelined: Mutex::new(Vec::new()),
            connections: AtomicUsize::new(0),
            sessions: Mutex::new(Vec::new()),
        });
        let acceptor = tokio::spawn(accept_loop(listener, shared.clone()));
        FakeSmtp {
            addr,
            ca_pem,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// The listening address (127.0.0.1, OS-chosen port).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// PEM of the CA that signed the server certificate (TLS modes only).
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// Transactions the fake accepted with 250, in order.
    pub fn messages(&self) -> Vec<Received> {
        lock(&self.shared.transactions)
            .iter()
            .filter(|r| r.accepted)
            .cloned()
            .collect()
    }

    /// Every transaction whose data arrived completely, accepted or not.
    pub fn transactions(&self) -> Vec<Received> {
        lock(&self.shared.transactions).clone()
    }

    /// Every command line received, in order, without CRLF.
    pub fn commands(&self) -> Vec<String> {
        lock(&self.shared.commands).clone()
    }

    /// The command lines that arrived before the fake had answered the one
    /// before them (pipelined), in order.
    pub fn pipelined(&self) -> Vec<String> {
        lock(&self.shared.pipelined).clone()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Add a fault from now on (first match wins, so it does not override an earlier one for the same stage).
    pub fn set_fault(&self, stage: Stage, fault: Fault) {
        lock(&self.shared.config).faults.push((stage, fault));
    }

    /// Remove every fault.
    pub fn clear_faults(&self) {
        lock(&self.shared.config).faults.clear();
    }

    /// Close every open session (their sockets are closed when this returns); keep listening.
    pub async fn drop_connections(&self) {
        let sessions: Vec<_> = std::mem::take(&mut *lock(&self.shared.sessions));
        for session in sessions {
            session.abort();
            let _ = session.await;
        }
    }

    /// Stop listening and close every session; connecting is refused afterwards.
    pub async fn shutdown(mut self) {
        if let Some(acceptor) = self.acceptor.take() {
            acceptor.abort();
            let _ = acceptor.await;
        }
        self.drop_connections().await;
    }
}

impl Drop for FakeSmtp {
    fn drop(&mut self) {
        if let Some(acceptor) = self.acceptor.take() {
            acceptor.abort();
        }
        for session in lock(&self.shared.sessions).drain(..) {
            session.abort();
        }
    }
}

/// A throwaway CA and a server certificate for `localhost` and `127.0.0.1`.
fn tls_acceptor() -> (tokio_rustls::TlsAcceptor, String) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "mailbridge fake SMTP CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");

    let key = KeyPair::generate().expect("server key");
    let mut leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .expect("params");
    leaf.distinguished_name
        .push(DnType::CommonName, "localhost");
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = leaf
        .signed_by(&key, &ca_cert, &ca_key)
        .expect("server certificate");

    let key_der = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_no_client_auth()
    .with_single_cert(vec![cert.der().clone()], key_der)
    .expect("server TLS config");
    (
        tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        ca_cert.pem(),
    )
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            // Out of file descriptors or similar: do not spin.
            tokio::task::yield_now().await;
            continue;
        };
        let number = shared.connections.fetch_add(1, Ordering::SeqCst) + 1;
        let session = Session {
            io: Box::new(tcp),
            buf: Vec::new(),
            shared: shared.clone(),
            connection: number,
            tls: false,
            auth: None,
            mail: None,
            rcpts: Vec::new(),
        };
        let handle = tokio::spawn(async move {
            // A session ends on any I/O error: that is the client's business.
            let _ = session.run().await;
        });
        let mut sessions = lock(&shared.sessions);
        sessions.retain(|s| !s.is_finished());
        sessions.push(handle);
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// What to do after a fault was applied.
enum Next {
    /// The fault answered; go on with the next command.
    Continue,
    /// End the session.
    Stop,
}

struct Session {
    io: Box<dyn Io>,
    buf: Vec<u8>,
    shared: Arc<Shared>,
    connection: usize,
    tls: bool,
    auth: Option<(String, String)>,
    mail: Option<(String, Vec<String>)>,
    rcpts: Vec<String>,
}

impl Session {
    fn config(&self) -> FakeConfig {
        lock(&self.shared.config).clone()
    }

    fn fault(&self, stage: &Stage) -> Option<Fault> {
        let config = lock(&self.shared.config);
        config
            .faults
            .iter()
            .find(|(s, _)| match (s, stage) {
                (Stage::Rcpt(a), Stage::Rcpt(b)) => a.eq_ignore_ascii_case(b),
                (a, b) => a == b,
            })
            .map(|(_, f)| f.clone())
    }

    async fn send(&mut self, reply: &str) -> std::io::Result<()> {
        self.io.write_all(format!("{reply}\r\n").as_bytes()).await?;
        self.io.flush().await
    }

    /// Apply a fault: answer, close or hang.
    async fn apply(&mut self, fault: Fault) -> std::io::Result<Next> {
        match fault {
            Fault::Reply(text) => {
                self.send(&text).await?;
                Ok(if text.starts_with("421") {
                    Next::Stop
                } else {
                    Next::Continue
                })
            }
            Fault::Close => Ok(Next::Stop),
            Fault::Hang => std::future::pending().await,
        }
    }

    /// One line without its line ending; `None` at end of stream.
    async fn read_line(&mut self) -> std::io::Result<Option<String>> {
        loop {
            if let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                let line = line.strip_suffix(b"\n").unwrap_or(&line);
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                return Ok(Some(String::from_utf8_lossy(line).into_owned()));
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    /// Read more bytes into `buf`; false at end of stream.
    async fn fill(&mut self) -> std::io::Result<bool> {
        let mut chunk = [0u8; 16384];
        let n = self.io.read(&mut chunk).await?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    }

    async fn handshake(&mut self) -> std::io::Result<()> {
        let Some(acceptor) = self.shared.tls.clone() else {
            return Err(std::io::Error::other("no TLS configured"));
        };
        let plain = std::mem::replace(&mut self.io, Box::new(tokio::io::empty()));
        self.io = Box::new(acceptor.accept(plain).await?);
        self.tls = true;
        Ok(())
    }

    fn reset(&mut self) {
        self.mail = None;
        self.rcpts.clear();
    }

    async fn run(mut self) -> std::io::Result<()> {
        let config = self.config();
        if config.security == Security::ImplicitTls {
            self.handshake().await?;
        }
        if let Some(fault) = self.fault(&Stage::Greeting) {
            // A refused greeting ends the session whatever the code.
            self.apply(fault).await?;
            return Ok(());
        }
        self.send(&format!(
            "220 {HOSTNAME} Microsoft ESMTP MAIL Service ready"
        ))
        .await?;
        loop {
            let waiting = self.buf.contains(&b'\n');
            let Some(line) = self.read_line().await? else {
                break;
            };
            lock(&self.shared.commands).push(line.clone());
            if waiting {
                lock(&self.shared.pipelined).push(line.clone());
            }
            if config
                .max_command_line
                .is_some_and(|max| line.len() + 2 > max)
            {
                self.send("500 5.5.2 Line too long").await?;
                continue;
            }
            let (verb, arg) = line.split_once(' ').unwrap_or((line.as_str(), ""));
            let next = match verb.to_ascii_uppercase().as_str() {
                "EHLO" => self.ehlo().await?,
                "HELO" => {
                    self.reset();
                    self.send(&format!("250 {HOSTNAME} Hello")).await?;
                    Next::Continue
                }
                "STARTTLS" => self.starttls().await?,
                "AUTH" => self.auth(arg).await?,
                "MAIL" => self.mail_from(arg).await?,
                "RCPT" => self.rcpt_to(arg).await?,
                "DATA" => self.data().await?,
                "RSET" => {
                    self.reset();
                    self.send("250 2.0.0 Resetting").await?;
                    Next::Continue
                }
                "NOOP" => {
                    self.send("250 2.0.0 OK").await?;
                    Next::Continue
                }
                "QUIT" => {
                    self.send("221 2.0.0 Service closing transmission channel")
                        .await?;
                    Next::Stop
                }
                _ => {
                    self.send("500 5.3.3 Unrecognized command").await?;
                    Next::Continue
                }
            };
            if let Next::Stop = next {
                break;
            }
        }
        Ok(())
    }

    async fn ehlo(&mut self) -> std::io::Result<Next> {
        if let Some(fault) = self.fault(&Stage::Ehlo) {
            return self.apply(fault).await;
        }
        self.reset();
        let config = self.config();
        let mut lines = vec![format!("{HOSTNAME} Hello")];
        if let Some(size) = config.size {
            lines.push(if size == 0 {
                "SIZE".into()
            } else {
                format!("SIZE {size}")
            });
        }
        if config.pipelining {
            lines.push("PIPELINING".into());
        }
        lines.push("ENHANCEDSTATUSCODES".into());
        if config.security == Security::StartTls && !self.tls {
            lines.push("STARTTLS".into());
        }
        let auth_allowed = self.tls || config.security == Security::Plain;
        let wants_auth = config.credentials.is_some() || config.xoauth2.is_some();
        if wants_auth && auth_allowed && !config.auth_mechanisms.is_empty() {
            lines.push(format!("AUTH {}", config.auth_mechanisms.join(" ")));
        }
        if config.eightbitmime {
            lines.push("8BITMIME".into());
        }
        if config.smtputf8 {
            lines.push("SMTPUTF8".into());
        }
        let last = lines.len() - 1;
        let text: Vec<String> = lines
            .iter()
            .enumerate()
            .map(|(i, l)| format!("250{}{l}", if i == last { ' ' } else { '-' }))
            .collect();
        self.send(&text.join("\r\n")).await?;
        Ok(Next::Continue)
    }

    async fn starttls(&mut self) -> std::io::Result<Next> {
        if self.config().security != Security::StartTls || self.tls {
            self.send("503 5.5.1 STARTTLS not available").await?;
            return Ok(Next::Continue);
        }
        if let Some(fault) = self.fault(&Stage::StartTls) {
            return self.apply(fault).await;
        }
        self.send("220 2.0.0 SMTP server ready").await?;
        // Anything pipelined before the handshake is discarded (CVE-2011-0411).
        self.buf.clear();
        self.handshake().await?;
        self.reset();
        self.auth = None;
        Ok(Next::Continue)
    }

    async fn auth(&mut self, arg: &str) -> std::io::Result<Next> {
        let config = self.config();
        let (mech, initial) = arg.split_once(' ').unwrap_or((arg, ""));
        let mech = mech.to_ascii_uppercase();
        let offered = (config.credentials.is_some() || config.xoauth2.is_some())
            && (self.tls || config.security == Security::Plain)
            && config
                .auth_mechanisms
                .iter()
                .any(|m| m.eq_ignore_ascii_case(&mech));
        if !offered {
            self.send("504 5.7.4 Unrecognized authentication type")
                .await?;
            return Ok(Next::Continue);
        }
        if self.auth.is_some() {
            self.send("503 5.5.1 Already authenticated").await?;
            return Ok(Next::Continue);
        }
        if let Some(fault) = self.fault(&Stage::Auth) {
            return self.apply(fault).await;
        }
        let decode = |s: &str| {
            B64.decode(s.trim())
                .ok()
                .map(|b| String::from_utf8_lossy(&b).into_owned())
        };
        if mech == "OAUTHBEARER" {
            let Some(x) = config.xoauth2.clone() else {
                self.send("504 5.7.4 Unrecognized authentication type")
                    .await?;
                return Ok(Next::Continue);
            };
            let response = if initial.is_empty() {
                self.send("334 ").await?;
                let line = self.read_line().await?.unwrap_or_default();
                lock(&self.shared.commands).push(line.clone());
                line
            } else {
                initial.to_string()
            };
            // n,a=<user>,^Ahost=<h>^Aport=<p>^Aauth=Bearer <token>^A^A
            let parsed = decode(&response).and_then(|s| {
                let rest = s.strip_prefix("n,a=")?;
                let (user, rest) = rest.split_once(",\x01")?;
                let rest = rest.strip_suffix("\x01\x01")?;
                let mut kv = rest.split('\x01');
                let host = kv.next()?.strip_prefix("host=")?;
                let port = kv.next()?.strip_prefix("port=")?;
                let token = kv.next()?.strip_prefix("auth=Bearer ")?;
                (kv.next().is_none() && !host.is_empty() && port.parse::<u16>().is_ok()).then(
                    || {
                        (
                            user.replace("=2C", ",").replace("=3D", "="),
                            token.to_string(),
                        )
                    },
                )
            });
            if let Some((user, token)) = parsed
                && (x.check)(&user, &token)
            {
                self.auth = Some((user, mech));
                self.send("235 2.7.0 Logged in.").await?;
                return Ok(Next::Continue);
            }
            let challenge =
                B64.encode(r#"{"status":"invalid_token","schemes":"bearer","scope":"mail"}"#);
            self.send(&format!("334 {challenge}")).await?;
            let answer = self.read_line().await?.unwrap_or_default();
            lock(&self.shared.commands).push(answer.clone());
            if answer == "AQ==" {
                self.send("535 5.7.8 Authentication failed.").await?;
            } else {
                self.send("501 5.5.2 Invalid AUTH response").await?;
            }
            return Ok(Next::Continue);
        }
        if mech == "XOAUTH2" {
            let Some(x) = config.xoauth2.clone() else {
                self.send("504 5.7.4 Unrecognized authentication type")
                    .await?;
                return Ok(Next::Continue);
            };
            let response = if initial.is_empty() {
                self.send("334 ").await?;
                let line = self.read_line().await?.unwrap_or_default();
                lock(&self.shared.commands).push(line.clone());
                line
            } else {
                initial.to_string()
            };
            // user=<user>^Aauth=Bearer <token>^A^A
            let parsed = decode(&response).and_then(|s| {
                let rest = s.strip_prefix("user=")?;
                let (user, rest) = rest.split_once('\x01')?;
                let (auth, tail) = rest.split_once('\x01')?;
                let token = auth.strip_prefix("auth=Bearer ")?;
                (tail == "\x01").then(|| (user.to_string(), token.to_string()))
            });
            if let Some((user, token)) = parsed
                && (x.check)(&user, &token)
            {
                self.auth = Some((user, mech));
                self.send("235 2.7.0 Authentication successful").await?;
                return Ok(Next::Continue);
            }
            match x.style {
                XOAuth2Style::Microsoft => {
                    self.send(&format!(
                        "535 5.7.3 Authentication unsuccessful [{HOSTNAME}]"
                    ))
                    .await?;
                }
                XOAuth2Style::Gmail => {
                    let challenge = B64.encode(
                        r#"{"status":"400","schemes":"Bearer","scope":"https://mail.google.com/"}"#,
                    );
                    self.send(&format!("334 {challenge}")).await?;
                    // The client must answer with an empty line.
                    let answer = self.read_line().await?.unwrap_or_default();
                    lock(&self.shared.commands).push(answer);
                    self.send("535-5.7.8 Username and Password not accepted. Learn more at\r\n535 5.7.8  https://support.google.com/mail/?p=BadCredentials fake.test - gsmtp")
                        .await?;
                }
            }
            return Ok(Next::Continue);
        }
        let given = match mech.as_str() {
            "PLAIN" => {
                let response = if initial.is_empty() {
                    self.send("334 ").await?;
                    self.read_line().await?.unwrap_or_default()
                } else {
                    initial.to_string()
                };
                decode(&response).and_then(|s| {
                    let mut parts = s.split('\0');
                    let _authzid = parts.next()?;
                    Some((parts.next()?.to_string(), parts.next()?.to_string()))
                })
            }
            "LOGIN" => {
                let user = if initial.is_empty() {
                    self.send("334 VXNlcm5hbWU6").await?;
                    self.read_line().await?.unwrap_or_default()
                } else {
                    initial.to_string()
                };
                self.send("334 UGFzc3dvcmQ6").await?;
                let pass = self.read_line().await?.unwrap_or_default();
                decode(&user).zip(decode(&pass))
            }
            _ => None,
        };
        if given.is_some() && given == config.credentials {
            self.auth = given.map(|(user, _)| (user, mech));
            self.send("235 2.7.0 Authentication successful").await?;
        } else {
            self.send(&format!(
                "535 5.7.3 Authentication unsuccessful [{HOSTNAME}]"
            ))
            .await?;
        }
        Ok(Next::Continue)
    }

    async fn mail_from(&mut self, arg: &str) -> std::io::Result<Next> {
        let config = self.config();
        if (config.credentials.is_some() || config.xoauth2.is_some()) && self.auth.is_none() {
            self.send("530 5.7.57 Client not authenticated to send mail")
                .await?;
            return Ok(Next::Continue);
        }
        if self.mail.is_some() {
            self.send("503 5.5.1 Sender already specified").await?;
            return Ok(Next::Continue);
        }
        let Some((addr, params)) = path_arg(arg, "FROM:") else {
            self.send("501 5.5.4 Invalid arguments").await?;
            return Ok(Next::Continue);
        };
        if let Some(fault) = self.fault(&Stage::Mail) {
            return self.apply(fault).await;
        }
        let declared = params
            .iter()
            .find_map(|p| p.strip_prefix("SIZE="))
            .and_then(|n| n.parse::<u64>().ok());
        if let (Some(limit), Some(size)) = (config.size, declared)
            && limit > 0
            && size > limit
        {
            self.send("552 5.3.4 Message size exceeds fixed maximum message size")
                .await?;
            return Ok(Next::Continue);
        }
        self.mail = Some((addr, params));
        self.send("250 2.1.0 Sender OK").await?;
        Ok(Next::Continue)
    }

    async fn rcpt_to(&mut self, arg: &str) -> std::io::Result<Next> {
        if self.mail.is_none() {
            self.send("503 5.5.1 Need MAIL command").await?;
            return Ok(Next::Continue);
        }
        let Some((addr, _)) = path_arg(arg, "TO:") else {
            self.send("501 5.5.4 Invalid arguments").await?;
            return Ok(Next::Continue);
        };
        if let Some(fault) = self.fault(&Stage::Rcpt(addr.clone())) {
            return self.apply(fault).await;
        }
        self.rcpts.push(addr);
        self.send("250 2.1.5 Recipient OK").await?;
        Ok(Next::Continue)
    }

    async fn data(&mut self) -> std::io::Result<Next> {
        if self.mail.is_none() || self.rcpts.is_empty() {
            self.send("503 5.5.1 Need RCPT command").await?;
            return Ok(Next::Continue);
        }
        if let Some(fault) = self.fault(&Stage::Data) {
            return self.apply(fault).await;
        }
        self.send("354 Start mail input; end with <CRLF>.<CRLF>")
            .await?;
        let body_fault = self.fault(&Stage::Body);
        // Only CRLF.CRLF ends the data (or `.CRLF` right at its start).
        let mut wire = std::mem::take(&mut self.buf);
        let mut scanned: usize = 0;
        let end = loop {
            if !wire.is_empty()
                && let Some(fault) = &body_fault
            {
                match fault {
                    Fault::Hang => std::future::pending::<()>().await,
                    Fault::Close => return Ok(Next::Stop),
                    Fault::Reply(text) => {
                        // Answer in the middle of the data, then hang up.
                        let text = text.clone();
                        self.send(&text).await?;
                        return Ok(Next::Stop);
                    }
                }
            }
            if wire.starts_with(b".\r\n") {
                break 3;
            }
            let from = scanned.saturating_sub(4);
            if let Some(p) = wire[from..].windows(5).position(|w| w == b"\r\n.\r\n") {
                break from + p + 5;
            }
            scanned = wire.len();
            let mut chunk = [0u8; 16384];
            let n = self.io.read(&mut chunk).await?;
            if n == 0 {
                return Ok(Next::Stop);
            }
            wire.extend_from_slice(&chunk[..n]);
        };
        self.buf = wire.split_off(end);
        let data = unstuff(&wire[..wire.len() - 3]);
        let (from, mail_params) = self.mail.take().unwrap_or_default();
        let mut received = Received {
            connection: self.connection,
            tls: self.tls,
            auth: self.auth.clone(),
            from,
            mail_params,
            rcpts: std::mem::take(&mut self.rcpts),
            wire,
            data,
            accepted: false,
        };
        let send_as_denied = self.config().strict_send_as
            && super::header_from(&received.data)
                != received.auth.as_ref().map(|a| a.0.to_ascii_lowercase());
        let next = match self.fault(&Stage::EndOfData) {
            None if send_as_denied => {
                lock(&self.shared.transactions).push(received);
                self.send(SEND_AS_DENIED).await?;
                Next::Continue
            }
            Some(fault) => {
                lock(&self.shared.transactions).push(received);
                self.apply(fault).await?
            }
            None => {
                received.accepted = true;
                let n = {
                    let mut all = lock(&self.shared.transactions);
                    all.push(received);
                    all.len()
                };
                self.send(&format!(
                    "250 2.0.0 OK <{n}@{HOSTNAME}> Queued mail for delivery"
                ))
                .await?;
                Next::Continue
            }
        };
        self.reset();
        Ok(next)
    }
}

/// Exchange Online's answer to a `From:` the mailbox may not send as (UPSTREAMS §3.3).
pub const SEND_AS_DENIED: &str = "554 5.2.0 STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; Failed to process message due to a permanent exception with message Cannot submit message.";

/// Parse `FROM:<addr> PARAM...` / `TO:<addr>`: the address and the parameters.
fn path_arg(arg: &str, keyword: &str) -> Option<(String, Vec<String>)> {
    let head = arg.get(..keyword.len())?;
    if !head.eq_ignore_ascii_case(keyword) {
        return None;
    }
    let rest = arg[keyword.len()..].trim_start().strip_prefix('<')?;
    let (addr, params) = rest.split_once('>')?;
    Some((
        addr.to_string(),
        params.split_whitespace().map(str::to_string).collect(),
    ))
}

/// Remove one leading dot from every line (lines end in CRLF).
fn unstuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len());
    let mut line_start = true;
    let mut i = 0;
    while i < body.len() {
        if !(line_start && body[i] == b'.') {
            out.push(body[i]);
        }
        line_start = body[i] == b'\n' && i > 0 && body[i - 1] == b'\r';
        i += 1;
    }
    out
}
