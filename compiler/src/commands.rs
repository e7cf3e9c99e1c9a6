//! The CLI subcommands, as library functions so tests can drive them.

use crate::frontend::{Checkpoint, OpenOptions};
use crate::import::build_module;
use crate::synth::{synth_with, Preset, SynthOptions};
use anyhow::{bail, Context, Result};
use clap::Args;
use panguc_ir::kernel::KernelProgram;
use panguc_ir::{DType, Module};
use panguc_runtime::batch::EngineFactory;
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
    /// Plant activation outlier channels (a few norm channels 20-100x
    /// larger, the consumers' columns divided back: the same float model)
    /// so quantization meets outliers like a trained model's.
    #[arg(long)]
    pub outliers: bool,
}

pub fn synth(a: SynthArgs) -> Result<()> {
    if !matches!(a.dtype, DType::BF16 | DType::F16 | DType::F32) {
        bail!("--dtype must be bf16, f16 or f32, got {}", a.dtype);
    }
    let report = synth_with(&a.out, &SynthOptions { preset: a.preset, seed: a.seed, dtype: a.dtype, force: a.force })?;
    if a.outliers {
        let planted = crate::outliers::plant_outliers(&report.dir, a.preset.max_shard_bytes())?;
        println!("planted {planted} activation outlier channels (20-100x) behind the norms");
    }
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
    /// Checkpoint directory (config.json plus optional safetensors), or a
    /// compiled package (targets, CPU tiers and the one this machine uses).
    pub model_dir: PathBuf,
    /// Print a JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Ignore weight files even when present.
    #[arg(long)]
    pub config_only: bool,
}

pub fn inspect(a: InspectArgs) -> Result<()> {
    if panguc_runtime::is_package(&a.model_dir) {
        let info = crate::inspect::package_json(&a.model_dir)?;
        if a.json {
            emit(&format!("{}\n", serde_json::to_string_pretty(&info)?));
        } else {
            emit(&crate::inspect::package_text(&info));
        }
        return Ok(());
    }
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
    /// Print a Graphviz picture instead of text: the dataflow of one
    /// function (import, fused) or the launch dependencies (kernels).
    /// Render with `dot -Tsvg`.
    #[arg(long)]
    pub dot: bool,
    /// The function `--dot` draws at the import and fused stages.
    #[arg(long, default_value = "decoder_layer", requires = "dot")]
    pub function: String,
    /// The batched program (ragged steps over a paged KV cache of
    /// 16-token blocks) that CPU and partitioned packages run, instead of
    /// the one-sequence program.
    #[arg(long)]
    pub batched: bool,
}

pub fn dump_ir(a: DumpIrArgs) -> Result<()> {
    let ckpt = open_checkpoint(&a.model_dir, a.config_only)?;
    let kv = if a.batched {
        crate::import::KvLayout::Paged { block_size: CPU_BLOCK_SIZE }
    } else {
        crate::import::KvLayout::Contiguous
    };
    let module = import_with(&ckpt, kv)?;
    let fused = || -> Result<panguc_ir::Module> {
        if a.batched {
            crate::pipeline::fuse_batched(&ckpt, &module, &Default::default())
        } else {
            Ok(crate::pipeline::run_pipeline(&ckpt, &module, 0.0, &Default::default())?.module)
        }
    };
    let module_text = |m: &panguc_ir::Module| -> Result<String> {
        if !a.dot {
            return Ok(panguc_ir::text::print_module(m));
        }
        let f = m.function(&a.function).ok_or_else(|| {
            let names: Vec<&str> = m.functions.keys().map(String::as_str).collect();
            anyhow::anyhow!("no function @{} (available: {})", a.function, names.join(", "))
        })?;
        Ok(panguc_lowering::dataflow::function_dot(f))
    };
    match a.stage.as_str() {
        "import" => emit(&module_text(&module)?),
        "fused" => emit(&module_text(&fused()?)?),
        "kernels" => {
            let program = panguc_lowering::schedule::schedule(&fused()?, &Default::default())?;
            if a.dot {
                emit(&panguc_lowering::dataflow::launch_dot(&program).map_err(|e| anyhow::anyhow!(e))?)
            } else {
                emit(&program.to_text())
            }
        }
        other => bail!("unknown --stage `{other}` (available: import, fused, kernels)"),
    }
    Ok(())
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// A checkpoint directory (runs the reference interpreter) or a package.
    pub model: PathBuf,
    /// Prompt token ids, comma separated. Repeat for several prompts: they
    /// run as one continuously batched set of sequences.
    #[arg(long, value_name = "IDS")]
    pub tokens: Vec<crate::run_batch::TokenList>,
    /// More prompts: a JSONL file with one {"tokens": [ids...]} per line
    /// (after any --tokens).
    #[arg(long, value_name = "FILE.jsonl", conflicts_with = "prompt")]
    pub prompts: Option<PathBuf>,
    /// Prompt text, encoded with the model's tokenizer (bos first); one
    /// answer is printed as text while it is generated, several (repeat the
    /// flag: one batch) labelled when they are done. Stops at eos.
    #[arg(long, value_name = "TEXT", conflicts_with = "tokens")]
    pub prompt: Vec<String>,
    /// Wrap each prompt as a user turn of the chat format (the model's
    /// chat template, or Pangu's prompt format when it ships none).
    #[arg(long, requires = "prompt")]
    pub chat: bool,
    /// System turn of the chat format (with --chat).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    #[arg(long, default_value_t = 16)]
    pub max_new_tokens: usize,
    /// Write {"tokens", "logits" (per prompt position), "generated"} here;
    /// with several prompts {"sequences": [those, in prompt order]}.
    #[arg(long)]
    pub logits_out: Option<PathBuf>,
    /// Execution engine: interp (reference interpreter, one session per
    /// sequence; the default for a checkpoint directory), interp-paged (the
    /// interpreter on the batched import: one call per step over a paged
    /// cache) or compiled (the default for a package).
    #[arg(long)]
    pub engine: Option<String>,
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
    #[command(flatten)]
    pub engine_args: EngineArgs,
}

/// The engine and scheduler flags `panguc run` and `panguc serve` share.
#[derive(Args, Debug, Clone)]
pub struct EngineArgs {
    /// Worker threads of the compiled engine (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Package verification on open: `stamp` (hash the small files, trust
    /// the verification stamp for unchanged weight files) or `full` (hash
    /// every byte).
    #[arg(long, default_value = "stamp")]
    pub verify: panguc_runtime::package::Verify,
    /// Load this CPU kernel tier (`x86-64-v3`, `avx512-bf16`) instead of
    /// the best one this CPU supports (also `$PANGUC_CPU_TIER`).
    #[arg(long, value_name = "TIER")]
    pub cpu_tier: Option<String>,
    /// KV cache size in MiB (fractions allowed) shared by all sequences
    /// (default: every running sequence at its longest: its full length for
    /// `run`, --max-model-len for `serve`); when it runs
    /// out, the youngest sequence is preempted and recomputed later.
    #[arg(long, value_name = "MB")]
    pub kv_cache_mb: Option<f64>,
    /// Sequences running at once (default 256).
    #[arg(long, value_name = "N")]
    pub max_seqs: Option<usize>,
    /// Tokens per KV-cache block (default 16).
    #[arg(long, value_name = "TOKENS")]
    pub block_size: Option<usize>,
    /// New tokens per step over all sequences (default 2048); longer
    /// prompts are prefilled in chunks.
    #[arg(long, value_name = "TOKENS")]
    pub max_batch_tokens: Option<usize>,
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
    let prompts = crate::run_batch::prompts(&a, &cfg)?;
    if !ckpt.has_weights() {
        bail!("{}: the checkpoint has no weight files, so it cannot be run (config-only checkpoints can only be compiled)", a.model.display());
    }
    check_interp_memory(&a, &cfg, &prompts)?;
    let module = import(&ckpt)?;
    match a.engine.as_deref().unwrap_or("interp") {
        "interp" => {
            let (module, ckpt) = (&module, &ckpt);
            let (layers, kv) = (cfg.num_hidden_layers, [cfg.num_key_value_heads, cfg.head_dim()]);
            let make: EngineFactory = Box::new(move || {
                let interp = panguc_ir::interp::Interpreter::new(module, ckpt);
                Ok(Box::new(panguc_ir::session::InterpSession::new(interp, layers, kv)))
            });
            crate::run_batch::generate_and_report(make, &a, &cfg, &prompts)
        }
        "interp-paged" => {
            // The batched import over a paged cache: one interpreter call per
            // step for all of its sequences, the cache sized by the scheduler.
            let kv = [cfg.num_key_value_heads, cfg.head_dim()];
            let block_size = crate::run_batch::block_size(&a)?;
            let paged = import_with(&ckpt, crate::import::KvLayout::Paged { block_size })?;
            crate::run_batch::scheduled_run(&a, &cfg, &prompts, &mut |s| {
                Ok(Box::new(panguc_ir::session::BatchInterpSession::new(
                    panguc_ir::interp::Interpreter::new(&paged, &ckpt),
                    cfg.num_hidden_layers,
                    s.num_blocks,
                    s.block_size,
                    kv,
                )))
            })
        }
        "compiled" => bail!(
            "--engine compiled runs a compiled package: compile {} with `panguc compile --target cpu -o OUT` and run OUT",
            a.model.display()
        ),
        other => bail!("unknown --engine `{other}` for a checkpoint directory (available: interp, interp-paged)"),
    }
}

/// The reference interpreter keeps every weight as f32 and grows an f32 KV
/// cache per layer: refuse a run whose weights and cache cannot fit before
/// any of it is allocated.
fn check_interp_memory(a: &RunArgs, cfg: &panguc_ir::PanguConfig, prompts: &[Vec<i64>]) -> Result<()> {
    // Every sequence keeps its own cache until it finishes.
    let context = prompts.iter().map(|p| (p.len() + a.max_new_tokens) as u64).sum::<u64>();
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
        // The package's rank programs and the report's estimates are the
        // batched import partitioned, so one multi-rank engine runs every
        // scheduler step on all ranks.
        let batched = batched_cpu_module(&ckpt, &opts)?;
        Some(crate::partition_build::partition(ckpt.config(), &batched, crate::import::LAYER_FN, &popts, &fuse)?)
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
    let rank_parts = partitioned.as_ref().map(|p| &p.parts);
    let rank_programs = match rank_parts {
        Some(parts) => crate::package_build::schedule_ranks(parts)?,
        None => vec![],
    };
    let scheduling_seconds = t.elapsed().as_secs_f64();
    let codegen_started = std::time::Instant::now();
    if let (true, Some(p), Some(parts)) = (targets.iter().any(|t| t == "cpu"), &partitioned, rank_parts) {
        // Partitioned: one CPU package per rank under ranks/rankN/, run
        // by the multi-rank engine (package_build::write_cpu_rank_packages).
        let plan = p.report["plan"].as_str().unwrap_or("unknown");
        crate::package_build::write_cpu_rank_packages(staging.path(), &ckpt, parts, &rank_programs, plan, &targets)?
    } else if targets.iter().any(|t| t == "cpu") {
        // CPU packages run ragged batch steps over a paged KV cache (every
        // running sequence in one call); the `ascend-sim` engine runs the
        // same program through the AscendC paged kernels.
        let (cpu_module, cpu_program) = batched_cpu_program(&ckpt, &opts)?;
        crate::package_build::write_cpu_package_for(
            staging.path(),
            &ckpt,
            &cpu_module,
            &cpu_program,
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
        crate::ascend_build::attach_cost_model(&mut report);
    }
    if let (Some(p), Some(parts)) = (&partitioned, rank_parts) {
        let ascend = crate::ascend_build::ascend_targets(&targets)?;
        let weight_dtype = module.functions[crate::import::LAYER_FN]
            .weight_params()
            .next()
            .map(|(p, _)| module.functions[crate::import::LAYER_FN].ty(p.value).dtype)
            .unwrap_or(DType::BF16);
        crate::partition_build::write_rank_programs(staging.path(), parts, weight_dtype, &ascend)?;
        report["partition"] = p.report.clone();
    }
    let ranks = partitioned.as_ref().map(|p| {
        let plan = p.report["plan"].as_str().unwrap_or("unknown");
        crate::package_build::ranks_section(p.parts.ranks.len(), plan, Some("partition.json"))
    });
    crate::package_build::copy_tokenizer_files(&a.model_dir, staging.path())?;
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

    // Verified once here, fully, so that runs only re-hash what changed.
    // The stamp is written while the package is still staged: installing
    // is the last write, so a killed compile never leaves OUT half-stamped
    // (renaming the directory keeps the files' inodes and times).
    panguc_runtime::stamp::verify_package_tree(staging.path(), panguc_runtime::package::Verify::Full)
        .with_context(|| format!("verifying the new package for {}", a.out.display()))?;
    staging.install(&a.out)?;
    emit(&piped.summary);
    if let Some(p) = &partitioned {
        emit(&p.summary);
    }
    emit(&format!("wrote package {} (targets: {})\n", a.out.display(), targets.join(", ")));
    Ok(())
}

/// KV-cache block size of batched CPU packages (tokens per block): the
/// scheduler's default, so `panguc run` needs no `--block-size`.
pub const CPU_BLOCK_SIZE: usize = panguc_runtime::scheduler::DEFAULT_BLOCK_SIZE;

/// The batched import (paged KV cache of [`CPU_BLOCK_SIZE`]-token blocks),
/// fused like the one-sequence module and scheduled into a kernel program.
pub fn batched_cpu_program(
    ckpt: &Checkpoint,
    opts: &crate::pipeline::PipelineOptions,
) -> Result<(Module, KernelProgram)> {
    let fused = batched_cpu_module(ckpt, opts)?;
    let program = panguc_lowering::schedule::schedule(&fused, &Default::default())
        .context("scheduling the batched kernel program")?;
    Ok((fused, program))
}

/// The batched import (paged KV cache of [`CPU_BLOCK_SIZE`]-token blocks), fused.
pub fn batched_cpu_module(ckpt: &Checkpoint, opts: &crate::pipeline::PipelineOptions) -> Result<Module> {
    let imported = import_with(ckpt, crate::import::KvLayout::Paged { block_size: CPU_BLOCK_SIZE })?;
    crate::pipeline::fuse_batched(ckpt, &imported, opts)
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
    import_with(ckpt, crate::import::KvLayout::Contiguous)
}

/// [`import`] for either KV-cache layout (`KvLayout::Paged` builds the
/// ragged-batch model of `crate::import::build_batched_module`).
pub fn import_with(ckpt: &Checkpoint, kv: crate::import::KvLayout) -> Result<Module> {
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
    if let Some(quant) = ckpt.quant() {
        return import_quantized(ckpt, quant, &dtype_of, kv);
    }
    match kv {
        crate::import::KvLayout::Contiguous => build_module(cfg, &dtype_of),
        crate::import::KvLayout::Paged { block_size } => {
            crate::import::build_batched_module(cfg, &dtype_of, block_size)
        }
    }
}

/// The quantized module of an msModelSlim checkpoint (validated on open).
/// The layer function is built once from layer 0, so every layer must use
/// layer 0's quant type per module and store the same smoothed-norm biases.
fn import_quantized(
    ckpt: &Checkpoint,
    quant: &crate::frontend::quant::QuantDescription,
    dtype_of: &dyn Fn(&str) -> DType,
    kv: crate::import::KvLayout,
) -> Result<Module> {
    let cfg = ckpt.config();
    let linear = |module: &str| quant.linear_type(module).unwrap_or(crate::frontend::quant::QuantType::Float);
    for l in 1..cfg.num_hidden_layers {
        for spec in cfg.layer_tensors(l) {
            let rel = spec.name.splitn(4, '.').nth(3).unwrap_or_default();
            let first = format!("model.layers.0.{rel}");
            if let Some(module) = crate::frontend::quant::linear_module(&spec.name, &spec.shape) {
                let (this, want) = (linear(module), linear(first.trim_end_matches(".weight")));
                if this != want {
                    bail!("{}: `{module}` is {this} but layer 0 quantizes it as {want}; per-layer quant types must match layer 0", quant.path.display());
                }
            }
            if let Some(norm) = spec.name.strip_suffix("norm.weight") {
                let bias = format!("{norm}norm.bias");
                let first_bias = format!("{}norm.bias", first.trim_end_matches("norm.weight"));
                if ckpt.has_tensor(&bias) != ckpt.has_tensor(&first_bias) {
                    bail!("{}: `{bias}` and `{first_bias}` must both exist or both be absent (smoothed norms must match layer 0)", ckpt.dir().display());
                }
            }
        }
    }
    let has_tensor = |name: &str| ckpt.has_tensor(name);
    let plan = crate::import::QuantPlan {
        linear: &linear,
        kv_int8: quant.kv_int8,
        has_tensor: &has_tensor,
        shared_qkv_input: shared_qkv_input(ckpt, &linear),
    };
    crate::import::build_quant_module(cfg, dtype_of, kv, &plan)
}

/// True when every layer's q, k and v projections are static W8A8 with
/// bitwise equal `input_scale` and `input_offset` tensors (see
/// `QuantPlan::shared_qkv_input`); a missing or unreadable tensor counts
/// as not shared (the import then reports it where it is read).
fn shared_qkv_input(ckpt: &Checkpoint, linear: &dyn Fn(&str) -> crate::frontend::quant::QuantType) -> bool {
    let cfg = ckpt.config();
    (0..cfg.num_hidden_layers).all(|l| {
        let module = |p: &str| format!("model.layers.{l}.self_attn.{p}_proj");
        let modules = ["q", "k", "v"].map(module);
        let all_static = modules.iter().all(|m| linear(m) == crate::frontend::quant::QuantType::W8A8);
        all_static
            && ["input_scale", "input_offset"].iter().all(|what| {
                let info = |m: &String| {
                    let name = format!("{m}.{what}");
                    let (dtype, shape, _) = ckpt.tensor_info(&name)?;
                    Some((dtype, shape, ckpt.tensor_bytes(&name).ok()?.to_vec()))
                };
                let first = info(&modules[0]);
                first.is_some() && modules[1..].iter().all(|m| info(m) == first)
            })
    })
}

#[derive(Args, Debug, Clone)]
pub struct QuantizeArgs {
    /// A float (bf16/f16/f32) Hugging Face checkpoint directory.
    pub model: PathBuf,
    /// Output directory for the msModelSlim-format checkpoint.
    #[arg(short = 'o', long)]
    pub out: PathBuf,
    /// w8a8-dynamic (per-channel weights, per-token activations) or w8a8
    /// (static per-tensor activations; needs calibration).
    #[arg(long, default_value = "w8a8-dynamic")]
    pub scheme: crate::quantize::Scheme,
    /// Also write C8 int8 KV-cache scales (needs calibration).
    #[arg(long)]
    pub kv_int8: bool,
    /// Calibration prompts: JSONL with one {"tokens": [ids...]} per line.
    #[arg(long, value_name = "FILE.jsonl", conflicts_with = "calib_synthetic")]
    pub calib: Option<PathBuf>,
    /// Calibrate on N pseudo-random prompts of 32 tokens instead.
    #[arg(long, value_name = "N")]
    pub calib_synthetic: Option<usize>,
    /// Smoothing migration strength: per-channel factors (the max over
    /// every linear a norm feeds, experts on their routed tokens) folded
    /// into the norms. Smoothing runs whenever calibration prompts are given.
    #[arg(long, default_value_t = 0.6)]
    pub alpha: f32,
    /// Calibrate without smoothing.
    #[arg(long)]
    pub no_smooth: bool,
    /// Quantize the router (`mlp.gate`) too, instead of keeping it FLOAT.
    #[arg(long)]
    pub no_router_protect: bool,
    /// No expert-level calibration balance: every expert's routed
    /// statistics come from whatever the calibration prompts route to it.
    #[arg(long)]
    pub no_balance: bool,
    /// Evaluation prompts (32 tokens each) of the quantization report.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub eval_prompts: usize,
    /// Skip the quantization report (it quantizes and evaluates the model
    /// once more per enabled technique).
    #[arg(long)]
    pub no_report: bool,
    /// Replace a non-empty output directory.
    #[arg(long)]
    pub force: bool,
}

/// `panguc quantize MODEL -o QMODEL`: write a W8A8 / W8A8_DYNAMIC checkpoint
/// in msModelSlim's format: per-channel / per-token int8, with the router
/// kept float, and expert-aware smoothing and calibration balance when
/// calibration prompts are given; then print and write
/// QMODEL/quant_report.json.
pub fn quantize(a: QuantizeArgs) -> Result<()> {
    let ckpt = open_checkpoint(&a.model, false)?;
    let vocab = ckpt.config().vocab_size;
    let calib = match (&a.calib, a.calib_synthetic) {
        (Some(path), _) => crate::run_batch::read_prompts(path, vocab)?,
        (None, Some(n)) => synthetic_prompts(n, 32, vocab),
        (None, None) => vec![],
    };
    check_output_dir(&a.out, a.force)?;
    let staging = crate::staging::Staging::create(&a.out)?;
    if !(a.alpha > 0.0 && a.alpha < 1.0) {
        bail!("--alpha must be between 0 and 1 (exclusive), got {}", a.alpha);
    }
    let smooth_alpha = (!a.no_smooth && !calib.is_empty()).then_some(a.alpha);
    let opts = crate::quantize::QuantizeOptions { scheme: a.scheme, kv_int8: a.kv_int8, calib, smooth_alpha };
    let techniques = crate::quantize::Techniques {
        router_protect: !a.no_router_protect,
        balance: (!a.no_balance).then_some(crate::quantize::BALANCE_RATIO),
    };
    let (summary, report) = if a.no_report {
        let cal = if crate::quantize::needs_calibration(&opts) {
            anyhow::ensure!(
                !opts.calib.is_empty(),
                "static W8A8, the int8 KV cache and smoothing need calibration prompts"
            );
            crate::quantize::calibrate_with(&ckpt, &opts.calib, techniques.balance)?
        } else {
            crate::quantize::Calibration::default()
        };
        (crate::quantize::write_quantized_with(&ckpt, staging.path(), &opts, &techniques, &cal)?, None)
    } else {
        if a.eval_prompts == 0 {
            bail!("--eval-prompts must be at least 1 (or pass --no-report)");
        }
        let eval = crate::quant_report::eval_prompts(a.eval_prompts, vocab);
        let (s, r) = crate::quant_report::quantize_with_report(&ckpt, staging.path(), &opts, &techniques, &eval)?;
        (s, Some(r))
    };
    staging.install(&a.out)?;
    if let Some(r) = report {
        print!("{}", r.table());
        println!("report: {}", a.out.join(crate::quant_report::REPORT_FILE).display());
    }
    let bytes: Vec<String> = summary.bytes_by_dtype.iter().map(|(d, b)| format!("{d} {b}")).collect();
    println!(
        "wrote {} ({} linear modules quantized, {} tensors; bytes: {})",
        a.out.display(),
        summary.quantized_modules,
        summary.tensors,
        bytes.join(", ")
    );
    Ok(())
}

/// `n` deterministic pseudo-random prompts of `len` tokens in `0..vocab`.
pub fn synthetic_prompts(n: usize, len: usize, vocab: usize) -> Vec<Vec<i64>> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            (0..len)
                .map(|_| {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((x >> 33) % vocab as u64) as i64
                })
                .collect()
        })
        .collect()
}

#[derive(Args, Debug, Clone)]
pub struct VerifyArgs {
    /// A compiled package directory.
    pub package: PathBuf,
}

/// `panguc verify PKG`: hash every file of the package (and of each rank's
/// package) against its manifest and record the verification stamp.
pub fn verify(a: VerifyArgs) -> Result<()> {
    if !panguc_runtime::is_package(&a.package) {
        bail!("{} is not a package (no manifest.json)", a.package.display());
    }
    let t0 = std::time::Instant::now();
    let r = panguc_runtime::stamp::verify_package_tree(&a.package, panguc_runtime::package::Verify::Full)?;
    emit(&format!(
        "package {} verified: {} files, {:.1} MB hashed in {:.2} s; {}\n",
        a.package.display(),
        r.files,
        r.hashed_bytes as f64 / 1e6,
        t0.elapsed().as_secs_f64(),
        if r.stamp_written { "verification stamp recorded" } else { "verification stamp unchanged" }
    ));
    Ok(())
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
    /// Print every figure as one JSON object on stdout (the text report
    /// goes to stderr), or with a FILE write it there.
    #[arg(long, value_name = "FILE", num_args = 0..=1)]
    pub json: Option<Option<PathBuf>>,
    /// Also quantize the checkpoint with this scheme (w8a8-dynamic or
    /// w8a8; kept in the bench directory until the options change) and
    /// measure it beside bf16 in the same run.
    #[arg(long, value_name = "SCHEME")]
    pub quant: Option<crate::quantize::Scheme>,
    /// With --quant: quantize the KV cache to int8 (C8) too.
    #[arg(long, requires = "quant")]
    pub kv_int8: bool,
    /// With --quant: synthetic calibration prompts (32 tokens each).
    #[arg(long, value_name = "N", default_value_t = 2, requires = "quant")]
    pub calib_synthetic: usize,
    /// Measure only the batched decode (batch 1, 4, 16, 64 at context 512)
    /// and the bandwidth and peak of its rooflines: a quick loop for tuning.
    #[arg(long, conflicts_with = "quant")]
    pub batched_decode_only: bool,
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
    opts.json = a.json.is_some();
    opts.json_file = a.json.flatten();
    opts.batched_decode_only = a.batched_decode_only;
    if a.calib_synthetic == 0 {
        bail!("--calib-synthetic must be at least 1");
    }
    opts.quant = a.quant.map(|scheme| crate::bench_quant::QuantBenchOptions {
        scheme,
        kv_int8: a.kv_int8,
        calib_prompts: a.calib_synthetic,
    });
    crate::bench::run_bench(&opts, &crate::bench::pipeline_fuse)
}

/// Write to stdout; a closed pipe (`panguc dump-ir ... | head`) is not an
/// error worth a panic, so write failures are ignored.
pub fn emit(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|_| out.flush());
}
