//! Fuzz the header rewrite path (the `From` rewrite, then the To/Cc/Bcc rewrite Graph and EWS get): no panic, the body untouched, every field mailbridge writes one well-formed line, and no recipient outside the envelope.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailbridge::config::{BareLineEndings, NulBytes};
use mailbridge::inbound::data::{DataOutcome, DataReader};
use mailbridge::message::{fields, recipients, rewrite_from};

/// Addresses the envelope picks from (the input names them too, or not).
const POOL: [&str; 6] = [
    "ok@example.com",
    "Boss@Example.com",
    "b@example.com",
    "x@y",
    "other@outside.test",
    "a@b.test",
];

/// The message as the spool holds it: canonical CRLF, dot-unstuffed, no NUL.
fn spooled(raw: &[u8]) -> Option<Vec<u8>> {
    let input = [raw, b"\r\n.\r\n"].concat();
    let mut r = DataReader::new(1 << 20, BareLineEndings::Normalize).with_nul_bytes(NulBytes::Strip);
    let mut body = Vec::new();
    match r.feed(&input, &mut body, usize::MAX) {
        (_, Some(DataOutcome::Complete)) => Some(body),
        _ => None,
    }
}

/// The recipients Graph (and Exchange) take from the header.
fn header_recipients(msg: &[u8]) -> Vec<String> {
    let Some(m) = mail_parser::MessageParser::new().parse_headers(msg) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for list in [m.to(), m.cc(), m.bcc()].into_iter().flatten() {
        for a in list.iter() {
            if let Some(addr) = a.address() {
                out.push(addr.trim().to_ascii_lowercase());
            }
        }
    }
    out
}

/// A field mailbridge wrote: `Name: value`, folded only with CRLF + space,
/// no other control character, ends in CRLF.
fn well_formed(field: &[u8]) -> bool {
    let Some(body) = field.strip_suffix(b"\r\n") else {
        return false;
    };
    let mut i = 0;
    while i < body.len() {
        match body[i] {
            b'\r' => {
                if body.get(i + 1) != Some(&b'\n') || body.get(i + 2) != Some(&b' ') {
                    return false;
                }
                i += 3;
            }
            b'\t' => i += 1,
            c if c < 0x20 || c == 0x7f => return false,
            _ => i += 1,
        }
    }
    !body.is_empty() && (body[0] != b' ' && body[0] != b'\t')
}

fuzz_target!(|data: &[u8]| {
    // [envelope bits][name len] name [reply-to len] reply-to, message.
    if data.len() < 3 {
        return;
    }
    let bits = data[0];
    let name_len = (data[1] as usize).min(data.len() - 2);
    let name = String::from_utf8_lossy(&data[2..2 + name_len]).into_owned();
    let rest = &data[2 + name_len..];
    let (reply_to, raw) = match rest.split_first() {
        Some((&n, r)) => {
            let n = (n as usize % 40).min(r.len());
            let rt = String::from_utf8_lossy(&r[..n]).into_owned();
            (if bits & 0x80 != 0 { rt } else { String::new() }, &r[n..])
        }
        None => (String::new(), rest),
    };
    let Some(msg) = spooled(raw) else { return };
    let rcpts: Vec<String> = POOL
        .iter()
        .enumerate()
        .filter(|(i, _)| bits & (1 << i) != 0)
        .map(|(_, r)| r.to_string())
        .collect();
    if rcpts.is_empty() {
        return;
    }

    // 1. The From rewrite (scheduler), then the recipients rewrite (transport).
    let rewritten = rewrite_from(&msg, &name, &reply_to);
    let (in_fields, in_body) = fields(&msg);
    if !reply_to.is_empty() {
        let (fs, _) = fields(&rewritten);
        let first = fs.first().expect("a From was added");
        assert!(first.name == "From", "{:?}", first.name);
        let f = &rewritten[first.start..first.end];
        assert!(well_formed(f), "From: {:?}", String::from_utf8_lossy(f));
    }
    assert!(rewritten.ends_with(&msg[in_body..]), "body changed by the From rewrite");

    let p = recipients::prepare(&rewritten, &rcpts);
    let (_, body) = fields(&rewritten);
    assert!(p.message.ends_with(&rewritten[body..]), "body changed by prepare");

    // 2. Every field prepare wrote (not copied from its input) is one clean field.
    let originals: Vec<&[u8]> = {
        let (fs, _) = fields(&rewritten);
        fs.iter().map(|f| &rewritten[f.start..f.end]).collect()
    };
    let (out_fields, _) = fields(&p.message);
    for f in &out_fields {
        let bytes = &p.message[f.start..f.end];
        if !originals.contains(&bytes) {
            assert!(
                well_formed(bytes),
                "written field {:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }
    // 3. The header kept its shape: as many fields as before, minus dropped
    //    To/Cc/Bcc, plus at most one Bcc (no field appeared out of a name).
    let before = in_fields.len() + usize::from(!reply_to.is_empty());
    assert!(out_fields.len() <= before + 1, "{} fields from {}", out_fields.len(), before);

    // 4. Nobody outside the envelope is named in To/Cc/Bcc, when the input's
    //    own To/Cc fields were clean (a kept field is copied byte for byte).
    let envelope: Vec<String> = rcpts.iter().map(|r| r.to_ascii_lowercase()).collect();
    let written_only = out_fields.iter().all(|f| {
        let n = f.name.to_ascii_lowercase();
        !(n == "to" || n == "cc" || n == "bcc") || !originals.contains(&&p.message[f.start..f.end])
    });
    if written_only {
        for r in header_recipients(&p.message) {
            assert!(envelope.contains(&r), "{r} is not an envelope recipient");
        }
    }
    for m in p.to.iter().chain(&p.cc).chain(&p.bcc).chain(&p.from) {
        if let Some(n) = &m.name {
            assert!(!n.chars().any(char::is_control), "name {n:?}");
        }
    }
});
