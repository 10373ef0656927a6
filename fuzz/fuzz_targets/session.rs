//! Fuzz the whole sans-IO SMTP session with arbitrary client bytes: no panic, replies well formed, accepted messages canonical.
#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use argon2::password_hash::{PasswordHasher, SaltString};

use libfuzzer_sys::fuzz_target;
use mailbridge::config::{Listen, User};
use mailbridge::inbound::Settings;
use mailbridge::inbound::session::{Session, Step};

fn canonical(b: &[u8]) -> bool {
    b.iter().enumerate().all(|(i, &c)| match c {
        b'\r' => b.get(i + 1) == Some(&b'\n'),
        b'\n' => i > 0 && b[i - 1] == b'\r',
        _ => true,
    })
}

/// Settings for each combination of the option bits 0x40 and 0x80, made once
/// (the user "app" with password "ok", hashed with the cheapest argon2 parameters).
fn settings(opts: u8) -> Arc<Settings> {
    static ALL: OnceLock<Vec<Arc<Settings>>> = OnceLock::new();
    let all = ALL.get_or_init(|| {
        let params = argon2::Params::new(8, 1, 1, None).expect("params");
        let argon =
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let salt = SaltString::encode_b64(b"0123456789abcdef").expect("salt");
        let hash = argon.hash_password(b"ok", &salt).expect("hash").to_string();
        let users = [User {
            name: "app".into(),
            password_hash: hash,
            mailbox: String::new(),
        }];
        (0..4u8)
            .map(|bits| {
                let listen = Listen {
                    max_message_size: 2048,
                    max_command_length: 512,
                    max_recipients: 5,
                    max_errors: 20,
                    require_auth: bits & 1 != 0,
                    allowed_recipient_domains: if bits & 2 != 0 {
                        vec!["b.c".into()]
                    } else {
                        vec![]
                    },
                    ..Listen::default()
                };
                Arc::new(
                    Settings::new("mx.fuzz", listen)
                        .with_users(&users)
                        .expect("users"),
                )
            })
            .collect()
    });
    all[(opts >> 6) as usize].clone()
}

fuzz_target!(|data: &[u8]| {
    // First byte: chunk size and options; the rest is what the client sends.
    let Some((&opts, input)) = data.split_first() else {
        return;
    };
    let settings = settings(opts);
    let client: SocketAddr = ([127, 0, 0, 1], 2525).into();
    let mut s = Session::with_sources(
        settings,
        client,
        Box::new(|| "ID".to_string()),
        Box::new(|| chrono::DateTime::UNIX_EPOCH.fixed_offset()),
    );
    if opts & 0x20 != 0 {
        s.tls_established();
    }
    let step = (opts & 0x1f) as usize + 1;
    let mut chunks = input.chunks(step);
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let mut file = Vec::new();
    for _ in 0..100_000 {
        let st = s.feed(&mut buf);
        out.extend_from_slice(&s.take_output());
        if !s.in_data() && !matches!(st, Step::Message(_)) {
            file.clear();
        }
        match st {
            Step::Close => break,
            Step::Write => file.extend_from_slice(&s.take_body(Vec::new())),
            Step::Message(m) => {
                file.extend_from_slice(&m.tail);
                assert!(canonical(&file));
                file.clear();
                assert!(!m.rcpts.is_empty());
                s.sink_result(Ok(()));
            }
            Step::StartTls => s.tls_established(),
            Step::Authenticate { password, .. } => s.auth_result(password.expose() == "ok"),
            Step::NeedInput => match chunks.next() {
                Some(c) => buf.extend_from_slice(c),
                None => break,
            },
        }
    }
    // Every reply line is "ddd" + " " or "-" + text + CRLF, with no bare CR or LF.
    assert!(canonical(&out));
    for line in out.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        assert!(line.len() >= 5, "{line:?}");
        assert!(line[..3].iter().all(u8::is_ascii_digit), "{line:?}");
        assert!(line[3] == b' ' || line[3] == b'-', "{line:?}");
    }
});
