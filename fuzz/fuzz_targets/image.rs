//! Arbitrary bytes as an uploaded image: decoded with a pixel cap (JPEG,
//! PNG, WebP, GIF, BMP, as the server does), then resized, normalized and
//! patchified by the Qwen2-VL image processor. Errors must be the
//! client's (4xx); a decoded image must respect the cap; the pixel values
//! must fill the patch grid and be finite.
#![no_main]

use kestrel::model::qwen2_vl::processor::preprocess_image;
use kestrel::multimodal::image::decode_rgb8;
use kestrel_fuzz::{frontend, user_ok};
use libfuzzer_sys::fuzz_target;

/// Smaller than the server's cap (PIL's 89M pixels) so each run is quick;
/// the check that enforces it is the same.
const MAX_PIXELS: u64 = 1 << 18;

fuzz_target!(|data: &[u8]| {
    let Some(img) = user_ok(decode_rgb8(data, MAX_PIXELS), "decode") else { return };
    let (w, h) = img.dimensions();
    assert!(w >= 1 && h >= 1 && u64::from(w) * u64::from(h) <= MAX_PIXELS, "{w}x{h}");
    let cfg = &frontend().processors.image;
    let Some((values, grid)) = user_ok(preprocess_image(&img, cfg), "preprocess") else { return };
    let row = 3 * cfg.temporal_patch_size * cfg.patch_size * cfg.patch_size;
    assert_eq!(grid[0], 1);
    assert_eq!(values.len(), grid[1] * grid[2] * row, "grid {grid:?}");
    assert!(grid[1] % cfg.merge_size == 0 && grid[2] % cfg.merge_size == 0, "grid {grid:?}");
    // smart_resize scales up to min_pixels (its max_pixels bound gives way
    // to the one-patch floor on a long thin image, as HF's does).
    assert!(grid[1] * grid[2] * cfg.patch_size * cfg.patch_size >= cfg.min_pixels, "grid {grid:?}");
    assert!(values.iter().all(|v| v.is_finite()));
});
