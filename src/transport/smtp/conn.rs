//! The byte stream to the server (direct TCP, HTTP `CONNECT` tunnel, TLS) and one SMTP connection on it: greeting, EHLO, STARTTLS, commands and replies.

use std::io;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::encode::DataEncoder;
use super::reply::{Extensions, Reply, ReplyParser};
use super::{SmtpTransport, printable};
use crate::common::Secret;
use crate::config::Proxy;
use crate::transport::{Body, Failure};

/// Longest reply line we accept (RFC 5321 says 512; servers exceed it).
const MAX_REPLY_LINE: usize = 8192;
/// Message bytes encoded per write; the write buffer stays below twice this.
const WRITE_CHUNK: usize = 32 * 1024;

/// Why sending the message text stopped.
#[derive(Debug)]
pub(super) enum DataError {
    /// The connection broke.
    Net(Broken),
    /// The spooled message could not be read.
    Spool(io::Error),
}

/// An HTTP proxy reached with `CONNECT host:port`.
#[derive(Debug, Clone)]
pub(super) struct ProxyTunnel {
    /// Proxy host.
    host: String,
    /// Proxy port.
    port: u16,
    /// `Proxy-Authorization` value (`Basic …`), when credentials are set.
    authorization: Option<Secret>,
}

impl SmtpTransport {
    /// Reach the server through the HTTP proxy `proxy` (`CONNECT` tunnel,
    /// with Basic proxy credentials when a username is set). An empty
    /// `proxy.url` changes nothing.
    pub fn with_proxy(mut self, proxy: &Proxy) -> Result<Self, String> {
        if proxy.url.is_empty() {
            self.proxy = None;
            return Ok(self);
        }
        let url = url::Url::parse(&proxy.url).map_err(|e| format!("proxy.url: {e}"))?;
        if url.scheme() != "http" {
            return Err(format!(
                "proxy.url: `{}` is not an http:// proxy",
                proxy.url
            ));
        }
        let host = url
            .host_str()
            .ok_or_else(|| format!("proxy.url: `{}` has no host", proxy.url))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let authorization = (!proxy.username.is_empty()).then(|| {
            Secret::new(format!(
                "Basic {}",
                B64.encode(format!("{}:{}", proxy.username, proxy.password.expose()))
            ))
        });
        self.proxy = Some(ProxyTunnel {
            host,
            port: url.port_or_known_default().unwrap_or(80),
            authorization,
        });
        Ok(self)
    }

    /// The raw byte stream to the server: a direct TCP connection, or an
    /// HTTP `CONNECT` tunnel through the configured proxy.
    async fn open_stream(&self) -> Result<BoxIo, Failure> {
        if let Some(proxy) = &self.proxy {
            return self.open_tunnel(proxy).await;
        }
        let peer = self.peer();
        let t = self.settings.timeout;
        let addr = (
            self.settings.server.host.as_str(),
            self.settings.server.port,
        );
        let tcp = match tokio::time::timeout(t, TcpStream::connect(addr)).await {
            Err(_) => {
                return Err(Failure::server(format!(
                    "cannot connect to {peer}: no connection within {t:?}"
                )));
            }
            Ok(Err(e)) => return Err(Failure::server(format!("cannot connect to {peer}: {e}"))),
            Ok(Ok(tcp)) => tcp,
        };
        // Commands are small and we wait for each reply: do not let Nagle delay them.
        let _ = tcp.set_nodelay(true);
        Ok(Box::new(tcp))
    }

    /// `CONNECT host:port` through `proxy`; any 2xx opens the tunnel, anything
    /// else is a server failure naming the proxy's status line.
    async fn open_tunnel(&self, proxy: &ProxyTunnel) -> Result<BoxIo, Failure> {
        let peer = self.peer();
        let t = self.settings.timeout;
        let shown = if proxy.host.contains(':') {
            format!("http://[{}]:{}", proxy.host, proxy.port)
        } else {
            format!("http://{}:{}", proxy.host, proxy.port)
        };
        let mut tcp =
            match tokio::time::timeout(t, TcpStream::connect((proxy.host.as_str(), proxy.port)))
                .await
            {
                Err(_) => {
                    return Err(Failure::server(format!(
                        "cannot connect to proxy {shown} (for {peer}): no connection within {t:?}"
                    )));
                }
                Ok(Err(e)) => {
                    return Err(Failure::server(format!(
                        "cannot connect to proxy {shown} (for {peer}): {e}"
                    )));
                }
                Ok(Ok(tcp)) => tcp,
            };
        let _ = tcp.set_nodelay(true);
        let target = self.settings.server.to_string();
        let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some(auth) = &proxy.authorization {
            request.push_str(&format!("Proxy-Authorization: {}\r\n", auth.expose()));
        }
        request.push_str("\r\n");
        let exchange = async {
            tcp.write_all(request.as_bytes()).await?;
            tcp.flush().await?;
            // Read the answer byte by byte so no byte of the tunnel (the
            // server's greeting) is consumed with it.
            let mut head = Vec::with_capacity(256);
            while !head.ends_with(b"\r\n\r\n") && !head.ends_with(b"\n\n") {
                if head.len() >= MAX_REPLY_LINE {
                    return Err(io::Error::other("proxy answer headers too long"));
                }
                head.push(tcp.read_u8().await?);
            }
            Ok(head)
        };
        let head = match tokio::time::timeout(t, exchange).await {
            Err(_) => {
                return Err(Failure::server(format!(
                    "proxy {shown} did not answer CONNECT {target} within {t:?}"
                )));
            }
            Ok(Err(e)) => {
                return Err(Failure::server(format!(
                    "proxy {shown} failed during CONNECT {target}: {e}"
                )));
            }
            Ok(Ok(head)) => head,
        };
        let text = String::from_utf8_lossy(&head);
        let status_line = printable(text.lines().next().unwrap_or("").trim());
        let ok = status_line.starts_with("HTTP/")
            && status_line
                .split_whitespace()
                .nth(1)
                .is_some_and(|c| c.len() == 3 && c.starts_with('2'));
        if !ok {
            return Err(Failure::server(format!(
                "proxy {shown} refused CONNECT {target}: {status_line}"
            )));
        }
        Ok(Box::new(tcp))
    }

    /// Wrap `io` in TLS, checking the certificate against `server`.
    async fn handshake(&self, io: BoxIo) -> Result<BoxIo, Failure> {
        let peer = self.peer();
        let t = self.settings.timeout;
        match tokio::time::timeout(t, self.tls.connect(self.server_name.clone(), io)).await {
            Err(_) => Err(Failure::server(format!(
                "TLS handshake with {peer} timed out after {t:?}"
            ))),
            Ok(Err(e)) => {
                // The certificate's problem and its fix, when that is what failed.
                let why = e
                    .get_ref()
                    .and_then(|inner| crate::tls::describe(inner))
                    .unwrap_or_else(|| e.to_string());
                Err(Failure::server(format!(
                    "TLS handshake with {peer} failed: {why}"
                )))
            }
            Ok(Ok(tls)) => Ok(Box::new(tls)),
        }
    }
    /// A new connection, greeted, EHLO'd and secured, not yet authenticated.
    pub(super) async fn session(&self) -> Result<Conn, Failure> {
        let mut io = self.open_stream().await?;
        if self.settings.implicit_tls {
            io = self.handshake(io).await?;
        }
        let mut conn = Conn::new(io, self.peer(), self.settings.timeout);
        let greeting = conn
            .read_reply(self.settings.timeout)
            .await
            .map_err(|b| conn.broken(b, "at the greeting"))?;
        if greeting.code / 100 != 2 {
            return Err(conn.refused(&greeting, "at the greeting"));
        }
        self.hello(&mut conn).await?;
        if self.settings.starttls && !self.settings.implicit_tls {
            if !conn.ext.starttls {
                return Err(Failure::server(format!(
                    "{} does not offer STARTTLS, which is required; not continuing without TLS",
                    conn.peer
                )));
            }
            let reply = conn
                .command("STARTTLS")
                .await
                .map_err(|b| conn.broken(b, "after STARTTLS"))?;
            if reply.code != 220 {
                return Err(conn.refused(&reply, "after STARTTLS"));
            }
            // Anything the server sent after its 220 arrived in cleartext and
            // could be injected (CVE-2011-0411 in reverse): refuse it.
            if !conn.buf.is_empty() {
                return Err(Failure::server(format!(
                    "{} sent unexpected data after its STARTTLS reply",
                    conn.peer
                )));
            }
            let plain = std::mem::replace(&mut conn.io, Box::new(tokio::io::empty()));
            conn.io = self.handshake(plain).await?;
            // RFC 3207 §4.2: forget everything learnt before TLS.
            conn.ext = Extensions::default();
            self.hello(&mut conn).await?;
        }
        Ok(conn)
    }

    /// EHLO, falling back to HELO when the server rejects EHLO with 5xx.
    async fn hello(&self, conn: &mut Conn) -> Result<(), Failure> {
        let name = &self.settings.hostname;
        let reply = conn
            .command(&format!("EHLO {name}"))
            .await
            .map_err(|b| conn.broken(b, "after EHLO"))?;
        match reply.code / 100 {
            2 => {
                conn.ext = Extensions::parse(&reply);
                Ok(())
            }
            5 if reply.code != 521 => {
                let helo = conn
                    .command(&format!("HELO {name}"))
                    .await
                    .map_err(|b| conn.broken(b, "after HELO"))?;
                if helo.code / 100 != 2 {
                    return Err(conn.refused(&helo, "after HELO"));
                }
                conn.ext = Extensions::default();
                Ok(())
            }
            _ => Err(conn.refused(&reply, "after EHLO")),
        }
    }
}

/// Any byte stream an SMTP session can run over: TCP (direct or through a proxy tunnel), TLS.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type BoxIo = Box<dyn Io>;

/// Why a connection stopped being usable.
#[derive(Debug)]
pub(super) enum Broken {
    /// The server closed the connection.
    Closed,
    /// No reply, or the write did not complete, within this time.
    TimedOut(Duration),
    /// Read or write error.
    Io(io::Error),
    /// The server's bytes are not an SMTP reply.
    Garbled(String),
}

/// One SMTP connection to the upstream.
pub(super) struct Conn {
    /// The byte stream (TCP or TLS).
    io: BoxIo,
    /// Received bytes not yet consumed as reply lines.
    buf: Vec<u8>,
    /// What the last EHLO advertised.
    pub(super) ext: Extensions,
    /// Per command and per reply.
    pub(super) timeout: Duration,
    /// When the connection was opened.
    pub(super) born: Instant,
    /// `smtp://host:port`, for failure texts.
    pub(super) peer: String,
    /// The mailbox this connection authenticated as with XOAUTH2.
    pub(super) user: Option<String>,
}

impl Conn {
    fn new(io: BoxIo, peer: String, timeout: Duration) -> Self {
        Conn {
            io,
            buf: Vec::new(),
            ext: Extensions::default(),
            timeout,
            born: Instant::now(),
            peer,
            user: None,
        }
    }

    /// Read one complete (possibly multi-line) reply within `wait`.
    pub(super) async fn read_reply(&mut self, wait: Duration) -> Result<Reply, Broken> {
        match tokio::time::timeout(wait, self.read_reply_untimed()).await {
            Ok(r) => r,
            Err(_) => Err(Broken::TimedOut(wait)),
        }
    }

    async fn read_reply_untimed(&mut self) -> Result<Reply, Broken> {
        let mut parser = ReplyParser::default();
        loop {
            while let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                if let Some(reply) = parser.line(&line).map_err(Broken::Garbled)? {
                    return Ok(reply);
                }
            }
            if self.buf.len() > MAX_REPLY_LINE {
                return Err(Broken::Garbled(format!(
                    "reply line longer than {MAX_REPLY_LINE} bytes"
                )));
            }
            let mut chunk = [0u8; 4096];
            match self.io.read(&mut chunk).await {
                Ok(0) => return Err(Broken::Closed),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(Broken::Io(e)),
            }
        }
    }

    /// Write and flush `bytes` within the timeout.
    async fn send(&mut self, bytes: &[u8]) -> Result<(), Broken> {
        let write = async {
            self.io.write_all(bytes).await?;
            self.io.flush().await
        };
        match tokio::time::timeout(self.timeout, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) if is_closed(&e) => Err(Broken::Closed),
            Ok(Err(e)) => Err(Broken::Io(e)),
            Err(_) => Err(Broken::TimedOut(self.timeout)),
        }
    }

    /// Send one command line and read its reply.
    pub(super) async fn command(&mut self, line: &str) -> Result<Reply, Broken> {
        self.send_lines(&[line]).await?;
        self.read_reply(self.timeout).await
    }

    /// Send command lines in one write, reading no reply (PIPELINING).
    pub(super) async fn send_lines(&mut self, lines: &[&str]) -> Result<(), Broken> {
        let mut bytes = Vec::with_capacity(lines.iter().map(|l| l.len() + 2).sum());
        for line in lines {
            bytes.extend_from_slice(line.as_bytes());
            bytes.extend_from_slice(b"\r\n");
        }
        self.send(&bytes).await
    }

    /// Send the message dot-stuffed and canonical, then `.CRLF`, as it is
    /// read from the spool a chunk at a time: the write buffer stays below
    /// twice [`WRITE_CHUNK`] whatever the message size. A spool read error
    /// stops the DATA (the connection must then be dropped: no end-of-data
    /// marker went out, so nothing is delivered).
    pub(super) async fn send_data(&mut self, message: &Body) -> Result<(), DataError> {
        let mut encoder = DataEncoder::default();
        let mut out = Vec::with_capacity(2 * WRITE_CHUNK + 8);
        let mut reader = message.reader();
        while let Some(chunk) = reader.next().await.map_err(DataError::Spool)? {
            for piece in chunk.chunks(WRITE_CHUNK) {
                encoder.push(piece, &mut out);
                if out.len() >= WRITE_CHUNK {
                    self.send(&out).await.map_err(DataError::Net)?;
                    out.clear();
                }
            }
        }
        encoder.finish(&mut out);
        self.send(&out).await.map_err(DataError::Net)
    }

    /// The failure for a connection that broke at `stage`.
    pub(super) fn broken(&self, broken: Broken, stage: &str) -> Failure {
        let what = match broken {
            Broken::Closed => "connection closed by the server".to_string(),
            Broken::TimedOut(t) => format!("timeout: the server did not answer or read for {t:?}"),
            Broken::Io(e) => format!("connection error: {e}"),
            Broken::Garbled(why) => format!("not an SMTP reply: {why}"),
        };
        Failure::server(format!("{what} ({stage}, {})", self.peer))
    }

    /// A refusal during connection setup: always a server failure.
    fn refused(&self, reply: &Reply, stage: &str) -> Failure {
        Failure::server(format!("{} ({stage}, {})", reply.text(), self.peer))
    }

    /// A refusal inside a transaction: 421 (or nonsense) is the server's
    /// fault, 4xx transient, 5xx permanent.
    pub(super) fn classified(&self, reply: &Reply, stage: &str) -> Failure {
        let text = format!("{} ({stage}, {})", reply.text(), self.peer);
        match reply.code / 100 {
            _ if reply.code == 421 => Failure::server(text),
            4 => Failure::transient(text),
            5 => Failure::permanent(text),
            _ => Failure::server(format!("unexpected reply {text}")),
        }
    }
}

fn is_closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof
    )
}
