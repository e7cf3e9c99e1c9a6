//! The data-movement kernels of partitioned programs under the simulation,
//! for both targets, against the reference semantics:
//! - `slice` along an inner axis whose rows end inside a 32-byte block
//!   (DataCopyPad on 910B, the scalar tail on 310P), for floats and i64 ids;
//! - collectives along the hidden axis (packing kernels + the host call),
//!   run by N threads through the in-process communicator and compared
//!   with `panguc_ir::multirank::collective`;
//! - i64 index arithmetic with a broadcast scalar (a rank's local expert
//!   ids) and a row-broadcast bias add (the bias after an all-gather).

#[allow(dead_code)] // each test file uses part of the shared helpers
mod common;

use common::{c, emit, env, kernel, rand_vec, targets, TOKENS};
use panguc_codegen_ascendc::data::{decode, decode_i64, encode, encode_i64, round_through, run_collective_kernels};
use panguc_codegen_ascendc::data::{run_kernels, run_sim};
use panguc_codegen_ascendc::emit::HostCollective;
use panguc_codegen_ascendc::engine::host_collective;
use panguc_codegen_ascendc::sim::SimArg;
use panguc_codegen_ascendc::target::DevType;
use panguc_ir::kernel::{ElemOp, KernelKind};
use panguc_ir::multirank::{collective, run_ranks, InProcessComm};
use panguc_ir::op::{BinaryOp, CollectiveKind};
use panguc_ir::{interp, Dim, Op, Tensor};
use panguc_runtime::collective::InProcess;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[test]
fn slice_along_an_inner_axis_with_unaligned_rows() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let (w, start, len) = (8, 2, 3);
    for (target, act) in targets() {
        for dt in [act, DevType::F32, DevType::I64] {
            let k = kernel(
                "panguc_k011_slice",
                KernelKind::Slice { axis: 1, start },
                vec![vec![Dim::tokens(), c(w)], vec![Dim::tokens(), c(len)]],
            );
            let dk = emit(&k, &[dt, dt], target, act);
            for t in TOKENS {
                let n = t as usize * w;
                let x: Vec<f32> = if dt == DevType::I64 {
                    (0..n).map(|_| rng.random_range(0..64) as f32).collect()
                } else {
                    round_through(dt, &rand_vec(&mut rng, n))
                };
                let out = run_sim(
                    &dk.kernels[0],
                    target,
                    &env(t, 0),
                    vec![SimArg::Input(encode(dt, &x)), SimArg::Output(t as usize * len * dt.size() as usize)],
                )
                .unwrap();
                let op = Op::Slice { axis: 1, start, end: start + len };
                let want = interp::eval_pure(&op, &[&Tensor::f32(vec![t as usize, w], x)]).unwrap().remove(0);
                assert_eq!(decode(dt, &out[0]), want.as_f32(), "slice {dt} on {target}, T={t}");
            }
        }
    }
}

/// Every kind of collective along axis 1 of `[tokens, 48]` over 3 ranks:
/// each rank runs the emitted device kernels and the host call through
/// the in-process communicator; the result must equal the reference.
#[test]
fn collectives_along_the_hidden_axis_match_the_reference() {
    let (n, h) = (3usize, 48usize);
    let group: Vec<usize> = (0..n).collect();
    for (target, act) in targets() {
        for kind in [
            CollectiveKind::AllReduce,
            CollectiveKind::AllGather,
            CollectiveKind::ReduceScatter,
            CollectiveKind::AllToAll,
        ] {
            let out_h = match kind {
                CollectiveKind::AllGather => h * n,
                CollectiveKind::ReduceScatter => h / n,
                _ => h,
            };
            let k = kernel(
                "panguc_k017_collective",
                KernelKind::Collective { kind, group: group.clone(), axis: 1 },
                vec![vec![Dim::tokens(), c(h)], vec![Dim::tokens(), c(out_h)]],
            );
            let dks = emit(&k, &[act, act], target, act);
            let packing = !matches!(kind, CollectiveKind::AllReduce);
            assert_eq!(!dks.kernels.is_empty(), packing, "{kind:?}: packing kernels");
            for t in [1u64, 5] {
                let mut rng = ChaCha8Rng::seed_from_u64(t);
                // Small integers: sums are exact in every dtype.
                let inputs: Vec<Vec<f32>> =
                    (0..n).map(|_| (0..t as usize * h).map(|_| rng.random_range(-8i32..8) as f32).collect()).collect();
                let comm = InProcess::new();
                let reference = InProcessComm::new();
                let got = run_ranks(n, &reference, |r| -> anyhow::Result<(Vec<f32>, Vec<f32>)> {
                    let mut args = vec![encode(act, &inputs[r]), vec![0u8; t as usize * out_h * act.size() as usize]];
                    let mut call =
                        |hc: &HostCollective, send: &[u8], recv: &mut [u8]| host_collective(&comm, r, hc, send, recv);
                    run_collective_kernels(&dks, target, &env(t, 0), &mut args, &mut call)?;
                    let x = Tensor::f32(vec![t as usize, h], inputs[r].clone());
                    let want = collective(&reference, r, kind, &group, 1, &x)?;
                    Ok((decode(act, &args[1]), want.as_f32().to_vec()))
                })
                .unwrap();
                for (r, (g, w)) in got.iter().enumerate() {
                    assert_eq!(g, w, "{kind:?} on {target}, T={t}, rank {r}");
                }
            }
            // A collective is not an ordinary launch.
            let mut args = vec![vec![], vec![]];
            assert!(run_kernels(&dks, target, &env(1, 0), &mut args).is_err());
        }
    }
}

#[test]
fn local_expert_ids_and_row_broadcast_bias() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    for (target, act) in targets() {
        // ids - first local expert, the scalar broadcast.
        let k = kernel(
            "panguc_k013_elementwise",
            KernelKind::Elementwise { op: ElemOp::Binary(BinaryOp::Sub) },
            vec![vec![Dim::tokens(), c(4)], vec![], vec![Dim::tokens(), c(4)]],
        );
        let dk = emit(&k, &[DevType::I64; 3], target, act);
        // bias[64] added to every row (weights are stored in the activation dtype).
        let kb = kernel(
            "panguc_k010_elementwise",
            KernelKind::Elementwise { op: ElemOp::Binary(BinaryOp::Add) },
            vec![vec![Dim::tokens(), c(64)], vec![c(64)], vec![Dim::tokens(), c(64)]],
        );
        let dkb = emit(&kb, &[act; 3], target, act);
        for t in TOKENS {
            let ids: Vec<i64> = (0..t * 4).map(|_| rng.random_range(32..64)).collect();
            let out = run_sim(
                &dk.kernels[0],
                target,
                &env(t, 0),
                vec![SimArg::Input(encode_i64(&ids)), SimArg::Input(encode_i64(&[32])), SimArg::Output(ids.len() * 8)],
            )
            .unwrap();
            let want: Vec<i64> = ids.iter().map(|i| i - 32).collect();
            assert_eq!(decode_i64(&out[0]), want, "local ids on {target}, T={t}");

            let x = round_through(act, &rand_vec(&mut rng, t as usize * 64));
            let b = round_through(act, &rand_vec(&mut rng, 64));
            let mut args = vec![encode(act, &x), encode(act, &b), vec![0u8; x.len() * act.size() as usize]];
            run_kernels(&dkb, target, &env(t, 0), &mut args).unwrap();
            let tx = Tensor::f32(vec![t as usize, 64], x);
            let want = interp::eval_pure(&Op::Binary(BinaryOp::Add), &[&tx, &Tensor::f32(vec![64], b)]).unwrap();
            let want = round_through(act, want[0].as_f32());
            assert_eq!(decode(act, &args[2]), want, "bias add on {target}, T={t}");
        }
    }
}
