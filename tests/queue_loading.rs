//! The start-up load runs behind a live server: with the load held (a gate, not a timer), the relay answers 220, stores and delivers new mail, counts the entries not read yet, and deletes or retries one of them; once released, every entry is delivered exactly once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mailbridge::common::BoxFuture;
use mailbridge::config::Listen;
use mailbridge::routing::Router;
use mailbridge::scheduler::{Policy, Scheduler};
use mailbridge::spool::{Meta, Spool};
use mailbridge::transport::{Body, Delivery, Envelope, Failure, Transport};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Accepts everything and records which message ids it carried.
#[derive(Default)]
struct Recorder {
    ids: Mutex<Vec<String>>,
}

impl Recorder {
    fn ids(&self) -> Vec<String> {
        self.ids.lock().unwrap().clone()
    }
}

impl Transport for Recorder {
    fn describe(&self) -> String {
        "recorder://".into()
    }
    fn deliver<'a>(&'a self, env: &'a Envelope, _: &'a Body) -> BoxFuture<'a, Delivery> {
        self.ids.lock().unwrap().push(env.id.clone());
        let r = Ok(env.rcpts.iter().map(|_| Ok(())).collect());
        Box::pin(async move { r })
    }
    fn probe(&self) -> BoxFuture<'_, Result<(), Failure>> {
        Box::pin(async { Ok(()) })
    }
}

fn policy() -> Policy {
    Policy {
        retry_initial: Duration::from_secs(60),
        retry_max: Duration::from_secs(600),
        give_up_after: Duration::from_secs(86_400),
        concurrency: 4,
        hostname: "relay.test".into(),
        sender_name: String::new(),
        reply_to: String::new(),
        identities: Default::default(),
        dsn: mailbridge::scheduler::dsn_policy::DsnPolicy::any(),
        dsn_from: "desk@relay.test".into(),
        dsn_from_name: "Mail Delivery System".into(),
    }
}

/// Wait (bounded) for `f`; a failure guard, not a timing assertion.
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{what} never happened");
}

/// One SMTP transaction; the reply to the end of DATA.
async fn send(addr: std::net::SocketAddr) -> (String, String) {
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    let reply = async |r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>| {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            r.read_line(&mut line).await.unwrap();
            all.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return all;
            }
        }
    };
    let greeting = reply(&mut r).await;
    for cmd in [
        "EHLO app.local",
        "MAIL FROM:<app@legacy.local>",
        "RCPT TO:<b@example.com>",
        "DATA",
    ] {
        w.write_all(format!("{cmd}\r\n").as_bytes()).await.unwrap();
        reply(&mut r).await;
    }
    w.write_all(b"Subject: new\r\n\r\nbody\r\n.\r\n")
        .await
        .unwrap();
    let done = reply(&mut r).await;
    w.write_all(b"QUIT\r\n").await.unwrap();
    (greeting, done)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_is_accepted_and_delivered_while_the_queue_loads() {
    let dir = tempfile::tempdir().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let old = ["old1", "old2", "old3", "old4"];
    {
        let spool = Spool::open(dir.path(), 100).unwrap();
        let body = b"Subject: old\r\n\r\nx\r\n";
        for id in old {
            let m = Meta::new(
                id.into(),
                "app@legacy.local".into(),
                vec!["a@x.test".into()],
                body.len() as u64,
                now,
            );
            spool.store(&m, body).unwrap();
        }
    }
    // Room for five: the four found at start count, before any is read.
    let spool = Arc::new(Spool::open(dir.path(), 5).unwrap());
    assert_eq!(spool.len(), 4);
    let t = Arc::new(Recorder::default());
    let gate = Arc::new(Semaphore::new(0));
    let stop = CancellationToken::new();
    let (s, task) = Scheduler::start_gated(
        spool.clone(),
        Arc::new(Router::new(t.clone(), None)),
        policy(),
        stop.clone(),
        Some(gate.clone()),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let settings = Arc::new(mailbridge::inbound::Settings::new(
        "relay.test",
        Listen::default(),
    ));
    let server = tokio::spawn(mailbridge::inbound::serve(
        listener,
        settings,
        Arc::new(s.clone()),
        stop.clone(),
    ));

    // Nothing read yet: the relay answers and takes new mail.
    let (greeting, done) = send(addr).await;
    assert!(greeting.starts_with("220"), "{greeting}");
    assert!(done.starts_with("250"), "{done}");
    until("the new message delivered", || t.ids().len() == 1).await;
    let stats = s.stats();
    assert!(stats.loading && s.is_loading());
    assert_eq!(stats.to_load, 4);
    // The new message left; the four not read yet are still counted.
    until("the new message removed", || spool.len() == 4).await;
    assert_eq!(s.stats().depth, 4);

    // The operator deletes one not read yet, and retries another.
    assert_eq!(s.delete("old2").await, Ok(true));
    assert_eq!(s.delete("nosuch").await, Ok(false));
    assert!(s.retry_now("old3").await);
    assert!(!s.retry_now("nosuch").await);
    // One arrives again through a new store (a DSN rewritten under its
    // id): it is delivered once, and the load does not enqueue it again.
    let again = spool.read_meta("old4").unwrap();
    s.enqueue(again);
    until("old4 delivered", || t.ids().iter().any(|i| i == "old4")).await;
    assert!(!t.ids().iter().any(|i| i.starts_with("old1")));

    // Let the load run.
    gate.add_permits(100);
    until("the load finished", || !s.is_loading()).await;
    until("the queue drained", || {
        spool.is_empty() && s.stats().in_flight == 0
    })
    .await;
    let mut ids = t.ids();
    let news: Vec<String> = ids.drain(..1).collect();
    assert!(news.iter().all(|i| !old.contains(&i.as_str())), "{news:?}");
    ids.sort();
    assert_eq!(ids, ["old1", "old3", "old4"], "each once; old2 deleted");
    let stats = s.stats();
    assert_eq!((stats.loading, stats.to_load, stats.depth), (false, 0, 0));
    stop.cancel();
    let _ = server.await;
    let _ = task.await;
}
