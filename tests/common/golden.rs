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
