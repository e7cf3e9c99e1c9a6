//! Paged attention over an int8 KV cache (`emit::paged::paged_attention_int8`,
//! per-channel antiquant inside the kernel) on both targets under the
//! AscendC simulation, against the interpreter's `Dequantize` of the caches
//! followed by its `PagedAttention`. Ragged steps with decode rows and
//! prefill chunks, scattered blocks, block sizes below and above the KV
//! chunk. Tolerance as the float paged kernel's test (about two ulps of the
//! output dtype): the antiquant itself is exact f32 arithmetic, the online
//! softmax differs from the reference's two-pass one by rounding.

#[allow(dead_code)] // each test file uses part of the shared helpers
mod common;

use common::{assert_close, rand_vec, targets, tol, CORES};
use panguc_codegen_ascendc::data::{decode, encode, encode_i32, encode_i64, encode_i8, round_through, run_kernels};
use panguc_codegen_ascendc::emit::paged::{paged_attention_int8, PagedDims};
use panguc_codegen_ascendc::emit::{EmitOptions, Env, TExpr};
use panguc_codegen_ascendc::target::DevType;
use panguc_ir::batch::{SeqChunk, StepMetadata};
use panguc_ir::interp::{eval_pure, quant};
use panguc_ir::{Op, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// (query heads, KV heads, head_dim): the tiny preset's 16-byte int8 heads
/// (moved as whole slot rows), whole 32-byte heads, and the small
/// preset's heads.
const HEADS: [(usize, usize, usize); 3] = [(4, 2, 16), (4, 2, 32), (8, 2, 128)];

/// One step: block size, cache blocks, and each sequence's (past, new
/// tokens, blocks).
type Case = (usize, usize, Vec<(usize, usize, Vec<u32>)>);

fn ints(t: DevType, v: &[i32]) -> Vec<u8> {
    match t {
        DevType::I32 => encode_i32(v),
        _ => encode_i64(&v.iter().map(|&x| i64::from(x)).collect::<Vec<_>>()),
    }
}

#[test]
fn paged_attention_over_int8_kv_matches_dequantized_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(31);
    for (hq, hkv, d) in HEADS {
        check_heads(&mut rng, hq, hkv, d);
    }
}

fn check_heads(rng: &mut ChaCha8Rng, hq: usize, hkv: usize, d: usize) {
    let scale = 1.0 / (d as f64).sqrt();
    let cases: Vec<Case> = vec![
        (16, 12, vec![(40, 1, vec![9, 2, 7]), (0, 20, vec![5, 1]), (10, 9, vec![11, 0]), (0, 1, vec![3])]),
        (4, 24, vec![(7, 1, vec![20, 3]), (0, 13, vec![4, 17, 8, 1])]),
        (256, 3, vec![(150, 1, vec![2]), (120, 140, vec![1, 0])]),
    ];
    for ((target, act), meta_t) in targets().into_iter().flat_map(|t| [DevType::I32, DevType::I64].map(|m| (t, m))) {
        let o = EmitOptions::new(target, act).unwrap();
        for (block_size, num_blocks, chunks) in &cases {
            let sc: Vec<SeqChunk> =
                chunks.iter().map(|(past, new, blocks)| SeqChunk { past: *past, new_tokens: *new, blocks }).collect();
            let m = StepMetadata::build(*block_size, &sc).unwrap();
            m.validate(*num_blocks).unwrap();
            let dims = PagedDims {
                q_heads: hq as u64,
                kv_heads: hkv as u64,
                head_dim: d as u64,
                block_size: *block_size as u64,
                tokens: TExpr::Tokens,
                num_blocks: TExpr::NumBlocks,
                max_blocks: TExpr::MaxBlocks,
                seqs: TExpr::Seqs,
            };
            let dks = paged_attention_int8("panguc_k040_paged_attention_int8", &dims, act, meta_t, scale, &o).unwrap();
            let tokens = m.tokens();
            let slots = num_blocks * block_size;
            let c = hkv * d;
            let q = round_through(act, &rand_vec(rng, tokens * hq * d));
            let kq: Vec<i64> = (0..slots * c).map(|_| rng.random_range(-128i64..=127)).collect();
            let vq: Vec<i64> = (0..slots * c).map(|_| rng.random_range(-128i64..=127)).collect();
            let param = |rng: &mut ChaCha8Rng, lo: f32, hi: f32| -> Vec<f32> {
                (0..c).map(|_| rng.random_range(lo..hi)).collect()
            };
            let (ks, vs) = (param(rng, 0.002, 0.01), param(rng, 0.002, 0.01));
            // Asymmetric channels. (A K offset only shifts every score of a
            // query by the same amount, which softmax cancels; the V
            // offset is what a wrong offset rule would show in.)
            let (ko, vo) = (param(rng, -3.0, 3.0), param(rng, -3.0, 3.0));
            let mut args = vec![
                encode(act, &q),
                encode_i8(&kq),
                encode_i8(&vq),
                ints(meta_t, &m.block_table),
                ints(meta_t, &m.query_start_loc),
                ints(meta_t, &m.context_lens),
                encode(DevType::F32, &ks),
                encode(DevType::F32, &ko),
                encode(DevType::F32, &vs),
                encode(DevType::F32, &vo),
                vec![0; q.len() * act.size() as usize],
            ];
            let env = Env {
                seqs: m.seqs() as u64,
                max_blocks: m.max_blocks as u64,
                num_blocks: *num_blocks as u64,
                ..Env::new(tokens as u64, 0, CORES)
            };
            run_kernels(&dks, target, &env, &mut args).unwrap();
            let deq = |vals: &[i64], s: &[f32], off: &[f32]| -> Tensor {
                let t = quant::dequantize(
                    &Tensor::i64(vec![slots, c], vals.to_vec()),
                    &Tensor::f32(vec![c], s.to_vec()),
                    &Tensor::f32(vec![c], off.to_vec()),
                )
                .unwrap();
                Tensor::f32(vec![*num_blocks, *block_size, hkv, d], t.as_f32().to_vec())
            };
            let meta = m.tensors();
            let want = eval_pure(
                &Op::PagedAttention { scale },
                &[
                    &Tensor::f32(vec![tokens, hq, d], q.clone()),
                    &deq(&kq, &ks, &ko),
                    &deq(&vq, &vs, &vo),
                    &meta[3],
                    &meta[1],
                    &meta[2],
                ],
            )
            .unwrap()
            .remove(0);
            let what = format!("{target} {meta_t} block_size={block_size}");
            assert_close(&decode(act, &args[10]), want.as_f32(), tol(act), 0.1, &what);
        }
    }
}
