//! Attention over variable-length packed sequences, in flash-attn's varlen
//! layout (`flash_attn_varlen_func`): the sequences of a batch are packed
//! along the token axis and `cu_seqlens` holds their prefix sums. Serves the
//! Qwen2-VL vision blocks (`VisionAttention` over `cu_seqlens`, non-causal,
//! modeling_qwen2_vl.py) and the language model (`Qwen2VLAttention`, causal,
//! grouped-query) for prefill, chunked prefill and decode alike.
//!
//! `paged_attention` is the same op over a paged KV cache (vLLM's
//! `FlashAttentionImpl` calling `flash_attn_varlen_func` with a
//! `block_table`): keys and values come from the cache that
//! `kv_cache::kv_cache_write` fills, through each sequence's block table.
//! Its CPU reference and unit tests live in `paged_attention.rs`.
//! Kernels: csrc/attention.cu, the simple CUDA-core kernel, and
//! csrc/flash_attention.cu, the tensor-core (mma.sync) one; their headers say
//! how they work. Both ops run the same device functions, so they give
//! bit-identical results on the same keys.
//!
//! Which kernel runs a sequence: on the GPU in bf16, a sequence of at least
//! [`FLASH_MIN_SEQLEN_Q`] queries runs on the tensor-core kernel, any other on
//! the simple one (decode steps, short chunks; f32 always). A call with
//! `max_seqlen_q >= FLASH_MIN_SEQLEN_Q` launches both, and each kernel skips
//! the other's sequences by their length, read on the device; a call below it
//! launches only the simple kernel, which then takes every sequence. So the
//! kernels a call launches depend only on its shapes, and the kernel that
//! computes a sequence only on that sequence's own length (given an honest
//! `max_seqlen_q`), never on the rest of the batch.
//!
//! Except for decode: a paged call of at most [`SPLIT_MAX_Q`] queries per
//! sequence that would not fill the chip runs split-K (flash_decoding.rs),
//! its partition count chosen from the batch shape. Its results match the
//! unsplit kernels to rounding, not bit for bit, and depend (to rounding) on
//! the batch size.

use rayon::prelude::*;

pub use super::flash_decoding::{auto_splits, Split, SPLIT_MAX_Q};
use super::launch_consts::{ATTN_HEAD_DIMS, ATTN_WARPS, FA_BN, FA_DIM_ALIGN, FA_ROW_PAD, FA_WARPS};
use super::{expect_dtype, f32s, f32s_mut, flash_decoding, float_dtype, i32s, kernel, placement, ptr, On};
use crate::cuda::{Arg, Gpu};
use crate::ensure_shape;
use crate::error::{Error, Result};
use crate::tensor::{DType, Device, Tensor};

/// Head dims with compiled GPU kernels (the served families': 64 CLIP
/// ViT-L/14, 72 SigLIP-so400m, 80 the Qwen2-VL ViT, 96 Phi-3, 128 the
/// Qwen2/Llama LMs), generated from `ATTN_HEAD_DIMS` in csrc/attention.cuh,
/// the list the kernels are instantiated from. The CPU takes any head dim.
pub const HEAD_DIMS: &[usize] = &ATTN_HEAD_DIMS;

/// Warps per block in csrc/attention.cu (`ATTN_WARPS`): rows per block.
const WARPS: usize = ATTN_WARPS;

/// bf16 sequences with at least this many queries run on the tensor-core
/// kernel (see the module doc): a 64-query tile is then at least a quarter full.
pub const FLASH_MIN_SEQLEN_Q: usize = 16;

/// The tensor-core kernel's tile (csrc/flash_attention.cu `FA_WARPS`, `FA_BN`):
/// 16 query rows per warp, keys per K/V tile.
const FLASH_WARPS: usize = FA_WARPS;
const FLASH_BN: usize = FA_BN;

/// Its dynamic shared memory (`FlashTile::BYTES`): the Q tile and two stages
/// of K and V, rows of DP + `FA_ROW_PAD` bf16, where DP is the head dim
/// rounded up to `FA_DIM_ALIGN` (72 is padded to 80 with zero columns).
fn flash_smem(head_dim: usize) -> u32 {
    let tile_dim = head_dim.next_multiple_of(FA_DIM_ALIGN);
    ((16 * FLASH_WARPS + 4 * FLASH_BN) * (tile_dim + FA_ROW_PAD) * 2) as u32
}

/// Whether attention can run at `head_dim` on `dev`, for model loading to
/// call before it allocates anything: any positive head dim on the CPU (the
/// f32 reference), one of [`HEAD_DIMS`] on CUDA. `what` says where the head
/// dim comes from and leads the error, e.g. "tensor
/// `model.language_model.layers.0.self_attn.q_proj.weight` (head dim 24)".
pub fn check_head_dim(dev: &Device, head_dim: usize, what: &str) -> Result<()> {
    if head_dim == 0 {
        return Err(Error::Config(format!("{what}: attention needs a head dim of at least 1")));
    }
    match dev {
        Device::Cuda(_) if !HEAD_DIMS.contains(&head_dim) => {
            let fix = if head_dim.is_multiple_of(8) {
                format!("add {head_dim} to `ATTN_HEAD_DIMS` in csrc/attention.cuh and rebuild")
            } else {
                "the kernels need a multiple of 8".to_string()
            };
            Err(Error::Config(format!(
                "{what}: the GPU attention kernels are built for head dims {HEAD_DIMS:?}, not {head_dim}; \
                 run this model on the CPU (--device cpu), or {fix}"
            )))
        }
        _ => Ok(()),
    }
}

/// On the GPU: a head dim with compiled kernels (the CPU takes any).
fn check_gpu_head_dim(op: &'static str, head_dim: usize) -> Result<()> {
    ensure_shape!(
        HEAD_DIMS.contains(&head_dim),
        op,
        "head dim {head_dim} not supported on the GPU (kernels for {HEAD_DIMS:?}; the CPU takes any)"
    );
    Ok(())
}

/// Shapes checked on every device: (total_q, n_heads, total_k, n_kv_heads, head_dim, batch).
struct Dims {
    total_q: usize,
    n_heads: usize,
    total_k: usize,
    n_kv_heads: usize,
    head_dim: usize,
    batch: usize,
}

fn check(
    op: &'static str,
    out: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu_q: &Tensor,
    cu_k: &Tensor,
) -> Result<Dims> {
    ensure_shape!(q.shape().len() == 3, op, "q {:?}, expected (total_q, n_heads, head_dim)", q.shape());
    ensure_shape!(k.shape().len() == 3, op, "k {:?}, expected (total_k, n_kv_heads, head_dim)", k.shape());
    ensure_shape!(out.shape() == q.shape(), op, "out {:?} != q {:?}", out.shape(), q.shape());
    ensure_shape!(v.shape() == k.shape(), op, "v {:?} != k {:?}", v.shape(), k.shape());
    let (total_q, n_heads, head_dim) = (q.shape()[0], q.shape()[1], q.shape()[2]);
    let (total_k, n_kv_heads) = (k.shape()[0], k.shape()[1]);
    ensure_shape!(k.shape()[2] == head_dim, op, "head dim of k {:?} != q {:?}", k.shape(), q.shape());
    ensure_shape!(head_dim > 0 && n_heads > 0, op, "q {:?}: no heads, or heads of no values", q.shape());
    ensure_shape!(
        n_kv_heads > 0 && n_heads % n_kv_heads == 0,
        op,
        "{n_heads} query heads are not a multiple of {n_kv_heads} kv heads"
    );
    expect_dtype(op, cu_q, DType::I32)?;
    expect_dtype(op, cu_k, DType::I32)?;
    ensure_shape!(
        cu_q.shape().len() == 1 && cu_q.shape()[0] >= 1,
        op,
        "cu_seqlens_q {:?}, expected (batch + 1,)",
        cu_q.shape()
    );
    ensure_shape!(
        cu_k.shape() == cu_q.shape(),
        op,
        "cu_seqlens_k {:?} != cu_seqlens_q {:?}",
        cu_k.shape(),
        cu_q.shape()
    );
    ensure_shape!(
        total_q <= i32::MAX as usize && total_k <= i32::MAX as usize && n_heads <= i32::MAX as usize,
        op,
        "too large: {total_q} queries, {total_k} keys, {n_heads} heads"
    );
    Ok(Dims { total_q, n_heads, total_k, n_kv_heads, head_dim, batch: cu_q.shape()[0] - 1 })
}

/// Host offsets must be non-decreasing and within [0, total].
fn check_offsets(op: &'static str, name: &str, cu: &[i32], total: usize) -> Result<()> {
    ensure_shape!(cu[0] >= 0, op, "{name}[0] = {} is negative", cu[0]);
    for (b, w) in cu.windows(2).enumerate() {
        ensure_shape!(w[0] <= w[1], op, "{name} decreases at sequence {b}: {} > {}", w[0], w[1]);
    }
    let last = cu[cu.len() - 1];
    ensure_shape!(last as usize <= total, op, "{name} ends at {last}, past the {total} packed tokens");
    Ok(())
}

/// Host query offsets: valid prefix sums over `total_q` rows, no sequence longer than `max_seqlen_q`.
pub(super) fn check_queries(op: &'static str, cq: &[i32], total_q: usize, max_seqlen_q: usize) -> Result<()> {
    check_offsets(op, "cu_seqlens_q", cq, total_q)?;
    for (b, w) in cq.windows(2).enumerate() {
        let lq = (w[1] - w[0]) as usize;
        ensure_shape!(lq <= max_seqlen_q, op, "sequence {b} has {lq} queries > max_seqlen_q {max_seqlen_q}");
    }
    Ok(())
}

/// The CPU reference for one query token: o (n_heads · d) = softmax over keys
/// j < n of scale · q · k_j, times v_j, for every head, where key j is row
/// `key_row(j)` of k and v (rows of n_kv_heads · d). Both ops call it, so the
/// paged and the packed layout give bit-identical results on the same keys.
#[allow(clippy::too_many_arguments)] // the head layout and the key rows, kept apart for the two callers
pub(super) fn attend_token(
    o: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n: usize,
    key_row: impl Fn(usize) -> usize,
    (n_heads, n_kv_heads, d): (usize, usize, usize),
    scale: f32,
) {
    let (kv_row, group) = (n_kv_heads * d, n_heads / n_kv_heads);
    let mut s = vec![0f32; n];
    for h in 0..n_heads {
        let kvh = h / group;
        let qh = &q[h * d..][..d];
        for (j, s) in s.iter_mut().enumerate() {
            let kj = &k[key_row(j) * kv_row + kvh * d..][..d];
            *s = scale * qh.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>();
        }
        let max = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let mut sum = 0f32;
        for s in s.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let oh = &mut o[h * d..][..d];
        oh.fill(0.0);
        for (j, &p) in s.iter().enumerate() {
            let vj = &v[key_row(j) * kv_row + kvh * d..][..d];
            for (o, &x) in oh.iter_mut().zip(vj) {
                *o += p * x;
            }
        }
        if n > 0 {
            oh.iter_mut().for_each(|o| *o /= sum);
        }
    }
}

/// The launches of one GPU call (see the module doc): the simple kernel's
/// grid, `long_from` for both kernels (sequences with at least that many
/// queries are the tensor-core kernel's), and the tensor-core kernel's grid
/// when it runs.
struct Launches {
    simple: (u32, u32, u32),
    long_from: i32,
    flash: Option<(u32, u32, u32)>,
}

/// Plans a GPU call after the checks only the GPU needs: grid limits and
/// 16-byte aligned K/V (both kernels copy them in 16-byte words; every pool
/// allocation is aligned), and q and out too for the tensor-core kernel.
fn plan(
    op: &'static str,
    dims: (usize, usize, usize, usize),
    max_seqlen_q: usize,
    dt: DType,
    [out, q, k, v]: [&Tensor; 4],
) -> Result<Launches> {
    let (total_q, n_heads, n_kv_heads, batch) = dims;
    ensure_shape!(
        batch <= 65535 && n_heads <= 65535,
        op,
        "{batch} sequences or {n_heads} heads exceed the launch grid (65535)"
    );
    ensure_shape!([k, v].iter().all(|t| ptr(t).is_multiple_of(16)), op, "k and v must be 16-byte aligned on the GPU");
    let max_q = max_seqlen_q.min(total_q);
    let flash = dt == DType::BF16 && max_q >= FLASH_MIN_SEQLEN_Q;
    // The simple kernel: rows are (query, head of the group) pairs, WARPS per
    // block; it grid-strides over them, so clamping the grid loses nothing.
    // With the tensor-core kernel beside it, its sequences are shorter than FLASH_MIN_SEQLEN_Q.
    let simple_q = if flash { max_q.min(FLASH_MIN_SEQLEN_Q - 1) } else { max_q };
    let rows = simple_q * (n_heads / n_kv_heads);
    let simple = (rows.div_ceil(WARPS).clamp(1, i32::MAX as usize) as u32, n_kv_heads as u32, batch as u32);
    if !flash {
        return Ok(Launches { simple, long_from: i32::MAX, flash: None });
    }
    ensure_shape!(
        [out, q].iter().all(|t| ptr(t).is_multiple_of(16)),
        op,
        "q and out must be 16-byte aligned on the GPU"
    );
    // One block per (head, 64-query tile, sequence), heads varying fastest
    // (longest causal tiles first); it grid-strides over the tiles too.
    let tiles = max_q.div_ceil(16 * FLASH_WARPS).clamp(1, 65535) as u32;
    Ok(Launches { simple, long_from: FLASH_MIN_SEQLEN_Q as i32, flash: Some((n_heads as u32, tiles, batch as u32)) })
}

/// Runs a call's launches: `args` without `long_from`, which is added here;
/// `name` is the kernel's name without its variant and dtype (`attention_varlen`).
fn launch(gpu: &Gpu, name: &str, d: usize, dt: DType, plan: &Launches, mut args: Vec<Arg>) -> Result<()> {
    args.push(Arg::I32(plan.long_from));
    gpu.launch(&kernel(&format!("{name}_d{d}"), dt), plan.simple, ((WARPS * 32) as u32, 1, 1), 0, &args)?;
    if let Some(grid) = plan.flash {
        let block = ((FLASH_WARPS * 32) as u32, 1, 1);
        gpu.launch(&kernel(&format!("{name}_flash_d{d}"), dt), grid, block, flash_smem(d), &args)?;
    }
    Ok(())
}

/// Packed varlen attention. q, out: (total_q, n_heads, head_dim); k, v:
/// (total_k, n_kv_heads, head_dim); cu_seqlens_q, cu_seqlens_k: i32 (batch + 1,)
/// prefix sums, sequence b owning query rows cu_seqlens_q[b]..cu_seqlens_q[b+1]
/// and key rows cu_seqlens_k[b]..cu_seqlens_k[b+1]. Query head h reads kv head
/// h / (n_heads / n_kv_heads).
///
/// out[t, h, :] = Σ_j softmax_j(scale · q[t, h, :] · k[j, h_kv, :]) · v[j, h_kv, :]
/// over the keys j of t's sequence; with `causal`, query i of a sequence with
/// Lq queries and Lk keys sees key j iff j ≤ i + Lk − Lq (flash-attn's
/// bottom-right alignment: Lq = Lk is prefill, Lq = 1 a decode step over a
/// cache, 1 < Lq < Lk chunked prefill). A query that sees no key gets zeros.
/// Rows outside every sequence are not written.
///
/// `max_seqlen_q` is the longest query length, known on the host, which sizes
/// the launch grid. The CPU path checks it and the offsets; on the GPU the
/// offsets are device data the launcher cannot read, so the kernel clamps them
/// to the tensors and a too-small `max_seqlen_q` costs speed, not results.
/// Head dims of [`HEAD_DIMS`] on the GPU, any on the CPU; bf16 or f32 on
/// the GPU, f32 on the CPU. In
/// bf16, sequences of at least [`FLASH_MIN_SEQLEN_Q`] queries run on the
/// tensor-core kernel when `max_seqlen_q` says there may be one (module doc).
#[allow(clippy::too_many_arguments)] // flash-attn's varlen argument list, kept whole
pub fn attention(
    out: &mut Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu_seqlens_q: &Tensor,
    cu_seqlens_k: &Tensor,
    max_seqlen_q: usize,
    causal: bool,
    scale: f32,
) -> Result<()> {
    const OP: &str = "attention";
    let dims = check(OP, out, q, k, v, cu_seqlens_q, cu_seqlens_k)?;
    let Dims { total_q, n_heads, total_k, n_kv_heads, head_dim: d, batch } = dims;
    match placement(OP, &[out, q, k, v, cu_seqlens_q, cu_seqlens_k])? {
        On::Cpu => {
            let (cq, ck) = (i32s(OP, cu_seqlens_q)?, i32s(OP, cu_seqlens_k)?);
            check_queries(OP, cq, total_q, max_seqlen_q)?;
            check_offsets(OP, "cu_seqlens_k", ck, total_k)?;
            let (q, k, v) = (f32s(OP, q)?, f32s(OP, k)?, f32s(OP, v)?);
            let out = f32s_mut(OP, out)?;
            let q_row = n_heads * d;
            for b in 0..batch {
                let (q0, q1) = (cq[b] as usize, cq[b + 1] as usize);
                let (k0, k1) = (ck[b] as usize, ck[b + 1] as usize);
                let (lq, lk) = (q1 - q0, k1 - k0);
                // One query token (all its heads) per task.
                out[q0 * q_row..q1 * q_row].par_chunks_mut(q_row).enumerate().for_each(|(i, o)| {
                    // Keys 0..n of the sequence are visible: j ≤ i + lk − lq.
                    let n = if causal { (i + lk + 1).saturating_sub(lq).min(lk) } else { lk };
                    let qi = &q[(q0 + i) * q_row..][..q_row];
                    attend_token(o, qi, k, v, n, |j| k0 + j, (n_heads, n_kv_heads, d), scale);
                });
            }
            Ok(())
        }
        On::Cuda(gpu) => {
            check_gpu_head_dim(OP, d)?;
            let dt = float_dtype(OP, &[out, q, k, v])?;
            if batch == 0 || total_q == 0 {
                return Ok(());
            }
            let plan = plan(OP, (total_q, n_heads, n_kv_heads, batch), max_seqlen_q, dt, [&*out, q, k, v])?;
            let args = vec![
                Arg::Ptr(ptr(out)),
                Arg::Ptr(ptr(q)),
                Arg::Ptr(ptr(k)),
                Arg::Ptr(ptr(v)),
                Arg::Ptr(ptr(cu_seqlens_q)),
                Arg::Ptr(ptr(cu_seqlens_k)),
                Arg::I32(total_q as i32),
                Arg::I32(total_k as i32),
                Arg::I32(n_heads as i32),
                Arg::I32(n_kv_heads as i32),
                Arg::I32(causal as i32),
                Arg::F32(scale),
            ];
            launch(&gpu, "attention_varlen", d, dt, &plan, args)
        }
    }
}

/// Shapes of a paged call, checked on every device.
#[derive(Clone, Copy)]
pub(super) struct PagedDims {
    pub total_q: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    pub batch: usize,
    pub max_blocks: usize,
}

#[allow(clippy::too_many_arguments)] // paged_attention's arguments, checked together
fn check_paged(
    op: &'static str,
    out: &Tensor,
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    cu_q: &Tensor,
    seq_lens_k: &Tensor,
    block_tables: &Tensor,
) -> Result<PagedDims> {
    let cs = k_cache.shape();
    ensure_shape!(q.shape().len() == 3, op, "q {:?}, expected (total_q, n_heads, head_dim)", q.shape());
    ensure_shape!(out.shape() == q.shape(), op, "out {:?} != q {:?}", out.shape(), q.shape());
    ensure_shape!(cs.len() == 4, op, "k_cache {cs:?}, expected (num_blocks, block_size, n_kv_heads, head_dim)");
    ensure_shape!(v_cache.shape() == cs, op, "v_cache {:?} != k_cache {cs:?}", v_cache.shape());
    let (total_q, n_heads, head_dim) = (q.shape()[0], q.shape()[1], q.shape()[2]);
    let (num_blocks, block_size, n_kv_heads) = (cs[0], cs[1], cs[2]);
    ensure_shape!(cs[3] == head_dim, op, "head dim of k_cache {cs:?} != q {:?}", q.shape());
    ensure_shape!(head_dim > 0 && n_heads > 0, op, "q {:?}: no heads, or heads of no values", q.shape());
    ensure_shape!(
        n_kv_heads > 0 && n_heads % n_kv_heads == 0,
        op,
        "{n_heads} query heads are not a multiple of {n_kv_heads} kv heads"
    );
    ensure_shape!(num_blocks > 0 && block_size > 0, op, "k_cache {cs:?} has no slots");
    for t in [cu_q, seq_lens_k, block_tables] {
        expect_dtype(op, t, DType::I32)?;
    }
    ensure_shape!(
        cu_q.shape().len() == 1 && cu_q.shape()[0] >= 1,
        op,
        "cu_seqlens_q {:?}, expected (batch + 1,)",
        cu_q.shape()
    );
    let batch = cu_q.shape()[0] - 1;
    ensure_shape!(seq_lens_k.shape() == [batch], op, "seq_lens_k {:?}, expected [{batch}]", seq_lens_k.shape());
    let bt = block_tables.shape();
    ensure_shape!(bt.len() == 2 && bt[0] == batch, op, "block_tables {bt:?}, expected ({batch}, max_blocks_per_seq)");
    let max_blocks = bt[1];
    ensure_shape!(
        [total_q, n_heads, num_blocks, block_size, max_blocks].iter().all(|&x| x <= i32::MAX as usize),
        op,
        "too large: {total_q} queries, {n_heads} heads, k_cache {cs:?}, block_tables {bt:?}"
    );
    Ok(PagedDims { total_q, n_heads, n_kv_heads, head_dim, num_blocks, block_size, batch, max_blocks })
}

/// Causal (bottom-right) attention of packed queries over a paged KV cache.
///
/// q, out: (total_q, n_heads, head_dim), packed as in [`attention`];
/// k_cache, v_cache: (num_blocks, block_size, n_kv_heads, head_dim), as
/// `kv_cache::kv_cache_write` fills them; cu_seqlens_q: i32 (batch + 1,);
/// seq_lens_k: i32 (batch,), the keys of sequence b already in the cache,
/// its new tokens' included; block_tables: i32 (batch, max_blocks_per_seq):
/// key j of sequence b is cache row block_tables[b, j / block_size] ·
/// block_size + j % block_size. Entries past a sequence's last block are not read.
///
/// Query i of a sequence with Lq queries and Lk keys sees key j iff
/// j ≤ i + Lk − Lq (flash-attn's bottom-right alignment), so one call serves
/// full prefills (Lq = Lk), prefills after cached tokens (Lq < Lk) and decode
/// steps (Lq = 1) in one batch. Grouped-query heads and the result otherwise
/// as [`attention`]: a query that sees no key gets zeros; rows outside every
/// sequence are not written. Each row is computed the same way whatever else
/// is in the batch, so a sequence's output does not depend on the batch (bit
/// for bit, on both devices), and it equals [`attention`]'s on the same keys.
///
/// The CPU path checks the offsets, `max_seqlen_q`, seq_lens_k[b] ≤
/// max_blocks_per_seq · block_size and the block ids a sequence uses. On the
/// GPU these are device data the launcher cannot read: the kernel clamps
/// offsets, lengths and block ids to the tensors, so bad ones give wrong keys,
/// never an access outside them. Any block size; head dims of [`HEAD_DIMS`]
/// on the GPU, any on the CPU; bf16 or f32 on the GPU, f32 on the CPU.
///
/// Decode calls split each sequence's keys over several blocks on the GPU
/// when the batch would not fill the chip ([`Split::Auto`], module doc).
#[allow(clippy::too_many_arguments)] // flash-attn's varlen argument list with a block table, kept whole
pub fn paged_attention(
    out: &mut Tensor,
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    cu_seqlens_q: &Tensor,
    seq_lens_k: &Tensor,
    block_tables: &Tensor,
    max_seqlen_q: usize,
    scale: f32,
) -> Result<()> {
    let (kc, vc, cu, lens, bt) = (k_cache, v_cache, cu_seqlens_q, seq_lens_k, block_tables);
    paged_attention_with(out, q, kc, vc, cu, lens, bt, max_seqlen_q, scale, Split::Auto)
}

/// [`paged_attention`] with the GPU's choice of kernels made by the caller
/// (the kernel tests and benchmarks pin it); the CPU computes the same
/// function whatever `split` says.
#[allow(clippy::too_many_arguments)] // paged_attention's arguments and the split choice
pub fn paged_attention_with(
    out: &mut Tensor,
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    cu_seqlens_q: &Tensor,
    seq_lens_k: &Tensor,
    block_tables: &Tensor,
    max_seqlen_q: usize,
    scale: f32,
    split: Split,
) -> Result<()> {
    const OP: &str = "paged_attention";
    let dims = check_paged(OP, out, q, k_cache, v_cache, cu_seqlens_q, seq_lens_k, block_tables)?;
    match placement(OP, &[out, q, k_cache, v_cache, cu_seqlens_q, seq_lens_k, block_tables])? {
        On::Cpu => {
            let (cq, lens, tables) = (i32s(OP, cu_seqlens_q)?, i32s(OP, seq_lens_k)?, i32s(OP, block_tables)?);
            let (q, kc, vc) = (f32s(OP, q)?, f32s(OP, k_cache)?, f32s(OP, v_cache)?);
            let out = f32s_mut(OP, out)?;
            super::paged_attention::cpu(OP, &dims, out, q, kc, vc, cq, lens, tables, max_seqlen_q, scale)
        }
        On::Cuda(gpu) => {
            check_gpu_head_dim(OP, dims.head_dim)?;
            let dt = float_dtype(OP, &[out, q, k_cache, v_cache])?;
            let PagedDims { total_q, n_heads, n_kv_heads, head_dim: d, num_blocks, block_size, batch, max_blocks } =
                dims;
            if batch == 0 || total_q == 0 {
                return Ok(());
            }
            let tensors = [&*out, q, k_cache, v_cache];
            let plan = plan(OP, (total_q, n_heads, n_kv_heads, batch), max_seqlen_q, dt, tensors)?;
            let max_q = max_seqlen_q.min(total_q);
            let splits = match split {
                Split::Auto => {
                    let sms = gpu.sm_count().max(1) as usize;
                    flash_decoding::auto_splits(batch, n_kv_heads, max_q, max_blocks * block_size, sms)
                }
                Split::Never => 1,
                Split::Parts(n) => n,
            };
            if splits > 1 || matches!(split, Split::Parts(_)) {
                let ts = [&*out, q, k_cache, v_cache, cu_seqlens_q, seq_lens_k, block_tables];
                return flash_decoding::launch(OP, &gpu, &dims, ts, max_q, scale, splits);
            }
            let args = vec![
                Arg::Ptr(ptr(out)),
                Arg::Ptr(ptr(q)),
                Arg::Ptr(ptr(k_cache)),
                Arg::Ptr(ptr(v_cache)),
                Arg::Ptr(ptr(cu_seqlens_q)),
                Arg::Ptr(ptr(seq_lens_k)),
                Arg::Ptr(ptr(block_tables)),
                Arg::I32(total_q as i32),
                Arg::I32(num_blocks as i32),
                Arg::I32(block_size as i32),
                Arg::I32(max_blocks as i32),
                Arg::I32(n_heads as i32),
                Arg::I32(n_kv_heads as i32),
                Arg::F32(scale),
            ];
            launch(&gpu, "paged_attention", d, dt, &plan, args)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Device;

    fn t(data: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_f32(&Device::Cpu, shape, data, DType::F32).unwrap()
    }

    fn cu(offsets: &[i32]) -> Tensor {
        Tensor::from_i32(&Device::Cpu, &[offsets.len()], offsets).unwrap()
    }

    /// Deterministic, varied values (no RNG needed for hand checks).
    fn ramp(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.37 + seed).sin() * 1.5).collect()
    }

    /// Runs the CPU op on (tokens, heads, d) tensors built from flat data.
    #[allow(clippy::too_many_arguments)]
    fn run(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        heads: (usize, usize),
        d: usize,
        cu_q: &[i32],
        cu_k: &[i32],
        causal: bool,
    ) -> Vec<f32> {
        let (tq, tk) = (q.len() / (heads.0 * d), k.len() / (heads.1 * d));
        let mut out = Tensor::empty(&Device::Cpu, &[tq, heads.0, d], DType::F32).unwrap();
        let max_q = cu_q.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap_or(0);
        let (qt, kt, vt) = (t(q, &[tq, heads.0, d]), t(k, &[tk, heads.1, d]), t(v, &[tk, heads.1, d]));
        attention(&mut out, &qt, &kt, &vt, &cu(cu_q), &cu(cu_k), max_q, causal, 1.0 / (d as f32).sqrt()).unwrap();
        out.to_f32_vec().unwrap()
    }

    #[test]
    fn single_key_gives_v() {
        let d = 64;
        let v = ramp(d, 2.0);
        let out = run(&ramp(d, 0.0), &ramp(d, 1.0), &v, (1, 1), d, &[0, 1], &[0, 1], false);
        assert_eq!(out, v, "softmax over one key is 1");
    }

    #[test]
    fn equal_scores_give_the_mean_of_v() {
        let d = 64;
        let key = ramp(d, 1.0);
        let k = [key.clone(), key].concat();
        let v = ramp(2 * d, 3.0);
        let out = run(&ramp(d, 0.0), &k, &v, (1, 1), d, &[0, 1], &[0, 2], false);
        for (c, o) in out.iter().enumerate() {
            let mean = (v[c] + v[d + c]) / 2.0;
            assert!((o - mean).abs() < 1e-6, "dim {c}: {o} vs {mean}");
        }
    }

    #[test]
    fn causal_first_query_sees_only_the_first_key() {
        let (d, n) = (80, 3);
        let v = ramp(n * d, 3.0);
        let out = run(&ramp(n * d, 0.0), &ramp(n * d, 1.0), &v, (1, 1), d, &[0, 3], &[0, 3], true);
        assert_eq!(&out[..d], &v[..d]);
        // Non-causal, the first query mixes all three.
        let full = run(&ramp(n * d, 0.0), &ramp(n * d, 1.0), &v, (1, 1), d, &[0, 3], &[0, 3], false);
        assert_ne!(&full[..d], &v[..d]);
    }

    #[test]
    fn grouped_query_heads_read_their_kv_head() {
        // 4 query heads over 2 kv heads, one key: head h outputs v of kv head h / 2.
        let d = 96;
        let v = ramp(2 * d, 5.0);
        let out = run(&ramp(4 * d, 0.0), &ramp(2 * d, 1.0), &v, (4, 2), d, &[0, 1], &[0, 1], false);
        for h in 0..4 {
            assert_eq!(&out[h * d..][..d], &v[(h / 2) * d..][..d], "head {h}");
        }
    }

    #[test]
    fn decode_and_chunked_prefill_match_the_full_prefill() {
        // 5 tokens, 2 query heads over 1 kv head: a causal prefill of all 5, then
        // the last query alone over the 5 keys (decode), then the last 2 (chunk).
        let (d, n, hd) = (128, 5, 2 * 128);
        let (q, k, v) = (ramp(n * hd, 0.0), ramp(n * d, 1.0), ramp(n * d, 2.0));
        let full = run(&q, &k, &v, (2, 1), d, &[0, 5], &[0, 5], true);
        let decode = run(&q[4 * hd..], &k, &v, (2, 1), d, &[0, 1], &[0, 5], true);
        assert_eq!(decode, &full[4 * hd..]);
        let chunk = run(&q[3 * hd..], &k, &v, (2, 1), d, &[0, 2], &[0, 5], true);
        assert_eq!(chunk, &full[3 * hd..]);
    }

    #[test]
    fn packed_sequences_do_not_see_each_other() {
        // Two sequences of 1 token each: each output is its own v.
        let d = 64;
        let v = ramp(2 * d, 4.0);
        let out = run(&ramp(2 * d, 0.0), &ramp(2 * d, 1.0), &v, (1, 1), d, &[0, 1, 2], &[0, 1, 2], false);
        assert_eq!(out, v);
    }

    #[test]
    fn queries_that_see_no_key_are_zero() {
        // Causal, 3 queries over 1 key: j ≤ i − 2, so only query 2 sees key 0.
        let d = 64;
        let v = ramp(d, 4.0);
        let out = run(&ramp(3 * d, 0.0), &ramp(d, 1.0), &v, (1, 1), d, &[0, 3], &[0, 1], true);
        assert!(out[..2 * d].iter().all(|&x| x == 0.0));
        assert_eq!(&out[2 * d..], &v[..]);
        // No keys at all.
        let out = run(&ramp(d, 0.0), &[], &[], (1, 1), d, &[0, 1], &[0, 0], false);
        assert!(out.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn the_cpu_takes_any_head_dim() {
        // Head dims without a GPU kernel (24, an odd 3, 200): one key gives
        // its value, two equal keys the mean of their values.
        for d in [24, 3, 200] {
            let v = ramp(2 * d, 2.0);
            let out = run(&ramp(d, 0.0), &ramp(d, 1.0), &v[..d], (1, 1), d, &[0, 1], &[0, 1], false);
            assert_eq!(out, &v[..d], "d {d}");
            let key = ramp(d, 1.0);
            let out = run(&ramp(d, 0.0), &[key.clone(), key].concat(), &v, (1, 1), d, &[0, 1], &[0, 2], false);
            for (c, o) in out.iter().enumerate() {
                let mean = (v[c] + v[d + c]) / 2.0;
                assert!((o - mean).abs() < 1e-6, "d {d} dim {c}: {o} vs {mean}");
            }
        }
    }

    #[test]
    fn check_head_dim_takes_any_on_the_cpu_and_the_kernels_on_the_gpu() {
        let what = "tensor `model.layers.0.self_attn.q_proj.weight` (head dim 24)";
        for d in [1, 3, 24, 72, 100, 4096] {
            check_head_dim(&Device::Cpu, d, what).unwrap();
        }
        let e = check_head_dim(&Device::Cpu, 0, what).unwrap_err().to_string();
        assert!(e.contains(what) && e.contains("at least 1"), "{e}");
        assert!(HEAD_DIMS.windows(2).all(|w| w[0] < w[1]) && HEAD_DIMS.contains(&72), "{HEAD_DIMS:?}");
        // The GPU half needs a GPU (tools/gpu_suite.sh runs this binary there).
        let Ok(gpu) = Device::cuda(0) else { return };
        for &d in HEAD_DIMS {
            check_head_dim(&gpu, d, what).unwrap();
        }
        let e = check_head_dim(&gpu, 24, what).unwrap_err();
        assert!(matches!(e, Error::Config(_)), "{e:?}");
        let e = e.to_string();
        assert!(e.contains(what) && e.contains(&format!("{HEAD_DIMS:?}")) && e.contains("not 24"), "{e}");
        assert!(e.contains("add 24 to `ATTN_HEAD_DIMS`"), "{e}");
        let e = check_head_dim(&gpu, 36, what).unwrap_err().to_string();
        assert!(e.contains("need a multiple of 8"), "{e}");
    }

    #[test]
    fn flash_shared_memory_pads_the_head_dim_to_whole_mma_steps() {
        // The Q tile and two stages of K and V, rows of DP + FA_ROW_PAD bf16:
        // the multiples of 16 as they are, 72 in 80's tiles.
        let rows = 16 * FLASH_WARPS + 4 * FLASH_BN;
        for d in [64, 80, 96, 128] {
            assert_eq!(flash_smem(d) as usize, rows * (d + FA_ROW_PAD) * 2, "d {d}");
        }
        assert_eq!(flash_smem(72), flash_smem(80));
    }

    #[test]
    fn bad_inputs_are_errors_not_panics() {
        let err = |q: &[usize], k: &[usize], cq: &[i32], ck: &[i32], max_q: usize| {
            let n = |s: &[usize]| s.iter().product::<usize>();
            let mut out = Tensor::empty(&Device::Cpu, q, DType::F32).unwrap();
            let (qt, kt) = (t(&vec![0.5; n(q)], q), t(&vec![0.5; n(k)], k));
            attention(&mut out, &qt, &kt, &kt, &cu(cq), &cu(ck), max_q, true, 0.1).unwrap_err().to_string()
        };
        let e = err(&[2, 1, 0], &[2, 1, 0], &[0, 2], &[0, 2], 2);
        assert!(e.contains("no heads, or heads of no values"), "{e}");
        let e = err(&[2, 0, 64], &[2, 1, 64], &[0, 2], &[0, 2], 2);
        assert!(e.contains("no heads, or heads of no values"), "{e}");
        let e = err(&[2, 3, 64], &[2, 2, 64], &[0, 2], &[0, 2], 2);
        assert!(e.contains("3 query heads are not a multiple of 2 kv heads"), "{e}");
        let e = err(&[2, 2, 64], &[2, 1, 80], &[0, 2], &[0, 2], 2);
        assert!(e.contains("head dim of k"), "{e}");
        let e = err(&[2, 2, 64], &[2, 1, 64], &[0, 2], &[0, 1, 2], 2);
        assert!(e.contains("cu_seqlens_k [3] != cu_seqlens_q [2]"), "{e}");
        let e = err(&[2, 2, 64], &[2, 1, 64], &[0, 3], &[0, 2], 3);
        assert!(e.contains("cu_seqlens_q ends at 3, past the 2 packed tokens"), "{e}");
        let e = err(&[2, 2, 64], &[2, 1, 64], &[0, 2, 1], &[0, 1, 2], 2);
        assert!(e.contains("cu_seqlens_q decreases at sequence 1"), "{e}");
        let e = err(&[2, 2, 64], &[2, 1, 64], &[0, 2], &[0, 2], 1);
        assert!(e.contains("2 queries > max_seqlen_q 1"), "{e}");
        let e = err(&[2, 2 * 64], &[2, 1, 64], &[0, 2], &[0, 2], 2);
        assert!(e.contains("expected (total_q, n_heads, head_dim)"), "{e}");
        // i32 offsets only.
        let mut out = Tensor::empty(&Device::Cpu, &[1, 1, 64], DType::F32).unwrap();
        let x = t(&[0.5; 64], &[1, 1, 64]);
        let e = attention(&mut out, &x, &x, &x, &t(&[0.0, 1.0], &[2]), &cu(&[0, 1]), 1, false, 0.1).unwrap_err();
        assert!(e.to_string().contains("dtype"), "{e}");
    }
}
