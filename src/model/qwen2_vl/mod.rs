//! Qwen2-VL (transformers `models/qwen2_vl/`).

pub mod mrope;
pub mod processor;
