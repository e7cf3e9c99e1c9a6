//! The cost model: work, bytes and on-chip working set of one op, and the
//! time of one kernel on a hardware profile:
//!
//! `time = max(compute time, memory time) + launch overhead`
//!
//! where compute splits into matmul (cube) and vector work at their peaks,
//! and memory counts every byte read and written once. Views (`reshape`)
//! and weight-only values (prepared at package time) are not kernels; the
//! callers decide that from the graph, this module only prices one op.
//!
//! Shapes are evaluated at a [`Workload`]: `tokens` new tokens per
//! sequence, `past` cached tokens, `seqs` sequences batched into one step.
//! Work and activation bytes are per sequence; weights that every sequence
//! shares are read once per step. A paged workload prices a batched
//! program (the ragged-batch ops over a paged cache) instead: the program
//! runs once per step over all `tokens` rows of the `seqs` sequences, so
//! nothing is multiplied by `seqs` (see [`Workload::copies`]).

use crate::profile::HardwareProfile;
use panguc_ir::shape::{bindings, Bindings, SYM_MAX_BLOCKS, SYM_NUM_BLOCKS, SYM_PAST, SYM_SEQS};
use panguc_ir::{Op, TensorType};

/// Shape bindings at which a graph is priced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Workload {
    /// New tokens per sequence; for a paged workload, all rows of the step.
    pub tokens: usize,
    /// Cached tokens of each sequence before the step.
    pub past: usize,
    pub seqs: usize,
    /// `Some(block size)`: the program is a batched step over a paged cache.
    pub paged_block: Option<usize>,
}

impl Workload {
    pub fn decode(context: usize, seqs: usize) -> Workload {
        Workload { tokens: 1, past: context, seqs, paged_block: None }
    }

    pub fn prefill(tokens: usize) -> Workload {
        Workload { tokens, past: 0, seqs: 1, paged_block: None }
    }

    /// One decode step of a batched program: `seqs` sequences of one new
    /// token each (`tokens = seqs` rows), each with `context` cached tokens
    /// in blocks of `block_size`.
    pub fn batched_decode(context: usize, seqs: usize, block_size: usize) -> Workload {
        Workload { tokens: seqs, past: context, seqs, paged_block: Some(block_size.max(1)) }
    }

    /// How many times the priced program runs in one step: once per
    /// sequence for a per-sequence program, once for a batched one.
    pub fn copies(&self) -> f64 {
        if self.paged_block.is_some() {
            1.0
        } else {
            self.seqs as f64
        }
    }

    /// New tokens of each sequence.
    pub fn tokens_per_seq(&self) -> usize {
        match self.paged_block {
            Some(_) => self.tokens / self.seqs.max(1),
            None => self.tokens,
        }
    }

    pub fn bindings(&self) -> Bindings {
        let mut b = bindings(self.tokens, self.past);
        if let Some(block) = self.paged_block {
            let max_blocks = (self.past + self.tokens_per_seq()).div_ceil(block);
            b.insert(SYM_SEQS.to_string(), self.seqs);
            b.insert(SYM_MAX_BLOCKS.to_string(), max_blocks);
            b.insert(SYM_NUM_BLOCKS.to_string(), self.seqs * max_blocks);
        }
        b
    }
}

/// One operand as the cost model sees it.
#[derive(Debug, Clone, Copy)]
pub struct Operand<'a> {
    pub ty: &'a TensorType,
    /// Computed at package time: read from memory in its stored dtype.
    pub weight_only: bool,
}

/// The work of one op.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OpWork {
    /// Per sequence.
    pub matmul_flops: f64,
    /// Int8 x int8 multiply-adds (x2), per sequence, priced at the int8 peak.
    pub int8_ops: f64,
    /// Per sequence.
    pub vector_flops: f64,
    /// Weight bytes read once per step, shared by all sequences.
    pub shared_weight_bytes: f64,
    /// Weight bytes each sequence reads on its own (embedding rows).
    pub seq_weight_bytes: f64,
    /// KV-cache bytes read (operands with a `past` dimension), per sequence.
    pub kv_bytes: f64,
    /// Other bytes read, and all bytes written, per sequence.
    pub act_bytes: f64,
    /// Smallest on-chip working set of one tile: (vector buffer, matrix buffer) bytes.
    pub working_set: (f64, f64),
    /// Per sequence: DMA copies whose fixed cost matters because each moves
    /// little data (rows fetched one at a time through an index), priced at
    /// [`DMA_COPY_SECONDS`] each on top of the bytes they move.
    pub small_copies: f64,
}

/// Fixed cost of one small DMA copy, amortised over a chip's cores: about
/// 100 ns of MTE setup and latency on one core, with ~24 cores issuing in
/// parallel. An assumption of this model (no per-SKU figure is published);
/// it only separates kernels that fetch rows one by one from kernels that
/// fetch the same bytes as blocks.
pub const DMA_COPY_SECONDS: f64 = 4e-9;

/// The cube tile edge (M, N and K of one base tile for 16-bit operands)
/// used to count how often a grouped GEMM fetches its A rows.
const CUBE_TILE: f64 = 128.0;

impl OpWork {
    /// Seconds this op takes as one kernel.
    pub fn seconds(&self, w: &Workload, p: &HardwareProfile) -> f64 {
        let (compute, memory) = self.compute_and_memory_seconds(w, p);
        compute.max(memory) + p.launch_overhead_us * 1e-6
    }

    /// The two terms [`OpWork::seconds`] takes the larger of: compute (cube,
    /// int8 and vector work at their peaks) and memory (bytes at the
    /// bandwidth, plus the small copies' fixed costs).
    pub fn compute_and_memory_seconds(&self, w: &Workload, p: &HardwareProfile) -> (f64, f64) {
        let seqs = w.copies();
        let compute = seqs
            * (self.matmul_flops / (p.matmul_tflops * 1e12)
                + self.int8_ops / (p.int8_tops * 1e12)
                + self.vector_flops / (p.vector_tflops * 1e12));
        let memory = self.bytes(w) / (p.mem_bandwidth_gbs * 1e9) + seqs * self.small_copies * DMA_COPY_SECONDS;
        (compute, memory)
    }

    /// All bytes moved in one step.
    pub fn bytes(&self, w: &Workload) -> f64 {
        self.shared_weight_bytes + w.copies() * (self.seq_weight_bytes + self.kv_bytes + self.act_bytes)
    }

    /// Weight bytes read in one step.
    pub fn weight_bytes(&self, w: &Workload) -> f64 {
        self.shared_weight_bytes + w.copies() * self.seq_weight_bytes
    }

    /// Whether one tile's working set fits the profile's on-chip buffers.
    pub fn fits(&self, p: &HardwareProfile) -> bool {
        self.working_set.0 <= p.ub_kib * 1024.0 && self.working_set.1 <= p.l1_kib * 1024.0
    }
}

fn numel(t: &TensorType, b: &Bindings) -> f64 {
    t.concrete_shape(b).map(|s| s.iter().product::<usize>() as f64).unwrap_or(0.0)
}

fn dim(t: &TensorType, i: usize, b: &Bindings) -> f64 {
    t.shape.get(i).and_then(|d| d.eval(b).ok()).unwrap_or(0) as f64
}

fn has_past(t: &TensorType) -> bool {
    t.shape.iter().any(|d| d.symbols().any(|s| s == SYM_PAST))
}

/// Bytes per element of a value in memory on this profile.
fn elem_bytes(o: &Operand, p: &HardwareProfile) -> f64 {
    if o.weight_only || !o.ty.dtype.is_float() {
        o.ty.dtype.size_bytes() as f64
    } else {
        p.activation_bytes
    }
}

/// Expected number of distinct experts selected by `tokens` tokens when
/// each picks one of `per_group` experts in each of `groups` groups
/// uniformly (expert groups are balanced by construction).
pub fn expected_unique_experts(tokens: f64, groups: f64, per_group: f64) -> f64 {
    if per_group <= 1.0 {
        return groups * per_group.max(0.0);
    }
    groups * per_group * (1.0 - (1.0 - 1.0 / per_group).powf(tokens))
}

/// Expected distinct experts of `experts` a grouped GEMM over `rows`
/// (token, expert) rows of one step touches. Its rows come from MoGE
/// routing (pangu-pro-moe.md): every token picks exactly one expert in each
/// of G groups, so there are `tokens x G` rows and G = rows / tokens (one
/// token: exactly G distinct experts, never fewer). Rows that are not a
/// whole multiple of the step's tokens, or groups that do not divide the
/// experts, fall back to uniform draws over all experts.
fn grouped_gemm_experts(rows: f64, experts: f64, w: &Workload) -> f64 {
    let tokens = w.tokens as f64;
    let groups = if tokens > 0.0 { (rows / tokens).round() } else { 0.0 };
    let moge = groups >= 1.0 && groups * tokens == rows && experts % groups == 0.0;
    let unique = if moge {
        expected_unique_experts(tokens * w.copies(), groups, experts / groups)
    } else {
        expected_unique_experts(rows, 1.0, experts)
    };
    unique.min(experts)
}

/// Blocks of at most one cube tile of rows when `rows` rows are spread
/// evenly over `experts` experts.
fn row_blocks(rows: f64, experts: f64) -> f64 {
    if rows <= 0.0 || experts <= 0.0 {
        return 0.0;
    }
    experts.min(rows) * (rows / experts.min(rows) / CUBE_TILE).ceil()
}

/// Price `op` with operands `args` producing `results` at workload `w`.
pub fn op_work(op: &Op, args: &[Operand], results: &[TensorType], w: &Workload, p: &HardwareProfile) -> OpWork {
    let b = w.bindings();
    let mut work = OpWork::default();
    let read = |work: &mut OpWork, o: &Operand, fraction: f64, shared: bool| {
        let bytes = numel(o.ty, &b) * elem_bytes(o, p) * fraction;
        if o.weight_only {
            if shared {
                work.shared_weight_bytes += bytes;
            } else {
                work.seq_weight_bytes += bytes;
            }
        } else if has_past(o.ty) {
            work.kv_bytes += bytes;
        } else {
            work.act_bytes += bytes;
        }
    };
    let out_numel: f64 = results.iter().map(|r| numel(r, &b)).sum();
    let write_all = |work: &mut OpWork| {
        for r in results {
            let o = Operand { ty: r, weight_only: false };
            work.act_bytes += numel(r, &b) * elem_bytes(&o, p);
        }
    };
    let f32b = 4.0;
    match op {
        Op::Gather => {
            // Only the gathered rows of the table are read.
            let rows = numel(args[1].ty, &b);
            let row: f64 = (1..args[0].ty.rank()).map(|i| dim(args[0].ty, i, &b)).product();
            let table = Operand { ty: args[0].ty, weight_only: args[0].weight_only };
            let bytes = rows * row * elem_bytes(&table, p);
            if table.weight_only {
                work.seq_weight_bytes += bytes;
            } else {
                work.act_bytes += bytes;
            }
            read(&mut work, &args[1], 1.0, true);
            write_all(&mut work);
        }
        Op::CausalMask => {
            // The keys operand only supplies a length.
            read(&mut work, &args[0], 1.0, true);
            work.vector_flops = out_numel;
            write_all(&mut work);
        }
        Op::QkvRope { kv_heads, .. } | Op::QkvRopeCacheWrite { kv_heads, .. } => {
            // The caches are written in place, never read; the paged form
            // also reads its slot mapping.
            for (i, a) in args.iter().enumerate() {
                if i < 5 || i == 7 {
                    read(&mut work, a, 1.0, true);
                }
            }
            let (t, n, h) = (dim(args[0].ty, 0, &b), dim(args[1].ty, 0, &b), dim(args[0].ty, 1, &b));
            let d = dim(args[3].ty, 1, &b);
            work.matmul_flops = 2.0 * t * n * h;
            work.vector_flops = 4.0 * t * n;
            // q in full, and only the new rows of k and v: the kernel appends
            // to the cache in place instead of copying it.
            let q = Operand { ty: &results[0], weight_only: false };
            work.act_bytes += numel(&results[0], &b) * elem_bytes(&q, p);
            work.act_bytes += 2.0 * t * *kv_heads as f64 * d * p.activation_bytes;
            work.working_set = (16.0 * d * f32b * 6.0, 2.0 * (16.0 * 16.0 + 16.0 * d) * 2.0);
        }
        Op::KvCacheWrite => {
            // The new rows and their slots are read, the rows stored in
            // place: the rest of the cache is never touched.
            read(&mut work, &args[1], 1.0, true);
            read(&mut work, &args[2], 1.0, true);
            work.act_bytes += numel(args[1].ty, &b) * p.activation_bytes;
        }
        Op::PagedAttention { .. } => {
            for a in [&args[0], &args[3], &args[4], &args[5]] {
                read(&mut work, a, 1.0, true);
            }
            let (t, hq, d) = (dim(args[0].ty, 0, &b), dim(args[0].ty, 1, &b), dim(args[0].ty, 2, &b));
            let kv_row = dim(args[1].ty, 2, &b) * d;
            // Each sequence's chunk of q rows at positions past.. sees its
            // own context causally; only those keys and values are read.
            let (seqs, past) = (w.seqs.max(1) as f64, w.past as f64);
            let q = t / seqs;
            let visible = seqs * (q * past + q * (q + 1.0) / 2.0);
            work.kv_bytes += 2.0 * seqs * (past + q) * kv_row * p.activation_bytes;
            write_all(&mut work);
            work.matmul_flops = 4.0 * hq * d * visible;
            work.vector_flops = 6.0 * hq * visible;
            let tile = 16.0 * 16.0;
            work.working_set = ((2.0 * 16.0 * d + 2.0 * tile + 32.0) * f32b, 2.0 * 2.0 * 16.0 * d * 2.0);
        }
        Op::GroupedMatmulMoe | Op::MoeFfn | Op::MoeGroupedFfn => {
            let (t, g) = (dim(args[1].ty, 0, &b), dim(args[1].ty, 1, &b));
            let (e, h, i) = (dim(args[4].ty, 0, &b), dim(args[4].ty, 1, &b), dim(args[4].ty, 2, &b));
            let unique = expected_unique_experts(t * w.copies(), g, e / g.max(1.0)).min(e);
            for (k, a) in args.iter().enumerate() {
                let fraction = if k == 3 || k == 4 { unique / e.max(1.0) } else { 1.0 };
                read(&mut work, a, fraction, true);
            }
            work.matmul_flops = 6.0 * t * g * i * h;
            work.vector_flops = 6.0 * t * g * i + t * h * g;
            if matches!(op, Op::MoeFfn | Op::MoeGroupedFfn) {
                let is = dim(args[6].ty, 1, &b);
                work.matmul_flops += 6.0 * t * is * h;
                work.vector_flops += 6.0 * t * is + 2.0 * t * h;
            }
            // The gate/up GEMM's A rows: the per-row form fetches each
            // (row, expert) pair's row through the slot index once per K
            // step and column tile; the batched form gathers every pair's
            // row once into its expert's contiguous block (written and read
            // back) and then fetches blocks of up to a tile of rows.
            let pairs = t * g;
            let steps = (h / CUBE_TILE).ceil() * (2.0 * i / CUBE_TILE).ceil();
            work.small_copies = if matches!(op, Op::MoeGroupedFfn) {
                work.act_bytes += 2.0 * pairs * h * p.activation_bytes;
                pairs + row_blocks(pairs, unique) * steps
            } else {
                pairs * steps
            };
            write_all(&mut work);
            work.working_set = (2.0 * 4.0 * 16.0 * 16.0 * f32b, 2.0 * 3.0 * 16.0 * 16.0 * 2.0);
        }
        Op::MoeInitRouting { .. } => {
            // Every (row, expert) pair's row is copied once.
            for a in args {
                read(&mut work, a, 1.0, true);
            }
            write_all(&mut work);
            work.small_copies = dim(&results[1], 0, &b);
            work.vector_flops = dim(&results[1], 0, &b);
        }
        Op::GroupedMatmul => {
            // Only the experts that received rows are read; rows arrive in
            // contiguous per-expert blocks.
            let (rows, k) = (dim(args[0].ty, 0, &b), dim(args[0].ty, 1, &b));
            let (e, n) = (dim(args[1].ty, 0, &b), dim(args[1].ty, 1, &b));
            let unique = grouped_gemm_experts(rows, e, w);
            read(&mut work, &args[0], 1.0, true);
            read(&mut work, &args[1], unique / e.max(1.0), true);
            read(&mut work, &args[2], 1.0, true);
            write_all(&mut work);
            work.matmul_flops = 2.0 * rows * n * k;
            work.small_copies = row_blocks(rows, unique) * (k / CUBE_TILE).ceil() * (n / CUBE_TILE).ceil();
            work.working_set = (2.0 * 16.0 * 16.0 * f32b, 2.0 * 3.0 * 16.0 * 16.0 * 2.0);
        }
        Op::GroupedQuantMatMul => {
            // As `GroupedMatmul`, with 1-byte operands (their dtype sizes)
            // and the per-expert weight scales read for touched experts only.
            let (rows, k) = (dim(args[0].ty, 0, &b), dim(args[0].ty, 1, &b));
            let (e, n) = (dim(args[1].ty, 0, &b), dim(args[1].ty, 1, &b));
            let unique = grouped_gemm_experts(rows, e, w);
            let touched = unique / e.max(1.0);
            for (i, a) in args.iter().enumerate() {
                read(&mut work, a, if i == 1 || i == 2 { touched } else { 1.0 }, true);
            }
            write_all(&mut work);
            work.int8_ops = 2.0 * rows * n * k;
            // Tiles hold the same bytes as 16-bit ones: the K edge doubles.
            work.small_copies = row_blocks(rows, unique) * (k / (2.0 * CUBE_TILE)).ceil() * (n / CUBE_TILE).ceil();
            // Per-token and per-channel scale rows beside the int32 tile.
            work.working_set = (2.0 * 16.0 * 16.0 * f32b + 2.0 * 16.0 * f32b, 2.0 * 3.0 * 16.0 * 32.0);
        }
        Op::QuantMatMul | Op::QuantMatMulPerToken => {
            for a in args {
                read(&mut work, a, 1.0, true);
            }
            write_all(&mut work);
            let k = args[0].ty.shape.last().and_then(|d| d.eval(&b).ok()).unwrap_or(0) as f64;
            work.int8_ops = 2.0 * out_numel * k;
            // Dequant epilogue: convert, then one or two scale multiplies.
            work.vector_flops = 3.0 * out_numel;
            work.working_set = (2.0 * 16.0 * 16.0 * f32b + 2.0 * 16.0 * f32b, 2.0 * 3.0 * 16.0 * 32.0);
        }
        _ => {
            for a in args {
                read(&mut work, a, 1.0, true);
            }
            write_all(&mut work);
            let (mm, vec, ws) = compute(op, args, results, &b);
            work.matmul_flops = mm;
            work.vector_flops = vec;
            work.working_set = ws;
        }
    }
    work
}

/// (matmul flops, vector flops, working set) of the ops without special
/// memory behaviour.
fn compute(op: &Op, args: &[Operand], results: &[TensorType], b: &Bindings) -> (f64, f64, (f64, f64)) {
    let out = results.first().map(|r| numel(r, b)).unwrap_or(0.0);
    let last = |t: &TensorType| t.shape.last().and_then(|d| d.eval(b).ok()).unwrap_or(0) as f64;
    let f32b = 4.0;
    let tile = 16.0 * 16.0;
    match op {
        Op::MatMul { .. } | Op::MatMulBias { .. } => {
            let k = last(args[0].ty);
            let ws = if matches!(op, Op::MatMulBias { .. }) {
                (2.0 * tile * f32b + 16.0 * f32b, 2.0 * 2.0 * tile * 2.0)
            } else {
                (0.0, 0.0)
            };
            (2.0 * out * k, 0.0, ws)
        }
        Op::GateUpSwiGlu => {
            let k = last(args[0].ty);
            (4.0 * out * k, 6.0 * out, (3.0 * 2.0 * tile * f32b, 2.0 * 3.0 * tile * 2.0))
        }
        Op::MoeRouterTopK { .. } => {
            let (t, e, h) = (numel(args[0].ty, b) / last(args[0].ty).max(1.0), dim(args[1].ty, 0, b), last(args[0].ty));
            (2.0 * t * e * h, 8.0 * t * e, (3.0 * e * f32b, 2.0 * 2.0 * tile * 2.0))
        }
        Op::MoeGatingGroupTopK { .. } => {
            let e = last(args[0].ty);
            (0.0, 8.0 * numel(args[0].ty, b), (3.0 * e * f32b, 0.0))
        }
        Op::FlashAttention { .. } => {
            let (t, hq, d) = (dim(args[0].ty, 0, b), dim(args[0].ty, 1, b), dim(args[0].ty, 2, b));
            let kv = dim(args[1].ty, 0, b);
            // Causal: query i (at position past+i) sees past+i+1 keys.
            let past = (kv - t).max(0.0);
            let visible = t * past + t * (t + 1.0) / 2.0;
            let ub = (2.0 * 16.0 * d + 2.0 * tile + 32.0) * f32b;
            (4.0 * hq * d * visible, 6.0 * hq * visible, (ub, 2.0 * 2.0 * 16.0 * d * 2.0))
        }
        Op::RmsNorm { .. } => (0.0, 4.0 * out, (5.0 * last(args[0].ty) * f32b, 0.0)),
        Op::AddRmsNorm { .. } => (0.0, 5.0 * out, (9.0 * last(args[0].ty) * f32b, 0.0)),
        Op::Rope => (0.0, 4.0 * out, (6.0 * last(args[0].ty) * f32b, 0.0)),
        Op::SwiGlu => (0.0, 6.0 * out, (6.0 * 256.0 * f32b, 0.0)),
        Op::FusedElementwise { expr } => {
            let ops = expr.split_whitespace().filter(|t| !t.starts_with('$')).count() as f64;
            (0.0, ops * out, (2.0 * (args.len() as f64 + 1.0) * 256.0 * f32b, 0.0))
        }
        Op::Softmax { .. } => (0.0, 5.0 * out, (0.0, 0.0)),
        Op::Unary(u) => {
            let per = if matches!(u, panguc_ir::op::UnaryOp::Neg) { 1.0 } else { 4.0 };
            (0.0, per * out, (0.0, 0.0))
        }
        Op::Binary(_) => (0.0, out, (0.0, 0.0)),
        Op::Reduce { .. } | Op::ArgMax { .. } => (0.0, numel(args[0].ty, b), (0.0, 0.0)),
        Op::RopeTable { .. } => (0.0, 10.0 * out, (0.0, 0.0)),
        Op::OneHot { .. } | Op::Iota { .. } | Op::Scalar { .. } => (0.0, out, (0.0, 0.0)),
        // |x|, running max, then scale, round and convert per element; the
        // row (f32) and its int8 image must sit in the vector buffer.
        Op::DynamicQuant => (0.0, 5.0 * numel(args[0].ty, b), (last(args[0].ty) * (f32b + 1.0), 0.0)),
        // Divide, add offset, round/convert (clamp folded into the convert).
        Op::Quantize => (0.0, 3.0 * out, (0.0, 0.0)),
        // Convert, subtract offset, multiply.
        Op::Dequantize => (0.0, 3.0 * out, (0.0, 0.0)),
        _ => (0.0, 0.0, (0.0, 0.0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::builtin_profile;
    use panguc_ir::{DType, Dim};

    fn ty(dtype: DType, dims: &[Dim]) -> TensorType {
        TensorType::new(dtype, dims.to_vec())
    }

    #[test]
    fn decode_matmul_is_memory_bound_and_reads_the_weight_once() {
        let p = builtin_profile("ascend910b1").unwrap();
        let x = ty(DType::F32, &[Dim::tokens(), Dim::c(5120)]);
        let wt = ty(DType::BF16, &[Dim::c(5120), Dim::c(5120)]);
        let out = ty(DType::F32, &[Dim::tokens(), Dim::c(5120)]);
        let args = [Operand { ty: &x, weight_only: false }, Operand { ty: &wt, weight_only: true }];
        let w = Workload::decode(2048, 1);
        let work = op_work(&Op::MatMul { transpose_b: true }, &args, std::slice::from_ref(&out), &w, &p);
        assert_eq!(work.shared_weight_bytes, 5120.0 * 5120.0 * 2.0);
        let t = work.seconds(&w, &p);
        let mem = work.bytes(&w) / 1.42e12;
        assert!((t - mem - 5e-6).abs() < 1e-9, "memory-bound: {t} vs {mem}");
        // 64 sequences share the weight read.
        let w64 = Workload::decode(2048, 64);
        let work64 = op_work(&Op::MatMul { transpose_b: true }, &args, &[out], &w64, &p);
        assert_eq!(work64.weight_bytes(&w64), work.weight_bytes(&w));
    }

    #[test]
    fn prefill_matmul_is_compute_bound() {
        let p = builtin_profile("ascend910b1").unwrap();
        let x = ty(DType::F32, &[Dim::tokens(), Dim::c(5120)]);
        let wt = ty(DType::BF16, &[Dim::c(5120), Dim::c(5120)]);
        let out = ty(DType::F32, &[Dim::tokens(), Dim::c(5120)]);
        let args = [Operand { ty: &x, weight_only: false }, Operand { ty: &wt, weight_only: true }];
        let w = Workload::prefill(2048);
        let work = op_work(&Op::MatMul { transpose_b: true }, &args, &[out], &w, &p);
        assert_eq!(work.matmul_flops, 2.0 * 2048.0 * 5120.0 * 5120.0);
        let compute = work.matmul_flops / 364e12;
        assert!((work.seconds(&w, &p) - compute - 5e-6).abs() < 1e-9);
    }

    /// The MoE block's operands for hidden `h`, intermediate `i`, shared
    /// intermediate `is`, 64 experts in 8 groups.
    fn moe_operands(h: usize, i: usize, is: usize) -> Vec<TensorType> {
        let (t, c) = (Dim::tokens(), Dim::c);
        vec![
            ty(DType::F32, &[t.clone(), c(h)]),
            ty(DType::F32, &[t.clone(), c(8)]),
            ty(DType::I64, &[t.clone(), c(8)]),
            ty(DType::BF16, &[c(64), c(2 * i), c(h)]),
            ty(DType::BF16, &[c(64), c(h), c(i)]),
            ty(DType::BF16, &[c(2 * is), c(h)]),
            ty(DType::BF16, &[c(h), c(is)]),
            ty(DType::F32, &[t, c(h)]),
        ]
    }

    fn moe_seconds(op: &Op, tys: &[TensorType], w: &Workload, p: &HardwareProfile) -> f64 {
        let args: Vec<Operand> =
            tys.iter().enumerate().map(|(k, t)| Operand { ty: t, weight_only: (3..7).contains(&k) }).collect();
        op_work(op, &args, &[tys[0].clone()], w, p).seconds(w, p)
    }

    #[test]
    fn batched_moe_wins_when_rows_share_experts() {
        let p = builtin_profile("ascend910b1").unwrap();
        let big = moe_operands(5120, 1344, 5376);
        let (per_row, batched) = (Op::MoeFfn, Op::MoeGroupedFfn);
        // One token: each expert has one row, so gathering it first only
        // adds a copy per row.
        let one = Workload::decode(2048, 1);
        assert!(moe_seconds(&per_row, &big, &one, &p) < moe_seconds(&batched, &big, &one, &p));
        // 64 decode rows or a 2048-token prefill: the per-row form fetches
        // each row once per K step and column tile.
        for w in [Workload::batched_decode(2048, 64, 128), Workload::prefill(2048)] {
            let (a, b) = (moe_seconds(&per_row, &big, &w, &p), moe_seconds(&batched, &big, &w, &p));
            assert!(b < 0.8 * a, "{w:?}: batched {b} vs per row {a}");
        }
        // The tiny model's experts are one tile wide and deep: no gain.
        let tiny = moe_operands(64, 32, 128);
        let w = Workload::prefill(2048);
        assert!(moe_seconds(&per_row, &tiny, &w, &p) < moe_seconds(&batched, &tiny, &w, &p));
    }

    #[test]
    fn unique_experts_interpolate_between_k_and_all() {
        assert!((expected_unique_experts(1.0, 8.0, 8.0) - 8.0).abs() < 1e-12);
        let many = expected_unique_experts(2048.0, 8.0, 8.0);
        assert!((many - 64.0).abs() < 1e-6);
        let b64 = expected_unique_experts(64.0, 8.0, 8.0);
        assert!(b64 > 63.0 && b64 < 64.0, "{b64}");
    }

    #[test]
    fn rmsnorm_working_set_must_fit_the_unified_buffer() {
        let mut p = builtin_profile("ascend910b1").unwrap();
        let x = ty(DType::F32, &[Dim::tokens(), Dim::c(5120)]);
        let wt = ty(DType::F32, &[Dim::c(5120)]);
        let args = [Operand { ty: &x, weight_only: false }, Operand { ty: &wt, weight_only: true }];
        let w = Workload::decode(16, 1);
        let work = op_work(&Op::RmsNorm { eps: 1e-5 }, &args, std::slice::from_ref(&x), &w, &p);
        assert!(work.fits(&p));
        p.ub_kib = 64.0;
        assert!(!work.fits(&p), "5 rows of 20 KiB do not fit 64 KiB");
    }

    #[test]
    fn paged_ops_price_only_the_context_and_the_new_rows() {
        let p = builtin_profile("ascend910b1").unwrap();
        let a = p.activation_bytes;
        // 4 sequences decoding one token each, 10 cached tokens, blocks of 2.
        let w = Workload::batched_decode(10, 4, 2);
        let b = w.bindings();
        assert_eq!((b["tokens"], b["seqs"], b["max_blocks"], b["num_blocks"]), (4, 4, 6, 24));
        assert_eq!((w.copies(), w.tokens_per_seq()), (1.0, 1));
        let q = ty(DType::F32, &[Dim::tokens(), Dim::c(8), Dim::c(16)]);
        let cache = ty(DType::F32, &[Dim::num_blocks(), Dim::c(2), Dim::c(2), Dim::c(16)]);
        let i32s = |dims: &[Dim]| ty(DType::I32, dims);
        let (table, qsl, ctx) =
            (i32s(&[Dim::seqs(), Dim::max_blocks()]), i32s(&[Dim::seqs().add(&Dim::c(1))]), i32s(&[Dim::seqs()]));
        fn act(t: &TensorType) -> Operand<'_> {
            Operand { ty: t, weight_only: false }
        }
        let args = [act(&q), act(&cache), act(&cache), act(&table), act(&qsl), act(&ctx)];
        let work = op_work(&Op::PagedAttention { scale: 0.25 }, &args, std::slice::from_ref(&q), &w, &p);
        // Each query row sees its sequence's 11 positions: 4 x 11 (key, query) pairs.
        assert_eq!(work.matmul_flops, 4.0 * 8.0 * 16.0 * 44.0);
        // K and V of 4 contexts of 11 positions x 2 heads x 16, not the 24-block cache.
        assert_eq!(work.kv_bytes, 2.0 * 4.0 * 11.0 * 32.0 * a);
        let new = ty(DType::F32, &[Dim::tokens(), Dim::c(2), Dim::c(16)]);
        let slots = i32s(&[Dim::tokens()]);
        let args = [act(&cache), act(&new), act(&slots)];
        let work = op_work(&Op::KvCacheWrite, &args, std::slice::from_ref(&cache), &w, &p);
        assert_eq!(work.kv_bytes, 0.0, "the cache itself is neither read nor copied");
        // 4 new rows read and stored, plus 4 i32 slots.
        assert_eq!(work.act_bytes, 2.0 * 4.0 * 32.0 * a + 4.0 * 4.0);
    }

    fn act(t: &TensorType) -> Operand<'_> {
        Operand { ty: t, weight_only: false }
    }

    fn weight(t: &TensorType) -> Operand<'_> {
        Operand { ty: t, weight_only: true }
    }

    #[test]
    fn int8_decode_gemm_reads_one_byte_per_weight() {
        let p = builtin_profile("ascend910b1").unwrap();
        let xq = ty(DType::I8, &[Dim::tokens(), Dim::c(5120)]);
        let wq = ty(DType::I8, &[Dim::c(5120), Dim::c(5120)]);
        let w_scale = ty(DType::F32, &[Dim::c(5120)]);
        let x_scale = ty(DType::F32, &[Dim::tokens()]);
        let out = ty(DType::F32, &[Dim::tokens(), Dim::c(5120)]);
        let args = [act(&xq), weight(&wq), weight(&w_scale), act(&x_scale)];
        let w = Workload::decode(2048, 1);
        let work = op_work(&Op::QuantMatMulPerToken, &args, std::slice::from_ref(&out), &w, &p);
        // 26 214 400 int8 weight bytes + 20 480 bytes of f32 scales.
        assert_eq!(work.weight_bytes(&w), 26_234_880.0);
        assert_eq!(work.int8_ops, 52_428_800.0);
        assert_eq!(work.matmul_flops, 0.0);
        // Activations (float ones at the profile's 2 B): 5120 B int8 row
        // + 2 B token scale read, 5120 x 2 B written.
        assert_eq!(work.act_bytes, 5120.0 + 2.0 + 10_240.0);
        let mem = (26_234_880.0 + 15_362.0) / 1.42e12;
        let t = work.seconds(&w, &p);
        assert!((t - mem - 5e-6).abs() < 1e-12, "memory-bound: {t} vs {mem}");
    }

    #[test]
    fn int8_prefill_gemm_runs_at_twice_the_bf16_cube_rate() {
        let p = builtin_profile("ascend910b1").unwrap();
        assert_eq!(p.int8_tops, 728.0);
        let xq = ty(DType::I8, &[Dim::tokens(), Dim::c(5120)]);
        let wq = ty(DType::I8, &[Dim::c(5120), Dim::c(5120)]);
        let w_scale = ty(DType::F32, &[Dim::c(5120)]);
        let x_scale = ty(DType::F32, &[Dim::tokens()]);
        let out = ty(DType::F32, &[Dim::tokens(), Dim::c(5120)]);
        let args = [act(&xq), weight(&wq), weight(&w_scale), act(&x_scale)];
        let w = Workload::prefill(2048);
        let work = op_work(&Op::QuantMatMulPerToken, &args, std::slice::from_ref(&out), &w, &p);
        assert_eq!(work.int8_ops, 2.0 * 2048.0 * 5120.0 * 5120.0);
        // 107.4 G int8 ops at 728 TOPS: 147.5 us; epilogue 3 x 10.5 M
        // vector flops at 48 x 64 x 2 x 1.85 GHz = 11.37 TFLOP/s: 2.77 us.
        let cube = 2.0 * 2048.0 * 5120.0 * 5120.0 / 728e12;
        let vector = 3.0 * 2048.0 * 5120.0 / (48.0 * 64.0 * 2.0 * 1850e6);
        let t = work.seconds(&w, &p);
        assert!((t - (cube + vector) - 5e-6).abs() < 1e-12, "compute-bound: {t} vs {}", cube + vector);
        // The same GEMM in bf16 is priced at the 364 TFLOP/s cube peak.
        assert!(((2.0 * 2048.0 * 5120.0 * 5120.0 / 364e12) / cube - 2.0).abs() < 1e-12);
    }

    #[test]
    fn grouped_int8_gemm_reads_only_the_touched_expert() {
        let p = builtin_profile("ascend910b1").unwrap();
        let (h, n, e) = (5120, 1344, 64);
        let xq = ty(DType::I8, &[Dim::c(1), Dim::c(h)]);
        let wq = ty(DType::I8, &[Dim::c(e), Dim::c(n), Dim::c(h)]);
        let w_scale = ty(DType::F32, &[Dim::c(e), Dim::c(n)]);
        let x_scale = ty(DType::F32, &[Dim::c(1)]);
        let counts = ty(DType::I64, &[Dim::c(e)]);
        let out = ty(DType::F32, &[Dim::c(1), Dim::c(n)]);
        let args = [act(&xq), weight(&wq), weight(&w_scale), act(&x_scale), act(&counts)];
        let w = Workload::decode(2048, 1);
        let work = op_work(&Op::GroupedQuantMatMul, &args, std::slice::from_ref(&out), &w, &p);
        // One row touches one of 64 experts: 1344 x 5120 B + 1344 x 4 B.
        assert_eq!(work.weight_bytes(&w), 6_881_280.0 + 5_376.0);
        assert_eq!(work.int8_ops, 2.0 * 1344.0 * 5120.0);
        // One row block x ceil(5120 / 256) K tiles x ceil(1344 / 128) N tiles.
        assert_eq!(work.small_copies, 20.0 * 11.0);
    }

    /// The grouped GEMMs of MoGE routing: a token's 8 rows go to one
    /// expert in each of 8 groups, so one token reads exactly 8 of the 64
    /// experts (uniform draws over all 64 would expect 7.58).
    #[test]
    fn grouped_gemm_reads_one_expert_per_group_per_token() {
        let p = builtin_profile("ascend910b1").unwrap();
        let (h, n, e) = (5120, 1344, 64);
        let wq = ty(DType::I8, &[Dim::c(e), Dim::c(n), Dim::c(h)]);
        let w_scale = ty(DType::F32, &[Dim::c(e), Dim::c(n)]);
        let counts = ty(DType::I64, &[Dim::c(e)]);
        let expert = (n * h + 4 * n) as f64;
        for tokens in [1usize, 2, 64] {
            // Per group: 8 experts, each missed by a token with odds 7/8.
            let want = 64.0 * (1.0 - 0.875f64.powi(tokens as i32));
            let rows = Dim::tokens().mul(&Dim::c(8)).unwrap();
            let xq = ty(DType::I8, &[rows.clone(), Dim::c(h)]);
            let x_scale = ty(DType::F32, std::slice::from_ref(&rows));
            let out = ty(DType::F32, &[rows, Dim::c(n)]);
            let args = [act(&xq), weight(&wq), weight(&w_scale), act(&x_scale), act(&counts)];
            let w = Workload::batched_decode(2048, tokens, 128);
            let work = op_work(&Op::GroupedQuantMatMul, &args, std::slice::from_ref(&out), &w, &p);
            let got = work.weight_bytes(&w) / expert;
            assert!((got - want).abs() < 1e-9, "{tokens} tokens: {got} experts read, want {want}");
        }
        assert!((expected_unique_experts(8.0, 1.0, 64.0) - 7.576).abs() < 1e-3);
    }

    #[test]
    fn quant_conversions_are_vector_work() {
        let p = builtin_profile("ascend910b1").unwrap();
        let w = Workload::prefill(16);
        let x = ty(DType::F32, &[Dim::tokens(), Dim::c(5120)]);
        let q = ty(DType::I8, &[Dim::tokens(), Dim::c(5120)]);
        let s = ty(DType::F32, &[Dim::tokens()]);
        let dynamic = op_work(&Op::DynamicQuant, &[act(&x)], &[q.clone(), s.clone()], &w, &p);
        assert_eq!(dynamic.vector_flops, 5.0 * 16.0 * 5120.0);
        assert_eq!((dynamic.matmul_flops, dynamic.int8_ops), (0.0, 0.0));
        // Read 2 B per element; write 1 B per element and 2 B per scale.
        assert_eq!(dynamic.act_bytes, 16.0 * 5120.0 * 3.0 + 16.0 * 2.0);
        assert_eq!(dynamic.working_set, (5120.0 * 5.0, 0.0));
        let one = ty(DType::F32, &[Dim::c(1)]);
        let quant = op_work(&Op::Quantize, &[act(&x), act(&one), act(&one)], std::slice::from_ref(&q), &w, &p);
        assert_eq!(quant.vector_flops, 3.0 * 16.0 * 5120.0);
        let deq = op_work(&Op::Dequantize, &[act(&q), act(&one), act(&one)], std::slice::from_ref(&x), &w, &p);
        assert_eq!(deq.vector_flops, 3.0 * 16.0 * 5120.0);
    }
}
