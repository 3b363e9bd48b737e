//! `DeltaFile::parse`, the payload checks, rebuilding every checked payload, and the round trip
//! of valid deltas through the writer: see `bitdelta_fuzz::parse`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bitdelta_fuzz::parse(data));
