#!/usr/bin/env python3
"""Builds the tiny random Phi-3.5-vision that Kestrel tests against, and dumps
what the reference (tools/phi3v_reference.py) computes on it.

    python3 tools/make_tiny_phi3v.py OUT_DIR [--orig .cache/phi3v_orig] [--seed 0] [--no-dump]

Writes OUT_DIR as a model folder in the layout of microsoft/Phi-3.5-vision-instruct:
config.json (architectures ["Phi3VForCausalLM"], model_type "phi3_v",
embd_layer, img_processor with the Kestrel-only `vision_config` naming the
tiny CLIP, rope_scaling {"type": "su", short_factor, long_factor}),
generation_config.json (as the real one: eos_token_id 2 only, see
tests/fixtures/tiny-phi3v/README.md), model.safetensors (f32, the real
checkpoint's tensor names), preprocessor_config.json and
processor_config.json (Phi3VImageProcessor, num_crops 4) and the tokenizer
files (tools/make_tiny_phi3v_tokenizer.py). Unless --no-dump, OUT_DIR/golden/
gets the input images (PNG), cases.json, one NAME.safetensors per case and
preprocess.safetensors; the tensors and their row subsets are described in
tests/fixtures/tiny-phi3v/README.md (kept by hand, not written here).
With --orig (a folder holding phi3v_orig/ with the original remote-code
files, git-ignored), the reference is first cross-checked against the
original code (phi3v_reference.cross_check_original) and the figures go to
cases.json "cross_check".

`make_config("real", ...)` gives the published Phi-3.5-vision shapes for
tools/phi3v_compare.py.

Weights are random: linear and conv weights N(0, 1/fan_in), token embeddings
N(0, 4/hidden), norm weights 1 + N(0, 0.1), biases N(0, 0.1), CLIP's
class_embedding and position embeddings N(0, 1), the separators glb_GN and
sub_GN N(0, 1). The goldens are computed in f32 by the model reloaded from
the saved folder.

Needs torch, transformers 5.x, torchvision, pillow, numpy, safetensors, jinja2.
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_tiny_phi3v_tokenizer  # noqa: E402
import phi3v_reference as ref  # noqa: E402

NUM_CROPS = 4            # preprocessor_config.json, and every model case
MAX_NEW_TOKENS = 12
ORIGINAL_MAX_POS = 2048  # tiny: the image cases stay inside, "long_context" crosses
IMAGE_ROW_STRIDE = 64    # image placeholder rows kept in the position-wise goldens
LONG_ROW_STRIDE = 96     # all rows of the long case
PATCH_STRIDE = 12        # CLIP patch rows kept (plus the last)
PIXEL_ROWS = [0, 169]    # full pixel rows kept per crop plane (besides row/col sums)


def rope_factors(n, lo, hi, seed):
    """n deterministic factors rising from about lo to about hi, with wiggle."""
    g = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, n) ** 1.5
    return [round(float(lo + (hi - lo) * x + 0.02 * g.standard_normal()), 4) for x in t]


def make_config(kind, tok):
    """A Phi-3-V config.json dict; kind "tiny" or "real" (Phi-3.5-vision shapes)."""
    if kind == "tiny":
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=-(-tok["size"] // 64) * 64,
                    original_max_position_embeddings=ORIGINAL_MAX_POS, max_position_embeddings=32 * ORIGINAL_MAX_POS)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                      patch_size=14, image_size=336, layer_norm_eps=1e-5, hidden_act="quick_gelu")
    elif kind == "real":
        text = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32, vocab_size=32064, original_max_position_embeddings=4096,
                    max_position_embeddings=131072)
        vision = None
    else:
        raise ValueError(kind)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    img = {"image_dim_out": 1024 if vision is None else vision["hidden_size"],
           "model_name": "openai/clip-vit-large-patch14-336", "name": "clip_vision_model", "num_img_tokens": 144}
    if vision is not None:
        img["vision_config"] = vision
    cfg = {
        "_name_or_path": "Phi-3.5-vision-instruct",
        "architectures": ["Phi3VForCausalLM"],
        "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_phi3_v.Phi3VConfig",
                     "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM"},
        "bos_token_id": 1,
        "embd_layer": {"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
                       "use_hd_transform": True, "with_learnable_separator": True},
        "embd_pdrop": 0.0,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": text["hidden_size"],
        "img_processor": img,
        "initializer_range": 0.02,
        "intermediate_size": text["intermediate_size"],
        "max_position_embeddings": text["max_position_embeddings"],
        "model_type": "phi3_v",
        "num_attention_heads": text["num_attention_heads"],
        "num_hidden_layers": text["num_hidden_layers"],
        "num_key_value_heads": text["num_key_value_heads"],
        "original_max_position_embeddings": text["original_max_position_embeddings"],
        "pad_token_id": tok["<|endoftext|>"],
        "resid_pdrop": 0.0,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"long_factor": rope_factors(head_dim // 2, 1.0, 4.0, 1),
                         "short_factor": rope_factors(head_dim // 2, 1.0, 1.25, 2),
                         "type": "su"},
        "rope_theta": 10000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float32" if kind == "tiny" else "bfloat16",
        "transformers_version": "4.38.1",
        "use_cache": True,
        "vocab_size": text["vocab_size"],
    }
    return cfg


@torch.no_grad()
def randomize(model, seed):
    dev = next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    for name, p in model.lm.named_parameters():
        shape = p.shape
        rnd = lambda: torch.randn(shape, generator=g, device=dev)  # noqa: E731
        if name.endswith(("class_embedding", "glb_GN", "sub_GN")) or "position_embedding" in name:
            v = rnd()
        elif name.endswith("bias"):
            v = rnd() * 0.1
        elif p.dim() == 1:  # norm weights
            v = 1.0 + rnd() * 0.1
        elif "embed_tokens" in name:
            v = rnd() * (2.0 / math.sqrt(shape[1]))
        else:  # linear and conv weights
            v = rnd() / math.sqrt(math.prod(shape[1:]))
        p.copy_(v.to(p.dtype))


def synthetic_image(w, h, seed, cell=8):
    """Smooth gradients plus block noise (cell x cell): deterministic, not
    trivially compressible, and small as PNG."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 127 + 100 * np.sin(x / (w / 3.0) + seed)
    gch = 127 + 100 * np.cos(y / (h / 2.0) - seed)
    b = 255 * (x + y) / (w + h)
    noise = rng.normal(0, 14, (-(-h // cell), -(-w // cell), 3)).repeat(cell, 0).repeat(cell, 1)[:h, :w]
    img = np.stack([r, gch, b], -1) + noise
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


# Images by file name: (w, h, seed). Shared between cases.
IMAGES = {"img_336x336.png": (336, 336, 1), "img_200x640.png": (200, 640, 2), "img_500x375.png": (500, 375, 3),
          "img_640x200.png": (640, 200, 4), "img_640x480.png": (640, 480, 5)}
PREPROCESS_IMAGES = {"pre_wide_1400x90.png": (1400, 90, 11), "pre_tall_90x1000.png": (90, 1000, 12),
                     "pre_tiny_40x30.png": (40, 30, 13)}
# (image file, num_crops) pairs of preprocess.safetensors.
PREPROCESS = [("pre_wide_1400x90.png", 1), ("pre_wide_1400x90.png", 4), ("pre_tall_90x1000.png", 4),
              ("img_500x375.png", 1), ("img_500x375.png", 16), ("pre_tiny_40x30.png", 4)]

LONG_TEXT = ("The kestrel hovers over the field and looks down at the grass. It is a small falcon with a long "
             "tail, and it can hold itself still in the wind while it watches for a mouse. ")


def img(fn):
    return {"type": "image", "image": fn}


def txt(t):
    return {"type": "text", "text": t}


CASES = {
    "square_image": [{"role": "user", "content": [img("img_336x336.png"), txt("What is shown in this image?")]}],
    "tall_image": [{"role": "user", "content": [img("img_200x640.png"), txt("Read the text on the sign.")]}],
    "two_images": [{"role": "user", "content": [txt("Compare this image"), img("img_500x375.png"),
                                                txt("with this one."), img("img_640x200.png"),
                                                txt("What differs?")]}],
    "text_only": [{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "Tell me a story about a small bird."}],
    # Crosses original_max_position_embeddings: one teacher-forced forward over
    # the whole prompt, no greedy continuation.
    "long_context": [{"role": "user", "content": [img("img_640x480.png"), txt(LONG_TEXT * 22 + "Summarize.")]}],
}
# VLM2Vec (TIGER-Lab/VLM2Vec-Full, demo.py): raw prompts, no chat template,
# text and <|image_1|> joined by a single space; last-token pooling of the
# final normed hidden state, L2-normalized; num_crops 4.
EMBED_CASES = {
    "vlm2vec_image_text": ("<|image_1|> Represent the given image with the following question: What is in the image",
                           ["img_640x480.png"]),
    "vlm2vec_text": ("A cat and a dog", []),
    "vlm2vec_image": ("<|image_1|> Represent the given image.", ["img_500x375.png"]),
}

TEMPLATE_TESTS = [
    [{"role": "user", "content": "<|image_1|>\nWhat is this?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
    [{"role": "user", "content": [img("a"), txt("What?")]}, {"role": "assistant", "content": "A cat."},
     {"role": "user", "content": [txt("And"), {"type": "image_url", "image_url": {"url": "x"}}, img("b"),
                                  txt("these?"), txt("Two lines.")]},
     {"role": "assistant", "content": [txt("Dogs.")]}],
]


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def write_folder(out, seed):
    """The model folder; returns (config dict, tokenizer ids)."""
    os.makedirs(out, exist_ok=True)
    tok = make_tiny_phi3v_tokenizer.write_tokenizer(out, verbose=False)
    cfg = make_config("tiny", tok)
    write_json(os.path.join(out, "config.json"), cfg)
    write_json(os.path.join(out, "generation_config.json"),
               {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2,
                "pad_token_id": tok["<|endoftext|>"], "transformers_version": "4.38.1"})
    write_json(os.path.join(out, "preprocessor_config.json"), {
        "auto_map": {"AutoImageProcessor": "processing_phi3_v.Phi3VImageProcessor",
                     "AutoProcessor": "processing_phi3_v.Phi3VProcessor"},
        "do_convert_rgb": True, "image_mean": list(ref.CLIP_MEAN), "image_processor_type": "Phi3VImageProcessor",
        "image_std": list(ref.CLIP_STD), "num_crops": NUM_CROPS, "num_img_tokens": 144,
        "processor_class": "Phi3VProcessor"})
    write_json(os.path.join(out, "processor_config.json"), {
        "auto_map": {"AutoProcessor": "processing_phi3_v.Phi3VProcessor"}, "processor_class": "Phi3VProcessor"})
    from safetensors.torch import save_file
    torch.manual_seed(seed)
    model = ref.Phi3VReference(cfg)
    randomize(model, seed)
    sd = {k: v.detach().to(torch.float32).contiguous() for k, v in model.checkpoint_state_dict().items()}
    save_file(sd, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    return cfg, tok


def materialize(gdir, names):
    out = {}
    for fn in names:
        w, h, s = {**IMAGES, **PREPROCESS_IMAGES}[fn]
        path = os.path.join(gdir, fn)
        synthetic_image(w, h, s).save(path, optimize=True)
        out[fn] = Image.open(path).convert("RGB")
    return out


def image_files(messages):
    return [p["image"] for m in messages if not isinstance(m["content"], str)
            for p in m["content"] if p["type"] == "image"]


def structural_offsets(h, w):
    """Offsets within an image's placeholder run of its separators: the first
    sub-image row's sub_GN, the last sub-image row's sub_GN, glb_GN, the first
    global-view token and the first global row's sub_GN."""
    row = ref.MERGED * w + 1
    glb = ref.MERGED * h * row
    return [row - 1, glb - 1, glb, glb + 1, glb + ref.MERGED + 1]


def kept_rows(ids_neg, grids, stride_all=None):
    """Sequence positions kept in the position-wise goldens: every text
    position and, of each image's placeholder run, every IMAGE_ROW_STRIDE-th
    offset, the separators (structural_offsets) and the last; with
    stride_all, every stride_all-th position and the last 8 instead of every
    text position."""
    n = len(ids_neg)
    keep = set()
    runs = []
    p = 0
    while p < n:
        if ids_neg[p] < 0:
            q = p
            while q < n and ids_neg[q] == ids_neg[p]:
                q += 1
            runs.append((p, q))
            p = q
        else:
            p += 1
    assert len(runs) == len(grids)
    in_run = np.zeros(n, bool)
    for (a, b), (h, w) in zip(runs, grids):
        in_run[a:b] = True
        keep.update(range(a, b, IMAGE_ROW_STRIDE))
        keep.update(a + o for o in structural_offsets(h, w))
        keep.add(b - 1)
    if stride_all is None:
        keep.update(np.nonzero(~in_run)[0].tolist())
    else:
        keep.update(range(0, n, stride_all))
        keep.update(range(max(0, n - 8), n))
    return sorted(keep)


def pixel_tensors(images, rows=True):
    """Checks of the pixel values of preprocess_image() dicts (crops of all
    images concatenated, global first per image): every row's and column's
    sum (f64 sums stored as f32) and, with rows, the PIXEL_ROWS rows in full."""
    pv = torch.cat([im["pixel_values"] for im in images])  # (crops, 3, 336, 336)
    t = {"pixel_values.row_sums": pv.double().sum(3).float().contiguous(),
         "pixel_values.col_sums": pv.double().sum(2).float().contiguous()}
    if rows:
        t["pixel_values.rows"] = pv[:, :, PIXEL_ROWS].contiguous()
    return t


@torch.no_grad()
def dump(args, cfg, tok):
    from safetensors.torch import save_file
    from transformers import LlamaTokenizer
    gdir = os.path.join(args.out, "golden")
    os.makedirs(gdir, exist_ok=True)
    model = ref.Phi3VReference.from_pretrained(args.out)
    tokenizer = LlamaTokenizer.from_pretrained(args.out)  # tokenizer_config's tokenizer_class
    image_token = tok["<|image|>"]
    files = materialize(gdir, list(IMAGES) + list(PREPROCESS_IMAGES))
    ref.check_templates(TEMPLATE_TESTS + list(CASES.values()))
    meta = {"reference": "tools/phi3v_reference.py (transformers Phi3ForCausalLM + CLIPVisionModel + ours)",
            "transformers_version": __import__("transformers").__version__, "torch_version": torch.__version__,
            "num_crops": NUM_CROPS, "image_token_id": image_token, "chat_template": ref.KESTREL_CHAT_TEMPLATE,
            "rows": {"image_row_stride": IMAGE_ROW_STRIDE, "long_row_stride": LONG_ROW_STRIDE,
                     "patch_stride": PATCH_STRIDE, "pixel_rows": PIXEL_ROWS},
            "cases": {}, "embed_cases": {}}
    if args.orig:
        meta["cross_check"] = ref.cross_check_original(
            args.orig, model, tokenizer,
            [files[f] for f in ("img_500x375.png", "img_640x200.png", "img_336x336.png", "img_200x640.png",
                                "pre_wide_1400x90.png", "pre_tall_90x1000.png", "pre_tiny_40x30.png")])
        print("cross-check against the original code:", json.dumps(meta["cross_check"], indent=1))
    patch_index = sorted(set(range(0, 576, PATCH_STRIDE)) | {575})
    lm = model.lm
    for name, messages in CASES.items():
        prompt = ref.render(messages)
        fns = image_files(messages)
        images = [ref.preprocess_image(files[f], NUM_CROPS) for f in fns]
        ntok = [im["num_img_tokens"] for im in images]
        ids_neg = ref.tokenize_prompt(tokenizer, prompt, ntok)
        ids = ref.tokenize_prompt(tokenizer, prompt, ntok, image_token_id=image_token)
        n = len(ids)
        long = name == "long_context"
        table = ref.rope_table(cfg, n - 1)
        assert (table == "long") == long, (name, n, table)
        rows = kept_rows(ids_neg, [im["grid"] for im in images], LONG_ROW_STRIDE if long else None)
        emb, vis = model.embed(ids_neg, images)
        emb2, _ = model.embed(ids, images, image_token_id=image_token)
        assert torch.equal(emb, emb2)
        captured = {}

        def keep(key):
            def hook(_m, _inp, out):
                captured[key] = (out[0] if isinstance(out, tuple) else out).detach()[0].float()
            return hook
        handles = [layer.register_forward_hook(keep(f"decoder.layer.{i}")) for i, layer in enumerate(lm.model.layers)]
        handles.append(lm.model.norm.register_forward_hook(keep("decoder.norm")))
        out = lm(inputs_embeds=emb, use_cache=False)
        for h in handles:
            h.remove()
        assert lm.model.rotary_emb.inv_freq.shape[0] == cfg["hidden_size"] // cfg["num_attention_heads"] // 2
        r = torch.tensor(rows)
        t = {"input_ids": torch.tensor(ids, dtype=torch.int32), "input_ids_neg": torch.tensor(ids_neg, dtype=torch.int32),
             "position_ids": torch.arange(n, dtype=torch.int32), "rows": r.to(torch.int32),
             "decoder.embeds": emb[0][r], "logits": out.logits[0][r].float()}
        for i in range(len(lm.model.layers)):
            t[f"decoder.layer.{i}"] = captured[f"decoder.layer.{i}"][r]
        t["decoder.norm"] = captured["decoder.norm"][r]
        if images:
            if not long:  # the long case's image is processed as the others'
                t.update(pixel_tensors(images, rows=False))  # full rows: preprocess.safetensors
                t["vision.patch_index"] = torch.tensor(patch_index, dtype=torch.int32)
                t["vision.features"] = torch.cat([v[0] for v in vis])[:, patch_index].float()
            t["image_sizes"] = torch.tensor([im["image_size"] for im in images], dtype=torch.int32)
            t["num_img_tokens"] = torch.tensor(ntok, dtype=torch.int32)
            # Image-feature rows kept: the placeholder positions among `rows`,
            # as indices into the images' concatenated feature sequences.
            slot = np.cumsum(np.array(ids_neg) < 0) - 1
            img_rows = [int(slot[p]) for p in rows if ids_neg[p] < 0]
            ir = torch.tensor(img_rows)
            t["image.rows"] = ir.to(torch.int32)
            t["image.merged"] = torch.cat([v[1] for v in vis])[ir].float()
            t["image.projected"] = torch.cat([v[2] for v in vis])[ir].float()
            assert torch.equal(t["image.projected"], emb[0][torch.tensor([p for p in rows if ids_neg[p] < 0])])
        case = {"messages": messages, "prompt": prompt, "files": fns, "num_crops": NUM_CROPS, "tokens": n,
                "image_sizes": [im["image_size"] for im in images], "num_img_tokens": ntok,
                "rope_table": table, "rows_kept": len(rows)}
        if not long:
            gen = lm.generate(inputs_embeds=emb, attention_mask=torch.ones(1, n, dtype=torch.long),
                              max_new_tokens=MAX_NEW_TOKENS, do_sample=False, top_k=None, top_p=None,
                              temperature=None)
            assert gen.shape[1] <= MAX_NEW_TOKENS, gen.shape  # with inputs_embeds only, generate returns the new tokens
            new = gen[0]
            assert int(new[0]) == int(out.logits[0, -1].argmax()), "greedy[0] != argmax of the last logits"
            t["greedy"] = new.to(torch.int32)
            case["greedy_text"] = tokenizer.decode(new, skip_special_tokens=False)
            case["greedy_rope_table"] = ref.rope_table(cfg, n + len(new) - 2)
            # Smallest top-1 minus top-2 logit over the greedy steps, teacher-forced:
            # how much error a reimplementation can afford before greedy flips.
            forced = torch.cat([emb, lm.model.embed_tokens(new[None, :-1])], 1)
            top2 = lm(inputs_embeds=forced, use_cache=False).logits[0, n - 1:].topk(2, dim=-1).values
            assert torch.equal(top2[:, 0], lm(inputs_embeds=forced, use_cache=False).logits[0, n - 1:].max(-1).values)
            case["greedy_min_top1_top2_gap"] = float((top2[:, 0] - top2[:, 1]).min())
        else:
            case["greedy"] = None
        t = {k: v.detach().cpu().contiguous() for k, v in t.items()}
        save_file(t, os.path.join(gdir, f"{name}.safetensors"))
        meta["cases"][name] = case
        print(f"{name}: {n} tokens, images {ntok}, rope {table}, rows kept {len(rows)}"
              + (f", greedy {t['greedy'].tolist()}" if "greedy" in t else ""))
    for name, (prompt, fns) in EMBED_CASES.items():
        images = [ref.preprocess_image(files[f], NUM_CROPS) for f in fns]
        ntok = [im["num_img_tokens"] for im in images]
        ids_neg = ref.tokenize_prompt(tokenizer, prompt, ntok)
        ids = ref.tokenize_prompt(tokenizer, prompt, ntok, image_token_id=image_token)
        emb, _ = model.embed(ids_neg, images)
        hid = lm.model(inputs_embeds=emb, use_cache=False).last_hidden_state[0]
        last = hid[-1].float()
        t = {"input_ids": torch.tensor(ids, dtype=torch.int32), "input_ids_neg": torch.tensor(ids_neg, dtype=torch.int32),
             "decoder.norm.last": last, "embedding": torch.nn.functional.normalize(last, dim=-1)}
        if images:
            t["image_sizes"] = torch.tensor([im["image_size"] for im in images], dtype=torch.int32)
        save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(gdir, f"{name}.safetensors"))
        meta["embed_cases"][name] = {"prompt": prompt, "files": fns, "num_crops": NUM_CROPS, "tokens": len(ids),
                                     "pooling": "last", "normalize": True, "rope_table": ref.rope_table(cfg, len(ids) - 1)}
        print(f"{name}: {len(ids)} tokens, embedding[:4] {t['embedding'][:4].tolist()}")
    meta["preprocess"] = dump_preprocess(gdir, files)
    write_json(os.path.join(gdir, "cases.json"), meta)


def dump_preprocess(gdir, files):
    """preprocess.safetensors: per entry k of PREPROCESS, `k.pixel_values.rows`
    (crops, 3, len(PIXEL_ROWS), 336), `k.pixel_values.row_sums` and
    `k.pixel_values.col_sums` (crops, 3, 336), `k.image_size` (2,) i32."""
    from safetensors.torch import save_file
    t, meta = {}, []
    for k, (fn, nc) in enumerate(PREPROCESS):
        im = ref.preprocess_image(files[fn], nc)
        for key, v in pixel_tensors([im]).items():
            t[f"{k}.{key}"] = v
        t[f"{k}.image_size"] = torch.tensor(im["image_size"], dtype=torch.int32)
        meta.append({"index": k, "file": fn, "num_crops": nc, "image_size": im["image_size"],
                     "crops": im["pixel_values"].shape[0], "num_img_tokens": im["num_img_tokens"]})
        print(f"preprocess {k}: {fn} num_crops {nc} -> {im['image_size']}, {im['pixel_values'].shape[0]} crops")
    save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(gdir, "preprocess.safetensors"))
    return {"entries": meta, "pixel_rows": PIXEL_ROWS}


@torch.no_grad()
def verify(args):
    """Reloads the folder from scratch and recomputes the two_images case:
    ids, pixel checks, logits and greedy must reproduce exactly."""
    from safetensors.torch import load_file
    from transformers import LlamaTokenizer
    gdir = os.path.join(args.out, "golden")
    model = ref.Phi3VReference.from_pretrained(args.out)
    tokenizer = LlamaTokenizer.from_pretrained(args.out)  # tokenizer_config's tokenizer_class
    meta = json.load(open(os.path.join(gdir, "cases.json")))
    case = meta["cases"]["two_images"]
    g = load_file(os.path.join(gdir, "two_images.safetensors"))
    images = [ref.preprocess_image(Image.open(os.path.join(gdir, f)).convert("RGB"), case["num_crops"])
              for f in case["files"]]
    ids = ref.tokenize_prompt(tokenizer, ref.render(case["messages"]), [i["num_img_tokens"] for i in images],
                              image_token_id=meta["image_token_id"])
    assert ids == g["input_ids"].tolist()
    for k, v in pixel_tensors(images, rows=False).items():
        assert torch.equal(v, g[k]), k
    logits = model(ids, images, image_token_id=meta["image_token_id"]).logits[0]
    assert torch.equal(logits[g["rows"].long()], g["logits"]), "logits do not reproduce"
    print(f"verify: two_images reproduces ({len(ids)} tokens, logits max |.| {float(g['logits'].abs().max()):.3f})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--orig", default=None, help="folder with phi3v_orig/ (the original remote code) to cross-check")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-dump", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg, tok = write_folder(args.out, args.seed)
    print(f"wrote {args.out}: vocab {cfg['vocab_size']} (tokenizer {tok['size']}), <|image|> = {tok['<|image|>']}")
    if not args.no_dump:
        dump(args, cfg, tok)
        verify(args)


if __name__ == "__main__":
    main()
