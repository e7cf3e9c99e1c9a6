//! Hugging Face checkpoint import, file side: `config.json`, the safetensors
//! shards and their index, memory-mapped and validated against the tensor
//! list the config implies.
//!
//! - [`checkpoint`] — [`Checkpoint::open`], validation, raw and f32 access;
//! - [`shard`] — one memory-mapped `.safetensors` file and its header;
//! - [`index`] — `model.safetensors.index.json`;
//! - [`convert`] — dtype mapping and bf16/f16/f32 → f32 conversion;
//! - [`quant`] — msModelSlim's `quant_model_description.json` and the tensors each quant type needs.

pub mod checkpoint;
pub mod convert;
pub mod index;
pub mod quant;
pub mod shard;

pub use checkpoint::{Checkpoint, OpenOptions, UnexpectedTensor, WeightLayout};

/// File names of the standard HF layout.
pub const CONFIG_FILE: &str = "config.json";
pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// HF shard file name: `model-00001-of-00003.safetensors` (1-based).
pub fn shard_file_name(index: usize, count: usize) -> String {
    format!("model-{index:05}-of-{count:05}.safetensors")
}
