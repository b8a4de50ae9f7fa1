//! The Qwen2 decoder of Qwen2-VL: token embedding, layers of (RMSNorm, GQA
//! attention with q/k/v biases and M-RoPE, RMSNorm, SwiGLU MLP), final norm,
//! LM head. Mirrors transformers modeling_qwen2_vl.py: `Qwen2VLTextModel`,
//! `Qwen2VLDecoderLayer`, `Qwen2VLAttention`, `Qwen2MLP`, `Qwen2RMSNorm`.
//!
//! The residual stream is kept in the activation dtype and each residual add
//! is fused with the RMSNorm that follows it (`add_rms_norm`), as HF's bf16
//! path also rounds the sum to bf16 before normalising.

use crate::error::Result;
use crate::model::layers::Linear;
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

impl AttnBatch {
    /// `seqs` one-token sequences with block tables `width` blocks wide, for
    /// a captured decode graph; `write_decode` rewrites it in place before
    /// each replay. Until then every row is padding.
    pub fn decode_static(dev: &Device, seqs: usize, width: usize) -> Result<Self> {
        let cu: Vec<i32> = (0..=seqs as i32).collect();
        Ok(Self {
            slot_mapping: Tensor::from_i32(dev, &[seqs], &vec![-1; seqs])?,
            cu_seqlens_q: Tensor::from_i32(dev, &[seqs + 1], &cu)?,
            seq_lens_k: Tensor::from_i32(dev, &[seqs], &vec![1; seqs])?,
            block_tables: Tensor::from_i32(dev, &[seqs, width], &vec![0; seqs * width])?,
            max_seqlen_q: 1,
            tokens: seqs,
        })
    }

    /// Rewrites a `decode_static` batch for `chunks`, each adding one token.
    /// Rows past the chunks are padding: their key is not written (slot -1)
    /// and their query attends to one key of whatever block their table row
    /// names; their outputs are never read.
    pub fn write_decode(&mut self, chunks: &[SeqChunk], block_size: usize) -> Result<()> {
        let (seqs, width) = (self.tokens, self.block_tables.shape()[1]);
        crate::ensure_shape!(chunks.len() <= seqs, "decode batch", "{} sequences for {seqs} rows", chunks.len());
        let mut slots = vec![-1i32; seqs];
        let mut lens = vec![1i32; seqs];
        let mut table = vec![0i32; chunks.len() * width];
        for (i, c) in chunks.iter().enumerate() {
            let total = c.past + 1;
            crate::ensure_shape!(
                c.new == 1 && c.blocks.len() <= width && total <= c.blocks.len() * block_size,
                "decode batch",
                "{} new tokens after {} over {} blocks (at most {width})",
                c.new,
                c.past,
                c.blocks.len()
            );
            slots[i] = (c.blocks[c.past / block_size] as usize * block_size + c.past % block_size) as i32;
            lens[i] = total as i32;
            for (t, &b) in table[i * width..].iter_mut().zip(c.blocks) {
                *t = b as i32;
            }
        }
        self.slot_mapping.write_i32(&slots)?;
        self.seq_lens_k.write_i32(&lens)?;
        self.block_tables.write_i32(&table)
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
            // q | k | v stacked: one GEMM, then bias, M-RoPE and the cache
            // write in one op (qkv_rope_cache).
            let at = |name: &str| format!("{p}.self_attn.{name}");
            let (qw, kw, vw) = (at("q_proj.weight"), at("k_proj.weight"), at("v_proj.weight"));
            let (qb, kb, vb) = (at("q_proj.bias"), at("k_proj.bias"), at("v_proj.bias"));
            let (q_rows, kv_rows) = (dims.heads * hd, dims.kv_heads * hd);
            let (qs, kvs) = ([q_rows, h], [kv_rows, h]);
            let (qbs, kvbs) = ([q_rows], [kv_rows]);
            let (gate, up) = (format!("{p}.mlp.gate_proj.weight"), format!("{p}.mlp.up_proj.weight"));
            let mlp_shape = [dims.intermediate, h];
            layers.push(Layer {
                input_norm: w.load(dev, &format!("{p}.input_layernorm.weight"), &[h])?,
                post_norm: w.load(dev, &format!("{p}.post_attention_layernorm.weight"), &[h])?,
                qkv: w.load_stacked(dev, &[(&qw, &qs), (&kw, &kvs), (&vw, &kvs)])?,
                qkv_bias: w.load_stacked(dev, &[(&qb, &qbs), (&kb, &kvbs), (&vb, &kvbs)])?,
                o: Linear { w: w.load(dev, &at("o_proj.weight"), &[h, dims.heads * hd])?, b: None },
                gate_up: w.load_stacked(dev, &[(&gate, &mlp_shape), (&up, &mlp_shape)])?,
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
