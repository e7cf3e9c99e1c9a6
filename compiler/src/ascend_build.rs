//! `panguc compile --target ascend910b,ascend310p`: the AscendC operator
//! projects under `OUT/ascend/<target>/` (see `panguc_codegen_ascendc`),
//! with the weights in the device layout the host program loads
//! (`OUT/ascend/<target>/weights/<weight name>.bin`) when the checkpoint has
//! weights; and `panguc run OUT --engine ascend-sim` ([`run_ascend_sim`]).
//!
//! Every target is emitted in memory first; files are written only when all
//! of them succeeded, so a shape that cannot be tiled, an unsupported dtype
//! or an unknown target name leaves no partial package.

use anyhow::{bail, Context, Result};
use panguc_codegen_ascendc::engine::{AscendSimEngine, WeightProvider};
use panguc_codegen_ascendc::program::{emit_program, memory_report, AscendProgram};
use panguc_codegen_ascendc::project::project_files;
use panguc_codegen_ascendc::target::DevType;
use panguc_codegen_ascendc::weights::device_weight_bytes;
use panguc_codegen_ascendc::Target;
use panguc_ir::kernel::{BufferKind, KernelProgram};
use panguc_ir::PanguConfig;
use panguc_runtime::batch::EngineFactory;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// Simulated efficiency of every device kernel under the per-pipe timing
/// model (`panguc_codegen_ascendc::perf`) for a decode step at batch 1 and
/// batch 64 after a 2048-token context, and a 2048-token prefill. The
/// program serves one sequence per call, so batch 64 is modelled as 64 new
/// tokens of one sequence (same GEMM shapes; attention reads one context).
pub fn timing_report(ap: &AscendProgram) -> Result<serde_json::Value> {
    use panguc_codegen_ascendc::emit::Env;
    let workloads = [
        ("decode_b1", Env::new(1, 2048, 1)),
        ("decode_b64", Env::new(64, 2048, 1)),
        ("prefill_2048", Env::new(2048, 0, 1)),
    ];
    panguc_codegen_ascendc::perf::report(ap, &workloads)
        .with_context(|| format!("timing the {} kernels", ap.target.name()))
}

/// Put the cost model's step estimate (the report's `estimates`, profiles
/// ascend910b1 and ascend310p3, which the timing tables follow) next to the
/// timing model's step total of each workload, as `cost_model_step_us`.
/// The cost model adds a launch overhead per kernel and models decode batch
/// 64 as 64 sequences; the timing model has neither (see [`timing_report`]).
pub fn attach_cost_model(report: &mut serde_json::Value) {
    for (target, profile) in [("ascend910b", "ascend910b1"), ("ascend310p", "ascend310p3")] {
        for (w, key, field) in [
            ("decode_b1", "decode_batch_1", "ms_per_step"),
            ("decode_b64", "decode_batch_64", "ms_per_step"),
            ("prefill_2048", "prefill_2048", "ms"),
        ] {
            let ms = report.pointer(&format!("/estimates/profiles/{profile}/{key}/{field}")).and_then(|v| v.as_f64());
            let wl = report.pointer_mut(&format!("/ascend/{target}/timing/workloads/{w}"));
            if let (Some(ms), Some(serde_json::Value::Object(wl))) = (ms, wl) {
                wl.insert("cost_model_step_us".into(), serde_json::json!(ms * 1e3));
            }
        }
    }
}

/// Targets in `targets` that are Ascend targets (others, like `cpu`, are
/// someone else's); an unknown `ascend*` name is an error.
pub fn ascend_targets(targets: &[String]) -> Result<Vec<Target>> {
    let mut out = vec![];
    for t in targets {
        if t == "cpu" || t == "ir" {
            continue;
        }
        let t = Target::parse(t)?;
        if !out.contains(&t) {
            out.push(t);
        }
    }
    Ok(out)
}

/// A weight provider over a checkpoint: the prepared weight's bytes in its
/// storage dtype and layout, evaluated like the CPU package does.
pub fn checkpoint_weights(
    ckpt: &crate::frontend::Checkpoint,
) -> impl Fn(&panguc_ir::kernel::PreparedWeight) -> Result<Vec<u8>> + '_ {
    move |w| crate::package_build::prepared_bytes(ckpt, w)
}

/// Emit every Ascend target's project into `staging/ascend/<target>/` and
/// return the per-kernel UB/L1/L0 use against capacity, keyed by target.
/// With `weights` (a checkpoint that has weights, e.g. [`checkpoint_weights`]),
/// every prepared weight is also written in the device layout to
/// `staging/ascend/<target>/weights/<name>.bin`.
pub fn write_ascend_targets(
    staging: &Path,
    program: &KernelProgram,
    cfg: &PanguConfig,
    targets: &[String],
    weights: Option<&WeightProvider>,
) -> Result<serde_json::Value> {
    let _ = cfg; // activation dtypes are per target (bf16 on 910B, f16 on 310P)
    write_targets(staging, program, None, targets, weights)
}

/// The Ascend part of a package partitioned over `programs.len()` ranks:
/// rank `r`'s program (`programs[r]`, its partitioned module scheduled with
/// collective launches) as complete projects in
/// `staging/ranks/rank<r>/ascend/<target>/`, whose host programs join the
/// HCCL communicators and issue the rank's collectives in program order.
/// Returns the memory report per rank.
pub fn write_ascend_rank_targets(
    staging: &Path,
    programs: &[KernelProgram],
    targets: &[String],
    weights: Option<&WeightProvider>,
) -> Result<serde_json::Value> {
    let devices = programs.len();
    let mut reports = vec![];
    for (r, program) in programs.iter().enumerate() {
        let dir = staging.join(format!("ranks/rank{r}"));
        let report = write_targets(&dir, program, Some((r, devices)), targets, weights)
            .with_context(|| format!("rank {r} of {devices}"))?;
        reports.push(report);
    }
    Ok(serde_json::json!({ "ranks": reports }))
}

fn write_targets(
    staging: &Path,
    program: &KernelProgram,
    rank: Option<(usize, usize)>,
    targets: &[String],
    weights: Option<&WeightProvider>,
) -> Result<serde_json::Value> {
    let mut emitted: Vec<(AscendProgram, BTreeMap<String, String>)> = vec![];
    for t in ascend_targets(targets)? {
        let mut ap = emit_program(program, t, t.default_act())?;
        ap.rank = rank;
        let files = project_files(&ap).with_context(|| format!("writing the {t} project"))?;
        emitted.push((ap, files));
    }
    let mut report = serde_json::Map::new();
    for (ap, files) in &emitted {
        let dir = staging.join("ascend").join(ap.target.name());
        for (rel, text) in files {
            let path = dir.join(rel);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
            }
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        set_executable(&dir.join("build.sh"))?;
        let mut entry = memory_report(ap);
        if rank.is_none() {
            entry["timing"] = timing_report(ap)?;
        }
        report.insert(ap.target.name().to_string(), entry);
    }
    if let Some(provider) = weights {
        write_device_weights(staging, program, &emitted, provider)?;
    }
    Ok(serde_json::Value::Object(report))
}

/// Each prepared weight is evaluated once and written for every target.
fn write_device_weights(
    staging: &Path,
    program: &KernelProgram,
    emitted: &[(AscendProgram, BTreeMap<String, String>)],
    provider: &WeightProvider,
) -> Result<()> {
    let mut buffer_of = vec![None; program.weights.len()];
    for (i, b) in program.buffers.iter().enumerate() {
        if let BufferKind::Weight { index } = b.kind {
            buffer_of[index].get_or_insert(i);
        }
    }
    for (ap, _) in emitted {
        std::fs::create_dir_all(staging.join("ascend").join(ap.target.name()).join("weights"))?;
    }
    for (wi, w) in program.weights.iter().enumerate() {
        let Some(b) = buffer_of[wi] else { continue };
        let prepared = provider(w).with_context(|| format!("preparing weight `{}`", w.name))?;
        for (ap, _) in emitted {
            let bytes = device_weight_bytes(w, &prepared, ap.buffer_dtypes[b], ap.buffer_nz[b])
                .with_context(|| format!("converting weight `{}` for {}", w.name, ap.target))?;
            let path = staging.join("ascend").join(ap.target.name()).join("weights").join(format!("{}.bin", w.name));
            let mut f = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
            f.write_all(&bytes).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(())
}

/// Target and activation dtype of an `--engine ascend-sim*` name:
/// `ascend-sim` runs the 910B kernels with f32 activations (exact greedy
/// tokens), `ascend-sim-bf16` the 910B bf16 build, `ascend-sim-f16` the
/// 310P f16 build (the packaged dtypes; logits within their tolerance).
pub fn sim_engine_config(engine: &str) -> Result<(Target, DevType)> {
    Ok(match engine {
        "ascend-sim" => (Target::Ascend910B, DevType::F32),
        "ascend-sim-bf16" => (Target::Ascend910B, DevType::BF16),
        "ascend-sim-f16" => (Target::Ascend310P, DevType::F16),
        other => bail!("unknown AscendC simulation engine `{other}` (ascend-sim, ascend-sim-bf16, ascend-sim-f16)"),
    })
}

/// `panguc run OUT --engine ascend-sim[-bf16|-f16]` on a package compiled
/// with `--target cpu` among its targets (its kernel program and prepared
/// weights are used; a partitioned package's from every rank, the ranks'
/// collectives meeting in one in-process communicator). A ragged-batch
/// (paged) program runs all sequences through one engine per step (rank
/// programs are always batched); a one-device one-sequence program one
/// engine per running sequence.
pub fn run_ascend_sim(a: &crate::commands::RunArgs) -> Result<()> {
    let (target, act) = sim_engine_config(a.engine.as_deref().unwrap_or("ascend-sim"))?;
    let dir = &a.model;
    let partitioned = panguc_runtime::multirank::package_ranks(dir)?.is_some();
    // The manifest (a partitioned package's covers every rank), and the
    // program whose cache layout decides how the engines run: rank 0's
    // stands for all (the multi-rank engine checks they agree).
    let (cfg, program) = if partitioned {
        let ranks = panguc_runtime::multirank::rank_dirs(dir)?;
        (ranks.model, panguc_runtime::package::verify_package(&ranks.dirs[0])?.program)
    } else {
        let files = panguc_runtime::package::verify_package(dir)?;
        (files.manifest.model, files.program)
    };
    let prompts = crate::run_batch::prompts(a, &cfg)?;
    if let Some(block_size) = program.as_ref().and_then(|p| p.kv_block_size()) {
        // A ragged-batch program: one engine runs every step over one paged
        // cache (one per rank) of the scheduler's blocks.
        return crate::run_batch::scheduled_run(a, &cfg, &prompts, &mut |s| {
            if s.block_size != block_size {
                bail!(
                    "{}: the package caches K/V in blocks of {block_size} tokens, not {}: pass --block-size {block_size}",
                    dir.display(),
                    s.block_size
                );
            }
            let block_bytes = (s.block_size * crate::run_batch::kv_bytes_per_token(&cfg)) as u64;
            let ranks = if partitioned { panguc_runtime::multirank::rank_dirs(dir)?.dirs.len() as u64 } else { 1 };
            panguc_runtime::memory::check_fits(
                &format!("the simulated KV cache of {} blocks of {} tokens per rank", s.num_blocks, s.block_size),
                (s.num_blocks as u64).checked_mul(block_bytes).and_then(|b| b.checked_mul(ranks)),
            )?;
            Ok(if partitioned {
                Box::new(AscendSimEngine::multi_rank(dir, target, act, s.num_blocks)?)
            } else {
                Box::new(AscendSimEngine::from_package(dir, target, act, s.num_blocks)?)
            })
        });
    }
    if partitioned {
        bail!(
            "{}: its rank programs run one sequence per call (contiguous KV cache); partitioned packages run \
             ragged batches over paged caches: recompile it",
            dir.display()
        );
    }
    // Each engine compiles the device kernels once; finished sequences
    // hand their engine on (reset) to the next, so at most --max-seqs exist.
    let context = crate::run_batch::max_context(&prompts, a.max_new_tokens);
    let make: EngineFactory = Box::new(move || Ok(Box::new(AscendSimEngine::from_package(dir, target, act, context)?)));
    crate::run_batch::generate_and_report(make, a, &cfg, &prompts)
}

fn set_executable(p: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mut perm = std::fs::metadata(p)?.permissions();
        perm.set_mode(0o755);
        std::fs::set_permissions(p, perm)?;
    }
    if !p.exists() {
        bail!("{} was not written", p.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use panguc_runtime::Engine;
    use std::path::PathBuf;

    fn program_of(module: &panguc_ir::Module) -> KernelProgram {
        let fused = panguc_lowering::fuse_module(module, &Default::default(), |_, _| Ok(())).unwrap().0;
        panguc_lowering::schedule::schedule(&fused, &Default::default()).unwrap()
    }

    fn tiny_checkpoint() -> crate::frontend::Checkpoint {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny-pangu");
        crate::commands::open_checkpoint(&dir, false).unwrap()
    }

    fn check_fits(report: &serde_json::Value, t: Target) {
        let ks = report[t.name()]["kernels"].as_array().expect("kernels");
        assert!(!ks.is_empty());
        for k in ks {
            for m in ["ub", "l1", "l0a", "l0b", "l0c"] {
                let (used, cap) = (k[m][0].as_u64().unwrap(), k[m][1].as_u64().unwrap());
                assert!(used <= cap, "{}: {m} {used} > {cap}", k["kernel"]);
            }
        }
    }

    /// Every target's report has the timing model's figures for the three
    /// workloads: one entry per distinct device kernel, each with a positive
    /// simulated time, and efficiency = roofline / simulated.
    #[test]
    fn tiny_checkpoint_timing_report() {
        let ckpt = tiny_checkpoint();
        let p = program_of(&crate::commands::import(&ckpt).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let report = write_ascend_targets(dir.path(), &p, ckpt.config(), &["ascend910b".into()], None).unwrap();
        let ap = emit_program(&p, Target::Ascend910B, Target::Ascend910B.default_act()).unwrap();
        let distinct: std::collections::BTreeSet<&str> =
            ap.kernels.iter().flat_map(|d| d.kernels.iter()).map(|k| k.entry.as_str()).collect();
        let timing = &report["ascend910b"]["timing"];
        assert_eq!(timing["params"]["gm_gbps"], 1420.0);
        for w in ["decode_b1", "decode_b64", "prefill_2048"] {
            let wl = &timing["workloads"][w];
            assert_eq!(wl["failures"].as_array().unwrap().len(), 0, "{w}: {}", wl["failures"]);
            let ks = wl["kernels"].as_array().unwrap();
            let names: std::collections::BTreeSet<&str> = ks.iter().map(|k| k["name"].as_str().unwrap()).collect();
            assert_eq!(names, distinct, "{w}");
            for k in ks {
                let (sim, roof, eff) = (
                    k["simulated_us"].as_f64().unwrap(),
                    k["roofline_us"].as_f64().unwrap(),
                    k["efficiency"].as_f64().unwrap(),
                );
                assert!(sim > 0.0 && roof > 0.0, "{w}: {k}");
                assert!((eff - roof / sim).abs() < 1e-9 * eff.max(1.0), "{w}: {k}");
            }
        }
        // A prefill of 2048 tokens takes longer than a decode step.
        let step = |w: &str| timing["workloads"][w]["step_simulated_us"].as_f64().unwrap();
        assert!(step("prefill_2048") > step("decode_b64") && step("decode_b64") > step("decode_b1"));
    }

    #[test]
    fn unknown_target_is_an_error_and_cpu_is_skipped() {
        let e = ascend_targets(&["cpu".into(), "ascend920".into()]).unwrap_err().to_string();
        assert!(e.contains("unknown Ascend target `ascend920`"), "{e}");
        let ts =
            ascend_targets(&["cpu".into(), "ascend310p".into(), "ascend910b".into(), "ascend310p".into()]).unwrap();
        assert_eq!(ts, vec![Target::Ascend310P, Target::Ascend910B]);
        assert!(sim_engine_config("ascend-sim-x").is_err());
    }

    /// The tiny checkpoint: both projects, the memory report, the host
    /// program compiles, and the device-layout weights have the sizes the
    /// host program checks and the checkpoint's values.
    #[test]
    fn tiny_checkpoint_projects_and_device_weights() {
        let ckpt = tiny_checkpoint();
        let p = program_of(&crate::commands::import(&ckpt).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let provider = checkpoint_weights(&ckpt);
        let targets = ["ascend910b".into(), "ascend310p".into(), "cpu".into()];
        let report = write_ascend_targets(dir.path(), &p, ckpt.config(), &targets, Some(&provider)).unwrap();
        for t in Target::ALL {
            check_fits(&report, t);
            let tdir = dir.path().join("ascend").join(t.name());
            for f in ["CMakePresets.json", "build.sh", "README.md", "host/panguc_host.cpp"] {
                assert!(tdir.join(f).is_file(), "{t}: {f}");
            }
            panguc_codegen_ascendc::host::check_host_compiles(&tdir).unwrap();
            let ap = emit_program(&p, t, t.default_act()).unwrap();
            for (i, b) in p.buffers.iter().enumerate() {
                if let BufferKind::Weight { index } = b.kind {
                    let w = &p.weights[index];
                    let len = std::fs::metadata(tdir.join("weights").join(format!("{}.bin", w.name))).unwrap().len();
                    let elems: usize = w.shape.iter().product();
                    assert_eq!(len, elems as u64 * ap.buffer_dtypes[i].size(), "{t}: {}", w.name);
                }
            }
        }
        // bf16 on 910B: the lm_head, read only by its GEMM, is the
        // checkpoint's [V, H] tensor pre-tiled for that GEMM's L1 tiles; the
        // embedding table, which a gather reads, stays row-major.
        let ap = emit_program(&p, Target::Ascend910B, DevType::BF16).unwrap();
        let nz_of = |name: &str| {
            let b = p
                .buffers
                .iter()
                .position(|b| matches!(b.kind, BufferKind::Weight { index } if p.weights[index].name == name));
            ap.buffer_nz[b.unwrap_or_else(|| panic!("no weight {name}"))]
        };
        let (v, h) = (ckpt.config().vocab_size, ckpt.config().hidden_size);
        let tile = nz_of("lm_head.weight@panels16").expect("lm_head stored pre-tiled");
        let lm = std::fs::read(dir.path().join("ascend/ascend910b/weights/lm_head.weight@panels16.bin")).unwrap();
        let rm = ckpt.tensor_bytes("lm_head.weight").unwrap();
        assert_eq!(lm, panguc_codegen_ascendc::weights::tile_nz(rm, &[v, h], 2, tile).unwrap());
        assert_ne!(lm, rm);
        let embed = p.weights.iter().find(|w| w.name.contains("embed_tokens")).expect("embedding weight");
        assert_eq!(nz_of(&embed.name), None, "{}", embed.name);
    }

    /// The real 72B configuration (config only): every kernel is emitted for
    /// both targets, fits the on-chip memories and compiles (syntax) against
    /// the AscendC simulation headers; no weights are written.
    #[test]
    fn real_72b_config_emits_and_fits() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/pangu-pro-moe-72b");
        let ckpt = crate::commands::open_checkpoint(&dir, true).unwrap();
        let p = program_of(&crate::commands::import(&ckpt).unwrap());
        let out = tempfile::tempdir().unwrap();
        let targets = ["ascend910b".into(), "ascend310p".into()];
        let report = write_ascend_targets(out.path(), &p, ckpt.config(), &targets, None).unwrap();
        for t in Target::ALL {
            check_fits(&report, t);
            let root = out.path().join("ascend").join(t.name());
            assert!(!root.join("weights").exists());
            syntax_check_kernels(&root.join("op_kernel"), t);
        }
    }

    /// `g++ -fsyntax-only` over every emitted kernel file of one target.
    fn syntax_check_kernels(op_kernel: &Path, t: Target) {
        let mut files: Vec<PathBuf> = std::fs::read_dir(op_kernel)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "cpp"))
            .collect();
        files.sort();
        assert!(files.len() >= 10, "{t}: only {} kernel files", files.len());
        let include = panguc_codegen_ascendc::sim::sim_include_dir().unwrap();
        let soc = if t == Target::Ascend910B { "910B" } else { "310P" };
        let out = std::process::Command::new(std::env::var("PANGUC_SIM_CXX").unwrap_or_else(|_| "g++".into()))
            .args(["-std=c++17", "-fsyntax-only", &format!("-DPANGUC_SIM_SOC={soc}")])
            .arg("-I")
            .arg(&include)
            .arg("-I")
            .arg(op_kernel)
            .args(&files)
            .output()
            .unwrap();
        assert!(out.status.success(), "{t} kernels fail to compile:\n{}", String::from_utf8_lossy(&out.stderr));
    }

    /// `ascend-sim` (910B kernels, f32 activations) generates the
    /// interpreter's greedy tokens; the packaged bf16 (910B) and f16 (310P)
    /// builds give prefill logits within their tolerance.
    #[test]
    fn ascend_sim_engine_matches_the_interpreter() {
        let ckpt = tiny_checkpoint();
        let cfg = ckpt.config().clone();
        let module = crate::commands::import(&ckpt).unwrap();
        let p = program_of(&module);
        let prompt = [1i64, 2, 3, 4];
        let greedy = panguc_runtime::Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 };
        let interp = panguc_ir::interp::Interpreter::new(&module, &ckpt);
        let mut session = panguc_ir::session::InterpSession::new(
            interp,
            cfg.num_hidden_layers,
            [cfg.num_key_value_heads, cfg.head_dim()],
        );
        let want = panguc_runtime::generate(&mut session, &prompt, 8, &greedy, None).unwrap();
        let provider = checkpoint_weights(&ckpt);
        let mut sim = AscendSimEngine::new(p.clone(), Target::Ascend910B, DevType::F32, &provider, 16).unwrap();
        let got = panguc_runtime::generate(&mut sim, &prompt, 8, &greedy, None).unwrap();
        assert_eq!(got.generated, want.generated, "greedy tokens");
        let diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        let want_logits: Vec<f32> = want.prompt_logits.concat();
        let scale = want_logits.iter().map(|v| v.abs()).fold(0f32, f32::max);
        let d32 = diff(&got.prompt_logits.concat(), &want_logits);
        eprintln!("ascend910b f32: max |logit diff| {d32} (max |logit| {scale})");
        assert!(d32 <= 1e-3 * scale.max(1.0), "f32 logits: {d32}");
        check_sim_under_the_scheduler(&mut sim, &got, &mut session_of(&module, &ckpt));
        for (t, act, tol) in [(Target::Ascend910B, DevType::BF16, 0.08f32), (Target::Ascend310P, DevType::F16, 0.02)] {
            let mut e = AscendSimEngine::new(p.clone(), t, act, &provider, 8).unwrap();
            let logits = e.forward(&prompt).unwrap();
            let d = diff(logits.as_f32(), &want_logits);
            eprintln!("{t} {act}: max |logit diff| {d} (max |logit| {scale})");
            assert!(d <= tol * scale.max(1.0), "{t} {act}: max |logit diff| {d} vs max |logit| {scale}");
        }
    }

    fn session_of<'a>(
        m: &'a panguc_ir::Module,
        ckpt: &'a crate::frontend::Checkpoint,
    ) -> impl FnMut() -> panguc_ir::session::InterpSession<'a> {
        move || {
            let cfg = ckpt.config();
            let interp = panguc_ir::interp::Interpreter::new(m, ckpt);
            panguc_ir::session::InterpSession::new(
                interp,
                cfg.num_hidden_layers,
                [cfg.num_key_value_heads, cfg.head_dim()],
            )
        }
    }

    /// Two prompts through the scheduler on one simulated engine (reset
    /// and reused between them; compiling a second costs minutes), the
    /// first prefilled in chunks of 3: its tokens and logits (1e-5
    /// relative) as when the engine ran it alone, the second's tokens the
    /// interpreter's.
    fn check_sim_under_the_scheduler<'a>(
        sim: &mut AscendSimEngine,
        alone: &panguc_runtime::Generation,
        interp: &mut dyn FnMut() -> panguc_ir::session::InterpSession<'a>,
    ) {
        use panguc_runtime::{Engine, PerSequenceEngines, Request, Sampling, Scheduler, SchedulerConfig};
        let prompts = [vec![1i64, 2, 3, 4], vec![7, 8]];
        let requests: Vec<Request> = prompts
            .iter()
            .map(|p| Request {
                prompt: p.clone(),
                max_new_tokens: 8,
                sampling: Sampling::default(),
                stop_tokens: vec![],
            })
            .collect();
        let cfg = SchedulerConfig { block_size: 4, num_blocks: 8, max_seqs: 1, max_batch_tokens: 3 };
        assert!(sim.reset(), "the simulated engine forgets its sequence");
        let engines: Vec<Box<dyn Engine + '_>> = vec![Box::new(sim)];
        let got = Scheduler::run_all(cfg, requests, &mut PerSequenceEngines::from_engines(engines))
            .unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(got[0].generated, alone.generated, "sequence 0 under the scheduler");
        for (r, (x, y)) in got[0].prompt_logits.iter().zip(&alone.prompt_logits).enumerate() {
            for (a, b) in x.iter().zip(y) {
                let rel = (a - b).abs() / a.abs().max(b.abs()).max(1e-3);
                assert!(rel <= 1e-5, "sequence 0 prompt row {r}: {a} vs {b} (chunked prefill)");
            }
        }
        let want = panguc_runtime::generate(&mut interp(), &prompts[1], 8, &Sampling::default(), None).unwrap();
        assert_eq!(got[1].generated, want.generated, "sequence 1 on the reused engine");
    }

    /// `AscendSimEngine::from_package` on a package made by
    /// `panguc compile examples/tiny-pangu --target cpu,... -o $PANGUC_ASCEND_SIM_PACKAGE`
    /// (manual: needs the package on disk).
    #[test]
    #[ignore]
    fn ascend_sim_engine_from_a_package() {
        let dir = PathBuf::from(std::env::var("PANGUC_ASCEND_SIM_PACKAGE").expect("PANGUC_ASCEND_SIM_PACKAGE"));
        let mut e = AscendSimEngine::from_package(&dir, Target::Ascend910B, DevType::F32, 16).unwrap();
        let greedy = panguc_runtime::Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 };
        let g = panguc_runtime::generate(&mut e, &[1, 2, 3, 4], 8, &greedy, None).unwrap();
        println!("ascend-sim tokens: {:?}", g.generated);
    }
}
