//! Kernel microbenchmarks on the GPU: `cargo bench --bench kernels`, the
//! same run as `kestrel bench kernels` (src/cli/bench_kernels.rs has the
//! measurements): ceilings first, then each kernel's rate and its ratio to
//! them. Without a GPU it says it skipped and exits 0.

use kestrel::cli::bench_kernels::{kernels, KernelsArgs};

fn main() {
    match kernels(&KernelsArgs { json: None }) {
        Ok(table) => print!("{table}"),
        Err(e) => {
            eprintln!("benchmark failed: {e}");
            std::process::exit(1);
        }
    }
}
