//! Rooflines for the benchmarks: the fastest a workload could run on a card
//! whose ceilings (device copy bandwidth, bf16 GEMM rate) were measured in
//! the same run (`kestrel bench kernels`). A benchmark prints its figure and
//! the ratio to this bound, so a number says how far from the hardware it is.
//!
//! Counts follow transformers `modeling_qwen2_vl.py`: the decoder layer
//! (`Qwen2VLDecoderLayer`: q/k/v with biases, o, gate/up/down, two RMSNorms),
//! the vision block (`Qwen2VLVisionBlock`: LayerNorms, qkv and proj with
//! biases, fc1/fc2), the patch embed (`PatchEmbed`, a Conv3d without bias)
//! and the merger (`PatchMerger`: LayerNorm, two linears over 4 merged
//! patches). A GEMM of an (m, k) by (k, n) is 2·m·k·n flops; attention is
//! 4·head_dim flops per (query, key, head) pair a query sees (QKᵀ and PV).

use crate::model::config::{TextConfig, VisionConfig};

/// Ceilings of one card, measured in the same run.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Ceilings {
    /// Device copy bandwidth, bytes read + written, in GB/s.
    pub copy_gbps: f64,
    /// cuBLAS bf16 GEMM rate in TFLOP/s.
    pub gemm_tflops: f64,
}

/// Parameters the decoder reads for one step: every layer, the final norm
/// and the LM head (the token embedding when tied, counted once). The
/// embedding lookup reads one row per token and is left out.
pub fn decoder_step_params(t: &TextConfig) -> usize {
    t.num_hidden_layers * layer_params(t) + t.hidden_size + t.vocab_size * t.hidden_size
}

/// Parameters of one decoder layer.
fn layer_params(t: &TextConfig) -> usize {
    let (h, kv) = (t.hidden_size, t.num_key_value_heads * t.head_dim);
    let attn = (h * h + h) + 2 * (h * kv + kv) + h * h;
    let mlp = 3 * h * t.intermediate_size;
    attn + mlp + 2 * h
}

/// KV cache bytes one token adds: K and V of every layer.
pub fn kv_bytes_per_token(t: &TextConfig, dtype_bytes: usize) -> usize {
    2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * dtype_bytes
}

/// Flops to prefill one sequence of `tokens` (text and image placeholders
/// alike) from an empty cache, logits for its last token only (as vLLM and
/// Kestrel compute them).
pub fn text_prefill_flops(t: &TextConfig, tokens: usize) -> f64 {
    let n = tokens as f64;
    let linear = 2.0 * n * (layer_params(t) - 2 * t.hidden_size) as f64;
    let pairs = n * (n + 1.0) / 2.0; // causal
    let attn = 4.0 * (t.head_dim * t.num_attention_heads) as f64 * pairs;
    t.num_hidden_layers as f64 * (linear + attn) + 2.0 * (t.hidden_size * t.vocab_size) as f64
}

/// Flops of the vision tower on one image or video of `grid` = [t, h, w]
/// patches: patch embed, `depth` blocks (attention within each frame), merger.
pub fn vision_flops(v: &VisionConfig, grid: [usize; 3]) -> f64 {
    let [t, h, w] = grid;
    let (frame, e, m) = ((h * w) as f64, v.embed_dim as f64, v.mlp_hidden_dim as f64);
    let n = t as f64 * frame;
    let embed = 2.0 * n * v.patch_dim() as f64 * e;
    let block_linear = 2.0 * n * (4.0 * e * e + 2.0 * e * m);
    let block_attn = t as f64 * 4.0 * frame * frame * e;
    let merge = (v.spatial_merge_size * v.spatial_merge_size) as f64;
    let mh = v.merger_hidden_size() as f64;
    let merger = 2.0 * (n / merge) * (mh * mh + mh * v.hidden_size as f64);
    embed + v.depth as f64 * (block_linear + block_attn) + merger
}

/// A serving workload in the shape of vLLM's random-mm dataset: every
/// request the same size, `concurrency` of them decoding together.
#[derive(Clone, Copy, Debug)]
pub struct Workload {
    pub requests: usize,
    pub concurrency: usize,
    /// Prompt tokens per request, image placeholders included.
    pub prompt_tokens: usize,
    /// The image's grid in patches, if the request carries one.
    pub image_grid: Option<[usize; 3]>,
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

/// The roofline of `w` for a model of `text`/`vision` whose weights and KV
/// cache hold `dtype_bytes` per value (2 for bf16). Prefill is every
/// request's prompt and image; decode is `output_len - 1` steps per request
/// (prefill gives the first token), in batches of `concurrency`, each step
/// reading the decoder's weights once and every sequence's KV cache at its
/// mean context.
pub fn random_mm(text: &TextConfig, vision: &VisionConfig, w: &Workload, c: &Ceilings, dtype_bytes: usize) -> Roofline {
    let n = w.requests as f64;
    let per_request = text_prefill_flops(text, w.prompt_tokens) + w.image_grid.map_or(0.0, |g| vision_flops(vision, g));
    let prefill_s = n * per_request / (c.gemm_tflops * 1e12);
    let decodes = n * w.output_len.saturating_sub(1) as f64;
    let steps = decodes / w.concurrency.clamp(1, w.requests.max(1)) as f64;
    let weights = (decoder_step_params(text) * dtype_bytes) as f64;
    let mean_ctx = w.prompt_tokens as f64 + w.output_len as f64 / 2.0;
    let kv = decodes * kv_bytes_per_token(text, dtype_bytes) as f64 * mean_ctx;
    let decode_s = (steps * weights + kv) / (c.copy_gbps * 1e9);
    let total = prefill_s + decode_s;
    Roofline { prefill_s, decode_s, output_tps: n * w.output_len as f64 / total, requests_per_s: n / total }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Qwen2VlConfig;

    fn published(name: &str) -> Qwen2VlConfig {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/loader/configs").join(name);
        Qwen2VlConfig::from_json_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn decoder_bytes_match_the_published_parameter_counts() {
        // REFERENCE.md: the 2B language model has 1.544 B parameters (tied
        // head), the 7B one 7.616 B (untied: its 0.545 B embedding is read one
        // row per token, so a step reads 7.07 B).
        let b2 = decoder_step_params(&published("qwen2_vl_2b_instruct.json").text_config) as f64;
        assert!((b2 / 1e9 - 1.544).abs() < 0.002, "{b2}");
        let t7 = published("qwen2_vl_7b_instruct.json").text_config;
        let b7 = decoder_step_params(&t7) as f64 + (t7.vocab_size * t7.hidden_size) as f64;
        assert!((b7 / 1e9 - 7.616).abs() < 0.002, "{b7}");
    }

    #[test]
    fn vision_flops_count_each_parameter_once_per_patch_it_sees() {
        // 0.665 B vision parameters (REFERENCE.md). All but the merger's see
        // every patch (2 flops each); the merger's see one merged row per 4
        // patches, so a quarter of them count per patch.
        let v = published("qwen2_vl_2b_instruct.json").vision_config;
        let mh = v.merger_hidden_size();
        let merger = (mh * mh + mh * v.hidden_size) as f64;
        let one = vision_flops(&v, [1, 2, 2]) / 4.0;
        assert!((one / 2.0 - (0.665e9 - 0.75 * merger)).abs() < 0.002e9, "{one}");
        // Attention grows with the square of a frame, not across frames.
        let (a, b) = (vision_flops(&v, [1, 36, 36]), vision_flops(&v, [2, 36, 36]));
        assert!((b / a - 2.0).abs() < 1e-9);
        let big = vision_flops(&v, [1, 72, 72]);
        assert!(big > 4.0 * a);
    }

    #[test]
    fn random_mm_splits_into_prefill_and_decode() {
        let cfg = published("qwen2_vl_2b_instruct.json");
        let c = Ceilings { copy_gbps: 3000.0, gemm_tflops: 600.0 };
        let w = Workload { requests: 1, concurrency: 1, prompt_tokens: 1, image_grid: None, output_len: 2 };
        let r = random_mm(&cfg.text_config, &cfg.vision_config, &w, &c, 2);
        // One decode step at batch 1 reads 3.09 GB (REFERENCE.md: 1.03 ms at 3.0 TB/s).
        assert!((r.decode_s * 1e3 - 1.03).abs() < 0.01, "{r:?}");
        // Doubling the batch halves the weight reads per token.
        let w64 = Workload {
            requests: 64,
            concurrency: 64,
            prompt_tokens: 452,
            image_grid: Some([1, 36, 36]),
            output_len: 128,
        };
        let w32 = Workload { concurrency: 32, ..w64 };
        let (r64, r32) = (
            random_mm(&cfg.text_config, &cfg.vision_config, &w64, &c, 2),
            random_mm(&cfg.text_config, &cfg.vision_config, &w32, &c, 2),
        );
        assert_eq!(r64.prefill_s, r32.prefill_s);
        assert!(r64.decode_s < r32.decode_s && r64.output_tps > r32.output_tps);
        assert!((r64.output_tps / r64.requests_per_s - 128.0).abs() < 1e-9);
    }
}
