//! `QMODEL/quant_report.json`: how close the quantized model stays to the
//! float one, and what each expert-aware technique buys.
//!
//! The float and each quantized model run the same evaluation prompts
//! (disjoint from calibration) on the reference interpreter, layer by
//! layer so the routing of every layer can be compared. Measured per
//! variant: the mean next-token KL(float || quantized) and top-1 agreement
//! over every prompt position, and per layer the routing top-k agreement
//! (the mean share of a token's selected experts the float model also
//! selects). Variants: the checkpoint as written, then the same with each
//! enabled technique (smoothing, router protection, calibration balance)
//! turned off in turn, each written to a scratch directory and measured
//! the same way.

use crate::frontend::Checkpoint;
use crate::quantize::{
    calibrate_with, needs_calibration, progress, pseudo_random_tokens, write_quantized_with, Calibration,
    QuantizeOptions, QuantizeSummary, Techniques,
};
use anyhow::{Context, Result};
use panguc_ir::interp::{rope_table, Interpreter};
use panguc_ir::op::RopeKind;
use panguc_ir::{PanguConfig, Tensor, WeightSource};
use serde_json::{json, Value};
use std::path::Path;

/// The report's file name inside the quantized checkpoint.
pub const REPORT_FILE: &str = "quant_report.json";

/// Tokens per evaluation prompt.
pub const EVAL_PROMPT_LEN: usize = 32;

/// `n` deterministic evaluation prompts (a seed of their own, so they are
/// not the synthetic calibration prompts).
pub fn eval_prompts(n: usize, vocab: usize) -> Vec<Vec<i64>> {
    let mut seed = 0xE7A1_0000_2B3D_u64;
    (0..n).map(|_| pseudo_random_tokens(&mut seed, EVAL_PROMPT_LEN, vocab)).collect()
}

/// What one model produced on one prompt: the next-token logits of every
/// position `[T * V]` and each layer's selected experts `[T * groups]`.
struct PromptTrace {
    logits: Vec<f32>,
    experts: Vec<Vec<i64>>,
}

/// Runs the (float or quantized) checkpoint in `dir` over `prompts`.
fn trace(dir: &Path, prompts: &[Vec<i64>], what: &str) -> Result<Vec<PromptTrace>> {
    let ckpt = Checkpoint::open(dir)?;
    let cfg = ckpt.config().clone();
    let mut module = crate::commands::import(&ckpt)?;
    let layer = module.functions.get_mut(crate::import::LAYER_FN).context("no decoder layer function")?;
    let ids = layer.values.iter().position(|v| v.name == "expert_ids").context("no value %expert_ids")?;
    layer.outputs.push(panguc_ir::ValueId(ids as u32));
    let kv_int8 = ckpt.quant().is_some_and(|q| q.kv_int8);
    let interp = Interpreter::new(&module, &ckpt);
    let (v, h) = (cfg.vocab_size, cfg.hidden_size);
    let embed = ckpt.load_f32("model.embed_tokens.weight", &[v, h])?;
    let norm = ckpt.load_f32("model.norm.weight", &[h])?;
    let head_name = if cfg.tie_word_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" };
    let head = ckpt.load_f32(head_name, &[v, h])?;
    let bar = progress(prompts.len(), what);
    let mut out = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        out.push(trace_prompt(&interp, &cfg, &embed, &norm, &head, prompt, kv_int8)?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(out)
}

fn trace_prompt(
    interp: &Interpreter,
    cfg: &PanguConfig,
    embed: &Tensor,
    norm: &Tensor,
    head: &Tensor,
    prompt: &[i64],
    kv_int8: bool,
) -> Result<PromptTrace> {
    let (v, h, d, kvh) = (cfg.vocab_size, cfg.hidden_size, cfg.head_dim(), cfg.num_key_value_heads);
    let n = prompt.len();
    let mut rows = Vec::with_capacity(n * h);
    for &id in prompt {
        anyhow::ensure!(id >= 0 && (id as usize) < v, "evaluation token {id} is outside the vocabulary");
        rows.extend_from_slice(&embed.as_f32()[id as usize * h..(id as usize + 1) * h]);
    }
    let mut x = Tensor::f32(vec![n, h], rows);
    let pos = Tensor::i64(vec![n], (0..n as i64).collect());
    let cos = rope_table(&pos, RopeKind::Cos, cfg.rope_theta, d);
    let sin = rope_table(&pos, RopeKind::Sin, cfg.rope_theta, d);
    // An empty cache: f32, or integers (held as i64) for an int8 C8 cache.
    let empty = if kv_int8 { Tensor::i64(vec![0, kvh, d], vec![]) } else { Tensor::zeros(vec![0, kvh, d]) };
    let mut experts = Vec::with_capacity(cfg.num_hidden_layers);
    for l in 0..cfg.num_hidden_layers {
        let prefix = format!("model.layers.{l}.");
        let outs = interp.run(
            crate::import::LAYER_FN,
            &prefix,
            &[x, pos.clone(), cos.clone(), sin.clone(), empty.clone(), empty.clone()],
        )?;
        experts.push(outs[3].as_i64().to_vec());
        x = outs[0].clone();
    }
    // The entry's tail (final RMSNorm, lm_head): both float in every
    // checkpoint this writer produces, computed here in f32 as the IR does.
    let mut logits = Vec::with_capacity(n * v);
    for row in x.as_f32().chunks(h) {
        let ms = row.iter().map(|a| a * a).sum::<f32>() / h as f32;
        let inv = 1.0 / (ms + cfg.rms_norm_eps as f32).sqrt();
        let hn: Vec<f32> = row.iter().zip(norm.as_f32()).map(|(a, w)| a * inv * w).collect();
        logits.extend(head.as_f32().chunks(h).map(|w| w.iter().zip(&hn).map(|(a, b)| a * b).sum::<f32>()));
    }
    Ok(PromptTrace { logits, experts })
}

/// How close one quantized model stays to the float model.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Mean KL(float || quantized) of the next-token distribution, nats.
    pub kl: f64,
    /// Share of positions whose argmax token agrees.
    pub top1: f64,
    /// Per layer: mean share of each token's selected experts that the
    /// float model selects too.
    pub routing: Vec<f64>,
}

fn log_softmax(row: &[f32]) -> Vec<f64> {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
    row.iter().map(|&x| x as f64 - lse).collect()
}

/// Lowest index of the largest value.
fn argmax(row: &[f32]) -> usize {
    (0..row.len()).fold(0, |best, i| if row[i] > row[best] { i } else { best })
}

fn compare(float: &[PromptTrace], quant: &[PromptTrace], cfg: &PanguConfig) -> Metrics {
    let (v, k) = (cfg.vocab_size, cfg.num_experts_per_tok);
    let (mut kl, mut agree, mut positions) = (0.0, 0usize, 0usize);
    let mut routed = vec![(0usize, 0usize); cfg.num_hidden_layers];
    for (f, q) in float.iter().zip(quant) {
        for (fr, qr) in f.logits.chunks(v).zip(q.logits.chunks(v)) {
            let (lp, lq) = (log_softmax(fr), log_softmax(qr));
            kl += lp.iter().zip(&lq).map(|(p, q)| p.exp() * (p - q)).sum::<f64>();
            agree += usize::from(argmax(fr) == argmax(qr));
            positions += 1;
        }
        for (l, (fe, qe)) in f.experts.iter().zip(&q.experts).enumerate() {
            for (fs, qs) in fe.chunks(k).zip(qe.chunks(k)) {
                routed[l].0 += qs.iter().filter(|e| fs.contains(e)).count();
                routed[l].1 += k;
            }
        }
    }
    let share = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    Metrics {
        kl: kl / positions.max(1) as f64,
        top1: share(agree, positions),
        routing: routed.iter().map(|&(a, b)| share(a, b)).collect(),
    }
}

/// One measured variant.
#[derive(Debug, Clone)]
pub struct VariantResult {
    /// `null` for the checkpoint as written, else the technique turned off.
    pub disabled: Option<&'static str>,
    pub metrics: Metrics,
}

/// The report of one `panguc quantize` run.
#[derive(Debug, Clone)]
pub struct QuantReport {
    pub json: Value,
    pub results: Vec<VariantResult>,
    pub calibration: Option<CalibSummary>,
}

/// Per-expert calibration token counts of one calibration.
#[derive(Debug, Clone)]
pub struct CalibSummary {
    pub target: Option<usize>,
    pub expert_tokens: Vec<Vec<usize>>,
    pub extra_prompts: usize,
}

impl CalibSummary {
    fn of(cal: &Calibration) -> CalibSummary {
        CalibSummary {
            target: cal.balance_target,
            expert_tokens: cal.expert_tokens.clone(),
            extra_prompts: cal.extra_prompts,
        }
    }

    fn below_target(&self) -> usize {
        self.target.map_or(0, |t| self.expert_tokens.iter().flatten().filter(|&&n| n < t).count())
    }

    fn json(&self, cal: &Calibration) -> Value {
        json!({
            "prompts_tokens": cal.tokens,
            "balance_target": self.target,
            "extra_prompts": self.extra_prompts,
            "extra_tokens": cal.extra_tokens,
            "experts_below_target": self.below_target(),
            "expert_tokens": self.expert_tokens,
        })
    }
}

/// Quantizes `ckpt` into `out` with `techniques`, then measures the result
/// and each technique's ablation on `eval` prompts. Returns what was
/// written and the report (also written to `out/quant_report.json`).
pub fn quantize_with_report(
    ckpt: &Checkpoint,
    out: &Path,
    opts: &QuantizeOptions,
    techniques: &Techniques,
    eval: &[Vec<i64>],
) -> Result<(QuantizeSummary, QuantReport)> {
    let calibrated = needs_calibration(opts);
    if calibrated && opts.calib.is_empty() {
        anyhow::bail!("static W8A8, the int8 KV cache and smoothing need calibration prompts");
    }
    let calibrate = |balance| -> Result<Calibration> {
        if calibrated {
            calibrate_with(ckpt, &opts.calib, balance)
        } else {
            Ok(Calibration::default())
        }
    };
    let cal = calibrate(techniques.balance)?;
    let summary = write_quantized_with(ckpt, out, opts, techniques, &cal)?;
    anyhow::ensure!(!eval.is_empty(), "the quantization report needs at least one evaluation prompt");
    let cfg = ckpt.config();
    let float = trace(ckpt.dir(), eval, "evaluating float")?;
    let mut results = vec![VariantResult {
        disabled: None,
        metrics: compare(&float, &trace(out, eval, "evaluating quantized")?, cfg),
    }];
    // Each enabled technique, turned off in turn.
    let balance_applies = calibrated && techniques.balance.is_some();
    let mut unbalanced = None;
    let ablations: [(&'static str, bool); 3] = [
        ("smoothing", opts.smooth_alpha.is_some()),
        ("router_protection", techniques.router_protect),
        ("balance", balance_applies),
    ];
    for (technique, enabled) in ablations {
        if !enabled {
            continue;
        }
        let (mut o, mut t) = (opts.clone(), *techniques);
        let cal_v = match technique {
            "smoothing" => {
                o.smooth_alpha = None;
                if needs_calibration(&o) {
                    cal.clone()
                } else {
                    Calibration::default()
                }
            }
            "router_protection" => {
                t.router_protect = false;
                cal.clone()
            }
            _ => {
                t.balance = None;
                let c = calibrate(None)?;
                unbalanced = Some(c.clone());
                c
            }
        };
        let scratch = tempfile::tempdir().context("cannot create a scratch directory for the ablations")?;
        let dir = scratch.path().join("q");
        write_quantized_with(ckpt, &dir, &o, &t, &cal_v)?;
        let q = trace(&dir, eval, &format!("evaluating without {technique}"))?;
        results.push(VariantResult { disabled: Some(technique), metrics: compare(&float, &q, cfg) });
    }
    let calibration = calibrated.then(|| CalibSummary::of(&cal));
    let json = json!({
        "scheme": opts.scheme.quant_type().name(),
        "kv_int8": opts.kv_int8,
        "techniques": {
            "smoothing": { "enabled": opts.smooth_alpha.is_some(), "alpha": opts.smooth_alpha },
            "router_protection": { "enabled": techniques.router_protect },
            "balance": { "enabled": balance_applies, "ratio": techniques.balance.filter(|_| balance_applies) },
        },
        "calibration": calibration.as_ref().map(|c| c.json(&cal)),
        "calibration_without_balance": unbalanced.as_ref().map(|c| CalibSummary::of(c).json(c)),
        "evaluation": {
            "prompts": eval.len(),
            "positions": eval.iter().map(Vec::len).sum::<usize>(),
            "metric_notes": "kl: mean KL(float || quantized) of the next-token distribution over every position, nats; \
                top1_agreement: share of positions with the same argmax; routing_topk_agreement: per layer, mean share \
                of a token's selected experts the float model selects too",
        },
        "results": results.iter().map(|r| json!({
            "disabled": r.disabled,
            "kl": r.metrics.kl,
            "top1_agreement": r.metrics.top1,
            "routing_topk_agreement": r.metrics.routing,
        })).collect::<Vec<_>>(),
    });
    let path = out.join(REPORT_FILE);
    std::fs::write(&path, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok((summary, QuantReport { json, results, calibration }))
}

impl QuantReport {
    /// The printed table: one row per variant, then the calibration counts.
    pub fn table(&self) -> String {
        let mut s =
            String::from("variant                      KL (nats)    top-1   routing top-k agreement per layer\n");
        for r in &self.results {
            let name = r.disabled.map_or("as written".to_string(), |t| format!("without {t}"));
            let routing: Vec<String> = r.metrics.routing.iter().map(|a| format!("{a:.3}")).collect();
            s += &format!("{name:<28} {:>10.3e}   {:.3}   {}\n", r.metrics.kl, r.metrics.top1, routing.join(" "));
        }
        if let Some(c) = &self.calibration {
            s += "calibration tokens per expert (min / max by layer)";
            match c.target {
                Some(t) => {
                    s += &format!(
                        ", balance target {t}, {} extra prompts, {} experts below target",
                        c.extra_prompts,
                        c.below_target()
                    )
                }
                None => s += ", no balance",
            }
            s += ":";
            for counts in &c.expert_tokens {
                let (lo, hi) = (counts.iter().min().unwrap_or(&0), counts.iter().max().unwrap_or(&0));
                s += &format!(" {lo}/{hi}");
            }
            s += "\n";
        }
        s
    }
}
