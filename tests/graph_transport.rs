//! The Graph transport against the fake Graph: exact request shape, recipients, every documented error, token refresh, national-cloud endpoints, the large-message paths, and the governor keeping the fake's 4-in-flight limit.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use common::fake_graph::{FakeGraph, GraphConfig, Reply};
use mailbridge::common::BoxFuture;
use mailbridge::common::Secret;
use mailbridge::config::LargeMessages;
use mailbridge::oauth::{IdentityTokens, StaticToken, TokenError, TokenSource};
use mailbridge::routing::Router;
use mailbridge::transport::governor::{Governed, Limits};
use mailbridge::transport::graph::{GraphSettings, GraphTransport};
use mailbridge::transport::{Delivery, Enhanced, Envelope, Failure, Scope, Severity, Transport};

const MSG: &str = "From: Help Desk <desk@contoso.com>\r\nTo: Boss <boss@example.com>\r\nSubject: Ticket 42\r\nMessage-ID: <42@desk>\r\n\r\nHello.\r\n";

fn env(rcpts: &[&str]) -> Envelope {
    Envelope {
        id: "q1".into(),
        from: "desk@contoso.com".into(),
        rcpts: rcpts.iter().map(|s| s.to_string()).collect(),
        identity: None,
    }
}

fn token(t: &str) -> Arc<dyn TokenSource> {
    Arc::new(StaticToken {
        token: Secret::new(t),
        identity: "desk@contoso.com".into(),
    })
}

fn settings(fake: &FakeGraph, tokens: Arc<dyn TokenSource>) -> GraphSettings {
    let client = mailbridge::http::client(None, &Default::default(), Duration::from_secs(120))
        .expect("client");
    GraphSettings::new(fake.endpoint(), "desk@contoso.com", tokens, client)
}

fn graph(fake: &FakeGraph) -> GraphTransport {
    GraphTransport::new(settings(fake, token("token-1"))).expect("transport")
}

fn all_ok(d: &Delivery, n: usize) -> bool {
    matches!(d, Ok(v) if v.len() == n && v.iter().all(|r| r.is_ok()))
}

fn err(d: Delivery) -> Failure {
    match d {
        Err(f) => f,
        Ok(v) => panic!("expected a failure, got {v:?}"),
    }
}

#[tokio::test]
async fn send_mail_request_shape() {
    let fake = FakeGraph::start(GraphConfig::default()).await;
    let t = graph(&fake);
    assert!(all_ok(
        &t.deliver(
            &env(&["boss@example.com"]),
            &mailbridge::transport::Body::from(MSG.as_bytes())
        )
        .await,
        1
    ));
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(
        (r.method.as_str(), r.path.as_str()),
        ("POST", "/v1.0/users/desk@contoso.com/sendMail")
    );
    assert_eq!(r.authorization.as_deref(), Some("Bearer token-1"));
    assert_eq!(r.content_type.as_deref(), Some("text/plain"));
    assert_eq!(r.status, 202);
    let sent = fake.sent();
    assert_eq!(sent.len(), 1);
    // The body was the base64 of the message, unchanged (all recipients shown).
    assert_eq!(sent[0].mime.as_deref(), Some(MSG.as_bytes()));
    assert_eq!(sent[0].recipients, ["boss@example.com"]);
    assert!(
        t.describe().contains("/v1.0/users/desk@contoso.com"),
        "{}",
        t.describe()
    );
    assert!(t.probe().await.is_ok());
}

#[tokio::test]
async fn bcc_only_recipients_get_it_hidden_and_header_only_ones_do_not() {
    let fake = FakeGraph::start(GraphConfig::default()).await;
    let t = graph(&fake);
    let d = t
        .deliver(
            &env(&[
                "boss@example.com",
                "audit@example.com",
                "Archive@Example.com",
            ]),
            &mailbridge::transport::Body::from(MSG.as_bytes()),
        )
        .await;
    assert!(all_ok(&d, 3));
    let sent = fake.sent();
    let mime = String::from_utf8(sent[0].mime.clone().unwrap_or_default()).unwrap_or_default();
    assert!(mime.contains("To: Boss <boss@example.com>\r\n"), "{mime}");
    assert!(
        mime.contains("Bcc: audit@example.com, Archive@Example.com\r\n"),
        "{mime}"
    );
    assert_eq!(
        sent[0].recipients,
        [
            "boss@example.com",
            "audit@example.com",
            "archive@example.com"
        ]
    );

    // The app sent the same To: list in one transaction per recipient: Graph
    // must mail only this transaction's recipient.
    let m = "From: desk@contoso.com\r\nTo: a@example.com, b@example.com\r\nBcc: secret@example.com\r\nSubject: s\r\n\r\nx\r\n";
    assert!(all_ok(
        &t.deliver(
            &env(&["b@example.com"]),
            &mailbridge::transport::Body::from(m.as_bytes())
        )
        .await,
        1
    ));
    let sent = fake.sent();
    let mime = String::from_utf8(sent[1].mime.clone().unwrap_or_default()).unwrap_or_default();
    assert_eq!(sent[1].recipients, ["b@example.com"]);
    assert!(
        mime.starts_with("From: desk@contoso.com\r\nTo: b@example.com\r\nSubject: s\r\n\r\n"),
        "{mime}"
    );
}

#[tokio::test]
async fn from_display_name_with_at_is_defused() {
    let fake = FakeGraph::start(GraphConfig::default()).await;
    let t = graph(&fake);
    let m = "From: printer@contoso.com <printer@contoso.com>\r\nTo: a@example.com\r\n\r\nscan\r\n";
    assert!(all_ok(
        &t.deliver(
            &env(&["a@example.com"]),
            &mailbridge::transport::Body::from(m.as_bytes())
        )
        .await,
        1
    ));
    let mime = fake.sent()[0].mime.clone().unwrap_or_default();
    assert!(
        mime.starts_with(b"From: <printer@contoso.com>\r\n"),
        "{}",
        String::from_utf8_lossy(&mime)
    );
}

#[tokio::test]
async fn documented_errors_are_classified_with_the_code_in_the_text() {
    let fake = FakeGraph::start(GraphConfig::default()).await;
    let t = graph(&fake);
    let e = env(&["boss@example.com"]);
    for (reply, code) in [
        (
            Reply::invalid_base64(),
            "400 ErrorMimeContentInvalidBase64String: Invalid base64 string for MIME content.",
        ),
        (
            Reply::send_as_denied(),
            "403 ErrorSendAsDenied: The user account which was used",
        ),
        (Reply::access_denied(), "403 ErrorAccessDenied"),
        (
            Reply::invalid_user(),
            "404 ErrorInvalidUser: The requested user is invalid.",
        ),
        (
            Reply::mailbox_not_enabled(),
            "404 MailboxNotEnabledForRESTAPI",
        ),
        (Reply::size_exceeded(), "400 ErrorMessageSizeExceeded"),
        (
            Reply::new(
                413,
                r#"{"error":{"code":"BadRequest","message":"The maximum request length supported is 4MB."}}"#,
            ),
            "413 BadRequest",
        ),
    ] {
        fake.push(reply);
        let f = err(t
            .deliver(&e, &mailbridge::transport::Body::from(MSG.as_bytes()))
            .await);
        assert_eq!(f.severity, Severity::Permanent, "{f}");
        assert!(!f.fails_over());
        assert!(
            f.text.starts_with(&format!("Graph sendMail: {code}")),
            "{}",
            f.text
        );
    }

    fake.push(Reply::too_many_requests(7));
    let f = err(t
        .deliver(&e, &mailbridge::transport::Body::from(MSG.as_bytes()))
        .await);
    assert_eq!((f.severity, f.fails_over()), (Severity::Transient, false));
    assert_eq!(f.not_before, Some(Duration::from_secs(7)));
    assert!(
        f.text
            .contains("429 TooManyRequests: Please retry again later."),
        "{}",
        f.text
    );

    fake.push(Reply::unavailable(Some("5")));
    let f = err(t
        .deliver(&e, &mailbridge::transport::Body::from(MSG.as_bytes()))
        .await);
    assert!(f.fails_over(), "503 is the server's failure");
    assert_eq!(f.not_before, Some(Duration::from_secs(5)));

    fake.push(Reply::new(504, ""));
    assert!(
        err(t
            .deliver(&e, &mailbridge::transport::Body::from(MSG.as_bytes()))
            .await)
        .fails_over()
    );

    // Any 2xx but 202 is suspicious: retried, not counted as sent.
    fake.push(Reply::new(200, ""));
    let f = err(t
        .deliver(&e, &mailbridge::transport::Body::from(MSG.as_bytes()))
        .await);
    assert_eq!((f.severity, f.fails_over()), (Severity::Transient, false));
    assert!(f.text.contains("200 instead of 202"), "{}", f.text);
    assert!(fake.sent().is_empty());
}

/// Hands out `token-N`, moving to the next one when the current is invalidated.
struct Rotating {
    n: AtomicUsize,
    invalidated: AtomicUsize,
    fail: bool,
}

impl TokenSource for Rotating {
    fn token(&self) -> BoxFuture<'_, Result<Secret, TokenError>> {
        Box::pin(async move {
            if self.fail {
                return Err(TokenError::ReconsentNeeded(
                    "AADSTS70043: the refresh token has expired".into(),
                ));
            }
            Ok(Secret::new(format!(
                "token-{}",
                self.n.load(Ordering::SeqCst)
            )))
        })
    }
    fn invalidate(&self, rejected: &Secret) {
        if rejected.expose() == format!("token-{}", self.n.load(Ordering::SeqCst)) {
            self.n.fetch_add(1, Ordering::SeqCst);
            self.invalidated.fetch_add(1, Ordering::SeqCst);
        }
    }
    fn identity(&self) -> String {
        "desk@contoso.com".into()
    }
}

#[tokio::test]
async fn a_401_refreshes_the_token_once() {
    let fake = FakeGraph::start(GraphConfig::default()).await;
    fake.set_token("token-2");
    let tokens = Arc::new(Rotating {
        n: AtomicUsize::new(1),
        invalidated: AtomicUsize::new(0),
        fail: false,
    });
    let t = GraphTransport::new(settings(&fake, tokens.clone())).expect("transport");
    assert!(all_ok(
        &t.deliver(
            &env(&["boss@example.com"]),
            &mailbridge::transport::Body::from(MSG.as_bytes())
        )
        .await,
        1
    ));
    let statuses: Vec<(u16, Option<String>)> = fake
        .requests()
        .into_iter()
        .map(|r| (r.status, r.authorization))
        .collect();
    assert_eq!(
        statuses,
        [
            (401, Some("Bearer token-1".into())),
            (202, Some("Bearer token-2".into()))
        ]
    );
    assert_eq!(tokens.invalidated.load(Ordering::SeqCst), 1);

    // Refused again after the refresh: a server failure (authentication
    // rejected), tried exactly twice, and no token in the text.
    fake.set_token("nothing-we-have");
    let f = err(t
        .deliver(
            &env(&["boss@example.com"]),
            &mailbridge::transport::Body::from(MSG.as_bytes()),
        )
        .await);
    assert!(f.fails_over(), "{f}");
    assert!(
        f.text.contains("401 InvalidAuthenticationToken"),
        "{}",
        f.text
    );
    assert!(!f.text.contains("token-"), "{}", f.text);
    assert_eq!(fake.requests().len(), 4);

    // No token at all: transient for the message, with the reason.
    let t = GraphTransport::new(settings(
        &fake,
        Arc::new(Rotating {
            n: AtomicUsize::new(1),
            invalidated: AtomicUsize::new(0),
            fail: true,
        }),
    ))
    .expect("transport");
    let f = err(t
        .deliver(
            &env(&["boss@example.com"]),
            &mailbridge::transport::Body::from(MSG.as_bytes()),
        )
        .await);
    assert_eq!((f.severity, f.fails_over()), (Severity::Transient, false));
    assert!(
        f.text.contains("re-consent needed: AADSTS70043"),
        "{}",
        f.text
    );
}

/// Tokens per mailbox: `sales@contoso.com` has its own (the fake accepts
/// one token, so the test checks the source was asked).
struct PerMailbox;

static ASKED: AtomicUsize = AtomicUsize::new(0);

impl IdentityTokens for PerMailbox {
    fn source(&self, identity: &str) -> Arc<dyn TokenSource> {
        assert_eq!(identity, "sales@contoso.com");
        ASKED.fetch_add(1, Ordering::SeqCst);
        token("token-1")
    }
}

#[tokio::test]
async fn national_cloud_endpoints_and_identities() {
    let fake = FakeGraph::start(GraphConfig {
        prefix: "/usgov".into(),
        ..GraphConfig::default()
    })
    .await;
    let mut s = settings(&fake, token("token-1"));
    // Delegated flows: the identity has its own token source.
    s.identity_tokens = Some(Arc::new(PerMailbox));
    let t = GraphTransport::new(s).expect("transport");
    assert!(all_ok(
        &t.deliver(
            &env(&["a@example.com"]),
            &mailbridge::transport::Body::from(MSG.as_bytes())
        )
        .await,
        1
    ));
    let mut e = env(&["a@example.com"]);
    e.identity = Some("sales@contoso.com".into());
    assert!(all_ok(
        &t.deliver(&e, &mailbridge::transport::Body::from(MSG.as_bytes()))
            .await,
        1
    ));
    let paths: Vec<String> = fake.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(
        paths,
        [
            "/usgov/v1.0/users/desk@contoso.com/sendMail",
            "/usgov/v1.0/users/sales@contoso.com/sendMail"
        ]
    );
    assert_eq!(fake.sent()[1].mailbox, "sales@contoso.com");
    assert_eq!(
        ASKED.load(Ordering::SeqCst),
        1,
        "the identity's token source was used"
    );
}

fn big_message(image: &[u8], pdf: &[u8]) -> Vec<u8> {
    let wrap = |b: &[u8]| {
        B64.encode(b)
            .as_bytes()
            .chunks(76)
            .map(|c| format!("{}\r\n", String::from_utf8_lossy(c)))
            .collect::<String>()
    };
    format!(
        "From: Help Desk <desk@contoso.com>\r\nTo: boss@example.com\r\nSubject: Monthly report\r\nX-Ticket: 42\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=OUT\r\n\r\n--OUT\r\nContent-Type: multipart/related; boundary=REL\r\n\r\n--REL\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>See <img src=\"cid:logo@desk\"></p>\r\n--REL\r\nContent-Type: image/png\r\nContent-ID: <logo@desk>\r\nContent-Disposition: inline; filename=logo.png\r\nContent-Transfer-Encoding: base64\r\n\r\n{}--REL--\r\n--OUT\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename=report.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n{}--OUT--\r\n",
        wrap(image),
        wrap(pdf)
    )
    .into_bytes()
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[tokio::test]
async fn large_messages_go_draft_upload_session_send() {
    let fake = FakeGraph::start(GraphConfig::default()).await;
    let t = graph(&fake);
    // 3.5 MB of PDF: over 4 MB after base64, and over the 3 MB single-request limit.
    let image = pattern(20_000, 1);
    let pdf = pattern(3_500_000, 2);
    let m = big_message(&image, &pdf);
    let d = t
        .deliver(
            &env(&["boss@example.com", "hidden@example.com"]),
            &mailbridge::transport::Body::from(&m),
        )
        .await;
    assert!(all_ok(&d, 2), "{d:?}");
    let sent = fake.sent();
    assert_eq!(sent.len(), 1);
    let s = &sent[0];
    let draft = s.draft.clone().unwrap_or_default();
    assert_eq!(draft["subject"], "Monthly report");
    assert_eq!(draft["body"]["contentType"], "HTML");
    assert_eq!(draft["internetMessageHeaders"][0]["value"], "42");
    assert_eq!(s.recipients, ["boss@example.com", "hidden@example.com"]);
    assert_eq!(
        draft["bccRecipients"][0]["emailAddress"]["address"],
        "hidden@example.com"
    );
    assert_eq!(s.attachments.len(), 2);
    let logo = &s.attachments[0];
    assert_eq!(
        (
            logo.name.as_str(),
            logo.inline,
            logo.content_id.as_deref(),
            logo.uploaded
        ),
        ("logo.png", true, Some("logo@desk"), false)
    );
    assert_eq!(logo.bytes, image);
    let report = &s.attachments[1];
    assert_eq!(
        (
            report.name.as_str(),
            report.content_type.as_str(),
            report.uploaded
        ),
        ("report.pdf", "application/pdf", true)
    );
    assert!(report.bytes == pdf, "uploaded bytes differ");

    let reqs = fake.requests();
    let shape: Vec<String> = reqs
        .iter()
        .map(|r| format!("{} {}", r.method, r.path.split('?').next().unwrap_or("")))
        .collect();
    assert_eq!(
        shape,
        [
            "POST /v1.0/users/desk@contoso.com/messages",
            "POST /v1.0/users/desk@contoso.com/messages/AAMkDraft1/attachments",
            "POST /v1.0/users/desk@contoso.com/messages/AAMkDraft1/attachments/createUploadSession",
            "PUT /upload/s2",
            "PUT /upload/s2",
            "POST /v1.0/users/desk@contoso.com/messages/AAMkDraft1/send",
        ]
    );
    let puts: Vec<_> = reqs.iter().filter(|r| r.method == "PUT").collect();
    assert!(
        puts.iter().all(|r| r.authorization.is_none()),
        "no Authorization on the upload URL"
    );
    assert_eq!(
        puts[0].content_range.as_deref(),
        Some("bytes 0-2097151/3500000")
    );
    assert_eq!(
        puts[1].content_range.as_deref(),
        Some("bytes 2097152-3499999/3500000")
    );
    assert!(reqs.iter().all(|r| r.len <= 4 * 1024 * 1024));
    assert_eq!(fake.drafts(), 0);
}

#[tokio::test]
async fn a_failed_large_send_deletes_its_draft_and_leaks_no_token() {
    let fake = FakeGraph::start(GraphConfig::default()).await;
    let mut s = settings(&fake, token("token-1"));
    s.max_request_bytes = 64 * 1024;
    s.upload_chunk_bytes = 16 * 1024;
    let t = GraphTransport::new(s).expect("transport");
    let m = big_message(&pattern(1000, 1), &pattern(100_000, 2));
    fake.push_on("/send", Reply::access_denied());
    let f = err(t
        .deliver(
            &env(&["boss@example.com"]),
            &mailbridge::transport::Body::from(&m),
        )
        .await);
    assert_eq!(f.severity, Severity::Permanent);
    assert!(
        f.text.starts_with("Graph send: 403 ErrorAccessDenied"),
        "{}",
        f.text
    );
    assert_eq!(fake.drafts(), 0, "the draft was deleted");
    let puts = fake.requests().iter().filter(|r| r.method == "PUT").count();
    assert_eq!(puts, 7, "100,000 bytes in 16 KiB chunks");

    // The upload URL's token never shows up in a failure.
    fake.push_on("/createUploadSession", Reply::unavailable(None));
    let f = err(t
        .deliver(
            &env(&["boss@example.com"]),
            &mailbridge::transport::Body::from(&m),
        )
        .await);
    assert!(f.fails_over());
    assert!(!f.text.contains("eyJ0eXAi"), "{}", f.text);
    assert_eq!(fake.drafts(), 0);
}

/// Records what it is asked to deliver.
struct Recorder {
    got: Mutex<Vec<(Vec<String>, usize)>>,
    answer: fn() -> Delivery,
}

impl Transport for Recorder {
    fn describe(&self) -> String {
        "smtp://smtp.office365.com:587".into()
    }
    fn deliver<'a>(
        &'a self,
        env: &'a Envelope,
        message: &'a mailbridge::transport::Body,
    ) -> BoxFuture<'a, Delivery> {
        Box::pin(async move {
            self.got
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((env.rcpts.clone(), message.len() as usize));
            (self.answer)()
        })
    }
    fn probe(&self) -> BoxFuture<'_, Result<(), Failure>> {
        Box::pin(async { Ok(()) })
    }
}

#[tokio::test]
async fn large_messages_can_go_to_the_alternate_instead() {
    let fake = FakeGraph::start(GraphConfig::default()).await;
    let alt = Arc::new(Recorder {
        got: Mutex::new(Vec::new()),
        answer: || Ok(vec![Ok(())]),
    });
    let mut s = settings(&fake, token("token-1"));
    s.large_messages = LargeMessages::Alternate;
    s.max_request_bytes = 64 * 1024;
    let graph: Arc<dyn Transport> = Arc::new(GraphTransport::new(s.clone()).expect("transport"));
    // Graph alone: the message is not for this route.
    let m = big_message(&pattern(1000, 1), &pattern(100_000, 2));
    let f = err(graph
        .deliver(
            &env(&["boss@example.com"]),
            &mailbridge::transport::Body::from(&m),
        )
        .await);
    assert_eq!((f.scope, f.severity), (Scope::Route, Severity::Permanent));
    assert!(
        f.text
            .starts_with("552 5.3.4 message too large for Microsoft Graph"),
        "{}",
        f.text
    );
    assert_eq!(f.enhanced, Some(Enhanced::new(5, 3, 4)));

    // Behind the router: the alternate carries it, and says so; the active
    // route stays the primary.
    let router = Router::new(graph.clone(), Some(alt.clone()));
    let d = router
        .deliver(
            &env(&["boss@example.com"]),
            &mailbridge::transport::Body::from(&m),
        )
        .await;
    assert!(all_ok(&d.result, 1));
    assert_eq!(
        (d.route, d.server.as_str()),
        ("alternate", "smtp://smtp.office365.com:587")
    );
    assert_eq!(router.state().active, "primary");
    assert_eq!(
        alt.got.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        [(vec!["boss@example.com".to_string()], m.len())]
    );
    assert!(fake.requests().is_empty());
    // Small ones still go to Graph.
    let d = router
        .deliver(
            &env(&["boss@example.com"]),
            &mailbridge::transport::Body::from(MSG.as_bytes()),
        )
        .await;
    assert!(all_ok(&d.result, 1));
    assert_eq!(d.route, "primary");
    assert_eq!(fake.sent().len(), 1);

    // The alternate being down: retry later, without switching routes.
    let down = Arc::new(Recorder {
        got: Mutex::new(Vec::new()),
        answer: || Err(Failure::server("connection refused")),
    });
    let router = Router::new(graph.clone(), Some(down));
    let f = err(router
        .deliver(
            &env(&["boss@example.com"]),
            &mailbridge::transport::Body::from(&m),
        )
        .await
        .result);
    assert_eq!((f.severity, f.fails_over()), (Severity::Transient, false));
    assert_eq!(router.state().active, "primary");

    // No alternate: a clear bounce.
    let router = Router::new(graph, None);
    let f = err(router
        .deliver(
            &env(&["boss@example.com"]),
            &mailbridge::transport::Body::from(&m),
        )
        .await
        .result);
    assert_eq!(f.severity, Severity::Permanent);
    assert!(
        f.text
            .starts_with("552 5.3.4 message too large for Microsoft Graph"),
        "{}",
        f.text
    );
}

async fn burst(t: Arc<dyn Transport>, n: usize) -> Vec<Delivery> {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let t = t.clone();
        set.spawn(async move {
            t.deliver(
                &env(&["boss@example.com"]),
                &mailbridge::transport::Body::from(MSG.as_bytes()),
            )
            .await
        });
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        out.push(r.unwrap_or_else(|e| Err(Failure::transient(e.to_string()))));
    }
    out
}

#[tokio::test(start_paused = true)]
async fn the_fake_enforces_four_in_flight_and_the_governor_keeps_to_it() {
    let cfg = GraphConfig {
        latency: (Duration::from_millis(2000), Duration::from_millis(3000)),
        ..GraphConfig::default()
    };
    // Ungoverned: 12 at once provoke 429s.
    let fake = FakeGraph::start(cfg.clone()).await;
    let results = burst(Arc::new(graph(&fake)), 12).await;
    assert_eq!(fake.violations(), 8);
    let throttled = results
        .iter()
        .filter(|r| matches!(r, Err(f) if f.not_before.is_some()))
        .count();
    assert_eq!(throttled, 8);

    // Governed: never more than 4, no 429, everything delivered.
    let fake = FakeGraph::start(cfg).await;
    let governed: Arc<dyn Transport> = Arc::new(Governed::new(
        Arc::new(graph(&fake)),
        Limits::graph(4, "desk@contoso.com"),
    ));
    let t0 = tokio::time::Instant::now();
    let results = burst(governed, 40).await;
    assert!(results.iter().all(|r| all_ok(r, 1)));
    assert_eq!(
        (fake.violations(), fake.peak(), fake.sent().len()),
        (0, 4, 40)
    );
    // 40 messages at 2–3 s, 4 at a time: about 40·2.5/4 = 25 s.
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_secs(20) && took <= Duration::from_secs(30),
        "{took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_429_pauses_the_mailbox_for_retry_after() {
    let fake = FakeGraph::start(GraphConfig {
        latency: (Duration::from_millis(100), Duration::from_millis(100)),
        ..GraphConfig::default()
    })
    .await;
    fake.push(Reply::too_many_requests(30));
    let governed = Arc::new(Governed::new(
        Arc::new(graph(&fake)),
        Limits::graph(1, "desk@contoso.com"),
    ));
    let t0 = tokio::time::Instant::now();
    let results = burst(governed.clone(), 5).await;
    // The throttled message was held and retried: everything is delivered.
    assert!(results.iter().all(|r| all_ok(r, 1)), "{results:?}");
    let sent = fake.sent();
    assert_eq!(sent.len(), 5);
    // Nobody was sent before the 30 s pause ended.
    assert!(
        sent.iter()
            .all(|s| s.arrived - t0 >= Duration::from_secs(30)),
        "{:?}",
        sent.iter().map(|s| s.arrived - t0).collect::<Vec<_>>()
    );
    assert_eq!(
        fake.requests().len(),
        6,
        "no retry storm: one request per message and one retry for the throttled one"
    );
    assert_eq!(governed.governor().stats().throttled, 1);
}

#[tokio::test]
async fn network_failures_are_server_failures() {
    let fake = FakeGraph::start(GraphConfig::default()).await;
    let t = graph(&fake);
    drop(fake);
    tokio::task::yield_now().await;
    let f = err(t
        .deliver(
            &env(&["boss@example.com"]),
            &mailbridge::transport::Body::from(MSG.as_bytes()),
        )
        .await);
    assert!(f.fails_over(), "{f}");
    assert!(t.probe().await.is_err());
}

#[tokio::test(start_paused = true)]
async fn the_governor_keeps_to_the_upload_budget_the_fake_enforces() {
    let span = Duration::from_secs(300);
    let cfg = GraphConfig {
        upload_budget: Some((1_000_000, span)),
        ..GraphConfig::default()
    };
    let body = "x".repeat(200_000);
    let message = format!("{MSG}{body}\r\n");
    let send = |t: Arc<dyn Transport>, n: usize| {
        let message = message.clone();
        async move {
            let mut out = Vec::new();
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..n {
                let (t, m) = (t.clone(), message.clone());
                set.spawn(async move {
                    t.deliver(
                        &env(&["boss@example.com"]),
                        &mailbridge::transport::Body::from(m.as_bytes()),
                    )
                    .await
                });
            }
            while let Some(r) = set.join_next().await {
                out.push(r.expect("task"));
            }
            out
        }
    };
    // Without the byte budget the fake answers 429 past 1 MB.
    let fake = FakeGraph::start(cfg.clone()).await;
    let plain: Arc<dyn Transport> = Arc::new(Governed::new(
        Arc::new(graph(&fake)),
        Limits {
            bytes_budget: None,
            hold_retries: 0,
            ..Limits::graph(4, "desk@contoso.com")
        },
    ));
    let _ = send(plain, 8).await;
    assert!(fake.requests().iter().any(|r| r.status == 429));

    // With it: no 429, and never more than 1 MB in any 5 minutes.
    let fake = FakeGraph::start(cfg).await;
    let limits = Limits {
        bytes_budget: Some((1_000_000, span)),
        ..Limits::graph(4, "desk@contoso.com")
    };
    let governed: Arc<dyn Transport> = Arc::new(Governed::new(Arc::new(graph(&fake)), limits));
    let t0 = tokio::time::Instant::now();
    let results = send(governed, 8).await;
    assert!(results.iter().all(|r| all_ok(r, 1)), "{results:?}");
    assert!(fake.requests().iter().all(|r| r.status == 202));
    let sent = fake.sent();
    assert_eq!(sent.len(), 8);
    // ~270 KB each: three per window.
    let at: Vec<u64> = sent.iter().map(|s| (s.arrived - t0).as_secs()).collect();
    assert!(at.iter().filter(|s| **s < 300).count() <= 3, "{at:?}");
    assert!(*at.iter().max().unwrap() >= 600, "{at:?}");
}

/// The header-injection attack of issue 14: an RFC 2047 display name that
/// decodes to `Ops CRLF Bcc: attacker@evil.test`, in a `To:` that must be
/// rewritten (it names someone outside the envelope).
fn injection_message() -> String {
    let name = B64.encode("Ops\r\nBcc: attacker@evil.test");
    format!(
        "From: =?utf-8?B?{}?= <desk@contoso.com>\r\nTo: =?utf-8?B?{name}?= <ok@example.com>, other@outside.test\r\nSubject: s\r\n\r\nx\r\n",
        B64.encode("Desk\r\nBcc: attacker2@evil.test")
    )
}

#[tokio::test]
async fn a_display_name_cannot_inject_a_header() {
    let fake = FakeGraph::start(GraphConfig::default()).await;
    let t = graph(&fake);
    let m = injection_message();
    assert!(all_ok(
        &t.deliver(
            &env(&["ok@example.com"]),
            &mailbridge::transport::Body::from(m.as_bytes())
        )
        .await,
        1
    ));
    let sent = fake.sent();
    let mime = String::from_utf8(sent[0].mime.clone().unwrap_or_default()).unwrap_or_default();
    // Both rewritten (the From name has an `@`): the names' CR LF became a
    // space, so each field stays one line.
    assert_eq!(
        mime,
        "From: \"Desk Bcc: attacker2 at evil.test\" <desk@contoso.com>\r\nTo: \"Ops Bcc: attacker@evil.test\" <ok@example.com>\r\nSubject: s\r\n\r\nx\r\n"
    );
    assert_eq!(sent[0].recipients, ["ok@example.com"]);
}

/// A 2 MB message from a spool file goes to `sendMail` base64-encoded as
/// it is read, and again whole after a `401` (a new stream per request).
#[tokio::test]
async fn a_spooled_message_is_streamed_and_streamed_again_after_a_401() {
    let mut m = MSG.replace("Hello.\r\n", "").into_bytes();
    let mut i = 0u32;
    while m.len() < 2_000_000 {
        m.extend_from_slice(format!(".line {i} \u{e9}\r\n").as_bytes());
        i += 1;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("m.eml");
    std::fs::write(&path, &m).expect("write");
    let body =
        mailbridge::transport::Body::open(std::fs::File::open(&path).expect("open")).expect("head");
    let fake = FakeGraph::start(GraphConfig::default()).await;
    fake.set_token("token-2");
    let tokens = Arc::new(Rotating {
        n: AtomicUsize::new(1),
        invalidated: AtomicUsize::new(0),
        fail: false,
    });
    let t = GraphTransport::new(settings(&fake, tokens)).expect("transport");
    assert!(all_ok(
        &t.deliver(&env(&["boss@example.com"]), &body).await,
        1
    ));
    let statuses: Vec<u16> = fake.requests().into_iter().map(|r| r.status).collect();
    assert_eq!(statuses, [401, 202]);
    let sent = fake.sent();
    assert_eq!(sent.len(), 1);
    assert!(sent[0].mime.as_deref() == Some(&m[..]), "the MIME differs");
    assert!(t.request_bytes(&body) >= m.len() as u64 / 3 * 4);
}
