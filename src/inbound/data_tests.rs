//! Tests of the DATA reader and the streaming header scan: exact output, any chunking, any buffer size, and agreement with the in-memory header walker.

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
    let input = b"Subject: s\r\n\r\nline\r\n\x00.\r\nMAIL FROM:<x@y>\r\nmo\x00re\r\n.\r\nQUIT\r\n";
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
