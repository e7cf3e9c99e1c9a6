//! Continuous batching: which sequences run in each step, and how far.
//!
//! Requests join and leave between steps. Every step packs, oldest first,
//! the pending tokens of running sequences (a decode's one token, or the
//! next chunk of a prefill) and then admits waiting sequences, up to a
//! token budget (`max_batch_tokens`, so long prompts are prefilled in
//! chunks) and `max_seqs` running sequences. KV blocks are allocated as a
//! sequence grows and freed the moment it finishes. When a running sequence
//! needs a block and none is free, the youngest running sequence is
//! preempted by recompute: its blocks are freed, it goes back to the front
//! of the queue, and when readmitted its prompt plus the tokens it already
//! generated are prefilled again. Its sampler keeps its state, so its
//! output is the same as if it had never been preempted.
//!
//! Each step is described by a [`StepMetadata`] (the layout the IR's batch
//! inputs take) and handed to a [`BatchEngine`].

use crate::batch::{BatchEngine, SeqId, StepChunk};
use crate::generate::{Generation, Sampler, Sampling};
use crate::kv_blocks::BlockAllocator;
use anyhow::{bail, ensure, Result};
use panguc_ir::batch::{SeqChunk, StepMetadata};
use std::collections::VecDeque;

/// Default tokens per KV block (a multiple of 16, as Ascend's paged
/// attention needs for 16-bit caches).
pub const DEFAULT_BLOCK_SIZE: usize = 16;
/// Default token budget of one step.
pub const DEFAULT_MAX_BATCH_TOKENS: usize = 2048;
/// Default bound on sequences running at once.
pub const DEFAULT_MAX_SEQS: usize = 256;

/// Limits of the scheduler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// Blocks in the KV cache.
    pub num_blocks: usize,
    /// Sequences running at once.
    pub max_seqs: usize,
    /// New tokens per step, summed over its sequences.
    pub max_batch_tokens: usize,
}

impl SchedulerConfig {
    /// Default limits with a cache big enough to hold every request at its
    /// longest at once (so nothing is ever preempted).
    pub fn fitting(requests: &[Request]) -> Self {
        Self::fitting_with(requests, DEFAULT_BLOCK_SIZE)
    }

    /// [`SchedulerConfig::fitting`] with blocks of `block_size` (at least 1) tokens.
    pub fn fitting_with(requests: &[Request], block_size: usize) -> Self {
        let block_size = block_size.max(1);
        let num_blocks = requests.iter().map(|r| r.max_cached_tokens().div_ceil(block_size)).sum::<usize>().max(1);
        SchedulerConfig {
            block_size,
            num_blocks,
            max_seqs: DEFAULT_MAX_SEQS,
            max_batch_tokens: DEFAULT_MAX_BATCH_TOKENS,
        }
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(self.block_size > 0, "the KV block size must be at least 1 token");
        ensure!(self.num_blocks > 0, "the KV cache must have at least one block");
        ensure!(self.max_seqs > 0, "at most 0 running sequences: allow at least 1");
        ensure!(self.max_batch_tokens > 0, "a token budget of 0 per step: allow at least 1");
        Ok(())
    }
}

/// One sequence to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub prompt: Vec<i64>,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Generation stops after emitting any of these (eos and stop ids).
    pub stop_tokens: Vec<i64>,
}

impl Request {
    /// The most tokens this sequence ever holds in the KV cache: the last
    /// generated token is never fed back.
    pub fn max_cached_tokens(&self) -> usize {
        self.prompt.len() + self.max_new_tokens.saturating_sub(1)
    }
}

/// Why a sequence finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// It emitted a stop token.
    Stop,
    /// It reached its max_new_tokens.
    Length,
    /// The caller stopped it ([`Scheduler::cancel`]): a stop string, a
    /// client that went away.
    Cancelled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    Running,
    Finished(FinishReason),
}

struct Sequence {
    req: Request,
    sampler: Sampler,
    /// Prompt followed by the generated tokens.
    tokens: Vec<i64>,
    /// Leading tokens of `tokens` whose K/V are in the cache.
    computed: usize,
    blocks: Vec<u32>,
    prompt_logits: Vec<Vec<f32>>,
    preemptions: usize,
    state: State,
    /// Keep the logits of every prompt position (the CLI's `--logits-out`);
    /// a server only needs the last row, so the engine computes no others.
    record_prompt_logits: bool,
}

impl Sequence {
    fn generated(&self) -> &[i64] {
        &self.tokens[self.req.prompt.len()..]
    }

    fn pending(&self) -> usize {
        self.tokens.len() - self.computed
    }

    /// First row of a chunk of `n` tokens whose logits are needed: prompt
    /// positions not recorded yet, and the last token's row (to sample from).
    fn logits_from(&self, n: usize) -> usize {
        let mut from = if self.generated().is_empty() && self.record_prompt_logits {
            self.prompt_logits.len().saturating_sub(self.computed).min(n)
        } else {
            n
        };
        if self.computed + n == self.tokens.len() {
            from = from.min(n - 1);
        }
        from
    }
}

/// Counters over a scheduler's life.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    pub steps: usize,
    pub preemptions: usize,
    /// Blocks handed out by the allocator (a block reused counts again).
    pub block_allocations: usize,
    pub peak_blocks_in_use: usize,
    /// Largest number of new tokens in one step.
    pub max_step_tokens: usize,
    /// Largest number of sequences in one step.
    pub max_step_seqs: usize,
}

/// What one step did.
#[derive(Debug, Clone)]
pub struct StepReport {
    pub metadata: StepMetadata,
    /// Sequences of the step and their new-token counts, in row order.
    pub scheduled: Vec<(SeqId, usize)>,
    pub preempted: Vec<SeqId>,
    pub finished: Vec<SeqId>,
}

/// The continuous-batching scheduler (see the module docs).
pub struct Scheduler {
    cfg: SchedulerConfig,
    blocks: BlockAllocator,
    seqs: Vec<Sequence>,
    waiting: VecDeque<SeqId>,
    /// Oldest admission first: the last one is the first to be preempted.
    running: Vec<SeqId>,
    stats: SchedulerStats,
    record_prompt_logits: bool,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Result<Self> {
        cfg.validate()?;
        let blocks = BlockAllocator::new(cfg.num_blocks);
        Ok(Scheduler {
            cfg,
            blocks,
            seqs: vec![],
            waiting: VecDeque::new(),
            running: vec![],
            stats: Default::default(),
            record_prompt_logits: true,
        })
    }

    /// Run `requests` to completion; generations in request order.
    pub fn run_all(
        cfg: SchedulerConfig,
        requests: Vec<Request>,
        engine: &mut dyn BatchEngine,
    ) -> Result<Vec<Generation>> {
        let mut s = Scheduler::new(cfg)?;
        let ids = requests.into_iter().map(|r| s.add(r)).collect::<Result<Vec<_>>>()?;
        s.run(engine)?;
        ids.iter().map(|&id| s.take(id).ok_or_else(|| anyhow::anyhow!("sequence {id} did not finish"))).collect()
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// Whether requests added from now on record the logits of every prompt
    /// position (on by default). Off, a prefill asks the engine for its last
    /// row only and [`Generation::prompt_logits`] stays empty.
    pub fn set_record_prompt_logits(&mut self, on: bool) {
        self.record_prompt_logits = on;
    }

    /// Queue a request; it joins the batch at the next step with room.
    /// Fails (without queueing) when the request could never fit the cache.
    pub fn add(&mut self, req: Request) -> Result<SeqId> {
        let id = self.seqs.len();
        if req.prompt.is_empty() {
            bail!("request {id}: the prompt is empty: give at least one token");
        }
        req.sampling.validate()?;
        let need = req.max_cached_tokens().div_ceil(self.cfg.block_size);
        if need > self.cfg.num_blocks {
            bail!(
                "request {id} needs {need} KV blocks ({} prompt tokens + {} new, {} tokens per block) but the cache holds only {} blocks",
                req.prompt.len(),
                req.max_new_tokens,
                self.cfg.block_size,
                self.cfg.num_blocks
            );
        }
        self.seqs.push(Sequence {
            sampler: Sampler::new(req.sampling.clone()),
            tokens: req.prompt.clone(),
            req,
            computed: 0,
            blocks: vec![],
            prompt_logits: vec![],
            preemptions: 0,
            state: State::Waiting,
            record_prompt_logits: self.record_prompt_logits,
        });
        self.waiting.push_back(id);
        Ok(id)
    }

    /// True while some request is waiting or running.
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    pub fn stats(&self) -> &SchedulerStats {
        &self.stats
    }

    pub fn free_blocks(&self) -> usize {
        self.blocks.free_count()
    }

    /// KV blocks held by sequences now.
    pub fn blocks_in_use(&self) -> usize {
        self.blocks.in_use()
    }

    /// Sequences queued for admission (new or preempted).
    pub fn waiting_len(&self) -> usize {
        self.waiting.len()
    }

    /// Sequences admitted and not finished.
    pub fn running_len(&self) -> usize {
        self.running.len()
    }

    /// True while sequence `id` waits for admission (never ran, or was preempted).
    pub fn is_waiting(&self, id: SeqId) -> bool {
        self.seqs.get(id).is_some_and(|s| s.state == State::Waiting)
    }

    /// Stop sequence `id` between steps, waiting or running: its blocks go
    /// back to the pool at once and it finishes as
    /// [`FinishReason::Cancelled`] with the tokens it has. False when it had
    /// already finished (nothing changes); an error for an unknown id.
    pub fn cancel(&mut self, id: SeqId, engine: &mut dyn BatchEngine) -> Result<bool> {
        let Some(s) = self.seqs.get(id) else { bail!("cancel of sequence {id}, which was never added") };
        if matches!(s.state, State::Finished(_)) {
            return Ok(false);
        }
        self.waiting.retain(|&w| w != id);
        self.finish(id, FinishReason::Cancelled, engine)?;
        Ok(true)
    }

    /// Drop what finished sequence `id` still keeps (its tokens and prompt
    /// logits), so a long-lived scheduler does not grow with every request
    /// it served. Afterwards it reports no generated tokens; false (and
    /// nothing dropped) while it has not finished.
    pub fn forget(&mut self, id: SeqId) -> bool {
        let Some(s) = self.seqs.get_mut(id) else { return false };
        if !matches!(s.state, State::Finished(_)) {
            return false;
        }
        s.tokens = Vec::new();
        s.req.prompt = Vec::new();
        s.prompt_logits = Vec::new();
        true
    }

    /// Reference count of a cache block (0 = free).
    pub fn block_refcount(&self, block: u32) -> u32 {
        self.blocks.refcount(block)
    }

    /// The blocks sequence `id` holds now.
    pub fn blocks_of(&self, id: SeqId) -> &[u32] {
        self.seqs.get(id).map_or(&[], |s| &s.blocks)
    }

    /// Tokens generated so far by sequence `id`.
    pub fn generated(&self, id: SeqId) -> &[i64] {
        self.seqs.get(id).map_or(&[], |s| s.generated())
    }

    pub fn finish_reason(&self, id: SeqId) -> Option<FinishReason> {
        match self.seqs.get(id)?.state {
            State::Finished(r) => Some(r),
            _ => None,
        }
    }

    /// Times sequence `id` was preempted.
    pub fn preemptions_of(&self, id: SeqId) -> usize {
        self.seqs.get(id).map_or(0, |s| s.preemptions)
    }

    /// The result of finished sequence `id` (taken out; None if it is not
    /// finished or was taken already).
    pub fn take(&mut self, id: SeqId) -> Option<Generation> {
        let s = self.seqs.get_mut(id)?;
        if !matches!(s.state, State::Finished(_)) {
            return None;
        }
        Some(Generation { prompt_logits: std::mem::take(&mut s.prompt_logits), generated: s.generated().to_vec() })
    }

    /// Step until every request has finished.
    pub fn run(&mut self, engine: &mut dyn BatchEngine) -> Result<()> {
        while self.step(engine)?.is_some() {}
        Ok(())
    }

    /// Schedule and run one step; None when there is nothing to do.
    pub fn step(&mut self, engine: &mut dyn BatchEngine) -> Result<Option<StepReport>> {
        let mut preempted = vec![];
        let plan = self.plan(engine, &mut preempted)?;
        if plan.is_empty() {
            if self.has_work() {
                bail!("the scheduler could not schedule any of {} waiting sequences", self.waiting.len());
            }
            return Ok(None);
        }
        let seq_chunks: Vec<SeqChunk> = plan
            .iter()
            .map(|&(id, n)| SeqChunk { past: self.seqs[id].computed, new_tokens: n, blocks: &self.seqs[id].blocks })
            .collect();
        let metadata = StepMetadata::build(self.cfg.block_size, &seq_chunks)?;
        let chunks: Vec<StepChunk> = plan
            .iter()
            .map(|&(id, n)| {
                let s = &self.seqs[id];
                StepChunk {
                    seq: id,
                    tokens: &s.tokens[s.computed..s.computed + n],
                    past: s.computed,
                    logits_from: s.logits_from(n),
                }
            })
            .collect();
        let rows = engine.step(&chunks, &metadata)?;
        ensure!(
            rows.len() == chunks.len(),
            "the engine returned logits for {} of {} sequences",
            rows.len(),
            chunks.len()
        );
        for (c, r) in chunks.iter().zip(&rows) {
            ensure!(
                r.len() == c.tokens.len() - c.logits_from,
                "sequence {}: the engine returned {} logits rows, {} were asked for",
                c.seq,
                r.len(),
                c.tokens.len() - c.logits_from
            );
        }
        let firsts: Vec<usize> = chunks.iter().map(|c| c.past + c.logits_from).collect();
        drop(chunks);
        let mut finished = vec![];
        for ((&(id, n), rows), first) in plan.iter().zip(rows).zip(firsts) {
            if let Some(reason) = self.absorb(id, n, rows, first) {
                self.finish(id, reason, engine)?;
                finished.push(id);
            }
        }
        self.stats.steps += 1;
        self.stats.max_step_tokens = self.stats.max_step_tokens.max(metadata.tokens());
        self.stats.max_step_seqs = self.stats.max_step_seqs.max(metadata.seqs());
        self.stats.block_allocations = self.blocks.allocations();
        self.stats.peak_blocks_in_use = self.blocks.peak_in_use();
        Ok(Some(StepReport { metadata, scheduled: plan, preempted, finished }))
    }

    /// Pick this step's (sequence, new tokens), allocating their blocks and
    /// preempting when blocks run out.
    fn plan(&mut self, engine: &mut dyn BatchEngine, preempted: &mut Vec<SeqId>) -> Result<Vec<(SeqId, usize)>> {
        let bs = self.cfg.block_size;
        let mut budget = self.cfg.max_batch_tokens;
        let mut plan = vec![];
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let s = &self.seqs[id];
            // Room in the blocks it holds plus every free block.
            let room = (s.blocks.len() + self.blocks.free_count()) * bs - s.computed;
            if room == 0 {
                // The youngest running sequence gives its blocks back (it
                // is after `i`, so not yet planned; possibly `id` itself).
                let victim = *self.running.last().unwrap_or(&id);
                self.preempt(victim, engine)?;
                preempted.push(victim);
                continue;
            }
            let n = s.pending().min(budget).min(room);
            self.grow(id, n)?;
            plan.push((id, n));
            budget -= n;
            i += 1;
        }
        // Admit waiting sequences while their next chunk fits.
        while budget > 0 && self.running.len() < self.cfg.max_seqs {
            let Some(&id) = self.waiting.front() else { break };
            let n = self.seqs[id].pending().min(budget);
            if n.div_ceil(bs) > self.blocks.free_count() {
                break;
            }
            self.waiting.pop_front();
            self.seqs[id].state = State::Running;
            self.running.push(id);
            self.grow(id, n)?;
            plan.push((id, n));
            budget -= n;
        }
        Ok(plan)
    }

    /// Allocate blocks so sequence `id` can hold `n` more tokens.
    fn grow(&mut self, id: SeqId, n: usize) -> Result<()> {
        let s = &mut self.seqs[id];
        while s.blocks.len() * self.cfg.block_size < s.computed + n {
            let Some(b) = self.blocks.alloc() else { bail!("no free KV block for sequence {id}") };
            s.blocks.push(b);
        }
        Ok(())
    }

    fn preempt(&mut self, id: SeqId, engine: &mut dyn BatchEngine) -> Result<()> {
        self.running.retain(|&r| r != id);
        let s = &mut self.seqs[id];
        self.blocks.release_all(&s.blocks)?;
        s.blocks.clear();
        s.computed = 0;
        s.preemptions += 1;
        s.state = State::Waiting;
        self.waiting.push_front(id);
        self.stats.preemptions += 1;
        engine.release(id);
        Ok(())
    }

    fn finish(&mut self, id: SeqId, reason: FinishReason, engine: &mut dyn BatchEngine) -> Result<()> {
        self.running.retain(|&r| r != id);
        let s = &mut self.seqs[id];
        self.blocks.release_all(&s.blocks)?;
        s.blocks.clear();
        s.state = State::Finished(reason);
        engine.release(id);
        Ok(())
    }

    /// Take a chunk's results: record prompt logits, and once the sequence
    /// has caught up, sample its next token. Returns why it finished, if it did.
    fn absorb(&mut self, id: SeqId, n: usize, rows: Vec<Vec<f32>>, first: usize) -> Option<FinishReason> {
        let s = &mut self.seqs[id];
        s.computed += n;
        let caught_up = s.computed == s.tokens.len();
        let prompt_len = s.req.prompt.len();
        let mut last = None;
        for (pos, row) in (first..).zip(rows) {
            if s.record_prompt_logits && pos == s.prompt_logits.len() && pos < prompt_len && s.generated().is_empty() {
                s.prompt_logits.push(row.clone());
            }
            last = Some(row);
        }
        if !caught_up {
            return None;
        }
        if s.generated().len() >= s.req.max_new_tokens {
            return Some(FinishReason::Length);
        }
        let next = s.sampler.pick(last.as_deref().unwrap_or(&[])) as i64;
        s.tokens.push(next);
        if s.req.stop_tokens.contains(&next) {
            Some(FinishReason::Stop)
        } else if s.generated().len() == s.req.max_new_tokens {
            Some(FinishReason::Length)
        } else {
            None
        }
    }
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
