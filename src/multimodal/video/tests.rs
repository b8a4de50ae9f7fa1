//! Video decoding on files made here: OpenH264's encoder writes the H.264,
//! `tests/common/mp4.rs` the MP4 around it, so CI needs no network or file.

use image::{Rgb, RgbImage};

use super::*;

#[path = "../../../tests/common/mp4.rs"]
mod mp4w;

/// Frame `i` of a test clip: a solid colour per frame.
fn solid(w: u32, h: u32, c: [u8; 3]) -> RgbImage {
    RgbImage::from_pixel(w, h, Rgb(c))
}

/// Distinct colours away from the gamut edges (limited-range round trips
/// clip there), so each decoded frame says which source frame it is.
fn palette(i: usize) -> [u8; 3] {
    let i = i as u32;
    [(40 + i * 37 % 180) as u8, (200 - i * 23 % 160) as u8, (60 + i * 71 % 150) as u8]
}

fn clip(n: usize, w: u32, h: u32) -> Vec<u8> {
    let frames: Vec<RgbImage> = (0..n).map(|i| solid(w, h, palette(i))).collect();
    mp4w::h264_mp4(&frames, 30)
}

fn err(r: Result<Video>) -> String {
    match r {
        Err(e @ Error::InvalidInput(_)) => e.to_string(),
        Err(e) => panic!("expected InvalidInput, got {e}"),
        Ok(v) => panic!("expected an error, got {} frames", v.frames.len()),
    }
}

fn all() -> VideoSampling {
    VideoSampling { num_frames: -1, fps: -1.0 }
}

#[test]
fn indices_follow_numpy_linspace() {
    let s = |num_frames| VideoSampling { num_frames, fps: -1.0 };
    // np.linspace(0, 99, 32, dtype=int)
    let want: Vec<usize> = vec![
        0, 3, 6, 9, 12, 15, 19, 22, 25, 28, 31, 35, 38, 41, 44, 47, 51, 54, 57, 60, 63, 67, 70, 73, 76, 79, 83, 86, 89,
        92, 95, 99,
    ];
    assert_eq!(sample_indices(100, s(32), 30.0), want);
    // np.linspace(0, 9, 4, dtype=int) = [0, 3, 6, 9]; 7 of 10 = [0 1 3 4 6 7 9]
    assert_eq!(sample_indices(10, s(4), 30.0), [0, 3, 6, 9]);
    assert_eq!(sample_indices(10, s(7), 30.0), [0, 1, 3, 4, 6, 7, 9]);
    // Fewer frames than asked, or -1: all of them.
    assert_eq!(sample_indices(5, s(32), 30.0), [0, 1, 2, 3, 4]);
    assert_eq!(sample_indices(5, s(-1), 30.0), [0, 1, 2, 3, 4]);
    assert_eq!(sample_indices(7, s(1), 30.0), [0]);
    // fps caps at floor(duration · fps): 90 frames at 30 fps = 3 s, 2 fps → 6.
    let f = |num_frames, fps| VideoSampling { num_frames, fps };
    assert_eq!(sample_indices(90, f(32, 2.0), 30.0), [0, 17, 35, 53, 71, 89]);
    assert_eq!(sample_indices(90, f(4, 2.0), 30.0), [0, 29, 59, 89]);
    // A clip shorter than one sample period still gives a frame; an unknown
    // source rate means a duration of 0, so one frame.
    assert_eq!(sample_indices(10, f(-1, 1.0), 30.0), [0]);
    assert_eq!(sample_indices(10, f(-1, 1.0), 0.0), [0]);
}

#[test]
fn decodes_every_frame_with_its_colour() {
    let (w, h, n) = (64, 48, 6);
    let v = decode_mp4(&clip(n, w, h), all(), &VideoLimits::default()).unwrap();
    assert_eq!((v.total_frames, v.indices.clone()), (n, (0..n).collect::<Vec<_>>()));
    assert!((v.fps - 30.0).abs() < 1e-6, "{}", v.fps);
    for (i, f) in v.frames.iter().enumerate() {
        assert_eq!(f.dimensions(), (w, h));
        // Lossy coding of a flat colour plus the 8-bit BT.601 round trip:
        // within a few levels everywhere.
        let want = palette(i);
        for p in f.pixels() {
            for c in 0..3 {
                assert!(p.0[c].abs_diff(want[c]) <= 6, "frame {i}: {:?} vs {want:?}", p.0);
            }
        }
    }
}

#[test]
fn samples_32_of_a_longer_clip_as_vllm_does() {
    let n = 40;
    let v = decode_mp4(&clip(n, 32, 32), VideoSampling::default(), &VideoLimits::default()).unwrap();
    let want = sample_indices(n, VideoSampling::default(), 30.0);
    assert_eq!(want.len(), 32);
    assert_eq!(v.indices, want);
    assert_eq!(v.frames.len(), 32);
    for (f, &i) in v.frames.iter().zip(&want) {
        let p = f.get_pixel(16, 16).0;
        let c = palette(i);
        assert!((0..3).all(|k| p[k].abs_diff(c[k]) <= 6), "frame {i}: {p:?} vs {c:?}");
    }
}

#[test]
fn a_gradient_keeps_its_shape_and_odd_sizes_are_cropped() {
    // 72x40: not a multiple of 16, so the stream carries a cropping window.
    let (w, h) = (72, 40);
    let g = RgbImage::from_fn(w, h, |x, y| Rgb([(40 + x * 2) as u8, (40 + y * 4) as u8, 128]));
    let v = decode_mp4(&mp4w::h264_mp4(&[g.clone(), g.clone()], 25), all(), &VideoLimits::default()).unwrap();
    assert_eq!(v.frames.len(), 2);
    let f = &v.frames[0];
    assert_eq!(f.dimensions(), (w, h));
    let mean_err: f64 = f
        .pixels()
        .zip(g.pixels())
        .map(|(a, b)| (0..3).map(|c| a.0[c].abs_diff(b.0[c]) as f64).sum::<f64>())
        .sum::<f64>()
        / (w * h * 3) as f64;
    assert!(mean_err < 4.0, "mean abs error {mean_err}");
}

#[test]
fn bt601_limited_range_matches_ffmpeg_levels() {
    use h264::yuv_to_rgb;
    assert_eq!(yuv_to_rgb(16, 128, 128), [0, 0, 0]);
    assert_eq!(yuv_to_rgb(235, 128, 128), [255, 255, 255]);
    assert_eq!(yuv_to_rgb(126, 128, 128), [128, 128, 128]);
    // BT.601 red (R'G'B' 255,0,0 → Y 81, Cb 90, Cr 240) comes back red.
    let r = yuv_to_rgb(81, 90, 240);
    assert!(r[0] >= 253 && r[1] <= 2 && r[2] <= 2, "{r:?}");
    // Out-of-range codes (footroom, headroom) clamp rather than wrap.
    assert_eq!(yuv_to_rgb(0, 128, 128), [0, 0, 0]);
    assert_eq!(yuv_to_rgb(255, 128, 128), [255, 255, 255]);
    assert_eq!(yuv_to_rgb(255, 255, 255), [255, 125, 255]);
}

#[test]
fn short_planes_are_an_error_not_a_panic() {
    let y = [0u8; 15];
    let p = h264::Planes { y: &y, u: &[0; 4], v: &[0; 4], stride_y: 4, stride_u: 2, stride_v: 2 };
    assert!(h264::i420_to_rgb(&p, 4, 4).is_err());
}

#[test]
fn truncated_files_are_errors_not_panics() {
    let file = clip(3, 32, 32);
    // Every prefix, and the file with its tail cut at each box boundary
    // area: none may panic; all but the whole file are refused.
    for cut in (0..file.len()).step_by(7).chain([file.len() - 1]) {
        let e = err(decode_mp4(&file[..cut], all(), &VideoLimits::default()));
        assert!(e.starts_with("the video file") || e.starts_with("no frame"), "cut at {cut}: {e}");
        if cut >= 8 {
            assert!(e.contains("truncated"), "cut at {cut}: {e}");
        }
    }
    // Bytes flipped through the file: an error or fewer frames, never a panic.
    for at in (0..file.len()).step_by(11) {
        let mut f = file.clone();
        f[at] ^= 0x5a;
        let _ = decode_mp4(&f, all(), &VideoLimits::default());
    }
}

#[test]
fn garbage_and_other_codecs_are_refused_by_name() {
    let limits = VideoLimits::default();
    for not_mp4 in [&b"definitely not a video"[..], &[], b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"] {
        let e = err(decode_mp4(not_mp4, all(), &limits));
        assert!(e.starts_with("the video file is not an MP4 file"), "{e}");
    }
    // The same container with an HEVC (hvc1) or VP9 sample entry.
    for (fourcc, name) in [(*b"hvc1", "HEVC"), (*b"vp09", "VP9")] {
        let file = mp4w::mp4_with_entry(fourcc, 32, 32, &[vec![0, 0, 0, 1, 0x40]]);
        let e = err(decode_mp4(&file, all(), &limits));
        assert!(e.contains(name) && e.contains("only H.264"), "{e}");
    }
}

#[test]
fn limits_refuse_before_decoding() {
    let file = clip(4, 64, 48);
    let small = |l: VideoLimits| err(decode_mp4(&file, all(), &l));
    let d = VideoLimits::default();
    let e = small(VideoLimits { max_frame_pixels: 64 * 48 - 1, ..d });
    assert!(e.contains("64x48") && e.contains("more than the 3071 allowed"), "{e}");
    let e = small(VideoLimits { max_frames: 3, ..d });
    assert!(e.contains("4 frames, more than the 3 allowed"), "{e}");
    let e = small(VideoLimits { max_decoded_pixels: 64 * 48 * 3, ..d });
    assert!(e.contains("4 frames of 64x48 to decode"), "{e}");
    let e = small(VideoLimits { max_kept_pixels: 64 * 48, ..d });
    assert!(e.contains("to keep") && e.contains("num_frames"), "{e}");
}

#[test]
fn avcc_and_nal_lengths_are_checked() {
    use mp4::{parse_avcc, to_annex_b};
    // version 1, profile 66, length size 4, one 2-byte SPS, one 1-byte PPS.
    let rec = [1, 66, 0, 30, 0xff, 0xe1, 0, 2, 0x67, 0xaa, 1, 0, 1, 0x68];
    let (profile, len, ps) = parse_avcc(&rec).unwrap();
    assert_eq!((profile, len), (66, 4));
    assert_eq!(ps, [0, 0, 0, 1, 0x67, 0xaa, 0, 0, 0, 1, 0x68]);
    for cut in 0..rec.len() {
        assert!(parse_avcc(&rec[..cut]).is_err(), "{cut}");
    }
    let mut hi10 = rec;
    hi10[1] = 110;
    assert!(parse_avcc(&hi10).unwrap_err().to_string().contains("10-bit"));
    let mut out = Vec::new();
    to_annex_b(&[0, 0, 0, 2, 0x65, 0x88, 0, 0, 0, 1, 0x41], 4, &mut out).unwrap();
    assert_eq!(out, [0, 0, 0, 1, 0x65, 0x88, 0, 0, 0, 1, 0x41]);
    assert!(to_annex_b(&[0, 0, 0, 9, 0x65], 4, &mut out).is_err());
    assert!(to_annex_b(&[0, 0], 4, &mut out).is_err());
}
