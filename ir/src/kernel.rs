//! Kernel programs: the scheduled form of a model that code generators consume.
//!
//! `panguc-lowering`'s scheduler turns the (fused) graph IR into a
//! [`KernelProgram`]: an ordered list of kernel [`Launch`]es over named
//! [`Buffer`]s (inputs, prepared weights, KV caches, activations, views),
//! with symbolic sizes over the shape symbols `tokens` and `past` (one
//! sequence per call), or `tokens`, `seqs`, `max_blocks` and `num_blocks`
//! (one ragged batch step over paged KV caches). Each
//! distinct specialised [`Kernel`] appears once; launches refer to it by
//! index, so the 48 decoder layers of the real model share their kernels.
//!
//! Prepared weights are evaluated at package time from checkpoint tensors
//! ([`WeightSource`]) and stored in the layout their consumer wants
//! ([`Layout`]): matmul weights packed in column panels, gate/up projections
//! interleaved, expert weights stacked. Activations live in arena *slots*:
//! buffers whose lifetimes do not overlap share a slot, and the runtime sizes
//! each slot at call time as the largest of its buffers under the actual
//! `tokens`/`past`.
//!
//! Every kernel processes a range of independent *tiles* (`Kernel::tiles`);
//! the runtime splits `0..tiles` across its threads, so each output element
//! is computed by exactly one tile and results do not depend on the thread
//! count. What a tile is for each kind is documented on [`KernelKind`] and
//! computed by [`tile_extent`], which code generators must follow.

use crate::graph::Function;
use crate::op::{BinaryOp, ReduceOp, RopeKind, UnaryOp};
use crate::shape::{Bindings, Dim};
use crate::DType;
use serde::{Deserialize, Serialize};
use std::fmt::Write;

/// Output columns per tile of a [`KernelKind::QuantMatMul`].
pub const QUANT_MATMUL_COLS: usize = 16;

/// Bumped whenever the serialized form changes meaning.
pub const KERNEL_PROGRAM_VERSION: u32 = 1;

/// Index of a buffer in [`KernelProgram::buffers`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BufferId(pub u32);

impl BufferId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// A product `factor * dims[0] * dims[1] * ...`, evaluated at call time.
/// (Products of symbolic dims are not linear, so they cannot be a [`Dim`].)
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Extent {
    pub factor: u64,
    pub dims: Vec<Dim>,
}

impl Extent {
    pub fn constant(n: u64) -> Extent {
        Extent { factor: n, dims: vec![] }
    }

    pub fn of(factor: u64, dims: &[Dim]) -> Extent {
        // Fold constant dims into the factor so the common case stays readable.
        let mut e = Extent { factor, dims: vec![] };
        for d in dims {
            match d.as_const() {
                Some(c) => e.factor *= c as u64,
                None => e.dims.push(d.clone()),
            }
        }
        e
    }

    pub fn eval(&self, b: &Bindings) -> Result<u64, String> {
        self.dims.iter().try_fold(self.factor, |acc, d| Ok(acc * d.eval(b)? as u64))
    }
}

impl std::fmt::Display for Extent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.factor)?;
        for d in &self.dims {
            write!(f, "*({d})")?;
        }
        Ok(())
    }
}

/// How a buffer's elements are arranged in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Layout {
    /// Dense row-major over the logical shape.
    RowMajor,
    /// A matmul right-hand side `[batch.., N, K]` (or `[batch.., K, N]` when
    /// `kn`) stored as `[batch..][ceil(N/nr)][K][nr]`: column panels of `nr`
    /// output columns, K-major inside a panel, zero-padded to a whole panel.
    /// A GEMM micro-kernel then reads one contiguous `nr`-wide row per k.
    Panels { nr: u32, kn: bool },
    /// A merged gate/up weight `[batch.., 2I, K]` (gate rows `0..I`, up rows
    /// `I..2I`) stored as panels of `nr` columns where panel `p` holds gate
    /// rows `p*nr/2 ..` followed by the matching up rows, so a SwiGLU epilogue
    /// finds `gate` and `up` of the same output column in one register tile.
    GateUpPanels { nr: u32 },
    /// An int8 matmul right-hand side `[batch.., N, K]` stored as
    /// `[batch..][ceil(N/nr)][ceil(K/kg)][nr][kg]`: column panels of `nr`
    /// output columns, each column's `kg` consecutive k side by side, so
    /// one `nr * kg`-byte load is the operand of one dot-product
    /// instruction that adds `kg` products into each of `nr` lanes
    /// (`vpdpbusd`: nr 16, kg 4). Zero-padded to whole panels and groups.
    DotPanels { nr: u32, kg: u32 },
}

impl Layout {
    /// Number of stored elements for a logical shape in this layout.
    pub fn stored_len(&self, shape: &[usize]) -> usize {
        let r = shape.len();
        match *self {
            Layout::RowMajor => shape.iter().product(),
            Layout::Panels { nr, kn } => {
                let (n, k) = if kn { (shape[r - 1], shape[r - 2]) } else { (shape[r - 2], shape[r - 1]) };
                let batch: usize = shape[..r - 2].iter().product();
                batch * n.div_ceil(nr as usize) * nr as usize * k
            }
            Layout::GateUpPanels { nr } => {
                let (two_i, k) = (shape[r - 2], shape[r - 1]);
                let half = nr as usize / 2;
                let batch: usize = shape[..r - 2].iter().product();
                batch * (two_i / 2).div_ceil(half) * nr as usize * k
            }
            Layout::DotPanels { nr, kg } => {
                let (n, k) = (shape[r - 2], shape[r - 1]);
                let batch: usize = shape[..r - 2].iter().product();
                batch * n.div_ceil(nr as usize) * nr as usize * k.div_ceil(kg as usize) * kg as usize
            }
        }
    }

    /// Rearrange row-major elements of `elem` bytes into this layout;
    /// padding elements are zero. This is the one implementation of the
    /// panel layouts; it copies whole elements (typed, not byte by byte)
    /// so packing keeps up with the disk.
    pub fn pack(&self, src: &[u8], shape: &[usize], elem: usize) -> Vec<u8> {
        match elem {
            1 => self.pack_elems::<1>(src, shape),
            2 => self.pack_elems::<2>(src, shape),
            4 => self.pack_elems::<4>(src, shape),
            8 => self.pack_elems::<8>(src, shape),
            other => panic!("no dtype has {other}-byte elements"),
        }
    }

    fn pack_elems<const E: usize>(&self, src: &[u8], shape: &[usize]) -> Vec<u8> {
        let (src, rest) = src.as_chunks::<E>();
        assert!(rest.is_empty(), "packing {} bytes of {E}-byte elements", src.len() * E + rest.len());
        let r = shape.len();
        let mut out = vec![[0u8; E]; self.stored_len(shape)];
        match *self {
            Layout::RowMajor => out.copy_from_slice(src),
            Layout::Panels { nr, kn: true } => {
                // [batch.., K, N]: a panel row is a contiguous run of a source row.
                let nr = nr as usize;
                let (k, n) = (shape[r - 2], shape[r - 1]);
                let panels = n.div_ceil(nr);
                for (b, dst) in out.chunks_exact_mut(panels * k * nr).enumerate() {
                    for (p, panel) in dst.chunks_exact_mut(k * nr).enumerate() {
                        let cols = p * nr..(p * nr + nr).min(n);
                        let width = cols.len();
                        for (kk, row) in panel.chunks_exact_mut(nr).enumerate() {
                            let s = (b * k + kk) * n;
                            row[..width].copy_from_slice(&src[s + cols.start..s + cols.end]);
                        }
                    }
                }
            }
            Layout::Panels { nr, kn: false } => {
                // [batch.., N, K]: lane j of panel p is source row p * nr + j.
                let nr = nr as usize;
                let (n, k) = (shape[r - 2], shape[r - 1]);
                let panels = n.div_ceil(nr);
                for (b, dst) in out.chunks_exact_mut(panels * k * nr).enumerate() {
                    let rows = &src[b * n * k..(b + 1) * n * k];
                    transpose_into_panels(rows, k, nr, dst, |p, j| Some(p * nr + j).filter(|&c| c < n));
                }
            }
            Layout::GateUpPanels { nr } => {
                // Gate row c goes to lane c % half of panel c / half, up row
                // c (source row I + c) to lane half + c % half.
                let (nr, half) = (nr as usize, nr as usize / 2);
                let (two_i, k) = (shape[r - 2], shape[r - 1]);
                let i = two_i / 2;
                let panels = i.div_ceil(half);
                for (b, dst) in out.chunks_exact_mut(panels * k * nr).enumerate() {
                    let rows = &src[b * two_i * k..(b + 1) * two_i * k];
                    transpose_into_panels(rows, k, nr, dst, |p, j| {
                        let (up, c) = (j >= half, p * half + j % half);
                        (c < i).then_some(if up { i + c } else { c })
                    });
                }
            }
            Layout::DotPanels { nr, kg } => {
                let (nr, kg) = (nr as usize, kg as usize);
                let (n, k) = (shape[r - 2], shape[r - 1]);
                let (panels, groups) = (n.div_ceil(nr), k.div_ceil(kg));
                let panel_len = groups * nr * kg;
                for (b, dst) in out.chunks_exact_mut(panels * panel_len).enumerate() {
                    let rows = &src[b * n * k..(b + 1) * n * k];
                    for (p, panel) in dst.chunks_exact_mut(panel_len).enumerate() {
                        // Column j's k-group g lands at (g * nr + j) * kg.
                        for j in 0..nr.min(n.saturating_sub(p * nr)) {
                            let row = &rows[(p * nr + j) * k..(p * nr + j + 1) * k];
                            for (g, part) in row.chunks(kg).enumerate() {
                                let at = (g * nr + j) * kg;
                                panel[at..at + part.len()].copy_from_slice(part);
                            }
                        }
                    }
                }
            }
        }
        out.into_flattened()
    }

    pub fn suffix(&self) -> String {
        match self {
            Layout::RowMajor => String::new(),
            Layout::Panels { nr, kn: false } => format!("@panels{nr}"),
            Layout::Panels { nr, kn: true } => format!("@panels{nr}kn"),
            Layout::GateUpPanels { nr } => format!("@gateup{nr}"),
            Layout::DotPanels { nr, kg } => format!("@dot{nr}x{kg}"),
        }
    }
}

/// Fill consecutive `[k][nr]` panels in `dst` from the `k`-long rows of
/// `rows`: lane `j` of panel `p` is row `row_of(p, j)` (zero when `None`).
/// Each panel row takes one element from each of its `nr` source rows, so
/// the source streams sequentially and every output byte is written once.
fn transpose_into_panels<const E: usize>(
    rows: &[[u8; E]],
    k: usize,
    nr: usize,
    dst: &mut [[u8; E]],
    row_of: impl Fn(usize, usize) -> Option<usize>,
) {
    for (p, panel) in dst.chunks_exact_mut(k * nr).enumerate() {
        let lanes: Vec<Option<&[[u8; E]]>> =
            (0..nr).map(|j| row_of(p, j).map(|row| &rows[row * k..(row + 1) * k])).collect();
        for (j, lane) in lanes.iter().enumerate() {
            let Some(lane) = lane else { continue };
            for (d, s) in panel[j..].iter_mut().step_by(nr).zip(lane.iter()) {
                *d = *s;
            }
        }
    }
}

/// Where a buffer's memory comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BufferKind {
    /// Filled by the runtime before each call: entry input `index`
    /// (`ids`, `positions`).
    Input { index: usize },
    /// Prepared weight `index` of [`KernelProgram::weights`], mapped from
    /// the package.
    Weight { index: usize },
    /// KV cache `cache` (entry cache input `cache`: `k_cache.(cache/2)` for
    /// even, `v_cache.(cache/2)` for odd). One sequence: the runtime
    /// allocates it for the maximum context; kernels see the logical shape
    /// `[past+tokens, ..]` and the new rows are appended in place. Batched:
    /// the paged cache `[num_blocks, block_size, ..]` shared by all
    /// sequences, written in place at each new token's slot.
    KvCache { cache: usize },
    /// Activation or scratch memory in arena slot `slot`.
    Activation { slot: usize },
    /// The memory of `base` from element `offset` on, with this buffer's
    /// own shape (reshape, widening cast, the old part of a KV cache).
    View { base: BufferId, offset: Dim },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Buffer {
    pub name: String,
    /// Storage element type (i64 for every integer tensor).
    pub dtype: DType,
    pub shape: Vec<Dim>,
    pub kind: BufferKind,
}

impl Buffer {
    /// Bytes of the buffer's logical (row-major) extent.
    pub fn bytes(&self) -> Extent {
        Extent::of(self.dtype.size_bytes() as u64, &self.shape)
    }
}

/// How the package builder produces a prepared weight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WeightExpr {
    /// A checkpoint tensor as stored.
    Tensor { name: String },
    /// A weight-only subgraph (casts, stacks, concats, reshapes of
    /// checkpoint tensors, constants): a function with only weight
    /// parameters (full tensor names) and one output, run by the reference
    /// interpreter at package time.
    Graph { function: Function },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreparedWeight {
    /// Unique name; also the name under which the package stores it.
    pub name: String,
    pub expr: WeightExpr,
    /// Storage dtype. Values are exactly representable in it (a widening
    /// cast keeps the narrower dtype; kernels widen in registers).
    pub dtype: DType,
    /// Logical shape (always static).
    pub shape: Vec<usize>,
    pub layout: Layout,
    /// Weight file group: `layers.NNN` for a decoder layer's tensors,
    /// `model` for the rest.
    pub group: String,
}

impl PreparedWeight {
    pub fn stored_bytes(&self) -> usize {
        self.layout.stored_len(&self.shape) * self.dtype.size_bytes()
    }
}

/// One step of a postfix elementwise expression.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ExprToken {
    /// Push operand `i`.
    Arg(usize),
    Unary(UnaryOp),
    Binary(BinaryOp),
}

/// Elementwise operation of an [`KernelKind::Elementwise`] kernel.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ElemOp {
    Unary(UnaryOp),
    Binary(BinaryOp),
    /// Copy converting between storage dtypes (narrowing or int/float casts).
    Convert,
    /// `silu(a) * b`.
    SwiGlu,
    /// A postfix expression over the operands, evaluated in f32 op by op
    /// exactly like the unfused ops.
    Expr {
        tokens: Vec<ExprToken>,
    },
}

impl ElemOp {
    /// The operation as a postfix expression (None for `Convert`).
    pub fn tokens(&self) -> Option<Vec<ExprToken>> {
        use ExprToken::*;
        Some(match self {
            ElemOp::Unary(u) => vec![Arg(0), Unary(*u)],
            ElemOp::Binary(b) => vec![Arg(0), Arg(1), Binary(*b)],
            // silu(g) * u = (g * sigmoid(g)) * u, as the reference computes it.
            ElemOp::SwiGlu => {
                vec![Arg(0), Arg(0), Unary(UnaryOp::Sigmoid), Binary(BinaryOp::Mul), Arg(1), Binary(BinaryOp::Mul)]
            }
            ElemOp::Expr { tokens } => tokens.clone(),
            ElemOp::Convert => return None,
        })
    }
}

impl From<crate::op::EwToken> for ExprToken {
    fn from(t: crate::op::EwToken) -> Self {
        match t {
            crate::op::EwToken::Operand(i) => ExprToken::Arg(i),
            crate::op::EwToken::Unary(u) => ExprToken::Unary(u),
            crate::op::EwToken::Binary(b) => ExprToken::Binary(b),
        }
    }
}

/// Epilogue applied to a GEMM register tile before it is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Epilogue {
    None,
    /// `+ bias[n]`.
    Bias,
    /// Columns come from [`Layout::GateUpPanels`]: `silu(gate) * up`.
    SwiGlu,
}

/// What a kernel computes. Arguments are buffers in the documented order
/// (outputs last); "tile" says how the work is split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum KernelKind {
    /// `(in.., out)`, inputs numpy-broadcast to `out`. Tile: one row of
    /// `out` (all dims but the last).
    Elementwise { op: ElemOp },
    /// `(table[R, W..], idx[..] i64, out[idx.., W..])`. Tile: one index.
    Gather,
    /// Generic batched matmul with broadcasting, any operands:
    /// `(a[.., M, K], b[.., K, N] | b[.., N, K], [bias[N]], out[.., M, N])`.
    /// Tile: one output row.
    MatMul { transpose_b: bool, bias: bool },
    /// Matmul against a packed weight (`b` in [`Layout::Panels`] or
    /// [`Layout::GateUpPanels`]): `(a[.., M, K], b, [bias[N]], out[.., M, N])`.
    /// Tile: one column panel of one batch entry (`batch * panels`).
    Gemm { epilogue: Epilogue },
    /// `(in, out)`: fold along `axis` (out has the reduced shape). Tile:
    /// one index of the dims before `axis`.
    Reduce { op: ReduceOp, axis: usize },
    /// `(in, out i64)`, lowest index wins ties. Tile as `Reduce`.
    ArgMax { axis: usize },
    /// `(in, out)`, f32, as the reference. Tile as `Reduce`.
    Softmax { axis: usize },
    /// `(in, out)`, out dim `i` = in dim `perm[i]`. Tile: one row of `out`.
    Transpose { perm: Vec<usize> },
    /// `(in, out)`: `out = in[.., start:start+len, ..]` along `axis`.
    /// Tile: one index of the dims up to and including `axis` of `out`.
    Slice { axis: usize, start: usize },
    /// `(in, out)`: writes `in` into `out[.., offset:offset+len, ..]` along
    /// `axis` (one part of a concat or stack). Tile: one index of the dims up
    /// to and including `axis` of `in`.
    CopyInto { axis: usize, offset: Dim },
    /// `(in, out)`. Tile: one index of the dims up to and including `axis`
    /// of `out`.
    RepeatInterleave { axis: usize, repeats: usize },
    /// `(positions[T] i64, out[T, head_dim])`. Tile: one position.
    RopeTable { kind: RopeKind, theta: f64, head_dim: usize },
    /// `(positions[T] i64, out[T, K])`. Tile: one position.
    CausalMask,
    /// `(idx[..] i64, out[.., depth])`. Tile: one index.
    OneHot { depth: usize },
    /// `(x[.., H], w[H], out)`. Tile: one row.
    RmsNorm { eps: f64 },
    /// `(x, residual, w, sum_out, norm_out)`. Tile: one row.
    AddRmsNorm { eps: f64 },
    /// `(x[T, heads, D], cos[T, D], sin[T, D], out)`. Tile: one (token, head).
    Rope,
    /// `(q[T, Hq, D], k[K, Hkv, D], v[K, Hkv, D], positions[T] i64, out[T, Hq, D])`:
    /// causal GQA attention, prefill and decode over the KV cache.
    /// Tile: one (token, KV head) with all its query heads. Per-thread
    /// scratch: `Hq/Hkv` rows of K scores.
    Attention { scale: f64 },
    /// `(logits[T, E], scale[E], weights_out[T, G], ids_out[T, G] i64)`.
    /// Tile: one token.
    MoeGating { groups: usize },
    /// Dispatch for grouped matmul: `(weights[T, G], ids[T, G] i64,
    /// offsets_out[E+1] i64, rows_out[T*G] i64, row_weight_out[T*G],
    /// slot_row_out[T*G] i64)`: a stable counting sort of the (token, group)
    /// slots by expert. Sorted row `r` belongs to token `rows[r]`; expert
    /// `e` owns rows `offsets[e]..offsets[e+1]`; slot `t*G+g` went to row
    /// `slot_row[t*G+g]`. Tile: the whole dispatch (1 tile).
    MoeRoute,
    /// `(x[T, H], offsets[E+1], rows[T*G], w_gate_up[E, 2I, H] (GateUpPanels),
    /// act_out[T*G, I])`: `act[r] = swiglu(x[rows[r]] @ w_gate_up[e]^T)`.
    /// Tile: one (expert, column panel).
    MoeGateUp,
    /// `(xs[T*G, H], offsets[E+1], w_gate_up[E, 2I, H] (GateUpPanels),
    /// act_out[T*G, I])`: `act[r] = swiglu(xs[r] @ w_gate_up[e]^T)` for the
    /// rows `r` of expert `e`, where `xs` already holds every sorted row's
    /// token row, gathered once into one contiguous block per expert (the
    /// batched MoE; `MoeGateUp` instead reads each row through `rows`).
    /// Tile: one (expert, column panel).
    MoeGroupedGateUp,
    /// `(act[T*G, I], offsets[E+1], row_weight[T*G], w_down[E, H, I] (Panels),
    /// ys_out[T*G, H])`: `ys[r] = row_weight[r] * (act[r] @ w_down[e]^T)`.
    /// Tile: one (expert, column panel).
    MoeDown,
    /// `(ys[T*G, H], slot_row[T*G] i64, [shared[T, H], residual[T, H]], out[T, H])`:
    /// `routed[t] = sum_g ys[slot_row[t*G+g]]` in group order; `out = routed`,
    /// or `residual + (routed + shared)` with `shared_residual`. Tile: one token.
    MoeCombine { shared_residual: bool },
    /// `(y[T, (Hq+2*Hkv)*D], cos[T, D], sin[T, D], q_out[T, Hq, D],
    /// k_cache[P+T, Hkv, D], v_cache[P+T, Hkv, D])`: split a merged QKV
    /// projection into heads, RoPE q and k, and append k and v to the caches
    /// at rows `past..past+T` (the old rows are not touched). Tile: one token.
    QkvRopeAppend { q_heads: usize, kv_heads: usize },
    /// `(new[T, Hkv, D], slots[T] i64, cache[num_blocks, block_size, Hkv, D])`:
    /// row `t` of `new` stored at slot `slots[t]` of the paged cache, in
    /// place (other slots are not touched). Tile: one token.
    KvCacheWrite,
    /// `(y[T, (Hq+2*Hkv)*D], cos[T, D], sin[T, D], slots[T] i64, q_out[T, Hq, D],
    /// k_cache[num_blocks, block_size, Hkv, D], v_cache[same])`: the paged
    /// counterpart of [`KernelKind::QkvRopeAppend`]: q roped into `q_out`,
    /// k roped and v copied into the caches at slot `slots[t]` (in place).
    /// Tile: one token.
    QkvRopeCacheWrite { q_heads: usize, kv_heads: usize },
    /// [`KernelKind::QkvRopeCacheWrite`] into int8 (C8) caches: `(y[T,
    /// (Hq+2*Hkv)*D], cos[T, D], sin[T, D], slots[T] i64, k_scale[Hkv, D],
    /// k_offset[Hkv, D], v_scale[Hkv, D], v_offset[Hkv, D], q_out[T, Hq, D],
    /// k_cache i8[num_blocks, block_size, Hkv, D], v_cache i8[same])`: the
    /// roped k row and the v row are quantized per channel (`Quantize`
    /// semantics, as [`KernelKind::KvCacheWriteQuant`]) on the way into
    /// their slot. Tile: one token.
    QkvRopeCacheWriteQuant { q_heads: usize, kv_heads: usize },
    /// `(q[T, Hq, D], k_cache[num_blocks, block_size, Hkv, D], v_cache[same],
    /// block_table[S, max_blocks] i64, query_start_loc[S+1] i64,
    /// context_lens[S] i64, out[T, Hq, D])`: causal GQA attention of each
    /// row over its own sequence's context read through its block-table row
    /// (row `i` of sequence `s` sits at position `context_len - q_len + i`),
    /// with the arithmetic of [`KernelKind::Attention`]. Tile: one (token,
    /// KV head) with all its query heads. Per-thread scratch: `Hq/Hkv` rows
    /// of `max_blocks * block_size` scores.
    PagedAttention { scale: f64 },
    // ---- int8 quantization (meaning in `crate::interp::quant`) ----
    /// `(x float, scale float, offset float, out i8)`, numpy-broadcast to
    /// `out`: `clamp(round_half_even(x / scale + offset), -128, 127)` (NaN
    /// gives 0). Tile: one row of `out`.
    Quantize,
    /// `(q i8, scale float, offset float, out f32)`, broadcast like
    /// `Quantize`: `(q - offset) * scale`. Tile: one row of `out`.
    Dequantize,
    /// `(x[.., K] float, q_out i8[.., K], scale_out f32[..])`: per-row
    /// `s = max|x| / 127`, `q = quantize(x / s)` (zeros for a zero row).
    /// Tile: one row.
    DynamicQuant,
    /// Int8 matmul with exact int32 accumulation and a float epilogue:
    /// `(xq i8[.., M, K], w i8[.., N, K], a[.., N], b, [bias[N],] out f32[.., M, N])`
    /// (an operand without batch dims is shared by every batch entry).
    /// Static W8A8 (`per_token` false): `a` = quant_bias (int), `b` =
    /// deq_scale[.., N] (float, or i64 holding the f32 bits), `out =
    /// f32(acc + a[n]) * b[n]`. W8A8_DYNAMIC (`per_token`): `a` = w_scale
    /// (float or i64-encoded), `b` = x_scale f32[.., M], `out = f32(acc) *
    /// a[n] * b[m]`. With `bias` a float `bias[n]` is added last (the
    /// linear's bias add, fused). Tile: one batch entry's block of
    /// [`QUANT_MATMUL_COLS`] output columns over all M rows (the block's
    /// weight rows stay in cache while every row reads them, and a decode
    /// step still has N / 16 tiles to spread over threads).
    QuantMatMul { per_token: bool, bias: bool },
    /// RMSNorm (`add`: with the residual add, as `AddRmsNorm`) whose
    /// normalized row is also quantized per token (`DynamicQuant`) in the
    /// same pass: `(x, [residual,] w, [sum_out,] norm_out, q_out i8, scale_out f32)`.
    /// `norm_out` is written too (the router reads the float row). Tile: one row.
    RmsNormQuant { eps: f64, add: bool },
    /// `(q[T, Hq, D], k_cache i8[NB, BS, Hkv, D], v_cache i8[same], block_table,
    /// query_start_loc, context_lens, k_scale[Hkv, D], k_offset[Hkv, D],
    /// v_scale[Hkv, D], v_offset[Hkv, D], out[T, Hq, D])`: [`KernelKind::PagedAttention`]
    /// over an int8 (C8) cache, each key and value element dequantized
    /// per channel (`(q - offset) * scale`, f32) as it is read, so no float
    /// copy of the cache is made. Tile and scratch as `PagedAttention`.
    PagedAttentionInt8 { scale: f64 },
    /// `(new f32[T, Hkv, D], slots[T] i64, scale[Hkv, D], offset[Hkv, D],
    /// cache i8[num_blocks, block_size, Hkv, D])`: [`KernelKind::KvCacheWrite`]
    /// of the rows quantized per channel (`Quantize` semantics) on the way
    /// into the int8 cache. Tile: one token.
    KvCacheWriteQuant,
    /// Routed W8A8_DYNAMIC experts, first half (`grouped_quant_matmul` of
    /// the gate and of the up projection, `swiglu`, `dynamic_quant`):
    /// `(xq i8[T, H], x_scale f32[T], offsets i64[E+1], rows i64[S],
    /// w_gate i8[E, I, H], gate_scale[E, I], w_up i8[E, I, H], up_scale[E, I],
    /// q_out i8[S, I], scale_out f32[S])`. Sorted row `r` (of expert `e`:
    /// `offsets[e] <= r < offsets[e+1]`, as [`KernelKind::MoeRoute`] writes
    /// them) reads token row `rows[r]`; `g[n] = f32(xq . w_gate[e, n]) *
    /// gate_scale[e, n] * x_scale`, `u` likewise, `a = silu(g) * u`, and
    /// `a` is quantized per row into `q_out[r]`, `scale_out[r]`
    /// (`DynamicQuant`). The int32 sums never leave the kernel. Tiles: one per sorted row; the
    /// tile at the first row of each block of up to 16 rows of one expert
    /// computes the block (the others have no work), so each weight panel
    /// is read once per block.
    MoeGateUpQuant,
    /// The shared expert's [`KernelKind::MoeGateUpQuant`] (one expert, no
    /// routing): `(xq i8[T, H], x_scale f32[T], w_gate i8[I, H],
    /// gate_scale[I], w_up i8[I, H], up_scale[I], q_out i8[T, I], scale_out
    /// f32[T])`. Tiles: one per row; the tile at
    /// the first row of each block of 16 rows computes the block.
    QuantGateUpQuant,
    /// Routed W8A8_DYNAMIC experts, second half (`grouped_quant_matmul` of
    /// the down projection, scaled by the routing weight):
    /// `(aq i8[S, I], a_scale f32[S], offsets i64[E+1], row_weight f32[S],
    /// w_down i8[E, H, I], down_scale[E, H], ys f32[S, H])`:
    /// `ys[r, n] = f32(aq[r] . w_down[e, n]) * down_scale[e, n] *
    /// a_scale[r] * row_weight[r]`. Tiles: one per sorted row; the
    /// tile at the first row of each block of up to 16 rows of one expert
    /// computes the block (the others have no work), so each weight panel
    /// is read once per block.
    MoeDownQuant,
    /// [`KernelKind::QuantMatMul`] (`per_token`) with the `DynamicQuant`
    /// of its input done inside: `(x f32[M, K], w i8[N, K], w_scale[N],
    /// [bias[N],] [residual f32[M, N],] out f32[M, N])`; each row is
    /// quantized per token (`DynamicQuant` semantics) before its int8 dot
    /// products, so the int8 row never reaches memory. With `residual`,
    /// `out = (y [+ bias]) + residual` (the residual add after the o
    /// projection, in that order). Tile: as `QuantMatMul` (a block of
    /// [`QUANT_MATMUL_COLS`] columns over every row; each tile quantizes
    /// the rows it reads, K work per row against its 16 K of dot products).
    DynQuantMatMul { bias: bool, residual: bool },
    /// Static W8A8's [`KernelKind::Quantize`] of a projection's input done
    /// by its [`KernelKind::QuantMatMul`] (not `per_token`): `(x f32[M, K],
    /// in_scale[1], in_offset[1], w i8[N, K], quant_bias[N], deq_scale[N],
    /// out f32[M, N])`; each row is quantized with the per-tensor scale and
    /// offset (`Quantize` semantics) before its int8 dot products, `out =
    /// f32(acc + quant_bias[n]) * deq_scale[n]`, so the int8 row never
    /// reaches memory. Tile: as `QuantMatMul`.
    StaticQuantMatMul,
    /// Routed static W8A8 experts, first half (the dense form's per-expert
    /// `quantize` and `quant_matmul` of the gate and of the up projection,
    /// `swiglu`, and the down projection's `quantize`, for the selected
    /// (token, expert) pairs only): `(x f32[T, H], offsets i64[E+1],
    /// rows i64[S], gate_scale[E], gate_offset[E], w_gate i8[E, I, H],
    /// gate_qbias[E, I], gate_deq[E, I], up_scale[E], up_offset[E],
    /// w_up i8[E, I, H], up_qbias[E, I], up_deq[E, I], down_scale[E],
    /// down_offset[E], q_out i8[S, I])`. Sorted row `r` of expert `e` (as
    /// [`KernelKind::MoeRoute`] writes them) quantizes token row `rows[r]`
    /// with each projection's per-tensor scale and offset (`Quantize`),
    /// `g[n] = f32(xg . w_gate[e, n] + gate_qbias[e, n]) * gate_deq[e, n]`,
    /// `u` likewise, `a = silu(g) * u`, and `q_out[r] = quantize(a,
    /// down_scale[e], down_offset[e])`. Tiles: one per sorted row; the
    /// tile at the first row of each block of up to 16 rows of one expert
    /// computes the block (the others have no work), so each weight panel
    /// is read once per block.
    MoeGateUpStatic,
    /// The shared expert's gate, up and SwiGLU under static W8A8 (two
    /// [`KernelKind::StaticQuantMatMul`]s of one input, then `swiglu`):
    /// `(x f32[T, H], gate_scale[1], gate_offset[1], w_gate i8[I, H],
    /// gate_qbias[I], gate_deq[I], up_scale[1], up_offset[1], w_up i8[I, H],
    /// up_qbias[I], up_deq[I], act_out f32[T, I])`: `act = silu(g) * u`.
    /// Tiles: one per row; the tile at
    /// the first row of each block of 16 rows computes the block.
    QuantGateUpStatic,
    /// Routed static W8A8 experts, second half: `(aq i8[S, I], offsets
    /// i64[E+1], row_weight f32[S], w_down i8[E, H, I], down_qbias[E, H],
    /// down_deq[E, H], ys f32[S, H])`: `ys[r, n] =
    /// f32(aq[r] . w_down[e, n] + down_qbias[e, n]) * down_deq[e, n] *
    /// row_weight[r]`. Tiles: one per sorted row; the
    /// tile at the first row of each block of up to 16 rows of one expert
    /// computes the block (the others have no work), so each weight panel
    /// is read once per block.
    MoeDownStatic,
    /// `(in, out)` f32: a collective over the global ranks `group` with the
    /// semantics of `panguc_ir::multirank` (sum reduction; `axis` for the
    /// gathering/scattering kinds). Host-executed: code generators emit no
    /// code for it and the runtime calls its communication library (see
    /// [`KernelKind::is_host`]). Tile: the whole collective (1 tile).
    Collective { kind: crate::op::CollectiveKind, group: Vec<usize>, axis: usize },
}

impl KernelKind {
    /// Short name used in kernel symbols and dumps.
    pub fn mnemonic(&self) -> &'static str {
        match self {
            KernelKind::Elementwise { .. } => "elementwise",
            KernelKind::Gather => "gather",
            KernelKind::MatMul { .. } => "matmul",
            KernelKind::Gemm { .. } => "gemm",
            KernelKind::Reduce { .. } => "reduce",
            KernelKind::ArgMax { .. } => "argmax",
            KernelKind::Softmax { .. } => "softmax",
            KernelKind::Transpose { .. } => "transpose",
            KernelKind::Slice { .. } => "slice",
            KernelKind::CopyInto { .. } => "copy_into",
            KernelKind::RepeatInterleave { .. } => "repeat_interleave",
            KernelKind::RopeTable { .. } => "rope_table",
            KernelKind::CausalMask => "causal_mask",
            KernelKind::OneHot { .. } => "one_hot",
            KernelKind::RmsNorm { .. } => "rms_norm",
            KernelKind::AddRmsNorm { .. } => "add_rms_norm",
            KernelKind::Rope => "rope",
            KernelKind::Attention { .. } => "attention",
            KernelKind::MoeGating { .. } => "moe_gating",
            KernelKind::MoeRoute => "moe_route",
            KernelKind::MoeGateUp => "moe_gate_up",
            KernelKind::MoeGroupedGateUp => "moe_grouped_gate_up",
            KernelKind::MoeDown => "moe_down",
            KernelKind::MoeCombine { .. } => "moe_combine",
            KernelKind::QkvRopeAppend { .. } => "qkv_rope_append",
            KernelKind::KvCacheWrite => "kv_cache_write",
            KernelKind::QkvRopeCacheWrite { .. } => "qkv_rope_cache_write",
            KernelKind::QkvRopeCacheWriteQuant { .. } => "qkv_rope_cache_write_quant",
            KernelKind::PagedAttention { .. } => "paged_attention",
            KernelKind::Quantize => "quantize",
            KernelKind::RmsNormQuant { add: false, .. } => "rms_norm_quant",
            KernelKind::RmsNormQuant { add: true, .. } => "add_rms_norm_quant",
            KernelKind::PagedAttentionInt8 { .. } => "paged_attention_int8",
            KernelKind::KvCacheWriteQuant => "kv_cache_write_quant",
            KernelKind::MoeGateUpQuant => "moe_gate_up_quant",
            KernelKind::QuantGateUpQuant => "quant_gate_up_quant",
            KernelKind::MoeDownQuant => "moe_down_quant",
            KernelKind::DynQuantMatMul { .. } => "dyn_quant_matmul",
            KernelKind::StaticQuantMatMul => "static_quant_matmul",
            KernelKind::MoeGateUpStatic => "moe_gate_up_static",
            KernelKind::QuantGateUpStatic => "quant_gate_up_static",
            KernelKind::MoeDownStatic => "moe_down_static",
            KernelKind::Dequantize => "dequantize",
            KernelKind::DynamicQuant => "dynamic_quant",
            KernelKind::QuantMatMul { per_token: false, .. } => "quant_matmul",
            KernelKind::QuantMatMul { per_token: true, .. } => "quant_matmul_per_token",
            KernelKind::Collective { kind, .. } => match kind {
                crate::op::CollectiveKind::AllReduce => "all_reduce",
                crate::op::CollectiveKind::AllGather => "all_gather",
                crate::op::CollectiveKind::ReduceScatter => "reduce_scatter",
                crate::op::CollectiveKind::AllToAll => "all_to_all",
            },
        }
    }

    /// True for launches the runtime executes itself (collectives): no
    /// generated code, no symbol in the kernel library.
    pub fn is_host(&self) -> bool {
        matches!(self, KernelKind::Collective { .. })
    }

    /// Number of trailing arguments that the kernel writes.
    pub fn num_outputs(&self) -> usize {
        match self {
            KernelKind::AddRmsNorm { .. }
            | KernelKind::MoeGating { .. }
            | KernelKind::DynamicQuant
            | KernelKind::MoeGateUpQuant
            | KernelKind::QuantGateUpQuant => 2,
            KernelKind::MoeRoute | KernelKind::RmsNormQuant { add: true, .. } => 4,
            KernelKind::RmsNormQuant { add: false, .. } => 3,
            KernelKind::QkvRopeAppend { .. }
            | KernelKind::QkvRopeCacheWrite { .. }
            | KernelKind::QkvRopeCacheWriteQuant { .. } => 3,
            _ => 1,
        }
    }
}

/// Dtype, logical shape and layout of one kernel argument.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ArgSpec {
    pub dtype: DType,
    pub shape: Vec<Dim>,
    pub layout: Layout,
}

/// One specialised kernel: kind plus argument dtypes and shapes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Kernel {
    /// Symbol name of the entry point (unique in the program).
    pub name: String,
    pub kind: KernelKind,
    pub args: Vec<ArgSpec>,
    /// Number of independent tiles of one launch.
    pub tiles: Extent,
    /// Bytes of scratch each thread needs while running a tile range.
    pub thread_scratch: Extent,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Launch {
    pub kernel: usize,
    pub args: Vec<BufferId>,
}

/// The scheduled model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelProgram {
    pub version: u32,
    pub name: String,
    /// Order of the shape symbols in the `syms` array passed to kernels.
    pub symbols: Vec<String>,
    pub buffers: Vec<Buffer>,
    pub weights: Vec<PreparedWeight>,
    pub kernels: Vec<Kernel>,
    pub launches: Vec<Launch>,
    /// Entry inputs the runtime fills (`ids`, `positions`), in order.
    pub inputs: Vec<BufferId>,
    /// Entry outputs besides the caches (`logits`).
    pub outputs: Vec<BufferId>,
    /// KV cache buffers in entry-input order (k0, v0, k1, v1, ..).
    pub caches: Vec<BufferId>,
    /// Number of activation arena slots.
    pub slots: usize,
}

impl KernelProgram {
    pub fn buffer(&self, id: BufferId) -> &Buffer {
        &self.buffers[id.index()]
    }

    /// True for a ragged-batch program over paged KV caches (shape symbols
    /// `tokens`, `seqs`, `max_blocks`, `num_blocks`; entry inputs `ids` and
    /// the step metadata of `crate::batch::declare_step_inputs`), false for
    /// a one-sequence program over contiguous caches (`tokens`, `past`).
    pub fn is_batched(&self) -> bool {
        self.symbols.iter().any(|s| s == crate::shape::SYM_SEQS)
    }

    /// Tokens per KV block of a batched program (the static second dim of
    /// its paged caches); `None` for a one-sequence program.
    pub fn kv_block_size(&self) -> Option<usize> {
        if !self.is_batched() {
            return None;
        }
        let c = self.caches.first()?;
        self.buffers.get(c.index())?.shape.get(1)?.as_const()
    }

    /// Follow views to the buffer that owns the memory; returns it and the
    /// element offset (in the root's dtype) of `id` inside it.
    pub fn root_of(&self, id: BufferId) -> (BufferId, Vec<Dim>) {
        let mut offsets = vec![];
        let mut cur = id;
        while let BufferKind::View { base, offset } = &self.buffer(cur).kind {
            offsets.push(offset.clone());
            cur = *base;
        }
        (cur, offsets)
    }

    /// Consistency checks between launches, kernels and buffers. A failure
    /// is a scheduler bug; the message names the launch.
    pub fn validate(&self) -> Result<(), String> {
        if self.version != KERNEL_PROGRAM_VERSION {
            return Err(format!("kernel program version {} (expected {KERNEL_PROGRAM_VERSION})", self.version));
        }
        for (i, l) in self.launches.iter().enumerate() {
            let k = self.kernels.get(l.kernel).ok_or_else(|| format!("launch {i}: no kernel {}", l.kernel))?;
            if k.args.len() != l.args.len() {
                return Err(format!("launch {i} ({}): {} args, kernel takes {}", k.name, l.args.len(), k.args.len()));
            }
            for (j, (a, spec)) in l.args.iter().zip(&k.args).enumerate() {
                let b = self.buffers.get(a.index()).ok_or_else(|| format!("launch {i}: no buffer {}", a.0))?;
                if b.dtype != spec.dtype || b.shape != spec.shape {
                    return Err(format!(
                        "launch {i} ({}) arg {j}: buffer `{}` is {}{:?}, kernel wants {}{:?}",
                        k.name, b.name, b.dtype, b.shape, spec.dtype, spec.shape
                    ));
                }
                if let BufferKind::Weight { index } = b.kind {
                    let w = self.weights.get(index).ok_or_else(|| format!("buffer `{}`: no weight {index}", b.name))?;
                    if w.layout != spec.layout {
                        return Err(format!(
                            "launch {i} ({}) arg {j}: weight `{}` has the wrong layout",
                            k.name, b.name
                        ));
                    }
                }
            }
        }
        // Every reference the runtime follows must be in range: a program
        // read from a package is untrusted input (found by fuzz/kernel_program).
        for (i, b) in self.buffers.iter().enumerate() {
            match b.kind {
                BufferKind::View { base, .. } if base.index() >= i => {
                    return Err(format!("view `{}` refers to a later buffer", b.name));
                }
                BufferKind::Weight { index } if index >= self.weights.len() => {
                    return Err(format!("buffer `{}`: no weight {index}", b.name));
                }
                BufferKind::KvCache { cache } if cache >= self.caches.len() => {
                    return Err(format!("buffer `{}`: no KV cache {cache}", b.name));
                }
                BufferKind::Activation { slot } if slot >= self.slots => {
                    return Err(format!("buffer `{}`: no arena slot {slot} (the program has {})", b.name, self.slots));
                }
                BufferKind::Input { index } if index >= self.inputs.len() => {
                    return Err(format!("buffer `{}`: no entry input {index}", b.name));
                }
                _ => {}
            }
        }
        for (what, ids) in [("input", &self.inputs), ("output", &self.outputs), ("KV cache", &self.caches)] {
            if let Some(id) = ids.iter().find(|id| id.index() >= self.buffers.len()) {
                return Err(format!("{what} buffer {} does not exist", id.0));
            }
        }
        Ok(())
    }

    /// Human-readable listing (the kernel-program IR dump).
    pub fn to_text(&self) -> String {
        let mut out = format!("kernel_program @{} version {}\n\n", self.name, self.version);
        let _ = writeln!(out, "// {} buffers, {} arena slots", self.buffers.len(), self.slots);
        for (i, b) in self.buffers.iter().enumerate() {
            let shape: Vec<String> = b.shape.iter().map(Dim::to_string).collect();
            let kind = match &b.kind {
                BufferKind::Input { index } => format!("input {index}"),
                BufferKind::Weight { index } => {
                    let w = &self.weights[*index];
                    format!("weight {:?}", w.layout)
                }
                BufferKind::KvCache { cache } => format!("kv_cache {cache}"),
                BufferKind::Activation { slot } => format!("slot {slot}"),
                BufferKind::View { base, offset } => format!("view of b{} + {offset}", base.0),
            };
            let _ = writeln!(out, "b{i} %{}: {}[{}] = {kind}", b.name, b.dtype, shape.join(","));
        }
        let _ = writeln!(out, "\n// {} kernels", self.kernels.len());
        for k in &self.kernels {
            let args: Vec<String> = k
                .args
                .iter()
                .map(|a| {
                    let shape: Vec<String> = a.shape.iter().map(Dim::to_string).collect();
                    format!("{}[{}]{}", a.dtype, shape.join(","), a.layout.suffix())
                })
                .collect();
            let _ = writeln!(
                out,
                "kernel @{} = {:?} ({}) tiles {} scratch {}",
                k.name,
                k.kind,
                args.join(", "),
                k.tiles,
                k.thread_scratch
            );
        }
        let _ = writeln!(out, "\n// {} launches", self.launches.len());
        for l in &self.launches {
            let args: Vec<String> = l.args.iter().map(|a| format!("%{}", self.buffer(*a).name)).collect();
            let _ = writeln!(out, "launch @{}({})", self.kernels[l.kernel].name, args.join(", "));
        }
        out
    }
}

/// Outer extent of `shape` before `axis` (exclusive) as an [`Extent`].
fn prefix(shape: &[Dim], end: usize) -> Extent {
    Extent::of(1, &shape[..end])
}

/// The tile count of a kernel (see [`KernelKind`] for what a tile is).
/// Code generators must split work exactly this way.
pub fn tile_extent(kind: &KernelKind, args: &[ArgSpec]) -> Result<Extent, String> {
    let last = |i: usize| -> &ArgSpec { &args[args.len() - 1 - i] };
    let rows = |shape: &[Dim]| prefix(shape, shape.len().saturating_sub(1));
    let cst = |d: &Dim, what: &str| d.as_const().ok_or_else(|| format!("{what} must be static, found {d}"));
    Ok(match kind {
        KernelKind::Elementwise { .. }
        | KernelKind::Transpose { .. }
        | KernelKind::MatMul { .. }
        | KernelKind::Quantize
        | KernelKind::Dequantize => rows(&last(0).shape),
        KernelKind::QuantMatMul { .. } | KernelKind::DynQuantMatMul { .. } | KernelKind::StaticQuantMatMul => {
            let out = &last(0).shape;
            let r = out.len();
            let n = cst(&out[r - 1], "int8 matmul N")?;
            let mut e = prefix(out, r - 2);
            e.factor *= n.div_ceil(QUANT_MATMUL_COLS) as u64;
            e
        }
        KernelKind::DynamicQuant
        | KernelKind::QuantGateUpQuant
        | KernelKind::MoeDownQuant
        | KernelKind::MoeDownStatic
        | KernelKind::QuantGateUpStatic => rows(&args[0].shape),
        KernelKind::MoeGateUpQuant => Extent::of(1, &args[3].shape[..1]),
        KernelKind::MoeGateUpStatic => Extent::of(1, &args[2].shape[..1]),
        KernelKind::Gather | KernelKind::OneHot { .. } => Extent::of(1, &args[args.len() - 2].shape),
        KernelKind::Gemm { .. } => {
            let out = &last(0).shape;
            let r = out.len();
            let n = cst(&out[r - 1], "gemm N")?;
            let per_panel = match args[1].layout {
                Layout::Panels { nr, .. } => nr as usize,
                Layout::GateUpPanels { nr } => nr as usize / 2,
                Layout::RowMajor | Layout::DotPanels { .. } => {
                    return Err("gemm weight must be packed in float panels".into())
                }
            };
            let mut e = prefix(out, r - 2);
            e.factor *= n.div_ceil(per_panel) as u64;
            e
        }
        KernelKind::Reduce { axis, .. } | KernelKind::ArgMax { axis } | KernelKind::Softmax { axis } => {
            prefix(&args[0].shape, *axis)
        }
        KernelKind::Slice { axis, .. } | KernelKind::RepeatInterleave { axis, .. } => prefix(&last(0).shape, axis + 1),
        KernelKind::CopyInto { axis, .. } => prefix(&args[0].shape, axis + 1),
        KernelKind::RopeTable { .. } | KernelKind::CausalMask => Extent::of(1, &args[0].shape[..1]),
        KernelKind::RmsNorm { .. } | KernelKind::AddRmsNorm { .. } | KernelKind::RmsNormQuant { .. } => {
            rows(&args[0].shape)
        }
        KernelKind::Rope => prefix(&args[0].shape, 2),
        KernelKind::Attention { .. } => Extent::of(1, &[args[0].shape[0].clone(), args[1].shape[1].clone()]),
        KernelKind::MoeGating { .. } | KernelKind::MoeCombine { .. } => Extent::of(1, &last(0).shape[..1]),
        KernelKind::QkvRopeAppend { .. }
        | KernelKind::QkvRopeCacheWrite { .. }
        | KernelKind::QkvRopeCacheWriteQuant { .. }
        | KernelKind::KvCacheWrite
        | KernelKind::KvCacheWriteQuant => Extent::of(1, &args[0].shape[..1]),
        KernelKind::PagedAttention { .. } | KernelKind::PagedAttentionInt8 { .. } => {
            Extent::of(1, &[args[0].shape[0].clone(), args[1].shape[2].clone()])
        }
        KernelKind::MoeRoute | KernelKind::Collective { .. } => Extent::constant(1),
        KernelKind::MoeGateUp | KernelKind::MoeGroupedGateUp | KernelKind::MoeDown => {
            // The expert weight is the operand before the output.
            let w = &args[args.len() - 2];
            let e = cst(&w.shape[0], "expert count")?;
            let (cols, per_panel) = match w.layout {
                Layout::GateUpPanels { nr } => (cst(&w.shape[1], "gate_up rows")? / 2, nr as usize / 2),
                Layout::Panels { nr, .. } => (cst(&w.shape[1], "down rows")?, nr as usize),
                Layout::RowMajor | Layout::DotPanels { .. } => {
                    return Err("expert weights must be packed in float panels".into())
                }
            };
            Extent::constant((e * cols.div_ceil(per_panel)) as u64)
        }
    })
}

/// Rough work of one tile (bytes moved or flops, whichever dominates):
/// enough for a runtime to decide whether a launch is worth spreading over
/// threads. Not used for correctness.
pub fn tile_cost(kind: &KernelKind, args: &[ArgSpec]) -> Extent {
    let last = |a: &ArgSpec| a.shape.last().cloned().unwrap_or(Dim::c(1));
    let esize = |a: &ArgSpec| a.dtype.size_bytes() as u64;
    let panel = |w: &ArgSpec, k: &Dim, rows: &Dim| -> Extent {
        let nr = match w.layout {
            Layout::Panels { nr, .. } | Layout::GateUpPanels { nr } => nr as u64,
            Layout::DotPanels { nr, .. } => nr as u64,
            Layout::RowMajor => 1,
        };
        // Streaming the panel, or 2 flops per weight and row.
        Extent::of(nr * esize(w).max(2), &[k.clone(), rows.clone()])
    };
    match kind {
        KernelKind::Gemm { .. } => {
            let a = &args[0];
            panel(&args[1], &last(a), &a.shape[a.shape.len() - 2])
        }
        KernelKind::MoeGateUp | KernelKind::MoeGroupedGateUp | KernelKind::MoeDown => {
            panel(&args[args.len() - 2], &args[0].shape[1], &Dim::c(1))
        }
        KernelKind::QuantMatMul { .. } | KernelKind::DynQuantMatMul { .. } | KernelKind::StaticQuantMatMul => {
            // A block of columns over every row: 2 ops per int8 product.
            let (a, out) = (&args[0], args.last().expect("out"));
            Extent::of(2 * QUANT_MATMUL_COLS as u64, &[last(a), out.shape[out.shape.len() - 2].clone()])
        }
        KernelKind::MatMul { .. } => {
            let a = &args[0];
            let out = args.last().expect("out");
            Extent::of(2, &[last(a), last(out)])
        }
        // One row against every column of its expert's weights: 2 ops per
        // int8 product (two projections for the gate/up kernels).
        KernelKind::MoeGateUpQuant | KernelKind::QuantGateUpQuant => {
            let w = &args[args.len() - 6];
            Extent::of(4, &w.shape[w.shape.len() - 2..])
        }
        KernelKind::MoeDownQuant => {
            let w = &args[4];
            Extent::of(2, &w.shape[1..])
        }
        KernelKind::MoeGateUpStatic => {
            let w = &args[5];
            Extent::of(4, &w.shape[1..])
        }
        KernelKind::QuantGateUpStatic => Extent::of(4, &args[3].shape),
        KernelKind::MoeDownStatic => {
            let w = &args[3];
            Extent::of(2, &w.shape[1..])
        }
        KernelKind::Attention { .. } => {
            let (q, k) = (&args[0], &args[1]);
            let group = match (q.shape[1].as_const(), k.shape[1].as_const()) {
                (Some(hq), Some(hkv)) if hkv > 0 => (hq / hkv) as u64,
                _ => 1,
            };
            Extent::of(4 * group, &[k.shape[0].clone(), last(q)])
        }
        KernelKind::PagedAttention { .. } | KernelKind::PagedAttentionInt8 { .. } => {
            // Up to a whole block table of keys per row.
            let (q, k, table) = (&args[0], &args[1], &args[3]);
            let group = match (q.shape[1].as_const(), k.shape[2].as_const()) {
                (Some(hq), Some(hkv)) if hkv > 0 => (hq / hkv) as u64,
                _ => 1,
            };
            Extent::of(4 * group, &[table.shape[1].clone(), k.shape[1].clone(), last(q)])
        }
        _ => {
            // Row kernels: the bytes of one row of every argument.
            let bytes: u64 = args.iter().map(|a| esize(a) * last(a).as_const().unwrap_or(1) as u64).sum();
            Extent::constant(bytes.max(1))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extent_folds_constants_and_evaluates() {
        let e = Extent::of(4, &[Dim::c(3), Dim::tokens(), Dim::kv_len()]);
        assert_eq!(e.factor, 12);
        assert_eq!(e.dims.len(), 2);
        assert_eq!(e.eval(&crate::shape::bindings(2, 5)).unwrap(), 12 * 2 * 7);
    }

    #[test]
    fn packed_layout_sizes_pad_to_whole_panels() {
        assert_eq!(Layout::RowMajor.stored_len(&[3, 5]), 15);
        // 20 columns -> 2 panels of 16, K = 7.
        assert_eq!(Layout::Panels { nr: 16, kn: false }.stored_len(&[20, 7]), 2 * 16 * 7);
        assert_eq!(Layout::Panels { nr: 16, kn: true }.stored_len(&[2, 7, 20]), 2 * 2 * 16 * 7);
        // I = 12 -> 2 panels of 8 gate + 8 up columns.
        assert_eq!(Layout::GateUpPanels { nr: 16 }.stored_len(&[24, 5]), 2 * 16 * 5);
    }

    #[test]
    fn panels_pad_and_transpose() {
        // [N=3, K=2] with nr = 2: panel 0 = cols 0,1; panel 1 = col 2 + zero.
        let src: Vec<u8> = (1..=6).collect();
        let out = Layout::Panels { nr: 2, kn: false }.pack(&src, &[3, 2], 1);
        assert_eq!(out, vec![1, 3, 2, 4, 5, 0, 6, 0]);
        assert_eq!(out.len(), Layout::Panels { nr: 2, kn: false }.stored_len(&[3, 2]));
        // The same matrix stored [K=2, N=3].
        let kn = vec![1, 3, 5, 2, 4, 6];
        assert_eq!(Layout::Panels { nr: 2, kn: true }.pack(&kn, &[2, 3], 1), out);
    }

    #[test]
    fn dot_panels_group_k_per_column_and_pad() {
        // [N=3, K=3], nr = 2, kg = 2: panel 0 = cols 0, 1; k groups {0,1}, {2, pad}.
        let src: Vec<u8> = (1..=9).collect();
        let l = Layout::DotPanels { nr: 2, kg: 2 };
        let out = l.pack(&src, &[3, 3], 1);
        #[rustfmt::skip]
        let want = vec![
            1, 2, 4, 5, /* group 1 */ 3, 0, 6, 0,
            7, 8, 0, 0, /* group 1 */ 9, 0, 0, 0,
        ];
        assert_eq!(out, want);
        assert_eq!(out.len(), l.stored_len(&[3, 3]));
        // Two batch entries: each packs alone.
        let two: Vec<u8> = src.iter().chain(&src).copied().collect();
        assert_eq!(l.pack(&two, &[2, 3, 3], 1), [want.clone(), want].concat());
        assert_eq!(Layout::DotPanels { nr: 16, kg: 4 }.stored_len(&[20, 7]), 2 * 16 * 8);
    }

    #[test]
    fn gate_up_panels_interleave_halves() {
        // [2I=4, K=1], nr = 2: gate rows 10, 11; up rows 20, 21.
        let src = vec![10u8, 11, 20, 21];
        assert_eq!(Layout::GateUpPanels { nr: 2 }.pack(&src, &[4, 1], 1), vec![10, 20, 11, 21]);
    }

    /// The typed copies against the layout's definition, element by
    /// element: 2-byte elements, two batch entries, a partial last panel.
    #[test]
    fn packing_wide_elements_follows_the_definition() {
        let (batch, n, k, nr) = (2usize, 21usize, 5usize, 4u32);
        let elems = batch * n * k;
        let src: Vec<u8> = (0..elems as u16).flat_map(|x| (x + 1).to_le_bytes()).collect();
        let at = |out: &[u8], i: usize| u16::from_le_bytes([out[2 * i], out[2 * i + 1]]);
        let value = |b: usize, row: usize, kk: usize| (b * n * k + row * k + kk) as u16 + 1;
        let panels = n.div_ceil(nr as usize);
        let out = Layout::Panels { nr, kn: false }.pack(&src, &[batch, n, k], 2);
        for b in 0..batch {
            for p in 0..panels {
                for kk in 0..k {
                    for j in 0..nr as usize {
                        let col = p * nr as usize + j;
                        let want = if col < n { value(b, col, kk) } else { 0 };
                        assert_eq!(at(&out, ((b * panels + p) * k + kk) * nr as usize + j), want);
                    }
                }
            }
        }
        // Gate/up: I = n rows of gate then n of up, half = 2 lanes each.
        let src2: Vec<u8> = (0..(2 * n * k) as u16).flat_map(|x| (x + 1).to_le_bytes()).collect();
        let gu = Layout::GateUpPanels { nr }.pack(&src2, &[2 * n, k], 2);
        let half = nr as usize / 2;
        for p in 0..n.div_ceil(half) {
            for kk in 0..k {
                for j in 0..nr as usize {
                    let c = p * half + j % half;
                    let row = if j < half { c } else { n + c };
                    let want = if c < n { (row * k + kk) as u16 + 1 } else { 0 };
                    assert_eq!(at(&gu, (p * k + kk) * nr as usize + j), want);
                }
            }
        }
    }

    #[test]
    fn gemm_tiles_are_column_panels_per_batch() {
        let a = ArgSpec { dtype: DType::F32, shape: vec![Dim::tokens(), Dim::c(8)], layout: Layout::RowMajor };
        let b = ArgSpec {
            dtype: DType::BF16,
            shape: vec![Dim::c(4), Dim::c(40), Dim::c(8)],
            layout: Layout::Panels { nr: 16, kn: false },
        };
        let out =
            ArgSpec { dtype: DType::F32, shape: vec![Dim::c(4), Dim::tokens(), Dim::c(40)], layout: Layout::RowMajor };
        let e = tile_extent(&KernelKind::Gemm { epilogue: Epilogue::None }, &[a, b, out]).unwrap();
        assert_eq!(e, Extent::constant(4 * 3));
    }
}
