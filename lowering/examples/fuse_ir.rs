//! Fuse a canonical IR file, print the fused IR, and time the phases:
//! `cargo run --release -p panguc-lowering --example fuse_ir -- lowering/tests/fixtures/pangu-72b-imported.ir > /dev/null`
use panguc_lowering::fuse::{fuse_module, FuseOptions};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let path = std::env::args().nth(1).ok_or_else(|| anyhow::anyhow!("usage: fuse_ir FILE.ir"))?;
    let text = std::fs::read_to_string(&path)?;
    let t0 = Instant::now();
    let m = panguc_ir::text::parse_module(&text).map_err(|e| anyhow::anyhow!("{path}: {e}"))?;
    let parse = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let (fused, stats) = fuse_module(&m, &FuseOptions::default(), |_, _| Ok(()))?;
    let fuse = t1.elapsed().as_secs_f64();
    print!("{}", panguc_ir::text::print_module(&fused));
    for s in &stats {
        eprintln!("{}", serde_json::to_string(s)?);
    }
    let sat: f64 = stats.iter().map(|s| s.saturation_seconds).sum();
    let ext: f64 = stats.iter().map(|s| s.extraction_seconds).sum();
    eprintln!("parse {parse:.4} s, fuse {fuse:.4} s (saturation {sat:.4} s, extraction {ext:.4} s)");
    Ok(())
}
