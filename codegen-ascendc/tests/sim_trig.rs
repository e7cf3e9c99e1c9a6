//! The simulation's `Sin`/`Cos` (advanced math API): values, and the checks
//! they carry (operand size, element types).

use panguc_codegen_ascendc::sim::{syntax_check, SimArg, SimError, SimKernel, Soc};

const SRC: &str = r#"
#include "kernel_operator.h"
using namespace AscendC;

// case 0: y[0:64] = sin(x), y[64:128] = cos(x) (f32); case 1: Sin over 128 of 64 elements.
extern "C" __global__ __aicore__ void trig(GM_ADDR x, GM_ADDR y, GM_ADDR workspace, GM_ADDR tiling)
{
    GlobalTensor<uint32_t> tg;
    tg.SetGlobalBuffer((__gm__ uint32_t*)tiling, 1);
    const uint32_t mode = tg.GetValue(0);
    GlobalTensor<float> xg, yg;
    xg.SetGlobalBuffer((__gm__ float*)x, 64);
    yg.SetGlobalBuffer((__gm__ float*)y, 128);
    TPipe pipe;
    TBuf<TPosition::VECCALC> a, b, tmp;
    pipe.InitBuffer(a, 64 * sizeof(float));
    pipe.InitBuffer(b, 128 * sizeof(float));
    pipe.InitBuffer(tmp, 256);
    LocalTensor<float> la = a.Get<float>(), lb = b.Get<float>();
    DataCopy(la, xg, 64);
    SetFlag<HardEvent::MTE2_V>(EVENT_ID0);
    WaitFlag<HardEvent::MTE2_V>(EVENT_ID0);
    if (mode == 1) {
        Sin(lb, la, 128);
        return;
    }
    Sin(lb, la, tmp.Get<uint8_t>(), 64);
    Cos(lb[64], la, 64);
    SetFlag<HardEvent::V_MTE3>(EVENT_ID0);
    WaitFlag<HardEvent::V_MTE3>(EVENT_ID0);
    DataCopy(yg, lb, 128);
}
"#;

#[test]
fn sin_cos_values_and_checks() {
    let x: Vec<f32> = (0..64).map(|i| (i as f32 - 32.0) * 0.37).collect();
    let xb: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    let run = |mode: u32| {
        SimKernel::new(SRC, "trig", Soc::Ascend910B, 1).run(&[
            SimArg::Input(xb.clone()),
            SimArg::Output(512),
            SimArg::Workspace(0),
            SimArg::Tiling(mode.to_le_bytes().to_vec()),
        ])
    };
    let out = run(0).unwrap();
    let y: Vec<f32> = out[0].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    for i in 0..64 {
        assert_eq!(y[i], x[i].sin(), "sin({})", x[i]);
        assert_eq!(y[64 + i], x[i].cos(), "cos({})", x[i]);
    }
    match run(1) {
        Err(e @ SimError::Kernel { .. }) => assert!(e.message().contains("exceeds tensor size"), "{}", e.message()),
        other => panic!("expected a size error, got {other:?}"),
    }
    // bf16 (and integer) operands do not compile, as on the device.
    let bad =
        SRC.replace("Cos(lb[64], la, 64);", "LocalTensor<bfloat16_t> lh = tmp.Get<bfloat16_t>(); Cos(lh, lh, 16);");
    match syntax_check(&bad, Soc::Ascend910B) {
        Err(SimError::Compile { stderr, .. }) => assert!(stderr.contains("Cos supports half/float"), "{stderr}"),
        other => panic!("expected a compile error, got {other:?}"),
    }
}
