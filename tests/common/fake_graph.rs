//! A fake Microsoft Graph endpoint for integration tests and the benchmark, written from UPSTREAMS.md §2–3: MIME `sendMail`, drafts with attachments and upload sessions, the documented error bodies, and the 4-concurrent-requests limit, enforced.
//!
//! # API
//!
//! ```ignore
//! mod common;
//! use common::fake_graph::{FakeGraph, GraphConfig, Reply};
//!
//! let fake = FakeGraph::start(GraphConfig {
//!     prefix: "/graph".into(),              // path prefix (national clouds, proxies); "" = none
//!     latency: (ms(2000), ms(3000)),         // per request, uniform in [min, max] (tokio time)
//!     ..GraphConfig::default()               // token "token-1", 4 in flight per mailbox
//! }).await;
//! fake.endpoint();                 // "http://127.0.0.1:PORT/graph": the transport's endpoint
//! fake.push(Reply::send_as_denied());   // the next API request gets this (FIFO)
//! fake.push_on("/send", Reply::unavailable(None)); // the next request to a path ending so
//! fake.set_token("token-2");        // only this bearer token is accepted from now on
//! fake.sent();                      // messages Graph accepted (MIME or draft), in order
//! fake.requests();                  // every request: method, path, headers that matter, answer
//! fake.violations();                // requests refused for exceeding the concurrency limit
//! fake.peak();                      // most requests ever in flight for one mailbox
//! fake.drafts();                    // drafts still open (neither sent nor deleted)
//! ```
//!
//! Behaviour, as documented for Graph: a missing or wrong bearer token gets
//! `401 InvalidAuthenticationToken`; a request that would be the fifth in
//! flight for a mailbox gets `429 ApplicationThrottled` with `Retry-After`
//! at once; bodies over 4 MB get `413`; `sendMail` needs `Content-Type:
//! text/plain` and a base64 body that decodes to a message with at least one
//! recipient (`400 ErrorMimeContentInvalidBase64String` otherwise) and
//! answers `202` with an empty body. Upload URLs are on `/upload/…` at the
//! root (another host in real life), carry their own `authtoken` and refuse
//! an `Authorization` header; chunks must come in order with an exact
//! `Content-Range`. Dropping the fake stops it.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Largest request body Graph takes.
pub const MAX_REQUEST: usize = 4 * 1024 * 1024;

/// How the fake behaves.
#[derive(Debug, Clone)]
pub struct GraphConfig {
    /// Path prefix before `/v1.0`, e.g. `/graph`; empty for none.
    pub prefix: String,
    /// The bearer token accepted at start.
    pub token: String,
    /// Requests in flight per mailbox before the fake answers 429.
    pub max_concurrent: usize,
    /// `Retry-After` (seconds) on a concurrency 429.
    pub throttle_retry_after: u64,
    /// Time each API request takes, uniform between the two.
    pub latency: (Duration, Duration),
    /// Seed for the latency draw.
    pub seed: u64,
    /// Exchange's send-as rule: a MIME `sendMail` whose `From:` is not the
    /// mailbox in the URL gets `403 ErrorSendAsDenied`.
    pub strict_send_as: bool,
    /// Graph's upload budget per mailbox, enforced: request bodies of
    /// POST/PUT/PATCH beyond `.0` bytes in any `.1` get `429` with the
    /// `Retry-After` until there is room (UPSTREAMS §3.1: 150 MB per 5 min).
    pub upload_budget: Option<(u64, Duration)>,
}

impl Default for GraphConfig {
    fn default() -> Self {
        GraphConfig {
            prefix: String::new(),
            token: "token-1".into(),
            max_concurrent: 4,
            throttle_retry_after: 1,
            latency: (Duration::ZERO, Duration::ZERO),
            seed: 1,
            strict_send_as: false,
            upload_budget: None,
        }
    }
}

/// A scripted answer.
#[derive(Debug, Clone)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// `Retry-After` header value.
    pub retry_after: Option<String>,
    /// Body (JSON).
    pub body: String,
}

fn error_body(code: &str, message: &str) -> String {
    json!({"error": {"code": code, "message": message,
        "innerError": {"request-id": "24e7991e-01ae-4cc2-8e06-532a96fd8948", "date": "2019-01-16T18:53:25"}}})
    .to_string()
}

impl Reply {
    /// Any status and body.
    pub fn new(status: u16, body: &str) -> Reply {
        Reply {
            status,
            retry_after: None,
            body: body.into(),
        }
    }
    /// 403 ErrorSendAsDenied, as in outlook-send-mail-from-other-user.md.
    pub fn send_as_denied() -> Reply {
        Reply::new(
            403,
            &error_body(
                "ErrorSendAsDenied",
                "The user account which was used to submit this request does not have the right to send mail on behalf of the specified sending account. Cannot submit message.",
            ),
        )
    }
    /// 403 ErrorAccessDenied (no consent, or an access policy excludes the mailbox).
    pub fn access_denied() -> Reply {
        Reply::new(
            403,
            &error_body(
                "ErrorAccessDenied",
                "Access is denied. Check credentials and try again.",
            ),
        )
    }
    /// 400 ErrorMimeContentInvalidBase64String (user-sendmail.md).
    pub fn invalid_base64() -> Reply {
        Reply::new(
            400,
            r#"{ "error": { "code": "ErrorMimeContentInvalidBase64String", "message": "Invalid base64 string for MIME content." } }"#,
        )
    }
    /// 404 ErrorInvalidUser.
    pub fn invalid_user() -> Reply {
        Reply::new(
            404,
            r#"{"error":{"code":"ErrorInvalidUser","message":"The requested user is invalid."}}"#,
        )
    }
    /// 404 MailboxNotEnabledForRESTAPI (no Exchange Online mailbox or licence).
    pub fn mailbox_not_enabled() -> Reply {
        Reply::new(
            404,
            r#"{"error":{"code":"MailboxNotEnabledForRESTAPI","message":"REST API is not yet supported for this mailbox."}}"#,
        )
    }
    /// 400 ErrorMessageSizeExceeded.
    pub fn size_exceeded() -> Reply {
        Reply::new(
            400,
            r#"{"error":{"code":"ErrorMessageSizeExceeded","message":"The message exceeds the maximum supported size., Cannot save changes made to an item to store."}}"#,
        )
    }
    /// 429 TooManyRequests with `Retry-After: secs` (the throttling.md sample).
    pub fn too_many_requests(secs: u64) -> Reply {
        Reply {
            status: 429,
            retry_after: Some(secs.to_string()),
            body: r#"{ "error": { "code": "TooManyRequests", "innerError": { "code": "429", "date": "2020-08-18T12:51:51", "message": "Please retry after", "request-id": "94fb3b52-452a-4535-a601-69e0a90e3aa2", "status": "429" }, "message": "Please retry again later." } }"#.into(),
        }
    }
    /// 503 with an optional `Retry-After`.
    pub fn unavailable(retry_after: Option<&str>) -> Reply {
        Reply {
            status: 503,
            retry_after: retry_after.map(String::from),
            body: error_body(
                "ServiceNotAvailable",
                "The service is temporarily unavailable.",
            ),
        }
    }
}

/// One attachment of a draft.
#[derive(Debug, Clone)]
pub struct Attachment {
    /// File name.
    pub name: String,
    /// MIME type.
    pub content_type: String,
    /// The bytes.
    pub bytes: Vec<u8>,
    /// Shown inline.
    pub inline: bool,
    /// `Content-ID` for `cid:` references.
    pub content_id: Option<String>,
    /// Came through an upload session (else one POST).
    pub uploaded: bool,
}

/// A message Graph accepted.
#[derive(Debug, Clone)]
pub struct Sent {
    /// The mailbox in the URL (decoded).
    pub mailbox: String,
    /// The decoded MIME, for `sendMail`.
    pub mime: Option<Vec<u8>>,
    /// The draft JSON, for draft + `send`.
    pub draft: Option<Value>,
    /// The draft's attachments.
    pub attachments: Vec<Attachment>,
    /// Everyone Graph mails: To, Cc and Bcc, lower-cased.
    pub recipients: Vec<String>,
    /// When the request arrived.
    pub arrived: Instant,
    /// When the fake answered 202.
    pub done: Instant,
}

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct Request {
    /// HTTP method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// The `Authorization` header.
    pub authorization: Option<String>,
    /// The `Content-Type` header.
    pub content_type: Option<String>,
    /// The `Content-Range` header.
    pub content_range: Option<String>,
    /// Body length.
    pub len: usize,
    /// The status answered.
    pub status: u16,
}

struct Draft {
    mailbox: String,
    json: Value,
    attachments: Vec<Attachment>,
    arrived: Instant,
}

struct Session {
    draft: String,
    mailbox: String,
    name: String,
    content_type: String,
    inline: bool,
    content_id: Option<String>,
    size: usize,
    data: Vec<u8>,
}

/// Decides whether a bearer token is valid (e.g. issued by the fake OAuth server).
type TokenCheck = Arc<dyn Fn(&str) -> bool + Send + Sync>;

struct Inner {
    token: String,
    token_check: Option<TokenCheck>,
    script: VecDeque<(Option<String>, Reply)>,
    sent: Vec<Sent>,
    requests: Vec<Request>,
    in_flight: HashMap<String, usize>,
    peak: usize,
    violations: usize,
    drafts: HashMap<String, Draft>,
    sessions: HashMap<String, Session>,
    next_id: u64,
    rng: u64,
    /// Request bytes per mailbox inside the upload budget's window.
    uploads: HashMap<String, VecDeque<(Instant, u64)>>,
}

struct Shared {
    cfg: GraphConfig,
    addr: SocketAddr,
    inner: Mutex<Inner>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The running fake.
pub struct FakeGraph {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for FakeGraph {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeGraph {
    /// Listen on 127.0.0.1, port chosen by the OS.
    pub async fn start(cfg: GraphConfig) -> FakeGraph {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                token: cfg.token.clone(),
                token_check: None,
                script: VecDeque::new(),
                sent: Vec::new(),
                requests: Vec::new(),
                in_flight: HashMap::new(),
                peak: 0,
                violations: 0,
                drafts: HashMap::new(),
                sessions: HashMap::new(),
                next_id: 1,
                rng: cfg.seed.max(1),
                uploads: HashMap::new(),
            }),
            cfg,
            addr,
        });
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(shared.clone())
            .layer(axum::extract::DefaultBodyLimit::disable());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeGraph { shared, task }
    }

    /// The Graph endpoint to configure (`http://127.0.0.1:PORT{prefix}`).
    pub fn endpoint(&self) -> String {
        format!("http://{}{}", self.shared.addr, self.shared.cfg.prefix)
    }

    /// Answer the next API request (not upload PUTs) with `r`.
    pub fn push(&self, r: Reply) {
        self.shared.lock().script.push_back((None, r));
    }

    /// Answer the next API request whose path ends with `suffix` (e.g.
    /// `"/send"`, `"/createUploadSession"`) with `r`.
    pub fn push_on(&self, suffix: &str, r: Reply) {
        self.shared
            .lock()
            .script
            .push_back((Some(suffix.to_string()), r));
    }

    /// Accept only `token` from now on.
    pub fn set_token(&self, token: &str) {
        self.shared.lock().token = token.into();
        self.shared.lock().token_check = None;
    }

    /// Accept the bearer tokens `check` approves (e.g. those a fake OAuth
    /// server issued) instead of one fixed token.
    pub fn set_token_check(&self, check: impl Fn(&str) -> bool + Send + Sync + 'static) {
        self.shared.lock().token_check = Some(Arc::new(check));
    }

    /// Messages accepted so far.
    pub fn sent(&self) -> Vec<Sent> {
        self.shared.lock().sent.clone()
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.lock().requests.clone()
    }

    /// Requests refused with 429 for exceeding the concurrency limit.
    pub fn violations(&self) -> usize {
        self.shared.lock().violations
    }

    /// Most requests in flight at once for one mailbox.
    pub fn peak(&self) -> usize {
        self.shared.lock().peak
    }

    /// Drafts neither sent nor deleted.
    pub fn drafts(&self) -> usize {
        self.shared.lock().drafts.len()
    }
}

fn reply(status: u16, retry_after: Option<&str>, body: String) -> Response {
    let mut r = (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        body,
    )
        .into_response();
    if status != 202 && status != 204 {
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
    }
    if let Some(v) = retry_after.and_then(|v| header::HeaderValue::from_str(v).ok()) {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn header(h: &HeaderMap, name: header::HeaderName) -> Option<String> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// What Graph mails: every To, Cc and Bcc address of a MIME message.
pub fn mime_recipients(mime: &[u8]) -> Vec<String> {
    let Some(m) = mail_parser::MessageParser::new().parse_headers(mime) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for list in [m.to(), m.cc(), m.bcc()].into_iter().flatten() {
        for a in list.iter() {
            if let Some(addr) = a.address() {
                out.push(addr.to_ascii_lowercase());
            }
        }
    }
    out
}

fn json_recipients(v: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for key in ["toRecipients", "ccRecipients", "bccRecipients"] {
        for r in v.get(key).and_then(|r| r.as_array()).into_iter().flatten() {
            if let Some(a) = r.pointer("/emailAddress/address").and_then(|a| a.as_str()) {
                out.push(a.to_ascii_lowercase());
            }
        }
    }
    out
}

async fn handle(
    axum::extract::State(st): axum::extract::State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let arrived = Instant::now();
    let path = uri.path().to_string();
    let auth = header(&headers, header::AUTHORIZATION);
    let (status, retry_after, resp_body, location) =
        route(&st, &method, &uri, &headers, &body, arrived).await;
    st.lock().requests.push(Request {
        method: method.to_string(),
        path: uri.path_and_query().map_or(path, |p| p.to_string()),
        authorization: auth,
        content_type: header(&headers, header::CONTENT_TYPE),
        content_range: header(&headers, header::CONTENT_RANGE),
        len: body.len(),
        status,
    });
    let mut r = reply(status, retry_after.as_deref(), resp_body);
    if let Some(l) = location.and_then(|l| header::HeaderValue::from_str(&l).ok()) {
        r.headers_mut().insert(header::LOCATION, l);
    }
    r
}

type Answer = (u16, Option<String>, String, Option<String>);

fn answer(status: u16, body: String) -> Answer {
    (status, None, body, None)
}

/// Counts a request in flight for a mailbox while alive.
struct Slot {
    st: Arc<Shared>,
    mailbox: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut g = self.st.lock();
        if let Some(n) = g.in_flight.get_mut(&self.mailbox) {
            *n = n.saturating_sub(1);
        }
    }
}

/// Take a slot for `mailbox`, or the 429 Graph answers past the limit.
fn enter(st: &Arc<Shared>, mailbox: &str) -> Result<Slot, Answer> {
    let mut g = st.lock();
    let n = g.in_flight.entry(mailbox.to_string()).or_insert(0);
    if *n >= st.cfg.max_concurrent {
        g.violations += 1;
        return Err((
            429,
            Some(st.cfg.throttle_retry_after.to_string()),
            error_body(
                "ApplicationThrottled",
                "Application is over its MailboxConcurrency limit.",
            ),
            None,
        ));
    }
    *n += 1;
    let now = *n;
    g.peak = g.peak.max(now);
    Ok(Slot {
        st: st.clone(),
        mailbox: mailbox.to_string(),
    })
}

/// Count `bytes` against the mailbox's upload budget, or the 429 past it.
fn spend_upload(st: &Arc<Shared>, mailbox: &str, bytes: u64) -> Result<(), Answer> {
    let Some((max, span)) = st.cfg.upload_budget else {
        return Ok(());
    };
    let now = Instant::now();
    let mut g = st.lock();
    let w = g.uploads.entry(mailbox.to_string()).or_default();
    while w.front().is_some_and(|(t, _)| *t + span <= now) {
        w.pop_front();
    }
    let used: u64 = w.iter().map(|(_, n)| n).sum();
    if used + bytes > max && !w.is_empty() {
        // Room again when enough of the oldest leaves the window.
        let mut left = used;
        let mut at = now;
        for (t, n) in w.iter() {
            left -= n;
            at = *t + span;
            if left + bytes <= max {
                break;
            }
        }
        let secs = (at - now).as_secs_f64().ceil().max(1.0) as u64;
        return Err((
            429,
            Some(secs.to_string()),
            error_body(
                "ApplicationThrottled",
                "Application is over its upload limit (150 MB per 5 minutes).",
            ),
            None,
        ));
    }
    w.push_back((now, bytes));
    Ok(())
}

async fn latency(st: &Arc<Shared>) {
    let (lo, hi) = st.cfg.latency;
    let wait = {
        let mut g = st.lock();
        // xorshift64
        let mut x = g.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        g.rng = x;
        let span = hi.saturating_sub(lo).as_micros() as u64;
        lo + Duration::from_micros(if span == 0 { 0 } else { x % (span + 1) })
    };
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
}

async fn route(
    st: &Arc<Shared>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
    arrived: Instant,
) -> Answer {
    let path = uri.path();
    if let Some(sid) = path.strip_prefix("/upload/") {
        return upload(st, sid, uri.query().unwrap_or(""), headers, body).await;
    }
    let Some(rest) = path
        .strip_prefix(st.cfg.prefix.as_str())
        .and_then(|p| p.strip_prefix("/v1.0/users/"))
    else {
        return answer(
            404,
            error_body("ResourceNotFound", "Resource not found for the segment."),
        );
    };
    let segs: Vec<&str> = rest.split('/').collect();
    let mailbox = percent_decode(segs[0]);
    let (fixed, check) = {
        let g = st.lock();
        (g.token.clone(), g.token_check.clone())
    };
    let given = header(headers, header::AUTHORIZATION).unwrap_or_default();
    let token = given.strip_prefix("Bearer ").unwrap_or("");
    let valid = match check {
        Some(check) => check(token),
        None => !token.is_empty() && token == fixed,
    };
    if !valid {
        return answer(
            401,
            error_body(
                "InvalidAuthenticationToken",
                "Access token has expired or is not yet valid.",
            ),
        );
    }
    let _slot = match enter(st, &mailbox) {
        Ok(s) => s,
        Err(a) => return a,
    };
    if matches!(method.as_str(), "POST" | "PUT" | "PATCH")
        && let Err(a) = spend_upload(st, &mailbox, body.len() as u64)
    {
        return a;
    }
    latency(st).await;
    let scripted = {
        let mut g = st.lock();
        let at = g
            .script
            .iter()
            .position(|(suffix, _)| suffix.as_deref().is_none_or(|s| path.ends_with(s)));
        at.and_then(|i| g.script.remove(i))
    };
    if let Some((_, r)) = scripted {
        return (r.status, r.retry_after, r.body, None);
    }
    if body.len() > MAX_REQUEST {
        return answer(
            413,
            error_body("BadRequest", "The maximum request length supported is 4MB."),
        );
    }
    let json_body = || serde_json::from_slice::<Value>(body).ok();
    match (method.as_str(), &segs[1..]) {
        ("GET", []) => answer(
            200,
            json!({"id": "00000000-0000-0000-0000-000000000001", "mail": mailbox}).to_string(),
        ),
        ("POST", ["sendMail"]) => {
            let ct = header(headers, header::CONTENT_TYPE).unwrap_or_default();
            if !ct.to_ascii_lowercase().starts_with("text/plain") {
                return answer(
                    400,
                    error_body(
                        "RequestBodyRead",
                        "Unexpected content type for a MIME message.",
                    ),
                );
            }
            let text: Vec<u8> = body
                .iter()
                .copied()
                .filter(|b| !b.is_ascii_whitespace())
                .collect();
            let Ok(mime) = B64.decode(&text) else {
                return (400, None, Reply::invalid_base64().body, None);
            };
            if st.cfg.strict_send_as
                && super::header_from(&mime).as_deref()
                    != Some(mailbox.to_ascii_lowercase().as_str())
            {
                let r = Reply::send_as_denied();
                return (r.status, None, r.body, None);
            }
            let recipients = mime_recipients(&mime);
            if recipients.is_empty() {
                return answer(
                    400,
                    error_body(
                        "ErrorInvalidRecipients",
                        "At least one recipient is not valid., A message can't be sent because it contains no recipients.",
                    ),
                );
            }
            st.lock().sent.push(Sent {
                mailbox,
                mime: Some(mime),
                draft: None,
                attachments: Vec::new(),
                recipients,
                arrived,
                done: Instant::now(),
            });
            answer(202, String::new())
        }
        ("POST", ["messages"]) => {
            let Some(v) = json_body() else {
                return answer(400, error_body("RequestBodyRead", "Invalid JSON."));
            };
            let mut g = st.lock();
            let id = format!("AAMkDraft{}", g.next_id);
            g.next_id += 1;
            g.drafts.insert(
                id.clone(),
                Draft {
                    mailbox,
                    json: v.clone(),
                    attachments: Vec::new(),
                    arrived,
                },
            );
            let mut out = v;
            out["id"] = json!(id);
            out["isDraft"] = json!(true);
            answer(201, out.to_string())
        }
        ("DELETE", ["messages", id]) => match st.lock().drafts.remove(*id) {
            Some(_) => answer(204, String::new()),
            None => answer(
                404,
                error_body(
                    "ErrorItemNotFound",
                    "The specified object was not found in the store.",
                ),
            ),
        },
        ("POST", ["messages", id, "attachments"]) => {
            let Some(v) = json_body() else {
                return answer(400, error_body("RequestBodyRead", "Invalid JSON."));
            };
            let Some(bytes) = v
                .get("contentBytes")
                .and_then(|b| b.as_str())
                .and_then(|b| B64.decode(b).ok())
            else {
                return answer(
                    400,
                    error_body(
                        "ErrorInvalidRequest",
                        "contentBytes is missing or not base64.",
                    ),
                );
            };
            let mut g = st.lock();
            let Some(d) = g.drafts.get_mut(*id) else {
                return answer(
                    404,
                    error_body(
                        "ErrorItemNotFound",
                        "The specified object was not found in the store.",
                    ),
                );
            };
            d.attachments.push(Attachment {
                name: v["name"].as_str().unwrap_or("").into(),
                content_type: v["contentType"].as_str().unwrap_or("").into(),
                bytes,
                inline: v["isInline"].as_bool().unwrap_or(false),
                content_id: v["contentId"].as_str().map(String::from),
                uploaded: false,
            });
            answer(201, json!({"id": "att"}).to_string())
        }
        ("POST", ["messages", id, "attachments", "createUploadSession"]) => {
            let Some(item) = json_body().and_then(|v| v.get("AttachmentItem").cloned()) else {
                return answer(
                    400,
                    error_body("RequestBodyRead", "AttachmentItem is missing."),
                );
            };
            let Some(size) = item["size"].as_u64() else {
                return answer(400, error_body("ErrorInvalidRequest", "size is missing."));
            };
            let mut g = st.lock();
            if !g.drafts.contains_key(*id) {
                return answer(
                    404,
                    error_body(
                        "ErrorItemNotFound",
                        "The specified object was not found in the store.",
                    ),
                );
            }
            let sid = format!("s{}", g.next_id);
            g.next_id += 1;
            g.sessions.insert(
                sid.clone(),
                Session {
                    draft: id.to_string(),
                    mailbox,
                    name: item["name"].as_str().unwrap_or("").into(),
                    content_type: item["contentType"]
                        .as_str()
                        .unwrap_or("application/octet-stream")
                        .into(),
                    inline: item["isInline"].as_bool().unwrap_or(false),
                    content_id: item["contentId"].as_str().map(String::from),
                    size: size as usize,
                    data: Vec::new(),
                },
            );
            let url = format!("http://{}/upload/{sid}?authtoken=eyJ0eXAi.secret", st.addr);
            answer(201, json!({"uploadUrl": url, "expirationDateTime": "2030-01-01T00:00:00Z", "nextExpectedRanges": ["0-"]}).to_string())
        }
        ("POST", ["messages", id, "send"]) => {
            let mut g = st.lock();
            let Some(d) = g.drafts.remove(*id) else {
                return answer(
                    404,
                    error_body(
                        "ErrorItemNotFound",
                        "The specified object was not found in the store.",
                    ),
                );
            };
            let recipients = json_recipients(&d.json);
            g.sent.push(Sent {
                mailbox: d.mailbox,
                mime: None,
                draft: Some(d.json),
                attachments: d.attachments,
                recipients,
                arrived: d.arrived,
                done: Instant::now(),
            });
            answer(202, String::new())
        }
        _ => answer(
            400,
            error_body("BadRequest", "Resource not found for the segment."),
        ),
    }
}

async fn upload(
    st: &Arc<Shared>,
    sid: &str,
    query: &str,
    headers: &HeaderMap,
    body: &Bytes,
) -> Answer {
    if headers.contains_key(header::AUTHORIZATION) {
        return answer(
            401,
            error_body(
                "InvalidAuthenticationToken",
                "An Authorization header is not allowed on an upload URL.",
            ),
        );
    }
    if query != "authtoken=eyJ0eXAi.secret" {
        return answer(
            401,
            error_body(
                "InvalidAuthenticationToken",
                "The upload URL token is missing or wrong.",
            ),
        );
    }
    let Some(mailbox) = st.lock().sessions.get(sid).map(|s| s.mailbox.clone()) else {
        return answer(
            404,
            error_body("ErrorItemNotFound", "No such upload session."),
        );
    };
    let _slot = match enter(st, &mailbox) {
        Ok(s) => s,
        Err(a) => return a,
    };
    // An upload-session chunk (PUT) counts against the upload budget.
    if let Err(a) = spend_upload(st, &mailbox, body.len() as u64) {
        return a;
    }
    latency(st).await;
    let range = header(headers, header::CONTENT_RANGE).unwrap_or_default();
    let parsed = range.strip_prefix("bytes ").and_then(|r| {
        let (span, total) = r.split_once('/')?;
        let (a, b) = span.split_once('-')?;
        Some((
            a.parse::<usize>().ok()?,
            b.parse::<usize>().ok()?,
            total.parse::<usize>().ok()?,
        ))
    });
    let mut g = st.lock();
    let Some(s) = g.sessions.get_mut(sid) else {
        return answer(
            404,
            error_body("ErrorItemNotFound", "No such upload session."),
        );
    };
    let bad = |why: &str| answer(400, error_body("InvalidRange", why));
    let Some((a, b, total)) = parsed else {
        return bad("Content-Range is missing or malformed.");
    };
    if total != s.size || a != s.data.len() || b < a || b - a + 1 != body.len() || b >= total {
        return bad(&format!(
            "Content-Range {range} does not match: expected bytes {}-…/{}",
            s.data.len(),
            s.size
        ));
    }
    if body.len() > MAX_REQUEST {
        return answer(
            413,
            error_body("BadRequest", "The maximum request length supported is 4MB."),
        );
    }
    s.data.extend_from_slice(body);
    if s.data.len() < s.size {
        let next = s.data.len();
        return answer(200, json!({"expirationDateTime": "2030-01-01T00:00:00Z", "nextExpectedRanges": [format!("{next}-")]}).to_string());
    }
    let Some(s) = g.sessions.remove(sid) else {
        return bad("session vanished");
    };
    let draft = s.draft.clone();
    let Some(d) = g.drafts.get_mut(&draft) else {
        return answer(404, error_body("ErrorItemNotFound", "The draft is gone."));
    };
    d.attachments.push(Attachment {
        name: s.name,
        content_type: s.content_type,
        bytes: s.data,
        inline: s.inline,
        content_id: s.content_id,
        uploaded: true,
    });
    (
        201,
        None,
        String::new(),
        Some(format!(
            "http://{}/v1.0/users/{}/messages/{draft}/attachments/att",
            st.addr, s.mailbox
        )),
    )
}
