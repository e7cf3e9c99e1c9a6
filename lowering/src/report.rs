//! The fusion report (`report.json`) and its human summary.

use crate::fuse::{FunctionStats, Limits};
use crate::validate::ValidationReport;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::fmt::Write;

/// Everything the report is made from.
pub struct ReportInput<'a> {
    pub import_seconds: f64,
    pub stats: &'a [FunctionStats],
    pub limits: &'a Limits,
    /// Name of the profile extraction minimised time on.
    pub cost_profile: &'a str,
    /// The decoder-layer function, for `kernels_per_decoder_layer`.
    pub layer_fn: &'a str,
    pub estimates: Value,
    pub validation: Option<&'a ValidationReport>,
}

fn sum_maps<'a>(maps: impl Iterator<Item = &'a BTreeMap<String, usize>>) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for m in maps {
        for (k, v) in m {
            *out.entry(k.clone()).or_default() += v;
        }
    }
    out
}

/// Build `report.json` (with `scheduling` and `codegen` phases at 0 for
/// later stages to fill) and the summary printed by `panguc compile`.
pub fn build_report(input: &ReportInput) -> (Value, String) {
    let saturation: f64 = input.stats.iter().map(|s| s.saturation_seconds).sum();
    let extraction: f64 = input.stats.iter().map(|s| s.extraction_seconds).sum();
    let fired = sum_maps(input.stats.iter().map(|s| &s.rules_fired));
    let chosen = sum_maps(input.stats.iter().map(|s| &s.rules_chosen));
    let layer = input.stats.iter().find(|s| s.function == input.layer_fn);
    let not_saturated = input.stats.iter().find(|s| s.stop_reason != "saturated");
    let mut functions = Map::new();
    for s in input.stats {
        functions.insert(
            s.function.clone(),
            json!({
                "nodes": s.egraph_nodes,
                "classes": s.egraph_classes,
                "iterations": s.iterations,
                "stop_reason": s.stop_reason,
                "limit_note": s.limit_note,
                "kernels_before": s.kernels_before,
                "kernels_after": s.kernels_after,
                "cost_model_seconds_before": s.cost_before,
                "cost_model_seconds_after": s.cost_after,
                "rules_fired": s.rules_fired,
                "rules_chosen": s.rules_chosen,
            }),
        );
    }
    let mut report = json!({
        "phases": {
            "import": input.import_seconds,
            "saturation": saturation,
            "extraction": extraction,
            "scheduling": 0.0,
            "codegen": 0.0,
        },
        "egraph": {
            "nodes": input.stats.iter().map(|s| s.egraph_nodes).sum::<usize>(),
            "classes": input.stats.iter().map(|s| s.egraph_classes).sum::<usize>(),
            "iterations": input.stats.iter().map(|s| s.iterations).max().unwrap_or(0),
            "stop_reason": not_saturated.map_or("saturated".to_string(), |s| format!("{} (@{})", s.stop_reason, s.function)),
            "limits": {
                "iter_limit": input.limits.iter_limit,
                "node_limit": input.limits.node_limit,
                "time_limit_seconds": input.limits.time_limit.as_secs_f64(),
            },
            "cost_profile": input.cost_profile,
            "functions": Value::Object(functions),
        },
        "rules_fired": fired,
        "rules_chosen": chosen,
        "kernels_per_decoder_layer": {
            "unfused": layer.map(|s| s.kernels_before),
            "fused": layer.map(|s| s.kernels_after),
        },
        "estimates": input.estimates,
    });
    if let Some(v) = input.validation {
        report["validation"] = serde_json::to_value(v).unwrap_or(Value::Null);
    }
    (report.clone(), summary(input, &report, &fired, &chosen))
}

fn summary(
    input: &ReportInput,
    report: &Value,
    fired: &BTreeMap<String, usize>,
    chosen: &BTreeMap<String, usize>,
) -> String {
    let mut s = String::new();
    for st in input.stats {
        let _ = writeln!(
            s,
            "fusion @{}: {} -> {} kernels ({}, iterations {}, {} e-nodes, {} classes, {:.3} s + {:.3} s extraction)",
            st.function,
            st.kernels_before,
            st.kernels_after,
            st.stop_reason,
            st.iterations,
            st.egraph_nodes,
            st.egraph_classes,
            st.saturation_seconds,
            st.extraction_seconds
        );
        if let Some(note) = &st.limit_note {
            let _ = writeln!(s, "  warning: {note}");
        }
    }
    let list = |m: &BTreeMap<String, usize>| m.iter().map(|(k, v)| format!("{k} x{v}")).collect::<Vec<_>>().join(", ");
    let _ = writeln!(s, "rules fired:  {}", list(fired));
    let _ = writeln!(s, "rules chosen: {}", list(chosen));
    if let Some(v) = input.validation {
        let _ = writeln!(
            s,
            "validation: {} outputs match ({} weights, prefill {} tokens + 1 decode step), max relative error {:.2e}",
            v.checks.len(),
            v.weights,
            v.prefill_tokens,
            v.max_relative_error
        );
    }
    let est = &report["estimates"];
    if let Some(profiles) = est["profiles"].as_object() {
        let _ = writeln!(s, "estimates at {} tokens of context (cost model, one device):", est["context"]);
        let _ = writeln!(
            s,
            "  {:<12} {:>12} {:>13} {:>14} {:>16} {:>8}",
            "profile", "decode b1 ms", "decode b64 ms", "prefill 2k ms", "weights/step MB", "/ideal"
        );
        for (name, p) in profiles {
            let d1 = &p["decode_batch_1"];
            let _ = writeln!(
                s,
                "  {:<12} {:>12.3} {:>13.3} {:>14.1} {:>16.1} {:>8.4}",
                name,
                d1["ms_per_token"].as_f64().unwrap_or(f64::NAN),
                p["decode_batch_64"]["ms_per_step"].as_f64().unwrap_or(f64::NAN),
                p["prefill_2048"]["ms"].as_f64().unwrap_or(f64::NAN),
                d1["weight_bytes"].as_f64().unwrap_or(f64::NAN) / 1e6,
                d1["weight_read_ratio"].as_f64().unwrap_or(f64::NAN),
            );
        }
    }
    if let Some(p) = est.get("published") {
        let _ = writeln!(
            s,
            "published (800I A2, W8A8, 4 cards): decode b1 {} ms; this estimate scaled to W8A8 on 4 devices: {} ms (lower bound, see report)",
            p["decode_batch_1_tpot_ms_4_cards"], p["estimate_decode_batch_1_ms_scaled_w8a8_4_devices"]
        );
    }
    s
}
