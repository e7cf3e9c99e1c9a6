//! The canonical text format: print(parse(print(m))) == print(m) over
//! randomly built modules, plus parser and verifier error messages.

use panguc_ir::op::{BinaryOp, ReduceOp, UnaryOp};
use panguc_ir::text::{parse_module, print_module};
use panguc_ir::verify::verify_module;
use panguc_ir::{DType, Dim, Function, Module, Op, TensorType, ValueId};
use proptest::prelude::*;

/// One step of a random straight-line program over a `[tokens, 8]` value.
#[derive(Debug, Clone)]
enum Step {
    Unary(u8),
    BinarySelf(u8),
    BinaryScalar(u8, f64),
    ReduceKeep(u8),
    Softmax,
    MatMulWeight(DType, bool),
    SliceConcat(usize),
    ReshapeRoundTrip,
    Rope,
    /// KV write into paged caches and paged attention over the step.
    PagedAttention(f64),
    /// Init routing, grouped matmul, finalize routing over the step's rows.
    BatchedMoe(usize),
    /// Per-token dynamic quant and an int8 linear with per-channel scales.
    W8A8Dynamic,
    /// Static per-tensor quant and an int8 linear with quant_bias and a
    /// deq_scale that is int64-encoded (true) or f32.
    W8A8Static(bool),
    /// Int8 KV rows: quantize, paged write into an i8 cache, dequantize.
    KvInt8,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0u8..6).prop_map(Step::Unary),
        (0u8..5).prop_map(Step::BinarySelf),
        ((0u8..5), -1e6f64..1e6).prop_map(|(o, v)| Step::BinaryScalar(o, v)),
        (0u8..3).prop_map(Step::ReduceKeep),
        Just(Step::Softmax),
        (prop_oneof![Just(DType::BF16), Just(DType::F16), Just(DType::F32)], any::<bool>())
            .prop_map(|(d, t)| Step::MatMulWeight(d, t)),
        (1usize..8).prop_map(Step::SliceConcat),
        Just(Step::ReshapeRoundTrip),
        Just(Step::Rope),
        (0.01f64..1.0).prop_map(Step::PagedAttention),
        (1usize..3).prop_map(|k| Step::BatchedMoe(2 * k)),
        Just(Step::W8A8Dynamic),
        any::<bool>().prop_map(Step::W8A8Static),
        Just(Step::KvInt8),
    ]
}

fn build(steps: &[Step]) -> Module {
    let t = Dim::tokens();
    let ty = TensorType::new(DType::F32, vec![t.clone(), Dim::c(8)]);
    let mut f = Function::new("body");
    let mut x = f.add_input("x", ty);
    let pos = f.add_input("positions", TensorType::new(DType::I64, vec![t.clone()]));
    let step_in = panguc_ir::batch::declare_step_inputs(&mut f);
    let cache_ty = panguc_ir::batch::paged_cache_type(DType::F32, 4, 1, 4);
    let (k_cache, v_cache) = (f.add_input("k_cache", cache_ty.clone()), f.add_input("v_cache", cache_ty));
    for (n, s) in steps.iter().enumerate() {
        let name = format!("v{n}");
        x = match s {
            Step::Unary(u) => {
                let u =
                    [UnaryOp::Neg, UnaryOp::Exp, UnaryOp::Sqrt, UnaryOp::Rsqrt, UnaryOp::Reciprocal, UnaryOp::Sigmoid]
                        [*u as usize];
                f.op(Op::Unary(u), &[x], &name).unwrap()
            }
            Step::BinarySelf(b) => f.op(Op::Binary(binop(*b)), &[x, x], &name).unwrap(),
            Step::BinaryScalar(b, v) => {
                let c = f.op(Op::Scalar { value: *v, dtype: DType::F32 }, &[], &format!("{name}_c")).unwrap();
                f.op(Op::Binary(binop(*b)), &[x, c], &name).unwrap()
            }
            Step::ReduceKeep(r) => {
                let op = [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max][*r as usize];
                let red = f.op(Op::Reduce { op, axis: 1, keepdim: true }, &[x], &format!("{name}_r")).unwrap();
                f.op(Op::Binary(BinaryOp::Sub), &[x, red], &name).unwrap()
            }
            Step::Softmax => f.op(Op::Softmax { axis: 1 }, &[x], &name).unwrap(),
            Step::MatMulWeight(d, tb) => {
                let w = f.add_weight(
                    &format!("{name}.weight"),
                    &format!("layer.{name}.weight"),
                    TensorType::new(*d, vec![Dim::c(8), Dim::c(8)]),
                );
                f.op(Op::MatMul { transpose_b: *tb }, &[x, w], &name).unwrap()
            }
            Step::SliceConcat(k) => {
                let a = f.op(Op::Slice { axis: 1, start: 0, end: *k }, &[x], &format!("{name}_a")).unwrap();
                let b = f.op(Op::Slice { axis: 1, start: *k, end: 8 }, &[x], &format!("{name}_b")).unwrap();
                f.op(Op::Concat { axis: 1 }, &[b, a], &name).unwrap()
            }
            Step::ReshapeRoundTrip => {
                let r = f
                    .op(Op::Reshape { shape: vec![t.clone(), Dim::c(2), Dim::c(4)] }, &[x], &format!("{name}_r"))
                    .unwrap();
                let tr = f.op(Op::Transpose { perm: vec![0, 2, 1] }, &[r], &format!("{name}_t")).unwrap();
                f.op(Op::Reshape { shape: vec![t.clone(), Dim::c(8)] }, &[tr], &name).unwrap()
            }
            Step::Rope => {
                let cos = f
                    .op(
                        Op::RopeTable { kind: panguc_ir::op::RopeKind::Cos, theta: 1.6e7, head_dim: 8 },
                        &[pos],
                        &format!("{name}_cos"),
                    )
                    .unwrap();
                f.op(Op::Binary(BinaryOp::Mul), &[x, cos], &name).unwrap()
            }
            Step::PagedAttention(scale) => {
                let n = |s: &str| format!("{name}_{s}");
                let heads = vec![t.clone(), Dim::c(2), Dim::c(4)];
                let q = f.op(Op::Reshape { shape: heads }, &[x], &n("q")).unwrap();
                let kv = f.op(Op::Slice { axis: 1, start: 0, end: 1 }, &[q], &n("kv")).unwrap();
                let kc = f.op(Op::KvCacheWrite, &[k_cache, kv, step_in.slot_mapping], &n("k")).unwrap();
                let vc = f.op(Op::KvCacheWrite, &[v_cache, kv, step_in.slot_mapping], &n("v")).unwrap();
                let meta = [step_in.block_table, step_in.query_start_loc, step_in.context_lens];
                let o =
                    f.op(Op::PagedAttention { scale: *scale }, &[&[q, kc, vc][..], &meta].concat(), &n("o")).unwrap();
                f.op(Op::Reshape { shape: vec![t.clone(), Dim::c(8)] }, &[o], &name).unwrap()
            }
            Step::BatchedMoe(k) => {
                let n = |s: &str| format!("{name}_{s}");
                let scale = f.add_weight(&n("scale"), &n("scale"), TensorType::new(DType::F32, vec![Dim::c(8)]));
                let gate = f.push_node(None, Op::MoeGatingGroupTopK { groups: *k }, &[x, scale], &[&n("w"), &n("ids")]);
                let [w, ids] = gate.unwrap()[..] else { unreachable!() };
                let init = f.push_node(
                    None,
                    Op::MoeInitRouting { experts: 8 },
                    &[x, ids],
                    &[&n("rows"), &n("row_idx"), &n("counts")],
                );
                let [rows, row_idx, counts] = init.unwrap()[..] else { unreachable!() };
                let ew = f.add_weight(&n("ew"), &n("ew"), TensorType::new(DType::BF16, vec![Dim::c(8); 3]));
                let y = f.op(Op::GroupedMatmul, &[rows, ew, counts], &n("y")).unwrap();
                f.op(Op::MoeFinalizeRouting, &[y, w, row_idx, x], &name).unwrap()
            }
            Step::W8A8Dynamic => {
                let n = |s: &str| format!("{name}_{s}");
                let w = f.add_weight(&n("w"), &n("w"), TensorType::new(DType::I8, vec![Dim::c(8), Dim::c(8)]));
                let ws = f.add_weight(&n("ws"), &n("ws"), TensorType::new(DType::BF16, vec![Dim::c(8)]));
                let q = f.push_node(None, Op::DynamicQuant, &[x], &[&n("q"), &n("qs")]).unwrap();
                f.op(Op::QuantMatMulPerToken, &[q[0], w, ws, q[1]], &name).unwrap()
            }
            Step::W8A8Static(encoded) => {
                let n = |s: &str| format!("{name}_{s}");
                let scalar = TensorType::new(DType::F16, vec![Dim::c(1)]);
                let (scale, offset) =
                    (f.add_weight(&n("s"), &n("s"), scalar.clone()), f.add_weight(&n("o"), &n("o"), scalar));
                let w = f.add_weight(&n("w"), &n("w"), TensorType::new(DType::I8, vec![Dim::c(8), Dim::c(8)]));
                let b = f.add_weight(&n("b"), &n("b"), TensorType::new(DType::I32, vec![Dim::c(8)]));
                let deq_ty = if *encoded { DType::I64 } else { DType::F32 };
                let deq = f.add_weight(&n("deq"), &n("deq"), TensorType::new(deq_ty, vec![Dim::c(8)]));
                let xq = f.op(Op::Quantize, &[x, scale, offset], &n("xq")).unwrap();
                f.op(Op::QuantMatMul, &[xq, w, b, deq], &name).unwrap()
            }
            Step::KvInt8 => {
                let n = |s: &str| format!("{name}_{s}");
                let chan = TensorType::new(DType::F32, vec![Dim::c(1), Dim::c(4)]);
                let (scale, offset) =
                    (f.add_weight(&n("s"), &n("s"), chan.clone()), f.add_weight(&n("o"), &n("o"), chan));
                let cache = f.add_input(&n("cache"), panguc_ir::batch::paged_cache_type(DType::I8, 4, 1, 4));
                let heads = vec![t.clone(), Dim::c(2), Dim::c(4)];
                let r = f.op(Op::Reshape { shape: heads }, &[x], &n("r")).unwrap();
                let row = f.op(Op::Slice { axis: 1, start: 0, end: 1 }, &[r], &n("row")).unwrap();
                let q = f.op(Op::Quantize, &[row, scale, offset], &n("q")).unwrap();
                let c = f.op(Op::KvCacheWrite, &[cache, q, step_in.slot_mapping], &n("c")).unwrap();
                let _read = f.op(Op::Dequantize, &[c, scale, offset], &n("read")).unwrap();
                let dq = f.op(Op::Dequantize, &[q, scale, offset], &n("dq")).unwrap();
                let dq2 = f.op(Op::Concat { axis: 1 }, &[dq, dq], &n("dq2")).unwrap();
                f.op(Op::Reshape { shape: vec![t.clone(), Dim::c(8)] }, &[dq2], &name).unwrap()
            }
        };
    }
    f.outputs = vec![x];
    let mut m = Module::new("random", "body");
    m.add_function(f);
    m
}

fn binop(b: u8) -> BinaryOp {
    [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div, BinaryOp::Max][b as usize]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
    #[test]
    fn print_parse_print_is_identity(steps in proptest::collection::vec(step(), 1..24)) {
        let m = build(&steps);
        verify_module(&m).unwrap();
        let text = print_module(&m);
        let parsed = parse_module(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(print_module(&parsed), text);
    }
}

#[test]
fn parse_errors_name_the_line() {
    let good = print_module(&build(&[Step::Softmax]));
    let bad = good.replace("softmax(", "softmaxx(");
    let e = parse_module(&bad).unwrap_err();
    assert!(e.to_string().contains("unknown op `softmaxx`"), "{e}");
    assert!(e.line > 1);
    let undefined = good.replace("softmax(%x)", "softmax(%nope)");
    assert!(parse_module(&undefined).unwrap_err().message.contains("undefined value %nope"));
    let bad_attr = good.replace("{axis = 1}", "{axis = 1, bogus = 2}");
    assert!(parse_module(&bad_attr).unwrap_err().message.contains("no attribute `bogus`"));
}

#[test]
fn verifier_names_function_node_and_mismatch() {
    let mut m = build(&[Step::Softmax]);
    // Corrupt the recorded result type of the softmax node.
    let f = m.functions.get_mut("body").unwrap();
    let r = f.nodes[0].results[0];
    f.values[r.index()].ty = TensorType::new(DType::F32, vec![Dim::tokens(), Dim::c(9)]);
    let e = verify_module(&m).unwrap_err();
    assert!(e.contains("function @body"), "{e}");
    assert!(e.contains("%v0 = softmax"), "{e}");
    assert!(e.contains("f32[tokens,9]") && e.contains("f32[tokens,8]"), "{e}");

    // Use before definition.
    let mut m = build(&[Step::Softmax, Step::Softmax]);
    let f = m.functions.get_mut("body").unwrap();
    let later: ValueId = f.nodes[1].results[0];
    f.nodes[0].args = vec![later];
    let e = verify_module(&m).unwrap_err();
    assert!(e.contains("before it is defined"), "{e}");

    // Shape mismatch found by inference.
    let mut f = Function::new("bad");
    let a = f.add_input("a", TensorType::new(DType::F32, vec![Dim::c(2), Dim::c(3)]));
    let b = f.add_input("b", TensorType::new(DType::F32, vec![Dim::c(4), Dim::c(3)]));
    let e = f.op(Op::MatMul { transpose_b: false }, &[a, b], "mm").unwrap_err();
    assert!(e.contains("contraction") && e.contains("mm"), "{e}");
}
