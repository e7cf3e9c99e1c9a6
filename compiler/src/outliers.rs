//! `panguc synth --outliers`: plant activation outlier channels in a
//! checkpoint without changing the function it computes.
//!
//! Random weights have no outliers, so quantization of a synthesized model
//! looks easier than on a trained one (docs/quantization.md). For each norm
//! that feeds linear layers, a few channels `j` get the norm weight scaled
//! by `f_j` (20..100) and every consumer's input column `j` divided by
//! `f_j`: the float model is the same function (up to the weight dtype's
//! rounding), but the activations entering those linears carry channels
//! 20-100x larger than the rest, which is what smoothing must undo.

use crate::frontend::convert::from_f32;
use crate::frontend::Checkpoint;
use crate::synth::write_hf_checkpoint;
use anyhow::{Context, Result};
use panguc_ir::WeightSource;
use std::collections::HashMap;
use std::path::Path;

/// Outlier channels per norm.
pub const CHANNELS: usize = 4;

/// The planted channels and factors of one norm: deterministic from the
/// layer and norm index.
pub fn outlier_channels(hidden: usize, layer: usize, which: usize) -> Vec<(usize, f32)> {
    let mut x = (layer as u64 * 2 + which as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut out: Vec<(usize, f32)> = Vec::new();
    while out.len() < CHANNELS.min(hidden) {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let j = (x >> 33) as usize % hidden;
        let f = 20.0 + ((x >> 13) % 81) as f32; // 20..=100
        if !out.iter().any(|(c, _)| *c == j) {
            out.push((j, f));
        }
    }
    out
}

/// Rewrites the float checkpoint in `dir` (as written by `synth`) with
/// planted outlier channels; returns how many channels were planted.
pub fn plant_outliers(dir: &Path, max_shard_bytes: u64) -> Result<usize> {
    let ck = Checkpoint::open(dir)?;
    let c = ck.config().clone();
    let h = c.hidden_size;
    let specs = c.expected_tensors();
    let dtype = ck.tensor_info(&specs[0].name).map(|(d, _, _)| d).context("empty checkpoint")?;
    // (tensor name) -> per-input-column divisor, and norm name -> multiplier.
    let mut column_div: HashMap<String, Vec<(usize, f32)>> = HashMap::new();
    let mut norm_mul: HashMap<String, Vec<(usize, f32)>> = HashMap::new();
    let mut planted = 0;
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}.");
        let attn = outlier_channels(h, l, 0);
        let moe = outlier_channels(h, l, 1);
        planted += attn.len() + moe.len();
        norm_mul.insert(format!("{p}input_layernorm.weight"), attn.clone());
        norm_mul.insert(format!("{p}post_attention_layernorm.weight"), moe.clone());
        for proj in ["q_proj", "k_proj", "v_proj"] {
            column_div.insert(format!("{p}self_attn.{proj}.weight"), attn.clone());
        }
        column_div.insert(format!("{p}mlp.gate.weight"), moe.clone());
        for proj in ["gate_proj", "up_proj"] {
            column_div.insert(format!("{p}mlp.shared_expert.{proj}.weight"), moe.clone());
            for e in 0..c.num_experts {
                column_div.insert(format!("{p}mlp.experts.{e}.{proj}.weight"), moe.clone());
            }
        }
    }
    let mut data: Vec<Vec<u8>> = Vec::with_capacity(specs.len());
    for s in &specs {
        let mut v = ck.load_f32(&s.name, &s.shape)?.into_f32();
        if let Some(chs) = norm_mul.get(&s.name) {
            for &(j, f) in chs {
                v[j] *= f;
            }
        }
        if let Some(chs) = column_div.get(&s.name) {
            let k = s.shape[1];
            for row in v.chunks_mut(k) {
                for &(j, f) in chs {
                    row[j] /= f;
                }
            }
        }
        data.push(from_f32(&v, dtype)?);
    }
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ck.config_path())?)?;
    drop(ck); // unmap before the files are replaced
    write_hf_checkpoint(dir, &config, &specs, dtype, max_shard_bytes, |i, _| Ok(std::mem::take(&mut data[i])))?;
    Ok(planted)
}
