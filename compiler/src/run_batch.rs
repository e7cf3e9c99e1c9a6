//! `panguc run` over several prompts: reading them (`--tokens` repeated,
//! `--prompts FILE.jsonl`), the scheduler's limits from the flags, one
//! scheduler run for the whole batch, and its outputs (tokens on stdout,
//! `--logits-out`, the run log on stderr).

use crate::commands::{emit, RunArgs};
use anyhow::{bail, Context, Result};
use panguc_ir::PanguConfig;
use panguc_runtime::batch::EngineFactory;
use panguc_runtime::chat::ChatMessage;
use panguc_runtime::{
    BatchEngine, Generation, PerSequenceEngines, Request, Sampling, Scheduler, SchedulerConfig, Tokenizer,
};
use std::io::Write;
use std::path::Path;

/// One `--tokens` value: comma-separated token ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenList(pub Vec<i64>);

impl std::str::FromStr for TokenList {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let ids = s.split(',').map(str::trim).filter(|t| !t.is_empty());
        ids.map(|t| t.parse::<i64>().map_err(|_| format!("`{t}` is not a token id")))
            .collect::<Result<_, _>>()
            .map(TokenList)
    }
}

/// One line of a `--prompts` file.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PromptLine {
    tokens: Vec<i64>,
}

/// The prompts of a run as token ids, and the tokenizer when they came as
/// text (`--prompt`), which then also decodes the answers.
pub struct Prompts {
    pub ids: Vec<Vec<i64>>,
    pub text: Option<Tokenizer>,
}

impl std::ops::Deref for Prompts {
    type Target = [Vec<i64>];
    fn deref(&self) -> &[Vec<i64>] {
        &self.ids
    }
}

/// Every prompt of the run, in order: each `--tokens`, then each line of
/// `--prompts`; or each `--prompt` text, encoded with the tokenizer of the
/// model or package (chat-formatted with `--chat`). Each is checked against
/// the vocabulary, and with `--max-new-tokens` against the model's context
/// length. A package's tokenizer files are verified with the package before
/// this is called.
pub fn prompts(a: &RunArgs, cfg: &PanguConfig) -> Result<Prompts> {
    let vocab = cfg.vocab_size;
    let mut out = Prompts { ids: vec![], text: None };
    if !a.prompt.is_empty() {
        let tokenizer = Tokenizer::open(&a.model, cfg)?;
        for text in &a.prompt {
            let text = if a.chat {
                let mut turns = vec![];
                if let Some(system) = &a.system {
                    turns.push(ChatMessage::new("system", system));
                }
                turns.push(ChatMessage::new("user", text));
                tokenizer.render_chat(&turns)?
            } else {
                text.clone()
            };
            let ids = tokenizer.encode_prompt(&text)?;
            validate_prompt(&ids, vocab)
                .with_context(|| format!("the tokenizer in {} does not match the model", a.model.display()))?;
            out.ids.push(ids);
        }
        out.text = Some(tokenizer);
    } else if a.tokens.is_empty() && a.prompts.is_none() {
        bail!("give a prompt: --prompt TEXT, --tokens 1,2,3 (each repeatable) or --prompts FILE.jsonl");
    }
    for (i, t) in a.tokens.iter().enumerate() {
        validate_prompt(&t.0, vocab).with_context(|| {
            if a.tokens.len() > 1 {
                format!("--tokens #{}", i + 1)
            } else {
                "--tokens".to_string()
            }
        })?;
        out.ids.push(t.0.clone());
    }
    if let Some(path) = &a.prompts {
        out.ids.extend(read_prompts(path, vocab)?);
    }
    for p in &out.ids {
        validate_context(p.len(), a.max_new_tokens, cfg)?;
    }
    Ok(out)
}

/// The whole sequence (prompt + new tokens) must fit the model's context.
pub fn validate_context(prompt_len: usize, max_new_tokens: usize, cfg: &PanguConfig) -> Result<()> {
    let limit = cfg.max_position_embeddings;
    if prompt_len.checked_add(max_new_tokens).is_none_or(|t| t > limit) {
        bail!(
            "--max-new-tokens {max_new_tokens} with a {prompt_len}-token prompt goes past the model's context \
             length (max_position_embeddings {limit}): at most {} new tokens fit",
            limit.saturating_sub(prompt_len)
        );
    }
    Ok(())
}

/// Reject an empty prompt or an id outside the vocabulary.
pub fn validate_prompt(tokens: &[i64], vocab: usize) -> Result<()> {
    if tokens.is_empty() {
        bail!("the prompt is empty: give at least one token id");
    }
    if let Some((i, t)) = tokens.iter().enumerate().find(|(_, t)| **t < 0 || **t as u64 >= vocab as u64) {
        bail!(
            "token {t} at position {i} is outside the vocabulary (vocab_size {vocab}, valid ids 0..{})",
            vocab.saturating_sub(1)
        );
    }
    Ok(())
}

/// Read a JSONL prompts file: one `{"tokens": [...]}` per line (blank lines
/// are skipped); a bad line is an error naming the file and line.
pub fn read_prompts(path: &Path, vocab: usize) -> Result<Vec<Vec<i64>>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading --prompts {}", path.display()))?;
    let mut out = vec![];
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{} line {}", path.display(), n + 1);
        let p: PromptLine =
            serde_json::from_str(line).with_context(|| format!("{}: expected {{\"tokens\": [ids...]}}", at()))?;
        validate_prompt(&p.tokens, vocab).with_context(at)?;
        out.push(p.tokens);
    }
    if out.is_empty() {
        bail!("{}: no prompts (give one {{\"tokens\": [ids...]}} per line)", path.display());
    }
    Ok(out)
}

/// The longest context any sequence of the run reaches (each engine's cache size).
pub fn max_context(prompts: &[Vec<i64>], max_new_tokens: usize) -> usize {
    prompts.iter().map(|p| p.len() + max_new_tokens).max().unwrap_or(1).max(1)
}

/// Bytes of K and V one token takes in the KV cache of today's engines (f32).
pub fn kv_bytes_per_token(cfg: &PanguConfig) -> usize {
    2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim() * 4
}

/// `--block-size`, or the default.
pub fn block_size(a: &RunArgs) -> Result<usize> {
    let block_size = a.engine_args.block_size.unwrap_or(panguc_runtime::scheduler::DEFAULT_BLOCK_SIZE);
    if block_size == 0 {
        bail!("--block-size must be at least 1 token");
    }
    Ok(block_size)
}

/// The scheduler's limits from the flags. Without `--kv-cache-mb` the cache
/// holds every sequence at its longest at once.
pub fn scheduler_config(a: &RunArgs, cfg: &PanguConfig, requests: &[Request]) -> Result<SchedulerConfig> {
    let mut s = SchedulerConfig::fitting_with(requests, block_size(a)?);
    if let Some(mb) = a.engine_args.kv_cache_mb {
        if !(mb.is_finite() && mb > 0.0) {
            bail!("--kv-cache-mb must be a positive number of MiB, got {mb}");
        }
        let block_bytes = s.block_size * kv_bytes_per_token(cfg);
        // Block ids are u32 (i32 in the step metadata): cap the count there.
        s.num_blocks = (mb * (1u64 << 20) as f64 / block_bytes as f64).min(i32::MAX as f64) as usize;
        if s.num_blocks == 0 {
            bail!(
                "--kv-cache-mb {mb} holds no KV block: one block of {} tokens takes {block_bytes} bytes",
                s.block_size
            );
        }
    }
    if let Some(n) = a.engine_args.max_seqs {
        if n == 0 {
            bail!("--max-seqs must be at least 1");
        }
        s.max_seqs = n;
    }
    if let Some(n) = a.engine_args.max_batch_tokens {
        if n == 0 {
            bail!("--max-batch-tokens must be at least 1");
        }
        s.max_batch_tokens = n;
    }
    Ok(s)
}

/// Run every prompt through one scheduler with one-sequence engines from
/// `make` (one per running sequence), then report (see [`scheduled_run`]).
pub fn generate_and_report(make: EngineFactory<'_>, a: &RunArgs, cfg: &PanguConfig, prompts: &Prompts) -> Result<()> {
    let mut make = Some(make);
    scheduled_run(a, cfg, prompts, &mut |s| {
        // Each running sequence's engine holds a contiguous cache for the
        // longest context: together they must fit, checked before any
        // engine (compiled, multi-rank, ascend-sim) allocates one.
        let running = prompts.len().min(s.max_seqs) as u64;
        let context = max_context(prompts, a.max_new_tokens) as u64;
        let bytes =
            [running, context, kv_bytes_per_token(cfg) as u64].iter().try_fold(1u64, |acc, &x| acc.checked_mul(x));
        let what = if running == 1 {
            format!("the KV cache for a context of {context} tokens")
        } else {
            format!("{running} running sequences' KV caches ({context} tokens each; --max-seqs bounds them)")
        };
        panguc_runtime::memory::check_fits(&what, bytes)?;
        let make = make.take().context("the engines were already made")?;
        Ok(Box::new(PerSequenceEngines::new(make)))
    })
}

/// Run every prompt through one scheduler driving the engine `engine`
/// makes for the scheduler's limits, then report: generated token ids (one
/// line per prompt) or, for text prompts, the answers (one prompt streamed
/// as it is generated, several labelled when done); `--logits-out`; the
/// scheduler's figures in the run log.
pub fn scheduled_run<'e>(
    a: &RunArgs,
    cfg: &PanguConfig,
    prompts: &Prompts,
    engine: &mut dyn FnMut(&SchedulerConfig) -> Result<Box<dyn BatchEngine + 'e>>,
) -> Result<()> {
    let sampling = Sampling { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p, seed: a.seed };
    // Text answers end at eos; token ids run the full length unless asked.
    let stop_at_eos = a.stop_at_eos || prompts.text.is_some();
    let stop_tokens: Vec<i64> = if stop_at_eos { cfg.eos_token_id.into_iter().collect() } else { vec![] };
    let requests: Vec<Request> = prompts
        .iter()
        .map(|p| Request {
            prompt: p.clone(),
            max_new_tokens: a.max_new_tokens,
            sampling: sampling.clone(),
            stop_tokens: stop_tokens.clone(),
        })
        .collect();
    let sched_cfg = scheduler_config(a, cfg, &requests)?;
    let mut scheduler = Scheduler::new(sched_cfg.clone())?;
    let mut ids = Vec::with_capacity(requests.len());
    for (i, r) in requests.into_iter().enumerate() {
        let id = scheduler.add(r).with_context(|| format!("prompt {}", i + 1))?;
        ids.push(id);
    }
    let mut engine = engine(&sched_cfg)?;
    // One text prompt streams: each step's new token is decoded and
    // printed at once (held back while it ends inside a UTF-8 character).
    let mut stream = match (&prompts.text, ids.as_slice()) {
        (Some(t), [_]) => Some(t.stream()),
        _ => None,
    };
    let mut stdout = std::io::stdout().lock();
    let mut streamed = 0;
    while scheduler.has_work() {
        scheduler.step(engine.as_mut())?;
        if let Some(text) = &mut stream {
            let generated = scheduler.generated(ids[0]);
            for &t in &generated[streamed..] {
                stdout.write_all(text.push(t)?.as_bytes())?;
            }
            stdout.flush()?;
            streamed = generated.len();
        }
    }
    drop(engine);
    let stats = scheduler.stats().clone();
    let generations: Vec<Generation> =
        ids.iter().map(|&id| scheduler.take(id).context("a sequence did not finish")).collect::<Result<_>>()?;
    if let Some(path) = &a.logits_out {
        write_logits_json(path, prompts, &generations)?;
    }
    match (&prompts.text, &mut stream) {
        (Some(_), Some(text)) => writeln!(stdout, "{}", text.finish()?)?,
        (Some(tokenizer), None) => {
            for (i, g) in generations.iter().enumerate() {
                writeln!(stdout, "[{i}] {}", tokenizer.decode(&g.generated)?)?;
            }
        }
        (None, _) => {
            drop(stdout);
            let lines: Vec<String> = generations
                .iter()
                .map(|g| g.generated.iter().map(i64::to_string).collect::<Vec<_>>().join(","))
                .collect();
            emit(&format!("{}\n", lines.join("\n")));
        }
    }
    let mb = (sched_cfg.num_blocks * sched_cfg.block_size * kv_bytes_per_token(cfg)) as f64 / (1 << 20) as f64;
    eprintln!(
        "run: {} sequences in {} steps; KV cache {} blocks of {} tokens ({mb:.3} MB): {} blocks allocated, peak {} in use; {} preemptions",
        prompts.len(),
        stats.steps,
        sched_cfg.num_blocks,
        sched_cfg.block_size,
        stats.block_allocations,
        stats.peak_blocks_in_use,
        stats.preemptions
    );
    Ok(())
}

/// `--logits-out`: one prompt keeps `{"tokens", "logits", "generated"}`;
/// several give `{"sequences": [...]}` of those, in prompt order.
pub fn write_logits_json(path: &Path, prompts: &[Vec<i64>], gens: &[Generation]) -> Result<()> {
    let one = |p: &Vec<i64>, g: &Generation| serde_json::json!({ "tokens": p, "logits": g.prompt_logits, "generated": g.generated });
    let json = match (prompts, gens) {
        ([p], [g]) => one(p, g),
        _ => serde_json::json!({ "sequences": prompts.iter().zip(gens).map(|(p, g)| one(p, g)).collect::<Vec<_>>() }),
    };
    let text = serde_json::to_string(&json)?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
