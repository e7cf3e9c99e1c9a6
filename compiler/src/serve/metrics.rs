//! `GET /metrics`: the server's figures in the Prometheus text format.
//!
//! The engine loop updates the gauges after every step and records each
//! generated token's latency; handlers count rejected requests.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the time-to-first-token buckets.
const TTFT_BUCKETS: [f64; 15] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
/// Upper bounds (seconds) of the inter-token latency buckets.
const ITL_BUCKETS: [f64; 13] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

/// A Prometheus histogram (cumulative on output).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative), plus the +Inf bucket.
    counts: Vec<u64>,
    sum: f64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram { bounds, counts: vec![0; bounds.len() + 1], sum: 0.0 }
    }

    pub fn observe(&mut self, d: Duration) {
        let v = d.as_secs_f64();
        let i = self.bounds.iter().position(|b| v <= *b).unwrap_or(self.bounds.len());
        self.counts[i] += 1;
        self.sum += v;
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c;
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        cumulative += self.counts[self.bounds.len()];
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

/// Everything `/metrics` reports.
#[derive(Debug)]
pub struct Metrics {
    /// Requests accepted and not finished whose sequences run.
    pub requests_running: AtomicUsize,
    pub sequences_running: AtomicUsize,
    pub sequences_waiting: AtomicUsize,
    pub kv_blocks_in_use: AtomicUsize,
    pub kv_blocks_total: usize,
    /// Most sequences one step has run together (shared steps show here).
    pub max_step_sequences: AtomicUsize,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub requests_finished: AtomicU64,
    /// Requests whose client went away before they finished.
    pub requests_cancelled: AtomicU64,
    /// Requests answered 429 (queue full).
    pub requests_rejected: AtomicU64,
    pub ttft: Mutex<Histogram>,
    pub itl: Mutex<Histogram>,
}

impl Metrics {
    pub fn new(kv_blocks_total: usize) -> Self {
        Metrics {
            requests_running: AtomicUsize::new(0),
            sequences_running: AtomicUsize::new(0),
            sequences_waiting: AtomicUsize::new(0),
            kv_blocks_in_use: AtomicUsize::new(0),
            kv_blocks_total,
            max_step_sequences: AtomicUsize::new(0),
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            requests_finished: AtomicU64::new(0),
            requests_cancelled: AtomicU64::new(0),
            requests_rejected: AtomicU64::new(0),
            ttft: Mutex::new(Histogram::new(&TTFT_BUCKETS)),
            itl: Mutex::new(Histogram::new(&ITL_BUCKETS)),
        }
    }

    pub fn observe_ttft(&self, d: Duration) {
        if let Ok(mut h) = self.ttft.lock() {
            h.observe(d);
        }
    }

    pub fn observe_itl(&self, d: Duration) {
        if let Ok(mut h) = self.itl.lock() {
            h.observe(d);
        }
    }

    /// The Prometheus text; `requests_waiting` comes from the admission queue.
    pub fn render(&self, requests_waiting: usize) -> String {
        let mut out = String::new();
        let mut gauge = |name: &str, help: &str, kind: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        gauge(
            "panguc_requests_running",
            "Requests whose sequences are running.",
            "gauge",
            self.requests_running.load(Relaxed) as u64,
        );
        gauge(
            "panguc_requests_waiting",
            "Requests accepted and waiting for the scheduler.",
            "gauge",
            requests_waiting as u64,
        );
        gauge(
            "panguc_sequences_running",
            "Sequences in the scheduler's running set.",
            "gauge",
            self.sequences_running.load(Relaxed) as u64,
        );
        gauge(
            "panguc_sequences_waiting",
            "Sequences queued in the scheduler (new or preempted).",
            "gauge",
            self.sequences_waiting.load(Relaxed) as u64,
        );
        gauge(
            "panguc_kv_blocks_in_use",
            "KV-cache blocks held by sequences.",
            "gauge",
            self.kv_blocks_in_use.load(Relaxed) as u64,
        );
        gauge("panguc_kv_blocks_total", "KV-cache blocks in the pool.", "gauge", self.kv_blocks_total as u64);
        gauge(
            "panguc_step_sequences_max",
            "Most sequences run together in one engine step.",
            "gauge",
            self.max_step_sequences.load(Relaxed) as u64,
        );
        gauge(
            "panguc_prompt_tokens_total",
            "Prompt tokens of accepted requests.",
            "counter",
            self.prompt_tokens.load(Relaxed),
        );
        gauge("panguc_generated_tokens_total", "Tokens generated.", "counter", self.generated_tokens.load(Relaxed));
        gauge(
            "panguc_requests_finished_total",
            "Requests that ran to their end.",
            "counter",
            self.requests_finished.load(Relaxed),
        );
        gauge(
            "panguc_requests_cancelled_total",
            "Requests cancelled because their client went away.",
            "counter",
            self.requests_cancelled.load(Relaxed),
        );
        gauge(
            "panguc_requests_rejected_total",
            "Requests refused with 429 because the waiting queue was full.",
            "counter",
            self.requests_rejected.load(Relaxed),
        );
        if let Ok(h) = self.ttft.lock() {
            h.render(
                "panguc_time_to_first_token_seconds",
                "From receiving a request to its first generated token.",
                &mut out,
            );
        }
        if let Ok(h) = self.itl.lock() {
            h.render("panguc_inter_token_latency_seconds", "Between consecutive tokens of a sequence.", &mut out);
        }
        out
    }
}

/// The bounded waiting queue: requests accepted but not yet running.
#[derive(Debug)]
pub struct AdmissionQueue {
    waiting: AtomicUsize,
    max: usize,
}

impl AdmissionQueue {
    pub fn new(max: usize) -> Self {
        AdmissionQueue { waiting: AtomicUsize::new(0), max }
    }

    /// Take a place in the queue; false when it is full.
    pub fn try_enter(&self) -> bool {
        self.waiting.fetch_update(Relaxed, Relaxed, |w| (w < self.max).then_some(w + 1)).is_ok()
    }

    /// A request left the queue (it runs, finished or was dropped).
    pub fn leave(&self) {
        let _ = self.waiting.fetch_update(Relaxed, Relaxed, |w| w.checked_sub(1));
    }

    pub fn waiting(&self) -> usize {
        self.waiting.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_the_queue_is_bounded() {
        let m = Metrics::new(8);
        m.observe_ttft(Duration::from_millis(3));
        m.observe_ttft(Duration::from_secs(100));
        let text = m.render(2);
        assert!(text.contains("panguc_time_to_first_token_seconds_bucket{le=\"0.0025\"} 0"), "{text}");
        assert!(text.contains("panguc_time_to_first_token_seconds_bucket{le=\"0.005\"} 1"), "{text}");
        assert!(text.contains("panguc_time_to_first_token_seconds_bucket{le=\"60\"} 1"), "{text}");
        assert!(text.contains("panguc_time_to_first_token_seconds_bucket{le=\"+Inf\"} 2"), "{text}");
        assert!(text.contains("panguc_time_to_first_token_seconds_count 2"), "{text}");
        assert!(text.contains("panguc_requests_waiting 2\n"), "{text}");
        assert!(text.contains("panguc_kv_blocks_total 8\n"), "{text}");
        let q = AdmissionQueue::new(2);
        assert!(q.try_enter() && q.try_enter());
        assert!(!q.try_enter(), "full at 2");
        q.leave();
        assert!(q.try_enter());
        q.leave();
        q.leave();
        q.leave();
        assert_eq!(q.waiting(), 0, "never below zero");
    }
}
