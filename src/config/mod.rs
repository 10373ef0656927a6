//! The TOML configuration: every field of the seed's "Outgoing Mail Server Settings" page is a key here; unknown keys are rejected and every error names its key.

pub mod checks;
pub mod env;
pub mod secret;
pub mod throttle;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use secret::Secret;

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.is_empty() { "" } else { "***" })
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret::new)
    }
}

/// A configuration problem, always naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// TOML syntax, a wrong type or an unknown key (the message names it).
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    /// A value is present but unusable.
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: String,
        key: String,
        message: String,
    },
}

/// The whole configuration file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Our name in the SMTP greeting, `Received:` headers and DSNs; empty = the system host name.
    pub hostname: String,
    /// Log filter (`error`, `warn`, `info`, `debug`, or a tracing filter); `RUST_LOG` overrides it.
    pub log_level: String,
    /// Log lines as `text` (human-readable) or `json` (one JSON object per line).
    pub log_format: LogFormat,
    /// Where legacy applications connect.
    pub listen: Listen,
    /// Where accepted mail waits until it is delivered.
    pub spool: SpoolConfig,
    /// Retry, give-up and concurrency policy.
    pub delivery: DeliveryConfig,
    /// The outgoing mail server (the seed's fields).
    pub upstream: Upstream,
    /// The local admin HTTP endpoint (status, failback, queue control).
    pub admin: Admin,
    /// Local SMTP users (AUTH PLAIN/LOGIN on the listener), each mapped to an upstream identity.
    pub users: Vec<User>,
    /// Where the throttle budget lives (this process, or Redis shared by many).
    pub throttle: throttle::Throttle,
    /// Directory the relative paths in this file are relative to (the file's own directory).
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The values that came from `MAILBRIDGE_*` variables (shown by `check`).
    #[serde(skip)]
    pub from_env: Vec<env::FromEnv>,
}

/// The log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// `time level message key=value…`, for people.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            hostname: String::new(),
            log_level: "info".into(),
            log_format: LogFormat::Text,
            listen: Listen::default(),
            spool: SpoolConfig::default(),
            delivery: DeliveryConfig::default(),
            upstream: Upstream::default(),
            admin: Admin::default(),
            users: Vec::new(),
            throttle: throttle::Throttle::default(),
            base_dir: PathBuf::from("."),
            from_env: Vec::new(),
        }
    }
}

/// What a DATA line ending other than CRLF does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BareLineEndings {
    /// Treat a bare CR or bare LF as a line ending and store CRLF (printers
    /// and old scripts send bare LF). Never an end of data.
    Normalize,
    /// Refuse the message with `550 5.6.11` once its data is complete.
    Reject,
}

/// What a NUL byte in DATA does (RFC 5322 forbids NUL in a message; a
/// downstream server that drops it could see `CRLF.CRLF` where mailbridge
/// did not: outbound SMTP smuggling).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NulBytes {
    /// Refuse the message with `550 5.6.0` once its data is complete.
    Reject,
    /// Remove every NUL and accept the rest of the message.
    Strip,
}

/// The inbound SMTP listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    /// `ip:port` to listen on. Loopback by default: mailbridge is not an open relay.
    pub address: String,
    /// Simultaneous SMTP sessions; one more gets `421 4.7.0` and is closed.
    pub max_connections: usize,
    /// Largest message accepted, in bytes (announced with `SIZE`).
    pub max_message_size: usize,
    /// Recipients per message; extra ones get `452 4.5.3` (RFC 5321 asks for at least 100).
    pub max_recipients: usize,
    /// Longest command line in bytes, CRLF included (RFC 5321 minimum 512).
    pub max_command_length: usize,
    /// Seconds a client may stay silent between commands.
    pub idle_timeout_secs: u64,
    /// Seconds a whole DATA transfer may take (slow-drip clients).
    pub data_timeout_secs: u64,
    /// Errors in one session before it is closed with `421`.
    pub max_errors: u32,
    /// A message with more `Received:` headers than this is a mail loop (`554 5.4.6`).
    pub max_received_headers: usize,
    /// Policy for bare CR / bare LF in DATA.
    pub bare_line_endings: BareLineEndings,
    /// Policy for NUL bytes in DATA: `reject` (default, `550 5.6.0`) or `strip`.
    pub nul_bytes: NulBytes,
    /// Simultaneous sessions from one client IP. On the default loopback
    /// listener every local application shares 127.0.0.1, so keep this well
    /// above the number of sessions one host opens at once.
    pub max_connections_per_ip: usize,
    /// Certificate chain (PEM) for STARTTLS and the implicit-TLS listener; empty = no TLS.
    pub tls_cert: String,
    /// Private key (PEM) for `tls_cert`.
    pub tls_key: String,
    /// Optional second listener speaking TLS from the first byte (port 465 style); empty = none.
    pub implicit_tls_address: String,
    /// Client networks (CIDR) allowed to connect; others get `554 5.7.1`.
    pub allow_clients: Vec<ipnet::IpNet>,
    /// Clients must authenticate (AUTH) before `MAIL`. Default: true when
    /// `[[users]]` exist (an explicit `false` keeps a mixed setup, with a notice).
    pub require_auth: bool,
    /// An authenticated user may use only its own address (`mailbox`, else its
    /// name if that is an address, else `upstream.mailbox`) in `MAIL FROM` and `From:`.
    pub bind_sender: bool,
    /// Offer AUTH without TLS to loopback clients (never to others).
    pub auth_cleartext_loopback: bool,
    /// Failed AUTH attempts in one session before `421` and disconnect.
    pub max_auth_failures: u32,
    /// If not empty, only these envelope sender domains are accepted.
    pub allowed_sender_domains: Vec<String>,
    /// If not empty, only these recipient domains are accepted.
    pub allowed_recipient_domains: Vec<String>,
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            address: "127.0.0.1:2525".into(),
            max_connections: 100,
            max_message_size: 35 * 1024 * 1024,
            max_recipients: 100,
            max_command_length: 2048,
            idle_timeout_secs: 300,
            data_timeout_secs: 600,
            max_errors: 10,
            max_received_headers: 30,
            bare_line_endings: BareLineEndings::Normalize,
            nul_bytes: NulBytes::Reject,
            max_connections_per_ip: 50,
            tls_cert: String::new(),
            tls_key: String::new(),
            implicit_tls_address: String::new(),
            allow_clients: vec![
                "127.0.0.0/8".parse().expect("literal"),
                "::1/128".parse().expect("literal"),
            ],
            require_auth: false,
            bind_sender: false,
            auth_cleartext_loopback: true,
            max_auth_failures: 3,
            allowed_sender_domains: Vec::new(),
            allowed_recipient_domains: Vec::new(),
        }
    }
}

/// A local user legacy applications authenticate as (AUTH PLAIN/LOGIN).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// The user name the application sends.
    pub name: String,
    /// Argon2 PHC hash of its password (`mailbridge hash-password` makes one).
    pub password_hash: String,
    /// Upstream mailbox its mail is sent as (the OAuth identity); empty = the default identity.
    #[serde(default)]
    pub mailbox: String,
}

/// The on-disk queue.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// Directory (created if missing).
    pub path: PathBuf,
    /// Messages waiting at most; past it new mail gets `452 4.3.1` (backpressure).
    pub max_messages: usize,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            path: "spool".into(),
            max_messages: 10_000,
        }
    }
}

/// Retry and concurrency policy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Deliveries in flight at once, across all upstreams. Per-mailbox limits
    /// (Graph 4, Exchange Online SMTP 3) are enforced by the throttle, so this
    /// should stay above them.
    pub concurrency: usize,
    /// First retry delay in seconds; doubled per attempt, with jitter.
    pub retry_initial_secs: u64,
    /// Longest retry delay in seconds.
    pub retry_max_secs: u64,
    /// Age in seconds after which a message still not delivered is bounced (default 5 days).
    pub give_up_after_secs: u64,
    /// Which senders get a delivery status notification (bounce).
    pub dsn_to: DsnTo,
    /// Display name on the `From:` of delivery status notifications; the
    /// address is the mailbox the upstream sends as (default "Mail Delivery System").
    pub dsn_from_name: String,
}

/// Which senders a DSN may go to (so mailbridge cannot be used for backscatter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DsnTo {
    /// Only senders that authenticated (AUTH) or sent from a loopback client.
    Local,
    /// As `local`, plus senders whose domain is in `listen.allowed_sender_domains`.
    #[default]
    AllowedDomains,
    /// Every sender except `<>`.
    Any,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            concurrency: 10,
            retry_initial_secs: 60,
            retry_max_secs: 3600,
            give_up_after_secs: 5 * 86400,
            dsn_to: DsnTo::default(),
            dsn_from_name: "Mail Delivery System".into(),
        }
    }
}

/// Upstream protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// SMTP, with STARTTLS when `tls = true` (port 587).
    Smtp,
    /// SMTP inside implicit TLS (port 465).
    Smtps,
    /// One `.eml` file per message in `outbox` (the runnable default; for testing).
    File,
    /// Microsoft Graph `sendMail` with the MIME message (OAuth only).
    Graph,
    /// Exchange Web Services `CreateItem` with `MimeContent` (Basic or OAuth).
    Ews,
}

/// How mailbridge authenticates upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthKind {
    /// Username and password (AUTH PLAIN or LOGIN).
    Basic,
    /// OAuth2 bearer token (XOAUTH2 for SMTP) from `[upstream.oauth]`.
    Oauth,
}

/// Which OAuth provider's defaults apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// Microsoft Entra ID (Office 365 / Exchange Online).
    Office365,
    /// Google (Gmail, Workspace).
    Gmail,
    /// Any OAuth2 server: every URL and the scope must be given.
    Custom,
}

/// How the first token is obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Flow {
    /// Browser consent redirected to mailbridge's admin endpoint (PKCE S256).
    AuthorizationCode,
    /// `mailbridge auth login --device`: a code to enter on another device.
    DeviceCode,
    /// App-only: client id + secret, no user.
    ClientCredentials,
}

/// Microsoft national cloud (selects login and Graph hosts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Cloud {
    /// login.microsoftonline.com, graph.microsoft.com.
    Global,
    /// US Government L4 (GCC High).
    Usgov,
    /// US Government L5 (DoD).
    Dod,
    /// China (21Vianet).
    China,
}

/// The seed's Authorization Server Details.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OAuth {
    /// `office365`, `gmail` or `custom`.
    pub provider: Provider,
    /// `authorization_code`, `device_code` or `client_credentials`.
    pub flow: Flow,
    /// Entra ID tenant (GUID or domain); `organizations` by default.
    pub tenant: String,
    /// Microsoft national cloud.
    pub cloud: Cloud,
    /// Client ID of the registered application.
    pub client_id: String,
    /// Client Secret (prefer `client_secret_env` / `client_secret_file`).
    pub client_secret: Secret,
    /// Environment variable holding the client secret.
    pub client_secret_env: String,
    /// File holding the client secret.
    pub client_secret_file: String,
    /// Certificate (PEM) registered with Entra ID, for `client_credentials`
    /// with a signed client assertion instead of a secret.
    pub client_certificate_file: String,
    /// Private key (PEM, PKCS#8 RSA) of `client_certificate_file`.
    pub client_key_file: String,
    /// Authorization URL; empty = the provider's.
    pub authorization_url: String,
    /// Token URL; empty = the provider's.
    pub token_url: String,
    /// Device authorization URL; empty = the provider's.
    pub device_authorization_url: String,
    /// Scope; empty = the default for provider, protocol and flow.
    pub scope: String,
    /// Redirect URL registered with the provider; must reach the admin endpoint's `/oauth/callback`.
    pub redirect_url: String,
    /// Where tokens are kept (mode 0600); relative to the spool directory.
    pub token_store: String,
}

impl Default for OAuth {
    fn default() -> Self {
        OAuth {
            provider: Provider::Office365,
            flow: Flow::AuthorizationCode,
            tenant: "organizations".into(),
            cloud: Cloud::Global,
            client_id: String::new(),
            client_secret: Secret::default(),
            client_secret_env: String::new(),
            client_secret_file: String::new(),
            client_certificate_file: String::new(),
            client_key_file: String::new(),
            authorization_url: String::new(),
            token_url: String::new(),
            device_authorization_url: String::new(),
            scope: String::new(),
            redirect_url: "http://localhost:8025/oauth/callback".into(),
            token_store: "oauth-tokens.json".into(),
        }
    }
}

/// The seed's "Enable proxy server": an HTTP proxy for the token endpoint,
/// HTTP upstreams, and SMTP (through `CONNECT`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Proxy {
    /// `http://host:port`; empty = no proxy.
    pub url: String,
    /// Proxy username, if it wants one.
    pub username: String,
    /// Proxy password.
    pub password: Secret,
    /// Environment variable holding the proxy password.
    pub password_env: String,
    /// File holding the proxy password.
    pub password_file: String,
}

/// The outgoing mail server: the seed page's fields.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Upstream {
    /// `smtp`, `smtps` or `file`.
    pub protocol: Protocol,
    /// Server Name / IP Address (`host` or `host:port`).
    pub server: String,
    /// Alternate Server Name / IP Address, used when the primary is unreachable (`host` or `host:port`).
    pub alternate_server: String,
    /// Port, for servers given without one.
    pub port: u16,
    /// TLS Enabled: STARTTLS is required for `smtp` (never downgraded); `smtps` is always TLS.
    pub tls: bool,
    /// Extra CA certificates (PEM) to trust, besides the bundled and system roots; a server certificate listed here is trusted as it is (self-signed, even CA:TRUE), names and dates still checked.
    pub tls_ca_file: String,
    /// Pin the SMTP server's certificate: `sha256:<hex>` of it (Postfix's `fingerprint` level); replaces the chain and name checks.
    pub tls_fingerprint: String,
    /// Allow AUTH without TLS (`tls = false`) to a server that is not on loopback: credentials travel in clear.
    pub allow_plaintext_auth: bool,
    /// Requires Authentication.
    pub requires_auth: bool,
    /// `basic` (username and password).
    pub auth: AuthKind,
    /// Username for the mailbox.
    pub username: String,
    /// Password (prefer `password_env` or `password_file`).
    pub password: Secret,
    /// Name of an environment variable holding the password.
    pub password_env: String,
    /// File holding the password.
    pub password_file: String,
    /// Sender Name: display name on outgoing mail (with `reply_to`).
    pub sender_name: String,
    /// Reply to: when set, outgoing mail is sent from this address; the original `From` becomes `Reply-To`.
    pub reply_to: String,
    /// Seconds to wait for each upstream reply or connection.
    pub timeout_secs: u64,
    /// Seconds between automatic probes of the primary while on the alternate; 0 = only `failback` or a reload returns.
    pub failback_probe_secs: u64,
    /// Directory for the `file` protocol.
    pub outbox: PathBuf,
    /// OAuth identity, with `auth = "oauth"`.
    pub oauth: OAuth,
    /// Proxy for upstream connections.
    pub proxy: Proxy,
    /// Graph Endpoint (national clouds: `https://graph.microsoft.us`, `https://dod-graph.microsoft.us`, `https://microsoftgraph.chinacloudapi.cn`).
    pub graph_endpoint: String,
    /// EWS Connect URL, e.g. `https://mail.contoso.com/EWS/Exchange.asmx`.
    pub connect_url: String,
    /// Mailbox to send as (Graph, EWS, XOAUTH2 `user=`); empty = `reply_to`, else `username`.
    pub mailbox: String,
    /// Keep a copy in Sent Items (Graph: always with MIME; EWS: SendAndSaveCopy vs SendOnly).
    pub save_to_sent_items: bool,
    /// Requests (or SMTP connections) in flight per mailbox; 0 = the protocol's default
    /// (Graph 4, EWS 27, Exchange Online SMTP 3, other SMTP unlimited).
    pub max_in_flight: usize,
    /// Messages per minute per mailbox; 0 = the default (30 for Exchange Online SMTP and EWS, else unlimited).
    pub messages_per_minute: u32,
    /// Graph accepts 4 MB per request: larger messages go `"upload"` (draft + upload session) or `"alternate"` (the alternate route).
    pub large_messages: LargeMessages,
    /// A complete alternate upstream, possibly another protocol (e.g. Graph primary, SMTP alternate). Overrides `alternate_server`.
    pub alternate: Option<Box<Upstream>>,
}

/// What Graph does with messages over its 4 MB request limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LargeMessages {
    /// Create a draft, attach through upload sessions, then send (needs Mail.ReadWrite).
    Upload,
    /// Hand them to the alternate route.
    Alternate,
}

impl Default for Upstream {
    fn default() -> Self {
        Upstream {
            protocol: Protocol::File,
            server: String::new(),
            alternate_server: String::new(),
            port: 587,
            tls: true,
            tls_ca_file: String::new(),
            tls_fingerprint: String::new(),
            allow_plaintext_auth: false,
            requires_auth: false,
            auth: AuthKind::Basic,
            username: String::new(),
            password: Secret::default(),
            password_env: String::new(),
            password_file: String::new(),
            sender_name: String::new(),
            reply_to: String::new(),
            timeout_secs: 60,
            failback_probe_secs: 0,
            outbox: "outbox".into(),
            oauth: OAuth::default(),
            proxy: Proxy::default(),
            graph_endpoint: "https://graph.microsoft.com".into(),
            connect_url: String::new(),
            mailbox: String::new(),
            save_to_sent_items: true,
            max_in_flight: 0,
            messages_per_minute: 0,
            large_messages: LargeMessages::Upload,
            alternate: None,
        }
    }
}

/// The admin HTTP endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Admin {
    /// `ip:port`; empty disables it. Loopback by default.
    pub address: String,
    /// Bearer token for state-changing calls. Empty: mailbridge creates
    /// `admin.token` (mode 0600) in the spool directory and the CLI reads it.
    pub token: Secret,
    /// Environment variable holding the token.
    pub token_env: String,
    /// File holding the token.
    pub token_file: String,
    /// Host names (besides loopback ones) a request's `Host` header may
    /// carry; others get `421` (DNS rebinding).
    pub hostnames: Vec<String>,
    /// Allow a non-loopback `address` (plain HTTP: the token crosses the network).
    pub allow_remote: bool,
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            address: "127.0.0.1:8025".into(),
            token: Secret::default(),
            token_env: String::new(),
            token_file: String::new(),
            hostnames: Vec::new(),
            allow_remote: false,
        }
    }
}

/// A server as `host` and `port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    /// Host name or IP address (without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Parse `host`, `host:port`, `[v6]` or `[v6]:port`.
pub fn parse_host_port(s: &str, default_port: u16) -> Result<HostPort, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("is empty".into());
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or("has `[` without `]`")?;
        match after.strip_prefix(':') {
            Some(p) => (h, Some(p)),
            None if after.is_empty() => (h, None),
            None => return Err(format!("unexpected `{after}` after `]`")),
        }
    } else if s.matches(':').count() == 1 {
        let (h, p) = s.split_once(':').ok_or("bad host")?;
        (h, Some(p))
    } else {
        (s, None)
    };
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c == '/') {
        return Err(format!("`{s}` is not a host name or IP address"));
    }
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or(format!("`{p}` is not a port number"))?,
        None => default_port,
    };
    Ok(HostPort {
        host: host.to_string(),
        port,
    })
}

/// True for `localhost` and loopback IP addresses.
fn is_loopback_host(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// An `https://` URL, or `http://` to a loopback host (nothing else: tokens
/// and credentials would travel in clear).
fn secure_url(v: &str) -> Result<(), String> {
    if v.starts_with("https://") {
        return Ok(());
    }
    if !v.starts_with("http://") {
        return Err(format!("`{v}` is not an https:// URL"));
    }
    match url::Url::parse(v)
        .ok()
        .and_then(|u| u.host_str().map(is_loopback_host))
    {
        Some(true) => Ok(()),
        _ => Err(format!(
            "`{v}` is plain http:// to a host that is not loopback: tokens and credentials would travel in clear; use https://"
        )),
    }
}

/// Check one upstream table (`upstream` or `upstream.alternate`) and resolve its secrets.
fn validate_upstream(u: &mut Upstream, prefix: &str, base: &Path) -> Result<(), (String, String)> {
    let key = |k: &str| format!("{prefix}.{k}");
    let bad = |k: &str, m: String| (key(k), m);
    u.password = secret::resolve(
        &key("password"),
        u.password.expose(),
        &u.password_env,
        &u.password_file,
        base,
    )
    .map_err(|m| bad("password", m))?;
    let needs_auth_user = u.requires_auth;
    match u.protocol {
        Protocol::File => {
            if u.outbox.as_os_str().is_empty() {
                return Err(bad("outbox", "is empty".into()));
            }
        }
        Protocol::Smtp | Protocol::Smtps => {
            parse_host_port(&u.server, u.port).map_err(|m| bad("server", m))?;
            if !u.alternate_server.is_empty() {
                parse_host_port(&u.alternate_server, u.port)
                    .map_err(|m| bad("alternate_server", m))?;
            }
            if needs_auth_user && u.username.is_empty() && u.mailbox.is_empty() {
                return Err(bad(
                    "username",
                    "is required when requires_auth = true".into(),
                ));
            }
            if u.protocol == Protocol::Smtp && !u.tls && u.requires_auth && !u.allow_plaintext_auth
            {
                for (k, server) in [
                    ("server", &u.server),
                    ("alternate_server", &u.alternate_server),
                ] {
                    let Ok(hp) = parse_host_port(server, u.port) else {
                        continue;
                    };
                    if !server.is_empty() && !is_loopback_host(&hp.host) {
                        return Err(bad(
                            "tls",
                            format!(
                                "is false with requires_auth = true: the credentials would go in clear to `{}` ({prefix}.{k}), which is not loopback; set tls = true, or {prefix}.allow_plaintext_auth = true to accept that",
                                hp.host
                            ),
                        ));
                    }
                }
            }
        }
        Protocol::Graph => {
            secure_url(&u.graph_endpoint).map_err(|m| bad("graph_endpoint", m))?;
            if !u.requires_auth || u.auth != AuthKind::Oauth {
                return Err(bad(
                    "auth",
                    "Microsoft Graph needs requires_auth = true and auth = \"oauth\"".into(),
                ));
            }
            if u.mailbox.is_empty() && u.reply_to.is_empty() && u.username.is_empty() {
                return Err(bad(
                    "mailbox",
                    "Graph needs the mailbox to send as (mailbox, reply_to or username)".into(),
                ));
            }
        }
        Protocol::Ews => {
            if !u.requires_auth {
                return Err(bad("requires_auth", "Exchange Web Services needs requires_auth = true (auth = \"basic\" or \"oauth\")".into()));
            }
            secure_url(&u.connect_url).map_err(|m| bad("connect_url", m))?;
        }
    }
    if u.requires_auth && u.auth == AuthKind::Basic {
        if u.username.is_empty() {
            return Err(bad(
                "username",
                "is required when requires_auth = true".into(),
            ));
        }
        if u.password.is_empty() {
            return Err(bad(
                "password",
                "is required when requires_auth = true (or password_env / password_file)".into(),
            ));
        }
    }
    if !u.tls_fingerprint.is_empty() {
        if !matches!(u.protocol, Protocol::Smtp | Protocol::Smtps) {
            return Err(bad(
                "tls_fingerprint",
                "pins an SMTP server's certificate; it applies to protocol = \"smtp\" or \"smtps\" only (use tls_ca_file for HTTP upstreams)".into(),
            ));
        }
        crate::tls::parse_fingerprint(&u.tls_fingerprint).map_err(|m| bad("tls_fingerprint", m))?;
    }
    if !u.tls_ca_file.is_empty() && !base.join(&u.tls_ca_file).is_file() {
        return Err(bad(
            "tls_ca_file",
            format!("`{}` is not a readable file", u.tls_ca_file),
        ));
    }
    let o = &mut u.oauth;
    o.client_secret = secret::resolve(
        &key("oauth.client_secret"),
        o.client_secret.expose(),
        &o.client_secret_env,
        &o.client_secret_file,
        base,
    )
    .map_err(|m| bad("oauth.client_secret", m))?;
    if u.requires_auth && u.auth == AuthKind::Oauth {
        if o.client_id.is_empty() {
            return Err(bad(
                "oauth.client_id",
                "is required when auth = \"oauth\"".into(),
            ));
        }
        if o.client_certificate_file.is_empty() != o.client_key_file.is_empty() {
            return Err(bad(
                "oauth.client_key_file",
                "client_certificate_file and client_key_file go together".into(),
            ));
        }
        for (k, v) in [
            ("oauth.client_certificate_file", &o.client_certificate_file),
            ("oauth.client_key_file", &o.client_key_file),
        ] {
            if !v.is_empty() && !base.join(v).is_file() {
                return Err(bad(k, format!("`{v}` is not a readable file")));
            }
        }
        if o.flow == Flow::ClientCredentials
            && o.client_secret.is_empty()
            && o.client_certificate_file.is_empty()
        {
            return Err(bad(
                "oauth.client_secret",
                "is required for flow = \"client_credentials\" (or client_certificate_file and client_key_file)".into(),
            ));
        }
        if o.provider == Provider::Custom && (o.token_url.is_empty() || o.scope.is_empty()) {
            return Err(bad(
                "oauth.token_url",
                "provider = \"custom\" needs token_url and scope".into(),
            ));
        }
        for (k, v) in [
            ("authorization_url", &o.authorization_url),
            ("token_url", &o.token_url),
            ("device_authorization_url", &o.device_authorization_url),
        ] {
            if !v.is_empty() {
                secure_url(v).map_err(|m| bad(&format!("oauth.{k}"), m))?;
            }
        }
        for (k, v) in [("redirect_url", &o.redirect_url)] {
            if !(v.is_empty() || v.starts_with("https://") || v.starts_with("http://")) {
                return Err(bad(
                    &format!("oauth.{k}"),
                    format!("`{v}` is not an http(s) URL"),
                ));
            }
        }
        if o.token_store.is_empty() {
            return Err(bad("oauth.token_store", "is empty".into()));
        }
    }
    let p = &mut u.proxy;
    p.password = secret::resolve(
        &key("proxy.password"),
        p.password.expose(),
        &p.password_env,
        &p.password_file,
        base,
    )
    .map_err(|m| bad("proxy.password", m))?;
    if !p.url.is_empty() && !p.url.starts_with("http://") {
        return Err(bad(
            "proxy.url",
            format!("`{}` is not an http:// proxy URL", p.url),
        ));
    }
    if u.timeout_secs < 1 {
        return Err(bad("timeout_secs", "must be at least 1".into()));
    }
    if !u.reply_to.is_empty() && !crate::address::is_valid_mailbox(&u.reply_to) {
        return Err(bad(
            "reply_to",
            format!("`{}` is not an email address", u.reply_to),
        ));
    }
    if !u.mailbox.is_empty() && !crate::address::is_valid_mailbox(&u.mailbox) {
        return Err(bad(
            "mailbox",
            format!("`{}` is not an email address", u.mailbox),
        ));
    }
    if u.sender_name.contains(['\r', '\n']) {
        return Err(bad("sender_name", "must be one line".into()));
    }
    Ok(())
}

impl Upstream {
    /// The mailbox this upstream sends as: `mailbox`, else `reply_to`, else `username`.
    pub fn effective_mailbox(&self) -> &str {
        [&self.mailbox, &self.reply_to, &self.username]
            .into_iter()
            .find(|s| !s.is_empty())
            .map(|s| s.as_str())
            .unwrap_or("")
    }
}

impl Config {
    /// Read, parse, resolve secrets and validate a configuration file, with
    /// the `MAILBRIDGE_*` variables of this process laid over it (see
    /// [`env`]). A missing file is an empty one when such variables are set.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_with(path, true)
    }

    /// Like [`Config::load`] without validating (no secret is resolved):
    /// for `sendmail`, which runs as the submitting user and needs only the
    /// listener's address and the spool's path.
    pub fn load_unchecked(path: &Path) -> Result<Config, ConfigError> {
        Config::load_with(path, false)
    }

    fn load_with(path: &Path, validate: bool) -> Result<Config, ConfigError> {
        let vars = env::process_vars();
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    && !env::config_vars(&vars).is_empty() =>
            {
                String::new()
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                });
            }
        };
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let base = if base.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            base
        };
        let name = path.display().to_string();
        if validate {
            Config::from_toml_env(&text, &name, &base, &vars)
        } else {
            let mut cfg = Config::parse_env(&text, &name, &vars)?;
            cfg.base_dir = base;
            Ok(cfg)
        }
    }

    /// Parse and validate TOML text; `name` is used in errors, `base` anchors relative paths.
    pub fn from_toml(text: &str, name: &str, base: &Path) -> Result<Config, ConfigError> {
        Config::from_toml_env(text, name, base, &[])
    }

    /// Like [`Config::from_toml`], with the `MAILBRIDGE_*` variables among
    /// `vars` laid over the text. Errors about a value from the environment
    /// name its variable.
    pub fn from_toml_env(
        text: &str,
        name: &str,
        base: &Path,
        vars: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        let mut cfg = Config::parse_env(text, name, vars)?;
        cfg.base_dir = base.to_path_buf();
        cfg.validate().map_err(|(key, message)| {
            // A key set from the environment is named with its variable.
            let key = match cfg.from_env.iter().find(|f| f.key == key) {
                Some(f) => format!("{key} ({})", f.var),
                None => key,
            };
            ConfigError::Invalid {
                path: name.to_string(),
                key,
                message,
            }
        })?;
        Ok(cfg)
    }

    /// Parse TOML text with the variables laid over it, without validating.
    fn parse_env(text: &str, name: &str, vars: &[(String, String)]) -> Result<Config, ConfigError> {
        let parse_err = |message: String| ConfigError::Parse {
            path: name.to_string(),
            message,
        };
        let file_err = |e: toml::de::Error| parse_err(e.to_string().trim_end().to_string());
        // `raw`: the keys given (file and environment), for the defaults
        // that depend on whether a key was set (checks::apply_implied).
        let (mut cfg, raw): (Config, toml::Table) = if env::config_vars(vars).is_empty() {
            (
                toml::from_str(text).map_err(file_err)?,
                text.parse().unwrap_or_default(),
            )
        } else {
            let file: toml::Table = toml::from_str(text).map_err(file_err)?;
            // Check the file alone first, so its own errors keep their line numbers.
            Config::deserialize(toml::Value::Table(file.clone())).map_err(|e| {
                toml::from_str::<Config>(text)
                    .err()
                    .map(file_err)
                    .unwrap_or_else(|| parse_err(e.to_string()))
            })?;
            let schema = toml::Value::try_from(Config::default())
                .map_err(|e| parse_err(format!("configuration schema: {e}")))?;
            let mut doc = toml::Value::Table(file.clone());
            let set = env::overlay(&mut doc, &schema, vars).map_err(parse_err)?;
            match Config::deserialize(doc.clone()) {
                Ok(mut c) => {
                    c.from_env = set;
                    let toml::Value::Table(raw) = doc else {
                        return Err(parse_err("the configuration is not a table".into()));
                    };
                    (c, raw)
                }
                Err(e) => {
                    // Name the variable: lay them on one at a time.
                    for (var, value) in env::config_vars(vars) {
                        let mut one = toml::Value::Table(file.clone());
                        let pair = [(var.clone(), value.clone())];
                        if env::overlay(&mut one, &schema, &pair).is_ok()
                            && let Err(e) = Config::deserialize(one)
                        {
                            return Err(parse_err(format!("{var}: {}", e.message())));
                        }
                    }
                    return Err(parse_err(format!("from the environment: {}", e.message())));
                }
            }
        };
        checks::apply_implied(&mut cfg, &raw);
        Ok(cfg)
    }

    fn validate(&mut self) -> Result<(), (String, String)> {
        let bad = |k: &str, m: String| (k.to_string(), m);
        self.listen.address.parse::<SocketAddr>().map_err(|_| {
            bad(
                "listen.address",
                format!("`{}` is not an `ip:port` address", self.listen.address),
            )
        })?;
        let l = &self.listen;
        if l.max_recipients < 1 {
            return Err(bad("listen.max_recipients", "must be at least 1".into()));
        }
        if l.max_command_length < 512 {
            return Err(bad(
                "listen.max_command_length",
                "must be at least 512 (RFC 5321 §4.5.3.1.4)".into(),
            ));
        }
        if l.max_connections < 1 {
            return Err(bad("listen.max_connections", "must be at least 1".into()));
        }
        if l.max_message_size < 1024 {
            return Err(bad(
                "listen.max_message_size",
                "must be at least 1024 bytes".into(),
            ));
        }
        if l.max_connections_per_ip < 1 {
            return Err(bad(
                "listen.max_connections_per_ip",
                "must be at least 1".into(),
            ));
        }
        if l.tls_cert.is_empty() != l.tls_key.is_empty() {
            return Err(bad(
                "listen.tls_key",
                "tls_cert and tls_key go together".into(),
            ));
        }
        for (k, v) in [
            ("listen.tls_cert", &l.tls_cert),
            ("listen.tls_key", &l.tls_key),
        ] {
            if !v.is_empty() && !self.base_dir.join(v).is_file() {
                return Err(bad(
                    k,
                    format!("`{v}` is not a readable file (see certs/README.md)"),
                ));
            }
        }
        if !l.implicit_tls_address.is_empty() {
            l.implicit_tls_address.parse::<SocketAddr>().map_err(|_| {
                bad(
                    "listen.implicit_tls_address",
                    format!("`{}` is not an `ip:port` address", l.implicit_tls_address),
                )
            })?;
            if l.tls_cert.is_empty() {
                return Err(bad(
                    "listen.implicit_tls_address",
                    "needs listen.tls_cert and listen.tls_key".into(),
                ));
            }
        }
        if l.require_auth && self.users.is_empty() {
            return Err(bad(
                "listen.require_auth",
                "needs at least one [[users]] entry".into(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, u) in self.users.iter().enumerate() {
            if u.name.is_empty() || !seen.insert(u.name.clone()) {
                return Err(bad(
                    &format!("users[{i}].name"),
                    "must be non-empty and unique".into(),
                ));
            }
            if !u.password_hash.starts_with("$argon2") {
                return Err(bad(
                    &format!("users[{i}].password_hash"),
                    "must be an argon2 hash (`mailbridge hash-password`)".into(),
                ));
            }
            if !u.mailbox.is_empty() && !crate::address::is_valid_mailbox(&u.mailbox) {
                return Err(bad(
                    &format!("users[{i}].mailbox"),
                    format!("`{}` is not an email address", u.mailbox),
                ));
            }
        }
        if self.spool.path.as_os_str().is_empty() {
            return Err(bad("spool.path", "is empty".into()));
        }
        if self.spool.max_messages < 1 {
            return Err(bad("spool.max_messages", "must be at least 1".into()));
        }
        let d = &self.delivery;
        if d.concurrency < 1 {
            return Err(bad("delivery.concurrency", "must be at least 1".into()));
        }
        if d.retry_initial_secs < 1 || d.retry_max_secs < d.retry_initial_secs {
            return Err(bad(
                "delivery.retry_max_secs",
                "must be at least retry_initial_secs, which must be at least 1".into(),
            ));
        }
        let base = self.base_dir.clone();
        validate_upstream(&mut self.upstream, "upstream", &base)?;
        if self.upstream.protocol == Protocol::Graph
            && self.upstream.large_messages == LargeMessages::Alternate
            && self.upstream.alternate.is_none()
        {
            return Err(bad(
                "upstream.large_messages",
                "\"alternate\" needs an [upstream.alternate]".into(),
            ));
        }
        if let Some(alt) = self.upstream.alternate.as_deref_mut() {
            if alt.alternate.is_some() {
                return Err(bad(
                    "upstream.alternate.alternate",
                    "an alternate cannot have its own alternate".into(),
                ));
            }
            validate_upstream(alt, "upstream.alternate", &base)?;
        }
        if !self.admin.address.is_empty() {
            self.admin.address.parse::<SocketAddr>().map_err(|_| {
                bad(
                    "admin.address",
                    format!(
                        "`{}` is not an `ip:port` address (or empty to disable)",
                        self.admin.address
                    ),
                )
            })?;
        }
        let a = &mut self.admin;
        a.token = secret::resolve(
            "admin.token",
            a.token.expose(),
            &a.token_env,
            &a.token_file,
            &self.base_dir,
        )
        .map_err(|m| bad("admin.token", m))?;
        throttle::validate(&mut self.throttle, &self.base_dir)?;
        checks::validate(self)
    }

    /// The address `user` may send as under `listen.bind_sender`: its
    /// `mailbox`, else its name if that is an address, else the default
    /// identity's mailbox (`upstream.mailbox`, `reply_to`, `username`).
    pub fn own_mailbox(&self, user: &User) -> Option<String> {
        [
            user.mailbox.as_str(),
            user.name.as_str(),
            self.upstream.effective_mailbox(),
        ]
        .into_iter()
        .find(|a| crate::address::is_valid_mailbox(a))
        .map(str::to_string)
    }

    /// What `check` and `run` verify beyond the file: the spool directory is writable.
    pub fn check_environment(&self) -> Result<(), String> {
        checks::probe_spool(self)
    }

    /// A path from the config, made absolute against the config file's directory.
    pub fn path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    /// The effective configuration as TOML, with secrets masked.
    pub fn to_masked_toml(&self) -> String {
        toml::to_string_pretty(self)
            .unwrap_or_else(|e| format!("# cannot print configuration: {e}\n"))
    }

    /// Operator notices about the configured upstreams (e.g. EWS in Exchange
    /// Online is being retired), for `check` and the startup log.
    pub fn notices(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.users.is_empty() && !self.listen.require_auth {
            out.push("listen.require_auth = false with [[users]]: clients that do not authenticate may still send, as the default identity".into());
        }
        if self.admin.allow_remote
            && self
                .admin
                .address
                .parse::<SocketAddr>()
                .is_ok_and(|a| !a.ip().to_canonical().is_loopback())
        {
            out.push(format!("admin.address: {} is reachable from the network over plain HTTP (admin.allow_remote = true): the admin token and status cross it unencrypted", self.admin.address));
        }
        let mut ups = vec![("upstream", &self.upstream)];
        if let Some(a) = self.upstream.alternate.as_deref() {
            ups.push(("upstream.alternate", a));
        }
        for (key, u) in ups {
            if u.protocol == Protocol::Ews
                && let Some(n) = crate::transport::ews::exchange_online_notice(&u.connect_url)
            {
                out.push(format!("{key}.connect_url: {n}"));
            }
            if matches!(u.protocol, Protocol::Smtp | Protocol::Smtps)
                && u.requires_auth
                && u.auth == AuthKind::Basic
                && u.server.to_ascii_lowercase().contains("office365.com")
            {
                out.push(format!(
                    "{key}: Exchange Online disables SMTP Basic authentication by default from the end of December 2026; use auth = \"oauth\""
                ));
            }
        }
        out
    }

    /// Our host name: the configured one, else the system's, else `localhost`.
    pub fn effective_hostname(&self) -> String {
        if !self.hostname.is_empty() {
            return self.hostname.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "localhost".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<Config, ConfigError> {
        Config::from_toml(t, "test.toml", Path::new("."))
    }

    #[test]
    fn empty_file_is_the_runnable_default() {
        let c = parse("").unwrap();
        assert_eq!(c.upstream.protocol, Protocol::File);
        assert_eq!(c.listen.address, "127.0.0.1:2525");
    }

    #[test]
    fn unknown_key_is_named() {
        let e = parse("[upstream]\nservre = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("servre"), "{e}");
    }

    #[test]
    fn wrong_type_is_named() {
        let e = parse("[upstream]\nport = \"x\"\n").unwrap_err().to_string();
        assert!(e.contains("port"), "{e}");
    }

    #[test]
    fn invalid_values_name_the_key() {
        let cases = [
            ("[listen]\naddress = \"localhost\"", "listen.address"),
            (
                "[upstream]\nprotocol = \"smtp\"\nserver = \"\"",
                "upstream.server",
            ),
            (
                "[upstream]\nprotocol = \"smtp\"\nserver = \"a:99999\"",
                "upstream.server",
            ),
            (
                "[upstream]\nprotocol = \"smtp\"\nserver = \"a\"\nalternate_server = \"b c\"",
                "upstream.alternate_server",
            ),
            (
                "[upstream]\nprotocol = \"smtp\"\nserver = \"a\"\nrequires_auth = true",
                "upstream.username",
            ),
            (
                "[upstream]\nprotocol = \"smtp\"\nserver = \"a\"\nrequires_auth = true\nusername = \"u\"",
                "upstream.password",
            ),
            (
                "[upstream]\nreply_to = \"not an address\"",
                "upstream.reply_to",
            ),
            ("[listen]\nmax_recipients = 0", "listen.max_recipients"),
            ("[upstream]\nprotocol = \"pigeon\"", "protocol"),
        ];
        for (text, key) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(key), "{text:?} gave {e}");
        }
    }

    #[test]
    fn secrets_are_masked_in_output() {
        let c =
            parse("[upstream]\npassword = \"s3cret-pw\"\n[admin]\ntoken = \"adm1n-tok\"").unwrap();
        let out = c.to_masked_toml();
        assert!(
            !out.contains("s3cret-pw") && !out.contains("adm1n-tok"),
            "{out}"
        );
        assert!(out.contains("***"));
        assert!(!format!("{c:?}").contains("s3cret-pw"));
    }

    #[test]
    fn environment_over_the_file_names_the_variable() {
        let env = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        let file = "[upstream]\nprotocol = \"smtp\"\nserver = \"file.example\"\nport = 25\n";
        let c = Config::from_toml_env(
            file,
            "f.toml",
            Path::new("."),
            &env(&[
                ("MAILBRIDGE_UPSTREAM__SERVER", "env.example"),
                ("MAILBRIDGE_UPSTREAM__TLS", "false"),
                ("MAILBRIDGE_LOG_FORMAT", "json"),
            ]),
        )
        .unwrap();
        assert_eq!(c.upstream.server, "env.example");
        assert_eq!(c.upstream.port, 25);
        assert!(!c.upstream.tls);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.from_env.len(), 3);
        for (vars, want) in [
            (
                &[("MAILBRIDGE_UPSTREAM__PROTOCOL", "pigeon")][..],
                "MAILBRIDGE_UPSTREAM__PROTOCOL",
            ),
            (
                &[("MAILBRIDGE_UPSTREAM__SERVER", "a b")][..],
                "upstream.server (MAILBRIDGE_UPSTREAM__SERVER)",
            ),
            (
                &[("MAILBRIDGE_LISTEN__ADRESS", "x")][..],
                "MAILBRIDGE_LISTEN__ADRESS",
            ),
        ] {
            let e = Config::from_toml_env(file, "f.toml", Path::new("."), &env(vars))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{vars:?} gave {e}");
        }
    }

    #[test]
    fn host_port_forms() {
        assert_eq!(
            parse_host_port("a.example", 587).unwrap(),
            HostPort {
                host: "a.example".into(),
                port: 587
            }
        );
        assert_eq!(parse_host_port("a.example:25", 587).unwrap().port, 25);
        assert_eq!(
            parse_host_port("[::1]:26", 587).unwrap(),
            HostPort {
                host: "::1".into(),
                port: 26
            }
        );
        assert_eq!(parse_host_port("::1", 587).unwrap().host, "::1");
        assert!(parse_host_port("a:0", 1).is_err());
    }
}
