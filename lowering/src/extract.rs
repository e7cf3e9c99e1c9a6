//! DAG-aware greedy extraction.
//!
//! egg's tree extractor adds a child's cost once per use, so a sub-graph
//! shared by two consumers (the normalised hidden state feeding q, k and v;
//! a tuple whose results are all used) is paid for several times and
//! fusions that duplicate work look cheaper than they are. LpExtractor
//! would be exact but needs an ILP solver that is not available here.
//!
//! This extractor keeps, for each e-class, the best node together with the
//! *set* of classes its sub-DAG needs and each one's node cost; a node's
//! cost is the sum over the union of its children's sets plus its own, so a
//! class reachable along several paths is counted once. Classes are
//! relaxed from a worklist until nothing improves (costs only decrease, so
//! this terminates), rejecting nodes whose set would contain their own
//! class (cycles).
//!
//! Greedy choices are made class by class, so they miss savings that need
//! several classes to switch together: the results of one multi-result
//! node (q, k and v reading one merged projection; the sum and the
//! normalised value of `add_rms_norm`) each look more expensive alone than
//! their unfused alternatives. A local search therefore improves the
//! greedy solution with two kinds of moves, each priced exactly as the sum
//! of node costs over the unique classes the resulting DAG reaches:
//! switching one class to another node, and switching every class that can
//! read some class X to its node reading X (introducing a shared X once).
//! The reported cost is that exact DAG cost of the final choice.

use crate::analysis::EG;
use crate::lang::TLang;
use egg::{Id, Language};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

/// The chosen node for every class reachable from the root.
#[derive(Debug, Clone)]
pub struct Extraction {
    pub choice: HashMap<Id, TLang>,
    /// Sum of node costs over the unique classes of the extracted DAG.
    pub cost: f64,
}

struct Best {
    total: f64,
    node: usize,
    /// (class index, node cost), sorted by class index.
    set: Rc<Vec<(usize, f64)>>,
}

/// Extract from `root`; `node_cost(eg, class, node)` may return infinity
/// for a node that must not be chosen.
pub fn extract_dag(eg: &EG, root: Id, node_cost: impl Fn(&EG, Id, &TLang) -> f64) -> Result<Extraction, String> {
    let mut ids: Vec<Id> = eg.classes().map(|c| c.id).collect();
    ids.sort();
    let index: HashMap<Id, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    // Per class: (node, own cost, unique child class indices).
    let mut nodes: Vec<Vec<(TLang, f64, Vec<usize>)>> = Vec::with_capacity(ids.len());
    let mut parents: Vec<Vec<usize>> = vec![vec![]; ids.len()];
    for (ci, id) in ids.iter().enumerate() {
        let mut list = vec![];
        for n in &eg[*id].nodes {
            let mut ch: Vec<usize> = n.children().iter().map(|c| index[&eg.find(*c)]).collect();
            ch.sort_unstable();
            ch.dedup();
            for &c in &ch {
                parents[c].push(ci);
            }
            list.push((n.clone(), node_cost(eg, *id, n), ch));
        }
        nodes.push(list);
    }
    for p in &mut parents {
        p.sort_unstable();
        p.dedup();
    }

    let mut best: Vec<Option<Best>> = (0..ids.len()).map(|_| None).collect();
    let mut queue: VecDeque<usize> = (0..ids.len()).collect();
    let mut queued = vec![true; ids.len()];
    // Costs strictly decrease, so this is a safety valve, not a limit that
    // real graphs reach.
    let mut budget = 200usize.saturating_mul(ids.len()).max(10_000);
    while let Some(c) = queue.pop_front() {
        queued[c] = false;
        budget = budget.checked_sub(1).ok_or("extraction did not converge")?;
        for (ni, (_, cost, ch)) in nodes[c].iter().enumerate() {
            if !cost.is_finite() || ch.contains(&c) {
                continue;
            }
            let Some(set) = union_sets(ch.iter().map(|k| best[*k].as_ref().map(|b| &b.set))) else { continue };
            if set.binary_search_by_key(&c, |e| e.0).is_ok() {
                continue; // choosing this node would make the class depend on itself
            }
            let mut set = set;
            let pos = set.binary_search_by_key(&c, |e| e.0).unwrap_err();
            set.insert(pos, (c, *cost));
            let total: f64 = set.iter().map(|e| e.1).sum();
            let better = match &best[c] {
                None => true,
                Some(b) => total < b.total - 1e-12 * b.total.abs().max(1e-30),
            };
            if better {
                best[c] = Some(Best { total, node: ni, set: Rc::new(set) });
                for &p in &parents[c] {
                    if !queued[p] {
                        queued[p] = true;
                        queue.push_back(p);
                    }
                }
            }
        }
    }

    let mut sel: Vec<Option<usize>> = best.iter().map(|b| b.as_ref().map(|b| b.node)).collect();
    let root = index[&eg.find(root)];
    let problem = Problem { nodes: &nodes };
    let mut cost = problem.dag_cost(root, &sel, &[]).ok_or("the root has no acyclic finite-cost choice")?;
    improve(&problem, root, &mut sel, &mut cost);

    let mut choice = HashMap::new();
    for c in problem.reachable(root, &sel) {
        choice.insert(ids[c], nodes[c][sel[c].expect("reachable classes are chosen")].0.clone());
    }
    Ok(Extraction { choice, cost })
}

/// Cap on improving moves: each strictly lowers the cost; real graphs need
/// a handful.
const MAX_MOVES: usize = 200;

struct Problem<'a> {
    /// Per class: (node, own cost, unique child classes).
    nodes: &'a [Vec<(TLang, f64, Vec<usize>)>],
}

impl Problem<'_> {
    fn pick(&self, c: usize, sel: &[Option<usize>], over: &[(usize, usize)]) -> Option<usize> {
        over.iter().find(|(k, _)| *k == c).map(|(_, n)| *n).or(sel[c])
    }

    /// Exact cost of the DAG reached from `root` under `sel` with
    /// `over`rides; `None` if a reached class has no choice or the choice
    /// has a cycle.
    fn dag_cost(&self, root: usize, sel: &[Option<usize>], over: &[(usize, usize)]) -> Option<f64> {
        // 0 = unseen, 1 = on the DFS stack, 2 = done.
        let mut state = vec![0u8; self.nodes.len()];
        let mut total = 0.0;
        let mut stack = vec![(root, 0usize)];
        state[root] = 1;
        while let Some((c, i)) = stack.pop() {
            let n = self.pick(c, sel, over)?;
            let (_, own, ch) = &self.nodes[c][n];
            if i < ch.len() {
                stack.push((c, i + 1));
                let k = ch[i];
                match state[k] {
                    0 => {
                        state[k] = 1;
                        stack.push((k, 0));
                    }
                    1 => return None,
                    _ => {}
                }
            } else {
                state[c] = 2;
                total += own;
            }
        }
        total.is_finite().then_some(total)
    }

    fn reachable(&self, root: usize, sel: &[Option<usize>]) -> Vec<usize> {
        let mut seen = vec![false; self.nodes.len()];
        let mut out = vec![];
        let mut stack = vec![root];
        while let Some(c) = stack.pop() {
            if std::mem::replace(&mut seen[c], true) {
                continue;
            }
            out.push(c);
            if let Some(n) = sel[c] {
                stack.extend(self.nodes[c][n].2.iter().copied());
            }
        }
        out.sort_unstable();
        out
    }
}

/// Local search over single-class and shared-class moves (see the module
/// docs); applies the best improving move until none improves.
fn improve(p: &Problem, root: usize, sel: &mut [Option<usize>], cost: &mut f64) {
    for _ in 0..MAX_MOVES {
        let current = p.reachable(root, sel);
        let mut moves: Vec<Vec<(usize, usize)>> = vec![];
        // Single switches.
        for &c in &current {
            for (ni, (_, own, _)) in p.nodes[c].iter().enumerate() {
                if Some(ni) != sel[c] && own.is_finite() {
                    moves.push(vec![(c, ni)]);
                }
            }
        }
        // Shared-class switches: every current class that has a node
        // reading X takes its cheapest such node.
        let mut readers: HashMap<usize, Vec<(usize, usize)>> = HashMap::new();
        for &c in &current {
            let mut by_child: HashMap<usize, usize> = HashMap::new();
            for (ni, (_, own, ch)) in p.nodes[c].iter().enumerate() {
                if Some(ni) == sel[c] || !own.is_finite() {
                    continue;
                }
                for &x in ch {
                    let e = by_child.entry(x).or_insert(ni);
                    if p.nodes[c][*e].1 > *own {
                        *e = ni;
                    }
                }
            }
            for (x, ni) in by_child {
                readers.entry(x).or_default().push((c, ni));
            }
        }
        let mut shared: Vec<_> = readers.into_iter().filter(|(_, r)| r.len() >= 2).collect();
        shared.sort_unstable_by_key(|(x, _)| *x);
        moves.extend(shared.into_iter().map(|(_, mut r)| {
            r.sort_unstable();
            r
        }));

        let mut best: Option<(f64, &Vec<(usize, usize)>)> = None;
        for m in &moves {
            if let Some(c) = p.dag_cost(root, sel, m) {
                let bar = best.map_or(*cost, |(b, _)| b);
                if c < bar - 1e-12 * bar.abs().max(1e-30) {
                    best = Some((c, m));
                }
            }
        }
        let Some((c, m)) = best else { return };
        for &(k, n) in m {
            sel[k] = Some(n);
        }
        *cost = c;
    }
}

/// Union of sorted (class, cost) sets; `None` if any child has no choice yet.
fn union_sets<'a>(sets: impl Iterator<Item = Option<&'a Rc<Vec<(usize, f64)>>>>) -> Option<Vec<(usize, f64)>> {
    let mut out: Vec<(usize, f64)> = vec![];
    for s in sets {
        let s = s?;
        if out.is_empty() {
            out = s.as_ref().clone();
            continue;
        }
        let mut merged = Vec::with_capacity(out.len() + s.len());
        let (mut i, mut j) = (0, 0);
        while i < out.len() && j < s.len() {
            match out[i].0.cmp(&s[j].0) {
                std::cmp::Ordering::Less => {
                    merged.push(out[i]);
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    merged.push(s[j]);
                    j += 1;
                }
                std::cmp::Ordering::Equal => {
                    merged.push(out[i]);
                    i += 1;
                    j += 1;
                }
            }
        }
        merged.extend_from_slice(&out[i..]);
        merged.extend_from_slice(&s[j..]);
        out = merged;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::load_function;
    use crate::lang::{op_node, OpAttr};
    use crate::rules::proj;
    use panguc_ir::op::UnaryOp;
    use panguc_ir::{DType, Dim, Function, Module, Op, TensorType};

    /// x -> e = exp(x) -> (neg(e), sqrt(e)); plus, in the classes of both
    /// outputs, a fused alternative reading x that recomputes exp.
    fn shared_exp() -> (EG, Id, Id) {
        let mut f = Function::new("main");
        let x = f.add_input("x", TensorType::new(DType::F32, vec![Dim::tokens(), Dim::c(4)]));
        let e = f.op(Op::Unary(UnaryOp::Exp), &[x], "e").unwrap();
        let a = f.op(Op::Unary(UnaryOp::Neg), &[e], "a").unwrap();
        let b = f.op(Op::Unary(UnaryOp::Sqrt), &[e], "b").unwrap();
        f.outputs = vec![a, b];
        let mut m = Module::new("t", "main");
        m.add_function(f.clone());
        let loaded = load_function(&m, &f);
        let mut eg = loaded.egraph;
        let xc = loaded.value_class[x.index()];
        for (v, expr) in [(a, "$0 exp neg"), (b, "$0 exp sqrt")] {
            let op = Op::FusedElementwise { expr: expr.into() };
            let attr = eg.add(TLang::Attr(OpAttr::new(op.clone())));
            let n = eg.add(op_node(&op, Some(attr), &[xc]));
            eg.union(loaded.value_class[v.index()], n);
        }
        eg.rebuild();
        (eg, loaded.root, loaded.value_class[a.index()])
    }

    fn toy_cost(_: &EG, _: Id, n: &TLang) -> f64 {
        match n {
            TLang::Exp(_) => 10.0,
            TLang::Neg(_) | TLang::Sqrt(_) => 1.0,
            TLang::FusedElementwise(_) => 7.0,
            _ => 0.0,
        }
    }

    #[test]
    fn a_shared_subgraph_is_counted_once() {
        let (eg, root, a) = shared_exp();
        // A tree cost would price each output with its own exp: 11 + 11 =
        // 22 against 7 + 7 = 14 for the fused pair, and pick the fusions.
        // Counting exp once, the shared program costs 10 + 1 + 1 = 12.
        let ex = extract_dag(&eg, root, toy_cost).unwrap();
        assert_eq!(ex.cost, 12.0);
        assert!(matches!(ex.choice[&eg.find(a)], TLang::Neg(_)), "{:?}", ex.choice[&eg.find(a)]);
        // The reported cost is the sum over the unique chosen classes.
        let recomputed: f64 = ex.choice.iter().map(|(c, n)| toy_cost(&eg, *c, n)).sum();
        assert_eq!(recomputed, ex.cost);
    }

    #[test]
    fn recomputation_wins_when_it_is_cheaper_than_sharing() {
        let (eg, root, a) = shared_exp();
        let cheap_fusion = |eg: &EG, c: Id, n: &TLang| match n {
            TLang::FusedElementwise(_) => 5.0,
            _ => toy_cost(eg, c, n),
        };
        let ex = extract_dag(&eg, root, cheap_fusion).unwrap();
        assert_eq!(ex.cost, 10.0);
        assert!(matches!(ex.choice[&eg.find(a)], TLang::FusedElementwise(_)));
    }

    #[test]
    fn results_of_one_tuple_switch_together() {
        // s = a + b and n = rms_norm(s, w), each also a projection of one
        // add_rms_norm tuple. Class by class the tuple (cost 4) looks worse
        // than the add (cost 3); together it saves the add.
        let mut f = Function::new("main");
        let ty = TensorType::new(DType::F32, vec![Dim::tokens(), Dim::c(4)]);
        let a = f.add_input("a", ty.clone());
        let b = f.add_input("b", ty);
        let w = f.add_input("w", TensorType::new(DType::F32, vec![Dim::c(4)]));
        let s = f.op(Op::Binary(panguc_ir::op::BinaryOp::Add), &[a, b], "s").unwrap();
        let n = f.op(Op::RmsNorm { eps: 1e-5 }, &[s, w], "n").unwrap();
        f.outputs = vec![s, n];
        let mut m = Module::new("t", "main");
        m.add_function(f.clone());
        let loaded = load_function(&m, &f);
        let mut eg = loaded.egraph;
        let vc = |v: panguc_ir::ValueId| loaded.value_class[v.index()];
        let op = Op::AddRmsNorm { eps: 1e-5 };
        let attr = eg.add(TLang::Attr(OpAttr::new(op.clone())));
        let t = eg.add(op_node(&op, Some(attr), &[vc(a), vc(b), vc(w)]));
        let (p0, p1) = (proj(&mut eg, t, 0), proj(&mut eg, t, 1));
        eg.union(vc(s), p0);
        eg.union(vc(n), p1);
        eg.rebuild();
        let cost = |_: &EG, _: Id, n: &TLang| match n {
            TLang::Add(_) | TLang::RmsNorm(_) => 3.0,
            TLang::AddRmsNorm(_) => 4.0,
            _ => 0.0,
        };
        let ex = extract_dag(&eg, loaded.root, cost).unwrap();
        assert_eq!(ex.cost, 4.0);
        assert!(matches!(ex.choice[&eg.find(vc(s))], TLang::Proj(_)));
    }
}
