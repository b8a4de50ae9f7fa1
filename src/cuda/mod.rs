//! The CUDA side of Kestrel: one `Gpu` per device, owned by the engine thread.
//!
//! `Gpu` holds the context, the one stream all work runs on, the kernel
//! registry, the cuBLAS handle and the memory pool. Launchers in `ops/` call
//! `Gpu::launch` with raw device pointers; memory comes from the pool through
//! `DeviceBuffer`, which gives itself back on drop.

pub mod blas;
pub mod graph;
pub mod pool;
pub mod profile;
pub mod registry;
mod staging;

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use cudarc::driver::{result as drv, sys, CudaContext, CudaStream};

use crate::error::{Error, Result};
pub use registry::HAVE_KERNELS;

/// A kernel argument, passed by value.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    Ptr(u64),
    I32(i32),
    U32(u32),
    F32(f32),
}

pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: registry::Registry,
    pub(crate) blas: blas::Blas,
    pool: pool::DevicePool,
    /// Memory of captured CUDA graphs (see `graph`): while `graph_allocs` is
    /// set, allocations come from here, and blocks freed here are only ever
    /// handed out again to graph work, never to tensors that live across a
    /// replay.
    graph_pool: pool::DevicePool,
    graph_allocs: AtomicBool,
    /// Set while a graph capture records work (no profiling events then).
    capturing: AtomicBool,
    profiler: Option<profile::Profiler>,
    /// Pinned buffers for large uploads, while weights load.
    staging: std::sync::Mutex<Option<staging::Staging>>,
    name: String,
    capability: (i32, i32),
    sm_count: i32,
}

impl Gpu {
    /// Opens device `ordinal`. Fails with a typed error (never panics) when
    /// the binary has no kernels, the CUDA driver is absent, or there is no GPU.
    pub fn new(ordinal: usize) -> Result<Arc<Self>> {
        if !HAVE_KERNELS {
            return Err(Error::NoKernels);
        }
        // cudarc panics if libcuda cannot be loaded; ask first.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::NoDevice("the CUDA driver library (libcuda.so) is not installed".into()));
        }
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(Error::NoDevice("the cuBLAS library (libcublas.so) is not installed".into()));
        }
        let count = CudaContext::device_count().map_err(|e| Error::NoDevice(e.to_string()))?;
        if ordinal as i32 >= count {
            return Err(Error::NoDevice(format!("device {ordinal} asked for, {count} present")));
        }
        let ctx = CudaContext::new(ordinal)?;
        // Buffers come from our pool, not cudarc's tracked slices.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream()?;
        let kernels = registry::Registry::load(&ctx)?;
        let pool = pool::DevicePool::default();
        let graph_pool = pool::DevicePool::default();
        let blas = blas::Blas::new(&stream)?;
        let name = ctx.name()?;
        let capability = ctx.compute_capability()?;
        let sm_count = ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        Ok(Arc::new(Self {
            ctx,
            stream,
            kernels,
            blas,
            pool,
            graph_pool,
            graph_allocs: AtomicBool::new(false),
            capturing: AtomicBool::new(false),
            profiler: profile::Profiler::from_env(),
            staging: std::sync::Mutex::new(None),
            name,
            capability,
            sm_count,
        }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn capability(&self) -> (i32, i32) {
        self.capability
    }
    pub fn sm_count(&self) -> i32 {
        self.sm_count
    }
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    pub fn pool(&self) -> &pool::DevicePool {
        &self.pool
    }

    /// (free, total) bytes of device memory, as the driver reports them.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.bind()?;
        Ok(drv::mem_get_info()?)
    }

    fn bind(&self) -> Result<()> {
        Ok(self.ctx.bind_to_thread()?)
    }

    /// Launches kernel `name` on the stream.
    pub fn launch(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        args: &[Arg],
    ) -> Result<()> {
        let f = self.kernels.function(name)?;
        self.bind()?;
        // Each argument lives in an 8-byte slot; the driver reads as many bytes
        // as the kernel's parameter has (little-endian, so an i32 is the low half).
        let mut slots: Vec<u64> = args
            .iter()
            .map(|a| match *a {
                Arg::Ptr(p) => p,
                Arg::I32(v) => v as u32 as u64,
                Arg::U32(v) => v as u64,
                Arg::F32(v) => v.to_bits() as u64,
            })
            .collect();
        let mut params: Vec<*mut c_void> = slots.iter_mut().map(|s| s as *mut u64 as *mut c_void).collect();
        if smem > 48 * 1024 {
            unsafe {
                drv::function::set_function_attribute(
                    f.cu_function(),
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem as i32,
                )?;
            }
        }
        let stream = self.stream.cu_stream();
        self.profiled(name, || {
            Ok(unsafe { drv::launch_kernel(f.cu_function(), grid, block, smem, stream, &mut params)? })
        })
    }

    /// Runs `f`, which queues work on the stream, under the kernel profiler
    /// when one is on (see `profile`).
    pub(crate) fn profiled(&self, name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
        match &self.profiler {
            Some(p) if !self.capturing.load(Ordering::Relaxed) => p.around(&self.stream, name, f),
            _ => f(),
        }
    }

    pub fn profiling(&self) -> bool {
        self.profiler.is_some()
    }

    /// GPU time per kernel since the last call, when `KESTREL_PROFILE=1`.
    pub fn profile_report(&self) -> Result<Option<String>> {
        self.bind()?;
        self.profiler.as_ref().map(|p| p.report(&self.stream)).transpose()
    }

    /// A buffer of at least `bytes` bytes from the pool (contents undefined).
    pub fn alloc(self: &Arc<Self>, bytes: usize) -> Result<DeviceBuffer> {
        self.bind()?;
        let graph = self.graph_allocs.load(Ordering::Relaxed);
        let (ptr, class) = if graph { self.graph_pool.alloc(bytes)? } else { self.pool.alloc(bytes)? };
        Ok(DeviceBuffer { ptr, bytes, class, graph, gpu: self.clone() })
    }

    /// Runs `f` with allocations coming from the graph pool (see `graph`).
    pub(crate) fn with_graph_allocs<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let before = self.graph_allocs.swap(true, Ordering::Relaxed);
        let out = f();
        self.graph_allocs.store(before, Ordering::Relaxed);
        out
    }

    /// Bytes the graph pool holds (in use and cached).
    pub fn graph_pool_bytes(&self) -> usize {
        self.graph_pool.bytes_in_use() + self.graph_pool.bytes_cached()
    }

    pub fn upload<T: Copy>(&self, dst: &DeviceBuffer, src: &[T]) -> Result<()> {
        let n = std::mem::size_of_val(src);
        if n > dst.bytes {
            return Err(Error::Shape { op: "upload", msg: format!("{n} bytes into a {}-byte buffer", dst.bytes) });
        }
        self.bind()?;
        // Pageable source: the call returns once the data is staged, so `src` may go.
        unsafe { drv::memcpy_htod_async(dst.ptr, src, self.stream.cu_stream())? };
        Ok(())
    }

    /// Uploads a large read-only host buffer (weights) through pinned
    /// staging memory; `src` may be reused as soon as this returns. Call
    /// `end_staging` when the loading is over to give the pinned memory back.
    /// `offset` is in bytes into `dst`.
    pub fn upload_staged(&self, dst: &DeviceBuffer, offset: usize, src: &[u8]) -> Result<()> {
        if offset + src.len() > dst.bytes {
            return Err(Error::Shape {
                op: "upload",
                msg: format!("{} bytes at offset {offset} into a {}-byte buffer", src.len(), dst.bytes),
            });
        }
        self.bind()?;
        if src.len() < (1 << 20) {
            unsafe { drv::memcpy_htod_async(dst.ptr + offset as u64, src, self.stream.cu_stream())? };
            return Ok(());
        }
        let mut g = self.staging.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            *g = Some(staging::Staging::new()?);
        }
        g.as_mut().expect("just made").upload(&self.stream, dst.ptr + offset as u64, src)
    }

    /// Waits for staged uploads and frees the staging memory.
    pub fn end_staging(&self) -> Result<()> {
        self.bind()?;
        self.stream.synchronize()?;
        self.staging.lock().unwrap_or_else(|e| e.into_inner()).take();
        Ok(())
    }

    /// Copies `dst.len()` elements out and waits for them.
    pub fn download<T: Copy>(&self, dst: &mut [T], src: &DeviceBuffer) -> Result<()> {
        let n = std::mem::size_of_val(dst);
        if n > src.bytes {
            return Err(Error::Shape { op: "download", msg: format!("{n} bytes from a {}-byte buffer", src.bytes) });
        }
        self.bind()?;
        unsafe { drv::memcpy_dtoh_async(dst, src.ptr, self.stream.cu_stream())? };
        self.synchronize()
    }

    /// Sets every byte of `buf` to `byte` (0xFF poisons floats with NaN).
    pub fn memset(&self, buf: &DeviceBuffer, byte: u8) -> Result<()> {
        self.bind()?;
        unsafe { drv::memset_d8_async(buf.ptr, byte, buf.bytes, self.stream.cu_stream())? };
        Ok(())
    }

    pub fn copy(&self, dst: &DeviceBuffer, src: &DeviceBuffer, bytes: usize) -> Result<()> {
        if bytes > dst.bytes || bytes > src.bytes {
            return Err(Error::Shape {
                op: "copy",
                msg: format!("{bytes} bytes between buffers of {} and {}", src.bytes, dst.bytes),
            });
        }
        self.bind()?;
        unsafe { drv::memcpy_dtod_async(dst.ptr, src.ptr, bytes, self.stream.cu_stream())? };
        Ok(())
    }

    /// Copies `bytes` from `src` at byte offset `src_off` to `dst` at `dst_off`.
    pub fn copy_at(
        &self,
        dst: &DeviceBuffer,
        dst_off: usize,
        src: &DeviceBuffer,
        src_off: usize,
        bytes: usize,
    ) -> Result<()> {
        if dst_off + bytes > dst.bytes || src_off + bytes > src.bytes {
            return Err(Error::Shape {
                op: "copy_at",
                msg: format!(
                    "{bytes} bytes from offset {src_off} of {} into offset {dst_off} of {}",
                    src.bytes, dst.bytes
                ),
            });
        }
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        unsafe {
            drv::memcpy_dtod_async(dst.ptr + dst_off as u64, src.ptr + src_off as u64, bytes, self.stream.cu_stream())?
        };
        Ok(())
    }

    /// Times `f` with CUDA events: `warmup` untimed runs, then `iters` timed
    /// ones; returns each run's milliseconds (for medians in benchmarks).
    pub fn time_ms(&self, warmup: usize, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<Vec<f32>> {
        for _ in 0..warmup {
            f()?;
        }
        let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let mut events = Vec::with_capacity(iters);
        for _ in 0..iters {
            let start = self.stream.record_event(timing)?;
            f()?;
            events.push((start, self.stream.record_event(timing)?));
        }
        self.synchronize()?;
        Ok(events.iter().map(|(a, b)| a.elapsed_ms(b)).collect::<Result<_, _>>()?)
    }

    /// Waits for all queued work; asynchronous kernel faults surface here.
    pub fn synchronize(&self) -> Result<()> {
        self.bind()?;
        Ok(self.stream.synchronize()?)
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        // Finish queued work and free the pool while the context still lives.
        if self.bind().is_ok() {
            let _ = self.stream.synchronize();
            self.pool.trim();
            self.graph_pool.trim();
        }
    }
}

/// Device memory from the pool; returned to it on drop.
pub struct DeviceBuffer {
    ptr: u64,
    bytes: usize, // bytes asked for (the block may be larger)
    class: usize,
    graph: bool, // from the graph pool
    gpu: Arc<Gpu>,
}

impl DeviceBuffer {
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        let pool = if self.graph { &self.gpu.graph_pool } else { &self.gpu.pool };
        pool.free(self.ptr, self.class);
    }
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuffer({} bytes on {})", self.bytes, self.gpu.name)
    }
}
