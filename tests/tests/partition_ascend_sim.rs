//! The AscendC backend on partitioned programs: every rank's kernel
//! program (its partitioned module scheduled with collective launches)
//! emitted for 910B and run under the CPU simulation of AscendC, the ranks
//! as threads whose collectives (the host program's HCCL calls, with the
//! emitted packing kernels around them) meet in the in-process
//! communicator. Compared with the reference interpreter on one device at
//! prefill and every decode step (teacher-forced with its greedy tokens),
//! and generating the same tokens.
//!
//! f32 activations (the `ascend-sim` engine), so the tolerance is the
//! compiled engines' 1e-4 of the largest logit. ep N=2 covers the local
//! expert ids (slice + index arithmetic) and the all-reduce; h2p N=4 the
//! reduce-scatter / all-gather along the hidden axis with their packing
//! kernels and the bias added after the all-gather.

use panguc::frontend::Checkpoint;
use panguc_codegen_ascendc::engine::AscendSimEngine;
use panguc_codegen_ascendc::target::{DevType, Target};
use panguc_ir::interp::Interpreter;
use panguc_ir::kernel::PreparedWeight;
use panguc_ir::session::InterpSession;
use panguc_ir::{Module, Tensor};
use panguc_lowering::fuse::FuseOptions;
use panguc_lowering::partition::{partition_module, Dims, Layout, Partitioned, PlanChoice};
use panguc_runtime::collective::InProcess;
use panguc_runtime::package::RanksSection;
use panguc_runtime::{generate, Engine, MultiRankEngine, RankEngine, Sampling};
use std::path::Path;
use std::sync::{Arc, OnceLock};

const TOL: f32 = 1e-4;
const PROMPT: [i64; 4] = [1, 2, 3, 4];
const CONTEXT: usize = 16;

struct Single {
    ckpt: Checkpoint,
    fused: Module,
    tokens: Vec<i64>,
    /// Interpreter logits at prefill and after each greedy token but the last.
    logits: Vec<Tensor>,
}

fn single() -> &'static Single {
    static S: OnceLock<Single> = OnceLock::new();
    S.get_or_init(|| {
        let ckpt = Checkpoint::open(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny-pangu")).unwrap();
        let cfg = ckpt.config().clone();
        let imported = panguc::commands::import(&ckpt).unwrap();
        let fused = panguc::pipeline::run_pipeline(&ckpt, &imported, 0.0, &Default::default()).unwrap().module;
        let session = || {
            InterpSession::new(
                Interpreter::new(&fused, &ckpt),
                cfg.num_hidden_layers,
                [cfg.num_key_value_heads, cfg.head_dim()],
            )
        };
        let tokens = generate(&mut session(), &PROMPT, 6, &Sampling::default(), None).unwrap().generated;
        let logits = teacher_forced(&mut session(), &tokens);
        Single { ckpt, fused, tokens, logits }
    })
}

fn teacher_forced(e: &mut dyn Engine, tokens: &[i64]) -> Vec<Tensor> {
    let mut out = vec![e.forward(&PROMPT).unwrap()];
    for t in &tokens[..tokens.len() - 1] {
        out.push(e.forward(&[*t]).unwrap());
    }
    out
}

/// The one-sequence module partitioned for `plan` on `n` devices.
fn partitioned(plan: PlanChoice, n: usize) -> Partitioned {
    let s = single();
    let layout = Layout::new(Dims::from_config(s.ckpt.config()), n, plan).unwrap();
    partition_module(&s.fused, "decoder_layer", &layout, &FuseOptions::default()).unwrap()
}

/// N rank engines under the simulation, wired to one communicator (what
/// `AscendSimEngine::multi_rank` does for a package on disk).
fn rank_engines(plan: PlanChoice, n: usize, act: DevType) -> MultiRankEngine {
    let s = single();
    let parts = partitioned(plan, n);
    let provider = |w: &PreparedWeight| panguc::package_build::prepared_bytes(&s.ckpt, w);
    let comm = InProcess::new();
    let mut engines: Vec<RankEngine> = vec![];
    for (r, program) in panguc::package_build::schedule_ranks(&parts).unwrap().into_iter().enumerate() {
        assert!(program.kernels.iter().any(|k| k.kind.is_host()), "{plan:?} N={n} rank {r}: no collective");
        let mut e = AscendSimEngine::new(program, Target::Ascend910B, act, &provider, CONTEXT).unwrap();
        e.set_collective(r, Arc::new(comm.clone()));
        engines.push(Box::new(e));
    }
    let section = RanksSection { devices: n, plan: format!("{plan:?}"), dirs: vec![], layout: None };
    MultiRankEngine::from_engines(engines, comm, section)
}

fn check(plan: PlanChoice, n: usize) {
    let s = single();
    let got = teacher_forced(&mut rank_engines(plan, n, DevType::F32), &s.tokens);
    for (step, (g, w)) in got.iter().zip(&s.logits).enumerate() {
        assert_eq!(g.shape, w.shape);
        let scale = w.as_f32().iter().fold(0f32, |m, x| m.max(x.abs()));
        let diff = g.as_f32().iter().zip(w.as_f32()).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff / scale < TOL, "{plan:?} N={n} step {step}: max|diff|/max|logit| = {}", diff / scale);
    }
    let g = generate(&mut rank_engines(plan, n, DevType::F32), &PROMPT, s.tokens.len(), &Sampling::default(), None)
        .unwrap();
    assert_eq!(g.generated, s.tokens, "{plan:?} N={n}");
}

#[test]
fn ep_on_two_simulated_ascend_devices_matches_the_interpreter() {
    check(PlanChoice::Ep, 2);
}

#[test]
fn h2p_on_four_simulated_ascend_devices_matches_the_interpreter() {
    check(PlanChoice::H2p, 4);
}

/// On 2 devices one GEMM kernel serves both the router (f32 logits) and a
/// projection in the activation dtype: with bf16 activations the backend
/// emits one kernel per device-dtype signature. The bf16 build's prefill
/// logits stay within the single-device bf16 tolerance (0.08 of the
/// largest logit, as in `ascend_build`'s test), and the f32 build matches.
#[test]
fn h2p_on_two_simulated_ascend_devices_splits_kernels_by_device_dtype() {
    let s = single();
    let program = panguc::package_build::schedule_ranks(&partitioned(PlanChoice::H2p, 2)).unwrap().remove(0);
    let ap = panguc_codegen_ascendc::program::emit_program(&program, Target::Ascend910B, DevType::BF16).unwrap();
    assert!(ap.program.kernels.len() > program.kernels.len(), "no kernel was split");
    assert!(ap.program.kernels.iter().any(|k| k.name.ends_with("_v1")));
    let logits = rank_engines(PlanChoice::H2p, 2, DevType::BF16).forward(&PROMPT).unwrap();
    let want = &s.logits[0];
    let scale = want.as_f32().iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = logits.as_f32().iter().zip(want.as_f32()).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(diff <= 0.08 * scale, "bf16: max|diff| {diff} vs max|logit| {scale}");
    check(PlanChoice::H2p, 2);
}
