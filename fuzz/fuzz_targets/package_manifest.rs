//! A package's `manifest.json` and its verification: the input is written as
//! the manifest of a small fixed package and the whole package is verified
//! as `panguc run` does (format version, model bounds, listed paths, sizes,
//! hashes, unlisted files). Must never panic or read outside the package.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

/// A package directory with two files the seed manifests list.
fn package_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("panguc-fuzz-package-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("weights")).unwrap();
        std::fs::write(dir.join("weights/model.bin"), [7u8; 64]).unwrap();
        std::fs::write(dir.join("kernel_program.json"), b"{}").unwrap();
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let dir = package_dir();
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = panguc_runtime::package::parse_manifest(text, dir);
    }
    std::fs::write(dir.join("manifest.json"), data).unwrap();
    let _ = panguc_runtime::package::verify_package(dir);
});
