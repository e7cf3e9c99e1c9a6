//! The `panguc` command line.

use anyhow::Result;
use clap::{Parser, Subcommand};
use panguc::commands as cli;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "panguc",
    version,
    about = "Compiler for Pangu Pro MoE: Ascend NPU kernels (AscendC) and CPU code (LLVM)"
)]
struct Cli {
    /// Log level filter (error, warn, info, debug, trace); also RUST_LOG.
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a random checkpoint in the real Hugging Face layout.
    Synth(cli::SynthArgs),
    /// Summarise a checkpoint: architecture, parameter counts, bytes by dtype.
    Inspect(cli::InspectArgs),
    /// Print the canonical IR of a model at a pipeline stage.
    DumpIr(cli::DumpIrArgs),
    /// Generate tokens from a model directory or a compiled package.
    Run(cli::RunArgs),
    /// Compile a model into a package for the given targets.
    Compile(cli::CompileArgs),
    /// Write an int8 (W8A8 / W8A8_DYNAMIC, optional C8 KV cache) checkpoint
    /// in msModelSlim's format from a float checkpoint.
    Quantize(cli::QuantizeArgs),
    /// Hash every file of a package against its manifest and record the
    /// verification stamp that later opens trust.
    Verify(cli::VerifyArgs),
    /// CPU benchmark on the `small` preset: decode and prefill speed against
    /// the memory and FMA rooflines measured in the same run.
    Bench(cli::BenchArgs),
    /// Serve a package over HTTP with the OpenAI API (completions, chat
    /// completions, models) plus /health and /metrics.
    Serve(panguc::serve::ServeArgs),
    /// Load generator for `panguc serve`: N concurrent streaming clients;
    /// prints tokens/s, time to first token and inter-token latency.
    BenchServe(panguc::serve::bench_client::BenchServeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log);
    let result: Result<()> = match cli.command {
        Command::Synth(a) => cli::synth(a),
        Command::Inspect(a) => cli::inspect(a),
        Command::DumpIr(a) => cli::dump_ir(a),
        Command::Run(a) => cli::run(a),
        Command::Compile(a) => cli::compile(a),
        Command::Quantize(a) => cli::quantize(a),
        Command::Verify(a) => cli::verify(a),
        Command::Bench(a) => cli::bench(a),
        Command::Serve(a) => panguc::serve::serve(a),
        Command::BenchServe(a) => panguc::serve::bench_client::bench_serve(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).try_init();
}
