//! Uploads of large host data (model weights) through pinned staging
//! buffers. A copy from pageable memory, which is what a memory-mapped
//! checkpoint is, goes through the driver's own small bounce buffers on one
//! thread at 1–3 GB/s; here the CPU side is a parallel memcpy into pinned
//! memory and the DMA runs at full PCIe speed, double-buffered so the two
//! overlap. This is most of what start-up costs.

use std::ffi::c_void;

use cudarc::driver::{result as drv, sys, CudaEvent, CudaStream};
use rayon::prelude::*;

use crate::error::Result;

/// Bytes per staging buffer (two of them).
const CHUNK: usize = 64 << 20;
/// Host copies are split into pieces of this size across the thread pool.
const PIECE: usize = 1 << 20;

struct Pinned {
    ptr: *mut u8,
    /// The DMA that last read this buffer.
    done: Option<CudaEvent>,
}

pub(super) struct Staging {
    bufs: [Pinned; 2],
    next: usize,
}

// The pinned buffers are only touched under the `Gpu`'s mutex.
unsafe impl Send for Staging {}

impl Staging {
    pub(super) fn new() -> Result<Self> {
        let alloc = || -> Result<Pinned> {
            let ptr = unsafe { drv::malloc_host(CHUNK, 0)? } as *mut u8;
            Ok(Pinned { ptr, done: None })
        };
        Ok(Self { bufs: [alloc()?, alloc()?], next: 0 })
    }

    /// Queues `src` to device address `dst`; returns when every byte of
    /// `src` has been copied into pinned memory (the DMA may still run).
    pub(super) fn upload(&mut self, stream: &CudaStream, dst: u64, src: &[u8]) -> Result<()> {
        for (i, part) in src.chunks(CHUNK).enumerate() {
            let buf = &mut self.bufs[self.next];
            self.next ^= 1;
            if let Some(e) = buf.done.take() {
                e.synchronize()?;
            }
            let pinned = unsafe { std::slice::from_raw_parts_mut(buf.ptr, part.len()) };
            pinned.par_chunks_mut(PIECE).zip(part.par_chunks(PIECE)).for_each(|(d, s)| d.copy_from_slice(s));
            unsafe {
                sys::cuMemcpyHtoDAsync_v2(
                    dst + (i * CHUNK) as u64,
                    buf.ptr as *const c_void,
                    part.len(),
                    stream.cu_stream(),
                )
                .result()?
            };
            buf.done = Some(stream.record_event(None)?);
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        for b in &mut self.bufs {
            if let Some(e) = b.done.take() {
                let _ = e.synchronize();
            }
            let _ = unsafe { drv::free_host(b.ptr as *mut c_void) };
        }
    }
}
