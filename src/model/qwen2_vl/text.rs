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
use crate::ops::{activation, attention, embedding, gemm, norm, qkv_rope};
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
    qkv: Tensor,        // ((heads + 2·kv_heads)·hd, hidden): q_proj, k_proj, v_proj rows
    qkv_bias: Tensor,   // ((heads + 2·kv_heads)·hd,): their biases, in the same order
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

/// The paged KV cache (vLLM's layout, one tensor per layer for keys and one
/// for values): (num_blocks, block_size, kv_heads, head_dim). A sequence owns
/// a list of blocks; its token j lives in row j % block_size of block
/// blocks[j / block_size] (its "slot" is block · block_size + that row).
pub struct PagedKv {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    pub block_size: usize,
    pub num_blocks: usize,
}

impl PagedKv {
    pub fn new(dev: &Device, dims: &TextDims, num_blocks: usize, block_size: usize) -> Result<Self> {
        crate::ensure_shape!(block_size > 0, "kv cache", "block size must be positive");
        let shape = [num_blocks, block_size, dims.kv_heads, dims.head_dim];
        let dt = dev.activation_dtype();
        let mk = || (0..dims.layers).map(|_| Tensor::zeros(dev, &shape, dt)).collect::<Result<Vec<_>>>();
        Ok(Self { k: mk()?, v: mk()?, block_size, num_blocks })
    }

    /// Bytes one block takes over all layers, keys and values.
    pub fn bytes_per_block(dims: &TextDims, dtype: DType, block_size: usize) -> usize {
        2 * dims.layers * block_size * dims.kv_heads * dims.head_dim * dtype.size()
    }
}

/// One sequence's share of a forward pass: `new` tokens that follow `past`
/// tokens already in its blocks (which must cover past + new tokens).
pub struct SeqChunk<'a> {
    pub blocks: &'a [u32],
    pub past: usize,
    pub new: usize,
}

/// Where a forward pass writes keys and values and what each query attends
/// to, on the model's device (vLLM's attention metadata).
pub struct AttnBatch {
    slot_mapping: Tensor, // i32 (tokens,)
    cu_seqlens_q: Tensor, // i32 (seqs + 1,)
    seq_lens_k: Tensor,   // i32 (seqs,)
    block_tables: Tensor, // i32 (seqs, max blocks)
    max_seqlen_q: usize,
    tokens: usize,
}

impl AttnBatch {
    pub fn new(dev: &Device, seqs: &[SeqChunk], block_size: usize) -> Result<Self> {
        let width = seqs.iter().map(|s| s.blocks.len()).max().unwrap_or(0).max(1);
        let (mut slots, mut cu, mut lens, mut table) = (Vec::new(), vec![0i32], Vec::new(), Vec::new());
        for s in seqs {
            let total = s.past + s.new;
            crate::ensure_shape!(
                total <= s.blocks.len() * block_size,
                "attention batch",
                "{total} tokens do not fit {} blocks of {block_size}",
                s.blocks.len()
            );
            for j in s.past..total {
                slots.push((s.blocks[j / block_size] as usize * block_size + j % block_size) as i32);
            }
            cu.push(cu[cu.len() - 1] + s.new as i32);
            lens.push(total as i32);
            table.extend(s.blocks.iter().map(|&b| b as i32));
            table.extend(std::iter::repeat_n(0, width - s.blocks.len()));
        }
        Ok(Self {
            slot_mapping: Tensor::from_i32(dev, &[slots.len()], &slots)?,
            cu_seqlens_q: Tensor::from_i32(dev, &[cu.len()], &cu)?,
            seq_lens_k: Tensor::from_i32(dev, &[lens.len()], &lens)?,
            block_tables: Tensor::from_i32(dev, &[seqs.len(), width], &table)?,
            max_seqlen_q: seqs.iter().map(|s| s.new).max().unwrap_or(0),
            tokens: slots.len(),
        })
    }
}

impl TextModel {
    /// `tied`: tie_word_embeddings, where the LM head is the embedding matrix.
    /// A checkpoint that still stores `lm_head.weight` while tied gets it used.
    pub fn load(w: &Weights, dev: &Device, dims: TextDims, tied: bool) -> Result<Self> {
        let (h, hd) = (dims.hidden, dims.head_dim);
        let mut layers = Vec::with_capacity(dims.layers);
        for i in 0..dims.layers {
            let p = format!("model.language_model.layers.{i}");
            let cpu = Device::Cpu;
            // q | k | v concatenated: one GEMM, then bias, M-RoPE and the
            // cache write in one op (qkv_rope_cache). Biases as (out, 1) rows.
            let (mut ws, mut bs) = (Vec::new(), Vec::new());
            for (name, out) in
                [("q_proj", dims.heads * hd), ("k_proj", dims.kv_heads * hd), ("v_proj", dims.kv_heads * hd)]
            {
                ws.push(w.load(&cpu, &format!("{p}.self_attn.{name}.weight"), &[out, h])?);
                bs.push(w.load(&cpu, &format!("{p}.self_attn.{name}.bias"), &[out])?.reshape(&[out, 1])?);
            }
            let qkv_bias = concat_rows(dev, &bs)?;
            let width = qkv_bias.shape()[0];
            let gate = w.load(&cpu, &format!("{p}.mlp.gate_proj.weight"), &[dims.intermediate, h])?;
            let up = w.load(&cpu, &format!("{p}.mlp.up_proj.weight"), &[dims.intermediate, h])?;
            layers.push(Layer {
                input_norm: w.load(dev, &format!("{p}.input_layernorm.weight"), &[h])?,
                post_norm: w.load(dev, &format!("{p}.post_attention_layernorm.weight"), &[h])?,
                qkv: concat_rows(dev, &ws)?,
                qkv_bias: qkv_bias.reshape(&[width])?,
                o: Linear { w: w.load(dev, &format!("{p}.self_attn.o_proj.weight"), &[h, dims.heads * hd])?, b: None },
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

    /// Runs the decoder over `x` (n, hidden): the new tokens of the
    /// sequences in `batch`, packed in its order, at M-RoPE `positions` (3, n)
    /// i32. Writes their keys and values into `kv` and attends over each
    /// sequence's cached tokens plus its new ones. Returns the final-normed
    /// hidden states (n, hidden). `observe` sees each layer's output.
    pub fn forward(
        &self,
        mut x: Tensor,
        positions: &Tensor,
        kv: &mut PagedKv,
        batch: &AttnBatch,
        observe: &mut dyn FnMut(&str, &Tensor),
    ) -> Result<Tensor> {
        let d = &self.dims;
        let dev = x.device();
        let dt = x.dtype();
        let n = x.shape()[0];
        crate::ensure_shape!(n == batch.tokens, "decoder", "{n} rows for a batch of {} tokens", batch.tokens);
        let scale = 1.0 / (d.head_dim as f32).sqrt();

        let mut h = Tensor::empty(&dev, &[n, d.hidden], dt)?;
        norm::rms_norm(&mut h, &x, &self.layers[0].input_norm, d.eps)?;
        for (i, l) in self.layers.iter().enumerate() {
            // Attention: q | k | v in one GEMM; bias, M-RoPE on q and k, and
            // the cache write of k and v in one op.
            let mut qkv = Tensor::empty(&dev, &[n, l.qkv.shape()[0]], dt)?;
            gemm::gemm(&mut qkv, &h, &l.qkv)?;
            let mut q = Tensor::empty(&dev, &[n, d.heads, d.head_dim], dt)?;
            let (sections, theta) = (d.mrope_section, d.rope_theta);
            let (kc, vc) = (&mut kv.k[i], &mut kv.v[i]);
            qkv_rope::qkv_rope_cache(
                &mut q,
                kc,
                vc,
                &qkv,
                &l.qkv_bias,
                positions,
                &batch.slot_mapping,
                sections,
                theta,
            )?;
            let mut a = Tensor::empty(&dev, &[n, d.heads, d.head_dim], dt)?;
            attention::paged_attention(
                &mut a,
                &q,
                &kv.k[i],
                &kv.v[i],
                &batch.cu_seqlens_q,
                &batch.seq_lens_k,
                &batch.block_tables,
                batch.max_seqlen_q,
                scale,
            )?;
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
