//! Subcommands of the `kestrel` binary that are more than a few lines.

pub mod bench;
pub mod compare;
pub mod generate;
