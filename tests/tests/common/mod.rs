//! Shared fixtures of the CPU backend's end-to-end tests: the bundled tiny
//! checkpoint compiled once per test binary into packages for the imported
//! (primitive) module and the hand-fused variants.

#![allow(dead_code)]

pub mod fused;
pub mod mixed;

use panguc::frontend::Checkpoint;
use panguc_ir::session::InterpSession;
use panguc_ir::{DType, Module, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// Which module a package was compiled from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Graph {
    /// The importer's primitive ops (attention as matmul/softmax, dense MoE).
    Imported,
    Classic,
    Plan,
    /// The fusion pipeline of `panguc compile`.
    Pipeline,
    /// The fusion rules without the per-row MoE (`grouped-matmul`,
    /// `moe-shared-residual`), so the MoE block is the rewrite-introduced
    /// batched `moe_grouped_ffn` (the cost model keeps `moe_ffn` for the
    /// tiny model's one-tile experts when it may choose).
    BatchedMoe,
}

pub const GRAPHS: [Graph; 5] = [Graph::Imported, Graph::Classic, Graph::Plan, Graph::Pipeline, Graph::BatchedMoe];

/// The rules of [`Graph::BatchedMoe`].
pub fn batched_moe_rules() -> Vec<String> {
    let per_row = ["grouped-matmul", "moe-shared-residual"];
    panguc_lowering::rules::rule_summaries()
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| !per_row.contains(n))
        .map(String::from)
        .collect()
}

pub fn tiny_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny-pangu")
}

pub fn checkpoint() -> Checkpoint {
    panguc::commands::open_checkpoint(&tiny_dir(), false).expect("tiny checkpoint")
}

pub fn module(ckpt: &Checkpoint, g: Graph) -> Module {
    let dtype_of = |name: &str| ckpt.tensor_info(name).map(|(d, _, _)| d).unwrap_or(DType::BF16);
    match g {
        Graph::Imported => panguc::commands::import(ckpt).expect("import"),
        Graph::Classic => fused::build(ckpt.config(), fused::Variant::Classic, &dtype_of),
        Graph::Plan => fused::build(ckpt.config(), fused::Variant::Plan, &dtype_of),
        Graph::Pipeline => {
            let imported = panguc::commands::import(ckpt).expect("import");
            let opts = panguc::pipeline::PipelineOptions::default();
            panguc::pipeline::run_pipeline(ckpt, &imported, 0.0, &opts).expect("fusion pipeline").module
        }
        Graph::BatchedMoe => {
            let imported = panguc::commands::import(ckpt).expect("import");
            let opts = panguc_lowering::FuseOptions { rules: Some(batched_moe_rules()), ..Default::default() };
            panguc_lowering::fuse_module(&imported, &opts, |_, _| Ok(())).expect("fusion").0
        }
    }
}

/// Compile `m` for the CPU into a new directory `out`.
pub fn compile(ckpt: &Checkpoint, m: &Module, out: &Path) {
    std::fs::create_dir_all(out).unwrap();
    panguc::package_build::write_cpu_package(out, ckpt, m, &["cpu".to_string()], &serde_json::Value::Null)
        .unwrap_or_else(|e| panic!("compiling {}: {e:#}", out.display()));
}

/// Every file under `dir` (relative path -> bytes), except the
/// verification stamp: it is this machine's record of when the files were
/// last checked (inodes, times), not package contents.
pub fn read_tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else if p.file_name().is_some_and(|n| n == panguc_runtime::stamp::STAMP_FILE) {
                continue;
            } else {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Copy a directory tree.
pub fn copy_tree(from: &Path, to: &Path) {
    for (rel, bytes) in read_tree(from) {
        let p = to.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
}

pub struct Fixture {
    _dir: tempfile::TempDir,
    pub root: PathBuf,
    pub packages: BTreeMap<Graph, PathBuf>,
    loaded: BTreeMap<Graph, Arc<panguc_runtime::Package>>,
}

/// The three packages, compiled on first use.
pub fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        // LLVM compiles one module per thread: build the packages side by side.
        let packages: BTreeMap<Graph, PathBuf> = std::thread::scope(|s| {
            let jobs: Vec<_> = GRAPHS
                .iter()
                .map(|g| {
                    let out = dir.path().join(format!("{g:?}").to_lowercase());
                    s.spawn(move || {
                        let ckpt = checkpoint();
                        compile(&ckpt, &module(&ckpt, *g), &out);
                        (*g, out)
                    })
                })
                .collect();
            jobs.into_iter().map(|j| j.join().expect("compile thread")).collect()
        });
        let loaded = packages.iter().map(|(g, p)| (*g, Arc::new(open_tier(p, BASELINE)))).collect();
        Fixture { root: dir.path().to_path_buf(), _dir: dir, packages, loaded }
    })
}

// Not every test binary that shares this module uses both names.
#[allow(unused_imports)]
pub use panguc_codegen_cpu::{BASELINE_TIER as BASELINE, BF16_TIER as BF16};

/// Open `dir` with its kernel library for CPU tier `tier`.
pub fn open_tier(dir: &Path, tier: &str) -> panguc_runtime::Package {
    let opts = panguc_runtime::OpenOptions { tier: Some(tier.into()), ..Default::default() };
    panguc_runtime::open_package_with(dir, &opts)
        .unwrap_or_else(|e| panic!("opening {} ({tier}): {e:#}", dir.display()))
}

/// True when this CPU runs the AVX-512 BF16 tier (tests of that tier are
/// skipped, with a message, elsewhere).
pub fn cpu_has_bf16_tier() -> bool {
    let Ok(host) = panguc_codegen_cpu::HostTarget::detect() else { return false };
    let Some(tier) = panguc_codegen_cpu::Tier::x86(BF16, &host.triple) else { return false };
    panguc_runtime::loader::missing_features(&tier.target.features).is_empty()
}

impl Fixture {
    /// Graph `g`'s package with the baseline tier's kernels, which follow
    /// the reference's accumulation order (exact comparisons hold).
    pub fn package(&self, g: Graph) -> Arc<panguc_runtime::Package> {
        self.loaded[&g].clone()
    }

    pub fn engine(&self, g: Graph, threads: usize) -> panguc_runtime::CpuEngine {
        let opts = panguc_runtime::EngineOptions { threads, max_context: Some(256) };
        panguc_runtime::CpuEngine::new(self.package(g), &opts).expect("engine")
    }
}

pub fn session<'a>(m: &'a Module, ckpt: &'a Checkpoint) -> InterpSession<'a> {
    let cfg = ckpt.config();
    let interp = panguc_ir::interp::Interpreter::new(m, ckpt);
    InterpSession::new(interp, cfg.num_hidden_layers, [cfg.num_key_value_heads, cfg.head_dim()])
}

/// Assert `got` is within `tol` of `want`, elementwise relative to
/// `max(|got|, |want|, floor)`.
pub fn assert_close(got: &Tensor, want: &Tensor, tol: f32, floor: f32, what: &str) {
    assert_eq!(got.shape, want.shape, "{what}: shapes differ");
    let d = got.max_rel_diff(want, floor);
    assert!(d <= tol, "{what}: max relative difference {d} exceeds {tol}");
}
