//! Exchange Web Services upstream: SOAP `CreateItem` with the message as base64 `MimeContent`, Basic or OAuth2 bearer (app-only with impersonation), and EWS replies and faults classified into delivered / transient / permanent.
//!
//! One attempt is one `POST` of a `CreateItem` request (UPSTREAMS.md §4.2).
//! EWS takes the recipients from the MIME headers, so recipients that are
//! only in the envelope are added as one `Bcc:` field, and header recipients
//! outside the envelope are dropped ([`crate::message::recipients::prepare`],
//! shared with Graph).
//! The outcome is all-or-nothing: every recipient of the envelope shares it.
//!
//! Classification (UPSTREAMS.md §4.3), in this file only:
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

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

use super::{BoxFuture, Delivery, Envelope, Failure, Transport};
use crate::config::{Proxy, Secret};
use crate::oauth::TokenSource;

/// The `RequestServerVersion` we speak unless told otherwise: the oldest
/// version that has everything we use and that Exchange Online accepts.
pub const DEFAULT_SERVER_VERSION: &str = "Exchange2013_SP1";
/// Exchange's default EWS `MaxConcurrency` per mailbox (2013 and Online);
/// the governor's in-flight limit when `max_in_flight = 0`.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 27;
/// Wait after `ErrorServerBusy` when the fault carries no `BackOffMilliseconds`
/// (DavMail uses the same default).
pub const DEFAULT_BACKOFF: Duration = Duration::from_secs(60);

/// SOAP 1.1 envelope namespace.
const NS_SOAP: &str = "http://schemas.xmlsoap.org/soap/envelope/";
/// EWS types namespace (`t:`).
const NS_TYPES: &str = "http://schemas.microsoft.com/exchange/services/2006/types";
/// EWS messages namespace (`m:`).
const NS_MESSAGES: &str = "http://schemas.microsoft.com/exchange/services/2006/messages";
/// Most response bytes read (a CreateItem answer is a few hundred bytes; a
/// fault with a stack trace a few kilobytes).
const MAX_RESPONSE_BYTES: usize = 1 << 20;
/// Longest upstream text kept in a failure.
const MAX_TEXT: usize = 500;
/// A `BackOffMilliseconds` longer than this is treated as this (a day).
const MAX_BACKOFF: Duration = Duration::from_secs(86_400);

/// EWS codes that say "later" rather than "never" (ews-throttling-in-exchange
/// and the EWS `ResponseCode` reference: throttling, mailbox moves, store and
/// server hiccups).
const TRANSIENT_CODES: &[&str] = &[
    "ErrorServerBusy",
    "ErrorExceededConnectionCount",
    "ErrorInternalServerTransientError",
    "ErrorInternalServerError",
    "ErrorMailboxStoreUnavailable",
    "ErrorMailboxMoveInProgress",
    "ErrorTimeoutExpired",
    "ErrorConnectionFailed",
    "ErrorTooManyObjectsOpened",
    "ErrorBatchProcessingStopped",
    "ErrorProxyRequestProcessingFailed",
];

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
    /// token, once more with a fresh token.
    async fn post(&self, body: String, target: &Target<'_>) -> Result<Reply, Failure> {
        let mut base = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "text/xml; charset=utf-8")
            .header(reqwest::header::ACCEPT, "text/xml")
            .body(body);
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
            let resp = req.send().await.map_err(|e| self.network_failure(&e))?;
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

    async fn deliver_inner(&self, env: &Envelope, message: &[u8]) -> Delivery {
        if env.rcpts.is_empty() {
            return Ok(Vec::new());
        }
        let target = self.target(env);
        let mime = crate::message::recipients::prepare(message, &env.rcpts).message;
        let body = create_item_request(
            &self.settings.server_version,
            self.settings.impersonate.then_some(target.mailbox),
            self.settings.save_to_sent_items,
            &mime,
        );
        drop(mime);
        let reply = self.post(body, &target).await?;
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
        let reply = self.post(body, &target).await?;
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

    fn deliver<'a>(&'a self, env: &'a Envelope, message: &'a [u8]) -> BoxFuture<'a, Delivery> {
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

/// Escape text for an XML attribute value or element content.
fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// The SOAP envelope up to and including `<soap:Body>`.
fn soap_head(out: &mut String, version: &str, impersonate: Option<&str>) {
    out.push_str("<?xml version=\"1.0\" encoding=\"utf-8\"?>\r\n");
    out.push_str(&format!(
        "<soap:Envelope xmlns:soap=\"{NS_SOAP}\" xmlns:t=\"{NS_TYPES}\" xmlns:m=\"{NS_MESSAGES}\">"
    ));
    out.push_str("<soap:Header>");
    out.push_str(&format!(
        "<t:RequestServerVersion Version=\"{}\"/>",
        xml_escape(version)
    ));
    if let Some(m) = impersonate {
        out.push_str(&format!(
            "<t:ExchangeImpersonation><t:ConnectingSID><t:PrimarySmtpAddress>{}</t:PrimarySmtpAddress></t:ConnectingSID></t:ExchangeImpersonation>",
            xml_escape(m)
        ));
    }
    out.push_str("</soap:Header><soap:Body>");
}

/// The `CreateItem` request that sends `mime` (UPSTREAMS.md §4.2):
/// `SendAndSaveCopy` into `sentitems`, or `SendOnly`.
pub fn create_item_request(
    version: &str,
    impersonate: Option<&str>,
    save_to_sent_items: bool,
    mime: &[u8],
) -> String {
    let mut out = String::with_capacity(mime.len() / 3 * 4 + 1024);
    soap_head(&mut out, version, impersonate);
    if save_to_sent_items {
        out.push_str("<m:CreateItem MessageDisposition=\"SendAndSaveCopy\">");
        out.push_str(
            "<m:SavedItemFolderId><t:DistinguishedFolderId Id=\"sentitems\"/></m:SavedItemFolderId>",
        );
    } else {
        out.push_str("<m:CreateItem MessageDisposition=\"SendOnly\">");
    }
    out.push_str("<m:Items><t:Message><t:MimeContent>");
    B64.encode_string(mime, &mut out);
    out.push_str("</t:MimeContent></t:Message></m:Items></m:CreateItem>");
    out.push_str("</soap:Body></soap:Envelope>\r\n");
    out
}

/// The probe request: `GetFolder` of Sent Items, ids only.
fn get_folder_request(version: &str, impersonate: Option<&str>) -> String {
    let mut out = String::with_capacity(1024);
    soap_head(&mut out, version, impersonate);
    out.push_str(
        "<m:GetFolder><m:FolderShape><t:BaseShape>IdOnly</t:BaseShape></m:FolderShape>\
         <m:FolderIds><t:DistinguishedFolderId Id=\"sentitems\"/></m:FolderIds></m:GetFolder>",
    );
    out.push_str("</soap:Body></soap:Envelope>\r\n");
    out
}

/// What a SOAP response says, by local element name (prefixes vary:
/// `s:`/`soap:`, `m:`, `e:`, `a:`).
#[derive(Debug, Default, PartialEq, Eq)]
struct SoapReply {
    /// `ResponseClass` of the first `…ResponseMessage`.
    response_class: Option<String>,
    /// First `ResponseCode` (response message, or a fault's `detail`).
    response_code: Option<String>,
    /// `MessageText` (response message) or `Message` (fault detail).
    message_text: Option<String>,
    /// `faultcode` without its prefix (`ErrorServerBusy`, `Client`, …).
    fault_code: Option<String>,
    /// `faultstring`.
    fault_string: Option<String>,
    /// `MessageXml/Value Name="BackOffMilliseconds"`.
    back_off_ms: Option<u64>,
    /// `MessageXml/Value Name="InnerErrorResponseCode"` (ErrorInternalServerError wraps ErrorServerBusy).
    inner_code: Option<String>,
    /// True when an `Envelope` element was seen at all.
    is_soap: bool,
}

impl SoapReply {
    fn parse(body: &[u8]) -> SoapReply {
        let text = String::from_utf8_lossy(body);
        let elements = xml::parse(&text);
        let first_text = |name: &str| {
            elements
                .iter()
                .find(|e| e.name == name)
                .map(|e| e.text.trim().to_string())
        };
        let value_named = |n: &str| {
            elements
                .iter()
                .find(|e| e.name == "Value" && e.attr("Name") == Some(n))
                .map(|e| e.text.trim().to_string())
        };
        SoapReply {
            response_class: elements
                .iter()
                .find(|e| e.name.ends_with("ResponseMessage") && e.attr("ResponseClass").is_some())
                .and_then(|e| e.attr("ResponseClass"))
                .map(str::to_string),
            response_code: first_text("ResponseCode"),
            message_text: first_text("MessageText").or_else(|| first_text("Message")),
            fault_code: first_text("faultcode").map(|c| match c.rsplit_once(':') {
                Some((_, local)) => local.to_string(),
                None => c,
            }),
            fault_string: first_text("faultstring"),
            back_off_ms: value_named("BackOffMilliseconds").and_then(|v| v.parse().ok()),
            inner_code: value_named("InnerErrorResponseCode"),
            is_soap: elements.iter().any(|e| e.name == "Envelope"),
        }
    }

    /// The EWS error code: the response code, else the fault code.
    fn code(&self) -> Option<&str> {
        self.response_code
            .as_deref()
            .filter(|c| !c.is_empty())
            .or(self.fault_code.as_deref())
    }
}

/// Classify one HTTP reply to a `CreateItem` (see the module docs).
/// `retry_after` is the HTTP `Retry-After`, honoured with 503.
fn classify(status: u16, body: &[u8], retry_after: Option<Duration>) -> Result<(), Failure> {
    let soap = SoapReply::parse(body);
    if status == 200
        && soap.response_class.as_deref() == Some("Success")
        && soap.response_code.as_deref().is_none_or(|c| c == "NoError")
    {
        return Ok(());
    }
    if let Some(code) = soap.code().filter(|c| c.starts_with("Error")) {
        let detail = soap
            .message_text
            .as_deref()
            .or(soap.fault_string.as_deref())
            .map(clean)
            .unwrap_or_default();
        let text = if detail.is_empty() {
            code.to_string()
        } else {
            format!("{code}: {detail}")
        };
        let busy =
            code == "ErrorServerBusy" || soap.inner_code.as_deref() == Some("ErrorServerBusy");
        if busy {
            let wait = soap
                .back_off_ms
                .map(|ms| Duration::from_millis(ms).min(MAX_BACKOFF))
                .unwrap_or(DEFAULT_BACKOFF);
            let text = format!("{text} (server busy; back off {} ms)", wait.as_millis());
            return Err(Failure::transient(text).with_not_before(wait));
        }
        if TRANSIENT_CODES.contains(&code) {
            let f = Failure::transient(text);
            return Err(match soap.back_off_ms.filter(|ms| *ms > 0) {
                Some(ms) => f.with_not_before(Duration::from_millis(ms).min(MAX_BACKOFF)),
                None => f,
            });
        }
        return Err(Failure::permanent(text));
    }
    let what = if soap.is_soap {
        let fault = soap
            .fault_string
            .as_deref()
            .or(soap.fault_code.as_deref())
            .map(clean)
            .unwrap_or_else(|| "no ResponseCode".into());
        format!("unexpected SOAP response: {fault}")
    } else {
        "no SOAP response".to_string()
    };
    match status {
        // 200 without a verdict: whether it was sent is unknown; retrying
        // risks a duplicate, giving up risks a loss. Retry.
        200 => Err(Failure::transient(format!("HTTP 200, {what}"))),
        503 => {
            let f = Failure::server(format!("HTTP 503 Service Unavailable ({what})"));
            Err(match retry_after {
                Some(d) => f.with_not_before(d),
                None => f,
            })
        }
        403 => Err(Failure::server(format!(
            "HTTP 403 Forbidden: EWS is disabled for this mailbox, app or organisation ({what})"
        ))),
        413 => Err(Failure::permanent(format!(
            "HTTP 413: message too large for the EWS endpoint ({what})"
        ))),
        s => Err(Failure::server(format!("HTTP {s} ({what})"))),
    }
}

/// The Exchange Online notice for `check` and the startup log: `Some` when
/// `connect_url` points at Exchange Online (commercial or a national cloud),
/// where Microsoft retires EWS (UPSTREAMS.md §4.4).
pub fn exchange_online_notice(connect_url: &str) -> Option<String> {
    exchange_online_notice_on(connect_url, chrono::Utc::now().date_naive())
}

/// [`exchange_online_notice`] as of `today`.
fn exchange_online_notice_on(connect_url: &str, today: chrono::NaiveDate) -> Option<String> {
    const EXCHANGE_ONLINE_HOSTS: &[&str] = &[
        "outlook.office365.com",
        "outlook.office.com",
        "outlook.office365.us",
        "webmail.apps.mil",
        "partner.outlook.cn",
        "outlook.office.de",
    ];
    let url = reqwest::Url::parse(connect_url.trim()).ok()?;
    let host = url.host_str()?.trim_end_matches('.').to_ascii_lowercase();
    if !EXCHANGE_ONLINE_HOSTS.contains(&host.as_str()) {
        return None;
    }
    let shutdown = chrono::NaiveDate::from_ymd_opt(2027, 4, 1)?;
    let blocking = chrono::NaiveDate::from_ymd_opt(2026, 10, 1)?;
    let when = if today >= shutdown {
        "Microsoft shut EWS down in Exchange Online on 1 April 2027, so this upstream no longer works"
            .to_string()
    } else if today >= blocking {
        "Microsoft has been blocking EWS in Exchange Online since 1 October 2026 for tenants \
         that did not allow-list their app, and shuts it down for good on 1 April 2027"
            .to_string()
    } else {
        "Microsoft starts blocking EWS in Exchange Online on 1 October 2026 for tenants that \
         do not allow-list their app, and shuts it down for good on 1 April 2027"
            .to_string()
    };
    Some(format!(
        "upstream.connect_url: {host} is Exchange Online. {when}. Use protocol = \"graph\" \
         (Microsoft Graph sendMail) or protocol = \"smtp\" with auth = \"oauth\" instead; \
         EWS on Exchange Server on-premises is not affected."
    ))
}

/// A small, forgiving XML reader: enough to find EWS elements by local name.
/// It never panics and never fails; on malformed input it returns what it
/// could make sense of.
mod xml {
    /// One element: local name, attributes (local names), direct text.
    #[derive(Debug, Default)]
    pub struct Element {
        /// Name without its prefix.
        pub name: String,
        /// Attributes, names without prefix, values unescaped.
        pub attrs: Vec<(String, String)>,
        /// The element's own text (not its children's), unescaped, CDATA included.
        pub text: String,
    }

    impl Element {
        /// The value of attribute `name`.
        pub fn attr(&self, name: &str) -> Option<&str> {
            self.attrs
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        }
    }

    /// Most elements kept (a CreateItem answer has about ten).
    const MAX_ELEMENTS: usize = 10_000;

    fn local(name: &str) -> &str {
        name.rsplit_once(':').map(|(_, l)| l).unwrap_or(name)
    }

    /// All elements of `input` in document order.
    pub fn parse(input: &str) -> Vec<Element> {
        let mut elements: Vec<Element> = Vec::new();
        let mut open: Vec<usize> = Vec::new();
        let mut rest = input;
        while !rest.is_empty() && elements.len() < MAX_ELEMENTS {
            let Some(lt) = rest.find('<') else {
                push_text(&mut elements, &open, &unescape(rest));
                break;
            };
            push_text(&mut elements, &open, &unescape(&rest[..lt]));
            rest = &rest[lt..];
            if let Some(r) = rest.strip_prefix("<!--") {
                rest = r.find("-->").map(|i| &r[i + 3..]).unwrap_or("");
            } else if let Some(r) = rest.strip_prefix("<![CDATA[") {
                let end = r.find("]]>").unwrap_or(r.len());
                push_text(&mut elements, &open, &r[..end]);
                rest = r.get(end + 3..).unwrap_or("");
            } else if let Some(r) = rest.strip_prefix("<?") {
                rest = r.find("?>").map(|i| &r[i + 2..]).unwrap_or("");
            } else if let Some(r) = rest.strip_prefix("<!") {
                rest = r.find('>').map(|i| &r[i + 1..]).unwrap_or("");
            } else {
                let r = &rest[1..];
                let Some(end) = tag_end(r) else { break };
                let tag = &r[..end];
                rest = &r[end + 1..];
                if let Some(name) = tag.strip_prefix('/') {
                    let name = local(name.trim());
                    if let Some(i) = open.iter().rposition(|&e| elements[e].name == name) {
                        open.truncate(i);
                    }
                    continue;
                }
                let (tag, self_closing) = match tag.strip_suffix('/') {
                    Some(t) => (t, true),
                    None => (tag, false),
                };
                let name_end = tag.find(|c: char| c.is_whitespace()).unwrap_or(tag.len());
                let name = local(&tag[..name_end]);
                if name.is_empty() {
                    continue;
                }
                elements.push(Element {
                    name: name.to_string(),
                    attrs: attributes(&tag[name_end..]),
                    text: String::new(),
                });
                if !self_closing {
                    open.push(elements.len() - 1);
                }
            }
        }
        elements
    }

    fn push_text(elements: &mut [Element], open: &[usize], text: &str) {
        if let Some(e) = open.last().and_then(|&i| elements.get_mut(i)) {
            e.text.push_str(text);
        }
    }

    /// Index of the `>` closing a tag, skipping quoted attribute values.
    fn tag_end(s: &str) -> Option<usize> {
        let mut quote = None;
        for (i, c) in s.char_indices() {
            match (quote, c) {
                (None, '"' | '\'') => quote = Some(c),
                (Some(q), c) if c == q => quote = None,
                (None, '>') => return Some(i),
                _ => {}
            }
        }
        None
    }

    /// `name="value"` pairs; stops at the first thing that is not one.
    fn attributes(mut s: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        loop {
            s = s.trim_start();
            let Some(eq) = s.find('=') else { break };
            let name = s[..eq].trim();
            if name.is_empty() || name.contains(char::is_whitespace) {
                break;
            }
            let after = s[eq + 1..].trim_start();
            let Some(q) = after.chars().next().filter(|c| *c == '"' || *c == '\'') else {
                break;
            };
            let v = &after[1..];
            let Some(close) = v.find(q) else { break };
            out.push((local(name).to_string(), unescape(&v[..close])));
            s = &v[close + 1..];
        }
        out
    }

    /// Replace the five predefined entities and character references;
    /// anything else is kept as written.
    pub fn unescape(s: &str) -> String {
        if !s.contains('&') {
            return s.to_string();
        }
        let mut out = String::with_capacity(s.len());
        let mut rest = s;
        while let Some(amp) = rest.find('&') {
            out.push_str(&rest[..amp]);
            rest = &rest[amp..];
            let Some(semi) = rest
                .char_indices()
                .take(12)
                .find(|(_, c)| *c == ';')
                .map(|(i, _)| i)
            else {
                out.push('&');
                rest = &rest[1..];
                continue;
            };
            let entity = &rest[1..semi];
            let c = match entity {
                "lt" => Some('<'),
                "gt" => Some('>'),
                "amp" => Some('&'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                _ => {
                    if let Some(hex) = entity
                        .strip_prefix("#x")
                        .or_else(|| entity.strip_prefix("#X"))
                    {
                        u32::from_str_radix(hex, 16).ok().and_then(char::from_u32)
                    } else if let Some(dec) = entity.strip_prefix('#') {
                        dec.parse::<u32>().ok().and_then(char::from_u32)
                    } else {
                        None
                    }
                }
            };
            match c {
                Some(c) => {
                    out.push(c);
                    rest = &rest[semi + 1..];
                }
                None => {
                    out.push('&');
                    rest = &rest[1..];
                }
            }
        }
        out.push_str(rest);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{Scope, Severity};

    const SERVER_BUSY: &str = r#"<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body><s:Fault>
 <faultcode xmlns:a="http://schemas.microsoft.com/exchange/services/2006/types">a:ErrorServerBusy</faultcode>
 <faultstring xml:lang="en-US">The server cannot service this request right now. Try again later.</faultstring>
 <detail>
  <e:ResponseCode xmlns:e="http://schemas.microsoft.com/exchange/services/2006/errors">ErrorServerBusy</e:ResponseCode>
  <e:Message xmlns:e="http://schemas.microsoft.com/exchange/services/2006/errors">The server cannot service this request right now. Try again later.</e:Message>
  <t:MessageXml xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types"><t:Value Name="BackOffMilliseconds">25</t:Value></t:MessageXml>
 </detail></s:Fault></s:Body></s:Envelope>"#;

    fn response(class: &str, code: &str, text: &str) -> String {
        format!(
            r#"<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body><m:CreateItemResponse xmlns:m="{NS_MESSAGES}" xmlns:t="{NS_TYPES}"><m:ResponseMessages><m:CreateItemResponseMessage ResponseClass="{class}">{text}<m:ResponseCode>{code}</m:ResponseCode><m:Items/></m:CreateItemResponseMessage></m:ResponseMessages></m:CreateItemResponse></s:Body></s:Envelope>"#
        )
    }

    #[test]
    fn success_is_delivered() {
        assert!(classify(200, response("Success", "NoError", "").as_bytes(), None).is_ok());
    }

    #[test]
    fn server_busy_backs_off() {
        let f = classify(500, SERVER_BUSY.as_bytes(), None).unwrap_err();
        assert_eq!(f.severity, Severity::Transient);
        assert_eq!(f.scope, Scope::Message);
        assert_eq!(f.not_before, Some(Duration::from_millis(25)));
        assert!(
            f.text.starts_with("ErrorServerBusy: The server cannot"),
            "{}",
            f.text
        );
        let no_hint =
            SERVER_BUSY.replace(r#"<t:Value Name="BackOffMilliseconds">25</t:Value>"#, "");
        let f = classify(500, no_hint.as_bytes(), None).unwrap_err();
        assert_eq!(f.not_before, Some(DEFAULT_BACKOFF));
    }

    #[test]
    fn inner_server_busy_counts_as_busy() {
        let body = response(
            "Error",
            "ErrorInternalServerError",
            r#"<m:MessageText>An internal server error occurred.</m:MessageText><m:MessageXml><t:Value Name="InnerErrorResponseCode">ErrorServerBusy</t:Value><t:Value Name="BackOffMilliseconds">3000</t:Value></m:MessageXml>"#,
        );
        let f = classify(200, body.as_bytes(), None).unwrap_err();
        assert_eq!(f.severity, Severity::Transient);
        assert_eq!(f.not_before, Some(Duration::from_secs(3)));
    }

    #[test]
    fn permission_errors_are_permanent_with_the_code() {
        for code in [
            "ErrorSendAsDenied",
            "ErrorAccessDenied",
            "ErrorInvalidRecipients",
            "ErrorMessageSizeExceeded",
            "ErrorMimeContentConversionFailed",
            "ErrorSomethingNew",
        ] {
            let body = response(
                "Error",
                code,
                "<m:MessageText>Nope &amp; never &lt;sorry&gt;.</m:MessageText>",
            );
            let f = classify(200, body.as_bytes(), None).unwrap_err();
            assert_eq!(f.severity, Severity::Permanent, "{code}");
            assert_eq!(f.text, format!("{code}: Nope & never <sorry>."));
        }
    }

    #[test]
    fn http_statuses() {
        let f = classify(503, b"<html>busy</html>", Some(Duration::from_secs(7))).unwrap_err();
        assert!(f.fails_over());
        assert_eq!(f.not_before, Some(Duration::from_secs(7)));
        assert!(classify(502, b"", None).unwrap_err().fails_over());
        assert!(classify(403, b"", None).unwrap_err().fails_over());
        let f = classify(200, b"<html/>", None).unwrap_err();
        assert_eq!((f.severity, f.scope), (Severity::Transient, Scope::Message));
        let f = classify(500, b"<s:Envelope><s:Body><s:Fault><faultcode>s:Client</faultcode><faultstring>bad</faultstring></s:Fault></s:Body></s:Envelope>", None).unwrap_err();
        assert!(f.fails_over() && f.text.contains("bad"), "{}", f.text);
    }

    #[test]
    fn request_shape() {
        let r = create_item_request("Exchange2013_SP1", Some("a&b@x"), false, b"Hi");
        assert_eq!(
            r,
            format!(
                "<?xml version=\"1.0\" encoding=\"utf-8\"?>\r\n<soap:Envelope xmlns:soap=\"{NS_SOAP}\" xmlns:t=\"{NS_TYPES}\" xmlns:m=\"{NS_MESSAGES}\"><soap:Header><t:RequestServerVersion Version=\"Exchange2013_SP1\"/><t:ExchangeImpersonation><t:ConnectingSID><t:PrimarySmtpAddress>a&amp;b@x</t:PrimarySmtpAddress></t:ConnectingSID></t:ExchangeImpersonation></soap:Header><soap:Body><m:CreateItem MessageDisposition=\"SendOnly\"><m:Items><t:Message><t:MimeContent>SGk=</t:MimeContent></t:Message></m:Items></m:CreateItem></soap:Body></soap:Envelope>\r\n"
            )
        );
        let r = create_item_request("Exchange2013_SP1", None, true, b"");
        assert!(r.contains(
            "<soap:Header><t:RequestServerVersion Version=\"Exchange2013_SP1\"/></soap:Header>"
        ));
        assert!(r.contains("<m:CreateItem MessageDisposition=\"SendAndSaveCopy\"><m:SavedItemFolderId><t:DistinguishedFolderId Id=\"sentitems\"/></m:SavedItemFolderId><m:Items>"));
    }

    #[test]
    fn xml_reader_is_forgiving() {
        let e = xml::parse(
            r#"<a:X y='1' z="&quot;2&quot;"><!-- c --><![CDATA[<raw>]]>t&#65;&#x42;&bogus;<b/></a:X>"#,
        );
        assert_eq!(e[0].name, "X");
        assert_eq!(e[0].attr("y"), Some("1"));
        assert_eq!(e[0].attr("z"), Some("\"2\""));
        assert_eq!(e[0].text, "<raw>tAB&bogus;");
        assert_eq!(e[1].name, "b");
        for junk in [
            "<",
            "<a",
            "<a b=\"",
            "&",
            "&#xFFFFFFFF;",
            "</x>",
            "<![CDATA[",
            "<!--",
            "<a:>",
            "<é ü='ö'>ä</é>",
        ] {
            let _ = xml::parse(junk);
            let _ = SoapReply::parse(junk.as_bytes());
        }
    }

    proptest::proptest! {
        #[test]
        fn classify_never_panics(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400), status in 100u16..600) {
            let _ = classify(status, &body, None);
        }

        #[test]
        fn classify_never_panics_on_xmlish(body in "[<>/=\"'a-z:&#;! \\[\\]A-Z0-9-]{0,200}") {
            let _ = classify(500, body.as_bytes(), None);
        }
    }

    #[test]
    fn exchange_online_notice_names_dates_and_alternatives() {
        let d = |y, m, day| chrono::NaiveDate::from_ymd_opt(y, m, day).unwrap();
        let n = exchange_online_notice_on(
            "https://outlook.office365.com/EWS/Exchange.asmx",
            d(2026, 5, 1),
        )
        .unwrap();
        assert!(
            n.contains("1 October 2026") && n.contains("1 April 2027"),
            "{n}"
        );
        assert!(n.contains("\"graph\"") && n.contains("\"smtp\""), "{n}");
        assert!(
            exchange_online_notice_on(
                "https://OUTLOOK.office365.us./EWS/Exchange.asmx",
                d(2026, 11, 1)
            )
            .unwrap()
            .contains("since 1 October 2026")
        );
        assert!(
            exchange_online_notice_on(
                "https://outlook.office.com/EWS/Exchange.asmx",
                d(2027, 4, 1)
            )
            .unwrap()
            .contains("no longer works")
        );
        assert_eq!(
            exchange_online_notice("https://mail.contoso.com/EWS/Exchange.asmx"),
            None
        );
        assert_eq!(exchange_online_notice("not a url"), None);
    }

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
