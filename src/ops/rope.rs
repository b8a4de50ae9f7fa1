//! Rotary position embeddings, applied in place to q or k laid out
//! (tokens, heads, head_dim): 1-D RoPE (Qwen2 LM), M-RoPE (Qwen2-VL LM),
//! RoPE from per-sequence frequency tables (Phi-3's longrope) and the 2-D
//! RoPE of the Qwen2-VL vision tower. Kernels: csrc/rope.cu.
//!
//! All three use the rotate_half (GPT-NeoX) layout of transformers
//! `rotate_half` (modeling_qwen2_vl.py): with half = head_dim / 2, element
//! i < half pairs with i + half and both turn by the same angle a_i:
//!
//! ```text
//! x'[i]        = x[i] cos a_i − x[i + half] sin a_i
//! x'[i + half] = x[i + half] cos a_i + x[i] sin a_i
//! ```
//!
//! which is HF's `x * cos + rotate_half(x) * sin` with `cos = cat(cos a, cos a)`.
//! The ops differ only in a_i. As in HF, inv_freq and the angle pos · inv_freq
//! are f32 (HF multiplies them in f32 with autocast off); inv_freq is the
//! correctly rounded f32 of theta^(−e), computed in f64 on both backends so
//! that the CPU and the kernel form the same f32 angle. Unlike HF's LM path,
//! which rounds cos/sin to the activation dtype before the multiply, the
//! rotation here is done in f32 and only the result is rounded to bf16.
//!
//! Positions are not range-checked (that would need a device read); any i32 is
//! a valid angle.

use rayon::prelude::*;

use super::{expect_dtype, f32s_mut, float_dtype, i32s, kernel, placement, ptr, On};
use crate::cuda::Arg;
use crate::ensure_shape;
use crate::error::Result;
use crate::tensor::{DType, Tensor};

/// theta^(−i/n) for i in 0..n, in f64 and rounded to f32. The f32 exponent
/// i/n would carry a rounding error that ln(theta) (≈ 14 for 1e6) amplifies
/// into several ulps; csrc/rope.cu computes the same values the same way.
fn inv_freqs(theta: f32, n: usize) -> Vec<f32> {
    (0..n).map(|i| (theta as f64).powf(-(i as f64) / n as f64) as f32).collect()
}

/// Where a decoder's RoPE takes its frequencies from.
#[derive(Clone, Copy)]
pub enum Freqs<'a> {
    /// theta^(−2i/head_dim): the default RoPE (and M-RoPE).
    Theta(f32),
    /// Per-sequence tables of inverse frequencies, `inv_freq` f32
    /// (tables, head_dim / 2), with cos and sin scaled by `mscale`: Phi-3's
    /// longrope (a short and a long table, [`longrope_tables`]). Token t
    /// reads table positions[1, t] (clamped into range) and turns by
    /// positions[0, t] · inv_freq; the M-RoPE sections must be
    /// [head_dim / 2, 0, 0].
    Table { inv_freq: &'a Tensor, mscale: f32 },
}

/// Inverse-frequency tables of longrope (transformers
/// `_compute_longrope_parameters`, Phi-3's `Phi3SuScaledRotaryEmbedding`):
/// table k holds 1 / (factors_k[i] · theta^(2i/head_dim)), computed in f64
/// and rounded to f32 like [`inv_freqs`]. Row-major (tables, head_dim / 2).
pub fn longrope_tables(theta: f32, factors: &[&[f32]]) -> Vec<f32> {
    factors
        .iter()
        .flat_map(|f| {
            let half = f.len();
            f.iter()
                .enumerate()
                .map(move |(i, &x)| (1.0 / (x as f64 * (theta as f64).powf(i as f64 / half as f64))) as f32)
        })
        .collect()
}

/// Checks x is (tokens, heads, head_dim) with an even head_dim, theta usable,
/// positions i32; returns (tokens, heads, half).
fn check(op: &'static str, x: &Tensor, positions: &Tensor, theta: f32) -> Result<(usize, usize, usize)> {
    let s = x.shape();
    ensure_shape!(s.len() == 3, op, "x {s:?}, expected (tokens, heads, head_dim)");
    let (tokens, heads, d) = (s[0], s[1], s[2]);
    ensure_shape!(d > 0 && d % 2 == 0, op, "head_dim {d} must be even and positive");
    ensure_shape!(tokens <= i32::MAX as usize && heads <= i32::MAX as usize, op, "too large: {s:?}");
    ensure_shape!(theta.is_finite() && theta > 0.0, op, "theta must be positive and finite, got {theta}");
    expect_dtype(op, positions, DType::I32)?;
    Ok((tokens, heads, d / 2))
}

/// The CPU reference: rotates the pair (i, i + half) of every head of token t
/// by `angle(t, i)`, in f32, one token per rayon task.
fn rotate_cpu(x: &mut [f32], heads: usize, half: usize, angle: impl Fn(usize, usize) -> f32 + Sync) {
    rotate_cpu_scaled(x, heads, half, 1.0, angle)
}

/// As [`rotate_cpu`], with cos and sin scaled by `mscale` (x · 1.0 is exact).
fn rotate_cpu_scaled(
    x: &mut [f32],
    heads: usize,
    half: usize,
    mscale: f32,
    angle: impl Fn(usize, usize) -> f32 + Sync,
) {
    let d = 2 * half;
    x.par_chunks_mut(heads * d).enumerate().for_each(|(t, xt)| {
        for i in 0..half {
            let (s, c) = angle(t, i).sin_cos();
            let (s, c) = (s * mscale, c * mscale);
            for xh in xt.chunks_mut(d) {
                let (a, b) = (xh[i], xh[i + half]);
                xh[i] = a * c - b * s;
                xh[i + half] = b * c + a * s;
            }
        }
    });
}

/// Threads per block: x over the half frequencies, y over heads, ~256 in all.
/// One thread per frequency (csrc/rope.cu), so the GPU takes head dims up to
/// 2048; the CPU any even one.
fn block_for(op: &'static str, half: usize, heads: usize) -> Result<(u32, u32, u32)> {
    ensure_shape!(half <= 1024, op, "head_dim {} is over 2048, the GPU kernel's limit", 2 * half);
    let ny = (256 / half).clamp(1, heads.max(1));
    Ok((half as u32, ny as u32, 1))
}

/// Qwen2 1-D RoPE, in place: a_i = pos[t] · theta^(−2i/head_dim).
/// x: (tokens, heads, head_dim), bf16 or f32; positions: i32 (tokens,).
///
/// Launches `rope_*` or `vision_rope_*`, which share their arguments
/// (x, positions, heads, half, theta) and their grid (a block per token).
fn launch_one_table(
    gpu: &crate::cuda::Gpu,
    op: &'static str,
    x: &Tensor,
    positions: &Tensor,
    heads: usize,
    half: usize,
    theta: f32,
) -> Result<()> {
    let dt = float_dtype(op, &[x])?;
    let tokens = x.shape()[0];
    let args =
        [Arg::Ptr(ptr(x)), Arg::Ptr(ptr(positions)), Arg::I32(heads as i32), Arg::I32(half as i32), Arg::F32(theta)];
    gpu.launch(&kernel(op, dt), (tokens as u32, 1, 1), block_for(op, half, heads)?, 0, &args)
}

/// Mirrors transformers `Qwen2VLRotaryEmbedding` (default rope init,
/// attention_scaling 1) + `apply_rotary_pos_emb` with equal position rows,
/// i.e. `mrope` with all three rows equal.
pub fn rope(x: &mut Tensor, positions: &Tensor, theta: f32) -> Result<()> {
    const OP: &str = "rope";
    let (tokens, heads, half) = check(OP, x, positions, theta)?;
    ensure_shape!(positions.shape() == [tokens], OP, "positions {:?}, expected [{tokens}]", positions.shape());
    let on = placement(OP, &[&*x, positions])?;
    if tokens == 0 || heads == 0 {
        return Ok(());
    }
    match on {
        On::Cpu => {
            let (pos, inv) = (i32s(OP, positions)?, inv_freqs(theta, half));
            rotate_cpu(f32s_mut(OP, x)?, heads, half, |t, i| pos[t] as f32 * inv[i]);
            Ok(())
        }
        On::Cuda(gpu) => launch_one_table(&gpu, OP, x, positions, heads, half, theta),
    }
}

/// Qwen2-VL multimodal RoPE (M-RoPE), in place.
/// x: (tokens, heads, head_dim), bf16 or f32; positions: i32 (3, tokens),
/// rows temporal, height, width (as transformers `get_rope_index` builds them);
/// `sections` (`mrope_section` in config.json, [16, 24, 24] for Qwen2-VL) must
/// sum to head_dim / 2.
///
/// a_i = pos[r(i), t] · theta^(−2i/head_dim), where r(i) = 0 for
/// i < s0, 1 for s0 ≤ i < s0 + s1, 2 after; the paired element i + half
/// uses the same angle.
///
/// Mirrors transformers `apply_multimodal_rotary_pos_emb`
/// (models/qwen2_vl/modeling_qwen2_vl.py) fed by `Qwen2VLRotaryEmbedding`:
/// HF builds cos/sin of shape (3, …, head_dim) from `emb = cat(freqs, freqs)`,
/// one slice per position row, splits the last dim by `mrope_section * 2`
/// ([16, 24, 24, 16, 24, 24]) and takes chunk k from row k % 3. Because the
/// second half of `emb` repeats the first, element i + half lands in the same
/// section as i: exactly r(i) above. Text tokens have three equal rows, which
/// makes this `rope`.
pub fn mrope(x: &mut Tensor, positions: &Tensor, sections: [usize; 3], theta: f32) -> Result<()> {
    const OP: &str = "mrope";
    let (tokens, heads, half) = check(OP, x, positions, theta)?;
    ensure_shape!(positions.shape() == [3, tokens], OP, "positions {:?}, expected [3, {tokens}]", positions.shape());
    let sum = sections.iter().sum::<usize>();
    ensure_shape!(sum == half, OP, "sections {sections:?} sum to {sum}, expected head_dim / 2 = {half}");
    let on = placement(OP, &[&*x, positions])?;
    if tokens == 0 || heads == 0 {
        return Ok(());
    }
    let (s0, s1) = (sections[0], sections[1]);
    match on {
        On::Cpu => {
            let (pos, inv) = (i32s(OP, positions)?, inv_freqs(theta, half));
            let row = |i: usize| {
                if i < s0 {
                    0
                } else if i < s0 + s1 {
                    1
                } else {
                    2
                }
            };
            rotate_cpu(f32s_mut(OP, x)?, heads, half, |t, i| pos[row(i) * tokens + t] as f32 * inv[i]);
            Ok(())
        }
        On::Cuda(gpu) => {
            let dt = float_dtype(OP, &[&*x])?;
            let args = [
                Arg::Ptr(ptr(x)),
                Arg::Ptr(ptr(positions)),
                Arg::I32(tokens as i32),
                Arg::I32(heads as i32),
                Arg::I32(half as i32),
                Arg::I32(s0 as i32),
                Arg::I32(s1 as i32),
                Arg::F32(theta),
            ];
            gpu.launch(&kernel(OP, dt), (tokens as u32, 1, 1), block_for(OP, half, heads)?, 0, &args)
        }
    }
}

/// RoPE from frequency tables, in place (see [`Freqs::Table`]).
/// x: (tokens, heads, head_dim), bf16 or f32; positions: i32 (3, tokens),
/// row 0 the position, row 1 the table; inv_freq: f32 (tables, head_dim / 2).
///
/// a_i = pos[0, t] · inv_freq[pos[1, t], i], and x' = x · (cos a · mscale)
/// + rotate_half(x) · (sin a · mscale): transformers `Phi3RotaryEmbedding`
/// with rope_type "longrope" (cos and sin times `attention_scaling`) and
/// `apply_rotary_pos_emb`, with the table fixed per sequence by the caller.
pub fn rope_table(x: &mut Tensor, positions: &Tensor, inv_freq: &Tensor, mscale: f32) -> Result<()> {
    const OP: &str = "rope_table";
    let (tokens, heads, half) = check(OP, x, positions, 1.0)?;
    ensure_shape!(positions.shape() == [3, tokens], OP, "positions {:?}, expected [3, {tokens}]", positions.shape());
    expect_dtype(OP, inv_freq, DType::F32)?;
    let ts = inv_freq.shape();
    ensure_shape!(
        ts.len() == 2 && ts[1] == half && ts[0] >= 1,
        OP,
        "inv_freq {ts:?}, expected (tables, head_dim / 2 = {half})"
    );
    ensure_shape!(mscale.is_finite(), OP, "mscale must be finite, got {mscale}");
    let tables = ts[0];
    let on = placement(OP, &[&*x, positions, inv_freq])?;
    if tokens == 0 || heads == 0 {
        return Ok(());
    }
    match on {
        On::Cpu => {
            let (pos, inv) = (i32s(OP, positions)?, super::f32s(OP, inv_freq)?);
            let table = |t: usize| (pos[tokens + t].clamp(0, tables as i32 - 1)) as usize;
            rotate_cpu_scaled(f32s_mut(OP, x)?, heads, half, mscale, |t, i| pos[t] as f32 * inv[table(t) * half + i]);
            Ok(())
        }
        On::Cuda(gpu) => {
            let dt = float_dtype(OP, &[&*x])?;
            let args = [
                Arg::Ptr(ptr(x)),
                Arg::Ptr(ptr(positions)),
                Arg::Ptr(ptr(inv_freq)),
                Arg::I32(tables as i32),
                Arg::I32(tokens as i32),
                Arg::I32(heads as i32),
                Arg::I32(half as i32),
                Arg::F32(mscale),
            ];
            gpu.launch(&kernel(OP, dt), (tokens as u32, 1, 1), block_for(OP, half, heads)?, 0, &args)
        }
    }
}

/// Qwen2-VL vision tower 2-D RoPE, in place.
/// x: (tokens, heads, head_dim), bf16 or f32, head_dim a multiple of 4 (80 in
/// the real model); positions: i32 (tokens, 2), the (row, col) of each patch.
///
/// With q = head_dim / 4 and inv_freq[j] = theta^(−j/q) = theta^(−4j/head_dim):
/// a_i = row · inv_freq[i] for i < q, col · inv_freq[i − q] for q ≤ i < half;
/// element i + half uses a_i.
///
/// Mirrors transformers (models/qwen2_vl/modeling_qwen2_vl.py)
/// `VisionRotaryEmbedding(head_dim // 2)` (theta 10000): its inv_freq is
/// `1 / theta^(arange(0, dim, 2) / dim)` with dim = head_dim / 2, i.e. q
/// entries theta^(−2j/dim); `Qwen2VisionTransformerPretrainedModel.rot_pos_emb`
/// gathers that table at the (h, w) position ids and flattens, giving
/// [row·inv_freq ‖ col·inv_freq] (half entries); `forward` doubles it with
/// `cat(emb, emb)` and `apply_rotary_pos_emb_vision` applies
/// `x * cos + rotate_half(x) * sin` in f32. Which patch gets which (row, col)
/// (rot_pos_emb's merge-window order) is the caller's business.
pub fn vision_rope(x: &mut Tensor, positions: &Tensor, theta: f32) -> Result<()> {
    const OP: &str = "vision_rope";
    let (tokens, heads, half) = check(OP, x, positions, theta)?;
    ensure_shape!(half % 2 == 0, OP, "head_dim {} must be a multiple of 4 (row and col halves)", 2 * half);
    ensure_shape!(positions.shape() == [tokens, 2], OP, "positions {:?}, expected [{tokens}, 2]", positions.shape());
    let on = placement(OP, &[&*x, positions])?;
    if tokens == 0 || heads == 0 {
        return Ok(());
    }
    match on {
        On::Cpu => {
            let q = half / 2;
            let (pos, inv) = (i32s(OP, positions)?, inv_freqs(theta, q));
            let angle = |t: usize, i: usize| {
                if i < q {
                    pos[2 * t] as f32 * inv[i]
                } else {
                    pos[2 * t + 1] as f32 * inv[i - q]
                }
            };
            rotate_cpu(f32s_mut(OP, x)?, heads, half, angle);
            Ok(())
        }
        On::Cuda(gpu) => launch_one_table(&gpu, OP, x, positions, heads, half, theta),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Device;

    fn t(data: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_f32(&Device::Cpu, shape, data, DType::F32).unwrap()
    }

    fn p(data: &[i32], shape: &[usize]) -> Tensor {
        Tensor::from_i32(&Device::Cpu, shape, data).unwrap()
    }

    fn close(got: &[f32], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((*g as f64 - w).abs() <= tol, "got {got:?}\nwant {want:?}");
        }
    }

    /// 2 tokens, 3 heads, head_dim 8: 48 distinct values.
    fn sample() -> Vec<f32> {
        (0..48).map(|i| (i as f32 * 0.37).sin() * 3.0 + 0.1).collect()
    }

    #[test]
    fn position_zero_is_identity() {
        let x0 = sample();
        for which in 0..3 {
            let mut x = t(&x0, &[2, 3, 8]);
            match which {
                0 => rope(&mut x, &p(&[0, 0], &[2]), 1e6).unwrap(),
                1 => mrope(&mut x, &p(&[0; 6], &[3, 2]), [1, 1, 2], 1e6).unwrap(),
                _ => vision_rope(&mut x, &p(&[0; 4], &[2, 2]), 1e4).unwrap(),
            }
            // cos 0 = 1 and sin 0 = 0 exactly: bit-identical.
            assert_eq!(x.to_f32_vec().unwrap(), x0, "op {which}");
        }
    }

    #[test]
    fn rope_quarter_turn_by_hand() {
        // head_dim 4, position 1, theta = 4/π²: inv_freq = [1, theta^(-1/2)] =
        // [1, π/2]. Pair (0, 2) turns by 1 rad, pair (1, 3) by 90°.
        // x = [1, 2, 3, 4]:
        //   x'[1] = 2·cos 90° − 4·sin 90° = −4,  x'[3] = 4·cos 90° + 2·sin 90° = 2
        //   x'[0] = 1·cos 1 − 3·sin 1 = 0.5403023 − 2.5244129 = −1.9841106
        //   x'[2] = 3·cos 1 + 1·sin 1 = 1.6209069 + 0.8414710 = 2.4623779
        let theta = 4.0 / (std::f32::consts::PI * std::f32::consts::PI);
        let mut x = t(&[1.0, 2.0, 3.0, 4.0], &[1, 1, 4]);
        rope(&mut x, &p(&[1], &[1]), theta).unwrap();
        close(&x.to_f32_vec().unwrap(), &[-1.9841106, -4.0, 2.4623779, 2.0], 2e-6);
    }

    #[test]
    fn rope_angles_add() {
        // Rotations compose: rope at 700 then at 300 is rope at 1000
        // (to the f32 angle error, ~1000·2⁻²⁴ rad, times |x| ≈ 3).
        let x0 = sample();
        let mut a = t(&x0, &[2, 3, 8]);
        rope(&mut a, &p(&[700, 5], &[2]), 1e4).unwrap();
        rope(&mut a, &p(&[300, 9], &[2]), 1e4).unwrap();
        let mut b = t(&x0, &[2, 3, 8]);
        rope(&mut b, &p(&[1000, 14], &[2]), 1e4).unwrap();
        let want: Vec<f64> = b.to_f32_vec().unwrap().iter().map(|&v| v as f64).collect();
        close(&a.to_f32_vec().unwrap(), &want, 1e-3);
    }

    #[test]
    fn mrope_with_equal_rows_is_rope() {
        let x0 = sample();
        let mut a = t(&x0, &[2, 3, 8]);
        mrope(&mut a, &p(&[17, 29001, 17, 29001, 17, 29001], &[3, 2]), [1, 1, 2], 1e6).unwrap();
        let mut b = t(&x0, &[2, 3, 8]);
        rope(&mut b, &p(&[17, 29001], &[2]), 1e6).unwrap();
        assert_eq!(a.to_f32_vec().unwrap(), b.to_f32_vec().unwrap());
    }

    #[test]
    fn mrope_sections_pick_rows() {
        // sections [1, 1, 2] at head_dim 8: frequency 0 reads row t, 1 reads
        // row h, 2 and 3 read row w. t = h = 0 leaves pairs (0, 4) and (1, 5)
        // alone; pairs (2, 6) and (3, 7) turn as rope at position w = 5.
        let x0 = sample();
        let mut a = t(&x0, &[2, 3, 8]);
        mrope(&mut a, &p(&[0, 0, 0, 0, 5, 5], &[3, 2]), [1, 1, 2], 1e6).unwrap();
        let mut b = t(&x0, &[2, 3, 8]);
        rope(&mut b, &p(&[5, 5], &[2]), 1e6).unwrap();
        let (a, b) = (a.to_f32_vec().unwrap(), b.to_f32_vec().unwrap());
        for (k, ((&got, &rot), &orig)) in a.iter().zip(&b).zip(&x0).enumerate() {
            let i = k % 4; // frequency of element k (k % 8 and its pair share it)
            assert_eq!(got, if i < 2 { orig } else { rot }, "element {k}");
        }
    }

    #[test]
    fn vision_rope_by_hand() {
        // head_dim 8: q = 2, theta 100 → inv_freq = [1, 100^(-1/2)] = [1, 0.1].
        // Patch (row 2, col 3): a = [2·1, 2·0.1, 3·1, 3·0.1] = [2, 0.2, 3, 0.3],
        // pair i with i + 4.
        let x0 = [1.0f32, -2.0, 0.5, 3.0, 4.0, 1.5, -1.0, 2.0];
        let mut x = t(&x0, &[1, 1, 8]);
        vision_rope(&mut x, &p(&[2, 3], &[1, 2]), 100.0).unwrap();
        let a = [2.0f64, 0.2, 3.0, 0.3];
        let mut want = [0f64; 8];
        for i in 0..4 {
            let (u, v) = (x0[i] as f64, x0[i + 4] as f64);
            want[i] = u * a[i].cos() - v * a[i].sin();
            want[i + 4] = v * a[i].cos() + u * a[i].sin();
        }
        close(&x.to_f32_vec().unwrap(), &want, 1e-6);
    }

    #[test]
    fn the_cpu_has_no_head_dim_limit() {
        // Past the GPU kernel's 2048 (a thread per frequency): the CPU rotates
        // it all; at position 0, exactly the identity.
        let x0: Vec<f32> = (0..2 * 2052).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut x = t(&x0, &[2, 1, 2052]);
        rope(&mut x, &p(&[0, 0], &[2]), 1e6).unwrap();
        assert_eq!(x.to_f32_vec().unwrap(), x0);
        rope(&mut x, &p(&[5, 9], &[2]), 1e6).unwrap();
        assert_ne!(x.to_f32_vec().unwrap(), x0);
    }

    #[test]
    fn shape_errors_are_errors_not_panics() {
        let err = |r: Result<()>| r.unwrap_err().to_string();
        let mut x = t(&[1.0; 12], &[2, 1, 6]);
        // head_dim 6 is fine for rope and mrope, but not a multiple of 4.
        let e = err(vision_rope(&mut x, &p(&[0; 4], &[2, 2]), 1e4));
        assert!(e.contains("multiple of 4"), "{e}");
        let e = err(rope(&mut x, &p(&[0; 3], &[3]), 1e6));
        assert!(e.contains("positions [3], expected [2]"), "{e}");
        let e = err(mrope(&mut x, &p(&[0; 6], &[3, 2]), [1, 1, 2], 1e6));
        assert!(e.contains("sum to 4, expected head_dim / 2 = 3"), "{e}");
        let e = err(mrope(&mut x, &p(&[0; 2], &[2]), [1, 1, 1], 1e6));
        assert!(e.contains("expected [3, 2]"), "{e}");
        let e = err(rope(&mut x, &t(&[0.0; 2], &[2]), 1e6));
        assert!(e.contains("dtype F32"), "{e}");
        let e = err(rope(&mut x, &p(&[0; 2], &[2]), 0.0));
        assert!(e.contains("theta"), "{e}");
        let mut odd = t(&[1.0; 6], &[2, 1, 3]);
        let e = err(rope(&mut odd, &p(&[0; 2], &[2]), 1e6));
        assert!(e.contains("head_dim 3 must be even"), "{e}");
        let mut flat = t(&[1.0; 8], &[2, 4]);
        let e = err(rope(&mut flat, &p(&[0; 2], &[2]), 1e6));
        assert!(e.contains("expected (tokens, heads, head_dim)"), "{e}");
        let mut ints = p(&[0; 8], &[2, 1, 4]);
        let e = err(rope(&mut ints, &p(&[0; 2], &[2]), 1e6));
        assert!(e.contains("I32"), "{e}");
    }
}
