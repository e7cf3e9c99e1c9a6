//! A safetensors file's header: whatever the bytes, parsing returns an
//! error or tensors whose byte ranges lie inside the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if let Ok((tensors, _)) = panguc::frontend::shard::parse_header(Path::new("fuzz.safetensors"), data) {
        for t in tensors {
            assert!(
                t.start <= t.end && t.end <= data.len(),
                "{} [{}, {}) outside {} bytes",
                t.name,
                t.start,
                t.end,
                data.len()
            );
        }
    }
});
