//! Video files (`{"type": "video_url"}`): an H.264 MP4 decoded to frames,
//! sampled as vLLM samples them.
//!
//! Mirrors vLLM's `OpenCVVideoBackend.load_bytes` (vllm/multimodal/video.py)
//! with `VideoMediaIO`'s default of 32 frames (vllm/multimodal/media/
//! video.py): of the file's `total` frames, `n = min(num_frames, total)`,
//! further capped at `floor(duration · fps)` when an `fps` is set, at least
//! one; all frames when `n == total`, else the indices
//! `np.linspace(0, total - 1, n, dtype=int)` (`sample_indices`). Frames that
//! fail to decode are skipped with the rest kept, as vLLM's `_read_frames` does.
//!
//! Where it differs from vLLM's OpenCV/FFmpeg: only H.264 in MP4 (OpenH264
//! decodes, `mp4parse` demuxes; anything else is a 400 saying so), and colour
//! conversion is always BT.601 limited range with each chroma sample
//! repeated over its 2×2 pixels, which is what FFmpeg's swscale does for
//! OpenCV's BGR24 output when the stream is not full range; a full-range
//! (`yuvj420p`) stream comes out slightly flatter here (see `h264`).
//!
//! Decoding runs where the request's media is loaded (the HTTP worker's
//! rayon tasks), never on the engine thread, under the limits of
//! `VideoLimits`.

pub mod h264;
pub mod mp4;

use image::RgbImage;

use crate::error::{Error, Result};

/// vLLM `VideoMediaIO`'s default `num_frames`.
pub const DEFAULT_NUM_FRAMES: i64 = 32;

/// How frames are picked from a video file: vLLM's `--media-io-kwargs
/// '{"video": {"num_frames": N, "fps": F}}'`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VideoSampling {
    /// Most frames kept, spread evenly; -1 keeps every frame.
    pub num_frames: i64,
    /// Most frames kept per second of video; -1 (vLLM's default) for no cap.
    pub fps: f64,
}

impl Default for VideoSampling {
    fn default() -> Self {
        VideoSampling { num_frames: DEFAULT_NUM_FRAMES, fps: -1.0 }
    }
}

/// Bounds on the work and memory one video file may take. A file over one
/// is refused (400) before the decoding it would cost.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VideoLimits {
    /// Most pixels in one frame: 4096×2304, OpenH264's largest (level 5.2,
    /// 36,864 macroblocks).
    pub max_frame_pixels: u64,
    /// Most frames in the file (all are decoded up to the last one sampled,
    /// which is the last frame): 10 minutes at 30 frames per second.
    pub max_frames: usize,
    /// Most pixels decoded in all, frames × pixels per frame: a minute of
    /// 1080p at 30 frames per second (OpenH264 decodes roughly 100-300
    /// such frames a second on one core).
    pub max_decoded_pixels: u64,
    /// Most pixels in the frames kept, which are held as RGB until the
    /// request is preprocessed: 2^28 (768 MiB of RGB), e.g. 32 frames of 4K.
    pub max_kept_pixels: u64,
}

impl Default for VideoLimits {
    fn default() -> Self {
        VideoLimits {
            max_frame_pixels: 4096 * 2304,
            max_frames: 18_000,
            max_decoded_pixels: 1920 * 1080 * 1800,
            max_kept_pixels: 1 << 28,
        }
    }
}

/// A decoded video: the sampled frames and where they came from (the
/// fields of the metadata vLLM's loader returns).
#[derive(Debug)]
pub struct Video {
    /// The kept frames, in order, RGB8.
    pub frames: Vec<RgbImage>,
    /// Index in the file of each kept frame (`frames_indices`).
    pub indices: Vec<usize>,
    /// Frames in the file (`total_num_frames`).
    pub total_frames: usize,
    /// The file's frame rate (`fps`); 0 when it does not say.
    pub fps: f64,
}

/// vLLM's frame indices for a file of `total` frames at `source_fps`
/// (`OpenCVVideoBackend.load_bytes`), `total` > 0.
pub fn sample_indices(total: usize, sampling: VideoSampling, source_fps: f64) -> Vec<usize> {
    let duration = if source_fps > 0.0 { total as f64 / source_fps } else { 0.0 };
    let mut n = total;
    if sampling.num_frames > 0 {
        n = n.min(usize::try_from(sampling.num_frames).unwrap_or(usize::MAX));
    }
    if sampling.fps > 0.0 {
        // `math.floor(duration * fps)`; a float past usize saturates.
        n = n.min((duration * sampling.fps).floor() as usize);
    }
    let n = n.max(1);
    if n == total {
        return (0..total).collect();
    }
    linspace_floor(total - 1, n)
}

/// `np.linspace(0, stop, num, dtype=int)`: `floor(i · (stop / (num - 1)))`
/// in f64 for i < num - 1, then `stop` itself; `[0]` when num is 1.
fn linspace_floor(stop: usize, num: usize) -> Vec<usize> {
    if num == 1 {
        return vec![0];
    }
    let step = stop as f64 / (num - 1) as f64;
    let mut out: Vec<usize> = (0..num - 1).map(|i| (i as f64 * step).floor() as usize).collect();
    out.push(stop);
    out
}

/// Decodes an MP4 file's H.264 track into the frames `sampling` picks,
/// within `limits`. Everything wrong with the file is `InvalidInput`.
pub fn decode_mp4(bytes: &[u8], sampling: VideoSampling, limits: &VideoLimits) -> Result<Video> {
    // mp4parse and the decoder wrapper are Rust over untrusted bytes: a panic
    // in either is a bug of theirs, answered as a bad file, not a dead worker.
    let run = || -> Result<Video> {
        let track = mp4::avc_track(bytes)?;
        let total = track.samples.len();
        let pixels = u64::from(track.width) * u64::from(track.height);
        check_frame_size(track.width, track.height, limits)?;
        if total > limits.max_frames {
            return Err(too_long(format!("{total} frames, more than the {} allowed", limits.max_frames)));
        }
        let indices = sample_indices(total, sampling, track.fps);
        let last = indices.last().copied().unwrap_or(0);
        let decoded = pixels.saturating_mul(last as u64 + 1);
        if decoded > limits.max_decoded_pixels {
            return Err(too_long(format!(
                "{} frames of {}x{} to decode, more than the {} pixels allowed",
                last + 1,
                track.width,
                track.height,
                limits.max_decoded_pixels
            )));
        }
        let kept = pixels.saturating_mul(indices.len() as u64);
        if kept > limits.max_kept_pixels {
            return Err(too_long(format!(
                "{} frames of {}x{} to keep, more than the {} pixels allowed; sample fewer \
                 (--media-io-kwargs '{{\"video\": {{\"num_frames\": N}}}}')",
                indices.len(),
                track.width,
                track.height,
                limits.max_kept_pixels
            )));
        }
        let (frames, kept_indices) = h264::decode(bytes, &track, &indices, limits)?;
        Ok(Video { frames, indices: kept_indices, total_frames: total, fps: track.fps })
    };
    std::panic::catch_unwind(run).unwrap_or_else(|_| {
        Err(Error::InvalidInput("the video file could not be read (its demuxer or decoder failed on it)".into()))
    })
}

/// Refuses a frame size the limits do not allow (also checked on each
/// decoded frame, whose size the stream may change).
pub(crate) fn check_frame_size(w: u32, h: u32, limits: &VideoLimits) -> Result<()> {
    let pixels = u64::from(w) * u64::from(h);
    if pixels > limits.max_frame_pixels {
        return Err(Error::InvalidInput(format!(
            "the video is {w}x{h}: {pixels} pixels a frame, more than the {} allowed",
            limits.max_frame_pixels
        )));
    }
    crate::multimodal::image::check_size(w, h, limits.max_frame_pixels)
        .map_err(|e| Error::InvalidInput(e.to_string().replace("the image is", "the video is")))
}

fn too_long(what: String) -> Error {
    Error::InvalidInput(format!(
        "the video file has {what}; send a shorter or smaller clip, or its frames as \
         {{\"type\": \"video\", \"video\": [url, ...]}}"
    ))
}

#[cfg(test)]
mod tests;
