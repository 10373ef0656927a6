//! Exchange Web Services upstream: SOAP `CreateItem` with the message as base64 `MimeContent`, Basic or OAuth2 bearer (app-only with impersonation), and EWS replies and faults classified into delivered / transient / permanent.
//!
//! One attempt is one `POST` of a `CreateItem` request (UPSTREAMS.md §4.2).
//! EWS takes the recipients from the MIME headers, so recipients that are
//! only in the envelope are added as one `Bcc:` field, and header recipients
//! outside the envelope are dropped ([`crate::message::recipients::prepare`],
//! shared with Graph).
//! The outcome is all-or-nothing: every recipient of the envelope shares it.
//!
//! Classification (UPSTREAMS.md §4.3), in `classify.rs` only (the SOAP body
//! read with `quick-xml`):
//!
//! * `ResponseClass="Success"` + `NoError` → delivered.
//! * `ErrorServerBusy` (SOAP fault, HTTP 500 or 200, or as the inner error of
//!   `ErrorInternalServerError`) → transient, `not_before` =
//!   `BackOffMilliseconds` (60 s when absent). The governor in front of this
//!   transport pauses the whole mailbox for that long.
//! * `ErrorExceededConnectionCount` and other server-side transient codes →
//!   transient (this message).
//! * Any other EWS code (`ErrorSendAsDenied`, `ErrorAccessDenied`,
//!   `ErrorInvalidRecipients`, `ErrorMessageSizeExceeded`, …) → permanent,
//!   with the code and `MessageText` in the text (it ends up in the DSN).
//! * HTTP 401 → bearer: the token is invalidated and the request sent once
//!   more with a fresh one; then (and for Basic at once) a server failure.
//!   HTTP 403/404/5xx without a SOAP body, network errors and timeouts →
//!   server failures, so the router may try the alternate.
//!
//! What is not here: NTLM/Negotiate (on-premises Exchange often offers only
//! those; enable Basic on the EWS virtual directory, or use OAuth), and
//! `MimeContentUTF8` for SMTPUTF8 messages.

mod classify;
mod soap;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::{Body, Delivery, Envelope, Failure, Transport};
use crate::common::BoxFuture;
use crate::common::Secret;
use crate::config::Proxy;
use crate::oauth::TokenSource;
use classify::classify;
use soap::get_folder_request;

pub use classify::{MAX_DEPTH, SoapReply};
pub use soap::{create_item_envelope, create_item_request};

/// Classify one HTTP answer to a `CreateItem` exactly as the transport does
/// (status, body, `Retry-After`); the entry point of the `ews_reply` fuzz target.
pub fn classify_response(
    status: u16,
    body: &[u8],
    retry_after: Option<Duration>,
) -> Result<(), Failure> {
    classify(status, body, retry_after)
}

/// The `RequestServerVersion` we speak unless told otherwise: the oldest
/// version that has everything we use and that Exchange Online accepts.
pub const DEFAULT_SERVER_VERSION: &str = "Exchange2013_SP1";
/// Exchange's default EWS `MaxConcurrency` per mailbox (2013 and Online);
/// the governor's in-flight limit when `max_in_flight = 0`.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 27;
/// Wait after `ErrorServerBusy` when the fault carries no `BackOffMilliseconds`
/// (DavMail uses the same default).
pub const DEFAULT_BACKOFF: Duration = Duration::from_secs(60);

/// Most response bytes read (a CreateItem answer is a few hundred bytes; a
/// fault with a stack trace a few kilobytes).
const MAX_RESPONSE_BYTES: usize = 1 << 20;
/// Longest upstream text kept in a failure.
const MAX_TEXT: usize = 500;
/// A `BackOffMilliseconds` longer than this is treated as this (a day).
const MAX_BACKOFF: Duration = Duration::from_secs(86_400);

/// How we authenticate to the EWS endpoint.
#[derive(Clone)]
pub enum EwsAuth {
    /// HTTP Basic (Exchange Server; Exchange Online no longer accepts it).
    Basic {
        /// User name (`user@domain` or `DOMAIN\user`).
        username: String,
        /// Password; only ever sent in the `Authorization` header.
        password: Secret,
    },
    /// OAuth2 bearer tokens (delegated `EWS.AccessAsUser.All`, or app-only
    /// `full_access_as_app` together with [`EwsSettings::impersonate`]).
    Bearer {
        /// Tokens for the configured identity.
        tokens: Arc<dyn TokenSource>,
        /// Delegated tokens of other mailboxes, keyed by lower-case address:
        /// an envelope whose `identity` is one of them uses that token. Empty
        /// for app-only (one token impersonates every mailbox).
        per_mailbox: HashMap<String, Arc<dyn TokenSource>>,
    },
}

impl EwsAuth {
    /// Bearer tokens from one source, no per-mailbox tokens.
    pub fn bearer(tokens: Arc<dyn TokenSource>) -> EwsAuth {
        EwsAuth::Bearer {
            tokens,
            per_mailbox: HashMap::new(),
        }
    }
}

impl std::fmt::Debug for EwsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EwsAuth::Basic { username, password } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", password)
                .finish(),
            EwsAuth::Bearer {
                tokens,
                per_mailbox,
            } => f
                .debug_struct("Bearer")
                .field("identity", &tokens.identity())
                .field("per_mailbox", &per_mailbox.keys().collect::<Vec<_>>())
                .finish(),
        }
    }
}

/// Everything an [`EwsTransport`] needs.
#[derive(Debug, Clone)]
pub struct EwsSettings {
    /// The Connect URL, e.g. `https://mail.contoso.com/EWS/Exchange.asmx`.
    pub connect_url: String,
    /// Basic or bearer.
    pub auth: EwsAuth,
    /// Send as another mailbox through `ExchangeImpersonation` and
    /// `X-AnchorMailbox` (required with app-only tokens; works with Basic
    /// too when the account holds the ApplicationImpersonation role).
    pub impersonate: bool,
    /// The mailbox sent as when the envelope names no identity (the
    /// impersonated one; also the key of the throttling governor).
    pub mailbox: String,
    /// `SendAndSaveCopy` into Sent Items, else `SendOnly`.
    pub save_to_sent_items: bool,
    /// `RequestServerVersion`, normally [`DEFAULT_SERVER_VERSION`].
    pub server_version: String,
    /// Extra CA certificate(s) (PEM) to trust (on-premises Exchange with a private CA).
    pub ca_file: Option<PathBuf>,
    /// HTTP proxy for the requests.
    pub proxy: Proxy,
    /// Limit for each request (connect, send, answer).
    pub timeout: Duration,
}

/// The EWS upstream.
pub struct EwsTransport {
    /// The endpoint.
    url: reqwest::Url,
    /// The settings it was built from.
    settings: EwsSettings,
    /// Shared HTTP client (connection pool, proxy, CA).
    client: reqwest::Client,
}

impl std::fmt::Debug for EwsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EwsTransport")
            .field("settings", &self.settings)
            .finish()
    }
}

/// Which mailbox and which token one request uses.
struct Target<'a> {
    /// The mailbox sent as (impersonated, when impersonating).
    mailbox: &'a str,
    /// Tokens for this request (bearer only).
    tokens: Option<&'a Arc<dyn TokenSource>>,
}

/// A response as read from the wire.
struct Reply {
    status: u16,
    body: Vec<u8>,
    retry_after: Option<Duration>,
}

impl EwsTransport {
    /// Check the settings and build the HTTP client.
    pub fn new(settings: EwsSettings) -> Result<Self, String> {
        let url = reqwest::Url::parse(&settings.connect_url)
            .map_err(|e| format!("connect_url: `{}`: {e}", settings.connect_url))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(format!(
                "connect_url: `{}` is not an http(s) URL",
                settings.connect_url
            ));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err("connect_url: put credentials in username/password, not in the URL".into());
        }
        if settings.impersonate && settings.mailbox.is_empty() {
            return Err("mailbox: impersonation needs the mailbox to send as".into());
        }
        if settings.server_version.is_empty()
            || !settings
                .server_version
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(format!(
                "server version `{}` is not an EWS version name",
                settings.server_version
            ));
        }
        let client = crate::http::client(
            settings.ca_file.as_deref(),
            &settings.proxy,
            settings.timeout,
        )?;
        Ok(EwsTransport {
            url,
            settings,
            client,
        })
    }

    /// The mailbox and token an envelope is sent with.
    fn target<'a>(&'a self, env: &'a Envelope) -> Target<'a> {
        let mailbox = env
            .identity
            .as_deref()
            .filter(|m| !m.is_empty())
            .unwrap_or(&self.settings.mailbox);
        let tokens = match &self.settings.auth {
            EwsAuth::Basic { .. } => None,
            EwsAuth::Bearer {
                tokens,
                per_mailbox,
            } => Some(
                per_mailbox
                    .get(&mailbox.to_ascii_lowercase())
                    .unwrap_or(tokens),
            ),
        };
        Target { mailbox, tokens }
    }

    /// `POST` one SOAP request, with authentication; on a 401 with a bearer
    /// token, once more with a fresh token (and a new body from `body`).
    async fn post(&self, body: &SoapBody, target: &Target<'_>) -> Result<Reply, Failure> {
        let mut base = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "text/xml; charset=utf-8")
            .header(reqwest::header::ACCEPT, "text/xml")
            .header(reqwest::header::CONTENT_LENGTH, body.len());
        if self.settings.impersonate {
            base = base.header("X-AnchorMailbox", target.mailbox);
        }
        let mut refreshed = false;
        loop {
            let Some(mut req) = base.try_clone() else {
                return Err(Failure::transient("EWS: cannot repeat the request"));
            };
            let mut sent_token = None;
            match (&self.settings.auth, target.tokens) {
                (EwsAuth::Basic { username, password }, _) => {
                    req = req.basic_auth(username, Some(password.expose()));
                }
                (EwsAuth::Bearer { .. }, Some(tokens)) => match tokens.token().await {
                    Ok(t) => {
                        req = req.bearer_auth(t.expose());
                        sent_token = Some(t);
                    }
                    Err(e) => {
                        return Err(Failure::transient(format!(
                            "EWS: no OAuth token for {}: {e}",
                            tokens.identity()
                        )));
                    }
                },
                (EwsAuth::Bearer { .. }, None) => {
                    return Err(Failure::transient("EWS: no token source"));
                }
            }
            let resp = req
                .body(body.request_body())
                .send()
                .await
                .map_err(|e| self.network_failure(&e))?;
            let status = resp.status().as_u16();
            if status == 401 {
                let diagnostics = header_text(&resp, "x-ms-diagnostics")
                    .or_else(|| header_text(&resp, "www-authenticate"));
                if let (Some(t), Some(tokens), false) = (&sent_token, target.tokens, refreshed) {
                    tokens.invalidate(t);
                    refreshed = true;
                    continue;
                }
                return Err(self.unauthorized(diagnostics.as_deref()));
            }
            let retry_after = header_text(&resp, "retry-after")
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(|s| Duration::from_secs(s).min(MAX_BACKOFF));
            let body = read_capped(resp)
                .await
                .map_err(|e| self.network_failure(&e))?;
            return Ok(Reply {
                status,
                body,
                retry_after,
            });
        }
    }

    /// The failure for a rejected `Authorization` (after the one refresh).
    fn unauthorized(&self, diagnostics: Option<&str>) -> Failure {
        let extra = diagnostics
            .map(|d| format!(" ({})", clean(d)))
            .unwrap_or_default();
        let text = match &self.settings.auth {
            EwsAuth::Basic { username, .. } => format!(
                "EWS {}: credentials rejected for {username} (HTTP 401; check username/password; \
                 Exchange Online no longer accepts Basic){extra}",
                self.host()
            ),
            EwsAuth::Bearer { .. } => format!(
                "EWS {}: OAuth token rejected (HTTP 401, also after a refresh; check the app's \
                 EWS permission and scope){extra}",
                self.host()
            ),
        };
        Failure::server(self.scrub(text))
    }

    /// A transport-level error: the server is unreachable or did not answer.
    fn network_failure(&self, e: &reqwest::Error) -> Failure {
        if e.is_builder() {
            return Failure::transient(format!("EWS: cannot build the request: {}", chain(e)));
        }
        let what = if e.is_timeout() {
            "timed out"
        } else if e.is_connect() {
            "cannot connect"
        } else {
            "request failed"
        };
        Failure::server(self.scrub(format!("EWS {}: {what}: {}", self.host(), chain(e))))
    }

    /// Host (and port) of the endpoint, for texts.
    fn host(&self) -> String {
        let host = self.url.host_str().unwrap_or("?");
        match self.url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        }
    }

    /// Remove any credential that might have been echoed into a text.
    fn scrub(&self, text: String) -> String {
        match &self.settings.auth {
            EwsAuth::Basic { password, .. } if !password.is_empty() => {
                text.replace(password.expose(), "***")
            }
            _ => text,
        }
    }

    /// Classify one reply, scrubbing the text.
    fn outcome(&self, reply: &Reply) -> Result<(), Failure> {
        classify(reply.status, &reply.body, reply.retry_after).map_err(|mut f| {
            f.text = self.scrub(format!("EWS {}: {}", self.host(), f.text));
            f
        })
    }

    async fn deliver_inner(&self, env: &Envelope, message: &Body) -> Delivery {
        if env.rcpts.is_empty() {
            return Ok(Vec::new());
        }
        let target = self.target(env);
        // Only the header block is rewritten; the MIME content is read from
        // the spool and base64-encoded as the request goes out.
        let head = crate::message::recipients::prepare(message.head(), &env.rcpts).message;
        let (open, close) = create_item_envelope(
            &self.settings.server_version,
            self.settings.impersonate.then_some(target.mailbox),
            self.settings.save_to_sent_items,
        );
        let body = SoapBody::Streamed {
            open: Bytes::from(open),
            mime: message.with_head(head),
            close: Bytes::from_static(close.as_bytes()),
        };
        let reply = self.post(&body, &target).await?;
        self.outcome(&reply)?;
        Ok(env.rcpts.iter().map(|_| Ok(())).collect())
    }

    async fn probe_inner(&self) -> Result<(), Failure> {
        let env = Envelope {
            id: String::new(),
            from: String::new(),
            rcpts: Vec::new(),
            identity: None,
        };
        let target = self.target(&env);
        let body = get_folder_request(
            &self.settings.server_version,
            self.settings.impersonate.then_some(target.mailbox),
        );
        let reply = self.post(&SoapBody::Text(body.into()), &target).await?;
        match self.outcome(&reply) {
            Ok(()) => Ok(()),
            // A throttled or failing server is not ready to take traffic back.
            Err(f) if f.severity == super::Severity::Transient => Err(f),
            // Any other EWS answer (e.g. no access to that folder) proves
            // the endpoint is up and accepted our credentials.
            Err(_) => Ok(()),
        }
    }
}

impl Transport for EwsTransport {
    fn describe(&self) -> String {
        let mut url = self.url.clone();
        url.set_query(None);
        url.set_fragment(None);
        if self.settings.mailbox.is_empty() {
            format!("ews {url}")
        } else {
            format!("ews {url} as {}", self.settings.mailbox)
        }
    }

    fn deliver<'a>(&'a self, env: &'a Envelope, message: &'a Body) -> BoxFuture<'a, Delivery> {
        Box::pin(self.deliver_inner(env, message))
    }

    /// A `GetFolder` of Sent Items (ids only): cheap, authenticated, and
    /// answered by the mailbox server, so it fails when Exchange does.
    /// Success, or any permanent EWS error, means "usable"; 401, throttling,
    /// 5xx and network errors mean "not yet".
    fn probe(&self) -> BoxFuture<'_, Result<(), Failure>> {
        Box::pin(self.probe_inner())
    }
}

/// A SOAP request body that can be sent more than once (the retry after a
/// `401`).
enum SoapBody {
    /// A small request held whole (the probe).
    Text(Bytes),
    /// `CreateItem`: the envelope up to `<t:MimeContent>`, the message in
    /// base64 made as the spool file is read, and the rest of the envelope.
    Streamed {
        open: Bytes,
        mime: Body,
        close: Bytes,
    },
}

impl SoapBody {
    /// Bytes on the wire (the `Content-Length`).
    fn len(&self) -> u64 {
        match self {
            SoapBody::Text(t) => t.len() as u64,
            SoapBody::Streamed { open, mime, close } => {
                open.len() as u64 + mime.base64_len() + close.len() as u64
            }
        }
    }

    /// A fresh request body.
    fn request_body(&self) -> reqwest::Body {
        match self {
            SoapBody::Text(t) => reqwest::Body::from(t.clone()),
            SoapBody::Streamed { open, mime, close } => {
                reqwest::Body::wrap_stream(mime.base64_stream(open.clone(), close.clone()))
            }
        }
    }
}

/// Read at most [`MAX_RESPONSE_BYTES`] of a body (the rest is ignored).
async fn read_capped(mut resp: reqwest::Response) -> Result<Vec<u8>, reqwest::Error> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        let room = MAX_RESPONSE_BYTES.saturating_sub(out.len());
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if out.len() >= MAX_RESPONSE_BYTES {
            break;
        }
    }
    Ok(out)
}

/// A response header as text, if present and printable.
fn header_text(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// An error and its sources, `: `-separated (reqwest's own text is terse).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    // A refused certificate: its cause and fix rather than rustls's words.
    if let Some(tls) = crate::tls::describe(e) {
        return clean(&format!("TLS: {tls}"));
    }
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let t = s.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        source = s.source();
    }
    clean(&out)
}

/// One line of at most [`MAX_TEXT`] characters.
fn clean(s: &str) -> String {
    let one: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let mut one = one.split_whitespace().collect::<Vec<_>>().join(" ");
    if one.chars().count() > MAX_TEXT {
        one = one.chars().take(MAX_TEXT).collect::<String>() + "…";
    }
    one
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_rejects_bad_settings() {
        let s = |url: &str, impersonate: bool, mailbox: &str| EwsSettings {
            connect_url: url.into(),
            auth: EwsAuth::Basic {
                username: "u".into(),
                password: Secret::new("p"),
            },
            impersonate,
            mailbox: mailbox.into(),
            save_to_sent_items: true,
            server_version: DEFAULT_SERVER_VERSION.into(),
            ca_file: None,
            proxy: Proxy::default(),
            timeout: Duration::from_secs(5),
        };
        assert!(EwsTransport::new(s("ftp://x/EWS", false, "")).is_err());
        assert!(EwsTransport::new(s("https://u:p@x/EWS", false, "")).is_err());
        assert!(EwsTransport::new(s("https://x/EWS", true, "")).is_err());
        let t = EwsTransport::new(s("https://x/EWS/Exchange.asmx?q=1", true, "a@x")).unwrap();
        assert_eq!(t.describe(), "ews https://x/EWS/Exchange.asmx as a@x");
        assert!(!format!("{t:?}").contains("\"p\""));
    }
}
