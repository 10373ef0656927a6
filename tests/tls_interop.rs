//! Upstream TLS trust against a real OpenSSL server (stunnel in front of a fake SMTP sink): a self-signed CA:TRUE certificate listed in `tls_ca_file`, names still checked for it, a pinned SHA-256 fingerprint, a corporate CA through `SSL_CERT_FILE` (the real binary), and untrusted certificates refused with the cause and the fix while the mail stays queued.
//!
//! Skips with a message when stunnel or openssl is missing, unless
//! `MAILBRIDGE_REQUIRE_TOOLS` is set (CI), where it fails.

mod common;
mod daemon;

use std::path::Path;
use std::time::Duration;

use common::fake_smtp::{FakeConfig, FakeSmtp};
use common::real::{STUNNEL, Stunnel, ca_and_server, fingerprint, have, self_signed};
use mailbridge::config::HostPort;
use mailbridge::transport::smtp::{SmtpAuth, SmtpSettings, SmtpTransport};
use mailbridge::transport::{Delivery, Envelope, Failure, Transport};

const MESSAGE: &[u8] = b"From: a@example.com\r\nTo: b@example.com\r\nSubject: tls\r\n\r\nHi.\r\n";

fn tools() -> bool {
    have("openssl", "version") && have(STUNNEL, "-version")
}

fn transport(host: &str, port: u16, ca: Option<&Path>, pin: Option<&str>) -> SmtpTransport {
    SmtpTransport::new(SmtpSettings {
        server: HostPort {
            host: host.into(),
            port,
        },
        implicit_tls: true,
        starttls: false,
        ca_file: ca.map(Path::to_path_buf),
        auth: SmtpAuth::None,
        hostname: "relay.test".into(),
        timeout: Duration::from_secs(10),
    })
    .unwrap()
    .with_tls_fingerprint(pin)
    .unwrap()
}

fn envelope() -> Envelope {
    Envelope {
        id: "t1".into(),
        from: "a@example.com".into(),
        rcpts: vec!["b@example.com".into()],
        identity: None,
    }
}

fn delivered(d: &Delivery) -> bool {
    matches!(d, Ok(r) if r.iter().all(Result::is_ok))
}

fn failure(d: Delivery) -> Failure {
    match d {
        Err(f) => f,
        Ok(r) => panic!("expected a failure, got {r:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_signed_listed_in_tls_ca_file_and_pinned_certificates() {
    if !tools() {
        return;
    }
    let sink = FakeSmtp::start(FakeConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    // `openssl req -x509`: CA:TRUE, as most self-signed server certificates.
    let (cert, key) = self_signed(dir.path(), "selfsigned");
    let text = common::real::run(
        std::process::Command::new("openssl")
            .args(["x509", "-noout", "-text", "-in"])
            .arg(&cert),
    );
    assert!(text.contains("CA:TRUE"), "{text}");
    let tunnel = Stunnel::start(&cert, &key, sink.addr());
    let port = tunnel.addr.port();

    // Listed in tls_ca_file: trusted, by IP and by name.
    for host in ["127.0.0.1", "localhost"] {
        let d = transport(host, port, Some(&cert), None)
            .deliver(&envelope(), &mailbridge::transport::Body::from(MESSAGE))
            .await;
        assert!(delivered(&d), "{host}: {d:?}\nstunnel: {}", tunnel.log());
    }
    assert_eq!(sink.messages().len(), 2);
    assert!(
        sink.messages().iter().all(|m| !m.tls),
        "stunnel, not the sink, did TLS"
    );

    // Not listed: refused, saying what to do (with the fingerprint to pin).
    let fp = fingerprint(&cert);
    let f = failure(
        transport("127.0.0.1", port, None, None)
            .deliver(&envelope(), &mailbridge::transport::Body::from(MESSAGE))
            .await,
    );
    assert!(f.fails_over(), "{f:?}");
    assert!(
        f.text.contains("self-signed")
            && f.text.contains("upstream.tls_ca_file")
            && f.text.contains("upstream.tls_fingerprint")
            && f.text.contains(&fp),
        "{}",
        f.text
    );

    // Listed, but the name does not match: the name is still checked.
    let (other, other_key) = {
        let dir2 = dir.path().join("other");
        std::fs::create_dir(&dir2).unwrap();
        let c = dir2.join("other.crt");
        let k = dir2.join("other.key");
        common::real::run(
            std::process::Command::new("openssl")
                .args([
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=other.test",
                ])
                .args(["-addext", "subjectAltName=DNS:other.test"])
                .arg("-keyout")
                .arg(&k)
                .arg("-out")
                .arg(&c),
        );
        (c, k)
    };
    let wrong_name = Stunnel::start(&other, &other_key, sink.addr());
    let f = failure(
        transport("127.0.0.1", wrong_name.addr.port(), Some(&other), None)
            .deliver(&envelope(), &mailbridge::transport::Body::from(MESSAGE))
            .await,
    );
    assert!(
        f.text.contains("not valid for `127.0.0.1`") && f.text.contains("upstream.server"),
        "{}",
        f.text
    );

    // Pinned: the name no longer matters, the fingerprint does.
    let pin = fingerprint(&other);
    let d = transport("127.0.0.1", wrong_name.addr.port(), None, Some(&pin))
        .deliver(&envelope(), &mailbridge::transport::Body::from(MESSAGE))
        .await;
    assert!(delivered(&d), "{d:?}");
    let f = failure(
        transport("127.0.0.1", wrong_name.addr.port(), None, Some(&fp))
            .deliver(&envelope(), &mailbridge::transport::Body::from(MESSAGE))
            .await,
    );
    assert!(
        f.text.contains("does not match upstream.tls_fingerprint") && f.text.contains(&pin),
        "{}",
        f.text
    );
    assert_eq!(sink.messages().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corporate_ca_from_ssl_cert_file_and_untrusted_mail_stays_queued() {
    if !tools() {
        return;
    }
    let sink = FakeSmtp::start(FakeConfig::default()).await;
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, key) = ca_and_server(certs.path(), "corp");
    let tunnel = Stunnel::start(&cert, &key, sink.addr());
    let upstream = format!(
        "protocol = \"smtps\"\nserver = \"localhost:{}\"\ntimeout_secs = 5\n",
        tunnel.addr.port()
    );

    // The corporate CA is nowhere mailbridge looks: held, with the cause and fix.
    {
        let dir = tempfile::tempdir().unwrap();
        daemon::write_config(dir.path(), &upstream);
        let d = daemon::Daemon::start_with(
            dir.path(),
            &[],
            &[("SSL_CERT_FILE", "/nonexistent/none.pem")],
        );
        let reply = daemon::smtp_send(
            d.smtp,
            "a@example.com",
            &["b@example.com"],
            "Subject: held\r\n\r\nHeld.",
        );
        assert!(reply.starts_with("250"), "{reply}");
        d.wait_for(30, "the TLS failure", || d.log().contains("not trusted"));
        let log = d.log();
        assert!(
            log.contains("issued by a CA that is not trusted")
                && log.contains("upstream.tls_ca_file"),
            "{log}"
        );
        assert_eq!(d.queued(), 1, "the mail stays queued");
        // `status` shows the same cause (once the scheduler recorded the attempt).
        d.wait_for(30, "the cause in status", || {
            let (code, out, _) = d.cli(&["status", "--json"]);
            code == 0 && out.contains("issued by a CA that is not trusted")
        });
        // So does `send-test`, which goes the same way.
        let (code, out, err) = d.cli(&["send-test", "--to", "b@example.com"]);
        assert_eq!(code, 1, "{out}{err}");
        assert!(
            format!("{out}{err}").contains("issued by a CA that is not trusted"),
            "{out}{err}"
        );
        assert!(sink.messages().is_empty(), "nothing was sent");
    }

    // Installed as the host's trust store (SSL_CERT_FILE): delivered.
    let dir = tempfile::tempdir().unwrap();
    daemon::write_config(dir.path(), &upstream);
    let ca_path = ca.display().to_string();
    let d = daemon::Daemon::start_with(dir.path(), &[], &[("SSL_CERT_FILE", ca_path.as_str())]);
    let reply = daemon::smtp_send(
        d.smtp,
        "a@example.com",
        &["b@example.com"],
        "Subject: corp\r\n\r\nVia the corporate CA.",
    );
    assert!(reply.starts_with("250"), "{reply}");
    d.wait_for(30, "delivery", || sink.messages().len() == 1);
    assert!(String::from_utf8_lossy(&sink.messages()[0].data).contains("Via the corporate CA."));
    d.wait_for(10, "an empty queue", || d.queued() == 0);
}

/// A raw HTTP/1.1 responder: `200 OK` and `ok` to every request.
async fn http_ok() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                    )
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_upstreams_share_the_trust() {
    if !tools() {
        return;
    }
    let backend = http_ok().await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path(), "web");
    let tunnel = Stunnel::start(&cert, &key, backend);
    let url = format!("https://localhost:{}/EWS/Exchange.asmx", tunnel.addr.port());
    let proxy = mailbridge::config::Proxy::default();
    let listed = mailbridge::http::client(Some(&cert), &proxy, Duration::from_secs(10)).unwrap();
    let resp = listed.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let plain = mailbridge::http::client(None, &proxy, Duration::from_secs(10)).unwrap();
    let err = plain.get(&url).send().await.unwrap_err();
    let why = mailbridge::tls::describe(&err).unwrap_or_else(|| panic!("no TLS cause in {err:?}"));
    assert!(
        why.contains("self-signed") && why.contains("tls_ca_file"),
        "{why}"
    );
}
