//! The front of a Qwen2-VL decoder layer's attention as one op: from the
//! output of one GEMM over the concatenated q | k | v projection weights, add
//! the projection biases, apply M-RoPE to q and k, return q and write k and v
//! into the paged KV cache. Mirrors transformers `Qwen2VLAttention.forward`
//! (q_proj, k_proj, v_proj with bias, `apply_multimodal_rotary_pos_emb`) and
//! vLLM's `reshape_and_cache_flash`. Kernel: csrc/qkv_rope.cu.
//!
//! The CPU path is the composition of the separate ops (`activation::bias_add`,
//! `rope::mrope` on q and on k, `kv_cache::kv_cache_write`), so it is the
//! reference by construction; the kernel computes the same sequence with the
//! same roundings and matches the GPU composition bit for bit.

use super::rope::Freqs;
use super::{activation, expect_dtype, f32s, f32s_mut, float_dtype, kernel, kv_cache, placement, ptr, rope, On};
use crate::cuda::Arg;
use crate::ensure_shape;
use crate::error::Result;
use crate::tensor::{DType, Device, Tensor};

/// q (n, heads, head_dim) and the cache's keys and values for n tokens, from
/// qkv (n, (heads + 2·kv_heads)·head_dim) = x · [w_q | w_k | w_v]ᵀ without
/// bias; bias ((heads + 2·kv_heads)·head_dim,) is [b_q | b_k | b_v].
///
/// q = mrope(qkv_q + b_q); k = mrope(qkv_k + b_k) and v = qkv_v + b_v go to
/// cache row slot_mapping[t] of k_cache, v_cache (num_blocks, block_size,
/// kv_heads, head_dim). positions: i32 (3, n), as [`rope::mrope`] takes them,
/// with its `sections`, and `freqs`: theta (M-RoPE) or frequency tables
/// ([`rope::rope_table`]; sections must then be [head_dim / 2, 0, 0]); slot_mapping: i32 (n,), as
/// [`kv_cache::kv_cache_write`] takes it (< 0 is padding, skipped; past the
/// cache an error on the CPU, skipped on the GPU). bf16 or f32 on the GPU,
/// f32 on the CPU.
#[allow(clippy::too_many_arguments)] // the inputs of the four ops it fuses
pub fn qkv_rope_cache(
    q: &mut Tensor,
    k_cache: &mut Tensor,
    v_cache: &mut Tensor,
    qkv: &Tensor,
    bias: &Tensor,
    positions: &Tensor,
    slot_mapping: &Tensor,
    sections: [usize; 3],
    freqs: Freqs,
) -> Result<()> {
    const OP: &str = "qkv_rope_cache";
    let qs = q.shape().to_vec();
    ensure_shape!(qs.len() == 3, OP, "q {qs:?}, expected (n, heads, head_dim)");
    let (n, heads, d) = (qs[0], qs[1], qs[2]);
    let cs = k_cache.shape().to_vec();
    ensure_shape!(cs.len() == 4, OP, "k_cache {cs:?}, expected (num_blocks, block_size, kv_heads, head_dim)");
    ensure_shape!(v_cache.shape() == cs, OP, "v_cache {:?} != k_cache {cs:?}", v_cache.shape());
    ensure_shape!(cs[3] == d, OP, "head dim of k_cache {cs:?} != q {qs:?}");
    let kv_heads = cs[2];
    let width = (heads + 2 * kv_heads) * d;
    ensure_shape!(qkv.shape() == [n, width], OP, "qkv {:?}, expected [{n}, {width}] for q {qs:?}", qkv.shape());
    ensure_shape!(bias.shape() == [width], OP, "bias {:?}, expected [{width}]", bias.shape());
    ensure_shape!(d > 0 && d % 2 == 0, OP, "head_dim {d} must be even and positive");
    let sum = sections.iter().sum::<usize>();
    ensure_shape!(sum == d / 2, OP, "sections {sections:?} sum to {sum}, expected head_dim / 2 = {}", d / 2);
    let (theta, table) = match freqs {
        Freqs::Theta(theta) => {
            ensure_shape!(theta.is_finite() && theta > 0.0, OP, "theta must be positive and finite, got {theta}");
            (theta, None)
        }
        Freqs::Table { inv_freq, mscale } => {
            ensure_shape!(
                sections == [d / 2, 0, 0],
                OP,
                "frequency tables need sections [{}, 0, 0], got {sections:?}",
                d / 2
            );
            let ts = inv_freq.shape();
            ensure_shape!(
                ts.len() == 2 && ts[0] >= 1 && ts[1] == d / 2,
                OP,
                "inv_freq {ts:?}, expected (tables, head_dim / 2 = {})",
                d / 2
            );
            expect_dtype(OP, inv_freq, DType::F32)?;
            ensure_shape!(mscale.is_finite(), OP, "mscale must be finite, got {mscale}");
            (1.0, Some((inv_freq, mscale)))
        }
    };
    expect_dtype(OP, positions, DType::I32)?;
    expect_dtype(OP, slot_mapping, DType::I32)?;
    ensure_shape!(positions.shape() == [3, n], OP, "positions {:?}, expected [3, {n}]", positions.shape());
    ensure_shape!(slot_mapping.shape() == [n], OP, "slot_mapping {:?}, expected [{n}]", slot_mapping.shape());
    let num_slots = cs[0] * cs[1];
    ensure_shape!(
        [n, width, num_slots].iter().all(|&x| x <= i32::MAX as usize),
        OP,
        "too large: {n} tokens of {width} values, k_cache {cs:?}"
    );
    let mut all: Vec<&Tensor> = vec![&*q, &*k_cache, &*v_cache, qkv, bias, positions, slot_mapping];
    all.extend(table.map(|(t, _)| t));
    match placement(OP, &all)? {
        On::Cpu => {
            let mut x = Tensor::from_f32(&Device::Cpu, &[n, width], f32s(OP, qkv)?, DType::F32)?;
            activation::bias_add(&mut x, bias)?;
            let x = f32s(OP, &x)?;
            // Column runs [from, to) of each row: q, k or v heads.
            let cols = |from: usize, to: usize, h: usize| {
                let data: Vec<f32> = x.chunks(width.max(1)).flat_map(|r| r[from..to].iter().copied()).collect();
                Tensor::from_f32(&Device::Cpu, &[n, h, d], &data, DType::F32)
            };
            let (qe, ke) = (heads * d, (heads + kv_heads) * d);
            let (mut qt, mut kt, vt) = (cols(0, qe, heads)?, cols(qe, ke, kv_heads)?, cols(ke, width, kv_heads)?);
            for x in [&mut qt, &mut kt] {
                match table {
                    None => rope::mrope(x, positions, sections, theta)?,
                    Some((inv_freq, mscale)) => rope::rope_table(x, positions, inv_freq, mscale)?,
                }
            }
            kv_cache::kv_cache_write(k_cache, v_cache, &kt, &vt, slot_mapping)?;
            f32s_mut(OP, q)?.copy_from_slice(f32s(OP, &qt)?);
            Ok(())
        }
        On::Cuda(gpu) => {
            let dt = float_dtype(OP, &[&*q, &*k_cache, &*v_cache, qkv, bias])?;
            if n == 0 {
                return Ok(());
            }
            let half = d / 2;
            ensure_shape!(half <= 1024, OP, "head_dim {d} is over 2048, the GPU kernel's limit");
            // Threads: x over the half frequencies, y over heads, ~256 in all (as rope.rs).
            let ny = (256 / half).clamp(1, heads + kv_heads);
            let args = [
                Arg::Ptr(ptr(q)),
                Arg::Ptr(ptr(k_cache)),
                Arg::Ptr(ptr(v_cache)),
                Arg::Ptr(ptr(qkv)),
                Arg::Ptr(ptr(bias)),
                Arg::Ptr(ptr(positions)),
                Arg::Ptr(ptr(slot_mapping)),
                Arg::I32(n as i32),
                Arg::I32(heads as i32),
                Arg::I32(kv_heads as i32),
                Arg::I32(half as i32),
                Arg::I32(sections[0] as i32),
                Arg::I32(sections[1] as i32),
                Arg::F32(theta),
                Arg::Ptr(table.map_or(0, |(t, _)| ptr(t))),
                Arg::I32(table.map_or(0, |(t, _)| t.shape()[0] as i32)),
                Arg::F32(table.map_or(1.0, |(_, m)| m)),
                Arg::I32(num_slots as i32),
            ];
            let grid = (n.min(65535) as u32, 1, 1);
            gpu.launch(&kernel(OP, dt), grid, (half as u32, ny as u32, 1), 0, &args)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(data: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_f32(&Device::Cpu, shape, data, DType::F32).unwrap()
    }

    fn ints(data: &[i32], shape: &[usize]) -> Tensor {
        Tensor::from_i32(&Device::Cpu, shape, data).unwrap()
    }

    #[test]
    fn position_zero_adds_the_bias_and_places_each_part() {
        // 2 tokens, 2 q heads and 1 kv head of dim 4: at position 0 RoPE is
        // the identity, so q, k and v are the biased columns, k and v in their slots.
        let (heads, kv, d, n) = (2, 1, 4, 2);
        let width = (heads + 2 * kv) * d;
        let x: Vec<f32> = (0..n * width).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..width).map(|i| 0.5 * i as f32).collect();
        let mut q = Tensor::empty(&Device::Cpu, &[n, heads, d], DType::F32).unwrap();
        let (mut kc, mut vc) = (t(&[-1.0; 3 * 4], &[3, 1, kv, d]), t(&[-2.0; 3 * 4], &[3, 1, kv, d]));
        let (pos, slots) = (ints(&[0; 6], &[3, n]), ints(&[2, 0], &[n]));
        qkv_rope_cache(
            &mut q,
            &mut kc,
            &mut vc,
            &t(&x, &[n, width]),
            &t(&b, &[width]),
            &pos,
            &slots,
            [1, 0, 1],
            Freqs::Theta(1e4),
        )
        .unwrap();
        let biased = |t: usize, c: usize| x[t * width + c] + b[c];
        let q = q.to_f32_vec().unwrap();
        for (tok, c) in (0..n).flat_map(|t| (0..heads * d).map(move |c| (t, c))) {
            assert_eq!(q[tok * heads * d + c], biased(tok, c), "q token {tok} col {c}");
        }
        let (kc, vc) = (kc.to_f32_vec().unwrap(), vc.to_f32_vec().unwrap());
        for (tok, slot) in [(0, 2), (1, 0)] {
            for c in 0..d {
                assert_eq!(kc[slot * d + c], biased(tok, heads * d + c), "k token {tok}");
                assert_eq!(vc[slot * d + c], biased(tok, (heads + kv) * d + c), "v token {tok}");
            }
        }
        assert!(kc[d..2 * d].iter().all(|&v| v == -1.0) && vc[d..2 * d].iter().all(|&v| v == -2.0), "slot 1");
    }

    #[test]
    fn bad_inputs_are_errors_not_panics() {
        let (heads, kv, d, n) = (2, 1, 4, 2);
        let width = (heads + 2 * kv) * d;
        let x = t(&vec![0.5; n * width], &[n, width]);
        let b = t(&vec![0.5; width], &[width]);
        let (pos, slots) = (ints(&[1; 6], &[3, n]), ints(&[0, 1], &[n]));
        let run = |q: &[usize], cache: &[usize], x: &Tensor, b: &Tensor, pos: &Tensor, slots: &Tensor, sec| {
            let mut q = Tensor::empty(&Device::Cpu, q, DType::F32).unwrap();
            let numel = cache.iter().product();
            let (mut kc, mut vc) = (t(&vec![0.0; numel], cache), t(&vec![0.0; numel], cache));
            qkv_rope_cache(&mut q, &mut kc, &mut vc, x, b, pos, slots, sec, Freqs::Theta(1e4)).unwrap_err().to_string()
        };
        let (qs, cs) = ([n, heads, d], [2, 2, kv, d]);
        let e = run(&qs, &cs, &t(&vec![0.5; n * 12], &[n, 12]), &b, &pos, &slots, [1, 0, 1]);
        assert!(e.contains("qkv [2, 12], expected [2, 16]"), "{e}");
        let e = run(&qs, &cs, &x, &t(&[0.5; 12], &[12]), &pos, &slots, [1, 0, 1]);
        assert!(e.contains("bias [12], expected [16]"), "{e}");
        let e = run(&qs, &cs, &x, &b, &pos, &slots, [1, 1, 1]);
        assert!(e.contains("sum to 3, expected head_dim / 2 = 2"), "{e}");
        let e = run(&qs, &cs, &x, &b, &ints(&[1; 2], &[n]), &slots, [1, 0, 1]);
        assert!(e.contains("positions [2], expected [3, 2]"), "{e}");
        let e = run(&qs, &cs, &x, &b, &pos, &ints(&[0, 4], &[n]), [1, 0, 1]);
        assert!(e.contains("slot_mapping[1] = 4 is past the cache's 4 slots"), "{e}");
        let e = run(&qs, &[2, 2, kv, 6], &x, &b, &pos, &slots, [1, 0, 1]);
        assert!(e.contains("head dim of k_cache"), "{e}");
        let e = run(&[n, heads * d], &cs, &x, &b, &pos, &slots, [1, 0, 1]);
        assert!(e.contains("expected (n, heads, head_dim)"), "{e}");
    }
}
