//! The ragged-batch ops (paged KV write, paged attention, per-token RoPE
//! positions) against values computed by hand, and paged attention against
//! the contiguous attention op run per sequence.

mod common;
use common::*;
use panguc_ir::batch::{declare_step_inputs, paged_cache_type, SeqChunk, StepMetadata};
use panguc_ir::interp::eval_pure;
use panguc_ir::op::RopeKind;
use panguc_ir::{DType, Dim, Function, Op, Tensor, TensorType};

fn ints(v: &[i32]) -> Tensor {
    Tensor::i64(vec![v.len()], v.iter().map(|&x| x as i64).collect())
}

#[test]
fn kv_cache_write_stores_rows_at_their_slots() {
    // 3 blocks of 2 slots, 1 KV head of width 2; cache holds 9s.
    let cache = Tensor::f32(vec![3, 2, 1, 2], vec![9.0; 12]);
    let new = Tensor::f32(vec![3, 1, 2], vec![1., 2., 3., 4., 5., 6.]);
    let out = eval_pure(&Op::KvCacheWrite, &[&cache, &new, &ints(&[5, 0, 1])]).unwrap().remove(0);
    // slot 5 = block 2 offset 1 <- [1,2]; slot 0 <- [3,4]; slot 1 <- [5,6].
    close(&out, &[3, 2, 1, 2], &[3., 4., 5., 6., 9., 9., 9., 9., 9., 9., 1., 2.]);
    let e = eval_pure(&Op::KvCacheWrite, &[&cache, &new, &ints(&[5, 0, 6])]).unwrap_err();
    assert!(e.contains("slot 6 is outside the cache of 6 slots"), "{e}");
    let e = eval_pure(&Op::KvCacheWrite, &[&cache, &new, &ints(&[1, 0, 1])]).unwrap_err();
    assert!(e.contains("slot 1 is written twice"), "{e}");
}

/// `[num_blocks=5, block_size=2, kv_heads=2, head_dim=1]` filled with a
/// sentinel that would dominate any softmax it leaked into.
fn sentinel_cache() -> Vec<f32> {
    vec![1000.0; 5 * 2 * 2]
}

/// Put `(kv0, kv1)` at `slot` of a `[5, 2, 2, 1]` cache.
fn put(cache: &mut [f32], slot: usize, kv0: f32, kv1: f32) {
    cache[slot * 2] = kv0;
    cache[slot * 2 + 1] = kv1;
}

/// Two sequences of different lengths in one step, both with scattered
/// blocks, the second a prefill chunk crossing a block boundary, GQA with 4
/// query heads over 2 KV heads.
#[test]
fn paged_attention_two_ragged_sequences_hand_computed() {
    // Sequence 0: 2 cached tokens, decodes 1; blocks 3 then 1 (descending).
    // Sequence 1: 1 cached token, a 3-token prefill chunk; blocks 0 then 4,
    // so the chunk's positions 1 | 2, 3 straddle the block boundary.
    let step = StepMetadata::build(
        2,
        &[SeqChunk { past: 2, new_tokens: 1, blocks: &[3, 1] }, SeqChunk { past: 1, new_tokens: 3, blocks: &[0, 4] }],
    )
    .unwrap();
    assert_eq!(step.query_start_loc, vec![0, 1, 4]);
    assert_eq!(step.context_lens, vec![3, 4]);
    assert_eq!(step.positions, vec![2, 1, 2, 3]);
    // seq 0 position 2 -> block 1 offset 0 = slot 2; seq 1 positions 1, 2, 3
    // -> block 0 offset 1 = 1, block 4 offset 0 = 8, offset 1 = 9.
    assert_eq!(step.slot_mapping, vec![2, 1, 8, 9]);
    assert_eq!(step.block_table, vec![3, 1, 0, 4]);
    step.validate(5).unwrap();

    // KV head 0 keys are ln(p+1), so with q = 1 the softmax weights of keys
    // 0..=p are proportional to 1, 2, 3, ...; KV head 1 keys are 0, so its
    // weights are uniform for any q. Values:
    //   seq 0: kv0 1, 2, 4    kv1 8, 16, 32      (positions 0, 1, 2)
    //   seq 1: kv0 3, 5, 7, 9 kv1 100, 200, 300, 400
    let ln = |x: f32| x.ln();
    let (mut k, mut v) = (sentinel_cache(), sentinel_cache());
    // Cached past: seq 0 positions 0, 1 in block 3 (slots 6, 7); seq 1
    // position 0 in block 0 (slot 0).
    put(&mut k, 6, ln(1.), 0.);
    put(&mut v, 6, 1., 8.);
    put(&mut k, 7, ln(2.), 0.);
    put(&mut v, 7, 2., 16.);
    put(&mut k, 0, ln(1.), 0.);
    put(&mut v, 0, 3., 100.);
    // This step's new rows (seq 0 pos 2; seq 1 pos 1, 2, 3), written through
    // the slot mapping.
    let new_k = Tensor::f32(vec![4, 2, 1], vec![ln(3.), 0., ln(2.), 0., ln(3.), 0., ln(4.), 0.]);
    let new_v = Tensor::f32(vec![4, 2, 1], vec![4., 32., 5., 200., 7., 300., 9., 400.]);
    let m = step.tensors();
    let (pos, qsl, ctx, table, slots) = (&m[0], &m[1], &m[2], &m[3], &m[4]);
    assert_eq!(pos.as_i64(), &[2, 1, 2, 3]);
    let cache = |d: Vec<f32>| Tensor::f32(vec![5, 2, 2, 1], d);
    let kc = eval_pure(&Op::KvCacheWrite, &[&cache(k), &new_k, slots]).unwrap().remove(0);
    let vc = eval_pure(&Op::KvCacheWrite, &[&cache(v), &new_v, slots]).unwrap().remove(0);

    // Query heads: h0 q=1 and h1 q=0 read KV head 0; h2 q=1 and h3 q=5 read
    // KV head 1 (uniform). Same queries on every row.
    let q = Tensor::f32(vec![4, 4, 1], [1., 0., 1., 5.].repeat(4));
    let out = eval_pure(&Op::PagedAttention { scale: 1.0 }, &[&q, &kc, &vc, table, qsl, ctx]).unwrap().remove(0);
    #[rustfmt::skip]
    let want = [
        // seq 0, position 2 (decode) sees 0..=2:
        //   h0 (1*1 + 2*2 + 3*4)/6 = 17/6, h1 (1+2+4)/3 = 7/3, h2 = h3 = (8+16+32)/3 = 56/3
        17. / 6., 7. / 3., 56. / 3., 56. / 3.,
        // seq 1, position 1 sees 0..=1: h0 (1*3 + 2*5)/3 = 13/3, h1 (3+5)/2 = 4, h2 = h3 = 150
        13. / 3., 4., 150., 150.,
        // position 2 sees 0..=2: h0 (3 + 10 + 21)/6 = 17/3, h1 15/3 = 5, h2 = h3 = 200
        17. / 3., 5., 200., 200.,
        // position 3 sees 0..=3: h0 (3 + 10 + 21 + 36)/10 = 7, h1 24/4 = 6, h2 = h3 = 250
        7., 6., 250., 250.,
    ];
    close(&out, &[4, 4, 1], &want);
}

#[test]
fn paged_attention_rejects_malformed_steps() {
    let q = Tensor::f32(vec![2, 1, 1], vec![1., 1.]);
    let c = Tensor::zeros(vec![2, 2, 1, 1]);
    let run = |table: &[i32], qsl: &[i32], ctx: &[i32]| {
        let t = Tensor::i64(vec![ctx.len(), table.len() / ctx.len()], table.iter().map(|&x| x as i64).collect());
        eval_pure(&Op::PagedAttention { scale: 1.0 }, &[&q, &c, &c, &t, &ints(qsl), &ints(ctx)]).unwrap_err()
    };
    assert!(run(&[0, 2], &[0, 2], &[3]).contains("block 2 is outside the cache of 2 blocks"));
    assert!(run(&[0, 1], &[0, 1], &[3]).contains("ends at 1 but the step has 2 tokens"));
    assert!(run(&[0, 1], &[0, 2], &[1]).contains("context length 1 is shorter than its 2 new tokens"));
    assert!(run(&[0, 1], &[0, 2], &[5]).contains("context 5 exceeds its block table"));
}

/// Rows `rows` of a `[T, ...]` tensor.
fn rows(t: &Tensor, rows: std::ops::Range<usize>) -> Tensor {
    let w: usize = t.shape[1..].iter().product();
    let mut shape = t.shape.clone();
    shape[0] = rows.len();
    Tensor::f32(shape, t.as_f32()[rows.start * w..rows.end * w].to_vec())
}

#[test]
fn paged_attention_equals_contiguous_attention_per_sequence() {
    let (heads, kv_heads, d, block_size, num_blocks) = (4, 2, 8, 4, 16);
    // (past, new tokens, blocks): a long decode, a fresh prefill, a chunk
    // continuing a prefill across blocks, a one-token sequence.
    let chunks = [
        SeqChunk { past: 9, new_tokens: 1, blocks: &[7, 2, 11] },
        SeqChunk { past: 0, new_tokens: 6, blocks: &[0, 15] },
        SeqChunk { past: 5, new_tokens: 5, blocks: &[3, 9, 4] },
        SeqChunk { past: 0, new_tokens: 1, blocks: &[12] },
    ];
    let step = StepMetadata::build(block_size, &chunks).unwrap();
    step.validate(num_blocks).unwrap();
    let tokens = step.tokens();
    let m = step.tensors();
    let cache_shape = [num_blocks, block_size, kv_heads, d];
    // The past of every sequence is whatever the random cache holds in its
    // blocks; the new rows are written through the slot mapping.
    let (k0, v0) = (data(1, &cache_shape), data(2, &cache_shape));
    let (new_k, new_v) = (data(3, &[tokens, kv_heads, d]), data(4, &[tokens, kv_heads, d]));
    let kc = eval_pure(&Op::KvCacheWrite, &[&k0, &new_k, &m[4]]).unwrap().remove(0);
    let vc = eval_pure(&Op::KvCacheWrite, &[&v0, &new_v, &m[4]]).unwrap().remove(0);
    let q = data(5, &[tokens, heads, d]);
    let scale = 1.0 / (d as f64).sqrt();
    let paged = eval_pure(&Op::PagedAttention { scale }, &[&q, &kc, &vc, &m[3], &m[1], &m[2]]).unwrap().remove(0);

    for (s, c) in chunks.iter().enumerate() {
        // The contiguous cache of sequence s: its past read from its blocks
        // in the original cache, then its new rows.
        let ctx = c.past + c.new_tokens;
        let past_rows = |cache: &Tensor, new: &Tensor| {
            let w = kv_heads * d;
            let mut v = Vec::new();
            for p in 0..c.past {
                let slot = c.blocks[p / block_size] as usize * block_size + p % block_size;
                v.extend_from_slice(&cache.as_f32()[slot * w..(slot + 1) * w]);
            }
            v.extend_from_slice(rows(new, step.rows(s)).as_f32());
            Tensor::f32(vec![ctx, kv_heads, d], v)
        };
        let (k, v) = (past_rows(&k0, &new_k), past_rows(&v0, &new_v));
        let pos = Tensor::i64(vec![c.new_tokens], (c.past..ctx).map(|p| p as i64).collect());
        let alone = eval_pure(&Op::FlashAttention { scale }, &[&rows(&q, step.rows(s)), &k, &v, &pos]).unwrap();
        let got = rows(&paged, step.rows(s));
        assert_eq!(got.shape, alone[0].shape);
        let diff = got.max_rel_diff(&alone[0], 1e-3);
        assert!(diff < 1e-6, "sequence {s} differs by {diff}");
    }
}

#[test]
fn rope_tables_follow_per_token_positions() {
    // The step's i32 positions [3, 0, 1] give each row its own angle:
    // head_dim 2, angle = position (theta^0 = 1), so cos rows are cos 3, cos 0, cos 1.
    let cos = eval_pure(&Op::RopeTable { kind: RopeKind::Cos, theta: 1e4, head_dim: 2 }, &[&ints(&[3, 0, 1])])
        .unwrap()
        .remove(0);
    let (c3, c1) = (3f32.cos(), 1f32.cos());
    close(&cos, &[3, 2], &[c3, c3, 1., 1., c1, c1]);
}

/// A batched attention block built from the typed step inputs verifies and
/// infers the documented types; the verifier names each broken rule.
#[test]
fn batched_ops_type_check() {
    let mut f = Function::new("step");
    let step = declare_step_inputs(&mut f);
    let t = Dim::tokens();
    let cache_ty = paged_cache_type(DType::F32, 16, 2, 8);
    assert_eq!(cache_ty.to_string(), "f32[num_blocks,16,2,8]");
    let (kc, vc) = (f.add_input("k_cache", cache_ty.clone()), f.add_input("v_cache", cache_ty.clone()));
    let q = f.add_input("q", TensorType::new(DType::F32, vec![t.clone(), Dim::c(4), Dim::c(8)]));
    let kv = f.add_input("kv", TensorType::new(DType::F32, vec![t.clone(), Dim::c(2), Dim::c(8)]));
    let cos = f.op(Op::RopeTable { kind: RopeKind::Cos, theta: 1e4, head_dim: 8 }, &[step.positions], "cos").unwrap();
    assert_eq!(f.ty(cos).to_string(), "f32[tokens,8]");
    let k2 = f.op(Op::KvCacheWrite, &[kc, kv, step.slot_mapping], "k2").unwrap();
    let v2 = f.op(Op::KvCacheWrite, &[vc, kv, step.slot_mapping], "v2").unwrap();
    assert_eq!(f.ty(k2), &cache_ty);
    let att = Op::PagedAttention { scale: 0.5 };
    let args = [q, k2, v2, step.block_table, step.query_start_loc, step.context_lens];
    let o = f.op(att.clone(), &args, "o").unwrap();
    assert_eq!(f.ty(o).to_string(), "f32[tokens,4,8]");
    assert_eq!(f.ty(step.query_start_loc).to_string(), "i32[seqs+1]");
    assert_eq!(f.ty(step.block_table).to_string(), "i32[seqs,max_blocks]");
    f.outputs = vec![o, k2, v2];
    panguc_ir::verify::verify_function(&f, None).unwrap();

    // Metadata must be i32 of the documented shapes.
    let pos64 = f.add_input("pos64", TensorType::new(DType::I64, vec![t.clone()]));
    let e = f.op(Op::KvCacheWrite, &[kc, kv, pos64], "bad").unwrap_err();
    assert!(e.contains("slot_mapping must be an i32 tensor of rank 1"), "{e}");
    let e = f.op(att.clone(), &[q, k2, v2, step.block_table, step.context_lens, step.context_lens], "bad").unwrap_err();
    assert!(e.contains("query_start_loc length vs seqs+1: seqs != seqs+1"), "{e}");
    // GQA needs heads divisible by KV heads.
    let q3 = f.add_input("q3", TensorType::new(DType::F32, vec![t.clone(), Dim::c(3), Dim::c(8)]));
    let e = f.op(att.clone(), &[q3, k2, v2, step.block_table, step.query_start_loc, step.context_lens], "bad");
    assert!(e.unwrap_err().contains("query heads 3 not a multiple of KV heads 2"));
    // New rows must match the cache's heads.
    let e = f.op(Op::KvCacheWrite, &[kc, q, step.slot_mapping], "bad").unwrap_err();
    assert!(e.contains("kv heads of the new rows vs the cache: 4 != 2"), "{e}");
}
