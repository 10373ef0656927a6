//! Sans-IO DATA reader (only `CRLF.CRLF` ends a message; bare CR/LF normalised or refused; dot-unstuffing; size limit) and the header fix-ups made once a message is complete.
//!
//! The reader keeps its state between calls, byte by byte, so the result is the
//! same however the input is chunked. Rules:
//!
//! - Only `<CR><LF>.<CR><LF>` ends the data: the line `.` must start after a
//!   real CRLF (or be the first line) and end in a real CRLF. `<LF>.<LF>`,
//!   `<LF>.<CR><LF>`, `<CR>.<CR>`, `<CR><LF>.<CR><CR><LF>` and the rest of the
//!   SMTP smuggling family are message content.
//! - A bare CR or bare LF is a line ending and is stored as CRLF, so what is
//!   stored is canonical and never carries a bare CR or LF upstream. With
//!   [`BareLineEndings::Reject`] the message is read to its real end and then
//!   refused.
//! - A leading dot is removed from every line that has more than the dot
//!   (RFC 5321 §4.5.2), after a bare line ending as well, as Postfix does.
//! - Long lines (over 998 bytes) are passed through unchanged, never truncated
//!   or folded; only the total size is limited. Bytes past the limit are
//!   counted and discarded, so memory stays at most the limit.
//! - A NUL byte never ends a line or the data (`CRLF NUL . CRLF` is content),
//!   and is never stored: with [`NulBytes::Reject`] (the default) the message
//!   is read to its real end and then refused; with [`NulBytes::Strip`] every
//!   NUL is dropped. Forwarded, a NUL could let a server that drops NULs see
//!   an end of data mailbridge did not (outbound smuggling).

use crate::config::{BareLineEndings, NulBytes};

/// How a DATA transfer ended.
#[derive(Debug, PartialEq, Eq)]
pub enum DataOutcome {
    /// The message, canonical (CRLF only) and dot-unstuffed.
    Complete(Vec<u8>),
    /// More than the size limit was sent (`552 5.3.4`).
    TooBig,
    /// A bare CR or LF was sent and the policy is `Reject` (`550 5.6.11`).
    BareLineEnding,
    /// A NUL byte was sent and the NUL policy is `Reject` (`550 5.6.0`).
    NulByte,
}

/// Where the reader is within a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a line; `legit` when the previous line ended in a real
    /// CRLF (or this is the first line), i.e. a `.` line here may end the data.
    LineStart { legit: bool },
    /// Read a `.` at the start of a line.
    Dot { legit: bool },
    /// Read `.` CR at the start of a line.
    DotCr { legit: bool },
    /// Inside a line.
    Text,
    /// Read a CR that may start a CRLF.
    Cr,
}

/// A streaming DATA reader; feed it what arrives until it reports an outcome.
#[derive(Debug)]
pub struct DataReader {
    state: State,
    body: Vec<u8>,
    /// Bytes stored so far, counting those discarded past the limit.
    size: usize,
    max_size: usize,
    bare_seen: bool,
    policy: BareLineEndings,
    nul_seen: bool,
    nul: NulBytes,
}

impl DataReader {
    /// A reader for one message of at most `max_size` stored bytes; NUL
    /// bytes are refused ([`NulBytes::Reject`]) unless
    /// [`with_nul_bytes`](Self::with_nul_bytes) says otherwise.
    pub fn new(max_size: usize, policy: BareLineEndings) -> Self {
        DataReader {
            state: State::LineStart { legit: true },
            body: Vec::new(),
            size: 0,
            max_size,
            bare_seen: false,
            policy,
            nul_seen: false,
            nul: NulBytes::Reject,
        }
    }

    /// The same reader with NUL policy `nul`.
    pub fn with_nul_bytes(mut self, nul: NulBytes) -> Self {
        self.nul = nul;
        self
    }

    /// Bytes stored so far (including any discarded past the limit).
    pub fn size(&self) -> usize {
        self.size
    }

    /// Consume bytes from `input`. Returns how many were used; with an
    /// outcome, the data ended after exactly that many bytes and the rest of
    /// `input` belongs to the next command (pipelining). Without one, all of
    /// `input` was used.
    pub fn feed(&mut self, input: &[u8]) -> (usize, Option<DataOutcome>) {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            // Each arm either consumes `b` (i += 1) or changes state and lets
            // the next turn of the loop look at the same byte again.
            match self.state {
                State::Text => {
                    let run = input[i..]
                        .iter()
                        .position(|&c| c == b'\r' || c == b'\n')
                        .unwrap_or(input.len() - i);
                    if run > 0 {
                        self.store(&input[i..i + run]);
                        i += run;
                    } else {
                        if b == b'\r' {
                            self.state = State::Cr;
                        } else {
                            self.bare_line_end();
                        }
                        i += 1;
                    }
                }
                State::LineStart { legit } => {
                    match b {
                        b'.' => self.state = State::Dot { legit },
                        b'\r' => self.state = State::Cr,
                        b'\n' => self.bare_line_end(),
                        _ => {
                            self.store(&[b]);
                            self.state = State::Text;
                        }
                    }
                    i += 1;
                }
                State::Dot { legit } => match b {
                    b'\r' => {
                        self.state = State::DotCr { legit };
                        i += 1;
                    }
                    b'\n' => {
                        // A line of only "." ended by a bare LF: content.
                        self.store(b".");
                        self.bare_line_end();
                        i += 1;
                    }
                    // A stuffed dot: drop it, the rest of the line is text.
                    _ => self.state = State::Text,
                },
                State::DotCr { legit } => {
                    if b == b'\n' {
                        i += 1;
                        if legit {
                            return (i, Some(self.finish()));
                        }
                        self.store(b".\r\n");
                        self.state = State::LineStart { legit: true };
                    } else {
                        // "." then a bare CR: a line of only "." (content).
                        self.store(b".");
                        self.bare_line_end();
                    }
                }
                State::Cr => {
                    if b == b'\n' {
                        self.store(b"\r\n");
                        self.state = State::LineStart { legit: true };
                        i += 1;
                    } else {
                        self.bare_line_end();
                    }
                }
            }
        }
        (i, None)
    }

    /// A bare CR or bare LF ended a line: store CRLF; the next line cannot end the data.
    fn bare_line_end(&mut self) {
        self.bare_seen = true;
        self.store(b"\r\n");
        self.state = State::LineStart { legit: false };
    }

    fn store(&mut self, bytes: &[u8]) {
        if bytes.contains(&0) {
            self.nul_seen = true;
            let kept: Vec<u8> = bytes.iter().copied().filter(|&b| b != 0).collect();
            return self.store_clean(&kept);
        }
        self.store_clean(bytes)
    }

    /// Store bytes without NUL (counted and discarded past the limit).
    fn store_clean(&mut self, bytes: &[u8]) {
        self.size = self.size.saturating_add(bytes.len());
        if self.size > self.max_size {
            if !self.body.is_empty() {
                self.body = Vec::new();
            }
        } else {
            self.body.extend_from_slice(bytes);
        }
    }

    fn finish(&mut self) -> DataOutcome {
        if self.size > self.max_size {
            DataOutcome::TooBig
        } else if self.bare_seen && self.policy == BareLineEndings::Reject {
            DataOutcome::BareLineEnding
        } else if self.nul_seen && self.nul == NulBytes::Reject {
            DataOutcome::NulByte
        } else {
            DataOutcome::Complete(std::mem::take(&mut self.body))
        }
    }
}

/// What the header section of a complete message says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HeaderInfo {
    /// Number of `Received:` fields.
    pub received: usize,
    /// The `Message-ID:` value (unfolded, trimmed), when present.
    pub message_id: Option<String>,
    /// Whether a `Date:` field is present.
    pub has_date: bool,
    /// Byte offset just after the last header field (where fields are added).
    pub end: usize,
    /// Whether the header section ends in an empty line or at the end of the
    /// message; `false` when a line that is not a header field ends it (then a
    /// separating empty line must be added with any new field).
    pub separated: bool,
}

/// Scan the header section of a canonical (CRLF) message. It ends at the
/// first empty line, at the end of the message, or at the first line that is
/// neither a header field (`name:`) nor a continuation of one (folded: starts
/// with space or tab). Field names are case-insensitive.
pub fn scan_headers(body: &[u8]) -> HeaderInfo {
    let mut info = HeaderInfo {
        separated: true,
        ..HeaderInfo::default()
    };
    let mut pos = 0;
    // Inside a field already (so a line starting with white space continues it).
    let mut in_field = false;
    // The value of the first Message-ID field while it is being read.
    let mut message_id: Option<Vec<u8>> = None;
    let mut reading_message_id = false;
    while pos < body.len() {
        let line_end = body[pos..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map_or(body.len(), |i| pos + i);
        let line = &body[pos..line_end];
        if line.is_empty() {
            break;
        }
        if (line[0] == b' ' || line[0] == b'\t') && in_field {
            if let (true, Some(value)) = (reading_message_id, message_id.as_mut()) {
                value.extend_from_slice(line);
            }
        } else if let Some(colon) = line.iter().position(|&b| b == b':') {
            let name = trim_end_wsp(&line[..colon]);
            if name.is_empty() || !name.iter().all(|&b| (33..=126).contains(&b)) {
                info.separated = false;
                break;
            }
            in_field = true;
            reading_message_id = false;
            if name.eq_ignore_ascii_case(b"received") {
                info.received += 1;
            } else if name.eq_ignore_ascii_case(b"date") {
                info.has_date = true;
            } else if name.eq_ignore_ascii_case(b"message-id") && message_id.is_none() {
                message_id = Some(line[colon + 1..].to_vec());
                reading_message_id = true;
            }
        } else {
            info.separated = false;
            break;
        }
        pos = (line_end + 2).min(body.len());
        info.end = pos;
    }
    info.message_id = message_id.map(|v| String::from_utf8_lossy(&v).trim().to_string());
    info
}

fn trim_end_wsp(s: &[u8]) -> &[u8] {
    let n = s
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(0, |i| i + 1);
    &s[..n]
}

/// The body as queued: `received` (a whole header field, CRLF included) on
/// top, the original header fields, then `added` fields at the end of the
/// header section (and an empty line if the message had no proper
/// separation), then the rest.
pub fn assemble(body: &[u8], info: &HeaderInfo, received: &[u8], added: &[u8]) -> Vec<u8> {
    let end = info.end.min(body.len());
    let mut out = Vec::with_capacity(body.len() + received.len() + added.len() + 2);
    out.extend_from_slice(received);
    out.extend_from_slice(&body[..end]);
    out.extend_from_slice(added);
    if !info.separated {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(&body[end..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAX: usize = 1 << 20;

    /// A reader that strips NULs (most tests are about line endings and
    /// dots; the NUL policies have their own test).
    fn reader(max: usize, policy: BareLineEndings) -> DataReader {
        DataReader::new(max, policy).with_nul_bytes(NulBytes::Strip)
    }

    #[test]
    fn nul_policies() {
        // hannob/smtpsmug's `CRLF NUL . CRLF`: never an end of data, and the
        // NUL never reaches the spool.
        let input =
            b"Subject: s\r\n\r\nline\r\n\x00.\r\nMAIL FROM:<x@y>\r\nmo\x00re\r\n.\r\nQUIT\r\n";
        let used = input.len() - 6;
        let reject = DataReader::new(MAX, BareLineEndings::Normalize).feed(input);
        assert_eq!(reject, (used, Some(DataOutcome::NulByte)));
        let strip = reader(MAX, BareLineEndings::Normalize).feed(input);
        assert_eq!(
            strip,
            (
                used,
                Some(DataOutcome::Complete(
                    b"Subject: s\r\n\r\nline\r\n.\r\nMAIL FROM:<x@y>\r\nmore\r\n".to_vec()
                ))
            )
        );
        // A NUL in a stuffed-dot position or alone on a line, byte by byte.
        let input = b"\x00\r\n..\x00\r\n.\r\n";
        let mut r = DataReader::new(MAX, BareLineEndings::Normalize);
        let mut out = None;
        for (i, b) in input.iter().enumerate() {
            let (n, o) = r.feed(std::slice::from_ref(b));
            assert_eq!(n, 1);
            if o.is_some() {
                assert_eq!(i, input.len() - 1);
                out = o;
            }
        }
        assert_eq!(out, Some(DataOutcome::NulByte));
        assert_eq!(body(input), b"\r\n.\r\n");
        // No NUL: both policies accept.
        assert_eq!(
            DataReader::new(MAX, BareLineEndings::Normalize).feed(b"a\r\n.\r\n"),
            (6, Some(DataOutcome::Complete(b"a\r\n".to_vec())))
        );
    }

    /// Feed everything in one call; the outcome and the bytes used.
    fn read(input: &[u8], policy: BareLineEndings) -> (usize, Option<DataOutcome>) {
        reader(MAX, policy).feed(input)
    }

    fn body(input: &[u8]) -> Vec<u8> {
        match read(input, BareLineEndings::Normalize) {
            (_, Some(DataOutcome::Complete(b))) => b,
            other => panic!("{other:?}"),
        }
    }

    /// Feed `input` in chunks split at `cuts`; the outcome and the bytes used.
    fn read_chunked(input: &[u8], cuts: &[usize], max: usize) -> (usize, Option<DataOutcome>) {
        let mut r = reader(max, BareLineEndings::Normalize);
        let mut start = 0;
        let mut bounds: Vec<usize> = cuts.iter().map(|&c| c.min(input.len())).collect();
        bounds.sort_unstable();
        bounds.push(input.len());
        for end in bounds {
            if end < start {
                continue;
            }
            let (n, out) = r.feed(&input[start..end]);
            if out.is_some() {
                return (start + n, out);
            }
            assert_eq!(n, end - start);
            start = end;
        }
        (start, None)
    }

    fn canonical(b: &[u8]) -> bool {
        b.iter().enumerate().all(|(i, &c)| match c {
            b'\r' => b.get(i + 1) == Some(&b'\n'),
            b'\n' => i > 0 && b[i - 1] == b'\r',
            _ => true,
        })
    }

    #[test]
    fn plain_message_and_what_follows() {
        let input = b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n";
        assert_eq!(
            read(input, BareLineEndings::Normalize),
            (
                input.len() - 6,
                Some(DataOutcome::Complete(
                    b"Subject: x\r\n\r\nhello\r\n".to_vec()
                ))
            )
        );
    }

    #[test]
    fn empty_message() {
        assert_eq!(
            read(b".\r\n", BareLineEndings::Normalize),
            (3, Some(DataOutcome::Complete(Vec::new())))
        );
        assert_eq!(body(b"\r\n.\r\n"), b"\r\n");
    }

    #[test]
    fn dot_unstuffing() {
        assert_eq!(
            body(b"..\r\n...x\r\n.y\r\nz.\r\n.\r\n"),
            b".\r\n..x\r\ny\r\nz.\r\n"
        );
        // After a bare line ending too (the ending is normalised).
        assert_eq!(body(b"a\n..b\r\n.\r\n"), b"a\r\n.b\r\n");
        // A lone dot that does not end the data is kept.
        assert_eq!(body(b"a\n.\r\n.\r\n"), b"a\r\n.\r\n");
    }

    #[test]
    fn bare_endings_are_normalised() {
        assert_eq!(
            body(b"a\nb\rc\r\r\nd\n\r\n.\r\n"),
            b"a\r\nb\r\nc\r\n\r\nd\r\n\r\n"
        );
        assert_eq!(body(b"x\r\n.\rMAIL\r\n.\r\n"), b"x\r\n.\r\nMAIL\r\n");
        assert_eq!(body(b"x\r\n.\r\r\n.\r\n"), b"x\r\n.\r\n\r\n");
    }

    #[test]
    fn reject_policy_reads_to_the_real_end() {
        let input = b"a\nb\r\n.\r\nNOOP\r\n";
        assert_eq!(
            read(input, BareLineEndings::Reject),
            (input.len() - 6, Some(DataOutcome::BareLineEnding))
        );
        assert_eq!(
            read(b"a\r\n.\r\n", BareLineEndings::Reject),
            (6, Some(DataOutcome::Complete(b"a\r\n".to_vec())))
        );
    }

    #[test]
    fn long_lines_pass_unchanged() {
        let line = vec![b'x'; 5000];
        let input = [&line[..], b"\r\n.\r\n"].concat();
        assert_eq!(body(&input), [&line[..], b"\r\n"].concat());
    }

    #[test]
    fn size_counts_stored_bytes() {
        // "..\r\n" stores 3 bytes; exactly the limit is fine, one more is not.
        let mut r = reader(3, BareLineEndings::Normalize);
        assert_eq!(
            r.feed(b"..\r\n.\r\n"),
            (7, Some(DataOutcome::Complete(b".\r\n".to_vec())))
        );
        let mut r = reader(3, BareLineEndings::Normalize);
        assert_eq!(r.feed(b"ab\r\n.\r\n"), (7, Some(DataOutcome::TooBig)));
        // Past the limit the reader keeps consuming to the end, storing nothing.
        let mut r = reader(10, BareLineEndings::Normalize);
        for _ in 0..1000 {
            assert_eq!(r.feed(&[b'y'; 1000]), (1000, None));
        }
        assert!(r.body.capacity() <= 10, "{}", r.body.capacity());
        assert_eq!(r.size(), 1_000_000);
        assert_eq!(r.feed(b"\r\n.\r\nRSET\r\n"), (5, Some(DataOutcome::TooBig)));
    }

    #[test]
    fn every_single_split_gives_the_same_result() {
        let input = b"Subject: a\r\n\r\n..x\n.\r\r\n\r.\rz\r\n..\r\n\0.\r\nend\r\n.\r\nNEXT";
        let whole = read(input, BareLineEndings::Normalize);
        for cut in 0..=input.len() {
            assert_eq!(read_chunked(input, &[cut], MAX), whole, "cut at {cut}");
        }
        for a in 0..=input.len() {
            for b in a..=input.len() {
                assert_eq!(read_chunked(input, &[a, b], MAX), whole, "cuts at {a},{b}");
            }
        }
        // And byte by byte.
        let all: Vec<usize> = (0..=input.len()).collect();
        assert_eq!(read_chunked(input, &all, MAX), whole);
    }

    /// Every sequence of 1..=5 bytes over {CR, LF, '.', NUL, 'x'} between a
    /// line of text and a smuggled command: the data ends before the command
    /// only when the bytes contain a literal CRLF "." CRLF at a real line
    /// start, and nothing stored ever has a bare CR or LF.
    #[test]
    fn smuggling_family() {
        const ALPHABET: [u8; 5] = [b'\r', b'\n', b'.', 0, b'x'];
        const PAYLOAD: &[u8] = b"MAIL FROM:<evil@x>\r\n";
        const TAIL: &[u8] = b"tail\r\n.\r\n";
        let mut seqs: Vec<Vec<u8>> = vec![];
        let mut frontier: Vec<Vec<u8>> = vec![vec![]];
        for _ in 1..=5 {
            frontier = frontier
                .iter()
                .flat_map(|s| ALPHABET.iter().map(move |&c| [s.as_slice(), &[c]].concat()))
                .collect();
            seqs.extend(frontier.iter().cloned());
        }
        assert_eq!(seqs.len(), 5 + 25 + 125 + 625 + 3125);
        let mut ended_early = vec![];
        for prefix in [&b"a line of text"[..], b"a line of text\r\n"] {
            for seq in &seqs {
                let input = [prefix, seq, PAYLOAD, TAIL].concat();
                // The oracle: the first CRLF.CRLF, the start of data counting as a CRLF.
                let with_start = [b"\r\n", &input[..]].concat();
                let oracle = with_start
                    .windows(5)
                    .position(|w| w == b"\r\n.\r\n")
                    .map(|p| p + 5 - 2);
                for policy in [BareLineEndings::Normalize, BareLineEndings::Reject] {
                    let (used, out) = read(&input, policy);
                    assert_eq!(Some(used), oracle, "{input:?} {policy:?}");
                    let Some(out) = out else {
                        panic!("no end: {input:?}")
                    };
                    if let DataOutcome::Complete(stored) = &out {
                        assert!(
                            canonical(stored),
                            "bare CR/LF stored from {input:?}: {stored:?}"
                        );
                    }
                    if policy == BareLineEndings::Normalize {
                        let DataOutcome::Complete(stored) = out else {
                            panic!("{input:?}: {out:?}")
                        };
                        assert!(
                            canonical(&stored),
                            "bare CR/LF stored from {input:?}: {stored:?}"
                        );
                        let early = used <= prefix.len() + seq.len();
                        if early {
                            ended_early.push((prefix.len(), seq.clone()));
                        } else {
                            assert_eq!(used, input.len(), "{input:?}");
                            assert!(
                                stored.windows(PAYLOAD.len()).any(|w| w == PAYLOAD),
                                "{input:?}"
                            );
                        }
                    }
                }
            }
        }
        // Computed from the rule, not listed: after a line without an ending,
        // only the sequence CRLF "." CRLF itself; after a CRLF, exactly the
        // sequences that begin with "." CRLF or contain CRLF "." CRLF.
        let expected: Vec<(usize, Vec<u8>)> = [&b"a line of text"[..], b"a line of text\r\n"]
            .iter()
            .flat_map(|p| {
                seqs.iter()
                    .filter(move |s| {
                        let joined = [&p[p.len().saturating_sub(2)..], s.as_slice()].concat();
                        joined.windows(5).any(|w| w == b"\r\n.\r\n")
                    })
                    .map(move |s| (p.len(), s.clone()))
            })
            .collect();
        assert_eq!(ended_early, expected);
        assert!(ended_early.contains(&(14, b"\r\n.\r\n".to_vec())));
        assert!(ended_early.iter().filter(|(p, _)| *p == 14).count() == 1);
        assert!(ended_early.contains(&(16, b".\r\n".to_vec())));
        assert!(!ended_early.contains(&(14, b"\n.\n".to_vec())));
        assert!(!ended_early.contains(&(16, b"\0.\r\n".to_vec())));
    }

    proptest! {
        #[test]
        fn chunking_never_changes_the_result(
            input in proptest::collection::vec(prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'.'), Just(0u8), Just(b'x'), any::<u8>()], 0..200),
            cuts in proptest::collection::vec(0usize..220, 0..8),
            max in 1usize..300,
        ) {
            let input = [&input[..], b"\r\n.\r\nQUIT\r\n"].concat();
            let whole = reader(max, BareLineEndings::Normalize).feed(&input);
            prop_assert_eq!(read_chunked(&input, &cuts, max), whole);
        }

        #[test]
        fn stored_output_is_always_canonical(input in proptest::collection::vec(any::<u8>(), 0..300)) {
            let input = [&input[..], b"\r\n.\r\n"].concat();
            if let (_, Some(DataOutcome::Complete(stored))) = read(&input, BareLineEndings::Normalize) {
                prop_assert!(canonical(&stored));
            }
        }
    }

    #[test]
    fn header_scan() {
        let msg = b"Received: a\r\nreceived : b\r\n\tfolded\r\nMessage-ID:\r\n <x@y>\r\nDATE: now\r\n\r\nReceived: body\r\n";
        let info = scan_headers(msg);
        assert_eq!(info.received, 2);
        assert_eq!(info.message_id.as_deref(), Some("<x@y>"));
        assert!(info.has_date);
        assert!(info.separated);
        assert_eq!(&msg[info.end..], b"\r\nReceived: body\r\n");

        let info = scan_headers(b"hello world\r\n");
        assert_eq!((info.end, info.separated, info.received), (0, false, 0));
        let info = scan_headers(b"Subject: x\r\nnot a header\r\n");
        assert_eq!((info.end, info.separated), (12, false));
        let info = scan_headers(b"Subject: x\r\n");
        assert_eq!(
            (info.end, info.separated, info.has_date, info.message_id),
            (12, true, false, None)
        );
        let info = scan_headers(b"");
        assert_eq!((info.end, info.separated), (0, true));
        // A continuation line before any field is not a header.
        assert!(!scan_headers(b" x: y\r\n").separated);
    }

    #[test]
    fn assemble_places_fields() {
        let msg = b"Subject: x\r\n\r\nbody\r\n";
        let out = assemble(msg, &scan_headers(msg), b"Received: r\r\n", b"Date: d\r\n");
        assert_eq!(out, b"Received: r\r\nSubject: x\r\nDate: d\r\n\r\nbody\r\n");
        let msg = b"just text\r\n";
        let out = assemble(msg, &scan_headers(msg), b"Received: r\r\n", b"Date: d\r\n");
        assert_eq!(out, b"Received: r\r\nDate: d\r\n\r\njust text\r\n");
    }
}
