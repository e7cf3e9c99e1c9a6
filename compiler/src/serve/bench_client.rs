//! `panguc bench-serve URL`: a load generator for `panguc serve`. N client
//! threads each send streaming completions one after another until M
//! requests were sent in all; it prints aggregate tokens/s, time to first
//! token and inter-token latency percentiles. With `--compare PKG` it then
//! runs the same requests through the engine directly (one scheduler, all
//! N at once, no HTTP) and prints the engine's batch-N decode tokens/s and
//! the ratio of the two, measured in the same run.

use anyhow::{bail, Context, Result};
use clap::Args;
use std::io::BufRead;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Args, Debug, Clone)]
pub struct BenchServeArgs {
    /// The server's base URL, e.g. http://127.0.0.1:8000 (loopback only).
    pub url: String,
    /// Concurrent streaming clients.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Requests in all (spread over the clients).
    #[arg(long, default_value_t = 32)]
    pub requests: usize,
    /// Tokens each request generates (eos ignored, so every request runs the full length).
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// The prompt of every request.
    #[arg(long, default_value = "The model writes the next word.")]
    pub prompt: String,
    /// Also run the same load through this package's engine without HTTP
    /// (the one the server runs) and print the ratio.
    #[arg(long, value_name = "PKG")]
    pub compare: Option<PathBuf>,
    /// Worker threads of the --compare engine (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// What one streamed request saw.
#[derive(Debug, Default, Clone)]
struct Trace {
    ttft: Option<Duration>,
    gaps: Vec<Duration>,
    completion_tokens: usize,
}

pub fn bench_serve(a: BenchServeArgs) -> Result<()> {
    if a.clients == 0 || a.requests == 0 || a.max_tokens == 0 {
        bail!("--clients, --requests and --max-tokens must be at least 1");
    }
    let base = a.url.trim_end_matches('/').to_string();
    let host = base.split("://").nth(1).unwrap_or(&base).split(['/', ':']).next().unwrap_or_default().to_string();
    if !(host == "localhost" || host.starts_with("127.") || host == "[") {
        bail!(
            "bench-serve drives servers on this machine only: give a loopback URL (127.0.0.1 or localhost), got {}",
            a.url
        );
    }
    let url = format!("{base}/v1/completions");
    let body = serde_json::json!({
        "prompt": a.prompt, "max_tokens": a.max_tokens, "temperature": 0, "ignore_eos": true,
        "stream": true, "stream_options": {"include_usage": true},
    })
    .to_string();
    let next = AtomicUsize::new(0);
    let traces = Mutex::new(vec![]);
    let failures = Mutex::new(vec![]);
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(600)).build();
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..a.clients {
            s.spawn(|| {
                while next.fetch_add(1, Relaxed) < a.requests {
                    match one_request(&agent, &url, &body) {
                        Ok(t) => traces.lock().unwrap_or_else(|e| e.into_inner()).push(t),
                        Err(e) => failures.lock().unwrap_or_else(|e| e.into_inner()).push(format!("{e:#}")),
                    }
                }
            });
        }
    });
    let wall = started.elapsed().as_secs_f64();
    let traces = traces.into_inner().unwrap_or_else(|e| e.into_inner());
    let failures = failures.into_inner().unwrap_or_else(|e| e.into_inner());
    if let Some(f) = failures.first() {
        bail!("{} of {} requests failed; the first: {f}", failures.len(), a.requests);
    }
    let tokens: usize = traces.iter().map(|t| t.completion_tokens).sum();
    let http_tps = tokens as f64 / wall;
    let ttft: Vec<Duration> = traces.iter().filter_map(|t| t.ttft).collect();
    let gaps: Vec<Duration> = traces.iter().flat_map(|t| t.gaps.iter().copied()).collect();
    println!(
        "bench-serve: {} requests x {} tokens over {} clients in {wall:.2} s: {tokens} tokens, {http_tps:.1} tokens/s aggregate",
        traces.len(),
        a.max_tokens,
        a.clients
    );
    println!("  time to first token  {}", percentiles(&ttft));
    println!("  inter-token latency  {}", percentiles(&gaps));
    if let Some(pkg) = &a.compare {
        let engine_tps = engine_decode_tps(pkg, &a)?;
        println!(
            "  engine alone (--compare {}): batch-{} decode {engine_tps:.1} tokens/s; served/engine = {:.2}",
            pkg.display(),
            a.clients,
            http_tps / engine_tps
        );
    }
    Ok(())
}

/// Send one streaming completion and time its chunks.
fn one_request(agent: &ureq::Agent, url: &str, body: &str) -> Result<Trace> {
    let start = Instant::now();
    let resp = agent.post(url).set("Content-Type", "application/json").send_string(body).map_err(|e| match e {
        ureq::Error::Status(code, r) => anyhow::anyhow!("HTTP {code}: {}", r.into_string().unwrap_or_default()),
        other => anyhow::anyhow!("{other}"),
    })?;
    let mut trace = Trace::default();
    let mut last: Option<Instant> = None;
    let mut done = false;
    for line in std::io::BufReader::new(resp.into_reader()).lines() {
        let line = line.context("reading the event stream")?;
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            done = true;
            break;
        }
        let v: serde_json::Value = serde_json::from_str(data).with_context(|| format!("bad event {data}"))?;
        if let Some(e) = v.get("error") {
            bail!("the server reported {e}");
        }
        if let Some(n) = v.pointer("/usage/completion_tokens").and_then(|n| n.as_u64()) {
            trace.completion_tokens = n as usize;
        }
        let has_text = v.pointer("/choices/0/text").and_then(|t| t.as_str()).is_some_and(|t| !t.is_empty());
        if has_text {
            let now = Instant::now();
            match last {
                None => trace.ttft = Some(now - start),
                Some(prev) => trace.gaps.push(now - prev),
            }
            last = Some(now);
        }
    }
    if !done {
        bail!("the stream ended without data: [DONE]");
    }
    Ok(trace)
}

/// `p50 … p90 … p99 …` in milliseconds.
fn percentiles(samples: &[Duration]) -> String {
    if samples.is_empty() {
        return "no samples".to_string();
    }
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let at = |p: f64| ms[((p * (ms.len() - 1) as f64).round() as usize).min(ms.len() - 1)];
    format!("p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  ({} samples)", at(0.5), at(0.9), at(0.99), ms.len())
}

/// The engine's own decode speed with `clients` sequences of the same
/// request running at once: tokens of all-decode steps per second of them.
fn engine_decode_tps(pkg: &std::path::Path, a: &BenchServeArgs) -> Result<f64> {
    use panguc_runtime::{Request, Sampling, Scheduler, Tokenizer};
    let serve_args = super::ServeArgs {
        model: pkg.to_path_buf(),
        host: String::new(),
        port: 0,
        max_queue: 1,
        served_model_name: None,
        max_model_len: None,
        engine: None,
        engine_args: crate::commands::EngineArgs {
            threads: a.threads,
            verify: panguc_runtime::package::Verify::Stamp,
            cpu_tier: None,
            kv_cache_mb: None,
            max_seqs: Some(a.clients),
            block_size: None,
            max_batch_tokens: None,
        },
    };
    let run = serve_args.run_args();
    let checkpoint = super::open_checkpoint_for(&run)?;
    let mut served = super::open_engines(&run, checkpoint.as_ref(), &mut |cfg| Ok(cfg.max_position_embeddings))?;
    let tokenizer = Tokenizer::open(pkg, &served.cfg)?;
    let prompt = tokenizer.encode_prompt(&a.prompt)?;
    let mut engine = served.batch_engine()?;
    // Two rounds through the same engines: the first makes them and
    // touches their caches (as the server's engines were by earlier
    // requests); only the second is timed.
    let (mut decode_tokens, mut decode_time) = (0usize, Duration::ZERO);
    for round in 0..2 {
        let mut scheduler = Scheduler::new(served.sched.clone())?;
        scheduler.set_record_prompt_logits(false);
        for _ in 0..a.clients {
            scheduler.add(Request {
                prompt: prompt.clone(),
                max_new_tokens: a.max_tokens,
                sampling: Sampling::default(),
                stop_tokens: vec![],
            })?;
        }
        loop {
            let t = Instant::now();
            let Some(step) = scheduler.step(engine.as_mut())? else { break };
            if round == 1 && step.scheduled.iter().all(|(_, n)| *n == 1) {
                decode_time += t.elapsed();
                decode_tokens += step.scheduled.len();
            }
        }
    }
    if decode_tokens == 0 {
        bail!("no decode step ran (give --max-tokens of at least 2)");
    }
    Ok(decode_tokens as f64 / decode_time.as_secs_f64())
}
