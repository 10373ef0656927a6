//! The one header walker: which lines of a message belong to its header section, decided byte by byte (sans-IO), shared by the inbound stream and the in-memory edits.
//!
//! The rule, for each line from the start of the message:
//! - an empty line ends the header section (the body follows it);
//! - a line starting with space or tab continues the previous field, and
//!   ends the section when there is no previous field;
//! - a line whose bytes before the first `:` are a field name (printable
//!   ASCII 33..=126, then optional white space; name and white space at
//!   most [`MAX_NAME`] bytes) starts a field;
//! - any other line ends the section without an empty line ("not
//!   separated": whoever adds a field must add the empty line too, or a
//!   lenient parser would read that line's neighbours as fields).
//!
//! [`LineKind`] is known after at most `MAX_NAME + 1` bytes of a line, so a
//! streaming reader never holds more than that of an undecided line.

/// Longest field name, with the white space before its colon, accepted (an
/// RFC 5322 line is at most 998 bytes).
pub const MAX_NAME: usize = 997;

/// What a line of the header section is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineKind {
    /// Starts a header field.
    Field,
    /// Continues the previous field (folded).
    Continuation,
    /// The empty line that ends the header section.
    Empty,
    /// Not a header line: the section ended before it, without an empty line.
    NotHeader,
}

/// How much of the field name the walker keeps (enough for every name
/// mailbridge looks for).
const NAME_KEPT: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum State {
    /// Nothing of the line seen yet.
    #[default]
    Start,
    /// A CR at the start of the line.
    StartCr,
    /// Inside a possible field name.
    Name,
    /// White space after a possible field name.
    NameWsp,
}

/// Decides the kind of one line from its first bytes; [`reset`](Self::reset)
/// it at each line start.
#[derive(Debug, Clone, Default)]
pub struct LineClassifier {
    state: State,
    name: [u8; NAME_KEPT],
    name_len: usize,
    /// Bytes of the line seen while undecided.
    seen: usize,
}

impl LineClassifier {
    /// Start a new line.
    pub fn reset(&mut self) {
        self.state = State::Start;
        self.name_len = 0;
        self.seen = 0;
    }

    /// The next byte of the line; `Some` once the kind is known (the byte
    /// that decided it belongs to the line, as do the rest up to LF).
    pub fn push(&mut self, b: u8) -> Option<LineKind> {
        self.seen += 1;
        if self.seen > MAX_NAME + 1 {
            // Name and white space longer than MAX_NAME: no field.
            return Some(LineKind::NotHeader);
        }
        match self.state {
            State::Start => match b {
                b' ' | b'\t' => Some(LineKind::Continuation),
                b'\r' => {
                    self.state = State::StartCr;
                    None
                }
                b'\n' => Some(LineKind::Empty),
                33..=126 if b != b':' => {
                    self.name_byte(b);
                    self.state = State::Name;
                    None
                }
                _ => Some(LineKind::NotHeader),
            },
            State::StartCr => Some(if b == b'\n' {
                LineKind::Empty
            } else {
                LineKind::NotHeader
            }),
            State::Name => match b {
                b':' => Some(LineKind::Field),
                b' ' | b'\t' => {
                    self.state = State::NameWsp;
                    None
                }
                33..=126 => {
                    self.name_byte(b);
                    None
                }
                _ => Some(LineKind::NotHeader),
            },
            State::NameWsp => match b {
                b':' => Some(LineKind::Field),
                b' ' | b'\t' => None,
                _ => Some(LineKind::NotHeader),
            },
        }
    }

    /// The line ended (end of input) before its kind was known.
    pub fn end(&self) -> LineKind {
        LineKind::NotHeader
    }

    fn name_byte(&mut self, b: u8) {
        if self.name_len < NAME_KEPT {
            self.name[self.name_len] = b.to_ascii_lowercase();
        }
        self.name_len += 1;
    }

    /// After [`LineKind::Field`]: whether the field is called `name`
    /// (ASCII case-insensitive; `name` is at most 16 bytes).
    pub fn name_is(&self, name: &str) -> bool {
        self.name_len == name.len()
            && name.len() <= NAME_KEPT
            && self.name[..name.len()].eq_ignore_ascii_case(name.as_bytes())
    }
}

/// One line of an in-memory message as the walker sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Line {
    /// What the line is.
    pub kind: LineKind,
    /// Its start offset.
    pub start: usize,
    /// Just past its LF (or the end of the message).
    pub end: usize,
    /// Offset of the first `:` when it is a field.
    pub colon: Option<usize>,
}

/// The lines of `msg`'s header section, in order, up to and including the
/// one that ends it (an [`LineKind::Empty`] or [`LineKind::NotHeader`] line);
/// none of those when the message ends inside the section. A continuation
/// with no field before it is reported as `NotHeader`.
pub fn lines(msg: &[u8]) -> impl Iterator<Item = Line> + '_ {
    let mut pos = 0;
    let mut any_field = false;
    let mut done = false;
    let mut cls = LineClassifier::default();
    std::iter::from_fn(move || {
        if done || pos >= msg.len() {
            return None;
        }
        let start = pos;
        let end = msg[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(msg.len(), |i| pos + i + 1);
        cls.reset();
        let mut kind = None;
        let mut colon = None;
        for (i, &b) in msg[start..end].iter().enumerate() {
            if let Some(k) = cls.push(b) {
                if k == LineKind::Field {
                    colon = Some(start + i);
                }
                kind = Some(k);
                break;
            }
        }
        let mut kind = kind.unwrap_or(cls.end());
        if kind == LineKind::Continuation && !any_field {
            kind = LineKind::NotHeader;
        }
        any_field |= kind == LineKind::Field;
        done = matches!(kind, LineKind::Empty | LineKind::NotHeader);
        pos = end;
        Some(Line {
            kind,
            start,
            end,
            colon,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(msg: &[u8]) -> Vec<LineKind> {
        lines(msg).map(|l| l.kind).collect()
    }

    #[test]
    fn classifies_lines() {
        use LineKind::*;
        assert_eq!(
            kinds(b"A: 1\r\n\tx\r\nB : 2\r\n\r\nbody\r\n"),
            [Field, Continuation, Field, Empty]
        );
        assert_eq!(kinds(b"T o: x\r\n"), [NotHeader]);
        assert_eq!(kinds(b" x: y\r\n"), [NotHeader]);
        assert_eq!(kinds(b"A: 1\r\nno colon\r\n"), [Field, NotHeader]);
        assert_eq!(kinds(b":x\r\n"), [NotHeader]);
        assert_eq!(kinds(b"A: 1\r\nSubject"), [Field, NotHeader]);
        assert_eq!(kinds(b"A: 1\r\n"), [Field]);
        assert_eq!(kinds(b"\n"), [Empty]);
        assert_eq!(kinds(b"\x00x: y\r\n"), [NotHeader]);
        let long = [vec![b'x'; MAX_NAME], b": v\r\n".to_vec()].concat();
        assert_eq!(kinds(&long), [Field]);
        let too_long = [vec![b'x'; MAX_NAME + 1], b": v\r\n".to_vec()].concat();
        assert_eq!(kinds(&too_long), [NotHeader]);
        let spaced = [&b"x"[..], &[b' '; MAX_NAME][..], b": v\r\n"].concat();
        assert_eq!(kinds(&spaced), [NotHeader]);
        let spaced = [&b"x"[..], &[b' '; MAX_NAME - 1][..], b": v\r\n"].concat();
        assert_eq!(kinds(&spaced), [Field]);
    }

    #[test]
    fn names_compare_without_case() {
        let mut c = LineClassifier::default();
        for &b in b"Message-ID" {
            assert_eq!(c.push(b), None);
        }
        assert_eq!(c.push(b':'), Some(LineKind::Field));
        assert!(c.name_is("message-id") && !c.name_is("message-i"));
        c.reset();
        for &b in b"Received-SPF " {
            c.push(b);
        }
        assert_eq!(c.push(b':'), Some(LineKind::Field));
        assert!(!c.name_is("received"));
    }
}
