//! Host <-> device element encodings (little-endian) and launching one
//! device kernel under the simulation.

use crate::emit::{DeviceKernel, Env};
use crate::sim::{SimArg, SimKernel};
use crate::target::{DevType, Target};
use anyhow::{Context, Result};

/// Encode f32 values as `t` (RNE rounding for f16/bf16).
pub fn encode(t: DevType, v: &[f32]) -> Vec<u8> {
    match t {
        DevType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DevType::F16 => v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
        DevType::BF16 => v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
        DevType::I64 => v.iter().flat_map(|x| (*x as i64).to_le_bytes()).collect(),
        DevType::I32 => v.iter().flat_map(|x| (*x as i32).to_le_bytes()).collect(),
        DevType::I8 => v.iter().map(|x| (*x as i8) as u8).collect(),
    }
}

pub fn encode_i64(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn encode_i32(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Int8 values as device bytes (values outside the int8 range are a caller bug).
pub fn encode_i8(v: &[i64]) -> Vec<u8> {
    v.iter().map(|&x| i8::try_from(x).expect("int8 value") as u8).collect()
}

pub fn decode_i8(b: &[u8]) -> Vec<i64> {
    b.iter().map(|&x| i64::from(x as i8)).collect()
}

pub fn decode_i32(b: &[u8]) -> Vec<i64> {
    b.chunks_exact(4).map(|c| i64::from(i32::from_le_bytes(c.try_into().expect("4 bytes")))).collect()
}

/// Decode device bytes of type `t` to f32.
pub fn decode(t: DevType, b: &[u8]) -> Vec<f32> {
    match t {
        DevType::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect(),
        DevType::F16 => b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        DevType::BF16 => b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        DevType::I64 => decode_i64(b).into_iter().map(|x| x as f32).collect(),
        DevType::I32 => b.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as f32).collect(),
        DevType::I8 => b.iter().map(|&x| x as i8 as f32).collect(),
    }
}

pub fn decode_i64(b: &[u8]) -> Vec<i64> {
    b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()
}

/// Round f32 values through `t` (what a device buffer of that type holds).
pub fn round_through(t: DevType, v: &[f32]) -> Vec<f32> {
    decode(t, &encode(t, v))
}

/// Launch `dk` under the simulation for the sizes in `env`, with one
/// argument per kernel parameter (workspace and tiling are appended).
/// Returns the Output/InOut buffers in parameter order.
pub fn run_sim(dk: &DeviceKernel, target: Target, env: &Env, mut args: Vec<SimArg>) -> Result<Vec<Vec<u8>>> {
    let tiling = dk.tiling_bytes(env)?;
    let block_dim = u32::try_from(dk.block_dim.eval(env)?)?;
    args.push(SimArg::Workspace(0));
    args.push(SimArg::Tiling(tiling));
    let k = SimKernel::new(dk.sim_source(), dk.entry.clone(), target.soc(), block_dim);
    k.run(&args)
        .with_context(|| format!("simulating `{}` on {target} (tokens {}, past {})", dk.entry, env.tokens, env.past))
}

/// Run the device kernels of one program kernel in launch order under the
/// simulation. `args[i]` holds program-kernel argument `i` in device bytes
/// (outputs pre-sized to their extent); Output and InOut arguments are
/// replaced by what the kernels wrote. Intermediate GM buffers
/// ([`crate::emit::DeviceKernels::temps`]) are allocated here.
pub fn run_kernels(dks: &crate::emit::DeviceKernels, target: Target, env: &Env, args: &mut [Vec<u8>]) -> Result<()> {
    if dks.host.is_some() {
        anyhow::bail!("a collective launch needs a communicator (see run_collective_kernels)");
    }
    let mut temps = alloc_temps(dks, env)?;
    run_device_kernels(&dks.kernels, target, env, args, &mut temps)
}

/// The host's collective call of [`run_collective_kernels`]: `send` holds
/// this rank's contiguous per-member blocks, `recv` (pre-sized) receives.
pub type CollectiveCall<'a> = dyn FnMut(&crate::emit::HostCollective, &[u8], &mut [u8]) -> Result<()> + 'a;

/// A collective launch as the host program runs it: the packing kernels,
/// the communication call (`call`), then the unpacking kernels.
pub fn run_collective_kernels(
    dks: &crate::emit::DeviceKernels,
    target: Target,
    env: &Env,
    args: &mut [Vec<u8>],
    call: &mut CollectiveCall,
) -> Result<()> {
    use crate::emit::ArgRef;
    let host = dks.host.as_ref().ok_or_else(|| anyhow::anyhow!("not a collective launch"))?;
    let mut temps = alloc_temps(dks, env)?;
    run_device_kernels(&dks.kernels[..host.pre], target, env, args, &mut temps)?;
    let send = match host.send {
        ArgRef::Orig(i) => args[i].clone(),
        ArgRef::Temp(j) => temps[j].clone(),
    };
    let recv = match host.recv {
        ArgRef::Orig(i) => &mut args[i],
        ArgRef::Temp(j) => &mut temps[j],
    };
    call(host, &send, recv)?;
    run_device_kernels(&dks.kernels[host.pre..], target, env, args, &mut temps)
}

fn alloc_temps(dks: &crate::emit::DeviceKernels, env: &Env) -> Result<Vec<Vec<u8>>> {
    dks.temps.iter().map(|t| Ok(vec![0u8; usize::try_from(t.elems.eval(env)? * t.dtype.size())?])).collect()
}

fn run_device_kernels(
    kernels: &[DeviceKernel],
    target: Target,
    env: &Env,
    args: &mut [Vec<u8>],
    temps: &mut [Vec<u8>],
) -> Result<()> {
    use crate::emit::{ArgRef, Role};
    for dk in kernels {
        let mut sim_args = Vec::with_capacity(dk.params.len());
        for p in &dk.params {
            let buf = match p.arg {
                ArgRef::Orig(i) => args.get(i).ok_or_else(|| anyhow::anyhow!("{}: no argument {i}", dk.entry))?,
                ArgRef::Temp(j) => &temps[j],
            };
            sim_args.push(match p.role {
                Role::Input => SimArg::Input(buf.clone()),
                Role::Output => SimArg::Output(buf.len()),
                Role::InOut => SimArg::InOut(buf.clone()),
            });
        }
        let mut outs = run_sim(dk, target, env, sim_args)?.into_iter();
        for p in dk.params.iter().filter(|p| p.role != Role::Input) {
            let o = outs.next().ok_or_else(|| anyhow::anyhow!("{}: missing output {}", dk.entry, p.name))?;
            match p.arg {
                ArgRef::Orig(i) => args[i] = o,
                ArgRef::Temp(j) => temps[j] = o,
            }
        }
    }
    Ok(())
}
