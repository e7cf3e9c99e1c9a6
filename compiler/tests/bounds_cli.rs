//! Absurd sizes through the `panguc` binary: every config bound is a clean
//! error naming config.json and the key from `inspect`, `compile` and `run`
//! (never an abort, an OOM kill or a wrapped number).

use panguc_ir::config::DIMENSION_LIMITS;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn panguc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_panguc")).args(args).output().expect("panguc runs")
}

fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples").join(name)
}

/// A failure: non-zero exit, one `error:` message with every needle, no panic.
fn assert_clean_failure(o: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected failure, stderr: {err}");
    assert!(!err.contains("panicked") && !err.contains("memory allocation"), "abort: {err}");
    assert!(err.starts_with("error: "), "{err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks `{n}`: {err}");
    }
}

/// A config-only checkpoint in `dir`: the real 72B config with `key` = `value`.
fn patched_checkpoint(dir: &Path, key: &str, value: Value) -> PathBuf {
    let text = std::fs::read_to_string(example("pangu-pro-moe-72b").join("config.json")).unwrap();
    let mut v: Value = serde_json::from_str(&text).unwrap();
    v[key] = value;
    let ck = dir.join(format!("ck-{key}"));
    std::fs::create_dir_all(&ck).unwrap();
    std::fs::write(ck.join("config.json"), v.to_string()).unwrap();
    ck
}

#[test]
fn inspect_rejects_every_bound_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    for limit in DIMENSION_LIMITS {
        let ck = patched_checkpoint(tmp.path(), limit.key, serde_json::json!(limit.max as u64 + 1));
        let o = panguc(&["inspect", ck.to_str().unwrap(), "--json"]);
        assert_clean_failure(&o, &["config.json", &format!("`{}`", limit.key), "limit"]);
        assert!(o.stdout.is_empty(), "{}: partial output", limit.key);
    }
}

#[test]
fn issue_examples_are_clean_errors_from_every_command() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        ("num_hidden_layers", serde_json::json!(100_000_000u64)),
        ("num_experts", serde_json::json!(4_294_967_296u64)),
        // Would wrap the u64 parameter count if multiplied unchecked.
        ("moe_intermediate_size", serde_json::json!(1u64 << 40)),
        // Within every per-key bound, but 2^18-wide experts of a 64000-wide
        // model are far beyond the total parameter limit.
        ("hidden_size", serde_json::json!(64_000)),
    ];
    for (key, value) in cases {
        let ck = patched_checkpoint(tmp.path(), key, value);
        if key == "hidden_size" {
            let path = ck.join("config.json");
            let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            v["moe_intermediate_size"] = serde_json::json!(1 << 18);
            std::fs::write(&path, v.to_string()).unwrap();
        }
        let blamed = if key == "hidden_size" { "num_experts" } else { key };
        let ck = ck.to_str().unwrap();
        let out = tmp.path().join(format!("out-{key}"));
        for args in [
            vec!["inspect", ck],
            vec!["compile", ck, "--target", "ir,ascend910b", "-o", out.to_str().unwrap()],
            vec!["run", ck, "--tokens", "1,2"],
        ] {
            let o = panguc(&args);
            assert_clean_failure(&o, &["config.json", &format!("`{blamed}`")]);
        }
        assert!(!out.exists(), "{key}: compile left an output behind");
    }
}
