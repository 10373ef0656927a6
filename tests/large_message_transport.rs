//! A 30 MB message from a real spool through the SMTP transport to a hashing sink: every byte arrives, and the memory allocated while it goes does not grow with the message.
//!
//! Memory is counted by a global allocator that tracks the bytes live in
//! this test process and their high-water mark, so the figure covers the
//! transport, the body reader and the sink alike (one test per binary: no
//! other test allocates meanwhile).

mod alloc;

use std::time::Duration;

use mailbridge::config::HostPort;
use mailbridge::spool::{Meta, Spool};
use mailbridge::transport::smtp::{SmtpAuth, SmtpSettings, SmtpTransport};
use mailbridge::transport::{Body, Envelope, Transport};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;

const SIZE: usize = 30 * 1024 * 1024;
/// Most bytes a delivery may add to the heap at once, whatever the size:
/// a few 64 KiB chunks on both sides and the connection state.
const BOUND: usize = 2 * 1024 * 1024;

/// A 30 MB message with lines that need dot-stuffing and 8-bit text.
fn message() -> Vec<u8> {
    let mut m = Vec::with_capacity(SIZE + 200);
    m.extend_from_slice(
        b"From: a@example.com\r\nTo: b@example.com\r\nSubject: big\r\nMessage-ID: <big@example.com>\r\n\r\n",
    );
    let mut i = 0u64;
    while m.len() < SIZE {
        match i % 5 {
            0 => m.extend_from_slice(format!(".{i} starts with a dot\r\n").as_bytes()),
            1 => m.extend_from_slice(b".\r\n"),
            2 => m.extend_from_slice(
                format!("line {i}: gr\u{fc}\u{df}e \u{e9}t\u{e9}\r\n").as_bytes(),
            ),
            _ => m.extend_from_slice(format!("{i:0>70}\r\n").as_bytes()),
        }
        i += 1;
    }
    m
}

/// Undoes dot-stuffing (RFC 5321 §4.5.2) a byte at a time, with no line
/// buffer, and hashes what it gets; `true` once `CRLF.CRLF` ended the data.
struct Sink {
    hash: Sha256,
    out: Vec<u8>,
    state: St,
    total: u64,
}

#[derive(Clone, Copy)]
enum St {
    LineStart,
    Dot,
    DotCr,
    Mid,
    Cr,
}

impl Sink {
    fn new() -> Sink {
        Sink {
            hash: Sha256::new(),
            out: Vec::with_capacity(64 * 1024),
            state: St::LineStart,
            total: 0,
        }
    }

    fn emit(&mut self, b: u8) {
        self.out.push(b);
        if self.out.len() == self.out.capacity() {
            self.flush();
        }
    }

    fn flush(&mut self) {
        self.hash.update(&self.out);
        self.total += self.out.len() as u64;
        self.out.clear();
    }

    /// Feed one byte; `true` at the end of the data.
    fn feed(&mut self, b: u8) -> bool {
        self.state = match (self.state, b) {
            (St::LineStart, b'.') => St::Dot,
            (St::Dot, b'\r') => St::DotCr,
            (St::DotCr, b'\n') => return true,
            (St::DotCr, _) => panic!("a lone `.` then CR without LF"),
            (St::LineStart | St::Mid | St::Cr, b'\r') => {
                self.emit(b);
                St::Cr
            }
            (St::Cr, b'\n') => {
                self.emit(b);
                St::LineStart
            }
            (_, _) => {
                self.emit(b);
                St::Mid
            }
        };
        false
    }
}

/// A minimal SMTP server on loopback that hashes each message it is sent;
/// answers the digests and sizes over `done`.
async fn sink(listener: TcpListener, done: tokio::sync::mpsc::Sender<([u8; 32], u64)>) {
    let Ok((mut sock, _)) = listener.accept().await else {
        return;
    };
    let mut buf = vec![0u8; 16 * 1024];
    let mut line = Vec::new();
    let _ = sock.write_all(b"220 sink ESMTP\r\n").await;
    let mut data: Option<Sink> = None;
    loop {
        let n = match sock.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut i = 0;
        while i < n {
            if let Some(s) = data.as_mut() {
                let b = buf[i];
                i += 1;
                if s.feed(b) {
                    let mut s = data.take().expect("in data");
                    s.flush();
                    let digest: [u8; 32] = s.hash.finalize().into();
                    let _ = done.send((digest, s.total)).await;
                    let _ = sock.write_all(b"250 2.0.0 queued\r\n").await;
                }
                continue;
            }
            line.push(buf[i]);
            i += 1;
            if !line.ends_with(b"\r\n") {
                assert!(line.len() < 1024, "command line too long");
                continue;
            }
            let cmd = String::from_utf8_lossy(&line).to_ascii_uppercase();
            line.clear();
            let reply: &[u8] = if cmd.starts_with("EHLO") {
                b"250-sink\r\n250-8BITMIME\r\n250 SIZE 100000000\r\n"
            } else if cmd.starts_with("MAIL") || cmd.starts_with("RCPT") || cmd.starts_with("RSET")
            {
                b"250 2.1.0 ok\r\n"
            } else if cmd.starts_with("DATA") {
                data = Some(Sink::new());
                b"354 go on\r\n"
            } else if cmd.starts_with("QUIT") {
                let _ = sock.write_all(b"221 bye\r\n").await;
                return;
            } else {
                b"502 5.5.2 what\r\n"
            };
            if sock.write_all(reply).await.is_err() {
                return;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_30_mb_message_goes_through_smtp_with_bounded_memory_and_every_byte_intact() {
    let dir = tempfile::tempdir().expect("temp dir");
    let spool = Spool::open(dir.path(), 10).expect("spool");
    let want = {
        let msg = message();
        let meta = Meta::new(
            "big1".into(),
            "a@example.com".into(),
            vec!["b@example.com".into()],
            msg.len() as u64,
            0,
        );
        spool.store(&meta, &msg).expect("store");
        (<[u8; 32]>::from(Sha256::digest(&msg)), msg.len() as u64)
    };

    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let server = tokio::spawn(sink(listener, tx));
    let t = SmtpTransport::new(SmtpSettings {
        server: HostPort {
            host: "127.0.0.1".into(),
            port,
        },
        implicit_tls: false,
        starttls: false,
        ca_file: None,
        auth: SmtpAuth::None,
        hostname: "relay.test".into(),
        timeout: Duration::from_secs(60),
    })
    .expect("transport");
    let env = Envelope {
        id: "big1".into(),
        from: "a@example.com".into(),
        rcpts: vec!["b@example.com".into()],
        identity: None,
    };

    let (file, start) = spool.open_body("big1").expect("open body");
    let body = Body::open_from(file, start).expect("read head");
    assert_eq!(body.len(), want.1);
    let mark = alloc::mark();
    let result = t.deliver(&env, &body).await;
    let peak = mark.peak();
    assert!(
        matches!(&result, Ok(r) if r.len() == 1 && r[0].is_ok()),
        "{result:?}"
    );
    let got = tokio::time::timeout(Duration::from_secs(60), rx.recv())
        .await
        .expect("the sink answers")
        .expect("one message");
    assert_eq!(got.1, want.1, "size received");
    assert_eq!(got.0, want.0, "SHA-256 of the message received");
    eprintln!(
        "delivering {} bytes: heap peak {peak} bytes above the start",
        want.1
    );
    assert!(
        peak < BOUND,
        "delivering {} bytes allocated up to {peak} bytes at once",
        want.1
    );

    // The counter does see a whole message held in memory.
    let mark = alloc::mark();
    let whole = body.to_vec().await.expect("read whole");
    assert!(mark.peak() >= whole.len());
    drop(whole);
    drop(t);
    server.abort();
}
