//! The admin web page's protocol rules over real loopback HTTP: the login form without a session, the session cookie's flags, a wrong token's 401, CSRF refused without the session's token, the `Host` check, `/status` needing the token or a session, log-out, and the settings form (validated like `check`, saved with comments kept, applied by the reloader, read-only without a file).

use std::sync::Arc;

use mailbridge::common::Secret;
use mailbridge::config::Config;
use reqwest::StatusCode;
use reqwest::header::{COOKIE, HOST, LOCATION, SET_COOKIE};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "web-admin-token-for-tests";

const FILE: &str = "# mailbridge test configuration\n\
[spool]\npath = \"spool\"\n\
# The outgoing mail server.\n[upstream]\nprotocol = \"smtp\" # the seed's SMTP\nserver = \"127.0.0.1:2525\"\ntls = false\n\
[admin]\nhostnames = [\"relay.corp.test\"]\n";

struct Admin {
    base: String,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    sched: mailbridge::scheduler::Scheduler,
    dir: tempfile::TempDir,
    http: reqwest::Client,
}

impl Admin {
    async fn stop(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

/// The admin endpoint for `FILE` on a port-0 listener; with `file` the
/// relay knows its configuration file (settings are editable).
async fn start(file: bool) -> Admin {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, FILE).unwrap();
    let cfg = Config::load(&path).unwrap();
    let shutdown = CancellationToken::new();
    let spool = mailbridge::spool::Spool::open(&cfg.path(&cfg.spool.path), 100).unwrap();
    let oauth = Arc::new(mailbridge::oauth::Registries::new());
    let router = Arc::new(mailbridge::routing::from_config(&cfg, &oauth).unwrap());
    let (sched, sched_task) = mailbridge::scheduler::Scheduler::start(
        Arc::new(spool),
        router,
        mailbridge::scheduler::Policy::from_config(&cfg),
        shutdown.clone(),
    );
    let state = Arc::new(mailbridge::admin::AdminState {
        scheduler: sched.clone(),
        token: Secret::new(TOKEN),
        started: std::time::SystemTime::now(),
        reloader: file.then(|| {
            mailbridge::reload::Reloader::new(
                Some(path.clone()),
                sched.clone(),
                cfg.clone(),
                Arc::new(mailbridge::inbound::Settings::from_config(&cfg).unwrap()),
                vec![],
                oauth.clone(),
                mailbridge::transport::governor::Governors::new(),
            )
            .unwrap()
        }),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let extras = mailbridge::admin::Extras::from_config(&cfg, &oauth).unwrap();
    let task = tokio::spawn(mailbridge::admin::serve_with(
        listener,
        state,
        extras,
        shutdown.clone(),
    ));
    let http = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    Admin {
        base,
        shutdown,
        tasks: vec![task, sched_task],
        sched,
        dir,
        http,
    }
}

/// Sign in; the session cookie (`name=value`).
async fn login(a: &Admin) -> String {
    let r = a
        .http
        .post(a.url("/login"))
        .form(&[("token", TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let set = r.headers()[SET_COOKIE].to_str().unwrap().to_string();
    set.split(';').next().unwrap().to_string()
}

/// The CSRF token in a page's forms.
fn csrf(page: &str) -> String {
    let at = page
        .find("name=\"csrf\" value=\"")
        .expect("a form with a CSRF token")
        + 19;
    page[at..].split('"').next().unwrap().to_string()
}

async fn get(a: &Admin, path: &str, cookie: &str) -> (StatusCode, String) {
    let r = a
        .http
        .get(a.url(path))
        .header(COOKIE, cookie)
        .send()
        .await
        .unwrap();
    (r.status(), r.text().await.unwrap())
}

#[tokio::test]
async fn without_a_session_the_page_is_the_login_form() {
    let a = start(true).await;
    let r = a.http.get(a.url("/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers().get(SET_COOKIE).is_none());
    assert_eq!(r.headers()["cache-control"], "no-store");
    let page = r.text().await.unwrap();
    assert!(
        page.contains("<form method=\"post\" action=\"/login\">"),
        "{page}"
    );
    assert!(page.contains("name=\"token\""), "{page}");
    assert!(!page.contains("Queue</a>"), "{page}");
    // Other pages and every form send the browser to the login form.
    for path in ["/queue", "/settings", "/messages/x"] {
        let r = a.http.get(a.url(path)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::SEE_OTHER, "{path}");
        assert_eq!(r.headers()[LOCATION], "/", "{path}");
    }
    let r = a
        .http
        .post(a.url("/ui/failback"))
        .form(&[("csrf", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    // A cookie nobody issued is no session.
    let (code, page) = get(&a, "/", "mailbridge_session=0123abcd").await;
    assert_eq!(code, StatusCode::OK);
    assert!(page.contains("action=\"/login\""));
    a.stop().await;
}

#[tokio::test]
async fn login_sets_a_strict_http_only_cookie_and_a_wrong_token_gets_401() {
    let a = start(true).await;
    let r = a
        .http
        .post(a.url("/login"))
        .form(&[("token", "not-the-token")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.headers().get(SET_COOKIE).is_none());
    let page = r.text().await.unwrap();
    assert!(page.contains("That is not the admin token"), "{page}");
    assert!(page.contains("name=\"token\""), "{page}");

    let r = a
        .http
        .post(a.url("/login"))
        .form(&[("token", TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()[LOCATION], "/");
    let set = r.headers()[SET_COOKIE].to_str().unwrap().to_string();
    let parts: Vec<&str> = set.split(';').map(str::trim).collect();
    let (name, value) = parts[0].split_once('=').unwrap();
    assert_eq!(name, "mailbridge_session");
    assert_eq!(value.len(), 64, "{set}");
    assert_ne!(value, TOKEN);
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(parts.contains(&flag), "{flag} missing in {set}");
    }
    let cookie = parts[0].to_string();
    let (code, page) = get(&a, "/", &cookie).await;
    assert_eq!(code, StatusCode::OK);
    assert!(page.contains("Send a sample mail"), "{page}");
    assert!(
        page.contains("message(s)") || page.contains("messages waiting"),
        "{page}"
    );
    // Neither the token nor the session id is in the page or any URL of it.
    assert!(!page.contains(TOKEN));
    assert!(!page.contains(value));
    // Two sign-ins are two sessions.
    let other = login(&a).await;
    assert_ne!(other, cookie);
    a.stop().await;
}

#[tokio::test]
async fn forms_without_the_session_csrf_token_are_refused() {
    let a = start(true).await;
    let cookie = login(&a).await;
    let (_, page) = get(&a, "/", &cookie).await;
    let token = csrf(&page);
    assert_eq!(token.len(), 64);
    let other = login(&a).await;
    let (_, other_page) = get(&a, "/", &other).await;
    let other_token = csrf(&other_page);
    for (path, form) in [
        ("/ui/failback", vec![]),
        ("/ui/failback", vec![("csrf", "wrong".to_string())]),
        ("/ui/failback", vec![("csrf", other_token.clone())]),
        ("/ui/send-sample", vec![("to", "a@example.com".to_string())]),
        ("/ui/queue/retry-all", vec![]),
        ("/ui/queue/delete", vec![("id", "x".to_string())]),
        (
            "/settings",
            vec![("upstream.server", "evil.example".to_string())],
        ),
        ("/logout", vec![]),
    ] {
        let r = a
            .http
            .post(a.url(path))
            .header(COOKIE, &cookie)
            .form(&form)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{path} {form:?}");
        let page = r.text().await.unwrap();
        assert!(page.contains("Nothing was changed"), "{page}");
    }
    assert!(std::fs::read_to_string(a.dir.path().join("config.toml")).unwrap() == FILE);
    // With the token the same form works.
    let r = a
        .http
        .post(a.url("/ui/failback"))
        .header(COOKIE, &cookie)
        .form(&[("csrf", token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let (_, page) = get(&a, "/", &cookie).await;
    assert!(
        page.contains("The primary server was already in use."),
        "{page}"
    );
    // Log out: the cookie is cleared and the session is gone.
    let r = a
        .http
        .post(a.url("/logout"))
        .header(COOKIE, &cookie)
        .form(&[("csrf", token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert!(
        r.headers()[SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    let (_, page) = get(&a, "/", &cookie).await;
    assert!(page.contains("action=\"/login\""), "{page}");
    a.stop().await;
}

#[tokio::test]
async fn status_needs_the_token_or_a_session_and_foreign_hosts_get_421() {
    let a = start(true).await;
    let r = a.http.get(a.url("/status")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = a
        .http
        .get(a.url("/status"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let cookie = login(&a).await;
    let (code, body) = get(&a, "/status", &cookie).await;
    assert_eq!(code, StatusCode::OK);
    assert!(body.contains("\"route\""), "{body}");
    // A DNS-rebinding page sends its own name: refused, session or not.
    for path in ["/", "/settings", "/status"] {
        let r = a
            .http
            .get(a.url(path))
            .header(HOST, "rebind.evil.test")
            .header(COOKIE, &cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::MISDIRECTED_REQUEST, "{path}");
    }
    let r = a
        .http
        .post(a.url("/login"))
        .header(HOST, "rebind.evil.test")
        .form(&[("token", TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::MISDIRECTED_REQUEST);
    assert!(r.headers().get(SET_COOKIE).is_none());
    // A configured admin.hostnames name is served.
    let r = a
        .http
        .get(a.url("/"))
        .header(HOST, "relay.corp.test")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    a.stop().await;
}

#[tokio::test]
async fn settings_are_validated_saved_with_comments_and_applied() {
    let a = start(true).await;
    let cookie = login(&a).await;
    let (code, page) = get(&a, "/settings", &cookie).await;
    assert_eq!(code, StatusCode::OK);
    assert!(page.contains("value=\"127.0.0.1:2525\""), "{page}");
    for label in [
        "Server Name / IP Address",
        "Alternate Server Name / IP Address",
        "Connect URL",
        "Graph Endpoint",
        "Sender Name",
        "Reply to",
        "Client ID",
        "Proxy server",
    ] {
        assert!(page.contains(label), "{label}");
    }
    let token = csrf(&page);
    let path = a.dir.path().join("config.toml");
    let post = |form: Vec<(&'static str, String)>| {
        let mut form = form;
        form.push(("csrf", token.clone()));
        a.http
            .post(a.url("/settings"))
            .header(COOKIE, &cookie)
            .form(&form)
            .send()
    };
    // Not even the right type: refused, named, nothing written.
    let r = post(vec![
        ("upstream.protocol", "smtp".into()),
        ("upstream.server", "127.0.0.1:2525".into()),
        ("upstream.port", "lots".into()),
    ])
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let page = r.text().await.unwrap();
    assert!(page.contains("Not saved: upstream.port"), "{page}");
    // Refused by the loader (`check`): an SMTP upstream without a server.
    let r = post(vec![
        ("upstream.protocol", "smtp".into()),
        ("upstream.server", "".into()),
    ])
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let page = r.text().await.unwrap();
    assert!(
        page.contains("Not saved:") && page.contains("upstream.server"),
        "{page}"
    );
    assert!(page.contains("field-error"), "{page}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), FILE);
    // A good change: written with the comments kept, and in effect.
    let r = post(vec![
        ("upstream.protocol", "smtp".into()),
        ("upstream.server", "127.0.0.1:2626".into()),
        ("upstream.sender_name", "Help Desk".into()),
        ("upstream.requires_auth", "on".into()),
        ("upstream.username", "relay@example.com".into()),
        ("upstream.password", "pa55word".into()),
    ])
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.starts_with("# mailbridge test configuration\n"),
        "{text}"
    );
    assert!(
        text.contains(
            "# The outgoing mail server.\n[upstream]\nprotocol = \"smtp\" # the seed's SMTP\n"
        ),
        "{text}"
    );
    assert!(text.contains("server = \"127.0.0.1:2626\""), "{text}");
    assert!(text.contains("sender_name = \"Help Desk\""), "{text}");
    assert!(text.contains("hostnames = [\"relay.corp.test\"]"), "{text}");
    let servers = a.sched.router().servers();
    assert!(servers[0].1.contains("127.0.0.1:2626"), "{servers:?}");
    let (_, page) = get(&a, "/settings", &cookie).await;
    assert!(page.contains("Settings saved and applied."), "{page}");
    // The password is stored but never sent back.
    assert!(!page.contains("pa55word"), "{page}");
    assert!(page.contains("stored: leave empty to keep"), "{page}");
    // Saving again without a password keeps it.
    let token2 = csrf(&page);
    let r = a
        .http
        .post(a.url("/settings"))
        .header(COOKIE, &cookie)
        .form(&[
            ("csrf", token2.as_str()),
            ("upstream.protocol", "smtp"),
            ("upstream.server", "127.0.0.1:2626"),
            ("upstream.requires_auth", "on"),
            ("upstream.username", "relay@example.com"),
            ("upstream.password", ""),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("password = \"pa55word\""), "{text}");
    assert!(!text.contains("sender_name"), "{text}");
    a.stop().await;
}

#[tokio::test]
async fn without_a_config_file_settings_are_read_only() {
    let a = start(false).await;
    let cookie = login(&a).await;
    let (code, page) = get(&a, "/settings", &cookie).await;
    assert_eq!(code, StatusCode::OK);
    assert!(page.contains("Settings are read-only"), "{page}");
    assert!(!page.contains("action=\"/settings\""), "{page}");
    let token = csrf(&page);
    let r = a
        .http
        .post(a.url("/settings"))
        .header(COOKIE, &cookie)
        .form(&[("csrf", token.as_str()), ("upstream.server", "x.example")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    a.stop().await;
}

#[tokio::test]
async fn queue_page_lists_shows_headers_and_deletes() {
    let a = start(true).await;
    // A message the (unreachable) upstream cannot take stays queued.
    let spool = a.sched.spool().clone();
    let id = mailbridge::spool::new_id();
    let body =
        b"From: a@example.com\r\nTo: b@example.com\r\nSubject: queued <one>\r\n\r\nhello\r\n";
    let mut meta = mailbridge::spool::Meta::new(
        id.clone(),
        "a@example.com".into(),
        vec!["b@example.com".into()],
        body.len() as u64,
        1_796_150_375,
    );
    meta.next_attempt = u64::MAX / 4;
    spool.store(&meta, body).unwrap();
    let cookie = login(&a).await;
    let (code, page) = get(&a, "/queue", &cookie).await;
    assert_eq!(code, StatusCode::OK);
    assert!(
        page.contains(&id) && page.contains("a@example.com") && page.contains("b@example.com"),
        "{page}"
    );
    assert!(page.contains("2026-12-01 18:39:35 UTC"), "{page}");
    assert!(!page.contains("1796150375"), "{page}");
    let (code, head) = get(&a, &format!("/messages/{id}"), &cookie).await;
    assert_eq!(code, StatusCode::OK);
    assert!(head.contains("Subject: queued &lt;one&gt;"), "{head}");
    assert!(!head.contains("hello"), "{head}");
    let token = csrf(&page);
    // The scheduler does not know this file (stored behind its back): not found.
    let r = a
        .http
        .post(a.url("/ui/queue/delete"))
        .header(COOKIE, &cookie)
        .form(&[("csrf", token.as_str()), ("id", id.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()[LOCATION], "/queue");
    let (_, page) = get(&a, "/queue", &cookie).await;
    assert!(page.contains("is no longer in the queue"), "{page}");
    // Handed to the scheduler, it is deleted.
    a.sched.enqueue(meta);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let r = a
            .http
            .post(a.url("/ui/queue/delete"))
            .header(COOKIE, &cookie)
            .form(&[("csrf", token.as_str()), ("id", id.as_str())])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        let (_, page) = get(&a, "/queue", &cookie).await;
        if page.contains("was deleted without being delivered") {
            assert!(page.contains("0 messages in the queue"), "{page}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{page}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    a.stop().await;
}
