//! LLaVA-1.5 assembled: the CLIP tower up to its feature layer, the class
//! token dropped ("default" strategy), the MLP projector, and the shared
//! decoder as Llama (no q/k/v biases, 1-D RoPE, untied head). Mirrors
//! transformers `models/llava/modeling_llava.py`:
//! `LlavaModel.get_image_features` (hidden_states[vision_feature_layer],
//! `[:, 1:]`), `LlavaMultiModalProjector`, and the masked scatter of image
//! features into the `<image>` rows.

use std::path::Path;

use super::config::LlavaConfig;
use crate::error::Result;
use crate::model::connector::MlpProjector;
use crate::model::contract::{Model, ModelSpec};
use crate::model::decoder::Decoder;
use crate::model::inputs::{image_media_features, MediaFeatures, PreparedInput};
use crate::model::vision::clip::{ClipDims, ClipVision};
use crate::model::vision::VisionAct;
use crate::tensor::{Device, Tensor};

pub struct Llava {
    pub config: LlavaConfig,
    pub spec: ModelSpec,
    pub device: Device,
    pub vision: ClipVision,
    pub projector: MlpProjector,
    pub text: Decoder,
}

/// The tower's shape from the config.
pub fn clip_dims(c: &LlavaConfig) -> Result<ClipDims> {
    c.vision_config.dims("vision_config.hidden_act")
}

impl Llava {
    pub fn load(dir: &Path, dev: &Device) -> Result<Self> {
        let config = LlavaConfig::from_dir(dir)?;
        let w = super::open_weights(dir)?;
        let dims = clip_dims(&config)?;
        let run = dims.layers_for(config.vision_feature_layer)?;
        let vision = ClipVision::load(&w, dev, super::VISION_PREFIX, dims, run)?;
        let act = VisionAct::from_config(config.projector_hidden_act, "projector_hidden_act")?;
        let (vh, th) = (config.vision_config.hidden_size, config.text_config.hidden_size);
        let p = "model.multi_modal_projector";
        let projector = MlpProjector::load(
            &w,
            dev,
            (&format!("{p}.linear_1"), &format!("{p}.linear_2")),
            (vh, th, th),
            act,
            config.multimodal_projector_bias,
        )?;
        let spec = super::spec(&config);
        let text = Decoder::load(&w, dev, spec.decoder.clone())?;
        if let Device::Cuda(gpu) = dev {
            gpu.end_staging()?;
        }
        Ok(Self { config, spec, device: dev.clone(), vision, projector, text })
    }

    /// Image features (images · tokens, text hidden) of pixel_values
    /// (images, C, S, S) on the host: the tower, the feature layer without
    /// the class token (unless "full"), the projector.
    pub fn encode_images(&self, pixel_values: &[f32], observe: &mut dyn FnMut(&str, &Tensor)) -> Result<Tensor> {
        let d = &self.vision.dims;
        let patches = self.vision.patchify(pixel_values);
        let n = patches.len() / d.patch_dim();
        let dt = self.device.activation_dtype();
        let pt = Tensor::from_f32(&self.device, &[n, d.patch_dim()], &patches, dt)?;
        let h = self.vision.forward(&pt, observe)?;
        let (images, seq) = (n / d.patches(), d.patches() + 1);
        let keep = self.config.image_tokens();
        let feats = if keep == seq {
            h
        } else {
            let mut f = Tensor::empty(&self.device, &[images * keep, d.hidden], dt)?;
            for i in 0..images {
                f.copy_rows_from(i * keep, &h, i * seq + (seq - keep), keep)?;
            }
            f
        };
        observe("vision.features", &feats);
        let out = self.projector.forward(&feats)?;
        observe("projector", &out);
        Ok(out)
    }
}

impl Model for Llava {
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
        let tokens = self.config.image_tokens();
        image_media_features(
            &self.device,
            self.text.dims.hidden,
            input,
            || self.encode_images(&input.images.values, observe),
            |_| tokens,
        )
    }

    /// The tower's live tensors for one image at a time, all images being
    /// the same size: residual, norm, q/k/v, attention out, projection
    /// (7 × hidden wide) and the MLP (2 × intermediate), plus the f32 upload.
    fn vision_peak_bytes(&self, pixels: usize) -> usize {
        let d = &self.vision.dims;
        let rows = pixels / (d.patch * d.patch) + 1;
        let elt = self.device.activation_dtype().size();
        rows * ((7 * d.hidden + 2 * d.intermediate) * elt + d.patch_dim() * 4)
    }
}
