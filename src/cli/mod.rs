//! Subcommands of the `kestrel` binary that are more than a few lines.

pub mod batch;
pub mod bench;
pub mod bench_preprocess;
pub mod compare;
pub mod engine_args;
pub mod generate;
pub mod serve;
