//! Synthetic checkpoints: random weights in the real Hugging Face on-disk
//! layout (config.json, `model-0000N-of-0000M.safetensors` shards and
//! `model.safetensors.index.json`) plus a small real SentencePiece
//! `tokenizer.model` ([`crate::synth_tokenizer`]), for tests and demos that
//! must not depend on downloading 144 GB.
//!
//! Output is deterministic: each tensor draws from its own ChaCha8 stream
//! (seed, tensor index), so values do not depend on sharding or dtype, and
//! nothing time- or host-dependent is written. The directory appears
//! atomically (built next to `out`, then renamed).

use crate::frontend::convert::{from_f32, st_dtype};
use crate::frontend::{shard_file_name, CONFIG_FILE, INDEX_FILE, SINGLE_FILE};
use anyhow::{bail, Context, Result};
use panguc_ir::config::TensorSpec;
use panguc_ir::{DType, PanguConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::TensorView;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Model sizes for synthetic checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// ~0.93M parameters; ~1.9 MB in bf16, two shards. For unit tests.
    Tiny,
    /// ~0.52B parameters; ~1 GB in bf16, a few hundred MB per shard.
    Small,
}

impl Preset {
    pub const ALL: [Preset; 2] = [Preset::Tiny, Preset::Small];

    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Small => "small",
        }
    }

    /// The preset's config (torch_dtype set to bf16; `synth` overrides it).
    pub fn config(self) -> PanguConfig {
        let (vocab, hidden, layers, heads, kv, moe, shared, experts, k) = match self {
            Preset::Tiny => (512, 64, 2, 4, 2, 32, 128, 64, 8),
            Preset::Small => (32000, 1024, 8, 8, 2, 256, 1024, 64, 8),
        };
        PanguConfig {
            architectures: vec![panguc_ir::config::ARCHITECTURE.to_string()],
            model_type: panguc_ir::config::MODEL_TYPE.to_string(),
            vocab_size: vocab,
            hidden_size: hidden,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            moe_intermediate_size: moe,
            shared_expert_intermediate_size: shared,
            num_experts: experts,
            num_experts_per_tok: k,
            hidden_act: "silu".to_string(),
            // Tiny head_dim is 16: with the real 1.6e7 almost every RoPE
            // frequency would be ~0 at test sequence lengths, hiding bugs.
            rope_theta: match self {
                Preset::Tiny => 10_000.0,
                Preset::Small => 16_000_000.0,
            },
            rms_norm_eps: 1e-5,
            max_position_embeddings: match self {
                Preset::Tiny => 4096,
                Preset::Small => 32768,
            },
            tie_word_embeddings: false,
            bos_token_id: Some(1),
            eos_token_id: Some(2),
            pad_token_id: Some(0),
            torch_dtype: Some("bfloat16".to_string()),
        }
    }

    /// Upper bound on tensor bytes per shard (HF `max_shard_size`).
    pub fn max_shard_bytes(self) -> u64 {
        match self {
            Preset::Tiny => 1_000_000,
            Preset::Small => 300_000_000,
        }
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Preset {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Preset::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| format!("unknown preset `{s}` (expected tiny or small)"))
    }
}

#[derive(Debug, Clone)]
pub struct SynthOptions {
    pub preset: Preset,
    pub seed: u64,
    /// bf16, f16 or f32.
    pub dtype: DType,
    /// Replace a non-empty existing output directory.
    pub force: bool,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct SynthReport {
    pub dir: PathBuf,
    /// Weight files, in order.
    pub shards: Vec<PathBuf>,
    /// Bytes of tensor data (the index's total_size).
    pub tensor_bytes: u64,
    /// Bytes of all files written (config, index, shards, tokenizer).
    pub file_bytes: u64,
}

/// Writes a random `preset` checkpoint to `out` (which must not exist or be
/// empty).
pub fn synth(out: &Path, preset: Preset, seed: u64, dtype: DType) -> Result<()> {
    synth_with(out, &SynthOptions { preset, seed, dtype, force: false }).map(|_| ())
}

pub fn synth_with(out: &Path, opts: &SynthOptions) -> Result<SynthReport> {
    let torch_dtype = match opts.dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F32 => "float32",
        other => bail!("cannot synthesize a checkpoint in {other}: use bf16, f16 or f32"),
    };
    let mut config = opts.preset.config();
    config.torch_dtype = Some(torch_dtype.to_string());
    let target = OutputDir::prepare(out, opts.force)?;
    let specs = config.expected_tensors();
    let gen = |index: usize, spec: &TensorSpec| -> Result<Vec<u8>> {
        let values = init_values(spec, opts.seed, index as u64);
        from_f32(&values, opts.dtype)
    };
    let shards = write_hf_checkpoint(
        target.tmp_path(),
        &full_config_json(&config),
        &specs,
        opts.dtype,
        opts.preset.max_shard_bytes(),
        gen,
    )?;
    let tokenizer = crate::synth_tokenizer::tokenizer_model(config.vocab_size)?;
    let tokenizer_path = target.tmp_path().join(panguc_runtime::tokenizer::SENTENCEPIECE_FILE);
    std::fs::write(&tokenizer_path, tokenizer).with_context(|| format!("cannot write {}", tokenizer_path.display()))?;
    let tensor_bytes = specs.iter().map(|s| s.numel() * opts.dtype.size_bytes() as u64).sum();
    let mut file_bytes = 0;
    for entry in std::fs::read_dir(target.tmp_path())? {
        file_bytes += entry?.metadata()?.len();
    }
    target.publish()?;
    Ok(SynthReport {
        dir: out.to_path_buf(),
        shards: shards.iter().map(|n| out.join(n)).collect(),
        tensor_bytes,
        file_bytes,
    })
}

/// config.json with every key the real checkpoint has, in its order
/// (transformers-style extras included so tools that read them work).
fn full_config_json(c: &PanguConfig) -> Value {
    json!({
        "architectures": c.architectures,
        "auto_map": {
            "AutoConfig": "configuration_pangu_moe.PanguProMoEConfig",
            "AutoModel": "modeling_pangu_moe.PanguProMoEModel",
            "AutoModelForCausalLM": "modeling_pangu_moe.PanguProMoEForCausalLM"
        },
        "model_type": c.model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "hidden_act": c.hidden_act,
        "max_position_embeddings": c.max_position_embeddings,
        "initializer_range": 0.02,
        "rms_norm_eps": c.rms_norm_eps,
        "use_cache": true,
        "tie_word_embeddings": c.tie_word_embeddings,
        "rope_theta": c.rope_theta,
        "attention_dropout": 0.0,
        "moe_intermediate_size": c.moe_intermediate_size,
        "shared_expert_intermediate_size": c.shared_expert_intermediate_size,
        "num_experts_per_tok": c.num_experts_per_tok,
        "num_experts": c.num_experts,
        "output_router_logits": false,
        "router_aux_loss_coef": 0.001,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id,
        "torch_dtype": c.torch_dtype,
        "transformers_version": "4.48.2"
    })
}

/// Splits tensors (in order) into shards the way transformers'
/// `save_pretrained(max_shard_size=...)` does: greedily, starting a new shard
/// when the next tensor would overflow the current one; an oversized tensor
/// gets a shard of its own.
pub fn plan_shards(sizes: &[u64], max_bytes: u64) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut acc) = (0, 0u64);
    for (i, &s) in sizes.iter().enumerate() {
        if i > start && acc + s > max_bytes {
            out.push(start..i);
            start = i;
            acc = 0;
        }
        acc += s;
    }
    if start < sizes.len() {
        out.push(start..sizes.len());
    }
    out
}

/// Writes config.json and the weights of `specs` into `dir` in the HF
/// layout: one `model.safetensors` if everything fits in one shard,
/// otherwise `model-0000N-of-0000M.safetensors` plus the index. `gen`
/// produces the little-endian bytes of tensor `i`; it is called shard by
/// shard so at most one shard's data is in memory. Returns the weight file
/// names.
pub fn write_hf_checkpoint(
    dir: &Path,
    config: &Value,
    specs: &[TensorSpec],
    dtype: DType,
    max_shard_bytes: u64,
    mut gen: impl FnMut(usize, &TensorSpec) -> Result<Vec<u8>>,
) -> Result<Vec<String>> {
    write_json(&dir.join(CONFIG_FILE), config)?;
    let elem = dtype.size_bytes() as u64;
    let sizes: Vec<u64> = specs.iter().map(|s| s.numel() * elem).collect();
    let plan = plan_shards(&sizes, max_shard_bytes);
    let names: Vec<String> = if plan.len() == 1 {
        vec![SINGLE_FILE.to_string()]
    } else {
        (1..=plan.len()).map(|i| shard_file_name(i, plan.len())).collect()
    };
    // transformers tags every file it writes with {"format": "pt"}.
    let file_meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let mut weight_map = BTreeMap::new();
    for (range, name) in plan.iter().zip(&names) {
        let data: Vec<Vec<u8>> = range.clone().map(|i| gen(i, &specs[i])).collect::<Result<_>>()?;
        let mut views = Vec::with_capacity(range.len());
        for (i, bytes) in range.clone().zip(&data) {
            let view = TensorView::new(st_dtype(dtype), specs[i].shape.clone(), bytes)
                .with_context(|| format!("tensor {} has the wrong number of bytes", specs[i].name))?;
            views.push((specs[i].name.as_str(), view));
            weight_map.insert(specs[i].name.clone(), name.clone());
        }
        let path = dir.join(name);
        safetensors::serialize_to_file(views, Some(file_meta.clone()), &path)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if names.len() > 1 {
        let index = json!({
            "metadata": {"total_size": sizes.iter().sum::<u64>()},
            "weight_map": weight_map,
        });
        write_json(&dir.join(INDEX_FILE), &index)?;
    }
    Ok(names)
}

/// Pretty JSON with a trailing newline, as transformers writes it.
fn write_json(path: &Path, v: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(v)?;
    text.push('\n');
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// How a tensor's values are drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Init {
    Normal,
    Uniform(f64, f64),
}

/// Initialisation of one tensor, chosen so a forward pass stays
/// well-conditioned:
/// - linear weights U(-1,1)·sqrt(3/fan_in)·0.5: unit-variance inputs give
///   outputs of standard deviation ~0.5, so the residual stream grows slowly;
/// - router gate: logits of standard deviation ~1.5 over the experts, so
///   the softmax is neither uniform nor one-hot;
/// - lm_head: logits of standard deviation ~1 (a distinct argmax);
/// - norms 1 ± 0.1, biases ±0.05, router_scale U(0.5, 1.5), embeddings N(0,1).
fn init_for(spec: &TensorSpec) -> Init {
    let name = spec.name.as_str();
    let fan_in = *spec.shape.last().unwrap_or(&1) as f64;
    let linear = |gain: f64| {
        let a = (3.0 / fan_in).sqrt() * gain;
        Init::Uniform(-a, a)
    };
    if name == "model.embed_tokens.weight" {
        Init::Normal
    } else if name.ends_with("layernorm.weight") || name == "model.norm.weight" {
        Init::Uniform(0.9, 1.1)
    } else if name.ends_with(".bias") {
        Init::Uniform(-0.05, 0.05)
    } else if name.ends_with("mlp.router_scale") {
        Init::Uniform(0.5, 1.5)
    } else if name.ends_with("mlp.gate.weight") {
        linear(1.5)
    } else if name == "lm_head.weight" {
        linear(1.0)
    } else {
        // q/k/v/o projections and expert/shared-expert MLPs.
        linear(0.5)
    }
}

/// Random values for one tensor from its own stream of the seeded generator.
fn init_values(spec: &TensorSpec, seed: u64, stream: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    let n = spec.numel() as usize;
    match init_for(spec) {
        Init::Normal => normal(&mut rng, n),
        Init::Uniform(lo, hi) => (0..n).map(|_| (lo + (hi - lo) * rng.random::<f64>()) as f32).collect(),
    }
}

/// Standard normal samples (Box–Muller).
fn normal(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        // 1 - U is in (0, 1], so the log is finite.
        let u1 = 1.0 - rng.random::<f64>();
        let u2 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let t = std::f64::consts::TAU * u2;
        out.push((r * t.cos()) as f32);
        if out.len() < n {
            out.push((r * t.sin()) as f32);
        }
    }
    out
}

/// A temporary directory next to the destination, renamed into place on
/// success and deleted on failure, so no partial output ever appears at
/// `out`.
struct OutputDir {
    tmp: tempfile::TempDir,
    out: PathBuf,
    parent: PathBuf,
    name: String,
}

impl OutputDir {
    fn prepare(out: &Path, force: bool) -> Result<OutputDir> {
        let Some(name) = out.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            bail!("output path {} has no directory name", out.display());
        };
        if out.exists() {
            if !out.is_dir() {
                bail!("output path {} exists and is not a directory", out.display());
            }
            let non_empty =
                std::fs::read_dir(out).with_context(|| format!("cannot list {}", out.display()))?.next().is_some();
            if non_empty && !force {
                bail!("output directory {} exists and is not empty (use --force to replace it)", out.display());
            }
        }
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).with_context(|| format!("cannot create {}", parent.display()))?;
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}.tmp-"))
            .tempdir_in(&parent)
            .with_context(|| format!("cannot create a temporary directory in {}", parent.display()))?;
        Ok(OutputDir { tmp, out: out.to_path_buf(), parent, name })
    }

    fn tmp_path(&self) -> &Path {
        self.tmp.path()
    }

    /// Moves the finished directory to `out`, replacing what is there (the
    /// caller already refused a non-empty `out` without `force`).
    fn publish(self) -> Result<()> {
        let out = &self.out;
        let mut backup = None;
        if out.exists() {
            // Move the old directory aside first so `out` is never missing
            // both the old and the new content for longer than one rename.
            let aside =
                tempfile::Builder::new().prefix(&format!(".{}.old-", self.name)).tempdir_in(&self.parent)?.keep();
            std::fs::rename(out, &aside).with_context(|| format!("cannot move {} aside", out.display()))?;
            backup = Some(aside);
        }
        let tmp = self.tmp.keep();
        if let Err(e) = std::fs::rename(&tmp, out) {
            // Put the old directory back and drop the new one.
            if let Some(aside) = &backup {
                let _ = std::fs::rename(aside, out);
            }
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e).with_context(|| format!("cannot move the new checkpoint into {}", out.display()));
        }
        if let Some(aside) = backup {
            std::fs::remove_dir_all(&aside).with_context(|| format!("cannot remove old {}", aside.display()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::Checkpoint;
    use panguc_ir::WeightSource;
    use std::fs;

    fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.file_name().to_string_lossy().into_owned(), fs::read(e.path()).unwrap())
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn tiny_opens_and_validates() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("tiny");
        let report =
            synth_with(&out, &SynthOptions { preset: Preset::Tiny, seed: 1, dtype: DType::BF16, force: false })
                .unwrap();
        let ck = Checkpoint::open(&out).unwrap();
        let c = ck.config();
        assert_eq!(c, &{
            let mut x = Preset::Tiny.config();
            x.torch_dtype = Some("bfloat16".into());
            x
        });
        assert_eq!(c.total_params(), 934_720);
        assert_eq!(report.tensor_bytes, 934_720 * 2);
        assert_eq!(report.shards.len(), 2);
        assert!(report.file_bytes < 2_000_000, "tiny bf16 is {} bytes", report.file_bytes);
        for s in &report.shards {
            let len = fs::metadata(s).unwrap().len();
            assert!(len <= 1_100_000, "{} is {len} bytes", s.display());
        }
        // Config carries the real file's extra keys too.
        let cfg: Value = serde_json::from_str(&fs::read_to_string(out.join(CONFIG_FILE)).unwrap()).unwrap();
        for key in ["auto_map", "transformers_version", "initializer_range", "torch_dtype"] {
            assert!(cfg.get(key).is_some(), "{key}");
        }
        // No temporary directories left behind.
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);
    }

    #[test]
    fn same_seed_same_bytes_other_seed_differs() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b, c) = (tmp.path().join("a"), tmp.path().join("b"), tmp.path().join("c"));
        synth(&a, Preset::Tiny, 42, DType::BF16).unwrap();
        synth(&b, Preset::Tiny, 42, DType::BF16).unwrap();
        synth(&c, Preset::Tiny, 43, DType::BF16).unwrap();
        let (fa, fb, fc) = (files(&a), files(&b), files(&c));
        assert_eq!(fa.iter().map(|f| &f.0).collect::<Vec<_>>(), fb.iter().map(|f| &f.0).collect::<Vec<_>>());
        assert!(fa == fb, "same seed must give byte-identical files");
        assert!(fa != fc, "different seeds must differ");
    }

    #[test]
    fn f32_shards_more_and_agrees_with_bf16() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        let r32 =
            synth_with(&a, &SynthOptions { preset: Preset::Tiny, seed: 5, dtype: DType::F32, force: false }).unwrap();
        synth(&b, Preset::Tiny, 5, DType::BF16).unwrap();
        assert_eq!(r32.shards.len(), 4);
        let (x, y) = (Checkpoint::open(&a).unwrap(), Checkpoint::open(&b).unwrap());
        let t = x.load_f32("model.embed_tokens.weight", &[512, 64]).unwrap();
        let u = y.load_f32("model.embed_tokens.weight", &[512, 64]).unwrap();
        assert!(t.max_rel_diff(&u, 1e-2) < 1e-2);
    }

    #[test]
    fn value_ranges_are_as_documented() {
        let stats = |name: &str, shape: &[usize]| {
            let v = init_values(&TensorSpec { name: name.into(), shape: shape.to_vec() }, 3, 11);
            let n = v.len() as f64;
            let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
            let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
            let (lo, hi) = v.iter().fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
            (mean, var.sqrt(), lo, hi)
        };
        let (m, s, _, _) = stats("model.embed_tokens.weight", &[512, 64]);
        assert!(m.abs() < 0.05 && (s - 1.0).abs() < 0.05, "embed mean {m} std {s}");
        let (_, _, lo, hi) = stats("model.layers.0.mlp.router_scale", &[1, 64]);
        assert!(lo >= 0.5 && hi <= 1.5);
        let (_, _, lo, hi) = stats("model.norm.weight", &[64]);
        assert!(lo >= 0.9 && hi <= 1.1);
        // linear: std = 0.5 * sqrt(3/fan_in) / sqrt(3) = 0.5 / sqrt(fan_in).
        let (_, s, _, _) = stats("model.layers.0.mlp.experts.0.down_proj.weight", &[64, 32]);
        assert!((s - 0.5 / 32f64.sqrt()).abs() < 0.01, "down_proj std {s}");
    }

    #[test]
    fn every_tensor_has_a_deliberate_init() {
        // A new tensor kind must not silently fall into the projection case.
        let default =
            |s: &TensorSpec| init_for(s) == init_for(&TensorSpec { name: "x.q_proj.weight".into(), ..s.clone() });
        for s in Preset::Tiny.config().expected_tensors() {
            if default(&s) {
                assert!(s.name.ends_with("_proj.weight"), "{} uses the projection init", s.name);
            }
        }
    }

    #[test]
    fn router_softmax_is_neither_uniform_nor_one_hot() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("t");
        synth(&out, Preset::Tiny, 9, DType::F32).unwrap();
        let ck = Checkpoint::open(&out).unwrap();
        let (e, h) = (64, 64);
        let gate = ck.load_f32("model.layers.0.mlp.gate.weight", &[e, h]).unwrap();
        let x = ck.load_f32("model.embed_tokens.weight", &[512, h]).unwrap();
        // Router input ~ rmsnorm(embedding): unit RMS rows.
        let mut maxes = Vec::new();
        for row in x.as_f32().chunks(h).take(64) {
            let rms = (row.iter().map(|v| v * v).sum::<f32>() / h as f32).sqrt();
            let logits: Vec<f32> =
                gate.as_f32().chunks(h).map(|g| g.iter().zip(row).map(|(a, b)| a * b / rms).sum()).collect();
            let mx = logits.iter().cloned().fold(f32::MIN, f32::max);
            let z: f32 = logits.iter().map(|l| (l - mx).exp()).sum();
            maxes.push(1.0 / z);
        }
        let mean_max = maxes.iter().sum::<f32>() / maxes.len() as f32;
        // Uniform would be 1/64 ≈ 0.016; one-hot would be 1.
        assert!(mean_max > 0.04 && mean_max < 0.5, "mean top probability {mean_max}");
    }

    #[test]
    fn refuses_non_empty_output_unless_forced() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("o");
        fs::create_dir(&out).unwrap();
        fs::write(out.join("keep.txt"), "x").unwrap();
        let msg = format!("{:#}", synth(&out, Preset::Tiny, 1, DType::BF16).unwrap_err());
        assert!(msg.contains("not empty") && msg.contains("--force"), "{msg}");
        assert!(out.join("keep.txt").exists());
        synth_with(&out, &SynthOptions { preset: Preset::Tiny, seed: 1, dtype: DType::BF16, force: true }).unwrap();
        assert!(!out.join("keep.txt").exists());
        Checkpoint::open(&out).unwrap();
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1, "no leftovers next to the output");
        // An empty existing directory is fine without force.
        let empty = tmp.path().join("e");
        fs::create_dir(&empty).unwrap();
        synth(&empty, Preset::Tiny, 1, DType::BF16).unwrap();
    }

    #[test]
    fn rejects_non_float_dtype_and_file_target() {
        let tmp = tempfile::tempdir().unwrap();
        let msg = format!("{:#}", synth(&tmp.path().join("x"), Preset::Tiny, 1, DType::I8).unwrap_err());
        assert!(msg.contains("i8"), "{msg}");
        let file = tmp.path().join("f");
        fs::write(&file, "x").unwrap();
        let msg = format!("{:#}", synth(&file, Preset::Tiny, 1, DType::BF16).unwrap_err());
        assert!(msg.contains("not a directory"), "{msg}");
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);
    }

    #[test]
    #[ignore = "writes ~1 GB; run manually"]
    fn small_synthesizes_and_opens() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("small");
        let t0 = std::time::Instant::now();
        let r = synth_with(&out, &SynthOptions { preset: Preset::Small, seed: 0, dtype: DType::BF16, force: false })
            .unwrap();
        let t1 = std::time::Instant::now();
        let ck = Checkpoint::open(&out).unwrap();
        eprintln!(
            "small: {} shards, {} file bytes, synth {:?}, open {:?}",
            r.shards.len(),
            r.file_bytes,
            t1 - t0,
            t1.elapsed()
        );
        assert_eq!(r.shards.len(), 4);
        assert_eq!(r.tensor_bytes, ck.config().total_params() * 2);
    }

    #[test]
    fn plan_shards_is_greedy_like_transformers() {
        assert_eq!(plan_shards(&[4, 4, 4], 8), vec![0..2, 2..3]);
        assert_eq!(plan_shards(&[10, 1, 1], 8), vec![0..1, 1..3]);
        assert_eq!(plan_shards(&[1, 10, 1], 8), vec![0..1, 1..2, 2..3]);
        assert_eq!(plan_shards(&[1, 1], 8), vec![0..2]);
        assert!(plan_shards(&[], 8).is_empty());
    }

    #[test]
    fn presets_parse_and_validate() {
        for p in Preset::ALL {
            assert_eq!(p.name().parse::<Preset>().unwrap(), p);
            let c = p.config();
            let again = PanguConfig::from_json_str(&full_config_json(&c).to_string(), p.name()).unwrap();
            assert_eq!(again, c);
        }
        assert!("huge".parse::<Preset>().unwrap_err().contains("tiny or small"));
        let small = Preset::Small.config();
        let bytes: Vec<u64> = small.expected_tensors().iter().map(|s| s.numel() * 2).collect();
        let plan = plan_shards(&bytes, Preset::Small.max_shard_bytes());
        assert!(plan.len() >= 3, "small bf16 should have several shards, got {}", plan.len());
    }

    #[test]
    fn single_shard_writes_model_safetensors_without_index() {
        let tmp = tempfile::tempdir().unwrap();
        let c = Preset::Tiny.config();
        let specs = c.expected_tensors();
        let names = write_hf_checkpoint(tmp.path(), &full_config_json(&c), &specs, DType::F32, u64::MAX, |i, s| {
            from_f32(&init_values(s, 0, i as u64), DType::F32)
        })
        .unwrap();
        assert_eq!(names, [SINGLE_FILE]);
        assert!(!tmp.path().join(INDEX_FILE).exists());
        let ck = Checkpoint::open(tmp.path()).unwrap();
        assert_eq!(ck.shard_paths().len(), 1);
    }
}
