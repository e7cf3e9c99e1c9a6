//! `panguc compile --target ascend910b,ascend310p`: the AscendC operator
//! projects under `OUT/ascend/<target>/` (see `panguc_codegen_ascendc`).
//!
//! Every target is emitted in memory first; files are written only when all
//! of them succeeded, so a shape that cannot be tiled, an unsupported dtype
//! or an unknown target name leaves no partial package.

use anyhow::{bail, Context, Result};
use panguc_codegen_ascendc::program::{emit_program, memory_report, AscendProgram};
use panguc_codegen_ascendc::project::project_files;
use panguc_codegen_ascendc::Target;
use panguc_ir::kernel::KernelProgram;
use panguc_ir::PanguConfig;
use std::collections::BTreeMap;
use std::path::Path;

/// Targets in `targets` that are Ascend targets (others, like `cpu`, are
/// someone else's); an unknown `ascend*` name is an error.
pub fn ascend_targets(targets: &[String]) -> Result<Vec<Target>> {
    let mut out = vec![];
    for t in targets {
        if t == "cpu" {
            continue;
        }
        let t = Target::parse(t)?;
        if !out.contains(&t) {
            out.push(t);
        }
    }
    Ok(out)
}

/// Emit every Ascend target's project into `staging/ascend/<target>/` and
/// return the per-kernel UB/L1/L0 use against capacity, keyed by target.
pub fn write_ascend_targets(
    staging: &Path,
    program: &KernelProgram,
    cfg: &PanguConfig,
    targets: &[String],
) -> Result<serde_json::Value> {
    let _ = cfg; // activation dtypes are per target (bf16 on 910B, f16 on 310P)
    let mut emitted: Vec<(AscendProgram, BTreeMap<String, String>)> = vec![];
    for t in ascend_targets(targets)? {
        let ap = emit_program(program, t, t.default_act())?;
        let files = project_files(program, &ap).with_context(|| format!("writing the {t} project"))?;
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
        report.insert(ap.target.name().to_string(), memory_report(ap));
    }
    Ok(serde_json::Value::Object(report))
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

    fn tiny_program() -> (PanguConfig, KernelProgram) {
        let cfg = crate::synth::Preset::Tiny.config();
        let m = crate::import::build_module(&cfg, &|_| panguc_ir::DType::BF16).unwrap();
        let fused = panguc_lowering::fuse_module(&m, &Default::default(), |_, _| Ok(())).unwrap().0;
        let p = panguc_lowering::schedule::schedule(&fused, &Default::default()).unwrap();
        (cfg, p)
    }

    #[test]
    fn unknown_target_is_an_error_and_cpu_is_skipped() {
        let e = ascend_targets(&["cpu".into(), "ascend920".into()]).unwrap_err().to_string();
        assert!(e.contains("unknown Ascend target `ascend920`"), "{e}");
        let ts =
            ascend_targets(&["cpu".into(), "ascend310p".into(), "ascend910b".into(), "ascend310p".into()]).unwrap();
        assert_eq!(ts, vec![Target::Ascend310P, Target::Ascend910B]);
    }

    /// Until every kind of the tiny program has an AscendC kernel, the build
    /// must fail naming the kernel and write nothing.
    #[test]
    fn tiny_program_fails_cleanly_without_partial_output() {
        let (cfg, p) = tiny_program();
        let dir = tempfile::tempdir().unwrap();
        match write_ascend_targets(dir.path(), &p, &cfg, &["ascend910b".into(), "ascend310p".into()]) {
            Ok(report) => {
                // Every kind emitted: both projects and a report per target.
                assert!(report["ascend910b"]["kernels"].as_array().is_some_and(|k| !k.is_empty()));
                assert!(dir.path().join("ascend/ascend310p/CMakePresets.json").is_file());
            }
            Err(e) => {
                let msg = format!("{e:#}");
                assert!(msg.contains("panguc_k0") && msg.contains("AscendC"), "{msg}");
                assert!(!dir.path().join("ascend").exists(), "partial package written");
            }
        }
    }
}
