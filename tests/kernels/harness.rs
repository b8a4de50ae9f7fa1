//! The kernel suite's harness: random inputs, poisoned outputs, tolerances
//! from a baseline, and the table.
//!
//! Two checks per op and shape:
//! - `cpu`: the CPU f32 reference against an independent f64 formulation
//!   written in the test, within the textbook bound for f32 arithmetic
//!   (Higham's γₙ: relative error ≲ n·2⁻²⁴ for a reduction of length n).
//!   Runs everywhere, CI included.
//! - `gpu`: the kernel against the most precise reference we have (the CPU
//!   f32 reference for bf16 kernels, the f64 formulation for f32 kernels).
//!   Tolerance, after flash-attention's rule: at most 2× the max error of a
//!   naive implementation in the kernel's own precision (`baseline`), plus
//!   1e-6 of the largest |reference| for ties in rounding.

use kestrel::{DType, Device, Tensor};

/// SplitMix64: small, seedable, good enough for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit() as f32
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = self.unit().max(1e-300);
        let u2 = self.unit();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
    pub fn normals(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * scale).collect()
    }
    /// Uniform integer in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Rounds every value to `dt` (what the kernel's inputs hold).
pub fn round_to(v: &[f32], dt: DType) -> Vec<f32> {
    v.iter().map(|&x| dt.round(x)).collect()
}

pub fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// A poisoned (all bits set: NaN, or -1 for i32) output on `dev`.
pub fn poisoned(dev: &Device, shape: &[usize], dt: DType) -> Tensor {
    Tensor::poisoned(dev, shape, dt).expect("poisoned tensor")
}

pub struct Row {
    pub backend: &'static str,
    pub op: String,
    pub shape: String,
    pub dtype: &'static str,
    pub max_err: f64,
    pub tol: f64,
    pub rel_l2: f64,
    pub pass: bool,
}

fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0, |m, x| m.max(x.abs()))
}

/// Max |a − b| (∞ if any value is NaN or the lengths differ) and ‖a − b‖/‖b‖.
fn errors(got: &[f64], reference: &[f64]) -> (f64, f64) {
    if got.len() != reference.len() {
        return (f64::INFINITY, f64::INFINITY);
    }
    let (mut max, mut num, mut den) = (0.0f64, 0.0f64, 0.0f64);
    for (&g, &r) in got.iter().zip(reference) {
        let d = (g - r).abs();
        if d.is_nan() {
            return (f64::INFINITY, f64::INFINITY);
        }
        max = max.max(d);
        num += d * d;
        den += r * r;
    }
    (max, if den > 0.0 { (num / den).sqrt() } else { num.sqrt() })
}

/// CPU f32 reference against an f64 formulation; `n` is the longest
/// reduction an output element involves (1 for elementwise ops).
pub fn check_cpu(op: &str, shape: &str, cpu: &[f32], ref64: &[f64], n: usize) -> Row {
    let (max_err, rel_l2) = errors(&widen(cpu), ref64);
    // γ_n for f32 with a little room for the few rounded ops per element
    // (exp, rsqrt, division): 4·(n + 2)·2⁻²⁴ relative to the largest value.
    let tol = 4.0 * (n as f64 + 2.0) * f32::EPSILON as f64 / 2.0 * max_abs(ref64);
    Row { backend: "cpu", op: op.into(), shape: shape.into(), dtype: "f32", max_err, tol, rel_l2, pass: max_err <= tol }
}

/// A kernel against its reference, tolerance from `baseline` (see module doc).
pub fn check_gpu(op: &str, shape: &str, dt: DType, got: &[f32], reference: &[f64], baseline: &[f64]) -> Row {
    check_gpu_factor(op, shape, dt, got, reference, baseline, 2.0)
}

/// [`check_gpu`] with another factor over the baseline's error, for kernels
/// whose arithmetic the baseline cannot imitate (say why where it is used).
pub fn check_gpu_factor(
    op: &str,
    shape: &str,
    dt: DType,
    got: &[f32],
    reference: &[f64],
    baseline: &[f64],
    factor: f64,
) -> Row {
    let (max_err, rel_l2) = errors(&widen(got), reference);
    let (base_err, _) = errors(baseline, reference);
    let tol = factor * base_err + 1e-6 * max_abs(reference);
    Row {
        backend: "gpu",
        op: op.into(),
        shape: shape.into(),
        dtype: dt.name(),
        max_err,
        tol,
        rel_l2,
        pass: max_err <= tol,
    }
}

/// Exact comparison (gathers, indices): tolerance 0.
pub fn check_exact(backend: &'static str, op: &str, shape: &str, dt: DType, got: &[f64], reference: &[f64]) -> Row {
    let (max_err, rel_l2) = errors(got, reference);
    Row {
        backend,
        op: op.into(),
        shape: shape.into(),
        dtype: dt.name(),
        max_err,
        tol: 0.0,
        rel_l2,
        pass: max_err == 0.0,
    }
}

/// For bf16 kernels: the reference and its naive-bf16 baseline (the reference
/// with its output rounded to bf16), both widened.
pub fn bf16_ref_and_baseline(reference: &[f32]) -> (Vec<f64>, Vec<f64>) {
    (widen(reference), widen(&round_to(reference, DType::BF16)))
}

/// Runs an op on the GPU and on the CPU with the same inputs and checks both:
/// convenience for the usual case of one float output.
///
/// `ref64` is the independent f64 result, `cpu` the CPU reference's output,
/// `gpu` the kernel's output (downloaded, as f32), `n` the reduction length.
pub fn rows_for(
    op: &str,
    shape: &str,
    dt: DType,
    n: usize,
    ref64: &[f64],
    cpu: &[f32],
    gpu: Option<&[f32]>,
) -> Vec<Row> {
    let mut rows = vec![check_cpu(op, shape, cpu, ref64, n)];
    if let Some(g) = gpu {
        rows.push(match dt {
            DType::F32 => check_gpu(op, shape, dt, g, ref64, &widen(cpu)),
            _ => {
                let (r, b) = bf16_ref_and_baseline(cpu);
                check_gpu(op, shape, dt, g, &r, &b)
            }
        });
    }
    rows
}

/// One op family's checks at one shape. Gets the GPU when there is one and
/// returns its rows; a panic inside fails the case, not the suite.
pub struct Case {
    pub name: String,
    pub run: Box<dyn Fn(Option<&Device>, &mut Rng) -> Vec<Row>>,
}

impl Case {
    pub fn new(name: impl Into<String>, run: impl Fn(Option<&Device>, &mut Rng) -> Vec<Row> + 'static) -> Self {
        Case { name: name.into(), run: Box::new(run) }
    }
}

/// dtypes every float kernel is checked in.
pub const FLOAT_DTYPES: [DType; 2] = [DType::BF16, DType::F32];

/// The host tensor, and the device tensor when there is a GPU.
pub fn split(gpu: Option<&Device>, shape: &[usize], data: &[f32], dt: DType) -> (Tensor, Option<Tensor>) {
    let host = Tensor::from_f32(&Device::Cpu, shape, data, dt).expect("host tensor");
    (host, gpu.map(|g| Tensor::from_f32(g, shape, data, dt).expect("device tensor")))
}

pub fn split_i32(gpu: Option<&Device>, shape: &[usize], data: &[i32]) -> (Tensor, Option<Tensor>) {
    let host = Tensor::from_i32(&Device::Cpu, shape, data).expect("host tensor");
    (host, gpu.map(|g| Tensor::from_i32(g, shape, data).expect("device tensor")))
}
