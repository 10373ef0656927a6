//! `POST /send-test` through the spool and the real XOAUTH2 route (delivered, deferred, bounced with the upstream's text), and the CLI side: `auth login` printing the provider URL from a running relay, `auth logout`, `hash-password`.

mod common;

use std::process::ExitCode;
use std::sync::Arc;

use common::fake_oauth::{ADMIN_TOKEN, CLIENT_SECRET, FakeOAuth, LogCapture, Shape, oauth_config};
use common::fake_smtp::{FakeConfig, FakeSmtp, Fault, Stage, XOAuth2Style};
use mailbridge::cli::auth::{AuthAction, auth_command, hash_password};
use mailbridge::common::Secret;
use mailbridge::config::Config;
use mailbridge::oauth::flows::Settings;
use mailbridge::oauth::store::{StoredGrant, TokenStore};

const USER: &str = "user@contoso.com";

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

struct Admin {
    base: String,
    shutdown: tokio_util::sync::CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn start_admin(cfg: &Config, listener: tokio::net::TcpListener) -> Admin {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let spool = mailbridge::spool::Spool::open(&cfg.path(&cfg.spool.path), 100).unwrap();
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
    Admin {
        base,
        shutdown,
        tasks: vec![admin, sched_task],
    }
}

#[tokio::test]
async fn send_test_reports_the_first_attempt() {
    let (logs, _guard) = LogCapture::start();
    let oauth = Arc::new(FakeOAuth::start(Shape::Entra).await);
    let o = oauth.clone();
    let fake = FakeSmtp::start(
        FakeConfig::default()
            .xoauth2(
                XOAuth2Style::Microsoft,
                Arc::new(move |u, t| o.valid_token(u, t)),
            )
            .fault(
                Stage::Rcpt("gone@example.com".into()),
                Fault::reply("550 5.1.1 User unknown"),
            )
            .fault(
                Stage::Rcpt("later@example.com".into()),
                Fault::reply("451 4.3.0 Try again later"),
            ),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = listener.local_addr().unwrap().to_string();
    let cfg = oauth_config(
        dir.path(),
        &oauth,
        fake.addr(),
        "authorization_code",
        &admin_addr,
        "",
    );
    signed_in(&cfg, &oauth, USER, "rt-initial-send-01");
    let admin = start_admin(&cfg, listener).await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = format!("{}/send-test", admin.base);
    let mut outputs = Vec::new();

    let r = http
        .post(&url)
        .json(&serde_json::json!({"to": "b@example.com"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .post(&url)
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({"to": "not an address"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    for (to, result, detail) in [
        ("b@example.com", "delivered", "delivered via smtp://"),
        ("gone@example.com", "bounced", "550 5.1.1 User unknown"),
        ("later@example.com", "deferred", "451 4.3.0 Try again later"),
    ] {
        let r = http
            .post(&url)
            .bearer_auth(ADMIN_TOKEN)
            .json(&serde_json::json!({ "to": to }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let body = r.text().await.unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["result"], result, "{body}");
        assert!(v["detail"].as_str().unwrap().contains(detail), "{body}");
        assert!(!v["id"].as_str().unwrap().is_empty());
        outputs.push(body);
    }
    // Nothing is left queued: not the deferred sample, not the bounced one,
    // and no DSN for it either (the answer was shown to the sender).
    let queue = cfg.path(&cfg.spool.path).join("queue");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let left: Vec<String> = std::fs::read_dir(&queue)
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sample mails left in the queue: {left:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let m = &fake.messages()[0];
    assert_eq!(m.auth, Some((USER.into(), "XOAUTH2".into())));
    assert!(String::from_utf8_lossy(&m.data).contains("Subject: mailbridge test message"));

    admin.shutdown.cancel();
    for t in admin.tasks {
        let _ = t.await;
    }
    let mut secrets = oauth.secrets();
    secrets.push(ADMIN_TOKEN.into());
    secrets.push(CLIENT_SECRET.into());
    let refs: Vec<&str> = outputs.iter().map(String::as_str).collect();
    logs.assert_clean(&secrets, &refs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_login_prints_the_provider_url_and_logout_forgets() {
    let oauth = FakeOAuth::start(Shape::Entra).await;
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = listener.local_addr().unwrap().to_string();
    let cfg = oauth_config(
        dir.path(),
        &oauth,
        "127.0.0.1:9".parse().unwrap(),
        "authorization_code",
        &admin_addr,
        "",
    );
    let admin = start_admin(&cfg, listener).await;
    let c = cfg.clone();
    // The CLI runs its own runtime: a plain thread, as from a shell.
    let code = std::thread::spawn(move || {
        auth_command(
            &c,
            AuthAction::Login {
                device: false,
                identity: None,
                alternate: false,
            },
        )
    })
    .join()
    .unwrap();
    assert_eq!(code, ExitCode::SUCCESS);
    // The relay started a sign-in: the provider was not contacted yet, and
    // no admin token went into any URL.
    assert!(oauth.authorize_requests().is_empty());

    signed_in(&cfg, &oauth, USER, "rt-initial-cli-01");
    let c = cfg.clone();
    let code = std::thread::spawn(move || {
        auth_command(
            &c,
            AuthAction::Logout {
                identity: None,
                alternate: false,
            },
        )
    })
    .join()
    .unwrap();
    assert_eq!(code, ExitCode::SUCCESS);
    let store = TokenStore::new(Settings::from_upstream(&cfg, &cfg.upstream).unwrap().store);
    assert_eq!(store.get(USER).unwrap(), None);
    admin.shutdown.cancel();
    for t in admin.tasks {
        let _ = t.await;
    }
}

#[test]
fn hash_password_makes_argon2id() {
    let phc = hash_password("legacy-app-pw").unwrap();
    assert!(phc.starts_with("$argon2id$v=19$"), "{phc}");
}
