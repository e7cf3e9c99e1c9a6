//! The fused IR of the bundled tiny model and of the real 72B config
//! (snapshots), and whole-model translation validation of the tiny one.
//!
//! The fixtures are the importer's output (`panguc dump-ir`); the compiler
//! crate's pipeline tests fail when they drift from the importer. To
//! regenerate:
//! `panguc synth /tmp/tiny --preset tiny && panguc dump-ir /tmp/tiny > lowering/tests/fixtures/tiny-imported.ir`
//! `panguc dump-ir examples/pangu-pro-moe-72b > lowering/tests/fixtures/pangu-72b-imported.ir`

use panguc_ir::text::{parse_module, print_module};
use panguc_ir::Module;
use panguc_lowering::fuse::{fuse_module, FunctionStats, FuseOptions};
use panguc_lowering::kernel_count;
use panguc_lowering::validate::{random_weights, validate_session};

fn fixture(name: &str) -> Module {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    parse_module(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn fuse(m: &Module) -> (Module, Vec<FunctionStats>) {
    fuse_module(m, &FuseOptions::default(), |_, _| Ok(())).unwrap()
}

#[test]
fn tiny_fused_ir() {
    let m = fixture("tiny-imported.ir");
    let (fused, stats) = fuse(&m);
    assert!(stats.iter().all(|s| s.stop_reason == "saturated"), "{stats:?}");
    assert_eq!(kernel_count(fused.function("decoder_layer").unwrap()), 7);
    insta::assert_snapshot!("tiny_fused", print_module(&fused));
}

#[test]
fn pangu_72b_fused_ir() {
    let m = fixture("pangu-72b-imported.ir");
    let (fused, stats) = fuse(&m);
    let layer = stats.iter().find(|s| s.function == "decoder_layer").unwrap();
    assert_eq!(layer.stop_reason, "saturated");
    assert!(layer.kernels_after <= 10 && layer.kernels_before > 30, "{layer:?}");
    insta::assert_snapshot!("pangu_72b_fused", print_module(&fused));
}

#[test]
fn tiny_model_validates_with_random_weights() {
    let m = fixture("tiny-imported.ir");
    let (fused, _) = fuse(&m);
    let weights = random_weights(&m, 3, 1 << 24).unwrap();
    let report = validate_session(&m, &fused, &weights, "random", 5, 9).unwrap();
    // logits + 2 caches per layer, at prefill and at decode.
    assert_eq!(report.checks.len(), 2 * 5);
    assert!(report.max_relative_error < 1e-4, "{report:?}");
}

#[test]
fn validation_catches_a_wrong_fusion() {
    // Swap the k and v caches the fused layer returns: a plausible bug that
    // keeps every type intact.
    let m = fixture("tiny-imported.ir");
    let (mut fused, _) = fuse(&m);
    let f = fused.functions.get_mut("decoder_layer").unwrap();
    f.outputs.swap(1, 2);
    let weights = random_weights(&m, 3, 1 << 24).unwrap();
    let err = validate_session(&m, &fused, &weights, "random", 3, 9).unwrap_err().to_string();
    assert!(err.contains("translation validation failed") && err.contains("differs by"), "{err}");
}
