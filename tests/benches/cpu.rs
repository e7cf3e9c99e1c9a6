//! `cargo bench -p panguc-tests --bench cpu`: the CPU backend benchmark
//! (see `panguc::bench`). Work files go to `$PANGUC_BENCH_DIR` (default
//! `target/panguc-bench`). `PANGUC_BENCH_GRAPH` picks the module compiled
//! from the batched import (ragged steps over a paged KV cache, as every
//! CPU package): `pipeline` (default: the fusion of `panguc compile`) or
//! `imported` (no fusion). The hand-fused variants of the tests are
//! one-sequence modules, which the batched benchmark cannot drive.

use panguc::bench::{pipeline_fuse, run_bench, BenchOptions};
use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let dir = std::env::var_os("PANGUC_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/panguc-bench"));
    let graph = std::env::var("PANGUC_BENCH_GRAPH").unwrap_or_else(|_| "pipeline".into());
    let label = graph.clone();
    let fuse =
        move |ckpt: &panguc::frontend::Checkpoint, imported: &panguc_ir::Module| -> anyhow::Result<panguc_ir::Module> {
            match graph.as_str() {
                "pipeline" => pipeline_fuse(ckpt, imported),
                "imported" => Ok(imported.clone()),
                other => anyhow::bail!("PANGUC_BENCH_GRAPH must be pipeline or imported, got `{other}`"),
            }
        };
    println!("graph: {label}");
    run_bench(&BenchOptions::in_dir(dir), &fuse)
}
