//! Property tests: spool metadata decode-after-encode is the identity; what the session queues is always canonical CRLF.

use std::net::SocketAddr;
use std::sync::Arc;

use mailbridge::config::Listen;
use mailbridge::inbound::Settings;
use mailbridge::inbound::session::{Session, Step};
use mailbridge::spool::meta::{Meta, Rcpt, RcptStatus};
use proptest::prelude::*;

fn status() -> impl Strategy<Value = RcptStatus> {
    prop_oneof![
        Just(RcptStatus::Pending),
        Just(RcptStatus::Delivered),
        Just(RcptStatus::Failed)
    ]
}

prop_compose! {
    fn rcpt()(
        addr in "\\PC{0,40}",
        status in status(),
        last_error in proptest::option::of("\\PC{0,60}"),
        reply_code in proptest::option::of(200u16..600),
        enhanced in proptest::option::of((prop_oneof![Just(2u8), Just(4), Just(5)], 0u16..1000, 0u16..1000)),
    ) -> Rcpt {
        Rcpt {
            status,
            last_error,
            reply_code,
            enhanced: enhanced.map(|(c, s, d)| mailbridge::outcome::Enhanced::new(c, s, d)),
            class: reply_code.map(|_| mailbridge::outcome::FailureClass::Message),
            ..Rcpt::pending(addr)
        }
    }
}

prop_compose! {
    fn meta()(
        id in "[A-Za-z0-9-]{0,30}",
        from in "\\PC{0,40}",
        rcpts in proptest::collection::vec(rcpt(), 0..5),
        nums in (any::<u64>(), any::<u64>(), any::<u32>(), any::<u64>()),
        last_error in proptest::option::of("\\PC{0,60}"),
        message_id in proptest::option::of("\\PC{0,60}"),
        client in "\\PC{0,30}",
        flags in (any::<bool>(), any::<bool>()),
        auth_user in proptest::option::of("\\PC{0,20}"),
    ) -> Meta {
        Meta {
            id, from, rcpts,
            size: nums.0, received_at: nums.1, attempts: nums.2, next_attempt: nums.3,
            last_error, message_id, client,
            smtputf8: flags.0, is_dsn: flags.1, auth_user,
            bounce_undeliverable: flags.0 && flags.1,
            sample: flags.1 && !flags.0,
        }
    }
}

fn canonical(b: &[u8]) -> bool {
    b.iter().enumerate().all(|(i, &c)| match c {
        b'\r' => b.get(i + 1) == Some(&b'\n'),
        b'\n' => i > 0 && b[i - 1] == b'\r',
        _ => true,
    })
}

proptest! {
    /// Serialise, deserialise: the same metadata (compared as JSON values,
    /// since `Meta` has no `PartialEq`), and the same verdict from `check`.
    #[test]
    fn spool_meta_decode_after_encode_is_identity(m in meta()) {
        let bytes = serde_json::to_vec(&m).unwrap();
        let back: Meta = serde_json::from_slice(&bytes).unwrap();
        prop_assert_eq!(serde_json::to_value(&m).unwrap(), serde_json::to_value(&back).unwrap());
        prop_assert_eq!(m.check(), back.check());
        // And the pretty form the spool may write decodes the same.
        let pretty = serde_json::to_vec_pretty(&m).unwrap();
        let back: Meta = serde_json::from_slice(&pretty).unwrap();
        prop_assert_eq!(serde_json::to_value(&m).unwrap(), serde_json::to_value(&back).unwrap());
    }

    /// Whatever bytes follow DATA (cut anywhere), a queued message is
    /// canonical: CRLF only, headers added included.
    #[test]
    fn queued_messages_are_canonical(
        data in proptest::collection::vec(prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'.'), Just(0u8), any::<u8>()], 0..400),
        chunk in 1usize..64,
    ) {
        // NULs stripped, not refused (the default), so every input queues one.
        let listen = Listen { nul_bytes: mailbridge::config::NulBytes::Strip, ..Listen::default() };
        let settings = Arc::new(Settings::new("mx.test", listen));
        let client: SocketAddr = ([127, 0, 0, 1], 1).into();
        let mut s = Session::new(settings, client);
        let input = [&b"EHLO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n"[..], &data, b"\r\n.\r\n"].concat();
        let mut chunks = input.chunks(chunk);
        let mut buf = Vec::new();
        let mut n = 0;
        let mut file = Vec::new();
        loop {
            match s.feed(&mut buf) {
                Step::Write => file.extend_from_slice(&s.take_body(Vec::new())),
                Step::Message(m) => {
                    file.extend_from_slice(&m.tail);
                    let body = std::mem::take(&mut file);
                    prop_assert!(canonical(&body), "{:?}", body);
                    prop_assert!(!body.contains(&0), "NUL queued: {:?}", body);
                    n += 1;
                    s.sink_result(Ok(()));
                }
                Step::NeedInput => match chunks.next() {
                    Some(c) => buf.extend_from_slice(c),
                    None => break,
                },
                Step::Close | Step::StartTls | Step::Authenticate { .. } => break,
            }
            let _ = s.take_output();
        }
        // The input ends in CRLF.CRLF, so at least one message was queued.
        prop_assert!(n >= 1);
    }
}
