//! Device memory pool: a caching allocator over cuMemAlloc.
//!
//! Freed buffers go to a free list keyed by size class and are handed out
//! again; after the first step of a given shape, a decode step allocates
//! nothing from the driver. `driver_allocs()` counts the cuMemAlloc calls so a
//! test can hold the pool to that.
//!
//! Reuse is safe because every kernel runs on the one stream of `Gpu`: a
//! buffer returned here is only handed to work queued after the work that
//! last used it.

use std::collections::HashMap;
use std::sync::Mutex;

use cudarc::driver::result as drv;

use crate::error::{Error, Result};

/// Rounds a request up to its size class: powers of two up to 1 MiB, then
/// multiples of 2 MiB (at most 2 MiB of slack on large tensors).
pub fn size_class(bytes: usize) -> usize {
    const SMALL: usize = 1 << 20;
    const LARGE_STEP: usize = 2 << 20;
    let bytes = bytes.max(256);
    if bytes <= SMALL {
        bytes.next_power_of_two()
    } else {
        bytes.div_ceil(LARGE_STEP) * LARGE_STEP
    }
}

#[derive(Default)]
struct Inner {
    free: HashMap<usize, Vec<u64>>, // size class -> device pointers
    in_use: usize,                  // bytes handed out (by class)
    cached: usize,                  // bytes on the free lists
    peak: usize,                    // most bytes in use since the last reset_peak
    driver_allocs: u64,
}

#[derive(Default)]
pub struct DevicePool {
    inner: Mutex<Inner>,
}

impl DevicePool {
    /// A block of at least `bytes` bytes; returns (pointer, class size).
    /// The caller must have the pool's context current on this thread.
    pub fn alloc(&self, bytes: usize) -> Result<(u64, usize)> {
        let class = size_class(bytes);
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ptr) = g.free.get_mut(&class).and_then(|v| v.pop()) {
            g.cached -= class;
            g.in_use += class;
            g.peak = g.peak.max(g.in_use);
            return Ok((ptr, class));
        }
        let ptr = match unsafe { drv::malloc_sync(class) } {
            Ok(p) => p,
            Err(_) => {
                // Give the cache back to the driver and try once more.
                Self::release_cached(&mut g);
                unsafe { drv::malloc_sync(class) }
                    .map_err(|_| Error::OutOfMemory { requested: class, in_use: g.in_use })?
            }
        };
        g.driver_allocs += 1;
        g.in_use += class;
        g.peak = g.peak.max(g.in_use);
        Ok((ptr, class))
    }

    pub fn free(&self, ptr: u64, class: usize) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.in_use -= class;
        g.cached += class;
        g.free.entry(class).or_default().push(ptr);
    }

    fn release_cached(g: &mut Inner) {
        for (_, ptrs) in g.free.drain() {
            for p in ptrs {
                let _ = unsafe { drv::free_sync(p) };
            }
        }
        g.cached = 0;
    }

    /// Returns every cached block to the driver.
    pub fn trim(&self) {
        Self::release_cached(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner()));
    }

    pub fn driver_allocs(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).driver_allocs
    }

    /// Most bytes handed out at once since the last `reset_peak` (what a
    /// profiling pass measures).
    pub fn peak_bytes(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).peak
    }

    pub fn reset_peak(&self) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.peak = g.in_use;
    }

    pub fn bytes_in_use(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).in_use
    }

    pub fn bytes_cached(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).cached
    }
}

impl Drop for DevicePool {
    fn drop(&mut self) {
        self.trim();
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_cover_the_request_with_bounded_slack() {
        for bytes in [1usize, 255, 256, 257, 1000, 4096, 65_537, 1 << 20, (1 << 20) + 1, 7_777_777, 1 << 30] {
            let c = size_class(bytes);
            assert!(c >= bytes, "{bytes} -> {c}");
            assert!(c - bytes < bytes.max(256) || c - bytes < 2 << 20, "{bytes} -> {c}");
            assert_eq!(size_class(c), c, "a class is its own class");
        }
        assert_eq!(size_class(3 << 20), 4 << 20);
        assert_eq!(size_class(1000), 1024);
    }
}
