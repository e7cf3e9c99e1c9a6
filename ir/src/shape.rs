//! Symbolic shapes.
//!
//! A dimension is a linear form over named symbols plus a constant, e.g.
//! `5120`, `tokens`, or `past+tokens`. The graph IR's symbols:
//!
//! * `tokens`: the number of new tokens of one call. In the per-sequence
//!   contract (`panguc_ir::session`) that is one sequence's new tokens (the
//!   prompt length at prefill, 1 at decode); in a ragged batch step
//!   (`panguc_ir::batch`) it is the total over all sequences of the step.
//! * `past`: the number of tokens already in that sequence's contiguous KV
//!   cache (per-sequence contract only). The attention context length
//!   (`kv_len`) is the derived dimension `past+tokens`.
//! * `seqs`: sequences in a batch step; `query_start_loc` is `[seqs+1]`.
//! * `max_blocks`: width of a batch step's block table (`[seqs, max_blocks]`).
//! * `num_blocks`: blocks of the paged KV cache
//!   (`[num_blocks, block_size, kv_heads, head_dim]` per layer). The block
//!   size is a constant of the program, not a symbol.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

pub const SYM_TOKENS: &str = "tokens";
pub const SYM_PAST: &str = "past";
pub const SYM_SEQS: &str = "seqs";
pub const SYM_MAX_BLOCKS: &str = "max_blocks";
pub const SYM_NUM_BLOCKS: &str = "num_blocks";

/// One dimension: `konst + sum(coeff * symbol)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Dim {
    konst: i64,
    /// Symbol name -> coefficient; never holds a zero coefficient.
    terms: BTreeMap<String, i64>,
}

impl Dim {
    pub fn c(n: usize) -> Dim {
        Dim { konst: n as i64, terms: BTreeMap::new() }
    }

    pub fn sym(name: &str) -> Dim {
        Dim { konst: 0, terms: BTreeMap::from([(name.to_string(), 1)]) }
    }

    pub fn tokens() -> Dim {
        Dim::sym(SYM_TOKENS)
    }

    pub fn past() -> Dim {
        Dim::sym(SYM_PAST)
    }

    pub fn seqs() -> Dim {
        Dim::sym(SYM_SEQS)
    }

    pub fn max_blocks() -> Dim {
        Dim::sym(SYM_MAX_BLOCKS)
    }

    pub fn num_blocks() -> Dim {
        Dim::sym(SYM_NUM_BLOCKS)
    }

    /// `past+tokens`, the attention context length.
    pub fn kv_len() -> Dim {
        Dim::past().add(&Dim::tokens())
    }

    pub fn as_const(&self) -> Option<usize> {
        if self.terms.is_empty() && self.konst >= 0 {
            Some(self.konst as usize)
        } else {
            None
        }
    }

    pub fn is_const(&self) -> bool {
        self.terms.is_empty()
    }

    pub fn symbols(&self) -> impl Iterator<Item = &str> {
        self.terms.keys().map(String::as_str)
    }

    pub fn add(&self, other: &Dim) -> Dim {
        let mut out = self.clone();
        out.konst += other.konst;
        for (s, c) in &other.terms {
            *out.terms.entry(s.clone()).or_insert(0) += c;
        }
        out.terms.retain(|_, c| *c != 0);
        out
    }

    pub fn scale(&self, k: i64) -> Dim {
        if k == 0 {
            return Dim::c(0);
        }
        Dim { konst: self.konst * k, terms: self.terms.iter().map(|(s, c)| (s.clone(), c * k)).collect() }
    }

    /// Product of two dims; defined when at least one side is constant.
    pub fn mul(&self, other: &Dim) -> Option<Dim> {
        match (self.as_const_i64(), other.as_const_i64()) {
            (Some(a), _) => Some(other.scale(a)),
            (_, Some(b)) => Some(self.scale(b)),
            _ => None,
        }
    }

    /// Exact division by a constant (every coefficient must divide).
    pub fn div_exact(&self, k: usize) -> Option<Dim> {
        let k = k as i64;
        if k == 0 || self.konst % k != 0 || self.terms.values().any(|c| c % k != 0) {
            return None;
        }
        Some(Dim { konst: self.konst / k, terms: self.terms.iter().map(|(s, c)| (s.clone(), c / k)).collect() })
    }

    fn as_const_i64(&self) -> Option<i64> {
        self.terms.is_empty().then_some(self.konst)
    }

    /// Evaluate under concrete symbol values.
    pub fn eval(&self, bindings: &Bindings) -> Result<usize, String> {
        let mut v = self.konst;
        for (s, c) in &self.terms {
            let x = bindings.get(s).ok_or_else(|| format!("symbol `{s}` has no value"))?;
            v += c * (*x as i64);
        }
        usize::try_from(v).map_err(|_| format!("dimension `{self}` evaluates to {v} < 0"))
    }

    /// Parse `64`, `tokens`, `past+tokens`, `2*tokens`, `tokens-1`.
    pub fn parse(text: &str) -> Result<Dim, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("empty dimension".into());
        }
        let mut out = Dim::c(0);
        let mut rest = text;
        let mut sign = 1i64;
        if let Some(r) = rest.strip_prefix('-') {
            sign = -1;
            rest = r;
        }
        loop {
            let end = rest.find(['+', '-']).unwrap_or(rest.len());
            let term = rest[..end].trim();
            out = out.add(&parse_term(term)?.scale(sign));
            if end == rest.len() {
                break;
            }
            sign = if rest.as_bytes()[end] == b'+' { 1 } else { -1 };
            rest = &rest[end + 1..];
        }
        Ok(out)
    }
}

fn parse_term(term: &str) -> Result<Dim, String> {
    let (coeff, name) = match term.split_once('*') {
        Some((c, n)) => (c.trim().parse::<i64>().map_err(|_| format!("bad coefficient in `{term}`"))?, n.trim()),
        None => (1, term),
    };
    if let Ok(n) = name.parse::<i64>() {
        return Ok(Dim { konst: n * coeff, terms: BTreeMap::new() });
    }
    let valid = !name.is_empty()
        && name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(format!("bad dimension term `{term}`"));
    }
    Ok(Dim::sym(name).scale(coeff))
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (s, c) in &self.terms {
            let sign = if *c < 0 {
                "-"
            } else if first {
                ""
            } else {
                "+"
            };
            let mag = c.abs();
            if mag == 1 {
                write!(f, "{sign}{s}")?;
            } else {
                write!(f, "{sign}{mag}*{s}")?;
            }
            first = false;
        }
        if first {
            write!(f, "{}", self.konst)
        } else if self.konst > 0 {
            write!(f, "+{}", self.konst)
        } else if self.konst < 0 {
            write!(f, "-{}", -self.konst)
        } else {
            Ok(())
        }
    }
}

impl From<usize> for Dim {
    fn from(n: usize) -> Dim {
        Dim::c(n)
    }
}

/// Concrete values for the shape symbols of one call.
pub type Bindings = BTreeMap<String, usize>;

pub fn bindings(tokens: usize, past: usize) -> Bindings {
    Bindings::from([(SYM_TOKENS.to_string(), tokens), (SYM_PAST.to_string(), past)])
}

/// Element type plus symbolic shape of an IR value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TensorType {
    pub dtype: crate::DType,
    pub shape: Vec<Dim>,
}

impl TensorType {
    pub fn new(dtype: crate::DType, shape: Vec<Dim>) -> Self {
        TensorType { dtype, shape }
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn concrete_shape(&self, b: &Bindings) -> Result<Vec<usize>, String> {
        self.shape.iter().map(|d| d.eval(b)).collect()
    }

    /// Shape if every dimension is constant.
    pub fn static_shape(&self) -> Option<Vec<usize>> {
        self.shape.iter().map(Dim::as_const).collect()
    }

    /// Number of elements as a symbolic dim, when it is linear.
    pub fn numel(&self) -> Option<Dim> {
        self.shape.iter().try_fold(Dim::c(1), |acc, d| acc.mul(d))
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[", self.dtype)?;
        for (i, d) in self.shape.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

/// Shorthand for building shapes: `shape![tokens, 64]` style helpers.
pub fn dims(ds: &[Dim]) -> Vec<Dim> {
    ds.to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dim_display_and_parse_round_trip() {
        for text in ["64", "tokens", "past+tokens", "2*tokens", "tokens-1", "0", "5*past+3*tokens+7"] {
            let d = Dim::parse(text).unwrap();
            assert_eq!(Dim::parse(&d.to_string()).unwrap(), d, "{text}");
        }
        assert_eq!(Dim::kv_len().to_string(), "past+tokens");
        assert_eq!(Dim::seqs().add(&Dim::c(1)).to_string(), "seqs+1");
        assert_eq!(Dim::parse("max_blocks").unwrap(), Dim::max_blocks());
        assert_eq!(Dim::parse("num_blocks").unwrap(), Dim::num_blocks());
    }

    #[test]
    fn dim_arithmetic() {
        let t = Dim::tokens();
        assert_eq!(t.mul(&Dim::c(5)).unwrap().to_string(), "5*tokens");
        assert!(t.mul(&Dim::past()).is_none());
        assert_eq!(t.scale(8).div_exact(4).unwrap().to_string(), "2*tokens");
        assert!(t.div_exact(2).is_none());
        assert_eq!(Dim::kv_len().eval(&bindings(3, 4)).unwrap(), 7);
        assert!(Dim::parse("tokens-10").unwrap().eval(&bindings(3, 0)).is_err());
        assert!(Dim::parse("to!ken").is_err());
    }
}
