#!/usr/bin/env python3
"""Golden preprocessing values for Qwen2-VL from Hugging Face transformers.

Writes tests/fixtures/preprocess/ (read by tests/preprocess.rs):

  *.png                  deterministic synthetic inputs (numpy; fixed seeds)
  golden.json            per case: inputs, processor settings, grid_thw, resized
                         size, whole-tensor statistics of pixel_values, which HF
                         class produced it, and the max difference between HF's
                         two image-processor backends when both are installed
  golden.safetensors     per case: `<case>.rows` (k, C*T*P*P) f32 rows of
                         pixel_values and `<case>.row_index` (k,) i64 saying
                         which rows (all of them for the small cases, a stride
                         for the big ones to keep fixtures small)

With --rope it also writes rope_golden.json: `get_rope_index` of a tiny random
`Qwen2VLModel` on a few token sequences (needs torch; the modeling code does
not depend on the weights).

Usage (from the repository root):
  pip install transformers pillow numpy safetensors torch torchvision
  python tools/dump_preprocess.py            # preprocessing goldens
  python tools/dump_preprocess.py --rope     # + rope_golden.json
  python tools/dump_preprocess.py --check    # recompute, compare with the
                                             # committed goldens, write nothing

The default class is whatever AutoImageProcessor picks for the published
Qwen2-VL preprocessor_config.json: in transformers 5.x that is the torchvision
backend `Qwen2VLImageProcessor` when torchvision is installed, else the
PIL/numpy backend `Qwen2VLImageProcessorPil`. The goldens record which.
"""

import argparse
import hashlib
import importlib.metadata
import inspect
import json
import os
import sys
import tempfile

import numpy as np
from PIL import Image

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "preprocess")

# The published Qwen2-VL-2B/7B-Instruct preprocessor_config.json.
QWEN2_VL_PREPROCESSOR_CONFIG = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2VLProcessor",
}

# Rows kept for the big cases: about this many, evenly strided, plus the last.
STRIDED_ROWS = 12

IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 151655, 151656, 151652, 151653


# ---------------------------------------------------------------- inputs


def gradients(w, h):
    """Smooth ramps in R and G, a ripple in B (whole-pixel periods, so PNG stays small):
    (h, w, 3) float."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 255.0 * x / max(w - 1, 1)
    g = 255.0 * y / max(h - 1, 1)
    b = 128.0 + 110.0 * np.sin(2 * np.pi * x / 24.0) * np.cos(2 * np.pi * y / 16.0)
    return np.stack([r, g, b], axis=-1)


def to_u8(a):
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def noisy(w, h, seed, sigma=40.0):
    """Gradients + Gaussian noise everywhere (small images only: noise does not compress)."""
    rng = np.random.default_rng(seed)
    return to_u8(gradients(w, h) + rng.normal(0.0, sigma, (h, w, 3)))


def structured(w, h, seed):
    """Gradients, a 0/255 checkerboard (cubic overshoot, clamping), thin lines, and a
    noisy block: what stresses a resampler, in a PNG that stays small."""
    rng = np.random.default_rng(seed)
    img = gradients(w, h)
    y, x = np.mgrid[0:h, 0:w]
    checker = ((x // 5 + y // 5) % 2) * 255.0
    region = (x < w // 3) & (y > h // 2)
    img[region] = checker[region][:, None]
    img[(x % 37 == 0) | (y % 29 == 0)] = [255.0, 0.0, 255.0]
    bh, bw = min(96, h // 3), min(96, w // 3)
    y0, x0 = h // 6, w // 2
    img[y0 : y0 + bh, x0 : x0 + bw] += rng.normal(0.0, 60.0, (bh, bw, 3))
    return to_u8(img)


def rgba(w, h, seed):
    rng = np.random.default_rng(seed)
    rgb = noisy(w, h, seed + 1)
    y, x = np.mgrid[0:h, 0:w]
    alpha = np.clip(255.0 * x / (w - 1) + rng.normal(0, 30, (h, w)), 0, 255)
    alpha[:, :4] = 0  # fully transparent columns
    alpha[:, -4:] = 255
    return np.concatenate([rgb, to_u8(alpha)[..., None]], axis=-1)


def make_inputs():
    """name -> PIL image; every one saved as <name>.png."""
    imgs = {
        "gradient_640x480": Image.fromarray(structured(640, 480, 1), "RGB"),
        "noise_100x37": Image.fromarray(noisy(100, 37, 2), "RGB"),
        "wide_1000x50": Image.fromarray(structured(1000, 50, 3), "RGB"),
        "tiny_20x20": Image.fromarray(noisy(20, 20, 4), "RGB"),
        "square_1024": Image.fromarray(structured(1024, 1024, 5), "RGB"),
        "alpha_64x48": Image.fromarray(rgba(64, 48, 6), "RGBA"),
    }
    for i in range(4):
        # Frames of one clip: the same scene drifting right.
        base = noisy(48 + 12, 36, 7 + i, sigma=25.0)
        imgs[f"video_f{i}"] = Image.fromarray(np.ascontiguousarray(base[:, 3 * i : 3 * i + 48]), "RGB")
    return imgs


# Cases: (name, kind, inputs, settings). Settings override the published config.
CASES = [
    ("gradient_640x480", "image", ["gradient_640x480"], {}),
    ("gradient_640x480_down", "image", ["gradient_640x480"], {"max_pixels": 28 * 28 * 64}),
    ("noise_100x37", "image", ["noise_100x37"], {}),
    ("wide_1000x50", "image", ["wide_1000x50"], {}),
    ("tiny_20x20", "image", ["tiny_20x20"], {}),
    ("square_1024", "image", ["square_1024"], {}),
    ("square_1024_classdefault", "image", ["square_1024"], {"max_pixels": 28 * 28 * 1280}),
    ("alpha_64x48", "image", ["alpha_64x48"], {}),
    ("video4", "video", [f"video_f{i}" for i in range(4)], {}),
    ("video3", "video", [f"video_f{i}" for i in range(3)], {}),
]
FULL = {"noise_100x37", "tiny_20x20", "alpha_64x48"}


# ---------------------------------------------------------------- HF


def versions():
    out = {}
    for pkg in ["transformers", "torch", "torchvision", "pillow", "numpy"]:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def default_image_processor(settings):
    """What AutoImageProcessor returns for a checkpoint with this preprocessor_config.json."""
    from transformers import AutoImageProcessor

    cfg = dict(QWEN2_VL_PREPROCESSOR_CONFIG, **settings)
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "preprocessor_config.json"), "w") as f:
            json.dump(cfg, f)
        return AutoImageProcessor.from_pretrained(d)


def explicit_image_processors(settings):
    """Both 5.x backends, where importable: {class name: instance}."""
    import transformers.models.qwen2_vl as q

    cfg = {k: v for k, v in dict(QWEN2_VL_PREPROCESSOR_CONFIG, **settings).items() if "_type" not in k and k != "processor_class"}
    out = {}
    for name in ["Qwen2VLImageProcessor", "Qwen2VLImageProcessorPil"]:
        cls = getattr(q, name, None)
        if cls is None:
            continue
        try:
            out[name] = cls(**cfg)
        except ImportError:
            pass  # torchvision backend without torchvision
    return out


def video_processor(settings):
    """Qwen2VLVideoProcessor with the published config's pixel bounds (HF's video
    processor falls back to preprocessor_config.json when a checkpoint has no
    video_preprocessor_config.json, as the Qwen2-VL ones do)."""
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    cfg = {k: v for k, v in dict(QWEN2_VL_PREPROCESSOR_CONFIG, **settings).items() if "_type" not in k and k != "processor_class"}
    return Qwen2VLVideoProcessor(**cfg)


def to_numpy(x):
    return x.numpy() if hasattr(x, "numpy") else np.asarray(x)


def composite_on_white(img):
    """transformers >= 5.2x `image_transforms.convert_to_rgb`: alpha composited onto opaque
    white (as qwen-vl-utils and vLLM also do). Older 5.x (5.17 included) and 4.x call plain
    `convert("RGB")`, which drops alpha; Kestrel follows the newer rule, so the dumper applies
    it itself and the golden does not depend on the installed version."""
    if "A" not in img.getbands() and img.info.get("transparency") is None:
        return img
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def run_image(proc, img):
    out = proc(images=[composite_on_white(img)], return_tensors="np")
    return to_numpy(out["pixel_values"]).astype(np.float32), [int(v) for v in to_numpy(out["image_grid_thw"])[0]]


def run_video(proc, frames):
    kwargs = {}
    if "cap_pixels_per_frame" in getattr(getattr(proc, "valid_kwargs", None), "__annotations__", {}):
        kwargs["cap_pixels_per_frame"] = False  # the pre-5.22 behaviour, no total-video budget
    arrays = [np.asarray(f.convert("RGB")) for f in frames]
    out = proc(videos=[arrays], return_tensors="np", **kwargs)
    return to_numpy(out["pixel_values_videos"]).astype(np.float32), [int(v) for v in to_numpy(out["video_grid_thw"])[0]]


def stats(pv):
    a = pv.astype(np.float64)
    return {
        "shape": list(pv.shape),
        "sum": float(a.sum()),
        "sum_sq": float((a * a).sum()),
        "min": float(a.min()),
        "max": float(a.max()),
        "sha256_f32": hashlib.sha256(np.ascontiguousarray(pv, dtype="<f4").tobytes()).hexdigest(),
    }


def row_selection(n_rows, full):
    if full:
        return np.arange(n_rows)
    step = max(1, n_rows // STRIDED_ROWS)
    rows = list(range(0, n_rows, step))
    if rows[-1] != n_rows - 1:
        rows.append(n_rows - 1)
    return np.array(rows)


def build(imgs):
    """Run every case; returns (golden.json dict, {tensor name: array})."""
    report = {"versions": versions(), "preprocessor_config": QWEN2_VL_PREPROCESSOR_CONFIG, "cases": {}}
    tensors = {}
    for name, kind, inputs, settings in CASES:
        case = {"kind": kind, "inputs": [f"{i}.png" for i in inputs], "settings": settings}
        if kind == "image":
            img = imgs[inputs[0]]
            proc = default_image_processor(settings)
            case["hf_class"] = type(proc).__name__
            pv, grid = run_image(proc, img)
            # Both backends, and how far apart they are.
            others = {}
            for cname, p in explicit_image_processors(settings).items():
                opv, ogrid = run_image(p, img)
                assert ogrid == grid, (cname, ogrid, grid)
                others[cname] = opv
            if len(others) == 2:
                a, b = others["Qwen2VLImageProcessor"], others["Qwen2VLImageProcessorPil"]
                d = np.abs(a.astype(np.float64) - b)
                case["backend_diff"] = {
                    "max_abs": float(d.max()),
                    "mean_abs": float(d.mean()),
                    "frac_values_differing": float((d > 1e-4).mean()),
                    "max_abs_below_1e-4": float(d[d <= 1e-4].max()) if (d <= 1e-4).any() else 0.0,
                }
        else:
            frames = [imgs[i] for i in inputs]
            proc = video_processor(settings)
            case["hf_class"] = type(proc).__name__
            pv, grid = run_video(proc, frames)
        case["grid_thw"] = grid
        case["resized_hw"] = [grid[1] * 14, grid[2] * 14]
        case["stats"] = stats(pv)
        rows = row_selection(pv.shape[0], name in FULL)
        case["rows_stored"] = "all" if name in FULL else len(rows)
        tensors[f"{name}.rows"] = np.ascontiguousarray(pv[rows])
        tensors[f"{name}.row_index"] = rows.astype(np.int64)
        report["cases"][name] = case
        print(f"{name:28s} {case['hf_class']:26s} grid {grid}  rows {len(rows)}/{pv.shape[0]}"
              + (f"  backends max|d| {case['backend_diff']['max_abs']:.6f}" if "backend_diff" in case else ""))
    return report, tensors


# ---------------------------------------------------------------- rope


def rope_sequences():
    """(name, input_ids, image_grid_thw, video_grid_thw), well formed the way the
    processor expands placeholders: <vs> <pad>*t*h*w/4 <ve>."""
    def block(token, grid):
        t, h, w = grid
        return [VISION_START] + [token] * (t * h * w // 4) + [VISION_END]

    text = lambda n, s=100: list(range(s, s + n))  # noqa: E731
    seqs = [("text_only", text(23), [], [])]
    g = [1, 34, 46]  # gradient_640x480
    seqs.append(("one_image", text(5) + block(IMAGE_TOKEN, g) + text(7, 200), [g], []))
    g1, g2 = [1, 4, 8], [1, 2, 2]
    seqs.append(("two_images_interleaved",
                 text(3) + block(IMAGE_TOKEN, g1) + text(4, 300) + block(IMAGE_TOKEN, g2) + text(2, 400),
                 [g1, g2], []))
    v = [2, 4, 6]  # video4
    seqs.append(("video", text(4) + block(VIDEO_TOKEN, v) + text(3, 500), [], [v]))
    # More temporal patches than merged rows/columns: pins how text resumes after a video.
    vl = [4, 2, 2]
    seqs.append(("long_video", text(2) + block(VIDEO_TOKEN, vl) + text(3, 600), [], [vl]))
    seqs.append(("image_and_video",
                 text(2) + block(VIDEO_TOKEN, v) + text(1, 700) + block(IMAGE_TOKEN, g1) + text(2, 800),
                 [g1], [v]))
    return seqs


def build_rope():
    import torch
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    config = Qwen2VLConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=151936,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, spatial_merge_size=2),
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
    )
    model = Qwen2VLModel(config).eval()
    accepts = inspect.signature(model.get_rope_index).parameters
    out = {"versions": versions(), "spatial_merge_size": 2, "image_token_id": IMAGE_TOKEN,
           "video_token_id": VIDEO_TOKEN, "vision_start_token_id": VISION_START, "cases": {}}
    for name, ids, img_g, vid_g in rope_sequences():
        input_ids = torch.tensor([ids])
        kwargs = dict(
            image_grid_thw=torch.tensor(img_g) if img_g else None,
            video_grid_thw=torch.tensor(vid_g) if vid_g else None,
            attention_mask=torch.ones_like(input_ids),
        )
        if "mm_token_type_ids" in accepts:
            tt = torch.zeros_like(input_ids)
            tt[input_ids == IMAGE_TOKEN] = 1
            tt[input_ids == VIDEO_TOKEN] = 2
            kwargs["mm_token_type_ids"] = tt
        with torch.no_grad():
            pos, delta = model.get_rope_index(input_ids, **kwargs)
        out["cases"][name] = {
            "input_ids": ids,
            "image_grid_thw": img_g,
            "video_grid_thw": vid_g,
            "positions": pos[:, 0, :].tolist(),  # [3][n]
            "delta": int(delta.reshape(-1)[0]),
        }
        print(f"rope {name:24s} n {len(ids):4d}  delta {out['cases'][name]['delta']}")
    return out


# ---------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--rope", action="store_true", help="also write rope_golden.json (needs torch)")
    ap.add_argument("--check", action="store_true", help="compare with the goldens in --out; write nothing")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    imgs = make_inputs()
    if args.check:
        # Use the committed PNGs, so a numpy RNG change cannot hide behind new inputs.
        imgs = {n: Image.open(os.path.join(args.out, f"{n}.png")) for n in imgs}
    else:
        for n, im in imgs.items():
            im.save(os.path.join(args.out, f"{n}.png"), optimize=True)
        imgs = {n: Image.open(os.path.join(args.out, f"{n}.png")) for n in imgs}

    report, tensors = build(imgs)
    rope = build_rope() if args.rope else None

    if args.check:
        from safetensors.numpy import load_file

        old = json.load(open(os.path.join(args.out, "golden.json")))
        old_t = load_file(os.path.join(args.out, "golden.safetensors"))
        worst = 0.0
        for name, case in report["cases"].items():
            o = old["cases"][name]
            same_grid = o["grid_thw"] == case["grid_thw"]
            d = float(np.abs(old_t[f"{name}.rows"].astype(np.float64) - tensors[f"{name}.rows"]).max()) if same_grid else float("inf")
            worst = max(worst, d)
            print(f"check {name:28s} {case['hf_class']:26s} vs committed ({o['hf_class']}): grid {'ok' if same_grid else 'DIFFERS'}, max|d| {d:.6g}")
        if rope is not None and os.path.exists(os.path.join(args.out, "rope_golden.json")):
            old_r = json.load(open(os.path.join(args.out, "rope_golden.json")))
            for name, c in rope["cases"].items():
                o = old_r["cases"].get(name)
                ok = o is not None and o["positions"] == c["positions"] and o["delta"] == c["delta"]
                print(f"check rope {name:24s} {'same' if ok else 'DIFFERS'}")
        print(f"versions here: {report['versions']}")
        return 0

    from safetensors.numpy import save_file

    save_file(tensors, os.path.join(args.out, "golden.safetensors"))
    with open(os.path.join(args.out, "golden.json"), "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    if rope is not None:
        with open(os.path.join(args.out, "rope_golden.json"), "w") as f:
            json.dump(rope, f)
            f.write("\n")
    total = sum(os.path.getsize(os.path.join(args.out, n)) for n in os.listdir(args.out))
    print(f"wrote {args.out} ({total / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
