//! Fuzz the spool metadata decoder: `serde_json` into `Meta`, then `Meta::check`; what decodes must re-encode to the same thing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailbridge::spool::Meta;

fuzz_target!(|data: &[u8]| {
    let Ok(meta) = serde_json::from_slice::<Meta>(data) else {
        return;
    };
    let _ = meta.check();
    let encoded = serde_json::to_vec(&meta).expect("a decoded Meta encodes");
    let again: Meta = serde_json::from_slice(&encoded).expect("an encoded Meta decodes");
    assert_eq!(
        serde_json::to_value(&meta).ok(),
        serde_json::to_value(&again).ok(),
        "decode after encode is not the identity"
    );
    assert_eq!(meta.check(), again.check());
});
