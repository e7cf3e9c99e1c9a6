//! The lowering pipeline of `panguc compile`: fusion (e-graph saturation
//! and extraction), optional translation validation, estimates, and the
//! fusion report. Thin glue over `panguc_lowering`; the caller writes the
//! package, the manifest and `report.json`.

use crate::frontend::quant::QuantType;
use crate::frontend::Checkpoint;
use crate::import::{build_quant_module, KvLayout, QuantPlan, LAYER_FN};
use anyhow::{anyhow, Context, Result};
use panguc_ir::text::print_module;
use panguc_ir::{DType, Module, PanguConfig, WeightSource};
use panguc_lowering::estimate::{estimates, EstimateSpec};
use panguc_lowering::fuse::{fuse_module, FuseOptions, Limits, DEFAULT_COST_PROFILE};
use panguc_lowering::profile::ServingParams;
use panguc_lowering::published::{published_section, QuantProgram};
use panguc_lowering::report::{build_report, ReportInput};
use panguc_lowering::validate::{random_weights, validate_session, ValidationReport};
use panguc_lowering::{builtin_profiles, HardwareProfile};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Options of the pipeline (CLI flags of `panguc compile`).
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    /// `--iter-limit`: saturation iterations per function.
    pub iter_limit: usize,
    /// `--node-limit`: e-nodes per function's e-graph.
    pub node_limit: usize,
    /// `--time-limit`: saturation wall time per function.
    pub time_limit: Duration,
    /// `--profiles FILE`: TOML/JSON overrides of the hardware profiles.
    pub profile_file: Option<PathBuf>,
    /// `--dump-ir DIR`: canonical IR after every pass, numbered.
    pub dump_ir: Option<PathBuf>,
    /// `--validate`: compare fused and unfused under the interpreter.
    pub validate: bool,
    /// `--cost-profile NAME`: the profile extraction minimises time on.
    pub cost_profile: String,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        let l = Limits::default();
        PipelineOptions {
            iter_limit: l.iter_limit,
            node_limit: l.node_limit,
            time_limit: l.time_limit,
            profile_file: None,
            dump_ir: None,
            validate: false,
            cost_profile: DEFAULT_COST_PROFILE.to_string(),
        }
    }
}

#[derive(Debug)]
pub struct PipelineOutput {
    /// The fused module.
    pub module: Module,
    /// The whole `report.json` object (phases `scheduling` and `codegen`
    /// are 0.0 for the caller to fill).
    pub report: serde_json::Value,
    /// Human summary for the terminal.
    pub summary: String,
}

/// Tokens of the prefill that validation runs before its decode step.
const VALIDATION_PREFILL: usize = 4;
/// Seed of validation's random tokens (and weights, when the checkpoint has none).
const VALIDATION_SEED: u64 = 0x5eed;
/// Random weights are generated for config-only validation up to this
/// many parameters (1 GiB of f32); beyond, validation needs real weights.
const MAX_RANDOM_PARAMS: u64 = 1 << 28;

/// The hardware profiles (`--profiles` overrides applied) and the fusion
/// options of `opts`.
fn fuse_options(opts: &PipelineOptions) -> Result<(Vec<HardwareProfile>, FuseOptions)> {
    let profiles = match &opts.profile_file {
        Some(p) => HardwareProfile::load_overrides(p)?,
        None => builtin_profiles(),
    };
    let profile = profiles.iter().find(|p| p.name == opts.cost_profile).cloned().ok_or_else(|| {
        let known: Vec<&str> = profiles.iter().map(|p| p.name.as_str()).collect();
        anyhow!("unknown cost profile `{}` (known profiles: {})", opts.cost_profile, known.join(", "))
    })?;
    let limits = Limits { iter_limit: opts.iter_limit, node_limit: opts.node_limit, time_limit: opts.time_limit };
    Ok((profiles, FuseOptions { limits, profile, ..FuseOptions::default() }))
}

/// `--validate`: the interpreter runs `imported` and `fused` on the same
/// steps (the checkpoint's weights, or random ones for a config-only
/// compile) and fails if they differ.
fn validate(ckpt: &Checkpoint, imported: &Module, fused: &Module) -> Result<ValidationReport> {
    let random;
    let (weights, kind): (&dyn WeightSource, &str) = if ckpt.has_weights() {
        (ckpt, "checkpoint")
    } else {
        random = random_weights(imported, VALIDATION_SEED, MAX_RANDOM_PARAMS)?;
        (&random, "random")
    };
    validate_session(imported, fused, weights, kind, VALIDATION_PREFILL, VALIDATION_SEED)
}

/// The module a CPU package is compiled from: `batched` (the ragged-batch
/// import over a paged KV cache) fused with the options of `opts`, and with
/// `--validate` checked against the unfused batched module on ragged steps.
/// `--dump-ir` shows the one-sequence pipeline only.
pub fn fuse_batched(ckpt: &Checkpoint, batched: &Module, opts: &PipelineOptions) -> Result<Module> {
    let (_, fuse_opts) = fuse_options(opts)?;
    let (fused, _) = fuse_module(batched, &fuse_opts, |_, _| Ok(()))?;
    if opts.validate {
        validate(ckpt, batched, &fused).context("validating the batched (paged KV cache) module")?;
    }
    Ok(fused)
}

pub fn run_pipeline(
    ckpt: &Checkpoint,
    imported: &Module,
    import_seconds: f64,
    opts: &PipelineOptions,
) -> Result<PipelineOutput> {
    let (profiles, fuse_opts) = fuse_options(opts)?;
    let limits = fuse_opts.limits.clone();

    let mut dump = Dumper::new(opts.dump_ir.as_deref())?;
    dump.write("import", imported)?;
    let (fused, stats) = fuse_module(imported, &fuse_opts, |pass, m| dump.write(pass, m))?;

    let validation = if opts.validate { Some(validate(ckpt, imported, &fused)?) } else { None };

    let estimates = estimates(ckpt.config(), &fused, imported, &profiles, &EstimateSpec::default())?;
    let published = published(ckpt.config(), &fuse_opts, &profiles)?;
    let (report, summary) = build_report(&ReportInput {
        import_seconds,
        stats: &stats,
        limits: &limits,
        cost_profile: &opts.cost_profile,
        layer_fn: LAYER_FN,
        estimates,
        validation: validation.as_ref(),
    });
    let mut report = report;
    report["published"] = published;
    Ok(PipelineOutput { module: fused, report, summary })
}

/// Tokens per KV block of the program the published figures are estimated
/// from (vllm-ascend's block size on Ascend).
const PUBLISHED_BLOCK_SIZE: usize = 128;

/// The W8A8_DYNAMIC program of `cfg` as vllm-ascend deploys it, built from
/// the config alone: every attention, expert and shared-expert linear int8
/// with per-channel weight scales and per-token activation scales; the
/// router, embeddings, norms and lm_head float; the KV cache float (the
/// published table says W8A8 only, so no C8 is assumed). One ragged batch
/// step over a paged cache, fused with the options of the main program.
pub fn published_program(cfg: &PanguConfig, fuse_opts: &FuseOptions) -> Result<Module> {
    // vllm-ascend keeps the router float: the `quantize` command's default.
    let techniques = crate::quantize::Techniques::PLAIN;
    let quantized = |module: &str| crate::quantize::quantized_module(module, &techniques);
    let float = crate::inspect::declared_dtype(cfg);
    let dtype_of = |name: &str| match name.rsplit_once('.') {
        Some((module, "weight")) if quantized(module) => DType::I8,
        Some((_, "weight_scale" | "weight_offset")) => DType::F32,
        _ => float,
    };
    let linear = |module: &str| if quantized(module) { QuantType::W8A8Dynamic } else { QuantType::Float };
    let no_tensor = |_: &str| false;
    let plan = QuantPlan { linear: &linear, kv_int8: false, has_tensor: &no_tensor, shared_qkv_input: false };
    let kv = KvLayout::Paged { block_size: PUBLISHED_BLOCK_SIZE };
    let imported = build_quant_module(cfg, &dtype_of, kv, &plan).context("building the W8A8 program")?;
    let (fused, _) = fuse_module(&imported, fuse_opts, |_, _| Ok(())).context("fusing the W8A8 program")?;
    Ok(fused)
}

/// The report's `published` section: the W8A8 program's estimates beside
/// the published figures (panguc_lowering::published).
fn published(cfg: &PanguConfig, fuse_opts: &FuseOptions, profiles: &[HardwareProfile]) -> Result<serde_json::Value> {
    let fused = published_program(cfg, fuse_opts)?;
    let program =
        panguc_lowering::schedule::schedule(&fused, &Default::default()).context("scheduling the W8A8 program")?;
    let layer = fused.function(LAYER_FN).ok_or_else(|| anyhow!("the W8A8 program has no @{LAYER_FN}"))?;
    let description = serde_json::json!({
        "built_from": "the model config alone",
        "scheme": "W8A8_DYNAMIC (attention, routed and shared experts)",
        "float": "embeddings, norms, router, lm_head",
        "kv_cache": "float (activation dtype): the published table states W8A8 only",
        "kv_block_size": PUBLISHED_BLOCK_SIZE,
        "kernels_per_decoder_layer": panguc_lowering::kernel_count(layer),
        "scheduled_launches_per_step": program.launches.len(),
    });
    let prog = QuantProgram { module: &fused, block_size: PUBLISHED_BLOCK_SIZE, description };
    published_section(cfg, &prog, profiles, &ServingParams::default())
}

/// Writes `NN-<pass>.ir` files into the `--dump-ir` directory.
struct Dumper<'a> {
    dir: Option<&'a Path>,
    next: usize,
}

impl<'a> Dumper<'a> {
    fn new(dir: Option<&'a Path>) -> Result<Self> {
        if let Some(d) = dir {
            std::fs::create_dir_all(d).with_context(|| format!("creating --dump-ir directory {}", d.display()))?;
        }
        Ok(Dumper { dir, next: 0 })
    }

    fn write(&mut self, pass: &str, m: &Module) -> Result<()> {
        let Some(dir) = self.dir else { return Ok(()) };
        let path = dir.join(format!("{:02}-{pass}.ir", self.next));
        self.next += 1;
        std::fs::write(&path, print_module(m)).with_context(|| format!("writing {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::import;
    use crate::synth::{synth_with, Preset, SynthOptions};
    use panguc_ir::DType;

    fn tiny() -> (tempfile::TempDir, Checkpoint, Module) {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("tiny");
        synth_with(&out, &SynthOptions { preset: Preset::Tiny, seed: 0, dtype: DType::BF16, force: false }).unwrap();
        let ckpt = Checkpoint::open(&out).unwrap();
        let m = import(&ckpt).unwrap();
        (dir, ckpt, m)
    }

    #[test]
    fn tiny_model_fuses_validates_and_reports() {
        let (dir, ckpt, m) = tiny();
        let dump = dir.path().join("dump");
        let opts = PipelineOptions { validate: true, dump_ir: Some(dump.clone()), ..PipelineOptions::default() };
        let out = run_pipeline(&ckpt, &m, 0.01, &opts).unwrap();
        let r = &out.report;
        for key in ["import", "saturation", "extraction", "scheduling", "codegen"] {
            assert!(r["phases"][key].is_number(), "phases.{key}");
        }
        for key in ["nodes", "classes", "iterations", "stop_reason"] {
            assert!(!r["egraph"][key].is_null(), "egraph.{key}");
        }
        assert_eq!(r["egraph"]["stop_reason"], "saturated");
        let fused = r["kernels_per_decoder_layer"]["fused"].as_u64().unwrap();
        let unfused = r["kernels_per_decoder_layer"]["unfused"].as_u64().unwrap();
        assert!(fused <= 10 && unfused > 30, "{unfused} -> {fused}");
        for rule in ["rmsnorm", "add-rmsnorm", "merge-qkv", "qkv-rope", "flash-attention", "grouped-matmul"] {
            assert!(r["rules_fired"][rule].as_u64().unwrap_or(0) > 0, "{rule} did not fire");
            assert!(r["rules_chosen"][rule].as_u64().unwrap_or(0) > 0, "{rule} was not chosen");
        }
        assert_eq!(r["validation"]["weights"], "checkpoint");
        assert!(r["validation"]["checks"].as_array().unwrap().len() >= 2 * 5, "prefill + decode, logits + caches");
        let est = &r["estimates"]["profiles"]["ascend910b1"];
        assert!(est["decode_batch_1"]["weight_read_ratio"].as_f64().unwrap() <= 1.05);
        assert!(est["decode_batch_64"]["ms_per_step"].as_f64().unwrap() > 0.0);
        assert!(est["prefill_2048"]["ms"].as_f64().unwrap() > 0.0);
        // The published section exists for any model; its estimates are of
        // this model, which is not the published configuration.
        assert_eq!(r["published"]["model_is_published_config"], false);
        check_published_section(&r["published"]);
        let files: Vec<String> =
            std::fs::read_dir(&dump).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        for f in ["00-import.ir", "01-fuse-decoder_layer.ir", "02-fuse-main.ir"] {
            assert!(files.contains(&f.to_string()), "{f} in {files:?}");
        }
        let last = std::fs::read_to_string(dump.join("02-fuse-main.ir")).unwrap();
        assert_eq!(panguc_ir::text::parse_module(&last).unwrap(), out.module);
        assert!(out.summary.contains("fusion @decoder_layer"), "{}", out.summary);
    }

    #[test]
    fn small_limits_warn_and_stay_correct() {
        let (_dir, ckpt, m) = tiny();
        for (opts, flag) in [
            (PipelineOptions { iter_limit: 1, validate: true, ..PipelineOptions::default() }, "--iter-limit"),
            (PipelineOptions { node_limit: 10, validate: true, ..PipelineOptions::default() }, "--node-limit"),
        ] {
            let out = run_pipeline(&ckpt, &m, 0.0, &opts).unwrap();
            assert!(out.summary.contains(flag), "{}", out.summary);
            assert_ne!(out.report["egraph"]["stop_reason"], "saturated");
            let fused = out.report["kernels_per_decoder_layer"]["fused"].as_u64().unwrap();
            let unfused = out.report["kernels_per_decoder_layer"]["unfused"].as_u64().unwrap();
            assert!(fused > 7 && fused <= unfused, "less fused: {fused} of {unfused}");
        }
    }

    #[test]
    fn unknown_cost_profile_and_bad_profile_file_are_errors() {
        let (dir, ckpt, m) = tiny();
        let opts = PipelineOptions { cost_profile: "tpu".into(), ..PipelineOptions::default() };
        let err = run_pipeline(&ckpt, &m, 0.0, &opts).unwrap_err().to_string();
        assert!(err.contains("unknown cost profile `tpu`"), "{err}");
        let file = dir.path().join("hw.toml");
        std::fs::write(&file, "[ascend910b1]\nhbm = 1\n").unwrap();
        let opts = PipelineOptions { profile_file: Some(file), ..PipelineOptions::default() };
        let err = run_pipeline(&ckpt, &m, 0.0, &opts).unwrap_err().to_string();
        assert!(err.contains("unknown field `hbm`") && err.contains("hw.toml"), "{err}");
    }

    /// Every estimated figure has a positive estimate and the relative error
    /// of that estimate against the published value.
    fn check_published_section(published: &serde_json::Value) {
        assert!(published["parameters"].as_array().unwrap().iter().all(|p| p["provenance"]["kind"].is_string()));
        assert!(published["program"]["kernels_per_decoder_layer"].as_u64().unwrap() > 0);
        for f in published["figures"].as_array().unwrap() {
            if f["estimate"].is_null() {
                assert!(f["not_estimated"].is_string(), "{f}");
                continue;
            }
            let (est, publ) = (f["estimate"].as_f64().unwrap(), f["published"].as_f64().unwrap());
            assert!(est > 0.0, "{f}");
            let want = ((est - publ) / publ * 1e4).round() / 1e4;
            assert_eq!(f["relative_error"].as_f64().unwrap(), want, "{f}");
            assert_eq!(f["configuration"]["scheme"], "W8A8_DYNAMIC");
        }
    }

    #[test]
    fn real_72b_config_fuses_to_at_most_ten_kernels_per_layer() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/pangu-pro-moe-72b");
        let ckpt = Checkpoint::open(&dir).unwrap();
        let m = import(&ckpt).unwrap();
        let out = run_pipeline(&ckpt, &m, 0.0, &PipelineOptions::default()).unwrap();
        let r = &out.report;
        assert!(r["kernels_per_decoder_layer"]["fused"].as_u64().unwrap() <= 10);
        let est = &r["estimates"];
        let b1 = &est["profiles"]["ascend910b1"]["decode_batch_1"];
        let ratio = b1["weight_read_ratio"].as_f64().unwrap();
        assert!((1.0..=1.05).contains(&ratio), "fused weight reads / ideal = {ratio}");
        let unfused_ratio =
            est["profiles"]["ascend910b1"]["unfused"]["decode_batch_1_weight_read_ratio"].as_f64().unwrap();
        assert!(unfused_ratio > 3.0, "the dense experts read every expert: {unfused_ratio}");
        let published = &r["published"];
        assert_eq!(published["model_is_published_config"], true);
        check_published_section(published);
        // Every figure of docs/pangu-pro-moe.md but the MTP row is estimated.
        let figures = published["figures"].as_array().unwrap();
        let estimated: Vec<&serde_json::Value> = figures.iter().filter(|f| !f["estimate"].is_null()).collect();
        assert_eq!((figures.len(), estimated.len()), (6, 5));
        // One parameter set puts every estimated figure within 25%
        // (`profile::JOINT_FIT`).
        assert_eq!(published["within_25_percent"], 5, "{}", published["figures"]);
        assert!(published["max_abs_relative_error"].as_f64().unwrap() <= 0.25);
        let by_name = |name: &str| figures.iter().find(|f| f["figure"] == name).unwrap_or_else(|| panic!("{name}"));
        let b1 = by_name("Ascend 800I A2 decode batch 1");
        assert_eq!((b1["published"].as_f64(), b1["configuration"]["devices"].as_u64()), (Some(18.44), Some(4)));
        assert_eq!(b1["configuration"]["plan"], "ep");
        assert_eq!(by_name("Ascend 300I Duo decode batch 80")["configuration"]["devices"], 8);
        assert_eq!(by_name("Ascend 300I Duo decode batch 80")["configuration"]["plan"], "h2p");
        // Decode batch 1 on one of 4 cards reads the int8 program's weights:
        // one byte per attention, shared-expert and routed-expert weight
        // (the card's own 16 experts: the 2 its groups select when the
        // program gathers experts, all 16 while it computes them densely),
        // plus the bf16 lm_head and, within 1%, scales, router and norms.
        let bytes = b1["breakdown"]["weight_bytes"].as_f64().unwrap();
        let (attention, shared, expert) = (62_914_560.0, 82_575_360.0, 3.0 * 1344.0 * 5120.0);
        let lm_head = 2.0 * 153_376.0 * 5120.0;
        let int8 = |experts: f64| 48.0 * (attention + shared + experts * expert) + lm_head;
        // The grouped int8 GEMM's cost reads MoGE's exactly one expert per
        // group (8 for one token, 2 on each of 4 cards), so the estimate is
        // this hand count plus under 1% of scales, router and norms; an
        // f16/bf16 count would be twice it.
        let close = |want: f64| bytes >= want && bytes <= 1.01 * want;
        assert!(close(int8(2.0)) || close(int8(16.0)), "{bytes} vs {} / {}", int8(2.0), int8(16.0));
        let bf16 = est["profiles"]["ascend910b1"]["decode_batch_1"]["weight_bytes"].as_f64().unwrap();
        assert_ne!(bytes, bf16);
        // Validation of a config-only 72B model would need 72B random weights.
        let opts = PipelineOptions { validate: true, ..PipelineOptions::default() };
        let err = run_pipeline(&ckpt, &m, 0.0, &opts).unwrap_err().to_string();
        assert!(err.contains("validation needs weights"), "{err}");
    }
}
