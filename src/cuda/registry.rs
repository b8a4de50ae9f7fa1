//! Kernel registry: the fatbins that build.rs embedded, loaded as modules,
//! and functions found by name (`rms_norm_bf16`) in whichever module has them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;

use crate::error::{Error, Result};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// Whether this binary was built with its CUDA kernels.
pub const HAVE_KERNELS: bool = embedded::HAVE_KERNELS;

/// Names of the embedded modules (one per csrc/*.cu).
pub fn module_names() -> impl Iterator<Item = &'static str> {
    embedded::MODULES.iter().map(|(n, _)| *n)
}

pub struct Registry {
    modules: Vec<Arc<CudaModule>>,
    cache: Mutex<HashMap<String, CudaFunction>>,
}

impl Registry {
    pub fn load(ctx: &Arc<CudaContext>) -> Result<Self> {
        if !HAVE_KERNELS {
            return Err(Error::NoKernels);
        }
        let modules = embedded::MODULES
            .iter()
            .map(|(_, bytes)| ctx.load_module(Ptx::from_binary(bytes.to_vec())))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { modules, cache: Mutex::new(HashMap::new()) })
    }

    pub fn function(&self, name: &str) -> Result<CudaFunction> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = cache.get(name) {
            return Ok(f.clone());
        }
        for m in &self.modules {
            if let Ok(f) = m.load_function(name) {
                cache.insert(name.to_string(), f.clone());
                return Ok(f);
            }
        }
        Err(Error::KernelNotFound(name.to_string()))
    }
}
