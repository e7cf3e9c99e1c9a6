//! The `panguc` binary end to end: the happy path and bad input.

use std::path::PathBuf;
use std::process::{Command, Output};

fn panguc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_panguc")).args(args).output().expect("panguc runs")
}

fn example(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples").join(name).display().to_string()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A failure: non-zero exit, one `error:` line naming what was wrong, no panic.
fn assert_clean_failure(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure, stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(err.starts_with("error: "), "{err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks `{n}`: {err}");
    }
}

#[test]
fn inspect_72b_prints_published_parameter_counts() {
    let o = panguc(&["inspect", &example("pangu-pro-moe-72b"), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["total_params"], 71_988_781_056u64);
    assert_eq!(v["active_params"], 16_498_139_136u64);
    assert_eq!(v["hidden_size"], 5120);
}

#[test]
fn run_tiny_writes_logits_and_greedy_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("l.json");
    let o = panguc(&[
        "run",
        &example("tiny-pangu"),
        "--tokens",
        "1,2,3,4",
        "--max-new-tokens",
        "8",
        "--logits-out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(v["tokens"], serde_json::json!([1, 2, 3, 4]));
    let logits = v["logits"].as_array().unwrap();
    assert_eq!(logits.len(), 4);
    assert!(logits.iter().all(|r| r.as_array().unwrap().len() == 512));
    let generated: Vec<i64> = v["generated"].as_array().unwrap().iter().map(|t| t.as_i64().unwrap()).collect();
    assert_eq!(generated.len(), 8);
    // The first generated token is the argmax of the last prompt position.
    let last: Vec<f64> = logits[3].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    let argmax = (0..last.len()).fold(0, |b, i| if last[i] > last[b] { i } else { b });
    assert_eq!(generated[0], argmax as i64);
    let printed = String::from_utf8_lossy(&o.stdout);
    let want = generated.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
    assert!(printed.contains(&want), "stdout {printed} lacks {want}");
}

#[test]
fn run_rejects_out_of_vocab_and_empty_prompts() {
    let o = panguc(&["run", &example("tiny-pangu"), "--tokens", "1,512"]);
    assert_clean_failure(&o, &["token 512", "vocab_size 512"]);
    let o = panguc(&["run", &example("tiny-pangu"), "--tokens", ""]);
    assert!(!o.status.success());
    assert!(!stderr(&o).contains("panicked"));
}

#[test]
fn run_rejects_config_only_checkpoint_and_missing_dir() {
    let o = panguc(&["run", &example("pangu-pro-moe-72b"), "--tokens", "1"]);
    assert_clean_failure(&o, &["no weight files"]);
    let o = panguc(&["run", "/nonexistent/model", "--tokens", "1"]);
    assert_clean_failure(&o, &["/nonexistent/model"]);
}

#[test]
fn compile_rejects_unknown_target() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pkg");
    let o = panguc(&["compile", &example("tiny-pangu"), "--target", "gpu", "-o", out.to_str().unwrap()]);
    assert_clean_failure(&o, &["unknown target `gpu`"]);
    assert!(!out.exists(), "no partial output");
}

#[test]
fn dump_ir_prints_parseable_import() {
    let o = panguc(&["dump-ir", &example("tiny-pangu")]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(panguc_ir::text::parse_module(&text).is_ok());
    let o = panguc(&["dump-ir", &example("tiny-pangu"), "--stage", "bogus"]);
    assert_clean_failure(&o, &["unknown --stage `bogus`"]);
}

/// Generated tokens and prompt logits of one sequence in a --logits-out file.
fn sequence(v: &serde_json::Value) -> (Vec<i64>, Vec<Vec<f64>>) {
    let generated = v["generated"].as_array().unwrap().iter().map(|t| t.as_i64().unwrap()).collect();
    let logits = v["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect())
        .collect();
    (generated, logits)
}

/// The preemption count in the run log.
fn preemptions(stderr: &str) -> usize {
    let line = stderr.lines().find(|l| l.starts_with("run: ")).unwrap_or_else(|| panic!("no run log: {stderr}"));
    let before = line.rsplit_once(" preemptions").unwrap_or_else(|| panic!("{line}")).0;
    before.rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn run_batches_repeated_tokens_and_a_prompts_file_like_single_runs() {
    let dir = tempfile::tempdir().unwrap();
    let prompts: [&[i64]; 5] = [&[1, 2, 3, 4], &[7, 8], &[5, 6, 7, 8, 9, 10, 11], &[300], &[42, 42, 42]];
    let jsonl = dir.path().join("more.jsonl");
    let lines: Vec<String> = prompts[2..].iter().map(|p| serde_json::json!({ "tokens": p }).to_string()).collect();
    std::fs::write(&jsonl, format!("{}\n\n{}\n", lines[..2].join("\n"), lines[2])).unwrap();
    let ids = |p: &[i64]| p.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
    let tiny = example("tiny-pangu");
    let common = ["--max-new-tokens", "6", "--block-size", "2", "--max-batch-tokens", "5"];

    // Each prompt alone (default limits: one chunk, no preemption).
    let singles: Vec<serde_json::Value> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let single = dir.path().join(format!("single{i}.json"));
            let t = ids(p);
            let o = panguc(&[
                "run",
                &tiny,
                "--tokens",
                &t,
                "--max-new-tokens",
                "6",
                "--logits-out",
                single.to_str().unwrap(),
            ]);
            assert!(o.status.success(), "{}", stderr(&o));
            serde_json::from_str(&std::fs::read_to_string(&single).unwrap()).unwrap()
        })
        .collect();

    // 10 blocks of 2 tokens at 512 bytes a token (tiny: 2 layers x K,V x
    // 1 head x 32 x f32) for ~40 tokens of context: preemption is certain.
    // interp: one session per sequence; interp-paged: one call per step.
    for engine in ["interp", "interp-paged"] {
        let out = dir.path().join(format!("batch-{engine}.json"));
        let (a, b) = (ids(prompts[0]), ids(prompts[1]));
        let mut args = vec!["run", &tiny, "--tokens", &a, "--tokens", &b, "--prompts", jsonl.to_str().unwrap()];
        args.extend(common);
        args.extend(["--kv-cache-mb", "0.009765625", "--logits-out", out.to_str().unwrap(), "--engine", engine]);
        let o = panguc(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(preemptions(&stderr(&o)) > 0, "{engine}: {}", stderr(&o));
        assert!(stderr(&o).contains("KV cache 10 blocks of 2 tokens"), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        let seqs = v["sequences"].as_array().unwrap();
        assert_eq!(seqs.len(), prompts.len());
        let printed: Vec<String> = String::from_utf8_lossy(&o.stdout).lines().map(str::to_string).collect();
        assert_eq!(printed.len(), prompts.len());
        for (i, (p, want)) in prompts.iter().zip(&singles).enumerate() {
            assert_eq!(seqs[i]["tokens"], want["tokens"], "prompt order");
            let ((got_tokens, got_logits), (want_tokens, want_logits)) = (sequence(&seqs[i]), sequence(want));
            assert_eq!(got_tokens, want_tokens, "{engine} sequence {i}: tokens differ from running it alone");
            assert_eq!(printed[i], ids(&got_tokens));
            assert_eq!(got_logits.len(), p.len());
            for (r, (x, y)) in got_logits.iter().zip(&want_logits).enumerate() {
                for (a, b) in x.iter().zip(y) {
                    let rel = (a - b).abs() / a.abs().max(b.abs()).max(1e-3);
                    assert!(rel <= 1e-5, "{engine} sequence {i} row {r}: {a} vs {b}");
                }
            }
        }
    }
}

#[test]
fn run_rejects_bad_prompts_files_and_batch_limits() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = example("tiny-pangu");
    let file = dir.path().join("p.jsonl");
    let f = file.to_str().unwrap();
    let cases: [(&str, &[&str]); 4] = [
        ("{\"tokens\": [1, 2]}\n{\"tokens\": [1, \"x\"]}\n", &["p.jsonl line 2", "tokens"]),
        ("{\"tokens\": [1]}\n{\"tokens\": [1]}\n{\"tokens\": [3, 512]}\n", &["p.jsonl line 3", "token 512"]),
        ("{\"token\": [1]}\n", &["p.jsonl line 1", "unknown field"]),
        ("{\"tokens\": []}\n", &["p.jsonl line 1", "empty"]),
    ];
    for (text, needles) in cases {
        std::fs::write(&file, text).unwrap();
        assert_clean_failure(&panguc(&["run", &tiny, "--prompts", f]), needles);
    }
    assert_clean_failure(&panguc(&["run", &tiny]), &["--tokens", "--prompts"]);
    let o = panguc(&["run", &tiny, "--tokens", "1,2", "--tokens", "3,512"]);
    assert_clean_failure(&o, &["--tokens #2", "token 512"]);
    // One block of 2 tokens cannot hold a 4-token prompt.
    let o = panguc(&["run", &tiny, "--tokens", "1,2,3,4", "--block-size", "2", "--kv-cache-mb", "0.001"]);
    assert_clean_failure(&o, &["prompt 1", "KV blocks", "holds only 1"]);
    for flag in ["--max-seqs", "--block-size", "--max-batch-tokens"] {
        assert_clean_failure(&panguc(&["run", &tiny, "--tokens", "1", flag, "0"]), &[flag]);
    }
    assert_clean_failure(&panguc(&["run", &tiny, "--tokens", "1", "--kv-cache-mb", "0"]), &["--kv-cache-mb"]);
}

#[test]
fn dump_ir_dot_draws_the_decoder_layer_and_the_launch_graph() {
    let dot = |args: &[&str]| {
        let mut all = vec!["dump-ir", "--config-only"];
        all.extend_from_slice(args);
        let ex = example("tiny-pangu");
        all.insert(1, &ex);
        let o = panguc(&all);
        assert!(o.status.success(), "{}", stderr(&o));
        String::from_utf8(o.stdout).unwrap()
    };
    let imported = dot(&["--dot"]);
    assert!(imported.starts_with("// @decoder_layer: 76 kernels per call\ndigraph {"), "{imported}");
    assert_eq!(imported.matches("fillcolor=lightblue").count(), 76);
    let fused = dot(&["--stage", "fused", "--dot"]);
    assert!(fused.starts_with("// @decoder_layer: 7 kernels per call\n"), "{fused}");
    assert_eq!(fused.matches("fillcolor=lightblue").count(), 7);
    for op in ["rms_norm", "flash_attention", "add_rms_norm"] {
        assert!(fused.contains(&format!("label = \"{op}\"")), "fused layer lacks {op}: {fused}");
    }
    let launches = dot(&["--stage", "kernels", "--dot"]);
    assert!(launches.contains("launches\ndigraph {") && launches.contains(" -> "), "{launches}");

    let o = panguc(&["dump-ir", &example("tiny-pangu"), "--config-only", "--dot", "--function", "nope"]);
    assert_clean_failure(&o, &["no function @nope", "decoder_layer"]);
}
