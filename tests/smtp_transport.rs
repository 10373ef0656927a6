//! The SMTP/SMTPS transport against the in-process fake upstream: classification per stage, TLS, AUTH, exact wire bytes and connection reuse.

mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use common::fake_smtp::{FakeConfig, FakeSmtp, Fault, Security, Stage};
use mailbridge::common::Secret;
use mailbridge::config::HostPort;
use mailbridge::transport::smtp::{SmtpAuth, SmtpSettings, SmtpTransport};
use mailbridge::transport::{Delivery, Envelope, Failure, Scope, Severity, Transport};

const MESSAGE: &[u8] = b"From: a@example.com\r\nTo: b@example.com\r\nSubject: hi\r\n\r\nHello.\r\n";
const USER: &str = "relay@example.com";
const PASSWORD: &str = "S3cret-Pa55word!";

fn settings(fake: &FakeSmtp) -> SmtpSettings {
    SmtpSettings {
        server: HostPort {
            host: "127.0.0.1".into(),
            port: fake.addr().port(),
        },
        implicit_tls: false,
        starttls: false,
        ca_file: None,
        auth: SmtpAuth::None,
        hostname: "relay.test".into(),
        timeout: Duration::from_secs(10),
    }
}

fn basic(password: &str) -> SmtpAuth {
    SmtpAuth::Basic {
        username: USER.into(),
        password: Secret::new(password),
    }
}

fn transport(settings: SmtpSettings) -> SmtpTransport {
    SmtpTransport::new(settings).expect("valid settings")
}

fn envelope(rcpts: &[&str]) -> Envelope {
    Envelope {
        id: "q1".into(),
        from: "a@example.com".into(),
        rcpts: rcpts.iter().map(|r| r.to_string()).collect(),
        identity: None,
    }
}

/// The CA of a TLS fake, in a temp file for `ca_file`.
fn ca_file(fake: &FakeSmtp) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), fake.ca_pem().expect("TLS fake")).expect("write CA");
    file
}

fn all_ok(delivery: &Delivery) -> bool {
    matches!(delivery, Ok(results) if results.iter().all(Result::is_ok))
}

#[track_caller]
fn whole_failure(delivery: Delivery) -> Failure {
    match delivery {
        Err(failure) => failure,
        Ok(results) => panic!("expected the whole attempt to fail, got {results:?}"),
    }
}

/// The final dot was sent and no reply came: the server may have the
/// message, so the failure is transient, does not fail over, and says so.
#[track_caller]
fn assert_maybe_delivered(failure: &Failure, needle: &str) {
    assert!(!failure.fails_over(), "would fail over: {failure:?}");
    assert_eq!(
        (failure.severity, failure.scope),
        (Severity::Transient, Scope::MaybeDelivered)
    );
    assert!(
        failure.text.contains(needle),
        "`{needle}` not in `{}`",
        failure.text
    );
}

#[track_caller]
fn assert_server(failure: &Failure, needle: &str) {
    assert!(failure.fails_over(), "not a server failure: {failure:?}");
    assert!(
        failure.text.contains(needle),
        "`{needle}` not in `{}`",
        failure.text
    );
}

#[track_caller]
fn assert_message(failure: &Failure, severity: Severity, needle: &str) {
    assert_eq!(
        (failure.severity, failure.scope),
        (severity, Scope::Message),
        "{failure:?}"
    );
    assert!(!failure.fails_over());
    assert!(
        failure.text.contains(needle),
        "`{needle}` not in `{}`",
        failure.text
    );
}

fn count(fake: &FakeSmtp, verb: &str) -> usize {
    fake.commands()
        .iter()
        .filter(|c| c.to_ascii_uppercase().starts_with(verb))
        .count()
}

#[tokio::test]
async fn delivers_over_plain_smtp() {
    let fake = FakeSmtp::start(FakeConfig::default()).await;
    let t = transport(settings(&fake));
    let result = t
        .deliver(
            &envelope(&["b@example.com", "c@example.com"]),
            &mailbridge::transport::Body::from(MESSAGE),
        )
        .await;
    assert!(all_ok(&result), "{result:?}");
    let got = fake.messages();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].from, "a@example.com");
    assert_eq!(got[0].rcpts, ["b@example.com", "c@example.com"]);
    assert_eq!(got[0].data, MESSAGE);
    assert_eq!(got[0].wire, [MESSAGE, b".\r\n"].concat());
    assert_eq!(got[0].mail_params, [format!("SIZE={}", MESSAGE.len())]);
    assert!(!got[0].tls);
    assert!(fake.commands().contains(&"EHLO relay.test".to_string()));
}

#[tokio::test]
async fn mail_parameters_follow_what_the_server_offers() {
    let fake = FakeSmtp::start(FakeConfig {
        smtputf8: true,
        ..FakeConfig::default()
    })
    .await;
    let t = transport(settings(&fake));
    let body = "Subject: caf\u{e9}\r\n\r\n8-bit body \u{e9}\r\n".as_bytes();
    let result = t
        .deliver(
            &envelope(&["j\u{f6}rg@example.de"]),
            &mailbridge::transport::Body::from(body),
        )
        .await;
    assert!(all_ok(&result), "{result:?}");
    let params = &fake.messages()[0].mail_params;
    assert_eq!(
        params,
        &[
            format!("SIZE={}", body.len()),
            "BODY=8BITMIME".into(),
            "SMTPUTF8".into()
        ]
    );
}

#[tokio::test]
async fn non_ascii_recipient_without_smtputf8_fails_only_that_recipient() {
    let fake = FakeSmtp::start(FakeConfig::default()).await;
    let t = transport(settings(&fake));
    let results = t
        .deliver(
            &envelope(&["b@example.com", "j\u{f6}rg@example.de"]),
            &mailbridge::transport::Body::from(MESSAGE),
        )
        .await
        .expect("per recipient");
    assert!(results[0].is_ok());
    assert_message(
        results[1].as_ref().unwrap_err(),
        Severity::Permanent,
        "SMTPUTF8",
    );
    assert_eq!(fake.messages()[0].rcpts, ["b@example.com"]);
    assert!(
        !fake.messages()[0]
            .mail_params
            .contains(&"SMTPUTF8".to_string())
    );
}

#[tokio::test]
async fn falls_back_to_helo_when_ehlo_is_rejected() {
    let fake = FakeSmtp::start(
        FakeConfig::default().fault(Stage::Ehlo, Fault::reply("502 5.5.2 Not implemented")),
    )
    .await;
    let t = transport(settings(&fake));
    let result = t
        .deliver(
            &envelope(&["b@example.com"]),
            &mailbridge::transport::Body::from(MESSAGE),
        )
        .await;
    assert!(all_ok(&result), "{result:?}");
    assert!(fake.commands().contains(&"HELO relay.test".to_string()));
    // Without EHLO there are no extensions, so no SIZE parameter.
    assert!(fake.messages()[0].mail_params.is_empty());
}

#[tokio::test]
async fn required_starttls_not_offered_is_a_server_failure() {
    let fake = FakeSmtp::start(FakeConfig::default()).await;
    let t = transport(SmtpSettings {
        starttls: true,
        ..settings(&fake)
    });
    let failure = whole_failure(
        t.deliver(
            &envelope(&["b@example.com"]),
            &mailbridge::transport::Body::from(MESSAGE),
        )
        .await,
    );
    assert_server(&failure, "STARTTLS");
    assert_eq!(count(&fake, "MAIL"), 0, "never downgrade to cleartext");
}

#[tokio::test]
async fn starttls_with_the_generated_ca_and_auth_plain() {
    let fake = FakeSmtp::start(
        FakeConfig::default()
            .security(Security::StartTls)
            .auth(USER, PASSWORD),
    )
    .await;
    let ca = ca_file(&fake);
    let t = transport(SmtpSettings {
        starttls: true,
        ca_file: Some(ca.path().to_path_buf()),
        auth: basic(PASSWORD),
        ..settings(&fake)
    });
    let result = t
        .deliver(
            &envelope(&["b@example.com"]),
            &mailbridge::transport::Body::from(MESSAGE),
        )
        .await;
    assert!(all_ok(&result), "{result:?}");
    let got = &fake.messages()[0];
    assert!(got.tls);
    assert_eq!(got.auth, Some((USER.to_string(), "PLAIN".to_string())));
    assert_eq!(count(&fake, "EHLO"), 2, "EHLO again after STARTTLS");
}

#[tokio::test]
async fn starttls_with_an_unknown_ca_is_a_server_failure() {
    let fake = FakeSmtp::start(FakeConfig::default().security(Security::StartTls)).await;
    let t = transport(SmtpSettings {
        starttls: true,
        ..settings(&fake)
    });
    let failure = whole_failure(
        t.deliver(
            &envelope(&["b@example.com"]),
            &mailbridge::transport::Body::from(MESSAGE),
        )
        .await,
    );
    assert_server(&failure, "TLS handshake");
    assert_eq!(count(&fake, "MAIL"), 0);
}

#[tokio::test]
async fn smtps_with_a_dns_name_and_auth_login() {
    let fake = FakeSmtp::start(
        FakeConfig::default()
            .security(Security::ImplicitTls)
            .auth(USER, PASSWORD)
            .mechanisms(&["LOGIN"]),
    )
    .await;
    let ca = ca_file(&fake);
    let t = transport(SmtpSettings {
        server: HostPort {
            host: "localhost".into(),
            port: fake.addr().port(),
        },
        implicit_tls: true,
        ca_file: Some(ca.path().to_path_buf()),
        auth: basic(PASSWORD),
        ..settings(&fake)
    });
    assert_eq!(
        t.describe(),
        format!("smtps://localhost:{}", fake.addr().port())
    );
    let result = t
        .deliver(
            &envelope(&["b@example.com"]),
            &mailbridge::transport::Body::from(MESSAGE),
        )
        .await;
    assert!(all_ok(&result), "{result:?}");
    let got = &fake.messages()[0];
    assert!(got.tls);
    assert_eq!(got.auth, Some((USER.to_string(), "LOGIN".to_string())));
}

#[tokio::test]
async fn wrong_password_is_a_server_failure_that_hides_the_password() {
    let secrets = [
        PASSWORD.to_string(),
        B64.encode(PASSWORD),
        B64.encode(format!("\0{USER}\0{PASSWORD}")),
    ];
    for mechanism in ["PLAIN", "LOGIN"] {
        let fake = FakeSmtp::start(
            FakeConfig::default()
                .auth(USER, "another")
                .mechanisms(&[mechanism]),
        )
        .await;
        let t = transport(SmtpSettings {
            auth: basic(PASSWORD),
            ..settings(&fake)
        });
        let failure = whole_failure(
            t.deliver(
                &envelope(&["b@example.com"]),
                &mailbridge::transport::Body::from(MESSAGE),
            )
            .await,
        );
        assert_server(&failure, "authentication failed");
        assert!(failure.text.contains("535 5.7.3"), "{failure:?}");
        for secret in &secrets {
            assert!(
                !failure.text.contains(secret.as_str()),
                "{mechanism}: secret in `{}`",
                failure.text
            );
        }
        assert!(fake.messages().is_empty());
        let probe = t.probe().await.expect_err("probe must fail too");
        assert_server(&probe, "authentication failed");
    }
}

#[tokio::test]
async fn a_server_echoing_the_credentials_does_not_leak_them() {
    let plain = B64.encode(format!("\0{USER}\0{PASSWORD}"));
    let fake = FakeSmtp::start(FakeConfig::default().auth(USER, PASSWORD).fault(
        Stage::Auth,
        Fault::reply(format!("501 5.5.2 Cannot decode `{plain}` for {PASSWORD}")),
    ))
    .await;
    let t = transport(SmtpSettings {
        auth: basic(PASSWORD),
        ..settings(&fake)
    });
    let failure = whole_failure(
        t.deliver(
            &envelope(&["b@example.com"]),
            &mailbridge::transport::Body::from(MESSAGE),
        )
        .await,
    );
    assert_server(&failure, "501 5.5.2 Cannot decode");
    assert!(
        !failure.text.contains(&plain) && !failure.text.contains(PASSWORD),
        "{}",
        failure.text
    );
}

#[tokio::test]
async fn no_supported_auth_mechanism_is_a_server_failure() {
    let fake = FakeSmtp::start(
        FakeConfig::default()
            .auth(USER, PASSWORD)
            .mechanisms(&["CRAM-MD5"]),
    )
    .await;
    let t = transport(SmtpSettings {
        auth: basic(PASSWORD),
        ..settings(&fake)
    });
    let failure = whole_failure(
        t.deliver(
            &envelope(&["b@example.com"]),
            &mailbridge::transport::Body::from(MESSAGE),
        )
        .await,
    );
    assert_server(&failure, "no AUTH mechanism we support");
}

#[tokio::test]
async fn one_rejected_recipient_of_two() {
    let fake = FakeSmtp::start(FakeConfig::default().fault(
        Stage::Rcpt("bad@example.com".into()),
        Fault::reply("550 5.1.1 RESOLVER.ADR.RecipNotFound; not found"),
    ))
    .await;
    let t = transport(settings(&fake));
    let results = t
        .deliver(
            &envelope(&["b@example.com", "bad@example.com"]),
            &mailbridge::transport::Body::from(MESSAGE),
        )
        .await
        .expect("per recipient");
    assert!(results[0].is_ok(), "{results:?}");
    let failure = results[1].as_ref().unwrap_err();
    assert_message(
        failure,
        Severity::Permanent,
        "550 5.1.1 RESOLVER.ADR.RecipNotFound; not found",
    );
    assert!(
        failure.text.contains("after RCPT TO:<bad@example.com>"),
        "{}",
        failure.text
    );
    assert_eq!(fake.messages()[0].rcpts, ["b@example.com"]);
}

#[tokio::test]
async fn temporarily_rejected_recipient_is_transient() {
    let fake = FakeSmtp::start(FakeConfig::default().fault(
        Stage::Rcpt("later@example.com".into()),
        Fault::reply("452 4.5.3 Too many recipients"),
    ))
    .await;
    let t = transport(settings(&fake));
    let results = t
        .deliver(
            &envelope(&["later@example.com", "b@example.com"]),
            &mailbridge::transport::Body::from(MESSAGE),
        )
        .await
        .expect("per recipient");
    assert_message(
        results[0].as_ref().unwrap_err(),
        Severity::Transient,
        "452 4.5.3",
    );
    assert!(results[1].is_ok());
}

/// Both recipients refused: every recipient fails permanently, the
/// transaction is reset and the connection serves the next message. With
/// PIPELINING the DATA went out with the RCPTs and the server refused it;
/// without, it is never sent.
async fn all_recipients_rejected(config: FakeConfig) -> FakeSmtp {
    let fake = FakeSmtp::start(
        config
            .fault(
                Stage::Rcpt("x@example.com".into()),
                Fault::reply("550 5.1.1 unknown"),
            )
            .fault(
                Stage::Rcpt("y@example.com".into()),
                Fault::reply("550 5.1.1 unknown"),
            ),
    )
    .await;
    let t = transport(settings(&fake));
    let results = t
        .deliver(
            &envelope(&["x@example.com", "y@example.com"]),
            &mailbridge::transport::Body::from(MESSAGE),
        )
        .await
        .expect("per recipient");
    assert!(
        results
            .iter()
            .all(|r| r.as_ref().is_err_and(|f| f.severity == Severity::Permanent)),
        "{results:?}"
    );
    assert!(fake.messages().is_empty());
    assert_eq!(count(&fake, "RSET"), 1);
    assert!(all_ok(
        &t.deliver(
            &envelope(&["b@example.com"]),
            &mailbridge::transport::Body::from(MESSAGE)
        )
        .await
    ));
    assert_eq!(fake.connections(), 1, "the reset connection is reused");
    fake
}

#[tokio::test]
async fn all_recipients_rejected_resets_and_keeps_the_connection() {
    let fake = all_recipients_rejected(FakeConfig::default()).await;
    assert_eq!(count(&fake, "DATA"), 2, "{:?}", fake.commands());
    let fake = all_recipients_rejected(FakeConfig::default().no_pipelining()).await;
    assert_eq!(count(&fake, "DATA"), 1, "{:?}", fake.commands());
}

#[tokio::test]
async fn pipelining_sends_the_envelope_and_data_in_one_write() {
    let rcpts = ["a@example.com", "b@example.com"];
    let fake = FakeSmtp::start(FakeConfig::default()).await;
    let t = transport(settings(&fake));
    assert!(all_ok(
        &t.deliver(
            &envelope(&rcpts),
            &mailbridge::transport::Body::from(MESSAGE)
        )
        .await
    ));
    assert_eq!(
        fake.pipelined(),
        ["RCPT TO:<a@example.com>", "RCPT TO:<b@example.com>", "DATA"]
    );
    assert_eq!(fake.messages().len(), 1);
    // A server without PIPELINING gets one command per reply.
    let fake = FakeSmtp::start(FakeConfig::default().no_pipelining()).await;
    let t = transport(settings(&fake));
    assert!(all_ok(
        &t.deliver(
            &envelope(&rcpts),
            &mailbridge::transport::Body::from(MESSAGE)
        )
        .await
    ));
    assert!(fake.pipelined().is_empty(), "{:?}", fake.pipelined());
    assert_eq!(fake.messages().len(), 1);
}

#[tokio::test]
async fn a_refused_sender_with_pipelining_leaves_the_connection_in_step() {
    // MAIL FROM refused: the pipelined RCPT and DATA get 503s, which are
    // read before the RSET, so the next message goes out on the same
    // connection and gets its own replies.
    let fake = FakeSmtp::start(
        FakeConfig::default().fault(Stage::Mail, Fault::reply("550 5.7.1 sender refused")),
    )
    .await;
    let t = transport(settings(&fake));
    let err = t
        .deliver(
            &envelope(&["a@example.com"]),
            &mailbridge::transport::Body::from(MESSAGE),
        )
        .await
        .expect_err("the sender is refused");
    assert_eq!(err.severity, Severity::Permanent, "{err:?}");
    assert!(err.text.contains("550 5.7.1 sender refused"), "{err:?}");
    fake.clear_faults();
    assert!(all_ok(
        &t.deliver(
            &envelope(&["b@example.com"]),
            &mailbridge::transport::Body::from(MESSAGE)
        )
        .await
    ));
    assert_eq!(fake.connections(), 1, "the reset connection is reused");
    let got = fake.messages();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rcpts, ["b@example.com"]);
    assert_eq!(count(&fake, "RSET"), 1);
}

#[tokio::test]
async fn reply_421_at_the_greeting_fails_over() {
    let fake = FakeSmtp::start(FakeConfig::default().fault(
        Stage::Greeting,
        Fault::reply(
            "421 4.3.2 The maximum number of concurrent connections has exceeded a limit, closing transmission channel",
        ),
    ))
    .await;
    let t = transport(settings(&fake));
    let failure = whole_failure(
        t.deliver(
            &envelope(&["b@example.com"]),
            &mailbridge::transport::Body::from(MESSAGE),
        )
        .await,
    );
    assert_server(
        &failure,
        "421 4.3.2 The maximum number of concurrent connections",
    );
    assert!(failure.text.contains("greeting"), "{}", failure.text);
}

#[tokio::test]
async fn reply_421_at_mail_fails_over_and_drops_the_connection() {
    let fake = FakeSmtp::start(
        FakeConfig::default().fault(Stage::Mail, Fault::reply("421 4.4.2 Connection dropped")),
    )
    .await;
    let t = transport(settings(&fake));
    let failure = whole_failure(
        t.deliver(
            &envelope(&["b@example.com"]),
            &mailbridge::transport::Body::from(MESSAGE),
        )
        .await,
    );
    assert_server(&failure, "421 4.4.2 Connection dropped");
    fake.clear_faults();
    assert!(all_ok(
        &t.deliver(
            &envelope(&["b@example.com"]),
            &mailbridge::transport::Body::from(MESSAGE)
        )
        .await
    ));
    assert_eq!(fake.connections(), 2, "a 421 connection must not be pooled");
}

#[tokio::test]
async fn reply_451_at_mail_is_a_transient_message_failure() {
    let fake = FakeSmtp::start(FakeConfig::default().fault(
        Stage::Mail,
        Fault::reply("451 4.3.0 Mail server temporarily rejected message"),
    ))
    .await;
    let t = transport(settings(&fake));
    let failure = whole_failure(
        t.deliver(
            &envelope(&["b@example.com"]),
            &mailbridge::transport::Body::from(MESSAGE),
        )
        .await,
    );
    assert_message(
        &failure,
        Severity::Transient,
        "451 4.3.0 Mail server temporarily rejected message",
    );
    assert!(
        failure.text.contains("after MAIL FROM:<a@example.com>"),
        "{}",
        failure.text
    );
    // The connection was reset and is reused for the next message.
    fake.clear_faults();
    assert!(all_ok(
        &t.deliver(
            &envelope(&["b@example.com"]),
            &mailbridge::transport::Body::from(MESSAGE)
        )
        .await
    ));
    assert_eq!(count(&fake, "RSET"), 1);
    assert_eq!(fake.connections(), 1);
}

#[tokio::test]
async fn reply_550_at_end_of_data_is_permanent() {
    let text = "550 5.7.60 SMTP; Client does not have permissions to send as this sender";
    let fake =
        FakeSmtp::start(FakeConfig::default().fault(Stage::EndOfData, Fault::reply(text))).await;
    let t = transport(settings(&fake));
    let results = t
        .deliver(
            &envelope(&["b@example.com", "c@example.com"]),
            &mailbridge::transport::Body::from(MESSAGE),
        )
        .await
        .expect("per recipient");
    for result in &results {
        let failure = result.as_ref().unwrap_err();
        assert_message(failure, Severity::Permanent, text);
        assert!(failure.text.contains("end of data"), "{}", failure.text);
    }
    assert!(fake.messages().is_empty());
    assert_eq!(fake.transactions().len(), 1);
}

#[tokio::test]
async fn connection_closed_mid_data_is_a_server_failure() {
    let fake = FakeSmtp::start(FakeConfig::default().fault(Stage::Body, Fault::Close)).await;
    let t = transport(settings(&fake));
    let big: Vec<u8> = b"Subject: big\r\n\r\n"
        .iter()
        .chain(b"0123456789abcdef\r\n".repeat(60_000).iter())
        .copied()
        .collect();
    let failure = whole_failure(
        t.deliver(
            &envelope(&["b@example.com"]),
            &mailbridge::transport::Body::from(&big),
        )
        .await,
    );
    assert!(failure.fails_over(), "{failure:?}");
    assert!(fake.transactions().is_empty());
}

#[tokio::test]
async fn connection_closed_before_the_final_reply_is_a_server_failure() {
    let fake = FakeSmtp::start(FakeConfig::default().fault(Stage::EndOfData, Fault::Close)).await;
    let t = transport(settings(&fake));
    let failure = whole_failure(
        t.deliver(
            &envelope(&["b@example.com"]),
            &mailbridge::transport::Body::from(MESSAGE),
        )
        .await,
    );
    // The server may have taken the message: no failover, retry it later.
    assert_maybe_delivered(
        &failure,
        "connection closed by the server (after end of data",
    );
}

#[tokio::test]
async fn a_hanging_server_times_out() {
    let fake = FakeSmtp::start(FakeConfig::default().fault(Stage::Mail, Fault::Hang)).await;
    let t = transport(SmtpSettings {
        timeout: Duration::from_secs(1),
        ..settings(&fake)
    });
    let failure = whole_failure(
        t.deliver(
            &envelope(&["b@example.com"]),
            &mailbridge::transport::Body::from(MESSAGE),
        )
        .await,
    );
    assert_server(&failure, "timeout");
    assert!(failure.text.contains("after MAIL FROM"), "{}", failure.text);
}

#[tokio::test]
async fn the_final_reply_gets_a_longer_timeout() {
    let fake = FakeSmtp::start(FakeConfig::default().fault(Stage::EndOfData, Fault::Hang)).await;
    let timeout = Duration::from_millis(300);
    let t = transport(SmtpSettings {
        timeout,
        ..settings(&fake)
    });
    let started = Instant::now();
    let failure = whole_failure(
        t.deliver(
            &envelope(&["b@example.com"]),
            &mailbridge::transport::Body::from(MESSAGE),
        )
        .await,
    );
    assert_maybe_delivered(&failure, "timeout");
    // A lower bound only: the wait cannot end before the longer timeout.
    assert!(
        started.elapsed() >= timeout * 4,
        "gave up after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn wire_bytes_are_dot_stuffed_and_canonical() {
    let fake = FakeSmtp::start(FakeConfig::default()).await;
    let t = transport(settings(&fake));
    let input: &[u8] = b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\nbare lf\nbare cr\rcr cr lf\r\r\n.\r\nsmuggle\n.\r\nMAIL FROM:<evil@example.com>\r\n.\nlast line";
    let result = t
        .deliver(
            &envelope(&["b@example.com"]),
            &mailbridge::transport::Body::from(input),
        )
        .await;
    assert!(all_ok(&result), "{result:?}");
    let got = &fake.messages()[0];
    let expected_wire: &[u8] = b"Subject: dots\r\n\r\n..leading dot\r\n...two\r\nbare lf\r\nbare cr\r\ncr cr lf\r\n\r\n..\r\nsmuggle\r\n..\r\nMAIL FROM:<evil@example.com>\r\n..\r\nlast line\r\n.\r\n";
    assert_eq!(
        String::from_utf8_lossy(&got.wire),
        String::from_utf8_lossy(expected_wire)
    );
    let expected_data: &[u8] = b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\nbare lf\r\nbare cr\r\ncr cr lf\r\n\r\n.\r\nsmuggle\r\n.\r\nMAIL FROM:<evil@example.com>\r\n.\r\nlast line\r\n";
    assert_eq!(
        String::from_utf8_lossy(&got.data),
        String::from_utf8_lossy(expected_data)
    );
    assert_eq!(fake.transactions().len(), 1, "nothing smuggled");
    assert_eq!(count(&fake, "MAIL"), 1);
}

#[tokio::test]
async fn a_large_message_arrives_intact() {
    let fake = FakeSmtp::start(FakeConfig::default()).await;
    let t = transport(settings(&fake));
    let mut big = b"Subject: big\r\n\r\n".to_vec();
    for i in 0..50_000 {
        big.extend_from_slice(format!(".line {i} with some text to make it longer\r\n").as_bytes());
    }
    let result = t
        .deliver(
            &envelope(&["b@example.com"]),
            &mailbridge::transport::Body::from(&big),
        )
        .await;
    assert!(all_ok(&result), "{result:?}");
    assert_eq!(fake.messages()[0].data, big);
}

#[tokio::test]
async fn two_deliveries_share_one_connection() {
    let fake = FakeSmtp::start(FakeConfig::default().auth(USER, PASSWORD)).await;
    let t = transport(SmtpSettings {
        auth: basic(PASSWORD),
        ..settings(&fake)
    });
    assert!(all_ok(
        &t.deliver(
            &envelope(&["b@example.com"]),
            &mailbridge::transport::Body::from(MESSAGE)
        )
        .await
    ));
    assert!(all_ok(
        &t.deliver(
            &envelope(&["c@example.com"]),
            &mailbridge::transport::Body::from(MESSAGE)
        )
        .await
    ));
    assert_eq!(fake.connections(), 1);
    assert_eq!(count(&fake, "EHLO"), 1);
    assert_eq!(count(&fake, "AUTH"), 1);
    let got = fake.messages();
    assert_eq!(got.len(), 2);
    assert_eq!(got[1].rcpts, ["c@example.com"]);
    assert_eq!(got[0].connection, got[1].connection);
}

#[tokio::test]
async fn a_dead_pooled_connection_is_replaced_transparently() {
    let fake = FakeSmtp::start(FakeConfig::default()).await;
    let t = transport(settings(&fake));
    assert!(all_ok(
        &t.deliver(
            &envelope(&["b@example.com"]),
            &mailbridge::transport::Body::from(MESSAGE)
        )
        .await
    ));
    fake.drop_connections().await;
    let result = t
        .deliver(
            &envelope(&["c@example.com"]),
            &mailbridge::transport::Body::from(MESSAGE),
        )
        .await;
    assert!(all_ok(&result), "{result:?}");
    assert_eq!(fake.connections(), 2);
    assert_eq!(fake.messages().len(), 2);
}

#[tokio::test]
async fn a_pooled_connection_answering_421_is_replaced_transparently() {
    let fake = FakeSmtp::start(FakeConfig::default()).await;
    let t = transport(settings(&fake));
    assert!(all_ok(
        &t.deliver(
            &envelope(&["b@example.com"]),
            &mailbridge::transport::Body::from(MESSAGE)
        )
        .await
    ));
    // The server timed the idle session out: its next answer is 421.
    fake.set_fault(
        Stage::Mail,
        Fault::reply("421 4.4.2 fake.test Error: timeout exceeded"),
    );
    let failure = whole_failure(
        t.deliver(
            &envelope(&["c@example.com"]),
            &mailbridge::transport::Body::from(MESSAGE),
        )
        .await,
    );
    // The reused connection got the 421, a new one got it too: that one counts.
    assert_server(&failure, "421 4.4.2");
    assert_eq!(fake.connections(), 2, "exactly one reconnect");
}

#[tokio::test]
async fn a_refused_port_is_a_server_failure() {
    let fake = FakeSmtp::start(FakeConfig::default()).await;
    let t = transport(settings(&fake));
    fake.shutdown().await;
    let failure = whole_failure(
        t.deliver(
            &envelope(&["b@example.com"]),
            &mailbridge::transport::Body::from(MESSAGE),
        )
        .await,
    );
    assert_server(&failure, "cannot connect");
    assert_server(&t.probe().await.expect_err("refused"), "cannot connect");
}

#[tokio::test]
async fn probe_authenticates_and_quits() {
    let fake = FakeSmtp::start(
        FakeConfig::default()
            .security(Security::StartTls)
            .auth(USER, PASSWORD),
    )
    .await;
    let ca = ca_file(&fake);
    let t = transport(SmtpSettings {
        starttls: true,
        ca_file: Some(ca.path().to_path_buf()),
        auth: basic(PASSWORD),
        ..settings(&fake)
    });
    t.probe().await.expect("probe");
    let commands = fake.commands();
    assert_eq!(count(&fake, "AUTH PLAIN"), 1);
    assert_eq!(commands.last().map(String::as_str), Some("QUIT"));
    assert!(fake.messages().is_empty());
}

#[tokio::test]
async fn describe_and_settings_errors() {
    let fake = FakeSmtp::start(FakeConfig::default()).await;
    let t = transport(SmtpSettings {
        auth: basic(PASSWORD),
        ..settings(&fake)
    });
    let described = t.describe();
    assert_eq!(
        described,
        format!("smtp://127.0.0.1:{}", fake.addr().port())
    );
    assert!(!described.contains(USER) && !described.contains(PASSWORD));

    let missing = std::path::PathBuf::from("/nonexistent/ca.pem");
    let err = SmtpTransport::new(SmtpSettings {
        ca_file: Some(missing),
        ..settings(&fake)
    })
    .err()
    .expect("bad CA");
    assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    let empty = tempfile::NamedTempFile::new().expect("temp file");
    let err = SmtpTransport::new(SmtpSettings {
        ca_file: Some(empty.path().to_path_buf()),
        ..settings(&fake)
    })
    .err()
    .expect("empty CA file");
    assert!(err.contains("no PEM certificate"), "{err}");
}

#[tokio::test]
async fn unsafe_addresses_never_reach_the_wire() {
    let fake = FakeSmtp::start(FakeConfig::default()).await;
    let t = transport(settings(&fake));
    let env = envelope(&[
        "b@example.com>\r\nRCPT TO:<evil@example.com",
        "c@example.com",
    ]);
    let results = t
        .deliver(&env, &mailbridge::transport::Body::from(MESSAGE))
        .await
        .expect("per recipient");
    assert_message(
        results[0].as_ref().unwrap_err(),
        Severity::Permanent,
        "invalid recipient address",
    );
    assert!(results[1].is_ok());
    assert_eq!(fake.messages()[0].rcpts, ["c@example.com"]);
    assert!(!fake.commands().iter().any(|c| c.contains("evil")));
}

/// Issue 14 (fault injection): after "final dot sent, no reply" the
/// primary may have delivered the message; failing over at once would send
/// it through the alternate too. The router keeps the primary and the
/// attempt fails transiently (the scheduler retries the same server later).
#[tokio::test]
async fn no_failover_after_the_final_dot() {
    use mailbridge::routing::Router;
    use std::sync::Arc;
    let primary = FakeSmtp::start(FakeConfig::default().fault(Stage::EndOfData, Fault::Hang)).await;
    let alternate = FakeSmtp::start(FakeConfig::default()).await;
    let timeout = Duration::from_millis(200);
    let p = transport(SmtpSettings {
        timeout,
        ..settings(&primary)
    });
    let a = transport(settings(&alternate));
    let router = Router::new(Arc::new(p), Some(Arc::new(a)));
    let msg = b"From: a@example.com\r\nMessage-ID: <dup-1@example.com>\r\n\r\nHello.\r\n";
    let failure = whole_failure(
        router
            .deliver(
                &envelope(&["b@example.com"]),
                &mailbridge::transport::Body::from(msg),
            )
            .await
            .result,
    );
    assert_maybe_delivered(&failure, "timeout");
    assert_eq!(router.state().active, "primary");
    assert_eq!(alternate.connections(), 0);
    assert!(alternate.messages().is_empty());
    // A server failure before the data still fails over.
    primary.set_fault(Stage::Mail, Fault::Close);
    let d = router
        .deliver(
            &envelope(&["b@example.com"]),
            &mailbridge::transport::Body::from(msg),
        )
        .await;
    assert!(all_ok(&d.result), "{:?}", d.result);
    assert_eq!(d.route, "alternate");
    assert_eq!(router.state().active, "alternate");
    assert_eq!(alternate.messages().len(), 1);
}
