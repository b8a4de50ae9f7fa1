//! RoPE, M-RoPE, table RoPE (Phi-3's longrope), vision 2-D RoPE (all in place).
//!
//! The ops rotate x in place, so the GPU tensor is the input itself and
//! cannot be poisoned. An element the kernel forgot to write keeps its input
//! value, which the comparison with the reference catches unless that
//! element's angle is 0 (position 0), where the input is the right answer.
//!
//! Tolerances. The op is elementwise, but its angle a = pos · inv_freq is
//! formed in f32 (as HF does): inv_freq rounded to f32 and the product
//! rounded again put an error of up to 2·|a|·2⁻²⁴ ≤ 2·pos·2⁻²⁴ rad in the
//! angle (inv_freq ≤ 1). Rotating a pair of norm r by a wrong angle moves each
//! output by up to angle error · r, and r ≤ √2 · max|ref| (a rotation keeps
//! the norm). So the CPU f32 reference legitimately differs from the f64 truth
//! by ~2√2 · pos_max · 2⁻²⁴ · max|ref|, plus a few ulps from sin/cos and
//! the products: that is `check_cpu`'s γₙ bound, 4·(n + 2)·2⁻²⁴ · max|ref|,
//! with n = the largest position in the case. For the GPU the baseline
//! mechanism covers it: the f32 kernel is held to 2× the CPU f32 reference's
//! own error against f64 (the kernel forms the same f32 angle: inv_freq in f64
//! rounded to f32, one f32 multiply), and the bf16 kernel to 2× the bf16
//! rounding of the CPU result.

use kestrel::ops::rope;
use kestrel::{Device, Tensor};

use crate::harness::*;

/// HF's inv_freq, `1 / theta^(arange(0, dim, 2) / dim)`, in f64 (dim / 2 values).
fn inv64(theta: f64, dim: usize) -> Vec<f64> {
    (0..dim).step_by(2).map(|k| 1.0 / theta.powf(k as f64 / dim as f64)).collect()
}

/// `cat(f, f)`: HF's `emb`.
fn cat2(f: Vec<f64>) -> Vec<f64> {
    [f.clone(), f].concat()
}

/// HF's application in f64, written independently of src/ops/rope.rs: per
/// token an angle vector `emb` of length head_dim, then
/// x · cos(emb) + rotate_half(x) · sin(emb), rotate_half(x) = cat(−x₂, x₁).
fn apply64(x: &[f64], heads: usize, d: usize, emb: impl Fn(usize) -> Vec<f64>) -> Vec<f64> {
    let mut out = Vec::with_capacity(x.len());
    for (t, xt) in x.chunks(heads * d).enumerate() {
        let e = emb(t);
        assert_eq!(e.len(), d);
        for xh in xt.chunks(d) {
            for k in 0..d {
                let rot = if k < d / 2 { -xh[k + d / 2] } else { xh[k - d / 2] };
                out.push(xh[k] * e[k].cos() + rot * e[k].sin());
            }
        }
    }
    out
}

/// 1-D RoPE: emb = cat(pos · inv_freq, pos · inv_freq).
fn rope64(x: &[f64], heads: usize, d: usize, pos: &[i32], theta: f64) -> Vec<f64> {
    let inv = inv64(theta, d);
    apply64(x, heads, d, |t| cat2(inv.iter().map(|f| pos[t] as f64 * f).collect()))
}

/// M-RoPE as `apply_multimodal_rotary_pos_emb`: one emb per position row
/// (t, h, w), the head dim split by `sections * 2`, chunk k taken from row k % 3.
pub fn mrope64(x: &[f64], heads: usize, d: usize, pos: &[i32], sections: [usize; 3], theta: f64) -> Vec<f64> {
    let tokens = pos.len() / 3;
    let inv = inv64(theta, d);
    apply64(x, heads, d, |t| {
        let rows: Vec<Vec<f64>> =
            (0..3).map(|r| cat2(inv.iter().map(|f| pos[r * tokens + t] as f64 * f).collect())).collect();
        let mut emb = Vec::with_capacity(d);
        for (k, &len) in sections.iter().chain(&sections).enumerate() {
            let start = emb.len();
            emb.extend_from_slice(&rows[k % 3][start..start + len]);
        }
        emb
    })
}

/// Longrope as transformers' `Phi3RotaryEmbedding` ("longrope"): the
/// token's table (position row 1) of inverse frequencies, emb = cat(pos ·
/// inv, pos · inv), cos and sin times `mscale`. `inv` is the f32 table as
/// the op gets it, widened: (tables, d / 2).
pub fn table64(x: &[f64], heads: usize, d: usize, pos: &[i32], inv: &[f32], mscale: f64) -> Vec<f64> {
    let (tokens, half) = (pos.len() / 3, d / 2);
    let tables = inv.len() / half;
    let scaled = apply64(x, heads, d, |t| {
        let sel = (pos[tokens + t].clamp(0, tables as i32 - 1)) as usize;
        cat2(inv[sel * half..][..half].iter().map(|&f| pos[t] as f64 * f as f64).collect())
    });
    // x·cos·m + rot·sin·m = m · (x·cos + rot·sin).
    scaled.iter().map(|v| v * mscale).collect()
}

/// Random longrope-like tables: factors in [1, 8), theta 1e4, 2 tables.
pub fn random_tables(rng: &mut Rng, half: usize) -> Vec<f32> {
    let f: Vec<Vec<f32>> = (0..2).map(|_| (0..half).map(|_| rng.uniform(1.0, 8.0)).collect()).collect();
    rope::longrope_tables(1e4, &[&f[0], &f[1]])
}

/// Vision RoPE as `VisionRotaryEmbedding(d / 2)` + `rot_pos_emb` + `cat(emb, emb)`:
/// the table row · inv_freq ‖ col · inv_freq, inv_freq over dim d / 2.
fn vision64(x: &[f64], heads: usize, d: usize, pos: &[i32], theta: f64) -> Vec<f64> {
    let inv = inv64(theta, d / 2);
    apply64(x, heads, d, |t| {
        let (row, col) = (pos[2 * t] as f64, pos[2 * t + 1] as f64);
        cat2(inv.iter().map(|f| row * f).chain(inv.iter().map(|f| col * f)).collect())
    })
}

/// Runs one in-place op on x (both dtypes) with fixed positions on the CPU and,
/// when there is one, the GPU, and checks both against `ref64`.
#[allow(clippy::too_many_arguments)]
fn check_op(
    gpu: Option<&Device>,
    rng: &mut Rng,
    op: &str,
    label: &str,
    shape: [usize; 3],
    pos: (&[usize], &[i32]),
    apply: &dyn Fn(&mut Tensor, &Tensor),
    ref64: &dyn Fn(&[f64]) -> Vec<f64>,
) -> Vec<Row> {
    let (pos_shape, pos) = pos;
    // The longest "reduction": the angle's error grows with the position (module doc).
    let n = pos.iter().map(|p| p.unsigned_abs() as usize).max().unwrap_or(0).max(1);
    let (pc, pg) = split_i32(gpu, pos_shape, pos);
    let mut rows = Vec::new();
    for dt in FLOAT_DTYPES {
        let xd = round_to(&rng.normals(shape.iter().product(), 1.0), dt);
        let (mut xc, mut xg) = split(gpu, &shape, &xd, dt);
        apply(&mut xc, &pc);
        if let (Some(xg), Some(pg)) = (xg.as_mut(), pg.as_ref()) {
            apply(xg, pg);
        }
        let got = xg.as_ref().map(|t| t.to_f32_vec().expect("download"));
        let r64 = ref64(&widen(&xd));
        rows.extend(rows_for(op, label, dt, n, &r64, &xc.to_f32_vec().unwrap(), got.as_deref()));
    }
    rows
}

fn positions(rng: &mut Rng, count: usize, below: usize) -> Vec<i32> {
    (0..count).map(|_| rng.below(below) as i32).collect()
}

pub fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    // Qwen2 LM: theta 1e6, positions up to 30000 (long prompts); one case with
    // a prefill's consecutive small positions, where the tolerance is tight.
    // Head dim 72 (36 frequencies: not a multiple of 32 threads) in each op.
    for (tokens, heads, d, below) in
        [(1, 12, 128, 30000), (3, 2, 64, 30000), (37, 16, 80, 30000), (300, 12, 128, 30000), (77, 16, 72, 30000)]
    {
        v.push(Case::new(format!("rope {tokens}x{heads}x{d}"), move |gpu, rng| {
            let (theta, pos) = (1e6f32, positions(rng, tokens, below));
            let label = format!("{tokens}x{heads}x{d} pos<{below}");
            let apply = |x: &mut Tensor, p: &Tensor| rope::rope(x, p, theta).unwrap();
            let r64 = |x: &[f64]| rope64(x, heads, d, &pos, theta as f64);
            check_op(gpu, rng, "rope", &label, [tokens, heads, d], (&[tokens], &pos), &apply, &r64)
        }));
    }
    v.push(Case::new("rope 300x2x64 prefill", |gpu, rng| {
        let (tokens, heads, d, theta) = (300, 2, 64, 1e6f32);
        let pos: Vec<i32> = (1..=tokens as i32).collect();
        let apply = |x: &mut Tensor, p: &Tensor| rope::rope(x, p, theta).unwrap();
        let r64 = |x: &[f64]| rope64(x, heads, d, &pos, theta as f64);
        check_op(gpu, rng, "rope", "300x2x64 pos 1..=300", [tokens, heads, d], (&[tokens], &pos), &apply, &r64)
    }));

    // Qwen2-VL LM: the real sections at head_dim 128, splits of the same shape
    // at 64 and 80; three independent position rows.
    for (tokens, heads, d, sections) in [
        (1, 12, 128, [16, 24, 24]),
        (3, 2, 64, [8, 12, 12]),
        (37, 16, 80, [10, 15, 15]),
        (300, 2, 128, [16, 24, 24]),
        (77, 8, 72, [8, 14, 14]),
    ] {
        v.push(Case::new(format!("mrope {tokens}x{heads}x{d}"), move |gpu, rng| {
            let (theta, pos) = (1e6f32, positions(rng, 3 * tokens, 30000));
            let label = format!("{tokens}x{heads}x{d} {sections:?}");
            let apply = |x: &mut Tensor, p: &Tensor| rope::mrope(x, p, sections, theta).unwrap();
            let r64 = |x: &[f64]| mrope64(x, heads, d, &pos, sections, theta as f64);
            check_op(gpu, rng, "mrope", &label, [tokens, heads, d], (&[3, tokens], &pos), &apply, &r64)
        }));
    }

    // Phi-3.5 longrope: head dim 96 (the real one) and awkward ones; row 1
    // picks the table per token (out-of-range picks are clamped), positions
    // up to 30000, the real attention factor √(1 + ln 32 / ln 4096).
    for (tokens, heads, d) in [(1, 32, 96), (37, 3, 96), (300, 2, 64), (77, 5, 72)] {
        v.push(Case::new(format!("rope_table {tokens}x{heads}x{d}"), move |gpu, rng| {
            let mut pos = positions(rng, 3 * tokens, 30000);
            for t in 0..tokens {
                pos[tokens + t] = [0, 1, 1, 0, -3, 7][rng.below(6)];
            }
            let inv = random_tables(rng, d / 2);
            let mscale = (1.0 + 32f64.ln() / 4096f64.ln()).sqrt();
            let label = format!("{tokens}x{heads}x{d} 2 tables");
            let apply = |x: &mut Tensor, p: &Tensor| {
                let t = Tensor::from_f32(&x.device(), &[2, d / 2], &inv, kestrel::DType::F32).unwrap();
                rope::rope_table(x, p, &t, mscale as f32).unwrap()
            };
            let r64 = |x: &[f64]| table64(x, heads, d, &pos, &inv, mscale as f32 as f64);
            check_op(gpu, rng, "rope_table", &label, [tokens, heads, d], (&[3, tokens], &pos), &apply, &r64)
        }));
    }

    // Qwen2-VL vision tower: theta 1e4, (row, col) below 100; head_dim 80 is
    // the real model's.
    for (tokens, heads, d) in [(1, 16, 80), (3, 2, 64), (37, 16, 80), (300, 12, 128), (77, 16, 72)] {
        v.push(Case::new(format!("vision_rope {tokens}x{heads}x{d}"), move |gpu, rng| {
            let (theta, pos) = (1e4f32, positions(rng, 2 * tokens, 100));
            let label = format!("{tokens}x{heads}x{d}");
            let apply = |x: &mut Tensor, p: &Tensor| rope::vision_rope(x, p, theta).unwrap();
            let r64 = |x: &[f64]| vision64(x, heads, d, &pos, theta as f64);
            check_op(gpu, rng, "vision_rope", &label, [tokens, heads, d], (&[tokens, 2], &pos), &apply, &r64)
        }));
    }
    v
}
