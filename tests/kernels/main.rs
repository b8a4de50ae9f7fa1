//! Kernel correctness suite: every GPU op against its CPU reference on fresh
//! random inputs with awkward sizes, and every CPU reference against an
//! independent f64 formulation.
//!
//! `cargo test --test kernels` runs it. Without a GPU the CPU checks still run
//! and the GPU checks are reported as skipped; with `KESTREL_REQUIRE_GPU=1` a
//! missing GPU is a failure. `KESTREL_SEED=N` replays a run; a filter
//! argument (`cargo test --test kernels -- rope`) runs the matching cases.

mod harness;

mod activation;
mod argmax;
mod attention;
mod bitmask;
mod copy;
mod embedding;
mod gemm;
mod norm;
mod paged;
mod qkv_rope;
mod rope;
mod sampling;
mod softmax;

use std::panic::{catch_unwind, AssertUnwindSafe};

use harness::{Case, Rng, Row};
use kestrel::Device;

fn all_cases() -> Vec<Case> {
    let mut v = Vec::new();
    v.extend(norm::cases());
    v.extend(rope::cases());
    v.extend(activation::cases());
    v.extend(embedding::cases());
    v.extend(gemm::cases());
    v.extend(softmax::cases());
    v.extend(argmax::cases());
    v.extend(attention::cases());
    v.extend(paged::cases());
    v.extend(qkv_rope::cases());
    v.extend(copy::cases());
    v.extend(sampling::cases());
    v.extend(bitmask::cases());
    v
}

fn main() {
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let seed = std::env::var("KESTREL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    let cases: Vec<Case> =
        all_cases().into_iter().filter(|c| filter.as_deref().is_none_or(|f| c.name.contains(f))).collect();

    let gpu = match Device::cuda(0) {
        Ok(dev) => Some(dev),
        Err(e) => {
            if std::env::var_os("KESTREL_REQUIRE_GPU").is_some() {
                eprintln!("kernel suite: KESTREL_REQUIRE_GPU is set but no GPU is usable: {e}");
                std::process::exit(1);
            }
            println!("kernel suite: GPU checks SKIPPED, no GPU: {e}");
            None
        }
    };
    if let Some(Device::Cuda(g)) = &gpu {
        let (maj, min) = g.capability();
        println!("kernel suite on {} (sm_{maj}{min}, {} SMs), seed {seed}", g.name(), g.sm_count());
    } else {
        println!("kernel suite on the CPU only, seed {seed}");
    }

    let mut rng = Rng::new(seed);
    let mut rows: Vec<Row> = Vec::new();
    let mut crashed: Vec<String> = Vec::new();
    for case in &cases {
        let r = catch_unwind(AssertUnwindSafe(|| {
            let rows = (case.run)(gpu.as_ref(), &mut rng);
            // Surface asynchronous kernel faults inside the case that caused them.
            if let Some(Device::Cuda(g)) = &gpu {
                g.synchronize().expect("GPU fault after the case");
            }
            rows
        }));
        match r {
            // A GPU-only case has nothing to check without a GPU; with one it must check something.
            Ok(r) if r.is_empty() && gpu.is_some() => crashed.push(format!("{}: produced no checks", case.name)),
            Ok(r) => rows.extend(r),
            Err(p) => {
                let msg =
                    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
                crashed.push(format!("{}: panicked: {}", case.name, msg.unwrap_or_default()));
            }
        }
    }

    println!(
        "\n{:<4} {:<22} {:<34} {:<5} {:>11} {:>11} {:>10}  result",
        "on", "op", "shape", "dtype", "max err", "tolerance", "rel l2"
    );
    for r in &rows {
        println!(
            "{:<4} {:<22} {:<34} {:<5} {:>11.3e} {:>11.3e} {:>10.2e}  {}",
            r.backend,
            r.op,
            r.shape,
            r.dtype,
            r.max_err,
            r.tol,
            r.rel_l2,
            if r.pass { "ok" } else { "FAIL" }
        );
    }
    for c in &crashed {
        println!("FAIL {c}");
    }
    let passed = rows.iter().filter(|r| r.pass).count();
    let failed = rows.len() - passed + crashed.len();
    let skipped = if gpu.is_none() { cases.len() } else { 0 };
    let gpu_rows = rows.iter().filter(|r| r.backend == "gpu").count();
    println!("\n{gpu_rows} GPU comparisons; seed {seed} (KESTREL_SEED={seed} replays it)");
    if skipped > 0 {
        println!("the GPU half of {skipped} cases was skipped: no GPU on this machine");
    }
    println!("kernels: {passed} passed, {failed} failed, {skipped} skipped");
    if failed > 0 {
        std::process::exit(1);
    }
}
