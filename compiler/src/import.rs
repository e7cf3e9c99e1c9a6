//! Builds the graph IR of a Pangu Pro MoE model from its configuration.
//!
//! Only primitive ops are emitted: RMSNorm as mean/rsqrt/mul, SiLU as
//! x*sigmoid(x), attention as matmul/softmax/matmul, routing as
//! softmax/group-max/gather/scale, and the routed experts as a dense
//! combine over all experts (one-hot routing weights). Every fused op in a
//! later stage is introduced by a named rewrite rule.
//!
//! The decoder layer is one function, `@decoder_layer`, called once per
//! layer with that layer's weights bound by the prefix `model.layers.N.`,
//! so passes optimise it once. The entry function follows the contract in
//! `panguc_ir::session`.
//!
//! [`build_batched_module`] emits the same model over one ragged batch step
//! with a paged KV cache (`KvLayout::Paged`): the attention block becomes
//! `kv_cache_write` + `paged_attention`, everything else is unchanged and
//! runs over all rows of the step. CPU packages are compiled from it
//! (`commands::batched_cpu_program`); the Ascend targets and partitioning
//! still take the one-sequence import. Its entry contract is documented on
//! `panguc_ir::session::BatchInterpSession`.

use crate::frontend::quant::QuantType;
use anyhow::{anyhow, Result};
use panguc_ir::batch::{declare_step_inputs, paged_cache_type, StepInputs};
use panguc_ir::op::{BinaryOp, ReduceOp, RopeKind, UnaryOp};
use panguc_ir::{DType, Dim, Function, Module, Op, PanguConfig, ParamKind, TensorType, ValueId};

/// How the attention of the imported functions stores and reads K/V.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvLayout {
    /// One sequence per call, caches `[past, kv_heads, head_dim]` extended
    /// by concatenation (the contract of `panguc_ir::session`).
    Contiguous,
    /// One ragged batch step per call over paged caches
    /// `[num_blocks, block_size, kv_heads, head_dim]` (see `panguc_ir::batch`).
    Paged { block_size: usize },
}

/// Name of the decoder-layer function.
pub const LAYER_FN: &str = "decoder_layer";
/// Name of the entry function.
pub const ENTRY_FN: &str = "main";

/// Activation dtype of the graph IR: every activation is f32; weights keep
/// their checkpoint dtype and are read directly by matmuls.
pub const ACT: DType = DType::F32;

/// Build the module. `weight_dtype(name)` gives the stored dtype of each
/// checkpoint tensor (the checkpoint's, or the config's torch_dtype when
/// compiling from the config alone).
pub fn build_module(cfg: &PanguConfig, weight_dtype: &dyn Fn(&str) -> DType) -> Result<Module> {
    build_module_with(cfg, weight_dtype, KvLayout::Contiguous, None)
}

/// How a quantized (msModelSlim) checkpoint's modules are computed.
pub struct QuantPlan<'a> {
    /// Quant type of a linear module by full name (`model.layers.0.self_attn.q_proj`).
    pub linear: &'a dyn Fn(&str) -> QuantType,
    /// Int8 KV cache (C8) with per-channel scales.
    pub kv_int8: bool,
    /// Whether a tensor is stored (a smoothed norm's optional bias).
    pub has_tensor: &'a dyn Fn(&str) -> bool,
    /// Every layer's static W8A8 q, k and v projections carry bitwise
    /// equal `input_scale` and `input_offset` (they read the same normed
    /// row, so a calibration gives them one range): the row is quantized
    /// once and read by all three int8 matmuls, which `merge-qkv-static`
    /// can then merge into one. Otherwise each quantizes it itself.
    pub shared_qkv_input: bool,
}

/// Build the module of a quantized checkpoint: every W8A8 / W8A8_DYNAMIC
/// linear becomes its int8 form (quantize + `quant_matmul`, or
/// `dynamic_quant` + `quant_matmul_per_token`) in place of the float
/// matmul, a smoothed norm adds its bias, and with C8 the caches are int8
/// (`quantize` on write, `dequantize` on read).
pub fn build_quant_module(
    cfg: &PanguConfig,
    weight_dtype: &dyn Fn(&str) -> DType,
    kv: KvLayout,
    plan: &QuantPlan,
) -> Result<Module> {
    build_module_with(cfg, weight_dtype, kv, Some(plan))
}

/// Build the module over ragged batch steps with a paged KV cache of
/// `block_size` tokens per block.
pub fn build_batched_module(
    cfg: &PanguConfig,
    weight_dtype: &dyn Fn(&str) -> DType,
    block_size: usize,
) -> Result<Module> {
    anyhow::ensure!(block_size > 0, "the KV block size must be positive");
    build_module_with(cfg, weight_dtype, KvLayout::Paged { block_size }, None)
}

fn build_module_with(
    cfg: &PanguConfig,
    weight_dtype: &dyn Fn(&str) -> DType,
    kv: KvLayout,
    quant: Option<&QuantPlan>,
) -> Result<Module> {
    let mut module = Module::new("pangu_pro_moe", ENTRY_FN);
    let layer_dtype = |rel: &str| weight_dtype(&format!("model.layers.0.{rel}"));
    let layer = build_layer(cfg, &layer_dtype, kv, quant).map_err(|e| anyhow!("building @{LAYER_FN}: {e}"))?;
    module.add_function(layer);
    let entry = build_entry(cfg, weight_dtype, &module, kv, quant).map_err(|e| anyhow!("building @{ENTRY_FN}: {e}"))?;
    module.add_function(entry);
    panguc_ir::verify::verify_module(&module).map_err(|e| anyhow!("imported module fails verification: {e}"))?;
    Ok(module)
}

type R<T> = std::result::Result<T, String>;

/// Small helper that names values after what they are.
struct B<'a> {
    f: Function,
    module: Option<&'a Module>,
    /// Stored dtype of a weight, by the name the function binds.
    dtype: &'a dyn Fn(&str) -> DType,
    /// The checkpoint prefix of the function's weights (`model.layers.0.`
    /// for the layer function, whose layers share one plan).
    prefix: &'a str,
    quant: Option<&'a QuantPlan<'a>>,
}

impl B<'_> {
    fn op(&mut self, op: Op, args: &[ValueId], name: &str) -> R<ValueId> {
        Ok(self.f.push_node(self.module, op, args, &[name])?[0])
    }
    fn bin(&mut self, op: BinaryOp, a: ValueId, b: ValueId, name: &str) -> R<ValueId> {
        self.op(Op::Binary(op), &[a, b], name)
    }
    fn un(&mut self, op: UnaryOp, a: ValueId, name: &str) -> R<ValueId> {
        self.op(Op::Unary(op), &[a], name)
    }
    fn scalar(&mut self, value: f64, name: &str) -> R<ValueId> {
        self.op(Op::Scalar { value, dtype: ACT }, &[], name)
    }
    fn cast_to_act(&mut self, w: ValueId, name: &str) -> R<ValueId> {
        self.op(Op::Cast { dtype: ACT }, &[w], name)
    }
    fn reshape(&mut self, x: ValueId, shape: Vec<Dim>, name: &str) -> R<ValueId> {
        self.op(Op::Reshape { shape }, &[x], name)
    }
    fn weight(&mut self, tensor: &str, shape: &[usize], dtype: DType) -> ValueId {
        let ty = TensorType::new(dtype, shape.iter().map(|&d| Dim::c(d)).collect());
        self.f.add_weight(tensor, tensor, ty)
    }
    /// `x @ w^T`, the nn.Linear convention (weights stored [out, in]).
    fn linear(&mut self, x: ValueId, w: ValueId, name: &str) -> R<ValueId> {
        self.op(Op::MatMul { transpose_b: true }, &[x, w], name)
    }
    /// A weight tensor of the function, typed with its stored dtype.
    fn stored_weight(&mut self, tensor: &str, shape: &[usize]) -> ValueId {
        let dtype = (self.dtype)(tensor);
        self.weight(tensor, shape, dtype)
    }
    /// The checkpoint tensor a weight parameter is bound to (relative to the prefix).
    fn tensor_of(&self, w: ValueId) -> R<String> {
        self.f
            .weight_params()
            .find(|(p, _)| p.value == w)
            .map(|(_, t)| t.to_string())
            .ok_or_else(|| format!("%{} is not a weight", self.f.name_of(w)))
    }
    /// Quant type of the linear modules whose weights are `ws` (all must agree).
    fn scheme(&self, ws: &[ValueId]) -> R<(QuantType, Vec<String>)> {
        let modules = ws
            .iter()
            .map(|w| {
                let t = self.tensor_of(*w)?;
                t.strip_suffix(".weight").map(str::to_string).ok_or_else(|| format!("`{t}` is not a linear weight"))
            })
            .collect::<R<Vec<_>>>()?;
        let Some(plan) = self.quant else { return Ok((QuantType::Float, modules)) };
        let first = (plan.linear)(&format!("{}{}", self.prefix, modules[0]));
        for m in &modules[1..] {
            let this = (plan.linear)(&format!("{}{m}", self.prefix));
            if this != first {
                return Err(format!(
                    "`{}{m}` is {this} but `{}{}` is {first}: experts stacked into one matmul need one quant type",
                    self.prefix, self.prefix, modules[0]
                ));
            }
        }
        Ok((first, modules))
    }
    /// One tensor per module (`module.suffix`), stacked along a new axis 0
    /// when there are several (per-expert scales).
    fn per_module(&mut self, modules: &[String], suffix: &str, shape: &[usize], name: &str) -> R<ValueId> {
        let parts: Vec<ValueId> = modules.iter().map(|m| self.stored_weight(&format!("{m}.{suffix}"), shape)).collect();
        if parts.len() == 1 {
            return Ok(parts[0]);
        }
        self.op(Op::Stack { axis: 0 }, &parts, name)
    }
    /// `x @ w^T` where `w` is one linear weight or the stack of `parts`
    /// (per-expert `[n, k]` weights), in the form the modules' quant type
    /// asks for: FLOAT: the float matmul; W8A8_DYNAMIC: per-token
    /// `dynamic_quant` and `quant_matmul_per_token` with the per-channel
    /// `weight_scale`; W8A8: `quantize` with the per-tensor
    /// `input_scale`/`input_offset`, then `quant_matmul` with `quant_bias`
    /// and `deq_scale`.
    fn any_linear(&mut self, x: ValueId, w: ValueId, parts: &[ValueId], name: &str) -> R<ValueId> {
        let (scheme, modules) = self.scheme(parts)?;
        let stacked = parts.len() > 1;
        let n = self.f.ty(parts[0]).shape[0].as_const().ok_or("symbolic linear weight rows")?;
        // Per-channel scales: [n], stacked to [E, n].
        let mut per_channel = if stacked { vec![Dim::c(parts.len())] } else { vec![] };
        per_channel.push(Dim::c(n));
        match scheme {
            QuantType::Float | QuantType::C8 => self.linear(x, w, name),
            QuantType::W8A8Dynamic => {
                let ws = self.per_module(&modules, "weight_scale", &[n, 1], &format!("{name}_wscale_stack"))?;
                let scale = self.reshape(ws, per_channel, &format!("{name}_wscale"))?;
                let q = self.f.push_node(
                    self.module,
                    Op::DynamicQuant,
                    &[x],
                    &[&format!("{name}_xq"), &format!("{name}_xscale")],
                )?;
                self.op(Op::QuantMatMulPerToken, &[q[0], w, scale, q[1]], name)
            }
            QuantType::W8A8 => {
                let xq = self.static_quantize(x, &modules, name)?;
                self.static_matmul(xq, w, &modules, n, name)
            }
        }
    }
    /// Static W8A8 input quantization of `x` with the per-tensor
    /// `input_scale`/`input_offset` of `modules`, `[E, 1, 1]` per expert
    /// when there are several (one quantized copy of the activation per
    /// expert).
    fn static_quantize(&mut self, x: ValueId, modules: &[String], name: &str) -> R<ValueId> {
        let act_shape =
            if modules.len() > 1 { vec![Dim::c(modules.len()), Dim::c(1), Dim::c(1)] } else { vec![Dim::c(1)] };
        let s = self.per_module(modules, "input_scale", &[1], &format!("{name}_iscale_stack"))?;
        let s = self.reshape(s, act_shape.clone(), &format!("{name}_iscale"))?;
        let o = self.per_module(modules, "input_offset", &[1], &format!("{name}_ioffset_stack"))?;
        let o = self.reshape(o, act_shape, &format!("{name}_ioffset"))?;
        self.op(Op::Quantize, &[x, s, o], &format!("{name}_xq"))
    }
    /// Static W8A8 int8 matmul of the quantized `xq` by `w` (`n` rows per
    /// module) with the `quant_bias` and `deq_scale` of `modules`.
    fn static_matmul(&mut self, xq: ValueId, w: ValueId, modules: &[String], n: usize, name: &str) -> R<ValueId> {
        let qb = self.per_module(modules, "quant_bias", &[n], &format!("{name}_qbias"))?;
        let deq = self.per_module(modules, "deq_scale", &[n], &format!("{name}_deq"))?;
        self.op(Op::QuantMatMul, &[xq, w, qb, deq], name)
    }
    /// The q, k and v projections of the normed row `a`. With
    /// [`QuantPlan::shared_qkv_input`] and static W8A8 projections the row
    /// is quantized once (with q's scale and offset, equal to k's and v's)
    /// for the three int8 matmuls; otherwise as three [`B::any_linear_bias`].
    fn qkv(&mut self, a: ValueId, ws: [ValueId; 3], biases: [ValueId; 3]) -> R<[ValueId; 3]> {
        let names = ["q", "k", "v"];
        let mut modules = vec![];
        let mut all_static = true;
        for w in ws {
            let (scheme, mut m) = self.scheme(&[w])?;
            all_static &= scheme == QuantType::W8A8;
            modules.append(&mut m);
        }
        if !(all_static && self.quant.is_some_and(|q| q.shared_qkv_input)) {
            let mut out = [a; 3];
            for i in 0..3 {
                out[i] = self.any_linear_bias(a, ws[i], biases[i], names[i])?;
            }
            return Ok(out);
        }
        let xq = self.static_quantize(a, &modules[..1], "qkv")?;
        let mut out = [a; 3];
        for i in 0..3 {
            let n = self.f.ty(ws[i]).shape[0].as_const().ok_or("symbolic linear weight rows")?;
            out[i] = self.static_matmul(xq, ws[i], &modules[i..=i], n, names[i])?;
        }
        Ok(out)
    }
    /// [`B::any_linear`] of one weight plus a float bias; a static W8A8
    /// module's bias is already folded into its quant_bias.
    fn any_linear_bias(&mut self, x: ValueId, w: ValueId, bias: ValueId, name: &str) -> R<ValueId> {
        if self.scheme(&[w])?.0 == QuantType::W8A8 {
            return self.any_linear(x, w, &[w], name);
        }
        let y = self.any_linear(x, w, &[w], &format!("{name}_mm"))?;
        let bf = self.cast_to_act(bias, &format!("{name}_bias"))?;
        self.bin(BinaryOp::Add, y, bf, name)
    }
    /// RMSNorm, plus the bias of a smoothed norm when a quantized
    /// checkpoint stores one (`RMSNorm(x) * w + b`).
    fn norm(&mut self, x: ValueId, w: ValueId, eps: f64, name: &str) -> R<ValueId> {
        let weight = self.tensor_of(w)?;
        let bias = weight.strip_suffix(".weight").map(|n| format!("{n}.bias"));
        let stored = |t: &String| self.quant.is_some_and(|p| (p.has_tensor)(&format!("{}{t}", self.prefix)));
        let Some(bias) = bias.filter(stored) else { return self.rms_norm(x, w, eps, name) };
        let y = self.rms_norm(x, w, eps, &format!("{name}_unbiased"))?;
        let shape: Vec<usize> = self.f.ty(w).shape.iter().map(|d| d.as_const().unwrap_or(0)).collect();
        let b = self.stored_weight(&bias, &shape);
        let bf = self.cast_to_act(b, &format!("{name}_bias"))?;
        self.bin(BinaryOp::Add, y, bf, name)
    }
    /// RMSNorm as primitives: `x * rsqrt(mean(x*x) + eps) * w`.
    fn rms_norm(&mut self, x: ValueId, w: ValueId, eps: f64, name: &str) -> R<ValueId> {
        let sq = self.bin(BinaryOp::Mul, x, x, &format!("{name}_sq"))?;
        let last = self.f.ty(x).rank() - 1;
        let ms = self.op(Op::Reduce { op: ReduceOp::Mean, axis: last, keepdim: true }, &[sq], &format!("{name}_ms"))?;
        let e = self.scalar(eps, &format!("{name}_eps"))?;
        let mse = self.bin(BinaryOp::Add, ms, e, &format!("{name}_ms_eps"))?;
        let inv = self.un(UnaryOp::Rsqrt, mse, &format!("{name}_inv_rms"))?;
        let xn = self.bin(BinaryOp::Mul, x, inv, &format!("{name}_xn"))?;
        let wf = self.cast_to_act(w, &format!("{name}_w"))?;
        self.bin(BinaryOp::Mul, xn, wf, name)
    }
    /// SiLU as primitives: `x * sigmoid(x)`.
    fn silu(&mut self, x: ValueId, name: &str) -> R<ValueId> {
        let s = self.un(UnaryOp::Sigmoid, x, &format!("{name}_sig"))?;
        self.bin(BinaryOp::Mul, x, s, name)
    }
    /// NeoX rotate-half RoPE on `x[T, heads, D]` with tables `[T, 1, D]`.
    fn rope(&mut self, x: ValueId, cos: ValueId, sin: ValueId, d: usize, name: &str) -> R<ValueId> {
        let lo = self.op(Op::Slice { axis: 2, start: 0, end: d / 2 }, &[x], &format!("{name}_lo"))?;
        let hi = self.op(Op::Slice { axis: 2, start: d / 2, end: d }, &[x], &format!("{name}_hi"))?;
        let neg = self.un(UnaryOp::Neg, hi, &format!("{name}_hi_neg"))?;
        let rot = self.op(Op::Concat { axis: 2 }, &[neg, lo], &format!("{name}_rot"))?;
        let xc = self.bin(BinaryOp::Mul, x, cos, &format!("{name}_cos"))?;
        let rs = self.bin(BinaryOp::Mul, rot, sin, &format!("{name}_sin"))?;
        self.bin(BinaryOp::Add, xc, rs, name)
    }
}

/// The parameters of `@decoder_layer`: its inputs, then its weights (named
/// relative to the layer prefix) in the checkpoint's canonical order.
pub struct LayerParams {
    pub h: ValueId,
    pub positions: ValueId,
    /// The step metadata (positions included) of a paged layer.
    pub step: Option<StepInputs>,
    pub rope_cos: ValueId,
    pub rope_sin: ValueId,
    pub k_cache: ValueId,
    pub v_cache: ValueId,
    pub input_norm: ValueId,
    pub q_proj: ValueId,
    pub k_proj: ValueId,
    pub v_proj: ValueId,
    pub o_proj: ValueId,
    pub q_bias: ValueId,
    pub k_bias: ValueId,
    pub v_bias: ValueId,
    pub o_bias: ValueId,
    pub post_attention_norm: ValueId,
    pub router: ValueId,
    pub router_scale: ValueId,
    /// Per routed expert: gate, up and down projections.
    pub experts: Vec<[ValueId; 3]>,
    pub shared_gate: ValueId,
    pub shared_up: ValueId,
    pub shared_down: ValueId,
}

/// Declare the layer function's parameters on `f`. The weights come from
/// `PanguConfig::layer_tensors`, the one list of names and shapes the
/// checkpoint validation also uses. Public so that hand-built layer
/// functions (tests) share the importer's exact signature.
pub fn declare_layer_params(f: &mut Function, cfg: &PanguConfig, dtype: &dyn Fn(&str) -> DType) -> R<LayerParams> {
    declare_layer_params_with(f, cfg, dtype, KvLayout::Contiguous)
}

/// [`declare_layer_params`] for either cache layout. Inputs: `h`, then
/// `positions` (contiguous) or the step metadata of
/// `panguc_ir::batch::declare_step_inputs` (paged), then `rope_cos`,
/// `rope_sin`, `k_cache`, `v_cache` of the layout's cache type.
pub fn declare_layer_params_with(
    f: &mut Function,
    cfg: &PanguConfig,
    dtype: &dyn Fn(&str) -> DType,
    kv: KvLayout,
) -> R<LayerParams> {
    declare_layer_params_full(f, cfg, dtype, kv, false)
}

/// [`declare_layer_params_with`], with int8 (C8) caches when `kv_int8`.
fn declare_layer_params_full(
    f: &mut Function,
    cfg: &PanguConfig,
    dtype: &dyn Fn(&str) -> DType,
    kv: KvLayout,
    kv_int8: bool,
) -> R<LayerParams> {
    let (t, d) = (Dim::tokens(), cfg.head_dim());
    let act = |shape: Vec<Dim>| TensorType::new(ACT, shape);
    let h = f.add_input("h", act(vec![t.clone(), Dim::c(cfg.hidden_size)]));
    let (positions, step) = match kv {
        KvLayout::Contiguous => (f.add_input("positions", TensorType::new(DType::I64, vec![t.clone()])), None),
        KvLayout::Paged { .. } => {
            let step = declare_step_inputs(f);
            (step.positions, Some(step))
        }
    };
    let rope_cos = f.add_input("rope_cos", act(vec![t.clone(), Dim::c(d)]));
    let rope_sin = f.add_input("rope_sin", act(vec![t.clone(), Dim::c(d)]));
    let cache_ty = cache_type(cfg, kv, kv_int8);
    let k_cache = f.add_input("k_cache", cache_ty.clone());
    let v_cache = f.add_input("v_cache", cache_ty);
    let mut ids = std::collections::HashMap::new();
    for spec in cfg.layer_tensors(0) {
        let rel = spec
            .name
            .strip_prefix("model.layers.0.")
            .ok_or_else(|| format!("unexpected layer tensor {}", spec.name))?;
        let ty = TensorType::new(dtype(rel), spec.shape.iter().map(|&n| Dim::c(n)).collect());
        ids.insert(rel.to_string(), f.add_weight(rel, rel, ty));
    }
    let w = |rel: &str| ids.get(rel).copied().ok_or_else(|| format!("layer tensor `{rel}` is not declared"));
    let experts = (0..cfg.num_experts)
        .map(|x| {
            let e = |n: &str| w(&format!("mlp.experts.{x}.{n}"));
            Ok([e("gate_proj.weight")?, e("up_proj.weight")?, e("down_proj.weight")?])
        })
        .collect::<R<Vec<_>>>()?;
    Ok(LayerParams {
        h,
        positions,
        step,
        rope_cos,
        rope_sin,
        k_cache,
        v_cache,
        input_norm: w("input_layernorm.weight")?,
        q_proj: w("self_attn.q_proj.weight")?,
        k_proj: w("self_attn.k_proj.weight")?,
        v_proj: w("self_attn.v_proj.weight")?,
        o_proj: w("self_attn.o_proj.weight")?,
        q_bias: w("self_attn.q_proj.bias")?,
        k_bias: w("self_attn.k_proj.bias")?,
        v_bias: w("self_attn.v_proj.bias")?,
        o_bias: w("self_attn.o_proj.bias")?,
        post_attention_norm: w("post_attention_layernorm.weight")?,
        router: w("mlp.gate.weight")?,
        router_scale: w("mlp.router_scale")?,
        experts,
        shared_gate: w("mlp.shared_expert.gate_proj.weight")?,
        shared_up: w("mlp.shared_expert.up_proj.weight")?,
        shared_down: w("mlp.shared_expert.down_proj.weight")?,
    })
}

/// Type of one layer's K or V cache input: activations, or int8 for C8.
fn cache_type(cfg: &PanguConfig, kv: KvLayout, kv_int8: bool) -> TensorType {
    let (d, kvh) = (cfg.head_dim(), cfg.num_key_value_heads);
    let dtype = if kv_int8 { DType::I8 } else { ACT };
    match kv {
        KvLayout::Contiguous => TensorType::new(dtype, vec![Dim::past(), Dim::c(kvh), Dim::c(d)]),
        KvLayout::Paged { block_size } => paged_cache_type(dtype, block_size, kvh, d),
    }
}

fn build_layer(
    cfg: &PanguConfig,
    dtype: &dyn Fn(&str) -> DType,
    kv: KvLayout,
    quant: Option<&QuantPlan>,
) -> R<Function> {
    let (nh, kvh, d) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim());
    let (e, g, epg) = (cfg.num_experts, cfg.num_groups(), cfg.experts_per_group());
    let eps = cfg.rms_norm_eps;
    let t = Dim::tokens();
    let mut b = B { f: Function::new(LAYER_FN), module: None, dtype, prefix: "model.layers.0.", quant };

    let kv_int8 = quant.is_some_and(|q| q.kv_int8);
    let p = declare_layer_params_full(&mut b.f, cfg, dtype, kv, kv_int8)?;
    let (x, pos, cos, sin, k_cache, v_cache) = (p.h, p.positions, p.rope_cos, p.rope_sin, p.k_cache, p.v_cache);
    let (ln1, ln2, wg, rscale) = (p.input_norm, p.post_attention_norm, p.router, p.router_scale);
    let (wq, wk, wv, wo) = (p.q_proj, p.k_proj, p.v_proj, p.o_proj);
    let (bq, bk, bv, bo) = (p.q_bias, p.k_bias, p.v_bias, p.o_bias);
    let (experts, sg, su, sd) = (p.experts, p.shared_gate, p.shared_up, p.shared_down);

    // ---- attention ----
    let a = b.norm(x, ln1, eps, "attn_norm")?;
    let [q, k, v] = b.qkv(a, [wq, wk, wv], [bq, bk, bv])?;
    let q3 = b.reshape(q, vec![t.clone(), Dim::c(nh), Dim::c(d)], "q_heads")?;
    let k3 = b.reshape(k, vec![t.clone(), Dim::c(kvh), Dim::c(d)], "k_heads")?;
    let v3 = b.reshape(v, vec![t.clone(), Dim::c(kvh), Dim::c(d)], "v_heads")?;
    let cos3 = b.reshape(cos, vec![t.clone(), Dim::c(1), Dim::c(d)], "rope_cos_b")?;
    let sin3 = b.reshape(sin, vec![t.clone(), Dim::c(1), Dim::c(d)], "rope_sin_b")?;
    let qr = b.rope(q3, cos3, sin3, d, "q_rope")?;
    let kr = b.rope(k3, cos3, sin3, d, "k_rope")?;
    // With an int8 (C8) cache the new rows are quantized per channel on
    // write, and attention reads the dequantized cache.
    let c8 = if kv_int8 {
        let mut scale = |proj: &str, what: &str| -> R<ValueId> {
            let w = b.stored_weight(&format!("self_attn.{proj}.kv_cache_{what}"), &[kvh * d]);
            b.reshape(w, vec![Dim::c(kvh), Dim::c(d)], &format!("{}_cache_{what}", &proj[..1]))
        };
        Some([
            scale("k_proj", "scale")?,
            scale("k_proj", "offset")?,
            scale("v_proj", "scale")?,
            scale("v_proj", "offset")?,
        ])
    } else {
        None
    };
    let (k_new, v_new) = match c8 {
        Some([ks, ko, vs, vo]) => {
            (b.op(Op::Quantize, &[kr, ks, ko], "k_q")?, b.op(Op::Quantize, &[v3, vs, vo], "v_q")?)
        }
        None => (kr, v3),
    };
    let read = |b: &mut B, all: [ValueId; 2]| -> R<[ValueId; 2]> {
        match c8 {
            Some([ks, ko, vs, vo]) => Ok([
                b.op(Op::Dequantize, &[all[0], ks, ko], "k_read")?,
                b.op(Op::Dequantize, &[all[1], vs, vo], "v_read")?,
            ]),
            None => Ok(all),
        }
    };
    let (ctx2, k_all, v_all) = match p.step {
        None => {
            let k_all = b.op(Op::Concat { axis: 0 }, &[k_cache, k_new], "k_all")?;
            let v_all = b.op(Op::Concat { axis: 0 }, &[v_cache, v_new], "v_all")?;
            let [k_read, v_read] = read(&mut b, [k_all, v_all])?;
            (contiguous_attention(&mut b, cfg, qr, k_read, v_read, pos)?, k_all, v_all)
        }
        Some(step) => {
            let k_all = b.op(Op::KvCacheWrite, &[k_cache, k_new, step.slot_mapping], "k_all")?;
            let v_all = b.op(Op::KvCacheWrite, &[v_cache, v_new, step.slot_mapping], "v_all")?;
            let [k_read, v_read] = read(&mut b, [k_all, v_all])?;
            let meta = [step.block_table, step.query_start_loc, step.context_lens];
            let att = Op::PagedAttention { scale: 1.0 / (d as f64).sqrt() };
            let ctx = b.op(att, &[&[qr, k_read, v_read][..], &meta].concat(), "attn_ctx")?;
            (b.reshape(ctx, vec![t.clone(), Dim::c(nh * d)], "attn_out")?, k_all, v_all)
        }
    };
    let o = b.any_linear_bias(ctx2, wo, bo, "o")?;
    let h1 = b.bin(BinaryOp::Add, x, o, "h_attn")?;

    // ---- MoE: routing ----
    let m = b.norm(h1, ln2, eps, "moe_norm")?;
    let logits = b.any_linear(m, wg, &[wg], "router_logits")?;
    let p = b.op(Op::Softmax { axis: 1 }, &[logits], "router_probs")?;
    let pg = b.reshape(p, vec![t.clone(), Dim::c(g), Dim::c(epg)], "router_groups")?;
    let gmax = b.op(Op::Reduce { op: ReduceOp::Max, axis: 2, keepdim: false }, &[pg], "group_max")?;
    let garg = b.op(Op::ArgMax { axis: 2, keepdim: false }, &[pg], "group_argmax")?;
    let goff = b.op(Op::Iota { len: g, step: epg as i64 }, &[], "group_offset")?;
    let eidx = b.bin(BinaryOp::Add, garg, goff, "expert_ids")?;
    let rs1 = b.reshape(rscale, vec![Dim::c(e)], "router_scale_flat")?;
    let rsf = b.cast_to_act(rs1, "router_scale_f32")?;
    let sel = b.op(Op::Gather, &[rsf, eidx], "expert_scale")?;
    let ew = b.bin(BinaryOp::Mul, gmax, sel, "expert_weights")?;
    // ---- MoE: dense combine over all experts ----
    let oh = b.op(Op::OneHot { depth: e }, &[eidx], "expert_onehot")?;
    let ew3 = b.reshape(ew, vec![t.clone(), Dim::c(g), Dim::c(1)], "expert_weights_b")?;
    let dense = b.bin(BinaryOp::Mul, oh, ew3, "combine_slots")?;
    let combine = b.op(Op::Reduce { op: ReduceOp::Sum, axis: 1, keepdim: false }, &[dense], "combine")?;
    let parts = |j: usize| -> Vec<ValueId> { experts.iter().map(|ex| ex[j]).collect() };
    let (gate_parts, up_parts, down_parts) = (parts(0), parts(1), parts(2));
    let wg_all = b.op(Op::Stack { axis: 0 }, &gate_parts, "experts_gate_w")?;
    let wu_all = b.op(Op::Stack { axis: 0 }, &up_parts, "experts_up_w")?;
    let wd_all = b.op(Op::Stack { axis: 0 }, &down_parts, "experts_down_w")?;
    let eg = b.any_linear(m, wg_all, &gate_parts, "experts_gate")?;
    let eu = b.any_linear(m, wu_all, &up_parts, "experts_up")?;
    let es = b.silu(eg, "experts_silu")?;
    let ea = b.bin(BinaryOp::Mul, es, eu, "experts_act")?;
    let ey = b.any_linear(ea, wd_all, &down_parts, "experts_out")?;
    let cw = b.op(Op::Transpose { perm: vec![1, 0] }, &[combine], "combine_t")?;
    let cw3 = b.reshape(cw, vec![Dim::c(e), t.clone(), Dim::c(1)], "combine_b")?;
    let ewy = b.bin(BinaryOp::Mul, ey, cw3, "experts_weighted")?;
    let routed = b.op(Op::Reduce { op: ReduceOp::Sum, axis: 0, keepdim: false }, &[ewy], "routed")?;
    // ---- MoE: shared expert (ungated) ----
    let shg = b.any_linear(m, sg, &[sg], "shared_gate")?;
    let shu = b.any_linear(m, su, &[su], "shared_up")?;
    let shs = b.silu(shg, "shared_silu")?;
    let sha = b.bin(BinaryOp::Mul, shs, shu, "shared_act")?;
    let shy = b.any_linear(sha, sd, &[sd], "shared_out")?;
    let y = b.bin(BinaryOp::Add, routed, shy, "moe_out")?;
    let h2 = b.bin(BinaryOp::Add, h1, y, "h_out")?;
    b.f.outputs = vec![h2, k_all, v_all];
    if quant.is_some() {
        // A static W8A8 module's float bias is folded into its quant_bias
        // (and not stored): drop the weight parameters nothing reads.
        let uses = b.f.use_counts();
        b.f.params.retain(|p| p.kind == ParamKind::Input || uses[p.value.index()] > 0);
    }
    Ok(b.f)
}

/// Causal GQA attention of one sequence as primitives over its whole
/// context `k_all`/`v_all` (`[past+tokens, kv_heads, head_dim]`); returns
/// `[tokens, heads*head_dim]`.
fn contiguous_attention(
    b: &mut B,
    cfg: &PanguConfig,
    qr: ValueId,
    k_all: ValueId,
    v_all: ValueId,
    pos: ValueId,
) -> R<ValueId> {
    let (nh, kvh, d) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim());
    let t = Dim::tokens();
    let qt = b.op(Op::Transpose { perm: vec![1, 0, 2] }, &[qr], "q_t")?;
    let k_rep = b.op(Op::RepeatInterleave { axis: 1, repeats: nh / kvh }, &[k_all], "k_rep")?;
    let v_rep = b.op(Op::RepeatInterleave { axis: 1, repeats: nh / kvh }, &[v_all], "v_rep")?;
    let kt = b.op(Op::Transpose { perm: vec![1, 0, 2] }, &[k_rep], "k_t")?;
    let vt = b.op(Op::Transpose { perm: vec![1, 0, 2] }, &[v_rep], "v_t")?;
    let scores = b.op(Op::MatMul { transpose_b: true }, &[qt, kt], "scores")?;
    let scale = b.scalar(1.0 / (d as f64).sqrt(), "attn_scale")?;
    let scaled = b.bin(BinaryOp::Mul, scores, scale, "scores_scaled")?;
    let mask = b.op(Op::CausalMask, &[pos, k_all], "causal_mask")?;
    let masked = b.bin(BinaryOp::Add, scaled, mask, "scores_masked")?;
    let probs = b.op(Op::Softmax { axis: 2 }, &[masked], "attn_probs")?;
    let ctx = b.op(Op::MatMul { transpose_b: false }, &[probs, vt], "attn_ctx")?;
    let ctx_t = b.op(Op::Transpose { perm: vec![1, 0, 2] }, &[ctx], "attn_ctx_t")?;
    b.reshape(ctx_t, vec![t, Dim::c(nh * d)], "attn_out")
}

fn build_entry(
    cfg: &PanguConfig,
    dtype: &dyn Fn(&str) -> DType,
    module: &Module,
    kv: KvLayout,
    quant: Option<&QuantPlan>,
) -> R<Function> {
    let (v, h, d) = (cfg.vocab_size, cfg.hidden_size, cfg.head_dim());
    let t = Dim::tokens();
    let mut b = B { f: Function::new(ENTRY_FN), module: Some(module), dtype, prefix: "", quant };
    let kv_int8 = quant.is_some_and(|q| q.kv_int8);
    let ids = b.f.add_input("ids", TensorType::new(DType::I64, vec![t.clone()]));
    // The layer's metadata arguments: positions, or the whole step.
    let meta: Vec<ValueId> = match kv {
        KvLayout::Contiguous => vec![b.f.add_input("positions", TensorType::new(DType::I64, vec![t.clone()]))],
        KvLayout::Paged { .. } => {
            let s = declare_step_inputs(&mut b.f);
            vec![s.positions, s.query_start_loc, s.context_lens, s.block_table, s.slot_mapping]
        }
    };
    let pos = meta[0];
    let cache_ty = cache_type(cfg, kv, kv_int8);
    let mut caches = vec![];
    for l in 0..cfg.num_hidden_layers {
        let k = b.f.add_input(&format!("k_cache.{l}"), cache_ty.clone());
        let vv = b.f.add_input(&format!("v_cache.{l}"), cache_ty.clone());
        caches.push((k, vv));
    }
    let embed = b.weight("model.embed_tokens.weight", &[v, h], dtype("model.embed_tokens.weight"));
    let norm = b.weight("model.norm.weight", &[h], dtype("model.norm.weight"));
    let head_name = if cfg.tie_word_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" };
    let head = if cfg.tie_word_embeddings { embed } else { b.weight(head_name, &[v, h], dtype(head_name)) };

    let e = b.op(Op::Gather, &[embed, ids], "embed")?;
    let mut x = b.cast_to_act(e, "h.0")?;
    let cos = b.op(Op::RopeTable { kind: RopeKind::Cos, theta: cfg.rope_theta, head_dim: d }, &[pos], "rope_cos")?;
    let sin = b.op(Op::RopeTable { kind: RopeKind::Sin, theta: cfg.rope_theta, head_dim: d }, &[pos], "rope_sin")?;
    let mut new_caches = vec![];
    for (l, (kc, vc)) in caches.into_iter().enumerate() {
        let names = [format!("h.{}", l + 1), format!("k.{l}"), format!("v.{l}")];
        let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let op = Op::Call { func: LAYER_FN.into(), weight_prefix: format!("model.layers.{l}.") };
        let args: Vec<ValueId> = [&[x][..], &meta, &[cos, sin, kc, vc]].concat();
        let outs = b.f.push_node(Some(module), op, &args, &name_refs)?;
        x = outs[0];
        new_caches.extend([outs[1], outs[2]]);
    }
    let hn = b.norm(x, norm, cfg.rms_norm_eps, "final_norm")?;
    let logits = b.any_linear(hn, head, &[head], "logits")?;
    b.f.outputs = std::iter::once(logits).chain(new_caches).collect();
    Ok(b.f)
}
