//! The Qwen2 decoder of Qwen2-VL: token embedding, layers of (RMSNorm, GQA
//! attention with q/k/v biases and M-RoPE, RMSNorm, SwiGLU MLP), final norm,
//! LM head. Mirrors transformers modeling_qwen2_vl.py: `Qwen2VLTextModel`,
//! `Qwen2VLDecoderLayer`, `Qwen2VLAttention`, `Qwen2MLP`, `Qwen2RMSNorm`.
//!
//! The residual stream is kept in the activation dtype and each residual add
//! is fused with the RMSNorm that follows it (`add_rms_norm`), as HF's bf16
//! path also rounds the sum to bf16 before normalising.

use crate::error::Result;
use crate::model::layers::{concat_rows, Linear};
use crate::model::weights::Weights;
use crate::ops::{activation, attention, embedding, gemm, norm, rope};
use crate::tensor::{DType, Device, Tensor};

/// What the decoder needs from text_config.
#[derive(Clone, Debug)]
pub struct TextDims {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub eps: f32,
    pub rope_theta: f32,
    pub mrope_section: [usize; 3],
}

struct Layer {
    input_norm: Tensor, // (hidden,)
    post_norm: Tensor,  // (hidden,)
    q: Linear,          // (heads·hd, hidden) + bias
    k: Linear,          // (kv_heads·hd, hidden) + bias
    v: Linear,          // (kv_heads·hd, hidden) + bias
    o: Linear,          // (hidden, heads·hd), no bias
    gate_up: Tensor,    // (2·intermediate, hidden): gate_proj rows, then up_proj rows
    down: Tensor,       // (hidden, intermediate)
}

pub struct TextModel {
    pub dims: TextDims,
    embed: Tensor, // (vocab, hidden)
    layers: Vec<Layer>,
    norm: Tensor,            // (hidden,)
    lm_head: Option<Tensor>, // (vocab, hidden); None when tied to the embedding
}

/// Per-sequence KV cache: one (capacity, kv_heads, head_dim) tensor per layer
/// for keys and one for values; rows 0..len are filled.
pub struct KvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    pub len: usize,
}

impl KvCache {
    pub fn new(dev: &Device, dims: &TextDims, capacity: usize) -> Result<Self> {
        let shape = [capacity, dims.kv_heads, dims.head_dim];
        let dt = dev.activation_dtype();
        let mk = || (0..dims.layers).map(|_| Tensor::empty(dev, &shape, dt)).collect::<Result<Vec<_>>>();
        Ok(Self { k: mk()?, v: mk()?, len: 0 })
    }
    pub fn capacity(&self) -> usize {
        self.k.first().map_or(0, |t| t.shape()[0])
    }
}

impl TextModel {
    /// `tied`: tie_word_embeddings, where the LM head is the embedding matrix.
    /// A checkpoint that still stores `lm_head.weight` while tied gets it used.
    pub fn load(w: &Weights, dev: &Device, dims: TextDims, tied: bool) -> Result<Self> {
        let (h, hd) = (dims.hidden, dims.head_dim);
        let lin = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
            Ok(Linear {
                w: w.load(dev, &format!("{name}.weight"), &[out, inp])?,
                b: if bias { Some(w.load(dev, &format!("{name}.bias"), &[out])?) } else { None },
            })
        };
        let mut layers = Vec::with_capacity(dims.layers);
        for i in 0..dims.layers {
            let p = format!("model.language_model.layers.{i}");
            let cpu = Device::Cpu;
            let gate = w.load(&cpu, &format!("{p}.mlp.gate_proj.weight"), &[dims.intermediate, h])?;
            let up = w.load(&cpu, &format!("{p}.mlp.up_proj.weight"), &[dims.intermediate, h])?;
            layers.push(Layer {
                input_norm: w.load(dev, &format!("{p}.input_layernorm.weight"), &[h])?,
                post_norm: w.load(dev, &format!("{p}.post_attention_layernorm.weight"), &[h])?,
                q: lin(&format!("{p}.self_attn.q_proj"), dims.heads * hd, h, true)?,
                k: lin(&format!("{p}.self_attn.k_proj"), dims.kv_heads * hd, h, true)?,
                v: lin(&format!("{p}.self_attn.v_proj"), dims.kv_heads * hd, h, true)?,
                o: lin(&format!("{p}.self_attn.o_proj"), h, dims.heads * hd, false)?,
                gate_up: concat_rows(dev, &[gate, up])?,
                down: w.load(dev, &format!("{p}.mlp.down_proj.weight"), &[h, dims.intermediate])?,
            });
        }
        let lm_head = if tied && !w.contains("lm_head.weight") {
            None
        } else {
            Some(w.load(dev, "lm_head.weight", &[dims.vocab, h])?)
        };
        Ok(Self {
            embed: w.load(dev, "model.language_model.embed_tokens.weight", &[dims.vocab, h])?,
            norm: w.load(dev, "model.language_model.norm.weight", &[h])?,
            layers,
            lm_head,
            dims,
        })
    }

    /// Token embeddings (n, hidden) of `ids` (i32 (n,) on the model's device).
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let mut out = Tensor::empty(&ids.device(), &[ids.numel(), self.dims.hidden], self.embed.dtype())?;
        embedding::embedding(&mut out, ids, &self.embed)?;
        Ok(out)
    }

    /// Runs the decoder over `x` (n, hidden) — new tokens that follow the
    /// `cache.len` tokens already cached — at M-RoPE `positions` (3, n) i32,
    /// appending their keys and values to `cache`. Returns the final-normed
    /// hidden states (n, hidden). `observe` sees each layer's output.
    pub fn forward(
        &self,
        mut x: Tensor,
        positions: &Tensor,
        cache: &mut KvCache,
        observe: &mut dyn FnMut(&str, &Tensor),
    ) -> Result<Tensor> {
        let d = &self.dims;
        let dev = x.device();
        let dt = x.dtype();
        let n = x.shape()[0];
        let past = cache.len;
        crate::ensure_shape!(
            past + n <= cache.capacity(),
            "decoder",
            "{past} cached + {n} new tokens exceed the cache of {}",
            cache.capacity()
        );
        let cu_q = Tensor::from_i32(&dev, &[2], &[0, n as i32])?;
        let cu_k = Tensor::from_i32(&dev, &[2], &[0, (past + n) as i32])?;
        let scale = 1.0 / (d.head_dim as f32).sqrt();

        let mut h = Tensor::empty(&dev, &[n, d.hidden], dt)?;
        norm::rms_norm(&mut h, &x, &self.layers[0].input_norm, d.eps)?;
        for (i, l) in self.layers.iter().enumerate() {
            // Attention.
            let mut q = l.q.forward(&h)?.reshape(&[n, d.heads, d.head_dim])?;
            let mut k = l.k.forward(&h)?.reshape(&[n, d.kv_heads, d.head_dim])?;
            let v = l.v.forward(&h)?.reshape(&[n, d.kv_heads, d.head_dim])?;
            rope::mrope(&mut q, positions, d.mrope_section, d.rope_theta)?;
            rope::mrope(&mut k, positions, d.mrope_section, d.rope_theta)?;
            cache.k[i].copy_rows_from(past, &k, 0, n)?;
            cache.v[i].copy_rows_from(past, &v, 0, n)?;
            let mut a = Tensor::empty(&dev, &[n, d.heads, d.head_dim], dt)?;
            attention::attention(&mut a, &q, &cache.k[i], &cache.v[i], &cu_q, &cu_k, n, true, scale)?;
            let o = l.o.forward(&a.reshape(&[n, d.heads * d.head_dim])?)?;
            norm::add_rms_norm(&mut h, &mut x, &o, &l.post_norm, d.eps)?;
            // MLP.
            let mut gu = Tensor::empty(&dev, &[n, 2 * d.intermediate], dt)?;
            gemm::gemm(&mut gu, &h, &l.gate_up)?;
            let mut act = Tensor::empty(&dev, &[n, d.intermediate], dt)?;
            activation::silu_and_mul(&mut act, &gu)?;
            let mut m = Tensor::empty(&dev, &[n, d.hidden], dt)?;
            gemm::gemm(&mut m, &act, &l.down)?;
            // Residual add fused with the next norm (the final norm after the last layer).
            let next = self.layers.get(i + 1).map_or(&self.norm, |nl| &nl.input_norm);
            norm::add_rms_norm(&mut h, &mut x, &m, next, d.eps)?;
            observe(&format!("decoder.layer.{i}"), &x);
        }
        cache.len = past + n;
        observe("decoder.norm", &h);
        Ok(h)
    }

    /// f32 logits (rows, vocab) of hidden states (rows, hidden).
    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        let rows = h.shape()[0];
        let mut out = Tensor::empty(&h.device(), &[rows, self.dims.vocab], DType::F32)?;
        gemm::gemm(&mut out, h, self.lm_head.as_ref().unwrap_or(&self.embed))?;
        Ok(out)
    }
}
