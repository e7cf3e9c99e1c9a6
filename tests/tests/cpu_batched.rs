//! The compiled batched CPU engine: the tiny checkpoint's batched import
//! (ragged steps over a paged KV cache), fused by the compile pipeline,
//! compiled into a package and run by one `CpuEngine` for all sequences.
//! Checked against each sequence run alone on the same engine kind (1e-5
//! relative, same greedy tokens) for a mixed batch, and against the paged
//! reference interpreter.

mod common;

use common::mixed::{assert_rows_close, check_mixed_batch};
use common::*;
use panguc_runtime::{BatchEngine, CpuEngine};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

/// Small blocks, so prompts and chunks cross block boundaries.
const BLOCK: usize = 4;
/// Compiled vs interpreter, as in `cpu_backend.rs` (the baseline tier
/// follows the reference's order, so this holds with room to spare).
const TOL: f32 = 1e-4;

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
    let compiled = check_mixed_batch("compiled batched", BLOCK, &mut |n| Box::new(engine(n)));
    let interp = check_mixed_batch("paged interpreter", BLOCK, &mut |n| {
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
