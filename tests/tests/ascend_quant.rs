//! Quantized (msModelSlim W8A8_DYNAMIC) checkpoints on the AscendC backend
//! (issue 11, item 8 on ascend-sim): the bundled tiny model quantized as
//! `panguc quantize --scheme w8a8-dynamic` does, imported with the paged
//! KV layout, fused and scheduled like the CPU package, emitted for each
//! target and run under the CPU simulation of AscendC as one batch through
//! the scheduler (mixed prompt lengths, chunked prefill, sequences ending
//! at different steps). The int8 sums are exact on both sides, so with f32
//! activations (910B build) the greedy tokens must equal the paged
//! reference interpreter's and the prompt logits agree to float rounding;
//! the f16 build (310P) is held to the activation dtype's tolerance.

mod common;

use common::*;
use panguc::frontend::Checkpoint;
use panguc::quantize::{write_quantized, QuantizeOptions, Scheme};
use panguc_codegen_ascendc::engine::AscendSimEngine;
use panguc_codegen_ascendc::target::{DevType, Target};
use panguc_ir::kernel::PreparedWeight;
use panguc_runtime::{BatchEngine, Generation, Scheduler, SchedulerConfig};

const BLOCK: usize = 4;
const BLOCKS: usize = 24;

fn run_batch(engine: &mut dyn BatchEngine) -> Vec<Generation> {
    let cfg = SchedulerConfig { block_size: BLOCK, num_blocks: BLOCKS, max_seqs: 4, max_batch_tokens: 8 };
    Scheduler::run_all(cfg, mixed::four_prompts(), engine).unwrap_or_else(|e| panic!("{e:#}"))
}

fn calibration() -> Vec<Vec<i64>> {
    vec![(1..40).map(|i| (i * 37) % 256).collect(), (3..30).map(|i| (i * 11 + 5) % 256).collect()]
}

#[test]
fn w8a8_dynamic_tiny_model_on_ascend_sim_matches_the_interpreter() {
    let tmp = tempfile::tempdir().unwrap();
    let q = tmp.path().join("w8a8_dynamic");
    let opts =
        QuantizeOptions { scheme: Scheme::W8A8Dynamic, kv_int8: false, calib: calibration(), smooth_alpha: None };
    write_quantized(&checkpoint(), &q, &opts).unwrap();
    let ckpt = Checkpoint::open(&q).unwrap();
    let cfg = ckpt.config().clone();
    let imported = panguc::commands::import_with(&ckpt, panguc::import::KvLayout::Paged { block_size: BLOCK }).unwrap();

    // The reference: the paged interpreter on the imported (unfused) module.
    let want = {
        let interp = panguc_ir::interp::Interpreter::new(&imported, &ckpt);
        let mut s = panguc_ir::session::BatchInterpSession::new(
            interp,
            cfg.num_hidden_layers,
            BLOCKS,
            BLOCK,
            [cfg.num_key_value_heads, cfg.head_dim()],
        );
        run_batch(&mut s)
    };

    let fused = panguc::pipeline::fuse_batched(&ckpt, &imported, &Default::default()).expect("fusion");
    let program = panguc_lowering::schedule::schedule(&fused, &Default::default()).expect("schedule");
    let kinds: Vec<&str> = program.kernels.iter().map(|k| k.kind.mnemonic()).collect();
    for fused_kind in ["rms_norm_quant", "dyn_quant_matmul", "moe_gate_up_quant", "moe_down_quant"] {
        assert!(kinds.contains(&fused_kind), "the W8A8_DYNAMIC program has {fused_kind}: {kinds:?}");
    }
    let provider = |w: &PreparedWeight| panguc::package_build::prepared_bytes(&ckpt, w);
    // Tolerances relative to the largest logit: f32 as the CPU baseline tier
    // (`cpu_quant.rs`: a last-bit difference can move one requantized int8
    // step), f16 as the float model on the same simulated targets
    // (`ascend_batched.rs`).
    for (target, act, tol) in [(Target::Ascend910B, DevType::F32, 1e-3f32), (Target::Ascend310P, DevType::F16, 0.02)] {
        let mut engine = AscendSimEngine::new(program.clone(), target, act, &provider, BLOCKS)
            .unwrap_or_else(|e| panic!("{target}: {e:#}"));
        let got = run_batch(&mut engine);
        let mut worst = 0f32;
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let what = format!("{target} {act} sequence {i}");
            if act == DevType::F32 {
                assert_eq!(g.generated, w.generated, "{what}: greedy tokens vs the interpreter");
            }
            assert_eq!(g.prompt_logits.len(), w.prompt_logits.len(), "{what}");
            for (x, y) in g.prompt_logits.iter().zip(&w.prompt_logits) {
                let scale = y.iter().fold(0f32, |m, v| m.max(v.abs())).max(1.0);
                let diff = x.iter().zip(y).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                worst = worst.max(diff / scale);
            }
        }
        eprintln!("{target} {act}: worst max|diff|/max|logit| over the prompt rows = {worst:e} (tolerance {tol:e})");
        assert!(worst <= tol, "{target} {act}: prompt logits {worst} from the interpreter's (limit {tol})");
    }
}
