//! Argmax over the last dimension, compared exactly.

use kestrel::ops::argmax;
use kestrel::{DType, Device, Tensor};

use crate::harness::*;

/// torch.argmax, written independently of src/ops/argmax.rs: the first NaN
/// if there is one, else the first position of the maximum. Indices as f64.
fn argmax_ref(x: &[f32], cols: usize) -> Vec<f64> {
    x.chunks(cols)
        .map(|row| {
            if let Some(i) = row.iter().position(|v| v.is_nan()) {
                return i as f64;
            }
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            row.iter().position(|&v| v == m).unwrap() as f64
        })
        .collect()
}

/// Runs argmax on the CPU and, when there is one, the GPU; exact checks.
fn check(label: &str, dt: DType, rows: usize, cols: usize, xd: &[f32], gpu: Option<&Device>) -> Vec<Row> {
    let r64 = argmax_ref(xd, cols);
    let (xc, xg) = split(gpu, &[rows, cols], xd, dt);
    let mut oc = Tensor::empty(&Device::Cpu, &[rows], DType::I32).unwrap();
    argmax::argmax(&mut oc, &xc).unwrap();
    let cpu: Vec<f64> = oc.to_i32_vec().unwrap().iter().map(|&i| i as f64).collect();
    let mut out = vec![check_exact("cpu", "argmax", label, dt, &cpu, &r64)];
    if let Some(g) = gpu {
        let mut o = poisoned(g, &[rows], DType::I32);
        argmax::argmax(&mut o, xg.as_ref().unwrap()).unwrap();
        let got: Vec<f64> = o.to_i32_vec().unwrap().iter().map(|&i| i as f64).collect();
        out.push(check_exact("gpu", "argmax", label, dt, &got, &r64));
    }
    out
}

pub fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    // 1, 3 and 64 sequences (batched greedy decode) over the 2B vocabulary,
    // and short rows. 64 rows of the vocabulary are 10M values, slow to draw
    // and check in a debug build: that shape runs in bf16 (the serving dtype)
    // only, and its rows are rotations of one drawn row.
    for (rows, cols) in [(1, 7), (3, 7), (64, 7), (3, 769), (1, 151936), (3, 151936), (64, 151936)] {
        v.push(Case::new(format!("argmax {rows}x{cols}"), move |gpu, rng| {
            let mut rows_out = Vec::new();
            let dts: &[DType] = if rows * cols > 1 << 20 { &[DType::BF16] } else { &FLOAT_DTYPES };
            for &dt in dts {
                // Logit-like values; bf16 rounding makes natural ties too.
                let mut draw = |n: usize| round_to(&(0..n).map(|_| rng.uniform(-20.0, 20.0)).collect::<Vec<_>>(), dt);
                let mut xd = if rows * cols > 1 << 20 {
                    let base = draw(cols);
                    let mut xd = Vec::with_capacity(rows * cols);
                    for _ in 0..rows {
                        let k = rng.below(cols);
                        xd.extend_from_slice(&base[k..]);
                        xd.extend_from_slice(&base[..k]);
                    }
                    xd
                } else {
                    draw(rows * cols)
                };
                for row in xd.chunks_mut(cols) {
                    // Copy the max to an earlier and a later index: the earlier one must win.
                    let p = (0..cols).fold(0, |b, c| if row[c] > row[b] { c } else { b });
                    if p > 0 {
                        row[rng.below(p)] = row[p];
                    }
                    if p + 1 < cols {
                        row[p + 1 + rng.below(cols - p - 1)] = row[p];
                    }
                }
                if rows >= 3 {
                    // Row 1: two NaNs, the first of them wins (as in torch).
                    xd[cols + 2 * cols / 3] = f32::NAN;
                    xd[cols + cols / 3] = f32::NAN;
                }
                rows_out.extend(check(&format!("{rows}x{cols}"), dt, rows, cols, &xd, gpu));
            }
            rows_out
        }));
    }
    v.push(Case::new("argmax specials", |gpu, _| {
        let (inf, nan) = (f32::INFINITY, f32::NAN);
        #[rustfmt::skip]
        let xd = [
            -inf, -inf, -inf, -inf, -inf, -inf, -inf, // all −∞: 0
            -0.0, 0.0, -1.0, 0.0, -0.0, -3.0, -2.0,   // −0 and +0 tie: 0
            1.0, inf, 2.0, inf, nan, 3.0, 4.0,        // NaN beats +∞: 4
            5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0,        // all equal: 0
            -inf, -inf, -inf, -inf, -inf, -inf, -5.0, // one finite: 6
            1.0, 2.0, 3.0, 4.0, 5.0, 6.0, nan,        // NaN last: 6
        ];
        FLOAT_DTYPES.iter().flat_map(|&dt| check("6x7 specials", dt, 6, 7, &xd, gpu)).collect()
    }));
    v
}
