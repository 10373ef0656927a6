//! Fuzz the spool metadata decoders: `serde_json` into `Meta` (a `.json` beside an entry), then `Meta::check`, and `meta::parse_head` (the metadata line that opens a `.msg`); what decodes must re-encode to the same thing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailbridge::spool::Meta;
use mailbridge::spool::meta::{Head, head_line, parse_head};

fn same(a: &Meta, b: &Meta) -> bool {
    serde_json::to_value(a).ok() == serde_json::to_value(b).ok()
}

fuzz_target!(|data: &[u8]| {
    if let Ok(meta) = serde_json::from_slice::<Meta>(data) {
        let _ = meta.check();
        let encoded = serde_json::to_vec(&meta).expect("a decoded Meta encodes");
        let again: Meta = serde_json::from_slice(&encoded).expect("an encoded Meta decodes");
        assert!(same(&meta, &again), "decode after encode is not the identity");
        assert_eq!(meta.check(), again.check());
    }
    let first_nl = data.iter().position(|&b| b == b'\n');
    match parse_head(data) {
        Ok(Head::Incomplete) => assert!(first_nl.is_none(), "a newline was missed"),
        Ok(Head::Stub(start)) => assert!(first_nl == Some(0) && start == 1),
        Ok(Head::Meta(meta, start)) => {
            // The message starts just past the first newline.
            assert_eq!(first_nl.map(|i| i as u64 + 1), Some(start));
            // Written again, the line reads back as the same metadata, one line long.
            let line = head_line(&meta).expect("a decoded Meta encodes");
            assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
            let mut file = line.clone();
            file.extend_from_slice(&data[start as usize..]);
            match parse_head(&file) {
                Ok(Head::Meta(again, s)) => {
                    assert_eq!(s, line.len() as u64);
                    assert!(same(&meta, &again), "line decode after encode is not the identity");
                }
                other => panic!("a written metadata line does not read back: {other:?}"),
            }
        }
        Err(_) => {}
    }
});
