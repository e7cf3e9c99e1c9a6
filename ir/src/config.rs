//! Model configuration: the Hugging Face `config.json` of a Pangu Pro MoE
//! checkpoint, its validation, and the tensor/parameter accounting derived
//! from it.
//!
//! Parsing goes through `serde_json::Value` and extracts one key at a time
//! (instead of `#[derive(Deserialize)]` on the struct) so every error can name
//! the offending key and say what was found, e.g.
//! "config.json: key `hidden_size` must be a non-negative integer, found string".

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fmt;

/// The only architecture this compiler implements.
pub const ARCHITECTURE: &str = "PanguProMoEForCausalLM";
/// openPangu-R-72B-2512: same `model_type`, different network (rejected).
pub const ARCHITECTURE_V2: &str = "PanguProMoEV2ForCausalLM";
/// `model_type` shared by V1 and V2.
pub const MODEL_TYPE: &str = "PanguProMoE";

/// Shape configuration of a Pangu Pro MoE model. Field names are exactly the
/// `config.json` keys, so `serde_json::to_value` of this struct is a valid
/// (minimal) config.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PanguConfig {
    pub architectures: Vec<String>,
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub moe_intermediate_size: usize,
    pub shared_expert_intermediate_size: usize,
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    pub hidden_act: String,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<i64>,
    pub eos_token_id: Option<i64>,
    pub pad_token_id: Option<i64>,
    pub torch_dtype: Option<String>,
}

/// What went wrong while reading a config (useful for tests and for callers
/// that want to react differently, e.g. to a V2 model).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigErrorKind {
    NotJson,
    NotObject,
    MissingKey,
    WrongType,
    Inconsistent,
    UnsupportedArchitecture,
    UnsupportedV2,
}

/// A config error: one line, prefixed with the origin (usually the file path)
/// and naming the key involved when there is one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: {message}")]
pub struct ConfigError {
    pub origin: String,
    pub kind: ConfigErrorKind,
    pub key: Option<String>,
    pub message: String,
}

/// An upper bound on one config dimension and why it is there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DimensionLimit {
    pub key: &'static str,
    pub max: usize,
    pub why: &'static str,
}

/// The largest value panguc accepts for each size key: far beyond any
/// released model (the 72B Pangu Pro MoE is well inside every bound) but
/// small enough that every size and count derived from them fits in 64
/// bits and the compiler's tensor and kernel lists fit in memory. The README
/// lists the same table.
pub const DIMENSION_LIMITS: [DimensionLimit; 10] = [
    DimensionLimit { key: "vocab_size", max: 1 << 22, why: "16x the largest released vocabularies" },
    DimensionLimit { key: "hidden_size", max: 1 << 16, why: "8x the widest released models" },
    DimensionLimit { key: "num_hidden_layers", max: 1024, why: "8x the deepest released models" },
    DimensionLimit { key: "num_attention_heads", max: 1024, why: "8x the most heads of released models" },
    DimensionLimit { key: "num_key_value_heads", max: 1024, why: "at most the query heads" },
    DimensionLimit { key: "moe_intermediate_size", max: 1 << 18, why: "an expert wider than any dense FFN" },
    DimensionLimit { key: "shared_expert_intermediate_size", max: 1 << 18, why: "wider than any dense FFN" },
    DimensionLimit { key: "num_experts", max: 4096, why: "16x the most experts of released MoE models" },
    DimensionLimit { key: "num_experts_per_tok", max: 1024, why: "the expert groups of one layer" },
    DimensionLimit { key: "max_position_embeddings", max: 1 << 24, why: "16M tokens of context" },
];

/// Checkpoint tensors a config may imply (9,939 for the 72B model); the
/// tensor list is built in memory by every command.
pub const MAX_TENSORS: usize = 1_000_000;

/// Parameters a config may describe: 2^42 (about 4.4 trillion, 61x the 72B
/// model), whose bf16 weights alone would need 8.8 TB.
pub const MAX_TOTAL_PARAMS: u64 = 1 << 42;

/// The bound on size key `key`, if it has one.
pub fn dimension_limit(key: &str) -> Option<DimensionLimit> {
    DIMENSION_LIMITS.iter().copied().find(|l| l.key == key)
}

/// One checkpoint tensor the config implies: HF name and shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    fn new(name: impl Into<String>, shape: &[usize]) -> Self {
        TensorSpec { name: name.into(), shape: shape.to_vec() }
    }

    /// Number of elements (as u64: the 72B model's totals overflow u32 and we
    /// never want overflow questions on 32-bit hosts).
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
}

/// Keys that only openPangu V2 (`PanguProMoEV2ForCausalLM`) and its relatives
/// use, with the value that would still be compatible with V1 semantics.
/// A config that sets one of them to anything else is not a V1 model.
const V2_KEYS: &[(&str, &str, V2Neutral)] = &[
    ("sandwich_norm", "sandwich norms", V2Neutral::False),
    ("router_enable_expert_bias", "expert bias in the router", V2Neutral::False),
    ("scoring_func", "non-softmax (sigmoid) routing", V2Neutral::Str("softmax")),
    ("partial_rotary_factor", "partial RoPE", V2Neutral::One),
    ("rotary_dim", "partial RoPE", V2Neutral::Absent),
    ("param_sink_number", "attention sink parameters", V2Neutral::Zero),
    ("n_routed_experts", "DeepSeek-style expert configuration", V2Neutral::Absent),
    ("first_k_dense_replace", "dense leading layers", V2Neutral::Zero),
    ("kv_lora_rank", "multi-head latent attention", V2Neutral::Absent),
];

/// The V1-compatible value of a V2-only key.
#[derive(Clone, Copy)]
enum V2Neutral {
    Absent,
    False,
    Zero,
    One,
    Str(&'static str),
}

impl V2Neutral {
    fn accepts(self, v: &Value) -> bool {
        match (self, v) {
            (_, Value::Null) => true,
            (V2Neutral::False, Value::Bool(false)) => true,
            (V2Neutral::Zero, Value::Number(n)) => n.as_f64() == Some(0.0),
            (V2Neutral::One, Value::Number(n)) => n.as_f64() == Some(1.0),
            (V2Neutral::Str(s), Value::String(found)) => found == s,
            _ => false,
        }
    }
}

/// Per-key extraction with errors naming the key.
struct Reader<'a> {
    origin: &'a str,
    obj: &'a Map<String, Value>,
}

/// Describes a JSON value's type for "found ..." messages.
fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(_) => "boolean".into(),
        Value::Number(n) if n.is_i64() || n.is_u64() => {
            if n.as_i64().is_some_and(|i| i < 0) {
                format!("negative integer {n}")
            } else {
                format!("integer {n}")
            }
        }
        Value::Number(n) => format!("number {n}"),
        Value::String(_) => "string".into(),
        Value::Array(_) => "array".into(),
        Value::Object(_) => "object".into(),
    }
}

impl<'a> Reader<'a> {
    fn err(&self, kind: ConfigErrorKind, key: Option<&str>, message: String) -> ConfigError {
        ConfigError { origin: self.origin.to_string(), kind, key: key.map(str::to_string), message }
    }

    fn wrong_type(&self, key: &str, expected: &str, found: &Value) -> ConfigError {
        self.err(
            ConfigErrorKind::WrongType,
            Some(key),
            format!("key `{key}` must be {expected}, found {}", describe(found)),
        )
    }

    fn required(&self, key: &str) -> Result<&'a Value, ConfigError> {
        self.obj
            .get(key)
            .ok_or_else(|| self.err(ConfigErrorKind::MissingKey, Some(key), format!("missing required key `{key}`")))
    }

    fn usize(&self, key: &str) -> Result<usize, ConfigError> {
        let v = self.required(key)?;
        v.as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| self.wrong_type(key, "a non-negative integer", v))
    }

    /// A positive, finite number (integers accepted: `"rope_theta": 10000`).
    fn positive_f64(&self, key: &str) -> Result<f64, ConfigError> {
        let v = self.required(key)?;
        let x = v.as_f64().ok_or_else(|| self.wrong_type(key, "a number", v))?;
        if !(x.is_finite() && x > 0.0) {
            return Err(self.err(
                ConfigErrorKind::Inconsistent,
                Some(key),
                format!("key `{key}` must be a positive finite number, found {x}"),
            ));
        }
        Ok(x)
    }

    fn string(&self, key: &str) -> Result<String, ConfigError> {
        let v = self.required(key)?;
        v.as_str().map(str::to_string).ok_or_else(|| self.wrong_type(key, "a string", v))
    }

    fn string_list(&self, key: &str) -> Result<Vec<String>, ConfigError> {
        let v = self.required(key)?;
        let expected = "an array of strings";
        let arr = v.as_array().ok_or_else(|| self.wrong_type(key, expected, v))?;
        arr.iter()
            .map(|item| item.as_str().map(str::to_string).ok_or_else(|| self.wrong_type(key, expected, item)))
            .collect()
    }

    /// Optional bool; absent or null gives `default`.
    fn bool_or(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.wrong_type(key, "a boolean", v)),
        }
    }

    /// Optional token id. HF allows a list for `eos_token_id` (several stop
    /// tokens); we keep the first, which is the model's primary one.
    fn token_id(&self, key: &str) -> Result<Option<i64>, ConfigError> {
        let expected = "an integer, a list of integers or null";
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(items)) => match items.first() {
                None => Ok(None),
                Some(first) => first.as_i64().map(Some).ok_or_else(|| self.wrong_type(key, expected, first)),
            },
            Some(v) => v.as_i64().map(Some).ok_or_else(|| self.wrong_type(key, expected, v)),
        }
    }

    /// Optional string; absent or null gives None.
    fn opt_string(&self, key: &str) -> Result<Option<String>, ConfigError> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_str().map(|s| Some(s.to_string())).ok_or_else(|| self.wrong_type(key, "a string", v)),
        }
    }
}

impl PanguConfig {
    /// Parses and validates a config.json text. `origin` (normally the file
    /// path) prefixes every error message.
    pub fn from_json_str(text: &str, origin: &str) -> Result<PanguConfig, ConfigError> {
        let value: Value = serde_json::from_str(text).map_err(|e| ConfigError {
            origin: origin.to_string(),
            kind: ConfigErrorKind::NotJson,
            key: None,
            message: format!("not valid JSON: {e}"),
        })?;
        let Value::Object(obj) = &value else {
            return Err(ConfigError {
                origin: origin.to_string(),
                kind: ConfigErrorKind::NotObject,
                key: None,
                message: format!("top level must be a JSON object, found {}", describe(&value)),
            });
        };
        let r = Reader { origin, obj };

        // Identify the model before reading sizes: a V2 or foreign config
        // should say so, not complain about some missing MoE key.
        let architectures = r.string_list("architectures")?;
        check_architecture(&r, &architectures)?;
        let model_type = r.string("model_type")?;
        if model_type != MODEL_TYPE {
            return Err(r.err(
                ConfigErrorKind::UnsupportedArchitecture,
                Some("model_type"),
                format!("key `model_type` is \"{model_type}\"; only \"{MODEL_TYPE}\" (Pangu Pro MoE) is supported"),
            ));
        }
        check_not_v2(&r)?;

        let config = PanguConfig {
            architectures,
            model_type,
            vocab_size: r.usize("vocab_size")?,
            hidden_size: r.usize("hidden_size")?,
            num_hidden_layers: r.usize("num_hidden_layers")?,
            num_attention_heads: r.usize("num_attention_heads")?,
            num_key_value_heads: r.usize("num_key_value_heads")?,
            moe_intermediate_size: r.usize("moe_intermediate_size")?,
            shared_expert_intermediate_size: r.usize("shared_expert_intermediate_size")?,
            num_experts: r.usize("num_experts")?,
            num_experts_per_tok: r.usize("num_experts_per_tok")?,
            hidden_act: r.string("hidden_act")?,
            rope_theta: r.positive_f64("rope_theta")?,
            rms_norm_eps: r.positive_f64("rms_norm_eps")?,
            max_position_embeddings: r.usize("max_position_embeddings")?,
            // Absent means the class default, which is untied for this model.
            tie_word_embeddings: r.bool_or("tie_word_embeddings", false)?,
            bos_token_id: r.token_id("bos_token_id")?,
            eos_token_id: r.token_id("eos_token_id")?,
            pad_token_id: r.token_id("pad_token_id")?,
            // Newer transformers write `dtype` instead of `torch_dtype`.
            torch_dtype: match r.opt_string("torch_dtype")? {
                Some(d) => Some(d),
                None => r.opt_string("dtype")?,
            },
        };
        config.validate().map_err(|(key, message)| r.err(ConfigErrorKind::Inconsistent, Some(key), message))?;
        Ok(config)
    }

    /// Checks that the values agree with each other; returns the key to blame
    /// and a message.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let sizes: [(&'static str, usize); 10] = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("moe_intermediate_size", self.moe_intermediate_size),
            ("shared_expert_intermediate_size", self.shared_expert_intermediate_size),
            ("num_experts", self.num_experts),
            ("num_experts_per_tok", self.num_experts_per_tok),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (key, v) in sizes {
            if v == 0 {
                return Err((key, format!("key `{key}` must be positive, found 0")));
            }
            if let Some(limit) = dimension_limit(key) {
                if v > limit.max {
                    return Err((
                        key,
                        format!(
                            "key `{key}` is {v}, above panguc's limit of {} ({}); no model this large could be compiled or run",
                            limit.max, limit.why
                        ),
                    ));
                }
            }
        }
        if self.hidden_act != "silu" {
            return Err((
                "hidden_act",
                format!("key `hidden_act` is \"{}\"; only \"silu\" (SwiGLU experts) is supported", self.hidden_act),
            ));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err((
                "hidden_size",
                format!(
                    "key `hidden_size` ({}) is not divisible by `num_attention_heads` ({}); the head dimension must be whole",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err((
                "num_key_value_heads",
                format!(
                    "key `num_attention_heads` ({}) is not divisible by `num_key_value_heads` ({}); grouped-query attention needs a whole number of query heads per KV head",
                    self.num_attention_heads, self.num_key_value_heads
                ),
            ));
        }
        if !self.num_experts.is_multiple_of(self.num_experts_per_tok) {
            return Err((
                "num_experts",
                format!(
                    "key `num_experts` ({}) is not divisible by `num_experts_per_tok` ({}); Pangu routes one expert per group, so groups = num_experts_per_tok must split the experts evenly",
                    self.num_experts, self.num_experts_per_tok
                ),
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err((
                "num_attention_heads",
                format!(
                    "head_dim = hidden_size / num_attention_heads = {} is odd; rotate-half RoPE needs an even head dimension",
                    self.head_dim()
                ),
            ));
        }
        self.check_totals()
    }

    /// The derived sizes: tensor count and parameter count, computed with
    /// checked arithmetic and bounded so that nothing downstream (the tensor
    /// list, the parameter report, byte sizes) can wrap or exhaust memory.
    fn check_totals(&self) -> Result<(), (&'static str, String)> {
        let tensors = self.num_hidden_layers.checked_mul(self.tensors_per_layer()).and_then(|n| n.checked_add(3));
        if tensors.is_none_or(|n| n > MAX_TENSORS) {
            return Err((
                "num_hidden_layers",
                format!(
                    "key `num_hidden_layers` ({}) times the {} tensors per layer that `num_experts` ({}) implies exceeds panguc's limit of {MAX_TENSORS} checkpoint tensors",
                    self.num_hidden_layers,
                    self.tensors_per_layer(),
                    self.num_experts
                ),
            ));
        }
        let terms = self.parameter_terms();
        let total = terms.iter().try_fold(0u64, |acc, (_, n)| n.and_then(|n| acc.checked_add(n)));
        if total.is_none_or(|t| t > MAX_TOTAL_PARAMS) {
            // Blame the key behind the largest share (an overflowing term counts as largest).
            let (key, _) =
                terms.iter().max_by_key(|(_, n)| n.unwrap_or(u64::MAX)).copied().unwrap_or(("num_hidden_layers", None));
            let found = total.map_or("more than 2^64".to_string(), |t| t.to_string());
            return Err((
                key,
                format!(
                    "the config describes {found} parameters, above panguc's limit of {MAX_TOTAL_PARAMS}; most of them come from key `{key}` ({})",
                    self.dimension(key)
                ),
            ));
        }
        Ok(())
    }

    /// The value of a size key, for messages.
    fn dimension(&self, key: &str) -> usize {
        match key {
            "vocab_size" => self.vocab_size,
            "hidden_size" => self.hidden_size,
            "num_hidden_layers" => self.num_hidden_layers,
            "num_experts" => self.num_experts,
            "moe_intermediate_size" => self.moe_intermediate_size,
            "shared_expert_intermediate_size" => self.shared_expert_intermediate_size,
            _ => 0,
        }
    }

    /// Parameter count split into terms, each attributed to the key that
    /// scales it; `None` for a term that overflows u64.
    fn parameter_terms(&self) -> [(&'static str, Option<u64>); 4] {
        let u = |x: usize| x as u64;
        let mul = |xs: &[u64]| xs.iter().try_fold(1u64, |acc, &x| acc.checked_mul(x));
        let (h, q, kv, e) = (u(self.hidden_size), u(self.q_dim()), u(self.kv_dim()), u(self.num_experts));
        let layers = u(self.num_hidden_layers);
        let vocab_tables = 1 + u64::from(!self.tie_word_embeddings);
        // Norms, attention projections and biases, router gate and scale.
        let fixed = [mul(&[2, h]), mul(&[2, q, h]), mul(&[2, kv, h]), mul(&[q + 2 * kv + h]), mul(&[e, h]), Some(e)]
            .into_iter()
            .try_fold(0u64, |acc, x| x.and_then(|x| acc.checked_add(x)));
        [
            ("vocab_size", mul(&[vocab_tables, u(self.vocab_size), h]).and_then(|x| x.checked_add(h))),
            ("hidden_size", fixed.and_then(|f| f.checked_mul(layers))),
            ("num_experts", mul(&[layers, e, 3, u(self.moe_intermediate_size), h])),
            ("shared_expert_intermediate_size", mul(&[layers, 3, u(self.shared_expert_intermediate_size), h])),
        ]
    }

    /// Pretty JSON with the config.json key names (a trailing newline, like
    /// transformers writes).
    pub fn to_json_pretty(&self) -> String {
        // Serializing a struct of plain fields cannot fail; fall back to an
        // empty object rather than panic if serde ever changes its mind.
        let mut s = serde_json::to_string_pretty(self).unwrap_or_else(|_| "{}".to_string());
        s.push('\n');
        s
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Expert groups: one expert is chosen per group, so groups = K.
    pub fn num_groups(&self) -> usize {
        self.num_experts_per_tok
    }

    pub fn experts_per_group(&self) -> usize {
        self.num_experts / self.num_groups()
    }

    /// Width of the query projection (= hidden_size for this model).
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim()
    }

    /// Width of each of the key and value projections.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim()
    }

    pub fn queries_per_kv(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Tensors of decoder layer `layer`, in the canonical order (the order of
    /// the table in docs/pangu-pro-moe.md).
    pub fn layer_tensors(&self, layer: usize) -> Vec<TensorSpec> {
        let (h, q, kv) = (self.hidden_size, self.q_dim(), self.kv_dim());
        let (e, i, is) = (self.num_experts, self.moe_intermediate_size, self.shared_expert_intermediate_size);
        let p = format!("model.layers.{layer}");
        let mut v = Vec::with_capacity(self.tensors_per_layer());
        v.push(TensorSpec::new(format!("{p}.input_layernorm.weight"), &[h]));
        v.push(TensorSpec::new(format!("{p}.self_attn.q_proj.weight"), &[q, h]));
        v.push(TensorSpec::new(format!("{p}.self_attn.k_proj.weight"), &[kv, h]));
        v.push(TensorSpec::new(format!("{p}.self_attn.v_proj.weight"), &[kv, h]));
        v.push(TensorSpec::new(format!("{p}.self_attn.o_proj.weight"), &[h, q]));
        v.push(TensorSpec::new(format!("{p}.self_attn.q_proj.bias"), &[q]));
        v.push(TensorSpec::new(format!("{p}.self_attn.k_proj.bias"), &[kv]));
        v.push(TensorSpec::new(format!("{p}.self_attn.v_proj.bias"), &[kv]));
        v.push(TensorSpec::new(format!("{p}.self_attn.o_proj.bias"), &[h]));
        v.push(TensorSpec::new(format!("{p}.post_attention_layernorm.weight"), &[h]));
        v.push(TensorSpec::new(format!("{p}.mlp.gate.weight"), &[e, h]));
        v.push(TensorSpec::new(format!("{p}.mlp.router_scale"), &[1, e]));
        for x in 0..e {
            v.push(TensorSpec::new(format!("{p}.mlp.experts.{x}.gate_proj.weight"), &[i, h]));
            v.push(TensorSpec::new(format!("{p}.mlp.experts.{x}.up_proj.weight"), &[i, h]));
            v.push(TensorSpec::new(format!("{p}.mlp.experts.{x}.down_proj.weight"), &[h, i]));
        }
        v.push(TensorSpec::new(format!("{p}.mlp.shared_expert.gate_proj.weight"), &[is, h]));
        v.push(TensorSpec::new(format!("{p}.mlp.shared_expert.up_proj.weight"), &[is, h]));
        v.push(TensorSpec::new(format!("{p}.mlp.shared_expert.down_proj.weight"), &[h, is]));
        v
    }

    /// 12 fixed tensors + 3 per routed expert (207 for the real model).
    pub fn tensors_per_layer(&self) -> usize {
        12 + 3 * self.num_experts + 3
    }

    /// Every tensor the checkpoint must hold, in canonical order: embedding,
    /// layers 0..L, final norm, lm_head (absent when embeddings are tied).
    pub fn expected_tensors(&self) -> Vec<TensorSpec> {
        let (v, h) = (self.vocab_size, self.hidden_size);
        let mut out = Vec::with_capacity(self.num_tensors());
        out.push(TensorSpec::new("model.embed_tokens.weight", &[v, h]));
        for layer in 0..self.num_hidden_layers {
            out.extend(self.layer_tensors(layer));
        }
        out.push(TensorSpec::new("model.norm.weight", &[h]));
        if !self.tie_word_embeddings {
            out.push(TensorSpec::new("lm_head.weight", &[v, h]));
        }
        out
    }

    /// Length of `expected_tensors()` (9,939 for the real model).
    pub fn num_tensors(&self) -> usize {
        2 + usize::from(!self.tie_word_embeddings) + self.num_hidden_layers * self.tensors_per_layer()
    }

    /// Parameters of one routed expert (gate, up and down projections).
    pub fn params_per_expert(&self) -> u64 {
        (3 * self.moe_intermediate_size as u64).saturating_mul(self.hidden_size as u64)
    }

    /// All parameters stored in the checkpoint. Computed from the sizes
    /// (not by listing the tensors) with checked arithmetic; a validated
    /// config never gets near the saturation value `u64::MAX`.
    pub fn total_params(&self) -> u64 {
        self.parameter_terms()
            .iter()
            .try_fold(0u64, |acc, (_, n)| n.and_then(|n| acc.checked_add(n)))
            .unwrap_or(u64::MAX)
    }

    /// Parameters used for one token: everything except the routed experts
    /// that are not selected. Embedding, lm_head, router gate and
    /// router_scale all count (this is the convention that reproduces the
    /// published 16.50B exactly).
    pub fn active_params(&self) -> u64 {
        let inactive = (self.num_experts.saturating_sub(self.num_experts_per_tok) as u64)
            .checked_mul(self.params_per_expert())
            .and_then(|x| x.checked_mul(self.num_hidden_layers as u64));
        inactive.map_or(u64::MAX, |x| self.total_params().saturating_sub(x))
    }
}

fn check_architecture(r: &Reader<'_>, architectures: &[String]) -> Result<(), ConfigError> {
    if architectures.iter().any(|a| a == ARCHITECTURE_V2) {
        return Err(r.err(
            ConfigErrorKind::UnsupportedV2,
            Some("architectures"),
            format!(
                "key `architectures` names {ARCHITECTURE_V2}: this is openPangu V2 (e.g. openPangu-R-72B-2512: sandwich norms, sigmoid routing, expert bias, partial RoPE), which is not supported; panguc compiles Pangu Pro MoE V1 ({ARCHITECTURE})"
            ),
        ));
    }
    if !architectures.iter().any(|a| a == ARCHITECTURE) {
        return Err(r.err(
            ConfigErrorKind::UnsupportedArchitecture,
            Some("architectures"),
            format!("key `architectures` is {architectures:?}; only [\"{ARCHITECTURE}\"] (Pangu Pro MoE) is supported"),
        ));
    }
    Ok(())
}

fn check_not_v2(r: &Reader<'_>) -> Result<(), ConfigError> {
    for &(key, feature, neutral) in V2_KEYS {
        if let Some(v) = r.obj.get(key) {
            if !neutral.accepts(v) {
                return Err(r.err(
                    ConfigErrorKind::UnsupportedV2,
                    Some(key),
                    format!(
                        "key `{key}` = {v} means {feature}: this is an openPangu V2 config, which is not supported; panguc compiles Pangu Pro MoE V1 ({ARCHITECTURE})"
                    ),
                ));
            }
        }
    }
    Ok(())
}

impl fmt::Display for TensorSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?}", self.name, self.shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The real 72B config, as in examples/pangu-pro-moe-72b/config.json.
    const REAL: &str = r#"{
      "architectures": ["PanguProMoEForCausalLM"],
      "auto_map": {"AutoConfig": "configuration_pangu_moe.PanguProMoEConfig"},
      "model_type": "PanguProMoE",
      "vocab_size": 153376, "hidden_size": 5120, "num_hidden_layers": 48,
      "num_attention_heads": 40, "num_key_value_heads": 8, "hidden_act": "silu",
      "max_position_embeddings": 131072, "initializer_range": 0.02,
      "rms_norm_eps": 1e-05, "use_cache": true, "tie_word_embeddings": false,
      "rope_theta": 16000000.0, "attention_dropout": 0.0,
      "moe_intermediate_size": 1344, "shared_expert_intermediate_size": 5376,
      "num_experts_per_tok": 8, "num_experts": 64, "output_router_logits": false,
      "router_aux_loss_coef": 0.001, "bos_token_id": 1, "eos_token_id": 45892,
      "pad_token_id": 0, "torch_dtype": "bfloat16", "transformers_version": "4.48.2"
    }"#;

    fn real() -> PanguConfig {
        PanguConfig::from_json_str(REAL, "config.json").expect("real config parses")
    }

    /// The real config with `key` replaced by `value` (or removed if None).
    fn patched(key: &str, value: Option<Value>) -> String {
        let mut v: Value = serde_json::from_str(REAL).unwrap();
        let obj = v.as_object_mut().unwrap();
        match value {
            Some(x) => {
                obj.insert(key.to_string(), x);
            }
            None => {
                obj.remove(key);
            }
        }
        v.to_string()
    }

    fn err_of(text: &str) -> ConfigError {
        PanguConfig::from_json_str(text, "ckpt/config.json").expect_err("config should be rejected")
    }

    #[test]
    fn real_config_values_and_derived() {
        let c = real();
        assert_eq!(c.architectures, vec![ARCHITECTURE.to_string()]);
        assert_eq!(c.vocab_size, 153376);
        assert_eq!(c.head_dim(), 128);
        assert_eq!(c.num_groups(), 8);
        assert_eq!(c.experts_per_group(), 8);
        assert_eq!(c.q_dim(), 5120);
        assert_eq!(c.kv_dim(), 1024);
        assert_eq!(c.queries_per_kv(), 5);
        assert_eq!(c.rope_theta, 1.6e7);
        assert_eq!(c.rms_norm_eps, 1e-5);
        assert_eq!(c.eos_token_id, Some(45892));
        assert_eq!(c.torch_dtype.as_deref(), Some("bfloat16"));
        assert!(!c.tie_word_embeddings);
    }

    #[test]
    fn real_config_file_parses_if_present() {
        // Guards against drift between REAL above and the committed copy of
        // the real model's config.
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/pangu-pro-moe-72b/config.json");
        let text = std::fs::read_to_string(path).unwrap();
        assert_eq!(PanguConfig::from_json_str(&text, path).unwrap(), real());
    }

    #[test]
    fn published_parameter_counts() {
        let c = real();
        assert_eq!(c.total_params(), 71_988_781_056);
        assert_eq!(c.active_params(), 16_498_139_136);
        // bf16 checkpoint size from the doc.
        assert_eq!(c.total_params() * 2, 143_977_562_112);
    }

    #[test]
    fn tensor_list_matches_doc() {
        let c = real();
        let t = c.expected_tensors();
        assert_eq!(c.tensors_per_layer(), 207);
        assert_eq!(t.len(), 9939);
        assert_eq!(c.num_tensors(), 9939);
        assert_eq!(c.layer_tensors(0).len(), 207);
        assert_eq!(t[0], TensorSpec::new("model.embed_tokens.weight", &[153376, 5120]));
        assert_eq!(t[1].name, "model.layers.0.input_layernorm.weight");
        assert_eq!(t[3], TensorSpec::new("model.layers.0.self_attn.k_proj.weight", &[1024, 5120]));
        assert_eq!(t[7], TensorSpec::new("model.layers.0.self_attn.k_proj.bias", &[1024]));
        assert_eq!(t[12], TensorSpec::new("model.layers.0.mlp.router_scale", &[1, 64]));
        assert_eq!(t[13], TensorSpec::new("model.layers.0.mlp.experts.0.gate_proj.weight", &[1344, 5120]));
        assert_eq!(t[15], TensorSpec::new("model.layers.0.mlp.experts.0.down_proj.weight", &[5120, 1344]));
        assert_eq!(t[207].name, "model.layers.0.mlp.shared_expert.down_proj.weight");
        assert_eq!(t[207].shape, vec![5120, 5376]);
        assert_eq!(t[9937], TensorSpec::new("model.norm.weight", &[5120]));
        assert_eq!(t[9938], TensorSpec::new("lm_head.weight", &[153376, 5120]));
        let mut names: Vec<_> = t.iter().map(|s| s.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), 9939, "tensor names must be unique");
    }

    #[test]
    fn tied_embeddings_drop_lm_head() {
        let c = PanguConfig::from_json_str(&patched("tie_word_embeddings", Some(true.into())), "c").unwrap();
        assert_eq!(c.expected_tensors().len(), 9938);
        assert_eq!(c.total_params(), 71_988_781_056 - 153376 * 5120);
    }

    #[test]
    fn json_round_trip() {
        let c = real();
        let again = PanguConfig::from_json_str(&c.to_json_pretty(), "roundtrip").unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn unknown_keys_ignored_and_optional_keys_default() {
        let mut v: Value = serde_json::from_str(REAL).unwrap();
        let obj = v.as_object_mut().unwrap();
        obj.insert("some_future_key".into(), serde_json::json!({"x": [1, 2]}));
        for k in ["tie_word_embeddings", "bos_token_id", "pad_token_id", "torch_dtype"] {
            obj.remove(k);
        }
        obj.insert("eos_token_id".into(), serde_json::json!([45892, 45893]));
        obj.insert("dtype".into(), "float16".into());
        let c = PanguConfig::from_json_str(&v.to_string(), "c").unwrap();
        assert!(!c.tie_word_embeddings);
        assert_eq!((c.bos_token_id, c.eos_token_id, c.pad_token_id), (None, Some(45892), None));
        assert_eq!(c.torch_dtype.as_deref(), Some("float16"));
    }

    #[test]
    fn not_json_names_origin_and_position() {
        let e = err_of("{\n  \"hidden_size\": 5120,\n  oops\n}");
        assert_eq!(e.kind, ConfigErrorKind::NotJson);
        let msg = e.to_string();
        assert!(msg.starts_with("ckpt/config.json: not valid JSON"), "{msg}");
        assert!(msg.contains("line 3"), "{msg}");
        assert!(msg.contains("column"), "{msg}");
    }

    #[test]
    fn top_level_not_object() {
        let e = err_of("[1, 2]");
        assert_eq!(e.kind, ConfigErrorKind::NotObject);
        assert!(e.to_string().contains("found array"));
    }

    #[test]
    fn missing_required_keys() {
        for key in ["architectures", "model_type", "hidden_size", "num_experts", "rope_theta", "hidden_act"] {
            let e = err_of(&patched(key, None));
            assert_eq!(e.kind, ConfigErrorKind::MissingKey, "{key}");
            assert_eq!(e.key.as_deref(), Some(key));
            assert_eq!(e.to_string(), format!("ckpt/config.json: missing required key `{key}`"));
        }
    }

    #[test]
    fn wrong_types() {
        let cases = [
            ("hidden_size", serde_json::json!("5120"), "must be a non-negative integer, found string"),
            ("num_experts", serde_json::json!(-64), "must be a non-negative integer, found negative integer -64"),
            ("num_hidden_layers", serde_json::json!(48.5), "must be a non-negative integer, found number 48.5"),
            ("rope_theta", serde_json::json!("big"), "must be a number, found string"),
            ("hidden_act", serde_json::json!(1), "must be a string, found integer 1"),
            ("tie_word_embeddings", serde_json::json!("no"), "must be a boolean, found string"),
            ("architectures", serde_json::json!("PanguProMoEForCausalLM"), "must be an array of strings, found string"),
            ("eos_token_id", serde_json::json!("2"), "must be an integer, a list of integers or null, found string"),
        ];
        for (key, value, want) in cases {
            let e = err_of(&patched(key, Some(value)));
            assert_eq!(e.kind, ConfigErrorKind::WrongType, "{key}");
            assert_eq!(e.key.as_deref(), Some(key));
            assert_eq!(e.to_string(), format!("ckpt/config.json: key `{key}` {want}"));
        }
    }

    #[test]
    fn inconsistent_values() {
        let cases = [
            ("hidden_size", serde_json::json!(5100), "hidden_size", "not divisible by `num_attention_heads`"),
            (
                "num_key_value_heads",
                serde_json::json!(3),
                "num_key_value_heads",
                "not divisible by `num_key_value_heads`",
            ),
            ("num_experts", serde_json::json!(60), "num_experts", "not divisible by `num_experts_per_tok`"),
            ("num_experts_per_tok", serde_json::json!(0), "num_experts_per_tok", "must be positive, found 0"),
            ("vocab_size", serde_json::json!(0), "vocab_size", "must be positive"),
            ("hidden_act", serde_json::json!("gelu"), "hidden_act", "only \"silu\""),
            ("rms_norm_eps", serde_json::json!(0.0), "rms_norm_eps", "positive finite number"),
            ("rope_theta", serde_json::json!(-1), "rope_theta", "positive finite number"),
        ];
        for (key, value, blamed, want) in cases {
            let e = err_of(&patched(key, Some(value)));
            assert_eq!(e.kind, ConfigErrorKind::Inconsistent, "{key}");
            assert_eq!(e.key.as_deref(), Some(blamed), "{key}");
            let msg = e.to_string();
            assert!(msg.starts_with("ckpt/config.json: "), "{msg}");
            assert!(msg.contains(want), "{key}: {msg}");
            assert!(msg.contains(&format!("`{blamed}`")) || blamed == "hidden_act", "{msg}");
        }
    }

    /// One negative test per bound: each size key one above its limit is
    /// rejected naming the key, and the limit itself is accepted.
    #[test]
    fn every_dimension_bound_is_enforced() {
        for limit in DIMENSION_LIMITS {
            let mut v: Value = serde_json::from_str(REAL).unwrap();
            let obj = v.as_object_mut().unwrap();
            // Bounds are checked before the divisibility rules, so one above
            // the limit trips the bound whatever the other keys are.
            obj.insert(limit.key.into(), serde_json::json!(limit.max + 1));
            let e = err_of(&v.to_string());
            assert_eq!(e.key.as_deref(), Some(limit.key), "{e}");
            assert!(e.to_string().contains(&format!("above panguc's limit of {}", limit.max)), "{e}");
        }
        // The issue's own examples, through the parser.
        for (key, value) in [("num_hidden_layers", 100_000_000u64), ("num_experts", 4_294_967_296)] {
            let e = err_of(&patched(key, Some(serde_json::json!(value))));
            assert_eq!(e.key.as_deref(), Some(key), "{e}");
        }
        // Exactly at the bound is fine (layers = 1024 with the real widths is
        // 1.5 T parameters, under the total limit).
        let c = PanguConfig::from_json_str(&patched("num_hidden_layers", Some(serde_json::json!(1024))), "c").unwrap();
        assert_eq!(c.num_hidden_layers, 1024);
    }

    #[test]
    fn derived_totals_are_bounded() {
        // Every key within its bound, but the product too large.
        let mut v: Value = serde_json::from_str(REAL).unwrap();
        let obj = v.as_object_mut().unwrap();
        obj.insert("num_hidden_layers".into(), serde_json::json!(1024));
        obj.insert("num_experts".into(), serde_json::json!(1024));
        let e = err_of(&v.to_string());
        assert_eq!(e.key.as_deref(), Some("num_hidden_layers"), "{e}");
        assert!(e.to_string().contains("checkpoint tensors"), "{e}");

        // Few tensors, but 48 layers x 64 experts x 3 x 2^18 x 64000 parameters.
        let mut v: Value = serde_json::from_str(REAL).unwrap();
        let obj = v.as_object_mut().unwrap();
        obj.insert("moe_intermediate_size".into(), serde_json::json!(1 << 18));
        obj.insert("hidden_size".into(), serde_json::json!(40 * 1600));
        let e = err_of(&v.to_string());
        assert_eq!(e.key.as_deref(), Some("num_experts"), "{e}");
        assert!(e.to_string().contains("parameters, above panguc's limit"), "{e}");
    }

    #[test]
    fn parameter_count_matches_the_tensor_list() {
        for tied in [false, true] {
            let mut c = real();
            c.tie_word_embeddings = tied;
            let listed: u64 = c.expected_tensors().iter().map(TensorSpec::numel).sum();
            assert_eq!(c.total_params(), listed);
        }
    }

    #[test]
    fn odd_head_dim_rejected() {
        // 40 heads * 3 = 120 -> head_dim 3.
        let mut v: Value = serde_json::from_str(REAL).unwrap();
        v["hidden_size"] = 120.into();
        let e = err_of(&v.to_string());
        assert_eq!(e.kind, ConfigErrorKind::Inconsistent);
        assert!(e.to_string().contains("head_dim"), "{e}");
        assert!(e.to_string().contains("odd"), "{e}");
    }

    #[test]
    fn v2_architecture_rejected() {
        let e = err_of(&patched("architectures", Some(serde_json::json!(["PanguProMoEV2ForCausalLM"]))));
        assert_eq!(e.kind, ConfigErrorKind::UnsupportedV2);
        let msg = e.to_string();
        assert!(msg.contains("openPangu V2"), "{msg}");
        assert!(msg.contains("not supported"), "{msg}");
        assert!(msg.contains("architectures"), "{msg}");
    }

    #[test]
    fn v2_only_keys_rejected() {
        let cases = [
            ("sandwich_norm", serde_json::json!(true)),
            ("scoring_func", serde_json::json!("sigmoid")),
            ("router_enable_expert_bias", serde_json::json!(true)),
            ("partial_rotary_factor", serde_json::json!(0.5)),
        ];
        for (key, value) in cases {
            let e = err_of(&patched(key, Some(value)));
            assert_eq!(e.kind, ConfigErrorKind::UnsupportedV2, "{key}");
            assert_eq!(e.key.as_deref(), Some(key));
            let msg = e.to_string();
            assert!(msg.contains("openPangu V2") && msg.contains(key), "{msg}");
        }
        // V1-compatible values of those keys are fine.
        for (key, value) in [
            ("sandwich_norm", serde_json::json!(false)),
            ("scoring_func", serde_json::json!("softmax")),
            ("partial_rotary_factor", serde_json::json!(1.0)),
        ] {
            PanguConfig::from_json_str(&patched(key, Some(value)), "c").unwrap();
        }
    }

    #[test]
    fn other_architectures_rejected() {
        let e = err_of(&patched("architectures", Some(serde_json::json!(["LlamaForCausalLM"]))));
        assert_eq!(e.kind, ConfigErrorKind::UnsupportedArchitecture);
        assert!(e.to_string().contains("LlamaForCausalLM"), "{e}");
        let e = err_of(&patched("model_type", Some("llama".into())));
        assert_eq!(e.kind, ConfigErrorKind::UnsupportedArchitecture);
        assert_eq!(e.key.as_deref(), Some("model_type"));
    }
}
