//! Tiling formulas over the run-time sizes, evaluated in Rust (sim engine)
//! and printed as C++ (the generated host tiling functions), so host and
//! simulation compute identical tilings.

use anyhow::{bail, Result};
use panguc_ir::shape::{bindings, Dim};

/// Run-time sizes a tiling depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Env {
    /// New tokens of this call.
    pub tokens: u64,
    /// Tokens already in the KV cache.
    pub past: u64,
    /// Cores available for the kernel's unit (vector or cube).
    pub core_num: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TExpr {
    C(u64),
    Tokens,
    Past,
    CoreNum,
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

    /// A shape dimension: constants, `tokens`, `past + tokens`.
    pub fn from_dim(d: &Dim) -> Result<TExpr> {
        if let Some(c) = d.as_const() {
            return Ok(TExpr::c(c as u64));
        }
        // Dims are linear in the symbols: recover coefficients by evaluation.
        let at = |t: usize, p: usize| d.eval(&bindings(t, p)).map(|v| v as i64).map_err(|e| anyhow::anyhow!(e));
        let base = at(0, 0)?;
        let ct = at(1, 0)? - base;
        let cp = at(0, 1)? - base;
        if base < 0 || ct < 0 || cp < 0 {
            bail!("dimension `{d}` has negative coefficients");
        }
        let mut e = TExpr::c(base as u64);
        if ct > 0 {
            e = e.plus(TExpr::c(ct as u64).times(TExpr::Tokens));
        }
        if cp > 0 {
            e = e.plus(TExpr::c(cp as u64).times(TExpr::Past));
        }
        Ok(e)
    }

    pub fn eval(&self, env: &Env) -> Result<u64> {
        Ok(match self {
            TExpr::C(v) => *v,
            TExpr::Tokens => env.tokens,
            TExpr::Past => env.past,
            TExpr::CoreNum => env.core_num,
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
        self.eval(&Env { tokens: max_tokens, past: max_kv.saturating_sub(max_tokens), core_num })
    }

    /// C++ over `uint64_t tokens, past, coreNum` and `CeilDiv`.
    pub fn to_cpp(&self) -> String {
        match self {
            TExpr::C(v) => format!("{v}ULL"),
            TExpr::Tokens => "tokens".into(),
            TExpr::Past => "past".into(),
            TExpr::CoreNum => "coreNum".into(),
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
        let env = Env { tokens: 7, past: 5, core_num: 4 };
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
