//! The fused q/k/v bias + M-RoPE + KV-cache write (`qkv_rope::qkv_rope_cache`).
//!
//! f64 formulation: the biased q, k, v columns in f64, q and k rotated by
//! rope.rs's `mrope64` (HF's `apply_multimodal_rotary_pos_emb`, written
//! independently of src/ops), k and v scattered into a copy of the cache by
//! slot. Outputs compared: q, then the whole k and v caches (which start
//! random, not poisoned: untouched slots must keep their values and a missed
//! write leaves a stale one). Every 4th token is padding (slot -1 or another
//! negative): its q is still written, its k and v are not.
//!
//! Tolerances as rope.rs's: the angle's error grows with the position, so
//! `n` is the largest position. The kernel rounds the biased values to the
//! dtype before rotating them (as the separate bias_add leaves them), so the
//! GPU is checked against the CPU op run on those rounded sums with zero bias
//! (`qkv_rope`), whose bf16 rounding is the baseline. And bit for bit against
//! the separate GPU ops it replaces (`qkv_rope.vs_ops`: bias_add on q, k and
//! v, mrope on q and k, kv_cache_write), which share its rounding and its
//! rotation (csrc/rope.cuh). Shapes with `tables` run Phi-3's longrope
//! instead of M-RoPE: two random inverse-frequency tables, each token's
//! picked by its position row 1, cos and sin scaled (rope.rs `table64`; the
//! separate op is `rope_table`).

use kestrel::ops::rope::Freqs;
use kestrel::ops::{activation, kv_cache, qkv_rope, rope};
use kestrel::{DType, Device, Tensor};

use crate::harness::*;
use crate::rope::{mrope64, random_tables, table64};

struct Shape {
    n: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    sections: [usize; 3],
    /// Longrope tables instead of theta (sections must be [d / 2, 0, 0]).
    tables: bool,
}

/// Distinct slots of a cache with `slots` rows for n tokens; every 4th token padding.
fn slot_mapping(n: usize, slots: usize, rng: &mut Rng) -> Vec<i32> {
    let mut free: Vec<i32> = (0..slots as i32).collect();
    (0..n)
        .map(|i| match i % 4 {
            1 if i % 8 == 1 => -1,
            1 => i32::MIN + i as i32,
            _ => free.swap_remove(rng.below(free.len())),
        })
        .collect()
}

fn run(s: &Shape, gpu: Option<&Device>, rng: &mut Rng) -> Vec<Row> {
    let Shape { n, heads, kv_heads: kvh, d, sections, tables } = *s;
    let (width, row, bs) = (((heads + 2 * kvh) * d), kvh * d, 16);
    let blocks = n.div_ceil(bs) + 2;
    let (qs, cs) = ([n, heads, d], [blocks, bs, kvh, d]);
    let label = format!("n{n} {heads}/{kvh} d{d} {sections:?}");
    let theta = 1e6f32;
    let mut pos: Vec<i32> = (0..3 * n).map(|_| rng.below(30000) as i32).collect();
    let (inv, mscale) = (random_tables(rng, d / 2), (1.0 + 32f64.ln() / 4096f64.ln()).sqrt() as f32);
    if tables {
        for t in 0..n {
            pos[n + t] = rng.below(2) as i32;
        }
    }
    let rot64 = |x: &[f64], h: usize| {
        if tables {
            table64(x, h, d, &pos, &inv, mscale as f64)
        } else {
            mrope64(x, h, d, &pos, sections, theta as f64)
        }
    };
    let freqs = |dev: &Device| tables.then(|| Tensor::from_f32(dev, &[2, d / 2], &inv, DType::F32).unwrap());
    fn pick(t: &Option<Tensor>, theta: f32, mscale: f32) -> Freqs<'_> {
        match t {
            Some(inv_freq) => Freqs::Table { inv_freq, mscale },
            None => Freqs::Theta(theta),
        }
    }
    let npos = pos.iter().map(|&p| p as usize).max().unwrap_or(0).max(1);
    let map = slot_mapping(n, blocks * bs, rng);
    let mut rows = Vec::new();
    for dt in FLOAT_DTYPES {
        let x = round_to(&rng.normals(n * width, 1.0), dt);
        let b = round_to(&rng.normals(width, 1.0), dt);
        let (kc0, vc0) =
            (round_to(&rng.normals(blocks * bs * row, 1.0), dt), round_to(&rng.normals(blocks * bs * row, 1.0), dt));

        // f64: q, then the caches, from the biased columns `xb` (n, width).
        let want = |xb: &[f64]| {
            let part =
                |from: usize, to: usize| -> Vec<f64> { xb.chunks(width).flat_map(|r| r[from..to].to_vec()).collect() };
            let (qe, ke) = (heads * d, (heads + kvh) * d);
            let q = rot64(&part(0, qe), heads);
            let k = rot64(&part(qe, ke), kvh);
            let v = part(ke, width);
            let (mut kc, mut vc) = (widen(&kc0), widen(&vc0));
            for (t, &slot) in map.iter().enumerate().filter(|(_, &s)| s >= 0) {
                let s = slot as usize;
                kc[s * row..][..row].copy_from_slice(&k[t * row..][..row]);
                vc[s * row..][..row].copy_from_slice(&v[t * row..][..row]);
            }
            [q, kc, vc].concat()
        };
        // The op on one device: [q, k cache, v cache].
        let op = |dev: &Device, x: &[f32], b: &[f32]| {
            let f = |shape: &[usize], v: &[f32]| Tensor::from_f32(dev, shape, v, dt).unwrap();
            let i = |shape: &[usize], v: &[i32]| Tensor::from_i32(dev, shape, v).unwrap();
            let mut q = match dev {
                Device::Cpu => Tensor::empty(dev, &qs, dt).unwrap(),
                _ => poisoned(dev, &qs, dt),
            };
            let (mut kc, mut vc) = (f(&cs, &kc0), f(&cs, &vc0));
            let (xt, bt, pt, mt) = (f(&[n, width], x), f(&[width], b), i(&[3, n], &pos), i(&[n], &map));
            let tab = freqs(dev);
            qkv_rope::qkv_rope_cache(&mut q, &mut kc, &mut vc, &xt, &bt, &pt, &mt, sections, pick(&tab, theta, mscale))
                .unwrap();
            [q, kc, vc].iter().flat_map(|t| t.to_f32_vec().unwrap()).collect::<Vec<f32>>()
        };
        let biased64: Vec<f64> =
            x.chunks(width).flat_map(|r| r.iter().zip(&b).map(|(&a, &c)| a as f64 + c as f64)).collect();
        rows.push(check_cpu("qkv_rope", &label, &op(&Device::Cpu, &x, &b), &want(&biased64), npos));

        let Some(g) = gpu else { continue };
        // The sums rounded to dt, as the kernel (and bias_add) rounds them.
        let xb: Vec<f32> =
            round_to(&x.chunks(width).flat_map(|r| r.iter().zip(&b).map(|(&a, &c)| a + c)).collect::<Vec<_>>(), dt);
        let zeros = vec![0.0; width];
        let cpu = op(&Device::Cpu, &xb, &zeros);
        let got = op(g, &x, &b);
        rows.push(match dt {
            DType::F32 => check_gpu("qkv_rope", &label, dt, &got, &want(&widen(&xb)), &widen(&cpu)),
            _ => {
                let (r, base) = bf16_ref_and_baseline(&cpu);
                check_gpu("qkv_rope", &label, dt, &got, &r, &base)
            }
        });

        // The separate GPU ops it replaces, on q, k, v uploaded apart.
        let f = |shape: &[usize], v: &[f32]| Tensor::from_f32(g, shape, v, dt).unwrap();
        let cols =
            |from: usize, to: usize| -> Vec<f32> { x.chunks(width).flat_map(|r| r[from..to].to_vec()).collect() };
        let (qe, ke) = (heads * d, (heads + kvh) * d);
        let (mut q, mut k, mut v) =
            (f(&[n, qe], &cols(0, qe)), f(&[n, row], &cols(qe, ke)), f(&[n, row], &cols(ke, width)));
        activation::bias_add(&mut q, &f(&[qe], &b[..qe])).unwrap();
        activation::bias_add(&mut k, &f(&[row], &b[qe..ke])).unwrap();
        activation::bias_add(&mut v, &f(&[row], &b[ke..])).unwrap();
        let (mut q, mut k, v) =
            (q.reshape(&qs).unwrap(), k.reshape(&[n, kvh, d]).unwrap(), v.reshape(&[n, kvh, d]).unwrap());
        let pt = Tensor::from_i32(g, &[3, n], &pos).unwrap();
        match freqs(g) {
            Some(t) => {
                rope::rope_table(&mut q, &pt, &t, mscale).unwrap();
                rope::rope_table(&mut k, &pt, &t, mscale).unwrap();
            }
            None => {
                rope::mrope(&mut q, &pt, sections, theta).unwrap();
                rope::mrope(&mut k, &pt, sections, theta).unwrap();
            }
        }
        let (mut kc, mut vc) = (f(&cs, &kc0), f(&cs, &vc0));
        kv_cache::kv_cache_write(&mut kc, &mut vc, &k, &v, &Tensor::from_i32(g, &[n], &map).unwrap()).unwrap();
        let ops: Vec<f32> = [q, kc, vc].iter().flat_map(|t| t.to_f32_vec().unwrap()).collect();
        rows.push(check_exact("gpu", "qkv_rope.vs_ops", &label, dt, &widen(&got), &widen(&ops)));
    }
    rows
}

pub fn cases() -> Vec<Case> {
    let shape = |n, heads, kv_heads, d, sections| Shape { n, heads, kv_heads, d, sections, tables: false };
    let longrope =
        |n, heads, kv_heads, d: usize| Shape { n, heads, kv_heads, d, sections: [d / 2, 0, 0], tables: true };
    // Qwen2-VL-2B (12/2) and 7B (28/4) at head dim 128 with the real sections;
    // 16/16 of 80 with a split of the same proportions; n from a decode step
    // to a prefill past one block per token row.
    let shapes = [
        shape(1, 12, 2, 128, [16, 24, 24]),
        shape(3, 28, 4, 128, [16, 24, 24]),
        shape(77, 16, 16, 80, [10, 15, 15]),
        shape(1000, 12, 2, 128, [16, 24, 24]),
        shape(77, 28, 4, 80, [10, 15, 15]),
        // Head dim 72: 36 frequencies, sections summing to 36.
        shape(77, 8, 2, 72, [8, 14, 14]),
        // Phi-3.5 (32/32 of 96) with longrope tables, a decode step and a
        // prefill; GQA and an awkward head dim too.
        longrope(1, 32, 32, 96),
        longrope(300, 32, 32, 96),
        longrope(77, 6, 2, 72),
    ];
    shapes
        .into_iter()
        .map(|s| {
            let kind = if s.tables { " longrope" } else { "" };
            let name = format!("qkv_rope{kind} n{} {}/{} d{}", s.n, s.heads, s.kv_heads, s.d);
            Case::new(name, move |gpu, rng| run(&s, gpu, rng))
        })
        .collect()
}
