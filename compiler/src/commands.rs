//! The CLI subcommands, as library functions so tests can drive them.

use crate::frontend::{Checkpoint, OpenOptions};
use crate::import::build_module;
use crate::synth::{synth_with, Preset, SynthOptions};
use anyhow::{bail, Context, Result};
use clap::Args;
use panguc_ir::{DType, Module, PanguConfig};
use std::io::Write;
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
}

pub fn dump_ir(a: DumpIrArgs) -> Result<()> {
    let ckpt = open_checkpoint(&a.model_dir, a.config_only)?;
    let module = import(&ckpt)?;
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
        "fused" => {
            let out = crate::pipeline::run_pipeline(&ckpt, &module, 0.0, &Default::default())?;
            emit(&module_text(&out.module)?)
        }
        "kernels" => {
            let out = crate::pipeline::run_pipeline(&ckpt, &module, 0.0, &Default::default())?;
            let program = panguc_lowering::schedule::schedule(&out.module, &Default::default())?;
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
    /// Prompt token ids, comma separated (prints the generated ids).
    #[arg(long, value_delimiter = ',', required_unless_present = "prompt", conflicts_with = "prompt")]
    pub tokens: Vec<i64>,
    /// Prompt text, encoded with the model's tokenizer (bos first); the
    /// answer is printed as text while it is generated. Repeat for a batch.
    #[arg(long)]
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
    /// Package verification on open: `stamp` (hash the small files, trust
    /// the verification stamp for unchanged weight files) or `full` (hash
    /// every byte).
    #[arg(long, default_value = "stamp")]
    pub verify: panguc_runtime::package::Verify,
    /// Load this CPU kernel tier (`x86-64-v3`, `avx512-bf16`) instead of
    /// the best one this CPU supports (also `$PANGUC_CPU_TIER`).
    #[arg(long, value_name = "TIER")]
    pub cpu_tier: Option<String>,
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
    let prompt = RunPrompt::resolve(&a, &a.model, &cfg)?;
    if !ckpt.has_weights() {
        bail!("{}: the checkpoint has no weight files, so it cannot be run (config-only checkpoints can only be compiled)", a.model.display());
    }
    let module = import(&ckpt)?;
    match a.engine.as_deref().unwrap_or("interp") {
        "interp" => {
            let mut new_session = |_context: usize| -> Result<Box<dyn panguc_runtime::Engine + '_>> {
                let interp = panguc_ir::interp::Interpreter::new(&module, &ckpt);
                Ok(Box::new(panguc_ir::session::InterpSession::new(
                    interp,
                    cfg.num_hidden_layers,
                    [cfg.num_key_value_heads, cfg.head_dim()],
                )))
            };
            prompt.run(&a, &cfg, &mut new_session)
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
    let sampling = sampling(a);
    let eos = if a.stop_at_eos { cfg.eos_token_id } else { None };
    let generation = panguc_runtime::generate(engine, &a.tokens, a.max_new_tokens, &sampling, eos)?;
    if let Some(path) = &a.logits_out {
        write_logits_json(path, &a.tokens, &generation)?;
    }
    emit(&format!("{}\n", generation.generated.iter().map(i64::to_string).collect::<Vec<_>>().join(",")));
    Ok(())
}

/// Builds an engine for one sequence that holds up to `context` tokens.
pub type EngineFactory<'e> = dyn FnMut(usize) -> Result<Box<dyn panguc_runtime::Engine + 'e>> + 'e;

/// What `panguc run` feeds the model: `--tokens` ids, or `--prompt` texts
/// encoded by the tokenizer of the model directory or package.
pub enum RunPrompt {
    Ids(Vec<i64>),
    Text { tokenizer: Box<panguc_runtime::Tokenizer>, prompts: Vec<Vec<i64>> },
}

impl RunPrompt {
    /// Encode the prompts (after the package or checkpoint at `dir` was
    /// verified) and check every id against the vocabulary.
    pub fn resolve(a: &RunArgs, dir: &Path, cfg: &PanguConfig) -> Result<RunPrompt> {
        if a.prompt.is_empty() {
            validate_prompt(&a.tokens, cfg.vocab_size)?;
            return Ok(RunPrompt::Ids(a.tokens.clone()));
        }
        let tokenizer = panguc_runtime::Tokenizer::open(dir, cfg)?;
        let mut prompts = vec![];
        for text in &a.prompt {
            let text = if a.chat {
                let mut turns = vec![];
                if let Some(system) = &a.system {
                    turns.push(panguc_runtime::chat::ChatMessage::new("system", system));
                }
                turns.push(panguc_runtime::chat::ChatMessage::new("user", text));
                tokenizer.render_chat(&turns)?
            } else {
                text.clone()
            };
            let ids = tokenizer.encode_prompt(&text)?;
            validate_prompt(&ids, cfg.vocab_size)
                .with_context(|| format!("the tokenizer in {} does not match the model", dir.display()))?;
            prompts.push(ids);
        }
        Ok(RunPrompt::Text { tokenizer: Box::new(tokenizer), prompts })
    }

    /// Tokens one sequence may hold: its prompt plus what it generates.
    pub fn context(&self, max_new_tokens: usize) -> usize {
        let longest = match self {
            RunPrompt::Ids(ids) => ids.len(),
            RunPrompt::Text { prompts, .. } => prompts.iter().map(Vec::len).max().unwrap_or(0),
        };
        (longest + max_new_tokens).max(1)
    }

    /// Generate and print: ids for `--tokens`; for one `--prompt` the text
    /// as it is generated (stopping at eos); for several, a batch whose
    /// texts are printed, labelled, when it is done.
    pub fn run(&self, a: &RunArgs, cfg: &PanguConfig, new_engine: &mut EngineFactory<'_>) -> Result<()> {
        let context = self.context(a.max_new_tokens);
        let (tokenizer, prompts) = match self {
            RunPrompt::Ids(ids) => {
                let mut engine = new_engine(context)?;
                let a = RunArgs { tokens: ids.clone(), ..a.clone() };
                return generate_and_report(engine.as_mut(), &a, cfg);
            }
            RunPrompt::Text { tokenizer, prompts } => (tokenizer, prompts),
        };
        let sampling = sampling(a);
        let eos = tokenizer.eos();
        if let [prompt] = prompts.as_slice() {
            let mut engine = new_engine(context)?;
            let mut text = tokenizer.stream();
            let mut stdout = std::io::stdout().lock();
            let mut on_token = |id: i64| -> Result<()> {
                stdout.write_all(text.push(id)?.as_bytes())?;
                stdout.flush()?;
                Ok(())
            };
            let generation = panguc_runtime::generate_streaming(
                engine.as_mut(),
                prompt,
                a.max_new_tokens,
                &sampling,
                eos,
                &mut on_token,
            )?;
            writeln!(stdout, "{}", text.finish()?)?;
            if let Some(path) = &a.logits_out {
                write_logits_json(path, prompt, &generation)?;
            }
            return Ok(());
        }
        if a.logits_out.is_some() {
            bail!("--logits-out takes one prompt, but {} were given", prompts.len());
        }
        let mut engines = prompts.iter().map(|_| new_engine(context)).collect::<Result<Vec<_>>>()?;
        let mut engines: Vec<&mut dyn panguc_runtime::Engine> =
            engines.iter_mut().map(|e| e.as_mut() as &mut dyn panguc_runtime::Engine).collect();
        let generations = panguc_runtime::generate_batch(&mut engines, prompts, a.max_new_tokens, &sampling, eos)?;
        let mut out = String::new();
        for (i, g) in generations.iter().enumerate() {
            out.push_str(&format!("[{i}] {}\n", tokenizer.decode(&g.generated)?));
        }
        emit(&out);
        Ok(())
    }
}

fn sampling(a: &RunArgs) -> panguc_runtime::Sampling {
    panguc_runtime::Sampling { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p, seed: a.seed }
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
    // at the end, so a failure never leaves a partial package behind.
    let parent = match a.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let staging = tempfile::Builder::new()
        .prefix(".panguc-staging-")
        .tempdir_in(&parent)
        .with_context(|| format!("creating a staging directory in {}", parent.display()))?;
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

    if a.out.exists() {
        std::fs::remove_dir_all(&a.out).with_context(|| format!("removing the old {}", a.out.display()))?;
    }
    let staged = staging.keep();
    std::fs::rename(&staged, &a.out)
        .with_context(|| format!("moving the package into place at {}", a.out.display()))?;
    // Verified once here, fully, so that runs only re-hash what changed.
    panguc_runtime::stamp::verify_package_tree(&a.out, panguc_runtime::package::Verify::Full)
        .with_context(|| format!("verifying the new package {}", a.out.display()))?;
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
    match kv {
        crate::import::KvLayout::Contiguous => build_module(cfg, &dtype_of),
        crate::import::KvLayout::Paged { block_size } => {
            crate::import::build_batched_module(cfg, &dtype_of, block_size)
        }
    }
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
    /// goes to stderr).
    #[arg(long)]
    pub json: bool,
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
    opts.json = a.json;
    crate::bench::run_bench(&opts, &crate::bench::pipeline_fuse)
}

/// Write to stdout; a closed pipe (`panguc dump-ir ... | head`) is not an
/// error worth a panic, so write failures are ignored.
pub fn emit(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|_| out.flush());
}
