//! `cargo bench -p panguc-tests --bench cpu`: the CPU backend benchmark
//! (see `panguc::bench`). Work files go to `$PANGUC_BENCH_DIR` (default
//! `target/panguc-bench`). `PANGUC_BENCH_GRAPH` picks the module compiled:
//! `pipeline` (default: the fusion pipeline of `panguc compile`), `plan`
//! (hand-fused with QkvRope/MoeRouterTopK/MoeFfn), `classic` (hand-fused
//! with the original fused ops) or `imported` (no fusion).

#[path = "../tests/common/fused.rs"]
mod fused;

use panguc::bench::{run_bench, BenchOptions};
use panguc_ir::DType;
use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let dir = std::env::var_os("PANGUC_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/panguc-bench"));
    let graph = std::env::var("PANGUC_BENCH_GRAPH").unwrap_or_else(|_| "pipeline".into());
    let label = graph.clone();
    let fuse =
        move |ckpt: &panguc::frontend::Checkpoint, imported: &panguc_ir::Module| -> anyhow::Result<panguc_ir::Module> {
            let dtype_of = |name: &str| ckpt.tensor_info(name).map(|(d, _, _)| d).unwrap_or(DType::BF16);
            Ok(match graph.as_str() {
                "pipeline" => {
                    let opts = panguc::pipeline::PipelineOptions::default();
                    panguc::pipeline::run_pipeline(ckpt, imported, 0.0, &opts)?.module
                }
                "imported" => imported.clone(),
                "classic" => fused::build(ckpt.config(), fused::Variant::Classic, &dtype_of),
                "plan" => fused::build(ckpt.config(), fused::Variant::Plan, &dtype_of),
                other => anyhow::bail!("PANGUC_BENCH_GRAPH must be pipeline, plan, classic or imported, got `{other}`"),
            })
        };
    println!("graph: {label}");
    run_bench(&BenchOptions::in_dir(dir), &fuse)
}
