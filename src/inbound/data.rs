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
                    let window = &input[i..input.len().min(i.saturating_add(free))];
                    let run = memchr::memchr2(b'\r', b'\n', window).unwrap_or(window.len());
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
                        // Text: stored with the rest of its line.
                        _ => {
                            self.state = State::Text;
                            continue;
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
#[path = "data_tests.rs"]
mod tests;
