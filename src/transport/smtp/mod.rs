//! SMTP/SMTPS upstream: a small tokio + rustls SMTP client with per-recipient results, STARTTLS or implicit TLS, AUTH PLAIN/LOGIN/XOAUTH2/OAUTHBEARER and a pool of idle connections.
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

mod auth;
mod conn;
mod deliver;
mod encode;
pub use encode::{DataEncoder, data_form};
mod pool;
mod reply;

use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::ServerName;

use super::{Body, Delivery, Envelope, Failure, Transport};
use crate::common::BoxFuture;
use crate::config::HostPort;
use conn::ProxyTunnel;
use pool::Pool;

pub use auth::{
    AuthVerdict, MAX_COMMAND_LINE, Mechanism, SmtpAuth, auth_command, oauthbearer_response,
    xoauth2_response,
};

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
            pool: Arc::new(Pool::new(pool::POOL_MAX_IDLE)),
            proxy: None,
        })
    }

    /// Accept only the server certificate with this SHA-256 (`sha256:<hex>`,
    /// Postfix's `fingerprint` level): replaces the chain and name checks;
    /// the handshake signature is still verified. `None` changes nothing.
    pub fn with_tls_fingerprint(mut self, fingerprint: Option<&str>) -> Result<Self, String> {
        if let Some(fp) = fingerprint {
            self.tls = tokio_rustls::TlsConnector::from(crate::tls::client_config_pinned(
                self.settings.ca_file.as_deref(),
                Some(fp),
            )?);
        }
        Ok(self)
    }

    /// Keep up to `n` idle connections for reuse (at least one): as many as
    /// deliveries run at once, so a busy relay reuses every connection it
    /// opened instead of closing some after each burst. Never more
    /// connections than that: each delivery holds one, idle or not.
    pub fn with_idle_connections(mut self, n: usize) -> Self {
        self.pool = Arc::new(Pool::new(n.max(1)));
        self
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

    fn deliver<'a>(&'a self, env: &'a Envelope, message: &'a Body) -> BoxFuture<'a, Delivery> {
        Box::pin(self.deliver_inner(env, message))
    }

    fn probe(&self) -> BoxFuture<'_, Result<(), Failure>> {
        Box::pin(self.probe_inner())
    }
}

/// `text` with control characters replaced, for failure texts.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}
