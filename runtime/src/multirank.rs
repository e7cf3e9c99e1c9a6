//! The multi-rank CPU engine: a package partitioned over N devices run as
//! N workers of one process.
//!
//! Each rank is a complete CPU package in `ranks/rankN/` (see
//! `package::RanksSection`) with its own kernel program, kernel library,
//! prepared weights (the rank's slices) and KV cache. A forward runs every
//! rank's [`CpuEngine`] on its own thread; their collective launches meet
//! in one shared [`InProcess`] communicator behind the [`Collective`]
//! interface (a communication library such as HCCL would implement the
//! same interface with one engine per device process). Every rank computes
//! the full logits; rank 0's are returned.
//!
//! A package's rank programs are batched programs, whatever the plan: one
//! [`MultiRankEngine`] runs every step of the scheduler as a
//! [`BatchEngine`], each rank with its own paged cache of the same number
//! of blocks (of its own KV heads when attention is split by heads), all
//! indexed by the step's one block table and slot mapping (the
//! scheduler's), and the collectives carry the step's T rows. Engines of
//! one-sequence rank programs built in memory (tests of a backend's
//! one-sequence kernels) run as one sequence's [`Engine`].

use crate::batch::{BatchEngine, ChunkLogits, SeqId, StepChunk};
use crate::collective::{Collective, InProcess};
use crate::engine::{thread_pool, CpuEngine};
use crate::generate::Engine;
use crate::loader::{open_package_with, OpenOptions, Package};
use crate::package::{read_manifest, RanksSection, Verify};
use anyhow::{anyhow, bail, ensure, Context, Result};
use panguc_ir::batch::StepMetadata;
use panguc_ir::multirank::{run_ranks, Communicator};
use panguc_ir::Tensor;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// What one rank runs: a one-sequence rank program as an [`Engine`], a
/// batched one as a [`BatchEngine`] (each engine supports the call its
/// program was compiled for and refuses the other), its collectives
/// through a shared [`Collective`]. The compiled CPU engine here; the
/// AscendC simulation engine in `panguc_codegen_ascendc`.
pub trait RankRunner: Engine + BatchEngine + Send {}

impl<T: Engine + BatchEngine + Send> RankRunner for T {}

/// One rank's engine.
pub type RankEngine = Box<dyn RankRunner>;

pub struct MultiRankEngine {
    ranks: Vec<Mutex<RankEngine>>,
    comm: InProcess,
    section: RanksSection,
}

/// The rank section of a package's manifest, if it is partitioned.
pub fn package_ranks(dir: &Path) -> Result<Option<RanksSection>> {
    Ok(read_manifest(dir)?.ranks)
}

/// A verified partitioned package: its rank section and each rank's
/// package directory.
pub struct RankDirs {
    pub section: RanksSection,
    pub model: panguc_ir::PanguConfig,
    pub dirs: Vec<std::path::PathBuf>,
}

/// Open a partitioned package: verify the top-level manifest (which covers
/// every rank's files) and resolve the rank directories it lists.
pub fn rank_dirs(dir: &Path) -> Result<RankDirs> {
    rank_dirs_with(dir, Verify::Stamp)
}

/// [`rank_dirs`] with an explicit verification mode.
pub fn rank_dirs_with(dir: &Path, mode: Verify) -> Result<RankDirs> {
    let manifest = read_manifest(dir)?;
    let Some(section) = manifest.ranks.clone() else {
        bail!("package {} is not partitioned (no `ranks` section in its manifest)", dir.display());
    };
    ensure!(
        section.devices >= 1 && section.dirs.len() == section.devices,
        "package {}: {} rank directories for {} devices",
        dir.display(),
        section.dirs.len(),
        section.devices
    );
    crate::stamp::verify_files_with(dir, &manifest, mode)?;
    // Both multi-rank engines run each rank's CPU package (the AscendC
    // simulation takes its kernel program and prepared weights from there).
    ensure!(
        manifest.targets.iter().any(|t| t == "cpu"),
        "package {} has no CPU target (targets: {}): its ranks have no programs to run here; compile it with \
         --target cpu as well",
        dir.display(),
        manifest.targets.join(", ")
    );
    let mut dirs = Vec::with_capacity(section.devices);
    for rel in &section.dirs {
        if rel.split('/').any(|c| c == ".." || c.is_empty()) {
            bail!("package manifest lists an invalid rank directory `{rel}`");
        }
        dirs.push(dir.join(rel));
    }
    Ok(RankDirs { section, model: manifest.model, dirs })
}

/// A partitioned package's rank packages, opened (verified) once; the
/// batched engine is made from them ([`RankPackages::batched`]).
pub struct RankPackages {
    section: RanksSection,
    pkgs: Vec<Arc<Package>>,
    /// Kernel threads of each rank's pool.
    threads_per_rank: usize,
}

impl RankPackages {
    /// Open a partitioned package ([`rank_dirs_with`]) and every rank's
    /// package with `opts`; each rank's engines get `threads / devices`
    /// (at least 1) kernel threads of their own.
    pub fn open(dir: &Path, threads: usize, opts: &OpenOptions) -> Result<RankPackages> {
        let RankDirs { section, model, dirs } = rank_dirs_with(dir, opts.verify)?;
        let mut pkgs = Vec::with_capacity(section.devices);
        for (r, rank_dir) in dirs.iter().enumerate() {
            let pkg =
                open_package_with(rank_dir, opts).with_context(|| format!("opening rank {r} ({})", section.dirs[r]))?;
            ensure!(pkg.config() == &model, "rank {r} was compiled for a different model config");
            pkgs.push(Arc::new(pkg));
        }
        let threads_per_rank = (threads / section.devices).max(1);
        Ok(RankPackages { section, pkgs, threads_per_rank })
    }

    pub fn devices(&self) -> usize {
        self.pkgs.len()
    }

    pub fn section(&self) -> &RanksSection {
        &self.section
    }

    /// The model every rank was compiled for.
    pub fn config(&self) -> &panguc_ir::PanguConfig {
        self.pkgs[0].config()
    }

    /// Tokens per KV block of the ranks' batched programs. Ranks that
    /// disagree (a package mixing them cannot share the scheduler's block
    /// table) or one-sequence rank programs (an older panguc's partitioned
    /// packages) are an error.
    pub fn block_size(&self) -> Result<usize> {
        let sizes: Vec<Option<usize>> = self.pkgs.iter().map(|p| CpuEngine::block_size_of(p)).collect();
        for (r, size) in sizes.iter().enumerate() {
            let Some(size) = size else {
                bail!(
                    "rank {r} ({}) runs one sequence per call (contiguous KV cache); partitioned packages run \
                     ragged batches over paged caches: recompile it",
                    self.section.dirs[r]
                );
            };
            ensure!(
                Some(*size) == sizes[0],
                "the rank programs of this package disagree on their KV blocks ({sizes:?} tokens): recompile it"
            );
        }
        sizes[0].context("a partitioned package with no ranks")
    }

    /// The engine for every sequence of the scheduler over the batched
    /// rank programs: each rank with a paged cache of `num_blocks` blocks.
    pub fn batched(&self, num_blocks: usize) -> Result<MultiRankEngine> {
        let comm = InProcess::new();
        let mut ranks = Vec::with_capacity(self.pkgs.len());
        for (r, pkg) in self.pkgs.iter().enumerate() {
            let mut e = CpuEngine::batched(pkg.clone(), thread_pool(self.threads_per_rank)?, num_blocks)
                .with_context(|| format!("rank {r} ({})", self.section.dirs[r]))?;
            e.set_collective(r, Arc::new(comm.clone()) as Arc<dyn Collective>);
            ranks.push(Box::new(e) as RankEngine);
        }
        Ok(MultiRankEngine::from_engines(ranks, comm, self.section.clone()))
    }
}

impl MultiRankEngine {
    /// Run `ranks` (engine `r` already wired to `comm` as global rank `r`)
    /// as one engine.
    pub fn from_engines(ranks: Vec<RankEngine>, comm: InProcess, section: RanksSection) -> MultiRankEngine {
        MultiRankEngine { ranks: ranks.into_iter().map(Mutex::new).collect(), comm, section }
    }

    pub fn devices(&self) -> usize {
        self.ranks.len()
    }

    pub fn plan(&self) -> &str {
        &self.section.plan
    }
}

impl Engine for MultiRankEngine {
    fn forward(&mut self, tokens: &[i64]) -> Result<Tensor> {
        let ranks = &self.ranks;
        let comm: &dyn Communicator = &self.comm;
        let mut outs = run_ranks(ranks.len(), comm, |r| {
            let mut e = ranks[r].lock().map_err(|_| anyhow!("rank {r} engine poisoned"))?;
            e.forward(tokens)
        })?;
        Ok(outs.swap_remove(0))
    }

    fn reset(&mut self) -> bool {
        // Every rank must reset, or none of this engine is reusable.
        let reset: Vec<bool> = self.ranks.iter_mut().map(|r| r.get_mut().is_ok_and(|e| e.reset())).collect();
        reset.iter().all(|ok| *ok)
    }
}

/// Batched rank programs: every rank runs the whole step (the same chunks
/// and metadata: the scheduler's block table indexes each rank's own
/// paged cache), its collectives over the step's rows.
impl BatchEngine for MultiRankEngine {
    fn step(&mut self, chunks: &[StepChunk<'_>], meta: &StepMetadata) -> Result<Vec<ChunkLogits>> {
        let ranks = &self.ranks;
        let comm: &dyn Communicator = &self.comm;
        let mut outs = run_ranks(ranks.len(), comm, |r| {
            let mut e = ranks[r].lock().map_err(|_| anyhow!("rank {r} engine poisoned"))?;
            e.step(chunks, meta)
        })?;
        Ok(outs.swap_remove(0))
    }

    fn release(&mut self, seq: SeqId) {
        for r in &mut self.ranks {
            if let Ok(e) = r.get_mut() {
                e.release(seq);
            }
        }
    }
}
