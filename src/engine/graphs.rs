//! Decode steps replayed from CUDA graphs, as vLLM's CUDA graph runner does:
//! at start the decoder is captured once per batch-size bucket over inputs
//! that live at fixed addresses; a step whose sequences all add one token
//! writes its token ids, positions, cache slots and block tables into
//! the smallest bucket that holds it, pads the rest, replays, and runs the
//! LM head on the graph's output. What was ~450 launches from the host
//! becomes one, so a small batch is bound by the GPU, not by the CPU.
//!
//! Padding rows write no key (slot -1), attend to one key, and their logits
//! are never read. Block tables have a fixed width (the blocks of
//! max_model_len), which is what bounds the attention kernels' context.

use super::runner::SeqWork;
use crate::cuda::graph::Graph;
use crate::error::Result;
use crate::model::decoder::{AttnBatch, Decoder, PagedKv, SeqChunk};
use crate::tensor::{Device, Tensor};

/// Batch sizes captured, up to `max` (which is always one of them).
pub fn bucket_sizes(max: usize) -> Vec<usize> {
    const SIZES: [usize; 20] = [1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256];
    let mut v: Vec<usize> = SIZES.iter().copied().filter(|&s| s < max).collect();
    if max > 0 {
        v.push(max);
    }
    v
}

struct Bucket {
    size: usize,
    graph: Graph,
    ids: Tensor,       // i32 (size,)
    positions: Tensor, // i32 (3, size)
    batch: AttnBatch,
    hidden: Tensor, // (size, hidden): the decoder's output, valid after a replay
}

pub struct DecodeGraphs {
    buckets: Vec<Bucket>, // ascending size
    width: usize,
    block_size: usize,
}

impl DecodeGraphs {
    /// Captures the decoder for every bucket up to `max_batch` sequences of
    /// at most `width` blocks. None on the CPU.
    pub fn capture(
        decoder: &Decoder,
        dev: &Device,
        kv: &mut PagedKv,
        max_batch: usize,
        width: usize,
    ) -> Result<Option<Self>> {
        let Device::Cuda(gpu) = dev else { return Ok(None) };
        let mut buckets = Vec::new();
        // Largest first, so smaller buckets reuse its temporaries' blocks.
        for &size in bucket_sizes(max_batch).iter().rev() {
            let ids = Tensor::from_i32(dev, &[size], &vec![0; size])?;
            let positions = Tensor::from_i32(dev, &[3, size], &vec![0; 3 * size])?;
            let batch = AttnBatch::decode_static(dev, size, width)?;
            let run = |kv: &mut PagedKv| -> Result<Tensor> {
                let x = decoder.embed(&ids)?;
                decoder.forward(x, &positions, kv, &batch, &mut |_, _| {})
            };
            let (graph, hidden) = gpu.with_graph_allocs(|| {
                // An uncaptured run first: the graph pool gets its blocks and
                // cuBLAS picks its kernels outside the capture.
                drop(run(kv)?);
                let mut out = None;
                let graph = gpu.capture(|| {
                    out = Some(run(kv)?);
                    Ok(())
                })?;
                Ok((graph, out.expect("a successful capture ran the decoder")))
            })?;
            buckets.push(Bucket { size, graph, ids, positions, batch, hidden });
        }
        buckets.reverse();
        gpu.synchronize()?;
        Ok(Some(Self { buckets, width, block_size: kv.block_size }))
    }

    pub fn max_batch(&self) -> usize {
        self.buckets.last().map_or(0, |b| b.size)
    }

    pub fn sizes(&self) -> Vec<usize> {
        self.buckets.iter().map(|b| b.size).collect()
    }

    /// Whether `work` is a step a graph can run: every sequence adds one
    /// token that samples, needs no media features, and fits the tables.
    pub fn fits(&self, work: &[SeqWork]) -> bool {
        !work.is_empty()
            && work.len() <= self.max_batch()
            && work.iter().all(|w| {
                w.new == 1
                    && w.sample
                    && w.pool.is_none()
                    && (w.features.is_none() || w.past >= w.input.input_ids.len())
                    && w.blocks.len() <= self.width
            })
    }

    /// Replays the smallest bucket that holds `work` (which `fits`) and
    /// returns f32 logits with one row per bucket row: row i is work[i].
    pub fn run(&mut self, decoder: &Decoder, work: &[SeqWork]) -> Result<Tensor> {
        let b = self.buckets.iter_mut().find(|b| b.size >= work.len()).expect("fits() was checked");
        let mut ids = vec![0i32; b.size];
        let mut pos = vec![0i32; 3 * b.size];
        for (i, w) in work.iter().enumerate() {
            ids[i] = w.token(w.past) as i32;
            for axis in 0..3 {
                pos[axis * b.size + i] = w.position(axis, w.past);
            }
        }
        b.ids.write_i32(&ids)?;
        b.positions.write_i32(&pos)?;
        let chunks: Vec<SeqChunk> = work.iter().map(|w| SeqChunk { blocks: w.blocks, past: w.past, new: 1 }).collect();
        b.batch.write_decode(&chunks, self.block_size)?;
        b.graph.launch()?;
        decoder.logits(&b.hidden)
    }
}

#[cfg(test)]
mod tests {
    use super::bucket_sizes;

    #[test]
    fn buckets_ascend_and_end_at_the_maximum() {
        assert_eq!(bucket_sizes(1), vec![1]);
        assert_eq!(bucket_sizes(10), vec![1, 2, 4, 8, 10]);
        assert_eq!(bucket_sizes(256).last(), Some(&256));
        assert_eq!(bucket_sizes(0), Vec::<usize>::new());
        for m in 1..300 {
            let v = bucket_sizes(m);
            assert!(v.windows(2).all(|w| w[0] < w[1]), "{m}: {v:?}");
            assert_eq!(*v.last().unwrap(), m);
        }
    }
}
