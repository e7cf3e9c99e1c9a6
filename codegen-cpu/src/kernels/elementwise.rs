//! Elementwise kernels with numpy broadcasting: unary/binary ops, casts,
//! SwiGLU and fused postfix expressions. The inner loop runs over the last
//! output dim with unit or zero input strides, which the O3 loop vectoriser
//! turns into vector code.

use crate::cg::{Cg, Ok_, F};
use anyhow::{bail, Result};
use inkwell::values::{BasicValueEnum, IntValue};
use panguc_ir::kernel::{ElemOp, ExprToken, Kernel};
use panguc_ir::op::{BinaryOp, UnaryOp};
use panguc_ir::{DType, Dim};

pub(crate) fn emit(cg: &mut Cg, k: &Kernel, op: &ElemOp) -> Result<()> {
    let n_in = k.args.len() - 1;
    let out = &k.args[n_in];
    cg.begin_kernel(&k.name);
    let od = cg.dims(&out.shape)?;
    let r = od.len();
    let inner = if r == 0 { cg.i64c(1) } else { od[r - 1] };
    let outer_dims = &od[..r.saturating_sub(1)];
    // Per input: its stride along each output dim (0 where broadcast).
    let mut bstrides: Vec<Vec<IntValue>> = vec![];
    for a in &k.args[..n_in] {
        let ri = a.shape.len();
        if ri > r {
            bail!("elementwise input of rank {ri} exceeds output rank {r}");
        }
        let idims = cg.dims(&a.shape)?;
        let istr = cg.strides(&idims);
        bstrides.push(
            (0..r)
                .map(|d| if d < r - ri || a.shape[d - (r - ri)] == Dim::c(1) { cg.i64c(0) } else { istr[d - (r - ri)] })
                .collect(),
        );
    }
    let ins: Vec<_> = k.args[..n_in].iter().enumerate().map(|(i, a)| cg.arg(i, a.dtype)).collect();
    let outp = cg.arg(n_in, out.dtype);
    let tokens = op.tokens();
    cg.for_tiles(|cg, t| {
        let idx = cg.unravel(t, outer_dims);
        let bases: Vec<IntValue> = bstrides
            .iter()
            .map(|s| idx.iter().zip(s).fold(cg.i64c(0), |acc, (i, st)| cg.add(acc, cg.mul(*i, *st))))
            .collect();
        let steps: Vec<IntValue> = bstrides.iter().map(|s| if r == 0 { cg.i64c(0) } else { s[r - 1] }).collect();
        let obase = cg.mul(t, inner);
        cg.for_range(cg.i64c(0), inner, 1, |cg, j| {
            let vals: Vec<BasicValueEnum> = (0..n_in)
                .map(|i| {
                    let at = cg.add(bases[i], cg.mul(j, steps[i]));
                    load_any(cg, ins[i], at, k.args[i].dtype)
                })
                .collect();
            let o = cg.add(obase, j);
            match &tokens {
                Some(toks) => {
                    let v = eval(cg, toks, &vals)?;
                    store_any(cg, outp, o, out.dtype, v);
                }
                None => convert(cg, vals[0], k.args[0].dtype, outp, o, out.dtype),
            }
            Ok(())
        })
    })?;
    cg.finish_kernel();
    Ok(())
}

/// An element as f32 (float storage) or i64 (integer storage).
pub(crate) fn load_any<'c>(
    cg: &Cg<'c>,
    p: inkwell::values::PointerValue<'c>,
    i: IntValue<'c>,
    dtype: DType,
) -> BasicValueEnum<'c> {
    if dtype.is_float() {
        cg.load_f(p, i, dtype).into()
    } else {
        cg.load_i(p, i).into()
    }
}

fn store_any<'c>(
    cg: &Cg<'c>,
    p: inkwell::values::PointerValue<'c>,
    i: IntValue<'c>,
    dtype: DType,
    v: BasicValueEnum<'c>,
) {
    if dtype.is_float() {
        cg.store_f(p, i, dtype, v.into_float_value());
    } else {
        cg.store_i(p, i, v.into_int_value());
    }
}

/// A cast between storage types, with Rust `as` semantics for float to int
/// (saturating) like the reference.
fn convert<'c>(
    cg: &Cg<'c>,
    v: BasicValueEnum<'c>,
    from: DType,
    outp: inkwell::values::PointerValue<'c>,
    o: IntValue<'c>,
    to: DType,
) {
    match (from.is_float(), to.is_float()) {
        (true, true) => cg.store_f(outp, o, to, v.into_float_value()),
        (false, false) => cg.store_i(outp, o, v.into_int_value()),
        (false, true) => {
            let f = cg.b.build_signed_int_to_float(v.into_int_value(), cg.f32t(), "").ok_();
            cg.store_f(outp, o, to, f);
        }
        (true, false) => {
            let i = inkwell::intrinsics::Intrinsic::find("llvm.fptosi.sat").expect("fptosi.sat");
            let f = i.get_declaration(&cg.module, &[cg.i64t().into(), cg.f32t().into()]).expect("declare");
            let r = cg.b.build_call(f, &[v.into()], "").ok_().try_as_basic_value().basic().expect("value");
            cg.store_i(outp, o, r.into_int_value());
        }
    }
}

/// Evaluate a postfix expression on scalar operands: floats in f32 with
/// the reference's formulas, integers (binary ops only) in i64.
pub(crate) fn eval<'c>(cg: &Cg<'c>, tokens: &[ExprToken], args: &[BasicValueEnum<'c>]) -> Result<BasicValueEnum<'c>> {
    let mut stack: Vec<BasicValueEnum<'c>> = vec![];
    for t in tokens {
        let v = match *t {
            ExprToken::Arg(i) => args[i],
            ExprToken::Unary(u) => {
                let x = stack.pop().expect("checked postfix");
                if !x.is_float_value() {
                    bail!("unary op on an integer operand");
                }
                unary(cg, u, x)
            }
            ExprToken::Binary(b) => {
                let y = stack.pop().expect("checked postfix");
                let x = stack.pop().expect("checked postfix");
                if x.is_float_value() {
                    binary(cg, b, x, y)
                } else {
                    binary_int(cg, b, x.into_int_value(), y.into_int_value()).into()
                }
            }
        };
        stack.push(v);
    }
    Ok(stack.pop().expect("checked postfix"))
}

pub(crate) fn unary<'c>(cg: &Cg<'c>, u: UnaryOp, x: F<'c>) -> F<'c> {
    match u {
        UnaryOp::Neg => cg.fneg(x),
        UnaryOp::Exp => cg.exp(x),
        UnaryOp::Sqrt => cg.sqrt(x),
        UnaryOp::Rsqrt => cg.fdiv(cg.fconst_like(x, 1.0), cg.sqrt(x)),
        UnaryOp::Reciprocal => cg.fdiv(cg.fconst_like(x, 1.0), x),
        UnaryOp::Sigmoid => cg.sigmoid(x),
    }
}

pub(crate) fn binary<'c>(cg: &Cg<'c>, b: BinaryOp, x: F<'c>, y: F<'c>) -> F<'c> {
    match b {
        BinaryOp::Add => cg.fadd(x, y),
        BinaryOp::Sub => cg.fsub(x, y),
        BinaryOp::Mul => cg.fmul(x, y),
        BinaryOp::Div => cg.fdiv(x, y),
        BinaryOp::Max => cg.fmax(x, y),
    }
}

fn binary_int<'c>(cg: &Cg<'c>, b: BinaryOp, x: IntValue<'c>, y: IntValue<'c>) -> IntValue<'c> {
    match b {
        BinaryOp::Add => cg.add(x, y),
        BinaryOp::Sub => cg.sub(x, y),
        BinaryOp::Mul => cg.mul(x, y),
        // The reference defines x / 0 = 0; divide by 1 instead of trapping.
        BinaryOp::Div => {
            let zero = cg.eq(y, cg.i64c(0));
            let safe = cg.select_i(zero, cg.i64c(1), y);
            cg.select_i(zero, cg.i64c(0), cg.div(x, safe))
        }
        BinaryOp::Max => cg.max(x, y),
    }
}
