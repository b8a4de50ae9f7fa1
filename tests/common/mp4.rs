//! Small H.264 MP4 files for tests, made on the spot: OpenH264's encoder
//! (the `openh264` crate Kestrel decodes with) codes the frames, and the
//! minimal writer below puts them in an MP4 (ISO/IEC 14496-12: one video
//! track, one chunk, moov before mdat). Hand-written because the test needs
//! to write sample entries of other codecs too, and the `mp4` crate's writer
//! would add a dependency for some 150 lines; it is used by the unit tests
//! (src/multimodal/video/tests.rs, through `#[path]`) and the server tests.
#![allow(dead_code)]

use image::RgbImage;
use openh264::encoder::{Encoder, EncoderConfig, FrameRate, QpRange, RateControlMode};
use openh264::formats::{RgbSliceU8, YUVBuffer};
use openh264::OpenH264API;

/// `frames` (all one even size) coded as H.264 at `fps`, in an MP4.
pub fn h264_mp4(frames: &[RgbImage], fps: u32) -> Vec<u8> {
    let (w, h) = frames[0].dimensions();
    let config = EncoderConfig::new()
        .skip_frames(false)
        .rate_control_mode(RateControlMode::Off)
        .max_frame_rate(FrameRate::from_hz(fps as f32))
        .qp(QpRange::new(10, 20));
    let mut enc = Encoder::with_api_config(OpenH264API::from_source(), config).expect("an H.264 encoder");
    let (mut sps_pps, mut samples) = (Vec::new(), Vec::new());
    for f in frames {
        let yuv = YUVBuffer::from_rgb_source(RgbSliceU8::new(f.as_raw(), (w as usize, h as usize)));
        let bits = enc.encode(&yuv).expect("encoded");
        let mut sample = Vec::new();
        for l in 0..bits.num_layers() {
            let layer = bits.layer(l).expect("a layer");
            for n in 0..layer.nal_count() {
                let nal = strip_start_code(layer.nal_unit(n).expect("a NAL unit"));
                match nal[0] & 0x1f {
                    // SPS and PPS go to avcC (once), the rest into the sample.
                    7 | 8 => {
                        if sps_pps.len() < 2 {
                            sps_pps.push(nal.to_vec())
                        }
                    }
                    _ => {
                        sample.extend_from_slice(&(nal.len() as u32).to_be_bytes());
                        sample.extend_from_slice(nal);
                    }
                }
            }
        }
        assert!(!sample.is_empty(), "the encoder skipped a frame");
        samples.push(sample);
    }
    let sps = &sps_pps[0];
    let mut avcc = vec![1, sps[1], sps[2], sps[3], 0xff, 0xe1];
    avcc.extend_from_slice(&(sps.len() as u16).to_be_bytes());
    avcc.extend_from_slice(sps);
    avcc.push(1);
    avcc.extend_from_slice(&(sps_pps[1].len() as u16).to_be_bytes());
    avcc.extend_from_slice(&sps_pps[1]);
    let entry = visual_entry(*b"avc1", w as u16, h as u16, &bx(*b"avcC", &avcc));
    write(entry, w, h, fps, &samples)
}

/// An MP4 whose one video track has a `fourcc` sample entry (no codec
/// configuration) and `samples`: for files of codecs Kestrel refuses.
pub fn mp4_with_entry(fourcc: [u8; 4], w: u16, h: u16, samples: &[Vec<u8>]) -> Vec<u8> {
    write(visual_entry(fourcc, w, h, &[]), u32::from(w), u32::from(h), 30, samples)
}

fn strip_start_code(nal: &[u8]) -> &[u8] {
    let zeros = nal.iter().take_while(|b| **b == 0).count();
    if nal.get(zeros) == Some(&1) {
        &nal[zeros + 1..]
    } else {
        nal
    }
}

/// A box: size, type, payload.
fn bx(kind: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut b = ((payload.len() + 8) as u32).to_be_bytes().to_vec();
    b.extend_from_slice(&kind);
    b.extend_from_slice(payload);
    b
}

/// A full box: version 0 and `flags`, then the payload.
fn full(kind: [u8; 4], flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut p = (flags & 0xff_ffff).to_be_bytes().to_vec();
    p.extend_from_slice(payload);
    bx(kind, &p)
}

fn be(vals: &[u32]) -> Vec<u8> {
    vals.iter().flat_map(|v| v.to_be_bytes()).collect()
}

const MATRIX: [u32; 9] = [0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x4000_0000];

/// VisualSampleEntry (ISO/IEC 14496-12 §12.1.3) with `inner` boxes.
fn visual_entry(fourcc: [u8; 4], w: u16, h: u16, inner: &[u8]) -> Vec<u8> {
    let mut p = vec![0; 6];
    p.extend_from_slice(&1u16.to_be_bytes()); // data_reference_index
    p.extend_from_slice(&[0; 16]); // pre_defined, reserved
    p.extend_from_slice(&w.to_be_bytes());
    p.extend_from_slice(&h.to_be_bytes());
    p.extend_from_slice(&be(&[0x48_0000, 0x48_0000, 0])); // 72 dpi, reserved
    p.extend_from_slice(&1u16.to_be_bytes()); // frame_count
    p.extend_from_slice(&[0; 32]); // compressorname
    p.extend_from_slice(&[0, 0x18, 0xff, 0xff]); // depth 24, pre_defined -1
    p.extend_from_slice(inner);
    bx(fourcc, &p)
}

fn write(entry: Vec<u8>, w: u32, h: u32, fps: u32, samples: &[Vec<u8>]) -> Vec<u8> {
    let n = samples.len() as u32;
    let ftyp = bx(*b"ftyp", b"isom\0\0\x02\0isomiso2avc1mp41");
    let mvhd = {
        let mut p = be(&[0, 0, fps, n, 0x10000]);
        p.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // volume, reserved
        p.extend_from_slice(&be(&MATRIX));
        p.extend_from_slice(&be(&[0; 6]));
        p.extend_from_slice(&be(&[2])); // next_track_ID
        full(*b"mvhd", 0, &p)
    };
    let tkhd = {
        let mut p = be(&[0, 0, 1, 0, n, 0, 0, 0, 0]);
        p.extend_from_slice(&be(&MATRIX));
        p.extend_from_slice(&be(&[w << 16, h << 16]));
        full(*b"tkhd", 3, &p)
    };
    let mdhd = full(*b"mdhd", 0, &[be(&[0, 0, fps, n]), vec![0x55, 0xc4, 0, 0]].concat());
    let hdlr = full(*b"hdlr", 0, &[be(&[0]), b"vide".to_vec(), be(&[0, 0, 0]), b"VideoHandler\0".to_vec()].concat());
    let vmhd = full(*b"vmhd", 1, &[0; 8]);
    let dinf = bx(*b"dinf", &full(*b"dref", 0, &[be(&[1]), full(*b"url ", 1, &[])].concat()));
    let stsd = full(*b"stsd", 0, &[be(&[1]), entry].concat());
    let stts = full(*b"stts", 0, &be(&[1, n, 1]));
    let stsc = full(*b"stsc", 0, &be(&[1, 1, n, 1]));
    let sizes: Vec<u32> = samples.iter().map(|s| s.len() as u32).collect();
    let stsz = full(*b"stsz", 0, &[be(&[0, n]), be(&sizes)].concat());
    // The chunk offset depends on the moov's size, which this box is part
    // of: write it with 0, measure, then patch.
    let moov = |offset: u32| {
        let stco = full(*b"stco", 0, &be(&[1, offset]));
        let stbl = bx(*b"stbl", &[stsd.clone(), stts.clone(), stsc.clone(), stsz.clone(), stco].concat());
        let minf = bx(*b"minf", &[vmhd.clone(), dinf.clone(), stbl].concat());
        let mdia = bx(*b"mdia", &[mdhd.clone(), hdlr.clone(), minf].concat());
        let trak = bx(*b"trak", &[tkhd.clone(), mdia].concat());
        bx(*b"moov", &[mvhd.clone(), trak].concat())
    };
    let data_at = (ftyp.len() + moov(0).len() + 8) as u32;
    let mdat = bx(*b"mdat", &samples.concat());
    [ftyp, moov(data_at), mdat].concat()
}
