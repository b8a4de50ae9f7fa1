//! Kestrel: serve vision-language models on hand-written CUDA kernels.
//!
//! Layout (docs/architecture.md has the longer story):
//! - `cuda`   device context, stream, memory pool, kernel registry, cuBLAS
//! - `dtype`  element types (below `cuda` and `tensor`, which both use them)
//! - `tensor` a minimal tensor over host (f32/i32) or device memory
//! - `sampling` the sampling math (OpenAI/vLLM semantics) that `ops` and `engine` share
//! - `hub`    model ids: the Hugging Face cache, downloads into it
//! - `model`  the model contract, the registry of families and their code
//! - `ops`    every op with a CPU f32 reference and a CUDA launcher
//! - `openai` OpenAI-compatible request/response bodies and media loading
//! - `server` the OpenAI-compatible HTTP server (`kestrel serve`)
//! - `structured` output constraints (JSON schema, regex, choices, Lark or GBNF grammars) on llguidance

pub mod cli;
pub mod cuda;
pub mod dtype;
pub mod engine;
pub mod error;
pub mod hub;
pub mod ops;
pub mod sampling;
pub mod tensor;

pub use error::{Error, Result};
pub use tensor::{DType, Device, Tensor};
pub mod model;
pub mod multimodal;
pub mod openai;
pub mod server;
pub mod structured;
pub mod text;
