//! The admin page in a real browser: Debian's headless Chromium driven by Playwright (`tests/browser/admin.mjs`) against the real `mailbridge run`, with fake SMTP servers and the fake OAuth provider: sign-in, Connect account, a sample mail through the alternate, the alternate-server message and "Return to the primary server", a settings change in effect after Save, a refused sample mail that leaves nothing queued.
//!
//! Needs `chromium` (apt) and `npm ci` in tests/browser; skips with a reason
//! when they are missing, fails when MAILBRIDGE_REQUIRE_TOOLS is set.
//! `ADMIN_PAGE_SCREENSHOT=/tmp/page.png` keeps a screenshot of the dashboard.

mod common;
mod daemon;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fake_oauth::{ADMIN_TOKEN, CLIENT_ID, CLIENT_SECRET, FakeOAuth, Shape, TENANT};
use common::fake_smtp::{FakeConfig, FakeSmtp, Fault, Stage, XOAuth2Style};
use common::real::free_port;

const USER: &str = "user@contoso.com";

/// Chromium, node and the npm packages are there (else skip, or fail in CI).
fn tools(browser_dir: &Path) -> bool {
    let missing: Vec<&str> = [
        (!Path::new("/usr/bin/chromium").exists())
            .then_some("/usr/bin/chromium (apt-get install -y chromium)"),
        (!common::real::have("node", "--version")).then_some("node"),
        (!browser_dir.join("node_modules/playwright-core").exists())
            .then_some("tests/browser/node_modules (npm ci in tests/browser)"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        !common::real::tools_required(),
        "missing {missing:?} and MAILBRIDGE_REQUIRE_TOOLS is set"
    );
    eprintln!("skipping: missing {missing:?}");
    false
}

fn smtp_fake(oauth: &Arc<FakeOAuth>) -> FakeConfig {
    let o = oauth.clone();
    FakeConfig::default().xoauth2(
        XOAuth2Style::Microsoft,
        Arc::new(move |u, t| o.valid_token(u, t)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_page_in_chromium() {
    let browser_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    if !tools(&browser_dir) {
        return;
    }
    let oauth = Arc::new(FakeOAuth::start(Shape::Entra).await);
    oauth.set(|s| s.consent_identity = USER.into());
    // The alternate takes everything; the server the settings change points to refuses one address.
    let alternate = FakeSmtp::start(smtp_fake(&oauth)).await;
    let second = FakeSmtp::start(smtp_fake(&oauth).fault(
        Stage::Rcpt("fail@example.com".into()),
        Fault::reply("550 5.1.1 <fail@example.com>: Recipient address rejected: User unknown"),
    ))
    .await;
    // The primary refuses connections: nothing listens there.
    let dead = free_port();
    let admin_port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"# mailbridge, as the browser test sets it up
hostname = "mailbridge.test"
log_level = "info"
[listen]
address = "127.0.0.1:0"
[spool]
path = "spool"
[delivery]
retry_initial_secs = 1
retry_max_secs = 2
[admin]
address = "127.0.0.1:{admin_port}"
token = "{ADMIN_TOKEN}"
# The outgoing mail server.
[upstream]
protocol = "smtp"
server = "127.0.0.1:{dead}"
alternate_server = "{alt}"
tls = false
requires_auth = true
auth = "oauth"
username = "{USER}"
timeout_secs = 5
[upstream.oauth]
provider = "office365"
tenant = "{TENANT}"
client_id = "{CLIENT_ID}"
client_secret = "{CLIENT_SECRET}"
authorization_url = "{authorize}"
token_url = "{token}"
redirect_url = "http://127.0.0.1:{admin_port}/oauth/callback"
"#,
        alt = alternate.addr(),
        authorize = oauth.authorize_url(),
        token = oauth.token_url(),
    );
    std::fs::write(dir.path().join("config.toml"), config).unwrap();
    let path = dir.path().to_path_buf();
    let d = tokio::task::spawn_blocking(move || daemon::Daemon::start(&path))
        .await
        .unwrap();
    assert_eq!(d.admin.port(), admin_port);

    let profile = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("node");
    cmd.arg(browser_dir.join("admin.mjs"))
        .current_dir(&browser_dir)
        .env("MB_URL", format!("http://127.0.0.1:{admin_port}"))
        .env("MB_TOKEN", ADMIN_TOKEN)
        .env("MB_IDENTITY", USER)
        .env("MB_NEW_SERVER", second.addr().to_string())
        .env("MB_USER_DATA_DIR", profile.path())
        .env(
            "MB_SCREENSHOT",
            std::env::var("ADMIN_PAGE_SCREENSHOT").unwrap_or_default(),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = tokio::task::spawn_blocking(move || {
        let mut child = daemon::reaper::spawn(cmd).expect("start node");
        // Chromium and the page take seconds; a hung browser is stopped.
        let deadline = Instant::now() + Duration::from_secs(180);
        let status = loop {
            if let Ok(Some(st)) = child.try_wait() {
                break Some(st);
            }
            if Instant::now() > deadline {
                daemon::reaper::kill_group(&mut child);
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // Stop whatever the script left behind (its Chromium) with it.
        daemon::reaper::kill_group(&mut child);
        let read = |r: Option<&mut dyn std::io::Read>| {
            let mut s = String::new();
            if let Some(r) = r {
                let _ = r.read_to_string(&mut s);
            }
            s
        };
        let stdout = read(child.stdout.as_mut().map(|r| r as &mut dyn std::io::Read));
        let stderr = read(child.stderr.as_mut().map(|r| r as &mut dyn std::io::Read));
        (status, stdout, stderr)
    })
    .await
    .unwrap();
    let (status, stdout, stderr) = out;
    assert!(
        status.is_some_and(|s| s.success()),
        "browser script failed ({status:?}):\n{stdout}\n{stderr}\nmailbridge log:\n{}",
        d.log()
    );
    assert!(stdout.contains("all steps passed"), "{stdout}");

    // What the page did, seen from the outside.
    let alt = alternate.messages();
    assert_eq!(alt.len(), 1, "one sample through the alternate");
    assert_eq!(alt[0].rcpts, ["ok@example.com"]);
    assert_eq!(alt[0].auth, Some((USER.into(), "XOAUTH2".into())));
    let sec = second.messages();
    assert_eq!(
        sec.len(),
        1,
        "one sample through the server set on the page"
    );
    assert_eq!(sec[0].rcpts, ["ok2@example.com"]);
    let text = std::fs::read_to_string(dir.path().join("config.toml")).unwrap();
    assert!(
        text.contains(&format!("server = \"{}\"", second.addr())),
        "{text}"
    );
    assert!(text.contains("sender_name = \"Help Desk\""), "{text}");
    assert!(
        text.starts_with("# mailbridge, as the browser test sets it up\n"),
        "{text}"
    );
    assert!(
        text.contains("# The outgoing mail server.\n[upstream]\n"),
        "{text}"
    );
    assert_eq!(d.queued(), 0, "the refused sample was left queued");
    assert!(!d.log().contains(ADMIN_TOKEN) && !d.log().contains(CLIENT_SECRET));
    alternate.shutdown().await;
    second.shutdown().await;
}
