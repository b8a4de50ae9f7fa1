//! The CPU reference of `attention::paged_attention`, and its unit tests. The
//! op itself (its checks, its GPU launcher) is in attention.rs beside
//! `attention`, whose per-token code (`attend_token`) this shares, so the two
//! ops give bit-identical results on the same keys.

use rayon::prelude::*;

use super::attention::{attend_token, check_queries, PagedDims};
use crate::ensure_shape;
use crate::error::Result;

/// out (total_q, n_heads, d) from q and the cache rows the block tables name,
/// after checking the host data the kernel can only clamp: query offsets,
/// each sequence's length against its block-table row, and every block id a
/// sequence uses (entries past its last block are padding, never read).
#[allow(clippy::too_many_arguments)] // paged_attention's arguments as host slices
pub(super) fn cpu(
    op: &'static str,
    dims: &PagedDims,
    out: &mut [f32],
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    cu_q: &[i32],
    seq_lens_k: &[i32],
    block_tables: &[i32],
    max_seqlen_q: usize,
    scale: f32,
) -> Result<()> {
    let &PagedDims { total_q, n_heads, n_kv_heads, head_dim: d, num_blocks, block_size: bs, batch, max_blocks } = dims;
    check_queries(op, cu_q, total_q, max_seqlen_q)?;
    for (b, &lk) in seq_lens_k.iter().enumerate() {
        ensure_shape!(lk >= 0, op, "seq_lens_k[{b}] = {lk} is negative");
        let used = (lk as usize).div_ceil(bs);
        ensure_shape!(
            used <= max_blocks,
            op,
            "seq_lens_k[{b}] = {lk} keys need {used} blocks of {bs}, but block_tables has {max_blocks} per sequence"
        );
        for (i, &id) in block_tables[b * max_blocks..][..used].iter().enumerate() {
            ensure_shape!(
                id >= 0 && (id as usize) < num_blocks,
                op,
                "block_tables[{b}, {i}] = {id} is not a block of the cache (0..{num_blocks})"
            );
        }
    }
    let q_row = n_heads * d;
    for b in 0..batch {
        let (q0, q1) = (cu_q[b] as usize, cu_q[b + 1] as usize);
        let (lq, lk) = (q1 - q0, seq_lens_k[b] as usize);
        let table = &block_tables[b * max_blocks..][..lk.div_ceil(bs)];
        // Key j of the sequence: offset j % bs of its (j / bs)-th block.
        let key_row = |j: usize| table[j / bs] as usize * bs + j % bs;
        // One query token (all its heads) per task; keys 0..n are visible: j ≤ i + lk − lq.
        out[q0 * q_row..q1 * q_row].par_chunks_mut(q_row).enumerate().for_each(|(i, o)| {
            let n = (i + lk + 1).saturating_sub(lq).min(lk);
            let qi = &q[(q0 + i) * q_row..][..q_row];
            attend_token(o, qi, k_cache, v_cache, n, key_row, (n_heads, n_kv_heads, d), scale);
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::ops::attention::{attention, paged_attention};
    use crate::ops::kv_cache::kv_cache_write;
    use crate::tensor::{DType, Device, Tensor};

    fn t(data: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_f32(&Device::Cpu, shape, data, DType::F32).unwrap()
    }

    fn ints(data: &[i32], shape: &[usize]) -> Tensor {
        Tensor::from_i32(&Device::Cpu, shape, data).unwrap()
    }

    /// Deterministic, varied values (no RNG needed for hand checks).
    fn ramp(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.37 + seed).sin() * 1.5).collect()
    }

    /// A batch over a paged cache: (Lq, Lk) per sequence, `heads` query over
    /// kv heads of dim `d`, blocks of `bs` slots handed out in a shuffled
    /// order with spare blocks between them. Unused slots hold NaN, so reading
    /// one shows in the output.
    struct Batch {
        seqs: Vec<(usize, usize)>,
        heads: (usize, usize),
        d: usize,
        bs: usize,
        q: Vec<f32>,
        /// Each sequence's keys and values, packed: (Σ Lk, kv heads, d).
        k: Vec<f32>,
        v: Vec<f32>,
        num_blocks: usize,
        max_blocks: usize,
        /// (batch, max_blocks), -1 past a sequence's last block.
        tables: Vec<i32>,
    }

    impl Batch {
        fn new(seqs: &[(usize, usize)], heads: (usize, usize), d: usize, bs: usize) -> Self {
            let total_q: usize = seqs.iter().map(|s| s.0).sum();
            let total_k: usize = seqs.iter().map(|s| s.1).sum();
            let used: usize = seqs.iter().map(|s| s.1.div_ceil(bs)).sum();
            let max_blocks = seqs.iter().map(|s| s.1.div_ceil(bs)).max().unwrap_or(0) + 1;
            // Twice the blocks needed, plus one, handed out as 7·i mod num_blocks
            // (7 and an odd num_blocks not a multiple of 7 are coprime: a permutation).
            let mut num_blocks = 2 * used + 1;
            if num_blocks.is_multiple_of(7) {
                num_blocks += 2;
            }
            let mut next = 0;
            let mut tables = vec![-1; seqs.len() * max_blocks];
            for (b, s) in seqs.iter().enumerate() {
                for i in 0..s.1.div_ceil(bs) {
                    tables[b * max_blocks + i] = (7 * next % num_blocks) as i32;
                    next += 1;
                }
            }
            let (hq, hk) = heads;
            Batch {
                seqs: seqs.to_vec(),
                heads,
                d,
                bs,
                q: ramp(total_q * hq * d, 0.0),
                k: ramp(total_k * hk * d, 1.0),
                v: ramp(total_k * hk * d, 2.0),
                num_blocks,
                max_blocks,
                tables,
            }
        }

        /// The cache with every sequence's keys written by `kv_cache_write`.
        fn cache(&self) -> (Tensor, Tensor) {
            let shape = [self.num_blocks, self.bs, self.heads.1, self.d];
            let nan = vec![f32::NAN; shape.iter().product()];
            let (mut kc, mut vc) = (t(&nan, &shape), t(&nan, &shape));
            let mut slots = Vec::new();
            for (b, s) in self.seqs.iter().enumerate() {
                slots.extend(
                    (0..s.1).map(|j| {
                        self.tables[b * self.max_blocks + j / self.bs] * self.bs as i32 + (j % self.bs) as i32
                    }),
                );
            }
            let kv = [slots.len(), self.heads.1, self.d];
            kv_cache_write(&mut kc, &mut vc, &t(&self.k, &kv), &t(&self.v, &kv), &ints(&slots, &[slots.len()]))
                .unwrap();
            (kc, vc)
        }

        fn cu_q(&self) -> Vec<i32> {
            let mut cu = vec![0];
            for s in &self.seqs {
                cu.push(cu[cu.len() - 1] + s.0 as i32);
            }
            cu
        }

        fn scale(&self) -> f32 {
            1.0 / (self.d as f32).sqrt()
        }

        fn paged(&self) -> Vec<f32> {
            let (kc, vc) = self.cache();
            let cu = self.cu_q();
            let total_q = cu[cu.len() - 1] as usize;
            let lens: Vec<i32> = self.seqs.iter().map(|s| s.1 as i32).collect();
            let max_q = self.seqs.iter().map(|s| s.0).max().unwrap_or(0);
            let mut out = Tensor::empty(&Device::Cpu, &[total_q, self.heads.0, self.d], DType::F32).unwrap();
            let (qt, cq) = (t(&self.q, &[total_q, self.heads.0, self.d]), ints(&cu, &[cu.len()]));
            let (lt, bt) = (ints(&lens, &[lens.len()]), ints(&self.tables, &[self.seqs.len(), self.max_blocks]));
            paged_attention(&mut out, &qt, &kc, &vc, &cq, &lt, &bt, max_q, self.scale()).unwrap();
            out.to_f32_vec().unwrap()
        }

        /// `attention` (causal) on the same keys, packed.
        fn contiguous(&self) -> Vec<f32> {
            let (cu_q, mut cu_k) = (self.cu_q(), vec![0]);
            for s in &self.seqs {
                cu_k.push(cu_k[cu_k.len() - 1] + s.1 as i32);
            }
            let (total_q, total_k) = (cu_q[cu_q.len() - 1] as usize, cu_k[cu_k.len() - 1] as usize);
            let max_q = self.seqs.iter().map(|s| s.0).max().unwrap_or(0);
            let (qs, ks) = ([total_q, self.heads.0, self.d], [total_k, self.heads.1, self.d]);
            let mut out = Tensor::empty(&Device::Cpu, &qs, DType::F32).unwrap();
            let (qt, kt, vt) = (t(&self.q, &qs), t(&self.k, &ks), t(&self.v, &ks));
            let (cq, ck) = (ints(&cu_q, &[cu_q.len()]), ints(&cu_k, &[cu_k.len()]));
            attention(&mut out, &qt, &kt, &vt, &cq, &ck, max_q, true, self.scale()).unwrap();
            out.to_f32_vec().unwrap()
        }
    }

    #[test]
    fn shuffled_blocks_give_exactly_the_contiguous_result() {
        // A decode over 11 cached keys, a full prefill of 5, a prefill of 3
        // after 6 cached keys, a one-token prompt: one batch, blocks of 4.
        let b = Batch::new(&[(1, 11), (5, 5), (3, 9), (1, 1)], (4, 2), 64, 4);
        assert!(b.tables[..3].windows(2).any(|w| w[1] != w[0] + 1), "blocks are not contiguous");
        let paged = b.paged();
        assert!(paged.iter().all(|x| x.is_finite()), "a NaN slot was read");
        assert_eq!(paged, b.contiguous());
        // Odd block size, another head dim; a block size past every sequence.
        let b = Batch::new(&[(2, 13), (1, 6), (7, 7)], (2, 1), 80, 5);
        assert_eq!(b.paged(), b.contiguous());
        let b = Batch::new(&[(2, 13), (1, 6)], (1, 1), 128, 32);
        assert_eq!(b.paged(), b.contiguous());
        // Head dims without GPU kernels: the CPU takes any.
        for d in [24, 5] {
            let b = Batch::new(&[(2, 13), (1, 6), (7, 7)], (2, 1), d, 5);
            let paged = b.paged();
            assert!(paged.iter().all(|x| x.is_finite()), "d {d}: a NaN slot was read");
            assert_eq!(paged, b.contiguous(), "d {d}");
        }
    }

    #[test]
    fn a_sequence_does_not_depend_on_the_batch() {
        let d = 96;
        let b = Batch::new(&[(1, 9), (4, 4), (2, 7)], (2, 2), d, 3);
        let all = b.paged();
        // The last sequence alone (on other blocks): the same bits.
        let mut alone = Batch::new(&[(2, 7)], (2, 2), d, 3);
        alone.q = b.q[5 * 2 * d..].to_vec();
        alone.k = b.k[13 * 2 * d..].to_vec();
        alone.v = b.v[13 * 2 * d..].to_vec();
        assert_eq!(alone.paged(), &all[5 * 2 * d..]);
    }

    #[test]
    fn hand_checked_outputs() {
        let d = 64;
        // One key: softmax over it is 1, the output is its value.
        let mut b = Batch::new(&[(1, 1)], (1, 1), d, 16);
        b.v = ramp(d, 5.0);
        assert_eq!(b.paged(), b.v);
        // 3 queries over 1 key: query i sees key j iff j ≤ i − 2, so only the
        // last one sees it; the others are zeros. A sequence with no keys: zeros.
        let mut b = Batch::new(&[(3, 1), (2, 0)], (1, 1), d, 16);
        b.v = ramp(d, 5.0);
        let out = b.paged();
        assert!(out[..2 * d].iter().all(|&x| x == 0.0));
        assert_eq!(&out[2 * d..3 * d], &b.v[..]);
        assert!(out[3 * d..].iter().all(|&x| x == 0.0));
    }

    #[test]
    fn bad_inputs_are_errors_not_panics() {
        let d = 64;
        let q = t(&[0.5; 2 * 2 * 64], &[2, 2, d]);
        let cache = t(&[0.5; 3 * 4 * 64], &[3, 4, 1, d]);
        let cu = ints(&[0, 1, 2], &[3]);
        let err = |lens: &[i32], tables: &[i32], max_q: usize| {
            let mut out = Tensor::empty(&Device::Cpu, &[2, 2, d], DType::F32).unwrap();
            let bt = ints(tables, &[2, tables.len() / 2]);
            let r = paged_attention(&mut out, &q, &cache, &cache, &cu, &ints(lens, &[2]), &bt, max_q, 0.1);
            r.unwrap_err().to_string()
        };
        let e = err(&[9, 1], &[0, 1, 2, 0], 1);
        assert!(e.contains("seq_lens_k[0] = 9 keys need 3 blocks of 4, but block_tables has 2 per sequence"), "{e}");
        let e = err(&[5, 1], &[0, 3, 2, 0], 1);
        assert!(e.contains("block_tables[0, 1] = 3 is not a block of the cache (0..3)"), "{e}");
        let e = err(&[4, 1], &[0, 3, -1, 0], 1);
        assert!(e.contains("block_tables[1, 0] = -1 is not a block"), "{e}");
        let e = err(&[-1, 1], &[0, 0, 0, 0], 1);
        assert!(e.contains("seq_lens_k[0] = -1 is negative"), "{e}");
        let e = err(&[1, 1], &[0, 0, 0, 0], 0);
        assert!(e.contains("1 queries > max_seqlen_q 0"), "{e}");
        // Padding past a sequence's last block is not read: -1 there is fine.
        let mut out = Tensor::empty(&Device::Cpu, &[2, 2, d], DType::F32).unwrap();
        let (lens, bt) = (ints(&[4, 1], &[2]), ints(&[2, -1, 1, 99], &[2, 2]));
        paged_attention(&mut out, &q, &cache, &cache, &cu, &lens, &bt, 1, 0.1).unwrap();

        // Shapes and dtypes.
        let shape_err = |q: &Tensor, cache: &Tensor, lens: &Tensor, bt: &Tensor| {
            let mut out = Tensor::empty(&Device::Cpu, q.shape(), DType::F32).unwrap();
            paged_attention(&mut out, q, cache, cache, &cu, lens, bt, 1, 0.1).unwrap_err().to_string()
        };
        let (lens, bt) = (ints(&[1, 1], &[2]), ints(&[0, 0], &[2, 1]));
        let e = shape_err(&q, &t(&[0.5; 4 * 64], &[4, 1, d]), &lens, &bt);
        assert!(e.contains("expected (num_blocks, block_size, n_kv_heads, head_dim)"), "{e}");
        let e = shape_err(&q, &t(&[0.5; 4 * 80], &[1, 4, 1, 80]), &lens, &bt);
        assert!(e.contains("head dim of k_cache [1, 4, 1, 80] != q [2, 2, 64]"), "{e}");
        let e = shape_err(&q, &t(&[], &[0, 4, 1, d]), &lens, &bt);
        assert!(e.contains("k_cache [0, 4, 1, 64] has no slots"), "{e}");
        let e = shape_err(&q, &cache, &ints(&[1], &[1]), &bt);
        assert!(e.contains("seq_lens_k [1], expected [2]"), "{e}");
        let e = shape_err(&q, &cache, &lens, &ints(&[0, 0], &[2]));
        assert!(e.contains("block_tables [2], expected (2, max_blocks_per_seq)"), "{e}");
        let e = shape_err(&q, &cache, &t(&[1.0, 1.0], &[2]), &bt);
        assert!(e.contains("dtype F32"), "{e}");
        let e = shape_err(&t(&[0.5; 2 * 3 * 64], &[2, 3, d]), &t(&[0.5; 2 * 64], &[1, 1, 2, d]), &lens, &bt);
        assert!(e.contains("3 query heads are not a multiple of 2 kv heads"), "{e}");
    }
}
