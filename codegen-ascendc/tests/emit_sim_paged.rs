//! The paged-cache kernels of a ragged step (`qkv_rope_cache_write`,
//! `paged_attention`) for both targets, compiled against the AscendC
//! simulation, run over all block indices and compared with the reference
//! interpreter's ops on the same (dtype-rounded) inputs. Steps mix decode
//! rows and prefill chunks of different lengths, blocks that are not
//! contiguous (nor in order), and prefill chunks that cross a block
//! boundary; block sizes below, equal to and above the kernel's KV chunk.
//! Tolerances as in `emit_sim.rs` (about two ulps of the stored dtype).

#[allow(dead_code)] // each test file uses part of the shared helpers
mod common;

use common::{assert_close, c, emit, kernel, rand_vec, targets, tol, CORES};
use panguc_codegen_ascendc::data::{decode, encode, encode_i32, encode_i64, round_through, run_kernels, run_sim};
use panguc_codegen_ascendc::emit::Env;
use panguc_codegen_ascendc::sim::SimArg;
use panguc_codegen_ascendc::target::DevType;
use panguc_ir::batch::{SeqChunk, StepMetadata};
use panguc_ir::interp::{self, eval_pure};
use panguc_ir::kernel::KernelKind;
use panguc_ir::op::RopeKind;
use panguc_ir::{Dim, Op, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const HQ: usize = 4;
const HKV: usize = 2;
const D: usize = 16;

/// The step metadata's device types: i32 (Ascend's convention) and i64
/// (the kernel program's integer storage).
const META_TYPES: [DevType; 2] = [DevType::I32, DevType::I64];

fn ints(t: DevType, v: &[i32]) -> Vec<u8> {
    match t {
        DevType::I32 => encode_i32(v),
        _ => encode_i64(&v.iter().map(|&x| i64::from(x)).collect::<Vec<_>>()),
    }
}

/// One test step: block size, cache blocks, and each sequence's chunk.
struct Case {
    block_size: usize,
    num_blocks: usize,
    chunks: Vec<(usize, usize, Vec<u32>)>,
}

fn cases() -> Vec<Case> {
    vec![
        // Block size 16: a long decode over scattered blocks in reverse
        // order, a fresh prefill crossing a block boundary, a prefill chunk
        // continuing mid-block across the next boundary, a one-token prompt.
        Case {
            block_size: 16,
            num_blocks: 12,
            chunks: vec![(40, 1, vec![9, 2, 7]), (0, 20, vec![5, 1]), (10, 9, vec![11, 0]), (0, 1, vec![3])],
        },
        // Block size 4 (many blocks per context) and a lone decode of a
        // context that ends exactly on a block boundary.
        Case {
            block_size: 4,
            num_blocks: 24,
            chunks: vec![(7, 1, vec![20, 3]), (0, 13, vec![4, 17, 8, 1]), (11, 5, vec![0, 23, 6, 12])],
        },
        // Block size 256, above the 128-row KV chunk: chunks inside a block.
        Case { block_size: 256, num_blocks: 3, chunks: vec![(150, 1, vec![2]), (120, 140, vec![1, 0])] },
        // The batch of one.
        Case { block_size: 16, num_blocks: 4, chunks: vec![(0, 7, vec![3])] },
    ]
}

fn step(case: &Case) -> StepMetadata {
    let chunks: Vec<SeqChunk> =
        case.chunks.iter().map(|(past, new, blocks)| SeqChunk { past: *past, new_tokens: *new, blocks }).collect();
    let m = StepMetadata::build(case.block_size, &chunks).unwrap();
    m.validate(case.num_blocks).unwrap();
    m
}

/// The sizes of one step as the tiling sees them.
fn env(m: &StepMetadata, num_blocks: usize) -> Env {
    Env {
        seqs: m.seqs() as u64,
        max_blocks: m.max_blocks as u64,
        num_blocks: num_blocks as u64,
        ..Env::new(m.tokens() as u64, 0, CORES)
    }
}

/// A paged cache argument `[num_blocks, block_size, HKV, D]`.
fn cache_dims(block_size: usize) -> Vec<Dim> {
    vec![Dim::num_blocks(), c(block_size), c(HKV), c(D)]
}

#[test]
fn paged_attention_ragged_steps() {
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let scale = 1.0 / (D as f64).sqrt();
    for ((target, act), meta_t) in targets().into_iter().flat_map(|t| META_TYPES.map(|m| (t, m))) {
        for case in cases() {
            let m = step(&case);
            let k = kernel(
                "panguc_k031_paged_attention",
                KernelKind::PagedAttention { scale },
                vec![
                    vec![Dim::tokens(), c(HQ), c(D)],
                    cache_dims(case.block_size),
                    cache_dims(case.block_size),
                    vec![Dim::seqs(), Dim::max_blocks()],
                    vec![Dim::seqs().add(&c(1))],
                    vec![Dim::seqs()],
                    vec![Dim::tokens(), c(HQ), c(D)],
                ],
            );
            let dk = emit(&k, &[act, act, act, meta_t, meta_t, meta_t, act], target, act);
            let tokens = m.tokens();
            let cache_len = case.num_blocks * case.block_size * HKV * D;
            let q = round_through(act, &rand_vec(&mut rng, tokens * HQ * D));
            let kc = round_through(act, &rand_vec(&mut rng, cache_len));
            let vc = round_through(act, &rand_vec(&mut rng, cache_len));
            let out = run_sim(
                &dk.kernels[0],
                target,
                &env(&m, case.num_blocks),
                vec![
                    SimArg::Input(encode(act, &q)),
                    SimArg::Input(encode(act, &kc)),
                    SimArg::Input(encode(act, &vc)),
                    SimArg::Input(ints(meta_t, &m.block_table)),
                    SimArg::Input(ints(meta_t, &m.query_start_loc)),
                    SimArg::Input(ints(meta_t, &m.context_lens)),
                    SimArg::Output(q.len() * act.size() as usize),
                ],
            )
            .unwrap();
            let meta = m.tensors();
            let cache_shape = vec![case.num_blocks, case.block_size, HKV, D];
            let want = eval_pure(
                &Op::PagedAttention { scale },
                &[
                    &Tensor::f32(vec![tokens, HQ, D], q),
                    &Tensor::f32(cache_shape.clone(), kc),
                    &Tensor::f32(cache_shape, vc),
                    &meta[3],
                    &meta[1],
                    &meta[2],
                ],
            )
            .unwrap()
            .remove(0);
            let what = format!("paged_attention {target} {meta_t} block_size={} seqs={}", case.block_size, m.seqs());
            assert_close(&decode(act, &out[0]), want.as_f32(), tol(act), 0.1, &what);
        }
    }
}

/// A step's projected q/k/v rows and its RoPE tables, each rounded to the
/// activation dtype.
fn qkv_inputs(rng: &mut ChaCha8Rng, act: DevType, m: &StepMetadata) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let tu = m.tokens();
    let y = round_through(act, &rand_vec(rng, tu * (HQ + 2 * HKV) * D));
    let pos = Tensor::i64(vec![tu], m.positions.iter().map(|&p| p as i64).collect());
    let cos = round_through(act, interp::rope_table(&pos, RopeKind::Cos, 10000.0, D).as_f32());
    let sin = round_through(act, interp::rope_table(&pos, RopeKind::Sin, 10000.0, D).as_f32());
    (y, cos, sin)
}

/// The interpreter's `qkv_rope_cache_write` on the projected rows `y`
/// (identity weight, zero bias, so split, RoPE and slot writes are the
/// op's own) over the float caches `kc`, `vc`: `[q, k cache, v cache]`.
fn qkv_reference(
    m: &StepMetadata,
    case: &Case,
    (y, cos, sin): (Vec<f32>, Vec<f32>, Vec<f32>),
    kc: Vec<f32>,
    vc: Vec<f32>,
) -> Vec<Tensor> {
    let (tu, w) = (m.tokens(), (HQ + 2 * HKV) * D);
    let ident: Vec<f32> = (0..w * w).map(|i| if i / w == i % w { 1.0 } else { 0.0 }).collect();
    let cache_shape = vec![case.num_blocks, case.block_size, HKV, D];
    eval_pure(
        &Op::QkvRopeCacheWrite { q_heads: HQ, kv_heads: HKV },
        &[
            &Tensor::f32(vec![tu, w], y),
            &Tensor::f32(vec![w, w], ident),
            &Tensor::f32(vec![w], vec![0.0; w]),
            &Tensor::f32(vec![tu, D], cos),
            &Tensor::f32(vec![tu, D], sin),
            &Tensor::f32(cache_shape.clone(), kc),
            &Tensor::f32(cache_shape, vc),
            &m.tensors()[4],
        ],
    )
    .unwrap()
}

#[test]
fn qkv_rope_cache_write_through_slots() {
    let mut rng = ChaCha8Rng::seed_from_u64(22);
    let w = (HQ + 2 * HKV) * D;
    for ((target, act), meta_t) in targets().into_iter().flat_map(|t| META_TYPES.map(|m| (t, m))) {
        for case in cases() {
            let m = step(&case);
            let k = kernel(
                "panguc_k032_qkv_rope_cache_write",
                KernelKind::QkvRopeCacheWrite { q_heads: HQ, kv_heads: HKV },
                vec![
                    vec![Dim::tokens(), c(w)],
                    vec![Dim::tokens(), c(D)],
                    vec![Dim::tokens(), c(D)],
                    vec![Dim::tokens()],
                    vec![Dim::tokens(), c(HQ), c(D)],
                    cache_dims(case.block_size),
                    cache_dims(case.block_size),
                ],
            );
            let dk = emit(&k, &[act, act, act, meta_t, act, act, act], target, act);
            let tu = m.tokens();
            let (y, cos, sin) = qkv_inputs(&mut rng, act, &m);
            let cache_len = case.num_blocks * case.block_size * HKV * D;
            let kc = round_through(act, &rand_vec(&mut rng, cache_len));
            let vc = round_through(act, &rand_vec(&mut rng, cache_len));
            let sz = act.size() as usize;
            let mut args = vec![
                encode(act, &y),
                encode(act, &cos),
                encode(act, &sin),
                ints(meta_t, &m.slot_mapping),
                vec![0; tu * HQ * D * sz],
                encode(act, &kc),
                encode(act, &vc),
            ];
            run_kernels(&dk, target, &env(&m, case.num_blocks), &mut args).unwrap();
            let want = qkv_reference(&m, &case, (y, cos, sin), kc.clone(), vc.clone());
            let what = format!("{target} {meta_t} block_size={} seqs={}", case.block_size, m.seqs());
            assert_close(&decode(act, &args[4]), want[0].as_f32(), tol(act), 0.1, &format!("q {what}"));
            let (kg, vg) = (decode(act, &args[5]), decode(act, &args[6]));
            // Slots this step does not write keep their bytes exactly.
            let row = HKV * D;
            let written: Vec<bool> =
                (0..case.num_blocks * case.block_size).map(|s| m.slot_mapping.contains(&(s as i32))).collect();
            for (slot, &wr) in written.iter().enumerate() {
                let r = slot * row..(slot + 1) * row;
                if wr {
                    assert_close(&kg[r.clone()], &want[1].as_f32()[r.clone()], tol(act), 0.1, &format!("k {what}"));
                    assert_eq!(&vg[r.clone()], &want[2].as_f32()[r], "v slot {slot} {what}");
                } else {
                    assert_eq!(&kg[r.clone()], &kc[r.clone()], "untouched k slot {slot} {what}");
                    assert_eq!(&vg[r.clone()], &vc[r], "untouched v slot {slot} {what}");
                }
            }
        }
    }
}

/// The int8 (C8) form: each written slot's k and v rows are quantized per
/// channel on their way into int8 caches. Reference: the interpreter's
/// float `qkv_rope_cache_write`, its roped k rounded to the activation
/// dtype (what the unfused rope stores), then its `quantize` with the same
/// scales and offsets. Some channels' scales are small enough to clamp.
/// Both must be equal byte for byte: the kernel's f32 RoPE computes what
/// the float kernel stores (checked within `tol` above), and after the
/// rounding to the activation dtype the quantization is exact.
#[test]
fn qkv_rope_cache_write_quant_through_slots() {
    use panguc_codegen_ascendc::data::{decode_i8, encode_i8};
    use panguc_ir::interp::quant::quantize;
    use rand::Rng;
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    let w = (HQ + 2 * HKV) * D;
    let row = HKV * D;
    for ((target, act), meta_t) in targets().into_iter().flat_map(|t| META_TYPES.map(|m| (t, m))) {
        for case in cases() {
            let m = step(&case);
            let chan = vec![c(HKV), c(D)];
            let k = kernel(
                "panguc_k033_qkv_rope_cache_write_quant",
                KernelKind::QkvRopeCacheWriteQuant { q_heads: HQ, kv_heads: HKV },
                vec![
                    vec![Dim::tokens(), c(w)],
                    vec![Dim::tokens(), c(D)],
                    vec![Dim::tokens(), c(D)],
                    vec![Dim::tokens()],
                    chan.clone(),
                    chan.clone(),
                    chan.clone(),
                    chan,
                    vec![Dim::tokens(), c(HQ), c(D)],
                    cache_dims(case.block_size),
                    cache_dims(case.block_size),
                ],
            );
            let f = DevType::F32;
            let i8t = DevType::I8;
            let dk = emit(&k, &[act, act, act, meta_t, f, f, f, f, act, i8t, i8t], target, act);
            let tu = m.tokens();
            let (y, cos, sin) = qkv_inputs(&mut rng, act, &m);
            // Per-channel scales: every fourth channel clamps (|x| / 0.004 > 127).
            let scale = |rng: &mut ChaCha8Rng| -> Vec<f32> {
                (0..row).map(|i| if i % 4 == 0 { 0.004 } else { rng.random_range(0.01f32..0.03) }).collect()
            };
            let offset =
                |rng: &mut ChaCha8Rng| -> Vec<f32> { (0..row).map(|_| rng.random_range(-3.0f32..3.0)).collect() };
            let (ks, ko, vs, vo) = (scale(&mut rng), offset(&mut rng), scale(&mut rng), offset(&mut rng));
            let cache_len = case.num_blocks * case.block_size * row;
            let kc: Vec<i64> = (0..cache_len).map(|_| rng.random_range(-128i64..128)).collect();
            let vc: Vec<i64> = (0..cache_len).map(|_| rng.random_range(-128i64..128)).collect();
            let sz = act.size() as usize;
            let mut args = vec![
                encode(act, &y),
                encode(act, &cos),
                encode(act, &sin),
                ints(meta_t, &m.slot_mapping),
                encode(f, &ks),
                encode(f, &ko),
                encode(f, &vs),
                encode(f, &vo),
                vec![0; tu * HQ * D * sz],
                encode_i8(&kc),
                encode_i8(&vc),
            ];
            run_kernels(&dk, target, &env(&m, case.num_blocks), &mut args).unwrap();
            let zeros = vec![0.0; cache_len];
            let want = qkv_reference(&m, &case, (y, cos, sin), zeros.clone(), zeros);
            let what = format!("{target} {meta_t} block_size={} seqs={}", case.block_size, m.seqs());
            assert_close(&decode(act, &args[8]), want[0].as_f32(), tol(act), 0.1, &format!("q {what}"));
            let (kg, vg) = (decode_i8(&args[9]), decode_i8(&args[10]));
            let quant = |x: &[f32], s: &[f32], o: &[f32]| -> Vec<i64> {
                let t = |v: &[f32]| Tensor::f32(vec![row], v.to_vec());
                quantize(&t(x), &t(s), &t(o)).unwrap().as_i64().to_vec()
            };
            for slot in 0..case.num_blocks * case.block_size {
                let r = slot * row..(slot + 1) * row;
                if !m.slot_mapping.contains(&(slot as i32)) {
                    assert_eq!(&kg[r.clone()], &kc[r.clone()], "untouched k slot {slot} {what}");
                    assert_eq!(&vg[r.clone()], &vc[r], "untouched v slot {slot} {what}");
                    continue;
                }
                let k_want = quant(&round_through(act, &want[1].as_f32()[r.clone()]), &ks, &ko);
                let v_want = quant(&want[2].as_f32()[r.clone()], &vs, &vo);
                assert_eq!(&vg[r.clone()], &v_want[..], "v slot {slot} {what}");
                assert_eq!(&kg[r], &k_want[..], "k slot {slot} {what}");
            }
        }
    }
}
