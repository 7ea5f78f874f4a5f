#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| lockstep_fuzz::h2_frames(data));
