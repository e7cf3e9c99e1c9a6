//! panguc: the compiler driver. Imports Hugging Face checkpoints, runs the
//! pass pipeline, and writes packages; `main.rs` is the CLI over this library.

pub mod ascend_build;
pub mod bench;
pub mod commands;
pub mod frontend;
pub mod import;
pub mod inspect;
pub mod package_build;
pub mod partition_build;
pub mod pipeline;
pub mod synth;
pub mod synth_tokenizer;
