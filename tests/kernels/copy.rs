//! Row copies between tensors (KV-cache appends, image-feature scatter).

use kestrel::DType;

use crate::harness::*;

pub fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    for (rows_dst, rows_src, row, dst_row, src_row, n) in
        [(10, 4, vec![3, 80], 6, 0, 4), (300, 37, vec![2, 128], 1, 5, 31), (5, 5, vec![769], 0, 0, 5)]
    {
        v.push(Case::new(format!("copy_rows {rows_src}->{rows_dst}x{row:?}"), move |gpu, rng| {
            let mut out = Vec::new();
            for dt in FLOAT_DTYPES {
                let len: usize = row.iter().product();
                let shape = |r: usize| [vec![r], row.clone()].concat();
                let dst_data = round_to(&rng.normals(rows_dst * len, 1.0), dt);
                let src_data = round_to(&rng.normals(rows_src * len, 1.0), dt);
                // Independent expectation: splice by hand.
                let mut expect = dst_data.clone();
                expect[dst_row * len..(dst_row + n) * len]
                    .copy_from_slice(&src_data[src_row * len..(src_row + n) * len]);
                let label = format!("{n} of {rows_src} rows into {rows_dst}");
                let (mut dc, dg) = split(gpu, &shape(rows_dst), &dst_data, dt);
                let (sc, sg) = split(gpu, &shape(rows_src), &src_data, dt);
                dc.copy_rows_from(dst_row, &sc, src_row, n).unwrap();
                out.push(check_exact(
                    "cpu",
                    "copy_rows",
                    &label,
                    DType::F32,
                    &widen(&dc.to_f32_vec().unwrap()),
                    &widen(&expect),
                ));
                if let (Some(mut dg), Some(sg)) = (dg, sg) {
                    dg.copy_rows_from(dst_row, &sg, src_row, n).unwrap();
                    out.push(check_exact(
                        "gpu",
                        "copy_rows",
                        &label,
                        dt,
                        &widen(&dg.to_f32_vec().unwrap()),
                        &widen(&expect),
                    ));
                    // Out of range is an error, not a fault.
                    assert!(dg.copy_rows_from(rows_dst - n + 1, &sg, src_row, n).is_err());
                }
                assert!(dc.copy_rows_from(rows_dst - n + 1, &sc, src_row, n).is_err());
            }
            out
        }));
    }
    v
}
