//! Shared helpers for integration tests: in-process fakes of the upstreams (`mod common;` from a test file).

// Each test file compiles this module on its own and uses only part of it.
#![allow(dead_code)]

pub mod fake_ews;
pub mod fake_graph;
pub mod fake_oauth;
pub mod fake_smtp;

/// The address in a message's first `From:` header (`<...>` if there is one),
/// lower-case; what the strict send-as modes of the fakes compare.
pub fn header_from(message: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(message);
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    let mut value: Option<String> = None;
    for line in head.split("\r\n") {
        if let Some(v) = value.as_mut() {
            if line.starts_with([' ', '\t']) {
                v.push_str(line);
                continue;
            }
            break;
        }
        if line.len() > 5 && line[..5].eq_ignore_ascii_case("from:") {
            value = Some(line[5..].to_string());
        }
    }
    let v = value?;
    let addr = match (v.rfind('<'), v.rfind('>')) {
        (Some(a), Some(b)) if a < b => &v[a + 1..b],
        _ => v.trim(),
    };
    Some(addr.trim().to_ascii_lowercase())
}
pub mod real;
pub mod redis;
