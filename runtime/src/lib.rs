//! panguc-runtime: loads compiled packages and generates tokens.
//!
//! Owns the continuous-batching scheduler, the KV block allocator and the
//! sampling shared by every engine (the
//! reference interpreter, compiled CPU kernels, the AscendC simulation),
//! the package format and loader, buffers and the KV cache, and text:
//! the tokenizer and chat prompts a server and the CLI share.

pub mod batch;
pub mod bench;
pub mod chat;
pub mod collective;
pub mod engine;
pub mod generate;
pub mod kv_blocks;
pub mod loader;
pub mod memory;
pub mod multirank;
pub mod package;
pub mod pool;
pub mod scheduler;
pub mod stamp;
pub mod tokenizer;

pub use batch::{generate_batch, BatchEngine, PerSequenceEngines, SeqId, StepChunk};
pub use engine::{thread_pool, CpuEngine, EngineOptions};
pub use generate::{generate, generate_streaming, Engine, Generation, Sampler, Sampling};
pub use loader::{open_package, open_package_with, OpenOptions, Package};
pub use multirank::{MultiRankEngine, RankEngine, RankPackages};
pub use package::{is_package, Manifest, PACKAGE_FORMAT_VERSION};
pub use pool::WorkerPool;
pub use scheduler::{FinishReason, Request, Scheduler, SchedulerConfig, SchedulerStats};
pub use tokenizer::{TextStream, Tokenizer};
