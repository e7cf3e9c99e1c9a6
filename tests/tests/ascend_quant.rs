//! Quantized (msModelSlim W8A8_DYNAMIC and static W8A8) checkpoints on the
//! AscendC backend (issue 11, item 8 on ascend-sim): the bundled tiny model
//! quantized as `panguc quantize --scheme w8a8-dynamic|w8a8 [--kv-int8]`
//! does, imported with the paged KV layout, fused and scheduled like the CPU package, emitted for each
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
use panguc_ir::kernel::{KernelProgram, PreparedWeight};
use panguc_ir::Module;
use panguc_runtime::{BatchEngine, Generation, Request, Scheduler, SchedulerConfig};

const BLOCK: usize = 4;
const BLOCKS: usize = 24;

fn run_batch(engine: &mut dyn BatchEngine, requests: Vec<Request>) -> Vec<Generation> {
    let cfg = SchedulerConfig { block_size: BLOCK, num_blocks: BLOCKS, max_seqs: 4, max_batch_tokens: 8 };
    Scheduler::run_all(cfg, requests, engine).unwrap_or_else(|e| panic!("{e:#}"))
}

fn calibration() -> Vec<Vec<i64>> {
    vec![(1..40).map(|i| (i * 37) % 256).collect(), (3..30).map(|i| (i * 11 + 5) % 256).collect()]
}

/// `float` quantized into `dir` with `opts`: the checkpoint, its paged
/// import and the fused, scheduled kernel program.
fn scheduled(float: &Checkpoint, dir: &std::path::Path, opts: &QuantizeOptions) -> (Checkpoint, Module, KernelProgram) {
    let q = dir.join("quantized");
    write_quantized(float, &q, opts).unwrap();
    let ckpt = Checkpoint::open(&q).unwrap();
    let imported = panguc::commands::import_with(&ckpt, panguc::import::KvLayout::Paged { block_size: BLOCK }).unwrap();
    let fused_module = panguc::pipeline::fuse_batched(&ckpt, &imported, &Default::default()).expect("fusion");
    let program = panguc_lowering::schedule::schedule(&fused_module, &Default::default()).expect("schedule");
    (ckpt, imported, program)
}

/// One quantized model on ascend-sim against the paged interpreter: `runs`
/// gives each target, activation dtype and logit tolerance (relative to the
/// largest logit); with f32 activations the greedy tokens must be equal.
/// `fused` are kinds the scheduled program must contain.
fn check_on_ascend_sim(
    opts: &QuantizeOptions,
    requests: Vec<Request>,
    fused: &[&str],
    runs: &[(Target, DevType, f32)],
) {
    let tmp = tempfile::tempdir().unwrap();
    let (ckpt, imported, program) = scheduled(&checkpoint(), tmp.path(), opts);
    let cfg = ckpt.config().clone();

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
        run_batch(&mut s, requests.clone())
    };

    let kinds: Vec<&str> = program.kernels.iter().map(|k| k.kind.mnemonic()).collect();
    for fused_kind in fused {
        assert!(kinds.contains(fused_kind), "the {:?} program has {fused_kind}: {kinds:?}", opts.scheme);
    }
    let provider = |w: &PreparedWeight| panguc::package_build::prepared_bytes(&ckpt, w);
    for &(target, act, tol) in runs {
        let mut engine = AscendSimEngine::new(program.clone(), target, act, &provider, BLOCKS)
            .unwrap_or_else(|e| panic!("{target}: {e:#}"));
        let got = run_batch(&mut engine, requests.clone());
        let mut worst = 0f32;
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let what = format!("{:?} kv_int8={} {target} {act} sequence {i}", opts.scheme, opts.kv_int8);
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
        eprintln!(
            "{:?} kv_int8={} {target} {act}: worst max|diff|/max|logit| over the prompt rows = {worst:e} (tolerance {tol:e})",
            opts.scheme, opts.kv_int8
        );
        assert!(worst <= tol, "{target} {act}: prompt logits {worst} from the interpreter's (limit {tol})");
    }
}

// Tolerances relative to the largest logit: f32 as the CPU baseline tier
// (`cpu_quant.rs`: a last-bit difference can move one requantized int8
// step), f16 as the float model on the same simulated targets
// (`ascend_batched.rs`).
const F32_910B: (Target, DevType, f32) = (Target::Ascend910B, DevType::F32, 1e-3);
const F16_310P: (Target, DevType, f32) = (Target::Ascend310P, DevType::F16, 0.02);

#[test]
fn w8a8_dynamic_tiny_model_on_ascend_sim_matches_the_interpreter() {
    let opts =
        QuantizeOptions { scheme: Scheme::W8A8Dynamic, kv_int8: false, calib: calibration(), smooth_alpha: None };
    let fused = ["rms_norm_quant", "dyn_quant_matmul", "moe_gate_up_quant", "moe_down_quant"];
    check_on_ascend_sim(&opts, mixed::four_prompts(), &fused, &[F32_910B, F16_310P]);
}

/// Static W8A8 (per-tensor activation scale and offset, `quant_bias` and
/// `deq_scale`): the fused static kinds, the float paged `kv_cache_write`
/// and the residual-summing `moe_combine` on the AscendC kernels. Three of
/// the four prompts keep the run short.
#[test]
fn static_w8a8_tiny_model_on_ascend_sim_matches_the_interpreter() {
    let fused = ["static_quant_matmul", "moe_gate_up_static", "quant_gate_up_static", "moe_down_static"];
    let opts = QuantizeOptions { scheme: Scheme::W8A8, kv_int8: false, calib: calibration(), smooth_alpha: None };
    check_on_ascend_sim(&opts, mixed::four_prompts()[..3].to_vec(), &fused, &[F32_910B, F16_310P]);
}

/// Static W8A8 with the int8 (C8) KV cache: q/k/v roped and quantized into
/// the int8 caches in one launch (`qkv_rope_cache_write_quant`) and read
/// back through `paged_attention_int8` (the tiny model's 16-byte int8 heads
/// move as whole slot rows). 910B with f32 activations only, three prompts:
/// the greedy tokens must be exact, and the f16 path of every kernel is
/// covered above and in the kernel tests.
#[test]
fn static_w8a8_int8_kv_tiny_model_on_ascend_sim_matches_the_interpreter() {
    let fused = ["static_quant_matmul", "qkv_rope_cache_write_quant", "paged_attention_int8", "moe_down_static"];
    let opts = QuantizeOptions { scheme: Scheme::W8A8, kv_int8: true, calib: calibration(), smooth_alpha: None };
    check_on_ascend_sim(&opts, mixed::four_prompts()[..3].to_vec(), &fused, &[F32_910B]);
}

/// The package writer takes every quantized kernel, on both targets: each
/// launch's parameters fit the host program's table (the static routed
/// gate/up epilogue takes 11), and an fp16 checkpoint's int64 `deq_scale`
/// reaches the fused static gate/up kernels as it is stored.
#[test]
fn quantized_tiny_models_write_their_cann_projects() {
    use panguc::synth::{synth_with, Preset, SynthOptions};
    use panguc_codegen_ascendc::{program::emit_program, project::project_files};
    let tmp = tempfile::tempdir().unwrap();
    let f16 = tmp.path().join("f16");
    synth_with(&f16, &SynthOptions { preset: Preset::Tiny, seed: 7, dtype: panguc_ir::DType::F16, force: false })
        .unwrap();
    let f16 = Checkpoint::open(&f16).unwrap();
    for (float, scheme, kv_int8) in
        [(&checkpoint(), Scheme::W8A8Dynamic, true), (&checkpoint(), Scheme::W8A8, false), (&f16, Scheme::W8A8, true)]
    {
        let dir = tempfile::tempdir().unwrap();
        let opts = QuantizeOptions { scheme, kv_int8, calib: calibration(), smooth_alpha: None };
        let (ckpt, _, program) = scheduled(float, dir.path(), &opts);
        let dtype = ckpt.config().torch_dtype.clone().unwrap_or_default();
        for target in [Target::Ascend910B, Target::Ascend310P] {
            let what = format!("{scheme:?} kv_int8={kv_int8} {dtype} on {target}");
            let ap = emit_program(&program, target, target.default_act()).unwrap_or_else(|e| panic!("{what}: {e:#}"));
            let files = project_files(&ap).unwrap_or_else(|e| panic!("{what}: {e:#}"));
            let device_kernels: usize = ap.kernels.iter().map(|d| d.kernels.len()).sum();
            let sources = files.keys().filter(|f| f.starts_with("op_kernel/") && !f.ends_with("_tiling.h")).count();
            assert_eq!(sources, device_kernels + 1, "{what}: a source per device kernel and the CMakeLists.txt");
            assert!(files.contains_key("host/panguc_host.cpp"), "{what}");
        }
    }
}
