//! GET /metrics: Prometheus text exposition (format 0.0.4), written by hand.
//! Names follow vLLM's (vllm/v1/metrics/loggers.py `PrometheusStatLogger`)
//! with `kestrel:` for `vllm:`: request latencies and token counts, the
//! engine's load gauges, plus the HTTP request counts vLLM gets from
//! prometheus-fastapi-instrumentator (`http_requests_total`) and the time
//! spent on media before a request reaches the engine. The series of
//! `VLLM_MIRRORED` are also written under vLLM's own `vllm:` names (same
//! values, same `model_name` label), for dashboards built for vLLM.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::engine::EngineStats;

/// vLLM's buckets for time to first token (seconds).
const TTFT_BUCKETS: &[f64] =
    &[0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
/// vLLM's buckets for time per output token.
const TPOT_BUCKETS: &[f64] =
    &[0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
/// vLLM's buckets for request latency.
const LATENCY_BUCKETS: &[f64] =
    &[0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0];
/// Media stages: from a data URL's microseconds to a slow server's seconds.
const MEDIA_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Series written twice: as `kestrel:NAME` and as vLLM's `vllm:NAME`.
pub const VLLM_MIRRORED: [&str; 8] = [
    "num_requests_running",
    "num_requests_waiting",
    "time_to_first_token_seconds",
    "e2e_request_latency_seconds",
    "kv_cache_usage_perc",
    "prompt_tokens_total",
    "generation_tokens_total",
    "request_success_total",
];

/// `kestrel:NAME` families of `text` named in `VLLM_MIRRORED`, again as
/// `vllm:NAME` (each family's lines kept together, in order).
fn vllm_mirror(text: &str) -> String {
    let mut out = String::new();
    for name in VLLM_MIRRORED {
        let ours = format!("kestrel:{name}");
        for line in text.lines() {
            let series = line.strip_prefix("# HELP ").or_else(|| line.strip_prefix("# TYPE ")).unwrap_or(line);
            let Some(rest) = series.strip_prefix(&ours) else { continue };
            let rest = ["_bucket", "_sum", "_count"].iter().find_map(|s| rest.strip_prefix(s)).unwrap_or(rest);
            if rest.starts_with(['{', ' ']) {
                out.push_str(&line.replacen("kestrel:", "vllm:", 1));
                out.push('\n');
            }
        }
    }
    out
}

/// A cumulative histogram over fixed bucket bounds.
struct Histogram {
    bounds: &'static [f64],
    inner: Mutex<HistogramData>,
}

#[derive(Default)]
struct HistogramData {
    counts: Vec<u64>, // (bounds.len(),): observations ≤ each bound
    count: u64,
    sum: f64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        let data = HistogramData { counts: vec![0; bounds.len()], ..Default::default() };
        Histogram { bounds, inner: Mutex::new(data) }
    }

    fn observe(&self, v: f64) {
        let mut d = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for (c, b) in d.counts.iter_mut().zip(self.bounds) {
            if v <= *b {
                *c += 1;
            }
        }
        d.count += 1;
        d.sum += v;
    }

    fn render(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let d = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let sep = if labels.is_empty() { "" } else { "," };
        for (c, b) in d.counts.iter().zip(self.bounds) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", d.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", d.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", d.count);
    }
}

/// Everything the server counts. Shared by the worker threads.
pub struct Metrics {
    model_name: String,
    /// (route, method, status) → count.
    http: Mutex<BTreeMap<(&'static str, String, u16), u64>>,
    /// finish reason ("stop", "length", "abort") → finished choices.
    finished: Mutex<BTreeMap<&'static str, u64>>,
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
    client_disconnects: AtomicU64,
    ttft: Histogram,
    tpot: Histogram,
    e2e: Histogram,
    media_fetch: Histogram,
    media_decode: Histogram,
    media_preprocess: Histogram,
}

/// Per-request timings of a generation.
#[derive(Clone, Copy, Debug)]
pub struct RequestTimes {
    pub ttft: Option<Duration>,
    /// Mean time between output tokens after the first.
    pub tpot: Option<Duration>,
    pub e2e: Duration,
}

impl Metrics {
    pub fn new(model_name: &str) -> Self {
        Metrics {
            model_name: model_name.replace('\\', "\\\\").replace('"', "\\\""),
            http: Mutex::default(),
            finished: Mutex::default(),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            client_disconnects: AtomicU64::new(0),
            ttft: Histogram::new(TTFT_BUCKETS),
            tpot: Histogram::new(TPOT_BUCKETS),
            e2e: Histogram::new(LATENCY_BUCKETS),
            media_fetch: Histogram::new(MEDIA_BUCKETS),
            media_decode: Histogram::new(MEDIA_BUCKETS),
            media_preprocess: Histogram::new(MEDIA_BUCKETS),
        }
    }

    /// One answered HTTP request. `route` is a known route's path or "other"
    /// (so the label set stays bounded).
    pub fn http_request(&self, route: &'static str, method: &str, status: u16) {
        let mut m = self.http.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((route, method.to_owned(), status)).or_insert(0) += 1;
    }

    /// Time spent on a request's media, per stage.
    pub fn media(&self, fetch: Duration, decode: Duration, preprocess: Duration) {
        self.media_fetch.observe(fetch.as_secs_f64());
        self.media_decode.observe(decode.as_secs_f64());
        self.media_preprocess.observe(preprocess.as_secs_f64());
    }

    /// A finished request's tokens and timings.
    pub fn request_done(&self, prompt_tokens: usize, generation_tokens: usize, times: RequestTimes) {
        self.prompt_tokens.fetch_add(prompt_tokens as u64, Ordering::Relaxed);
        self.generation_tokens.fetch_add(generation_tokens as u64, Ordering::Relaxed);
        if let Some(t) = times.ttft {
            self.ttft.observe(t.as_secs_f64());
        }
        if let Some(t) = times.tpot {
            self.tpot.observe(t.as_secs_f64());
        }
        self.e2e.observe(times.e2e.as_secs_f64());
    }

    /// Prompt tokens of a request that generates nothing (embeddings).
    pub fn prompt_tokens(&self, n: usize) {
        self.prompt_tokens.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// A streaming client went away before its request finished (the request
    /// was aborted).
    pub fn client_disconnected(&self) {
        self.client_disconnects.fetch_add(1, Ordering::Relaxed);
    }

    /// A choice ended for `reason`.
    pub fn choice_finished(&self, reason: &'static str) {
        let mut m = self.finished.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry(reason).or_insert(0) += 1;
    }

    /// The exposition text, with the engine's current figures (of a KV cache
    /// of `kv_blocks` blocks) and the number of requests being handled now.
    pub fn render(&self, stats: &EngineStats, kv_blocks: usize, in_flight: usize) -> String {
        let mut out = String::with_capacity(8192);
        let model = format!("model_name=\"{}\"", self.model_name);
        let mut gauge = |name: &str, kind: &str, help: &str, v: f64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{{model}}} {v}");
        };
        gauge("kestrel:num_requests_running", "gauge", "Requests in the engine's running batch.", stats.running as f64);
        gauge(
            "kestrel:num_requests_waiting",
            "gauge",
            "Requests waiting for the engine to admit them.",
            stats.waiting as f64,
        );
        gauge("kestrel:kv_cache_usage_perc", "gauge", "KV cache usage (1 = full).", stats.kv_usage);
        gauge(
            "kestrel:kv_cache_used_blocks",
            "gauge",
            "KV cache blocks held by requests.",
            kv_blocks.saturating_sub(stats.free_blocks) as f64,
        );
        gauge(
            "kestrel:num_preemptions_total",
            "counter",
            "Sequences preempted (recomputed) because the KV cache ran out.",
            stats.preemptions as f64,
        );
        gauge("kestrel:engine_step_errors_total", "counter", "Engine steps that failed.", stats.step_errors as f64);
        gauge(
            "kestrel:structured_output_masks_total",
            "counter",
            "Allowed-token masks computed for constrained rows (one per row per step).",
            stats.grammar.masks as f64,
        );
        gauge(
            "kestrel:structured_output_mask_cpu_seconds_total",
            "counter",
            "CPU time of those masks, summed over threads.",
            stats.grammar.mask_cpu_s,
        );
        gauge(
            "kestrel:structured_output_engine_seconds_total",
            "counter",
            "Engine-thread wall time on grammars (masks, applying them, taking tokens).",
            stats.grammar.wall_s,
        );
        gauge("kestrel:http_requests_in_flight", "gauge", "HTTP requests being handled now.", in_flight as f64);
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        gauge("kestrel:prompt_tokens_total", "counter", "Prefill tokens processed.", load(&self.prompt_tokens));
        gauge("kestrel:generation_tokens_total", "counter", "Tokens generated.", load(&self.generation_tokens));
        gauge(
            "kestrel:client_disconnects_total",
            "counter",
            "Requests aborted because the client went away.",
            load(&self.client_disconnects),
        );

        let name = "kestrel:request_success_total";
        let _ = writeln!(out, "# HELP {name} Finished choices by finish reason.\n# TYPE {name} counter");
        for (reason, n) in self.finished.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "{name}{{{model},finished_reason=\"{reason}\"}} {n}");
        }

        let name = "kestrel:http_requests_total";
        let _ =
            writeln!(out, "# HELP {name} HTTP requests answered, by route, method and status.\n# TYPE {name} counter");
        for ((route, method, status), n) in self.http.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "{name}{{route=\"{route}\",method=\"{method}\",status=\"{status}\"}} {n}");
        }

        self.ttft.render(&mut out, "kestrel:time_to_first_token_seconds", "Time to first token.", &model);
        self.tpot.render(
            &mut out,
            "kestrel:time_per_output_token_seconds",
            "Time per output token after the first.",
            &model,
        );
        self.e2e.render(&mut out, "kestrel:e2e_request_latency_seconds", "End-to-end request latency.", &model);
        let media = [
            (
                &self.media_fetch,
                "kestrel:media_fetch_seconds",
                "Time a request spent fetching media (summed over items).",
            ),
            (
                &self.media_decode,
                "kestrel:media_decode_seconds",
                "Time a request spent decoding media (summed over items).",
            ),
            (
                &self.media_preprocess,
                "kestrel:media_preprocess_seconds",
                "Time a request spent preprocessing (template, resize, patchify, tokenize).",
            ),
        ];
        for (h, name, help) in media {
            h.render(&mut out, name, help, &model);
        }
        let mirror = vllm_mirror(&out);
        out.push_str(&mirror);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_holds_counters_gauges_and_cumulative_buckets() {
        let m = Metrics::new("tiny");
        m.http_request("/v1/chat/completions", "POST", 200);
        m.http_request("/v1/chat/completions", "POST", 200);
        m.http_request("other", "GET", 404);
        m.choice_finished("length");
        let ms = Duration::from_millis;
        m.request_done(10, 4, RequestTimes { ttft: Some(ms(30)), tpot: Some(ms(20)), e2e: ms(400) });
        m.media(ms(2), ms(1), ms(3));
        let stats = EngineStats { running: 2, waiting: 1, kv_usage: 0.25, free_blocks: 90, ..Default::default() };
        let text = m.render(&stats, 120, 3);
        for line in [
            "kestrel:num_requests_running{model_name=\"tiny\"} 2",
            "kestrel:kv_cache_usage_perc{model_name=\"tiny\"} 0.25",
            "kestrel:kv_cache_used_blocks{model_name=\"tiny\"} 30",
            "kestrel:http_requests_in_flight{model_name=\"tiny\"} 3",
            "kestrel:prompt_tokens_total{model_name=\"tiny\"} 10",
            "kestrel:generation_tokens_total{model_name=\"tiny\"} 4",
            "kestrel:request_success_total{model_name=\"tiny\",finished_reason=\"length\"} 1",
            "kestrel:http_requests_total{route=\"/v1/chat/completions\",method=\"POST\",status=\"200\"} 2",
            "kestrel:http_requests_total{route=\"other\",method=\"GET\",status=\"404\"} 1",
            "kestrel:time_to_first_token_seconds_bucket{model_name=\"tiny\",le=\"0.02\"} 0",
            "kestrel:time_to_first_token_seconds_bucket{model_name=\"tiny\",le=\"0.04\"} 1",
            "kestrel:time_to_first_token_seconds_bucket{model_name=\"tiny\",le=\"+Inf\"} 1",
            "kestrel:e2e_request_latency_seconds_count{model_name=\"tiny\"} 1",
            "kestrel:media_fetch_seconds_count{model_name=\"tiny\"} 1",
            "# TYPE kestrel:media_preprocess_seconds histogram",
            "vllm:num_requests_running{model_name=\"tiny\"} 2",
            "vllm:num_requests_waiting{model_name=\"tiny\"} 1",
            "vllm:kv_cache_usage_perc{model_name=\"tiny\"} 0.25",
            "vllm:prompt_tokens_total{model_name=\"tiny\"} 10",
            "vllm:generation_tokens_total{model_name=\"tiny\"} 4",
            "vllm:request_success_total{model_name=\"tiny\",finished_reason=\"length\"} 1",
            "# TYPE vllm:time_to_first_token_seconds histogram",
            "vllm:time_to_first_token_seconds_bucket{model_name=\"tiny\",le=\"0.04\"} 1",
            "vllm:time_to_first_token_seconds_count{model_name=\"tiny\"} 1",
            "# TYPE vllm:e2e_request_latency_seconds histogram",
            "vllm:e2e_request_latency_seconds_count{model_name=\"tiny\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        // Only the mirrored families, each once.
        assert!(!text.contains("vllm:media") && !text.contains("vllm:http") && !text.contains("vllm:kv_cache_used"));
        assert!(!text.contains("vllm:time_per_output_token"));
        assert_eq!(text.matches("# TYPE vllm:prompt_tokens_total counter").count(), 1);
    }
}
