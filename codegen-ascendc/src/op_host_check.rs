//! Checks of a generated project's operator definitions that need no CANN:
//! every `op_host/*.cpp` compiles with `g++ -std=c++11` against panguc's
//! stand-in declarations of the CANN registration and tiling API
//! (`cann_stub/`, the real names and signatures), and every op definition
//! declares the parameters of its kernel entry, by name and in the order
//! CANN binds them (inputs, then outputs, then workspace and tiling).

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

const STUB_HEADERS: &[(&str, &str)] = &[
    ("register/op_def_registry.h", include_str!("../cann_stub/register/op_def_registry.h")),
    ("tiling/platform/platform_ascendc.h", include_str!("../cann_stub/tiling/platform/platform_ascendc.h")),
];

/// The stand-in headers written to a content-addressed temporary directory.
fn stub_include_dir() -> Result<PathBuf> {
    let mut h = Sha256::new();
    for (path, text) in STUB_HEADERS {
        h.update(path.as_bytes());
        h.update(text.as_bytes());
    }
    let id: String = h.finalize().iter().take(6).map(|b| format!("{b:02x}")).collect();
    let dir = std::env::temp_dir().join(format!("panguc-cann-stub-{id}"));
    for (path, text) in STUB_HEADERS {
        let dest = dir.join(path);
        if std::fs::read_to_string(&dest).ok().as_deref() != Some(*text) {
            std::fs::create_dir_all(dest.parent().unwrap())?;
            // Write then rename: concurrent tests may share the directory.
            let tmp = dest.with_extension(format!("tmp{}", std::process::id()));
            std::fs::write(&tmp, text)?;
            std::fs::rename(&tmp, &dest)?;
        }
    }
    Ok(dir)
}

/// The `op_host/*.cpp` files of a project, sorted.
fn op_host_sources(project_dir: &Path) -> Result<Vec<PathBuf>> {
    let dir = project_dir.join("op_host");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cpp"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{}: no op_host sources", dir.display());
    }
    Ok(files)
}

/// Compile every op_host source of the project at `project_dir` with g++ in
/// C++11 mode (what CANN's op-project build uses) against the stand-in
/// headers, then check each op definition against its kernel's entry.
pub fn check_op_host_compiles(project_dir: &Path) -> Result<()> {
    let files = op_host_sources(project_dir)?;
    let cxx = std::env::var("PANGUC_SIM_CXX").unwrap_or_else(|_| "g++".into());
    let out = std::process::Command::new(&cxx)
        .args(["-std=c++11", "-fsyntax-only", "-Wall", "-Werror", "-I"])
        .arg(stub_include_dir()?)
        .args(&files)
        .output()
        .with_context(|| format!("running {cxx}"))?;
    if !out.status.success() {
        bail!("op_host sources do not compile:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    for f in &files {
        check_params_match(project_dir, f)?;
    }
    Ok(())
}

/// Names in `this->Input("x")` / `this->Output("y")` calls, in order.
fn declared(op_host: &str, dir: &str) -> Vec<String> {
    let pat = format!("this->{dir}(\"");
    op_host.split(&pat).skip(1).filter_map(|rest| rest.split('"').next().map(str::to_string)).collect()
}

/// The parameter names of `void <entry>(...)` in a kernel source.
fn entry_params(kernel: &str, entry: &str) -> Option<Vec<String>> {
    let start = kernel.find(&format!("__aicore__ void {entry}("))? + entry.len() + "__aicore__ void (".len();
    let list = &kernel[start..start + kernel[start..].find(')')?];
    Some(list.split(',').map(|p| p.split_whitespace().last().unwrap_or("").to_string()).collect())
}

fn check_params_match(project_dir: &Path, op_host_file: &Path) -> Result<()> {
    let stem = op_host_file.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
    let op_host = std::fs::read_to_string(op_host_file)?;
    let kernel_file = project_dir.join("op_kernel").join(format!("{stem}.cpp"));
    let kernel = std::fs::read_to_string(&kernel_file)
        .with_context(|| format!("{}: no kernel source", op_host_file.display()))?;
    let Some(params) = entry_params(&kernel, stem) else {
        bail!("{}: no kernel entry `{stem}`", kernel_file.display());
    };
    let mut expected = declared(&op_host, "Input");
    expected.extend(declared(&op_host, "Output"));
    expected.extend(["workspace".to_string(), "tiling".to_string()]);
    if params != expected {
        bail!(
            "{}: kernel parameters {params:?} differ from the op definition's inputs, outputs, workspace, tiling {expected:?}",
            kernel_file.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_lists_are_read_from_both_sides() {
        let op_host = "this->Input(\"x\").ParamType(REQUIRED);\nthis->Output(\"y\");\nthis->Input(\"w\");";
        assert_eq!(declared(op_host, "Input"), ["x", "w"]);
        assert_eq!(declared(op_host, "Output"), ["y"]);
        let k = "extern \"C\" __global__ __aicore__ void k(GM_ADDR x, GM_ADDR w, GM_ADDR y, GM_ADDR workspace, GM_ADDR tiling)";
        assert_eq!(entry_params(k, "k").unwrap(), ["x", "w", "y", "workspace", "tiling"]);
    }
}
