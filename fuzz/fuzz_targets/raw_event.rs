#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| lanes_fuzz_targets::raw_event(data));
