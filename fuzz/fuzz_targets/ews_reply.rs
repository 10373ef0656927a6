//! Fuzz the EWS response reader: the SOAP reader and the `CreateItem` classification on arbitrary bodies; no panic, prefixes removed, one-line failure texts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailbridge::transport::ews::{SoapReply, classify_response};

fuzz_target!(|data: &[u8]| {
    let reply = SoapReply::parse(data);
    if let Some(code) = &reply.fault_code {
        assert!(!code.contains(':'), "prefix kept: {code}");
    }
    for status in [200u16, 401, 500, 503] {
        if let Err(f) = classify_response(status, data, None) {
            assert!(!f.text.chars().any(char::is_control), "{:?}", f.text);
        }
    }
});
