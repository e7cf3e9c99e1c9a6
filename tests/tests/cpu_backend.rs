//! End-to-end tests of the CPU backend: tiny checkpoint -> kernel program ->
//! LLVM kernel library + prepared weights -> package -> runtime, compared
//! with the reference interpreter running the same module.

mod common;

use clap::Parser;
use common::*;
use panguc_runtime::{generate, CpuEngine, Engine, PerSequenceEngines, Request, Sampling, Scheduler, SchedulerConfig};
use std::path::Path;

/// The bound: logits within 1e-4 relative (elementwise, relative to
/// max(|a|, |b|, 1e-3)). The fixture's packages run the baseline CPU tier,
/// whose kernels follow the reference's accumulation order, so on x86-64
/// they are in fact bit-identical (the bf16 tier has its own test below).
const TOL: f32 = 1e-4;
const FLOOR: f32 = 1e-3;

/// A prompt longer than one tile of every kind: more rows than a GEMM
/// register block (6) and more keys than an attention step (8).
fn long_prompt() -> Vec<i64> {
    (0..20).map(|i| (i * 37 + 5) % 512).collect()
}

#[test]
fn compiled_matches_interpreter_at_prefill_and_every_decode_step() {
    let f = fixture();
    let ckpt = checkpoint();
    for g in GRAPHS {
        let m = module(&ckpt, g);
        let mut interp = session(&m, &ckpt);
        let mut engine = f.engine(g, 2);
        let prompt = long_prompt();
        let want = interp.forward(&prompt).unwrap();
        let got = engine.forward(&prompt).unwrap();
        assert_close(&got, &want, TOL, FLOOR, &format!("{g:?} prefill"));
        for (step, t) in [7i64, 100, 3, 511, 0, 42].into_iter().enumerate() {
            let want = interp.forward(&[t]).unwrap();
            let got = engine.forward(&[t]).unwrap();
            assert_close(&got, &want, TOL, FLOOR, &format!("{g:?} decode step {step}"));
        }
    }
}

/// A batch sequence's logits against the same engine running it alone: 1e-5
/// relative (the batch must not change a sequence's numerics).
const BATCH_TOL: f32 = 1e-5;

/// A mixed batch through the scheduler against each sequence run alone on
/// a fresh engine of the same kind: different prompt lengths, a prompt
/// prefilled in chunks, a stop token, different finishing steps, a
/// sequence joining mid-flight and, with 8 blocks of 4 tokens for ~60
/// tokens of context, preemption by recompute.
fn check_mixed_batch<'a>(what: &str, make: &mut dyn FnMut() -> Box<dyn Engine + 'a>) {
    let greedy = Sampling::default();
    let req = |prompt: Vec<i64>, max_new: usize| Request {
        prompt,
        max_new_tokens: max_new,
        sampling: greedy.clone(),
        stop_tokens: vec![],
    };
    let alone = |make: &mut dyn FnMut() -> Box<dyn Engine + 'a>, r: &Request| {
        let stop = r.stop_tokens.first().copied();
        generate(make().as_mut(), &r.prompt, r.max_new_tokens, &greedy, stop).unwrap()
    };
    let mut stopping = req(vec![5, 5, 5, 5], 8);
    stopping.stop_tokens = vec![alone(make, &stopping).generated[2]];
    let first = vec![req(long_prompt()[..13].to_vec(), 6), req(vec![1, 2, 3], 9), req(vec![400, 17], 3), stopping];
    let late = req(vec![9, 8, 7, 6, 5, 4, 3], 5);
    let cfg = SchedulerConfig { block_size: 4, num_blocks: 8, max_seqs: 4, max_batch_tokens: 8 };
    let mut s = Scheduler::new(cfg).unwrap();
    let mut ids: Vec<_> = first.iter().map(|r| s.add(r.clone()).unwrap()).collect();
    let mut batch = PerSequenceEngines::new(Box::new(|| Ok(make())));
    let (mut steps, mut shared_with_late) = (0, false);
    while let Some(rep) = s.step(&mut batch).unwrap() {
        steps += 1;
        if steps == 2 {
            ids.push(s.add(late.clone()).unwrap());
        }
        shared_with_late |= rep.scheduled.len() > 1 && rep.scheduled.iter().any(|c| c.0 == 4);
        assert!(rep.metadata.tokens() <= 8, "{what}: token budget");
    }
    assert!(shared_with_late, "{what}: the late sequence joined a running batch");
    assert!(s.stats().preemptions > 0, "{what}: {:?}", s.stats());
    assert_eq!(s.finish_reason(ids[3]), Some(panguc_runtime::FinishReason::Stop), "{what}");
    drop(batch);
    let requests: Vec<Request> = first.into_iter().chain([late]).collect();
    for (i, (r, id)) in requests.iter().zip(ids).enumerate() {
        let got = s.take(id).unwrap();
        let want = alone(make, r);
        assert_eq!(got.generated, want.generated, "{what} sequence {i}: tokens");
        assert_eq!(got.prompt_logits.len(), r.prompt.len());
        for (row, (x, y)) in got.prompt_logits.iter().zip(&want.prompt_logits).enumerate() {
            let (x, y) =
                (panguc_ir::Tensor::f32(vec![x.len()], x.clone()), panguc_ir::Tensor::f32(vec![y.len()], y.clone()));
            assert_close(&x, &y, BATCH_TOL, FLOOR, &format!("{what} sequence {i} prompt row {row}"));
        }
    }
}

#[test]
fn mixed_batch_matches_each_sequence_alone_on_interpreter_and_compiled() {
    let ckpt = checkpoint();
    let m = module(&ckpt, Graph::Pipeline);
    check_mixed_batch("interp", &mut || Box::new(session(&m, &ckpt)));
    let f = fixture();
    let pool = panguc_runtime::thread_pool(2).unwrap();
    check_mixed_batch("compiled", &mut || {
        Box::new(CpuEngine::with_pool(f.package(Graph::Pipeline), pool.clone(), Some(64)).unwrap())
    });
}

/// The batched MoE end to end (issue 10, item 4): the tiny model fused
/// with the rules that introduce `moe_grouped_ffn`, scheduled to the route,
/// gather (rows once per expert) and grouped-GEMM kernels and compiled for
/// the CPU, gives the interpreter's greedy tokens for prompts of 20 and 3
/// rows and the decode steps after them (every step routes each row to one
/// expert in each of 8 groups; with 64 experts most steps leave experts
/// without rows), and a mixed batch matches each sequence run alone.
#[test]
fn batched_moe_package_gives_the_interpreters_greedy_tokens() {
    let ckpt = checkpoint();
    let m = module(&ckpt, Graph::BatchedMoe);
    let layer = m.function("decoder_layer").unwrap();
    let ops: Vec<&str> = layer.nodes.iter().map(|n| n.op.mnemonic()).collect();
    assert!(ops.contains(&"moe_grouped_ffn") && !ops.contains(&"moe_ffn"), "{ops:?}");
    assert!(panguc_lowering::kernel_count(layer) <= 7, "{ops:?}");
    let p = panguc_lowering::schedule::schedule(&m, &Default::default()).unwrap();
    let kinds: Vec<&str> = p.launches.iter().map(|l| p.kernels[l.kernel].kind.mnemonic()).collect();
    assert!(kinds.contains(&"moe_grouped_gate_up") && !kinds.contains(&"moe_gate_up"), "{kinds:?}");

    let f = fixture();
    let greedy = Sampling::default();
    for prompt in [long_prompt(), vec![3, 1, 4]] {
        let want = generate(&mut session(&m, &ckpt), &prompt, 8, &greedy, None).unwrap();
        let got = generate(&mut f.engine(Graph::BatchedMoe, 2), &prompt, 8, &greedy, None).unwrap();
        assert_eq!(got.generated, want.generated, "prompt {prompt:?}");
    }
    let pool = panguc_runtime::thread_pool(2).unwrap();
    check_mixed_batch("compiled batched moe", &mut || {
        Box::new(CpuEngine::with_pool(f.package(Graph::BatchedMoe), pool.clone(), Some(64)).unwrap())
    });
}

#[test]
fn kv_cache_decode_matches_full_recompute() {
    let f = fixture();
    for g in [Graph::Imported, Graph::Pipeline] {
        let tokens = long_prompt();
        let (prompt, rest) = tokens.split_at(9);
        let mut inc = f.engine(g, 2);
        inc.forward(prompt).unwrap();
        let steps: Vec<_> = rest.iter().map(|t| inc.forward(&[*t]).unwrap()).collect();
        let full = f.engine(g, 2).forward(&tokens).unwrap();
        let vocab = full.shape[1];
        for (i, step) in steps.iter().enumerate() {
            let row = 9 + i;
            let want = panguc_ir::Tensor::f32(vec![1, vocab], full.as_f32()[row * vocab..(row + 1) * vocab].to_vec());
            assert_close(step, &want, TOL, FLOOR, &format!("{g:?}: decode at position {row} vs full recompute"));
        }
    }
}

#[test]
fn thread_counts_one_and_two_give_identical_results() {
    let f = fixture();
    let sampled = Sampling { temperature: 0.9, top_k: 20, top_p: 0.95, seed: 11 };
    for sampling in [Sampling::default(), sampled] {
        let runs: Vec<_> = [1, 2]
            .into_iter()
            .map(|threads| {
                generate(&mut f.engine(Graph::Pipeline, threads), &long_prompt(), 8, &sampling, None).unwrap()
            })
            .collect();
        assert_eq!(runs[0].generated, runs[1].generated, "tokens differ between 1 and 2 threads");
        assert_eq!(runs[0].prompt_logits, runs[1].prompt_logits, "logits differ between 1 and 2 threads");
    }
}

/// Tolerance of the AVX-512 BF16 tier's logits, relative to the row's
/// largest |logit|. Each bf16-weight GEMM rounds its activation operand to
/// bf16, an error of at most 2^-8 of each input element (see
/// `codegen-cpu/tests/jit_kernels.rs` for the per-GEMM bound), i.e. about
/// 2^-8 of the GEMM's output scale. RMSNorm renormalises between blocks
/// and the residual stream adds block errors rather than compounding them,
/// so to first order the logits' error is the sum over the GEMMs on the
/// longest path: per layer Q/K/V, O, the router, gate/up and down (5), two
/// layers, plus the LM head: 11 x 2^-8 = 0.043.
const BF16_TOL: f32 = 11.0 / 256.0;

/// max |got - want| / max |want| over the whole tensor.
fn scale_rel_diff(got: &panguc_ir::Tensor, want: &panguc_ir::Tensor) -> f32 {
    assert_eq!(got.shape, want.shape);
    let scale = want.as_f32().iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = got.as_f32().iter().zip(want.as_f32()).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}

/// The AVX-512 BF16 tier (bf16 dot-product GEMMs) against the interpreter:
/// logits within [`BF16_TOL`] at prefill and every decode step, and the
/// same greedy tokens, for every graph; rows of a prefill do not depend on
/// each other (the decode-vs-full-recompute check of the tier).
#[test]
fn bf16_tier_is_within_its_tolerance_and_keeps_the_interpreters_greedy_tokens() {
    if !cpu_has_bf16_tier() {
        eprintln!("this CPU has no AVX-512 BF16: the bf16 tier is not run here");
        return;
    }
    let f = fixture();
    let ckpt = checkpoint();
    for g in GRAPHS {
        let pkg = std::sync::Arc::new(open_tier(&f.packages[&g], BF16));
        assert_eq!(pkg.tier(), BF16);
        let m = module(&ckpt, g);
        let engine = || {
            let opts = panguc_runtime::EngineOptions { threads: 2, max_context: Some(256) };
            CpuEngine::new(pkg.clone(), &opts).unwrap()
        };
        let (mut interp, mut e) = (session(&m, &ckpt), engine());
        let mut worst = scale_rel_diff(&e.forward(&long_prompt()).unwrap(), &interp.forward(&long_prompt()).unwrap());
        for t in [7i64, 100, 3, 511] {
            worst = worst.max(scale_rel_diff(&e.forward(&[t]).unwrap(), &interp.forward(&[t]).unwrap()));
        }
        eprintln!("{g:?}: bf16 tier worst max|diff|/max|logit| = {worst:e} (tolerance {BF16_TOL:e})");
        assert!(worst <= BF16_TOL, "{g:?}: {worst} > {BF16_TOL}");
        // Teacher-forced along the interpreter's greedy tokens: the tier
        // picks the same token at every step, except where the
        // interpreter's top two logits are closer than the tier's
        // tolerance (a near-tie no bf16 rounding can be held to).
        let greedy = Sampling::default();
        let want = generate(&mut session(&m, &ckpt), &long_prompt(), 8, &greedy, None).unwrap();
        let (mut it, mut en, mut feed) = (session(&m, &ckpt), engine(), long_prompt());
        let mut near_ties = 0;
        for (step, next) in want.generated.iter().enumerate() {
            let (a, b) = (it.forward(&feed).unwrap(), en.forward(&feed).unwrap());
            let v = a.shape[1];
            let (ra, rb) = (&a.as_f32()[a.as_f32().len() - v..], &b.as_f32()[b.as_f32().len() - v..]);
            let argmax = |r: &[f32]| (0..v).max_by(|x, y| r[*x].total_cmp(&r[*y])).unwrap();
            let top = argmax(ra);
            assert_eq!(top as i64, *next);
            let second = ra.iter().enumerate().filter(|(i, _)| *i != top).fold(f32::MIN, |m, (_, x)| m.max(*x));
            let scale = ra.iter().fold(0f32, |m, x| m.max(x.abs()));
            if ra[top] - second > BF16_TOL * scale {
                assert_eq!(argmax(rb), top, "{g:?}: step {step}: the bf16 tier picks another token");
            } else {
                near_ties += 1;
            }
            feed = vec![*next];
        }
        assert!(near_ties < want.generated.len(), "{g:?}: every step a near-tie: nothing was checked");
        let got = generate(&mut engine(), &[1, 2, 3, 4], 8, &greedy, None).unwrap();
        let want = generate(&mut session(&m, &ckpt), &[1, 2, 3, 4], 8, &greedy, None).unwrap();
        assert_eq!(got.generated, want.generated, "{g:?}: bf16 tier greedy tokens differ from the interpreter's");
    }
}

/// Both tiers are in every package; the loader takes the best one this CPU
/// runs unless a tier is forced, and a tier the package lacks is a clear
/// error.
#[test]
fn package_carries_both_tiers_and_the_loader_picks_by_cpu() {
    let f = fixture();
    let dir = &f.packages[&Graph::Imported];
    let m = panguc_runtime::package::read_manifest(dir).unwrap();
    let tiers: Vec<&str> = m.cpu.as_ref().unwrap().tiers.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(tiers, [BASELINE, BF16]);
    assert_eq!(f.package(Graph::Imported).tier(), BASELINE, "forced baseline");
    let best = panguc_runtime::open_package(dir).unwrap();
    assert_eq!(best.tier(), if cpu_has_bf16_tier() { BF16 } else { BASELINE });
    let opts = panguc_runtime::OpenOptions { tier: Some("avx10".into()), ..Default::default() };
    let e = format!("{:#}", panguc_runtime::open_package_with(dir, &opts).unwrap_err());
    assert!(e.contains("no CPU tier `avx10`") && e.contains(BASELINE), "{e}");
}

fn open_err(dir: &Path) -> String {
    format!("{:#}", panguc_runtime::open_package(dir).expect_err("the package must be refused"))
}

#[test]
fn tampered_truncated_or_incomplete_packages_are_refused() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let pkg = dir.path().join("pkg");
    copy_tree(&f.packages[&Graph::Pipeline], &pkg);
    assert!(panguc_runtime::open_package(&pkg).is_ok(), "an intact copy loads");

    let weights = pkg.join("weights/layers.001.bin");
    let original = std::fs::read(&weights).unwrap();
    let mut flipped = original.clone();
    flipped[original.len() / 2] ^= 0x40;
    std::fs::write(&weights, &flipped).unwrap();
    let e = open_err(&pkg);
    assert!(e.contains("layers.001.bin") && e.contains("sha256"), "{e}");
    std::fs::write(&weights, &original).unwrap();

    let lib = pkg.join("cpu/libpanguc_kernels.so");
    let bytes = std::fs::read(&lib).unwrap();
    std::fs::write(&lib, &bytes[..bytes.len() - 100]).unwrap();
    let e = open_err(&pkg);
    assert!(e.contains("libpanguc_kernels.so") && e.contains("truncated"), "{e}");
    std::fs::remove_file(&lib).unwrap();
    let e = open_err(&pkg);
    assert!(e.contains("missing"), "{e}");
}

#[test]
fn compiling_twice_gives_byte_identical_packages() {
    let f = fixture();
    let ckpt = checkpoint();
    let dir = tempfile::tempdir().unwrap();
    let again = dir.path().join("again");
    compile(&ckpt, &module(&ckpt, Graph::Imported), &again);
    let (a, b) = (read_tree(&f.packages[&Graph::Imported]), read_tree(&again));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "same files");
    for (rel, bytes) in &a {
        assert!(bytes == &b[rel], "{rel} differs between two compiles");
    }
    assert!(a.contains_key("cpu/libpanguc_kernels.so") && a.keys().any(|k| k.starts_with("weights/")));
}

#[test]
fn newer_format_version_is_refused_with_a_clear_message() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let pkg = dir.path().join("pkg");
    copy_tree(&f.packages[&Graph::Imported], &pkg);
    let path = pkg.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    m["format_version"] = serde_json::json!(panguc_runtime::PACKAGE_FORMAT_VERSION + 1);
    std::fs::write(&path, serde_json::to_string(&m).unwrap()).unwrap();
    let e = open_err(&pkg);
    assert!(e.contains("format version") && e.contains("newer panguc"), "{e}");
}

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Subcommand)]
enum Cmd {
    Inspect(panguc::commands::InspectArgs),
    Verify(panguc::commands::VerifyArgs),
    Run(panguc::commands::RunArgs),
    Compile(panguc::commands::CompileArgs),
}

fn cli(args: &[&str]) -> anyhow::Result<()> {
    match Cli::try_parse_from(std::iter::once("panguc").chain(args.iter().copied()))?.cmd {
        Cmd::Inspect(a) => panguc::commands::inspect(a),
        Cmd::Verify(a) => panguc::commands::verify(a),
        Cmd::Run(a) => panguc::commands::run(a),
        Cmd::Compile(a) => panguc::commands::compile(a),
    }
}

#[test]
fn panguc_compile_then_run_prints_the_interpreter_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("OUT");
    let tiny = tiny_dir();
    let (tiny, out_s) = (tiny.to_str().unwrap(), out.to_str().unwrap());
    cli(&["compile", tiny, "--target", "cpu", "-o", out_s]).unwrap();
    assert!(panguc_runtime::is_package(&out));
    let (interp_json, compiled_json) = (dir.path().join("interp.json"), dir.path().join("compiled.json"));
    let args = ["--tokens", "1,2,3,4", "--max-new-tokens", "8", "--logits-out"];
    let mut a: Vec<&str> = vec!["run", tiny];
    a.extend(args);
    a.push(interp_json.to_str().unwrap());
    a.extend(["--engine", "interp"]);
    cli(&a).unwrap();
    let mut b: Vec<&str> = vec!["run", out_s];
    b.extend(args);
    b.push(compiled_json.to_str().unwrap());
    cli(&b).unwrap();
    let read = |p: &Path| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap() };
    let (i, c) = (read(&interp_json), read(&compiled_json));
    assert_eq!(i["generated"], c["generated"], "compiled tokens differ from the interpreter's");
    assert_eq!(c["generated"].as_array().unwrap().len(), 8);
    assert_eq!(i["tokens"], c["tokens"]);

    // Several prompts through the compiled (batched) engine in one
    // scheduler run, with a paged cache of 2 blocks of the package's 16
    // tokens (at most two sequences at once) and chunked prefill: each
    // sequence as when run alone.
    let prompts = ["1,2,3,4", "9,8,7", "5", "100,200,300,400,500,6"];
    let batch_json = dir.path().join("batch.json");
    let mut b: Vec<&str> = vec!["run", out_s, "--max-new-tokens", "8"];
    b.extend(["--max-batch-tokens", "5", "--kv-cache-mb", "0.015625", "--logits-out"]);
    b.push(batch_json.to_str().unwrap());
    prompts.iter().for_each(|p| b.extend(["--tokens", p]));
    cli(&b).unwrap();
    let batch = read(&batch_json);
    let seqs = batch["sequences"].as_array().unwrap();
    assert_eq!(seqs.len(), prompts.len());
    for (k, p) in prompts.iter().enumerate() {
        let single_json = dir.path().join(format!("single{k}.json"));
        cli(&["run", out_s, "--tokens", p, "--max-new-tokens", "8", "--logits-out", single_json.to_str().unwrap()])
            .unwrap();
        let single = read(&single_json);
        assert_eq!(seqs[k]["tokens"], single["tokens"], "prompt order");
        assert_eq!(seqs[k]["generated"], single["generated"], "sequence {k}: tokens differ from running it alone");
        let rows = |v: &serde_json::Value| -> Vec<f32> {
            v["logits"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|r| r.as_array().unwrap().clone())
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        };
        let (x, y) = (rows(&seqs[k]), rows(&single));
        let (x, y) = (panguc_ir::Tensor::f32(vec![x.len()], x), panguc_ir::Tensor::f32(vec![y.len()], y));
        assert_close(&x, &y, BATCH_TOL, FLOOR, &format!("CLI batch sequence {k} prompt logits"));
    }

    // Bad options fail with messages naming them.
    let run = |extra: &[&str]| -> String {
        let mut v = vec!["run", out_s, "--tokens", "1,2"];
        v.extend(extra);
        format!("{:#}", cli(&v).expect_err("must fail"))
    };
    assert!(run(&["--threads", "0"]).contains("--threads must be at least 1"));
    assert!(run(&["--verify", "some"]).contains("unknown --verify `some`"));
    assert!(run(&["--cpu-tier", "avx10"]).contains("no CPU tier `avx10`"));
    assert!(run(&["--block-size", "2"]).contains("compiled for KV blocks of 16 tokens"));
    // The baseline tier, forced, gives the interpreter's tokens too.
    let mut forced = b.clone();
    forced.extend(["--cpu-tier", BASELINE]);
    cli(&forced).unwrap();
    assert_eq!(i["generated"], read(&compiled_json)["generated"], "baseline tier tokens");
    cli(&["inspect", out_s]).unwrap();
    cli(&["inspect", out_s, "--json"]).unwrap();
    verification_stamp_is_trusted_until_a_weight_changes(&out, &b);

    assert!(run(&["--threads", "many"]).contains("--threads"));
    assert!(run(&["--engine", "gpu"]).contains("unknown --engine `gpu`"));
    assert!(run(&["--engine", "interp"]).contains("compiled package"));
    let e = format!("{:#}", cli(&["run", tiny, "--tokens", "1", "--engine", "warp"]).unwrap_err());
    assert!(e.contains("unknown --engine `warp`"), "{e}");
}

/// `panguc verify` records a stamp that later opens trust for the weight
/// files; a weight changed afterwards is hashed again and refused, and
/// `--verify full` hashes everything whatever the stamp says.
fn verification_stamp_is_trusted_until_a_weight_changes(pkg: &Path, run_args: &[&str]) {
    use panguc_runtime::stamp::{verify_files_with, Verify};
    // Files written within the racy margin of a check are never stamped.
    std::thread::sleep(panguc_runtime::stamp::RACY_MARGIN * 2);
    cli(&["verify", pkg.to_str().unwrap()]).unwrap();
    let manifest = panguc_runtime::package::read_manifest(pkg).unwrap();
    let weight_files = manifest.files.keys().filter(|k| k.ends_with(".bin")).count();
    assert!(weight_files > 0);
    let r = verify_files_with(pkg, &manifest, Verify::Stamp).unwrap();
    assert_eq!(r.trusted_files, weight_files, "every weight file is trusted from the stamp");
    assert_eq!(r.hashed_files, manifest.files.len() - weight_files, "the kernel library and the rest are hashed");
    let full = verify_files_with(pkg, &manifest, Verify::Full).unwrap();
    assert_eq!(full.hashed_files, manifest.files.len());

    let weights = pkg.join("weights/layers.001.bin");
    let original = std::fs::read(&weights).unwrap();
    let mut flipped = original.clone();
    flipped[original.len() / 3] ^= 0x10;
    std::fs::write(&weights, &flipped).unwrap();
    for verify in ["stamp", "full"] {
        let mut args = run_args.to_vec();
        args.extend(["--verify", verify]);
        let e = format!("{:#}", cli(&args).expect_err("a changed weight file must be refused"));
        assert!(e.contains("layers.001.bin") && e.contains("sha256"), "--verify {verify}: {e}");
    }
    std::fs::write(&weights, &original).unwrap();
    cli(run_args).expect("the restored file is hashed again and accepted");
}
