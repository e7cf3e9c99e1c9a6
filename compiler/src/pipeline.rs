//! The lowering pipeline of `panguc compile`: fusion (e-graph saturation
//! and extraction), optional translation validation, estimates, and the
//! fusion report. Thin glue over `panguc_lowering`; the caller writes the
//! package, the manifest and `report.json`.

use crate::frontend::Checkpoint;
use crate::import::LAYER_FN;
use anyhow::{anyhow, Context, Result};
use panguc_ir::text::print_module;
use panguc_ir::{Module, WeightSource};
use panguc_lowering::estimate::{estimates, EstimateSpec};
use panguc_lowering::fuse::{fuse_module, FuseOptions, Limits, DEFAULT_COST_PROFILE};
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
    let (report, summary) = build_report(&ReportInput {
        import_seconds,
        stats: &stats,
        limits: &limits,
        cost_profile: &opts.cost_profile,
        layer_fn: LAYER_FN,
        estimates,
        validation: validation.as_ref(),
    });
    Ok(PipelineOutput { module: fused, report, summary })
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
        assert_eq!(est["published"]["decode_batch_1_tpot_ms_4_cards"], 18.44);
        // Validation of a config-only 72B model would need 72B random weights.
        let opts = PipelineOptions { validate: true, ..PipelineOptions::default() };
        let err = run_pipeline(&ckpt, &m, 0.0, &opts).unwrap_err().to_string();
        assert!(err.contains("validation needs weights"), "{err}");
    }
}
