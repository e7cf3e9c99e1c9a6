//! Every simulation check rejects a deliberately wrong kernel with a message
//! naming the problem. All cases live in one kernel source (selected by the
//! tiling) so that each SoC needs a single g++ compile.

use std::time::Duration;

use panguc_codegen_ascendc::sim::{syntax_check, SimArg, SimError, SimKernel, Soc};

const SRC: &str = include_str!("kernels/sim_checks.cpp");

fn args(case: u32) -> Vec<SimArg> {
    let tiling: Vec<u8> = [case, 0, 0, 0].iter().flat_map(|v: &u32| v.to_le_bytes()).collect();
    vec![SimArg::Input(vec![0u8; 4096]), SimArg::Output(4096), SimArg::Workspace(0), SimArg::Tiling(tiling)]
}

fn run(soc: Soc, case: u32, blocks: u32) -> Result<Vec<Vec<u8>>, SimError> {
    SimKernel::new(SRC, "sim_checks", soc, blocks).run(&args(case))
}

fn expect_error(soc: Soc, case: u32, blocks: u32, needle: &str) -> String {
    match run(soc, case, blocks) {
        Ok(_) => panic!("{soc} case {case}: expected an error containing {needle:?}, but the kernel ran"),
        Err(e @ SimError::Kernel { .. }) => {
            let msg = e.message();
            assert!(msg.contains(needle), "{soc} case {case}: {msg:?} does not mention {needle:?}");
            assert!(msg.contains("sim_checks.cpp:"), "{soc} case {case}: no kernel location in {msg:?}");
            eprintln!("{soc} case {case}: {msg}");
            msg
        }
        Err(e) => panic!("{soc} case {case}: expected a simulation error, got {e}"),
    }
}

#[test]
fn each_check_rejects_its_kernel_on_910b() {
    let soc = Soc::Ascend910B;
    let cases: &[(u32, u32, &str)] = &[
        (1, 1, "UB over-allocation"),
        (2, 1, "L1 over-allocation"),
        (3, 1, "misaligned UB address"),
        (4, 1, "not a multiple of 32 bytes"),
        (5, 1, "outside global buffer"),
        (6, 1, "outside global buffer"),
        (7, 1, "outside global buffer"),
        (8, 1, "DeQue on empty queue"),
        (9, 1, "EnQue beyond queue depth"),
        (10, 1, "AllocTensor beyond the queue's buffer count"),
        (11, 1, "freed twice"),
        (12, 1, "not allocated from this queue"),
        (13, 1, "exceeds tensor size"),
        (14, 1, "repeat count 300 exceeds 255"),
        (15, 1, "not a multiple of 256 bytes"),
        (16, 1, "exceeds 4095"),
        (17, 1, "misaligned L0A address"),
        (18, 1, "misaligned L0C address"),
        (19, 2, "cross-block read"),
        (20, 2, "cross-block write"),
        (21, 1, "uninitialised UB memory"),
        (22, 1, "after FreeTensor"),
        (23, 1, "still enqueued"),
        (24, 1, "cannot use both vector (UB) buffers and cube (L1/L0) buffers"),
        (25, 1, "read-only input"),
        (30, 1, "Cast float -> bfloat16_t with unsupported round mode CAST_NONE on 910B"),
        (31, 2, "shared cache line"),
        (32, 2, "shared cache line"),
        (33, 1, "UB over-allocation"),
        (34, 1, "missing MTE2->V synchronisation"),
        (35, 1, "missing V->MTE3 synchronisation"),
        (36, 1, "without a matching SetFlag"),
    ];
    for &(case, blocks, needle) in cases {
        expect_error(soc, case, blocks, needle);
    }
    // The error names the block that failed.
    let msg = expect_error(soc, 19, 2, "cross-block read");
    assert!(msg.starts_with("[block 1 of 2]"), "{msg}");

    // DataCopyPad with padding and bf16 are fine on 910B.
    let out = run(soc, 26, 1).unwrap();
    let y: Vec<f32> = out[0].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(&y[..5], &[0.0; 5]);
    assert!(y[5].is_nan(), "bytes after the 20 copied ones stay poisoned");
    run(soc, 27, 1).unwrap();
    // The same kernel as case 34 with its SetFlag/WaitFlag<MTE2_V> runs.
    run(soc, 37, 1).unwrap();

    // Findings that are not errors come back as warnings.
    let named: Vec<(&str, SimArg)> = ["x", "y", "workspace", "tiling"].into_iter().zip(args(29)).collect();
    let run29 = SimKernel::new(SRC, "sim_checks", soc, 1).run_detailed(&named, Duration::from_secs(120)).unwrap();
    assert_eq!(run29.warnings.len(), 1, "{:?}", run29.warnings);
    assert!(run29.warnings[0].contains("still enqueued"), "{:?}", run29.warnings);

    // A by-value tiling struct of the wrong size is refused before the launch.
    let mut a = args(0);
    a[3] = SimArg::Tiling(vec![0u8; 8]);
    let err = SimKernel::new(SRC, "sim_checks", soc, 1).run(&a).unwrap_err();
    assert!(err.message().contains("tiling size mismatch"), "{err}");
}

#[test]
fn soc_specific_checks_on_310p() {
    let soc = Soc::Ascend310P;
    expect_error(soc, 26, 1, "DataCopyPad is not available on 310P");
    expect_error(soc, 27, 1, "bf16 is not supported on 310P");
    expect_error(soc, 28, 1, "Fixpipe is not available on 310P");
    expect_error(soc, 2, 1, "L1 over-allocation");
    expect_error(soc, 30, 1, "Cast float -> half with unsupported round mode CAST_RINT on 310P");
    expect_error(soc, 31, 2, "shared cache line");
    // One block's scalar stores stay in its own lines: fine.
    run(soc, 31, 1).unwrap();
    // 200 KiB of UB fits the 310P's 256 KiB, and vector + cube buffers may
    // share a kernel on its coupled AI cores.
    run(soc, 1, 1).unwrap();
    run(soc, 24, 1).unwrap();
}

#[test]
fn syntax_check_reports_compile_errors() {
    syntax_check(include_str!("kernels/add_custom.cpp"), Soc::Ascend310P).unwrap();
    let bad =
        "#include \"kernel_operator.h\"\nextern \"C\" __global__ __aicore__ void k(GM_ADDR x) { AscendC::Foo(x); }\n";
    match syntax_check(bad, Soc::Ascend910B) {
        Err(SimError::Compile { stderr, .. }) => assert!(stderr.contains("Foo"), "{stderr}"),
        other => panic!("expected a compile error, got {other:?}"),
    }
}
