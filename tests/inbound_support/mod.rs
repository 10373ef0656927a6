//! Shared helpers for the inbound tests: a recording sink, a server on 127.0.0.1 port 0, a raw client, test certificates and users.

// Each test file compiles this module on its own and uses only part of it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use argon2::password_hash::{PasswordHasher, SaltString};
use mailbridge::common::BoxFuture;
use mailbridge::config::{Listen, User};
use mailbridge::inbound::{
    Incoming, MessageFile, Settings, Sink, SinkError, serve, serve_implicit_tls,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const GREETING: &str = "220 mx.test ESMTP mailbridge\r\n";

/// The EHLO reply with these extra keywords before PIPELINING.
pub fn ehlo_reply(size: usize, extra: &[&str]) -> String {
    let mut s = format!(
        "250-mx.test\r\n250-SIZE {size}\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n"
    );
    for e in extra {
        s.push_str(&format!("250-{e}\r\n"));
    }
    s.push_str("250 PIPELINING\r\n");
    s
}

/// A committed message and all its bytes.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub msg: Incoming,
    pub body: Vec<u8>,
}

impl std::ops::Deref for Recorded {
    type Target = Incoming;
    fn deref(&self) -> &Incoming {
        &self.msg
    }
}

#[derive(Default)]
struct Shared {
    msgs: Mutex<Vec<Recorded>>,
    fail: Mutex<Option<SinkError>>,
    /// The largest single write a message file received.
    widest_write: Mutex<usize>,
}

/// Records accepted messages (in memory); can be told to fail.
#[derive(Default)]
pub struct RecordingSink(Arc<Shared>);

impl RecordingSink {
    pub fn msgs(&self) -> Vec<Recorded> {
        self.0.msgs.lock().unwrap().clone()
    }
    pub fn fail_with(&self, e: Option<SinkError>) {
        *self.0.fail.lock().unwrap() = e;
    }
    /// The largest single write any message file received.
    pub fn widest_write(&self) -> usize {
        *self.0.widest_write.lock().unwrap()
    }
}

struct RecordingFile(Arc<Shared>, Vec<u8>);

impl Sink for RecordingSink {
    fn begin(&self, _id: &str) -> Box<dyn MessageFile> {
        Box::new(RecordingFile(self.0.clone(), Vec::new()))
    }
}

impl MessageFile for RecordingFile {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let mut w = self.0.widest_write.lock().unwrap();
        *w = (*w).max(bytes.len());
        self.1.extend_from_slice(bytes);
        Ok(())
    }
    fn commit(self: Box<Self>, msg: Incoming) -> BoxFuture<'static, Result<(), SinkError>> {
        Box::pin(async move {
            let RecordingFile(shared, mut body) = *self;
            if let Some(e) = *shared.fail.lock().unwrap() {
                return Err(e);
            }
            body.extend_from_slice(&msg.tail);
            shared.msgs.lock().unwrap().push(Recorded { msg, body });
            Ok(())
        })
    }
}

/// A running `serve` (or `serve_implicit_tls`); stopped when dropped.
pub struct Server {
    pub addr: SocketAddr,
    pub sink: Arc<RecordingSink>,
    pub shutdown: CancellationToken,
    pub handle: Option<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }
}

pub fn listen() -> Listen {
    Listen {
        max_message_size: 4096,
        ..Listen::default()
    }
}

/// Serve `settings` on 127.0.0.1 port 0.
pub async fn start_with(settings: Settings) -> Server {
    start_on("127.0.0.1:0", settings, false).await
}

/// Serve `listen` with no TLS and no users.
pub async fn start(listen: Listen) -> Server {
    start_with(Settings::new("mx.test", listen)).await
}

/// Serve on `addr` (a loopback address), implicit TLS or not.
pub async fn start_on(addr: &str, settings: Settings, implicit: bool) -> Server {
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sink = Arc::new(RecordingSink::default());
    let shutdown = CancellationToken::new();
    let settings = Arc::new(settings);
    let handle = if implicit {
        tokio::spawn(serve_implicit_tls(
            listener,
            settings,
            sink.clone(),
            shutdown.clone(),
        ))
    } else {
        tokio::spawn(serve(listener, settings, sink.clone(), shutdown.clone()))
    };
    Server {
        addr,
        sink,
        shutdown,
        handle: Some(handle),
    }
}

/// Any byte stream the client can speak over (TCP, then TLS).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A raw SMTP client; every read is bounded by `limit` so a failing test ends.
pub struct Client {
    pub io: Box<dyn Io>,
    pub limit: Duration,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        Client::wrap(TcpStream::connect(addr).await.unwrap())
    }

    /// Connect from a chosen loopback source address (e.g. 127.0.0.2).
    pub async fn connect_from(source: &str, addr: SocketAddr) -> Client {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        Client::wrap(socket.connect(addr).await.unwrap())
    }

    pub fn wrap(io: impl Io + 'static) -> Client {
        Client {
            io: Box::new(io),
            limit: Duration::from_secs(20),
        }
    }

    pub async fn send(&mut self, data: impl AsRef<[u8]>) {
        self.io.write_all(data.as_ref()).await.unwrap();
        self.io.flush().await.unwrap();
    }

    /// Read exactly as many bytes as `want` has (or until EOF) and compare.
    pub async fn expect(&mut self, want: &str) {
        let mut got = Vec::new();
        let _ = tokio::time::timeout(self.limit, async {
            let mut buf = [0u8; 4096];
            while got.len() < want.len() {
                let n = want.len() - got.len();
                match self.io.read(&mut buf[..n.min(4096)]).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => got.extend_from_slice(&buf[..k]),
                }
            }
        })
        .await;
        assert_eq!(String::from_utf8_lossy(&got), want);
    }

    /// Read one reply line.
    pub async fn line(&mut self) -> String {
        let mut got = Vec::new();
        let _ = tokio::time::timeout(self.limit, async {
            let mut b = [0u8; 1];
            while !got.ends_with(b"\r\n") {
                match self.io.read(&mut b).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => got.push(b[0]),
                }
            }
        })
        .await;
        String::from_utf8_lossy(&got).into_owned()
    }

    /// The server closed the connection (EOF or reset), with nothing more to say.
    pub async fn expect_closed(&mut self) {
        let mut buf = [0u8; 64];
        match tokio::time::timeout(self.limit, self.io.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {}
            Ok(Ok(n)) => panic!(
                "expected close, got {:?}",
                String::from_utf8_lossy(&buf[..n])
            ),
            Err(_) => panic!("expected close, connection still open"),
        }
    }

    /// Everything until the server closes (bounded by `limit`); panics if it does not close.
    pub async fn read_to_close(&mut self) -> Vec<u8> {
        let mut got = Vec::new();
        let r = tokio::time::timeout(self.limit, async {
            let mut buf = [0u8; 1024];
            loop {
                match self.io.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        assert!(r.is_ok(), "connection still open");
        got
    }

    /// Greeting, EHLO, MAIL, RCPT and DATA, one command at a time.
    pub async fn start_data(&mut self, size: usize) {
        self.expect(GREETING).await;
        self.send("EHLO client.example\r\n").await;
        self.expect(&ehlo_reply(size, &[])).await;
        self.send("MAIL FROM:<a@example.com>\r\n").await;
        self.expect("250 2.1.0 Ok\r\n").await;
        self.send("RCPT TO:<b@example.org>\r\n").await;
        self.expect("250 2.1.5 Ok\r\n").await;
        self.send("DATA\r\n").await;
        self.expect("354 End data with <CR><LF>.<CR><LF>\r\n").await;
    }
}

/// A self-signed certificate for `localhost`/`mx.test`/127.0.0.1 and its key, in a temp dir.
pub struct Certs {
    pub dir: tempfile::TempDir,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub der: Vec<u8>,
}

pub fn certs() -> Certs {
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec![
        "localhost".into(),
        "mx.test".into(),
        "127.0.0.1".into(),
    ])
    .unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    Certs {
        dir,
        cert,
        key,
        der: ck.cert.der().to_vec(),
    }
}

/// An argon2id hash with small parameters (debug builds are slow).
pub fn hash(password: &str) -> String {
    let params = argon2::Params::new(256, 1, 1, None).unwrap();
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>()).unwrap();
    argon
        .hash_password(password.as_bytes(), &salt)
        .unwrap()
        .to_string()
}

pub const USER: &str = "app";
pub const PASSWORD: &str = "correct horse";

pub fn users() -> Vec<User> {
    vec![User {
        name: USER.into(),
        password_hash: hash(PASSWORD),
        mailbox: String::new(),
    }]
}

/// Settings with TLS from `certs` and the test user.
pub fn secure(listen: Listen, certs: &Certs) -> Settings {
    Settings::new("mx.test", listen)
        .with_tls_files(&certs.cert, &certs.key)
        .unwrap()
        .with_users(&users())
        .unwrap()
}

/// A TLS client that trusts only `certs`.
pub fn connector(certs: &Certs) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from(certs.der.clone()))
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Do the client side of a TLS handshake on a plain `stream`.
pub async fn tls_client(
    certs: &Certs,
    stream: TcpStream,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    connector(certs).connect(name, stream).await
}
