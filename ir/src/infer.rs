//! Result-type inference for every op. The builder uses it to type new
//! nodes; the verifier re-runs it to check recorded types.

use crate::graph::Module;
use crate::op::{CollectiveKind, Op, ReduceOp};
use crate::shape::{Dim, TensorType};
use crate::DType;

mod quant;

type R<T> = Result<T, String>;

fn expect_arity(op: &Op, args: &[&TensorType], n: usize) -> R<()> {
    if args.len() != n {
        return Err(format!("`{}` takes {n} operands, found {}", op.mnemonic(), args.len()));
    }
    Ok(())
}

fn expect_float(t: &TensorType, what: &str) -> R<()> {
    if !t.dtype.is_float() {
        return Err(format!("{what} must be a float tensor, found {t}"));
    }
    Ok(())
}

fn expect_int(t: &TensorType, what: &str) -> R<()> {
    if !t.dtype.is_int() {
        return Err(format!("{what} must be an integer tensor, found {t}"));
    }
    Ok(())
}

/// Batch metadata (offsets, lengths, block tables, slots, counts) is `i32`,
/// the layout of [`crate::batch::StepMetadata`] and of the Ascend/vLLM kernels.
fn expect_i32(t: &TensorType, rank: usize, what: &str) -> R<()> {
    if t.dtype != DType::I32 || t.rank() != rank {
        return Err(format!("{what} must be an i32 tensor of rank {rank}, found {t}"));
    }
    Ok(())
}

fn expect_rank(t: &TensorType, rank: usize, what: &str) -> R<()> {
    if t.rank() != rank {
        return Err(format!("{what} must have rank {rank}, found {t}"));
    }
    Ok(())
}

fn expect_dim_eq(a: &Dim, b: &Dim, what: &str) -> R<()> {
    if a != b {
        return Err(format!("{what}: {a} != {b}"));
    }
    Ok(())
}

fn check_axis(axis: usize, rank: usize) -> R<()> {
    if axis >= rank {
        return Err(format!("axis {axis} out of range for rank {rank}"));
    }
    Ok(())
}

/// Numpy-style broadcast of two shapes.
pub fn broadcast_shapes(a: &[Dim], b: &[Dim]) -> R<Vec<Dim>> {
    let rank = a.len().max(b.len());
    let one = Dim::c(1);
    (0..rank)
        .map(|i| {
            let da = if i + a.len() >= rank { &a[i + a.len() - rank] } else { &one };
            let db = if i + b.len() >= rank { &b[i + b.len() - rank] } else { &one };
            if da == db || *db == one {
                Ok(da.clone())
            } else if *da == one {
                Ok(db.clone())
            } else {
                Err(format!("cannot broadcast dimension {da} with {db}"))
            }
        })
        .collect()
}

fn matmul_type(a: &TensorType, b: &TensorType, transpose_b: bool) -> R<TensorType> {
    expect_float(a, "matmul lhs")?;
    expect_float(b, "matmul rhs")?;
    if a.rank() < 2 || b.rank() < 2 {
        return Err(format!("matmul operands must have rank >= 2, found {a} and {b}"));
    }
    let (m, k) = (&a.shape[a.rank() - 2], &a.shape[a.rank() - 1]);
    let (kb, n) = if transpose_b {
        (&b.shape[b.rank() - 1], &b.shape[b.rank() - 2])
    } else {
        (&b.shape[b.rank() - 2], &b.shape[b.rank() - 1])
    };
    expect_dim_eq(k, kb, "matmul contraction dims differ")?;
    let mut shape = broadcast_shapes(&a.shape[..a.rank() - 2], &b.shape[..b.rank() - 2])?;
    shape.push(m.clone());
    shape.push(n.clone());
    Ok(TensorType::new(a.dtype, shape))
}

fn same_numel(a: &[Dim], b: &[Dim]) -> R<()> {
    let numel = |s: &[Dim]| s.iter().try_fold(Dim::c(1), |acc, d| acc.mul(d));
    match (numel(a), numel(b)) {
        (Some(x), Some(y)) if x == y => Ok(()),
        (Some(x), Some(y)) => Err(format!("reshape changes the element count: {x} vs {y}")),
        _ => Err("reshape of a shape with a non-linear element count".into()),
    }
}

/// Infer result types of `op` applied to operands of types `args`.
pub fn infer_types(op: &Op, args: &[&TensorType], module: Option<&Module>) -> R<Vec<TensorType>> {
    let one = |t: TensorType| Ok(vec![t]);
    match op {
        Op::Gather => {
            expect_arity(op, args, 2)?;
            let (table, idx) = (args[0], args[1]);
            expect_int(idx, "gather indices")?;
            if table.rank() < 1 {
                return Err("gather table must have rank >= 1".into());
            }
            let mut shape = idx.shape.clone();
            shape.extend_from_slice(&table.shape[1..]);
            one(TensorType::new(table.dtype, shape))
        }
        Op::MatMul { transpose_b } => {
            expect_arity(op, args, 2)?;
            one(matmul_type(args[0], args[1], *transpose_b)?)
        }
        Op::MatMulBias { transpose_b } => {
            expect_arity(op, args, 3)?;
            let out = matmul_type(args[0], args[1], *transpose_b)?;
            expect_float(args[2], "bias")?;
            expect_rank(args[2], 1, "bias")?;
            expect_dim_eq(
                &args[2].shape[0],
                out.shape.last().expect("rank>=2"),
                "bias length differs from matmul columns",
            )?;
            one(out)
        }
        Op::Unary(_) => {
            expect_arity(op, args, 1)?;
            expect_float(args[0], "operand")?;
            one(args[0].clone())
        }
        Op::Binary(_) => {
            expect_arity(op, args, 2)?;
            if args[0].dtype != args[1].dtype {
                return Err(format!("operand dtypes differ: {} vs {}", args[0], args[1]));
            }
            one(TensorType::new(args[0].dtype, broadcast_shapes(&args[0].shape, &args[1].shape)?))
        }
        Op::Scalar { dtype, .. } => {
            expect_arity(op, args, 0)?;
            one(TensorType::new(*dtype, vec![]))
        }
        Op::Reduce { op: r, axis, keepdim } => {
            expect_arity(op, args, 1)?;
            if *r != ReduceOp::Max {
                expect_float(args[0], "reduce operand")?;
            }
            one(TensorType::new(args[0].dtype, reduced_shape(args[0], *axis, *keepdim)?))
        }
        Op::ArgMax { axis, keepdim } => {
            expect_arity(op, args, 1)?;
            one(TensorType::new(DType::I64, reduced_shape(args[0], *axis, *keepdim)?))
        }
        Op::Softmax { axis } => {
            expect_arity(op, args, 1)?;
            expect_float(args[0], "softmax operand")?;
            check_axis(*axis, args[0].rank())?;
            one(args[0].clone())
        }
        Op::Reshape { shape } => {
            expect_arity(op, args, 1)?;
            same_numel(&args[0].shape, shape)?;
            one(TensorType::new(args[0].dtype, shape.clone()))
        }
        Op::Transpose { perm } => {
            expect_arity(op, args, 1)?;
            let x = args[0];
            let mut sorted = perm.clone();
            sorted.sort_unstable();
            if sorted != (0..x.rank()).collect::<Vec<_>>() {
                return Err(format!("perm {perm:?} is not a permutation of rank {}", x.rank()));
            }
            one(TensorType::new(x.dtype, perm.iter().map(|&p| x.shape[p].clone()).collect()))
        }
        Op::Slice { axis, start, end } => {
            expect_arity(op, args, 1)?;
            let x = args[0];
            check_axis(*axis, x.rank())?;
            let len = x.shape[*axis]
                .as_const()
                .ok_or_else(|| format!("slice along symbolic dimension {}", x.shape[*axis]))?;
            if start > end || *end > len {
                return Err(format!("slice {start}..{end} out of range for dimension {len}"));
            }
            let mut shape = x.shape.clone();
            shape[*axis] = Dim::c(end - start);
            one(TensorType::new(x.dtype, shape))
        }
        Op::Concat { axis } => {
            let first = args.first().ok_or("concat needs at least one operand")?;
            check_axis(*axis, first.rank())?;
            let mut total = Dim::c(0);
            for a in args {
                if a.dtype != first.dtype || a.rank() != first.rank() {
                    return Err(format!("concat operands differ: {first} vs {a}"));
                }
                for (i, (x, y)) in a.shape.iter().zip(&first.shape).enumerate() {
                    if i != *axis {
                        expect_dim_eq(x, y, "concat operands differ off the axis")?;
                    }
                }
                total = total.add(&a.shape[*axis]);
            }
            let mut shape = first.shape.clone();
            shape[*axis] = total;
            one(TensorType::new(first.dtype, shape))
        }
        Op::Stack { axis } => {
            let first = args.first().ok_or("stack needs at least one operand")?;
            if *axis > first.rank() {
                return Err(format!("stack axis {axis} out of range"));
            }
            if let Some(a) = args.iter().find(|a| *a != first) {
                return Err(format!("stack operands differ: {first} vs {a}"));
            }
            let mut shape = first.shape.clone();
            shape.insert(*axis, Dim::c(args.len()));
            one(TensorType::new(first.dtype, shape))
        }
        Op::RepeatInterleave { axis, repeats } => {
            expect_arity(op, args, 1)?;
            check_axis(*axis, args[0].rank())?;
            let mut t = args[0].clone();
            t.shape[*axis] = t.shape[*axis].scale(*repeats as i64);
            one(t)
        }
        Op::Cast { dtype } => {
            expect_arity(op, args, 1)?;
            one(TensorType::new(*dtype, args[0].shape.clone()))
        }
        Op::RopeTable { head_dim, .. } => {
            expect_arity(op, args, 1)?;
            expect_int(args[0], "positions")?;
            expect_rank(args[0], 1, "positions")?;
            if head_dim % 2 != 0 {
                return Err(format!("rope head_dim {head_dim} must be even"));
            }
            one(TensorType::new(DType::F32, vec![args[0].shape[0].clone(), Dim::c(*head_dim)]))
        }
        Op::CausalMask => {
            expect_arity(op, args, 2)?;
            expect_int(args[0], "positions")?;
            expect_rank(args[0], 1, "positions")?;
            if args[1].rank() < 1 {
                return Err("causal_mask keys must have rank >= 1".into());
            }
            one(TensorType::new(DType::F32, vec![args[0].shape[0].clone(), args[1].shape[0].clone()]))
        }
        Op::Iota { len, .. } => {
            expect_arity(op, args, 0)?;
            one(TensorType::new(DType::I64, vec![Dim::c(*len)]))
        }
        Op::OneHot { depth } => {
            expect_arity(op, args, 1)?;
            expect_int(args[0], "one_hot indices")?;
            let mut shape = args[0].shape.clone();
            shape.push(Dim::c(*depth));
            one(TensorType::new(DType::F32, shape))
        }
        Op::Call { func, .. } => {
            let module = module.ok_or("call outside a module")?;
            let (ins, outs) = module.signature(func).ok_or_else(|| format!("call of unknown function @{func}"))?;
            if ins.len() != args.len() {
                return Err(format!("@{func} takes {} inputs, {} given", ins.len(), args.len()));
            }
            for (i, (want, got)) in ins.iter().zip(args).enumerate() {
                if want != *got {
                    return Err(format!("argument {i} of @{func}: expected {want}, found {got}"));
                }
            }
            Ok(outs)
        }
        Op::RmsNorm { .. } => {
            expect_arity(op, args, 2)?;
            norm_check(args[0], args[2 - 1])?;
            one(args[0].clone())
        }
        Op::AddRmsNorm { .. } => {
            expect_arity(op, args, 3)?;
            if args[0] != args[1] {
                return Err(format!("add_rms_norm operands differ: {} vs {}", args[0], args[1]));
            }
            norm_check(args[0], args[2])?;
            Ok(vec![args[0].clone(), args[0].clone()])
        }
        Op::Split { axis, sizes } => {
            expect_arity(op, args, 1)?;
            let x = args[0];
            check_axis(*axis, x.rank())?;
            let total: usize = sizes.iter().sum();
            expect_dim_eq(&x.shape[*axis], &Dim::c(total), "split sizes do not cover the axis")?;
            Ok(sizes
                .iter()
                .map(|s| {
                    let mut t = x.clone();
                    t.shape[*axis] = Dim::c(*s);
                    t
                })
                .collect())
        }
        Op::Rope => {
            expect_arity(op, args, 3)?;
            let (x, cos, sin) = (args[0], args[1], args[2]);
            expect_float(x, "rope operand")?;
            expect_rank(x, 3, "rope operand")?;
            for t in [cos, sin] {
                expect_rank(t, 2, "rope table")?;
                expect_dim_eq(&t.shape[0], &x.shape[0], "rope table rows")?;
                expect_dim_eq(&t.shape[1], &x.shape[2], "rope table width")?;
            }
            one(x.clone())
        }
        Op::SwiGlu => {
            expect_arity(op, args, 2)?;
            if args[0] != args[1] {
                return Err(format!("swiglu operands differ: {} vs {}", args[0], args[1]));
            }
            expect_float(args[0], "swiglu operand")?;
            one(args[0].clone())
        }
        Op::GateUpSwiGlu => {
            expect_arity(op, args, 2)?;
            let (x, w) = (args[0], args[1]);
            expect_rank(w, 2, "gate_up weight")?;
            let out = matmul_type(x, w, true)?;
            let two_i = out.shape.last().expect("rank>=2").clone();
            let i = two_i.div_exact(2).ok_or_else(|| format!("gate_up rows {two_i} not even"))?;
            let mut shape = out.shape.clone();
            *shape.last_mut().expect("rank>=2") = i;
            one(TensorType::new(out.dtype, shape))
        }
        Op::FlashAttention { .. } => {
            expect_arity(op, args, 4)?;
            let (q, k, v, pos) = (args[0], args[1], args[2], args[3]);
            for (t, n) in [(q, "q"), (k, "k"), (v, "v")] {
                expect_float(t, n)?;
                expect_rank(t, 3, n)?;
            }
            if k != v {
                return Err(format!("attention k and v differ: {k} vs {v}"));
            }
            expect_dim_eq(&q.shape[2], &k.shape[2], "attention head dims")?;
            let (hq, hkv) = (q.shape[1].as_const(), k.shape[1].as_const());
            match (hq, hkv) {
                (Some(a), Some(b)) if b > 0 && a % b == 0 => {}
                _ => return Err(format!("query heads {} not a multiple of KV heads {}", q.shape[1], k.shape[1])),
            }
            expect_int(pos, "positions")?;
            expect_rank(pos, 1, "positions")?;
            expect_dim_eq(&pos.shape[0], &q.shape[0], "positions length")?;
            one(q.clone())
        }
        Op::KvCacheWrite => {
            expect_arity(op, args, 3)?;
            let (cache, new, slots) = (args[0], args[1], args[2]);
            // An int8 cache (C8) stores rows quantized by `quantize`.
            if !(cache.dtype.is_float() || cache.dtype == DType::I8) {
                return Err(format!("kv cache must be a float or i8 tensor, found {cache}"));
            }
            expect_rank(cache, 4, "kv cache [num_blocks, block_size, kv_heads, head_dim]")?;
            expect_rank(new, 3, "new kv rows [tokens, kv_heads, head_dim]")?;
            if new.dtype != cache.dtype {
                return Err(format!("new kv rows {new} differ in dtype from the cache {cache}"));
            }
            expect_dim_eq(&new.shape[1], &cache.shape[2], "kv heads of the new rows vs the cache")?;
            expect_dim_eq(&new.shape[2], &cache.shape[3], "head_dim of the new rows vs the cache")?;
            expect_i32(slots, 1, "slot_mapping")?;
            expect_dim_eq(&slots.shape[0], &new.shape[0], "slot_mapping length vs new rows")?;
            one(cache.clone())
        }
        Op::PagedAttention { .. } => {
            expect_arity(op, args, 6)?;
            let (q, kc, vc, table, qsl, ctx) = (args[0], args[1], args[2], args[3], args[4], args[5]);
            expect_float(q, "q")?;
            expect_rank(q, 3, "q [tokens, heads, head_dim]")?;
            expect_float(kc, "k cache")?;
            expect_rank(kc, 4, "k cache [num_blocks, block_size, kv_heads, head_dim]")?;
            if kc != vc {
                return Err(format!("k and v caches differ: {kc} vs {vc}"));
            }
            expect_dim_eq(&q.shape[2], &kc.shape[3], "attention head dims")?;
            match (q.shape[1].as_const(), kc.shape[2].as_const()) {
                (Some(a), Some(b)) if b > 0 && a % b == 0 => {}
                _ => return Err(format!("query heads {} not a multiple of KV heads {}", q.shape[1], kc.shape[2])),
            }
            expect_i32(table, 2, "block_table")?;
            expect_i32(qsl, 1, "query_start_loc")?;
            expect_i32(ctx, 1, "context_lens")?;
            let seqs = &table.shape[0];
            expect_dim_eq(&ctx.shape[0], seqs, "context_lens length vs block_table rows")?;
            expect_dim_eq(&qsl.shape[0], &seqs.add(&Dim::c(1)), "query_start_loc length vs seqs+1")?;
            one(q.clone())
        }
        Op::MoeInitRouting { experts } => {
            expect_arity(op, args, 2)?;
            let (x, ids) = (args[0], args[1]);
            expect_float(x, "moe_init_routing rows")?;
            expect_rank(x, 2, "moe_init_routing rows")?;
            expect_int(ids, "expert ids")?;
            expect_rank(ids, 2, "expert ids")?;
            expect_dim_eq(&ids.shape[0], &x.shape[0], "expert id rows vs input rows")?;
            if *experts == 0 {
                return Err("moe_init_routing needs at least one expert".into());
            }
            let expanded = x.shape[0].mul(&ids.shape[1]).ok_or("symbolic top-k width")?;
            Ok(vec![
                TensorType::new(x.dtype, vec![expanded.clone(), x.shape[1].clone()]),
                TensorType::new(DType::I32, vec![expanded]),
                TensorType::new(DType::I32, vec![Dim::c(*experts)]),
            ])
        }
        Op::GroupedMatmul => {
            expect_arity(op, args, 3)?;
            let (x, w, counts) = (args[0], args[1], args[2]);
            expect_float(x, "grouped_matmul rows")?;
            expect_rank(x, 2, "grouped_matmul rows")?;
            expect_float(w, "grouped_matmul weights")?;
            expect_rank(w, 3, "grouped_matmul weights [experts, N, K]")?;
            expect_dim_eq(&w.shape[2], &x.shape[1], "grouped_matmul contraction dims differ")?;
            expect_int(counts, "expert counts")?;
            expect_rank(counts, 1, "expert counts")?;
            expect_dim_eq(&counts.shape[0], &w.shape[0], "expert counts vs weight experts")?;
            one(TensorType::new(x.dtype, vec![x.shape[0].clone(), w.shape[1].clone()]))
        }
        Op::MoeFinalizeRouting => {
            if args.len() < 3 {
                return Err(format!("`{}` takes at least 3 operands, found {}", op.mnemonic(), args.len()));
            }
            let (y, w, idx) = (args[0], args[1], args[2]);
            expect_float(y, "expanded rows")?;
            expect_rank(y, 2, "expanded rows")?;
            expect_float(w, "routing weights")?;
            expect_rank(w, 2, "routing weights")?;
            expect_int(idx, "expanded_row_idx")?;
            expect_rank(idx, 1, "expanded_row_idx")?;
            let expanded = w.shape[0].mul(&w.shape[1]).ok_or("symbolic top-k width")?;
            expect_dim_eq(&y.shape[0], &expanded, "expanded rows vs tokens*k")?;
            expect_dim_eq(&idx.shape[0], &expanded, "expanded_row_idx length vs tokens*k")?;
            let out = TensorType::new(y.dtype, vec![w.shape[0].clone(), y.shape[1].clone()]);
            for skip in &args[3..] {
                if **skip != out {
                    return Err(format!("skip term {skip} differs from the combined output {out}"));
                }
            }
            one(out)
        }
        Op::MoeGatingGroupTopK { groups } => {
            expect_arity(op, args, 2)?;
            let (logits, scale) = (args[0], args[1]);
            expect_float(logits, "router logits")?;
            expect_rank(logits, 2, "router logits")?;
            expect_rank(scale, 1, "router scale")?;
            expect_dim_eq(&scale.shape[0], &logits.shape[1], "router scale length")?;
            let e = logits.shape[1].as_const().ok_or("symbolic expert count")?;
            if *groups == 0 || e % groups != 0 {
                return Err(format!("{e} experts are not divisible into {groups} groups"));
            }
            let t = logits.shape[0].clone();
            Ok(vec![
                TensorType::new(DType::F32, vec![t.clone(), Dim::c(*groups)]),
                TensorType::new(DType::I64, vec![t, Dim::c(*groups)]),
            ])
        }
        Op::GroupedMatmulMoe => {
            expect_arity(op, args, 5)?;
            let (x, w, e, gu, down) = (args[0], args[1], args[2], args[3], args[4]);
            expect_rank(x, 2, "moe input")?;
            expect_rank(w, 2, "moe weights")?;
            expect_int(e, "moe experts")?;
            if w.shape != e.shape {
                return Err(format!("moe weights {w} and experts {e} differ in shape"));
            }
            expect_rank(gu, 3, "gate_up weights")?;
            expect_rank(down, 3, "down weights")?;
            expect_dim_eq(&gu.shape[2], &x.shape[1], "gate_up input width")?;
            expect_dim_eq(&down.shape[1], &x.shape[1], "down output width")?;
            expect_dim_eq(&gu.shape[1], &down.shape[2].scale(2), "gate_up rows vs down width")?;
            expect_dim_eq(&gu.shape[0], &down.shape[0], "expert counts")?;
            one(x.clone())
        }
        Op::QkvRope { q_heads, kv_heads } => {
            expect_arity(op, args, 7)?;
            let (q, kv) = qkv_heads_types(&args[..5], *q_heads, *kv_heads)?;
            let (kc, vc) = (args[5], args[6]);
            if kc != vc {
                return Err(format!("k and v caches differ: {kc} vs {vc}"));
            }
            expect_rank(kc, 3, "kv cache")?;
            expect_dim_eq(&kc.shape[1], &kv.shape[1], "kv cache heads")?;
            expect_dim_eq(&kc.shape[2], &kv.shape[2], "kv cache head_dim")?;
            if kc.dtype != kv.dtype {
                return Err(format!("kv cache dtype {} differs from the activations' {}", kc.dtype, kv.dtype));
            }
            let mut all = kc.clone();
            all.shape[0] = kc.shape[0].add(&kv.shape[0]);
            Ok(vec![q, all.clone(), all])
        }
        Op::QkvRopeCacheWrite { q_heads, kv_heads } => {
            expect_arity(op, args, 8)?;
            let (q, kv) = qkv_heads_types(&args[..5], *q_heads, *kv_heads)?;
            let (kc, vc, slots) = (args[5], args[6], args[7]);
            let k_all = infer_types(&Op::KvCacheWrite, &[kc, &kv, slots], module)?.remove(0);
            let v_all = infer_types(&Op::KvCacheWrite, &[vc, &kv, slots], module)?.remove(0);
            if k_all != v_all {
                return Err(format!("k and v caches differ: {kc} vs {vc}"));
            }
            Ok(vec![q, k_all, v_all])
        }
        Op::MoeRouterTopK { groups } => {
            expect_arity(op, args, 3)?;
            expect_rank(args[0], 2, "router input")?;
            expect_rank(args[1], 2, "router weight")?;
            let logits = matmul_type(args[0], args[1], true)?;
            infer_types(&Op::MoeGatingGroupTopK { groups: *groups }, &[&logits, args[2]], module)
        }
        Op::MoeFfn | Op::MoeGroupedFfn => {
            expect_arity(op, args, 8)?;
            let out = infer_types(&Op::GroupedMatmulMoe, &args[..5], module)?;
            let act = infer_types(&Op::GateUpSwiGlu, &[args[0], args[5]], module)?;
            let shared = matmul_type(&act[0], args[6], true)?;
            if shared != out[0] {
                return Err(format!("shared expert output {shared} differs from the routed output {}", out[0]));
            }
            if *args[7] != out[0] {
                return Err(format!("residual {} differs from the moe output {}", args[7], out[0]));
            }
            Ok(out)
        }
        Op::FusedElementwise { expr } => {
            crate::op::parse_elementwise(expr, args.len())?;
            let first = args.first().ok_or("fused_elementwise needs at least one operand")?;
            let mut shape = first.shape.clone();
            for a in args {
                expect_float(a, "elementwise operand")?;
                if a.dtype != first.dtype {
                    return Err(format!("operand dtypes differ: {first} vs {a}"));
                }
                shape = broadcast_shapes(&shape, &a.shape)?;
            }
            one(TensorType::new(first.dtype, shape))
        }
        Op::Quantize
        | Op::Dequantize
        | Op::DynamicQuant
        | Op::QuantMatMul
        | Op::QuantMatMulPerToken
        | Op::GroupedQuantMatMul => quant::infer(op, args),
        Op::Collective { kind, group, axis } => {
            expect_arity(op, args, 1)?;
            let x = args[0];
            check_axis(*axis, x.rank())?;
            let n = group.len();
            let mut t = x.clone();
            match kind {
                CollectiveKind::AllReduce | CollectiveKind::AllToAll => {}
                CollectiveKind::AllGather => t.shape[*axis] = t.shape[*axis].scale(n as i64),
                CollectiveKind::ReduceScatter => {
                    t.shape[*axis] = t.shape[*axis]
                        .div_exact(n)
                        .ok_or_else(|| format!("reduce_scatter: {} not divisible by {n}", x.shape[*axis]))?
                }
            }
            one(t)
        }
    }
}

fn norm_check(x: &TensorType, w: &TensorType) -> R<()> {
    expect_float(x, "norm operand")?;
    expect_rank(w, 1, "norm weight")?;
    expect_dim_eq(&w.shape[0], x.shape.last().ok_or("norm of a scalar")?, "norm weight length")
}

fn reduced_shape(x: &TensorType, axis: usize, keepdim: bool) -> R<Vec<Dim>> {
    check_axis(axis, x.rank())?;
    let mut shape = x.shape.clone();
    if keepdim {
        shape[axis] = Dim::c(1);
    } else {
        shape.remove(axis);
    }
    Ok(shape)
}

/// Types of the rotated q heads and of the new k (= v) rows of a merged
/// QKV projection `(x, w, bias, cos, sin)` (shared by `QkvRope` and
/// `QkvRopeCacheWrite`, which differ only in where k and v go).
fn qkv_heads_types(args: &[&TensorType], q_heads: usize, kv_heads: usize) -> Result<(TensorType, TensorType), String> {
    let (x, w, bias, cos, sin) = (args[0], args[1], args[2], args[3], args[4]);
    expect_rank(x, 2, "qkv input")?;
    expect_rank(w, 2, "qkv weight")?;
    let y = matmul_type(x, w, true)?;
    expect_float(bias, "qkv bias")?;
    expect_rank(bias, 1, "qkv bias")?;
    expect_dim_eq(&bias.shape[0], &y.shape[1], "qkv bias length differs from the projection width")?;
    for t in [cos, sin] {
        expect_rank(t, 2, "rope table")?;
        expect_dim_eq(&t.shape[0], &x.shape[0], "rope table rows")?;
    }
    expect_dim_eq(&cos.shape[1], &sin.shape[1], "rope table widths")?;
    let d = cos.shape[1].as_const().ok_or("symbolic rope table width")?;
    if d % 2 != 0 {
        return Err(format!("rope head_dim {d} must be even"));
    }
    expect_dim_eq(&y.shape[1], &Dim::c((q_heads + 2 * kv_heads) * d), "qkv weight rows vs heads")?;
    let t = x.shape[0].clone();
    let q = TensorType::new(x.dtype, vec![t.clone(), Dim::c(q_heads), Dim::c(d)]);
    let kv = TensorType::new(x.dtype, vec![t, Dim::c(kv_heads), Dim::c(d)]);
    Ok((q, kv))
}
