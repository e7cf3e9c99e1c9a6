//! The `published` section of `report.json`: every inference figure of
//! docs/pangu-pro-moe.md beside the estimate of the W8A8 program on the
//! published setup, with the relative error.
//!
//! The estimate of one figure is one forward step of the int8 program
//! (W8A8_DYNAMIC, built from the config alone, fused like the bf16 one)
//! on one device of the figure's partition plan:
//!
//! `step = kernels (one device's share, cube peaks derated) + collectives
//! of the plan over the figure's links + framework overhead per step`
//!
//! Prefill latency is the step (TTFT); decode latency is the step (TPOT).
//! Throughput per card is the step's new tokens over the step over the
//! cards. Every parameter comes from [`ServingParams`] and the chip
//! profiles, and is listed in the section with its provenance.

use crate::cost::Workload;
use crate::estimate::{function_cost_with, is_pangu_pro_moe_72b};
use crate::partition::estimate::{kernel_share, layout_comm, Interconnect};
use crate::partition::{Dims, Layout, PlanChoice};
use crate::profile::{HardwareProfile, ServingParams};
use anyhow::{anyhow, Result};
use panguc_ir::{Module, PanguConfig};
use serde::Serialize;
use serde_json::{json, Value};

/// Prefill (latency = time to first token) or decode (time per output token).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Prefill,
    Decode,
}

/// One row of the published inference table.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Figure {
    pub hardware: &'static str,
    /// The hardware profile of one chip.
    pub chip: &'static str,
    pub chips_per_card: usize,
    pub phase: Phase,
    pub batch: usize,
    /// Prompt length (prefill) or cached context per sequence (decode).
    pub seq: usize,
    pub cards: usize,
    /// Where the card count (and a sequence length the table omits) comes from.
    pub setup_note: &'static str,
    /// TTFT (prefill) or TPOT (decode), milliseconds.
    pub latency_ms: f64,
    /// Tokens per second per card.
    pub throughput_per_card: f64,
    /// Speculative decoding with multi-token prediction (not modelled).
    pub mtp: bool,
}

const A2: &str = "Ascend 800I A2";
const DUO: &str = "Ascend 300I Duo";

/// docs/pangu-pro-moe.md, "Published inference results (W8A8, per card)".
/// Where the table gives no card count, it follows from latency and
/// throughput: cards = batch x new tokens per sequence / (latency x
/// throughput per card).
pub const FIGURES: [Figure; 6] = [
    Figure {
        hardware: A2,
        chip: "ascend910b1",
        chips_per_card: 1,
        phase: Phase::Prefill,
        batch: 2,
        seq: 2048,
        cards: 2,
        setup_note: "cards derived: 2 x 2048 tokens / (0.424 s x 4828 tok/s per card) = 2.0",
        latency_ms: 424.0,
        throughput_per_card: 4828.0,
        mtp: false,
    },
    Figure {
        hardware: A2,
        chip: "ascend910b1",
        chips_per_card: 1,
        phase: Phase::Decode,
        batch: 1,
        seq: 2048,
        cards: 4,
        setup_note: "4 cards as published",
        latency_ms: 18.44,
        throughput_per_card: 14.0,
        mtp: false,
    },
    Figure {
        hardware: A2,
        chip: "ascend910b1",
        chips_per_card: 1,
        phase: Phase::Decode,
        batch: 456,
        seq: 2048,
        cards: 4,
        setup_note: "4 cards as published",
        latency_ms: 99.31,
        throughput_per_card: 1148.0,
        mtp: false,
    },
    Figure {
        hardware: A2,
        chip: "ascend910b1",
        chips_per_card: 1,
        phase: Phase::Decode,
        batch: 584,
        seq: 2048,
        cards: 4,
        setup_note: "cards derived: 584 / (0.09556 s x 1528 tok/s per card) = 4.0; seq as the other 800I A2 rows",
        latency_ms: 95.56,
        throughput_per_card: 1528.0,
        mtp: true,
    },
    Figure {
        hardware: DUO,
        chip: "ascend310p3",
        chips_per_card: 2,
        phase: Phase::Prefill,
        batch: 2,
        seq: 2048,
        cards: 2,
        setup_note: "2 cards as published (2 x 310P3 each); seq derived: 1055 tok/s x 2 cards x 1.94 s / 2 = 2047",
        latency_ms: 1940.0,
        throughput_per_card: 1055.0,
        mtp: false,
    },
    Figure {
        hardware: DUO,
        chip: "ascend310p3",
        chips_per_card: 2,
        phase: Phase::Decode,
        batch: 80,
        seq: 2048,
        cards: 4,
        setup_note: "cards derived: 80 / (0.0995 s x 201 tok/s per card) = 4.0 (8 x 310P3); context not published, 2048 as on 800I A2",
        latency_ms: 99.5,
        throughput_per_card: 201.0,
        mtp: false,
    },
];

impl Figure {
    pub fn devices(&self) -> usize {
        self.cards * self.chips_per_card
    }

    pub fn name(&self) -> String {
        let phase = match self.phase {
            Phase::Prefill => format!("prefill {} x {}", self.batch, self.seq),
            Phase::Decode => format!("decode batch {}", self.batch),
        };
        format!("{} {phase}{}", self.hardware, if self.mtp { " + MTP" } else { "" })
    }

    /// The step priced: a ragged batch over the paged cache.
    pub fn workload(&self, block_size: usize) -> Workload {
        match self.phase {
            Phase::Prefill => Workload {
                tokens: self.batch * self.seq,
                past: 0,
                seqs: self.batch,
                paged_block: Some(block_size.max(1)),
            },
            Phase::Decode => Workload::batched_decode(self.seq, self.batch, block_size),
        }
    }
}

/// The int8 program the figures are estimated from.
pub struct QuantProgram<'a> {
    /// Fused batched (paged KV cache) module.
    pub module: &'a Module,
    pub block_size: usize,
    /// What it was built as (scheme, router, KV cache, ...), for the report.
    pub description: Value,
}

/// `(new - old) / old`, rounded to 4 decimals.
pub fn relative_error(estimate: f64, published: f64) -> f64 {
    round4((estimate - published) / published)
}

fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

/// The published plan for `devices` chips (h2p on 8, else ep); where the
/// model's shape does not allow it (a small test model), ep.
fn layout_for(cfg: &PanguConfig, devices: usize) -> Result<Layout> {
    let dims = Dims::from_config(cfg);
    let choice = if devices == 8 { PlanChoice::H2p } else { PlanChoice::Ep };
    Layout::new(dims, devices, choice).or_else(|_| Layout::new(dims, devices, PlanChoice::Ep))
}

/// The estimate of one figure, as a JSON object (value, breakdown).
fn estimate(
    cfg: &PanguConfig,
    prog: &QuantProgram,
    fig: &Figure,
    chip: &HardwareProfile,
    params: &ServingParams,
) -> Result<Value> {
    let layout = layout_for(cfg, fig.devices())?;
    let link = if fig.chip.starts_with("ascend310p") {
        Interconnect::from_link("pcie-300i-duo", &params.pcie)
    } else {
        Interconnect::from_link("hccs-800i-a2", &params.hccs)
    };
    let w = fig.workload(prog.block_size);
    let derated = params.derate(chip);
    let share = kernel_share(&layout);
    let kernels = function_cost_with(prog.module, &prog.module.entry, &w, &derated, &share)?;
    let (hidden, layers) = (cfg.hidden_size as f64, cfg.num_hidden_layers as f64);
    let (comm_bytes, comm_s, collectives) =
        layout_comm(&layout, w.tokens as f64, hidden, chip.activation_bytes, layers, &link);
    let overhead_s = params.step_overhead_ms * 1e-3;
    let step_s = kernels.seconds + comm_s + overhead_s;
    let new_tokens = match fig.phase {
        Phase::Prefill => (fig.batch * fig.seq) as f64,
        Phase::Decode => fig.batch as f64,
    };
    let ms = |s: f64| (s * 1e7).round() / 1e4;
    Ok(json!({
        "latency_ms": ms(step_s),
        "throughput_per_card": (new_tokens / step_s / fig.cards as f64 * 10.0).round() / 10.0,
        "plan": layout.plan,
        "interconnect": link.name,
        "per_device": {
            "kernels_ms": ms(kernels.seconds),
            "compute_bound_kernels_ms": ms(kernels.compute_bound_seconds),
            "memory_bound_kernels_ms": ms(kernels.memory_bound_seconds),
            "launch_ms": ms(kernels.launch_seconds),
            "collectives_ms": ms(comm_s),
            "step_overhead_ms": ms(overhead_s),
            "kernels": kernels.kernels,
            "weight_bytes": kernels.weight_bytes.round(),
            "kv_bytes": kernels.kv_bytes.round(),
            "tera_ops": round4(kernels.flops / 1e12),
            "collectives": collectives,
            "bytes_sent": comm_bytes.round(),
        },
    }))
}

/// The `published` section for `cfg` and its int8 program on the chips of
/// `profiles` (the built-in ones with `--profiles` overrides applied).
pub fn published_section(
    cfg: &PanguConfig,
    prog: &QuantProgram,
    profiles: &[HardwareProfile],
    params: &ServingParams,
) -> Result<Value> {
    let chip = |name: &str| {
        profiles
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| anyhow!("the published estimates need the `{name}` profile"))
    };
    let mut figures = vec![];
    let mut errors = vec![];
    for fig in &FIGURES {
        let mut entry = json!({
            "figure": fig.name(),
            "hardware": fig.hardware,
            "phase": fig.phase,
            "configuration": {
                "cards": fig.cards,
                "devices": fig.devices(),
                "chip": fig.chip,
                "batch": fig.batch,
                "seq": fig.seq,
                "scheme": "W8A8_DYNAMIC",
                "mtp": fig.mtp,
                "note": fig.setup_note,
            },
            "unit": if fig.phase == Phase::Prefill { "ms (TTFT)" } else { "ms (TPOT)" },
            "published": fig.latency_ms,
            "published_throughput_per_card": fig.throughput_per_card,
            "throughput_unit": "tokens/s per card",
        });
        if fig.mtp {
            entry["estimate"] = Value::Null;
            entry["not_estimated"] = json!("multi-token prediction (speculative decoding) is not modelled");
            figures.push(entry);
            continue;
        }
        let est = estimate(cfg, prog, fig, chip(fig.chip)?, params)?;
        let latency = est["latency_ms"].as_f64().unwrap_or(f64::NAN);
        let throughput = est["throughput_per_card"].as_f64().unwrap_or(f64::NAN);
        entry["relative_error"] = json!(relative_error(latency, fig.latency_ms));
        entry["throughput_relative_error"] = json!(relative_error(throughput, fig.throughput_per_card));
        entry["configuration"]["plan"] = est["plan"].clone();
        entry["configuration"]["interconnect"] = est["interconnect"].clone();
        entry["estimate"] = json!(latency);
        entry["estimate_throughput_per_card"] = json!(throughput);
        entry["breakdown"] = est["per_device"].clone();
        errors.push(relative_error(latency, fig.latency_ms).abs());
        figures.push(entry);
    }
    let chips: Vec<&HardwareProfile> =
        ["ascend910b1", "ascend310p3"].iter().map(|n| chip(n)).collect::<Result<Vec<_>>>()?;
    let within = errors.iter().filter(|e| **e <= 0.25).count();
    Ok(json!({
        "source": "Pangu Pro MoE technical report (arXiv 2505.21411), as tabled in docs/pangu-pro-moe.md",
        "model_is_published_config": is_pangu_pro_moe_72b(cfg),
        "program": prog.description,
        "method": [
            "one forward step of the fused int8 program over a paged KV cache, priced kernel by kernel (cost model, cube peaks x cube_efficiency)",
            "one device's share under the figure's partition plan (ep; h2p on 8 devices): held weights, and work / devices for sharded kernels, / attention DP for the rest",
            "collectives of the plan per layer (attention TP reduce-scatter + all-gather, MoE all-gather + reduce-scatter) over the figure's links",
            "plus the framework overhead per step; latency = the step, throughput per card = new tokens / step / cards",
        ],
        "parameters": params.table(&chips),
        "figures": figures,
        "estimated": errors.len(),
        "within_25_percent": within,
        "max_abs_relative_error": errors.iter().copied().fold(0.0, f64::max),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_error_is_signed_and_relative_to_the_published_value() {
        assert_eq!(relative_error(110.0, 100.0), 0.1);
        assert_eq!(relative_error(75.0, 100.0), -0.25);
        assert_eq!(relative_error(18.44, 18.44), 0.0);
    }

    #[test]
    fn figures_agree_with_their_own_throughput() {
        // Latency, batch and card count give the published per-card
        // throughput within rounding: the derived card counts are right.
        for f in FIGURES {
            let new_tokens = if f.phase == Phase::Prefill { f.batch * f.seq } else { f.batch } as f64;
            let per_card = new_tokens / (f.latency_ms * 1e-3) / f.cards as f64;
            let err = (per_card - f.throughput_per_card).abs() / f.throughput_per_card;
            assert!(err < 0.05, "{}: {per_card} vs {}", f.name(), f.throughput_per_card);
        }
    }
}
