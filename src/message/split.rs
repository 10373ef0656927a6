//! Sans-IO MIME splitter for Graph's upload path: takes the large base64 parts of a top-level multipart message out, leaving a small skeleton to parse and, per part taken out, the byte range of its base64 body to decode from the spool file chunk by chunk.
//!
//! Only the parts directly under the top-level `multipart/*` boundary are
//! looked at; a part is taken out when its transfer encoding is `base64`,
//! it is an attachment (`Content-Disposition: attachment`, or a type other
//! than text, message and multipart) and its body passes the threshold
//! given to [`Splitter::new`]. In the skeleton
//! its body becomes one base64 line of a marker ([`Splitter::marker`]), so
//! a MIME parser still sees the part, its headers and a tiny content that
//! says which range it stands for. Everything else (nested multiparts,
//! other encodings, messages that are not multipart) stays in the skeleton
//! as it is. Memory: the skeleton, one line of at most [`LINE_CAP`] bytes,
//! one part header of at most [`HEADER_CAP`] bytes, and up to the threshold
//! of a part body while it is undecided.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

/// Longest line collected whole; a longer line cannot be a boundary or an
/// empty line and goes through in pieces.
pub const LINE_CAP: usize = 1024;
/// Longest header block kept for its `Content-Type` and
/// `Content-Transfer-Encoding`; past it the part is left in the skeleton.
pub const HEADER_CAP: usize = 64 * 1024;

/// One base64 part body taken out of the skeleton.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extracted {
    /// Offset of its first base64 line in the message.
    pub start: u64,
    /// Offset just past its last line (before the boundary).
    pub end: u64,
    /// Bytes it decodes to ([`decoded_len`] of its base64 characters).
    pub decoded_len: u64,
}

/// Bytes that `chars` base64 alphabet characters decode to (padding and
/// other characters are ignored, a stray last character is dropped).
pub fn decoded_len(chars: u64) -> u64 {
    chars * 3 / 4
}

fn is_b64(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'+' || b == b'/'
}

#[derive(Debug)]
enum State {
    /// The message's own header; its fields are kept (capped).
    TopHeader { fields: Vec<u8>, overflow: bool },
    /// Before the first boundary.
    Preamble,
    /// A part's header; its fields are kept (capped).
    PartHeader { fields: Vec<u8>, overflow: bool },
    /// A part's body: held while undecided, or being taken out.
    PartBody {
        base64: bool,
        held: Vec<u8>,
        held_start: u64,
        out: Option<(Extracted, u64)>,
    },
    /// After the closing boundary, or a message that is not multipart.
    Rest,
}

/// Splits a message fed in chunks of any size (see the module docs).
#[derive(Debug)]
pub struct Splitter {
    skeleton: Vec<u8>,
    parts: Vec<Extracted>,
    nonce: String,
    threshold: usize,
    state: State,
    /// `--` + the top-level boundary, once known.
    delimiter: Option<Vec<u8>>,
    /// The line being collected and its offset.
    line: Vec<u8>,
    line_at: u64,
    /// The current line passed [`LINE_CAP`]: its pieces go through as they come.
    long: bool,
    /// Bytes fed so far.
    offset: u64,
}

impl Splitter {
    /// A splitter that takes out base64 part bodies longer than `threshold`
    /// bytes; `nonce` makes its markers unguessable by the message's author.
    pub fn new(nonce: &str, threshold: usize) -> Splitter {
        Splitter {
            skeleton: Vec::new(),
            parts: Vec::new(),
            nonce: nonce.to_string(),
            threshold,
            state: State::TopHeader {
                fields: Vec::new(),
                overflow: false,
            },
            delimiter: None,
            line: Vec::new(),
            line_at: 0,
            long: false,
            offset: 0,
        }
    }

    /// The content a MIME parser finds for taken-out part `index`.
    pub fn marker(nonce: &str, index: usize) -> Vec<u8> {
        format!("\0mailbridge-part {nonce} {index}\0").into_bytes()
    }

    /// The line that stands in the skeleton for the body of taken-out
    /// part `index`: its marker in base64, CRLF.
    pub fn marker_line(nonce: &str, index: usize) -> Vec<u8> {
        let mut line = B64.encode(Splitter::marker(nonce, index)).into_bytes();
        line.extend_from_slice(b"\r\n");
        line
    }

    /// Which taken-out part `content` stands for, if it is a marker.
    pub fn marked(nonce: &str, content: &[u8]) -> Option<usize> {
        let text = std::str::from_utf8(content).ok()?;
        let rest = text
            .strip_prefix("\0mailbridge-part ")?
            .strip_suffix('\0')?;
        let (n, index) = rest.rsplit_once(' ')?;
        (n == nonce).then(|| index.parse().ok())?
    }

    /// Feed the next bytes of the message.
    pub fn push(&mut self, mut input: &[u8]) {
        while !input.is_empty() {
            if self.line.is_empty() {
                self.line_at = self.offset;
            }
            let room = LINE_CAP - self.line.len();
            let take = match input.iter().take(room).position(|&b| b == b'\n') {
                Some(i) => i + 1,
                None => input.len().min(room),
            };
            self.line.extend_from_slice(&input[..take]);
            self.offset += take as u64;
            input = &input[take..];
            let complete = self.line.ends_with(b"\n");
            if complete || self.line.len() >= LINE_CAP {
                let line = std::mem::take(&mut self.line);
                let whole = complete && !self.long;
                self.long = !complete;
                self.on_line(&line, whole);
                self.line = line;
                self.line.clear();
            }
        }
    }

    /// The end of the message: the skeleton and the parts taken out, in order.
    pub fn finish(mut self) -> (Vec<u8>, Vec<Extracted>) {
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            let whole = !self.long;
            self.on_line(&line, whole);
        }
        // A message cut before its closing boundary: close the last part.
        if matches!(self.state, State::PartBody { .. }) {
            self.end_part();
        }
        (self.skeleton, self.parts)
    }

    /// How a `whole` line (not a piece of a long one) relates to the boundary:
    /// `Some(true)` closing, `Some(false)` a part begins.
    fn boundary(&self, line: &[u8], whole: bool) -> Option<bool> {
        let d = self.delimiter.as_deref()?;
        if !whole {
            return None;
        }
        let rest = line.strip_prefix(d)?;
        let (closing, rest) = match rest.strip_prefix(b"--") {
            Some(r) => (true, r),
            None => (false, rest),
        };
        rest.iter()
            .all(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
            .then_some(closing)
    }

    fn on_line(&mut self, line: &[u8], whole: bool) {
        let empty = whole && matches!(line, b"\r\n" | b"\n");
        if let Some(closing) = self.boundary(line, whole)
            && !matches!(self.state, State::TopHeader { .. } | State::Rest)
        {
            if matches!(self.state, State::PartBody { .. }) {
                self.end_part();
            }
            self.skeleton.extend_from_slice(line);
            self.state = if closing {
                State::Rest
            } else {
                State::PartHeader {
                    fields: Vec::new(),
                    overflow: false,
                }
            };
            return;
        }
        match &mut self.state {
            State::TopHeader { fields, overflow } | State::PartHeader { fields, overflow } => {
                self.skeleton.extend_from_slice(line);
                if !empty {
                    if fields.len() + line.len() <= HEADER_CAP {
                        fields.extend_from_slice(line);
                    } else {
                        *overflow = true;
                    }
                    return;
                }
                let (fields, overflow) = (std::mem::take(fields), *overflow);
                if matches!(self.state, State::TopHeader { .. }) {
                    self.delimiter = if overflow {
                        None
                    } else {
                        multipart_boundary(&fields).map(|b| [&b"--"[..], &b].concat())
                    };
                    self.state = if self.delimiter.is_some() {
                        State::Preamble
                    } else {
                        State::Rest
                    };
                } else {
                    self.state = State::PartBody {
                        base64: !overflow && is_base64(&fields) && attachment_like(&fields),
                        held: Vec::new(),
                        held_start: self.offset,
                        out: None,
                    };
                }
            }
            State::Preamble | State::Rest => self.skeleton.extend_from_slice(line),
            State::PartBody {
                base64,
                held,
                held_start,
                out,
            } => {
                if !*base64 {
                    self.skeleton.extend_from_slice(line);
                    return;
                }
                let chars = line.iter().filter(|b| is_b64(**b)).count() as u64;
                let end = self.line_at + line.len() as u64;
                if let Some((part, count)) = out {
                    *count += chars;
                    part.end = end;
                    return;
                }
                held.extend_from_slice(line);
                if held.len() > self.threshold {
                    let count = held.iter().filter(|b| is_b64(**b)).count() as u64;
                    let part = Extracted {
                        start: *held_start,
                        end,
                        decoded_len: 0,
                    };
                    *held = Vec::new();
                    *out = Some((part, count));
                }
            }
        }
    }

    /// The current part ends: its held body, or its marker, goes to the skeleton.
    fn end_part(&mut self) {
        let State::PartBody { held, out, .. } = std::mem::replace(&mut self.state, State::Rest)
        else {
            return;
        };
        match out {
            Some((mut part, chars)) => {
                part.decoded_len = decoded_len(chars);
                let line = Splitter::marker_line(&self.nonce, self.parts.len());
                self.skeleton.extend_from_slice(&line);
                self.parts.push(part);
            }
            None => self.skeleton.extend_from_slice(&held),
        }
    }
}

/// The header fields of `fields` (one header block, folded lines joined),
/// as (lower-case name, value).
fn unfolded(fields: &[u8]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let text = String::from_utf8_lossy(fields);
    for line in text.split('\n') {
        let line = line.trim_end_matches('\r');
        if line.starts_with([' ', '\t']) {
            if let Some((_, v)) = out.last_mut() {
                v.push(' ');
                v.push_str(line.trim());
            }
        } else if let Some((name, value)) = line.split_once(':') {
            out.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }
    out
}

/// The `boundary` parameter of a `multipart/*` `Content-Type`, if any.
fn multipart_boundary(fields: &[u8]) -> Option<Vec<u8>> {
    let fields = unfolded(fields);
    let (_, ct) = fields.iter().find(|(n, _)| n == "content-type")?;
    let mut params = ct.split(';');
    let kind = params.next()?.trim().to_ascii_lowercase();
    if !kind.starts_with("multipart/") {
        return None;
    }
    for p in params {
        let Some((name, value)) = p.split_once('=') else {
            continue;
        };
        if name.trim().eq_ignore_ascii_case("boundary") {
            let value = value.trim();
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(value);
            // RFC 2046 §5.1.1: 1 to 70 characters.
            if value.is_empty() || value.len() > 70 {
                return None;
            }
            return Some(value.as_bytes().to_vec());
        }
    }
    None
}

/// Whether a MIME parser reads the part as an attachment rather than as
/// the message's text: `Content-Disposition: attachment`, or a type that is
/// not text (no `Content-Type` is `text/plain`), a message or a multipart.
fn attachment_like(fields: &[u8]) -> bool {
    let fields = unfolded(fields);
    let value = |name: &str| {
        fields.iter().find(|(n, _)| n == name).map(|(_, v)| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
    };
    if value("content-disposition").as_deref() == Some("attachment") {
        return true;
    }
    match value("content-type") {
        None => false,
        Some(t) => !["text/", "message/", "multipart/"]
            .iter()
            .any(|p| t.starts_with(p)),
    }
}

/// Whether a part header says `Content-Transfer-Encoding: base64`.
fn is_base64(fields: &[u8]) -> bool {
    unfolded(fields)
        .iter()
        .any(|(n, v)| n == "content-transfer-encoding" && v.eq_ignore_ascii_case("base64"))
}

/// Sans-IO streaming base64 decoder: any chunking, characters outside the
/// alphabet skipped, as [`decoded_len`] counts.
#[derive(Debug, Default)]
pub struct Decoder {
    quad: [u8; 4],
    n: usize,
}

impl Decoder {
    /// Decode the next piece, appending to `out`.
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        for &b in input {
            let v = match b {
                b'A'..=b'Z' => b - b'A',
                b'a'..=b'z' => b - b'a' + 26,
                b'0'..=b'9' => b - b'0' + 52,
                b'+' => 62,
                b'/' => 63,
                _ => continue,
            };
            self.quad[self.n] = v;
            self.n += 1;
            if self.n == 4 {
                let q = self.quad;
                out.push((q[0] << 2) | (q[1] >> 4));
                out.push((q[1] << 4) | (q[2] >> 2));
                out.push((q[2] << 6) | q[3]);
                self.n = 0;
            }
        }
    }

    /// The end: the bytes of a last group of two or three characters.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        let q = self.quad;
        if self.n >= 2 {
            out.push((q[0] << 2) | (q[1] >> 4));
        }
        if self.n == 3 {
            out.push((q[1] << 4) | (q[2] >> 2));
        }
        self.n = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(msg: &[u8], chunk: usize, threshold: usize) -> (Vec<u8>, Vec<Extracted>) {
        let mut s = Splitter::new("n1", threshold);
        for piece in msg.chunks(chunk.max(1)) {
            s.push(piece);
        }
        s.finish()
    }

    fn decode(b: &[u8]) -> Vec<u8> {
        let mut d = Decoder::default();
        let mut out = Vec::new();
        d.push(b, &mut out);
        d.finish(&mut out);
        out
    }

    fn message(attachment: &[u8]) -> Vec<u8> {
        let mut b64 = String::new();
        for line in B64.encode(attachment).as_bytes().chunks(76) {
            b64.push_str(std::str::from_utf8(line).unwrap());
            b64.push_str("\r\n");
        }
        format!(
            "From: a@b\r\nContent-Type: multipart/mixed;\r\n boundary=\"XX\"\r\n\r\npre\r\n--XX\r\nContent-Type: text/plain\r\n\r\nhello\r\n--XX\r\nContent-Type: application/pdf; name=r.pdf\r\nContent-Transfer-Encoding: BASE64\r\n\r\n{b64}--XX--\r\nafter\r\n"
        )
        .into_bytes()
    }

    #[test]
    fn a_large_base64_part_is_taken_out_and_marked() {
        let att: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let msg = message(&att);
        for chunk in [1, 7, 100, 5000, msg.len()] {
            let (skel, parts) = split(&msg, chunk, 1000);
            assert_eq!(parts.len(), 1, "chunk {chunk}");
            let p = parts[0];
            assert_eq!(p.decoded_len, att.len() as u64);
            assert_eq!(decode(&msg[p.start as usize..p.end as usize]), att);
            let parsed = mail_parser::MessageParser::new().parse(&skel).unwrap();
            let a = parsed.attachments().next().unwrap();
            assert_eq!(Splitter::marked("n1", a.contents()), Some(0));
            assert_eq!(Splitter::marked("n2", a.contents()), None);
            assert_eq!(parsed.body_text(0).unwrap().trim(), "hello");
            assert!(skel.len() < 600, "{}", skel.len());
        }
    }

    #[test]
    fn text_parts_stay_whatever_their_size() {
        let big = B64.encode(vec![b'a'; 5000]);
        let msg = format!(
            "Content-Type: multipart/alternative; boundary=XX\r\n\r\n--XX\r\nContent-Type: text/html\r\nContent-Transfer-Encoding: base64\r\n\r\n{big}\r\n--XX\r\nContent-Transfer-Encoding: base64\r\n\r\n{big}\r\n--XX\r\nContent-Type: text/plain\r\nContent-Disposition: attachment\r\nContent-Transfer-Encoding: base64\r\n\r\n{big}\r\n--XX--\r\n"
        );
        let (skel, parts) = split(msg.as_bytes(), 100, 1000);
        assert_eq!(parts.len(), 1, "only the attachment");
        assert!(skel.len() < msg.len() - 5000);
    }

    #[test]
    fn small_parts_and_other_messages_stay_as_they_are() {
        let msg = message(b"tiny");
        let (skel, parts) = split(&msg, 3, 1000);
        assert_eq!((skel, parts.len()), (msg, 0));
        let plain = b"Subject: x\r\n\r\n--XX\r\nContent-Transfer-Encoding: base64\r\n\r\nQUJD\r\n"
            .repeat(50);
        let (skel, parts) = split(&plain, 9, 10);
        assert_eq!((skel, parts.len()), (plain, 0));
    }

    /// What the `mime_split` fuzz target checks, on generated multiparts.
    fn check(msg: &[u8], step: usize, threshold: usize) {
        let (skeleton, parts) = split(msg, step, threshold);
        assert_eq!(
            split(msg, msg.len(), threshold),
            (skeleton.clone(), parts.clone())
        );
        let mut rebuilt = Vec::new();
        let mut at = 0usize;
        for (i, p) in parts.iter().enumerate() {
            let (start, end) = (p.start as usize, p.end as usize);
            assert!(at <= start && start <= end && end <= msg.len(), "{parts:?}");
            rebuilt.extend_from_slice(&msg[at..start]);
            rebuilt.extend_from_slice(&Splitter::marker_line("n1", i));
            at = end;
            assert_eq!(decode(&msg[start..end]).len() as u64, p.decoded_len);
        }
        rebuilt.extend_from_slice(&msg[at..]);
        assert_eq!(rebuilt, skeleton);
    }

    proptest::proptest! {
        #[test]
        fn splitting_is_chunking_blind_and_only_replaces_ranges(
            pieces in proptest::collection::vec(proptest::prop_oneof![
                proptest::strategy::Just(&b"--XX\r\n"[..]),
                proptest::strategy::Just(&b"--XX--\r\n"[..]),
                proptest::strategy::Just(&b"Content-Transfer-Encoding: base64\r\n"[..]),
                proptest::strategy::Just(&b"Content-Type: image/png\r\n"[..]),
                proptest::strategy::Just(&b"\r\n"[..]),
                proptest::strategy::Just(&b"QUJDREVGR0hJSktM\r\n"[..]),
                proptest::strategy::Just(&b"QUJD=x\n"[..]),
                proptest::strategy::Just(&b"text \r"[..]),
            ], 0..60),
            step in 1usize..40,
            threshold in 0usize..100,
        ) {
            let mut msg = b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n".to_vec();
            for p in pieces {
                msg.extend_from_slice(p);
            }
            check(&msg, step, threshold);
        }
    }

    #[test]
    fn the_streaming_decoder_matches_the_whole_one() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 31 + 5) as u8).collect();
        for n in [0, 1, 2, 3, 4, 999, 1000] {
            let enc = B64.encode(&data[..n]);
            let wrapped: Vec<u8> = enc
                .as_bytes()
                .chunks(7)
                .flat_map(|c| [c, b"\r\n"].concat())
                .collect();
            let mut d = Decoder::default();
            let mut out = Vec::new();
            for piece in wrapped.chunks(5) {
                d.push(piece, &mut out);
            }
            d.finish(&mut out);
            assert_eq!(out, &data[..n]);
            let chars = enc.bytes().filter(|b| is_b64(*b)).count() as u64;
            assert_eq!(decoded_len(chars), n as u64);
        }
    }
}
