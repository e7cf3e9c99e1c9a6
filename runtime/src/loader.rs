//! Loading a verified package for execution: the kernel library (dlopen,
//! one symbol per kernel, ABI check), the host CPU check, and the prepared
//! weights memory-mapped once and shared by every engine.

use crate::package::{verify_package_with, CpuSection, CpuTier, Manifest, PackageFiles, Verify};
use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use panguc_ir::kernel::KernelProgram;
use panguc_ir::PanguConfig;
use std::collections::BTreeMap;
use std::path::Path;

/// Kernel calling convention this runtime implements (see
/// `panguc_codegen_cpu::KERNEL_ABI_VERSION`).
pub const KERNEL_ABI: i32 = 1;

/// `void kernel(i8** args, const i64* syms, i64 begin, i64 end, i8* scratch)`.
pub type KernelFn = unsafe extern "C" fn(*const *mut u8, *const i64, i64, i64, *mut u8);

/// A package ready to run: verified files, the loaded kernel library and
/// the mapped weights. Share it between engines with an `Arc`.
pub struct Package {
    files: PackageFiles,
    program: KernelProgram,
    /// Name of the CPU tier whose library is loaded.
    tier: String,
    // Field order matters for drop: kernels point into `_lib`.
    /// `None` for host-executed kernels (collectives).
    kernels: Vec<Option<KernelFn>>,
    _lib: libloading::Library,
    maps: BTreeMap<String, Mmap>,
    /// Address of each prepared weight (index = program weight index).
    weight_addr: Vec<usize>,
}

impl std::fmt::Debug for Package {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Package").field("dir", &self.files.dir).field("kernels", &self.kernels.len()).finish()
    }
}

/// How [`open_package_with`] opens a package.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Trust the verification stamp for unchanged weight files (default),
    /// or re-hash everything.
    pub verify: Verify,
    /// Load this CPU tier instead of the best one the CPU supports (tests
    /// force the baseline this way); default: `$PANGUC_CPU_TIER` if set.
    pub tier: Option<String>,
}

/// Environment variable naming the CPU tier to load (see [`OpenOptions`]).
pub const TIER_ENV: &str = "PANGUC_CPU_TIER";

/// The kernel library tier to load on this machine: `forced` (else
/// `$PANGUC_CPU_TIER`) if given, otherwise the best tier whose features the
/// running CPU has. A CPU below every tier is an error naming what it
/// lacks, never a SIGILL.
pub fn select_tier<'a>(cpu: &'a CpuSection, forced: Option<&str>) -> Result<&'a CpuTier> {
    let env = std::env::var(TIER_ENV).ok().filter(|s| !s.is_empty());
    let names = || cpu.tiers.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(", ");
    if let Some(name) = forced.or(env.as_deref()) {
        let Some(t) = cpu.tiers.iter().find(|t| t.name == name) else {
            bail!("the package has no CPU tier `{name}` (it has: {})", names());
        };
        let missing = missing_features(&t.features);
        if !missing.is_empty() {
            bail!("CPU tier `{name}` needs CPU features this machine lacks ({})", missing.join(", "));
        }
        return Ok(t);
    }
    if let Some(t) = cpu.tiers.iter().rev().find(|t| missing_features(&t.features).is_empty()) {
        return Ok(t);
    }
    let Some(base) = cpu.tiers.first() else {
        bail!("the package's CPU section lists no kernel library");
    };
    bail!(
        "this machine's CPU is below the package's baseline tier `{}` ({}): it lacks {}; the package cannot run here",
        base.name,
        base.cpu,
        missing_features(&base.features).join(", ")
    )
}

/// Open, verify and load a package for the CPU engine.
pub fn open_package(dir: &Path) -> Result<Package> {
    open_package_with(dir, &OpenOptions::default())
}

/// [`open_package`] with explicit options.
pub fn open_package_with(dir: &Path, opts: &OpenOptions) -> Result<Package> {
    let files = verify_package_with(dir, opts.verify)?;
    let Some(cpu) = files.manifest.cpu.clone() else {
        if let Some(r) = &files.manifest.ranks {
            bail!(
                "package {} is partitioned over {} devices (plan {}): open it with the multi-rank engine \
                 (`panguc run`, panguc_runtime::MultiRankEngine), not as a single-device package",
                dir.display(),
                r.devices,
                r.plan
            );
        }
        bail!(
            "package {} has no CPU target (targets: {}); compile it with --target cpu",
            dir.display(),
            files.manifest.targets.join(",")
        );
    };
    let program = files.program.clone().expect("a cpu section has a program");
    let tier = select_tier(&cpu, opts.tier.as_deref()).with_context(|| format!("package {}", dir.display()))?;
    tracing::info!("{}: CPU kernel tier {}", dir.display(), tier.name);
    if cpu.abi != KERNEL_ABI {
        bail!(
            "package {} uses kernel ABI {}, this runtime implements ABI {KERNEL_ABI}: recompile the model",
            dir.display(),
            cpu.abi
        );
    }
    // Only files the hash check covered are loaded or mapped.
    if !files.manifest.files.contains_key(&tier.library) {
        bail!("package manifest does not list the hash of its kernel library {}", tier.library);
    }
    let lib_path = dir.join(&tier.library);
    // SAFETY: the library was verified against the manifest's hash; its
    // initialisers are the system linker's defaults only.
    let lib = unsafe { libloading::Library::new(&lib_path) }
        .with_context(|| format!("cannot load the kernel library {}", lib_path.display()))?;
    let abi: i32 = unsafe {
        let f = lib
            .get::<unsafe extern "C" fn() -> i32>(b"panguc_kernel_abi")
            .with_context(|| format!("{} has no panguc_kernel_abi entry point", lib_path.display()))?;
        f()
    };
    if abi != KERNEL_ABI {
        bail!("{} implements kernel ABI {abi}, expected {KERNEL_ABI}", lib_path.display());
    }
    let mut kernels = Vec::with_capacity(program.kernels.len());
    for k in &program.kernels {
        if k.kind.is_host() {
            kernels.push(None);
            continue;
        }
        let f: KernelFn = unsafe {
            *lib.get::<KernelFn>(k.name.as_bytes())
                .with_context(|| format!("{} has no entry point for kernel {}", lib_path.display(), k.name))?
        };
        kernels.push(Some(f));
    }
    let (maps, weight_addr) = map_weights(dir, &files.manifest, &program)?;
    let tier = tier.name.clone();
    Ok(Package { files, program, tier, kernels, _lib: lib, maps, weight_addr })
}

/// Map every weight file once; each prepared weight becomes an address
/// inside its file's mapping.
fn map_weights(
    dir: &Path,
    manifest: &Manifest,
    program: &KernelProgram,
) -> Result<(BTreeMap<String, Mmap>, Vec<usize>)> {
    let Some(entries) = &manifest.weights else {
        bail!(
            "package {} was compiled from the config alone and holds no weights, so it cannot be run; \
             compile a checkpoint with weights",
            dir.display()
        );
    };
    let by_name: BTreeMap<&str, &crate::package::WeightEntry> = entries.iter().map(|e| (e.name.as_str(), e)).collect();
    let mut maps = BTreeMap::new();
    for e in entries {
        if !manifest.files.contains_key(&e.file) {
            bail!("package manifest does not list the hash of weight file {}", e.file);
        }
        if !maps.contains_key(&e.file) {
            let path = dir.join(&e.file);
            let f = std::fs::File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
            // SAFETY: package files are read-only inputs; the hash check
            // above is the integrity guarantee.
            let m = unsafe { Mmap::map(&f) }.with_context(|| format!("cannot map {}", path.display()))?;
            maps.insert(e.file.clone(), m);
        }
    }
    let mut addr = Vec::with_capacity(program.weights.len());
    for w in &program.weights {
        let e = by_name
            .get(w.name.as_str())
            .with_context(|| format!("package manifest has no weight `{}` that the kernel program needs", w.name))?;
        let m = &maps[&e.file];
        let want = w.stored_bytes() as u64;
        if e.bytes != want || e.offset + e.bytes > m.len() as u64 {
            bail!("weight `{}` in {} has {} bytes at offset {}, expected {want}", w.name, e.file, e.bytes, e.offset);
        }
        addr.push(m.as_ptr() as usize + e.offset as usize);
    }
    Ok((maps, addr))
}

/// The features of an LLVM feature string (`+avx2,+fma,...`) this machine
/// lacks; a feature the runtime cannot detect counts as lacking.
pub fn missing_features(features: &str) -> Vec<String> {
    features.split(',').filter_map(|f| f.strip_prefix('+')).filter(|f| host_lacks(f)).map(String::from).collect()
}

#[cfg(target_arch = "x86_64")]
fn host_lacks(feature: &str) -> bool {
    let have = match feature {
        "sse4.1" => is_x86_feature_detected!("sse4.1"),
        "sse4.2" => is_x86_feature_detected!("sse4.2"),
        "avx" => is_x86_feature_detected!("avx"),
        "avx2" => is_x86_feature_detected!("avx2"),
        "fma" => is_x86_feature_detected!("fma"),
        "f16c" => is_x86_feature_detected!("f16c"),
        "bmi1" | "bmi" => is_x86_feature_detected!("bmi1"),
        "bmi2" => is_x86_feature_detected!("bmi2"),
        "avx512f" => is_x86_feature_detected!("avx512f"),
        "avx512bw" => is_x86_feature_detected!("avx512bw"),
        "avx512dq" => is_x86_feature_detected!("avx512dq"),
        "avx512vl" => is_x86_feature_detected!("avx512vl"),
        "avx512cd" => is_x86_feature_detected!("avx512cd"),
        "avx512bf16" => is_x86_feature_detected!("avx512bf16"),
        "avx512vnni" => is_x86_feature_detected!("avx512vnni"),
        "lzcnt" => is_x86_feature_detected!("lzcnt"),
        "movbe" => is_x86_feature_detected!("movbe"),
        "popcnt" => is_x86_feature_detected!("popcnt"),
        "ssse3" => is_x86_feature_detected!("ssse3"),
        "cx16" => is_x86_feature_detected!("cmpxchg16b"),
        "xsave" => is_x86_feature_detected!("xsave"),
        "sse2" => is_x86_feature_detected!("sse2"),
        "sse3" => is_x86_feature_detected!("sse3"),
        // Code for a feature this runtime cannot even name must not run.
        _ => false,
    };
    !have
}

#[cfg(not(target_arch = "x86_64"))]
fn host_lacks(_feature: &str) -> bool {
    false
}

impl Package {
    pub fn dir(&self) -> &Path {
        &self.files.dir
    }
    pub fn manifest(&self) -> &Manifest {
        &self.files.manifest
    }
    pub fn config(&self) -> &PanguConfig {
        &self.files.manifest.model
    }
    pub fn program(&self) -> &KernelProgram {
        &self.program
    }
    /// The CPU tier whose kernel library is loaded (`x86-64-v3`, ...).
    pub fn tier(&self) -> &str {
        &self.tier
    }
    /// The entry point of kernel `i` (`None` for host-executed kernels).
    pub(crate) fn kernel(&self, i: usize) -> Option<KernelFn> {
        self.kernels[i]
    }
    pub(crate) fn weight_ptr(&self, index: usize) -> *mut u8 {
        self.weight_addr[index] as *mut u8
    }
    /// Bytes of mapped weight files.
    pub fn mapped_bytes(&self) -> usize {
        self.maps.values().map(|m| m.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(tiers: &[(&str, &str)]) -> CpuSection {
        CpuSection {
            program: "kernel_program.json".into(),
            triple: "x86_64-unknown-linux-gnu".into(),
            abi: KERNEL_ABI,
            tiers: tiers
                .iter()
                .map(|(name, features)| CpuTier {
                    name: name.to_string(),
                    library: format!("cpu/{name}.so"),
                    cpu: "test".into(),
                    features: features.to_string(),
                })
                .collect(),
        }
    }

    #[test]
    fn a_cpu_below_every_tier_gets_an_error_naming_what_it_lacks() {
        // No machine has a feature the runtime cannot even name.
        let cpu = section(&[("future", "+sse2,+imaginary-isa")]);
        let e = format!("{:#}", select_tier(&cpu, None).unwrap_err());
        assert!(e.contains("below the package's baseline tier `future`") && e.contains("imaginary-isa"), "{e}");
        let e = format!("{:#}", select_tier(&cpu, Some("other")).unwrap_err());
        assert!(e.contains("no CPU tier `other`") && e.contains("future"), "{e}");
    }

    #[test]
    fn the_best_supported_tier_wins_unless_one_is_forced() {
        let cpu = section(&[("base", ""), ("best", "+imaginary-isa")]);
        assert_eq!(select_tier(&cpu, None).unwrap().name, "base", "the best tier is unsupported here");
        let e = format!("{:#}", select_tier(&cpu, Some("best")).unwrap_err());
        assert!(e.contains("lacks (imaginary-isa)"), "{e}");
        let cpu = section(&[("base", ""), ("best", "")]);
        assert_eq!(select_tier(&cpu, Some("base")).unwrap().name, "base");
    }
}
