//! `panguc bench --quant SCHEME [--kv-int8]`: the same `small` checkpoint
//! quantized (`panguc quantize`'s path: synthetic calibration prompts,
//! smoothing, the router kept float, no report), compiled and measured in
//! the same run as bf16 with the same drivers (`bench_batch`): decode at
//! batch 1 after 8 tokens, batched decode at context 512 and the batched
//! 512-token prefill, each against its own roofline (int8 weights and
//! their scales, the KV cache in its dtype; int8 work at the int8
//! dot-product peak), and the ratios to the bf16 figures of the run.

use crate::bench::{compile_package, Fuse, PROFILE_ENV};
use crate::bench_batch::{
    batched_decode, batched_prefill, decode_step_seconds, profile_lines, BatchedDecode, Peaks, StepCost, BATCH_CONTEXT,
    PREFILL_SEQS,
};
use crate::quantize::{QuantizeOptions, Scheme, Techniques};
use anyhow::{Context, Result};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// What `--quant` asks for.
#[derive(Debug, Clone)]
pub struct QuantBenchOptions {
    pub scheme: Scheme,
    /// Quantize the KV cache too (C8).
    pub kv_int8: bool,
    /// Synthetic calibration prompts (32 tokens each) of the quantization.
    pub calib_prompts: usize,
}

/// Smoothing strength of the benchmark's quantization (`panguc quantize`'s default).
const SMOOTH_ALPHA: f32 = 0.6;
/// Tokens per synthetic calibration prompt (as `--calib-synthetic`).
const CALIB_LEN: usize = 32;
/// Written last into a quantized checkpoint of the bench: what it was made
/// from and how. A checkpoint without it, or with another key, is redone.
const KEY_FILE: &str = "bench_quant_key.json";

/// The bf16 figures of the same run that the quantized ones are compared with.
pub struct Bf16Figures<'a> {
    /// Decode at batch 1 after 8 tokens, all threads.
    pub decode_tok_per_s: f64,
    pub prefill_512_tok_per_s: f64,
    pub batched: &'a [BatchedDecode],
    pub program: &'a panguc_ir::kernel::KernelProgram,
}

/// The JSON prefix of a scheme's figures: `w8a8_dynamic`, `w8a8`.
pub fn prefix(scheme: Scheme) -> String {
    scheme.quant_type().name().to_lowercase()
}

/// Where the quantized checkpoint and its package live, beside the bf16 ones.
fn dirs(checkpoint: &Path, work_dir: &Path, q: &QuantBenchOptions) -> (PathBuf, PathBuf) {
    let name = format!("small-{}{}", prefix(q.scheme), if q.kv_int8 { "-kv-int8" } else { "" });
    (checkpoint.with_file_name(&name), work_dir.with_file_name(format!("{name}-package")))
}

/// The cache key of a quantized checkpoint made from `source` with `q`.
fn cache_key(source: &Path, q: &QuantBenchOptions) -> Value {
    json!({
        "source": source.display().to_string(),
        "scheme": q.scheme.quant_type().name(),
        "kv_int8": q.kv_int8,
        "calib_synthetic": q.calib_prompts,
        "calib_len": CALIB_LEN,
        "smooth_alpha": SMOOTH_ALPHA,
    })
}

/// The quantized checkpoint of `source` in `out`: reused when its key
/// matches, else (re)written. Returns the seconds spent quantizing (0 when
/// reused).
fn ensure_quantized(source: &Path, out: &Path, q: &QuantBenchOptions, say: &dyn Fn(String)) -> Result<f64> {
    let key = cache_key(source, q);
    let stored = std::fs::read_to_string(out.join(KEY_FILE)).ok().and_then(|t| serde_json::from_str::<Value>(&t).ok());
    if stored.as_ref() == Some(&key) {
        return Ok(0.0);
    }
    say(format!(
        "quantizing {} into {} ({}, {} synthetic calibration prompts{}) ...",
        source.display(),
        out.display(),
        q.scheme.quant_type().name(),
        q.calib_prompts,
        if q.kv_int8 { ", int8 KV cache" } else { "" }
    ));
    if out.exists() {
        std::fs::remove_dir_all(out).with_context(|| format!("removing {}", out.display()))?;
    }
    let t0 = Instant::now();
    let ckpt = crate::commands::open_checkpoint(source, false)?;
    let calib = crate::commands::synthetic_prompts(q.calib_prompts, CALIB_LEN, ckpt.config().vocab_size);
    let opts = QuantizeOptions { scheme: q.scheme, kv_int8: q.kv_int8, calib, smooth_alpha: Some(SMOOTH_ALPHA) };
    // Balance would run extra prompts; it changes statistics, not speed.
    let techniques = Techniques { router_protect: true, balance: None };
    let cal = crate::quantize::calibrate_with(&ckpt, &opts.calib, techniques.balance)?;
    crate::quantize::write_quantized_with(&ckpt, out, &opts, &techniques, &cal)?;
    std::fs::write(out.join(KEY_FILE), serde_json::to_string_pretty(&key)? + "\n")
        .with_context(|| format!("writing {}", out.join(KEY_FILE).display()))?;
    Ok(t0.elapsed().as_secs_f64())
}

const GB: f64 = 1e9;
const MB: f64 = 1e6;

/// Quantize (or reuse), compile and measure; print the report lines with
/// `say` and add the figures to `json` under [`prefix`].
#[allow(clippy::too_many_arguments)]
pub fn run_quant_bench(
    opts: &crate::bench::BenchOptions,
    q: &QuantBenchOptions,
    fuse: Fuse,
    peaks: &Peaks,
    bf16: &Bf16Figures,
    threads: usize,
    say: &dyn Fn(String),
    json: &mut Map<String, Value>,
) -> Result<()> {
    let (qdir, qwork) = dirs(&opts.checkpoint, &opts.work_dir, q);
    let quantize_s = ensure_quantized(&opts.checkpoint, &qdir, q, say)?;
    let (_, compile_s, _) = compile_package(&qdir, &qwork, fuse)?;
    let pkg = Arc::new(panguc_runtime::open_package(&qwork)?);
    let program = pkg.program();
    let groups = pkg.config().num_groups();
    let profile = std::env::var_os(PROFILE_ENV).is_some();
    let mut profiles: Vec<(String, Vec<String>)> = vec![];

    // Decode at batch 1 after 8 tokens (as bf16's `decode.tok_per_s`).
    let context = 8;
    let one = decode_step_seconds(&pkg, threads, 1, context, opts.decode_tokens, profile)?;
    if let Some(k) = &one.kernels {
        profiles
            .push((format!("decode, batch 1, {threads} threads"), profile_lines(k, opts.decode_tokens, one.seconds)));
    }
    let num_blocks = (context + opts.decode_tokens + 1).div_ceil(one.meta.block_size);
    let one_cost = StepCost::of(program, &one.meta, groups, num_blocks);
    let one_roof = one_cost.roofline_seconds(peaks);
    let batched = batched_decode(&pkg, threads, opts.batch_decode_steps, peaks, profile)?;
    for d in &batched {
        if let Some(lines) = &d.profile {
            profiles.push((format!("batched decode, batch {}, context {BATCH_CONTEXT}", d.batch), lines.clone()));
        }
    }
    let (pt, prefill_cost) = batched_prefill(&pkg, threads)?;

    let name = q.scheme.quant_type().name();
    let p = prefix(q.scheme);
    let mut put = |k: &str, v: Value| {
        json.insert(format!("{p}.{k}"), v);
    };
    let cache = if q.kv_int8 { "int8 KV cache" } else { "float KV cache" };
    say(format!(
        "{name} ({cache}), tier {}: quantized in {quantize_s:.1} s{}, compiled in {compile_s:.1} s; {} launches per step, {:.0} MB of weights mapped",
        pkg.tier(),
        if quantize_s == 0.0 { " (cached)" } else { "" },
        program.launches.len(),
        pkg.mapped_bytes() as f64 / MB
    ));
    say(format!(
        "  roofline = max(step bytes (int8 weights + scales + KV) / {:.1} GB/s, float FLOPs / {:.1} GFLOP/s + int8 ops / {:.1} GOP/s)",
        peaks.bandwidth / GB,
        peaks.flops / GB,
        peaks.int8_ops.unwrap_or(peaks.flops) / GB
    ));
    let tps = 1.0 / one.seconds;
    say(format!(
        "  decode, batch 1 (prompt {context}, {} new tokens, {threads} threads): {tps:.2} tok/s ({:.2} ms/token) = {:.2}x bf16 (target >= 1.8); {:.1} MB per step, roofline {:.2} ms = {:.2} of it (target >= 0.8)",
        opts.decode_tokens,
        one.seconds * 1e3,
        tps / bf16.decode_tok_per_s,
        one_cost.bytes.total() as f64 / MB,
        one_roof * 1e3,
        one_roof / one.seconds
    ));
    put("tier", pkg.tier().into());
    put("kv_int8", q.kv_int8.into());
    put("quantize_s", quantize_s.into());
    put("compile_s", compile_s.into());
    put("decode.tok_per_s", tps.into());
    put("decode.roofline_fraction", (one_roof / one.seconds).into());
    put("decode.speedup_over_bf16", (tps / bf16.decode_tok_per_s).into());
    say(format!("  batched decode (context {BATCH_CONTEXT} each, {threads} threads):"));
    for (d, b16) in batched.iter().zip(bf16.batched) {
        let (b, t) = (d.batch, d.seconds);
        let speedup = d.tokens_per_s() / b16.tokens_per_s();
        say(format!(
            "    batch {b:>2}: {:>8.1} tok/s ({:.1} ms/step; {:.0} MB of which KV {:.1} MB, {:.2} GOP int8 + {:.2} GFLOP float per step); {speedup:.2}x bf16; roofline {:.2} ms = {:.2} of it (target >= 0.8)",
            d.tokens_per_s(),
            t * 1e3,
            d.cost.bytes.total() as f64 / MB,
            d.cost.bytes.kv as f64 / MB,
            d.cost.int8_ops / GB,
            d.cost.flops / GB,
            d.roofline * 1e3,
            d.roofline / t
        ));
        put(&format!("decode.batch_{b}.tokens_per_s"), d.tokens_per_s().into());
        put(&format!("decode.batch_{b}.roofline_fraction"), (d.roofline / t).into());
        put(&format!("decode.batch_{b}.speedup_over_bf16"), speedup.into());
        put(&format!("decode.batch_{b}.kv_bytes_per_step"), d.cost.bytes.kv.into());
        put(&format!("decode.batch_{b}.kv_bytes_per_step_bf16"), b16.cost.bytes.kv.into());
    }
    if let (Some(d), Some(b16)) = (batched.last(), bf16.batched.last()) {
        let ratio = d.cost.bytes.kv as f64 / b16.cost.bytes.kv.max(1) as f64;
        let dtype = |p: &panguc_ir::kernel::KernelProgram| {
            p.caches.first().map(|c| p.buffer(*c).dtype.name().to_string()).unwrap_or_default()
        };
        say(format!(
            "  KV bytes per step at batch {}: {:.1} MB ({} cache) vs the bf16 package's {:.1} MB ({} cache) = {ratio:.2}{}",
            d.batch,
            d.cost.bytes.kv as f64 / MB,
            dtype(program),
            b16.cost.bytes.kv as f64 / MB,
            dtype(bf16.program),
            if q.kv_int8 { " (target <= 0.5)" } else { "" }
        ));
        put("decode.kv_bytes_ratio", ratio.into());
    }
    let ptokens = (PREFILL_SEQS * BATCH_CONTEXT) as f64;
    let ptps = ptokens / pt;
    let peak_fraction = prefill_cost.compute_seconds(peaks) / pt;
    say(format!(
        "  batched prefill ({PREFILL_SEQS} x {BATCH_CONTEXT} tokens in one step): {ptps:.1} tok/s ({pt:.2} s) = {:.2}x bf16 (target >= 2); {:.1} GOP/s int8 + {:.1} GFLOP/s float = {:.2} of the peaks",
        ptps / bf16.prefill_512_tok_per_s,
        prefill_cost.int8_ops / pt / GB,
        prefill_cost.flops / pt / GB,
        peak_fraction
    ));
    put("prefill_512.tokens_per_s", ptps.into());
    put("prefill_512.peak_fraction", peak_fraction.into());
    put("prefill_512.speedup_over_bf16", (ptps / bf16.prefill_512_tok_per_s).into());
    for (what, lines) in &profiles {
        say(format!("time per kernel, {name}, {what} ({PROFILE_ENV}):"));
        for l in lines {
            say(l.clone());
        }
    }
    Ok(())
}
