//! SMTP/SMTPS upstream: a small tokio + rustls SMTP client with per-recipient results, STARTTLS or implicit TLS, AUTH PLAIN/LOGIN and a pool of idle connections.
//!
//! Why not `lettre`: we need one classified result per recipient, the exact
//! stage of every failure, XOAUTH2 with Gmail's `334` JSON challenge and SMTP
//! through an HTTP CONNECT proxy. Those are here: [`SmtpAuth::XOAuth2`] (one
//! forced refresh and one retry on a new connection when the server rejects
//! the token) and the proxy tunnel in [`SmtpTransport::open_stream`].
//!
//! Classification (RFC 5321 §4.2.1, Postfix smtp(8)): anything that says the
//! server is unusable (refused, timeout, closed, TLS failure, `421`, AUTH
//! rejected) is [`Failure::server`] and may fail over; `4xx` about this
//! message or recipient is [`Failure::transient`]; `5xx` is
//! [`Failure::permanent`].

use std::io;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{BoxFuture, Delivery, Envelope, Failure, Transport};
use crate::config::{HostPort, Proxy, Secret};
use crate::oauth::{IdentityTokens, TokenSource};

/// At most this many idle connections are kept per transport.
const POOL_MAX_IDLE: usize = 4;
/// An idle connection older than this is closed rather than reused.
const POOL_IDLE_TIME: Duration = Duration::from_secs(60);
/// A connection is not reused once it is this old (Postfix
/// `smtp_connection_reuse_time_limit`), so a long-lived session cannot pin
/// us to one server process forever.
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(300);
/// The reply after the end of data may take this many times the normal
/// timeout (the server scans and stores the message first).
const FINAL_REPLY_FACTOR: u32 = 5;
/// Longest reply line we accept (RFC 5321 says 512; servers exceed it).
const MAX_REPLY_LINE: usize = 8192;
/// Most lines in one multi-line reply.
const MAX_REPLY_LINES: usize = 256;
/// Message bytes encoded per write; the write buffer stays below twice this.
const WRITE_CHUNK: usize = 32 * 1024;
/// Longest upstream reply text kept in a failure.
const MAX_REPLY_TEXT: usize = 1000;

/// How we authenticate to the upstream.
#[derive(Clone)]
pub enum SmtpAuth {
    /// No AUTH (a relay that trusts our address).
    None,
    /// Username and password, sent with AUTH PLAIN (preferred) or AUTH LOGIN.
    Basic {
        /// SASL authentication identity.
        username: String,
        /// Password; only ever sent base64-encoded inside AUTH.
        password: Secret,
    },
    /// OAuth2 bearer token with AUTH XOAUTH2 (UPSTREAMS.md §5.1).
    XOAuth2 {
        /// Mailbox sent as `user=` when the envelope names no identity.
        user: String,
        /// Tokens for `user`.
        tokens: Arc<dyn TokenSource>,
        /// Tokens for other mailboxes (`Envelope::identity`, the
        /// Basic-to-OAuth bridge); `None`: every message goes as `user`.
        identities: Option<Arc<dyn IdentityTokens>>,
    },
}

impl std::fmt::Debug for SmtpAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SmtpAuth::None => f.write_str("None"),
            SmtpAuth::Basic { username, password } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", password)
                .finish(),
            SmtpAuth::XOAuth2 {
                user, identities, ..
            } => f
                .debug_struct("XOAuth2")
                .field("user", user)
                .field("per_identity", &identities.is_some())
                .finish(),
        }
    }
}

/// The XOAUTH2 initial response: `base64("user=" user ^A "auth=Bearer " token ^A ^A)`.
pub fn xoauth2_response(user: &str, token: &str) -> String {
    B64.encode(format!("user={user}\x01auth=Bearer {token}\x01\x01"))
}

/// What SMTP AUTH disabled for the tenant (`535 5.7.139`) means and how to fix it.
const SMTP_AUTH_DISABLED_HINT: &str = "SMTP AUTH is disabled for this tenant or mailbox; \
enable it for the mailbox with `Set-CASMailbox -Identity <mailbox> -SmtpClientAuthenticationDisabled $false` \
(or tenant-wide with `Set-TransportConfig -SmtpClientAuthenticationDisabled $false`); mail is held until then";

/// Everything an [`SmtpTransport`] needs to reach and use one server.
#[derive(Debug, Clone)]
pub struct SmtpSettings {
    /// Server to connect to; also the TLS server name (SNI and certificate check).
    pub server: HostPort,
    /// SMTPS: TLS from the first byte (usually port 465).
    pub implicit_tls: bool,
    /// Require STARTTLS: if the server does not offer it, fail (never downgrade).
    pub starttls: bool,
    /// Extra PEM CA certificate(s) to trust besides the webpki roots.
    pub ca_file: Option<std::path::PathBuf>,
    /// Authentication to perform after (STARTTLS and) EHLO.
    pub auth: SmtpAuth,
    /// Our name in EHLO/HELO.
    pub hostname: String,
    /// Limit for connecting, the TLS handshake and each reply; the reply
    /// after the end of data may take `FINAL_REPLY_FACTOR` times longer.
    pub timeout: Duration,
}

/// The SMTP/SMTPS upstream. Cheap to share: deliveries run concurrently, each
/// on its own connection, and finished connections wait in a small pool.
pub struct SmtpTransport {
    /// What the configuration asked for.
    settings: SmtpSettings,
    /// Verified TLS client configuration (ring provider, TLS 1.2+).
    tls: tokio_rustls::TlsConnector,
    /// The server name checked against the certificate.
    server_name: ServerName<'static>,
    /// Idle, authenticated connections ready for a new MAIL FROM.
    pool: Arc<Pool>,
    /// HTTP proxy to tunnel through with `CONNECT`, if any.
    proxy: Option<ProxyTunnel>,
}

/// An HTTP proxy reached with `CONNECT host:port`.
#[derive(Debug, Clone)]
struct ProxyTunnel {
    /// Proxy host.
    host: String,
    /// Proxy port.
    port: u16,
    /// `Proxy-Authorization` value (`Basic …`), when credentials are set.
    authorization: Option<Secret>,
}

/// An authentication mechanism we can speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// RFC 4616, sent as an initial response.
    Plain,
    /// The de-facto `AUTH LOGIN` (username and password prompts).
    Login,
    /// Google's and Microsoft's OAuth2 bearer mechanism, sent as an initial response.
    XOAuth2,
}

impl Mechanism {
    /// The name used in `AUTH <name>`.
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::Login => "LOGIN",
            Mechanism::XOAuth2 => "XOAUTH2",
        }
    }
}

impl SmtpTransport {
    /// Check the settings and build the TLS configuration. `Err` names the
    /// problem (unreadable or empty CA file, bad server name, ...).
    pub fn new(settings: SmtpSettings) -> Result<Self, String> {
        if settings.implicit_tls && settings.starttls {
            return Err("choose either implicit TLS (smtps) or STARTTLS, not both".into());
        }
        if settings.hostname.is_empty()
            || settings
                .hostname
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(format!(
                "`{}` is not a usable EHLO host name",
                settings.hostname
            ));
        }
        if settings.timeout.is_zero() {
            return Err("the timeout must be above zero".into());
        }
        let server_name = ServerName::try_from(settings.server.host.clone()).map_err(|_| {
            format!(
                "`{}` is not a valid DNS name or IP address",
                settings.server.host
            )
        })?;
        let tls = tokio_rustls::TlsConnector::from(crate::tls::client_config(
            settings.ca_file.as_deref(),
        )?);
        Ok(SmtpTransport {
            settings,
            tls,
            server_name,
            pool: Arc::new(Pool::default()),
            proxy: None,
        })
    }

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

    /// `smtp://host:port` or `smtps://host:port`.
    fn peer(&self) -> String {
        let scheme = if self.settings.implicit_tls {
            "smtps"
        } else {
            "smtp"
        };
        format!("{scheme}://{}", self.settings.server)
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
            Ok(Err(e)) => Err(Failure::server(format!(
                "TLS handshake with {peer} failed: {e}"
            ))),
            Ok(Ok(tls)) => Ok(Box::new(tls)),
        }
    }

    /// A new connection, greeted, EHLO'd, secured and authenticated as
    /// `who` (XOAUTH2) or as configured: ready for MAIL FROM.
    async fn connect(&self, who: Option<&Identity>) -> Result<Conn, Failure> {
        match who {
            Some(id) => self.connect_oauth(id).await,
            None => {
                let mut conn = self.session().await?;
                self.authenticate(&mut conn).await?;
                Ok(conn)
            }
        }
    }

    /// XOAUTH2 as `who`: a token first (no token, no connection); when the
    /// server rejects it (Microsoft `535 5.7.3`, Gmail's `334` challenge),
    /// invalidate it, get a fresh one and try once more on a new connection.
    async fn connect_oauth(&self, who: &Identity) -> Result<Conn, Failure> {
        let mut first_rejection = String::new();
        for round in 0..2 {
            let token = who.tokens.token().await.map_err(|e| {
                // Not the server's fault: failing over would not help when the
                // alternate uses the same identity, so the message waits.
                Failure::transient(format!("no OAuth token for {}: {e}", printable(&who.user)))
            })?;
            let mut conn = self.session().await?;
            match self.xoauth2(&mut conn, &who.user, &token).await? {
                None => {
                    conn.user = Some(who.user.clone());
                    return Ok(conn);
                }
                Some(rejection) => {
                    who.tokens.invalidate(&token);
                    let _ = conn.command("QUIT").await;
                    if round == 0 {
                        tracing::info!(peer = %conn.peer, user = %who.user, reply = %rejection, "XOAUTH2 token rejected; getting a fresh token and retrying once");
                        first_rejection = rejection;
                        continue;
                    }
                    return Err(Failure::server(format!(
                        "{} rejected the OAuth token for {} twice, also right after a refresh ({first_rejection}; then {rejection}): \
check that the signed-in account is {} and may send as it, and that the app has the SMTP.Send (Microsoft) or https://mail.google.com/ (Google) permission",
                        conn.peer,
                        printable(&who.user),
                        printable(&who.user)
                    )));
                }
            }
        }
        Err(Failure::server("XOAUTH2 retry loop ended unexpectedly"))
    }

    /// One `AUTH XOAUTH2`. `Ok(None)`: authenticated; `Ok(Some(reply))`: the
    /// token was rejected; `Err`: any other failure (never carrying the token).
    async fn xoauth2(
        &self,
        conn: &mut Conn,
        user: &str,
        token: &Secret,
    ) -> Result<Option<String>, Failure> {
        if !conn.ext.auth_xoauth2 {
            return Err(Failure::server(format!(
                "{} does not offer AUTH XOAUTH2, which OAuth needs",
                conn.peer
            )));
        }
        let initial = xoauth2_response(user, token.expose());
        let secrets = [token.expose().to_string(), initial.clone()];
        let stage = "after AUTH XOAUTH2";
        let reply = conn
            .command(&format!("AUTH XOAUTH2 {initial}"))
            .await
            .map_err(|b| conn.broken(b, stage))?;
        let reply = if reply.code == 334 {
            // Gmail: an error challenge (base64 JSON); answer with an empty
            // line, then the final 535 follows (UPSTREAMS.md §5.1).
            let challenge = reply
                .lines
                .first()
                .and_then(|l| B64.decode(l.trim()).ok())
                .map(|b| printable(&String::from_utf8_lossy(&b)))
                .unwrap_or_default();
            let last = conn.command("").await.map_err(|b| conn.broken(b, stage))?;
            if last.code / 100 == 2 {
                return Ok(None);
            }
            let text = redact(&last.text(), &secrets);
            return Ok(Some(if challenge.is_empty() {
                text
            } else {
                format!("334 {challenge}, then {text}")
            }));
        } else {
            reply
        };
        let text = redact(&reply.text(), &secrets);
        match reply.code {
            c if c / 100 == 2 => Ok(None),
            535 if reply.lines.iter().any(|l| l.contains("5.7.139")) => Err(Failure::server(
                format!("{text} ({stage}, {}): {SMTP_AUTH_DISABLED_HINT}", conn.peer),
            )),
            c if c / 100 == 5 => Ok(Some(text)),
            _ => Err(Failure::server(format!(
                "authentication failed: {text} ({stage}, {})",
                conn.peer
            ))),
        }
    }

    /// A new connection, greeted, EHLO'd and secured, not yet authenticated.
    async fn session(&self) -> Result<Conn, Failure> {
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

    /// AUTH as configured. Every failure is a server failure (the mail waits
    /// and the alternate may be tried) and never carries the password.
    async fn authenticate(&self, conn: &mut Conn) -> Result<(), Failure> {
        let SmtpAuth::Basic { username, password } = &self.settings.auth else {
            return Ok(());
        };
        let mech = if conn.ext.auth_plain {
            Mechanism::Plain
        } else if conn.ext.auth_login {
            Mechanism::Login
        } else {
            return Err(Failure::server(format!(
                "{} offers no AUTH mechanism we support (PLAIN, LOGIN)",
                conn.peer
            )));
        };
        let pass = password.expose();
        let initial = B64.encode(format!("\0{username}\0{pass}"));
        let pass64 = B64.encode(pass);
        // Strings that must never appear in a failure text, even if a
        // server echoes what it got.
        let secrets = [pass.to_string(), pass64.clone(), initial.clone()];
        let stage = format!("after AUTH {}", mech.name());
        // Only PLAIN and LOGIN are chosen above; XOAUTH2 is `xoauth2()`.
        let result = if mech == Mechanism::Login {
            match conn.command("AUTH LOGIN").await {
                Ok(r) if r.code == 334 => match conn.command(&B64.encode(username)).await {
                    Ok(r) if r.code == 334 => conn.command(&pass64).await,
                    other => other,
                },
                other => other,
            }
        } else {
            conn.command(&format!("AUTH PLAIN {initial}")).await
        };
        let reply = result.map_err(|b| conn.broken(b, &stage))?;
        if reply.code / 100 == 2 {
            return Ok(());
        }
        if reply.code == 334 {
            // Still prompting: cancel the exchange (RFC 4954 §4) before failing.
            let _ = conn.command("*").await;
        }
        Err(Failure::server(format!(
            "authentication failed: {} ({stage}, {})",
            redact(&reply.text(), &secrets),
            conn.peer
        )))
    }

    /// One attempt: a pooled connection if there is one, else a new one; a
    /// pooled connection found dead at its first command is replaced once.
    async fn deliver_inner(&self, env: &Envelope, message: &[u8]) -> Delivery {
        if unsafe_address(&env.from) {
            return Err(Failure::permanent(format!(
                "invalid sender address <{}>",
                printable(&env.from)
            )));
        }
        // Recipients decided locally (`Some`) are not sent to the server.
        let results: Vec<Option<Result<(), Failure>>> = env
            .rcpts
            .iter()
            .map(|r| {
                (r.is_empty() || unsafe_address(r)).then(|| {
                    Err(Failure::permanent(format!(
                        "invalid recipient address <{}>",
                        printable(r)
                    )))
                })
            })
            .collect();
        if results.iter().all(Option::is_some) {
            return Ok(finish_results(results));
        }
        let who = self.identity_for(env);
        let mut pooled = self.pool.take(who.as_ref().map(|w| w.user.as_str()));
        loop {
            let (mut conn, reused) = match pooled.take() {
                Some(conn) => (conn, true),
                None => (self.connect(who.as_ref()).await?, false),
            };
            let mut attempt = results.clone();
            match self
                .transaction(&mut conn, env, message, &mut attempt, reused)
                .await
            {
                Tx::Stale => {
                    tracing::debug!(peer = %conn.peer, "pooled connection was dead; reconnecting");
                    continue;
                }
                Tx::Done(outcome, after) => {
                    self.release(conn, after).await;
                    return outcome.map(|()| finish_results(attempt));
                }
            }
        }
    }

    /// One mail transaction on a ready connection. `results` holds the
    /// locally decided recipients and receives the others.
    async fn transaction(
        &self,
        conn: &mut Conn,
        env: &Envelope,
        message: &[u8],
        results: &mut [Option<Result<(), Failure>>],
        reused: bool,
    ) -> Tx {
        // SMTPUTF8 (RFC 6531) is needed only for non-ASCII addresses.
        let mut utf8 = !env.from.is_ascii();
        if !conn.ext.smtputf8 {
            if utf8 {
                let text = format!(
                    "cannot deliver non-ASCII sender address <{}>: {} does not offer SMTPUTF8",
                    env.from, conn.peer
                );
                return Tx::Done(Err(Failure::permanent(text)), After::Keep);
            }
            for (slot, rcpt) in results.iter_mut().zip(&env.rcpts) {
                if slot.is_none() && !rcpt.is_ascii() {
                    let text = format!(
                        "cannot deliver to non-ASCII address <{rcpt}>: {} does not offer SMTPUTF8",
                        conn.peer
                    );
                    *slot = Some(Err(Failure::permanent(text)));
                }
            }
            if results.iter().all(Option::is_some) {
                return Tx::Done(Ok(()), After::Keep);
            }
        } else {
            utf8 |= env
                .rcpts
                .iter()
                .zip(results.iter())
                .any(|(r, s)| s.is_none() && !r.is_ascii());
        }
        if let Some(limit) = conn.ext.size
            && limit > 0
            && message.len() as u64 > limit
        {
            let text = format!(
                "message of {} bytes exceeds the size limit of {limit} bytes of {}",
                message.len(),
                conn.peer
            );
            return Tx::Done(Err(Failure::permanent(text)), After::Keep);
        }

        let mut mail = format!("MAIL FROM:<{}>", env.from);
        if conn.ext.size.is_some() {
            mail.push_str(&format!(" SIZE={}", message.len()));
        }
        if conn.ext.eightbitmime && message.iter().any(|b| *b >= 0x80) {
            mail.push_str(" BODY=8BITMIME");
        }
        if utf8 {
            mail.push_str(" SMTPUTF8");
        }
        let stage = format!("after MAIL FROM:<{}>", env.from);
        let reply = match conn.command(&mail).await {
            Err(_) if reused => return Tx::Stale,
            Err(b) => return Tx::Done(Err(conn.broken(b, &stage)), After::Drop),
            Ok(r) if r.code == 421 && reused => return Tx::Stale,
            Ok(r) => r,
        };
        match classify(&reply, 2) {
            Class::Ok => {}
            Class::Refused(after) => return Tx::Done(Err(conn.classified(&reply, &stage)), after),
        }

        let mut accepted = Vec::new();
        for (i, rcpt) in env.rcpts.iter().enumerate() {
            if results[i].is_some() {
                continue;
            }
            let stage = format!("after RCPT TO:<{rcpt}>");
            let reply = match conn.command(&format!("RCPT TO:<{rcpt}>")).await {
                Ok(r) => r,
                Err(b) => return Tx::Done(Err(conn.broken(b, &stage)), After::Drop),
            };
            match classify(&reply, 2) {
                Class::Ok => {
                    accepted.push(i);
                    results[i] = Some(Ok(()));
                }
                Class::Refused(After::Drop) => {
                    return Tx::Done(Err(conn.classified(&reply, &stage)), After::Drop);
                }
                Class::Refused(_) => results[i] = Some(Err(conn.classified(&reply, &stage))),
            }
        }
        if accepted.is_empty() {
            return Tx::Done(Ok(()), After::Rset);
        }

        let reply = match conn.command("DATA").await {
            Ok(r) => r,
            Err(b) => return Tx::Done(Err(conn.broken(b, "after DATA")), After::Drop),
        };
        match classify(&reply, 3) {
            Class::Ok => {}
            Class::Refused(After::Drop) => {
                return Tx::Done(Err(conn.classified(&reply, "after DATA")), After::Drop);
            }
            Class::Refused(after) => {
                let failure = conn.classified(&reply, "after DATA");
                for &i in &accepted {
                    results[i] = Some(Err(failure.clone()));
                }
                return Tx::Done(Ok(()), after);
            }
        }

        if let Err(b) = conn.send_data(message).await {
            return Tx::Done(
                Err(conn.broken(b, "while sending the message")),
                After::Drop,
            );
        }
        let stage = "after end of data";
        let reply = match conn.read_reply(conn.timeout * FINAL_REPLY_FACTOR).await {
            Ok(r) => r,
            Err(b) => return Tx::Done(Err(conn.broken(b, stage)), After::Drop),
        };
        match classify(&reply, 2) {
            Class::Ok => Tx::Done(Ok(()), After::Keep),
            Class::Refused(After::Drop) => {
                Tx::Done(Err(conn.classified(&reply, stage)), After::Drop)
            }
            Class::Refused(after) => {
                let failure = conn.classified(&reply, stage);
                for &i in &accepted {
                    results[i] = Some(Err(failure.clone()));
                }
                Tx::Done(Ok(()), after)
            }
        }
    }

    /// Return a connection to the pool, after RSET if the transaction failed.
    async fn release(&self, mut conn: Conn, after: After) {
        let reusable = match after {
            After::Drop => false,
            After::Keep => true,
            After::Rset => matches!(conn.command("RSET").await, Ok(r) if r.code / 100 == 2),
        };
        if reusable && conn.born.elapsed() < MAX_CONNECTION_AGE {
            Pool::put(&self.pool, conn);
        }
    }

    /// Who to authenticate as for `env` with XOAUTH2 (`None` for other auth).
    fn identity_for(&self, env: &Envelope) -> Option<Identity> {
        let SmtpAuth::XOAuth2 {
            user,
            tokens,
            identities,
        } = &self.settings.auth
        else {
            return None;
        };
        match (
            env.identity.as_deref().filter(|i| !i.is_empty()),
            identities,
        ) {
            (Some(id), Some(all)) if !id.eq_ignore_ascii_case(user) => Some(Identity {
                user: id.to_string(),
                tokens: all.source(id),
            }),
            _ => Some(Identity {
                user: user.clone(),
                tokens: tokens.clone(),
            }),
        }
    }

    async fn probe_inner(&self) -> Result<(), Failure> {
        let probe = Envelope {
            id: String::new(),
            from: String::new(),
            rcpts: Vec::new(),
            identity: None,
        };
        let who = self.identity_for(&probe);
        let mut conn = self.connect(who.as_ref()).await?;
        // The answer to QUIT does not matter: the server was usable.
        let _ = conn.command("QUIT").await;
        Ok(())
    }
}

impl Transport for SmtpTransport {
    fn describe(&self) -> String {
        self.peer()
    }

    fn deliver<'a>(&'a self, env: &'a Envelope, message: &'a [u8]) -> BoxFuture<'a, Delivery> {
        Box::pin(self.deliver_inner(env, message))
    }

    fn probe(&self) -> BoxFuture<'_, Result<(), Failure>> {
        Box::pin(self.probe_inner())
    }
}

/// True for addresses that would break the command line they go into.
fn unsafe_address(addr: &str) -> bool {
    addr.chars().any(|c| c.is_control() || c == '<' || c == '>')
}

/// `text` with control characters replaced, for failure texts.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Replace every secret in `text` by `***`.
fn redact(text: &str, secrets: &[String]) -> String {
    let mut text = text.to_string();
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        text = text.replace(s.as_str(), "***");
    }
    text
}

/// Final per-recipient results; every slot is filled by then.
fn finish_results(results: Vec<Option<Result<(), Failure>>>) -> Vec<Result<(), Failure>> {
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(Failure::transient("recipient was not attempted"))))
        .collect()
}

/// What to do with a connection after a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum After {
    /// Clean state: pool it as it is.
    Keep,
    /// A transaction may be open: RSET, then pool it if that works.
    Rset,
    /// Broken, closing (421) or out of sync: close it.
    Drop,
}

/// Outcome of [`SmtpTransport::transaction`].
enum Tx {
    /// A pooled connection was dead at MAIL FROM: nothing happened, retry on a new one.
    Stale,
    /// `Err` for the whole message, or `Ok` with the results filled in.
    Done(Result<(), Failure>, After),
}

/// A reply, seen from one stage.
enum Class {
    /// The expected class (2xx, or 3xx for DATA).
    Ok,
    /// Anything else, and what that means for the connection.
    Refused(After),
}

fn classify(reply: &Reply, expected_class: u16) -> Class {
    match reply.code / 100 {
        c if c == expected_class => Class::Ok,
        _ if reply.code == 421 => Class::Refused(After::Drop),
        4 | 5 => Class::Refused(After::Rset),
        // 2xx to DATA or 3xx to anything else: we no longer know where the
        // server is in the dialogue.
        _ => Class::Refused(After::Drop),
    }
}

/// Who an XOAUTH2 connection authenticates as, and where its tokens come from.
struct Identity {
    /// The mailbox (`user=`).
    user: String,
    /// Its tokens.
    tokens: Arc<dyn TokenSource>,
}

/// Any byte stream an SMTP session can run over: TCP (direct or through a proxy tunnel), TLS.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type BoxIo = Box<dyn Io>;

/// Why a connection stopped being usable.
#[derive(Debug)]
enum Broken {
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
struct Conn {
    /// The byte stream (TCP or TLS).
    io: BoxIo,
    /// Received bytes not yet consumed as reply lines.
    buf: Vec<u8>,
    /// What the last EHLO advertised.
    ext: Extensions,
    /// Per command and per reply.
    timeout: Duration,
    /// When the connection was opened.
    born: Instant,
    /// `smtp://host:port`, for failure texts.
    peer: String,
    /// The mailbox this connection authenticated as with XOAUTH2.
    user: Option<String>,
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
    async fn read_reply(&mut self, wait: Duration) -> Result<Reply, Broken> {
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
    async fn command(&mut self, line: &str) -> Result<Reply, Broken> {
        let mut bytes = Vec::with_capacity(line.len() + 2);
        bytes.extend_from_slice(line.as_bytes());
        bytes.extend_from_slice(b"\r\n");
        self.send(&bytes).await?;
        self.read_reply(self.timeout).await
    }

    /// Send the message dot-stuffed and canonical, then `.CRLF`, in chunks.
    async fn send_data(&mut self, message: &[u8]) -> Result<(), Broken> {
        let mut encoder = DataEncoder::default();
        let mut out = Vec::with_capacity(2 * WRITE_CHUNK + 8);
        for chunk in message.chunks(WRITE_CHUNK) {
            encoder.push(chunk, &mut out);
            if out.len() >= WRITE_CHUNK {
                self.send(&out).await?;
                out.clear();
            }
        }
        encoder.finish(&mut out);
        self.send(&out).await
    }

    /// The failure for a connection that broke at `stage`.
    fn broken(&self, broken: Broken, stage: &str) -> Failure {
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
    fn classified(&self, reply: &Reply, stage: &str) -> Failure {
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

/// A complete SMTP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reply {
    /// Three-digit code, 200..=599.
    code: u16,
    /// Text of each line, without code and separator, control characters replaced.
    lines: Vec<String>,
}

impl Reply {
    /// `550 5.7.60 text ...`: the code and all lines, on one line.
    fn text(&self) -> String {
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
struct ReplyParser {
    code: Option<u16>,
    lines: Vec<String>,
}

impl ReplyParser {
    /// Feed one line (with or without its line ending); `Some` when the reply is complete.
    fn line(&mut self, raw: &[u8]) -> Result<Option<Reply>, String> {
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
        let text = raw.get(4..).unwrap_or_default();
        self.code = Some(code);
        self.lines
            .push(printable(String::from_utf8_lossy(text).trim()));
        if more {
            return Ok(None);
        }
        Ok(Some(Reply {
            code,
            lines: std::mem::take(&mut self.lines),
        }))
    }
}

/// What the server advertised in its EHLO reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Extensions {
    starttls: bool,
    /// `SIZE` advertised, with its limit (0 = no limit given).
    size: Option<u64>,
    eightbitmime: bool,
    smtputf8: bool,
    auth_plain: bool,
    auth_login: bool,
    auth_xoauth2: bool,
}

impl Extensions {
    fn parse(reply: &Reply) -> Self {
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
                "AUTH" => {
                    for mech in words {
                        match mech.to_ascii_uppercase().as_str() {
                            "PLAIN" => ext.auth_plain = true,
                            "LOGIN" => ext.auth_login = true,
                            "XOAUTH2" => ext.auth_xoauth2 = true,
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

/// Sans-IO encoder of a message into its DATA form (RFC 5321 §4.5.2): bare
/// CR and bare LF become CRLF, a line starting with `.` gets another `.`,
/// the last line ends in CRLF and `.CRLF` follows. One pass, any chunking.
#[derive(Debug)]
struct DataEncoder {
    /// The next byte starts a line.
    line_start: bool,
    /// The previous byte was a CR whose line ending is not yet written.
    cr: bool,
}

impl Default for DataEncoder {
    fn default() -> Self {
        DataEncoder {
            line_start: true,
            cr: false,
        }
    }
}

impl DataEncoder {
    /// Encode the next piece of the message, appending to `out` (at most
    /// twice `input.len()` plus 2 bytes).
    fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let mut i = 0;
        while i < input.len() {
            if self.cr {
                self.cr = false;
                out.extend_from_slice(b"\r\n");
                self.line_start = true;
                if input[i] == b'\n' {
                    i += 1;
                    continue;
                }
            }
            match input[i] {
                b'\r' => {
                    self.cr = true;
                    i += 1;
                }
                b'\n' => {
                    out.extend_from_slice(b"\r\n");
                    self.line_start = true;
                    i += 1;
                }
                first => {
                    if self.line_start && first == b'.' {
                        out.push(b'.');
                    }
                    let end = input[i..]
                        .iter()
                        .position(|b| *b == b'\r' || *b == b'\n')
                        .map_or(input.len(), |p| i + p);
                    out.extend_from_slice(&input[i..end]);
                    self.line_start = false;
                    i = end;
                }
            }
        }
    }

    /// End the message: close the last line and add the `.CRLF` terminator.
    fn finish(&mut self, out: &mut Vec<u8>) {
        if self.cr || !self.line_start {
            out.extend_from_slice(b"\r\n");
        }
        self.cr = false;
        self.line_start = true;
        out.extend_from_slice(b".\r\n");
    }
}

/// Idle connections, newest last.
#[derive(Default)]
struct Pool {
    state: Mutex<PoolState>,
}

#[derive(Default)]
struct PoolState {
    /// Each with the moment it became idle.
    idle: Vec<(Conn, Instant)>,
    /// A task closing expired connections is running.
    reaper: bool,
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The most recently used live connection authenticated as `user`
    /// (`None`: not authenticated with XOAUTH2), if any.
    fn take(&self, user: Option<&str>) -> Option<Conn> {
        let mut state = self.lock();
        state
            .idle
            .retain(|(_, since)| since.elapsed() < POOL_IDLE_TIME);
        let i = state
            .idle
            .iter()
            .rposition(|(conn, _)| conn.user.as_deref() == user)?;
        Some(state.idle.remove(i).0)
    }

    /// Keep `conn` for reuse if there is room; start the reaper if needed.
    fn put(pool: &Arc<Pool>, conn: Conn) {
        let mut state = pool.lock();
        state
            .idle
            .retain(|(_, since)| since.elapsed() < POOL_IDLE_TIME);
        if state.idle.len() >= POOL_MAX_IDLE {
            return;
        }
        state.idle.push((conn, Instant::now()));
        if !state.reaper
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            state.reaper = true;
            runtime.spawn(reap(Arc::downgrade(pool)));
        }
    }
}

/// Close expired idle connections until the pool is empty or gone, so a
/// quiet transport does not hold sockets open forever.
async fn reap(pool: Weak<Pool>) {
    loop {
        tokio::time::sleep(POOL_IDLE_TIME / 4).await;
        let Some(pool) = pool.upgrade() else { return };
        let mut state = pool.lock();
        state
            .idle
            .retain(|(_, since)| since.elapsed() < POOL_IDLE_TIME);
        if state.idle.is_empty() {
            state.reaper = false;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode(input: &[u8], chunk: usize) -> Vec<u8> {
        let mut enc = DataEncoder::default();
        let mut out = Vec::new();
        for piece in input.chunks(chunk.max(1)) {
            enc.push(piece, &mut out);
        }
        enc.finish(&mut out);
        out
    }

    #[test]
    fn data_encoding_examples() {
        assert_eq!(encode(b"", 8), b".\r\n");
        assert_eq!(encode(b"a\r\n", 8), b"a\r\n.\r\n");
        assert_eq!(encode(b"a", 8), b"a\r\n.\r\n");
        assert_eq!(
            encode(b".\r\n..x\r\nb.c\r\n", 8),
            b"..\r\n...x\r\nb.c\r\n.\r\n"
        );
        assert_eq!(
            encode(b"a\nb\rc\r\r\nd\r", 1),
            b"a\r\nb\r\nc\r\n\r\nd\r\n.\r\n"
        );
        assert_eq!(encode(b"x\n.\n", 3), b"x\r\n..\r\n.\r\n");
        assert_eq!(encode(b"\r\n.\r.", 2), b"\r\n..\r\n..\r\n.\r\n");
    }

    /// Undo the encoding the way a receiving server does.
    fn unstuff(wire: &[u8]) -> Vec<u8> {
        let body = wire.strip_suffix(b".\r\n").expect("terminator");
        let mut out = Vec::new();
        for line in body.split_inclusive(|b| *b == b'\n') {
            out.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
        }
        out
    }

    proptest! {
        #[test]
        fn data_encoding_is_canonical_and_reversible(
            input in proptest::collection::vec(prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'.'), Just(b'a'), any::<u8>()], 0..200),
            chunk in 1usize..20,
        ) {
            let wire = encode(&input, chunk);
            prop_assert_eq!(&wire, &encode(&input, input.len().max(1)));
            // Only CRLF line endings, and the only `CRLF.CRLF` is the terminator.
            for (i, b) in wire.iter().enumerate() {
                if *b == b'\r' { prop_assert_eq!(wire.get(i + 1), Some(&b'\n')); }
                if *b == b'\n' { prop_assert!(i > 0 && wire[i - 1] == b'\r'); }
            }
            let full = [b"\r\n".as_slice(), &wire].concat();
            let ends = full.windows(5).filter(|w| *w == b"\r\n.\r\n").count();
            prop_assert_eq!(ends, 1);
            prop_assert!(wire.ends_with(b".\r\n"));
            // Un-stuffing gives back the input with its line endings canonicalised.
            let mut canonical = Vec::new();
            let mut i = 0;
            while i < input.len() {
                match input[i] {
                    b'\r' if input.get(i + 1) == Some(&b'\n') => { canonical.extend_from_slice(b"\r\n"); i += 1; }
                    b'\r' | b'\n' => canonical.extend_from_slice(b"\r\n"),
                    b => canonical.push(b),
                }
                i += 1;
            }
            if !canonical.is_empty() && !canonical.ends_with(b"\r\n") { canonical.extend_from_slice(b"\r\n"); }
            prop_assert_eq!(unstuff(&wire), canonical);
        }
    }

    fn parse(lines: &[&str]) -> Result<Option<Reply>, String> {
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

    #[test]
    fn replies() {
        let r = parse(&[
            "250-mx.example Hello\r\n",
            "250-SIZE 1000\r\n",
            "250 AUTH=LOGIN PLAIN\n",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(r.code, 250);
        assert_eq!(
            r.lines,
            ["mx.example Hello", "SIZE 1000", "AUTH=LOGIN PLAIN"]
        );
        let ext = Extensions::parse(&r);
        assert_eq!(ext.size, Some(1000));
        assert!(ext.auth_login && ext.auth_plain && !ext.starttls);
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
    fn xoauth2_test_vectors_from_upstreams_5_1() {
        // Microsoft's documentation.
        assert_eq!(
            xoauth2_response(
                "test@contoso.onmicrosoft.com",
                "EwBAAl3BAAUFFpUAo7J3Ve0bjLBWZWCclRC3EoAA"
            ),
            "dXNlcj10ZXN0QGNvbnRvc28ub25taWNyb3NvZnQuY29tAWF1dGg9QmVhcmVyIEV3QkFBbDNCQUFVRkZwVUFvN0ozVmUwYmpMQldaV0NjbFJDM0VvQUEBAQ=="
        );
        // Google's documentation.
        assert_eq!(
            xoauth2_response(
                "someuser@example.com",
                "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg"
            ),
            "dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52YjNSbGNrQmhkSFJoZG1semRHRXVZMjl0Q2cBAQ=="
        );
        let r = parse(&["250-x\r\n", "250 AUTH LOGIN XOAUTH2\r\n"])
            .unwrap()
            .unwrap();
        let ext = Extensions::parse(&r);
        assert!(ext.auth_xoauth2 && ext.auth_login && !ext.auth_plain);
    }

    #[test]
    fn auth_debug_hides_secrets() {
        let a = SmtpAuth::Basic {
            username: "u".into(),
            password: Secret::new("pw-secret"),
        };
        assert!(!format!("{a:?}").contains("pw-secret"));
        let x = SmtpAuth::XOAuth2 {
            user: "a@b".into(),
            tokens: Arc::new(crate::oauth::StaticToken {
                token: Secret::new("tok-secret"),
                identity: "a@b".into(),
            }),
            identities: None,
        };
        assert!(!format!("{x:?}").contains("tok-secret"));
    }

    #[test]
    fn redaction_and_address_checks() {
        let secrets = ["pw".to_string(), String::new()];
        assert_eq!(redact("bad pw here", &secrets), "bad *** here");
        assert!(unsafe_address("a@b>\r\nRCPT TO:<c@d"));
        assert!(!unsafe_address("\"john doe\"@example.com"));
        assert!(!unsafe_address("jörg@example.de"));
    }
}
