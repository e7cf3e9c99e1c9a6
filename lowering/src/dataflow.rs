//! Dataflow graphs (petgraph) of a graph-IR function and of a scheduled
//! kernel program.
//!
//! - [`function_dot`]: a function's run-time dataflow for `panguc dump-ir
//!   --dot` (kernels as filled boxes, views dashed, package-time weights
//!   folded into notes).
//! - [`LaunchGraph`]: the kernel program's launches with an edge from the
//!   launch that writes a buffer to every later launch that reads it. The
//!   scheduler's order is checked against it (every read after its write)
//!   and the buffer plan takes each activation's live range from it.

use panguc_ir::graph::ParamKind;
use panguc_ir::kernel::{BufferId, BufferKind, KernelProgram};
use panguc_ir::{Function, Op};
use petgraph::dot::Dot;
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;
use std::collections::BTreeMap;
use std::fmt;

/// A node of a drawn graph: its label and Graphviz attributes.
struct DotNode {
    label: String,
    attrs: &'static str,
}

impl fmt::Display for DotNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label)
    }
}

/// Graphviz picture of a function's run-time dataflow, deterministic for a
/// given function. Kernels are filled boxes, views dashed; everything
/// computed at package time (weights and their preparation) is folded into
/// one note per consuming op that lists the checkpoint tensors it comes
/// from, with expert and layer indices written as `*` (64 experts would
/// otherwise draw 192 notes).
pub fn function_dot(f: &Function) -> String {
    let weight_only = crate::weight_only_values(f);
    let kernels = crate::kernel_nodes(f);
    // For each package-time value: the checkpoint tensor patterns behind it.
    let mut sources: Vec<std::collections::BTreeSet<String>> = vec![Default::default(); f.values.len()];
    let mut g: DiGraph<DotNode, String> = DiGraph::new();
    let mut producer: Vec<Option<NodeIndex>> = vec![None; f.values.len()];
    let edge_label = |v: panguc_ir::ValueId| format!("{}: {}", f.name_of(v), f.ty(v));
    for p in &f.params {
        match &p.kind {
            ParamKind::Weight { tensor } => {
                sources[p.value.index()].insert(index_pattern(tensor));
            }
            ParamKind::Input => {
                let label = format!("%{}", f.name_of(p.value));
                producer[p.value.index()] = Some(g.add_node(DotNode { label, attrs: "shape=oval, style=bold" }));
            }
        }
    }
    for (i, n) in f.nodes.iter().enumerate() {
        if n.results.iter().all(|r| weight_only[r.index()]) && !matches!(n.op, Op::Call { .. }) {
            let from: std::collections::BTreeSet<String> =
                n.args.iter().flat_map(|a| sources[a.index()].iter().cloned()).collect();
            for r in &n.results {
                sources[r.index()].clone_from(&from);
            }
            continue;
        }
        let (label, attrs) = match &n.op {
            Op::Call { func, weight_prefix } => (format!("call @{func} ({weight_prefix})"), "shape=box3d"),
            op if kernels[i] => (op.mnemonic().to_string(), "shape=box, style=filled, fillcolor=lightblue"),
            op => (op.mnemonic().to_string(), "shape=box, style=dashed, color=gray50"),
        };
        let node = g.add_node(DotNode { label, attrs });
        let prepared: std::collections::BTreeSet<&String> =
            n.args.iter().filter(|a| weight_only[a.index()]).flat_map(|a| &sources[a.index()]).collect();
        if !prepared.is_empty() {
            let list: Vec<&str> = prepared.iter().map(|s| s.as_str()).collect();
            let note = g.add_node(DotNode { label: list.join("\n"), attrs: "shape=note, fontsize=9, color=gray40" });
            g.add_edge(note, node, String::new());
        }
        for a in n.args.iter().filter(|a| !weight_only[a.index()]) {
            if let Some(src) = producer[a.index()] {
                g.add_edge(src, node, edge_label(*a));
            }
        }
        for r in &n.results {
            producer[r.index()] = Some(node);
        }
    }
    for (i, o) in f.outputs.iter().enumerate() {
        let node = g.add_node(DotNode { label: format!("output {i}"), attrs: "shape=oval, style=bold" });
        if let Some(src) = producer[o.index()] {
            g.add_edge(src, node, edge_label(*o));
        }
    }
    let node_attrs = |_, (_, n): (NodeIndex, &DotNode)| n.attrs.to_string();
    let edge_attrs = |_, _| "fontsize=8".to_string();
    let dot = Dot::with_attr_getters(&g, &[], &edge_attrs, &node_attrs);
    format!("// @{}: {} kernels per call\n{dot}", f.name, crate::kernel_count(f))
}

/// A tensor name with its numeric path components (layer and expert
/// indices) replaced by `*`.
fn index_pattern(name: &str) -> String {
    name.split('.')
        .map(|part| if !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) { "*" } else { part })
        .collect::<Vec<_>>()
        .join(".")
}

/// Launch dependencies of a kernel program: an edge `w -> r` labelled with
/// the root buffer when launch `r` reads what launch `w` wrote last.
pub struct LaunchGraph {
    pub graph: DiGraph<usize, BufferId>,
    /// For each buffer (by index): the launches that write it.
    writers: Vec<Vec<usize>>,
    /// For each buffer: the launches that read it.
    readers: Vec<Vec<usize>>,
}

impl LaunchGraph {
    /// Build the graph. Fails when a launch reads an activation that no
    /// earlier launch wrote (a scheduler bug), naming the launch and buffer.
    pub fn build(p: &KernelProgram) -> Result<Self, String> {
        let n = p.buffers.len();
        let mut graph = DiGraph::with_capacity(p.launches.len(), 0);
        let nodes: Vec<NodeIndex> = (0..p.launches.len()).map(|i| graph.add_node(i)).collect();
        let mut writers = vec![vec![]; n];
        let mut readers = vec![vec![]; n];
        let mut last_writer: Vec<Option<usize>> = vec![None; n];
        for (li, l) in p.launches.iter().enumerate() {
            let outs = p.kernels[l.kernel].kind.num_outputs();
            let first_out = l.args.len() - outs;
            for (ai, a) in l.args.iter().enumerate() {
                let root = p.root_of(*a).0;
                let r = root.index();
                if ai >= first_out {
                    continue;
                }
                readers[r].push(li);
                match last_writer[r] {
                    Some(w) => {
                        graph.add_edge(nodes[w], nodes[li], root);
                    }
                    None if matches!(p.buffers[r].kind, BufferKind::Activation { .. }) => {
                        let k = &p.kernels[l.kernel].name;
                        return Err(format!(
                            "launch {li} ({k}) reads activation `{}` before any launch writes it",
                            p.buffers[r].name
                        ));
                    }
                    None => {}
                }
            }
            for a in &l.args[first_out..] {
                let r = p.root_of(*a).0.index();
                writers[r].push(li);
                last_writer[r] = Some(li);
            }
        }
        Ok(LaunchGraph { graph, writers, readers })
    }

    /// Check that the launch order is a topological order of the graph
    /// (it is acyclic and every edge points forward), naming the first
    /// launch that runs before one it depends on.
    pub fn check_order(&self, p: &KernelProgram) -> Result<(), String> {
        petgraph::algo::toposort(&self.graph, None)
            .map_err(|c| format!("launch {} depends on itself through a cycle", self.graph[c.node_id()]))?;
        for e in self.graph.edge_references() {
            let (w, r) = (self.graph[e.source()], self.graph[e.target()]);
            if w >= r {
                let name = &p.kernels[p.launches[r].kernel].name;
                return Err(format!("launch {r} ({name}) runs before launch {w}, which writes its input"));
            }
        }
        Ok(())
    }

    /// Live range `(first write, last use)` in launch indices of every
    /// activation root buffer (None for other buffers).
    /// Program outputs stay live until the end (`launches.len()`).
    pub fn live_ranges(&self, p: &KernelProgram) -> Vec<Option<(usize, usize)>> {
        let end = p.launches.len();
        let outputs: Vec<usize> = p.outputs.iter().map(|o| p.root_of(*o).0.index()).collect();
        (0..p.buffers.len())
            .map(|b| {
                if !matches!(p.buffers[b].kind, BufferKind::Activation { .. }) {
                    return None;
                }
                // An activation no launch touches still gets a slot (at 0).
                let first = self.writers[b].first().copied().unwrap_or(0);
                let last_use = self.writers[b].iter().chain(&self.readers[b]).max().copied().unwrap_or(0);
                let last = if outputs.contains(&b) { end } else { last_use };
                Some((first, last.max(first)))
            })
            .collect()
    }
}

/// Graphviz text of a kernel program's launch graph (launch nodes named by
/// kernel, edges by the buffer that carries the dependency).
pub fn launch_dot(p: &KernelProgram) -> Result<String, String> {
    let lg = LaunchGraph::build(p)?;
    let mut labelled: DiGraph<String, String> = DiGraph::new();
    let mut kinds = BTreeMap::new();
    for li in 0..p.launches.len() {
        let k = &p.kernels[p.launches[li].kernel];
        *kinds.entry(k.kind.mnemonic()).or_insert(0usize) += 1;
        labelled.add_node(format!("{li}: {}", k.name));
    }
    for e in lg.graph.edge_references() {
        labelled.add_edge(e.source(), e.target(), p.buffer(*e.weight()).name.clone());
    }
    let node_attrs = |_, _| "shape=box".to_string();
    let edge_attrs = |_, _| "fontsize=8".to_string();
    let dot = Dot::with_attr_getters(&labelled, &[], &edge_attrs, &node_attrs);
    Ok(format!("// @{}: {} launches\n{dot}", p.name, p.launches.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use panguc_ir::op::{BinaryOp, UnaryOp};
    use panguc_ir::{DType, Dim, TensorType};

    fn small_function() -> Function {
        let mut f = Function::new("f");
        let x = f.add_input("x", TensorType::new(DType::F32, vec![Dim::tokens(), Dim::c(4)]));
        let w = f.add_weight("w", "w", TensorType::new(DType::BF16, vec![Dim::c(4)]));
        let wf = f.op(Op::Cast { dtype: DType::F32 }, &[w], "wf").unwrap();
        let y = f.op(Op::Binary(BinaryOp::Mul), &[x, wf], "y").unwrap();
        let r = f.op(Op::Reshape { shape: vec![Dim::tokens().scale(4)] }, &[y], "r").unwrap();
        let z = f.op(Op::Unary(UnaryOp::Neg), &[r], "z").unwrap();
        f.outputs = vec![z];
        f
    }

    #[test]
    fn function_dot_marks_kernels() {
        let dot = function_dot(&small_function());
        assert!(dot.starts_with("// @f: 2 kernels per call\ndigraph {"), "{dot}");
        assert_eq!(dot.matches("fillcolor=lightblue").count(), 2, "{dot}");
        assert!(dot.contains("label = \"y: f32[tokens,4]\""), "{dot}");
        // The weight and its package-time cast fold into one note on the mul.
        assert_eq!(dot.matches("shape=note").count(), 1, "{dot}");
        assert!(dot.contains("label = \"w\""), "{dot}");
    }

    #[test]
    fn index_patterns_hide_layer_and_expert_numbers() {
        assert_eq!(
            index_pattern("model.layers.3.mlp.experts.17.up_proj.weight"),
            "model.layers.*.mlp.experts.*.up_proj.weight"
        );
        assert_eq!(index_pattern("mlp.gate.weight"), "mlp.gate.weight");
    }
}
