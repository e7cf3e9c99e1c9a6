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

use crate::collective::{Collective, InProcess};
use crate::engine::{thread_pool, CpuEngine};
use crate::generate::Engine;
use crate::loader::{open_package_with, OpenOptions};
use crate::package::{read_manifest, RanksSection, Verify};
use anyhow::{anyhow, bail, ensure, Context, Result};
use panguc_ir::multirank::{run_ranks, Communicator};
use panguc_ir::Tensor;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// One rank's engine: anything that runs a rank program with its
/// collectives through a shared [`Collective`] (the compiled CPU engine
/// here; the AscendC simulation engine in `panguc_codegen_ascendc`).
pub type RankEngine = Box<dyn Engine + Send>;

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

impl MultiRankEngine {
    /// Open a partitioned package ([`rank_dirs`]), then load each rank's
    /// package with `threads / devices` (at least 1) kernel threads of its own.
    pub fn open(dir: &Path, threads: usize, max_context: Option<usize>) -> Result<MultiRankEngine> {
        Self::open_with(dir, threads, max_context, &OpenOptions::default())
    }

    /// [`MultiRankEngine::open`] with explicit package options (every
    /// rank's package is opened with them).
    pub fn open_with(
        dir: &Path,
        threads: usize,
        max_context: Option<usize>,
        opts: &OpenOptions,
    ) -> Result<MultiRankEngine> {
        let RankDirs { section, model, dirs } = rank_dirs_with(dir, opts.verify)?;
        let comm = InProcess::new();
        let per_rank = (threads / section.devices).max(1);
        let mut ranks = Vec::with_capacity(section.devices);
        for (r, rank_dir) in dirs.iter().enumerate() {
            let pkg =
                open_package_with(rank_dir, opts).with_context(|| format!("opening rank {r} ({})", section.dirs[r]))?;
            ensure!(pkg.config() == &model, "rank {r} was compiled for a different model config");
            let mut e = CpuEngine::with_pool(Arc::new(pkg), thread_pool(per_rank)?, max_context)?;
            e.set_collective(r, Arc::new(comm.clone()) as Arc<dyn Collective>);
            ranks.push(Box::new(e) as RankEngine);
        }
        Ok(Self::from_engines(ranks, comm, section))
    }

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
}
