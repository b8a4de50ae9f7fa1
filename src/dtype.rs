//! Element types of tensors, kernels and checkpoints. Its own module so the
//! lowest layers (`error`, `cuda`) name it without depending on `tensor`.

use half::{bf16, f16};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
    I32,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }
    /// The suffix of kernel names: `rms_norm_bf16`.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::I32 => "i32",
        }
    }
    pub fn is_float(self) -> bool {
        self != DType::I32
    }
    /// Rounds an f32 to the nearest value of this dtype (round-to-nearest-even).
    pub fn round(self, x: f32) -> f32 {
        match self {
            DType::F32 => x,
            DType::BF16 => bf16::from_f32(x).to_f32(),
            DType::F16 => f16::from_f32(x).to_f32(),
            DType::I32 => x.round(),
        }
    }
}
