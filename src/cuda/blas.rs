//! cuBLAS handle and the one GEMM convention Kestrel uses.
//!
//! Convention (written down once, used everywhere): tensors are row-major.
//! `y[m, n] = x[m, k] · w[n, k]ᵀ`, i.e. PyTorch's `Linear` with its weight as
//! stored in checkpoints. cuBLAS is column-major, where row-major `y` is the
//! column-major `yᵀ (n × m)`, so we ask cuBLAS for `yᵀ = w · xᵀ`:
//! A = w (column-major k × n, transposed, lda = k), B = x (column-major k × m,
//! not transposed, ldb = k), C = y (ldc = n). bf16 or f32 inputs, fp32
//! accumulation, bf16 or f32 output.

use std::ffi::c_void;

use cudarc::cublas::{result as blas, sys};
use cudarc::driver::{result as drv, CudaStream};

use crate::dtype::DType;
use crate::error::Result;

/// cuBLAS gets its own workspace so it never allocates mid-step (and so a
/// step can later be captured in a CUDA graph). 32 MiB is what it asks for on Hopper.
const WORKSPACE_BYTES: usize = 32 << 20;

pub struct Blas {
    handle: sys::cublasHandle_t,
    workspace: u64,
}

// The handle is used only from the thread that owns the `Gpu`, bound to its stream.
unsafe impl Send for Blas {}
unsafe impl Sync for Blas {}

fn data_type(dt: DType) -> Option<sys::cudaDataType> {
    match dt {
        DType::BF16 => Some(sys::cudaDataType::CUDA_R_16BF),
        DType::F16 => Some(sys::cudaDataType::CUDA_R_16F),
        DType::F32 => Some(sys::cudaDataType::CUDA_R_32F),
        DType::I32 => None,
    }
}

impl Blas {
    pub(super) fn new(stream: &CudaStream) -> Result<Self> {
        let handle = blas::create_handle()?;
        let workspace = unsafe { drv::malloc_sync(WORKSPACE_BYTES)? };
        unsafe {
            blas::set_stream(handle, stream.cu_stream() as _)?;
            sys::cublasSetWorkspace_v2(handle, workspace as *mut c_void, WORKSPACE_BYTES).result()?;
        }
        Ok(Self { handle, workspace })
    }

    /// `y[m, n] = x[m, k] · w[n, k]ᵀ` (see the module doc). Pointers are device
    /// pointers; `in_dtype` is that of x and w, `out_dtype` that of y.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        y: u64,
        x: u64,
        w: u64,
        m: usize,
        n: usize,
        k: usize,
        in_dtype: DType,
        out_dtype: DType,
    ) -> Result<()> {
        let (Some(a_t), Some(c_t)) = (data_type(in_dtype), data_type(out_dtype)) else {
            return Err(crate::Error::DType { op: "gemm", got: DType::I32, supported: "bf16, f16, f32" });
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        // fp32 inputs use plain fp32 math (no TF32) so they can serve as a reference.
        let compute = sys::cublasComputeType_t::CUBLAS_COMPUTE_32F;
        unsafe {
            blas::gemm_ex(
                self.handle,
                sys::cublasOperation_t::CUBLAS_OP_T,
                sys::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as *const c_void,
                w as *const c_void,
                a_t,
                k as i32,
                x as *const c_void,
                a_t,
                k as i32,
                &beta as *const f32 as *const c_void,
                y as *mut c_void,
                c_t,
                n as i32,
                compute,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )?;
        }
        Ok(())
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        unsafe {
            let _ = blas::destroy_handle(self.handle);
            let _ = drv::free_sync(self.workspace);
        }
    }
}
