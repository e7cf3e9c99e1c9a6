//! Writes msModelSlim-format W8A8 / W8A8_DYNAMIC checkpoints from a float
//! checkpoint, in the plain form of docs/quantization.md: symmetric
//! per-channel int8 weights; for static W8A8 a per-tensor activation scale
//! and offset calibrated on sample prompts, with `deq_scale` and the
//! zero-point-folding `quant_bias`; optionally an int8 KV cache (C8) with
//! per-channel scales calibrated the same way.
//!
//! Quantized: the attention projections and every expert's and the shared
//! expert's projections. Kept FLOAT: embeddings, norms, the router (which
//! vllm-ascend never quantizes), router_scale and lm_head.

use crate::frontend::convert::{from_i64, st_dtype};
use crate::frontend::quant::{QuantType, DESCRIPTION_FILE};
use crate::frontend::Checkpoint;
use crate::import::{build_module, LAYER_FN};
use anyhow::{bail, Context, Result};
use panguc_ir::config::TensorSpec;
use panguc_ir::interp::quant::quantize_value;
use panguc_ir::interp::{rope_table, Interpreter};
use panguc_ir::op::RopeKind;
use panguc_ir::{DType, PanguConfig, Tensor, WeightSource};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// The quantization scheme of the linear layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Per-channel weight scale, per-token dynamic activation scale.
    W8A8Dynamic,
    /// Static per-tensor activation scale/offset (needs calibration).
    W8A8,
}

impl Scheme {
    pub fn quant_type(self) -> QuantType {
        match self {
            Scheme::W8A8Dynamic => QuantType::W8A8Dynamic,
            Scheme::W8A8 => QuantType::W8A8,
        }
    }

    /// msModelSlim-style weight file name.
    fn weight_file(self) -> &'static str {
        match self {
            Scheme::W8A8Dynamic => "quant_model_weight_w8a8_dynamic.safetensors",
            Scheme::W8A8 => "quant_model_weight_w8a8.safetensors",
        }
    }
}

impl std::str::FromStr for Scheme {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "w8a8-dynamic" => Ok(Scheme::W8A8Dynamic),
            "w8a8" => Ok(Scheme::W8A8),
            other => Err(format!("unknown scheme `{other}` (expected w8a8-dynamic or w8a8)")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct QuantizeOptions {
    pub scheme: Scheme,
    /// Also write C8 KV-cache scales.
    pub kv_int8: bool,
    /// Calibration prompts (token ids), each run as one prefill through the
    /// float model. Needed for static W8A8, for C8 and for smoothing.
    pub calib: Vec<Vec<i64>>,
    /// Expert-aware smoothing with this migration strength (0.6 in
    /// Huawei's recipe), folded into the norms; None = no smoothing.
    pub smooth_alpha: Option<f32>,
}

/// The expert-aware techniques beyond smoothing (docs/quantization.md).
/// [`write_quantized`] uses [`Techniques::PLAIN`]; `panguc quantize` turns
/// both on unless told otherwise.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Techniques {
    /// Keep the router (`mlp.gate`) FLOAT, as vllm-ascend does; off, the
    /// router is quantized like the other linears (to measure what
    /// keeping it float buys).
    pub router_protect: bool,
    /// Expert-level calibration balance with this ratio r: every expert's
    /// routed statistics come from at most `r * k * N / n` tokens, and
    /// extra prompts are run until each expert has that many (or a budget
    /// of [`BALANCE_EXTRA_TOKENS`] x N tokens is spent).
    pub balance: Option<f32>,
}

impl Techniques {
    /// Router kept float, no calibration balance.
    pub const PLAIN: Techniques = Techniques { router_protect: true, balance: None };
}

/// The ratio r of the balance target `r * k * N / n` (about 2 in the
/// EAQuant recipe).
pub const BALANCE_RATIO: f32 = 2.0;

/// Budget of the balance pass: at most this many times the calibration
/// set's token count in extra prompts.
pub const BALANCE_EXTRA_TOKENS: usize = 8;

/// Length of each extra balance prompt.
const BALANCE_PROMPT_LEN: usize = 32;

/// Per-tensor range of a linear's input seen during calibration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Range {
    pub min: f32,
    pub max: f32,
}

impl Range {
    fn empty() -> Range {
        Range { min: f32::INFINITY, max: f32::NEG_INFINITY }
    }
    fn add(&mut self, v: &[f32]) {
        for &x in v {
            self.min = self.min.min(x);
            self.max = self.max.max(x);
        }
    }
}

/// What calibration observed: the input range of every quantized linear
/// (by module name) and the per-channel max |k| and |v| of each layer.
#[derive(Debug, Clone, Default)]
pub struct Calibration {
    pub inputs: HashMap<String, Range>,
    pub kv_amax: HashMap<usize, [Vec<f32>; 2]>,
    /// Per-channel (min, max) of each norm's output, by norm weight name.
    pub norm_channels: HashMap<String, (Vec<f32>, Vec<f32>)>,
    /// Per-channel max |x| of the MoE norm's output over the tokens routed
    /// to each (layer, expert).
    pub routed_amax: HashMap<(usize, usize), Vec<f32>>,
    /// Input range of each expert's down projection over its routed tokens
    /// (the dense import computes every expert on every token; only the
    /// routed rows matter).
    pub routed_down: HashMap<(usize, usize), Range>,
    /// Tokens whose statistics each expert's routed entries hold, [layer][expert].
    pub expert_tokens: Vec<Vec<usize>>,
    /// The balance target (and cap) per expert, when balancing.
    pub balance_target: Option<usize>,
    /// Tokens of the given calibration prompts (N).
    pub tokens: usize,
    /// Extra prompts the balance pass ran (and their tokens).
    pub extra_prompts: usize,
    pub extra_tokens: usize,
}

/// A progress bar for a calibration or evaluation pass over `len` prompts,
/// on stderr; hidden when stderr is not a terminal.
pub fn progress(len: usize, what: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::with_draw_target(Some(len as u64), indicatif::ProgressDrawTarget::stderr());
    if let Ok(style) = indicatif::ProgressStyle::with_template("{msg:28} {bar:30} {pos}/{len} prompts eta {eta}") {
        bar.set_style(style);
    }
    bar.set_message(what.to_string());
    bar
}

/// Layer values whose ranges calibration records, in output order after
/// the layer's own three outputs.
const OBSERVED: [&str; 8] =
    ["attn_norm", "attn_out", "moe_norm", "experts_act", "shared_act", "k_rope", "v_heads", "expert_ids"];

/// Runs the float model over `prompts` and records the ranges (no
/// calibration balance).
pub fn calibrate(ckpt: &Checkpoint, prompts: &[Vec<i64>]) -> Result<Calibration> {
    calibrate_with(ckpt, prompts, None)
}

/// Which statistics one calibration prompt contributes.
#[derive(Clone, Copy, PartialEq)]
enum Record {
    /// Every range (a prompt of the calibration set).
    All,
    /// Only the routed statistics of experts still below the balance
    /// target (an extra prompt of the balance pass).
    StarvedExperts,
}

/// [`calibrate`], optionally with expert-level calibration balance of
/// ratio `balance` (see [`Techniques::balance`]). Extra balance prompts are
/// deterministic pseudo-random token sequences: a calibration file cannot
/// be extended, and the routed statistics only need tokens that reach the
/// starved experts.
pub fn calibrate_with(ckpt: &Checkpoint, prompts: &[Vec<i64>], balance: Option<f32>) -> Result<Calibration> {
    let cfg = ckpt.config();
    let dtype_of = |name: &str| ckpt.tensor_info(name).map(|(d, _, _)| d).unwrap_or(DType::BF16);
    let mut module = build_module(cfg, &dtype_of)?;
    // The layer function also returns the values calibration observes; only
    // the layer function is run, so the entry's call sites are not updated.
    let layer = module.functions.get_mut(LAYER_FN).context("no decoder layer function")?;
    for name in OBSERVED {
        let v = layer.values.iter().position(|v| v.name == name).with_context(|| format!("no value %{name}"))?;
        layer.outputs.push(panguc_ir::ValueId(v as u32));
    }
    let interp = Interpreter::new(&module, ckpt);
    let embed = ckpt.load_f32("model.embed_tokens.weight", &[cfg.vocab_size, cfg.hidden_size])?;
    let tokens: usize = prompts.iter().map(Vec::len).sum();
    let mut cal = Calibration {
        expert_tokens: vec![vec![0; cfg.num_experts]; cfg.num_hidden_layers],
        tokens,
        ..Calibration::default()
    };
    if let Some(r) = balance {
        anyhow::ensure!(r > 0.0, "the calibration balance ratio must be positive, got {r}");
        let share = r as f64 * cfg.num_experts_per_tok as f64 * tokens as f64 / cfg.num_experts.max(1) as f64;
        cal.balance_target = Some((share.ceil() as usize).max(1));
    }
    let bar = progress(prompts.len(), "calibration");
    for prompt in prompts {
        anyhow::ensure!(!prompt.is_empty(), "an empty calibration prompt");
        run_prompt(&interp, cfg, &embed, prompt, &mut cal, Record::All)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    if let Some(target) = cal.balance_target {
        let budget = BALANCE_EXTRA_TOKENS * tokens;
        let starved = |cal: &Calibration| cal.expert_tokens.iter().flatten().any(|&n| n < target);
        let bar = progress(budget.div_ceil(BALANCE_PROMPT_LEN), "calibration balance");
        let mut seed = 0x5EED_BA1A_u64;
        while starved(&cal) && cal.extra_tokens + BALANCE_PROMPT_LEN <= budget {
            let prompt = pseudo_random_tokens(&mut seed, BALANCE_PROMPT_LEN, cfg.vocab_size);
            run_prompt(&interp, cfg, &embed, &prompt, &mut cal, Record::StarvedExperts)?;
            cal.extra_prompts += 1;
            cal.extra_tokens += prompt.len();
            bar.inc(1);
        }
        bar.finish_and_clear();
    }
    Ok(cal)
}

/// `len` pseudo-random token ids in `0..vocab` from the LCG state `seed`.
pub fn pseudo_random_tokens(seed: &mut u64, len: usize, vocab: usize) -> Vec<i64> {
    (0..len)
        .map(|_| {
            *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((*seed >> 33) % vocab.max(1) as u64) as i64
        })
        .collect()
}

/// One prefill of `prompt` through the float layers, recording what `what` asks for.
fn run_prompt(
    interp: &Interpreter,
    cfg: &PanguConfig,
    embed: &Tensor,
    prompt: &[i64],
    cal: &mut Calibration,
    what: Record,
) -> Result<()> {
    let (h, d, kvh) = (cfg.hidden_size, cfg.head_dim(), cfg.num_key_value_heads);
    let n = prompt.len();
    let mut rows = Vec::with_capacity(n * h);
    for &id in prompt {
        anyhow::ensure!(id >= 0 && (id as usize) < cfg.vocab_size, "calibration token {id} is outside the vocabulary");
        rows.extend_from_slice(&embed.as_f32()[id as usize * h..(id as usize + 1) * h]);
    }
    let mut x = Tensor::f32(vec![n, h], rows);
    let pos = Tensor::i64(vec![n], (0..n as i64).collect());
    let cos = rope_table(&pos, RopeKind::Cos, cfg.rope_theta, d);
    let sin = rope_table(&pos, RopeKind::Sin, cfg.rope_theta, d);
    let empty = Tensor::zeros(vec![0, kvh, d]);
    for l in 0..cfg.num_hidden_layers {
        let prefix = format!("model.layers.{l}.");
        let outs =
            interp.run(LAYER_FN, &prefix, &[x, pos.clone(), cos.clone(), sin.clone(), empty.clone(), empty.clone()])?;
        if what == Record::All {
            record_layer(cal, cfg, l, &outs[3..]);
        }
        record_routed(cal, cfg, l, &outs[3..]);
        x = outs[0].clone();
    }
    Ok(())
}

/// The routed statistics of layer `l`: for each token and each expert it
/// is routed to, the MoE norm output's per-channel max |x| and the expert's
/// down-projection input range, while the expert is below the balance cap.
fn record_routed(cal: &mut Calibration, cfg: &PanguConfig, l: usize, seen: &[Tensor]) {
    let [_, _, moe_in, experts_act, .., ids] = seen else { unreachable!("OBSERVED has 8 values") };
    let (h, groups) = (cfg.hidden_size, ids.shape[1]);
    let tokens = moe_in.numel() / h.max(1);
    let inter = experts_act.numel() / (cfg.num_experts * tokens).max(1);
    for (t, row) in moe_in.as_f32().chunks(h).enumerate() {
        for &e in &ids.as_i64()[t * groups..(t + 1) * groups] {
            let e = e as usize;
            let count = &mut cal.expert_tokens[l][e];
            if cal.balance_target.is_some_and(|cap| *count >= cap) {
                continue;
            }
            *count += 1;
            let amax = cal.routed_amax.entry((l, e)).or_insert_with(|| vec![0.0; h]);
            for (m, x) in amax.iter_mut().zip(row) {
                *m = m.max(x.abs());
            }
            let act = &experts_act.as_f32()[(e * tokens + t) * inter..(e * tokens + t + 1) * inter];
            cal.routed_down.entry((l, e)).or_insert_with(Range::empty).add(act);
        }
    }
}

fn record_layer(cal: &mut Calibration, cfg: &PanguConfig, l: usize, seen: &[Tensor]) {
    let p = format!("model.layers.{l}.");
    let mut add = |module: String, v: &[f32]| cal.inputs.entry(module).or_insert_with(Range::empty).add(v);
    let [attn_in, o_in, moe_in, experts_act, shared_act, k, v, _ids] = seen else {
        unreachable!("OBSERVED has 8 values")
    };
    for proj in ["q_proj", "k_proj", "v_proj"] {
        add(format!("{p}self_attn.{proj}"), attn_in.as_f32());
    }
    add(format!("{p}self_attn.o_proj"), o_in.as_f32());
    add(format!("{p}mlp.gate"), moe_in.as_f32());
    for proj in ["gate_proj", "up_proj"] {
        add(format!("{p}mlp.shared_expert.{proj}"), moe_in.as_f32());
        for e in 0..cfg.num_experts {
            add(format!("{p}mlp.experts.{e}.{proj}"), moe_in.as_f32());
        }
    }
    add(format!("{p}mlp.shared_expert.down_proj"), shared_act.as_f32());
    // The dense import runs every expert on every token: each expert's down
    // projection input is its own slice of experts_act [E, T, I].
    let per_expert = experts_act.numel() / cfg.num_experts.max(1);
    for e in 0..cfg.num_experts {
        add(format!("{p}mlp.experts.{e}.down_proj"), &experts_act.as_f32()[e * per_expert..(e + 1) * per_expert]);
    }
    let h = cfg.hidden_size;
    for (norm, x) in [("input_layernorm", attn_in), ("post_attention_layernorm", moe_in)] {
        let entry = cal.norm_channels.entry(format!("{p}{norm}.weight"));
        let (lo, hi) = entry.or_insert_with(|| (vec![f32::INFINITY; h], vec![f32::NEG_INFINITY; h]));
        for row in x.as_f32().chunks(h) {
            for j in 0..h {
                lo[j] = lo[j].min(row[j]);
                hi[j] = hi[j].max(row[j]);
            }
        }
    }
    let kv_dim = cfg.kv_dim();
    let amax = cal.kv_amax.entry(l).or_insert_with(|| [vec![0.0; kv_dim], vec![0.0; kv_dim]]);
    for (slot, t) in [k, v].into_iter().enumerate() {
        for row in t.as_f32().chunks(kv_dim) {
            for (m, x) in amax[slot].iter_mut().zip(row) {
                *m = m.max(x.abs());
            }
        }
    }
}

/// True for the linear modules this writer quantizes: the router only
/// without router protection.
pub(crate) fn quantized_module(module: &str, t: &Techniques) -> bool {
    module.contains(".self_attn.")
        || module.contains(".mlp.experts.")
        || module.contains(".mlp.shared_expert.")
        || (!t.router_protect && module.ends_with(".mlp.gate"))
}

/// `model.layers.L.mlp.experts.E.down_proj` -> (L, E).
fn expert_down(module: &str) -> Option<(usize, usize)> {
    let rest = module.strip_prefix("model.layers.")?.strip_suffix(".down_proj")?;
    let (l, e) = rest.split_once(".mlp.experts.")?;
    Some((l.parse().ok()?, e.parse().ok()?))
}

/// Symmetric per-channel int8: `scale[n] = max_k |w[n, k]| / 127` (1 for an
/// all-zero row), `q = round(w / scale)`.
pub fn quantize_weight(w: &[f32], n: usize, k: usize) -> (Vec<i64>, Vec<f32>) {
    let mut q = Vec::with_capacity(n * k);
    let mut scales = Vec::with_capacity(n);
    for row in w.chunks(k).take(n) {
        let amax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let s = if amax > 0.0 { amax / 127.0 } else { 1.0 };
        scales.push(s);
        q.extend(row.iter().map(|&v| quantize_value(v / s)));
    }
    (q, scales)
}

/// Asymmetric per-tensor activation quantization covering `r` (and 0):
/// `scale = (max - min) / 255`, `offset = round(-128 - min / scale)`.
pub fn activation_params(r: Range) -> (f32, f32) {
    let (lo, hi) = (r.min.min(0.0), r.max.max(0.0));
    let scale = if hi > lo { (hi - lo) / 255.0 } else { 1.0 };
    let offset = (-128.0 - lo / scale).round_ties_even().clamp(-128.0, 127.0);
    (scale, offset)
}

/// Per-channel smoothing factors of each norm (by norm weight name) and
/// the norm each smoothed linear reads (by weight name).
#[derive(Debug, Default)]
pub struct Smoothing {
    pub factors: HashMap<String, Vec<f32>>,
    pub consumers: HashMap<String, String>,
}

/// Column-wise max |W[:, j]| over the rows of several `[n, h]` weights.
fn column_amax(ws: &[Tensor], h: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; h];
    for w in ws {
        for row in w.as_f32().chunks(h) {
            for (m, x) in out.iter_mut().zip(row) {
                *m = m.max(x.abs());
            }
        }
    }
    out
}

/// `max|x_j|^a / max|W[:, j]|^(1-a)`, 1 where either side is zero.
fn smooth_term(x: &[f32], w: &[f32], alpha: f32) -> Vec<f32> {
    x.iter().zip(w).map(|(&x, &w)| if x > 0.0 && w > 0.0 { x.powf(alpha) / w.powf(1.0 - alpha) } else { 1.0 }).collect()
}

/// Channel-wise `a = max(a, b)`.
fn max_into(a: &mut [f32], b: &[f32]) {
    a.iter_mut().zip(b).for_each(|(a, b)| *a = a.max(*b));
}

/// Expert-aware smoothing aggregation (docs/quantization.md): one vector
/// per norm, the channel-wise max of the terms of every linear it feeds —
/// q/k/v behind the input norm; the router and the shared expert (all
/// tokens) and each routed expert (only its routed tokens) behind the
/// post-attention norm.
pub fn smoothing(ckpt: &Checkpoint, cal: &Calibration, alpha: f32) -> Result<Smoothing> {
    let c = ckpt.config();
    let h = c.hidden_size;
    let load = |name: &str, n: usize| ckpt.load_f32(name, &[n, h]);
    let mut sm = Smoothing::default();
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}.");
        let amax_of = |norm: &str| -> Result<Vec<f32>> {
            let (lo, hi) = cal.norm_channels.get(norm).with_context(|| format!("no calibration data for `{norm}`"))?;
            Ok(lo.iter().zip(hi).map(|(a, b)| a.abs().max(b.abs())).collect())
        };
        let attn_norm = format!("{p}input_layernorm.weight");
        let qkv: Vec<(String, usize)> = [("q_proj", c.q_dim()), ("k_proj", c.kv_dim()), ("v_proj", c.kv_dim())]
            .iter()
            .map(|(proj, n)| (format!("{p}self_attn.{proj}.weight"), *n))
            .collect();
        let ws = qkv.iter().map(|(n, rows)| load(n, *rows)).collect::<Result<Vec<_>>>()?;
        sm.factors.insert(attn_norm.clone(), smooth_term(&amax_of(&attn_norm)?, &column_amax(&ws, h), alpha));
        for (n, _) in qkv {
            sm.consumers.insert(n, attn_norm.clone());
        }

        let moe_norm = format!("{p}post_attention_layernorm.weight");
        let x = amax_of(&moe_norm)?;
        let router = format!("{p}mlp.gate.weight");
        let mut s = smooth_term(&x, &column_amax(&[load(&router, c.num_experts)?], h), alpha);
        let mut consumers = vec![router];
        let gate_up = |prefix: &str, rows: usize| -> Result<(Vec<String>, Vec<f32>)> {
            let names: Vec<String> = ["gate_proj", "up_proj"].iter().map(|q| format!("{prefix}.{q}.weight")).collect();
            let ws = names.iter().map(|n| load(n, rows)).collect::<Result<Vec<_>>>()?;
            Ok((names, column_amax(&ws, h)))
        };
        let (names, wmax) = gate_up(&format!("{p}mlp.shared_expert"), c.shared_expert_intermediate_size)?;
        max_into(&mut s, &smooth_term(&x, &wmax, alpha));
        consumers.extend(names);
        for e in 0..c.num_experts {
            let (names, wmax) = gate_up(&format!("{p}mlp.experts.{e}"), c.moe_intermediate_size)?;
            consumers.extend(names);
            // An expert no calibration token reached contributes no term.
            if let Some(xe) = cal.routed_amax.get(&(l, e)) {
                max_into(&mut s, &smooth_term(xe, &wmax, alpha));
            }
        }
        sm.factors.insert(moe_norm.clone(), s);
        for n in consumers {
            sm.consumers.insert(n, moe_norm.clone());
        }
    }
    Ok(sm)
}

impl Smoothing {
    /// Folds the factors into a float tensor (exact in float): a smoothed
    /// norm's weight is divided by `s`, each consumer's input column `j`
    /// multiplied by `s_j`.
    fn apply(&self, name: &str, values: &mut [f32]) {
        if let Some(s) = self.factors.get(name) {
            values.iter_mut().zip(s).for_each(|(v, s)| *v /= s);
        } else if let Some(s) = self.consumers.get(name).and_then(|norm| self.factors.get(norm)) {
            for row in values.chunks_mut(s.len()) {
                row.iter_mut().zip(s).for_each(|(v, s)| *v *= s);
            }
        }
    }

    /// The per-tensor input range of a smoothed linear: the norm output's
    /// per-channel ranges divided by the factors.
    fn input_range(&self, weight: &str, cal: &Calibration) -> Option<Range> {
        let norm = self.consumers.get(weight)?;
        let (s, (lo, hi)) = (self.factors.get(norm)?, cal.norm_channels.get(norm)?);
        let mut r = Range::empty();
        for j in 0..s.len() {
            r.add(&[lo[j] / s[j], hi[j] / s[j]]);
        }
        Some(r)
    }
}

/// One tensor to write.
struct Out {
    dtype: DType,
    shape: Vec<usize>,
    bytes: Vec<u8>,
    quant: QuantType,
}

fn f32_out(values: &[f32], shape: Vec<usize>, quant: QuantType) -> Result<Out> {
    Ok(Out { dtype: DType::F32, shape, bytes: crate::frontend::convert::from_f32(values, DType::F32)?, quant })
}

fn int_out(values: &[i64], dtype: DType, shape: Vec<usize>, quant: QuantType) -> Result<Out> {
    Ok(Out { dtype, shape, bytes: from_i64(values, dtype)?, quant })
}

/// What was written.
#[derive(Debug, Clone)]
pub struct QuantizeSummary {
    pub quantized_modules: usize,
    pub tensors: usize,
    pub bytes_by_dtype: BTreeMap<String, u64>,
}

/// Whether `opts` needs a calibration pass.
pub fn needs_calibration(opts: &QuantizeOptions) -> bool {
    opts.scheme == Scheme::W8A8 || opts.kv_int8 || opts.smooth_alpha.is_some()
}

/// Writes the quantized checkpoint of `ckpt` into `out` (an empty or new
/// directory): config.json (and tokenizer) copied, the description, one
/// safetensors file. Router kept float, no calibration balance
/// ([`Techniques::PLAIN`]); see [`write_quantized_with`].
pub fn write_quantized(ckpt: &Checkpoint, out: &Path, opts: &QuantizeOptions) -> Result<QuantizeSummary> {
    let needs_calib = needs_calibration(opts);
    if needs_calib && opts.calib.is_empty() {
        bail!("static W8A8, the int8 KV cache and smoothing need calibration prompts");
    }
    let cal = if needs_calib { calibrate(ckpt, &opts.calib)? } else { Calibration::default() };
    write_quantized_with(ckpt, out, opts, &Techniques::PLAIN, &cal)
}

/// [`write_quantized`] with the given techniques and a calibration already
/// run ([`calibrate_with`]; `Calibration::default()` when
/// [`needs_calibration`] is false).
pub fn write_quantized_with(
    ckpt: &Checkpoint,
    out: &Path,
    opts: &QuantizeOptions,
    techniques: &Techniques,
    cal: &Calibration,
) -> Result<QuantizeSummary> {
    if ckpt.quant().is_some() {
        bail!("{} is already quantized ({DESCRIPTION_FILE} exists)", ckpt.dir().display());
    }
    anyhow::ensure!(ckpt.has_weights(), "{} has no weights to quantize", ckpt.dir().display());
    if needs_calibration(opts) && cal.tokens == 0 {
        bail!("static W8A8, the int8 KV cache and smoothing need calibration prompts");
    }
    let smooth = match opts.smooth_alpha {
        Some(alpha) => smoothing(ckpt, cal, alpha)?,
        None => Smoothing::default(),
    };
    let cfg = ckpt.config();
    // fp16 models store deq_scale as int64 words holding the f32 bits.
    let encode_deq = cfg.torch_dtype.as_deref() == Some("float16");
    let qtype = opts.scheme.quant_type();
    let mut tensors: BTreeMap<String, Out> = BTreeMap::new();
    let mut quantized_modules = 0;
    for spec in cfg.expected_tensors() {
        let TensorSpec { name, shape } = &spec;
        let module = crate::frontend::quant::linear_module(name, shape).filter(|m| quantized_module(m, techniques));
        let Some(module) = module else {
            let bias_of_static = name.strip_suffix(".bias").is_some_and(|m| quantized_module(m, techniques))
                && opts.scheme == Scheme::W8A8;
            if !bias_of_static {
                let (dtype, _, _) =
                    ckpt.tensor_info(name).with_context(|| format!("tensor `{name}` has no IR dtype"))?;
                let bytes = if smooth.factors.contains_key(name) || smooth.consumers.contains_key(name) {
                    let mut v = ckpt.load_f32(name, shape)?.into_f32();
                    smooth.apply(name, &mut v);
                    crate::frontend::convert::from_f32(&v, dtype)?
                } else {
                    ckpt.tensor_bytes(name)?.to_vec()
                };
                tensors.insert(name.clone(), Out { dtype, shape: shape.clone(), bytes, quant: QuantType::Float });
            }
            continue;
        };
        quantized_modules += 1;
        let (n, k) = (shape[0], shape[1]);
        let mut w = ckpt.load_f32(name, shape)?.into_f32();
        smooth.apply(name, &mut w);
        let (wq, ws) = quantize_weight(&w, n, k);
        let put = |t: &mut BTreeMap<String, Out>, suffix: &str, o: Out| t.insert(format!("{module}.{suffix}"), o);
        put(&mut tensors, "weight", int_out(&wq, DType::I8, vec![n, k], qtype)?);
        put(&mut tensors, "weight_scale", f32_out(&ws, vec![n, 1], qtype)?);
        put(&mut tensors, "weight_offset", f32_out(&vec![0.0; n], vec![n, 1], qtype)?);
        if opts.scheme == Scheme::W8A8 {
            // An expert's down projection: the range over its routed tokens
            // when calibration routed any to it.
            let routed = expert_down(module).and_then(|le| cal.routed_down.get(&le).copied());
            let range = smooth.input_range(name, cal).or(routed).or_else(|| cal.inputs.get(module).copied());
            let range = range.with_context(|| format!("no calibration data for `{module}`"))?;
            let (s, o) = activation_params(range);
            let deq: Vec<f32> = ws.iter().map(|w| s * w).collect();
            let bias_name = format!("{module}.bias");
            let bias = if ckpt.has_tensor(&bias_name) { Some(ckpt.load_f32(&bias_name, &[n])?) } else { None };
            let mut qb = Vec::with_capacity(n);
            for (r, row) in wq.chunks(k).enumerate() {
                let b = bias.as_ref().map_or(0.0, |b| b.as_f32()[r]);
                let row_sum: i64 = row.iter().sum();
                let v = (b as f64 / deq[r] as f64 - o as f64 * row_sum as f64).round_ties_even();
                if v.abs() > i32::MAX as f64 {
                    bail!("quant_bias of `{module}` row {r} ({v}) does not fit int32");
                }
                qb.push(v as i64);
            }
            put(&mut tensors, "input_scale", f32_out(&[s], vec![1], qtype)?);
            put(&mut tensors, "input_offset", f32_out(&[o], vec![1], qtype)?);
            put(&mut tensors, "quant_bias", int_out(&qb, DType::I32, vec![n], qtype)?);
            let deq_out = if encode_deq {
                let words: Vec<i64> = deq.iter().map(|d| d.to_bits() as i64).collect();
                int_out(&words, DType::I64, vec![n], qtype)?
            } else {
                f32_out(&deq, vec![n], qtype)?
            };
            put(&mut tensors, "deq_scale", deq_out);
        }
    }
    if opts.kv_int8 {
        for l in 0..cfg.num_hidden_layers {
            let amax = cal.kv_amax.get(&l).with_context(|| format!("no KV calibration data for layer {l}"))?;
            for (proj, a) in ["k_proj", "v_proj"].iter().zip(amax) {
                let scale: Vec<f32> = a.iter().map(|m| if *m > 0.0 { m / 127.0 } else { 1.0 }).collect();
                let p = format!("model.layers.{l}.self_attn.{proj}");
                tensors.insert(format!("{p}.kv_cache_scale"), f32_out(&scale, vec![scale.len()], QuantType::C8)?);
                let zeros = vec![0.0; scale.len()];
                tensors.insert(format!("{p}.kv_cache_offset"), f32_out(&zeros, vec![zeros.len()], QuantType::C8)?);
            }
        }
    }
    write_files(ckpt, out, opts, &tensors)?;
    let mut bytes_by_dtype = BTreeMap::new();
    for t in tensors.values() {
        *bytes_by_dtype.entry(t.dtype.name().to_string()).or_insert(0) += t.bytes.len() as u64;
    }
    Ok(QuantizeSummary { quantized_modules, tensors: tensors.len(), bytes_by_dtype })
}

fn write_files(ckpt: &Checkpoint, out: &Path, opts: &QuantizeOptions, tensors: &BTreeMap<String, Out>) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    std::fs::copy(ckpt.config_path(), out.join(crate::frontend::CONFIG_FILE))
        .with_context(|| format!("cannot copy {} into {}", ckpt.config_path().display(), out.display()))?;
    let tokenizer = ckpt.dir().join(panguc_runtime::tokenizer::SENTENCEPIECE_FILE);
    if tokenizer.is_file() {
        std::fs::copy(&tokenizer, out.join(panguc_runtime::tokenizer::SENTENCEPIECE_FILE))
            .with_context(|| format!("cannot copy {}", tokenizer.display()))?;
    }
    let views = tensors
        .iter()
        .map(|(name, t)| {
            safetensors::tensor::TensorView::new(st_dtype(t.dtype), t.shape.clone(), &t.bytes)
                .map(|v| (name.as_str(), v))
                .with_context(|| format!("tensor {name} has the wrong number of bytes"))
        })
        .collect::<Result<Vec<_>>>()?;
    let file = out.join(opts.scheme.weight_file());
    safetensors::serialize_to_file(views, None, &file).with_context(|| format!("cannot write {}", file.display()))?;
    let mut desc = serde_json::Map::new();
    desc.insert("model_quant_type".into(), opts.scheme.quant_type().name().into());
    if opts.kv_int8 {
        desc.insert("kv_cache_type".into(), "C8".into());
    }
    desc.insert("version".into(), "1.0.0".into());
    for (name, t) in tensors {
        desc.insert(name.clone(), t.quant.name().into());
    }
    let path = out.join(DESCRIPTION_FILE);
    let text = serde_json::to_string_pretty(&serde_json::Value::Object(desc))? + "\n";
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))
}
