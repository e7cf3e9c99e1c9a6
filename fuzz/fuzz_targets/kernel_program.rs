//! A package's `kernel_program.json`: deserialized and validated exactly as
//! the runtime does before running it; must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = serde_json::from_slice::<panguc_ir::kernel::KernelProgram>(data) {
        let _ = p.validate();
    }
});
