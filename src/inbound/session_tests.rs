//! Tests of the sans-IO session: exact replies for whole conversations, fed in any chunking.
//!
//! (Over 800 lines: one test per behaviour of the session, with the exact
//! bytes of each conversation; split by topic when it grows further.)

use super::*;
use crate::config::{BareLineEndings, Listen, NulBytes};

const DATE: &str = "Tue, 2 Jan 2024 03:04:05 +0000";
const EHLO_REPLY: &str = "250-mx.test\r\n250-SIZE 10000\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n250 PIPELINING\r\n";

fn listen() -> Listen {
    Listen {
        max_message_size: 10_000,
        max_command_length: 512,
        // The test client is 192.0.2.7.
        allow_clients: vec!["0.0.0.0/0".parse().expect("net")],
        ..Listen::default()
    }
}

fn session_with(listen: Listen) -> Session {
    session_for(
        Settings::new("mx.test", listen),
        ([192, 0, 2, 7], 40000).into(),
    )
}

/// A session for `settings` and `client` with fixed ids and date.
fn session_for(settings: Settings, client: SocketAddr) -> Session {
    let settings = Arc::new(settings);
    let mut n = 0;
    let ids: IdSource = Box::new(move || {
        n += 1;
        format!("ID{n}")
    });
    let clock: Clock = Box::new(|| {
        chrono::DateTime::parse_from_rfc3339("2024-01-02T03:04:05+00:00").unwrap_or_default()
    });
    Session::with_sources(settings, client, ids, clock)
}

/// A message the driver committed, with all its bytes.
#[derive(Debug, PartialEq, Eq)]
struct Got {
    msg: Incoming,
    body: Vec<u8>,
}

impl std::ops::Deref for Got {
    type Target = Incoming;
    fn deref(&self) -> &Incoming {
        &self.msg
    }
}

/// What a driver would see: all output, the messages, and whether it closed.
struct Run {
    out: String,
    msgs: Vec<Got>,
    closed: bool,
    /// STARTTLS handshakes the driver was asked for.
    tls: usize,
    /// Credentials the driver was asked to check.
    auths: Vec<(String, String)>,
}

/// The one good password the test driver knows.
const GOOD: (&str, &str) = ("app", "s3cret");

/// Drive `s` with `input` cut into `chunk`-byte pieces, answering the sink with `results` in turn (then Ok).
fn drive(s: &mut Session, input: &[u8], chunk: usize, results: &[Result<(), SinkError>]) -> Run {
    let mut run = Run {
        out: String::new(),
        msgs: vec![],
        closed: false,
        tls: 0,
        auths: vec![],
    };
    let mut buf = Vec::new();
    let mut results = results.iter().copied();
    let mut chunks = input.chunks(chunk.max(1));
    // The file of the message in DATA.
    let mut file: Option<(String, Vec<u8>)> = None;
    loop {
        let step = s.feed(&mut buf);
        run.out.push_str(&String::from_utf8_lossy(&s.take_output()));
        if !s.in_data() && !matches!(step, Step::Message(_)) {
            file = None;
        }
        match step {
            Step::Close => {
                run.closed = true;
                return run;
            }
            Step::Write => {
                let id = s.data_id().expect("in DATA").to_string();
                let f = file.get_or_insert_with(|| (id.clone(), Vec::new()));
                assert_eq!(f.0, id);
                let bytes = s.take_body(Vec::new());
                f.1.extend_from_slice(&bytes);
            }
            Step::Message(m) => {
                let mut body = file
                    .take()
                    .map(|(id, b)| {
                        assert_eq!(id, m.id);
                        b
                    })
                    .unwrap_or_default();
                body.extend_from_slice(&m.tail);
                run.msgs.push(Got { msg: m, body });
                s.sink_result(results.next().unwrap_or(Ok(())));
            }
            Step::StartTls => {
                run.tls += 1;
                // The session already dropped whatever was pipelined.
                assert!(buf.is_empty(), "{buf:?}");
                s.tls_established();
            }
            Step::Authenticate { user, password } => {
                let ok = (user.as_str(), password.expose()) == GOOD;
                run.auths.push((user, password.expose().to_string()));
                s.auth_result(ok);
            }
            Step::NeedInput => match chunks.next() {
                Some(c) => buf.extend_from_slice(c),
                None => return run,
            },
        }
    }
}

fn run(input: &str) -> Run {
    drive(
        &mut session_with(listen()),
        input.as_bytes(),
        usize::MAX,
        &[],
    )
}

const TRANSACTION: &str = "EHLO client.example\r\nMAIL FROM:<a@example.com> BODY=8BITMIME\r\nRCPT TO:<b@example.org>\r\nDATA\r\nSubject: hi\r\n\r\nHello\r\n..dot\r\n.\r\nQUIT\r\n";

#[test]
fn pipelined_transaction_exact_bytes() {
    let r = run(TRANSACTION);
    let expected = format!(
        "220 mx.test ESMTP mailbridge\r\n{EHLO_REPLY}250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Ok: queued as ID1\r\n221 2.0.0 Bye\r\n"
    );
    assert_eq!(r.out, expected);
    assert!(r.closed);
    assert_eq!(r.msgs.len(), 1);
    let m = &r.msgs[0];
    let body = format!(
        "Received: from client.example ([192.0.2.7])\r\n\tby mx.test (mailbridge) with ESMTP id ID1\r\n\tfor <b@example.org>; {DATE}\r\nSubject: hi\r\nMessage-ID: <ID1@mx.test>\r\nDate: {DATE}\r\n\r\nHello\r\n.dot\r\n"
    );
    assert_eq!(String::from_utf8_lossy(&m.body), body);
    assert_eq!(
        (
            m.id.as_str(),
            m.from.as_str(),
            m.rcpts.as_slice(),
            m.helo.as_str()
        ),
        (
            "ID1",
            "a@example.com",
            &["b@example.org".to_string()][..],
            "client.example"
        )
    );
    assert_eq!(m.message_id.as_deref(), Some("<ID1@mx.test>"));
    assert!(m.eight_bit && !m.smtputf8);
}

#[test]
fn any_chunking_gives_the_same_bytes() {
    let whole = run(TRANSACTION);
    for chunk in [1, 2, 3, 5, 7, 64] {
        let r = drive(
            &mut session_with(listen()),
            TRANSACTION.as_bytes(),
            chunk,
            &[],
        );
        assert_eq!(r.out, whole.out, "chunk {chunk}");
        assert_eq!(r.msgs, whole.msgs, "chunk {chunk}");
    }
}

#[test]
fn commands_may_end_in_bare_lf() {
    let r = run("helo c\nnoop\nquit\n");
    assert_eq!(
        r.out,
        "220 mx.test ESMTP mailbridge\r\n250 mx.test\r\n250 2.0.0 Ok\r\n221 2.0.0 Bye\r\n"
    );
}

#[test]
fn existing_headers_kept_helo_is_smtp_several_rcpts() {
    let r = run(
        "HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<x@y.z>\r\nRCPT TO:<w@y.z>\r\nRCPT TO:<x@y.z>\r\nDATA\r\nMessage-Id: <m@c>\r\nDate: then\r\n\r\nb\r\n.\r\n",
    );
    assert_eq!(r.msgs.len(), 1, "{}", r.out);
    let m = &r.msgs[0];
    assert_eq!(m.from, "");
    assert_eq!(m.rcpts, ["x@y.z", "w@y.z"]);
    assert_eq!(m.message_id.as_deref(), Some("<m@c>"));
    let body = format!(
        "Received: from c ([192.0.2.7])\r\n\tby mx.test (mailbridge) with SMTP id ID1; {DATE}\r\nMessage-Id: <m@c>\r\nDate: then\r\n\r\nb\r\n"
    );
    assert_eq!(String::from_utf8_lossy(&m.body), body);
}

#[test]
fn recipient_limit_keeps_earlier_ones() {
    let mut input = String::from("EHLO c\r\nMAIL FROM:<a@b.c>\r\n");
    for i in 0..101 {
        input.push_str(&format!("RCPT TO:<r{i}@b.c>\r\n"));
    }
    input.push_str("DATA\r\nx\r\n.\r\n");
    let r = run(&input);
    let expected = format!(
        "220 mx.test ESMTP mailbridge\r\n{EHLO_REPLY}250 2.1.0 Ok\r\n{}452 4.5.3 Too many recipients\r\n354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Ok: queued as ID1\r\n",
        "250 2.1.5 Ok\r\n".repeat(100)
    );
    assert_eq!(r.out, expected);
    assert_eq!(r.msgs[0].rcpts.len(), 100);
    assert_eq!(r.msgs[0].rcpts[99], "r99@b.c");
}

#[test]
fn rset_and_sequence_errors() {
    let r = run(
        "MAIL FROM:<a@b.c>\r\nEHLO c\r\nRCPT TO:<a@b.c>\r\nDATA\r\nMAIL FROM:<a@b.c>\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nRSET\r\nDATA\r\nRCPT TO:<d@e.f>\r\n",
    );
    let expected = format!(
        "220 mx.test ESMTP mailbridge\r\n503 5.5.1 Error: send HELO/EHLO first\r\n{EHLO_REPLY}503 5.5.1 Error: need MAIL command\r\n503 5.5.1 Error: need RCPT command\r\n250 2.1.0 Ok\r\n503 5.5.1 Error: nested MAIL command\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok\r\n503 5.5.1 Error: need RCPT command\r\n503 5.5.1 Error: need MAIL command\r\n"
    );
    assert_eq!(r.out, expected);
    assert!(!r.closed);
}

#[test]
fn syntax_and_parameter_errors() {
    let r = run(
        "EHLO c\r\nFOO\r\nMAIL FROM:<a@b.c> RET=FULL\r\nMAIL FROM:<bad>\r\nMAIL FROM:<a@b.c\r\nMAIL FROM:<ü@b.c>\r\nMAIL FROM:<ü@b.c> SMTPUTF8\r\nRCPT TO:<nope>\r\nRCPT TO:<ö@b.c>\r\nVRFY x\r\nHELP\r\nNOOP\r\nAUTH PLAIN\r\nSTARTTLS\r\n",
    );
    let expected = format!(
        "220 mx.test ESMTP mailbridge\r\n{EHLO_REPLY}500 5.5.2 Error: command not recognized\r\n555 5.5.4 Unsupported parameter\r\n553 5.1.7 Bad sender address syntax\r\n501 5.5.4 Syntax: MAIL FROM:<address>\r\n553 5.6.7 Non-ASCII sender address needs SMTPUTF8\r\n250 2.1.0 Ok\r\n553 5.1.3 Bad recipient address syntax\r\n250 2.1.5 Ok\r\n252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery\r\n214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP\r\n250 2.0.0 Ok\r\n502 5.5.1 Error: command not implemented\r\n502 5.5.1 Error: command not implemented\r\n"
    );
    assert_eq!(r.out, expected);
    assert!(!r.closed);
}

#[test]
fn too_many_errors_closes() {
    let r = drive(
        &mut session_with(Listen {
            max_errors: 2,
            ..listen()
        }),
        b"X\r\nY\r\nNOOP\r\nZ\r\nNOOP\r\n",
        usize::MAX,
        &[],
    );
    let e = "500 5.5.2 Error: command not recognized\r\n";
    assert_eq!(
        r.out,
        format!(
            "220 mx.test ESMTP mailbridge\r\n{e}{e}250 2.0.0 Ok\r\n{e}421 4.7.0 Too many errors\r\n"
        )
    );
    assert!(r.closed);
}

#[test]
fn http_is_closed_at_once() {
    let r = run("GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(
        r.out,
        "220 mx.test ESMTP mailbridge\r\n554 5.7.0 Error: this is an SMTP server, not HTTP\r\n"
    );
    assert!(r.closed);
}

#[test]
fn long_command_line_is_refused_with_bounded_memory() {
    let mut s = session_with(listen());
    let mut buf = Vec::new();
    let mut out = String::new();
    let chunk = vec![b'A'; 8192];
    for _ in 0..(10 << 20) / 8192 {
        buf.extend_from_slice(&chunk);
        assert!(matches!(s.feed(&mut buf), Step::NeedInput));
        assert!(buf.len() < 512, "{}", buf.len());
        out.push_str(&String::from_utf8_lossy(&s.take_output()));
    }
    buf.extend_from_slice(b"AAAA\r\nNOOP\r\n");
    assert!(matches!(s.feed(&mut buf), Step::NeedInput));
    out.push_str(&String::from_utf8_lossy(&s.take_output()));
    assert_eq!(
        out,
        "220 mx.test ESMTP mailbridge\r\n500 5.5.2 Line too long\r\n250 2.0.0 Ok\r\n"
    );
    // Exactly the limit (CRLF included) is still a command.
    let line = format!("NOOP {}\r\n", "x".repeat(512 - 7));
    let r = drive(
        &mut session_with(listen()),
        line.as_bytes(),
        usize::MAX,
        &[],
    );
    assert_eq!(r.out, "220 mx.test ESMTP mailbridge\r\n250 2.0.0 Ok\r\n");
    let line = format!("NOOP {}\r\n", "x".repeat(512 - 6));
    let r = drive(
        &mut session_with(listen()),
        line.as_bytes(),
        usize::MAX,
        &[],
    );
    assert_eq!(
        r.out,
        "220 mx.test ESMTP mailbridge\r\n500 5.5.2 Line too long\r\n"
    );
}

const START: &str = "EHLO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n";
const HEAD: &str = "220 mx.test ESMTP mailbridge\r\n";
const OK_TO_DATA: &str = "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n";

#[test]
fn size_limits() {
    let r = run("EHLO c\r\nMAIL FROM:<a@b.c> SIZE=10001\r\nMAIL FROM:<a@b.c> SIZE=10000\r\n");
    assert_eq!(
        r.out,
        format!(
            "{HEAD}{EHLO_REPLY}552 5.3.4 Message size exceeds fixed maximum message size\r\n250 2.1.0 Ok\r\n"
        )
    );
    let big = "x".repeat(10_001);
    let r = run(&format!("{START}{big}\r\n.\r\nNOOP\r\n"));
    assert_eq!(
        r.out,
        format!(
            "{HEAD}{EHLO_REPLY}{OK_TO_DATA}552 5.3.4 Message size exceeds fixed maximum message size\r\n250 2.0.0 Ok\r\n"
        )
    );
    assert!(r.msgs.is_empty());
}

#[test]
fn sink_failures_and_loops() {
    let input =
        format!("{START}x\r\n.\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\ny\r\n.\r\n");
    let r = drive(
        &mut session_with(listen()),
        input.as_bytes(),
        usize::MAX,
        &[Err(SinkError::Io), Err(SinkError::Full)],
    );
    assert_eq!(
        r.out,
        format!(
            "{HEAD}{EHLO_REPLY}{OK_TO_DATA}451 4.3.0 Error: queue file write error\r\n{OK_TO_DATA}452 4.3.1 Insufficient system storage\r\n"
        )
    );
    let hops = "Received: x\r\n".repeat(31);
    let r = run(&format!("{START}{hops}\r\nb\r\n.\r\n"));
    assert_eq!(
        r.out,
        format!("{HEAD}{EHLO_REPLY}{OK_TO_DATA}554 5.4.6 Too many hops (mail loop)\r\n")
    );
    assert!(r.msgs.is_empty());
    let hops = "Received: x\r\n".repeat(30);
    assert_eq!(run(&format!("{START}{hops}\r\nb\r\n.\r\n")).msgs.len(), 1);
}

#[test]
fn bare_line_endings_policies() {
    let input = format!("{START}a\nb\r\n.\r\n");
    let r = run(&input);
    assert!(String::from_utf8_lossy(&r.msgs[0].body).ends_with("\r\n\r\na\r\nb\r\n"));
    let r = drive(
        &mut session_with(Listen {
            bare_line_endings: BareLineEndings::Reject,
            ..listen()
        }),
        input.as_bytes(),
        usize::MAX,
        &[],
    );
    assert_eq!(
        r.out,
        format!(
            "{HEAD}{EHLO_REPLY}{OK_TO_DATA}550 5.6.11 Bare CR or LF not allowed; use CRLF line endings\r\n"
        )
    );
    assert!(r.msgs.is_empty());
}

#[test]
fn nul_bytes_policies() {
    // hannob/smtpsmug's `CRLF NUL . CRLF` then a smuggled command: not an
    // end of data; refused by default once the real end arrives.
    let input = format!("{START}a\r\n\0.\r\nMAIL FROM:<evil@x.y>\r\n.\r\n");
    let r = run(&input);
    assert_eq!(
        r.out,
        format!(
            "{HEAD}{EHLO_REPLY}{OK_TO_DATA}550 5.6.0 NUL characters are not allowed in message data\r\n"
        )
    );
    assert!(r.msgs.is_empty());
    // Strip: accepted without the NUL; the dot line is content.
    let r = drive(
        &mut session_with(Listen {
            nul_bytes: NulBytes::Strip,
            ..listen()
        }),
        input.as_bytes(),
        usize::MAX,
        &[],
    );
    assert_eq!(r.msgs.len(), 1);
    let body = &r.msgs[0].body;
    assert!(!body.contains(&0));
    assert!(
        String::from_utf8_lossy(body).ends_with("\r\n\r\na\r\n.\r\nMAIL FROM:<evil@x.y>\r\n"),
        "{}",
        String::from_utf8_lossy(body)
    );
}

#[test]
fn smuggled_transaction_stays_inside_the_message() {
    let r = run(&format!(
        "{START}hello\n.\nMAIL FROM:<evil@x.y>\r\nRCPT TO:<victim@x.y>\r\nDATA\r\nevil\r\n.\r\nQUIT\r\n"
    ));
    assert_eq!(r.msgs.len(), 1);
    assert_eq!(
        r.out,
        format!("{HEAD}{EHLO_REPLY}{OK_TO_DATA}250 2.0.0 Ok: queued as ID1\r\n221 2.0.0 Bye\r\n")
    );
    assert!(String::from_utf8_lossy(&r.msgs[0].body).ends_with(
        "hello\r\n.\r\nMAIL FROM:<evil@x.y>\r\nRCPT TO:<victim@x.y>\r\nDATA\r\nevil\r\n"
    ));
}

#[test]
fn timeout_and_shutdown_replies() {
    let mut s = session_with(listen());
    s.timeout();
    assert_eq!(
        s.take_output(),
        b"220 mx.test ESMTP mailbridge\r\n421 4.4.2 mx.test Error: timeout exceeded\r\n"
    );
    assert!(matches!(s.feed(&mut b"NOOP\r\n".to_vec()), Step::Close));
    let mut s = session_with(listen());
    s.shutdown();
    s.shutdown();
    assert_eq!(
        s.take_output(),
        b"220 mx.test ESMTP mailbridge\r\n421 4.3.2 mx.test Service shutting down\r\n"
    );
}

/// Settings with TLS (a fresh self-signed pair) and the users `app`/`s3cret` and `other`.
fn secure(listen: Listen) -> Settings {
    let dir = tempfile::tempdir().expect("tempdir");
    let ck = rcgen::generate_simple_self_signed(vec!["mx.test".into()]).expect("cert");
    let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    std::fs::write(&cert, ck.cert.pem()).expect("write");
    std::fs::write(&key, ck.key_pair.serialize_pem()).expect("write");
    let users = [
        crate::config::User {
            name: GOOD.0.into(),
            password_hash: crate::inbound::auth::cheap_hash(GOOD.1),
            mailbox: String::new(),
        },
        crate::config::User {
            name: "other".into(),
            password_hash: crate::inbound::auth::cheap_hash("x"),
            mailbox: String::new(),
        },
    ];
    Settings::new("mx.test", listen)
        .with_tls_files(&cert, &key)
        .expect("tls")
        .with_users(&users)
        .expect("users")
}

const REMOTE: ([u8; 4], u16) = ([192, 0, 2, 7], 40000);
const LOCAL: ([u8; 4], u16) = ([127, 0, 0, 1], 40000);

fn ehlo_with(extra: &[&str]) -> String {
    let mut s = String::from(
        "250-mx.test\r\n250-SIZE 10000\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n",
    );
    for e in extra {
        s.push_str(&format!("250-{e}\r\n"));
    }
    s.push_str("250 PIPELINING\r\n");
    s
}

fn run_with(settings: Settings, client: impl Into<SocketAddr>, input: &str) -> Run {
    drive(
        &mut session_for(settings, client.into()),
        input.as_bytes(),
        usize::MAX,
        &[],
    )
}

#[test]
fn client_outside_the_allow_list_gets_554_and_nothing_else() {
    let l = Listen {
        allow_clients: vec!["127.0.0.1/32".parse().unwrap()],
        ..listen()
    };
    let r = run_with(
        Settings::new("mx.test", l.clone()),
        ([127, 0, 0, 2], 1),
        TRANSACTION,
    );
    assert_eq!(r.out, "554 5.7.1 Access denied\r\n");
    assert!(r.closed && r.msgs.is_empty());
    // Even on the implicit-TLS listener, where TLS comes first.
    let mut s = session_for(Settings::new("mx.test", l), ([127, 0, 0, 2], 1).into());
    s.tls_established();
    assert!(s.is_closed());
    assert!(matches!(s.feed(&mut b"EHLO x\r\n".to_vec()), Step::Close));
    assert_eq!(s.take_output(), b"554 5.7.1 Access denied\r\n");
}

#[test]
fn starttls_discards_pipelined_commands_and_resets() {
    let r = run_with(
        secure(listen()),
        REMOTE,
        "EHLO c\r\nSTARTTLS\r\nMAIL FROM:<x@y.z>\r\nRCPT TO:<a@b.c>\r\n",
    );
    // Only the STARTTLS reply: MAIL and RCPT were dropped, not answered.
    assert_eq!(
        r.out,
        format!(
            "{HEAD}{}220 2.0.0 Ready to start TLS\r\n",
            ehlo_with(&["STARTTLS"])
        )
    );
    assert_eq!(r.tls, 1);
    // After the handshake: EHLO again (MAIL before it is refused), no
    // STARTTLS offered, AUTH offered now, STARTTLS again refused.
    let input = "EHLO c\r\nSTARTTLS\r\n";
    let mut s = session_for(secure(listen()), REMOTE.into());
    let r1 = drive(&mut s, input.as_bytes(), usize::MAX, &[]);
    assert_eq!(r1.tls, 1);
    let r2 = drive(
        &mut s,
        b"MAIL FROM:<a@b.c>\r\nEHLO c\r\nSTARTTLS\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\nhi\r\n.\r\n",
        usize::MAX,
        &[],
    );
    assert_eq!(
        r2.out,
        format!(
            "503 5.5.1 Error: send HELO/EHLO first\r\n{}503 5.5.1 Error: TLS already active\r\n{OK_TO_DATA}250 2.0.0 Ok: queued as ID1\r\n",
            ehlo_with(&["AUTH PLAIN LOGIN"])
        )
    );
    assert!(String::from_utf8_lossy(&r2.msgs[0].body).contains(" with ESMTPS id ID1"));
    assert!(s.is_tls());
}

#[test]
fn starttls_refusals() {
    // Not configured: not offered, not implemented.
    let r = run("EHLO c\r\nSTARTTLS\r\n");
    assert!(
        r.out
            .ends_with("502 5.5.1 Error: command not implemented\r\n")
    );
    let r = run_with(
        secure(listen()),
        REMOTE,
        "STARTTLS\r\nEHLO c\r\nMAIL FROM:<a@b.c>\r\nSTARTTLS\r\nSTARTTLS x\r\n",
    );
    assert_eq!(
        r.out,
        format!(
            "{HEAD}503 5.5.1 Error: send HELO/EHLO first\r\n{}250 2.1.0 Ok\r\n503 5.5.1 Error: MAIL transaction in progress\r\n501 5.5.4 Syntax: STARTTLS\r\n",
            ehlo_with(&["STARTTLS"])
        )
    );
    assert_eq!(r.tls, 0);
}

#[test]
fn starttls_forgets_cleartext_authentication() {
    // A loopback client may AUTH in cleartext, but STARTTLS resets that.
    let mut s = session_for(secure(listen()), LOCAL.into());
    let r = drive(
        &mut s,
        b"EHLO c\r\nAUTH PLAIN AGFwcABzM2NyZXQ=\r\nSTARTTLS\r\n",
        usize::MAX,
        &[],
    );
    assert!(
        r.out
            .ends_with("235 2.7.0 Authentication successful\r\n220 2.0.0 Ready to start TLS\r\n"),
        "{}",
        r.out
    );
    assert_eq!(s.auth_user(), None);
}

const PLAIN_GOOD: &str = "AGFwcABzM2NyZXQ="; // "\0app\0s3cret"
const PLAIN_BAD: &str = "AGFwcAB3cm9uZw=="; // "\0app\0wrong"
const PLAIN_UNKNOWN: &str = "AG5vYm9keQBzM2NyZXQ="; // "\0nobody\0s3cret"

#[test]
fn auth_is_offered_only_with_tls_or_on_loopback() {
    // Remote client, no TLS: not offered, 538 when tried anyway.
    let r = run_with(
        secure(listen()),
        REMOTE,
        &format!("EHLO c\r\nAUTH PLAIN {PLAIN_GOOD}\r\n"),
    );
    assert_eq!(
        r.out,
        format!(
            "{HEAD}{}538 5.7.11 Encryption required for requested authentication mechanism\r\n",
            ehlo_with(&["STARTTLS"])
        )
    );
    assert!(r.auths.is_empty());
    // Loopback client: offered in cleartext by default...
    let r = run_with(secure(listen()), LOCAL, "EHLO c\r\n");
    assert!(r.out.contains("250-AUTH PLAIN LOGIN\r\n"), "{}", r.out);
    // ...but not with auth_cleartext_loopback = false.
    let strict = Listen {
        auth_cleartext_loopback: false,
        ..listen()
    };
    let r = run_with(
        secure(strict),
        LOCAL,
        &format!("EHLO c\r\nAUTH PLAIN {PLAIN_GOOD}\r\n"),
    );
    assert!(!r.out.contains("AUTH PLAIN LOGIN"), "{}", r.out);
    assert!(
        r.out
            .ends_with("538 5.7.11 Encryption required for requested authentication mechanism\r\n")
    );
    // No users at all: never offered, not implemented.
    let r = run_with(
        Settings::new("mx.test", listen()),
        LOCAL,
        &format!("EHLO c\r\nAUTH PLAIN {PLAIN_GOOD}\r\n"),
    );
    assert_eq!(
        r.out,
        format!("{HEAD}{EHLO_REPLY}502 5.5.1 Error: command not implemented\r\n")
    );
}

/// A remote client after STARTTLS (AUTH allowed), then `input`.
fn after_tls(listen: Listen, input: &str) -> (Run, Session) {
    let mut s = session_for(secure(listen), REMOTE.into());
    s.tls_established();
    let _ = s.take_output();
    let r = drive(&mut s, input.as_bytes(), usize::MAX, &[]);
    (r, s)
}

#[test]
fn auth_plain_and_login_forms() {
    let ehlo = ehlo_with(&["AUTH PLAIN LOGIN"]);
    for (input, replies) in [
        (format!("AUTH PLAIN {PLAIN_GOOD}\r\n"), ""),
        (format!("AUTH plain\r\n{PLAIN_GOOD}\r\n"), "334 \r\n"),
        (
            "AUTH LOGIN\r\nYXBw\r\nczNjcmV0\r\n".to_string(),
            "334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n",
        ),
        (
            "AUTH LOGIN YXBw\r\nczNjcmV0\r\n".to_string(),
            "334 UGFzc3dvcmQ6\r\n",
        ),
    ] {
        let (r, s) = after_tls(
            listen(),
            &format!(
                "EHLO c\r\n{input}MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\nhi\r\n.\r\n"
            ),
        );
        assert_eq!(
            r.out,
            format!(
                "{ehlo}{replies}235 2.7.0 Authentication successful\r\n{OK_TO_DATA}250 2.0.0 Ok: queued as ID1\r\n"
            ),
            "{input:?}"
        );
        assert_eq!(r.auths, [("app".to_string(), "s3cret".to_string())]);
        assert_eq!(s.auth_user(), Some("app"));
        let m = &r.msgs[0];
        assert_eq!(m.auth_user.as_deref(), Some("app"));
        let body = String::from_utf8_lossy(&m.body);
        assert!(body.contains(" with ESMTPSA id ID1"), "{body}");
        assert!(!body.contains("s3cret") && !r.out.contains("s3cret"));
    }
}

#[test]
fn auth_protocol_errors() {
    let (r, _) = after_tls(
        listen(),
        "AUTH PLAIN\r\nHELO c\r\nAUTH PLAIN\r\nEHLO c\r\nAUTH CRAM-MD5\r\nAUTH PLAIN !!!\r\nAUTH PLAIN\r\n*\r\nAUTH LOGIN\r\n=\r\nAUTH PLAIN\r\nbm90IHBsYWlu\r\nMAIL FROM:<a@b.c>\r\nAUTH PLAIN\r\n",
    );
    assert_eq!(
        r.out,
        format!(
            "503 5.5.1 Error: send EHLO first\r\n250 mx.test\r\n503 5.5.1 Error: send EHLO first\r\n{}504 5.5.4 Unrecognized authentication type\r\n501 5.5.2 Cannot decode response\r\n334 \r\n501 5.7.0 Authentication aborted\r\n334 VXNlcm5hbWU6\r\n501 5.5.2 Cannot decode response\r\n334 \r\n501 5.5.2 Cannot decode response\r\n250 2.1.0 Ok\r\n503 5.5.1 Error: MAIL transaction in progress\r\n",
            ehlo_with(&["AUTH PLAIN LOGIN"])
        )
    );
    assert!(r.auths.is_empty());
    let (r, _) = after_tls(
        listen(),
        &format!("EHLO c\r\nAUTH PLAIN {PLAIN_GOOD}\r\nAUTH PLAIN {PLAIN_GOOD}\r\n"),
    );
    assert!(
        r.out.ends_with(
            "235 2.7.0 Authentication successful\r\n503 5.5.1 Error: already authenticated\r\n"
        ),
        "{}",
        r.out
    );
    // An over-long continuation line ends the exchange like an over-long command.
    let (r, _) = after_tls(
        listen(),
        &format!("EHLO c\r\nAUTH PLAIN\r\n{}\r\nNOOP\r\n", "A".repeat(600)),
    );
    assert!(
        r.out
            .ends_with("334 \r\n500 5.5.2 Line too long\r\n250 2.0.0 Ok\r\n"),
        "{}",
        r.out
    );
}

#[test]
fn unknown_user_and_wrong_password_look_the_same_and_brute_force_ends() {
    let (r, _) = after_tls(
        listen(),
        &format!(
            "EHLO c\r\nAUTH PLAIN {PLAIN_BAD}\r\nAUTH PLAIN {PLAIN_UNKNOWN}\r\nAUTH LOGIN\r\nYXBw\r\nd3Jvbmc=\r\nAUTH PLAIN {PLAIN_GOOD}\r\n"
        ),
    );
    let bad = "535 5.7.8 Authentication credentials invalid\r\n";
    assert_eq!(
        r.out,
        format!(
            "{}{bad}{bad}334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n{bad}421 4.7.0 Too many authentication failures\r\n",
            ehlo_with(&["AUTH PLAIN LOGIN"])
        )
    );
    assert!(r.closed);
    // Both the unknown user and the wrong password went to the verifier
    // (which does the same argon2 work for both).
    assert_eq!(r.auths.len(), 3);
    assert_eq!(r.auths[1].0, "nobody");
    assert!(!r.out.contains("wrong") && !r.out.contains("s3cret"));
}

#[test]
fn require_auth_refuses_mail_before_auth() {
    let l = Listen {
        require_auth: true,
        ..listen()
    };
    let (r, _) = after_tls(
        l,
        &format!("EHLO c\r\nMAIL FROM:<a@b.c>\r\nAUTH PLAIN {PLAIN_GOOD}\r\nMAIL FROM:<a@b.c>\r\n"),
    );
    assert_eq!(
        r.out,
        format!(
            "{}530 5.7.0 Authentication required\r\n235 2.7.0 Authentication successful\r\n250 2.1.0 Ok\r\n",
            ehlo_with(&["AUTH PLAIN LOGIN"])
        )
    );
}

#[test]
fn sender_and_recipient_domains() {
    let l = Listen {
        allowed_sender_domains: vec!["b.c".into()],
        allowed_recipient_domains: vec!["e.f".into(), "g.h".into()],
        ..listen()
    };
    let r = drive(
        &mut session_with(l),
        b"EHLO c\r\nMAIL FROM:<a@x.y>\r\nMAIL FROM:<>\r\nMAIL FROM:<a@B.C>\r\nRCPT TO:<d@x.y>\r\nDATA\r\nRCPT TO:<d@e.f>\r\nRCPT TO:<d@sub.g.h>\r\nRCPT TO:<d@G.H>\r\nDATA\r\nhi\r\n.\r\n",
        usize::MAX,
        &[],
    );
    let sender = "550 5.7.1 Sender address rejected: domain not allowed\r\n";
    let relay = "550 5.7.1 Relay access denied\r\n";
    assert_eq!(
        r.out,
        format!(
            "{HEAD}{EHLO_REPLY}{sender}{sender}250 2.1.0 Ok\r\n{relay}503 5.5.1 Error: need RCPT command\r\n250 2.1.5 Ok\r\n{relay}250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Ok: queued as ID1\r\n"
        )
    );
    assert_eq!(r.msgs.len(), 1);
    assert_eq!(r.msgs[0].rcpts, ["d@e.f", "d@G.H"]);
}

/// `after_tls` with `listen.bind_sender`: user `app` may send only as `app@b.c`.
fn bound(input: &str) -> Run {
    let mut settings = secure(listen());
    settings.senders = Arc::new([("app".to_string(), "app@b.c".to_string())].into());
    let mut s = session_for(settings, REMOTE.into());
    s.tls_established();
    let _ = s.take_output();
    drive(&mut s, input.as_bytes(), usize::MAX, &[])
}

#[test]
fn bind_sender_limits_mail_from_to_the_users_address() {
    let r = bound(&format!(
        "EHLO c\r\nAUTH PLAIN {PLAIN_GOOD}\r\nMAIL FROM:<boss@b.c>\r\nMAIL FROM:<>\r\nMAIL FROM:<APP@B.C>\r\n"
    ));
    let refused = "553 5.7.1 Sender address rejected: not owned by the authenticated user\r\n";
    assert_eq!(
        r.out,
        format!(
            "{}235 2.7.0 Authentication successful\r\n{refused}{refused}250 2.1.0 Ok\r\n",
            ehlo_with(&["AUTH PLAIN LOGIN"])
        )
    );
}

#[test]
fn bind_sender_checks_the_from_header_after_data() {
    let msg = |from: &str| {
        format!(
            "EHLO c\r\nAUTH PLAIN {PLAIN_GOOD}\r\nMAIL FROM:<app@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n{from}Subject: x\r\n\r\nhi\r\n.\r\n"
        )
    };
    let head = format!(
        "{}235 2.7.0 Authentication successful\r\n{OK_TO_DATA}",
        ehlo_with(&["AUTH PLAIN LOGIN"])
    );
    let refused = "550 5.7.1 From: header not owned by the authenticated user\r\n";
    for from in [
        "From: Boss <boss@b.c>\r\n",
        "From: \"app@b.c\" <boss@b.c>\r\n",
        "From: app@b.c, boss@b.c\r\n",
        "From: app@b.c\r\nFrom: boss@b.c\r\n",
        "From: =?utf-8?B?YXBwQGIuYw==?= <boss@b.c>\r\n",
        "From: undisclosed:;\r\n",
    ] {
        let r = bound(&msg(from));
        assert_eq!(r.out, format!("{head}{refused}"), "{from:?}");
        assert!(r.msgs.is_empty(), "{from:?}");
    }
    for from in [
        "From: App <app@b.c>\r\n",
        "From: APP@b.c\r\n",
        "From: \"x\"\r\n <app@b.c>\r\n",
        "",
    ] {
        let r = bound(&msg(from));
        assert_eq!(
            r.out,
            format!("{head}250 2.0.0 Ok: queued as ID1\r\n"),
            "{from:?}"
        );
    }
    // Without AUTH (a mixed setup without require_auth) nothing is bound.
    let r = bound(
        "EHLO c\r\nMAIL FROM:<boss@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\nFrom: boss@b.c\r\n\r\nhi\r\n.\r\n",
    );
    assert_eq!(r.msgs.len(), 1, "{}", r.out);
}

#[test]
fn settings_from_config_bind_each_user_to_its_address() {
    let hash = crate::inbound::auth::cheap_hash("pw");
    let text = format!(
        "[listen]\nbind_sender = true\n[upstream]\nmailbox = \"relay@b.c\"\n\
         [[users]]\nname = \"app\"\npassword_hash = \"{hash}\"\nmailbox = \"app@b.c\"\n\
         [[users]]\nname = \"printer@b.c\"\npassword_hash = \"{hash}\"\n\
         [[users]]\nname = \"scanner\"\npassword_hash = \"{hash}\"\n"
    );
    let cfg = crate::config::Config::from_toml(&text, "t.toml", std::path::Path::new(".")).unwrap();
    let s = Settings::from_config(&cfg).unwrap();
    let mut got: Vec<_> = s
        .senders
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("app", "app@b.c"),
            ("printer@b.c", "printer@b.c"),
            ("scanner", "relay@b.c")
        ]
    );
    // Without bind_sender nobody is bound.
    let cfg = crate::config::Config::from_toml(
        &text.replace("bind_sender = true", "bind_sender = false"),
        "t.toml",
        std::path::Path::new("."),
    )
    .unwrap();
    assert!(Settings::from_config(&cfg).unwrap().senders.is_empty());
}

/// A 30 MB message through a session: it never holds more than its buffer
/// (plus a line), every byte arrives in order, and the fields are placed
/// as for a small one.
#[test]
fn memory_does_not_grow_with_message_size() {
    use std::hash::{DefaultHasher, Hasher};
    let mut s = session_with(Listen {
        max_message_size: 40_000_000,
        ..listen()
    });
    let mut input = b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nSubject: big\r\n\r\n".to_vec();
    let line = [&[b'x'; 998][..], b"\r\n"].concat();
    let lines = 30_000_000 / line.len();
    // What the stored body must be, hashed as it is produced.
    let mut want = DefaultHasher::new();
    let head = format!(
        "Received: from c ([192.0.2.7])\r\n\tby mx.test (mailbridge) with ESMTP id ID1\r\n\tfor <b@example.org>; {DATE}\r\nSubject: big\r\nMessage-ID: <ID1@mx.test>\r\nDate: {DATE}\r\n\r\n"
    );
    want.write(head.as_bytes());
    let mut got = DefaultHasher::new();
    let (mut got_len, mut writes, mut widest) = (0usize, 0usize, 0usize);
    let mut spare = Vec::new();
    let mut sent = 0;
    let reply;
    loop {
        match s.feed(&mut input) {
            Step::Write => {
                let bytes = s.take_body(std::mem::take(&mut spare));
                got.write(&bytes);
                got_len += bytes.len();
                writes += 1;
                widest = widest.max(bytes.len());
                spare = bytes;
                spare.clear();
            }
            Step::NeedInput if sent < lines => {
                // The network's 8 KiB reads.
                for _ in 0..8 {
                    input.extend_from_slice(&line);
                    want.write(&line);
                    sent += 1;
                }
            }
            Step::NeedInput if sent == lines => {
                input.extend_from_slice(b".\r\n");
                sent += 1;
            }
            Step::Message(m) => {
                got.write(&m.tail);
                got_len += m.tail.len();
                s.sink_result(Ok(()));
                reply = String::from_utf8_lossy(&s.take_output()).into_owned();
                break;
            }
            other => panic!("{other:?}"),
        }
        assert!(
            input.len() <= 16 * 1024,
            "input buffer grew: {}",
            input.len()
        );
    }
    assert!(
        reply.ends_with("250 2.0.0 Ok: queued as ID1\r\n"),
        "{reply}"
    );
    assert_eq!(got_len, head.len() + lines * line.len());
    assert_eq!(got.finish(), want.finish(), "bytes changed on the way");
    let cap = super::super::receiving::BODY_BUFFER;
    assert!(
        s.body_high_water() <= cap + 2 * line.len(),
        "held {} bytes at once",
        s.body_high_water()
    );
    assert!(widest <= cap + line.len(), "{widest}");
    assert!(writes >= got_len / (cap + line.len()), "{writes} writes");
}

/// A write error mid-DATA: the data is read to its end, then `451` (or
/// `452` for a full disk), and the session goes on.
#[test]
fn a_failed_write_refuses_the_message_after_its_end() {
    let mut s = session_with(Listen {
        max_message_size: 1_000_000,
        ..listen()
    });
    let mut input =
        b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n".to_vec();
    input.extend(std::iter::repeat_n(b'y', 200_000));
    input.extend_from_slice(b"\r\n.\r\nNOOP\r\n");
    let mut failed = 0;
    let step = loop {
        match s.feed(&mut input) {
            Step::Write => {
                let _ = s.take_body(Vec::new());
                s.write_failed(SinkError::Full);
                failed += 1;
            }
            step => break step,
        }
    };
    assert_eq!(failed, 1, "nothing more is handed out after a failure");
    assert!(matches!(step, Step::NeedInput), "{step:?}");
    let out = String::from_utf8_lossy(&s.take_output()).into_owned();
    assert!(
        out.ends_with("354 End data with <CR><LF>.<CR><LF>\r\n452 4.3.1 Insufficient system storage\r\n250 2.0.0 Ok\r\n"),
        "{out}"
    );
    assert!(!s.in_data());
}
