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

/// `kestrel bench …`: one variant per measurement, each in its own
/// src/cli/bench_*.rs module, dispatched in `bench` below.
#[derive(Subcommand)]
enum BenchCommand {
    /// Offline serving throughput at fixed concurrency (synthetic image + text requests).
    Throughput(kestrel::cli::bench::ThroughputArgs),
    /// Load a running server's chat endpoint (as `vllm bench serve --dataset-name random-mm`).
    Serve(Box<kestrel::cli::bench_serve::ServeBenchArgs>),
    /// Steady-state decode tokens/s at batch sizes, against the bandwidth roofline.
    Decode(kestrel::cli::bench_decode::DecodeArgs),
    /// Each kernel's GB/s or TFLOP/s against ceilings measured in the same run.
    Kernels(kestrel::cli::bench_kernels::KernelsArgs),
    /// Process start of `kestrel serve` to /health ready and to the first token.
    Startup(kestrel::cli::bench_startup::StartupArgs),
    /// Image decode, resize and patchify times, stage by stage (synthetic photo).
    Preprocess(kestrel::cli::bench_preprocess::PreprocessArgs),
    /// A JSON-schema constraint's cost per token on the CPU (masks over the model's vocabulary).
    Grammar(kestrel::cli::bench_grammar::GrammarArgs),
}

fn main() {
    let cli = Cli::parse_from(kestrel::cli::vllm_flags::rewrite_args(std::env::args_os()));
    match cli.command {
        Command::Serve(args) => {
            if let Err(e) = kestrel::cli::serve::run(&args) {
                eprintln!("kestrel serve: {e}");
                std::process::exit(1);
            }
        }
        Command::Info { require_gpu } => std::process::exit(info(require_gpu)),
        Command::Bench(cmd) => std::process::exit(bench(cmd)),
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

/// Runs one bench subcommand, prints its report; the exit status.
fn bench(cmd: BenchCommand) -> i32 {
    use kestrel::cli::{
        bench, bench_decode, bench_grammar, bench_kernels, bench_preprocess, bench_serve, bench_startup,
    };
    let (name, result) = match cmd {
        BenchCommand::Throughput(args) => ("throughput", bench::throughput(&args)),
        BenchCommand::Decode(args) => ("decode", bench_decode::decode(&args)),
        BenchCommand::Kernels(args) => ("kernels", bench_kernels::kernels(&args)),
        BenchCommand::Preprocess(args) => ("preprocess", bench_preprocess::run(&args)),
        BenchCommand::Grammar(args) => ("grammar", bench_grammar::run(&args)),
        BenchCommand::Startup(args) => ("startup", bench_startup::startup(&args).map(|(report, _)| report)),
        BenchCommand::Serve(args) => match bench_serve::serve(&args) {
            // Failed requests are in the report and the JSON; the status says so too.
            Ok((report, s)) => {
                print!("{report}");
                return i32::from(s.failed > 0);
            }
            Err(e) => ("serve", Err(e)),
        },
    };
    match result {
        Ok(report) => {
            print!("{report}");
            0
        }
        Err(e) => {
            eprintln!("kestrel bench {name}: {e}");
            1
        }
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
    println!("model families (config.json architectures):");
    for f in kestrel::model::registry::FAMILIES {
        println!("  {:<9} {} — {}; e.g. {}", f.name, f.architectures.join(", "), f.tasks, f.examples.join(", "));
    }
    println!("GPU attention head dims: {:?} (the CPU backend takes any)", kestrel::ops::attention::HEAD_DIMS);
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
