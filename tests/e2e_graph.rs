//! End to end with the real binary, a fake Entra ID token endpoint and the fake Graph: `protocol = "graph"` with client credentials delivers MIME through `sendMail`, Bcc-only recipients included; a 429 delays instead of failing; a Graph failure over to an SMTP alternate.

mod common;
mod daemon;

use common::fake_graph::{FakeGraph, GraphConfig, Reply};
use common::fake_oauth::{CLIENT_ID, CLIENT_SECRET, FakeOAuth, Shape, TENANT};
use common::fake_smtp::{FakeConfig, FakeSmtp};
use daemon::Daemon;
use std::sync::Arc;

const MSG: &str =
    "From: App <app@legacy.local>\r\nTo: boss@contoso.com\r\nSubject: via Graph\r\n\r\nhello\r\n";

fn graph_upstream(oauth: &FakeOAuth, graph: &FakeGraph, extra: &str) -> String {
    format!(
        "protocol = \"graph\"\ngraph_endpoint = \"{}\"\nmailbox = \"relay@contoso.com\"\nrequires_auth = true\nauth = \"oauth\"\ntimeout_secs = 5\n{extra}\n\
         [upstream.oauth]\nprovider = \"office365\"\nflow = \"client_credentials\"\ntenant = \"{TENANT}\"\nclient_id = \"{CLIENT_ID}\"\n\
         client_secret = \"{CLIENT_SECRET}\"\ntoken_url = \"{}\"\n",
        graph.endpoint(),
        oauth.token_url()
    )
}

async fn setup() -> (Arc<FakeOAuth>, FakeGraph) {
    let oauth = Arc::new(FakeOAuth::start(Shape::Entra).await);
    let graph = FakeGraph::start(GraphConfig::default()).await;
    let o = oauth.clone();
    graph.set_token_check(move |t| o.valid_token("app", t));
    (oauth, graph)
}

async fn start(upstream: String) -> (tempfile::TempDir, Arc<Daemon>) {
    daemon::start_in_tempdir(upstream).await
}

async fn send(d: &Arc<Daemon>, rcpts: &'static [&'static str]) -> String {
    daemon::send_async(d, "app@legacy.local", rcpts, MSG).await
}

async fn wait(d: &Daemon, what: &str, check: impl FnMut() -> bool) {
    daemon::wait_async(d, what, check).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_through_sendmail_with_bcc_and_no_secret_in_logs() {
    let (oauth, graph) = setup().await;
    let (_dir, d) = start(graph_upstream(&oauth, &graph, "")).await;
    let r = send(&d, &["boss@contoso.com", "audit@contoso.com"]).await;
    assert!(r.starts_with("250"), "{r}");
    wait(&d, "sendMail", || {
        graph.sent().len() == 1 && d.queued() == 0
    })
    .await;
    let sent = &graph.sent()[0];
    assert_eq!(sent.mailbox, "relay@contoso.com");
    let mut rcpts = sent.recipients.clone();
    rcpts.sort();
    assert_eq!(rcpts, ["audit@contoso.com", "boss@contoso.com"]);
    let mime = String::from_utf8_lossy(sent.mime.as_deref().unwrap_or_default()).into_owned();
    assert!(mime.contains("To: boss@contoso.com"), "{mime}");
    assert!(
        mime.contains("audit@contoso.com"),
        "Bcc carries the envelope-only recipient: {mime}"
    );
    let log = d.log();
    for s in oauth.secrets() {
        assert!(!log.contains(&s), "a secret reached the log");
    }
    let (_, status, _) = d.cli(&["status", "--json"]);
    for s in oauth.secrets() {
        assert!(!status.contains(&s), "a secret reached the status output");
    }
    assert!(status.contains("\"oauth\""), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_delays_and_denial_bounces() {
    let (oauth, graph) = setup().await;
    graph.push(Reply::too_many_requests(1));
    let (_dir, d) = start(graph_upstream(&oauth, &graph, "")).await;
    let r = send(&d, &["boss@contoso.com"]).await;
    assert!(r.starts_with("250"), "{r}");
    wait(&d, "delivery after the 429", || {
        graph.sent().len() == 1 && d.queued() == 0
    })
    .await;
    // Held in its slot through the pause, not sent to the back of the queue.
    assert!(
        d.log().contains("holding the message until the pause ends"),
        "{}",
        d.log()
    );

    graph.push(Reply::send_as_denied());
    let r = send(&d, &["boss@contoso.com"]).await;
    assert!(r.starts_with("250"), "{r}");
    // The refused message, then its DSN through the same route.
    wait(&d, "the DSN", || graph.sent().len() == 2 && d.queued() == 0).await;
    let dsn =
        String::from_utf8_lossy(graph.sent()[1].mime.as_deref().unwrap_or_default()).into_owned();
    assert!(
        dsn.contains("ErrorSendAsDenied") && dsn.contains("multipart/report"),
        "{dsn}"
    );
    assert!(dsn.contains("Status: 5.7.1\r\n"), "{dsn}");
    assert!(
        dsn.contains("From: \"Mail Delivery System\" <relay@contoso.com>\r\n"),
        "the DSN is from the mailbox: {dsn}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graph_unavailable_fails_over_to_an_smtp_alternate() {
    let (oauth, graph) = setup().await;
    for _ in 0..4 {
        graph.push(Reply::unavailable(None));
    }
    let smtp = FakeSmtp::start(FakeConfig::default()).await;
    let alt = format!(
        "[upstream.alternate]\nprotocol = \"smtp\"\nserver = \"{}\"\ntls = false\n",
        smtp.addr()
    );
    let (_dir, d) = start(format!("{}{alt}", graph_upstream(&oauth, &graph, ""))).await;
    let r = send(&d, &["boss@contoso.com"]).await;
    assert!(r.starts_with("250"), "{r}");
    wait(&d, "delivery via the SMTP alternate", || {
        smtp.messages().len() == 1
    })
    .await;
    let (_, status, _) = d.cli(&["status", "--json"]);
    assert!(status.contains("\"active\": \"alternate\""), "{status}");
}
