//! The streaming decoder over a byte slice, against `DeltaFile` and `compose::reconstruct`: see
//! `bitdelta_fuzz::stream`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bitdelta_fuzz::stream(data));
