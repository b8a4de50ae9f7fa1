//! The `kestrel` command line.

use clap::{Parser, Subcommand};

use kestrel::cuda::{registry, Gpu, HAVE_KERNELS};

#[derive(Parser)]
#[command(name = "kestrel", version, about = "Serve vision-language models on hand-written CUDA kernels")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the model over an OpenAI-compatible HTTP API (as `vllm serve`).
    Serve(Box<kestrel::cli::serve::ServeArgs>),
    /// Answer one prompt (with images) greedily and print the answer.
    Generate(kestrel::cli::generate::GenerateArgs),
    /// Measure the engine (see `kestrel bench --help`).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Our logits on HF's tokens for a golden folder (tools/gpu_compare.sh).
    #[command(hide = true)]
    CompareHf(kestrel::cli::compare::CompareArgs),
    /// What this build holds and which GPU it sees.
    Info {
        /// Fail (exit 1) unless a GPU with the kernels is usable.
        #[arg(long)]
        require_gpu: bool,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Offline serving throughput at fixed concurrency (synthetic image + text requests).
    Throughput(kestrel::cli::bench::ThroughputArgs),
    /// Image decode, resize and patchify times, stage by stage (synthetic photo).
    Preprocess(kestrel::cli::bench_preprocess::PreprocessArgs),
}

fn main() {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            if let Err(e) = kestrel::cli::serve::run(&args) {
                eprintln!("kestrel serve: {e}");
                std::process::exit(1);
            }
        }
        Command::Info { require_gpu } => std::process::exit(info(require_gpu)),
        Command::Bench(BenchCommand::Throughput(args)) => match kestrel::cli::bench::throughput(&args) {
            Ok(report) => print!("{report}"),
            Err(e) => {
                eprintln!("kestrel bench throughput: {e}");
                std::process::exit(1);
            }
        },
        Command::Bench(BenchCommand::Preprocess(args)) => match kestrel::cli::bench_preprocess::run(&args) {
            Ok(report) => print!("{report}"),
            Err(e) => {
                eprintln!("kestrel bench preprocess: {e}");
                std::process::exit(1);
            }
        },
        Command::CompareHf(args) => {
            if let Err(e) = kestrel::cli::compare::run(&args) {
                eprintln!("kestrel compare-hf: {e}");
                std::process::exit(1);
            }
        }
        Command::Generate(args) => match kestrel::cli::generate::run(&args) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("kestrel generate: {e}");
                std::process::exit(1);
            }
        },
    }
}

fn info(require_gpu: bool) -> i32 {
    println!("kestrel {}", env!("CARGO_PKG_VERSION"));
    if HAVE_KERNELS {
        let names: Vec<&str> = registry::module_names().collect();
        println!("CUDA kernels: embedded ({} modules: {})", names.len(), names.join(", "));
    } else {
        println!("CUDA kernels: not built in (nvcc was missing at build time; run tools/install_cuda.sh and rebuild)");
    }
    match Gpu::new(0) {
        Ok(gpu) => {
            let (maj, min) = gpu.capability();
            println!("GPU 0: {} (sm_{maj}{min}, {} SMs)", gpu.name(), gpu.sm_count());
            0
        }
        Err(e) => {
            println!("GPU: none usable: {e}");
            if require_gpu {
                1
            } else {
                0
            }
        }
    }
}
