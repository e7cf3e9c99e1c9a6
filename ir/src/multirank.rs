//! The multi-rank reference interpreter: N ranks, each running its own
//! (partitioned) module, exchanging tensors through a [`Communicator`].
//!
//! This is the definition of what the collective ops mean across devices
//! (the single-process [`crate::interp`] treats a collective as the
//! identity over one participant). Every rank runs on its own thread; a
//! collective blocks until every member of its `group` has reached it.
//! Members of a group must issue their collectives over that group in the
//! same order (what SPMD programs and HCCL require too).
//!
//! Semantics over a group of `n` members, member `i` holding `x_i`:
//! * `all_reduce`: every member gets `sum_i x_i` (summed in group order,
//!   so every member gets bit-identical values);
//! * `all_gather{axis}`: every member gets `concat(x_0, ..., x_{n-1}, axis)`;
//! * `reduce_scatter{axis}`: member `j` gets the `j`-th of `n` equal chunks
//!   of `sum_i x_i` along `axis`;
//! * `all_to_all{axis}`: member `j` gets `concat_i(chunk_j(x_i), axis)`.

use crate::graph::Module;
use crate::interp::Interpreter;
use crate::kernels as k;
use crate::op::CollectiveKind;
use crate::tensor::Tensor;
use crate::WeightSource;
use anyhow::{anyhow, bail, ensure, Result};
use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Moves whole tensors between ranks. The one primitive every collective
/// of the reference semantics is built from: each member of `group`
/// contributes `x` and receives every member's contribution, in group
/// order. A real communication library implements the collectives
/// directly (see `panguc_runtime::collective`); this is the definition.
pub trait Communicator: Send + Sync {
    fn exchange(&self, rank: usize, group: &[usize], x: &Tensor) -> Result<Vec<Tensor>>;
    /// Called by a rank that failed, so the others stop waiting for it.
    fn abort(&self, reason: &str);
}

/// Evaluate one collective for `rank` over `group`.
pub fn collective(
    comm: &dyn Communicator,
    rank: usize,
    kind: CollectiveKind,
    group: &[usize],
    axis: usize,
    x: &Tensor,
) -> Result<Tensor> {
    let pos = group.iter().position(|g| *g == rank).ok_or_else(|| anyhow!("rank {rank} is not in group {group:?}"))?;
    let n = group.len();
    let parts = comm.exchange(rank, group, x)?;
    ensure!(parts.iter().all(|p| p.shape == x.shape), "collective over {group:?}: members hold different shapes");
    let sum = || -> Result<Tensor> {
        let mut acc = parts[0].clone();
        for p in &parts[1..] {
            acc = k::binary(&acc, p, |a, b| a + b).map_err(|e| anyhow!(e))?;
        }
        Ok(acc)
    };
    let chunk = |t: &Tensor, j: usize| -> Result<Tensor> {
        let len = t.shape[axis];
        ensure!(
            len.is_multiple_of(n),
            "collective over {group:?}: axis {axis} of length {len} does not split {n} ways"
        );
        Ok(k::slice(t, axis, j * len / n, (j + 1) * len / n))
    };
    Ok(match kind {
        CollectiveKind::AllReduce => sum()?,
        CollectiveKind::AllGather => k::concat(&parts.iter().collect::<Vec<_>>(), axis),
        CollectiveKind::ReduceScatter => chunk(&sum()?, pos)?,
        CollectiveKind::AllToAll => {
            let mine = parts.iter().map(|p| chunk(p, pos)).collect::<Result<Vec<_>>>()?;
            k::concat(&mine.iter().collect::<Vec<_>>(), axis)
        }
    })
}

/// An in-process communicator: ranks are threads of one process.
pub struct InProcessComm {
    state: Mutex<CommState>,
    cv: Condvar,
    timeout: Duration,
}

/// One collective in flight: the ranks' contributions (by position in the
/// group) and how many ranks have yet to read the result.
type Slot = (Vec<Option<Tensor>>, usize);

#[derive(Default)]
struct CommState {
    /// (group, sequence number) -> the collective in flight.
    slots: HashMap<(Vec<usize>, u64), Slot>,
    /// (rank, group) -> collectives this rank has issued over this group.
    issued: HashMap<(usize, Vec<usize>), u64>,
    aborted: Option<String>,
}

impl InProcessComm {
    pub fn new() -> Self {
        InProcessComm { state: Mutex::new(CommState::default()), cv: Condvar::new(), timeout: Duration::from_secs(120) }
    }
}

impl Default for InProcessComm {
    fn default() -> Self {
        Self::new()
    }
}

impl Communicator for InProcessComm {
    fn exchange(&self, rank: usize, group: &[usize], x: &Tensor) -> Result<Vec<Tensor>> {
        let pos =
            group.iter().position(|g| *g == rank).ok_or_else(|| anyhow!("rank {rank} is not in group {group:?}"))?;
        let n = group.len();
        let mut st = self.state.lock().map_err(|_| anyhow!("communicator poisoned"))?;
        let seq = {
            let c = st.issued.entry((rank, group.to_vec())).or_insert(0);
            *c += 1;
            *c - 1
        };
        let key = (group.to_vec(), seq);
        st.slots.entry(key.clone()).or_insert_with(|| (vec![None; n], n)).0[pos] = Some(x.clone());
        self.cv.notify_all();
        loop {
            if let Some(why) = &st.aborted {
                bail!("collective over {group:?} aborted: {why}");
            }
            let slot = st.slots.get(&key).expect("slot lives until its last reader");
            if slot.0.iter().all(Option::is_some) {
                break;
            }
            let (next, timeout) =
                self.cv.wait_timeout(st, self.timeout).map_err(|_| anyhow!("communicator poisoned"))?;
            st = next;
            if timeout.timed_out() {
                let slot = &st.slots[&key];
                let missing: Vec<usize> =
                    slot.0.iter().enumerate().filter(|(_, p)| p.is_none()).map(|(i, _)| group[i]).collect();
                bail!("collective #{seq} over {group:?}: ranks {missing:?} never arrived");
            }
        }
        let slot = st.slots.get_mut(&key).expect("present");
        let parts = slot.0.iter().map(|p| p.clone().expect("complete")).collect();
        slot.1 -= 1;
        if slot.1 == 0 {
            st.slots.remove(&key);
        }
        Ok(parts)
    }

    fn abort(&self, reason: &str) {
        if let Ok(mut st) = self.state.lock() {
            st.aborted.get_or_insert_with(|| reason.to_string());
        }
        self.cv.notify_all();
    }
}

/// Run `work(rank)` on one thread per rank; if any rank fails the
/// communicator is aborted (so no rank waits forever) and the first error
/// in rank order is returned.
pub fn run_ranks<T: Send>(
    n: usize,
    comm: &dyn Communicator,
    work: impl Fn(usize) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let results: Vec<Result<T>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|r| {
                let work = &work;
                s.spawn(move || {
                    let out = work(r);
                    if let Err(e) = &out {
                        comm.abort(&format!("rank {r} failed: {e:#}"));
                    }
                    out
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("a rank thread panicked")))).collect()
    });
    // Prefer a rank's own error over the "aborted" errors it caused.
    let mut first: Option<anyhow::Error> = None;
    let mut out = Vec::with_capacity(n);
    for (r, res) in results.into_iter().enumerate() {
        match res {
            Ok(v) => out.push(v),
            Err(e) => {
                let aborted = format!("{e:#}").contains("aborted");
                if first.is_none() || (!aborted && format!("{:#}", first.as_ref().unwrap()).contains("aborted")) {
                    first = Some(e.context(format!("rank {r}")));
                }
            }
        }
    }
    match first {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// A sequence's state across prefill and decode on N ranks: each rank's
/// module is run by its own interpreter with its own KV cache (shaped by
/// the rank's entry signature, so attention-sharded caches work too).
pub struct MultiRankSession<'a> {
    modules: &'a [Module],
    weights: &'a (dyn WeightSource + Sync),
    comm: Arc<InProcessComm>,
    caches: Vec<Vec<Tensor>>,
    past: usize,
    /// Largest relative difference seen between rank 0's logits and any
    /// other rank's (they should agree: every rank computes the logits).
    pub rank_disagreement: f32,
}

impl<'a> MultiRankSession<'a> {
    pub fn new(modules: &'a [Module], weights: &'a (dyn WeightSource + Sync)) -> Result<Self> {
        ensure!(!modules.is_empty(), "no ranks");
        let mut caches = vec![];
        for m in modules {
            let f = m.entry_fn();
            // Inputs: ids, positions, then the caches.
            let mut cs = vec![];
            for p in f.input_params().skip(2) {
                let ty = f.ty(p.value);
                let mut shape = vec![0];
                for d in &ty.shape[1..] {
                    shape.push(
                        d.as_const()
                            .ok_or_else(|| anyhow!("cache input %{} is not [past, const...]", f.name_of(p.value)))?,
                    );
                }
                cs.push(Tensor::zeros(shape));
            }
            caches.push(cs);
        }
        Ok(MultiRankSession {
            modules,
            weights,
            comm: Arc::new(InProcessComm::new()),
            caches,
            past: 0,
            rank_disagreement: 0.0,
        })
    }

    pub fn ranks(&self) -> usize {
        self.modules.len()
    }

    pub fn past(&self) -> usize {
        self.past
    }

    /// Process `tokens` on every rank; returns rank 0's logits.
    pub fn forward(&mut self, tokens: &[i64]) -> Result<Tensor> {
        ensure!(!tokens.is_empty(), "no tokens to process");
        let n = tokens.len();
        let positions: Vec<i64> = (self.past..self.past + n).map(|p| p as i64).collect();
        let comm = self.comm.clone();
        let (modules, weights, caches) = (self.modules, self.weights, &self.caches);
        let outs = run_ranks(self.modules.len(), comm.as_ref(), |r| {
            let interp = Interpreter::for_rank(r, &modules[r], weights, comm.as_ref());
            let mut inputs = vec![Tensor::i64(vec![n], tokens.to_vec()), Tensor::i64(vec![n], positions.clone())];
            inputs.extend(caches[r].iter().cloned());
            interp.run_entry(&inputs)
        })?;
        let mut logits = None;
        for (r, out) in outs.into_iter().enumerate() {
            let mut it = out.into_iter();
            let l = it.next().ok_or_else(|| anyhow!("rank {r} returned no logits"))?;
            self.caches[r] = it.collect();
            match &logits {
                None => logits = Some(l),
                Some(l0) => self.rank_disagreement = self.rank_disagreement.max(l0.max_rel_diff(&l, 1e-3)),
            }
        }
        self.past += n;
        Ok(logits.expect("at least one rank"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32]) -> Tensor {
        Tensor::f32(vec![1, v.len()], v.to_vec())
    }

    #[test]
    fn collectives_over_groups_match_their_definitions() {
        let comm = InProcessComm::new();
        let out = run_ranks(4, &comm, |r| {
            let x = t(&[r as f32, 10.0 * r as f32, 1.0, 2.0]);
            let all = [0, 1, 2, 3];
            let pair = if r < 2 { vec![0, 1] } else { vec![2, 3] };
            Ok(vec![
                collective(&comm, r, CollectiveKind::AllReduce, &all, 0, &x)?,
                collective(&comm, r, CollectiveKind::AllGather, &pair, 0, &x)?,
                collective(&comm, r, CollectiveKind::ReduceScatter, &all, 1, &x)?,
                collective(&comm, r, CollectiveKind::AllToAll, &pair, 1, &x)?,
            ])
        })
        .unwrap();
        assert_eq!(out[3][0].as_f32(), &[6.0, 60.0, 4.0, 8.0]);
        assert_eq!(out[2][1].shape, vec![2, 4]);
        assert_eq!(out[2][1].as_f32(), &[2.0, 20.0, 1.0, 2.0, 3.0, 30.0, 1.0, 2.0]);
        for r in 0..4 {
            assert_eq!(out[r][2].as_f32(), &[[6.0, 60.0, 4.0, 8.0][r]]);
        }
        // all_to_all over {2, 3}: rank 2 gets chunk 0 of both, rank 3 chunk 1.
        assert_eq!(out[2][3].as_f32(), &[2.0, 20.0, 3.0, 30.0]);
        assert_eq!(out[3][3].as_f32(), &[1.0, 2.0, 1.0, 2.0]);
    }

    #[test]
    fn a_failing_rank_aborts_the_others() {
        let comm = InProcessComm::new();
        let err = run_ranks(3, &comm, |r| {
            if r == 1 {
                bail!("boom");
            }
            collective(&comm, r, CollectiveKind::AllReduce, &[0, 1, 2], 0, &t(&[1.0]))
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("boom"), "{err:#}");
    }
}

#[cfg(test)]
mod no_communicator_tests {
    use crate::interp::eval_pure;
    use crate::op::{CollectiveKind, Op};
    use crate::Tensor;

    #[test]
    fn every_collective_kind_without_a_communicator_is_an_error() {
        let x = Tensor::f32(vec![2, 4], vec![1.0; 8]);
        for kind in [
            CollectiveKind::AllReduce,
            CollectiveKind::AllGather,
            CollectiveKind::ReduceScatter,
            CollectiveKind::AllToAll,
        ] {
            let op = Op::Collective { kind, group: vec![0, 1], axis: 1 };
            let err = eval_pure(&op, &[&x]).expect_err("no communicator");
            assert!(err.contains("needs a communicator") && err.contains("[0, 1]"), "{kind:?}: {err}");
        }
    }
}
