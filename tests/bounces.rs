//! Bounces that get delivered: against fakes that enforce Exchange's send-as rule (Graph 403 `ErrorSendAsDenied`, EWS `ErrorSendAsDenied`, Exchange Online SMTP `554 5.2.0 …SendAsDenied`), a message the mailbox may not send becomes a DSN from the mailbox itself, which the fake accepts, carrying the upstream's status.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::fake_ews::{FakeAuth, FakeEws};
use common::fake_graph::{FakeGraph, GraphConfig};
use common::fake_smtp::{FakeConfig, FakeSmtp, SEND_AS_DENIED, Security};
use mailbridge::common::Secret;
use mailbridge::config::{HostPort, Proxy};
use mailbridge::oauth::StaticToken;
use mailbridge::routing::Router;
use mailbridge::scheduler::{Policy, Scheduler};
use mailbridge::spool::{Meta, Spool};
use mailbridge::transport::Transport;
use tokio_util::sync::CancellationToken;

const MAILBOX: &str = "desk@contoso.com";
const PASSWORD: &str = "S3cret-Pa55word!";
/// From an application that is not the mailbox: Exchange refuses to send it.
const ORIGINAL: &[u8] = b"From: Legacy App <app@legacy.local>\r\nTo: boss@example.com\r\nSubject: Invoice 7\r\nMessage-ID: <7@legacy>\r\n\r\nHello.\r\n";

fn policy() -> Policy {
    Policy {
        retry_initial: Duration::from_secs(60),
        retry_max: Duration::from_secs(600),
        give_up_after: Duration::from_secs(86_400),
        concurrency: 2,
        hostname: "relay.test".into(),
        sender_name: String::new(),
        reply_to: String::new(),
        identities: Default::default(),
        dsn: mailbridge::scheduler::dsn_policy::DsnPolicy::any(),
        dsn_from: MAILBOX.into(),
        dsn_from_name: "Mail Delivery System".into(),
    }
}

/// Queue `ORIGINAL` from app@legacy.local through `t` and wait until the
/// queue is empty (the message bounced, its DSN went out) or a DSN is stuck.
async fn bounce_through(t: Arc<dyn Transport>) -> (Scheduler, tempfile::TempDir, bool) {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), 100).unwrap();
    let spool = Arc::new(spool);
    let stop = CancellationToken::new();
    let (s, _task) = Scheduler::start(
        spool.clone(),
        Arc::new(Router::new(t, None)),
        policy(),
        stop.clone(),
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let meta = Meta::new(
        "b1".into(),
        "app@legacy.local".into(),
        vec!["boss@example.com".into()],
        ORIGINAL.len() as u64,
        now,
    );
    spool.store(&meta, ORIGINAL).unwrap();
    s.enqueue(meta);
    for _ in 0..500 {
        if spool.is_empty() || s.stats().bounce_undeliverable > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    let empty = spool.is_empty();
    (s, dir, empty)
}

/// The DSN as the fake received it: from the mailbox, to the original
/// sender, with `status` and the upstream's answer.
fn assert_dsn(dsn: &[u8], status: &str, diagnostic: &str) {
    let text = String::from_utf8_lossy(dsn);
    assert_eq!(
        common::header_from(dsn).as_deref(),
        Some(MAILBOX),
        "From: is the sending mailbox\n{text}"
    );
    assert!(
        text.contains("\"Mail Delivery System\" <desk@contoso.com>"),
        "{text}"
    );
    assert!(text.contains("To: <app@legacy.local>\r\n"), "{text}");
    assert!(
        text.contains("Content-Type: multipart/report; report-type=delivery-status;"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "Final-Recipient: rfc822; boss@example.com\r\nAction: failed\r\nStatus: {status}\r\nDiagnostic-Code: {diagnostic}"
        )),
        "{text}"
    );
    assert!(text.contains("Subject: Invoice 7\r\n"), "{text}");
}

#[tokio::test]
async fn graph_send_as_denied_bounces_from_the_mailbox() {
    let fake = FakeGraph::start(GraphConfig {
        strict_send_as: true,
        ..GraphConfig::default()
    })
    .await;
    let client = mailbridge::http::client(None, &Default::default(), Duration::from_secs(10))
        .expect("client");
    let tokens = Arc::new(StaticToken {
        token: Secret::new("token-1"),
        identity: MAILBOX.into(),
    });
    let settings =
        mailbridge::transport::graph::GraphSettings::new(fake.endpoint(), MAILBOX, tokens, client);
    let t = Arc::new(mailbridge::transport::graph::GraphTransport::new(settings).unwrap());
    let (_s, _dir, empty) = bounce_through(t).await;
    assert!(empty, "the DSN was accepted: nothing is left in the queue");
    let sent = fake.sent();
    assert_eq!(sent.len(), 1, "only the DSN got out");
    assert_eq!(sent[0].recipients, ["app@legacy.local"]);
    assert_dsn(
        sent[0].mime.as_deref().unwrap(),
        "5.7.1",
        "X-mailbridge; Graph sendMail: 403 ErrorSendAsDenied",
    );
}

#[tokio::test]
async fn ews_send_as_denied_bounces_from_the_mailbox() {
    use mailbridge::transport::ews::{DEFAULT_SERVER_VERSION, EwsAuth, EwsSettings, EwsTransport};
    let fake = FakeEws::start(FakeAuth::basic(MAILBOX, PASSWORD)).await;
    fake.strict_send_as(Some(MAILBOX));
    let t = Arc::new(
        EwsTransport::new(EwsSettings {
            connect_url: fake.url(),
            auth: EwsAuth::Basic {
                username: MAILBOX.into(),
                password: Secret::new(PASSWORD),
            },
            impersonate: false,
            mailbox: MAILBOX.into(),
            save_to_sent_items: true,
            server_version: DEFAULT_SERVER_VERSION.into(),
            ca_file: None,
            proxy: Proxy::default(),
            timeout: Duration::from_secs(10),
        })
        .unwrap(),
    );
    let (_s, _dir, empty) = bounce_through(t).await;
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 2, "the original, then its DSN");
    assert_eq!(reqs[0].status, 200);
    assert!(reqs[0].body.contains("MimeContent"));
    let dsn = reqs[1].mime.as_deref().expect("the DSN's MIME");
    assert_dsn(dsn, "5.7.1", "X-mailbridge; EWS 127.0.0.1:");
    assert!(String::from_utf8_lossy(dsn).contains(": ErrorSendAsDenied: The user account"));
    assert!(empty, "the DSN was accepted: nothing is left in the queue");
}

#[tokio::test]
async fn exchange_online_smtp_send_as_denied_bounces_from_the_mailbox() {
    use mailbridge::transport::smtp::{SmtpAuth, SmtpSettings, SmtpTransport};
    let mut cfg = FakeConfig::default()
        .security(Security::Plain)
        .auth(MAILBOX, PASSWORD);
    cfg.strict_send_as = true;
    let fake = FakeSmtp::start(cfg).await;
    let t = Arc::new(
        SmtpTransport::new(SmtpSettings {
            server: HostPort {
                host: "127.0.0.1".into(),
                port: fake.addr().port(),
            },
            implicit_tls: false,
            starttls: false,
            ca_file: None,
            auth: SmtpAuth::Basic {
                username: MAILBOX.into(),
                password: Secret::new(PASSWORD),
            },
            hostname: "relay.test".into(),
            timeout: Duration::from_secs(10),
        })
        .unwrap(),
    );
    let (_s, _dir, empty) = bounce_through(t).await;
    assert!(empty, "the DSN was accepted: nothing is left in the queue");
    let tx = fake.transactions();
    assert_eq!(tx.len(), 2, "the original, then its DSN");
    assert!(!tx[0].accepted);
    assert!(tx[1].accepted, "the DSN was accepted");
    assert_eq!(tx[1].from, "", "null envelope sender");
    assert_eq!(tx[1].rcpts, ["app@legacy.local"]);
    let reply = SEND_AS_DENIED;
    assert_dsn(&tx[1].data, "5.2.0", &format!("smtp; {reply}"));
}

#[tokio::test]
async fn a_dsn_the_upstream_refuses_too_stays_visible() {
    // The mailbox itself is refused (as if it lost its licence): the DSN
    // fails too and is kept, not dropped.
    let fake = FakeGraph::start(GraphConfig {
        strict_send_as: true,
        ..GraphConfig::default()
    })
    .await;
    let client = mailbridge::http::client(None, &Default::default(), Duration::from_secs(10))
        .expect("client");
    let tokens = Arc::new(StaticToken {
        token: Secret::new("token-1"),
        identity: MAILBOX.into(),
    });
    // The transport sends as another mailbox than the DSN's From: names.
    let settings = mailbridge::transport::graph::GraphSettings::new(
        fake.endpoint(),
        "other@contoso.com",
        tokens,
        client,
    );
    let t = Arc::new(mailbridge::transport::graph::GraphTransport::new(settings).unwrap());
    let (s, dir, empty) = bounce_through(t).await;
    assert!(!empty);
    assert!(fake.sent().is_empty());
    assert_eq!(s.stats().bounce_undeliverable, 1);
    let on_disk = Spool::list(dir.path()).unwrap();
    assert_eq!(on_disk.len(), 1);
    assert_eq!(on_disk[0].state(), "bounce_undeliverable");
    assert!(on_disk[0].is_dsn);
}
