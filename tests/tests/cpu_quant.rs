//! Quantized (msModelSlim) checkpoints compiled for the CPU and run through
//! the scheduler as a batch: a W8A8_DYNAMIC checkpoint of the bundled tiny
//! model (what `panguc quantize --scheme w8a8-dynamic` writes), and a
//! static W8A8 checkpoint of an fp16 tiny model (int64 `deq_scale`, folded
//! input offsets) with the int8 (C8) KV cache. On each CPU tier the machine
//! runs, the compiled engine's greedy tokens must equal the paged reference
//! interpreter's (the int8 sums are exact; the float parts agree to the
//! backend's tolerance), and the int8 values really are int8 in the
//! package (weights, quantized activations, the paged KV cache, which is
//! quantized inside the KV-write kernel and dequantized inside paged
//! attention). The W8A8_DYNAMIC and static W8A8 programs launch no more
//! kernels per decoder layer than the bf16 one.

mod common;

use common::*;
use panguc::frontend::Checkpoint;
use panguc::quantize::{write_quantized, QuantizeOptions, Scheme};
use panguc_ir::DType;
use panguc_runtime::{BatchEngine, CpuEngine, Generation, Scheduler, SchedulerConfig};
use std::path::Path;
use std::sync::Arc;

const BLOCK: usize = 4;
/// max |compiled - interpreter| / max |interpreter logit| of every prompt
/// row, per tier. The baseline tier's float kernels follow the reference's
/// order and the int8 sums are exact, so only the last bits can differ
/// (which a requantized activation can amplify to one int8 step).
const BASELINE_TOL: f32 = 1e-3;
/// The AVX-512 tier rounds activations to bf16 in the bf16-weight GEMMs
/// (router, LM head), as documented for the float model (`cpu_backend.rs`:
/// 11 x 2^-8 of the largest logit).
const BF16_TOL: f32 = 11.0 / 256.0;

/// All requests as one scheduled batch (small blocks and token budget, so
/// steps mix prefill chunks and decodes).
fn run_batch(engine: &mut dyn BatchEngine) -> Vec<Generation> {
    let cfg = SchedulerConfig { block_size: BLOCK, num_blocks: 24, max_seqs: 4, max_batch_tokens: 8 };
    Scheduler::run_all(cfg, mixed::four_prompts(), engine).unwrap()
}

fn interp_batch(ckpt: &Checkpoint) -> Vec<Generation> {
    let m = panguc::commands::import_with(ckpt, panguc::import::KvLayout::Paged { block_size: BLOCK }).unwrap();
    let cfg = ckpt.config().clone();
    let interp = panguc_ir::interp::Interpreter::new(&m, ckpt);
    let mut s = panguc_ir::session::BatchInterpSession::new(
        interp,
        cfg.num_hidden_layers,
        24,
        BLOCK,
        [cfg.num_key_value_heads, cfg.head_dim()],
    );
    run_batch(&mut s)
}

/// The batched import fused by the compile pipeline, compiled into `out`.
fn compile_quantized(ckpt: &Checkpoint, out: &Path) {
    let imported = panguc::commands::import_with(ckpt, panguc::import::KvLayout::Paged { block_size: BLOCK }).unwrap();
    let fused = panguc::pipeline::fuse_batched(ckpt, &imported, &Default::default()).expect("fusion");
    compile(ckpt, &fused, out);
}

fn tiers() -> Vec<&'static str> {
    if cpu_has_bf16_tier() {
        vec![BASELINE, BF16]
    } else {
        eprintln!("this CPU cannot run the {BF16} tier: only {BASELINE} is checked");
        vec![BASELINE]
    }
}

/// Compiled (every runnable tier) vs the paged interpreter, as a batch.
fn check(label: &str, q: &Path, pkg_dir: &Path) {
    let ckpt = Checkpoint::open(q).unwrap();
    compile_quantized(&ckpt, pkg_dir);
    let want = interp_batch(&ckpt);
    for tier in tiers() {
        let pkg = Arc::new(open_tier(pkg_dir, tier));
        let mut e = CpuEngine::batched(pkg, panguc_runtime::thread_pool(2).unwrap(), 24).unwrap();
        let got = run_batch(&mut e);
        let tol = if tier == BASELINE { BASELINE_TOL } else { BF16_TOL };
        let mut worst = 0f32;
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.generated, w.generated, "{label} {tier} sequence {i}: greedy tokens");
            assert_eq!(g.prompt_logits.len(), w.prompt_logits.len());
            for (x, y) in g.prompt_logits.iter().zip(&w.prompt_logits) {
                let scale = y.iter().fold(0f32, |m, v| m.max(v.abs()));
                let diff = x.iter().zip(y).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                worst = worst.max(diff / scale);
            }
        }
        eprintln!("{label} {tier}: worst max|diff|/max|logit| over the prompt rows = {worst:e} (tolerance {tol:e})");
        assert!(worst <= tol, "{label} {tier}: {worst} > {tol}");
        eprintln!("{label} {tier}: {:?}", got.iter().map(|g| g.generated.clone()).collect::<Vec<_>>());
    }
}

/// The kernel program `compile_quantized` builds, scheduled alone (no
/// code generation).
fn scheduled(ckpt: &Checkpoint) -> panguc_ir::kernel::KernelProgram {
    let imported = panguc::commands::import_with(ckpt, panguc::import::KvLayout::Paged { block_size: BLOCK }).unwrap();
    let fused = panguc::pipeline::fuse_batched(ckpt, &imported, &Default::default()).expect("fusion");
    panguc_lowering::schedule::schedule(&fused, &Default::default()).expect("schedule")
}

/// Launches per decoder layer: those writing a buffer of layer `L`
/// (`model.layers.L.*`), by layer.
fn launches_per_layer(p: &panguc_ir::kernel::KernelProgram) -> std::collections::BTreeMap<usize, usize> {
    let mut per = std::collections::BTreeMap::new();
    for l in &p.launches {
        let k = &p.kernels[l.kernel];
        let outs = &l.args[l.args.len() - k.kind.num_outputs()..];
        let layer = outs.iter().find_map(|b| {
            let name = &p.buffer(*b).name;
            name.strip_prefix("model.layers.")?.split('.').next()?.parse::<usize>().ok()
        });
        if let Some(layer) = layer {
            *per.entry(layer).or_insert(0) += 1;
        }
    }
    per
}

fn calibration() -> Vec<Vec<i64>> {
    vec![(1..40).map(|i| (i * 37) % 256).collect(), (3..30).map(|i| (i * 11 + 5) % 256).collect()]
}

/// Every decoder layer of the quantized tiny model (`schemes`: label,
/// scheme, int8 KV cache) takes at most as many launches as the bf16
/// program's layer.
fn assert_no_more_launches_per_layer_than_bf16(schemes: &[(&str, Scheme, bool)]) {
    let bf16 = launches_per_layer(&scheduled(&checkpoint()));
    assert_eq!(bf16.len(), 2, "two decoder layers: {bf16:?}");
    let tmp = tempfile::tempdir().unwrap();
    for &(label, scheme, kv_int8) in schemes {
        let q = tmp.path().join(label.replace(' ', ""));
        let opts = QuantizeOptions { scheme, kv_int8, calib: calibration(), smooth_alpha: None };
        write_quantized(&checkpoint(), &q, &opts).unwrap();
        let p = scheduled(&Checkpoint::open(&q).unwrap());
        let quant = launches_per_layer(&p);
        eprintln!("{label}: launches per layer {quant:?} (bf16 {bf16:?}), {} in all", p.launches.len());
        assert_eq!(quant.len(), bf16.len(), "{label}");
        for (layer, n) in &quant {
            let kinds: Vec<&str> = p.launches.iter().map(|l| p.kernels[l.kernel].kind.mnemonic()).collect();
            assert!(*n <= bf16[layer], "{label} layer {layer}: {n} launches > bf16's {}: {kinds:?}", bf16[layer]);
        }
    }
}

/// W8A8_DYNAMIC: the o projection's int8 matmul quantizes its input and
/// adds its bias and the residual itself (`dyn_quant_matmul`), so the next
/// norm is one `rms_norm_quant` where bf16 has `add_rms_norm`: 14 launches
/// per layer, as bf16. With the int8 KV cache too: the merged q/k/v's
/// ropes and quantizing cache writes are one `qkv_rope_cache_write_quant`.
#[test]
fn w8a8_dynamic_program_takes_no_more_launches_per_layer_than_bf16() {
    assert_no_more_launches_per_layer_than_bf16(&[
        ("W8A8_DYNAMIC", Scheme::W8A8Dynamic, false),
        ("W8A8_DYNAMIC + C8", Scheme::W8A8Dynamic, true),
    ]);
}

/// Static W8A8 (with and without the int8 KV cache): the projections
/// quantize their own input (`static_quant_matmul`), q, k and v (one
/// quantized input: equal input scales and offsets) are one int8 matmul
/// followed by one rope + cache-write launch (`qkv_rope_cache_write`, or
/// `qkv_rope_cache_write_quant` into the int8 caches), the shared
/// expert's gate/up/SwiGLU is one launch and the routed experts take the
/// bf16 MoE's launches (the residual sum inside `moe_combine`): 14
/// launches per layer, as bf16.
#[test]
fn static_w8a8_programs_take_no_more_launches_per_layer_than_bf16() {
    assert_no_more_launches_per_layer_than_bf16(&[("W8A8", Scheme::W8A8, false), ("W8A8 + C8", Scheme::W8A8, true)]);
}

fn program(pkg_dir: &Path) -> panguc_ir::kernel::KernelProgram {
    open_tier(pkg_dir, BASELINE).program().clone()
}

/// How many launches of `p` run a kernel of kind `mnemonic`.
fn launches_of(p: &panguc_ir::kernel::KernelProgram, mnemonic: &str) -> usize {
    p.launches.iter().filter(|l| p.kernels[l.kernel].kind.mnemonic() == mnemonic).count()
}

/// Overwrites the one-element f32 tensor `name` of a single-file
/// safetensors checkpoint in place (the file's JSON header gives its byte
/// range after the header).
fn set_f32_scalar(dir: &Path, name: &str, value: f32) {
    let (dtype, shape, file) = Checkpoint::open(dir).unwrap().tensor_info(name).unwrap();
    assert_eq!((dtype, shape), (DType::F32, vec![1]), "{name}");
    let mut bytes = std::fs::read(&file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let at = 8 + n + header[name]["data_offsets"][0].as_u64().unwrap() as usize;
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
    std::fs::write(&file, bytes).unwrap();
}

/// Static W8A8 (no C8) of the tiny model: calibration gives q, k and v one
/// input range, so the normed row is quantized once and the three
/// projections are one int8 matmul and one rope + cache-write launch.
/// With layer 1's k input scale changed (as a checkpoint calibrated per
/// module could store), the layer function quantizes the row per
/// projection again: three int8 matmuls with their own ropes and cache
/// writes. Both compile to what the interpreter computes.
#[test]
fn static_w8a8_merges_q_k_v_only_when_their_input_scales_are_equal() {
    let tmp = tempfile::tempdir().unwrap();
    let q = tmp.path().join("w8a8");
    let opts = QuantizeOptions { scheme: Scheme::W8A8, kv_int8: false, calib: calibration(), smooth_alpha: None };
    write_quantized(&checkpoint(), &q, &opts).unwrap();
    let layers = 2;
    let pkg = tmp.path().join("pkg");
    check("W8A8", &q, &pkg);
    let p = program(&pkg);
    // q/k/v, o and the shared expert's down.
    assert_eq!(launches_of(&p, "static_quant_matmul"), 3 * layers);
    assert_eq!(launches_of(&p, "qkv_rope_cache_write"), layers);
    for separate in ["rope", "kv_cache_write", "quantize"] {
        assert_eq!(launches_of(&p, separate), 0, "{separate}");
    }

    use panguc_ir::WeightSource;
    let name = "model.layers.1.self_attn.k_proj.input_scale";
    let scale = Checkpoint::open(&q).unwrap().load_f32(name, &[1]).unwrap().as_f32()[0];
    set_f32_scalar(&q, name, scale * 1.25);
    let pkg = tmp.path().join("pkg_unequal");
    check("W8A8 with unequal q/k/v input scales", &q, &pkg);
    let p = program(&pkg);
    assert_eq!(launches_of(&p, "static_quant_matmul"), 5 * layers);
    assert_eq!(launches_of(&p, "rope"), 2 * layers);
    assert_eq!(launches_of(&p, "kv_cache_write"), 2 * layers);
    assert_eq!(launches_of(&p, "qkv_rope_cache_write"), 0);
}

#[test]
fn w8a8_dynamic_checkpoint_compiles_and_matches_the_interpreter_on_every_tier() {
    let tmp = tempfile::tempdir().unwrap();
    let q = tmp.path().join("w8a8_dynamic");
    let opts = QuantizeOptions { scheme: Scheme::W8A8Dynamic, kv_int8: false, calib: vec![], smooth_alpha: None };
    write_quantized(&checkpoint(), &q, &opts).unwrap();
    let pkg = tmp.path().join("pkg");
    check("W8A8_DYNAMIC", &q, &pkg);
    let p = program(&pkg);
    let kinds: Vec<&str> = p.kernels.iter().map(|k| k.kind.mnemonic()).collect();
    for k in ["rms_norm_quant", "quant_matmul_per_token"] {
        assert!(kinds.contains(&k), "{k} in {kinds:?}");
    }
    // Both norms of a layer quantize their rows themselves (the q/k/v
    // input, the experts' and shared expert's input); every other
    // quantization runs inside a fused kernel: the o projection's
    // (dyn_quant_matmul), the expert activations' (moe_gate_up_quant,
    // quant_gate_up_quant).
    let launches = |kind: &str| p.launches.iter().filter(|l| p.kernels[l.kernel].kind.mnemonic() == kind).count();
    let layers = 2;
    assert_eq!(launches("rms_norm_quant"), 2 * layers);
    assert_eq!(launches("dynamic_quant"), 0);
    for fused in
        ["moe_gate_up_quant", "moe_down_quant", "quant_gate_up_quant", "dyn_quant_matmul", "qkv_rope_cache_write"]
    {
        assert_eq!(launches(fused), layers, "{fused} in {kinds:?}");
    }
    // q/k/v are one int8 matmul with the bias in its epilogue.
    let biased = p
        .launches
        .iter()
        .filter(|l| matches!(p.kernels[l.kernel].kind, panguc_ir::kernel::KernelKind::QuantMatMul { bias: true, .. }));
    assert_eq!(biased.count(), layers);
    eprintln!("W8A8_DYNAMIC: {} launches: {kinds:?}", p.launches.len());
    // int8 weights stay int8 in the package.
    assert!(p.weights.iter().any(|w| w.dtype == DType::I8 && w.name.contains("experts")));
    // ...and no linear weight of a layer is stored as float (the router,
    // `mlp.gate`, stays FLOAT by design).
    let float_linear = |w: &&panguc_ir::kernel::PreparedWeight| {
        w.group.starts_with("layers.")
            && w.shape.len() >= 2
            && w.dtype.is_float()
            && !w.name.contains("scale")
            && !w.name.contains("mlp.gate")
    };
    let floats: Vec<&str> = p.weights.iter().filter(float_linear).map(|w| w.name.as_str()).collect();
    assert!(floats.is_empty(), "float layer matrices: {floats:?}");
}

#[test]
fn static_w8a8_with_int8_kv_cache_compiles_and_matches_the_interpreter_on_every_tier() {
    let tmp = tempfile::tempdir().unwrap();
    let float = tmp.path().join("float");
    let synth =
        panguc::synth::SynthOptions { preset: panguc::synth::Preset::Tiny, seed: 7, dtype: DType::F16, force: false };
    panguc::synth::synth_with(&float, &synth).unwrap();
    let q = tmp.path().join("w8a8_c8");
    let calib = vec![(1..40).map(|i| (i * 37) % 256).collect(), (3..30).map(|i| (i * 11 + 5) % 256).collect()];
    let opts = QuantizeOptions { scheme: Scheme::W8A8, kv_int8: true, calib, smooth_alpha: None };
    write_quantized(&Checkpoint::open(&float).unwrap(), &q, &opts).unwrap();
    let pkg = tmp.path().join("pkg");
    check("W8A8 + C8", &q, &pkg);
    let p = program(&pkg);
    // The paged caches are int8: a quarter of the f32 bytes.
    assert!(p.caches.iter().all(|c| p.buffer(*c).dtype == DType::I8));
    let kinds: Vec<&str> = p.kernels.iter().map(|k| k.kind.mnemonic()).collect();
    for k in ["static_quant_matmul", "qkv_rope_cache_write_quant", "paged_attention_int8"] {
        assert!(kinds.contains(&k), "{k} in {kinds:?}");
    }
    // Every other 2-d projection (q, k and v merged into one, o and the
    // shared expert's down) quantizes its own input inside its int8 matmul.
    let launches = |kind: &str| p.launches.iter().filter(|l| p.kernels[l.kernel].kind.mnemonic() == kind).count();
    let layers = 2;
    assert_eq!(launches("static_quant_matmul"), 3 * layers, "{kinds:?}");
    // k roped and v quantized per channel into the int8 caches by the
    // launch that ropes q: no separate rope or cache write.
    assert_eq!(launches("qkv_rope_cache_write_quant"), layers, "{kinds:?}");
    for separate in ["rope", "kv_cache_write_quant", "kv_cache_write"] {
        assert_eq!(launches(separate), 0, "{separate} in {kinds:?}");
    }
    // The shared expert's gate, up and SwiGLU are one launch.
    assert_eq!(launches("quant_gate_up_static"), layers, "{kinds:?}");
    // The routed experts run over the selected (token, expert) pairs only,
    // as the bf16 MoE does, not densely through one-hot combine weights.
    for fused in ["moe_route", "moe_gate_up_static", "moe_down_static", "moe_combine"] {
        assert_eq!(launches(fused), layers, "{fused} in {kinds:?}");
    }
    // The layer's residual sum is moe_combine's (shared expert and residual).
    let with_skips = p.launches.iter().filter(|l| {
        matches!(p.kernels[l.kernel].kind, panguc_ir::kernel::KernelKind::MoeCombine { shared_residual: true })
    });
    assert_eq!(with_skips.count(), layers);
    for dense in ["one_hot", "transpose", "quantize", "quant_matmul"] {
        assert_eq!(launches(dense), 0, "{dense} in {kinds:?}");
    }
    // The cache is quantized inside the KV write and dequantized inside
    // attention: no float copy of it is made.
    assert!(!kinds.contains(&"dequantize"), "{kinds:?}");
}
