//! Sans-IO DATA reader (only `CRLF.CRLF` ends a message; bare CR/LF normalised or refused; dot-unstuffing; size limit) and the streaming scan of the header section, both working on bounded buffers whatever the message size.
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
//!   counted and discarded.
//! - The reader writes what it stores into the caller's buffer and stops
//!   when that buffer holds `room` bytes: the caller empties it (to the
//!   spool file) and feeds the rest, so memory never depends on the
//!   message size.
//! - A NUL byte never ends a line or the data (`CRLF NUL . CRLF` is content),
//!   and is never stored: with [`NulBytes::Reject`] (the default) the message
//!   is read to its real end and then refused; with [`NulBytes::Strip`] every
//!   NUL is dropped. Forwarded, a NUL could let a server that drops NULs see
//!   an end of data mailbridge did not (outbound smuggling).

use crate::config::{BareLineEndings, NulBytes};

/// How a DATA transfer ended.
#[derive(Debug, PartialEq, Eq)]
pub enum DataOutcome {
    /// The message is complete; everything stored went to the caller's
    /// buffer, canonical (CRLF only) and dot-unstuffed.
    Complete,
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

    /// Whether more than the size limit was stored (the message will be
    /// refused; nothing more goes to the buffer).
    pub fn over_limit(&self) -> bool {
        self.size > self.max_size
    }

    /// Consume bytes from `input`, appending what is stored to `out` until
    /// `out` holds at least `room` bytes (it may pass `room` by at most 3).
    /// Returns how many bytes were used; with an outcome, the data ended after
    /// exactly that many and the rest of `input` belongs to the next command
    /// (pipelining). Without one, either all of `input` was used or `out` is
    /// full: empty it and feed the rest.
    pub fn feed(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        room: usize,
    ) -> (usize, Option<DataOutcome>) {
        let mut i = 0;
        while i < input.len() && out.len() < room {
            let b = input[i];
            // Each arm either consumes `b` (i += 1) or changes state and lets
            // the next turn of the loop look at the same byte again.
            match self.state {
                State::Text => {
                    let free = room - out.len();
                    let run = input[i..]
                        .iter()
                        .take(free)
                        .position(|&c| c == b'\r' || c == b'\n')
                        .unwrap_or((input.len() - i).min(free));
                    if run > 0 {
                        self.store(out, &input[i..i + run]);
                        i += run;
                    } else {
                        if b == b'\r' {
                            self.state = State::Cr;
                        } else {
                            self.bare_line_end(out);
                        }
                        i += 1;
                    }
                }
                State::LineStart { legit } => {
                    match b {
                        b'.' => self.state = State::Dot { legit },
                        b'\r' => self.state = State::Cr,
                        b'\n' => self.bare_line_end(out),
                        _ => {
                            self.store(out, &[b]);
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
                        self.store(out, b".");
                        self.bare_line_end(out);
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
                        self.store(out, b".\r\n");
                        self.state = State::LineStart { legit: true };
                    } else {
                        // "." then a bare CR: a line of only "." (content).
                        self.store(out, b".");
                        self.bare_line_end(out);
                    }
                }
                State::Cr => {
                    if b == b'\n' {
                        self.store(out, b"\r\n");
                        self.state = State::LineStart { legit: true };
                        i += 1;
                    } else {
                        self.bare_line_end(out);
                    }
                }
            }
        }
        (i, None)
    }

    /// A bare CR or bare LF ended a line: store CRLF; the next line cannot end the data.
    fn bare_line_end(&mut self, out: &mut Vec<u8>) {
        self.bare_seen = true;
        self.store(out, b"\r\n");
        self.state = State::LineStart { legit: false };
    }

    fn store(&mut self, out: &mut Vec<u8>, bytes: &[u8]) {
        if bytes.contains(&0) {
            self.nul_seen = true;
            let kept: Vec<u8> = bytes.iter().copied().filter(|&b| b != 0).collect();
            return self.store_clean(out, &kept);
        }
        self.store_clean(out, bytes)
    }

    /// Store bytes without NUL (counted and discarded past the limit).
    fn store_clean(&mut self, out: &mut Vec<u8>, bytes: &[u8]) {
        self.size = self.size.saturating_add(bytes.len());
        if self.size <= self.max_size {
            out.extend_from_slice(bytes);
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
            DataOutcome::Complete
        }
    }
}

/// How much of a `From:` field the scan keeps (for `listen.bind_sender`).
pub const MAX_FROM: usize = 16 * 1024;
/// How much of a `Message-ID:` value the scan keeps.
const MAX_MESSAGE_ID: usize = 998;

/// What the header section of a message says, learnt as it streams.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HeaderInfo {
    /// Number of `Received:` fields.
    pub received: usize,
    /// The first `Message-ID:` value (unfolded, trimmed), when present.
    pub message_id: Option<String>,
    /// Whether a `Date:` field is present.
    pub has_date: bool,
    /// Number of `From:` fields.
    pub froms: usize,
    /// The first `From:` field as written (folding kept, CRLF at the end),
    /// unless it is longer than [`MAX_FROM`] (then `from_too_long`).
    pub from: Vec<u8>,
    /// The first `From:` field was longer than [`MAX_FROM`].
    pub from_too_long: bool,
}

/// Where the header section ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderEnd {
    /// Offset in the stored stream where fields can be added: the start of
    /// the line that ended the section, or the end of the message.
    pub at: u64,
    /// Whether the section ended in an empty line or at the end of the
    /// message; `false` when a line that is not a header field ended it
    /// (then a separating empty line must be added with any new field).
    pub separated: bool,
}

/// Which field the scan is inside, for what it keeps of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keep {
    Nothing,
    MessageId,
    From,
}

/// The streaming scan of the header section (the rule is
/// [`crate::message::headers`]'s): it sees the stored bytes in order, in
/// any chunking, and holds at most one field name and the kept values.
#[derive(Debug, Default)]
pub struct HeaderScan {
    info: HeaderInfo,
    cls: crate::message::headers::LineClassifier,
    /// Offset of the next byte.
    pos: u64,
    /// Offset where the current line started.
    line_start: u64,
    /// The current line's kind is known (then the rest up to LF follows).
    decided: bool,
    any_field: bool,
    keep: Option<Keep>,
    message_id: Option<Vec<u8>>,
    end: Option<HeaderEnd>,
}

impl HeaderScan {
    /// A scan at the start of a message.
    pub fn new() -> Self {
        HeaderScan::default()
    }

    /// Where the header section ended, once it has.
    pub fn end(&self) -> Option<HeaderEnd> {
        self.end
    }

    /// Offset of the first byte the scan may still need to place fields
    /// before: the start of an undecided line (at most
    /// [`crate::message::headers::MAX_NAME`] + 1 bytes back). Bytes before it
    /// can be written out; `None` when every byte can.
    pub fn hold(&self) -> Option<u64> {
        match self.end {
            None if !self.decided => Some(self.line_start),
            _ => None,
        }
    }

    /// The next stored bytes. Returns where the section ended if it ended
    /// within them (later bytes are not looked at).
    pub fn push(&mut self, bytes: &[u8]) -> Option<HeaderEnd> {
        if self.end.is_some() {
            self.pos += bytes.len() as u64;
            return None;
        }
        use crate::message::headers::LineKind;
        for (i, &b) in bytes.iter().enumerate() {
            if !self.decided {
                if let Some(kind) = self.cls.push(b) {
                    self.decided = true;
                    let kind = if kind == LineKind::Continuation && !self.any_field {
                        LineKind::NotHeader
                    } else {
                        kind
                    };
                    match kind {
                        LineKind::Empty | LineKind::NotHeader => {
                            let end = HeaderEnd {
                                at: self.line_start,
                                separated: kind == LineKind::Empty,
                            };
                            self.finish_values();
                            self.end = Some(end);
                            self.pos += bytes.len() as u64;
                            return Some(end);
                        }
                        LineKind::Field => {
                            self.any_field = true;
                            self.field_started();
                        }
                        LineKind::Continuation => {}
                    }
                    // The line so far (name and colon, or the white space).
                    let so_far = (self.pos + i as u64 + 1 - self.line_start) as usize;
                    self.keep_line_start(kind, so_far, &bytes[..=i]);
                }
            } else {
                self.kept(b);
            }
            if b == b'\n' {
                self.line_start = self.pos + i as u64 + 1;
                self.decided = false;
                self.cls.reset();
            }
        }
        self.pos += bytes.len() as u64;
        None
    }

    /// The message ended: the section ends here if it had not already.
    pub fn finish(&mut self) -> HeaderEnd {
        if let Some(end) = self.end {
            return end;
        }
        // Stored data ends in CRLF, so this is a line start. Otherwise, as
        // the in-memory walker has it: a field line cut short is still a
        // field, an undecided one is "not a header".
        let end = if self.pos == self.line_start || self.decided {
            HeaderEnd {
                at: self.pos,
                separated: true,
            }
        } else {
            HeaderEnd {
                at: self.line_start,
                separated: false,
            }
        };
        self.finish_values();
        self.end = Some(end);
        end
    }

    /// What the section said (complete once it ended).
    pub fn info(&self) -> &HeaderInfo {
        &self.info
    }

    fn field_started(&mut self) {
        self.keep = Some(Keep::Nothing);
        if self.cls.name_is("received") {
            self.info.received += 1;
        } else if self.cls.name_is("date") {
            self.info.has_date = true;
        } else if self.cls.name_is("message-id") && self.message_id.is_none() {
            self.message_id = Some(Vec::new());
            self.keep = Some(Keep::MessageId);
        } else if self.cls.name_is("from") {
            self.info.froms += 1;
            if self.info.froms == 1 {
                self.keep = Some(Keep::From);
            }
        }
    }

    /// The part of a newly decided line already seen: `so_far` bytes, the
    /// last of them at the end of `chunk` (earlier ones may be in earlier
    /// chunks; they are a field name and white space, rebuilt from the
    /// classifier's rule: only a `From:` field keeps its name).
    fn keep_line_start(
        &mut self,
        kind: crate::message::headers::LineKind,
        so_far: usize,
        chunk: &[u8],
    ) {
        use crate::message::headers::LineKind;
        match (kind, self.keep) {
            (LineKind::Field, Some(Keep::From)) => {
                // Name and white space are at most MAX_NAME + a few bytes;
                // when split over chunks, the name is "From" and the white
                // space is not needed to parse the field.
                if chunk.len() >= so_far {
                    self.keep_from(&chunk[chunk.len() - so_far..]);
                } else {
                    self.keep_from(b"From:");
                }
            }
            (LineKind::Continuation, Some(Keep::From)) => self.keep_from(&chunk[chunk.len() - 1..]),
            (LineKind::Continuation, Some(Keep::MessageId)) => {
                self.keep_message_id(&chunk[chunk.len() - 1..])
            }
            _ => {}
        }
    }

    fn kept(&mut self, b: u8) {
        match self.keep {
            Some(Keep::From) => self.keep_from(&[b]),
            Some(Keep::MessageId) if b != b'\r' && b != b'\n' => self.keep_message_id(&[b]),
            _ => {}
        }
    }

    fn keep_from(&mut self, bytes: &[u8]) {
        if self.info.from.len() + bytes.len() > MAX_FROM {
            self.info.from_too_long = true;
            self.info.from = Vec::new();
            self.keep = Some(Keep::Nothing);
        } else {
            self.info.from.extend_from_slice(bytes);
        }
    }

    fn keep_message_id(&mut self, bytes: &[u8]) {
        if let Some(v) = self.message_id.as_mut()
            && v.len() + bytes.len() <= MAX_MESSAGE_ID
        {
            v.extend_from_slice(bytes);
        }
    }

    fn finish_values(&mut self) {
        self.keep = None;
        self.info.message_id = self
            .message_id
            .take()
            .map(|v| String::from_utf8_lossy(&v).trim().to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAX: usize = 1 << 20;

    /// What a DATA transfer gave, with the stored bytes.
    #[derive(Debug, PartialEq, Eq)]
    enum Out {
        Complete(Vec<u8>),
        TooBig,
        BareLineEnding,
        NulByte,
    }

    /// A reader and the buffer it stores into, emptied whenever it is full
    /// (`room` bytes), as the session does.
    struct R {
        r: DataReader,
        body: Vec<u8>,
        room: usize,
        /// The most the buffer held.
        high: usize,
    }

    impl From<DataReader> for R {
        fn from(r: DataReader) -> R {
            R {
                r,
                body: Vec::new(),
                room: usize::MAX,
                high: 0,
            }
        }
    }

    impl R {
        fn feed(&mut self, input: &[u8]) -> (usize, Option<Out>) {
            let mut used = 0;
            let mut stored = std::mem::take(&mut self.body);
            loop {
                let mut buf = Vec::new();
                let (n, out) = self.r.feed(&input[used..], &mut buf, self.room);
                used += n;
                self.high = self.high.max(buf.len());
                stored.extend_from_slice(&buf);
                let out = match out {
                    None if used < input.len() => continue,
                    None => {
                        self.body = stored;
                        return (used, None);
                    }
                    Some(DataOutcome::Complete) => Out::Complete(stored),
                    Some(DataOutcome::TooBig) => Out::TooBig,
                    Some(DataOutcome::BareLineEnding) => Out::BareLineEnding,
                    Some(DataOutcome::NulByte) => Out::NulByte,
                };
                return (used, Some(out));
            }
        }
    }

    /// A reader that strips NULs (most tests are about line endings and
    /// dots; the NUL policies have their own test).
    fn reader(max: usize, policy: BareLineEndings) -> R {
        R::from(DataReader::new(max, policy).with_nul_bytes(NulBytes::Strip))
    }

    #[test]
    fn nul_policies() {
        // hannob/smtpsmug's `CRLF NUL . CRLF`: never an end of data, and the
        // NUL never reaches the spool.
        let input =
            b"Subject: s\r\n\r\nline\r\n\x00.\r\nMAIL FROM:<x@y>\r\nmo\x00re\r\n.\r\nQUIT\r\n";
        let used = input.len() - 6;
        let reject = R::from(DataReader::new(MAX, BareLineEndings::Normalize)).feed(input);
        assert_eq!(reject, (used, Some(Out::NulByte)));
        let strip = reader(MAX, BareLineEndings::Normalize).feed(input);
        assert_eq!(
            strip,
            (
                used,
                Some(Out::Complete(
                    b"Subject: s\r\n\r\nline\r\n.\r\nMAIL FROM:<x@y>\r\nmore\r\n".to_vec()
                ))
            )
        );
        // A NUL in a stuffed-dot position or alone on a line, byte by byte.
        let input = b"\x00\r\n..\x00\r\n.\r\n";
        let mut r = R::from(DataReader::new(MAX, BareLineEndings::Normalize));
        let mut out = None;
        for (i, b) in input.iter().enumerate() {
            let (n, o) = r.feed(std::slice::from_ref(b));
            assert_eq!(n, 1);
            if o.is_some() {
                assert_eq!(i, input.len() - 1);
                out = o;
            }
        }
        assert_eq!(out, Some(Out::NulByte));
        assert_eq!(body(input), b"\r\n.\r\n");
        // No NUL: both policies accept.
        assert_eq!(
            R::from(DataReader::new(MAX, BareLineEndings::Normalize)).feed(b"a\r\n.\r\n"),
            (6, Some(Out::Complete(b"a\r\n".to_vec())))
        );
    }

    /// Feed everything in one call; the outcome and the bytes used.
    fn read(input: &[u8], policy: BareLineEndings) -> (usize, Option<Out>) {
        reader(MAX, policy).feed(input)
    }

    fn body(input: &[u8]) -> Vec<u8> {
        match read(input, BareLineEndings::Normalize) {
            (_, Some(Out::Complete(b))) => b,
            other => panic!("{other:?}"),
        }
    }

    /// Feed `input` in chunks split at `cuts`; the outcome and the bytes used.
    fn read_chunked(input: &[u8], cuts: &[usize], max: usize) -> (usize, Option<Out>) {
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
                Some(Out::Complete(b"Subject: x\r\n\r\nhello\r\n".to_vec()))
            )
        );
    }

    #[test]
    fn empty_message() {
        assert_eq!(
            read(b".\r\n", BareLineEndings::Normalize),
            (3, Some(Out::Complete(Vec::new())))
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
            (input.len() - 6, Some(Out::BareLineEnding))
        );
        assert_eq!(
            read(b"a\r\n.\r\n", BareLineEndings::Reject),
            (6, Some(Out::Complete(b"a\r\n".to_vec())))
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
            (7, Some(Out::Complete(b".\r\n".to_vec())))
        );
        let mut r = reader(3, BareLineEndings::Normalize);
        assert_eq!(r.feed(b"ab\r\n.\r\n"), (7, Some(Out::TooBig)));
        // Past the limit the reader keeps consuming to the end, storing nothing.
        let mut r = reader(10, BareLineEndings::Normalize);
        for _ in 0..1000 {
            assert_eq!(r.feed(&[b'y'; 1000]), (1000, None));
        }
        assert!(r.body.capacity() <= 10, "{}", r.body.capacity());
        assert_eq!(r.r.size(), 1_000_000);
        assert_eq!(r.feed(b"\r\n.\r\nRSET\r\n"), (5, Some(Out::TooBig)));
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
                    if let Out::Complete(stored) = &out {
                        assert!(
                            canonical(stored),
                            "bare CR/LF stored from {input:?}: {stored:?}"
                        );
                    }
                    if policy == BareLineEndings::Normalize {
                        let Out::Complete(stored) = out else {
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
            if let (_, Some(Out::Complete(stored))) = read(&input, BareLineEndings::Normalize) {
                prop_assert!(canonical(&stored));
            }
        }
    }

    #[test]
    fn a_full_buffer_stops_the_reader_and_nothing_changes() {
        let line = [&b"..x"[..], &[b'y'; 300][..], b"\r\n"].concat();
        let input = [line.repeat(50), b".\r\nQUIT\r\n".to_vec()].concat();
        let whole = reader(MAX, BareLineEndings::Normalize).feed(&input);
        for room in [1, 2, 7, 100, 1000] {
            let mut r = reader(MAX, BareLineEndings::Normalize);
            r.room = room;
            assert_eq!(r.feed(&input), whole, "room {room}");
            assert!(r.high <= room + 3, "room {room}: {}", r.high);
        }
    }

    /// Scan `msg` in chunks split at `cut`; the info and the end.
    fn scan(msg: &[u8], cut: usize) -> (HeaderInfo, HeaderEnd) {
        let mut s = HeaderScan::new();
        let cut = cut.min(msg.len());
        let end = s.push(&msg[..cut]).or_else(|| s.push(&msg[cut..]));
        let end = end.unwrap_or_else(|| s.finish());
        (s.info().clone(), end)
    }

    #[test]
    fn header_scan() {
        let msg = b"Received: a\r\nreceived : b\r\n\tfolded\r\nMessage-ID:\r\n <x@y>\r\nFrom: A\r\n <a@b>\r\nDATE: now\r\n\r\nReceived: body\r\n";
        for cut in 0..=msg.len() {
            let (info, end) = scan(msg, cut);
            assert_eq!(info.received, 2);
            assert_eq!(info.message_id.as_deref(), Some("<x@y>"), "cut {cut}");
            assert!(info.has_date);
            assert_eq!(
                (info.froms, &info.from[..]),
                (1, &b"From: A\r\n <a@b>\r\n"[..]),
                "cut {cut}"
            );
            assert!(end.separated);
            assert_eq!(&msg[end.at as usize..], b"\r\nReceived: body\r\n");
        }
        let (_, end) = scan(b"hello world\r\n", 3);
        assert_eq!((end.at, end.separated), (0, false));
        let (_, end) = scan(b"Subject: x\r\nnot a header\r\n", 20);
        assert_eq!((end.at, end.separated), (12, false));
        let (info, end) = scan(b"Subject: x\r\n", 5);
        assert_eq!(
            (end.at, end.separated, info.has_date, info.message_id),
            (12, true, false, None)
        );
        let (_, end) = scan(b"", 0);
        assert_eq!((end.at, end.separated), (0, true));
        // A continuation line before any field is not a header.
        assert!(!scan(b" x: y\r\n", 1).1.separated);
    }

    proptest! {
        /// The streaming scan ends the header section where the in-memory
        /// walker does, however the message is cut.
        #[test]
        fn scan_agrees_with_the_walker(
            msg in proptest::collection::vec(prop_oneof![Just(b'\r'), Just(b'\n'), Just(b':'), Just(b' '), Just(b'a'), any::<u8>()], 0..120),
            cut in 0usize..130,
        ) {
            let (_, end) = scan(&msg, cut);
            let (_, body, separated) = crate::message::fields_separated(&msg);
            let walker_at = if separated {
                crate::message::headers::lines(&msg)
                    .find(|l| l.kind == crate::message::headers::LineKind::Empty)
                    .map_or(msg.len(), |l| l.start)
            } else {
                body
            };
            prop_assert_eq!((end.at as usize, end.separated), (walker_at, separated));
        }
    }
}
