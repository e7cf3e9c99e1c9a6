//! A Hugging Face checkpoint directory: config plus (optionally) weights.
//!
//! Opening validates everything that can be checked without reading tensor
//! data: the config, the index, every shard header, and every expected
//! tensor's presence, dtype and shape. Data stays memory-mapped; callers get
//! borrowed bytes ([`Checkpoint::tensor_bytes`]) or f32 copies
//! ([`WeightSource::load_f32`]).

use super::convert::{self, dtype_name, ir_dtype, is_weight_dtype};
use super::index::ShardIndex;
use super::quant::{self as q, QuantDescription, QuantType};
use super::shard::{Shard, ShardTensor};
use super::{CONFIG_FILE, INDEX_FILE, SINGLE_FILE};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use panguc_ir::config::TensorSpec;
use panguc_ir::{DType, PanguConfig, Tensor, WeightSource};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

/// Below these sizes a progress bar would only flicker.
const PROGRESS_MIN_SHARDS: usize = 4;
const PROGRESS_MIN_TENSORS: usize = 1000;

/// How much of a missing-tensor list to spell out in an error.
const MISSING_LISTED: usize = 5;

#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Ignore any weight files and open the config only.
    pub config_only: bool,
    /// Allow a progress bar on stderr (it is still hidden when stderr is not
    /// a terminal or the checkpoint is small).
    pub progress: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions { config_only: false, progress: true }
    }
}

/// Where the weights came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightLayout {
    /// No weights (none on disk, or `config_only` requested).
    ConfigOnly,
    /// `model.safetensors`.
    Single(PathBuf),
    /// `model.safetensors.index.json` plus shards.
    Sharded { index: PathBuf, total_size: Option<u64> },
}

/// A tensor in the files that the config does not account for (e.g.
/// quantization scales). Reported, not fatal.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UnexpectedTensor {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub file: PathBuf,
}

/// Location of one tensor: which shard, and its entry there.
#[derive(Debug, Clone)]
struct Entry {
    shard: usize,
    tensor: ShardTensor,
}

pub struct Checkpoint {
    dir: PathBuf,
    config_path: PathBuf,
    config: PanguConfig,
    layout: WeightLayout,
    shards: Vec<Shard>,
    entries: HashMap<String, Entry>,
    unexpected: Vec<UnexpectedTensor>,
    /// The msModelSlim description of a quantized checkpoint.
    quant: Option<QuantDescription>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("layout", &self.layout)
            .field("shards", &self.shards.len())
            .field("tensors", &self.entries.len())
            .field("unexpected", &self.unexpected.len())
            .finish()
    }
}

impl Checkpoint {
    /// Opens `dir` with default options (weights if present).
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        Self::open_with(dir, &OpenOptions::default())
    }

    pub fn open_with(dir: &Path, opts: &OpenOptions) -> Result<Checkpoint> {
        if !dir.exists() {
            bail!("checkpoint directory {} does not exist", dir.display());
        }
        if !dir.is_dir() {
            bail!("checkpoint path {} is not a directory", dir.display());
        }
        let config_path = dir.join(CONFIG_FILE);
        let config = read_config(&config_path)?;
        let quant = QuantDescription::read_dir(dir)?;
        let layout = detect_layout(dir, opts.config_only, quant.is_some())?;
        let mut ck = Checkpoint {
            dir: dir.to_path_buf(),
            config_path,
            config,
            layout: layout.clone(),
            shards: Vec::new(),
            entries: HashMap::new(),
            unexpected: Vec::new(),
            quant,
        };
        match &layout {
            WeightLayout::ConfigOnly => {
                tracing::info!("{}: no weights, opening config only", dir.display());
                return Ok(ck);
            }
            WeightLayout::Single(path) => {
                let shard = Shard::open(path)?;
                ck.add_shard(shard)?;
            }
            WeightLayout::Sharded { index, .. } => ck.load_sharded(index, opts)?,
        }
        ck.alias_smoothed_norms();
        ck.validate()?;
        Ok(ck)
    }

    /// Opens every shard the index names and checks the index against them.
    fn load_sharded(&mut self, index_path: &Path, opts: &OpenOptions) -> Result<()> {
        let index = ShardIndex::read(index_path)?;
        let files = index.shard_files();
        // Only existence here, so a missing shard is reported before we spend
        // time mapping the others.
        for file in &files {
            let path = self.dir.join(file);
            if !path.is_file() {
                bail!("{} names shard {file}, which does not exist ({})", index_path.display(), path.display());
            }
        }
        let bar = progress_bar(opts, files.len(), index.weight_map.len());
        for file in &files {
            bar.set_message(file.clone());
            let shard = Shard::open(&self.dir.join(file))?;
            self.add_shard(shard)?;
            bar.inc(1);
        }
        bar.finish_and_clear();

        let mut indexed_bytes: u64 = 0;
        for (tensor, file) in &index.weight_map {
            let shard_path = self.dir.join(file);
            match self.entries.get(tensor) {
                Some(e) if self.shards[e.shard].path() == shard_path => {
                    indexed_bytes += e.tensor.byte_len() as u64;
                }
                Some(e) => bail!(
                    "{}: tensor `{tensor}` is listed under {file}, but it is stored in {}",
                    index_path.display(),
                    self.shards[e.shard].path().display()
                ),
                None => bail!(
                    "{}: tensor `{tensor}` is listed under {file}, but {} does not contain it",
                    index_path.display(),
                    shard_path.display()
                ),
            }
        }
        let listed: HashSet<&str> = index.weight_map.keys().map(String::as_str).collect();
        for (name, e) in &self.entries {
            if !listed.contains(name.as_str()) {
                tracing::warn!(
                    "{}: tensor `{name}` is in {} but not in the index",
                    index_path.display(),
                    self.shards[e.shard].path().display()
                );
            }
        }
        if let Some(total) = index.total_size {
            if total != indexed_bytes {
                // Informational in HF; some tools write parameter counts here.
                tracing::warn!(
                    "{}: metadata.total_size is {total} but the indexed tensors hold {indexed_bytes} bytes",
                    index_path.display()
                );
            }
        }
        self.layout = WeightLayout::Sharded { index: index_path.to_path_buf(), total_size: index.total_size };
        Ok(())
    }

    /// Registers a shard's tensors; a name stored twice is an error.
    fn add_shard(&mut self, shard: Shard) -> Result<()> {
        let id = self.shards.len();
        for t in shard.tensors() {
            if let Some(prev) = self.entries.get(&t.name) {
                bail!(
                    "tensor `{}` is stored twice: in {} and in {}",
                    t.name,
                    self.shards[prev.shard].path().display(),
                    shard.path().display()
                );
            }
            self.entries.insert(t.name.clone(), Entry { shard: id, tensor: t.clone() });
        }
        self.shards.push(shard);
        Ok(())
    }

    /// A smoothed norm may be stored as `<norm>.module.weight` /
    /// `.module.bias` (msModelSlim's anti-outlier wrapper); make it
    /// readable under the plain name.
    fn alias_smoothed_norms(&mut self) {
        let aliases: Vec<(String, Entry)> = self
            .entries
            .iter()
            .filter_map(|(name, e)| {
                let plain = name.replace(".module.weight", ".weight").replace(".module.bias", ".bias");
                (plain != *name && !self.entries.contains_key(&plain)).then(|| (plain, e.clone()))
            })
            .collect();
        for (plain, e) in aliases {
            let stored = e.tensor.name.clone();
            tracing::info!("reading smoothed norm tensor `{stored}` as `{plain}`");
            self.entries.insert(plain, e);
        }
    }

    /// Every expected tensor present with a float dtype and the right shape
    /// (for a quantized checkpoint: with the tensors its quant type needs);
    /// everything else is collected as unexpected.
    fn validate(&mut self) -> Result<()> {
        let expected = self.config.expected_tensors();
        // A static W8A8 module's bias is folded into its quant_bias.
        let folded_bias = |name: &str| -> bool {
            let Some(quant) = &self.quant else { return false };
            name.strip_suffix(".bias")
                .is_some_and(|m| quant.tensor_type(&format!("{m}.weight")) == Some(QuantType::W8A8))
        };
        let missing: Vec<&TensorSpec> =
            expected.iter().filter(|s| !self.entries.contains_key(&s.name) && !folded_bias(&s.name)).collect();
        if let Some(first) = missing.first() {
            let mut msg = format!("tensor `{}` is missing: it should be in {}", first.name, self.expected_location());
            if missing.len() > 1 {
                // Many missing usually means a config/weights mismatch
                // (e.g. layer count); the list shows the pattern.
                let listed: Vec<&str> = missing.iter().take(MISSING_LISTED).map(|s| s.name.as_str()).collect();
                let more = missing.len().saturating_sub(MISSING_LISTED);
                msg += &format!(
                    " ({} of {} expected tensors missing: {}",
                    missing.len(),
                    expected.len(),
                    listed.join(", ")
                );
                msg += &if more > 0 { format!(", and {more} more)") } else { ")".to_string() };
            }
            bail!(msg);
        }
        let mut quant_known: Vec<String> = Vec::new();
        for spec in &expected {
            if let Some(needed) = self.quant_needs(spec)? {
                for n in needed {
                    self.check_needed(&n)?;
                    quant_known.push(n.name);
                }
                continue;
            }
            let Some(e) = self.entries.get(&spec.name) else { continue };
            let file = self.shards[e.shard].path().display();
            if !is_weight_dtype(e.tensor.dtype) {
                bail!(
                    "{} in {file} has unsupported dtype {} (weights must be BF16, F16 or F32)",
                    spec.name,
                    e.tensor.dtype
                );
            }
            if e.tensor.shape != spec.shape {
                bail!(
                    "{} in {file} has shape {:?}, expected {:?} (from {})",
                    spec.name,
                    e.tensor.shape,
                    spec.shape,
                    self.config_path.display()
                );
            }
        }
        for n in self.extra_quant_tensors() {
            self.check_needed(&n)?;
            quant_known.push(n.name);
        }
        for alias_target in
            self.entries.iter().filter(|(n, e)| **n != e.tensor.name).map(|(_, e)| e.tensor.name.clone())
        {
            quant_known.push(alias_target);
        }
        let known: HashSet<&str> =
            expected.iter().map(|s| s.name.as_str()).chain(quant_known.iter().map(String::as_str)).collect();
        let mut unexpected: Vec<UnexpectedTensor> = self
            .entries
            .iter()
            .filter(|(name, _)| !known.contains(name.as_str()))
            .map(|(name, e)| UnexpectedTensor {
                name: name.clone(),
                dtype: dtype_name(e.tensor.dtype),
                shape: e.tensor.shape.clone(),
                file: self.shards[e.shard].path().to_path_buf(),
            })
            .collect();
        unexpected.sort_by(|a, b| a.name.cmp(&b.name));
        for u in &unexpected {
            tracing::warn!(
                "unexpected tensor `{}` ({} {:?}) in {} ignored",
                u.name,
                u.dtype,
                u.shape,
                u.file.display()
            );
        }
        self.unexpected = unexpected;
        Ok(())
    }

    /// For a quantized checkpoint, the tensors that stand for expected
    /// tensor `spec`: a linear weight's int8 weight and scales under its
    /// module's quant type, or a folded (optional) static-W8A8 bias. None
    /// when `spec` is an ordinary float tensor.
    fn quant_needs(&self, spec: &TensorSpec) -> Result<Option<Vec<q::Needed>>> {
        let Some(quant) = &self.quant else { return Ok(None) };
        if let Some(module) = q::linear_module(&spec.name, &spec.shape) {
            let ty = quant.linear_type(module)?;
            return Ok(Some(q::linear_tensors(ty, module, spec.shape[0], spec.shape[1])));
        }
        match quant.tensor_type(&spec.name) {
            Some(QuantType::Float) | None => {}
            Some(other) => bail!(
                "{}: tensor `{}` is listed as {other}, but panguc reads it only unquantized (FLOAT)",
                quant.path.display(),
                spec.name
            ),
        }
        let folded = spec.name.strip_suffix(".bias").map(|m| quant.tensor_type(&format!("{m}.weight")));
        if folded == Some(Some(QuantType::W8A8)) {
            let why = "nothing (a static W8A8 bias is folded into quant_bias)".to_string();
            let n = q::Needed {
                name: spec.name.clone(),
                dtypes: q::FLOATS,
                shape: spec.shape.clone(),
                optional: true,
                why,
            };
            return Ok(Some(vec![n]));
        }
        Ok(None)
    }

    /// Quantized-checkpoint tensors with no float counterpart: the C8 KV
    /// scales and (optional) smoothed-norm biases.
    fn extra_quant_tensors(&self) -> Vec<q::Needed> {
        let Some(quant) = &self.quant else { return vec![] };
        let c = &self.config;
        let mut out = Vec::new();
        for l in 0..c.num_hidden_layers {
            if quant.kv_int8 {
                out.extend(q::kv_cache_tensors(&format!("model.layers.{l}."), c.kv_dim()));
            }
        }
        for spec in c.expected_tensors() {
            if let Some(norm) = spec.name.strip_suffix("norm.weight") {
                out.push(q::Needed {
                    name: format!("{norm}norm.bias"),
                    dtypes: q::FLOATS,
                    shape: spec.shape.clone(),
                    optional: true,
                    why: "a smoothed norm".to_string(),
                });
            }
        }
        out
    }

    /// `n` present (unless optional) with an accepted dtype and its shape.
    fn check_needed(&self, n: &q::Needed) -> Result<()> {
        let desc = self.quant.as_ref().map(|d| d.path.display().to_string()).unwrap_or_default();
        let Some(e) = self.entries.get(&n.name) else {
            if n.optional {
                return Ok(());
            }
            bail!(
                "tensor `{}` is missing: {} needs it ({desc}); it should be in {}",
                n.name,
                n.why,
                self.expected_location()
            );
        };
        let file = self.shards[e.shard].path().display();
        if !ir_dtype(e.tensor.dtype).is_some_and(|d| n.dtypes.contains(&d)) {
            let want: Vec<&str> = n.dtypes.iter().map(|d| d.name()).collect();
            bail!(
                "{} in {file} has dtype {}, but {} needs {}",
                n.name,
                dtype_name(e.tensor.dtype),
                n.why,
                want.join(" or ")
            );
        }
        if e.tensor.shape != n.shape {
            bail!("{} in {file} has shape {:?}, but {} needs {:?}", n.name, e.tensor.shape, n.why, n.shape);
        }
        Ok(())
    }

    /// The msModelSlim description of a quantized checkpoint.
    pub fn quant(&self) -> Option<&QuantDescription> {
        self.quant.as_ref()
    }

    /// True when tensor `name` is stored (under its own or an aliased name).
    pub fn has_tensor(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The file a missing expected tensor should have been found in.
    fn expected_location(&self) -> String {
        match &self.layout {
            WeightLayout::Single(p) => p.display().to_string(),
            WeightLayout::Sharded { index, .. } => format!("one of the shards listed in {}", index.display()),
            WeightLayout::ConfigOnly => self.dir.display().to_string(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn config(&self) -> &PanguConfig {
        &self.config
    }

    pub fn layout(&self) -> &WeightLayout {
        &self.layout
    }

    pub fn has_weights(&self) -> bool {
        self.layout != WeightLayout::ConfigOnly
    }

    /// Paths of the mapped weight files, in open order.
    pub fn shard_paths(&self) -> Vec<&Path> {
        self.shards.iter().map(Shard::path).collect()
    }

    /// Tensors found in the files but not implied by the config.
    pub fn unexpected_tensors(&self) -> &[UnexpectedTensor] {
        &self.unexpected
    }

    /// dtype, shape and file of a stored tensor (None if absent or of a
    /// dtype the IR has no name for).
    pub fn tensor_info(&self, name: &str) -> Option<(DType, Vec<usize>, PathBuf)> {
        let e = self.entries.get(name)?;
        let dtype = ir_dtype(e.tensor.dtype)?;
        Some((dtype, e.tensor.shape.clone(), self.shards[e.shard].path().to_path_buf()))
    }

    /// Raw little-endian bytes of a tensor, borrowed from the memory map.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let e = self.entry(name)?;
        self.shards[e.shard].bytes(&e.tensor)
    }

    /// Bytes of tensor data per dtype name ("bf16", "f32", ...), over all
    /// stored tensors including unexpected ones. Empty for config-only.
    pub fn bytes_by_dtype(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for (name, e) in &self.entries {
            if *name != e.tensor.name {
                continue; // an alias of a stored tensor, counted under its own name
            }
            *out.entry(dtype_name(e.tensor.dtype)).or_insert(0) += e.tensor.byte_len() as u64;
        }
        out
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        if !self.has_weights() {
            bail!("cannot read tensor `{name}`: checkpoint {} was opened config-only (no weights)", self.dir.display());
        }
        self.entries.get(name).with_context(|| format!("tensor `{name}` is not in checkpoint {}", self.dir.display()))
    }
}

impl WeightSource for Checkpoint {
    fn load_f32(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let e = self.entry(name)?;
        let file = self.shards[e.shard].path();
        if e.tensor.shape != shape {
            bail!("{name} in {} has shape {:?}, expected {shape:?}", file.display(), e.tensor.shape);
        }
        let bytes = self.shards[e.shard].bytes(&e.tensor)?;
        let data = convert::to_f32(bytes, e.tensor.dtype)
            .with_context(|| format!("cannot load {name} from {}", file.display()))?;
        Ok(Tensor::f32(shape.to_vec(), data))
    }

    fn load_i64(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let e = self.entry(name)?;
        let file = self.shards[e.shard].path();
        if e.tensor.shape != shape {
            bail!("{name} in {} has shape {:?}, expected {shape:?}", file.display(), e.tensor.shape);
        }
        let bytes = self.shards[e.shard].bytes(&e.tensor)?;
        let data = convert::to_i64(bytes, e.tensor.dtype)
            .with_context(|| format!("cannot load {name} from {}", file.display()))?;
        Ok(Tensor::i64(shape.to_vec(), data))
    }
}

fn read_config(path: &Path) -> Result<PanguConfig> {
    if !path.is_file() {
        bail!("{} not found: a Hugging Face checkpoint directory must contain config.json", path.display());
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    // ConfigError's message already starts with the path.
    Ok(PanguConfig::from_json_str(&text, &path.display().to_string())?)
}

/// Chooses the weight layout the way transformers does: the single file
/// first, then the index; with neither, config-only, unless stray weight
/// files suggest a broken checkpoint.
fn detect_layout(dir: &Path, config_only: bool, quantized: bool) -> Result<WeightLayout> {
    if config_only {
        return Ok(WeightLayout::ConfigOnly);
    }
    let single = dir.join(SINGLE_FILE);
    let index = dir.join(INDEX_FILE);
    if single.is_file() {
        if index.is_file() {
            tracing::warn!("{}: both {SINGLE_FILE} and {INDEX_FILE} exist; using {SINGLE_FILE}", dir.display());
        }
        return Ok(WeightLayout::Single(single));
    }
    if index.is_file() {
        return Ok(WeightLayout::Sharded { index, total_size: None });
    }
    let listing = std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    let mut stray_safetensors = Vec::new();
    let mut torch_bins = Vec::new();
    for entry in listing.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".safetensors") {
            stray_safetensors.push(name);
        } else if name.ends_with(".bin") && name.starts_with("pytorch_model") {
            torch_bins.push(name);
        }
    }
    stray_safetensors.sort();
    if quantized {
        // msModelSlim names its files `quant_model_weight*.safetensors`
        // (plus `.index.json` when sharded): one index, or one file.
        if let Some(layout) = quantized_layout(dir, &stray_safetensors)? {
            return Ok(layout);
        }
    }
    if let Some(first) = stray_safetensors.first() {
        bail!(
            "{} contains {first} but neither {SINGLE_FILE} nor {INDEX_FILE}; cannot tell which tensors are where (open it config-only to ignore the weights)",
            dir.display()
        );
    }
    if let Some(first) = torch_bins.first() {
        bail!(
            "{} holds PyTorch weights ({first}) but no safetensors; convert the checkpoint to safetensors (open it config-only to ignore the weights)",
            dir.display()
        );
    }
    Ok(WeightLayout::ConfigOnly)
}

/// The weight files of a quantized checkpoint without the standard names:
/// the only `*.safetensors.index.json`, or else the only `*.safetensors`.
fn quantized_layout(dir: &Path, safetensors: &[String]) -> Result<Option<WeightLayout>> {
    let mut indexes: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors.index.json"))
        .collect();
    indexes.sort();
    match (indexes.as_slice(), safetensors) {
        ([index], _) => Ok(Some(WeightLayout::Sharded { index: dir.join(index), total_size: None })),
        ([], [single]) => Ok(Some(WeightLayout::Single(dir.join(single)))),
        ([], _) => Ok(None),
        (many, _) => bail!("{} holds several safetensors indexes ({}); keep one", dir.display(), many.join(", ")),
    }
}

fn progress_bar(opts: &OpenOptions, shards: usize, tensors: usize) -> ProgressBar {
    let worth_it = shards >= PROGRESS_MIN_SHARDS && tensors >= PROGRESS_MIN_TENSORS;
    if !(opts.progress && worth_it && std::io::stderr().is_terminal()) {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(shards as u64), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("scanning shards {bar:30} {pos}/{len} {wide_msg}") {
        bar.set_style(style);
    }
    bar
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::{synth_with, Preset, SynthOptions};
    use panguc_ir::config::TensorSpec;
    use std::fs;

    fn tiny(dtype: DType) -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ck");
        synth_with(&dir, &SynthOptions { preset: Preset::Tiny, seed: 7, dtype, force: false }).unwrap();
        (tmp, dir)
    }

    #[test]
    fn opens_synthesized_tiny_and_loads_f32() {
        let (_t, dir) = tiny(DType::BF16);
        let ck = Checkpoint::open(&dir).unwrap();
        assert!(ck.has_weights());
        assert!(matches!(ck.layout(), WeightLayout::Sharded { total_size: Some(_), .. }));
        assert!(ck.shard_paths().len() >= 2);
        assert!(ck.unexpected_tensors().is_empty());
        let c = ck.config().clone();
        let total_bytes: u64 = ck.bytes_by_dtype().values().sum();
        assert_eq!(ck.bytes_by_dtype().keys().collect::<Vec<_>>(), ["bf16"]);
        assert_eq!(total_bytes, c.total_params() * 2);
        for TensorSpec { name, shape } in c.expected_tensors() {
            let (dt, s, file) = ck.tensor_info(&name).unwrap();
            assert_eq!((dt, &s), (DType::BF16, &shape));
            assert!(file.starts_with(&dir));
            let bytes = ck.tensor_bytes(&name).unwrap();
            let t = ck.load_f32(&name, &shape).unwrap();
            assert_eq!(bytes.len(), t.numel() * 2);
            assert!(t.as_f32().iter().all(|x| x.is_finite()), "{name}");
        }
        // Norm weights were drawn from 1 ± 0.1.
        let n = ck.load_f32("model.norm.weight", &[c.hidden_size]).unwrap();
        assert!(n.as_f32().iter().all(|&x| (0.85..=1.15).contains(&x)));
    }

    #[test]
    fn load_f32_checks_shape_and_name() {
        let (_t, dir) = tiny(DType::F32);
        let ck = Checkpoint::open(&dir).unwrap();
        let msg = format!("{:#}", ck.load_f32("model.norm.weight", &[3]).unwrap_err());
        assert!(msg.contains("model.norm.weight") && msg.contains("safetensors") && msg.contains("[3]"), "{msg}");
        let msg = format!("{:#}", ck.load_f32("nope", &[1]).unwrap_err());
        assert!(msg.contains("`nope`"), "{msg}");
    }

    #[test]
    fn f32_and_bf16_checkpoints_agree() {
        let (_a, d32) = tiny(DType::F32);
        let (_b, d16) = tiny(DType::BF16);
        let (c32, c16) = (Checkpoint::open(&d32).unwrap(), Checkpoint::open(&d16).unwrap());
        let name = "model.layers.1.mlp.experts.5.up_proj.weight";
        let shape = [32, 64];
        let x = c32.load_f32(name, &shape).unwrap();
        let y = c16.load_f32(name, &shape).unwrap();
        assert!(x.max_rel_diff(&y, 1e-3) < 1e-2);
    }

    #[test]
    fn config_only_when_no_weights_or_forced() {
        let (_t, dir) = tiny(DType::BF16);
        let forced = Checkpoint::open_with(&dir, &OpenOptions { config_only: true, progress: false }).unwrap();
        assert!(!forced.has_weights());
        assert!(forced.bytes_by_dtype().is_empty());
        let msg = format!("{:#}", forced.load_f32("model.norm.weight", &[64]).unwrap_err());
        assert!(msg.contains("config-only"), "{msg}");

        let bare = tempfile::tempdir().unwrap();
        fs::copy(dir.join("config.json"), bare.path().join("config.json")).unwrap();
        let ck = Checkpoint::open(bare.path()).unwrap();
        assert_eq!(ck.layout(), &WeightLayout::ConfigOnly);
    }

    #[test]
    fn single_file_layout() {
        let (_t, dir) = tiny(DType::F32);
        // Merge all shards into model.safetensors.
        let ck = Checkpoint::open(&dir).unwrap();
        let specs = ck.config().expected_tensors();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = specs
            .iter()
            .map(|s| {
                let v = safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    s.shape.clone(),
                    ck.tensor_bytes(&s.name).unwrap(),
                )
                .unwrap();
                (s.name.clone(), v)
            })
            .collect();
        let out = tempfile::tempdir().unwrap();
        safetensors::serialize_to_file(views, None, &out.path().join(SINGLE_FILE)).unwrap();
        fs::copy(dir.join("config.json"), out.path().join("config.json")).unwrap();
        let single = Checkpoint::open(out.path()).unwrap();
        assert_eq!(single.layout(), &WeightLayout::Single(out.path().join(SINGLE_FILE)));
        assert_eq!(single.shard_paths().len(), 1);
        assert_eq!(single.tensor_bytes("lm_head.weight").unwrap(), ck.tensor_bytes("lm_head.weight").unwrap());
    }

    #[test]
    fn stray_shards_without_index_are_an_error() {
        let (_t, dir) = tiny(DType::BF16);
        fs::remove_file(dir.join(INDEX_FILE)).unwrap();
        let msg = format!("{:#}", Checkpoint::open(&dir).unwrap_err());
        assert!(msg.contains("model-00001-of-") && msg.contains(INDEX_FILE), "{msg}");
        // ...but fine when config-only is requested.
        Checkpoint::open_with(&dir, &OpenOptions { config_only: true, progress: false }).unwrap();
    }

    #[test]
    fn unexpected_tensors_are_reported_not_fatal() {
        let (_t, dir) = tiny(DType::BF16);
        // Add a quantization-style extra tensor in its own shard.
        let extra = "model.layers.0.self_attn.kv_cache_scale";
        let data = [0u8; 4];
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &data).unwrap();
        safetensors::serialize_to_file([(extra, view)], None, &dir.join("extra.safetensors")).unwrap();
        let index_path = dir.join(INDEX_FILE);
        let mut index: serde_json::Value = serde_json::from_str(&fs::read_to_string(&index_path).unwrap()).unwrap();
        index["weight_map"][extra] = "extra.safetensors".into();
        fs::write(&index_path, index.to_string()).unwrap();
        let ck = Checkpoint::open(&dir).unwrap();
        assert_eq!(ck.unexpected_tensors().len(), 1);
        let u = &ck.unexpected_tensors()[0];
        assert_eq!((u.name.as_str(), u.dtype.as_str(), u.shape.as_slice()), (extra, "f32", &[1usize][..]));
        assert!(u.file.ends_with("extra.safetensors"));
        assert_eq!(ck.bytes_by_dtype().get("f32"), Some(&4));
    }

    #[test]
    fn index_pointing_at_wrong_shard() {
        let (_t, dir) = tiny(DType::BF16);
        let index_path = dir.join(INDEX_FILE);
        let mut index: serde_json::Value = serde_json::from_str(&fs::read_to_string(&index_path).unwrap()).unwrap();
        let name = "lm_head.weight";
        let actual = index["weight_map"][name].as_str().unwrap().to_string();
        let other = index["weight_map"]["model.embed_tokens.weight"].as_str().unwrap().to_string();
        assert_ne!(actual, other, "tiny must put embed and lm_head in different shards");
        index["weight_map"][name] = other.clone().into();
        fs::write(&index_path, index.to_string()).unwrap();
        let msg = format!("{:#}", Checkpoint::open(&dir).unwrap_err());
        assert!(msg.contains(name) && msg.contains(&other) && msg.contains(&actual), "{msg}");
    }
}

/// A fixture writer that mimics transformers' `save_pretrained` closely
/// (independently of `synth`, so the loader is not only tested against our
/// own writer): module-registration tensor order, greedy `max_shard_size`
/// sharding into `model-0000N-of-0000M.safetensors`, `{"format": "pt"}`
/// file metadata, a per-parameter dtype (router_scale kept in f32 inside a
/// bf16 model), and JSON written like Python's
/// `json.dumps(obj, indent=2, sort_keys=True) + "\n"`.
#[cfg(test)]
mod save_pretrained_fixture {
    use super::*;
    use crate::synth::plan_shards;
    use panguc_ir::config::TensorSpec;
    use safetensors::tensor::TensorView;
    use std::fs;

    /// tiny-like config, as transformers would print it (sorted keys,
    /// Python float formatting such as 1e-05).
    const CONFIG: &str = r#"{
  "architectures": [
    "PanguProMoEForCausalLM"
  ],
  "attention_dropout": 0.0,
  "auto_map": {
    "AutoConfig": "configuration_pangu_moe.PanguProMoEConfig",
    "AutoModelForCausalLM": "modeling_pangu_moe.PanguProMoEForCausalLM"
  },
  "bos_token_id": 1,
  "eos_token_id": 2,
  "hidden_act": "silu",
  "hidden_size": 64,
  "initializer_range": 0.02,
  "max_position_embeddings": 4096,
  "model_type": "PanguProMoE",
  "moe_intermediate_size": 32,
  "num_attention_heads": 4,
  "num_experts": 16,
  "num_experts_per_tok": 4,
  "num_hidden_layers": 2,
  "num_key_value_heads": 2,
  "output_router_logits": false,
  "pad_token_id": 0,
  "rms_norm_eps": 1e-05,
  "rope_theta": 16000000.0,
  "router_aux_loss_coef": 0.001,
  "shared_expert_intermediate_size": 128,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.48.2",
  "use_cache": true,
  "vocab_size": 256
}
"#;

    /// `model.state_dict()` order: submodules in registration order, each
    /// Linear's weight then bias.
    fn state_dict_order(c: &PanguConfig) -> Vec<TensorSpec> {
        let by_name: HashMap<String, TensorSpec> =
            c.expected_tensors().into_iter().map(|s| (s.name.clone(), s)).collect();
        let mut names = vec!["model.embed_tokens.weight".to_string()];
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            for proj in ["q", "k", "v", "o"] {
                names.push(format!("{p}.self_attn.{proj}_proj.weight"));
                names.push(format!("{p}.self_attn.{proj}_proj.bias"));
            }
            names.push(format!("{p}.mlp.gate.weight"));
            for x in 0..c.num_experts {
                for proj in ["gate", "up", "down"] {
                    names.push(format!("{p}.mlp.experts.{x}.{proj}_proj.weight"));
                }
            }
            for proj in ["gate", "up", "down"] {
                names.push(format!("{p}.mlp.shared_expert.{proj}_proj.weight"));
            }
            names.push(format!("{p}.mlp.router_scale"));
            names.push(format!("{p}.input_layernorm.weight"));
            names.push(format!("{p}.post_attention_layernorm.weight"));
        }
        names.push("model.norm.weight".into());
        names.push("lm_head.weight".into());
        names.into_iter().map(|n| by_name[&n].clone()).collect()
    }

    /// Values exactly representable in bf16, different per tensor.
    fn values(tensor: usize, n: usize) -> Vec<f32> {
        (0..n).map(|k| (((tensor * 7 + k) % 13) as f32 - 6.0) / 16.0).collect()
    }

    fn is_f32_param(name: &str) -> bool {
        name.ends_with("router_scale")
    }

    /// Python json.dumps(indent=2, sort_keys=True) for the index shape.
    fn index_json(total_size: u64, total_parameters: u64, weight_map: &BTreeMap<String, String>) -> String {
        let mut s = String::from("{\n  \"metadata\": {\n");
        s += &format!("    \"total_parameters\": {total_parameters},\n    \"total_size\": {total_size}\n  }},\n");
        s += "  \"weight_map\": {\n";
        let entries: Vec<String> = weight_map.iter().map(|(k, v)| format!("    \"{k}\": \"{v}\"")).collect();
        s += &entries.join(",\n");
        s += "\n  }\n}\n";
        s
    }

    fn write(dir: &Path) -> (PanguConfig, Vec<TensorSpec>) {
        fs::write(dir.join("config.json"), CONFIG).unwrap();
        let c = PanguConfig::from_json_str(CONFIG, "fixture").unwrap();
        let specs = state_dict_order(&c);
        let elem = |s: &TensorSpec| if is_f32_param(&s.name) { 4 } else { 2 };
        let sizes: Vec<u64> = specs.iter().map(|s| s.numel() * elem(s)).collect();
        let total: u64 = sizes.iter().sum();
        let plan = plan_shards(&sizes, total * 2 / 5);
        assert_eq!(plan.len(), 3, "fixture should have exactly 3 shards");
        let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        let mut weight_map = BTreeMap::new();
        for (k, range) in plan.iter().enumerate() {
            let file = format!("model-{:05}-of-{:05}.safetensors", k + 1, plan.len());
            let data: Vec<Vec<u8>> = range
                .clone()
                .map(|i| {
                    let d = if is_f32_param(&specs[i].name) { DType::F32 } else { DType::BF16 };
                    convert::from_f32(&values(i, specs[i].numel() as usize), d).unwrap()
                })
                .collect();
            let views: Vec<(String, TensorView<'_>)> = range
                .clone()
                .zip(&data)
                .map(|(i, bytes)| {
                    let dt =
                        if is_f32_param(&specs[i].name) { safetensors::Dtype::F32 } else { safetensors::Dtype::BF16 };
                    weight_map.insert(specs[i].name.clone(), file.clone());
                    (specs[i].name.clone(), TensorView::new(dt, specs[i].shape.clone(), bytes).unwrap())
                })
                .collect();
            fs::write(dir.join(&file), safetensors::serialize(views, Some(meta.clone())).unwrap()).unwrap();
        }
        fs::write(dir.join(INDEX_FILE), index_json(total, c.total_params(), &weight_map)).unwrap();
        (c, specs)
    }

    #[test]
    fn loads_save_pretrained_layout() {
        let tmp = tempfile::tempdir().unwrap();
        let (c, specs) = write(tmp.path());
        let ck = Checkpoint::open(tmp.path()).unwrap();
        assert_eq!(ck.config(), &c);
        assert_eq!(ck.shard_paths().len(), 3);
        assert!(ck.shard_paths()[2].ends_with("model-00003-of-00003.safetensors"));
        assert!(ck.unexpected_tensors().is_empty());
        let router_bytes = 2 * 16 * 4;
        let by = ck.bytes_by_dtype();
        assert_eq!(by.get("f32"), Some(&router_bytes));
        assert_eq!(by.get("bf16"), Some(&((c.total_params() - 2 * 16) * 2)));
        match ck.layout() {
            WeightLayout::Sharded { total_size, .. } => assert_eq!(*total_size, Some(by.values().sum())),
            other => panic!("expected a sharded layout, got {other:?}"),
        }
        for (i, s) in specs.iter().enumerate() {
            let t = ck.load_f32(&s.name, &s.shape).unwrap();
            assert_eq!(t.as_f32(), values(i, s.numel() as usize).as_slice(), "{}", s.name);
            let want = if is_f32_param(&s.name) { DType::F32 } else { DType::BF16 };
            assert_eq!(ck.tensor_info(&s.name).unwrap().0, want);
        }
    }
}
