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
    ]
}

fn build(steps: &[Step]) -> Module {
    let t = Dim::tokens();
    let ty = TensorType::new(DType::F32, vec![t.clone(), Dim::c(8)]);
    let mut f = Function::new("body");
    let mut x = f.add_input("x", ty);
    let pos = f.add_input("positions", TensorType::new(DType::I64, vec![t.clone()]));
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
    f.nodes[0].args = vec![ValueId(3)];
    let e = verify_module(&m).unwrap_err();
    assert!(e.contains("before it is defined"), "{e}");

    // Shape mismatch found by inference.
    let mut f = Function::new("bad");
    let a = f.add_input("a", TensorType::new(DType::F32, vec![Dim::c(2), Dim::c(3)]));
    let b = f.add_input("b", TensorType::new(DType::F32, vec![Dim::c(4), Dim::c(3)]));
    let e = f.op(Op::MatMul { transpose_b: false }, &[a, b], "mm").unwrap_err();
    assert!(e.contains("contraction") && e.contains("mm"), "{e}");
}
