//! Snapshots of one emitted kernel per kind and of a project tree, the host
//! program compile check, `build.sh` against a stand-in CANN installation,
//! package names, the 72B shapes against the simulation
//! (`-fsyntax-only`) with their memory proofs, and bad-input errors.

use panguc_codegen_ascendc::emit::{emit_kernel, upper_camel, EmitOptions};
use panguc_codegen_ascendc::program::{emit_program, memory_report};
use panguc_codegen_ascendc::project::project_files;
use panguc_codegen_ascendc::sim::syntax_check;
use panguc_codegen_ascendc::target::{DevType, Target};
use panguc_ir::kernel::{
    tile_extent, ArgSpec, Buffer, BufferId, BufferKind, ElemOp, Epilogue, Extent, Kernel, KernelKind, KernelProgram,
    Launch, Layout, PreparedWeight, WeightExpr, KERNEL_PROGRAM_VERSION,
};
use panguc_ir::{DType, Dim};

fn c(n: usize) -> Dim {
    Dim::c(n)
}

fn kernel(name: &str, kind: KernelKind, args: Vec<Vec<Dim>>) -> Kernel {
    let args: Vec<ArgSpec> =
        args.into_iter().map(|shape| ArgSpec { dtype: DType::F32, shape, layout: Layout::RowMajor }).collect();
    let tiles = tile_extent(&kind, &args).unwrap_or(Extent::constant(1));
    Kernel { name: name.into(), kind, args, tiles, thread_scratch: Extent::constant(0) }
}

/// One kernel of every emitted kind, with the model's shapes
/// (hidden, q heads, kv heads, head_dim, experts, groups, vocab).
fn kinds(
    h: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    e: usize,
    vocab: usize,
    inter: usize,
) -> Vec<(Kernel, Vec<DevType>)> {
    let t = Dim::tokens;
    let s = || Dim::tokens().scale(8);
    let a = DevType::BF16;
    let f = DevType::F32;
    let i = DevType::I64;
    vec![
        (
            kernel("panguc_k000_gather", KernelKind::Gather, vec![vec![c(vocab), c(h)], vec![t()], vec![t(), c(h)]]),
            vec![a, i, a],
        ),
        (
            kernel(
                "panguc_k001_rms_norm",
                KernelKind::RmsNorm { eps: 1e-5 },
                vec![vec![t(), c(h)], vec![c(h)], vec![t(), c(h)]],
            ),
            vec![a; 3],
        ),
        (
            kernel(
                "panguc_k002_add_rms_norm",
                KernelKind::AddRmsNorm { eps: 1e-5 },
                vec![vec![t(), c(h)], vec![t(), c(h)], vec![c(h)], vec![t(), c(h)], vec![t(), c(h)]],
            ),
            vec![a; 5],
        ),
        (
            kernel(
                "panguc_k003_gemm",
                KernelKind::Gemm { epilogue: Epilogue::Bias },
                vec![vec![t(), c(h)], vec![c(h), c(h)], vec![c(h)], vec![t(), c(h)]],
            ),
            vec![a; 4],
        ),
        (
            kernel(
                "panguc_k004_rope",
                KernelKind::Rope,
                vec![vec![t(), c(hq), c(d)], vec![t(), c(d)], vec![t(), c(d)], vec![t(), c(hq), c(d)]],
            ),
            vec![a; 4],
        ),
        (
            kernel(
                "panguc_k005_elementwise",
                KernelKind::Elementwise { op: ElemOp::SwiGlu },
                vec![vec![t(), c(inter)], vec![t(), c(inter)], vec![t(), c(inter)]],
            ),
            vec![a; 3],
        ),
        (
            kernel(
                "panguc_k006_attention",
                KernelKind::Attention { scale: 1.0 / (d as f64).sqrt() },
                vec![
                    vec![t(), c(hq), c(d)],
                    vec![Dim::kv_len(), c(hkv), c(d)],
                    vec![Dim::kv_len(), c(hkv), c(d)],
                    vec![t()],
                    vec![t(), c(hq), c(d)],
                ],
            ),
            vec![a, a, a, i, a],
        ),
        (
            kernel(
                "panguc_k007_moe_gating",
                KernelKind::MoeGating { groups: 8 },
                vec![vec![t(), c(e)], vec![c(e)], vec![t(), c(8)], vec![t(), c(8)]],
            ),
            vec![f, f, f, i],
        ),
        (
            kernel(
                "panguc_k008_gemm",
                KernelKind::Gemm { epilogue: Epilogue::SwiGlu },
                vec![vec![t(), c(h)], vec![c(2 * inter), c(h)], vec![t(), c(inter)]],
            ),
            vec![a; 3],
        ),
        (
            kernel(
                "panguc_k009_gemm",
                KernelKind::Gemm { epilogue: Epilogue::None },
                vec![vec![t(), c(h)], vec![c(vocab), c(h)], vec![t(), c(vocab)]],
            ),
            vec![a; 3],
        ),
        (
            kernel(
                "panguc_k010_rope_table",
                KernelKind::RopeTable { kind: panguc_ir::op::RopeKind::Sin, theta: 1.6e7, head_dim: d },
                vec![vec![t()], vec![t(), c(d)]],
            ),
            vec![i, a],
        ),
        (
            kernel(
                "panguc_k011_qkv_rope_append",
                KernelKind::QkvRopeAppend { q_heads: hq, kv_heads: hkv },
                vec![
                    vec![t(), c((hq + 2 * hkv) * d)],
                    vec![t(), c(d)],
                    vec![t(), c(d)],
                    vec![t(), c(hq), c(d)],
                    vec![Dim::kv_len(), c(hkv), c(d)],
                    vec![Dim::kv_len(), c(hkv), c(d)],
                ],
            ),
            vec![a; 6],
        ),
        (
            kernel(
                "panguc_k012_moe_route",
                KernelKind::MoeRoute,
                vec![vec![t(), c(8)], vec![t(), c(8)], vec![c(e + 1)], vec![s()], vec![s()], vec![s()]],
            ),
            vec![f, i, i, i, f, i],
        ),
        (
            kernel(
                "panguc_k013_moe_gate_up",
                KernelKind::MoeGateUp,
                vec![vec![t(), c(h)], vec![c(e + 1)], vec![s()], vec![c(e), c(2 * inter), c(h)], vec![s(), c(inter)]],
            ),
            vec![a, i, i, a, a],
        ),
        (
            kernel(
                "panguc_k014_moe_down",
                KernelKind::MoeDown,
                vec![vec![s(), c(inter)], vec![c(e + 1)], vec![s()], vec![c(e), c(h), c(inter)], vec![s(), c(h)]],
            ),
            vec![a, i, f, a, a],
        ),
        (
            kernel(
                "panguc_k015_moe_combine",
                KernelKind::MoeCombine { shared_residual: true },
                vec![vec![s(), c(h)], vec![s()], vec![t(), c(h)], vec![t(), c(h)], vec![t(), c(h)]],
            ),
            vec![a, i, a, a, a],
        ),
        (
            kernel(
                "panguc_k016_qkv_rope_cache_write",
                KernelKind::QkvRopeCacheWrite { q_heads: hq, kv_heads: hkv },
                vec![
                    vec![t(), c((hq + 2 * hkv) * d)],
                    vec![t(), c(d)],
                    vec![t(), c(d)],
                    vec![t()],
                    vec![t(), c(hq), c(d)],
                    paged_cache(hkv, d),
                    paged_cache(hkv, d),
                ],
            ),
            vec![a, a, a, DevType::I32, a, a, a],
        ),
        (
            kernel(
                "panguc_k017_paged_attention",
                KernelKind::PagedAttention { scale: 1.0 / (d as f64).sqrt() },
                vec![
                    vec![t(), c(hq), c(d)],
                    paged_cache(hkv, d),
                    paged_cache(hkv, d),
                    vec![Dim::seqs(), Dim::max_blocks()],
                    vec![Dim::seqs().add(&c(1))],
                    vec![Dim::seqs()],
                    vec![t(), c(hq), c(d)],
                ],
            ),
            vec![a, a, a, DevType::I32, DevType::I32, DevType::I32, a],
        ),
        (
            kernel(
                "panguc_k018_moe_grouped_gate_up",
                KernelKind::MoeGroupedGateUp,
                vec![vec![s(), c(h)], vec![c(e + 1)], vec![c(e), c(2 * inter), c(h)], vec![s(), c(inter)]],
            ),
            vec![a, i, a, a],
        ),
    ]
}

/// A paged KV cache `[num_blocks, 128, kv_heads, head_dim]` (the block
/// size serving.md recommends).
fn paged_cache(hkv: usize, d: usize) -> Vec<Dim> {
    vec![Dim::num_blocks(), c(128), c(hkv), c(d)]
}

fn for_target(dts: &[DevType], target: Target) -> Vec<DevType> {
    dts.iter().map(|d| if *d == DevType::BF16 { target.default_act() } else { *d }).collect()
}

#[test]
fn snapshot_one_kernel_of_each_kind() {
    for target in Target::ALL {
        for (k, dts) in kinds(64, 4, 2, 16, 64, 512, 32) {
            let dts = for_target(&dts, target);
            let opts = EmitOptions::new(target, target.default_act()).unwrap();
            let dk = emit_kernel(&k, &dts, &opts).unwrap();
            let text = |dk: &panguc_codegen_ascendc::emit::DeviceKernels| {
                let mut text = String::new();
                for d in &dk.kernels {
                    text +=
                        &format!("==== {}_tiling.h\n{}==== {}.cpp\n{}", d.entry, d.tiling_header(), d.entry, d.source);
                }
                text
            };
            insta::assert_snapshot!(format!("{}_{}", target.name(), k.name), text(&dk));
            // The cube GEMMs' variant reading pre-tiled weights (every
            // argument allowed here; a program allows only weights).
            let nz = emit_kernel(&k, &dts, &EmitOptions { nz_args: u64::MAX, ..opts }).unwrap();
            if nz != dk {
                insta::assert_snapshot!(format!("{}_{}_nz", target.name(), k.name), text(&nz));
            }
        }
    }
}

/// The 72B model's shapes: every kernel compiles against the simulation and
/// its memory use, proved at emit time, is within capacity.
#[test]
fn real_72b_shapes_compile_and_fit() {
    let mut sources = vec![];
    for target in Target::ALL {
        let opts = EmitOptions::new(target, target.default_act()).unwrap();
        let cap = target.capacity();
        for (k, dts) in kinds(5120, 40, 8, 128, 64, 153376, 1344) {
            let dk = emit_kernel(&k, &for_target(&dts, target), &opts).unwrap();
            for d in dk.kernels {
                assert!(d.mem.ub <= cap.ub && d.mem.l1 <= cap.l1 && d.mem.l0c <= cap.l0c, "{}: {:?}", d.entry, d.mem);
                sources.push((target, d.entry.clone(), d.sim_source()));
            }
        }
    }
    // Two compiler processes at a time (2 cores).
    let chunks: Vec<Vec<(Target, String, String)>> =
        sources.chunks(sources.len().div_ceil(2)).map(|c| c.to_vec()).collect();
    std::thread::scope(|s| {
        let hs: Vec<_> = chunks
            .iter()
            .map(|chunk| {
                s.spawn(move || {
                    for (t, entry, src) in chunk {
                        syntax_check(src, t.soc()).unwrap_or_else(|e| panic!("{entry} ({t}): {e}"));
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
    });
}

#[test]
fn bad_inputs_are_refused_clearly() {
    let t = Dim::tokens;
    // bf16 on 310P.
    let e = EmitOptions::new(Target::Ascend310P, DevType::BF16).unwrap_err().to_string();
    assert!(e.contains("bf16 is not supported on ascend310p"), "{e}");
    // Unknown target.
    let e = Target::parse("ascend910c").unwrap_err().to_string();
    assert!(e.contains("unknown Ascend target `ascend910c`"), "{e}");
    // A row that is not whole 32-byte blocks.
    let k = kernel(
        "panguc_k001_rms_norm",
        KernelKind::RmsNorm { eps: 1e-5 },
        vec![vec![t(), c(60)], vec![c(60)], vec![t(), c(60)]],
    );
    let opts = EmitOptions::new(Target::Ascend910B, DevType::BF16).unwrap();
    let e = emit_kernel(&k, &[DevType::BF16; 3], &opts).unwrap_err().to_string();
    assert!(e.contains("cannot be tiled") && e.contains("120 bytes"), "{e}");
    // A row too large for the UB (f32, double-buffered).
    let h = 16384;
    let k = kernel(
        "panguc_k002_add_rms_norm",
        KernelKind::AddRmsNorm { eps: 1e-5 },
        vec![vec![t(), c(h)], vec![t(), c(h)], vec![c(h)], vec![t(), c(h)], vec![t(), c(h)]],
    );
    let e = emit_kernel(&k, &[DevType::F32; 5], &opts).unwrap_err().to_string();
    assert!(e.contains("cannot be tiled for ascend910b: needs") && e.contains("bytes of UB"), "{e}");
    // A matmul N that is not a whole number of cube fractals.
    let k = kernel(
        "panguc_k003_gemm",
        KernelKind::Gemm { epilogue: Epilogue::None },
        vec![vec![t(), c(64)], vec![c(40), c(64)], vec![t(), c(40)]],
    );
    let e = emit_kernel(&k, &[DevType::BF16; 3], &opts).unwrap_err().to_string();
    assert!(e.contains("multiples of 16"), "{e}");
    // A kind without an AscendC kernel names itself.
    let k = kernel("panguc_k004_causal_mask", KernelKind::CausalMask, vec![vec![t()], vec![t(), Dim::kv_len()]]);
    let e = emit_kernel(&k, &[DevType::I64, DevType::BF16], &opts).unwrap_err().to_string();
    assert!(e.contains("causal_mask") && e.contains("no AscendC implementation"), "{e}");
}

/// A small hand-built program: embedding -> norm -> lm_head.
fn small_program() -> KernelProgram {
    let (v, h) = (512usize, 64usize);
    let t = Dim::tokens;
    let buf =
        |name: &str, dtype: DType, shape: Vec<Dim>, kind: BufferKind| Buffer { name: name.into(), dtype, shape, kind };
    let weight = |name: &str, shape: Vec<usize>| PreparedWeight {
        name: name.into(),
        expr: WeightExpr::Tensor { name: name.into() },
        dtype: DType::BF16,
        shape,
        layout: Layout::RowMajor,
        group: "model".into(),
    };
    let spec = |dtype: DType, shape: Vec<Dim>| ArgSpec { dtype, shape, layout: Layout::RowMajor };
    let kernels = vec![
        Kernel {
            name: "panguc_k000_gather".into(),
            kind: KernelKind::Gather,
            args: vec![
                spec(DType::BF16, vec![c(v), c(h)]),
                spec(DType::I64, vec![t()]),
                spec(DType::BF16, vec![t(), c(h)]),
            ],
            tiles: Extent::of(1, &[t()]),
            thread_scratch: Extent::constant(0),
        },
        Kernel {
            name: "panguc_k001_rms_norm".into(),
            kind: KernelKind::RmsNorm { eps: 1e-5 },
            args: vec![
                spec(DType::BF16, vec![t(), c(h)]),
                spec(DType::BF16, vec![c(h)]),
                spec(DType::F32, vec![t(), c(h)]),
            ],
            tiles: Extent::of(1, &[t()]),
            thread_scratch: Extent::constant(0),
        },
        Kernel {
            name: "panguc_k002_gemm".into(),
            kind: KernelKind::Gemm { epilogue: Epilogue::None },
            args: vec![
                spec(DType::F32, vec![t(), c(h)]),
                spec(DType::BF16, vec![c(v), c(h)]),
                spec(DType::F32, vec![t(), c(v)]),
            ],
            tiles: Extent::constant(1),
            thread_scratch: Extent::constant(0),
        },
    ];
    let p = KernelProgram {
        version: KERNEL_PROGRAM_VERSION,
        name: "main".into(),
        symbols: vec!["tokens".into(), "past".into()],
        buffers: vec![
            buf("ids", DType::I64, vec![t()], BufferKind::Input { index: 0 }),
            buf("positions", DType::I64, vec![t()], BufferKind::Input { index: 1 }),
            buf("model.embed_tokens.weight", DType::BF16, vec![c(v), c(h)], BufferKind::Weight { index: 0 }),
            buf("model.norm.weight", DType::BF16, vec![c(h)], BufferKind::Weight { index: 1 }),
            buf("lm_head.weight", DType::BF16, vec![c(v), c(h)], BufferKind::Weight { index: 2 }),
            buf("h", DType::BF16, vec![t(), c(h)], BufferKind::Activation { slot: 0 }),
            buf("normed", DType::F32, vec![t(), c(h)], BufferKind::Activation { slot: 1 }),
            buf("logits", DType::F32, vec![t(), c(v)], BufferKind::Activation { slot: 0 }),
        ],
        weights: vec![
            weight("model.embed_tokens.weight", vec![v, h]),
            weight("model.norm.weight", vec![h]),
            weight("lm_head.weight", vec![v, h]),
        ],
        kernels,
        launches: vec![
            Launch { kernel: 0, args: vec![BufferId(2), BufferId(0), BufferId(5)] },
            Launch { kernel: 1, args: vec![BufferId(5), BufferId(3), BufferId(6)] },
            Launch { kernel: 2, args: vec![BufferId(6), BufferId(4), BufferId(7)] },
        ],
        inputs: vec![BufferId(0), BufferId(1)],
        outputs: vec![BufferId(7)],
        caches: vec![],
        slots: 2,
    };
    p.validate().unwrap();
    p
}

/// The small program's project: tree snapshot, determinism, memory report,
/// and the host program compiles with g++ against the ACL stubs.
#[test]
fn project_tree_and_host_program() {
    let p = small_program();
    for target in Target::ALL {
        let ap = emit_program(&p, target, target.default_act()).unwrap();
        let files = project_files(&ap).unwrap();
        assert_eq!(
            files,
            project_files(&emit_program(&p, target, target.default_act()).unwrap()).unwrap(),
            "deterministic"
        );
        // The prefix is a hash of the kernels: named, not spelled, in the snapshot.
        let listing: Vec<String> = files.keys().map(|f| f.replace(&ap.op_prefix, "<prefix>")).collect();
        insta::assert_snapshot!(format!("project_tree_{}", target.name()), listing.join("\n"));
        let presets = &files["CMakePresets.json"];
        assert!(presets.contains(&format!(
            "\"ASCEND_COMPUTE_UNIT\": {{ \"type\": \"STRING\", \"value\": \"{}\" }}",
            target.name()
        )));
        let prefix = &ap.op_prefix;
        let op_host = &files[&format!("op_host/{prefix}_k001_rms_norm.cpp")];
        let op_type = format!("{}K001RmsNorm", upper_camel(prefix));
        assert!(
            op_host.contains(&format!("class {op_type} : public OpDef"))
                && op_host.contains(&format!("OP_ADD({op_type});")),
            "{op_host}"
        );
        assert!(files.keys().all(|f| !f.contains("panguc_k")), "every file carries the package prefix");
        assert!(presets.contains(&format!("\"vendor_name\": {{ \"type\": \"STRING\", \"value\": \"{}\" }}", ap.vendor)));
        // No copy of CANN's operator-project files: build.sh takes them from the installation.
        for cann_file in ["CMakeLists.txt", "op_host/CMakeLists.txt", "cmake/func.cmake", "scripts/install.sh"] {
            assert!(!files.contains_key(cann_file), "{cann_file} must come from the CANN template");
        }
        assert!(
            op_host.contains("const uint64_t tokens = context->GetInputShape(0)->GetStorageShape().GetDim(0);"),
            "{op_host}"
        );
        let report = memory_report(&ap);
        // 310P: the bf16->f16 lm_head writes f32 from the cube and casts in a vector epilogue.
        let expected = if target == Target::Ascend310P { 4 } else { 3 };
        assert_eq!(report["kernels"].as_array().unwrap().len(), expected);
        let dir = tempfile::tempdir().unwrap();
        for (rel, text) in &files {
            let path = dir.path().join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        panguc_codegen_ascendc::host::check_host_compiles(dir.path()).unwrap();
        panguc_codegen_ascendc::op_host_check::check_op_host_compiles(dir.path()).unwrap();
        // The check has teeth: a renamed kernel parameter is reported.
        let k = dir.path().join(format!("op_kernel/{prefix}_k001_rms_norm.cpp"));
        let src = std::fs::read_to_string(&k).unwrap();
        let entry = format!("void {prefix}_k001_rms_norm(GM_ADDR ");
        assert!(src.contains(&format!("{entry}x,")), "{src}");
        std::fs::write(&k, src.replace(&format!("{entry}x,"), &format!("{entry}input,"))).unwrap();
        let e = panguc_codegen_ascendc::op_host_check::check_op_host_compiles(dir.path()).unwrap_err().to_string();
        assert!(e.contains("differ from the op definition"), "{e}");
    }
}

/// Writes the stand-in CANN installation of `tests/fake_cann/` under `root`
/// (see its README): the op-project template and the `op_build` tool.
fn write_fake_cann(root: &std::path::Path) {
    const FILES: &[(&str, &str)] = &[
        ("customize/CMakeLists.txt", include_str!("fake_cann/customize/CMakeLists.txt")),
        ("customize/CMakePresets.json", include_str!("fake_cann/customize/CMakePresets.json")),
        ("customize/build.sh", include_str!("fake_cann/customize/build.sh")),
        ("customize/cmake/config.cmake", include_str!("fake_cann/customize/cmake/config.cmake")),
        ("customize/cmake/func.cmake", include_str!("fake_cann/customize/cmake/func.cmake")),
        ("customize/cmake/intf.cmake", include_str!("fake_cann/customize/cmake/intf.cmake")),
        ("customize/cmake/makeself.cmake", include_str!("fake_cann/customize/cmake/makeself.cmake")),
        (
            "customize/cmake/util/ascendc_compile_kernel.py",
            include_str!("fake_cann/customize/cmake/util/ascendc_compile_kernel.py"),
        ),
        (
            "customize/cmake/util/ascendc_get_op_name.py",
            include_str!("fake_cann/customize/cmake/util/ascendc_get_op_name.py"),
        ),
        ("customize/op_host/CMakeLists.txt", include_str!("fake_cann/customize/op_host/CMakeLists.txt")),
        ("customize/op_kernel/CMakeLists.txt", include_str!("fake_cann/customize/op_kernel/CMakeLists.txt")),
        ("customize/scripts/install.sh", include_str!("fake_cann/customize/scripts/install.sh")),
        ("customize/scripts/upgrade.sh", include_str!("fake_cann/customize/scripts/upgrade.sh")),
        ("opbuild/op_build", include_str!("fake_cann/opbuild/op_build")),
    ];
    for (rel, text) in FILES {
        let dest = match rel.strip_prefix("customize/") {
            Some(r) => root.join("tools/op_project_templates/ascendc/customize").join(r),
            None => root.join("toolkit/tools").join(rel),
        };
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::write(dest, text).unwrap();
    }
    std::fs::write(root.join("calls.log"), "").unwrap();
}

/// `bash build.sh` against a stand-in CANN installation: the project is
/// instantiated from the installation's template, configured with the
/// package's presets (compute unit, vendor, the machine's CANN path), the
/// op_host registrations go through opbuild, every kernel is compiled for
/// the compute unit under the op type its op_host registers, and the
/// staged package (the package's vendor directory plus the template's
/// scripts) becomes the `.run`.
#[test]
fn build_script_drives_the_cann_template() {
    if std::process::Command::new("cmake").arg("--version").output().is_err() {
        panic!("cmake is required by this test (.ci/run installs it)");
    }
    let p = small_program();
    for target in Target::ALL {
        let ap = emit_program(&p, target, target.default_act()).unwrap();
        let files = project_files(&ap).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (pkg, cann) = (dir.path().join("pkg"), dir.path().join("cann"));
        for (rel, text) in &files {
            let path = pkg.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        write_fake_cann(&cann);
        let out = std::process::Command::new("bash")
            .arg(pkg.join("build.sh"))
            .env("ASCEND_HOME_PATH", &cann)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "build.sh failed for {target}:\n{stdout}\n{stderr}");
        let log = std::fs::read_to_string(cann.join("calls.log")).unwrap();
        let lines: Vec<&str> = log.lines().collect();
        let unit = target.name();
        let kernels: Vec<String> = files
            .keys()
            .filter_map(|f| f.strip_prefix("op_kernel/")?.strip_suffix(".cpp").map(str::to_string))
            .collect();
        assert!(kernels.len() >= 3, "{kernels:?}");
        let expected = [
            "template build.sh ".to_string(),
            format!("configure compute_unit={unit} vendor={} shared=False", ap.vendor),
            format!("opbuild {}", kernels.iter().map(|k| format!("{k}.cpp")).collect::<Vec<_>>().join(" ")),
            "add_ops_compile_options ALL options=-O3".to_string(),
        ];
        let mut compiles: Vec<String> =
            kernels.iter().map(|k| format!("compile_kernel unit={unit} op={} src={k}.cpp", upper_camel(k))).collect();
        compiles.sort();
        let (head, rest) = lines.split_at(expected.len().min(lines.len()));
        assert_eq!(head, expected.iter().map(String::as_str).collect::<Vec<_>>().as_slice(), "{log}");
        let mut seen_compiles: Vec<String> =
            rest.iter().filter(|l| l.starts_with("compile_kernel")).map(|l| l.to_string()).collect();
        seen_compiles.sort();
        assert_eq!(seen_compiles, compiles, "{log}");
        assert!(rest.iter().any(|l| l.starts_with("op_host_build ")), "{log}");
        let package = rest.iter().find(|l| l.starts_with("package ")).unwrap_or_else(|| panic!("{log}"));
        for k in &kernels {
            let staged = format!("packages/vendors/{}/op_impl/ai_core/tbe/kernel/{unit}/{k}.o", ap.vendor);
            assert!(package.contains(&staged), "{staged} not staged: {package}");
        }
        assert!(package.contains("install.sh"), "{package}");
        let runs: Vec<_> = std::fs::read_dir(pkg.join("build_out"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(runs.len() == 1 && runs[0].starts_with("custom_opp_") && runs[0].ends_with(".run"), "{runs:?}");
        assert!(stdout.contains("operator package: "), "{stdout}");
    }
    // Without a CANN environment, build.sh stops with one clear error.
    let ap = emit_program(&p, Target::Ascend910B, DevType::BF16).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("build.sh"), &project_files(&ap).unwrap()["build.sh"]).unwrap();
    let out = std::process::Command::new("bash")
        .arg(dir.path().join("build.sh"))
        .env_remove("ASCEND_HOME_PATH")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("source the CANN environment first"));
}

/// Every package has its own vendor and op-type prefix, derived from what
/// its kernels bake in: the same program gives the same names, a program
/// with one different constant gives different ones.
#[test]
fn package_names_follow_the_kernels() {
    let p = small_program();
    let a = emit_program(&p, Target::Ascend910B, DevType::BF16).unwrap();
    let b = emit_program(&p, Target::Ascend910B, DevType::BF16).unwrap();
    assert_eq!((&a.vendor, &a.op_prefix), (&b.vendor, &b.op_prefix));
    let mut q = small_program();
    q.kernels[1].kind = KernelKind::RmsNorm { eps: 1e-6 };
    let c = emit_program(&q, Target::Ascend910B, DevType::BF16).unwrap();
    assert_ne!(a.vendor, c.vendor);
    assert_ne!(a.op_prefix, c.op_prefix);
    let d = emit_program(&p, Target::Ascend310P, DevType::F16).unwrap();
    assert_ne!(a.vendor, d.vendor);
    assert!(a.vendor.starts_with("panguc_") && a.op_prefix.starts_with("pg"));
}

/// The paged-cache kernels' op definitions (sizes `seqs`, `maxBlocks`,
/// `numBlocks` read from their parameter shapes) compile with g++ against
/// the CANN stand-in headers and declare their kernels' parameters.
#[test]
fn paged_kernels_op_host_compiles() {
    for target in Target::ALL {
        let opts = EmitOptions::new(target, target.default_act()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut n = 0;
        for (k, dts) in kinds(64, 4, 2, 16, 64, 512, 32) {
            if !matches!(k.kind, KernelKind::PagedAttention { .. } | KernelKind::QkvRopeCacheWrite { .. }) {
                continue;
            }
            let dks = emit_kernel(&k, &for_target(&dts, target), &opts).unwrap();
            for (rel, text) in panguc_codegen_ascendc::project::kernel_files(&k, &dks, target).unwrap() {
                if rel.starts_with("op_host/") {
                    n += 1;
                    for size in ["seqs", "maxBlocks", "numBlocks"] {
                        let uses = dks.kernels[0].fields.iter().any(|f| {
                            matches!(&f.value, panguc_codegen_ascendc::emit::FieldValue::U32(e) if e.to_cpp().contains(size))
                        });
                        if uses {
                            assert!(
                                text.contains(&format!("const uint64_t {size} = context->GetInputShape(")),
                                "{text}"
                            );
                        }
                    }
                }
                let path = dir.path().join(rel);
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(path, text).unwrap();
            }
        }
        assert_eq!(n, 2, "both paged kernels");
        panguc_codegen_ascendc::op_host_check::check_op_host_compiles(dir.path()).unwrap();
    }
}
