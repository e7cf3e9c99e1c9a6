//! The CLI subcommands, as library functions so tests can drive them.

use crate::frontend::{Checkpoint, OpenOptions};
use crate::import::build_module;
use crate::synth::{synth_with, Preset, SynthOptions};
use anyhow::{bail, Context, Result};
use clap::Args;
use panguc_ir::{DType, Module, PanguConfig};
use std::path::{Path, PathBuf};

#[derive(Args, Debug, Clone)]
pub struct SynthArgs {
    /// Output directory (must not exist, or be empty).
    pub out: PathBuf,
    /// Model size: tiny (committed example) or small (benchmarks).
    #[arg(long, default_value = "tiny")]
    pub preset: Preset,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Weight dtype: bf16 (like the real model), f16 or f32.
    #[arg(long, default_value = "bf16")]
    pub dtype: DType,
    /// Replace a non-empty output directory.
    #[arg(long)]
    pub force: bool,
}

pub fn synth(a: SynthArgs) -> Result<()> {
    if !matches!(a.dtype, DType::BF16 | DType::F16 | DType::F32) {
        bail!("--dtype must be bf16, f16 or f32, got {}", a.dtype);
    }
    let report = synth_with(&a.out, &SynthOptions { preset: a.preset, seed: a.seed, dtype: a.dtype, force: a.force })?;
    println!(
        "wrote {} checkpoint to {} ({} shards, {} bytes of tensors)",
        a.preset,
        report.dir.display(),
        report.shards.len(),
        report.tensor_bytes
    );
    Ok(())
}

#[derive(Args, Debug, Clone)]
pub struct InspectArgs {
    /// Checkpoint directory (config.json plus optional safetensors).
    pub model_dir: PathBuf,
    /// Print a JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Ignore weight files even when present.
    #[arg(long)]
    pub config_only: bool,
}

pub fn inspect(a: InspectArgs) -> Result<()> {
    let ckpt = open_checkpoint(&a.model_dir, a.config_only)?;
    if a.json {
        emit(&format!("{}\n", serde_json::to_string_pretty(&crate::inspect::inspect_json(&ckpt))?));
    } else {
        emit(&crate::inspect::inspect_text(&ckpt));
    }
    Ok(())
}

#[derive(Args, Debug, Clone)]
pub struct DumpIrArgs {
    pub model_dir: PathBuf,
    /// Pipeline stage to print: import, fused (after e-graph fusion), or
    /// kernels (the scheduled kernel program).
    #[arg(long, default_value = "import")]
    pub stage: String,
    #[arg(long)]
    pub config_only: bool,
}

pub fn dump_ir(a: DumpIrArgs) -> Result<()> {
    let ckpt = open_checkpoint(&a.model_dir, a.config_only)?;
    let module = import(&ckpt)?;
    match a.stage.as_str() {
        "import" => emit(&panguc_ir::text::print_module(&module)),
        "fused" => {
            let out = crate::pipeline::run_pipeline(&ckpt, &module, 0.0, &Default::default())?;
            emit(&panguc_ir::text::print_module(&out.module))
        }
        "kernels" => {
            let out = crate::pipeline::run_pipeline(&ckpt, &module, 0.0, &Default::default())?;
            let program = panguc_lowering::schedule::schedule(&out.module, &Default::default())?;
            emit(&program.to_text())
        }
        other => bail!("unknown --stage `{other}` (available: import, fused, kernels)"),
    }
    Ok(())
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// A checkpoint directory (runs the reference interpreter) or a package.
    pub model: PathBuf,
    /// Prompt token ids, comma separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub tokens: Vec<i64>,
    #[arg(long, default_value_t = 16)]
    pub max_new_tokens: usize,
    /// Write {"tokens", "logits" (per prompt position), "generated"} here.
    #[arg(long)]
    pub logits_out: Option<PathBuf>,
    /// Execution engine: interp (reference interpreter; the default for a
    /// checkpoint directory) or compiled (the default for a package).
    #[arg(long)]
    pub engine: Option<String>,
    /// Worker threads of the compiled engine (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop at the config's eos_token_id.
    #[arg(long)]
    pub stop_at_eos: bool,
}

pub fn run(a: RunArgs) -> Result<()> {
    if panguc_runtime::is_package(&a.model) {
        if a.engine.as_deref().is_some_and(|e| e.starts_with("ascend-sim")) {
            return crate::ascend_build::run_ascend_sim(&a);
        }
        return crate::package_build::run_package(&a);
    }
    let ckpt = open_checkpoint(&a.model, false)?;
    let cfg = ckpt.config().clone();
    validate_prompt(&a.tokens, cfg.vocab_size)?;
    validate_request(&a, &cfg)?;
    if !ckpt.has_weights() {
        bail!("{}: the checkpoint has no weight files, so it cannot be run (config-only checkpoints can only be compiled)", a.model.display());
    }
    check_interp_memory(&a, &cfg)?;
    let module = import(&ckpt)?;
    match a.engine.as_deref().unwrap_or("interp") {
        "interp" => {
            let interp = panguc_ir::interp::Interpreter::new(&module, &ckpt);
            let mut session = panguc_ir::session::InterpSession::new(
                interp,
                cfg.num_hidden_layers,
                [cfg.num_key_value_heads, cfg.head_dim()],
            );
            generate_and_report(&mut session, &a, &cfg)
        }
        "compiled" => bail!(
            "--engine compiled runs a compiled package: compile {} with `panguc compile --target cpu -o OUT` and run OUT",
            a.model.display()
        ),
        other => bail!("unknown --engine `{other}` for a checkpoint directory (available: interp)"),
    }
}

/// The generation every engine shares: sample per the flags, stop at eos
/// with --stop-at-eos, write --logits-out, print the generated tokens.
pub fn generate_and_report(engine: &mut dyn panguc_runtime::Engine, a: &RunArgs, cfg: &PanguConfig) -> Result<()> {
    let sampling =
        panguc_runtime::Sampling { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p, seed: a.seed };
    let eos = if a.stop_at_eos { cfg.eos_token_id } else { None };
    let generation = panguc_runtime::generate(engine, &a.tokens, a.max_new_tokens, &sampling, eos)?;
    if let Some(path) = &a.logits_out {
        write_logits_json(path, &a.tokens, &generation)?;
    }
    emit(&format!("{}\n", generation.generated.iter().map(i64::to_string).collect::<Vec<_>>().join(",")));
    Ok(())
}

/// Reject an empty prompt or an id outside the vocabulary.
pub fn validate_prompt(tokens: &[i64], vocab: usize) -> Result<()> {
    if tokens.is_empty() {
        bail!("--tokens is empty: give at least one token id");
    }
    if let Some((i, t)) = tokens.iter().enumerate().find(|(_, t)| **t < 0 || **t as u64 >= vocab as u64) {
        bail!(
            "--tokens: token {t} at position {i} is outside the vocabulary (vocab_size {vocab}, valid ids 0..{})",
            vocab - 1
        );
    }
    Ok(())
}

/// The whole sequence (prompt + new tokens) must fit the model's context.
pub fn validate_request(a: &RunArgs, cfg: &PanguConfig) -> Result<()> {
    let limit = cfg.max_position_embeddings;
    let total = a.tokens.len().checked_add(a.max_new_tokens);
    if total.is_none_or(|t| t > limit) {
        bail!(
            "--max-new-tokens {} with a {}-token prompt goes past the model's context length \
             (max_position_embeddings {limit}): at most {} new tokens fit",
            a.max_new_tokens,
            a.tokens.len(),
            limit.saturating_sub(a.tokens.len())
        );
    }
    Ok(())
}

/// The reference interpreter keeps every weight as f32 and grows an f32 KV
/// cache per layer: refuse a run whose weights and cache cannot fit before
/// any of it is allocated.
fn check_interp_memory(a: &RunArgs, cfg: &PanguConfig) -> Result<()> {
    let context = (a.tokens.len() + a.max_new_tokens) as u64;
    let kv = [2, cfg.num_hidden_layers as u64, cfg.kv_dim() as u64, 4, context]
        .iter()
        .try_fold(1u64, |acc, &x| acc.checked_mul(x));
    let weights = cfg.total_params().checked_mul(4);
    let what = format!(
        "the reference interpreter on {} (f32 weights plus the KV cache for {context} tokens)",
        a.model.display()
    );
    panguc_runtime::memory::check_fits(&what, kv.zip(weights).and_then(|(k, w)| k.checked_add(w)))
}

pub fn write_logits_json(path: &Path, tokens: &[i64], g: &panguc_runtime::Generation) -> Result<()> {
    let json = serde_json::json!({ "tokens": tokens, "logits": g.prompt_logits, "generated": g.generated });
    let text = serde_json::to_string(&json)?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

#[derive(Args, Debug, Clone)]
pub struct CompileArgs {
    pub model_dir: PathBuf,
    /// Comma-separated targets: ir, cpu, ascend910b, ascend310p.
    #[arg(long, value_delimiter = ',', required = true)]
    pub target: Vec<String>,
    /// Output package directory (written atomically: staged, then renamed).
    #[arg(short = 'o', long = "out")]
    pub out: PathBuf,
    /// Compile from config.json alone even if weights are present.
    #[arg(long)]
    pub config_only: bool,
    /// Replace an existing non-empty output directory.
    #[arg(long)]
    pub force: bool,
    /// Write the canonical IR after every pass into DIR, numbered.
    #[arg(long, value_name = "DIR")]
    pub dump_ir: Option<PathBuf>,
    /// Translation validation: run the unfused and fused modules under the
    /// reference interpreter and fail if they differ beyond tolerance.
    #[arg(long)]
    pub validate: bool,
    /// Saturation iteration limit per function.
    #[arg(long)]
    pub iter_limit: Option<usize>,
    /// E-graph node limit per function.
    #[arg(long)]
    pub node_limit: Option<usize>,
    /// Saturation time limit per function, in milliseconds.
    #[arg(long, value_name = "MS")]
    pub time_limit_ms: Option<u64>,
    /// Hardware profile overrides (TOML or JSON).
    #[arg(long, value_name = "FILE")]
    pub profiles: Option<PathBuf>,
    /// Hardware profile that extraction minimises time on.
    #[arg(long)]
    pub cost_profile: Option<String>,
    /// Number of devices to partition the model across (1, 2, 4, 8, ...).
    #[arg(long, default_value_t = 1)]
    pub devices: usize,
    /// Parallel plan: ep (expert groups split, rest replicated), h2p (the
    /// published 8-device deployment), or auto (the cost model picks).
    /// Default: h2p for 8 devices, ep otherwise.
    #[arg(long)]
    pub plan: Option<String>,
    /// Context length used for the per-device KV-cache and time estimates.
    #[arg(long, default_value_t = 2048)]
    pub context: usize,
    /// Links between the devices, for the estimates and `--plan auto`:
    /// hccs (Atlas 800I A2, the default for 910B) or pcie (Atlas 300I Duo,
    /// the default for 310P).
    #[arg(long, value_name = "hccs|pcie")]
    pub interconnect: Option<String>,
    /// Override the interconnect's per-device bandwidth, GB/s.
    #[arg(long, value_name = "GBS")]
    pub link_bandwidth: Option<f64>,
    /// Override the interconnect's fixed cost per communication step, microseconds.
    #[arg(long, value_name = "US")]
    pub link_latency: Option<f64>,
}

/// Targets `panguc compile` knows.
pub const KNOWN_TARGETS: [&str; 4] = ["ir", "cpu", "ascend910b", "ascend310p"];

/// Validate and de-duplicate the target list (order kept).
pub fn parse_targets(raw: &[String]) -> Result<Vec<String>> {
    let mut out: Vec<String> = vec![];
    for t in raw.iter().map(|t| t.trim()).filter(|t| !t.is_empty()) {
        if !KNOWN_TARGETS.contains(&t) {
            bail!("unknown target `{t}` (known targets: {})", KNOWN_TARGETS.join(", "));
        }
        if !out.iter().any(|o| o == t) {
            out.push(t.to_string());
        }
    }
    if out.is_empty() {
        bail!("--target is empty (known targets: {})", KNOWN_TARGETS.join(", "));
    }
    Ok(out)
}

pub fn compile(a: CompileArgs) -> Result<()> {
    let targets = parse_targets(&a.target)?;
    check_output_dir(&a.out, a.force)?;
    let ckpt = open_checkpoint(&a.model_dir, a.config_only)?;
    let started = std::time::Instant::now();
    let module = import(&ckpt)?;
    let import_seconds = started.elapsed().as_secs_f64();

    let mut opts = crate::pipeline::PipelineOptions {
        dump_ir: a.dump_ir.clone(),
        validate: a.validate,
        profile_file: a.profiles.clone(),
        ..Default::default()
    };
    if let Some(n) = a.iter_limit {
        opts.iter_limit = n;
    }
    if let Some(n) = a.node_limit {
        opts.node_limit = n;
    }
    if let Some(ms) = a.time_limit_ms {
        opts.time_limit = std::time::Duration::from_millis(ms);
    }
    if let Some(p) = &a.cost_profile {
        opts.cost_profile = p.clone();
    }
    let (plan, plan_by_cost) = crate::partition_build::parse_plan(a.devices, a.plan.as_deref())?;
    if a.devices == 1 && a.plan.is_some() {
        bail!("--plan needs --devices N with N > 1");
    }
    if a.devices == 1 && (a.interconnect.is_some() || a.link_bandwidth.is_some() || a.link_latency.is_some()) {
        bail!("--interconnect, --link-bandwidth and --link-latency need --devices N with N > 1");
    }
    let piped = crate::pipeline::run_pipeline(&ckpt, &module, import_seconds, &opts)?;
    let partitioned = if a.devices > 1 {
        let profile_name =
            if targets.iter().any(|t| t == "ascend310p") { "ascend310p3" } else { opts.cost_profile.as_str() };
        let profile = panguc_lowering::builtin_profiles()
            .into_iter()
            .find(|p| p.name == profile_name)
            .ok_or_else(|| anyhow::anyhow!("no hardware profile `{profile_name}`"))?;
        let link = crate::partition_build::interconnect(
            &profile,
            a.interconnect.as_deref(),
            a.link_bandwidth,
            a.link_latency,
        )?;
        let popts = crate::partition_build::PartitionOptions {
            devices: a.devices,
            plan,
            plan_by_cost,
            profile,
            link: Some(link),
            context: a.context,
        };
        let fuse = panguc_lowering::fuse::FuseOptions::default();
        Some(crate::partition_build::partition(ckpt.config(), &piped.module, crate::import::LAYER_FN, &popts, &fuse)?)
    } else {
        None
    };

    // Everything is written into a staging directory next to OUT and renamed
    // at the end, so a failure never leaves a partial package behind (and
    // a killed compile's leftovers are removed by the next one: see staging.rs).
    let staging = crate::staging::Staging::create(&a.out)?;
    let mut report = piped.report;
    write_ir_files(staging.path(), &piped.module)?;
    // Every program is scheduled once, here, and handed to the backends.
    let t = std::time::Instant::now();
    let program = panguc_lowering::schedule::schedule(&piped.module, &Default::default())
        .context("scheduling the kernel program")?;
    let rank_programs = match &partitioned {
        Some(p) => crate::package_build::schedule_ranks(&p.parts)?,
        None => vec![],
    };
    let scheduling_seconds = t.elapsed().as_secs_f64();
    let codegen_started = std::time::Instant::now();
    if let (true, Some(p)) = (targets.iter().any(|t| t == "cpu"), &partitioned) {
        // Partitioned: one CPU package per rank under ranks/rankN/, run
        // by the multi-rank engine (package_build::write_cpu_rank_packages).
        let plan = p.report["plan"].as_str().unwrap_or("unknown");
        crate::package_build::write_cpu_rank_packages(staging.path(), &ckpt, &p.parts, &rank_programs, plan, &targets)?;
    } else if targets.iter().any(|t| t == "cpu") {
        crate::package_build::write_cpu_package_for(
            staging.path(),
            &ckpt,
            &piped.module,
            &program,
            &targets,
            &serde_json::Value::Null,
        )?;
    }
    if targets.iter().any(|t| t.starts_with("ascend")) {
        let provider = crate::ascend_build::checkpoint_weights(&ckpt);
        let weights: Option<&panguc_codegen_ascendc::engine::WeightProvider> =
            if ckpt.has_weights() { Some(&provider) } else { None };
        report["ascend"] = if partitioned.is_some() {
            crate::ascend_build::write_ascend_rank_targets(staging.path(), &rank_programs, &targets, weights)?
        } else {
            crate::ascend_build::write_ascend_targets(staging.path(), &program, ckpt.config(), &targets, weights)?
        };
    }
    if let Some(p) = &partitioned {
        let ascend = crate::ascend_build::ascend_targets(&targets)?;
        let weight_dtype = module.functions[crate::import::LAYER_FN]
            .weight_params()
            .next()
            .map(|(p, _)| module.functions[crate::import::LAYER_FN].ty(p.value).dtype)
            .unwrap_or(DType::BF16);
        crate::partition_build::write_rank_programs(staging.path(), p, weight_dtype, &ascend)?;
        report["partition"] = p.report.clone();
    }
    let ranks = partitioned.as_ref().map(|p| {
        let plan = p.report["plan"].as_str().unwrap_or("unknown");
        crate::package_build::ranks_section(p.parts.ranks.len(), plan, Some("partition.json"))
    });
    crate::package_build::finalize_manifest_with(staging.path(), ckpt.config(), &targets, ranks)?;
    // The report holds wall-clock timings, so it is written after the
    // manifest: it is a diagnostic, not part of the hashed package contents.
    if let Some(phases) = report.get_mut("phases") {
        phases["scheduling"] = serde_json::json!(scheduling_seconds);
        phases["codegen"] = serde_json::json!(codegen_started.elapsed().as_secs_f64());
    }
    let report_path = staging.path().join("report.json");
    std::fs::write(&report_path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", report_path.display()))?;

    staging.install(&a.out)?;
    emit(&piped.summary);
    if let Some(p) = &partitioned {
        emit(&p.summary);
    }
    emit(&format!("wrote package {} (targets: {})\n", a.out.display(), targets.join(", ")));
    Ok(())
}

/// The optimised IR, in canonical text, under `ir/`.
fn write_ir_files(staging: &Path, fused: &Module) -> Result<()> {
    let dir = staging.join("ir");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("fused.txt");
    std::fs::write(&path, panguc_ir::text::print_module(fused)).with_context(|| format!("writing {}", path.display()))
}

/// OUT must not exist, be an empty directory, or be replaced with --force.
fn check_output_dir(out: &Path, force: bool) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    if !out.is_dir() {
        bail!("{} exists and is not a directory", out.display());
    }
    let empty = std::fs::read_dir(out).with_context(|| format!("reading {}", out.display()))?.next().is_none();
    if !empty && !force {
        bail!("{} already exists and is not empty (use --force to replace it)", out.display());
    }
    Ok(())
}

pub fn open_checkpoint(dir: &Path, config_only: bool) -> Result<Checkpoint> {
    Checkpoint::open_with(dir, &OpenOptions { config_only, ..OpenOptions::default() })
}

/// Import the graph IR, typing each weight with its stored dtype (or the
/// config's torch_dtype for config-only checkpoints).
pub fn import(ckpt: &Checkpoint) -> Result<Module> {
    let default = match ckpt.config().torch_dtype.as_deref() {
        Some("float16") => DType::F16,
        Some("float32") => DType::F32,
        _ => DType::BF16,
    };
    let dtype_of = |name: &str| ckpt.tensor_info(name).map(|(d, _, _)| d).unwrap_or(default);
    // The layer function is typed from layer 0, so every layer must store
    // each tensor in the same dtype as layer 0 does.
    let cfg = ckpt.config();
    for l in 1..cfg.num_hidden_layers {
        for spec in cfg.layer_tensors(l) {
            let rel = spec.name.splitn(4, '.').nth(3).unwrap_or_default();
            let (this, first) = (dtype_of(&spec.name), dtype_of(&format!("model.layers.0.{rel}")));
            if this != first {
                bail!("{}: tensor `{}` is {this} but layer 0 stores it as {first}; mixed per-layer dtypes are not supported", ckpt.dir().display(), spec.name);
            }
        }
    }
    build_module(cfg, &dtype_of)
}

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Working directory: the `small` checkpoint is synthesized there on
    /// first use (about 1 GB) and the package is rebuilt there each run.
    #[arg(long, default_value = "out/bench")]
    pub dir: PathBuf,
    /// Threads for the "all cores" runs (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Prompt length of the prefill measurement.
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Decode steps measured for the compiled engine.
    #[arg(long, default_value_t = 32)]
    pub decode_tokens: usize,
}

pub fn bench(a: BenchArgs) -> Result<()> {
    let mut opts = crate::bench::BenchOptions::in_dir(a.dir);
    if let Some(t) = a.threads {
        if t == 0 {
            bail!("--threads must be at least 1");
        }
        opts.threads = t;
    }
    if a.prompt_tokens == 0 || a.decode_tokens == 0 {
        bail!("--prompt-tokens and --decode-tokens must be at least 1");
    }
    opts.prompt_tokens = a.prompt_tokens;
    opts.decode_tokens = a.decode_tokens;
    crate::bench::run_bench(&opts, &crate::bench::pipeline_fuse)
}

/// Write to stdout; a closed pipe (`panguc dump-ir ... | head`) is not an
/// error worth a panic, so write failures are ignored.
pub fn emit(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|_| out.flush());
}
