//! Position ids for Qwen2-VL's two rotary embeddings.
//!
//! - [`rope_index`]: the LM's 3-D M-RoPE positions (temporal, height, width)
//!   — transformers 5.x `Qwen2VLModel.get_rope_index` +
//!   `get_vision_position_ids` (`models/qwen2_vl/modeling_qwen2_vl.py`).
//! - [`vision_position_ids`]: the ViT's 2-D (row, col) per patch —
//!   transformers `vision_utils.get_vision_position_ids` (what 4.x called
//!   `Qwen2VisionTransformerPretrainedModel.rot_pos_emb`).
//!
//! The M-RoPE rule: text tokens advance one position per token on all three
//! rows. A vision block of merged grid (t, h', w') = (t, h/m, w/m) that starts
//! at position s gives its tokens (s + ti, s + hi, s + wi) in (t, h', w')
//! order, and the text after it resumes at s + max(h', w').
//!
//! Note on videos: transformers 5.x advances by max(h', w') only. 4.x (the
//! Qwen team's original code, also vLLM's) resumed at s + max(t, h', w'). The
//! two differ only for a video with more temporal patches than merged rows
//! or columns; we follow 5.x, our oracle.

use crate::error::{Error, Result};

/// M-RoPE positions of a prompt: (positions laid out [3][n] as 3·n i32 —
/// the temporal row, then height, then width —, mrope_position_delta).
///
/// Vision placeholders are maximal runs of `image_token_id` or
/// `video_token_id`; each run must directly follow `vision_start_token_id`
/// and hold exactly t·h·w / merge² tokens of the next grid of its kind (the
/// processor's expansion), and every grid must be used. A decode step at
/// sequence index i ≥ n then sits at position i + delta on all three rows
/// ([`decode_position`]).
pub fn rope_index(
    input_ids: &[u32],
    image_grid_thw: &[[usize; 3]],
    video_grid_thw: &[[usize; 3]],
    spatial_merge_size: usize,
    image_token_id: u32,
    video_token_id: u32,
    vision_start_token_id: u32,
) -> Result<(Vec<i32>, i64)> {
    let n = input_ids.len();
    if spatial_merge_size == 0 {
        return Err(Error::Config("spatial_merge_size must be positive".into()));
    }
    let (mut t_row, mut h_row, mut w_row) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut images, mut videos) = (image_grid_thw.iter(), video_grid_thw.iter());
    let mut pos: i64 = 0; // HF `current_pos`
    let mut i = 0;
    while i < n {
        let id = input_ids[i];
        let (kind, grids) = if id == image_token_id {
            ("image", &mut images)
        } else if id == video_token_id {
            ("video", &mut videos)
        } else {
            t_row.push(pos);
            h_row.push(pos);
            w_row.push(pos);
            pos += 1;
            i += 1;
            continue;
        };
        let run = input_ids[i..].iter().take_while(|&&x| x == id).count();
        if i == 0 || input_ids[i - 1] != vision_start_token_id {
            return Err(Error::InvalidInput(format!(
                "{kind} placeholder tokens at position {i} do not follow <|vision_start|>"
            )));
        }
        let Some(&[t, h, w]) = grids.next() else {
            return Err(Error::InvalidInput(format!(
                "the prompt has more {kind} placeholders than {kind}s (extra run at position {i})"
            )));
        };
        let (m, hm, wm) = (spatial_merge_size, h / spatial_merge_size, w / spatial_merge_size);
        if h % m != 0 || w % m != 0 || t * hm * wm != run {
            return Err(Error::InvalidInput(format!(
                "{kind} at position {i} has {run} placeholder tokens but its grid {t}x{h}x{w} \
                 needs {}",
                t * hm * wm
            )));
        }
        for ti in 0..t {
            for hi in 0..hm {
                for wi in 0..wm {
                    t_row.push(pos + ti as i64);
                    h_row.push(pos + hi as i64);
                    w_row.push(pos + wi as i64);
                }
            }
        }
        pos += hm.max(wm) as i64;
        i += run;
    }
    if images.next().is_some() || videos.next().is_some() {
        return Err(Error::InvalidInput(format!(
            "{} images and {} videos were given but the prompt has fewer placeholders",
            image_grid_thw.len(),
            video_grid_thw.len()
        )));
    }
    // HF: llm_positions.max() + 1 - len(input_ids).
    let max = t_row.iter().chain(&h_row).chain(&w_row).copied().max().unwrap_or(-1);
    let delta = max + 1 - n as i64;
    let mut positions = Vec::with_capacity(3 * n);
    for row in [t_row, h_row, w_row] {
        for p in row {
            positions.push(i32::try_from(p).map_err(|_| {
                Error::InvalidInput(format!("position {p} does not fit in i32; the prompt is too long"))
            })?);
        }
    }
    Ok((positions, delta))
}

/// M-RoPE position (same on all three rows) of the token at sequence index
/// `index` once the prompt is done: index + delta (HF `compute_3d_position_ids`
/// with cached `rope_deltas`).
pub use crate::model::inputs::decode_position;

/// ViT rotary positions: (t·h·w, 2) row-major i32 pairs (row, col) of each
/// patch, in the order the processor emits patches (merge windows: for each
/// frame, for each m x m window in raster order, its patches in raster
/// order). `grid_thw` is in patches (before merging).
pub fn vision_position_ids(grid_thw: [usize; 3], merge_size: usize) -> Vec<i32> {
    let [t, h, w] = grid_thw;
    let m = merge_size.max(1);
    let mut out = Vec::with_capacity(t * h * w * 2);
    for _ in 0..t {
        for bh in 0..h / m {
            for bw in 0..w / m {
                for mh in 0..m {
                    for mw in 0..m {
                        out.push((bh * m + mh) as i32);
                        out.push((bw * m + mw) as i32);
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const IMG: u32 = 151655;
    const VID: u32 = 151656;
    const VS: u32 = 151652;
    const VE: u32 = 151653;

    fn rows(p: &[i32]) -> [&[i32]; 3] {
        let n = p.len() / 3;
        [&p[..n], &p[n..2 * n], &p[2 * n..]]
    }

    #[test]
    fn text_only_is_arange_on_all_rows() {
        let ids: Vec<u32> = (0..7).collect();
        let (p, delta) = rope_index(&ids, &[], &[], 2, IMG, VID, VS).unwrap();
        for r in rows(&p) {
            assert_eq!(r, &[0, 1, 2, 3, 4, 5, 6]);
        }
        assert_eq!(delta, 0);
        assert_eq!(rope_index(&[], &[], &[], 2, IMG, VID, VS).unwrap(), (vec![], 0));
    }

    #[test]
    fn one_image() {
        // 2 text, <vs>, image grid (1, 4, 6) -> merged 2 x 3 = 6 tokens, <ve>, 2 text.
        let mut ids = vec![1, 2, VS];
        ids.extend([IMG; 6]);
        ids.extend([VE, 3, 4]);
        let (p, delta) = rope_index(&ids, &[[1, 4, 6]], &[], 2, IMG, VID, VS).unwrap();
        let [t, h, w] = rows(&p);
        // Text 0,1,2; image starts at 3: t = 3, h = 3 + row, w = 3 + col;
        // text resumes at 3 + max(2, 3) = 6.
        assert_eq!(t, &[0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7, 8]);
        assert_eq!(h, &[0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7, 8]);
        assert_eq!(w, &[0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8]);
        // max 8, n 12: delta = 8 + 1 - 12.
        assert_eq!(delta, -3);
        assert_eq!(decode_position(12, delta), 9);
    }

    #[test]
    fn two_images_and_a_video_interleaved() {
        let mut ids = vec![5, VS];
        ids.extend([IMG; 4]); // (1, 4, 4)
        ids.extend([VE, 6, VS]);
        ids.extend([VID; 4]); // (2, 4, 2): t = 2 of 2 x 1 merged
        ids.extend([VE, VS]);
        ids.extend([IMG; 1]); // (1, 2, 2)
        ids.push(VE);
        let (p, delta) = rope_index(&ids, &[[1, 4, 4], [1, 2, 2]], &[[2, 4, 2]], 2, IMG, VID, VS).unwrap();
        let [t, h, w] = rows(&p);
        // 5@0 VS@1 | img@2: 2x2 | VE@4 6@5 VS@6 | vid@7: t 7,8 h 7,8 w 7 | VE@9 VS@10 | img@11 | VE@12
        assert_eq!(t, &[0, 1, 2, 2, 2, 2, 4, 5, 6, 7, 7, 8, 8, 9, 10, 11, 12]);
        assert_eq!(h, &[0, 1, 2, 2, 3, 3, 4, 5, 6, 7, 8, 7, 8, 9, 10, 11, 12]);
        assert_eq!(w, &[0, 1, 2, 3, 2, 3, 4, 5, 6, 7, 7, 7, 7, 9, 10, 11, 12]);
        assert_eq!(delta, 12 + 1 - 17);
    }

    #[test]
    fn long_video_advances_by_spatial_extent_only() {
        // t = 3 temporal patches, merged 1 x 1: 5.x resumes at s + 1 (4.x: s + 3).
        let ids = [VS, VID, VID, VID, VE];
        let (p, delta) = rope_index(&ids, &[], &[[3, 2, 2]], 2, IMG, VID, VS).unwrap();
        let [t, h, w] = rows(&p);
        assert_eq!(t, &[0, 1, 2, 3, 2]);
        assert_eq!(h, &[0, 1, 1, 1, 2]);
        assert_eq!(w, &[0, 1, 1, 1, 2]);
        assert_eq!(delta, 3 + 1 - 5);
    }

    #[test]
    fn mismatches_are_errors() {
        let ids = [VS, IMG, IMG, IMG, VE];
        // Wrong count for the grid.
        assert!(rope_index(&ids, &[[1, 2, 2]], &[], 2, IMG, VID, VS).is_err());
        // Missing grid; unused grid.
        assert!(rope_index(&ids, &[], &[], 2, IMG, VID, VS).is_err());
        let ok = [VS, IMG, VE];
        assert!(rope_index(&ok, &[[1, 2, 2], [1, 2, 2]], &[], 2, IMG, VID, VS).is_err());
        // Placeholder without <|vision_start|>.
        let err = rope_index(&[1, IMG, VE], &[[1, 2, 2]], &[], 2, IMG, VID, VS).unwrap_err();
        assert!(matches!(err, Error::InvalidInput(_)), "{err}");
    }

    #[test]
    fn vision_positions_follow_merge_windows() {
        let p = vision_position_ids([1, 2, 4], 2);
        let pairs: Vec<(i32, i32)> = p.chunks(2).map(|c| (c[0], c[1])).collect();
        assert_eq!(pairs, [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]);
        let p = vision_position_ids([2, 2, 2], 2);
        assert_eq!(p, [0, 0, 0, 1, 1, 0, 1, 1, 0, 0, 0, 1, 1, 0, 1, 1]);
    }
}
