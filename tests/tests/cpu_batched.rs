//! The compiled batched CPU engine: the tiny checkpoint's batched import
//! (ragged steps over a paged KV cache), fused by the compile pipeline,
//! compiled into a package and run by one `CpuEngine` for all sequences.
//! Checked against each sequence run alone on the same engine kind (1e-5
//! relative, same greedy tokens) for a mixed batch, and against the paged
//! reference interpreter.

mod common;

use common::*;
use panguc_runtime::{BatchEngine, CpuEngine, FinishReason, Generation, Request, Sampling, Scheduler, SchedulerConfig};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

/// Small blocks, so prompts and chunks cross block boundaries.
const BLOCK: usize = 4;
/// Batch vs alone: the batch must not change a sequence's numerics.
const BATCH_TOL: f32 = 1e-5;
/// Compiled vs interpreter, as in `cpu_backend.rs` (the baseline tier
/// follows the reference's order, so this holds with room to spare).
const TOL: f32 = 1e-4;
const FLOOR: f32 = 1e-3;

fn batched_module(ckpt: &panguc::frontend::Checkpoint) -> panguc_ir::Module {
    panguc::commands::import_with(ckpt, panguc::import::KvLayout::Paged { block_size: BLOCK }).expect("batched import")
}

struct Batched {
    _dir: tempfile::TempDir,
    path: PathBuf,
    pkg: Arc<panguc_runtime::Package>,
}

/// The fused batched module compiled once per test binary (baseline tier).
fn package() -> &'static Batched {
    static P: OnceLock<Batched> = OnceLock::new();
    P.get_or_init(|| {
        let ckpt = checkpoint();
        let imported = batched_module(&ckpt);
        let fused = panguc::pipeline::fuse_batched(&ckpt, &imported, &Default::default()).expect("fusion");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("batched");
        compile(&ckpt, &fused, &path);
        let pkg = Arc::new(open_tier(&path, BASELINE));
        Batched { _dir: dir, path, pkg }
    })
}

fn engine(num_blocks: usize) -> CpuEngine {
    CpuEngine::batched(package().pkg.clone(), panguc_runtime::thread_pool(2).unwrap(), num_blocks).unwrap()
}

fn greedy(prompt: Vec<i64>, max_new: usize) -> Request {
    Request { prompt, max_new_tokens: max_new, sampling: Sampling::default(), stop_tokens: vec![] }
}

/// `r` alone: the scheduler with one sequence (the batch of one).
fn alone<'a>(make: &mut dyn FnMut(usize) -> Box<dyn BatchEngine + 'a>, r: &Request) -> Generation {
    let cfg = SchedulerConfig::fitting_with(std::slice::from_ref(r), BLOCK);
    let mut e = make(cfg.num_blocks);
    Scheduler::run_all(cfg, vec![r.clone()], e.as_mut()).unwrap().remove(0)
}

fn assert_rows_close(got: &[Vec<f32>], want: &[Vec<f32>], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: rows");
    for (row, (x, y)) in got.iter().zip(want).enumerate() {
        let (x, y) =
            (panguc_ir::Tensor::f32(vec![x.len()], x.clone()), panguc_ir::Tensor::f32(vec![y.len()], y.clone()));
        assert_close(&x, &y, tol, FLOOR, &format!("{what} row {row}"));
    }
}

fn prompt(len: usize, seed: i64) -> Vec<i64> {
    (0..len as i64).map(|i| (i * 37 + seed) % 512).collect()
}

/// A mixed batch through the scheduler on one engine: different prompt
/// lengths, a prompt prefilled in chunks, a stop token, different finishing
/// steps, a sequence joining mid-flight and, with 8 blocks of 4 tokens for
/// ~60 tokens of context, preemption by recompute. Returns each sequence's
/// generation (in request order) and checks them against each run alone.
fn check_mixed_batch<'a>(what: &str, make: &mut dyn FnMut(usize) -> Box<dyn BatchEngine + 'a>) -> Vec<Generation> {
    let mut stopping = greedy(vec![5, 5, 5, 5], 8);
    stopping.stop_tokens = vec![alone(make, &stopping).generated[2]];
    let first = vec![greedy(prompt(13, 5), 6), greedy(vec![1, 2, 3], 9), greedy(vec![400, 17], 3), stopping];
    let late = greedy(vec![9, 8, 7, 6, 5, 4, 3], 5);
    let cfg = SchedulerConfig { block_size: BLOCK, num_blocks: 8, max_seqs: 4, max_batch_tokens: 8 };
    let mut s = Scheduler::new(cfg.clone()).unwrap();
    let mut ids: Vec<_> = first.iter().map(|r| s.add(r.clone()).unwrap()).collect();
    let mut batch = make(cfg.num_blocks);
    let (mut steps, mut shared_with_late, mut widest) = (0, false, 0);
    while let Some(rep) = s.step(batch.as_mut()).unwrap() {
        steps += 1;
        if steps == 2 {
            ids.push(s.add(late.clone()).unwrap());
        }
        shared_with_late |= rep.scheduled.len() > 1 && rep.scheduled.iter().any(|c| c.0 == 4);
        widest = widest.max(rep.scheduled.len());
        assert!(rep.metadata.tokens() <= 8, "{what}: token budget");
    }
    assert!(shared_with_late, "{what}: the late sequence joined a running batch");
    assert!(widest >= 3, "{what}: steps ran several sequences at once (at most {widest})");
    assert!(s.stats().preemptions > 0, "{what}: {:?}", s.stats());
    assert_eq!(s.finish_reason(ids[3]), Some(FinishReason::Stop), "{what}");
    drop(batch);
    let requests: Vec<Request> = first.into_iter().chain([late]).collect();
    let mut out = vec![];
    for (i, (r, id)) in requests.iter().zip(ids).enumerate() {
        let got = s.take(id).unwrap();
        let want = alone(make, r);
        assert_eq!(got.generated, want.generated, "{what} sequence {i}: tokens");
        assert_eq!(got.prompt_logits.len(), r.prompt.len());
        assert_rows_close(&got.prompt_logits, &want.prompt_logits, BATCH_TOL, &format!("{what} sequence {i} prompt"));
        out.push(got);
    }
    out
}

/// The package is batched: its program runs ragged steps over paged caches
/// of the import's block size, and the one-sequence constructor refuses it.
#[test]
fn the_batched_package_runs_ragged_steps_only() {
    let p = package();
    assert!(p.pkg.program().is_batched());
    assert_eq!(CpuEngine::block_size_of(&p.pkg), Some(BLOCK));
    let kinds: Vec<&str> = p.pkg.program().kernels.iter().map(|k| k.kind.mnemonic()).collect();
    for k in ["qkv_rope_cache_write", "paged_attention", "gemm"] {
        assert!(kinds.contains(&k), "{k} in {kinds:?}");
    }
    let e = CpuEngine::with_pool(p.pkg.clone(), panguc_runtime::thread_pool(1).unwrap(), Some(16)).err().unwrap();
    assert!(e.to_string().contains("ragged batches"), "{e}");
    // A step whose metadata points outside the cache is refused before any
    // kernel reads it.
    let mut e = engine(2);
    let meta = panguc_ir::batch::StepMetadata::build(
        BLOCK,
        &[panguc_ir::batch::SeqChunk { past: 0, new_tokens: 2, blocks: &[5] }],
    )
    .unwrap();
    let chunk = panguc_runtime::StepChunk { seq: 0, tokens: &[1, 2], past: 0, logits_from: 0 };
    let err = e.step(&[chunk], &meta).unwrap_err().to_string();
    assert!(err.contains("outside the cache"), "{err}");
    assert!(p.path.join("kernel_program.json").exists());
}

/// The mixed batch on the compiled engine (each sequence against itself
/// alone) and on the paged reference interpreter (the unfused batched
/// import, likewise): same tokens, logits within the backend's tolerance.
#[test]
fn compiled_mixed_batch_matches_each_sequence_alone_and_the_paged_interpreter() {
    let ckpt = checkpoint();
    let m = batched_module(&ckpt);
    let cfg = ckpt.config().clone();
    let kv = [cfg.num_key_value_heads, cfg.head_dim()];
    let compiled = check_mixed_batch("compiled batched", &mut |n| Box::new(engine(n)));
    let interp = check_mixed_batch("paged interpreter", &mut |n| {
        let interp = panguc_ir::interp::Interpreter::new(&m, &ckpt);
        Box::new(panguc_ir::session::BatchInterpSession::new(interp, cfg.num_hidden_layers, n, BLOCK, kv))
    });
    for (i, (c, r)) in compiled.iter().zip(&interp).enumerate() {
        assert_eq!(c.generated, r.generated, "sequence {i}: compiled vs interpreter tokens");
        assert_rows_close(&c.prompt_logits, &r.prompt_logits, TOL, &format!("sequence {i}: compiled vs interpreter"));
    }
}

/// The batched kernel program of the tiny model: per layer RMSNorm, the QKV
/// GEMM over all rows then RoPE + paged KV write, paged attention, the O
/// GEMM, AddRmsNorm, the router GEMM + gating and the MoE kernels; paged
/// caches `[num_blocks, 4, 2, 16]` written in place.
#[test]
fn batched_kernel_program_snapshot() {
    insta::assert_snapshot!("tiny_batched_kernel_program", package().pkg.program().to_text());
}
