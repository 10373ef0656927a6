//! Interop with real SMTP clients run as subprocesses: swaks (STARTTLS, implicit TLS, AUTH PLAIN/LOGIN, plain), msmtp and `openssl s_client -starttls smtp`.
//!
//! A missing tool skips its test with a message, unless `MAILBRIDGE_REQUIRE_TOOLS`
//! is set (CI), where it fails.

mod inbound_support;
#[path = "daemon/require.rs"]
mod require;

use std::process::Stdio;
use std::time::Duration;

use inbound_support::*;
use mailbridge::config::Listen;
use mailbridge::inbound::Settings;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// Whether `tool` can run; if not, fail under `MAILBRIDGE_REQUIRE_TOOLS`, else say why we skip.
fn have(tool: &str) -> bool {
    let found = std::process::Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        assert!(
            !require::tools_required(),
            "{tool} is not installed and MAILBRIDGE_REQUIRE_TOOLS is set"
        );
        eprintln!("skipping: {tool} is not installed");
    }
    found
}

/// Run `cmd` with `stdin`, killed if it takes more than 60 s; (success, stdout + stderr).
async fn run(mut cmd: Command, stdin: &[u8]) -> (bool, String) {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn");
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin).await.expect("stdin");
        drop(input);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the client finished within 60 s")
        .expect("wait");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn swaks(srv: &Server, extra: &[&str]) -> Command {
    let mut cmd = Command::new("swaks");
    cmd.args([
        "--server",
        "127.0.0.1",
        "--port",
        &srv.addr.port().to_string(),
        "--from",
        "app@example.com",
        "--to",
        "someone@example.org",
        "--ehlo",
        "client.test",
        "--header",
        "Subject: interop",
        "--body",
        "hello from swaks",
        "--timeout",
        "30",
    ]);
    cmd.args(extra);
    cmd
}

fn one_message(srv: &Server, with: &str, user: Option<&str>) {
    let msgs = srv.sink.msgs();
    assert_eq!(msgs.len(), 1);
    let body = String::from_utf8_lossy(&msgs[0].body);
    assert!(body.contains(&format!(" with {with} id ")), "{body}");
    assert!(body.contains("hello from"), "{body}");
    assert_eq!(msgs[0].auth_user.as_deref(), user);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaks_starttls_with_auth_plain_and_login() {
    if !have("swaks") {
        return;
    }
    let certs = certs();
    for mech in ["PLAIN", "LOGIN"] {
        let srv = start_with(secure(
            Listen {
                require_auth: true,
                auth_cleartext_loopback: false,
                ..listen()
            },
            &certs,
        ))
        .await;
        let (ok, out) = run(
            swaks(
                &srv,
                &[
                    "--tls",
                    "--auth",
                    mech,
                    "--auth-user",
                    USER,
                    "--auth-password",
                    PASSWORD,
                ],
            ),
            b"",
        )
        .await;
        assert!(ok, "{out}");
        assert!(out.contains("<~  250-AUTH PLAIN LOGIN"), "{out}");
        assert!(out.contains("235 2.7.0 Authentication successful"), "{out}");
        one_message(&srv, "ESMTPSA", Some(USER));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaks_wrong_password_and_no_tls() {
    if !have("swaks") {
        return;
    }
    let certs = certs();
    let srv = start_with(secure(
        Listen {
            require_auth: true,
            auth_cleartext_loopback: false,
            ..listen()
        },
        &certs,
    ))
    .await;
    let (ok, out) = run(
        swaks(
            &srv,
            &[
                "--tls",
                "--auth",
                "PLAIN",
                "--auth-user",
                USER,
                "--auth-password",
                "wrong",
            ],
        ),
        b"",
    )
    .await;
    assert!(!ok, "{out}");
    assert!(
        out.contains("535 5.7.8 Authentication credentials invalid"),
        "{out}"
    );
    // AUTH without TLS: not offered, so swaks gives up before sending credentials.
    let (ok, out) = run(
        swaks(
            &srv,
            &[
                "--auth",
                "PLAIN",
                "--auth-user",
                USER,
                "--auth-password",
                PASSWORD,
            ],
        ),
        b"",
    )
    .await;
    assert!(!ok, "{out}");
    assert!(!out.contains("AUTH PLAIN LOGIN"), "{out}");
    assert!(srv.sink.msgs().is_empty());
}

/// The printer case: loopback, no TLS, no AUTH.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaks_plain_printer() {
    if !have("swaks") {
        return;
    }
    let srv = start(listen()).await;
    let (ok, out) = run(swaks(&srv, &[]), b"").await;
    assert!(ok, "{out}");
    one_message(&srv, "ESMTP", None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaks_implicit_tls() {
    if !have("swaks") {
        return;
    }
    let certs = certs();
    let srv = start_on("127.0.0.1:0", secure(listen(), &certs), true).await;
    let (ok, out) = run(
        swaks(
            &srv,
            &[
                "--tls-on-connect",
                "--auth",
                "LOGIN",
                "--auth-user",
                USER,
                "--auth-password",
                PASSWORD,
            ],
        ),
        b"",
    )
    .await;
    assert!(ok, "{out}");
    one_message(&srv, "ESMTPSA", Some(USER));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn msmtp_starttls_auth_with_verified_certificate() {
    if !have("msmtp") {
        return;
    }
    let certs = certs();
    let srv = start_with(secure(
        Listen {
            require_auth: true,
            auth_cleartext_loopback: false,
            ..listen()
        },
        &certs,
    ))
    .await;
    let rc = certs.dir.path().join("msmtprc");
    std::fs::write(
        &rc,
        format!(
            "account default\nhost 127.0.0.1\nport {}\nfrom app@example.com\ndomain client.test\ntls on\ntls_starttls on\ntls_trust_file {}\ntls_host_override localhost\nauth plain\nuser {USER}\npassword {PASSWORD}\n",
            srv.addr.port(),
            certs.cert.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&rc, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut cmd = Command::new("msmtp");
    cmd.arg("-C").arg(&rc).arg("someone@example.org");
    // Bare LF line endings, as a script would send them; msmtp adds CRLF.
    let (ok, out) = run(cmd, b"Subject: interop\n\nhello from msmtp\n.leading dot\n").await;
    assert!(ok, "{out}");
    one_message(&srv, "ESMTPSA", Some(USER));
    let body = String::from_utf8_lossy(&srv.sink.msgs()[0].body).into_owned();
    assert!(
        body.ends_with("\r\nhello from msmtp\r\n.leading dot\r\n"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_starttls() {
    if !have("openssl") {
        return;
    }
    let certs = certs();
    let srv = start_with(secure(listen(), &certs)).await;
    for version in ["-tls1_2", "-tls1_3"] {
        let mut cmd = Command::new("openssl");
        cmd.args([
            "s_client",
            version,
            "-starttls",
            "smtp",
            "-connect",
            &srv.addr.to_string(),
            "-servername",
            "localhost",
            "-verify_return_error",
            "-crlf",
            "-quiet",
            "-ign_eof",
        ])
        .arg("-CAfile")
        .arg(&certs.cert);
        let (ok, out) = run(
            cmd,
            b"EHLO client.test\nMAIL FROM:<app@example.com>\nRCPT TO:<someone@example.org>\nDATA\nSubject: interop\n\nhello from openssl\n.\nQUIT\n",
        )
        .await;
        assert!(ok, "{version}: {out}");
        assert!(out.contains("250 2.0.0 Ok: queued as "), "{version}: {out}");
        assert!(out.contains("221 2.0.0 Bye"), "{version}: {out}");
    }
    let msgs = srv.sink.msgs();
    assert_eq!(msgs.len(), 2);
    assert!(String::from_utf8_lossy(&msgs[0].body).contains(" with ESMTPS id "));
}

/// TLS 1.1 and older are refused (the server speaks TLS 1.2+ only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_tls1_1_is_refused() {
    if !have("openssl") {
        return;
    }
    let certs = certs();
    let srv = start_with(secure(listen(), &certs)).await;
    let mut cmd = Command::new("openssl");
    cmd.args([
        "s_client",
        "-tls1_1",
        "-cipher",
        "DEFAULT:@SECLEVEL=0",
        "-starttls",
        "smtp",
        "-connect",
        &srv.addr.to_string(),
        "-quiet",
    ]);
    let (ok, out) = run(cmd, b"QUIT\n").await;
    assert!(!ok, "{out}");
    assert!(srv.sink.msgs().is_empty());
    // The listener is still fine afterwards.
    let _ = Settings::new("mx.test", listen());
    let mut c = Client::connect(srv.addr).await;
    c.expect(GREETING).await;
}
