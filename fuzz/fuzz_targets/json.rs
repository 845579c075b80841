//! Arbitrary text through the payload's JSON check: see `check_json` in
//! the crate root. Invalid UTF-8 is replaced, so every input reaches it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ensync_protocol_fuzz::check_json(&String::from_utf8_lossy(data)));
