//! Attention over variable-length packed sequences (flash-attn varlen layout).
//!
//! The f64 formulation builds each (sequence, head)'s scores matrix with an
//! explicit mask, takes a masked row softmax and multiplies by V. For bf16
//! kernels the baseline is a naive bf16 attention as flash-attn's tests write
//! it (scores and softmax in f32, P rounded to bf16, P·V accumulated in f32,
//! output rounded to bf16), measured against the CPU f32 reference.
//!
//! `cargo test` builds this unoptimised, where attention costs ~25 ns per
//! multiply-add, so the inputs are drawn once per case as bf16 values and
//! serve both kernels (exact in f32 too): one CPU reference and one f64
//! formulation check both. The long cases check the f64 formulation on every
//! 8th query row (and the last); the GPU's bf16 output is still compared on
//! every row, and the grid-stride check (exact, NaN fails) sees every row of both.
//!
//! In bf16 a sequence of 16 queries or more runs on the tensor-core kernel
//! (src/ops/attention.rs), the others on the simple one, both in one call;
//! the grid-stride check keeps that choice, and `attention.simple` checks the
//! same call with max_seqlen_q = 1, where the simple kernel runs them all.
//!
//! Head dims: every one of `HEAD_DIMS` (72 is padded to 80 inside the
//! tensor-core kernel's tiles), and one without GPU kernels (24), which the
//! CPU must take like any other; on a GPU the op must refuse it with an error.

use half::bf16;
use kestrel::ops::attention;
use kestrel::{DType, Device, Tensor};

use crate::harness::*;

/// One packed batch: heads over kv heads, head dim, (Lq, Lk) per sequence.
pub(crate) struct Spec {
    pub heads: usize,
    pub kv_heads: usize,
    pub d: usize,
    pub seqs: Vec<(usize, usize)>,
    pub causal: bool,
    /// Multiplies q: larger scores make the softmax peaked, so the running
    /// max of an online softmax moves between key tiles.
    pub q_scale: f32,
    /// The f64 formulation covers query rows i % sample == 0 and the last of
    /// each sequence (1: every row).
    pub sample: usize,
}

impl Spec {
    fn label(&self) -> String {
        let lens: Vec<String> =
            self.seqs.iter().map(|&(lq, lk)| if lq == lk { lq.to_string() } else { format!("{lq}/{lk}") }).collect();
        let mask = if self.causal { "causal" } else { "full" };
        let rows = if self.sample > 1 { format!(" q%{}", self.sample) } else { String::new() };
        let (h, hk, d) = (self.heads, self.kv_heads, self.d);
        format!("{h}/{hk} d{d} {mask} [{}]{rows}", lens.join(","))
    }
    fn offsets(&self, pick: impl Fn(&(usize, usize)) -> usize) -> Vec<i32> {
        let mut cu = vec![0i32];
        for s in &self.seqs {
            cu.push(cu[cu.len() - 1] + pick(s) as i32);
        }
        cu
    }
}

/// The dense softmax(scale · Q Kᵀ + mask) V of every (sequence, head), in f64.
/// Mask: query i of Lq sees key j of Lk iff j − i ≤ Lk − Lq (causal) or always.
/// Returns it with the query rows it covers (`Spec::sample`). Plain indexed
/// loops: `cargo test` builds this unoptimised.
pub(crate) fn attention64(sp: &Spec, q: &[f64], k: &[f64], v: &[f64], scale: f64) -> (Vec<f64>, Vec<bool>) {
    let (h, hk, d) = (sp.heads, sp.kv_heads, sp.d);
    let total_q: usize = sp.seqs.iter().map(|s| s.0).sum();
    let mut out = vec![0.0; total_q * h * d];
    let kept: Vec<bool> =
        sp.seqs.iter().flat_map(|&(lq, _)| (0..lq).map(move |i| i % sp.sample == 0 || i + 1 == lq)).collect();
    let (mut q0, mut k0) = (0, 0);
    for &(lq, lk) in &sp.seqs {
        for head in 0..h {
            let kvh = head * hk / h;
            // This head's rows, contiguous: Q (lq, d), K and V (lk, d).
            let rows = |x: &[f64], start: usize, n: usize, heads: usize, hh: usize| -> Vec<f64> {
                (0..n).flat_map(|r| x[((start + r) * heads + hh) * d..][..d].to_vec()).collect()
            };
            let (qm, km, vm) = (rows(q, q0, lq, h, head), rows(k, k0, lk, hk, kvh), rows(v, k0, lk, hk, kvh));
            // Scores (lq, lk), −∞ where masked.
            let mut s = vec![f64::NEG_INFINITY; lq * lk];
            for i in (0..lq).filter(|&i| kept[q0 + i]) {
                for j in 0..lk {
                    if sp.causal && j as i64 - i as i64 > lk as i64 - lq as i64 {
                        continue;
                    }
                    let (qi, kj) = (&qm[i * d..(i + 1) * d], &km[j * d..(j + 1) * d]);
                    let mut dot = 0.0;
                    for c in 0..d {
                        dot += qi[c] * kj[c];
                    }
                    s[i * lk + j] = scale * dot;
                }
            }
            for i in (0..lq).filter(|&i| kept[q0 + i]) {
                let row = &mut s[i * lk..(i + 1) * lk];
                let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x));
                if max == f64::NEG_INFINITY {
                    continue; // sees no key: zeros
                }
                let mut z = 0.0;
                for x in row.iter_mut() {
                    *x = (*x - max).exp(); // exp(−∞) = 0 for masked keys
                    z += *x;
                }
                let o = &mut out[((q0 + i) * h + head) * d..][..d];
                for (j, &p) in row.iter().enumerate() {
                    let vj = &vm[j * d..(j + 1) * d];
                    for c in 0..d {
                        o[c] += p / z * vj[c];
                    }
                }
            }
        }
        q0 += lq;
        k0 += lk;
    }
    (out, kept)
}

/// The rows of `x` (each `row` long) that `kept` marks.
pub(crate) fn pick<T: Copy>(x: &[T], kept: &[bool], row: usize) -> Vec<T> {
    x.chunks(row).zip(kept).filter(|(_, &k)| k).flat_map(|(r, _)| r.iter().copied()).collect()
}

/// Naive bf16 attention: S = scale · QKᵀ and softmax in f32, P rounded to bf16
/// (as a tensor-core P·V takes it), O = P·V accumulated in f32, rounded to bf16.
pub(crate) fn attention_bf16(sp: &Spec, q: &[f32], k: &[f32], v: &[f32], scale: f32) -> Vec<f64> {
    let (h, hk, d) = (sp.heads, sp.kv_heads, sp.d);
    let total_q: usize = sp.seqs.iter().map(|s| s.0).sum();
    let mut out = vec![0.0; total_q * h * d];
    let (mut q0, mut k0) = (0, 0);
    for &(lq, lk) in &sp.seqs {
        for i in 0..lq {
            let n = if sp.causal { (i as i64 + lk as i64 - lq as i64 + 1).clamp(0, lk as i64) as usize } else { lk };
            for head in 0..h {
                let kvh = head / (h / hk);
                let qr = &q[((q0 + i) * h + head) * d..][..d];
                let s: Vec<f32> = (0..n)
                    .map(|j| {
                        scale * qr.iter().zip(&k[((k0 + j) * hk + kvh) * d..][..d]).map(|(a, b)| a * b).sum::<f32>()
                    })
                    .collect();
                let max = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                let e: Vec<f32> = s.iter().map(|x| (x - max).exp()).collect();
                let z: f32 = e.iter().sum();
                let p: Vec<f32> = e.iter().map(|x| bf16::from_f32(x / z).to_f32()).collect();
                for c in 0..d {
                    let o: f32 = (0..n).map(|j| p[j] * v[((k0 + j) * hk + kvh) * d + c]).sum();
                    out[((q0 + i) * h + head) * d + c] = bf16::from_f32(o).to_f32() as f64;
                }
            }
        }
        q0 += lq;
        k0 += lk;
    }
    out
}

fn run(sp: &Spec, gpu: Option<&Device>, rng: &mut Rng) -> Vec<Row> {
    let (h, hk, d) = (sp.heads, sp.kv_heads, sp.d);
    let total_q: usize = sp.seqs.iter().map(|s| s.0).sum();
    let total_k: usize = sp.seqs.iter().map(|s| s.1).sum();
    let max_q = sp.seqs.iter().map(|s| s.0).max().unwrap_or(0);
    let max_k = sp.seqs.iter().map(|s| s.1).max().unwrap_or(0);
    let (qs, ks, cs) = ([total_q, h, d], [total_k, hk, d], [sp.seqs.len() + 1]);
    let (cu_q, cu_k) = (sp.offsets(|s| s.0), sp.offsets(|s| s.1));
    let scale = 1.0 / (d as f32).sqrt();
    let label = sp.label();

    // bf16 values, which both kernels' inputs hold exactly.
    let qd = round_to(&rng.normals(total_q * h * d, sp.q_scale), DType::BF16);
    let kd = round_to(&rng.normals(total_k * hk * d, 1.0), DType::BF16);
    let vd = round_to(&rng.normals(total_k * hk * d, 1.0), DType::BF16);
    let host = |shape: &[usize], x: &[f32]| Tensor::from_f32(&Device::Cpu, shape, x, DType::F32).unwrap();
    let (cqc, ckc) =
        (Tensor::from_i32(&Device::Cpu, &cs, &cu_q).unwrap(), Tensor::from_i32(&Device::Cpu, &cs, &cu_k).unwrap());
    let mut oc = Tensor::empty(&Device::Cpu, &qs, DType::F32).unwrap();
    attention::attention(
        &mut oc,
        &host(&qs, &qd),
        &host(&ks, &kd),
        &host(&ks, &vd),
        &cqc,
        &ckc,
        max_q,
        sp.causal,
        scale,
    )
    .unwrap();
    let cpu = oc.to_f32_vec().unwrap();
    let (r64, kept) = attention64(sp, &widen(&qd), &widen(&kd), &widen(&vd), scale as f64);
    let (row, r64) = (h * d, pick(&r64, &kept, h * d));
    // The softmax-weighted sum is the longest reduction: max_k terms.
    let mut rows = vec![check_cpu("attention", &label, &pick(&cpu, &kept, row), &r64, max_k)];

    let Some(g) = gpu else { return rows };
    for dt in FLOAT_DTYPES {
        let dev = |shape: &[usize], x: &[f32]| Tensor::from_f32(g, shape, x, dt).unwrap();
        let (q, k, v) = (dev(&qs, &qd), dev(&ks, &kd), dev(&ks, &vd));
        let cq = Tensor::from_i32(g, &cs, &cu_q).unwrap();
        let ck = Tensor::from_i32(g, &cs, &cu_k).unwrap();
        let launch = |max_seqlen_q: usize| {
            let mut o = poisoned(g, &qs, dt);
            attention::attention(&mut o, &q, &k, &v, &cq, &ck, max_seqlen_q, sp.causal, scale).unwrap();
            o.to_f32_vec().unwrap()
        };
        let got = launch(max_q);
        rows.push(match dt {
            DType::F32 => {
                check_gpu("attention", &label, dt, &pick(&got, &kept, row), &r64, &widen(&pick(&cpu, &kept, row)))
            }
            _ => check_gpu("attention", &label, dt, &got, &widen(&cpu), &attention_bf16(sp, &qd, &kd, &vd, scale)),
        });
        // A grid sized for the fewest queries that keep the kernel choice (1,
        // or FLASH_MIN_SEQLEN_Q when the tensor-core kernel runs): the blocks
        // grid-stride over the other rows, which must come out bit for bit the same.
        let small_q = small_grid(dt, max_q);
        let small = launch(small_q);
        rows.push(check_exact("gpu", "attention.grid_stride", &label, dt, &widen(&small), &widen(&got)));
        // max_seqlen_q = 1 below the truth: only the simple kernel runs, over
        // every sequence and grid-striding, and must still be right.
        if small_q > 1 {
            let simple = launch(1);
            let base = attention_bf16(sp, &qd, &kd, &vd, scale);
            rows.push(check_gpu("attention.simple", &label, dt, &simple, &widen(&cpu), &base));
        }
    }
    rows
}

/// A head dim without GPU kernels: the CPU reference against the f64
/// formulation (its rows), and on a GPU the op's error instead of a launch.
fn run_cpu_only(sp: &Spec, gpu: Option<&Device>, rng: &mut Rng) -> Vec<Row> {
    assert!(!attention::HEAD_DIMS.contains(&sp.d), "d{} has GPU kernels", sp.d);
    if let Some(g) = gpu {
        let (h, hk, d) = (sp.heads, sp.kv_heads, sp.d);
        let x = |heads: usize| Tensor::from_f32(g, &[1, heads, d], &vec![0.5; heads * d], DType::BF16).unwrap();
        let cu = Tensor::from_i32(g, &[2], &[0, 1]).unwrap();
        let (mut o, q, k) = (x(h), x(h), x(hk));
        let e = attention::attention(&mut o, &q, &k, &k, &cu, &cu, 1, sp.causal, 0.1).unwrap_err().to_string();
        assert!(e.contains(&format!("head dim {d} not supported on the GPU")), "{e}");
        let e = attention::check_head_dim(g, d, "the test's q").unwrap_err().to_string();
        assert!(e.contains("the test's q") && e.contains(&format!("not {d}")), "{e}");
    }
    run(sp, None, rng)
}

/// The smallest max_seqlen_q that keeps a call's kernel choice (see the
/// module doc of kestrel::ops::attention): a grid that small grid-strides.
pub(crate) fn small_grid(dt: DType, max_q: usize) -> usize {
    if dt == DType::BF16 && max_q >= attention::FLASH_MIN_SEQLEN_Q {
        attention::FLASH_MIN_SEQLEN_Q
    } else {
        1
    }
}

pub fn cases() -> Vec<Case> {
    let spec = |heads, kv_heads, d, seqs: &[(usize, usize)], causal, q_scale, sample| Spec {
        heads,
        kv_heads,
        d,
        seqs: seqs.to_vec(),
        causal,
        q_scale,
        sample,
    };
    let same = |lens: &[usize]| lens.iter().map(|&l| (l, l)).collect::<Vec<_>>();
    // Head counts are the models' where the CPU time allows it (see the module doc).
    let specs = [
        // ViT (16 heads of 80, non-causal): one patch; two small images.
        spec(16, 16, 80, &same(&[1]), false, 1.0, 1),
        spec(16, 16, 80, &same(&[40, 9]), false, 1.0, 1),
        // Two larger images with a peaked softmax, whose running max moves
        // between key tiles.
        spec(2, 2, 80, &same(&[257, 31]), false, 3.0, 1),
        // Qwen2-VL-7B (28/4 of 128) and 2B (12/2 of 128) causal prefill.
        spec(28, 4, 128, &same(&[3]), true, 1.0, 1),
        spec(12, 2, 128, &same(&[17, 1, 100]), true, 1.0, 1),
        // One long-ish sequence: 33 key tiles.
        spec(1, 1, 64, &same(&[1030]), true, 1.0, 8),
        // Decode (1 over 300), chunked prefill (37 over 129), queries that see
        // no key (6 over 2: the first 4 see nothing; 2 over 0) in one batch.
        spec(12, 2, 96, &[(1, 300), (37, 129), (6, 2), (2, 0)], true, 1.0, 1),
        // Non-causal with Lq != Lk, an empty query sequence, groups of 7.
        spec(28, 4, 64, &[(5, 40), (0, 3), (9, 9)], false, 1.0, 1),
        // The tensor-core kernel (bf16, sequences of 16 queries or more) beside
        // the simple one in the same batch: lengths around its 64-query and
        // 64-key tiles. ViT heads, then Qwen2-VL-2B's causal 12/2 of 128.
        spec(16, 16, 80, &same(&[1, 17, 63, 65, 129]), false, 1.0, 1),
        spec(12, 2, 128, &same(&[1, 17, 63, 65, 129]), true, 1.0, 1),
        spec(16, 16, 128, &same(&[129, 65]), true, 3.0, 1),
        // Long: 17 query and key tiles, a peaked softmax whose running max moves.
        spec(1, 1, 80, &same(&[1030, 17]), false, 3.0, 8),
        spec(2, 1, 128, &same(&[1030]), true, 1.0, 8),
        // Chunked prefill (Lq < Lk, not at tile boundaries), a decode step, and
        // long chunks whose first queries see no key (20 over 2, 16 over 0).
        spec(12, 2, 128, &[(17, 300), (65, 129), (1, 50), (20, 2), (16, 0)], true, 1.0, 1),
        spec(8, 2, 96, &[(33, 100), (16, 7), (70, 70)], true, 1.0, 1),
        // Non-causal chunks (Lq != Lk) with fewer keys than a tile.
        spec(4, 4, 64, &[(33, 100), (16, 7), (0, 5), (40, 1)], false, 1.0, 1),
        // Head dim 72 (SigLIP-so400m, 16 heads of 72), whose tensor-core tiles
        // are padded to 80: sequences of 1 (simple kernel) and 17, 77, 300
        // (tensor cores: partial 64-query and 64-key tiles) in one batch,
        // non-causal and causal with groups of 4 and a peaked softmax.
        spec(16, 16, 72, &same(&[1, 17, 77, 300]), false, 1.0, 1),
        spec(8, 2, 72, &same(&[1, 17, 77, 300]), true, 3.0, 1),
        // Chunked prefill, a decode step, queries that see no key; non-causal
        // Lq != Lk with fewer keys than a tile; one long sequence.
        spec(12, 2, 72, &[(17, 300), (77, 129), (1, 50), (20, 2), (16, 0)], true, 1.0, 1),
        spec(4, 4, 72, &[(33, 100), (16, 7), (0, 5), (40, 1), (1, 77)], false, 1.0, 1),
        spec(1, 1, 72, &same(&[1030, 17]), false, 3.0, 8),
    ];
    let mut cases: Vec<Case> = specs
        .into_iter()
        .map(|sp| Case::new(format!("attention {}", sp.label()), move |gpu, rng| run(&sp, gpu, rng)))
        .collect();
    // A head dim without GPU kernels (24): the CPU reference alone.
    let cpu_only = [
        spec(4, 2, 24, &[(1, 1), (17, 17), (77, 77), (5, 300), (3, 0)], true, 1.0, 1),
        spec(3, 3, 24, &same(&[1, 17, 77]), false, 3.0, 1),
    ];
    cases.extend(cpu_only.into_iter().map(|sp| {
        Case::new(format!("attention {} cpu-only", sp.label()), move |gpu, rng| run_cpu_only(&sp, gpu, rng))
    }));
    cases
}
