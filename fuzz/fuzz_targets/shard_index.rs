//! `model.safetensors.index.json`: an error, or shard names that stay inside
//! the checkpoint directory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::{Component, Path};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(index) = panguc::frontend::index::ShardIndex::parse(text, Path::new("model.safetensors.index.json")) {
        for file in index.shard_files() {
            assert!(Path::new(&file).components().all(|c| matches!(c, Component::Normal(_))), "{file}");
        }
    }
});
