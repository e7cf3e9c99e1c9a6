//! Named fusion rules.
//!
//! A rule is a searcher (an egg pattern, or a multi-pattern for rules that
//! merge several independent matches) plus a custom applier. The applier
//! holds the rule's guards (shapes, attributes, weight-only operands,
//! canonical ordering) and builds the fused nodes through [`Cx::add`], which
//! only adds nodes that type-check and records which rule introduced them.
//! Keeping guards in appliers, not in extra patterns, is what keeps the
//! e-graph small.

mod attention;
mod elementwise;
mod linear;
mod moe;
mod norm;

use crate::analysis::TensorAnalysis;
use crate::analysis::{infer_node, EG};
use crate::lang::{has_attr_leaf, op_node, OpAttr, TLang};
use egg::{Applier, Id, MultiPattern, Pattern, PatternAst, Rewrite, Searcher, Subst, Symbol, Var};
use panguc_ir::{Op, TensorType};

pub use elementwise::{ChainSearcher, MAX_CHAIN_OPERANDS, MAX_CHAIN_OPS};

/// What a rule's applier computes: pairs of classes to union, or `None`
/// when a guard rejects the match.
pub type ApplyFn = fn(&mut Cx) -> Option<Vec<(Id, Id)>>;

/// One named rule: one or more rewrites sharing a name and an applier.
pub struct Rule {
    pub name: &'static str,
    /// One line: the pattern and what it becomes.
    pub summary: &'static str,
    pub rewrites: Vec<Rewrite<TLang, TensorAnalysis>>,
}

impl Rule {
    /// A rule searched by one or more single patterns (variants of the same
    /// shape of graph), rewrites named `name`, `name/2`, ...
    pub fn patterns(name: &'static str, summary: &'static str, patterns: &[&str], apply: ApplyFn) -> Rule {
        let rewrites = patterns
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let pat: Pattern<TLang> = p.parse().unwrap_or_else(|e| panic!("rule {name}: bad pattern {p}: {e}"));
                Rewrite::new(variant_name(name, i), pat, Fuse { rule: name, apply })
                    .unwrap_or_else(|e| panic!("rule {name}: {e}"))
            })
            .collect();
        Rule { name, summary, rewrites }
    }

    /// A rule searched by a multi-pattern `?a = (...), ?b = (...)`: the
    /// matches of all clauses share one substitution.
    pub fn multi(name: &'static str, summary: &'static str, pattern: &str, apply: ApplyFn) -> Rule {
        let pat: MultiPattern<TLang> =
            pattern.parse().unwrap_or_else(|e| panic!("rule {name}: bad multi-pattern {pattern}: {e:?}"));
        let rw = Rewrite::new(name, pat, Fuse { rule: name, apply }).unwrap_or_else(|e| panic!("rule {name}: {e}"));
        Rule { name, summary, rewrites: vec![rw] }
    }

    /// A rule with a hand-written searcher.
    pub fn custom(
        name: &'static str,
        summary: &'static str,
        searcher: impl Searcher<TLang, TensorAnalysis> + Send + Sync + 'static,
        apply: ApplyFn,
    ) -> Rule {
        let rw =
            Rewrite::new(name, searcher, Fuse { rule: name, apply }).unwrap_or_else(|e| panic!("rule {name}: {e}"));
        Rule { name, summary, rewrites: vec![rw] }
    }
}

fn variant_name(name: &str, i: usize) -> String {
    if i == 0 {
        name.to_string()
    } else {
        format!("{name}/{}", i + 1)
    }
}

/// Every fusion rule, in the order they are listed in reports.
pub fn all_rules() -> Vec<Rule> {
    let mut rules = vec![];
    rules.extend(norm::rules());
    rules.extend(linear::rules());
    rules.extend(attention::rules());
    rules.extend(moe::rules());
    rules.extend(elementwise::rules());
    rules
}

/// (name, one-line summary) of every rule, for documentation and `--help`.
pub fn rule_summaries() -> Vec<(&'static str, &'static str)> {
    all_rules().iter().map(|r| (r.name, r.summary)).collect()
}

/// The rules named in `names` (all when `None`); an unknown name is an
/// error listing the known ones.
pub fn select_rules(names: Option<&[String]>) -> Result<Vec<Rule>, String> {
    let all = all_rules();
    let Some(names) = names else { return Ok(all) };
    let known: Vec<&str> = all.iter().map(|r| r.name).collect();
    if let Some(bad) = names.iter().find(|n| !known.contains(&n.as_str())) {
        return Err(format!("unknown rule `{bad}` (known rules: {})", known.join(", ")));
    }
    Ok(all.into_iter().filter(|r| names.iter().any(|n| n == r.name)).collect())
}

/// The applier shared by every rule.
pub struct Fuse {
    pub rule: &'static str,
    pub apply: ApplyFn,
}

impl Applier<TLang, TensorAnalysis> for Fuse {
    fn apply_one(
        &self,
        eg: &mut EG,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<TLang>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let mut cx = Cx { eg, subst, root: eclass, rule: self.rule };
        let Some(pairs) = (self.apply)(&mut cx) else { return vec![] };
        union_pairs(eg, self.rule, pairs)
    }
}

/// Merge what a rule's applier proved equal and count the rule as fired
/// when anything changed; returns the changed classes (egg's contract).
pub(crate) fn union_pairs(eg: &mut EG, rule: &'static str, pairs: Vec<(Id, Id)>) -> Vec<Id> {
    let mut changed = vec![];
    for (a, b) in pairs {
        // Safety net: a rule may only equate values of identical type.
        if eg[a].data.tys != eg[b].data.tys {
            debug_assert!(false, "rule {rule} tried to merge {:?} with {:?}", eg[a].data.tys, eg[b].data.tys);
            continue;
        }
        if eg.union(a, b) {
            changed.push(a);
        }
    }
    if !changed.is_empty() {
        *eg.analysis.fired.entry(rule).or_default() += 1;
    }
    changed
}

/// What an applier sees: the e-graph, the match, and helpers for guards.
pub struct Cx<'a> {
    pub eg: &'a mut EG,
    pub subst: &'a Subst,
    /// The matched class (the first clause's class for a multi-pattern).
    pub root: Id,
    pub rule: &'static str,
}

impl Cx<'_> {
    /// The class bound to pattern variable `name` (e.g. `"?x"`).
    pub fn var(&self, name: &str) -> Id {
        let v: Var = name.parse().unwrap_or_else(|e| panic!("bad variable {name}: {e}"));
        *self.subst.get(v).unwrap_or_else(|| panic!("rule {}: {name} is not bound by its pattern", self.rule))
    }

    /// Type of a tensor class.
    pub fn ty(&self, id: Id) -> Option<TensorType> {
        self.eg[id].data.ty().cloned()
    }

    /// The op stored in an attribute leaf class.
    pub fn attr(&self, id: Id) -> Option<Op> {
        self.eg[id].data.attr().cloned()
    }

    pub fn weight_only(&self, id: Id) -> bool {
        self.eg[id].data.weight_only
    }

    /// The class is a checkpoint tensor itself (not computed from one).
    pub fn is_weight_param(&self, id: Id) -> bool {
        self.eg[id].data.param && self.eg[id].data.weight_only
    }

    pub fn find(&self, id: Id) -> Id {
        self.eg.find(id)
    }

    /// Add `op(args)` if it type-checks, recording this rule as the origin
    /// of the node when it is new. Returns `None` (rejecting the match) for
    /// an ill-typed fusion, so shape guards that the IR's inference already
    /// performs need not be repeated in each rule.
    pub fn add(&mut self, op: Op, args: &[Id]) -> Option<Id> {
        self.add_named(op, args, None)
    }

    /// [`Cx::add`], suggesting a name for the value in the rebuilt IR (used
    /// when the value is new, e.g. a concatenated weight).
    pub fn add_named(&mut self, op: Op, args: &[Id], name: Option<&'static str>) -> Option<Id> {
        infer_node(self.eg, &op, args).ok()?;
        let attr = has_attr_leaf(&op).then(|| self.eg.add(TLang::Attr(OpAttr::new(op.clone()))));
        let node = op_node(&op, attr, args);
        if self.eg.lookup(node.clone()).is_none() {
            self.eg.analysis.origins.push((node.clone(), self.rule));
            if let Some(n) = name {
                self.eg.analysis.names.push((node.clone(), n));
            }
        }
        Some(self.eg.add(node))
    }

    /// Result `i` of the tuple class `t`.
    pub fn proj(&mut self, t: Id, i: usize) -> Id {
        proj(self.eg, t, i)
    }
}

/// Result `i` of the tuple class `t` (adds the projection node).
pub fn proj(eg: &mut EG, t: Id, i: usize) -> Id {
    let idx = eg.add(TLang::Int(i as i64));
    eg.add(TLang::Proj([idx, t]))
}

/// Guard helper: `Some(())` when `cond` holds.
pub fn check(cond: bool) -> Option<()> {
    cond.then_some(())
}

#[cfg(test)]
pub(crate) mod testing;
