//! panguc: the compiler driver. Imports Hugging Face checkpoints, runs the
//! pass pipeline, and writes packages; `main.rs` is the CLI over this library.

#[cfg(feature = "driver")]
pub mod ascend_build;
#[cfg(feature = "driver")]
pub mod bench;
#[cfg(feature = "driver")]
pub mod commands;
pub mod frontend;
#[cfg(feature = "driver")]
pub mod import;
#[cfg(feature = "driver")]
pub mod inspect;
#[cfg(feature = "driver")]
pub mod package_build;
#[cfg(feature = "driver")]
pub mod partition_build;
#[cfg(feature = "driver")]
pub mod pipeline;
#[cfg(feature = "driver")]
pub mod run_batch;
#[cfg(feature = "driver")]
pub mod serve;
#[cfg(feature = "driver")]
pub mod staging;
#[cfg(feature = "driver")]
pub mod synth;
#[cfg(feature = "driver")]
pub mod synth_tokenizer;
