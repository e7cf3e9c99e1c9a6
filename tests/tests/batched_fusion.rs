//! Fusion of the batched import (ragged steps over a paged KV cache) on the
//! tiny model: the fused decoder layer keeps the contiguous pipeline's
//! kernel budget, its IR is snapshotted, translation validation runs it on
//! ragged steps, and its logits over a ragged schedule equal the unfused
//! batched module's and the per-sequence interpreter's.

mod common;

use panguc_ir::batch::{SeqChunk, StepMetadata};
use panguc_ir::interp::Interpreter;
use panguc_ir::session::BatchInterpSession;
use panguc_ir::text::print_module;
use panguc_ir::Module;
use panguc_lowering::fuse::{fuse_module, FunctionStats, FuseOptions};
use panguc_lowering::kernel_count;
use panguc_lowering::validate::validate_session;

const BLOCK_SIZE: usize = 2;

fn batched_and_fused(ckpt: &panguc::frontend::Checkpoint) -> (Module, Module, Vec<FunctionStats>) {
    let imported =
        panguc::commands::import_with(ckpt, panguc::import::KvLayout::Paged { block_size: BLOCK_SIZE }).unwrap();
    let (fused, stats) = fuse_module(&imported, &FuseOptions::default(), |_, _| Ok(())).unwrap();
    (imported, fused, stats)
}

fn max_rel_diff(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    got.iter().zip(want).map(|(x, y)| (x - y).abs() / x.abs().max(y.abs()).max(1e-3)).fold(0.0, f32::max)
}

#[test]
fn fused_batched_layer_fits_the_kernel_budget_and_matches_on_ragged_steps() {
    let ckpt = common::checkpoint();
    let cfg = ckpt.config().clone();
    let (imported, fused, stats) = batched_and_fused(&ckpt);
    let layer = stats.iter().find(|s| s.function == "decoder_layer").unwrap();
    assert_eq!(layer.stop_reason, "saturated", "{layer:?}");
    let kernels = kernel_count(fused.function("decoder_layer").unwrap());
    assert!(kernels <= 7, "{kernels} kernels:\n{}", print_module(&fused));
    for rule in ["add-rmsnorm", "qkv-rope-cache-write", "moe-router", "moe-shared-residual"] {
        assert!(layer.rules_chosen.contains_key(rule), "{rule} not in the fused layer: {:?}", layer.rules_chosen);
    }
    insta::assert_snapshot!("tiny_batched_fused", print_module(&fused));

    // Two sequences: B's whole prompt with A's first chunk, then A's rest
    // with B's first decode, then decodes in changing order. Blocks handed
    // out in a scrambled order.
    let kv = [cfg.num_key_value_heads, cfg.head_dim()];
    let layers = cfg.num_hidden_layers;
    let mut unfused = BatchInterpSession::new(Interpreter::new(&imported, &ckpt), layers, 12, BLOCK_SIZE, kv);
    let mut fast = BatchInterpSession::new(Interpreter::new(&fused, &ckpt), layers, 12, BLOCK_SIZE, kv);
    let tokens: [&[i64]; 2] = [&[5, 17, 42, 99, 3, 8, 64], &[250, 7, 1, 33, 2]];
    let schedule: [&[(usize, usize)]; 4] = [&[(0, 3), (1, 3)], &[(1, 1), (0, 2)], &[(0, 1), (1, 1)], &[(0, 1)]];
    let mut free: Vec<u32> = vec![8, 1, 10, 6, 3, 11, 0, 4, 2, 9, 5, 7];
    let mut cached = [0usize; 2];
    let mut blocks: [Vec<u32>; 2] = [vec![], vec![]];
    let mut rows: [Vec<Vec<f32>>; 2] = [vec![], vec![]];
    for step in schedule {
        let mut ids = vec![];
        for &(s, n) in step {
            while blocks[s].len() * BLOCK_SIZE < cached[s] + n {
                blocks[s].push(free.pop().unwrap());
            }
            ids.extend_from_slice(&tokens[s][cached[s]..cached[s] + n]);
        }
        let chunks: Vec<SeqChunk> =
            step.iter().map(|&(s, n)| SeqChunk { past: cached[s], new_tokens: n, blocks: &blocks[s] }).collect();
        let meta = StepMetadata::build(BLOCK_SIZE, &chunks).unwrap();
        let want = unfused.step(&ids, &meta).unwrap();
        let got = fast.step(&ids, &meta).unwrap();
        let err = max_rel_diff(got.as_f32(), want.as_f32());
        assert!(err < 1e-5, "step {step:?}: fused vs unfused batched logits differ by {err}");
        for (i, &(s, n)) in step.iter().enumerate() {
            let r = meta.rows(i);
            rows[s].extend(
                got.as_f32()[r.start * cfg.vocab_size..r.end * cfg.vocab_size]
                    .chunks(cfg.vocab_size)
                    .map(<[f32]>::to_vec),
            );
            cached[s] += n;
        }
    }
    // The per-sequence interpreter: each sequence alone, whole prefix in one call.
    let reference = common::module(&ckpt, common::Graph::Imported);
    for s in 0..2 {
        let mut alone = common::session(&reference, &ckpt);
        let want = alone.forward(&tokens[s][..cached[s]]).unwrap();
        let want: Vec<&[f32]> = want.as_f32().chunks(cfg.vocab_size).collect();
        assert_eq!(rows[s].len(), want.len(), "sequence {s}: rows");
        for (pos, (got, want)) in rows[s].iter().zip(want).enumerate() {
            let err = max_rel_diff(got, want);
            assert!(err < 1e-5, "sequence {s} position {pos}: fused batched vs per-sequence differ by {err}");
        }
    }
}

#[test]
fn validate_runs_the_batched_modules_on_ragged_steps_and_catches_a_wrong_fusion() {
    let ckpt = common::checkpoint();
    let layers = ckpt.config().num_hidden_layers;
    let (imported, fused, _) = batched_and_fused(&ckpt);
    let report = validate_session(&imported, &fused, &ckpt, "checkpoint", 3, 9).unwrap();
    // logits + 2 caches per layer, at the ragged prefill and the ragged decode.
    assert_eq!(report.checks.len(), 2 * (1 + 2 * layers), "{report:?}");
    assert!(report.checks.iter().any(|c| c.phase == "ragged decode"), "{report:?}");
    assert!(report.max_relative_error < 1e-5, "{report:?}");
    // Swap the k and v caches the fused layer returns: types stay intact.
    let mut wrong = fused.clone();
    wrong.functions.get_mut("decoder_layer").unwrap().outputs.swap(1, 2);
    let err = validate_session(&imported, &wrong, &ckpt, "checkpoint", 3, 9).unwrap_err().to_string();
    assert!(err.contains("translation validation failed") && err.contains("ragged"), "{err}");
}

#[test]
fn batched_decode_estimates_come_from_the_batched_program() {
    use panguc_lowering::estimate::{estimates, estimates_with_batched, BatchedProgram, EstimateSpec};
    let ckpt = common::checkpoint();
    let cfg = ckpt.config();
    let (_, fused_batched, _) = batched_and_fused(&ckpt);
    let imported = panguc::commands::import(&ckpt).unwrap();
    let (fused, _) = fuse_module(&imported, &FuseOptions::default(), |_, _| Ok(())).unwrap();
    let profiles = panguc_lowering::builtin_profiles();
    let spec = EstimateSpec { context: 64, decode_batches: vec![1, 8], prefill_tokens: 32 };
    let per_seq = estimates(cfg, &fused, &imported, &profiles, &spec).unwrap();
    let bp = BatchedProgram { module: &fused_batched, block_size: BLOCK_SIZE };
    let batched = estimates_with_batched(cfg, &fused, &imported, Some(bp), &profiles, &spec).unwrap();
    for p in &profiles {
        for b in [1, 8] {
            let key = format!("decode_batch_{b}");
            let (a, c) = (&per_seq["profiles"][&p.name][&key], &batched["profiles"][&p.name][&key]);
            assert_eq!(c["program"], "batched", "{c}");
            // Same report keys as the per-sequence estimate.
            let keys = |v: &serde_json::Value| {
                v.as_object().unwrap().keys().filter(|k| *k != "program").cloned().collect::<Vec<_>>()
            };
            assert_eq!(keys(a), keys(c), "{}/{key}", p.name);
            // One run over B rows reads what B per-sequence runs read: every
            // shared weight once, the distinct experts of B tokens, B
            // embedding rows, and each sequence's context of K and V.
            for field in ["weight_bytes", "kv_bytes", "kernels"] {
                assert_eq!(a[field], c[field], "{}/{key}/{field}: per-sequence {a} vs batched {c}", p.name);
            }
            let (ms_a, ms_c) = (a["ms_per_step"].as_f64().unwrap(), c["ms_per_step"].as_f64().unwrap());
            assert!(ms_c > 0.0, "{c}");
            eprintln!("{}/{key}: per-sequence program {ms_a} ms, batched program {ms_c} ms", p.name);
        }
    }
    // And the untouched report: no `program` key without a batched program.
    assert!(per_seq["profiles"][&profiles[0].name]["decode_batch_8"].get("program").is_none());
}
