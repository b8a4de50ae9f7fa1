//! Subcommands of the `kestrel` binary that are more than a few lines.
//! `kestrel bench …` lives in the bench* modules, one per subcommand, with
//! the rooflines they report against in `roofline`.

pub mod batch;
pub mod bench;
pub mod bench_decode;
pub mod bench_grammar;
pub mod bench_kernels;
pub mod bench_preprocess;
pub mod bench_serve;
pub mod bench_startup;
pub mod compare;
pub mod engine_args;
pub mod generate;
pub mod model_args;
pub mod roofline;
pub mod serve;
pub mod tool_flags;
pub mod vllm_flags;
