//! Media: fetching it safely, decoding images, precomputed embeddings.

pub mod embeds;
pub mod fetch;
pub mod image;
