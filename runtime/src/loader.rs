//! Loading a verified package for execution: the kernel library (dlopen,
//! one symbol per kernel, ABI check), the host CPU check, and the prepared
//! weights memory-mapped once and shared by every engine.

use crate::package::{verify_package_with, Manifest, PackageFiles, Verify};
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
    check_host_features(&cpu.cpu, &cpu.features)?;
    if cpu.abi != KERNEL_ABI {
        bail!(
            "package {} uses kernel ABI {}, this runtime implements ABI {KERNEL_ABI}: recompile the model",
            dir.display(),
            cpu.abi
        );
    }
    // Only files the hash check covered are loaded or mapped.
    if !files.manifest.files.contains_key(&cpu.library) {
        bail!("package manifest does not list the hash of its kernel library {}", cpu.library);
    }
    let lib_path = dir.join(&cpu.library);
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
    Ok(Package { files, program, kernels, _lib: lib, maps, weight_addr })
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

/// Refuse code generated for CPU features this machine lacks (it would die
/// with SIGILL instead of a message).
fn check_host_features(cpu: &str, features: &str) -> Result<()> {
    let missing: Vec<&str> =
        features.split(',').filter_map(|f| f.strip_prefix('+')).filter(|f| host_lacks(f)).collect();
    if !missing.is_empty() {
        bail!(
            "this package was compiled for {cpu} and needs CPU features this machine lacks ({}); recompile it on this machine",
            missing.join(", ")
        );
    }
    Ok(())
}

#[cfg(target_arch = "x86_64")]
fn host_lacks(feature: &str) -> bool {
    // The features that change which instructions vector code uses; others
    // are not checked.
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
        _ => true,
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
