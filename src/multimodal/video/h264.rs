//! H.264 access units → RGB frames: Cisco's OpenH264 (the `openh264`
//! crate, built from its vendored source) decodes to I420, converted here.
//!
//! Colour: BT.601 limited range (Y 16..235, Cb/Cr 16..240), each chroma
//! sample repeated over its 2×2 pixels, in 16.16 fixed point with FFmpeg's
//! coefficients (`ff_yuv2rgb_coeffs[SWS_CS_ITU601]`, libswscale/yuv2rgb.c):
//! what OpenCV's `VideoCapture` gets from swscale's unscaled YUV420P→BGR24
//! path, which ignores the stream's colour matrix (so BT.709 HD video is
//! also converted as BT.601 there, as here). Not mirrored: a full-range
//! stream (`video_full_range_flag`, FFmpeg's `yuvj420p`) is expanded from
//! 0..255 there and from 16..235 here, so its blacks and whites come out
//! clipped here; OpenH264's API does not report the flag.

use image::RgbImage;
use openh264::decoder::{DecodedYUV, Decoder};
use openh264::formats::YUVSource;

use super::mp4::{to_annex_b, AvcTrack};
use super::{check_frame_size, VideoLimits};
use crate::error::{Error, Result};

/// Decodes `track`'s samples up to the last of `wanted` (ascending frame
/// indices in display order) and converts those frames; returns them with
/// the indices actually decoded (a frame that fails to decode is skipped,
/// as vLLM's `_read_frames` skips one OpenCV cannot read).
pub fn decode(
    bytes: &[u8],
    track: &AvcTrack,
    wanted: &[usize],
    limits: &VideoLimits,
) -> Result<(Vec<RgbImage>, Vec<usize>)> {
    let Some(&last) = wanted.last() else { return Ok((Vec::new(), Vec::new())) };
    let mut dec = Decoder::new().map_err(|e| Error::Engine(format!("the H.264 decoder did not start: {e}")))?;
    let mut out = Collected { wanted, next: 0, shown: 0, frames: Vec::new(), indices: Vec::new() };
    // Parameter sets first; a failure here shows in the frames that follow.
    let _ = dec.decode(&track.param_sets);
    let mut au = Vec::new();
    let mut failed = 0usize;
    for sample in &track.samples[..track.samples.len().min(last + 1)] {
        au.clear();
        to_annex_b(&bytes[sample.clone()], track.length_size, &mut au)?;
        match dec.decode(&au) {
            Ok(Some(yuv)) => out.take(&yuv, limits)?,
            Ok(None) => {}
            Err(_) => failed += 1,
        }
        if out.done() {
            break;
        }
    }
    if !out.done() {
        // Frames the decoder still holds (reordering delay).
        if let Ok(rest) = dec.flush_remaining() {
            for yuv in &rest {
                out.take(yuv, limits)?;
            }
        }
    }
    if out.frames.is_empty() {
        return Err(Error::InvalidInput(format!(
            "no frame of the video could be decoded ({failed} of {} frames failed); is it 8-bit 4:2:0 H.264?",
            last + 1
        )));
    }
    Ok((out.frames, out.indices))
}

/// The frames kept so far, by display order.
struct Collected<'a> {
    wanted: &'a [usize],
    /// Position in `wanted` of the next frame to keep.
    next: usize,
    /// Frames the decoder has put out so far.
    shown: usize,
    frames: Vec<RgbImage>,
    indices: Vec<usize>,
}

impl Collected<'_> {
    fn done(&self) -> bool {
        self.next >= self.wanted.len()
    }

    /// Counts one decoded frame, converting it if it is wanted.
    fn take(&mut self, yuv: &DecodedYUV<'_>, limits: &VideoLimits) -> Result<()> {
        let index = self.shown;
        self.shown += 1;
        if self.wanted.get(self.next) != Some(&index) {
            return Ok(());
        }
        self.next += 1;
        let (w, h) = yuv.dimensions();
        let (w, h) = (u32::try_from(w).unwrap_or(u32::MAX), u32::try_from(h).unwrap_or(u32::MAX));
        check_frame_size(w, h, limits)?;
        let (sy, su, sv) = yuv.strides();
        let planes = Planes { y: yuv.y(), u: yuv.u(), v: yuv.v(), stride_y: sy, stride_u: su, stride_v: sv };
        self.frames.push(i420_to_rgb(&planes, w, h)?);
        self.indices.push(index);
        Ok(())
    }
}

/// An I420 picture as the decoder lays it out: full-size Y, half-size U
/// and V, each row `stride_*` bytes apart.
pub struct Planes<'a> {
    pub y: &'a [u8],
    pub u: &'a [u8],
    pub v: &'a [u8],
    pub stride_y: usize,
    pub stride_u: usize,
    pub stride_v: usize,
}

/// FFmpeg's BT.601 coefficients in 16.16 fixed point: 255/219 for luma,
/// then crv, cbu, cgu, cgv.
const CY: i32 = 76_309;
const CRV: i32 = 104_597;
const CBU: i32 = 132_201;
const CGU: i32 = 25_675;
const CGV: i32 = 53_279;

/// One pixel, BT.601 limited range → RGB8.
pub fn yuv_to_rgb(y: u8, u: u8, v: u8) -> [u8; 3] {
    let c = CY * (i32::from(y) - 16) + (1 << 15);
    let (d, e) = (i32::from(u) - 128, i32::from(v) - 128);
    let px = |x: i32| (x >> 16).clamp(0, 255) as u8;
    [px(c + CRV * e), px(c - CGU * d - CGV * e), px(c + CBU * d)]
}

/// A `w`×`h` I420 picture → RGB8, chroma repeated over each 2×2 block.
/// Planes too short for their size and strides are an error, not a panic.
pub fn i420_to_rgb(p: &Planes<'_>, w: u32, h: u32) -> Result<RgbImage> {
    let (wu, hu) = (w as usize, h as usize);
    let (cw, ch) = (wu.div_ceil(2), hu.div_ceil(2));
    let fits = |plane: &[u8], stride: usize, width: usize, rows: usize| {
        rows == 0
            || (stride >= width
                && (rows - 1).checked_mul(stride).and_then(|n| n.checked_add(width)) <= Some(plane.len()))
    };
    if !(fits(p.y, p.stride_y, wu, hu) && fits(p.u, p.stride_u, cw, ch) && fits(p.v, p.stride_v, cw, ch)) {
        return Err(Error::InvalidInput(format!("the decoder gave a {w}x{h} frame with short planes")));
    }
    let mut rgb = vec![0u8; wu * hu * 3];
    for (row, out) in rgb.chunks_exact_mut(wu * 3).enumerate() {
        let y = &p.y[row * p.stride_y..][..wu];
        let u = &p.u[(row / 2) * p.stride_u..][..cw];
        let v = &p.v[(row / 2) * p.stride_v..][..cw];
        for (x, px) in out.chunks_exact_mut(3).enumerate() {
            px.copy_from_slice(&yuv_to_rgb(y[x], u[x / 2], v[x / 2]));
        }
    }
    RgbImage::from_raw(w, h, rgb).ok_or_else(|| Error::InvalidInput(format!("a {w}x{h} frame did not fit")))
}
