//! The reference interpreter: the definition of what every op means.
//!
//! Executes in f32 (weights converted on load). Integer values (token ids,
//! positions, expert indices) are held as i64.

pub mod batched;
pub mod quant;

use crate::graph::{Function, Module, ParamKind};
use crate::kernels as k;
use crate::op::{BinaryOp, Op, ReduceOp, RopeKind, UnaryOp};
use crate::shape::{Bindings, Dim};
use crate::tensor::Tensor;
use crate::{DType, WeightSource};
use anyhow::{anyhow, bail, Context, Result};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// Runs functions of a module against a weight source, caching converted weights.
pub struct Interpreter<'a> {
    module: &'a Module,
    weights: &'a dyn WeightSource,
    cache: RefCell<HashMap<String, Rc<Tensor>>>,
    /// Global rank and communicator when running one rank of a partitioned
    /// program (see [`crate::multirank`]); `None` on one device, where a
    /// collective is an error (the program is not a one-device program).
    comm: Option<(usize, &'a dyn crate::multirank::Communicator)>,
}

impl<'a> Interpreter<'a> {
    pub fn new(module: &'a Module, weights: &'a dyn WeightSource) -> Self {
        Interpreter { module, weights, cache: RefCell::new(HashMap::new()), comm: None }
    }

    /// The interpreter of global rank `rank`, its collectives going
    /// through `comm`.
    pub fn for_rank(
        rank: usize,
        module: &'a Module,
        weights: &'a dyn WeightSource,
        comm: &'a dyn crate::multirank::Communicator,
    ) -> Self {
        Interpreter { comm: Some((rank, comm)), ..Self::new(module, weights) }
    }

    pub fn module(&self) -> &Module {
        self.module
    }

    /// Run the entry function.
    pub fn run_entry(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        self.run(&self.module.entry, "", inputs)
    }

    /// Run function `name` with its weights bound under `prefix`.
    pub fn run(&self, name: &str, prefix: &str, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let f = self.module.function(name).ok_or_else(|| anyhow!("no function @{name}"))?;
        let bindings = bind_symbols(f, inputs)?;
        let mut env: Vec<Option<Rc<Tensor>>> = vec![None; f.values.len()];
        let mut next_input = 0;
        for p in &f.params {
            let v = f.value(p.value);
            let t = match &p.kind {
                ParamKind::Input => {
                    next_input += 1;
                    Rc::new(inputs[next_input - 1].clone())
                }
                ParamKind::Weight { tensor } => {
                    let shape = v.ty.concrete_shape(&bindings).map_err(|e| anyhow!(e))?;
                    self.weight(&format!("{prefix}{tensor}"), &shape, v.ty.dtype.is_int())?
                }
            };
            env[p.value.index()] = Some(t);
        }
        let uses = f.use_counts();
        let mut remaining = uses.clone();
        for node in &f.nodes {
            let args: Vec<Rc<Tensor>> =
                node.args.iter().map(|a| env[a.index()].clone().expect("verified SSA")).collect();
            let refs: Vec<&Tensor> = args.iter().map(|t| t.as_ref()).collect();
            let rank = self.comm.map(|(r, _)| format!("rank {r}: ")).unwrap_or_default();
            let label = format!("{rank}@{name}: %{} = {}", f.name_of(node.results[0]), node.op.mnemonic());
            let outs = self.eval_node(node, &refs, f, &bindings).with_context(|| label.clone())?;
            for (r, t) in node.results.iter().zip(outs) {
                let want = f.ty(*r).concrete_shape(&bindings).map_err(|e| anyhow!(e))?;
                if t.shape != want {
                    bail!("{label}: produced shape {:?}, type says {want:?}", t.shape);
                }
                env[r.index()] = Some(Rc::new(t));
            }
            // Free operands after their last use to keep peak memory low.
            for a in &node.args {
                remaining[a.index()] -= 1;
                if remaining[a.index()] == 0 {
                    env[a.index()] = None;
                }
            }
        }
        Ok(f.outputs.iter().map(|o| env[o.index()].as_ref().expect("verified output").as_ref().clone()).collect())
    }

    /// A weight, converted once: floats to f32, integers (int8 weights,
    /// int32 biases, int64-encoded scales) exactly to i64.
    fn weight(&self, full_name: &str, shape: &[usize], integer: bool) -> Result<Rc<Tensor>> {
        if let Some(t) = self.cache.borrow().get(full_name) {
            return Ok(t.clone());
        }
        let loaded =
            if integer { self.weights.load_i64(full_name, shape)? } else { self.weights.load_f32(full_name, shape)? };
        let t = Rc::new(loaded);
        self.cache.borrow_mut().insert(full_name.to_string(), t.clone());
        Ok(t)
    }

    fn eval_node(&self, node: &crate::graph::Node, a: &[&Tensor], f: &Function, b: &Bindings) -> Result<Vec<Tensor>> {
        let one = |t: Tensor| Ok(vec![t]);
        let e = |s: String| anyhow!(s);
        match &node.op {
            Op::Call { func, weight_prefix } => {
                let inputs: Vec<Tensor> = a.iter().map(|t| (*t).clone()).collect();
                self.run(func, weight_prefix, &inputs)
            }
            Op::Scalar { value, dtype } => {
                if dtype.is_float() {
                    one(Tensor::f32(vec![], vec![*value as f32]))
                } else {
                    one(Tensor::i64(vec![], vec![*value as i64]))
                }
            }
            Op::Reshape { .. } => {
                let shape = f.ty(node.results[0]).concrete_shape(b).map_err(e)?;
                let mut t = a[0].clone();
                t.shape = shape;
                one(t)
            }
            Op::Collective { kind, group, axis } if self.comm.is_some() => {
                let (rank, comm) = self.comm.expect("checked");
                one(crate::multirank::collective(comm, rank, *kind, group, *axis, a[0])?)
            }
            op => eval_pure(op, a).map_err(e),
        }
    }
}

/// Evaluate an op that needs no module context. Public so that tests and
/// other execution paths can compare single ops against the definition.
pub fn eval_pure(op: &Op, a: &[&Tensor]) -> Result<Vec<Tensor>, String> {
    let one = |t: Tensor| Ok(vec![t]);
    match op {
        Op::Gather => one(gather(a[0], a[1])?),
        Op::MatMul { transpose_b } => one(k::matmul(a[0], a[1], *transpose_b)?),
        Op::MatMulBias { transpose_b } => {
            let m = k::matmul(a[0], a[1], *transpose_b)?;
            one(k::binary(&m, a[2], |x, y| x + y)?)
        }
        Op::Unary(u) => one(k::unary(
            a[0],
            match u {
                UnaryOp::Neg => |x: f32| -x,
                UnaryOp::Exp => f32::exp,
                UnaryOp::Sqrt => f32::sqrt,
                UnaryOp::Rsqrt => |x: f32| 1.0 / x.sqrt(),
                UnaryOp::Reciprocal => |x: f32| 1.0 / x,
                UnaryOp::Sigmoid => k::sigmoid,
            },
        )),
        Op::Binary(bop) if a[0].is_f32() => one(k::binary(
            a[0],
            a[1],
            match bop {
                BinaryOp::Add => |x: f32, y: f32| x + y,
                BinaryOp::Sub => |x, y| x - y,
                BinaryOp::Mul => |x, y| x * y,
                BinaryOp::Div => |x, y| x / y,
                BinaryOp::Max => f32::max,
            },
        )?),
        Op::Binary(bop) => one(k::binary_i64(
            a[0],
            a[1],
            match bop {
                BinaryOp::Add => |x: i64, y: i64| x + y,
                BinaryOp::Sub => |x, y| x - y,
                BinaryOp::Mul => |x, y| x * y,
                BinaryOp::Div => |x, y| if y == 0 { 0 } else { x / y },
                BinaryOp::Max => i64::max,
            },
        )?),
        Op::Reduce { op, axis, keepdim } => one(match op {
            ReduceOp::Sum => k::reduce(a[0], *axis, *keepdim, 0.0, |s, x| s + x, |s, _| s),
            ReduceOp::Mean => k::reduce(a[0], *axis, *keepdim, 0.0, |s, x| s + x, |s, n| s / n as f32),
            ReduceOp::Max => k::reduce(a[0], *axis, *keepdim, f32::NEG_INFINITY, f32::max, |s, _| s),
        }),
        Op::ArgMax { axis, keepdim } => one(k::argmax(a[0], *axis, *keepdim)),
        Op::Softmax { axis } => one(k::softmax(a[0], *axis)),
        Op::Transpose { perm } => one(k::transpose(a[0], perm)),
        Op::Slice { axis, start, end } => one(k::slice(a[0], *axis, *start, *end)),
        Op::Concat { axis } => one(k::concat(a, *axis)),
        Op::Stack { axis } => {
            let mut parts: Vec<Tensor> = a.iter().map(|t| (*t).clone()).collect();
            for p in &mut parts {
                p.shape.insert(*axis, 1);
            }
            let refs: Vec<&Tensor> = parts.iter().collect();
            one(k::concat(&refs, *axis))
        }
        Op::RepeatInterleave { axis, repeats } => one(k::repeat_interleave(a[0], *axis, *repeats)),
        Op::Cast { dtype } => one(cast(a[0], *dtype)),
        Op::RopeTable { kind, theta, head_dim } => one(rope_table(a[0], *kind, *theta, *head_dim)),
        Op::CausalMask => {
            let pos = a[0].as_i64();
            let kv = a[1].shape[0];
            let data = pos
                .iter()
                .flat_map(|&p| (0..kv).map(move |j| if (j as i64) <= p { 0.0 } else { f32::NEG_INFINITY }))
                .collect();
            one(Tensor::f32(vec![pos.len(), kv], data))
        }
        Op::Iota { len, step } => one(Tensor::i64(vec![*len], (0..*len as i64).map(|i| i * step).collect())),
        Op::OneHot { depth } => {
            let idx = a[0].as_i64();
            let mut data = vec![0.0; idx.len() * depth];
            for (i, &x) in idx.iter().enumerate() {
                if x < 0 || x as usize >= *depth {
                    return Err(format!("one_hot index {x} out of range 0..{depth}"));
                }
                data[i * depth + x as usize] = 1.0;
            }
            let mut shape = a[0].shape.clone();
            shape.push(*depth);
            one(Tensor::f32(shape, data))
        }
        Op::RmsNorm { eps } => one(rms_norm(a[0], a[1], *eps)),
        Op::AddRmsNorm { eps } => {
            let sum = k::binary(a[0], a[1], |x, y| x + y)?;
            let normed = rms_norm(&sum, a[2], *eps);
            Ok(vec![sum, normed])
        }
        Op::Split { axis, sizes } => {
            let mut start = 0;
            Ok(sizes
                .iter()
                .map(|s| {
                    let t = k::slice(a[0], *axis, start, start + s);
                    start += s;
                    t
                })
                .collect())
        }
        Op::Rope => one(rope(a[0], a[1], a[2])),
        Op::SwiGlu => one(k::binary(a[0], a[1], |g, u| k::silu(g) * u)?),
        Op::GateUpSwiGlu => {
            let gu = k::matmul(a[0], a[1], true)?;
            let i = gu.shape[gu.shape.len() - 1] / 2;
            let axis = gu.shape.len() - 1;
            let (g, u) = (k::slice(&gu, axis, 0, i), k::slice(&gu, axis, i, 2 * i));
            one(k::binary(&g, &u, |g, u| k::silu(g) * u)?)
        }
        Op::FlashAttention { scale } => one(attention(a[0], a[1], a[2], a[3], *scale as f32)),
        Op::KvCacheWrite => one(batched::kv_cache_write(a[0], a[1], a[2])?),
        Op::PagedAttention { scale } => one(batched::paged_attention(a, *scale as f32)?),
        Op::MoeInitRouting { experts } => batched::moe_init_routing(a[0], a[1], *experts),
        Op::GroupedMatmul => one(batched::grouped_matmul(a[0], a[1], a[2])?),
        Op::MoeFinalizeRouting => one(batched::moe_finalize_routing(a)?),
        Op::MoeGatingGroupTopK { groups } => moe_gating(a[0], a[1], *groups),
        Op::GroupedMatmulMoe => one(grouped_moe(a[0], a[1], a[2], a[3], a[4])?),
        Op::QkvRope { q_heads, kv_heads } => {
            let (q, key, v) = qkv_heads(a, *q_heads, *kv_heads)?;
            Ok(vec![q, k::concat(&[a[5], &key], 0), k::concat(&[a[6], &v], 0)])
        }
        Op::QkvRopeCacheWrite { q_heads, kv_heads } => {
            let (q, key, v) = qkv_heads(a, *q_heads, *kv_heads)?;
            Ok(vec![q, batched::kv_cache_write(a[5], &key, a[7])?, batched::kv_cache_write(a[6], &v, a[7])?])
        }
        Op::MoeRouterTopK { groups } => moe_gating(&k::matmul(a[0], a[1], true)?, a[2], *groups),
        Op::MoeFfn => {
            let routed = grouped_moe(a[0], a[1], a[2], a[3], a[4])?;
            let act = eval_pure(&Op::GateUpSwiGlu, &[a[0], a[5]])?.remove(0);
            let shared = k::matmul(&act, a[6], true)?;
            let moe = k::binary(&routed, &shared, |x, y| x + y)?;
            one(k::binary(a[7], &moe, |x, y| x + y)?)
        }
        Op::MoeGroupedFfn => one(batched::moe_grouped_ffn(a)?),
        Op::FusedElementwise { expr } => one(fused_elementwise(expr, a)?),
        Op::Quantize => one(quant::quantize(a[0], a[1], a[2])?),
        Op::Dequantize => one(quant::dequantize(a[0], a[1], a[2])?),
        Op::DynamicQuant => quant::dynamic_quant(a[0]),
        Op::QuantMatMul => one(quant::quant_matmul(a[0], a[1], a[2], a[3])?),
        Op::QuantMatMulPerToken => one(quant::quant_matmul_per_token(a[0], a[1], a[2], a[3])?),
        Op::GroupedQuantMatMul => one(quant::grouped_quant_matmul(a[0], a[1], a[2], a[3], a[4])?),
        // A collective exchanges data with other ranks; without a
        // communicator there are none, and treating it as the identity would
        // silently compute one rank's partial result as if it were the model's.
        Op::Collective { group, .. } => Err(format!(
            "{} over ranks {group:?} needs a communicator: this is one rank of a program partitioned over {} devices, \
             which must run under the multi-rank executor (all ranks together), not single-rank",
            op.mnemonic(),
            group.len()
        )),
        Op::Call { .. } | Op::Scalar { .. } | Op::Reshape { .. } => Err("needs module context".into()),
    }
}

/// Merged QKV projection + bias split into heads, RoPE on q and k: the
/// (q, k, v) rows that `QkvRope` appends and `QkvRopeCacheWrite` stores.
fn qkv_heads(a: &[&Tensor], q_heads: usize, kv_heads: usize) -> Result<(Tensor, Tensor, Tensor), String> {
    let y = k::binary(&k::matmul(a[0], a[1], true)?, a[2], |x, y| x + y)?;
    let (t, d) = (y.shape[0], a[3].shape[1]);
    let heads = |start: usize, h: usize| {
        let mut s = k::slice(&y, 1, start, start + h * d);
        s.shape = vec![t, h, d];
        s
    };
    let q = rope(&heads(0, q_heads), a[3], a[4]);
    let key = rope(&heads(q_heads * d, kv_heads), a[3], a[4]);
    let v = heads((q_heads + kv_heads) * d, kv_heads);
    Ok((q, key, v))
}

/// Evaluate a `FusedElementwise` expression with the primitive ops' own
/// semantics (each token is evaluated through `eval_pure`).
fn fused_elementwise(expr: &str, a: &[&Tensor]) -> Result<Tensor, String> {
    use crate::op::EwToken;
    let mut stack: Vec<Tensor> = Vec::new();
    for tok in crate::op::parse_elementwise(expr, a.len())? {
        let v = match tok {
            EwToken::Operand(i) => a[i].clone(),
            EwToken::Unary(u) => {
                let x = stack.pop().expect("checked by parse_elementwise");
                eval_pure(&Op::Unary(u), &[&x])?.remove(0)
            }
            EwToken::Binary(b) => {
                let y = stack.pop().expect("checked by parse_elementwise");
                let x = stack.pop().expect("checked by parse_elementwise");
                eval_pure(&Op::Binary(b), &[&x, &y])?.remove(0)
            }
        };
        stack.push(v);
    }
    Ok(stack.pop().expect("checked by parse_elementwise"))
}

fn gather(table: &Tensor, idx: &Tensor) -> Result<Tensor, String> {
    let rows = table.shape[0];
    let width: usize = table.shape[1..].iter().product();
    let t = table.as_f32();
    let mut out = Vec::with_capacity(idx.numel() * width);
    for &i in idx.as_i64() {
        if i < 0 || i as usize >= rows {
            return Err(format!("gather index {i} out of range 0..{rows}"));
        }
        out.extend_from_slice(&t[i as usize * width..(i as usize + 1) * width]);
    }
    let mut shape = idx.shape.clone();
    shape.extend_from_slice(&table.shape[1..]);
    Ok(Tensor::f32(shape, out))
}

fn cast(x: &Tensor, dtype: DType) -> Tensor {
    match (&x.data, dtype.is_float()) {
        (crate::TensorData::F32(v), true) => {
            Tensor::f32(x.shape.clone(), v.iter().map(|&e| k::round_to(dtype, e)).collect())
        }
        (crate::TensorData::F32(v), false) => Tensor::i64(x.shape.clone(), v.iter().map(|&e| e as i64).collect()),
        (crate::TensorData::I64(v), true) => {
            Tensor::f32(x.shape.clone(), v.iter().map(|&e| k::round_to(dtype, e as f32)).collect())
        }
        (crate::TensorData::I64(_), false) => x.clone(),
    }
}

/// NeoX RoPE table: `head_dim/2` angles, repeated twice along the row.
pub fn rope_table(pos: &Tensor, kind: RopeKind, theta: f64, head_dim: usize) -> Tensor {
    let half = head_dim / 2;
    let mut data = Vec::with_capacity(pos.numel() * head_dim);
    for &p in pos.as_i64() {
        let row: Vec<f32> = (0..half)
            .map(|i| {
                let inv_freq = 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64);
                let angle = p as f64 * inv_freq;
                (match kind {
                    RopeKind::Cos => angle.cos(),
                    RopeKind::Sin => angle.sin(),
                }) as f32
            })
            .collect();
        data.extend_from_slice(&row);
        data.extend_from_slice(&row);
    }
    Tensor::f32(vec![pos.numel(), head_dim], data)
}

/// `x * rsqrt(mean(x^2) + eps) * w` over the last axis, in f32.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
    let h = *x.shape.last().expect("rank >= 1");
    let w = w.as_f32();
    let mut out = x.as_f32().to_vec();
    for row in out.chunks_mut(h) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / h as f32;
        let r = 1.0 / (ms + eps as f32).sqrt();
        for (v, g) in row.iter_mut().zip(w) {
            *v = *v * r * g;
        }
    }
    Tensor::f32(x.shape.clone(), out)
}

/// `x*cos + rotate_half(x)*sin` for x `[T, heads, D]`, tables `[T, D]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let (t, heads, d) = (x.shape[0], x.shape[1], x.shape[2]);
    let half = d / 2;
    let (xv, c, s) = (x.as_f32(), cos.as_f32(), sin.as_f32());
    let mut out = vec![0.0; xv.len()];
    for ti in 0..t {
        for h in 0..heads {
            let base = (ti * heads + h) * d;
            for i in 0..d {
                let rot = if i < half { -xv[base + i + half] } else { xv[base + i - half] };
                out[base + i] = xv[base + i] * c[ti * d + i] + rot * s[ti * d + i];
            }
        }
    }
    Tensor::f32(x.shape.clone(), out)
}

/// Causal GQA attention; query head h reads KV head h / (Hq / Hkv).
pub fn attention(q: &Tensor, kt: &Tensor, v: &Tensor, pos: &Tensor, scale: f32) -> Tensor {
    let (t, hq, d) = (q.shape[0], q.shape[1], q.shape[2]);
    let (kv, hkv) = (kt.shape[0], kt.shape[1]);
    let group = hq / hkv;
    let (qv, kd, vd, pos) = (q.as_f32(), kt.as_f32(), v.as_f32(), pos.as_i64());
    let mut out = vec![0.0; t * hq * d];
    let mut scores = vec![0.0f32; kv];
    for ti in 0..t {
        for h in 0..hq {
            let kh = h / group;
            let qrow = &qv[(ti * hq + h) * d..(ti * hq + h + 1) * d];
            let visible = ((pos[ti] + 1).max(0) as usize).min(kv);
            for (j, s) in scores.iter_mut().enumerate().take(visible) {
                let krow = &kd[(j * hkv + kh) * d..(j * hkv + kh + 1) * d];
                *s = qrow.iter().zip(krow).map(|(a, b)| a * b).sum::<f32>() * scale;
            }
            let m = scores[..visible].iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for s in &mut scores[..visible] {
                *s = (*s - m).exp();
                sum += *s;
            }
            let orow = &mut out[(ti * hq + h) * d..(ti * hq + h + 1) * d];
            for (j, s) in scores[..visible].iter().enumerate() {
                let p = s / sum;
                let vrow = &vd[(j * hkv + kh) * d..(j * hkv + kh + 1) * d];
                for (o, x) in orow.iter_mut().zip(vrow) {
                    *o += p * x;
                }
            }
        }
    }
    Tensor::f32(q.shape.clone(), out)
}

/// Softmax over all experts, then top-1 per contiguous group, scaled.
pub fn moe_gating(logits: &Tensor, scale: &Tensor, groups: usize) -> Result<Vec<Tensor>, String> {
    let (t, e) = (logits.shape[0], logits.shape[1]);
    let per = e / groups;
    let p = k::softmax(logits, 1);
    let (p, s) = (p.as_f32(), scale.as_f32());
    let mut w = Vec::with_capacity(t * groups);
    let mut ids = Vec::with_capacity(t * groups);
    for ti in 0..t {
        for g in 0..groups {
            let row = &p[ti * e + g * per..ti * e + (g + 1) * per];
            let mut best = 0;
            for (j, v) in row.iter().enumerate() {
                if *v > row[best] {
                    best = j;
                }
            }
            let ex = g * per + best;
            w.push(row[best] * s[ex]);
            ids.push(ex as i64);
        }
    }
    Ok(vec![Tensor::f32(vec![t, groups], w), Tensor::i64(vec![t, groups], ids)])
}

/// Routed experts over the selected (token, expert) pairs only.
pub fn grouped_moe(x: &Tensor, w: &Tensor, ids: &Tensor, gate_up: &Tensor, down: &Tensor) -> Result<Tensor, String> {
    let (t, h) = (x.shape[0], x.shape[1]);
    let (e, two_i) = (gate_up.shape[0], gate_up.shape[1]);
    let i_sz = two_i / 2;
    let g = w.shape[1];
    let (xv, wv, iv, gu, dn) = (x.as_f32(), w.as_f32(), ids.as_i64(), gate_up.as_f32(), down.as_f32());
    let mut out = vec![0.0f32; t * h];
    let mut act = vec![0.0f32; i_sz];
    for ti in 0..t {
        let xrow = &xv[ti * h..(ti + 1) * h];
        for gi in 0..g {
            let ex = iv[ti * g + gi];
            if ex < 0 || ex as usize >= e {
                return Err(format!("expert index {ex} out of range 0..{e}"));
            }
            let ex = ex as usize;
            let dot = |r: usize| -> f32 {
                let row = &gu[(ex * two_i + r) * h..(ex * two_i + r + 1) * h];
                xrow.iter().zip(row).map(|(a, b)| a * b).sum()
            };
            for (j, a) in act.iter_mut().enumerate() {
                *a = k::silu(dot(j)) * dot(i_sz + j);
            }
            let wt = wv[ti * g + gi];
            for (o, orow) in out[ti * h..(ti + 1) * h].iter_mut().enumerate() {
                let drow = &dn[(ex * h + o) * i_sz..(ex * h + o + 1) * i_sz];
                *orow += wt * act.iter().zip(drow).map(|(a, b)| a * b).sum::<f32>();
            }
        }
    }
    Ok(Tensor::f32(vec![t, h], out))
}

/// Bind shape symbols from the concrete shapes of the inputs.
pub fn bind_symbols(f: &Function, inputs: &[Tensor]) -> Result<Bindings> {
    let params: Vec<_> = f.input_params().collect();
    if params.len() != inputs.len() {
        bail!("@{} takes {} inputs, {} given", f.name, params.len(), inputs.len());
    }
    let mut b = Bindings::new();
    for (p, t) in params.iter().zip(inputs) {
        let ty = f.ty(p.value);
        if ty.rank() != t.shape.len() {
            bail!("@{}: input %{} has shape {:?}, expected {}", f.name, f.name_of(p.value), t.shape, ty);
        }
        for (d, &n) in ty.shape.iter().zip(&t.shape) {
            let syms: Vec<&str> = d.symbols().collect();
            if syms.len() == 1 && *d == Dim::sym(syms[0]) {
                b.entry(syms[0].to_string()).or_insert(n);
            }
        }
    }
    for (p, t) in params.iter().zip(inputs) {
        let ty = f.ty(p.value);
        let want = ty.concrete_shape(&b).map_err(|e| anyhow!("@{}: input %{}: {e}", f.name, f.name_of(p.value)))?;
        if want != t.shape {
            bail!("@{}: input %{} has shape {:?}, expected {} = {want:?}", f.name, f.name_of(p.value), t.shape, ty);
        }
        if ty.dtype.is_float() != t.is_f32() {
            bail!("@{}: input %{} must be {}", f.name, f.name_of(p.value), ty.dtype);
        }
    }
    Ok(b)
}

#[cfg(test)]
mod fused_op_tests {
    //! The fused ops added for the lowering fusion plan, each checked
    //! against its decomposition into primitive ops.
    use super::*;

    /// Deterministic pseudo-random values in [-1, 1) (no rand dependency).
    fn data(seed: u64, shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let v = (0..n)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((x >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::f32(shape.to_vec(), v)
    }

    fn prim(op: Op, a: &[&Tensor]) -> Tensor {
        eval_pure(&op, a).unwrap().remove(0)
    }

    fn close(a: &Tensor, b: &Tensor) {
        assert_eq!(a.shape, b.shape);
        let d = a.max_rel_diff(b, 1e-3);
        assert!(d < 1e-5, "differ by {d}: {a:?} vs {b:?}");
    }

    #[test]
    fn qkv_rope_matches_primitives() {
        let (t, h, hq, hkv, d, past) = (3, 8, 4, 2, 4, 2);
        let n = (hq + 2 * hkv) * d;
        let (x, w, b) = (data(1, &[t, h]), data(2, &[n, h]), data(3, &[n]));
        let pos = Tensor::i64(vec![t], vec![2, 3, 4]);
        let cos = rope_table(&pos, RopeKind::Cos, 10000.0, d);
        let sin = rope_table(&pos, RopeKind::Sin, 10000.0, d);
        let (kc, vc) = (data(4, &[past, hkv, d]), data(5, &[past, hkv, d]));
        let got = eval_pure(&Op::QkvRope { q_heads: hq, kv_heads: hkv }, &[&x, &w, &b, &cos, &sin, &kc, &vc]).unwrap();
        let y = prim(Op::MatMulBias { transpose_b: true }, &[&x, &w, &b]);
        let mut parts = eval_pure(&Op::Split { axis: 1, sizes: vec![hq * d, hkv * d, hkv * d] }, &[&y]).unwrap();
        parts[0].shape = vec![t, hq, d];
        parts[1].shape = vec![t, hkv, d];
        parts[2].shape = vec![t, hkv, d];
        let q = prim(Op::Rope, &[&parts[0], &cos, &sin]);
        let k = prim(Op::Rope, &[&parts[1], &cos, &sin]);
        close(&got[0], &q);
        close(&got[1], &prim(Op::Concat { axis: 0 }, &[&kc, &k]));
        close(&got[2], &prim(Op::Concat { axis: 0 }, &[&vc, &parts[2]]));
        assert_eq!(got[1].shape, vec![past + t, hkv, d]);
    }

    #[test]
    fn qkv_rope_cache_write_matches_qkv_rope_then_slot_writes() {
        let (t, h, hq, hkv, d) = (3, 8, 4, 2, 4);
        let (blocks, block_size) = (3, 2);
        let n = (hq + 2 * hkv) * d;
        let (x, w, b) = (data(1, &[t, h]), data(2, &[n, h]), data(3, &[n]));
        let pos = Tensor::i64(vec![t], vec![2, 0, 1]);
        let cos = rope_table(&pos, RopeKind::Cos, 10000.0, d);
        let sin = rope_table(&pos, RopeKind::Sin, 10000.0, d);
        let (kc, vc) = (data(4, &[blocks, block_size, hkv, d]), data(5, &[blocks, block_size, hkv, d]));
        // Token 0 to block 2 offset 0, token 1 to block 0 offset 1, token 2 to block 1 offset 1.
        let slots = Tensor::i64(vec![t], vec![4, 1, 3]);
        let op = Op::QkvRopeCacheWrite { q_heads: hq, kv_heads: hkv };
        let got = eval_pure(&op, &[&x, &w, &b, &cos, &sin, &kc, &vc, &slots]).unwrap();
        // QkvRope over empty caches yields exactly the new rows.
        let empty = Tensor::zeros(vec![0, hkv, d]);
        let rows =
            eval_pure(&Op::QkvRope { q_heads: hq, kv_heads: hkv }, &[&x, &w, &b, &cos, &sin, &empty, &empty]).unwrap();
        close(&got[0], &rows[0]);
        let row = hkv * d;
        for (cache, new, out) in [(&kc, &rows[1], &got[1]), (&vc, &rows[2], &got[2])] {
            assert_eq!(out.shape, cache.shape);
            let (c, nw, o) = (cache.as_f32(), new.as_f32(), out.as_f32());
            let written = [(0usize, 4usize), (1, 1), (2, 3)];
            for slot in 0..blocks * block_size {
                let want = match written.iter().find(|(_, s)| *s == slot) {
                    Some((tok, _)) => &nw[tok * row..(tok + 1) * row],
                    None => &c[slot * row..(slot + 1) * row],
                };
                assert_eq!(&o[slot * row..(slot + 1) * row], want, "slot {slot}");
            }
        }
    }

    #[test]
    fn moe_router_topk_matches_primitives() {
        let (x, w, s) = (data(7, &[3, 8]), data(8, &[8, 8]), data(9, &[8]));
        let got = eval_pure(&Op::MoeRouterTopK { groups: 4 }, &[&x, &w, &s]).unwrap();
        let logits = prim(Op::MatMul { transpose_b: true }, &[&x, &w]);
        let want = eval_pure(&Op::MoeGatingGroupTopK { groups: 4 }, &[&logits, &s]).unwrap();
        close(&got[0], &want[0]);
        assert_eq!(got[1], want[1]);
    }

    #[test]
    fn moe_ffn_matches_primitives() {
        let (t, h, e, i, is, g) = (3, 8, 4, 2, 6, 2);
        let x = data(11, &[t, h]);
        let wts = data(12, &[t, g]);
        let ids = Tensor::i64(vec![t, g], vec![0, 3, 1, 2, 0, 2]);
        let (gu, dn) = (data(13, &[e, 2 * i, h]), data(14, &[e, h, i]));
        let (sgu, sdn, r) = (data(15, &[2 * is, h]), data(16, &[h, is]), data(17, &[t, h]));
        let got = prim(Op::MoeFfn, &[&x, &wts, &ids, &gu, &dn, &sgu, &sdn, &r]);
        let routed = prim(Op::GroupedMatmulMoe, &[&x, &wts, &ids, &gu, &dn]);
        let act = prim(Op::GateUpSwiGlu, &[&x, &sgu]);
        let shared = prim(Op::MatMul { transpose_b: true }, &[&act, &sdn]);
        let moe = prim(Op::Binary(BinaryOp::Add), &[&routed, &shared]);
        close(&got, &prim(Op::Binary(BinaryOp::Add), &[&r, &moe]));
    }

    #[test]
    fn fused_elementwise_matches_primitives() {
        let (a, b) = (data(21, &[2, 3]), data(22, &[3]));
        let got = prim(Op::FusedElementwise { expr: "$0 $1 mul $0 sigmoid add neg".into() }, &[&a, &b]);
        let m = prim(Op::Binary(BinaryOp::Mul), &[&a, &b]);
        let s = prim(Op::Unary(UnaryOp::Sigmoid), &[&a]);
        let want = prim(Op::Unary(UnaryOp::Neg), &[&prim(Op::Binary(BinaryOp::Add), &[&m, &s])]);
        close(&got, &want);
        assert!(crate::op::parse_elementwise("$0 add", 1).is_err());
        assert!(crate::op::parse_elementwise("$0 $1", 2).is_err());
        assert!(crate::op::parse_elementwise("$0 neg", 2).is_err(), "unused operand");
        assert!(crate::op::parse_elementwise("$0 frob", 1).is_err());
    }
}
