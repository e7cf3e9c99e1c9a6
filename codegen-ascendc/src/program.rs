//! A whole kernel program for one Ascend target: device dtypes of every
//! buffer, the device kernels of every program kernel, and the memory report.

use crate::emit::{emit_kernel, upper_camel, DeviceKernel, DeviceKernels, EmitOptions};
use crate::target::{DevType, Target};
use anyhow::{bail, Context, Result};
use panguc_ir::kernel::{BufferKind, KernelKind, KernelProgram};
use panguc_ir::DType;
use sha2::{Digest, Sha256};

/// Device dtype of every buffer: integers are i64, except the i32 step
/// metadata of a ragged batch (positions, block table, ...) and int32
/// quant biases, and int8 buffers (stored as bytes); the router's logits,
/// scales and routing weights stay f32 (the reference's softmax_f32);
/// every other float buffer (activations, weights, KV caches) is `act`.
pub fn device_dtypes(p: &KernelProgram, act: DevType) -> Vec<DevType> {
    let mut dt: Vec<DevType> = p.buffers.iter().map(|b| if b.dtype.is_float() { act } else { DevType::I64 }).collect();
    let force_f32 = |p: &KernelProgram, dt: &mut Vec<DevType>, id: panguc_ir::kernel::BufferId| {
        // A view shares its root's memory, so the root gets the dtype too.
        let (root, _) = p.root_of(id);
        dt[id.index()] = DevType::F32;
        dt[root.index()] = DevType::F32;
    };
    for l in &p.launches {
        let f32_args: &[usize] = match p.kernels[l.kernel].kind {
            KernelKind::MoeGating { .. } => &[0, 1, 2],
            KernelKind::MoeRoute => &[0, 4],
            KernelKind::MoeDown => &[2],
            // Quantization scales and offsets stay f32 (the interpreter's
            // arithmetic; the int8 kernels read them as f32).
            KernelKind::DynamicQuant | KernelKind::DynQuantMatMul { .. } => &[2],
            KernelKind::RmsNormQuant { add: false, .. } => &[4],
            KernelKind::RmsNormQuant { add: true, .. } => &[6],
            KernelKind::QuantMatMul { per_token: true, .. } => &[2, 3],
            KernelKind::QuantMatMul { per_token: false, .. } => &[3],
            KernelKind::Quantize | KernelKind::Dequantize => &[1, 2],
            KernelKind::KvCacheWriteQuant => &[2, 3],
            KernelKind::QkvRopeCacheWriteQuant { .. } => &[4, 5, 6, 7],
            KernelKind::PagedAttentionInt8 { .. } => &[6, 7, 8, 9],
            KernelKind::MoeGateUpQuant => &[1, 5, 7, 9],
            KernelKind::QuantGateUpQuant => &[1, 3, 5, 7],
            KernelKind::MoeDownQuant => &[1, 3, 5],
            // Static W8A8: input scales and offsets, deq scales (an i64
            // deq_scale stays i64 below), routing weights.
            KernelKind::StaticQuantMatMul => &[1, 2, 5],
            KernelKind::MoeGateUpStatic => &[3, 4, 7, 8, 9, 12, 13, 14],
            KernelKind::QuantGateUpStatic => &[1, 2, 5, 6, 7, 10],
            KernelKind::MoeDownStatic => &[2, 5],
            _ => &[],
        };
        for &i in f32_args {
            force_f32(p, &mut dt, l.args[i]);
        }
    }
    for (i, b) in p.buffers.iter().enumerate() {
        if b.dtype == DType::I32 {
            dt[i] = DevType::I32;
        } else if b.dtype == DType::I8 {
            // Int8 weights, quantized activations and the int8 KV cache: the
            // int8 kernels read and write them as bytes.
            dt[i] = DevType::I8;
        } else if b.dtype == DType::I64 || !b.dtype.is_float() {
            dt[i] = DevType::I64;
        }
    }
    dt
}

/// The emitted program for one target.
#[derive(Debug, Clone)]
pub struct AscendProgram {
    pub target: Target,
    pub act: DevType,
    /// Device dtype of each program buffer.
    pub buffer_dtypes: Vec<DevType>,
    /// Device kernels of each program kernel (same index).
    pub kernels: Vec<DeviceKernels>,
    /// `(rank, devices)` for one rank of a partitioned program (its host
    /// program joins the HCCL communicators); `None` for one device.
    pub rank: Option<(usize, usize)>,
    /// Vendor name of the installed operator package (`panguc_<id>`) and
    /// the snake-case prefix of every kernel entry (`pg<id>`; op types start
    /// with its UpperCamel form). `<id>` is a hash of everything the kernels
    /// bake in (see [`package_id`]), so two packages install side by side
    /// unless their kernels are identical.
    pub vendor: String,
    pub op_prefix: String,
    /// The kernel program as emitted: the input program, except that a
    /// kernel launched with different device dtypes is one kernel per
    /// dtype signature (see [`split_by_device_dtypes`]). `kernels` is
    /// indexed like `program.kernels`.
    pub program: KernelProgram,
}

/// A program kernel may be launched with different device dtypes: one
/// GEMM shape can serve the router, whose logits stay f32, and a
/// shared-expert projection in the activation dtype (the tiny model's
/// h2p ranks). Each further signature becomes its own kernel
/// `<name>_v<i>`, and its launches point to it.
fn split_by_device_dtypes(p: &KernelProgram, bdt: &[DevType]) -> KernelProgram {
    let mut out = p.clone();
    let mut signatures: Vec<Vec<(Vec<DevType>, usize)>> = vec![vec![]; p.kernels.len()];
    for li in 0..out.launches.len() {
        let k = out.launches[li].kernel;
        let sig: Vec<DevType> = out.launches[li].args.iter().map(|a| bdt[a.index()]).collect();
        let known = signatures[k].iter().find(|(s, _)| *s == sig).map(|(_, i)| *i);
        let index = match known {
            Some(i) => i,
            None if signatures[k].is_empty() => k,
            None => {
                let mut variant = p.kernels[k].clone();
                variant.name = format!("{}_v{}", variant.name, signatures[k].len());
                out.kernels.push(variant);
                out.kernels.len() - 1
            }
        };
        if known.is_none() {
            signatures[k].push((sig, index));
        }
        out.launches[li].kernel = index;
    }
    out
}

/// Emit every kernel of `p`. Fails on the first kernel that cannot be
/// emitted or tiled, naming it.
pub fn emit_program(p: &KernelProgram, target: Target, act: DevType) -> Result<AscendProgram> {
    let opts = EmitOptions::new(target, act)?;
    let bdt = device_dtypes(p, act);
    let program = split_by_device_dtypes(p, &bdt);
    let mut kernels: Vec<DeviceKernels> = Vec::with_capacity(program.kernels.len());
    for (ki, k) in program.kernels.iter().enumerate() {
        let Some(first) = program.launches.iter().find(|l| l.kernel == ki) else {
            bail!("kernel `{}` is never launched", k.name)
        };
        let dts: Vec<DevType> = first.args.iter().map(|a| bdt[a.index()]).collect();
        let dk = emit_kernel(k, &dts, &opts).with_context(|| format!("emitting AscendC for {target}"))?;
        kernels.push(dk);
    }
    let id = package_id(target, act, &kernels);
    let op_prefix = format!("pg{id}");
    for dk in kernels.iter_mut().flat_map(|d| d.kernels.iter_mut()) {
        rename_kernel(dk, &op_prefix);
    }
    Ok(AscendProgram {
        target,
        act,
        buffer_dtypes: bdt,
        kernels,
        rank: None,
        vendor: format!("panguc_{id}"),
        op_prefix,
        program,
    })
}

/// Entries are emitted as `panguc_kNNN_...` (op type `PangucKNNN...`).
const EMITTED_PREFIX: &str = "panguc";

/// 12 hex digits of the SHA-256 of what the kernels bake in: the target,
/// the activation dtype and every device kernel (source, tiling fields and
/// their constants, block count, parameters, temporary buffers, host
/// collectives), with the names as emitted.
pub fn package_id(target: Target, act: DevType, kernels: &[DeviceKernels]) -> String {
    let mut h = Sha256::new();
    h.update(format!("{}\n{act}\n{kernels:?}", target.name()).as_bytes());
    h.finalize().iter().take(6).map(|b| format!("{b:02x}")).collect()
}

/// Give a device kernel the package's prefix: its entry (and file stem),
/// op type, tiling struct and every mention of them in the source.
fn rename_kernel(dk: &mut DeviceKernel, prefix: &str) {
    let (old_snake, new_snake) = (format!("{EMITTED_PREFIX}_k"), format!("{prefix}_k"));
    let (old_camel, new_camel) = (upper_camel(&old_snake), upper_camel(&new_snake));
    let fix = |s: &str| s.replace(&old_snake, &new_snake).replace(&old_camel, &new_camel);
    dk.entry = fix(&dk.entry);
    dk.op_type = fix(&dk.op_type);
    dk.tiling_struct = fix(&dk.tiling_struct);
    dk.source = fix(&dk.source);
    debug_assert_eq!(crate::emit::cann_snake(&dk.op_type), dk.entry);
}

/// Per device kernel: UB/L1/L0 use against capacity (for report.json).
pub fn memory_report(ap: &AscendProgram) -> serde_json::Value {
    let cap = ap.target.capacity();
    let kernels: Vec<serde_json::Value> = ap
        .kernels
        .iter()
        .flat_map(|dks| dks.kernels.iter())
        .map(|k| {
            serde_json::json!({
                "kernel": k.entry,
                "op_type": k.op_type,
                "core": k.core,
                "ub": [k.mem.ub, cap.ub],
                "l1": [k.mem.l1, cap.l1],
                "l0a": [k.mem.l0a, cap.l0a],
                "l0b": [k.mem.l0b, cap.l0b],
                "l0c": [k.mem.l0c, cap.l0c],
            })
        })
        .collect();
    serde_json::json!({
        "target": ap.target.name(),
        "activation_dtype": ap.act.to_string(),
        "units": "bytes [used, capacity]",
        "kernels": kernels,
    })
}

/// Buffers that are weights, with their device dtype (for the host program
/// and weight export).
pub fn weight_buffers(p: &KernelProgram, ap: &AscendProgram) -> Vec<(usize, usize)> {
    p.buffers
        .iter()
        .enumerate()
        .filter_map(|(i, b)| match b.kind {
            BufferKind::Weight { index } => Some((i, index)),
            _ => None,
        })
        .filter(|(i, _)| ap.buffer_dtypes.len() > *i)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use panguc_ir::kernel::{tile_extent, ArgSpec, Buffer, BufferId, BufferKind, Extent, Kernel, Launch, Layout};
    use panguc_ir::Dim;

    /// An int8 program's buffers: the int8 rows stay bytes and the
    /// per-token scales f32, whatever the activation dtype.
    #[test]
    fn int8_buffers_are_bytes_and_quant_scales_f32() {
        let row = vec![Dim::tokens(), Dim::c(64)];
        let shapes = [(DType::F32, row.clone()), (DType::I8, row), (DType::F32, vec![Dim::tokens()])];
        let buffers: Vec<Buffer> = shapes
            .iter()
            .enumerate()
            .map(|(i, (dtype, shape))| Buffer {
                name: format!("b{i}"),
                dtype: *dtype,
                shape: shape.clone(),
                kind: BufferKind::Activation { slot: i },
            })
            .collect();
        let args: Vec<ArgSpec> = shapes
            .iter()
            .map(|(dtype, shape)| ArgSpec { dtype: *dtype, shape: shape.clone(), layout: Layout::RowMajor })
            .collect();
        let kind = KernelKind::DynamicQuant;
        let tiles = tile_extent(&kind, &args).unwrap();
        let k = Kernel { name: "k".into(), kind, args, tiles, thread_scratch: Extent::constant(0) };
        let p = KernelProgram {
            version: panguc_ir::kernel::KERNEL_PROGRAM_VERSION,
            name: "t".into(),
            symbols: vec![],
            buffers,
            weights: vec![],
            kernels: vec![k],
            launches: vec![Launch { kernel: 0, args: (0..3).map(BufferId).collect() }],
            inputs: vec![],
            outputs: vec![],
            caches: vec![],
            slots: 3,
        };
        assert_eq!(device_dtypes(&p, DevType::BF16), vec![DevType::BF16, DevType::I8, DevType::F32]);
    }
}
