//! Run AscendC kernels on the CPU under panguc's simulation of the AscendC API.
//!
//! A kernel source (one `.cpp` with an `extern "C" __global__ __aicore__`
//! entry that includes `kernel_operator.h`) is compiled with g++ against the
//! headers in `sim/include/`, together with a small generated driver, into an
//! executable that is cached by a hash of everything that goes into it (g++
//! takes seconds per kernel). Running it launches the kernel once per block
//! index, sequentially, and either returns the output buffers or the first
//! check that failed (UB over-allocation, misaligned address, 32-byte copy
//! rule, out-of-range GM access, queue misuse, cross-block race, ...), with
//! the block index and the kernel's file:line.
//!
//! ```no_run
//! use panguc_codegen_ascendc::sim::{SimArg, SimKernel, Soc};
//! # fn main() -> Result<(), panguc_codegen_ascendc::sim::SimError> {
//! let k = SimKernel::new(std::fs::read_to_string("add_custom.cpp").unwrap(), "add_custom", Soc::Ascend910B, 8);
//! let x = vec![0u8; 4096];
//! let y = vec![0u8; 4096];
//! let tiling = vec![0u8; 16];
//! // Arguments in the kernel's parameter order.
//! let outs = k.run(&[
//!     SimArg::Input(x),
//!     SimArg::Input(y),
//!     SimArg::Output(4096),
//!     SimArg::Workspace(0),
//!     SimArg::Tiling(tiling),
//! ])?;
//! let z: &Vec<u8> = &outs[0]; // one entry per Output / InOut argument, in order
//! # let _ = z; Ok(()) }
//! ```
//!
//! Binding: each pointer parameter (`GM_ADDR`) of the entry receives the next
//! argument's buffer; a tiling struct passed by value receives the bytes of a
//! [`SimArg::Tiling`] of exactly its size. A `GM_ADDR tiling` parameter gets a
//! read-only buffer that `GET_TILING_DATA` copies from.
//!
//! Environment: `PANGUC_SIM_CXX` (compiler, default `g++`),
//! `PANGUC_SIM_CACHE_DIR` (default `$TMPDIR/panguc-sim-cache`),
//! `PANGUC_SIM_TIMEOUT_SECS` (per run, default 300).
//!
//! Driver wire format (little-endian), written by [`SimKernel::run`] and read
//! by `panguc_sim::DriverMain` in `sim_launch.h`: arguments file
//! `"PGSIMA01"`, u32 count, then per argument u8 kind (1 input, 2 output,
//! 3 in/out, 4 workspace, 5 tiling, 6 zero-filled input without bytes), u32 name length, name, u64 byte length,
//! and the bytes for input / in/out / tiling. Output file `"PGSIMO01"`, u32
//! count, then per output or in/out argument u64 length and the bytes. Exit
//! status 0 ok, 3 simulation error (`panguc-sim: error: ...` on stderr),
//! 2 harness error.

use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::timing::{SimTiming, TimingParams};

/// The simulation headers, embedded so that a package or an installed binary
/// can ship them: (path relative to the include directory, contents).
const SIM_HEADERS: &[(&str, &str)] = &[
    ("kernel_operator.h", include_str!("../sim/include/kernel_operator.h")),
    ("sim_launch.h", include_str!("../sim/include/sim_launch.h")),
    ("panguc_sim/base.h", include_str!("../sim/include/panguc_sim/base.h")),
    ("panguc_sim/tensor.h", include_str!("../sim/include/panguc_sim/tensor.h")),
    ("panguc_sim/data_copy.h", include_str!("../sim/include/panguc_sim/data_copy.h")),
    ("panguc_sim/vector.h", include_str!("../sim/include/panguc_sim/vector.h")),
    ("panguc_sim/cube.h", include_str!("../sim/include/panguc_sim/cube.h")),
    ("panguc_sim/timing.h", include_str!("../sim/include/panguc_sim/timing.h")),
];

/// Bump when the driver template or the wire format changes (part of the
/// compile-cache key).
const HARNESS_VERSION: &str = "panguc-sim-harness-1";

const CXX_FLAGS: &[&str] = &["-std=c++17", "-O1", "-fno-strict-aliasing"];

/// The embedded simulation headers: (path relative to the include dir, text).
pub fn sim_headers() -> Vec<(&'static str, &'static str)> {
    SIM_HEADERS.to_vec()
}

/// Directory to pass as `-I` when compiling kernels against the simulation.
///
/// In a source checkout this is `codegen-ascendc/sim/include`; elsewhere (an
/// installed binary) the embedded headers are written to a content-addressed
/// directory in the cache and that directory is returned.
pub fn sim_include_dir() -> Result<PathBuf, SimError> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("sim").join("include");
    if src.join("kernel_operator.h").is_file() {
        return Ok(src);
    }
    materialized_include_dir()
}

/// Target SoC family of a simulated kernel (`-DPANGUC_SIM_SOC=...`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Soc {
    /// Ascend 910B (dav-c220): UB 192 KiB, L1 512 KiB, L0C 128 KiB, bf16 and
    /// DataCopyPad available, separate cube and vector cores.
    Ascend910B,
    /// Ascend 310P (dav-m200): UB 256 KiB, L1 1 MiB, L0C 256 KiB, no bf16,
    /// no DataCopyPad, no Fixpipe.
    Ascend310P,
}

impl Soc {
    /// Value of the `PANGUC_SIM_SOC` macro.
    pub fn macro_value(self) -> &'static str {
        match self {
            Soc::Ascend910B => "910B",
            Soc::Ascend310P => "310P",
        }
    }
}

impl fmt::Display for Soc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.macro_value())
    }
}

/// One kernel argument, in the kernel's parameter order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SimArg {
    /// Read-only global-memory buffer with these contents (writes are errors).
    Input(Vec<u8>),
    /// Output buffer of this many bytes; starts as 0xFF poison (NaN for
    /// float types) so unwritten bytes are visible.
    Output(usize),
    /// Buffer that is read and written; returned like an output.
    InOut(Vec<u8>),
    /// Scratch buffer of this many bytes (poisoned, not returned).
    Workspace(usize),
    /// Tiling bytes: either a by-value struct parameter (sizes must match) or
    /// a read-only buffer for a `GM_ADDR tiling` parameter.
    Tiling(Vec<u8>),
    /// Read-only input of this many zero bytes that the simulation allocates
    /// lazily (nothing is shipped): for timing shapes too large to fill.
    Zeroed(usize),
}

impl SimArg {
    fn kind(&self) -> u8 {
        match self {
            SimArg::Input(_) => 1,
            SimArg::Output(_) => 2,
            SimArg::InOut(_) => 3,
            SimArg::Workspace(_) => 4,
            SimArg::Tiling(_) => 5,
            SimArg::Zeroed(_) => 6,
        }
    }
    fn len(&self) -> usize {
        match self {
            SimArg::Input(b) | SimArg::InOut(b) | SimArg::Tiling(b) => b.len(),
            SimArg::Output(n) | SimArg::Workspace(n) | SimArg::Zeroed(n) => *n,
        }
    }
    fn data(&self) -> &[u8] {
        match self {
            SimArg::Input(b) | SimArg::InOut(b) | SimArg::Tiling(b) => b,
            SimArg::Output(_) | SimArg::Workspace(_) | SimArg::Zeroed(_) => &[],
        }
    }
    fn is_returned(&self) -> bool {
        matches!(self, SimArg::Output(_) | SimArg::InOut(_))
    }
}

/// Result of a successful simulated launch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SimRun {
    /// Contents of every [`SimArg::Output`] and [`SimArg::InOut`], in order.
    pub outputs: Vec<Vec<u8>>,
    /// Non-fatal findings (e.g. a queue destroyed with tensors still enqueued).
    pub warnings: Vec<String>,
}

/// Why a simulated kernel did not produce outputs.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The C++ compiler could not be started.
    #[error("cannot run the C++ compiler `{cxx}`: {source}")]
    CompilerUnavailable {
        cxx: String,
        #[source]
        source: std::io::Error,
    },
    /// The kernel does not compile against the simulation headers.
    #[error("kernel `{entry}` does not compile for {soc}:\n{stderr}")]
    Compile { entry: String, soc: Soc, stderr: String },
    /// A simulation check failed; `message` names the block, file:line and
    /// the problem, e.g. `[block 1 of 4] add.cpp:42: DataCopy: length of 40
    /// bytes ... is not a multiple of 32 bytes ...`.
    #[error("AscendC simulation ({soc}) rejected kernel `{entry}`: {message}")]
    Kernel { entry: String, soc: Soc, block: Option<u32>, message: String },
    /// The simulation process died (e.g. a segfault from raw pointer use).
    #[error("simulation of kernel `{entry}` crashed ({status}):\n{stderr}")]
    Crashed { entry: String, status: String, stderr: String },
    /// The simulation did not finish in time (an endless loop in the kernel?).
    #[error("simulation of kernel `{entry}` timed out after {timeout:?}")]
    Timeout { entry: String, timeout: Duration },
    /// The arguments do not fit the request (e.g. an empty entry name).
    #[error("invalid simulation request: {0}")]
    BadRequest(String),
    /// Reading or writing the cache or temporary files failed.
    #[error("simulation I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl SimError {
    /// The simulation's own message for [`SimError::Kernel`], else the
    /// display text.
    pub fn message(&self) -> String {
        match self {
            SimError::Kernel { message, .. } => message.clone(),
            other => other.to_string(),
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SimError + '_ {
    move |source| SimError::Io { path: path.to_path_buf(), source }
}

/// A kernel to run under the simulation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimKernel {
    /// Full text of the kernel `.cpp` (it includes `kernel_operator.h`).
    pub source: String,
    /// Name of the `extern "C"` entry function.
    pub entry: String,
    /// Target SoC; selects capacities and available features.
    pub soc: Soc,
    /// Number of blocks (cores) to launch.
    pub block_dim: u32,
}

impl SimKernel {
    pub fn new(source: impl Into<String>, entry: impl Into<String>, soc: Soc, block_dim: u32) -> Self {
        SimKernel { source: source.into(), entry: entry.into(), soc, block_dim }
    }

    /// Launch with `args` in parameter order; returns the Output/InOut buffers.
    pub fn run(&self, args: &[SimArg]) -> Result<Vec<Vec<u8>>, SimError> {
        let named: Vec<(String, SimArg)> =
            args.iter().enumerate().map(|(i, a)| (format!("arg{i}"), a.clone())).collect();
        let refs: Vec<(&str, SimArg)> = named.iter().map(|(n, a)| (n.as_str(), a.clone())).collect();
        Ok(self.run_detailed(&refs, default_timeout())?.outputs)
    }

    /// Launch with named arguments (names appear in error messages) and an
    /// explicit timeout; also returns the simulation's warnings.
    pub fn run_detailed(&self, args: &[(&str, SimArg)], timeout: Duration) -> Result<SimRun, SimError> {
        Ok(self.run_inner(args, timeout, None)?.0)
    }

    /// Launch under the per-pipe timing model with `params` (see
    /// [`crate::timing`]); returns the outputs and the launch's timing.
    pub fn run_timed(
        &self,
        args: &[(&str, SimArg)],
        params: &TimingParams,
        timeout: Duration,
    ) -> Result<(SimRun, SimTiming), SimError> {
        let (run, stderr) = self.run_inner(args, timeout, Some(params))?;
        let timing =
            stderr.lines().find_map(|l| l.strip_prefix("panguc-sim: timing: ")).and_then(SimTiming::parse).ok_or_else(
                || SimError::Crashed {
                    entry: self.entry.clone(),
                    status: "no timing summary".into(),
                    stderr: stderr.clone(),
                },
            )?;
        Ok((run, timing))
    }

    fn run_inner(
        &self,
        args: &[(&str, SimArg)],
        timeout: Duration,
        timing: Option<&TimingParams>,
    ) -> Result<(SimRun, String), SimError> {
        let exe = self.compile()?;
        let dir = tempfile::Builder::new().prefix("panguc-sim-run").tempdir().map_err(io_err(&std::env::temp_dir()))?;
        let args_path = dir.path().join("args.bin");
        let out_path = dir.path().join("out.bin");
        std::fs::write(&args_path, encode_args(args)).map_err(io_err(&args_path))?;

        let mut child = Command::new(&exe)
            .arg(&args_path)
            .arg(&out_path)
            .arg(self.block_dim.to_string())
            .args(timing.map(TimingParams::to_arg))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io_err(&exe))?;
        // Drain the pipes on threads so a chatty kernel cannot block on a full pipe.
        let mut so = child.stdout.take().expect("piped stdout");
        let mut se = child.stderr.take().expect("piped stderr");
        let t_out = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = so.read_to_string(&mut s);
            s
        });
        let t_err = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = se.read_to_string(&mut s);
            s
        });
        let start = Instant::now();
        let status = loop {
            match child.try_wait().map_err(io_err(&exe))? {
                Some(st) => break st,
                None if start.elapsed() > timeout => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(SimError::Timeout { entry: self.entry.clone(), timeout });
                }
                None => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        let stdout = t_out.join().unwrap_or_default();
        let stderr = t_err.join().unwrap_or_default();
        let warnings: Vec<String> =
            stderr.lines().filter_map(|l| l.strip_prefix("panguc-sim: warning: ")).map(str::to_string).collect();
        match status.code() {
            Some(0) => {
                let bytes = std::fs::read(&out_path).map_err(io_err(&out_path))?;
                let outputs = decode_outputs(&bytes).ok_or_else(|| SimError::Crashed {
                    entry: self.entry.clone(),
                    status: "malformed output file".into(),
                    stderr: stderr.clone(),
                })?;
                let expected = args.iter().filter(|(_, a)| a.is_returned()).count();
                if outputs.len() != expected {
                    return Err(SimError::Crashed {
                        entry: self.entry.clone(),
                        status: format!("{} outputs returned, {expected} expected", outputs.len()),
                        stderr,
                    });
                }
                if !stdout.is_empty() {
                    tracing::debug!(entry = %self.entry, "kernel stdout:\n{stdout}");
                }
                Ok((SimRun { outputs, warnings }, stderr))
            }
            Some(3) => {
                let message = parse_error_message(&stderr).unwrap_or_else(|| stderr.trim().to_string());
                Err(SimError::Kernel {
                    entry: self.entry.clone(),
                    soc: self.soc,
                    block: parse_block(&message),
                    message,
                })
            }
            Some(2) => Err(SimError::BadRequest(stderr.trim().to_string())),
            _ => Err(SimError::Crashed {
                entry: self.entry.clone(),
                status: exit_description(&status),
                stderr: format!("{stderr}{stdout}"),
            }),
        }
    }

    /// Compile (or fetch from the cache) the simulation executable and return
    /// its path. `run` calls this; calling it first separates compile time.
    pub fn compile(&self) -> Result<PathBuf, SimError> {
        if !is_c_identifier(&self.entry) {
            return Err(SimError::BadRequest(format!("entry `{}` is not a C identifier", self.entry)));
        }
        if self.block_dim == 0 {
            return Err(SimError::BadRequest("block_dim must be >= 1".into()));
        }
        let cxx = cxx();
        let driver = driver_source(&self.source, &self.entry);
        let mut h = Sha256::new();
        for part in [HARNESS_VERSION, cxx.as_str(), self.soc.macro_value(), &CXX_FLAGS.join(" "), driver.as_str()] {
            h.update(part.as_bytes());
            h.update([0u8]);
        }
        h.update(headers_hash().as_bytes());
        let key = hex::encode(&h.finalize()[..12]);
        let dir = cache_root().join(format!("{}-{key}", self.entry));
        let exe = dir.join("kernel_sim");
        if exe.is_file() {
            tracing::debug!(entry = %self.entry, path = %exe.display(), "simulation executable cache hit");
            return Ok(exe);
        }
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let src_path = dir.join("driver.cpp");
        write_atomic(&src_path, driver.as_bytes())?;
        let include = materialized_include_dir()?;
        let tmp_exe = dir.join(format!("kernel_sim.tmp{}", unique_suffix()));
        let started = Instant::now();
        let out = Command::new(&cxx)
            .args(CXX_FLAGS)
            .arg(format!("-DPANGUC_SIM_SOC={}", self.soc.macro_value()))
            .arg("-I")
            .arg(&include)
            .arg("-o")
            .arg(&tmp_exe)
            .arg(&src_path)
            .output()
            .map_err(|source| SimError::CompilerUnavailable { cxx: cxx.clone(), source })?;
        if !out.status.success() {
            let _ = std::fs::remove_file(&tmp_exe);
            return Err(SimError::Compile {
                entry: self.entry.clone(),
                soc: self.soc,
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        std::fs::rename(&tmp_exe, &exe).map_err(io_err(&exe))?;
        tracing::debug!(entry = %self.entry, soc = %self.soc, secs = started.elapsed().as_secs_f32(), "compiled simulation");
        Ok(exe)
    }
}

/// Compile `source` with `g++ -fsyntax-only` against the simulation headers
/// for `soc` (fast feedback, no executable).
pub fn syntax_check(source: &str, soc: Soc) -> Result<(), SimError> {
    let include = materialized_include_dir()?;
    let dir = tempfile::Builder::new().prefix("panguc-sim-check").tempdir().map_err(io_err(&std::env::temp_dir()))?;
    let path = dir.path().join("kernel.cpp");
    std::fs::write(&path, source).map_err(io_err(&path))?;
    let cxx = cxx();
    let out = Command::new(&cxx)
        .args(CXX_FLAGS)
        .arg("-fsyntax-only")
        .arg(format!("-DPANGUC_SIM_SOC={}", soc.macro_value()))
        .arg("-I")
        .arg(&include)
        .arg(&path)
        .output()
        .map_err(|source| SimError::CompilerUnavailable { cxx: cxx.clone(), source })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(SimError::Compile {
            entry: "kernel.cpp".into(),
            soc,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

fn cxx() -> String {
    std::env::var("PANGUC_SIM_CXX").unwrap_or_else(|_| "g++".to_string())
}

fn default_timeout() -> Duration {
    let secs = std::env::var("PANGUC_SIM_TIMEOUT_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(300);
    Duration::from_secs(secs)
}

fn cache_root() -> PathBuf {
    std::env::var_os("PANGUC_SIM_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("panguc-sim-cache"))
}

fn headers_hash() -> String {
    let mut h = Sha256::new();
    for (name, text) in SIM_HEADERS {
        h.update(name.as_bytes());
        h.update([0u8]);
        h.update(text.as_bytes());
        h.update([0u8]);
    }
    hex::encode(&h.finalize()[..12])
}

/// The embedded headers written once to `<cache>/include-<hash>/`. Used for
/// every compile so that the cache key (which hashes the embedded text)
/// always matches the headers actually compiled.
fn materialized_include_dir() -> Result<PathBuf, SimError> {
    let dir = cache_root().join(format!("include-{}", headers_hash()));
    if dir.join(".complete").is_file() {
        return Ok(dir);
    }
    let parent = cache_root();
    std::fs::create_dir_all(&parent).map_err(io_err(&parent))?;
    let tmp = parent.join(format!("include-tmp{}", unique_suffix()));
    for (name, text) in SIM_HEADERS {
        let p = tmp.join(name);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).map_err(io_err(d))?;
        }
        std::fs::write(&p, text).map_err(io_err(&p))?;
    }
    let marker = tmp.join(".complete");
    std::fs::write(&marker, b"").map_err(io_err(&marker))?;
    if std::fs::rename(&tmp, &dir).is_err() {
        // Another process won the race; its copy is identical.
        let _ = std::fs::remove_dir_all(&tmp);
        if !dir.join(".complete").is_file() {
            return Err(SimError::Io {
                path: dir,
                source: std::io::Error::other("could not create the simulation include directory"),
            });
        }
    }
    Ok(dir)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), SimError> {
    let tmp = path.with_extension(format!("tmp{}", unique_suffix()));
    let mut f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{}-{nanos}", std::process::id())
}

fn is_c_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// The translation unit compiled for a kernel: the kernel source (with
/// `#line` so diagnostics and simulation errors name `<entry>.cpp`), then a
/// `main` that hands the entry to `panguc_sim::DriverMain`.
fn driver_source(source: &str, entry: &str) -> String {
    let mut s = String::with_capacity(source.len() + 256);
    s.push_str("// Generated by panguc-codegen-ascendc (sim harness).\n");
    s.push_str(&format!("#line 1 \"{entry}.cpp\"\n"));
    s.push_str(source);
    if !source.ends_with('\n') {
        s.push('\n');
    }
    s.push_str("#line 1 \"panguc_sim_driver.cpp\"\n#include \"sim_launch.h\"\n");
    s.push_str(&format!(
        "int main(int argc, char** argv) {{ return panguc_sim::DriverMain(argc, argv, &{entry}); }}\n"
    ));
    s
}

fn encode_args(args: &[(&str, SimArg)]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(b"PGSIMA01");
    v.extend_from_slice(&(args.len() as u32).to_le_bytes());
    for (name, a) in args {
        v.push(a.kind());
        v.extend_from_slice(&(name.len() as u32).to_le_bytes());
        v.extend_from_slice(name.as_bytes());
        v.extend_from_slice(&(a.len() as u64).to_le_bytes());
        v.extend_from_slice(a.data());
    }
    v
}

fn decode_outputs(b: &[u8]) -> Option<Vec<Vec<u8>>> {
    let rest = b.strip_prefix(b"PGSIMO01")?;
    let (n, mut rest) = rest.split_first_chunk::<4>()?;
    let n = u32::from_le_bytes(*n) as usize;
    let mut outs = Vec::with_capacity(n);
    for _ in 0..n {
        let (len, r) = rest.split_first_chunk::<8>()?;
        let len = usize::try_from(u64::from_le_bytes(*len)).ok()?;
        if r.len() < len {
            return None;
        }
        outs.push(r[..len].to_vec());
        rest = &r[len..];
    }
    rest.is_empty().then_some(outs)
}

fn parse_error_message(stderr: &str) -> Option<String> {
    stderr.lines().find_map(|l| l.strip_prefix("panguc-sim: error: ")).map(str::to_string)
}

fn parse_block(message: &str) -> Option<u32> {
    let rest = message.strip_prefix("[block ")?;
    rest.split_whitespace().next()?.parse().ok()
}

fn exit_description(status: &std::process::ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            let name = match sig {
                6 => " (SIGABRT)",
                8 => " (SIGFPE)",
                11 => " (SIGSEGV)",
                _ => "",
            };
            return format!("killed by signal {sig}{name}");
        }
    }
    match status.code() {
        Some(c) => format!("exit status {c}"),
        None => "unknown exit status".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_embedded_and_match_the_source_tree() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("sim/include");
        for (name, text) in sim_headers() {
            let on_disk = std::fs::read_to_string(dir.join(name)).unwrap();
            assert_eq!(on_disk, text, "{name} differs from the embedded copy");
        }
        assert!(sim_include_dir().unwrap().join("kernel_operator.h").is_file());
    }

    #[test]
    fn wire_format_round_trip() {
        let args = [("x", SimArg::Input(vec![1, 2, 3])), ("y", SimArg::Output(5)), ("t", SimArg::Tiling(vec![9]))];
        let enc = encode_args(&args);
        assert_eq!(&enc[..8], b"PGSIMA01");
        assert_eq!(u32::from_le_bytes(enc[8..12].try_into().unwrap()), 3);
        let mut out = b"PGSIMO01".to_vec();
        out.extend_from_slice(&2u32.to_le_bytes());
        out.extend_from_slice(&3u64.to_le_bytes());
        out.extend_from_slice(&[7, 8, 9]);
        out.extend_from_slice(&0u64.to_le_bytes());
        assert_eq!(decode_outputs(&out), Some(vec![vec![7, 8, 9], vec![]]));
        out.push(0);
        assert_eq!(decode_outputs(&out), None);
    }

    #[test]
    fn error_lines_are_parsed() {
        let stderr = "panguc-sim: warning: w\npanguc-sim: error: [block 3 of 8] k.cpp:12: DeQue on empty queue\n";
        let msg = parse_error_message(stderr).unwrap();
        assert_eq!(msg, "[block 3 of 8] k.cpp:12: DeQue on empty queue");
        assert_eq!(parse_block(&msg), Some(3));
        assert_eq!(parse_block("no block"), None);
    }

    #[test]
    fn entry_names_are_validated() {
        assert!(is_c_identifier("add_custom"));
        assert!(!is_c_identifier("1x"));
        assert!(!is_c_identifier("a-b"));
        let k = SimKernel::new("", "bad name", Soc::Ascend910B, 1);
        assert!(matches!(k.compile(), Err(SimError::BadRequest(_))));
    }

    #[test]
    fn driver_keeps_kernel_line_numbers() {
        let d = driver_source("int x;", "k");
        assert!(d.contains("#line 1 \"k.cpp\"\nint x;\n#line 1 \"panguc_sim_driver.cpp\""));
        assert!(d.contains("DriverMain(argc, argv, &k)"));
    }
}
