//! The paged KV cache write: each new token's keys and values go into the
//! cache row its slot names. Mirrors vLLM's `reshape_and_cache_flash`
//! (csrc/cache_kernels.cu, which its FlashAttention backend calls before
//! attention), with one K and one V tensor per layer in flash-attn's paged
//! layout (num_blocks, block_size, n_kv_heads, head_dim).
//! `attention::paged_attention` reads what this writes. Kernel: csrc/kv_cache.cu.
//!
//! A slot is block * block_size + offset: a row of the cache viewed as
//! (num_blocks * block_size, n_kv_heads, head_dim). Negative slots are padding
//! and skipped on both devices. A slot past the cache is an error on the CPU;
//! on the GPU the slots are device data the launcher cannot read, so the
//! kernel skips such a token instead of writing outside the cache (the engine
//! builds slot mappings from its own block tables, so neither should happen).

use super::{expect_dtype, f32s, f32s_mut, float_dtype, i32s, kernel, placement, ptr, row_threads, On};
use crate::cuda::Arg;
use crate::ensure_shape;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

/// Writes token i's keys and values into cache row slot_mapping[i]; slots < 0 are skipped (padding).
///
/// k_cache, v_cache: (num_blocks, block_size, n_kv_heads, head_dim); k, v:
/// (n, n_kv_heads, head_dim); slot_mapping: i32 (n,). Slots must be distinct
/// (as vLLM's scheduler makes them): two tokens with one slot race on the GPU.
/// Any head dim; bf16 or f32 on the GPU (cache and k, v alike), f32 on the CPU.
/// Bit exact. The CPU path checks every slot is < num_blocks * block_size
/// before writing anything; the GPU kernel skips out-of-range slots (it cannot
/// report them), so bad device data cannot write outside the cache.
pub fn kv_cache_write(
    k_cache: &mut Tensor,
    v_cache: &mut Tensor,
    k: &Tensor,
    v: &Tensor,
    slot_mapping: &Tensor,
) -> Result<()> {
    const OP: &str = "kv_cache_write";
    let cs = k_cache.shape().to_vec();
    ensure_shape!(cs.len() == 4, OP, "k_cache {cs:?}, expected (num_blocks, block_size, n_kv_heads, head_dim)");
    ensure_shape!(v_cache.shape() == cs, OP, "v_cache {:?} != k_cache {cs:?}", v_cache.shape());
    ensure_shape!(k.shape().len() == 3, OP, "k {:?}, expected (n, n_kv_heads, head_dim)", k.shape());
    ensure_shape!(v.shape() == k.shape(), OP, "v {:?} != k {:?}", v.shape(), k.shape());
    ensure_shape!(
        k.shape()[1..] == cs[2..],
        OP,
        "k {:?} has other (n_kv_heads, head_dim) than the cache {cs:?}",
        k.shape()
    );
    let (n, row, num_slots) = (k.shape()[0], cs[2] * cs[3], cs[0] * cs[1]);
    expect_dtype(OP, slot_mapping, DType::I32)?;
    ensure_shape!(slot_mapping.shape() == [n], OP, "slot_mapping {:?}, expected [{n}]", slot_mapping.shape());
    ensure_shape!(
        n <= i32::MAX as usize && row <= i32::MAX as usize && num_slots <= i32::MAX as usize,
        OP,
        "too large: {n} tokens of {row} values, {num_slots} cache slots"
    );
    match placement(OP, &[k_cache, v_cache, k, v, slot_mapping])? {
        On::Cpu => {
            let slots = i32s(OP, slot_mapping)?;
            // Check every slot before writing any, so an error leaves the cache as it was.
            if let Some((i, &s)) = slots.iter().enumerate().find(|(_, &s)| s >= 0 && s as usize >= num_slots) {
                let (blocks, block_size) = (cs[0], cs[1]);
                let msg = format!(
                    "slot_mapping[{i}] = {s} is past the cache's {num_slots} slots ({blocks} blocks of {block_size})"
                );
                return Err(Error::Shape { op: OP, msg });
            }
            let (k, v) = (f32s(OP, k)?, f32s(OP, v)?);
            let (kc, vc) = (f32s_mut(OP, k_cache)?, f32s_mut(OP, v_cache)?);
            // In token order: with a repeated slot the last token wins (the GPU makes no promise).
            for (i, &s) in slots.iter().enumerate() {
                if let Ok(s) = usize::try_from(s) {
                    kc[s * row..][..row].copy_from_slice(&k[i * row..][..row]);
                    vc[s * row..][..row].copy_from_slice(&v[i * row..][..row]);
                }
            }
            Ok(())
        }
        On::Cuda(gpu) => {
            let dt = float_dtype(OP, &[k_cache, v_cache, k, v])?;
            if n == 0 || row == 0 {
                return Ok(());
            }
            // One block per token (grid-striding past 65535), threads covering a
            // row once in 16-byte words (the kernel copies words when it can).
            let words = (row * dt.size()).div_ceil(16);
            let args = [
                Arg::Ptr(ptr(k_cache)),
                Arg::Ptr(ptr(v_cache)),
                Arg::Ptr(ptr(k)),
                Arg::Ptr(ptr(v)),
                Arg::Ptr(ptr(slot_mapping)),
                Arg::I32(n as i32),
                Arg::I32(num_slots as i32),
                Arg::I32(row as i32),
            ];
            let grid = (n.min(65535) as u32, 1, 1);
            gpu.launch(&kernel(OP, dt), grid, (row_threads(words), 1, 1), 0, &args)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Device;

    fn t(data: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_f32(&Device::Cpu, shape, data, DType::F32).unwrap()
    }

    fn slots(s: &[i32]) -> Tensor {
        Tensor::from_i32(&Device::Cpu, &[s.len()], s).unwrap()
    }

    /// A cache of `blocks` blocks of 2 slots, 1 kv head of dim 2, filled with
    /// -1 (keys) and -2 (values), so untouched rows are easy to see.
    fn cache(blocks: usize) -> (Tensor, Tensor) {
        let n = blocks * 2 * 2;
        (t(&vec![-1.0; n], &[blocks, 2, 1, 2]), t(&vec![-2.0; n], &[blocks, 2, 1, 2]))
    }

    #[test]
    fn writes_rows_and_skips_negative_slots() {
        // 3 blocks of 2 slots = 6 rows; tokens 0..4 go to slots 5, (skip), 0, 3.
        let (mut kc, mut vc) = cache(3);
        let k = t(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], &[4, 1, 2]);
        let v = t(&[10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0], &[4, 1, 2]);
        kv_cache_write(&mut kc, &mut vc, &k, &v, &slots(&[5, -1, 0, 3])).unwrap();
        #[rustfmt::skip]
        let want_k = [5.0, 6.0, -1.0, -1.0, -1.0, -1.0, 7.0, 8.0, -1.0, -1.0, 1.0, 2.0];
        #[rustfmt::skip]
        let want_v = [50.0, 60.0, -2.0, -2.0, -2.0, -2.0, 70.0, 80.0, -2.0, -2.0, 10.0, 20.0];
        assert_eq!(kc.to_f32_vec().unwrap(), want_k);
        assert_eq!(vc.to_f32_vec().unwrap(), want_v);
        // All padding: nothing changes.
        kv_cache_write(&mut kc, &mut vc, &k, &v, &slots(&[-1, -7, i32::MIN, -1])).unwrap();
        assert_eq!(kc.to_f32_vec().unwrap(), want_k);
        // No tokens at all.
        let empty = t(&[], &[0, 1, 2]);
        kv_cache_write(&mut kc, &mut vc, &empty, &empty, &slots(&[])).unwrap();
        assert_eq!(vc.to_f32_vec().unwrap(), want_v);
    }

    #[test]
    fn bad_inputs_are_errors_and_leave_the_cache_alone() {
        let (mut kc, mut vc) = cache(2);
        let k = t(&[1.0, 2.0, 3.0, 4.0], &[2, 1, 2]);
        let before = kc.to_f32_vec().unwrap();
        // Slot 4 is past the 4 slots; slot 0 (valid, first) must not have been written.
        let e = kv_cache_write(&mut kc, &mut vc, &k, &k, &slots(&[0, 4])).unwrap_err().to_string();
        assert!(e.contains("slot_mapping[1] = 4 is past the cache's 4 slots (2 blocks of 2)"), "{e}");
        assert_eq!(kc.to_f32_vec().unwrap(), before);
        let e = kv_cache_write(&mut kc, &mut vc, &k, &k, &slots(&[0])).unwrap_err().to_string();
        assert!(e.contains("slot_mapping [1], expected [2]"), "{e}");
        let k3 = t(&[0.0; 6], &[2, 1, 3]);
        let e = kv_cache_write(&mut kc, &mut vc, &k3, &k3, &slots(&[0, 1])).unwrap_err().to_string();
        assert!(e.contains("other (n_kv_heads, head_dim) than the cache [2, 2, 1, 2]"), "{e}");
        let e = kv_cache_write(&mut kc, &mut vc, &k, &k3, &slots(&[0, 1])).unwrap_err().to_string();
        assert!(e.contains("v [2, 1, 3] != k [2, 1, 2]"), "{e}");
        let mut flat = t(&[0.0; 8], &[4, 2]);
        let e = kv_cache_write(&mut flat, &mut vc, &k, &k, &slots(&[0, 1])).unwrap_err().to_string();
        assert!(e.contains("expected (num_blocks, block_size, n_kv_heads, head_dim)"), "{e}");
        let (mut small, _) = cache(1);
        let e = kv_cache_write(&mut kc, &mut small, &k, &k, &slots(&[0, 1])).unwrap_err().to_string();
        assert!(e.contains("v_cache [1, 2, 1, 2] != k_cache [2, 2, 1, 2]"), "{e}");
        let fslots = t(&[0.0, 1.0], &[2]);
        let e = kv_cache_write(&mut kc, &mut vc, &k, &k, &fslots).unwrap_err().to_string();
        assert!(e.contains("dtype F32"), "{e}");
        assert_eq!(kc.to_f32_vec().unwrap(), before);
    }
}
