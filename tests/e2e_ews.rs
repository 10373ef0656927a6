//! End to end with the real binary and the fake EWS endpoint: `protocol = "ews"` delivers through CreateItem, envelope-only recipients travel as Bcc, a busy server slows delivery down, and a permission error reaches the sender as one DSN.

mod common;
mod daemon;

use common::fake_ews::{FakeAuth, FakeEws, Reply};
use daemon::Daemon;
use std::sync::Arc;

const MSG: &str =
    "From: App <app@legacy.local>\r\nTo: boss@contoso.com\r\nSubject: via EWS\r\n\r\nhello\r\n";

async fn start(fake: &FakeEws) -> (tempfile::TempDir, Arc<Daemon>) {
    daemon::start_in_tempdir(format!(
        "protocol = \"ews\"\nconnect_url = \"{}\"\nrequires_auth = true\nusername = \"relay@contoso.com\"\npassword = \"Ews-Pa55\"\ntimeout_secs = 5",
        fake.url()
    ))
    .await
}

async fn send(d: &Arc<Daemon>, rcpts: &'static [&'static str]) -> String {
    daemon::send_async(d, "app@legacy.local", rcpts, MSG).await
}

async fn wait(d: &Daemon, what: &str, check: impl FnMut() -> bool) {
    daemon::wait_async(d, what, check).await
}

fn created(fake: &FakeEws) -> Vec<String> {
    fake.requests()
        .iter()
        .filter(|r| r.operation.as_deref() == Some("CreateItem") && r.status == 200)
        .map(|r| String::from_utf8_lossy(r.mime.as_deref().unwrap_or_default()).into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_with_bcc_after_a_busy_server() {
    let fake = FakeEws::start(FakeAuth::basic("relay@contoso.com", "Ews-Pa55")).await;
    fake.push(Reply::server_busy(Some(25)));
    let (_dir, d) = start(&fake).await;
    let r = send(&d, &["boss@contoso.com", "audit@contoso.com"]).await;
    assert!(r.starts_with("250"), "{r}");
    wait(&d, "the CreateItem", || {
        created(&fake).len() == 1 && d.queued() == 0
    })
    .await;
    let mime = &created(&fake)[0];
    assert!(
        mime.contains("Bcc: audit@contoso.com") || mime.contains("Bcc: <audit@contoso.com>"),
        "{mime}"
    );
    assert!(mime.contains("To: boss@contoso.com"), "{mime}");
    assert!(
        d.log().contains("ErrorServerBusy"),
        "the busy answer was a deferral:\n{}",
        d.log()
    );
    assert!(!d.log().contains("Ews-Pa55"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_as_denied_bounces_once() {
    let fake = FakeEws::start(FakeAuth::basic("relay@contoso.com", "Ews-Pa55")).await;
    fake.push(Reply::send_as_denied());
    let (_dir, d) = start(&fake).await;
    let r = send(&d, &["boss@contoso.com"]).await;
    assert!(r.starts_with("250"), "{r}");
    // The refused original (EWS answers HTTP 200 with ResponseClass="Error"), then the DSN.
    wait(&d, "the DSN", || {
        created(&fake).len() == 2 && d.queued() == 0
    })
    .await;
    let all = created(&fake);
    assert!(all[0].contains("Subject: via EWS"));
    let dsn = &all[1];
    assert!(
        dsn.contains("multipart/report") && dsn.contains("ErrorSendAsDenied"),
        "{dsn}"
    );
    assert!(dsn.contains("app@legacy.local"), "{dsn}");
}
