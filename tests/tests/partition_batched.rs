//! Partitioned packages on the batched runtime: the tiny checkpoint's
//! batched import (ragged steps, paged KV cache of 4-token blocks), fused
//! and partitioned for N ranks (plan ep) as `panguc compile --devices N`
//! does, one batched CPU package per rank, run as one `MultiRankEngine`
//! (a `BatchEngine`: every rank runs every step over its own paged cache,
//! indexed by the scheduler's one block table; the collectives carry the
//! step's rows).
//!
//! For N = 2 and 8, the mixed batch of `common::mixed` (different prompt
//! lengths, chunked prefill, different finishing steps, a sequence joining
//! mid-flight, preemption): each sequence's greedy tokens are those it gets
//! alone and its logits within 1e-5 relative. Each sequence also gets the
//! single-device batched package's tokens, with logits within 1e-4 of the
//! largest logit (partitioning changes the order of the expert sums, as in
//! `partition_cpu.rs`).

mod common;

use common::mixed::check_mixed_batch;
use common::*;
use panguc_ir::Module;
use panguc_lowering::fuse::FuseOptions;
use panguc_lowering::partition::{Dims, Layout, PlanChoice};
use panguc_runtime::{CpuEngine, Generation, RankPackages};
use std::sync::{Arc, OnceLock};

const BLOCK: usize = 4;
/// Partitioned vs single device: max|diff| / max|logit| per row.
const TOL: f32 = 1e-4;

fn baseline() -> panguc_runtime::OpenOptions {
    panguc_runtime::OpenOptions { tier: Some(BASELINE.into()), ..Default::default() }
}

struct Single {
    ckpt: panguc::frontend::Checkpoint,
    fused: Module,
    /// The mixed batch on the single-device batched package.
    generations: Vec<Generation>,
}

fn single() -> &'static Single {
    static S: OnceLock<Single> = OnceLock::new();
    S.get_or_init(|| {
        let ckpt = checkpoint();
        let imported = panguc::commands::import_with(&ckpt, panguc::import::KvLayout::Paged { block_size: BLOCK })
            .expect("batched import");
        let fused = panguc::pipeline::fuse_batched(&ckpt, &imported, &Default::default()).expect("fusion");
        let dir = tempfile::tempdir().unwrap();
        compile(&ckpt, &fused, dir.path());
        let pkg = Arc::new(open_tier(dir.path(), BASELINE));
        let pool = panguc_runtime::thread_pool(2).unwrap();
        let generations = check_mixed_batch("single device", BLOCK, &mut |n| {
            Box::new(CpuEngine::batched(pkg.clone(), pool.clone(), n).unwrap())
        });
        Single { ckpt, fused, generations }
    })
}

fn rel_diff(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = got.iter().zip(want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}

fn check(n: usize) {
    let s = single();
    let cfg = s.ckpt.config().clone();
    let layout = Layout::new(Dims::from_config(&cfg), n, PlanChoice::Ep).unwrap();
    let parts = panguc::partition_build::partition_batched(&s.fused, "decoder_layer", &layout, &FuseOptions::default())
        .unwrap()
        .expect("plan ep keeps attention whole, so the batched module partitions");
    let programs = panguc::package_build::schedule_ranks(&parts).unwrap();
    for (r, p) in programs.iter().enumerate() {
        assert_eq!(p.kv_block_size(), Some(BLOCK), "N={n} rank {r}: a batched program");
        assert!(p.kernels.iter().any(|k| k.kind.is_host()), "N={n} rank {r}: no collective launch");
    }
    let dir = tempfile::tempdir().unwrap();
    let targets = ["cpu".to_string()];
    panguc::package_build::write_cpu_rank_packages(dir.path(), &s.ckpt, &parts, &programs, "ep", &targets).unwrap();
    panguc::package_build::finalize_manifest(dir.path(), &cfg, &targets).unwrap();

    let ranks = RankPackages::open(dir.path(), 2, &baseline()).unwrap();
    assert_eq!(ranks.devices(), n);
    assert_eq!(ranks.block_size().unwrap(), Some(BLOCK));
    let e = ranks.engine(Some(16)).err().expect("batched rank programs refuse one-sequence engines");
    assert!(format!("{e:#}").contains("ragged batches"), "{e:#}");

    let what = format!("ep N={n}");
    let started = std::time::Instant::now();
    let got = check_mixed_batch(&what, BLOCK, &mut |b| Box::new(ranks.batched(b).unwrap()));
    let mut worst = 0f32;
    for (i, (g, w)) in got.iter().zip(&s.generations).enumerate() {
        assert_eq!(g.generated, w.generated, "{what} sequence {i}: the single-device tokens");
        for (row, (x, y)) in g.prompt_logits.iter().zip(&w.prompt_logits).enumerate() {
            let d = rel_diff(x, y);
            assert!(d < TOL, "{what} sequence {i} prompt row {row}: max|diff|/max|logit| = {d}");
            worst = worst.max(d);
        }
    }
    eprintln!("{what}: mixed batch in {:.2?}, worst vs single device {worst:e}", started.elapsed());
}

#[test]
fn two_rank_batched_package_runs_the_mixed_batch() {
    check(2);
}

#[test]
fn eight_rank_batched_package_runs_the_mixed_batch() {
    check(8);
}
