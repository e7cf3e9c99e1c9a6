//! The canonical IR text format: an error, or a module that prints back to
//! text which parses to the same printed module (print∘parse is stable).
#![no_main]

use libfuzzer_sys::fuzz_target;
use panguc_ir::text::{parse_module, print_module};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(module) = parse_module(text) else { return };
    let _ = panguc_ir::verify::verify_module(&module);
    let printed = print_module(&module);
    let again = parse_module(&printed).expect("printed IR must parse");
    assert_eq!(print_module(&again), printed);
});
