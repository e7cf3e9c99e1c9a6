//! Fuse a canonical IR file and print the result with timing:
//! `cargo run --release -p panguc-lowering --example fuse_ir -- FILE.ir`.
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
    eprintln!("parse {parse:.3} s, fuse {fuse:.3} s");
    Ok(())
}
