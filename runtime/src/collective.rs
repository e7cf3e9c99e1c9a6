//! Collective communication between the ranks of a partitioned package.
//!
//! [`Collective`] is the interface an engine uses for the IR's collective
//! ops, shaped like HCCL's C API (`HcclAllReduce(send, recv, count, type,
//! op, comm, stream)` etc.): flat buffers, element counts, a group of
//! global ranks, sum reduction. A binding to HCCL (or any other
//! communication library) implements it per device; [`InProcess`]
//! implements it for N workers that are threads of one process, so tests
//! and `panguc run` can execute any number of ranks on one machine.
//!
//! The reference semantics (what every implementation must match) are in
//! `panguc_ir::multirank`; [`InProcess`] also implements that module's
//! [`Communicator`], so the multi-rank reference interpreter and the
//! buffer-level interface share one transport.

use anyhow::{anyhow, ensure, Result};
use panguc_ir::multirank::{Communicator, InProcessComm};
use panguc_ir::Tensor;
use std::sync::Arc;

/// Collectives over f32 buffers, summing. `group` lists the participating
/// global ranks in order (the caller, `rank`, among them); every member
/// calls the same collectives over the same group in the same order.
pub trait Collective: Send + Sync {
    /// `recv = sum over members of send`; `send.len() == recv.len()`.
    fn all_reduce(&self, rank: usize, group: &[usize], send: &[f32], recv: &mut [f32]) -> Result<()>;
    /// `recv = concat over members of send` (member order); `recv.len() == n * send.len()`.
    fn all_gather(&self, rank: usize, group: &[usize], send: &[f32], recv: &mut [f32]) -> Result<()>;
    /// `recv = chunk[pos] of the sum`; `send.len() == n * recv.len()`.
    fn reduce_scatter(&self, rank: usize, group: &[usize], send: &[f32], recv: &mut [f32]) -> Result<()>;
    /// Chunk `j` of `send` goes to member `j`; `recv` holds chunk `pos` of
    /// every member, in member order (equal counts: HcclAlltoAll).
    fn all_to_all(&self, rank: usize, group: &[usize], send: &[f32], recv: &mut [f32]) -> Result<()>;
}

/// N workers in one process exchanging through shared memory.
#[derive(Clone, Default)]
pub struct InProcess {
    inner: Arc<InProcessComm>,
}

impl InProcess {
    pub fn new() -> Self {
        InProcess { inner: Arc::new(InProcessComm::new()) }
    }

    fn gather(&self, rank: usize, group: &[usize], send: &[f32]) -> Result<Vec<Vec<f32>>> {
        let parts = self.inner.exchange(rank, group, &Tensor::f32(vec![send.len()], send.to_vec()))?;
        ensure!(
            parts.iter().all(|p| p.numel() == send.len()),
            "collective over {group:?}: members sent different counts"
        );
        Ok(parts.into_iter().map(Tensor::into_f32).collect())
    }
}

fn position(rank: usize, group: &[usize]) -> Result<usize> {
    group.iter().position(|g| *g == rank).ok_or_else(|| anyhow!("rank {rank} is not in group {group:?}"))
}

impl Collective for InProcess {
    fn all_reduce(&self, rank: usize, group: &[usize], send: &[f32], recv: &mut [f32]) -> Result<()> {
        ensure!(send.len() == recv.len(), "all_reduce: send has {} elements, recv {}", send.len(), recv.len());
        let parts = self.gather(rank, group, send)?;
        recv.fill(0.0);
        for p in &parts {
            for (r, x) in recv.iter_mut().zip(p) {
                *r += x;
            }
        }
        Ok(())
    }

    fn all_gather(&self, rank: usize, group: &[usize], send: &[f32], recv: &mut [f32]) -> Result<()> {
        ensure!(
            recv.len() == group.len() * send.len(),
            "all_gather: recv must hold {} x {} elements",
            group.len(),
            send.len()
        );
        for (i, p) in self.gather(rank, group, send)?.iter().enumerate() {
            recv[i * send.len()..(i + 1) * send.len()].copy_from_slice(p);
        }
        Ok(())
    }

    fn reduce_scatter(&self, rank: usize, group: &[usize], send: &[f32], recv: &mut [f32]) -> Result<()> {
        ensure!(
            send.len() == group.len() * recv.len(),
            "reduce_scatter: send must hold {} x {} elements",
            group.len(),
            recv.len()
        );
        let pos = position(rank, group)?;
        let c = recv.len();
        let parts = self.gather(rank, group, send)?;
        recv.fill(0.0);
        for p in &parts {
            for (r, x) in recv.iter_mut().zip(&p[pos * c..(pos + 1) * c]) {
                *r += x;
            }
        }
        Ok(())
    }

    fn all_to_all(&self, rank: usize, group: &[usize], send: &[f32], recv: &mut [f32]) -> Result<()> {
        ensure!(
            send.len() == recv.len() && send.len().is_multiple_of(group.len()),
            "all_to_all: equal counts divisible by the group"
        );
        let pos = position(rank, group)?;
        let c = send.len() / group.len();
        for (i, p) in self.gather(rank, group, send)?.iter().enumerate() {
            recv[i * c..(i + 1) * c].copy_from_slice(&p[pos * c..(pos + 1) * c]);
        }
        Ok(())
    }
}

impl Communicator for InProcess {
    fn exchange(&self, rank: usize, group: &[usize], x: &Tensor) -> Result<Vec<Tensor>> {
        self.inner.exchange(rank, group, x)
    }

    fn abort(&self, reason: &str) {
        self.inner.abort(reason)
    }
}

impl crate::Engine for panguc_ir::multirank::MultiRankSession<'_> {
    fn forward(&mut self, tokens: &[i64]) -> Result<Tensor> {
        panguc_ir::multirank::MultiRankSession::forward(self, tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use panguc_ir::multirank::run_ranks;

    #[test]
    fn eight_workers_agree_with_the_reference_semantics() {
        let c = InProcess::new();
        let n = 8;
        let all: Vec<usize> = (0..n).collect();
        let out = run_ranks(n, &c, |r| {
            let send: Vec<f32> = (0..16).map(|i| (r * 100 + i) as f32).collect();
            let mut ar = vec![0.0; 16];
            c.all_reduce(r, &all, &send, &mut ar)?;
            let mut rs = vec![0.0; 2];
            c.reduce_scatter(r, &all, &send, &mut rs)?;
            let mut ag = vec![0.0; 2 * 16];
            let pair = [r / 2 * 2, r / 2 * 2 + 1];
            c.all_gather(r, &pair, &send, &mut ag)?;
            let mut a2a = vec![0.0; 16];
            c.all_to_all(r, &all, &send, &mut a2a)?;
            Ok((ar, rs, ag, a2a))
        })
        .unwrap();
        let total = |i: usize| (0..n).map(|r| (r * 100 + i) as f32).sum::<f32>();
        for (r, (ar, rs, ag, a2a)) in out.iter().enumerate() {
            assert_eq!(ar[5], total(5));
            assert_eq!(rs, &vec![total(2 * r), total(2 * r + 1)]);
            assert_eq!(ag[0], (r / 2 * 200) as f32);
            assert_eq!(ag[16], (r / 2 * 200 + 100) as f32);
            // Chunk r of member j is elements 2r, 2r+1 of j's buffer.
            assert_eq!(a2a[2 * 3], (300 + 2 * r) as f32);
        }
    }
}
