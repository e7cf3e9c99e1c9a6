//! The mixed batch every batched engine is checked with: each sequence of
//! a batch that exercises the scheduler (different prompt lengths, chunked
//! prefill, a stop token, different finishing steps, a sequence joining
//! mid-flight, preemption by recompute) must get the greedy tokens it gets
//! alone on the same engine kind, and logits within [`BATCH_TOL`].

use super::assert_close;
use panguc_runtime::{BatchEngine, FinishReason, Generation, Request, Sampling, Scheduler, SchedulerConfig};

/// Batch vs alone: the batch must not change a sequence's numerics.
pub const BATCH_TOL: f32 = 1e-5;
const FLOOR: f32 = 1e-3;

/// Makes a batched engine whose paged cache(s) hold this many blocks.
pub type MakeEngine<'m, 'a> = &'m mut dyn FnMut(usize) -> Box<dyn BatchEngine + 'a>;

pub fn greedy(prompt: Vec<i64>, max_new: usize) -> Request {
    Request { prompt, max_new_tokens: max_new, sampling: Sampling::default(), stop_tokens: vec![] }
}

/// Four greedy prompts of different lengths (3 to 11 tokens, ids below 256)
/// with different token budgets: the batch the quantized-package tests run.
pub fn four_prompts() -> Vec<Request> {
    vec![
        greedy((0..11).map(|i| (i * 37 + 5) % 256).collect(), 6),
        greedy(vec![1, 2, 3], 7),
        greedy(vec![200, 17], 4),
        greedy(vec![9, 8, 7, 6, 5, 4, 3], 5),
    ]
}

/// `r` alone: the scheduler with one sequence (the batch of one).
pub fn alone(make: MakeEngine<'_, '_>, block: usize, r: &Request) -> Generation {
    let cfg = SchedulerConfig::fitting_with(std::slice::from_ref(r), block);
    let mut e = make(cfg.num_blocks);
    Scheduler::run_all(cfg, vec![r.clone()], e.as_mut()).unwrap().remove(0)
}

pub fn assert_rows_close(got: &[Vec<f32>], want: &[Vec<f32>], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: rows");
    for (row, (x, y)) in got.iter().zip(want).enumerate() {
        let (x, y) =
            (panguc_ir::Tensor::f32(vec![x.len()], x.clone()), panguc_ir::Tensor::f32(vec![y.len()], y.clone()));
        assert_close(&x, &y, tol, FLOOR, &format!("{what} row {row}"));
    }
}

pub fn prompt(len: usize, seed: i64) -> Vec<i64> {
    (0..len as i64).map(|i| (i * 37 + seed) % 512).collect()
}

/// The mixed batch through the scheduler on one engine from `make`, with
/// KV blocks of `block` tokens (4: 8 blocks hold 32 of the ~60 tokens of
/// context, so sequences are preempted). Returns each sequence's
/// generation (in request order) and checks them against each run alone.
pub fn check_mixed_batch(what: &str, block: usize, make: MakeEngine<'_, '_>) -> Vec<Generation> {
    let mut stopping = greedy(vec![5, 5, 5, 5], 8);
    stopping.stop_tokens = vec![alone(make, block, &stopping).generated[2]];
    let first = vec![greedy(prompt(13, 5), 6), greedy(vec![1, 2, 3], 9), greedy(vec![400, 17], 3), stopping];
    let late = greedy(vec![9, 8, 7, 6, 5, 4, 3], 5);
    let cfg = SchedulerConfig { block_size: block, num_blocks: 8, max_seqs: 4, max_batch_tokens: 8 };
    let mut s = Scheduler::new(cfg.clone()).unwrap();
    let mut ids: Vec<_> = first.iter().map(|r| s.add(r.clone()).unwrap()).collect();
    let mut batch = make(cfg.num_blocks);
    let (mut steps, mut shared_with_late, mut widest) = (0, false, 0);
    while let Some(rep) = s.step(batch.as_mut()).unwrap() {
        steps += 1;
        if steps == 2 {
            ids.push(s.add(late.clone()).unwrap());
        }
        shared_with_late |= rep.scheduled.len() > 1 && rep.scheduled.iter().any(|c| c.0 == 4);
        widest = widest.max(rep.scheduled.len());
        assert!(rep.metadata.tokens() <= 8, "{what}: token budget");
    }
    assert!(shared_with_late, "{what}: the late sequence joined a running batch");
    assert!(widest >= 3, "{what}: steps ran several sequences at once (at most {widest})");
    assert!(s.stats().preemptions > 0, "{what}: {:?}", s.stats());
    assert_eq!(s.finish_reason(ids[3]), Some(FinishReason::Stop), "{what}");
    drop(batch);
    let requests: Vec<Request> = first.into_iter().chain([late]).collect();
    let mut out = vec![];
    for (i, (r, id)) in requests.iter().zip(ids).enumerate() {
        let got = s.take(id).unwrap();
        let want = alone(make, block, r);
        assert_eq!(got.generated, want.generated, "{what} sequence {i}: tokens");
        assert_eq!(got.prompt_logits.len(), r.prompt.len());
        assert_rows_close(&got.prompt_logits, &want.prompt_logits, BATCH_TOL, &format!("{what} sequence {i} prompt"));
        out.push(got);
    }
    out
}
