//! `kestrel bench throughput`: offline serving throughput of the engine, as
//! `vllm bench throughput` with its random-mm dataset measures it, but at a
//! fixed concurrency: C client threads each keep one request in flight (a
//! closed loop), every request carrying one synthetic image and a text prompt
//! of about `input_len` tokens, generating exactly `output_len` tokens
//! (ignore_eos). Inputs are prepared before the clock starts, so the figures
//! are the engine's: requests/s, output tokens/s, and per-request time to
//! first token and time per output token (mean and p50/p99), and the
//! output tokens/s against the workload's roofline (src/cli/roofline.rs) on
//! ceilings given or measured in the same run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use image::{Rgb, RgbImage};

use crate::cli::roofline::{self, Workload};
use crate::engine::request::Event;
use crate::engine::sampling::{Rng, SamplingParams};
use crate::engine::{Engine, Request, RequestParams};
use crate::error::{Error, Result};
use crate::model::inputs::PreparedInput;
use crate::multimodal::Media;

#[derive(clap::Args, Debug)]
pub struct ThroughputArgs {
    #[command(flatten)]
    pub model: crate::cli::model_args::ModelArgs,
    #[command(flatten)]
    pub engine: crate::cli::engine_args::EngineArgs,
    /// Requests in flight; a comma-separated list runs each in turn.
    #[arg(long, default_value = "1,8,64", value_delimiter = ',')]
    pub concurrency: Vec<usize>,
    /// Requests per concurrency level (default: 4 per client, at least 16).
    #[arg(long)]
    pub num_prompts: Option<usize>,
    /// Side of the square synthetic image in pixels; 0 for text only.
    #[arg(long, default_value_t = 512)]
    pub image_size: u32,
    /// Text tokens in each prompt (approximately: words of one token each).
    #[arg(long, default_value_t = 128)]
    pub input_len: usize,
    /// Tokens each request generates.
    #[arg(long, default_value_t = 128)]
    pub output_len: usize,
    /// Copy bandwidth in GB/s for the roofline (default: measured here on the GPU).
    #[arg(long)]
    pub copy_gbps: Option<f64>,
    /// bf16 GEMM rate in TFLOP/s for the roofline (default: measured here on the GPU).
    #[arg(long)]
    pub gemm_tflops: Option<f64>,
}

/// A seeded square noise image: every pixel differs, as a photograph's would.
pub fn synthetic_image(side: u32, seed: u64) -> RgbImage {
    synthetic_image_wh(side, side, seed)
}

/// A seeded noise image of `width` x `height`.
pub fn synthetic_image_wh(width: u32, height: u32, seed: u64) -> RgbImage {
    let mut rng = Rng::from_seed(seed);
    RgbImage::from_fn(width, height, |_, _| {
        let v = rng.next_u64();
        Rgb([v as u8, (v >> 8) as u8, (v >> 16) as u8])
    })
}

/// A text of `n` common one-token words, varied by `seed`.
pub fn synthetic_text(n: usize, seed: u64) -> String {
    const WORDS: [&str; 16] = [
        "the", "cat", "sat", "on", "a", "red", "mat", "and", "looked", "at", "blue", "sky", "while", "it", "was",
        "warm",
    ];
    let mut rng = Rng::from_seed(seed);
    (0..n).map(|_| WORDS[(rng.next_u64() % 16) as usize]).collect::<Vec<_>>().join(" ")
}

struct Sample {
    ttft: Duration,
    e2e: Duration,
    tokens: usize,
}

pub fn throughput(args: &ThroughputArgs) -> Result<String> {
    let dir = args.model.dir()?;
    let ceilings = crate::cli::bench_kernels::ceilings_for(&args.engine.device, args.copy_gbps, args.gemm_tflops)?;
    let t0 = Instant::now();
    let engine = Engine::start(args.engine.engine_config(dir)?)?;
    let fe = engine.frontend().clone();
    let mut report = format!(
        "model {} on {}: ready in {:.1} s; KV cache {} blocks x {} tokens\n",
        fe.model_name,
        fe.device,
        t0.elapsed().as_secs_f64(),
        fe.num_blocks,
        fe.block_size
    );
    let engine = Arc::new(engine);
    if let Some(c) = &ceilings {
        report += &format!("ceilings: copy {:.1} GB/s, gemm bf16 {:.1} TFLOP/s\n", c.copy_gbps, c.gemm_tflops);
    }
    report.push_str(
        "concurrency  requests  prompt tok  req/s    out tok/s  TTFT mean/p50/p99 ms    TPOT mean/p50/p99 ms  prep ms/req  roofline tok/s  % roofline\n",
    );
    // Weights and KV cache: bf16 on the GPU, f32 on the CPU.
    let dtype_bytes = if fe.device == "cpu" { 4 } else { 2 };
    for &c in &args.concurrency {
        if c == 0 {
            return Err(Error::InvalidInput("--concurrency must be positive".into()));
        }
        let n = args.num_prompts.unwrap_or((4 * c).max(16)).max(c);
        let t_prep = Instant::now();
        let inputs: Vec<PreparedInput> = (0..n)
            .map(|i| {
                let text = synthetic_text(args.input_len, i as u64);
                let (content, media) = if args.image_size > 0 {
                    let img = synthetic_image(args.image_size, 1000 + i as u64);
                    (serde_json::json!([{"type": "image"}, {"type": "text", "text": text}]), vec![Media::Image(img)])
                } else {
                    (serde_json::json!([{"type": "text", "text": text}]), vec![])
                };
                fe.prepare_chat(&serde_json::json!([{"role": "user", "content": content}]), &media)
            })
            .collect::<Result<_>>()?;
        let prep_ms = t_prep.elapsed().as_secs_f64() * 1e3 / n as f64;
        let prompt_tokens = inputs.iter().map(|i| i.input_ids.len()).sum::<usize>() / n;
        let workload = Workload {
            requests: n,
            concurrency: c,
            prompt_tokens,
            vision_flops: inputs[0].image_grids().first().map_or(0.0, |&g| fe.processor.vision_flops(g)),
            output_len: args.output_len,
        };
        let roof = ceilings.map(|ce| roofline::random_mm(&fe.spec().decoder, &workload, &ce, dtype_bytes));
        let params = RequestParams {
            sampling: SamplingParams::greedy(),
            max_tokens: args.output_len,
            ignore_eos: true,
            ..Default::default()
        };
        // Client k takes requests k, k + c, k + 2c, ...
        let mut queues: Vec<Vec<PreparedInput>> = (0..c).map(|_| Vec::new()).collect();
        for (i, input) in inputs.into_iter().enumerate() {
            queues[i % c].push(input);
        }
        let start = Instant::now();
        let clients: Vec<_> = queues
            .into_iter()
            .map(|q| {
                let engine = engine.clone();
                let params = params.clone();
                std::thread::spawn(move || -> Result<Vec<Sample>> {
                    let mut out = Vec::new();
                    for input in q {
                        let t = Instant::now();
                        let (_, rx) = engine.submit(Request { input, params: params.clone() })?;
                        let (mut ttft, mut tokens) = (None, 0);
                        for ev in rx.iter() {
                            match ev {
                                Event::Delta { token_ids, .. } => {
                                    ttft.get_or_insert_with(|| t.elapsed());
                                    tokens += token_ids.len();
                                }
                                Event::Done { .. } => break,
                                Event::Error { message } => return Err(Error::Engine(message)),
                                Event::Finished { .. } | Event::Embedding { .. } => {}
                            }
                        }
                        out.push(Sample { ttft: ttft.unwrap_or_default(), e2e: t.elapsed(), tokens });
                    }
                    Ok(out)
                })
            })
            .collect();
        let mut samples = Vec::new();
        for h in clients {
            samples.extend(h.join().map_err(|_| Error::Engine("a client thread panicked".into()))??);
        }
        let wall = start.elapsed().as_secs_f64();
        let out_tokens: usize = samples.iter().map(|s| s.tokens).sum();
        let ttft: Vec<f64> = samples.iter().map(|s| s.ttft.as_secs_f64() * 1e3).collect();
        let tpot: Vec<f64> = samples
            .iter()
            .filter(|s| s.tokens > 1)
            .map(|s| (s.e2e - s.ttft).as_secs_f64() * 1e3 / (s.tokens - 1) as f64)
            .collect();
        let (t, p) = (stats(&ttft), stats(&tpot));
        let tps = out_tokens as f64 / wall;
        let roof = roof.map_or("             -           -".into(), |r| {
            format!("{:>14.1}  {:>9.1}%", r.output_tps, 100.0 * tps / r.output_tps)
        });
        report.push_str(&format!(
            "{c:>11}  {n:>8}  {prompt_tokens:>10}  {:>6.2}  {:>9.1}  {:>7.1} {:>7.1} {:>7.1}  {:>6.2} {:>6.2} {:>6.2}  {prep_ms:>11.2}  {roof}\n",
            n as f64 / wall,
            tps,
            t.0,
            t.1,
            t.2,
            p.0,
            p.1,
            p.2
        ));
    }
    let s = engine.stats();
    report.push_str(&format!("preemptions: {}, engine steps: {}\n", s.preemptions, s.steps));
    Ok(report)
}

/// (mean, p50, p99) of `xs` (nearest-rank percentiles); zeros when empty.
pub fn stats(xs: &[f64]) -> (f64, f64, f64) {
    if xs.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let pct = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    (v.iter().sum::<f64>() / v.len() as f64, pct(0.5), pct(0.99))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(stats(&xs), (50.5, 50.0, 99.0));
        assert_eq!(stats(&[]), (0.0, 0.0, 0.0));
        assert_eq!(stats(&[3.0]), (3.0, 3.0, 3.0));
    }

    #[test]
    fn synthetic_inputs_are_seeded() {
        assert_eq!(synthetic_image(8, 1), synthetic_image(8, 1));
        assert_ne!(synthetic_image(8, 1), synthetic_image(8, 2));
        assert_eq!(synthetic_image_wh(8, 6, 1).dimensions(), (8, 6));
        assert_eq!(synthetic_image_wh(8, 8, 1), synthetic_image(8, 1));
        assert_eq!(synthetic_text(5, 3).split(' ').count(), 5);
        assert_eq!(synthetic_text(5, 3), synthetic_text(5, 3));
    }
}
