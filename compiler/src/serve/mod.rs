//! `panguc serve`: an OpenAI-compatible HTTP server on the batched runtime.
//!
//! One engine thread (this process's main thread) owns the scheduler and
//! the batched engine and loops `step()` ([`engine_loop`]); the HTTP side
//! (axum on tokio, [`handlers`]) runs on its own threads and talks to it
//! over channels, so concurrent requests share the scheduler's steps.
//! SIGTERM (or Ctrl-C) stops accepting connections, lets the requests in
//! flight finish, then exits 0.

pub mod bench_client;
pub mod engine_loop;
pub mod error;
pub mod handlers;
pub mod metrics;
pub mod stop;
pub mod validate;

use crate::commands::RunArgs;
use crate::package_build::EngineMaker;
use anyhow::{bail, Context, Result};
use clap::Args;
use handlers::{Limits, Shared};
use metrics::{AdmissionQueue, Metrics};
use panguc_ir::PanguConfig;
use panguc_runtime::batch::EngineFactory;
use panguc_runtime::{BatchEngine, PerSequenceEngines, Scheduler, SchedulerConfig, Tokenizer};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// A compiled package (or a checkpoint directory, run by the reference interpreter).
    pub model: PathBuf,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// 0 picks a free port; the bound address is printed on stdout.
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Requests waiting for the scheduler at most; more are answered 429.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub max_queue: usize,
    /// The model name clients use (default: the directory's name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Longest sequence (prompt plus generated tokens) a request may ask
    /// for; each running sequence's cache holds this many tokens (default:
    /// the model's max_position_embeddings).
    #[arg(long, value_name = "TOKENS")]
    pub max_model_len: Option<usize>,
    /// Execution engine: compiled (the default for a package) or interp
    /// (the default for a checkpoint directory).
    #[arg(long)]
    pub engine: Option<String>,
    #[command(flatten)]
    pub engine_args: crate::commands::EngineArgs,
}

impl ServeArgs {
    /// The engine and scheduler flags as `panguc run` has them, so both
    /// commands open engines and size the scheduler the same way.
    pub fn run_args(&self) -> RunArgs {
        RunArgs {
            model: self.model.clone(),
            tokens: vec![],
            prompts: None,
            prompt: vec![],
            chat: false,
            system: None,
            max_new_tokens: 0,
            logits_out: None,
            engine: self.engine.clone(),
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            stop_at_eos: false,
            engine_args: self.engine_args.clone(),
        }
    }
}

/// `--max-model-len`, checked against the model.
fn max_model_len(a: &ServeArgs, cfg: &PanguConfig) -> Result<usize> {
    let limit = cfg.max_position_embeddings;
    match a.max_model_len {
        None => Ok(limit),
        Some(0) => bail!("--max-model-len must be at least 1 token"),
        Some(n) if n > limit => {
            bail!("--max-model-len {n} is past the model's context (max_position_embeddings {limit})")
        }
        Some(n) => Ok(n),
    }
}

/// The scheduler's limits: `run`'s flags, with a default cache that holds
/// every running sequence at its longest.
pub fn scheduler_config(run: &RunArgs, cfg: &PanguConfig, max_len: usize) -> Result<SchedulerConfig> {
    let mut s = crate::run_batch::scheduler_config(run, cfg, &[])?;
    if run.engine_args.kv_cache_mb.is_none() {
        s.num_blocks = s.max_seqs.saturating_mul(max_len.div_ceil(s.block_size)).min(i32::MAX as usize);
    }
    Ok(s)
}

/// A model ready to serve: its config, tokenizer and a maker of its batched engine.
pub struct Served<'a> {
    pub cfg: PanguConfig,
    pub max_len: usize,
    pub sched: SchedulerConfig,
    pub tier: Option<String>,
    pub make: EngineMaker<'a>,
}

impl<'a> Served<'a> {
    /// The one engine the scheduler drives: the package's batched engine
    /// over a paged cache of the scheduler's blocks, or one-sequence
    /// engines behind the `PerSequenceEngines` adapter.
    pub fn batch_engine(&mut self) -> Result<Box<dyn BatchEngine + 'a>> {
        let placeholder = EngineMaker::PerSequence(Box::new(|| bail!("the engine was already made")));
        match std::mem::replace(&mut self.make, placeholder) {
            EngineMaker::PerSequence(make) => Ok(Box::new(PerSequenceEngines::new(make))),
            EngineMaker::Paged(paged) => paged.engine(&self.cfg, &self.sched),
        }
    }
}

/// Open the package (or checkpoint) of `run.model` for sequences of up to
/// `max_len(cfg)` tokens and size the scheduler once: for a batched
/// package's block size, or with the check that `max_seqs` one-sequence
/// engines' contiguous caches fit in memory.
pub fn open_engines<'a>(
    run: &'a RunArgs,
    ckpt_module: Option<&'a (crate::frontend::Checkpoint, panguc_ir::Module)>,
    max_len: &mut dyn FnMut(&PanguConfig) -> Result<usize>,
) -> Result<Served<'a>> {
    let mut len = None;
    let mut context = |cfg: &PanguConfig| -> Result<usize> {
        let n = max_len(cfg)?;
        len = Some(n);
        Ok(n)
    };
    let (cfg, make, tier) = match ckpt_module {
        None => {
            crate::package_build::check_package_engine(run)?;
            let e = crate::package_build::package_engines(run, &mut context)?;
            (e.cfg, e.make, e.tier)
        }
        Some((ckpt, module)) => {
            let cfg = ckpt.config().clone();
            // The interpreter's caches grow as needed; this sizes the scheduler.
            context(&cfg)?;
            let (layers, kv) = (cfg.num_hidden_layers, [cfg.num_key_value_heads, cfg.head_dim()]);
            let make: EngineFactory = Box::new(move || {
                let interp = panguc_ir::interp::Interpreter::new(module, ckpt);
                Ok(Box::new(panguc_ir::session::InterpSession::new(interp, layers, kv)))
            });
            (cfg, EngineMaker::PerSequence(make), None)
        }
    };
    let max_len = len.context("the engines were not sized")?;
    let sched = match &make {
        // A batched package fixes the block size; its cache is checked
        // when the engine is made.
        EngineMaker::Paged(paged) => scheduler_config(&paged.run_args(run)?, &cfg, max_len)?,
        EngineMaker::PerSequence(_) => {
            let sched = scheduler_config(run, &cfg, max_len)?;
            // Each running sequence's engine holds a contiguous cache of max_len tokens.
            let bytes = [sched.max_seqs as u64, max_len as u64, crate::run_batch::kv_bytes_per_token(&cfg) as u64]
                .iter()
                .try_fold(1u64, |acc, &x| acc.checked_mul(x));
            let what = format!(
                "{} running sequences' KV caches ({max_len} tokens each; --max-seqs and --max-model-len bound them)",
                sched.max_seqs
            );
            panguc_runtime::memory::check_fits(&what, bytes)?;
            sched
        }
    };
    Ok(Served { cfg, max_len, sched, tier, make })
}

/// The checkpoint and imported module the interpreter serves, when
/// `a.model` is a checkpoint directory.
pub fn open_checkpoint_for(run: &RunArgs) -> Result<Option<(crate::frontend::Checkpoint, panguc_ir::Module)>> {
    if panguc_runtime::is_package(&run.model) {
        if run.engine.as_deref().is_some_and(|e| e.starts_with("ascend-sim")) {
            bail!("`panguc serve` runs packages with --engine compiled (the AscendC simulation is for `panguc run`)");
        }
        return Ok(None);
    }
    match run.engine.as_deref().unwrap_or("interp") {
        "interp" => {}
        other => bail!(
            "unknown --engine `{other}` for a checkpoint directory in `panguc serve` (available: interp; compile a package for compiled)"
        ),
    }
    let ckpt = crate::commands::open_checkpoint(&run.model, false)?;
    if !ckpt.has_weights() {
        bail!("{}: the checkpoint has no weight files, so it cannot be served", run.model.display());
    }
    let module = crate::commands::import(&ckpt)?;
    Ok(Some((ckpt, module)))
}

pub fn serve(a: ServeArgs) -> Result<()> {
    if a.max_queue == 0 {
        bail!("--max-queue must be at least 1");
    }
    let run = a.run_args();
    let checkpoint = open_checkpoint_for(&run)?;
    let mut served = open_engines(&run, checkpoint.as_ref(), &mut |cfg| max_model_len(&a, cfg))?;
    // A package's tokenizer files were verified when it was opened.
    let tokenizer = Arc::new(Tokenizer::open(&a.model, &served.cfg)?);
    let model_name = a.served_model_name.clone().unwrap_or_else(|| {
        let canonical = std::fs::canonicalize(&a.model).unwrap_or_else(|_| a.model.clone());
        canonical.file_name().map_or_else(|| "panguc".to_string(), |n| n.to_string_lossy().into_owned())
    });
    let listener = std::net::TcpListener::bind((a.host.as_str(), a.port))
        .with_context(|| format!("cannot listen on {}:{}", a.host, a.port))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;

    let metrics = Arc::new(Metrics::new(served.sched.num_blocks));
    let queue = Arc::new(AdmissionQueue::new(a.max_queue));
    let (submit, submissions) = mpsc::channel();
    let shared = Arc::new(Shared {
        submit: Mutex::new(Some(submit)),
        tokenizer: tokenizer.clone(),
        metrics: metrics.clone(),
        queue: queue.clone(),
        limits: Limits {
            model_name,
            max_model_len: served.max_len,
            vocab_size: served.cfg.vocab_size,
            block_size: served.sched.block_size,
            num_blocks: served.sched.num_blocks,
            max_queue: a.max_queue,
            eos: served.cfg.eos_token_id,
        },
        started: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        next_id: Default::default(),
    });
    let scheduler = Scheduler::new(served.sched.clone())?;
    let engine = served.batch_engine()?;
    if let Some(tier) = &served.tier {
        eprintln!("{tier}");
    }
    eprintln!(
        "panguc serve: {} (max model len {}, KV cache {} blocks of {} tokens, up to {} running sequences, queue {})",
        a.model.display(),
        served.max_len,
        served.sched.num_blocks,
        served.sched.block_size,
        served.sched.max_seqs,
        a.max_queue
    );
    println!("panguc serve: listening on http://{addr}");
    std::io::stdout().flush()?;

    std::thread::scope(|scope| -> Result<()> {
        let http = scope.spawn(move || http_server(listener, shared));
        // The engine loop runs here until the HTTP side is gone (its
        // submit handle dropped) and the last request has finished.
        let mut engine_loop = engine_loop::EngineLoop::new(scheduler, engine, &tokenizer, metrics, queue);
        engine_loop.run(&submissions);
        match http.join() {
            Ok(r) => r,
            Err(p) => bail!("the HTTP server panicked: {}", engine_loop::panic_message(&p)),
        }
    })?;
    eprintln!("panguc serve: drained, exiting");
    Ok(())
}

/// Serve HTTP until SIGTERM or Ctrl-C, then wait for open requests to finish.
fn http_server(listener: std::net::TcpListener, shared: Arc<Shared>) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the HTTP runtime")?;
    let result = runtime.block_on(async {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let app = handlers::router(shared.clone()).layer(tower_http::catch_panic::CatchPanicLayer::custom(
            |p: Box<dyn std::any::Any + Send>| {
                use axum::response::IntoResponse;
                let message = engine_loop::panic_message(&p);
                tracing::error!("a handler panicked: {message}");
                error::ApiError::internal("internal error while handling the request").into_response()
            },
        ));
        axum::serve(listener, app).with_graceful_shutdown(shutdown_signal()).await?;
        anyhow::Ok(())
    });
    // Dropping the submit handle tells the engine loop no more requests come.
    if let Ok(mut s) = shared.submit.lock() {
        s.take();
    }
    result
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {},
        _ = tokio::signal::ctrl_c() => {},
    }
    eprintln!("panguc serve: shutting down, finishing the requests in flight");
}
