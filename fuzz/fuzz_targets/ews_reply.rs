//! Fuzz the EWS response reader: the XML reader and the `CreateItem` classification on arbitrary bodies; no panic, bounded output, one-line failure texts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailbridge::transport::ews::{classify_response, xml};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(elements) = xml::parse(&text) {
        assert!(elements.len() <= 10_000);
        for e in &elements {
            assert!(!e.name.is_empty());
            assert!(!e.name.contains(':'), "prefix kept: {}", e.name);
        }
    }
    let _ = xml::unescape(&text);
    for status in [200u16, 401, 500, 503] {
        if let Err(f) = classify_response(status, data, None) {
            assert!(!f.text.chars().any(char::is_control), "{:?}", f.text);
        }
    }
});
