//! The package format and its verification.
//!
//! ```text
//! OUT/manifest.json          format version, panguc version, model config,
//!                            targets, kernel list, buffer plan, weight
//!                            table, and the sha256 + size of every file
//! OUT/kernel_program.json    the scheduled kernel program (panguc_ir::kernel)
//! OUT/cpu/libpanguc_kernels.so   one exported entry point per kernel
//!                            (baseline tier; other tiers:
//!                            libpanguc_kernels.<tier>.so)
//! OUT/cpu/kernels[.<tier>].s, .ll  the same code as assembly / optimised IR
//! OUT/weights/<group>.bin    prepared weights in kernel layout, 64-byte
//!                            aligned, memory-mapped at load (omitted for
//!                            config-only compiles)
//! OUT/ir/                    IR dumps
//! OUT/tokenizer.model, tokenizer.json, tokenizer_config.json,
//!   special_tokens_map.json  the checkpoint's tokenizer files it has
//! OUT/report.json            compile report (timings: not hashed)
//! OUT/verified.json          verification stamp (local state: not hashed,
//!                            see `stamp`)
//! ```
//!
//! [`open_package`] refuses a package whose format version is newer than
//! this runtime, and any file that is missing, truncated or modified (size
//! and sha256 checked against the manifest) before anything runs.

pub use crate::stamp::{Verify, STAMP_FILE};
use anyhow::{bail, Context, Result};
use panguc_ir::kernel::KernelProgram;
use panguc_ir::{DType, PanguConfig};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Version of the on-disk layout described above.
/// 2: the CPU section lists one kernel library per instruction-set tier.
pub const PACKAGE_FORMAT_VERSION: u32 = 2;
pub const MANIFEST_FILE: &str = "manifest.json";
pub const PROGRAM_FILE: &str = "kernel_program.json";
/// The baseline tier's kernel library; other tiers insert their name
/// (`cpu/libpanguc_kernels.avx512-bf16.so`): see [`cpu_library`].
pub const CPU_LIBRARY: &str = "cpu/libpanguc_kernels.so";

/// Path of tier `tier`'s kernel library (`baseline`: the first tier).
pub fn cpu_library(tier: &str, baseline: bool) -> String {
    if baseline {
        CPU_LIBRARY.to_string()
    } else {
        format!("cpu/libpanguc_kernels.{tier}.so")
    }
}
/// The compile report holds wall-clock timings, so it is a diagnostic
/// outside the hashed contents (packages must be reproducible).
pub const REPORT_FILE: &str = "report.json";
/// Weight data is aligned to this many bytes inside its file.
pub const WEIGHT_ALIGN: u64 = 64;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub panguc_version: String,
    pub model: PanguConfig,
    pub targets: Vec<String>,
    /// Present when the package has a CPU library.
    pub cpu: Option<CpuSection>,
    pub kernels: Vec<KernelEntry>,
    pub buffers: Vec<BufferEntry>,
    /// Absent for config-only compiles (nothing to run).
    pub weights: Option<Vec<WeightEntry>>,
    /// Every file of the package except the manifest: relative path ->
    /// size and sha256.
    pub files: BTreeMap<String, FileEntry>,
    /// Present for a package partitioned over several devices: each rank is
    /// a complete CPU package in its own directory (its own manifest,
    /// kernel program, kernel library and weights), covered by this
    /// manifest's hashes too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranks: Option<RanksSection>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RanksSection {
    pub devices: usize,
    /// Partition plan (`ep`, `h2p`, ...).
    pub plan: String,
    /// Rank `r`'s package directory, relative to the package (`ranks/rankN`).
    pub dirs: Vec<String>,
    /// The partition document (`partition.json`): every rank's weights (the
    /// shard of each checkpoint tensor it holds), buffers and collectives
    /// in program order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CpuSection {
    pub program: String,
    pub triple: String,
    pub abi: i32,
    /// The kernel library once per instruction-set tier, baseline first and
    /// best last; the loader takes the best one the running CPU supports.
    pub tiers: Vec<CpuTier>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CpuTier {
    /// `x86-64-v3`, `avx512-bf16`, or `host` off x86-64.
    pub name: String,
    pub library: String,
    /// LLVM CPU name and features the code was generated for.
    pub cpu: String,
    pub features: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelEntry {
    pub name: String,
    pub kind: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BufferEntry {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<String>,
    /// `input`, `weight`, `kv_cache`, `slot N`, `view`.
    pub kind: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightEntry {
    pub name: String,
    pub file: String,
    pub offset: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub bytes: u64,
    pub sha256: String,
}

/// True when `dir` looks like a package (has a manifest) rather than a
/// checkpoint directory.
pub fn is_package(dir: &Path) -> bool {
    dir.join(MANIFEST_FILE).is_file()
}

/// sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Size and hash of every file under `dir` except the manifest and the
/// report, keyed by '/'-separated relative path (sorted, so manifests are
/// deterministic).
pub fn hash_tree(dir: &Path) -> Result<BTreeMap<String, FileEntry>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, FileEntry>) -> Result<()> {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot list {}", dir.display()))?
            .collect::<std::io::Result<_>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let path = e.path();
            if path.is_dir() {
                walk(root, &path, out)?;
                continue;
            }
            let rel: Vec<String> = path
                .strip_prefix(root)
                .expect("under root")
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            let rel = rel.join("/");
            if rel == MANIFEST_FILE || rel == REPORT_FILE || rel == STAMP_FILE {
                continue;
            }
            let bytes = std::fs::metadata(&path)?.len();
            out.insert(rel, FileEntry { bytes, sha256: sha256_file(&path)? });
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out)?;
    Ok(out)
}

/// Read and check the manifest's format version before anything else, so a
/// newer package fails with a clear message rather than a parse error.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST_FILE);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("cannot read package manifest {}", path.display()))?;
    parse_manifest(&text, dir)
}

/// Parses and checks the manifest text of the package in `dir` (which only
/// names it in errors). The untrusted-input entry point (fuzzed by `fuzz/`).
pub fn parse_manifest(text: &str, dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST_FILE);
    let value: serde_json::Value =
        serde_json::from_str(text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    let version = value
        .get("format_version")
        .and_then(serde_json::Value::as_u64)
        .with_context(|| format!("{} has no numeric `format_version`", path.display()))?;
    if version > PACKAGE_FORMAT_VERSION as u64 {
        bail!(
            "package {} has format version {version}, but this runtime reads format version {PACKAGE_FORMAT_VERSION}: \
             it was written by a newer panguc; upgrade panguc or recompile the model",
            dir.display()
        );
    }
    if version < PACKAGE_FORMAT_VERSION as u64 {
        bail!(
            "package {} has old format version {version} (this runtime reads {PACKAGE_FORMAT_VERSION}): recompile the model",
            dir.display()
        );
    }
    let manifest: Manifest = serde_json::from_value(value)
        .with_context(|| format!("{} does not match package format {version}", path.display()))?;
    // The runtime sizes its buffers from this config: hold it to the same
    // bounds as a config.json, whoever wrote the manifest.
    manifest
        .model
        .validate()
        .map_err(|(key, message)| anyhow::anyhow!("{}: model key `{key}`: {message}", path.display()))?;
    Ok(manifest)
}

/// Check every file the manifest lists: present, of the recorded size, and
/// with the recorded sha256 (weight files the verification stamp vouches
/// for are not re-read: see [`crate::stamp`]); and that the package holds
/// no file the manifest does not list.
pub fn verify_files(dir: &Path, manifest: &Manifest) -> Result<()> {
    crate::stamp::verify_files_with(dir, manifest, Verify::Stamp).map(|_| ())
}

/// Refuse a file the manifest does not list (other than the manifest and
/// the report) in a directory the manifest lists files of: a loader or a
/// CANN build that globs such a directory (`weights/`, `cpu/`, `op_kernel/`)
/// would pick it up unverified. Directories the manifest knows nothing of
/// are not read by anything (a rank's own manifest does not list the rank's
/// CANN project, which the top-level manifest covers). Only names are read,
/// so this is cheap enough to run on every open.
pub fn check_no_unlisted_files(dir: &Path, manifest: &Manifest) -> Result<()> {
    let listed_dirs: std::collections::BTreeSet<&str> =
        manifest.files.keys().map(|rel| rel.rsplit_once('/').map_or("", |(d, _)| d)).collect();
    walk(dir, dir, manifest, &listed_dirs)?;
    fn walk(
        root: &Path,
        dir: &Path,
        manifest: &Manifest,
        listed_dirs: &std::collections::BTreeSet<&str>,
    ) -> Result<()> {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot list {}", dir.display()))?
            .collect::<std::io::Result<_>>()
            .with_context(|| format!("cannot list {}", dir.display()))?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let path = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(root, &path, manifest, listed_dirs)?;
                continue;
            }
            let rel = path.strip_prefix(root).unwrap_or(&path);
            let rel: Vec<String> = rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
            let rel = rel.join("/");
            let parent = rel.rsplit_once('/').map_or("", |(d, _)| d);
            if listed_dirs.contains(parent)
                && rel != MANIFEST_FILE
                && rel != REPORT_FILE
                && !is_stamp_file(&rel)
                && !manifest.files.contains_key(&rel)
                && !is_cann_build_product(&rel)
            {
                bail!(
                    "package {} holds {rel}, which its manifest does not list (an unexpected or injected file); \
                     remove it or recompile the package",
                    root.display()
                );
            }
        }
        Ok(())
    }
    Ok(())
}

/// The verification stamp (and its temporary file while it is written) of
/// this package or of a rank package inside it: local state, not content.
fn is_stamp_file(rel: &str) -> bool {
    let name = rel.rsplit_once('/').map_or(rel, |(_, n)| n);
    name == crate::stamp::STAMP_FILE || name.starts_with(&format!(".{}.", crate::stamp::STAMP_FILE))
}

/// True when `dir` is `ranks/<name>` of a package whose manifest lists it
/// as a rank directory.
pub(crate) fn is_rank_of_partitioned_package(dir: &Path) -> bool {
    let (Some(ranks), Some(name)) = (dir.parent(), dir.file_name()) else { return false };
    let Some(top) = ranks.parent().filter(|_| ranks.file_name().is_some_and(|n| n == "ranks")) else {
        return false;
    };
    let rel = format!("ranks/{}", name.to_string_lossy());
    read_manifest(top).ok().and_then(|m| m.ranks).is_some_and(|r| r.dirs.contains(&rel))
}

/// What the documented CANN build of `ascend/<target>/` writes in place
/// (`build_out/`, the `panguc_host` executable): expected on a CANN
/// machine, and never read by this runtime.
fn is_cann_build_product(rel: &str) -> bool {
    let parts: Vec<&str> = rel.split('/').collect();
    parts
        .windows(3)
        .enumerate()
        .any(|(i, w)| w[0] == "ascend" && (w[2] == "build_out" || (w[2] == "panguc_host" && i + 3 == parts.len())))
}

/// A verified package on disk (not yet loaded for execution).
#[derive(Debug, Clone)]
pub struct PackageFiles {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub program: Option<KernelProgram>,
}

/// Verify a package: format version, then every file's size and hash
/// (trusting the verification stamp for unchanged weight files), then
/// parse the kernel program.
pub fn verify_package(dir: &Path) -> Result<PackageFiles> {
    verify_package_with(dir, Verify::Stamp)
}

/// [`verify_package`] with an explicit verification mode.
pub fn verify_package_with(dir: &Path, mode: Verify) -> Result<PackageFiles> {
    if !dir.is_dir() {
        bail!("package directory {} does not exist", dir.display());
    }
    let manifest = read_manifest(dir)?;
    crate::stamp::verify_files_with(dir, &manifest, mode)?;
    let program = match &manifest.cpu {
        Some(cpu) => {
            let path = dir.join(&cpu.program);
            if !manifest.files.contains_key(&cpu.program) {
                bail!("package manifest does not cover its kernel program {}", cpu.program);
            }
            let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
            let p: KernelProgram =
                serde_json::from_str(&text).with_context(|| format!("{} is not a kernel program", path.display()))?;
            p.validate().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            Some(p)
        }
        None => None,
    };
    Ok(PackageFiles { dir: dir.to_path_buf(), manifest, program })
}
