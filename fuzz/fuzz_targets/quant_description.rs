//! `quant_model_description.json`: an error naming the file, or a
//! description whose every listed tensor has a supported quant type.
#![no_main]

use libfuzzer_sys::fuzz_target;
use panguc::frontend::quant::{QuantDescription, QuantType, DESCRIPTION_FILE};
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match QuantDescription::parse(text, Path::new(DESCRIPTION_FILE)) {
        Ok(d) => {
            for (name, ty) in d.tensors() {
                assert_eq!(QuantType::parse(ty.name()), Some(ty), "{name}");
            }
        }
        Err(e) => assert!(format!("{e:#}").contains(DESCRIPTION_FILE), "{e:#}"),
    }
});
