//! The serving engine: requests, scheduling, sampling.

pub mod sampling;
