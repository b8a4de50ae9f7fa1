//! Every op the Qwen2-VL forward pass needs, one file per family.
//!
//! Each op is one public function over `Tensor`s that runs on whichever
//! device its tensors live on: a CPU f32 reference (plain loops, rayon over
//! rows) or a CUDA launcher. Both take the same arguments, so the model code
//! is the same on both backends and the CPU version is the oracle that the
//! kernel suite (tests/kernels) checks every kernel against.
//!
//! Ops write into an `out` tensor the caller allocated (as in llm.c): a step
//! reuses its buffers, which a CUDA graph needs.

pub mod activation;
pub mod argmax;
pub mod attention;
pub mod bitmask;
pub mod embedding;
mod flash_decoding;
pub mod gemm;
pub mod kv_cache;
pub mod norm;
mod paged_attention;
pub mod qkv_rope;
pub mod rope;
pub mod sampling;
pub mod softmax;

/// Launch constants the launchers share with the kernels (`ATTN_WARPS`,
/// `FA_BN`, ...) and the head dims the attention kernels are compiled for
/// (`ATTN_HEAD_DIMS`): build.rs reads them out of csrc/ into this file, so
/// a launcher cannot disagree with its kernel (a constant it cannot read
/// fails the build, with or without nvcc).
pub(crate) mod launch_consts {
    include!(concat!(env!("OUT_DIR"), "/launch_consts.rs"));
}

use std::sync::Arc;

use crate::cuda::Gpu;
use crate::error::{Error, Result};
use crate::tensor::{DType, Storage, Tensor};

/// Where an op runs, decided by its tensors.
pub(crate) enum On {
    Cpu,
    Cuda(Arc<Gpu>),
}

/// All tensors must be on one device; returns which.
pub(crate) fn placement(op: &'static str, ts: &[&Tensor]) -> Result<On> {
    let mut gpu: Option<&Arc<Gpu>> = None;
    let mut cpu = false;
    for t in ts {
        match t.storage() {
            Storage::Cuda(b) => match gpu {
                Some(g) if !Arc::ptr_eq(g, b.gpu()) => return Err(Error::DeviceMismatch { op }),
                _ => gpu = Some(b.gpu()),
            },
            _ => cpu = true,
        }
    }
    match (gpu, cpu) {
        (Some(_), true) => Err(Error::DeviceMismatch { op }),
        (Some(g), false) => Ok(On::Cuda(g.clone())),
        (None, _) => Ok(On::Cpu),
    }
}

/// The common float dtype of `ts` (which must be one of bf16, f32 on a GPU).
pub(crate) fn float_dtype(op: &'static str, ts: &[&Tensor]) -> Result<DType> {
    let dt = ts[0].dtype();
    for t in ts {
        if t.dtype() != dt || !matches!(t.dtype(), DType::BF16 | DType::F32) {
            return Err(Error::DType {
                op,
                got: t.dtype(),
                supported: "bf16 or f32, the same for every float operand",
            });
        }
    }
    Ok(dt)
}

pub(crate) fn expect_dtype(op: &'static str, t: &Tensor, dt: DType) -> Result<()> {
    if t.dtype() != dt {
        return Err(Error::DType { op, got: t.dtype(), supported: dt.name() });
    }
    Ok(())
}

/// Host f32 data of a CPU tensor.
pub(crate) fn f32s<'a>(op: &'static str, t: &'a Tensor) -> Result<&'a [f32]> {
    match t.storage() {
        Storage::F32(v) => Ok(v),
        _ => Err(Error::DType { op, got: t.dtype(), supported: "f32 (host)" }),
    }
}

pub(crate) fn f32s_mut<'a>(op: &'static str, t: &'a mut Tensor) -> Result<&'a mut [f32]> {
    let dt = t.dtype();
    match t.storage_mut() {
        Storage::F32(v) => Ok(v),
        _ => Err(Error::DType { op, got: dt, supported: "f32 (host)" }),
    }
}

pub(crate) fn i32s<'a>(op: &'static str, t: &'a Tensor) -> Result<&'a [i32]> {
    match t.storage() {
        Storage::I32(v) => Ok(v),
        _ => Err(Error::DType { op, got: t.dtype(), supported: "i32 (host)" }),
    }
}

pub(crate) fn i32s_mut<'a>(op: &'static str, t: &'a mut Tensor) -> Result<&'a mut [i32]> {
    let dt = t.dtype();
    match t.storage_mut() {
        Storage::I32(v) => Ok(v),
        _ => Err(Error::DType { op, got: dt, supported: "i32 (host)" }),
    }
}

/// Device pointer of a GPU tensor (`placement` has already said it is one).
pub(crate) fn ptr(t: &Tensor) -> u64 {
    match t.storage() {
        Storage::Cuda(b) => b.ptr(),
        _ => 0,
    }
}

/// `op_dtype`, the kernel naming rule (`rms_norm_bf16`).
pub(crate) fn kernel(op: &str, dt: DType) -> String {
    format!("{op}_{}", dt.name())
}

/// Grid size covering `n` items with `per` per block, as the launcher's u32.
pub(crate) fn blocks(n: usize, per: usize) -> u32 {
    n.div_ceil(per).max(1) as u32
}

/// Threads for a one-block-per-row kernel: enough to cover the row once,
/// a multiple of 32, at most 1024.
pub(crate) fn row_threads(cols: usize) -> u32 {
    (cols.div_ceil(32) * 32).clamp(32, 1024) as u32
}

/// Rows and columns of a tensor viewed as [rows, last dim].
pub(crate) fn rows_cols(t: &Tensor) -> (usize, usize) {
    let cols = t.shape().last().copied().unwrap_or(1);
    (if cols == 0 { 0 } else { t.numel() / cols }, cols)
}
