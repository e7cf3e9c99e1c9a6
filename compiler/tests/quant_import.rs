//! msModelSlim checkpoints end to end on the reference interpreter: a
//! W8A8_DYNAMIC and a static W8A8 (+ C8 KV cache) checkpoint written from
//! the tiny model, opened, imported as int8 IR and run greedily beside the
//! float model; plus the errors a bad description or missing scale gives.

use panguc::commands::import;
use panguc::frontend::quant::DESCRIPTION_FILE;
use panguc::frontend::Checkpoint;
use panguc::quantize::{write_quantized, QuantizeOptions, Scheme};
use panguc::synth::{synth_with, Preset, SynthOptions};
use panguc_ir::interp::quant::decode_deq_scale;
use panguc_ir::interp::Interpreter;
use panguc_ir::session::InterpSession;
use panguc_ir::{DType, Tensor, WeightSource};
use std::path::{Path, PathBuf};
use std::process::Command;

fn tiny(dtype: DType) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("float");
    synth_with(&dir, &SynthOptions { preset: Preset::Tiny, seed: 7, dtype, force: false }).unwrap();
    (tmp, dir)
}

fn calib_prompts() -> Vec<Vec<i64>> {
    vec![(1..40).map(|i| (i * 37) % 256).collect(), (3..30).map(|i| (i * 11 + 5) % 256).collect()]
}

const PROMPT: [i64; 6] = [1, 17, 42, 99, 3, 250];

/// Greedy generation on the interpreter: the logits of the prompt's last
/// position, then `n` generated tokens.
fn greedy(dir: &Path, n: usize) -> (Vec<f32>, Vec<i64>) {
    let ck = Checkpoint::open(dir).unwrap();
    let module = import(&ck).unwrap();
    let c = ck.config().clone();
    let mut s =
        InterpSession::new(Interpreter::new(&module, &ck), c.num_hidden_layers, [c.num_key_value_heads, c.head_dim()]);
    let mut logits = s.forward(&PROMPT).unwrap();
    let vocab = c.vocab_size;
    let last = |l: &Tensor| l.as_f32()[l.numel() - vocab..].to_vec();
    let first = last(&logits);
    let mut out = vec![];
    for _ in 0..n {
        let row = last(&logits);
        let next = (0..vocab).max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a))).unwrap() as i64;
        out.push(next);
        logits = s.forward(&[next]).unwrap();
    }
    (first, out)
}

/// Quantized vs float greedy runs: the prompt logits stay within a tenth of
/// the float logits' spread (per-channel/per-token int8 keeps each linear's
/// relative error near 1%); the first token must agree whenever the float
/// model's top-1 margin exceeds twice the largest logit error (then the
/// argmax cannot move). Later tokens legitimately may differ: reported.
fn compare(label: &str, float: &Path, quant: &Path) {
    let n = 8;
    let (fl, ft) = greedy(float, n);
    let (ql, qt) = greedy(quant, n);
    let err = fl.iter().zip(&ql).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    let spread =
        fl.iter().copied().fold(f32::NEG_INFINITY, f32::max) - fl.iter().copied().fold(f32::INFINITY, f32::min);
    let mut sorted = fl.clone();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let margin = sorted[0] - sorted[1];
    let agree = ft.iter().zip(&qt).take_while(|(a, b)| a == b).count();
    eprintln!(
        "{label}: max |logit error| {err:.4} (float spread {spread:.3}, top-1 margin {margin:.4}); \
         greedy tokens agree on the first {agree} of {n}: float {ft:?} quantized {qt:?}"
    );
    assert!(err.is_finite() && err < 0.1 * spread, "{label}: logit error {err} vs spread {spread}");
    if margin > 2.0 * err {
        assert_eq!(ft[0], qt[0], "{label}: the margin {margin} exceeds twice the error {err}");
    }
}

fn decoder_ops(dir: &Path) -> Vec<String> {
    let ck = Checkpoint::open(dir).unwrap();
    let m = import(&ck).unwrap();
    m.functions["decoder_layer"].nodes.iter().map(|n| n.op.mnemonic().to_string()).collect()
}

#[test]
fn w8a8_dynamic_checkpoint_imports_as_int8_ir_and_runs() {
    let (tmp, float) = tiny(DType::BF16);
    let q = tmp.path().join("w8a8_dynamic");
    let opts = QuantizeOptions { scheme: Scheme::W8A8Dynamic, kv_int8: false, calib: vec![], smooth_alpha: None };
    let summary = write_quantized(&Checkpoint::open(&float).unwrap(), &q, &opts).unwrap();
    // 2 layers x (4 attention + 64 experts x 3 + 3 shared) linears.
    assert_eq!(summary.quantized_modules, 2 * (4 + 64 * 3 + 3));

    let ck = Checkpoint::open(&q).unwrap();
    assert!(ck.unexpected_tensors().is_empty(), "{:?}", ck.unexpected_tensors());
    assert!(ck.bytes_by_dtype().contains_key("i8"));
    let name = "model.layers.1.mlp.experts.3.down_proj.weight";
    assert_eq!(ck.tensor_info(name).unwrap().0, DType::I8);

    let ops = decoder_ops(&q);
    let count = |m: &str| ops.iter().filter(|o| *o == m).count();
    // q, k, v, o, shared gate/up/down, and the stacked experts' gate, up, down.
    assert_eq!(count("quant_matmul_per_token"), 10, "{ops:?}");
    assert_eq!(count("dynamic_quant"), 10);
    // Only the router stays a float matmul (plus attention's two).
    assert_eq!(count("matmul"), 3, "{ops:?}");
    compare("W8A8_DYNAMIC", &float, &q);
}

#[test]
fn static_w8a8_fp16_with_int8_kv_cache() {
    let (tmp, float) = tiny(DType::F16);
    let q = tmp.path().join("w8a8_c8");
    let opts = QuantizeOptions { scheme: Scheme::W8A8, kv_int8: true, calib: calib_prompts(), smooth_alpha: None };
    write_quantized(&Checkpoint::open(&float).unwrap(), &q, &opts).unwrap();
    let ck = Checkpoint::open(&q).unwrap();
    let desc = ck.quant().unwrap();
    assert!(desc.kv_int8);
    assert!(ck.unexpected_tensors().is_empty(), "{:?}", ck.unexpected_tensors());

    // The writer's tensors follow quantization.md, recomputed here:
    // deq_scale = input_scale * weight_scale (int64 words for an fp16 model),
    // quant_bias = round(bias / deq_scale - input_offset * sum_k weight[n, k]).
    let (c, fck) = (ck.config().clone(), Checkpoint::open(&float).unwrap());
    let (h, i, is_) = (c.hidden_size, c.moe_intermediate_size, c.shared_expert_intermediate_size);
    let modules = [
        ("self_attn.q_proj", c.q_dim(), h),
        ("self_attn.k_proj", c.kv_dim(), h),
        ("self_attn.o_proj", h, c.q_dim()),
        ("mlp.shared_expert.down_proj", h, is_),
        ("mlp.experts.5.down_proj", h, i),
        ("mlp.experts.2.up_proj", i, h),
    ];
    let mut offsets = vec![];
    for (rel, n, k) in modules {
        let t = |s: &str| format!("model.layers.0.{rel}.{s}");
        assert_eq!(ck.tensor_info(&t("deq_scale")).unwrap().0, DType::I64, "{rel}");
        let deq: Vec<f32> =
            ck.load_i64(&t("deq_scale"), &[n]).unwrap().as_i64().iter().map(|&w| decode_deq_scale(w)).collect();
        let is = ck.load_f32(&t("input_scale"), &[1]).unwrap().as_f32()[0];
        let io = ck.load_f32(&t("input_offset"), &[1]).unwrap().as_f32()[0];
        let ws = ck.load_f32(&t("weight_scale"), &[n, 1]).unwrap();
        let w = ck.load_i64(&t("weight"), &[n, k]).unwrap();
        let qb = ck.load_i64(&t("quant_bias"), &[n]).unwrap();
        let bias =
            if fck.has_tensor(&t("bias")) { fck.load_f32(&t("bias"), &[n]).unwrap().into_f32() } else { vec![0.0; n] };
        offsets.push(io);
        for r in 0..n {
            assert_eq!(deq[r], is * ws.as_f32()[r], "{rel} row {r}");
            let row_sum: i64 = w.as_i64()[r * k..(r + 1) * k].iter().sum();
            let want = (bias[r] as f64 / deq[r] as f64 - io as f64 * row_sum as f64).round();
            assert!((qb.as_i64()[r] as f64 - want).abs() <= 1.0, "{rel} row {r}: {} vs {want}", qb.as_i64()[r]);
        }
        // A static module's float bias is folded, not stored.
        assert!(!ck.has_tensor(&t("bias")), "{rel}");
    }
    assert!(
        offsets.iter().any(|o| *o != 0.0),
        "no asymmetric input range, so the offset fold is untested: {offsets:?}"
    );
    let ops = decoder_ops(&q);
    let count = |m: &str| ops.iter().filter(|o| *o == m).count();
    assert_eq!(count("quant_matmul"), 10, "{ops:?}");
    // Activations: q/k/v (once: calibration gives the one normed row one
    // range, so their input scales and offsets are equal), o, shared
    // gate/up/down, experts gate/up/down; then the two KV rows.
    assert_eq!(count("quantize"), 10, "{ops:?}");
    assert_eq!(count("dequantize"), 2, "{ops:?}");
    let module = import(&ck).unwrap();
    let entry = module.entry_fn();
    let cache = entry.input_params().nth(2).unwrap();
    assert_eq!(entry.ty(cache.value).dtype, DType::I8, "C8 caches are int8");
    compare("W8A8 static + C8", &float, &q);
}

fn edit_description(dir: &Path, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let path = dir.join(DESCRIPTION_FILE);
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(v.as_object_mut().unwrap());
    std::fs::write(&path, v.to_string()).unwrap();
}

#[test]
fn bad_descriptions_and_missing_scales_are_named() {
    let (tmp, float) = tiny(DType::BF16);
    let q = tmp.path().join("q");
    let opts = QuantizeOptions { scheme: Scheme::W8A8Dynamic, kv_int8: false, calib: vec![], smooth_alpha: None };
    write_quantized(&Checkpoint::open(&float).unwrap(), &q, &opts).unwrap();
    let name = "model.layers.1.self_attn.o_proj.weight";

    edit_description(&q, |d| {
        d.insert(name.into(), "W4A16".into());
    });
    let e = format!("{:#}", Checkpoint::open(&q).unwrap_err());
    assert!(e.contains(name) && e.contains("W4A16") && e.contains(DESCRIPTION_FILE), "{e}");

    // Declared static W8A8, but the file has only the dynamic scales.
    edit_description(&q, |d| {
        d.insert(name.into(), "W8A8".into());
    });
    let e = format!("{:#}", Checkpoint::open(&q).unwrap_err());
    assert!(e.contains("model.layers.1.self_attn.o_proj.input_scale") && e.contains("W8A8 module"), "{e}");

    // Declared FLOAT, but the weight is int8.
    edit_description(&q, |d| {
        d.insert(name.into(), "FLOAT".into());
    });
    let e = format!("{:#}", Checkpoint::open(&q).unwrap_err());
    assert!(e.contains(name) && e.contains("i8"), "{e}");

    // Not listed at all.
    edit_description(&q, |d| {
        d.remove(name);
    });
    let e = format!("{:#}", Checkpoint::open(&q).unwrap_err());
    assert!(e.contains(name) && e.contains("not listed"), "{e}");

    // The CLI gives one clean error line.
    let out = Command::new(env!("CARGO_BIN_EXE_panguc")).args(["inspect", q.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.starts_with("error: ") && !err.contains("panicked"), "{err}");
    assert!(err.contains(name), "{err}");
}

#[test]
fn cli_inspects_and_runs_a_quantized_checkpoint() {
    let (tmp, float) = tiny(DType::BF16);
    let q = tmp.path().join("q");
    let opts = QuantizeOptions { scheme: Scheme::W8A8Dynamic, kv_int8: false, calib: vec![], smooth_alpha: None };
    write_quantized(&Checkpoint::open(&float).unwrap(), &q, &opts).unwrap();
    let qs = q.to_str().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_panguc")).args(["inspect", qs]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("quantization   W8A8_DYNAMIC"), "{text}");
    assert!(text.contains("model.layers.*.mlp.experts.*.down_proj: W8A8_DYNAMIC x128"), "{text}");
    assert!(text.contains("model.layers.*.mlp.gate: FLOAT x2"), "{text}");
    assert!(text.contains("i8 "), "{text}");
    let out = Command::new(env!("CARGO_BIN_EXE_panguc"))
        .args(["run", qs, "--engine", "interp", "--tokens", "1,17,42", "--max-new-tokens", "3"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!out.stdout.is_empty());
}

fn panguc(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_panguc")).args(args).output().unwrap()
}

#[test]
fn cli_quantize_static_c8_runs_the_same_on_both_interpreter_engines() {
    let (tmp, float) = tiny(DType::BF16);
    let (fs, q) = (float.to_str().unwrap(), tmp.path().join("q"));
    let qs = q.to_str().unwrap();
    let out = panguc(&["quantize", fs, "-o", qs, "--scheme", "w8a8", "--kv-int8"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.starts_with("error: ") && err.contains("calibration"), "{err}");
    assert!(!q.exists(), "no partial output");
    let out = panguc(&["quantize", fs, "-o", qs, "--scheme", "w8a8", "--kv-int8", "--calib-synthetic", "2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&panguc(&["inspect", qs]).stdout).into_owned();
    assert!(text.contains("quantization   W8A8 (msModelSlim), KV cache C8 (int8)"), "{text}");
    // The contiguous and the paged interpreter both store int8 K/V rows.
    let run = |engine: &str| {
        let o = panguc(&[
            "run",
            qs,
            "--engine",
            engine,
            "--tokens",
            "1,17,42,99",
            "--tokens",
            "5,6",
            "--max-new-tokens",
            "4",
        ]);
        assert!(o.status.success(), "{engine}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert_eq!(run("interp"), run("interp-paged"));
}

/// Tensors of a single-file checkpoint, by the names its description lists.
type Tensors = std::collections::BTreeMap<String, (DType, Vec<usize>, Vec<u8>)>;

fn read_all(dir: &Path) -> Tensors {
    let ck = Checkpoint::open(dir).unwrap();
    let names: Vec<String> = ck.quant().unwrap().tensors().map(|(n, _)| n.to_string()).collect();
    names
        .into_iter()
        .map(|n| {
            let (d, s, _) = ck.tensor_info(&n).unwrap();
            let bytes = ck.tensor_bytes(&n).unwrap().to_vec();
            (n, (d, s, bytes))
        })
        .collect()
}

fn write_all(dir: &Path, file: &str, tensors: &Tensors) {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, (d, s, b))| {
            let st = panguc::frontend::convert::st_dtype(*d);
            (n.clone(), safetensors::tensor::TensorView::new(st, s.clone(), b).unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join(file)).unwrap();
    let mut desc = serde_json::Map::new();
    desc.insert("model_quant_type".into(), "W8A8_DYNAMIC".into());
    for (n, (d, _, _)) in tensors {
        desc.insert(n.clone(), if *d == DType::I8 || n.contains("weight_") { "W8A8_DYNAMIC" } else { "FLOAT" }.into());
    }
    std::fs::write(dir.join(DESCRIPTION_FILE), serde_json::Value::Object(desc).to_string()).unwrap();
}

#[test]
fn smoothed_norm_stored_as_module_weight_with_bias() {
    let (tmp, float) = tiny(DType::BF16);
    let q = tmp.path().join("q");
    let opts = QuantizeOptions { scheme: Scheme::W8A8Dynamic, kv_int8: false, calib: vec![], smooth_alpha: None };
    write_quantized(&Checkpoint::open(&float).unwrap(), &q, &opts).unwrap();
    let file = "quant_model_weight_w8a8_dynamic.safetensors";
    let (plain_logits, _) = greedy(&q, 0);
    let h = 64;
    // msModelSlim's anti-outlier wrapper: `<norm>.module.weight` plus `.module.bias`.
    let smoothed = |bias: f32| {
        let mut t = read_all(&q);
        for l in 0..2 {
            let norm = format!("model.layers.{l}.input_layernorm");
            let w = t.remove(&format!("{norm}.weight")).unwrap();
            t.insert(format!("{norm}.module.weight"), w);
            let b = panguc::frontend::convert::from_f32(&vec![bias; h], DType::F32).unwrap();
            t.insert(format!("{norm}.module.bias"), (DType::F32, vec![h], b));
        }
        let dir = tmp.path().join(format!("smoothed_{bias}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(q.join("config.json"), dir.join("config.json")).unwrap();
        write_all(&dir, file, &t);
        dir
    };
    let zero = smoothed(0.0);
    let ck = Checkpoint::open(&zero).unwrap();
    assert!(ck.unexpected_tensors().is_empty(), "{:?}", ck.unexpected_tensors());
    let ops: Vec<String> =
        import(&ck).unwrap().functions["decoder_layer"].values.iter().map(|v| v.name.clone()).collect();
    assert!(ops.iter().any(|n| n == "attn_norm_bias"), "the bias is added after the norm");
    // A zero bias changes nothing (the renamed weight is read as the norm weight)...
    assert_eq!(greedy(&zero, 0).0, plain_logits);
    // ...a non-zero one does.
    let shifted = greedy(&smoothed(0.05), 0).0;
    assert_ne!(shifted, plain_logits);
}

#[test]
fn sharded_msmodelslim_file_names_are_found_through_their_index() {
    let (tmp, float) = tiny(DType::BF16);
    let q = tmp.path().join("q");
    let opts = QuantizeOptions { scheme: Scheme::W8A8Dynamic, kv_int8: false, calib: vec![], smooth_alpha: None };
    write_quantized(&Checkpoint::open(&float).unwrap(), &q, &opts).unwrap();
    let (single_logits, _) = greedy(&q, 0);
    let tensors = read_all(&q);
    let sharded = tmp.path().join("sharded");
    std::fs::create_dir_all(&sharded).unwrap();
    for f in ["config.json", DESCRIPTION_FILE] {
        std::fs::copy(q.join(f), sharded.join(f)).unwrap();
    }
    // Two shards under msModelSlim-style names, and their index.
    let mut weight_map = serde_json::Map::new();
    let half = tensors.len() / 2;
    let all: Vec<_> = tensors.iter().collect();
    for (part, chunk) in [(1, &all[..half]), (2, &all[half..])] {
        let file = format!("quant_model_weight_w8a8_dynamic-0000{part}-of-00002.safetensors");
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = chunk
            .iter()
            .map(|(n, (d, s, b))| {
                weight_map.insert((*n).clone(), file.clone().into());
                let st = panguc::frontend::convert::st_dtype(*d);
                ((*n).clone(), safetensors::tensor::TensorView::new(st, s.clone(), b).unwrap())
            })
            .collect();
        safetensors::serialize_to_file(views, None, &sharded.join(&file)).unwrap();
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(sharded.join("quant_model_weight_w8a8_dynamic.safetensors.index.json"), index.to_string()).unwrap();
    let ck = Checkpoint::open(&sharded).unwrap();
    assert_eq!(ck.shard_paths().len(), 2);
    assert_eq!(greedy(&sharded, 0).0, single_logits);
}

#[test]
fn quantized_ir_round_trips_through_the_canonical_text() {
    let (tmp, float) = tiny(DType::BF16);
    let q = tmp.path().join("q");
    let opts = QuantizeOptions { scheme: Scheme::W8A8, kv_int8: true, calib: calib_prompts(), smooth_alpha: None };
    write_quantized(&Checkpoint::open(&float).unwrap(), &q, &opts).unwrap();
    let module = import(&Checkpoint::open(&q).unwrap()).unwrap();
    let text = panguc_ir::text::print_module(&module);
    assert!(text.contains("quant_matmul(") && text.contains("i8["), "int8 ops and types are printed");
    let parsed = panguc_ir::text::parse_module(&text).unwrap();
    panguc_ir::verify::verify_module(&parsed).unwrap();
    assert_eq!(panguc_ir::text::print_module(&parsed), text);
}

#[test]
fn planted_outliers_keep_the_float_model_and_hurt_per_token_quantization() {
    let (tmp, plain) = tiny(DType::F32);
    let out = tmp.path().join("outliers");
    let o =
        panguc(&["synth", out.to_str().unwrap(), "--preset", "tiny", "--seed", "7", "--dtype", "f32", "--outliers"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The same function (f32 weights: only rounding of the scaled columns differs).
    let (pl, _) = greedy(&plain, 0);
    let (ol, _) = greedy(&out, 0);
    let diff = pl.iter().zip(&ol).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(diff < 1e-3, "planting changed the float model by {diff}");
    // ...whose attention inputs now have channels 20-100x the rest.
    let cal = |dir: &Path| panguc::quantize::calibrate(&Checkpoint::open(dir).unwrap(), &calib_prompts()).unwrap();
    let m = "model.layers.0.self_attn.q_proj";
    let (rp, ro) = (cal(&plain).inputs[m], cal(&out).inputs[m]);
    assert!(ro.max.max(-ro.min) > 10.0 * rp.max.max(-rp.min), "{rp:?} vs {ro:?}");
    // Per-token int8 activations lose precision on the other channels.
    let quant_err = |dir: &Path, name: &str| {
        let q = tmp.path().join(name);
        let opts = QuantizeOptions { scheme: Scheme::W8A8Dynamic, kv_int8: false, calib: vec![], smooth_alpha: None };
        write_quantized(&Checkpoint::open(dir).unwrap(), &q, &opts).unwrap();
        let (fl, _) = greedy(dir, 0);
        let (ql, _) = greedy(&q, 0);
        fl.iter().zip(&ql).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max)
    };
    let (e_plain, e_out) = (quant_err(&plain, "q_plain"), quant_err(&out, "q_outliers"));
    eprintln!("W8A8_DYNAMIC max |logit error|: plain {e_plain:.4}, with planted outliers {e_out:.4}");
    assert!(e_out > 2.0 * e_plain, "outliers should hurt per-token quantization: {e_plain} vs {e_out}");
}

#[test]
fn expert_aware_smoothing_wins_back_planted_outliers() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("outliers");
    let o =
        panguc(&["synth", out.to_str().unwrap(), "--preset", "tiny", "--seed", "7", "--dtype", "f32", "--outliers"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = |smooth_alpha: Option<f32>, name: &str| {
        let q = tmp.path().join(name);
        let opts =
            QuantizeOptions { scheme: Scheme::W8A8Dynamic, kv_int8: false, calib: calib_prompts(), smooth_alpha };
        write_quantized(&Checkpoint::open(&out).unwrap(), &q, &opts).unwrap();
        let (fl, _) = greedy(&out, 0);
        let (ql, _) = greedy(&q, 0);
        fl.iter().zip(&ql).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max)
    };
    let (plain, smoothed) = (err(None, "plain"), err(Some(0.6), "smoothed"));
    eprintln!(
        "outlier model, W8A8_DYNAMIC max |logit error|: without smoothing {plain:.4}, smoothed (a=0.6) {smoothed:.4}"
    );
    assert!(smoothed < 0.5 * plain, "smoothing should win back most of the outlier error: {plain} vs {smoothed}");
}

/// `panguc quantize --scheme w8a8-dynamic`, `panguc compile --target cpu`
/// and `panguc run` on the package (the compiled batched engine, int8
/// kernels) give the tokens `panguc run --engine interp-paged` gives.
#[test]
fn cli_compiles_a_quantized_checkpoint_for_the_cpu_and_runs_it_like_the_interpreter() {
    let tmp = tempfile::tempdir().unwrap();
    let (q, pkg) = (tmp.path().join("q"), tmp.path().join("pkg"));
    let (qs, ps) = (q.to_str().unwrap(), pkg.to_str().unwrap());
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny-pangu");
    let out = panguc(&["quantize", tiny.to_str().unwrap(), "-o", qs, "--scheme", "w8a8-dynamic"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = panguc(&["compile", qs, "--target", "cpu", "-o", ps]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let run = |model: &str, engine: &[&str]| {
        let mut args = vec!["run", model, "--tokens", "1,17,42,99", "--tokens", "5,6", "--max-new-tokens", "4"];
        args.extend(engine);
        let o = panguc(&args);
        assert!(o.status.success(), "{model} {engine:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert_eq!(run(ps, &[]), run(qs, &["--engine", "interp-paged"]));
}
