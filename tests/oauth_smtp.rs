//! XOAUTH2 on the SMTP transport against fakes that answer like Exchange Online and Gmail: one forced refresh and retry on rejection, `535 5.7.139`, token problems hold mail without failover, per-identity tokens (the Basic-to-OAuth bridge), the HTTP CONNECT proxy, and the whole relay (`run`) delivering through it; no secret in any log or failure text.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use common::fake_oauth::{
    ADMIN_TOKEN, CLIENT_SECRET, FakeOAuth, LogCapture, RefreshError, Shape, oauth_config,
};
use common::fake_smtp::{FakeConfig, FakeSmtp, Fault, Stage, XOAuth2Style};
use mailbridge::common::Secret;
use mailbridge::config::{Config, HostPort, Proxy};
use mailbridge::oauth::flows::Settings;
use mailbridge::oauth::store::{StoredGrant, TokenStore};
use mailbridge::oauth::{IdentityTokens, Registry};
use mailbridge::transport::smtp::{SmtpAuth, SmtpSettings, SmtpTransport};
use mailbridge::transport::{Delivery, Envelope, Failure, Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const USER: &str = "user@contoso.com";
const MESSAGE: &[u8] =
    b"From: user@contoso.com\r\nTo: b@example.com\r\nSubject: hi\r\n\r\nHello.\r\n";

/// A fake SMTP server whose XOAUTH2 accepts tokens the fake OAuth server issued.
async fn smtp(oauth: &Arc<FakeOAuth>, style: XOAuth2Style) -> FakeSmtp {
    let o = oauth.clone();
    FakeSmtp::start(
        // Exchange Online and Gmail compare mailboxes without case.
        FakeConfig::default().xoauth2(
            style,
            Arc::new(move |user, token| o.valid_token(&user.to_ascii_lowercase(), token)),
        ),
    )
    .await
}

fn signed_in(cfg: &Config, fake: &FakeOAuth, identity: &str, rt: &str) {
    fake.add_refresh_token(identity, rt);
    TokenStore::new(Settings::from_upstream(cfg, &cfg.upstream).unwrap().store)
        .put(
            identity,
            StoredGrant {
                refresh_token: Secret::new(rt),
                ..StoredGrant::default()
            },
        )
        .unwrap();
}

/// An XOAUTH2 transport to `server` with `registry`'s tokens.
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

fn envelope(identity: Option<&str>) -> Envelope {
    Envelope {
        id: "q1".into(),
        from: USER.into(),
        rcpts: vec!["b@example.com".into()],
        identity: identity.map(str::to_string),
    }
}

fn whole_failure(d: Delivery) -> Failure {
    match d {
        Err(f) => f,
        Ok(r) => panic!("expected a failure, got {r:?}"),
    }
}

fn secrets(fake: &FakeOAuth) -> Vec<String> {
    let mut s = fake.secrets();
    s.push(CLIENT_SECRET.into());
    s.push(ADMIN_TOKEN.into());
    // Base64 of every XOAUTH2 string that could carry a token.
    let tokens: Vec<String> = s.iter().filter(|t| t.starts_with("at-")).cloned().collect();
    for t in tokens {
        for u in [USER, "shared@contoso.com"] {
            s.push(mailbridge::transport::smtp::xoauth2_response(u, &t));
        }
    }
    s
}

fn setup(
    dir: &std::path::Path,
    oauth: &FakeOAuth,
    smtp: SocketAddr,
    flow: &str,
) -> (Config, Arc<Registry>) {
    let cfg = oauth_config(dir, oauth, smtp, flow, "127.0.0.1:1", "");
    let reg = Registry::new(Settings::from_upstream(&cfg, &cfg.upstream).unwrap()).unwrap();
    (cfg, reg)
}

#[tokio::test]
async fn stale_token_is_refreshed_once_microsoft_and_gmail_style() {
    let (logs, _guard) = LogCapture::start();
    let mut texts = Vec::new();
    for (shape, style) in [
        (Shape::Entra, XOAuth2Style::Microsoft),
        (Shape::Google, XOAuth2Style::Gmail),
    ] {
        let oauth = Arc::new(FakeOAuth::start(shape).await);
        let fake = smtp(&oauth, style).await;
        let dir = tempfile::tempdir().unwrap();
        let (cfg, reg) = setup(dir.path(), &oauth, fake.addr(), "authorization_code");
        signed_in(&cfg, &oauth, USER, "rt-initial-smtp-01");
        let t = transport(fake.addr(), &reg);
        // First delivery: token from the refresh token, accepted.
        let d = t
            .deliver(&envelope(None), &mailbridge::transport::Body::from(MESSAGE))
            .await;
        assert!(matches!(&d, Ok(r) if r.iter().all(Result::is_ok)), "{d:?}");
        assert_eq!(oauth.calls("refresh_token"), 1);
        let m = &fake.messages()[0];
        assert_eq!(m.auth, Some((USER.to_string(), "XOAUTH2".to_string())));
        // The upstream revokes the token early: rejected, refreshed, retried
        // on a new connection, delivered.
        oauth.expire_access_tokens();
        fake.drop_connections().await;
        let before = fake.connections();
        let d = t
            .deliver(&envelope(None), &mailbridge::transport::Body::from(MESSAGE))
            .await;
        assert!(matches!(&d, Ok(r) if r.iter().all(Result::is_ok)), "{d:?}");
        assert_eq!(oauth.calls("refresh_token"), 2);
        assert_eq!(fake.connections() - before, 2);
        assert_eq!(fake.messages().len(), 2);
        if style == XOAuth2Style::Gmail {
            // After Gmail's 334 challenge the client answered with an empty line.
            let cmds = fake.commands();
            let i = cmds.iter().rposition(|c| c.is_empty()).expect("empty line");
            assert!(cmds[i - 1].starts_with("AUTH XOAUTH2 "));
        }
        // The server keeps rejecting: one retry only, then a server failure.
        fake.drop_connections().await;
        fake.set_fault(
            Stage::Auth,
            match style {
                XOAuth2Style::Microsoft => Fault::reply(
                    "535 5.7.3 Authentication unsuccessful [SN2PR00CA0018.namprd00.prod.outlook.com]",
                ),
                XOAuth2Style::Gmail => Fault::reply(format!(
                    "535-5.7.8 Username and Password not accepted. Learn more at\r\n535 5.7.8 {}",
                    "https://support.google.com/mail/?p=BadCredentials"
                )),
            },
        );
        oauth.expire_access_tokens();
        let auths_before = fake
            .commands()
            .iter()
            .filter(|c| c.starts_with("AUTH "))
            .count();
        let f = whole_failure(
            t.deliver(&envelope(None), &mailbridge::transport::Body::from(MESSAGE))
                .await,
        );
        assert!(f.fails_over(), "{f:?}");
        assert!(f.text.contains("rejected the OAuth token"), "{}", f.text);
        assert!(f.text.contains("535"), "{}", f.text);
        let auths = fake
            .commands()
            .iter()
            .filter(|c| c.starts_with("AUTH "))
            .count();
        assert_eq!(auths - auths_before, 2);
        texts.push(f.text);
        let mut s = secrets(&oauth);
        s.push("rt-initial-smtp-01".into());
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        logs.assert_clean(&s, &refs);
        fake.shutdown().await;
    }
}

#[tokio::test]
async fn smtp_auth_disabled_for_the_tenant_says_what_to_change() {
    let (logs, _guard) = LogCapture::start();
    let oauth = Arc::new(FakeOAuth::start(Shape::Entra).await);
    let o = oauth.clone();
    let fake = FakeSmtp::start(
        FakeConfig::default()
            .xoauth2(XOAuth2Style::Microsoft, Arc::new(move |u, t| o.valid_token(u, t)))
            .fault(
                Stage::Auth,
                Fault::reply(
                    "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information. [SN4PR0501CA0054.namprd05.prod.outlook.com]",
                ),
            ),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (cfg, reg) = setup(dir.path(), &oauth, fake.addr(), "authorization_code");
    signed_in(&cfg, &oauth, USER, "rt-initial-smtp-02");
    let f = whole_failure(
        transport(fake.addr(), &reg)
            .deliver(&envelope(None), &mailbridge::transport::Body::from(MESSAGE))
            .await,
    );
    assert_eq!(f.severity, mailbridge::transport::Severity::Transient);
    assert!(f.text.contains("5.7.139"), "{}", f.text);
    assert!(
        f.text.contains("Set-CASMailbox")
            && f.text.contains("SmtpClientAuthenticationDisabled $false"),
        "{}",
        f.text
    );
    // Not a token problem: no forced refresh.
    assert_eq!(oauth.calls("refresh_token"), 1);
    logs.assert_clean(&secrets(&oauth), &[&f.text]);
}

#[tokio::test]
async fn token_problems_hold_the_mail_without_connecting() {
    let (logs, _guard) = LogCapture::start();
    let oauth = Arc::new(FakeOAuth::start(Shape::Entra).await);
    let fake = smtp(&oauth, XOAuth2Style::Microsoft).await;
    let dir = tempfile::tempdir().unwrap();
    let (cfg, reg) = setup(dir.path(), &oauth, fake.addr(), "authorization_code");
    let t = transport(fake.addr(), &reg);
    // Never signed in.
    let f1 = whole_failure(
        t.deliver(&envelope(None), &mailbridge::transport::Body::from(MESSAGE))
            .await,
    );
    assert!(!f1.fails_over() && f1.severity == mailbridge::transport::Severity::Transient);
    assert!(f1.text.contains("auth login"), "{}", f1.text);
    // Signed in, but the grant was revoked.
    signed_in(&cfg, &oauth, USER, "rt-initial-smtp-03");
    oauth.set(|s| s.refresh_error = Some(RefreshError::Aadsts70043));
    let f2 = whole_failure(
        t.deliver(&envelope(None), &mailbridge::transport::Body::from(MESSAGE))
            .await,
    );
    assert!(!f2.fails_over(), "{f2:?}");
    assert!(f2.text.contains("re-consent needed"), "{}", f2.text);
    // Token endpoint down.
    oauth.set(|s| {
        s.refresh_error = None;
        s.down = true;
    });
    signed_in(&cfg, &oauth, USER, "rt-initial-smtp-04");
    let f3 = whole_failure(
        t.deliver(&envelope(None), &mailbridge::transport::Body::from(MESSAGE))
            .await,
    );
    assert!(
        !f3.fails_over() && f3.text.contains("unavailable"),
        "{}",
        f3.text
    );
    assert_eq!(fake.connections(), 0, "no token, no connection");
    logs.assert_clean(&secrets(&oauth), &[&f1.text, &f2.text, &f3.text]);
}

#[tokio::test]
async fn each_identity_uses_its_own_tokens_and_connections() {
    let (logs, _guard) = LogCapture::start();
    let oauth = Arc::new(FakeOAuth::start(Shape::Entra).await);
    let fake = smtp(&oauth, XOAuth2Style::Microsoft).await;
    let dir = tempfile::tempdir().unwrap();
    let (cfg, reg) = setup(dir.path(), &oauth, fake.addr(), "authorization_code");
    signed_in(&cfg, &oauth, USER, "rt-initial-smtp-05");
    signed_in(&cfg, &oauth, "shared@contoso.com", "rt-shared-smtp-06");
    let t = transport(fake.addr(), &reg);
    for identity in [
        None,
        Some("shared@contoso.com"),
        None,
        Some("Shared@Contoso.com"),
    ] {
        let d = t
            .deliver(
                &envelope(identity),
                &mailbridge::transport::Body::from(MESSAGE),
            )
            .await;
        assert!(matches!(&d, Ok(r) if r.iter().all(Result::is_ok)), "{d:?}");
    }
    let users: Vec<String> = fake
        .messages()
        .iter()
        .map(|m| m.auth.clone().unwrap().0)
        .collect();
    assert_eq!(
        users,
        [USER, "shared@contoso.com", USER, "Shared@Contoso.com"]
    );
    // Pooled connections are reused only for the identity they authenticated as.
    assert_eq!(fake.connections(), 3);
    assert_eq!(oauth.calls("refresh_token"), 2);
    // An identity nobody signed in for: held, not sent as someone else.
    let f = whole_failure(
        t.deliver(
            &envelope(Some("nobody@contoso.com")),
            &mailbridge::transport::Body::from(MESSAGE),
        )
        .await,
    );
    assert!(
        !f.fails_over() && f.text.contains("nobody@contoso.com"),
        "{}",
        f.text
    );
    assert_eq!(fake.messages().len(), 4);
    logs.assert_clean(&secrets(&oauth), &[&f.text]);
}

/// A small HTTP proxy: `CONNECT` tunnels and absolute-form requests,
/// recording each request head.
struct TestProxy {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TestProxy {
    async fn start(refuse: Option<&'static str>) -> TestProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let h = heads.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                let h = h.clone();
                conns.spawn(async move {
                    let mut head = Vec::new();
                    while !head.ends_with(b"\r\n\r\n") {
                        match client.read_u8().await {
                            Ok(b) => head.push(b),
                            Err(_) => return,
                        }
                    }
                    let text = String::from_utf8_lossy(&head).into_owned();
                    h.lock().unwrap().push(text.clone());
                    if let Some(answer) = refuse {
                        let _ = client
                            .write_all(format!("{answer}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                            .await;
                        return;
                    }
                    let line = text.lines().next().unwrap_or("").to_string();
                    let mut parts = line.split_whitespace();
                    let method = parts.next().unwrap_or("");
                    let target = parts.next().unwrap_or("");
                    let (host, connect) = if method == "CONNECT" {
                        (target.to_string(), true)
                    } else {
                        let u = url::Url::parse(target).unwrap();
                        (
                            format!(
                                "{}:{}",
                                u.host_str().unwrap(),
                                u.port_or_known_default().unwrap()
                            ),
                            false,
                        )
                    };
                    let Ok(mut upstream) = tokio::net::TcpStream::connect(&host).await else {
                        let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                        return;
                    };
                    if connect {
                        let _ = client
                            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                            .await;
                    } else if upstream.write_all(&head).await.is_err() {
                        return;
                    }
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                });
            }
        });
        TestProxy { addr, heads, task }
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn smtp_and_token_endpoint_through_an_http_proxy() {
    let (logs, _guard) = LogCapture::start();
    let proxy = TestProxy::start(None).await;
    let oauth = Arc::new(FakeOAuth::start(Shape::Entra).await);
    let fake = smtp(&oauth, XOAuth2Style::Microsoft).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = oauth_config(
        dir.path(),
        &oauth,
        fake.addr(),
        "authorization_code",
        "127.0.0.1:1",
        "",
    );
    let proxy_password = "pr0xy-PASSWORD-x";
    cfg.upstream.proxy = Proxy {
        url: format!("http://{}", proxy.addr),
        username: "relay".into(),
        password: Secret::new(proxy_password),
        ..Proxy::default()
    };
    signed_in(&cfg, &oauth, USER, "rt-initial-smtp-07");
    // The router builds the transport exactly as `run` does.
    let router =
        mailbridge::routing::from_config(&cfg, &mailbridge::oauth::Registries::new()).unwrap();
    let d = router
        .deliver(&envelope(None), &mailbridge::transport::Body::from(MESSAGE))
        .await
        .result;
    assert!(matches!(&d, Ok(r) if r.iter().all(Result::is_ok)), "{d:?}");
    let heads = proxy.heads();
    let expected_auth = format!(
        "Proxy-Authorization: Basic {}",
        B64.encode(format!("relay:{proxy_password}"))
    );
    // The token endpoint (plain HTTP here: absolute-form through the proxy)…
    assert!(
        heads
            .iter()
            .any(|h| h.starts_with(&format!("POST {}", oauth.token_url()))),
        "{heads:?}"
    );
    // …and SMTP through a CONNECT tunnel, with the proxy credentials.
    let connect = heads
        .iter()
        .find(|h| h.starts_with("CONNECT "))
        .expect("a CONNECT");
    assert!(
        connect.starts_with(&format!(
            "CONNECT 127.0.0.1:{} HTTP/1.1\r\n",
            fake.addr().port()
        )),
        "{connect}"
    );
    assert!(connect.contains(&expected_auth), "{connect}");
    assert_eq!(fake.messages().len(), 1);

    // A proxy that refuses: a server failure naming its status line.
    let refusing = TestProxy::start(Some("HTTP/1.1 407 Proxy Authentication Required")).await;
    let t = SmtpTransport::new(SmtpSettings {
        server: HostPort {
            host: "127.0.0.1".into(),
            port: fake.addr().port(),
        },
        implicit_tls: false,
        starttls: false,
        ca_file: None,
        auth: SmtpAuth::None,
        hostname: "relay.test".into(),
        timeout: Duration::from_secs(5),
    })
    .unwrap()
    .with_proxy(&Proxy {
        url: format!("http://{}", refusing.addr),
        ..Proxy::default()
    })
    .unwrap();
    let f = whole_failure(
        t.deliver(&envelope(None), &mailbridge::transport::Body::from(MESSAGE))
            .await,
    );
    assert!(f.fails_over(), "{f:?}");
    assert!(
        f.text.contains("407 Proxy Authentication Required"),
        "{}",
        f.text
    );
    let mut s = secrets(&oauth);
    s.push(proxy_password.into());
    s.push(B64.encode(format!("relay:{proxy_password}")));
    logs.assert_clean(&s, &[&f.text]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_delivers_as_the_mapped_identity_and_holds_mail_on_reconsent() {
    let oauth = Arc::new(FakeOAuth::start(Shape::Entra).await);
    let fake = smtp(&oauth, XOAuth2Style::Microsoft).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = oauth_config(
        dir.path(),
        &oauth,
        fake.addr(),
        "authorization_code",
        "127.0.0.1:1",
        "",
    );
    signed_in(&cfg, &oauth, USER, "rt-initial-smtp-08");
    let smtp_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let smtp_addr = smtp_listener.local_addr().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(mailbridge::run(
        cfg.clone(),
        None,
        mailbridge::Listeners {
            smtp: smtp_listener,
            admin: None,
            smtps: None,
        },
        shutdown.clone(),
    ));
    let send = |n: u32| async move {
        tokio::task::spawn_blocking(move || {
            use std::io::{BufRead, BufReader, Write};
            let s = std::net::TcpStream::connect(smtp_addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            let mut line = String::new();
            let mut reply = |r: &mut BufReader<std::net::TcpStream>| loop {
                line.clear();
                r.read_line(&mut line).unwrap();
                if line.as_bytes().get(3) != Some(&b'-') {
                    return line.clone();
                }
            };
            reply(&mut r);
            for cmd in [
                "EHLO app.local".to_string(),
                "MAIL FROM:<app@legacy.local>".into(),
                "RCPT TO:<b@example.com>".into(),
                "DATA".into(),
            ] {
                write!(w, "{cmd}\r\n").unwrap();
                reply(&mut r);
            }
            write!(w, "Subject: n{n}\r\n\r\nbody\r\n.\r\n").unwrap();
            let r2 = reply(&mut r);
            write!(w, "QUIT\r\n").unwrap();
            r2
        })
        .await
        .unwrap()
    };
    assert!(send(1).await.starts_with("250"));
    wait_for("delivery", || fake.messages().len() == 1).await;
    assert_eq!(fake.messages()[0].auth.as_ref().unwrap().0, USER);
    // Revoked grant: the next message stays queued, one refresh call only.
    oauth.set(|s| s.refresh_error = Some(RefreshError::Aadsts70043));
    oauth.expire_access_tokens();
    fake.drop_connections().await;
    assert!(send(2).await.starts_with("250"));
    let spool = cfg.path(&cfg.spool.path);
    wait_for("a failed attempt", || {
        mailbridge::spool::Spool::list(&spool)
            .map(|m| m.iter().any(|m| m.attempts > 0))
            .unwrap_or(false)
    })
    .await;
    let metas = mailbridge::spool::Spool::list(&spool).unwrap();
    assert_eq!(metas.len(), 1, "held, not bounced");
    assert!(
        metas[0]
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("re-consent needed"),
        "{:?}",
        metas[0].last_error
    );
    assert_eq!(fake.messages().len(), 1);
    shutdown.cancel();
    let _ = run.await;
}

/// Poll (real time, for the multi-threaded relay test) until `cond` holds.
async fn wait_for(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..400 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}
