//! Rooflines for the benchmarks: the fastest a workload could run on a card
//! whose ceilings (device copy bandwidth, bf16 GEMM rate) were measured in
//! the same run (`kestrel bench kernels`). A benchmark prints its figure and
//! the ratio to this bound, so a number says how far from the hardware it is.
//!
//! The decoder's counts come from the shared decoder's shape (q/k/v with or
//! without biases, o, gate/up/down, two RMSNorms per layer); each family
//! counts its vision tower and connector (`Processor::vision_flops`). A GEMM
//! of an (m, k) by (k, n) is 2·m·k·n flops; attention is 4·head_dim flops
//! per (query, key, head) pair a query sees (QKᵀ and PV).

use crate::model::decoder::DecoderDims;

/// Ceilings of one card, measured in the same run.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Ceilings {
    /// Device copy bandwidth, bytes read + written, in GB/s.
    pub copy_gbps: f64,
    /// cuBLAS bf16 GEMM rate in TFLOP/s.
    pub gemm_tflops: f64,
}

/// Parameters the decoder reads for one step (`DecoderDims::step_params`).
pub fn decoder_step_params(d: &DecoderDims) -> usize {
    d.step_params()
}

/// KV cache bytes one token adds: K and V of every layer.
pub fn kv_bytes_per_token(d: &DecoderDims, dtype_bytes: usize) -> usize {
    d.kv_bytes_per_token(dtype_bytes)
}

/// Flops to prefill one sequence of `tokens` (text and image placeholders
/// alike) from an empty cache, logits for its last token only (as vLLM and
/// Kestrel compute them).
pub fn text_prefill_flops(d: &DecoderDims, tokens: usize) -> f64 {
    let n = tokens as f64;
    let linear = 2.0 * n * (d.layer_params() - 2 * d.hidden) as f64;
    let pairs = n * (n + 1.0) / 2.0; // causal
    let attn = 4.0 * (d.head_dim * d.heads) as f64 * pairs;
    d.layers as f64 * (linear + attn) + 2.0 * (d.hidden * d.vocab) as f64
}

/// A serving workload in the shape of vLLM's random-mm dataset: every
/// request the same size, `concurrency` of them decoding together.
#[derive(Clone, Copy, Debug)]
pub struct Workload {
    pub requests: usize,
    pub concurrency: usize,
    /// Prompt tokens per request, image placeholders included.
    pub prompt_tokens: usize,
    /// Flops of the vision tower and connector on one request's media
    /// (`Processor::vision_flops`; 0 without media).
    pub vision_flops: f64,
    pub output_len: usize,
}

/// The bound on a workload: prefill at the GEMM rate, then decode at the
/// copy bandwidth, one after the other (no overlap is assumed).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Roofline {
    pub prefill_s: f64,
    pub decode_s: f64,
    /// Output tokens per second if the run took prefill_s + decode_s.
    pub output_tps: f64,
    pub requests_per_s: f64,
}

/// The roofline of `w` for a model whose decoder is `d` and whose weights
/// and KV cache hold `dtype_bytes` per value (2 for bf16). Prefill is every
/// request's prompt and image; decode is `output_len - 1` steps per request
/// (prefill gives the first token), in batches of `concurrency`, each step
/// reading the decoder's weights once and every sequence's KV cache at its
/// mean context.
pub fn random_mm(d: &DecoderDims, w: &Workload, c: &Ceilings, dtype_bytes: usize) -> Roofline {
    let n = w.requests as f64;
    let per_request = text_prefill_flops(d, w.prompt_tokens) + w.vision_flops;
    let prefill_s = n * per_request / (c.gemm_tflops * 1e12);
    let decodes = n * w.output_len.saturating_sub(1) as f64;
    let steps = decodes / w.concurrency.clamp(1, w.requests.max(1)) as f64;
    let weights = (decoder_step_params(d) * dtype_bytes) as f64;
    let mean_ctx = w.prompt_tokens as f64 + w.output_len as f64 / 2.0;
    let kv = decodes * kv_bytes_per_token(d, dtype_bytes) as f64 * mean_ctx;
    let decode_s = (steps * weights + kv) / (c.copy_gbps * 1e9);
    let total = prefill_s + decode_s;
    Roofline { prefill_s, decode_s, output_tps: n * w.output_len as f64 / total, requests_per_s: n / total }
}
