//! Precomputed image embeddings, sent instead of pixels: a safetensors file
//! (never pickle) holding the vision tower's output and the patch grids.
//!
//! Mirrors vLLM's `image_embeds` input for Qwen2-VL
//! (`Qwen2VLImageEmbeddingInputs` in vllm/model_executor/models/qwen2_vl.py):
//! - `image_embeds`: (Σ tokens, hidden) or (images, tokens, hidden), in the
//!   LM's hidden size, f32, bf16 or f16;
//! - `image_grid_thw`: (images, 3) or (3,) patch grids [t, h, w], i64 or i32;
//!
//! where each image has tokens = t·h·w / merge² rows (the patch merger folds
//! merge × merge patches into one token).
//!
//! Fixed-size encoders (LLaVA-1.5: the projector's output, 576 rows per
//! image) need no grid: [`parse_fixed_image_embeds`] reads `image_embeds`
//! as (images, tokens, hidden) or (tokens, hidden), as vLLM's
//! `LlavaImageEmbeddingInputs` takes it.

use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};
use crate::multimodal::Media;

/// Tensor names in the file, as vLLM's multimodal data dict calls them.
pub const EMBEDS: &str = "image_embeds";
pub const GRID: &str = "image_grid_thw";

/// One `Media::ImageEmbeds` per image of the file, in order. `merge` is the
/// vision config's `spatial_merge_size`, `hidden` the LM's `hidden_size`.
pub fn parse_image_embeds(bytes: &[u8], merge: usize, hidden: usize) -> Result<Vec<Media>> {
    let bad = |msg: String| Error::InvalidInput(format!("image_embeds file: {msg}"));
    let st = SafeTensors::deserialize(bytes).map_err(|e| bad(format!("not a valid safetensors file ({e})")))?;
    let tensor = |name: &str| {
        st.tensor(name).map_err(|_| {
            let mut have = st.names();
            have.sort();
            bad(format!("it has no tensor `{name}` (it has: {})", have.join(", ")))
        })
    };
    let (embeds, grid) = (tensor(EMBEDS)?, tensor(GRID)?);

    let grids = read_grids(grid.dtype(), grid.shape(), grid.data()).map_err(bad)?;
    let mut tokens = Vec::with_capacity(grids.len());
    for g in &grids {
        if g.contains(&0) || merge == 0 || g[1] % merge != 0 || g[2] % merge != 0 {
            return Err(bad(format!(
                "{GRID} {g:?}: t, h and w must be positive, h and w multiples of the merge size {merge}"
            )));
        }
        let n = g[0].checked_mul(g[1]).and_then(|v| v.checked_mul(g[2])).map(|v| v / (merge * merge));
        tokens.push(n.ok_or_else(|| bad(format!("{GRID} {g:?} is too large")))?);
    }

    let shape = embeds.shape();
    let (rows, width) = match *shape {
        [rows, width] => (rows, width),
        [n, per, width] => {
            if n != grids.len() {
                return Err(bad(format!("{EMBEDS} holds {n} images but {GRID} has {} grids", grids.len())));
            }
            if let Some((i, (g, &t))) = grids.iter().zip(&tokens).enumerate().find(|(_, (_, &t))| t != per) {
                return Err(bad(format!(
                    "{EMBEDS} has {per} tokens per image, but image {i}'s grid {g:?} needs {t} \
                     (t·h·w / {merge}²); images with different grids go in the 2-D (tokens, hidden) layout"
                )));
            }
            (n * per, width)
        }
        _ => {
            return Err(bad(format!(
                "{EMBEDS} must be (tokens, hidden) or (images, tokens, hidden), got shape {shape:?}"
            )))
        }
    };
    if width != hidden {
        return Err(bad(format!("{EMBEDS} rows have {width} values; the model's hidden size is {hidden}")));
    }
    let need: usize = tokens.iter().sum();
    if rows != need {
        return Err(bad(format!(
            "{EMBEDS} has {rows} rows, but the grids {grids:?} need {need} (t·h·w / {merge}² each)"
        )));
    }

    let values = to_f32(embeds.dtype(), embeds.data()).map_err(bad)?; // (rows, hidden)
    let mut out = Vec::with_capacity(grids.len());
    let mut start = 0;
    for (g, t) in grids.into_iter().zip(tokens) {
        let end = start + t * hidden;
        out.push(Media::ImageEmbeds { values: values[start..end].to_vec(), grid: g });
        start = end;
    }
    Ok(out)
}

/// Each image's (tokens, hidden) values of a file whose `image_embeds` is
/// (images, tokens, hidden) or one image's (tokens, hidden), for a model
/// whose encoder gives every image `tokens` rows of `hidden`.
pub fn parse_fixed_image_embeds(bytes: &[u8], tokens: usize, hidden: usize) -> Result<Vec<Vec<f32>>> {
    let bad = |msg: String| Error::InvalidInput(format!("image_embeds file: {msg}"));
    let st = SafeTensors::deserialize(bytes).map_err(|e| bad(format!("not a valid safetensors file ({e})")))?;
    let embeds = st.tensor(EMBEDS).map_err(|_| {
        let mut have = st.names();
        have.sort();
        bad(format!("it has no tensor `{EMBEDS}` (it has: {})", have.join(", ")))
    })?;
    let (images, per, width) = match *embeds.shape() {
        [per, width] => (1, per, width),
        [n, per, width] if n > 0 => (n, per, width),
        ref shape => {
            return Err(bad(format!(
                "{EMBEDS} must be ({tokens}, {hidden}) or (images, {tokens}, {hidden}), got shape {shape:?}"
            )))
        }
    };
    if (per, width) != (tokens, hidden) {
        return Err(bad(format!(
            "{EMBEDS} has {per} rows of {width} per image; this model needs {tokens} rows of {hidden} \
             (its projector's output)"
        )));
    }
    let values = to_f32(embeds.dtype(), embeds.data()).map_err(bad)?;
    Ok(values.chunks_exact(tokens * hidden).take(images).map(<[f32]>::to_vec).collect())
}

/// Tensor name of the per-image sizes a sized encoder needs (vLLM's
/// `image_sizes` for Phi-3-vision, MiniCPM-V's `image_size_list`).
pub const SIZES: &str = "image_sizes";

/// One `Media::ImageEmbeds` per image of a file holding `image_embeds`
/// ((Σ tokens, hidden) or (images, tokens, hidden)) and `image_sizes`
/// ((images, 2) or (2,), i64 or i32, [height, width] as the family's
/// processor reports them), for encoders whose token count follows from the
/// size: `layout` maps a size to the item's grid and token count, or says
/// why the size is unusable.
pub fn parse_sized_image_embeds(
    bytes: &[u8],
    hidden: usize,
    layout: impl Fn([usize; 2]) -> std::result::Result<([usize; 3], usize), String>,
) -> Result<Vec<Media>> {
    let bad = |msg: String| Error::InvalidInput(format!("image_embeds file: {msg}"));
    let st = SafeTensors::deserialize(bytes).map_err(|e| bad(format!("not a valid safetensors file ({e})")))?;
    let tensor = |name: &str| {
        st.tensor(name).map_err(|_| {
            let mut have = st.names();
            have.sort();
            bad(format!("it has no tensor `{name}` (it has: {})", have.join(", ")))
        })
    };
    let (embeds, sizes) = (tensor(EMBEDS)?, tensor(SIZES)?);
    let flat: Vec<usize> = match sizes.dtype() {
        Dtype::I64 => {
            sizes.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()).max(0) as usize).collect()
        }
        Dtype::I32 => {
            sizes.data().chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()).max(0) as usize).collect()
        }
        other => return Err(bad(format!("{SIZES} must be i64 or i32, got {other:?}"))),
    };
    match *sizes.shape() {
        [2] | [_, 2] => {}
        ref s => return Err(bad(format!("{SIZES} must be (images, 2) or (2,), got shape {s:?}"))),
    }
    let mut items = Vec::with_capacity(flat.len() / 2);
    for hw in flat.chunks_exact(2) {
        items.push(layout([hw[0], hw[1]]).map_err(|m| bad(format!("{SIZES}: {m}")))?);
    }
    let (rows, width) = match *embeds.shape() {
        [rows, width] => (rows, width),
        [n, per, width] => {
            if n != items.len() {
                return Err(bad(format!("{EMBEDS} holds {n} images but {SIZES} has {} sizes", items.len())));
            }
            if let Some((i, (_, t))) = items.iter().enumerate().find(|(_, (_, t))| *t != per) {
                return Err(bad(format!(
                    "{EMBEDS} has {per} tokens per image, but image {i}'s size needs {t}; images of different \
                     sizes go in the 2-D (tokens, hidden) layout"
                )));
            }
            (n * per, width)
        }
        ref s => {
            return Err(bad(format!("{EMBEDS} must be (tokens, hidden) or (images, tokens, hidden), got shape {s:?}")))
        }
    };
    if width != hidden {
        return Err(bad(format!("{EMBEDS} rows have {width} values; the model's hidden size is {hidden}")));
    }
    let need: usize = items.iter().map(|(_, t)| t).sum();
    if rows != need {
        return Err(bad(format!("{EMBEDS} has {rows} rows, but the {} image sizes need {need}", items.len())));
    }
    let values = to_f32(embeds.dtype(), embeds.data()).map_err(bad)?;
    let mut out = Vec::with_capacity(items.len());
    let mut start = 0;
    for (grid, t) in items {
        let end = start + t * hidden;
        out.push(Media::ImageEmbeds { values: values[start..end].to_vec(), grid });
        start = end;
    }
    Ok(out)
}

/// `image_grid_thw` as [t, h, w] triples: shape (images, 3) or (3,).
fn read_grids(dtype: Dtype, shape: &[usize], data: &[u8]) -> std::result::Result<Vec<[usize; 3]>, String> {
    let n = match *shape {
        [3] => 1,
        [n, 3] if n > 0 => n,
        _ => return Err(format!("{GRID} must be (images, 3) or (3,), got shape {shape:?}")),
    };
    let vals: Vec<i64> = match dtype {
        Dtype::I64 => data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect(),
        Dtype::I32 => data.chunks_exact(4).map(|c| i64::from(i32::from_le_bytes(c.try_into().unwrap()))).collect(),
        other => return Err(format!("{GRID} is {other}; expected I64 or I32")),
    };
    debug_assert_eq!(vals.len(), n * 3); // safetensors checked the byte length
    vals.chunks_exact(3)
        .map(|c| {
            let u = |v: i64| usize::try_from(v).map_err(|_| format!("{GRID} {c:?} has a negative entry"));
            Ok([u(c[0])?, u(c[1])?, u(c[2])?])
        })
        .collect()
}

/// Little-endian f32, bf16 or f16 bytes as f32.
fn to_f32(dtype: Dtype, data: &[u8]) -> std::result::Result<Vec<f32>, String> {
    let half = |f: fn(u16) -> f32| data.chunks_exact(2).map(|c| f(u16::from_le_bytes([c[0], c[1]]))).collect();
    Ok(match dtype {
        Dtype::F32 => data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
        Dtype::BF16 => half(|b| half::bf16::from_bits(b).to_f32()),
        Dtype::F16 => half(|b| half::f16::from_bits(b).to_f32()),
        other => return Err(format!("{EMBEDS} is {other}; expected F32, BF16 or F16")),
    })
}

#[cfg(test)]
mod tests {
    use safetensors::tensor::TensorView;

    use super::*;

    /// A safetensors file of (name, dtype, shape, little-endian bytes).
    fn file(tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
        let views: Vec<(&str, TensorView)> =
            tensors.iter().map(|(n, d, s, b)| (*n, TensorView::new(*d, s.clone(), b).unwrap())).collect();
        safetensors::serialize(views, None).unwrap()
    }

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn i64s(v: &[i64]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// Distinct, non-round values so a misplaced row shows.
    fn ramp(n: usize) -> Vec<f32> {
        (0..n).map(|i| i as f32 * 0.37 - 5.0).collect()
    }

    fn unpack(m: &Media) -> (&[f32], [usize; 3]) {
        match m {
            Media::ImageEmbeds { values, grid } => (values, *grid),
            _ => panic!("expected ImageEmbeds"),
        }
    }

    fn err(bytes: &[u8], merge: usize, hidden: usize) -> String {
        match parse_image_embeds(bytes, merge, hidden) {
            Err(e @ Error::InvalidInput(_)) => e.to_string(),
            Err(e) => panic!("expected InvalidInput, got {e}"),
            Ok(v) => panic!("expected an error, got {} images", v.len()),
        }
    }

    #[test]
    fn two_dimensional_rows_split_by_grid() {
        // merge 2, hidden 3: grids [1,2,4], [2,2,2] and [1,4,6] are 2, 2 and 6 tokens.
        let grids = [1, 2, 4, 2, 2, 2, 1, 4, 6];
        let vals = ramp(10 * 3);
        let f = file(&[(EMBEDS, Dtype::F32, vec![10, 3], f32s(&vals)), (GRID, Dtype::I64, vec![3, 3], i64s(&grids))]);
        let out = parse_image_embeds(&f, 2, 3).unwrap();
        assert_eq!(out.len(), 3);
        assert_eq!(unpack(&out[0]), (&vals[0..6], [1, 2, 4]));
        assert_eq!(unpack(&out[1]), (&vals[6..12], [2, 2, 2]));
        assert_eq!(unpack(&out[2]), (&vals[12..30], [1, 4, 6]));
    }

    #[test]
    fn three_dimensional_and_single_grid_layouts() {
        let vals = ramp(2 * 3 * 5);
        let f = file(&[
            (EMBEDS, Dtype::F32, vec![2, 3, 5], f32s(&vals)),
            (GRID, Dtype::I32, vec![2, 3], [1i32, 2, 6, 1, 6, 2].iter().flat_map(|x| x.to_le_bytes()).collect()),
        ]);
        let out = parse_image_embeds(&f, 2, 5).unwrap();
        assert_eq!(unpack(&out[1]), (&vals[15..30], [1, 6, 2]));

        let vals = ramp(4 * 2);
        let f = file(&[(EMBEDS, Dtype::F32, vec![4, 2], f32s(&vals)), (GRID, Dtype::I64, vec![3], i64s(&[1, 4, 4]))]);
        let out = parse_image_embeds(&f, 2, 2).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(unpack(&out[0]), (&vals[..], [1, 4, 4]));
    }

    #[test]
    fn half_precision_is_widened() {
        let vals = [1.5f32, -2.25, 0.0078125, 300.0];
        let bf: Vec<u8> = vals.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect();
        let hf: Vec<u8> = vals.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect();
        for (dtype, data) in [(Dtype::BF16, bf), (Dtype::F16, hf)] {
            let f = file(&[(EMBEDS, dtype, vec![1, 4], data), (GRID, Dtype::I64, vec![1, 3], i64s(&[1, 2, 2]))]);
            let out = parse_image_embeds(&f, 2, 4).unwrap();
            assert_eq!(unpack(&out[0]).0, &vals, "{dtype}");
        }
    }

    #[test]
    fn mismatches_are_named() {
        let grid = (GRID, Dtype::I64, vec![1, 3], i64s(&[1, 4, 4])); // 4 tokens at merge 2
        let e = err(&file(&[(EMBEDS, Dtype::F32, vec![4, 3], f32s(&ramp(12))), grid.clone()]), 2, 8);
        assert!(e.contains("rows have 3 values; the model's hidden size is 8"), "{e}");
        let e = err(&file(&[(EMBEDS, Dtype::F32, vec![5, 3], f32s(&ramp(15))), grid.clone()]), 2, 3);
        assert!(e.contains("has 5 rows, but the grids [[1, 4, 4]] need 4"), "{e}");
        let e = err(&file(&[(EMBEDS, Dtype::F32, vec![2, 2, 3], f32s(&ramp(12))), grid.clone()]), 2, 3);
        assert!(e.contains("holds 2 images but image_grid_thw has 1 grids"), "{e}");
        let e = err(&file(&[(EMBEDS, Dtype::F32, vec![1, 3, 3], f32s(&ramp(9))), grid.clone()]), 2, 3);
        assert!(e.contains("3 tokens per image, but image 0's grid [1, 4, 4] needs 4"), "{e}");
        let e = err(&file(&[(EMBEDS, Dtype::F32, vec![12], f32s(&ramp(12))), grid.clone()]), 2, 3);
        assert!(e.contains("got shape [12]"), "{e}");
        let odd = (GRID, Dtype::I64, vec![1, 3], i64s(&[1, 3, 4]));
        let e = err(&file(&[(EMBEDS, Dtype::F32, vec![3, 3], f32s(&ramp(9))), odd]), 2, 3);
        assert!(e.contains("multiples of the merge size 2"), "{e}");
        let neg = (GRID, Dtype::I64, vec![1, 3], i64s(&[1, -4, 4]));
        let e = err(&file(&[(EMBEDS, Dtype::F32, vec![4, 3], f32s(&ramp(12))), neg]), 2, 3);
        assert!(e.contains("negative"), "{e}");
        let flat = (GRID, Dtype::I64, vec![6], i64s(&[1, 4, 4, 1, 4, 4]));
        let e = err(&file(&[(EMBEDS, Dtype::F32, vec![8, 3], f32s(&ramp(24))), flat]), 2, 3);
        assert!(e.contains("(images, 3) or (3,)"), "{e}");
    }

    #[test]
    fn missing_tensors_bad_dtypes_and_garbage() {
        let grid = (GRID, Dtype::I64, vec![1, 3], i64s(&[1, 2, 2]));
        let e = err(&file(std::slice::from_ref(&grid)), 2, 3);
        assert!(e.contains("no tensor `image_embeds` (it has: image_grid_thw)"), "{e}");
        let e = err(&file(&[(EMBEDS, Dtype::F32, vec![1, 3], f32s(&ramp(3)))]), 2, 3);
        assert!(e.contains("no tensor `image_grid_thw`"), "{e}");
        let e = err(&file(&[(EMBEDS, Dtype::I32, vec![1, 3], vec![0; 12]), grid.clone()]), 2, 3);
        assert!(e.contains("expected F32, BF16 or F16"), "{e}");
        let f = file(&[(EMBEDS, Dtype::F32, vec![1, 3], f32s(&ramp(3))), (GRID, Dtype::F32, vec![3], f32s(&[1.0; 3]))]);
        assert!(err(&f, 2, 3).contains("expected I64 or I32"));
        for garbage in [&b""[..], b"\x10\0\0\0\0\0\0\0{not json}", b"\xff\xff\xff\xff\xff\xff\xff\xff"] {
            assert!(err(garbage, 2, 3).contains("not a valid safetensors file"));
        }
        // Truncated: the header promises more data than there is.
        let good = file(&[(EMBEDS, Dtype::F32, vec![1, 3], f32s(&ramp(3))), grid]);
        assert!(err(&good[..good.len() - 4], 2, 3).contains("not a valid safetensors file"));
    }
}
