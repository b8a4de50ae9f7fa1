//! `kestrel bench kernels` (and `cargo bench --bench kernels`): each
//! kernel's GB/s or TFLOP/s against ceilings measured on the same card in
//! the same run.
//!
//! First the two ceilings: device copy bandwidth (bytes read + written by a
//! 1 GiB device-to-device copy) and the cuBLAS bf16 GEMM rate (8192³). Then
//! each kernel at a size that fills the chip, its median time over 50 runs
//! (CUDA events, after warm-up), the bytes it must move (each input read
//! once, each output written once) or the flops it must do, and the ratio to
//! the matching ceiling. Inputs are larger than L2 (50 MB on an H100), or
//! calls cycle through inputs that together are, so repeated runs measure
//! DRAM. Without a GPU it says it skipped.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use crate::cli::roofline::Ceilings;
use crate::cuda::Gpu;
use crate::engine::sampling::SamplingParams;
use crate::error::{Error, Result};
use crate::ops::{activation, attention, bitmask, gemm, norm, sampling, softmax};
use crate::{DType, Device, Tensor};

const WARMUP: usize = 5;
const ITERS: usize = 50;

#[derive(clap::Args, Debug)]
pub struct KernelsArgs {
    /// Also write the ceilings and every row to this file as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One measured kernel (or ceiling) and the ceiling it is held against.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub name: String,
    pub shape: String,
    pub ms: f64,
    pub rate: f64,
    pub unit: &'static str,
    pub ceiling: f64,
}

/// Everything one run measured.
#[derive(Debug, Serialize)]
pub struct KernelReport {
    pub device: String,
    pub capability: String,
    pub ceilings: Ceilings,
    pub rows: Vec<Row>,
}

/// The subcommand: the table (and `--json`), or a line saying it skipped.
pub fn kernels(args: &KernelsArgs) -> Result<String> {
    let gpu = match Gpu::new(0) {
        Ok(g) => g,
        Err(e) => {
            let why = format!("no GPU: {e}");
            write_json(&args.json, &serde_json::json!({ "skipped": why }))?;
            return Ok(format!("kernel benchmarks skipped: {why}\n"));
        }
    };
    let report = run(&gpu)?;
    write_json(&args.json, &serde_json::to_value(&report).map_err(|e| Error::Engine(e.to_string()))?)?;
    Ok(report.table())
}

fn write_json(path: &Option<PathBuf>, v: &serde_json::Value) -> Result<()> {
    let Some(p) = path else { return Ok(()) };
    std::fs::write(p, format!("{v:#}\n")).map_err(|source| Error::Io { path: p.display().to_string(), source })
}

impl KernelReport {
    pub fn table(&self) -> String {
        let mut s = format!(
            "kernel benchmarks on {} ({}), median of {ITERS} runs unless noted\n\
             ceilings: copy {:.1} GB/s, gemm bf16 {:.1} TFLOP/s\n",
            self.device, self.capability, self.ceilings.copy_gbps, self.ceilings.gemm_tflops
        );
        s +=
            &format!("{:<22} {:<26} {:>10} {:>12} {:>8} {:>9}\n", "kernel", "shape", "ms", "rate", "unit", "% ceiling");
        for r in &self.rows {
            s += &format!(
                "{:<22} {:<26} {:>10.4} {:>12.1} {:>8} {:>8.1}%\n",
                r.name,
                r.shape,
                r.ms,
                r.rate,
                r.unit,
                100.0 * r.rate / r.ceiling
            );
        }
        s
    }
}

fn median(mut v: Vec<f32>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2] as f64
}

/// Uniform values in [-scale, scale) from a 64-bit LCG, as `dtype`.
fn rand_of(dev: &Device, shape: &[usize], scale: f32, seed: &mut u64, dtype: DType) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|_| {
            *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((*seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
        })
        .collect();
    Tensor::from_f32(dev, shape, &data, dtype)
}

fn rand_tensor(dev: &Device, shape: &[usize], scale: f32, seed: &mut u64) -> Result<Tensor> {
    rand_of(dev, shape, scale, seed, DType::BF16)
}

fn gb(bytes: usize, ms: f64) -> f64 {
    bytes as f64 / (ms * 1e-3) / 1e9
}

/// Ceiling 1: device copy bandwidth, bytes read + written by a 1 GiB copy.
pub fn measure_copy(gpu: &Arc<Gpu>) -> Result<Row> {
    let bytes = 1usize << 30;
    let (a, b) = (gpu.alloc(bytes)?, gpu.alloc(bytes)?);
    gpu.memset(&a, 0x3c)?;
    let ms = median(gpu.time_ms(WARMUP, 20, || gpu.copy(&b, &a, bytes))?);
    let rate = gb(2 * bytes, ms);
    Ok(Row { name: "copy (ceiling)".into(), shape: "1 GiB".into(), ms, rate, unit: "GB/s", ceiling: rate })
}

/// Ceiling 2: the cuBLAS bf16 GEMM rate at 8192³.
pub fn measure_gemm(gpu: &Arc<Gpu>) -> Result<Row> {
    let dev = Device::Cuda(gpu.clone());
    let mut seed = 54321u64;
    let (m, n, k) = (8192, 8192, 8192);
    let x = rand_tensor(&dev, &[m, k], 1.0, &mut seed)?;
    let w = rand_tensor(&dev, &[n, k], 1.0, &mut seed)?;
    let mut y = Tensor::empty(&dev, &[m, n], DType::BF16)?;
    let ms = median(gpu.time_ms(WARMUP, 20, || gemm::gemm(&mut y, &x, &w))?);
    let rate = 2.0 * (m * n * k) as f64 / (ms * 1e-3) / 1e12;
    Ok(Row {
        name: "gemm bf16 (ceiling)".into(),
        shape: format!("{m}x{n}x{k}"),
        ms,
        rate,
        unit: "TFLOP/s",
        ceiling: rate,
    })
}

/// The ceilings, then every kernel.
pub fn run(gpu: &Arc<Gpu>) -> Result<KernelReport> {
    let dev = Device::Cuda(gpu.clone());
    let mut seed = 12345u64;
    let (copy, gemm_row) = (measure_copy(gpu)?, measure_gemm(gpu)?);
    let ceil = Ceilings { copy_gbps: copy.rate, gemm_tflops: gemm_row.rate };
    let mut rows = vec![copy, gemm_row];

    // Memory-bound kernels: bytes over the copy ceiling.
    let mut mem = |name: &str, shape: String, bytes: usize, f: &mut dyn FnMut() -> Result<()>| -> Result<()> {
        let ms = median(gpu.time_ms(WARMUP, ITERS, &mut *f)?);
        rows.push(Row { name: name.into(), shape, ms, rate: gb(bytes, ms), unit: "GB/s", ceiling: ceil.copy_gbps });
        Ok(())
    };
    {
        let (r, c) = (16384, 4096);
        let x = rand_tensor(&dev, &[r, c], 1.0, &mut seed)?;
        let wt = rand_tensor(&dev, &[c], 1.0, &mut seed)?;
        let mut o = Tensor::empty(&dev, &[r, c], DType::BF16)?;
        mem("rms_norm", format!("{r}x{c} bf16"), 2 * r * c * 2 + c * 2, &mut || norm::rms_norm(&mut o, &x, &wt, 1e-6))?;
        let bt = rand_tensor(&dev, &[c], 1.0, &mut seed)?;
        mem("layer_norm", format!("{r}x{c} bf16"), 2 * r * c * 2 + 2 * c * 2, &mut || {
            norm::layer_norm(&mut o, &x, &wt, &bt, 1e-6)
        })?;
        let mut res = rand_tensor(&dev, &[r, c], 1.0, &mut seed)?;
        mem("add_rms_norm", format!("{r}x{c} bf16"), 4 * r * c * 2 + c * 2, &mut || {
            norm::add_rms_norm(&mut o, &mut res, &x, &wt, 1e-6)
        })?;
    }
    {
        let (r, i) = (4096, 8960);
        let x = rand_tensor(&dev, &[r, 2 * i], 1.0, &mut seed)?;
        let mut o = Tensor::empty(&dev, &[r, i], DType::BF16)?;
        mem("silu_and_mul", format!("{r}x{i} bf16"), 3 * r * i * 2, &mut || activation::silu_and_mul(&mut o, &x))?;
    }
    {
        let (r, v) = (256, 151936);
        let x = rand_tensor(&dev, &[r, v], 5.0, &mut seed)?;
        let mut o = Tensor::empty(&dev, &[r, v], DType::BF16)?;
        mem("softmax", format!("{r}x{v} bf16"), 2 * r * v * 2, &mut || softmax::softmax(&mut o, &x))?;
    }

    // Paged decode attention at the Qwen2-VL-2B shape (12 query heads over 2 kv
    // heads of 128, blocks of 16 tokens): bytes of K and V read over the copy
    // ceiling (q, out and the block tables are < 0.1% of them). The cache holds
    // at least 256 MB of sequences on shuffled blocks and each call reads the
    // next batch of them, so repeated calls read DRAM, not L2.
    for (batch, ctx) in [(1usize, 512usize), (1, 4096), (64, 512), (64, 4096)] {
        let (h, kvh, d, bs) = (12, 2, 128, 16);
        let seq_bytes = 2 * ctx * kvh * d * 2; // K and V of one sequence, bf16
        let calls = (256usize << 20).div_ceil(seq_bytes * batch); // distinct batches in the cache
        let per_seq = ctx / bs;
        let num_blocks = calls * batch * per_seq;
        let kc = rand_tensor(&dev, &[num_blocks, bs, kvh, d], 1.0, &mut seed)?;
        let vc = rand_tensor(&dev, &[num_blocks, bs, kvh, d], 1.0, &mut seed)?;
        let mut ids: Vec<i32> = (0..num_blocks as i32).collect();
        for i in (1..ids.len()).rev() {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ids.swap(i, (seed >> 33) as usize % (i + 1));
        }
        let tables = ids
            .chunks(batch * per_seq)
            .map(|t| Tensor::from_i32(&dev, &[batch, per_seq], t))
            .collect::<Result<Vec<_>>>()?;
        let q = rand_tensor(&dev, &[batch, h, d], 1.0, &mut seed)?;
        let cu = Tensor::from_i32(&dev, &[batch + 1], &(0..=batch as i32).collect::<Vec<_>>())?;
        let lens = Tensor::from_i32(&dev, &[batch], &vec![ctx as i32; batch])?;
        let mut o = Tensor::empty(&dev, &[batch, h, d], DType::BF16)?;
        let (scale, mut call) = (1.0 / (d as f32).sqrt(), 0);
        mem(
            "paged_attention decode",
            format!("b{batch} ctx{ctx} {h}/{kvh} d{d} b{bs}"),
            batch * seq_bytes,
            &mut || {
                call += 1;
                attention::paged_attention(&mut o, &q, &kc, &vc, &cu, &lens, &tables[call % calls], 1, scale)
            },
        )?;
    }
    rows.extend(split_decode_rows(gpu, ceil.copy_gbps, &mut seed)?);
    rows.extend(decode_gemm_rows(gpu, ceil.copy_gbps, &mut seed)?);

    // Attention: flops over the GEMM ceiling. These prefill shapes run on the
    // tensor-core kernel (bf16, sequences of FLASH_MIN_SEQLEN_Q queries or
    // more): causal 4k prefills with 16/16 and Qwen2-VL-2B's 12/2 heads of
    // 128, non-causal 1k, and the ViT's varlen batch (4 images of 36x36
    // patches, 16 heads of 80, non-causal), and SigLIP-so400m's (4 images of
    // 27x27 patches, 16 heads of 72, non-causal) beside the same batch at
    // head dim 80: the tensor-core kernel pads 72 to 80, so the two should
    // take about the same time. Flops: 4 · d per (query, key, head) pair a
    // query may see (QKᵀ and PV, 2 each), d the model's head dim.
    let vit = [1296usize; 4];
    let siglip = [729usize; 4];
    let shapes: [(&str, &[usize], usize, usize, usize, bool); 7] = [
        ("attention causal", &[4096], 16, 16, 128, true),
        ("attention causal", &[4096], 12, 2, 128, true),
        ("attention full", &[1024], 16, 16, 128, false),
        ("attention full", &[4096], 16, 16, 128, false),
        ("attention ViT", &vit, 16, 16, 80, false),
        ("attention SigLIP", &siglip, 16, 16, 72, false),
        ("attention SigLIP", &siglip, 16, 16, 80, false),
    ];
    for (name, seqs, h, kvh, d, causal) in shapes {
        let total: usize = seqs.iter().sum();
        let q = rand_tensor(&dev, &[total, h, d], 1.0, &mut seed)?;
        let kk = rand_tensor(&dev, &[total, kvh, d], 1.0, &mut seed)?;
        let vv = rand_tensor(&dev, &[total, kvh, d], 1.0, &mut seed)?;
        let mut cu = vec![0i32];
        for &l in seqs {
            cu.push(cu[cu.len() - 1] + l as i32);
        }
        let cu = Tensor::from_i32(&dev, &[cu.len()], &cu)?;
        let max_q = seqs.iter().copied().max().unwrap_or(0);
        let mut o = Tensor::empty(&dev, &[total, h, d], DType::BF16)?;
        let scale = 1.0 / (d as f32).sqrt();
        let ms =
            median(gpu.time_ms(2, 10, || attention::attention(&mut o, &q, &kk, &vv, &cu, &cu, max_q, causal, scale))?);
        let pairs: usize = seqs.iter().map(|&l| if causal { l * (l + 1) / 2 } else { l * l }).sum();
        let flops = 4.0 * (pairs * h * d) as f64;
        let lens = if seqs.len() > 1 { format!("{}x{}", seqs.len(), seqs[0]) } else { seqs[0].to_string() };
        rows.push(Row {
            name: name.into(),
            shape: format!("{lens} tok, {h}/{kvh} d{d}"),
            ms,
            rate: flops / (ms * 1e-3) / 1e12,
            unit: "TFLOP/s",
            ceiling: ceil.gemm_tflops,
        });
    }

    rows.extend(bench_sampling(gpu, &dev, ceil.copy_gbps, &mut seed)?);
    rows.extend(bench_bitmask(gpu, &dev, ceil.copy_gbps, &mut seed)?);

    let (maj, min) = gpu.capability();
    Ok(KernelReport { device: gpu.name().to_owned(), capability: format!("sm_{maj}{min}"), ceilings: ceil, rows })
}

/// The GPU a benchmark on `device` (cpu, cuda, auto) would run on, if any.
fn usable_gpu(device: &str) -> Option<Arc<Gpu>> {
    match device {
        "cpu" => None,
        _ => Gpu::new(0).ok(),
    }
}

/// The ceilings a benchmark holds its figures against: those given on the
/// command line, the rest measured here when `device` may be a GPU and one
/// is usable (before the engine takes its memory); None on the CPU.
pub fn ceilings_for(device: &str, copy_gbps: Option<f64>, gemm_tflops: Option<f64>) -> Result<Option<Ceilings>> {
    if let (Some(copy_gbps), Some(gemm_tflops)) = (copy_gbps, gemm_tflops) {
        return Ok(Some(Ceilings { copy_gbps, gemm_tflops }));
    }
    let Some(gpu) = usable_gpu(device) else { return Ok(None) };
    let copy_gbps = match copy_gbps {
        Some(c) => c,
        None => measure_copy(&gpu)?.rate,
    };
    let gemm_tflops = match gemm_tflops {
        Some(g) => g,
        None => measure_gemm(&gpu)?.rate,
    };
    Ok(Some(Ceilings { copy_gbps, gemm_tflops }))
}

/// The copy bandwidth in GB/s, measured when `device` may be a GPU and one is usable.
pub fn copy_ceiling_for(device: &str) -> Result<Option<f64>> {
    usable_gpu(device).map(|g| measure_copy(&g).map(|r| r.rate)).transpose()
}

// ----------------------------------------------------------------------------
// Split-K decode attention (src/ops/flash_decoding.rs), unsplit against split.

/// Batch-1 and batch-64 decode at 4k context, Qwen2-VL-2B (12/2 heads of 128)
/// and 7B (28/4) shapes, blocks of 16, each with `Split::Never` (one block
/// per sequence and kv head) and `Split::Auto` (the partitions the model
/// gets; the count is printed). GB/s = K and V bytes read / time, over the
/// copy ceiling; calls cycle through >= 256 MB of shuffled blocks (DRAM, not L2).
fn split_decode_rows(gpu: &Arc<Gpu>, copy_gbs: f64, seed: &mut u64) -> Result<Vec<Row>> {
    use attention::Split;
    let dev = Device::Cuda(gpu.clone());
    let mut rows = Vec::new();
    for (batch, ctx, h, kvh) in
        [(1usize, 4096usize, 12usize, 2usize), (64, 4096, 12, 2), (1, 4096, 28, 4), (64, 4096, 28, 4)]
    {
        let (d, bs) = (128, 16);
        let seq_bytes = 2 * ctx * kvh * d * 2; // K and V of one sequence, bf16
        let calls = (256usize << 20).div_ceil(seq_bytes * batch);
        let per_seq = ctx / bs;
        let num_blocks = calls * batch * per_seq;
        let kc = rand_tensor(&dev, &[num_blocks, bs, kvh, d], 1.0, seed)?;
        let vc = rand_tensor(&dev, &[num_blocks, bs, kvh, d], 1.0, seed)?;
        let mut ids: Vec<i32> = (0..num_blocks as i32).collect();
        for i in (1..ids.len()).rev() {
            *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ids.swap(i, (*seed >> 33) as usize % (i + 1));
        }
        let tables = ids
            .chunks(batch * per_seq)
            .map(|t| Tensor::from_i32(&dev, &[batch, per_seq], t))
            .collect::<Result<Vec<_>>>()?;
        let q = rand_tensor(&dev, &[batch, h, d], 1.0, seed)?;
        let cu = Tensor::from_i32(&dev, &[batch + 1], &(0..=batch as i32).collect::<Vec<_>>())?;
        let lens = Tensor::from_i32(&dev, &[batch], &vec![ctx as i32; batch])?;
        let mut o = Tensor::empty(&dev, &[batch, h, d], DType::BF16)?;
        let scale = 1.0 / (d as f32).sqrt();
        let parts = attention::auto_splits(batch, kvh, 1, ctx, gpu.sm_count().max(1) as usize);
        for (split, name) in
            [(Split::Never, "paged decode unsplit".to_string()), (Split::Auto, format!("paged decode split {parts}"))]
        {
            let mut call = 0;
            let ms = median(gpu.time_ms(WARMUP, ITERS, || {
                call += 1;
                let t = &tables[call % calls];
                attention::paged_attention_with(&mut o, &q, &kc, &vc, &cu, &lens, t, 1, scale, split)
            })?);
            let rate = (batch * seq_bytes) as f64 / (ms * 1e-3) / 1e9;
            let shape = format!("b{batch} ctx{ctx} {h}/{kvh} d{d} b{bs}");
            rows.push(Row { name, shape, ms, rate, unit: "GB/s", ceiling: copy_gbs });
        }
    }
    Ok(rows)
}

// ----------------------------------------------------------------------------
// Sampling (ops::sampling): a decode step's 64 rows over the Qwen2-VL vocabulary.

/// `sample_f32` on 64 rows of 151936 f32 logits for several settings: the
/// median time and the logits bytes read once over the copy ceiling. The
/// kernel reads each row more than once (argmax, then one pass per radix
/// level and one for the draw, from L2), so the ratio says how far it is
/// from one read. Calls alternate between two logits tensors (78 MB, over
/// L2); penalties edit their rows a little more each call, which does not
/// change the work.
fn bench_sampling(gpu: &Arc<Gpu>, dev: &Device, copy_gbs: f64, seed: &mut u64) -> Result<Vec<Row>> {
    let (r, v) = (64usize, 151936usize);
    let mut logits = [rand_f32(dev, &[r, v], 8.0, seed)?, rand_f32(dev, &[r, v], 8.0, seed)?];
    let mut out = Tensor::empty(dev, &[r], DType::I32)?;
    let prompt: Vec<u32> = (0..2000u32).map(|i| i * 37 % v as u32).collect();
    let output: Vec<u32> = (0..200u32).map(|i| i * 101 % v as u32).collect();
    let settings: [(&str, SamplingParams); 5] = [
        ("greedy", SamplingParams::greedy()),
        ("temperature", SamplingParams::default()),
        ("top_k 50", SamplingParams { top_k: 50, ..Default::default() }),
        ("top_p 0.9", SamplingParams { top_p: 0.9, ..Default::default() }),
        (
            "all + penalties",
            SamplingParams {
                top_k: 50,
                top_p: 0.9,
                min_p: 0.05,
                repetition_penalty: 1.1,
                frequency_penalty: 0.5,
                presence_penalty: 0.5,
                ..Default::default()
            },
        ),
    ];
    let mut rows = Vec::new();
    for (name, params) in &settings {
        let specs: Vec<sampling::SampleRow> = (0..r)
            .map(|i| sampling::SampleRow {
                row: i,
                params,
                u: (i as f64 + 0.5) / r as f64,
                prompt: &prompt,
                output: &output,
                banned: Vec::new(),
            })
            .collect();
        let mut call = 0;
        let ms = median(gpu.time_ms(WARMUP, ITERS, || {
            call += 1;
            sampling::sample(&mut out, &mut logits[call % 2], &specs)
        })?);
        let bytes = r * v * 4;
        rows.push(Row {
            name: format!("sample {name}"),
            shape: format!("{r}x{v} f32"),
            ms,
            rate: bytes as f64 / (ms * 1e-3) / 1e9,
            unit: "GB/s",
            ceiling: copy_gbs,
        });
    }
    Ok(rows)
}

// ----------------------------------------------------------------------------
// Token bitmask (ops::bitmask): a decode step's 64 constrained rows.

/// `apply_token_bitmask_f32` on 64 rows of 151936 f32 logits. Bytes: the
/// logits once (every 128-byte line holds a forbidden token at these
/// densities, so each is written, whole or in part; the kernel reads none)
/// plus the masks, over the copy ceiling. Masks allow 1 token in 16 (a
/// grammar in mid-value) or half of them; the kernel rows launch on masks
/// already on the device, the op row includes its two uploads from pageable
/// host memory (the rows, and 1.2 MB of masks), which is what a step pays
/// today. Calls alternate between two logits tensors (78 MB, over L2).
fn bench_bitmask(gpu: &Arc<Gpu>, dev: &Device, copy_gbs: f64, seed: &mut u64) -> Result<Vec<Row>> {
    let (r, v) = (64usize, 151936usize);
    let words = v.div_ceil(32);
    let mut logits = [rand_f32(dev, &[r, v], 8.0, seed)?, rand_f32(dev, &[r, v], 8.0, seed)?];
    let ids: Vec<usize> = (0..r).collect();
    let ids32: Vec<i32> = (0..r as i32).collect();
    let rbuf = gpu.alloc(r * 4)?;
    gpu.upload(&rbuf, &ids32)?;
    let mut word = || {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (*seed >> 32) as u32
    };
    let half: Vec<u32> = (0..r * words).map(|_| word()).collect();
    let sparse: Vec<u32> = (0..r * words).map(|_| word() & word() & word() & word()).collect();
    let bytes = r * v * 4 + r * words * 4;
    let mut rows = Vec::new();
    for (name, masks) in [("1/16 allowed", &sparse), ("1/2 allowed", &half)] {
        let mbuf = gpu.alloc(masks.len() * 4)?;
        gpu.upload(&mbuf, masks)?;
        let mut call = 0;
        let ms = median(gpu.time_ms(WARMUP, ITERS, || {
            call += 1;
            let l = crate::ops::ptr(&logits[call % 2]);
            bitmask::launch(gpu, l, rbuf.ptr(), mbuf.ptr(), r, v, words)
        })?);
        rows.push(Row {
            name: format!("bitmask {name}"),
            shape: format!("{r}x{v} f32"),
            ms,
            rate: gb(bytes, ms),
            unit: "GB/s",
            ceiling: copy_gbs,
        });
    }
    let mut call = 0;
    let ms = median(gpu.time_ms(WARMUP, ITERS, || {
        call += 1;
        bitmask::apply_token_bitmask(&mut logits[call % 2], &ids, &sparse, words)
    })?);
    rows.push(Row {
        name: "bitmask op 1/16".into(),
        shape: format!("{r}x{v} f32 +upload"),
        ms,
        rate: gb(bytes, ms),
        unit: "GB/s",
        ceiling: copy_gbs,
    });
    Ok(rows)
}

/// f32 values uniform in [-scale, scale) on `dev` (logits are f32).
fn rand_f32(dev: &Device, shape: &[usize], scale: f32, seed: &mut u64) -> Result<Tensor> {
    rand_of(dev, shape, scale, seed, DType::F32)
}

// ----------------------------------------------------------------------------
// Decode GEMMs: cuBLAS on the Qwen2-VL-2B projections at decode batch sizes.

/// A decode step's GEMMs are weight reads: at m = 1 or 8 rows the rate that
/// matters is weight bytes over time, against the copy ceiling. Shapes: the
/// 2B model's q|k|v, gate|up, down, o and LM head; calls cycle through
/// enough weight copies to exceed L2.
fn decode_gemm_rows(gpu: &Arc<Gpu>, copy_gbs: f64, seed: &mut u64) -> Result<Vec<Row>> {
    let dev = Device::Cuda(gpu.clone());
    let mut rows = Vec::new();
    let shapes = [
        ("qkv", 2048usize, 1536usize),
        ("gate_up", 17920, 1536),
        ("down", 1536, 8960),
        ("o", 1536, 1536),
        ("lm_head", 151936, 1536),
    ];
    for (name, n, k) in shapes {
        let bytes = n * k * 2;
        let copies = (256usize << 20).div_ceil(bytes).max(1);
        let ws = (0..copies).map(|_| rand_tensor(&dev, &[n, k], 0.05, seed)).collect::<Result<Vec<_>>>()?;
        for m in [1usize, 8, 64] {
            let x = rand_tensor(&dev, &[m, k], 1.0, seed)?;
            let mut y = Tensor::empty(&dev, &[m, n], DType::BF16)?;
            let mut call = 0;
            let ms = median(gpu.time_ms(WARMUP, ITERS, || {
                call += 1;
                gemm::gemm(&mut y, &x, &ws[call % copies])
            })?);
            let name = format!("gemm decode {name}");
            rows.push(Row {
                name,
                shape: format!("m{m} n{n} k{k}"),
                ms,
                rate: gb(bytes, ms),
                unit: "GB/s",
                ceiling: copy_gbs,
            });
        }
    }
    Ok(rows)
}
