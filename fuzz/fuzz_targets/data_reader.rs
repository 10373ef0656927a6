//! Fuzz the DATA reader: arbitrary bytes in arbitrary chunks and output buffers of any size, both bare-line-ending and both NUL policies; only canonical NUL-free output, never more than the buffer holds, and the same result however the input is cut.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailbridge::config::{BareLineEndings, NulBytes};
use mailbridge::inbound::data::{DataOutcome, DataReader};

fn canonical(b: &[u8]) -> bool {
    b.iter().enumerate().all(|(i, &c)| match c {
        b'\r' => b.get(i + 1) == Some(&b'\n'),
        b'\n' => i > 0 && b[i - 1] == b'\r',
        _ => true,
    })
}

/// Feed `input` in pieces of `step` bytes into a buffer emptied whenever it
/// holds `room` bytes; what was used, the outcome and everything stored.
fn read(
    input: &[u8],
    step: usize,
    room: usize,
    max: usize,
    policy: BareLineEndings,
    nul: NulBytes,
) -> (usize, Option<DataOutcome>, Vec<u8>) {
    let mut r = DataReader::new(max, policy).with_nul_bytes(nul);
    let mut pos = 0;
    let mut stored = Vec::new();
    let mut buf = Vec::new();
    for piece in input.chunks(step.max(1)) {
        let mut used = 0;
        loop {
            let (n, out) = r.feed(&piece[used..], &mut buf, room);
            assert!(
                buf.len() <= room.saturating_add(3),
                "buffer {} over room {room}",
                buf.len()
            );
            stored.extend_from_slice(&buf);
            buf.clear();
            used += n;
            if out.is_some() {
                return (pos + used, out, stored);
            }
            if used == piece.len() {
                break;
            }
        }
        pos += used;
    }
    (pos, None, stored)
}

fuzz_target!(|data: &[u8]| {
    let (head, input) = data.split_at(data.len().min(2));
    let step = head.first().copied().unwrap_or(1) as usize % 17 + 1;
    let room = head.first().copied().unwrap_or(1) as usize / 17 + 1;
    let max = head.get(1).copied().unwrap_or(255) as usize * 16 + 1;
    for policy in [BareLineEndings::Normalize, BareLineEndings::Reject] {
        for nul in [NulBytes::Reject, NulBytes::Strip] {
            let whole = read(input, usize::MAX, usize::MAX, max, policy, nul);
            let cut = read(input, step, room, max, policy, nul);
            assert_eq!((cut.0, &cut.1), (whole.0, &whole.1));
            // Past the size limit what was stored depends on where the
            // input was cut; such a message is refused and its file removed.
            // Unfinished data may be past it too: compare finished data only.
            if whole.1.is_some() && whole.1 != Some(DataOutcome::TooBig) {
                assert_eq!(cut.2, whole.2);
            }
            if let (used, Some(out), body) = &whole {
                // The data ends only right after a CRLF "." CRLF at a real line start.
                let with_start = [b"\r\n", &input[..*used]].concat();
                assert!(with_start.ends_with(b"\r\n.\r\n"));
                assert_eq!(
                    with_start.windows(5).position(|w| w == b"\r\n.\r\n"),
                    Some(with_start.len() - 5)
                );
                if *out == DataOutcome::Complete {
                    assert!(canonical(body), "{body:?}");
                    assert!(body.len() <= max);
                    assert!(!body.contains(&0), "NUL stored: {body:?}");
                    if nul == NulBytes::Reject {
                        assert!(!input[..*used].contains(&0), "NUL accepted");
                    }
                }
            }
        }
    }
});
