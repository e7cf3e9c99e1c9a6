//! Byte-level evaluation of the weight-only subgraphs that only move
//! elements (merged QKV and gate/up weights, stacked experts): concats,
//! stacks, reshapes and exact widening casts of checkpoint tensors already
//! stored in the prepared weight's dtype.
//!
//! The reference path runs such a subgraph through the interpreter in f32
//! and rounds the result back to the storage dtype, which costs a
//! conversion both ways and several copies for every element of the
//! model's largest weights. Every op here moves whole elements and the
//! values never leave the storage dtype, so the bytes are the ones the
//! reference path produces (bf16 -> f32 -> bf16 is exact), at memory-copy
//! speed. Anything else returns `None` and takes the reference path.

use crate::frontend::Checkpoint;
use anyhow::Result;
use panguc_ir::graph::{Function, ParamKind};
use panguc_ir::{DType, Op, ValueId};
use std::borrow::Cow;
use std::collections::HashMap;

/// A value of the subgraph: row-major elements in the storage dtype.
struct Raw<'a> {
    shape: Vec<usize>,
    bytes: Cow<'a, [u8]>,
}

/// The row-major bytes of `function`'s output in `dtype`, or `None` when
/// the subgraph does more than move elements (or reads a tensor stored in
/// another dtype): the caller then evaluates it with the interpreter.
pub fn layout_only_bytes<'a>(ckpt: &'a Checkpoint, function: &Function, dtype: DType) -> Result<Option<Vec<u8>>> {
    let elem = dtype.size_bytes();
    let mut values: HashMap<ValueId, Raw<'a>> = HashMap::new();
    for p in &function.params {
        let ParamKind::Weight { tensor } = &p.kind else { return Ok(None) };
        let Some((stored, shape, _)) = ckpt.tensor_info(tensor) else { return Ok(None) };
        if stored != dtype || Some(&shape) != static_shape(function, p.value).as_ref() {
            return Ok(None);
        }
        values.insert(p.value, Raw { shape, bytes: Cow::Borrowed(ckpt.tensor_bytes(tensor)?) });
    }
    for node in &function.nodes {
        let [result] = node.results[..] else { return Ok(None) };
        let Some(shape) = static_shape(function, result) else { return Ok(None) };
        let Some(args) = node.args.iter().map(|a| values.get(a)).collect::<Option<Vec<&Raw>>>() else {
            return Ok(None);
        };
        let bytes = match &node.op {
            Op::Reshape { .. } => args[0].bytes.clone(),
            // Widening to f32 is exact; the value is stored back in `dtype`.
            Op::Cast { dtype: to } if *to == dtype || (*to == DType::F32 && dtype.is_float()) => args[0].bytes.clone(),
            Op::Concat { axis } => Cow::Owned(concat(&args, *axis, elem)),
            // A stack is a concat of the parts with a unit axis inserted.
            Op::Stack { axis } => Cow::Owned(concat(&args, *axis, elem)),
            _ => return Ok(None),
        };
        if bytes.len() != shape.iter().product::<usize>() * elem {
            return Ok(None);
        }
        values.insert(result, Raw { shape, bytes });
    }
    let [out] = function.outputs[..] else { return Ok(None) };
    Ok(values.remove(&out).map(|v| v.bytes.into_owned()))
}

fn static_shape(f: &Function, v: ValueId) -> Option<Vec<usize>> {
    f.ty(v).shape.iter().map(|d| d.as_const()).collect()
}

/// Row-major concatenation along `axis` of `parts` (for a stack, `axis`
/// is the new one, so each part contributes its whole trailing block).
fn concat(parts: &[&Raw], axis: usize, elem: usize) -> Vec<u8> {
    let outer: usize = parts[0].shape[..axis.min(parts[0].shape.len())].iter().product();
    let block = |p: &Raw| p.bytes.len() / outer.max(1);
    let mut out = Vec::with_capacity(parts.iter().map(|p| p.bytes.len()).sum());
    for o in 0..outer {
        for p in parts {
            let b = block(p);
            out.extend_from_slice(&p.bytes[o * b..(o + 1) * b]);
        }
    }
    debug_assert!(out.len().is_multiple_of(elem));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::package_build::{prepared_bytes, reference_bytes};
    use crate::synth::{synth_with, Preset, SynthOptions};
    use panguc_ir::kernel::WeightExpr;

    /// Every prepared weight of the tiny bf16 model (fused, as `compile`
    /// schedules it) has the same packed bytes on the byte path as on the
    /// interpreter's f32 path, and the merged weights do take the byte path.
    #[test]
    fn byte_path_equals_the_reference_path_on_the_tiny_model() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("tiny");
        synth_with(&out, &SynthOptions { preset: Preset::Tiny, seed: 0, dtype: DType::BF16, force: false }).unwrap();
        let ckpt = Checkpoint::open(&out).unwrap();
        let module = crate::commands::import(&ckpt).unwrap();
        let fused = panguc_lowering::fuse_module(&module, &Default::default(), |_, _| Ok(())).unwrap().0;
        let program = panguc_lowering::schedule::schedule(&fused, &Default::default()).unwrap();
        let mut byte_path = vec![];
        for w in &program.weights {
            assert_eq!(prepared_bytes(&ckpt, w).unwrap(), reference_bytes(&ckpt, w).unwrap(), "{}", w.name);
            if let WeightExpr::Graph { function } = &w.expr {
                if layout_only_bytes(&ckpt, function, w.dtype).unwrap().is_some() {
                    byte_path.push(w.name.as_str());
                }
            }
        }
        for merged in [
            "model.layers.0.qkv_weight@panels16",
            "model.layers.0.gate_up_weight@gateup16",
            "model.layers.1.experts_gate_up_weight@gateup16",
            "model.layers.1.experts_down_w@panels16",
        ] {
            assert!(byte_path.contains(&merged), "{merged} not on the byte path: {byte_path:?}");
        }
    }
}
