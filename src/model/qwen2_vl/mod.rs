//! Qwen2-VL (transformers `models/qwen2_vl/`).

pub mod inputs;
pub mod model;
pub mod mrope;
pub mod processor;
pub mod text;
pub mod vision;

pub use model::Qwen2Vl;
