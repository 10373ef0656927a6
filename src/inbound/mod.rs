//! Inbound SMTP: the listener legacy applications send mail to, a sans-IO session over a sans-IO parser and DATA reader, and the `Sink` that makes accepted mail durable.
//!
//! Layout, after mini-redis: [`serve`] is the listener (connection limit,
//! graceful shutdown), `connection` drives one socket (reads, writes,
//! timeouts) and [`session::Session`] decides everything SMTP without doing
//! any I/O, over [`parser`] (command lines) and [`data`] (the message).
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
//! - The `250` after DATA is written only once [`Sink::accept`] returned `Ok`.

pub mod data;
pub mod parser;
pub mod session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use session::{Session, Step};

/// A message the session accepted; the sink makes it durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    /// Queue id from [`crate::spool::new_id`], also used in `Received:` and the `250` reply.
    pub id: String,
    /// Envelope sender, `""` for `<>`.
    pub from: String,
    /// Envelope recipients, in order, without duplicates.
    pub rcpts: Vec<String>,
    /// Canonical message: CRLF only, dot-unstuffed, `Received:` prepended,
    /// `Message-ID:`/`Date:` added when missing.
    pub body: Vec<u8>,
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

/// Where accepted messages go (the spool). `accept` must return only once the
/// message is on stable storage: its `Ok` is what the client's `250` promises.
pub trait Sink: Send + Sync + 'static {
    /// Store `msg` durably.
    fn accept(&self, msg: Incoming) -> crate::transport::BoxFuture<'_, Result<(), SinkError>>;
}

/// Settings of the listener, built from config.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Our name in the greeting, replies and `Received:` headers.
    pub hostname: String,
    /// Limits, timeouts and policies (`[listen]` in the config).
    pub listen: crate::config::Listen,
}

impl Settings {
    /// The settings a configuration asks for.
    pub fn from_config(cfg: &crate::config::Config) -> Self {
        Settings {
            hostname: cfg.effective_hostname(),
            listen: cfg.listen.clone(),
        }
    }
}

/// How long a shutdown waits for running sessions before cutting them off.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Bytes read from a socket at once; with the command line limit this bounds
/// the input buffer of a session.
const READ_CHUNK: usize = 8192;

/// Serve SMTP on an already-bound listener until `shutdown` is cancelled;
/// then stop accepting, let sessions in DATA finish, answer others `421 4.3.2`
/// and return once all sessions ended (bounded by a grace period of 30 s,
/// after which the remaining sessions are closed).
pub async fn serve(
    listener: TcpListener,
    settings: Arc<Settings>,
    sink: Arc<dyn Sink>,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(settings.listen.max_connections.max(1)));
    let tracker = TaskTracker::new();
    // Cancelled when the grace period is over.
    let hard_stop = CancellationToken::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: do not spin.
                tracing::warn!(error = %e, "inbound: accept failed");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                let conn = Connection {
                    settings: settings.clone(),
                    sink: sink.clone(),
                    shutdown: shutdown.clone(),
                    hard_stop: hard_stop.clone(),
                };
                tracker.spawn(conn.run(stream, peer, permit));
            }
            Err(_) => {
                tracing::warn!(client = %peer, "inbound: too many connections");
                tracker.spawn(refuse(stream));
            }
        }
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

/// Answer a connection over the limit and close it.
async fn refuse(mut stream: TcpStream) {
    let _ = timeout(Duration::from_secs(10), async {
        stream
            .write_all(b"421 4.7.0 Too many connections\r\n")
            .await?;
        stream.shutdown().await
    })
    .await;
}

/// What one connection task needs.
struct Connection {
    settings: Arc<Settings>,
    sink: Arc<dyn Sink>,
    shutdown: CancellationToken,
    hard_stop: CancellationToken,
}

impl Connection {
    /// Drive one session over one socket until it closes.
    async fn run(self, mut stream: TcpStream, peer: SocketAddr, permit: OwnedSemaphorePermit) {
        tracing::debug!(client = %peer, "inbound: connection");
        let listen = &self.settings.listen;
        let idle = Duration::from_secs(listen.idle_timeout_secs);
        let data_time = Duration::from_secs(listen.data_timeout_secs);
        let mut session = Session::new(self.settings.clone(), peer);
        let mut input = Vec::with_capacity(READ_CHUNK);
        let mut chunk = vec![0u8; READ_CHUNK];
        // The DATA timeout covers the whole transfer, not each read.
        let mut data_deadline: Option<Instant> = None;
        loop {
            let step = session.feed(&mut input);
            // Replies go out before anything that may wait (RFC 2920 §3.2 (5)).
            let out = session.take_output();
            if !out.is_empty() && !matches!(timeout(idle, stream.write_all(&out)).await, Ok(Ok(())))
            {
                break;
            }
            match step {
                Step::Close => break,
                Step::Message(msg) => {
                    // The sink logs the outcome (queued / refused) with the queue id.
                    let result = self.sink.accept(msg).await;
                    session.sink_result(result);
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
        // Free the slot before the client can see the close, so a client that
        // saw this connection end can connect again at once.
        drop(permit);
        let _ = timeout(Duration::from_secs(5), stream.shutdown()).await;
    }
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
