//! The configuration schema: every table and key of the TOML file with its default, as serde reads it (unknown keys rejected).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::env;
use super::resolved::{Resolved, Sockets};
use crate::common::Secret;

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
    pub throttle: super::throttle::Throttle,
    /// Directory the relative paths in this file are relative to (the file's own directory).
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The values that came from `MAILBRIDGE_*` variables (shown by `check`).
    #[serde(skip)]
    pub from_env: Vec<env::FromEnv>,
    /// The listener and admin addresses, parsed by validation.
    #[serde(skip)]
    pub sockets: Sockets,
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
            throttle: super::throttle::Throttle::default(),
            base_dir: PathBuf::from("."),
            from_env: Vec::new(),
            sockets: Sockets::default(),
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
    /// What validation derived from this table (servers, Exchange Online, OAuth settings).
    #[serde(skip)]
    pub resolved: Resolved,
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
            resolved: Resolved::default(),
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

impl Upstream {
    /// The mailbox this upstream sends as: `mailbox`, else `reply_to`, else `username`.
    pub fn effective_mailbox(&self) -> &str {
        [&self.mailbox, &self.reply_to, &self.username]
            .into_iter()
            .find(|s| !s.is_empty())
            .map(|s| s.as_str())
            .unwrap_or("")
    }

    /// True when this table authenticates with OAuth (`requires_auth`,
    /// `auth = "oauth"`, and a protocol that sends tokens).
    pub fn uses_oauth(&self) -> bool {
        self.requires_auth && self.auth == AuthKind::Oauth && self.protocol != Protocol::File
    }
}
