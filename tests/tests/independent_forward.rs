//! The interpreter on the imported module against an independent, naive
//! forward pass written straight from docs/pangu-pro-moe.md with plain loops
//! (no IR, no interpreter kernels), on the bundled tiny checkpoint.
//! Also: KV-cache decode equals recomputing the whole sequence.

use panguc::commands::{import, open_checkpoint};
use panguc_ir::interp::Interpreter;
use panguc_ir::session::InterpSession;
use panguc_ir::{PanguConfig, Tensor, WeightSource};
use std::path::PathBuf;

fn tiny_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny-pangu")
}

struct W<'a>(&'a dyn WeightSource);
impl W<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Vec<f32> {
        self.0.load_f32(name, shape).unwrap().into_f32()
    }
}

/// y[o] = sum_i x[i] * w[o, i]  (nn.Linear, weight stored [out, in]).
fn linear(x: &[f32], w: &[f32], out: usize) -> Vec<f32> {
    let inp = x.len();
    (0..out).map(|o| (0..inp).map(|i| x[i] * w[o * inp + i]).sum()).collect()
}

fn rmsnorm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, g)| v * r * g).collect()
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

fn rope(x: &mut [f32], pos: usize, theta: f64) {
    let d = x.len();
    let orig = x.to_vec();
    for i in 0..d {
        let f = i % (d / 2);
        let angle = pos as f64 / theta.powf(2.0 * f as f64 / d as f64);
        let rot = if i < d / 2 { -orig[i + d / 2] } else { orig[i - d / 2] };
        x[i] = orig[i] * angle.cos() as f32 + rot * angle.sin() as f32;
    }
}

/// Logits for every position of `ids`, computed token by token.
fn naive_forward(cfg: &PanguConfig, w: &W, ids: &[i64]) -> Vec<Vec<f32>> {
    let (h, nh, kvh, d) = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim());
    let (e, im, is, g) =
        (cfg.num_experts, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size, cfg.num_groups());
    let eps = cfg.rms_norm_eps as f32;
    let embed = w.get("model.embed_tokens.weight", &[cfg.vocab_size, h]);
    let mut hs: Vec<Vec<f32>> = ids.iter().map(|&t| embed[t as usize * h..(t as usize + 1) * h].to_vec()).collect();
    for l in 0..cfg.num_hidden_layers {
        let p = |n: &str| format!("model.layers.{l}.{n}");
        let ln1 = w.get(&p("input_layernorm.weight"), &[h]);
        let (wq, bq) =
            (w.get(&p("self_attn.q_proj.weight"), &[nh * d, h]), w.get(&p("self_attn.q_proj.bias"), &[nh * d]));
        let (wk, bk) =
            (w.get(&p("self_attn.k_proj.weight"), &[kvh * d, h]), w.get(&p("self_attn.k_proj.bias"), &[kvh * d]));
        let (wv, bv) =
            (w.get(&p("self_attn.v_proj.weight"), &[kvh * d, h]), w.get(&p("self_attn.v_proj.bias"), &[kvh * d]));
        let (wo, bo) = (w.get(&p("self_attn.o_proj.weight"), &[h, nh * d]), w.get(&p("self_attn.o_proj.bias"), &[h]));
        let ln2 = w.get(&p("post_attention_layernorm.weight"), &[h]);
        let gate = w.get(&p("mlp.gate.weight"), &[e, h]);
        let scale = w.get(&p("mlp.router_scale"), &[1, e]);
        let add = |a: Vec<f32>, b: &[f32]| -> Vec<f32> { a.iter().zip(b).map(|(x, y)| x + y).collect() };
        // Attention over all positions (causal).
        let mut qs = vec![];
        let mut ks = vec![];
        let mut vs = vec![];
        for (pos, x) in hs.iter().enumerate() {
            let a = rmsnorm(x, &ln1, eps);
            let mut q = add(linear(&a, &wq, nh * d), &bq);
            let mut k = add(linear(&a, &wk, kvh * d), &bk);
            let v = add(linear(&a, &wv, kvh * d), &bv);
            for head in q.chunks_mut(d) {
                rope(head, pos, cfg.rope_theta);
            }
            for head in k.chunks_mut(d) {
                rope(head, pos, cfg.rope_theta);
            }
            qs.push(q);
            ks.push(k);
            vs.push(v);
        }
        let mut next = vec![];
        for (pos, x) in hs.iter().enumerate() {
            let mut o = vec![0.0; nh * d];
            for head in 0..nh {
                let kv = head / (nh / kvh);
                let q = &qs[pos][head * d..(head + 1) * d];
                let scores: Vec<f32> = (0..=pos)
                    .map(|j| {
                        q.iter().zip(&ks[j][kv * d..(kv + 1) * d]).map(|(a, b)| a * b).sum::<f32>() / (d as f32).sqrt()
                    })
                    .collect();
                let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let exps: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f32 = exps.iter().sum();
                for (j, ex) in exps.iter().enumerate() {
                    for c in 0..d {
                        o[head * d + c] += ex / z * vs[j][kv * d + c];
                    }
                }
            }
            let h1 = add(add(linear(&o, &wo, h), &bo), x);
            // MoE with grouped routing.
            let m = rmsnorm(&h1, &ln2, eps);
            let logits = linear(&m, &gate, e);
            let mx = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let z: f32 = logits.iter().map(|v| (v - mx).exp()).sum();
            let probs: Vec<f32> = logits.iter().map(|v| (v - mx).exp() / z).collect();
            let mut y = vec![0.0; h];
            let per = e / g;
            for grp in 0..g {
                let mut best = grp * per;
                for ex in grp * per..(grp + 1) * per {
                    if probs[ex] > probs[best] {
                        best = ex;
                    }
                }
                let weight = probs[best] * scale[best];
                let q = |n: &str| p(&format!("mlp.experts.{best}.{n}"));
                let gw = w.get(&q("gate_proj.weight"), &[im, h]);
                let uw = w.get(&q("up_proj.weight"), &[im, h]);
                let dw = w.get(&q("down_proj.weight"), &[h, im]);
                let act: Vec<f32> =
                    linear(&m, &gw, im).iter().zip(linear(&m, &uw, im)).map(|(a, b)| silu(*a) * b).collect();
                for (yy, v) in y.iter_mut().zip(linear(&act, &dw, h)) {
                    *yy += weight * v;
                }
            }
            let sg = w.get(&p("mlp.shared_expert.gate_proj.weight"), &[is, h]);
            let su = w.get(&p("mlp.shared_expert.up_proj.weight"), &[is, h]);
            let sd = w.get(&p("mlp.shared_expert.down_proj.weight"), &[h, is]);
            let act: Vec<f32> =
                linear(&m, &sg, is).iter().zip(linear(&m, &su, is)).map(|(a, b)| silu(*a) * b).collect();
            let shared = linear(&act, &sd, h);
            next.push(h1.iter().zip(&y).zip(&shared).map(|((a, b), c)| a + b + c).collect());
        }
        hs = next;
    }
    let norm = w.get("model.norm.weight", &[h]);
    let head = w.get("lm_head.weight", &[cfg.vocab_size, h]);
    hs.iter().map(|x| linear(&rmsnorm(x, &norm, eps), &head, cfg.vocab_size)).collect()
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().map(|v| v.abs()).fold(0.0, f32::max).max(1e-6);
    a.iter().zip(b).map(|(x, y)| (x - y).abs() / scale).fold(0.0, f32::max)
}

#[test]
fn interpreter_matches_independent_forward_pass() {
    let ckpt = open_checkpoint(&tiny_dir(), false).unwrap();
    let cfg = ckpt.config().clone();
    let module = import(&ckpt).unwrap();
    let ids = [1i64, 2, 3, 4, 100, 511];
    let expected = naive_forward(&cfg, &W(&ckpt), &ids);
    let mut session = InterpSession::new(
        Interpreter::new(&module, &ckpt),
        cfg.num_hidden_layers,
        [cfg.num_key_value_heads, cfg.head_dim()],
    );
    let logits = session.forward(&ids).unwrap();
    assert_eq!(logits.shape, vec![ids.len(), cfg.vocab_size]);
    for (pos, row) in logits.as_f32().chunks(cfg.vocab_size).enumerate() {
        let err = max_rel(row, &expected[pos]);
        assert!(err < 1e-5, "position {pos}: relative error {err}");
    }
    // The logits are not degenerate: different positions differ, values spread.
    let spread = expected[5].iter().copied().fold(f32::NEG_INFINITY, f32::max)
        - expected[5].iter().copied().fold(f32::INFINITY, f32::min);
    assert!(spread > 0.1, "logit spread {spread}");
}

#[test]
fn kv_cache_decode_matches_full_recompute() {
    let ckpt = open_checkpoint(&tiny_dir(), false).unwrap();
    let cfg = ckpt.config().clone();
    let module = import(&ckpt).unwrap();
    let ids = [5i64, 17, 42, 99, 3, 250, 7];
    let kv = [cfg.num_key_value_heads, cfg.head_dim()];
    let mut full = InterpSession::new(Interpreter::new(&module, &ckpt), cfg.num_hidden_layers, kv);
    let all: Tensor = full.forward(&ids).unwrap();
    // Prefill 3 tokens, then decode the rest one at a time.
    let mut inc = InterpSession::new(Interpreter::new(&module, &ckpt), cfg.num_hidden_layers, kv);
    let mut rows: Vec<f32> = inc.forward(&ids[..3]).unwrap().into_f32();
    for t in &ids[3..] {
        rows.extend(inc.forward(&[*t]).unwrap().into_f32());
    }
    assert_eq!(inc.past(), ids.len());
    let v = cfg.vocab_size;
    for pos in 0..ids.len() {
        let a = &all.as_f32()[pos * v..(pos + 1) * v];
        let b = &rows[pos * v..(pos + 1) * v];
        let err = a.iter().zip(b).map(|(x, y)| (x - y).abs() / x.abs().max(y.abs()).max(1e-3)).fold(0.0, f32::max);
        assert!(err < 1e-5, "position {pos}: relative difference {err}");
    }
}
