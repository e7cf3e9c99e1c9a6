//! msModelSlim quantized checkpoints (docs/quantization.md): the
//! `quant_model_description.json` map from tensor name to the quant type of
//! the module that produced it, and the tensors each quant type needs.

use anyhow::{bail, Context, Result};
use panguc_ir::DType;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The one file name vllm-ascend reads.
pub const DESCRIPTION_FILE: &str = "quant_model_description.json";

/// Global keys of the description (everything else names a tensor).
const GLOBAL_KEYS: [&str; 7] =
    ["model_quant_type", "kv_cache_type", "kv_quant_type", "version", "group_size", "metadata", "fa_quant_type"];

/// The quant types panguc reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum QuantType {
    /// Unquantized (embeddings, norms, router, lm_head).
    #[serde(rename = "FLOAT")]
    Float,
    /// Static: per-tensor activation scale/offset, int32 quant_bias, deq_scale.
    #[serde(rename = "W8A8")]
    W8A8,
    /// Per-channel weight scale, per-token dynamic activation scale.
    #[serde(rename = "W8A8_DYNAMIC")]
    W8A8Dynamic,
    /// Int8 KV cache scales.
    #[serde(rename = "C8")]
    C8,
}

impl QuantType {
    pub const ALL: [QuantType; 4] = [QuantType::Float, QuantType::W8A8, QuantType::W8A8Dynamic, QuantType::C8];

    pub fn name(self) -> &'static str {
        match self {
            QuantType::Float => "FLOAT",
            QuantType::W8A8 => "W8A8",
            QuantType::W8A8Dynamic => "W8A8_DYNAMIC",
            QuantType::C8 => "C8",
        }
    }

    pub fn parse(s: &str) -> Option<QuantType> {
        QuantType::ALL.into_iter().find(|t| t.name() == s)
    }

    fn supported_list() -> String {
        QuantType::ALL.map(QuantType::name).join(", ")
    }
}

impl std::fmt::Display for QuantType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A parsed `quant_model_description.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantDescription {
    pub path: PathBuf,
    pub model_quant_type: QuantType,
    /// True when `kv_cache_type` (or `kv_quant_type`) is "C8".
    pub kv_int8: bool,
    tensors: BTreeMap<String, QuantType>,
}

impl QuantDescription {
    /// Reads `dir/quant_model_description.json` if it exists.
    pub fn read_dir(dir: &Path) -> Result<Option<QuantDescription>> {
        let path = dir.join(DESCRIPTION_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        Ok(Some(Self::parse(&text, &path)?))
    }

    /// Parses the description text; every error names `path` and the key.
    pub fn parse(text: &str, path: &Path) -> Result<QuantDescription> {
        let file = path.display();
        let value: serde_json::Value =
            serde_json::from_str(text).with_context(|| format!("{file} is not valid JSON"))?;
        let map = value.as_object().with_context(|| format!("{file} must hold a JSON object"))?;
        let string_of = |key: &str| -> Result<Option<&str>> {
            match map.get(key) {
                None => Ok(None),
                Some(v) => v.as_str().map(Some).with_context(|| format!("{file}: `{key}` must be a string, found {v}")),
            }
        };
        let model_quant_type = match string_of("model_quant_type")? {
            None => bail!("{file}: `model_quant_type` is missing"),
            Some(s) => QuantType::parse(s).with_context(|| {
                format!("{file}: `model_quant_type` is `{s}`, which panguc does not support (supported: W8A8, W8A8_DYNAMIC)")
            })?,
        };
        let mut kv_int8 = false;
        for key in ["kv_cache_type", "kv_quant_type"] {
            match string_of(key)? {
                None => {}
                Some("C8") => kv_int8 = true,
                Some(other) => {
                    bail!("{file}: `{key}` is `{other}`, which panguc does not support (supported: C8)")
                }
            }
        }
        let mut tensors = BTreeMap::new();
        for (name, v) in map {
            if GLOBAL_KEYS.contains(&name.as_str()) {
                continue;
            }
            let s = v
                .as_str()
                .with_context(|| format!("{file}: tensor `{name}` must map to a quant type string, found {v}"))?;
            let ty = QuantType::parse(s).with_context(|| {
                format!(
                    "{file}: tensor `{name}` has quant type `{s}`, which panguc does not support (supported: {})",
                    QuantType::supported_list()
                )
            })?;
            tensors.insert(name.clone(), ty);
        }
        Ok(QuantDescription { path: path.to_path_buf(), model_quant_type, kv_int8, tensors })
    }

    /// The quant type listed for tensor `name`.
    pub fn tensor_type(&self, name: &str) -> Option<QuantType> {
        self.tensors.get(name).copied()
    }

    /// Every listed tensor with its type.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, QuantType)> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), *v))
    }

    /// The scheme of linear module `module` (e.g. `model.layers.0.self_attn.q_proj`):
    /// the type listed for its weight, which must be listed.
    pub fn linear_type(&self, module: &str) -> Result<QuantType> {
        let weight = format!("{module}.weight");
        match self.tensor_type(&weight) {
            Some(t @ (QuantType::Float | QuantType::W8A8 | QuantType::W8A8Dynamic)) => Ok(t),
            Some(QuantType::C8) => {
                bail!("{}: tensor `{weight}` is a linear weight but is listed as C8", self.path.display())
            }
            None => bail!("{}: tensor `{weight}` is not listed (every tensor needs a quant type)", self.path.display()),
        }
    }
}

/// One tensor a quantized module needs: name, accepted dtypes, shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Needed {
    pub name: String,
    pub dtypes: &'static [DType],
    pub shape: Vec<usize>,
    /// Absent is fine (e.g. W8A8's weight_scale, unused by the forward).
    pub optional: bool,
    /// Who needs it, for error messages ("W8A8 module `...q_proj`").
    pub why: String,
}

pub const FLOATS: &[DType] = &[DType::F32, DType::F16, DType::BF16];
const INT8: &[DType] = &[DType::I8];
const INT32: &[DType] = &[DType::I32];
/// `deq_scale`: int64-encoded f32 bits for fp16 models, f32 for bf16 ones.
const DEQ: &[DType] = &[DType::I64, DType::F32];

/// The tensors of linear module `module` (weight `[n, k]`) under `ty`.
/// A bias of a static W8A8 module is folded into `quant_bias`, so it is
/// not needed (and ignored if present).
pub fn linear_tensors(ty: QuantType, module: &str, n: usize, k: usize) -> Vec<Needed> {
    let t = |suffix: &str, dtypes: &'static [DType], shape: Vec<usize>| Needed {
        name: format!("{module}.{suffix}"),
        dtypes,
        shape,
        optional: false,
        why: format!("{ty} module `{module}`"),
    };
    match ty {
        QuantType::Float | QuantType::C8 => vec![t("weight", FLOATS, vec![n, k])],
        QuantType::W8A8Dynamic => vec![
            t("weight", INT8, vec![n, k]),
            t("weight_scale", FLOATS, vec![n, 1]),
            t("weight_offset", FLOATS, vec![n, 1]),
        ],
        QuantType::W8A8 => vec![
            t("weight", INT8, vec![n, k]),
            t("input_scale", FLOATS, vec![1]),
            t("input_offset", FLOATS, vec![1]),
            t("quant_bias", INT32, vec![n]),
            t("deq_scale", DEQ, vec![n]),
            Needed { optional: true, ..t("weight_scale", FLOATS, vec![n, 1]) },
            Needed { optional: true, ..t("weight_offset", FLOATS, vec![n, 1]) },
        ],
    }
}

/// The C8 scales of one attention layer (`prefix` = `model.layers.N.`),
/// per channel `[kv_heads * head_dim]`.
pub fn kv_cache_tensors(prefix: &str, kv_dim: usize) -> Vec<Needed> {
    ["k_proj", "v_proj"]
        .iter()
        .flat_map(|p| ["kv_cache_scale", "kv_cache_offset"].map(|s| (p, s)))
        .map(|(p, s)| Needed {
            name: format!("{prefix}self_attn.{p}.{s}"),
            dtypes: FLOATS,
            shape: vec![kv_dim],
            optional: false,
            why: "the C8 (int8) KV cache".to_string(),
        })
        .collect()
}

/// The module of a linear weight name (`...q_proj.weight` -> `...q_proj`),
/// or None for tensors that are not linear weights.
pub fn linear_module<'a>(name: &'a str, shape: &[usize]) -> Option<&'a str> {
    if shape.len() != 2 || name == "model.embed_tokens.weight" {
        return None;
    }
    name.strip_suffix(".weight")
}

/// The kind of a module, with layer and expert numbers replaced by `*`
/// (`model.layers.*.mlp.experts.*.gate_proj`), for per-kind summaries.
pub fn module_kind(module: &str) -> String {
    module.split('.').map(|part| if part.parse::<usize>().is_ok() { "*" } else { part }).collect::<Vec<_>>().join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<QuantDescription> {
        QuantDescription::parse(text, Path::new("q/quant_model_description.json"))
    }

    #[test]
    fn reads_types_and_globals() {
        let d = parse(
            r#"{"model_quant_type": "W8A8_DYNAMIC", "kv_cache_type": "C8", "version": "1.0.0", "group_size": 0,
                "metadata": {"x": 1}, "a.weight": "W8A8_DYNAMIC", "a.weight_scale": "W8A8_DYNAMIC",
                "b.weight": "FLOAT", "c.weight": "W8A8", "l.kv_cache_scale": "C8"}"#,
        )
        .unwrap();
        assert_eq!(d.model_quant_type, QuantType::W8A8Dynamic);
        assert!(d.kv_int8);
        assert_eq!(d.linear_type("a").unwrap(), QuantType::W8A8Dynamic);
        assert_eq!(d.linear_type("b").unwrap(), QuantType::Float);
        assert_eq!(d.linear_type("c").unwrap(), QuantType::W8A8);
        assert_eq!(d.tensors().count(), 5);
        let e = d.linear_type("missing").unwrap_err().to_string();
        assert!(e.contains("`missing.weight`") && e.contains("not listed"), "{e}");
    }

    #[test]
    fn unknown_types_name_the_tensor_and_the_type() {
        let e = parse(r#"{"model_quant_type": "W8A8", "m.layers.0.mlp.weight": "W4A16"}"#).unwrap_err().to_string();
        assert!(e.contains("`m.layers.0.mlp.weight`") && e.contains("`W4A16`"), "{e}");
        let e = parse(r#"{"model_quant_type": "W4A8_DYNAMIC"}"#).unwrap_err().to_string();
        assert!(e.contains("model_quant_type") && e.contains("W4A8_DYNAMIC"), "{e}");
        let e = parse(r#"{"model_quant_type": "W8A8", "kv_cache_type": "C4"}"#).unwrap_err().to_string();
        assert!(e.contains("kv_cache_type") && e.contains("C4"), "{e}");
        let e = parse(r#"{"model_quant_type": "W8A8", "x.weight": 3}"#).unwrap_err().to_string();
        assert!(e.contains("`x.weight`"), "{e}");
        assert!(parse("[1]").unwrap_err().to_string().contains("quant_model_description.json"));
        assert!(parse(r#"{"a.weight": "FLOAT"}"#).unwrap_err().to_string().contains("model_quant_type"));
    }

    #[test]
    fn module_helpers() {
        assert_eq!(module_kind("model.layers.12.mlp.experts.3.up_proj"), "model.layers.*.mlp.experts.*.up_proj");
        assert_eq!(
            linear_module("model.layers.0.self_attn.q_proj.weight", &[8, 4]),
            Some("model.layers.0.self_attn.q_proj")
        );
        assert_eq!(linear_module("model.norm.weight", &[8]), None);
        assert_eq!(linear_module("model.embed_tokens.weight", &[8, 4]), None);
        let static_names: Vec<String> =
            linear_tensors(QuantType::W8A8, "m", 3, 2).into_iter().map(|n| n.name).collect();
        assert!(
            static_names.contains(&"m.deq_scale".to_string()) && static_names.contains(&"m.quant_bias".to_string())
        );
    }
}
