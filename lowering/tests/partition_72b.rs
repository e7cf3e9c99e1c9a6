//! The real 72B config's batched program (ragged steps over a paged KV
//! cache of 16-token blocks, what packages run) partitioned for 8 devices:
//! per-device programs (snapshots), per-device weight bytes under 24 GB
//! with the h2p plan on 64 GB 910B cards, no weight lost (the union of the
//! shards is the single-device model), and the report's batch-B estimates.
//!
//! Fixture: `panguc dump-ir examples/pangu-pro-moe-72b --batched > lowering/tests/fixtures/pangu-72b-batched-imported.ir`

use panguc_ir::text::{parse_module, print_module};
use panguc_ir::{Module, Op, PanguConfig};
use panguc_lowering::builtin_profiles;
use panguc_lowering::fuse::{fuse_module, FuseOptions};
use panguc_lowering::partition::estimate::{module_weight_bytes, partition_report, DeviceSpec, Interconnect};
use panguc_lowering::partition::{partition_module, Dims, Layout, PlanChoice, PlanKind};

fn setup() -> (Module, Dims) {
    let path = format!("{}/tests/fixtures/pangu-72b-batched-imported.ir", env!("CARGO_MANIFEST_DIR"));
    let m = parse_module(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let (fused, _) = fuse_module(&m, &FuseOptions::default(), |_, _| Ok(())).unwrap();
    let cfg_path = format!("{}/../examples/pangu-pro-moe-72b/config.json", env!("CARGO_MANIFEST_DIR"));
    let cfg = PanguConfig::from_json_str(&std::fs::read_to_string(&cfg_path).unwrap(), &cfg_path).unwrap();
    (fused, Dims::from_config(&cfg))
}

#[test]
fn pangu_72b_on_8_devices() {
    let (fused, dims) = setup();
    let profile = builtin_profiles().into_iter().find(|p| p.name == "ascend910b1").unwrap();
    let spec = DeviceSpec {
        context: 2048,
        prefill_tokens: 2048,
        decode_batches: vec![1, 64],
        profile,
        link: Interconnect::hccs(),
    };
    let layout = Layout::new(dims, 8, PlanChoice::Auto).unwrap();
    assert_eq!(layout.plan, PlanKind::H2p);
    assert_eq!((layout.attn_tp, layout.expert_tp, layout.expert_ep(), layout.shared_tp), (4, 2, 4, 8));
    let parts = partition_module(&fused, "decoder_layer", &layout, &FuseOptions::default()).unwrap();
    let report = partition_report(&fused, &parts, &spec).unwrap();
    let single = module_weight_bytes(&fused);
    assert!((single - 143_977_562_112.0).abs() < 1.0, "single-device weight bytes {single}");
    let wb = &report["weight_bytes"];
    assert_eq!(wb["union_of_devices"].as_f64().unwrap(), single, "{wb}");
    assert_eq!((report["program"].as_str(), report["block_size"].as_u64()), (Some("batched"), Some(16)));
    for d in report["per_device"].as_array().unwrap() {
        let w = d["weight_bytes"].as_f64().unwrap();
        assert!(w < 24e9, "rank {} holds {w} bytes", d["rank"]);
        assert!(d["comm_bytes_decode_step"].as_f64().unwrap() > 0.0);
        assert!(d["ms_per_decode_step"].as_f64().unwrap() > 0.0);
        assert!(d["fits_memory"].as_bool().unwrap());
        // A decode step of 64 rows sends 64 times the rows of one.
        let b = d["decode_batches"].as_array().unwrap();
        let (c1, c64) = (b[0]["comm_bytes"].as_f64().unwrap(), b[1]["comm_bytes"].as_f64().unwrap());
        assert_eq!(c1, d["comm_bytes_decode_step"].as_f64().unwrap());
        assert!((c64 / c1 - 64.0).abs() < 1e-9, "{c1} vs {c64}");
    }
    eprintln!("{}", serde_json::to_string_pretty(&report).unwrap());
    // Per-device IR: rank 0 and rank 7 (last EP rank, second expert TP half,
    // second attention DP replica).
    for r in [0, 7] {
        let m = &parts.ranks[r].module;
        let colls =
            m.function("decoder_layer").unwrap().nodes.iter().filter(|n| matches!(n.op, Op::Collective { .. })).count();
        assert_eq!(colls, 4, "rank {r}: o-proj and MoE sums, each reduce_scatter + all_gather; got {colls}");
        insta::assert_snapshot!(format!("pangu_72b_h2p8_rank{r}"), print_module(m));
    }
}

#[test]
fn pangu_72b_ep_on_8_devices_replicates_attention() {
    let (fused, dims) = setup();
    let layout = Layout::new(dims, 8, PlanChoice::Ep).unwrap();
    let parts = partition_module(&fused, "decoder_layer", &layout, &FuseOptions::default()).unwrap();
    let single = module_weight_bytes(&fused);
    let per: Vec<f64> = parts.ranks.iter().map(|r| module_weight_bytes(&r.module)).collect();
    // Everything but the routed experts is on every device.
    let experts = 48.0 * 64.0 * 3.0 * 5120.0 * 1344.0 * 2.0;
    for w in &per {
        assert!((w - (single - experts + experts / 8.0)).abs() < 1.0, "{w}");
    }
    let modules: Vec<&Module> = parts.ranks.iter().map(|r| &r.module).collect();
    assert_eq!(panguc_lowering::partition::estimate::union_weight_bytes(&modules), single);
    insta::assert_snapshot!("pangu_72b_ep8_rank3", print_module(&parts.ranks[3].module));
}
