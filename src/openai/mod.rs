//! The OpenAI-compatible API surface shared by the offline batch runner and
//! the server: request/response bodies (`protocol`) and turning a request's
//! media references into decoded media.

pub mod completions;
pub mod embeddings;
pub mod protocol;
pub mod stream;
pub mod tokenize;
pub mod tools;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rayon::prelude::*;

use crate::engine::{Frontend, Request};
use crate::error::{Error, Result};
use crate::multimodal::fetch::MediaFetcher;
use crate::multimodal::image::{decode_rgb8, DEFAULT_MAX_PIXELS};
use crate::multimodal::video::{decode_mp4, VideoLimits};
use crate::multimodal::Media;
use protocol::{resolve_max_tokens, ChatInput};

/// Reads a precomputed image-embeddings file into media items, in the
/// model family's layout (`Processor::parse_image_embeds`).
pub type EmbedsParser<'a> = &'a (dyn Fn(&[u8]) -> Result<Vec<Media>> + Sync);
pub use protocol::MediaRef;

/// Parses a request body. A body that is not JSON, or does not fit the
/// schema, is `InvalidInput` with serde's description and position; a value
/// of the wrong type or range also names its field (serde's message leaves
/// it out: "invalid value: integer `-1`, expected usize").
pub(crate) fn parse_body<T: serde::de::DeserializeOwned>(body: &str) -> Result<T> {
    serde_json::from_str(body).map_err(|e| {
        let field = match e.classify() {
            serde_json::error::Category::Data => field_before(body, e.line(), e.column()),
            _ => None,
        };
        let at = field.map(|f| format!(" (field `{f}`)")).unwrap_or_default();
        Error::InvalidInput(format!("invalid request body: {e}{at}"))
    })
}

/// The last object key before `line`:`column` (1-based) of `body`: the
/// field whose value a serde data error is about.
fn field_before(body: &str, line: usize, column: usize) -> Option<String> {
    let start: usize = body.split_inclusive('\n').take(line.saturating_sub(1)).map(str::len).sum();
    let end = body.len().min(start + column);
    let (mut in_string, mut escaped) = (false, false);
    let (mut string_start, mut last_string, mut key) = (0, None, None);
    for (i, c) in body.get(..end)?.char_indices() {
        if in_string {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => {
                    in_string = false;
                    last_string = Some(&body[string_start..i]);
                }
                _ => {}
            }
        } else if c == '"' {
            in_string = true;
            string_start = i + 1;
        } else if c == ':' {
            key = last_string;
        }
    }
    key.map(str::to_owned)
}

/// Time one request spent on its media, per stage, summed over items (items
/// run in parallel, so a stage's sum can exceed the wall time). The server's
/// /metrics histograms are fed from these.
#[derive(Debug, Default)]
pub struct MediaTimings {
    fetch_ns: AtomicU64,
    decode_ns: AtomicU64,
    preprocess_ns: AtomicU64,
}

impl MediaTimings {
    /// Runs `f`, adding its time to `stage`.
    fn time<T>(stage: &AtomicU64, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let out = f();
        stage.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        out
    }

    /// Fetching bytes (http, data: URL decoding, local files).
    pub fn fetch<T>(&self, f: impl FnOnce() -> T) -> T {
        Self::time(&self.fetch_ns, f)
    }

    /// Decoding images and parsing embeddings files.
    pub fn decode<T>(&self, f: impl FnOnce() -> T) -> T {
        Self::time(&self.decode_ns, f)
    }

    /// Rendering, resizing, normalizing, patchifying and tokenizing.
    pub fn preprocess<T>(&self, f: impl FnOnce() -> T) -> T {
        Self::time(&self.preprocess_ns, f)
    }

    /// (fetch, decode, preprocess) totals.
    pub fn totals(&self) -> (Duration, Duration, Duration) {
        let d = |a: &AtomicU64| Duration::from_nanos(a.load(Ordering::Relaxed));
        (d(&self.fetch_ns), d(&self.decode_ns), d(&self.preprocess_ns))
    }
}

/// Fetches and decodes a request's media, in order, items in parallel:
/// images and video frames are decoded to RGB8 (at most `max_pixels` each),
/// video files decoded and sampled as the fetcher's settings say
/// (`multimodal::video`), embeddings files read by `embeds` (one image per
/// file). Errors name the item.
pub fn load_media(
    refs: &[MediaRef],
    fetcher: &MediaFetcher,
    max_pixels: usize,
    embeds: EmbedsParser,
) -> Result<Vec<Media>> {
    load_media_timed(refs, fetcher, max_pixels, embeds, &MediaTimings::default())
}

/// A chat request ready for the engine: media fetched and decoded, prompt
/// rendered and tokenized, max_tokens resolved against the context.
pub fn prepare(frontend: &Frontend, fetcher: &MediaFetcher, input: &ChatInput) -> Result<Request> {
    prepare_timed(frontend, fetcher, input, &MediaTimings::default())
}

/// `prepare`, adding the time spent fetching, decoding and preprocessing to
/// `timings` (the server's metrics).
pub fn prepare_timed(
    frontend: &Frontend,
    fetcher: &MediaFetcher,
    input: &ChatInput,
    timings: &MediaTimings,
) -> Result<Request> {
    // A constraint that does not compile fails the request before its media is fetched.
    let grammar = input.constraint.as_ref().map(|c| frontend.grammars.compile(c)).transpose()?;
    let embeds = |b: &[u8]| frontend.processor.parse_image_embeds(b);
    let media = load_media_timed(&input.media, fetcher, DEFAULT_MAX_PIXELS as usize, &embeds, timings)?;
    let prepared = timings.preprocess(|| {
        frontend.prepare_prompt(input.render_for(&frontend.template, frontend.tools_template())?, &media)
    })?;
    let mut params = input.params.clone();
    params.grammar = grammar;
    params.max_tokens = resolve_max_tokens(input.max_tokens, prepared.input_ids.len(), frontend.max_model_len)?;
    params.validate()?;
    Ok(Request { input: prepared, params })
}

/// `load_media`, adding the time of each stage to `timings`.
pub fn load_media_timed(
    refs: &[MediaRef],
    fetcher: &MediaFetcher,
    max_pixels: usize,
    embeds: EmbedsParser,
    timings: &MediaTimings,
) -> Result<Vec<Media>> {
    let max_pixels = max_pixels as u64;
    let image = |url: &str| {
        let bytes = timings.fetch(|| fetcher.fetch(url))?;
        timings.decode(|| decode_rgb8(&bytes, max_pixels))
    };
    refs.par_iter()
        .enumerate()
        .map(|(i, r)| {
            let item = match r {
                MediaRef::Image(url) => image(url).map(Media::Image),
                MediaRef::Video(frames) => frames
                    .par_iter()
                    .enumerate()
                    .map(|(f, url)| image(url).map_err(|e| in_item(&format!("frame {f}"), e)))
                    .collect::<Result<Vec<_>>>()
                    .map(Media::Video),
                MediaRef::VideoFile(url) => {
                    let bytes = timings.fetch(|| fetcher.fetch_video(url))?;
                    let s = fetcher.settings();
                    let limits = VideoLimits {
                        max_frame_pixels: s.video_limits.max_frame_pixels.min(max_pixels),
                        ..s.video_limits
                    };
                    timings.decode(|| decode_mp4(&bytes, s.video_sampling, &limits)).map(|v| Media::Video(v.frames))
                }
                MediaRef::ImageEmbeds(url) => {
                    let bytes = timings.fetch(|| fetcher.fetch(url))?;
                    let mut items = timings.decode(|| embeds(&bytes))?;
                    match items.len() {
                        1 => Ok(items.remove(0)),
                        n => Err(Error::InvalidInput(format!(
                            "the image_embeds file holds {n} images; an image_embeds content part carries \
                             exactly one (send one part per image)"
                        ))),
                    }
                }
            };
            item.map_err(|e| in_item(&format!("media item {i} ({})", kind(r)), e))
        })
        .collect()
}

fn kind(r: &MediaRef) -> &'static str {
    match r {
        MediaRef::Image(_) => "image",
        MediaRef::Video(_) => "video",
        MediaRef::VideoFile(_) => "video_url",
        MediaRef::ImageEmbeds(_) => "image_embeds",
    }
}

/// `e` with "`what`: " in front, if it is the user's error or a failed fetch.
fn in_item(what: &str, e: Error) -> Error {
    match e {
        Error::InvalidInput(m) => Error::InvalidInput(format!("{what}: {m}")),
        Error::MediaFetch(m) => Error::MediaFetch(format!("{what}: {m}")),
        e => e,
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use base64::Engine as _;
    use image::{DynamicImage, ImageFormat, RgbImage};

    use super::*;
    use crate::multimodal::embeds::parse_image_embeds;
    use crate::multimodal::fetch::FetchSettings;

    /// Embeddings in the grid layout (merge, hidden).
    fn grid_embeds(merge: usize, hidden: usize) -> impl Fn(&[u8]) -> Result<Vec<Media>> + Sync {
        move |b: &[u8]| parse_image_embeds(b, merge, hidden)
    }

    fn png_url(w: u32, h: u32, seed: u8) -> String {
        let img = RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8 ^ seed, y as u8, seed]));
        let mut out = Cursor::new(Vec::new());
        DynamicImage::ImageRgb8(img).write_to(&mut out, ImageFormat::Png).unwrap();
        format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(out.into_inner()))
    }

    #[test]
    fn body_errors_name_the_field_and_position() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)] // only parsed
        struct Body {
            url: String,
            max_tokens: Option<usize>,
            inner: Option<Inner>,
        }
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Inner {
            n: u32,
        }
        let e = |b: &str| parse_body::<Body>(b).unwrap_err().to_string();
        let msg = e("{\"url\": \"http://a:b/\\\"q:\", \"max_tokens\": -1}");
        assert!(
            msg.contains("integer `-1`") && msg.contains("at line 1 column") && msg.ends_with("(field `max_tokens`)"),
            "{msg}"
        );
        let msg = e("{\"url\": \"u\",\n \"inner\": {\"n\": \"x:y\"}}");
        assert!(msg.contains("line 2") && msg.ends_with("(field `n`)"), "{msg}");
        // Syntax errors have a position and no field.
        let msg = e("{\"url\": }");
        assert!(msg.contains("line 1 column 9") && !msg.contains("field"), "{msg}");
    }

    fn embeds_url(images: usize) -> String {
        use safetensors::{tensor::TensorView, Dtype};
        let vals: Vec<u8> = (0..images * 2 * 3).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let grid: Vec<u8> = (0..images).flat_map(|_| [1i64, 2, 4]).flat_map(|v| v.to_le_bytes()).collect();
        let file = safetensors::serialize(
            [
                ("image_embeds", TensorView::new(Dtype::F32, vec![images * 2, 3], &vals).unwrap()),
                ("image_grid_thw", TensorView::new(Dtype::I64, vec![images, 3], &grid).unwrap()),
            ],
            None,
        )
        .unwrap();
        format!("data:application/octet-stream;base64,{}", base64::engine::general_purpose::STANDARD.encode(file))
    }

    #[test]
    fn loads_images_videos_and_embeds_in_order() {
        let f = MediaFetcher::new(FetchSettings::default()).unwrap();
        let refs = vec![
            MediaRef::Image(png_url(5, 3, 1)),
            MediaRef::ImageEmbeds(embeds_url(1)),
            MediaRef::Video(vec![png_url(4, 4, 2), png_url(4, 4, 3)]),
        ];
        let media = load_media(&refs, &f, 1000, &grid_embeds(2, 3)).unwrap();
        assert!(matches!(&media[0], Media::Image(i) if i.dimensions() == (5, 3)));
        assert!(matches!(&media[1], Media::ImageEmbeds { grid: [1, 2, 4], values } if values.len() == 6));
        match &media[2] {
            Media::Video(frames) => assert_eq!(frames[1].get_pixel(0, 0).0, [3, 0, 3]),
            _ => panic!("expected a video"),
        }
    }

    /// load_media's error for `refs` (hidden size `hidden`), which must be InvalidInput.
    fn load_err(refs: &[MediaRef], hidden: usize) -> String {
        let f = MediaFetcher::new(FetchSettings::default()).unwrap();
        match load_media(refs, &f, 100, &grid_embeds(2, hidden)) {
            Err(e @ Error::InvalidInput(_)) => e.to_string(),
            Err(e) => panic!("expected InvalidInput, got {e}"),
            Ok(m) => panic!("expected an error, got {} items", m.len()),
        }
    }

    #[test]
    fn errors_name_the_item() {
        let e = load_err(&[MediaRef::Image(png_url(2, 2, 0)), MediaRef::Image("data:image/png;base64,!!".into())], 3);
        assert!(e.starts_with("media item 1 (image): data URL") && e.contains("invalid base64"), "{e}");
        let e = load_err(&[MediaRef::Video(vec![png_url(2, 2, 0), png_url(20, 20, 0)])], 3);
        assert!(e.starts_with("media item 0 (video): frame 1: the image is 20x20"), "{e}");
        let e = load_err(&[MediaRef::ImageEmbeds(embeds_url(2))], 3);
        assert!(e.contains("holds 2 images"), "{e}");
        let e = load_err(&[MediaRef::ImageEmbeds(embeds_url(1))], 7);
        assert!(e.contains("hidden size is 7"), "{e}");
    }
}
