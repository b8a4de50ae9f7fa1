//! `kestrel bench grammar`: what a structured-output constraint costs per
//! token, on the CPU, over a model's real tokenizer (no weights loaded).
//!
//! Builds the grammar engine for the model (the token trie over its
//! vocabulary, padded to the logits width), compiles the JSON schema, then
//! runs B sequences in lock step: each step computes every sequence's
//! allowed-token mask on the rayon pool, as the engine does between a
//! forward pass and sampling, draws a token per sequence at random among
//! the allowed ones (a stand-in for the model), and advances the grammars.
//! A sequence whose JSON is complete starts again. Reported: the one-time
//! costs, the step time per batch size (the engine's added latency per
//! decode step when that many rows are constrained) and the per-mask time.

use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;
use serde_json::Value;

use crate::cli::bench::stats;
use crate::engine::sampling::Rng;
use crate::error::{Error, Result};
use crate::structured::{Constraint, Grammar, Grammars, JsonOptions};
use crate::text::tokenizer::Tokenizer;

#[derive(clap::Args, Debug)]
pub struct GrammarArgs {
    #[command(flatten)]
    pub model: crate::cli::model_args::ModelArgs,
    /// The schema (default: the one `kestrel bench serve` constrains with).
    #[arg(long)]
    pub json_schema: Option<std::path::PathBuf>,
    /// Constrained sequences stepping together; a comma-separated list runs each.
    #[arg(long, default_value = "1,8,64", value_delimiter = ',')]
    pub batch: Vec<usize>,
    /// Steps per batch size.
    #[arg(long, default_value_t = 200)]
    pub steps: usize,
    /// Write compact JSON (`disable_any_whitespace`) instead of any whitespace.
    #[arg(long)]
    pub compact: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(args: &GrammarArgs) -> Result<String> {
    if args.batch.contains(&0) || args.steps == 0 {
        return Err(Error::InvalidInput("--batch sizes and --steps must be positive".into()));
    }
    let dir = args.model.dir()?;
    let processor = crate::model::processor(&dir)?;
    let spec = processor.spec().clone();
    let t0 = Instant::now();
    let tokenizer = Arc::new(Tokenizer::from_dir(&dir)?);
    let eos = crate::engine::engine::eos_ids(&spec, &tokenizer);
    let t_tok = t0.elapsed();
    let schema = match &args.json_schema {
        None => crate::cli::bench_serve::default_schema(),
        Some(p) => {
            let text =
                std::fs::read_to_string(p).map_err(|source| Error::Io { path: p.display().to_string(), source })?;
            serde_json::from_str::<Value>(&text)
                .map_err(|e| Error::InvalidInput(format!("{}: not JSON: {e}", p.display())))?
        }
    };
    let grammars = Grammars::new(tokenizer.clone(), spec.vocab_size(), &eos);
    let constraint =
        Constraint::Json { schema, options: JsonOptions { any_whitespace: !args.compact, ..JsonOptions::default() } };
    let t1 = Instant::now();
    let first = grammars.compile(&constraint)?;
    let t_first = t1.elapsed();
    let t2 = Instant::now();
    let compiled = grammars.compile(&constraint)?;
    let t_compile = t2.elapsed();
    drop(first);
    let mut report = format!(
        "grammar cost on {} ({} tokens in the logits, {} rayon threads): tokenizer {:.1} ms, \
         token trie + first compile {:.1} ms, compile {:.2} ms, {} JSON\n",
        dir.display(),
        spec.vocab_size(),
        rayon::current_num_threads(),
        t_tok.as_secs_f64() * 1e3,
        t_first.as_secs_f64() * 1e3,
        t_compile.as_secs_f64() * 1e3,
        if args.compact { "compact" } else { "any-whitespace" },
    );
    report += "batch  steps  step p50 ms  step p99 ms  mask mean us  masks/s  outputs done\n";
    let eos0 = eos[0];
    for &b in &args.batch {
        let mut seqs: Vec<(Grammar, Rng)> =
            (0..b).map(|i| (compiled.clone(), Rng::from_seed(args.seed ^ (i as u64) << 20))).collect();
        let (mut step_ms, mut mask_us) = (Vec::new(), Vec::new());
        let mut done = 0;
        for _ in 0..args.steps {
            let t = Instant::now();
            let masks: Vec<(Vec<u32>, f64)> = seqs
                .par_iter_mut()
                .map(|(g, _)| {
                    let t = Instant::now();
                    let m = g.allowed();
                    (m.unwrap_or_default(), t.elapsed().as_secs_f64() * 1e6)
                })
                .collect();
            step_ms.push(t.elapsed().as_secs_f64() * 1e3);
            for ((g, rng), (mask, us)) in seqs.iter_mut().zip(masks) {
                mask_us.push(us);
                let allowed: Vec<u32> = (0..mask.len() as u32 * 32)
                    .filter(|&t| mask[t as usize / 32] >> (t % 32) & 1 == 1 && t != eos0)
                    .collect();
                let end = allowed.is_empty() || g.finished();
                if !end {
                    let tok = allowed[(rng.next_u64() % allowed.len() as u64) as usize];
                    if g.accept(tok).is_ok() && !g.finished() {
                        continue;
                    }
                }
                done += 1;
                *g = compiled.clone();
            }
        }
        let (_, p50, p99) = stats(&step_ms);
        let (mean_us, _, _) = stats(&mask_us);
        let total_s: f64 = step_ms.iter().sum::<f64>() / 1e3;
        report += &format!(
            "{b:>5}  {:>5}  {p50:>11.3}  {p99:>11.3}  {mean_us:>12.1}  {:>7.0}  {done:>12}\n",
            args.steps,
            (b * args.steps) as f64 / total_s
        );
    }
    Ok(report)
}
