//! Models: config parsing, safetensors loading, one folder per family.

pub mod builtin;
pub mod config;
pub mod layers;
pub mod qwen2_vl;
pub mod weights;
