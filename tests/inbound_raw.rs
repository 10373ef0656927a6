//! Raw-socket tests of the inbound SMTP listener: `serve` on 127.0.0.1 port 0, exact bytes on the wire, an in-test sink.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mailbridge::config::Listen;
use mailbridge::inbound::{Incoming, Settings, Sink, SinkError, serve};
use mailbridge::transport::BoxFuture;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const GREETING: &str = "220 mx.test ESMTP mailbridge\r\n";

fn ehlo_reply(size: usize) -> String {
    format!(
        "250-mx.test\r\n250-SIZE {size}\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n250 PIPELINING\r\n"
    )
}

/// Records accepted messages; can be told to fail.
#[derive(Default)]
struct RecordingSink {
    msgs: Mutex<Vec<Incoming>>,
    fail: Mutex<Option<SinkError>>,
}

impl RecordingSink {
    fn msgs(&self) -> Vec<Incoming> {
        self.msgs.lock().unwrap().clone()
    }
    fn fail_with(&self, e: Option<SinkError>) {
        *self.fail.lock().unwrap() = e;
    }
}

impl Sink for RecordingSink {
    fn accept(&self, msg: Incoming) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            if let Some(e) = *self.fail.lock().unwrap() {
                return Err(e);
            }
            self.msgs.lock().unwrap().push(msg);
            Ok(())
        })
    }
}

struct Server {
    addr: SocketAddr,
    sink: Arc<RecordingSink>,
    shutdown: CancellationToken,
    handle: JoinHandle<()>,
}

fn listen() -> Listen {
    Listen {
        max_message_size: 4096,
        ..Listen::default()
    }
}

async fn start(listen: Listen) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let settings = Arc::new(Settings {
        hostname: "mx.test".into(),
        listen,
    });
    let sink = Arc::new(RecordingSink::default());
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(serve(listener, settings, sink.clone(), shutdown.clone()));
    Server {
        addr,
        sink,
        shutdown,
        handle,
    }
}

/// A raw SMTP client; every read is bounded by `limit` so a failing test ends.
struct Client {
    r: OwnedReadHalf,
    w: Option<OwnedWriteHalf>,
    limit: Duration,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        let (r, w) = TcpStream::connect(addr).await.unwrap().into_split();
        Client {
            r,
            w: Some(w),
            limit: Duration::from_secs(20),
        }
    }

    async fn send(&mut self, data: impl AsRef<[u8]>) {
        self.w
            .as_mut()
            .unwrap()
            .write_all(data.as_ref())
            .await
            .unwrap();
    }

    /// Read exactly as many bytes as `want` has (or until EOF) and compare.
    async fn expect(&mut self, want: &str) {
        let mut got = Vec::new();
        let _ = tokio::time::timeout(self.limit, async {
            let mut buf = [0u8; 4096];
            while got.len() < want.len() {
                let n = want.len() - got.len();
                match self.r.read(&mut buf[..n.min(4096)]).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => got.extend_from_slice(&buf[..k]),
                }
            }
        })
        .await;
        assert_eq!(String::from_utf8_lossy(&got), want);
    }

    /// Read one reply line.
    async fn line(&mut self) -> String {
        let mut got = Vec::new();
        let _ = tokio::time::timeout(self.limit, async {
            let mut b = [0u8; 1];
            while !got.ends_with(b"\r\n") {
                match self.r.read(&mut b).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => got.push(b[0]),
                }
            }
        })
        .await;
        String::from_utf8_lossy(&got).into_owned()
    }

    /// The server closed the connection (EOF or reset), with nothing more to say.
    async fn expect_closed(&mut self) {
        let mut buf = [0u8; 64];
        match tokio::time::timeout(self.limit, self.r.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {}
            Ok(Ok(n)) => panic!(
                "expected close, got {:?}",
                String::from_utf8_lossy(&buf[..n])
            ),
            Err(_) => panic!("expected close, connection still open"),
        }
    }

    /// Greeting, EHLO, MAIL, RCPT and DATA, one command at a time.
    async fn start_data(&mut self, size: usize) {
        self.expect(GREETING).await;
        self.send("EHLO client.example\r\n").await;
        self.expect(&ehlo_reply(size)).await;
        self.send("MAIL FROM:<a@example.com>\r\n").await;
        self.expect("250 2.1.0 Ok\r\n").await;
        self.send("RCPT TO:<b@example.org>\r\n").await;
        self.expect("250 2.1.5 Ok\r\n").await;
        self.send("DATA\r\n").await;
        self.expect("354 End data with <CR><LF>.<CR><LF>\r\n").await;
    }
}

#[tokio::test]
async fn full_transaction() {
    let srv = start(listen()).await;
    let mut c = Client::connect(srv.addr).await;
    c.start_data(4096).await;
    c.send("Subject: test\r\n\r\nline one\r\n..dotted\r\n.\r\n")
        .await;
    let reply = c.line().await;
    let msgs = srv.sink.msgs();
    assert_eq!(msgs.len(), 1, "{reply}");
    let m = &msgs[0];
    assert_eq!(reply, format!("250 2.0.0 Ok: queued as {}\r\n", m.id));
    c.send("QUIT\r\n").await;
    c.expect("221 2.0.0 Bye\r\n").await;
    c.expect_closed().await;

    assert_eq!(m.from, "a@example.com");
    assert_eq!(m.rcpts, ["b@example.org"]);
    assert_eq!(m.helo, "client.example");
    assert_eq!(m.client.ip().to_string(), "127.0.0.1");
    assert_eq!(m.message_id, Some(format!("<{}@mx.test>", m.id)));
    let body = String::from_utf8(m.body.clone()).unwrap();
    let head = format!(
        "Received: from client.example ([127.0.0.1])\r\n\tby mx.test (mailbridge) with ESMTP id {}\r\n\tfor <b@example.org>; ",
        m.id
    );
    assert!(body.starts_with(&head), "{body}");
    let tail = format!(
        "\r\nSubject: test\r\nMessage-ID: <{}@mx.test>\r\nDate: ",
        m.id
    );
    assert!(body.contains(&tail), "{body}");
    assert!(body.ends_with("\r\n\r\nline one\r\n.dotted\r\n"), "{body}");
}

#[tokio::test]
async fn pipelining_answers_in_order() {
    let srv = start(listen()).await;
    let mut c = Client::connect(srv.addr).await;
    c.expect(GREETING).await;
    c.send("EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@y.example>\r\nRCPT TO:<bad>\r\nRCPT TO:<z@y.example>\r\nDATA\r\n")
        .await;
    c.expect(&format!(
        "{}250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n553 5.1.3 Bad recipient address syntax\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n",
        ehlo_reply(4096)
    ))
    .await;
    c.send("hi\r\n.\r\nRSET\r\nQUIT\r\n").await;
    let reply = c.line().await;
    let msgs = srv.sink.msgs();
    assert_eq!(msgs.len(), 1, "{reply}");
    assert_eq!(reply, format!("250 2.0.0 Ok: queued as {}\r\n", msgs[0].id));
    c.expect("250 2.0.0 Ok\r\n221 2.0.0 Bye\r\n").await;
    c.expect_closed().await;
    assert_eq!(msgs[0].rcpts, ["x@y.example", "z@y.example"]);
}

/// Documented choice: a client that talks before the greeting is served as if it pipelined.
#[tokio::test]
async fn early_talker_is_served_in_order() {
    let srv = start(listen()).await;
    let mut c = Client::connect(srv.addr).await;
    c.send("HELO c\r\nQUIT\r\n").await;
    c.expect(&format!("{GREETING}250 mx.test\r\n221 2.0.0 Bye\r\n"))
        .await;
    c.expect_closed().await;
}

#[tokio::test]
async fn bare_lf_message_is_normalised() {
    let srv = start(listen()).await;
    let mut c = Client::connect(srv.addr).await;
    c.start_data(4096).await;
    c.send("Subject: lf\n\nline 1\nline 2\rline 3\r\n.\r\n")
        .await;
    let reply = c.line().await;
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    let msgs = srv.sink.msgs();
    let body = String::from_utf8(msgs[0].body.clone()).unwrap();
    assert!(
        body.ends_with("\r\n\r\nline 1\r\nline 2\r\nline 3\r\n"),
        "{body:?}"
    );
    assert!(body.contains("\r\nSubject: lf\r\n"), "{body:?}");
    let bare = body.bytes().enumerate().any(|(i, b)| {
        (b == b'\r' && body.as_bytes().get(i + 1) != Some(&b'\n'))
            || (b == b'\n' && body.as_bytes()[i - 1] != b'\r')
    });
    assert!(!bare, "{body:?}");
}

#[tokio::test]
async fn smuggling_attempts_yield_one_message() {
    let srv = start(listen()).await;
    let enders = [
        "\n.\n",
        "\n.\r\n",
        "\r.\r",
        "\r\n.\r",
        "\r\n.\n",
        "\r\n.\r\r\n",
        "\r\n\0.\r\n",
        "\r.\r\n",
    ];
    for (i, ender) in enders.iter().enumerate() {
        let mut c = Client::connect(srv.addr).await;
        c.start_data(4096).await;
        c.send(format!(
            "Subject: s\r\n\r\nhello{ender}MAIL FROM:<evil@x.example>\r\nRCPT TO:<victim@x.example>\r\nDATA\r\nsmuggled\r\n.\r\nQUIT\r\n"
        ))
        .await;
        let reply = c.line().await;
        assert!(
            reply.starts_with("250 2.0.0 Ok: queued as "),
            "{ender:?}: {reply}"
        );
        c.expect("221 2.0.0 Bye\r\n").await;
        c.expect_closed().await;
        let msgs = srv.sink.msgs();
        assert_eq!(msgs.len(), i + 1, "{ender:?}");
        let body = String::from_utf8_lossy(&msgs[i].body).into_owned();
        assert!(body.contains("\r\nMAIL FROM:<evil@x.example>\r\nRCPT TO:<victim@x.example>\r\nDATA\r\nsmuggled\r\n"), "{ender:?}: {body:?}");
    }
}

#[tokio::test]
async fn oversize_with_and_without_size() {
    let srv = start(listen()).await;
    let mut c = Client::connect(srv.addr).await;
    c.expect(GREETING).await;
    c.send("EHLO c\r\nMAIL FROM:<a@b.example> SIZE=4097\r\nMAIL FROM:<a@b.example> SIZE=100\r\nRCPT TO:<x@y.example>\r\nDATA\r\n")
        .await;
    c.expect(&format!(
        "{}552 5.3.4 Message size exceeds fixed maximum message size\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n",
        ehlo_reply(4096)
    ))
    .await;
    // 50 lines of 100 bytes: over 4096 stored bytes, announced SIZE notwithstanding.
    let line = format!("{}\r\n", "x".repeat(98));
    c.send(line.repeat(50)).await;
    c.send(".\r\nNOOP\r\n").await;
    c.expect("552 5.3.4 Message size exceeds fixed maximum message size\r\n250 2.0.0 Ok\r\n")
        .await;
    assert!(srv.sink.msgs().is_empty());
}

#[tokio::test]
async fn ten_megabyte_line_without_lf() {
    let srv = start(listen()).await;
    let mut c = Client::connect(srv.addr).await;
    c.expect(GREETING).await;
    let mut w = c.w.take().unwrap();
    let writer = tokio::spawn(async move {
        w.write_all(&vec![b'a'; 10 << 20]).await?;
        w.write_all(b"\r\nQUIT\r\n").await?;
        Ok::<_, std::io::Error>(w)
    });
    c.expect("500 5.5.2 Line too long\r\n221 2.0.0 Bye\r\n")
        .await;
    c.expect_closed().await;
    let _w = writer.await.unwrap().unwrap();
}

#[tokio::test]
async fn one_connection_too_many() {
    let srv = start(Listen {
        max_connections: 2,
        ..listen()
    })
    .await;
    let mut c1 = Client::connect(srv.addr).await;
    c1.expect(GREETING).await;
    let mut c2 = Client::connect(srv.addr).await;
    c2.expect(GREETING).await;
    let mut c3 = Client::connect(srv.addr).await;
    c3.expect("421 4.7.0 Too many connections\r\n").await;
    c3.expect_closed().await;
    // Once a session ends its slot is free again.
    c1.send("QUIT\r\n").await;
    c1.expect("221 2.0.0 Bye\r\n").await;
    c1.expect_closed().await;
    let mut c4 = Client::connect(srv.addr).await;
    c4.expect(GREETING).await;
    c2.send("NOOP\r\n").await;
    c2.expect("250 2.0.0 Ok\r\n").await;
}

#[tokio::test]
async fn sink_failures_are_answered_and_nothing_recorded() {
    let srv = start(listen()).await;
    let mut c = Client::connect(srv.addr).await;
    c.start_data(4096).await;
    srv.sink.fail_with(Some(SinkError::Io));
    c.send("a\r\n.\r\n").await;
    c.expect("451 4.3.0 Error: queue file write error\r\n")
        .await;
    srv.sink.fail_with(Some(SinkError::Full));
    c.send("MAIL FROM:<a@b.example>\r\nRCPT TO:<x@y.example>\r\nDATA\r\n")
        .await;
    c.expect("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n")
        .await;
    c.send("b\r\n.\r\n").await;
    c.expect("452 4.3.1 Insufficient system storage\r\n").await;
    assert!(srv.sink.msgs().is_empty());
    srv.sink.fail_with(None);
    c.send("MAIL FROM:<a@b.example>\r\nRCPT TO:<x@y.example>\r\nDATA\r\nc\r\n.\r\n")
        .await;
    c.expect("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n")
        .await;
    let reply = c.line().await;
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    assert_eq!(srv.sink.msgs().len(), 1);
}

#[tokio::test]
async fn http_request_is_closed() {
    let srv = start(listen()).await;
    let mut c = Client::connect(srv.addr).await;
    c.expect(GREETING).await;
    c.send("GET / HTTP/1.1\r\n").await;
    c.expect("554 5.7.0 Error: this is an SMTP server, not HTTP\r\n")
        .await;
    c.expect_closed().await;
}

// Timeouts run on real time with 1-second limits: the crate's tokio has no
// `test-util` feature, so `start_paused` is not available. That the DATA
// deadline covers the whole transfer is unit-tested in `inbound::tests`.
#[tokio::test]
async fn idle_timeout() {
    let srv = start(Listen {
        idle_timeout_secs: 1,
        ..listen()
    })
    .await;
    let mut c = Client::connect(srv.addr).await;
    c.expect(GREETING).await;
    c.send("EHLO c\r\n").await;
    c.expect(&ehlo_reply(4096)).await;
    let t0 = tokio::time::Instant::now();
    c.expect("421 4.4.2 mx.test Error: timeout exceeded\r\n")
        .await;
    c.expect_closed().await;
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t0.elapsed()
    );
}

/// In DATA the (here shorter) DATA timeout applies, not the idle timeout.
#[tokio::test]
async fn data_timeout() {
    let srv = start(Listen {
        idle_timeout_secs: 60,
        data_timeout_secs: 1,
        ..listen()
    })
    .await;
    let mut c = Client::connect(srv.addr).await;
    c.start_data(4096).await;
    c.send("Subject: slow\r\n\r\nhalf a li").await;
    c.expect("421 4.4.2 mx.test Error: timeout exceeded\r\n")
        .await;
    c.expect_closed().await;
    assert!(srv.sink.msgs().is_empty());
}

#[tokio::test]
async fn shutdown_lets_data_finish_and_refuses_the_rest() {
    let srv = start(listen()).await;
    let mut idle = Client::connect(srv.addr).await;
    idle.expect(GREETING).await;
    idle.send("EHLO c\r\n").await;
    idle.expect(&ehlo_reply(4096)).await;
    let mut busy = Client::connect(srv.addr).await;
    busy.start_data(4096).await;
    busy.send("Subject: s\r\n\r\nfirst half\r\n").await;

    srv.shutdown.cancel();
    idle.expect("421 4.3.2 mx.test Service shutting down\r\n")
        .await;
    idle.expect_closed().await;

    busy.send("second half\r\n.\r\n").await;
    let reply = busy.line().await;
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    busy.expect("421 4.3.2 mx.test Service shutting down\r\n")
        .await;
    busy.expect_closed().await;
    assert_eq!(srv.sink.msgs().len(), 1);

    tokio::time::timeout(Duration::from_secs(10), srv.handle)
        .await
        .expect("serve returned")
        .unwrap();
    match TcpStream::connect(srv.addr).await {
        Err(_) => {}
        Ok(mut s) => {
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).await.unwrap_or(0);
            assert_eq!(n, 0, "{:?}", String::from_utf8_lossy(&buf[..n]));
        }
    }
}
