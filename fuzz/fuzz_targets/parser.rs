//! Fuzz the SMTP command parser: line splitting and command parsing on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailbridge::inbound::parser::{Command, Line, parse, split_line};

fuzz_target!(|data: &[u8]| {
    // The limit comes from the first byte so short and long limits are both tried.
    let max = 1 + data.first().copied().unwrap_or(0) as usize * 4;
    match split_line(data, max) {
        Line::Complete(text, used) => {
            assert!(used <= max && used <= data.len());
            assert!(text.len() < used);
            assert_eq!(data[used - 1], b'\n');
            assert!(!text.contains(&b'\n'));
        }
        Line::TooLong => assert!(data.len() >= max),
        Line::Incomplete => assert!(data.len() < max && !data.contains(&b'\n')),
    }
    if let Ok(cmd) = parse(data) {
        // Nothing a client sends may put a control character into what we
        // keep (addresses and HELO names end up in Received: headers).
        let kept = match &cmd {
            Command::Ehlo(s) | Command::Helo(s) | Command::Rcpt(s) => Some(s.clone()),
            Command::Mail(m) => Some(m.address.clone()),
            _ => None,
        };
        if let Some(s) = kept {
            assert!(!s.bytes().any(|b| b < 0x20 || b == 0x7f), "{cmd:?}");
        }
    }
});
