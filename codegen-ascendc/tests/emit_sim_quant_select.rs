//! The int8 kernel kinds reached through `emit_kernel` (kernel selection),
//! as a compiled program reaches them: program kernels with symbolic token
//! dims and device dtypes, run under the simulation and compared exactly
//! with the interpreter (the emitters' own tests in `emit_sim_quant.rs`
//! cover the shape and dtype sweep; this checks the argument mapping).

#[allow(dead_code)] // each test file uses part of the shared helpers
mod common;

use common::{c, env, kernel, targets};
use panguc_codegen_ascendc::data::{decode, decode_i8, encode, encode_i8, round_through, run_kernels};
use panguc_codegen_ascendc::emit::paged::{paged_attention_int8, PagedDims};
use panguc_codegen_ascendc::emit::{emit_kernel, EmitOptions, TExpr};
use panguc_codegen_ascendc::target::DevType;
use panguc_ir::interp::quant as q;
use panguc_ir::kernel::KernelKind;
use panguc_ir::{Dim, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const F: DevType = DevType::F32;
const I8: DevType = DevType::I8;

fn rand_f(rng: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

fn exact(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g.to_bits() == w.to_bits() || (*g == 0.0 && *w == 0.0), "{what}: element {i}: got {g}, want {w}");
    }
}

/// W8A8_DYNAMIC linear: `dynamic_quant` then `quant_matmul_per_token`,
/// each selected by `emit_kernel` from its program kernel.
#[test]
fn dynamic_quant_then_per_token_matmul_through_kernel_selection() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let (n, k) = (48usize, 96usize);
    let t = Dim::tokens;
    for (target, act) in targets() {
        let o = EmitOptions::new(target, act).unwrap();
        let dq = kernel(
            "panguc_k001_dynamic_quant",
            KernelKind::DynamicQuant,
            vec![vec![t(), c(k)], vec![t(), c(k)], vec![t()]],
        );
        let dq = emit_kernel(&dq, &[act, I8, F], &o).unwrap();
        let mm = kernel(
            "panguc_k002_quant_matmul_per_token",
            KernelKind::QuantMatMul { per_token: true, bias: false },
            vec![vec![t(), c(k)], vec![c(n), c(k)], vec![c(n)], vec![t()], vec![t(), c(n)]],
        );
        let mm = emit_kernel(&mm, &[I8, I8, F, F, act], &o).unwrap();
        assert_eq!(mm.kernels.len(), 2, "{target}: int8 cube GEMM then the dequant vector kernel");
        for m in [1usize, 7, 33] {
            let x = round_through(act, &rand_f(&mut rng, m * k, -3.0, 3.0));
            let w: Vec<i64> = (0..n * k).map(|_| rng.random_range(-128i64..=127)).collect();
            let ws = rand_f(&mut rng, n, 1e-4, 1e-2);
            let mut dargs = vec![encode(act, &x), vec![0; m * k], vec![0; m * 4]];
            run_kernels(&dq, target, &env(m as u64, 0), &mut dargs).unwrap();
            let want_q = q::dynamic_quant(&Tensor::f32(vec![m, k], x.clone())).unwrap();
            let what = format!("{target} M={m}");
            assert_eq!(decode_i8(&dargs[1]), want_q[0].as_i64(), "q {what}");
            exact(&decode(F, &dargs[2]), want_q[1].as_f32(), &format!("x_scale {what}"));
            let want = q::quant_matmul_per_token(
                &want_q[0],
                &Tensor::i64(vec![n, k], w.clone()),
                &Tensor::f32(vec![n], ws.clone()),
                &want_q[1],
            )
            .unwrap();
            let mut margs = vec![
                dargs[1].clone(),
                encode_i8(&w),
                encode(F, &ws),
                dargs[2].clone(),
                vec![0; m * n * act.size() as usize],
            ];
            run_kernels(&mm, target, &env(m as u64, 0), &mut margs).unwrap();
            exact(&decode(act, &margs[4]), &round_through(act, want.as_f32()), &format!("out {what}"));
        }
    }
}

/// The int8 KV-cache conversions with per-channel `[Hkv, D]` parameters.
#[test]
fn quantize_and_dequantize_through_kernel_selection() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let (h, d) = (4usize, 16usize);
    let t = Dim::tokens;
    for (target, act) in targets() {
        let o = EmitOptions::new(target, act).unwrap();
        let rows = vec![t(), c(h), c(d)];
        let par = vec![c(h), c(d)];
        let qk = kernel(
            "panguc_k003_quantize",
            KernelKind::Quantize,
            vec![rows.clone(), par.clone(), par.clone(), rows.clone()],
        );
        let qk = emit_kernel(&qk, &[act, F, F, I8], &o).unwrap();
        let dk = kernel(
            "panguc_k004_dequantize",
            KernelKind::Dequantize,
            vec![rows.clone(), par.clone(), par.clone(), rows],
        );
        let dk = emit_kernel(&dk, &[I8, F, F, act], &o).unwrap();
        let m = 7usize;
        let x = round_through(act, &rand_f(&mut rng, m * h * d, -4.0, 4.0));
        let scale = rand_f(&mut rng, h * d, 0.01, 0.03);
        let offset: Vec<f32> = (0..h * d).map(|i| [0.0f32, 3.0, -2.0][i % 3]).collect();
        let (st, ot) = (Tensor::f32(vec![h, d], scale.clone()), Tensor::f32(vec![h, d], offset.clone()));
        let want = q::quantize(&Tensor::f32(vec![m, h, d], x.clone()), &st, &ot).unwrap();
        let mut args = vec![encode(act, &x), encode(F, &scale), encode(F, &offset), vec![0; m * h * d]];
        run_kernels(&qk, target, &env(m as u64, 0), &mut args).unwrap();
        assert_eq!(decode_i8(&args[3]), want.as_i64(), "{target} quantize");
        let back = q::dequantize(&want, &st, &ot).unwrap();
        let mut dargs =
            vec![args[3].clone(), encode(F, &scale), encode(F, &offset), vec![0; m * h * d * act.size() as usize]];
        run_kernels(&dk, target, &env(m as u64, 0), &mut dargs).unwrap();
        exact(&decode(act, &dargs[3]), &round_through(act, back.as_f32()), &format!("{target} dequantize"));
    }
}

/// `paged_attention_int8` selected from its program kernel is exactly the
/// kernel `emit_sim_quant_paged.rs` runs against the interpreter for the
/// same sizes (the symbolic dims map to the run-time tiling leaves).
#[test]
fn paged_attention_int8_selection_maps_dims_and_dtypes() {
    let (hq, hkv, d, bs) = (4usize, 2usize, 32usize, 16usize);
    let scale = 1.0 / (d as f64).sqrt();
    for (target, act) in targets() {
        let o = EmitOptions::new(target, act).unwrap();
        let meta = DevType::I32;
        let cache = vec![Dim::num_blocks(), c(bs), c(hkv), c(d)];
        let par = vec![c(hkv), c(d)];
        let k = kernel(
            "panguc_k007_paged_attention_int8",
            KernelKind::PagedAttentionInt8 { scale },
            vec![
                vec![Dim::tokens(), c(hq), c(d)],
                cache.clone(),
                cache,
                vec![Dim::seqs(), Dim::max_blocks()],
                vec![Dim::seqs().add(&Dim::c(1))],
                vec![Dim::seqs()],
                par.clone(),
                par.clone(),
                par.clone(),
                par,
                vec![Dim::tokens(), c(hq), c(d)],
            ],
        );
        let dts = [act, I8, I8, meta, meta, meta, F, F, F, F, act];
        let got = emit_kernel(&k, &dts, &o).unwrap();
        let dims = PagedDims {
            q_heads: hq as u64,
            kv_heads: hkv as u64,
            head_dim: d as u64,
            block_size: bs as u64,
            tokens: TExpr::Tokens,
            num_blocks: TExpr::NumBlocks,
            max_blocks: TExpr::MaxBlocks,
            seqs: TExpr::Seqs,
        };
        let want = paged_attention_int8("panguc_k007_paged_attention_int8", &dims, act, meta, scale, &o).unwrap();
        assert_eq!(got, want, "{target}");
        // A float cache is the float kernel's job, not this one's.
        let mut bad = dts;
        bad[1] = act;
        let e = emit_kernel(&k, &bad, &o).unwrap_err().to_string();
        assert!(e.contains("k_cache (argument 1)"), "{e}");
    }
}

/// What the selection cannot map is an error naming the kernel and the
/// reason, not a different kernel.
#[test]
fn unmappable_int8_kernels_are_clear_errors() {
    let (target, act) = targets()[0];
    let o = EmitOptions::new(target, act).unwrap();
    let t = Dim::tokens;
    // Batch dims (a batched int8 matmul) have no AscendC int8 GEMM.
    let batched = kernel(
        "panguc_k005_quant_matmul_per_token",
        KernelKind::QuantMatMul { per_token: true, bias: false },
        vec![vec![c(2), t(), c(64)], vec![c(32), c(64)], vec![c(32)], vec![c(2), t()], vec![c(2), t(), c(32)]],
    );
    let e = emit_kernel(&batched, &[I8, I8, F, F, act], &o).unwrap_err().to_string();
    assert!(e.contains("panguc_k005_quant_matmul_per_token") && e.contains("no batch dims"), "{e}");
    let dq = kernel(
        "panguc_k006_dynamic_quant",
        KernelKind::DynamicQuant,
        vec![vec![t(), c(64)], vec![t(), c(64)], vec![t()]],
    );
    // An int8 output stored as i64 (a program whose device dtypes were not
    // chosen for int8) is refused, naming the argument.
    let e = emit_kernel(&dq, &[act, DevType::I64, F], &o).unwrap_err().to_string();
    assert!(e.contains("panguc_k006_dynamic_quant") && e.contains("q_out (argument 1)"), "{e}");
}
