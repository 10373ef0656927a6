//! Raw-socket tests of the inbound SMTP listener: `serve` on 127.0.0.1 port 0, exact bytes on the wire, an in-test sink.

mod inbound_support;

use std::time::Duration;

use inbound_support::*;
use mailbridge::config::Listen;
use mailbridge::inbound::{Settings, SinkError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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
        ehlo_reply(4096, &[])
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

/// hannob/smtpsmug's `CRLF NUL . CRLF`: not an end of data, and the NUL is
/// never forwarded: refused after the real end by default (`550 5.6.0`),
/// removed with `nul_bytes = "strip"`.
#[tokio::test]
async fn nul_smuggling_is_refused_or_stripped() {
    let data = "Subject: s\r\n\r\nhello\r\n\0.\r\nMAIL FROM:<evil@x.example>\r\nRCPT TO:<victim@x.example>\r\nDATA\r\nsmuggled\r\n.\r\nQUIT\r\n";
    let srv = start(listen()).await;
    let mut c = Client::connect(srv.addr).await;
    c.start_data(4096).await;
    c.send(data).await;
    c.expect("550 5.6.0 NUL characters are not allowed in message data\r\n221 2.0.0 Bye\r\n")
        .await;
    c.expect_closed().await;
    assert!(srv.sink.msgs().is_empty());

    let srv = start(Listen {
        nul_bytes: mailbridge::config::NulBytes::Strip,
        ..listen()
    })
    .await;
    let mut c = Client::connect(srv.addr).await;
    c.start_data(4096).await;
    c.send(data).await;
    let reply = c.line().await;
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    c.expect("221 2.0.0 Bye\r\n").await;
    let msgs = srv.sink.msgs();
    assert_eq!(msgs.len(), 1);
    assert!(!msgs[0].body.contains(&0));
    let body = String::from_utf8_lossy(&msgs[0].body).into_owned();
    assert!(
        body.ends_with("\r\n\r\nhello\r\n.\r\nMAIL FROM:<evil@x.example>\r\nRCPT TO:<victim@x.example>\r\nDATA\r\nsmuggled\r\n"),
        "{body:?}"
    );
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
        ehlo_reply(4096, &[])
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
    let (r, mut w) = TcpStream::connect(srv.addr).await.unwrap().into_split();
    let mut c = Client::wrap(tokio::io::join(r, tokio::io::empty()));
    c.expect(GREETING).await;
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

// Timeouts run on paused time: tokio jumps the clock forward whenever every
// task waits, so a 300 s limit takes no real time. That the DATA deadline
// covers the whole transfer is unit-tested in `inbound::tests`.
#[tokio::test(start_paused = true)]
async fn idle_timeout() {
    let srv = start(Listen {
        idle_timeout_secs: 300,
        ..listen()
    })
    .await;
    let mut c = Client::connect(srv.addr).await;
    c.limit = Duration::from_secs(3600);
    c.expect(GREETING).await;
    c.send("EHLO c\r\n").await;
    c.expect(&ehlo_reply(4096, &[])).await;
    let t0 = tokio::time::Instant::now();
    c.expect("421 4.4.2 mx.test Error: timeout exceeded\r\n")
        .await;
    c.expect_closed().await;
    // Not before the limit, and not much after it.
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_secs(300) && waited < Duration::from_secs(302),
        "{waited:?}"
    );
}

/// In DATA the DATA timeout applies, not the idle timeout, and it covers the
/// whole transfer: a client dripping a byte every 50 s (within the idle
/// timeout) is cut off at 120 s.
#[tokio::test(start_paused = true)]
async fn data_timeout() {
    let srv = start(Listen {
        idle_timeout_secs: 60,
        data_timeout_secs: 120,
        ..listen()
    })
    .await;
    let mut c = Client::connect(srv.addr).await;
    c.limit = Duration::from_secs(3600);
    c.start_data(4096).await;
    let t0 = tokio::time::Instant::now();
    c.send("Subject: slow\r\n\r\nhalf a li").await;
    tokio::time::sleep(Duration::from_secs(50)).await;
    c.send("n").await;
    tokio::time::sleep(Duration::from_secs(50)).await;
    c.send("e").await;
    c.expect("421 4.4.2 mx.test Error: timeout exceeded\r\n")
        .await;
    c.expect_closed().await;
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_secs(120) && waited < Duration::from_secs(122),
        "{waited:?}"
    );
    assert!(srv.sink.msgs().is_empty());
}

#[tokio::test]
async fn shutdown_lets_data_finish_and_refuses_the_rest() {
    let srv = start(listen()).await;
    let mut idle = Client::connect(srv.addr).await;
    idle.expect(GREETING).await;
    idle.send("EHLO c\r\n").await;
    idle.expect(&ehlo_reply(4096, &[])).await;
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

    let mut srv = srv;
    tokio::time::timeout(Duration::from_secs(10), srv.handle.take().unwrap())
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

/// Read from a plain socket exactly `want.len()` bytes (or to EOF) and compare.
async fn expect_raw(s: &mut TcpStream, want: &str) {
    let mut got = vec![0u8; want.len()];
    let n = tokio::time::timeout(Duration::from_secs(20), async {
        let mut n = 0;
        while n < got.len() {
            match s.read(&mut got[n..]).await {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k,
            }
        }
        n
    })
    .await
    .unwrap_or(0);
    assert_eq!(String::from_utf8_lossy(&got[..n]), want);
}

/// CVE-2011-0411: a command pipelined behind STARTTLS in cleartext is not
/// honoured inside TLS, and the session starts over after the handshake.
#[tokio::test]
async fn starttls_discards_pipelined_mail_and_resets() {
    let certs = certs();
    let srv = start_with(secure(listen(), &certs)).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    expect_raw(&mut s, GREETING).await;
    s.write_all(b"EHLO c\r\n").await.unwrap();
    expect_raw(&mut s, &ehlo_reply(4096, &["STARTTLS", "AUTH PLAIN LOGIN"])).await;
    s.write_all(b"STARTTLS\r\nMAIL FROM:<injected@x.example>\r\n")
        .await
        .unwrap();
    expect_raw(&mut s, "220 2.0.0 Ready to start TLS\r\n").await;
    let tls = tls_client(&certs, s).await.unwrap();
    let mut c = Client::wrap(tls);
    // Had the injected MAIL been kept, this would be "503 nested MAIL" or a
    // stray "250 2.1.0" would come first; instead the session knows nothing.
    c.send("MAIL FROM:<a@b.example>\r\n").await;
    c.expect("503 5.5.1 Error: send HELO/EHLO first\r\n").await;
    c.send("EHLO c\r\n").await;
    c.expect(&ehlo_reply(4096, &["AUTH PLAIN LOGIN"])).await;
    c.send("STARTTLS\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@y.example>\r\nDATA\r\nhi\r\n.\r\n")
        .await;
    c.expect("503 5.5.1 Error: TLS already active\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n")
        .await;
    let reply = c.line().await;
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    let msgs = srv.sink.msgs();
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].from, "a@b.example");
    assert!(String::from_utf8_lossy(&msgs[0].body).contains(" with ESMTPS id "));
}

/// Plaintext sent right after STARTTLS, before the client's handshake, is
/// not TLS: the handshake fails and the connection closes.
#[tokio::test]
async fn cleartext_after_starttls_breaks_the_handshake() {
    let certs = certs();
    let srv = start_with(secure(listen(), &certs)).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    expect_raw(&mut s, GREETING).await;
    s.write_all(b"EHLO c\r\nSTARTTLS\r\n").await.unwrap();
    expect_raw(
        &mut s,
        &format!(
            "{}220 2.0.0 Ready to start TLS\r\n",
            ehlo_reply(4096, &["STARTTLS", "AUTH PLAIN LOGIN"])
        ),
    )
    .await;
    s.write_all(b"MAIL FROM:<injected@x.example>\r\n")
        .await
        .unwrap();
    let mut c = Client::wrap(s);
    // At most a TLS alert record (content type 21), never an SMTP reply.
    let rest = c.read_to_close().await;
    assert!(rest.is_empty() || rest[0] == 21, "{rest:?}");
    assert!(srv.sink.msgs().is_empty());
}

/// With `auth_cleartext_loopback = false`, AUTH is neither offered nor
/// accepted before TLS (clients here are always loopback, so this is the
/// policy a remote client gets); after STARTTLS it works.
#[tokio::test]
async fn auth_before_tls_is_refused_then_works_inside_tls() {
    let certs = certs();
    let srv = start_with(secure(
        Listen {
            auth_cleartext_loopback: false,
            require_auth: true,
            ..listen()
        },
        &certs,
    ))
    .await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    expect_raw(&mut s, GREETING).await;
    s.write_all(
        b"EHLO c\r\nAUTH PLAIN AGFwcABjb3JyZWN0IGhvcnNl\r\nMAIL FROM:<a@b.example>\r\nSTARTTLS\r\n",
    )
    .await
    .unwrap();
    expect_raw(
        &mut s,
        &format!(
            "{}538 5.7.11 Encryption required for requested authentication mechanism\r\n530 5.7.0 Authentication required\r\n220 2.0.0 Ready to start TLS\r\n",
            ehlo_reply(4096, &["STARTTLS"])
        ),
    )
    .await;
    let mut c = Client::wrap(tls_client(&certs, s).await.unwrap());
    c.send("EHLO c\r\n").await;
    c.expect(&ehlo_reply(4096, &["AUTH PLAIN LOGIN"])).await;
    // "\0app\0correct horse"
    c.send("AUTH PLAIN AGFwcABjb3JyZWN0IGhvcnNl\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@y.example>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n")
        .await;
    c.expect("235 2.7.0 Authentication successful\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n")
        .await;
    let reply = c.line().await;
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    c.expect("221 2.0.0 Bye\r\n").await;
    let msgs = srv.sink.msgs();
    assert_eq!(msgs[0].auth_user.as_deref(), Some(USER));
    assert!(String::from_utf8_lossy(&msgs[0].body).contains(" with ESMTPSA id "));
}

/// A shared buffer the log subscriber writes to.
#[derive(Clone, Default)]
struct LogBuf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A brute-forcing client (loopback, cleartext allowed) gets `535` for an
/// unknown user and a wrong password alike, then `421` and the door; no
/// password shows in any reply or log line.
#[tokio::test]
async fn brute_force_is_cut_off_and_passwords_stay_secret() {
    let logs = LogBuf::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let certs = certs();
    let srv = start_with(secure(listen(), &certs)).await;
    let mut c = Client::connect(srv.addr).await;
    c.expect(GREETING).await;
    c.send("EHLO c\r\n").await;
    c.expect(&ehlo_reply(4096, &["STARTTLS", "AUTH PLAIN LOGIN"]))
        .await;
    let bad = "535 5.7.8 Authentication credentials invalid\r\n";
    // "\0app\0hunter2", then LOGIN as "nobody" / "correct horse", then "\0app\0letmein".
    c.send("AUTH PLAIN AGFwcABodW50ZXIy\r\n").await;
    c.expect(bad).await;
    c.send("AUTH LOGIN bm9ib2R5\r\n").await;
    c.expect("334 UGFzc3dvcmQ6\r\n").await;
    c.send("Y29ycmVjdCBob3JzZQ==\r\n").await;
    c.expect(bad).await;
    c.send("AUTH PLAIN AGFwcABsZXRtZWlu\r\n").await;
    c.expect(&format!(
        "{bad}421 4.7.0 Too many authentication failures\r\n"
    ))
    .await;
    c.expect_closed().await;
    // A good login still works on a new connection (no lock-out of the user).
    let mut c = Client::connect(srv.addr).await;
    c.expect(GREETING).await;
    c.send("EHLO c\r\nAUTH PLAIN AGFwcABjb3JyZWN0IGhvcnNl\r\nQUIT\r\n")
        .await;
    c.expect(&format!(
        "{}235 2.7.0 Authentication successful\r\n221 2.0.0 Bye\r\n",
        ehlo_reply(4096, &["STARTTLS", "AUTH PLAIN LOGIN"])
    ))
    .await;
    c.expect_closed().await;
    let logs = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    assert!(logs.contains("authentication failed"), "{logs}");
    for secret in [
        "hunter2",
        "letmein",
        "correct horse",
        "AGFwcABodW50ZXIy",
        "Y29ycmVjdCBob3JzZQ",
        "AGFwcABjb3JyZWN0IGhvcnNl",
    ] {
        assert!(!logs.contains(secret), "{secret} in logs: {logs}");
    }
}

/// A client outside `allow_clients` (127.0.0.2 when only 127.0.0.1 may
/// connect) gets `554 5.7.1` at once, whatever it sends, and nothing is queued.
#[tokio::test]
async fn client_outside_the_allow_list_is_refused() {
    let srv = start(Listen {
        allow_clients: vec!["127.0.0.1/32".parse().unwrap()],
        ..listen()
    })
    .await;
    let (r, mut w) = {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        socket.connect(srv.addr).await.unwrap().into_split()
    };
    let _ = w
        .write_all(
            b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@y.example>\r\nDATA\r\nhi\r\n.\r\n",
        )
        .await;
    let mut c = Client::wrap(tokio::io::join(r, tokio::io::empty()));
    c.expect("554 5.7.1 Access denied\r\n").await;
    c.expect_closed().await;
    assert!(srv.sink.msgs().is_empty());
    // 127.0.0.1 is still welcome.
    let mut c = Client::connect(srv.addr).await;
    c.expect(GREETING).await;
}

#[tokio::test]
async fn per_ip_connection_limit() {
    let srv = start(Listen {
        max_connections_per_ip: 2,
        ..listen()
    })
    .await;
    let mut a1 = Client::connect_from("127.0.0.2", srv.addr).await;
    a1.expect(GREETING).await;
    let mut a2 = Client::connect_from("127.0.0.2", srv.addr).await;
    a2.expect(GREETING).await;
    let mut a3 = Client::connect_from("127.0.0.2", srv.addr).await;
    a3.expect("421 4.7.0 Too many connections from your address\r\n")
        .await;
    a3.expect_closed().await;
    // Another address is not affected.
    let mut b = Client::connect_from("127.0.0.3", srv.addr).await;
    b.expect(GREETING).await;
    // A slot comes back when a session ends.
    a1.send("QUIT\r\n").await;
    a1.expect("221 2.0.0 Bye\r\n").await;
    a1.expect_closed().await;
    let mut a4 = Client::connect_from("127.0.0.2", srv.addr).await;
    a4.expect(GREETING).await;
}

#[tokio::test]
async fn domain_lists_refuse_and_queue_nothing() {
    let srv = start(Listen {
        allowed_sender_domains: vec!["example.com".into()],
        allowed_recipient_domains: vec!["example.org".into()],
        ..listen()
    })
    .await;
    let mut c = Client::connect(srv.addr).await;
    c.expect(GREETING).await;
    c.send("EHLO c\r\nMAIL FROM:<a@evil.example>\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<x@elsewhere.example>\r\nDATA\r\n")
        .await;
    c.expect(&format!(
        "{}550 5.7.1 Sender address rejected: domain not allowed\r\n250 2.1.0 Ok\r\n550 5.7.1 Relay access denied\r\n503 5.5.1 Error: need RCPT command\r\n",
        ehlo_reply(4096, &[])
    ))
    .await;
    assert!(srv.sink.msgs().is_empty());
}

/// Documented choice: text lines over 1000 octets are accepted and passed on
/// unchanged (not truncated, not folded); only the total size is limited.
#[tokio::test]
async fn long_text_lines_pass_unchanged() {
    let srv = start(Listen {
        max_message_size: 100_000,
        ..listen()
    })
    .await;
    let mut c = Client::connect(srv.addr).await;
    c.start_data(100_000).await;
    let long: String = (0..5000).map(|i| (b'a' + (i % 26) as u8) as char).collect();
    c.send(format!("Subject: long\r\n\r\n{long}\r\n.{long}\r\n.\r\n"))
        .await;
    let reply = c.line().await;
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    let body = String::from_utf8(srv.sink.msgs()[0].body.clone()).unwrap();
    assert!(
        body.ends_with(&format!("\r\n\r\n{long}\r\n{long}\r\n")),
        "{}",
        &body[..200]
    );
}

#[tokio::test]
async fn mail_loop_is_refused() {
    let srv = start(listen()).await;
    let mut c = Client::connect(srv.addr).await;
    c.start_data(4096).await;
    c.send(format!(
        "{}Subject: loop\r\n\r\nx\r\n.\r\n",
        "Received: by hop\r\n".repeat(31)
    ))
    .await;
    c.expect("554 5.4.6 Too many hops (mail loop)\r\n").await;
    assert!(srv.sink.msgs().is_empty());
}

#[tokio::test]
async fn recipients_beyond_the_limit_get_452_and_earlier_ones_are_kept() {
    let srv = start(listen()).await;
    let mut c = Client::connect(srv.addr).await;
    c.expect(GREETING).await;
    let mut cmds = String::from("EHLO c\r\nMAIL FROM:<a@b.example>\r\n");
    for i in 0..101 {
        cmds.push_str(&format!("RCPT TO:<r{i}@y.example>\r\n"));
    }
    cmds.push_str("DATA\r\nhi\r\n.\r\n");
    c.send(cmds).await;
    c.expect(&format!(
        "{}250 2.1.0 Ok\r\n{}452 4.5.3 Too many recipients\r\n354 End data with <CR><LF>.<CR><LF>\r\n",
        ehlo_reply(4096, &[]),
        "250 2.1.5 Ok\r\n".repeat(100)
    ))
    .await;
    let reply = c.line().await;
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    let msgs = srv.sink.msgs();
    assert_eq!(msgs[0].rcpts.len(), 100);
    assert_eq!(msgs[0].rcpts[99], "r99@y.example");
}

#[tokio::test]
async fn implicit_tls_listener() {
    let certs = certs();
    let srv = start_on("127.0.0.1:0", secure(listen(), &certs), true).await;
    let tcp = TcpStream::connect(srv.addr).await.unwrap();
    let mut c = Client::wrap(tls_client(&certs, tcp).await.unwrap());
    c.expect(GREETING).await;
    // No STARTTLS inside TLS; AUTH offered.
    c.send("EHLO c\r\nSTARTTLS\r\nAUTH PLAIN AGFwcABjb3JyZWN0IGhvcnNl\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@y.example>\r\nDATA\r\nhi\r\n.\r\n")
        .await;
    c.expect(&format!(
        "{}503 5.5.1 Error: TLS already active\r\n235 2.7.0 Authentication successful\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n",
        ehlo_reply(4096, &["AUTH PLAIN LOGIN"])
    ))
    .await;
    let reply = c.line().await;
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    assert!(String::from_utf8_lossy(&srv.sink.msgs()[0].body).contains(" with ESMTPSA id "));
    // A cleartext client on the TLS port gets nothing and is closed.
    let mut plain = Client::connect(srv.addr).await;
    plain.send("EHLO c\r\n").await;
    let rest = plain.read_to_close().await;
    assert!(rest.is_empty() || rest[0] == 21, "{rest:?}");
}

/// Without a certificate, the implicit-TLS entry point does not serve at all.
#[tokio::test]
async fn implicit_tls_without_certificate_returns() {
    let mut srv = start_on("127.0.0.1:0", Settings::new("mx.test", listen()), true).await;
    tokio::time::timeout(Duration::from_secs(10), srv.handle.take().unwrap())
        .await
        .expect("returned at once")
        .unwrap();
}

/// A 30 MB message over a real socket: the listener hands it to the message
/// file in writes no larger than the session's buffer (plus a line), so its
/// memory does not grow with the message, and every byte arrives.
#[tokio::test]
async fn a_large_message_is_written_in_bounded_pieces() {
    let srv = start(Listen {
        max_message_size: 40_000_000,
        ..listen()
    })
    .await;
    let mut c = Client::connect(srv.addr).await;
    c.start_data(40_000_000).await;
    let line = format!("{}\r\n", "q".repeat(998));
    c.send("Subject: large\r\n\r\n").await;
    let chunk = line.repeat(1000);
    for _ in 0..30 {
        c.send(&chunk).await;
    }
    c.send(".\r\n").await;
    let reply = c.line().await;
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    let msgs = srv.sink.msgs();
    assert_eq!(msgs.len(), 1);
    let body = &msgs[0].body;
    let want_tail = [b"\r\n\r\n".as_slice(), chunk.repeat(30).as_bytes()].concat();
    assert!(body.ends_with(&want_tail), "body changed");
    let cap = mailbridge::inbound::receiving::BODY_BUFFER;
    let widest = srv.sink.widest_write();
    assert!(widest <= cap + 1000, "a write of {widest} bytes");
    assert!(widest >= cap / 2, "written in pieces of {widest} bytes?");
}
