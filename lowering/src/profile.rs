//! Hardware profiles for the cost model.
//!
//! Built-in numbers come from docs/ascendc.md (Ascend 910B1..B4, 310P3) and
//! a generic host CPU. Every number is an estimate and can be overridden
//! from a TOML or JSON file whose top-level keys are profile names:
//!
//! ```toml
//! [ascend910b1]
//! mem_bandwidth_gbs = 1600.0   # nominal instead of platform-file arithmetic
//!
//! [cpu]
//! matmul_tflops = 1.2          # peak FMA throughput of this host
//! mem_bandwidth_gbs = 80.0
//! ```
//!
//! A section naming a built-in profile overrides only the fields it gives;
//! a section with a new name defines a new profile and must give every
//! field. Unknown fields, missing fields of a new profile and invalid
//! values are errors naming the field, the profile and the file.

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use std::path::Path;

/// What the cost model needs to know about one device.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HardwareProfile {
    pub name: String,
    /// `npu` or `cpu`.
    pub kind: String,
    /// Dense matmul peak (cube units at fp16/bf16; CPU: FMA peak), TFLOP/s.
    pub matmul_tflops: f64,
    /// Dense int8 x int8 -> int32 matmul peak, TOP/s (Ascend cube: twice
    /// the fp16 rate, docs/ascendc.md; CPU: no int8 speed-up assumed).
    pub int8_tops: f64,
    /// Elementwise/vector peak at f32, TFLOP/s.
    pub vector_tflops: f64,
    /// Main-memory bandwidth, GB/s (10^9 bytes).
    pub mem_bandwidth_gbs: f64,
    /// Fixed cost of launching one kernel, microseconds.
    pub launch_overhead_us: f64,
    /// On-chip vector buffer a fused kernel's working set must tile into
    /// (Ascend UB; CPU: L2 per core), KiB.
    pub ub_kib: f64,
    /// On-chip matrix buffer (Ascend L1; CPU: L1d), KiB.
    pub l1_kib: f64,
    /// Device memory, GiB (reported, not used to reject programs).
    pub memory_gib: f64,
    /// Bytes per activation / KV-cache element on this device (the IR
    /// computes in f32; NPUs run activations in 16-bit).
    pub activation_bytes: f64,
}

/// Vector peak of an Ascend SoC: vector cores x 64 f32 lanes x FMA x clock.
fn ascend_vector_tflops(vector_cores: f64, mhz: f64) -> f64 {
    vector_cores * 64.0 * 2.0 * mhz * 1e6 / 1e12
}

#[allow(clippy::too_many_arguments)]
fn npu(name: &str, cube: f64, vec_cores: f64, mhz: f64, bw: f64, ub: f64, l1: f64, mem: f64) -> HardwareProfile {
    HardwareProfile {
        name: name.into(),
        kind: "npu".into(),
        matmul_tflops: cube,
        // The cube's int8 fractal is 16x32 against 16x16 for 16-bit
        // operands: twice the MACs per cycle (the int8 column of the table).
        int8_tops: 2.0 * cube,
        vector_tflops: ascend_vector_tflops(vec_cores, mhz),
        mem_bandwidth_gbs: bw,
        // Host-side launch of a pre-built kernel through ACL, without graph
        // capture; a few microseconds per kernel is the usual figure.
        launch_overhead_us: 5.0,
        ub_kib: ub,
        l1_kib: l1,
        memory_gib: mem,
        activation_bytes: 2.0,
    }
}

/// The built-in profiles: ascend910b1..b4, ascend310p3 and `cpu`.
pub fn builtin_profiles() -> Vec<HardwareProfile> {
    vec![
        // UB 192 KiB minus the 256 B the runtime reserves; bandwidth from
        // the platform-file arithmetic in ascendc.md (nominal is ~1.6 TB/s).
        npu("ascend910b1", 364.0, 48.0, 1850.0, 1420.0, 191.75, 512.0, 64.0),
        npu("ascend910b2", 354.0, 48.0, 1800.0, 1380.0, 191.75, 512.0, 64.0),
        npu("ascend910b3", 295.0, 40.0, 1800.0, 1150.0, 191.75, 512.0, 64.0),
        npu("ascend910b4", 246.0, 40.0, 1500.0, 960.0, 191.75, 512.0, 32.0),
        // 8 AI cores + 7 vector cores, LPDDR4X ~204 GB/s, 24 GB.
        npu("ascend310p3", 69.5, 15.0, 1060.0, 204.0, 256.0, 1024.0, 22.35),
        HardwareProfile {
            name: "cpu".into(),
            kind: "cpu".into(),
            // A generic 8-core AVX2 host at 3 GHz: 2 FMA x 8 f32 lanes x 2
            // flops x 8 cores x 3e9. Fixed (not probed) so reports are
            // reproducible; override it for the real host.
            matmul_tflops: 0.768,
            // Int8 GEMMs run on the same FMA units after widening.
            int8_tops: 0.768,
            vector_tflops: 0.384,
            mem_bandwidth_gbs: 50.0,
            launch_overhead_us: 2.0,
            ub_kib: 1024.0,
            l1_kib: 48.0,
            memory_gib: 64.0,
            activation_bytes: 4.0,
        },
    ]
}

/// Where a physical parameter of the published-figure estimates comes from.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", content = "detail", rename_all = "snake_case")]
pub enum Provenance {
    /// A vendor specification (or arithmetic on vendor figures), with its source.
    Vendor(&'static str),
    /// Chosen so that the estimate matches a published figure: which one(s).
    Fitted(&'static str),
    /// Neither specified nor fitted: a typical value, and why it was chosen.
    Assumed(&'static str),
}

/// One parameter of [`ServingParams`], as the report lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PhysicalParam {
    pub name: String,
    pub value: f64,
    pub unit: &'static str,
    pub provenance: Provenance,
}

/// A link between devices: per-device bandwidth one collective can use and
/// the fixed cost of one communication step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LinkParams {
    pub bandwidth_gbs: f64,
    pub latency_us: f64,
    /// Full mesh (one step per collective phase) or ring (n - 1 steps).
    pub full_mesh: bool,
}

/// HCCS inside an Atlas 800I A2: eight 910B in a full mesh, 7 links of
/// 56 GB/s per direction; one collective uses about 196 GB/s per device.
pub const HCCS_800I_A2: LinkParams = LinkParams { bandwidth_gbs: 196.0, latency_us: 10.0, full_mesh: true };

/// Atlas 300I Duo cards (and the two 310P3 of one card) over PCIe 4.0 x16:
/// 32 GB/s raw per direction, about 25 GB/s effective; a ring.
pub const PCIE_300I_DUO: LinkParams = LinkParams { bandwidth_gbs: 25.0, latency_us: 25.0, full_mesh: false };

/// The one parameter set of the `published` estimates: the chip profiles
/// (their peaks, bandwidths and launch overheads, above), the links, and
/// the serving-stack terms a kernel cost model cannot see. Every number is
/// listed in `report.json` with its provenance ([`ServingParams::table`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServingParams {
    /// Fraction of the cube peak (fp16 and int8) that large GEMMs and
    /// attention reach in practice on the 910B; applied to matmul compute
    /// only.
    pub cube_efficiency: f64,
    /// The same on the 310P (Atlas 300I Duo): a separate term because the
    /// 310P's cube path does more per GEMM (docs/ascendc.md: no ND->NZ in
    /// its data copies, so operands are converted to the fractal layout by
    /// vector code, and L0C results leave through the UB), which the cost
    /// model does not price kernel by kernel.
    pub cube_efficiency_310p: f64,
    /// Fraction of the memory bandwidth that kernels stream at in
    /// practice (weights, KV cache and activations alike).
    pub memory_efficiency: f64,
    /// Host/framework time per forward step (scheduling, sampling, input
    /// preparation, synchronisation), milliseconds; added once per step.
    pub step_overhead_ms: f64,
    pub hccs: LinkParams,
    pub pcie: LinkParams,
}

impl Default for ServingParams {
    fn default() -> Self {
        ServingParams {
            cube_efficiency: CUBE_EFFICIENCY,
            cube_efficiency_310p: CUBE_EFFICIENCY_310P,
            memory_efficiency: MEMORY_EFFICIENCY,
            step_overhead_ms: STEP_OVERHEAD_MS,
            hccs: HCCS_800I_A2,
            pcie: PCIE_300I_DUO,
        }
    }
}

/// See [`ServingParams::cube_efficiency`].
pub const CUBE_EFFICIENCY: f64 = 0.25;
/// See [`ServingParams::cube_efficiency_310p`].
pub const CUBE_EFFICIENCY_310P: f64 = 0.2;
/// See [`ServingParams::memory_efficiency`].
pub const MEMORY_EFFICIENCY: f64 = 1.0;
/// See [`ServingParams::step_overhead_ms`].
pub const STEP_OVERHEAD_MS: f64 = 6.0;
/// How the four fitted terms were fitted: jointly, to the smallest largest
/// relative error over the five estimated figures of the grouped int8
/// program, on a grid (both cube efficiencies 0.1 to 0.6 and memory 0.5 to
/// 1.0 in steps of 0.05, overhead 0 to 10 ms in steps of 1 ms), by the
/// ignored test `compiler/tests/published_fit.rs` (which prints each
/// figure's compute / memory / launch / collective / overhead split).
/// Result: largest error 23% (800I A2 decode batch 456, -23%; 300I Duo
/// decode batch 80, +23%). The cube terms only move the prefill figures
/// (the only compute-bound steps): what the published prefills imply is
/// 22% (910B) and 12% (310P) of the int8 peak over the whole step. Memory
/// sits at the grid's bound: the bandwidths are already the platform-file
/// figures, below the nominal 1.6 TB/s.
const JOINT_FIT: &str = "jointly with the other fitted terms: minimax relative error over the five estimated figures \
     (grid search, compiler/tests/published_fit.rs); largest error 23%";
const CUBE_EFFICIENCY_FIT: &str = JOINT_FIT;
const MEMORY_EFFICIENCY_FIT: &str = JOINT_FIT;
const STEP_OVERHEAD_FIT: &str = JOINT_FIT;

impl ServingParams {
    /// `p` with its cube peaks and memory bandwidth scaled by the
    /// achievable fractions of this set.
    pub fn derate(&self, p: &HardwareProfile) -> HardwareProfile {
        let cube = if p.name.starts_with("ascend310p") { self.cube_efficiency_310p } else { self.cube_efficiency };
        HardwareProfile {
            matmul_tflops: p.matmul_tflops * cube,
            int8_tops: p.int8_tops * cube,
            mem_bandwidth_gbs: p.mem_bandwidth_gbs * self.memory_efficiency,
            ..p.clone()
        }
    }

    /// Every parameter the published estimates use, with its provenance:
    /// the chip figures of `chips` and this set's own terms.
    pub fn table(&self, chips: &[&HardwareProfile]) -> Vec<PhysicalParam> {
        let param = |name: String, value: f64, unit: &'static str, provenance: Provenance| PhysicalParam {
            name,
            value,
            unit,
            provenance,
        };
        let mut out = vec![];
        for p in chips {
            let chip = &p.name;
            out.extend([
                param(
                    format!("{chip}.int8_tops"),
                    p.int8_tops,
                    "TOP/s",
                    Provenance::Vendor(
                        "docs/ascendc.md per-SoC table: cube cores x 4096 MAC x 2 x clock, int8 twice fp16",
                    ),
                ),
                param(
                    format!("{chip}.matmul_tflops"),
                    p.matmul_tflops,
                    "TFLOP/s",
                    Provenance::Vendor("docs/ascendc.md per-SoC table (fp16 cube peak)"),
                ),
                param(
                    format!("{chip}.vector_tflops"),
                    p.vector_tflops,
                    "TFLOP/s",
                    Provenance::Vendor(
                        "docs/ascendc.md core counts and clocks: vector cores x 64 f32 lanes x 2 x clock",
                    ),
                ),
                param(
                    format!("{chip}.mem_bandwidth_gbs"),
                    p.mem_bandwidth_gbs,
                    "GB/s",
                    Provenance::Vendor(
                        "docs/ascendc.md: platform-file arithmetic (910B1 1.42 TB/s, 310P3 LPDDR4X ~204 GB/s)",
                    ),
                ),
                param(
                    format!("{chip}.launch_overhead_us"),
                    p.launch_overhead_us,
                    "us per kernel",
                    Provenance::Assumed(
                        "host-side ACL launch of a pre-built kernel without graph capture: a few microseconds",
                    ),
                ),
            ]);
        }
        for (name, l, bandwidth, latency) in [
            (
                "hccs",
                &self.hccs,
                "Atlas 800I A2: 8 x 910B in an HCCS full mesh, 7 links x 56 GB/s per direction (~196 GB/s usable by one collective)",
                "order of one small-message HCCL step inside a server",
            ),
            (
                "pcie",
                &self.pcie,
                "PCIe 4.0 x16: 32 GB/s raw per direction, ~25 GB/s effective",
                "a PCIe round trip plus HCCL step set-up, above HCCS's",
            ),
        ] {
            out.push(param(format!("{name}.bandwidth_gbs"), l.bandwidth_gbs, "GB/s per device", Provenance::Vendor(bandwidth)));
            out.push(param(format!("{name}.latency_us"), l.latency_us, "us per collective step", Provenance::Assumed(latency)));
        }
        out.push(param(
            "cube_efficiency".into(),
            self.cube_efficiency,
            "fraction of the cube peaks",
            Provenance::Fitted(CUBE_EFFICIENCY_FIT),
        ));
        out.push(param(
            "cube_efficiency_310p".into(),
            self.cube_efficiency_310p,
            "fraction of the 310P cube peaks",
            Provenance::Fitted(CUBE_EFFICIENCY_FIT),
        ));
        out.push(param(
            "memory_efficiency".into(),
            self.memory_efficiency,
            "fraction of the memory bandwidth",
            Provenance::Fitted(MEMORY_EFFICIENCY_FIT),
        ));
        out.push(param(
            "step_overhead_ms".into(),
            self.step_overhead_ms,
            "ms per forward step",
            Provenance::Fitted(STEP_OVERHEAD_FIT),
        ));
        out
    }
}

/// The built-in profile called `name`.
pub fn builtin_profile(name: &str) -> Option<HardwareProfile> {
    builtin_profiles().into_iter().find(|p| p.name == name)
}

/// Numeric fields, in declaration order, with their minimum legal value.
const NUMERIC_FIELDS: &[(&str, f64)] = &[
    ("matmul_tflops", f64::MIN_POSITIVE),
    ("int8_tops", f64::MIN_POSITIVE),
    ("vector_tflops", f64::MIN_POSITIVE),
    ("mem_bandwidth_gbs", f64::MIN_POSITIVE),
    ("launch_overhead_us", 0.0),
    ("ub_kib", f64::MIN_POSITIVE),
    ("l1_kib", f64::MIN_POSITIVE),
    ("memory_gib", f64::MIN_POSITIVE),
    ("activation_bytes", f64::MIN_POSITIVE),
];

impl HardwareProfile {
    fn field_mut(&mut self, key: &str) -> Option<&mut f64> {
        Some(match key {
            "matmul_tflops" => &mut self.matmul_tflops,
            "int8_tops" => &mut self.int8_tops,
            "vector_tflops" => &mut self.vector_tflops,
            "mem_bandwidth_gbs" => &mut self.mem_bandwidth_gbs,
            "launch_overhead_us" => &mut self.launch_overhead_us,
            "ub_kib" => &mut self.ub_kib,
            "l1_kib" => &mut self.l1_kib,
            "memory_gib" => &mut self.memory_gib,
            "activation_bytes" => &mut self.activation_bytes,
            _ => return None,
        })
    }

    /// The built-in profiles with the overrides of `path` applied (TOML, or
    /// JSON when the file name ends in `.json`).
    pub fn load_overrides(path: &Path) -> Result<Vec<HardwareProfile>> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading hardware profiles {}", path.display()))?;
        let is_json = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"));
        let doc: serde_json::Value = if is_json {
            serde_json::from_str(&text).map_err(|e| anyhow!("{}: invalid JSON: {e}", path.display()))?
        } else {
            let v: toml::Value = toml::from_str(&text).map_err(|e| anyhow!("{}: invalid TOML: {e}", path.display()))?;
            serde_json::to_value(v).map_err(|e| anyhow!("{}: {e}", path.display()))?
        };
        apply_overrides(builtin_profiles(), &doc, &path.display().to_string())
    }
}

/// Apply an override document (`{profile: {field: value}}`) to `profiles`;
/// `origin` names the file in errors.
pub fn apply_overrides(
    mut profiles: Vec<HardwareProfile>,
    doc: &serde_json::Value,
    origin: &str,
) -> Result<Vec<HardwareProfile>> {
    let top = doc.as_object().ok_or_else(|| anyhow!("{origin}: expected a table of profiles at the top level"))?;
    for (name, section) in top {
        let fields = section
            .as_object()
            .ok_or_else(|| anyhow!("{origin}: `{name}` must be a table of fields, found {section}"))?;
        let existing = profiles.iter().position(|p| &p.name == name);
        let mut p = match existing {
            Some(i) => profiles[i].clone(),
            None => {
                // A new profile: every field must be given.
                // `int8_tops` may be left out (files written before it
                // existed): it then defaults to the profile's matmul peak.
                if let Some((missing, _)) =
                    NUMERIC_FIELDS.iter().find(|(k, _)| *k != "int8_tops" && !fields.contains_key(*k))
                {
                    bail!("{origin}: new profile `{name}` is missing field `{missing}`");
                }
                if !fields.contains_key("kind") {
                    bail!("{origin}: new profile `{name}` is missing field `kind`");
                }
                HardwareProfile { name: name.clone(), ..builtin_profile("cpu").expect("built-in cpu profile") }
            }
        };
        for (key, value) in fields {
            if key == "kind" {
                match value.as_str() {
                    Some(k @ ("npu" | "cpu")) => p.kind = k.to_string(),
                    _ => bail!("{origin}: profile `{name}`: field `kind` must be \"npu\" or \"cpu\", found {value}"),
                }
                continue;
            }
            let min = NUMERIC_FIELDS.iter().find(|(k, _)| k == key).map(|(_, m)| *m);
            let (Some(min), Some(slot)) = (min, p.field_mut(key)) else {
                let known: Vec<&str> = NUMERIC_FIELDS.iter().map(|(k, _)| *k).chain(["kind"]).collect();
                bail!("{origin}: profile `{name}`: unknown field `{key}` (known fields: {})", known.join(", "));
            };
            let v = value
                .as_f64()
                .ok_or_else(|| anyhow!("{origin}: profile `{name}`: field `{key}` must be a number, found {value}"))?;
            if !v.is_finite() || v < min {
                let rule = if min > 0.0 { "a positive number" } else { "a non-negative number" };
                bail!("{origin}: profile `{name}`: field `{key}` must be {rule}, found {v}");
            }
            *slot = v;
        }
        if existing.is_none() && !fields.contains_key("int8_tops") {
            p.int8_tops = p.matmul_tflops;
        }
        match existing {
            Some(i) => profiles[i] = p,
            None => profiles.push(p),
        }
    }
    Ok(profiles)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("panguc-profile-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn builtin_numbers_follow_the_docs() {
        let b1 = builtin_profile("ascend910b1").unwrap();
        assert_eq!(b1.matmul_tflops, 364.0);
        // ascendc.md: int8 ~727 TOPS (twice the fp16 peak, rounded there).
        assert_eq!(b1.int8_tops, 728.0);
        assert_eq!(builtin_profile("ascend310p3").unwrap().int8_tops, 139.0);
        // 48 vector cores x 64 lanes x 2 x 1.85 GHz = 11.4 TFLOP/s.
        assert!((b1.vector_tflops - 11.3664).abs() < 1e-9);
        let names: Vec<String> = builtin_profiles().into_iter().map(|p| p.name).collect();
        assert_eq!(names, ["ascend910b1", "ascend910b2", "ascend910b3", "ascend910b4", "ascend310p3", "cpu"]);
    }

    #[test]
    fn toml_and_json_overrides_apply() {
        let p = write("ok.toml", "[ascend910b1]\nmem_bandwidth_gbs = 1600\n[cpu]\nmatmul_tflops = 1.5\n");
        let ps = HardwareProfile::load_overrides(&p).unwrap();
        assert_eq!(ps.iter().find(|x| x.name == "ascend910b1").unwrap().mem_bandwidth_gbs, 1600.0);
        assert_eq!(ps.iter().find(|x| x.name == "cpu").unwrap().matmul_tflops, 1.5);
        let p = write("ok.json", r#"{"ascend310p3": {"launch_overhead_us": 9}}"#);
        let ps = HardwareProfile::load_overrides(&p).unwrap();
        assert_eq!(ps.iter().find(|x| x.name == "ascend310p3").unwrap().launch_overhead_us, 9.0);
    }

    #[test]
    fn bad_fields_are_errors_naming_field_and_file() {
        let cases = [
            ("unknown.toml", "[cpu]\nbandwidth = 3\n", "unknown field `bandwidth`"),
            ("type.toml", "[cpu]\nub_kib = \"big\"\n", "field `ub_kib` must be a number"),
            ("neg.json", r#"{"cpu": {"mem_bandwidth_gbs": -1}}"#, "field `mem_bandwidth_gbs` must be a positive"),
            ("new.toml", "[myboard]\nkind = \"npu\"\nmatmul_tflops = 10\n", "missing field `vector_tflops`"),
            ("kind.toml", "[cpu]\nkind = \"gpu\"\n", "field `kind`"),
        ];
        for (file, text, want) in cases {
            let p = write(file, text);
            let err = HardwareProfile::load_overrides(&p).unwrap_err().to_string();
            assert!(err.contains(want), "{file}: {err}");
            assert!(err.contains(file), "{file}: error does not name the file: {err}");
        }
    }

    #[test]
    fn a_complete_new_profile_is_added() {
        let p = write(
            "board.toml",
            "[board]\nkind = \"npu\"\nmatmul_tflops = 10\nvector_tflops = 1\nmem_bandwidth_gbs = 100\n\
             launch_overhead_us = 3\nub_kib = 128\nl1_kib = 256\nmemory_gib = 8\nactivation_bytes = 2\n",
        );
        let ps = HardwareProfile::load_overrides(&p).unwrap();
        let b = ps.iter().find(|x| x.name == "board").unwrap();
        assert_eq!((b.kind.as_str(), b.ub_kib), ("npu", 128.0));
        // No int8 peak given: int8 GEMMs are priced at the matmul peak.
        assert_eq!(b.int8_tops, 10.0);
        let p = write("board8.json", r#"{"ascend910b1": {"int8_tops": 600}}"#);
        let ps = HardwareProfile::load_overrides(&p).unwrap();
        assert_eq!(ps.iter().find(|x| x.name == "ascend910b1").unwrap().int8_tops, 600.0);
    }
}
