//! End to end with the real binary and fake upstream SMTP servers: failover and failback, durability across SIGKILL, DSNs, backpressure, graceful stop, and no secrets in logs.

mod common;
mod daemon;

use common::fake_smtp::{FakeConfig, FakeSmtp, Fault, Stage};
use daemon::{Daemon, smtp_send, write_config};
use std::sync::Arc;

const MSG: &str =
    "From: App <app@legacy.local>\r\nTo: user@example.com\r\nSubject: e2e\r\n\r\nhello\r\n";

fn smtp_upstream(server: &str, extra: &str) -> String {
    format!("protocol = \"smtp\"\nserver = \"{server}\"\ntls = false\ntimeout_secs = 5\n{extra}")
}

/// Run blocking daemon work off the async test's worker threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

/// Write the config into a new temp dir and start the daemon there.
async fn start(upstream: String) -> (tempfile::TempDir, Arc<Daemon>) {
    daemon::start_in_tempdir(upstream).await
}

/// Send `MSG` through the daemon; returns the final reply.
async fn send(d: &Arc<Daemon>, from: &'static str, rcpts: &'static [&'static str]) -> String {
    daemon::send_async(d, from, rcpts, MSG).await
}

/// A primary that answers every connection with 421.
fn down() -> FakeConfig {
    FakeConfig::default().fault(
        Stage::Greeting,
        Fault::reply("421 4.3.2 Service not available"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_to_the_alternate_stays_there_and_fails_back() {
    let primary = FakeSmtp::start(down()).await;
    let alternate = FakeSmtp::start(FakeConfig::default()).await;
    let (_dir, d) = start(smtp_upstream(
        &primary.addr().to_string(),
        &format!("alternate_server = \"{}\"", alternate.addr()),
    ))
    .await;

    let r = send(&d, "app@legacy.local", &["user@example.com"]).await;
    assert!(r.starts_with("250 2.0.0"), "{r}");
    wait(&d, "delivery via the alternate", || {
        alternate.messages().len() == 1
    })
    .await;
    assert_eq!(primary.messages().len(), 0);
    let (code, status, _) = d.cli(&["status", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(v["route"]["active"], "alternate", "{status}");
    assert!(
        v["route"]["reason"].as_str().unwrap().contains("421"),
        "{status}"
    );

    // The primary recovers, but mailbridge stays on the alternate (sticky).
    primary.clear_faults();
    let r = send(&d, "app@legacy.local", &["user@example.com"]).await;
    assert!(r.starts_with("250"), "{r}");
    wait(&d, "second delivery via the alternate", || {
        alternate.messages().len() == 2
    })
    .await;
    assert_eq!(primary.messages().len(), 0);

    // Operator failback: the next message goes to the primary.
    let (code, out, err) = d.cli(&["failback"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"changed\": true"), "{out}");
    let r = send(&d, "app@legacy.local", &["user@example.com"]).await;
    assert!(r.starts_with("250"), "{r}");
    wait(&d, "delivery via the primary", || {
        primary.messages().len() == 1
    })
    .await;
    assert_eq!(alternate.messages().len(), 2);
    assert!(d.log().contains("switched upstream"), "{}", d.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_never_fails_over() {
    let primary = FakeSmtp::start(FakeConfig::default().fault(
        Stage::Mail,
        Fault::reply("550 5.7.60 SMTP; Client does not have permissions to send as this sender"),
    ))
    .await;
    let alternate = FakeSmtp::start(FakeConfig::default()).await;
    let (_dir, d) = start(smtp_upstream(
        &primary.addr().to_string(),
        &format!("alternate_server = \"{}\"", alternate.addr()),
    ))
    .await;
    let r = send(&d, "", &["user@example.com"]).await;
    assert!(r.starts_with("250"), "{r}");
    wait(&d, "the bounce decision", || d.log().contains("bounced")).await;
    assert_eq!(alternate.connections(), 0, "no failover on 5xx");
    assert!(d.log().contains("5.7.60"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_sigkill_after_250_and_delivers_exactly_once() {
    // The upstream hangs at MAIL FROM, so the message is in flight when killed.
    let up = FakeSmtp::start(FakeConfig::default().fault(Stage::Mail, Fault::Hang)).await;
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &smtp_upstream(&up.addr().to_string(), ""));
    let path = dir.path().to_path_buf();
    let mut d = blocking(move || Daemon::start(&path)).await;
    let addr = d.smtp;
    let r = blocking(move || {
        smtp_send(
            addr,
            "app@legacy.local",
            &["a@example.com", "b@example.com"],
            MSG,
        )
    })
    .await;
    assert!(r.starts_with("250 2.0.0 Ok: queued as "), "{r}");
    d.kill9();
    assert_eq!(d.queued(), 1, "the acknowledged message is on disk");
    up.clear_faults();
    up.drop_connections().await;
    let path = dir.path().to_path_buf();
    let d = std::sync::Arc::new(blocking(move || Daemon::start(&path)).await);
    wait(&d, "delivery after restart", || up.messages().len() == 1).await;
    wait(&d, "the queue to empty", || d.queued() == 0).await;
    let m = &up.messages()[0];
    assert_eq!(m.rcpts, ["a@example.com", "b@example.com"]);
    assert!(String::from_utf8_lossy(&m.data).contains("Subject: e2e"));
    // Nothing is delivered a second time. (The files go before the
    // scheduler forgets the entry, so status may lag a moment.)
    let d2 = d.clone();
    let status_empty = move || {
        let (code, out, _) = d2.cli(&["status", "--json"]);
        code == 0 && out.contains("\"depth\": 0")
    };
    wait(&d, "status to show an empty queue", status_empty).await;
    assert_eq!(up.messages().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_mail_survives_sigterm_and_sigkill_restarts() {
    // Upstream down: mail waits in the queue across a SIGTERM and a SIGKILL restart.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &smtp_upstream(&dead_addr.to_string(), ""));
    let path = dir.path().to_path_buf();
    let mut d = blocking(move || Daemon::start(&path)).await;
    for i in 0..3 {
        let addr = d.smtp;
        let r = blocking(move || {
            smtp_send(
                addr,
                "app@legacy.local",
                &[&format!("u{i}@example.com")],
                MSG,
            )
        })
        .await;
        assert!(r.starts_with("250"), "{r}");
    }
    assert_eq!(d.term(), Some(0), "clean exit on SIGTERM");
    assert!(d.log().contains("stopped"));
    assert_eq!(d.queued(), 3);
    let path = dir.path().to_path_buf();
    let mut d = blocking(move || Daemon::start(&path)).await;
    d.kill9();
    assert_eq!(d.queued(), 3);
    // Now the upstream exists.
    let up = FakeSmtp::start(FakeConfig::default()).await;
    write_config(dir.path(), &smtp_upstream(&up.addr().to_string(), ""));
    let path = dir.path().to_path_buf();
    let d = std::sync::Arc::new(blocking(move || Daemon::start(&path)).await);
    wait(&d, "all three delivered", || {
        up.messages().len() == 3 && d.queued() == 0
    })
    .await;
    let mut rcpts: Vec<String> = up.messages().iter().flat_map(|m| m.rcpts.clone()).collect();
    rcpts.sort();
    assert_eq!(
        rcpts,
        ["u0@example.com", "u1@example.com", "u2@example.com"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failure_sends_one_dsn_and_never_to_the_null_sender() {
    let up = FakeSmtp::start(FakeConfig::default().fault(
        Stage::Rcpt("bad@example.com".into()),
        Fault::reply("550 5.1.1 <bad@example.com>: Recipient address rejected: User unknown"),
    ))
    .await;
    let (_dir, d) = start(smtp_upstream(&up.addr().to_string(), "")).await;
    let r = send(
        &d,
        "app@legacy.local",
        &["good@example.com", "bad@example.com"],
    )
    .await;
    assert!(r.starts_with("250"), "{r}");
    wait(&d, "the message and its DSN", || {
        up.messages().len() == 2 && d.queued() == 0
    })
    .await;
    let msgs = up.messages();
    assert_eq!(msgs[0].rcpts, ["good@example.com"]);
    let dsn = &msgs[1];
    assert_eq!(dsn.from, "", "DSNs are sent from <>");
    assert_eq!(dsn.rcpts, ["app@legacy.local"]);
    let text = String::from_utf8_lossy(&dsn.data);
    assert!(
        text.contains("Content-Type: multipart/report; report-type=delivery-status"),
        "{text}"
    );
    assert!(
        text.contains("Final-Recipient: rfc822; bad@example.com"),
        "{text}"
    );
    assert!(text.contains("550 5.1.1"), "{text}");
    assert!(!text.contains("good@example.com\r\nAction"), "{text}");

    // A message from <> that fails gets no DSN at all.
    let r = send(&d, "", &["bad@example.com"]).await;
    assert!(r.starts_with("250"), "{r}");
    wait(&d, "the bounce", || d.log().contains("no DSN")).await;
    wait(&d, "the queue to empty", || d.queued() == 0).await;
    assert_eq!(up.messages().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_answers_452_and_secrets_stay_out_of_logs() {
    let password = "Sup3r-S3cret-Pa55word";
    // The upstream rejects our credentials, so mail stays queued.
    let up =
        FakeSmtp::start(FakeConfig::default().auth("relay@contoso.com", "another-password")).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = smtp_upstream(
        &up.addr().to_string(),
        &format!(
            "requires_auth = true\nusername = \"relay@contoso.com\"\npassword = \"{password}\""
        ),
    );
    write_config(dir.path(), &cfg);
    let text = std::fs::read_to_string(dir.path().join("config.toml"))
        .unwrap()
        .replace("max_messages", "x")
        .replace("[spool]\n", "[spool]\nmax_messages = 1\n");
    std::fs::write(dir.path().join("config.toml"), text).unwrap();
    let path = dir.path().to_path_buf();
    let d = std::sync::Arc::new(blocking(move || Daemon::start(&path)).await);
    let r = send(&d, "app@legacy.local", &["a@example.com"]).await;
    assert!(r.starts_with("250"), "{r}");
    let r = send(&d, "app@legacy.local", &["b@example.com"]).await;
    assert!(r.starts_with("452 4.3.1"), "{r}");
    wait(&d, "a failed attempt", || d.log().contains("deferred")).await;
    assert!(d.log().to_lowercase().contains("auth"), "{}", d.log());
    let (_, status, _) = d.cli(&["status", "--json"]);
    let (_, check, _) = d.cli(&["check"]);
    let (_, list, _) = d.cli(&["queue", "list"]);
    for (what, text) in [
        ("log", d.log()),
        ("status", status),
        ("check", check),
        ("queue list", list),
    ] {
        assert!(
            !text.contains(password),
            "{what} shows the password:\n{text}"
        );
    }
    assert_eq!(up.messages().len(), 0);
}

async fn wait(d: &Daemon, what: &str, check: impl FnMut() -> bool) {
    daemon::wait_async(d, what, check).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_automatic_probe_returns_to_the_primary_and_sighup_keeps_the_route() {
    let primary = FakeSmtp::start(down()).await;
    let alternate = FakeSmtp::start(FakeConfig::default()).await;
    let (_dir, d) = start(smtp_upstream(
        &primary.addr().to_string(),
        &format!(
            "alternate_server = \"{}\"\nfailback_probe_secs = 1",
            alternate.addr()
        ),
    ))
    .await;
    let r = send(&d, "app@legacy.local", &["user@example.com"]).await;
    assert!(r.starts_with("250"), "{r}");
    wait(&d, "delivery via the alternate", || {
        alternate.messages().len() == 1
    })
    .await;
    let route = |d: &Daemon| -> String {
        let (_, out, _) = d.cli(&["status", "--json"]);
        serde_json::from_str::<serde_json::Value>(&out)
            .map(|v| v["route"]["active"].as_str().unwrap_or("").to_string())
            .unwrap_or_default()
    };
    assert_eq!(route(&d), "alternate");
    // Still down: the probe keeps us on the alternate.
    wait(&d, "a failed probe", || primary.connections() >= 3).await;
    assert_eq!(route(&d), "alternate");
    // Up again: the probe brings us back.
    primary.clear_faults();
    wait(&d, "the probe to fail back", || route(&d) == "primary").await;
    assert!(
        d.log().contains("primary answered the automatic probe"),
        "{}",
        d.log()
    );

    // SIGHUP: reload; the route stays where it is, with its reason.
    primary.set_fault(
        Stage::Greeting,
        Fault::reply("421 4.3.2 Service not available"),
    );
    let r = send(&d, "app@legacy.local", &["user@example.com"]).await;
    assert!(r.starts_with("250"), "{r}");
    wait(&d, "the second failover", || {
        alternate.messages().len() == 2
    })
    .await;
    let reason = |d: &Daemon| -> String {
        let (_, out, _) = d.cli(&["status", "--json"]);
        serde_json::from_str::<serde_json::Value>(&out)
            .map(|v| v["route"]["reason"].as_str().unwrap_or("").to_string())
            .unwrap_or_default()
    };
    let before = reason(&d);
    assert!(before.contains("421"), "{before}");
    d.signal("HUP");
    wait(&d, "the reload", || {
        d.log().contains("configuration reloaded")
    })
    .await;
    assert_eq!(route(&d), "alternate");
    assert_eq!(reason(&d), before);
}
