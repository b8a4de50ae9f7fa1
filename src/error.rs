//! One error type for the library. Nothing on the request path panics or
//! exits: every failure travels up as an `Error` and becomes an API error.

use crate::dtype::DType;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("this build of Kestrel has no CUDA kernels (nvcc was not found when it was built); run tools/install_cuda.sh and rebuild, or use the CPU backend")]
    NoKernels,
    #[error("no usable CUDA device: {0}")]
    NoDevice(String),
    #[error("CUDA driver error: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    #[error("cuBLAS error: {0}")]
    Cublas(#[from] cudarc::cublas::result::CublasError),
    #[error("kernel `{0}` is not in the embedded CUDA modules")]
    KernelNotFound(String),
    #[error("out of GPU memory: asked for {requested} bytes with {in_use} bytes in use")]
    OutOfMemory { requested: usize, in_use: usize },
    #[error("{op}: {msg}")]
    Shape { op: &'static str, msg: String },
    #[error("{op}: dtype {got:?} is not supported here (supported: {supported})")]
    DType { op: &'static str, got: DType, supported: &'static str },
    #[error("{op}: tensors live on different devices")]
    DeviceMismatch { op: &'static str },
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    /// config.json (or another model file) is missing a field, has a wrong
    /// value, or names an architecture we do not serve.
    #[error("model config: {0}")]
    Config(String),
    /// A checkpoint tensor is missing, has the wrong shape or dtype, or a
    /// safetensors file is malformed.
    #[error("weights: {0}")]
    Weights(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    /// Input a user sent that we cannot use (bad image, too many tokens, ...);
    /// becomes a 400 on the server.
    #[error("{0}")]
    InvalidInput(String),
    /// Media a request names could not be fetched: the remote server did not
    /// answer, answered with an error status, was too slow, or redirected
    /// too often. The request itself was well formed; becomes a 422 on the
    /// server (an `InvalidInput` media problem — bad data URL, refused local
    /// path, undecodable image — stays a 400).
    #[error("{0}")]
    MediaFetch(String),
    /// The engine cannot take or finish work (stopped, out of KV cache for a
    /// request that can never fit, device failure mid-step).
    #[error("engine: {0}")]
    Engine(String),
    /// A model could not be had from the Hugging Face Hub or its local
    /// cache: not found, refused, offline, a failed or corrupt download.
    #[error("{0}")]
    Hub(String),
}

/// `Err(Error::Shape)` unless `cond` holds; the message is built only on failure.
#[macro_export]
macro_rules! ensure_shape {
    ($cond:expr, $op:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::error::Error::Shape { op: $op, msg: format!($($fmt)+) });
        }
    };
}
