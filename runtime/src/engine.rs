//! The compiled CPU engine: runs a package's kernel program.
//!
//! A batched program (the default for CPU packages; see
//! [`KernelProgram::is_batched`](panguc_ir::kernel::KernelProgram::is_batched))
//! runs one ragged batch step per call over one paged KV cache shared by all
//! sequences ([`CpuEngine::batched`], a [`BatchEngine`]): the scheduler's
//! block allocator owns the blocks, each step's [`StepMetadata`] says
//! where every row's K/V goes and which blocks each sequence reads, and
//! every GEMM covers all rows of the step. A one-sequence program (the rank
//! programs of a partitioned package) keeps that sequence's contiguous KV
//! cache ([`CpuEngine::with_pool`], an [`Engine`]).
//!
//! Memory: weights are the package's mappings (shared, never copied); each
//! engine owns its KV cache (`max_context` tokens of one sequence, or
//! `num_blocks` blocks; zeroed pages are only touched when written), an
//! activation arena sized per call from the buffer plan (slots sized for
//! the actual shape symbols), and per-thread scratch.
//!
//! Threads: every launch's tiles are shared out in chunks by a
//! [`WorkerPool`] (the caller works too; a pool may be shared between
//! engines). Each output element is computed by exactly one tile with the
//! same code whichever thread runs it, so the thread count never changes
//! results. Launches with few light tiles run on the calling thread.
//!
//! Batches of a one-sequence program are one engine per sequence stepped in
//! turn (`batch::PerSequenceEngines`), each launch using all threads.

use crate::batch::{BatchEngine, ChunkLogits, SeqId, StepChunk};
use crate::collective::Collective;
use crate::generate::Engine;
use crate::loader::{KernelFn, Package};
use crate::pool::WorkerPool;
use anyhow::{bail, ensure, Context, Result};
use panguc_ir::batch::StepMetadata;
use panguc_ir::kernel::{BufferId, BufferKind, KernelKind};
use panguc_ir::op::CollectiveKind;
use panguc_ir::shape::Bindings;
use panguc_ir::DType;
use panguc_ir::Tensor;
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::sync::Arc;

/// Context length the KV cache is allocated for when not configured
/// (capped by the model's `max_position_embeddings`).
pub const DEFAULT_MAX_CONTEXT: usize = 4096;
const ALIGN: usize = 64;
/// A launch is spread over threads when its tiles add up to at least this
/// much work (`tile_cost` units, about bytes or flops): below it, handing
/// tiles to another thread costs more than it saves (and on a loaded
/// machine a preempted worker would hold the step up).
const PARALLEL_WORK: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineOptions {
    /// Worker threads (>= 1).
    pub threads: usize,
    /// KV-cache capacity in tokens.
    pub max_context: Option<usize>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions { threads: default_threads(), max_context: None }
    }
}

pub fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// A thread pool for engines; share one between the engines of a batch.
pub fn thread_pool(threads: usize) -> Result<Arc<WorkerPool>> {
    if threads == 0 {
        bail!("--threads must be at least 1, got 0");
    }
    if threads > 4096 {
        bail!("--threads {threads} is not a sensible thread count (at most 4096)");
    }
    Ok(Arc::new(WorkerPool::new(threads).context("cannot start the worker threads")?))
}

/// Zeroed, 64-byte aligned heap memory.
struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: plain memory; the engine hands disjoint tiles to threads.
unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    fn zeroed(len: usize) -> Result<AlignedBuf> {
        if len == 0 {
            return Ok(AlignedBuf { ptr: std::ptr::null_mut(), len: 0 });
        }
        let layout = Layout::from_size_align(len, ALIGN)?;
        // SAFETY: non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            bail!("out of memory allocating {len} bytes");
        }
        Ok(AlignedBuf { ptr, len })
    }

    /// Make room for `len` bytes (contents are not preserved).
    fn ensure(&mut self, len: usize) -> Result<()> {
        if len > self.len {
            *self = AlignedBuf::zeroed(len.next_multiple_of(ALIGN))?;
        }
        Ok(())
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: allocated in `zeroed` with this layout.
            unsafe { dealloc(self.ptr, Layout::from_size_align(self.len, ALIGN).expect("valid layout")) }
        }
    }
}

/// What the engine's KV cache holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KvCache {
    /// One sequence's contiguous cache of `max_context` tokens.
    Contiguous { max_context: usize },
    /// `num_blocks` blocks of `block_size` tokens shared by the sequences
    /// of a batched program.
    Paged { num_blocks: usize, block_size: usize },
}

/// Runs a package's kernel program: one sequence per call, or one ragged
/// batch step per call (see the module docs).
pub struct CpuEngine {
    pkg: Arc<Package>,
    pool: Arc<WorkerPool>,
    cache: KvCache,
    past: usize,
    vocab: usize,
    kv: Vec<AlignedBuf>,
    arena: AlignedBuf,
    scratch: Vec<AlignedBuf>,
    /// Each thread's scratch address (worker `w` at `[w]`), refreshed in
    /// `bind` so a launch hands it to the kernels without allocating.
    scratch_ptrs: Vec<*mut u8>,
    /// Entry inputs in program order (`ids`, `positions`, and a batched
    /// step's metadata), integers as i64.
    inputs: Vec<Vec<i64>>,
    ptrs: Vec<*mut u8>,
    /// Per kernel: work of one tile (see `panguc_ir::kernel::tile_cost`).
    tile_cost: Vec<panguc_ir::kernel::Extent>,
    /// Per kernel: launches and their wall time, when profiling.
    profile: Option<Vec<(u64, std::time::Duration)>>,
    /// This engine's global rank and the communication library for the
    /// program's collective launches (rank programs of a partitioned
    /// package; `None` for a single-device program).
    comm: Option<(usize, Arc<dyn Collective>)>,
}

// SAFETY: the raw pointers point into memory the engine owns or the shared,
// immutable package mappings.
unsafe impl Send for CpuEngine {}

impl CpuEngine {
    /// An engine with its own thread pool.
    pub fn new(pkg: Arc<Package>, opts: &EngineOptions) -> Result<CpuEngine> {
        let pool = thread_pool(opts.threads)?;
        CpuEngine::with_pool(pkg, pool, opts.max_context)
    }

    /// An engine for a one-sequence program using a shared pool (one
    /// engine per sequence of a batch).
    pub fn with_pool(pkg: Arc<Package>, pool: Arc<WorkerPool>, max_context: Option<usize>) -> Result<CpuEngine> {
        if pkg.program().is_batched() {
            bail!(
                "this package's kernel program runs ragged batches over a paged KV cache: \
                 open it with CpuEngine::batched (one engine for all sequences)"
            );
        }
        let cfg = pkg.config();
        let limit = cfg.max_position_embeddings.max(1);
        let max_context = match max_context {
            Some(0) => bail!("the maximum context must be at least 1 token"),
            Some(n) if n > limit => {
                bail!("a maximum context of {n} tokens exceeds the model's max_position_embeddings ({limit})")
            }
            Some(n) => n,
            None => DEFAULT_MAX_CONTEXT.min(limit),
        };
        let what = format!("the KV cache for a context of {max_context} tokens");
        CpuEngine::open(pkg, pool, KvCache::Contiguous { max_context }, &what)
    }

    /// An engine for a batched program using a shared pool: one paged KV
    /// cache of `num_blocks` blocks (of the program's block size) for every
    /// sequence the scheduler runs.
    pub fn batched(pkg: Arc<Package>, pool: Arc<WorkerPool>, num_blocks: usize) -> Result<CpuEngine> {
        let program = pkg.program();
        let block_size = program.kv_block_size().with_context(|| {
            "this package's kernel program runs one sequence per call (contiguous KV cache), not ragged batches"
        })?;
        ensure!(block_size > 0 && num_blocks > 0, "the paged KV cache needs at least one block of at least one token");
        let what = format!("the KV cache of {num_blocks} blocks of {block_size} tokens");
        CpuEngine::open(pkg, pool, KvCache::Paged { num_blocks, block_size }, &what)
    }

    /// Tokens per KV block of the package's batched program (`None` for a
    /// one-sequence program).
    pub fn block_size_of(pkg: &Package) -> Option<usize> {
        pkg.program().kv_block_size()
    }

    fn open(pkg: Arc<Package>, pool: Arc<WorkerPool>, cache: KvCache, what: &str) -> Result<CpuEngine> {
        let cfg = pkg.config();
        let program = pkg.program();
        // The outer dim of each cache: tokens (contiguous) or blocks (paged).
        let rows = match cache {
            KvCache::Contiguous { max_context } => max_context,
            KvCache::Paged { num_blocks, .. } => num_blocks,
        };
        // Sizes first, in checked arithmetic, and the total against the
        // machine's memory before anything is allocated.
        let mut kv_bytes = Vec::with_capacity(program.caches.len());
        for c in &program.caches {
            let b = program.buffer(*c);
            let mut row = Some(b.dtype.size_bytes());
            for d in &b.shape[1..] {
                let d = d.as_const().context("KV cache rows must have a static size")?;
                row = row.and_then(|r| r.checked_mul(d));
            }
            kv_bytes.push(row.and_then(|r| r.checked_mul(rows)));
        }
        let total = kv_bytes.iter().try_fold(0u64, |acc, b| b.and_then(|b| acc.checked_add(b as u64)));
        crate::memory::check_fits(what, total)?;
        let mut kv = Vec::with_capacity(program.caches.len());
        for bytes in kv_bytes {
            kv.push(AlignedBuf::zeroed(bytes.expect("checked above"))?);
        }
        let threads = pool.threads();
        let scratch = (0..threads).map(|_| AlignedBuf::zeroed(0)).collect::<Result<_>>()?;
        let vocab = cfg.vocab_size;
        let tile_cost = program.kernels.iter().map(|k| panguc_ir::kernel::tile_cost(&k.kind, &k.args)).collect();
        let inputs = vec![vec![]; program.inputs.len()];
        Ok(CpuEngine {
            pkg,
            pool,
            cache,
            past: 0,
            vocab,
            kv,
            arena: AlignedBuf::zeroed(0)?,
            scratch,
            scratch_ptrs: vec![],
            inputs,
            ptrs: vec![],
            tile_cost,
            profile: None,
            comm: None,
        })
    }

    /// Run this engine as global rank `rank`: the program's collective
    /// launches go through `comm`, which every other rank's engine shares
    /// (in-process) or reaches (a communication library).
    pub fn set_collective(&mut self, rank: usize, comm: Arc<dyn Collective>) {
        self.comm = Some((rank, comm));
    }

    /// Tokens already in this sequence's KV cache.
    pub fn past(&self) -> usize {
        self.past
    }

    /// Tokens one sequence can reach: the contiguous cache's capacity, or
    /// the whole paged cache.
    pub fn max_context(&self) -> usize {
        match self.cache {
            KvCache::Contiguous { max_context } => max_context,
            KvCache::Paged { num_blocks, block_size } => num_blocks * block_size,
        }
    }

    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// Write every page of the KV cache (with zeros, so its contents stay
    /// as allocated). The cache is allocated lazily by the OS: until a page
    /// is written, reading it maps the kernel's one shared zero page, so
    /// attention over a never-written context reads a single physical page
    /// through thousands of addresses, nothing like the memory traffic of
    /// a cache that prefill filled. A benchmark that sets a context without
    /// prefilling it calls this first.
    pub fn commit_kv_cache(&mut self) {
        for b in &mut self.kv {
            if b.len > 0 {
                // SAFETY: `ptr` holds `len` bytes owned by this engine.
                unsafe { std::ptr::write_bytes(b.ptr, 0, b.len) };
            }
        }
    }

    /// Start (or restart) timing every launch by kernel.
    pub fn enable_profiling(&mut self) {
        self.profile = Some(vec![Default::default(); self.pkg.program().kernels.len()]);
    }

    /// Time spent per kernel kind since profiling was enabled.
    pub fn profile(&self) -> Option<std::collections::BTreeMap<&'static str, std::time::Duration>> {
        let per = self.profile.as_ref()?;
        let mut by_kind = std::collections::BTreeMap::new();
        for (k, (_, t)) in self.pkg.program().kernels.iter().zip(per) {
            *by_kind.entry(k.kind.mnemonic()).or_default() += *t;
        }
        Some(by_kind)
    }

    /// Launches and time spent per kernel (by name, in program order)
    /// since profiling was enabled: where a step's time goes.
    pub fn kernel_profile(&self) -> Option<Vec<KernelTime>> {
        let per = self.profile.as_ref()?;
        let kernels = &self.pkg.program().kernels;
        Some(
            kernels
                .iter()
                .zip(per)
                .map(|(k, &(launches, time))| KernelTime {
                    name: k.name.clone(),
                    kind: k.kind.mnemonic(),
                    launches,
                    time,
                })
                .collect(),
        )
    }

    /// Forget the sequence (the cache is overwritten from position 0).
    pub fn reset(&mut self) {
        self.past = 0;
    }

    /// Resolve every buffer's address for this call and size the arena.
    fn bind(&mut self, b: &Bindings) -> Result<()> {
        let program = self.pkg.program();
        let mut slot_bytes = vec![0usize; program.slots];
        for buf in &program.buffers {
            if let BufferKind::Activation { slot } = buf.kind {
                let n = buf.bytes().eval(b).map_err(anyhow::Error::msg)? as usize;
                slot_bytes[slot] = slot_bytes[slot].max(n.next_multiple_of(ALIGN));
            }
        }
        let mut offsets = Vec::with_capacity(slot_bytes.len());
        let mut total = 0usize;
        for s in &slot_bytes {
            offsets.push(total);
            total += s;
        }
        self.arena.ensure(total)?;
        self.ptrs.clear();
        for buf in &program.buffers {
            let p = match &buf.kind {
                BufferKind::Input { index } => self.inputs[*index].as_mut_ptr() as *mut u8,
                BufferKind::Weight { index } => self.pkg.weight_ptr(*index),
                BufferKind::KvCache { cache } => self.kv[*cache].ptr,
                // SAFETY: within the arena sized above.
                BufferKind::Activation { slot } => unsafe { self.arena.ptr.add(offsets[*slot]) },
                BufferKind::View { base, offset } => {
                    let base_ty = program.buffer(*base).dtype;
                    let off = offset.eval(b).map_err(anyhow::Error::msg)? * base_ty.size_bytes();
                    // SAFETY: views lie inside their base buffer.
                    unsafe { self.ptrs[base.index()].add(off) }
                }
            };
            self.ptrs.push(p);
        }
        let mut need = 0usize;
        for k in &program.kernels {
            need = need.max(k.thread_scratch.eval(b).map_err(anyhow::Error::msg)? as usize);
        }
        for s in &mut self.scratch {
            s.ensure(need)?;
        }
        self.scratch_ptrs.clear();
        self.scratch_ptrs.extend(self.scratch.iter().map(|s| s.ptr));
        Ok(())
    }

    fn launch(&self, f: KernelFn, args: &[*mut u8], syms: &[i64], tiles: u64, parallel: bool) {
        let (args, syms) = (SendPtr(args.as_ptr()), SendPtr(syms.as_ptr()));
        let scratch = SendPtr(self.scratch_ptrs.as_ptr());
        let run = |w: usize, lo: i64, hi: i64| {
            // SAFETY: the arguments match the kernel's signature and
            // buffers, tile ranges handed to threads are disjoint, and
            // `scratch_ptrs` has one entry per pool thread (set in `bind`).
            unsafe { f(args.get(), syms.get(), lo, hi, *scratch.get().add(w)) }
        };
        if parallel {
            self.pool.run(tiles as i64, &run);
        } else {
            run(0, 0, tiles as i64);
        }
    }
}

impl CpuEngine {
    /// Execute a host launch (a collective, `(in, out)` f32) through the
    /// engine's [`Collective`]. The interface works on flat buffers split
    /// in member order, so a gather/scatter along an inner `axis` is
    /// rearranged here: chunks along `axis` become contiguous blocks.
    fn host_launch(&self, kind: &KernelKind, args: &[BufferId], b: &Bindings) -> Result<()> {
        let KernelKind::Collective { kind, group, axis } = kind else {
            bail!("kernel kind {} has no host implementation", kind.mnemonic());
        };
        let Some((rank, comm)) = &self.comm else {
            bail!(
                "this program is one rank of a partitioned package and needs a collective communicator; \
                 run the package through the multi-rank engine"
            );
        };
        let program = self.pkg.program();
        let shape = |id: BufferId| -> Result<Vec<usize>> {
            program.buffer(id).shape.iter().map(|d| d.eval(b)).collect::<Result<_, _>>().map_err(anyhow::Error::msg)
        };
        let (ishape, oshape) = (shape(args[0])?, shape(args[1])?);
        for id in args {
            ensure!(program.buffer(*id).dtype == DType::F32, "collective buffers must be f32");
        }
        ensure!(*axis < ishape.len().max(1), "collective axis {axis} out of range for {ishape:?}");
        let (nin, nout) = (ishape.iter().product::<usize>(), oshape.iter().product::<usize>());
        // SAFETY: both buffers are f32 with these logical sizes during this
        // call; they are distinct (their lifetimes overlap at this launch).
        let send = unsafe { std::slice::from_raw_parts(self.ptrs[args[0].index()] as *const f32, nin) };
        let recv = unsafe { std::slice::from_raw_parts_mut(self.ptrs[args[1].index()] as *mut f32, nout) };
        run_collective(comm.as_ref(), *rank, *kind, group, *axis, &ishape, send, recv)
    }
}

/// One collective of a rank over flat row-major f32 buffers, `send` of
/// shape `ishape`, with the semantics of `panguc_ir::multirank::collective`
/// along `axis`, through the buffer-level [`Collective`] interface.
#[allow(clippy::too_many_arguments)]
pub fn run_collective(
    comm: &dyn Collective,
    rank: usize,
    kind: CollectiveKind,
    group: &[usize],
    axis: usize,
    ishape: &[usize],
    send: &[f32],
    recv: &mut [f32],
) -> Result<()> {
    let (nin, nout) = (send.len(), recv.len());
    ensure!(nin == ishape.iter().product::<usize>(), "collective: send does not match its shape {ishape:?}");
    let n = group.len();
    let outer: usize = ishape.iter().take(axis).product();
    let len = ishape.get(axis).copied().unwrap_or(1);
    let inner: usize = ishape.iter().skip(axis + 1).product();
    let split = |len: usize| -> Result<usize> {
        ensure!(len.is_multiple_of(n), "collective axis {axis} of length {len} does not split {n} ways");
        Ok(len / n)
    };
    match kind {
        CollectiveKind::AllReduce => {
            ensure!(nin == nout, "all_reduce: {nin} elements in, {nout} out");
            comm.all_reduce(rank, group, send, recv)
        }
        CollectiveKind::AllGather => {
            ensure!(nout == n * nin, "all_gather: {nin} elements in, {nout} out over {n} ranks");
            let mut tmp = vec![0f32; nout];
            comm.all_gather(rank, group, send, &mut tmp)?;
            blocks_to_axis(&tmp, recv, n, outer, len * inner);
            Ok(())
        }
        CollectiveKind::ReduceScatter => {
            let c = split(len)?;
            ensure!(nout * n == nin, "reduce_scatter: {nin} elements in, {nout} out over {n} ranks");
            let mut tmp = vec![0f32; nin];
            axis_to_blocks(send, &mut tmp, n, outer, c * inner);
            comm.reduce_scatter(rank, group, &tmp, recv)
        }
        CollectiveKind::AllToAll => {
            let c = split(len)?;
            ensure!(nout == nin, "all_to_all: {nin} elements in, {nout} out");
            let mut packed = vec![0f32; nin];
            axis_to_blocks(send, &mut packed, n, outer, c * inner);
            let mut tmp = vec![0f32; nin];
            comm.all_to_all(rank, group, &packed, &mut tmp)?;
            blocks_to_axis(&tmp, recv, n, outer, c * inner);
            Ok(())
        }
    }
}

/// `src` as `[outer][n][block]` (n chunks along the axis) -> `dst` as
/// `[n][outer][block]` (one contiguous block per member).
fn axis_to_blocks(src: &[f32], dst: &mut [f32], n: usize, outer: usize, block: usize) {
    for j in 0..n {
        for o in 0..outer {
            let s = (o * n + j) * block;
            let d = (j * outer + o) * block;
            dst[d..d + block].copy_from_slice(&src[s..s + block]);
        }
    }
}

/// The inverse of [`axis_to_blocks`].
fn blocks_to_axis(src: &[f32], dst: &mut [f32], n: usize, outer: usize, block: usize) {
    for j in 0..n {
        for o in 0..outer {
            let s = (j * outer + o) * block;
            let d = (o * n + j) * block;
            dst[d..d + block].copy_from_slice(&src[s..s + block]);
        }
    }
}

/// One kernel's share of the profiled launches ([`CpuEngine::kernel_profile`]).
#[derive(Debug, Clone)]
pub struct KernelTime {
    pub name: String,
    pub kind: &'static str,
    pub launches: u64,
    pub time: std::time::Duration,
}

/// A raw pointer the worker threads may use while a launch runs.
#[derive(Clone, Copy)]
struct SendPtr<T>(*const T);

impl<T> SendPtr<T> {
    // Methods (not field access) so closures capture the Sync wrapper.
    fn get(self) -> *const T {
        self.0
    }
}

// SAFETY: only dereferenced by kernels during the launch that created it.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl CpuEngine {
    fn check_vocab(&self, tokens: &[i64]) -> Result<()> {
        ensure!(!tokens.is_empty(), "no tokens to process");
        if let Some((i, t)) = tokens.iter().enumerate().find(|(_, t)| **t < 0 || **t as u64 >= self.vocab as u64) {
            bail!("token {t} at position {i} is outside the vocabulary (0..{})", self.vocab);
        }
        Ok(())
    }

    /// Run every launch of the program under the shape symbols `b` (the
    /// inputs already set); returns the logits.
    fn run(&mut self, b: &Bindings) -> Result<Tensor> {
        let pkg = self.pkg.clone();
        let program = pkg.program();
        self.bind(b)?;
        let syms: Vec<i64> = program
            .symbols
            .iter()
            .map(|s| b.get(s).map(|v| *v as i64).with_context(|| format!("no value for shape symbol `{s}`")))
            .collect::<Result<_>>()?;
        let mut args: Vec<*mut u8> = vec![];
        for l in &program.launches {
            let k = &program.kernels[l.kernel];
            let tiles = k.tiles.eval(b).map_err(anyhow::Error::msg)?;
            if tiles == 0 {
                continue;
            }
            args.clear();
            args.extend(l.args.iter().map(|a| self.ptrs[a.index()]));
            let work = tiles.saturating_mul(self.tile_cost[l.kernel].eval(b).map_err(anyhow::Error::msg)?);
            let parallel = tiles > 1 && work >= PARALLEL_WORK;
            let t0 = self.profile.is_some().then(std::time::Instant::now);
            match pkg.kernel(l.kernel) {
                Some(f) => self.launch(f, &args, &syms, tiles, parallel),
                None => self.host_launch(&k.kind, &l.args, b).with_context(|| format!("launch of {}", k.name))?,
            }
            if let (Some(t0), Some(p)) = (t0, self.profile.as_mut()) {
                p[l.kernel].0 += 1;
                p[l.kernel].1 += t0.elapsed();
            }
        }
        let out = program.outputs[0];
        let ob = program.buffer(out);
        ensure!(ob.dtype == panguc_ir::DType::F32, "logits buffer must be f32, found {}", ob.dtype);
        let shape = ob.shape.iter().map(|d| d.eval(b)).collect::<Result<Vec<_>, _>>().map_err(anyhow::Error::msg)?;
        let len: usize = shape.iter().product();
        // SAFETY: the logits buffer holds `len` f32 values after the run.
        let logits = unsafe { std::slice::from_raw_parts(self.ptrs[out.index()] as *const f32, len) }.to_vec();
        Ok(Tensor::f32(shape, logits))
    }
}

impl Engine for CpuEngine {
    fn forward(&mut self, tokens: &[i64]) -> Result<Tensor> {
        let KvCache::Contiguous { max_context } = self.cache else {
            bail!("this engine runs ragged batch steps (BatchEngine::step), not one sequence's tokens");
        };
        self.check_vocab(tokens)?;
        let n = tokens.len();
        if self.past + n > max_context {
            bail!(
                "the sequence would reach {} tokens, beyond the engine's maximum context of {max_context}",
                self.past + n
            );
        }
        self.inputs = vec![tokens.to_vec(), (self.past..self.past + n).map(|p| p as i64).collect()];
        let logits = self.run(&panguc_ir::shape::bindings(n, self.past))?;
        self.past += n;
        Ok(logits)
    }

    fn reset(&mut self) -> bool {
        CpuEngine::reset(self);
        true
    }
}

/// A batched program runs a whole step in one call: every GEMM over all
/// of the step's rows, attention and the KV writes through the step's
/// block table and slot mapping into the one paged cache.
impl BatchEngine for CpuEngine {
    fn step(&mut self, chunks: &[StepChunk<'_>], meta: &StepMetadata) -> Result<Vec<ChunkLogits>> {
        let KvCache::Paged { num_blocks, block_size } = self.cache else {
            bail!("this engine runs one sequence per call (contiguous KV cache): run it through PerSequenceEngines");
        };
        ensure!(
            meta.block_size == block_size,
            "the step uses KV blocks of {} tokens but the package was compiled for blocks of {block_size}",
            meta.block_size
        );
        ensure!(chunks.len() == meta.seqs(), "{} chunks for a step of {} sequences", chunks.len(), meta.seqs());
        // The kernels trust the metadata (slots and blocks index the cache
        // directly), so it is checked in full here.
        meta.validate(num_blocks)?;
        let ids: Vec<i64> = chunks.iter().flat_map(|c| c.tokens.iter().copied()).collect();
        self.check_vocab(&ids)?;
        ensure!(ids.len() == meta.tokens(), "{} token ids for a step of {} tokens", ids.len(), meta.tokens());
        for (s, c) in chunks.iter().enumerate() {
            ensure!(
                meta.rows(s).len() == c.tokens.len() && meta.context_lens[s] as usize == c.past + c.tokens.len(),
                "sequence {}: its chunk does not match row {s} of the step metadata",
                c.seq
            );
        }
        let wide = |v: &[i32]| v.iter().map(|&x| x as i64).collect::<Vec<i64>>();
        self.inputs = vec![
            ids,
            wide(&meta.positions),
            wide(&meta.query_start_loc),
            wide(&meta.context_lens),
            wide(&meta.block_table),
            wide(&meta.slot_mapping),
        ];
        let logits = self.run(&meta.bindings(num_blocks))?;
        let vocab = *logits.shape.last().unwrap_or(&0);
        crate::batch::split_step_logits(logits.as_f32(), vocab, chunks, meta)
    }

    /// The cache is paged: a released sequence's blocks go back to the
    /// scheduler's allocator, nothing to free here.
    fn release(&mut self, _seq: SeqId) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::InProcess;
    use panguc_ir::multirank::{collective, run_ranks};

    #[test]
    fn flat_collectives_along_inner_axes_match_the_reference_semantics() {
        let comm = InProcess::new();
        let group = [0usize, 1, 2];
        let shape = [2usize, 6, 3];
        for axis in 0..3 {
            for kind in [
                CollectiveKind::AllReduce,
                CollectiveKind::AllGather,
                CollectiveKind::ReduceScatter,
                CollectiveKind::AllToAll,
            ] {
                if matches!(kind, CollectiveKind::ReduceScatter | CollectiveKind::AllToAll)
                    && !shape[axis].is_multiple_of(3)
                {
                    continue;
                }
                let out = run_ranks(3, &comm, |r| {
                    let x: Vec<f32> = (0..36).map(|i| (r * 1000 + i) as f32).collect();
                    let t = Tensor::f32(shape.to_vec(), x.clone());
                    let want = collective(&comm, r, kind, &group, axis, &t)?;
                    let mut got = vec![0f32; want.numel()];
                    run_collective(&comm, r, kind, &group, axis, &shape, &x, &mut got)?;
                    Ok((got, want.as_f32().to_vec()))
                })
                .unwrap();
                for (r, (got, want)) in out.iter().enumerate() {
                    assert_eq!(got, want, "{kind:?} axis {axis} rank {r}");
                }
            }
        }
    }
}
