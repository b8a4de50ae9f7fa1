//! The H.264 track of an MP4 file: its samples and its parameter sets.
//!
//! The container is parsed by Mozilla's `mp4parse` (Firefox's demuxer,
//! fuzzed as part of it); this file only picks the first video track, reads
//! its `avcC` (ISO/IEC 14496-15 §5.3.3.1, AVCDecoderConfigurationRecord) and
//! turns its length-prefixed NAL units into the Annex B byte stream that
//! OpenH264 takes (a `00 00 00 01` start code before each NAL unit).

use std::io::Cursor;
use std::ops::Range;

use mp4parse::unstable::{create_sample_table, CheckedInteger};
use mp4parse::{CodecType, SampleEntry, TrackType, VideoCodecSpecific};

use crate::error::{Error, Result};

/// Annex B start code.
const START_CODE: [u8; 4] = [0, 0, 0, 1];

/// The H.264 track of a file, as the decoder needs it.
#[derive(Debug)]
pub struct AvcTrack {
    /// Coded size from the sample entry (the decoder's frames may differ
    /// by cropping; each decoded frame is checked again).
    pub width: u32,
    pub height: u32,
    /// `avcC` profile_idc (66 Baseline, 77 Main, 100 High, ...).
    pub profile: u8,
    /// Bytes before each NAL unit giving its length: 1, 2 or 4.
    pub length_size: usize,
    /// SPS and PPS NAL units from `avcC`, in Annex B.
    pub param_sets: Vec<u8>,
    /// Byte range of each sample (one access unit) in the file, in decode order.
    pub samples: Vec<Range<usize>>,
    /// Frames per second: samples over the track's duration (what OpenCV's
    /// CAP_PROP_FPS gives for a constant-rate file); 0 when unknown.
    pub fps: f64,
}

fn bad(msg: impl std::fmt::Display) -> Error {
    Error::InvalidInput(format!("the video file {msg}"))
}

/// The first video track of `bytes` (a whole MP4 file), if it is H.264.
pub fn avc_track(bytes: &[u8]) -> Result<AvcTrack> {
    let ctx = mp4parse::read_mp4(&mut Cursor::new(bytes)).map_err(|e| match e {
        _ if !starts_like_mp4(bytes) => bad("is not an MP4 file (it does not begin with an MP4 box such as ftyp)"),
        _ if cut_short(bytes) => bad("is truncated (it ends inside a box); send the whole file"),
        mp4parse::Error::UnexpectedEOF | mp4parse::Error::Io(_) => bad("is truncated (it ends inside a box)"),
        mp4parse::Error::MoovMissing => bad("has no `moov` box: it is not an MP4 file, or it is cut short"),
        mp4parse::Error::OutOfMemory => bad("declares more data than can be held"),
        e => bad(format!("is not a valid MP4 file ({e:?})")),
    })?;
    let Some(track) = ctx.tracks.iter().find(|t| t.track_type == TrackType::Video) else {
        return Err(bad("has no video track"));
    };
    let entry = track.stsd.as_ref().and_then(|s| s.descriptions.first());
    let Some(SampleEntry::Video(entry)) = entry else {
        // mp4parse does not keep the codec it does not know (HEVC among them).
        return Err(unsupported(sample_entry_fourcc(bytes).map_or("an unknown codec's", fourcc_name)));
    };
    let avcc = match (&entry.codec_type, &entry.codec_specific) {
        (CodecType::H264, VideoCodecSpecific::AVCConfig(avcc)) => avcc,
        (CodecType::EncryptedVideo, _) => return Err(bad("is encrypted (DRM)")),
        (codec, _) => return Err(unsupported(codec_name(*codec))),
    };
    let (profile, length_size, param_sets) = parse_avcc(avcc)?;
    let table = create_sample_table(track, CheckedInteger(0)).ok_or_else(|| {
        if ctx.mvex.is_some() {
            bad("is a fragmented MP4 (moof boxes), which is not supported; remux it, e.g. `ffmpeg -i in -c copy out.mp4`")
        } else {
            bad("has an inconsistent sample table")
        }
    })?;
    if table.is_empty() {
        return Err(if ctx.mvex.is_some() {
            bad("is a fragmented MP4 (moof boxes), which is not supported; remux it, e.g. `ffmpeg -i in -c copy out.mp4`")
        } else {
            bad("has no frames")
        });
    }
    let mut samples = Vec::with_capacity(table.len());
    for (i, s) in table.iter().enumerate() {
        let (start, end) = (s.start_offset.0, s.end_offset.0);
        let range = usize::try_from(start).ok()..usize::try_from(end).ok();
        match range {
            Range { start: Some(a), end: Some(b) } if a < b && b <= bytes.len() => samples.push(a..b),
            _ => {
                return Err(bad(format!(
                    "is truncated or corrupt: frame {i} of {} lies at bytes {start}..{end}, past its end ({} bytes)",
                    table.len(),
                    bytes.len()
                )))
            }
        }
    }
    let seconds = match (track.duration, track.timescale) {
        (Some(d), Some(t)) if t.0 > 0 => d.0 as f64 / t.0 as f64,
        _ => 0.0,
    };
    let fps = if seconds > 0.0 { samples.len() as f64 / seconds } else { 0.0 };
    Ok(AvcTrack {
        width: u32::from(entry.width),
        height: u32::from(entry.height),
        profile,
        length_size,
        param_sets,
        samples,
        fps,
    })
}

/// Whether the first top-level box is one an MP4 or QuickTime file begins with.
fn starts_like_mp4(bytes: &[u8]) -> bool {
    const FIRST: [&[u8; 4]; 9] = [b"ftyp", b"styp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pdin", b"uuid"];
    bytes.get(4..8).is_some_and(|t| FIRST.iter().any(|f| f[..] == *t))
}

/// Whether the file's top-level boxes, which tile a whole file, run past
/// its end (a download or copy cut short).
fn cut_short(bytes: &[u8]) -> bool {
    let mut at = 0usize;
    while let Some(head) = bytes.get(at..at + 8) {
        let size = u64::from(u32::from_be_bytes([head[0], head[1], head[2], head[3]]));
        let size = match size {
            // To the end of the file.
            0 => return false,
            // A 64-bit size follows the type.
            1 => match bytes.get(at + 8..at + 16) {
                Some(b) => b.iter().fold(0u64, |n, x| (n << 8) | u64::from(*x)),
                None => return true,
            },
            s => s,
        };
        if size < 8 {
            return false;
        }
        match usize::try_from(size).ok().and_then(|s| at.checked_add(s)) {
            Some(end) if end <= bytes.len() => at = end,
            _ => return true,
        }
    }
    at < bytes.len()
}

fn unsupported(codec: &str) -> Error {
    bad(format!(
        "is {codec} video; only H.264 (avc1) is supported: re-encode it, e.g. \
         `ffmpeg -i in -c:v libx264 -pix_fmt yuv420p out.mp4`"
    ))
}

fn codec_name(c: CodecType) -> &'static str {
    match c {
        CodecType::MP4V => "MPEG-4 Part 2",
        CodecType::AV1 => "AV1",
        CodecType::VP9 => "VP9",
        CodecType::VP8 => "VP8",
        CodecType::H263 => "H.263",
        _ => "an unsupported codec's",
    }
}

/// The four-character code of the first sample entry in the file's first
/// `stsd` box, for naming a codec mp4parse does not know. A heuristic for
/// messages only: it scans for the box name.
fn sample_entry_fourcc(bytes: &[u8]) -> Option<[u8; 4]> {
    let at = bytes.windows(4).position(|w| w == b"stsd")?;
    // stsd: version+flags (4), entry_count (4), then the entry's size (4) and type.
    bytes.get(at + 16..at + 20)?.try_into().ok()
}

fn fourcc_name(code: [u8; 4]) -> &'static str {
    match &code {
        b"hvc1" | b"hev1" => "HEVC (H.265)",
        b"vp09" => "VP9",
        b"vp08" => "VP8",
        b"av01" => "AV1",
        b"mp4v" => "MPEG-4 Part 2",
        b"avc1" | b"avc3" => "H.264 with an unreadable configuration,",
        b"apch" | b"apcn" | b"apcs" | b"apco" | b"ap4h" => "ProRes",
        _ => "an unknown codec's",
    }
}

/// (profile_idc, NAL length size, SPS + PPS in Annex B) from an
/// AVCDecoderConfigurationRecord (ISO/IEC 14496-15 §5.3.3.1.2).
pub fn parse_avcc(rec: &[u8]) -> Result<(u8, usize, Vec<u8>)> {
    let short = || bad("has a truncated avcC (H.264 decoder configuration)");
    let head = rec.get(..6).ok_or_else(short)?;
    if head[0] != 1 {
        return Err(bad(format!("has an avcC of version {}, expected 1", head[0])));
    }
    let profile = head[1];
    // High 10, High 4:2:2, High 4:4:4 (and their intra forms): more than 8
    // bits or more chroma than 4:2:0, which OpenH264 does not decode.
    if matches!(profile, 110 | 122 | 244 | 44) {
        return Err(bad(format!(
            "is H.264 profile {profile} (10-bit or 4:2:2/4:4:4); only 8-bit 4:2:0 H.264 is supported"
        )));
    }
    let length_size = usize::from(head[4] & 3) + 1;
    if length_size == 3 {
        return Err(bad("has an avcC with a NAL length size of 3, which is not allowed"));
    }
    let mut at = 5;
    let mut out = Vec::new();
    for count_mask in [0x1f_u8, 0xff] {
        let count = rec.get(at).ok_or_else(short)? & count_mask;
        at += 1;
        for _ in 0..count {
            let len = rec.get(at..at + 2).ok_or_else(short)?;
            let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
            let nal = rec.get(at + 2..at + 2 + len).ok_or_else(short)?;
            out.extend_from_slice(&START_CODE);
            out.extend_from_slice(nal);
            at += 2 + len;
        }
    }
    Ok((profile, length_size, out))
}

/// One sample's NAL units (each after a `length_size`-byte big-endian
/// length) as Annex B, appended to `out`.
pub fn to_annex_b(sample: &[u8], length_size: usize, out: &mut Vec<u8>) -> Result<()> {
    let mut rest = sample;
    while !rest.is_empty() {
        let (len, tail) = match rest.split_at_checked(length_size) {
            Some((l, t)) => (l.iter().fold(0usize, |n, b| (n << 8) | usize::from(*b)), t),
            None => return Err(bad("has a frame whose NAL unit length is cut short")),
        };
        let nal = tail.get(..len).ok_or_else(|| bad("has a frame whose NAL unit runs past the frame's end"))?;
        out.extend_from_slice(&START_CODE);
        out.extend_from_slice(nal);
        rest = &tail[len..];
    }
    Ok(())
}
