//! Media: fetching it safely, decoding images and video files, precomputed
//! embeddings.

pub mod embeds;
pub mod fetch;
pub mod image;
pub mod video;

/// One media item of a prompt, in the order its placeholder appears, as the
/// request carried it (decoded, not yet preprocessed).
pub enum Media {
    Image(image::RgbImage),
    Video(Vec<image::RgbImage>),
    /// An image given as its features (vLLM's `image_embeds`): `values`
    /// holds (tokens, LM hidden) rows. `grid` is what the family needs to
    /// lay the tokens out: for Qwen2-VL the patch grid [t, h, w] that
    /// produced them (tokens = t·h·w / merge²), for a fixed-size encoder
    /// such as LLaVA's [1, side, side] in feature rows.
    ImageEmbeds {
        values: Vec<f32>,
        grid: [usize; 3],
    },
}
