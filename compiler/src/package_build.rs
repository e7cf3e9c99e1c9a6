//! Writing and running CPU packages (format: `panguc_runtime::package`).
//!
//! [`write_cpu_package`] schedules the fused module into a kernel program,
//! generates and links the kernel library, evaluates and repacks the
//! prepared weights into `weights/`, writes the CPU report and IR dumps,
//! and finishes with [`finalize_manifest`], which hashes every file under
//! the staging directory (except `report.json`, which holds timings).
//! Other targets may add files and call [`finalize_manifest`] again.
//! Nothing here depends on time or on hash-map order, so compiling twice
//! gives byte-identical packages. [`run_package`] is `panguc run` on a
//! package.

use crate::frontend::Checkpoint;
use anyhow::{anyhow, bail, Context, Result};
use panguc_ir::kernel::{BufferKind, KernelProgram, PreparedWeight, WeightExpr};
use panguc_ir::{DType, Module, PanguConfig, Tensor, WeightSource};
use panguc_runtime::batch::EngineFactory;
use panguc_runtime::package::{
    cpu_library, hash_tree, BufferEntry, CpuSection, CpuTier, KernelEntry, Manifest, WeightEntry, MANIFEST_FILE,
    PACKAGE_FORMAT_VERSION, PROGRAM_FILE, WEIGHT_ALIGN,
};
use std::collections::BTreeMap;
use std::path::Path;

/// Write the CPU part of a package into `staging` (which must exist) and
/// its manifest, scheduling `fused` first. Deterministic CPU statistics go
/// to `cpu/report.json`; a non-null `report` is written to `report.json`
/// (not hashed).
pub fn write_cpu_package(
    staging: &Path,
    ckpt: &Checkpoint,
    fused: &Module,
    targets: &[String],
    report: &serde_json::Value,
) -> Result<PackStats> {
    let program =
        panguc_lowering::schedule::schedule(fused, &Default::default()).context("scheduling the kernel program")?;
    write_cpu_package_for(staging, ckpt, fused, &program, targets, report)
}

/// [`write_cpu_package`] for `program`, already scheduled from `fused`.
pub fn write_cpu_package_for(
    staging: &Path,
    ckpt: &Checkpoint,
    fused: &Module,
    program: &KernelProgram,
    targets: &[String],
    report: &serde_json::Value,
) -> Result<PackStats> {
    write_cpu_package_cached(staging, ckpt, fused, program, targets, report, &mut BTreeMap::new())
}

/// Compiled kernel libraries (one per CPU tier) by the kernel list they
/// implement (serialized `program.kernels`): ranks whose kernels are
/// identical (same kinds, dtypes and shapes; typical for expert
/// parallelism) share one LLVM run per tier.
type KernelCache = BTreeMap<String, Vec<panguc_codegen_cpu::CompiledKernels>>;

/// Compile `program` once per tier, the tiers on parallel threads (LLVM
/// runs one module per thread).
fn compile_tiers(
    program: &KernelProgram,
    tiers: &[panguc_codegen_cpu::Tier],
) -> Result<Vec<panguc_codegen_cpu::CompiledKernels>> {
    std::thread::scope(|s| {
        let jobs: Vec<_> = tiers
            .iter()
            .map(|t| {
                s.spawn(move || {
                    panguc_codegen_cpu::compile(program, &t.target)
                        .with_context(|| format!("generating CPU code for tier {}", t.name))
                })
            })
            .collect();
        jobs.into_iter()
            .map(|j| j.join().unwrap_or_else(|_| Err(anyhow!("a CPU code generator thread panicked"))))
            .collect()
    })
}

fn write_cpu_package_cached(
    staging: &Path,
    ckpt: &Checkpoint,
    fused: &Module,
    program: &KernelProgram,
    targets: &[String],
    report: &serde_json::Value,
    cache: &mut KernelCache,
) -> Result<PackStats> {
    let tiers = panguc_codegen_cpu::Tier::all()?;
    let key = serde_json::to_string(&program.kernels)?;
    let compiled = match cache.get(&key) {
        Some(c) => c.clone(),
        None => {
            let c = compile_tiers(program, &tiers)?;
            cache.insert(key, c.clone());
            c
        }
    };
    let cpu_dir = staging.join("cpu");
    std::fs::create_dir_all(&cpu_dir).with_context(|| format!("creating {}", cpu_dir.display()))?;
    let mut tier_entries = vec![];
    for (i, (tier, code)) in tiers.iter().zip(&compiled).enumerate() {
        let library = cpu_library(&tier.name, i == 0);
        panguc_codegen_cpu::link_shared_library(&code.object, &staging.join(&library))?;
        let suffix = if i == 0 { String::new() } else { format!(".{}", tier.name) };
        write(&cpu_dir.join(format!("kernels{suffix}.s")), code.assembly.as_bytes())?;
        write(&cpu_dir.join(format!("kernels{suffix}.ll")), code.llvm_ir.as_bytes())?;
        tier_entries.push(CpuTier {
            name: tier.name.clone(),
            library,
            cpu: tier.target.cpu.clone(),
            features: tier.target.features.clone(),
        });
    }
    write(&staging.join(PROGRAM_FILE), serde_json::to_string(program)?.as_bytes())?;
    let ir_dir = staging.join("ir");
    std::fs::create_dir_all(&ir_dir)?;
    write(&ir_dir.join("fused.txt"), panguc_ir::text::print_module(fused).as_bytes())?;
    write(&ir_dir.join("kernel_program.txt"), program.to_text().as_bytes())?;

    let (weights, pack) = if ckpt.has_weights() {
        let (entries, stats) = write_weights(staging, ckpt, program)?;
        (Some(entries), stats)
    } else {
        (None, PackStats::default())
    };

    let tier_report: Vec<serde_json::Value> = tiers
        .iter()
        .zip(&tier_entries)
        .map(|(t, e)| -> Result<serde_json::Value> {
            Ok(serde_json::json!({
                "name": t.name, "cpu": t.target.cpu, "vector_lanes": t.target.vector_lanes(),
                "bf16_dot": t.target.bf16_dot(),
                "library_bytes": std::fs::metadata(staging.join(&e.library))?.len(),
            }))
        })
        .collect::<Result<_>>()?;
    let triple = tiers.first().map(|t| t.target.triple.clone()).unwrap_or_default();
    let cpu_report = serde_json::json!({
        "schedule": panguc_lowering::schedule::stats(program),
        "triple": triple,
        "tiers": tier_report,
    });
    write(&cpu_dir.join("report.json"), serde_json::to_string_pretty(&cpu_report)?.as_bytes())?;
    if !report.is_null() {
        write(&staging.join(panguc_runtime::package::REPORT_FILE), serde_json::to_string_pretty(report)?.as_bytes())?;
    }

    let manifest = Manifest {
        format_version: PACKAGE_FORMAT_VERSION,
        panguc_version: env!("CARGO_PKG_VERSION").to_string(),
        model: ckpt.config().clone(),
        targets: targets.to_vec(),
        cpu: Some(CpuSection {
            program: PROGRAM_FILE.to_string(),
            triple,
            abi: panguc_codegen_cpu::KERNEL_ABI_VERSION,
            tiers: tier_entries,
        }),
        kernels: program
            .kernels
            .iter()
            .map(|k| KernelEntry { name: k.name.clone(), kind: k.kind.mnemonic().to_string() })
            .collect(),
        buffers: buffer_plan(program),
        weights,
        files: BTreeMap::new(),
        ranks: None,
    };
    write_manifest(staging, &manifest)?;
    finalize_manifest(staging, ckpt.config(), targets)?;
    Ok(pack)
}

/// The manifest's description of a package partitioned over `devices`
/// ranks: rank `r` lives in `ranks/rank<r>`; `layout` names the partition
/// document when there is one.
pub fn ranks_section(devices: usize, plan: &str, layout: Option<&str>) -> panguc_runtime::package::RanksSection {
    panguc_runtime::package::RanksSection {
        devices,
        plan: plan.to_string(),
        dirs: (0..devices).map(|r| format!("ranks/rank{r}")).collect(),
        layout: layout.map(String::from),
    }
}

/// Each rank's kernel program: its partitioned module scheduled with
/// collective launches (`ranks: Some((rank, devices))`).
pub fn schedule_ranks(parts: &panguc_lowering::partition::Partitioned) -> Result<Vec<KernelProgram>> {
    let devices = parts.ranks.len();
    (0..devices)
        .map(|r| {
            let sched = panguc_lowering::schedule::ScheduleOptions { ranks: Some((r, devices)), ..Default::default() };
            panguc_lowering::schedule::schedule(&parts.ranks[r].module, &sched)
                .with_context(|| format!("scheduling the program of rank {r} of {devices}"))
        })
        .collect()
}

/// The CPU part of a package partitioned over `devices` ranks: rank `r`'s
/// program (`programs[r]`, see [`schedule_ranks`]) as
/// a complete CPU package in `staging/ranks/rank<r>/` (kernel library,
/// prepared weights evaluated from the checkpoint slices it uses, its own
/// manifest), and a top-level manifest with a `ranks` section and no
/// single-device CPU program. Call [`finalize_manifest`] afterwards (it
/// hashes every rank's files into the top-level manifest).
pub fn write_cpu_rank_packages(
    staging: &Path,
    ckpt: &Checkpoint,
    parts: &panguc_lowering::partition::Partitioned,
    programs: &[KernelProgram],
    plan: &str,
    targets: &[String],
) -> Result<()> {
    let devices = parts.ranks.len();
    let section = ranks_section(devices, plan, None);
    let dirs = &section.dirs;
    // Ranks are compiled on parallel workers (LLVM O3 dominates); each
    // writes only its own directory, so the result does not depend on the
    // schedule. Ranks with identical kernel lists share one LLVM run.
    let cache = std::sync::Mutex::new(KernelCache::new());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(devices).max(1);
    let compile_rank = |r: usize| -> Result<()> {
        let dir = staging.join(&dirs[r]);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let cpu = ["cpu".to_string()];
        let module = &parts.ranks[r].module;
        let mut local = cache.lock().map_err(|_| anyhow!("kernel cache poisoned"))?.clone();
        write_cpu_package_cached(&dir, ckpt, module, &programs[r], &cpu, &serde_json::Value::Null, &mut local)
            .with_context(|| format!("rank {r} of {devices}"))?;
        cache.lock().map_err(|_| anyhow!("kernel cache poisoned"))?.append(&mut local);
        Ok(())
    };
    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    loop {
                        let r = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        if r >= devices {
                            return Ok(());
                        }
                        compile_rank(r)?;
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("a rank compile worker panicked"))))
            .collect()
    });
    results.into_iter().collect::<Result<Vec<()>>>()?;
    let manifest = Manifest {
        format_version: PACKAGE_FORMAT_VERSION,
        panguc_version: env!("CARGO_PKG_VERSION").to_string(),
        model: ckpt.config().clone(),
        targets: targets.to_vec(),
        cpu: None,
        kernels: vec![],
        buffers: vec![],
        weights: None,
        files: BTreeMap::new(),
        ranks: Some(section.clone()),
    };
    write_manifest(staging, &manifest)
}

/// (Re)write `staging/manifest.json` with the size and sha256 of every
/// other file under `staging`. Creates a target-less manifest for `cfg` if
/// there is none yet (packages without a CPU part).
pub fn finalize_manifest(staging: &Path, cfg: &PanguConfig, targets: &[String]) -> Result<()> {
    finalize_manifest_with(staging, cfg, targets, None)
}

/// [`finalize_manifest`] for a package partitioned as `ranks` (whatever
/// its targets: the manifest lists the ranks of an Ascend-only package too).
pub fn finalize_manifest_with(
    staging: &Path,
    cfg: &PanguConfig,
    targets: &[String],
    ranks: Option<panguc_runtime::package::RanksSection>,
) -> Result<()> {
    let path = staging.join(MANIFEST_FILE);
    let mut manifest = if path.is_file() {
        panguc_runtime::package::read_manifest(staging)?
    } else {
        Manifest {
            format_version: PACKAGE_FORMAT_VERSION,
            panguc_version: env!("CARGO_PKG_VERSION").to_string(),
            model: cfg.clone(),
            targets: vec![],
            cpu: None,
            kernels: vec![],
            buffers: vec![],
            weights: None,
            files: BTreeMap::new(),
            ranks: None,
        }
    };
    manifest.targets = targets.to_vec();
    if ranks.is_some() {
        manifest.ranks = ranks;
    }
    manifest.files = hash_tree(staging)?;
    write_manifest(staging, &manifest)
}

/// Copy the checkpoint's tokenizer files (those it has, of
/// [`panguc_runtime::tokenizer::TOKENIZER_FILES`]) into the package root,
/// where the manifest hashes them like every other file.
pub fn copy_tokenizer_files(model_dir: &Path, staging: &Path) -> Result<()> {
    for name in panguc_runtime::tokenizer::TOKENIZER_FILES {
        let from = model_dir.join(name);
        if from.is_file() {
            std::fs::copy(&from, staging.join(name))
                .with_context(|| format!("cannot copy {} into the package", from.display()))?;
        }
    }
    Ok(())
}

fn write_manifest(staging: &Path, m: &Manifest) -> Result<()> {
    let mut text = serde_json::to_string_pretty(m)?;
    text.push('\n');
    write(&staging.join(MANIFEST_FILE), text.as_bytes())
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

fn buffer_plan(p: &KernelProgram) -> Vec<BufferEntry> {
    p.buffers
        .iter()
        .map(|b| BufferEntry {
            name: b.name.clone(),
            dtype: b.dtype,
            shape: b.shape.iter().map(|d| d.to_string()).collect(),
            kind: match &b.kind {
                BufferKind::Input { index } => format!("input {index}"),
                BufferKind::Weight { index } => format!("weight {}", p.weights[*index].name),
                BufferKind::KvCache { cache } => format!("kv_cache {cache}"),
                BufferKind::Activation { slot } => format!("slot {slot}"),
                BufferKind::View { base, .. } => format!("view {}", p.buffers[base.index()].name),
            },
        })
        .collect()
}

/// What packing the weights took (for `panguc bench`).
#[derive(Debug, Clone, Copy, Default)]
pub struct PackStats {
    pub bytes: u64,
    pub seconds: f64,
}

/// Where each prepared weight goes: `weights/<group>.bin` at the next
/// 64-byte aligned offset after the group's previous weight, in program
/// order; and each file's final length.
fn weight_placement(p: &KernelProgram) -> (Vec<WeightEntry>, BTreeMap<String, u64>) {
    let mut ends: BTreeMap<String, u64> = BTreeMap::new();
    let entries = p
        .weights
        .iter()
        .map(|w| {
            let file = format!("weights/{}.bin", w.group);
            let end = ends.entry(file.clone()).or_insert(0);
            let offset = end.next_multiple_of(WEIGHT_ALIGN);
            let bytes = w.stored_bytes() as u64;
            *end = offset + bytes;
            WeightEntry { name: w.name.clone(), file, offset, bytes }
        })
        .collect();
    (entries, ends)
}

/// Evaluate every prepared weight and write it, in kernel layout, at its
/// place in `weights/<group>.bin` ([`weight_placement`]).
///
/// The places depend only on the weights' sizes, so they are fixed before
/// anything is packed: one worker per core takes the next weight in
/// program order, prepares it (read from the mapped shards, copied or
/// converted, packed) and writes it with one positioned write at its
/// offset. The files are the same as a sequential run's (padding is the
/// zeros of the pre-sized file), the workers never wait for each other,
/// and memory stays bounded by one prepared weight per worker whatever
/// the model's size. On failure the error of the first failing weight in
/// program order is reported (every weight before it was already taken,
/// so it always finishes).
fn write_weights(staging: &Path, ckpt: &Checkpoint, p: &KernelProgram) -> Result<(Vec<WeightEntry>, PackStats)> {
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let started = std::time::Instant::now();
    std::fs::create_dir_all(staging.join("weights"))?;
    let (entries, ends) = weight_placement(p);
    let mut files = BTreeMap::new();
    for (rel, len) in &ends {
        let f = std::fs::File::create(staging.join(rel)).with_context(|| format!("creating {rel}"))?;
        f.set_len(*len).with_context(|| format!("sizing {rel}"))?;
        files.insert(rel.clone(), f);
    }
    let total: u64 = entries.iter().map(|e| e.bytes).sum();
    let n = entries.len();
    let workers = std::thread::available_parallelism().map(|c| c.get()).unwrap_or(1).min(n).max(1);
    let (next, stop) = (AtomicUsize::new(0), AtomicBool::new(false));
    let bar = pack_progress(total);
    let write_one = |i: usize| -> Result<()> {
        let (w, e) = (&p.weights[i], &entries[i]);
        let bytes = prepared_bytes(ckpt, w).with_context(|| format!("preparing weight `{}`", w.name))?;
        if bytes.len() as u64 != e.bytes {
            bail!("weight `{}` packed to {} bytes, its layout needs {}", w.name, bytes.len(), e.bytes);
        }
        files[&e.file].write_all_at(&bytes, e.offset).with_context(|| format!("writing {}", e.file))?;
        bar.inc(e.bytes);
        Ok(())
    };
    let mut failures: Vec<(usize, anyhow::Error)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| {
                    let mut failed = vec![];
                    while !stop.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            break;
                        }
                        if let Err(e) = write_one(i) {
                            stop.store(true, Ordering::Relaxed);
                            failed.push((i, e));
                        }
                    }
                    failed
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|_| vec![(n, anyhow!("a packing worker panicked"))]))
            .collect()
    });
    bar.finish_and_clear();
    failures.sort_by_key(|(i, _)| *i);
    if let Some((_, e)) = failures.into_iter().next() {
        return Err(e);
    }
    Ok((entries, PackStats { bytes: total, seconds: started.elapsed().as_secs_f64() }))
}

/// A bytes/s progress bar on stderr for packing a large model (hidden when
/// stderr is not a terminal or the model is small).
fn pack_progress(total: u64) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if total < (256 << 20) || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::with_draw_target(Some(total), indicatif::ProgressDrawTarget::stderr());
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "packing weights {bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style);
    }
    bar
}

/// A prepared weight's bytes in its storage dtype and layout.
///
/// Tensors already stored in the weight's dtype, and subgraphs that only
/// move their elements (merged QKV and gate/up weights, stacked experts),
/// are copied as bytes ([`crate::weight_bytes`]); anything else is
/// evaluated in f32 by the interpreter and rounded ([`reference_bytes`]).
/// Both give the same bytes (tested).
pub fn prepared_bytes(ckpt: &Checkpoint, w: &PreparedWeight) -> Result<Vec<u8>> {
    let row_major: std::borrow::Cow<[u8]> = match &w.expr {
        WeightExpr::Tensor { name } => {
            let (dtype, shape, _) =
                ckpt.tensor_info(name).ok_or_else(|| anyhow!("tensor `{name}` is not in the checkpoint"))?;
            if shape != w.shape {
                bail!("tensor `{name}` has shape {shape:?}, the kernel program expects {:?}", w.shape);
            }
            if dtype == w.dtype {
                ckpt.tensor_bytes(name)?.into()
            } else {
                encode(&ckpt.load_f32(name, &shape)?, w.dtype)?.into()
            }
        }
        WeightExpr::Graph { function } => match crate::weight_bytes::layout_only_bytes(ckpt, function, w.dtype)? {
            Some(bytes) => bytes.into(),
            None => return reference_bytes(ckpt, w),
        },
    };
    Ok(w.layout.pack(&row_major, &w.shape, w.dtype.size_bytes()))
}

/// [`prepared_bytes`] the reference way: the weight's subgraph evaluated
/// by the interpreter in f32, rounded to the storage dtype, then packed
/// (a plain tensor is the same either way).
pub fn reference_bytes(ckpt: &Checkpoint, w: &PreparedWeight) -> Result<Vec<u8>> {
    let WeightExpr::Graph { function } = &w.expr else { return prepared_bytes(ckpt, w) };
    let mut m = Module::new("prepare", function.name.clone());
    m.add_function(function.clone());
    let interp = panguc_ir::interp::Interpreter::new(&m, ckpt);
    let t = interp.run_entry(&[])?.pop().ok_or_else(|| anyhow!("weight expression has no output"))?;
    if t.shape != w.shape {
        bail!("weight expression gives shape {:?}, expected {:?}", t.shape, w.shape);
    }
    Ok(w.layout.pack(&encode(&t, w.dtype)?, &w.shape, w.dtype.size_bytes()))
}

/// Row-major little-endian bytes of `t` in `dtype` (exact: the scheduler
/// only keeps a narrow dtype for values that are representable in it).
fn encode(t: &Tensor, dtype: DType) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(t.numel() * dtype.size_bytes());
    match (&t.data, dtype) {
        (panguc_ir::TensorData::F32(v), DType::F32) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        (panguc_ir::TensorData::F32(v), DType::BF16) => {
            v.iter().for_each(|x| out.extend(half::bf16::from_f32(*x).to_le_bytes()))
        }
        (panguc_ir::TensorData::F32(v), DType::F16) => {
            v.iter().for_each(|x| out.extend(half::f16::from_f32(*x).to_le_bytes()))
        }
        (panguc_ir::TensorData::I64(v), DType::I64) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        // int8 weights and int32 quant biases: the interpreter holds them
        // as i64; a value outside the storage range is a corrupt tensor.
        (panguc_ir::TensorData::I64(v), DType::I8) => {
            for x in v {
                out.extend(i8::try_from(*x).map_err(|_| anyhow!("int8 weight holds {x}"))?.to_le_bytes())
            }
        }
        (panguc_ir::TensorData::I64(v), DType::I32) => {
            for x in v {
                out.extend(i32::try_from(*x).map_err(|_| anyhow!("int32 weight holds {x}"))?.to_le_bytes())
            }
        }
        (_, d) => bail!("cannot store a weight as {d}"),
    }
    Ok(out)
}

/// `panguc run` on a package: the compiled engine (`--engine compiled`,
/// the default) with `--threads` workers (default: all cores).
pub fn run_package(a: &crate::commands::RunArgs) -> Result<()> {
    check_package_engine(a)?;
    let mut prompts = None;
    let engines = package_engines(a, &mut |cfg| {
        let p = crate::run_batch::prompts(a, cfg)?;
        let context = crate::run_batch::max_context(&p, a.max_new_tokens);
        prompts = Some(p);
        Ok(context)
    })?;
    let prompts = prompts.context("the prompts were not read")?;
    let PackageEngines { cfg, make, tier } = engines;
    match make {
        EngineMaker::PerSequence(make) => {
            log_after(tier, crate::run_batch::generate_and_report(make, a, &cfg, &prompts))
        }
        EngineMaker::Paged(paged) => {
            let a = &paged.run_args(a)?;
            log_after(tier, crate::run_batch::scheduled_run(a, &cfg, &prompts, &mut |s| paged.engine(&cfg, s)))
        }
    }
}

/// `--engine` must name an engine that runs a package's compiled kernels.
pub fn check_package_engine(a: &crate::commands::RunArgs) -> Result<()> {
    match a.engine.as_deref().unwrap_or("compiled") {
        "compiled" => Ok(()),
        "interp" => bail!(
            "{} is a compiled package: it holds prepared weights only, so the interpreter cannot run it; \
             run the checkpoint directory with --engine interp, or the package with --engine compiled",
            a.model.display()
        ),
        other => bail!("unknown --engine `{other}` for a package (available: compiled)"),
    }
}

/// What runs a compiled package: its model config, how its engines are
/// made and the run log's CPU-tier line.
pub struct PackageEngines<'a> {
    pub cfg: PanguConfig,
    pub make: EngineMaker<'a>,
    pub tier: Option<String>,
}

/// How a package's engines are made.
pub enum EngineMaker<'a> {
    /// A one-sequence program (checkpoints under the interpreter, a
    /// one-device package of one-sequence programs): one engine per running
    /// sequence, each with its own contiguous cache, driven through
    /// `PerSequenceEngines`.
    PerSequence(EngineFactory<'a>),
    /// A batched CPU program (one device, or one per rank of a partitioned
    /// package): one engine runs every step over a paged KV cache whose
    /// blocks the scheduler hands out.
    Paged(PagedCpu),
}

/// A batched CPU package opened for [`EngineMaker::Paged`].
pub struct PagedCpu {
    programs: PagedPrograms,
    dir: std::path::PathBuf,
    /// Tokens per KV block, fixed by the package.
    pub block_size: usize,
}

/// Where a [`PagedCpu`]'s engine comes from.
enum PagedPrograms {
    Single {
        pkg: std::sync::Arc<panguc_runtime::Package>,
        pool: std::sync::Arc<panguc_runtime::pool::WorkerPool>,
    },
    /// A partitioned package: every rank holds a paged cache of the
    /// scheduler's blocks.
    Ranks(panguc_runtime::RankPackages),
}

impl PagedCpu {
    /// `a` with the package's block size (a different `--block-size` is refused).
    pub fn run_args(&self, a: &crate::commands::RunArgs) -> Result<crate::commands::RunArgs> {
        Ok(crate::commands::RunArgs { engine_args: self.engine_args(&a.engine_args)?, ..a.clone() })
    }

    /// `a` with the package's block size (a different `--block-size` is refused).
    pub fn engine_args(&self, a: &crate::commands::EngineArgs) -> Result<crate::commands::EngineArgs> {
        let block_size = self.block_size;
        if a.block_size.is_some_and(|b| b != block_size) {
            bail!(
                "{} was compiled for KV blocks of {block_size} tokens: drop --block-size or pass {block_size}",
                self.dir.display()
            );
        }
        Ok(crate::commands::EngineArgs { block_size: Some(block_size), ..a.clone() })
    }

    /// The engine for the scheduler's limits `s`, once its cache (on every
    /// rank of a partitioned package) is known to fit in memory.
    pub fn engine(
        &self,
        cfg: &PanguConfig,
        s: &panguc_runtime::SchedulerConfig,
    ) -> Result<Box<dyn panguc_runtime::BatchEngine + 'static>> {
        let block_bytes = s.block_size * crate::run_batch::kv_bytes_per_token(cfg);
        let devices = match &self.programs {
            PagedPrograms::Single { .. } => 1,
            PagedPrograms::Ranks(r) => r.devices(),
        };
        let each = if devices > 1 { format!(" on each of {devices} ranks") } else { String::new() };
        panguc_runtime::memory::check_fits(
            &format!(
                "the KV cache of {} blocks of {} tokens{each} shared by the running sequences (--kv-cache-mb bounds it)",
                s.num_blocks, s.block_size
            ),
            (s.num_blocks as u64).checked_mul(block_bytes as u64).and_then(|b| b.checked_mul(devices as u64)),
        )?;
        Ok(match &self.programs {
            PagedPrograms::Single { pkg, pool } => {
                Box::new(panguc_runtime::CpuEngine::batched(pkg.clone(), pool.clone(), s.num_blocks)?)
            }
            PagedPrograms::Ranks(ranks) => Box::new(ranks.batched(s.num_blocks)?),
        })
    }
}

/// Open the package of `a.model` (verified) and say how its engines are
/// made: a batched program (one device, or every rank of a partitioned
/// package, which are always batched) as one paged engine, a one-device
/// one-sequence program as one engine per sequence. `context` is told the model config once the package is
/// trusted and returns each one-sequence engine's cache length in tokens.
pub fn package_engines<'a>(
    a: &'a crate::commands::RunArgs,
    context: &mut dyn FnMut(&PanguConfig) -> Result<usize>,
) -> Result<PackageEngines<'a>> {
    let threads = a.engine_args.threads.unwrap_or_else(panguc_runtime::engine::default_threads);
    if panguc_runtime::multirank::package_ranks(&a.model)?.is_some() {
        // Partitioned over N devices: N rank engines in this process.
        let ranks = panguc_runtime::RankPackages::open(&a.model, threads, &open_options(a))?;
        let tier = tier_line(&a.model.join(&ranks.section().dirs[0]), a)?;
        let cfg = ranks.config().clone();
        // The caller reads and sizes its prompts against the trusted config.
        context(&cfg)?;
        // Rank programs are batched whatever the plan: one engine for all sequences.
        let block_size = ranks.block_size()?;
        let paged = PagedCpu { programs: PagedPrograms::Ranks(ranks), dir: a.model.clone(), block_size };
        Ok(PackageEngines { cfg, make: EngineMaker::Paged(paged), tier })
    } else {
        let pool = panguc_runtime::thread_pool(threads)?;
        // Opening verifies the package's small files (the tokenizer's
        // among them) before the tokenizer is read.
        let pkg = std::sync::Arc::new(panguc_runtime::open_package_with(&a.model, &open_options(a))?);
        let tier = tier_line(&a.model, a)?;
        let cfg = pkg.config().clone();
        let context = context(&cfg)?;
        if let Some(block_size) = panguc_runtime::CpuEngine::block_size_of(&pkg) {
            let paged = PagedCpu { programs: PagedPrograms::Single { pkg, pool }, dir: a.model.clone(), block_size };
            return Ok(PackageEngines { cfg, make: EngineMaker::Paged(paged), tier });
        }
        let context = Some(context);
        let make: EngineFactory =
            Box::new(move || Ok(Box::new(panguc_runtime::CpuEngine::with_pool(pkg.clone(), pool.clone(), context)?)));
        Ok(PackageEngines { cfg, make: EngineMaker::PerSequence(make), tier })
    }
}

/// How `panguc run` opens a package (`--verify`, `--cpu-tier`).
fn open_options(a: &crate::commands::RunArgs) -> panguc_runtime::OpenOptions {
    panguc_runtime::OpenOptions { verify: a.engine_args.verify, tier: a.engine_args.cpu_tier.clone() }
}

/// The run log's line naming the CPU kernel tier (stderr: stdout holds the
/// tokens). Chosen before the run, so a CPU below the package's baseline
/// is refused at once; printed after it (see [`log_after`]).
fn tier_line(dir: &Path, a: &crate::commands::RunArgs) -> Result<Option<String>> {
    let manifest = panguc_runtime::package::read_manifest(dir)?;
    let Some(cpu) = &manifest.cpu else { return Ok(None) };
    let t = panguc_runtime::loader::select_tier(cpu, a.engine_args.cpu_tier.as_deref())?;
    let gemms = if t.features.contains("+avx512bf16") { "bf16 dot-product GEMMs" } else { "f32 FMA GEMMs" };
    Ok(Some(format!("panguc: CPU kernel tier {} ({}, {gemms})", t.name, t.cpu)))
}

/// Print the run log's tier line once the run succeeded: a refused run's
/// stderr is its one error line.
pub fn log_after(tier: Option<String>, run: Result<()>) -> Result<()> {
    if let (Ok(()), Some(line)) = (&run, tier) {
        eprintln!("{line}");
    }
    run
}
