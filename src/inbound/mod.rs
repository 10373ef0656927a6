//! Inbound SMTP: the listener legacy applications send mail to, a sans-IO session over a sans-IO parser and DATA reader, and the `Sink` that makes accepted mail durable.
//!
//! Layout, after mini-redis: [`serve`] is the listener (connection limit,
//! graceful shutdown), `Connection` drives one socket (reads, writes,
//! timeouts, the message file) and [`session::Session`] decides everything
//! SMTP without doing any I/O, over [`parser`] (command lines), [`data`]
//! (the DATA reader and header scan) and [`receiving`] (the message's
//! bounded buffer).
//!
//! Decisions worth knowing:
//!
//! - Early talkers (clients that send before the `220` greeting) are served
//!   normally, as if they had pipelined: their input is answered in order
//!   after the greeting. Detecting them only means something with a greeting
//!   delay (Postfix postscreen), which would slow every legacy client down;
//!   this listener is meant for loopback. HTTP request lines (`GET`, `POST`,
//!   `CONNECT`, ...) are answered `554` and the connection is closed at once,
//!   which stops the cross-protocol attacks early talking is usually about.
//! - Bare CR / bare LF in DATA are normalised to CRLF by default (printers
//!   and scripts send bare LF) or refused with `550 5.6.11`
//!   (`listen.bare_line_endings = "reject"`). Either way only `CRLF.CRLF`
//!   ends a message, so nothing can be smuggled past this relay.
//! - A NUL byte in DATA is refused with `550 5.6.0` by default or removed
//!   (`listen.nul_bytes = "strip"`); it is never forwarded upstream.
//! - DATA streams to the spool: the session holds at most
//!   [`receiving::BODY_BUFFER`] bytes of a message; the driver appends them to
//!   the message's file ([`Sink::begin`]) as they come. The `250` after DATA
//!   is written only once [`MessageFile::commit`] returned `Ok`; a refused
//!   message, a write error or a client gone mid-DATA drops the file (its
//!   temp file is removed).
//! - Text lines longer than 1000 octets (RFC 5321 §4.5.3.1.6) are accepted
//!   and passed on unchanged, never truncated or folded: only the total
//!   size is limited (`552 5.3.4`). Refusing them would turn away the
//!   legacy clients this relay exists for; the upstream decides for itself.
//! - TLS: STARTTLS is offered when `listen.tls_cert`/`tls_key` are set, and
//!   [`serve_implicit_tls`] serves the port-465-style listener. TLS 1.2+.
//! - Access: `listen.allow_clients` (`554 5.7.1` at connect), connections in
//!   total and per client IP (`421 4.7.0`), sender and recipient domain lists
//!   (`550 5.7.1`), AUTH policy (see [`session`] and [`auth`]). The limits
//!   count per listener: the STARTTLS and implicit-TLS listeners each have
//!   their own.

pub mod access;
pub mod auth;
pub mod data;
pub mod parser;
pub mod receiving;
pub mod session;
pub mod tls;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use session::{Session, Step};
use tls::Stream;

/// A message the session accepted; its file makes it durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    /// Queue id from [`crate::spool::new_id`], also used in `Received:` and the `250` reply.
    pub id: String,
    /// Envelope sender, `""` for `<>`.
    pub from: String,
    /// Envelope recipients, in order, without duplicates.
    pub rcpts: Vec<String>,
    /// The last bytes of the message, not yet written to its file (at most
    /// [`receiving::BODY_BUFFER`] and a few). The whole message, as written,
    /// is canonical: CRLF only, dot-unstuffed, `Received:` on top,
    /// `Message-ID:`/`Date:` added when missing.
    pub tail: Vec<u8>,
    /// The client's address.
    pub client: SocketAddr,
    /// The HELO/EHLO name the client gave.
    pub helo: String,
    /// The `Message-ID:` header value (existing or added), angle brackets included.
    pub message_id: Option<String>,
    /// `MAIL FROM ... SMTPUTF8` was declared.
    pub smtputf8: bool,
    /// `MAIL FROM ... BODY=8BITMIME` was declared.
    pub eight_bit: bool,
    /// The local user the client authenticated as (AUTH), if any; selects
    /// the upstream identity in the Basic-to-OAuth bridge.
    pub auth_user: Option<String>,
}

/// Why the sink could not take a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SinkError {
    /// The spool is full: `452 4.3.1 Insufficient system storage`.
    #[error("spool full")]
    Full,
    /// Writing or syncing failed: `451 4.3.0`.
    #[error("spool write failed")]
    Io,
}

impl SinkError {
    /// A failed write: a full disk (or quota) is [`SinkError::Full`].
    pub fn from_io(e: &std::io::Error) -> SinkError {
        match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => SinkError::Full,
            _ => SinkError::Io,
        }
    }
}

/// Where accepted messages go (the spool).
pub trait Sink: Send + Sync + 'static {
    /// The file for message `id`'s bytes while it arrives (nothing touches
    /// the disk yet).
    fn begin(&self, id: &str) -> Box<dyn MessageFile>;

    /// The session refused a client, sender, recipient or message, for the
    /// short `reason` given (e.g. `relay_denied`); for metrics.
    fn refused(&self, reason: &'static str) {
        let _ = reason;
    }
}

/// One message's file while it arrives. Dropped without a successful
/// [`commit`](Self::commit), nothing of it stays.
pub trait MessageFile: Send + 'static {
    /// Append bytes (blocking I/O: the driver calls it on a blocking thread).
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()>;
    /// Append `msg.tail` and make the message durable and queued. Must
    /// return only once it is on stable storage: its `Ok` is what the
    /// client's `250` promises.
    fn commit(
        self: Box<Self>,
        msg: Incoming,
    ) -> crate::common::BoxFuture<'static, Result<(), SinkError>>;
}

/// The driver's half of DATA streaming, for the listener and the maildrop
/// importer: the file of the message in DATA and the spare buffer.
#[derive(Default)]
pub struct BodyWriter {
    file: Option<Box<dyn MessageFile>>,
    spare: Vec<u8>,
}

impl BodyWriter {
    /// After [`Step::Write`]: append the session's bytes to the message's
    /// file (created at the first write), on a blocking thread.
    pub async fn write(&mut self, sink: &dyn Sink, session: &mut Session) {
        let Some(id) = session.data_id() else {
            return;
        };
        let mut file = match self.file.take() {
            Some(f) => f,
            None => sink.begin(id),
        };
        let buf = session.take_body(std::mem::take(&mut self.spare));
        let written = tokio::task::spawn_blocking(move || {
            let r = file.write(&buf);
            (file, buf, r)
        })
        .await;
        match written {
            Ok((file, buf, Ok(()))) => {
                self.file = Some(file);
                self.spare = buf;
            }
            Ok((_, buf, Err(e))) => {
                tracing::error!(error = %e, "inbound: cannot write the message file");
                self.spare = buf;
                session.write_failed(SinkError::from_io(&e));
            }
            Err(e) => {
                tracing::error!(error = %e, "inbound: message writer failed");
                session.write_failed(SinkError::Io);
            }
        }
    }

    /// After [`Step::Message`]: commit the message and tell the session.
    pub async fn commit(&mut self, sink: &dyn Sink, session: &mut Session, msg: Incoming) {
        let file = match self.file.take() {
            Some(f) => f,
            None => sink.begin(&msg.id),
        };
        // The file logs the outcome (queued / refused) with the queue id.
        let result = file.commit(msg).await;
        session.sink_result(result);
    }

    /// After any other step: a file whose message was refused goes.
    pub fn settle(&mut self, session: &Session) {
        if self.file.is_some() && !session.in_data() {
            self.file = None;
        }
    }
}

/// Settings of the listener, built from config by [`Settings::from_config`]
/// (which loads the certificate and checks the users), or by
/// [`Settings::new`] and the `with_*` methods in tests.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Our name in the greeting, replies and `Received:` headers.
    pub hostname: String,
    /// Limits, timeouts and policies (`[listen]` in the config).
    pub listen: crate::config::Listen,
    /// Who may AUTH; empty = AUTH is not offered.
    pub users: Arc<auth::Users>,
    /// Server TLS configuration; `None` = no STARTTLS, no implicit TLS.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Whether a client address counts as loopback, where
    /// `auth_cleartext_loopback` may allow AUTH without TLS. Replaceable so
    /// tests on 127.0.0.1 can play a remote client.
    pub loopback: fn(IpAddr) -> bool,
    /// `listen.bind_sender`: user name → the one address that user may use
    /// in `MAIL FROM` and `From:` (see [`crate::config::Config::own_mailbox`]).
    /// Empty = no binding.
    pub senders: Arc<std::collections::HashMap<String, String>>,
}

impl Settings {
    /// Settings with no users and no TLS (whatever `listen.tls_*` say).
    pub fn new(hostname: impl Into<String>, listen: crate::config::Listen) -> Settings {
        Settings {
            hostname: hostname.into(),
            listen,
            users: Arc::new(auth::Users::default()),
            tls: None,
            loopback: access::is_loopback,
            senders: Arc::default(),
        }
    }

    /// The settings a configuration asks for: loads `listen.tls_cert` and
    /// `listen.tls_key` (relative to the config file) and checks every
    /// user's hash. The error names the config key at fault.
    pub fn from_config(cfg: &crate::config::Config) -> Result<Settings, String> {
        let mut s =
            Settings::new(cfg.effective_hostname(), cfg.listen.clone()).with_users(&cfg.users)?;
        let l = &cfg.listen;
        if l.bind_sender {
            s.senders = Arc::new(
                cfg.users
                    .iter()
                    .filter_map(|u| Some((u.name.clone(), cfg.own_mailbox(u)?)))
                    .collect(),
            );
        }
        if !l.tls_cert.is_empty() || !l.tls_key.is_empty() {
            s = s.with_tls_files(
                &cfg.path(Path::new(&l.tls_cert)),
                &cfg.path(Path::new(&l.tls_key)),
            )?;
        }
        Ok(s)
    }

    /// These users may AUTH.
    pub fn with_users(mut self, users: &[crate::config::User]) -> Result<Settings, String> {
        self.users = Arc::new(auth::Users::new(users)?);
        Ok(self)
    }

    /// Offer TLS with this certificate chain and key (PEM files).
    pub fn with_tls_files(mut self, cert: &Path, key: &Path) -> Result<Settings, String> {
        self.tls = Some(tls::server_config(cert, key)?);
        Ok(self)
    }

    /// Refuse a listener on a non-loopback `local` address that nothing
    /// protects (see [`access::check_exposure`]): call before serving.
    pub fn check_exposure(&self, local: SocketAddr) -> Result<(), String> {
        access::check_exposure(local, &self.listen, !self.users.is_empty())
    }
}

/// How long a shutdown waits for running sessions before cutting them off.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Bytes read from a socket at once; with the command line limit this bounds
/// the input buffer of a session.
const READ_CHUNK: usize = 8192;

/// At most this many argon2 checks run at once in the whole process (each
/// takes tens of MiB and milliseconds of CPU); further AUTH attempts wait.
static VERIFY_SLOTS: Semaphore = Semaphore::const_new(4);

/// Whether a listener speaks TLS from the first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Cleartext, with STARTTLS when configured (port 25/587 style).
    StartTls,
    /// TLS from the first byte (port 465 style).
    Implicit,
}

/// Serve SMTP on an already-bound listener until `shutdown` is cancelled;
/// then stop accepting, let sessions in DATA finish, answer others `421 4.3.2`
/// and return once all sessions ended (bounded by a grace period of 30 s,
/// after which the remaining sessions are closed). STARTTLS is offered when
/// `settings.tls` is set.
pub async fn serve(
    listener: TcpListener,
    settings: impl Into<LiveSettings>,
    sink: Arc<dyn Sink>,
    shutdown: CancellationToken,
) {
    serve_mode(listener, settings.into(), sink, shutdown, Mode::StartTls).await
}

/// The settings a listener gives each new connection: fixed, or replaced
/// by a configuration reload (a session keeps the settings it started with;
/// the connection limits are read once, when the listener starts).
#[derive(Clone)]
pub struct LiveSettings(tokio::sync::watch::Receiver<Arc<Settings>>);

impl LiveSettings {
    /// Settings that a reload replaces through `rx`.
    pub fn new(rx: tokio::sync::watch::Receiver<Arc<Settings>>) -> LiveSettings {
        LiveSettings(rx)
    }

    /// The settings for a connection starting now.
    pub fn current(&self) -> Arc<Settings> {
        self.0.borrow().clone()
    }
}

impl From<Arc<Settings>> for LiveSettings {
    fn from(s: Arc<Settings>) -> LiveSettings {
        // The sender is dropped: these settings never change.
        LiveSettings(tokio::sync::watch::channel(s).1)
    }
}

/// Like [`serve`], but every connection starts with a TLS handshake
/// (implicit TLS, the `listen.implicit_tls_address` listener). Without
/// `settings.tls` it logs an error and returns at once. Connections refused
/// for the total or per-IP limit are closed without a word (a cleartext
/// `421` means nothing to a TLS client); a client outside `allow_clients`
/// hears `554 5.7.1` once TLS is up.
pub async fn serve_implicit_tls(
    listener: TcpListener,
    settings: impl Into<LiveSettings>,
    sink: Arc<dyn Sink>,
    shutdown: CancellationToken,
) {
    let settings = settings.into();
    if settings.current().tls.is_none() {
        tracing::error!(
            "inbound: implicit-TLS listener without listen.tls_cert/tls_key; not serving it"
        );
        return;
    }
    serve_mode(listener, settings, sink, shutdown, Mode::Implicit).await
}

async fn serve_mode(
    listener: TcpListener,
    live: LiveSettings,
    sink: Arc<dyn Sink>,
    shutdown: CancellationToken,
    mode: Mode,
) {
    let first = live.current();
    let slots = Arc::new(Semaphore::new(first.listen.max_connections.max(1)));
    let per_ip = access::PerIp::new(first.listen.max_connections_per_ip);
    drop(first);
    let tracker = TaskTracker::new();
    // Cancelled when the grace period is over.
    let hard_stop = CancellationToken::new();
    loop {
        let Some((stream, peer)) = crate::listener::accept(&listener, &shutdown, "inbound").await
        else {
            break;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(client = %peer, "inbound: too many connections");
            tracker.spawn(refuse(stream, mode, b"421 4.7.0 Too many connections\r\n"));
            continue;
        };
        let Some(ip_slot) = per_ip.enter(peer.ip()) else {
            tracing::warn!(client = %peer, "inbound: too many connections from this address");
            tracker.spawn(refuse(
                stream,
                mode,
                b"421 4.7.0 Too many connections from your address\r\n",
            ));
            continue;
        };
        let conn = Connection {
            settings: live.current(),
            sink: sink.clone(),
            shutdown: shutdown.clone(),
            hard_stop: hard_stop.clone(),
        };
        tracker.spawn(conn.run(stream, peer, mode, (permit, ip_slot)));
    }
    drop(listener);
    tracker.close();
    if timeout(SHUTDOWN_GRACE, tracker.wait()).await.is_err() {
        tracing::warn!(
            sessions = tracker.len(),
            "inbound: sessions still running after the grace period; closing them"
        );
        hard_stop.cancel();
        let _ = timeout(Duration::from_secs(5), tracker.wait()).await;
    }
}

/// Answer a connection over a limit and close it (on the implicit-TLS
/// listener, just close it).
async fn refuse(mut stream: TcpStream, mode: Mode, reply: &'static [u8]) {
    let _ = timeout(Duration::from_secs(10), async {
        if mode == Mode::StartTls {
            stream.write_all(reply).await?;
        }
        stream.shutdown().await
    })
    .await;
}

/// Held while a session runs: its connection slot and its per-IP count.
type Slots = (OwnedSemaphorePermit, access::IpSlot);

/// What one connection task needs.
struct Connection {
    settings: Arc<Settings>,
    sink: Arc<dyn Sink>,
    shutdown: CancellationToken,
    hard_stop: CancellationToken,
}

impl Connection {
    /// Drive one session over one socket until it closes.
    async fn run(self, tcp: TcpStream, peer: SocketAddr, mode: Mode, slots: Slots) {
        tracing::debug!(client = %peer, "inbound: connection");
        let idle = Duration::from_secs(self.settings.listen.idle_timeout_secs);
        let mut session = Session::new(self.settings.clone(), peer);
        let mut stream = Stream::Plain(tcp);
        if mode == Mode::Implicit {
            match self.handshake(stream, peer, idle).await {
                Some(s) => stream = s,
                None => return,
            }
            session.tls_established();
        }
        let mut slots = Some(slots);
        let stream = self.drive(stream, &mut session, peer, &mut slots).await;
        drop(slots);
        if let Some(mut stream) = stream {
            let _ = timeout(Duration::from_secs(5), stream.shutdown()).await;
        }
    }

    /// The TLS handshake on a plain stream, bounded by `limit`; `None` when it
    /// failed (the socket is dropped, which closes it).
    async fn handshake(&self, stream: Stream, peer: SocketAddr, limit: Duration) -> Option<Stream> {
        let (Stream::Plain(tcp), Some(config)) = (stream, self.settings.tls.clone()) else {
            return None;
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        tokio::select! {
            r = timeout(limit, acceptor.accept(tcp)) => match r {
                Ok(Ok(tls)) => Some(Stream::Tls(Box::new(tls))),
                Ok(Err(e)) => {
                    tracing::info!(client = %peer, error = %e, "inbound: TLS handshake failed");
                    None
                }
                Err(_) => {
                    tracing::info!(client = %peer, "inbound: TLS handshake timed out");
                    None
                }
            },
            _ = self.hard_stop.cancelled() => None,
        }
    }

    /// The session loop; returns the stream unless it was lost (failed handshake).
    async fn drive(
        &self,
        mut stream: Stream,
        session: &mut Session,
        peer: SocketAddr,
        slots: &mut Option<Slots>,
    ) -> Option<Stream> {
        let listen = &self.settings.listen;
        let idle = Duration::from_secs(listen.idle_timeout_secs);
        let data_time = Duration::from_secs(listen.data_timeout_secs);
        let mut input = Vec::with_capacity(READ_CHUNK);
        let mut chunk = vec![0u8; READ_CHUNK];
        // The DATA timeout covers the whole transfer, not each read.
        let mut data_deadline: Option<Instant> = None;
        let mut body = BodyWriter::default();
        loop {
            let step = session.feed(&mut input);
            if !matches!(step, Step::Message(_)) {
                body.settle(session);
            }
            if matches!(step, Step::Close) {
                // Free the slots before the client can read the last reply
                // (221, 421): a client that saw this session end may connect
                // again at once and must find its slot free.
                slots.take();
            }
            for reason in session.take_refusals() {
                self.sink.refused(reason);
            }
            // Replies go out before anything that may wait (RFC 2920 §3.2 (5)).
            let out = session.take_output();
            if !out.is_empty()
                && !matches!(
                    timeout(idle, write_flush(&mut stream, &out)).await,
                    Ok(Ok(()))
                )
            {
                break;
            }
            match step {
                Step::Close => break,
                Step::Write => body.write(self.sink.as_ref(), session).await,
                Step::Message(msg) => body.commit(self.sink.as_ref(), session, msg).await,
                Step::StartTls => {
                    // The session dropped what was pipelined; so must we.
                    input.clear();
                    stream = self.handshake(stream, peer, idle).await?;
                    session.tls_established();
                }
                Step::Authenticate { user, password } => {
                    let users = self.settings.users.clone();
                    let verify = async {
                        let Ok(permit) = VERIFY_SLOTS.acquire().await else {
                            return false;
                        };
                        let ok = tokio::task::spawn_blocking(move || {
                            users.verify(&user, password.expose().as_bytes())
                        })
                        .await
                        .unwrap_or(false);
                        drop(permit);
                        ok
                    };
                    let ok = tokio::select! {
                        ok = verify => ok,
                        _ = self.hard_stop.cancelled() => break,
                    };
                    session.auth_result(ok);
                }
                Step::NeedInput => {
                    if !session.in_data() && self.shutdown.is_cancelled() {
                        session.shutdown();
                        continue;
                    }
                    let deadline = read_deadline(
                        session.in_data(),
                        &mut data_deadline,
                        Instant::now(),
                        idle,
                        data_time,
                    );
                    let read = tokio::select! {
                        r = stream.read(&mut chunk) => r,
                        _ = sleep_until(deadline) => {
                            tracing::debug!(client = %peer, "inbound: timeout");
                            session.timeout();
                            continue;
                        }
                        _ = self.shutdown.cancelled(), if !session.in_data() => {
                            session.shutdown();
                            continue;
                        }
                        _ = self.hard_stop.cancelled() => break,
                    };
                    match read {
                        Ok(0) | Err(_) => break,
                        Ok(n) => input.extend_from_slice(&chunk[..n]),
                    }
                }
            }
        }
        Some(stream)
    }
}

/// Write all of `out` and flush it (TLS buffers until flushed).
async fn write_flush(stream: &mut Stream, out: &[u8]) -> std::io::Result<()> {
    stream.write_all(out).await?;
    stream.flush().await
}

/// When the next read must arrive by. Between commands: `idle` from now. In
/// DATA: `data` from when DATA began, whatever arrives meanwhile, so a client
/// dripping a byte now and then cannot hold a session forever.
fn read_deadline(
    in_data: bool,
    data_deadline: &mut Option<Instant>,
    now: Instant,
    idle: Duration,
    data: Duration,
) -> Instant {
    if in_data {
        *data_deadline.get_or_insert(now + data)
    } else {
        *data_deadline = None;
        now + idle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_deadline_covers_the_whole_transfer() {
        let (idle, data) = (Duration::from_secs(300), Duration::from_secs(600));
        let t0 = Instant::now();
        let mut dl = None;
        assert_eq!(read_deadline(false, &mut dl, t0, idle, data), t0 + idle);
        // DATA begins at t0 + 1 s; later reads keep that deadline.
        let start = t0 + Duration::from_secs(1);
        assert_eq!(
            read_deadline(true, &mut dl, start, idle, data),
            start + data
        );
        for later in [2, 100, 599] {
            assert_eq!(
                read_deadline(
                    true,
                    &mut dl,
                    start + Duration::from_secs(later),
                    idle,
                    data
                ),
                start + data
            );
        }
        // After the message, the idle timeout again, and the next DATA gets a fresh deadline.
        let after = t0 + Duration::from_secs(700);
        assert_eq!(
            read_deadline(false, &mut dl, after, idle, data),
            after + idle
        );
        assert_eq!(
            read_deadline(true, &mut dl, after, idle, data),
            after + data
        );
    }
}
