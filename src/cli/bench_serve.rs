//! `kestrel bench serve`: a load generator for a running server's
//! `/v1/chat/completions`, modelled on `vllm bench serve --dataset-name
//! random-mm` (vllm/benchmarks/serve.py, lib/endpoint_request_func.py).
//!
//! Every request carries its own noise image of `--image-size` (as a data
//! URL) and `--input-len` random one-token words, asks for `--output-len`
//! tokens (greedy; `ignore_eos` with `--ignore-eos`) and streams the answer
//! with usage. All images and bodies are made, and `--warmup` requests
//! answered, before the clock starts.
//! Requests arrive as a Poisson process of `--request-rate` per second (inf:
//! all at once), at most `--max-concurrency` in flight. Per request: TTFT
//! (to the first content delta; the role chunk comes before any work),
//! ITL (gaps between content deltas), TPOT ((e2e − TTFT) / (tokens − 1)),
//! end-to-end latency; prompt and output tokens come from the usage the
//! server returns. A failed request is counted and its error kept.

use std::io::{BufRead, BufReader, Cursor};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::Serialize;
use serde_json::{json, Value};

use crate::cli::bench::{stats, synthetic_image_wh, synthetic_text};
use crate::cli::bench_startup::ServerProcess;
use crate::cli::roofline::{self, Ceilings, Workload};
use crate::engine::sampling::Rng;
use crate::error::{Error, Result};

#[derive(clap::Args, Debug)]
pub struct ServeBenchArgs {
    /// The server to load (ignored with --launch).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub base_url: String,
    /// Start `kestrel serve` (this binary) on a free port of 127.0.0.1 for the
    /// run, with --model and the flags after `--`, and stop it after.
    #[arg(long)]
    pub launch: bool,
    /// Model folder or Hugging Face id: what --launch serves, and whose
    /// config.json and preprocessor_config.json the roofline reads.
    #[arg(long)]
    pub model: Option<String>,
    /// Model name sent in requests (default: the first of /v1/models).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Image size WxH (or N for NxN); 0 sends text only.
    #[arg(long, default_value = "512x512", value_parser = parse_image_size)]
    pub image_size: ImageSize,
    /// How the images are encoded in their data URLs.
    #[arg(long, value_enum, default_value = "jpeg")]
    pub image_format: ImageFormat,
    /// Random one-token words in each prompt (the template adds a few tokens;
    /// the usage the server returns gives the true count).
    #[arg(long, default_value_t = 128)]
    pub input_len: usize,
    /// max_tokens of each request.
    #[arg(long, default_value_t = 128)]
    pub output_len: usize,
    /// Requests in the run.
    #[arg(long, default_value_t = 64)]
    pub num_prompts: usize,
    /// Most requests in flight (default: no bound).
    #[arg(long)]
    pub max_concurrency: Option<usize>,
    /// Requests per second, as a Poisson process; inf sends them all at once.
    #[arg(long, default_value_t = f64::INFINITY)]
    pub request_rate: f64,
    /// Seeds the prompts, images and arrival times.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Generate exactly --output-len tokens (vLLM's `ignore_eos` request field).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Requests sent (the first prompt, one at a time) before the clock
    /// starts, as vLLM's initial test run, and then the first constrained
    /// one if any; if one fails the run stops there.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Seconds one request may take before it counts as failed.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Sent as `Authorization: Bearer KEY`.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Write the summary and every request's figures here as JSON.
    #[arg(long)]
    pub result_json: Option<PathBuf>,
    /// Copy bandwidth of the server's card in GB/s, for the roofline (`kestrel bench kernels`).
    #[arg(long, requires = "gemm_tflops")]
    pub copy_gbps: Option<f64>,
    /// bf16 GEMM rate of the server's card in TFLOP/s, for the roofline.
    #[arg(long, requires = "copy_gbps")]
    pub gemm_tflops: Option<f64>,
    /// Fraction of requests (0 to 1, spread evenly) whose output is held to
    /// --json-schema, as `vllm bench serve`'s structured-output benchmark
    /// mixes them; the report then gives free and constrained requests apart.
    #[arg(long, default_value_t = 0.0)]
    pub structured_output_ratio: f64,
    /// The schema of constrained requests (default: a small object of a
    /// bounded string, an integer range and an enum), sent as vLLM's
    /// `structured_outputs: {"json": ..., "disable_any_whitespace": true}`.
    #[arg(long)]
    pub json_schema: Option<PathBuf>,
    /// Flags for `kestrel serve` with --launch (after `--`).
    #[arg(last = true)]
    pub serve_args: Vec<String>,
}

/// Width and height of the synthetic images; None for text-only requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageSize(pub Option<(u32, u32)>);

/// `WxH`, `N` (square) or `0` (no image).
pub fn parse_image_size(s: &str) -> std::result::Result<ImageSize, String> {
    let num = |p: &str| p.trim().parse::<u32>().map_err(|_| format!("{s:?}: expected WxH, N or 0 (e.g. 512x512)"));
    let (w, h) = match s.split_once(['x', 'X']) {
        Some((w, h)) => (num(w)?, num(h)?),
        None => (num(s)?, num(s)?),
    };
    match (w, h) {
        (0, 0) => Ok(ImageSize(None)),
        (0, _) | (_, 0) => Err(format!("{s:?}: both sides must be positive (or 0 for no image)")),
        _ => Ok(ImageSize(Some((w, h)))),
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    Jpeg,
    Png,
}

/// What one request measured; times in seconds from when it was sent.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Record {
    pub ttft: Option<f64>,
    /// Gaps between consecutive content deltas.
    pub itl: Vec<f64>,
    pub e2e: f64,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
}

/// Reads one streamed chat completion, timing each `data:` event against
/// `sent`. An error event, or a stream without `[DONE]`, is an error.
pub fn read_stream(reader: impl BufRead, sent: Instant) -> std::result::Result<Record, String> {
    let mut rec = Record::default();
    let (mut last_content, mut content_chunks, mut usage) = (None::<f64>, 0usize, None);
    for line in reader.lines() {
        let line = line.map_err(|e| format!("reading the stream: {e}"))?;
        let now = sent.elapsed().as_secs_f64();
        let Some(data) = line.strip_prefix("data:").map(str::trim) else { continue };
        if data == "[DONE]" {
            rec.e2e = now;
            let (p, c) = usage.unwrap_or((0, content_chunks));
            (rec.prompt_tokens, rec.output_tokens) = (p, c);
            return Ok(rec);
        }
        let v: Value = serde_json::from_str(data).map_err(|e| format!("an event is not JSON ({e}): {data:.200}"))?;
        if let Some(err) = v.get("error") {
            return Err(error_message(err));
        }
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0) as usize;
            usage = Some((n("prompt_tokens"), n("completion_tokens")));
        }
        let content = v.pointer("/choices/0/delta/content").and_then(Value::as_str).unwrap_or("");
        if !content.is_empty() {
            content_chunks += 1;
            match last_content {
                None => rec.ttft = Some(now),
                Some(t) => rec.itl.push(now - t),
            }
            last_content = Some(now);
        }
    }
    Err("the stream ended before [DONE]".into())
}

/// The message of an OpenAI error object (or the value itself).
fn error_message(err: &Value) -> String {
    err.get("message").and_then(Value::as_str).map_or_else(|| err.to_string(), str::to_owned)
}

/// Arrival offsets in seconds of `n` requests: a Poisson process of `rate`
/// per second (exponential gaps, as vLLM's burstiness 1), all 0 when rate is
/// infinite.
pub fn arrivals(n: usize, rate: f64, seed: u64) -> Vec<f64> {
    if rate.is_infinite() {
        return vec![0.0; n];
    }
    let mut rng = Rng::from_seed(seed ^ 0x5eed_a771);
    let mut t = 0.0;
    (0..n)
        .map(|_| {
            t += -(1.0 - rng.next_f64()).ln() / rate;
            t
        })
        .collect()
}

/// Summary statistics (mean, median, p99) in milliseconds.
#[derive(Serialize, Debug, Default)]
pub struct Dist {
    pub mean: f64,
    pub median: f64,
    pub p99: f64,
}

impl Dist {
    fn of_seconds(xs: &[f64]) -> Dist {
        let ms: Vec<f64> = xs.iter().map(|x| x * 1e3).collect();
        let (mean, median, p99) = stats(&ms);
        Dist { mean, median, p99 }
    }
}

/// The run, as `--result-json` writes it.
#[derive(Serialize, Debug)]
pub struct Summary {
    pub model: String,
    pub num_prompts: usize,
    pub completed: usize,
    pub failed: usize,
    /// Distinct error messages with how many requests got each.
    pub errors: Vec<(String, usize)>,
    pub image_size: Option<(u32, u32)>,
    pub input_len: usize,
    pub output_len: usize,
    pub max_concurrency: Option<usize>,
    pub request_rate: Option<f64>,
    pub ignore_eos: bool,
    pub duration_s: f64,
    pub total_input_tokens: usize,
    pub total_output_tokens: usize,
    pub request_throughput: f64,
    pub output_throughput: f64,
    pub total_token_throughput: f64,
    pub ttft_ms: Dist,
    pub tpot_ms: Dist,
    pub itl_ms: Dist,
    pub e2el_ms: Dist,
    /// With --structured-output-ratio: free and constrained requests apart.
    pub by_class: Vec<ClassStats>,
    /// The server's structured-output counters after the run (warm-up
    /// included), when it exposes them (`kestrel serve`'s /metrics).
    pub grammar_cost: Option<GrammarCost>,
    /// Per completed request, in request order.
    pub input_lens: Vec<usize>,
    pub output_lens: Vec<usize>,
    pub ttfts_s: Vec<f64>,
    pub e2els_s: Vec<f64>,
    pub itls_s: Vec<Vec<f64>>,
    pub roofline: Option<RooflineResult>,
}

/// One class of requests (free, or held to the JSON schema) of a mixed run.
#[derive(Serialize, Debug)]
pub struct ClassStats {
    pub class: &'static str,
    pub completed: usize,
    pub output_tokens: usize,
    /// Output tokens/s of this class over the whole run.
    pub output_throughput: f64,
    pub ttft_ms: Dist,
    pub tpot_ms: Dist,
    pub itl_ms: Dist,
}

/// `kestrel:structured_output_*` from the server's /metrics.
#[derive(Serialize, Debug, Clone, Copy, PartialEq)]
pub struct GrammarCost {
    pub masks: f64,
    pub mask_cpu_s: f64,
    pub engine_s: f64,
}

/// The server's structured-output counters, if its /metrics has them.
fn grammar_cost(agent: &ureq::Agent, base: &str, key: Option<&str>) -> Option<GrammarCost> {
    let mut rq = agent.get(format!("{base}/metrics"));
    if let Some(k) = key {
        rq = rq.header("Authorization", format!("Bearer {k}"));
    }
    let text = rq.call().ok()?.body_mut().read_to_string().ok()?;
    let value = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    Some(GrammarCost {
        masks: value("kestrel:structured_output_masks_total")?,
        mask_cpu_s: value("kestrel:structured_output_mask_cpu_seconds_total")?,
        engine_s: value("kestrel:structured_output_engine_seconds_total")?,
    })
}

/// Whether request `i` is held to the schema: `ratio` of them, spread evenly.
pub fn constrained(i: usize, ratio: f64) -> bool {
    ((i + 1) as f64 * ratio).floor() > (i as f64 * ratio).floor()
}

/// The default schema of constrained requests: bounded, so every answer ends.
pub fn default_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 24},
            "celsius": {"type": "integer", "minimum": -60, "maximum": 60},
            "sky": {"enum": ["clear", "cloudy", "rain", "snow"]},
            "summary": {"type": "string", "maxLength": 200}
        },
        "required": ["city", "celsius", "sky", "summary"],
        "additionalProperties": false
    })
}

/// The measured throughput against the workload's roofline.
#[derive(Serialize, Debug)]
pub struct RooflineResult {
    pub ceilings: Ceilings,
    pub prefill_s: f64,
    pub decode_s: f64,
    pub output_throughput: f64,
    /// Measured output tokens/s over the roofline's.
    pub ratio: f64,
}

pub fn serve(args: &ServeBenchArgs) -> Result<(String, Summary)> {
    if args.num_prompts == 0 || args.output_len == 0 || args.max_concurrency == Some(0) {
        return Err(Error::InvalidInput("--num-prompts, --output-len and --max-concurrency must be positive".into()));
    }
    if !(0.0..=1.0).contains(&args.structured_output_ratio) {
        return Err(Error::InvalidInput(format!(
            "--structured-output-ratio must be between 0 and 1, got {}",
            args.structured_output_ratio
        )));
    }
    if args.request_rate.is_nan() || args.request_rate <= 0.0 {
        return Err(Error::InvalidInput(format!(
            "--request-rate must be positive (or inf), got {}",
            args.request_rate
        )));
    }
    let roof = RooflineInputs::from_args(args)?;
    let server = if args.launch {
        Some(ServerProcess::launch(args.model.as_deref(), &args.serve_args, Duration::from_secs(600))?)
    } else {
        None
    };
    let base = server.as_ref().map_or_else(|| args.base_url.trim_end_matches('/').to_owned(), |s| s.base_url());
    let workers = args.max_concurrency.unwrap_or(args.num_prompts).min(args.num_prompts);
    let agent = agent(Duration::from_secs(args.timeout), workers);
    let model = match &args.served_model_name {
        Some(m) => m.clone(),
        None => first_model(&agent, &base, args.api_key.as_deref())?,
    };
    let bodies = request_bodies(args, &model)?;
    let arrive = arrivals(args.num_prompts, args.request_rate, args.seed);
    let url = format!("{base}/v1/chat/completions");
    // The first constrained body warms up too: the server's grammar engine
    // is ready (its token trie built) before the clock starts.
    let mut warm = vec![0; args.warmup];
    if args.warmup > 0 {
        warm.extend((0..args.num_prompts).find(|&i| constrained(i, args.structured_output_ratio)));
    }
    for i in warm {
        send(&agent, &url, args.api_key.as_deref(), &bodies[i])
            .map_err(|e| Error::Engine(format!("the warm-up request failed ({e}); pass --warmup 0 to skip it")))?;
    }
    let (next, bodies, arrive) = (Arc::new(AtomicUsize::new(0)), Arc::new(bodies), Arc::new(arrive));

    let start = Instant::now();
    let handles: Vec<_> = (0..workers)
        .map(|_| {
            let (next, bodies, arrive, url) = (next.clone(), bodies.clone(), arrive.clone(), url.clone());
            let (agent, key) = (agent.clone(), args.api_key.clone());
            std::thread::spawn(move || {
                let mut done = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(body) = bodies.get(i) else { break };
                    let at = start + Duration::from_secs_f64(arrive[i]);
                    std::thread::sleep(at.saturating_duration_since(Instant::now()));
                    done.push((i, send(&agent, &url, key.as_deref(), body)));
                }
                done
            })
        })
        .collect();
    let mut outcomes: Vec<(usize, std::result::Result<Record, String>)> = Vec::new();
    for h in handles {
        outcomes.extend(h.join().map_err(|_| Error::Engine("a client thread panicked".into()))?);
    }
    let duration = start.elapsed().as_secs_f64();
    let grammar_cost =
        (args.structured_output_ratio > 0.0).then(|| grammar_cost(&agent, &base, args.api_key.as_deref())).flatten();
    drop(server);
    outcomes.sort_by_key(|(i, _)| *i);
    let mut summary = summarize(args, model, outcomes.into_iter().map(|(_, o)| o).collect(), duration, roof.as_ref());
    summary.grammar_cost = grammar_cost;
    let report = report(&summary);
    if let Some(p) = &args.result_json {
        let text = serde_json::to_string_pretty(&summary).map_err(|e| Error::Engine(e.to_string()))?;
        std::fs::write(p, text + "\n").map_err(|source| Error::Io { path: p.display().to_string(), source })?;
    }
    Ok((report, summary))
}

/// An HTTP agent that returns error statuses as responses, ignores proxies
/// and keeps up to `connections` idle connections for reuse (one per
/// client thread, as a benchmark client keeps them alive).
pub fn agent(timeout: Duration, connections: usize) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(timeout))
        .max_idle_connections(connections)
        .max_idle_connections_per_host(connections)
        .build()
        .into()
}

fn first_model(agent: &ureq::Agent, base: &str, key: Option<&str>) -> Result<String> {
    let mut rq = agent.get(format!("{base}/v1/models"));
    if let Some(k) = key {
        rq = rq.header("Authorization", format!("Bearer {k}"));
    }
    let fail = |what: String| Error::Engine(format!("{base}/v1/models: {what}"));
    let mut resp = rq.call().map_err(|e| fail(e.to_string()))?;
    let text = resp.body_mut().read_to_string().map_err(|e| fail(e.to_string()))?;
    let v: Value = serde_json::from_str(&text).map_err(|_| fail(format!("not JSON: {text:.200}")))?;
    v.pointer("/data/0/id")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| fail(format!("no model in {text:.200}")))
}

/// Every request's JSON body, images encoded, before the clock starts.
fn request_bodies(args: &ServeBenchArgs, model: &str) -> Result<Vec<String>> {
    use rayon::prelude::*;
    let schema = match &args.json_schema {
        None => default_schema(),
        Some(p) => {
            let text =
                std::fs::read_to_string(p).map_err(|source| Error::Io { path: p.display().to_string(), source })?;
            serde_json::from_str(&text).map_err(|e| Error::InvalidInput(format!("{}: not JSON: {e}", p.display())))?
        }
    };
    (0..args.num_prompts)
        .into_par_iter()
        .map(|i| {
            let seed = args.seed.wrapping_mul(1_000_003).wrapping_add(i as u64);
            let mut content = Vec::new();
            if let ImageSize(Some((w, h))) = args.image_size {
                let url = data_url(&synthetic_image_wh(w, h, seed), args.image_format)?;
                content.push(json!({"type": "image_url", "image_url": {"url": url}}));
            }
            content.push(json!({"type": "text", "text": synthetic_text(args.input_len, seed)}));
            let mut body = json!({
                "model": model,
                "messages": [{"role": "user", "content": content}],
                "max_tokens": args.output_len,
                "temperature": 0.0,
                "ignore_eos": args.ignore_eos,
                "stream": true,
                "stream_options": {"include_usage": true},
            });
            if constrained(i, args.structured_output_ratio) {
                body["structured_outputs"] = json!({"json": schema, "disable_any_whitespace": true});
            }
            Ok(body.to_string())
        })
        .collect()
}

fn data_url(img: &image::RgbImage, format: ImageFormat) -> Result<String> {
    let (fmt, mime) = match format {
        ImageFormat::Jpeg => (image::ImageFormat::Jpeg, "image/jpeg"),
        ImageFormat::Png => (image::ImageFormat::Png, "image/png"),
    };
    let mut bytes = Cursor::new(Vec::new());
    img.write_to(&mut bytes, fmt).map_err(|e| Error::Engine(format!("encoding a synthetic image: {e}")))?;
    Ok(format!("data:{mime};base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes.get_ref())))
}

/// Sends one request and reads its stream; any failure becomes its message.
fn send(agent: &ureq::Agent, url: &str, key: Option<&str>, body: &str) -> std::result::Result<Record, String> {
    let mut rq = agent.post(url).header("Content-Type", "application/json");
    if let Some(k) = key {
        rq = rq.header("Authorization", format!("Bearer {k}"));
    }
    let sent = Instant::now();
    let mut resp = rq.send(body).map_err(|e| format!("sending: {e}"))?;
    let status = resp.status().as_u16();
    if status != 200 {
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        let msg = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v.get("error").map(error_message))
            .unwrap_or_else(|| format!("{text:.200}"));
        return Err(format!("HTTP {status}: {msg}"));
    }
    read_stream(BufReader::new(resp.into_body().into_reader()), sent)
}

fn summarize(
    args: &ServeBenchArgs,
    model: String,
    outcomes: Vec<std::result::Result<Record, String>>,
    duration: f64,
    roof: Option<&RooflineInputs>,
) -> Summary {
    let mut errors: Vec<(String, usize)> = Vec::new();
    let mut ok: Vec<Record> = Vec::new();
    let mut ok_constrained: Vec<bool> = Vec::new();
    for (i, o) in outcomes.into_iter().enumerate() {
        match o {
            Ok(r) => {
                ok.push(r);
                ok_constrained.push(constrained(i, args.structured_output_ratio));
            }
            Err(e) => match errors.iter_mut().find(|(m, _)| *m == e) {
                Some((_, n)) => *n += 1,
                None => errors.push((e, 1)),
            },
        }
    }
    let failed = errors.iter().map(|(_, n)| n).sum();
    let ttfts: Vec<f64> = ok.iter().filter_map(|r| r.ttft).collect();
    let tpot = |r: &Record| r.ttft.filter(|_| r.output_tokens > 1).map(|t| (r.e2e - t) / (r.output_tokens - 1) as f64);
    let tpots: Vec<f64> = ok.iter().filter_map(tpot).collect();
    let itls: Vec<f64> = ok.iter().flat_map(|r| r.itl.iter().copied()).collect();
    let by_class = if args.structured_output_ratio > 0.0 {
        [("free", false), ("json_schema", true)]
            .into_iter()
            .map(|(class, c)| {
                let rs: Vec<&Record> =
                    ok.iter().zip(&ok_constrained).filter(|(_, &k)| k == c).map(|(r, _)| r).collect();
                let out: usize = rs.iter().map(|r| r.output_tokens).sum();
                ClassStats {
                    class,
                    completed: rs.len(),
                    output_tokens: out,
                    output_throughput: out as f64 / duration,
                    ttft_ms: Dist::of_seconds(&rs.iter().filter_map(|r| r.ttft).collect::<Vec<_>>()),
                    tpot_ms: Dist::of_seconds(&rs.iter().filter_map(|r| tpot(r)).collect::<Vec<_>>()),
                    itl_ms: Dist::of_seconds(&rs.iter().flat_map(|r| r.itl.iter().copied()).collect::<Vec<_>>()),
                }
            })
            .collect()
    } else {
        Vec::new()
    };
    let total_in: usize = ok.iter().map(|r| r.prompt_tokens).sum();
    let total_out: usize = ok.iter().map(|r| r.output_tokens).sum();
    let roofline =
        roof.filter(|_| !ok.is_empty()).map(|r| r.result(args, total_in / ok.len(), total_out as f64 / duration));
    Summary {
        model,
        num_prompts: args.num_prompts,
        completed: ok.len(),
        failed,
        errors,
        image_size: args.image_size.0,
        input_len: args.input_len,
        output_len: args.output_len,
        max_concurrency: args.max_concurrency,
        request_rate: args.request_rate.is_finite().then_some(args.request_rate),
        ignore_eos: args.ignore_eos,
        duration_s: duration,
        total_input_tokens: total_in,
        total_output_tokens: total_out,
        request_throughput: ok.len() as f64 / duration,
        output_throughput: total_out as f64 / duration,
        total_token_throughput: (total_in + total_out) as f64 / duration,
        ttft_ms: Dist::of_seconds(&ttfts),
        tpot_ms: Dist::of_seconds(&tpots),
        itl_ms: Dist::of_seconds(&itls),
        e2el_ms: Dist::of_seconds(&ok.iter().map(|r| r.e2e).collect::<Vec<_>>()),
        by_class,
        grammar_cost: None,
        input_lens: ok.iter().map(|r| r.prompt_tokens).collect(),
        output_lens: ok.iter().map(|r| r.output_tokens).collect(),
        ttfts_s: ok.iter().map(|r| r.ttft.unwrap_or(f64::NAN)).collect(),
        e2els_s: ok.iter().map(|r| r.e2e).collect(),
        itls_s: ok.into_iter().map(|r| r.itl).collect(),
        roofline,
    }
}

/// What the roofline needs, read before the run so a bad folder fails early:
/// the model's config, the image's grid, and the ceilings.
struct RooflineInputs {
    decoder: crate::model::decoder::DecoderDims,
    /// The vision tower's flops on the run's image (0 without one).
    vision_flops: f64,
    ceilings: Ceilings,
}

impl RooflineInputs {
    /// Some when --copy-gbps and --gemm-tflops are given (they require each
    /// other); --model must then name the model served.
    fn from_args(args: &ServeBenchArgs) -> Result<Option<Self>> {
        let (Some(copy_gbps), Some(gemm_tflops)) = (args.copy_gbps, args.gemm_tflops) else { return Ok(None) };
        let Some(model) = &args.model else {
            return Err(Error::InvalidInput(
                "the roofline (--copy-gbps, --gemm-tflops) needs --model, the model served".into(),
            ));
        };
        let processor = crate::model::processor(&crate::cli::model_args::model_dir(Some(model), None)?)?;
        let vision_flops = match args.image_size.0 {
            Some((w, h)) => processor.vision_flops(processor.image_grid(w as usize, h as usize)?),
            None => 0.0,
        };
        let decoder = processor.spec().decoder.clone();
        Ok(Some(RooflineInputs { decoder, vision_flops, ceilings: Ceilings { copy_gbps, gemm_tflops } }))
    }

    /// The run's measured output tok/s against the random-mm roofline at its
    /// measured mean prompt length (bf16 weights and KV, as on the GPU).
    fn result(&self, args: &ServeBenchArgs, prompt_tokens: usize, measured: f64) -> RooflineResult {
        let w = Workload {
            requests: args.num_prompts,
            concurrency: args.max_concurrency.unwrap_or(args.num_prompts),
            prompt_tokens,
            vision_flops: self.vision_flops,
            output_len: args.output_len,
        };
        let r = roofline::random_mm(&self.decoder, &w, &self.ceilings, 2);
        RooflineResult {
            ceilings: self.ceilings,
            prefill_s: r.prefill_s,
            decode_s: r.decode_s,
            output_throughput: r.output_tps,
            ratio: measured / r.output_tps,
        }
    }
}

fn report(s: &Summary) -> String {
    let mut r = format!(
        "serving benchmark: {} requests to {} ({} in flight at most, {} req/s)\n",
        s.num_prompts,
        s.model,
        s.max_concurrency.map_or("no bound".into(), |c| c.to_string()),
        s.request_rate.map_or("inf".into(), |x| format!("{x}")),
    );
    r += &format!("successful requests:   {}\nfailed requests:       {}\n", s.completed, s.failed);
    for (msg, n) in s.errors.iter().take(5) {
        r += &format!("  {n} x {msg}\n");
    }
    r += &format!(
        "duration:              {:.2} s\ntotal input tokens:    {}\ntotal output tokens:   {}\n\
         request throughput:    {:.2} req/s\noutput throughput:     {:.1} tok/s\ntotal throughput:      {:.1} tok/s\n",
        s.duration_s,
        s.total_input_tokens,
        s.total_output_tokens,
        s.request_throughput,
        s.output_throughput,
        s.total_token_throughput
    );
    r += "                 mean      p50      p99 (ms)\n";
    for (name, d) in [("TTFT", &s.ttft_ms), ("TPOT", &s.tpot_ms), ("ITL", &s.itl_ms), ("E2E", &s.e2el_ms)] {
        r += &format!("{name:<10} {:>9.2} {:>8.2} {:>8.2}\n", d.mean, d.median, d.p99);
    }
    for c in &s.by_class {
        r += &format!(
            "{:<12} {:>4} requests, {:>7} output tokens, {:>8.1} tok/s; TPOT mean {:.2} p50 {:.2} p99 {:.2} ms; \
             ITL p50 {:.2} p99 {:.2} ms; TTFT p50 {:.2} ms\n",
            c.class,
            c.completed,
            c.output_tokens,
            c.output_throughput,
            c.tpot_ms.mean,
            c.tpot_ms.median,
            c.tpot_ms.p99,
            c.itl_ms.median,
            c.itl_ms.p99,
            c.ttft_ms.median
        );
    }
    if let Some(g) = s.grammar_cost.filter(|g| g.masks > 0.0) {
        r += &format!(
            "structured outputs (server counters, warm-up included): {:.0} masks, {:.1} us CPU each; \
             engine thread {:.1} ms on grammars in all\n",
            g.masks,
            1e6 * g.mask_cpu_s / g.masks,
            1e3 * g.engine_s
        );
    }
    if let Some(x) = &s.roofline {
        r += &format!(
            "roofline: {:.1} tok/s (prefill {:.3} ms at {:.0} TFLOP/s + decode {:.3} ms at {:.0} GB/s); measured {:.1}% of it\n",
            x.output_throughput,
            x.prefill_s * 1e3,
            x.ceilings.gemm_tflops,
            x.decode_s * 1e3,
            x.ceilings.copy_gbps,
            100.0 * x.ratio
        );
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constrained_requests_are_spread_by_the_ratio() {
        for (ratio, n, want) in [(0.0, 10, 0), (0.5, 10, 5), (0.25, 8, 2), (1.0, 7, 7), (0.3, 10, 3)] {
            let picks: Vec<usize> = (0..n).filter(|&i| constrained(i, ratio)).collect();
            assert_eq!(picks.len(), want, "{ratio} of {n}: {picks:?}");
        }
        let half: Vec<bool> = (0..4).map(|i| constrained(i, 0.5)).collect();
        assert_eq!(half, [false, true, false, true]);
    }

    #[test]
    fn image_sizes_parse() {
        assert_eq!(parse_image_size("512x384"), Ok(ImageSize(Some((512, 384)))));
        assert_eq!(parse_image_size("64"), Ok(ImageSize(Some((64, 64)))));
        assert_eq!(parse_image_size("0"), Ok(ImageSize(None)));
        assert!(parse_image_size("0x5").unwrap_err().contains("positive"));
        assert!(parse_image_size("big").unwrap_err().contains("WxH"));
    }

    #[test]
    fn poisson_arrivals_have_the_asked_rate() {
        assert_eq!(arrivals(3, f64::INFINITY, 1), vec![0.0; 3]);
        let a = arrivals(20000, 50.0, 7);
        assert!(a.windows(2).all(|w| w[1] >= w[0]));
        let rate = a.len() as f64 / a[a.len() - 1];
        assert!((rate - 50.0).abs() < 2.0, "{rate}");
        assert_eq!(a, arrivals(20000, 50.0, 7));
        assert_ne!(a, arrivals(20000, 50.0, 8));
    }

    fn chunk(content: &str) -> String {
        format!("data: {}\n\n", json!({"choices": [{"index": 0, "delta": {"content": content}}], "usage": null}))
    }

    #[test]
    fn streams_are_timed_by_content_and_counted_by_usage() {
        let role = format!("data: {}\n\n", json!({"choices": [{"delta": {"role": "assistant", "content": ""}}]}));
        let usage = json!({"choices": [], "usage": {"prompt_tokens": 40, "completion_tokens": 3}});
        let s = format!("{role}{}{}{}data: {usage}\n\ndata: [DONE]\n\n", chunk("a"), chunk("b"), chunk("cd"));
        let r = read_stream(Cursor::new(s), Instant::now()).unwrap();
        assert_eq!((r.prompt_tokens, r.output_tokens, r.itl.len()), (40, 3, 2));
        assert!(r.ttft.is_some_and(|t| t <= r.e2e));
        // Without usage, each content chunk counts as a token.
        let r = read_stream(Cursor::new(format!("{}{}data: [DONE]\n\n", chunk("x"), chunk("y"))), Instant::now());
        assert_eq!(r.unwrap().output_tokens, 2);
    }

    #[test]
    fn stream_errors_are_reported() {
        let err = json!({"error": {"message": "the engine stopped", "type": "server_error"}});
        let e = read_stream(Cursor::new(format!("{}data: {err}\n\ndata: [DONE]\n\n", chunk("a"))), Instant::now());
        assert_eq!(e.unwrap_err(), "the engine stopped");
        let e = read_stream(Cursor::new(chunk("a")), Instant::now()).unwrap_err();
        assert!(e.contains("before [DONE]"), "{e}");
        let e = read_stream(Cursor::new("data: {oops\n\n"), Instant::now()).unwrap_err();
        assert!(e.contains("not JSON"), "{e}");
    }
}
