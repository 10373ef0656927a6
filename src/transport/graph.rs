//! Microsoft Graph upstream: `POST /v1.0/users/{mailbox}/sendMail` with the base64 MIME message, the draft-and-upload-session path for messages over 4 MB, and the classification of every Graph answer.
//!
//! What goes where:
//!
//! - **Send** (`deliver`): the header block is rewritten first
//!   ([`recipients::prepare`]: exactly the envelope recipients, Bcc hidden,
//!   `From:` names Graph rejects defused), then the message goes
//!   base64-encoded as `text/plain` to `{endpoint}/v1.0/users/{mailbox}/sendMail`,
//!   encoded as it is read from the spool a chunk at a time. The mailbox
//!   is [`Envelope::identity`] when set, else [`GraphSettings::mailbox`]; the
//!   endpoint keeps any path prefix, so national clouds and test servers are
//!   just another `endpoint`. `202 Accepted` means every recipient was
//!   accepted; any other 2xx is suspicious (Graph answered `200` to MIME it
//!   did not send, UPSTREAMS §2.3) and is retried.
//! - **Large messages**: Graph takes at most 4 MB per request *after*
//!   base64 (about 3 MB of MIME). Larger messages follow
//!   [`GraphSettings::large_messages`]:
//!   - `upload` (default): a JSON draft (subject, body, recipients as above,
//!     `X-` headers), each attachment under 3 MB in one request, bigger ones
//!     through an upload session in chunks, then `send` (needs
//!     `Mail.ReadWrite` besides `Mail.Send`; exact MIME and S/MIME are lost).
//!   - `alternate`: the attempt fails with [`Scope::Route`](crate::transport::Scope::Route)
//!     (`552 5.3.4`): the router hands this message to the next route (e.g.
//!     SMTP) without switching the active route; with no other route it
//!     bounces.
//! - **Classification** (here, never in callers): `429` → throttling
//!   ([`Failure::throttled`], enhanced `4.7.0`) with the `Retry-After` as `not_before` (the governor pauses the
//!   mailbox; no failover: throttling is about this app and mailbox); `503`,
//!   `504`, other `5xx`, `408`, network errors and timeouts → server
//!   failures (failover), with `Retry-After` when given; `401` → the token is
//!   invalidated, a new one fetched and the request repeated once, then a
//!   server failure (authentication rejected); `400
//!   ErrorMimeContentInvalidBase64String`, `403 ErrorSendAsDenied` /
//!   `ErrorAccessDenied`, `404 ErrorInvalidUser` /
//!   `MailboxNotEnabledForRESTAPI`, `413`, `ErrorMessageSizeExceeded` and
//!   any other `4xx` → permanent, with the Graph code and message in the text
//!   (it ends up in the DSN); a token that cannot be had → transient.
//!
//! `save_to_sent_items` cannot be honoured: Graph has no such switch for MIME
//! sends nor for `send` on a draft (only for JSON `sendMail`, UPSTREAMS §2.2);
//! a copy is always kept.

mod upload;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use crate::common::BoxFuture;
use crate::config::LargeMessages;
use crate::message::recipients;
use crate::oauth::{IdentityTokens, TokenSource};
use crate::transport::{
    Body, Delivery, Enhanced, Envelope, Failure, Transport, exchange_error_status,
};

/// Graph's request size limit, after base64 (UPSTREAMS §2.4).
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
/// Header bytes the recipient rewrite may add, counted in [`Transport::request_bytes`].
const REQUEST_SLACK: usize = 4096;
/// Largest Graph answer read: errors and upload sessions are small; a
/// created draft echoes at most the (under 4 MB) request.
const MAX_GRAPH_RESPONSE: usize = 8 * 1024 * 1024;
/// Longest `Retry-After` honoured as given; longer ones are cut to this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// How to reach Graph and as whom.
#[derive(Clone)]
pub struct GraphSettings {
    /// Graph root: `https://graph.microsoft.com`, or a national cloud
    /// (`https://graph.microsoft.us`, `https://dod-graph.microsoft.us`,
    /// `https://microsoftgraph.chinacloudapi.cn`). A path prefix is kept; a
    /// trailing `/v1.0` or `/beta` is used as the API version.
    pub endpoint: String,
    /// The mailbox sent as when the envelope has no identity.
    pub mailbox: String,
    /// Keep a copy in Sent Items. Graph offers no switch for the requests
    /// used here, so `false` is only logged (see the module docs).
    pub save_to_sent_items: bool,
    /// Bearer tokens for [`GraphSettings::mailbox`] (and every identity
    /// `identity_tokens` does not know).
    pub tokens: Arc<dyn TokenSource>,
    /// Token sources per [`Envelope::identity`] (the Basic-to-OAuth bridge
    /// with delegated flows: one token manager per mailbox). `None` = every
    /// identity uses `tokens`, which is right for app-only (client
    /// credentials) tokens: one token sends as any mailbox the app may use.
    pub identity_tokens: Option<Arc<dyn IdentityTokens>>,
    /// From [`crate::http::client`] (extra CA, proxy, timeout).
    pub client: reqwest::Client,
    /// Largest request body Graph accepts (4 MB).
    pub max_request_bytes: usize,
    /// What to do with messages over `max_request_bytes` after base64.
    pub large_messages: LargeMessages,
    /// Chunk size for attachment upload sessions (each PUT must stay under 4 MB).
    pub upload_chunk_bytes: usize,
    /// Wait assumed when a 429 carries no `Retry-After`.
    pub default_retry_after: Duration,
}

impl GraphSettings {
    /// Settings with the defaults: 4 MB requests, `upload` for larger
    /// messages, 2 MiB upload chunks, 10 s when a 429 names no wait.
    pub fn new(
        endpoint: impl Into<String>,
        mailbox: impl Into<String>,
        tokens: Arc<dyn TokenSource>,
        client: reqwest::Client,
    ) -> GraphSettings {
        GraphSettings {
            endpoint: endpoint.into(),
            mailbox: mailbox.into(),
            save_to_sent_items: true,
            tokens,
            identity_tokens: None,
            client,
            max_request_bytes: MAX_REQUEST_BYTES,
            large_messages: LargeMessages::Upload,
            upload_chunk_bytes: 2 * 1024 * 1024,
            default_retry_after: Duration::from_secs(10),
        }
    }
}

/// The Microsoft Graph transport.
pub struct GraphTransport {
    s: GraphSettings,
    /// The endpoint with the API version segment, e.g. `https://graph.microsoft.com/v1.0`.
    base: url::Url,
}

/// One HTTP answer, read completely.
pub(crate) struct Answer {
    pub status: u16,
    pub retry_after: Option<String>,
    pub body: Vec<u8>,
}

/// Which Graph call an answer belongs to (named in failure texts).
pub(crate) type Call = &'static str;

impl GraphTransport {
    /// Check the settings and build the transport.
    pub fn new(settings: GraphSettings) -> Result<GraphTransport, String> {
        let mut base = url::Url::parse(settings.endpoint.trim())
            .map_err(|e| format!("graph_endpoint: `{}`: {e}", settings.endpoint))?;
        if !matches!(base.scheme(), "https" | "http") || base.cannot_be_a_base() {
            return Err(format!(
                "graph_endpoint: `{}` is not an http(s) URL",
                settings.endpoint
            ));
        }
        if base.query().is_some() || base.fragment().is_some() {
            return Err(format!(
                "graph_endpoint: `{}` must not have a query or fragment",
                settings.endpoint
            ));
        }
        let versioned = base
            .path_segments()
            .and_then(|mut s| s.rfind(|p| !p.is_empty()))
            .is_some_and(|last| last == "v1.0" || last == "beta");
        {
            let mut segs = base.path_segments_mut().map_err(|()| {
                format!("graph_endpoint: `{}` cannot take a path", settings.endpoint)
            })?;
            segs.pop_if_empty();
            if !versioned {
                segs.push("v1.0");
            }
        }
        if settings.mailbox.trim().is_empty() {
            return Err("mailbox: Graph needs the mailbox to send as".into());
        }
        if settings.max_request_bytes < 1024 || settings.upload_chunk_bytes < 1024 {
            return Err("max_request_bytes and upload_chunk_bytes must be at least 1 KiB".into());
        }
        if !settings.save_to_sent_items {
            tracing::warn!(
                "save_to_sent_items = false has no effect with Microsoft Graph MIME sends: a copy is kept in Sent Items"
            );
        }
        Ok(GraphTransport { s: settings, base })
    }

    /// `{base}/users/{mailbox}/{rest…}`, every segment percent-encoded.
    pub(crate) fn url(&self, mailbox: &str, rest: &[&str]) -> url::Url {
        let mut u = self.base.clone();
        if let Ok(mut segs) = u.path_segments_mut() {
            segs.push("users").push(mailbox).extend(rest);
        }
        u
    }

    pub(crate) fn settings(&self) -> &GraphSettings {
        &self.s
    }

    fn tokens_for(&self, mailbox: &str, identity: bool) -> Arc<dyn TokenSource> {
        match &self.s.identity_tokens {
            Some(it) if identity => it.source(mailbox),
            _ => self.s.tokens.clone(),
        }
    }

    /// Send one authenticated request; on `401` invalidate the token, fetch
    /// a new one and send it once more. `build` makes the request for a
    /// bearer token (it is called once or twice).
    pub(crate) async fn call(
        &self,
        tokens: &dyn TokenSource,
        what: Call,
        build: impl Fn(&str) -> reqwest::RequestBuilder,
    ) -> Result<Answer, Failure> {
        let mut refreshed = false;
        loop {
            let token = tokens
                .token()
                .await
                .map_err(|e| Failure::transient(format!("Graph {what}: no access token: {e}")))?;
            let answer = self.send(what, build(token.expose())).await?;
            if answer.status != 401 {
                return Ok(answer);
            }
            tokens.invalidate(&token);
            if refreshed {
                return Err(Failure::server(format!(
                    "Graph {what}: {} (a freshly fetched token was refused too)",
                    describe_error(401, &answer.body)
                )));
            }
            tracing::info!(identity = %tokens.identity(), call = what, "Graph refused the access token; fetching a new one");
            refreshed = true;
        }
    }

    /// Send a request and read the whole answer. Network errors and
    /// timeouts are server failures; the URL is left out of the text (an
    /// upload URL carries a token).
    pub(crate) async fn send(
        &self,
        what: Call,
        req: reqwest::RequestBuilder,
    ) -> Result<Answer, Failure> {
        let resp = req.send().await.map_err(|e| {
            let kind = if e.is_timeout() {
                "timed out"
            } else {
                "failed"
            };
            let why = crate::tls::describe(&e)
                .map(|t| format!("TLS: {t}"))
                .unwrap_or_else(|| e.without_url().to_string());
            Failure::server(format!("Graph {what}: request {kind}: {why}"))
        })?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = crate::http::read_capped(resp, MAX_GRAPH_RESPONSE)
            .await
            .map_err(|e| {
                let why = match e {
                    crate::http::BodyError::Read(e) => e.without_url().to_string(),
                    other => other.to_string(),
                };
                Failure::server(format!("Graph {what}: reading the answer failed: {why}"))
            })?;
        Ok(Answer {
            status,
            retry_after,
            body,
        })
    }

    /// The failure for a non-success answer.
    pub(crate) fn failure(&self, what: Call, a: &Answer) -> Failure {
        classify(
            what,
            a.status,
            a.retry_after.as_deref(),
            &a.body,
            self.s.default_retry_after,
        )
    }

    async fn deliver_inner(&self, env: &Envelope, message: &Body) -> Delivery {
        let identity = env.identity.as_deref().filter(|s| !s.trim().is_empty());
        let mailbox = identity.unwrap_or(&self.s.mailbox);
        let tokens = self.tokens_for(mailbox, identity.is_some());
        // Only the header block is rewritten; the rest is read from the
        // spool as the request goes out.
        let mut prepared = recipients::prepare(message.head(), &env.rcpts);
        let outgoing = message.with_head(std::mem::take(&mut prepared.message));
        let encoded_len = outgoing.base64_len();
        if encoded_len > self.s.max_request_bytes as u64 {
            return match self.s.large_messages {
                LargeMessages::Upload => {
                    // The JSON path parses the MIME structure: of a
                    // skeleton, with the large attachments left in the spool.
                    let (skeleton, source) = upload::split(&outgoing).await.map_err(|e| {
                        Failure::transient(format!("cannot read the spooled message: {e}"))
                    })?;
                    prepared.message = skeleton;
                    upload::send(self, tokens.as_ref(), mailbox, &prepared, &source).await?;
                    Ok(vec![Ok(()); env.rcpts.len()])
                }
                LargeMessages::Alternate => Err(self.too_large(env, message, encoded_len)),
            };
        }
        let url = self.url(mailbox, &["sendMail"]);
        let a = self
            .call(tokens.as_ref(), "sendMail", |token| {
                // A new stream per try: base64 made as the spool is read.
                let stream = outgoing.base64_stream(Bytes::new(), Bytes::new());
                self.s
                    .client
                    .post(url.clone())
                    .bearer_auth(token)
                    .header(reqwest::header::CONTENT_TYPE, "text/plain")
                    .header(reqwest::header::CONTENT_LENGTH, encoded_len)
                    .body(reqwest::Body::wrap_stream(stream))
            })
            .await?;
        accepted("sendMail", &a, self)?;
        Ok(vec![Ok(()); env.rcpts.len()])
    }

    /// `large_messages = alternate`: this route cannot carry the message;
    /// the router hands it to the next route for this message only.
    fn too_large(&self, env: &Envelope, message: &Body, encoded: u64) -> Failure {
        tracing::info!(id = %env.id, size = message.len(), "too large for Graph: leaving it to the next route");
        Failure::route(format!(
            "552 5.3.4 message too large for Microsoft Graph ({} bytes after base64, the limit is {})",
            encoded, self.s.max_request_bytes
        ))
        .with_enhanced(Enhanced::new(5, 3, 4))
    }
}

/// `Ok` for `202 Accepted`; any other 2xx is suspicious and retried.
pub(crate) fn accepted(what: Call, a: &Answer, t: &GraphTransport) -> Result<(), Failure> {
    match a.status {
        202 => Ok(()),
        200..=299 => Err(Failure::transient(format!(
            "Graph {what}: answered {} instead of 202 Accepted; not counted as sent",
            a.status
        ))),
        _ => Err(t.failure(what, a)),
    }
}

/// The Graph error code and message from an error body, when it is one.
pub fn error_code(body: &[u8]) -> Option<(String, String, Option<String>)> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let e = v.get("error")?;
    let code = e.get("code")?.as_str()?.to_string();
    let message = e
        .get("message")
        .and_then(|m| m.as_str())
        .unwrap_or("")
        .to_string();
    let request_id = e
        .get("innerError")
        .and_then(|i| i.get("request-id"))
        .and_then(|r| r.as_str())
        .map(str::to_string);
    Some((code, message, request_id))
}

fn one_line(s: &str, max: usize) -> String {
    let s: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let s = s.trim();
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

fn describe_error(status: u16, body: &[u8]) -> String {
    match error_code(body) {
        Some((code, msg, rid)) => {
            let mut t = format!("{status} {code}");
            if !msg.is_empty() {
                t.push_str(": ");
                t.push_str(&one_line(&msg, 300));
            }
            if let Some(r) = rid {
                t.push_str(&format!(" (request-id {})", one_line(&r, 64)));
            }
            t
        }
        None if body.is_empty() => format!("{status}"),
        None => format!("{status} {}", one_line(&String::from_utf8_lossy(body), 200)),
    }
}

/// Error codes that mean "slow down", whatever the status says.
const THROTTLE_CODES: &[&str] = &[
    "TooManyRequests",
    "ApplicationThrottled",
    "ErrorServerBusy",
    "MailboxConcurrency",
];

/// Classify a Graph error answer (`status` is not 2xx, and not a 401 that
/// could still be retried).
pub fn classify(
    what: &str,
    status: u16,
    retry_after: Option<&str>,
    body: &[u8],
    default_wait: Duration,
) -> Failure {
    let text = format!("Graph {what}: {}", describe_error(status, body));
    let wait = retry_after.and_then(|v| parse_retry_after(v, SystemTime::now()));
    let code = error_code(body).map(|c| c.0).unwrap_or_default();
    if status == 429 || THROTTLE_CODES.contains(&code.as_str()) {
        return Failure::throttled(text, wait.unwrap_or(default_wait))
            .with_enhanced(Enhanced::new(4, 7, 0));
    }
    let f = if status >= 500 || status == 408 || status == 401 {
        Failure::server(text)
    } else {
        // 400 ErrorMimeContentInvalidBase64String, 403 ErrorSendAsDenied /
        // ErrorAccessDenied, 404 ErrorInvalidUser / MailboxNotEnabledForRESTAPI,
        // 413 and ErrorMessageSizeExceeded, and every other 4xx: another try
        // or another server would get the same answer.
        let enhanced = exchange_error_status(&code).or(match status {
            403 => Some(Enhanced::new(5, 7, 1)),
            404 => Some(Enhanced::new(5, 1, 1)),
            413 => Some(Enhanced::new(5, 3, 4)),
            _ => None,
        });
        match enhanced {
            Some(e) => Failure::permanent(text).with_enhanced(e),
            None => Failure::permanent(text),
        }
    };
    match wait {
        Some(w) if f.severity == crate::transport::Severity::Transient => f.with_not_before(w),
        _ => f,
    }
}

/// `Retry-After` as delay-seconds or an HTTP date, relative to `now`;
/// capped at [`MAX_RETRY_AFTER`], a date in the past is zero.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    let wait = if let Ok(secs) = v.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(at.timestamp()).ok()?);
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

impl Transport for GraphTransport {
    fn describe(&self) -> String {
        format!(
            "graph:{}/users/{}",
            self.base.as_str().trim_end_matches('/'),
            self.s.mailbox
        )
    }

    fn deliver<'a>(&'a self, env: &'a Envelope, message: &'a Body) -> BoxFuture<'a, Delivery> {
        Box::pin(self.deliver_inner(env, message))
    }

    /// What one attempt uploads: the base64 MIME (plus headers added for
    /// the recipients); on the upload path at most the same (attachments
    /// travel base64 in the draft or raw in upload-session chunks); nothing
    /// when the message is left to the next route.
    fn request_bytes(&self, message: &Body) -> u64 {
        let encoded = (message.len() + REQUEST_SLACK as u64).div_ceil(3) * 4;
        if encoded > self.s.max_request_bytes as u64
            && self.s.large_messages == LargeMessages::Alternate
        {
            0
        } else {
            encoded
        }
    }

    /// Fetch a token and look the mailbox up. Any answer but 401, 404,
    /// 429 and 5xx counts as usable (an app with only `Mail.Send` gets 403
    /// here, and can still send).
    fn probe(&self) -> BoxFuture<'_, Result<(), Failure>> {
        Box::pin(async move {
            let url = self.url(&self.s.mailbox, &[]);
            let a = self
                .call(self.s.tokens.as_ref(), "probe", |token| {
                    self.s.client.get(url.clone()).bearer_auth(token)
                })
                .await?;
            match a.status {
                429 | 404 | 500..=599 => Err(self.failure("probe", &a)),
                _ => Ok(()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oauth::StaticToken;

    fn transport(endpoint: &str) -> Result<GraphTransport, String> {
        let tokens = Arc::new(StaticToken {
            token: crate::common::Secret::new("t"),
            identity: "desk".into(),
        });
        GraphTransport::new(GraphSettings::new(
            endpoint,
            "desk@contoso.com",
            tokens,
            crate::http::client(None, &Default::default(), Duration::from_secs(5))?,
        ))
    }

    #[test]
    fn urls_keep_prefixes_and_encode_the_mailbox() {
        let cases = [
            (
                "https://graph.microsoft.com",
                "https://graph.microsoft.com/v1.0/users/a@b.test/sendMail",
            ),
            (
                "https://graph.microsoft.us/",
                "https://graph.microsoft.us/v1.0/users/a@b.test/sendMail",
            ),
            (
                "https://microsoftgraph.chinacloudapi.cn/v1.0",
                "https://microsoftgraph.chinacloudapi.cn/v1.0/users/a@b.test/sendMail",
            ),
            (
                "http://127.0.0.1:9/prefix/",
                "http://127.0.0.1:9/prefix/v1.0/users/a@b.test/sendMail",
            ),
        ];
        for (endpoint, want) in cases {
            let t = transport(endpoint).unwrap();
            assert_eq!(t.url("a@b.test", &["sendMail"]).as_str(), want);
        }
        let t = transport("https://graph.microsoft.com").unwrap();
        assert_eq!(
            t.url("we ird/x?#%@b.test", &["sendMail"]).as_str(),
            "https://graph.microsoft.com/v1.0/users/we%20ird%2Fx%3F%23%25@b.test/sendMail"
        );
        for bad in ["graph.microsoft.com", "ftp://x", "https://x/?a=b", ""] {
            assert!(transport(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn request_bytes_cover_base64_and_nothing_when_left_to_another_route() {
        let t = transport("https://graph.microsoft.com").unwrap();
        let m = vec![b'x'; 300_000];
        let n = t.request_bytes(&Body::from(&m));
        assert!((400_000..=410_000).contains(&n), "{n}");
        // Over 4 MB: the upload path counts the whole message too.
        assert!(t.request_bytes(&Body::from(vec![b'x'; 6_000_000])) >= 8_000_000);
        let mut s = t.settings().clone();
        s.large_messages = LargeMessages::Alternate;
        let t = GraphTransport::new(s).unwrap();
        assert_eq!(t.request_bytes(&Body::from(vec![b'x'; 6_000_000])), 0);
        assert!(t.request_bytes(&Body::from(&m)) >= 400_000);
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_470);
        assert_eq!(parse_retry_after("10", now), Some(Duration::from_secs(10)));
        // Wed, 21 Oct 2015 07:28:00 GMT = 1445412480
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("999999", now), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn classification() {
        let d = Duration::from_secs(10);
        let send_as = br#"{ "error": { "code": "ErrorSendAsDenied", "message": "The user account which was used to submit this request does not have the right to send mail on behalf of the specified sending account. Cannot submit message.", "innerError": { "request-id": "24e7991e-01ae-4cc2-8e06-532a96fd8948", "date": "2019-01-16T18:53:25" } } }"#;
        let f = classify("sendMail", 403, None, send_as, d);
        assert_eq!(f.severity, crate::transport::Severity::Permanent);
        assert!(
            f.text
                .starts_with("Graph sendMail: 403 ErrorSendAsDenied: The user account"),
            "{}",
            f.text
        );
        assert!(
            f.text
                .ends_with("(request-id 24e7991e-01ae-4cc2-8e06-532a96fd8948)")
        );
        assert_eq!(f.enhanced, Some(Enhanced::new(5, 7, 1)));
        assert_eq!(
            classify(
                "sendMail",
                404,
                None,
                br#"{"error":{"code":"ErrorInvalidUser","message":"m"}}"#,
                d
            )
            .enhanced,
            Some(Enhanced::new(5, 1, 1))
        );

        let f = classify(
            "sendMail",
            429,
            Some("7"),
            br#"{"error":{"code":"TooManyRequests","message":"Please retry again later."}}"#,
            d,
        );
        assert!(!f.fails_over() && f.severity == crate::transport::Severity::Transient);
        assert!(f.throttled);
        assert_eq!(f.not_before, Some(Duration::from_secs(7)));
        assert_eq!(classify("x", 429, None, b"", d).not_before, Some(d));

        let f = classify("sendMail", 503, Some("3"), b"", d);
        assert!(f.fails_over());
        assert_eq!(f.not_before, Some(Duration::from_secs(3)));
        assert!(classify("x", 504, None, b"<html>gateway</html>", d).fails_over());
        assert!(classify("x", 500, None, b"", d).fails_over());

        for (status, code) in [
            (400, "ErrorMimeContentInvalidBase64String"),
            (403, "ErrorAccessDenied"),
            (404, "ErrorInvalidUser"),
            (404, "MailboxNotEnabledForRESTAPI"),
            (413, "RequestEntityTooLarge"),
            (400, "ErrorMessageSizeExceeded"),
            (422, "Whatever"),
        ] {
            let body = format!(r#"{{"error":{{"code":"{code}","message":"m"}}}}"#);
            let f = classify("sendMail", status, None, body.as_bytes(), d);
            assert_eq!(
                f.severity,
                crate::transport::Severity::Permanent,
                "{status} {code}"
            );
            assert_eq!(f.text, format!("Graph sendMail: {status} {code}: m"));
        }
        // A throttling code wins over the status.
        let f = classify("x", 503, None, br#"{"error":{"code":"ApplicationThrottled","message":"Application is over its MailboxConcurrency limit."}}"#, d);
        assert!(!f.fails_over() && f.not_before == Some(d));
    }
}
