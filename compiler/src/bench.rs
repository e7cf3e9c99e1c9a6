//! The CPU benchmark (`panguc bench`, or `cargo bench -p panguc-tests`):
//! on the `small` synthetic checkpoint (bf16), in one run, decode tokens/s
//! at batch 1 for the interpreter, the compiled package on one thread and
//! on all cores, the memory roofline measured in the same run, prefill
//! tokens/s for a 512-token prompt with GEMM GFLOP/s against the measured
//! FMA peak, batched decode at batch 1, 4, 16 and 64 (context 512 each)
//! and a 4 x 512-token prefill in one step against each step's roofline
//! (see `bench_batch`), and peak resident memory. The package is the
//! batched (paged KV cache) one every CPU compile makes. It prints ratios;
//! nothing asserts on time.

use crate::bench_batch::{
    batched_decode, batched_prefill, decode_step_seconds, profile_lines, step_bytes, BatchedDecode, Peaks, StepDriver,
    BATCH_CONTEXT, PREFILL_SEQS,
};
use crate::frontend::Checkpoint;
use crate::synth::{synth_with, Preset, SynthOptions};
use anyhow::{Context, Result};
use panguc_ir::kernel::{KernelKind, KernelProgram};
use panguc_ir::shape::bindings;
use panguc_ir::{DType, Module};
use panguc_runtime::bench::{
    bf16_dot_peak_flops, disk_write_bandwidth, fma_peak_flops, int8_dot_peak_ops, load_average, peak_rss_bytes,
    reset_peak_rss, stream_read_bandwidth,
};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The `small` checkpoint; synthesized (bf16, seed 0) if missing.
    pub checkpoint: PathBuf,
    /// Where the package is written (replaced).
    pub work_dir: PathBuf,
    pub prompt_tokens: usize,
    pub decode_tokens: usize,
    pub interp_decode_tokens: usize,
    /// Also print one JSON object of every figure at the end.
    pub json: bool,
    /// Write that JSON object to this file (instead of stdout).
    pub json_file: Option<PathBuf>,
    /// Decode steps timed at each batch size of the batched decode.
    pub batch_decode_steps: usize,
    /// "All cores".
    pub threads: usize,
    /// Also quantize the checkpoint and measure it beside bf16 (`--quant`).
    pub quant: Option<crate::bench_quant::QuantBenchOptions>,
    /// Measure only the batched decode (and the bandwidth and peak it is
    /// compared with): a quick loop for tuning its kernels.
    pub batched_decode_only: bool,
}

impl BenchOptions {
    pub fn in_dir(dir: PathBuf) -> BenchOptions {
        BenchOptions {
            checkpoint: dir.join("small-bf16"),
            work_dir: dir.join("small-package"),
            prompt_tokens: 512,
            decode_tokens: 32,
            interp_decode_tokens: 3,
            json: false,
            json_file: None,
            batch_decode_steps: 8,
            threads: panguc_runtime::engine::default_threads(),
            quant: None,
            batched_decode_only: false,
        }
    }
}

/// Turns the batched import (ragged steps over a paged KV cache) into the
/// module to compile (the fusion pipeline, or the identity).
pub type Fuse<'a> = &'a dyn Fn(&Checkpoint, &Module) -> Result<Module>;

/// The fusion of `panguc compile`'s CPU packages with default options:
/// what `panguc bench` compiles.
pub fn pipeline_fuse(ckpt: &Checkpoint, imported: &Module) -> Result<Module> {
    crate::pipeline::fuse_batched(ckpt, imported, &crate::pipeline::PipelineOptions::default())
}

/// Set (to anything) to print where each decode measurement's step time
/// goes, per kernel (every launch is then timed).
pub const PROFILE_ENV: &str = "PANGUC_BENCH_PROFILE";

const GB: f64 = 1e9;
const MB: f64 = 1e6;

/// Run the benchmark and print its report.
pub fn run_bench(opts: &BenchOptions, fuse: Fuse) -> Result<()> {
    // One line of the text report: stdout, or stderr with `--json` (stdout
    // then holds the JSON object alone).
    let say =
        |line: String| if opts.json && opts.json_file.is_none() { eprintln!("{line}") } else { println!("{line}") };
    if !opts.checkpoint.join("config.json").is_file() {
        say(format!("synthesizing the small checkpoint in {} ...", opts.checkpoint.display()));
        synth_with(
            &opts.checkpoint,
            &SynthOptions { preset: Preset::Small, seed: 0, dtype: DType::BF16, force: true },
        )?;
    }
    let (module, compile_s, pack) = compile_package(&opts.checkpoint, &opts.work_dir, fuse)?;
    if opts.batched_decode_only {
        return run_batched_decode_only(opts, &say);
    }
    // The first, full verification (as at the end of `panguc compile`),
    // then an open that trusts the stamp. Files younger than the racy
    // margin are never stamped, so let it pass first.
    std::thread::sleep(panguc_runtime::stamp::RACY_MARGIN * 2);
    let t0 = Instant::now();
    panguc_runtime::stamp::verify_package_tree(&opts.work_dir, panguc_runtime::package::Verify::Full)?;
    let verify_s = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let pkg = Arc::new(panguc_runtime::open_package(&opts.work_dir)?);
    let open_s = t0.elapsed().as_secs_f64();
    let program = pkg.program();
    let threads = opts.threads.max(1);

    // Machine measurements, in this run.
    let stream_bytes = 1usize << 30;
    let bw1 = stream_read_bandwidth(stream_bytes, 1, 3);
    let bw = stream_read_bandwidth(stream_bytes, threads, 3);
    let peak1 = fma_peak_flops(1);
    let peak = fma_peak_flops(threads);
    let bf16_peak1 = bf16_dot_peak_flops(1);
    let bf16_peak = bf16_dot_peak_flops(threads);
    let int8_peak1 = int8_dot_peak_ops(1);
    let int8_peak = int8_dot_peak_ops(threads);
    let disk_dir = opts.work_dir.parent().unwrap_or(&opts.work_dir);
    let disk = disk_write_bandwidth(disk_dir, 1 << 30)
        .with_context(|| format!("measuring the disk write bandwidth in {}", disk_dir.display()))?;
    let pack_rate = pack.bytes as f64 / pack.seconds.max(1e-9);
    say(format!("== panguc CPU benchmark: small preset (bf16), kernel tier {} ==", pkg.tier()));
    say(format!(
        "package: compiled in {compile_s:.1} s; weights packed at {:.0} MB/s ({:.0} MB in {:.2} s) = {:.2} of the disk's sequential write {:.0} MB/s (synced; target >= 0.5)",
        pack_rate / MB,
        pack.bytes as f64 / MB,
        pack.seconds,
        pack_rate / disk,
        disk / MB
    ));
    say(format!(
        "package: full verification {verify_s:.2} s; open with the verification stamp {open_s:.3} s (target <= 0.1 s); {} kernels, {} launches per step, {:.0} MB of weights mapped",
        program.kernels.len(),
        program.launches.len(),
        pkg.mapped_bytes() as f64 / MB
    ));
    say(format!("memory: streaming read {:.1} GB/s on 1 thread, {:.1} GB/s on {threads} threads", bw1 / GB, bw / GB));
    say(format!(
        "compute: fp32 FMA peak {:.1} GFLOP/s on 1 thread, {:.1} GFLOP/s on {threads} threads",
        peak1 / GB,
        peak / GB
    ));
    match (bf16_peak1, bf16_peak) {
        (Some(p1), Some(p)) => say(format!(
            "compute: bf16 dot-product (vdpbf16ps) peak {:.1} GFLOP/s on 1 thread, {:.1} GFLOP/s on {threads} threads ({:.2}x the FMA peak)",
            p1 / GB,
            p / GB,
            p / peak
        )),
        _ => say("compute: no AVX-512 BF16 on this CPU".to_string()),
    }
    if let (Some((p1, name)), Some((p, _))) = (int8_peak1, int8_peak) {
        say(format!(
            "compute: int8 dot-product ({name}) peak {:.1} GOP/s on 1 thread, {:.1} GOP/s on {threads} threads ({:.2}x the FMA peak)",
            p1 / GB,
            p / GB,
            p / peak
        ));
    }
    let mut json = serde_json::Map::new();
    let mut put = |k: &str, v: serde_json::Value| {
        json.insert(k.to_string(), v);
    };
    put("machine.threads", threads.into());
    put("machine.stream_read_gb_per_s.1t", (bw1 / GB).into());
    put("machine.stream_read_gb_per_s", (bw / GB).into());
    put("machine.fma_peak_gflops.1t", (peak1 / GB).into());
    put("machine.fma_peak_gflops", (peak / GB).into());
    put("machine.bf16_dot_peak_gflops.1t", bf16_peak1.map(|p| p / GB).into());
    put("machine.bf16_dot_peak_gflops", bf16_peak.map(|p| p / GB).into());
    put("machine.int8_dot_peak_gops.1t", int8_peak1.map(|p| p.0 / GB).into());
    put("machine.int8_dot_peak_gops", int8_peak.map(|p| p.0 / GB).into());
    put("machine.int8_dot_instruction", int8_peak.map(|p| p.1).into());
    put("machine.disk_write_mb_per_s", (disk / MB).into());
    put("bf16.tier", pkg.tier().into());
    put("bf16.compile_s", compile_s.into());
    put("bf16.compile.pack_mb_per_s", (pack_rate / MB).into());
    put("bf16.compile.pack_over_disk_write", (pack_rate / disk).into());
    put("bf16.verify_full_s", verify_s.into());
    put("bf16.open_s", open_s.into());

    let load_before = load_average();
    let rss_reset = reset_peak_rss();

    // Compiled decode at batch 1, after a context of 8 tokens.
    let prompt: Vec<i64> = (0..8).map(|i| 100 + 37 * i).collect();
    let profile = std::env::var_os(PROFILE_ENV).is_some();
    let mut profiles: Vec<(String, Vec<String>)> = vec![];
    let one = decode_step_seconds(&pkg, 1, 1, prompt.len(), opts.decode_tokens, profile)?;
    let all = decode_step_seconds(&pkg, threads, 1, prompt.len(), opts.decode_tokens, profile)?;
    for (what, t) in [("decode, batch 1, 1 thread", &one), (&format!("decode, batch 1, {threads} threads"), &all)] {
        if let Some(k) = &t.kernels {
            profiles.push((what.to_string(), profile_lines(k, opts.decode_tokens, t.seconds)));
        }
    }
    let (step1, step, mid_meta) = (one.seconds, all.seconds, all.meta);

    // Prefill of a long prompt (best of two).
    let long: Vec<i64> = (0..opts.prompt_tokens as i64).map(|i| (i * 7919) % 31000 + 1).collect();
    let mut best: Option<(f64, f64, Vec<f64>)> = None;
    for _ in 0..2 {
        let mut d = StepDriver::new(pkg.clone(), threads, 1, opts.prompt_tokens)?;
        d.engine().enable_profiling();
        let t0 = Instant::now();
        d.step(std::slice::from_ref(&long))?;
        let total = t0.elapsed().as_secs_f64();
        let p = d.engine().profile().expect("profiling enabled");
        let by_kind: Vec<f64> = GEMM_KINDS.iter().map(|k| p.get(k).map(|d| d.as_secs_f64()).unwrap_or(0.0)).collect();
        if best.as_ref().is_none_or(|(t, _, _)| total < *t) {
            best = Some((total, by_kind.iter().sum(), by_kind));
        }
    }
    // Batched decode at context 512, and several prompts prefilled in one step.
    let groups = pkg.config().num_groups();
    let peak_used = bf16_peak.filter(|_| pkg.tier() == panguc_codegen_cpu::BF16_TIER).unwrap_or(peak);
    let peaks = Peaks { bandwidth: bw, flops: peak_used, int8_ops: None };
    let batched = batched_decode(&pkg, threads, opts.batch_decode_steps, &peaks, profile)?;
    for d in &batched {
        if let Some(lines) = &d.profile {
            let what = format!("batched decode, batch {}, context {BATCH_CONTEXT}, {threads} threads", d.batch);
            profiles.push((what, lines.clone()));
        }
    }
    let (pt, prefill_cost) = batched_prefill(&pkg, threads)?;
    let compiled_rss = peak_rss_bytes();
    let micro = crate::bench_gemm::gemm_micro(program, pkg.tier(), opts.prompt_tokens, threads)?;

    // The interpreter last: its f32 weight copies would dominate the peak.
    let interp_tps = {
        let ckpt = crate::commands::open_checkpoint(&opts.checkpoint, false)?;
        let cfg = ckpt.config();
        let block_size = crate::commands::CPU_BLOCK_SIZE;
        let blocks: Vec<u32> = (0..(prompt.len() + opts.interp_decode_tokens).div_ceil(block_size) as u32).collect();
        let interp = panguc_ir::interp::Interpreter::new(&module, &ckpt);
        let mut s = panguc_ir::session::BatchInterpSession::new(
            interp,
            cfg.num_hidden_layers,
            blocks.len(),
            block_size,
            [cfg.num_key_value_heads, cfg.head_dim()],
        );
        let mut step = |past: usize, ids: &[i64]| -> Result<()> {
            let chunk = panguc_ir::batch::SeqChunk { past, new_tokens: ids.len(), blocks: &blocks };
            s.step(ids, &panguc_ir::batch::StepMetadata::build(block_size, &[chunk])?)?;
            Ok(())
        };
        step(0, &prompt)?;
        let t0 = Instant::now();
        for i in 0..opts.interp_decode_tokens {
            step(prompt.len() + i, &[(i as i64 * 13) % 1000 + 3])?;
        }
        opts.interp_decode_tokens as f64 / t0.elapsed().as_secs_f64()
    };

    let active = step_bytes(program, &mid_meta, groups);
    let roof = active as f64 / bw;
    say(format!("decode, batch 1 (prompt 8, {} new tokens):", opts.decode_tokens));
    say(format!("  interpreter           {:>8.2} tok/s", interp_tps));
    say(format!("  compiled, 1 thread    {:>8.2} tok/s  ({:.2} ms/token)", 1.0 / step1, step1 * 1e3));
    say(format!(
        "  compiled, {threads} threads   {:>8.2} tok/s  ({:.2} ms/token); {threads} threads / 1 thread = {:.2}x (target >= 1)",
        1.0 / step,
        step * 1e3,
        step1 / step
    ));
    say(format!(
        "  roofline: {:.1} MB of active weights + KV per step / {:.1} GB/s = {:.2} ms; roofline time / decode time = {:.2} (target >= 0.95)",
        active as f64 / MB,
        bw / GB,
        roof * 1e3,
        roof / step
    ));
    let (total, gemm_s, kind_s) = best.expect("two runs");
    let flops = gemm_flops(program, opts.prompt_tokens);
    let gemm_rate = flops / gemm_s;
    say(format!("prefill ({} tokens, {threads} threads):", opts.prompt_tokens));
    say(format!("  {:.1} tok/s ({:.2} s)", opts.prompt_tokens as f64 / total, total));
    say(format!(
        "  GEMM kernels: {:.1} GFLOP in {:.2} s = {:.1} GFLOP/s = {:.2} of the {threads}-thread FMA peak{}",
        flops / GB,
        gemm_s,
        gemm_rate / GB,
        gemm_rate / peak,
        match bf16_peak {
            Some(p) => format!(", {:.2} of the bf16 dot-product peak (target >= 0.7)", gemm_rate / p),
            None => String::new(),
        }
    ));
    if let Some(g) = &micro {
        let (m, n, k) = g.shape;
        let (p1, p) = (bf16_peak1.unwrap_or(peak1), bf16_peak.unwrap_or(peak));
        say(format!(
            "  GEMM micro-benchmark ({m} x {n} x {k} alone, tiles split evenly): {:.1} GFLOP/s = {:.2} of the 1-thread peak; {:.1} GFLOP/s = {:.2} of the {threads}-thread peak",
            g.flops_1t / GB,
            g.flops_1t / p1,
            g.flops / GB,
            g.flops / p
        ));
        put("bf16.prefill.micro.gflops.1t", (g.flops_1t / GB).into());
        put("bf16.prefill.micro.gflops", (g.flops / GB).into());
        put("bf16.prefill.micro.fraction_of_peak.1t", (g.flops_1t / p1).into());
        put("bf16.prefill.micro.fraction_of_peak", (g.flops / p).into());
    }
    // Where the GEMM time goes: each kind's rate against the peaks.
    let peak_for_gemms = bf16_peak.unwrap_or(peak);
    let kind_flops = gemm_flops_by_kind(program, opts.prompt_tokens);
    for (kind, s) in GEMM_KINDS.iter().zip(&kind_s) {
        let f = kind_flops.get(kind).copied().unwrap_or(0.0);
        if f == 0.0 || *s == 0.0 {
            continue;
        }
        say(format!(
            "    {kind:<19} {:>6.2} GFLOP in {:.3} s = {:>6.1} GFLOP/s = {:.2} of the {} peak",
            f / GB,
            s,
            f / s / GB,
            f / s / peak_for_gemms,
            if bf16_peak.is_some() { "bf16 dot-product" } else { "FMA" }
        ));
        put(&format!("bf16.prefill.{kind}.gflops"), (f / s / GB).into());
        put(&format!("bf16.prefill.{kind}.seconds"), (*s).into());
    }
    put("bf16.decode.interp_tok_per_s", interp_tps.into());
    put("bf16.decode.tok_per_s.1t", (1.0 / step1).into());
    put("bf16.decode.tok_per_s", (1.0 / step).into());
    put("bf16.decode.threads_speedup", (step1 / step).into());
    put("bf16.decode.roofline_fraction", (roof / step).into());
    put("bf16.prefill.tok_per_s", (opts.prompt_tokens as f64 / total).into());
    put("bf16.prefill.gemm_gflops", (gemm_rate / GB).into());
    put("bf16.prefill.gemm_fraction_of_fma_peak", (gemm_rate / peak).into());
    put("bf16.prefill.gemm_fraction_of_bf16_peak", bf16_peak.map(|p| gemm_rate / p).into());
    report_batched_decode(&batched, &peaks, threads, &say, &mut put);
    let ptokens = PREFILL_SEQS * BATCH_CONTEXT;
    let prefill_peak = prefill_cost.compute_seconds(&peaks) / pt;
    say(format!(
        "batched prefill ({PREFILL_SEQS} x {BATCH_CONTEXT} tokens in one step): {:.1} tok/s ({:.2} s); {:.1} GFLOP/s = {:.2} of the {:.1} GFLOP/s peak",
        ptokens as f64 / pt,
        pt,
        prefill_cost.flops / pt / GB,
        prefill_peak,
        peak_used / GB
    ));
    put("bf16.prefill_512.tokens_per_s", (ptokens as f64 / pt).into());
    put("bf16.prefill_512.peak_fraction", prefill_peak.into());
    match (compiled_rss, rss_reset) {
        (Some(rss), true) => say(format!(
            "peak resident memory of the compiled runs: {:.0} MB (weights mapped once: {:.0} MB, shared by every engine)",
            rss as f64 / MB,
            pkg.mapped_bytes() as f64 / MB
        )),
        (Some(rss), false) => {
            say(format!("peak resident memory: {:.0} MB (includes the 1 GB bandwidth buffer)", rss as f64 / MB))
        }
        (None, _) => {}
    }
    if let Some(rss) = peak_rss_bytes() {
        say(format!("peak resident memory including the interpreter: {:.0} MB", rss as f64 / MB));
        put("bf16.peak_rss_mb", (rss as f64 / MB).into());
    }
    for (what, lines) in &profiles {
        say(format!("time per kernel, {what} ({PROFILE_ENV}):"));
        for l in lines {
            say(l.clone());
        }
    }
    if let (Some(a), Some(b)) = (load_before, load_average()) {
        say(format!(
            "machine load average during the run: {a:.1} .. {b:.1} on {} cores (shared machines make timings noisy)",
            panguc_runtime::engine::default_threads()
        ));
        put("machine.load_average", serde_json::json!([a, b]));
    }
    if let Some(q) = &opts.quant {
        let bf16 = crate::bench_quant::Bf16Figures {
            decode_tok_per_s: 1.0 / step,
            prefill_512_tok_per_s: (PREFILL_SEQS * BATCH_CONTEXT) as f64 / pt,
            batched: &batched,
            program,
        };
        let peaks = Peaks { int8_ops: int8_peak.map(|p| p.0), ..peaks };
        crate::bench_quant::run_quant_bench(opts, q, fuse, &peaks, &bf16, threads, &say, &mut json)?;
    }
    write_json(opts, json)
}

/// `--batched-decode-only`: the package just compiled in `opts.work_dir`,
/// the bandwidth and peak its rooflines take, and the batched decode
/// alone (profiled with [`PROFILE_ENV`] like the full run).
fn run_batched_decode_only(opts: &BenchOptions, say: &dyn Fn(String)) -> Result<()> {
    let pkg = Arc::new(panguc_runtime::open_package(&opts.work_dir)?);
    let threads = opts.threads.max(1);
    let bw = stream_read_bandwidth(1usize << 30, threads, 3);
    let peak = bf16_dot_peak_flops(threads)
        .filter(|_| pkg.tier() == panguc_codegen_cpu::BF16_TIER)
        .unwrap_or_else(|| fma_peak_flops(threads));
    let peaks = Peaks { bandwidth: bw, flops: peak, int8_ops: None };
    let load_before = load_average();
    let profile = std::env::var_os(PROFILE_ENV).is_some();
    let batched = batched_decode(&pkg, threads, opts.batch_decode_steps, &peaks, profile)?;
    let mut json = serde_json::Map::new();
    say(format!("== panguc CPU benchmark, batched decode only: small preset (bf16), kernel tier {} ==", pkg.tier()));
    report_batched_decode(&batched, &peaks, threads, say, &mut |k, v| {
        json.insert(k.to_string(), v);
    });
    for d in &batched {
        if let Some(lines) = &d.profile {
            say(format!(
                "time per kernel, batched decode, batch {}, context {BATCH_CONTEXT} ({PROFILE_ENV}):",
                d.batch
            ));
            for l in lines {
                say(l.clone());
            }
        }
    }
    if let (Some(a), Some(b)) = (load_before, load_average()) {
        say(format!("machine load average during the run: {a:.1} .. {b:.1}"));
        json.insert("machine.load_average".into(), serde_json::json!([a, b]));
    }
    write_json(opts, json)
}

/// The batched decode's lines of the report and its JSON figures.
fn report_batched_decode(
    batched: &[BatchedDecode],
    peaks: &Peaks,
    threads: usize,
    say: &dyn Fn(String),
    put: &mut dyn FnMut(&str, serde_json::Value),
) {
    say(format!(
        "batched decode (context {BATCH_CONTEXT} each, {threads} threads; roofline = max(step bytes / {:.1} GB/s, step FLOPs / {:.1} GFLOP/s)):",
        peaks.bandwidth / GB,
        peaks.flops / GB
    ));
    let tps1 = batched.first().map(|d| d.tokens_per_s()).unwrap_or(0.0);
    for d in batched {
        let (b, t, tps) = (d.batch, d.seconds, d.tokens_per_s());
        say(format!(
            "  batch {b:>2}: {tps:>8.1} tok/s ({:.1} ms/step; {:.0} MB, {:.2} GFLOP per step); {:.2}x batch 1; roofline {:.2} ms = {:.2} of it (target >= 0.6)",
            t * 1e3,
            d.cost.bytes.total() as f64 / MB,
            d.cost.flops / GB,
            tps / tps1,
            d.roofline * 1e3,
            d.roofline / t
        ));
        put(&format!("bf16.decode.batch_{b}.tokens_per_s"), tps.into());
        put(&format!("bf16.decode.batch_{b}.roofline_fraction"), (d.roofline / t).into());
    }
    if let (Some(first), Some(last)) = (batched.first(), batched.last()) {
        let ratio = last.tokens_per_s() / first.tokens_per_s();
        say(format!("  batch {} aggregate / batch {} = {ratio:.2}x (target >= 8)", last.batch, first.batch));
    }
}

/// Compile the checkpoint in `checkpoint` into a CPU package in `work_dir`
/// (replaced) from the batched import: the module compiled, the compile's
/// seconds and the weight packing's figures. The checkpoint is closed again
/// before returning, so later runs' resident memory is the package's alone.
pub fn compile_package(
    checkpoint: &std::path::Path,
    work_dir: &std::path::Path,
    fuse: Fuse,
) -> Result<(Module, f64, crate::package_build::PackStats)> {
    let ckpt = crate::commands::open_checkpoint(checkpoint, false)?;
    let kv = crate::import::KvLayout::Paged { block_size: crate::commands::CPU_BLOCK_SIZE };
    let imported = crate::commands::import_with(&ckpt, kv)?;
    let module = fuse(&ckpt, &imported)?;
    if work_dir.exists() {
        std::fs::remove_dir_all(work_dir).with_context(|| format!("removing {}", work_dir.display()))?;
    }
    std::fs::create_dir_all(work_dir)?;
    let t0 = Instant::now();
    let pack =
        crate::package_build::write_cpu_package(work_dir, &ckpt, &module, &["cpu".into()], &serde_json::Value::Null)?;
    Ok((module, t0.elapsed().as_secs_f64(), pack))
}

/// Floating-point operations of the GEMM kernels for a `tokens` prompt.
pub fn gemm_flops(p: &KernelProgram, tokens: usize) -> f64 {
    gemm_flops_by_kind(p, tokens).values().sum()
}

/// The GEMM kernels' kinds, as named in an engine's profile.
pub const GEMM_KINDS: [&str; 4] = ["gemm", "moe_gate_up", "moe_grouped_gate_up", "moe_down"];

/// [`gemm_flops`] per kernel kind (keys of [`GEMM_KINDS`]).
pub fn gemm_flops_by_kind(p: &KernelProgram, tokens: usize) -> std::collections::BTreeMap<&'static str, f64> {
    let b = bindings(tokens, 0);
    let mut by_kind = std::collections::BTreeMap::new();
    for l in &p.launches {
        let k = &p.kernels[l.kernel];
        let dims = |i: usize| -> Vec<usize> { k.args[i].shape.iter().map(|d| d.eval(&b).unwrap_or(0)).collect() };
        let kind = match &k.kind {
            KernelKind::Gemm { .. } => GEMM_KINDS[0],
            KernelKind::MoeGateUp => GEMM_KINDS[1],
            KernelKind::MoeGroupedGateUp => GEMM_KINDS[2],
            KernelKind::MoeDown => GEMM_KINDS[3],
            _ => continue,
        };
        *by_kind.entry(kind).or_insert(0.0) += match &k.kind {
            KernelKind::Gemm { epilogue } => {
                let (a, out) = (dims(0), dims(k.args.len() - 1));
                let rows: usize = out[..out.len() - 1].iter().product();
                let n = out[out.len() - 1] * if *epilogue == panguc_ir::kernel::Epilogue::SwiGlu { 2 } else { 1 };
                2.0 * (rows * n * a[a.len() - 1]) as f64
            }
            KernelKind::MoeGateUp | KernelKind::MoeDown | KernelKind::MoeGroupedGateUp => {
                // One output row per routed slot (`MoeGateUp` reads its A
                // rows from the token rows through an index, so A has
                // fewer rows than the product): slots x (2I or H) x K.
                let (out, w) = (dims(k.args.len() - 1), dims(k.args.len() - 2));
                2.0 * (out[0] * w[1] * w[2]) as f64
            }
            _ => 0.0,
        };
    }
    by_kind
}

/// `--json`: every figure as one object, on stdout or in the named file.
fn write_json(opts: &BenchOptions, json: serde_json::Map<String, serde_json::Value>) -> Result<()> {
    let text = serde_json::to_string_pretty(&serde_json::Value::Object(json))?;
    match &opts.json_file {
        Some(f) => std::fs::write(f, text + "\n").with_context(|| format!("writing {}", f.display()))?,
        None if opts.json => println!("{text}"),
        None => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::{synth_with, Preset, SynthOptions};

    /// A MoE GEMM does one row of work per routed slot (tokens x top-k),
    /// not per token: gate/up `2 x slots x 2I x H`, down `2 x slots x H x I`.
    #[test]
    fn moe_gemm_flops_count_every_routed_slot() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("tiny");
        synth_with(&out, &SynthOptions { preset: Preset::Tiny, seed: 0, dtype: DType::BF16, force: false }).unwrap();
        let ckpt = Checkpoint::open(&out).unwrap();
        let cfg = ckpt.config().clone();
        let module = crate::commands::import(&ckpt).unwrap();
        let fused = panguc_lowering::fuse_module(&module, &Default::default(), |_, _| Ok(())).unwrap().0;
        let program = panguc_lowering::schedule::schedule(&fused, &Default::default()).unwrap();
        let tokens = 5;
        let by_kind = gemm_flops_by_kind(&program, tokens);
        let slots = (tokens * cfg.num_experts_per_tok * cfg.num_hidden_layers) as f64;
        let (h, i) = (cfg.hidden_size as f64, cfg.moe_intermediate_size as f64);
        assert_eq!(by_kind["moe_gate_up"], 2.0 * slots * 2.0 * i * h);
        assert_eq!(by_kind["moe_down"], 2.0 * slots * h * i);
        assert_eq!(gemm_flops(&program, tokens), by_kind.values().sum::<f64>());
    }
}
