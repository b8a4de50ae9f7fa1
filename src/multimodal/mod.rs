//! Media: fetching it safely, decoding images, precomputed embeddings.

pub mod fetch;
pub mod image;
