//! RMSNorm, residual-add + RMSNorm, LayerNorm.

use kestrel::ops::norm;
use kestrel::{DType, Device, Tensor};

use crate::harness::*;

/// f64 formulations, written independently of src/ops/norm.rs.
fn rms64(x: &[f64], w: &[f64], cols: usize, eps: f64) -> Vec<f64> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(cols) {
        let ms = row.iter().map(|v| v * v).sum::<f64>() / cols as f64;
        let r = 1.0 / (ms + eps).sqrt();
        out.extend(row.iter().zip(w).map(|(v, g)| v * r * g));
    }
    out
}

fn ln64(x: &[f64], w: &[f64], b: &[f64], cols: usize, eps: f64) -> Vec<f64> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(cols) {
        let mean = row.iter().sum::<f64>() / cols as f64;
        let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / cols as f64;
        let r = 1.0 / (var + eps).sqrt();
        out.extend(row.iter().enumerate().map(|(i, v)| (v - mean) * r * w[i] + b[i]));
    }
    out
}

/// Downloads a GPU output, if there is one.
fn gpu_out(t: &Option<Tensor>) -> Option<Vec<f32>> {
    t.as_ref().map(|t| t.to_f32_vec().expect("download"))
}

pub fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    // 1 and 3 tokens, an odd hidden size, the 2B hidden size, the ViT width.
    for (rows, cols) in [(1, 769), (3, 769), (7, 1536), (37, 1280), (2, 3584)] {
        v.push(Case::new(format!("rms_norm {rows}x{cols}"), move |gpu, rng| {
            let mut rows_out = Vec::new();
            for dt in FLOAT_DTYPES {
                let shape = [rows, cols];
                let xd = round_to(&rng.normals(rows * cols, 2.0), dt);
                let wd = round_to(&rng.normals(cols, 1.0), dt);
                let (eps, label) = (1e-6f32, format!("{rows}x{cols}"));
                let (xc, xg) = split(gpu, &shape, &xd, dt);
                let (wc, wg) = split(gpu, &[cols], &wd, dt);
                let mut oc = Tensor::empty(&Device::Cpu, &shape, DType::F32).unwrap();
                norm::rms_norm(&mut oc, &xc, &wc, eps).unwrap();
                let og = gpu.map(|g| {
                    let mut o = poisoned(g, &shape, dt);
                    norm::rms_norm(&mut o, xg.as_ref().unwrap(), wg.as_ref().unwrap(), eps).unwrap();
                    o
                });
                let r64 = rms64(&widen(&xd), &widen(&wd), cols, eps as f64);
                rows_out.extend(rows_for(
                    "rms_norm",
                    &label,
                    dt,
                    cols,
                    &r64,
                    &oc.to_f32_vec().unwrap(),
                    gpu_out(&og).as_deref(),
                ));
            }
            rows_out
        }));
        v.push(Case::new(format!("add_rms_norm {rows}x{cols}"), move |gpu, rng| {
            let mut rows_out = Vec::new();
            for dt in FLOAT_DTYPES {
                let shape = [rows, cols];
                let xd = round_to(&rng.normals(rows * cols, 1.0), dt);
                let rd = round_to(&rng.normals(rows * cols, 3.0), dt);
                let wd = round_to(&rng.normals(cols, 1.0), dt);
                let (eps, label) = (1e-6f32, format!("{rows}x{cols}"));
                let (xc, xg) = split(gpu, &shape, &xd, dt);
                let (wc, wg) = split(gpu, &[cols], &wd, dt);
                let (mut rc, mut rg) = split(gpu, &shape, &rd, dt);
                let mut oc = Tensor::empty(&Device::Cpu, &shape, DType::F32).unwrap();
                norm::add_rms_norm(&mut oc, &mut rc, &xc, &wc, eps).unwrap();
                let og = gpu.map(|g| {
                    let mut o = poisoned(g, &shape, dt);
                    norm::add_rms_norm(&mut o, rg.as_mut().unwrap(), xg.as_ref().unwrap(), wg.as_ref().unwrap(), eps)
                        .unwrap();
                    o
                });
                // The residual sum: the kernel stores it in dt, so the reference
                // for the norm is the sum rounded to dt, as the model keeps it.
                let sum: Vec<f32> = xd.iter().zip(&rd).map(|(a, b)| a + b).collect();
                let sum_dt = round_to(&sum, dt);
                let r64 = rms64(&widen(&sum_dt), &widen(&wd), cols, eps as f64);
                let cpu_sum = rc.to_f32_vec().unwrap();
                rows_out.push(check_cpu("add_rms_norm.residual", &label, &cpu_sum, &widen(&sum), 1));
                if let Some(rg) = &rg {
                    let got = rg.to_f32_vec().unwrap();
                    rows_out.push(check_gpu("add_rms_norm.residual", &label, dt, &got, &widen(&sum), &widen(&sum_dt)));
                }
                // CPU reference on the dt-rounded sum, so both sides normalise the same numbers.
                let (rc2, _) = split(None, &shape, &sum_dt, dt);
                let mut oc2 = Tensor::empty(&Device::Cpu, &shape, DType::F32).unwrap();
                norm::rms_norm(&mut oc2, &rc2, &wc, eps).unwrap();
                if dt == DType::F32 {
                    rows_out.push(check_cpu("add_rms_norm", &label, &oc.to_f32_vec().unwrap(), &r64, cols));
                }
                rows_out.extend(rows_for(
                    "add_rms_norm",
                    &label,
                    dt,
                    cols,
                    &r64,
                    &oc2.to_f32_vec().unwrap(),
                    gpu_out(&og).as_deref(),
                ));
            }
            rows_out
        }));
        v.push(Case::new(format!("layer_norm {rows}x{cols}"), move |gpu, rng| {
            let mut rows_out = Vec::new();
            for dt in FLOAT_DTYPES {
                let shape = [rows, cols];
                // An offset mean makes the two-pass variance matter.
                let xd = round_to(&rng.normals(rows * cols, 1.5).iter().map(|x| x + 3.0).collect::<Vec<_>>(), dt);
                let wd = round_to(&rng.normals(cols, 1.0), dt);
                let bd = round_to(&rng.normals(cols, 0.5), dt);
                let (eps, label) = (1e-6f32, format!("{rows}x{cols}"));
                let (xc, xg) = split(gpu, &shape, &xd, dt);
                let (wc, wg) = split(gpu, &[cols], &wd, dt);
                let (bc, bg) = split(gpu, &[cols], &bd, dt);
                let mut oc = Tensor::empty(&Device::Cpu, &shape, DType::F32).unwrap();
                norm::layer_norm(&mut oc, &xc, &wc, &bc, eps).unwrap();
                let og = gpu.map(|g| {
                    let mut o = poisoned(g, &shape, dt);
                    norm::layer_norm(&mut o, xg.as_ref().unwrap(), wg.as_ref().unwrap(), bg.as_ref().unwrap(), eps)
                        .unwrap();
                    o
                });
                let r64 = ln64(&widen(&xd), &widen(&wd), &widen(&bd), cols, eps as f64);
                rows_out.extend(rows_for(
                    "layer_norm",
                    &label,
                    dt,
                    cols,
                    &r64,
                    &oc.to_f32_vec().unwrap(),
                    gpu_out(&og).as_deref(),
                ));
            }
            rows_out
        }));
    }
    v
}
