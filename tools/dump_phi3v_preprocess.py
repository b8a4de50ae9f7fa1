#!/usr/bin/env python3
"""Golden values for Phi-3.5-vision's image preprocessing from its original code.

Runs the original `image_processing_phi3_v.py` (Phi3VImageProcessor, the "HD
transform"; TIGER-AI-Lab/VLM2Vec at c76a1d4e, src/vlm_backbone/phi3_v/) and
Pillow's `Image.resize`, and writes tests/fixtures/phi3v-preprocess/ (read by
src/model/phi3v/hd_tests.rs):

  <stem>.png          deterministic synthetic inputs (numpy; fixed seeds)
  cases.json          versions; per case: input, num_crops, image_size,
                      num_img_tokens (both of the original's ways), views;
                      the size sweep; the Pillow resize cases
  golden.safetensors  per case `<case>.`:
                        hd_row_fnv    (H,) u64  FNV-1a 64 of each row of the
                                      padded uint8 HD image (H, W, 3) that
                                      HD_transform returns (exact, and small)
                        view_sum      (V, 3) f64  sum of pixel_values per view
                                      and channel (V = 1 + crops, the zero
                                      padding to num_crops + 1 left out)
                        sample_index  (K,) i32  flat indices into
                        sample_value  (K,) f32  pixel_values[:V]: random ones
                                      in the global view and in the crops
                      `<case>.global` (3, 336, 336) f32 for one case;
                      `pil.<src>` (h, w, 3) u8 sources and `pil.<i>.out`
                      (oh, ow, 3) u8 outputs of PIL's resize

The size sweep holds, for many (w, h, num_crops) including extreme aspect
ratios, `calc_hd_transform_size` and `calc_num_image_tokens_from_image_size`,
and for a subset the size HD_transform actually gives (checked equal here;
`pixel` is -1 where HD_transform fails: the image is too elongated for a
non-empty resize).

The original file is copied at run time into .cache/phi3v_orig/ (git-ignored)
from a VLM2Vec checkout (--vlm2vec, default the mirror path below) or, failing
that, downloaded from GitHub; its SHA-256 is checked. Only this script's own
code is in the repository.

Usage (from the repository root; torch, torchvision, Pillow, numpy,
safetensors, transformers; the reference run used the versions cases.json
records):
  .cache/hf-venv/bin/python tools/dump_phi3v_preprocess.py           # write
  .cache/hf-venv/bin/python tools/dump_phi3v_preprocess.py --check   # compare
"""

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import urllib.request

import numpy as np
import torch
from PIL import Image
from safetensors.numpy import load_file, save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "phi3v-preprocess")
ORIG_DIR = os.path.join(ROOT, ".cache", "phi3v_orig")
ORIG_COMMIT = "c76a1d4e"
ORIG_PATH = "src/vlm_backbone/phi3_v/image_processing_phi3_v.py"
ORIG_SHA256 = "30c812e67b6b17aeb98ae4b894b35f826f1ca3e5f1aa04bdfbec18d96cd0655f"
DEFAULT_VLM2VEC = "/work/.mirror/TIGER-AI-Lab+VLM2Vec/repo"

IMAGES = [(500, 375), (200, 640), (336, 336), (64, 900), (1000, 40), (640, 480)]
NUM_CROPS = [1, 4, 16]
SAMPLES = 2048  # per case, in the global view and again in the crops
FULL_GLOBAL_CASE = "img_500x375_n4"
CROP = 336


# ---------------------------------------------------------------- original


def load_original(vlm2vec):
    """Imports the original processor module from .cache/phi3v_orig/."""
    os.makedirs(ORIG_DIR, exist_ok=True)
    path = os.path.join(ORIG_DIR, "image_processing_phi3_v.py")
    if not os.path.exists(path):
        try:
            src = subprocess.run(
                ["git", "-C", vlm2vec, "show", f"{ORIG_COMMIT}:{ORIG_PATH}"],
                check=True,
                capture_output=True,
            ).stdout
        except (OSError, subprocess.CalledProcessError):
            url = f"https://raw.githubusercontent.com/TIGER-AI-Lab/VLM2Vec/{ORIG_COMMIT}/{ORIG_PATH}"
            src = urllib.request.urlopen(url, timeout=60).read()
        with open(path, "wb") as f:
            f.write(src)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != ORIG_SHA256:
        sys.exit(f"{path}: SHA-256 {digest}, expected {ORIG_SHA256}; delete it to fetch it again")
    spec = importlib.util.spec_from_file_location("image_processing_phi3_v", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError:
        # A transformers without these names: the processor needs only the
        # trivial ones, so stand them in and load again.
        stub_transformers()
        spec.loader.exec_module(module)
    return module


def stub_transformers():
    import types

    class BaseImageProcessor:
        def __init__(self, **kwargs):
            pass

    class BatchFeature(dict):
        def __init__(self, data=None, tensor_type=None):
            super().__init__(data or {})

    def make_list_of_images(images):
        return images if isinstance(images, list) else [images]

    names = {
        "transformers": {"AutoImageProcessor": types.SimpleNamespace(register=lambda *a, **k: None)},
        "transformers.image_processing_utils": {"BaseImageProcessor": BaseImageProcessor, "BatchFeature": BatchFeature},
        "transformers.image_transforms": {"convert_to_rgb": lambda im: im.convert("RGB")},
        "transformers.image_utils": {
            "OPENAI_CLIP_MEAN": [0.48145466, 0.4578275, 0.40821073],
            "OPENAI_CLIP_STD": [0.26862954, 0.26130258, 0.27577711],
            "ImageInput": object,
            "make_list_of_images": make_list_of_images,
            "valid_images": lambda images: True,
        },
        "transformers.utils": {
            "TensorType": object,
            "is_vision_available": lambda: True,
            "logging": types.SimpleNamespace(get_logger=lambda name: None),
        },
    }
    for name, attrs in names.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module


# ---------------------------------------------------------------- inputs


def make_image(w, h, seed):
    """Ramps and a ripple, hard-edged rectangles, a noisy patch: (h, w, 3) u8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 255.0 * x / max(w - 1, 1)
    g = 255.0 * y / max(h - 1, 1)
    b = 128.0 + 100.0 * np.sin(2 * np.pi * x / max(w / 3.7, 1)) * np.cos(2 * np.pi * y / max(h / 2.3, 1))
    a = np.stack([r, g, b], axis=-1)
    for _ in range(6):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        a[y0 : y0 + rng.integers(1, max(h // 3, 2)), x0 : x0 + rng.integers(1, max(w // 3, 2))] = rng.integers(
            0, 256, 3
        )
    py, px = rng.integers(0, max(h - h // 4, 1)), rng.integers(0, max(w - w // 4, 1))
    patch = a[py : py + max(h // 4, 1), px : px + max(w // 4, 1)]
    patch += rng.integers(-60, 61, patch.shape)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def fnv1a_rows(a):
    """FNV-1a 64 of each row of a (H, W, 3) uint8 array, vectorised over rows."""
    rows = a.reshape(a.shape[0], -1).astype(np.uint64)
    h = np.full(a.shape[0], 0xCBF29CE484222325, dtype=np.uint64)
    prime = np.uint64(0x100000001B3)
    for col in rows.T:
        h = (h ^ col) * prime  # wraps mod 2^64
    return h


# ---------------------------------------------------------------- cases


def hd_cases(orig, tensors, cases, write):
    for w, h in IMAGES:
        stem = f"img_{w}x{h}"
        a = make_image(w, h, seed=w * 7919 + h)
        png = os.path.join(OUT, f"{stem}.png")
        if write:
            Image.fromarray(a).save(png, optimize=True)
        img = Image.open(png)  # what the Rust side decodes
        img.load()
        assert np.array_equal(np.asarray(img), a), png
        for n in NUM_CROPS:
            name = f"{stem}_n{n}"
            proc = orig.Phi3VImageProcessor(num_crops=n)
            out = proc.preprocess([img], return_tensors="pt")
            pv = out["pixel_values"][0]  # (n + 1, 3, 336, 336)
            size = [int(v) for v in out["image_sizes"][0]]
            views = 1 + (size[0] // CROP) * (size[1] // CROP)
            assert pv.shape[0] == n + 1 and not pv[views:].any(), name
            pv = pv[:views].numpy()
            hd = np.asarray(orig.HD_transform(img.convert("RGB"), hd_num=n))
            assert list(hd.shape[:2]) == size, (name, hd.shape, size)

            rng = np.random.default_rng(n * 1000 + w + h)
            plane = 3 * CROP * CROP
            index = np.concatenate(
                [
                    [0, plane - 1, plane, pv.size - 1],
                    rng.integers(0, plane, SAMPLES),
                    rng.integers(plane, pv.size, SAMPLES),  # views >= 2
                ]
            ).astype(np.int64)
            flat = pv.reshape(-1)
            tensors[f"{name}.hd_row_fnv"] = fnv1a_rows(hd)
            tensors[f"{name}.view_sum"] = pv.astype(np.float64).sum(axis=(2, 3))
            tensors[f"{name}.sample_index"] = index.astype(np.int32)
            tensors[f"{name}.sample_value"] = flat[index].astype(np.float32)
            if name == FULL_GLOBAL_CASE:
                tensors[f"{name}.global"] = np.ascontiguousarray(pv[0])
            cases.append(
                {
                    "name": name,
                    "image": f"{stem}.png",
                    "width": w,
                    "height": h,
                    "num_crops": n,
                    "image_size": size,
                    "views": views,
                    "num_img_tokens": int(out["num_img_tokens"][0]),
                    "calc_num_image_tokens": proc.calc_num_image_tokens([img])[0],
                    "calc_num_image_tokens_from_image_size": proc.calc_num_image_tokens_from_image_size(w, h),
                }
            )


def size_sweep(orig):
    """[w, h, num_crops, padded_h, padded_w, tokens, pixel] rows; pixel is 1
    where HD_transform ran and agreed, -1 where it failed, 0 where not run."""
    rng = np.random.default_rng(3)
    sizes = [(1, 1), (2, 1), (1, 2), (2000, 30), (30, 2000), (336, 336), (337, 336), (336, 337), (672, 671)]
    sizes += [(1000, 1), (1, 1000), (4000, 20), (20, 4000), (10000, 50), (50, 10000), (1344, 1008), (1008, 1344)]
    sizes += [(3, 1000), (1000, 3), (401, 2), (2, 401), (1024, 768), (768, 1024), (1920, 1080), (1080, 1920)]
    pixel_sizes = set(sizes)
    for _ in range(200):
        sizes.append((int(rng.integers(1, 3000)), int(rng.integers(1, 3000))))
    for _ in range(50):
        short, ratio = int(rng.integers(2, 200)), float(rng.uniform(1, 120))
        long = int(short * ratio)
        sizes.append((long, short) if rng.integers(0, 2) else (short, long))
    pixel_sizes |= set(sizes[-30:])
    rows = []
    for w, h in sizes:
        for n in NUM_CROPS:
            pw, ph = orig.calc_hd_transform_size(w, h, hd_num=n)
            tokens = orig.Phi3VImageProcessor(num_crops=n).calc_num_image_tokens_from_image_size(w, h)
            pixel = 0
            if (w, h) in pixel_sizes:
                img = Image.fromarray(make_image(w, h, seed=w + h))
                try:
                    hd = orig.HD_transform(img, hd_num=n)
                    assert hd.size == (pw, ph), (w, h, n, hd.size, (pw, ph))
                    pixel = 1
                except ValueError:  # PIL: height and width must be > 0
                    pixel = -1
            rows.append([w, h, n, int(ph), int(pw), int(tokens), pixel])
    return rows


PIL_SOURCES = {"noise_37x23": (37, 23), "edges_61x97": (61, 97)}
# (source, out_w, out_h, filter): each axis up, down and unchanged, and the
# height shrinking while the width grows (Pillow 13 resizes vertically first).
PIL_CASES = [
    ("noise_37x23", 58, 11, "bilinear"),
    ("noise_37x23", 58, 11, "bicubic"),
    ("noise_37x23", 13, 50, "bilinear"),
    ("noise_37x23", 120, 80, "bicubic"),
    ("noise_37x23", 9, 7, "bicubic"),
    ("noise_37x23", 37, 5, "bilinear"),
    ("noise_37x23", 100, 23, "bicubic"),
    ("edges_61x97", 200, 150, "bilinear"),
    ("edges_61x97", 20, 31, "bilinear"),
    ("edges_61x97", 64, 40, "bicubic"),
    ("edges_61x97", 61, 300, "bilinear"),
]


def pil_resize_cases(tensors):
    rng = np.random.default_rng(17)
    srcs = {
        "noise_37x23": rng.integers(0, 256, (23, 37, 3)).astype(np.uint8),
        "edges_61x97": make_image(61, 97, seed=5),
    }
    for name, a in srcs.items():
        tensors[f"pil.{name}"] = a
    out = []
    for i, (src, ow, oh, filt) in enumerate(PIL_CASES):
        a = srcs[src]
        mode = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}[filt]
        got = np.asarray(Image.fromarray(a).resize((ow, oh), mode))
        tensors[f"pil.{i}.out"] = np.ascontiguousarray(got)
        # For the record: how far torch's antialiased uint8 resize is from it.
        t = torch.from_numpy(a).permute(2, 0, 1)[None]
        tt = torch.nn.functional.interpolate(t, size=(oh, ow), mode=filt, antialias=True)[0].permute(1, 2, 0).numpy()
        diff = np.abs(tt.astype(int) - got.astype(int))
        out.append(
            {
                "source": src,
                "width": ow,
                "height": oh,
                "filter": filt,
                "torch_max_diff": int(diff.max()),
                "torch_frac_diff": float((diff > 0).mean()),
            }
        )
    return out


def versions():
    v = {"python": sys.version.split()[0]}
    for pkg in ["torch", "torchvision", "pillow", "numpy", "transformers"]:
        try:
            v[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            v[pkg] = None
    return v


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vlm2vec", default=DEFAULT_VLM2VEC, help="a VLM2Vec git checkout holding commit c76a1d4e")
    ap.add_argument("--check", action="store_true", help="recompute and compare with the committed goldens")
    args = ap.parse_args()

    orig = load_original(args.vlm2vec)
    os.makedirs(OUT, exist_ok=True)
    tensors, cases = {}, []
    hd_cases(orig, tensors, cases, write=not args.check)
    meta = {
        "original": {"repo": "TIGER-AI-Lab/VLM2Vec", "commit": ORIG_COMMIT, "path": ORIG_PATH, "sha256": ORIG_SHA256},
        "versions": versions(),
        "crop": CROP,
        "full_global_case": FULL_GLOBAL_CASE,
        "cases": cases,
        "pil_resize": pil_resize_cases(tensors),
        "sizes_columns": ["width", "height", "num_crops", "padded_h", "padded_w", "tokens", "pixel"],
        "sizes": size_sweep(orig),
    }
    text = json.dumps(meta, indent=1) + "\n"
    if args.check:
        old = load_file(os.path.join(OUT, "golden.safetensors"))
        bad = [k for k in tensors if k not in old or not np.array_equal(old[k], tensors[k])]
        bad += [k for k in old if k not in tensors]
        with open(os.path.join(OUT, "cases.json")) as f:
            same_json = json.load(f) == json.loads(text)
        print(f"tensors differing: {bad or 'none'}; cases.json {'same' if same_json else 'DIFFERS'}")
        sys.exit(1 if bad or not same_json else 0)
    save_file(tensors, os.path.join(OUT, "golden.safetensors"))
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        f.write(text)
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"wrote {len(cases)} cases, {len(meta['sizes'])} sizes, {len(PIL_CASES)} resizes; {total / 1e6:.2f} MB in {OUT}")


if __name__ == "__main__":
    main()
