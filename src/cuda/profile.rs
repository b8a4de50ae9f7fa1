//! A kernel profiler for when no system profiler is at hand: with
//! `KESTREL_PROFILE=1` in the environment, every launch and GEMM outside a
//! graph capture is bracketed by CUDA events, and `Gpu::profile_report`
//! sums the GPU time per kernel name. The events cost host time and
//! serialize nothing, so the per-kernel GPU times are faithful while the
//! wall time of a profiled run is not.

use std::collections::HashMap;
use std::sync::Mutex;

use cudarc::driver::{sys, CudaEvent, CudaStream};

use crate::error::Result;

/// Marks kept before they are folded into the totals (each holds two events).
const FOLD_AT: usize = 4096;

#[derive(Default)]
struct Totals {
    calls: u64,
    ms: f64,
}

#[derive(Default)]
pub struct Profiler {
    marks: Mutex<Vec<(String, CudaEvent, CudaEvent)>>,
    totals: Mutex<HashMap<String, Totals>>,
}

impl Profiler {
    /// A profiler when `KESTREL_PROFILE=1`.
    pub fn from_env() -> Option<Self> {
        std::env::var("KESTREL_PROFILE").is_ok_and(|v| v == "1").then(Self::default)
    }

    /// Queues `f`'s work between two events recorded on `stream`.
    pub fn around(&self, stream: &CudaStream, name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
        let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = stream.record_event(timing)?;
        f()?;
        let end = stream.record_event(timing)?;
        let mut marks = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        marks.push((name.to_owned(), start, end));
        if marks.len() >= FOLD_AT {
            let marks = std::mem::take(&mut *marks);
            self.fold(stream, marks)?;
        }
        Ok(())
    }

    fn fold(&self, stream: &CudaStream, marks: Vec<(String, CudaEvent, CudaEvent)>) -> Result<()> {
        stream.synchronize()?;
        let mut totals = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        for (name, a, b) in marks {
            let t = totals.entry(name).or_default();
            t.calls += 1;
            t.ms += a.elapsed_ms(&b)? as f64;
        }
        Ok(())
    }

    /// A table of GPU time per kernel since the last report, largest first;
    /// resets the totals.
    pub fn report(&self, stream: &CudaStream) -> Result<String> {
        let marks = std::mem::take(&mut *self.marks.lock().unwrap_or_else(|e| e.into_inner()));
        self.fold(stream, marks)?;
        let totals = std::mem::take(&mut *self.totals.lock().unwrap_or_else(|e| e.into_inner()));
        let all: f64 = totals.values().map(|t| t.ms).sum();
        let mut rows: Vec<_> = totals.into_iter().collect();
        rows.sort_by(|a, b| b.1.ms.total_cmp(&a.1.ms));
        let mut out = format!("{:<44} {:>9} {:>11} {:>9} {:>6}\n", "kernel", "calls", "total ms", "mean us", "share");
        for (name, t) in rows {
            out += &format!(
                "{name:<44} {:>9} {:>11.3} {:>9.2} {:>5.1}%\n",
                t.calls,
                t.ms,
                1e3 * t.ms / t.calls.max(1) as f64,
                100.0 * t.ms / all.max(f64::MIN_POSITIVE)
            );
        }
        out += &format!("{:<44} {:>9} {all:>11.3}\n", "all", "");
        Ok(out)
    }
}
