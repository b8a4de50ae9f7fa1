//! The serving engine: one thread owns the device and runs continuous
//! batching over a paged KV cache; callers submit prepared requests and read
//! each one's events from a channel.
//!
//! - `request`   what goes in (settings) and what comes out (events, outputs)
//! - `engine`    the engine thread, its handle and the shared `Frontend`
//! - `core`      requests, sequences, stop checks; one `step` at a time
//! - `scheduler` which sequences run each step (vLLM v1's policy)
//! - `blocks`    the KV block pool
//! - `runner`    packs a step into one forward pass; sizes the KV cache
//! - `graphs`    decode steps replayed from CUDA graphs
//! - `sampling`  the sampler (`crate::sampling`, re-exported: `ops` uses its math too)
//! - `pooling`   the embedding task: pooling and normalization
//! - `fault`     fault injection for the server's tests (debug builds only)

pub mod blocks;
pub mod core;
#[allow(clippy::module_inception)] // engine::engine holds the Engine type, as vLLM's engine/ package does
pub mod engine;
pub mod fault;
pub mod graphs;
pub mod pooling;
pub mod request;
pub mod runner;
pub use crate::sampling;
pub mod scheduler;

pub use engine::{Engine, EngineConfig, EngineStats, Frontend};
pub use pooling::{Pooling, PoolingConfig, Task};
pub use request::{Event, FinishReason, Request, RequestId, RequestOutput, RequestParams};
