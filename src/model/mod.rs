//! Models: the contract the engine serves (`contract`), the registry of
//! families, the shared parts (the decoder, vision encoders, connectors,
//! config reading, safetensors loading) and one folder per family.

pub mod builtin;
pub mod config;
pub mod connector;
pub mod contract;
pub mod decoder;
pub mod inputs;
pub mod layers;
pub mod llava;
pub mod phi3v;
pub mod qwen2_vl;
pub mod registry;
pub mod seq;
pub mod vision;
pub mod weights;

pub use contract::{Family, Model, ModelSpec, Processor};

use std::path::Path;
use std::sync::Arc;

use crate::error::Result;
use crate::tensor::Device;

/// Loads the model folder `dir` onto `dev` with its family's code.
pub fn load(dir: &Path, dev: &Device) -> Result<Box<dyn Model>> {
    (registry::detect(dir)?.load)(dir, dev)
}

/// The prompt side of the model folder `dir`.
pub fn processor(dir: &Path) -> Result<Arc<dyn Processor>> {
    (registry::detect(dir)?.processor)(dir)
}
