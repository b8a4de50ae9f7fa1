#!/usr/bin/env python3
"""Builds the tiny random Qwen2-VL that Kestrel embeds and tests against, and
dumps what Hugging Face transformers computes on it.

    python3 tools/make_tiny_qwen2vl.py OUT_DIR [--tokenizer DIR] [--dtype float32]
                                       [--config tiny|2b|7b] [--seed 0] [--no-dump]

Writes to OUT_DIR a model folder exactly as users download one (config.json,
model.safetensors, preprocessor_config.json, tokenizer files, chat template),
then, unless --no-dump, OUT_DIR/golden/: the synthetic input images (PNG) and
for each case in CASES a safetensors file of HF's tensors plus cases.json:
  input_ids, pixel_values(_videos), image_grid_thw / video_grid_thw,
  position_ids (3, n) from get_rope_index and rope_delta,
  vision.patch_embed, vision.block.{i}, vision.merger,
  decoder.embeds (after image features are scattered in), decoder.layer.{i},
  decoder.norm, logits (all positions, f32), greedy token ids.

The built-in model is this script's tiny output: its model files live in
src/model/builtin/tiny-qwen2-vl/ (embedded in the binary) and its golden/ in
tests/fixtures/tiny-qwen2-vl/golden/ (test data only); regenerate into a
scratch folder and copy the two parts there.

`--config 2b|7b` builds random checkpoints with the published 2B/7B shapes
(bf16 weights) for the GPU comparison; `tiny` is small enough for CI.

Needs torch and transformers (the GPU host has both). Weights are random
with a spread chosen so logits have real margins: a linear layer's weights
are N(0, 1/fan_in), token embeddings N(0, 4/hidden) (they double as the LM
head when tied), norms are 1 + N(0, 0.1), biases N(0, 0.1).
"""
import argparse
import inspect
import json
import math
import os
import shutil
import sys

import numpy as np
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


def token_ids(tok_dir):
    with open(os.path.join(tok_dir, "tokenizer.json")) as f:
        tj = json.load(f)
    ids = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
    missing = [s for s in SPECIAL if s not in ids]
    if missing:
        sys.exit(f"tokenizer in {tok_dir} lacks {missing}")
    vocab = max(max(tj["model"]["vocab"].values()), max(ids.values())) + 1
    return ids, vocab


def make_config(kind, ids, vocab):
    from transformers import Qwen2VLConfig
    if kind == "tiny":
        text = dict(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                    hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, vocab_size=vocab, rms_norm_eps=1e-6, max_position_embeddings=4096,
                    rope_theta=1000000.0, rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]},
                    tie_word_embeddings=False)
        # Head dims 64 (LM and ViT) so the same model runs on our GPU kernels too.
        vision = dict(depth=2, embed_dim=64, hidden_size=128, num_heads=1, mlp_ratio=4, patch_size=14,
                      temporal_patch_size=2, spatial_merge_size=2, in_channels=3, hidden_act="quick_gelu")
    else:
        big = kind == "7b"
        text = dict(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                    hidden_size=3584 if big else 1536, intermediate_size=18944 if big else 8960,
                    num_hidden_layers=28, num_attention_heads=28 if big else 12,
                    num_key_value_heads=4 if big else 2, vocab_size=152064 if big else 151936,
                    rms_norm_eps=1e-6, max_position_embeddings=32768, rope_theta=1000000.0,
                    rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, tie_word_embeddings=not big)
        vision = dict(depth=32, embed_dim=1280, hidden_size=text["hidden_size"], num_heads=16, mlp_ratio=4,
                      patch_size=14, temporal_patch_size=2, spatial_merge_size=2, in_channels=3,
                      hidden_act="quick_gelu")
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision,
                        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                        tie_word_embeddings=text["tie_word_embeddings"])
    return cfg


@torch.no_grad()
def randomize(model, seed):
    dev = next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    for name, p in model.named_parameters():
        shape = p.shape
        rnd = lambda: torch.randn(shape, generator=g, device=dev)  # noqa: E731
        if name.endswith("bias"):
            v = rnd() * 0.1
        elif p.dim() == 1:  # norm weights
            v = 1.0 + rnd() * 0.1
        else:
            fan_in = math.prod(shape[1:])
            v = rnd() / math.sqrt(fan_in)
            if "embed_tokens" in name:
                # std 2/sqrt(hidden): as an input embedding any scale works (the
                # first RMSNorm rescales it), but a tied LM head with N(0, 1)
                # rows gives logits of std ~sqrt(hidden) (~40 for 2B): every
                # step a certain one-token answer, a degenerate comparison.
                v = rnd() * (2.0 / math.sqrt(shape[1]))
        p.copy_(v.to(p.dtype))


def synthetic_image(w, h, seed):
    """Smooth gradients plus noise: deterministic and not trivially compressible."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 127 + 100 * np.sin(x / (w / 3.0) + seed)
    gch = 127 + 100 * np.cos(y / (h / 2.0) - seed)
    b = 255 * (x + y) / (w + h)
    img = np.stack([r, gch, b], -1) + rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


# Each case: a list of chat messages; images are (w, h, seed) triples.
CASES = {
    "text_only": [{"role": "user", "content": [{"type": "text", "text": "Tell me a story about a small bird."}]}],
    "one_image": [{"role": "user", "content": [{"type": "image", "image": (64, 48, 1)},
                                               {"type": "text", "text": "What is in this picture?"}]}],
    "two_images": [{"role": "user", "content": [{"type": "text", "text": "Compare"},
                                                {"type": "image", "image": (56, 56, 2)},
                                                {"type": "text", "text": "with"},
                                                {"type": "image", "image": (90, 40, 3)},
                                                {"type": "text", "text": "please."}]}],
    "wide_image": [{"role": "user", "content": [{"type": "image", "image": (300, 30, 4)},
                                                {"type": "text", "text": "Read the banner."}]}],
    "video": [{"role": "user", "content": [{"type": "video", "video": [(56, 42, 10 + i) for i in range(4)]},
                                           {"type": "text", "text": "What happens?"}]}],
}
# The real shapes use real image sizes (the GPU comparison).
BIG_CASES = {
    "text_only": CASES["text_only"],
    "one_image": [{"role": "user", "content": [{"type": "image", "image": (640, 480, 1)},
                                               {"type": "text", "text": "Describe this image in detail."}]}],
    "two_images": [{"role": "user", "content": [{"type": "image", "image": (448, 448, 2)},
                                                {"type": "text", "text": "and"},
                                                {"type": "image", "image": (320, 640, 3)},
                                                {"type": "text", "text": "What differs?"}]}],
    "wide_image": [{"role": "user", "content": [{"type": "image", "image": (1400, 90, 4)},
                                                {"type": "text", "text": "Read the banner."}]}],
    "video": [{"role": "user", "content": [{"type": "video", "video": [(336, 252, 10 + i) for i in range(4)]},
                                           {"type": "text", "text": "What happens?"}]}],
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--tokenizer", default=os.path.join(ROOT, "src/model/builtin/tiny-qwen2-vl"))
    ap.add_argument("--config", default="tiny", choices=["tiny", "2b", "7b"])
    ap.add_argument("--dtype", default="bfloat16", help="weights on disk; HF then computes in f32 on them")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-dump", action="store_true")
    ap.add_argument("--logits-dump", action="store_true",
                    help="the full-size shapes' dump (greedy + f32/bf16 logits) even for --config tiny")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 8 (tiny) or 32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.max_new_tokens is None:
        args.max_new_tokens = 8 if args.config == "tiny" else 32

    from transformers import (AutoProcessor, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLVideoProcessor)

    os.makedirs(args.out, exist_ok=True)
    ids, vocab = token_ids(args.tokenizer)
    cfg = make_config(args.config, ids, vocab)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    torch.manual_seed(args.seed)
    with torch.device(args.device if args.config != "tiny" else "cpu"):
        model = Qwen2VLForConditionalGeneration(cfg)
    randomize(model, args.seed)
    model = model.to(dtype)
    model.save_pretrained(args.out, safe_serialization=True)
    # The reference computes in f32 on exactly the values on disk, loaded as a
    # user would load them (casting this model back would keep buffers such as
    # the RoPE inverse frequencies rounded to the disk dtype).
    del model
    model = Qwen2VLForConditionalGeneration.from_pretrained(args.out, dtype=torch.float32)
    for f in os.listdir(args.tokenizer):
        if f.startswith("tokenizer") or f.startswith("chat_template") or f == "special_tokens_map.json":
            shutil.copy(os.path.join(args.tokenizer, f), os.path.join(args.out, f))
    # Few patches per image for the tiny model; the published limits otherwise.
    pixels = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 64) if args.config == "tiny" else dict(
        min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
    Qwen2VLImageProcessor(**pixels).save_pretrained(args.out)
    Qwen2VLVideoProcessor(**pixels).save_pretrained(args.out)
    print(f"wrote {args.config} model to {args.out} ({dtype}); special ids:",
          {k: ids[k] for k in SPECIAL})
    if args.no_dump:
        return
    processor = AutoProcessor.from_pretrained(args.out)
    if args.config == "tiny" and not args.logits_dump:
        dump(args, model.to(args.device).eval(), processor)
    else:
        dump_logits(args, model.to(args.device).eval(), processor)


@torch.no_grad()
def rope_index(model, inputs):
    """HF's M-RoPE positions (3, n) and delta for one prompt. Text-only prompts
    use plain positions (get_rope_index is for vision + text sequences)."""
    ids = inputs["input_ids"]
    grids = {k: inputs.get(k) for k in ("image_grid_thw", "video_grid_thw")}
    if all(g is None for g in grids.values()):
        n = ids.shape[1]
        return torch.arange(n, dtype=torch.int32).expand(3, n).contiguous(), torch.zeros(1, dtype=torch.int32)
    kwargs = dict(grids, attention_mask=inputs.get("attention_mask"))
    params = inspect.signature(model.model.get_rope_index).parameters
    if "mm_token_type_ids" in params:  # transformers >= 5.x
        tt = inputs.get("mm_token_type_ids")
        if tt is None:
            tt = torch.zeros_like(ids)
            tt[ids == model.config.image_token_id] = 1
            tt[ids == model.config.video_token_id] = 2
        kwargs["mm_token_type_ids"] = tt
    pos, delta = model.model.get_rope_index(ids, **kwargs)
    return pos[:, 0, :].to(torch.int32).cpu().contiguous(), delta.reshape(-1).to(torch.int32).cpu().contiguous()


def materialize_case(name, messages, gdir):
    """Writes a case's synthetic images to gdir; returns (messages naming the
    files, PIL images, video frame stacks, file names)."""
    images, videos, files = [], [], []
    msgs = json.loads(json.dumps(messages))
    for m in msgs:
        for part in m["content"]:
            if part["type"] == "image":
                w, h, s = part["image"]
                fn = f"{name}_img{len(images)}.png"
                img = synthetic_image(w, h, s)
                img.save(os.path.join(gdir, fn))
                images.append(img)
                files.append(fn)
                part["image"] = fn
            elif part["type"] == "video":
                frames, fns = [], []
                for j, (w, h, s) in enumerate(part["video"]):
                    fn = f"{name}_vid{len(videos)}_f{j}.png"
                    im = synthetic_image(w, h, s)
                    im.save(os.path.join(gdir, fn))
                    frames.append(np.asarray(im))
                    fns.append(fn)
                videos.append(np.stack(frames))
                files.extend(fns)
                part["video"] = fns
    return msgs, images, videos, files


def processor_inputs(processor, msgs, images, videos, device):
    text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    kw = {}
    if images:
        kw["images"] = images
    if videos:
        kw["videos"] = videos
        kw["videos_kwargs"] = {"do_sample_frames": False}
    return text, processor(text=[text], return_tensors="pt", **kw).to(device)


@torch.no_grad()
def forced_logits(model, inputs, tokens):
    """f32 logits at the positions predicting `tokens`, teacher-forced."""
    n = inputs["input_ids"].shape[1]
    full = dict(inputs)
    ids = torch.cat([inputs["input_ids"], tokens[None, :-1].to(inputs["input_ids"].device)], 1)
    full["input_ids"] = ids
    full["attention_mask"] = torch.ones_like(ids)
    if full.get("mm_token_type_ids") is not None:
        tt = inputs["mm_token_type_ids"]
        full["mm_token_type_ids"] = torch.cat([tt, torch.zeros_like(ids[:, n:]).to(tt.dtype)], 1)
    for k in ("pixel_values", "pixel_values_videos"):
        if k in full:
            full[k] = full[k].to(model.dtype)
    out = model(**full, use_cache=False)
    return out.logits[0, n - 1:].float().cpu().contiguous()


@torch.no_grad()
def dump_logits(args, model, processor):
    """For the full-size shapes: HF's greedy continuation in f32, and the
    logits predicting each of its tokens from the f32 model and from the
    same weights loaded in bf16 (HF's own bf16 noise, for the bound)."""
    from safetensors.torch import save_file
    gdir = os.path.join(args.out, "golden")
    os.makedirs(gdir, exist_ok=True)
    meta = {"processor": type(processor.image_processor).__name__, "config": args.config, "cases": {}}
    results = {}
    cases = BIG_CASES if args.config != "tiny" else CASES
    for name, messages in cases.items():
        msgs, images, videos, files = materialize_case(name, messages, gdir)
        text, inputs = processor_inputs(processor, msgs, images, videos, model.device)
        gen = model.generate(**inputs, max_new_tokens=args.max_new_tokens,
                             do_sample=False, top_k=None, top_p=None, temperature=None)
        new = gen[0, inputs["input_ids"].shape[1]:]
        results[name] = dict(input_ids=inputs["input_ids"][0].to(torch.int32).cpu().contiguous(),
                             greedy=new.to(torch.int32).cpu().contiguous(),
                             logits_f32=forced_logits(model, inputs, new))
        meta["cases"][name] = {"messages": msgs, "prompt": text, "files": files}
        print(f"{name}: {inputs['input_ids'].shape[1]} tokens, greedy {new.tolist()[:8]}...", flush=True)
    model.to("cpu")
    del model
    torch.cuda.empty_cache()
    from transformers import Qwen2VLForConditionalGeneration
    bf = Qwen2VLForConditionalGeneration.from_pretrained(args.out, dtype=torch.bfloat16).to(args.device).eval()
    for name, messages in cases.items():
        msgs, images, videos, _ = materialize_case(name, messages, gdir)
        _, inputs = processor_inputs(processor, msgs, images, videos, bf.device)
        results[name]["logits_bf16"] = forced_logits(bf, inputs, results[name]["greedy"].long())
        save_file(results[name], os.path.join(gdir, f"{name}.safetensors"))
    with open(os.path.join(gdir, "cases.json"), "w") as f:
        json.dump(meta, f, indent=1)


@torch.no_grad()
def dump(args, model, processor):
    from safetensors.torch import save_file
    gdir = os.path.join(args.out, "golden")
    os.makedirs(gdir, exist_ok=True)
    cases = CASES if args.config == "tiny" else BIG_CASES
    meta = {"processor": type(processor.image_processor).__name__, "cases": {}}
    for name, messages in cases.items():
        msgs, images, videos, files = materialize_case(name, messages, gdir)
        text, inputs = processor_inputs(processor, msgs, images, videos, model.device)
        captured = {}

        def keep(key):
            def hook(_mod, _inp, out):
                captured[key] = (out[0] if isinstance(out, tuple) else out).detach().float().cpu().contiguous()
            return hook

        handles = []
        visual, lm = model.model.visual, model.model.language_model
        handles.append(visual.patch_embed.register_forward_hook(keep("vision.patch_embed")))
        for i, blk in enumerate(visual.blocks):
            handles.append(blk.register_forward_hook(keep(f"vision.block.{i}")))
        handles.append(visual.merger.register_forward_hook(keep("vision.merger")))
        handles.append(lm.embed_tokens.register_forward_hook(keep("decoder.token_embeds")))
        for i, layer in enumerate(lm.layers):
            handles.append(layer.register_forward_hook(keep(f"decoder.layer.{i}")))
        handles.append(lm.norm.register_forward_hook(keep("decoder.norm")))

        def pre_layer0(_mod, a, kwargs):
            hs = a[0] if a else kwargs["hidden_states"]
            captured["decoder.embeds"] = hs.detach().float().cpu().contiguous()
        handles.append(lm.layers[0].register_forward_pre_hook(pre_layer0, with_kwargs=True))

        out = model(**inputs, use_cache=False)
        for h in handles:
            h.remove()
        tensors = {k: (v[0] if k.startswith("decoder.") and v.dim() == 3 else v).clone() for k, v in captured.items()}
        tensors["logits"] = out.logits[0].float().cpu().contiguous()
        tensors["input_ids"] = inputs["input_ids"][0].to(torch.int32).cpu().contiguous()
        tensors["position_ids"], tensors["rope_delta"] = rope_index(model, inputs)
        for k in ("pixel_values", "pixel_values_videos"):
            if k in inputs:
                tensors[k] = inputs[k].float().cpu().contiguous()
        for k in ("image_grid_thw", "video_grid_thw"):
            if k in inputs and inputs[k] is not None:
                tensors[k] = inputs[k].to(torch.int32).cpu().contiguous()
        gen = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, top_k=None,
                             top_p=None, temperature=None)
        new = gen[0, inputs["input_ids"].shape[1]:]
        tensors["greedy"] = new.to(torch.int32).cpu().contiguous()
        save_file(tensors, os.path.join(gdir, f"{name}.safetensors"))
        meta["cases"][name] = {"messages": msgs, "prompt": text, "files": files,
                               "greedy_text": processor.decode(new, skip_special_tokens=False)}
        print(f"{name}: {tensors['input_ids'].numel()} tokens, greedy {new.tolist()}")
    with open(os.path.join(gdir, "cases.json"), "w") as f:
        json.dump(meta, f, indent=1)


if __name__ == "__main__":
    main()
