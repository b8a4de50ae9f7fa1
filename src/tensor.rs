//! A minimal tensor: a shape, a dtype and storage on the host or a GPU.
//!
//! No autograd, no strides, no broadcasting: ops take whole, contiguous,
//! row-major tensors and say in their doc which shapes they accept.
//!
//! The CPU backend is the f32 reference, so host float tensors always hold
//! f32. A host tensor made "as bf16" holds values rounded to bf16, so that a
//! CPU and a GPU tensor made from the same data hold the same numbers.

use std::sync::Arc;

use half::{bf16, f16};

use crate::cuda::{DeviceBuffer, Gpu};
use crate::error::{Error, Result};

pub use crate::dtype::DType;

/// Where tensors live and which backend runs the ops on them.
#[derive(Clone)]
pub enum Device {
    Cpu,
    Cuda(Arc<Gpu>),
}

impl Device {
    pub fn cuda(ordinal: usize) -> Result<Self> {
        Ok(Device::Cuda(Gpu::new(ordinal)?))
    }
    /// The dtype activations use on this backend: f32 on the CPU reference, bf16 on GPUs.
    /// `cuda` (or `gpu`) must work; `auto` falls back to the CPU and says so
    /// on stderr; `cpu` is the CPU reference backend.
    pub fn choose(choice: &str) -> Result<Self> {
        match choice {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Device::cuda(0),
            "auto" => match Device::cuda(0) {
                Ok(d) => Ok(d),
                Err(e) => {
                    eprintln!("kestrel: running on the CPU ({e})");
                    Ok(Device::Cpu)
                }
            },
            other => Err(crate::error::Error::InvalidInput(format!("--device {other}: expected cuda, cpu or auto"))),
        }
    }

    pub fn activation_dtype(&self) -> DType {
        match self {
            Device::Cpu => DType::F32,
            Device::Cuda(_) => DType::BF16,
        }
    }
    pub fn is_cuda(&self) -> bool {
        matches!(self, Device::Cuda(_))
    }
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(g) => write!(f, "cuda({})", g.name()),
        }
    }
}

pub enum Storage {
    F32(Vec<f32>),
    I32(Vec<i32>),
    Cuda(DeviceBuffer),
}

pub struct Tensor {
    shape: Vec<usize>,
    dtype: DType,
    storage: Storage,
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Tensor {
    /// Uninitialised on the GPU; NaN (or i32::MIN) on the host, so an element
    /// an op forgets to write never looks like a result.
    pub fn empty(dev: &Device, shape: &[usize], dtype: DType) -> Result<Self> {
        let n = numel(shape);
        let storage = match dev {
            Device::Cpu if dtype == DType::I32 => Storage::I32(vec![i32::MIN; n]),
            Device::Cpu => Storage::F32(vec![f32::NAN; n]),
            Device::Cuda(gpu) => Storage::Cuda(gpu.alloc(n * dtype.size())?),
        };
        let dtype = if matches!(dev, Device::Cpu) && dtype.is_float() { DType::F32 } else { dtype };
        Ok(Self { shape: shape.to_vec(), dtype, storage })
    }

    /// Zero-filled. On the CPU the pages come from the allocator zeroed and
    /// untouched (a large KV cache costs nothing until it is used).
    pub fn zeros(dev: &Device, shape: &[usize], dtype: DType) -> Result<Self> {
        let n = numel(shape);
        let storage = match dev {
            Device::Cpu if dtype == DType::I32 => Storage::I32(vec![0; n]),
            Device::Cpu => Storage::F32(vec![0.0; n]),
            Device::Cuda(gpu) => {
                let buf = gpu.alloc(n * dtype.size())?;
                gpu.memset(&buf, 0)?;
                Storage::Cuda(buf)
            }
        };
        let dtype = if matches!(dev, Device::Cpu) && dtype.is_float() { DType::F32 } else { dtype };
        Ok(Self { shape: shape.to_vec(), dtype, storage })
    }

    /// Every byte 0xFF: NaN for floats, -1 for i32. Tests poison outputs so
    /// that unwritten elements fail.
    pub fn poisoned(dev: &Device, shape: &[usize], dtype: DType) -> Result<Self> {
        let t = Self::empty(dev, shape, dtype)?;
        if let Storage::Cuda(b) = &t.storage {
            b.gpu().memset(b, 0xFF)?;
        }
        Ok(t)
    }

    /// Float data, stored as `dtype` (rounded to it) on either device.
    pub fn from_f32(dev: &Device, shape: &[usize], data: &[f32], dtype: DType) -> Result<Self> {
        if numel(shape) != data.len() {
            return Err(Error::Shape {
                op: "from_f32",
                msg: format!("shape {shape:?} needs {} values, got {}", numel(shape), data.len()),
            });
        }
        if !dtype.is_float() {
            return Err(Error::DType { op: "from_f32", got: dtype, supported: "f32, bf16, f16" });
        }
        match dev {
            Device::Cpu => {
                let v = data.iter().map(|&x| dtype.round(x)).collect();
                Ok(Self { shape: shape.to_vec(), dtype: DType::F32, storage: Storage::F32(v) })
            }
            Device::Cuda(gpu) => {
                let buf = gpu.alloc(data.len() * dtype.size())?;
                match dtype {
                    DType::F32 => gpu.upload(&buf, data)?,
                    DType::BF16 => gpu.upload(&buf, &data.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>())?,
                    DType::F16 => gpu.upload(&buf, &data.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>())?,
                    DType::I32 => unreachable!(),
                }
                Ok(Self { shape: shape.to_vec(), dtype, storage: Storage::Cuda(buf) })
            }
        }
    }

    pub fn from_i32(dev: &Device, shape: &[usize], data: &[i32]) -> Result<Self> {
        if numel(shape) != data.len() {
            return Err(Error::Shape {
                op: "from_i32",
                msg: format!("shape {shape:?} needs {} values, got {}", numel(shape), data.len()),
            });
        }
        let storage = match dev {
            Device::Cpu => Storage::I32(data.to_vec()),
            Device::Cuda(gpu) => {
                let buf = gpu.alloc(data.len() * 4)?;
                gpu.upload(&buf, data)?;
                Storage::Cuda(buf)
            }
        };
        Ok(Self { shape: shape.to_vec(), dtype: DType::I32, storage })
    }

    /// Overwrites the first `data.len()` elements of an i32 tensor in place
    /// (inputs of a captured graph live at fixed addresses).
    pub fn write_i32(&mut self, data: &[i32]) -> Result<()> {
        if self.dtype != DType::I32 || data.len() > self.numel() {
            return Err(Error::Shape {
                op: "write_i32",
                msg: format!("{} i32 values into {:?} {:?}", data.len(), self.shape, self.dtype),
            });
        }
        match &mut self.storage {
            Storage::I32(v) => v[..data.len()].copy_from_slice(data),
            Storage::Cuda(b) => b.gpu().upload(b, data)?,
            Storage::F32(_) => return Err(Error::DType { op: "write_i32", got: DType::F32, supported: "i32" }),
        }
        Ok(())
    }

    /// The values as f32 (downloads and widens device data; waits for the GPU).
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        let n = self.numel();
        match (&self.storage, self.dtype) {
            (Storage::F32(v), _) => Ok(v.clone()),
            (Storage::I32(v), _) => Ok(v.iter().map(|&x| x as f32).collect()),
            (Storage::Cuda(b), DType::F32) => {
                let mut v = vec![0f32; n];
                b.gpu().download(&mut v, b)?;
                Ok(v)
            }
            (Storage::Cuda(b), DType::BF16) => {
                let mut v = vec![bf16::ZERO; n];
                b.gpu().download(&mut v, b)?;
                Ok(v.iter().map(|x| x.to_f32()).collect())
            }
            (Storage::Cuda(b), DType::F16) => {
                let mut v = vec![f16::ZERO; n];
                b.gpu().download(&mut v, b)?;
                Ok(v.iter().map(|x| x.to_f32()).collect())
            }
            (Storage::Cuda(_), DType::I32) => Ok(self.to_i32_vec()?.iter().map(|&x| x as f32).collect()),
        }
    }

    pub fn to_i32_vec(&self) -> Result<Vec<i32>> {
        match &self.storage {
            Storage::I32(v) => Ok(v.clone()),
            Storage::Cuda(b) if self.dtype == DType::I32 => {
                let mut v = vec![0i32; self.numel()];
                b.gpu().download(&mut v, b)?;
                Ok(v)
            }
            _ => Err(Error::DType { op: "to_i32_vec", got: self.dtype, supported: "i32" }),
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }
    pub fn device(&self) -> Device {
        match &self.storage {
            Storage::Cuda(b) => Device::Cuda(b.gpu().clone()),
            _ => Device::Cpu,
        }
    }

    /// The same data under another shape with as many elements.
    pub fn reshape(self, shape: &[usize]) -> Result<Self> {
        if numel(shape) != self.numel() {
            return Err(Error::Shape { op: "reshape", msg: format!("{:?} -> {shape:?}", self.shape) });
        }
        Ok(Self { shape: shape.to_vec(), ..self })
    }

    /// Elements per index of the first dimension (a "row").
    pub fn row_len(&self) -> usize {
        self.shape.iter().skip(1).product()
    }

    /// Copies rows `src_row..src_row + n` of `src` into rows `dst_row..` of
    /// `self` (rows = indices of the first dimension; the rest must match).
    /// Scatters image features into the token sequence and appends to KV caches.
    pub fn copy_rows_from(&mut self, dst_row: usize, src: &Tensor, src_row: usize, n: usize) -> Result<()> {
        const OP: &str = "copy_rows";
        if self.row_len() != src.row_len() || self.dtype != src.dtype {
            return Err(Error::Shape {
                op: OP,
                msg: format!("rows of {:?} {:?} into {:?} {:?}", src.shape, src.dtype, self.shape, self.dtype),
            });
        }
        let (rows_dst, rows_src) = (self.shape.first().copied().unwrap_or(1), src.shape.first().copied().unwrap_or(1));
        if dst_row + n > rows_dst || src_row + n > rows_src {
            return Err(Error::Shape {
                op: OP,
                msg: format!("rows {src_row}+{n} of {rows_src} into {dst_row}+{n} of {rows_dst}"),
            });
        }
        let len = self.row_len();
        match (&mut self.storage, &src.storage) {
            (Storage::F32(d), Storage::F32(s)) => {
                d[dst_row * len..(dst_row + n) * len].copy_from_slice(&s[src_row * len..(src_row + n) * len])
            }
            (Storage::I32(d), Storage::I32(s)) => {
                d[dst_row * len..(dst_row + n) * len].copy_from_slice(&s[src_row * len..(src_row + n) * len])
            }
            (Storage::Cuda(d), Storage::Cuda(s)) => {
                let row_bytes = len * self.dtype.size();
                d.gpu().copy_at(d, dst_row * row_bytes, s, src_row * row_bytes, n * row_bytes)?
            }
            _ => return Err(Error::DeviceMismatch { op: OP }),
        }
        Ok(())
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }
    pub fn storage_mut(&mut self) -> &mut Storage {
        &mut self.storage
    }
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?}, {:?}, {:?})", self.shape, self.dtype, self.device())
    }
}
