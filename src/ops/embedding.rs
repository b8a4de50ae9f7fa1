//! Token embedding: a gather of table rows. Mirrors `nn.Embedding` as
//! transformers `Qwen2VLModel.embed_tokens` uses it. Kernel: csrc/embedding.cu.
//!
//! Ids outside [0, vocab) cannot be reported from a kernel, so both backends
//! define the same behaviour for them: that output row is written with zeros.
//! The engine validates ids on the host (tokenizer output, prompt checks)
//! before they get here; the zero row only keeps a bad id from reading out of
//! bounds.

use rayon::prelude::*;

use super::{expect_dtype, f32s, f32s_mut, float_dtype, i32s, kernel, placement, ptr, On};
use crate::cuda::Arg;
use crate::ensure_shape;
use crate::error::Result;
use crate::tensor::{DType, Tensor};

/// out[i, :] = table[ids[i], :], or zeros where ids[i] ∉ [0, vocab).
/// ids: i32 (n,); table: (vocab, hidden); out: (n, hidden). Bit exact.
pub fn embedding(out: &mut Tensor, ids: &Tensor, table: &Tensor) -> Result<()> {
    const OP: &str = "embedding";
    ensure_shape!(table.shape().len() == 2, OP, "table {:?}, expected (vocab, hidden)", table.shape());
    let (vocab, hidden) = (table.shape()[0], table.shape()[1]);
    ensure_shape!(ids.shape().len() == 1, OP, "ids {:?}, expected (n,)", ids.shape());
    let n = ids.shape()[0];
    ensure_shape!(out.shape() == [n, hidden], OP, "out {:?}, expected [{n}, {hidden}]", out.shape());
    ensure_shape!(hidden > 0, OP, "empty rows");
    ensure_shape!(
        vocab <= i32::MAX as usize && hidden <= i32::MAX as usize && n <= i32::MAX as usize,
        OP,
        "too large: {n} ids, table {vocab}x{hidden}"
    );
    expect_dtype(OP, ids, DType::I32)?;
    match placement(OP, &[out, ids, table])? {
        On::Cpu => {
            let (ids, table) = (i32s(OP, ids)?, f32s(OP, table)?);
            f32s_mut(OP, out)?.par_chunks_mut(hidden).zip(ids.par_iter()).for_each(|(o, &id)| {
                if id >= 0 && (id as usize) < vocab {
                    let at = id as usize * hidden;
                    o.copy_from_slice(&table[at..at + hidden]);
                } else {
                    o.fill(0.0);
                }
            });
            Ok(())
        }
        On::Cuda(gpu) => {
            let dt = float_dtype(OP, &[out, table])?;
            if n == 0 {
                return Ok(());
            }
            // One block per id; threads cover the row once in 16-byte words
            // (the kernel copies words when rows and pointers are aligned).
            let words = (hidden * dt.size()).div_ceil(16);
            let threads = (words.div_ceil(32) * 32).clamp(32, 1024) as u32;
            let args = [
                Arg::Ptr(ptr(out)),
                Arg::Ptr(ptr(ids)),
                Arg::Ptr(ptr(table)),
                Arg::I32(vocab as i32),
                Arg::I32(hidden as i32),
            ];
            gpu.launch(&kernel(OP, dt), (n as u32, 1, 1), (threads, 1, 1), 0, &args)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Device;

    #[test]
    fn gathers_rows_and_zeros_bad_ids() {
        let table = Tensor::from_f32(&Device::Cpu, &[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], DType::F32).unwrap();
        let ids = Tensor::from_i32(&Device::Cpu, &[6], &[2, 0, -1, 3, 2, i32::MIN]).unwrap();
        let mut out = Tensor::empty(&Device::Cpu, &[6, 2], DType::F32).unwrap();
        embedding(&mut out, &ids, &table).unwrap();
        let want = [5.0, 6.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 5.0, 6.0, 0.0, 0.0];
        assert_eq!(out.to_f32_vec().unwrap(), want);
    }

    #[test]
    fn shape_and_dtype_errors_are_errors_not_panics() {
        let table = Tensor::from_f32(&Device::Cpu, &[3, 2], &[0.0; 6], DType::F32).unwrap();
        let ids = Tensor::from_i32(&Device::Cpu, &[2], &[0, 1]).unwrap();
        let mut out = Tensor::empty(&Device::Cpu, &[2, 3], DType::F32).unwrap();
        let e = embedding(&mut out, &ids, &table).unwrap_err().to_string();
        assert!(e.contains("out [2, 3], expected [2, 2]"), "{e}");
        let fids = Tensor::from_f32(&Device::Cpu, &[2], &[0.0, 1.0], DType::F32).unwrap();
        let mut out = Tensor::empty(&Device::Cpu, &[2, 2], DType::F32).unwrap();
        let e = embedding(&mut out, &fids, &table).unwrap_err().to_string();
        assert!(e.contains("dtype F32"), "{e}");
    }
}
