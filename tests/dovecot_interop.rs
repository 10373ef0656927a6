//! Delivery through a real Dovecot 2.3 submission server (`passdb oauth2`, tokens checked by introspection at the in-repo fake token endpoint): XOAUTH2 and OAUTHBEARER, STARTTLS and implicit TLS, tokens from each flow (authorization code, device code, client credentials), tokens revoked between batches (refresh and retry), and tokens long enough to need RFC 4954's two-step AUTH.
//!
//! Skips with a message when Dovecot is not installed, unless
//! `MAILBRIDGE_REQUIRE_TOOLS` is set (CI), where it fails.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::fake_oauth::{DeviceStep, FakeOAuth, Shape, oauth_config};
use common::fake_smtp::{FakeConfig, FakeSmtp};
use common::real::{DOVECOT, Dovecot, have};
use mailbridge::common::Secret;
use mailbridge::config::HostPort;
use mailbridge::oauth::flows::Settings;
use mailbridge::oauth::store::{StoredGrant, TokenStore};
use mailbridge::oauth::{IdentityTokens, Registry};
use mailbridge::transport::smtp::{SmtpAuth, SmtpSettings, SmtpTransport};
use mailbridge::transport::{Envelope, Transport};

const USER: &str = "user@contoso.com";

fn transport(
    server: SocketAddr,
    implicit_tls: bool,
    ca: &std::path::Path,
    reg: &Arc<Registry>,
) -> SmtpTransport {
    SmtpTransport::new(SmtpSettings {
        server: HostPort {
            host: "127.0.0.1".into(),
            port: server.port(),
        },
        implicit_tls,
        starttls: !implicit_tls,
        ca_file: Some(ca.to_path_buf()),
        auth: SmtpAuth::XOAuth2 {
            user: USER.into(),
            tokens: reg.source(""),
            identities: Some(reg.clone()),
        },
        hostname: "relay.test".into(),
        timeout: Duration::from_secs(10),
    })
    .unwrap()
}

/// Deliver `n` messages tagged `tag` through a new transport (so no pooled,
/// already authenticated connection hides a stale token).
async fn batch(t: &SmtpTransport, tag: &str, n: usize, dovecot: &Dovecot) {
    for i in 0..n {
        let env = Envelope {
            id: format!("{tag}-{i}"),
            from: USER.into(),
            rcpts: vec!["b@example.org".into()],
            identity: None,
        };
        let msg = format!(
            "From: {USER}\r\nTo: b@example.org\r\nSubject: {tag} {i}\r\n\r\nHello through Dovecot.\r\n"
        );
        let d = t
            .deliver(&env, &mailbridge::transport::Body::from(msg.as_bytes()))
            .await;
        assert!(
            matches!(&d, Ok(r) if r.iter().all(Result::is_ok)),
            "{tag} {i}: {d:?}\ndovecot log:\n{}",
            dovecot.log()
        );
    }
}

/// Every flow, both TLS modes, three batches: fresh token, revoked token
/// (Dovecot's challenge, refresh, retry), revoked again with a long token.
async fn exercise(mechanisms: &str, method: &str) {
    if !have(DOVECOT, "--version") {
        return;
    }
    let sink = FakeSmtp::start(FakeConfig::default()).await;
    for flow in ["authorization_code", "device_code", "client_credentials"] {
        let oauth = Arc::new(FakeOAuth::start(Shape::Entra).await);
        oauth.set(|s| s.app_email = USER.into());
        let dovecot = Dovecot::start(mechanisms, &oauth.introspect_url(), sink.addr());
        let dir = tempfile::tempdir().unwrap();
        let cfg = oauth_config(
            dir.path(),
            &oauth,
            dovecot.submission,
            flow,
            "127.0.0.1:1",
            "",
        );
        let settings = Settings::from_upstream(&cfg, &cfg.upstream).unwrap();
        if flow == "authorization_code" {
            oauth.add_refresh_token(USER, "rt-dovecot-1");
            TokenStore::new(settings.store.clone())
                .put(
                    USER,
                    StoredGrant {
                        refresh_token: Secret::new("rt-dovecot-1"),
                        ..StoredGrant::default()
                    },
                )
                .unwrap();
        }
        let reg = Registry::new(settings).unwrap();
        if flow == "device_code" {
            // The user approves at once; poll without the provider's 5 s wait.
            oauth.set(|s| s.device_script = vec![DeviceStep::Approve(USER.into())]);
            let mut d = reg.client().device_authorization().await.unwrap();
            d.interval = Duration::from_millis(10);
            let grant = reg.client().poll_device(&d).await.unwrap();
            reg.manager("").complete_login(grant).await;
        }
        let grant = if flow == "client_credentials" {
            "client_credentials"
        } else {
            "refresh_token"
        };
        for (addr, implicit) in [(dovecot.submission, false), (dovecot.submissions, true)] {
            let tag = format!("{flow}-{}", if implicit { "smtps" } else { "starttls" });
            let before = sink.messages().len();
            batch(
                &transport(addr, implicit, &dovecot.ca, &reg),
                &format!("{tag}-fresh"),
                2,
                &dovecot,
            )
            .await;
            let calls = oauth.calls(grant);
            // Revoked upstream between batches: Dovecot rejects it, we
            // refresh once and retry.
            oauth.expire_access_tokens();
            batch(
                &transport(addr, implicit, &dovecot.ca, &reg),
                &format!("{tag}-refreshed"),
                2,
                &dovecot,
            )
            .await;
            assert_eq!(
                oauth.calls(grant),
                calls + 1,
                "{tag}: one refresh for the batch"
            );
            // Tokens longer than an SMTP command line: two-step AUTH.
            oauth.set(|s| s.token_len = 6000);
            oauth.expire_access_tokens();
            batch(
                &transport(addr, implicit, &dovecot.ca, &reg),
                &format!("{tag}-long"),
                2,
                &dovecot,
            )
            .await;
            assert_eq!(oauth.calls(grant), calls + 2, "{tag}");
            oauth.set(|s| s.token_len = 0);
            let got = sink.messages();
            assert_eq!(got.len() - before, 6, "{tag}");
            for m in &got[before..] {
                assert_eq!(m.from, USER);
                assert_eq!(m.rcpts, ["b@example.org"]);
                let text = String::from_utf8_lossy(&m.data);
                assert!(text.contains("Hello through Dovecot."), "{text}");
            }
        }
        let log = dovecot.log();
        assert!(
            log.contains(&format!("method={method}"))
                && !log.contains(&format!("method={}", other(method))),
            "{log}"
        );
        assert!(
            log.contains("Introspection failed") || log.contains("oauth2 failed"),
            "{log}"
        );
        assert!(!log.contains("Line too long"), "{log}");
    }
}

fn other(method: &str) -> &'static str {
    if method == "XOAUTH2" {
        "OAUTHBEARER"
    } else {
        "XOAUTH2"
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xoauth2_through_dovecot_when_both_are_offered() {
    exercise("xoauth2 oauthbearer", "XOAUTH2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauthbearer_through_dovecot_when_only_it_is_offered() {
    exercise("oauthbearer", "OAUTHBEARER").await;
}
