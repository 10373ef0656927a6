//! Sans-IO DATA encoder: canonical CRLF line endings, dot-stuffing and the end-of-data marker, in one pass over any chunking.

/// Sans-IO encoder of a message into its DATA form (RFC 5321 §4.5.2): bare
/// CR and bare LF become CRLF, a line starting with `.` gets another `.`,
/// the last line ends in CRLF and `.CRLF` follows. One pass, any chunking.
#[derive(Debug)]
pub struct DataEncoder {
    /// The next byte starts a line.
    line_start: bool,
    /// The previous byte was a CR whose line ending is not yet written.
    cr: bool,
}

impl Default for DataEncoder {
    fn default() -> Self {
        DataEncoder {
            line_start: true,
            cr: false,
        }
    }
}

impl DataEncoder {
    /// Encode the next piece of the message, appending to `out` (at most
    /// twice `input.len()` plus 2 bytes).
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let mut i = 0;
        while i < input.len() {
            if self.cr {
                self.cr = false;
                out.extend_from_slice(b"\r\n");
                self.line_start = true;
                if input[i] == b'\n' {
                    i += 1;
                    continue;
                }
            }
            match input[i] {
                b'\r' => {
                    self.cr = true;
                    i += 1;
                }
                b'\n' => {
                    out.extend_from_slice(b"\r\n");
                    self.line_start = true;
                    i += 1;
                }
                first => {
                    if self.line_start && first == b'.' {
                        out.push(b'.');
                    }
                    let end =
                        memchr::memchr2(b'\r', b'\n', &input[i..]).map_or(input.len(), |p| i + p);
                    out.extend_from_slice(&input[i..end]);
                    self.line_start = false;
                    i = end;
                }
            }
        }
    }

    /// End the message: close the last line and add the `.CRLF` terminator.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.cr || !self.line_start {
            out.extend_from_slice(b"\r\n");
        }
        self.cr = false;
        self.line_start = true;
        out.extend_from_slice(b".\r\n");
    }
}

/// The whole of `message` in its DATA form (see [`DataEncoder`]), for
/// callers that hold it in memory (the sendmail command).
pub fn data_form(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + message.len() / 64 + 8);
    let mut enc = DataEncoder::default();
    enc.push(message, &mut out);
    enc.finish(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode(input: &[u8], chunk: usize) -> Vec<u8> {
        let mut enc = DataEncoder::default();
        let mut out = Vec::new();
        for piece in input.chunks(chunk.max(1)) {
            enc.push(piece, &mut out);
        }
        enc.finish(&mut out);
        out
    }

    #[test]
    fn data_encoding_examples() {
        assert_eq!(encode(b"", 8), b".\r\n");
        assert_eq!(encode(b"a\r\n", 8), b"a\r\n.\r\n");
        assert_eq!(encode(b"a", 8), b"a\r\n.\r\n");
        assert_eq!(
            encode(b".\r\n..x\r\nb.c\r\n", 8),
            b"..\r\n...x\r\nb.c\r\n.\r\n"
        );
        assert_eq!(
            encode(b"a\nb\rc\r\r\nd\r", 1),
            b"a\r\nb\r\nc\r\n\r\nd\r\n.\r\n"
        );
        assert_eq!(encode(b"x\n.\n", 3), b"x\r\n..\r\n.\r\n");
        assert_eq!(encode(b"\r\n.\r.", 2), b"\r\n..\r\n..\r\n.\r\n");
    }

    /// Undo the encoding the way a receiving server does.
    fn unstuff(wire: &[u8]) -> Vec<u8> {
        let body = wire.strip_suffix(b".\r\n").expect("terminator");
        let mut out = Vec::new();
        for line in body.split_inclusive(|b| *b == b'\n') {
            out.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
        }
        out
    }

    proptest! {
        #[test]
        fn data_encoding_is_canonical_and_reversible(
            input in proptest::collection::vec(prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'.'), Just(b'a'), any::<u8>()], 0..200),
            chunk in 1usize..20,
        ) {
            let wire = encode(&input, chunk);
            prop_assert_eq!(&wire, &encode(&input, input.len().max(1)));
            // Only CRLF line endings, and the only `CRLF.CRLF` is the terminator.
            for (i, b) in wire.iter().enumerate() {
                if *b == b'\r' { prop_assert_eq!(wire.get(i + 1), Some(&b'\n')); }
                if *b == b'\n' { prop_assert!(i > 0 && wire[i - 1] == b'\r'); }
            }
            let full = [b"\r\n".as_slice(), &wire].concat();
            let ends = full.windows(5).filter(|w| *w == b"\r\n.\r\n").count();
            prop_assert_eq!(ends, 1);
            prop_assert!(wire.ends_with(b".\r\n"));
            // Un-stuffing gives back the input with its line endings canonicalised.
            let mut canonical = Vec::new();
            let mut i = 0;
            while i < input.len() {
                match input[i] {
                    b'\r' if input.get(i + 1) == Some(&b'\n') => { canonical.extend_from_slice(b"\r\n"); i += 1; }
                    b'\r' | b'\n' => canonical.extend_from_slice(b"\r\n"),
                    b => canonical.push(b),
                }
                i += 1;
            }
            if !canonical.is_empty() && !canonical.ends_with(b"\r\n") { canonical.extend_from_slice(b"\r\n"); }
            prop_assert_eq!(unstuff(&wire), canonical);
        }
    }
}
