//! `panguc quantize` with the expert-aware techniques and its report:
//! QMODEL/quant_report.json measures the written checkpoint and each
//! technique turned off in turn against the float model; on a model with
//! planted outlier channels smoothing must lower the next-token KL.

use panguc::frontend::quant::DESCRIPTION_FILE;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

fn panguc(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_panguc")).args(args).output().unwrap()
}

fn ok(o: std::process::Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The tiny preset (f32 weights) with planted activation outliers.
fn outlier_model(dir: &Path) {
    ok(panguc(&["synth", dir.to_str().unwrap(), "--preset", "tiny", "--seed", "7", "--dtype", "f32", "--outliers"]));
}

fn report(q: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(q.join("quant_report.json")).unwrap()).unwrap()
}

/// The result row with `disabled` = `technique` (None: as written).
fn row<'a>(r: &'a Value, technique: Option<&str>) -> &'a Value {
    let rows = r["results"].as_array().unwrap();
    rows.iter()
        .find(|x| x["disabled"].as_str() == technique)
        .unwrap_or_else(|| panic!("no result row for {technique:?}: {r:#}"))
}

#[test]
fn report_shows_what_each_technique_buys_on_planted_outliers() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, q) = (tmp.path().join("outliers"), tmp.path().join("q"));
    outlier_model(&model);
    let stdout = ok(panguc(&[
        "quantize",
        model.to_str().unwrap(),
        "-o",
        q.to_str().unwrap(),
        "--calib-synthetic",
        "2",
        "--eval-prompts",
        "2",
    ]));
    eprintln!("{stdout}");
    assert!(stdout.contains("without smoothing") && stdout.contains("quant_report.json"), "{stdout}");
    let r = report(&q);
    let layers = 2;
    // Every enabled technique has its ablation row, each with finite metrics.
    for t in [None, Some("smoothing"), Some("router_protection"), Some("balance")] {
        let x = row(&r, t);
        let kl = x["kl"].as_f64().unwrap();
        let top1 = x["top1_agreement"].as_f64().unwrap();
        assert!(kl.is_finite() && kl >= 0.0, "{t:?}: KL {kl}");
        assert!((0.0..=1.0).contains(&top1), "{t:?}: top-1 {top1}");
        let routing = x["routing_topk_agreement"].as_array().unwrap();
        assert_eq!(routing.len(), layers, "{t:?}");
        assert!(routing.iter().all(|a| (0.0..=1.0).contains(&a.as_f64().unwrap())), "{t:?}: {routing:?}");
    }
    // Smoothing wins back the planted outliers' error.
    let (with, without) = (row(&r, None)["kl"].as_f64().unwrap(), row(&r, Some("smoothing"))["kl"].as_f64().unwrap());
    assert!(with < without, "smoothing should lower the KL: {with} with vs {without} without");
    // Balance: counts per (layer, expert), capped at r * k * N / n =
    // 2 * 8 * 64 / 64 (two 32-token prompts); the unbalanced counts sum to
    // k tokens per calibration token and layer.
    let cal = &r["calibration"];
    assert_eq!(cal["balance_target"].as_u64(), Some(16), "{cal:#}");
    let counts = cal["expert_tokens"].as_array().unwrap();
    assert_eq!(counts.len(), layers);
    for layer in counts {
        let layer = layer.as_array().unwrap();
        assert_eq!(layer.len(), 64);
        assert!(layer.iter().all(|n| n.as_u64().unwrap() <= 16), "{layer:?}");
    }
    let below = counts.iter().flat_map(|l| l.as_array().unwrap()).filter(|n| n.as_u64().unwrap() < 16).count();
    assert_eq!(cal["experts_below_target"].as_u64(), Some(below as u64));
    let plain = r["calibration_without_balance"]["expert_tokens"].as_array().unwrap();
    for layer in plain {
        let sum: u64 = layer.as_array().unwrap().iter().map(|n| n.as_u64().unwrap()).sum();
        assert_eq!(sum, 8 * 64, "every calibration token routes to 8 experts");
    }
    // The router stays float as written.
    let desc: Value = serde_json::from_str(&std::fs::read_to_string(q.join(DESCRIPTION_FILE)).unwrap()).unwrap();
    assert_eq!(desc["model.layers.0.mlp.gate.weight"], "FLOAT");
}

#[test]
fn disabled_techniques_are_left_out_and_the_router_is_quantized() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, q) = (tmp.path().join("outliers"), tmp.path().join("q"));
    outlier_model(&model);
    let (ms, qs) = (model.to_str().unwrap(), q.to_str().unwrap());
    let args = ["quantize", ms, "-o", qs, "--calib-synthetic", "1", "--eval-prompts", "1"];
    ok(panguc(&[&args[..], &["--no-smooth", "--no-router-protect", "--no-balance"]].concat()));
    let r = report(&q);
    assert_eq!(r["results"].as_array().unwrap().len(), 1, "{r:#}");
    assert_eq!(r["techniques"]["router_protection"]["enabled"], false);
    // Without smoothing, W8A8_DYNAMIC needs no calibration at all.
    assert!(r["calibration"].is_null(), "{r:#}");
    let desc: Value = serde_json::from_str(&std::fs::read_to_string(q.join(DESCRIPTION_FILE)).unwrap()).unwrap();
    assert_eq!(desc["model.layers.0.mlp.gate.weight"], "W8A8_DYNAMIC");
    // The quantized router still runs.
    ok(panguc(&["run", qs, "--tokens", "1,17,42", "--max-new-tokens", "2"]));
    // --no-report writes no report.
    ok(panguc(&[&args[..], &["--force", "--no-report"]].concat()));
    assert!(!q.join("quant_report.json").exists());
    let o = panguc(&["quantize", ms, "-o", qs, "--calib-synthetic", "1", "--force", "--eval-prompts", "0"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--eval-prompts"), "{err}");
}
