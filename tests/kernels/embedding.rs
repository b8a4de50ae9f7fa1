//! Token embedding: a gather, compared bit for bit.

use kestrel::ops::embedding;
use kestrel::{DType, Device, Tensor};

use crate::harness::*;

/// The gather in f64, written independently of src/ops/embedding.rs: a row
/// of the table for an id in [0, vocab), zeros for any other id.
fn gather64(ids: &[i32], table: &[f32], vocab: usize, hidden: usize) -> Vec<f64> {
    let mut out = vec![0.0; ids.len() * hidden];
    for (i, &id) in ids.iter().enumerate() {
        if (0..vocab as i64).contains(&(id as i64)) {
            for c in 0..hidden {
                out[i * hidden + c] = table[id as usize * hidden + c] as f64;
            }
        }
    }
    out
}

pub fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    // Widths whose rows are a whole number of 16-byte words in both dtypes
    // (1280, 1536, 3584: the word-copy path) and one that is not (769).
    for (n, vocab, hidden) in [(1, 257, 769), (3, 131, 1536), (37, 97, 1280), (37, 61, 3584)] {
        v.push(Case::new(format!("embedding {n} of {vocab}x{hidden}"), move |gpu, rng| {
            let mut rows_out = Vec::new();
            for dt in FLOAT_DTYPES {
                let table = round_to(&rng.normals(vocab * hidden, 1.0), dt);
                let mut ids: Vec<i32> = (0..n).map(|_| rng.below(vocab) as i32).collect();
                // The first and last rows of the table, a repeat, and every kind
                // of bad id (written as zeros) once there is room.
                ids[0] = vocab as i32 - 1;
                if n >= 3 {
                    ids[1] = 0;
                    ids[2] = ids[0];
                }
                if n >= 37 {
                    ids[10..14].copy_from_slice(&[-1, vocab as i32, i32::MIN, i32::MAX]);
                }
                let label = format!("{n} ids, {vocab}x{hidden}");
                let (tc, tg) = split(gpu, &[vocab, hidden], &table, dt);
                let (ic, ig) = split_i32(gpu, &[n], &ids);
                let mut oc = Tensor::empty(&Device::Cpu, &[n, hidden], DType::F32).unwrap();
                embedding::embedding(&mut oc, &ic, &tc).unwrap();
                let r64 = gather64(&ids, &table, vocab, hidden);
                rows_out.push(check_exact("cpu", "embedding", &label, dt, &widen(&oc.to_f32_vec().unwrap()), &r64));
                if let Some(g) = gpu {
                    let mut o = poisoned(g, &[n, hidden], dt);
                    embedding::embedding(&mut o, ig.as_ref().unwrap(), tg.as_ref().unwrap()).unwrap();
                    rows_out.push(check_exact("gpu", "embedding", &label, dt, &widen(&o.to_f32_vec().unwrap()), &r64));
                }
            }
            rows_out
        }));
    }
    v
}
