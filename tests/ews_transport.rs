//! The EWS transport against the in-process fake EWS endpoint: the exact SOAP request, Basic and bearer authentication, impersonation, envelope-only recipients, each fault's classification, a proxy in the path, and no secrets in failure texts.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use common::fake_ews::{FakeAuth, FakeEws, NS_MESSAGES, NS_SOAP, NS_TYPES, PATH, Reply};
use mailbridge::common::BoxFuture;
use mailbridge::common::Secret;
use mailbridge::config::Proxy;
use mailbridge::oauth::{StaticToken, TokenError, TokenSource};
use mailbridge::transport::ews::{
    DEFAULT_BACKOFF, DEFAULT_SERVER_VERSION, EwsAuth, EwsSettings, EwsTransport,
};
use mailbridge::transport::{Delivery, Envelope, Failure, Scope, Severity, Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const USER: &str = "relay@contoso.com";
const PASSWORD: &str = "S3cret-Pa55word!";
const TOKEN: &str = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.app-token.sig";
const MAILBOX: &str = "relay@contoso.com";
const MESSAGE: &[u8] = b"From: relay@contoso.com\r\nTo: Bob <bob@example.com>\r\nCc: carol@example.com\r\nSubject: hi\r\n\r\nHello.\r\n";

fn settings(fake: &FakeEws, auth: EwsAuth) -> EwsSettings {
    EwsSettings {
        connect_url: fake.url(),
        auth,
        impersonate: false,
        mailbox: MAILBOX.into(),
        save_to_sent_items: true,
        server_version: DEFAULT_SERVER_VERSION.into(),
        ca_file: None,
        proxy: Proxy::default(),
        timeout: Duration::from_secs(10),
    }
}

fn basic(password: &str) -> EwsAuth {
    EwsAuth::Basic {
        username: USER.into(),
        password: Secret::new(password),
    }
}

fn bearer(token: &str) -> EwsAuth {
    EwsAuth::bearer(Arc::new(StaticToken {
        token: Secret::new(token),
        identity: "app".into(),
    }))
}

fn transport(s: EwsSettings) -> EwsTransport {
    EwsTransport::new(s).expect("valid settings")
}

fn envelope(rcpts: &[&str], identity: Option<&str>) -> Envelope {
    Envelope {
        id: "q1".into(),
        from: "relay@contoso.com".into(),
        rcpts: rcpts.iter().map(|r| r.to_string()).collect(),
        identity: identity.map(str::to_string),
    }
}

fn rcpts() -> Vec<&'static str> {
    vec!["bob@example.com", "carol@example.com"]
}

/// The whole attempt failed; the failure must not reveal a credential.
fn failed(d: Delivery) -> Failure {
    let f = d.expect_err("the attempt should fail");
    for secret in [PASSWORD, TOKEN, "tok-old", "tok-new"] {
        assert!(
            !f.text.contains(secret),
            "secret in failure text: {}",
            f.text
        );
    }
    f
}

fn delivered(d: &Delivery, n: usize) {
    match d {
        Ok(r) => assert!(r.len() == n && r.iter().all(Result::is_ok), "{r:?}"),
        Err(f) => panic!("not delivered: {f:?}"),
    }
}

#[tokio::test]
async fn exact_request_with_basic_auth_and_save_copy() {
    let fake = FakeEws::start(FakeAuth::basic(USER, PASSWORD)).await;
    let t = transport(settings(&fake, basic(PASSWORD)));
    let d = t
        .deliver(
            &envelope(&rcpts(), None),
            &mailbridge::transport::Body::from(MESSAGE),
        )
        .await;
    delivered(&d, 2);
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", PATH));
    assert_eq!(r.header("content-type"), Some("text/xml; charset=utf-8"));
    assert_eq!(
        r.header("authorization").map(str::to_string),
        Some(format!(
            "Basic {}",
            B64.encode(format!("{USER}:{PASSWORD}"))
        ))
    );
    assert_eq!(r.header("x-anchormailbox"), None);
    let expected = format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?>\r\n\
         <soap:Envelope xmlns:soap=\"{NS_SOAP}\" xmlns:t=\"{NS_TYPES}\" xmlns:m=\"{NS_MESSAGES}\">\
         <soap:Header><t:RequestServerVersion Version=\"Exchange2013_SP1\"/></soap:Header>\
         <soap:Body><m:CreateItem MessageDisposition=\"SendAndSaveCopy\">\
         <m:SavedItemFolderId><t:DistinguishedFolderId Id=\"sentitems\"/></m:SavedItemFolderId>\
         <m:Items><t:Message><t:MimeContent>{}</t:MimeContent></t:Message></m:Items>\
         </m:CreateItem></soap:Body></soap:Envelope>\r\n",
        B64.encode(MESSAGE)
    );
    assert_eq!(r.body, expected);
    // What the fake decoded: every recipient is in To/Cc, so nothing was added.
    assert_eq!(r.mime.as_deref(), Some(MESSAGE));
    assert_eq!(r.server_version.as_deref(), Some("Exchange2013_SP1"));
    assert_eq!(r.disposition.as_deref(), Some("SendAndSaveCopy"));
    assert_eq!(r.saved_folder.as_deref(), Some("sentitems"));
    assert_eq!(r.impersonated, None);
}

#[tokio::test]
async fn send_only_has_no_saved_item_folder() {
    let fake = FakeEws::start(FakeAuth::basic(USER, PASSWORD)).await;
    let mut s = settings(&fake, basic(PASSWORD));
    s.save_to_sent_items = false;
    let d = transport(s)
        .deliver(
            &envelope(&rcpts(), None),
            &mailbridge::transport::Body::from(MESSAGE),
        )
        .await;
    delivered(&d, 2);
    let r = &fake.requests()[0];
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    assert_eq!(r.disposition.as_deref(), Some("SendOnly"));
    assert_eq!(r.saved_folder, None);
    assert!(!r.body.contains("SavedItemFolderId"));
}

#[tokio::test]
async fn envelope_only_recipients_go_to_bcc_and_stay_hidden() {
    let fake = FakeEws::start(FakeAuth::basic(USER, PASSWORD)).await;
    let t = transport(settings(&fake, basic(PASSWORD)));
    let env = envelope(
        &[
            "bob@example.com",
            "dave@example.net",
            "CAROL@example.com",
            "erin@example.org",
        ],
        None,
    );
    delivered(
        &t.deliver(&env, &mailbridge::transport::Body::from(MESSAGE))
            .await,
        4,
    );
    let mime = fake.requests()[0].mime_text();
    let (head, body) = mime.split_once("\r\n\r\n").expect("header and body");
    assert_eq!(body, "Hello.\r\n");
    let field = |name: &str| {
        head.split("\r\n")
            .filter(|l| l.to_ascii_lowercase().starts_with(&format!("{name}:")))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(field("to"), ["To: Bob <bob@example.com>"]);
    assert_eq!(field("cc"), ["Cc: carol@example.com"]);
    assert_eq!(field("bcc"), ["Bcc: dave@example.net, erin@example.org"]);
    assert!(!field("to")[0].contains("dave") && !field("cc")[0].contains("erin"));
}

#[tokio::test]
async fn a_stale_bcc_field_is_replaced() {
    let fake = FakeEws::start(FakeAuth::basic(USER, PASSWORD)).await;
    let t = transport(settings(&fake, basic(PASSWORD)));
    let msg = b"Bcc: old@example.com\r\nFrom: relay@contoso.com\r\nTo: bob@example.com\r\nSubject: s\r\n\r\nx\r\n";
    let env = envelope(&["bob@example.com", "new@example.com"], None);
    delivered(
        &t.deliver(&env, &mailbridge::transport::Body::from(msg))
            .await,
        2,
    );
    assert_eq!(
        fake.requests()[0].mime_text(),
        "From: relay@contoso.com\r\nTo: bob@example.com\r\nSubject: s\r\nBcc: new@example.com\r\n\r\nx\r\n"
    );
}

#[tokio::test]
async fn bearer_delegated_sends_no_impersonation() {
    let fake = FakeEws::start(FakeAuth::bearer(&[TOKEN])).await;
    let t = transport(settings(&fake, bearer(TOKEN)));
    delivered(
        &t.deliver(
            &envelope(&rcpts(), None),
            &mailbridge::transport::Body::from(MESSAGE),
        )
        .await,
        2,
    );
    let r = &fake.requests()[0];
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    assert_eq!(
        r.header("authorization").map(str::to_string),
        Some(format!("Bearer {TOKEN}"))
    );
    assert_eq!(r.impersonated, None);
    assert_eq!(r.header("x-anchormailbox"), None);
}

#[tokio::test]
async fn app_only_impersonates_the_default_or_the_envelope_identity() {
    let fake = FakeEws::start(FakeAuth::bearer(&[TOKEN]).impersonation()).await;
    let mut s = settings(&fake, bearer(TOKEN));
    s.impersonate = true;
    let t = transport(s);
    delivered(
        &t.deliver(
            &envelope(&rcpts(), None),
            &mailbridge::transport::Body::from(MESSAGE),
        )
        .await,
        2,
    );
    delivered(
        &t.deliver(
            &envelope(&rcpts(), Some("printer@contoso.com")),
            &mailbridge::transport::Body::from(MESSAGE),
        )
        .await,
        2,
    );
    let reqs = fake.requests();
    for (r, mailbox) in reqs.iter().zip([MAILBOX, "printer@contoso.com"]) {
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert_eq!(r.impersonated.as_deref(), Some(mailbox));
        assert_eq!(r.header("x-anchormailbox"), Some(mailbox));
        assert!(r.body.contains(&format!(
            "<soap:Header><t:RequestServerVersion Version=\"Exchange2013_SP1\"/>\
             <t:ExchangeImpersonation><t:ConnectingSID><t:PrimarySmtpAddress>{mailbox}\
             </t:PrimarySmtpAddress></t:ConnectingSID></t:ExchangeImpersonation></soap:Header>"
        )));
    }
}

#[tokio::test]
async fn app_only_without_impersonation_is_refused_by_the_fake() {
    // The fake enforces what Exchange Online enforces; this keeps it honest.
    let fake = FakeEws::start(FakeAuth::bearer(&[TOKEN]).impersonation()).await;
    let t = transport(settings(&fake, bearer(TOKEN)));
    let f = failed(
        t.deliver(
            &envelope(&rcpts(), None),
            &mailbridge::transport::Body::from(MESSAGE),
        )
        .await,
    );
    assert_eq!(f.severity, Severity::Permanent);
    assert!(f.text.contains("ErrorSchemaValidation"), "{}", f.text);
}

/// Hands out `tok-old`, then `tok-new` once `tok-old` was invalidated.
#[derive(Default)]
struct Rotating {
    next: AtomicUsize,
    fetched: AtomicUsize,
    invalidated: Mutex<Vec<String>>,
}

impl TokenSource for Rotating {
    fn token(&self) -> BoxFuture<'_, Result<Secret, TokenError>> {
        self.fetched.fetch_add(1, Ordering::SeqCst);
        let t = ["tok-old", "tok-new"][self.next.load(Ordering::SeqCst).min(1)];
        Box::pin(async move { Ok(Secret::new(t)) })
    }
    fn invalidate(&self, rejected: &Secret) {
        self.invalidated
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(rejected.expose().to_string());
        self.next.fetch_add(1, Ordering::SeqCst);
    }
    fn identity(&self) -> String {
        MAILBOX.into()
    }
}

#[tokio::test]
async fn a_rejected_token_is_refreshed_once() {
    let fake = FakeEws::start(FakeAuth::bearer(&["tok-new"])).await;
    let tokens = Arc::new(Rotating::default());
    let t = transport(settings(&fake, EwsAuth::bearer(tokens.clone())));
    delivered(
        &t.deliver(
            &envelope(&rcpts(), None),
            &mailbridge::transport::Body::from(MESSAGE),
        )
        .await,
        2,
    );
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].status, 401);
    assert_eq!(reqs[1].header("authorization"), Some("Bearer tok-new"));
    assert_eq!(
        *tokens.invalidated.lock().unwrap_or_else(|e| e.into_inner()),
        ["tok-old"]
    );

    // Rejected again after the refresh: one retry only, then a server failure.
    fake.set_tokens(&["something-else"]);
    let f = failed(
        t.deliver(
            &envelope(&rcpts(), None),
            &mailbridge::transport::Body::from(MESSAGE),
        )
        .await,
    );
    assert!(f.fails_over(), "{f:?}");
    assert!(f.text.contains("OAuth token rejected"), "{}", f.text);
    assert_eq!(fake.requests().len(), 4);
    assert_eq!(tokens.fetched.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn basic_credentials_rejected_is_a_clear_server_failure() {
    let fake = FakeEws::start(FakeAuth::basic(USER, PASSWORD)).await;
    let t = transport(settings(&fake, basic("wrong-Pa55word!")));
    let f = failed(
        t.deliver(
            &envelope(&rcpts(), None),
            &mailbridge::transport::Body::from(MESSAGE),
        )
        .await,
    );
    assert!(f.fails_over(), "{f:?}");
    assert!(
        f.text.contains("credentials rejected")
            && f.text.contains("check username/password")
            && f.text.contains("no longer accepts Basic"),
        "{}",
        f.text
    );
    assert!(!f.text.contains("wrong-Pa55word!"));
    assert_eq!(fake.requests().len(), 1, "Basic is not retried");

    // A 401 although the credentials are right (e.g. Basic disabled).
    let t = transport(settings(&fake, basic(PASSWORD)));
    fake.push(Reply::Unauthorized);
    let f = failed(
        t.deliver(
            &envelope(&rcpts(), None),
            &mailbridge::transport::Body::from(MESSAGE),
        )
        .await,
    );
    assert!(f.fails_over() && f.text.contains("credentials rejected"));
}

/// A token source that cannot produce a token.
struct NoToken;

impl TokenSource for NoToken {
    fn token(&self) -> BoxFuture<'_, Result<Secret, TokenError>> {
        Box::pin(async {
            Err(TokenError::ReconsentNeeded(
                "refresh token expired; run `mailbridge auth login`".into(),
            ))
        })
    }
    fn invalidate(&self, _: &Secret) {}
    fn identity(&self) -> String {
        MAILBOX.into()
    }
}

#[tokio::test]
async fn no_token_is_a_transient_message_failure_without_a_request() {
    let fake = FakeEws::start(FakeAuth::bearer(&[TOKEN])).await;
    let t = transport(settings(&fake, EwsAuth::bearer(Arc::new(NoToken))));
    let f = failed(
        t.deliver(
            &envelope(&rcpts(), None),
            &mailbridge::transport::Body::from(MESSAGE),
        )
        .await,
    );
    assert_eq!((f.severity, f.scope), (Severity::Transient, Scope::Message));
    assert!(f.text.contains("re-consent needed"), "{}", f.text);
    assert!(fake.requests().is_empty());
}

#[tokio::test]
async fn server_busy_is_transient_with_back_off() {
    let fake = FakeEws::start(FakeAuth::basic(USER, PASSWORD)).await;
    let t = transport(settings(&fake, basic(PASSWORD)));
    fake.push(Reply::server_busy(Some(25)));
    fake.push(Reply::server_busy(None));
    let f = failed(
        t.deliver(
            &envelope(&rcpts(), None),
            &mailbridge::transport::Body::from(MESSAGE),
        )
        .await,
    );
    assert_eq!((f.severity, f.scope), (Severity::Transient, Scope::Message));
    assert_eq!(f.not_before, Some(Duration::from_millis(25)));
    assert!(f.text.contains("ErrorServerBusy"), "{}", f.text);
    let f = failed(
        t.deliver(
            &envelope(&rcpts(), None),
            &mailbridge::transport::Body::from(MESSAGE),
        )
        .await,
    );
    assert_eq!(f.not_before, Some(DEFAULT_BACKOFF));
    assert_eq!(fake.requests()[0].status, 500);
    // And the next attempt goes through.
    delivered(
        &t.deliver(
            &envelope(&rcpts(), None),
            &mailbridge::transport::Body::from(MESSAGE),
        )
        .await,
        2,
    );
}

#[tokio::test]
async fn connection_count_and_503_are_transient() {
    let fake = FakeEws::start(FakeAuth::basic(USER, PASSWORD)).await;
    let t = transport(settings(&fake, basic(PASSWORD)));
    fake.push(Reply::ConnectionCount);
    let f = failed(
        t.deliver(
            &envelope(&rcpts(), None),
            &mailbridge::transport::Body::from(MESSAGE),
        )
        .await,
    );
    assert_eq!((f.severity, f.scope), (Severity::Transient, Scope::Message));
    assert!(
        f.text.contains("ErrorExceededConnectionCount")
            && f.text
                .contains("exceeded the available concurrent connections"),
        "{}",
        f.text
    );
    assert_eq!(f.not_before, None);

    fake.push(Reply::Unavailable { retry_after: None });
    let f = failed(
        t.deliver(
            &envelope(&rcpts(), None),
            &mailbridge::transport::Body::from(MESSAGE),
        )
        .await,
    );
    assert_eq!((f.severity, f.scope), (Severity::Transient, Scope::Server));
    assert!(f.text.contains("503"), "{}", f.text);

    fake.push(Reply::Unavailable {
        retry_after: Some(30),
    });
    let f = failed(
        t.deliver(
            &envelope(&rcpts(), None),
            &mailbridge::transport::Body::from(MESSAGE),
        )
        .await,
    );
    assert!(f.fails_over());
    assert_eq!(f.not_before, Some(Duration::from_secs(30)));
}

#[tokio::test]
async fn permission_and_content_errors_are_permanent_with_the_ews_code() {
    let fake = FakeEws::start(FakeAuth::basic(USER, PASSWORD)).await;
    let t = transport(settings(&fake, basic(PASSWORD)));
    for reply in [
        Reply::send_as_denied(),
        Reply::access_denied(),
        Reply::invalid_recipients(),
        Reply::size_exceeded(),
        Reply::error(
            "ErrorMimeContentConversionFailed",
            "Unable to convert MIME & <stuff>.",
        ),
    ] {
        let Reply::Error { code, text } = reply.clone() else {
            unreachable!()
        };
        fake.push(reply);
        let f = failed(
            t.deliver(
                &envelope(&rcpts(), None),
                &mailbridge::transport::Body::from(MESSAGE),
            )
            .await,
        );
        assert_eq!((f.severity, f.scope), (Severity::Permanent, Scope::Message));
        assert!(
            f.text.contains(&format!("{code}: {text}")),
            "{code}: {}",
            f.text
        );
    }
}

#[tokio::test]
async fn unreachable_server_is_a_server_failure() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let fake = FakeEws::start(FakeAuth::basic(USER, PASSWORD)).await;
    let mut s = settings(&fake, basic(PASSWORD));
    s.connect_url = format!("http://{addr}{PATH}");
    let f = failed(
        transport(s)
            .deliver(
                &envelope(&rcpts(), None),
                &mailbridge::transport::Body::from(MESSAGE),
            )
            .await,
    );
    assert!(f.fails_over(), "{f:?}");
    assert!(f.text.contains("cannot connect"), "{}", f.text);
}

#[tokio::test(start_paused = true)]
async fn a_silent_server_times_out_as_a_server_failure() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    // Accept and hold connections, never answer.
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    let fake = FakeEws::start(FakeAuth::basic(USER, PASSWORD)).await;
    let mut s = settings(&fake, basic(PASSWORD));
    s.connect_url = format!("http://{addr}{PATH}");
    let f = failed(
        transport(s)
            .deliver(
                &envelope(&rcpts(), None),
                &mailbridge::transport::Body::from(MESSAGE),
            )
            .await,
    );
    assert!(f.fails_over(), "{f:?}");
    assert!(f.text.contains("timed out"), "{}", f.text);
    hold.abort();
}

#[tokio::test]
async fn probe_asks_for_sent_items() {
    let fake = FakeEws::start(FakeAuth::bearer(&[TOKEN]).impersonation()).await;
    let mut s = settings(&fake, bearer(TOKEN));
    s.impersonate = true;
    let t = transport(s);
    t.probe().await.expect("probe succeeds");
    let r = &fake.requests()[0];
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    assert_eq!(r.operation.as_deref(), Some("GetFolder"));
    assert_eq!(r.impersonated.as_deref(), Some(MAILBOX));
    assert!(
        r.body
            .contains("<t:DistinguishedFolderId Id=\"sentitems\"/>")
    );

    fake.push(Reply::server_busy(Some(1000)));
    assert!(t.probe().await.is_err());
    fake.push(Reply::access_denied());
    t.probe().await.expect("an EWS answer means reachable");
    fake.set_tokens(&["other"]);
    let f = t.probe().await.expect_err("401");
    assert!(f.fails_over() && !f.text.contains(TOKEN));
}

#[tokio::test]
async fn describe_names_the_endpoint_without_secrets() {
    let fake = FakeEws::start(FakeAuth::basic(USER, PASSWORD)).await;
    let t = transport(settings(&fake, basic(PASSWORD)));
    assert_eq!(t.describe(), format!("ews {} as {MAILBOX}", fake.url()));
    assert!(!t.describe().contains(PASSWORD));
}

/// (request line, Proxy-Authorization) of every request a [`TestProxy`] forwarded.
type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// A minimal HTTP proxy for plain-http targets (absolute-form requests):
/// one request per connection, forwarded with `Connection: close`.
struct TestProxy {
    addr: std::net::SocketAddr,
    seen: Seen,
    task: tokio::task::JoinHandle<()>,
}

impl TestProxy {
    async fn start() -> TestProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move {
                    let _ = proxy_one(sock, s).await;
                });
            }
        });
        TestProxy { addr, seen, task }
    }
    fn seen(&self) -> Vec<(String, Option<String>)> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn proxy_one(mut client: TcpStream, seen: Seen) -> std::io::Result<()> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let mut buf = Vec::new();
    let head_end = loop {
        let mut chunk = [0u8; 4096];
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Err(bad("closed before the request head"));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_string();
    let mut parts = request_line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let rest = target
        .strip_prefix("http://")
        .ok_or_else(|| bad("not absolute-form"))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut out = format!("{method} {path} HTTP/1.1\r\n");
    let mut proxy_auth = None;
    let mut length = 0usize;
    for l in lines.filter(|l| !l.is_empty()) {
        let (name, value) = l.split_once(':').unwrap_or((l, ""));
        match name.to_ascii_lowercase().as_str() {
            "proxy-authorization" => proxy_auth = Some(value.trim().to_string()),
            "proxy-connection" | "connection" => {}
            n => {
                if n == "content-length" {
                    length = value.trim().parse().map_err(|_| bad("content-length"))?;
                }
                out.push_str(l);
                out.push_str("\r\n");
            }
        }
    }
    out.push_str("Connection: close\r\n\r\n");
    seen.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((request_line.clone(), proxy_auth));
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let mut chunk = vec![0u8; 64 * 1024];
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Err(bad("closed in the body"));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let mut upstream = TcpStream::connect(authority).await?;
    upstream.write_all(out.as_bytes()).await?;
    upstream.write_all(&body).await?;
    let mut response = Vec::new();
    upstream.read_to_end(&mut response).await?;
    client.write_all(&response).await?;
    client.shutdown().await
}

#[tokio::test]
async fn requests_go_through_the_configured_proxy() {
    let fake = FakeEws::start(FakeAuth::basic(USER, PASSWORD)).await;
    let proxy = TestProxy::start().await;
    let mut s = settings(&fake, basic(PASSWORD));
    s.proxy = Proxy {
        url: format!("http://{}", proxy.addr),
        username: "proxyuser".into(),
        password: Secret::new("proxy-pw"),
        ..Proxy::default()
    };
    let t = transport(s);
    delivered(
        &t.deliver(
            &envelope(&rcpts(), None),
            &mailbridge::transport::Body::from(MESSAGE),
        )
        .await,
        2,
    );
    let seen = proxy.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].0, format!("POST {} HTTP/1.1", fake.url()));
    assert_eq!(
        seen[0].1,
        Some(format!("Basic {}", B64.encode("proxyuser:proxy-pw")))
    );
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 1);
    assert!(reqs[0].problems.is_empty(), "{:?}", reqs[0].problems);
    assert_eq!(reqs[0].mime.as_deref(), Some(MESSAGE));
    assert_eq!(reqs[0].header("proxy-authorization"), None);
}

#[tokio::test]
async fn a_large_message_round_trips() {
    let fake = FakeEws::start(FakeAuth::basic(USER, PASSWORD)).await;
    let t = transport(settings(&fake, basic(PASSWORD)));
    let mut msg = b"From: relay@contoso.com\r\nTo: bob@example.com\r\nSubject: big\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n".to_vec();
    let line = B64.encode([0xA5u8; 57]);
    for _ in 0..(5 * 1024 * 1024 / 78) {
        msg.extend_from_slice(line.as_bytes());
        msg.extend_from_slice(b"\r\n");
    }
    delivered(
        &t.deliver(
            &envelope(&["bob@example.com"], None),
            &mailbridge::transport::Body::from(&msg),
        )
        .await,
        1,
    );
    assert_eq!(fake.requests()[0].mime.as_deref(), Some(msg.as_slice()));
}

#[tokio::test]
async fn the_fake_refuses_what_exchange_refuses() {
    let fake = FakeEws::start(FakeAuth::basic(USER, PASSWORD)).await;
    let client =
        mailbridge::http::client(None, &Proxy::default(), Duration::from_secs(10)).expect("client");
    let good = format!(
        "<soap:Envelope xmlns:soap=\"{NS_SOAP}\" xmlns:t=\"{NS_TYPES}\" xmlns:m=\"{NS_MESSAGES}\">\
         <soap:Header><t:RequestServerVersion Version=\"Exchange2013_SP1\"/></soap:Header>\
         <soap:Body><m:CreateItem MessageDisposition=\"SendOnly\"><m:Items><t:Message>\
         <t:MimeContent>SGk=</t:MimeContent></t:Message></m:Items></m:CreateItem></soap:Body></soap:Envelope>"
    );
    let post = |body: String, ct: &'static str| {
        client
            .post(fake.url())
            .basic_auth(USER, Some(PASSWORD))
            .header("content-type", ct)
            .body(body)
            .send()
    };
    let status = |r: reqwest::Result<reqwest::Response>| r.expect("response").status().as_u16();
    assert_eq!(
        status(post(good.clone(), "text/xml; charset=utf-8").await),
        200
    );
    // Other prefixes are fine: only namespaces count.
    let renamed = good.replace("soap:", "s:").replace("xmlns:soap", "xmlns:s");
    assert_eq!(status(post(renamed, "text/xml; charset=utf-8").await), 200);
    // The `https://` namespaces of some doc samples are not EWS's.
    let https = good.replace("http://schemas.microsoft", "https://schemas.microsoft");
    assert_eq!(status(post(https, "text/xml; charset=utf-8").await), 500);
    assert_eq!(
        status(post(good.clone(), "application/soap+xml").await),
        415
    );
    let saved_with_send_only = good.replace(
        "<m:Items>",
        "<m:SavedItemFolderId><t:DistinguishedFolderId Id=\"sentitems\"/></m:SavedItemFolderId><m:Items>",
    );
    assert_eq!(
        status(post(saved_with_send_only, "text/xml; charset=utf-8").await),
        500
    );
    assert_eq!(
        status(
            client
                .get(fake.url())
                .basic_auth(USER, Some(PASSWORD))
                .send()
                .await
        ),
        405
    );
    assert_eq!(status(client.post(fake.url()).body(good).send().await), 401);
    let flagged: Vec<bool> = fake
        .requests()
        .iter()
        .map(|r| !r.problems.is_empty())
        .collect();
    assert_eq!(flagged, [false, false, true, true, true, false, false]);
}

#[tokio::test]
async fn a_display_name_cannot_inject_a_header() {
    // Issue 14: the name decodes to `Ops CRLF Bcc: attacker@evil.test`; the
    // To must be rewritten (other@outside.test is not an envelope recipient).
    let fake = FakeEws::start(FakeAuth::basic(USER, PASSWORD)).await;
    let t = transport(settings(&fake, basic(PASSWORD)));
    let name = B64.encode("Ops\r\nBcc: attacker@evil.test");
    let from_name = B64.encode("Desk@floor2\r\nBcc: attacker2@evil.test");
    let msg = format!(
        "From: =?utf-8?B?{from_name}?= <relay@contoso.com>\r\nTo: =?utf-8?B?{name}?= <ok@example.com>, other@outside.test\r\nSubject: s\r\n\r\nx\r\n"
    );
    let env = envelope(&["ok@example.com"], None);
    delivered(
        &t.deliver(&env, &mailbridge::transport::Body::from(msg.as_bytes()))
            .await,
        1,
    );
    // The From name has an `@`, so it is rewritten too: CR LF gone, quoted.
    assert_eq!(
        fake.requests()[0].mime_text(),
        "From: \"Desk at floor2 Bcc: attacker2 at evil.test\" <relay@contoso.com>\r\nTo: \"Ops Bcc: attacker@evil.test\" <ok@example.com>\r\nSubject: s\r\n\r\nx\r\n"
    );
}

/// A 1 MB message from a spool file: the `MimeContent` is base64 made as
/// the file is read, and EWS gets every byte.
#[tokio::test]
async fn a_spooled_message_streams_into_mime_content() {
    let mut m = MESSAGE.to_vec();
    let mut i = 0u32;
    while m.len() < 1_000_000 {
        m.extend_from_slice(format!(".line {i} \u{e9}\r\n").as_bytes());
        i += 1;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("m.eml");
    std::fs::write(&path, &m).expect("write");
    let body =
        mailbridge::transport::Body::open(std::fs::File::open(&path).expect("open")).expect("head");
    let fake = FakeEws::start(FakeAuth::basic(USER, PASSWORD)).await;
    let t = transport(settings(&fake, basic(PASSWORD)));
    delivered(&t.deliver(&envelope(&rcpts(), None), &body).await, 2);
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 1);
    assert!(reqs[0].problems.is_empty(), "{:?}", reqs[0].problems);
    assert!(reqs[0].mime.as_deref() == Some(&m[..]), "the MIME differs");
}
