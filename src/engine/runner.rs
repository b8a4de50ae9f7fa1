//! The model side of a step: packs the scheduled sequences' new tokens into
//! one forward pass over the paged KV cache and returns the logits of the
//! sequences that sample. Mirrors vLLM v1's `GPUModelRunner` (input
//! preparation, `execute_model`) for any model family (the `Model` contract).
//!
//! Also sizes the KV cache: as vLLM's `determine_available_memory`, a
//! profiling pass over the largest batch measures the activation peak, and
//! the cache gets what `gpu_memory_utilization` of the card leaves after the
//! weights, that peak, and the largest image the processor can produce.

use super::blocks::blocks_for;
use super::graphs::DecodeGraphs;
use super::pooling::Pooling;
use crate::error::{Error, Result};
use crate::model::decoder::{AttnBatch, PagedKv, SeqChunk};
use crate::model::inputs::{MediaFeatures, PreparedInput};
use crate::model::Model;
use crate::ops::embedding;
use crate::tensor::{DType, Device, Tensor};

/// One sequence's part of a step.
pub struct SeqWork<'a> {
    pub input: &'a PreparedInput,
    pub output: &'a [u32],
    pub blocks: &'a [u32],
    /// Tokens already in the cache; this step computes tokens past..past + new.
    pub past: usize,
    pub new: usize,
    /// The media features, while the step covers prompt placeholders.
    pub features: Option<&'a MediaFeatures>,
    /// Whether the step ends at the sequence's last token (it samples).
    pub sample: bool,
    /// An embedding request finishing this step: which rows to return.
    pub pool: Option<Pooling>,
}

/// A step's results.
pub struct StepOutput {
    /// f32 (sampling sequences, vocab), in work order.
    pub logits: Option<Tensor>,
    /// For each pooling sequence, in work order: its final-normed hidden
    /// rows the pooling needs (the last, the first, or all), row-major.
    pub pooled: Vec<Vec<f32>>,
}

impl SeqWork<'_> {
    pub(super) fn token(&self, t: usize) -> u32 {
        let n = self.input.input_ids.len();
        if t < n {
            self.input.input_ids[t]
        } else {
            self.output[t - n]
        }
    }

    /// Position of token t on `axis` (0 temporal, 1 height, 2 width).
    pub(super) fn position(&self, axis: usize, t: usize) -> i32 {
        self.input.position(axis, t)
    }
}

pub struct Runner {
    pub model: Box<dyn Model>,
    kv: PagedKv,
    /// Decode steps replayed from CUDA graphs (None: every step eager).
    graphs: Option<DecodeGraphs>,
    graph_replays: u64,
}

/// Memory settings of the KV cache.
#[derive(Clone, Debug)]
pub struct CacheConfig {
    pub block_size: usize,
    /// Fraction of the card's memory Kestrel may use in all (vLLM's flag).
    pub gpu_memory_utilization: f32,
    /// KV cache size on the CPU backend.
    pub cpu_kv_cache_bytes: usize,
    /// Tokens of the largest step (the profiling pass runs this many).
    pub max_num_batched_tokens: usize,
    /// Pixels of the largest image after preprocessing (its max_pixels).
    pub max_image_pixels: usize,
}

impl Runner {
    /// Sizes and allocates the KV cache for `model` on its device.
    pub fn new(model: Box<dyn Model>, cfg: &CacheConfig) -> Result<Self> {
        let dims = &model.decoder().dims;
        let per_block = PagedKv::bytes_per_block(dims, model.device().activation_dtype(), cfg.block_size);
        let num_blocks = match model.device() {
            Device::Cpu => cfg.cpu_kv_cache_bytes / per_block,
            Device::Cuda(gpu) => {
                let peak = profile(model.as_ref(), cfg)?;
                gpu.pool().trim();
                let (free, total) = gpu.mem_info()?;
                let allowed = (total as f64 * cfg.gpu_memory_utilization as f64) as usize;
                let used = total - free;
                let budget = allowed.saturating_sub(used + peak);
                if budget < per_block {
                    return Err(Error::Engine(format!(
                        "no memory left for the KV cache: {:.2} GiB allowed ({} of {:.2} GiB), {:.2} GiB in use \
                         (weights), {:.2} GiB reserved for activations; raise --gpu-memory-utilization",
                        gib(allowed),
                        cfg.gpu_memory_utilization,
                        gib(total),
                        gib(used),
                        gib(peak)
                    )));
                }
                budget / per_block
            }
        };
        if num_blocks == 0 {
            return Err(Error::Engine(format!(
                "the KV cache holds no block of {} tokens ({per_block} bytes each)",
                cfg.block_size
            )));
        }
        let kv = PagedKv::new(model.device(), dims, num_blocks, cfg.block_size)?;
        Ok(Runner { model, kv, graphs: None, graph_replays: 0 })
    }

    /// Captures decode graphs for batches of up to `max_batch` sequences of
    /// up to `max_model_len` tokens (nothing on the CPU). Returns the sizes.
    pub fn capture_graphs(&mut self, max_batch: usize, max_model_len: usize) -> Result<Vec<usize>> {
        let width = blocks_for(max_model_len, self.kv.block_size);
        self.graphs = DecodeGraphs::capture(self.model.decoder(), self.model.device(), &mut self.kv, max_batch, width)?;
        Ok(self.graphs.as_ref().map(DecodeGraphs::sizes).unwrap_or_default())
    }

    /// Steps run by replaying a CUDA graph so far.
    pub fn graph_replays(&self) -> u64 {
        self.graph_replays
    }

    pub fn num_blocks(&self) -> usize {
        self.kv.num_blocks
    }

    pub fn block_size(&self) -> usize {
        self.kv.block_size
    }

    /// Bytes one KV block takes (all layers, keys and values).
    pub fn bytes_per_block(&self) -> usize {
        PagedKv::bytes_per_block(&self.model.decoder().dims, self.model.device().activation_dtype(), self.kv.block_size)
    }

    /// The media features of a prompt (vision tower, or given embeddings).
    pub fn encode(&self, input: &PreparedInput) -> Result<MediaFeatures> {
        self.model.encode_media(input, &mut |_, _| {})
    }

    /// One forward pass over `work`: logits of the sequences with `sample`
    /// and hidden rows of those with `pool`.
    pub fn forward(&mut self, work: &[SeqWork]) -> Result<StepOutput> {
        if let Some(g) = self.graphs.as_mut().filter(|g| g.fits(work)) {
            self.graph_replays += 1;
            return Ok(StepOutput { logits: Some(g.run(self.model.decoder(), work)?), pooled: Vec::new() });
        }
        let dev = self.model.device().clone();
        let decoder = self.model.decoder();
        let n: usize = work.iter().map(|w| w.new).sum();
        let mut ids = Vec::with_capacity(n);
        let mut pos = vec![0i32; 3 * n];
        let mut last_rows = Vec::new();
        let mut pool_rows: Vec<Vec<i32>> = Vec::new();
        let mut row = 0;
        for w in work {
            let first = row as i32;
            for t in w.past..w.past + w.new {
                ids.push(w.token(t) as i32);
                for axis in 0..3 {
                    pos[axis * n + row] = w.position(axis, t);
                }
                row += 1;
            }
            if w.sample {
                last_rows.push(row as i32 - 1);
            }
            match w.pool {
                Some(Pooling::Last) => pool_rows.push(vec![row as i32 - 1]),
                Some(Pooling::Cls) => pool_rows.push(vec![first]),
                Some(Pooling::Mean) => pool_rows.push((first..row as i32).collect()),
                None => {}
            }
        }
        let ids_t = Tensor::from_i32(&dev, &[n], &ids)?;
        let mut x = decoder.embed(&ids_t)?;
        let mut row0 = 0;
        for w in work {
            let prompt = w.input.input_ids.len();
            if let (Some(f), true) = (w.features, w.past < prompt) {
                self.model.place_features(&mut x, row0, &w.input.input_ids, (w.past, w.past + w.new), f)?;
            }
            row0 += w.new;
        }
        let pos_t = Tensor::from_i32(&dev, &[3, n], &pos)?;
        let chunks: Vec<SeqChunk> =
            work.iter().map(|w| SeqChunk { blocks: w.blocks, past: w.past, new: w.new }).collect();
        let batch = AttnBatch::new(&dev, &chunks, self.kv.block_size)?;
        let h = decoder.forward(x, &pos_t, &mut self.kv, &batch, &mut |_, _| {})?;
        let gather = |rows: &[i32]| -> Result<Tensor> {
            let rows_t = Tensor::from_i32(&dev, &[rows.len()], rows)?;
            let mut out = Tensor::empty(&dev, &[rows.len(), decoder.dims.hidden], h.dtype())?;
            embedding::embedding(&mut out, &rows_t, &h)?;
            Ok(out)
        };
        let pooled = pool_rows.iter().map(|r| gather(r)?.to_f32_vec()).collect::<Result<Vec<_>>>()?;
        let logits = if last_rows.is_empty() { None } else { Some(decoder.logits(&gather(&last_rows)?)?) };
        Ok(StepOutput { logits, pooled })
    }
}

/// The given rows of f32 `logits`, on the host (one download).
pub fn host_rows(logits: &Tensor, rows: &[usize]) -> Result<Vec<Vec<f32>>> {
    let vocab = logits.shape()[1];
    let all_rows = rows.len() == logits.shape()[0] && rows.iter().enumerate().all(|(i, &r)| i == r);
    let flat = if all_rows {
        logits.to_f32_vec()?
    } else {
        let mut sub = Tensor::empty(&logits.device(), &[rows.len(), vocab], DType::F32)?;
        for (i, &r) in rows.iter().enumerate() {
            sub.copy_rows_from(i, logits, r, 1)?;
        }
        sub.to_f32_vec()?
    };
    Ok(flat.chunks(vocab.max(1)).map(<[f32]>::to_vec).collect())
}

fn gib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// Activation bytes to keep free: the peak of a forward pass over the largest
/// step (one sequence of `max_num_batched_tokens` tokens, measured), or the
/// vision tower on the largest image the processor allows (the family's
/// estimate: its attention would make a measured pass take minutes).
fn profile(model: &dyn Model, cfg: &CacheConfig) -> Result<usize> {
    let Device::Cuda(gpu) = model.device() else { return Ok(0) };
    let (dev, decoder) = (model.device(), model.decoder());
    let dims = &decoder.dims;
    let n = cfg.max_num_batched_tokens.max(1);
    let blocks = blocks_for(n, cfg.block_size);
    let mut kv = PagedKv::new(dev, dims, blocks, cfg.block_size)?;
    gpu.synchronize()?;
    gpu.pool().reset_peak();
    let base = gpu.pool().bytes_in_use();
    let table: Vec<u32> = (0..blocks as u32).collect();
    let ids = Tensor::from_i32(dev, &[n], &vec![0; n])?;
    let x = decoder.embed(&ids)?;
    let pos: Vec<i32> = (0..3).flat_map(|_| 0..n as i32).collect();
    let pos = Tensor::from_i32(dev, &[3, n], &pos)?;
    let batch = AttnBatch::new(dev, &[SeqChunk { blocks: &table, past: 0, new: n }], cfg.block_size)?;
    let h = decoder.forward(x, &pos, &mut kv, &batch, &mut |_, _| {})?;
    if decoder.has_head() {
        let mut last = Tensor::empty(dev, &[1, dims.hidden], h.dtype())?;
        last.copy_rows_from(0, &h, n - 1, 1)?;
        let _logits = decoder.logits(&last)?;
    }
    gpu.synchronize()?;
    let text_peak = gpu.pool().peak_bytes().saturating_sub(base);
    drop(kv);
    Ok(text_peak.max(model.vision_peak_bytes(cfg.max_image_pixels)))
}
