//! Arbitrary bytes through `EnsyncCodec`, whole and cut into reads the
//! input chooses, then every line through the parser: see
//! `check_codec` in the crate root.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ensync_protocol_fuzz::check_codec(data));
