//! A whole kernel program for one Ascend target: device dtypes of every
//! buffer, the device kernels of every program kernel, and the memory report.

use crate::emit::{emit_kernel, upper_camel, ArgRef, DeviceKernel, DeviceKernels, EmitOptions, NzTile};
use crate::target::{DevType, Target};
use anyhow::{bail, Context, Result};
use panguc_ir::kernel::{BufferId, BufferKind, KernelKind, KernelProgram};
use panguc_ir::DType;
use sha2::{Digest, Sha256};
use std::collections::HashMap;

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
    /// Per program buffer: the L1 tile order a weight is stored in (every
    /// device-kernel parameter bound to it reads it so), or `None` for
    /// row-major (see [`weight_tiling`]).
    pub buffer_nz: Vec<Option<NzTile>>,
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
    let (mut kernels, buffer_nz) = weight_tiling(&program, &bdt, opts)?;
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
        buffer_nz,
        rank: None,
        vendor: format!("panguc_{id}"),
        op_prefix,
        program,
    })
}

/// Emit every kernel of `program` and decide each buffer's layout: a weight
/// is stored pre-tiled ([`NzTile`]) only when every device-kernel parameter
/// bound to it, in every launch, reads it in the same tile order (so a
/// weight a vector kernel also reads, e.g. an embedding gather, or one two
/// GEMMs tile differently, stays row-major). Kernels are first emitted
/// allowing the tiled form for every argument bound to a weight in all its
/// launches; a kernel argument whose tiled read loses in some buffer is
/// then emitted row-major again, until nothing changes (each round only
/// withdraws permissions, so this ends).
fn weight_tiling(
    program: &KernelProgram,
    bdt: &[DevType],
    opts: EmitOptions,
) -> Result<(Vec<DeviceKernels>, Vec<Option<NzTile>>)> {
    let is_weight = |b: BufferId| matches!(program.buffers[b.index()].kind, BufferKind::Weight { .. });
    let mut launches: Vec<Vec<&Vec<BufferId>>> = vec![vec![]; program.kernels.len()];
    for l in &program.launches {
        launches[l.kernel].push(&l.args);
    }
    let mut masks = Vec::with_capacity(program.kernels.len());
    for (ki, k) in program.kernels.iter().enumerate() {
        if launches[ki].is_empty() {
            bail!("kernel `{}` is never launched", k.name);
        }
        let args = k.args.len().min(64);
        let mask = (0..args).filter(|&a| launches[ki].iter().all(|l| is_weight(l[a]))).fold(0u64, |m, a| m | 1 << a);
        masks.push(mask);
    }
    let emit = |ki: usize, mask: u64| -> Result<DeviceKernels> {
        let dts: Vec<DevType> = launches[ki][0].iter().map(|a| bdt[a.index()]).collect();
        let o = EmitOptions { nz_args: mask, ..opts };
        emit_kernel(&program.kernels[ki], &dts, &o).with_context(|| format!("emitting AscendC for {}", opts.target))
    };
    let mut kernels: Vec<DeviceKernels> = (0..masks.len()).map(|ki| emit(ki, masks[ki])).collect::<Result<_>>()?;
    loop {
        // What every parameter bound to each buffer wants (views of a
        // weight read it row-major).
        let mut wants: Vec<Vec<Option<NzTile>>> = vec![vec![]; program.buffers.len()];
        for (ki, dks) in kernels.iter().enumerate() {
            for args in &launches[ki] {
                for prm in dks.kernels.iter().flat_map(|d| &d.params) {
                    if let ArgRef::Orig(a) = prm.arg {
                        let (root, _) = program.root_of(args[a]);
                        wants[root.index()].push(if root == args[a] { prm.nz } else { None });
                    }
                }
            }
        }
        let mut nz: Vec<Option<NzTile>> = wants
            .iter()
            .map(|w| match w.first() {
                Some(Some(t)) if w.iter().all(|x| *x == Some(*t)) => Some(*t),
                _ => None,
            })
            .collect();
        // Buffers of one weight share its one device file: one layout.
        let mut agreed: HashMap<usize, (Option<NzTile>, bool)> = HashMap::new();
        for (i, b) in program.buffers.iter().enumerate() {
            if let BufferKind::Weight { index } = b.kind {
                let (first, split) = agreed.entry(index).or_insert((nz[i], false));
                *split |= *first != nz[i];
            }
        }
        for (i, b) in program.buffers.iter().enumerate() {
            if let BufferKind::Weight { index } = b.kind {
                if agreed[&index].1 {
                    nz[i] = None;
                }
            }
        }
        let mut changed = false;
        for (ki, dks) in kernels.iter_mut().enumerate() {
            let mut mask = masks[ki];
            for prm in dks.kernels.iter().flat_map(|d| &d.params) {
                if let (ArgRef::Orig(a), Some(_)) = (&prm.arg, prm.nz) {
                    if launches[ki].iter().any(|l| nz[l[*a].index()].is_none()) {
                        mask &= !(1u64 << a);
                    }
                }
            }
            if mask != masks[ki] {
                masks[ki] = mask;
                *dks = emit(ki, mask)?;
                changed = true;
            }
        }
        if !changed {
            return Ok((kernels, nz));
        }
    }
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
    use panguc_ir::kernel::{tile_extent, ArgSpec, Buffer, Extent, Kernel, Launch, Layout};
    use panguc_ir::Dim;

    /// A three-slot program of `kernels` launched as `launches`.
    fn program(buffers: Vec<Buffer>, kernels: Vec<Kernel>, launches: Vec<Launch>) -> KernelProgram {
        KernelProgram {
            version: panguc_ir::kernel::KERNEL_PROGRAM_VERSION,
            name: "t".into(),
            symbols: vec![],
            buffers,
            weights: vec![],
            kernels,
            launches,
            inputs: vec![],
            outputs: vec![],
            caches: vec![],
            slots: 3,
        }
    }

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
        let p = program(buffers, vec![k], vec![Launch { kernel: 0, args: (0..3).map(BufferId).collect() }]);
        assert_eq!(device_dtypes(&p, DevType::BF16), vec![DevType::BF16, DevType::I8, DevType::F32]);
    }

    /// A weight read only by GEMMs is stored pre-tiled; one a gather also
    /// reads stays row-major, and so does every weight a shared GEMM kernel
    /// reads (its one variant must suit all its launches).
    #[test]
    fn only_weights_every_reader_tiles_are_stored_tiled() {
        let (h, n) = (64usize, 32usize);
        let act = |slot| BufferKind::Activation { slot };
        let bufs = [
            ("x", DType::F32, vec![Dim::tokens(), Dim::c(h)], act(0)),
            ("ids", DType::I64, vec![Dim::tokens()], BufferKind::Input { index: 0 }),
            ("emb", DType::F32, vec![Dim::c(n), Dim::c(h)], BufferKind::Weight { index: 0 }),
            ("w_own", DType::F32, vec![Dim::c(n), Dim::c(h)], BufferKind::Weight { index: 1 }),
            ("w_shared", DType::F32, vec![Dim::c(n), Dim::c(h)], BufferKind::Weight { index: 2 }),
            ("y", DType::F32, vec![Dim::tokens(), Dim::c(n)], act(1)),
            ("g", DType::F32, vec![Dim::tokens(), Dim::c(h)], act(2)),
        ];
        let buffers: Vec<Buffer> = bufs
            .iter()
            .map(|(name, dtype, shape, kind)| Buffer {
                name: name.to_string(),
                dtype: *dtype,
                shape: shape.clone(),
                kind: kind.clone(),
            })
            .collect();
        // The GEMM weight (argument 1) in the CPU packages' panels.
        let kernel = |name: &str, kind: KernelKind, ids: &[usize]| {
            let gemm = matches!(kind, KernelKind::Gemm { .. });
            let layout =
                |pos: usize| if gemm && pos == 1 { Layout::Panels { nr: 16, kn: false } } else { Layout::RowMajor };
            let args: Vec<ArgSpec> = ids
                .iter()
                .enumerate()
                .map(|(pos, &i)| ArgSpec { dtype: bufs[i].1, shape: bufs[i].2.clone(), layout: layout(pos) })
                .collect();
            let tiles = tile_extent(&kind, &args).unwrap();
            Kernel { name: name.into(), kind, args, tiles, thread_scratch: Extent::constant(0) }
        };
        let gemm = KernelKind::Gemm { epilogue: panguc_ir::kernel::Epilogue::None };
        let kernels = vec![
            kernel("panguc_k000_gemm", gemm.clone(), &[0, 2, 5]),
            kernel("panguc_k001_gemm", gemm, &[0, 3, 5]),
            kernel("panguc_k002_gather", KernelKind::Gather, &[2, 1, 6]),
        ];
        let launch =
            |kernel: usize, args: &[usize]| Launch { kernel, args: args.iter().map(|&i| BufferId(i as u32)).collect() };
        // Kernel 0 reads emb and w_shared; kernel 1 w_own alone.
        let launches = vec![launch(0, &[0, 2, 5]), launch(0, &[0, 4, 5]), launch(1, &[0, 3, 5]), launch(2, &[2, 1, 6])];
        let p = program(buffers, kernels, launches);
        let ap = emit_program(&p, Target::Ascend910B, DevType::F32).unwrap();
        let tile = NzTile { base_n: 128, base_k: 64, c0: 8 };
        assert_eq!(ap.buffer_nz[2..5], [None, Some(tile), None]);
        // The emitted variants say the same, and only kernel 1 copies W in one piece.
        let w_param = |k: usize| ap.kernels[k].kernels[0].params[1].clone();
        assert_eq!((w_param(0).nz, w_param(1).nz), (None, Some(tile)));
        assert!(!ap.kernels[0].kernels[0].source.contains("kPad"));
        assert!(ap.kernels[1].kernels[0].source.contains("kPad"));
    }
}
