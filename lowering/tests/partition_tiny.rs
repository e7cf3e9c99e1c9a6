//! Partitioning the tiny model for N = 2, 4, 8 devices under the `ep` and
//! (tiny-scaled) `h2p` plans: every rank's program reads only its shards,
//! and the N ranks together, run by the multi-rank reference interpreter,
//! give the single-device logits.

use panguc_ir::interp::Interpreter;
use panguc_ir::multirank::MultiRankSession;
use panguc_ir::session::InterpSession;
use panguc_ir::text::parse_module;
use panguc_ir::{Module, Op, PanguConfig, Tensor};
use panguc_lowering::fuse::{fuse_module, FuseOptions};
use panguc_lowering::partition::{partition_module, Dims, Layout, PlanChoice, PlanKind};
use panguc_lowering::validate::random_weights;

fn fixture(name: &str) -> Module {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    parse_module(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn config(dir: &str) -> PanguConfig {
    let path = format!("{}/../examples/{dir}/config.json", env!("CARGO_MANIFEST_DIR"));
    PanguConfig::from_json_str(&std::fs::read_to_string(&path).unwrap(), &path).unwrap()
}

fn tiny() -> (Module, Module, Dims) {
    let m = fixture("tiny-imported.ir");
    let (fused, _) = fuse_module(&m, &FuseOptions::default(), |_, _| Ok(())).unwrap();
    (m, fused, Dims::from_config(&config("tiny-pangu")))
}

/// Largest absolute difference relative to the largest logit magnitude
/// (elementwise relative error is meaningless for logits near zero).
fn rel_error(got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.shape, want.shape);
    let scale = want.as_f32().iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = got.as_f32().iter().zip(want.as_f32()).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}

const PROMPT: [i64; 5] = [1, 7, 42, 300, 5];
const DECODE: [i64; 3] = [11, 99, 256];

#[test]
fn partitioned_tiny_model_matches_single_device() {
    let (imported, fused, dims) = tiny();
    let weights = random_weights(&imported, 7, 1 << 24).unwrap();
    let mut single = InterpSession::new(Interpreter::new(&fused, &weights), 2, [2, 16]);
    let mut want = vec![single.forward(&PROMPT).unwrap()];
    for t in DECODE {
        want.push(single.forward(&[t]).unwrap());
    }
    for plan in [PlanChoice::Ep, PlanChoice::H2p] {
        for n in [2, 4, 8] {
            let layout = Layout::new(dims, n, plan).unwrap();
            let parts = partition_module(&fused, "decoder_layer", &layout, &FuseOptions::default()).unwrap();
            let modules: Vec<Module> = parts.ranks.iter().map(|r| r.module.clone()).collect();
            for r in &parts.ranks {
                let layer = r.module.function("decoder_layer").unwrap();
                assert!(
                    layer.nodes.iter().any(|n| matches!(n.op, Op::Collective { .. })),
                    "{plan:?} N={n} rank {}: no collective",
                    r.rank
                );
                assert!(r.rules_fired.get("moe-expert-parallel").copied().unwrap_or(0) > 0, "{:?}", r.rules_fired);
                if layout.attn_tp > 1 {
                    assert!(r.rules_fired.get("attention-tensor-parallel").copied().unwrap_or(0) > 0);
                }
            }
            let mut worst = 0f32;
            let mut s = MultiRankSession::new(&modules, &weights).unwrap();
            let mut got = vec![s.forward(&PROMPT).unwrap()];
            for t in DECODE {
                got.push(s.forward(&[t]).unwrap());
            }
            for (step, (g, w)) in got.iter().zip(&want).enumerate() {
                let d = rel_error(g, w);
                assert!(d < 1e-5, "{plan:?} N={n} step {step}: logits differ by {d} (relative)");
                worst = worst.max(d);
            }
            assert!(s.rank_disagreement < 1e-6, "ranks disagree by {}", s.rank_disagreement);
            eprintln!("{:?} N={n}: attention TP{}, max relative error {worst:e}", layout.plan, layout.attn_tp);
        }
    }
}

#[test]
fn device_counts_are_validated() {
    let (_, _, dims) = tiny();
    for n in [1, 2, 4, 8] {
        assert!(Layout::new(dims, n, PlanChoice::Ep).is_ok(), "ep N={n}");
    }
    assert_eq!(Layout::new(dims, 1, PlanChoice::H2p).unwrap().plan, PlanKind::Single);
    let e = Layout::new(dims, 3, PlanChoice::Ep).unwrap_err().to_string();
    assert!(e.contains("does not divide the model's 8 expert groups"), "{e}");
    let e = Layout::new(dims, 16, PlanChoice::Ep).unwrap_err().to_string();
    assert!(e.contains("exceeds the model's 8 expert groups"), "{e}");
    // TP2 x EP8 splits the experts 16 ways without breaking a group.
    let l = Layout::new(dims, 16, PlanChoice::H2p).unwrap();
    assert_eq!((l.expert_tp, l.expert_ep(), l.groups_per_rank()), (2, 8, 1));
    let e = Layout::new(dims, 32, PlanChoice::H2p).unwrap_err().to_string();
    assert!(e.contains("must divide the model's 8 expert groups"), "{e}");
    let e = Layout::new(dims, 6, PlanChoice::H2p).unwrap_err().to_string();
    assert!(e.contains("must divide"), "{e}");
    assert_eq!(Layout::new(dims, 8, PlanChoice::Auto).unwrap().plan, PlanKind::H2p);
    assert_eq!(Layout::new(dims, 0, PlanChoice::Ep).unwrap_err().to_string(), "--devices must be at least 1");
}

/// A rank's program run single-rank (no communicator) is a clear error at its
/// first collective, not a silent identity that yields one rank's partial sums.
#[test]
fn one_rank_without_a_communicator_is_an_error() {
    let (imported, fused, dims) = tiny();
    let weights = random_weights(&imported, 7, 1 << 24).unwrap();
    let layout = Layout::new(dims, 2, PlanChoice::Ep).unwrap();
    let parts = partition_module(&fused, "decoder_layer", &layout, &FuseOptions::default()).unwrap();
    let rank0 = &parts.ranks[0].module;
    let mut session = InterpSession::new(Interpreter::new(rank0, &weights), 2, [2, 16]);
    let err = format!("{:#}", session.forward(&PROMPT).expect_err("a collective without a communicator must fail"));
    assert!(err.contains("needs a communicator") && err.contains("multi-rank executor"), "{err}");
}
