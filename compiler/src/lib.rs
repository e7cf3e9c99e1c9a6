//! panguc: the compiler driver. Imports Hugging Face checkpoints, runs the
//! pass pipeline, and writes packages; `main.rs` is the CLI over this library.

pub mod commands;
pub mod frontend;
pub mod import;
pub mod inspect;
pub mod synth;
