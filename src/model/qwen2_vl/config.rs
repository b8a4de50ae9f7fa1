//! Qwen2-VL `config.json` → [`Qwen2VlConfig`], the numbers the model code uses.
//!
//! Mirrors transformers `models/qwen2_vl/configuration_qwen2_vl.py`
//! (`Qwen2VLConfig`, `Qwen2VLTextConfig`, `Qwen2VLVisionConfig`) and the RoPE
//! handling of `modeling_rope_utils.py`, across the layouts that history wrote:
//!
//! - **flat** (the hub files, transformers < 4.52): language-model fields at the
//!   top level, `rope_theta` beside them, `rope_scaling = {"type": "mrope",
//!   "mrope_section": [16, 24, 24]}`.
//! - **flat, re-saved by 4.45–4.51**: the config class rewrote `"mrope"` to
//!   `"default"` and copied `type` to `rope_type`, so the file says
//!   `{"type": "default", "rope_type": "default", "mrope_section": [..]}`.
//! - **nested** (4.52 – 4.57): the same fields inside `text_config`.
//! - **transformers 5**: `text_config.rope_parameters = {"rope_type": "default",
//!   "type": "mrope", "rope_theta": .., "mrope_section": [..]}` (`rope_theta`
//!   moved inside), `dtype` instead of `torch_dtype`, `tie_word_embeddings` on
//!   the top level, `vision_config.rope_parameters = {"rope_type": "axial",
//!   "rope_theta": 10000.0}`; `rope_parameters` may also be keyed by layer type
//!   (`{"full_attention": {..}}`).
//!
//! tests/loader/configs/ holds the published 2B and 7B files and what
//! transformers 4.46.3, 4.53.3 and 5.24.0 write when they re-save them; all
//! parse to the same values here, as they do in transformers 5.24.
//!
//! Field names stay HF's. Language-model fields are read from `text_config`
//! first and from the top level when `text_config` lacks them (files written
//! by 4.52–4.57 carry both). Where HF falls back to a default we do too, except
//! for the sizes that define the network (hidden, intermediate, layers, heads,
//! kv heads, vocab): HF would silently default those to its 72B values, we
//! say which field is missing.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::config::{require_gqa, require_positive, Activation, Obj};

/// `architectures` values we serve.
pub const SUPPORTED_ARCHITECTURES: [&str; 2] = ["Qwen2VLForConditionalGeneration", "Qwen2VLModel"];

/// Which HF class the checkpoint was saved from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// `Qwen2VLForConditionalGeneration`: the chat models, with an LM head.
    ConditionalGeneration,
    /// `Qwen2VLModel`: the base model without LM head (embedding checkpoints
    /// such as DSE pool its last hidden state).
    Model,
}

/// The language model (`Qwen2VLTextConfig`; modeling_qwen2_vl.py `Qwen2VLTextModel`).
#[derive(Clone, Debug, PartialEq)]
pub struct TextConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// hidden_size / num_attention_heads, as `Qwen2VLAttention` computes it
    /// (a `head_dim` field in config.json is not read by HF for Qwen2-VL).
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// Rotary frequency pairs given to the temporal, height and width
    /// positions; sums to head_dim / 2 (`apply_multimodal_rotary_pos_emb`).
    pub mrope_section: [usize; 3],
    pub max_position_embeddings: usize,
    /// Always `Silu` (checked): the MLP is silu(gate) · up.
    pub hidden_act: Activation,
    /// Whether `lm_head` shares the token embedding.
    pub tie_word_embeddings: bool,
}

/// The vision tower (`Qwen2VLVisionConfig`; `Qwen2VisionTransformerPretrainedModel`).
#[derive(Clone, Debug, PartialEq)]
pub struct VisionConfig {
    pub depth: usize,
    pub embed_dim: usize,
    pub num_heads: usize,
    /// embed_dim / num_heads.
    pub head_dim: usize,
    pub mlp_ratio: f64,
    /// int(embed_dim · mlp_ratio), as `Qwen2VLVisionBlock` computes it.
    pub mlp_hidden_dim: usize,
    /// Width the patch merger projects to: the language model's hidden_size.
    pub hidden_size: usize,
    pub hidden_act: Activation,
    pub in_channels: usize,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub spatial_merge_size: usize,
    /// Base of the 2-D vision RoPE (`VisionRotaryEmbedding`, 10000 before
    /// transformers 5 made it `vision_config.rope_parameters.rope_theta`).
    pub rope_theta: f64,
}

impl VisionConfig {
    /// Values in one flattened patch: in_channels · temporal_patch_size · patch_size².
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }
    /// Width of the merger MLP: embed_dim · spatial_merge_size² (`PatchMerger.hidden_size`).
    pub fn merger_hidden_size(&self) -> usize {
        self.embed_dim * self.spatial_merge_size * self.spatial_merge_size
    }
}

/// A Qwen2-VL config.json, normalised. See the module doc for the layouts read.
#[derive(Clone, Debug, PartialEq)]
pub struct Qwen2VlConfig {
    pub architecture: Architecture,
    pub text_config: TextConfig,
    pub vision_config: VisionConfig,
    pub image_token_id: u32,
    pub video_token_id: u32,
    pub vision_start_token_id: u32,
    pub vision_end_token_id: u32,
    pub bos_token_id: Option<u32>,
    /// One or several ids (config.json allows either); empty when absent.
    pub eos_token_id: Vec<u32>,
    /// `torch_dtype` (transformers 4) or `dtype` (5): the dtype the weights
    /// were saved in, e.g. "bfloat16". Informational; the loader reads each
    /// tensor's dtype from the checkpoint.
    pub torch_dtype: Option<String>,
}

impl Qwen2VlConfig {
    /// Reads `<dir>/config.json`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let path = dir.as_ref().join("config.json");
        let text =
            std::fs::read_to_string(&path).map_err(|source| Error::Io { path: path.display().to_string(), source })?;
        Self::from_json_str(&text).map_err(|e| match e {
            Error::Config(msg) => Error::Config(format!("{}: {msg}", path.display())),
            e => e,
        })
    }

    pub fn from_json_str(s: &str) -> Result<Self> {
        let root: Value =
            serde_json::from_str(s).map_err(|e| Error::Config(format!("config.json is not valid JSON: {e}")))?;
        let top = Obj::new(&root, "")?;
        let architecture = architecture(&top)?;
        if let Some(mt) = top.str("model_type")? {
            if mt != "qwen2_vl" {
                return Err(Error::Config(format!("`model_type` is `{mt}`, expected `qwen2_vl`")));
            }
        }
        let text = match top.get("text_config") {
            Some(v) => Some(Obj::new(v, "text_config.")?),
            None => None,
        };
        let lm = Lm { text, top };
        let text_config = text_config(&lm)?;
        let vision_config = match lm.top.get("vision_config") {
            Some(v) => vision_config(&Obj::new(v, "vision_config.")?)?,
            // HF builds a default vision config when the key is absent.
            None => vision_config(&Obj::empty("vision_config."))?,
        };

        let token = |key: &str, default: u32| -> Result<u32> { Ok(lm.top.u32(key)?.unwrap_or(default)) };
        // bos/eos: top level (transformers 4), else text_config (5 moved them there).
        let bos_token_id = match lm.top.u32("bos_token_id")? {
            Some(v) => Some(v),
            None => lm.text.as_ref().map(|t| t.u32("bos_token_id")).transpose()?.flatten(),
        };
        let mut eos_token_id = lm.top.ids("eos_token_id")?;
        if eos_token_id.is_empty() {
            if let Some(t) = &lm.text {
                eos_token_id = t.ids("eos_token_id")?;
            }
        }
        // `torch_dtype` (4) or `dtype` (5), top level first.
        let dtype_of =
            |o: &Obj| -> Result<Option<String>> { Ok(o.str("torch_dtype")?.or(o.str("dtype")?).map(str::to_string)) };
        let torch_dtype = match dtype_of(&lm.top)? {
            Some(d) => Some(d),
            None => lm.text.as_ref().map(dtype_of).transpose()?.flatten(),
        };

        let cfg = Self {
            architecture,
            text_config,
            vision_config,
            // Defaults of `Qwen2VLConfig.__init__`.
            image_token_id: token("image_token_id", 151655)?,
            video_token_id: token("video_token_id", 151656)?,
            vision_start_token_id: token("vision_start_token_id", 151652)?,
            vision_end_token_id: token("vision_end_token_id", 151653)?,
            bos_token_id,
            eos_token_id,
            torch_dtype,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The divisibility and size rules the model code relies on; each error
    /// names the fields involved.
    pub fn validate(&self) -> Result<()> {
        let t = &self.text_config;
        let v = &self.vision_config;
        require_positive(&[
            ("hidden_size", t.hidden_size),
            ("intermediate_size", t.intermediate_size),
            ("num_hidden_layers", t.num_hidden_layers),
            ("num_attention_heads", t.num_attention_heads),
            ("num_key_value_heads", t.num_key_value_heads),
            ("vocab_size", t.vocab_size),
            ("vision_config.depth", v.depth),
            ("vision_config.embed_dim", v.embed_dim),
            ("vision_config.num_heads", v.num_heads),
            ("vision_config.mlp_hidden_dim (embed_dim · mlp_ratio)", v.mlp_hidden_dim),
            ("vision_config.in_channels", v.in_channels),
            ("vision_config.patch_size", v.patch_size),
            ("vision_config.temporal_patch_size", v.temporal_patch_size),
            ("vision_config.spatial_merge_size", v.spatial_merge_size),
        ])?;
        if !t.hidden_size.is_multiple_of(t.num_attention_heads) {
            return Err(Error::Config(format!(
                "`hidden_size` ({}) must be divisible by `num_attention_heads` ({})",
                t.hidden_size, t.num_attention_heads
            )));
        }
        if t.head_dim != t.hidden_size / t.num_attention_heads {
            return Err(Error::Config(format!(
                "head_dim ({}) must be hidden_size / num_attention_heads = {}",
                t.head_dim,
                t.hidden_size / t.num_attention_heads
            )));
        }
        require_gqa(("num_attention_heads", t.num_attention_heads), ("num_key_value_heads", t.num_key_value_heads))?;
        let sum: usize = t.mrope_section.iter().sum();
        if 2 * sum != t.head_dim {
            return Err(Error::Config(format!(
                "`mrope_section` {:?} sums to {sum}; it must sum to head_dim / 2 = {} \
                 (head_dim = hidden_size / num_attention_heads = {} / {})",
                t.mrope_section,
                t.head_dim / 2,
                t.hidden_size,
                t.num_attention_heads
            )));
        }
        if !(t.rms_norm_eps.is_finite() && t.rms_norm_eps >= 0.0) {
            return Err(Error::Config(format!("`rms_norm_eps` is {}; expected a finite value ≥ 0", t.rms_norm_eps)));
        }
        if !(t.rope_theta.is_finite() && t.rope_theta > 0.0) {
            return Err(Error::Config(format!("`rope_theta` is {}; expected a finite value > 0", t.rope_theta)));
        }
        if !v.embed_dim.is_multiple_of(v.num_heads) {
            return Err(Error::Config(format!(
                "`vision_config.embed_dim` ({}) must be divisible by `vision_config.num_heads` ({})",
                v.embed_dim, v.num_heads
            )));
        }
        // VisionRotaryEmbedding(head_dim / 2) makes head_dim / 4 frequencies
        // for each of the row and column position; they must fill head_dim / 2.
        if !v.head_dim.is_multiple_of(4) {
            return Err(Error::Config(format!(
                "vision head dim `vision_config.embed_dim` / `vision_config.num_heads` = {} / {} = {} \
                 must be a multiple of 4 for the 2-D vision RoPE",
                v.embed_dim, v.num_heads, v.head_dim
            )));
        }
        if v.hidden_size != t.hidden_size {
            return Err(Error::Config(format!(
                "`vision_config.hidden_size` ({}) must equal the language model's `hidden_size` ({}): \
                 the patch merger's output is fed to the language model",
                v.hidden_size, t.hidden_size
            )));
        }
        Ok(())
    }
}

fn architecture(top: &Obj) -> Result<Architecture> {
    let supported = SUPPORTED_ARCHITECTURES.join(", ");
    let Some(v) = top.get("architectures") else {
        return Err(Error::Config(format!("`architectures` is missing; expected one of: {supported}")));
    };
    let names: Vec<&str> = match v {
        Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
        Value::String(s) => vec![s.as_str()],
        _ => vec![],
    };
    for name in &names {
        match *name {
            "Qwen2VLForConditionalGeneration" => return Ok(Architecture::ConditionalGeneration),
            "Qwen2VLModel" => return Ok(Architecture::Model),
            _ => {}
        }
    }
    Err(Error::Config(format!("`architectures` is {v}; this build serves only: {supported}")))
}

fn text_config(lm: &Lm) -> Result<TextConfig> {
    let hidden_size = lm.required("hidden_size")?;
    let num_attention_heads = lm.required("num_attention_heads")?;
    // HF: an explicit null means "as many as the query heads".
    let num_key_value_heads = match lm.get("num_key_value_heads", Obj::usize)? {
        Some((v, _)) => v,
        None if lm.is_null("num_key_value_heads") => num_attention_heads,
        None => return Err(lm.missing("num_key_value_heads")),
    };
    let hidden_act = match lm.get("hidden_act", Obj::str)? {
        None => Activation::Silu,
        Some((name, at)) => match Activation::from_hf(name) {
            Some(Activation::Silu) => Activation::Silu,
            _ => {
                return Err(Error::Config(format!(
                    "`{at}hidden_act` is `{name}`; the Qwen2-VL language model uses `silu`"
                )))
            }
        },
    };
    if let Some((true, at)) = lm.get("use_sliding_window", Obj::bool)? {
        return Err(Error::Config(format!(
            "`{at}use_sliding_window` is true; sliding-window attention is not implemented"
        )));
    }
    let num_hidden_layers = lm.required("num_hidden_layers")?;
    if let Some((v, at)) = lm.get_value("layer_types") {
        let Some(types) = v.as_array() else {
            return Err(Error::Config(format!("`{at}layer_types` must be a list, found {v}")));
        };
        if types.len() != num_hidden_layers {
            return Err(Error::Config(format!(
                "`{at}layer_types` has {} entries; `num_hidden_layers` is {num_hidden_layers}",
                types.len()
            )));
        }
        if types.iter().any(|t| t.as_str() != Some("full_attention")) {
            return Err(Error::Config(format!(
                "`{at}layer_types` has layers other than `full_attention`; only full attention is implemented"
            )));
        }
    }
    let (rope_theta, mrope_section) = rope(lm)?;
    let head_dim = hidden_size.checked_div(num_attention_heads).unwrap_or(0);
    // Qwen2VLAttention always uses hidden_size / heads; transformers 5's
    // rotary embedding would read a `head_dim` field, so one that differs
    // would make the two disagree.
    if let Some((d, at)) = lm.get("head_dim", Obj::usize)? {
        if d != head_dim {
            return Err(Error::Config(format!(
                "`{at}head_dim` is {d}, but Qwen2-VL attention uses hidden_size / num_attention_heads = {head_dim}"
            )));
        }
    }
    Ok(TextConfig {
        hidden_size,
        intermediate_size: lm.required("intermediate_size")?,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        vocab_size: lm.required("vocab_size")?,
        rms_norm_eps: lm.get("rms_norm_eps", Obj::f64)?.map_or(1e-5, |(v, _)| v),
        rope_theta,
        mrope_section,
        max_position_embeddings: lm.get("max_position_embeddings", Obj::usize)?.map_or(32768, |(v, _)| v),
        hidden_act,
        tie_word_embeddings: tie_word_embeddings(lm)?,
    })
}

/// transformers 5 keeps `tie_word_embeddings` on the top-level config;
/// 4.52–4.57 kept it in `text_config` and left the top-level one out when it
/// was true (the 2B file 4.53.3 writes). transformers 5.24
/// (`Qwen2VLConfig.__post_init__`) ties when either says true; so do we.
fn tie_word_embeddings(lm: &Lm) -> Result<bool> {
    let top = lm.top.bool("tie_word_embeddings")?.unwrap_or(false);
    let text = match &lm.text {
        Some(t) => t.bool("tie_word_embeddings")?.unwrap_or(false),
        None => false,
    };
    Ok(top || text)
}

/// (rope_theta, mrope_section) from whichever RoPE dict the file has.
/// HF reads `rope_scaling or rope_parameters`; we look in `text_config` first.
fn rope(lm: &Lm) -> Result<(f64, [usize; 3])> {
    let mut found = None;
    'levels: for level in lm.levels() {
        for key in ["rope_scaling", "rope_parameters"] {
            match level.get(key) {
                Some(Value::Object(m)) if m.is_empty() => {}
                Some(v) => {
                    found = Some(Obj::new(v, &format!("{}{key}.", level.path))?);
                    break 'levels;
                }
                None => {}
            }
        }
    }
    let Some(mut dict) = found else {
        return Err(Error::Config(
            "neither `rope_scaling` nor `rope_parameters` is present; Qwen2-VL needs `mrope_section` \
             (e.g. \"rope_scaling\": {\"type\": \"mrope\", \"mrope_section\": [16, 24, 24]})"
                .into(),
        ));
    };
    // transformers 5 may key the parameters by layer type.
    let keys = ["rope_type", "type", "mrope_section", "rope_theta"];
    if !keys.iter().any(|k| dict.get(k).is_some()) {
        if let Some(inner) = dict.get("full_attention") {
            dict = Obj::new(inner, &format!("{}full_attention.", dict.path))?;
        }
    }
    let rope_type = match dict.str("rope_type")? {
        Some(t) => t,
        None => dict.str("type")?.unwrap_or("default"),
    };
    // "mrope" is M-RoPE over the default frequencies; HF rewrites it to "default".
    if rope_type != "mrope" && rope_type != "default" {
        return Err(Error::Config(format!(
            "`{}rope_type` is `{rope_type}`; only plain M-RoPE (`mrope` or `default`) is implemented",
            dict.path
        )));
    }
    let at = format!("{}mrope_section", dict.path);
    let section = match dict.get("mrope_section") {
        None => {
            return Err(Error::Config(format!(
                "`{at}` is missing; Qwen2-VL needs the three M-RoPE sections (e.g. [16, 24, 24])"
            )))
        }
        Some(Value::Array(a)) if a.len() == 3 => {
            let mut s = [0usize; 3];
            for (o, v) in s.iter_mut().zip(a) {
                *o = v.as_u64().and_then(|x| usize::try_from(x).ok()).ok_or_else(|| {
                    Error::Config(format!(
                        "`{at}` must hold three non-negative integers, found {}",
                        Value::Array(a.clone())
                    ))
                })?;
            }
            s
        }
        Some(v) => {
            return Err(Error::Config(format!(
                "`{at}` must hold three non-negative integers (temporal, height, width), found {v}"
            )))
        }
    };
    let theta = match dict.f64("rope_theta")? {
        Some(t) => t,
        None => lm.get("rope_theta", Obj::f64)?.map_or(1_000_000.0, |(t, _)| t),
    };
    Ok((theta, section))
}

fn vision_config(v: &Obj) -> Result<VisionConfig> {
    // Defaults of `Qwen2VLVisionConfig.__init__`.
    let depth = v.usize("depth")?.unwrap_or(32);
    let embed_dim = v.usize("embed_dim")?.unwrap_or(1280);
    let num_heads = v.usize("num_heads")?.unwrap_or(16);
    let mlp_ratio = v.f64("mlp_ratio")?.unwrap_or(4.0);
    if !(mlp_ratio.is_finite() && mlp_ratio > 0.0) {
        return Err(Error::Config(format!("`vision_config.mlp_ratio` is {mlp_ratio}; expected a positive number")));
    }
    let hidden_act = match v.str("hidden_act")? {
        None => Activation::QuickGelu,
        Some(name) => match Activation::from_hf(name) {
            Some(a) if a != Activation::Silu => a,
            _ => {
                return Err(Error::Config(format!(
                    "`vision_config.hidden_act` is `{name}`; supported: quick_gelu, gelu, gelu_pytorch_tanh, gelu_new"
                )))
            }
        },
    };
    // The hub files say `in_chans`, which HF's class ignores (it takes
    // `in_channels`, default 3); we honour either.
    let in_channels = match v.usize("in_channels")? {
        Some(c) => c,
        None => v.usize("in_chans")?.unwrap_or(3),
    };
    let rope_theta = match v.get("rope_parameters") {
        None => 10000.0,
        Some(p) => {
            let p = Obj::new(p, "vision_config.rope_parameters.")?;
            match p.str("rope_type")? {
                None | Some("axial") => {}
                Some(t) => {
                    return Err(Error::Config(format!(
                        "`vision_config.rope_parameters.rope_type` is `{t}`; the vision tower uses `axial`"
                    )))
                }
            }
            p.f64("rope_theta")?.unwrap_or(10000.0)
        }
    };
    if !(rope_theta.is_finite() && rope_theta > 0.0) {
        return Err(Error::Config(format!(
            "`vision_config.rope_parameters.rope_theta` is {rope_theta}; expected a finite value > 0"
        )));
    }
    Ok(VisionConfig {
        depth,
        embed_dim,
        num_heads,
        head_dim: embed_dim.checked_div(num_heads).unwrap_or(0),
        mlp_ratio,
        mlp_hidden_dim: (embed_dim as f64 * mlp_ratio) as usize,
        hidden_size: v.usize("hidden_size")?.unwrap_or(3584),
        hidden_act,
        in_channels,
        patch_size: v.usize("patch_size")?.unwrap_or(14),
        temporal_patch_size: v.usize("temporal_patch_size")?.unwrap_or(2),
        spatial_merge_size: v.usize("spatial_merge_size")?.unwrap_or(2),
        rope_theta,
    })
}

/// Where language-model fields live: `text_config`, then the top level.
struct Lm<'a> {
    text: Option<Obj<'a>>,
    top: Obj<'a>,
}

impl<'a> Lm<'a> {
    fn levels(&self) -> impl Iterator<Item = &Obj<'a>> {
        self.text.iter().chain(std::iter::once(&self.top))
    }
    /// The first level that has `key`, parsed, with that level's path.
    fn get<T>(&self, key: &str, parse: fn(&Obj<'a>, &str) -> Result<Option<T>>) -> Result<Option<(T, &str)>> {
        for level in self.levels() {
            if let Some(v) = parse(level, key)? {
                return Ok(Some((v, level.path.as_str())));
            }
        }
        Ok(None)
    }
    fn get_value(&self, key: &str) -> Option<(&'a Value, &str)> {
        self.levels().find_map(|l| l.get(key).map(|v| (v, l.path.as_str())))
    }
    fn is_null(&self, key: &str) -> bool {
        self.levels().any(|l| l.is_null(key)) && self.get_value(key).is_none()
    }
    fn missing(&self, key: &str) -> Error {
        match &self.text {
            Some(_) => Error::Config(format!("`text_config.{key}` is missing (and there is no top-level `{key}`)")),
            None => Error::Config(format!("`{key}` is missing")),
        }
    }
    fn required(&self, key: &str) -> Result<usize> {
        self.get(key, Obj::usize)?.map(|(v, _)| v).ok_or_else(|| self.missing(key))
    }
}

#[cfg(test)]
mod tests;
