//! A fake Exchange Web Services endpoint for integration tests, written from UPSTREAMS.md §4: it checks each request the way Exchange does and answers success or scripted faults.
//!
//! # API
//!
//! ```ignore
//! mod common;
//! use common::fake_ews::{FakeAuth, FakeEws, Reply};
//!
//! let fake = FakeEws::start(FakeAuth::basic("user@contoso.com", "pw")).await;
//! // or FakeAuth::bearer(&["token-1"]), and `.impersonation()` on the
//! // FakeAuth to demand ExchangeImpersonation + X-AnchorMailbox (app-only).
//! fake.url();                  // http://127.0.0.1:<port>/EWS/Exchange.asmx
//! fake.push(Reply::server_busy(Some(25)));   // scripted replies, one per request, FIFO;
//! fake.push(Reply::send_as_denied());        // Reply::Success once the script is empty
//! fake.set_tokens(&["token-2"]);             // bearer tokens accepted from now on
//! fake.requests();             // every request received, checked and decoded
//! fake.stop();                 // stop listening (also on drop)
//! ```
//!
//! Checks, in the order Exchange/IIS applies them: the path (`404`), the
//! method (`405`), the credentials (`401` with `WWW-Authenticate`), the
//! `Content-Type` (`415`), then the SOAP body, parsed with namespaces (any
//! prefixes): `Envelope`/`Header`/`Body` in the SOAP 1.1 namespace,
//! `RequestServerVersion` in the types namespace, `CreateItem` (or the
//! probe's `GetFolder`) in the messages namespace with a valid
//! `MessageDisposition`, `SavedItemFolderId` only with `SendAndSaveCopy`, and
//! one `Items/Message/MimeContent` holding valid base64. A body that fails is
//! answered with an `ErrorSchemaValidation` fault (HTTP 500) and the reasons
//! are kept in [`Request::problems`]. With impersonation demanded, a missing
//! `ExchangeImpersonation` header or an `X-AnchorMailbox` that differs from
//! the impersonated address is answered the same way.
//!
//! Scripted replies are taken per request in arrival order: a `503` or a
//! `401` is answered before anything is checked (IIS answers them); the
//! others after the checks pass.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Where the fake serves EWS.
pub const PATH: &str = "/EWS/Exchange.asmx";
/// SOAP 1.1 envelope namespace.
pub const NS_SOAP: &str = "http://schemas.xmlsoap.org/soap/envelope/";
/// EWS types namespace.
pub const NS_TYPES: &str = "http://schemas.microsoft.com/exchange/services/2006/types";
/// EWS messages namespace.
pub const NS_MESSAGES: &str = "http://schemas.microsoft.com/exchange/services/2006/messages";
/// EWS errors namespace (fault details).
pub const NS_ERRORS: &str = "http://schemas.microsoft.com/exchange/services/2006/errors";

/// What credentials the fake accepts.
#[derive(Debug, Clone)]
pub struct FakeAuth {
    /// Basic credentials, or bearer tokens.
    pub kind: AuthKind,
    /// Demand `ExchangeImpersonation` and a matching `X-AnchorMailbox` (app-only tokens).
    pub impersonation: bool,
}

/// The accepted credentials.
#[derive(Debug, Clone)]
pub enum AuthKind {
    /// `Authorization: Basic base64(user:password)`.
    Basic { username: String, password: String },
    /// `Authorization: Bearer <one of these>`.
    Bearer { tokens: Vec<String> },
}

impl FakeAuth {
    /// Accept exactly these Basic credentials.
    pub fn basic(username: &str, password: &str) -> FakeAuth {
        FakeAuth {
            kind: AuthKind::Basic {
                username: username.into(),
                password: password.into(),
            },
            impersonation: false,
        }
    }
    /// Accept these bearer tokens.
    pub fn bearer(tokens: &[&str]) -> FakeAuth {
        FakeAuth {
            kind: AuthKind::Bearer {
                tokens: tokens.iter().map(|t| t.to_string()).collect(),
            },
            impersonation: false,
        }
    }
    /// Also demand impersonation (what Exchange Online does for app-only tokens).
    pub fn impersonation(mut self) -> FakeAuth {
        self.impersonation = true;
        self
    }
}

/// One scripted answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `ResponseClass="Success"`, `NoError` (the default).
    Success,
    /// HTTP 500 SOAP fault `ErrorServerBusy`, with `BackOffMilliseconds` when given
    /// (UPSTREAMS.md §4.3, the thunderbird/ews-rs sample).
    ServerBusy { back_off_ms: Option<u64> },
    /// HTTP 500 SOAP fault `ErrorExceededConnectionCount` (MaxConcurrency 27).
    ConnectionCount,
    /// HTTP 503 from IIS (request queue full), with `Retry-After` seconds when given.
    Unavailable { retry_after: Option<u64> },
    /// HTTP 401 whatever the credentials.
    Unauthorized,
    /// HTTP 200, `ResponseClass="Error"` with this code and `MessageText`.
    Error { code: String, text: String },
}

impl Reply {
    /// `ErrorServerBusy` fault.
    pub fn server_busy(back_off_ms: Option<u64>) -> Reply {
        Reply::ServerBusy { back_off_ms }
    }
    /// `ResponseClass="Error"` with `code` and `text`.
    pub fn error(code: &str, text: &str) -> Reply {
        Reply::Error {
            code: code.into(),
            text: text.into(),
        }
    }
    /// The sender may not send as the `From:` address.
    pub fn send_as_denied() -> Reply {
        Reply::error(
            "ErrorSendAsDenied",
            "The user account which was used to submit this request does not have the right to send mail on behalf of the specified sending account., Cannot submit message.",
        )
    }
    /// No access to the mailbox.
    pub fn access_denied() -> Reply {
        Reply::error(
            "ErrorAccessDenied",
            "Access is denied. Check credentials and try again.",
        )
    }
    /// A recipient is not valid.
    pub fn invalid_recipients() -> Reply {
        Reply::error(
            "ErrorInvalidRecipients",
            "At least one recipient isn't valid., A message can't be sent because it contains no recipients.",
        )
    }
    /// The message is over the organisation's size limit.
    pub fn size_exceeded() -> Reply {
        Reply::error(
            "ErrorMessageSizeExceeded",
            "The message exceeds the maximum supported size., Cannot save changes made to an item to store.",
        )
    }
}

/// One request as the fake saw it.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// HTTP method.
    pub method: String,
    /// Request path (origin form).
    pub path: String,
    /// Headers, names lower-case, in arrival order.
    pub headers: Vec<(String, String)>,
    /// The body as text.
    pub body: String,
    /// `RequestServerVersion Version`.
    pub server_version: Option<String>,
    /// `ExchangeImpersonation/ConnectingSID/PrimarySmtpAddress`.
    pub impersonated: Option<String>,
    /// The operation in the body (`CreateItem`, `GetFolder`).
    pub operation: Option<String>,
    /// `CreateItem MessageDisposition`.
    pub disposition: Option<String>,
    /// `SavedItemFolderId/DistinguishedFolderId Id`.
    pub saved_folder: Option<String>,
    /// The decoded `MimeContent`.
    pub mime: Option<Vec<u8>>,
    /// Everything wrong with the request (empty for a good one).
    pub problems: Vec<String>,
    /// The HTTP status the fake answered.
    pub status: u16,
    /// When the request arrived.
    pub at: Option<tokio::time::Instant>,
}

impl Request {
    /// The first header called `name` (lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
    /// The decoded MIME as text.
    pub fn mime_text(&self) -> String {
        String::from_utf8_lossy(self.mime.as_deref().unwrap_or_default()).into_owned()
    }
}

struct Shared {
    auth: Mutex<FakeAuth>,
    /// Strict send-as: the only `From:` address accepted.
    send_as: Mutex<Option<String>>,
    script: Mutex<VecDeque<Reply>>,
    requests: Mutex<Vec<Request>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The running fake.
pub struct FakeEws {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl FakeEws {
    /// Listen on 127.0.0.1, port 0.
    pub async fn start(auth: FakeAuth) -> FakeEws {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            auth: Mutex::new(auth),
            send_as: Mutex::new(None),
            script: Mutex::new(VecDeque::new()),
            requests: Mutex::new(Vec::new()),
        });
        let app = axum::Router::new()
            .fallback(handle)
            .layer(DefaultBodyLimit::disable())
            .with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeEws { addr, shared, task }
    }
    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// The Connect URL.
    pub fn url(&self) -> String {
        format!("http://{}{PATH}", self.addr)
    }
    /// Queue a scripted reply.
    pub fn push(&self, reply: Reply) {
        lock(&self.shared.script).push_back(reply);
    }
    /// Exchange's send-as rule: from now on a message whose `From:` is not
    /// `mailbox` gets `ErrorSendAsDenied` (`None` switches it off).
    pub fn strict_send_as(&self, mailbox: Option<&str>) {
        *lock(&self.shared.send_as) = mailbox.map(str::to_ascii_lowercase);
    }
    /// Accept these bearer tokens from now on.
    pub fn set_tokens(&self, tokens: &[&str]) {
        lock(&self.shared.auth).kind = AuthKind::Bearer {
            tokens: tokens.iter().map(|t| t.to_string()).collect(),
        };
    }
    /// Every request so far.
    pub fn requests(&self) -> Vec<Request> {
        lock(&self.shared.requests).clone()
    }
    /// Stop listening.
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for FakeEws {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut req = Request {
        method: method.to_string(),
        path: uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        headers: headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: String::from_utf8_lossy(&body).into_owned(),
        at: Some(tokio::time::Instant::now()),
        ..Request::default()
    };
    let auth = lock(&shared.auth).clone();
    let scripted = lock(&shared.script).pop_front().unwrap_or(Reply::Success);
    let send_as = lock(&shared.send_as).clone();
    let resp = answer(&mut req, &auth, scripted, send_as.as_deref());
    req.status = resp.status().as_u16();
    lock(&shared.requests).push(req);
    resp
}

fn answer(req: &mut Request, auth: &FakeAuth, scripted: Reply, send_as: Option<&str>) -> Response {
    if let Reply::Unavailable { retry_after } = scripted {
        let mut r = (
            StatusCode::SERVICE_UNAVAILABLE,
            "<html><body>Service Unavailable</body></html>",
        )
            .into_response();
        if let Some(s) = retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        return r;
    }
    if req.path != PATH {
        return (StatusCode::NOT_FOUND, "Not Found").into_response();
    }
    if req.method != "POST" {
        return (StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed").into_response();
    }
    if scripted == Reply::Unauthorized || !authorized(req.header("authorization"), &auth.kind) {
        let challenge = match auth.kind {
            AuthKind::Basic { .. } => "Basic realm=\"fake.ews.test\"",
            AuthKind::Bearer { .. } => {
                "Bearer client_id=\"00000002-0000-0ff1-ce00-000000000000\", error=\"invalid_token\""
            }
        };
        let mut r = (StatusCode::UNAUTHORIZED, "").into_response();
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(challenge),
        );
        r.headers_mut().insert(
            "x-ms-diagnostics",
            HeaderValue::from_static(
                "2000001;reason=\"The token is invalid or expired.\";error_category=\"invalid_token\"",
            ),
        );
        return r;
    }
    let ct = req
        .header("content-type")
        .unwrap_or_default()
        .to_ascii_lowercase();
    let ct_ok = ct.split(';').next().map(str::trim) == Some("text/xml")
        && ct.split(';').skip(1).all(|p| p.trim() == "charset=utf-8");
    if !ct_ok {
        req.problems.push(format!("Content-Type `{ct}`"));
        return (StatusCode::UNSUPPORTED_MEDIA_TYPE, "").into_response();
    }
    check_body(req);
    if auth.impersonation {
        let anchor = req.header("x-anchormailbox").map(str::to_string);
        match (&req.impersonated, anchor) {
            (None, _) => req
                .problems
                .push("app-only token without ExchangeImpersonation".into()),
            (Some(i), Some(a)) if i.eq_ignore_ascii_case(&a) => {}
            (Some(i), a) => req.problems.push(format!(
                "X-AnchorMailbox {a:?} does not match impersonated {i}"
            )),
        }
    }
    if !req.problems.is_empty() {
        return fault(
            "ErrorSchemaValidation",
            &format!(
                "The request failed schema validation: {}",
                req.problems.join("; ")
            ),
            "",
        );
    }
    if let (Some(allowed), Some(mime)) = (send_as, req.mime.as_deref())
        && scripted == Reply::Success
        && super::header_from(mime).as_deref() != Some(allowed)
        && let Reply::Error { code, text } = Reply::send_as_denied()
    {
        return xml(StatusCode::OK, &error_response(&code, &text));
    }
    match scripted {
        Reply::Success => xml(StatusCode::OK, &success(req.operation.as_deref())),
        Reply::ServerBusy { back_off_ms } => fault(
            "ErrorServerBusy",
            "The server cannot service this request right now. Try again later.",
            &back_off_ms
                .map(|ms| format!(r#"<t:Value Name="BackOffMilliseconds">{ms}</t:Value>"#))
                .unwrap_or_default(),
        ),
        Reply::ConnectionCount => fault(
            "ErrorExceededConnectionCount",
            "You have exceeded the available concurrent connections for your account.  Try again once your other requests have completed.",
            r#"<t:Value Name="Policy">MaxConcurrency</t:Value><t:Value Name="MaxConcurrencyLimit">27</t:Value><t:Value Name="ErrorMessage">This operation exceeds the throttling budget for policy part 'MaxConcurrency', policy value '27',  Budget type: 'Ews'.  Suggested backoff time 0 ms.</t:Value>"#,
        ),
        Reply::Error { code, text } => xml(StatusCode::OK, &error_response(&code, &text)),
        // Answered before the checks.
        Reply::Unavailable { .. } | Reply::Unauthorized => {
            (StatusCode::INTERNAL_SERVER_ERROR, "").into_response()
        }
    }
}

fn authorized(header: Option<&str>, kind: &AuthKind) -> bool {
    let Some(h) = header else { return false };
    match kind {
        AuthKind::Basic { username, password } => h
            .strip_prefix("Basic ")
            .and_then(|b| B64.decode(b.trim()).ok())
            .is_some_and(|d| d == format!("{username}:{password}").as_bytes()),
        AuthKind::Bearer { tokens } => h
            .strip_prefix("Bearer ")
            .is_some_and(|t| tokens.iter().any(|v| v == t.trim())),
    }
}

fn xml(status: StatusCode, body: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/xml; charset=utf-8")],
        body.to_string(),
    )
        .into_response()
}

const SERVER_VERSION_INFO: &str = r#"<s:Header><h:ServerVersionInfo MajorVersion="15" MinorVersion="20" MajorBuildNumber="7452" MinorBuildNumber="21" Version="V2018_01_08" xmlns:h="http://schemas.microsoft.com/exchange/services/2006/types" xmlns="http://schemas.microsoft.com/exchange/services/2006/types" xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"/></s:Header>"#;

fn success(operation: Option<&str>) -> String {
    let op = operation.unwrap_or("CreateItem");
    let items = if op == "GetFolder" {
        r#"<m:Folders><t:Folder><t:FolderId Id="AAMkAGU1" ChangeKey="AQAAABYAAA"/></t:Folder></m:Folders>"#
    } else {
        "<m:Items/>"
    };
    format!(
        r#"<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="{NS_SOAP}">{SERVER_VERSION_INFO}<s:Body xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:xsd="http://www.w3.org/2001/XMLSchema"><m:{op}Response xmlns:m="{NS_MESSAGES}" xmlns:t="{NS_TYPES}"><m:ResponseMessages><m:{op}ResponseMessage ResponseClass="Success"><m:ResponseCode>NoError</m:ResponseCode>{items}</m:{op}ResponseMessage></m:ResponseMessages></m:{op}Response></s:Body></s:Envelope>"#
    )
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn error_response(code: &str, text: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="{NS_SOAP}">{SERVER_VERSION_INFO}<s:Body xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:xsd="http://www.w3.org/2001/XMLSchema"><m:CreateItemResponse xmlns:m="{NS_MESSAGES}" xmlns:t="{NS_TYPES}"><m:ResponseMessages><m:CreateItemResponseMessage ResponseClass="Error"><m:MessageText>{}</m:MessageText><m:ResponseCode>{code}</m:ResponseCode><m:DescriptiveLinkKey>0</m:DescriptiveLinkKey><m:Items/></m:CreateItemResponseMessage></m:ResponseMessages></m:CreateItemResponse></s:Body></s:Envelope>"#,
        escape(text)
    )
}

/// A SOAP fault as in UPSTREAMS.md §4.3; `values` goes inside `MessageXml`.
fn fault(code: &str, text: &str, values: &str) -> Response {
    let message_xml = if values.is_empty() {
        String::new()
    } else {
        format!(r#"<t:MessageXml xmlns:t="{NS_TYPES}">{values}</t:MessageXml>"#)
    };
    let body = format!(
        r#"<s:Envelope xmlns:s="{NS_SOAP}"><s:Body><s:Fault><faultcode xmlns:a="{NS_TYPES}">a:{code}</faultcode><faultstring xml:lang="en-US">{text}</faultstring><detail><e:ResponseCode xmlns:e="{NS_ERRORS}">{code}</e:ResponseCode><e:Message xmlns:e="{NS_ERRORS}">{text}</e:Message>{message_xml}</detail></s:Fault></s:Body></s:Envelope>"#,
        text = escape(text)
    );
    xml(StatusCode::INTERNAL_SERVER_ERROR, &body)
}

/// An element with its namespace resolved.
#[derive(Debug, Default)]
struct Node {
    ns: String,
    name: String,
    attrs: Vec<(String, String)>,
    text: String,
    children: Vec<Node>,
}

impl Node {
    fn is(&self, ns: &str, name: &str) -> bool {
        self.ns == ns && self.name == name
    }
    fn child(&self, ns: &str, name: &str) -> Option<&Node> {
        self.children.iter().find(|c| c.is(ns, name))
    }
    fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// A strict little namespace-aware parser: `Err` on anything malformed.
fn parse_xml(input: &str) -> Result<Node, String> {
    let mut rest = input.trim_start_matches('\u{feff}').trim_start();
    if let Some(r) = rest.strip_prefix("<?xml") {
        let end = r.find("?>").ok_or("unterminated XML declaration")?;
        rest = &r[end + 2..];
    }
    // Open elements: (node, its namespace declarations as (prefix, uri), its qualified name).
    type Open = (Node, Vec<(String, String)>, String);
    let mut stack: Vec<Open> = Vec::new();
    let mut root = None;
    loop {
        let lt = rest.find('<');
        let text = &rest[..lt.unwrap_or(rest.len())];
        match stack.last_mut() {
            Some((n, _, _)) => n.text.push_str(&unescape(text)),
            None if !text.trim().is_empty() => return Err("text outside the root".into()),
            None => {}
        }
        let Some(lt) = lt else { break };
        rest = &rest[lt + 1..];
        let gt = rest.find('>').ok_or("unterminated tag")?;
        let tag = &rest[..gt];
        rest = &rest[gt + 1..];
        if let Some(name) = tag.strip_prefix('/') {
            let (node, _, qname) = stack.pop().ok_or("end tag without start")?;
            if qname != name.trim() {
                return Err(format!("</{name}> closes <{qname}>"));
            }
            match stack.last_mut() {
                Some((parent, _, _)) => parent.children.push(node),
                None => root = Some(node),
            }
            continue;
        }
        let (tag, empty) = match tag.strip_suffix('/') {
            Some(t) => (t, true),
            None => (tag, false),
        };
        let mut parts = tag.trim().splitn(2, char::is_whitespace);
        let qname = parts.next().unwrap_or_default().to_string();
        let mut attrs_raw = parts.next().unwrap_or_default().trim();
        let mut scope: Vec<(String, String)> = Vec::new();
        let mut attrs = Vec::new();
        while !attrs_raw.is_empty() {
            let eq = attrs_raw
                .find('=')
                .ok_or(format!("bad attribute in <{qname}>"))?;
            let name = attrs_raw[..eq].trim().to_string();
            let v = attrs_raw[eq + 1..].trim_start();
            let q = v
                .chars()
                .next()
                .filter(|c| *c == '"' || *c == '\'')
                .ok_or("unquoted attribute")?;
            let close = v[1..].find(q).ok_or("unterminated attribute")?;
            let value = unescape(&v[1..1 + close]);
            attrs_raw = v[close + 2..].trim_start();
            if name == "xmlns" {
                scope.push((String::new(), value));
            } else if let Some(p) = name.strip_prefix("xmlns:") {
                scope.push((p.to_string(), value));
            } else {
                attrs.push((name, value));
            }
        }
        let (prefix, local) = match qname.split_once(':') {
            Some((p, l)) => (p.to_string(), l.to_string()),
            None => (String::new(), qname.clone()),
        };
        let ns = scope
            .iter()
            .rev()
            .chain(stack.iter().rev().flat_map(|(_, s, _)| s.iter().rev()))
            .find(|(p, _)| *p == prefix)
            .map(|(_, uri)| uri.clone());
        let ns = match ns {
            Some(ns) => ns,
            None if prefix.is_empty() => String::new(),
            None => return Err(format!("undeclared prefix `{prefix}`")),
        };
        let node = Node {
            ns,
            name: local,
            attrs,
            ..Node::default()
        };
        if empty {
            match stack.last_mut() {
                Some((parent, _, _)) => parent.children.push(node),
                None => root = Some(node),
            }
        } else {
            stack.push((node, scope, qname));
        }
    }
    if !stack.is_empty() {
        return Err("unclosed elements".into());
    }
    root.ok_or_else(|| "no root element".into())
}

fn check_body(req: &mut Request) {
    let root = match parse_xml(&req.body) {
        Ok(r) => r,
        Err(e) => {
            req.problems.push(format!("XML: {e}"));
            return;
        }
    };
    let p = &mut req.problems;
    if !root.is(NS_SOAP, "Envelope") {
        p.push(format!("root is {{{}}}{}", root.ns, root.name));
        return;
    }
    if let Some(h) = root.child(NS_SOAP, "Header") {
        match h.child(NS_TYPES, "RequestServerVersion") {
            Some(v) => req.server_version = v.attr("Version").map(str::to_string),
            None => p.push("no t:RequestServerVersion".into()),
        }
        if let Some(i) = h.child(NS_TYPES, "ExchangeImpersonation") {
            match i
                .child(NS_TYPES, "ConnectingSID")
                .and_then(|c| c.child(NS_TYPES, "PrimarySmtpAddress"))
            {
                Some(a) => req.impersonated = Some(a.text.trim().to_string()),
                None => {
                    p.push("ExchangeImpersonation without ConnectingSID/PrimarySmtpAddress".into())
                }
            }
        }
        for c in &h.children {
            if !(c.is(NS_TYPES, "RequestServerVersion") || c.is(NS_TYPES, "ExchangeImpersonation"))
            {
                p.push(format!("unexpected header {{{}}}{}", c.ns, c.name));
            }
        }
    } else {
        p.push("no soap:Header".into());
    }
    let Some(body) = root.child(NS_SOAP, "Body") else {
        p.push("no soap:Body".into());
        return;
    };
    let Some(op) = body.children.first() else {
        p.push("empty soap:Body".into());
        return;
    };
    if op.ns != NS_MESSAGES || body.children.len() != 1 {
        p.push(format!(
            "body holds {{{}}}{} (and {} more)",
            op.ns,
            op.name,
            body.children.len() - 1
        ));
        return;
    }
    req.operation = Some(op.name.clone());
    match op.name.as_str() {
        "GetFolder" => {
            if op.child(NS_MESSAGES, "FolderShape").is_none()
                || op.child(NS_MESSAGES, "FolderIds").is_none()
            {
                p.push("GetFolder without FolderShape/FolderIds".into());
            }
        }
        "CreateItem" => {
            let d = op.attr("MessageDisposition").map(str::to_string);
            if !matches!(
                d.as_deref(),
                Some("SaveOnly" | "SendOnly" | "SendAndSaveCopy")
            ) {
                p.push(format!("MessageDisposition {d:?}"));
            }
            if let Some(s) = op.child(NS_MESSAGES, "SavedItemFolderId") {
                req.saved_folder = s
                    .child(NS_TYPES, "DistinguishedFolderId")
                    .and_then(|f| f.attr("Id"))
                    .map(str::to_string);
                if req.saved_folder.is_none() {
                    p.push("SavedItemFolderId without DistinguishedFolderId Id".into());
                }
                if d.as_deref() != Some("SendAndSaveCopy") {
                    p.push(format!("SavedItemFolderId with MessageDisposition {d:?}"));
                }
            }
            req.disposition = d;
            let messages: Vec<&Node> = op
                .child(NS_MESSAGES, "Items")
                .map(|i| i.children.iter().collect())
                .unwrap_or_default();
            match messages.as_slice() {
                [m] if m.is(NS_TYPES, "Message") => match m.child(NS_TYPES, "MimeContent") {
                    Some(c) => match B64.decode(c.text.trim()) {
                        Ok(mime) => req.mime = Some(mime),
                        Err(e) => p.push(format!("MimeContent is not base64: {e}")),
                    },
                    None => p.push("Message without MimeContent".into()),
                },
                _ => p.push(format!(
                    "Items holds {} elements, want one t:Message",
                    messages.len()
                )),
            }
        }
        other => p.push(format!("operation {other} not supported by the fake")),
    }
}
