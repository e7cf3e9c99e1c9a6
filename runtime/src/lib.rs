//! panguc-runtime: loads compiled packages and generates tokens.
//!
//! Owns the generation loop and sampling shared by every engine (the
//! reference interpreter, compiled CPU kernels, the AscendC simulation),
//! the package format and loader, buffers and the KV cache.

pub mod generate;

pub use generate::{generate, Engine, Generation, Sampler, Sampling};
