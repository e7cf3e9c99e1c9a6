//! The fit of the published-figure parameters (`ServingParams`), as a
//! tool: `cargo test -p panguc --test published_fit -- --ignored
//! --nocapture` builds the 72B W8A8 program once, prints each figure's
//! breakdown under the current parameters (compute-bound, memory-bound and
//! launch milliseconds of the kernels, collectives, framework overhead),
//! then searches the fitted terms on a grid for the smallest largest
//! relative error over the estimated figures and prints the best point.
//! Ignored by default: it prices the 72B program thousands of times.

use panguc::frontend::Checkpoint;
use panguc_lowering::profile::{builtin_profiles, ServingParams};
use panguc_lowering::published::{published_section, QuantProgram};
use std::path::Path;

fn max_error(section: &serde_json::Value) -> f64 {
    section["max_abs_relative_error"].as_f64().unwrap()
}

#[test]
#[ignore = "a fitting tool: prices the 72B program on a grid of parameters"]
fn refit_published_parameters() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/pangu-pro-moe-72b");
    let cfg = Checkpoint::open(&dir).unwrap().config().clone();
    let module = panguc::pipeline::published_program(&cfg, &Default::default()).unwrap();
    let prog = QuantProgram { module: &module, block_size: 128, description: serde_json::Value::Null };
    let profiles = builtin_profiles();
    let current = ServingParams::default();
    let section = published_section(&cfg, &prog, &profiles, &current).unwrap();
    for f in section["figures"].as_array().unwrap().iter().filter(|f| !f["estimate"].is_null()) {
        eprintln!(
            "{}: published {} estimate {} error {:+}\n  {}",
            f["figure"], f["published"], f["estimate"], f["relative_error"], f["breakdown"]
        );
    }
    eprintln!("current parameters: max |error| {}", max_error(&section));
    let steps = |from: f64, to: f64, step: f64| {
        let n = ((to - from) / step).round() as usize;
        (0..=n).map(move |i| from + i as f64 * step)
    };
    let mut best = (f64::INFINITY, current.clone());
    for cube in steps(0.1, 0.6, 0.05) {
        for cube_310p in steps(0.1, 0.6, 0.05) {
            for memory in steps(0.5, 1.0, 0.05) {
                for overhead in steps(0.0, 10.0, 1.0) {
                    let p = ServingParams {
                        cube_efficiency: cube,
                        cube_efficiency_310p: cube_310p,
                        memory_efficiency: memory,
                        step_overhead_ms: overhead,
                        ..current.clone()
                    };
                    let e = max_error(&published_section(&cfg, &prog, &profiles, &p).unwrap());
                    if e < best.0 {
                        best = (e, p);
                    }
                }
            }
        }
    }
    let (e, p) = best;
    eprintln!(
        "best: cube_efficiency {:.2} cube_efficiency_310p {:.2} memory_efficiency {:.2} step_overhead_ms {:.1}: \
         max |error| {e}",
        p.cube_efficiency, p.cube_efficiency_310p, p.memory_efficiency, p.step_overhead_ms
    );
    let section = published_section(&cfg, &prog, &profiles, &p).unwrap();
    for f in section["figures"].as_array().unwrap().iter().filter(|f| !f["estimate"].is_null()) {
        eprintln!("  {}: {} vs {} ({:+})", f["figure"], f["estimate"], f["published"], f["relative_error"]);
    }
}
