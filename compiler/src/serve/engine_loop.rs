//! The engine thread: it owns the scheduler and the batched engine and
//! loops `step()`. Handlers hand it [`Submission`]s over a channel; between
//! steps it admits them, cancels the sequences of clients that went away,
//! and after each step sends every request its new text ([`Event`]s):
//! detokenized incrementally, cut at stop strings.

use super::metrics::{AdmissionQueue, Metrics};
use super::stop::{Pushed, StopText};
use panguc_runtime::{BatchEngine, FinishReason, Request, Sampling, Scheduler, SeqId, TextStream, Tokenizer};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// How one request generates.
#[derive(Debug, Clone)]
pub struct GenParams {
    pub max_tokens: usize,
    /// Choice `i` samples with seed `sampling.seed + i`.
    pub sampling: Sampling,
    pub n: usize,
    pub stop: Vec<String>,
    /// Token ids that end a choice (eos unless the request ignores it).
    pub stop_token_ids: Vec<i64>,
}

/// A request handed to the engine thread. It holds a place in the
/// admission queue, which the engine thread gives back.
pub struct Submission {
    pub prompt: Vec<i64>,
    pub params: GenParams,
    pub events: UnboundedSender<Event>,
    pub received: Instant,
}

/// What a request hears back, per choice `index`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// More text (never empty, never a broken UTF-8 character).
    Text { index: usize, text: String },
    /// The choice is over; `completion_tokens` counts its generated tokens
    /// up to and including the one that ended it.
    Done { index: usize, finish_reason: &'static str, completion_tokens: usize },
    /// The engine failed; no more events follow.
    Failed { message: String },
}

/// One choice of a running request.
struct Choice<'t> {
    seq: SeqId,
    text: TextStream<'t>,
    stop: StopText,
    /// Generated tokens already turned into text.
    seen: usize,
    last_token_at: Option<Instant>,
    done: bool,
}

struct Active<'t> {
    events: UnboundedSender<Event>,
    choices: Vec<Choice<'t>>,
    received: Instant,
    /// Still holds its place in the admission queue (no choice ran yet).
    queued: bool,
}

pub struct EngineLoop<'t, 'e> {
    scheduler: Scheduler,
    engine: Box<dyn BatchEngine + 'e>,
    tokenizer: &'t Tokenizer,
    metrics: Arc<Metrics>,
    queue: Arc<AdmissionQueue>,
    active: Vec<Active<'t>>,
}

impl<'t, 'e> EngineLoop<'t, 'e> {
    pub fn new(
        mut scheduler: Scheduler,
        engine: Box<dyn BatchEngine + 'e>,
        tokenizer: &'t Tokenizer,
        metrics: Arc<Metrics>,
        queue: Arc<AdmissionQueue>,
    ) -> Self {
        // A server never returns prompt logits: prefills compute one row.
        scheduler.set_record_prompt_logits(false);
        EngineLoop { scheduler, engine, tokenizer, metrics, queue, active: vec![] }
    }

    /// Serve submissions until every sender is gone and the last request
    /// has finished (the drain on shutdown).
    pub fn run(&mut self, submissions: &Receiver<Submission>) {
        loop {
            if self.active.is_empty() {
                match submissions.recv_timeout(Duration::from_millis(100)) {
                    Ok(s) => self.admit(s),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            while let Ok(s) = submissions.try_recv() {
                self.admit(s);
            }
            self.drop_abandoned();
            if self.scheduler.has_work() {
                self.step();
            }
            self.publish();
        }
    }

    fn admit(&mut self, s: Submission) {
        let mut choices = vec![];
        for i in 0..s.params.n {
            let mut sampling = s.params.sampling.clone();
            sampling.seed = sampling.seed.wrapping_add(i as u64);
            let req = Request {
                prompt: s.prompt.clone(),
                max_new_tokens: s.params.max_tokens,
                sampling,
                stop_tokens: s.params.stop_token_ids.clone(),
            };
            match self.scheduler.add(req) {
                Ok(seq) => choices.push(Choice {
                    seq,
                    text: self.tokenizer.stream(),
                    stop: StopText::new(&s.params.stop),
                    seen: 0,
                    last_token_at: None,
                    done: false,
                }),
                Err(e) => {
                    // Validation refuses what the scheduler would: this is a bug, not a client error.
                    for c in &choices {
                        let _ = self.scheduler.cancel(c.seq, self.engine.as_mut());
                    }
                    let _ = s.events.send(Event::Failed { message: format!("{e:#}") });
                    self.queue.leave();
                    return;
                }
            }
        }
        self.metrics.prompt_tokens.fetch_add(s.prompt.len() as u64, Relaxed);
        self.active.push(Active { events: s.events, choices, received: s.received, queued: true });
    }

    /// Cancel every request whose client stopped listening: its sequences
    /// leave the scheduler and their blocks are free before the next step.
    fn drop_abandoned(&mut self) {
        let mut i = 0;
        while i < self.active.len() {
            if self.active[i].events.is_closed() {
                let a = self.active.remove(i);
                self.cancel_request(&a);
                self.metrics.requests_cancelled.fetch_add(1, Relaxed);
            } else {
                i += 1;
            }
        }
    }

    fn cancel_request(&mut self, a: &Active) {
        for c in &a.choices {
            let _ = self.scheduler.cancel(c.seq, self.engine.as_mut());
            self.scheduler.forget(c.seq);
        }
        if a.queued {
            self.queue.leave();
        }
    }

    fn step(&mut self) {
        let engine = self.engine.as_mut();
        let scheduler = &mut self.scheduler;
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| scheduler.step(engine)));
        let failure = match result {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(format!("the engine failed: {e:#}")),
            Err(panic) => Some(format!("the engine panicked: {}", panic_message(&panic))),
        };
        if let Some(message) = failure {
            tracing::error!("{message}");
            // Every request in flight ends with the error; the server goes on.
            for a in std::mem::take(&mut self.active) {
                let _ = a.events.send(Event::Failed { message: message.clone() });
                self.cancel_request(&a);
            }
            return;
        }
        self.deliver();
    }

    /// Send every request the text of its new tokens, and finish choices
    /// that ended (by the scheduler, or at a stop string).
    fn deliver(&mut self) {
        let now = Instant::now();
        let mut active = std::mem::take(&mut self.active);
        for a in &mut active {
            // The queue place goes back before any text is sent, so a client
            // that saw its first token never finds its place still taken.
            if a.queued && a.choices.iter().any(|c| !self.scheduler.is_waiting(c.seq)) {
                a.queued = false;
                self.queue.leave();
            }
            for (index, c) in a.choices.iter_mut().enumerate().filter(|(_, c)| !c.done) {
                let generated = self.scheduler.generated(c.seq);
                let new: Vec<i64> = generated[c.seen.min(generated.len())..].to_vec();
                let mut out = String::new();
                let mut stopped = false;
                for &t in &new {
                    c.seen += 1;
                    self.metrics.generated_tokens.fetch_add(1, Relaxed);
                    match c.last_token_at {
                        None => self.metrics.observe_ttft(now - a.received),
                        Some(prev) => self.metrics.observe_itl(now - prev),
                    }
                    c.last_token_at = Some(now);
                    let piece = c.text.push(t).unwrap_or_else(|_| char::REPLACEMENT_CHARACTER.to_string());
                    match c.stop.push(&piece) {
                        Pushed::Text(s) => out.push_str(&s),
                        Pushed::Stopped(s) => {
                            out.push_str(&s);
                            stopped = true;
                            break;
                        }
                    }
                }
                let finish = if stopped {
                    // A stop string: the sequence ends here, its blocks go now.
                    let _ = self.scheduler.cancel(c.seq, self.engine.as_mut());
                    Some("stop")
                } else {
                    match self.scheduler.finish_reason(c.seq) {
                        Some(reason) => {
                            let tail = c.text.finish().unwrap_or_default();
                            match c.stop.push(&tail) {
                                Pushed::Text(s) => {
                                    out.push_str(&s);
                                    out.push_str(&c.stop.finish());
                                    Some(if reason == FinishReason::Length { "length" } else { "stop" })
                                }
                                Pushed::Stopped(s) => {
                                    out.push_str(&s);
                                    Some("stop")
                                }
                            }
                        }
                        None => None,
                    }
                };
                // A client that went away is noticed by drop_abandoned
                // before the next step, so failed sends are ignored here.
                if !out.is_empty() {
                    let _ = a.events.send(Event::Text { index, text: out });
                }
                if let Some(finish_reason) = finish {
                    c.done = true;
                    self.scheduler.forget(c.seq);
                    let done = Event::Done { index, finish_reason, completion_tokens: c.seen };
                    let _ = a.events.send(done);
                }
            }
        }
        active.retain(|a| {
            let finished = a.choices.iter().all(|c| c.done);
            if finished {
                self.metrics.requests_finished.fetch_add(1, Relaxed);
                if a.queued {
                    self.queue.leave();
                }
            }
            !finished
        });
        self.active = active;
    }

    fn publish(&self) {
        let m = &self.metrics;
        m.requests_running.store(self.active.iter().filter(|a| !a.queued).count(), Relaxed);
        m.sequences_running.store(self.scheduler.running_len(), Relaxed);
        m.sequences_waiting.store(self.scheduler.waiting_len(), Relaxed);
        m.kv_blocks_in_use.store(self.scheduler.blocks_in_use(), Relaxed);
        m.max_step_sequences.store(self.scheduler.stats().max_step_seqs, Relaxed);
    }
}

/// The text of a caught panic.
pub fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string())
}
