//! Split-K paged attention for decode steps (flash-decoding, as vLLM's
//! `paged_attention_v2`): each sequence's keys are cut into partitions, one
//! block per (partition, kv head, sequence) writes an unnormalised partial
//! result (running max, sum and P·V) to f32 scratch, and a second kernel
//! combines the partitions of each row by log-sum-exp rescaling. Kernels:
//! `paged_attention_split_*` and `paged_attention_combine_*` in
//! csrc/attention.cu, whose header says how they split.
//!
//! Why: the unsplit kernel gives one block to each (sequence, kv head), so a
//! batch-1 decode of Qwen2-VL-2B (2 kv heads) runs 2 blocks on a 132-SM chip
//! and reads the cache at ~12.6 GB/s (H200, 4k context). Splitting gives each
//! SM work. The split count depends only on host shapes (batch, kv heads,
//! the block table's capacity, the SM count), never on device data, so a
//! captured CUDA graph stays valid; each sequence's partition length is
//! worked out on the device from its own key count.

use super::attention::PagedDims;
use super::launch_consts::{ATTN_WARPS, COMBINE_THREADS};
use super::{kernel, ptr};
use crate::cuda::{Arg, Gpu};
use crate::ensure_shape;
use crate::error::Result;
use crate::tensor::{DType, Device, Tensor};

/// Which kernels a GPU `paged_attention_with` call runs (the CPU ignores it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// Split decode calls that would not fill the chip ([`auto_splits`]).
    Auto,
    /// Never split: the simple and tensor-core kernels, as `attention` runs them.
    Never,
    /// The split kernel on every sequence with this many partitions (1 to
    /// [`MAX_SPLITS`]); with 1 the result is bit-identical to the simple kernel's.
    Parts(usize),
}

/// Calls with more queries per sequence than this are not split: each block
/// of the split kernel walks all of its sequence's (query, head) rows over its
/// partition, re-reading the partition for each tile of 8 rows.
pub const SPLIT_MAX_Q: usize = 4;

/// Fewest keys of a partition (csrc/attention.cu `SPLIT_MIN_KEYS`, read by
/// build.rs): below this, writing and combining the partials costs more than the keys.
pub const SPLIT_MIN_KEYS: usize = super::launch_consts::SPLIT_MIN_KEYS;

/// Most partitions of a sequence; bounds the scratch at
/// total_q · n_heads · MAX_SPLITS · (head_dim + 2) floats.
pub const MAX_SPLITS: usize = 128;

/// Blocks of the split kernel per SM to aim for: at 75 registers a thread an
/// SM holds three of them, and two in flight hide most of the load latency.
const BLOCKS_PER_SM: usize = 2;

/// Partitions per sequence for a call, from host shapes only: 1 (do not
/// split) unless every sequence has at most [`SPLIT_MAX_Q`] queries, else
/// enough for `BLOCKS_PER_SM` blocks on each SM, but no more than the block
/// table can fill with [`SPLIT_MIN_KEYS`] keys each (`context_bound` =
/// max_blocks_per_seq · block_size) or [`MAX_SPLITS`].
pub fn auto_splits(batch: usize, n_kv_heads: usize, max_seqlen_q: usize, context_bound: usize, sms: usize) -> usize {
    if max_seqlen_q == 0 || max_seqlen_q > SPLIT_MAX_Q || batch == 0 || n_kv_heads == 0 {
        return 1;
    }
    let want = (BLOCKS_PER_SM * sms).div_ceil(batch * n_kv_heads);
    want.min(context_bound.div_ceil(SPLIT_MIN_KEYS)).clamp(1, MAX_SPLITS)
}

/// The split kernel then the combine, over a paged call already checked and
/// planned by `attention::paged_attention_with` (`args` are its tensors).
/// The scratch comes from the tensor pool and is released after the launches
/// are queued (stream order keeps it alive for them).
pub(super) fn launch(
    op: &'static str,
    gpu: &std::sync::Arc<Gpu>,
    dims: &PagedDims,
    [out, q, k_cache, v_cache, cu_q, seq_lens_k, block_tables]: [&Tensor; 7],
    max_seqlen_q: usize,
    scale: f32,
    splits: usize,
) -> Result<()> {
    let &PagedDims { total_q, n_heads, n_kv_heads, head_dim: d, num_blocks, block_size, batch, max_blocks } = dims;
    ensure_shape!((1..=MAX_SPLITS).contains(&splits), op, "{splits} partitions, expected 1 to {MAX_SPLITS}");
    let dt = out.dtype();
    // (total_q, n_heads, splits, d + 2): per (row, head, partition) o[d], m, l.
    let part = Tensor::empty(&Device::Cuda(gpu.clone()), &[total_q, n_heads, splits, d + 2], DType::F32)?;
    let paged = [
        Arg::Ptr(ptr(cu_q)),
        Arg::Ptr(ptr(seq_lens_k)),
        Arg::Ptr(ptr(block_tables)),
        Arg::I32(total_q as i32),
        Arg::I32(num_blocks as i32),
        Arg::I32(block_size as i32),
        Arg::I32(max_blocks as i32),
        Arg::I32(n_heads as i32),
    ];
    let mut args = vec![Arg::Ptr(ptr(&part)), Arg::Ptr(ptr(q)), Arg::Ptr(ptr(k_cache)), Arg::Ptr(ptr(v_cache))];
    args.extend(paged);
    args.extend([Arg::I32(n_kv_heads as i32), Arg::F32(scale), Arg::I32(splits as i32)]);
    let grid = (splits as u32, n_kv_heads as u32, batch as u32);
    let block = ((32 * ATTN_WARPS) as u32, 1, 1);
    gpu.launch(&kernel(&format!("paged_attention_split_d{d}"), dt), grid, block, 0, &args)?;

    let mut args = vec![Arg::Ptr(ptr(out)), Arg::Ptr(ptr(&part))];
    args.extend(paged);
    args.push(Arg::I32(splits as i32));
    // One block per (head, query, sequence); it grid-strides over the queries,
    // so a too-small max_seqlen_q costs speed, not rows.
    let grid = (n_heads as u32, max_seqlen_q.clamp(1, 65535) as u32, batch as u32);
    let block = (COMBINE_THREADS as u32, 1, 1);
    gpu.launch(&kernel(&format!("paged_attention_combine_d{d}"), dt), grid, block, 0, &args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_splits_fill_the_chip_within_the_context() {
        let sms = 132;
        for (batch, kv) in [(1, 2), (1, 4), (8, 2), (64, 2), (64, 4), (130, 1)] {
            let s = auto_splits(batch, kv, 1, 1 << 20, sms);
            // Enough blocks for two per SM, and one partition fewer would not be.
            assert!(s * batch * kv >= 2 * sms || s == MAX_SPLITS, "{batch}x{kv}: {s}");
            assert!((s - 1) * batch * kv < 2 * sms, "{batch}x{kv}: {s} is more than needed");
        }
        // Batch 1 of Qwen2-VL-2B over a 4k table: as many partitions of 64 keys as fit.
        assert_eq!(auto_splits(1, 2, 1, 4096, sms), 4096 / SPLIT_MIN_KEYS);
        // A table of 100 keys holds two partitions; one of 17 keys, one.
        assert_eq!(auto_splits(1, 2, 1, 100, sms), 2);
        assert_eq!(auto_splits(1, 2, 1, 17, sms), 1);
    }

    #[test]
    fn prefill_and_full_batches_are_not_split() {
        assert_eq!(auto_splits(1, 2, SPLIT_MAX_Q + 1, 4096, 132), 1);
        assert_eq!(auto_splits(1, 2, 0, 4096, 132), 1);
        assert_eq!(auto_splits(132, 2, 1, 4096, 132), 1);
        assert_eq!(auto_splits(2, 2, SPLIT_MAX_Q, 1 << 20, 132), 66);
    }
}
