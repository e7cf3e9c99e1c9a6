//! Kernel selection: flat graph nodes -> launches over buffers.

use super::flatten::{Def, FlatGraph};
use super::ScheduleOptions;
use anyhow::{anyhow, bail, Context, Result};
use panguc_ir::graph::Function;
use panguc_ir::kernel::{
    tile_extent, ArgSpec, Buffer, BufferId, BufferKind, ElemOp, Epilogue, Extent, Kernel, KernelKind, KernelProgram,
    Launch, Layout, PreparedWeight, WeightExpr, KERNEL_PROGRAM_VERSION,
};
use panguc_ir::op::CollectiveKind;
use panguc_ir::shape::{SYM_MAX_BLOCKS, SYM_NUM_BLOCKS, SYM_PAST, SYM_SEQS, SYM_TOKENS};
use panguc_ir::{DType, Dim, Op, TensorType};
use std::collections::BTreeMap;

mod quant_fuse;
mod static_moe;

/// Entry inputs before the KV caches of a one-sequence program: `ids`, `positions`.
const LEADING_INPUTS: usize = 2;
/// Entry inputs before the KV caches of a ragged-batch program: `ids` and
/// the step metadata in `panguc_ir::batch::declare_step_inputs` order.
const BATCHED_INPUTS: [&str; 6] =
    ["ids", "positions", "query_start_loc", "context_lens", "block_table", "slot_mapping"];

/// True when the entry function takes a ragged batch step over paged KV
/// caches (the batched import) rather than one sequence's contiguous caches.
pub fn is_batched(g: &FlatGraph) -> bool {
    g.inputs.len() >= BATCHED_INPUTS.len()
        && g.inputs.iter().zip(BATCHED_INPUTS).all(|(v, name)| g.values[*v].name == name)
}

pub struct Selector<'a> {
    g: &'a FlatGraph,
    nr: u32,
    /// (rank, devices) for a rank program (see `ScheduleOptions::ranks`).
    ranks: Option<(usize, usize)>,
    /// Computed from weights and constants only.
    konst: Vec<bool>,
    /// Storage dtype of every value.
    storage: Vec<DType>,
    buf: Vec<Option<BufferId>>,
    weights: BTreeMap<(usize, Layout), BufferId>,
    kernel_index: BTreeMap<String, usize>,
    /// Values that are KV cache `c` with the new rows appended (results of
    /// `concat(cache, new)` or of `qkv_rope`), or, in a batched program,
    /// written at their slots (`kv_cache_write`, `qkv_rope_cache_write`).
    kv_out: BTreeMap<usize, usize>,
    /// The entry takes a ragged batch step over paged caches ([`is_batched`]).
    batched: bool,
    /// Results of int8 KV ops computed inside their one consumer's kernel
    /// ([`Selector::fuse_int8_kv`]): no launch of their own.
    absorbed: Vec<bool>,
    /// Results a fused launch at an earlier node writes (its buffers are
    /// set there): their own nodes launch nothing.
    computed: Vec<bool>,
    /// Norm node -> the `dynamic_quant` of its normalized row, computed by
    /// the norm's kernel ([`Selector::fuse_norm_quant`]).
    norm_quant: BTreeMap<usize, usize>,
    /// `moe_finalize_routing` node -> its fused W8A8_DYNAMIC routed experts
    /// ([`Selector::fuse_quant_mlps`]).
    quant_moe: BTreeMap<usize, quant_fuse::QuantMoe>,
    /// `dynamic_quant` node -> the fused shared-expert gate/up before it.
    quant_gate_up: BTreeMap<usize, quant_fuse::QuantGateUp>,
    /// `split` node -> the rope and cache writes of its merged int8 q/k/v.
    qkv_rope_write: BTreeMap<usize, quant_fuse::QkvRopeWrite>,
    /// Launching node -> an int8 matmul quantizing its own input.
    dyn_quant_mm: BTreeMap<usize, quant_fuse::DynQuantMm>,
    /// Static `quant_matmul` node -> its fused input `quantize`.
    static_quant_mm: BTreeMap<usize, quant_fuse::StaticQuantMm>,
    /// `reduce_sum` over the experts -> the routed static W8A8 experts
    /// computed densely before it.
    static_moe: BTreeMap<usize, static_moe::StaticMoe>,
    /// `swiglu` node -> the static gate and up matmuls before it (input,
    /// then scale, offset, weight, quant bias, deq scale of each).
    static_gate_up: BTreeMap<usize, [usize; 11]>,
    p: KernelProgram,
}

/// True when every value of dtype `from` is exactly representable in `to`.
fn widens_exactly(from: DType, to: DType) -> bool {
    from == to || (to == DType::F32 && matches!(from, DType::BF16 | DType::F16))
}

/// Storage dtype of a node result (see the module docs of `kernel`): the
/// interpreter holds floats in f32 and integers in i64, so only casts and
/// pure data movement may keep a narrower float type.
///
/// Int8 data (quantized activations, int8 weights, the int8 KV cache) and
/// int32 quant biases keep their own width, so the int8 path moves a
/// quarter of the bytes of f32: quantize ops produce them, and data
/// movement of such values keeps them.
fn result_storage(op: &Op, args: &[DType], ty: DType) -> DType {
    if !ty.is_float() {
        let narrow_int = matches!(ty, DType::I8 | DType::I32);
        let keeps = match op {
            Op::Quantize | Op::DynamicQuant => true,
            Op::KvCacheWrite => args.first() == Some(&ty),
            Op::Reshape { .. }
            | Op::Slice { .. }
            | Op::Split { .. }
            | Op::Transpose { .. }
            | Op::Concat { .. }
            | Op::Stack { .. }
            | Op::RepeatInterleave { .. } => args.iter().all(|a| *a == ty),
            _ => false,
        };
        return if narrow_int && keeps { ty } else { DType::I64 };
    }
    let same = |xs: &[DType]| xs.first().copied().filter(|d| d.is_float() && xs.iter().all(|x| x == d));
    match op {
        Op::Cast { dtype } => match args.first() {
            Some(a) if a.is_float() && widens_exactly(*a, *dtype) => *a,
            _ => *dtype,
        },
        Op::Gather => same(&args[..1]).unwrap_or(DType::F32),
        Op::Reshape { .. }
        | Op::Slice { .. }
        | Op::Split { .. }
        | Op::Transpose { .. }
        | Op::Concat { .. }
        | Op::Stack { .. }
        | Op::RepeatInterleave { .. }
        | Op::Collective { .. } => same(args).unwrap_or(DType::F32),
        _ => DType::F32,
    }
}

fn static_shape(ty: &TensorType, what: &str) -> Result<Vec<usize>> {
    ty.static_shape().ok_or_else(|| anyhow!("{what} has symbolic shape {ty}; weights must be static"))
}

/// `layers.NNN` when every tensor comes from one decoder layer.
fn weight_group(tensors: &[&str]) -> String {
    let layer = |t: &str| -> Option<usize> { t.strip_prefix("model.layers.")?.split('.').next()?.parse().ok() };
    let layers: Vec<Option<usize>> = tensors.iter().map(|t| layer(t)).collect();
    match layers.first() {
        Some(Some(l)) if layers.iter().all(|x| *x == Some(*l)) => format!("layers.{l:03}"),
        _ => "model".to_string(),
    }
}

impl<'a> Selector<'a> {
    pub fn new(g: &'a FlatGraph, opts: &ScheduleOptions) -> Self {
        let n = g.values.len();
        let mut konst = vec![false; n];
        let mut storage = vec![DType::F32; n];
        for (i, v) in g.values.iter().enumerate() {
            match &v.def {
                Def::Weight(_) => {
                    konst[i] = true;
                    storage[i] = match v.ty.dtype {
                        d if d.is_float() => d,
                        // int8 weights and int32 quant biases as stored.
                        d @ (DType::I8 | DType::I32) => d,
                        _ => DType::I64,
                    };
                }
                Def::Input(_) => {
                    storage[i] = match v.ty.dtype {
                        d if d.is_float() => DType::F32,
                        // The int8 (C8) KV cache.
                        DType::I8 => DType::I8,
                        _ => DType::I64,
                    }
                }
                Def::Node(ni) => {
                    let node = &g.nodes[*ni];
                    // A collective between ranks is never a constant.
                    let comm = opts.ranks.is_some() && matches!(node.op, Op::Collective { .. });
                    konst[i] = !comm && node.args.iter().all(|a| konst[*a]);
                    let args: Vec<DType> = node.args.iter().map(|a| storage[*a]).collect();
                    storage[i] = result_storage(&node.op, &args, v.ty.dtype);
                }
            }
        }
        let batched = is_batched(g);
        let symbols: &[&str] =
            if batched { &[SYM_TOKENS, SYM_SEQS, SYM_MAX_BLOCKS, SYM_NUM_BLOCKS] } else { &[SYM_TOKENS, SYM_PAST] };
        let p = KernelProgram {
            version: KERNEL_PROGRAM_VERSION,
            name: String::new(),
            symbols: symbols.iter().map(|s| s.to_string()).collect(),
            buffers: vec![],
            weights: vec![],
            kernels: vec![],
            launches: vec![],
            inputs: vec![],
            outputs: vec![],
            caches: vec![],
            slots: 0,
        };
        Selector {
            g,
            nr: opts.panel_width,
            ranks: opts.ranks,
            konst,
            storage,
            buf: vec![None; n],
            weights: BTreeMap::new(),
            kernel_index: BTreeMap::new(),
            kv_out: BTreeMap::new(),
            batched,
            absorbed: vec![false; n],
            computed: vec![false; n],
            norm_quant: BTreeMap::new(),
            quant_moe: BTreeMap::new(),
            quant_gate_up: BTreeMap::new(),
            qkv_rope_write: BTreeMap::new(),
            dyn_quant_mm: BTreeMap::new(),
            static_quant_mm: BTreeMap::new(),
            static_moe: BTreeMap::new(),
            static_gate_up: BTreeMap::new(),
            p,
        }
    }

    pub fn run(mut self) -> Result<KernelProgram> {
        let g = self.g;
        self.p.name = "main".into();
        self.bind_inputs()?;
        let live = self.live_nodes();
        self.fuse_int8_kv(&live);
        self.fuse_quant_mlps(&live);
        self.fuse_norm_quant(&live);
        self.fuse_quant_bias(&live);
        for (ni, node) in g.nodes.iter().enumerate() {
            if !live[ni] || node.results.iter().all(|r| self.konst[*r] || self.absorbed[*r] || self.computed[*r]) {
                continue;
            }
            let label = || format!("scheduling %{} = {}", g.values[node.results[0]].name, node.op.mnemonic());
            self.node(ni).with_context(label)?;
        }
        let logits = *g.outputs.first().ok_or_else(|| anyhow!("the entry function has no outputs"))?;
        let out = self.operand(logits, Layout::RowMajor)?;
        self.p.outputs = vec![out];
        for (c, &o) in g.outputs[1..].iter().enumerate() {
            if self.buf[o] != Some(self.p.caches[c]) {
                bail!("entry output %{} is not KV cache {c} with the new rows appended", g.values[o].name);
            }
        }
        Ok(self.p)
    }

    /// The int8 (C8) KV cache without float copies: a `quantize` whose only
    /// use is the new rows of a `kv_cache_write` is done by the write
    /// kernel (`KvCacheWriteQuant`), and the two `dequantize`s of the
    /// caches read only by a `paged_attention` are done by the attention
    /// kernel as it reads each element (`PagedAttentionInt8`). Only
    /// per-channel scales and offsets (`[Hkv, D]`) qualify; anything else
    /// keeps its own kernels.
    fn fuse_int8_kv(&mut self, live: &[bool]) {
        let g = self.g;
        let uses = self.use_counts(live);
        // `v = op(x, scale, offset)` used once, with scale and offset of the
        // shape `per_channel`, and `x` stored as `x_dtype`.
        let qualifies = |v: usize, op: &Op, x_dtype: DType, per_channel: &[Dim]| -> bool {
            let Def::Node(ni) = g.values[v].def else { return false };
            let n = &g.nodes[ni];
            n.op == *op
                && uses[v] == 1
                && self.storage[n.args[0]] == x_dtype
                && n.args[1..].iter().all(|a| g.values[*a].ty.shape == per_channel)
        };
        for (ni, n) in g.nodes.iter().enumerate() {
            if !live[ni] {
                continue;
            }
            match n.op {
                Op::PagedAttention { .. } => {
                    let (k, v) = (n.args[1], n.args[2]);
                    let cache_of = |x: usize| match g.values[x].def {
                        Def::Node(d) => Some(g.nodes[d].args[0]),
                        _ => None,
                    };
                    let (Some(kc), Some(vc)) = (cache_of(k), cache_of(v)) else { continue };
                    let per_channel = g.values[kc].ty.shape.get(2..).unwrap_or(&[]).to_vec();
                    if per_channel.len() == 2
                        && qualifies(k, &Op::Dequantize, DType::I8, &per_channel)
                        && qualifies(v, &Op::Dequantize, DType::I8, &per_channel)
                        && g.values[vc].ty.shape == g.values[kc].ty.shape
                    {
                        self.absorbed[k] = true;
                        self.absorbed[v] = true;
                    }
                }
                Op::KvCacheWrite => {
                    let new = n.args[1];
                    let per_channel = g.values[new].ty.shape.get(1..).unwrap_or(&[]).to_vec();
                    if self.storage[n.args[0]] == DType::I8 && qualifies(new, &Op::Quantize, DType::F32, &per_channel) {
                        self.absorbed[new] = true;
                    }
                }
                _ => {}
            }
        }
    }

    /// W8A8_DYNAMIC activations straight out of the norm: a live
    /// `dynamic_quant` of an `rms_norm` (or of `add_rms_norm`'s normalized
    /// result) is computed by the norm's kernel (`RmsNormQuant`), which
    /// still writes the float row for its other readers (the router).
    fn fuse_norm_quant(&mut self, live: &[bool]) {
        let g = self.g;
        for (ni, n) in g.nodes.iter().enumerate() {
            if !live[ni] || n.op != Op::DynamicQuant || n.results.iter().any(|r| self.absorbed[*r]) {
                continue;
            }
            let Def::Node(norm) = g.values[n.args[0]].def else { continue };
            let normalized = match g.nodes[norm].op {
                Op::RmsNorm { .. } => g.nodes[norm].results[0],
                Op::AddRmsNorm { .. } => g.nodes[norm].results[1],
                _ => continue,
            };
            if normalized != n.args[0] || self.norm_quant.contains_key(&norm) || self.storage[normalized] != DType::F32
            {
                continue;
            }
            self.norm_quant.insert(norm, ni);
            n.results.iter().for_each(|r| self.absorbed[*r] = true);
        }
    }

    /// A linear's bias add in the int8 matmul's epilogue: `add(y, bias)`
    /// where `y` is a `quant_matmul[_per_token]` read only there and `bias`
    /// a constant `[N]` vector (same result type as `y`).
    fn fuse_quant_bias(&mut self, live: &[bool]) {
        let g = self.g;
        let uses = self.use_counts(live);
        for (ni, n) in g.nodes.iter().enumerate() {
            if live[ni] && self.is_quant_bias_add(ni, &uses) {
                self.absorbed[n.args[0]] = true;
            }
        }
    }

    /// Node `ni` is `add(y, bias)` with `y` an int8 matmul read only there
    /// and `bias` a constant float vector over its columns.
    fn is_quant_bias_add(&self, ni: usize, uses: &[usize]) -> bool {
        let g = self.g;
        let n = &g.nodes[ni];
        if n.op != Op::Binary(panguc_ir::op::BinaryOp::Add) {
            return false;
        }
        let (y, bias) = (n.args[0], n.args[1]);
        let Def::Node(mm) = g.values[y].def else { return false };
        // A static matmul quantizing its own input has no bias epilogue.
        let is_qmm = matches!(g.nodes[mm].op, Op::QuantMatMul | Op::QuantMatMulPerToken)
            && !self.static_quant_mm.contains_key(&mm);
        is_qmm
            && uses[y] == 1
            && !self.konst[y]
            && self.is_column_bias(y, bias)
            && g.values[n.results[0]].ty == g.values[y].ty
    }

    /// `bias` is a constant float vector over the columns of `y`.
    fn is_column_bias(&self, y: usize, bias: usize) -> bool {
        let ty = &self.g.values[bias].ty;
        self.konst[bias]
            && self.storage[bias].is_float()
            && ty.shape.len() == 1
            && ty.shape.last() == self.g.values[y].ty.shape.last()
    }

    /// How many live nodes (and entry outputs) read each value.
    fn use_counts(&self, live: &[bool]) -> Vec<usize> {
        let g = self.g;
        let mut uses = vec![0usize; g.values.len()];
        for (ni, n) in g.nodes.iter().enumerate() {
            if live[ni] {
                n.args.iter().for_each(|a| uses[*a] += 1);
            }
        }
        g.outputs.iter().for_each(|o| uses[*o] += 1);
        uses
    }

    /// A norm (`add`: `add_rms_norm`) and its fused `dynamic_quant` node `dq`.
    fn norm_with_quant(&mut self, ni: usize, dq: usize, eps: f64, add: bool) -> Result<()> {
        let g = self.g;
        let n = &g.nodes[ni];
        let mut args = n.args.iter().map(|a| self.rm(*a)).collect::<Result<Vec<_>>>()?;
        args.extend(n.results.iter().map(|r| self.act(*r)));
        args.extend(g.nodes[dq].results.iter().map(|r| self.act(*r)));
        self.launch(KernelKind::RmsNormQuant { eps, add }, args)
    }

    /// The node defining `v` (a node result).
    fn def_node(&self, v: usize) -> Result<&'a super::flatten::FlatNode> {
        match self.g.values[v].def {
            Def::Node(ni) => Ok(&self.g.nodes[ni]),
            _ => bail!("%{} is not a node result", self.g.values[v].name),
        }
    }

    /// Nodes some output depends on.
    fn live_nodes(&self) -> Vec<bool> {
        let g = self.g;
        let mut need = vec![false; g.values.len()];
        let mut live = vec![false; g.nodes.len()];
        for o in &g.outputs {
            need[*o] = true;
        }
        for (ni, n) in g.nodes.iter().enumerate().rev() {
            if n.results.iter().any(|r| need[*r]) {
                live[ni] = true;
                for a in &n.args {
                    need[*a] = true;
                }
            }
        }
        live
    }

    /// `ids`, `positions` (and a batched step's metadata) become
    /// runtime-filled inputs; each cache input `c` must be extended by
    /// exactly `concat(cache, new)` (or a `qkv_rope`) into entry output
    /// `1 + c`, which becomes an in-place append to a runtime-owned cache.
    /// In a batched program the cache is paged and `kv_cache_write` (or
    /// `qkv_rope_cache_write`) stores the new rows at their slots in place.
    fn bind_inputs(&mut self) -> Result<()> {
        let g = self.g;
        if g.inputs.len() < LEADING_INPUTS {
            bail!("the entry function must take `ids` and `positions` first");
        }
        let leading = if self.batched { BATCHED_INPUTS.len() } else { LEADING_INPUTS };
        let caches = g.inputs.len() - leading;
        if g.outputs.len() != caches + 1 {
            bail!(
                "the entry function takes {caches} KV caches but returns {} values (expected logits + caches)",
                g.outputs.len()
            );
        }
        for (i, &v) in g.inputs[..leading].iter().enumerate() {
            let b = self.new_buffer(
                &g.values[v].name,
                self.storage[v],
                g.values[v].ty.shape.clone(),
                BufferKind::Input { index: i },
            );
            self.buf[v] = Some(b);
            self.p.inputs.push(b);
        }
        for c in 0..caches {
            let input = g.inputs[leading + c];
            let out = g.outputs[1 + c];
            let node = match g.values[out].def {
                Def::Node(n) => n,
                _ => bail!("entry output %{} must be `concat(cache, new)` along axis 0", g.values[out].name),
            };
            let n = &g.nodes[node];
            let result = n.results.iter().position(|r| *r == out).expect("defining node");
            let appends = match n.op {
                Op::Concat { axis: 0 } if !self.batched => n.args.first() == Some(&input),
                Op::QkvRope { .. } if !self.batched => result > 0 && n.args.get(4 + result) == Some(&input),
                Op::KvCacheWrite if self.batched => n.args.first() == Some(&input),
                Op::QkvRopeCacheWrite { .. } if self.batched => result > 0 && n.args.get(4 + result) == Some(&input),
                _ => false,
            };
            if appends && self.batched && g.values[out].ty != g.values[input].ty {
                bail!(
                    "entry output %{} must have the type of its paged cache %{}",
                    g.values[out].name,
                    g.values[input].name
                );
            }
            if self.batched && !appends {
                bail!(
                    "entry output %{} must be `kv_cache_write(%{}, new, slot_mapping)` (the paged KV cache write), \
                     found {}",
                    g.values[out].name,
                    g.values[input].name,
                    n.op.mnemonic()
                );
            }
            if !appends {
                bail!(
                    "entry output %{} must be `concat(%{}, new)` along axis 0 (the KV cache append), found {}",
                    g.values[out].name,
                    g.values[input].name,
                    n.op.mnemonic()
                );
            }
            // f32, or int8 for a C8 (int8 KV) cache.
            let cache_dtype = if self.storage[input] == DType::I8 { DType::I8 } else { DType::F32 };
            let cache = self.new_buffer(
                &g.values[out].name,
                cache_dtype,
                g.values[out].ty.shape.clone(),
                BufferKind::KvCache { cache: c },
            );
            let old = self.new_buffer(
                &g.values[input].name,
                cache_dtype,
                g.values[input].ty.shape.clone(),
                BufferKind::View { base: cache, offset: Dim::c(0) },
            );
            self.buf[input] = Some(old);
            self.storage[input] = cache_dtype;
            self.kv_out.insert(out, c);
            self.p.caches.push(cache);
        }
        Ok(())
    }

    fn new_buffer(&mut self, name: &str, dtype: DType, shape: Vec<Dim>, kind: BufferKind) -> BufferId {
        let id = BufferId(self.p.buffers.len() as u32);
        self.p.buffers.push(Buffer { name: name.to_string(), dtype, shape, kind });
        id
    }

    /// A fresh activation buffer for value `v` (slot assigned later).
    fn act(&mut self, v: usize) -> BufferId {
        let val = &self.g.values[v];
        let b = self.new_buffer(&val.name, self.storage[v], val.ty.shape.clone(), BufferKind::Activation { slot: 0 });
        self.buf[v] = Some(b);
        b
    }

    fn scratch(&mut self, name: String, dtype: DType, shape: Vec<Dim>) -> BufferId {
        self.new_buffer(&name, dtype, shape, BufferKind::Activation { slot: 0 })
    }

    /// Value `v` as a view of `base` (same elements, v's shape).
    fn view(&mut self, v: usize, base: BufferId) -> BufferId {
        let val = &self.g.values[v];
        let dtype = self.p.buffers[base.index()].dtype;
        let b = self.new_buffer(&val.name, dtype, val.ty.shape.clone(), BufferKind::View { base, offset: Dim::c(0) });
        self.buf[v] = Some(b);
        b
    }

    /// The buffer holding operand `v`; constants become prepared weights.
    fn operand(&mut self, v: usize, layout: Layout) -> Result<BufferId> {
        if self.konst[v] {
            return self.weight(v, layout);
        }
        if layout != Layout::RowMajor {
            bail!("%{} must be a weight to be packed as {layout:?}", self.g.values[v].name);
        }
        self.buf[v].ok_or_else(|| anyhow!("%{} is used before it is computed", self.g.values[v].name))
    }

    fn weight(&mut self, v: usize, layout: Layout) -> Result<BufferId> {
        if let Some(b) = self.weights.get(&(v, layout)) {
            return Ok(*b);
        }
        let g = self.g;
        let val = &g.values[v];
        if layout == Layout::RowMajor {
            if let Def::Node(ni) = val.def {
                let n = &g.nodes[ni];
                let is_view = match n.op {
                    Op::Reshape { .. } => true,
                    Op::Cast { .. } => self.storage[v] == self.storage[n.args[0]],
                    _ => false,
                };
                if is_view {
                    let base = self.weight(n.args[0], Layout::RowMajor)?;
                    let b = self.new_buffer(
                        &val.name,
                        self.storage[v],
                        val.ty.shape.clone(),
                        BufferKind::View { base, offset: Dim::c(0) },
                    );
                    self.weights.insert((v, layout), b);
                    return Ok(b);
                }
            }
        }
        let shape = static_shape(&val.ty, &format!("weight %{}", val.name))?;
        if let Layout::Panels { .. } | Layout::GateUpPanels { .. } | Layout::DotPanels { .. } = layout {
            if shape.len() < 2 {
                bail!("weight %{} of rank {} cannot be packed for a matmul", val.name, shape.len());
            }
        }
        let (expr, tensors) = self.weight_expr(v)?;
        let refs: Vec<&str> = tensors.iter().map(String::as_str).collect();
        let index = self.p.weights.len();
        let name = format!("{}{}", val.name, layout.suffix());
        self.p.weights.push(PreparedWeight {
            name: name.clone(),
            expr,
            dtype: self.storage[v],
            shape,
            layout,
            group: weight_group(&refs),
        });
        let b = self.new_buffer(&name, self.storage[v], val.ty.shape.clone(), BufferKind::Weight { index });
        self.weights.insert((v, layout), b);
        Ok(b)
    }

    /// The weight-only subgraph computing `v`, and the tensors it reads.
    fn weight_expr(&self, v: usize) -> Result<(WeightExpr, Vec<String>)> {
        let g = self.g;
        if let Def::Weight(t) = &g.values[v].def {
            return Ok((WeightExpr::Tensor { name: t.clone() }, vec![t.clone()]));
        }
        let mut nodes = vec![];
        let mut leaves = vec![];
        let mut seen = vec![false; g.values.len()];
        let mut stack = vec![v];
        while let Some(x) = stack.pop() {
            if std::mem::replace(&mut seen[x], true) {
                continue;
            }
            match &g.values[x].def {
                Def::Weight(_) => leaves.push(x),
                Def::Node(ni) => {
                    nodes.push(*ni);
                    stack.extend(g.nodes[*ni].args.iter().copied());
                }
                Def::Input(_) => bail!("constant %{} depends on an input", g.values[v].name),
            }
        }
        nodes.sort_unstable();
        nodes.dedup();
        leaves.sort_unstable();
        let mut f = Function::new("prepare");
        let mut map: BTreeMap<usize, panguc_ir::ValueId> = BTreeMap::new();
        let mut tensors = vec![];
        for &l in &leaves {
            let Def::Weight(t) = &g.values[l].def else { unreachable!("leaves are weights") };
            map.insert(l, f.add_weight(&g.values[l].name, t, g.values[l].ty.clone()));
            tensors.push(t.clone());
        }
        for ni in nodes {
            let n = &g.nodes[ni];
            let args: Vec<panguc_ir::ValueId> = n.args.iter().map(|a| map[a]).collect();
            let results: Vec<(&str, TensorType)> =
                n.results.iter().map(|r| (g.values[*r].name.as_str(), g.values[*r].ty.clone())).collect();
            let ids = f.push_node_typed(n.op.clone(), &args, &results);
            for (r, id) in n.results.iter().zip(ids) {
                map.insert(*r, id);
            }
        }
        f.outputs = vec![map[&v]];
        Ok((WeightExpr::Graph { function: f }, tensors))
    }

    fn launch(&mut self, kind: KernelKind, args: Vec<BufferId>) -> Result<()> {
        let specs: Vec<ArgSpec> = args
            .iter()
            .map(|b| {
                let buf = &self.p.buffers[b.index()];
                let layout = match buf.kind {
                    BufferKind::Weight { index } => self.p.weights[index].layout,
                    _ => Layout::RowMajor,
                };
                ArgSpec { dtype: buf.dtype, shape: buf.shape.clone(), layout }
            })
            .collect();
        let key = serde_json::to_string(&(&kind, &specs))?;
        let kernel = match self.kernel_index.get(&key) {
            Some(k) => *k,
            None => {
                let tiles = tile_extent(&kind, &specs).map_err(|e| anyhow!("{}: {e}", kind.mnemonic()))?;
                let thread_scratch = thread_scratch(&kind, &specs);
                let name = format!("panguc_k{:03}_{}", self.p.kernels.len(), kind.mnemonic());
                self.p.kernels.push(Kernel { name, kind, args: specs, tiles, thread_scratch });
                self.kernel_index.insert(key, self.p.kernels.len() - 1);
                self.p.kernels.len() - 1
            }
        };
        self.p.launches.push(Launch { kernel, args });
        Ok(())
    }

    fn rm(&mut self, v: usize) -> Result<BufferId> {
        self.operand(v, Layout::RowMajor)
    }

    fn node(&mut self, ni: usize) -> Result<()> {
        let g = self.g;
        let n = &g.nodes[ni];
        let r0 = n.results[0];
        let arg = |i: usize| n.args[i];
        match &n.op {
            Op::Collective { kind, group, axis } if self.ranks.is_some() => {
                let (rank, devices) = self.ranks.expect("checked");
                if !group.contains(&rank) || group.iter().any(|g| *g >= devices) {
                    bail!("collective group {group:?} does not fit rank {rank} of {devices}");
                }
                let input = self.rm(arg(0))?;
                if self.p.buffers[input.index()].dtype != DType::F32 {
                    bail!("collectives run on f32 buffers, %{} is {}", g.values[arg(0)].name, self.storage[arg(0)]);
                }
                self.storage[r0] = DType::F32;
                let out = self.act(r0);
                self.launch(
                    KernelKind::Collective { kind: *kind, group: group.clone(), axis: *axis },
                    vec![input, out],
                )?;
            }
            Op::Reshape { .. } | Op::Collective { kind: CollectiveKind::AllReduce | CollectiveKind::AllToAll, .. } => {
                // One device: these collectives are the identity.
                let base = self.rm(arg(0))?;
                self.view(r0, base);
            }
            Op::Collective { .. } => {
                bail!("{} needs a multi-rank executor; the CPU target runs on one device", n.op.mnemonic())
            }
            Op::Cast { .. } if self.storage[r0] == self.storage[arg(0)] => {
                let base = self.rm(arg(0))?;
                self.view(r0, base);
            }
            Op::Cast { .. } => self.elementwise(ni, ElemOp::Convert)?,
            Op::Unary(u) => self.elementwise(ni, ElemOp::Unary(*u))?,
            Op::FusedElementwise { .. } if self.static_moe.contains_key(&ni) => self.static_moe(ni)?,
            Op::Binary(_) | Op::QuantMatMulPerToken | Op::FusedElementwise { .. }
                if self.dyn_quant_mm.contains_key(&ni) =>
            {
                self.dyn_quant_mm(ni)?
            }
            Op::Split { .. } if self.qkv_rope_write.contains_key(&ni) => self.qkv_rope_write(ni)?,
            Op::Binary(_)
                if self.absorbed[arg(0)]
                    && self
                        .def_node(arg(0))
                        .is_ok_and(|m| matches!(m.op, Op::QuantMatMul | Op::QuantMatMulPerToken)) =>
            {
                // `quant_matmul + bias` ([`Selector::fuse_quant_bias`]).
                let mm = self.def_node(arg(0))?;
                let per_token = mm.op == Op::QuantMatMulPerToken;
                let mut args = self.quant_matmul_operands(&mm.args)?;
                args.push(self.rm(arg(1))?);
                args.push(self.act(r0));
                self.launch(KernelKind::QuantMatMul { per_token, bias: true }, args)?;
            }
            Op::Binary(b) => self.elementwise(ni, ElemOp::Binary(*b))?,
            Op::SwiGlu if self.static_gate_up.contains_key(&ni) => self.static_gate_up(ni)?,
            Op::SwiGlu => self.elementwise(ni, ElemOp::SwiGlu)?,
            Op::Gather => self.simple(ni, KernelKind::Gather)?,
            Op::MatMul { transpose_b } => self.matmul(ni, *transpose_b, None)?,
            Op::MatMulBias { transpose_b } => self.matmul(ni, *transpose_b, Some(arg(2)))?,
            Op::GateUpSwiGlu => self.gate_up(ni)?,
            Op::Reduce { .. } if self.static_moe.contains_key(&ni) => self.static_moe(ni)?,
            Op::Reduce { op, axis, .. } => self.simple(ni, KernelKind::Reduce { op: *op, axis: *axis })?,
            Op::ArgMax { axis, .. } => self.simple(ni, KernelKind::ArgMax { axis: *axis })?,
            Op::Softmax { axis } => self.simple(ni, KernelKind::Softmax { axis: *axis })?,
            Op::Transpose { perm } => self.simple(ni, KernelKind::Transpose { perm: perm.clone() })?,
            Op::Slice { axis, start, .. } => self.simple(ni, KernelKind::Slice { axis: *axis, start: *start })?,
            Op::Split { axis, sizes } => {
                let input = self.rm(arg(0))?;
                let mut start = 0;
                for (r, size) in n.results.iter().zip(sizes) {
                    let out = self.act(*r);
                    self.launch(KernelKind::Slice { axis: *axis, start }, vec![input, out])?;
                    start += size;
                }
            }
            Op::Concat { axis } => self.concat(ni, *axis)?,
            Op::Stack { axis } => {
                let out = self.act(r0);
                for (i, a) in n.args.iter().enumerate() {
                    let base = self.rm(*a)?;
                    let mut shape = g.values[*a].ty.shape.clone();
                    shape.insert(*axis, Dim::c(1));
                    let dtype = self.p.buffers[base.index()].dtype;
                    let name = format!("{}.part{i}", g.values[r0].name);
                    let part = self.new_buffer(&name, dtype, shape, BufferKind::View { base, offset: Dim::c(0) });
                    self.launch(KernelKind::CopyInto { axis: *axis, offset: Dim::c(i) }, vec![part, out])?;
                }
            }
            Op::RepeatInterleave { axis, repeats } => {
                self.simple(ni, KernelKind::RepeatInterleave { axis: *axis, repeats: *repeats })?
            }
            Op::RopeTable { kind, theta, head_dim } => {
                self.simple(ni, KernelKind::RopeTable { kind: *kind, theta: *theta, head_dim: *head_dim })?
            }
            Op::CausalMask => {
                // The keys operand only contributes its length (out's shape).
                let pos = self.rm(arg(0))?;
                let out = self.act(r0);
                self.launch(KernelKind::CausalMask, vec![pos, out])?;
            }
            Op::OneHot { depth } => self.simple(ni, KernelKind::OneHot { depth: *depth })?,
            Op::RmsNorm { eps } | Op::AddRmsNorm { eps } if self.norm_quant.contains_key(&ni) => {
                let add = matches!(n.op, Op::AddRmsNorm { .. });
                self.norm_with_quant(ni, self.norm_quant[&ni], *eps, add)?
            }
            Op::RmsNorm { eps } => self.simple(ni, KernelKind::RmsNorm { eps: *eps })?,
            Op::AddRmsNorm { eps } => self.simple(ni, KernelKind::AddRmsNorm { eps: *eps })?,
            Op::Rope => self.simple(ni, KernelKind::Rope)?,
            Op::FlashAttention { scale } => self.simple(ni, KernelKind::Attention { scale: *scale })?,
            Op::MoeGatingGroupTopK { groups } => self.simple(ni, KernelKind::MoeGating { groups: *groups })?,
            Op::GroupedMatmulMoe => {
                let (ys, slot_row) = self.routed_experts(ni, RowFetch::Indexed)?;
                let out = self.act(r0);
                self.launch(KernelKind::MoeCombine { shared_residual: false }, vec![ys, slot_row, out])?;
            }
            Op::MoeFfn => self.moe_ffn(ni, RowFetch::Indexed)?,
            Op::MoeGroupedFfn => self.moe_ffn(ni, RowFetch::Gathered)?,
            Op::QkvRope { q_heads, kv_heads } => self.qkv_rope(ni, *q_heads, *kv_heads)?,
            Op::MoeRouterTopK { groups } => {
                let (x, w, scale) = (self.rm(arg(0))?, self.weight_or_act(arg(1))?, self.rm(arg(2))?);
                let name = format!("{}.router_logits", g.values[r0].name);
                let e = g.values[arg(1)].ty.shape[0].clone();
                let t = g.values[arg(0)].ty.shape[0].clone();
                let logits = self.scratch(name, DType::F32, vec![t, e]);
                self.matmul_into(x, w, None, logits)?;
                let (wo, io) = (self.act(n.results[0]), self.act(n.results[1]));
                self.launch(KernelKind::MoeGating { groups: *groups }, vec![logits, scale, wo, io])?;
            }
            Op::FusedElementwise { expr } => {
                let tokens = panguc_ir::op::parse_elementwise(expr, n.args.len()).map_err(|e| anyhow!(e))?;
                self.elementwise(ni, ElemOp::Expr { tokens: tokens.into_iter().map(Into::into).collect() })?
            }
            Op::Scalar { .. } | Op::Iota { .. } => unreachable!("constants are prepared weights"),
            Op::Call { .. } => bail!("calls are inlined before scheduling"),
            Op::KvCacheWrite if self.absorbed[arg(1)] => {
                let cache = self.paged_cache_result(r0)?;
                let q = self.def_node(arg(1))?;
                let (x, scale, offset) = (self.rm(q.args[0])?, self.rm(q.args[1])?, self.rm(q.args[2])?);
                let slots = self.rm(arg(2))?;
                self.launch(KernelKind::KvCacheWriteQuant, vec![x, slots, scale, offset, cache])?;
            }
            Op::KvCacheWrite => {
                let cache = self.paged_cache_result(r0)?;
                let (new, slots) = (self.rm(arg(1))?, self.rm(arg(2))?);
                self.launch(KernelKind::KvCacheWrite, vec![new, slots, cache])?;
            }
            Op::QkvRopeCacheWrite { q_heads, kv_heads } => self.qkv_rope_cache_write(ni, *q_heads, *kv_heads)?,
            Op::PagedAttention { scale } if self.absorbed[arg(1)] => {
                let (dk, dv) = (self.def_node(arg(1))?, self.def_node(arg(2))?);
                let mut args = vec![self.rm(arg(0))?, self.rm(dk.args[0])?, self.rm(dv.args[0])?];
                for i in 3..6 {
                    args.push(self.rm(arg(i))?);
                }
                for a in [dk.args[1], dk.args[2], dv.args[1], dv.args[2]] {
                    args.push(self.rm(a)?);
                }
                args.push(self.act(r0));
                self.launch(KernelKind::PagedAttentionInt8 { scale: *scale }, args)?;
            }
            Op::PagedAttention { scale } => self.simple(ni, KernelKind::PagedAttention { scale: *scale })?,
            Op::MoeFinalizeRouting if self.quant_moe.contains_key(&ni) => self.quant_moe(ni)?,
            Op::MoeInitRouting { .. } | Op::GroupedMatmul | Op::MoeFinalizeRouting => {
                bail!("`{}` (a batched MoE op) has no CPU kernel yet; only the interpreter runs it", n.op.mnemonic())
            }
            Op::Quantize => self.simple(ni, KernelKind::Quantize)?,
            Op::Dequantize => self.simple(ni, KernelKind::Dequantize)?,
            Op::DynamicQuant if self.quant_gate_up.contains_key(&ni) => self.quant_gate_up(ni)?,
            Op::DynamicQuant => self.simple(ni, KernelKind::DynamicQuant)?,
            Op::QuantMatMul if self.static_quant_mm.contains_key(&ni) => self.static_quant_mm(ni)?,
            Op::QuantMatMul | Op::QuantMatMulPerToken => {
                let mut args = self.quant_matmul_operands(&n.args)?;
                args.push(self.act(r0));
                let per_token = n.op == Op::QuantMatMulPerToken;
                self.launch(KernelKind::QuantMatMul { per_token, bias: false }, args)?;
            }
            Op::GroupedQuantMatMul => {
                bail!("`{}` (an int8 quantization op) has no kernel yet; only the interpreter runs it", n.op.mnemonic())
            }
        }
        Ok(())
    }

    /// The operands of an int8 matmul: a weight right-hand side packed in
    /// dot-product panels (16 columns x 4 k per 64-byte load), the rest
    /// row-major.
    fn quant_matmul_operands(&mut self, operands: &[usize]) -> Result<Vec<BufferId>> {
        let mut args = vec![];
        for (i, a) in operands.iter().enumerate() {
            args.push(if i == 1 && self.konst[*a] { self.int8_weight(*a)? } else { self.rm(*a)? });
        }
        Ok(args)
    }

    /// An int8 weight packed in dot-product panels (16 columns x 4 k per
    /// 64-byte load), as the CPU int8 matmul and expert kernels take it.
    fn int8_weight(&mut self, v: usize) -> Result<BufferId> {
        self.operand(v, Layout::DotPanels { nr: panguc_ir::kernel::QUANT_MATMUL_COLS as u32, kg: 4 })
    }

    /// Operands row-major, then one fresh buffer per result.
    fn simple(&mut self, ni: usize, kind: KernelKind) -> Result<()> {
        let n = &self.g.nodes[ni];
        let mut args = n.args.iter().map(|a| self.rm(*a)).collect::<Result<Vec<_>>>()?;
        args.extend(n.results.iter().map(|r| self.act(*r)));
        self.launch(kind, args)
    }

    fn elementwise(&mut self, ni: usize, op: ElemOp) -> Result<()> {
        self.simple(ni, KernelKind::Elementwise { op })
    }

    /// A matmul whose right operand is a weight runs as a packed GEMM; one
    /// between activations runs as the generic kernel.
    fn matmul(&mut self, ni: usize, transpose_b: bool, bias: Option<usize>) -> Result<()> {
        let n = &self.g.nodes[ni];
        let (a, b) = (n.args[0], n.args[1]);
        if self.konst[b] && self.g.values[b].ty.static_shape().is_some() {
            let mut args = vec![self.rm(a)?, self.weight(b, Layout::Panels { nr: self.nr, kn: !transpose_b })?];
            if let Some(bias) = bias {
                args.push(self.rm(bias)?);
            }
            args.push(self.act(n.results[0]));
            let epilogue = if bias.is_some() { Epilogue::Bias } else { Epilogue::None };
            return self.launch(KernelKind::Gemm { epilogue }, args);
        }
        self.simple(ni, KernelKind::MatMul { transpose_b, bias: bias.is_some() })
    }

    fn gate_up(&mut self, ni: usize) -> Result<()> {
        let g = self.g;
        let n = &g.nodes[ni];
        let (x, w) = (n.args[0], n.args[1]);
        if self.konst[w] {
            let args = vec![self.rm(x)?, self.weight(w, Layout::GateUpPanels { nr: self.nr })?, self.act(n.results[0])];
            return self.launch(KernelKind::Gemm { epilogue: Epilogue::SwiGlu }, args);
        }
        // An activation weight: plain matmul, then split and SwiGLU.
        let out_ty = &g.values[n.results[0]].ty;
        let name = &g.values[n.results[0]].name;
        let mut shape = out_ty.shape.clone();
        let i = shape.last().cloned().ok_or_else(|| anyhow!("gate_up_swiglu of a scalar"))?;
        *shape.last_mut().expect("rank >= 1") = i.scale(2);
        let (xb, wb) = (self.rm(x)?, self.rm(w)?);
        let gu = self.scratch(format!("{name}.gate_up"), DType::F32, shape);
        self.launch(KernelKind::MatMul { transpose_b: true, bias: false }, vec![xb, wb, gu])?;
        let half = out_ty.shape.clone();
        let axis = half.len() - 1;
        let ic = i.as_const().ok_or_else(|| anyhow!("gate_up width must be static"))?;
        let gate = self.scratch(format!("{name}.gate"), DType::F32, half.clone());
        let up = self.scratch(format!("{name}.up"), DType::F32, half);
        self.launch(KernelKind::Slice { axis, start: 0 }, vec![gu, gate])?;
        self.launch(KernelKind::Slice { axis, start: ic }, vec![gu, up])?;
        let out = self.act(n.results[0]);
        self.launch(KernelKind::Elementwise { op: ElemOp::SwiGlu }, vec![gate, up, out])
    }

    fn concat(&mut self, ni: usize, axis: usize) -> Result<()> {
        let g = self.g;
        let n = &g.nodes[ni];
        let (out, first) = match self.kv_out.get(&n.results[0]) {
            // The cache part is already in place: append the rest.
            Some(&c) => {
                let cache = self.p.caches[c];
                self.buf[n.results[0]] = Some(cache);
                (cache, 1)
            }
            None => (self.act(n.results[0]), 0),
        };
        let mut offset = Dim::c(0);
        for a in &n.args[..first] {
            offset = offset.add(&g.values[*a].ty.shape[axis]);
        }
        for a in &n.args[first..] {
            let input = self.rm(*a)?;
            self.launch(KernelKind::CopyInto { axis, offset: offset.clone() }, vec![input, out])?;
            offset = offset.add(&g.values[*a].ty.shape[axis]);
        }
        Ok(())
    }

    /// A matmul right operand: packed when it is a weight.
    fn weight_or_act(&mut self, v: usize) -> Result<BufferId> {
        if self.konst[v] {
            self.weight(v, Layout::Panels { nr: self.nr, kn: false })
        } else {
            self.rm(v)
        }
    }

    /// `out = a @ b^T (+ bias)` for an already-chosen `b` buffer.
    fn matmul_into(&mut self, a: BufferId, b: BufferId, bias: Option<BufferId>, out: BufferId) -> Result<()> {
        // `weight_or_act` packs weights, so a weight buffer here is packed.
        let packed = matches!(self.p.buffers[b.index()].kind, BufferKind::Weight { .. });
        let mut args = vec![a, b];
        args.extend(bias);
        args.push(out);
        if packed {
            let epilogue = if bias.is_some() { Epilogue::Bias } else { Epilogue::None };
            self.launch(KernelKind::Gemm { epilogue }, args)
        } else {
            self.launch(KernelKind::MatMul { transpose_b: true, bias: bias.is_some() }, args)
        }
    }

    /// Routed experts of a grouped-matmul MoE: dispatch (sort slots by
    /// expert), gate/up GEMM with SwiGLU, down GEMM scaled by the routing
    /// weight. Returns the per-slot outputs and the slot -> row map.
    fn routed_experts(&mut self, ni: usize, fetch: RowFetch) -> Result<(BufferId, BufferId)> {
        let g = self.g;
        let n = &g.nodes[ni];
        let (x, w, ids, gu, down) = (n.args[0], n.args[1], n.args[2], n.args[3], n.args[4]);
        if !self.konst[gu] || !self.konst[down] {
            bail!("{}: the expert weights must be weights, not activations", n.op.mnemonic());
        }
        let name = g.values[n.results[0]].name.clone();
        let xs = &g.values[x].ty.shape;
        let (t, h) = (xs[0].clone(), xs[1].clone());
        let groups = g.values[w].ty.shape[1].clone();
        let gus = static_shape(&g.values[gu].ty, "gate_up weights")?;
        let (e, i) = (gus[0], gus[1] / 2);
        let slots = t.mul(&groups).ok_or_else(|| anyhow!("symbolic group count"))?;
        let (xb, wb, ib) = (self.rm(x)?, self.rm(w)?, self.rm(ids)?);
        let gub = self.weight(gu, Layout::GateUpPanels { nr: self.nr })?;
        let db = self.weight(down, Layout::Panels { nr: self.nr, kn: false })?;
        let offsets = self.scratch(format!("{name}.offsets"), DType::I64, vec![Dim::c(e + 1)]);
        let rows = self.scratch(format!("{name}.rows"), DType::I64, vec![slots.clone()]);
        let row_w = self.scratch(format!("{name}.row_weight"), DType::F32, vec![slots.clone()]);
        let slot_row = self.scratch(format!("{name}.slot_row"), DType::I64, vec![slots.clone()]);
        let act = self.scratch(format!("{name}.act"), DType::F32, vec![slots.clone(), Dim::c(i)]);
        // moe_init_routing's expanded rows: each sorted row's token row,
        // gathered once, contiguous per expert.
        let sorted_x = match fetch {
            RowFetch::Indexed => None,
            RowFetch::Gathered => {
                Some(self.scratch(format!("{name}.sorted_x"), DType::F32, vec![slots.clone(), h.clone()]))
            }
        };
        let ys = self.scratch(format!("{name}.ys"), DType::F32, vec![slots, h]);
        self.launch(KernelKind::MoeRoute, vec![wb, ib, offsets, rows, row_w, slot_row])?;
        match sorted_x {
            None => self.launch(KernelKind::MoeGateUp, vec![xb, offsets, rows, gub, act])?,
            Some(sorted) => {
                self.launch(KernelKind::Gather, vec![xb, rows, sorted])?;
                self.launch(KernelKind::MoeGroupedGateUp, vec![sorted, offsets, gub, act])?;
            }
        }
        self.launch(KernelKind::MoeDown, vec![act, offsets, row_w, db, ys])?;
        Ok((ys, slot_row))
    }

    /// The whole MoE block: routed experts, the shared expert (two GEMMs),
    /// and `residual + (routed + shared)` in the combine.
    fn moe_ffn(&mut self, ni: usize, fetch: RowFetch) -> Result<()> {
        let g = self.g;
        let n = &g.nodes[ni];
        let (x, sgu, sdown, residual) = (n.args[0], n.args[5], n.args[6], n.args[7]);
        let (ys, slot_row) = self.routed_experts(ni, fetch)?;
        let name = g.values[n.results[0]].name.clone();
        let t = g.values[x].ty.shape[0].clone();
        let is = static_shape(&g.values[sgu].ty, "shared gate_up weight")?[0] / 2;
        let h = g.values[x].ty.shape[1].clone();
        let xb = self.rm(x)?;
        let sh_act = self.scratch(format!("{name}.shared_act"), DType::F32, vec![t.clone(), Dim::c(is)]);
        if self.konst[sgu] {
            let w = self.weight(sgu, Layout::GateUpPanels { nr: self.nr })?;
            self.launch(KernelKind::Gemm { epilogue: Epilogue::SwiGlu }, vec![xb, w, sh_act])?;
        } else {
            bail!("{}: the shared expert weights must be weights, not activations", n.op.mnemonic());
        }
        let sh_y = self.scratch(format!("{name}.shared_out"), DType::F32, vec![t, h]);
        let wd = self.weight_or_act(sdown)?;
        self.matmul_into(sh_act, wd, None, sh_y)?;
        let res = self.rm(residual)?;
        let out = self.act(n.results[0]);
        self.launch(KernelKind::MoeCombine { shared_residual: true }, vec![ys, slot_row, sh_y, res, out])
    }

    /// Merged QKV projection (GEMM with bias) followed by a kernel that
    /// splits heads, applies RoPE and appends k, v to the caches in place.
    fn qkv_rope(&mut self, ni: usize, q_heads: usize, kv_heads: usize) -> Result<()> {
        let g = self.g;
        let n = &g.nodes[ni];
        let (x, w, bias, cos, sin) = (n.args[0], n.args[1], n.args[2], n.args[3], n.args[4]);
        let caches: Vec<usize> = n.results[1..]
            .iter()
            .map(|r| {
                self.kv_out
                    .get(r)
                    .copied()
                    .ok_or_else(|| anyhow!("qkv_rope result %{} must be an entry KV-cache output", g.values[*r].name))
            })
            .collect::<Result<_>>()?;
        let name = g.values[n.results[0]].name.clone();
        let t = g.values[x].ty.shape[0].clone();
        let width = g.values[w].ty.shape[0].clone();
        let y = self.scratch(format!("{name}.qkv"), DType::F32, vec![t, width]);
        let (xb, wb, bb) = (self.rm(x)?, self.weight_or_act(w)?, self.rm(bias)?);
        self.matmul_into(xb, wb, Some(bb), y)?;
        let (cb, sb) = (self.rm(cos)?, self.rm(sin)?);
        let q = self.act(n.results[0]);
        let (k, v) = (self.p.caches[caches[0]], self.p.caches[caches[1]]);
        self.buf[n.results[1]] = Some(k);
        self.buf[n.results[2]] = Some(v);
        self.launch(KernelKind::QkvRopeAppend { q_heads, kv_heads }, vec![y, cb, sb, q, k, v])
    }

    /// The runtime-owned paged cache that value `v` (a cache written at
    /// its slots) is: the write happens in place, so `v` is that buffer.
    fn paged_cache_result(&mut self, v: usize) -> Result<BufferId> {
        let g = self.g;
        let c = self.kv_out.get(&v).copied().ok_or_else(|| {
            anyhow!("paged cache write %{} must be an entry KV-cache output (it is written in place)", g.values[v].name)
        })?;
        let cache = self.p.caches[c];
        self.buf[v] = Some(cache);
        Ok(cache)
    }

    /// Merged QKV projection over all rows of the step (one GEMM with
    /// bias), then a kernel that splits heads, applies RoPE and stores k, v
    /// at each row's slot of the paged caches in place.
    fn qkv_rope_cache_write(&mut self, ni: usize, q_heads: usize, kv_heads: usize) -> Result<()> {
        let g = self.g;
        let n = &g.nodes[ni];
        let (x, w, bias, cos, sin, slots) = (n.args[0], n.args[1], n.args[2], n.args[3], n.args[4], n.args[7]);
        let name = g.values[n.results[0]].name.clone();
        let t = g.values[x].ty.shape[0].clone();
        let width = g.values[w].ty.shape[0].clone();
        let y = self.scratch(format!("{name}.qkv"), DType::F32, vec![t, width]);
        let (xb, wb, bb) = (self.rm(x)?, self.weight_or_act(w)?, self.rm(bias)?);
        self.matmul_into(xb, wb, Some(bb), y)?;
        let (cb, sb, slot_b) = (self.rm(cos)?, self.rm(sin)?, self.rm(slots)?);
        let q = self.act(n.results[0]);
        let k = self.paged_cache_result(n.results[1])?;
        let v = self.paged_cache_result(n.results[2])?;
        self.launch(KernelKind::QkvRopeCacheWrite { q_heads, kv_heads }, vec![y, cb, sb, slot_b, q, k, v])
    }
}

/// How a grouped gate/up GEMM reads its A rows.
#[derive(Clone, Copy)]
enum RowFetch {
    /// Through the sorted-row -> token index, row by row (`moe_ffn`).
    Indexed,
    /// From a copy of the rows gathered once, contiguous per expert
    /// (`moe_grouped_ffn`, the batched MoE).
    Gathered,
}

/// Per-thread scratch: a GEMM converts a narrow weight panel to f32 once per
/// panel when it has more rows than one register tile; attention keeps one
/// row of scores per query head of a KV group.
fn thread_scratch(kind: &KernelKind, args: &[ArgSpec]) -> Extent {
    let panel = |k: &Dim, w: &ArgSpec| -> Extent {
        let nr = match w.layout {
            Layout::Panels { nr, .. } | Layout::GateUpPanels { nr } => nr as u64,
            Layout::RowMajor | Layout::DotPanels { .. } => 0,
        };
        match (k.as_const(), w.dtype) {
            (Some(_), DType::F32) | (None, _) => Extent::constant(0),
            (Some(k), _) => Extent::constant(4 * nr * k as u64),
        }
    };
    match kind {
        KernelKind::Gemm { .. } => panel(args[0].shape.last().expect("rank >= 2"), &args[1]),
        KernelKind::MoeGateUp | KernelKind::MoeGroupedGateUp | KernelKind::MoeDown => {
            panel(&args[0].shape[1], &args[args.len() - 2])
        }
        KernelKind::Attention { .. } => {
            let group = match (args[0].shape[1].as_const(), args[1].shape[1].as_const()) {
                (Some(hq), Some(hkv)) if hkv > 0 => (hq / hkv) as u64,
                _ => 1,
            };
            Extent::of(4 * group, &args[1].shape[..1])
        }
        // A row sees at most its block table's worth of keys.
        KernelKind::PagedAttention { .. } | KernelKind::PagedAttentionInt8 { .. } => {
            let group = match (args[0].shape[1].as_const(), args[1].shape[2].as_const()) {
                (Some(hq), Some(hkv)) if hkv > 0 => (hq / hkv) as u64,
                _ => 1,
            };
            Extent::of(4 * group, &[args[3].shape[1].clone(), args[1].shape[1].clone()])
        }
        _ => Extent::constant(0),
    }
}
