//! Hand-fused Pangu modules for testing the CPU backend's fused kernels
//! end to end before (and independently of) the e-graph pipeline. They use
//! the importer's weight names and entry contract; the compiled engine is
//! compared with the interpreter running the same module.
//!
//! * [`Variant::Classic`]: RmsNorm, MatMulBias on concatenated QKV weights,
//!   Split, Rope, KV concat, FlashAttention, AddRmsNorm,
//!   MoeGatingGroupTopK, GroupedMatmulMoe over stacked gate/up/down
//!   weights, GateUpSwiGlu, FusedElementwise.
//! * [`Variant::Plan`]: QkvRope (in-place KV append), MoeRouterTopK and
//!   MoeFfn (routed + shared experts + residual).

#![allow(dead_code)]

use panguc_ir::op::RopeKind;
use panguc_ir::{DType, Dim, Function, Module, Op, PanguConfig, TensorType, ValueId};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Classic,
    Plan,
}

struct B<'a> {
    f: Function,
    m: Option<&'a Module>,
}

impl B<'_> {
    fn op(&mut self, op: Op, args: &[ValueId], names: &[&str]) -> Vec<ValueId> {
        self.f.push_node(self.m, op, args, names).unwrap_or_else(|e| panic!("{e}"))
    }
    fn one(&mut self, op: Op, args: &[ValueId], name: &str) -> ValueId {
        self.op(op, args, &[name])[0]
    }
    fn w(&mut self, name: &str, shape: &[usize], dtype: DType) -> ValueId {
        let ty = TensorType::new(dtype, shape.iter().map(|d| Dim::c(*d)).collect());
        self.f.add_weight(name, name, ty)
    }
}

/// Build the module; `dtype(name)` is the stored dtype of each tensor.
pub fn build(cfg: &PanguConfig, variant: Variant, dtype: &dyn Fn(&str) -> DType) -> Module {
    let mut module = Module::new("pangu_fused_by_hand", "main");
    let layer = layer(cfg, variant, &|rel| dtype(&format!("model.layers.0.{rel}")));
    module.add_function(layer);
    let entry = entry(cfg, dtype, &module);
    module.add_function(entry);
    panguc_ir::verify::verify_module(&module).unwrap_or_else(|e| panic!("hand-fused module: {e}"));
    module
}

fn layer(cfg: &PanguConfig, variant: Variant, dtype: &dyn Fn(&str) -> DType) -> Function {
    let (nh, kvh, d) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim());
    let (e, g) = (cfg.num_experts, cfg.num_groups());
    let eps = cfg.rms_norm_eps;
    let t = Dim::tokens();
    let mut b = B { f: Function::new("decoder_layer"), m: None };
    let p = panguc::import::declare_layer_params(&mut b.f, cfg, dtype).unwrap();
    let (x, pos, cos, sin, kc, vc) = (p.h, p.positions, p.rope_cos, p.rope_sin, p.k_cache, p.v_cache);
    let (ln1, ln2, wg, rscale) = (p.input_norm, p.post_attention_norm, p.router, p.router_scale);
    let (wq, wk, wv, wo) = (p.q_proj, p.k_proj, p.v_proj, p.o_proj);
    let (bq, bk, bv, bo) = (p.q_bias, p.k_bias, p.v_bias, p.o_bias);
    let (experts, sg, su, sd) = (p.experts, p.shared_gate, p.shared_up, p.shared_down);

    // Weight-only subgraphs (evaluated at package time).
    let wqkv = b.one(Op::Concat { axis: 0 }, &[wq, wk, wv], "w_qkv");
    let bqkv = b.one(Op::Concat { axis: 0 }, &[bq, bk, bv], "b_qkv");
    let rs = b.one(Op::Reshape { shape: vec![Dim::c(e)] }, &[rscale], "router_scale_flat");
    let gu_parts: Vec<ValueId> = experts
        .iter()
        .enumerate()
        .map(|(i, ex)| b.one(Op::Concat { axis: 0 }, &[ex[0], ex[1]], &format!("gu.{i}")))
        .collect();
    let gu_all = b.one(Op::Stack { axis: 0 }, &gu_parts, "experts_gate_up");
    let downs: Vec<ValueId> = experts.iter().map(|ex| ex[2]).collect();
    let down_all = b.one(Op::Stack { axis: 0 }, &downs, "experts_down");
    let sgu = b.one(Op::Concat { axis: 0 }, &[sg, su], "shared_gate_up");

    let a = b.one(Op::RmsNorm { eps }, &[x, ln1], "attn_norm");
    let (q, k_all, v_all) = match variant {
        Variant::Classic => {
            let qkv = b.one(Op::MatMulBias { transpose_b: true }, &[a, wqkv, bqkv], "qkv");
            let parts = b.op(Op::Split { axis: 1, sizes: vec![nh * d, kvh * d, kvh * d] }, &[qkv], &["q", "k", "v"]);
            let q3 = b.one(Op::Reshape { shape: vec![t.clone(), Dim::c(nh), Dim::c(d)] }, &[parts[0]], "q_heads");
            let k3 = b.one(Op::Reshape { shape: vec![t.clone(), Dim::c(kvh), Dim::c(d)] }, &[parts[1]], "k_heads");
            let v3 = b.one(Op::Reshape { shape: vec![t.clone(), Dim::c(kvh), Dim::c(d)] }, &[parts[2]], "v_heads");
            let qr = b.one(Op::Rope, &[q3, cos, sin], "q_rope");
            let kr = b.one(Op::Rope, &[k3, cos, sin], "k_rope");
            let k_all = b.one(Op::Concat { axis: 0 }, &[kc, kr], "k_all");
            let v_all = b.one(Op::Concat { axis: 0 }, &[vc, v3], "v_all");
            (qr, k_all, v_all)
        }
        Variant::Plan => {
            let r = b.op(
                Op::QkvRope { q_heads: nh, kv_heads: kvh },
                &[a, wqkv, bqkv, cos, sin, kc, vc],
                &["q_rope", "k_all", "v_all"],
            );
            (r[0], r[1], r[2])
        }
    };
    let scale = 1.0 / (d as f64).sqrt();
    let att = b.one(Op::FlashAttention { scale }, &[q, k_all, v_all, pos], "attn");
    let att2 = b.one(Op::Reshape { shape: vec![t.clone(), Dim::c(nh * d)] }, &[att], "attn_out");
    let o = b.one(Op::MatMulBias { transpose_b: true }, &[att2, wo, bo], "o");
    let an = b.op(Op::AddRmsNorm { eps }, &[x, o, ln2], &["h_attn", "moe_norm"]);
    let (h1, m) = (an[0], an[1]);
    let out = match variant {
        Variant::Classic => {
            let logits = b.one(Op::MatMul { transpose_b: true }, &[m, wg], "router_logits");
            let gt = b.op(Op::MoeGatingGroupTopK { groups: g }, &[logits, rs], &["expert_weights", "expert_ids"]);
            let routed = b.one(Op::GroupedMatmulMoe, &[m, gt[0], gt[1], gu_all, down_all], "routed");
            let sact = b.one(Op::GateUpSwiGlu, &[m, sgu], "shared_act");
            let shy = b.one(Op::MatMul { transpose_b: true }, &[sact, sd], "shared_out");
            b.one(Op::FusedElementwise { expr: "$0 $1 $2 add add".into() }, &[h1, routed, shy], "h_out")
        }
        Variant::Plan => {
            let gt = b.op(Op::MoeRouterTopK { groups: g }, &[m, wg, rs], &["expert_weights", "expert_ids"]);
            b.one(Op::MoeFfn, &[m, gt[0], gt[1], gu_all, down_all, sgu, sd, h1], "h_out")
        }
    };
    b.f.outputs = vec![out, k_all, v_all];
    b.f
}

fn entry(cfg: &PanguConfig, dtype: &dyn Fn(&str) -> DType, module: &Module) -> Function {
    let (v, h, d, kvh) = (cfg.vocab_size, cfg.hidden_size, cfg.head_dim(), cfg.num_key_value_heads);
    let t = Dim::tokens();
    let mut b = B { f: Function::new("main"), m: Some(module) };
    let ids = b.f.add_input("ids", TensorType::new(DType::I64, vec![t.clone()]));
    let pos = b.f.add_input("positions", TensorType::new(DType::I64, vec![t.clone()]));
    let cache_ty = TensorType::new(DType::F32, vec![Dim::past(), Dim::c(kvh), Dim::c(d)]);
    let caches: Vec<(ValueId, ValueId)> = (0..cfg.num_hidden_layers)
        .map(|l| {
            (
                b.f.add_input(&format!("k_cache.{l}"), cache_ty.clone()),
                b.f.add_input(&format!("v_cache.{l}"), cache_ty.clone()),
            )
        })
        .collect();
    let embed = b.w("model.embed_tokens.weight", &[v, h], dtype("model.embed_tokens.weight"));
    let norm = b.w("model.norm.weight", &[h], dtype("model.norm.weight"));
    let head = b.w("lm_head.weight", &[v, h], dtype("lm_head.weight"));
    let e = b.one(Op::Gather, &[embed, ids], "embed");
    let mut x = b.one(Op::Cast { dtype: DType::F32 }, &[e], "h.0");
    let rt = |kind| Op::RopeTable { kind, theta: cfg.rope_theta, head_dim: d };
    let cos = b.one(rt(RopeKind::Cos), &[pos], "rope_cos");
    let sin = b.one(rt(RopeKind::Sin), &[pos], "rope_sin");
    let mut outs = vec![];
    for (l, (kc, vc)) in caches.into_iter().enumerate() {
        let names = [format!("h.{}", l + 1), format!("k.{l}"), format!("v.{l}")];
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let call = Op::Call { func: "decoder_layer".into(), weight_prefix: format!("model.layers.{l}.") };
        let r = b.op(call, &[x, pos, cos, sin, kc, vc], &refs);
        x = r[0];
        outs.extend([r[1], r[2]]);
    }
    let hn = b.one(Op::RmsNorm { eps: cfg.rms_norm_eps }, &[x, norm], "final_norm");
    let logits = b.one(Op::MatMul { transpose_b: true }, &[hn, head], "logits");
    b.f.outputs = std::iter::once(logits).chain(outs).collect();
    b.f
}
