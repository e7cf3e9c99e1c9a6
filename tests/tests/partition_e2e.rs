//! End to end through the compiler's pipeline: the bundled tiny checkpoint
//! fused, partitioned for 2/4/8 devices (ep and h2p), run as N ranks in one
//! process by the one-sequence multi-rank interpreter: the same greedy
//! tokens and logits (1e-5 relative) as one device. And the real 72B config
//! for 8 devices as `panguc compile` partitions it: per-rank batched
//! programs, their collectives in program order, and the per-device report
//! priced from those programs.

use panguc::frontend::Checkpoint;
use panguc::partition_build::{partition, write_rank_programs, PartitionOptions};
use panguc_ir::interp::Interpreter;
use panguc_ir::multirank::MultiRankSession;
use panguc_ir::session::InterpSession;
use panguc_ir::DType;
use panguc_lowering::builtin_profiles;
use panguc_lowering::fuse::FuseOptions;
use panguc_lowering::partition::{partition_module, Dims, Layout, PlanChoice};
use panguc_runtime::{generate, Sampling};
use std::path::Path;

fn examples(dir: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples").join(dir)
}

fn opts(devices: usize, plan: PlanChoice, profile: &str) -> PartitionOptions {
    let profile = builtin_profiles().into_iter().find(|p| p.name == profile).unwrap();
    PartitionOptions { devices, plan, plan_by_cost: false, profile, link: None, context: 2048 }
}

#[test]
fn tiny_checkpoint_generates_the_same_tokens_on_n_devices() {
    let ckpt = Checkpoint::open(&examples("tiny-pangu")).unwrap();
    let cfg = ckpt.config().clone();
    let imported = panguc::commands::import(&ckpt).unwrap();
    let fused = panguc::pipeline::run_pipeline(&ckpt, &imported, 0.0, &Default::default()).unwrap().module;
    let prompt = [1i64, 2, 3, 4];
    let greedy = Sampling::default();
    let mut single = InterpSession::new(
        Interpreter::new(&fused, &ckpt),
        cfg.num_hidden_layers,
        [cfg.num_key_value_heads, cfg.head_dim()],
    );
    let want = generate(&mut single, &prompt, 8, &greedy, None).unwrap();
    for plan in [PlanChoice::Ep, PlanChoice::H2p] {
        for n in [2, 4, 8] {
            let layout = Layout::new(Dims::from_config(&cfg), n, plan).unwrap();
            let parts = partition_module(&fused, "decoder_layer", &layout, &FuseOptions::default()).unwrap();
            let modules: Vec<_> = parts.ranks.iter().map(|r| r.module.clone()).collect();
            let mut s = MultiRankSession::new(&modules, &ckpt).unwrap();
            let got = generate(&mut s, &prompt, 8, &greedy, None).unwrap();
            assert_eq!(got.generated, want.generated, "{plan:?} N={n}");
            for (g, w) in got.prompt_logits.iter().zip(&want.prompt_logits) {
                let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
                let diff = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(diff / scale < 1e-5, "{plan:?} N={n}: {}", diff / scale);
            }
        }
    }
}

#[test]
fn pangu_72b_for_8_ascend_devices_writes_rank_programs_with_hccl() {
    let ckpt = Checkpoint::open(&examples("pangu-pro-moe-72b")).unwrap();
    let cfg = ckpt.config().clone();
    let batched = panguc::commands::batched_cpu_module(&ckpt, &Default::default()).unwrap();
    let out =
        partition(&cfg, &batched, "decoder_layer", &opts(8, PlanChoice::Auto, "ascend910b1"), &FuseOptions::default())
            .unwrap();
    eprintln!("{}", out.summary);
    assert_eq!(out.report["plan"], "h2p");
    assert_eq!(out.report["program"], "batched");
    assert_eq!(out.report["block_size"], panguc::commands::CPU_BLOCK_SIZE);
    let dir = tempfile::tempdir().unwrap();
    write_rank_programs(dir.path(), &out.parts, DType::BF16, &[panguc_codegen_ascendc::Target::Ascend910B]).unwrap();
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("partition.json")).unwrap()).unwrap();
    assert_eq!(doc["ranks"].as_array().unwrap().len(), 8);
    for r in 0..8 {
        assert!(dir.path().join(format!("ranks/rank{r}/ir/partitioned.txt")).is_file());
        let rank = &doc["ranks"][r];
        // The host program itself is written by the Ascend backend (see
        // compiler/tests/partition_ascend.rs).
        assert_eq!(rank["ascend_host"]["ascend910b"], format!("ranks/rank{r}/ascend/ascend910b/host/panguc_host.cpp"));
        let calls: Vec<&str> =
            rank["collectives"].as_array().unwrap().iter().map(|c| c["hccl"].as_str().unwrap()).collect();
        assert_eq!(calls, ["HcclReduceScatter", "HcclAllGather", "HcclReduceScatter", "HcclAllGather"], "rank {r}");
        assert_eq!(rank["collectives"].as_array().unwrap().len(), 4);
        // 48 layers' K and V caches, paged, each rank holding its KV heads
        // (8 KV heads over attention TP4: two).
        let buffers = rank["buffers"].as_array().unwrap();
        assert_eq!(buffers.len(), 2 * 48);
        assert_eq!(buffers[0]["type"], "f32[num_blocks,16,2,128]", "rank {r}");
        let inputs: Vec<&str> =
            rank["inputs"].as_array().unwrap().iter().map(|i| i["name"].as_str().unwrap()).collect();
        assert_eq!(inputs, ["ids", "positions", "query_start_loc", "context_lens", "block_table", "slot_mapping"]);
        // The report prices these programs: the rank's weights, and its
        // paged caches of two KV heads (48 layers x K and V x 2 heads x 128
        // x 2048 positions at the 910B's 2-byte activations).
        let d = &out.report["per_device"][r];
        let w = d["weight_bytes"].as_f64().unwrap();
        assert!(w < 24e9, "rank {r}: {w}");
        assert_eq!(d["kv_cache_bytes"].as_f64().unwrap(), 48.0 * 2.0 * 2.0 * 128.0 * 2048.0 * 2.0, "rank {r}");
        assert_eq!(d["collectives_per_step"], 48 * 4, "rank {r}");
        // Batch 64 reads the same weights' shards as batch 1 plus more
        // experts, in one step much shorter than 64 batch-1 steps.
        let b = d["decode_batches"].as_array().unwrap();
        assert_eq!((b[0]["batch"].as_u64(), b[1]["batch"].as_u64()), (Some(1), Some(64)), "rank {r}");
        let (t1, t64) = (b[0]["ms_per_step"].as_f64().unwrap(), b[1]["ms_per_step"].as_f64().unwrap());
        assert_eq!(t1, d["ms_per_decode_step"].as_f64().unwrap(), "rank {r}");
        assert!(t64 > t1 && t64 < 8.0 * t1, "rank {r}: batch 64 {t64} ms vs batch 1 {t1} ms");
        let (kv1, kv64) = (b[0]["kv_bytes_read"].as_f64().unwrap(), b[1]["kv_bytes_read"].as_f64().unwrap());
        assert!((kv64 / kv1 - 64.0).abs() < 0.1, "rank {r}: KV bytes {kv1} at batch 1, {kv64} at batch 64");
    }
    let batches = out.report["decode_batches"].as_array().unwrap();
    assert!(batches[1]["tokens_per_s"].as_f64().unwrap() > 8.0 * batches[0]["tokens_per_s"].as_f64().unwrap());
    assert_eq!(out.report["weight_bytes"]["union_of_devices"], out.report["weight_bytes"]["single_device"]);
    // An invalid device count is a clear error.
    let err =
        partition(&cfg, &batched, "decoder_layer", &opts(3, PlanChoice::Ep, "ascend910b1"), &FuseOptions::default())
            .err()
            .unwrap()
            .to_string();
    assert!(err.contains("does not divide the model's 8 expert groups"), "{err}");
}
