// kernel_operator.h -- panguc's CPU simulation of the AscendC API subset.
//
// Kernels include this header exactly as on a CANN machine; compiled with
// g++ and `-I codegen-ascendc/sim/include -DPANGUC_SIM_SOC=910B|310P` they
// run on the CPU with checks real hardware does not give (capacity, alignment,
// 32-byte copy lengths, GM bounds, queue misuse, cross-block races,
// uninitialised reads). See sim/README.md for the supported subset.
//
// Cube: the LOW-LEVEL path (DataCopy Nd2Nz -> LoadData -> Mmad -> Fixpipe,
// or CO1 -> CO2 on 310P) is simulated, not the high-level matmul::Matmul
// API. Reasons: the low-level path is a handful of instructions with simple,
// documented semantics that can be checked exactly (addresses, alignment,
// m/n/k limits, buffer capacities), and the emitter chooses the tiling itself;
// matmul::Matmul needs TCubeTiling produced by the closed host tiling library
// and hides the buffer usage this simulation exists to check.
//
// Only defines what real kernels use: the AscendC namespace, GM_ADDR,
// half/bfloat16_t, the qualifier macros and the tiling macros. Everything
// simulation-internal lives in namespace panguc_sim or AscendC::sim, or is
// prefixed sim_.
#pragma once

#include "panguc_sim/base.h"
#include "panguc_sim/tensor.h"
#include "panguc_sim/data_copy.h"
#include "panguc_sim/vector.h"
#include "panguc_sim/cube.h"
