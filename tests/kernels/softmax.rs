//! Softmax over the last dimension.

use kestrel::ops::softmax;
use kestrel::{DType, Device, Tensor};

use crate::harness::*;

/// Softmax in f64, written independently of src/ops/softmax.rs.
fn softmax64(x: &[f64], cols: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(cols) {
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = row.iter().map(|v| (v - m).exp()).collect();
        let s: f64 = e.iter().sum();
        out.extend(e.iter().map(|v| v / s));
    }
    out
}

pub fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    // Rows of 1 and 7 elements, awkward widths, and the 2B vocabulary.
    for (rows, cols) in [(3, 1), (1, 7), (37, 7), (3, 769), (37, 1280), (1, 151936), (3, 151936)] {
        v.push(Case::new(format!("softmax {rows}x{cols}"), move |gpu, rng| {
            let mut rows_out = Vec::new();
            for dt in FLOAT_DTYPES {
                let shape = [rows, cols];
                // Logit-like scale.
                let mut xd = rng.normals(rows * cols, 5.0);
                if rows >= 3 && cols >= 2 {
                    // Row 1 masked: every third entry and the last are −∞.
                    for c in (0..cols).step_by(3).chain([cols - 1]) {
                        xd[cols + c] = f32::NEG_INFINITY;
                    }
                }
                if rows >= 3 {
                    // Row 2 shifted by 100: exp overflows f32 unless the max is subtracted.
                    for x in &mut xd[2 * cols..3 * cols] {
                        *x += 100.0;
                    }
                }
                let xd = round_to(&xd, dt);
                let label = format!("{rows}x{cols}");
                let (xc, xg) = split(gpu, &shape, &xd, dt);
                let mut oc = Tensor::empty(&Device::Cpu, &shape, DType::F32).unwrap();
                softmax::softmax(&mut oc, &xc).unwrap();
                let og = gpu.map(|g| {
                    let mut o = poisoned(g, &shape, dt);
                    softmax::softmax(&mut o, xg.as_ref().unwrap()).unwrap();
                    o.to_f32_vec().expect("download")
                });
                let r64 = softmax64(&widen(&xd), cols);
                rows_out.extend(rows_for("softmax", &label, dt, cols, &r64, &oc.to_f32_vec().unwrap(), og.as_deref()));
            }
            rows_out
        }));
    }
    v
}
