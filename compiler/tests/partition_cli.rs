//! `panguc compile --devices N` through the binary: the 72B config on 8
//! Ascend devices (one CANN project per rank whose host program joins the
//! HCCL communicators and issues the rank's collectives in program order),
//! `--plan auto` following the cost model and the interconnect flags, and
//! the bundled tiny checkpoint compiled for CPU and 910B on 2 devices (ep)
//! and 4 (h2p) and run batched by both multi-rank engines.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn panguc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_panguc")).args(args).output().expect("panguc runs")
}

fn example(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples").join(name).display().to_string()
}

fn ok(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "panguc failed: {err}");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn pangu_72b_on_8_ascend_devices_writes_a_project_per_rank_with_hccl() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("p72");
    let out_s = out.to_str().unwrap();
    ok(&panguc(&["compile", &example("pangu-pro-moe-72b"), "--target", "ascend910b", "--devices", "8", "-o", out_s]));
    // One device cannot hold the model: no single-device project.
    assert!(!out.join("ascend").exists());
    let doc = json(&out.join("partition.json"));
    let report = json(&out.join("report.json"));
    assert_eq!(doc["plan"], "h2p");
    // The manifest lists the ranks (and hashes every rank's files); the
    // partition document holds each rank's weights, buffers and collectives.
    let manifest = json(&out.join("manifest.json"));
    assert_eq!(manifest["ranks"]["devices"], 8);
    assert_eq!(manifest["ranks"]["layout"], "partition.json");
    assert_eq!(manifest["ranks"]["dirs"][7], "ranks/rank7");
    assert!(manifest["files"]["ranks/rank7/ascend/ascend910b/host/panguc_host.cpp"].is_object());
    for r in 0..8 {
        assert!(!doc["ranks"][r]["weights"].as_array().unwrap().is_empty());
        assert!(!doc["ranks"][r]["buffers"].as_array().unwrap().is_empty());
    }
    // Nothing to run on this machine without CPU programs: a clear error.
    let o = panguc(&["run", out_s, "--tokens", "1,2"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.starts_with("error: ") && err.contains("compile it with --target cpu"), "{err}");
    for r in 0..8 {
        let project = out.join(format!("ranks/rank{r}/ascend/ascend910b"));
        for f in ["CMakePresets.json", "build.sh", "op_kernel/CMakeLists.txt"] {
            assert!(project.join(f).is_file(), "rank {r}: {f}");
        }
        // The operator-project skeleton comes from the CANN installation.
        assert!(!project.join("CMakeLists.txt").exists() && !project.join("op_host/CMakeLists.txt").exists());
        panguc_codegen_ascendc::host::check_host_compiles(&project).unwrap();
        if r == 0 {
            // The 72B rank's operator definitions compile and match their kernels.
            panguc_codegen_ascendc::op_host_check::check_op_host_compiles(&project).unwrap();
        }
        let host = std::fs::read_to_string(project.join("host/panguc_host.cpp")).unwrap();
        assert!(host.contains(&format!("constexpr int kRank = {r};")), "rank {r}");
        for call in ["HcclGetRootInfo", "HcclCommInitRootInfo", "HcclReduceScatter(", "HcclAllGather("] {
            assert!(host.contains(call), "rank {r}: {call}");
        }
        // The collective table lists the partition's collectives in program order.
        let colls = doc["ranks"][r]["collectives"].as_array().unwrap();
        let table = host.split("const Coll kColls[] = {").nth(1).unwrap().split("};").next().unwrap();
        let kinds: Vec<&str> = table.lines().filter_map(|l| l.trim().strip_prefix('{')?.split(',').next()).collect();
        let want: Vec<&str> = colls
            .iter()
            .map(|c| match c["hccl"].as_str().unwrap() {
                "HcclReduceScatter" => "kReduceScatter",
                "HcclAllGather" => "kAllGather",
                "HcclAllReduce" => "kAllReduce",
                other => panic!("unexpected {other}"),
            })
            .collect();
        assert_eq!(kinds, want, "rank {r}");
        // Every decoder layer issues its collectives: 48 layers x 4 steps.
        let steps = host.split("const Step kSteps[] = {").nth(1).unwrap().split("};").next().unwrap();
        let num_ops: usize =
            host.split("constexpr int kNumOps = ").nth(1).unwrap().split(';').next().unwrap().parse().unwrap();
        let coll_steps = steps
            .lines()
            .filter_map(|l| l.trim().strip_prefix('{')?.split(',').next()?.parse::<usize>().ok())
            .filter(|op| *op >= num_ops)
            .count();
        assert_eq!(coll_steps, 48 * colls.len(), "rank {r}");
        let device = &report["partition"]["per_device"][r];
        assert!(device["weight_bytes"].as_f64().unwrap() < 24e9, "rank {r}: {device}");
        for k in report["ascend"]["ranks"][r]["ascend910b"]["kernels"].as_array().unwrap() {
            let (used, cap) = (k["ub"][0].as_u64().unwrap(), k["ub"][1].as_u64().unwrap());
            assert!(used <= cap, "rank {r}: {k}");
        }
    }
    let w = &report["partition"]["weight_bytes"];
    assert_eq!(w["union_of_devices"], w["single_device"]);
}

/// `--plan auto` picks the candidate with the lowest estimated decode step
/// (among those that fit), and the links decide it: over HCCS the
/// published h2p layout wins; over a slow, high-latency link the plan
/// with one collective per layer (ep) does.
#[test]
fn plan_auto_follows_the_cost_model_and_the_links() {
    let dir = tempfile::tempdir().unwrap();
    let mut chosen = vec![];
    for extra in [&[][..], &["--link-bandwidth", "2", "--link-latency", "500"][..]] {
        let out = dir.path().join(format!("auto{}", chosen.len()));
        let mut args = vec!["compile", &example("pangu-pro-moe-72b")]
            .into_iter()
            .map(String::from)
            .chain(["--target", "ir", "--devices", "8", "--plan", "auto", "-o"].map(String::from))
            .collect::<Vec<_>>();
        args.push(out.display().to_string());
        args.extend(extra.iter().map(|s| s.to_string()));
        ok(&panguc(&args.iter().map(String::as_str).collect::<Vec<_>>()));
        let p = &json(&out.join("report.json"))["partition"];
        let candidates = p["auto"]["candidates"].as_array().unwrap();
        assert_eq!(candidates.len(), 2, "{p}");
        let best = candidates
            .iter()
            .filter(|c| c["fits_memory"] == true)
            .min_by(|a, b| {
                a["ms_per_decode_step"].as_f64().unwrap().total_cmp(&b["ms_per_decode_step"].as_f64().unwrap())
            })
            .unwrap();
        assert_eq!(p["plan"], best["plan"], "{p}");
        assert_eq!(p["ms_per_decode_step"], best["ms_per_decode_step"]);
        chosen.push(p["plan"].as_str().unwrap().to_string());
    }
    assert_eq!(chosen, ["h2p", "ep"]);

    let bad_out = dir.path().join("bad");
    let tiny = example("tiny-pangu");
    let base = ["compile", tiny.as_str(), "--target", "ir", "-o", bad_out.to_str().unwrap()];
    for (extra, needle) in [
        (&["--devices", "2", "--interconnect", "nvlink"][..], "unknown --interconnect `nvlink` (hccs, pcie)"),
        (&["--devices", "2", "--link-bandwidth", "0"][..], "--link-bandwidth must be a positive number"),
        (&["--link-latency", "5"][..], "need --devices N with N > 1"),
    ] {
        let bad = panguc(&[&base[..], extra].concat());
        let err = String::from_utf8_lossy(&bad.stderr);
        assert!(!bad.status.success() && err.starts_with("error: ") && err.contains(needle), "{extra:?}: {err}");
        assert!(!bad_out.exists(), "{extra:?}: partial output");
    }
}

/// The tiny checkpoint for CPU and 910B on 2 devices: both multi-rank
/// engines (compiled CPU and the AscendC simulation) print the greedy
/// tokens of the single-device reference interpreter; each rank's project
/// has its own weight shards in the device layout.
#[test]
fn tiny_on_two_devices_runs_on_cpu_and_simulated_ascend() {
    let tokens = |o: &Output| -> String { ok(o).lines().last().unwrap_or("").trim().to_string() };
    let want = tokens(&panguc(&["run", &example("tiny-pangu"), "--tokens", "1,2,3,4", "--max-new-tokens", "6"]));
    assert_eq!(want.split(',').count(), 6, "{want}");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t2");
    let out_s = out.to_str().unwrap();
    let args = ["compile", &example("tiny-pangu"), "--target", "cpu,ascend910b", "--devices", "2", "--plan", "ep"];
    ok(&panguc(&[&args[..], &["-o", out_s]].concat()));
    for r in 0..2 {
        let project = out.join(format!("ranks/rank{r}/ascend/ascend910b"));
        panguc_codegen_ascendc::host::check_host_compiles(&project).unwrap();
        let bins = std::fs::read_dir(project.join("weights")).unwrap().count();
        assert!(bins > 10, "rank {r}: {bins} weight files");
    }
    // Rank 1 holds the second half of the experts: its gate-up weight differs.
    let name = "model.layers.0.concat@gateup16.bin";
    let w0 = std::fs::read(out.join("ranks/rank0/ascend/ascend910b/weights").join(name)).unwrap();
    let w1 = std::fs::read(out.join("ranks/rank1/ascend/ascend910b/weights").join(name)).unwrap();
    assert_eq!(w0.len(), w1.len());
    assert_ne!(w0, w1);
    let engines = [&[][..], &["--engine", "ascend-sim"][..]];
    for engine in engines {
        let run = [&["run", out_s, "--tokens", "1,2,3,4", "--max-new-tokens", "6"][..], engine].concat();
        assert_eq!(tokens(&panguc(&run)), want, "{engine:?}");
    }
    // A modified rank file is refused by both engines, naming it.
    let shard = out.join("ranks/rank1/weights/layers.000.bin");
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&shard, bytes).unwrap();
    for engine in engines {
        let run = [&["run", out_s, "--tokens", "1,2", "--max-new-tokens", "2"][..], engine].concat();
        let o = panguc(&run);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.starts_with("error: "), "{engine:?}: {err}");
        assert!(err.contains("ranks/rank1/weights/layers.000.bin") && !err.contains("panicked"), "{err}");
    }
}

/// Three prompts as one `panguc run` (`--max-seqs 2`: the third joins the
/// running batch when a sequence leaves it; a KV cache of 2 blocks of 16
/// tokens while each sequence grows from one block to two: the younger of
/// two running sequences is preempted and recomputed; `--max-batch-tokens 8`: chunked prefill), then
/// each prompt alone: the same greedy tokens, prompt logits within 1e-5
/// relative. Returns the batch's generated tokens.
fn check_cli_mixed_batch(pkg: &str, engine: &[&str], tmp: &Path) -> Vec<Vec<i64>> {
    let prompts =
        ["3,1,4,1,5,9,2,6,5,3,5,8,9,7", "1,2,3,4,5,6,7,8,9,10,11,12", "100,200,300,400,500,9,8,7,6,5,4,3,2,1,0"];
    let what = format!("{pkg} {engine:?}");
    let out = tmp.join("batch.json");
    let mut args = vec!["run", pkg, "--max-new-tokens", "6", "--max-seqs", "2", "--kv-cache-mb", "0.016"];
    args.extend(["--max-batch-tokens", "8", "--logits-out", out.to_str().unwrap()]);
    for p in prompts {
        args.extend(["--tokens", p]);
    }
    args.extend(engine);
    let o = panguc(&args);
    ok(&o);
    let log = String::from_utf8_lossy(&o.stderr);
    let line = log.lines().find(|l| l.starts_with("run: ")).unwrap_or_else(|| panic!("{what}: no run line in {log}"));
    assert!(line.contains("KV cache 2 blocks of 16 tokens"), "{what}: {line}");
    let preemptions: usize = line.rsplit("; ").next().unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!(preemptions > 0, "{what}: no sequence was preempted: {line}");
    let batch = json(&out);
    let seqs = batch["sequences"].as_array().unwrap();
    assert_eq!(seqs.len(), prompts.len());
    let mut generated = vec![];
    for (i, (p, got)) in prompts.iter().zip(seqs).enumerate() {
        let out = tmp.join(format!("alone{i}.json"));
        let args =
            [&["run", pkg, "--tokens", p, "--max-new-tokens", "6", "--logits-out", out.to_str().unwrap()][..], engine];
        ok(&panguc(&args.concat()));
        let want = json(&out);
        assert_eq!(got["generated"], want["generated"], "{what} prompt {i}: tokens in the batch vs alone");
        assert_eq!(got["generated"].as_array().unwrap().len(), 6, "{what} prompt {i}");
        let rows = |v: &serde_json::Value| -> Vec<Vec<f64>> { serde_json::from_value(v["logits"].clone()).unwrap() };
        let (g, w) = (rows(got), rows(&want));
        assert_eq!(g.len(), p.split(',').count(), "{what} prompt {i}: one logits row per prompt token");
        for (r, (x, y)) in g.iter().zip(&w).enumerate() {
            for (a, b) in x.iter().zip(y) {
                let rel = (a - b).abs() / a.abs().max(b.abs()).max(1e-3);
                assert!(rel <= 1e-5, "{what} prompt {i} row {r}: {a} vs {b}");
            }
        }
        generated.push(serde_json::from_value(got["generated"].clone()).unwrap());
    }
    generated
}

/// A package for CPU and 910B: partitioned over 2 devices (plan ep) and
/// over 4 (plan h2p: attention split by heads, each rank's paged caches
/// holding one of the two KV heads), both multi-rank engines running the
/// rank programs batched, and on one device (the AscendC simulation runs
/// the package's batched program): the mixed batch through the CLI on
/// each, every engine giving the same tokens.
#[test]
fn cli_mixed_batch_on_partitioned_and_ascend_packages() {
    let dir = tempfile::tempdir().unwrap();
    let two = dir.path().join("two");
    let four = dir.path().join("four");
    let one = dir.path().join("one");
    let compile = ["compile", &example("tiny-pangu"), "--target", "cpu,ascend910b"];
    ok(&panguc(&[&compile[..], &["--devices", "2", "--plan", "ep", "-o", two.to_str().unwrap()]].concat()));
    ok(&panguc(&[&compile[..], &["--devices", "4", "--plan", "h2p", "-o", four.to_str().unwrap()]].concat()));
    ok(&panguc(&[&compile[..], &["-o", one.to_str().unwrap()]].concat()));
    for (pkg, devices) in [(&two, 2), (&four, 4)] {
        let doc = json(&pkg.join("partition.json"));
        for r in 0..devices {
            // The CPU rank program, the partitioned IR, partition.json and
            // the rank's CANN project all come from the batched program.
            let program = std::fs::read_to_string(pkg.join(format!("ranks/rank{r}/ir/kernel_program.txt"))).unwrap();
            assert!(program.contains("paged_attention"), "{devices} ranks, rank {r}: the rank programs are batched");
            let ir = std::fs::read_to_string(pkg.join(format!("ranks/rank{r}/ir/partitioned.txt"))).unwrap();
            assert!(ir.contains("paged_attention(") && !ir.contains("flash_attention("), "{devices} ranks, rank {r}");
            let kv_heads = if devices == 4 { 1 } else { 2 };
            let buffer = &doc["ranks"][r]["buffers"][0];
            assert_eq!(buffer["type"], format!("f32[num_blocks,16,{kv_heads},16]"), "{devices} ranks, rank {r}");
            assert_eq!(doc["ranks"][r]["inputs"][4]["name"], "block_table");
            let kernels = std::fs::read_dir(pkg.join(format!("ranks/rank{r}/ascend/ascend910b/op_kernel"))).unwrap();
            let names: Vec<String> = kernels.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
            assert!(names.iter().any(|n| n.contains("paged_attention")), "{devices} ranks, rank {r}: {names:?}");
        }
    }
    let reference = check_cli_mixed_batch(one.to_str().unwrap(), &[], dir.path());
    let runs: [(&Path, &[&str]); 5] = [
        (&two, &[]),
        (&two, &["--engine", "ascend-sim"]),
        (&four, &[]),
        (&four, &["--engine", "ascend-sim"]),
        (&one, &["--engine", "ascend-sim"]),
    ];
    for (pkg, engine) in runs {
        let got = check_cli_mixed_batch(pkg.to_str().unwrap(), engine, dir.path());
        assert_eq!(got, reference, "{} {engine:?}: the single-device CPU package's tokens", pkg.display());
    }
}
