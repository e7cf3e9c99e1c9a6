//! The code-generation context: typed helpers over inkwell's builder for
//! what every kernel needs (loops, symbolic dims, loads and stores that
//! convert between storage dtypes and f32, vectors, libm intrinsics).
//!
//! Every kernel has the C ABI
//! `void kernel(i8** args, const i64* syms, i64 begin, i64 end, i8* scratch)`:
//! `args` are the buffer pointers in the kernel's argument order, `syms` the
//! shape symbols (`tokens`, `past`), `begin..end` the tile range to run and
//! `scratch` this thread's scratch memory.

use anyhow::{anyhow, Result};
use inkwell::attributes::AttributeLoc;
use inkwell::basic_block::BasicBlock;
use inkwell::builder::Builder;
use inkwell::context::Context;
use inkwell::intrinsics::Intrinsic;
use inkwell::module::{Linkage, Module};
use inkwell::types::{BasicType, BasicTypeEnum, FloatType, IntType, PointerType, VectorType};
use inkwell::values::{
    BasicMetadataValueEnum, BasicValue, BasicValueEnum, FloatValue, FunctionValue, IntValue, PointerValue, VectorValue,
};
use inkwell::{AddressSpace, FloatPredicate, IntPredicate};
use panguc_ir::shape::Bindings;
use panguc_ir::{DType, Dim};

/// Shorthand: inkwell builder calls only fail when the builder is not
/// positioned, which is a code generator bug.
pub(crate) trait Ok_<T> {
    fn ok_(self) -> T;
}

impl<T, E: std::fmt::Debug> Ok_<T> for std::result::Result<T, E> {
    fn ok_(self) -> T {
        self.expect("LLVM builder is positioned")
    }
}

/// A scalar or vector f32 value (vectors of `n` lanes).
pub(crate) type F<'ctx> = BasicValueEnum<'ctx>;

pub(crate) struct Cg<'ctx> {
    pub ctx: &'ctx Context,
    pub module: Module<'ctx>,
    pub b: Builder<'ctx>,
    pub symbols: Vec<String>,
    cpu: String,
    features: String,
    // State of the function being built.
    pub func: Option<FunctionValue<'ctx>>,
    entry: Option<BasicBlock<'ctx>>,
    args: Option<PointerValue<'ctx>>,
    syms: Vec<IntValue<'ctx>>,
    pub begin: Option<IntValue<'ctx>>,
    pub end: Option<IntValue<'ctx>>,
    pub scratch: Option<PointerValue<'ctx>>,
    /// GEMMs on bf16 weights use `vdpbf16ps` (see `kernels::gemm`).
    pub bf16_dot: bool,
    /// Int8 dot products use AVX-512 VNNI `vpdpbusd` (see `kernels::quant`).
    pub vnni: bool,
}

impl<'ctx> Cg<'ctx> {
    pub fn new(ctx: &'ctx Context, name: &str, symbols: Vec<String>, cpu: &str, features: &str) -> Self {
        Cg {
            ctx,
            module: ctx.create_module(name),
            b: ctx.create_builder(),
            symbols,
            cpu: cpu.to_string(),
            features: features.to_string(),
            func: None,
            entry: None,
            args: None,
            syms: vec![],
            begin: None,
            end: None,
            scratch: None,
            bf16_dot: false,
            vnni: false,
        }
    }

    // ---- types ----
    /// Whether the target's feature string enables `feature` (`avx2`, ...).
    pub fn has_feature(&self, feature: &str) -> bool {
        self.features.split(',').any(|f| f.strip_prefix('+') == Some(feature))
    }

    pub fn f32t(&self) -> FloatType<'ctx> {
        self.ctx.f32_type()
    }
    pub fn i64t(&self) -> IntType<'ctx> {
        self.ctx.i64_type()
    }
    pub fn i32t(&self) -> IntType<'ctx> {
        self.ctx.i32_type()
    }
    pub fn i8p(&self) -> PointerType<'ctx> {
        self.ctx.i8_type().ptr_type(AddressSpace::default())
    }
    pub fn vec_f32(&self, n: u32) -> VectorType<'ctx> {
        self.f32t().vec_type(n)
    }
    /// The in-memory element type of a storage dtype.
    pub fn elem_type(&self, d: DType) -> BasicTypeEnum<'ctx> {
        match d {
            DType::F32 => self.f32t().into(),
            DType::BF16 => self.ctx.i16_type().into(),
            DType::F16 => self.ctx.f16_type().into(),
            DType::I64 => self.i64t().into(),
            DType::I32 => self.i32t().into(),
            DType::I8 | DType::Bool => self.ctx.i8_type().into(),
        }
    }

    // ---- constants ----
    pub fn i64c(&self, v: i64) -> IntValue<'ctx> {
        self.i64t().const_int(v as u64, true)
    }
    pub fn f32c(&self, v: f32) -> FloatValue<'ctx> {
        self.f32t().const_float(v as f64)
    }

    /// Attributes every function needs: the JIT and the object emitter
    /// only use the host's vector units when the function says so.
    pub fn add_target_attrs(&self, f: FunctionValue<'ctx>) {
        f.add_attribute(AttributeLoc::Function, self.ctx.create_string_attribute("target-cpu", &self.cpu));
        f.add_attribute(AttributeLoc::Function, self.ctx.create_string_attribute("target-features", &self.features));
        if self.features.split(',').any(|f| f == "+avx512f") {
            // Without these, LLVM's generic AVX-512 tuning (prefer 256-bit)
            // splits the 16-lane tiles into two 8-lane halves.
            for (k, v) in [("prefer-vector-width", "512"), ("min-legal-vector-width", "512")] {
                f.add_attribute(AttributeLoc::Function, self.ctx.create_string_attribute(k, v));
            }
        }
        let nounwind = inkwell::attributes::Attribute::get_named_enum_kind_id("nounwind");
        f.add_attribute(AttributeLoc::Function, self.ctx.create_enum_attribute(nounwind, 0));
    }

    /// Start an exported kernel with the common ABI.
    pub fn begin_kernel(&mut self, name: &str) {
        let void = self.ctx.void_type();
        let ty = void.fn_type(
            &[
                self.i8p().ptr_type(AddressSpace::default()).into(),
                self.i64t().ptr_type(AddressSpace::default()).into(),
                self.i64t().into(),
                self.i64t().into(),
                self.i8p().into(),
            ],
            false,
        );
        let f = self.module.add_function(name, ty, Some(Linkage::External));
        self.add_target_attrs(f);
        let entry = self.ctx.append_basic_block(f, "entry");
        self.b.position_at_end(entry);
        self.func = Some(f);
        self.entry = Some(entry);
        let params = f.get_params();
        self.args = Some(params[0].into_pointer_value());
        let syms_ptr = params[1].into_pointer_value();
        self.syms = (0..self.symbols.len())
            .map(|i| {
                let p = unsafe { self.b.build_in_bounds_gep(syms_ptr, &[self.i64c(i as i64)], "sym.p") }.ok_();
                self.b.build_load(p, &self.symbols[i].clone()).ok_().into_int_value()
            })
            .collect();
        self.begin = Some(params[2].into_int_value());
        self.end = Some(params[3].into_int_value());
        self.scratch = Some(params[4].into_pointer_value());
    }

    pub fn finish_kernel(&mut self) {
        self.b.build_return(None).ok_();
        self.func = None;
    }

    /// An internal helper function with the given signature; the builder is
    /// positioned in its entry block (save and restore around it).
    pub fn begin_helper(
        &mut self,
        name: &str,
        params: &[inkwell::types::BasicMetadataTypeEnum<'ctx>],
    ) -> FunctionValue<'ctx> {
        let ty = self.ctx.void_type().fn_type(params, false);
        let f = self.module.add_function(name, ty, Some(Linkage::Internal));
        self.add_target_attrs(f);
        let entry = self.ctx.append_basic_block(f, "entry");
        self.b.position_at_end(entry);
        self.func = Some(f);
        self.entry = Some(entry);
        f
    }

    /// The value of shape symbol `name` in the current kernel.
    pub fn sym(&self, name: &str) -> Result<IntValue<'ctx>> {
        let i = self.symbols.iter().position(|s| s == name).ok_or_else(|| anyhow!("unknown shape symbol `{name}`"))?;
        Ok(self.syms[i])
    }

    /// A symbolic dim as an i64 value. `Dim` exposes evaluation only, so its
    /// linear coefficients are recovered by evaluating at unit offsets from a
    /// base point large enough to keep every evaluation non-negative.
    pub fn dim(&self, d: &Dim) -> Result<IntValue<'ctx>> {
        if let Some(c) = d.as_const() {
            return Ok(self.i64c(c as i64));
        }
        const BASE: usize = 1 << 20;
        let base: Bindings = self.symbols.iter().map(|s| (s.clone(), BASE)).collect();
        let at_base = d.eval(&base).map_err(|e| anyhow!(e))? as i64;
        let mut konst = at_base;
        let mut acc: Option<IntValue<'ctx>> = None;
        for s in d.symbols() {
            let mut b = base.clone();
            *b.get_mut(s).ok_or_else(|| anyhow!("unknown shape symbol `{s}`"))? += 1;
            let coeff = d.eval(&b).map_err(|e| anyhow!(e))? as i64 - at_base;
            konst -= coeff * BASE as i64;
            let term = self.b.build_int_mul(self.sym(s)?, self.i64c(coeff), "dim.t").ok_();
            acc = Some(match acc {
                Some(a) => self.b.build_int_add(a, term, "dim.s").ok_(),
                None => term,
            });
        }
        let acc = acc.unwrap_or_else(|| self.i64c(0));
        Ok(self.b.build_int_add(acc, self.i64c(konst), "dim").ok_())
    }

    pub fn dims(&self, shape: &[Dim]) -> Result<Vec<IntValue<'ctx>>> {
        shape.iter().map(|d| self.dim(d)).collect()
    }

    pub fn product(&self, xs: &[IntValue<'ctx>]) -> IntValue<'ctx> {
        xs.iter().fold(self.i64c(1), |acc, x| self.mul(acc, *x))
    }

    /// Row-major strides of runtime dims.
    pub fn strides(&self, dims: &[IntValue<'ctx>]) -> Vec<IntValue<'ctx>> {
        let mut s = vec![self.i64c(1); dims.len()];
        for i in (0..dims.len().saturating_sub(1)).rev() {
            s[i] = self.mul(s[i + 1], dims[i + 1]);
        }
        s
    }

    /// Multi-index of flat index `i` over `dims` (row-major).
    pub fn unravel(&self, mut i: IntValue<'ctx>, dims: &[IntValue<'ctx>]) -> Vec<IntValue<'ctx>> {
        let mut idx = vec![self.i64c(0); dims.len()];
        for d in (0..dims.len()).rev() {
            if d == 0 {
                idx[0] = i;
            } else {
                idx[d] = self.b.build_int_signed_rem(i, dims[d], "ur.r").ok_();
                i = self.b.build_int_signed_div(i, dims[d], "ur.q").ok_();
            }
        }
        idx
    }

    // ---- integer arithmetic ----
    pub fn add(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> IntValue<'ctx> {
        self.b.build_int_add(a, b, "").ok_()
    }
    pub fn sub(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> IntValue<'ctx> {
        self.b.build_int_sub(a, b, "").ok_()
    }
    pub fn mul(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> IntValue<'ctx> {
        self.b.build_int_mul(a, b, "").ok_()
    }
    pub fn div(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> IntValue<'ctx> {
        self.b.build_int_signed_div(a, b, "").ok_()
    }
    pub fn rem(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> IntValue<'ctx> {
        self.b.build_int_signed_rem(a, b, "").ok_()
    }
    pub fn lt(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> IntValue<'ctx> {
        self.b.build_int_compare(IntPredicate::SLT, a, b, "").ok_()
    }
    pub fn le(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> IntValue<'ctx> {
        self.b.build_int_compare(IntPredicate::SLE, a, b, "").ok_()
    }
    pub fn eq(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> IntValue<'ctx> {
        self.b.build_int_compare(IntPredicate::EQ, a, b, "").ok_()
    }
    pub fn min(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> IntValue<'ctx> {
        self.b.build_select(self.lt(a, b), a, b, "").ok_().into_int_value()
    }
    pub fn max(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> IntValue<'ctx> {
        self.b.build_select(self.lt(a, b), b, a, "").ok_().into_int_value()
    }
    pub fn select_i(&self, c: IntValue<'ctx>, a: IntValue<'ctx>, b: IntValue<'ctx>) -> IntValue<'ctx> {
        self.b.build_select(c, a, b, "").ok_().into_int_value()
    }

    // ---- control flow ----
    /// `for i in lo..hi step step { body(i) }`.
    pub fn for_range(
        &mut self,
        lo: IntValue<'ctx>,
        hi: IntValue<'ctx>,
        step: i64,
        body: impl FnOnce(&mut Self, IntValue<'ctx>) -> Result<()>,
    ) -> Result<()> {
        let f = self.func.expect("inside a function");
        let pre = self.b.get_insert_block().expect("positioned");
        let head = self.ctx.append_basic_block(f, "loop");
        let body_bb = self.ctx.append_basic_block(f, "body");
        let exit = self.ctx.append_basic_block(f, "exit");
        self.b.build_unconditional_branch(head).ok_();
        self.b.position_at_end(head);
        let i = self.b.build_phi(self.i64t(), "i").ok_();
        i.add_incoming(&[(&lo, pre)]);
        let iv = i.as_basic_value().into_int_value();
        let c = self.lt(iv, hi);
        self.b.build_conditional_branch(c, body_bb, exit).ok_();
        self.b.position_at_end(body_bb);
        body(self, iv)?;
        let next = self.b.build_int_add(iv, self.i64c(step), "i.next").ok_();
        let latch = self.b.get_insert_block().expect("positioned");
        self.b.build_unconditional_branch(head).ok_();
        i.add_incoming(&[(&next, latch)]);
        self.b.position_at_end(exit);
        Ok(())
    }

    /// The kernel's tile loop over `begin..end`.
    pub fn for_tiles(&mut self, body: impl FnOnce(&mut Self, IntValue<'ctx>) -> Result<()>) -> Result<()> {
        let (lo, hi) = (self.begin.expect("kernel"), self.end.expect("kernel"));
        self.for_range(lo, hi, 1, body)
    }

    /// `if cond { then() }`.
    pub fn if_then(&mut self, cond: IntValue<'ctx>, then: impl FnOnce(&mut Self) -> Result<()>) -> Result<()> {
        let f = self.func.expect("inside a function");
        let t = self.ctx.append_basic_block(f, "then");
        let join = self.ctx.append_basic_block(f, "join");
        self.b.build_conditional_branch(cond, t, join).ok_();
        self.b.position_at_end(t);
        then(self)?;
        self.b.build_unconditional_branch(join).ok_();
        self.b.position_at_end(join);
        Ok(())
    }

    /// `if cond { a() } else { b() }`.
    pub fn if_else(
        &mut self,
        cond: IntValue<'ctx>,
        a: impl FnOnce(&mut Self) -> Result<()>,
        b: impl FnOnce(&mut Self) -> Result<()>,
    ) -> Result<()> {
        let f = self.func.expect("inside a function");
        let (ta, tb) = (self.ctx.append_basic_block(f, "then"), self.ctx.append_basic_block(f, "else"));
        let join = self.ctx.append_basic_block(f, "join");
        self.b.build_conditional_branch(cond, ta, tb).ok_();
        self.b.position_at_end(ta);
        a(self)?;
        self.b.build_unconditional_branch(join).ok_();
        self.b.position_at_end(tb);
        b(self)?;
        self.b.build_unconditional_branch(join).ok_();
        self.b.position_at_end(join);
        Ok(())
    }

    /// A stack slot in the entry block (promoted to registers by SROA).
    pub fn alloca<T: BasicType<'ctx>>(&self, ty: T, name: &str) -> PointerValue<'ctx> {
        let entry = self.entry.expect("inside a function");
        let here = self.b.get_insert_block().expect("positioned");
        match entry.get_first_instruction() {
            Some(i) => self.b.position_before(&i),
            None => self.b.position_at_end(entry),
        }
        let p = self.b.build_alloca(ty, name).ok_();
        self.b.position_at_end(here);
        p
    }

    pub fn load_v(&self, p: PointerValue<'ctx>) -> BasicValueEnum<'ctx> {
        self.b.build_load(p, "").ok_()
    }
    pub fn store_v<V: BasicValue<'ctx>>(&self, p: PointerValue<'ctx>, v: V) {
        self.b.build_store(p, v).ok_();
    }

    // ---- buffers ----
    /// Argument `i` as a pointer to its storage element type.
    pub fn arg(&self, i: usize, dtype: DType) -> PointerValue<'ctx> {
        let args = self.args.expect("kernel");
        let p = unsafe { self.b.build_in_bounds_gep(args, &[self.i64c(i as i64)], "arg.p") }.ok_();
        let raw = self.b.build_load(p, "arg").ok_().into_pointer_value();
        self.cast_ptr(raw, dtype)
    }

    pub fn cast_ptr(&self, p: PointerValue<'ctx>, dtype: DType) -> PointerValue<'ctx> {
        let ty = self.elem_type(dtype).ptr_type(AddressSpace::default());
        self.b.build_pointer_cast(p, ty, "").ok_()
    }

    pub fn gep(&self, p: PointerValue<'ctx>, i: IntValue<'ctx>) -> PointerValue<'ctx> {
        unsafe { self.b.build_in_bounds_gep(p, &[i], "") }.ok_()
    }

    /// Load element `i` of a float buffer as f32.
    pub fn load_f(&self, p: PointerValue<'ctx>, i: IntValue<'ctx>, dtype: DType) -> FloatValue<'ctx> {
        let raw = self.b.build_load(self.gep(p, i), "").ok_();
        self.to_f32(raw, dtype).into_float_value()
    }

    /// Load element `i` of an integer buffer as i64.
    pub fn load_i(&self, p: PointerValue<'ctx>, i: IntValue<'ctx>) -> IntValue<'ctx> {
        self.b.build_load(self.gep(p, i), "").ok_().into_int_value()
    }

    pub fn store_f(&self, p: PointerValue<'ctx>, i: IntValue<'ctx>, dtype: DType, v: FloatValue<'ctx>) {
        let raw = self.narrow_f32(v.into(), dtype);
        self.b.build_store(self.gep(p, i), raw).ok_();
    }

    pub fn store_i(&self, p: PointerValue<'ctx>, i: IntValue<'ctx>, v: IntValue<'ctx>) {
        self.b.build_store(self.gep(p, i), v).ok_();
    }

    /// Load `n` consecutive elements from element `i` as an f32 vector.
    pub fn load_vec(&self, p: PointerValue<'ctx>, i: IntValue<'ctx>, dtype: DType, n: u32) -> VectorValue<'ctx> {
        let elem = self.elem_type(dtype);
        let vty = match elem {
            BasicTypeEnum::FloatType(t) => t.vec_type(n),
            BasicTypeEnum::IntType(t) => t.vec_type(n),
            _ => unreachable!("scalar element types"),
        };
        let vp = self.b.build_pointer_cast(self.gep(p, i), vty.ptr_type(AddressSpace::default()), "").ok_();
        let raw = self.b.build_load(vp, "").ok_();
        // Buffers are only element-aligned.
        raw.as_instruction_value().expect("load").set_alignment(dtype.size_bytes() as u32).ok_();
        self.to_f32(raw, dtype).into_vector_value()
    }

    pub fn store_vec(&self, p: PointerValue<'ctx>, i: IntValue<'ctx>, dtype: DType, v: VectorValue<'ctx>) {
        let raw = self.narrow_f32(v.into(), dtype);
        let vp = self.b.build_pointer_cast(self.gep(p, i), raw.get_type().ptr_type(AddressSpace::default()), "").ok_();
        let st = self.b.build_store(vp, raw).ok_();
        st.set_alignment(dtype.size_bytes() as u32).ok_();
    }

    /// Widen stored values (scalar or vector) of `dtype` to f32.
    pub fn to_f32(&self, raw: BasicValueEnum<'ctx>, dtype: DType) -> BasicValueEnum<'ctx> {
        let lanes = match raw {
            BasicValueEnum::VectorValue(v) => Some(v.get_type().get_size()),
            _ => None,
        };
        let f32t: BasicTypeEnum = match lanes {
            Some(n) => self.vec_f32(n).into(),
            None => self.f32t().into(),
        };
        match dtype {
            DType::F32 => raw,
            DType::BF16 => {
                // bf16 is the top half of an f32: zero-extend and shift.
                let (i32t, sixteen): (BasicTypeEnum, BasicValueEnum) = match lanes {
                    Some(n) => (self.i32t().vec_type(n).into(), self.splat_i32(16, n).into()),
                    None => (self.i32t().into(), self.i32t().const_int(16, false).into()),
                };
                let wide = match raw {
                    BasicValueEnum::VectorValue(v) => {
                        self.b.build_int_z_extend(v, i32t.into_vector_type(), "").ok_().as_basic_value_enum()
                    }
                    _ => self
                        .b
                        .build_int_z_extend(raw.into_int_value(), i32t.into_int_type(), "")
                        .ok_()
                        .as_basic_value_enum(),
                };
                let shifted = match wide {
                    BasicValueEnum::VectorValue(v) => {
                        self.b.build_left_shift(v, sixteen.into_vector_value(), "").ok_().as_basic_value_enum()
                    }
                    _ => self
                        .b
                        .build_left_shift(wide.into_int_value(), sixteen.into_int_value(), "")
                        .ok_()
                        .as_basic_value_enum(),
                };
                self.b.build_bit_cast(shifted, f32t, "").ok_()
            }
            DType::F16 => match raw {
                BasicValueEnum::VectorValue(v) => {
                    self.b.build_float_ext(v, f32t.into_vector_type(), "").ok_().as_basic_value_enum()
                }
                _ => self.b.build_float_ext(raw.into_float_value(), self.f32t(), "").ok_().as_basic_value_enum(),
            },
            other => panic!("to_f32 of a {other} buffer"),
        }
    }

    /// Narrow f32 values (scalar or vector) to storage `dtype`, rounding to
    /// nearest even like the `half` crate.
    pub fn narrow_f32(&self, v: BasicValueEnum<'ctx>, dtype: DType) -> BasicValueEnum<'ctx> {
        match dtype {
            DType::F32 => v,
            DType::F16 => match v {
                BasicValueEnum::VectorValue(x) => {
                    let t = self.ctx.f16_type().vec_type(x.get_type().get_size());
                    self.b.build_float_trunc(x, t, "").ok_().as_basic_value_enum()
                }
                _ => self.b.build_float_trunc(v.into_float_value(), self.ctx.f16_type(), "").ok_().into(),
            },
            DType::BF16 => {
                assert!(!v.is_vector_value(), "bf16 vector stores are not used");
                let bits = self.b.build_bit_cast(v, self.i32t(), "").ok_().into_int_value();
                let c = |x: u64| self.i32t().const_int(x, false);
                let lsb = self.b.build_and(self.b.build_right_shift(bits, c(16), false, "").ok_(), c(1), "").ok_();
                let rounded = self.b.build_int_add(bits, self.b.build_int_add(c(0x7FFF), lsb, "").ok_(), "").ok_();
                let top = self.b.build_right_shift(rounded, c(16), false, "").ok_();
                let quiet = self.b.build_or(self.b.build_right_shift(bits, c(16), false, "").ok_(), c(0x40), "").ok_();
                let abs = self.b.build_and(bits, c(0x7FFF_FFFF), "").ok_();
                let nan = self.b.build_int_compare(IntPredicate::UGT, abs, c(0x7F80_0000), "").ok_();
                let r = self.b.build_select(nan, quiet, top, "").ok_().into_int_value();
                self.b.build_int_truncate(r, self.ctx.i16_type(), "").ok_().into()
            }
            other => panic!("from_f32 to a {other} buffer"),
        }
    }

    /// Prefetch the cache line at `p` for reading (a hint: never faults)
    /// into every cache level (`prefetcht0`), also for data read once: on
    /// the Sapphire Rapids-class cores this was tuned on, a weight stream
    /// prefetched non-temporally (`prefetchnta`, locality 0) ran at about
    /// 0.6-0.7 of the bandwidth it reaches with `prefetcht0`, as NTA fills
    /// bypass the L2 whose streamer keeps the DRAM requests in flight.
    pub fn prefetch(&self, p: PointerValue<'ctx>) {
        self.prefetch_with(p, 3)
    }

    /// [`Cg::prefetch`] with LLVM's temporal `locality` (0 = streamed once,
    /// 3 = keep in every cache level, for data read again soon).
    pub fn prefetch_with(&self, p: PointerValue<'ctx>, locality: u64) {
        let i8p = self.b.build_pointer_cast(p, self.i8p(), "").ok_();
        let f = Intrinsic::find("llvm.prefetch")
            .and_then(|i| i.get_declaration(&self.module, &[self.i8p().into()]))
            .expect("llvm.prefetch");
        let (rw, locality, data) =
            (self.i32t().const_zero(), self.i32t().const_int(locality, false), self.i32t().const_int(1, false));
        self.b.build_call(f, &[i8p.into(), rw.into(), locality.into(), data.into()], "").ok_();
    }

    // ---- vectors ----
    pub fn splat_i32(&self, x: u64, n: u32) -> VectorValue<'ctx> {
        let c: Vec<IntValue> = (0..n).map(|_| self.i32t().const_int(x, false)).collect();
        VectorType::const_vector(&c)
    }

    /// Broadcast a scalar f32 to `n` lanes.
    pub fn splat(&self, x: FloatValue<'ctx>, n: u32) -> VectorValue<'ctx> {
        let undef = self.vec_f32(n).get_undef();
        let one = self.b.build_insert_element(undef, x, self.i32t().const_zero(), "").ok_();
        let zeros = self.i32t().vec_type(n).const_zero();
        self.b.build_shuffle_vector(one, undef, zeros, "splat").ok_()
    }

    pub fn zeros(&self, n: u32) -> VectorValue<'ctx> {
        self.vec_f32(n).const_zero()
    }

    pub fn lane(&self, v: VectorValue<'ctx>, i: u32) -> FloatValue<'ctx> {
        self.b.build_extract_element(v, self.i32t().const_int(i as u64, false), "").ok_().into_float_value()
    }

    /// Lanes `start..start+n` of `v`.
    pub fn lanes(&self, v: VectorValue<'ctx>, start: u32, n: u32) -> VectorValue<'ctx> {
        let mask: Vec<IntValue> = (start..start + n).map(|i| self.i32t().const_int(i as u64, false)).collect();
        self.b.build_shuffle_vector(v, v.get_type().get_undef(), VectorType::const_vector(&mask), "").ok_()
    }

    // ---- float math (scalar or vector, same semantics as the reference) ----
    pub fn fadd(&self, a: F<'ctx>, b: F<'ctx>) -> F<'ctx> {
        match (a, b) {
            (BasicValueEnum::VectorValue(x), BasicValueEnum::VectorValue(y)) => {
                self.b.build_float_add(x, y, "").ok_().into()
            }
            _ => self.b.build_float_add(a.into_float_value(), b.into_float_value(), "").ok_().into(),
        }
    }
    pub fn fsub(&self, a: F<'ctx>, b: F<'ctx>) -> F<'ctx> {
        match (a, b) {
            (BasicValueEnum::VectorValue(x), BasicValueEnum::VectorValue(y)) => {
                self.b.build_float_sub(x, y, "").ok_().into()
            }
            _ => self.b.build_float_sub(a.into_float_value(), b.into_float_value(), "").ok_().into(),
        }
    }
    pub fn fmul(&self, a: F<'ctx>, b: F<'ctx>) -> F<'ctx> {
        match (a, b) {
            (BasicValueEnum::VectorValue(x), BasicValueEnum::VectorValue(y)) => {
                self.b.build_float_mul(x, y, "").ok_().into()
            }
            _ => self.b.build_float_mul(a.into_float_value(), b.into_float_value(), "").ok_().into(),
        }
    }
    pub fn fdiv(&self, a: F<'ctx>, b: F<'ctx>) -> F<'ctx> {
        match (a, b) {
            (BasicValueEnum::VectorValue(x), BasicValueEnum::VectorValue(y)) => {
                self.b.build_float_div(x, y, "").ok_().into()
            }
            _ => self.b.build_float_div(a.into_float_value(), b.into_float_value(), "").ok_().into(),
        }
    }
    pub fn fneg(&self, a: F<'ctx>) -> F<'ctx> {
        match a {
            BasicValueEnum::VectorValue(x) => self.b.build_float_neg(x, "").ok_().into(),
            _ => self.b.build_float_neg(a.into_float_value(), "").ok_().into(),
        }
    }
    /// A constant of `a`'s shape.
    pub fn fconst_like(&self, a: F<'ctx>, c: f32) -> F<'ctx> {
        match a {
            BasicValueEnum::VectorValue(x) => self.splat(self.f32c(c), x.get_type().get_size()).into(),
            _ => self.f32c(c).into(),
        }
    }

    /// Call an overloaded LLVM intrinsic on values of `a`'s type.
    pub fn intrinsic(&self, name: &str, args: &[F<'ctx>]) -> F<'ctx> {
        let i = Intrinsic::find(name).unwrap_or_else(|| panic!("intrinsic {name}"));
        let f = i.get_declaration(&self.module, &[args[0].get_type()]).unwrap_or_else(|| panic!("declare {name}"));
        let a: Vec<BasicMetadataValueEnum> = args.iter().map(|x| (*x).into()).collect();
        self.b.build_call(f, &a, "").ok_().try_as_basic_value().basic().expect("intrinsic returns a value")
    }

    pub fn exp(&self, a: F<'ctx>) -> F<'ctx> {
        self.intrinsic("llvm.exp", &[a])
    }
    pub fn sqrt(&self, a: F<'ctx>) -> F<'ctx> {
        self.intrinsic("llvm.sqrt", &[a])
    }
    /// `f32::max` semantics (NaN loses).
    pub fn fmax(&self, a: F<'ctx>, b: F<'ctx>) -> F<'ctx> {
        self.intrinsic("llvm.maxnum", &[a, b])
    }
    /// `1 / (1 + exp(-x))`, the reference sigmoid.
    pub fn sigmoid(&self, x: F<'ctx>) -> F<'ctx> {
        let one = self.fconst_like(x, 1.0);
        let e = self.exp(self.fneg(x));
        self.fdiv(one, self.fadd(one, e))
    }

    pub fn fcmp(&self, p: FloatPredicate, a: FloatValue<'ctx>, b: FloatValue<'ctx>) -> IntValue<'ctx> {
        self.b.build_float_compare(p, a, b, "").ok_()
    }
    pub fn select_f(&self, c: IntValue<'ctx>, a: FloatValue<'ctx>, b: FloatValue<'ctx>) -> FloatValue<'ctx> {
        self.b.build_select(c, a, b, "").ok_().into_float_value()
    }
}
