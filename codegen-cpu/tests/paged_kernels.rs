//! The paged (ragged-batch) kernels compiled for the host and run through
//! the JIT against the reference interpreter's ops, on one ragged step:
//! a decode row, a prefill chunk continuing a cached context whose new
//! rows cross a block boundary, and a fresh prefill, every sequence in
//! scattered (non-contiguous, out-of-order) blocks. Attention and the
//! cache writes do no bf16 arithmetic, so results must be bit-identical.

use panguc_codegen_cpu::{with_jit, KernelFn, BASELINE_TIER};
use panguc_ir::batch::{SeqChunk, StepMetadata};
use panguc_ir::interp::{batched, eval_pure, rope_table};
use panguc_ir::kernel::{ArgSpec, Extent, Kernel, KernelKind, KernelProgram, Layout};
use panguc_ir::op::RopeKind;
use panguc_ir::shape::{Bindings, SYM_MAX_BLOCKS, SYM_NUM_BLOCKS, SYM_SEQS, SYM_TOKENS};
use panguc_ir::{DType, Dim, Op, Tensor};
use rand::{Rng, SeedableRng};

const BLOCK: usize = 4;
const NUM_BLOCKS: usize = 12;
const HQ: usize = 4;
const HKV: usize = 2;
const D: usize = 8;

mod common;

use common::{bytes_f32, bytes_i64, f32s, i8_bytes, i8s, kernel};

fn spec(dtype: DType, shape: Vec<Dim>) -> ArgSpec {
    common::spec(dtype, shape, Layout::RowMajor)
}

fn program(kernels: Vec<Kernel>) -> KernelProgram {
    common::program("paged", &[SYM_TOKENS, SYM_SEQS, SYM_MAX_BLOCKS, SYM_NUM_BLOCKS], kernels)
}

/// The step: sequence 0 decodes at position 5 (blocks 7, 2), sequence 1
/// prefills positions 3..9 (blocks 9, 0, 4: the chunk crosses from block 9
/// into 0 and on into 4), sequence 2 prefills positions 0..2 (block 5).
fn step() -> StepMetadata {
    StepMetadata::build(
        BLOCK,
        &[
            SeqChunk { past: 5, new_tokens: 1, blocks: &[7, 2] },
            SeqChunk { past: 3, new_tokens: 6, blocks: &[9, 0, 4] },
            SeqChunk { past: 0, new_tokens: 2, blocks: &[5] },
        ],
    )
    .unwrap()
}

fn bindings(m: &StepMetadata) -> Bindings {
    Bindings::from([
        (SYM_TOKENS.to_string(), m.tokens()),
        (SYM_SEQS.to_string(), m.seqs()),
        (SYM_MAX_BLOCKS.to_string(), m.max_blocks),
        (SYM_NUM_BLOCKS.to_string(), NUM_BLOCKS),
    ])
}

fn tier() -> panguc_codegen_cpu::HostTarget {
    common::tier(BASELINE_TIER)
}

fn random(rng: &mut impl Rng, shape: Vec<usize>) -> Tensor {
    let n = shape.iter().product();
    Tensor::f32(shape, (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect())
}

/// Run `f` over all its tiles (split as threads would) for the step `m`.
fn run(f: KernelFn, bufs: &mut [Vec<u8>], m: &StepMetadata, tiles: u64, scratch: usize) {
    let syms = [m.tokens() as i64, m.seqs() as i64, m.max_blocks as i64, NUM_BLOCKS as i64];
    common::run_tiles(f, bufs, &syms, tiles, scratch);
}

fn assert_bits(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "{what}: element {i}: {g} vs {w}");
    }
}

fn cache_shape() -> Vec<usize> {
    vec![NUM_BLOCKS, BLOCK, HKV, D]
}

fn paged_cache_dims() -> Vec<Dim> {
    vec![Dim::num_blocks(), Dim::c(BLOCK), Dim::c(HKV), Dim::c(D)]
}

#[test]
fn paged_attention_matches_the_interpreter_bit_for_bit() {
    let shape = AttnShape { block: BLOCK, num_blocks: NUM_BLOCKS, hq: HQ, hkv: HKV, d: D };
    check_paged_attention(&shape, &step(), BASELINE_TIER, 7);
}

/// Contexts long enough for the kernel's run-wise loops (blocks a multiple
/// of 16 keys: whole runs of 16 keys, then 8-key vectors, then single keys)
/// on every tier this CPU runs: decodes after 36, 47 and 0 cached tokens and
/// a prefill chunk crossing a block boundary, in scattered blocks; the
/// model's head dim (128, whole cache lines per step) and an odd one (40).
#[test]
fn paged_attention_over_long_contexts_matches_the_interpreter_bit_for_bit() {
    for (block, d) in [(16, 128), (32, 40)] {
        let blocks = |ids: &[u32]| -> Vec<u32> { ids.iter().map(|b| b % 10).collect() };
        let (b0, b1, b2, b3) = (blocks(&[7, 2, 9]), blocks(&[1, 8, 4]), blocks(&[5, 0]), blocks(&[3]));
        let m = StepMetadata::build(
            block,
            &[
                SeqChunk { past: 36, new_tokens: 1, blocks: &b0 },
                SeqChunk { past: 47, new_tokens: 1, blocks: &b1 },
                SeqChunk { past: 10, new_tokens: 9, blocks: &b2 },
                SeqChunk { past: 0, new_tokens: 1, blocks: &b3 },
            ],
        )
        .unwrap();
        let shape = AttnShape { block, num_blocks: 10, hq: 8, hkv: 2, d };
        for tier in common::runnable_tiers() {
            check_paged_attention(&shape, &m, tier, 11);
        }
    }
}

struct AttnShape {
    block: usize,
    num_blocks: usize,
    hq: usize,
    hkv: usize,
    d: usize,
}

/// Paged attention of random q and caches over the step `m`, compiled for
/// `tier`, against the interpreter bit for bit.
fn check_paged_attention(s: &AttnShape, m: &StepMetadata, tier: &str, seed: u64) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let q = random(&mut rng, vec![m.tokens(), s.hq, s.d]);
    let cache = vec![s.num_blocks, s.block, s.hkv, s.d];
    let (kc, vc) = (random(&mut rng, cache.clone()), random(&mut rng, cache));
    let scale = 1.0 / (s.d as f64).sqrt();
    let meta = m.tensors();
    let (table, qsl, ctx) = (&meta[3], &meta[1], &meta[2]);
    let want = batched::paged_attention(&[&q, &kc, &vc, table, qsl, ctx], scale as f32).unwrap();

    let t = Dim::tokens();
    let cache_dims = vec![Dim::num_blocks(), Dim::c(s.block), Dim::c(s.hkv), Dim::c(s.d)];
    let args = vec![
        spec(DType::F32, vec![t.clone(), Dim::c(s.hq), Dim::c(s.d)]),
        spec(DType::F32, cache_dims.clone()),
        spec(DType::F32, cache_dims),
        spec(DType::I64, vec![Dim::seqs(), Dim::max_blocks()]),
        spec(DType::I64, vec![Dim::seqs().add(&Dim::c(1))]),
        spec(DType::I64, vec![Dim::seqs()]),
        spec(DType::F32, vec![t, Dim::c(s.hq), Dim::c(s.d)]),
    ];
    let scratch = Extent::of((4 * (s.hq / s.hkv) * s.block) as u64, &[Dim::max_blocks()]);
    let k = kernel("paged_attention", KernelKind::PagedAttention { scale }, args, scratch.clone());
    let mut b = bindings(m);
    b.insert(SYM_NUM_BLOCKS.to_string(), s.num_blocks);
    let tiles = k.tiles.eval(&b).unwrap();
    assert_eq!(tiles as usize, m.tokens() * s.hkv, "one tile per (token, KV head)");
    let scratch = scratch.eval(&b).unwrap() as usize;
    with_jit(&program(vec![k]), &common::tier(tier), |get| {
        let mut bufs = vec![
            bytes_f32(q.as_f32()),
            bytes_f32(kc.as_f32()),
            bytes_f32(vc.as_f32()),
            bytes_i64(&m.block_table),
            bytes_i64(&m.query_start_loc),
            bytes_i64(&m.context_lens),
            vec![0u8; q.numel() * 4],
        ];
        let syms = [m.tokens() as i64, m.seqs() as i64, m.max_blocks as i64, s.num_blocks as i64];
        common::run_tiles(get("paged_attention").expect("symbol"), &mut bufs, &syms, tiles, scratch);
        assert_bits(&f32s(&bufs[6]), want.as_f32(), &format!("paged attention ({tier}, block {}, D {})", s.block, s.d));
    })
    .unwrap();
}

/// The fused q/k/v kernels take the projection `y`; the interpreter's ops
/// project `x` themselves, so `x = y` with an identity weight and a zero
/// bias gives them exactly the same `y` (x * 1 + 0 * ... is exact).
struct QkvInputs {
    width: usize,
    y: Tensor,
    eye: Tensor,
    zero: Tensor,
    cos: Tensor,
    sin: Tensor,
}

fn qkv_inputs(m: &StepMetadata, rng: &mut rand_chacha::ChaCha8Rng) -> QkvInputs {
    let width = (HQ + 2 * HKV) * D;
    let y = random(rng, vec![m.tokens(), width]);
    let eye =
        Tensor::f32(vec![width, width], (0..width * width).map(|i| (i / width == i % width) as u8 as f32).collect());
    let zero = Tensor::zeros(vec![width]);
    let pos = Tensor::i64(vec![m.tokens()], m.positions.iter().map(|&p| p as i64).collect());
    let (cos, sin) = (rope_table(&pos, RopeKind::Cos, 10000.0, D), rope_table(&pos, RopeKind::Sin, 10000.0, D));
    QkvInputs { width, y, eye, zero, cos, sin }
}

#[test]
fn qkv_rope_cache_write_matches_the_interpreter_bit_for_bit() {
    let m = step();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
    let QkvInputs { width, y, eye, zero, cos, sin } = qkv_inputs(&m, &mut rng);
    let (kc, vc) = (random(&mut rng, cache_shape()), random(&mut rng, cache_shape()));
    let slots = &m.tensors()[4];
    let op = Op::QkvRopeCacheWrite { q_heads: HQ, kv_heads: HKV };
    let want = eval_pure(&op, &[&y, &eye, &zero, &cos, &sin, &kc, &vc, slots]).unwrap();

    let t = Dim::tokens();
    let args = vec![
        spec(DType::F32, vec![t.clone(), Dim::c(width)]),
        spec(DType::F32, vec![t.clone(), Dim::c(D)]),
        spec(DType::F32, vec![t.clone(), Dim::c(D)]),
        spec(DType::I64, vec![t.clone()]),
        spec(DType::F32, vec![t, Dim::c(HQ), Dim::c(D)]),
        spec(DType::F32, paged_cache_dims()),
        spec(DType::F32, paged_cache_dims()),
    ];
    let kind = KernelKind::QkvRopeCacheWrite { q_heads: HQ, kv_heads: HKV };
    let k = kernel("qkv_rope_cache_write", kind, args, Extent::constant(0));
    let tiles = k.tiles.eval(&bindings(&m)).unwrap();
    with_jit(&program(vec![k]), &tier(), |get| {
        let mut bufs = vec![
            bytes_f32(y.as_f32()),
            bytes_f32(cos.as_f32()),
            bytes_f32(sin.as_f32()),
            bytes_i64(&m.slot_mapping),
            vec![0u8; m.tokens() * HQ * D * 4],
            bytes_f32(kc.as_f32()),
            bytes_f32(vc.as_f32()),
        ];
        run(get("qkv_rope_cache_write").expect("symbol"), &mut bufs, &m, tiles, 0);
        assert_bits(&f32s(&bufs[4]), want[0].as_f32(), "q");
        // Untouched slots keep their old contents in both.
        assert_bits(&f32s(&bufs[5]), want[1].as_f32(), "k cache");
        assert_bits(&f32s(&bufs[6]), want[2].as_f32(), "v cache");
    })
    .unwrap();
}

/// The int8 (C8) form: k roped, then k and v quantized per channel into
/// int8 caches; the interpreter's `qkv_rope` (over empty caches: just the
/// new rows), `quantize` and `kv_cache_write` give the reference. The
/// scales make some values clamp at the int8 range.
#[test]
fn qkv_rope_cache_write_quant_matches_the_interpreter_exactly() {
    let m = step();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(10);
    let QkvInputs { width, y, eye, zero, cos, sin } = qkv_inputs(&m, &mut rng);
    let empty = Tensor::zeros(vec![0, HKV, D]);
    let op = Op::QkvRope { q_heads: HQ, kv_heads: HKV };
    let rows = eval_pure(&op, &[&y, &eye, &zero, &cos, &sin, &empty, &empty]).unwrap();
    let per_channel = |rng: &mut rand_chacha::ChaCha8Rng, lo: f32, hi: f32| {
        Tensor::f32(vec![HKV, D], (0..HKV * D).map(|_| rng.random_range(lo..hi)).collect())
    };
    let (ks, ko) = (per_channel(&mut rng, 0.004, 0.02), per_channel(&mut rng, -3.0, 3.0));
    let (vs, vo) = (per_channel(&mut rng, 0.004, 0.02), per_channel(&mut rng, -3.0, 3.0));
    let old_cache = |rng: &mut rand_chacha::ChaCha8Rng| {
        let n = cache_shape().iter().product();
        Tensor::i64(cache_shape(), (0..n).map(|_| rng.random_range(-128i64..128)).collect())
    };
    let (kc, vc) = (old_cache(&mut rng), old_cache(&mut rng));
    let slots = &m.tensors()[4];
    let quantized = |x: &Tensor, s: &Tensor, o: &Tensor| eval_pure(&Op::Quantize, &[x, s, o]).unwrap().remove(0);
    let want_k = batched::kv_cache_write(&kc, &quantized(&rows[1], &ks, &ko), slots).unwrap();
    let want_v = batched::kv_cache_write(&vc, &quantized(&rows[2], &vs, &vo), slots).unwrap();
    let clamped = want_k.as_i64().iter().chain(want_v.as_i64()).filter(|v| v.abs() >= 127).count();
    assert!(clamped > 0, "no value reaches the int8 range: the clamp is untested");

    let t = Dim::tokens();
    let channel = || spec(DType::F32, vec![Dim::c(HKV), Dim::c(D)]);
    let args = vec![
        spec(DType::F32, vec![t.clone(), Dim::c(width)]),
        spec(DType::F32, vec![t.clone(), Dim::c(D)]),
        spec(DType::F32, vec![t.clone(), Dim::c(D)]),
        spec(DType::I64, vec![t.clone()]),
        channel(),
        channel(),
        channel(),
        channel(),
        spec(DType::F32, vec![t, Dim::c(HQ), Dim::c(D)]),
        spec(DType::I8, paged_cache_dims()),
        spec(DType::I8, paged_cache_dims()),
    ];
    let kind = KernelKind::QkvRopeCacheWriteQuant { q_heads: HQ, kv_heads: HKV };
    let k = kernel("qkv_rope_cache_write_quant", kind, args, Extent::constant(0));
    let tiles = k.tiles.eval(&bindings(&m)).unwrap();
    with_jit(&program(vec![k]), &tier(), |get| {
        let mut bufs = vec![
            bytes_f32(y.as_f32()),
            bytes_f32(cos.as_f32()),
            bytes_f32(sin.as_f32()),
            bytes_i64(&m.slot_mapping),
            bytes_f32(ks.as_f32()),
            bytes_f32(ko.as_f32()),
            bytes_f32(vs.as_f32()),
            bytes_f32(vo.as_f32()),
            vec![0u8; m.tokens() * HQ * D * 4],
            i8_bytes(kc.as_i64()),
            i8_bytes(vc.as_i64()),
        ];
        run(get("qkv_rope_cache_write_quant").expect("symbol"), &mut bufs, &m, tiles, 0);
        assert_bits(&f32s(&bufs[8]), rows[0].as_f32(), "q");
        // Untouched slots keep their old contents in both.
        assert_eq!(i8s(&bufs[9]), want_k.as_i64(), "k cache");
        assert_eq!(i8s(&bufs[10]), want_v.as_i64(), "v cache");
    })
    .unwrap();
}

#[test]
fn kv_cache_write_matches_the_interpreter() {
    let m = step();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let new = random(&mut rng, vec![m.tokens(), HKV, D]);
    let cache = random(&mut rng, cache_shape());
    let want = batched::kv_cache_write(&cache, &new, &m.tensors()[4]).unwrap();
    let args = vec![
        spec(DType::F32, vec![Dim::tokens(), Dim::c(HKV), Dim::c(D)]),
        spec(DType::I64, vec![Dim::tokens()]),
        spec(DType::F32, paged_cache_dims()),
    ];
    let k = kernel("kv_cache_write", KernelKind::KvCacheWrite, args, Extent::constant(0));
    let tiles = k.tiles.eval(&bindings(&m)).unwrap();
    with_jit(&program(vec![k]), &tier(), |get| {
        let mut bufs = vec![bytes_f32(new.as_f32()), bytes_i64(&m.slot_mapping), bytes_f32(cache.as_f32())];
        run(get("kv_cache_write").expect("symbol"), &mut bufs, &m, tiles, 0);
        assert_bits(&f32s(&bufs[2]), want.as_f32(), "cache");
    })
    .unwrap();
}
