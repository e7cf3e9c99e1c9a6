//! The AscendC backend on ragged batches (issue 10, item 9 on ascend-sim):
//! the tiny checkpoint imported with the paged KV layout, fused and
//! scheduled, emitted for each target and run under the CPU simulation of
//! AscendC as one `BatchEngine` over one paged cache, driven by the
//! continuous-batching scheduler: mixed prompt lengths, chunked prefill
//! (token budget 5, so prefill chunks cross the 2-token blocks), sequences
//! finishing at different steps, one joining mid-flight and a cache of 10
//! blocks too small for all of them (preemption by recompute).
//!
//! Each sequence must give the greedy tokens of running it alone (the batch
//! of one, on the same engine) and prompt logits within 1e-5 relative of
//! that run; against the reference interpreter, the f32 build (`ascend-sim`)
//! gives the same greedy tokens, the packaged f16 build (310P) its prompt
//! logits within the activation dtype's tolerance of the largest logit.

use panguc::frontend::Checkpoint;
use panguc_codegen_ascendc::engine::AscendSimEngine;
use panguc_codegen_ascendc::target::{DevType, Target};
use panguc_ir::interp::Interpreter;
use panguc_ir::kernel::PreparedWeight;
use panguc_ir::session::InterpSession;
use panguc_runtime::{generate, BatchEngine, Generation, Request, Sampling, Scheduler, SchedulerConfig};
use std::path::Path;

const BLOCK_SIZE: usize = 2;
const NUM_BLOCKS: usize = 10;

fn req(prompt: &[i64], max_new: usize) -> Request {
    Request { prompt: prompt.to_vec(), max_new_tokens: max_new, sampling: Sampling::default(), stop_tokens: vec![] }
}

/// Relative difference of two logit rows (floor 1e-3).
fn rel_diff(x: &[f32], y: &[f32]) -> f32 {
    x.iter().zip(y).map(|(a, b)| (a - b).abs() / a.abs().max(b.abs()).max(1e-3)).fold(0.0, f32::max)
}

/// The mixed batch through the scheduler; returns each request's
/// generation in request order (the late one last) and the scheduler's
/// preemption count.
fn run_mixed(engine: &mut dyn BatchEngine, first: &[Request], late: &Request) -> (Vec<Generation>, usize) {
    let sched = SchedulerConfig { block_size: BLOCK_SIZE, num_blocks: NUM_BLOCKS, max_seqs: 4, max_batch_tokens: 5 };
    let mut s = Scheduler::new(sched).unwrap();
    let mut ids: Vec<_> = first.iter().map(|r| s.add(r.clone()).unwrap()).collect();
    let (mut steps, mut joined_running_batch) = (0, false);
    while let Some(rep) = s.step(engine).unwrap_or_else(|e| panic!("{e:#}")) {
        steps += 1;
        if steps == 2 {
            ids.push(s.add(late.clone()).unwrap());
        }
        joined_running_batch |= rep.scheduled.len() > 1 && rep.scheduled.iter().any(|c| c.0 == first.len());
    }
    assert!(joined_running_batch, "the late sequence shares a step with running ones");
    let preemptions = s.stats().preemptions;
    (ids.into_iter().map(|id| s.take(id).unwrap()).collect(), preemptions)
}

/// One request alone through the same engine (the batch of one).
fn run_alone(engine: &mut dyn BatchEngine, r: &Request) -> Generation {
    let sched = SchedulerConfig { block_size: BLOCK_SIZE, num_blocks: NUM_BLOCKS, max_seqs: 1, max_batch_tokens: 5 };
    Scheduler::run_all(sched, vec![r.clone()], engine).unwrap_or_else(|e| panic!("{e:#}")).remove(0)
}

#[test]
fn ascend_sim_batches_like_sequences_alone() {
    let ckpt = Checkpoint::open(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny-pangu")).unwrap();
    let cfg = ckpt.config().clone();
    let paged =
        panguc::commands::import_with(&ckpt, panguc::import::KvLayout::Paged { block_size: BLOCK_SIZE }).unwrap();
    let fused = panguc::pipeline::run_pipeline(&ckpt, &paged, 0.0, &Default::default()).unwrap().module;
    let program = panguc_lowering::schedule::schedule(&fused, &Default::default()).unwrap();
    assert!(program.is_batched(), "the paged import schedules to a ragged-batch program");
    let provider = |w: &PreparedWeight| panguc::package_build::prepared_bytes(&ckpt, w);

    let first = [req(&[5, 17, 42, 99, 3, 8, 1], 6), req(&[250, 7, 1], 8), req(&[11], 3)];
    let late = req(&[400, 2, 9, 9], 5);
    let requests: Vec<Request> = first.iter().cloned().chain([late.clone()]).collect();
    // The reference: each prompt alone on the interpreter (contiguous cache).
    let reference = panguc::commands::import(&ckpt).unwrap();
    let want: Vec<Generation> = requests
        .iter()
        .map(|r| {
            let mut session = InterpSession::new(
                Interpreter::new(&reference, &ckpt),
                cfg.num_hidden_layers,
                [cfg.num_key_value_heads, cfg.head_dim()],
            );
            generate(&mut session, &r.prompt, r.max_new_tokens, &Sampling::default(), None).unwrap()
        })
        .collect();

    // (target, activation dtype, tolerance against the interpreter relative
    // to the largest logit: f32 as the compiled engines, f16 as emit tests).
    for (target, act, tol) in [(Target::Ascend910B, DevType::F32, 1e-4f32), (Target::Ascend310P, DevType::F16, 0.02)] {
        let mut engine = AscendSimEngine::new(program.clone(), target, act, &provider, NUM_BLOCKS).unwrap();
        assert!(engine.is_batched());
        let (got, preemptions) = run_mixed(&mut engine, &first, &late);
        assert!(preemptions > 0, "{target}: the 10-block cache forces a preemption");
        for (i, (r, g)) in requests.iter().zip(&got).enumerate() {
            let alone = run_alone(&mut engine, r);
            let what = format!("{target} {act} sequence {i}");
            assert_eq!(g.generated, alone.generated, "{what}: greedy tokens batched vs alone");
            assert_eq!(g.prompt_logits.len(), alone.prompt_logits.len(), "{what}");
            for (pos, (x, y)) in g.prompt_logits.iter().zip(&alone.prompt_logits).enumerate() {
                let err = rel_diff(x, y);
                assert!(err <= 1e-5, "{what} position {pos}: batched vs alone relative difference {err}");
            }
            let w = &want[i];
            if act == DevType::F32 {
                assert_eq!(g.generated, w.generated, "{what}: greedy tokens vs the interpreter");
            }
            let scale = w.prompt_logits.concat().iter().map(|v| v.abs()).fold(0f32, f32::max).max(1.0);
            let d = g
                .prompt_logits
                .concat()
                .iter()
                .zip(w.prompt_logits.concat())
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            eprintln!("{what}: max |logit diff| vs the interpreter {d} (max |logit| {scale})");
            assert!(d <= tol * scale, "{what}: prompt logits {d} from the interpreter's (limit {})", tol * scale);
        }
    }
}

/// The CANN project of the batched program, both targets: the ACL host
/// program (one ragged step per call, the step metadata as inputs) and
/// every op definition compile with g++ against the stand-in headers.
#[test]
fn batched_project_host_and_op_host_compile() {
    let ckpt = Checkpoint::open(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny-pangu")).unwrap();
    let paged =
        panguc::commands::import_with(&ckpt, panguc::import::KvLayout::Paged { block_size: BLOCK_SIZE }).unwrap();
    let fused = panguc::pipeline::run_pipeline(&ckpt, &paged, 0.0, &Default::default()).unwrap().module;
    let program = panguc_lowering::schedule::schedule(&fused, &Default::default()).unwrap();
    for target in Target::ALL {
        let ap = panguc_codegen_ascendc::program::emit_program(&program, target, target.default_act()).unwrap();
        let files = panguc_codegen_ascendc::project::project_files(&ap).unwrap();
        let host = &files["host/panguc_host.cpp"];
        assert!(
            host.contains("#define PANGUC_BATCHED 1") && host.contains("constexpr int kNumInputs = 6;"),
            "{target}"
        );
        assert!(host.contains(&format!("constexpr int64_t kBlockSize = {BLOCK_SIZE};")), "{target}");
        let dir = tempfile::tempdir().unwrap();
        for (rel, text) in &files {
            let path = dir.path().join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        panguc_codegen_ascendc::host::check_host_compiles(dir.path()).unwrap_or_else(|e| panic!("{target}: {e:#}"));
        panguc_codegen_ascendc::op_host_check::check_op_host_compiles(dir.path())
            .unwrap_or_else(|e| panic!("{target}: {e:#}"));
    }
}
