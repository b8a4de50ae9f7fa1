//! `kestrel compare-hf`: our side of the comparison with Hugging Face
//! transformers on random full-size checkpoints (tools/gpu_compare.sh).
//!
//! For each case of `GOLDEN/cases.json` (written by tools/make_tiny_qwen2vl.py
//! or tools/make_tiny_llava.py with a full-size --config), prepares the same chat with the same image files,
//! then (1) runs HF's greedy continuation teacher-forced and keeps the f32
//! logits at the positions that predict each of its tokens, and (2) decodes
//! greedily on its own. Writes OUT/<case>.safetensors: `logits` (k, vocab)
//! f32, `greedy` (k,) i32, `input_ids` of the prompt. The metrics and the
//! pass/fail rule live in tools/compare_hf_logits.py.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};

use super::generate::{device, Offline};
use crate::error::{Error, Result};
use crate::model::seq;
use crate::multimodal::image::{decode_rgb8, DEFAULT_MAX_PIXELS};
use crate::multimodal::Media;
use crate::tensor::Tensor;

#[derive(clap::Args, Debug)]
pub struct CompareArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// Folder with cases.json, the input images and HF's <case>.safetensors.
    #[arg(long)]
    pub golden: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value = "cuda")]
    pub device: String,
}

fn io(p: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::Io { path: p.display().to_string(), source: e }
}

/// HF's greedy tokens of a case (i32 tensor `greedy` in its safetensors).
fn hf_greedy(path: &Path) -> Result<Vec<u32>> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::Weights(format!("{}: {e}", path.display())))?;
    let t = st.tensor("greedy").map_err(|e| Error::Weights(format!("{}: {e}", path.display())))?;
    Ok(t.data().chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as u32).collect())
}

fn view(dt: Dtype, shape: Vec<usize>, bytes: &[u8]) -> Result<TensorView<'_>> {
    TensorView::new(dt, shape, bytes).map_err(|e| Error::Weights(e.to_string()))
}

pub fn run(args: &CompareArgs) -> Result<()> {
    let dev = device(&args.device)?;
    let t0 = std::time::Instant::now();
    let off = Offline::load(&args.model, &dev, None, &Default::default())?;
    let model = off.model.as_ref();
    eprintln!("loaded {} in {:.1} s", args.model.display(), t0.elapsed().as_secs_f64());
    let cases_path = args.golden.join("cases.json");
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cases_path).map_err(io(&cases_path))?)
            .map_err(|e| Error::InvalidInput(format!("{}: {e}", cases_path.display())))?;
    std::fs::create_dir_all(&args.out).map_err(io(&args.out))?;
    let Some(cases) = cases["cases"].as_object() else {
        return Err(Error::InvalidInput(format!("{}: no cases", cases_path.display())));
    };
    for (name, case) in cases {
        let load = |f: &str| -> Result<image::RgbImage> {
            let p = args.golden.join(f);
            decode_rgb8(&std::fs::read(&p).map_err(io(&p))?, DEFAULT_MAX_PIXELS)
        };
        let mut media = Vec::new();
        let mut msgs = case["messages"].clone();
        for m in msgs.as_array_mut().into_iter().flatten() {
            for part in m["content"].as_array_mut().into_iter().flatten() {
                match part["type"].as_str() {
                    Some("image") => {
                        media.push(Media::Image(load(part["image"].as_str().unwrap_or_default())?));
                        *part = serde_json::json!({"type": "image"});
                    }
                    Some("video") => {
                        let frames = part["video"].as_array().into_iter().flatten();
                        media.push(Media::Video(
                            frames.map(|f| load(f.as_str().unwrap_or_default())).collect::<Result<_>>()?,
                        ));
                        *part = serde_json::json!({"type": "video"});
                    }
                    _ => {}
                }
            }
        }
        let mut input = off.prepare_chat(&msgs, &media)?;
        let forced = hf_greedy(&args.golden.join(format!("{name}.safetensors")))?;
        let n = input.input_ids.len();
        let prompt_ids = input.input_ids.clone();

        // Our own greedy continuation, as long as HF's, stopping where HF's
        // generate stops (the model's eos ids).
        let stop = off.stop_ids();
        let t = std::time::Instant::now();
        let ours = seq::generate_greedy(model, &input, forced.len(), &stop)?;
        let gen_s = t.elapsed().as_secs_f64();

        // Teacher-forced on HF's tokens: the prompt plus all but the last of
        // them in one prefill; rows n-1 .. n+k-2 predict HF's k tokens.
        let k = forced.len();
        if k == 0 {
            return Err(Error::InvalidInput(format!("{name}: HF generated no tokens")));
        }
        input.input_ids.extend_from_slice(&forced[..k - 1]);
        let extra: Vec<i32> = (n..n + k - 1).map(|i| (i as i64 + input.rope_delta) as i32).collect();
        input.positions = input.positions.chunks(n).flat_map(|row| row.iter().chain(&extra).copied()).collect();
        let mut cache = seq::new_cache(model, n + k)?;
        let h = seq::prefill(model, &input, &mut cache, &mut |_, _| {})?;
        let decoder = model.decoder();
        let mut rows = Tensor::empty(&dev, &[k, decoder.dims.hidden], h.dtype())?;
        rows.copy_rows_from(0, &h, n - 1, k)?;
        let logits = decoder.logits(&rows)?.to_f32_vec()?;

        let logits_b: Vec<u8> = logits.iter().flat_map(|x| x.to_le_bytes()).collect();
        let greedy_b: Vec<u8> = ours.iter().flat_map(|&x| (x as i32).to_le_bytes()).collect();
        let ids_b: Vec<u8> = prompt_ids.iter().flat_map(|&x| (x as i32).to_le_bytes()).collect();
        let vocab = decoder.dims.vocab;
        let mut tensors: HashMap<String, TensorView> = HashMap::new();
        tensors.insert("logits".into(), view(Dtype::F32, vec![k, vocab], &logits_b)?);
        tensors.insert("greedy".into(), view(Dtype::I32, vec![ours.len()], &greedy_b)?);
        tensors.insert("input_ids".into(), view(Dtype::I32, vec![n], &ids_b)?);
        let path = args.out.join(format!("{name}.safetensors"));
        safetensors::serialize_to_file(&tensors, None, &path)
            .map_err(|e| Error::Weights(format!("{}: {e}", path.display())))?;
        eprintln!("{name}: {n} prompt tokens, greedy {} tokens in {gen_s:.2} s", ours.len());
    }
    Ok(())
}
