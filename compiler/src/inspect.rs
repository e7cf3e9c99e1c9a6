//! The `inspect` command: what a checkpoint is, how big, and whether its
//! files hold anything the config does not explain.
//!
//! One [`Summary`] feeds both outputs so the JSON and the text never
//! disagree.

use crate::frontend::{Checkpoint, UnexpectedTensor};
use panguc_ir::{DType, PanguConfig};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Everything `inspect` reports. Config keys appear flattened under their
/// config.json names.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub path: String,
    pub has_weights: bool,
    #[serde(flatten)]
    pub config: PanguConfig,
    pub head_dim: usize,
    pub num_groups: usize,
    pub experts_per_group: usize,
    pub kv_dim: usize,
    pub queries_per_kv: usize,
    pub total_params: u64,
    pub active_params: u64,
    pub num_tensors: usize,
    pub tensors_per_layer: usize,
    pub num_shards: usize,
    /// dtype name → bytes of tensor data.
    pub bytes_by_dtype: BTreeMap<String, u64>,
    pub total_bytes: u64,
    /// True when `bytes_by_dtype` is computed from the config (config-only
    /// checkpoint) rather than measured from the files.
    pub bytes_estimated: bool,
    pub unexpected_tensors: Vec<UnexpectedTensor>,
    /// The msModelSlim scheme of a quantized checkpoint (absent for float ones).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantization: Option<QuantSummary>,
}

/// How a quantized checkpoint's linear modules are stored.
#[derive(Debug, Clone, Serialize)]
pub struct QuantSummary {
    pub description: String,
    pub model_quant_type: String,
    /// "C8" for an int8 KV cache.
    pub kv_cache_type: Option<String>,
    /// Module kind (layer and expert numbers as `*`) → quant type → module count.
    pub modules: BTreeMap<String, BTreeMap<String, usize>>,
}

fn quant_summary(ckpt: &Checkpoint) -> Option<QuantSummary> {
    let q = ckpt.quant()?;
    let mut modules: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for spec in ckpt.config().expected_tensors() {
        if let Some(module) = crate::frontend::quant::linear_module(&spec.name, &spec.shape) {
            // Validated on open, so every linear has a type.
            let ty = q.linear_type(module).map(|t| t.name().to_string()).unwrap_or_else(|_| "?".into());
            let kind = crate::frontend::quant::module_kind(module);
            *modules.entry(kind).or_default().entry(ty).or_insert(0) += 1;
        }
    }
    Some(QuantSummary {
        description: q.path.display().to_string(),
        model_quant_type: q.model_quant_type.name().to_string(),
        kv_cache_type: q.kv_int8.then(|| "C8".to_string()),
        modules,
    })
}

/// The dtype weights would be stored in according to `torch_dtype`
/// (bf16 when absent or unrecognised: the released model is bf16).
pub(crate) fn declared_dtype(config: &PanguConfig) -> DType {
    match config.torch_dtype.as_deref() {
        Some("float32") => DType::F32,
        Some("float16") => DType::F16,
        _ => DType::BF16,
    }
}

pub fn summary(ckpt: &Checkpoint) -> Summary {
    let c = ckpt.config();
    let (bytes_by_dtype, bytes_estimated) = if ckpt.has_weights() {
        (ckpt.bytes_by_dtype(), false)
    } else {
        let d = declared_dtype(c);
        // A validated config has at most 2^42 parameters, so this cannot
        // saturate; saturating rather than wrapping if that ever changes.
        (BTreeMap::from([(d.name().to_string(), c.total_params().saturating_mul(d.size_bytes() as u64))]), true)
    };
    Summary {
        path: ckpt.dir().display().to_string(),
        has_weights: ckpt.has_weights(),
        config: c.clone(),
        head_dim: c.head_dim(),
        num_groups: c.num_groups(),
        experts_per_group: c.experts_per_group(),
        kv_dim: c.kv_dim(),
        queries_per_kv: c.queries_per_kv(),
        total_params: c.total_params(),
        active_params: c.active_params(),
        num_tensors: c.num_tensors(),
        tensors_per_layer: c.tensors_per_layer(),
        num_shards: ckpt.shard_paths().len(),
        total_bytes: bytes_by_dtype.values().fold(0u64, |a, b| a.saturating_add(*b)),
        bytes_by_dtype,
        bytes_estimated,
        unexpected_tensors: ckpt.unexpected_tensors().to_vec(),
        quantization: quant_summary(ckpt),
    }
}

/// Machine-readable summary (`panguc inspect --json`).
pub fn inspect_json(ckpt: &Checkpoint) -> Value {
    // Serializing plain data cannot fail; Null is a harmless fallback.
    serde_json::to_value(summary(ckpt)).unwrap_or(Value::Null)
}

/// Human-readable summary.
pub fn inspect_text(ckpt: &Checkpoint) -> String {
    render_text(&summary(ckpt))
}

pub fn render_text(s: &Summary) -> String {
    let c = &s.config;
    let mut o = String::new();
    let weights =
        if s.has_weights { format!("{} weight file(s)", s.num_shards) } else { "config only, no weights".to_string() };
    // Writing to a String cannot fail.
    let _ = writeln!(o, "checkpoint     {} ({weights})", s.path);
    let _ = writeln!(o, "architecture   {} (model_type {})", c.architectures.join(", "), c.model_type);
    let _ = writeln!(
        o,
        "layers         {} decoder layers, hidden {}, vocab {}",
        c.num_hidden_layers,
        thousands(c.hidden_size as u64),
        thousands(c.vocab_size as u64)
    );
    let _ = writeln!(
        o,
        "attention      {} query heads, {} KV heads ({} queries per KV head), head_dim {}",
        c.num_attention_heads, c.num_key_value_heads, s.queries_per_kv, s.head_dim
    );
    let _ = writeln!(
        o,
        "experts        {} routed in {} groups of {} (one per group, {} active), intermediate {}",
        c.num_experts,
        s.num_groups,
        s.experts_per_group,
        c.num_experts_per_tok,
        thousands(c.moe_intermediate_size as u64)
    );
    let _ = writeln!(o, "shared expert  intermediate {}", thousands(c.shared_expert_intermediate_size as u64));
    let _ = writeln!(
        o,
        "rope / norm    rope_theta {}, rms_norm_eps {:e}, max positions {}, tied embeddings {}",
        c.rope_theta,
        c.rms_norm_eps,
        thousands(c.max_position_embeddings as u64),
        c.tie_word_embeddings
    );
    let _ = writeln!(o, "parameters     {} total ({})", thousands(s.total_params), billions(s.total_params));
    let _ =
        writeln!(o, "               {} active per token ({})", thousands(s.active_params), billions(s.active_params));
    let _ = writeln!(o, "tensors        {} ({} per layer)", thousands(s.num_tensors as u64), s.tensors_per_layer);
    let estimated = if s.bytes_estimated { " (estimated from torch_dtype)" } else { "" };
    let by_dtype: Vec<String> = s.bytes_by_dtype.iter().map(|(d, b)| format!("{d} {} bytes", thousands(*b))).collect();
    let _ = writeln!(
        o,
        "weights        {} bytes = {:.2} GB{estimated}: {}",
        thousands(s.total_bytes),
        s.total_bytes as f64 / 1e9,
        by_dtype.join(", ")
    );
    if let Some(q) = &s.quantization {
        let kv = q.kv_cache_type.as_deref().map(|t| format!(", KV cache {t} (int8)")).unwrap_or_default();
        let _ = writeln!(o, "quantization   {} (msModelSlim){kv}", q.model_quant_type);
        for (kind, types) in &q.modules {
            let list: Vec<String> = types.iter().map(|(t, n)| format!("{t} x{n}")).collect();
            let _ = writeln!(o, "               {kind}: {}", list.join(", "));
        }
    }
    if s.unexpected_tensors.is_empty() {
        let _ = writeln!(o, "unexpected     none");
    } else {
        let _ = writeln!(o, "unexpected     {} tensor(s) not used by the model:", s.unexpected_tensors.len());
        for u in &s.unexpected_tensors {
            let file = u.file.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
            let _ = writeln!(o, "               {} {} {:?} in {file}", u.name, u.dtype, u.shape);
        }
    }
    o
}

/// 71988781056 → "71,988,781,056".
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// Parameter count in the unit that reads best: "71.99 B", "934.72 K".
pub fn billions(n: u64) -> String {
    let x = n as f64;
    if x >= 1e9 {
        format!("{:.2} B", x / 1e9)
    } else if x >= 1e6 {
        format!("{:.2} M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.2} K", x / 1e3)
    } else {
        format!("{n}")
    }
}

/// `panguc inspect PKG`: what a compiled package holds and which CPU tier
/// this machine would load (`cpu.tier_in_use`, or why none can run).
pub fn package_json(dir: &std::path::Path) -> anyhow::Result<serde_json::Value> {
    let m = panguc_runtime::package::read_manifest(dir)?;
    let cpu = m.cpu.as_ref().map(|cpu| {
        let tiers: Vec<serde_json::Value> = cpu
            .tiers
            .iter()
            .map(|t| serde_json::json!({ "name": t.name, "cpu": t.cpu, "features": t.features, "library": t.library }))
            .collect();
        let (in_use, error) = match panguc_runtime::loader::select_tier(cpu, None) {
            Ok(t) => (Some(t.name.clone()), None),
            Err(e) => (None, Some(format!("{e:#}"))),
        };
        serde_json::json!({ "triple": cpu.triple, "tiers": tiers, "tier_in_use": in_use, "tier_error": error })
    });
    Ok(serde_json::json!({
        "package": dir.display().to_string(),
        "format_version": m.format_version,
        "panguc_version": m.panguc_version,
        "targets": m.targets,
        "files": m.files.len(),
        "bytes": m.files.values().map(|f| f.bytes).sum::<u64>(),
        "ranks": m.ranks.as_ref().map(|r| r.devices),
        "cpu": cpu,
    }))
}

pub fn package_text(info: &serde_json::Value) -> String {
    let mut s = format!(
        "package {} (format {}, panguc {})\ntargets: {}\nfiles: {}, {:.1} MB\n",
        info["package"].as_str().unwrap_or("?"),
        info["format_version"],
        info["panguc_version"].as_str().unwrap_or("?"),
        info["targets"].as_array().map_or(String::new(), |t| t
            .iter()
            .filter_map(|x| x.as_str())
            .collect::<Vec<_>>()
            .join(", ")),
        info["files"],
        info["bytes"].as_f64().unwrap_or(0.0) / 1e6,
    );
    if let Some(r) = info["ranks"].as_u64() {
        s.push_str(&format!("partitioned over {r} devices\n"));
    }
    let cpu = &info["cpu"];
    if !cpu.is_null() {
        for t in cpu["tiers"].as_array().into_iter().flatten() {
            s.push_str(&format!(
                "CPU tier {} ({}): {}\n",
                t["name"].as_str().unwrap_or("?"),
                t["cpu"].as_str().unwrap_or("?"),
                t["library"].as_str().unwrap_or("?")
            ));
        }
        match cpu["tier_in_use"].as_str() {
            Some(t) => s.push_str(&format!("CPU tier in use on this machine: {t}\n")),
            None => s.push_str(&format!("no CPU tier can run here: {}\n", cpu["tier_error"].as_str().unwrap_or("?"))),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::OpenOptions;
    use crate::synth::{synth, Preset};
    use std::path::Path;

    const REAL_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/pangu-pro-moe-72b");

    #[test]
    fn number_formatting() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(71_988_781_056), "71,988,781,056");
        assert_eq!(billions(71_988_781_056), "71.99 B");
        assert_eq!(billions(16_498_139_136), "16.50 B");
        assert_eq!(billions(934_720), "934.72 K");
        assert_eq!(billions(12), "12");
    }

    /// The real 72B config as a config-only checkpoint (the committed copy
    /// holds only config.json).
    fn real_config_only() -> Checkpoint {
        Checkpoint::open(Path::new(REAL_DIR)).unwrap()
    }

    #[test]
    fn json_for_real_config_only() {
        let ck = real_config_only();
        let v = inspect_json(&ck);
        assert_eq!(v["total_params"], 71_988_781_056u64);
        assert_eq!(v["active_params"], 16_498_139_136u64);
        assert_eq!(v["has_weights"], false);
        assert_eq!(v["bytes_estimated"], true);
        assert_eq!(v["bytes_by_dtype"]["bf16"], 143_977_562_112u64);
        assert_eq!(v["total_bytes"], 143_977_562_112u64);
        assert_eq!(v["num_tensors"], 9939);
        assert_eq!(v["tensors_per_layer"], 207);
        assert_eq!(v["hidden_size"], 5120);
        assert_eq!(v["num_experts"], 64);
        assert_eq!(v["num_experts_per_tok"], 8);
        assert_eq!(v["rope_theta"], 1.6e7);
        assert_eq!(v["head_dim"], 128);
        assert_eq!(v["num_groups"], 8);
        assert_eq!(v["experts_per_group"], 8);
        assert_eq!(v["unexpected_tensors"], serde_json::json!([]));
        let text = inspect_text(&ck);
        assert!(text.contains("71,988,781,056 total (71.99 B)"), "{text}");
        assert!(text.contains("16,498,139,136 active per token (16.50 B)"), "{text}");
        assert!(text.contains("143,977,562,112 bytes"), "{text}");
        assert!(text.contains("estimated"), "{text}");
        assert!(text.contains("9,939 (207 per layer)"), "{text}");
    }

    #[test]
    fn json_for_tiny_with_weights() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("t");
        synth(&dir, Preset::Tiny, 3, DType::F32).unwrap();
        let ck = Checkpoint::open(&dir).unwrap();
        let v = inspect_json(&ck);
        assert_eq!(v["has_weights"], true);
        assert_eq!(v["bytes_estimated"], false);
        assert_eq!(v["bytes_by_dtype"], serde_json::json!({"f32": 934_720u64 * 4}));
        assert_eq!(v["total_params"], 934_720);
        assert_eq!(v["num_shards"], 4);
        assert_eq!(v["vocab_size"], 512);
        let text = inspect_text(&ck);
        assert!(text.contains("934,720 total (934.72 K)"), "{text}");
        assert!(text.contains("4 weight file(s)"), "{text}");
        assert!(!text.contains("estimated"), "{text}");

        let forced = Checkpoint::open_with(&dir, &OpenOptions { config_only: true, progress: false }).unwrap();
        let v = inspect_json(&forced);
        // torch_dtype float32 in the synthesized config → estimate in f32.
        assert_eq!(v["bytes_by_dtype"], serde_json::json!({"f32": 934_720u64 * 4}));
        assert_eq!(v["bytes_estimated"], true);
    }
}
