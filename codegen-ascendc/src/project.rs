//! The CANN operator project per target (`OUT/ascend/<target>/`): op
//! definitions with host tiling and shape inference (`op_host/`), kernels
//! and tiling structs (`op_kernel/`), CMake files, `build.sh`, the ACL host
//! program (`host/`) and a README. Returned as (relative path, text) in
//! path order so the output is deterministic.

use crate::emit::{ArgRef, CoreType, DeviceKernel, Env, FieldValue, Role, TExpr};
use crate::program::AscendProgram;
use crate::target::Target;
use anyhow::{bail, Result};
use panguc_ir::kernel::{BufferKind, Kernel, KernelProgram};
use std::collections::BTreeMap;
use std::fmt::Write;

/// How a dimension depends on the run-time sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SizeDim {
    Tokens,
    Kv,
    /// The paged-cache sizes of a ragged step.
    Seqs,
    MaxBlocks,
    NumBlocks,
}

/// Where a size lives in [`Env`].
type EnvSlot = fn(&mut Env) -> &mut u64;

/// The paged-cache sizes, their C++ names in a tiling function and their
/// slot in [`Env`].
const PAGED_SIZES: [(SizeDim, &str, EnvSlot); 3] = [
    (SizeDim::Seqs, "seqs", |e| &mut e.seqs),
    (SizeDim::MaxBlocks, "maxBlocks", |e| &mut e.max_blocks),
    (SizeDim::NumBlocks, "numBlocks", |e| &mut e.num_blocks),
];

/// `a * tokens`, `a * (past + tokens)`, `a * seqs`, `a * max_blocks` or
/// `a * num_blocks` with its coefficient `a > 0`.
fn classify(e: &TExpr) -> Option<(SizeDim, u64)> {
    let at = |t, p| e.eval(&Env::new(t, p, 1)).ok();
    match (at(0, 0), at(1, 0), at(0, 1), at(3, 5)) {
        (Some(0), Some(a), Some(0), Some(x)) if a > 0 && x == 3 * a => return Some((SizeDim::Tokens, a)),
        (Some(0), Some(a), Some(b), Some(x)) if a > 0 && a == b && x == 8 * a => return Some((SizeDim::Kv, a)),
        _ => {}
    }
    if at(0, 0) != Some(0) {
        return None;
    }
    PAGED_SIZES.iter().find_map(|(dim, _, slot)| {
        // Only this size moves the value, linearly.
        let with = |v: u64, others: u64| {
            let mut env =
                Env { tokens: others, past: others, core_num: 1, seqs: others, max_blocks: others, num_blocks: others };
            *slot(&mut env) = v;
            e.eval(&env).ok()
        };
        match (with(1, 0), with(3, 0), with(0, 7)) {
            (Some(a), Some(x), Some(0)) if a > 0 && x == 3 * a => Some((*dim, a)),
            _ => None,
        }
    })
}

/// Whether the op definition declares the parameter as an input (in-place
/// read-write buffers, the KV caches, are inputs the kernel writes).
fn is_input(r: Role) -> bool {
    r != Role::Output
}

/// Shapes of a device kernel's parameters as formulas.
fn param_shapes(k: &Kernel, ap_kernel: &crate::emit::DeviceKernels, dk: &DeviceKernel) -> Result<Vec<Vec<TExpr>>> {
    dk.params
        .iter()
        .map(|p| match p.arg {
            ArgRef::Orig(i) => k.args[i].shape.iter().map(TExpr::from_dim).collect(),
            ArgRef::Temp(j) => Ok(ap_kernel.temps[j].shape.clone()),
        })
        .collect()
}

/// C++ reading `tokens`, `past` and `coreNum` inside a tiling function.
fn size_prologue(dk: &DeviceKernel, shapes: &[Vec<TExpr>]) -> Result<String> {
    let find = |want: SizeDim| {
        shapes.iter().enumerate().find_map(|(pi, s)| {
            let inputs_before = dk.params[..pi].iter().filter(|p| is_input(p.role)).count();
            let outputs_before = pi - inputs_before;
            let (getter, idx) = if is_input(dk.params[pi].role) {
                ("GetInputShape", inputs_before)
            } else {
                ("GetOutputShape", outputs_before)
            };
            s.iter().enumerate().find_map(|(di, d)| match classify(d) {
                Some((k, a)) if k == want => Some((getter, idx, di, a)),
                _ => None,
            })
        })
    };
    let per = |a: u64| if a == 1 { String::new() } else { format!(" / {a}") };
    let mut s = String::new();
    match find(SizeDim::Tokens) {
        Some((g, i, d, a)) => {
            let _ =
                writeln!(s, "    const uint64_t tokens = context->{g}({i})->GetStorageShape().GetDim({d}){};", per(a));
        }
        None => s.push_str("    const uint64_t tokens = 0;\n"),
    }
    match find(SizeDim::Kv) {
        Some((g, i, d, a)) => {
            let _ = writeln!(
                s,
                "    const uint64_t past = context->{g}({i})->GetStorageShape().GetDim({d}){} - tokens;",
                per(a)
            );
        }
        None => s.push_str("    const uint64_t past = 0;\n"),
    }
    s.push_str("    (void)tokens;\n    (void)past;\n");
    // Paged-cache kernels: each size from the first parameter dim that is a
    // multiple of it (a contiguous-cache kernel has none).
    for (dim, name, _) in PAGED_SIZES {
        if let Some((g, i, d, a)) = find(dim) {
            let _ =
                writeln!(s, "    const uint64_t {name} = context->{g}({i})->GetStorageShape().GetDim({d}){};", per(a));
            let _ = writeln!(s, "    (void){name};");
        }
    }
    Ok(s)
}

fn op_host(dk: &DeviceKernel, shapes: &[Vec<TExpr>], target: Target) -> Result<String> {
    let op = &dk.op_type;
    let mut s = format!(
        "// Generated by panguc. Host side of `{op}`: tiling from the actual shapes, shape\n\
         // inference and the operator definition.\n\
         #include <algorithm>\n#include <cstdint>\n#include <cstring>\n\
         #include \"register/op_def_registry.h\"\n#include \"tiling/platform/platform_ascendc.h\"\n\
         #include \"../op_kernel/{}_tiling.h\"\n\nnamespace optiling {{\n\
         static inline uint64_t CeilDiv(uint64_t a, uint64_t b) {{ return (a + b - 1) / b; }}\n\n\
         static ge::graphStatus {op}TilingFunc(gert::TilingContext* context)\n{{\n",
        dk.entry
    );
    s += &size_prologue(dk, shapes)?;
    let cores = match dk.core {
        CoreType::Vector => "GetCoreNumAiv",
        CoreType::Cube => "GetCoreNumAic",
    };
    let _ = writeln!(s, "    auto platform = platform_ascendc::PlatformAscendC(context->GetPlatformInfo());");
    if target == Target::Ascend310P {
        // Coupled mode: one kind of AI core runs both units.
        let _ = writeln!(s, "    const uint64_t coreNum = platform.GetCoreNumAic();");
    } else {
        let _ = writeln!(s, "    const uint64_t coreNum = platform.{cores}();");
    }
    let _ = writeln!(s, "    {} t{{}};", dk.tiling_struct);
    for f in &dk.fields {
        match &f.value {
            FieldValue::U32(e) => {
                let _ = writeln!(s, "    t.{} = static_cast<uint32_t>({});", f.name, e.to_cpp());
            }
            FieldValue::F32(v) => {
                let _ = writeln!(s, "    t.{} = {:?}f;", f.name, *v as f32);
            }
            FieldValue::F32Array(v) => {
                for (i, x) in v.iter().enumerate() {
                    let _ = writeln!(s, "    t.{}[{i}] = {:?}f;", f.name, *x as f32);
                }
            }
        }
    }
    let _ = writeln!(s, "    context->SetBlockDim(static_cast<uint32_t>({}));", dk.block_dim.to_cpp());
    s += "    // Plain tiling struct (REGISTER_TILING_DEFAULT on the kernel side).\n";
    s += "    std::memcpy(context->GetRawTilingData()->GetData(), &t, sizeof(t));\n";
    s += "    context->GetRawTilingData()->SetDataSize(sizeof(t));\n";
    s += "    size_t* ws = context->GetWorkspaceSizes(1);\n    ws[0] = platform.GetLibApiWorkSpaceSize();\n";
    s += "    return ge::GRAPH_SUCCESS;\n}\n}  // namespace optiling\n\nnamespace ge {\n";
    let _ = writeln!(s, "static ge::graphStatus {op}InferShape(gert::InferShapeContext* context)\n{{");
    // Output shapes follow from the input-derived sizes.
    let mut tk = String::new();
    let mut out_i = 0;
    let tokens_src = dk.params.iter().zip(shapes).enumerate().find_map(|(pi, (p, sh))| {
        if !is_input(p.role) {
            return None;
        }
        let idx = dk.params[..pi].iter().filter(|q| is_input(q.role)).count();
        sh.iter().enumerate().find_map(|(di, d)| match classify(d) {
            Some((SizeDim::Tokens, a)) => Some((idx, di, a)),
            _ => None,
        })
    });
    if let Some((i, d, a)) = tokens_src {
        let div = if a == 1 { String::new() } else { format!(" / {a}") };
        let _ = writeln!(tk, "    const int64_t tokens = context->GetInputShape({i})->GetDim({d}){div};");
    } else {
        tk.push_str("    const int64_t tokens = 0;\n");
    }
    s += &tk;
    s += "    (void)tokens;\n";
    for (p, sh) in dk.params.iter().zip(shapes) {
        if is_input(p.role) {
            continue;
        }
        let _ = writeln!(s, "    gert::Shape* out{out_i} = context->GetOutputShape({out_i});");
        let _ = writeln!(s, "    out{out_i}->SetDimNum({});", sh.len());
        for (di, d) in sh.iter().enumerate() {
            let v = match classify(d) {
                Some((SizeDim::Tokens, 1)) => "tokens".to_string(),
                Some((SizeDim::Tokens, a)) => format!("{a} * tokens"),
                // In-place KV caches are inputs; no output depends on the KV length.
                Some((SizeDim::Kv, _)) => bail!("{}: output dim {di} depends on the KV length", dk.entry),
                Some((SizeDim::Seqs | SizeDim::MaxBlocks | SizeDim::NumBlocks, _)) => {
                    bail!("{}: output dim {di} depends on the paged-cache sizes", dk.entry)
                }
                None => match d {
                    TExpr::C(c) => c.to_string(),
                    other => {
                        bail!("{}: output dim {di} = {} is not supported in shape inference", dk.entry, other.to_cpp())
                    }
                },
            };
            let _ = writeln!(s, "    out{out_i}->SetDim({di}, {v});");
        }
        out_i += 1;
    }
    s += "    return GRAPH_SUCCESS;\n}\n}  // namespace ge\n\nnamespace ops {\n";
    let _ =
        writeln!(s, "class {op} : public OpDef {{\npublic:\n    explicit {op}(const char* name) : OpDef(name)\n    {{");
    for p in &dk.params {
        let dir = if is_input(p.role) { "Input" } else { "Output" };
        let _ = writeln!(
            s,
            "        this->{dir}(\"{}\").ParamType(REQUIRED).DataType({{{}}}).Format({{ge::FORMAT_ND}});",
            p.name,
            p.dtype.ge()
        );
    }
    let _ = writeln!(s, "        this->SetInferShape(ge::{op}InferShape);");
    let _ = writeln!(s, "        this->AICore().SetTiling(optiling::{op}TilingFunc);");
    let _ = writeln!(s, "        this->AICore().AddConfig(\"{}\");", target.name());
    s += "    }\n};\n";
    let _ = writeln!(s, "OP_ADD({op});\n}}  // namespace ops");
    Ok(s)
}

/// CANN root written into `CMakePresets.json`; `build.sh` replaces it with
/// the CANN installation of the machine that builds the package.
const DEFAULT_CANN_PATH: &str = "/usr/local/Ascend/ascend-toolkit/latest";

/// The cache variables the CANN operator-project template reads (its own
/// `CMakePresets.json` has the same keys), for `target` and `vendor`.
fn cmake_presets(target: Target, vendor: &str) -> String {
    format!(
        r#"{{
    "version": 1,
    "cmakeMinimumRequired": {{ "major": 3, "minor": 19, "patch": 0 }},
    "configurePresets": [
        {{
            "name": "default",
            "displayName": "panguc operator package for {t}",
            "description": "Generated by panguc",
            "generator": "Unix Makefiles",
            "binaryDir": "${{sourceDir}}/build_out",
            "cacheVariables": {{
                "CMAKE_BUILD_TYPE": {{ "type": "STRING", "value": "Release" }},
                "ENABLE_SOURCE_PACKAGE": {{ "type": "BOOL", "value": "True" }},
                "ENABLE_BINARY_PACKAGE": {{ "type": "BOOL", "value": "True" }},
                "ASCEND_COMPUTE_UNIT": {{ "type": "STRING", "value": "{t}" }},
                "ENABLE_TEST": {{ "type": "BOOL", "value": "False" }},
                "vendor_name": {{ "type": "STRING", "value": "{vendor}" }},
                "ASCEND_CANN_PACKAGE_PATH": {{ "type": "PATH", "value": "{DEFAULT_CANN_PATH}" }},
                "ASCEND_PYTHON_EXECUTABLE": {{ "type": "STRING", "value": "python3" }},
                "CMAKE_INSTALL_PREFIX": {{ "type": "PATH", "value": "${{sourceDir}}/build_out" }},
                "ENABLE_CROSS_COMPILE": {{ "type": "BOOL", "value": "False" }},
                "CMAKE_CROSS_PLATFORM_COMPILER": {{ "type": "PATH", "value": "/usr/bin/aarch64-linux-gnu-g++" }},
                "ASCEND_PACK_SHARED_LIBRARY": {{ "type": "BOOL", "value": "False" }}
            }}
        }}
    ]
}}
"#,
        t = target.name()
    )
}

/// Replaces the template's `op_kernel/CMakeLists.txt`: the template's
/// `add_kernels_compile()` (no arguments) compiles every kernel source of
/// this directory for each `ASCEND_COMPUTE_UNIT` itself.
const OP_KERNEL_CMAKE: &str = r#"# Generated by panguc: the kernel build of the CANN operator-project template.
add_ops_compile_options(ALL OPTIONS -O3)
add_kernels_compile()
"#;

/// Instantiates the operator project from the installed CANN's template
/// (the same skeleton `msopgen gen` copies), overlays this package's
/// sources and presets, and runs the template's own build script. The
/// package itself carries no CANN file.
const BUILD_SH: &str = r#"#!/bin/bash
# Generated by panguc: build the operator package with the installed CANN.
# The operator project (top-level CMakeLists.txt, cmake/, scripts/, build.sh)
# is instantiated from CANN's op-project template; this package only adds
# op_host/, op_kernel/ and the CMakePresets.json cache variables.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cann="${ASCEND_HOME_PATH:-}"
if [ -z "$cann" ]; then
    echo "error: ASCEND_HOME_PATH is not set: source the CANN environment first (source /usr/local/Ascend/ascend-toolkit/set_env.sh)" >&2
    exit 1
fi
template="$cann/tools/op_project_templates/ascendc/customize"
for f in CMakeLists.txt build.sh cmake/config.cmake cmake/func.cmake cmake/intf.cmake cmake/makeself.cmake; do
    if [ ! -f "$template/$f" ]; then
        echo "error: the CANN operator-project template is incomplete: $template/$f not found (install the CANN toolkit)" >&2
        exit 1
    fi
done
work="$here/build_project"
rm -rf "$work" "$here/build_out"
mkdir -p "$work"
cp -r "$template/." "$work/"
mkdir -p "$work/op_host" "$work/op_kernel"
cp "$here"/op_host/*.cpp "$work/op_host/"
cp "$here"/op_kernel/*.cpp "$here"/op_kernel/*.h "$here/op_kernel/CMakeLists.txt" "$work/op_kernel/"
sed "s#__DEFAULT_CANN_PATH__#$cann#" "$here/CMakePresets.json" > "$work/CMakePresets.json"
(cd "$work" && bash build.sh)
mkdir -p "$here/build_out"
cp "$work"/build_out/custom_opp_*.run "$here/build_out/"
echo "operator package: $(ls "$here"/build_out/custom_opp_*.run)"
"#;

/// The `op_kernel/` and `op_host/` files of the device kernels `dks` of
/// program kernel `k` (kernel source, tiling header, op definition).
pub fn kernel_files(k: &Kernel, dks: &crate::emit::DeviceKernels, target: Target) -> Result<BTreeMap<String, String>> {
    let mut files = BTreeMap::new();
    for dk in &dks.kernels {
        let shapes = param_shapes(k, dks, dk)?;
        files.insert(format!("op_kernel/{}.cpp", dk.entry), dk.source.clone());
        files.insert(format!("op_kernel/{}_tiling.h", dk.entry), dk.tiling_header());
        files.insert(format!("op_host/{}.cpp", dk.entry), op_host(dk, &shapes, target)?);
    }
    Ok(files)
}

/// Every file of the project for `ap`, keyed by relative path.
pub fn project_files(ap: &AscendProgram) -> Result<BTreeMap<String, String>> {
    let p = &ap.program;
    let mut files = BTreeMap::new();
    let target = ap.target;
    for (k, dks) in p.kernels.iter().zip(&ap.kernels) {
        files.extend(kernel_files(k, dks, target)?);
    }
    files.insert("CMakePresets.json".into(), cmake_presets(target, &ap.vendor));
    files.insert("build.sh".into(), BUILD_SH.replace("__DEFAULT_CANN_PATH__", DEFAULT_CANN_PATH));
    files.insert("op_kernel/CMakeLists.txt".into(), OP_KERNEL_CMAKE.into());
    for (path, text) in crate::host::host_files(ap)? {
        files.insert(path, text);
    }
    files.insert("README.md".into(), readme(p, ap));
    Ok(files)
}

fn readme(p: &KernelProgram, ap: &AscendProgram) -> String {
    let t = ap.target.name();
    let n: usize = ap.kernels.iter().map(|d| d.kernels.len()).sum();
    let (title, run, ranks) = match ap.rank {
        None => (
            String::new(),
            "./panguc_host weights/ 1,2,3,4 8              # weights dir, prompt ids, new tokens".to_string(),
            String::new(),
        ),
        Some((rank, devices)) => (
            format!(", rank {rank} of {devices}"),
            format!(
                "mkdir -p /tmp/panguc-comm                     # a new empty directory all ranks see\n\
                 ./panguc_host weights/ 1,2,3,4 /tmp/panguc-comm 8   # on device {rank}; start every rank"
            ),
            format!(
                "\n## Partitioned program\n\n\
                 This project is rank {rank} of a program partitioned over {devices} devices\n\
                 (`partition.json` at the package root lists every rank's weights, buffers\n\
                 and collectives). The host program joins one HCCL communicator per group\n\
                 of ranks it exchanges with (`HcclCommInitRootInfo`; the group's first\n\
                 member publishes the root info as a file in the communication directory)\n\
                 and issues `HcclAllReduce` / `HcclReduceScatter` / `HcclAllGather` /\n\
                 `HcclAlltoAllV` on the compute stream in program order. Collectives along\n\
                 an inner axis are bracketed by the `*_pack` / `*_unpack` kernels, which\n\
                 lay the data out as the contiguous per-member blocks HCCL moves. Every\n\
                 rank computes the full logits; rank 0 prints the tokens.\n"
            ),
        ),
    };
    format!(
        r#"# panguc AscendC package for {t}{title}

Generated by panguc from kernel program `{name}` ({kernels} program kernels,
{n} AscendC kernels, {launches} launches per forward pass). Activations are
{act}. Every kernel here was compiled with g++ and run against panguc's CPU
model of the AscendC API; nothing here has been built with CANN by panguc.

## Layout

- `op_kernel/<kernel>.cpp`, `op_kernel/<kernel>_tiling.h`: AscendC kernels
  (classic `extern "C" __global__ __aicore__` entries, GM tiling read with
  `GET_TILING_DATA`) and their tiling structs.
- `op_host/<kernel>.cpp`: `OpDef` registration (op type = UpperCamel of the
  kernel name), shape inference and the tiling function, which computes the
  tiling from the actual token count and KV length at run time.
- `CMakePresets.json` (`ASCEND_COMPUTE_UNIT={t}`, `vendor_name={vendor}`),
  `op_kernel/CMakeLists.txt`, `build.sh`: the operator-package build.
  `build.sh` instantiates the operator project from the CANN installation's
  template (`$ASCEND_HOME_PATH/tools/op_project_templates/ascendc/customize`,
  what `msopgen gen` copies) in `build_project/`, overlays `op_host/`,
  `op_kernel/` and the presets, and runs the template's build; this package
  carries no CANN file.
- Names: vendor `{vendor}` and op types `{prefix_camel}K...` are derived from a
  hash of everything the kernels bake in, so packages (and the ranks of a
  partitioned model) install side by side under `$ASCEND_OPP_PATH/vendors/`.
- `host/panguc_host.cpp`: an ACL program that loads the weights, runs prefill
  and greedy decode through the generated `aclnn*` APIs and keeps the KV
  cache. `host/stub/` holds declaration-only ACL headers used by panguc to
  compile-check it; do not use them on a CANN machine.

## Build and run on a CANN machine (CANN 8.x)

```
source /usr/local/Ascend/ascend-toolkit/set_env.sh
bash build.sh                                 # -> build_out/custom_opp_<os>_<arch>.run
./build_out/custom_opp_*.run                  # installs under $ASCEND_OPP_PATH/vendors/{vendor}
export LD_LIBRARY_PATH=$ASCEND_OPP_PATH/vendors/{vendor}/op_api/lib:$LD_LIBRARY_PATH
g++ -std=c++17 -O2 host/panguc_host.cpp -o panguc_host \
    -I$ASCEND_HOME_PATH/include -I$ASCEND_HOME_PATH/include/aclnn \
    -I$ASCEND_OPP_PATH/vendors/{vendor}/op_api/include \
    -L$ASCEND_HOME_PATH/lib64 -L$ASCEND_OPP_PATH/vendors/{vendor}/op_api/lib \
    -lascendcl -lnnopbase -lcust_opapi{hccl}
{run}
```

`weights/` must hold one raw little-endian file per prepared weight,
`<weight name>.bin`, in the device layout: {act} (routing scales f32),
matmul weights `[N, K]`, row-major{tiled}

## Deviations to review on hardware

- 910B matmuls with an epilogue are a cube kernel plus a vector kernel
  through an f32 GM buffer, not one mix kernel.
- The CPU model follows the documented semantics of DataCopyPad rows,
  LoadData fractals, Mmad, Fixpipe and the L0C -> UB copy; confirm once.
{ranks}"#,
        name = p.name,
        kernels = p.kernels.len(),
        launches = p.launches.len(),
        act = ap.act,
        vendor = ap.vendor,
        prefix_camel = crate::emit::upper_camel(&ap.op_prefix),
        tiled = tiled_weights(p, ap),
        // The rank's host program joins HCCL communicators.
        hccl = if ap.rank.is_some() { " -lhccl" } else { "" },
    )
}

/// The README's list of weights stored pre-tiled for the cube GEMMs (see
/// [`crate::weights::NzTile`]), each with its tile, or an empty string.
fn tiled_weights(p: &KernelProgram, ap: &AscendProgram) -> String {
    let mut names: Vec<String> = p
        .buffers
        .iter()
        .zip(&ap.buffer_nz)
        .filter_map(|(b, nz)| match (&b.kind, nz) {
            (BufferKind::Weight { index }, Some(t)) => {
                Some(format!("`{}` ({} x {}, C0 {})", p.weights[*index].name, t.base_n, t.base_k, t.c0))
            }
            _ => None,
        })
        .collect();
    names.sort();
    names.dedup();
    if names.is_empty() {
        return ".".into();
    }
    format!(
        ",
except the weights below, which only cube GEMMs read: each is stored in
the L1 order of the kernel's B tile (baseN x baseK): per matrix, per
baseN-row tile, per baseK step, its K blocks of C0 columns, each block the
tile's rows (padded to 16) by C0 elements, so a K step's tile is one
contiguous copy. Same byte size as row-major.

{}
",
        names.iter().map(|n| format!("- {n}")).collect::<Vec<_>>().join("\n")
    )
}

/// Kernel names in the project (used by tests and reports).
pub fn kernel_entries(ap: &AscendProgram) -> Vec<String> {
    ap.kernels.iter().flat_map(|d| d.kernels.iter().map(|k| k.entry.clone())).collect()
}

/// Buffers the host program needs to know about, with their kind name.
pub(crate) fn buffer_kind_code(kind: &BufferKind) -> (u32, String) {
    match kind {
        BufferKind::Input { index } => (0, index.to_string()),
        BufferKind::Weight { index } => (1, index.to_string()),
        BufferKind::KvCache { cache } => (2, cache.to_string()),
        BufferKind::Activation { slot } => (3, slot.to_string()),
        BufferKind::View { base, .. } => (4, base.0.to_string()),
    }
}
