//! SASL framing and AUTH reply classification on the SMTP transport against fakes: RFC 4954 two-step AUTH for long initial responses, OAUTHBEARER (RFC 7628) when XOAUTH2 is not offered, protocol errors never read as a rejected token, and one coalesced refresh for concurrent rejections.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use common::fake_oauth::{FakeOAuth, LogCapture, Shape, oauth_config};
use common::fake_smtp::{FakeConfig, FakeSmtp, Fault, Stage, XOAuth2Style};
use mailbridge::common::Secret;
use mailbridge::config::HostPort;
use mailbridge::oauth::flows::Settings;
use mailbridge::oauth::store::{StoredGrant, TokenStore};
use mailbridge::oauth::{IdentityTokens, Registry};
use mailbridge::transport::smtp::{SmtpAuth, SmtpSettings, SmtpTransport};
use mailbridge::transport::{Delivery, Envelope, Failure, Transport};

const USER: &str = "user@contoso.com";
const MESSAGE: &[u8] =
    b"From: user@contoso.com\r\nTo: b@example.com\r\nSubject: hi\r\n\r\nHello.\r\n";

struct Setup {
    oauth: Arc<FakeOAuth>,
    fake: FakeSmtp,
    reg: Arc<Registry>,
    _dir: tempfile::TempDir,
}

/// A fake OAuth server, a fake SMTP server offering `mechs` that accepts its
/// tokens and refuses command lines over 512 octets (as Dovecot does), and a
/// registry signed in as [`USER`].
async fn setup(mechs: &[&str], rt: &str, tweak: impl FnOnce(FakeConfig) -> FakeConfig) -> Setup {
    let oauth = Arc::new(FakeOAuth::start(Shape::Entra).await);
    let o = oauth.clone();
    let config = FakeConfig::default()
        .xoauth2(
            XOAuth2Style::Gmail,
            Arc::new(move |u, t| o.valid_token(&u.to_ascii_lowercase(), t)),
        )
        .mechanisms(mechs)
        .max_command_line(512);
    let fake = FakeSmtp::start(tweak(config)).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = oauth_config(
        dir.path(),
        &oauth,
        fake.addr(),
        "authorization_code",
        "127.0.0.1:1",
        "",
    );
    let settings = Settings::from_upstream(&cfg, &cfg.upstream).unwrap();
    oauth.add_refresh_token(USER, rt);
    TokenStore::new(settings.store.clone())
        .put(
            USER,
            StoredGrant {
                refresh_token: Secret::new(rt),
                ..StoredGrant::default()
            },
        )
        .unwrap();
    let reg = Registry::new(settings).unwrap();
    Setup {
        oauth,
        fake,
        reg,
        _dir: dir,
    }
}

fn transport(server: SocketAddr, registry: &Arc<Registry>) -> SmtpTransport {
    SmtpTransport::new(SmtpSettings {
        server: HostPort {
            host: "127.0.0.1".into(),
            port: server.port(),
        },
        implicit_tls: false,
        starttls: false,
        ca_file: None,
        auth: SmtpAuth::XOAuth2 {
            user: USER.into(),
            tokens: registry.source(""),
            identities: Some(registry.clone()),
        },
        hostname: "relay.test".into(),
        timeout: Duration::from_secs(5),
    })
    .unwrap()
}

fn envelope() -> Envelope {
    Envelope {
        id: "q1".into(),
        from: USER.into(),
        rcpts: vec!["b@example.com".into()],
        identity: None,
    }
}

fn delivered(d: &Delivery) -> bool {
    matches!(d, Ok(r) if r.iter().all(Result::is_ok))
}

fn whole_failure(d: Delivery) -> Failure {
    match d {
        Err(f) => f,
        Ok(r) => panic!("expected a failure, got {r:?}"),
    }
}

fn auth_lines(fake: &FakeSmtp) -> Vec<String> {
    fake.commands()
        .into_iter()
        .filter(|c| c.starts_with("AUTH "))
        .collect()
}

#[tokio::test]
async fn long_tokens_go_after_the_334_short_ones_inline() {
    for mech in ["XOAUTH2", "OAUTHBEARER"] {
        let s = setup(&[mech], "rt-sasl-long-01", |c| c).await;
        let t = transport(s.fake.addr(), &s.reg);
        // Short token: one line.
        let d = t
            .deliver(&envelope(), &mailbridge::transport::Body::from(MESSAGE))
            .await;
        assert!(delivered(&d), "{mech}: {d:?}");
        let auths = auth_lines(&s.fake);
        assert_eq!(auths.len(), 1);
        assert!(
            auths[0].starts_with(&format!("AUTH {mech} ")),
            "{}",
            auths[0]
        );
        assert!(auths[0].len() + 2 <= 512);
        // A token that makes the line too long (Entra JWTs often do): the
        // response goes after the server's 334, and Dovecot-style 500 Line
        // too long never happens.
        s.oauth.set(|st| st.token_len = 1500);
        s.oauth.expire_access_tokens();
        s.fake.drop_connections().await;
        let before = s.fake.commands().len();
        let d = t
            .deliver(&envelope(), &mailbridge::transport::Body::from(MESSAGE))
            .await;
        assert!(delivered(&d), "{mech}: {d:?}");
        let cmds = s.fake.commands()[before..].to_vec();
        let i = cmds
            .iter()
            .position(|c| c == &format!("AUTH {mech}"))
            .unwrap_or_else(|| panic!("{mech}: {cmds:?}"));
        // The first connection offered the stale token (rejected), the
        // second a fresh long one: both two-step.
        assert!(cmds[i + 1].len() > 1500, "{mech}: {:?}", &cmds[i + 1][..40]);
        assert!(B64.decode(&cmds[i + 1]).is_ok());
        assert!(
            cmds.iter()
                .filter(|c| c.starts_with("AUTH "))
                .all(|c| c.len() + 2 <= 512),
            "{mech}: an AUTH line over 512 octets"
        );
        assert_eq!(s.fake.messages().len(), 2);
        assert_eq!(
            s.fake.messages()[1].auth,
            Some((USER.to_string(), mech.to_string()))
        );
    }
}

#[tokio::test]
async fn oauthbearer_only_when_xoauth2_is_not_offered() {
    // Both offered: XOAUTH2 (Microsoft supports nothing else).
    let s = setup(&["XOAUTH2", "OAUTHBEARER"], "rt-sasl-pick-02", |c| c).await;
    let d = transport(s.fake.addr(), &s.reg)
        .deliver(&envelope(), &mailbridge::transport::Body::from(MESSAGE))
        .await;
    assert!(delivered(&d), "{d:?}");
    assert_eq!(s.fake.messages()[0].auth.as_ref().unwrap().1, "XOAUTH2");
    // Only OAUTHBEARER: the gs2 header and host/port key-values.
    let s = setup(&["OAUTHBEARER"], "rt-sasl-pick-03", |c| c).await;
    let d = transport(s.fake.addr(), &s.reg)
        .deliver(&envelope(), &mailbridge::transport::Body::from(MESSAGE))
        .await;
    assert!(delivered(&d), "{d:?}");
    assert_eq!(s.fake.messages()[0].auth.as_ref().unwrap().1, "OAUTHBEARER");
    let ir = auth_lines(&s.fake)[0]["AUTH OAUTHBEARER ".len()..].to_string();
    let raw = String::from_utf8(B64.decode(ir).unwrap()).unwrap();
    let port = s.fake.addr().port();
    assert!(
        raw.starts_with(&format!(
            "n,a={USER},\x01host=127.0.0.1\x01port={port}\x01auth=Bearer at-"
        )),
        "{raw:?}"
    );
    // Neither: a server failure that says so, before any token is sent.
    let s = setup(&["PLAIN", "LOGIN"], "rt-sasl-pick-04", |c| c).await;
    let f = whole_failure(
        transport(s.fake.addr(), &s.reg)
            .deliver(&envelope(), &mailbridge::transport::Body::from(MESSAGE))
            .await,
    );
    assert!(
        f.fails_over() && f.text.contains("OAUTHBEARER"),
        "{}",
        f.text
    );
    assert!(auth_lines(&s.fake).is_empty());
}

#[tokio::test]
async fn oauthbearer_error_challenge_gets_the_dummy_response_then_one_refresh() {
    let (logs, _guard) = LogCapture::start();
    let s = setup(&["OAUTHBEARER"], "rt-sasl-chal-05", |c| c).await;
    let t = transport(s.fake.addr(), &s.reg);
    assert!(delivered(
        &t.deliver(&envelope(), &mailbridge::transport::Body::from(MESSAGE))
            .await
    ));
    assert_eq!(s.oauth.calls("refresh_token"), 1);
    s.oauth.expire_access_tokens();
    s.fake.drop_connections().await;
    let before = s.fake.commands().len();
    let d = t
        .deliver(&envelope(), &mailbridge::transport::Body::from(MESSAGE))
        .await;
    assert!(delivered(&d), "{d:?}");
    let cmds = s.fake.commands()[before..].to_vec();
    // The stale token drew the 334 JSON challenge; we answered %x01.
    let i = cmds
        .iter()
        .position(|c| c.starts_with("AUTH OAUTHBEARER "))
        .unwrap();
    assert_eq!(cmds[i + 1], "AQ==", "{cmds:?}");
    assert_eq!(s.oauth.calls("refresh_token"), 2);
    let mut secrets = s.oauth.secrets();
    secrets.push("rt-sasl-chal-05".into());
    logs.assert_clean(&secrets, &[]);
}

#[tokio::test]
async fn protocol_errors_are_not_token_rejections() {
    for reply in [
        "500 5.5.2 Line too long",
        "501 5.5.4 Syntax error in parameters",
        "502 5.5.1 Command not implemented",
        "504 5.5.4 Unrecognized authentication type",
    ] {
        let s = setup(&["XOAUTH2"], "rt-sasl-proto-06", |c| {
            c.fault(Stage::Auth, Fault::reply(reply))
        })
        .await;
        let t = transport(s.fake.addr(), &s.reg);
        let f = whole_failure(
            t.deliver(&envelope(), &mailbridge::transport::Body::from(MESSAGE))
                .await,
        );
        // One AUTH, no forced refresh, no retry: a new token would not help.
        assert_eq!(auth_lines(&s.fake).len(), 1, "{reply}");
        assert_eq!(s.oauth.calls("refresh_token"), 1, "{reply}");
        assert!(f.fails_over(), "{reply}: {f:?}");
        assert!(
            f.text.contains("protocol error") && f.text.contains(&reply[..3]),
            "{}",
            f.text
        );
        assert!(!f.text.contains("rejected the OAuth token"), "{}", f.text);
        // The token is still good: the next attempt uses it without a refresh.
        s.fake.clear_faults();
        assert!(delivered(
            &t.deliver(&envelope(), &mailbridge::transport::Body::from(MESSAGE))
                .await
        ));
        assert_eq!(s.oauth.calls("refresh_token"), 1, "{reply}");
    }
    // 454: temporary, no refresh either.
    let s = setup(&["XOAUTH2"], "rt-sasl-proto-07", |c| {
        c.fault(
            Stage::Auth,
            Fault::reply("454 4.7.0 Temporary authentication failure"),
        )
    })
    .await;
    let f = whole_failure(
        transport(s.fake.addr(), &s.reg)
            .deliver(&envelope(), &mailbridge::transport::Body::from(MESSAGE))
            .await,
    );
    assert_eq!(f.severity, mailbridge::transport::Severity::Transient);
    assert!(
        f.text.contains("temporary") && f.text.contains("454"),
        "{}",
        f.text
    );
    assert_eq!(s.oauth.calls("refresh_token"), 1);
    assert_eq!(auth_lines(&s.fake).len(), 1);
}

#[tokio::test]
async fn rejected_twice_marks_the_identity_and_concurrent_rejections_refresh_once() {
    let s = setup(&["XOAUTH2"], "rt-sasl-conc-08", |c| c).await;
    let t = Arc::new(transport(s.fake.addr(), &s.reg));
    assert!(delivered(
        &t.deliver(&envelope(), &mailbridge::transport::Body::from(MESSAGE))
            .await
    ));
    assert_eq!(s.oauth.calls("refresh_token"), 1);
    // The upstream revokes the token: eight attempts at once all fail with
    // it; only the first invalidation drops it, so there is one refresh.
    s.oauth.expire_access_tokens();
    s.fake.drop_connections().await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let t = t.clone();
        tasks.push(tokio::spawn(async move {
            t.deliver(&envelope(), &mailbridge::transport::Body::from(MESSAGE))
                .await
        }));
    }
    for task in tasks {
        let d = task.await.unwrap();
        assert!(delivered(&d), "{d:?}");
    }
    assert_eq!(
        s.oauth.calls("refresh_token"),
        2,
        "one forced refresh for all eight"
    );
    // Rejected again right after the refresh: the identity's state says so.
    s.fake.drop_connections().await;
    s.fake.set_fault(
        Stage::Auth,
        Fault::reply("535 5.7.8 Authentication failed."),
    );
    s.oauth.expire_access_tokens();
    let f = whole_failure(
        t.deliver(&envelope(), &mailbridge::transport::Body::from(MESSAGE))
            .await,
    );
    assert!(f.text.contains("rejected the OAuth token"), "{}", f.text);
    assert_eq!(s.oauth.calls("refresh_token"), 3);
    let status = s.reg.manager("").status();
    assert_eq!(status["state"], "reconsent_needed", "{status}");
    assert!(
        status["last_error"].as_str().unwrap().contains("twice"),
        "{status}"
    );
}
