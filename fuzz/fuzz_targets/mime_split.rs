//! Fuzz the MIME splitter of Graph's upload path: any bytes, cut anywhere, any threshold; the same result whatever the chunking, parts in order inside the message, the skeleton exactly the message with each part's range replaced by its marker line, and each part's counted size what the streaming decoder makes of its range.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailbridge::message::split::{Decoder, Splitter};

fuzz_target!(|data: &[u8]| {
    let Some((&knobs, msg)) = data.split_first() else {
        return;
    };
    let step = knobs as usize % 31 + 1;
    let threshold = (knobs as usize >> 5) * 8;
    let mut cut = Splitter::new("n", threshold);
    for piece in msg.chunks(step) {
        cut.push(piece);
    }
    let (skeleton, parts) = cut.finish();
    let mut whole = Splitter::new("n", threshold);
    whole.push(msg);
    assert_eq!(whole.finish(), (skeleton.clone(), parts.clone()));
    let mut rebuilt = Vec::new();
    let mut at = 0usize;
    for (i, p) in parts.iter().enumerate() {
        let (start, end) = (p.start as usize, p.end as usize);
        assert!(at <= start && start <= end && end <= msg.len(), "{parts:?}");
        rebuilt.extend_from_slice(&msg[at..start]);
        rebuilt.extend_from_slice(&Splitter::marker_line("n", i));
        at = end;
        let mut d = Decoder::default();
        let mut out = Vec::new();
        d.push(&msg[start..end], &mut out);
        d.finish(&mut out);
        assert_eq!(out.len() as u64, p.decoded_len);
    }
    rebuilt.extend_from_slice(&msg[at..]);
    assert_eq!(rebuilt, skeleton);
});
