//! OAuth flows against the fake Entra ID / Google token endpoint: the browser authorization code flow through the admin endpoint, device code polling with paused time, refresh-token rotation persisted, backoff when the endpoint is down, and one re-consent state for `invalid_grant`; no secret in any log or answer.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::fake_oauth::{
    ADMIN_TOKEN, CLIENT_SECRET, DeviceStep, FakeOAuth, LogCapture, RefreshError, Shape,
    oauth_config,
};
use mailbridge::common::Secret;
use mailbridge::config::Config;
use mailbridge::oauth::flows::{LoginError, Settings};
use mailbridge::oauth::store::{StoredGrant, TokenStore};
use mailbridge::oauth::{Registry, TokenError, TokenSource};

const USER: &str = "user@contoso.com";
/// An SMTP address nothing listens on (these tests never connect to it).
const NO_SMTP: &str = "127.0.0.1:9";

fn cfg(dir: &std::path::Path, fake: &FakeOAuth, flow: &str) -> Config {
    oauth_config(dir, fake, NO_SMTP.parse().unwrap(), flow, "127.0.0.1:1", "")
}

fn registry(cfg: &Config) -> Arc<Registry> {
    Registry::new(Settings::from_upstream(cfg, &cfg.upstream).unwrap()).unwrap()
}

fn store(cfg: &Config) -> TokenStore {
    TokenStore::new(Settings::from_upstream(cfg, &cfg.upstream).unwrap().store)
}

fn signed_in(cfg: &Config, fake: &FakeOAuth, identity: &str, rt: &str) {
    fake.add_refresh_token(identity, rt);
    store(cfg)
        .put(
            identity,
            StoredGrant {
                refresh_token: Secret::new(rt),
                client_id: common::fake_oauth::CLIENT_ID.into(),
                ..StoredGrant::default()
            },
        )
        .unwrap();
}

fn stored_rt(cfg: &Config, identity: &str) -> String {
    store(cfg)
        .get(identity)
        .unwrap()
        .map(|g| g.refresh_token.expose().to_string())
        .unwrap_or_default()
}

fn all_secrets(fake: &FakeOAuth) -> Vec<String> {
    let mut s = fake.secrets();
    s.push(ADMIN_TOKEN.into());
    s.push(CLIENT_SECRET.into());
    s
}

/// Start the admin endpoint in-process on `listener` for `cfg`.
async fn start_admin(
    cfg: &Config,
    listener: tokio::net::TcpListener,
) -> (
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<()>,
    tokio::task::JoinHandle<()>,
) {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let spool_dir = cfg.path(&cfg.spool.path);
    let spool = mailbridge::spool::Spool::open(&spool_dir, 100).unwrap();
    // Routing and the admin endpoint share the OAuth identities, as in `run`.
    let oauth = mailbridge::oauth::Registries::new();
    let router = Arc::new(mailbridge::routing::from_config(cfg, &oauth).unwrap());
    let (sched, sched_task) = mailbridge::scheduler::Scheduler::start(
        Arc::new(spool),
        router,
        mailbridge::scheduler::Policy::from_config(cfg),
        shutdown.clone(),
    );
    let state = Arc::new(mailbridge::admin::AdminState {
        scheduler: sched,
        token: Secret::new(ADMIN_TOKEN),
        started: std::time::SystemTime::now(),
        reloader: None,
    });
    let extras = mailbridge::admin::Extras::from_config(cfg, &oauth).unwrap();
    let admin = tokio::spawn(mailbridge::admin::serve_with(
        listener,
        state,
        extras,
        shutdown.clone(),
    ));
    (shutdown, admin, sched_task)
}

#[tokio::test]
async fn authorization_code_flow_end_to_end_through_the_admin_endpoint() {
    let (logs, _guard) = LogCapture::start();
    let fake = FakeOAuth::start(Shape::Entra).await;
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = listener.local_addr().unwrap().to_string();
    let cfg = oauth_config(
        dir.path(),
        &fake,
        NO_SMTP.parse().unwrap(),
        "authorization_code",
        &admin_addr,
        "",
    );
    let (shutdown, admin_task, sched_task) = start_admin(&cfg, listener).await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let base = format!("http://{admin_addr}");
    let mut outputs: Vec<String> = Vec::new();

    // Without the admin token: a readable 401 page, nothing started.
    let r = http
        .post(format!("{base}/oauth/start"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    outputs.push(r.text().await.unwrap());
    // The token is never taken from a URL (GET is gone, and `token=` is refused).
    let r = http
        .get(format!("{base}/oauth/start?token={ADMIN_TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    let r = http
        .post(format!("{base}/oauth/start?token={ADMIN_TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "an unknown query parameter");
    let page = r.text().await.unwrap();
    assert!(!page.contains(ADMIN_TOKEN), "{page}");
    assert!(fake.authorize_requests().is_empty());

    // What `auth login` does, then a browser following the redirects:
    // start (token in the header) → provider → callback.
    let r = http
        .post(format!("{base}/oauth/start"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    let final_url = r.url().clone();
    assert_eq!(r.status(), 200);
    assert_eq!(final_url.path(), "/oauth/callback");
    let page = r.text().await.unwrap();
    assert!(page.contains("Signed in") && page.contains(USER), "{page}");
    outputs.push(page);
    let q = &fake.authorize_requests()[0];
    assert_eq!(q["code_challenge_method"], "S256");
    assert_eq!(q["login_hint"], USER);
    assert_eq!(
        q["scope"],
        "https://outlook.office365.com/SMTP.Send offline_access"
    );
    assert_eq!(
        q["redirect_uri"],
        format!("http://{admin_addr}/oauth/callback")
    );
    // The code was redeemed with the PKCE verifier (the fake checks it) and
    // the refresh token is on disk, mode 0600.
    assert_eq!(fake.calls("authorization_code"), 1);
    let rt = stored_rt(&cfg, USER);
    assert!(rt.starts_with("rt-"), "{rt}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(store(&cfg).path())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // The state is single-use: replaying the callback is a readable 400.
    let r = http.get(final_url.clone()).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let page = r.text().await.unwrap();
    assert!(page.contains("Unknown sign-in"), "{page}");
    outputs.push(page);
    assert_eq!(fake.calls("authorization_code"), 1);

    // A state nobody issued, and `error=` from the provider: 400 pages.
    let r = http
        .get(format!("{base}/oauth/callback?code=x&state=forged"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    outputs.push(r.text().await.unwrap());
    fake.set(|s| s.deny_consent = true);
    let r = http
        .post(format!("{base}/oauth/start"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let page = r.text().await.unwrap();
    assert!(
        page.contains("access_denied") && page.contains("AADSTS65004"),
        "{page}"
    );
    outputs.push(page);

    // Status needs the token, and shows the identity as ok, with no token in it.
    let r = http.get(format!("{base}/status")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let status = http
        .get(format!("{base}/status"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    let status = status.text().await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(v["oauth"][0]["identities"][0]["identity"], USER);
    assert_eq!(v["oauth"][0]["identities"][0]["state"], "ok");
    outputs.push(status);

    shutdown.cancel();
    let _ = admin_task.await;
    let _ = sched_task.await;
    let refs: Vec<&str> = outputs.iter().map(String::as_str).collect();
    logs.assert_clean(&all_secrets(&fake), &refs);
    fake.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn device_code_polls_at_the_interval_and_slows_down() {
    let (logs, _guard) = LogCapture::start();
    let fake = FakeOAuth::start(Shape::Entra).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = cfg(dir.path(), &fake, "device_code");
    fake.set(|s| {
        s.device_script = vec![
            DeviceStep::Pending,
            DeviceStep::SlowDown,
            DeviceStep::Pending,
            DeviceStep::Approve(USER.into()),
        ]
    });
    let reg = registry(&cfg);
    let d = reg.client().device_authorization().await.unwrap();
    assert_eq!(d.verification_uri, "https://microsoft.com/devicelogin");
    assert_eq!(d.user_code, "FAKE-CODE");
    assert_eq!(d.interval, Duration::from_secs(5));
    let start = tokio::time::Instant::now();
    let grant = reg.client().poll_device(&d).await.unwrap();
    reg.manager("").complete_login(grant).await;
    let polls = fake.set(|s| s.device_polls.clone());
    let at: Vec<u64> = polls.iter().map(|t| (*t - start).as_secs()).collect();
    // 5 s, 5 s, then slow_down adds 5 s: 10 s, 10 s.
    assert_eq!(at, vec![5, 10, 20, 30]);
    assert!(stored_rt(&cfg, USER).starts_with("rt-"));
    // The stored grant is used by the manager: a token without another call.
    let t = reg.manager(USER).token().await.unwrap();
    assert!(fake.valid_token(USER, t.expose()));
    logs.assert_clean(&all_secrets(&fake), &[&format!("{d:?}")]);
}

#[tokio::test(start_paused = true)]
async fn device_code_expired_and_declined() {
    let fake = FakeOAuth::start(Shape::Google).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = cfg(dir.path(), &fake, "device_code");
    let reg = registry(&cfg);
    fake.set(|s| s.device_script = vec![DeviceStep::Pending, DeviceStep::Expired]);
    let d = reg.client().device_authorization().await.unwrap();
    // Google names the field verification_url.
    assert_eq!(d.verification_uri, "https://www.google.com/device");
    assert!(matches!(
        reg.client().poll_device(&d).await,
        Err(LoginError::Expired)
    ));
    fake.set(|s| s.device_script = vec![DeviceStep::Declined]);
    let d = reg.client().device_authorization().await.unwrap();
    assert!(matches!(
        reg.client().poll_device(&d).await,
        Err(LoginError::Declined(_))
    ));
    // Never approved: the code's own lifetime ends the wait.
    fake.set(|s| s.device_script = vec![DeviceStep::Pending]);
    let d = reg.client().device_authorization().await.unwrap();
    assert!(matches!(
        reg.client().poll_device(&d).await,
        Err(LoginError::Expired)
    ));
    assert_eq!(stored_rt(&cfg, USER), "");
}

#[tokio::test(start_paused = true)]
async fn refresh_rotates_and_persists_with_one_refresh_in_flight() {
    let (logs, _guard) = LogCapture::start();
    let fake = FakeOAuth::start(Shape::Entra).await;
    fake.set(|s| {
        s.revoke_rotated = true;
        s.lifetime = 3600;
    });
    let dir = tempfile::tempdir().unwrap();
    let cfg = cfg(dir.path(), &fake, "authorization_code");
    signed_in(&cfg, &fake, USER, "rt-initial-0001");
    let reg = registry(&cfg);
    let m = reg.manager(USER);

    // Eight deliveries ask at once: one refresh.
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let m = m.clone();
        set.spawn(async move { m.token().await.map(|t| t.expose().to_string()) });
    }
    let mut tokens = Vec::new();
    while let Some(r) = set.join_next().await {
        tokens.push(r.unwrap().unwrap());
    }
    tokens.dedup();
    assert_eq!(tokens.len(), 1);
    assert_eq!(fake.calls("refresh_token"), 1);
    // Entra v2 wants the scope on refresh (AADSTS900144).
    let form = fake.set(|s| s.forms[0].clone());
    assert_eq!(
        form["scope"],
        "https://outlook.office365.com/SMTP.Send offline_access"
    );
    let rotated = stored_rt(&cfg, USER);
    assert!(rotated.starts_with("rt-") && rotated != "rt-initial-0001");

    // Well before expiry: the same token, no call.
    tokio::time::advance(Duration::from_secs(3000)).await;
    assert_eq!(m.token().await.unwrap().expose(), tokens[0]);
    assert_eq!(fake.calls("refresh_token"), 1);
    // Within 5 minutes of expiry: refreshed ahead, with the rotated token
    // (the fake revoked the first one), and the newest is on disk.
    tokio::time::advance(Duration::from_secs(301)).await;
    let t2 = m.token().await.unwrap();
    assert_ne!(t2.expose(), tokens[0]);
    assert_eq!(fake.calls("refresh_token"), 2);
    let third = stored_rt(&cfg, USER);
    assert!(third != rotated && third.starts_with("rt-"));

    // A restart (new registry) continues from the store.
    let reg2 = registry(&cfg);
    fake.expire_access_tokens();
    let t3 = reg2.manager(USER).token().await.unwrap();
    assert!(fake.valid_token(USER, t3.expose()));
    logs.assert_clean(&all_secrets(&fake), &[&reg.status().to_string()]);
}

#[tokio::test(start_paused = true)]
async fn token_endpoint_down_backs_off_and_recovers() {
    let (logs, _guard) = LogCapture::start();
    let fake = FakeOAuth::start(Shape::Entra).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = cfg(dir.path(), &fake, "authorization_code");
    signed_in(&cfg, &fake, USER, "rt-initial-0002");
    fake.set(|s| s.down = true);
    let reg = registry(&cfg);
    let m = reg.manager("");
    let mut errors = Vec::new();
    let e = m.token().await.unwrap_err();
    assert!(matches!(e, TokenError::Unavailable(_)), "{e}");
    errors.push(e.to_string());
    assert_eq!(fake.calls("refresh_token"), 1);
    // Backing off: no call for 30 s, then 60 s.
    for _ in 0..5 {
        errors.push(m.token().await.unwrap_err().to_string());
    }
    assert_eq!(fake.calls("refresh_token"), 1);
    tokio::time::advance(Duration::from_secs(31)).await;
    assert!(m.token().await.is_err());
    assert_eq!(fake.calls("refresh_token"), 2);
    tokio::time::advance(Duration::from_secs(31)).await;
    assert!(m.token().await.is_err());
    assert_eq!(fake.calls("refresh_token"), 2);
    tokio::time::advance(Duration::from_secs(30)).await;
    assert!(m.token().await.is_err());
    assert_eq!(fake.calls("refresh_token"), 3);
    let status = reg.status();
    assert_eq!(status["identities"][0]["state"], "unavailable");
    // Back up: the next try after the backoff works.
    fake.set(|s| s.down = false);
    tokio::time::advance(Duration::from_secs(121)).await;
    assert!(m.token().await.is_ok());
    assert_eq!(reg.status()["identities"][0]["state"], "ok");
    errors.push(status.to_string());
    let refs: Vec<&str> = errors.iter().map(String::as_str).collect();
    logs.assert_clean(&all_secrets(&fake), &refs);
}

#[tokio::test]
async fn invalid_grant_is_one_reconsent_state_without_hammering() {
    let (logs, _guard) = LogCapture::start();
    let fake = FakeOAuth::start(Shape::Entra).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = cfg(dir.path(), &fake, "authorization_code");
    signed_in(&cfg, &fake, USER, "rt-initial-0003");
    fake.set(|s| s.refresh_error = Some(RefreshError::Aadsts70043));
    let reg = registry(&cfg);
    let m = reg.manager("");
    let e = m.token().await.unwrap_err();
    assert!(
        matches!(&e, TokenError::ReconsentNeeded(t) if t.contains("AADSTS70043")),
        "{e}"
    );
    for _ in 0..10 {
        assert!(matches!(
            m.token().await,
            Err(TokenError::ReconsentNeeded(_))
        ));
    }
    assert_eq!(fake.calls("refresh_token"), 1, "no retry loop");
    assert_eq!(logs.text().matches("OAuth grant refused").count(), 1);
    let status = reg.status();
    assert_eq!(status["identities"][0]["state"], "reconsent_needed");
    assert!(
        status["identities"][0]["last_error"]
            .as_str()
            .unwrap()
            .contains("AADSTS70043")
    );
    // The state survives a restart, still without calls.
    let reg2 = registry(&cfg);
    assert!(matches!(
        reg2.manager("").token().await,
        Err(TokenError::ReconsentNeeded(_))
    ));
    assert_eq!(fake.calls("refresh_token"), 1);
    assert_eq!(reg2.status()["identities"][0]["state"], "reconsent_needed");
    // A new sign-in (here: written to the store, as `auth login --device` does) ends it.
    fake.set(|s| s.refresh_error = None);
    signed_in(&cfg, &fake, USER, "rt-after-login-0004");
    assert!(m.token().await.is_ok());
    assert_eq!(fake.calls("refresh_token"), 2);
    assert_eq!(reg.status()["identities"][0]["state"], "ok");
    logs.assert_clean(&all_secrets(&fake), &[&e.to_string(), &status.to_string()]);
}

#[tokio::test]
async fn configuration_errors_client_credentials_and_google() {
    let (logs, _guard) = LogCapture::start();
    // Expired client secret: a configuration problem.
    let fake = FakeOAuth::start(Shape::Entra).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg1 = cfg(dir.path(), &fake, "authorization_code");
    signed_in(&cfg1, &fake, USER, "rt-initial-0005");
    fake.set(|s| s.refresh_error = Some(RefreshError::Aadsts7000222));
    let e = registry(&cfg1).manager("").token().await.unwrap_err();
    assert!(
        matches!(&e, TokenError::Config(t) if t.contains("AADSTS7000222")),
        "{e}"
    );

    // Client credentials: the resource's /.default, one app token for all mailboxes.
    let dir2 = tempfile::tempdir().unwrap();
    let cfg2 = cfg(dir2.path(), &fake, "client_credentials");
    let reg = registry(&cfg2);
    let t = reg.manager("").token().await.unwrap();
    assert!(fake.valid_token("anyone@contoso.com", t.expose()));
    let form = fake.set(|s| s.forms.last().cloned().unwrap());
    assert_eq!(form["scope"], "https://outlook.office365.com/.default");
    assert_eq!(form["grant_type"], "client_credentials");
    assert_eq!(reg.manager("other@contoso.com").token().await.unwrap(), t);
    assert_eq!(fake.calls("client_credentials"), 1);

    // Google: no scope on refresh, no rotation: the original token stays stored.
    let g = FakeOAuth::start(Shape::Google).await;
    let dir3 = tempfile::tempdir().unwrap();
    let cfg3 = cfg(dir3.path(), &g, "authorization_code");
    signed_in(&cfg3, &g, USER, "rt-google-0006");
    let reg3 = registry(&cfg3);
    assert!(reg3.manager("").token().await.is_ok());
    let form = g.set(|s| s.forms[0].clone());
    assert!(!form.contains_key("scope"));
    assert_eq!(stored_rt(&cfg3, USER), "rt-google-0006");
    // Google's authorize URL asks for offline access.
    let url = reg3.start_login(None).unwrap();
    assert!(
        url.contains("access_type=offline") && url.contains("prompt=consent"),
        "{url}"
    );
    g.set(|s| s.refresh_error = Some(RefreshError::GoogleRevoked));
    let reg4 = registry(&cfg3);
    let e2 = reg4.manager("").token().await.unwrap_err();
    assert!(
        matches!(&e2, TokenError::ReconsentNeeded(t) if t.contains("expired or revoked")),
        "{e2}"
    );
    let mut secrets = all_secrets(&fake);
    secrets.extend(g.secrets());
    logs.assert_clean(&secrets, &[&e.to_string(), &e2.to_string(), &url]);
}

#[tokio::test]
async fn client_credentials_with_a_certificate() {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
    use mailbridge::oauth::assertion::{ASSERTION_TYPE, ClientCertificate};

    let (logs, _guard) = LogCapture::start();
    let fake = FakeOAuth::start(Shape::Entra).await;
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let read = |n: &str| std::fs::read(data.join(n)).unwrap();
    fake.register_certificate(&read("client-cert.pem"), &read("client-key.pem"));
    let keys = |cert: &str, key: &str| {
        format!(
            "client_certificate_file = \"{}\"\nclient_key_file = \"{}\"\n",
            data.join(cert).display(),
            data.join(key).display()
        )
    };
    let cert_cfg = |dir: &std::path::Path, cert: &str, key: &str| {
        oauth_config(
            dir,
            &fake,
            NO_SMTP.parse().unwrap(),
            "client_credentials",
            "127.0.0.1:1",
            &keys(cert, key),
        )
    };

    // The certificate alone (no secret): a signed assertion gets the app token.
    let dir = tempfile::tempdir().unwrap();
    let cfg1 = cert_cfg(dir.path(), "client-cert.pem", "client-key.pem");
    let mut s = Settings::from_upstream(&cfg1, &cfg1.upstream).unwrap();
    s.client_secret = Secret::default();
    assert!(s.client_certificate.is_some());
    let reg = Registry::new(s).unwrap();
    let t = reg.manager("").token().await.unwrap();
    assert!(fake.valid_token("anyone@contoso.com", t.expose()));
    let form = fake.set(|s| s.forms.last().cloned().unwrap());
    assert_eq!(form["grant_type"], "client_credentials");
    assert_eq!(form["client_assertion_type"], ASSERTION_TYPE);
    assert_eq!(form["client_assertion"].split('.').count(), 3);
    assert!(!form.contains_key("client_secret"));

    // Secret and certificate both configured: the certificate is used.
    let dir1b = tempfile::tempdir().unwrap();
    let cfg1b = cert_cfg(dir1b.path(), "client-cert.pem", "client-key.pem");
    registry(&cfg1b).manager("").token().await.unwrap();
    let form = fake.set(|s| s.forms.last().cloned().unwrap());
    assert!(form.contains_key("client_assertion") && !form.contains_key("client_secret"));
    assert_eq!(fake.calls("client_credentials"), 2);

    // A certificate the application does not know: invalid_client, a configuration problem.
    let dir2 = tempfile::tempdir().unwrap();
    let cfg2 = cert_cfg(dir2.path(), "other-cert.pem", "other-key.pem");
    let e = registry(&cfg2).manager("").token().await.unwrap_err();
    assert!(
        matches!(&e, TokenError::Config(t) if t.contains("AADSTS700027")),
        "{e}"
    );

    // A tampered assertion (claims changed after signing) fails the signature check.
    let c = ClientCertificate::from_pem(&read("client-cert.pem"), &read("client-key.pem")).unwrap();
    let jwt = c
        .assertion(common::fake_oauth::CLIENT_ID, &fake.token_url())
        .unwrap();
    let parts: Vec<&str> = jwt.expose().split('.').collect();
    let mut claims: serde_json::Value =
        serde_json::from_slice(&B64URL.decode(parts[1]).unwrap()).unwrap();
    claims["exp"] = serde_json::json!(claims["exp"].as_u64().unwrap() + 86400);
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        B64URL.encode(claims.to_string()),
        parts[2]
    );
    let resp = reqwest::Client::new()
        .post(fake.token_url())
        .form(&[
            ("client_id", common::fake_oauth::CLIENT_ID),
            ("grant_type", "client_credentials"),
            ("scope", "https://outlook.office365.com/.default"),
            ("client_assertion_type", ASSERTION_TYPE),
            ("client_assertion", &forged),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let body = resp.text().await.unwrap();
    assert!(
        body.contains("invalid_client") && body.contains("AADSTS700027"),
        "{body}"
    );

    // Certificate and key that do not match: refused when the settings are built.
    let dir3 = tempfile::tempdir().unwrap();
    let cfg3 = cert_cfg(dir3.path(), "client-cert.pem", "other-key.pem");
    let e3 = mailbridge::oauth::Registries::new()
        .for_config(&cfg3)
        .err()
        .unwrap();
    assert!(e3.starts_with("upstream.oauth.client_key_file:"), "{e3}");

    let mut secrets = all_secrets(&fake);
    secrets.push(jwt.expose().to_string());
    for k in ["client-key.pem", "other-key.pem"] {
        let pem = String::from_utf8(read(k)).unwrap();
        secrets.extend(
            pem.lines()
                .filter(|l| !l.starts_with("-----"))
                .map(String::from),
        );
    }
    logs.assert_clean(&secrets, &[&e.to_string(), &e3]);
}

#[tokio::test(start_paused = true)]
async fn huge_lifetimes_from_the_token_endpoint_do_not_panic() {
    // `expires_in` near u64::MAX once overflowed `Instant + Duration`.
    let fake = FakeOAuth::start(Shape::Entra).await;
    fake.set(|s| s.lifetime = u64::MAX);
    let dir = tempfile::tempdir().unwrap();
    let cfg = cfg(dir.path(), &fake, "authorization_code");
    signed_in(&cfg, &fake, USER, "rt-initial-0001");
    let reg = registry(&cfg);
    let m = reg.manager(USER);
    let t = m.token().await.unwrap();
    assert!(fake.valid_token(USER, t.expose()));
    // Clamped to a day: a day later the token is refreshed, not trusted forever.
    tokio::time::advance(Duration::from_secs(86_400)).await;
    let t2 = m.token().await.unwrap();
    assert_ne!(t2.expose(), t.expose());
    assert_eq!(fake.calls("refresh_token"), 2);
    let _ = reg.status();

    // The device code's lifetime too: the wait ends (Expired), no panic.
    let cfg = cfg_device(dir.path(), &fake);
    let reg = registry(&cfg);
    fake.set(|s| {
        s.device_expires_in = Some(u64::MAX);
        s.device_script = vec![DeviceStep::Expired];
    });
    let d = reg.client().device_authorization().await.unwrap();
    assert!(matches!(
        reg.client().poll_device(&d).await,
        Err(LoginError::Expired)
    ));
}

fn cfg_device(dir: &std::path::Path, fake: &FakeOAuth) -> Config {
    cfg(dir, fake, "device_code")
}
