//! Load balance of expert groups across devices: for random token batches
//! on the tiny model, every device processes exactly tokens x (groups per
//! device) expert slots (imbalance score 0), while an ungrouped top-8 over
//! all 64 experts on the same router probabilities is imbalanced.

use panguc_ir::interp::{moe_gating, rms_norm};
use panguc_ir::kernels::{matmul, softmax};
use panguc_ir::text::parse_module;
use panguc_ir::{Module, Op, PanguConfig, Tensor, WeightSource};
use panguc_lowering::fuse::{fuse_module, FuseOptions};
use panguc_lowering::partition::{partition_module, Dims, Layout, PlanChoice};
use panguc_lowering::validate::random_weights;

/// `(max - min) / tokens` over per-device slot counts.
fn imbalance(counts: &[usize], tokens: usize) -> f64 {
    (counts.iter().max().unwrap() - counts.iter().min().unwrap()) as f64 / tokens as f64
}

#[test]
fn expert_groups_balance_devices_exactly() {
    let path = format!("{}/tests/fixtures/tiny-imported.ir", env!("CARGO_MANIFEST_DIR"));
    let m: Module = parse_module(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let cfg_path = format!("{}/../examples/tiny-pangu/config.json", env!("CARGO_MANIFEST_DIR"));
    let cfg = PanguConfig::from_json_str(&std::fs::read_to_string(&cfg_path).unwrap(), &cfg_path).unwrap();
    let dims = Dims::from_config(&cfg);
    let (e, g, h, v) = (cfg.num_experts, cfg.num_groups(), cfg.hidden_size, cfg.vocab_size);
    let w = random_weights(&m, 11, 1 << 24).unwrap();
    let embed = w.load_f32("model.embed_tokens.weight", &[v, h]).unwrap();
    let norm = w.load_f32("model.layers.0.post_attention_layernorm.weight", &[h]).unwrap();
    let gate = w.load_f32("model.layers.0.mlp.gate.weight", &[e, h]).unwrap();
    let scale = w.load_f32("model.layers.0.mlp.router_scale", &[1, e]).unwrap();
    let scale = Tensor::f32(vec![e], scale.into_f32());

    let mut seed = 0x1234_5678u64;
    let mut worst_ungrouped: f64 = 0.0;
    for n in [2usize, 4, 8] {
        let layout = Layout::new(dims, n, PlanChoice::Ep).unwrap();
        for batch in 0..16 {
            let tokens = 8 + 4 * batch;
            let ids: Vec<usize> = (0..tokens)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    (seed >> 33) as usize % v
                })
                .collect();
            let rows: Vec<f32> = ids.iter().flat_map(|&i| embed.as_f32()[i * h..(i + 1) * h].to_vec()).collect();
            let x = rms_norm(&Tensor::f32(vec![tokens, h], rows), &norm, cfg.rms_norm_eps);
            let logits = matmul(&x, &gate, true).unwrap();
            let routed = moe_gating(&logits, &scale, g).unwrap();
            // Grouped routing: slots per device under the layout.
            let mut grouped = vec![0usize; n];
            for &ex in routed[1].as_i64() {
                let d = (0..n).find(|&r| {
                    let (e0, e1) = layout.local_experts(r);
                    (e0..e1).contains(&(ex as usize))
                });
                grouped[d.unwrap()] += 1;
            }
            assert!(grouped.iter().all(|&c| c == tokens * layout.groups_per_rank()), "N={n}: {grouped:?}");
            assert_eq!(imbalance(&grouped, tokens), 0.0);
            // Ungrouped top-8 over all 64 experts of the same probabilities,
            // experts placed on devices in the same contiguous blocks.
            let p = softmax(&logits, 1);
            let mut ungrouped = vec![0usize; n];
            for t in 0..tokens {
                let row = &p.as_f32()[t * e..(t + 1) * e];
                let mut order: Vec<usize> = (0..e).collect();
                order.sort_by(|a, b| row[*b].total_cmp(&row[*a]).then(a.cmp(b)));
                for &ex in &order[..cfg.num_experts_per_tok] {
                    ungrouped[ex / (e / n)] += 1;
                }
            }
            assert_eq!(ungrouped.iter().sum::<usize>(), tokens * cfg.num_experts_per_tok);
            worst_ungrouped = worst_ungrouped.max(imbalance(&ungrouped, tokens));
        }
    }
    assert!(worst_ungrouped > 0.25, "ungrouped top-8 should be imbalanced, score {worst_ungrouped}");
    eprintln!("grouped imbalance 0; ungrouped top-8 worst imbalance {worst_ungrouped:.3}");
}

/// The same holds by construction in the partitioned programs: each rank's
/// grouped matmul reads routing columns of exactly its groups.
#[test]
fn rank_programs_route_exactly_their_groups() {
    let path = format!("{}/tests/fixtures/tiny-imported.ir", env!("CARGO_MANIFEST_DIR"));
    let m: Module = parse_module(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let (fused, _) = fuse_module(&m, &FuseOptions::default(), |_, _| Ok(())).unwrap();
    let cfg_path = format!("{}/../examples/tiny-pangu/config.json", env!("CARGO_MANIFEST_DIR"));
    let cfg = PanguConfig::from_json_str(&std::fs::read_to_string(&cfg_path).unwrap(), &cfg_path).unwrap();
    for n in [2, 4, 8] {
        let layout = Layout::new(Dims::from_config(&cfg), n, PlanChoice::Ep).unwrap();
        let parts = partition_module(&fused, "decoder_layer", &layout, &FuseOptions::default()).unwrap();
        for r in &parts.ranks {
            let f = r.module.function("decoder_layer").unwrap();
            let gmm = f.nodes.iter().find(|x| matches!(x.op, Op::GroupedMatmulMoe)).unwrap();
            let ids = f.ty(gmm.args[2]);
            assert_eq!(ids.shape[1].as_const(), Some(layout.groups_per_rank()), "rank {}", r.rank);
            let gu = f.ty(gmm.args[3]);
            assert_eq!(gu.shape[0].as_const(), Some(cfg.num_experts / n), "rank {} holds E/N experts", r.rank);
        }
    }
}
