//! Fuzz the streaming header scan against the in-memory header walker: any bytes, cut anywhere; the scan ends the header section where `message::fields_separated` does, counts the same `Received:` fields, and never asks to hold more than one undecided line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailbridge::inbound::data::HeaderScan;
use mailbridge::message::headers::{LineKind, MAX_NAME, lines};

fuzz_target!(|data: &[u8]| {
    let Some((&cut, msg)) = data.split_first() else {
        return;
    };
    let step = cut as usize % 31 + 1;
    let mut scan = HeaderScan::new();
    let mut end = None;
    let mut fed = 0u64;
    for piece in msg.chunks(step) {
        fed += piece.len() as u64;
        if let Some(e) = scan.push(piece) {
            end = Some(e);
            break;
        }
        // What stays behind for a field to be inserted before is one line start.
        if let Some(hold) = scan.hold() {
            assert!(fed - hold <= MAX_NAME as u64 + 2, "holds {}", fed - hold);
        }
    }
    let end = end.unwrap_or_else(|| scan.finish());
    let (fields, body, separated) = mailbridge::message::fields_separated(msg);
    let at = if separated {
        lines(msg)
            .find(|l| l.kind == LineKind::Empty)
            .map_or(msg.len(), |l| l.start)
    } else {
        body
    };
    assert_eq!((end.at as usize, end.separated), (at, separated));
    let received = fields
        .iter()
        .filter(|f| f.name.eq_ignore_ascii_case("received"))
        .count();
    assert_eq!(scan.info().received, received);
});
