//! Safetensors checkpoints: `model.safetensors` or the shards listed in
//! `model.safetensors.index.json`, memory-mapped (nothing is read until a
//! tensor is asked for), with the Qwen2-VL name layouts mapped to one.
//!
//! Model code asks for **canonical** names, the layout transformers ≥ 4.52
//! saves (`Qwen2VLForConditionalGeneration` → `model.language_model.*`,
//! `model.visual.*`, `lm_head.*`). Older checkpoints (every one published on
//! the hub) say `model.*` and `visual.*`; `Qwen2VLModel` saved on its own
//! says `language_model.*` and `visual.*`. The mapping mirrors
//! transformers `modeling_qwen2_vl.py` (`_checkpoint_conversion_mapping`:
//! `^visual` → `model.visual`, `^model(?!\.(language_model|visual))` →
//! `model.language_model` on the LM class; `^model` → `language_model` on
//! `Qwen2VLModel`) and vLLM `models/qwen2_vl.py` (`hf_to_vllm_mapper`).
//! [`Weights::open`] detects the layout once from the stored names.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::tensor::{DType, Device, Storage, Tensor};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Canonical prefixes (transformers ≥ 4.52, `Qwen2VLForConditionalGeneration`).
pub const TEXT_PREFIX: &str = "model.language_model.";
pub const VISION_PREFIX: &str = "model.visual.";
pub const LM_HEAD: &str = "lm_head.weight";
pub const EMBED_TOKENS: &str = "model.language_model.embed_tokens.weight";

/// How a checkpoint names the language model and the vision tower.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// transformers ≥ 4.52, `Qwen2VLForConditionalGeneration`:
    /// `model.language_model.*`, `model.visual.*`, `lm_head.weight`. Canonical.
    Current,
    /// transformers < 4.52 (the published checkpoints): `model.*`, `visual.*`, `lm_head.weight`.
    Legacy,
    /// transformers ≥ 4.52, `Qwen2VLModel` saved by itself: `language_model.*`, `visual.*`.
    CurrentBase,
    /// The decoder without any prefix (what the pre-4.52 `Qwen2VLModel`, then
    /// the text decoder alone, saved): `embed_tokens.weight`, `layers.*`,
    /// `norm.weight`; vision, if present, under `visual.*`. HF loads these by
    /// adding its `base_model_prefix`, `model.`.
    LegacyBare,
}

impl Layout {
    const ALL: [Layout; 4] = [Layout::Current, Layout::CurrentBase, Layout::Legacy, Layout::LegacyBare];

    /// Where the language model's tensors live.
    pub fn text_prefix(self) -> &'static str {
        match self {
            Layout::Current => TEXT_PREFIX,
            Layout::CurrentBase => "language_model.",
            Layout::Legacy => "model.",
            Layout::LegacyBare => "",
        }
    }
    /// Where the vision tower's tensors live.
    pub fn vision_prefix(self) -> &'static str {
        match self {
            Layout::Current => VISION_PREFIX,
            _ => "visual.",
        }
    }
}

/// A tensor as stored: dtype, shape and bytes borrowed from the memory map.
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    dtype: DType,
    shape: &'a [usize],
    data: &'a [u8], // little-endian, row-major
}

impl<'a> TensorView<'a> {
    /// BF16, F16 or F32: the dtype on disk.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn shape(&self) -> &'a [usize] {
        self.shape
    }
    /// The raw bytes, straight from the memory map (no copy).
    pub fn data(&self) -> &'a [u8] {
        self.data
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// The values widened to f32 (exact for all three dtypes).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        bytes_to_f32(self.dtype, self.data)
    }
}

/// Widens little-endian bf16/f16/f32 bytes to f32. The bytes need no
/// alignment (safetensors does not promise any for its data section).
fn bytes_to_f32(dtype: DType, data: &[u8]) -> Vec<f32> {
    match dtype {
        DType::F32 => data.par_chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        DType::BF16 => data.par_chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        DType::F16 => data.par_chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        DType::I32 => data.par_chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32).collect(),
    }
}

/// A device tensor of `dtype` holding `bytes` (little-endian values of that
/// dtype). On a GPU the bytes go up as they are, with no host copy; on the
/// CPU they are widened to f32 (host float tensors are f32).
pub(crate) fn tensor_from_bytes(dev: &Device, shape: &[usize], dtype: DType, bytes: &[u8]) -> Result<Tensor> {
    let numel: usize = shape.iter().product();
    if numel.checked_mul(dtype.size()) != Some(bytes.len()) {
        return Err(Error::Shape {
            op: "tensor_from_bytes",
            msg: format!("shape {shape:?} of {dtype:?} needs {numel}·{} bytes, got {}", dtype.size(), bytes.len()),
        });
    }
    match dev {
        Device::Cuda(gpu) => {
            let t = Tensor::empty(dev, shape, dtype)?;
            if let Storage::Cuda(buf) = t.storage() {
                gpu.upload_staged(buf, 0, bytes)?;
            }
            Ok(t)
        }
        Device::Cpu if dtype == DType::I32 => {
            let v: Vec<i32> = bytes.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            Tensor::from_i32(dev, shape, &v)
        }
        Device::Cpu => Tensor::from_f32(dev, shape, &bytes_to_f32(dtype, bytes), DType::F32),
    }
}

struct Shard {
    path: PathBuf,
    mmap: Mmap,
}

struct Entry {
    shard: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize, // byte range in the shard's map
    end: usize,
}

/// An opened checkpoint. Tensors stay in the memory maps until loaded.
pub struct Weights {
    dir: PathBuf,
    shards: Vec<Shard>,
    tensors: HashMap<String, Entry>, // by stored name
    layout: Layout,
    vision_prefix: &'static str,
    /// A family's own name map (canonical prefix, stored prefix), longest
    /// first; when set it replaces the Qwen2-VL layouts.
    prefixes: Vec<(&'static str, &'static str)>,
    used: Mutex<BTreeSet<String>>, // stored names handed out by `get`
}

/// A family's name map: each canonical prefix with the stored prefixes
/// checkpoints have used for it, newest first. [`Weights::open_with`]
/// picks, per rule, the first stored prefix some tensor starts with.
pub type PrefixRules = [(&'static str, &'static [&'static str])];

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Weights({}: {} tensors in {} file(s), {:?} layout)",
            self.dir.display(),
            self.tensors.len(),
            self.shards.len(),
            self.layout
        )
    }
}

impl Weights {
    /// Opens `<dir>/model.safetensors`, or else the shards that
    /// `<dir>/model.safetensors.index.json` lists (transformers prefers the
    /// single file too). Reads every header, checks the index against the
    /// shards, detects the name layout. No tensor data is read.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        Self::open_inner(dir.as_ref(), &[])
    }

    /// Opens a checkpoint whose names follow `rules` instead of the
    /// Qwen2-VL layouts (see [`PrefixRules`]).
    pub fn open_with(dir: impl AsRef<Path>, rules: &PrefixRules) -> Result<Self> {
        Self::open_inner(dir.as_ref(), rules)
    }

    fn open_inner(dir: &Path, rules: &PrefixRules) -> Result<Self> {
        let dir = dir.to_path_buf();
        let single = dir.join(SINGLE_FILE);
        let index = dir.join(INDEX_FILE);
        let mut shards = Vec::new();
        let mut tensors = HashMap::new();
        if single.is_file() {
            let file =
                File::open(&single).map_err(|source| Error::Io { path: single.display().to_string(), source })?;
            add_shard(&mut shards, &mut tensors, single, file)?;
        } else if index.is_file() {
            let weight_map = read_index(&index)?;
            let mut files: Vec<&str> = weight_map.values().map(String::as_str).collect();
            files.sort_unstable();
            files.dedup();
            for name in files {
                let path = dir.join(name);
                let file = File::open(&path).map_err(|e| {
                    Error::Weights(format!("{} lists shard `{name}`, which cannot be opened: {e}", index.display()))
                })?;
                add_shard(&mut shards, &mut tensors, path, file)?;
            }
            for (tensor, file) in &weight_map {
                let in_file = tensors.get(tensor).map(|e: &Entry| &shards[e.shard].path);
                if in_file != Some(&dir.join(file)) {
                    return Err(Error::Weights(format!(
                        "{} puts `{tensor}` in `{file}`, but that shard has no such tensor",
                        index.display()
                    )));
                }
            }
        } else {
            return Err(Error::Weights(format!(
                "{}: no checkpoint here (looked for {SINGLE_FILE} and {INDEX_FILE})",
                dir.display()
            )));
        }
        let (layout, vision_prefix) = if rules.is_empty() {
            detect_layout(&dir, tensors.keys().map(String::as_str))?
        } else {
            (Layout::Current, VISION_PREFIX)
        };
        let mut prefixes: Vec<(&'static str, &'static str)> = rules
            .iter()
            .map(|&(canonical, stored)| {
                let found = stored.iter().find(|p| tensors.keys().any(|n: &String| n.starts_with(*p)));
                (canonical, found.copied().unwrap_or(canonical))
            })
            .collect();
        prefixes.sort_by_key(|(c, _)| std::cmp::Reverse(c.len()));
        Ok(Self { dir, shards, tensors, layout, vision_prefix, prefixes, used: Mutex::new(BTreeSet::new()) })
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }
    /// The safetensors files, in the order they were opened.
    pub fn files(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }

    /// The stored name of a canonical one (`model.language_model.norm.weight`
    /// → `model.norm.weight` in a legacy checkpoint). Names outside the
    /// language model and vision tower pass unchanged.
    pub fn stored_name(&self, canonical: &str) -> String {
        if !self.prefixes.is_empty() {
            return match self.prefixes.iter().find_map(|(c, s)| canonical.strip_prefix(c).map(|r| (s, r))) {
                Some((stored, rest)) => format!("{stored}{rest}"),
                None => canonical.to_string(),
            };
        }
        if let Some(rest) = canonical.strip_prefix(TEXT_PREFIX) {
            format!("{}{rest}", self.layout.text_prefix())
        } else if let Some(rest) = canonical.strip_prefix(VISION_PREFIX) {
            format!("{}{rest}", self.vision_prefix)
        } else {
            canonical.to_string()
        }
    }

    /// The canonical name of a stored one (the inverse of `stored_name`).
    pub fn canonical_name(&self, stored: &str) -> String {
        if !self.prefixes.is_empty() {
            let best = self.prefixes.iter().filter(|(_, s)| stored.starts_with(s)).max_by_key(|(_, s)| s.len());
            return match best {
                Some((canonical, s)) => format!("{canonical}{}", &stored[s.len()..]),
                None => stored.to_string(),
            };
        }
        if let Some(rest) = stored.strip_prefix(self.vision_prefix) {
            format!("{VISION_PREFIX}{rest}")
        } else if stored.starts_with("lm_head.") {
            stored.to_string()
        } else if let Some(rest) = stored.strip_prefix(self.layout.text_prefix()) {
            format!("{TEXT_PREFIX}{rest}")
        } else {
            stored.to_string()
        }
    }

    /// Every tensor in the checkpoint, by canonical name, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.tensors.keys().map(|s| self.canonical_name(s)).collect();
        v.sort();
        v
    }
    /// Every tensor in the checkpoint as stored, sorted.
    pub fn stored_names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }
    pub fn contains(&self, canonical: &str) -> bool {
        self.tensors.contains_key(&self.stored_name(canonical))
    }

    /// Canonical names of the tensors no `get`/`load` has asked for yet:
    /// after building a model, a non-empty list means weights it ignored.
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<String> =
            self.tensors.keys().filter(|s| !used.contains(*s)).map(|s| self.canonical_name(s)).collect();
        v.sort();
        v
    }

    /// The tensor `canonical` as stored (bf16, f16 or f32), borrowing the map.
    pub fn get(&self, canonical: &str) -> Result<TensorView<'_>> {
        let stored = self.stored_name(canonical);
        let Some(e) = self.tensors.get(&stored) else {
            let looked = if stored == canonical { String::new() } else { format!(" (looked for `{stored}`)") };
            return Err(Error::Weights(format!(
                "tensor `{canonical}` is not in the checkpoint{looked}; {} ({:?} layout)",
                self.dir.display(),
                self.layout
            )));
        };
        let dtype = match e.dtype {
            Dtype::BF16 => DType::BF16,
            Dtype::F16 => DType::F16,
            Dtype::F32 => DType::F32,
            other => {
                return Err(Error::Weights(format!(
                    "tensor `{canonical}` (stored as `{stored}`) is {other:?} on disk; Kestrel loads BF16, F16 or F32"
                )))
            }
        };
        self.used.lock().unwrap_or_else(|e| e.into_inner()).insert(stored);
        Ok(TensorView { dtype, shape: &e.shape, data: &self.shards[e.shard].mmap[e.start..e.end] })
    }

    /// The tensor `canonical` on `dev` in the device's activation dtype (f32
    /// on the CPU, bf16 on GPUs), after checking its shape. When the dtype on
    /// disk is already that dtype the bytes go from the map to the device.
    pub fn load(&self, dev: &Device, canonical: &str, expected_shape: &[usize]) -> Result<Tensor> {
        let view = self.get(canonical)?;
        if view.shape() != expected_shape {
            return Err(Error::Weights(format!(
                "tensor `{canonical}` (stored as `{}`): expected shape {expected_shape:?}, found {:?}",
                self.stored_name(canonical),
                view.shape()
            )));
        }
        let target = dev.activation_dtype();
        if dev.is_cuda() && view.dtype() == target {
            return tensor_from_bytes(dev, view.shape(), target, view.data());
        }
        Tensor::from_f32(dev, view.shape(), &view.to_f32_vec(), target)
    }

    /// Several stored tensors stacked along their first dimension, each
    /// checked against its expected shape (gate | up, q | k | v: one GEMM for
    /// several projections). Bytes are stacked as stored when the dtype on
    /// disk is the device's, so a large model loads without a float pass.
    pub fn load_stacked(&self, dev: &Device, parts: &[(&str, &[usize])]) -> Result<Tensor> {
        let views = parts
            .iter()
            .map(|&(name, shape)| {
                let v = self.get(name)?;
                let tail_ok = shape.len() == v.shape().len() && shape[1..] == parts[0].1[1..];
                if v.shape() != shape || !tail_ok {
                    return Err(Error::Weights(format!(
                        "tensor `{name}`: expected shape {shape:?} (stacked with {:?}), found {:?}",
                        parts[0].1,
                        v.shape()
                    )));
                }
                Ok(v)
            })
            .collect::<Result<Vec<_>>>()?;
        let Some(first) = parts.first() else {
            return Err(Error::Weights("nothing to stack".into()));
        };
        let mut shape = first.1.to_vec();
        shape[0] = parts.iter().map(|p| p.1[0]).sum();
        let target = dev.activation_dtype();
        if let (Device::Cuda(gpu), true) = (dev, views.iter().all(|v| v.dtype() == target)) {
            let t = Tensor::empty(dev, &shape, target)?;
            if let Storage::Cuda(buf) = t.storage() {
                let mut offset = 0;
                for v in &views {
                    gpu.upload_staged(buf, offset, v.data())?;
                    offset += v.data().len();
                }
            }
            return Ok(t);
        }
        let data: Vec<f32> = views.iter().flat_map(|v| v.to_f32_vec()).collect();
        Tensor::from_f32(dev, &shape, &data, target)
    }

    /// Rows `rows` (of the first dimension) of a stored tensor of
    /// `expected_shape`, placed as `load` places a whole tensor.
    pub fn load_rows(
        &self,
        dev: &Device,
        canonical: &str,
        expected_shape: &[usize],
        rows: std::ops::Range<usize>,
    ) -> Result<Tensor> {
        let view = self.get(canonical)?;
        if view.shape() != expected_shape || rows.start > rows.end || rows.end > expected_shape[0] {
            return Err(Error::Weights(format!(
                "tensor `{canonical}`: rows {rows:?} of expected shape {expected_shape:?}, found {:?}",
                view.shape()
            )));
        }
        let row_bytes = view.data().len() / expected_shape[0].max(1);
        let bytes = &view.data()[rows.start * row_bytes..rows.end * row_bytes];
        let mut shape = expected_shape.to_vec();
        shape[0] = rows.len();
        let target = dev.activation_dtype();
        if dev.is_cuda() && view.dtype() == target {
            return tensor_from_bytes(dev, &shape, target, bytes);
        }
        Tensor::from_f32(dev, &shape, &bytes_to_f32(view.dtype(), bytes), target)
    }

    /// Which canonical tensor serves as the LM head: `lm_head.weight` when
    /// the checkpoint has it, else the token embedding when
    /// `tie_word_embeddings` (HF's `_tied_weights_keys`), else an error.
    pub fn lm_head_name(&self, tie_word_embeddings: bool) -> Result<&'static str> {
        if self.contains(LM_HEAD) {
            Ok(LM_HEAD)
        } else if tie_word_embeddings {
            Ok(EMBED_TOKENS)
        } else {
            Err(Error::Weights(format!(
                "tensor `{LM_HEAD}` is not in the checkpoint ({}) and `tie_word_embeddings` is false, \
                 so the embedding cannot stand in for it",
                self.dir.display()
            )))
        }
    }

    /// The LM head, (vocab_size, hidden_size): see [`Weights::lm_head_name`].
    pub fn lm_head(&self, dev: &Device, tie_word_embeddings: bool, expected_shape: &[usize]) -> Result<Tensor> {
        self.load(dev, self.lm_head_name(tie_word_embeddings)?, expected_shape)
    }
}

/// `weight_map` of an index file: tensor name → shard file name.
fn read_index(index: &Path) -> Result<HashMap<String, String>> {
    let bad = |what: String| Error::Weights(format!("{}: {what}", index.display()));
    let text =
        std::fs::read_to_string(index).map_err(|source| Error::Io { path: index.display().to_string(), source })?;
    let v: Value = serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let Some(map) = v.get("weight_map").and_then(Value::as_object) else {
        return Err(bad("no `weight_map` object".into()));
    };
    let mut out = HashMap::with_capacity(map.len());
    for (tensor, file) in map {
        let Some(file) = file.as_str() else {
            return Err(bad(format!("`weight_map.{tensor}` must be a file name, found {file}")));
        };
        // Shards sit beside the index; refuse paths that would leave the folder.
        if !Path::new(file).components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(bad(format!("`weight_map.{tensor}` is `{file}`; expected a file name in the same folder")));
        }
        out.insert(tensor.clone(), file.to_string());
    }
    Ok(out)
}

/// Maps `file`, parses its header, records its tensors.
fn add_shard(shards: &mut Vec<Shard>, tensors: &mut HashMap<String, Entry>, path: PathBuf, file: File) -> Result<()> {
    // SAFETY: the map is read-only and lives as long as `Weights`; like every
    // mmap-based loader we rely on nobody truncating the file meanwhile.
    let mmap = unsafe { Mmap::map(&file) }.map_err(|source| Error::Io { path: path.display().to_string(), source })?;
    let (header_len, metadata) = SafeTensors::read_metadata(&mmap)
        .map_err(|e| Error::Weights(format!("{}: not a valid safetensors file: {e}", path.display())))?;
    // read_metadata has checked that the offsets tile the data section exactly
    // and that the section ends where the file does.
    let data_start = 8 + header_len;
    let shard = shards.len();
    for (name, info) in metadata.tensors() {
        let (s, e) = info.data_offsets;
        if let Some(prev) = tensors.get(&name) {
            return Err(Error::Weights(format!(
                "tensor `{name}` is in both {} and {}",
                shards[prev.shard].path.display(),
                path.display()
            )));
        }
        let entry =
            Entry { shard, dtype: info.dtype, shape: info.shape.clone(), start: data_start + s, end: data_start + e };
        tensors.insert(name, entry);
    }
    shards.push(Shard { path, mmap });
    Ok(())
}

/// The layout whose language-model prefix the stored names use. The vision
/// prefix is read separately (it follows the layout unless the file says otherwise).
fn detect_layout<'a>(dir: &Path, names: impl Iterator<Item = &'a str> + Clone) -> Result<(Layout, &'static str)> {
    let is_lm = |layout: Layout, name: &str| {
        let rest = name.strip_prefix(layout.text_prefix());
        rest.is_some_and(|r| r.starts_with("embed_tokens.") || r.starts_with("layers.") || r.starts_with("norm."))
    };
    let found: Vec<Layout> = Layout::ALL.into_iter().filter(|&l| names.clone().any(|n| is_lm(l, n))).collect();
    let layout = match found.as_slice() {
        [one] => *one,
        // No language model: judge by the vision tower, else assume canonical.
        [] if names.clone().any(|n| n.starts_with("visual.")) => Layout::Legacy,
        [] => Layout::Current,
        many => {
            return Err(Error::Weights(format!(
                "{}: the checkpoint mixes name layouts {many:?} (language-model tensors under {})",
                dir.display(),
                many.iter().map(|l| format!("`{}`", l.text_prefix())).collect::<Vec<_>>().join(" and ")
            )))
        }
    };
    let has = |p: &str| names.clone().any(|n| n.starts_with(p));
    let vision_prefix = match layout.vision_prefix() {
        p if has(p) => p,
        VISION_PREFIX if has("visual.") => "visual.",
        "visual." if has(VISION_PREFIX) => VISION_PREFIX,
        p => p,
    };
    Ok((layout, vision_prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_from_bytes_widens_on_the_cpu() {
        // bf16 1.0 and -2.5, little-endian.
        let t = tensor_from_bytes(&Device::Cpu, &[2], DType::BF16, &[0x80, 0x3F, 0x20, 0xC0]).unwrap();
        assert_eq!((t.dtype(), t.to_f32_vec().unwrap()), (DType::F32, vec![1.0, -2.5]));
        let t = tensor_from_bytes(&Device::Cpu, &[1], DType::I32, &(-7i32).to_le_bytes()).unwrap();
        assert_eq!(t.to_i32_vec().unwrap(), [-7]);
    }

    #[test]
    fn tensor_from_bytes_checks_the_length() {
        let r = tensor_from_bytes(&Device::Cpu, &[3], DType::F16, &[0; 4]);
        assert!(matches!(r, Err(Error::Shape { op: "tensor_from_bytes", .. })), "{r:?}");
    }

    #[test]
    fn unaligned_bytes_convert() {
        // Safetensors data need not be aligned: read from an odd offset.
        let mut buf = vec![0u8; 1];
        buf.extend(1.5f32.to_le_bytes());
        buf.extend((-0.25f32).to_le_bytes());
        assert_eq!(bytes_to_f32(DType::F32, &buf[1..]), [1.5, -0.25]);
    }
}
