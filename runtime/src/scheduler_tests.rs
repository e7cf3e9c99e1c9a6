//! Scheduler tests against a deterministic fake engine that keeps a real
//! paged cache: it writes every new token through the step's slot mapping
//! and reads each sequence's context back through its block table, so a
//! wrong block table, slot or overwritten block changes the logits.

use super::*;
use crate::batch::ChunkLogits;
use std::collections::HashSet;

const VOCAB: usize = 11;

/// Logits of the last token of `context` (a function of the whole context).
fn fake_logits(context: &[i64]) -> Vec<f32> {
    let h = context.iter().enumerate().fold(17i64, |h, (i, t)| (h * 31 + (i as i64 + 1) * (t + 3)) % 1_000_003);
    (0..VOCAB as i64).map(|j| ((h * (j + 7) + j * j) % 97) as f32 / 8.0).collect()
}

#[derive(Default)]
struct PagedFake {
    /// (token, position) stored in each cache slot.
    slots: Vec<Option<(i64, usize)>>,
    steps: Vec<Vec<(SeqId, usize, usize)>>,
    released: Vec<SeqId>,
    /// Most logits rows asked of one chunk.
    max_rows: usize,
}

impl PagedFake {
    fn new(num_blocks: usize, block_size: usize) -> Self {
        PagedFake { slots: vec![None; num_blocks * block_size], ..Default::default() }
    }
}

impl BatchEngine for PagedFake {
    fn step(&mut self, chunks: &[StepChunk<'_>], meta: &StepMetadata) -> Result<Vec<ChunkLogits>> {
        meta.validate(self.slots.len() / meta.block_size)?;
        ensure!(meta.seqs() == chunks.len());
        let mut out = vec![];
        for (s, c) in chunks.iter().enumerate() {
            ensure!(meta.rows(s).len() == c.tokens.len());
            for (r, t) in meta.rows(s).zip(c.tokens) {
                self.slots[meta.slot_mapping[r] as usize] = Some((*t, meta.positions[r] as usize));
            }
            let ctx = meta.context_lens[s] as usize;
            let table = meta.blocks(s);
            let mut context = vec![];
            for p in 0..ctx {
                let slot = table[p / meta.block_size] as usize * meta.block_size + p % meta.block_size;
                let (tok, pos) = self.slots[slot].ok_or_else(|| anyhow::anyhow!("slot {slot} never written"))?;
                ensure!(pos == p, "slot {slot} holds position {pos}, not {p}: a block was overwritten");
                context.push(tok);
            }
            let rows: ChunkLogits = (c.past + c.logits_from..ctx).map(|p| fake_logits(&context[..=p])).collect();
            self.max_rows = self.max_rows.max(rows.len());
            out.push(rows);
        }
        self.steps.push(chunks.iter().map(|c| (c.seq, c.past, c.tokens.len())).collect());
        Ok(out)
    }

    fn release(&mut self, seq: SeqId) {
        self.released.push(seq);
    }
}

fn req(prompt: &[i64], max_new: usize) -> Request {
    Request { prompt: prompt.to_vec(), max_new_tokens: max_new, sampling: Sampling::default(), stop_tokens: vec![] }
}

fn cfg(num_blocks: usize, block_size: usize, max_seqs: usize, max_batch_tokens: usize) -> SchedulerConfig {
    SchedulerConfig { block_size, num_blocks, max_seqs, max_batch_tokens }
}

/// The request run on its own, in one big step per prefill.
fn alone(r: &Request) -> Generation {
    let c = cfg(64, 4, 1, 1000);
    let mut e = PagedFake::new(c.num_blocks, c.block_size);
    Scheduler::run_all(c, vec![r.clone()], &mut e).unwrap().remove(0)
}

fn assert_same_as_alone(requests: &[Request], got: &[Generation]) {
    for (i, (r, g)) in requests.iter().zip(got).enumerate() {
        let want = alone(r);
        assert_eq!(g.generated, want.generated, "sequence {i}: tokens differ from running it alone");
        assert_eq!(g.prompt_logits, want.prompt_logits, "sequence {i}: prompt logits differ");
        assert_eq!(g.prompt_logits.len(), r.prompt.len());
    }
}

#[test]
fn token_budget_is_respected_and_long_prompts_are_chunked() {
    let requests = vec![req(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 5), req(&[4, 4, 4], 6)];
    let c = cfg(32, 4, 8, 4);
    let mut e = PagedFake::new(32, 4);
    let got = Scheduler::run_all(c, requests.clone(), &mut e).unwrap();
    assert_same_as_alone(&requests, &got);
    for step in &e.steps {
        let tokens: usize = step.iter().map(|s| s.2).sum();
        assert!(tokens <= 4, "step of {tokens} tokens over a budget of 4: {step:?}");
    }
    // The 10-token prompt is prefilled in several chunks, the later ones
    // starting past 0 with more than one token.
    let chunks: Vec<_> = e.steps.iter().flatten().filter(|(s, past, _)| *s == 0 && *past < 10).collect();
    assert!(chunks.len() >= 3, "{chunks:?}");
    assert!(chunks.iter().any(|(_, past, n)| *past > 0 && *n > 1), "{chunks:?}");
    // Decodes of one sequence share steps with prefill chunks of the other.
    assert!(e.steps.iter().any(|s| s.len() == 2));
}

#[test]
fn a_request_joins_mid_flight_and_sequences_finish_at_different_steps() {
    let c = cfg(32, 4, 8, 64);
    let mut e = PagedFake::new(32, 4);
    let mut s = Scheduler::new(c).unwrap();
    let mut stop = req(&[5, 6], 20);
    let first_alone = alone(&stop);
    // Stop at the third token the sequence produces alone.
    stop.stop_tokens = vec![first_alone.generated[2]];
    let a = s.add(req(&[1, 2, 3], 8)).unwrap();
    let b = s.add(stop.clone()).unwrap();
    let mut finished_at = vec![];
    let (mut k, mut j) = (0, None);
    let late = req(&[9, 8, 7, 6, 5], 2);
    while let Some(rep) = s.step(&mut e).unwrap() {
        if k == 2 {
            j = Some(s.add(late.clone()).unwrap());
        }
        for id in &rep.finished {
            finished_at.push((*id, k));
            // Finished sequences hold no blocks from that step on.
            assert!(s.blocks_of(*id).is_empty());
        }
        k += 1;
    }
    let j = j.unwrap();
    assert_eq!(s.finish_reason(b), Some(FinishReason::Stop));
    assert_eq!(s.finish_reason(a), Some(FinishReason::Length));
    assert_eq!(s.generated(b).len(), 3, "stops right after its stop token");
    let steps: HashSet<usize> = finished_at.iter().map(|f| f.1).collect();
    assert_eq!(steps.len(), 3, "three different finishing steps: {finished_at:?}");
    // The late request shared a step with a sequence already decoding.
    assert!(e.steps.iter().any(|st| st.iter().any(|c| c.0 == j && c.1 == 0) && st.iter().any(|c| c.0 == a)));
    let got: Vec<Generation> = [a, b, j].iter().map(|&id| s.take(id).unwrap()).collect();
    assert_same_as_alone(&[req(&[1, 2, 3], 8), stop, late], &got);
    assert_eq!(s.free_blocks(), 32, "every block is back");
    assert_eq!(e.released.len(), 3);
}

#[test]
fn blocks_grow_with_the_sequence_and_are_never_shared() {
    let c = cfg(16, 2, 8, 64);
    let mut e = PagedFake::new(16, 2);
    let mut s = Scheduler::new(c).unwrap();
    let ids: Vec<SeqId> = [vec![1, 2, 3], vec![4], vec![5, 6]].iter().map(|p| s.add(req(p, 4)).unwrap()).collect();
    let mut max_held = vec![0; 3];
    while s.step(&mut e).unwrap().is_some() {
        let mut seen = HashSet::new();
        for &id in &ids {
            let held = s.blocks_of(id);
            max_held[id] = max_held[id].max(held.len());
            for b in held {
                assert_eq!(s.block_refcount(*b), 1);
                assert!(seen.insert(*b), "block {b} held by two sequences");
            }
        }
        assert_eq!(s.free_blocks() + seen.len(), 16);
    }
    // Seen after each step: sequence 2 grows to its third block only in the
    // step that finishes it (and frees them all); the peak shows it.
    assert_eq!(max_held, vec![3, 2, 2]);
    assert_eq!(s.free_blocks(), 16);
    // Prompt + 3 fed-back tokens, 2 per block: 3 + 2 + 3 in the last step.
    assert_eq!(s.stats().peak_blocks_in_use, 8);
}

#[test]
fn running_out_of_blocks_preempts_and_recomputes() {
    // 6 blocks of 2: each sequence alone needs up to 5, so they cannot all
    // run to the end together.
    let requests = vec![req(&[1, 2, 3], 8), req(&[4, 5], 8), req(&[6, 7, 8, 9], 6)];
    let c = cfg(6, 2, 8, 16);
    let mut e = PagedFake::new(6, 2);
    let mut s = Scheduler::new(c).unwrap();
    let ids: Vec<SeqId> = requests.iter().map(|r| s.add(r.clone()).unwrap()).collect();
    s.run(&mut e).unwrap();
    assert!(s.stats().preemptions > 0, "{:?}", s.stats());
    let victim = *ids.iter().find(|&&id| s.preemptions_of(id) > 0).unwrap();
    assert!(e.released.iter().filter(|r| **r == victim).count() >= 2, "released when preempted and when finished");
    // Recompute: the victim starts again at position 0 with its generated tokens.
    let restarts = e.steps.iter().flatten().filter(|c| c.0 == victim && c.1 == 0).count();
    assert!(restarts >= 2);
    let got: Vec<Generation> = ids.iter().map(|&id| s.take(id).unwrap()).collect();
    assert_same_as_alone(&requests, &got);
    assert_eq!(s.free_blocks(), 6);
    assert!(s.stats().peak_blocks_in_use <= 6);
}

#[test]
fn sampled_sequences_keep_their_own_seeds_through_preemption() {
    let sampled = |prompt: &[i64], seed| Request {
        prompt: prompt.to_vec(),
        max_new_tokens: 7,
        sampling: Sampling { temperature: 1.5, top_k: 0, top_p: 1.0, seed },
        stop_tokens: vec![],
    };
    let requests = vec![sampled(&[1, 2], 3), sampled(&[1, 2], 4), sampled(&[3], 3)];
    let mut e = PagedFake::new(5, 2);
    let mut s = Scheduler::new(cfg(5, 2, 8, 3)).unwrap();
    let ids: Vec<SeqId> = requests.iter().map(|r| s.add(r.clone()).unwrap()).collect();
    s.run(&mut e).unwrap();
    assert!(s.stats().preemptions > 0);
    let got: Vec<Generation> = ids.iter().map(|&id| s.take(id).unwrap()).collect();
    assert_same_as_alone(&requests, &got);
}

#[test]
fn max_seqs_bounds_the_running_set() {
    let requests: Vec<Request> = (0..5).map(|i| req(&[i, i + 1], 3)).collect();
    let mut e = PagedFake::new(64, 4);
    let got = Scheduler::run_all(cfg(64, 4, 2, 64), requests.clone(), &mut e).unwrap();
    assert!(e.steps.iter().all(|s| s.len() <= 2));
    assert_same_as_alone(&requests, &got);
}

#[test]
fn requests_that_cannot_fit_are_refused_up_front() {
    let mut s = Scheduler::new(cfg(2, 4, 8, 64)).unwrap();
    let e = s.add(req(&[1; 8], 2)).unwrap_err().to_string();
    assert!(e.contains("needs 3 KV blocks") && e.contains("holds only 2"), "{e}");
    assert!(s.add(req(&[], 2)).is_err());
    assert!(!s.has_work(), "refused requests are not queued");
    // The largest that fits: 8 cached tokens (the last new token is never fed).
    s.add(req(&[1; 7], 2)).unwrap();
    assert!(Scheduler::new(cfg(2, 4, 0, 64)).is_err());
    assert!(Scheduler::new(cfg(2, 4, 1, 0)).is_err());
}

#[test]
fn zero_new_tokens_only_prefills() {
    let mut e = PagedFake::new(8, 4);
    let got = Scheduler::run_all(cfg(8, 4, 8, 3), vec![req(&[1, 2, 3, 4, 5], 0)], &mut e).unwrap();
    assert!(got[0].generated.is_empty());
    assert_eq!(got[0].prompt_logits.len(), 5);
    assert_eq!(got[0].prompt_logits[4], fake_logits(&[1, 2, 3, 4, 5]));
}

#[test]
fn cancelling_frees_blocks_at_once_and_leaves_the_others_unchanged() {
    let c = cfg(16, 4, 8, 64);
    let mut e = PagedFake::new(16, 4);
    let mut s = Scheduler::new(c).unwrap();
    let keep = req(&[1, 2, 3], 10);
    let a = s.add(keep.clone()).unwrap();
    let b = s.add(req(&[7, 7, 7, 7, 7, 7], 10)).unwrap();
    // Two steps: both prefilled and decoding, each holding blocks.
    s.step(&mut e).unwrap();
    s.step(&mut e).unwrap();
    let held_by_b = s.blocks_of(b).len();
    assert!(held_by_b >= 2, "b holds its prompt's blocks");
    let in_use = s.blocks_in_use();
    assert!(s.cancel(b, &mut e).unwrap());
    assert_eq!(s.blocks_in_use(), in_use - held_by_b, "b's blocks are free before the next step");
    assert!(s.blocks_of(b).is_empty());
    assert_eq!(s.finish_reason(b), Some(FinishReason::Cancelled));
    assert_eq!(e.released, vec![b], "the engine forgets b's cache");
    assert_eq!(s.generated(b).len(), 2, "b keeps the tokens it made");
    assert!(!s.cancel(b, &mut e).unwrap(), "cancelling twice changes nothing");
    assert!(s.cancel(99, &mut e).is_err(), "unknown sequence");
    // A waiting sequence can be cancelled before it ever runs.
    let w = s.add(req(&[4, 5], 3)).unwrap();
    assert!(s.is_waiting(w));
    assert_eq!(s.waiting_len(), 1);
    assert!(s.cancel(w, &mut e).unwrap());
    assert_eq!((s.waiting_len(), s.running_len()), (0, 1));
    s.run(&mut e).unwrap();
    assert!(e.steps.iter().flatten().all(|c| c.0 != w), "a cancelled waiting sequence never runs");
    assert_eq!(s.take(a).unwrap().generated, alone(&keep).generated);
    assert_eq!(s.free_blocks(), 16, "every block is back");
}

#[test]
fn requests_added_between_steps_match_running_alone_without_prompt_logits() {
    let c = cfg(64, 4, 8, 16);
    let mut e = PagedFake::new(64, 4);
    let mut s = Scheduler::new(c).unwrap();
    s.set_record_prompt_logits(false);
    let requests: Vec<Request> = (0..6).map(|i| req(&[i + 1, 2 * i + 3, 5, i], 4 + i as usize)).collect();
    let mut ids = vec![];
    let mut k = 0;
    // One more request joins after every step until all are in.
    loop {
        if let Some(r) = requests.get(k) {
            ids.push(s.add(r.clone()).unwrap());
        }
        k += 1;
        if s.step(&mut e).unwrap().is_none() && k > requests.len() {
            break;
        }
    }
    for (r, id) in requests.iter().zip(ids) {
        let g = s.take(id).unwrap();
        assert_eq!(g.generated, alone(r).generated);
        assert!(g.prompt_logits.is_empty(), "no prompt logits recorded");
        assert!(s.forget(id));
        assert!(s.generated(id).is_empty(), "forgotten tokens are dropped");
    }
    // Without prompt logits a prefill chunk asks only for its last row.
    assert!(e.steps.iter().flatten().any(|c| c.2 > 1), "prefills of several tokens ran");
    assert_eq!(e.max_rows, 1, "one logits row per chunk at most");
    let w = s.add(req(&[1], 3)).unwrap();
    assert!(!s.forget(w), "a sequence that has not finished is kept");
}
