//! `kestrel bench decode`: steady-state decode speed of the in-process
//! engine at batch sizes B, against the bandwidth roofline.
//!
//! For each B, B text prompts of `--input-len` words go in at once, each
//! generating exactly `--output-len` tokens. Prefill is left out: the window
//! runs from the moment the last sequence got its first token (all B are
//! decoding) to the moment the first one finished, and counts the tokens
//! the sequences produced inside it. A decode step must read the decoder's
//! weights (counted from the checkpoint: every layer, the final norm and the
//! LM head) and each sequence's K and V at its context; that many bytes over
//! the device copy bandwidth measured in the same run is the step's floor.
//! On the CPU backend there is no such ceiling and the ratio is left out.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use crate::cli::bench::synthetic_text;
use crate::cli::engine_args::EngineArgs;
use crate::cli::roofline::kv_bytes_per_token;
use crate::engine::request::Event;
use crate::engine::sampling::SamplingParams;
use crate::engine::{Engine, Request, RequestParams};
use crate::error::{Error, Result};
use crate::model::weights::{EMBED_TOKENS, LM_HEAD, TEXT_PREFIX};

#[derive(clap::Args, Debug)]
pub struct DecodeArgs {
    #[command(flatten)]
    pub model: crate::cli::model_args::ModelArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Sequences decoding together; a comma-separated list runs each in turn.
    #[arg(long, default_value = "1,8,64", value_delimiter = ',')]
    pub batch: Vec<usize>,
    /// Text words (about one token each) in each prompt.
    #[arg(long, default_value_t = 128)]
    pub input_len: usize,
    /// Tokens each sequence generates.
    #[arg(long, default_value_t = 128)]
    pub output_len: usize,
    /// Copy bandwidth in GB/s for the roofline (default: measured here on the GPU).
    #[arg(long)]
    pub copy_gbps: Option<f64>,
}

/// Parameters of the decoder a step reads, counted in the checkpoint in
/// `dir` (through its family's name map): the layers, the final norm and
/// the LM head (the token embedding when the head is tied to it).
pub fn decoder_params_in(dir: &Path) -> Result<usize> {
    use crate::model::decoder::Head;
    let family = crate::model::registry::detect(dir)?;
    let spec = (family.processor)(dir, &Default::default())?.spec().clone();
    let w = (family.weights)(dir)?;
    let head = match spec.decoder.head {
        Head::None => None,
        Head::Own => Some(LM_HEAD),
        Head::Tied => Some(if w.contains(LM_HEAD) { LM_HEAD } else { EMBED_TOKENS }),
    };
    let layers = format!("{TEXT_PREFIX}layers.");
    let norm = format!("{TEXT_PREFIX}norm.weight");
    let mut n = 0;
    for name in w.names() {
        if name.starts_with(&layers) || name == norm || Some(name.as_str()) == head {
            n += w.get(&name)?.numel();
        }
    }
    Ok(n)
}

/// One batch size's steady-state figures.
#[derive(Debug)]
pub struct DecodeRow {
    pub batch: usize,
    pub prompt_tokens: usize,
    /// Tokens all sequences produced inside the window, over its length.
    pub tokens_per_s: f64,
    pub ms_per_step: f64,
    /// Mean context (prompt + generated) of the tokens in the window.
    pub mean_ctx: f64,
}

pub fn decode(args: &DecodeArgs) -> Result<String> {
    let max_b = args.batch.iter().copied().max().unwrap_or(0);
    if args.batch.contains(&0) || max_b == 0 {
        return Err(Error::InvalidInput("--batch sizes must be positive".into()));
    }
    if args.output_len < 3 {
        return Err(Error::InvalidInput("--output-len must be at least 3 to leave a decode window".into()));
    }
    let dir = args.model.dir()?;
    let copy_gbps = match args.copy_gbps {
        Some(c) => Some(c),
        None => crate::cli::bench_kernels::copy_ceiling_for(&args.engine.device)?,
    };
    let mut cfg = args.engine.engine_config(dir.clone())?;
    if args.engine.max_num_seqs.is_none() {
        cfg.max_num_seqs = cfg.max_num_seqs.max(max_b);
    }
    let engine = Arc::new(Engine::start(cfg)?);
    let fe = engine.frontend().clone();
    let on_gpu = fe.device != "cpu";
    let dtype_bytes = if on_gpu { 2 } else { 4 };
    let params = decoder_params_in(&dir)?;
    let weight_bytes = (params * dtype_bytes) as f64;
    let kv_tok = kv_bytes_per_token(&fe.spec().decoder, dtype_bytes) as f64;
    let mut report = format!(
        "decode on {} ({}): {:.1} M decoder parameters = {:.1} MB read per step, KV {} bytes per token of context\n",
        fe.model_name,
        fe.device,
        params as f64 / 1e6,
        weight_bytes / 1e6,
        kv_tok
    );
    match (copy_gbps, on_gpu) {
        (Some(c), true) => report += &format!("ceiling: copy {c:.1} GB/s\n"),
        _ => report += "roofline: not meaningful on the CPU backend (no measured bandwidth ceiling)\n",
    }
    report += "batch  prompt tok  mean ctx  decode tok/s  ms/step  GB/step  eff. GB/s  % roofline\n";
    for &b in &args.batch {
        let row = run_batch(&engine, b, args)?;
        let step_bytes = weight_bytes + b as f64 * kv_tok * row.mean_ctx;
        let gbps = step_bytes / (row.ms_per_step * 1e-3) / 1e9;
        let pct = match (copy_gbps, on_gpu) {
            (Some(c), true) => format!("{:>9.1}%", 100.0 * gbps / c),
            _ => format!("{:>10}", "-"),
        };
        report += &format!(
            "{b:>5}  {:>10}  {:>8.0}  {:>12.1}  {:>7.3}  {:>7.3}  {:>9.1}  {pct}\n",
            row.prompt_tokens,
            row.mean_ctx,
            row.tokens_per_s,
            row.ms_per_step,
            step_bytes / 1e9,
            gbps
        );
    }
    Ok(report)
}

/// Runs `b` sequences together and measures the window where all decode.
fn run_batch(engine: &Arc<Engine>, b: usize, args: &DecodeArgs) -> Result<DecodeRow> {
    let fe = engine.frontend();
    let inputs = (0..b)
        .map(|i| {
            let text = synthetic_text(args.input_len, 7000 + i as u64);
            fe.prepare_chat(&serde_json::json!([{"role": "user", "content": text}]), &[])
        })
        .collect::<Result<Vec<_>>>()?;
    let prompt_lens: Vec<usize> = inputs.iter().map(|i| i.input_ids.len()).collect();
    let params = RequestParams {
        sampling: SamplingParams::greedy(),
        max_tokens: args.output_len,
        ignore_eos: true,
        ..Default::default()
    };
    // Submit all first, then read each on its own thread, so every token
    // is stamped when the engine sends it.
    let receivers = inputs
        .into_iter()
        .map(|input| engine.submit(Request { input, params: params.clone() }).map(|(_, rx)| rx))
        .collect::<Result<Vec<_>>>()?;
    let readers: Vec<_> = receivers
        .into_iter()
        .map(|rx| {
            std::thread::spawn(move || -> Result<Vec<(Instant, usize)>> {
                let mut stamps = Vec::new();
                for ev in rx.iter() {
                    match ev {
                        Event::Delta { token_ids, .. } if !token_ids.is_empty() => {
                            stamps.push((Instant::now(), token_ids.len()))
                        }
                        Event::Done { .. } => return Ok(stamps),
                        Event::Error { message } => return Err(Error::Engine(message)),
                        _ => {}
                    }
                }
                Err(Error::Engine("the engine stopped".into()))
            })
        })
        .collect();
    let mut seqs = Vec::new();
    for r in readers {
        seqs.push(r.join().map_err(|_| Error::Engine("a reader thread panicked".into()))??);
    }
    window(&seqs, &prompt_lens).ok_or_else(|| {
        Error::InvalidInput(format!(
            "batch {b}: no moment when all {b} sequences were decoding (prefill outlasted the first to finish); raise --output-len"
        ))
    })
}

/// The steady-state window of `seqs` (per sequence: when each delta came and
/// how many tokens it held): from the last first token to the first last
/// token, exclusive of its start. None when it holds no token.
fn window(seqs: &[Vec<(Instant, usize)>], prompt_lens: &[usize]) -> Option<DecodeRow> {
    let start = seqs.iter().map(|s| s.first().map(|t| t.0)).collect::<Option<Vec<_>>>()?.into_iter().max()?;
    let end = seqs.iter().map(|s| s.last().map(|t| t.0)).collect::<Option<Vec<_>>>()?.into_iter().min()?;
    let (mut tokens, mut ctx_sum) = (0usize, 0f64);
    for (s, &p) in seqs.iter().zip(prompt_lens) {
        let mut generated = 0;
        for &(t, n) in s {
            if t > start && t <= end {
                tokens += n;
                ctx_sum += (n * (p + generated)) as f64 + (n * (n - 1)) as f64 / 2.0;
            }
            generated += n;
        }
    }
    let secs = end.checked_duration_since(start)?.as_secs_f64();
    if tokens == 0 || secs <= 0.0 {
        return None;
    }
    let b = seqs.len();
    Some(DecodeRow {
        batch: b,
        prompt_tokens: prompt_lens.iter().sum::<usize>() / b,
        tokens_per_s: tokens as f64 / secs,
        ms_per_step: secs * 1e3 / (tokens as f64 / b as f64),
        mean_ctx: ctx_sum / tokens as f64,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_tiny_checkpoint_holds_what_the_roofline_counts() {
        let dir = crate::model::builtin::materialize().unwrap();
        let spec = crate::model::processor(&dir).unwrap().spec().clone();
        let counted = decoder_params_in(&dir).unwrap();
        assert_eq!(counted, crate::cli::roofline::decoder_step_params(&spec.decoder));
    }

    #[test]
    fn the_window_starts_when_all_decode_and_ends_when_one_finishes() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // Sequence 0 decodes from 0 ms, sequence 1 joins at 20 ms; 0 ends at 60 ms.
        let s0: Vec<_> = (0..=6).map(|i| (at(10 * i), 1)).collect();
        let s1: Vec<_> = (2..=9).map(|i| (at(10 * i), 1)).collect();
        let r = window(&[s0, s1], &[100, 50]).unwrap();
        // Inside (20, 60]: 4 tokens each, 8 in 40 ms, 4 steps of 10 ms.
        assert!((r.tokens_per_s - 200.0).abs() < 1e-6, "{r:?}");
        assert!((r.ms_per_step - 10.0).abs() < 1e-6, "{r:?}");
        // Contexts: 100+3..=100+6 and 50+1..=50+4.
        assert!((r.mean_ctx - (103.0 + 104.0 + 105.0 + 106.0 + 51.0 + 52.0 + 53.0 + 54.0) / 8.0).abs() < 1e-9);
        assert_eq!(r.prompt_tokens, 75);
        // A sequence that finished before another started: no window.
        let early = vec![(at(0), 1), (at(5), 1)];
        assert!(window(&[early, vec![(at(10), 1), (at(20), 1)]], &[1, 1]).is_none());
    }
}
