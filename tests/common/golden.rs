//! Reading the HF goldens that tools/make_tiny_*.py dump, and the error
//! measure the stage-by-stage comparisons use.

use std::collections::HashMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors};

/// Every tensor of a golden safetensors file as (shape, f32 values); i32
/// tensors (ids, positions, greedy tokens) are widened.
pub fn tensors(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let data: Vec<f32> = match v.dtype() {
                Dtype::F32 => v.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
                Dtype::I32 => {
                    v.data().chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f32).collect()
                }
                other => panic!("{name}: unexpected dtype {other:?}"),
            };
            (name, (v.shape().to_vec(), data))
        })
        .collect()
}

/// (‖ours − hf‖ / ‖hf‖, max |ours − hf|), in f64.
pub fn rel_err(ours: &[f32], hf: &[f32]) -> (f64, f64) {
    assert_eq!(ours.len(), hf.len());
    let (mut num, mut den, mut max) = (0f64, 0f64, 0f64);
    for (&a, &b) in ours.iter().zip(hf) {
        let d = (a as f64 - b as f64).abs();
        max = max.max(d);
        num += d * d;
        den += (b as f64) * (b as f64);
    }
    ((num / den.max(1e-30)).sqrt(), max)
}

/// A model fixture under tests/fixtures with HF goldens in its `golden/`
/// folder (cases.json, NAME.safetensors, the images the cases name).
pub struct Fixture(pub std::path::PathBuf);

impl Fixture {
    pub fn new(name: &str) -> Self {
        Fixture(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name))
    }

    pub fn dir(&self) -> std::path::PathBuf {
        self.0.clone()
    }

    /// golden/NAME.safetensors.
    pub fn golden(&self, name: &str) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
        tensors(&self.0.join(format!("golden/{name}.safetensors")))
    }

    /// golden/cases.json.
    pub fn cases(&self) -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(self.0.join("golden/cases.json")).unwrap()).unwrap()
    }

    /// An image of golden/, decoded as requests' images are.
    pub fn image(&self, file: &str) -> image::RgbImage {
        use kestrel::multimodal::image::{decode_rgb8, DEFAULT_MAX_PIXELS};
        decode_rgb8(&std::fs::read(self.0.join("golden").join(file)).unwrap(), DEFAULT_MAX_PIXELS).unwrap()
    }

    /// A case's messages with its image parts' files taken out (HF's parts
    /// name the files; ours carry the images separately), and the images.
    pub fn messages_and_media(&self, case: &serde_json::Value) -> (serde_json::Value, Vec<kestrel::multimodal::Media>) {
        let mut media = Vec::new();
        let mut msgs = case["messages"].clone();
        for m in msgs.as_array_mut().unwrap() {
            let Some(parts) = m["content"].as_array_mut() else { continue };
            for part in parts {
                if part["type"] == "image" {
                    media.push(kestrel::multimodal::Media::Image(self.image(part["image"].as_str().unwrap())));
                    *part = serde_json::json!({"type": "image"});
                }
            }
        }
        (msgs, media)
    }
}
