//! `config.json`: an error naming the file, or a config whose derived sizes
//! (tensor list length, parameter counts) are computed without overflow.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match panguc_ir::PanguConfig::from_json_str(text, "config.json") {
        Ok(c) => {
            assert!(c.total_params() < u64::MAX && c.active_params() <= c.total_params());
            assert!(c.num_tensors() <= panguc_ir::config::MAX_TENSORS);
            // Cheap for small configs only: the list itself is bounded by MAX_TENSORS.
            if c.num_tensors() < 10_000 {
                assert_eq!(c.expected_tensors().len(), c.num_tensors());
            }
        }
        Err(e) => assert!(e.to_string().starts_with("config.json: ")),
    }
});
