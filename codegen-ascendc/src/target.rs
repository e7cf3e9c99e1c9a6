//! Ascend targets: names, on-chip capacities, supported dtypes.

use anyhow::{bail, Result};
use std::fmt;

use crate::sim::Soc;

/// A target accepted by `panguc compile --target`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Target {
    /// Ascend 910B (dav-c220): split mode, 1 cube : 2 vector cores.
    Ascend910B,
    /// Ascend 310P (dav-m200): coupled AI cores, fp16 only, no DataCopyPad.
    Ascend310P,
}

/// Bytes of each on-chip memory a kernel may allocate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub ub: u64,
    pub l1: u64,
    pub l0a: u64,
    pub l0b: u64,
    pub l0c: u64,
}

impl Target {
    pub const ALL: [Target; 2] = [Target::Ascend910B, Target::Ascend310P];

    /// Parse a `--target` name (`ascend910b`, `ascend310p`).
    pub fn parse(name: &str) -> Result<Target> {
        match name {
            "ascend910b" => Ok(Target::Ascend910B),
            "ascend310p" => Ok(Target::Ascend310P),
            other => bail!("unknown Ascend target `{other}` (known: ascend910b, ascend310p)"),
        }
    }

    /// The name used by `--target`, `AddConfig` and `ASCEND_COMPUTE_UNIT`.
    pub fn name(self) -> &'static str {
        match self {
            Target::Ascend910B => "ascend910b",
            Target::Ascend310P => "ascend310p",
        }
    }

    pub fn soc(self) -> Soc {
        match self {
            Target::Ascend910B => Soc::Ascend910B,
            Target::Ascend310P => Soc::Ascend310P,
        }
    }

    /// Capacities as the simulation enforces them (ascendc.md): UB minus
    /// the 256 B the 910B runtime reserves.
    pub fn capacity(self) -> Capacity {
        match self {
            Target::Ascend910B => Capacity {
                ub: 192 * 1024 - 256 - 8 * 1024,
                l1: 512 * 1024,
                l0a: 64 * 1024,
                l0b: 64 * 1024,
                l0c: 128 * 1024,
            },
            Target::Ascend310P => {
                Capacity { ub: 248 * 1024, l1: 1024 * 1024, l0a: 64 * 1024, l0b: 64 * 1024, l0c: 256 * 1024 }
            }
        }
    }

    /// Smallest core count of the SoC family (910B3/B4: 20 cube, 40 vector;
    /// 310P3: 8 AI cores). Used for worst-case reports; the host tiling asks
    /// the platform at run time.
    pub fn min_cores(self, cube: bool) -> u64 {
        match (self, cube) {
            (Target::Ascend910B, true) => 20,
            (Target::Ascend910B, false) => 40,
            (Target::Ascend310P, _) => 8,
        }
    }

    /// Default activation dtype: bf16 like the checkpoint on 910B, fp16 on
    /// 310P (no bf16 there).
    pub fn default_act(self) -> DevType {
        match self {
            Target::Ascend910B => DevType::BF16,
            Target::Ascend310P => DevType::F16,
        }
    }

    /// Whether `act` can be the activation dtype on this target.
    pub fn check_act(self, act: DevType) -> Result<()> {
        match (self, act) {
            (Target::Ascend910B, DevType::BF16 | DevType::F16 | DevType::F32) => Ok(()),
            (Target::Ascend310P, DevType::F16) => Ok(()),
            (Target::Ascend310P, DevType::BF16) => {
                bail!("dtype bf16 is not supported on ascend310p (no bf16 vector or cube units); use f16")
            }
            (Target::Ascend310P, DevType::F32) => {
                bail!("f32 activations are not supported on ascend310p (its cube unit has no f32 Mmad); use f16")
            }
            (t, d) => bail!("{d} is not an activation dtype for {t}"),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Element type of a device buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum DevType {
    F16,
    BF16,
    F32,
    I64,
    /// Step metadata of a ragged batch (positions, block table, ...); the
    /// int32 accumulators and `quant_bias` of int8 matmuls.
    I32,
    /// Int8 weights, quantized activations and the int8 KV cache.
    I8,
}

impl DevType {
    pub fn size(self) -> u64 {
        match self {
            DevType::F16 | DevType::BF16 => 2,
            DevType::F32 | DevType::I32 => 4,
            DevType::I64 => 8,
            DevType::I8 => 1,
        }
    }
    /// AscendC C++ type.
    pub fn cpp(self) -> &'static str {
        match self {
            DevType::F16 => "half",
            DevType::BF16 => "bfloat16_t",
            DevType::F32 => "float",
            DevType::I64 => "int64_t",
            DevType::I32 => "int32_t",
            DevType::I8 => "int8_t",
        }
    }
    /// GE dtype in OpDef registrations.
    pub fn ge(self) -> &'static str {
        match self {
            DevType::F16 => "ge::DT_FLOAT16",
            DevType::BF16 => "ge::DT_BF16",
            DevType::F32 => "ge::DT_FLOAT",
            DevType::I64 => "ge::DT_INT64",
            DevType::I32 => "ge::DT_INT32",
            DevType::I8 => "ge::DT_INT8",
        }
    }
    /// ACL dtype in the host program.
    pub fn acl(self) -> &'static str {
        match self {
            DevType::F16 => "ACL_FLOAT16",
            DevType::BF16 => "ACL_BF16",
            DevType::F32 => "ACL_FLOAT",
            DevType::I64 => "ACL_INT64",
            DevType::I32 => "ACL_INT32",
            DevType::I8 => "ACL_INT8",
        }
    }
    /// Elements per 32-byte block.
    pub fn per_block(self) -> u64 {
        32 / self.size()
    }
    pub fn parse(s: &str) -> Result<DevType> {
        match s {
            "f16" | "fp16" | "float16" => Ok(DevType::F16),
            "bf16" | "bfloat16" => Ok(DevType::BF16),
            "f32" | "fp32" | "float32" => Ok(DevType::F32),
            other => bail!("unknown activation dtype `{other}` (expected bf16, f16 or f32)"),
        }
    }
}

impl fmt::Display for DevType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DevType::F16 => "f16",
            DevType::BF16 => "bf16",
            DevType::F32 => "f32",
            DevType::I64 => "i64",
            DevType::I32 => "i32",
            DevType::I8 => "i8",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_dtype_rules() {
        assert_eq!(Target::parse("ascend910b").unwrap(), Target::Ascend910B);
        let e = Target::parse("ascend950").unwrap_err().to_string();
        assert!(e.contains("unknown Ascend target `ascend950`"), "{e}");
        let e = Target::Ascend310P.check_act(DevType::BF16).unwrap_err().to_string();
        assert!(e.contains("bf16 is not supported on ascend310p"), "{e}");
        assert!(Target::Ascend910B.check_act(DevType::BF16).is_ok());
    }
}
