//! SiLU-and-mul, GELU (erf, tanh), QuickGELU, bias add, add.

use kestrel::ops::activation;
use kestrel::{DType, Device, Tensor};

use crate::harness::*;

// f64 formulations, written independently of src/ops/activation.rs.

/// erf by A&S 7.1.6: 2/√π · e^(−x²) · Σ 2ⁿ x^(2n+1) / (1·3·…·(2n+1)). Every
/// term has the sign of x, so nothing cancels; erfc(6) < 2.2e-17 beyond.
fn erf64(x: f64) -> f64 {
    if x.abs() >= 6.0 {
        return x.signum();
    }
    let x2 = x * x;
    let (mut t, mut s) = (x, x);
    for n in 1..400 {
        t *= 2.0 * x2 / (2 * n + 1) as f64;
        s += t;
        if t.abs() <= 1e-17 * s.abs() {
            break;
        }
    }
    std::f64::consts::FRAC_2_SQRT_PI * (-x2).exp() * s
}

fn sigmoid64(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn gelu64(x: f64) -> f64 {
    0.5 * x * (1.0 + erf64(x / 2f64.sqrt()))
}

fn gelu_tanh64(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
}

fn quick_gelu64(x: f64) -> f64 {
    x * sigmoid64(1.702 * x)
}

type Unary = fn(&mut Tensor, &Tensor) -> kestrel::Result<()>;
type Ref64 = fn(f64) -> f64;

/// Downloads a GPU output, if there is one.
fn gpu_out(t: &Option<Tensor>) -> Option<Vec<f32>> {
    t.as_ref().map(|t| t.to_f32_vec().expect("download"))
}

/// Large magnitudes (exp overflow in silu/sigmoid, erf and tanh saturated),
/// tiny ones and signed zeros. Exact in bf16.
const EXTREMES: [f32; 16] = [
    -100.0,
    -30.0,
    -10.0,
    -3.0,
    -1.0,
    -0.125,
    -1.0 / 1024.0,
    -0.0,
    0.0,
    1.0 / 1024.0,
    0.125,
    1.0,
    3.0,
    10.0,
    30.0,
    100.0,
];

/// One unary op on `xd` (before rounding) viewed as (rows, xd.len() / rows), both dtypes.
fn unary_rows(name: &str, rows: usize, op: Unary, f: Ref64, xd: &[f32], gpu: Option<&Device>) -> Vec<Row> {
    let mut rows_out = Vec::new();
    let shape = [rows, xd.len() / rows];
    let label = format!("{}x{}", shape[0], shape[1]);
    for dt in FLOAT_DTYPES {
        let xd = round_to(xd, dt);
        let (xc, xg) = split(gpu, &shape, &xd, dt);
        let mut oc = Tensor::empty(&Device::Cpu, &shape, DType::F32).unwrap();
        op(&mut oc, &xc).unwrap();
        let og = gpu.map(|g| {
            let mut o = poisoned(g, &shape, dt);
            op(&mut o, xg.as_ref().unwrap()).unwrap();
            o
        });
        let r64: Vec<f64> = xd.iter().map(|&v| f(v as f64)).collect();
        rows_out.extend(rows_for(name, &label, dt, 1, &r64, &oc.to_f32_vec().unwrap(), gpu_out(&og).as_deref()));
    }
    rows_out
}

pub fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    let unary: [(&'static str, Unary, Ref64); 3] = [
        ("gelu", activation::gelu, gelu64),
        ("gelu_tanh", activation::gelu_tanh, gelu_tanh64),
        ("quick_gelu", activation::quick_gelu, quick_gelu64),
    ];
    // 1, 3 and 37 tokens; an odd width, the ViT width, the 2B hidden size,
    // the 2B intermediate size.
    let sizes = [(1, 769), (3, 1280), (37, 1536), (3, 8960)];
    for (name, op, f) in unary {
        for (rows, cols) in sizes {
            v.push(Case::new(format!("{name} {rows}x{cols}"), move |gpu, rng| {
                // σ = 3 reaches the tails where erf/tanh saturate and exp is tiny.
                unary_rows(name, rows, op, f, &rng.normals(rows * cols, 3.0), gpu)
            }));
        }
        v.push(Case::new(format!("{name} extremes"), move |gpu, _| unary_rows(name, 1, op, f, &EXTREMES, gpu)));
    }

    // The MLP: I = 8960 for the 2B model, plus other widths; the last one
    // holds gates at the extremes.
    for (rows, inter) in [(1, 8960), (3, 769), (37, 1280), (3, 1536), (37, 8960), (3, EXTREMES.len())] {
        v.push(Case::new(format!("silu_and_mul {rows}x(2·{inter})"), move |gpu, rng| {
            let mut rows_out = Vec::new();
            for dt in FLOAT_DTYPES {
                let (xs, os) = ([rows, 2 * inter], [rows, inter]);
                let mut xd = rng.normals(rows * 2 * inter, 3.0);
                if inter == EXTREMES.len() {
                    // Gates at the extremes, ups 1.5.
                    for r in 0..rows {
                        xd[r * 2 * inter..(r * 2 + 1) * inter].copy_from_slice(&EXTREMES);
                        xd[(r * 2 + 1) * inter..(r + 1) * 2 * inter].fill(1.5);
                    }
                }
                let xd = round_to(&xd, dt);
                let label = format!("{rows}x(2·{inter})");
                let (xc, xg) = split(gpu, &xs, &xd, dt);
                let mut oc = Tensor::empty(&Device::Cpu, &os, DType::F32).unwrap();
                activation::silu_and_mul(&mut oc, &xc).unwrap();
                let og = gpu.map(|g| {
                    let mut o = poisoned(g, &os, dt);
                    activation::silu_and_mul(&mut o, xg.as_ref().unwrap()).unwrap();
                    o
                });
                let mut r64 = Vec::with_capacity(rows * inter);
                for row in xd.chunks(2 * inter) {
                    let (gate, up) = row.split_at(inter);
                    r64.extend(gate.iter().zip(up).map(|(&g, &u)| g as f64 * sigmoid64(g as f64) * u as f64));
                }
                rows_out.extend(rows_for(
                    "silu_and_mul",
                    &label,
                    dt,
                    1,
                    &r64,
                    &oc.to_f32_vec().unwrap(),
                    gpu_out(&og).as_deref(),
                ));
            }
            rows_out
        }));
    }

    for (rows, cols) in sizes {
        v.push(Case::new(format!("bias_add {rows}x{cols}"), move |gpu, rng| {
            let mut rows_out = Vec::new();
            for dt in FLOAT_DTYPES {
                let shape = [rows, cols];
                let xd = round_to(&rng.normals(rows * cols, 2.0), dt);
                let bd = round_to(&rng.normals(cols, 1.0), dt);
                let label = format!("{rows}x{cols}");
                let (mut xc, mut xg) = split(gpu, &shape, &xd, dt);
                let (bc, bg) = split(gpu, &[cols], &bd, dt);
                activation::bias_add(&mut xc, &bc).unwrap();
                if let Some(xg) = xg.as_mut() {
                    activation::bias_add(xg, bg.as_ref().unwrap()).unwrap();
                }
                let r64: Vec<f64> = xd.iter().enumerate().map(|(i, &x)| x as f64 + bd[i % cols] as f64).collect();
                rows_out.extend(rows_for(
                    "bias_add",
                    &label,
                    dt,
                    1,
                    &r64,
                    &xc.to_f32_vec().unwrap(),
                    gpu_out(&xg).as_deref(),
                ));
            }
            rows_out
        }));
        v.push(Case::new(format!("add {rows}x{cols}"), move |gpu, rng| {
            let mut rows_out = Vec::new();
            for dt in FLOAT_DTYPES {
                let shape = [rows, cols];
                let ad = round_to(&rng.normals(rows * cols, 2.0), dt);
                let bd = round_to(&rng.normals(rows * cols, 0.5), dt);
                let label = format!("{rows}x{cols}");
                let (ac, ag) = split(gpu, &shape, &ad, dt);
                let (bc, bg) = split(gpu, &shape, &bd, dt);
                let mut oc = Tensor::empty(&Device::Cpu, &shape, DType::F32).unwrap();
                activation::add(&mut oc, &ac, &bc).unwrap();
                let og = gpu.map(|g| {
                    let mut o = poisoned(g, &shape, dt);
                    activation::add(&mut o, ag.as_ref().unwrap(), bg.as_ref().unwrap()).unwrap();
                    o
                });
                let r64: Vec<f64> = ad.iter().zip(&bd).map(|(&a, &b)| a as f64 + b as f64).collect();
                rows_out.extend(rows_for(
                    "add",
                    &label,
                    dt,
                    1,
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
