//! The one decoder every family shares: token embedding, layers of (RMSNorm,
//! GQA attention with RoPE over the paged KV cache, RMSNorm, SwiGLU MLP),
//! final norm, LM head. Llama, Qwen2, Phi-3 and Mistral differ only by
//! config ([`DecoderDims`]): q/k/v biases or not, the RoPE (M-RoPE sections,
//! or 1-D RoPE as M-RoPE with three equal position rows), a tied or absent
//! head. Checkpoints that store q|k|v or gate|up fused are loaded by the
//! family into the same stacked tensors.
//! Mirrors transformers `modeling_llama.py` (`LlamaDecoderLayer`,
//! `LlamaAttention`, `LlamaMLP`, `LlamaRMSNorm`) and `modeling_qwen2_vl.py`
//! (`Qwen2VLTextModel`, `Qwen2VLAttention` with M-RoPE).
//!
//! Weights are asked for by canonical names (`model.language_model.*`,
//! `lm_head.weight`); each family's [`Weights`] name map finds them in the
//! checkpoint as stored.
//!
//! The residual stream is kept in the activation dtype and each residual add
//! is fused with the RMSNorm that follows it (`add_rms_norm`), as HF's bf16
//! path also rounds the sum to bf16 before normalising.

use crate::error::Result;
use crate::model::layers::Linear;
use crate::model::weights::Weights;
use crate::ops::{activation, attention, embedding, gemm, norm, qkv_rope, rope};
use crate::tensor::{DType, Device, Tensor};

/// What the decoder needs from the family's text config.
#[derive(Clone, Debug)]
pub struct DecoderDims {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub eps: f32,
    pub rope_theta: f32,
    /// Rotary frequency pairs per position row (temporal, height, width);
    /// sums to head_dim / 2. 1-D RoPE is [head_dim / 2, 0, 0].
    pub mrope_section: [usize; 3],
    /// Whether q_proj, k_proj and v_proj have biases (Qwen2: yes; Llama: no).
    pub qkv_bias: bool,
    /// Longrope frequency scaling (Phi-3), or None for plain RoPE.
    pub longrope: Option<LongRope>,
    /// The LM head: its own tensor, the token embedding, or none (a base
    /// model saved without head, served for embeddings only).
    pub head: Head,
}

/// Phi-3's longrope ("su") RoPE scaling: inverse frequencies divided by a
/// short or a long factor table, cos and sin scaled by `attention_factor`.
/// Which table a sequence uses is fixed for its whole life by
/// [`LongRope::table_for`] and travels in its position row 1 (see
/// [`crate::ops::rope::Freqs::Table`]), so one sequence's KV cache never
/// mixes tables.
#[derive(Clone, Debug, PartialEq)]
pub struct LongRope {
    pub short_factor: Vec<f32>,
    pub long_factor: Vec<f32>,
    /// `original_max_position_embeddings` (4096 for Phi-3.5).
    pub original_max_positions: usize,
    /// √(1 + ln s / ln original) with s = max / original positions (HF's
    /// `attention_factor` default), or the config's own.
    pub attention_factor: f32,
}

impl LongRope {
    /// The table (0 short, 1 long) of a sequence that may grow to `max_len`
    /// tokens: the short one while it stays within the original length
    /// (where HF uses it too), the long one from the start otherwise. HF
    /// switches per forward pass once positions pass the original length,
    /// which would leave the earlier keys rotated by the other table; vLLM
    /// picks one table for the whole server from max_model_len.
    pub fn table_for(&self, max_len: usize) -> i32 {
        (max_len > self.original_max_positions) as i32
    }
}

/// Where the decoder's LM head comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Head {
    /// `lm_head.weight` (used also when tied but present, as HF loads it).
    Own,
    /// tie_word_embeddings: the token embedding.
    Tied,
    /// No head (`*Model` classes): hidden states only.
    None,
}

impl DecoderDims {
    /// 1-D RoPE's sections: every frequency reads the first position row.
    pub fn rope_1d_sections(head_dim: usize) -> [usize; 3] {
        [head_dim / 2, 0, 0]
    }

    /// Parameters one decode step reads: every layer, the final norm and
    /// the LM head (none when headless). The embedding lookup reads one
    /// row per token and is left out.
    pub fn step_params(&self) -> usize {
        let head = if self.head == Head::None { 0 } else { self.vocab * self.hidden };
        self.layers * self.layer_params() + self.hidden + head
    }

    /// Parameters of one layer: q, k, v (with biases if any), o,
    /// gate/up/down and the two norms.
    pub fn layer_params(&self) -> usize {
        let (h, q, kv) = (self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim);
        let bias = if self.qkv_bias { q + 2 * kv } else { 0 };
        let attn = h * q + 2 * h * kv + bias + q * h;
        attn + 3 * h * self.intermediate + 2 * h
    }

    /// The longrope table of a sequence that may grow to `max_len` tokens
    /// ([`LongRope::table_for`]); None without longrope.
    pub fn rope_table_for(&self, max_len: usize) -> Option<i32> {
        self.longrope.as_ref().map(|lr| lr.table_for(max_len))
    }

    /// KV cache bytes one token adds: K and V of every layer.
    pub fn kv_bytes_per_token(&self, dtype_bytes: usize) -> usize {
        2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes
    }
}

struct Layer {
    input_norm: Tensor, // (hidden,)
    post_norm: Tensor,  // (hidden,)
    qkv: Tensor,        // ((heads + 2·kv_heads)·hd, hidden): q_proj, k_proj, v_proj rows
    qkv_bias: Tensor,   // ((heads + 2·kv_heads)·hd,): their biases in the same order (zeros without)
    o: Linear,          // (hidden, heads·hd), no bias
    gate_up: Tensor,    // (2·intermediate, hidden): gate_proj rows, then up_proj rows
    down: Tensor,       // (hidden, intermediate)
}

pub struct Decoder {
    pub dims: DecoderDims,
    /// Longrope's inverse-frequency tables (2, head_dim / 2) f32: short, long.
    rope_tables: Option<Tensor>,
    embed: Tensor, // (vocab, hidden)
    layers: Vec<Layer>,
    norm: Tensor,            // (hidden,)
    lm_head: Option<Tensor>, // (vocab, hidden); None when tied to the embedding or headless
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
    pub fn new(dev: &Device, dims: &DecoderDims, num_blocks: usize, block_size: usize) -> Result<Self> {
        crate::ensure_shape!(block_size > 0, "kv cache", "block size must be positive");
        let shape = [num_blocks, block_size, dims.kv_heads, dims.head_dim];
        let dt = dev.activation_dtype();
        let mk = || (0..dims.layers).map(|_| Tensor::zeros(dev, &shape, dt)).collect::<Result<Vec<_>>>();
        Ok(Self { k: mk()?, v: mk()?, block_size, num_blocks })
    }

    /// Bytes one block takes over all layers, keys and values.
    pub fn bytes_per_block(dims: &DecoderDims, dtype: DType, block_size: usize) -> usize {
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

impl Decoder {
    /// Loads the decoder by canonical names. q|k|v and gate|up are stacked
    /// from separate tensors (`*_proj.weight`) or taken as stored when the
    /// checkpoint fuses them (`qkv_proj`, `gate_up_proj`, as Phi-3 does).
    /// Without q/k/v biases the fused op gets zeros (adding 0 is exact).
    pub fn load(w: &Weights, dev: &Device, dims: DecoderDims) -> Result<Self> {
        let (h, hd) = (dims.hidden, dims.head_dim);
        let at0 = "model.language_model.layers.0.self_attn.q_proj.weight";
        crate::ops::attention::check_head_dim(dev, hd, &format!("tensor `{at0}` (head dim {hd})"))?;
        let mut layers = Vec::with_capacity(dims.layers);
        for i in 0..dims.layers {
            let p = format!("model.language_model.layers.{i}");
            // q | k | v stacked: one GEMM, then bias, M-RoPE and the cache
            // write in one op (qkv_rope_cache).
            let at = |name: &str| format!("{p}.self_attn.{name}");
            let (q_rows, kv_rows) = (dims.heads * hd, dims.kv_heads * hd);
            let rows = q_rows + 2 * kv_rows;
            let qkv = if w.contains(&at("qkv_proj.weight")) {
                w.load(dev, &at("qkv_proj.weight"), &[rows, h])?
            } else {
                let (qw, kw, vw) = (at("q_proj.weight"), at("k_proj.weight"), at("v_proj.weight"));
                let (qs, kvs) = ([q_rows, h], [kv_rows, h]);
                w.load_stacked(dev, &[(&qw, &qs), (&kw, &kvs), (&vw, &kvs)])?
            };
            let qkv_bias = if dims.qkv_bias {
                let (qb, kb, vb) = (at("q_proj.bias"), at("k_proj.bias"), at("v_proj.bias"));
                let (qbs, kvbs) = ([q_rows], [kv_rows]);
                w.load_stacked(dev, &[(&qb, &qbs), (&kb, &kvbs), (&vb, &kvbs)])?
            } else {
                Tensor::zeros(dev, &[rows], dev.activation_dtype())?
            };
            let mlp_shape = [dims.intermediate, h];
            let gate_up = if w.contains(&format!("{p}.mlp.gate_up_proj.weight")) {
                w.load(dev, &format!("{p}.mlp.gate_up_proj.weight"), &[2 * dims.intermediate, h])?
            } else {
                let (gate, up) = (format!("{p}.mlp.gate_proj.weight"), format!("{p}.mlp.up_proj.weight"));
                w.load_stacked(dev, &[(&gate, &mlp_shape), (&up, &mlp_shape)])?
            };
            layers.push(Layer {
                input_norm: w.load(dev, &format!("{p}.input_layernorm.weight"), &[h])?,
                post_norm: w.load(dev, &format!("{p}.post_attention_layernorm.weight"), &[h])?,
                qkv,
                qkv_bias,
                o: Linear { w: w.load(dev, &at("o_proj.weight"), &[h, dims.heads * hd])?, b: None },
                gate_up,
                down: w.load(dev, &format!("{p}.mlp.down_proj.weight"), &[h, dims.intermediate])?,
            });
        }
        let lm_head = match dims.head {
            Head::Own => Some(w.load(dev, "lm_head.weight", &[dims.vocab, h])?),
            Head::Tied if w.contains("lm_head.weight") => Some(w.load(dev, "lm_head.weight", &[dims.vocab, h])?),
            Head::Tied | Head::None => None,
        };
        let rope_tables = match &dims.longrope {
            Some(lr) => {
                let half = hd / 2;
                crate::ensure_shape!(
                    lr.short_factor.len() == half && lr.long_factor.len() == half,
                    "decoder",
                    "longrope factors have {} and {} values; head dim {hd} needs {half} each",
                    lr.short_factor.len(),
                    lr.long_factor.len()
                );
                let t = rope::longrope_tables(dims.rope_theta, &[&lr.short_factor, &lr.long_factor]);
                Some(Tensor::from_f32(dev, &[2, half], &t, DType::F32)?)
            }
            None => None,
        };
        Ok(Self {
            rope_tables,
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
        let sections = d.mrope_section;
        let freqs = match (&self.rope_tables, &d.longrope) {
            (Some(t), Some(lr)) => rope::Freqs::Table { inv_freq: t, mscale: lr.attention_factor },
            _ => rope::Freqs::Theta(d.rope_theta),
        };

        let mut h = Tensor::empty(&dev, &[n, d.hidden], dt)?;
        norm::rms_norm(&mut h, &x, &self.layers[0].input_norm, d.eps)?;
        for (i, l) in self.layers.iter().enumerate() {
            // Attention: q | k | v in one GEMM; bias, M-RoPE on q and k, and
            // the cache write of k and v in one op.
            let mut qkv = Tensor::empty(&dev, &[n, l.qkv.shape()[0]], dt)?;
            gemm::gemm(&mut qkv, &h, &l.qkv)?;
            let mut q = Tensor::empty(&dev, &[n, d.heads, d.head_dim], dt)?;
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
                freqs,
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
    /// An error for a headless decoder (a base model for embeddings).
    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        let head = match (&self.lm_head, self.dims.head) {
            (Some(t), _) => t,
            (None, Head::Tied) => &self.embed,
            (None, _) => {
                return Err(crate::error::Error::Engine(
                    "this checkpoint has no LM head (a base model): it serves embeddings only (--task embedding)"
                        .into(),
                ))
            }
        };
        let rows = h.shape()[0];
        let mut out = Tensor::empty(&h.device(), &[rows, self.dims.vocab], DType::F32)?;
        gemm::gemm(&mut out, h, head)?;
        Ok(out)
    }

    /// Whether the decoder can produce logits.
    pub fn has_head(&self) -> bool {
        self.dims.head != Head::None
    }
}
