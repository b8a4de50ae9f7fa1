//! Elementwise ops: the MLP activations and the adds around them.
//!
//! - `silu_and_mul`: the Qwen2 MLP, `down(silu(gate(x)) · up(x))`
//!   (transformers `Qwen2MLP`, modeling_qwen2_vl.py), on a fused [gate | up]
//!   projection as vLLM lays it out (`SiluAndMul`).
//! - `gelu`: exact erf GELU, torch `nn.GELU()` (Qwen2-VL `PatchMerger`).
//! - `gelu_tanh`: torch `nn.GELU(approximate="tanh")` (later model families).
//! - `quick_gelu`: transformers `QuickGELUActivation`, x·sigmoid(1.702x)
//!   (Qwen2-VL `VisionMlp`, `hidden_act: "quick_gelu"`).
//! - `bias_add`, `add`: bias rows and residual adds.
//!
//! Kernels (csrc/activation.cu) read T, compute in f32 with the accurate
//! `expf`/`erff`/`tanhf`, and round once to T. Note that torch in bf16 rounds
//! twice in `silu(gate) * up` (the activation, then the product); one rounding
//! is the more accurate of the two.

use rayon::prelude::*;

use super::{blocks, f32s, f32s_mut, float_dtype, kernel, placement, ptr, rows_cols, On};
use crate::cuda::Arg;
use crate::ensure_shape;
use crate::error::Result;
use crate::tensor::Tensor;

/// Threads per block of the elementwise kernels (one element per thread).
const THREADS: usize = 256;

/// The kernels index with `int` element counts (and size_t offsets).
fn check_len(op: &'static str, t: &Tensor) -> Result<()> {
    ensure_shape!(t.numel() <= i32::MAX as usize, op, "too large: {} elements", t.numel());
    Ok(())
}

// ----------------------------------------------------------------------------
// f32 scalar functions of the CPU reference (the kernels have their twins)

/// silu(g) = g·sigmoid(g) = g / (1 + e^(−g)); −0 for g → −∞ (e^(−g) = ∞), never NaN.
fn silu(g: f32) -> f32 {
    g / (1.0 + (-g).exp())
}

/// erf(x/√2) is taken in f64 and rounded: the f32 erf a libm would give at best.
fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x as f64 * std::f64::consts::FRAC_1_SQRT_2) as f32)
}

/// √(2/π), the constant of the tanh approximation.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;

fn gelu_tanh_f(x: f32) -> f32 {
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)).tanh())
}

fn quick_gelu_f(x: f32) -> f32 {
    x / (1.0 + (-1.702 * x).exp())
}

/// erf in f64 (Rust's `f64::erf` is unstable): the Maclaurin series below
/// |x| = 2.5 and the continued fraction of erfc above (Abramowitz & Stegun
/// 7.1.5 and 7.1.14); ±1 beyond 6, where erfc < 2.2e-17. Absolute error
/// ≲ 1e-15, so `erf(x as f64) as f32` is the f32 erf rounded to nearest
/// except at the rarest of ties: a better erff than CUDA's (≤ 2 ulp).
fn erf(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    let a = x.abs();
    let r = if a < 2.5 {
        // 2/√π Σ (−1)ⁿ a^(2n+1) / (n! (2n+1)); the largest term is ~16 at
        // a = 2.5, so cancellation costs under 2e-15.
        let (a2, mut p, mut sum) = (a * a, a, a);
        for n in 1..100 {
            p *= -a2 / n as f64;
            let t = p / (2 * n + 1) as f64;
            sum += t;
            if t.abs() <= 1e-17 * sum {
                break;
            }
        }
        sum * std::f64::consts::FRAC_2_SQRT_PI
    } else if a < 6.0 {
        // √π e^(a²) erfc(a) = 1/(a + (1/2)/(a + (2/2)/(a + (3/2)/(a + …)))),
        // evaluated from the tail; 60 levels converge to f64 precision at a = 2.5.
        let mut f = a;
        for k in (1..=60).rev() {
            f = a + (k as f64 / 2.0) / f;
        }
        1.0 - (-a * a).exp() / (std::f64::consts::PI.sqrt() * f)
    } else {
        1.0
    };
    r.copysign(x)
}

// ----------------------------------------------------------------------------
// Ops

/// out = x with `f` applied to every element (CPU) or kernel `op_dtype` (GPU).
fn unary(op: &'static str, out: &mut Tensor, x: &Tensor, f: fn(f32) -> f32) -> Result<()> {
    ensure_shape!(out.shape() == x.shape(), op, "out {:?} != x {:?}", out.shape(), x.shape());
    check_len(op, x)?;
    match placement(op, &[out, x])? {
        On::Cpu => {
            let x = f32s(op, x)?;
            f32s_mut(op, out)?.par_iter_mut().zip(x.par_iter()).for_each(|(o, &v)| *o = f(v));
            Ok(())
        }
        On::Cuda(gpu) => {
            let dt = float_dtype(op, &[out, x])?;
            let n = x.numel();
            if n == 0 {
                return Ok(());
            }
            let args = [Arg::Ptr(ptr(out)), Arg::Ptr(ptr(x)), Arg::I32(n as i32)];
            gpu.launch(&kernel(op, dt), (blocks(n, THREADS), 1, 1), (THREADS as u32, 1, 1), 0, &args)
        }
    }
}

/// out[r, c] = silu(x[r, c]) · x[r, I + c].  x: (rows, 2·I) holding [gate | up]
/// per row; out: (rows, I). Leading dimensions may be any, as long as they match.
pub fn silu_and_mul(out: &mut Tensor, x: &Tensor) -> Result<()> {
    const OP: &str = "silu_and_mul";
    let (rows, two_i) = rows_cols(x);
    let inter = two_i / 2;
    let xs = x.shape();
    ensure_shape!(!xs.is_empty() && two_i > 0 && two_i % 2 == 0, OP, "x {xs:?}: the last dim must be 2·I > 0");
    let want: Vec<usize> = xs[..xs.len() - 1].iter().copied().chain([inter]).collect();
    ensure_shape!(out.shape() == want, OP, "out {:?}, expected {want:?} for x {xs:?}", out.shape());
    check_len(OP, x)?;
    match placement(OP, &[out, x])? {
        On::Cpu => {
            let x = f32s(OP, x)?;
            f32s_mut(OP, out)?.par_chunks_mut(inter).zip(x.par_chunks(two_i)).for_each(|(o, xr)| {
                let (gate, up) = xr.split_at(inter);
                for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
                    *o = silu(g) * u;
                }
            });
            Ok(())
        }
        On::Cuda(gpu) => {
            let dt = float_dtype(OP, &[out, x])?;
            let n = rows * inter;
            if n == 0 {
                return Ok(());
            }
            let args = [Arg::Ptr(ptr(out)), Arg::Ptr(ptr(x)), Arg::I32(n as i32), Arg::I32(inter as i32)];
            gpu.launch(&kernel(OP, dt), (blocks(n, THREADS), 1, 1), (THREADS as u32, 1, 1), 0, &args)
        }
    }
}

/// out = 0.5·x·(1 + erf(x/√2)), torch `nn.GELU()`. out, x: same shape.
pub fn gelu(out: &mut Tensor, x: &Tensor) -> Result<()> {
    unary("gelu", out, x, gelu_erf)
}

/// out = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), torch `nn.GELU(approximate="tanh")`.
pub fn gelu_tanh(out: &mut Tensor, x: &Tensor) -> Result<()> {
    unary("gelu_tanh", out, x, gelu_tanh_f)
}

/// out = x·sigmoid(1.702·x), transformers `QuickGELUActivation`.
pub fn quick_gelu(out: &mut Tensor, x: &Tensor) -> Result<()> {
    unary("quick_gelu", out, x, quick_gelu_f)
}

/// x[r, :] += bias, in place.  x: (rows, cols); bias: (cols,).
pub fn bias_add(x: &mut Tensor, bias: &Tensor) -> Result<()> {
    const OP: &str = "bias_add";
    let (rows, cols) = rows_cols(x);
    ensure_shape!(cols > 0, OP, "empty rows");
    ensure_shape!(bias.shape() == [cols], OP, "bias {:?}, expected [{cols}]", bias.shape());
    check_len(OP, x)?;
    match placement(OP, &[x, bias])? {
        On::Cpu => {
            let b = f32s(OP, bias)?;
            f32s_mut(OP, x)?.par_chunks_mut(cols).for_each(|r| {
                for (v, &bv) in r.iter_mut().zip(b) {
                    *v += bv;
                }
            });
            Ok(())
        }
        On::Cuda(gpu) => {
            let dt = float_dtype(OP, &[x, bias])?;
            let n = rows * cols;
            if n == 0 {
                return Ok(());
            }
            let args = [Arg::Ptr(ptr(x)), Arg::Ptr(ptr(bias)), Arg::I32(n as i32), Arg::I32(cols as i32)];
            gpu.launch(&kernel(OP, dt), (blocks(n, THREADS), 1, 1), (THREADS as u32, 1, 1), 0, &args)
        }
    }
}

/// out = a + b, elementwise; out, a, b: the same shape.
///
/// `out` is a tensor distinct from `a` and `b` (the borrows guarantee it), so
/// a residual add `h = h + y` writes into a second buffer and swaps. The
/// kernel itself would be correct in place (each thread reads its element
/// before writing it, and the pointers are not `__restrict__`), should an
/// in-place entry point be wanted later.
pub fn add(out: &mut Tensor, a: &Tensor, b: &Tensor) -> Result<()> {
    const OP: &str = "add";
    ensure_shape!(out.shape() == a.shape(), OP, "out {:?} != a {:?}", out.shape(), a.shape());
    ensure_shape!(b.shape() == a.shape(), OP, "b {:?} != a {:?}", b.shape(), a.shape());
    check_len(OP, a)?;
    match placement(OP, &[out, a, b])? {
        On::Cpu => {
            let (a, b) = (f32s(OP, a)?, f32s(OP, b)?);
            f32s_mut(OP, out)?.par_iter_mut().zip(a.par_iter().zip(b.par_iter())).for_each(|(o, (&x, &y))| *o = x + y);
            Ok(())
        }
        On::Cuda(gpu) => {
            let dt = float_dtype(OP, &[out, a, b])?;
            let n = a.numel();
            if n == 0 {
                return Ok(());
            }
            let args = [Arg::Ptr(ptr(out)), Arg::Ptr(ptr(a)), Arg::Ptr(ptr(b)), Arg::I32(n as i32)];
            gpu.launch(&kernel(OP, dt), (blocks(n, THREADS), 1, 1), (THREADS as u32, 1, 1), 0, &args)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::{DType, Device};

    fn t(data: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_f32(&Device::Cpu, shape, data, DType::F32).unwrap()
    }

    fn empty(shape: &[usize]) -> Tensor {
        Tensor::empty(&Device::Cpu, shape, DType::F32).unwrap()
    }

    fn close(got: &[f32], want: &[f64]) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((*g as f64 - w).abs() <= 2e-7 * w.abs().max(1.0), "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn erf_known_values() {
        // Values from Python's math.erf / math.erfc.
        for (x, e) in [(0.5, 0.5204998778130465), (1.0, 0.8427007929497149), (2.0, 0.9953222650189527)] {
            assert!((erf(x) - e).abs() < 1e-15, "erf({x}) = {}", erf(x));
            assert!((erf(-x) + e).abs() < 1e-15);
        }
        // Either side of the switch to the continued fraction; erfc(3) checks the tail.
        assert!((1.0 - erf(3.0) - 2.2090496998585438e-05).abs() < 2e-16);
        assert!((erf(2.4999999) - erf(2.5000001)).abs() < 1e-7);
        // Around the switch and into the tail: 1 − erf against math.erfc.
        for (x, c) in [
            (2.4, 0.0006885138966450789),
            (2.5, 0.0004069520174449589),
            (2.6, 0.00023603441652934908),
            (3.5, 7.430983723414128e-07),
            (4.5, 1.9661604415428873e-10),
            (5.5, 7.357847917974398e-15),
        ] {
            assert!((1.0 - erf(x) - c).abs() < 3e-16, "erf({x}) = {}", erf(x));
        }
        assert_eq!(erf(7.0), 1.0);
        assert_eq!(erf(0.0), 0.0);
        assert!(erf(f64::NAN).is_nan());
    }

    #[test]
    fn silu_and_mul_by_hand() {
        // sigmoid(ln 3) = 3/4, sigmoid(−ln 3) = 1/4.  x = [gate | up] per row.
        let l3 = 3f32.ln();
        let x = t(&[0.0, l3, -l3, 7.0, 4.0, 4.0, -200.0, 1.0, 1.0, 5.0, 1.0, 1.0], &[2, 6]);
        let mut out = empty(&[2, 3]);
        silu_and_mul(&mut out, &x).unwrap();
        let l3 = 3f64.ln();
        let s1 = 1.0 / (1.0 + (-1.0f64).exp());
        close(&out.to_f32_vec().unwrap(), &[0.0, 3.0 * l3, -l3, 0.0, s1, s1]);
        // e^200 overflows f32: silu(−200) must be −0, not NaN.
        assert_eq!(out.to_f32_vec().unwrap()[3], 0.0);
    }

    #[test]
    fn gelus_by_hand() {
        let x = t(&[0.0, 1.0, -1.0, 30.0, -30.0], &[5]);
        let mut out = empty(&[5]);
        // gelu(1) = Φ(1), gelu(−1) = −Φ(−1).
        gelu(&mut out, &x).unwrap();
        close(&out.to_f32_vec().unwrap(), &[0.0, 0.8413447460685429, -0.15865525393145707, 30.0, 0.0]);
        // 0.5·(1 + tanh(√(2/π)·1.044715)), from Python.
        gelu_tanh(&mut out, &x).unwrap();
        close(&out.to_f32_vec().unwrap(), &[0.0, 0.8411919906082768, -0.1588080093917232, 30.0, 0.0]);
        // x = ln 3 / 1.702: sigmoid(1.702x) = 3/4.
        let v = (3f64.ln() / 1.702) as f32;
        quick_gelu(&mut out, &t(&[0.0, v, -v, 30.0, -30.0], &[5])).unwrap();
        let v = v as f64;
        close(&out.to_f32_vec().unwrap(), &[0.0, 0.75 * v, -0.25 * v, 30.0, -30.0 / (1.0 + (1.702f64 * 30.0).exp())]);
    }

    #[test]
    fn adds_by_hand() {
        let mut x = t(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]);
        bias_add(&mut x, &t(&[10.0, 20.0, 30.0], &[3])).unwrap();
        assert_eq!(x.to_f32_vec().unwrap(), vec![11.0, 22.0, 33.0, 14.0, 25.0, 36.0]);
        let mut out = empty(&[2, 3]);
        add(&mut out, &x, &t(&[-1.0, -2.0, -3.0, 0.5, 0.25, 0.125], &[2, 3])).unwrap();
        assert_eq!(out.to_f32_vec().unwrap(), vec![10.0, 20.0, 30.0, 14.5, 25.25, 36.125]);
    }

    #[test]
    fn shape_errors_are_errors_not_panics() {
        let mut out = empty(&[2, 3]);
        let e = silu_and_mul(&mut out, &t(&[1.0; 10], &[2, 5])).unwrap_err().to_string();
        assert!(e.contains("last dim must be 2·I"), "{e}");
        let e = silu_and_mul(&mut out, &t(&[1.0; 8], &[2, 4])).unwrap_err().to_string();
        assert!(e.contains("expected [2, 2]"), "{e}");
        let e = gelu(&mut out, &t(&[1.0; 6], &[3, 2])).unwrap_err().to_string();
        assert!(e.contains("out [2, 3] != x [3, 2]"), "{e}");
        let e = bias_add(&mut out, &t(&[1.0; 2], &[2])).unwrap_err().to_string();
        assert!(e.contains("bias [2], expected [3]"), "{e}");
        let e = add(&mut out, &t(&[1.0; 6], &[2, 3]), &t(&[1.0; 6], &[6])).unwrap_err().to_string();
        assert!(e.contains("b [6] != a [2, 3]"), "{e}");
    }
}
