//! CUDA graphs: a sequence of launches recorded once and replayed with one
//! driver call, which is what makes a small decode step cheap on the host
//! (a 2B-shaped decoder queues ~450 kernels per token).
//!
//! A captured graph holds the raw addresses its kernels used. Inputs are
//! therefore tensors that outlive the graph and are rewritten in place before
//! each replay; everything the captured work allocated comes from the GPU's
//! separate graph pool (`Gpu::with_graph_allocs`). Temporaries freed during
//! capture go back to that pool only, so a replay can scribble over them
//! without touching any tensor that lives across it, and graphs may share
//! them because replays run one at a time on the one stream.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use cudarc::driver::{sys, CudaGraph};

use super::Gpu;
use crate::error::{Error, Result};

/// An instantiated graph, replayed on the stream it was captured from.
pub struct Graph {
    exec: CudaGraph,
}

// The graph is created, replayed and destroyed by the thread that owns the
// `Gpu` (the engine thread); driver graph objects are tied to the context,
// not to a thread, so moving the owner between threads is sound.
unsafe impl Send for Graph {}

impl Graph {
    /// Queues one replay on the stream.
    pub fn launch(&self) -> Result<()> {
        Ok(self.exec.launch()?)
    }
}

impl Gpu {
    /// Records the work `f` queues on the stream (nothing runs) and
    /// instantiates it. `f` must not synchronize, read device memory on the
    /// host, or upload from pageable memory; allocations it makes should come
    /// from the graph pool, so call this inside `with_graph_allocs` after an
    /// uncaptured run of the same work has warmed that pool and every library
    /// it calls.
    pub fn capture(self: &Arc<Self>, f: impl FnOnce() -> Result<()>) -> Result<Graph> {
        self.bind()?;
        self.stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)?;
        self.capturing.store(true, Ordering::Relaxed);
        let queued = f();
        self.capturing.store(false, Ordering::Relaxed);
        // End the capture whatever happened, or the stream stays unusable.
        let ended = self.stream.end_capture(sys::CUgraphInstantiate_flags(0));
        queued?;
        let exec = ended?.ok_or_else(|| Error::Engine("graph capture recorded no work".into()))?;
        exec.upload()?;
        Ok(Graph { exec })
    }
}
