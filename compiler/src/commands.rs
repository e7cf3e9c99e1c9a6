//! The CLI subcommands, as library functions so tests can drive them.

use crate::frontend::{Checkpoint, OpenOptions};
use crate::import::build_module;
use crate::synth::{synth_with, Preset, SynthOptions};
use anyhow::{bail, Context, Result};
use clap::Args;
use panguc_ir::{DType, Module};
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
        println!("{}", serde_json::to_string_pretty(&crate::inspect::inspect_json(&ckpt))?);
    } else {
        print!("{}", crate::inspect::inspect_text(&ckpt));
    }
    Ok(())
}

#[derive(Args, Debug, Clone)]
pub struct DumpIrArgs {
    pub model_dir: PathBuf,
    /// Pipeline stage to print.
    #[arg(long, default_value = "import")]
    pub stage: String,
    #[arg(long)]
    pub config_only: bool,
}

pub fn dump_ir(a: DumpIrArgs) -> Result<()> {
    let ckpt = open_checkpoint(&a.model_dir, a.config_only)?;
    let module = import(&ckpt)?;
    match a.stage.as_str() {
        "import" => print!("{}", panguc_ir::text::print_module(&module)),
        other => bail!("unknown --stage `{other}` (available: import)"),
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
    /// Execution engine: interp (reference interpreter).
    #[arg(long, default_value = "interp")]
    pub engine: String,
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
    let ckpt = open_checkpoint(&a.model, false)?;
    let cfg = ckpt.config().clone();
    validate_prompt(&a.tokens, cfg.vocab_size)?;
    if !ckpt.has_weights() {
        bail!("{}: the checkpoint has no weight files, so it cannot be run (config-only checkpoints can only be compiled)", a.model.display());
    }
    let module = import(&ckpt)?;
    let sampling =
        panguc_runtime::Sampling { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p, seed: a.seed };
    let eos = if a.stop_at_eos { cfg.eos_token_id } else { None };
    let generation = match a.engine.as_str() {
        "interp" => {
            let interp = panguc_ir::interp::Interpreter::new(&module, &ckpt);
            let mut session = panguc_ir::session::InterpSession::new(
                interp,
                cfg.num_hidden_layers,
                [cfg.num_key_value_heads, cfg.head_dim()],
            );
            panguc_runtime::generate(&mut session, &a.tokens, a.max_new_tokens, &sampling, eos)?
        }
        other => bail!("unknown --engine `{other}` for a checkpoint directory (available: interp)"),
    };
    if let Some(path) = &a.logits_out {
        write_logits_json(path, &a.tokens, &generation)?;
    }
    println!("{}", generation.generated.iter().map(i64::to_string).collect::<Vec<_>>().join(","));
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
    /// Output package directory.
    #[arg(short = 'o', long = "out")]
    pub out: PathBuf,
    /// Compile from config.json alone even if weights are present.
    #[arg(long)]
    pub config_only: bool,
}

pub fn compile(a: CompileArgs) -> Result<()> {
    let known = ["ir", "cpu", "ascend910b", "ascend310p"];
    for t in &a.target {
        if !known.contains(&t.as_str()) {
            bail!("unknown target `{t}` (known targets: {})", known.join(", "));
        }
    }
    let ckpt = open_checkpoint(&a.model_dir, a.config_only)?;
    let _module = import(&ckpt)?;
    bail!(
        "target(s) {} are not implemented yet in this build: nothing was written to {}",
        a.target.join(","),
        a.out.display()
    )
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
