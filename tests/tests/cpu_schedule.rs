//! The scheduler's kernel programs for the tiny model: fused kernels, packed
//! weights, in-place KV-cache appends, weight-only subgraphs folded into
//! prepared weights, and arena slot reuse.

mod common;

use common::*;
use panguc_ir::kernel::{BufferKind, KernelKind, KernelProgram, Layout, WeightExpr};
use panguc_lowering::schedule::{schedule, ScheduleOptions};

fn program(g: Graph) -> KernelProgram {
    let ckpt = checkpoint();
    schedule(&module(&ckpt, g), &ScheduleOptions::default()).expect("schedule")
}

fn kinds(p: &KernelProgram) -> Vec<&'static str> {
    p.launches.iter().map(|l| p.kernels[l.kernel].kind.mnemonic()).collect()
}

#[test]
fn pipeline_program_uses_fused_kernels_and_packed_weights() {
    let p = program(Graph::Pipeline);
    let k = kinds(&p);
    for want in ["attention", "moe_route", "moe_gate_up", "moe_down", "moe_combine", "gemm", "moe_gating"] {
        assert!(k.contains(&want), "no {want} launch in {k:?}");
    }
    assert!(!k.contains(&"matmul"), "every matmul has a weight operand, so none is generic: {k:?}");
    // Every matmul weight is packed for the GEMM micro-kernel.
    for l in &p.launches {
        let kern = &p.kernels[l.kernel];
        if let KernelKind::Gemm { .. } | KernelKind::MoeGateUp | KernelKind::MoeDown = kern.kind {
            let w = if kern.kind.mnemonic() == "gemm" { l.args[1] } else { l.args[3] };
            assert!(kern.args[if kern.kind.mnemonic() == "gemm" { 1 } else { 3 }].layout != Layout::RowMajor);
            assert!(matches!(p.buffer(w).kind, BufferKind::Weight { .. }), "{} reads a non-weight", kern.name);
        }
    }
    // Two layers share their kernels: each kernel is specialised once.
    let per_layer = p.launches.iter().filter(|l| p.kernels[l.kernel].kind.mnemonic() == "attention").count();
    assert_eq!(per_layer, 2);
    let attention_kernels = p.kernels.iter().filter(|k| k.kind.mnemonic() == "attention").count();
    assert_eq!(attention_kernels, 1);
}

#[test]
fn kv_cache_is_appended_in_place() {
    for g in [Graph::Imported, Graph::Classic, Graph::Plan, Graph::Pipeline] {
        let p = program(g);
        assert_eq!(p.caches.len(), 4, "{g:?}: k and v for two layers");
        for (c, id) in p.caches.iter().enumerate() {
            assert_eq!(p.buffer(*id).kind, BufferKind::KvCache { cache: c });
            // Only the new rows are written: no launch writes a whole cache
            // from another buffer that holds the old rows.
            let writers: Vec<&str> = p
                .launches
                .iter()
                .filter(|l| {
                    let outs = p.kernels[l.kernel].kind.num_outputs();
                    l.args[l.args.len() - outs..].contains(id)
                })
                .map(|l| p.kernels[l.kernel].kind.mnemonic())
                .collect();
            assert_eq!(writers.len(), 1, "{g:?} cache {c} written by {writers:?}");
            assert!(writers[0] == "copy_into" || writers[0] == "qkv_rope_append", "{g:?}: {writers:?}");
        }
    }
}

#[test]
fn weight_only_subgraphs_become_prepared_weights_and_views_are_free() {
    let p = program(Graph::Plan);
    for w in &p.weights {
        if let WeightExpr::Graph { function } = &w.expr {
            let out = function.outputs[0];
            let def = function.nodes.iter().find(|n| n.results.contains(&out)).expect("defined");
            assert!(!matches!(def.op, panguc_ir::Op::Reshape { .. }), "{}: a reshape is a view, not a copy", w.name);
        }
    }
    let names: Vec<&str> = p.weights.iter().map(|w| w.name.as_str()).collect();
    // Concatenated QKV and stacked, gate/up-interleaved experts, per layer.
    assert!(names.contains(&"model.layers.0.w_qkv@panels16"), "{names:?}");
    assert!(names.contains(&"model.layers.1.experts_gate_up@gateup16"), "{names:?}");
    let groups: std::collections::BTreeSet<&str> = p.weights.iter().map(|w| w.group.as_str()).collect();
    assert_eq!(groups.into_iter().collect::<Vec<_>>(), ["layers.000", "layers.001", "model"]);
    // The router scale reshape is a view of the stored tensor.
    let rs = p.buffers.iter().find(|b| b.name == "model.layers.0.router_scale_flat").expect("router scale");
    assert!(matches!(rs.kind, BufferKind::View { .. }));
    // Bf16 tensors stay bf16 in the package (kernels widen in registers).
    assert!(p.weights.iter().filter(|w| w.dtype.is_float()).all(|w| w.dtype == panguc_ir::DType::BF16));
}

#[test]
fn activations_share_arena_slots() {
    let p = program(Graph::Imported);
    let acts = p.buffers.iter().filter(|b| matches!(b.kind, BufferKind::Activation { .. })).count();
    assert!(p.slots * 4 < acts, "{} slots for {acts} activation buffers", p.slots);
}

#[test]
fn kernel_program_snapshot() {
    insta::assert_snapshot!("tiny_plan_kernel_program", program(Graph::Plan).to_text());
}

#[test]
fn launch_graph_checks_the_order_and_gives_live_ranges() {
    use panguc_lowering::dataflow::LaunchGraph;
    let p = program(Graph::Pipeline);
    let g = LaunchGraph::build(&p).expect("launch graph");
    g.check_order(&p).expect("the scheduler's order respects every dependency");
    // Every activation slot is shared only by buffers whose live ranges are disjoint.
    let ranges = g.live_ranges(&p);
    for (a, ra) in ranges.iter().enumerate() {
        for (b, rb) in ranges.iter().enumerate().skip(a + 1) {
            if let (Some(ra), Some(rb), BufferKind::Activation { slot: sa }, BufferKind::Activation { slot: sb }) =
                (ra, rb, &p.buffers[a].kind, &p.buffers[b].kind)
            {
                if sa == sb {
                    assert!(
                        ra.1 < rb.0 || rb.1 < ra.0,
                        "`{}` and `{}` share slot {sa} while both live",
                        p.buffers[a].name,
                        p.buffers[b].name
                    );
                }
            }
        }
    }
    // Moving the last launch to the front breaks a dependency, and the
    // check names the launch that now runs too early.
    let mut bad = p.clone();
    let last = bad.launches.pop().unwrap();
    bad.launches.insert(0, last);
    let err = LaunchGraph::build(&bad).and_then(|g| g.check_order(&bad)).unwrap_err();
    assert!(err.contains("launch 0") && err.contains("before any launch writes it"), "{err}");
    // Swapping two dependent launches is caught by the order check.
    let mut swapped = p.clone();
    let (w, r) = {
        let g = LaunchGraph::build(&p).unwrap();
        let e = g.graph.raw_edges()[0].clone();
        (g.graph[e.source()], g.graph[e.target()])
    };
    swapped.launches.swap(w, r);
    let err = LaunchGraph::build(&swapped).and_then(|g| g.check_order(&swapped)).unwrap_err();
    assert!(err.contains("before"), "{err}");
}
