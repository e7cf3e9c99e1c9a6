//! Tiling formulas over the run-time sizes, evaluated in Rust (sim engine)
//! and printed as C++ (the generated host tiling functions), so host and
//! simulation compute identical tilings.

use anyhow::{bail, Result};
use panguc_ir::shape::{Bindings, Dim, SYM_MAX_BLOCKS, SYM_NUM_BLOCKS, SYM_PAST, SYM_SEQS, SYM_TOKENS};

/// Run-time sizes a tiling depends on. The paged-cache sizes (`seqs`,
/// `max_blocks`, `num_blocks`) are zero for a contiguous-cache program.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Env {
    /// New tokens of this call.
    pub tokens: u64,
    /// Tokens already in the KV cache.
    pub past: u64,
    /// Cores available for the kernel's unit (vector or cube).
    pub core_num: u64,
    /// Sequences of a ragged step.
    pub seqs: u64,
    /// Columns of the step's block table.
    pub max_blocks: u64,
    /// Blocks of the paged KV cache.
    pub num_blocks: u64,
}

impl Env {
    /// A contiguous-cache call: `tokens` new tokens after `past`.
    pub fn new(tokens: u64, past: u64, core_num: u64) -> Env {
        Env { tokens, past, core_num, ..Env::default() }
    }

    /// The program's shape symbols bound to this call's sizes.
    pub fn bindings(&self) -> Bindings {
        [
            (SYM_TOKENS, self.tokens),
            (SYM_PAST, self.past),
            (SYM_SEQS, self.seqs),
            (SYM_MAX_BLOCKS, self.max_blocks),
            (SYM_NUM_BLOCKS, self.num_blocks),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v as usize))
        .collect()
    }
}

/// The shape symbols a formula may use, with their [`TExpr`] leaf.
fn symbol_leaves() -> [(&'static str, TExpr); 5] {
    [
        (SYM_TOKENS, TExpr::Tokens),
        (SYM_PAST, TExpr::Past),
        (SYM_SEQS, TExpr::Seqs),
        (SYM_MAX_BLOCKS, TExpr::MaxBlocks),
        (SYM_NUM_BLOCKS, TExpr::NumBlocks),
    ]
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TExpr {
    C(u64),
    Tokens,
    Past,
    CoreNum,
    Seqs,
    MaxBlocks,
    NumBlocks,
    Add(Box<TExpr>, Box<TExpr>),
    Mul(Box<TExpr>, Box<TExpr>),
    CeilDiv(Box<TExpr>, Box<TExpr>),
    Min(Box<TExpr>, Box<TExpr>),
    Max(Box<TExpr>, Box<TExpr>),
}

impl TExpr {
    pub fn c(v: u64) -> TExpr {
        TExpr::C(v)
    }
    pub fn kv() -> TExpr {
        TExpr::Past.plus(TExpr::Tokens)
    }
    pub fn plus(self, o: TExpr) -> TExpr {
        match (&self, &o) {
            (TExpr::C(a), TExpr::C(b)) => TExpr::C(a + b),
            (TExpr::C(0), _) => o,
            (_, TExpr::C(0)) => self,
            _ => TExpr::Add(Box::new(self), Box::new(o)),
        }
    }
    pub fn times(self, o: TExpr) -> TExpr {
        match (&self, &o) {
            (TExpr::C(a), TExpr::C(b)) => TExpr::C(a * b),
            (TExpr::C(1), _) => o,
            (_, TExpr::C(1)) => self,
            _ => TExpr::Mul(Box::new(self), Box::new(o)),
        }
    }
    pub fn ceil_div(self, o: TExpr) -> TExpr {
        match (&self, &o) {
            (TExpr::C(a), TExpr::C(b)) if *b > 0 => TExpr::C(a.div_ceil(*b)),
            (_, TExpr::C(1)) => self,
            _ => TExpr::CeilDiv(Box::new(self), Box::new(o)),
        }
    }
    pub fn min(self, o: TExpr) -> TExpr {
        match (&self, &o) {
            (TExpr::C(a), TExpr::C(b)) => TExpr::C(*a.min(b)),
            _ => TExpr::Min(Box::new(self), Box::new(o)),
        }
    }
    pub fn max(self, o: TExpr) -> TExpr {
        match (&self, &o) {
            (TExpr::C(a), TExpr::C(b)) => TExpr::C(*a.max(b)),
            _ => TExpr::Max(Box::new(self), Box::new(o)),
        }
    }

    /// `blockDim = max(1, min(tiles, coreNum))`.
    pub fn block_dim(tiles: &TExpr) -> TExpr {
        tiles.clone().min(TExpr::CoreNum).max(TExpr::c(1))
    }
    /// `ceil(tiles / blockDim)`: contiguous tiles per block.
    pub fn per_core(tiles: &TExpr) -> TExpr {
        tiles.clone().ceil_div(TExpr::block_dim(tiles))
    }

    /// A shape dimension: a constant plus non-negative multiples of the
    /// shape symbols (`tokens`, `past + tokens`, `seqs + 1`, `num_blocks`).
    pub fn from_dim(d: &Dim) -> Result<TExpr> {
        if let Some(c) = d.as_const() {
            return Ok(TExpr::c(c as u64));
        }
        if let Some(s) = d.symbols().find(|s| !symbol_leaves().iter().any(|(n, _)| n == s)) {
            bail!("dimension `{d}` uses the shape symbol `{s}`, which tilings cannot evaluate");
        }
        // Dims are linear in the symbols: recover coefficients by evaluation.
        let at = |one: Option<&str>| {
            let b: Bindings =
                symbol_leaves().iter().map(|(n, _)| (n.to_string(), usize::from(Some(*n) == one))).collect();
            d.eval(&b).map(|v| v as i64).map_err(|e| anyhow::anyhow!(e))
        };
        let base = at(None)?;
        if base < 0 {
            bail!("dimension `{d}` has negative coefficients");
        }
        let mut e = TExpr::c(base as u64);
        for (name, leaf) in symbol_leaves() {
            let c = at(Some(name))? - base;
            if c < 0 {
                bail!("dimension `{d}` has negative coefficients");
            }
            if c > 0 {
                e = e.plus(TExpr::c(c as u64).times(leaf));
            }
        }
        Ok(e)
    }

    pub fn eval(&self, env: &Env) -> Result<u64> {
        Ok(match self {
            TExpr::C(v) => *v,
            TExpr::Tokens => env.tokens,
            TExpr::Past => env.past,
            TExpr::CoreNum => env.core_num,
            TExpr::Seqs => env.seqs,
            TExpr::MaxBlocks => env.max_blocks,
            TExpr::NumBlocks => env.num_blocks,
            TExpr::Add(a, b) => a.eval(env)? + b.eval(env)?,
            TExpr::Mul(a, b) => a.eval(env)? * b.eval(env)?,
            TExpr::CeilDiv(a, b) => {
                let d = b.eval(env)?;
                if d == 0 {
                    bail!("division by zero in tiling formula {}", self.to_cpp());
                }
                a.eval(env)?.div_ceil(d)
            }
            TExpr::Min(a, b) => a.eval(env)?.min(b.eval(env)?),
            TExpr::Max(a, b) => a.eval(env)?.max(b.eval(env)?),
        })
    }

    /// Largest value for `tokens <= max_tokens`, `past + tokens <= max_kv`
    /// (every formula is monotone in the sizes).
    pub fn worst(&self, max_tokens: u64, max_kv: u64, core_num: u64) -> Result<u64> {
        self.eval(&Env::new(max_tokens, max_kv.saturating_sub(max_tokens), core_num))
    }

    /// C++ over `uint64_t tokens, past, coreNum` (and `seqs, maxBlocks,
    /// numBlocks` for paged-cache kernels) and `CeilDiv`.
    pub fn to_cpp(&self) -> String {
        match self {
            TExpr::C(v) => format!("{v}ULL"),
            TExpr::Tokens => "tokens".into(),
            TExpr::Past => "past".into(),
            TExpr::CoreNum => "coreNum".into(),
            TExpr::Seqs => "seqs".into(),
            TExpr::MaxBlocks => "maxBlocks".into(),
            TExpr::NumBlocks => "numBlocks".into(),
            TExpr::Add(a, b) => format!("({} + {})", a.to_cpp(), b.to_cpp()),
            TExpr::Mul(a, b) => format!("({} * {})", a.to_cpp(), b.to_cpp()),
            TExpr::CeilDiv(a, b) => format!("CeilDiv({}, {})", a.to_cpp(), b.to_cpp()),
            TExpr::Min(a, b) => format!("std::min<uint64_t>({}, {})", a.to_cpp(), b.to_cpp()),
            TExpr::Max(a, b) => format!("std::max<uint64_t>({}, {})", a.to_cpp(), b.to_cpp()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dims_and_formulas() {
        let kv = TExpr::from_dim(&Dim::kv_len()).unwrap();
        let env = Env::new(7, 5, 4);
        assert_eq!(kv.eval(&env).unwrap(), 12);
        let tiles = TExpr::Tokens.times(TExpr::c(3));
        assert_eq!(TExpr::block_dim(&tiles).eval(&env).unwrap(), 4);
        assert_eq!(TExpr::per_core(&tiles).eval(&env).unwrap(), 6);
        assert_eq!(
            TExpr::per_core(&tiles).to_cpp(),
            "CeilDiv((tokens * 3ULL), std::max<uint64_t>(std::min<uint64_t>((tokens * 3ULL), coreNum), 1ULL))"
        );
    }
}
