//! The tamper corpus: a package of the tiny model compiled for
//! `cpu,ascend910b`, damaged one way at a time. Every damage must make
//! `panguc run` refuse the package before generating anything, with an
//! error naming the damaged file.
//!
//! Every tampering goes through ordinary file writes, so it changes the
//! file's mtime: a verification that trusts a stamp bound to size, mtime
//! and inode still sees it. Each case is undone before the next, and the
//! restored package must run again (so a case cannot pass because an
//! earlier one broke the package for good).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn panguc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_panguc")).args(args).output().expect("panguc runs")
}

fn run(pkg: &Path) -> Output {
    panguc(&["run", pkg.to_str().unwrap(), "--tokens", "1,2,3", "--max-new-tokens", "1"])
}

fn refused(o: &Output, case: &str, file: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{case}: the damaged package ran");
    assert!(o.stdout.is_empty(), "{case}: output before the refusal: {}", String::from_utf8_lossy(&o.stdout));
    assert!(!err.contains("panicked"), "{case}: panic: {err}");
    assert!(err.starts_with("error: "), "{case}: {err}");
    assert!(err.contains(file), "{case}: the error does not name {file}: {err}");
}

fn flip_byte(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
}

fn manifest_files(pkg: &Path) -> Vec<String> {
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(pkg.join("manifest.json")).unwrap()).unwrap();
    m["files"].as_object().unwrap().keys().cloned().collect()
}

#[test]
fn every_damaged_file_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let pkg = tmp.path().join("pkg");
    let tiny = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny-pangu");
    let o = panguc(&["compile", tiny.to_str().unwrap(), "--target", "cpu,ascend910b", "-o", pkg.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(run(&pkg).status.success(), "the undamaged package must run");

    let files = manifest_files(&pkg);
    // Every kind the issue names must be in the corpus.
    for kind in ["cpu/libpanguc_kernels.so", "kernel_program.json", "weights/model.bin", "weights/layers.000.bin"] {
        assert!(files.iter().any(|f| f == kind), "manifest lacks {kind}");
    }
    let ascend = files.iter().filter(|f| f.starts_with("ascend/ascend910b/")).count();
    assert!(ascend > 50, "expected the CANN project in the manifest, found {ascend} files");

    // A byte flip in the middle of every file the manifest lists.
    for rel in &files {
        let path = pkg.join(rel);
        let original = std::fs::read(&path).unwrap();
        if original.is_empty() {
            continue;
        }
        flip_byte(&path, original.len() / 2);
        refused(&run(&pkg), &format!("flip in {rel}"), rel);
        std::fs::write(&path, &original).unwrap();
    }

    // The manifest itself: broken syntax, a changed hash, a changed size.
    let manifest = pkg.join("manifest.json");
    let original = std::fs::read(&manifest).unwrap();
    let text = String::from_utf8(original.clone()).unwrap();
    flip_byte(&manifest, 0);
    refused(&run(&pkg), "flip of the manifest's first byte", "manifest.json");
    std::fs::write(&manifest, &original).unwrap();
    let so_entry = text.find("\"cpu/libpanguc_kernels.so\": {").unwrap();
    let sha_at = so_entry + text[so_entry..].find("\"sha256\": \"").unwrap() + "\"sha256\": \"".len();
    flip_byte(&manifest, sha_at);
    refused(&run(&pkg), "flip in the manifest's hash of the kernel library", "cpu/libpanguc_kernels.so");
    std::fs::write(&manifest, &original).unwrap();
    // Another leading digit (never 0, which JSON numbers cannot start with).
    let bytes_at = so_entry + text[so_entry..].find("\"bytes\": ").unwrap() + "\"bytes\": ".len();
    let mut damaged = original.clone();
    damaged[bytes_at] = if damaged[bytes_at] == b'9' { b'8' } else { damaged[bytes_at] + 1 };
    std::fs::write(&manifest, &damaged).unwrap();
    refused(&run(&pkg), "flip in the manifest's size of the kernel library", "cpu/libpanguc_kernels.so");
    std::fs::write(&manifest, &original).unwrap();

    // Truncation, deletion.
    for rel in ["weights/layers.001.bin", "cpu/libpanguc_kernels.so"] {
        let path = pkg.join(rel);
        let original = std::fs::read(&path).unwrap();
        std::fs::write(&path, &original[..original.len() - 1]).unwrap();
        refused(&run(&pkg), &format!("truncated {rel}"), rel);
        std::fs::write(&path, &original).unwrap();
    }
    for rel in ["weights/model.bin", "ascend/ascend910b/build.sh"] {
        let path = pkg.join(rel);
        let original = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        refused(&run(&pkg), &format!("deleted {rel}"), rel);
        std::fs::write(&path, &original).unwrap();
    }

    // Files where a loader or the CANN build would pick them up.
    let op_kernel = files.iter().find(|f| f.starts_with("ascend/ascend910b/op_kernel/")).unwrap();
    let op_kernel_dir = Path::new(op_kernel).parent().unwrap().to_str().unwrap().to_string();
    for rel in ["weights/extra.bin".to_string(), "cpu/libextra.so".to_string(), format!("{op_kernel_dir}/extra.cpp")] {
        let path = pkg.join(&rel);
        std::fs::write(&path, b"injected").unwrap();
        refused(&run(&pkg), &format!("added {rel}"), &rel);
        std::fs::remove_file(&path).unwrap();
    }

    // The documented in-place CANN build's products are not tampering.
    let project = pkg.join("ascend/ascend910b");
    std::fs::create_dir_all(project.join("build_out/op_kernel")).unwrap();
    std::fs::write(project.join("build_out/op_kernel/k.o"), b"object").unwrap();
    std::fs::write(project.join("panguc_host"), b"executable").unwrap();
    assert!(run(&pkg).status.success(), "the restored package (plus a CANN build) must run again");
}
