//! The paged KV cache: `kv_cache_write` (a scatter, compared bit for bit) and
//! `paged_attention`.
//!
//! paged_attention's f64 formulation gathers each sequence's keys out of the
//! cache through its block table (written here, independently of src/ops)
//! into the packed layout and runs attention.rs's dense causal f64 attention;
//! the bf16 baseline is attention.rs's naive bf16 attention on the same
//! gathered keys. Block tables are shuffled (a random permutation of the
//! cache's blocks, spare blocks included), every slot of the cache holds random
//! data, and table entries past a sequence's last block are out of range, so
//! a wrong address reads wrong keys or faults. GPU outputs start as NaN.
//! Exact checks besides the tolerance ones, on each device: the paged op
//! against packed `attention` on the gathered keys (one device function, one
//! CPU routine: bit for bit) and the last sequence alone against its rows in
//! the batch (its output must not depend on the batch); on the GPU also the
//! smallest grid that keeps the kernel choice (grid stride). When the
//! tensor-core kernel runs (bf16, a sequence of 16 queries or more), the same
//! call with max_seqlen_q = 1 runs the simple kernel on every sequence, which
//! is checked against the tolerance too (`paged.simple`). The exact checks
//! pin `Split::Never`: a split call's rounding depends on its partitions.
//!
//! Split-K decode (`Split`): the op as the model calls it (`Split::Auto`,
//! which splits decode batches) against the tolerance; the split kernel with
//! one partition bit for bit against the simple kernel (`paged.split1`: same
//! key order, the combine multiplies by exp2(0)); with 3 and 64 partitions
//! against the tolerance (`paged.split3`, `paged.split64`), and bit for bit
//! against itself with a one-query grid (`paged.split_stride`: the combine's
//! grid stride, and a race would show as a moving result).
//!
//! Head dim 72 (tensor-core tiles padded to 80) in mixed, prefill and
//! split-K batches over awkward block sizes; head dim 24, which has no GPU
//! kernels, on the CPU alone (on a GPU the op must refuse it).

use kestrel::ops::attention::Split;
use kestrel::ops::{attention, kv_cache};
use kestrel::{DType, Device, Tensor};

use crate::attention::{attention64, attention_bf16, pick, small_grid, Spec};
use crate::harness::*;

/// A random permutation of 0..n (Fisher–Yates).
fn shuffled(n: usize, rng: &mut Rng) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        p.swap(i, rng.below(i + 1));
    }
    p
}

// ----------------------------------------------------------------------------
// kv_cache_write

/// The scatter in f64, written independently of src/ops/kv_cache.rs: rows of
/// `cache` with token i's row at slot_mapping[i] for slots in [0, slots).
fn scatter64(cache: &[f32], src: &[f32], slot_mapping: &[i32], row: usize) -> Vec<f64> {
    let mut out = widen(cache);
    for (i, &s) in slot_mapping.iter().enumerate() {
        if s >= 0 && (s as usize + 1) * row <= cache.len() {
            for c in 0..row {
                out[s as usize * row + c] = src[i * row + c] as f64;
            }
        }
    }
    out
}

/// kv_cache_write of `n` tokens into a (blocks, bs, hk, d) cache.
fn write_case(n: usize, blocks: usize, bs: usize, hk: usize, d: usize) -> Case {
    Case::new(format!("kv_cache_write {n} into {blocks}x{bs}x{hk}x{d}"), move |gpu, rng| {
        let mut rows = Vec::new();
        let (slots, row) = (blocks * bs, hk * d);
        let (cs, ks) = ([blocks, bs, hk, d], [n, hk, d]);
        let label = format!("{n} tok, cache {blocks}x{bs}, {hk}x{d}");
        let got = |t: &Tensor| widen(&t.to_f32_vec().unwrap());
        for dt in FLOAT_DTYPES {
            // The cache starts random, not poisoned: untouched rows must keep
            // their values, and a missed write leaves a stale value behind.
            let (kc0, vc0) =
                (round_to(&rng.normals(slots * row, 1.0), dt), round_to(&rng.normals(slots * row, 1.0), dt));
            let (kd, vd) = (round_to(&rng.normals(n * row, 1.0), dt), round_to(&rng.normals(n * row, 1.0), dt));
            // Distinct random slots; every 4th token is padding (-1 or another negative).
            let mut map: Vec<i32> = shuffled(slots, rng)[..n].iter().map(|&s| s as i32).collect();
            for (i, s) in map.iter_mut().enumerate().filter(|(i, _)| i % 4 == 1) {
                *s = if i % 8 == 1 { -1 } else { i32::MIN + i as i32 };
            }
            // The same with two slots past the cache.
            let mut bad = map.clone();
            (bad[0], bad[n - 1]) = (i32::MAX, slots as i32);
            let want = |m: &[i32]| [scatter64(&kc0, &kd, m, row), scatter64(&vc0, &vd, m, row)].concat();

            let host = |shape: &[usize], x: &[f32]| Tensor::from_f32(&Device::Cpu, shape, x, dt).unwrap();
            let (kt, vt) = (host(&ks, &kd), host(&ks, &vd));
            let (mut kc, mut vc) = (host(&cs, &kc0), host(&cs, &vc0));
            let mt = Tensor::from_i32(&Device::Cpu, &[n], &map).unwrap();
            kv_cache::kv_cache_write(&mut kc, &mut vc, &kt, &vt, &mt).unwrap();
            rows.push(check_exact("cpu", "kv_cache_write", &label, dt, &[got(&kc), got(&vc)].concat(), &want(&map)));
            // On the CPU a slot past the cache is an error, and nothing is written.
            let (mut kc, mut vc) = (host(&cs, &kc0), host(&cs, &vc0));
            let bt = Tensor::from_i32(&Device::Cpu, &[n], &bad).unwrap();
            let e = kv_cache::kv_cache_write(&mut kc, &mut vc, &kt, &vt, &bt).unwrap_err().to_string();
            assert!(e.contains("past the cache"), "{e}");
            let before = widen(&[kc0.clone(), vc0.clone()].concat());
            rows.push(check_exact("cpu", "kv_cache.bad_slot", &label, dt, &[got(&kc), got(&vc)].concat(), &before));

            let Some(g) = gpu else { continue };
            let dev = |shape: &[usize], x: &[f32]| Tensor::from_f32(g, shape, x, dt).unwrap();
            let (kg, vg) = (dev(&ks, &kd), dev(&ks, &vd));
            // On the GPU slots past the cache are skipped (scatter64 skips them too).
            for (name, m) in [("kv_cache_write", &map), ("kv_cache.bad_slot", &bad)] {
                let (mut kc, mut vc) = (dev(&cs, &kc0), dev(&cs, &vc0));
                kv_cache::kv_cache_write(&mut kc, &mut vc, &kg, &vg, &Tensor::from_i32(g, &[n], m).unwrap()).unwrap();
                rows.push(check_exact("gpu", name, &label, dt, &[got(&kc), got(&vc)].concat(), &want(m)));
            }
        }
        rows
    })
}

// ----------------------------------------------------------------------------
// paged_attention

/// One batch over a paged cache: heads over kv heads, head dim, block size,
/// (Lq, Lk) per sequence; `q_scale` as in attention.rs's `Spec`.
struct Paged {
    heads: usize,
    kv_heads: usize,
    d: usize,
    block_size: usize,
    seqs: Vec<(usize, usize)>,
    q_scale: f32,
}

impl Paged {
    fn label(&self) -> String {
        let (h, hk, d, bs) = (self.heads, self.kv_heads, self.d, self.block_size);
        let max_k = self.seqs.iter().map(|s| s.1).max().unwrap_or(0);
        let lens = if self.seqs.len() > 6 && self.seqs.iter().all(|s| s.0 == 1) {
            format!("{} decodes <={max_k}", self.seqs.len())
        } else {
            let l: Vec<String> = self
                .seqs
                .iter()
                .map(|&(lq, lk)| if lq == lk { lq.to_string() } else { format!("{lq}/{lk}") })
                .collect();
            format!("[{}]", l.join(","))
        };
        format!("{h}/{hk} d{d} b{bs} {lens}")
    }
}

fn offsets(lens: impl Iterator<Item = usize>) -> Vec<i32> {
    let mut cu = vec![0i32];
    for l in lens {
        cu.push(cu[cu.len() - 1] + l as i32);
    }
    cu
}

fn run(p: &Paged, gpu: Option<&Device>, rng: &mut Rng) -> Vec<Row> {
    let (h, hk, d, bs) = (p.heads, p.kv_heads, p.d, p.block_size);
    let (batch, row, hd) = (p.seqs.len(), hk * d, h * d);
    let (cu_q, cu_k) = (offsets(p.seqs.iter().map(|s| s.0)), offsets(p.seqs.iter().map(|s| s.1)));
    let (total_q, total_k) = (cu_q[batch] as usize, cu_k[batch] as usize);
    let max_q = p.seqs.iter().map(|s| s.0).max().unwrap_or(0);
    let max_k = p.seqs.iter().map(|s| s.1).max().unwrap_or(0);
    let lens: Vec<i32> = p.seqs.iter().map(|s| s.1 as i32).collect();
    let scale = 1.0 / (d as f32).sqrt();
    let label = p.label();

    // Block tables: the blocks each sequence needs, drawn from a random
    // permutation of a cache with a third more blocks than needed; entries
    // past a sequence's last block are out of range (never read).
    let need: Vec<usize> = p.seqs.iter().map(|s| s.1.div_ceil(bs)).collect();
    let used: usize = need.iter().sum();
    let (num_blocks, max_blocks) = (used + used / 3 + 2, need.iter().max().unwrap_or(&0) + 2);
    let mut perm = shuffled(num_blocks, rng).into_iter();
    let mut tables = vec![0i32; batch * max_blocks];
    for b in 0..batch {
        for i in 0..max_blocks {
            tables[b * max_blocks + i] = match i < need[b] {
                true => perm.next().unwrap() as i32,
                false if i.is_multiple_of(2) => -1,
                false => i32::MAX,
            };
        }
    }
    // Random bf16 values in every slot; q and the gathered, packed keys.
    let cs = [num_blocks, bs, hk, d];
    let kc = round_to(&rng.normals(num_blocks * bs * row, 1.0), DType::BF16);
    let vc = round_to(&rng.normals(num_blocks * bs * row, 1.0), DType::BF16);
    let qd = round_to(&rng.normals(total_q * hd, p.q_scale), DType::BF16);
    let (mut kd, mut vd) = (Vec::with_capacity(total_k * row), Vec::with_capacity(total_k * row));
    for (b, &(_, lk)) in p.seqs.iter().enumerate() {
        for j in 0..lk {
            let r = tables[b * max_blocks + j / bs] as usize * bs + j % bs;
            kd.extend_from_slice(&kc[r * row..(r + 1) * row]);
            vd.extend_from_slice(&vc[r * row..(r + 1) * row]);
        }
    }
    // The f64 formulation covers every row (sample 1).
    let sp = Spec { heads: h, kv_heads: hk, d, seqs: p.seqs.clone(), causal: true, q_scale: p.q_scale, sample: 1 };

    // The inputs on one device, and the two ops on them. `last` runs the last
    // sequence alone, with its row of the block tables.
    struct Inputs {
        q: Tensor,
        kc: Tensor,
        vc: Tensor,
        cu_q: Tensor,
        lens: Tensor,
        tables: Tensor,
        k: Tensor,
        v: Tensor,
        cu_k: Tensor,
    }
    let inputs = |dev: &Device, dt: DType| {
        let f = |shape: &[usize], x: &[f32]| Tensor::from_f32(dev, shape, x, dt).unwrap();
        let i = |shape: &[usize], x: &[i32]| Tensor::from_i32(dev, shape, x).unwrap();
        Inputs {
            q: f(&[total_q, h, d], &qd),
            kc: f(&cs, &kc),
            vc: f(&cs, &vc),
            cu_q: i(&[batch + 1], &cu_q),
            lens: i(&[batch], &lens),
            tables: i(&[batch, max_blocks], &tables),
            k: f(&[total_k, hk, d], &kd),
            v: f(&[total_k, hk, d], &vd),
            cu_k: i(&[batch + 1], &cu_k),
        }
    };
    let out = |dev: &Device, dt: DType, tq: usize| match dev {
        Device::Cpu => Tensor::empty(dev, &[tq, h, d], dt).unwrap(),
        _ => poisoned(dev, &[tq, h, d], dt),
    };
    let paged_with = |x: &Inputs, dev: &Device, dt: DType, max_seqlen_q: usize, split: Split| {
        let mut o = out(dev, dt, total_q);
        let (q, kc, vc, cu, lens, tables) = (&x.q, &x.kc, &x.vc, &x.cu_q, &x.lens, &x.tables);
        attention::paged_attention_with(&mut o, q, kc, vc, cu, lens, tables, max_seqlen_q, scale, split).unwrap();
        o.to_f32_vec().unwrap()
    };
    let paged =
        |x: &Inputs, dev: &Device, dt: DType, max_seqlen_q: usize| paged_with(x, dev, dt, max_seqlen_q, Split::Never);
    let packed = |x: &Inputs, dev: &Device, dt: DType| {
        let mut o = out(dev, dt, total_q);
        attention::attention(&mut o, &x.q, &x.k, &x.v, &x.cu_q, &x.cu_k, max_q, true, scale).unwrap();
        o.to_f32_vec().unwrap()
    };
    let (q0, lq) = (cu_q[batch - 1] as usize, p.seqs[batch - 1].0);
    let last = |dev: &Device, dt: DType| {
        let f = |shape: &[usize], x: &[f32]| Tensor::from_f32(dev, shape, x, dt).unwrap();
        let i = |shape: &[usize], x: &[i32]| Tensor::from_i32(dev, shape, x).unwrap();
        let (q, cu, len) = (f(&[lq, h, d], &qd[q0 * hd..]), i(&[2], &[0, lq as i32]), i(&[1], &lens[batch - 1..]));
        let table = i(&[1, max_blocks], &tables[(batch - 1) * max_blocks..]);
        let (kc, vc) = (f(&cs, &kc), f(&cs, &vc));
        let mut o = out(dev, dt, lq);
        attention::paged_attention_with(&mut o, &q, &kc, &vc, &cu, &len, &table, lq, scale, Split::Never).unwrap();
        widen(&o.to_f32_vec().unwrap())
    };

    let host = inputs(&Device::Cpu, DType::F32);
    let cpu = paged(&host, &Device::Cpu, DType::F32, max_q);
    let (r64, kept) = attention64(&sp, &widen(&qd), &widen(&kd), &widen(&vd), scale as f64);
    let r64 = pick(&r64, &kept, hd);
    let mut rows = vec![check_cpu("paged_attention", &label, &pick(&cpu, &kept, hd), &r64, max_k)];
    let (cpu64, tail) = (widen(&cpu), q0 * hd..);
    let packed_cpu = widen(&packed(&host, &Device::Cpu, DType::F32));
    rows.push(check_exact("cpu", "paged.vs_packed", &label, DType::F32, &cpu64, &packed_cpu));
    rows.push(check_exact(
        "cpu",
        "paged.alone",
        &label,
        DType::F32,
        &last(&Device::Cpu, DType::F32),
        &cpu64[tail.clone()],
    ));

    let Some(g) = gpu else { return rows };
    let baseline = attention_bf16(&sp, &qd, &kd, &vd, scale);
    let tolerance = |name: &str, dt: DType, got: &[f32]| match dt {
        DType::F32 => check_gpu(name, &label, dt, &pick(got, &kept, hd), &r64, &widen(&pick(&cpu, &kept, hd))),
        _ => check_gpu(name, &label, dt, got, &cpu64, &baseline),
    };
    for dt in FLOAT_DTYPES {
        let x = inputs(g, dt);
        // As the model calls it: decode batches run split-K.
        rows.push(tolerance("paged_attention", dt, &paged_with(&x, g, dt, max_q, Split::Auto)));
        // Split-K on every sequence, whatever the call's shape.
        let simple = widen(&paged(&x, g, dt, 1));
        let one = widen(&paged_with(&x, g, dt, max_q, Split::Parts(1)));
        rows.push(check_exact("gpu", "paged.split1", &label, dt, &one, &simple));
        for n in [3, 64] {
            let split = paged_with(&x, g, dt, max_q, Split::Parts(n));
            rows.push(tolerance(&format!("paged.split{n}"), dt, &split));
            let stride = widen(&paged_with(&x, g, dt, 1, Split::Parts(n)));
            rows.push(check_exact("gpu", "paged.split_stride", &label, dt, &stride, &widen(&split)));
        }

        let got = paged(&x, g, dt, max_q);
        rows.push(tolerance("paged.unsplit", dt, &got));
        let got = widen(&got);
        // max_seqlen_q = 1 below the truth: the simple kernel takes every sequence.
        if small_grid(dt, max_q) > 1 {
            let simple = paged(&x, g, dt, 1);
            rows.push(check_gpu("paged.simple", &label, dt, &simple, &cpu64, &baseline));
        }
        // A grid sized for the fewest queries that keep the kernel choice:
        // the blocks grid-stride over the other rows.
        let small = widen(&paged(&x, g, dt, small_grid(dt, max_q)));
        rows.push(check_exact("gpu", "paged.grid_stride", &label, dt, &small, &got));
        // The packed kernel on the gathered keys runs the same device code.
        rows.push(check_exact("gpu", "paged.vs_packed", &label, dt, &widen(&packed(&x, g, dt)), &got));
        rows.push(check_exact("gpu", "paged.alone", &label, dt, &last(g, dt), &got[tail.clone()]));
    }
    rows
}

/// A head dim without GPU kernels: the CPU rows of `run`, and on a GPU the
/// op's error instead of a launch.
fn run_cpu_only(p: &Paged, gpu: Option<&Device>, rng: &mut Rng) -> Vec<Row> {
    assert!(!attention::HEAD_DIMS.contains(&p.d), "d{} has GPU kernels", p.d);
    if let Some(g) = gpu {
        let (h, hk, d) = (p.heads, p.kv_heads, p.d);
        let f = |shape: &[usize]| {
            let n = shape.iter().product();
            Tensor::from_f32(g, shape, &vec![0.5; n], DType::BF16).unwrap()
        };
        let (mut o, q, cache) = (f(&[1, h, d]), f(&[1, h, d]), f(&[1, p.block_size, hk, d]));
        let i = |shape: &[usize], x: &[i32]| Tensor::from_i32(g, shape, x).unwrap();
        let (cu, lens, table) = (i(&[2], &[0, 1]), i(&[1], &[1]), i(&[1, 1], &[0]));
        let e = attention::paged_attention(&mut o, &q, &cache, &cache, &cu, &lens, &table, 1, 0.1).unwrap_err();
        let e = e.to_string();
        assert!(e.contains(&format!("head dim {d} not supported on the GPU")), "{e}");
    }
    run(p, None, rng)
}

pub fn cases() -> Vec<Case> {
    let mut v = vec![
        write_case(37, 13, 16, 2, 128),
        write_case(300, 40, 16, 2, 80),
        write_case(5, 3, 5, 12, 64),
        // Rows of 7 values: not whole 16-byte words, copied element by element.
        write_case(9, 4, 3, 1, 7),
        // Head dim 72 (bf16 rows of 9 words) and 24 (no attention kernels).
        write_case(77, 20, 16, 2, 72),
        write_case(17, 7, 5, 3, 24),
    ];
    let spec = |heads, kv_heads, d, block_size, seqs: &[(usize, usize)], q_scale| Paged {
        heads,
        kv_heads,
        d,
        block_size,
        seqs: seqs.to_vec(),
        q_scale,
    };
    // A decode over 300 keys, a full prefill of 37, a prefill of 5 after 124
    // cached keys, a one-token prompt.
    let mixed = [(1, 300), (37, 37), (5, 129), (1, 1)];
    // 64 decode steps over 1..300 keys (Qwen2-VL-2B heads).
    let decodes: Vec<(usize, usize)> = (0..64).map(|i| (1, 1 + (i * 97) % 300)).collect();
    let specs = [
        // Qwen2-VL-2B's heads (12/2 of 128) and the ViT's shape (16/16 of 80),
        // the latter with a peaked softmax whose running max moves between tiles.
        spec(12, 2, 128, 16, &mixed, 1.0),
        spec(16, 16, 80, 32, &mixed, 3.0),
        // Odd block sizes; queries that see no key (6 over 2: the first 4; 2 over 0).
        spec(12, 2, 80, 5, &[(3, 41), (1, 7), (20, 20), (6, 2), (2, 0)], 1.0),
        spec(16, 16, 128, 7, &[(9, 70), (1, 33)], 1.0),
        // One key per block; groups of 7 (Qwen2-VL-7B's 28/4).
        spec(28, 4, 96, 1, &[(4, 10), (1, 3)], 1.0),
        spec(12, 2, 128, 16, &decodes, 1.0),
        // The tensor-core kernel (sequences of 16 queries or more) beside the
        // simple one: prefills around its 64-row tiles, chunked prefills over
        // cached keys, decode steps, and queries that see no key (20 over 2).
        spec(12, 2, 128, 16, &[(1, 300), (65, 65), (17, 129), (129, 129), (20, 2), (1, 1)], 1.0),
        spec(16, 16, 80, 5, &[(63, 63), (17, 17), (1, 40), (64, 130)], 3.0),
        spec(4, 1, 80, 5, &[(16, 16), (100, 1030)], 1.0),
        // Split-K decode: contexts around the 32-key tiles and 64-key
        // partitions, short and long sequences in one batch; groups of 6,
        // 7, 1 and 2; a peaked softmax whose max moves between partitions.
        spec(12, 2, 128, 16, &[(1, 1), (1, 15), (1, 16), (1, 17), (1, 255), (1, 257), (1, 1000), (1, 4097)], 1.0),
        spec(12, 2, 128, 16, &[(1, 4097)], 3.0),
        spec(28, 4, 128, 16, &[(1, 4097), (1, 1), (1, 65), (1, 128)], 1.0),
        spec(16, 16, 80, 16, &[(1, 1000), (1, 257), (1, 16)], 3.0),
        // Several queries a sequence (split up to SPLIT_MAX_Q), an odd block
        // size, queries that see no key (3 over 1: the first 2; 2 over 0).
        spec(4, 2, 80, 5, &[(2, 1000), (3, 1), (4, 4097), (2, 0), (1, 63)], 1.0),
        spec(14, 2, 128, 1, &[(1, 300), (2, 129)], 1.0),
        // Head dim 72 (tensor-core tiles padded to 80): a mixed batch over
        // blocks of 7 (decode, prefills around the 64-row tiles, a chunk over
        // cached keys, queries that see no key); prefills over blocks of 3;
        // split-K decodes over 1 to 4097 keys and, with several queries a
        // sequence, over blocks of 5.
        spec(16, 16, 72, 7, &[(1, 300), (77, 77), (17, 129), (1, 1), (20, 2)], 3.0),
        spec(8, 2, 72, 3, &[(63, 63), (17, 17), (1, 40), (64, 130)], 1.0),
        spec(12, 2, 72, 16, &[(1, 1), (1, 17), (1, 77), (1, 300), (1, 1000), (1, 4097)], 1.0),
        spec(4, 1, 72, 5, &[(2, 1000), (3, 1), (4, 300), (2, 0), (1, 63)], 3.0),
    ];
    v.extend(
        specs
            .into_iter()
            .map(|p| Case::new(format!("paged_attention {}", p.label()), move |gpu, rng| run(&p, gpu, rng))),
    );
    // A head dim without GPU kernels (24): the CPU alone.
    let p = spec(4, 2, 24, 5, &[(1, 300), (17, 17), (3, 41), (2, 0), (1, 1)], 1.0);
    v.push(Case::new(format!("paged_attention {} cpu-only", p.label()), move |gpu, rng| run_cpu_only(&p, gpu, rng)));
    v
}
