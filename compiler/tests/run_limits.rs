//! Requests that cannot run are refused before generation starts: past the
//! model's context length, or needing more memory than the machine has
//! (simulated with `PANGUC_MEMORY_LIMIT`, which caps the budget that
//! /proc/meminfo and the cgroup limit give).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn panguc(args: &[&str], memory_limit: Option<&str>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_panguc"));
    c.args(args);
    if let Some(m) = memory_limit {
        c.env("PANGUC_MEMORY_LIMIT", m);
    }
    c.output().expect("panguc runs")
}

fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny-pangu")
}

fn refused(o: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected a refusal: {err}");
    assert!(o.stdout.is_empty(), "generated before refusing: {}", String::from_utf8_lossy(&o.stdout));
    assert!(err.starts_with("error: ") && !err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks `{n}`: {err}");
    }
}

fn check_model(model: &Path) {
    let m = model.to_str().unwrap();
    // The tiny model's context is 4096 tokens: 3 + 4093 fit, 3 + 4094 do not.
    refused(
        &panguc(&["run", m, "--tokens", "1,2,3", "--max-new-tokens", "4094"], None),
        &["--max-new-tokens 4094", "max_position_embeddings 4096", "at most 4093 new tokens"],
    );
    refused(
        &panguc(&["run", m, "--tokens", "1,2,3", "--max-new-tokens", &usize::MAX.to_string()], None),
        &["past the model's context length"],
    );
    // A machine with 64 kB to spare cannot hold a 4003-token cache (2 MB;
    // for the interpreter, the 3.7 MB of f32 weights either).
    refused(
        &panguc(&["run", m, "--tokens", "1,2,3", "--max-new-tokens", "4000"], Some("65536")),
        &["needs", "only 65536 bytes", "PANGUC_MEMORY_LIMIT"],
    );
    // Within both limits it runs.
    let o = panguc(&["run", m, "--tokens", "1,2,3", "--max-new-tokens", "2"], Some("100000000000"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn interpreter_run_refuses_requests_past_context_or_memory() {
    check_model(&tiny());
}

#[test]
fn compiled_run_refuses_requests_past_context_or_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let pkg = tmp.path().join("pkg");
    let o = panguc(&["compile", tiny().to_str().unwrap(), "--target", "cpu", "-o", pkg.to_str().unwrap()], None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    check_model(&pkg);
    // The compiled engine's message names its paged KV cache: 4003 tokens
    // are 251 blocks of 16.
    refused(
        &panguc(&["run", pkg.to_str().unwrap(), "--tokens", "1,2,3", "--max-new-tokens", "4000"], Some("65536")),
        &["the KV cache of 251 blocks of 16 tokens", "--kv-cache-mb"],
    );
    // One 103-token sequence's f32 cache (2 layers x K and V x 2 heads x 16
    // = 512 bytes per token; 7 blocks of 16 tokens: 57,344 bytes) fits in
    // 150 kB; by default the one paged cache holds all four sequences at
    // their longest (28 blocks), which does not, and the batch is refused
    // before the engine is made. With --kv-cache-mb 0.1 (12 blocks) it
    // fits, and sequences are preempted and recomputed as blocks run out.
    let four: Vec<&str> = ["--tokens", "1,2,3"].iter().cycle().take(8).copied().collect();
    let mut args = vec!["run", pkg.to_str().unwrap(), "--max-new-tokens", "100"];
    args.extend(&four);
    refused(&panguc(&args, Some("150000")), &["the KV cache of 28 blocks", "--kv-cache-mb"]);
    args.extend(["--kv-cache-mb", "0.1"]);
    let o = panguc(&args, Some("150000"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
