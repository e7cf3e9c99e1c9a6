//! `ascend-sim`: the whole kernel program run through the emitted AscendC
//! kernels under the CPU simulation, as a [`panguc_runtime::Engine`].
//!
//! Every program launch runs its device kernels in order (each distinct
//! kernel is compiled once by g++ and cached by content hash; every launch
//! runs all its blocks), with the tiling evaluated from the actual token
//! count and KV length exactly as the generated host tiling functions do.
//! Buffers live in host memory in their device encoding: one allocation per
//! root buffer (views are byte ranges of their root), the KV caches sized
//! for the maximum context and kept across calls. Weights are converted to
//! the device layout by [`crate::weights::device_weight_bytes`].
//!
//! A program imported with the paged KV layout (entry inputs `ids` and the
//! step metadata of `panguc_ir::batch`) runs a whole ragged step per call as
//! a [`panguc_runtime::BatchEngine`]: one paged cache of `num_blocks`
//! blocks per layer, shared by every sequence; the scheduler's block
//! allocator decides which blocks each sequence uses.

use crate::data::{decode, encode, encode_i32, encode_i64, run_collective_kernels, run_kernels};
use crate::emit::Env;
use crate::program::{emit_program, AscendProgram};
use crate::sim::SimKernel;
use crate::target::{DevType, Target};
use crate::weights::device_weight_bytes;
use anyhow::{anyhow, bail, Context, Result};
use panguc_ir::batch::StepMetadata;
use panguc_ir::kernel::{BufferKind, KernelProgram, PreparedWeight};
use panguc_ir::Tensor;
use panguc_runtime::batch::{ChunkLogits, StepChunk};
use panguc_runtime::collective::{Collective, InProcess};
use std::path::Path;
use std::sync::Arc;

/// Supplies a prepared weight's bytes in its storage dtype and layout.
pub type WeightProvider<'a> = dyn Fn(&PreparedWeight) -> Result<Vec<u8>> + 'a;

pub struct AscendSimEngine {
    program: KernelProgram,
    ap: AscendProgram,
    /// Device bytes of every root buffer (empty for views).
    store: Vec<Vec<u8>>,
    past: u64,
    max_context: u64,
    /// Blocks of each paged cache, for a program with the paged KV layout.
    num_blocks: Option<u64>,
    /// Global rank and communicator of a rank program's collectives.
    comm: Option<(usize, Arc<dyn Collective>)>,
}

impl std::fmt::Debug for AscendSimEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AscendSimEngine").field("target", &self.ap.target).field("act", &self.ap.act).finish()
    }
}

impl AscendSimEngine {
    /// Emit `program` for `target` with activation dtype `act`, load the
    /// weights through `weights` and compile every device kernel. A
    /// contiguous-cache program gets caches for `max_context` tokens; a
    /// paged one caches of `max_context` blocks (see [`Self::cache_size`]).
    pub fn new(
        program: KernelProgram,
        target: Target,
        act: DevType,
        weights: &WeightProvider,
        max_context: usize,
    ) -> Result<Self> {
        let ap = emit_program(&program, target, act)?;
        // The program as emitted (kernels split by device dtypes).
        let program = ap.program.clone();
        let paged = program.is_batched();
        let cache_env = if paged {
            Env { num_blocks: max_context as u64, ..Env::default() }
        } else {
            // Logical shape [past + tokens, ..]: all of it at the maximum context.
            Env::new(max_context as u64, 0, 1)
        };
        let mut store = vec![vec![]; program.buffers.len()];
        for (i, b) in program.buffers.iter().enumerate() {
            match b.kind {
                BufferKind::Weight { index } => {
                    let w = &program.weights[index];
                    let prepared = weights(w).with_context(|| format!("loading weight `{}`", w.name))?;
                    store[i] = device_weight_bytes(w, &prepared, ap.buffer_dtypes[i], ap.buffer_nz[i])
                        .with_context(|| format!("converting weight `{}` to the device layout", w.name))?;
                }
                BufferKind::KvCache { .. } => store[i] = vec![0u8; Self::extent(&program, &ap, i, &cache_env)?],
                _ => {}
            }
        }
        let num_blocks = paged.then_some(max_context as u64);
        let engine =
            AscendSimEngine { program, ap, store, past: 0, max_context: max_context as u64, num_blocks, comm: None };
        engine.compile_all()?;
        Ok(engine)
    }

    /// Whether this engine runs ragged steps over a paged cache
    /// ([`panguc_runtime::BatchEngine`]) rather than one sequence per call.
    pub fn is_batched(&self) -> bool {
        self.num_blocks.is_some()
    }

    /// The `max_context` argument of the constructors for a package: the
    /// context for a contiguous-cache program, the KV blocks of each cache
    /// for a paged one.
    pub fn cache_size(dir: &Path, context: usize, num_blocks: usize) -> Result<usize> {
        let files = panguc_runtime::package::verify_package(dir)?;
        Ok(if files.program.as_ref().is_some_and(KernelProgram::is_batched) { num_blocks } else { context })
    }

    /// Open a compiled package (with a CPU target, whose prepared weights
    /// are read and converted) and run its kernel program for `target`.
    pub fn from_package(dir: &Path, target: Target, act: DevType, max_context: usize) -> Result<Self> {
        let files = panguc_runtime::package::verify_package(dir)?;
        let program = files.program.clone().ok_or_else(|| {
            anyhow!("package {} has no kernel program (compile it with --target cpu as well)", dir.display())
        })?;
        let entries = files.manifest.weights.clone().ok_or_else(|| {
            anyhow!("package {} was compiled from config.json alone: it has no weights to run", dir.display())
        })?;
        let provider = |w: &PreparedWeight| -> Result<Vec<u8>> {
            let e = entries
                .iter()
                .find(|e| e.name == w.name)
                .ok_or_else(|| anyhow!("the package has no weight `{}`", w.name))?;
            let path = dir.join(&e.file);
            let mut f = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
            use std::io::{Read, Seek};
            f.seek(std::io::SeekFrom::Start(e.offset))?;
            let mut buf = vec![0u8; usize::try_from(e.bytes)?];
            f.read_exact(&mut buf).with_context(|| format!("reading `{}` from {}", w.name, path.display()))?;
            Ok(buf)
        };
        Self::new(program, target, act, &provider, max_context)
    }

    /// Run this engine as global rank `rank` of a partitioned package: its
    /// collective launches go through `comm` (the host program's HCCL calls).
    pub fn set_collective(&mut self, rank: usize, comm: Arc<dyn Collective>) {
        self.comm = Some((rank, comm));
    }

    /// A partitioned package (compiled with `--target cpu` among its
    /// targets) as one engine: every rank's program under the simulation
    /// on its own thread, collectives through one in-process communicator.
    /// `max_context` as for [`Self::from_package`]: one sequence's context
    /// for one-sequence rank programs, each rank's KV blocks for batched
    /// ones (then the engine is a `BatchEngine` for every sequence).
    pub fn multi_rank(
        dir: &Path,
        target: Target,
        act: DevType,
        max_context: usize,
    ) -> Result<panguc_runtime::MultiRankEngine> {
        let ranks = panguc_runtime::multirank::rank_dirs(dir)?;
        let comm = InProcess::new();
        let mut engines: Vec<panguc_runtime::RankEngine> = vec![];
        for (r, rank_dir) in ranks.dirs.iter().enumerate() {
            let mut e = Self::from_package(rank_dir, target, act, max_context)
                .with_context(|| format!("rank {r} ({})", ranks.section.dirs[r]))?;
            e.set_collective(r, Arc::new(comm.clone()));
            engines.push(Box::new(e));
        }
        Ok(panguc_runtime::MultiRankEngine::from_engines(engines, comm, ranks.section))
    }

    pub fn target(&self) -> Target {
        self.ap.target
    }

    pub fn activation_dtype(&self) -> DevType {
        self.ap.act
    }

    /// Compile every device kernel once (two compilers at a time).
    fn compile_all(&self) -> Result<()> {
        let soc = self.ap.target.soc();
        let kernels: Vec<SimKernel> = self
            .ap
            .kernels
            .iter()
            .flat_map(|d| d.kernels.iter())
            .map(|dk| SimKernel::new(dk.sim_source(), dk.entry.clone(), soc, 1))
            .collect();
        let half = kernels.len().div_ceil(2).max(1);
        std::thread::scope(|s| -> Result<()> {
            let hs: Vec<_> = kernels
                .chunks(half)
                .map(|chunk| {
                    s.spawn(move || -> Result<()> {
                        for k in chunk {
                            k.compile()?;
                        }
                        Ok(())
                    })
                })
                .collect();
            for h in hs {
                h.join().map_err(|_| anyhow!("kernel compilation thread panicked"))??;
            }
            Ok(())
        })
    }

    /// Bytes of buffer `i`'s logical extent in its device dtype.
    fn extent(p: &KernelProgram, ap: &AscendProgram, i: usize, env: &Env) -> Result<usize> {
        buffer_extent(p, ap, i, env)
    }

    /// Root buffer and byte offset of buffer `id`.
    fn locate(&self, id: panguc_ir::kernel::BufferId, env: &Env) -> Result<(usize, usize)> {
        let (root, offsets) = self.program.root_of(id);
        let b = env.bindings();
        let mut off = 0usize;
        for o in offsets {
            off += o.eval(&b).map_err(|e| anyhow!("view offset of `{}`: {e}", self.program.buffer(id).name))?;
        }
        Ok((root.index(), off * self.ap.buffer_dtypes[root.index()].size() as usize))
    }
}

impl AscendSimEngine {
    /// Run every launch for the sizes in `env` with the entry inputs
    /// `inputs` (device bytes, in program input order); returns the logits.
    fn run(&mut self, env: &Env, inputs: Vec<Vec<u8>>) -> Result<Vec<f32>> {
        let p = &self.program;
        if inputs.len() != p.inputs.len() {
            bail!("the program takes {} entry inputs, the engine supplied {}", p.inputs.len(), inputs.len());
        }
        // Fresh activation and input buffers at this call's sizes.
        for (i, b) in p.buffers.iter().enumerate() {
            if matches!(b.kind, BufferKind::Input { .. } | BufferKind::Activation { .. }) {
                self.store[i] = vec![0u8; Self::extent(p, &self.ap, i, env)?];
            }
        }
        for (inp, data) in p.inputs.iter().zip(inputs) {
            let want = Self::extent(p, &self.ap, inp.index(), env)?;
            if data.len() != want {
                bail!("entry input `{}`: {} bytes for a buffer of {want}", p.buffer(*inp).name, data.len());
            }
            self.store[inp.index()] = data;
        }
        for (li, l) in p.launches.iter().enumerate() {
            let kernel = &p.kernels[l.kernel];
            let mut spans = Vec::with_capacity(l.args.len());
            let mut args = Vec::with_capacity(l.args.len());
            for a in &l.args {
                let (root, off) = self.locate(*a, env)?;
                let len = Self::extent(p, &self.ap, a.index(), env)?;
                let src = &self.store[root];
                if off + len > src.len() {
                    bail!(
                        "launch {li}: buffer `{}` ({len} bytes at {off}) lies outside its storage",
                        p.buffer(*a).name
                    );
                }
                args.push(src[off..off + len].to_vec());
                spans.push((root, off, len));
            }
            let dks = &self.ap.kernels[l.kernel];
            if dks.host.is_some() {
                let Some((rank, comm)) = &self.comm else {
                    bail!("launch {li} (`{}`) is a collective: run the partitioned package as a whole", kernel.name);
                };
                let mut call = |h: &crate::emit::HostCollective, send: &[u8], recv: &mut [u8]| {
                    host_collective(comm.as_ref(), *rank, h, send, recv)
                };
                run_collective_kernels(dks, self.ap.target, env, &mut args, &mut call)
            } else {
                run_kernels(dks, self.ap.target, env, &mut args)
            }
            .with_context(|| format!("launch {li} (`{}`)", kernel.name))?;
            let first_out = l.args.len() - kernel.kind.num_outputs();
            for (j, data) in args.into_iter().enumerate().skip(first_out) {
                let (root, off, len) = spans[j];
                self.store[root][off..off + len].copy_from_slice(&data);
            }
        }
        let out = *p.outputs.first().ok_or_else(|| anyhow!("the program has no logits output"))?;
        let (root, off) = self.locate(out, env)?;
        let len = Self::extent(p, &self.ap, out.index(), env)?;
        Ok(decode(self.ap.buffer_dtypes[out.index()], &self.store[root][off..off + len]))
    }
}

impl panguc_runtime::Engine for AscendSimEngine {
    fn forward(&mut self, tokens: &[i64]) -> Result<Tensor> {
        if self.is_batched() {
            bail!("this program runs ragged steps over a paged KV cache: drive it as a BatchEngine");
        }
        let n = tokens.len() as u64;
        if n == 0 {
            bail!("forward needs at least one token");
        }
        if self.past + n > self.max_context {
            bail!("{} tokens at position {} exceed the context of {}", n, self.past, self.max_context);
        }
        let positions: Vec<i64> = (0..n).map(|i| (self.past + i) as i64).collect();
        let mut inputs = vec![];
        for k in 0..self.program.inputs.len() {
            inputs.push(match k {
                0 => encode_i64(tokens),
                1 => encode_i64(&positions),
                _ => bail!("entry input {k} is not known to the ascend-sim engine"),
            });
        }
        let env = Env::new(n, self.past, self.ap.target.min_cores(true));
        let logits = self.run(&env, inputs)?;
        let vocab = logits.len() / n as usize;
        self.past += n;
        Ok(Tensor::f32(vec![n as usize, vocab], logits))
    }

    /// Cache rows past `past` are never read, so forgetting them is enough
    /// (the compiled kernels are kept: recompiling is the costly part).
    fn reset(&mut self) -> bool {
        self.past = 0;
        true
    }
}

/// One ragged step: the step's rows flattened into one launch sequence,
/// the metadata as the program's i32 inputs, every chunk's wanted rows out.
impl panguc_runtime::BatchEngine for AscendSimEngine {
    fn step(&mut self, chunks: &[StepChunk<'_>], meta: &StepMetadata) -> Result<Vec<ChunkLogits>> {
        let Some(num_blocks) = self.num_blocks else {
            bail!("this program caches one sequence contiguously: drive it through PerSequenceEngines");
        };
        meta.validate(num_blocks as usize)?;
        let ids: Vec<i64> = chunks.iter().flat_map(|c| c.tokens.iter().copied()).collect();
        if ids.is_empty() || ids.len() != meta.tokens() || chunks.len() != meta.seqs() {
            bail!(
                "a step of {} chunks with {} tokens does not match its metadata ({} sequences, {} tokens)",
                chunks.len(),
                ids.len(),
                meta.seqs(),
                meta.tokens()
            );
        }
        let env = Env {
            seqs: meta.seqs() as u64,
            max_blocks: meta.max_blocks as u64,
            num_blocks,
            ..Env::new(ids.len() as u64, 0, self.ap.target.min_cores(true))
        };
        // Entry inputs in `panguc_ir::batch::declare_step_inputs` order after
        // `ids`, each in its buffer's device integer type.
        let fields =
            [&meta.positions, &meta.query_start_loc, &meta.context_lens, &meta.block_table, &meta.slot_mapping];
        let mut inputs = vec![encode_i64(&ids)];
        for (inp, v) in self.program.inputs[1..].iter().zip(fields) {
            inputs.push(match self.ap.buffer_dtypes[inp.index()] {
                DevType::I32 => encode_i32(v),
                DevType::I64 => encode_i64(&v.iter().map(|&x| i64::from(x)).collect::<Vec<_>>()),
                other => bail!("step input `{}` is {other} on the device", self.program.buffer(*inp).name),
            });
        }
        let logits = self.run(&env, inputs)?;
        let vocab = logits.len() / ids.len();
        panguc_runtime::batch::split_step_logits(&logits, vocab, chunks, meta)
    }

    /// The cache is paged: the scheduler reuses a released sequence's blocks.
    fn release(&mut self, _seq: panguc_runtime::SeqId) {}
}

/// The host's call of a collective launch (what the host program asks of
/// HCCL) through a [`Collective`]: `send` and `recv` hold device bytes of
/// `h.dtype`. The packing kernels already made each member's block
/// contiguous, so the exchange runs along the flat leading axis.
pub fn host_collective(
    comm: &dyn Collective,
    rank: usize,
    h: &crate::emit::HostCollective,
    send: &[u8],
    recv: &mut [u8],
) -> Result<()> {
    let values = decode(h.dtype, send);
    let mut out = vec![0f32; recv.len() / h.dtype.size() as usize];
    panguc_runtime::engine::run_collective(comm, rank, h.kind, &h.group, 0, &[values.len()], &values, &mut out)?;
    recv.copy_from_slice(&encode(h.dtype, &out));
    Ok(())
}

/// Bytes of program buffer `i` of `p` at the sizes in `env`, in the
/// buffer's device dtype of `ap`.
pub(crate) fn buffer_extent(p: &KernelProgram, ap: &AscendProgram, i: usize, env: &Env) -> Result<usize> {
    let b = env.bindings();
    let mut n = ap.buffer_dtypes[i].size() as usize;
    for d in &p.buffers[i].shape {
        n *= d.eval(&b).map_err(|e| anyhow!("buffer `{}`: {e}", p.buffers[i].name))?;
    }
    Ok(n)
}
