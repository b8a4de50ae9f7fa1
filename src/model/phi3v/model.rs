//! Phi-3.5-vision assembled on the device: the CLIP tower on every view of
//! every image, the 2×2 merge with the learned separators in the remote
//! code's order, the projector, and the shared decoder as Phi-3. Mirrors
//! image_embedding_phi3_v.py: `get_img_features` (hidden_states[layer_idx],
//! `[:, 1:]`), `hd_feature_transform` ('sub_glb': the crops' merged grid
//! with a `sub_GN` after every row, `glb_GN`, the global view's grid with
//! its row separators), `reshape_hd_patches_2x2merge`, `add_image_newline`,
//! `img_projection`.
//!
//! The merge and the separators are one row gather: a merged token is the
//! four C-wide patch rows (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1)
//! side by side, so viewing the (tokens, 4C) result as (4·tokens, C) makes
//! every C-wide piece one row of [tower outputs; sub_GN as 4 rows; glb_GN as
//! 4 rows], picked by an index list built on the host.

use std::path::Path;

use super::config::Phi3VConfig;
use crate::error::Result;
use crate::model::connector::MlpProjector;
use crate::model::contract::{Model, ModelSpec};
use crate::model::decoder::Decoder;
use crate::model::inputs::{image_media_features, MediaFeatures, PreparedInput};
use crate::model::vision::clip::{ClipDims, ClipVision};
use crate::model::vision::VisionAct;
use crate::ops::embedding;
use crate::tensor::{Device, Tensor};

pub struct Phi3V {
    pub config: Phi3VConfig,
    pub spec: ModelSpec,
    pub device: Device,
    pub vision: ClipVision,
    /// sub_GN then glb_GN, each as 4 rows of the tower's width: (8, C).
    separators: Tensor,
    pub projector: MlpProjector,
    pub text: Decoder,
}

/// The tower's shape from the config.
pub fn clip_dims(c: &Phi3VConfig) -> Result<ClipDims> {
    c.vision_config.dims("img_processor.vision_config.hidden_act")
}

/// Rows of the gather for one image of `crops` = [h, w] crops whose views
/// (global first, then the crops row-major) start at tower row `base`, each
/// view `side`² patches after its class token; `sep` is the first separator
/// row (sub_GN at sep..sep+4, glb_GN at sep+4..sep+8). Appends to `out`
/// 4 indices per image token, in the remote code's token order.
pub fn gather_rows(out: &mut Vec<i32>, base: usize, crops: [usize; 2], side: usize, sep: usize) {
    let half = side / 2;
    let view_rows = side * side + 1;
    let merged = |out: &mut Vec<i32>, view: usize, i: usize, j: usize| {
        let v0 = base + view * view_rows + 1; // skip the class token
        for (di, dj) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            out.push((v0 + (2 * i + di) * side + 2 * j + dj) as i32);
        }
    };
    let sub_gn = |out: &mut Vec<i32>| out.extend((sep..sep + 4).map(|r| r as i32));
    let [h, w] = crops;
    // The crops' merged grid, (h·half) rows of (w·half) tokens and a sub_GN.
    for r in 0..h * half {
        for c in 0..w * half {
            let view = 1 + (r / half) * w + c / half;
            merged(out, view, r % half, c % half);
        }
        sub_gn(out);
    }
    out.extend((sep + 4..sep + 8).map(|r| r as i32)); // glb_GN
    for i in 0..half {
        for j in 0..half {
            merged(out, 0, i, j);
        }
        sub_gn(out);
    }
}

impl Phi3V {
    pub fn load(dir: &Path, dev: &Device) -> Result<Self> {
        let config = Phi3VConfig::from_dir(dir)?;
        let w = super::open_weights(dir)?;
        let dims = clip_dims(&config)?;
        let run = dims.layers_for(config.layer_idx)?;
        let pre = super::VISION_PREFIX;
        let vision = ClipVision::load(&w, dev, &format!("{pre}.img_processor.vision_model"), dims, run)?;
        let c = config.vision_config.hidden_size;
        let sub = w.load(dev, &format!("{pre}.sub_GN"), &[1, 1, 1, 4 * c])?.reshape(&[4, c])?;
        let glb = w.load(dev, &format!("{pre}.glb_GN"), &[1, 1, 4 * c])?.reshape(&[4, c])?;
        let mut separators = Tensor::empty(dev, &[8, c], dev.activation_dtype())?;
        separators.copy_rows_from(0, &sub, 0, 4)?;
        separators.copy_rows_from(4, &glb, 0, 4)?;
        let th = config.text_config.hidden_size;
        let projector = MlpProjector::load(
            &w,
            dev,
            (&format!("{pre}.img_projection.0"), &format!("{pre}.img_projection.2")),
            (4 * c, th, th),
            VisionAct::Gelu,
            true,
        )?;
        let spec = super::processor::spec_in(dir, &config)?;
        let text = Decoder::load(&w, dev, spec.decoder.clone())?;
        if let Device::Cuda(gpu) = dev {
            gpu.end_staging()?;
        }
        Ok(Self { config, spec, device: dev.clone(), vision, separators, projector, text })
    }

    /// Image features (Σ tokens, text hidden) of pixel_values: per image
    /// (1 + h·w, C, 336, 336) on the host (global view first), with each
    /// image's crop grid [1, h, w] in `grids`.
    pub fn encode_images(
        &self,
        pixel_values: &[f32],
        grids: &[[usize; 3]],
        observe: &mut dyn FnMut(&str, &Tensor),
    ) -> Result<Tensor> {
        let d = &self.vision.dims;
        let dt = self.device.activation_dtype();
        let patches = self.vision.patchify(pixel_values);
        let n = patches.len() / d.patch_dim();
        let pt = Tensor::from_f32(&self.device, &[n, d.patch_dim()], &patches, dt)?;
        let h = self.vision.forward(&pt, observe)?; // (views · (side² + 1), C)
        observe("vision.features", &h);
        let rows = h.shape()[0];
        let mut table = Tensor::empty(&self.device, &[rows + 8, d.hidden], dt)?;
        table.copy_rows_from(0, &h, 0, rows)?;
        table.copy_rows_from(rows, &self.separators, 0, 8)?;
        let mut idx = Vec::new();
        let mut base = 0;
        for g in grids {
            gather_rows(&mut idx, base, [g[1], g[2]], d.side(), rows);
            base += (1 + g[1] * g[2]) * (d.side() * d.side() + 1);
        }
        crate::ensure_shape!(base == rows, "phi3v", "{rows} tower rows for crop grids {grids:?} needing {base}");
        let ids = Tensor::from_i32(&self.device, &[idx.len()], &idx)?;
        let mut merged = Tensor::empty(&self.device, &[idx.len(), d.hidden], dt)?;
        embedding::embedding(&mut merged, &ids, &table)?;
        let merged = merged.reshape(&[idx.len() / 4, 4 * d.hidden])?;
        observe("vision.merged", &merged);
        let out = self.projector.forward(&merged)?;
        observe("projector", &out);
        Ok(out)
    }
}

impl Model for Phi3V {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn decoder(&self) -> &Decoder {
        &self.text
    }

    fn encode_media(&self, input: &PreparedInput, observe: &mut dyn FnMut(&str, &Tensor)) -> Result<MediaFeatures> {
        let ms = self.config.merged_side();
        image_media_features(
            &self.device,
            self.text.dims.hidden,
            input,
            || self.encode_images(&input.images.values, &input.images.grids, observe),
            |g| super::processor::tokens_for(ms, [g[1], g[2]]),
        )
    }

    /// The tower's live tensors for one image's views at once: residual,
    /// norm, q/k/v, attention out, projection (7 × hidden wide) and the MLP
    /// (2 × intermediate) per row, the f32 upload, and the merged rows
    /// through the projector (4C in, decoder hidden out).
    fn vision_peak_bytes(&self, pixels: usize) -> usize {
        let d = &self.vision.dims;
        let views = pixels.div_ceil(d.image_size * d.image_size).max(1);
        let rows = views * (d.patches() + 1);
        let elt = self.device.activation_dtype().size();
        let tower = rows * ((7 * d.hidden + 2 * d.intermediate) * elt + d.patch_dim() * 4);
        let th = self.text.dims.hidden;
        tower + rows * (d.hidden + 2 * th) * elt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gather against the remote code's reshapes, written out: for a
    /// 1×2 crop grid with 4×4 patches per view (2×2 merged tokens).
    #[test]
    fn gather_follows_the_remote_reshapes() {
        let side = 4;
        let view_rows = side * side + 1;
        let mut idx = Vec::new();
        gather_rows(&mut idx, 0, [1, 2], side, 3 * view_rows);
        // Tokens: 2 rows × (4 + 1) + 1 glb + 2 rows × (2 + 1) = 17.
        assert_eq!(idx.len(), 17 * 4);
        let token = |k: usize| &idx[4 * k..4 * k + 4];
        let patch = |view: usize, r: usize, c: usize| (view * view_rows + 1 + r * side + c) as i32;
        // First row: crop 1's merged (0, 0), (0, 1), then crop 2's, then sub_GN.
        assert_eq!(token(0), [patch(1, 0, 0), patch(1, 0, 1), patch(1, 1, 0), patch(1, 1, 1)]);
        assert_eq!(token(1), [patch(1, 0, 2), patch(1, 0, 3), patch(1, 1, 2), patch(1, 1, 3)]);
        assert_eq!(token(2), [patch(2, 0, 0), patch(2, 0, 1), patch(2, 1, 0), patch(2, 1, 1)]);
        let sep = (3 * view_rows) as i32;
        assert_eq!(token(4), [sep, sep + 1, sep + 2, sep + 3]);
        // Second row starts at the crops' patch row 2.
        assert_eq!(token(5), [patch(1, 2, 0), patch(1, 2, 1), patch(1, 3, 0), patch(1, 3, 1)]);
        // glb_GN, then the global view (view 0) with its own row separators.
        assert_eq!(token(10), [sep + 4, sep + 5, sep + 6, sep + 7]);
        assert_eq!(token(11), [patch(0, 0, 0), patch(0, 0, 1), patch(0, 1, 0), patch(0, 1, 1)]);
        assert_eq!(token(13), [sep, sep + 1, sep + 2, sep + 3]);
        assert_eq!(token(16), [sep, sep + 1, sep + 2, sep + 3]);
        assert_eq!(super::super::processor::tokens_for(side / 2, [1, 2]), 17);
    }
}
